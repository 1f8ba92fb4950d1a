//! CPython 3.11 read from a running interpreter's memory (`docs/design/python-frames.md`,
//! which gives the layout's sources and how it was checked on Debian 12's `python3.11`):
//! where the interpreter's globals are ([`Interpreter`]), each thread's chain of frames, and
//! the function, file and line a frame stands for ([`CodeObject`]). At a traced call the
//! kernel walks the calling thread's frames (`tracer-ebpf/src/python.rs`, given the
//! [`PyProc`] of [`Interpreter::proc`]) and writes each frame's code object and instruction
//! (`EventKind::PyStack`); what they point at, the code object of a function, lives as long
//! as the function, so the daemon reads it after the call ([`Codes`]) and [`merge`]s the
//! Python frames into the native stack in place of the evaluation loop's frames.

use std::{collections::HashMap, sync::Arc};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use tracer_common::{
    EventHeader, EventKind, PY_FRAMES_MAX, PyCodeRecord, PyFrameRaw, PyFrameWindow, PyProc,
    PyStackHead,
};

use crate::{event::DecodeError, stacks::Frame};

/// `_PyRuntimeState`, `PyInterpreterState`, `PyThreadState`, `_PyCFrame` and
/// The minor version of the only CPython 3 whose frames are walked.
pub const WALKED_MINOR: u32 = 11;

/// `_PyInterpreterFrame` of CPython 3.11 on 64-bit Linux: the fields of the walk.
mod runtime {
    /// `_PyRuntime.interpreters.head`.
    pub const INTERPRETERS_HEAD: u64 = 40;
    /// `_PyRuntime.gilstate.tstate_current` and `.autoTSSkey`.
    pub const TSTATE_CURRENT: u64 = 576;
    pub const TSS_KEY: u64 = 592;
    /// `PyInterpreterState.threads.head`.
    pub const THREADS_HEAD: u64 = 16;
    /// `PyThreadState.next`, `.cframe`, `.thread_id` (`pthread_self`), `.native_thread_id`
    /// (the thread's id).
    pub const THREAD_NEXT: u64 = 8;
    pub const THREAD_CFRAME: u64 = 56;
    pub const THREAD_ID: u64 = 152;
    pub const THREAD_NATIVE_ID: u64 = 160;
    /// `_PyCFrame.current_frame`.
    pub const CURRENT_FRAME: u64 = 8;
    /// `_PyInterpreterFrame.f_code`: where its `PyFrameWindow` starts.
    pub const FRAME_WINDOW: u64 = 32;
    /// glibc 2.36 (x86_64): `offsetof(struct pthread, specific_1stblock)`, from the thread's
    /// TLS base (`pthread_self()`). The kernel checks each thread state it finds there.
    pub const TSD_BLOCK: u32 = 0x310;
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
        Self::read_from(&Process(pid), addr, code_type)
    }

    /// As [`CodeObject::read`], from `mem`: a process, or the kernel's copy of the objects.
    fn read_from(
        mem: &impl Memory,
        addr: u64,
        code_type: Option<u64>,
    ) -> Result<Self, PythonError> {
        let head = mem.read(addr, code::HEADER)?;
        if head.len() < code::HEADER {
            return Err(PythonError::Malformed {
                addr,
                what: "header",
            });
        }
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
            qualname: read_str(mem, word(code::QUALNAME))?.ok_or(malformed("qualname"))?,
            filename: read_str(mem, word(code::FILENAME))?.ok_or(malformed("filename"))?,
            first_line: u32::try_from(int(code::FIRST_LINE)).map_err(|_| malformed("line"))?,
            first_traceable: u32::try_from(int(code::FIRST_TRACEABLE)).unwrap_or(0),
            linetable: read_bytes(mem, word(code::LINETABLE))?.ok_or(malformed("line table"))?,
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
            module: Some(MODULE.into()),
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

impl Interpreter {
    /// What the kernel's walk needs to find this interpreter's frames and copy its code
    /// objects; `generation` tells this finding from earlier ones in the same process.
    pub fn proc(&self, generation: u32) -> PyProc {
        PyProc {
            runtime: self.runtime,
            tstate_current: runtime::TSTATE_CURRENT as u32,
            tss_key: runtime::TSS_KEY as u32,
            thread_id: runtime::THREAD_ID as u32,
            cframe: runtime::THREAD_CFRAME as u32,
            current_frame: runtime::CURRENT_FRAME as u32,
            frame_window: runtime::FRAME_WINDOW as u32,
            code_qualname: code::QUALNAME as u32,
            code_filename: code::FILENAME as u32,
            code_linetable: code::LINETABLE as u32,
            tsd_block: if cfg!(all(target_arch = "x86_64", target_env = "gnu")) {
                runtime::TSD_BLOCK
            } else {
                0
            },
            generation,
        }
    }
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
            let data = read_elf(&format!("/proc/{pid}/map_files/{range}"))
                .or_else(|_| read_elf(&format!("/proc/{pid}/root{path}")))
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
                .filter(|d| d.checked_add(4).is_some_and(|end| end <= size))?;
            let at = usize::try_from(offset.checked_add(within)?).ok()?;
            Some(u32::from_ne_bytes(
                data.get(at..at.checked_add(4)?)?.try_into().ok()?,
            ))
        })?;
        // 3.11.0 final and later 3.11 releases (the alphas' and betas' layouts differ), built
        // for a 64-bit little-endian machine like the offsets.
        if !(0x030b_00f0..0x030c_0000).contains(&version)
            || !file.is_64()
            || !file.is_little_endian()
        {
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
            frame + runtime::FRAME_WINDOW,
            size_of::<PyFrameWindow>(),
        )?;
        // SAFETY: `f` has the window's size; the window is plain integers read unaligned.
        let w: PyFrameWindow = unsafe { std::ptr::read_unaligned(f.as_ptr().cast()) };
        out.push(FrameRef {
            code: w.code,
            prev_instr: w.prev_instr,
            is_entry: w.is_entry != 0,
            owner: w.owner,
        });
        frame = w.previous;
    }
    Ok(out)
}

