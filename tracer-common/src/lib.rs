//! The event ABI shared by the vmatrace eBPF programs (`tracer-ebpf`) and the daemon (`tracer`).
//!
//! Every record in the ring buffer starts with an [`EventHeader`]; its `kind` field says which
//! `#[repr(C)]` payload type the whole record is. All types are `Copy`, have explicit padding and
//! a compile-time size assert, so both sides agree byte for byte. Userspace decodes kinds with
//! `TryFrom<u32>` and checks lengths before it reads a record (see `tracer::event`).
#![no_std]

pub mod layout;

/// Which payload a ring-buffer record carries.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A memory syscall, paired enter and exit: [`SyscallEvent`].
    Syscall = 1,
    /// A user page fault: [`FaultEvent`].
    Fault = 2,
    /// A new process (not a thread) was created by a traced one: [`ForkEvent`].
    Fork = 3,
    /// A traced process called `execve`: [`ExecEvent`].
    Exec = 4,
    /// The last thread of a traced process exited: [`ExitEvent`].
    Exit = 5,
    /// A traced process opened a file (`openat`), so that later `mmap`s of the fd can be
    /// named even after the fd is closed: [`OpenEvent`].
    Open = 6,
    /// Faults gathered on one CPU and written as one record: [`FaultBatch`].
    FaultBatch = 7,
    /// The user stack of the thread at a syscall or fault: [`StackHead`], then the
    /// frame-pointer walk and the copied top of the stack. It precedes (in the ring) the
    /// record it belongs to, which userspace finds by thread and time.
    Stack = 8,
    /// An allocator call's entry or return (`--heap`): [`HeapEvent`].
    Heap = 9,
    /// Allocator events gathered on one CPU and written as one record: [`HeapBatch`].
    HeapBatch = 10,
    /// A process of the traced cgroup (`--cgroup`) not traced yet was seen: the programs now
    /// trace it (and follow its children); the daemon seeds it. [`JoinEvent`].
    Join = 11,
    /// A traced thread's memory syscall took the process's `mmap_lock` for writing (or, on
    /// kernels without the lock's tracepoints, entered a call that removes mappings): its
    /// change is ordered at this point, [`EventHeader::ts_ns`], which its
    /// [`SyscallEvent::commit_ts_ns`] repeats. Userspace holds back what follows until that
    /// syscall's record arrives. Header only: [`CommitEvent`].
    Commit = 12,
    /// Registers and stack words at an allocator entry returning into a wrapper: [`HeapStack`].
    HeapStack = 13,
    /// The Python frames of the thread at a syscall or fault, when it runs a CPython the
    /// daemon described in `PY_PROCS`: [`PyStackHead`], then [`PyFrameRaw`]s. It follows the
    /// [`EventKind::Stack`] record of the same thread, owner and key time.
    PyStack = 14,
    /// The first bytes of a code object a [`EventKind::PyStack`] named for the first time in
    /// its process, and of its name, file name and line table: [`PyCodeRecord`]. The daemon
    /// reads code objects from the process while it lives, and from this copy after.
    PyCode = 15,
    /// A stack the daemon had unwound before, recognised by the kernel (`KNOWN_STACKS`): its
    /// id, in place of a [`EventKind::Stack`] record and with the same header.
    /// [`KnownStackEvent`].
    KnownStack = 16,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            1 => Self::Syscall,
            2 => Self::Fault,
            3 => Self::Fork,
            4 => Self::Exec,
            5 => Self::Exit,
            6 => Self::Open,
            7 => Self::FaultBatch,
            8 => Self::Stack,
            9 => Self::Heap,
            10 => Self::HeapBatch,
            11 => Self::Join,
            12 => Self::Commit,
            13 => Self::HeapStack,
            14 => Self::PyStack,
            15 => Self::PyCode,
            16 => Self::KnownStack,
            other => return Err(other),
        })
    }
}

/// The memory syscalls vmatrace traces. These are vmatrace's own numbers, not the
/// architecture's syscall numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Syscall {
    Brk = 0,
    Mmap = 1,
    Munmap = 2,
    Mremap = 3,
    Mprotect = 4,
    PkeyMprotect = 5,
    Madvise = 6,
    ProcessMadvise = 7,
    Shmat = 8,
    Shmdt = 9,
    /// Traced only to name the files that are mapped later (emits [`OpenEvent`]).
    Openat = 10,
    /// The locking calls make memory resident without a fault (and `mlockall(MCL_FUTURE)`
    /// makes later mappings resident).
    Mlock = 11,
    Mlock2 = 12,
    Munlock = 13,
    Mlockall = 14,
    Munlockall = 15,
}

