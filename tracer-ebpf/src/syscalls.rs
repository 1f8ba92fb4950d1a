//! Memory syscalls, from the two raw syscall tracepoints. The enter program saves the
//! arguments of a traced call per thread in `PENDING`; the exit program pairs them with the
//! return value and emits one [`SyscallEvent`]. Userspace attaches the exit program before the
//! enter program, so no saved entry waits for an exit that is not there.
//!
//! Attached raw, the programs run for every syscall on the machine but cost little: no perf
//! record is built, and a call that is not a memory syscall is dismissed by its number before
//! anything else. (The per-syscall `syscalls:sys_enter_*` tracepoints cost about twice as much
//! per traced call; docs/benchmarks.md has the numbers.)

use core::mem::offset_of;

use aya_ebpf::{
    helpers::{bpf_probe_read_user, bpf_probe_read_user_str_bytes},
    programs::RawTracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    EventHeader, EventKind, OpenEvent, PendingSyscall, Stat, Syscall, SyscallEvent,
};

use crate::{
    maps::{EVENTS, PENDING, count, current_ids, is_target, now_ns, wakeup_flags},
    regs::PtRegs,
};

// raw_syscalls:sys_enter and raw_syscalls:sys_exit, attached raw. Their arguments
// (include/trace/events/syscalls.h):
// TRACE_EVENT_FN(sys_enter, TP_PROTO(struct pt_regs *regs, long id), ...)
// TRACE_EVENT_FN(sys_exit, TP_PROTO(struct pt_regs *regs, long ret), ...)
// and, for reference, the record format the programs do not read:
// name: sys_enter
// format:
// 	field:long id;	offset:8;	size:8;	signed:1;
// 	field:unsigned long args[6];	offset:16;	size:48;	signed:0;
// name: sys_exit
// format:
// 	field:long id;	offset:8;	size:8;	signed:1;
// 	field:long ret;	offset:16;	size:8;	signed:0;
const RAW_ARG_REGS: usize = 0;
/// `id` at enter, `ret` at exit.
const RAW_ARG_ID_OR_RET: usize = 1;

/// A `PendingSyscall::syscall` value that matches no syscall: the slot's entry was used.
const CONSUMED: u32 = u32::MAX;

/// Saves the arguments of a traced memory syscall for the current thread.
#[inline(always)]
pub fn try_enter(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let nr: u64 = ctx.arg(RAW_ARG_ID_OR_RET);
    let Some(syscall) = Syscall::from_x86_64_nr(nr) else {
        return Ok(0);
    };
    let (tgid, tid) = current_ids();
    // process_madvise may name a traced process from an untraced one: userspace decides.
    if syscall != Syscall::ProcessMadvise && !is_target(tgid) {
        return Ok(0);
    }
    let Some(regs) = PtRegs::read(ctx.arg(RAW_ARG_REGS)) else {
        count(Stat::ReadError);
        return Err(1);
    };
    // A 32-bit call whose number happens to be a 64-bit memory syscall's (i386 11 is execve,
    // x86-64 11 is munmap). The per-syscall tracepoints skip compat calls; so does vmatrace.
    if regs.is_compat_syscall() {
        return Ok(0);
    }
    // Only the syscall's own arguments: the other registers hold whatever the caller left.
    // (Built element by element: a zeroed array and a loop become a byte-wise memset call.)
    let all = regs.syscall_args();
    let nargs = syscall.nargs();
    let arg = |i: usize| if i < nargs { all[i] } else { 0 };
    // process_madvise: the first iovec (base, len) of the caller's vector, enough for the
    // common vlen == 1.
    let extra = if syscall == Syscall::ProcessMadvise {
        // SAFETY: a user pointer read with the fault-tolerant helper.
        unsafe { bpf_probe_read_user(all[1] as *const [u64; 2]) }.unwrap_or_else(|_| {
            count(Stat::ReadError);
            [0, 0]
        })
    } else {
        [0, 0]
    };
    let pending = PendingSyscall {
        syscall: syscall as u32,
        _pad: 0,
        enter_ts_ns: now_ns(),
        args: [arg(0), arg(1), arg(2), arg(3), arg(4), arg(5)],
        extra,
    };
    // A thread's slot is reused in place: a store is much cheaper than a map update.
    if let Some(slot) = PENDING.get_ptr_mut(&tid) {
        // SAFETY: this thread's own slot; only this thread writes it while it is alive.
        unsafe { *slot = pending };
    } else if PENDING.insert(&tid, &pending, 0).is_err() {
        count(Stat::PendingFull);
        warn!(ctx, "vmatrace: cannot save syscall entry of tid {}", tid);
        return Err(1);
    }
    Ok(0)
}