/// Files larger than this are not read as an interpreter (CPython 3.11's are about 7 MB).
const MAX_ELF_BYTES: u64 = 256 << 20;

/// The file at `path` when it is no larger than [`MAX_ELF_BYTES`].
fn read_elf(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut data = Vec::new();
    file.take(MAX_ELF_BYTES + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_ELF_BYTES {
        return Err(std::io::Error::other("too large for an interpreter"));
    }
    Ok(data)
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
    // `None` when the table ends inside the number (a copy cut short).
    let varint = |bytes: &mut std::iter::Peekable<std::iter::Copied<std::slice::Iter<u8>>>| {
        let (mut v, mut shift) = (0u64, 0u32);
        for b in bytes.by_ref() {
            v |= u64::from(b & 63).checked_shl(shift).unwrap_or(0);
            shift = shift.saturating_add(6);
            if b & 64 == 0 {
                return Some(v);
            }
        }
        None
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
                line = line.saturating_add(i64::from(code - 10));
                bytes.next();
                bytes.next();
                true
            }
            13 => {
                line = line.saturating_add(svarint(varint(&mut bytes)?));
                true
            }
            14 => {
                line = line.saturating_add(svarint(varint(&mut bytes)?));
                for _ in 0..3 {
                    varint(&mut bytes)?;
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

/// Where objects are read from.
trait Memory {
    /// The `len` bytes at `addr`; a copy may give only the first of them (it holds the start
    /// of each object), never bytes of anything else.
    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PythonError>;
}

/// A live process's memory.
struct Process(u32);

impl Memory for Process {
    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PythonError> {
        read_remote(self.0, addr, len)
    }
}

/// The kernel's copy of a code object and of the objects it names
/// ([`tracer_common::PyCodeRecord`]): the first bytes of each, by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    pid: u32,
    parts: Vec<(u64, Vec<u8>)>,
}

impl Memory for Copied {
    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PythonError> {
        self.parts
            .iter()
            .find_map(|(base, bytes)| {
                let at = usize::try_from(addr.checked_sub(*base)?).ok()?;
                (at < bytes.len()).then(|| bytes[at..bytes.len().min(at + len)].to_vec())
            })
            .ok_or(PythonError::Read {
                pid: self.pid,
                addr,
                len,
            })
    }
}

/// The copy of a code object in a [`EventKind::PyCode`] record: its process, the
/// interpreter's generation, the code object's address and the copy; `None` for a record of
/// another kind.
pub fn decode_code(bytes: &[u8]) -> Result<Option<(u32, u32, u64, Copied)>, DecodeError> {
    let header: EventHeader = super::read(bytes)?;
    if header.kind != EventKind::PyCode as u32 {
        return Ok(None);
    }
    let r: PyCodeRecord = super::read(bytes)?;
    let part = |addr: u64, b: &[u8], len: u32| (addr, b[..b.len().min(len as usize)].to_vec());
    let parts = vec![
        (r.code, r.head.to_vec()),
        part(r.qualname, &r.qualname_bytes, r.qualname_len),
        part(r.filename, &r.filename_bytes, r.filename_len),
        part(r.linetable, &r.linetable_bytes, r.linetable_len),
    ]
    .into_iter()
    .filter(|(addr, b)| *addr != 0 && !b.is_empty())
    .collect();
    Ok(Some((
        header.tgid,
        header.detail,
        r.code,
        Copied {
            pid: header.tgid,
            parts,
        },
    )))
}

/// Reads `len` bytes at `addr` in process `pid`, whole or not at all.
fn read_remote(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, PythonError> {
    crate::remote::read(pid, addr, len).ok_or(PythonError::Read { pid, addr, len })
}

/// A compact `str` at `addr` (every name and file name CPython 3.11 makes), or `None` when
/// it is not one.
fn read_str(mem: &impl Memory, addr: u64) -> Result<Option<String>, PythonError> {
    if addr == 0 {
        return Ok(None);
    }
    let head = mem.read(addr, pyobject::STR_ASCII_DATA)?;
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
    // A copy may hold the first characters only.
    let mut bytes = mem.read(addr + data as u64, length * kind)?;
    bytes.truncate(bytes.len() / kind * kind);
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
fn read_bytes(mem: &impl Memory, addr: u64) -> Result<Option<Vec<u8>>, PythonError> {
    if addr == 0 {
        return Ok(None);
    }
    let head = mem.read(addr, pyobject::BYTES_DATA)?;
    let size = u64_at(&head, pyobject::BYTES_SIZE);
    match usize::try_from(size) {
        Ok(n) if n <= MAX_LINETABLE => mem.read(addr + pyobject::BYTES_DATA as u64, n).map(Some),
        _ => Ok(None),
    }
}

/// The Python frames of a [`EventKind::PyStack`] record, with its process and the key of the
/// native stack they go with (thread, owner kind, key time); `None` for a record of another
/// kind.
pub fn decode(
    bytes: &[u8],
) -> Result<Option<(u32, super::StackKey, Vec<PyFrameRaw>)>, DecodeError> {
    let header: EventHeader = super::read(bytes)?;
    if header.kind != EventKind::PyStack as u32 {
        return Ok(None);
    }
    let head: PyStackHead = super::read(bytes)?;
    let n = (head.frames as usize).min(PY_FRAMES_MAX);
    let start = size_of::<PyStackHead>();
    let need = start + n * size_of::<PyFrameRaw>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            got: bytes.len(),
            need,
        });
    }
    let frames = bytes[start..need]
        .chunks_exact(size_of::<PyFrameRaw>())
        // SAFETY: each chunk has the frame's size; the frame is plain integers.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<PyFrameRaw>()) })
        .collect();
    Ok(Some((
        header.tgid,
        (header.tid, header.detail, header.ts_ns),
        frames,
    )))
}

/// A Python frame ready to merge: its frame (`None` for one still being set up, which
/// tracebacks skip too) and whether it began a call of the evaluation loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    pub frame: Option<Frame>,
    pub is_entry: bool,
}

/// The module name of a Python frame.
pub const MODULE: &str = "[python]";

/// Whether `f` is a Python function's frame (merged from the interpreter's memory).
pub fn is_python(f: &Frame) -> bool {
    f.module.as_deref() == Some(MODULE)
}

/// Whether a native frame is CPython's evaluation loop, which runs the Python frames.
fn is_eval_loop(f: &Frame) -> bool {
    !f.inlined
        && f.function
            .as_deref()
            .is_some_and(|n| n.starts_with("_PyEval_EvalFrameDefault"))
}

/// The stack with its Python frames, innermost first: each native frame of the evaluation
/// loop stands for the Python frames up to the next one that began a call of the loop
/// (`is_entry`), and is replaced by them. Python frames left over (the native walk was cut
/// short, or found no loop) follow the last frame.
pub fn merge(native: Vec<Frame>, python: &[PyFrame]) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    let mut py = python.iter();
    let mut out = Vec::with_capacity(native.len() + python.len());
    let mut rest = true;
    for f in native {
        if rest && is_eval_loop(&f) {
            let mut any = false;
            for p in py.by_ref() {
                any = true;
                out.extend(p.frame.clone());
                if p.is_entry {
                    break;
                }
            }
            if !any {
                rest = false;
                out.push(f);
            }
        } else {
            out.push(f);
        }
    }
    out.extend(py.filter_map(|p| p.frame.clone()));
    out
}

