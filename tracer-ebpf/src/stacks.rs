//! User stacks for memory events (`--stacks`, `--fault-stacks`): the frame-pointer walk of
//! `bpf_get_stack(BPF_F_USER_STACK)`, and, since most distribution code has no frame
//! pointers, the top of the user stack and the registers to unwind it from, as
//! `perf --call-graph dwarf` takes them. Userspace unwinds the copy with the binaries'
//! `.eh_frame`. The record is built in this CPU's `STACK_SCRATCH` slot and written with one
//! `bpf_ringbuf_output` cut to the bytes copied, just before the record it belongs to.
//! A stack the daemon unwound before is recognised (`KNOWN_STACKS`) and written as its id
//! alone, without the walk and the copy. Stacks are dropped (and counted) while the ring is
//! more than half full (ids: three quarters): they never take the room of the events.
//!
//! The syscall programs that take stacks can be preempted mid-run (fentry/fexit, and on 7.x
//! the syscall tracepoints), and a fault on the same CPU meanwhile may take a fault stack: the
//! scratch slot has an owner count, as `heap`'s batch has, and a program that does not own it
//! drops its stack (counted as a lost stack) rather than write over another's.
//!
//! A thread running CPython also gets its Python frames (`python`), written right after.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE},
    helpers::generated::{
        bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_ringbuf_output, bpf_task_pt_regs,
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tracer_common::{
    EventHeader, EventKind, KNOWN_READS_MAX, KNOWN_SPAN_MAX, KNOWN_STACKS_MAX, KnownStack,
    KnownStackEvent, KnownStackKey, STACK_COPY_MAX, STACK_FRAMES_MAX, StackHead, StackRecord, Stat,
};

use crate::{
    arch::{STACK_REG_OFFSETS, USER_ADDRESS_END},
    maps::{EVENTS, count, wakeup_flags},
};

/// Bytes of user stack copied for each stack; 0: no stacks at all. Set by userspace at load
/// (at most `STACK_COPY_MAX`); programs on kernels without `bpf_task_pt_regs` (before 5.15)
/// load only with 0, as the verifier never visits the code behind it.
#[unsafe(no_mangle)]
static STACK_BYTES: Global<u32> = Global::new(0);

/// 1: every traced memory syscall gets a stack (`--stacks`).
#[unsafe(no_mangle)]
static SYSCALL_STACKS: Global<u32> = Global::new(0);

/// One first-touch fault in this many (per CPU) gets a stack; 0: none.
#[unsafe(no_mangle)]
static FAULT_STACK_EVERY: Global<u32> = Global::new(0);

/// Each CPU's record being built (16 KiB, too large for the eBPF stack).
#[map]
static STACK_SCRATCH: PerCpuArray<StackRecord> = PerCpuArray::with_max_entries(1, 0);

/// Programs using this CPU's `STACK_SCRATCH` (see the module's doc).
#[map]
static STACK_OWNERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The thread whose vmatrace program is reading user memory on this CPU for a stack (0:
/// none). A fault that read takes (a frame-pointer walk through a register that holds no
/// frame pointer, a copy past the stack's present pages) is the program's own: the kernel
/// does not handle it (the helpers disable page faults) and the fault programs skip it
/// (`own_fault`). Keyed by thread, since a syscall program can be preempted meanwhile and
/// other threads' faults on this CPU are real.
#[map]
static READING_USER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Stacks the daemon unwound before, by process and registers: the stack words its walk
/// read and the stack's id (`tracer/src/stacks/known.rs`). Written by userspace only.
#[map]
static KNOWN_STACKS: LruHashMap<KnownStackKey, KnownStack> =
    LruHashMap::with_max_entries(KNOWN_STACKS_MAX, 0);

/// Not-present faults this CPU has seen since its last fault stack.
#[map]
static FAULT_STACK_COUNT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of stack to copy per stack (0: off).
#[inline(always)]
pub fn stack_bytes() -> u32 {
    STACK_BYTES.load()
}

/// Whether memory syscalls get a stack.
#[inline(always)]
pub fn syscall_stacks() -> bool {
    SYSCALL_STACKS.load() != 0
}

/// Whether a fault of thread `tid` was taken by a vmatrace program's own read of its user
/// memory (see `READING_USER`): nothing the process did, and nothing the kernel handled.
/// Without it, every such fault was traced as a kernel-mode fault, and one inside the fault
/// program's own read was a run the kernel skipped (counted as lost).
#[inline(always)]
pub fn own_fault(tid: u32) -> bool {
    if stack_bytes() == 0 {
        return false;
    }
    READING_USER
        .get(0)
        .is_some_and(|reader| *reader == tid && tid != 0)
}

/// Whether this fault is the one in `FAULT_STACK_EVERY` that gets a stack. The tracepoint
/// backend asks for not-present faults only (most likely first touches); the perf-event
/// backend, which has no error code, for every fault.
#[inline(always)]
pub fn fault_wants_stack() -> bool {
    let every = FAULT_STACK_EVERY.load();
    if every == 0 {
        return false;
    }
    let Some(n) = FAULT_STACK_COUNT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; the fault programs do not nest on a CPU.
    unsafe {
        *n += 1;
        if *n < every {
            return false;
        }
        *n = 0;
    }
    true
}

/// Writes the current thread's user stack, for the record of kind `owner` keyed by `key_ts`
/// (a syscall's entry time, a fault's time). Failures are counted, never fatal to the event.
#[inline(always)]
pub fn emit<C: EbpfContext>(ctx: &C, owner: EventKind, tgid: u32, tid: u32, key_ts: u64) {
    let want = stack_bytes();
    if want == 0 {
        return;
    }
    // Stacks give way to events: no copy while the ring is more than half full (a quarter
    // for fault stacks, which give way to syscall stacks too), and no recognised stack's id
    // (32 bytes) past three quarters, so that a burst of stacks never costs the events
    // themselves (counted as lost stacks).
    let ring = EVENTS.query(BPF_RB_RING_SIZE as u64);
    let room = if owner == EventKind::Fault {
        ring / 4
    } else {
        ring / 2
    };
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if avail > ring / 4 * 3 {
        count(Stat::LostStack);
        return;
    }
    let copy = avail <= room;
    let (Some(rec), Some(owners)) = (STACK_SCRATCH.get_ptr_mut(0), STACK_OWNERS.get_ptr_mut(0))
    else {
        return;
    };
    // SAFETY: this CPU's count, an aligned u64 in a map value, changed only by atomic adds
    // (BPF `lock xadd`, which 5.10 has) and read after our own add, on this CPU.
    let sole = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(owners, 1);
        core::ptr::read_volatile(owners) == 1
    };
    if sole {
        let reading = READING_USER.get_ptr_mut(0);
        if let Some(r) = reading {
            // SAFETY: this CPU's slot; see `READING_USER`.
            unsafe { *r = tid };
        }
        fill_and_write(ctx, rec, want, copy, owner, tgid, tid, key_ts);
        if let Some(r) = reading {
            // SAFETY: as above.
            unsafe { *r = 0 };
        }
    } else {
        count(Stat::LostStack);
    }
    // SAFETY: as above (adding u64::MAX takes our one away).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(owners, u64::MAX) };
}

/// Builds the stack record in this CPU's scratch slot `rec` (owned by the caller) and writes
/// it to the ring: its id when the stack is a known one, else, when `copy`, the walk and the
/// copy (none: counted lost).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill_and_write<C: EbpfContext>(
    ctx: &C,
    rec: *mut StackRecord,
    want: u32,
    copy: bool,
    owner: EventKind,
    tgid: u32,
    tid: u32,
    key_ts: u64,
) {
    // SAFETY: `rec` is this CPU's scratch slot, owned by this program (see `emit`); every
    // helper below writes inside it with a constant or bounded size.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs_ptr = bpf_task_pt_regs(task) as *const u8;
        let mut regs = [0u64; 4];
        for (i, off) in STACK_REG_OFFSETS.iter().enumerate() {
            if let Some(off) = off {
                let mut v = 0u64;
                if bpf_probe_read_kernel(
                    &mut v as *mut u64 as *mut _,
                    8,
                    regs_ptr.add(*off) as *const _,
                ) != 0
                {
                    count(Stat::ReadError);
                }
                regs[i] = v;
            }
        }
        if write_known(rec, &regs, owner, tgid, tid, key_ts) {
            return;
        }
        if !copy {
            count(Stat::LostStack);
            return;
        }
        let frames = bpf_get_stack(
            ctx.as_ptr(),
            (*rec).frames.as_mut_ptr() as *mut _,
            (8 * STACK_FRAMES_MAX) as u32,
            BPF_F_USER_STACK as u64,
        );
        let frames = if frames > 0 { frames as u32 / 8 } else { 0 };
        let sp = regs[1];
        let mut copied = 0u32;
        if sp != 0 && sp < USER_ADDRESS_END {
            // Near the top of the stack (the main thread's first frames) the whole length
            // runs past its end: then one page less at a time, down to sp's own page.
            let to_page_end = 4096 - (sp & 4095) as u32;
            let tries = [
                want,
                to_page_end + 3 * 4096,
                to_page_end + 2 * 4096,
                to_page_end + 4096,
                to_page_end,
            ];
            for len in tries {
                let len = if len > STACK_COPY_MAX as u32 {
                    STACK_COPY_MAX as u32
                } else {
                    len
                };
                if len > want {
                    continue;
                }
                if bpf_probe_read_user((*rec).stack.as_mut_ptr() as *mut _, len, sp as *const _)
                    == 0
                {
                    copied = len;
                    break;
                }
            }
        }
        (*rec).head = StackHead {
            header: EventHeader::new(EventKind::Stack, tgid, tid, owner as u32, key_ts),
            regs,
            frames,
            stack_bytes: copied,
        };
        let size = (size_of::<StackHead>() + 8 * STACK_FRAMES_MAX) as u64 + copied as u64;
        if !output_cut(rec, size) {
            return;
        }
        // The slot is free again (the ring holds a copy): the Python frames, if any, are
        // built in it and follow.
        crate::python::emit(rec as *mut u8, owner, tgid, tid, key_ts);
    }
}

