//! Process lifecycle: new processes (and `--follow`), exec, and the exit of a whole process.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_send_signal},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    EventHeader, EventKind, ExecEvent, ExitEvent, ForkEvent, Stat, TARGET_FOLLOW_FORKS,
    TARGET_STOP_AT_EXEC, layout,
};

use crate::maps::{EVENTS, PENDING, TARGETS, count, current_ids, now_ns, targets_changed};

const CLONE_THREAD: u64 = 0x0001_0000;
const SIGSTOP: u32 = 19;

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
// Read at `layout::NEWTASK_*`; the daemon checks those against the kernel's format.
/// `task:task_newtask`. It runs in the parent, inside `copy_process`, before the child is
/// woken: a followed child is in `TARGETS` before it runs a single instruction.
#[inline(always)]
pub fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    let Some(flags) = TARGETS.get_ptr(&tgid) else {
        return Ok(0);
    };
    // SAFETY: a live map value, copied.
    // A child inherits following, never the one-shot stop at exec.
    let flags = unsafe { *flags } & !TARGET_STOP_AT_EXEC;
    // SAFETY: offsets and sizes match the format above.
    let (child, clone_flags) = unsafe {
        (
            ctx.read_at::<i32>(layout::NEWTASK_PID.offset),
            ctx.read_at::<u64>(layout::NEWTASK_CLONE_FLAGS.offset),
        )
    };
    let (Ok(child), Ok(clone_flags)) = (child, clone_flags) else {
        count(Stat::ReadError);
        return Err(1);
    };
    if clone_flags & CLONE_THREAD != 0 {
        return Ok(0); // a thread shares the traced address space and tgid
    }
    let child = child as u32;
    let mut followed = 0;
    if flags & TARGET_FOLLOW_FORKS != 0 {
        if TARGETS.insert(&child, &flags, BPF_NOEXIST as u64).is_ok() {
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
        header: header(EventKind::Fork, tgid, tid, 0),
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
// Read at `layout::EXEC_*`.
/// `sched:sched_process_exec`: the address space was replaced.
#[inline(always)]
pub fn try_exec(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    let Some(flags) = TARGETS.get_ptr(&tgid) else {
        return Ok(0);
    };
    // SAFETY: a live map value, read once.
    if unsafe { *flags } & TARGET_STOP_AT_EXEC != 0 {
        // Delivered on the return to user mode: before the new image's first instruction.
        // SAFETY: a helper that signals the current task.
        if unsafe { bpf_send_signal(SIGSTOP) } != 0 {
            warn!(ctx, "vmatrace: cannot stop {} at exec", tgid);
        }
    }
    // SAFETY: offsets and sizes match the format above.
    let (loc, old_pid) = unsafe {
        (
            ctx.read_at::<u32>(layout::EXEC_FILENAME.offset),
            ctx.read_at::<i32>(layout::EXEC_OLD_PID.offset),
        )
    };
    let (Ok(loc), Ok(old_pid)) = (loc, old_pid) else {
        count(Stat::ReadError);
        return Err(1);
    };
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring-buffer slot of this size.
    unsafe {
        (*event).header = header(EventKind::Exec, tgid, tid, old_pid as u32);
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
// Read at `layout::EXIT_GROUP_DEAD`.
/// `sched:sched_process_exit` of the last thread: the process is gone, so its tgid leaves the
/// filter (a later process that reuses the pid is not traced).
#[inline(always)]
pub fn try_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if TARGETS.get_ptr(&tgid).is_none() {
        return Ok(0);
    }
    // SAFETY: offset and size match the format above.
    let group_dead =
        unsafe { ctx.read_at::<u8>(layout::EXIT_GROUP_DEAD.offset) }.map_err(|_| {
            count(Stat::ReadError);
            1u32
        })?;
    // A thread killed inside a syscall never reaches its exit program.
    let _ = PENDING.remove(&tid);
    if group_dead == 0 {
        return Ok(0);
    }
    let _ = TARGETS.remove(&tgid);
    targets_changed();
    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        count(Stat::LostLifecycle);
        return Err(1);
    };
    entry.write(ExitEvent {
        header: header(EventKind::Exit, tgid, tid, 0),
    });
    // Rare and waited for (the launched child is stopped at exec): wake the reader now.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    Ok(0)
}

#[inline(always)]
fn header(kind: EventKind, tgid: u32, tid: u32, detail: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid,
        tid,
        detail,
        ts_ns: now_ns(),
    }
}