impl Syscall {
    /// Every traced syscall, in number order.
    pub const ALL: [Syscall; 16] = [
        Self::Brk,
        Self::Mmap,
        Self::Munmap,
        Self::Mremap,
        Self::Mprotect,
        Self::PkeyMprotect,
        Self::Madvise,
        Self::ProcessMadvise,
        Self::Shmat,
        Self::Shmdt,
        Self::Openat,
        Self::Mlock,
        Self::Mlock2,
        Self::Munlock,
        Self::Mlockall,
        Self::Munlockall,
    ];

    /// How many arguments the syscall takes (the argument slots after them are not read).
    pub const fn nargs(self) -> usize {
        match self {
            Self::Munlockall => 0,
            Self::Brk | Self::Shmdt | Self::Mlockall => 1,
            Self::Munmap | Self::Mlock | Self::Munlock => 2,
            Self::Mprotect | Self::Madvise | Self::Shmat | Self::Mlock2 => 3,
            Self::PkeyMprotect | Self::Openat => 4,
            Self::Mremap | Self::ProcessMadvise => 5,
            Self::Mmap => 6,
        }
    }

    /// Whether a kernel may lack the syscall (memory protection keys exist on x86 and
    /// powerpc only, `process_madvise` since 5.10, System V IPC only with CONFIG_SYSVIPC):
    /// vmatrace then traces the others, since no program can make a call the kernel lacks.
    pub const fn optional(self) -> bool {
        matches!(
            self,
            Self::PkeyMprotect | Self::ProcessMadvise | Self::Shmat | Self::Shmdt
        )
    }

    /// The syscall's name, as in `syscalls:sys_enter_<name>`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Brk => "brk",
            Self::Mmap => "mmap",
            Self::Munmap => "munmap",
            Self::Mremap => "mremap",
            Self::Mprotect => "mprotect",
            Self::PkeyMprotect => "pkey_mprotect",
            Self::Madvise => "madvise",
            Self::ProcessMadvise => "process_madvise",
            Self::Shmat => "shmat",
            Self::Shmdt => "shmdt",
            Self::Openat => "openat",
            Self::Mlock => "mlock",
            Self::Mlock2 => "mlock2",
            Self::Munlock => "munlock",
            Self::Mlockall => "mlockall",
            Self::Munlockall => "munlockall",
        }
    }
}

impl TryFrom<u32> for Syscall {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Self::ALL.get(v as usize).copied().ok_or(v)
    }
}

/// The common start of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Thread-group id (the process id) of the task the event is about.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Per-kind detail: the [`Syscall`] number for syscalls, the x86 page-fault error code for
    /// faults ([`FAULT_ERROR_UNKNOWN`] when the backend cannot know it), the old pid for exec,
    /// 0 otherwise.
    pub detail: u32,
    /// `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`). For syscalls: the exit.
    pub ts_ns: u64,
}

impl EventHeader {
    /// The header of a record of `kind`: the one constructor the eBPF programs use.
    #[inline(always)]
    pub const fn new(kind: EventKind, tgid: u32, tid: u32, detail: u32, ts_ns: u64) -> Self {
        Self {
            kind: kind as u32,
            tgid,
            tid,
            detail,
            ts_ns,
        }
    }
}

/// A memory syscall: its arguments (as the tracepoint gives them) and its return value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallEvent {
    pub header: EventHeader,
    /// When the syscall was entered.
    pub enter_ts_ns: u64,
    /// The raw arguments in declaration order; unused ones are 0.
    pub args: [u64; 6],
    /// The raw return value: an address or 0 on success, `-errno` on failure.
    pub ret: i64,
    /// Extra data read at entry. `process_madvise`: the first `iovec` (base, len).
    pub extra: [u64; 2],
    /// Where the call's change is ordered: the time of its [`EventKind::Commit`] record, or 0
    /// when it has none (ordered at its exit).
    pub commit_ts_ns: u64,
}

/// The point at which a syscall's change is ordered ([`EventKind::Commit`]); `detail` is the
/// [`Syscall`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitEvent {
    pub header: EventHeader,
}

