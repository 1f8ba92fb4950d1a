//! CPython 3.11's code objects, read from a running interpreter's memory: the function, file
//! and line a Python frame stands for (`docs/design/python-frames.md`, which gives the
//! layout's sources and how it was checked on Debian 12's `python3.11`). The frames
//! themselves are to come from the kernel at the call (the design's plan, not built yet);
//! what they point at, the code object of a function, lives as long as the function, so the
//! daemon can read it after the call.

use crate::stacks::Frame;

/// `PyCodeObject` of CPython 3.11 on 64-bit Linux: where its fields are.
mod code {
    /// `ob_type`: `&PyCode_Type` for a code object.
    pub const OB_TYPE: usize = 8;
    /// `co_firstlineno` (int): the line of the `def`.
    pub const FIRST_LINE: usize = 72;
    pub const FILENAME: usize = 112;
    pub const QUALNAME: usize = 128;
    /// `co_linetable` (bytes), in the 3.11 location-table format.
    pub const LINETABLE: usize = 136;
    /// `_co_firsttraceable` (int): instructions before it set the frame up.
    pub const FIRST_TRACEABLE: usize = 168;
    /// `co_code_adaptive`: the bytecode, inline; a frame's `prev_instr` points into it.
    pub const BYTECODE: usize = 184;
    /// Bytes read to have all of the above.
    pub const HEADER: usize = 184;
}

/// `PyASCIIObject` / `PyCompactUnicodeObject` and `PyBytesObject`.
mod object {
    pub const STR_LENGTH: usize = 16;
    /// `state`: bits 2-4 the kind (bytes a character), bit 5 compact, bit 6 ASCII.
    pub const STR_STATE: usize = 32;
    pub const STR_ASCII_DATA: usize = 48;
    pub const STR_COMPACT_DATA: usize = 72;
    pub const BYTES_SIZE: usize = 16;
    pub const BYTES_DATA: usize = 32;
}

/// The most characters of a name or file name read; the most bytes of a line table.
const MAX_STR: usize = 4096;
const MAX_LINETABLE: usize = 1 << 16;

/// Why a code object could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PythonError {
    #[error("cannot read {len} bytes at {addr:#x} in process {pid}")]
    Read { pid: u32, addr: u64, len: usize },
    #[error("{addr:#x} is not a code object (its type is {found:#x}, not {expected:#x})")]
    NotCode {
        addr: u64,
        found: u64,
        expected: u64,
    },
    #[error("the {what} of the code object at {addr:#x} is not a string CPython 3.11 writes")]
    Malformed { addr: u64, what: &'static str },
}

/// A Python function as its code object describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeObject {
    /// The code object's address (the frame's key).
    pub addr: u64,
    /// `co_qualname`: `make_buffers`, `Holder.grow`, `<module>`.
    pub qualname: String,
    pub filename: String,
    /// `co_firstlineno`.
    pub first_line: u32,
    /// `_co_firsttraceable`, in code units.
    pub first_traceable: u32,
    /// `co_linetable`.
    pub linetable: Vec<u8>,
}

impl CodeObject {
    /// Reads the code object at `addr` in process `pid`; with `code_type` (the address of
    /// `PyCode_Type` there), an object of another type is refused: a frame's code pointer
    /// read after the code was freed and its memory reused.
    pub fn read(pid: u32, addr: u64, code_type: Option<u64>) -> Result<Self, PythonError> {
        let head = read_remote(pid, addr, code::HEADER)?;
        let word = |at: usize| u64::from_ne_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
        let int = |at: usize| i32::from_ne_bytes(head[at..at + 4].try_into().unwrap_or([0; 4]));
        if let Some(expected) = code_type
            && word(code::OB_TYPE) != expected
        {
            return Err(PythonError::NotCode {
                addr,
                found: word(code::OB_TYPE),
                expected,
            });
        }
        let malformed = |what| PythonError::Malformed { addr, what };
        Ok(Self {
            addr,
            qualname: read_str(pid, word(code::QUALNAME))?.ok_or(malformed("qualname"))?,
            filename: read_str(pid, word(code::FILENAME))?.ok_or(malformed("filename"))?,
            first_line: u32::try_from(int(code::FIRST_LINE)).map_err(|_| malformed("line"))?,
            first_traceable: u32::try_from(int(code::FIRST_TRACEABLE)).unwrap_or(0),
            linetable: read_bytes(pid, word(code::LINETABLE))?.ok_or(malformed("line table"))?,
        })
    }

    /// The instruction (in 2-byte code units) a frame's `prev_instr` points at.
    pub fn instruction(&self, prev_instr: u64) -> Option<u32> {
        let start = self.addr.checked_add(code::BYTECODE as u64)?;
        u32::try_from(prev_instr.checked_sub(start)? / 2).ok()
    }

