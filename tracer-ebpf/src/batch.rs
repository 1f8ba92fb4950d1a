//! Per-CPU batches of records (faults, allocator events): appended one at a time and written
//! to `EVENTS` as one record (a [`FaultBatchHead`] and the items) when full, or when the
//! daemon flushes the CPU. Who may touch a CPU's batch when is the caller's business (see
//! `faults` and `heap`); this is the shared append and write.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use tracer_common::{
    EventHeader, EventKind, FaultBatch, FaultBatchHead, FaultEvent, HeapBatch, HeapEvent, Stat,
};

use crate::maps::{EVENTS, count, count_n, now_ns, wakeup_flags};

/// A batch record: a [`FaultBatchHead`] whose `header.detail` is how many items are in use,
/// followed by a fixed array of items.
///
/// # Safety
/// The implementor is `#[repr(C)]`, its head at offset 0 and its items right after it, so
/// that its first `size_of::<FaultBatchHead>() + n * size_of::<Item>()` bytes are the head
/// and the first `n` items.
pub unsafe trait Batch {
    type Item;
    /// The record's [`EventKind`].
    const KIND: EventKind;
    /// The counter of items a full ring refused.
    const LOST: Stat;
    fn head_mut(&mut self) -> &mut FaultBatchHead;
    fn items_mut(&mut self) -> &mut [Self::Item];
}

// SAFETY: `#[repr(C)]`, `head` then `faults`, checked by tracer-common's size assertions.
unsafe impl Batch for FaultBatch {
    type Item = FaultEvent;
    const KIND: EventKind = EventKind::FaultBatch;
    const LOST: Stat = Stat::LostFault;
    #[inline(always)]
    fn head_mut(&mut self) -> &mut FaultBatchHead {
        &mut self.head
    }
    #[inline(always)]
    fn items_mut(&mut self) -> &mut [FaultEvent] {
        &mut self.faults
    }
}

// SAFETY: `#[repr(C)]`, `head` then `events`, checked by tracer-common's size assertions.
unsafe impl Batch for HeapBatch {
    type Item = HeapEvent;
    const KIND: EventKind = EventKind::HeapBatch;
    const LOST: Stat = Stat::LostHeap;
    #[inline(always)]
    fn head_mut(&mut self) -> &mut FaultBatchHead {
        &mut self.head
    }
    #[inline(always)]
    fn items_mut(&mut self) -> &mut [HeapEvent] {
        &mut self.events
    }
}

/// Appends `item` to `batch`, and writes the batch once it is full.
#[inline(always)]
pub fn push<B: Batch>(batch: &mut B, item: B::Item) -> Result<u32, u32> {
    let n = batch.head_mut().header.detail as usize;
    let len = batch.items_mut().len();
    if n >= len {
        // Never: a full batch is written at once. The check bounds the index for the verifier.
        let _ = write(batch, len);
        count(B::LOST);
        return Err(1);
    }
    batch.items_mut()[n] = item;
    if n + 1 < len {
        batch.head_mut().header.detail = (n + 1) as u32;
        return Ok(0);
    }
    write(batch, len)
}

/// Writes `batch`, even when empty, so that the reader knows how far this CPU's items have
/// reached it (a watermark).
#[inline(always)]
pub fn flush<B: Batch>(batch: &mut B) -> Result<u32, u32> {
    let len = batch.items_mut().len();
    let n = (batch.head_mut().header.detail as usize).min(len);
    write(batch, n)
}

/// Writes the first `n` items of `batch` as one record, stamped with the time and CPU, and
/// empties it. A batch that does not fit is counted as `n` lost items.
#[inline(always)]
fn write<B: Batch>(batch: &mut B, n: usize) -> Result<u32, u32> {
    *batch.head_mut() = FaultBatchHead {
        header: EventHeader::new(B::KIND, 0, 0, n as u32, now_ns()),
        // SAFETY: a helper without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        _pad: 0,
    };
    // Head plus n items, computed upward: older verifiers (6.1) lose the bounds of
    // `size_of::<B>() - (64 - n) * size_of::<Item>()` and refuse the ring output.
    let size = size_of::<FaultBatchHead>() + n * size_of::<B::Item>();
    // SAFETY: the start of the batch, `size` <= its size bytes (see `Batch`).
    let bytes = unsafe { core::slice::from_raw_parts((batch as *const B).cast::<u8>(), size) };
    let written = EVENTS.output::<[u8]>(bytes, wakeup_flags(size as u64));
    batch.head_mut().header.detail = 0;
    if written.is_err() {
        count_n(B::LOST, n as u64);
        return Err(1);
    }
    Ok(0)
}
