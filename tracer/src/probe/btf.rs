//! The offsets of `struct` members in the kernel's own BTF (`/sys/kernel/btf/vmlinux`), for
//! the few kernel structures the programs read where a tracepoint lacks a field (see
//! `tracer_common::layout`). The eBPF programs have no CO-RE relocations, so the daemon finds
//! the offsets and hands them over as globals.

use std::path::Path;

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why a member offset could not be found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({0})")]
    Read(String),
    #[error("the kernel's BTF is malformed ({0})")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no member {1} in struct {0}")]
    NoMember(String, String),
    #[error("struct {0} member {1} is a bit field")]
    BitField(String, String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Bytes that follow the 12-byte `struct btf_type` for each kind (`vlen` entries where the
/// kind has a list), from the kernel's `Documentation/bpf/btf.rst`.
fn trailing_bytes(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG: one u32
        2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, quals, FUNC, FLOAT, TYPE_TAG
        3 => 12,                      // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
        _ => return None,
    })
}

/// The kernel's BTF, parsed just enough to find struct members.
pub struct KernelBtf {
    data: Vec<u8>,
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
}

impl KernelBtf {
    /// Reads the running kernel's BTF.
    pub fn load() -> Result<Self, BtfError> {
        Self::read(Path::new(VMLINUX_BTF))
    }