    /// The line of instruction `instr`, from the line table (the `def` line when the table
    /// says none).
    pub fn line_of(&self, instr: u32) -> u32 {
        line_of(&self.linetable, self.first_line, instr).unwrap_or(self.first_line)
    }

    /// The frame of instruction `instr` as the stacks show it: `[python]` as its module, the
    /// code object's address, the instruction's byte offset, the function, file and line.
    pub fn frame(&self, instr: u32) -> Frame {
        Frame {
            addr: self.addr,
            module: Some("[python]".into()),
            offset: u64::from(instr) * 2,
            function: Some(self.qualname.clone()),
            file: Some(self.filename.clone()),
            line: Some(self.line_of(instr)),
            inlined: false,
        }
    }
}

/// The line of code unit `instr` in a 3.11 location table (`Objects/locations.md`): entries
/// of one byte (bit 7 set, `code = bits 3-6`, `length = bits 0-2 + 1` code units) and their
/// operands; the line starts at `first_line` and moves by each entry's delta. `None` where no
/// entry covers `instr` or the entry has no line.
pub fn line_of(table: &[u8], first_line: u32, instr: u32) -> Option<u32> {
    let mut bytes = table.iter().copied().peekable();
    let mut line = i64::from(first_line);
    let mut at: u64 = 0;
    let varint = |bytes: &mut std::iter::Peekable<std::iter::Copied<std::slice::Iter<u8>>>| {
        let (mut v, mut shift) = (0u64, 0u32);
        for b in bytes.by_ref() {
            v |= u64::from(b & 63).checked_shl(shift).unwrap_or(0);
            shift += 6;
            if b & 64 == 0 {
                break;
            }
        }
        v
    };
    let svarint = |v: u64| -> i64 {
        let magnitude = i64::try_from(v >> 1).unwrap_or(i64::MAX);
        if v & 1 == 1 { -magnitude } else { magnitude }
    };
    while let Some(first) = bytes.next() {
        if first & 0x80 == 0 {
            return None;
        }
        let code = (first >> 3) & 15;
        let length = u64::from(first & 7) + 1;
        let has_line = match code {
            0..=9 => {
                bytes.next();
                true
            }
            10..=12 => {
                line += i64::from(code - 10);
                bytes.next();
                bytes.next();
                true
            }
            13 => {
                line += svarint(varint(&mut bytes));
                true
            }
            14 => {
                line += svarint(varint(&mut bytes));
                for _ in 0..3 {
                    varint(&mut bytes);
                }
                true
            }
            _ => false,
        };
        if u64::from(instr) < at + length {
            return has_line.then(|| u32::try_from(line).ok()).flatten();
        }
        at += length;
        // The next entry's first byte: operands never have bit 7 set.
        while bytes.peek().is_some_and(|b| b & 0x80 == 0) {
            bytes.next();
        }
    }
    None
}

/// Reads `len` bytes at `addr` in process `pid`, whole or not at all.
fn read_remote(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, PythonError> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `buf`, which outlives the call; the remote range is only read,
    // by the kernel, in the other process.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if usize::try_from(n).ok() != Some(len) {
        return Err(PythonError::Read { pid, addr, len });
    }
    Ok(buf)
}

