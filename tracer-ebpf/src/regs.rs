//! The registers a task saved on entering the kernel (x86-64 `struct pt_regs`), as the raw
//! page-fault tracepoints pass them: where the faulting instruction is read.

use aya_ebpf::helpers::bpf_probe_read_kernel;

// x86-64 `struct pt_regs` (arch/x86/include/uapi/asm/ptrace.h, the same in the kernel): the
// layout is the architecture's ABI, it does not change between kernels.
// struct pt_regs {
// 	unsigned long r15, r14, r13, r12, bp, bx;
// 	unsigned long r11, r10, r9, r8, ax, cx, dx, si, di;
// 	unsigned long orig_ax;
// 	unsigned long ip, cs, flags, sp, ss;
// };
/// x86-64 `struct pt_regs`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub bp: u64,
    pub bx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub ax: u64,
    pub cx: u64,
    pub dx: u64,
    pub si: u64,
    pub di: u64,
    /// The syscall number.
    pub orig_ax: u64,
    pub ip: u64,
    pub cs: u64,
    pub flags: u64,
    pub sp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<PtRegs>() == 21 * 8);

impl PtRegs {
    /// One field (at byte `offset`, see `core::mem::offset_of!`) of the registers at `regs`.
    #[inline(always)]
    pub fn read_field(regs: u64, offset: usize) -> Option<u64> {
        // SAFETY: a kernel pointer read with the fault-tolerant helper.
        unsafe { bpf_probe_read_kernel((regs as usize + offset) as *const u64) }.ok()
    }
}