/// A user page fault (`exceptions:page_fault_user` or the software page-fault perf event).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultEvent {
    pub header: EventHeader,
    /// The faulting address.
    pub address: u64,
    /// The user instruction pointer.
    pub ip: u64,
}

/// Faults a [`FaultBatch`] holds at most.
pub const FAULT_BATCH_LEN: usize = 64;

/// Faults gathered on one CPU (raw tracepoint backend), written as one record when the batch
/// is full, and whenever the daemon asks (before each read of the ring). The record is cut
/// after the faults it holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultBatch {
    pub head: FaultBatchHead,
    pub faults: [FaultEvent; FAULT_BATCH_LEN],
}

/// The start of a [`FaultBatch`] (and of a [`HeapBatch`]). `header.detail` is how many faults
/// (allocator events) follow; `header.ts_ns` is
/// when the batch was written: every fault this CPU took up to then is in this record or an
/// earlier one (so the batch is a watermark for its CPU, even when empty). `header.tgid` and
/// `header.tid` are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultBatchHead {
    pub header: EventHeader,
    /// The CPU the faults were taken on.
    pub cpu: u32,
    pub _pad: u32,
}

/// The fault backend could not know the error code (perf-event backend).
pub const FAULT_ERROR_UNKNOWN: u32 = u32::MAX;
/// x86 page-fault error code: the page was present (a protection fault, e.g. copy on write).
pub const PF_PROT: u32 = 1 << 0;
/// x86 page-fault error code: the access was a write.
pub const PF_WRITE: u32 = 1 << 1;
/// x86 page-fault error code: the access came from user mode.
pub const PF_USER: u32 = 1 << 2;
/// x86 page-fault error code: the access was an instruction fetch.
pub const PF_INSTR: u32 = 1 << 4;

/// A traced process created a new process (`task:task_newtask` without `CLONE_THREAD`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    /// `tgid`/`tid` are the parent's.
    pub header: EventHeader,
    /// The new process's pid.
    pub child_pid: u32,
    /// 1 when the child was added to the kernel filter (`--follow`), 0 otherwise.
    pub followed: u32,
    /// The `clone` flags.
    pub clone_flags: u64,
}

/// Bytes of the exec'd file name carried by [`ExecEvent`] (longer names are cut).
pub const EXEC_FILENAME_LEN: usize = 128;

/// A traced process replaced its image (`sched:sched_process_exec`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// NUL-terminated file name as passed to exec.
    pub filename: [u8; EXEC_FILENAME_LEN],
}

/// The last thread of a traced process exited (`sched:sched_process_exit` with `group_dead`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: EventHeader,
}

/// A process of the traced cgroup joined the traced set (its first event seen by a program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinEvent {
    pub header: EventHeader,
}

/// A syscall's arguments saved at entry, keyed by thread id until the exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyscall {
    /// A [`Syscall`] as `u32`.
    pub syscall: u32,
    pub _pad: u32,
    pub enter_ts_ns: u64,
    pub args: [u64; 6],
    pub extra: [u64; 2],
    /// The time of the call's [`EventKind::Commit`] record, 0 until it has one.
    pub commit_ts_ns: u64,
}

/// Bytes of the opened path carried by [`OpenEvent`] (longer paths are cut).
pub const OPEN_PATH_LEN: usize = 232;

/// A traced process opened `path` as file descriptor `header.detail`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenEvent {
    pub header: EventHeader,
    /// NUL-terminated path as passed to `openat`.
    pub path: [u8; OPEN_PATH_LEN],
}

/// Allocator events a [`HeapBatch`] holds at most.
pub const HEAP_BATCH_LEN: usize = 64;

/// `header.detail` of a [`HeapEvent`]: the event is a return (else an entry).
pub const HEAP_RETURN: u32 = 1;
/// `header.detail` of a [`HeapEvent`]: the last argument words hold a glibc chunk header read
/// from the traced process (entry: the size word of the block `args[0]`; return: the
/// `prev_size` and size words of the block returned).
pub const HEAP_CHUNK: u32 = 2;
/// `header.detail` of a return [`HeapEvent`]: the block was read through the pointer the
/// entry saved (`posix_memalign`'s first argument), not from the return value.
pub const HEAP_MEMPTR: u32 = 4;

