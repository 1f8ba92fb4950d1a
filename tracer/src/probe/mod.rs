//! The kernel side from userspace: load the embedded eBPF object, attach its programs, manage
//! the traced-process filter, read the ring buffer and the loss counters.

pub mod btf;
pub mod layout;
mod misses;
pub mod tracefs;
pub mod uprobes;

use std::{collections::HashMap as StdHashMap, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, FEntry, FExit, PerfEvent, RawTracePoint, RawTracePointRunOptions, TestRun,
        TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
pub use tracer_common::layout::PidNamespace;
use tracer_common::{
    KnownStack, KnownStackKey, STAT_COUNT, Stat, Syscall, TARGET_FOLLOW_FORKS, TARGET_STOP_AT_EXEC,
    TARGETS_GEN_USER, WrapperSite,
};

pub use self::layout::ExitRule;
use self::{btf::KernelBtf, layout::LayoutError};
use crate::errors::Chain;

/// Which program reports page faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultBackend {
    /// No fault events.
    Off,
    /// `exceptions:page_fault_user`, where it exists; else the perf event.
    Auto,
    /// `exceptions:page_fault_user` only: as a BTF tracepoint (`tp_btf`, which reads the
    /// faulting instruction without a helper call) where the kernel loads it, else raw.
    Tracepoint,
    /// The tracepoint as a BTF tracepoint only (for tests: an error where it is refused).
    BtfTracepoint,
    /// The tracepoint attached raw only (for tests: the fallback of [`Self::Tracepoint`]).
    RawTracepoint,
    /// A BPF program on the software page-fault perf event of every CPU.
    PerfEvent,
}

/// Which programs report the memory syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallBackend {
    /// fentry/fexit where the kernel allows them, else the tracepoints.
    Auto,
    /// `syscalls:sys_{enter,exit}_*`: every kernel with CONFIG_FTRACE_SYSCALLS, but while one is
    /// enabled every syscall of every task on the machine takes the slow path.
    Tracepoint,
    /// fentry/fexit on the syscall functions (`__x64_sys_mmap`, ...): other syscalls pay
    /// nothing. Needs BTF and a kernel that lets BPF trampolines attach.
    Fentry,
}

/// Where a memory syscall's change is ordered (see `tracer-ebpf/src/commit.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOrder {
    /// [`Self::Lock`] where the kernel has the `mmap_lock` tracepoints without the memory
    /// cgroup path (6.14 and later), else [`Self::Entry`].
    Auto,
    /// At the call's first write acquisition of its process's `mmap_lock`.
    Lock,
    /// The calls that remove mappings (`munmap`, `shmdt`, `brk`) at their entry, the others
    /// at their exit.
    Entry,
    /// Every call at its exit.
    Exit,
}

/// Which `mmap_lock` tracepoint arguments the kernel has.
enum LockEvents {
    /// 6.14 and later: `(mm, write, success)`.
    Plain,
    /// 5.11 to 6.13: `(mm, memcg_path, write, success)`, the path built for every event.
    WithMemcgPath,
}

/// The kernel function of `call` (the architecture's syscall wrapper, which takes the
/// caller's `struct pt_regs`).
pub fn syscall_function(call: Syscall) -> String {
    #[cfg(target_arch = "x86_64")]
    const PREFIX: &str = "__x64_sys_";
    #[cfg(target_arch = "aarch64")]
    const PREFIX: &str = "__arm64_sys_";
    format!("{PREFIX}{}", call.name())
}

/// Rings of this size or more are drained by the reader's 50 ms timer only: at the highest
/// loss-free rate measured (about 500,000 records of 48 bytes a second) 50 ms is 1.2 MB, under
/// a third of this.
pub const TIMER_ONLY_RING_BYTES: u32 = 4 << 20;

/// How to load the probe.
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_bytes: u32,
    /// Wake the reader once this many bytes wait (rings under [`TIMER_ONLY_RING_BYTES`]).
    pub wakeup_bytes: u64,
    pub faults: FaultBackend,
    pub syscalls: SyscallBackend,
    pub order: ChangeOrder,
    pub exit_rule: ExitRule,
    /// User stacks (`--stacks`, `--fault-stacks`): what the kernel copies.
    pub stacks: StackOptions,
    /// The PID namespace whose pids the programs take and report: the daemon's own.
    pub pid_namespace: PidNamespace,
    /// The programs trace the processes of the cgroups in `CGROUPS` as they see them
    /// (`--cgroup`, see [`Probe::trace_cgroups`]).
    pub cgroup: bool,
}

/// What the eBPF programs capture of user stacks (see `tracer-ebpf/src/stacks.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackOptions {
    /// Every memory syscall gets a stack.
    pub syscalls: bool,
    /// One not-present fault in this many (per CPU) gets a stack; 0: none.
    pub fault_every: u32,
    /// Bytes of the top of the user stack copied with each stack.
    pub stack_bytes: u32,
    /// Stacks unwound before are recognised by the kernel, which sends their id instead
    /// (`KNOWN_STACKS`).
    pub known: bool,
}

