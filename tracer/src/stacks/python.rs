//! CPython 3.11 read from a running interpreter's memory (`docs/design/python-frames.md`,
//! which gives the layout's sources and how it was checked on Debian 12's `python3.11`):
//! where the interpreter's globals are ([`Interpreter`]), each thread's chain of frames, and
//! the function, file and line a frame stands for ([`CodeObject`]). At a traced call the
//! frames are to come from the kernel (the design's plan, not built yet); what they point at,
//! the code object of a function, lives as long as the function, so the daemon can read it
//! after the call.

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::stacks::Frame;

/// `_PyRuntimeState`, `PyInterpreterState`, `PyThreadState`, `_PyCFrame` and
/// `_PyInterpreterFrame` of CPython 3.11 on 64-bit Linux: the fields of the walk.
mod runtime {
    /// `_PyRuntime.interpreters.head`.
    pub const INTERPRETERS_HEAD: u64 = 40;
    /// `PyInterpreterState.threads.head`.
    pub const THREADS_HEAD: u64 = 16;
    /// `PyThreadState.next`, `.cframe`, `.native_thread_id` (the thread's id).
    pub const THREAD_NEXT: u64 = 8;
    pub const THREAD_CFRAME: u64 = 56;
    pub const THREAD_NATIVE_ID: u64 = 160;
    /// `_PyCFrame.current_frame`.
    pub const CURRENT_FRAME: u64 = 8;
    /// `_PyInterpreterFrame`: from `f_code` (32) through `owner` (69) in one read:
    /// `f_code` at 0, `previous` at 16, `prev_instr` at 24, `is_entry` at 36, `owner` at 37.
    pub const FRAME_FIELDS: u64 = 32;
    pub const FRAME_FIELDS_LEN: usize = 40;
}

/// The most threads and frames a walk follows (a cycle in memory changing under the read
/// ends there too).
const MAX_THREADS: usize = 256;
const MAX_FRAMES: usize = 1024;

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
mod pyobject {
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
        let word = |at: usize| u64_at(&head, at);
        let int = |at: usize| i32::from_ne_bytes(bytes_at(&head, at));
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

/// Where a CPython 3.11's globals are in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// `Py_Version`: `0x030b02f0` for 3.11.2.
    pub version: u32,
    /// The address of `_PyRuntime`.
    pub runtime: u64,
    /// The address of `PyCode_Type`.
    pub code_type: u64,
}

/// A frame of a thread's chain, as the interpreter keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    /// The code object's address.
    pub code: u64,
    /// The last instruction begun (see [`CodeObject::instruction`]).
    pub prev_instr: u64,
    /// The first frame of a call of the evaluation loop from C.
    pub is_entry: bool,
    /// 0 a thread's frame, 1 a generator's, 2 a frame object's.
    pub owner: u8,
}

/// A thread of the interpreter and its frames, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadFrames {
    /// The thread's id (`gettid`).
    pub tid: u64,
    pub frames: Vec<FrameRef>,
}

impl Interpreter {
    /// The CPython 3.11 that process `pid` runs (its executable or a `libpython3.11` it
    /// maps), from the file's dynamic symbols; `None` for another version or no CPython.
    pub fn of_process(pid: u32) -> Option<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        maps.lines().find_map(|line| {
            let mut w = line.split_whitespace();
            let (range, _, offset) = (w.next()?, w.next()?, w.next()?);
            let path = w.nth(2)?;
            let base = path.rsplit('/').next().unwrap_or(path);
            let python = base.starts_with("python3.") || base.starts_with("libpython3.");
            if !python || u64::from_str_radix(offset, 16).ok()? != 0 {
                return None;
            }
            let start = u64::from_str_radix(range.split_once('-')?.0, 16).ok()?;
            // The file as the process mapped it, whatever its mount namespace.
            let data = std::fs::read(format!("/proc/{pid}/map_files/{range}"))
                .or_else(|_| std::fs::read(format!("/proc/{pid}/root{path}")))
                .ok()?;
            Self::in_file(&data, start)
        })
    }

    /// The globals of the file `data`, whose first byte is mapped at `start`.
    pub fn in_file(data: &[u8], start: u64) -> Option<Self> {
        let file = object::File::parse(data).ok()?;
        let (mut runtime, mut code_type, mut version) = (None, None, None);
        for sym in file.dynamic_symbols() {
            match sym.name() {
                Ok("_PyRuntime") => runtime = Some(sym.address()),
                Ok("PyCode_Type") => code_type = Some(sym.address()),
                Ok("Py_Version") => version = Some(sym.address()),
                _ => {}
            }
        }
        // The version's bytes in the file, from the segment that holds them.
        let version_at = version?;
        let version = file.segments().find_map(|s| {
            let (offset, size) = s.file_range();
            let within = version_at
                .checked_sub(s.address())
                .filter(|d| d + 4 <= size)?;
            let at = usize::try_from(offset + within).ok()?;
            Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
        })?;
        if version >> 16 != 0x030b {
            return None;
        }
        // The segment at file offset 0 is mapped at `start`: the load bias (0 for a
        // non-PIE executable such as Debian's python3.11).
        let first = file.segments().find(|s| s.file_range().0 == 0)?.address() & !0xfff;
        let bias = start.wrapping_sub(first);
        Some(Self {
            version,
            runtime: runtime?.wrapping_add(bias),
            code_type: code_type?.wrapping_add(bias),
        })
    }

    /// Every thread of the main interpreter with its frames, read now from process `pid`
    /// (racing the process: for one that waits, or stopped).
    pub fn threads(&self, pid: u32) -> Result<Vec<ThreadFrames>, PythonError> {
        let interp = read_word(pid, self.runtime + runtime::INTERPRETERS_HEAD)?;
        let mut thread = read_word(pid, interp + runtime::THREADS_HEAD)?;
        let mut out = Vec::new();
        while thread != 0 && out.len() < MAX_THREADS {
            out.push(ThreadFrames {
                tid: read_word(pid, thread + runtime::THREAD_NATIVE_ID)?,
                frames: frames_of(pid, thread)?,
            });
            thread = read_word(pid, thread + runtime::THREAD_NEXT)?;
        }
        Ok(out)
    }
}

