//! The maps shared by every program, and small helpers around them.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_pidns_info,
    },
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_ns_current_pid_tgid},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{
    DEFAULT_RING_BYTES, EventHeader, EventKind, FaultBatch, JoinEvent, PendingSyscall, STAT_COUNT,
    Stat, TARGET_FOLLOW_FORKS, TARGETS_GEN_KERNEL, TARGETS_GEN_SLOTS, TARGETS_GEN_USER,
    layout::{FIELD_ABSENT, KernelLayout},
};

/// Every event, in the order the kernel submitted them. Userspace may resize it before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// The traced thread-group ids, with `TARGET_*` flags. Written by userspace (and by the fork
/// program for `--follow`).
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Syscall arguments saved at entry, keyed by thread id, until the exit. A plain preallocated
/// hash (an LRU costs more per update); the exit program of a thread removes what a thread
/// killed inside a syscall left behind.
#[map]
pub static PENDING: HashMap<u32, PendingSyscall> = HashMap::with_max_entries(16384, 0);

/// The launched command's stops at exec, by pid: the exec's time (the `ts_ns` of its exec
/// event), written before the stop. The daemon removes the entry when it continues the
/// process; whoever finds an entry knows the process waits for vmatrace (the daemon when the
/// exec event was lost, the guardian when the daemon is gone).
#[map]
pub static EXEC_STOPS: HashMap<u32, u64> = HashMap::with_max_entries(64, 0);

/// Generations of `TARGETS`: whoever changes it bumps its own slot afterwards (the fork and
/// exit programs `TARGETS_GEN_KERNEL`, userspace `TARGETS_GEN_USER`), which invalidates every
/// CPU's `FILTER_CACHE`.
#[map]
pub static TARGETS_GEN: Array<u64> = Array::with_max_entries(TARGETS_GEN_SLOTS, 0);

/// The last answer of [`is_target`] on one CPU, and the generations it holds for.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FilterCache {
    tgid: u32,
    traced: u32,
    gen_kernel: u64,
    gen_user: u64,
    /// With `--cgroup`, the cgroup the answer was for: a process moved into the traced group
    /// must not keep its cached "not traced".
    cgroup: u64,
}

/// Per CPU: most faults come from the process of the fault before them on the same CPU, so
/// the filter answers from here with two array reads instead of a hash look-up (about 85 ns
/// on the project's VM, for every fault of every process). The fault programs' only (see
/// [`is_target_cached`]).
#[map]
pub static FILTER_CACHE: PerCpuArray<FilterCache> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's faults not yet written to `EVENTS` (see `faults::try_flush`).
#[map]
pub static FAULT_BATCH: PerCpuArray<FaultBatch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters indexed by [`Stat`].
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Userspace is woken once this many bytes wait in the ring buffer; below that it polls on a
/// short timer, so a busy process does not cost one wakeup per event. 0: never woken by data
/// (a ring large enough for the timer alone). Set by userspace at load.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(64 * 1024);

/// Adds one to a counter of this CPU.
#[inline(always)]
pub fn count(stat: Stat) {
    count_n(stat, 1);
}

/// Adds `n` to a counter of this CPU.
#[inline(always)]
pub fn count_n(stat: Stat, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: an aligned u64 in this CPU's slot. The add is atomic (BPF `lock xadd`): a
        // program preempted between the read and the write of a plain `+=` (7.x) would undo
        // another's count.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, n,
            )
        };
    }
}

/// How many bytes of the ring wait to be read, written by [`record_ring_fill`].
#[map]
pub static RING_FILL: Array<u64> = Array::with_max_entries(1, 0);

/// Records how full the ring is now (the daemon runs this through `BPF_PROG_TEST_RUN` at its
/// tick: the ring's positions are the kernel's to read).
#[inline(always)]
pub fn record_ring_fill() {
    if let Some(slot) = RING_FILL.get_ptr_mut(0) {
        // SAFETY: an array value, written whole.
        unsafe { *slot = EVENTS.query(BPF_RB_AVAIL_DATA as u64) };
    }
}

