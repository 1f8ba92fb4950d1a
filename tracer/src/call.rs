//! A memory syscall's arguments, named and typed. They are decoded once, here, from the raw
//! registers a syscall record carries (`args`, and `extra` for what the kernel read behind a
//! pointer), and every consumer (the model, the outputs, residency, replay's checks) matches on
//! [`MemCall`] instead of indexing `args`. The Linux values they are tested against are in
//! [`linux`].

use tracer_common::Syscall;

use crate::event::SyscallRecord;

/// The Linux ABI values the memory calls are read with (the same on x86_64 and arm64).
pub mod linux {
    /// `mmap` flags.
    pub const MAP_SHARED: u64 = 0x01;
    pub const MAP_SHARED_VALIDATE: u64 = 0x03;
    pub const MAP_TYPE: u64 = 0x0f;
    pub const MAP_ANONYMOUS: u64 = 0x20;
    pub const MAP_LOCKED: u64 = 0x2000;
    pub const MAP_POPULATE: u64 = 0x8000;
    pub const MAP_NONBLOCK: u64 = 0x10000;
    /// `mmap` and `mprotect` protection.
    pub const PROT_EXEC: u64 = 0x4;
    /// `madvise` advice beyond the model's own (`crate::model`: releasing, huge pages, fork).
    pub const MADV_POPULATE_READ: u64 = 22;
    pub const MADV_POPULATE_WRITE: u64 = 23;
    pub const MADV_COLLAPSE: u64 = 25;
    /// `mlock2` and `mlockall` flags.
    pub const MLOCK_ONFAULT: u64 = 1;
    pub const MCL_CURRENT: u64 = 1;
    pub const MCL_ONFAULT: u64 = 4;
    /// `shmat` flags.
    pub const SHM_RDONLY: u64 = 0o10000;
    pub const SHM_EXEC: u64 = 0o100000;
}

/// A memory syscall with its arguments named (see `man 2 <call>`). Signed arguments (file
/// descriptors, ids, keys) are the register read as the kernel reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemCall {
    Brk {
        addr: u64,
    },
    Mmap {
        addr: u64,
        len: u64,
        prot: u64,
        flags: u64,
        fd: i32,
        offset: u64,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    Mremap {
        addr: u64,
        old_len: u64,
        new_len: u64,
        flags: u64,
        new_addr: u64,
    },
    Mprotect {
        addr: u64,
        len: u64,
        prot: u64,
    },
    PkeyMprotect {
        addr: u64,
        len: u64,
        prot: u64,
        pkey: i64,
    },
    Madvise {
        addr: u64,
        len: u64,
        advice: u64,
    },
    /// `process_madvise(pidfd, iovec, vlen, advice, flags)`, with the first range of the
    /// vector (read by the kernel program).
    ProcessMadvise {
        pidfd: i64,
        addr: u64,
        len: u64,
        vlen: u64,
        advice: u64,
        flags: u64,
    },
    Shmat {
        shmid: i64,
        addr: u64,
        shmflg: u64,
    },
    Shmdt {
        addr: u64,
    },
    Mlock {
        addr: u64,
        len: u64,
    },
    Mlock2 {
        addr: u64,
        len: u64,
        flags: u64,
    },
    Munlock {
        addr: u64,
        len: u64,
    },
    Mlockall {
        flags: u64,
    },
    Munlockall,
    /// Not a memory call: `openat` is traced to name the files that `mmap` maps later.
    Openat {
        dfd: i32,
        path: u64,
        flags: u64,
    },
}

impl MemCall {
    /// Decodes `call`'s raw arguments.
    pub fn of(call: Syscall, args: [u64; 6], extra: [u64; 2]) -> Self {
        let [a0, a1, a2, a3, a4, a5] = args;
        match call {
            Syscall::Brk => Self::Brk { addr: a0 },
            Syscall::Mmap => Self::Mmap {
                addr: a0,
                len: a1,
                prot: a2,
                flags: a3,
                fd: a4 as i64 as i32,
                offset: a5,
            },
            Syscall::Munmap => Self::Munmap { addr: a0, len: a1 },
            Syscall::Mremap => Self::Mremap {
                addr: a0,
                old_len: a1,
                new_len: a2,
                flags: a3,
                new_addr: a4,
            },
            Syscall::Mprotect => Self::Mprotect {
                addr: a0,
                len: a1,
                prot: a2,
            },
            Syscall::PkeyMprotect => Self::PkeyMprotect {
                addr: a0,
                len: a1,
                prot: a2,
                pkey: a3 as i64,
            },
            Syscall::Madvise => Self::Madvise {
                addr: a0,
                len: a1,
                advice: a2,
            },
            Syscall::ProcessMadvise => Self::ProcessMadvise {
                pidfd: a0 as i64,
                addr: extra[0],
                len: extra[1],
                vlen: a2,
                advice: a3,
                flags: a4,
            },
            Syscall::Shmat => Self::Shmat {
                shmid: a0 as i64,
                addr: a1,
                shmflg: a2,
            },
            Syscall::Shmdt => Self::Shmdt { addr: a0 },
            Syscall::Mlock => Self::Mlock { addr: a0, len: a1 },
            Syscall::Mlock2 => Self::Mlock2 {
                addr: a0,
                len: a1,
                flags: a2,
            },
            Syscall::Munlock => Self::Munlock { addr: a0, len: a1 },
            Syscall::Mlockall => Self::Mlockall { flags: a0 },
            Syscall::Munlockall => Self::Munlockall,
            Syscall::Openat => Self::Openat {
                dfd: a0 as i64 as i32,
                path: a1,
                flags: a2,
            },
        }
    }

    /// The `madvise` advice and the range it applies to (`madvise`, `process_madvise`).
    pub fn advice(&self) -> Option<(u64, u64, u64)> {
        match *self {
            Self::Madvise { addr, len, advice }
            | Self::ProcessMadvise {
                addr, len, advice, ..
            } => Some((addr, len, advice)),
            _ => None,
        }
    }
}

/// `mmap` flags that say the mapping is shared.
pub fn map_shared(flags: u64) -> bool {
    matches!(
        flags & linux::MAP_TYPE,
        linux::MAP_SHARED | linux::MAP_SHARED_VALIDATE
    )
}

/// `mmap` flags that say the mapping is anonymous.
pub fn map_anonymous(flags: u64) -> bool {
    flags & linux::MAP_ANONYMOUS != 0
}

impl SyscallRecord {
    /// The call with its arguments named.
    pub fn mem(&self) -> MemCall {
        MemCall::of(self.call, self.args, self.extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_decodes_to_its_own_kind() {
        let args = [1, 2, 3, 4, u64::MAX, 6];
        for call in Syscall::ALL {
            let m = MemCall::of(call, args, [7, 8]);
            let name = format!("{m:?}").to_lowercase();
            let expected = call.name().replace('_', "");
            assert!(name.starts_with(&expected), "{call:?} -> {m:?}");
        }
        assert_eq!(
            MemCall::of(Syscall::Mmap, args, [0; 2]),
            MemCall::Mmap {
                addr: 1,
                len: 2,
                prot: 3,
                flags: 4,
                fd: -1,
                offset: 6
            }
        );
        assert_eq!(
            MemCall::of(Syscall::ProcessMadvise, args, [7, 8]).advice(),
            Some((7, 8, 4))
        );
    }
}