/// An allocator function's entry or return, from a uprobe or uretprobe (`--heap`).
///
/// Entry: `ip` is the function's address, `sp` the stack pointer the call will return with,
/// `args` the first three arguments and, with [`HEAP_CHUNK`], the glibc chunk size word of the
/// block `args[0]` (for `free` and `realloc`).
///
/// Return: `ip` is the address returned to (the call site), `sp` the stack pointer there (equal
/// to the entry's `sp`, which pairs them), `args` the raw return value, the block the call
/// returned (the return value, or with [`HEAP_MEMPTR`] the pointer stored through the first
/// argument), and with [`HEAP_CHUNK`] the block's glibc chunk header (`prev_size`, size word).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapEvent {
    /// `detail`: [`HEAP_RETURN`], [`HEAP_CHUNK`], [`HEAP_MEMPTR`] bits.
    pub header: EventHeader,
    pub ip: u64,
    pub sp: u64,
    pub args: [u64; 4],
}

/// The registers and top of the user stack at an allocator function's entry, written (before
/// the entry's own [`HeapEvent`]) when the address the call will return to is one the daemon
/// put in `HEAP_WRAPPER_SITES`: code of an allocation wrapper (`operator new`,
/// `__rust_alloc`), through which the daemon unwinds to the code that
/// called it. `header.detail` is 0; userspace finds the entry by thread and stack pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStack {
    pub header: EventHeader,
    /// As [`StackHead::regs`], at the function's first instruction (x86-64: `sp` points at
    /// the return address).
    pub regs: [u64; 4],
    /// The user stack from `regs[1]` up; words that could not be read are 0.
    pub words: [u64; HEAP_STACK_WORDS],
}

/// Words of user stack in a [`HeapStack`]: enough for a wrapper or two.
pub const HEAP_STACK_WORDS: usize = 16;

/// A key of `HEAP_WRAPPER_SITES`: a process and an address in a wrapper that its allocator
/// calls return to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WrapperSite {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Allocator events gathered on one CPU, written as one record when the batch is full and
/// whenever the daemon asks (`heap_flush`); the record is cut after the events it holds.
/// Like [`FaultBatch`], its `head.header.ts_ns` is a watermark: every allocator event this CPU
/// put in a batch up to then is in this record or an earlier one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapBatch {
    /// `header.kind` is [`EventKind::HeapBatch`], `header.detail` the number of events.
    pub head: FaultBatchHead,
    pub events: [HeapEvent; HEAP_BATCH_LEN],
}

/// Flags stored per traced tgid in the `TARGETS` map: add forked children to the filter.
pub const TARGET_FOLLOW_FORKS: u32 = 1;
/// Flag in `TARGETS`: stop the process with `SIGSTOP` at each exec, so that the daemon can
/// read its fresh maps before it runs, then continue it. Used only for vmatrace's own child
/// (only its parent, vmatrace, can see the stop); children do not inherit it.
pub const TARGET_STOP_AT_EXEC: u32 = 2;

/// Slots of the `TARGETS_GEN` array: bumped after every change of `TARGETS` by the eBPF
/// programs (this slot) ...
pub const TARGETS_GEN_KERNEL: u32 = 0;
/// ... and by userspace (this one), each writer in its own slot so no increment is lost.
pub const TARGETS_GEN_USER: u32 = 1;
/// Number of `TARGETS_GEN` slots.
pub const TARGETS_GEN_SLOTS: u32 = 2;

/// Counters kept per CPU in the `STATS` map; the index of each is its value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Syscall events dropped because the ring buffer was full.
    LostSyscall = 0,
    /// Fault events dropped because the ring buffer was full.
    LostFault = 1,
    /// Fork, exec and exit events dropped because the ring buffer was full.
    LostLifecycle = 2,
    /// Syscall entries that could not be saved (pending map full).
    PendingFull = 3,
    /// Syscall exits seen without an entry (in flight when tracing started).
    ExitWithoutEnter = 4,
    /// Forked children that could not be added to the filter (targets map full).
    TargetsFull = 5,
    /// Reads of tracepoint or user data that failed.
    ReadError = 6,
    /// Stacks dropped because the ring buffer was full (their events are kept, without one).
    LostStack = 7,
    /// Allocator events (`--heap`) dropped because the ring buffer was full.
    LostHeap = 8,
    /// `openat` records (the path of a new descriptor) dropped because the ring buffer was
    /// full.
    LostOpen = 9,
    /// Commits (a racing call's place in its process's order) dropped because the ring
    /// buffer was full: the call is then ordered at its exit.
    LostCommit = 10,
}

