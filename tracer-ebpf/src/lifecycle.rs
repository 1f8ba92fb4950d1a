//! Process lifecycle: new processes (and `--follow`), exec, and the exit of a whole process.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, generated::bpf_send_signal},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use tracer_common::{
    EventHeader, EventKind, ExecEvent, ExitEvent, ForkEvent, Stat, TARGET_FOLLOW_FORKS,
    TARGET_STOP_AT_EXEC, layout::FIELD_ABSENT,
};

use crate::{
    arch::SIGSTOP,
    maps::{
        EVENTS, EXEC_STOPS, PENDING, TARGETS, count, current_ids, is_target, layout, live_threads,
        now_ns, targets_changed,
    },
};

/// Reads a `T` at `offset` of the tracepoint record; a missing field is an error.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, u32> {
    if offset == FIELD_ABSENT {
        count(Stat::ReadError);
        return Err(1);
    }
    // SAFETY: the daemon found a field of this size at `offset` in the kernel's format.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|_| {
        count(Stat::ReadError);
        1u32
    })
}

const CLONE_THREAD: u64 = 0x0001_0000;
const CLONE_NEWPID: u64 = 0x2000_0000;

// name: task_newtask
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:pid_t pid;	offset:8;	size:4;	signed:1;
// 	field:char comm[16];	offset:12;	size:16;	signed:0;
// 	field:u64 clone_flags;	offset:32;	size:8;	signed:0;
// 	field:short oom_score_adj;	offset:40;	size:2;	signed:1;
// (5.10 to 7.2 alike.) Read at the offsets the daemon found in the kernel's format.
/// `task:task_newtask`. It runs in the parent, inside `copy_process`, before the child is
/// woken: a followed child is in `TARGETS` before it runs a single instruction.
#[inline(always)]
pub fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    let Some(flags) = TARGETS.get_ptr(tgid) else {
        return Ok(0);
    };
    // SAFETY: a live map value, copied.
    let flags = unsafe { *flags };
    let at = layout();
    let child: i32 = field(ctx, at.newtask_pid)?;
    let clone_flags: u64 = field(ctx, at.newtask_clone_flags)?;
    new_task(ctx, (tgid, tid), flags, child as u32, clone_flags)
}

// The raw `task_newtask` (include/trace/events/task.h):
// TP_PROTO(struct task_struct *task, unsigned long clone_flags)
const RAW_ARG_TASK: usize = 0;
const RAW_ARG_CLONE_FLAGS: usize = 1;

/// `task_newtask`, raw, for a daemon in a PID namespace of its own: the record's `pid` is the
/// kernel's, so the child's pid in the namespace is read from the task itself,
/// `task->thread_pid->numbers[level].nr` (offsets from BTF).
#[inline(always)]
pub fn try_task_newtask_raw(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    let Some(flags) = TARGETS.get_ptr(tgid) else {
        return Ok(0);
    };
    // SAFETY: a live map value, copied.
    let flags = unsafe { *flags };
    let task: u64 = ctx.arg(RAW_ARG_TASK);
    let clone_flags: u64 = ctx.arg(RAW_ARG_CLONE_FLAGS);
    if clone_flags & CLONE_NEWPID != 0 {
        // The child lives in a namespace nested in the daemon's: its pids are not ours, and
        // the programs do not see it.
        return Ok(0);
    }
    let at = layout();
    if at.task_thread_pid == FIELD_ABSENT || at.pid_level == FIELD_ABSENT {
        count(Stat::ReadError);
        return Err(1);
    }
    // SAFETY: kernel pointers read with the fault-tolerant helper, at offsets from BTF.
    let child = unsafe {
        let pid: u64 = bpf_probe_read_kernel(
            (task as *const u8).add(at.task_thread_pid as usize) as *const u64
        )
        .map_err(|_| read_error())?;
        let pid = pid as *const u8;
        let level: u32 = bpf_probe_read_kernel(pid.add(at.pid_level as usize) as *const u32)
            .map_err(|_| read_error())?;
        // Bounded for the verifier; namespaces nest at most 32 deep (MAX_PID_NS_LEVEL).
        let number = (at.pid_numbers + (level & 63) * at.upid_size) as usize;
        bpf_probe_read_kernel(pid.add(number) as *const u32).map_err(|_| read_error())?
    };
    new_task(ctx, (tgid, tid), flags, child, clone_flags)
}

fn read_error() -> u32 {
    count(Stat::ReadError);
    1
}

/// A new task `child` of the traced process `tgid` (thread `tid`, its `TARGET_*` `flags`): a
/// new process is followed if its parent is, and reported.
#[inline(always)]
fn new_task<C: EbpfContext>(
    ctx: &C,
    (tgid, tid): (u32, u32),
    flags: u32,
    child: u32,
    clone_flags: u64,
) -> Result<u32, u32> {
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(0); // a thread shares the traced address space and tgid
    }
    // A child inherits following, never the one-shot stop at exec.
    let flags = flags & !TARGET_STOP_AT_EXEC;
    let mut followed = 0;
    if flags & TARGET_FOLLOW_FORKS != 0 {
        if TARGETS.insert(child, flags, BPF_NOEXIST as u64).is_ok() {
            targets_changed();
            followed = 1;
        } else {
            count(Stat::TargetsFull);
            warn!(ctx, "vmatrace: cannot follow child {} of {}", child, tgid);
        }
    }
    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    entry.write(ForkEvent {
        header: EventHeader::new(EventKind::Fork, tgid, tid, 0, now_ns()),
        child_pid: child,
        followed,
        clone_flags,
    });
    // Rare and waited for (the launched child is stopped at exec): wake the reader now.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    Ok(0)
}

