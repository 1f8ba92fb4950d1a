//! What the eBPF programs read, found on the running kernel before they are loaded: the
//! offsets of the lifecycle tracepoints' fields (from their `format` files), the fixed layout
//! of the syscall records (checked), and, where `sched_process_exit` has no `group_dead`, the
//! BTF offsets of the thread count that replaces it. The result is the programs' `LAYOUT`
//! global (`tracer_common::layout`).

use tracer_common::{
    Syscall,
    layout::{self, FIELD_ABSENT, KernelLayout, PidNamespace, TracepointField},
};

use super::{
    btf::{BtfError, KernelBtf},
    tracefs,
};

/// How the exit program tells that the last thread of a process is exiting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExitRule {
    /// `group_dead` where the tracepoint has it, else the live-thread count.
    #[default]
    Auto,
    /// The tracepoint's `group_dead` field (recent kernels only).
    GroupDead,
    /// `current->signal->live`, found through BTF (every kernel with BTF).
    LiveThreads,
}

/// A kernel whose tracepoints do not have what the programs read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "this kernel has no tracepoint {0}; vmatrace needs the syscall, sched and task tracepoints (CONFIG_FTRACE_SYSCALLS)"
    )]
    Missing(String),
    #[error(
        "this kernel's tracepoint {tracepoint} has no {field} of {size} bytes{at} (its format file says otherwise), so vmatrace cannot read it"
    )]
    Mismatch {
        tracepoint: String,
        field: String,
        size: usize,
        /// Where the field must be, for fields read at a fixed offset.
        at: String,
    },
    #[error(
        "this kernel's tracepoint sched:sched_process_exit has no group_dead, and the thread count that replaces it could not be found: {0}; vmatrace needs kernel BTF (CONFIG_DEBUG_INFO_BTF) on such kernels"
    )]
    NoExitSource(BtfError),
    #[error(
        "this kernel's tracepoint sched:sched_process_exit has no group_dead (recent kernels only); use --exit-rule auto"
    )]
    NoGroupDead,
    #[error(
        "vmatrace runs in a PID namespace of its own, and the kernel's pid structures that translate a new process's pid could not be found: {0}; vmatrace needs kernel BTF (CONFIG_DEBUG_INFO_BTF) there, or run it in the host's PID namespace"
    )]
    NoPidNamespaceSource(BtfError),
}

/// Adds where the programs read a process's count of live threads (`current->signal->live`),
/// when BTF has it and the layout does not already: the commit program then skips the calls
/// of single-threaded processes, which nothing can race (`tracer-ebpf/src/commit.rs`).
/// Without it every call is committed.
pub fn thread_count(out: &mut KernelLayout, btf: impl FnOnce() -> Result<KernelBtf, BtfError>) {
    if out.task_signal != FIELD_ABSENT && out.signal_live != FIELD_ABSENT {
        return;
    }
    let found = btf().and_then(|btf| {
        Ok((
            btf.member_offset("task_struct", "signal")?,
            btf.member_offset("signal_struct", "live")?,
        ))
    });
    match found {
        Ok((signal, live)) => (out.task_signal, out.signal_live) = (signal, live),
        Err(e) => log::info!(
            "{}: the calls of single-threaded processes are committed too",
            crate::errors::Chain(&e)
        ),
    }
}

/// Where the user TLS base of a thread is in `struct task_struct` (x86_64:
/// `thread.fsbase`), for the programs' walk of Python frames; `FIELD_ABSENT` on other
/// architectures or when BTF does not say.
pub fn task_tls_base(btf: impl FnOnce() -> Result<KernelBtf, BtfError>) -> u32 {
    if !cfg!(target_arch = "x86_64") {
        return FIELD_ABSENT;
    }
    let found = btf().and_then(|btf| {
        let thread = btf.member_offset("task_struct", "thread")?;
        let fsbase = btf.member_offset("thread_struct", "fsbase")?;
        Ok(thread + fsbase)
    });
    found.unwrap_or_else(|e| {
        log::info!("no Python frames: {e}");
        FIELD_ABSENT
    })
}

