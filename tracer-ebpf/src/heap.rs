//! Allocator calls (`--heap`): uprobes on the entry and uretprobes on the return of `malloc`,
//! `free` and the other allocator functions of the libraries a traced process maps. Each
//! entry and each return is one [`HeapEvent`]; userspace pairs them by thread and stack
//! pointer. Events are gathered per CPU in a [`HeapBatch`] and written as one record when it
//! is full or when the daemon runs `heap_flush` on the CPU, as faults are.
//!
//! Unlike the fault programs, uprobe programs run with interrupts on and, on preemptible
//! kernels, can be preempted: the daemon's flush (an IPI) can land in the middle of an append,
//! and another task on the same CPU can enter the program meanwhile. So each CPU's batch has
//! an owner count: a program adds one (an atomic add, which 5.10 has) and owns the batch only
//! when the count it then reads is one; otherwise it takes its one away and writes its event
//! to the ring directly, stamped after its reservation like the syscall records. The flush
//! writes nothing while the count is not zero (it returns 2: ask again).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_user, generated as raw_helpers},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    EventHeader, EventKind, HEAP_CHUNK, HEAP_MEMPTR, HEAP_RETURN, HEAP_STACK_WORDS, HeapBatch,
    HeapEvent, HeapStack, Stat, WrapperSite,
};

use crate::{
    arch::{SP_AFTER_RETURN, STACK_REG_OFFSETS, UPROBE_IP_SP_OFFSETS},
    batch,
    maps::{EVENTS, count, current_ids, is_target, now_ns, wakeup_flags},
};

/// One CPU's batch and the count of programs using it.
#[repr(C)]
pub struct HeapSlot {
    batch: HeapBatch,
    owners: u64,
}

/// Each CPU's allocator events not yet written to `EVENTS`.
#[map]
pub static HEAP_BATCH: PerCpuArray<HeapSlot> = PerCpuArray::with_max_entries(1, 0);

/// `posix_memalign`'s first argument (where the block's address will be stored), saved at the
/// entry by thread id until the return reads the block through it.
#[map]
pub static SAVED_MEMPTR: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// Addresses in allocation wrappers (`operator new`, `__rust_alloc`, ...) that allocator
/// calls of a process return to, put here by the daemon when it names such a call site: the
/// entries of calls returning there also write a [`HeapStack`], to unwind past the wrapper.
#[map]
pub static HEAP_WRAPPER_SITES: HashMap<WrapperSite, u8> = HashMap::with_max_entries(4096, 0);

/// Reads the `u64` at `offset` of the probe's `struct pt_regs` (an aligned context load).
#[inline(always)]
fn reg(ctx: &impl EbpfContext, offset: usize) -> u64 {
    // SAFETY: the verifier allows aligned loads from a kprobe-type context within its size.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const u64) }
}

/// An allocator function's entry. `chunk`: glibc, whose block `args[0]` (of `free`, `realloc`)
/// has its size word just before it; `memptr`: `posix_memalign`, whose first argument is saved
/// for the return.
#[inline(always)]
pub fn try_entry(ctx: &ProbeContext, chunk: bool, memptr: bool) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let a0: u64 = ctx.arg(0).unwrap_or(0);
    let a1: u64 = ctx.arg(1).unwrap_or(0);
    let a2: u64 = ctx.arg(2).unwrap_or(0);
    let mut detail = 0;
    let mut size_word = 0;
    if chunk && a0 >= 16 {
        // SAFETY: a user address read with the fault-tolerant helper.
        size_word = unsafe { bpf_probe_read_user((a0 - 8) as *const u64) }.unwrap_or(0);
        detail |= HEAP_CHUNK;
    }
    if memptr {
        let _ = SAVED_MEMPTR.insert(tid, a0, 0);
    }
    let (ip, sp) = UPROBE_IP_SP_OFFSETS;
    let sp = reg(ctx, sp);
    wrapper_stack(ctx, tgid, tid, sp);
    emit(HeapEvent {
        header: EventHeader::new(EventKind::Heap, tgid, tid, detail, 0),
        ip: reg(ctx, ip),
        sp: sp + SP_AFTER_RETURN,
        args: [a0, a1, a2, size_word],
    })
}

