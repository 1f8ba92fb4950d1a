//! vmatrace's eBPF programs: entry points only. Each one calls a `try_*` function that returns
//! `Result<u32, u32>`; the logic lives in `syscalls`, `faults` and `lifecycle`, the maps in
//! `maps`.
#![no_std]
#![no_main]
// `atomic_xadd`: the only atomic add the bpfel target offers (see `maps::targets_changed`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod arch;
mod batch;
mod commit;
mod faults;
mod heap;
mod lifecycle;
mod maps;
mod python;
mod stacks;
mod syscalls;

use aya_ebpf::{
    macros::{
        btf_tracepoint, fentry, fexit, perf_event, raw_tracepoint, tracepoint, uprobe, uretprobe,
    },
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, PerfEventContext, ProbeContext,
        RawTracePointContext, RetProbeContext, TracePointContext,
    },
};
use tracer_common::Syscall;

/// Per traced syscall: one `sys_enter_*` and one `sys_exit_*` program, named after the
/// tracepoint they attach to, and one `fentry_*` and one `fexit_*` program for the syscall
/// function (whose name differs by architecture; the daemon gives it at load).
macro_rules! syscall_programs {
    ($($enter:ident, $exit:ident, $fentry:ident, $fexit:ident => $syscall:expr;)*) => {$(
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            match syscalls::try_enter(&ctx, $syscall) {
                Ok(ret) | Err(ret) => ret,
            }
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            match syscalls::try_exit(&ctx, $syscall) {
                Ok(ret) | Err(ret) => ret,
            }
        }

        #[fentry]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            match syscalls::try_fentry(&ctx, $syscall) {
                Ok(_) | Err(_) => 0,
            }
        }

        #[fexit]
        pub fn $fexit(ctx: FExitContext) -> u32 {
            match syscalls::try_fexit(&ctx, $syscall) {
                Ok(_) | Err(_) => 0,
            }
        }
    )*};
}

syscall_programs! {
    sys_enter_brk, sys_exit_brk, fentry_brk, fexit_brk => Syscall::Brk;
    sys_enter_mmap, sys_exit_mmap, fentry_mmap, fexit_mmap => Syscall::Mmap;
    sys_enter_munmap, sys_exit_munmap, fentry_munmap, fexit_munmap => Syscall::Munmap;
    sys_enter_mremap, sys_exit_mremap, fentry_mremap, fexit_mremap => Syscall::Mremap;
    sys_enter_mprotect, sys_exit_mprotect, fentry_mprotect, fexit_mprotect => Syscall::Mprotect;
    sys_enter_pkey_mprotect, sys_exit_pkey_mprotect, fentry_pkey_mprotect, fexit_pkey_mprotect => Syscall::PkeyMprotect;
    sys_enter_madvise, sys_exit_madvise, fentry_madvise, fexit_madvise => Syscall::Madvise;
    sys_enter_process_madvise, sys_exit_process_madvise, fentry_process_madvise, fexit_process_madvise => Syscall::ProcessMadvise;
    sys_enter_shmat, sys_exit_shmat, fentry_shmat, fexit_shmat => Syscall::Shmat;
    sys_enter_shmdt, sys_exit_shmdt, fentry_shmdt, fexit_shmdt => Syscall::Shmdt;
    sys_enter_openat, sys_exit_openat, fentry_openat, fexit_openat => Syscall::Openat;
    sys_enter_mlock, sys_exit_mlock, fentry_mlock, fexit_mlock => Syscall::Mlock;
    sys_enter_mlock2, sys_exit_mlock2, fentry_mlock2, fexit_mlock2 => Syscall::Mlock2;
    sys_enter_munlock, sys_exit_munlock, fentry_munlock, fexit_munlock => Syscall::Munlock;
    sys_enter_mlockall, sys_exit_mlockall, fentry_mlockall, fexit_mlockall => Syscall::Mlockall;
    sys_enter_munlockall, sys_exit_munlockall, fentry_munlockall, fexit_munlockall
        => Syscall::Munlockall;
}

