//! User page faults, from either backend: the `exceptions:page_fault_user` tracepoint or a BPF
//! program on the software page-fault perf event (for kernels or architectures without the
//! tracepoint). Both emit the same compact [`FaultEvent`].

use aya_ebpf::programs::{PerfEventContext, TracePointContext};
use tracer_common::{EventHeader, EventKind, FAULT_ERROR_UNKNOWN, FaultEvent, Stat};

use crate::maps::{EVENTS, count, current_ids, is_target, now_ns, wakeup_flags};

// name: page_fault_user (page_fault_kernel has the same format)
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:unsigned long address;	offset:8;	size:8;	signed:0;
// 	field:unsigned long ip;	offset:16;	size:8;	signed:0;
// 	field:unsigned long error_code;	offset:24;	size:8;	signed:0;
/// The fields of `exceptions:page_fault_user` after the common header.
#[repr(C)]
struct PageFaultUserArgs {
    address: u64,
    ip: u64,
    error_code: u64,
}
const PAGE_FAULT_USER_ARGS_OFFSET: usize = 8;

/// The end of the user half of the x86-64 address space.
const USER_ADDRESS_END: u64 = 0x0000_8000_0000_0000;

/// `exceptions:page_fault_user` and `exceptions:page_fault_kernel` (same format). The kernel
/// variant reports faults the kernel takes on user memory for the process (a `read()` into a
/// fresh buffer, for example): those allocate pages too. Faults on kernel addresses are skipped.
#[inline(always)]
pub fn try_page_fault(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    // SAFETY: the offset and size match the format above.
    let args: PageFaultUserArgs =
        unsafe { ctx.read_at(PAGE_FAULT_USER_ARGS_OFFSET) }.map_err(|_| {
            count(Stat::ReadError);
            1u32
        })?;
    if args.address >= USER_ADDRESS_END {
        return Ok(0);
    }
    emit(tgid, tid, args.address, args.ip, args.error_code as u32)
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
    entry.submit(wakeup_flags());
    Ok(0)
}
