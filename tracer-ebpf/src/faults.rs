//! User page faults, from either backend: the `exceptions:page_fault_user` tracepoint or a BPF
//! program on the software page-fault perf event (for kernels or architectures without the
//! tracepoint). Both emit the same compact [`FaultEvent`]; the tracepoint backend gathers them
//! per CPU into a [`FaultBatch`] first, which saves a ring-buffer reservation per fault.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel,
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext},
};
use tracer_common::{EventHeader, EventKind, FAULT_ERROR_UNKNOWN, FaultEvent, PF_PROT, Stat};

use crate::{
    arch::{
        FAULT_ARG_ADDRESS, FAULT_ARG_ERROR_CODE, FAULT_ARG_REGS, PT_REGS_IP_OFFSET,
        USER_ADDRESS_END, perf_fault,
    },
    batch,
    maps::{
        EVENTS, FAULT_BATCH, count, current_ids, is_target_cached, now_ns, tp_arg, wakeup_flags,
    },
    stacks,
};

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
    if !is_target_cached(tgid) || stacks::own_fault(tid) {
        return Ok(0);
    }
    let address = tp_arg(ctx, FAULT_ARG_ADDRESS);
    if address >= USER_ADDRESS_END {
        return Ok(0);
    }
    let error_code = tp_arg(ctx, FAULT_ARG_ERROR_CODE);
    let ip = ip_of(tp_arg(ctx, FAULT_ARG_REGS));
    let Some(batch) = FAULT_BATCH.get_ptr_mut(0) else {
        count(Stat::LostFault);
        return Err(1);
    };
    // SAFETY: this CPU's batch. The page-fault tracepoints run with interrupts off, so
    // neither the flush program nor another fault program can run on this CPU meanwhile (a
    // fault inside this program's own stack read returns above, at `own_fault`).
    let batch = unsafe { &mut *batch };
    let ts = now_ns();
    // A not-present fault is a first touch unless the page was released or swapped out.
    if error_code as u32 & PF_PROT == 0 && stacks::fault_wants_stack() {
        stacks::emit(ctx, EventKind::Fault, tgid, tid, ts);
    }
    batch::push(batch, fault(tgid, tid, address, ip, error_code as u32, ts))
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
    batch::flush(unsafe { &mut *batch })
}

/// The software page-fault perf event (`PERF_COUNT_SW_PAGE_FAULTS`, one sample per fault).
/// The error code is not available there. This program runs with interrupts on, where the
/// daemon's flush could interrupt it, so its faults go to the ring one by one instead.
#[inline(always)]
pub fn try_page_fault_perf(ctx: &PerfEventContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target_cached(tgid) || stacks::own_fault(tid) {
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
        header: EventHeader::new(EventKind::Fault, tgid, tid, error_code, ts_ns),
        address,
        ip,
    }
}