/// The cgroup ids (`--cgroup`: the group and those below it) whose processes are traced as
/// soon as a program sees them. Written by userspace.
#[map]
pub static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Whether `CGROUPS` is in use (`--cgroup`), set at load time.
#[unsafe(no_mangle)]
static CGROUP_MODE: Global<u32> = Global::new(0);

/// The daemon's own process (as `current_ids` names it), never traced even if it runs in
/// the traced cgroup. Set at load time.
#[unsafe(no_mangle)]
static DAEMON_TGID: Global<u32> = Global::new(0);

/// With `--cgroup`, the current task's cgroup id; else 0 (no helper call).
#[inline(always)]
fn current_cgroup() -> u64 {
    if CGROUP_MODE.load() == 0 {
        return 0;
    }
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// With `--cgroup`: whether the current task's cgroup is traced; if so its process `tgid`
/// joins `TARGETS` (its children followed) and a [`JoinEvent`] tells the daemon.
#[inline(always)]
fn joins(tgid: u32) -> bool {
    let daemon = DAEMON_TGID.load();
    let group = current_cgroup();
    if group == 0 || tgid == 0 || tgid == daemon || CGROUPS.get_ptr(group).is_none() {
        return false;
    }
    if TARGETS
        .insert(tgid, TARGET_FOLLOW_FORKS, BPF_NOEXIST as u64)
        .is_err()
    {
        // Inserted meanwhile by another CPU (traced), or the map is full (not traced).
        return TARGETS.get_ptr(tgid).is_some();
    }
    targets_changed();
    let (_, tid) = current_ids();
    if let Some(mut entry) = EVENTS.reserve::<JoinEvent>(0) {
        entry.write(JoinEvent {
            header: EventHeader::new(EventKind::Join, tgid, tid, 0, now_ns()),
        });
        entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    } else {
        count(Stat::LostLifecycle);
    }
    true
}

/// Whether `tgid` is traced: the first thing every program asks, from the map.
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    TARGETS.get_ptr(tgid).is_some() || joins(tgid)
}

/// [`is_target`] through this CPU's cache of the last answer, for the page-fault programs
/// only: they run with interrupts or preemption off, so nothing else on their CPU reads or
/// writes the cache while they do. Other programs may be preempted in the middle of a run
/// (fentry/fexit, uprobes, and on 7.x the tracepoints of process context too), and one of
/// them preempted while writing the cache would leave it torn for the next reader.
#[inline(always)]
pub fn is_target_cached(tgid: u32) -> bool {
    // The generations are read before the look-up: a change made after them makes the cached
    // answer stale at once, whatever the look-up saw.
    let (gen_kernel, gen_user) = (generation(TARGETS_GEN_KERNEL), generation(TARGETS_GEN_USER));
    let Some(cache) = FILTER_CACHE.get_ptr_mut(0) else {
        return is_target(tgid);
    };
    let cgroup = current_cgroup();
    // SAFETY: this CPU's slot, used by the fault programs only, which do not nest on a CPU.
    unsafe {
        let c = *cache;
        if c.tgid == tgid
            && c.gen_kernel == gen_kernel
            && c.gen_user == gen_user
            && c.cgroup == cgroup
        {
            return c.traced != 0;
        }
        let traced = is_target(tgid);
        *cache = FilterCache {
            tgid,
            traced: traced as u32,
            gen_kernel,
            gen_user,
            cgroup,
        };
        traced
    }
}

/// One slot of `TARGETS_GEN`.
#[inline(always)]
fn generation(slot: u32) -> u64 {
    // SAFETY: an array value; read volatile, since other CPUs and userspace change it.
    TARGETS_GEN
        .get_ptr(slot)
        .map_or(0, |p| unsafe { core::ptr::read_volatile(p) })
}

