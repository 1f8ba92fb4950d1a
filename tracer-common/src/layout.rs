//! Where the eBPF programs read the kernel's data. Tracepoint records differ between kernels
//! (`sched_process_exit` has `group_dead` on recent kernels such as 6.18 and 7.2, not on
//! 5.10, 6.1 or 6.12), so the daemon reads each field's offset from the running kernel's
//! `format` files at load time and hands them to the programs as the read-only global
//! [`KernelLayout`]. A field that is missing is [`FIELD_ABSENT`], and the programs use
//! another source (for `group_dead`: the thread group's count of live threads, reached
//! through two `struct` offsets found in the kernel's BTF).
//!
//! Only the syscall records are read at fixed offsets (direct context loads, which the
//! verifier allows only at constant offsets); their layout has not changed since Linux 3.x,
//! and the daemon checks it.

/// One field of a tracepoint record that the programs read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointField {
    /// The tracepoint's category (`sched`), its directory under `events/`.
    pub category: &'static str,
    /// The tracepoint's name (`sched_process_exit`).
    pub event: &'static str,
    /// The field's name in `format`.
    pub field: &'static str,
    /// Size in bytes the programs read.
    pub size: usize,
}

/// Where the six 8-byte argument slots of every `syscalls:sys_enter_*` record start (the
/// first slot's name is the syscall's own first argument).
pub const SYS_ENTER_ARGS_OFFSET: usize = 16;
/// Where the 8-byte `ret` sits in every `syscalls:sys_exit_*` record.
pub const SYS_EXIT_RET_OFFSET: usize = 16;

/// `task:task_newtask` `pid`: the new task.
pub const NEWTASK_PID: TracepointField = field("task", "task_newtask", "pid", 4);
/// `task:task_newtask` `clone_flags`.
pub const NEWTASK_CLONE_FLAGS: TracepointField = field("task", "task_newtask", "clone_flags", 8);
/// `sched:sched_process_exec` `filename` (a `__data_loc`).
pub const EXEC_FILENAME: TracepointField = field("sched", "sched_process_exec", "filename", 4);
/// `sched:sched_process_exec` `old_pid`: the thread that called exec.
pub const EXEC_OLD_PID: TracepointField = field("sched", "sched_process_exec", "old_pid", 4);
/// `sched:sched_process_exit` `group_dead`: the last thread of the process is exiting. Only
/// on recent kernels; see [`KernelLayout::exit_group_dead`].
pub const EXIT_GROUP_DEAD: TracepointField = field("sched", "sched_process_exit", "group_dead", 1);

/// Marks a field of [`KernelLayout`] that this kernel does not have.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// The offsets the lifecycle programs read on the running kernel, set by the daemon before
/// the programs are loaded (the global `LAYOUT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// [`NEWTASK_PID`].
    pub newtask_pid: u32,
    /// [`NEWTASK_CLONE_FLAGS`].
    pub newtask_clone_flags: u32,
    /// [`EXEC_FILENAME`].
    pub exec_filename: u32,
    /// [`EXEC_OLD_PID`].
    pub exec_old_pid: u32,
    /// [`EXIT_GROUP_DEAD`], or [`FIELD_ABSENT`]: then the exit program reads the process's
    /// count of live threads, `current->signal->live`, which `do_exit` has already
    /// decremented when the tracepoint fires (so 0 means the whole process is gone).
    pub exit_group_dead: u32,
    /// Offset of `signal` in `struct task_struct` (from BTF), or [`FIELD_ABSENT`].
    pub task_signal: u32,
    /// Offset of `live` in `struct signal_struct` (from BTF), or [`FIELD_ABSENT`].
    pub signal_live: u32,
    /// Offset of `thread_pid` in `struct task_struct` (from BTF), or [`FIELD_ABSENT`]: read,
    /// with the three below, only inside a PID namespace (see [`PidNamespace`]).
    pub task_thread_pid: u32,
    /// Offset of `level` in `struct pid`.
    pub pid_level: u32,
    /// Offset of `numbers` (the pid in each namespace level) in `struct pid`.
    pub pid_numbers: u32,
    /// Size of `struct upid`, one element of `numbers` (`nr` is its first member).
    pub upid_size: u32,
    pub _pad: u32,
    /// The PID namespace whose pids the programs report, or none (`ino` 0): the kernel's own.
    pub pid_namespace: PidNamespace,
}

/// A PID namespace, named as `bpf_get_ns_current_pid_tgid` wants it: the device and inode
/// of `/proc/self/ns/pid`. Inside a container, vmatrace is given, reads in `/proc` and prints
/// that namespace's pids, so the programs report those: a task of another namespace (the
/// host's, or one nested deeper) is not traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidNamespace {
    pub dev: u64,
    pub ino: u64,
}

impl PidNamespace {
    /// The kernel's own namespace: the programs use the kernel's pids.
    pub const KERNEL: Self = Self { dev: 0, ino: 0 };

    /// Whether this is the kernel's own namespace (nothing to translate).
    pub const fn is_kernel(&self) -> bool {
        self.ino == 0
    }
}

impl KernelLayout {
    /// Nothing known: what the programs hold until the daemon sets the global.
    pub const UNSET: Self = Self {
        newtask_pid: FIELD_ABSENT,
        newtask_clone_flags: FIELD_ABSENT,
        exec_filename: FIELD_ABSENT,
        exec_old_pid: FIELD_ABSENT,
        exit_group_dead: FIELD_ABSENT,
        task_signal: FIELD_ABSENT,
        signal_live: FIELD_ABSENT,
        task_thread_pid: FIELD_ABSENT,
        pid_level: FIELD_ABSENT,
        pid_numbers: FIELD_ABSENT,
        upid_size: FIELD_ABSENT,
        _pad: 0,
        pid_namespace: PidNamespace::KERNEL,
    };
}

const _: () = assert!(core::mem::size_of::<KernelLayout>() == 64);
const _: () = assert!(core::mem::offset_of!(KernelLayout, pid_namespace) == 48);

const fn field(
    category: &'static str,
    event: &'static str,
    name: &'static str,
    size: usize,
) -> TracepointField {
    TracepointField {
        category,
        event,
        field: name,
        size,
    }
}