/// The layout the programs read on this kernel, reporting pids of `pid_namespace`. `btf` is
/// asked only when the exit program or the namespace needs it. `syscall_tracepoints`: the
/// syscall records are read too (tracepoint backend).
pub fn kernel_layout(
    root: &str,
    exit_rule: ExitRule,
    syscall_tracepoints: bool,
    pid_namespace: PidNamespace,
    btf: impl FnOnce() -> Result<KernelBtf, BtfError>,
) -> Result<KernelLayout, LayoutError> {
    let mut btf = Lazy::new(btf);
    if syscall_tracepoints {
        check_syscall_records(root, &available_syscalls(root)?)?;
    }
    let mut out = KernelLayout {
        newtask_pid: offset_of(root, &layout::NEWTASK_PID)?,
        newtask_clone_flags: offset_of(root, &layout::NEWTASK_CLONE_FLAGS)?,
        exec_filename: offset_of(root, &layout::EXEC_FILENAME)?,
        exec_old_pid: offset_of(root, &layout::EXEC_OLD_PID)?,
        ..KernelLayout::UNSET
    };
    let group_dead = match offset_of(root, &layout::EXIT_GROUP_DEAD) {
        Ok(o) => Some(o),
        Err(LayoutError::Mismatch { .. }) => None,
        Err(e) => return Err(e),
    };
    match (exit_rule, group_dead) {
        (ExitRule::Auto | ExitRule::GroupDead, Some(o)) => out.exit_group_dead = o,
        (ExitRule::GroupDead, None) => return Err(LayoutError::NoGroupDead),
        (ExitRule::Auto, None) | (ExitRule::LiveThreads, _) => {
            let btf = btf.get().map_err(LayoutError::NoExitSource)?;
            out.task_signal = btf
                .member_offset("task_struct", "signal")
                .map_err(LayoutError::NoExitSource)?;
            out.signal_live = btf
                .member_offset("signal_struct", "live")
                .map_err(LayoutError::NoExitSource)?;
        }
    }
    if !pid_namespace.is_kernel() {
        let found = btf.get().and_then(|btf| {
            Ok((
                btf.member_offset("task_struct", "thread_pid")?,
                btf.member_offset("pid", "level")?,
                btf.member_offset("pid", "numbers")?,
                btf.struct_size("upid")?,
                btf.member_offset("upid", "nr")?,
            ))
        });
        match found.map_err(LayoutError::NoPidNamespaceSource)? {
            (thread_pid, level, numbers, upid, 0) => {
                out.task_thread_pid = thread_pid;
                out.pid_level = level;
                out.pid_numbers = numbers;
                out.upid_size = upid;
                out.pid_namespace = pid_namespace;
            }
            _ => {
                return Err(LayoutError::NoPidNamespaceSource(BtfError::Malformed(
                    "upid.nr is not its first member",
                )));
            }
        }
    }
    Ok(out)
}

/// The kernel's BTF, read at most once, when first asked for.
struct Lazy<F> {
    load: Option<F>,
    btf: Option<Result<KernelBtf, BtfError>>,
}

impl<F: FnOnce() -> Result<KernelBtf, BtfError>> Lazy<F> {
    fn new(load: F) -> Self {
        Self {
            load: Some(load),
            btf: None,
        }
    }

    fn get(&mut self) -> Result<&KernelBtf, BtfError> {
        if let Some(load) = self.load.take() {
            self.btf = Some(load());
        }
        match &self.btf {
            Some(Ok(btf)) => Ok(btf),
            Some(Err(e)) => Err(e.clone()),
            None => Err(BtfError::Read("not loaded".into())),
        }
    }
}

/// The offset of `f` in its tracepoint's record, checked for its size.
fn offset_of(root: &str, f: &TracepointField) -> Result<u32, LayoutError> {
    let tracepoint = format!("{}:{}", f.category, f.event);
    let fields = tracefs::read_format(root, f.category, f.event)
        .ok_or_else(|| LayoutError::Missing(tracepoint.clone()))?;
    fields
        .iter()
        .find(|x| x.name == f.field && x.size == f.size)
        .and_then(|x| u32::try_from(x.offset).ok().filter(|&o| o != FIELD_ABSENT))
        .ok_or(LayoutError::Mismatch {
            tracepoint,
            field: f.field.to_string(),
            size: f.size,
            at: String::new(),
        })
}

/// The traced syscalls this kernel has (each has its `syscalls:sys_enter_*` tracepoint); a
/// missing one that every kernel has means the syscall tracepoints are missing.
pub fn available_syscalls(root: &str) -> Result<Vec<Syscall>, LayoutError> {
    let mut out = Vec::new();
    for call in Syscall::ALL {
        let event = format!("sys_enter_{}", call.name());
        if tracefs::has_tracepoint(root, "syscalls", &event) {
            out.push(call);
        } else if !call.optional() {
            return Err(LayoutError::Missing(format!("syscalls:{event}")));
        }
    }
    Ok(out)
}