/// Number of [`Stat`] counters.
pub const STAT_COUNT: u32 = 11;

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Self::LostSyscall,
        Self::LostFault,
        Self::LostLifecycle,
        Self::PendingFull,
        Self::ExitWithoutEnter,
        Self::TargetsFull,
        Self::ReadError,
        Self::LostStack,
        Self::LostHeap,
        Self::LostOpen,
        Self::LostCommit,
    ];
}

/// Frame-pointer frames a [`StackRecord`] carries at most (`bpf_get_stack`).
pub const STACK_FRAMES_MAX: usize = 64;
/// Bytes of the top of the user stack a [`StackRecord`] can carry (the `--stack-bytes`
/// bound: a per-CPU array value is at most 32 KiB).
pub const STACK_COPY_MAX: usize = 16 * 1024;
/// Default bytes of user stack copied per stack.
pub const STACK_COPY_DEFAULT: u32 = 8 * 1024;

/// The start of a [`EventKind::Stack`] record. `header.detail` is the [`EventKind`] of the
/// record the stack belongs to (`Syscall` or `Fault`); `header.ts_ns` is that record's key
/// time: the syscall's `enter_ts_ns`, or the fault's `ts_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackHead {
    pub header: EventHeader,
    /// The user registers needed to unwind: x86_64 `[ip, sp, bp, 0]`, aarch64
    /// `[pc, sp, fp (x29), lr (x30)]`.
    pub regs: [u64; 4],
    /// Frame-pointer frames that follow (at most [`STACK_FRAMES_MAX`]; the first is the ip).
    pub frames: u32,
    /// Bytes of user stack copied from `regs[1]` (sp) up, after the frames array.
    pub stack_bytes: u32,
}

/// A user stack as the kernel writes it: the record is cut after `stack_bytes` of `stack`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackRecord {
    pub head: StackHead,
    pub frames: [u64; STACK_FRAMES_MAX],
    pub stack: [u8; STACK_COPY_MAX],
}

/// A stack recognised by the kernel: the header a [`StackHead`] would have, and the id the
/// daemon gave the stack when it unwound it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownStackEvent {
    pub header: EventHeader,
    pub id: u64,
}

/// Entries of the programs' `KNOWN_STACKS` map (least recently used first out).
pub const KNOWN_STACKS_MAX: u32 = 8192;
/// Stack words a [`KnownStack`] compares at most.
pub const KNOWN_READS_MAX: usize = 32;
/// How far above sp a [`KnownStack`]'s words may be (bytes; a power of two).
pub const KNOWN_SPAN_MAX: usize = 8192;

/// The key of a stack the daemon unwound (`KNOWN_STACKS`): the process and the registers
/// of [`StackHead::regs`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KnownStackKey {
    pub tgid: u32,
    pub _pad: u32,
    pub regs: [u64; 4],
}

/// What the daemon's unwinding of a stack read: with the same registers
/// ([`KnownStackKey`]), the same words at these offsets from sp and the same mappings, the
/// unwinding gives the same frames, so the kernel sends the id ([`KnownStackEvent`]) and no
/// copy. Only walks that the frame-pointer walk did not add to are registered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownStack {
    pub id: u64,
    /// Words compared (at most [`KNOWN_READS_MAX`]).
    pub reads: u32,
    /// Bytes from sp that hold them (at most [`KNOWN_SPAN_MAX`]).
    pub span: u32,
    pub offsets: [u32; KNOWN_READS_MAX],
    pub words: [u64; KNOWN_READS_MAX],
}

/// Python frames a [`PyStackRecord`] carries at most: the innermost ones.
pub const PY_FRAMES_MAX: usize = 64;

