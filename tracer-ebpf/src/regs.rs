//! The registers a task saved on entering the kernel (x86-64 `struct pt_regs`), as the raw
//! syscall and page-fault tracepoints pass them: where syscall arguments and the faulting
//! instruction are read, and how a 32-bit (compat) syscall is told apart.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_user};

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
    /// The syscall number (the `id` of `raw_syscalls:sys_enter`).
    pub orig_ax: u64,
    pub ip: u64,
    pub cs: u64,
    pub flags: u64,
    pub sp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<PtRegs>() == 21 * 8);

/// `__USER_CS`: the code segment of 64-bit user mode.
const USER_CS: u64 = 0x33;
/// `int $0x80`, the instruction of the 32-bit syscall entry.
const INT80: [u8; 2] = [0xcd, 0x80];

impl PtRegs {
    /// Copies the registers at kernel address `regs`.
    #[inline(always)]
    pub fn read(regs: u64) -> Option<PtRegs> {
        // SAFETY: a kernel pointer read with the fault-tolerant helper.
        unsafe { bpf_probe_read_kernel(regs as *const PtRegs) }.ok()
    }

    /// One field (at byte `offset`, see `core::mem::offset_of!`) of the registers at `regs`.
    #[inline(always)]
    pub fn read_field(regs: u64, offset: usize) -> Option<u64> {
        // SAFETY: as in `read`.
        unsafe { bpf_probe_read_kernel((regs as usize + offset) as *const u64) }.ok()
    }

    /// The six arguments of a 64-bit syscall, in the registers the x86-64 syscall ABI uses.
    #[inline(always)]
    pub fn syscall_args(&self) -> [u64; 6] {
        [self.di, self.si, self.dx, self.r10, self.r8, self.r9]
    }

    /// Whether the syscall these registers entered is a 32-bit (compat) one: `int $0x80`, or
    /// any entry from 32-bit code. Its number and arguments follow the i386 table and
    /// registers, so reading it as a 64-bit call would be wrong.
    #[inline(always)]
    pub fn is_compat_syscall(&self) -> bool {
        if self.cs & 0xffff != USER_CS {
            return true;
        }
        // The `syscall` instruction leaves the return address in rcx: that is the usual case,
        // decided without reading user memory. Otherwise look at the instruction itself.
        if self.cx == self.ip {
            return false;
        }
        // SAFETY: a user pointer read with the fault-tolerant helper.
        matches!(
            unsafe { bpf_probe_read_user(self.ip.wrapping_sub(2) as *const [u8; 2]) },
            Ok(insn) if insn == INT80
        )
    }
}