/// The CPython interpreters of the traced processes and the code objects their frames
/// pointed at, read once each.
#[derive(Default)]
pub struct Codes {
    /// Each process's interpreter and the generation the kernel knows it by.
    interpreters: HashMap<u32, (Interpreter, u32)>,
    /// (pid, code object's address) -> the code object (`None`: unreadable, or not code).
    codes: HashMap<(u32, u64), Option<Arc<CodeObject>>>,
    /// The kernel's copies of code objects not read yet.
    copies: HashMap<(u32, u64), Copied>,
    next_generation: u32,
}

/// Code objects remembered at most (a program that compiles code in a loop).
const MAX_CODES: usize = 65536;

impl Codes {
    /// Looks for a CPython 3.11 in process `pid`; the [`PyProc`] for the kernel when one is
    /// found that was not known yet.
    pub fn watch(&mut self, pid: u32) -> Option<PyProc> {
        let found = Interpreter::of_process(pid)?;
        if self
            .interpreters
            .get(&pid)
            .is_some_and(|(i, _)| *i == found)
        {
            return None;
        }
        Some(self.know(pid, found))
    }

    fn know(&mut self, pid: u32, interpreter: Interpreter) -> PyProc {
        self.next_generation = self.next_generation.wrapping_add(1);
        self.interpreters
            .insert(pid, (interpreter, self.next_generation));
        interpreter.proc(self.next_generation)
    }