/// Where a CPython's data is in one process, put in `PY_PROCS` by the daemon: the address of
/// `_PyRuntime` and the offsets of the fields the programs follow (one version's layout is
/// one set of values, not one program).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// The address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// `_PyRuntime.gilstate.tstate_current`: the thread state holding the GIL.
    pub tstate_current: u32,
    /// `_PyRuntime.gilstate.autoTSSkey`: `int _is_initialized`, then `pthread_key_t _key`.
    pub tss_key: u32,
    /// `PyThreadState.thread_id` (the thread's `pthread_self()`, its TLS base).
    pub thread_id: u32,
    /// `PyThreadState.cframe`, and `_PyCFrame.current_frame`.
    pub cframe: u32,
    pub current_frame: u32,
    /// Where a [`PyFrameWindow`] starts in a `_PyInterpreterFrame` (its `f_code`).
    pub frame_window: u32,
    /// `PyCodeObject.co_qualname`, `.co_filename` and `.co_linetable`: the objects a
    /// [`PyCodeRecord`] copies the start of.
    pub code_qualname: u32,
    pub code_filename: u32,
    pub code_linetable: u32,
    /// Where glibc keeps a thread's first 32 thread-specific values, from its TLS base
    /// (`struct pthread`'s `specific_1stblock`: 16-byte `{seq, data}` pairs); 0: unknown, the
    /// GIL holder is the only thread state found.
    pub tsd_block: u32,
    /// Which of the daemon's findings of an interpreter this is (a new one after exec): the
    /// code objects copied are remembered per finding.
    pub generation: u32,
}

/// A key of `PY_CODES_SEEN`: a code object copied for a process's interpreter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyCodeKey {
    pub tgid: u32,
    /// [`PyProc::generation`].
    pub generation: u32,
    pub code: u64,
}

/// Bytes of a code object a [`PyCodeRecord`] copies: its fields up to its bytecode.
pub const PY_CODE_HEAD: usize = 184;
/// Bytes of its name and file name objects copied (a compact str's characters start 48 or
/// 72 bytes in).
pub const PY_STR_BYTES: usize = 256;
/// Bytes of its line table object copied (the table starts 32 bytes in).
pub const PY_TABLE_BYTES: usize = 1024;

/// The start of a code object and of the objects it names, copied by the kernel the first
/// time a Python stack of its process named it. Each copy is of the object's first bytes;
/// `*_len` says how many were read (0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyCodeRecord {
    /// `tgid` the process, `detail` the [`PyProc::generation`].
    pub header: EventHeader,
    pub code: u64,
    /// The addresses of the name, file name and line table objects (0: unread).
    pub qualname: u64,
    pub filename: u64,
    pub linetable: u64,
    pub qualname_len: u32,
    pub filename_len: u32,
    pub linetable_len: u32,
    pub _pad: u32,
    pub head: [u8; PY_CODE_HEAD],
    pub qualname_bytes: [u8; PY_STR_BYTES],
    pub filename_bytes: [u8; PY_STR_BYTES],
    pub linetable_bytes: [u8; PY_TABLE_BYTES],
}

/// The fields of a CPython 3.11 `_PyInterpreterFrame` the walk reads, in one read: bytes
/// 32-71 of the frame (`Include/internal/pycore_frame.h`, v3.11).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrameWindow {
    /// `f_code`: the frame's code object.
    pub code: u64,
    /// `frame_obj`.
    pub _frame_obj: u64,
    /// `previous`: the calling frame, or null.
    pub previous: u64,
    /// `prev_instr`: the last instruction begun, in the code object's inline bytecode.
    pub prev_instr: u64,
    /// `stacktop`.
    pub _stacktop: u32,
    /// `is_entry`: the first frame of a call of the evaluation loop from C.
    pub is_entry: u8,
    /// `owner`: 0 a thread's, 1 a generator's, 2 a frame object's.
    pub owner: u8,
    pub _pad: u16,
}

/// The start of a [`EventKind::PyStack`] record; `header` repeats the [`StackHead`]'s
/// (thread, owner kind in `detail`, key time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyStackHead {
    pub header: EventHeader,
    /// [`PyFrameRaw`]s that follow, innermost first.
    pub frames: u32,
    /// How the thread's state was found: [`PY_VIA_GIL`] or [`PY_VIA_TSD`].
    pub via: u32,
}

/// Where a [`PyCodeRecord`] is built in the stack scratch slot (after the [`PyStackRecord`]
/// built at its start).
pub const PY_CODE_AT: usize = 2048;

/// The thread state was the GIL holder's.
pub const PY_VIA_GIL: u32 = 1;
/// The thread state was in the thread's own thread-specific slot (the GIL was released).
pub const PY_VIA_TSD: u32 = 2;