/// The page-fault tracepoints as BTF tracepoints, where the kernel loads them (the cheaper
/// pair); else the raw pair below. Named so that the kernel's 15-character program names
/// are the tracepoints' own.
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user_btf(ctx: BtfTracePointContext) -> i32 {
    match faults::try_page_fault_btf(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[btf_tracepoint(function = "page_fault_kernel")]
pub fn page_fault_kernel_btf(ctx: BtfTracePointContext) -> i32 {
    match faults::try_page_fault_btf(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    match faults::try_page_fault_raw(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> i32 {
    match faults::try_page_fault_raw(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

/// `mmap_lock:mmap_lock_acquire_returned`, where a memory syscall's change is ordered (see
/// `commit`). Its arguments changed in 6.14: `(mm, memcg_path, write, success)` before,
/// `(mm, write, success)` from then. The daemon attaches the first variant and, where the
/// kernel refuses it (it reads past the arguments), the second.
#[raw_tracepoint(tracepoint = "mmap_lock_acquire_returned")]
pub fn mmap_lock_memcg(ctx: RawTracePointContext) -> i32 {
    match commit::try_lock_acquired(maps::tp_arg(&ctx, 2), maps::tp_arg(&ctx, 3)) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[raw_tracepoint(tracepoint = "mmap_lock_acquire_returned")]
pub fn mmap_lock(ctx: RawTracePointContext) -> i32 {
    match commit::try_lock_acquired(maps::tp_arg(&ctx, 1), maps::tp_arg(&ctx, 2)) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

/// Writes this CPU's fault batch. Not attached: the daemon runs it on each CPU in turn
/// (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`) before it reads the ring.
#[raw_tracepoint]
pub fn fault_flush(_ctx: RawTracePointContext) -> i32 {
    match faults::try_flush() {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[perf_event]
pub fn page_fault_perf(ctx: PerfEventContext) -> u32 {
    // Always 0: the perf event must not write samples of its own.
    let _ = faults::try_page_fault_perf(&ctx);
    0
}

/// Allocator functions (`--heap`): one program per kind of entry and return; the daemon
/// attaches each to the functions it fits (`chunk`: glibc's block headers are read;
/// `memptr`: `posix_memalign`).
macro_rules! heap_programs {
    ($($entry:ident => $echunk:expr, $ememptr:expr;)* / $($ret:ident => $rchunk:expr, $rmemptr:expr;)*) => {
        $(
            #[uprobe]
            pub fn $entry(ctx: ProbeContext) -> u32 {
                let _ = heap::try_entry(&ctx, $echunk, $ememptr);
                0
            }
        )*
        $(
            #[uretprobe]
            pub fn $ret(ctx: RetProbeContext) -> u32 {
                let _ = heap::try_return(&ctx, $rchunk, $rmemptr);
                0
            }
        )*
    };
}

heap_programs! {
    heap_entry => false, false;
    heap_entry_chunk => true, false;
    heap_entry_memptr => false, true;
    /
    heap_return => false, false;
    heap_return_chunk => true, false;
    heap_return_memptr => false, true;
    heap_return_memptr_chunk => true, true;
}

/// Records how full the ring is. Not attached: the daemon runs it at its tick (`--metrics`).
#[raw_tracepoint]
pub fn ring_fill(_ctx: RawTracePointContext) -> i32 {
    maps::record_ring_fill();
    0
}

/// Writes this CPU's allocator-event batch. Not attached: run like `fault_flush`.
#[raw_tracepoint]
pub fn heap_flush(_ctx: RawTracePointContext) -> i32 {
    match heap::try_flush() {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    match lifecycle::try_task_newtask(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// `task_newtask` for a daemon in a PID namespace of its own (the child's pid there).
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_raw(ctx: RawTracePointContext) -> i32 {
    match lifecycle::try_task_newtask_raw(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    match lifecycle::try_exec(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    match lifecycle::try_exit(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