    /// Whether process `pid` runs an interpreter whose frames are walked.
    pub fn runs_python(&self, pid: u32) -> bool {
        self.interpreters.contains_key(&pid)
    }

    /// A child forked by `parent` runs the same interpreter at the same addresses.
    pub fn forked(&mut self, parent: u32, child: u32) -> Option<PyProc> {
        let (i, _) = *self.interpreters.get(&parent)?;
        Some(self.know(child, i))
    }

    /// Forgets process `pid` (it exited or ran exec); whether it ran an interpreter.
    pub fn forget(&mut self, pid: u32) -> bool {
        self.codes.retain(|(p, _), _| *p != pid);
        self.copies.retain(|(p, _), _| *p != pid);
        self.interpreters.remove(&pid).is_some()
    }

    /// Keeps the kernel's copy of a code object of `pid` (made for its interpreter's
    /// `generation`), to read it from should the process be gone.
    pub fn copied(&mut self, pid: u32, generation: u32, code: u64, copy: Copied) {
        if self.interpreters.get(&pid).map(|(_, g)| *g) != Some(generation)
            || self.codes.contains_key(&(pid, code))
        {
            return;
        }
        if self.copies.len() >= MAX_CODES {
            self.copies.clear();
        }
        self.copies.insert((pid, code), copy);
    }