impl StackOptions {
    /// Whether any stack is captured.
    pub fn any(&self) -> bool {
        self.syscalls || self.fault_every > 0
    }
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            ring_bytes: tracer_common::DEFAULT_RING_BYTES,
            wakeup_bytes: 64 * 1024,
            faults: FaultBackend::Auto,
            syscalls: SyscallBackend::Auto,
            order: ChangeOrder::Auto,
            exit_rule: ExitRule::Auto,
            stacks: StackOptions::default(),
            pid_namespace: PidNamespace::KERNEL,
            cgroup: false,
        }
    }
}

/// Errors loading or driving the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "permission denied loading eBPF programs: vmatrace needs root, or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH{} (try `sudo vmatrace ...`)",
        lacking(.0)
    )]
    Permission(Vec<&'static str>),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "this kernel does not let vmatrace attach fentry/fexit programs to {function} ({}); use --syscall-backend tracepoint",
        first_line(source)
    )]
    Fentry {
        function: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "this kernel has no tracepoint {0}; vmatrace needs syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"
    )]
    MissingTracepoint(String),
    #[error("the eBPF object has no program or map named {0}")]
    Missing(&'static str),
    #[error("ring buffer size {0} must be a power of two and at least 4096 bytes")]
    RingSize(u32),
    #[error(
        "this kernel refused vmatrace's eBPF programs (it needs Linux 5.8 or newer with BPF ring buffers)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("cannot attach {name}")]
    Attach {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "--change-order lock needs the mmap_lock tracepoints (Linux 5.11 or later); use --change-order entry"
    )]
    NoLockEvents(#[source] Box<ProbeError>),
    #[error("eBPF map {what}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The compiled eBPF object.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Loss and error counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub lost_syscall: u64,
    pub lost_fault: u64,
    pub lost_lifecycle: u64,
    pub pending_full: u64,
    pub exit_without_enter: u64,
    pub targets_full: u64,
    pub read_error: u64,
    /// Stacks the full ring refused (their events were kept).
    pub lost_stack: u64,
    /// Allocator events (`--heap`) the full ring refused.
    pub lost_heap: u64,
    /// `openat` records (a new descriptor's path) the full ring refused.
    pub lost_open: u64,
    /// Commits (a racing call's place in its process's order) the full ring refused.
    pub lost_commit: u64,
    /// Runs of the programs the kernel skipped (another BPF program was running on that
    /// CPU, see `probe/misses.rs`).
    pub missed: u64,
}

/// What [`Probe::flush_faults`] could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// CPUs whose batch the full ring refused: its faults were counted lost, and no
    /// watermark was written.
    pub refused: Vec<u32>,
    /// CPUs that could not run the flush at all; they are no longer flushed.
    pub gone: Vec<u32>,
}

/// A loaded and attached probe.
pub struct Probe {
    ebpf: Ebpf,
    targets: HashMap<MapData, u32, u32>,
    /// The launched command's stops at exec (pid -> the exec's time), see `launch`.
    exec_stops: HashMap<MapData, u32, u64>,
    /// A descriptor of the same map, duplicated for the command's guardian.
    exec_stops_fd: std::os::fd::OwnedFd,
    /// Bumped after each change of `targets`, so that no CPU keeps a cached filter answer.
    targets_gen: Array<MapData, u64>,
    user_gen: u64,
    /// The kernel's count of the programs' skipped runs, last read.
    misses: misses::Misses,
    stats: PerCpuArray<MapData, u64>,
    ring: Option<RingBuf<MapData>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    fault_backend: FaultBackend,
    syscall_backend: SyscallBackend,
    change_order: ChangeOrder,
    /// The traced syscalls this kernel has.
    syscalls: Vec<Syscall>,
    /// The CPUs whose faults come in batches, written by [`Probe::flush_faults`].
    batch_cpus: Vec<u32>,
    /// The CPUs whose allocator events come in batches (`--heap`), see `uprobes`.
    heap_cpus: Vec<u32>,
    /// Every attachment, by program name: detached all at once when the probe is dropped.
    links: Vec<(String, Box<dyn Send>)>,
    /// The kernel's BTF as aya parses it, once for the loader and every attachment by BTF id
    /// (`None` where the kernel has none). A parse reads all of `/sys/kernel/btf/vmlinux`
    /// (5-6 MB): it took most of the daemon's start-up CPU time when each attachment
    /// parsed it again.
    kernel_btf: Option<std::sync::Arc<aya::Btf>>,
}

/// The links are detached each from a thread of its own. Each detach of a syscall tracepoint
/// waits for RCU grace periods (about 70 ms on this 2-CPU host under load; a raw tracepoint's
/// well under 1 ms): one after the other the 37 links took a median 2.6 s to go, at once
/// 1.4 s (0.1-0.2 s when the machine is quiet), the waits partly overlapping.
impl Drop for Probe {
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links);
        std::thread::scope(|s| {
            for (_, link) in links {
                s.spawn(move || drop(link));
            }
        });
    }
}