/// Every `sys_enter_*` record holds its arguments from [`layout::SYS_ENTER_ARGS_OFFSET`], and
/// every `sys_exit_*` its `ret` at [`layout::SYS_EXIT_RET_OFFSET`]: the programs read them at
/// those constant offsets.
fn check_syscall_records(root: &str, calls: &[Syscall]) -> Result<(), LayoutError> {
    for &call in calls {
        for (event, name, offset) in [
            (
                format!("sys_enter_{}", call.name()),
                None,
                layout::SYS_ENTER_ARGS_OFFSET,
            ),
            (
                format!("sys_exit_{}", call.name()),
                Some("ret"),
                layout::SYS_EXIT_RET_OFFSET,
            ),
        ] {
            let tracepoint = format!("syscalls:{event}");
            let fields = tracefs::read_format(root, "syscalls", &event)
                .ok_or_else(|| LayoutError::Missing(tracepoint.clone()))?;
            // A call without arguments (`munlockall`) has no slot to check at entry.
            let ok = (name.is_none() && call.nargs() == 0)
                || fields
                    .iter()
                    .any(|f| f.offset == offset && f.size == 8 && name.is_none_or(|n| n == f.name));
            if !ok {
                return Err(LayoutError::Mismatch {
                    tracepoint,
                    field: name.unwrap_or("argument").to_string(),
                    size: 8,
                    at: format!(" at offset {offset}"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const EXIT_OLD: &str = "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
";

    fn no_btf() -> Result<KernelBtf, BtfError> {
        Err(BtfError::Read("none in this test".into()))
    }

    /// A fake tracefs with the records of Linux 6.1 (no `group_dead`).
    fn fake_tracefs(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmatrace-layout-{name}-{}", std::process::id()));
        let write = |cat: &str, ev: &str, text: &str| {
            let d = dir.join("events").join(cat).join(ev);
            std::fs::create_dir_all(&d).expect("test setup");
            std::fs::write(d.join("format"), text).expect("test setup");
        };
        for c in Syscall::ALL {
            let arg = "\tfield:unsigned long a;\toffset:16;\tsize:8;\tsigned:0;\n";
            write("syscalls", &format!("sys_enter_{}", c.name()), arg);
            let ret = "\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n";
            write("syscalls", &format!("sys_exit_{}", c.name()), ret);
        }
        write(
            "task",
            "task_newtask",
            "\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n",
        );
        // Moved fields are followed: a kernel that put old_pid elsewhere still works.
        write(
            "sched",
            "sched_process_exec",
            "\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t old_pid;\toffset:20;\tsize:4;\tsigned:1;\n",
        );
        write("sched", "sched_process_exit", EXIT_OLD);
        dir
    }

    #[test]
    fn offsets_come_from_the_format_files() {
        let dir = fake_tracefs("offsets");
        let root = dir.to_str().expect("test setup");
        let with_group_dead =
            format!("{EXIT_OLD}\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n");
        std::fs::write(
            dir.join("events/sched/sched_process_exit/format"),
            with_group_dead,
        )
        .expect("test setup");
        let l = kernel_layout(root, ExitRule::Auto, true, PidNamespace::KERNEL, no_btf)
            .expect("a complete layout");
        assert_eq!(
            (
                l.newtask_pid,
                l.newtask_clone_flags,
                l.exec_filename,
                l.exec_old_pid
            ),
            (8, 32, 8, 20)
        );
        assert_eq!(l.exit_group_dead, 32);
        assert_eq!((l.task_signal, l.signal_live), (FIELD_ABSENT, FIELD_ABSENT));
        std::fs::remove_dir_all(&dir).expect("test setup");
    }

    #[test]
    fn without_group_dead_the_thread_count_comes_from_btf() {
        let dir = fake_tracefs("old");
        let root = dir.to_str().expect("test setup");
        // No BTF either: one line that says what is missing.
        let err =
            kernel_layout(root, ExitRule::Auto, true, PidNamespace::KERNEL, no_btf).unwrap_err();
        assert!(matches!(err, LayoutError::NoExitSource(_)), "{err}");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        assert_eq!(
            kernel_layout(
                root,
                ExitRule::GroupDead,
                true,
                PidNamespace::KERNEL,
                no_btf
            ),
            Err(LayoutError::NoGroupDead)
        );
        if Path::new(super::super::btf::VMLINUX_BTF).exists() {
            let l = kernel_layout(
                root,
                ExitRule::Auto,
                true,
                PidNamespace::KERNEL,
                KernelBtf::load,
            )
            .expect("layout");
            assert_eq!(l.exit_group_dead, FIELD_ABSENT);
            assert_ne!(l.task_signal, FIELD_ABSENT);
            assert_ne!(l.signal_live, FIELD_ABSENT);
        }
        std::fs::remove_dir_all(&dir).expect("test setup");
    }

    /// arm64 has no memory protection keys: vmatrace traces the other syscalls.
    #[test]
    fn optional_syscalls_the_kernel_lacks_are_left_out() {
        let dir = fake_tracefs("optional");
        let root = dir.to_str().expect("test setup");
        for ev in ["sys_enter_pkey_mprotect", "sys_exit_pkey_mprotect"] {
            std::fs::remove_dir_all(dir.join("events/syscalls").join(ev)).expect("test setup");
        }
        let calls = available_syscalls(root).expect("the others");
        assert!(!calls.contains(&Syscall::PkeyMprotect));
        assert_eq!(calls.len(), Syscall::ALL.len() - 1);
        assert!(
            kernel_layout(
                root,
                ExitRule::LiveThreads,
                true,
                PidNamespace::KERNEL,
                KernelBtf::load
            )
            .is_ok()
                || !Path::new(super::super::btf::VMLINUX_BTF).exists()
        );
        std::fs::remove_dir_all(dir.join("events/syscalls/sys_enter_munmap")).expect("test setup");
        assert_eq!(
            available_syscalls(root),
            Err(LayoutError::Missing("syscalls:sys_enter_munmap".into()))
        );
        std::fs::remove_dir_all(&dir).expect("test setup");
    }

    #[test]
    fn missing_tracepoints_and_moved_syscall_fields_are_refused() {
        let dir = fake_tracefs("refused");
        let root = dir.to_str().expect("test setup");
        std::fs::write(
            dir.join("events/syscalls/sys_exit_munmap/format"),
            "\tfield:long ret;\toffset:24;\tsize:8;\tsigned:1;\n",
        )
        .expect("test setup");
        let err =
            kernel_layout(root, ExitRule::Auto, true, PidNamespace::KERNEL, no_btf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this kernel's tracepoint syscalls:sys_exit_munmap has no ret of 8 bytes at offset 16 (its format file says otherwise), so vmatrace cannot read it"
        );
        std::fs::remove_dir_all(dir.join("events/task")).expect("test setup");
        let err =
            kernel_layout(root, ExitRule::Auto, false, PidNamespace::KERNEL, no_btf).unwrap_err();
        assert_eq!(err, LayoutError::Missing("task:task_newtask".into()));
        std::fs::remove_dir_all(&dir).expect("test setup");
    }

    /// The layout of this machine's own kernel is complete.
    #[test]
    fn this_kernels_layout_is_complete() {
        let Some(root) = [tracefs::TRACEFS, tracefs::DEBUGFS_TRACING]
            .into_iter()
            .find(|r| Path::new(r).join("events/syscalls").is_dir())
        else {
            eprintln!("skipped: no readable tracefs (not root, or not mounted)");
            return;
        };
        let l = kernel_layout(
            root,
            ExitRule::Auto,
            true,
            PidNamespace::KERNEL,
            KernelBtf::load,
        )
        .expect("layout");
        assert!(l.exit_group_dead != FIELD_ABSENT || l.task_signal != FIELD_ABSENT);
        assert_eq!(l.pid_namespace, PidNamespace::KERNEL);
        // Inside a PID namespace the fork program also reads the child's pid there.
        let ns = PidNamespace {
            dev: 4,
            ino: 4026532000,
        };
        let l = kernel_layout(root, ExitRule::Auto, true, ns, KernelBtf::load).expect("layout");
        assert_eq!(l.pid_namespace, ns);
        assert_eq!(l.upid_size, 16);
        assert!(l.task_thread_pid != FIELD_ABSENT && l.pid_level < l.pid_numbers);
        let err = kernel_layout(root, ExitRule::GroupDead, true, ns, no_btf).map(|_| ());
        assert!(
            matches!(
                err,
                Err(LayoutError::NoPidNamespaceSource(_)) | Err(LayoutError::NoGroupDead)
            ),
            "{err:?}"
        );
    }
}