    /// Reads the code objects of `raw` not read yet, now, while process `pid` most likely
    /// lives (its frames arrived just now; the stack is named later).
    pub fn prefetch(&mut self, pid: u32, raw: &[PyFrameRaw]) {
        let code_type = self.interpreters.get(&pid).map(|(i, _)| i.code_type);
        for r in raw {
            self.code(pid, r.code, code_type);
        }
    }

    /// The frames of `raw` (innermost first), named from their code objects in process
    /// `pid` (read now, or remembered).
    pub fn frames(&mut self, pid: u32, raw: &[PyFrameRaw]) -> Vec<PyFrame> {
        let code_type = self.interpreters.get(&pid).map(|(i, _)| i.code_type);
        raw.iter()
            .map(|r| {
                let code = self.code(pid, r.code, code_type);
                let frame = match &code {
                    Some(c) => {
                        let first = code::BYTECODE as u64 + 2 * u64::from(c.first_traceable);
                        // A frame before its first traceable instruction is being set up
                        // (a generator's never is).
                        (u64::from(r.instr_offset) >= first || r.owner == 1).then(|| {
                            c.frame(
                                c.instruction(c.addr + u64::from(r.instr_offset))
                                    .unwrap_or(0),
                            )
                        })
                    }
                    // The instruction's offset in the bytecode, as for a named frame.
                    None => Some(Frame {
                        addr: r.code,
                        module: Some(MODULE.into()),
                        offset: u64::from(r.instr_offset).saturating_sub(code::BYTECODE as u64),
                        ..Frame::default()
                    }),
                };
                PyFrame {
                    frame,
                    is_entry: r.is_entry != 0,
                }
            })
            .collect()
    }

    fn code(&mut self, pid: u32, addr: u64, code_type: Option<u64>) -> Option<Arc<CodeObject>> {
        if let Some(c) = self.codes.get(&(pid, addr)) {
            return c.clone();
        }
        // From the process while it lives (the whole line table), else from the kernel's copy.
        let copy = self.copies.remove(&(pid, addr));
        let read = CodeObject::read(pid, addr, code_type)
            .or_else(|e| match &copy {
                Some(copy) => CodeObject::read_from(copy, addr, code_type),
                None => Err(e),
            })
            .inspect_err(|e| log::debug!("python frame of {pid}: {e}"))
            .ok()
            .map(Arc::new);
        if self.codes.len() >= MAX_CODES {
            self.codes.clear();
        }
        self.codes.insert((pid, addr), read.clone());
        read
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

    fn table_bytes() -> Vec<u8> {
        table()
    }

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
        // A copy cut inside an entry's line delta (bit 6: more to come), and a hostile delta
        // far past any line.
        let long = 0x80 | (13 << 3);
        assert_eq!(line_of(&[long, 0x42], 1, 0), None);
        let mut huge = vec![long];
        huge.extend([0x7f; 11]);
        huge.push(0x3e);
        assert_eq!(line_of(&huge, u32::MAX, 0), None);
    }

