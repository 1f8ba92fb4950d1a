//! User page faults, from either backend: the `exceptions:page_fault_user` tracepoint or a BPF
//! program on the software page-fault perf event (for kernels or architectures without the
//! tracepoint). Both emit the same compact [`FaultEvent`]; the tracepoint backend gathers them
//! per CPU into a [`FaultBatch`] first, which saves a ring-buffer reservation per fault.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_smp_processor_id, bpf_probe_read_kernel},
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext},
};
use tracer_common::{
    EventHeader, EventKind, FAULT_BATCH_LEN, FAULT_ERROR_UNKNOWN, FaultBatch, FaultBatchHead,
    FaultEvent, PF_PROT, Stat,
};

use crate::{
    arch::{PT_REGS_IP_OFFSET, USER_ADDRESS_END, perf_fault},
    maps::{EVENTS, FAULT_BATCH, count, count_n, current_ids, is_target, now_ns, wakeup_flags},
    stacks,
};

// The x86 exception tracepoints. Their format, for reference:
// name: page_fault_user (page_fault_kernel has the same)
// format:
// 	field:unsigned long address;	offset:8;	size:8;	signed:0;
// 	field:unsigned long ip;	offset:16;	size:8;	signed:0;
// 	field:unsigned long error_code;	offset:24;	size:8;	signed:0;
// and their arguments (arch/x86/include/asm/trace/exceptions.h), which the programs get
// instead (no perf record is built, which halves their cost):
// TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
const ARG_ADDRESS: usize = 0;
const ARG_REGS: usize = 1;
const ARG_ERROR_CODE: usize = 2;

/// Argument `n` of a raw or BTF tracepoint: both contexts are the array of the tracepoint's
/// arguments, read directly (no helper call).
#[inline(always)]
fn tp_arg<C: EbpfContext>(ctx: &C, n: usize) -> u64 {
    // SAFETY: the verifier allows aligned 8-byte loads of the arguments from these contexts
    // (`n` is one of the three above).
    unsafe { *(ctx.as_ptr() as *const u64).add(n) }
}

/// `page_fault_user` and `page_fault_kernel` as BTF tracepoints (`tp_btf`): the kernel's BTF
/// types `regs` as `struct pt_regs *`, so the faulting instruction is one load (the verifier
/// makes it fault-tolerant) instead of a `bpf_probe_read_kernel` call. Kernels that refuse
/// it get [`try_page_fault_raw`].
#[inline(always)]
pub fn try_page_fault_btf(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    try_page_fault(ctx, |regs| {
        // SAFETY: `regs` is the tracepoint's `struct pt_regs *` (BTF-typed), and the offset
        // is its `ip` field: the verifier checks the access against BTF and turns it into a
        // load that cannot fault.
        unsafe { *((regs as usize + PT_REGS_IP_OFFSET) as *const u64) }
    })
}

/// The same tracepoints attached raw, for kernels without a usable BTF for them: `regs` is
/// a plain number there, read with the fault-tolerant helper.
#[inline(always)]
pub fn try_page_fault_raw(ctx: &RawTracePointContext) -> Result<u32, u32> {
    try_page_fault(ctx, |regs| {
        // SAFETY: a kernel pointer read with the fault-tolerant helper.
        unsafe { bpf_probe_read_kernel((regs as usize + PT_REGS_IP_OFFSET) as *const u64) }
            .unwrap_or(0)
    })
}

/// `page_fault_user` and `page_fault_kernel`. The kernel variant reports faults the kernel
/// takes on user memory for the process (a `read()` into a fresh buffer, for example): those
/// allocate pages too. Faults on kernel addresses are skipped. The fault joins this CPU's
/// batch (see [`try_flush`]). `ip_of` reads the faulting instruction from `regs`.
#[inline(always)]
fn try_page_fault<C: EbpfContext>(ctx: &C, ip_of: impl FnOnce(u64) -> u64) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let address = tp_arg(ctx, ARG_ADDRESS);
    if address >= USER_ADDRESS_END {
        return Ok(0);
    }
    let error_code = tp_arg(ctx, ARG_ERROR_CODE);
    let ip = ip_of(tp_arg(ctx, ARG_REGS));
    let Some(batch) = FAULT_BATCH.get_ptr_mut(0) else {
        count(Stat::LostFault);
        return Err(1);
    };
    // SAFETY: this CPU's batch. The page-fault tracepoints run with interrupts off, so
    // neither the flush program nor another fault program can run on this CPU meanwhile.
    let batch = unsafe { &mut *batch };
    // Always below FAULT_BATCH_LEN (a full batch is written at once); the check bounds the
    // index for the verifier.
    let n = batch.head.header.detail as usize;
    if n >= FAULT_BATCH_LEN {
        let _ = write_batch(batch, FAULT_BATCH_LEN);
        count(Stat::LostFault);
        return Err(1);
    }
    let ts = now_ns();
    // A not-present fault is a first touch unless the page was released or swapped out.
    if error_code as u32 & PF_PROT == 0 && stacks::fault_wants_stack() {
        stacks::emit(ctx, EventKind::Fault, tgid, tid, ts);
    }
    batch.faults[n] = fault(tgid, tid, address, ip, error_code as u32, ts);
    if n + 1 < FAULT_BATCH_LEN {
        batch.head.header.detail = (n + 1) as u32;
        return Ok(0);
    }
    write_batch(batch, FAULT_BATCH_LEN)
}