/// At an entry whose call returns into a wrapper the daemon named (`HEAP_WRAPPER_SITES`),
/// writes the registers and the top of the stack ([`HeapStack`]) before the entry's event.
#[inline(always)]
fn wrapper_stack(ctx: &ProbeContext, tgid: u32, tid: u32, sp: u64) {
    let [ip_at, sp_at, fp_at, lr_at] = STACK_REG_OFFSETS;
    let lr = lr_at.map_or(0, |o| reg(ctx, o));
    // x86-64: `call` pushed the return address; arm64 keeps it in the link register.
    let ret = if SP_AFTER_RETURN == 0 {
        lr
    } else {
        // SAFETY: a user address read with the fault-tolerant helper.
        unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0)
    };
    let key = WrapperSite {
        tgid,
        _pad: 0,
        addr: ret,
    };
    // SAFETY: a lookup; the value is not kept.
    if ret == 0 || unsafe { HEAP_WRAPPER_SITES.get(key) }.is_none() {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<HeapStack>(0) else {
        // Only the site is lost (the call keeps the wrapper's), not an allocator event.
        count(Stat::LostStack);
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: a `HeapStack`-sized, aligned reservation, written field by field; the copy is
    // a fault-tolerant read of user memory into it (zeroed where it fails).
    unsafe {
        (*rec).header = EventHeader::new(EventKind::HeapStack, tgid, tid, 0, now_ns());
        (*rec).regs = [
            ip_at.map_or(0, |o| reg(ctx, o)),
            sp_at.map_or(0, |o| reg(ctx, o)),
            fp_at.map_or(0, |o| reg(ctx, o)),
            lr,
        ];
        let words = &raw mut (*rec).words;
        if raw_helpers::bpf_probe_read_user(
            words.cast(),
            size_of::<[u64; HEAP_STACK_WORDS]>() as u32,
            sp as *const core::ffi::c_void,
        ) != 0
        {
            words.write([0; HEAP_STACK_WORDS]);
        }
    }
    entry.submit(wakeup_flags(size_of::<HeapStack>() as u64));
}

/// An allocator function's return. `chunk`: read the glibc chunk header of the block returned;
/// `memptr`: the block is the one stored through the pointer the entry saved.
#[inline(always)]
pub fn try_return(ctx: &RetProbeContext, chunk: bool, memptr: bool) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let ret: u64 = ctx.ret();
    let mut detail = HEAP_RETURN;
    let mut block = ret;
    if memptr {
        detail |= HEAP_MEMPTR;
        // SAFETY: a value of this map, copied at once.
        let saved = unsafe { SAVED_MEMPTR.get(tid) }.copied();
        let _ = SAVED_MEMPTR.remove(tid);
        block = match saved {
            // SAFETY: a user address read with the fault-tolerant helper.
            Some(p) if ret == 0 && p != 0 => {
                unsafe { bpf_probe_read_user(p as *const u64) }.unwrap_or(0)
            }
            _ => 0,
        };
    }
    let mut header_words = [0u64; 2];
    if chunk && block >= 16 {
        // SAFETY: a user address read with the fault-tolerant helper.
        header_words =
            unsafe { bpf_probe_read_user((block - 16) as *const [u64; 2]) }.unwrap_or([0; 2]);
        detail |= HEAP_CHUNK;
    }
    let (ip, sp) = UPROBE_IP_SP_OFFSETS;
    emit(HeapEvent {
        header: EventHeader::new(EventKind::Heap, tgid, tid, detail, 0),
        ip: reg(ctx, ip),
        sp: reg(ctx, sp),
        args: [ret, block, header_words[0], header_words[1]],
    })
}

/// Adds `ev` to this CPU's batch when no other program holds it, else writes it alone.
#[inline(always)]
fn emit(mut ev: HeapEvent) -> Result<u32, u32> {
    let Some(slot) = HEAP_BATCH.get_ptr_mut(0) else {
        count(Stat::LostHeap);
        return Err(1);
    };
    // SAFETY: this CPU's slot; `owners` is only changed by atomic adds.
    let owners = unsafe { &raw mut (*slot).owners };
    // SAFETY: an aligned u64 in a map value; the add is atomic (BPF `lock xadd`).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(owners, 1) };
    // SAFETY: as above; read after our own add, on this CPU.
    if unsafe { core::ptr::read_volatile(owners) } != 1 {
        // Another program (preempted, or interrupted by the flush) is using the batch.
        // SAFETY: as above (adding u64::MAX takes our one away).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(owners, u64::MAX) };
        return direct(ev);
    }
    // SAFETY: owned by this program until the count goes back to zero.
    let batch = unsafe { &mut (*slot).batch };
    // Stamped while owning the batch: every event batched after a write is newer.
    ev.header.ts_ns = now_ns();
    let result = batch::push(batch, ev);
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(owners, u64::MAX) };
    result
}

/// Writes one event as its own record, stamped after its reservation (so that the ring holds
/// such records in time order, as the syscall records).
#[inline(always)]
fn direct(mut ev: HeapEvent) -> Result<u32, u32> {
    let Some(mut entry) = EVENTS.reserve::<HeapEvent>(0) else {
        count(Stat::LostHeap);
        return Err(1);
    };
    ev.header.ts_ns = now_ns();
    entry.write(ev);
    entry.submit(wakeup_flags(size_of::<HeapEvent>() as u64));
    Ok(0)
}

/// Writes this CPU's batch, even when empty (a watermark), unless a program is adding to it
/// (returns 2: the daemon asks again). Run by the daemon on each CPU (`BPF_PROG_TEST_RUN`).
#[inline(always)]
pub fn try_flush() -> Result<u32, u32> {
    let Some(slot) = HEAP_BATCH.get_ptr_mut(0) else {
        return Err(1);
    };
    // SAFETY: this CPU's slot; see `emit`.
    if unsafe { core::ptr::read_volatile(&raw const (*slot).owners) } != 0 {
        return Ok(2);
    }
    // SAFETY: no program holds the batch, and none can start on this CPU while this runs.
    batch::flush(unsafe { &mut (*slot).batch })
}