    /// Debian's `python3.11` is found; the same file claiming a 3.11 beta's version (whose
    /// layout differs) is not.
    #[test]
    fn only_a_released_311_is_an_interpreter() {
        use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
        let Ok(mut data) = std::fs::read("/usr/bin/python3.11") else {
            return;
        };
        let found = Interpreter::in_file(&data, 0x40_0000).expect("Debian's python3.11");
        assert_eq!(found.version >> 16, 0x030b);
        let at = {
            let file = object::File::parse(&*data).expect("ELF");
            let addr = file
                .dynamic_symbols()
                .find(|s| s.name() == Ok("Py_Version"))
                .expect("Py_Version")
                .address();
            file.segments()
                .find_map(|s| {
                    let (offset, size) = s.file_range();
                    let within = addr.checked_sub(s.address()).filter(|d| *d < size)?;
                    usize::try_from(offset + within).ok()
                })
                .expect("in a segment")
        };
        data[at..at + 4].copy_from_slice(&0x030b_00b4u32.to_ne_bytes());
        assert_eq!(Interpreter::in_file(&data, 0x40_0000), None);
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

    fn native(name: &str) -> Frame {
        Frame {
            function: Some(name.into()),
            module: Some("/usr/bin/python3.11".into()),
            ..Frame::default()
        }
    }

    fn py(name: &str, is_entry: bool) -> PyFrame {
        PyFrame {
            frame: Some(Frame {
                function: Some(name.into()),
                module: Some(MODULE.into()),
                ..Frame::default()
            }),
            is_entry,
        }
    }

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames
            .iter()
            .map(|f| f.function.as_deref().unwrap_or("?"))
            .collect()
    }

    #[test]
    fn each_evaluation_loop_frame_becomes_the_python_frames_it_ran() {
        let eval = "_PyEval_EvalFrameDefault";
        let stack = vec![
            native("__mmap64"),
            native("new_mmap_object"),
            native(eval),
            native("sorted_impl"),
            native(eval),
            native("main"),
        ];
        // `inner` and `outer` run in the innermost loop (`outer` began it), a frame still
        // being set up and `<module>` in the outer one.
        let python = [
            py("inner", false),
            py("outer", true),
            PyFrame {
                frame: None,
                is_entry: false,
            },
            py("<module>", true),
        ];
        assert_eq!(
            names(&merge(stack.clone(), &python)),
            [
                "__mmap64",
                "new_mmap_object",
                "inner",
                "outer",
                "sorted_impl",
                "<module>",
                "main"
            ]
        );
        // The native walk cut after the first loop: the rest follow its last frame.
        assert_eq!(
            names(&merge(stack[..3].to_vec(), &python)),
            ["__mmap64", "new_mmap_object", "inner", "outer", "<module>"]
        );
        // More loops than Python frames: the extra loop stays native.
        assert_eq!(
            names(&merge(stack.clone(), &python[..2])),
            [
                "__mmap64",
                "new_mmap_object",
                "inner",
                "outer",
                "sorted_impl",
                eval,
                "main"
            ]
        );
        // No Python frames: the stack as it was.
        assert_eq!(merge(stack.clone(), &[]), stack);
    }