/// A compact `str` at `addr` (every name and file name CPython 3.11 makes), or `None` when
/// it is not one.
fn read_str(pid: u32, addr: u64) -> Result<Option<String>, PythonError> {
    if addr == 0 {
        return Ok(None);
    }
    let head = read_remote(pid, addr, object::STR_ASCII_DATA)?;
    let length = u64::from_ne_bytes(
        head[object::STR_LENGTH..object::STR_LENGTH + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let state = u32::from_ne_bytes(
        head[object::STR_STATE..object::STR_STATE + 4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        state & (1 << 5) != 0,
        state & (1 << 6) != 0,
    );
    let Ok(length) = usize::try_from(length) else {
        return Ok(None);
    };
    if !compact || length > MAX_STR || !matches!(kind, 1 | 2 | 4) {
        return Ok(None);
    }
    let data = if ascii {
        object::STR_ASCII_DATA
    } else {
        object::STR_COMPACT_DATA
    };
    let kind = kind as usize;
    let bytes = read_remote(pid, addr + data as u64, length * kind)?;
    let text = match kind {
        1 if ascii => String::from_utf8(bytes).ok(),
        1 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        2 => char::decode_utf16(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_ne_bytes([c[0], c[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    Ok(text)
}

/// A `bytes` object's contents at `addr`, or `None` when it is larger than a line table.
fn read_bytes(pid: u32, addr: u64) -> Result<Option<Vec<u8>>, PythonError> {
    if addr == 0 {
        return Ok(None);
    }
    let head = read_remote(pid, addr, object::BYTES_DATA)?;
    let size = u64::from_ne_bytes(
        head[object::BYTES_SIZE..object::BYTES_SIZE + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    match usize::try_from(size) {
        Ok(n) if n <= MAX_LINETABLE => {
            read_remote(pid, addr + object::BYTES_DATA as u64, n).map(Some)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `co_linetable` of this function, with `co_firstlineno` 1, and its `co_lines()`
    /// (start byte, end byte, line), both from CPython 3.11:
    /// ```python
    /// def f(n):
    ///     total = 0
    ///     for i in range(n):
    ///         if i % 3 == 0:
    ///             total += i
    ///         else:
    ///             total -= 1
    ///     return total
    /// ```
    const TABLE: &str = "8000d80c0d8045dd0d12903189588c58f000040517f0000405178801d80b0c8871893590418a3a883ad80c119051894a88458845e00c119051894a88458845d80b10804c";
    const LINES: &[(u32, u32, u32)] = &[
        (0, 2, 1),
        (2, 6, 2),
        (6, 40, 3),
        (40, 58, 4),
        (58, 70, 5),
        (70, 82, 7),
        (82, 86, 8),
    ];

    fn table() -> Vec<u8> {
        (0..TABLE.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&TABLE[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_line_table_gives_the_lines_cpython_gives() {
        let t = table();
        for &(start, end, line) in LINES {
            for byte in (start..end).step_by(2) {
                assert_eq!(line_of(&t, 1, byte / 2), Some(line), "byte {byte}");
            }
        }
        assert_eq!(line_of(&t, 1, 43), None, "past the end");
        assert_eq!(line_of(&t, 10, 0), Some(10), "from the def line");
    }

    #[test]
    fn a_truncated_or_foreign_table_gives_no_line() {
        let t = table();
        assert_eq!(line_of(&t[..3], 1, 20), None);
        assert_eq!(line_of(&[0x00, 0x01], 1, 0), None);
        assert_eq!(line_of(&[], 1, 0), None);
        // Code 15: no line for this entry.
        assert_eq!(line_of(&[0x80 | (15 << 3)], 1, 0), None);
    }

    /// The code object of a function in a real `python3`, read from its memory, against
    /// what the interpreter says of it (names, file, lines from `co_lines()`).
    #[test]
    fn a_running_interpreters_code_object_is_read_as_it_says() {
        use std::io::BufRead as _;
        let Ok(mut child) = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import sys\n\
                 class Holder:\n\
                 \x20   def grow(self, n):\n\
                 \x20       total = 0\n\
                 \x20       for i in range(n):\n\
                 \x20           total += i\n\
                 \x20       return total\n\
                 c = Holder.grow.__code__\n\
                 print(hex(id(c)), hex(id(type(c))), c.co_qualname, c.co_filename, c.co_firstlineno, flush=True)\n\
                 for s, e, l in c.co_lines():\n\
                 \x20   print(s, e, l, flush=True)\n\
                 print('end', flush=True)\n\
                 sys.stdin.read()\n",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("no /usr/bin/python3: skipped");
            return;
        };
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines().map_while(Result::ok);
        let head = lines.next().expect("the code object");
        let w: Vec<&str> = head.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
        let (addr, ty) = (hex(w[0]), hex(w[1]));
        let version = std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import sys; print(sys.version_info[:2] == (3, 11))"])
            .output()
            .expect("python3 runs");
        let pid = child.id();
        let code = CodeObject::read(pid, addr, Some(ty));
        // Another type than the object's is refused.
        let foreign = CodeObject::read(pid, addr, Some(ty + 8));
        let table: Vec<(u32, u32, u32)> = lines
            .by_ref()
            .take_while(|l| l != "end")
            .filter_map(|l| {
                let v: Vec<u32> = l
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (v.len() == 3).then(|| (v[0], v[1], v[2]))
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        if String::from_utf8_lossy(&version.stdout).trim() != "True" {
            eprintln!("python3 is not 3.11: the layout is 3.11's, skipped");
            return;
        }
        assert!(
            matches!(foreign, Err(PythonError::NotCode { found, .. }) if found == ty),
            "{foreign:?}"
        );
        let code = code.expect("the code object is read");
        assert_eq!(code.qualname, "Holder.grow");
        assert_eq!(code.filename, w[3]);
        assert_eq!(code.first_line.to_string(), w[4]);
        assert!(!table.is_empty());
        for (start, end, line) in table {
            for byte in (start..end).step_by(2) {
                assert_eq!(code.line_of(byte / 2), line, "byte {byte}");
            }
        }
        let frame = code.frame(code.instruction(addr + 184 + 2 * 5).expect("in the code"));
        assert_eq!(frame.function.as_deref(), Some("Holder.grow"));
        assert_eq!(frame.offset, 10);
        assert_eq!(frame.module.as_deref(), Some("[python]"));
    }
}