/// Pairs the exit of a memory syscall with its saved entry and emits one event.
#[inline(always)]
pub fn try_exit(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let regs: u64 = ctx.arg(RAW_ARG_REGS);
    // The number is not an argument of sys_exit: it stays in orig_ax.
    let Some(nr) = PtRegs::read_field(regs, offset_of!(PtRegs, orig_ax)) else {
        return Ok(0);
    };
    let Some(syscall) = Syscall::from_x86_64_nr(nr) else {
        return Ok(0);
    };
    let (tgid, tid) = current_ids();
    // The (cached) filter first: a process that is not traced costs no look-up here.
    let traced = is_target(tgid);
    if !traced && syscall != Syscall::ProcessMadvise {
        return Ok(0);
    }
    let Some(saved) = PENDING.get_ptr_mut(&tid) else {
        if traced {
            count(Stat::ExitWithoutEnter);
        }
        return Ok(0);
    };
    // SAFETY: this thread's own slot: copied out, then marked consumed (the slot stays for the
    // thread's next call; the thread's exit removes it).
    let pending = unsafe { *saved };
    unsafe { (*saved).syscall = CONSUMED };
    if pending.syscall != syscall as u32 {
        // No entry for this call: it was in flight when tracing started (or after it ended),
        // or it is a compat call, which the enter program skips on purpose.
        if traced && !PtRegs::read(regs).is_some_and(|r| r.is_compat_syscall()) {
            count(Stat::ExitWithoutEnter);
        }
        return Ok(0);
    }
    let ret: i64 = ctx.arg(RAW_ARG_ID_OR_RET);
    if syscall == Syscall::Openat {
        return emit_open(tgid, tid, &pending, ret);
    }
    let Some(mut entry) = EVENTS.reserve::<SyscallEvent>(0) else {
        count(Stat::LostSyscall);
        return Err(1);
    };
    entry.write(SyscallEvent {
        header: EventHeader {
            kind: EventKind::Syscall as u32,
            tgid,
            tid,
            detail: syscall as u32,
            ts_ns: now_ns(),
        },
        enter_ts_ns: pending.enter_ts_ns,
        args: pending.args,
        ret,
        extra: pending.extra,
    });
    entry.submit(wakeup_flags(size_of::<SyscallEvent>() as u64));
    Ok(0)
}

/// `openat` that returned fd `ret`: the path it opened (args[1], still in the caller's memory).
#[inline(always)]
fn emit_open(tgid: u32, tid: u32, pending: &PendingSyscall, ret: i64) -> Result<u32, u32> {
    if ret < 0 {
        return Ok(0);
    }
    let Some(mut entry) = EVENTS.reserve::<OpenEvent>(0) else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of this size.
    unsafe {
        (*event).header = EventHeader {
            kind: EventKind::Open as u32,
            tgid,
            tid,
            detail: ret as u32,
            ts_ns: now_ns(),
        };
        (*event).path[0] = 0;
        if bpf_probe_read_user_str_bytes(pending.args[1] as *const u8, &mut (*event).path).is_err()
        {
            (*event).path[0] = 0;
            count(Stat::ReadError);
        }
    }
    entry.submit(wakeup_flags(size_of::<OpenEvent>() as u64));
    Ok(0)
}