    #[test]
    fn decodes_a_python_stack_record_cut_after_its_frames() {
        let mut rec = tracer_common::PyStackRecord {
            head: PyStackHead {
                header: EventHeader::new(EventKind::PyStack, 5, 6, EventKind::Syscall as u32, 77),
                frames: 2,
                via: tracer_common::PY_VIA_TSD,
            },
            frames: [PyFrameRaw::default(); PY_FRAMES_MAX],
        };
        rec.frames[0].code = 0x1000;
        rec.frames[0].instr_offset = 190;
        rec.frames[1].code = 0x2000;
        rec.frames[1].is_entry = 1;
        // SAFETY: test helper over a plain-old-data ABI type.
        let all = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const tracer_common::PyStackRecord).cast::<u8>(),
                size_of::<tracer_common::PyStackRecord>(),
            )
        };
        let cut = &all[..size_of::<PyStackHead>() + 2 * size_of::<PyFrameRaw>()];
        let (pid, key, frames) = decode(cut).expect("decodes").expect("a python stack");
        assert_eq!((pid, key), (5, (6, EventKind::Syscall as u32, 77)));
        assert_eq!(frames, rec.frames[..2]);
        assert!(decode(&cut[..cut.len() - 1]).is_err());
        let mut other = cut.to_vec();
        other[..4].copy_from_slice(&(EventKind::Stack as u32).to_ne_bytes());
        assert_eq!(decode(&other), Ok(None));
    }

    /// A code object as the kernel copies it: its header, an ASCII name, a latin-1 file name
    /// cut short, and the start of its line table.
    #[test]
    fn a_kernel_copy_of_a_code_object_names_it_as_far_as_it_goes() {
        let (code, name, file, table) = (0x10_000u64, 0x20_000u64, 0x30_000u64, 0x40_000u64);
        let mut rec: tracer_common::PyCodeRecord =
            // SAFETY: all-zero bytes are a valid record (plain integers).
            unsafe { std::mem::zeroed() };
        rec.header = EventHeader::new(EventKind::PyCode, 9, 9, 3, 0);
        (rec.code, rec.qualname, rec.filename, rec.linetable) = (code, name, file, table);
        let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut rec.head, code::OB_TYPE, &0x959440u64.to_ne_bytes());
        put(&mut rec.head, code::FIRST_LINE, &10i32.to_ne_bytes());
        put(&mut rec.head, code::FILENAME, &file.to_ne_bytes());
        put(&mut rec.head, code::QUALNAME, &name.to_ne_bytes());
        put(&mut rec.head, code::LINETABLE, &table.to_ne_bytes());
        // Compact ASCII (kind 1): "grow".
        put(
            &mut rec.qualname_bytes,
            pyobject::STR_LENGTH,
            &4u64.to_ne_bytes(),
        );
        put(
            &mut rec.qualname_bytes,
            pyobject::STR_STATE,
            &(1u32 << 2 | 1 << 5 | 1 << 6).to_ne_bytes(),
        );
        put(&mut rec.qualname_bytes, pyobject::STR_ASCII_DATA, b"grow");
        rec.qualname_len = 64;
        // Compact latin-1, 300 characters, of which the copy holds the first.
        put(
            &mut rec.filename_bytes,
            pyobject::STR_LENGTH,
            &300u64.to_ne_bytes(),
        );
        put(
            &mut rec.filename_bytes,
            pyobject::STR_STATE,
            &(1u32 << 2 | 1 << 5).to_ne_bytes(),
        );
        for (i, c) in "/tmp/größe".chars().enumerate() {
            rec.filename_bytes[pyobject::STR_COMPACT_DATA + i] = c as u32 as u8;
        }
        rec.filename_len = tracer_common::PY_STR_BYTES as u32;
        let t = table_bytes();
        put(
            &mut rec.linetable_bytes,
            pyobject::BYTES_SIZE,
            &(t.len() as u64).to_ne_bytes(),
        );
        put(&mut rec.linetable_bytes, pyobject::BYTES_DATA, &t);
        rec.linetable_len = (pyobject::BYTES_DATA + t.len()) as u32;
        // SAFETY: test helper over a plain-old-data ABI type.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const tracer_common::PyCodeRecord).cast::<u8>(),
                size_of::<tracer_common::PyCodeRecord>(),
            )
        };
        let (pid, generation, at, copy) = decode_code(bytes).expect("decodes").expect("a copy");
        assert_eq!((pid, generation, at), (9, 3, code));
        let c = CodeObject::read_from(&copy, code, Some(0x959440)).expect("named from the copy");
        assert_eq!(c.qualname, "grow");
        assert!(c.filename.starts_with("/tmp/größe"), "{}", c.filename);
        assert_eq!(
            c.filename.chars().count(),
            tracer_common::PY_STR_BYTES - pyobject::STR_COMPACT_DATA
        );
        // Lines from the table (see `the_line_table_gives_the_lines_cpython_gives`), from
        // line 10.
        assert_eq!(c.line_of(40 / 2), 13);
        assert!(CodeObject::read_from(&copy, code, Some(0x1234)).is_err());
        // Bytes the copy does not hold are not read from it.
        assert!(copy.read(code + 4096, 8).is_err());
    }
}