/// One frame of a thread's Python stack, as the interpreter keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrameRaw {
    /// The frame's code object.
    pub code: u64,
    /// `prev_instr` minus the code object's address: where in the bytecode it is.
    pub instr_offset: u32,
    /// The frame's `is_entry` (the first frame of an evaluation loop called from C).
    pub is_entry: u8,
    /// The frame's `owner` (0 a thread's, 1 a generator's, 2 a frame object's).
    pub owner: u8,
    pub _pad: u16,
}

/// A Python stack as the kernel writes it: the record is cut after `frames` frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStackRecord {
    pub head: PyStackHead,
    pub frames: [PyFrameRaw; PY_FRAMES_MAX],
}

/// Default ring-buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);
const _: () = assert!(core::mem::size_of::<SyscallEvent>() == 112);
const _: () = assert!(core::mem::size_of::<FaultEvent>() == 40);
const _: () = assert!(core::mem::size_of::<FaultBatchHead>() == 32);
const _: () = assert!(core::mem::size_of::<FaultBatch>() == 32 + 40 * FAULT_BATCH_LEN);
const _: () = assert!(core::mem::size_of::<ForkEvent>() == 40);
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 24 + EXEC_FILENAME_LEN);
const _: () = assert!(core::mem::size_of::<ExitEvent>() == 24);
const _: () = assert!(core::mem::size_of::<JoinEvent>() == 24);
const _: () = assert!(core::mem::size_of::<CommitEvent>() == 24);
const _: () = assert!(core::mem::size_of::<OpenEvent>() == 256);
const _: () = assert!(core::mem::size_of::<PendingSyscall>() == 88);
const _: () = assert!(core::mem::size_of::<HeapEvent>() == 72);
const _: () = assert!(core::mem::size_of::<HeapBatch>() == 32 + 72 * HEAP_BATCH_LEN);
const _: () = assert!(core::mem::size_of::<HeapStack>() == 24 + 32 + 8 * HEAP_STACK_WORDS);
const _: () = assert!(core::mem::size_of::<WrapperSite>() == 16);
const _: () = assert!(core::mem::size_of::<StackHead>() == 64);
const _: () = assert!(core::mem::size_of::<KnownStackEvent>() == 32);
const _: () = assert!(core::mem::size_of::<KnownStackKey>() == 40);
const _: () = assert!(core::mem::size_of::<KnownStack>() == 16 + 12 * KNOWN_READS_MAX);
const _: () = assert!(KNOWN_SPAN_MAX.is_power_of_two() && KNOWN_SPAN_MAX + 8 <= STACK_COPY_MAX);
const _: () = assert!(KNOWN_READS_MAX.is_power_of_two());
const _: () =
    assert!(core::mem::size_of::<StackRecord>() == 64 + 8 * STACK_FRAMES_MAX + STACK_COPY_MAX);
const _: () = assert!(core::mem::size_of::<StackRecord>() <= 32 * 1024);
const _: () = assert!(core::mem::size_of::<PyProc>() == 56);
const _: () = assert!(core::mem::size_of::<PyCodeKey>() == 16);
const _: () = assert!(
    core::mem::size_of::<PyCodeRecord>()
        == 24 + 32 + 16 + PY_CODE_HEAD + 2 * PY_STR_BYTES + PY_TABLE_BYTES
);
// Built in the stack scratch slot after the Python stack record.
const _: () = assert!(core::mem::size_of::<PyStackRecord>() <= PY_CODE_AT);
const _: () = assert!(
    PY_CODE_AT + core::mem::size_of::<PyCodeRecord>() <= core::mem::size_of::<StackRecord>()
);
const _: () = assert!(core::mem::size_of::<PyFrameWindow>() == 40);
const _: () = assert!(core::mem::offset_of!(PyFrameWindow, is_entry) == 36);
const _: () = assert!(core::mem::size_of::<PyStackHead>() == 32);
const _: () = assert!(core::mem::size_of::<PyFrameRaw>() == 16);
const _: () = assert!(core::mem::size_of::<PyStackRecord>() == 32 + 16 * PY_FRAMES_MAX);
// The Python record is built in the native stack record's scratch slot once that is written.
const _: () = assert!(core::mem::size_of::<PyStackRecord>() <= core::mem::size_of::<StackRecord>());

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers, with no implicit
    // padding (the size asserts above check the layout).
    unsafe impl aya::Pod for super::PendingSyscall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::layout::KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WrapperSite {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyProc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyCodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KnownStackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KnownStack {}
}