/// Marks a change of `TARGETS` made by an eBPF program (after the change).
#[inline(always)]
pub fn targets_changed() {
    if let Some(p) = TARGETS_GEN.get_ptr_mut(TARGETS_GEN_KERNEL) {
        // SAFETY: an aligned u64 in an array value; programs on every CPU add to it, so the
        // add is atomic (BPF `lock xadd`; `AtomicU64::fetch_add` does not exist for bpfel).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}

/// The submit flags for a record of `size` bytes: wake the reader once, when the data waiting
/// crosses `WAKEUP_BYTES`; never for the records after it (while the reader is behind, a
/// wakeup per record would cost the traced process more than the record itself). The reader
/// also drains on a short timer, so nothing waits long.
#[inline(always)]
pub fn wakeup_flags(size: u64) -> u64 {
    let threshold = WAKEUP_BYTES.load();
    // 0: the ring is large enough for the reader's timer alone; skip the query (~30 ns).
    if threshold == 0 {
        return BPF_RB_NO_WAKEUP as u64;
    }
    // The record is already reserved and counted in the available data.
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if avail >= threshold && avail < threshold + size + 8 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Reads the `u64` at `offset` of a tracepoint record directly from the context (no helper
/// call). `offset` must be 8-byte aligned and inside the record, as the formats above say.
#[inline(always)]
pub fn ctx_u64(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: the verifier allows aligned loads from a tracepoint context within its size.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const u64) }
}

/// Argument `n` of a raw or BTF tracepoint: both contexts are the array of the tracepoint's
/// arguments, read directly (no helper call). The kernel refuses a program that reads past
/// the tracepoint's arguments (at load for BTF, at attach for raw tracepoints).
#[inline(always)]
pub fn tp_arg<C: EbpfContext>(ctx: &C, n: usize) -> u64 {
    // SAFETY: the verifier allows aligned 8-byte loads of the arguments from these contexts;
    // `n` is a constant at every call.
    unsafe { *(ctx.as_ptr() as *const u64).add(n) }
}

/// Where the programs read the kernel's data: set by the daemon before load from the kernel's
/// `format` files and BTF, see `tracer_common::layout`.
#[unsafe(no_mangle)]
static LAYOUT: Global<KernelLayout> = Global::new(KernelLayout::UNSET);

/// The layout global, as set at load time.
#[inline(always)]
pub fn layout() -> KernelLayout {
    LAYOUT.load()
}

/// The current process's count of live threads (`current->signal->live`), at offsets from
/// BTF; None when the layout has none or a read fails.
#[inline(always)]
pub fn live_threads() -> Option<i32> {
    let at = layout();
    if at.task_signal == FIELD_ABSENT || at.signal_live == FIELD_ABSENT {
        return None;
    }
    // SAFETY: kernel pointers read with the fault-tolerant helper, at offsets from BTF.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let signal: u64 =
            bpf_probe_read_kernel(task.add(at.task_signal as usize) as *const u64).ok()?;
        bpf_probe_read_kernel((signal as *const u8).add(at.signal_live as usize) as *const i32).ok()
    }
}

/// The current task's (tgid, tid): the kernel's, or, when the daemon runs in a PID namespace
/// of its own, that namespace's. A task outside it gets (0, 0), which is never traced.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    // A read-only global set at load time (the verifier knows its value, so the branch not
    // taken is not even checked).
    let ns = layout().pid_namespace;
    if ns.is_kernel() {
        let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
        return ((id >> 32) as u32, id as u32);
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes `size_of::<bpf_pidns_info>()` bytes into `info`.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            ns.dev,
            ns.ino,
            &mut info,
            size_of::<bpf_pidns_info>() as u32,
        )
    };
    if r != 0 {
        return (0, 0);
    }
    (info.tgid, info.pid)
}

/// `CLOCK_MONOTONIC` in nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}