/// The first line of an error's message (a verifier log follows it in aya's), without an
/// empty "Verifier output:".
fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default().trim_end();
    line.strip_suffix("Verifier output:")
        .map_or(line, |l| l.trim_end().trim_end_matches('.'))
        .to_string()
}

fn map_err(what: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { what, source }
}

/// Whether `e`, or an error it was caused by, is the kernel refusing for lack of privilege
/// (EPERM or EACCES from a `bpf` or `perf_event_open` call): decided by the `io::Error`'s kind
/// and errno along the `source` chain, never by the message's text.
fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::PermissionDenied
                || matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        })
    })
}

impl Probe {
    /// Loads the programs and attaches them. Nothing is traced until [`Probe::add_target`].
    pub fn load(opts: ProbeOptions) -> Result<Self, ProbeError> {
        if !opts.ring_bytes.is_power_of_two() || opts.ring_bytes < 4096 {
            return Err(ProbeError::RingSize(opts.ring_bytes));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let missing = missing_caps(&[(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]);
            if !missing.is_empty() {
                return Err(ProbeError::Permission(missing));
            }
        }
        raise_memlock();
        // Wake the reader before a small ring can fill; a large one is drained by the
        // reader's timer alone, which spares every record the query of the ring's fill.
        // With stacks (up to 17 KiB a record) the reader is woken after 1 MiB whatever the
        // ring's size: a ring drained every 50 ms would drop most of a busy process's stacks.
        let wakeup_bytes = if opts.stacks.any() {
            opts.wakeup_bytes
                .max(1 << 20)
                .min(u64::from(opts.ring_bytes) / 4)
        } else if opts.ring_bytes >= TIMER_ONLY_RING_BYTES {
            0
        } else {
            opts.wakeup_bytes.min(u64::from(opts.ring_bytes) / 4)
        };
        let root = tracefs::ensure_mounted()?;
        let syscalls = match layout::available_syscalls(root) {
            Ok(calls) => calls,
            // Without syscall tracepoints, fentry may still find every function.
            Err(_) if opts.syscalls == SyscallBackend::Fentry => Syscall::ALL.to_vec(),
            Err(e) => return Err(e.into()),
        };
        for call in Syscall::ALL.iter().filter(|c| !syscalls.contains(c)) {
            log::info!("this kernel has no {} syscall: not traced", call.name());
        }
        let mut kernel_layout = layout::kernel_layout(
            root,
            opts.exit_rule,
            opts.syscalls != SyscallBackend::Fentry,
            opts.pid_namespace,
            KernelBtf::load,
        )?;
        if opts.order != ChangeOrder::Exit {
            layout::thread_count(&mut kernel_layout, KernelBtf::load);
        }
        let stack_bytes = if opts.stacks.any() {
            opts.stacks
                .stack_bytes
                .min(tracer_common::STACK_COPY_MAX as u32)
        } else {
            0
        };
        let syscall_stacks = u32::from(opts.stacks.syscalls);
        // Python frames need the thread's TLS base (x86_64 only, from BTF).
        let tls_base = if opts.stacks.any() {
            layout::task_tls_base(KernelBtf::load)
        } else {
            tracer_common::layout::FIELD_ABSENT
        };
        let kernel_btf = aya::Btf::from_sys_fs().ok().map(std::sync::Arc::new);
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf.as_deref())
            .map_max_entries("EVENTS", opts.ring_bytes)
            // Its entries are 440 bytes each, all allocated at load: none without stacks.
            .map_max_entries(
                "KNOWN_STACKS",
                if opts.stacks.any() && opts.stacks.known {
                    tracer_common::KNOWN_STACKS_MAX
                } else {
                    1
                },
            )
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("STACK_BYTES", &stack_bytes, true)
            .override_global("SYSCALL_STACKS", &syscall_stacks, true)
            .override_global("TASK_TLS_BASE", &tls_base, true)
            .override_global("FAULT_STACK_EVERY", &opts.stacks.fault_every, true)
            .override_global("CGROUP_MODE", &u32::from(opts.cgroup), true)
            .override_global("DAEMON_TGID", &std::process::id(), true)
            .load(EBPF_OBJECT)
            .map_err(|e| {
                if is_permission(&e) {
                    ProbeError::Permission(Vec::new())
                } else {
                    ProbeError::Load(e)
                }
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logger unavailable: {e}");
                None
            }
        };
        let stops = ebpf
            .take_map("EXEC_STOPS")
            .ok_or(ProbeError::Missing("EXEC_STOPS"))?;
        let mut probe = Self {
            targets: HashMap::try_from(
                ebpf.take_map("TARGETS")
                    .ok_or(ProbeError::Missing("TARGETS"))?,
            )
            .map_err(map_err("TARGETS"))?,
            exec_stops_fd: match &stops {
                aya::maps::Map::HashMap(d) => {
                    use std::os::fd::AsFd as _;
                    d.fd()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| ProbeError::Map {
                            what: "EXEC_STOPS",
                            source: aya::maps::MapError::IoError(e),
                        })?
                }
                _ => return Err(ProbeError::Missing("EXEC_STOPS")),
            },
            exec_stops: HashMap::try_from(stops).map_err(map_err("EXEC_STOPS"))?,
            targets_gen: Array::try_from(
                ebpf.take_map("TARGETS_GEN")
                    .ok_or(ProbeError::Missing("TARGETS_GEN"))?,
            )
            .map_err(map_err("TARGETS_GEN"))?,
            user_gen: 0,
            misses: misses::Misses::default(),
            stats: PerCpuArray::try_from(
                ebpf.take_map("STATS").ok_or(ProbeError::Missing("STATS"))?,
            )
            .map_err(map_err("STATS"))?,
            ring: Some(
                RingBuf::try_from(
                    ebpf.take_map("EVENTS")
                        .ok_or(ProbeError::Missing("EVENTS"))?,
                )
                .map_err(map_err("EVENTS"))?,
            ),
            ebpf,
            logger,
            fault_backend: FaultBackend::Off,
            syscall_backend: opts.syscalls,
            change_order: opts.order,
            syscalls,
            batch_cpus: Vec::new(),
            heap_cpus: Vec::new(),
            links: Vec::new(),
            kernel_btf,
        };
        probe.syscall_backend = match opts.syscalls {
            SyscallBackend::Fentry => {
                probe.attach_syscall_fentry()?;
                SyscallBackend::Fentry
            }
            SyscallBackend::Tracepoint => {
                probe.attach_syscall_tracepoints()?;
                SyscallBackend::Tracepoint
            }
            SyscallBackend::Auto => match probe.attach_syscall_fentry() {
                Ok(()) => SyscallBackend::Fentry,
                Err(e) => {
                    log::info!(
                        "{}: the syscall tracepoints report the syscalls instead",
                        Chain(&e)
                    );
                    probe.detach_syscall_fentry();
                    probe.attach_syscall_tracepoints()?;
                    SyscallBackend::Tracepoint
                }
            },
        };
        probe.change_order = match opts.order {
            ChangeOrder::Exit => ChangeOrder::Exit,
            ChangeOrder::Entry => {
                probe.commit_at_enter()?;
                ChangeOrder::Entry
            }
            ChangeOrder::Lock => {
                probe
                    .attach_lock_commit()
                    .map_err(|e| ProbeError::NoLockEvents(Box::new(e)))?;
                ChangeOrder::Lock
            }
            ChangeOrder::Auto => match probe.attach_lock_commit() {
                Ok(LockEvents::Plain) => ChangeOrder::Lock,
                Ok(LockEvents::WithMemcgPath) => {
                    // Before 6.14 the kernel builds the memory cgroup's path for every
                    // mmap_lock event of the machine while a program is attached: not a
                    // cost to impose on every process unasked.
                    log::info!(
                        "this kernel builds a cgroup path at every mmap_lock event while a program is attached: calls that unmap are ordered at their entry instead (--change-order lock orders every call, at that cost)"
                    );
                    probe.detach_program("mmap_lock_memcg");
                    probe.commit_at_enter()?;
                    ChangeOrder::Entry
                }
                Err(e) => {
                    log::info!(
                        "{}: calls that unmap are ordered at their entry instead",
                        Chain(&e)
                    );
                    probe.commit_at_enter()?;
                    ChangeOrder::Entry
                }
            },
        };
        if opts.pid_namespace.is_kernel() {
            probe.attach_tracepoint("task", "task_newtask")?;
        } else {
            probe.attach_raw_tracepoint("task_newtask_raw", "task_newtask")?;
        }
        probe.attach_tracepoint("sched", "sched_process_exec")?;
        probe.attach_tracepoint("sched", "sched_process_exit")?;
        let has_tp = tracefs::has_tracepoint(root, "exceptions", "page_fault_user");
        probe.fault_backend = match opts.faults {
            FaultBackend::Off => FaultBackend::Off,
            FaultBackend::Auto if has_tp => FaultBackend::Tracepoint,
            FaultBackend::Auto => FaultBackend::PerfEvent,
            FaultBackend::Tracepoint
            | FaultBackend::BtfTracepoint
            | FaultBackend::RawTracepoint
                if !has_tp =>
            {
                return Err(ProbeError::MissingTracepoint(
                    "exceptions:page_fault_user".into(),
                ));
            }
            other => other,
        };
        match probe.fault_backend {
            FaultBackend::Tracepoint
            | FaultBackend::BtfTracepoint
            | FaultBackend::RawTracepoint => {
                // Run by `flush_faults` on each CPU; loaded before the fault programs start
                // filling the batches.
                let what = "the fault batches' flush program";
                let attach_err = |source| ProbeError::Attach {
                    name: what.into(),
                    source,
                };
                let flush: &mut RawTracePoint = probe.program("fault_flush", what)?;
                flush.load().map_err(attach_err)?;
                probe.batch_cpus = online_cpus()
                    .map_err(|(_, e)| attach_err(aya::programs::ProgramError::IOError(e)))?;
                // Faults the kernel takes on user memory for the process allocate pages too.
                let mut tracepoints = vec!["page_fault_user"];
                if tracefs::has_tracepoint(root, "exceptions", "page_fault_kernel") {
                    tracepoints.push("page_fault_kernel");
                }
                probe.attach_fault_tracepoints(probe.fault_backend, &tracepoints)?;
                probe.fault_backend = FaultBackend::Tracepoint;
            }
            FaultBackend::PerfEvent => probe.attach_fault_perf_event()?,
            FaultBackend::Off | FaultBackend::Auto => {}
        }
        Ok(probe)
    }

    /// The program `name` as type `P`; `what` names it in errors.
    fn program<P>(&mut self, name: &str, what: &str) -> Result<&mut P, ProbeError>
    where
        for<'a> &'a mut P:
            TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| ProbeError::MissingTracepoint(format!("program {name}")))?
            .try_into()
            .map_err(|source| ProbeError::Attach {
                name: what.to_string(),
                source,
            })
    }

    /// The `sys_{enter,exit}_*` programs on the syscall tracepoints. Exits before enters: an
    /// entry saved after this point always meets its exit program.
    fn attach_syscall_tracepoints(&mut self) -> Result<(), ProbeError> {
        for call in self.syscalls.clone() {
            self.attach_tracepoint("syscalls", &format!("sys_exit_{}", call.name()))?;
        }
        for call in self.syscalls.clone() {
            self.attach_tracepoint("syscalls", &format!("sys_enter_{}", call.name()))?;
        }
        Ok(())
    }

    /// The `fentry_*`/`fexit_*` programs on the syscall functions, exits first as above.
    fn attach_syscall_fentry(&mut self) -> Result<(), ProbeError> {
        let btf = self.kernel_btf().map_err(|e| ProbeError::Fentry {
            function: "any kernel function".into(),
            source: aya::programs::ProgramError::Btf(e),
        })?;
        for call in self.syscalls.clone() {
            let function = syscall_function(call);
            let err = |source| ProbeError::Fentry {
                function: function.clone(),
                source,
            };
            let name = format!("fexit_{}", call.name());
            let program: &mut FExit = self.program(&name, &name)?;
            program.load(&function, &btf).map_err(err)?;
            let id = program.attach().map_err(err)?;
            let link = program.take_link(id).map_err(err)?;
            self.links.push((name, Box::new(link)));
        }
        for call in self.syscalls.clone() {
            let function = syscall_function(call);
            let err = |source| ProbeError::Fentry {
                function: function.clone(),
                source,
            };
            let name = format!("fentry_{}", call.name());
            let program: &mut FEntry = self.program(&name, &name)?;
            program.load(&function, &btf).map_err(err)?;
            let id = program.attach().map_err(err)?;
            let link = program.take_link(id).map_err(err)?;
            self.links.push((name, Box::new(link)));
        }
        Ok(())
    }

    /// The kernel's BTF parsed at load, or why there is none (read again for its error).
    fn kernel_btf(&self) -> Result<std::sync::Arc<aya::Btf>, aya::BtfError> {
        match &self.kernel_btf {
            Some(btf) => Ok(btf.clone()),
            None => aya::Btf::from_sys_fs().map(std::sync::Arc::new),
        }
    }

    /// Detaches and unloads whatever [`Probe::attach_syscall_fentry`] got to load.
    fn detach_syscall_fentry(&mut self) {
        self.links
            .retain(|(name, _)| !name.starts_with("fentry_") && !name.starts_with("fexit_"));
        for call in Syscall::ALL {
            if let Ok(p) = self.program::<FEntry>(&format!("fentry_{}", call.name()), "") {
                let _ = p.unload();
            }
            if let Ok(p) = self.program::<FExit>(&format!("fexit_{}", call.name()), "") {
                let _ = p.unload();
            }
        }
    }

    fn attach_tracepoint(&mut self, category: &str, name: &str) -> Result<(), ProbeError> {
        let what = format!("{category}:{name}");
        let attach_err = |source| ProbeError::Attach {
            name: what.clone(),
            source,
        };
        let program: &mut TracePoint = self.program(name, &what)?;
        program.load().map_err(attach_err)?;
        let id = program.attach(category, name).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        self.links.push((name.to_string(), Box::new(link)));
        Ok(())
    }

    /// Attaches the program `name` to the raw tracepoint `tracepoint`.
    fn attach_raw_tracepoint(&mut self, name: &str, tracepoint: &str) -> Result<(), ProbeError> {
        let what = format!("raw tracepoint {tracepoint}");
        let attach_err = |source| ProbeError::Attach {
            name: what.clone(),
            source,
        };
        let program: &mut RawTracePoint = self.program(name, &what)?;
        program.load().map_err(attach_err)?;
        let id = program.attach(tracepoint).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        self.links.push((name.to_string(), Box::new(link)));
        Ok(())
    }

    /// The commit program on `mmap_lock:mmap_lock_acquire_returned`: the variant for the
    /// arguments of kernels before 6.14 (with `memcg_path`), else, where the kernel refuses it
    /// (it reads past the arguments), the one for later kernels.
    fn attach_lock_commit(&mut self) -> Result<LockEvents, ProbeError> {
        const TRACEPOINT: &str = "mmap_lock_acquire_returned";
        match self.attach_raw_tracepoint("mmap_lock_memcg", TRACEPOINT) {
            Ok(()) => Ok(LockEvents::WithMemcgPath),
            Err(e) => {
                log::debug!("{}: trying the arguments of Linux 6.14", Chain(&e));
                self.detach_program("mmap_lock_memcg");
                self.attach_raw_tracepoint("mmap_lock", TRACEPOINT)?;
                Ok(LockEvents::Plain)
            }
        }
    }

    /// Detaches and unloads the raw tracepoint program `name`.
    fn detach_program(&mut self, name: &str) {
        self.links.retain(|(n, _)| n != name);
        if let Ok(p) = self.program::<RawTracePoint>(name, "") {
            let _ = p.unload();
        }
    }

    /// Has `munmap`, `shmdt` and `brk` committed at their entry.
    fn commit_at_enter(&mut self) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut("COMMIT_AT_ENTER")
            .ok_or(ProbeError::Missing("COMMIT_AT_ENTER"))?;
        let mut flag: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(map_err("COMMIT_AT_ENTER"))?;
        flag.set(0, 1, 0).map_err(map_err("COMMIT_AT_ENTER"))
    }

    /// The fault programs on the page-fault `tracepoints`: the BTF ones unless `backend` is
    /// [`FaultBackend::RawTracepoint`], the raw ones where those are refused (unless
    /// `backend` is [`FaultBackend::BtfTracepoint`]).
    fn attach_fault_tracepoints(
        &mut self,
        backend: FaultBackend,
        tracepoints: &[&str],
    ) -> Result<(), ProbeError> {
        if backend != FaultBackend::RawTracepoint {
            match self.attach_fault_btf(tracepoints) {
                Ok(()) => {
                    log::info!("page faults: BTF tracepoints");
                    return Ok(());
                }
                Err(e) if backend == FaultBackend::BtfTracepoint => return Err(e),
                Err(e) => {
                    log::info!(
                        "{}: the raw page-fault tracepoints report the faults instead",
                        Chain(&e)
                    );
                    self.detach_fault_btf(tracepoints);
                }
            }
        }
        for tracepoint in tracepoints {
            self.attach_raw_tracepoint(tracepoint, tracepoint)?;
        }
        log::info!("page faults: raw tracepoints");
        Ok(())
    }

    /// The `*_btf` fault programs on `tracepoints` (`tp_btf`, attached by BTF id).
    fn attach_fault_btf(&mut self, tracepoints: &[&str]) -> Result<(), ProbeError> {
        let btf = self.kernel_btf().map_err(|e| ProbeError::Attach {
            name: "BTF tracepoints".into(),
            source: aya::programs::ProgramError::Btf(e),
        })?;
        for tracepoint in tracepoints {
            let what = format!("BTF tracepoint {tracepoint}");
            let attach_err = |source| ProbeError::Attach {
                name: what.clone(),
                source,
            };
            let name = format!("{tracepoint}_btf");
            let program: &mut BtfTracePoint = self.program(&name, &what)?;
            program.load(tracepoint, &btf).map_err(attach_err)?;
            let id = program.attach().map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            self.links.push((name, Box::new(link)));
        }
        Ok(())
    }

    /// Detaches and unloads whatever [`Probe::attach_fault_btf`] got to load.
    fn detach_fault_btf(&mut self, tracepoints: &[&str]) {
        let names: Vec<String> = tracepoints.iter().map(|t| format!("{t}_btf")).collect();
        self.links.retain(|(name, _)| !names.contains(name));
        for name in &names {
            if let Ok(p) = self.program::<BtfTracePoint>(name, "") {
                let _ = p.unload();
            }
        }
    }

    /// The fault program on the software page-fault perf event of every online CPU.
    fn attach_fault_perf_event(&mut self) -> Result<(), ProbeError> {
        let attach_err = |source| ProbeError::Attach {
            name: "perf software event page-faults".into(),
            source,
        };
        let program: &mut PerfEvent = self
            .ebpf
            .program_mut("page_fault_perf")
            .ok_or(ProbeError::Missing("page_fault_perf"))?
            .try_into()
            .map_err(attach_err)?;
        program.load().map_err(attach_err)?;
        let cpus =
            online_cpus().map_err(|(_, e)| attach_err(aya::programs::ProgramError::IOError(e)))?;
        for cpu in cpus {
            let id = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::PageFaults),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(1),
                    false,
                )
                .map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            self.links
                .push(("page_fault_perf".to_string(), Box::new(link)));
        }
        Ok(())
    }

    /// The CPUs whose faults come in batches with watermarks (see [`crate::order`]); empty
    /// when faults come one by one.
    pub fn batch_cpus(&self) -> &[u32] {
        &self.batch_cpus
    }

    /// Has every CPU in [`Probe::batch_cpus`] write its fault batch to the ring now, with a
    /// watermark. CPUs that could not run the flush (taken offline, say) are dropped from
    /// the list.
    pub fn flush_faults(&mut self) -> FlushOutcome {
        let mut outcome = FlushOutcome::default();
        let Some(Ok(flush)) = self
            .ebpf
            .program("fault_flush")
            .map(<&RawTracePoint>::try_from)
        else {
            outcome.gone = std::mem::take(&mut self.batch_cpus);
            return outcome;
        };
        for &cpu in &self.batch_cpus {
            let opts = RawTracePointRunOptions {
                cpu: Some(cpu),
                ..RawTracePointRunOptions::new()
            };
            match flush.test_run(opts) {
                Ok(r) if r.return_value == 0 => {}
                Ok(_) => outcome.refused.push(cpu),
                Err(e) => {
                    log::warn!("cannot collect the page faults of CPU {cpu}: {e}");
                    outcome.gone.push(cpu);
                }
            }
        }
        self.batch_cpus.retain(|c| !outcome.gone.contains(c));
        outcome
    }

    /// Bytes of the ring not yet read, from the kernel (its `ring_fill` program, loaded on
    /// first use); None if it cannot run.
    pub fn ring_fill(&mut self) -> Option<u64> {
        let program: &mut RawTracePoint = self.ebpf.program_mut("ring_fill")?.try_into().ok()?;
        if program.fd().is_err() {
            program.load().ok()?;
        }
        program.test_run(RawTracePointRunOptions::new()).ok()?;
        let map: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.ebpf.map("RING_FILL")?).ok()?;
        map.get(&0, 0).ok()
    }

    /// The fault backend in use.
    pub fn fault_backend(&self) -> FaultBackend {
        self.fault_backend
    }

    /// The syscall backend in use.
    pub fn syscall_backend(&self) -> SyscallBackend {
        self.syscall_backend
    }

    /// Where syscalls' changes are ordered.
    pub fn change_order(&self) -> ChangeOrder {
        self.change_order
    }

    /// Starts tracing thread group `pid`; with `follow`, its future children too.
    pub fn add_target(
        &mut self,
        pid: u32,
        follow: bool,
        stop_at_exec: bool,
    ) -> Result<(), ProbeError> {
        let mut flags = 0;
        if follow {
            flags |= TARGET_FOLLOW_FORKS;
        }
        if stop_at_exec {
            flags |= TARGET_STOP_AT_EXEC;
        }
        self.targets
            .insert(pid, flags, 0)
            .map_err(map_err("TARGETS insert"))?;
        self.targets_changed()
    }

    /// Has the programs trace every process of the cgroups `ids` (cgroup v2 ids) they see.
    pub fn trace_cgroups(&mut self, ids: &[u64]) -> Result<(), ProbeError> {
        let mut map: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("CGROUPS")
                .ok_or(ProbeError::Missing("CGROUPS"))?,
        )
        .map_err(map_err("CGROUPS"))?;
        for id in ids {
            map.insert(id, 1, 0).map_err(map_err("CGROUPS insert"))?;
        }
        Ok(())
    }

    /// Has the allocator entry programs write the stack words of `pid`'s calls that return
    /// to `addr` (`on`), or no longer.
    pub fn set_wrapper_site(&mut self, pid: u32, addr: u64, on: bool) -> Result<(), ProbeError> {
        let mut map: aya::maps::HashMap<_, WrapperSite, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("HEAP_WRAPPER_SITES")
                .ok_or(ProbeError::Missing("HEAP_WRAPPER_SITES"))?,
        )
        .map_err(map_err("HEAP_WRAPPER_SITES"))?;
        let key = WrapperSite {
            tgid: pid,
            _pad: 0,
            addr,
        };
        if on {
            map.insert(key, 1, 0)
                .map_err(map_err("HEAP_WRAPPER_SITES insert"))
        } else {
            map.remove(&key)
                .map_err(map_err("HEAP_WRAPPER_SITES remove"))
        }
    }

    /// Has the stack programs walk the Python frames of each process given `Some` interpreter,
    /// and no longer of those given `None`. A failure costs those frames only: logged.
    pub fn set_python_procs(&mut self, changes: Vec<(u32, Option<tracer_common::PyProc>)>) {
        for (pid, e) in self.update_map("PY_PROCS", changes) {
            log::warn!("cannot tell the programs of the interpreter of {pid}: {e}");
        }
    }

    /// Hands the programs stacks to recognise (`Some`) or takes them back (`None`):
    /// `KNOWN_STACKS` (see `stacks::known`). A failure costs only that stack's copy.
    pub fn set_known_stacks(&mut self, changes: Vec<(KnownStackKey, Option<KnownStack>)>) {
        for (key, e) in self.update_map("KNOWN_STACKS", changes) {
            log::debug!("KNOWN_STACKS of {}: {e}", key.tgid);
        }
    }

    /// Inserts (`Some`) or removes (`None`) entries of the hash map `name` (a key already gone
    /// is no error); the keys that failed, with why.
    fn update_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        changes: Vec<(K, Option<V>)>,
    ) -> Vec<(K, aya::maps::MapError)> {
        if changes.is_empty() {
            return Vec::new();
        }
        let Some(map) = self.ebpf.map_mut(name) else {
            log::warn!("no {name} map");
            return Vec::new();
        };
        let mut map: aya::maps::HashMap<_, K, V> = match aya::maps::HashMap::try_from(map) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("{name}: {e}");
                return Vec::new();
            }
        };
        changes
            .into_iter()
            .filter_map(|(key, value)| {
                let done = match value {
                    Some(v) => map.insert(key, v, 0),
                    None => map.remove(&key).or(Ok(())),
                };
                done.err().map(|e| (key, e))
            })
            .collect()
    }

    /// Stops tracing `pid` (an attach that failed halfway).
    pub fn remove_target(&mut self, pid: u32) -> Result<(), ProbeError> {
        // Gone already if the process exited meanwhile: not an error.
        let _ = self.targets.remove(&pid);
        self.targets_changed()
    }

    /// The launched command's stops at exec not yet continued: (pid, the exec's time).
    pub fn exec_stops(&self) -> Vec<(u32, u64)> {
        self.exec_stops.iter().filter_map(Result::ok).collect()
    }

    /// Forgets the stop of `pid` (continued, or gone). Returns whether there was one.
    pub fn clear_exec_stop(&mut self, pid: u32) -> bool {
        self.exec_stops.remove(&pid).is_ok()
    }

    /// A descriptor of the stops map, for the launched command's guardian.
    pub fn exec_stops_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.exec_stops_fd.try_clone()
    }

    /// Invalidates the eBPF side's cached filter answers (after a change of `TARGETS`).
    fn targets_changed(&mut self) -> Result<(), ProbeError> {
        self.user_gen += 1;
        self.targets_gen
            .set(TARGETS_GEN_USER, self.user_gen, 0)
            .map_err(map_err("TARGETS_GEN update"))
    }

    /// Stops tracing every process (the programs stay attached until the probe is dropped), so
    /// that a final drain of the ring buffer ends.
    pub fn clear_targets(&mut self) -> Result<(), ProbeError> {
        let keys: Vec<u32> = self.targets.keys().filter_map(Result::ok).collect();
        for k in keys {
            // A key may vanish concurrently (its process exited): not an error.
            let _ = self.targets.remove(&k);
        }
        self.targets_changed()
    }

    /// Takes the ring buffer, for the reader task.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Writes eBPF-side log records (aya-log) to the userspace logger.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// The counters summed over CPUs. The kernel's count of skipped runs is read again at
    /// most once a second unless `fresh`.
    pub fn stats(&self, fresh: bool) -> Result<KernelStats, ProbeError> {
        let mut sums = StdHashMap::new();
        for stat in Stat::ALL {
            let values = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(map_err("STATS read"))?;
            sums.insert(stat as u32, values.iter().sum::<u64>());
        }
        let get = |s: Stat| sums.get(&(s as u32)).copied().unwrap_or(0);
        debug_assert_eq!(sums.len() as u32, STAT_COUNT);
        Ok(KernelStats {
            lost_syscall: get(Stat::LostSyscall),
            lost_fault: get(Stat::LostFault),
            lost_lifecycle: get(Stat::LostLifecycle),
            pending_full: get(Stat::PendingFull),
            exit_without_enter: get(Stat::ExitWithoutEnter),
            targets_full: get(Stat::TargetsFull),
            read_error: get(Stat::ReadError),
            lost_heap: get(Stat::LostHeap),
            lost_stack: get(Stat::LostStack),
            lost_open: get(Stat::LostOpen),
            lost_commit: get(Stat::LostCommit),
            missed: self.misses.read(&self.ebpf, fresh),
        })
    }
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "cannot raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// Capability numbers (`linux/capability.h`).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The names of `caps` (number, name) missing from this process's effective set (all of them
/// when it cannot be read).
pub fn missing_caps(caps: &[(u32, &'static str)]) -> Vec<&'static str> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    caps.iter()
        .filter(|(n, _)| effective & (1u64 << n) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// "; this process lacks X and Y" for the permission error, or nothing.
fn lacking(missing: &[&str]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!("; this process lacks {}", missing.join(" and "))
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::is_permission;

    fn map_create_failed(errno: i32) -> aya::EbpfError {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "EVENTS".into(),
            io_error: io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn a_refusal_for_privilege_is_found_by_its_errno_along_the_source_chain() {
        assert!(is_permission(&map_create_failed(libc::EPERM)));
        assert!(is_permission(&map_create_failed(libc::EACCES)));
        assert!(!is_permission(&map_create_failed(libc::ENOMEM)));
        assert!(!is_permission(&map_create_failed(libc::EINVAL)));
        // A message that only says so is not a refusal.
        let text = io::Error::other("Operation not permitted (os error 1)");
        assert!(!is_permission(&text));
        assert!(is_permission(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
    }
}
