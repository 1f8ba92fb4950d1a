//! What differs between the architectures vmatrace runs on (x86_64, aarch64): where a
//! syscall's arguments sit in `struct pt_regs`, the faulting instruction in the page-fault
//! contexts, the x86 exception tracepoints' arguments, signal numbers, and the end of user
//! addresses. The object is built for one architecture (aya-build passes `bpf_target_arch`
//! from the daemon's target), so these are constants; each x86_64 value has its aarch64
//! counterpart beside it (or says why there is none).

use aya_ebpf::programs::PerfEventContext;

/// Byte offsets in `struct pt_regs` of a syscall's six arguments, as the syscall wrappers
/// (`__x64_sys_*`, `__arm64_sys_*`) read them.
#[cfg(bpf_target_arch = "x86_64")]
pub const SYSCALL_ARG_OFFSETS: [usize; 6] = [
    14 * 8, // di
    13 * 8, // si
    12 * 8, // dx
    7 * 8,  // r10
    9 * 8,  // r8
    8 * 8,  // r9
];
/// aarch64: x0 is overwritten by the return value when the syscall ends, so the first
/// argument is read from `orig_x0` (after `regs[31]`, `sp`, `pc`, `pstate`).
#[cfg(bpf_target_arch = "aarch64")]
pub const SYSCALL_ARG_OFFSETS: [usize; 6] = [34 * 8, 8, 2 * 8, 3 * 8, 4 * 8, 5 * 8];

/// Offset of the instruction pointer in `struct pt_regs` (x86-64: after r15..di and
/// orig_ax, 16 registers), for the x86 exception tracepoints.
#[cfg(bpf_target_arch = "x86_64")]
pub const PT_REGS_IP_OFFSET: usize = 16 * 8;
#[cfg(bpf_target_arch = "aarch64")]
pub const PT_REGS_IP_OFFSET: usize = 32 * 8;

/// Offsets in `struct pt_regs` of the instruction pointer and the stack pointer, for the
/// uprobes on allocator functions (x86-64: `sp` after `ip`, `cs` and `flags`; arm64: after
/// `regs[31]`, before `pc`).
#[cfg(bpf_target_arch = "x86_64")]
pub const UPROBE_IP_SP_OFFSETS: (usize, usize) = (PT_REGS_IP_OFFSET, 19 * 8);
#[cfg(bpf_target_arch = "aarch64")]
pub const UPROBE_IP_SP_OFFSETS: (usize, usize) = (PT_REGS_IP_OFFSET, 31 * 8);

/// At a function's first instruction, what the stack pointer will be once it has returned:
/// on x86-64 `call` pushed the return address, which `ret` pops; arm64 keeps it in x30.
#[cfg(bpf_target_arch = "x86_64")]
pub const SP_AFTER_RETURN: u64 = 8;
#[cfg(bpf_target_arch = "aarch64")]
pub const SP_AFTER_RETURN: u64 = 0;
/// Offsets in `struct pt_regs` of the user registers a stack is unwound from, in the order
/// of `StackHead::regs`: x86_64 ip, sp, bp (and no fourth).
#[cfg(bpf_target_arch = "x86_64")]
pub const STACK_REG_OFFSETS: [Option<usize>; 4] = [Some(16 * 8), Some(19 * 8), Some(4 * 8), None];
/// aarch64: pc, sp, fp (x29), lr (x30).
#[cfg(bpf_target_arch = "aarch64")]
pub const STACK_REG_OFFSETS: [Option<usize>; 4] =
    [Some(32 * 8), Some(31 * 8), Some(29 * 8), Some(30 * 8)];

// The x86 exception tracepoints `page_fault_user` and `page_fault_kernel`. Their format,
// for reference:
// 	field:unsigned long address;	offset:8;	size:8;	signed:0;
// 	field:unsigned long ip;	offset:16;	size:8;	signed:0;
// 	field:unsigned long error_code;	offset:24;	size:8;	signed:0;
// and their arguments (arch/x86/include/asm/trace/exceptions.h), which the programs get
// instead (no perf record is built, which halves their cost):
// TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code)
// arm64 has no such tracepoint: its faults come from the perf event (`perf_fault`), and the
// daemon never attaches these programs there.
/// Index of the faulting address among the exception tracepoints' arguments.
pub const FAULT_ARG_ADDRESS: usize = 0;
/// Index of the `struct pt_regs *` among them.
pub const FAULT_ARG_REGS: usize = 1;
/// Index of the x86 page-fault error code among them.
pub const FAULT_ARG_ERROR_CODE: usize = 2;

/// `SIGSTOP`: 19 on x86_64 and on aarch64 alike (asm-generic numbering; it differs on
/// alpha, mips, parisc and sparc, which vmatrace does not build for).
#[cfg(bpf_target_arch = "x86_64")]
pub const SIGSTOP: u32 = 19;
#[cfg(bpf_target_arch = "aarch64")]
pub const SIGSTOP: u32 = 19;

/// The end of the user half of the address space (48-bit virtual addresses, as both
/// architectures' default configurations use).
pub const USER_ADDRESS_END: u64 = 0x0000_8000_0000_0000;

/// The faulting address and instruction of a software page-fault perf event.
#[inline(always)]
pub fn perf_fault(ctx: &PerfEventContext) -> (u64, u64) {
    // SAFETY: `ctx.ctx` is the program's context; `addr` and `regs` may be read directly.
    #[cfg(bpf_target_arch = "x86_64")]
    let regs = unsafe { ((*ctx.ctx).addr, (*ctx.ctx).regs.rip) };
    // SAFETY: as above.
    #[cfg(bpf_target_arch = "aarch64")]
    let regs = unsafe { ((*ctx.ctx).addr, (*ctx.ctx).regs.pc) };
    regs
}