/// Writes this CPU's batch, even when empty, so that the reader knows how far this CPU's
/// faults have reached it. The daemon runs it on each CPU through `BPF_PROG_TEST_RUN`, from
/// an interrupt (an IPI, or with preemption off on the daemon's own CPU): never inside a
/// fault program, and no fault program can start on this CPU while it runs.
#[inline(always)]
pub fn try_flush() -> Result<u32, u32> {
    let Some(batch) = FAULT_BATCH.get_ptr_mut(0) else {
        return Err(1);
    };
    // SAFETY: this CPU's batch; see `try_page_fault`.
    let batch = unsafe { &mut *batch };
    let n = (batch.head.header.detail as usize).min(FAULT_BATCH_LEN);
    write_batch(batch, n)
}

/// Writes the first `n` faults of `batch` as one record, stamped with the time and CPU, and
/// empties it. A batch that does not fit is counted as `n` lost faults.
#[inline(always)]
fn write_batch(batch: &mut FaultBatch, n: usize) -> Result<u32, u32> {
    batch.head = FaultBatchHead {
        header: EventHeader {
            kind: EventKind::FaultBatch as u32,
            tgid: 0,
            tid: 0,
            detail: n as u32,
            ts_ns: now_ns(),
        },
        // SAFETY: a helper without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        _pad: 0,
    };
    // Head plus n faults, computed upward: older verifiers (6.1) lose the bounds of
    // `size_of::<FaultBatch>() - (64 - n) * 40` and refuse the ring output.
    let size = size_of::<FaultBatchHead>() + n * size_of::<FaultEvent>();
    // SAFETY: the start of the batch, `size` <= its size bytes.
    let bytes =
        unsafe { core::slice::from_raw_parts((batch as *const FaultBatch).cast::<u8>(), size) };
    let written = EVENTS.output::<[u8]>(bytes, wakeup_flags(size as u64));
    batch.head.header.detail = 0;
    if written.is_err() {
        count_n(Stat::LostFault, n as u64);
        return Err(1);
    }
    Ok(0)
}

/// The software page-fault perf event (`PERF_COUNT_SW_PAGE_FAULTS`, one sample per fault).
/// The error code is not available there. This program runs with interrupts on, where the
/// daemon's flush could interrupt it, so its faults go to the ring one by one instead.
#[inline(always)]
pub fn try_page_fault_perf(ctx: &PerfEventContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let (address, ip) = perf_fault(ctx);
    let ts = now_ns();
    // Without an error code every fault is a candidate: one in N gets a stack.
    if stacks::fault_wants_stack() {
        stacks::emit(ctx, EventKind::Fault, tgid, tid, ts);
    }
    let Some(mut entry) = EVENTS.reserve::<FaultEvent>(0) else {
        count(Stat::LostFault);
        // Returning 0 keeps the perf event from writing a sample of its own.
        return Ok(0);
    };
    entry.write(fault(tgid, tid, address, ip, FAULT_ERROR_UNKNOWN, ts));
    entry.submit(wakeup_flags(size_of::<FaultEvent>() as u64));
    Ok(0)
}

#[inline(always)]
fn fault(tgid: u32, tid: u32, address: u64, ip: u64, error_code: u32, ts_ns: u64) -> FaultEvent {
    FaultEvent {
        header: EventHeader {
            kind: EventKind::Fault as u32,
            tgid,
            tid,
            detail: error_code,
            ts_ns,
        },
        address,
        ip,
    }
}