// name: sched_process_exec
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:__data_loc char[] filename;	offset:8;	size:4;	signed:0;
// 	field:pid_t pid;	offset:12;	size:4;	signed:1;
// 	field:pid_t old_pid;	offset:16;	size:4;	signed:1;
// (5.10 to 7.2 alike.) Read at the offsets the daemon found in the kernel's format.
/// `sched:sched_process_exec`: the address space was replaced.
#[inline(always)]
pub fn try_exec(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    // The filter, not the map alone: a process of the traced cgroup joins at its exec.
    if !is_target(tgid) {
        return Ok(0);
    }
    let Some(flags) = TARGETS.get_ptr(tgid) else {
        return Ok(0);
    };
    // SAFETY: a live map value, read once.
    let stop = unsafe { *flags } & TARGET_STOP_AT_EXEC != 0;
    let at = layout();
    let loc: u32 = field(ctx, at.exec_filename)?;
    let old_pid: i32 = field(ctx, at.exec_old_pid)?;
    // Stamped after the reservation, as every record but fault batches, so that the ring
    // holds them in time order.
    let entry = EVENTS.reserve::<ExecEvent>(0);
    let ts = now_ns();
    if stop {
        // Recorded first: a process is stopped only when whoever may continue it can tell
        // (the daemon also finds stops whose exec event the full ring lost).
        if EXEC_STOPS.insert(tgid, ts, 0).is_err() {
            warn!(ctx, "vmatrace: cannot record the stop of {} at exec", tgid);
        // Delivered on the return to user mode: before the new image's first instruction.
        // SAFETY: a helper that signals the current task.
        } else if unsafe { bpf_send_signal(SIGSTOP) } != 0 {
            let _ = EXEC_STOPS.remove(tgid);
            warn!(ctx, "vmatrace: cannot stop {} at exec", tgid);
        }
    }
    let Some(mut entry) = entry else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of this size.
    unsafe {
        (*event).header = EventHeader::new(EventKind::Exec, tgid, tid, old_pid as u32, ts);
        (*event).filename[0] = 0;
        // __data_loc: the low 16 bits are the offset of the string in the record.
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        if bpf_probe_read_kernel_str_bytes(src, &mut (*event).filename).is_err() {
            (*event).filename[0] = 0;
            count(Stat::ReadError);
        }
    }
    // Rare and waited for (the launched child is stopped at exec): wake the reader now.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    Ok(0)
}

// name: sched_process_exit
// format:
// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;
//
// 	field:char comm[16];	offset:8;	size:16;	signed:0;
// 	field:pid_t pid;	offset:24;	size:4;	signed:1;
// 	field:int prio;	offset:28;	size:4;	signed:1;
// 	field:bool group_dead;	offset:32;	size:1;	signed:0;
// `group_dead` is there on recent kernels only (6.18, 7.2; not 5.10, 6.1, 6.12), see
// `group_dead` below.
/// `sched:sched_process_exit` of the last thread: the process is gone, so its tgid leaves the
/// filter (a later process that reuses the pid is not traced).
#[inline(always)]
pub fn try_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if TARGETS.get_ptr(tgid).is_none() {
        return Ok(0);
    }
    // A thread killed inside a syscall never reaches its exit program.
    let _ = PENDING.remove(tid);
    if !group_dead(ctx)? {
        return Ok(0);
    }
    // Without `group_dead`, several of the last threads may see the group dead at once: the
    // one whose removal succeeds reports the exit.
    if TARGETS.remove(tgid).is_err() {
        return Ok(0);
    }
    targets_changed();
    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    entry.write(ExitEvent {
        header: EventHeader::new(EventKind::Exit, tgid, tid, 0, now_ns()),
    });
    // Rare and waited for (the launched child is stopped at exec): wake the reader now.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    Ok(0)
}

/// Whether the exiting thread's process is gone: the tracepoint's `group_dead` where the
/// kernel has it; else `current->signal->live == 0`. `do_exit` decrements `live` before this
/// tracepoint, so it is 0 once every thread of the group has passed that point (and none
/// runs user code again); it is what `group_dead` is computed from.
#[inline(always)]
fn group_dead(ctx: &TracePointContext) -> Result<bool, u32> {
    let at = layout();
    if at.exit_group_dead != FIELD_ABSENT {
        return Ok(field::<u8>(ctx, at.exit_group_dead)? != 0);
    }
    match live_threads() {
        Some(live) => Ok(live == 0),
        None => {
            count(Stat::ReadError);
            Err(1)
        }
    }
}
