//! vmatrace's eBPF programs: entry points only. Each one calls a `try_*` function that returns
//! `Result<u32, u32>`; the logic lives in `syscalls`, `faults` and `lifecycle`, the maps in
//! `maps`.
#![no_std]
#![no_main]
// `atomic_xadd`: the only atomic add the bpfel target offers (see `maps::targets_changed`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod faults;
mod lifecycle;
mod maps;
mod regs;
mod syscalls;

use aya_ebpf::{
    macros::{perf_event, raw_tracepoint, tracepoint},
    programs::{PerfEventContext, RawTracePointContext, TracePointContext},
};

/// `raw_syscalls:sys_enter`: saves the arguments of a traced memory syscall.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    match syscalls::try_enter(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

/// `raw_syscalls:sys_exit`: emits the traced memory syscall with its return value.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    match syscalls::try_exit(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    match faults::try_page_fault(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> i32 {
    match faults::try_page_fault(&ctx) {
        Ok(ret) | Err(ret) => ret as i32,
    }
}

#[perf_event]
pub fn page_fault_perf(ctx: PerfEventContext) -> u32 {
    // Always 0: the perf event must not write samples of its own.
    let _ = faults::try_page_fault_perf(&ctx);
    0
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    match lifecycle::try_task_newtask(&ctx) {
        Ok(ret) | Err(ret) => ret,
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
