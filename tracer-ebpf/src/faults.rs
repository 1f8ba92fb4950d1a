//! User page faults, from either backend: the `exceptions:page_fault_user` tracepoint or a BPF
//! program on the software page-fault perf event (for kernels or architectures without the
//! tracepoint). Both emit the same compact [`FaultEvent`].

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    programs::{PerfEventContext, RawTracePointContext},
};
use tracer_common::{EventHeader, EventKind, FAULT_ERROR_UNKNOWN, FaultEvent, Stat};

use crate::maps::{EVENTS, count, current_ids, is_target, now_ns, wakeup_flags};

// The x86 exception tracepoints, attached raw (no perf record is built, which halves their
// cost). Their format, for reference:
// name: page_fault_user (page_fault_kernel has the same)
// format:
// 	field:unsigned long address;	offset:8;	size:8;	signed:0;
// 	field:unsigned long ip;	offset:16;	size:8;	signed:0;
// 	field:unsigned long error_code;	offset:24;	size:8;	signed:0;
// and their raw arguments (arch/x86/include/asm/trace/exceptions.h):
// TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
const RAW_ARG_ADDRESS: usize = 0;
const RAW_ARG_REGS: usize = 1;
const RAW_ARG_ERROR_CODE: usize = 2;
/// Offset of `ip` in x86-64 `struct pt_regs` (after r15..di and orig_ax: 16 registers).
const PT_REGS_IP_OFFSET: usize = 16 * 8;

/// The end of the user half of the x86-64 address space.
const USER_ADDRESS_END: u64 = 0x0000_8000_0000_0000;

/// `page_fault_user` and `page_fault_kernel`, raw. The kernel variant reports faults the
/// kernel takes on user memory for the process (a `read()` into a fresh buffer, for example):
/// those allocate pages too. Faults on kernel addresses are skipped.
#[inline(always)]
pub fn try_page_fault(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    let address: u64 = ctx.arg(RAW_ARG_ADDRESS);
    if address >= USER_ADDRESS_END {
        return Ok(0);
    }
    let regs: u64 = ctx.arg(RAW_ARG_REGS);
    let error_code: u64 = ctx.arg(RAW_ARG_ERROR_CODE);
    // SAFETY: a kernel pointer read with the fault-tolerant helper.
    let ip = unsafe { bpf_probe_read_kernel((regs as usize + PT_REGS_IP_OFFSET) as *const u64) }
        .unwrap_or(0);
    emit(tgid, tid, address, ip, error_code as u32)
}

/// The software page-fault perf event (`PERF_COUNT_SW_PAGE_FAULTS`, one sample per fault).
/// The error code is not available there.
#[inline(always)]
pub fn try_page_fault_perf(ctx: &PerfEventContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    // SAFETY: `ctx.ctx` is the program's context; `addr` and `regs` may be read directly.
    let (address, ip) = unsafe { ((*ctx.ctx).addr, (*ctx.ctx).regs.rip) };
    emit(tgid, tid, address, ip, FAULT_ERROR_UNKNOWN)?;
    // Returning 0 keeps the perf event from writing a sample of its own.
    Ok(0)
}

#[inline(always)]
fn emit(tgid: u32, tid: u32, address: u64, ip: u64, error_code: u32) -> Result<u32, u32> {
    let Some(mut entry) = EVENTS.reserve::<FaultEvent>(0) else {
        count(Stat::LostFault);
        return Err(1);
    };
    entry.write(FaultEvent {
        header: EventHeader {
            kind: EventKind::Fault as u32,
            tgid,
            tid,
            detail: error_code,
            ts_ns: now_ns(),
        },
        address,
        ip,
    });
    entry.submit(wakeup_flags(size_of::<FaultEvent>() as u64));
    Ok(0)
}
