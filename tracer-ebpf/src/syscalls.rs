//! Memory syscalls, from either backend: the `syscalls:sys_{enter,exit}_*` tracepoints, or
//! fentry/fexit programs on the syscall functions (`__x64_sys_mmap`, ...), which cost nothing
//! to other syscalls (an enabled syscall tracepoint sends every task of the machine down the
//! slow syscall path). The enter program saves the arguments per thread in `PENDING`; the
//! exit program pairs them with the return value and emits one [`SyscallEvent`]. Userspace
//! attaches every exit program before its enter program, so no saved entry waits for an exit
//! that is not there.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_str_bytes},
    programs::{FEntryContext, FExitContext, TracePointContext},
};
use tracer_common::{
    EventHeader, EventKind, OpenEvent, PendingSyscall, Stat, Syscall, SyscallEvent,
    layout::{SYS_ENTER_ARGS_OFFSET, SYS_EXIT_RET_OFFSET},
};

use crate::{
    arch::SYSCALL_ARG_OFFSETS,
    commit::{self, CONSUMED},
    maps::{EVENTS, PENDING, count, ctx_u64, current_ids, is_target, now_ns, wakeup_flags},
    stacks,
};

// name: sys_enter_mmap (every sys_enter_* has this layout; unused argument slots are not read)
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:unsigned long addr;	offset:16;	size:8;	signed:0;
// 	field:unsigned long len;	offset:24;	size:8;	signed:0;
// 	field:unsigned long prot;	offset:32;	size:8;	signed:0;
// 	field:unsigned long flags;	offset:40;	size:8;	signed:0;
// 	field:unsigned long fd;	offset:48;	size:8;	signed:0;
// 	field:unsigned long off;	offset:56;	size:8;	signed:0;
// Read at `layout::SYS_ENTER_ARGS_OFFSET`; the daemon checks it against the kernel's format.

// name: sys_exit_mmap (every sys_exit_* has this layout)
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:long ret;	offset:16;	size:8;	signed:1;
// Read at `layout::SYS_EXIT_RET_OFFSET`.

/// Zero, as a value the compiler cannot see: on this target LLVM turns stores of constant
/// zeros into a call to a byte-wise `memset` (a loop of 16 iterations per entry here).
#[unsafe(no_mangle)]
static OPAQUE_ZERO: Global<u64> = Global::new(0);

/// `sys_enter_*`: the arguments from the tracepoint's record.
#[inline(always)]
pub fn try_enter(ctx: &TracePointContext, syscall: Syscall) -> Result<u32, u32> {
    enter(syscall, |i| ctx_u64(ctx, SYS_ENTER_ARGS_OFFSET + 8 * i))
}

/// fentry on the syscall function, whose one argument is the caller's `struct pt_regs`.
#[inline(always)]
pub fn try_fentry(ctx: &FEntryContext, syscall: Syscall) -> Result<u32, u32> {
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: a BTF-typed `struct pt_regs *`, which the verifier lets the program load from
    // directly at the register offsets.
    enter(syscall, |i| unsafe {
        *(regs.add(SYSCALL_ARG_OFFSETS[i]) as *const u64)
    })
}

/// `sys_exit_*`: the return value from the tracepoint's record.
#[inline(always)]
pub fn try_exit(ctx: &TracePointContext, syscall: Syscall) -> Result<u32, u32> {
    exit(ctx, syscall, || ctx_u64(ctx, SYS_EXIT_RET_OFFSET) as i64)
}

/// fexit on the syscall function: its return value follows its one argument.
#[inline(always)]
pub fn try_fexit(ctx: &FExitContext, syscall: Syscall) -> Result<u32, u32> {
    exit(ctx, syscall, || ctx.arg::<i64>(1))
}

/// Saves the arguments of `syscall` (`arg(i)` reads the i-th) for the current thread.
#[inline(always)]
fn enter(syscall: Syscall, arg: impl Fn(usize) -> u64) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    // process_madvise may name a traced process from an untraced one: userspace decides.
    if syscall != Syscall::ProcessMadvise && !is_target(tgid) {
        return Ok(0);
    }
    // Only the syscall's own argument slots are inside its record; the others are zero.
    // Read as a global, so that the zero stores below are not turned into a memset call.
    let zero = OPAQUE_ZERO.load();
    let nargs = syscall.nargs();
    let arg = |i: usize| if i < nargs { arg(i) } else { zero };
    let args = [arg(0), arg(1), arg(2), arg(3), arg(4), arg(5)];
    // process_madvise: the first iovec (base, len) of the caller's vector, enough for the
    // common vlen == 1.
    let extra = if syscall == Syscall::ProcessMadvise {
        // SAFETY: a user pointer read with the fault-tolerant helper.
        unsafe { bpf_probe_read_user(args[1] as *const [u64; 2]) }.unwrap_or_else(|_| {
            count(Stat::ReadError);
            [zero, zero]
        })
    } else {
        [zero, zero]
    };
    let commit_ts_ns = commit::at_enter_of(tgid, tid, syscall);
    let pending = PendingSyscall {
        syscall: syscall as u32,
        _pad: 0,
        enter_ts_ns: if commit_ts_ns != 0 {
            commit_ts_ns
        } else {
            now_ns()
        },
        args,
        extra,
        commit_ts_ns,
    };
    // A thread's slot is reused in place: a store is much cheaper than a map update.
    if let Some(slot) = PENDING.get_ptr_mut(tid) {
        // SAFETY: this thread's own slot; only this thread writes it while it is alive.
        unsafe { *slot = pending };
    } else if PENDING.insert(tid, pending, 0).is_err() {
        count(Stat::PendingFull);
        return Err(1);
    }
    Ok(0)
}

/// Pairs the exit of `syscall` (`ret()` reads its return value) with its saved entry and
/// emits one event.
#[inline(always)]
fn exit<C: EbpfContext>(ctx: &C, syscall: Syscall, ret: impl Fn() -> i64) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    // The filter first: a process that is not traced costs no more here.
    let traced = is_target(tgid);
    if !traced && syscall != Syscall::ProcessMadvise {
        return Ok(0);
    }
    let Some(saved) = PENDING.get_ptr_mut(tid) else {
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
        // No entry for this call: it was in flight when tracing started (or after it ended).
        if traced {
            count(Stat::ExitWithoutEnter);
        }
        return Ok(0);
    }
    let ret = ret();
    if syscall == Syscall::Openat {
        return emit_open(tgid, tid, &pending, ret);
    }
    // The stack first: the syscall's record follows it in the ring.
    if traced && stacks::syscall_stacks() {
        stacks::emit(ctx, EventKind::Syscall, tgid, tid, pending.enter_ts_ns);
    }
    let Some(mut entry) = EVENTS.reserve::<SyscallEvent>(0) else {
        count(Stat::LostSyscall);
        return Err(1);
    };
    entry.write(SyscallEvent {
        header: EventHeader::new(EventKind::Syscall, tgid, tid, syscall as u32, now_ns()),
        enter_ts_ns: pending.enter_ts_ns,
        args: pending.args,
        ret,
        extra: pending.extra,
        commit_ts_ns: pending.commit_ts_ns,
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
        count(Stat::LostOpen);
        return Err(1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of this size.
    unsafe {
        (*event).header = EventHeader::new(EventKind::Open, tgid, tid, ret as u32, now_ns());
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