/// When the registers `regs` and the stack words above sp are those of a stack the daemon
/// unwound before (`KNOWN_STACKS`), writes that stack's id in place of the stack and says so.
/// One read of the stack (into the scratch slot `rec`, owned by the caller) and a look-up,
/// instead of the frame-pointer walk, the copy and the unwinding.
#[inline(always)]
fn write_known(
    rec: *mut StackRecord,
    regs: &[u64; 4],
    owner: EventKind,
    tgid: u32,
    tid: u32,
    key_ts: u64,
) -> bool {
    let key = KnownStackKey {
        tgid,
        _pad: 0,
        regs: *regs,
    };
    // SAFETY: a map value read in place; userspace replaces entries whole, and a torn one
    // fails the comparison below or names a stack of this process.
    let Some(known) = (unsafe { KNOWN_STACKS.get(key) }) else {
        return false;
    };
    let span = known.span;
    if span == 0 || span > KNOWN_SPAN_MAX as u32 {
        return false;
    }
    // SAFETY: `rec` is this CPU's scratch slot, owned by the caller; the read is at most
    // KNOWN_SPAN_MAX bytes, inside its stack array.
    let buf = unsafe { (*rec).stack.as_mut_ptr() };
    if unsafe { bpf_probe_read_user(buf as *mut _, span, regs[1] as *const _) } != 0 {
        return false;
    }
    let reads = (known.reads as usize).min(KNOWN_READS_MAX);
    let mut i = 0;
    while i < reads {
        // (The masks only show the verifier the bounds: the daemon keeps every word inside
        // the span, and `i` is below KNOWN_READS_MAX, a power of two.)
        let at = i & (KNOWN_READS_MAX - 1);
        // SAFETY: fields of a map value, read in place at an index inside them (volatile, so
        // that no read is moved before the loop's bound).
        let (off, want) = unsafe {
            (
                core::ptr::read_volatile(&known.offsets[at]) as usize & (KNOWN_SPAN_MAX - 1),
                core::ptr::read_volatile(&known.words[at]),
            )
        };
        // SAFETY: `off + 8` is inside the stack array (KNOWN_SPAN_MAX + 8 <= its size).
        let word = unsafe { core::ptr::read_unaligned(buf.add(off) as *const u64) };
        if word != want {
            return false;
        }
        i += 1;
    }
    let mut ev = KnownStackEvent {
        header: EventHeader::new(EventKind::KnownStack, tgid, tid, owner as u32, key_ts),
        id: known.id,
    };
    let size = size_of::<KnownStackEvent>() as u64;
    // SAFETY: a record on this program's stack, `size` bytes long.
    let r = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut _,
            &mut ev as *mut KnownStackEvent as *mut _,
            size,
            wakeup_flags(size),
        )
    };
    if r != 0 {
        count(Stat::LostStack);
    }
    true
}

/// Writes the first `size` bytes of the record `rec` (all of it at most) to the ring: a record
/// built in the scratch slot and cut after what it holds. Whether it went; a stack record the
/// ring has no room for is counted lost.
#[inline(always)]
pub fn output_cut<T>(rec: *mut T, size: u64) -> bool {
    let size = if size > size_of::<T>() as u64 {
        size_of::<T>() as u64
    } else {
        size
    };
    // SAFETY: `rec` points at a `T` in this CPU's scratch slot, owned by the caller; the
    // helper reads `size` bytes of it, at most its size.
    let r = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut _,
            rec as *mut _,
            size,
            wakeup_flags(size),
        )
    };
    if r != 0 {
        count(Stat::LostStack);
        return false;
    }
    true
}
