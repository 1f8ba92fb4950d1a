//! Where the eBPF programs read the fields of the tracepoint records they attach to. The eBPF
//! side reads at these offsets; the daemon checks them against the kernel's own `format` files
//! before it attaches, so a kernel with another layout is refused with a clear error instead of
//! being traced with wrong data. The formats are pasted as comments where each field is read.

/// One field of a tracepoint record, read at a fixed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointField {
    /// The tracepoint's category (`sched`), its directory under `events/`.
    pub category: &'static str,
    /// The tracepoint's name (`sched_process_exit`).
    pub event: &'static str,
    /// The field's name in `format`.
    pub field: &'static str,
    /// Byte offset in the record.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Where the six 8-byte argument slots of every `syscalls:sys_enter_*` record start (the
/// first slot's name is the syscall's own first argument).
pub const SYS_ENTER_ARGS_OFFSET: usize = 16;
/// Where the 8-byte `ret` sits in every `syscalls:sys_exit_*` record.
pub const SYS_EXIT_RET_OFFSET: usize = 16;

/// `task:task_newtask` `pid`: the new task.
pub const NEWTASK_PID: TracepointField = field("task", "task_newtask", "pid", 8, 4);
/// `task:task_newtask` `clone_flags`.
pub const NEWTASK_CLONE_FLAGS: TracepointField =
    field("task", "task_newtask", "clone_flags", 32, 8);
/// `sched:sched_process_exec` `filename` (a `__data_loc`).
pub const EXEC_FILENAME: TracepointField = field("sched", "sched_process_exec", "filename", 8, 4);
/// `sched:sched_process_exec` `old_pid`: the thread that called exec.
pub const EXEC_OLD_PID: TracepointField = field("sched", "sched_process_exec", "old_pid", 16, 4);
/// `sched:sched_process_exit` `group_dead`: the last thread of the process is exiting.
pub const EXIT_GROUP_DEAD: TracepointField =
    field("sched", "sched_process_exit", "group_dead", 32, 1);

/// Every fixed-layout field of the lifecycle tracepoints.
pub const LIFECYCLE_FIELDS: [TracepointField; 5] = [
    NEWTASK_PID,
    NEWTASK_CLONE_FLAGS,
    EXEC_FILENAME,
    EXEC_OLD_PID,
    EXIT_GROUP_DEAD,
];

const fn field(
    category: &'static str,
    event: &'static str,
    name: &'static str,
    offset: usize,
    size: usize,
) -> TracepointField {
    TracepointField {
        category,
        event,
        field: name,
        offset,
        size,
    }
}
