//! Where a memory syscall's change is ordered. Threads of one process race: a `munmap` may
//! free a range, a racing `mmap` reuse it and return, and only then the `munmap` return. By
//! exit time the `mmap` came first, which is wrong. The kernel changes a process's VMAs only
//! while holding its `mmap_lock` for writing, so a time taken while the lock is held orders
//! the changes as the kernel made them.
//!
//! * Kernels with the `mmap_lock` tracepoints (5.11 and later): `mmap_lock_acquire_returned`
//!   fires inside the lock once it is taken. At the first write acquisition of a traced
//!   thread's pending memory syscall, a [`CommitEvent`] is written and its time saved in the
//!   thread's `PENDING` slot (`PendingSyscall::commit_ts_ns`); the syscall's record carries it (`commit_ts_ns`).
//! * Older kernels: the calls that remove mappings (`munmap`, `shmdt`, `brk`) are committed at
//!   their entry, which is before their change and so before any reuse of the range they free
//!   (`COMMIT_AT_ENTER`, set by userspace when the lock's tracepoint cannot be attached).
//!
//! Only processes with more than one live thread get commits: nothing can race the calls of a
//! process alone in its memory, whose records come in order already.
//!
//! Userspace holds back every event after a commit until that syscall's record arrives, then
//! puts the record at the commit (`tracer::order`).

use aya_ebpf::{macros::map, maps::Array};
use tracer_common::{CommitEvent, EventHeader, EventKind, Stat, Syscall};

use crate::maps::{
    EVENTS, PENDING, count, current_ids, is_target, live_threads, now_ns, wakeup_flags,
};

/// Slot 0: non-zero when the calls that remove mappings are committed at their entry (no
/// `mmap_lock` tracepoint). Written by userspace after it attached the programs.
#[map]
pub static COMMIT_AT_ENTER: Array<u32> = Array::with_max_entries(1, 0);

/// A `PendingSyscall::syscall` value that matches no syscall: the slot's entry was used.
pub const CONSUMED: u32 = u32::MAX;

/// `mmap_lock_acquire_returned(mm, ..., write, success)`: `write` and `success` are the
/// tracepoint's arguments (0 or 1).
#[inline(always)]
pub fn try_lock_acquired(write: u64, success: u64) -> Result<u32, u32> {
    // Every mmap_lock taken on the machine passes here: read locks (most page faults on older
    // kernels) leave first.
    if write == 0 || success == 0 {
        return Ok(0);
    }
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let Some(slot) = PENDING.get_ptr_mut(tid) else {
        return Ok(0);
    };
    // SAFETY: this thread's own slot; only this thread writes it while it is alive.
    let pending = unsafe { &mut *slot };
    // Only the first write session of a memory syscall in flight: a write lock taken outside
    // one (exec, a call not traced) or a second one inside (a fault growing the stack while
    // the call reads its arguments) changes nothing the record says.
    if pending.syscall == CONSUMED
        || pending.syscall == Syscall::Openat as u32
        || pending.commit_ts_ns != 0
    {
        return Ok(0);
    }
    if !threaded() {
        return Ok(0);
    }
    pending.commit_ts_ns = commit(tgid, tid, pending.syscall);
    Ok(0)
}

/// Whether another thread of the current process may race its call: more than one live
/// thread, or unknown (no BTF). A process alone in its memory has its calls in order already
/// (only one of its threads can create another, and not while inside a memory syscall).
#[inline(always)]
fn threaded() -> bool {
    live_threads().is_none_or(|live| live > 1)
}

/// Whether a call of `syscall` is committed at its entry.
#[inline(always)]
pub fn at_enter(syscall: Syscall) -> bool {
    matches!(syscall, Syscall::Munmap | Syscall::Shmdt | Syscall::Brk)
        && COMMIT_AT_ENTER.get(0).is_some_and(|on| *on != 0)
        && threaded()
}

/// Writes the commit of `tid`'s call of `syscall` and returns its time, or 0 when the ring is
/// full (counted: the call is then ordered at its exit, as if it had no commit, and
/// userspace reads the maps again).
#[inline(always)]
pub fn commit(tgid: u32, tid: u32, syscall: u32) -> u64 {
    let Some(mut entry) = EVENTS.reserve::<CommitEvent>(0) else {
        count(Stat::LostCommit);
        return 0;
    };
    // Stamped after the reservation, as every record written whole: the ring holds them in
    // time order.
    let ts_ns = now_ns();
    entry.write(CommitEvent {
        header: EventHeader::new(EventKind::Commit, tgid, tid, syscall, ts_ns),
    });
    entry.submit(wakeup_flags(size_of::<CommitEvent>() as u64));
    ts_ns
}

/// The commit time a new `PENDING` entry starts with: its own when `syscall` is committed at
/// entry, else 0 (until the lock's tracepoint gives one).
#[inline(always)]
pub fn at_enter_of(tgid: u32, tid: u32, syscall: Syscall) -> u64 {
    if at_enter(syscall) {
        commit(tgid, tid, syscall as u32)
    } else {
        0
    }
}