    /// Reads BTF from `path`.
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data =
            std::fs::read(path).map_err(|e| BtfError::Read(format!("{}: {e}", path.display())))?;
        Self::parse(data)
    }

    /// Checks the header of native-endian BTF `data`.
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |o: usize| -> Result<u32, BtfError> {
            data.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
                .ok_or(BtfError::Malformed("truncated header"))
        };
        let magic = data
            .get(0..2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_ne_bytes)
            .ok_or(BtfError::Malformed("empty"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types.end > data.len() || strings.end > data.len() {
            return Err(BtfError::Malformed("sections beyond the end"));
        }
        Ok(Self {
            data,
            types,
            strings,
        })
    }

    fn u32_at(&self, o: usize) -> Option<u32> {
        self.data
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    }

    fn name(&self, off: u32) -> Option<&[u8]> {
        let start = self.strings.start + off as usize;
        let rest = self.data.get(start..self.strings.end)?;
        let len = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..len])
    }

    /// The first `struct strukt` for which `pick` (given the type's start, `vlen` and
    /// `kind_flag`) answers something; `NoStruct` when there is no struct of that name.
    fn find_struct<T>(
        &self,
        strukt: &str,
        mut pick: impl FnMut(usize, usize, bool) -> Option<Result<T, BtfError>>,
        missing: BtfError,
    ) -> Result<T, BtfError> {
        let mut at = self.types.start;
        let mut found_struct = false;
        while at + 12 <= self.types.end {
            let (Some(name_off), Some(info)) = (self.u32_at(at), self.u32_at(at + 4)) else {
                return Err(BtfError::Malformed("truncated type"));
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let len = trailing_bytes(kind, vlen).ok_or(BtfError::Malformed("unknown kind"))?;
            if kind == KIND_STRUCT && self.name(name_off) == Some(strukt.as_bytes()) {
                found_struct = true;
                if let Some(answer) = pick(at, vlen, info >> 31 != 0) {
                    return answer;
                }
            }
            at += 12 + len;
        }
        if found_struct {
            Err(missing)
        } else {
            Err(BtfError::NoStruct(strukt.into()))
        }
    }

    /// The byte offset of `member` in `struct strukt` (the first struct of that name that
    /// has the member).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let missing = BtfError::NoMember(strukt.into(), member.into());
        self.find_struct(
            strukt,
            |at, vlen, kind_flag| {
                for i in 0..vlen {
                    let m = at + 12 + 12 * i;
                    let (Some(m_name), Some(m_off)) = (self.u32_at(m), self.u32_at(m + 8)) else {
                        return Some(Err(BtfError::Malformed("truncated member")));
                    };
                    if self.name(m_name) != Some(member.as_bytes()) {
                        continue;
                    }
                    // With kind_flag the offset holds a bit-field size in its top byte.
                    let (bits, bitfield) = if kind_flag {
                        (m_off & 0x00ff_ffff, m_off >> 24 != 0)
                    } else {
                        (m_off, false)
                    };
                    if bitfield || bits % 8 != 0 {
                        return Some(Err(BtfError::BitField(strukt.into(), member.into())));
                    }
                    return Some(Ok(bits / 8));
                }
                None
            },
            missing,
        )
    }

    /// The size in bytes of `struct strukt` (the first one of that name with members: a
    /// declaration-only twin has none).
    pub fn struct_size(&self, strukt: &str) -> Result<u32, BtfError> {
        let missing = BtfError::NoStruct(strukt.into());
        self.find_struct(
            strukt,
            |at, vlen, _| {
                (vlen > 0).then(|| {
                    self.u32_at(at + 8)
                        .ok_or(BtfError::Malformed("truncated type"))
                })
            },
            missing,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct pair { int a; int b; }`.
    fn pair_btf() -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_ne_bytes());
        // [1] INT "int", size 4, 32 bits
        push(1);
        push(1 << 24);
        push(4);
        push(32);
        // [2] STRUCT "pair", 2 members, size 8
        push(5);
        push((4 << 24) | 2);
        push(8);
        push(10); // "a"
        push(1);
        push(0);
        push(12); // "b"
        push(1);
        push(32);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.push(1); // version
        out.push(0); // flags
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn members_are_found_by_name() {
        let btf = KernelBtf::parse(pair_btf()).expect("valid");
        assert_eq!(btf.member_offset("pair", "a"), Ok(0));
        assert_eq!(btf.member_offset("pair", "b"), Ok(4));
        assert_eq!(
            btf.member_offset("pair", "c"),
            Err(BtfError::NoMember("pair".into(), "c".into()))
        );
        assert_eq!(
            btf.member_offset("other", "a"),
            Err(BtfError::NoStruct("other".into()))
        );
        assert_eq!(btf.struct_size("pair"), Ok(8));
        assert_eq!(
            btf.struct_size("other"),
            Err(BtfError::NoStruct("other".into()))
        );
    }

    #[test]
    fn broken_blobs_are_errors_not_panics() {
        assert!(KernelBtf::parse(Vec::new()).is_err());
        let mut b = pair_btf();
        b.truncate(30);
        assert!(KernelBtf::parse(b).is_err());
        let mut b = pair_btf();
        b[0] = 0;
        assert!(KernelBtf::parse(b).is_err());
    }

    /// The running kernel's BTF has what the exit program needs where `group_dead` is missing.
    #[test]
    fn this_kernels_task_struct_signal_live_is_found() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let signal = btf
            .member_offset("task_struct", "signal")
            .expect("task_struct.signal");
        let live = btf
            .member_offset("signal_struct", "live")
            .expect("signal_struct.live");
        assert!(signal > 0 && signal < 16384, "{signal}");
        assert!(live < 64, "{live}");
    }

    /// ... and what the fork program needs inside a PID namespace.
    #[test]
    fn this_kernels_pid_numbers_are_found() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable {VMLINUX_BTF}");
            return;
        };
        let thread_pid = btf.member_offset("task_struct", "thread_pid");
        assert!(
            thread_pid.as_ref().is_ok_and(|&o| o > 0 && o < 16384),
            "{thread_pid:?}"
        );
        assert_eq!(btf.member_offset("upid", "nr"), Ok(0));
        // struct upid { int nr; struct pid_namespace *ns; }
        assert_eq!(btf.struct_size("upid"), Ok(16));
        let level = btf.member_offset("pid", "level").expect("pid.level");
        let numbers = btf.member_offset("pid", "numbers").expect("pid.numbers");
        assert!(level < numbers, "numbers is the last member");
    }
}