/// The frames of the thread whose `PyThreadState` is at `thread`, innermost first.
fn frames_of(pid: u32, thread: u64) -> Result<Vec<FrameRef>, PythonError> {
    let cframe = read_word(pid, thread + runtime::THREAD_CFRAME)?;
    if cframe == 0 {
        return Ok(Vec::new());
    }
    let mut frame = read_word(pid, cframe + runtime::CURRENT_FRAME)?;
    let mut out = Vec::new();
    while frame != 0 && out.len() < MAX_FRAMES {
        let f = read_remote(
            pid,
            frame + runtime::FRAME_FIELDS,
            runtime::FRAME_FIELDS_LEN,
        )?;
        let word = |at: usize| u64_at(&f, at);
        out.push(FrameRef {
            code: word(0),
            prev_instr: word(24),
            is_entry: f[36] != 0,
            owner: f[37],
        });
        frame = word(16);
    }
    Ok(out)
}

/// The native-endian `N` bytes at `at` in `b` (zeros past its end).
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes_at(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes_at(b, at))
}

/// The pointer-sized word at `addr` in process `pid`.
fn read_word(pid: u32, addr: u64) -> Result<u64, PythonError> {
    let b = read_remote(pid, addr, 8)?;
    Ok(u64_at(&b, 0))
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
    let head = read_remote(pid, addr, pyobject::STR_ASCII_DATA)?;
    let length = u64_at(&head, pyobject::STR_LENGTH);
    let state = u32_at(&head, pyobject::STR_STATE);
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
        pyobject::STR_ASCII_DATA
    } else {
        pyobject::STR_COMPACT_DATA
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
    let head = read_remote(pid, addr, pyobject::BYTES_DATA)?;
    let size = u64_at(&head, pyobject::BYTES_SIZE);
    match usize::try_from(size) {
        Ok(n) if n <= MAX_LINETABLE => {
            read_remote(pid, addr + pyobject::BYTES_DATA as u64, n).map(Some)
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

    /// From outside a running `python3`: its interpreter found from its maps, its thread's
    /// frames walked while it waits in a known function, named with their lines.
    #[test]
    fn a_waiting_interpreters_frames_name_its_functions_and_lines() {
        use std::io::BufRead as _;
        let script = "import sys\n\
                      def inner():\n\
                      \x20   print('ready', flush=True)\n\
                      \x20   sys.stdin.read()\n\
                      def outer():\n\
                      \x20   inner()\n\
                      outer()\n";
        let Ok(mut child) = std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("no /usr/bin/python3: skipped");
            return;
        };
        let out = child.stdout.take().expect("stdout");
        let ready = std::io::BufReader::new(out).lines().next();
        assert!(
            matches!(ready, Some(Ok(ref l)) if l == "ready"),
            "{ready:?}"
        );
        // The read is a blocking syscall now (or about to be): wait until it is.
        let pid = child.id();
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('S'))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let interp = Interpreter::of_process(pid);
        let walked = interp.map(|i| {
            let threads = i.threads(pid);
            let named: Option<Vec<(String, u32, bool)>> = threads.as_ref().ok().map(|t| {
                t[0].frames
                    .iter()
                    .map(|f| {
                        let code = CodeObject::read(pid, f.code, Some(i.code_type))
                            .expect("each frame's code object");
                        let line = code.line_of(code.instruction(f.prev_instr).unwrap_or(0));
                        (code.qualname, line, f.is_entry)
                    })
                    .collect()
            });
            (threads.map(|t| (t.len(), t[0].tid)), named)
        });
        let _ = child.kill();
        let _ = child.wait();
        let version = std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import sys; print(sys.version_info[:2] == (3, 11))"])
            .output()
            .expect("python3 runs");
        if String::from_utf8_lossy(&version.stdout).trim() != "True" {
            assert_eq!(interp, None, "only 3.11 is recognised");
            return;
        }
        let interp = interp.expect("a 3.11 interpreter is found");
        assert_eq!(interp.version >> 16, 0x030b);
        let (threads, named) = walked.expect("walked");
        assert_eq!(threads.expect("its threads are read"), (1, u64::from(pid)));
        assert_eq!(
            named.expect("named"),
            [
                ("inner".to_string(), 4, false),
                ("outer".to_string(), 6, false),
                ("<module>".to_string(), 7, true)
            ]
        );
    }
}
