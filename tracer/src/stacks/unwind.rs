//! Unwinding a copied user stack in userspace, as `perf --call-graph dwarf` does: the
//! modules mapped in the process (`/proc/PID/maps`), each file opened once through
//! `/proc/PID/map_files` (so deleted or replaced binaries and other mount namespaces work)
//! and kept open; framehop walks the stack with their `.eh_frame`/`.debug_frame`. The
//! kernel's frame-pointer walk is the fallback, and continues a DWARF walk that ran out of
//! copied stack.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    ops::{Deref, Range},
    path::PathBuf,
    sync::Arc,
};

use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};
use object::{Object, ObjectSection, ObjectSegment};

use super::RawStack;
use crate::procfs;

/// Files larger than this are not read for unwinding (their frames are still named by
/// module and offset).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Frames kept per stack at most.
pub const MAX_FRAMES: usize = 128;

/// Bytes shared by the unwind sections of one file.
#[derive(Clone, Default)]
pub struct Slice {
    data: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data.get(self.range.clone()).unwrap_or(&[])
    }
}

/// A mapped file, read once and kept open (blazesym reads it again through
/// `/proc/self/fd/N`, which works after the traced process or the file is gone).
pub struct ModuleFile {
    /// Small and unique per file: frames are deduplicated by (file id, offset).
    pub id: u64,
    pub data: Arc<Vec<u8>>,
    _file: File,
    pub fd_path: PathBuf,
}

/// One executable mapping of a process.
#[derive(Clone)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// As in `/proc/PID/maps` (its text form), `None` for anonymous memory.
    pub path: Option<String>,
    pub file: Option<Arc<ModuleFile>>,
}

impl Mapping {
    /// The module name shown for a frame in this mapping.
    pub fn module(&self) -> String {
        match &self.path {
            Some(p) => p.strip_suffix(" (deleted)").unwrap_or(p).to_string(),
            None => "[anon]".to_string(),
        }
    }

    /// `addr`'s offset in the file (in anonymous memory: from the mapping's start).
    pub fn file_offset(&self, addr: u64) -> u64 {
        if self.file.is_some() {
            addr - self.start + self.offset
        } else {
            addr - self.start
        }
    }
}

/// An unwound frame: its address, the address to look up (a return address minus one: the
/// call), and its mapping.
#[derive(Clone)]
pub struct UnwoundFrame {
    pub addr: u64,
    pub lookup: u64,
    pub mapping: Option<Mapping>,
}

/// A stack as addresses, with the process it came from.
pub struct Unwound {
    pub pid: u32,
    pub frames: Vec<UnwoundFrame>,
}

/// What identifies a frame across processes: the file and offset, or the process and
/// address for anonymous memory.
pub type FrameKey = (u64, u64);

impl Unwound {
    pub fn keys(&self) -> Vec<FrameKey> {
        self.frames
            .iter()
            .map(|f| match &f.mapping {
                Some(m) => match &m.file {
                    Some(file) => (file.id, m.file_offset(f.addr)),
                    None => (u64::MAX - u64::from(self.pid), f.addr),
                },
                None => (u64::MAX - u64::from(self.pid), f.addr),
            })
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
type Native = framehop::x86_64::UnwinderX86_64<Slice>;
#[cfg(target_arch = "x86_64")]
type NativeCache = framehop::x86_64::CacheX86_64;
#[cfg(target_arch = "aarch64")]
type Native = framehop::aarch64::UnwinderAarch64<Slice>;
#[cfg(target_arch = "aarch64")]
type NativeCache = framehop::aarch64::CacheAarch64;

/// A process's executable mappings and the framehop unwinder over them.
struct Process {
    maps: Vec<Mapping>,
    unwinder: Native,
    cache: NativeCache,
    /// `/proc/PID/maps` could not be read again (the process is gone): keep what we have.
    gone: bool,
}

/// Unwinds stacks of every traced process.
#[derive(Default)]
pub struct Unwinder {
    procs: HashMap<u32, Process>,
    /// Mapped files by (device, inode).
    files: HashMap<(String, u64), Option<Arc<ModuleFile>>>,
}

impl Unwinder {
    /// The frames of `raw`: DWARF unwinding of the copy, joined to or replaced by the
    /// kernel's frame-pointer walk where that one sees further.
    pub fn unwind(&mut self, raw: &RawStack) -> Unwound {
        let ip = raw.regs[0];
        if self.mapping_of(raw.pid, ip).is_none() {
            self.refresh(raw.pid);
        }
        let dwarf = self.dwarf_frames(raw);
        let fp = &raw.fp_frames;
        let mut addrs: Vec<(u64, bool)> = if dwarf.len() >= 2 || fp.len() < 2 {
            dwarf
        } else {
            fp.iter().enumerate().map(|(i, &a)| (a, i == 0)).collect()
        };
        // DWARF ran out of copied stack: the frame-pointer walk may go on from its last
        // frame.
        if let Some(&(last, _)) = addrs.last()
            && addrs.len() > 1
            && let Some(at) = fp.iter().position(|&a| a == last)
        {
            addrs.extend(fp[at + 1..].iter().map(|&a| (a, false)));
        }
        addrs.truncate(MAX_FRAMES);
        // A return address outside every known mapping may be a module mapped since.
        if addrs
            .iter()
            .any(|&(a, _)| self.mapping_of(raw.pid, a).is_none())
        {
            self.refresh(raw.pid);
        }
        let frames = addrs
            .into_iter()
            .map(|(addr, first)| UnwoundFrame {
                addr,
                lookup: if first { addr } else { addr.saturating_sub(1) },
                mapping: self.mapping_of(raw.pid, addr).cloned(),
            })
            .collect();
        Unwound {
            pid: raw.pid,
            frames,
        }
    }

    /// The executable mapping of `pid` holding `addr`.
    pub fn mapping_of(&self, pid: u32, addr: u64) -> Option<&Mapping> {
        let p = self.procs.get(&pid)?;
        let i = p.maps.partition_point(|m| m.start <= addr);
        p.maps[..i].last().filter(|m| addr < m.end)
    }

    /// Forgets a process (its files stay open for other processes and for symbolizing).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    fn dwarf_frames(&mut self, raw: &RawStack) -> Vec<(u64, bool)> {
        let Some(p) = self.procs.get_mut(&raw.pid) else {
            return vec![(raw.regs[0], true)];
        };
        let sp = raw.regs[1];
        let stack = &raw.stack;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = addr.checked_sub(sp).ok_or(())? as usize;
            let bytes = stack.get(off..off + 8).ok_or(())?;
            Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
        };
        #[cfg(target_arch = "x86_64")]
        let regs = framehop::x86_64::UnwindRegsX86_64::new(raw.regs[0], sp, raw.regs[2]);
        #[cfg(target_arch = "aarch64")]
        let regs = framehop::aarch64::UnwindRegsAarch64::new(raw.regs[3], sp, raw.regs[2]);
        let mut out = Vec::new();
        let mut it = p
            .unwinder
            .iter_frames(raw.regs[0], regs, &mut p.cache, &mut read_stack);
        while let Ok(Some(frame)) = it.next() {
            out.push((frame.address(), out.is_empty()));
            if out.len() >= MAX_FRAMES {
                break;
            }
        }
        if out.is_empty() {
            out.push((raw.regs[0], true));
        }
        out
    }

    /// Reads `pid`'s executable mappings again and rebuilds its unwinder.
    fn refresh(&mut self, pid: u32) {
        if self.procs.get(&pid).is_some_and(|p| p.gone) {
            return;
        }
        let Ok(entries) = procfs::read_maps(pid) else {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.gone = true;
            }
            return;
        };
        let mut maps = Vec::new();
        let mut unwinder = Native::new();
        for e in entries.iter().filter(|e| e.perms.exec) {
            let file = match (&e.path, e.inode) {
                (Some(_), inode) if inode != 0 => self.file(pid, e.start, e.end, &e.dev, inode),
                _ => None,
            };
            let m = Mapping {
                start: e.start,
                end: e.end,
                offset: e.offset,
                path: e.path.clone(),
                file,
            };
            if let Some(module) = m.file.as_ref().and_then(|f| module_of(&m, f)) {
                unwinder.add_module(module);
            }
            maps.push(m);
        }
        self.procs.insert(
            pid,
            Process {
                maps,
                unwinder,
                cache: NativeCache::new(),
                gone: false,
            },
        );
    }

    /// The file mapped at `start-end` in `pid`, read once per (device, inode).
    fn file(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        dev: &str,
        inode: u64,
    ) -> Option<Arc<ModuleFile>> {
        let next_id = self.files.len() as u64 + 1;
        self.files
            .entry((dev.to_string(), inode))
            .or_insert_with(|| open_module(pid, start, end, next_id))
            .clone()
    }
}

/// Opens the file of a mapping through `/proc/PID/map_files` (the file the process mapped,
/// even deleted or in another mount namespace) and reads it.
fn open_module(pid: u32, start: u64, end: u64, id: u64) -> Option<Arc<ModuleFile>> {
    let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let mut file = File::open(&link)
        .map_err(|e| log::debug!("cannot open {link}: {e}"))
        .ok()?;
    let len = file.metadata().ok()?.len();
    if len > MAX_FILE_BYTES {
        return None;
    }
    let mut data = Vec::with_capacity(len as usize);
    file.read_to_end(&mut data).ok()?;
    use std::os::fd::AsRawFd;
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Some(Arc::new(ModuleFile {
        id,
        data: Arc::new(data),
        _file: file,
        fd_path,
    }))
}

/// The framehop module of an executable mapping: its unwind sections, and where the file's
/// addresses are in the process (from the segment that holds the mapping's file offset).
fn module_of(m: &Mapping, f: &ModuleFile) -> Option<Module<Slice>> {
    let elf = object::File::parse(&f.data[..]).ok()?;
    let seg = elf.segments().find(|s| {
        let (off, size) = s.file_range();
        off <= m.offset && m.offset < off + size
    })?;
    let (seg_off, _) = seg.file_range();
    // avma = svma + bias, for every byte of the segment.
    let bias = (m.start as i64 - m.offset as i64 + seg_off as i64 - seg.address() as i64) as u64;
    let section = |name: &str| -> (Option<Range<u64>>, Option<Slice>) {
        let Some(s) = elf.section_by_name(name) else {
            return (None, None);
        };
        let svma = s.address()..s.address() + s.size();
        let data = s.file_range().map(|(off, size)| Slice {
            data: f.data.clone(),
            range: off as usize..(off + size) as usize,
        });
        (Some(svma), data)
    };
    let (text_svma, text) = section(".text");
    let (eh_frame_svma, eh_frame) = section(".eh_frame");
    let (eh_frame_hdr_svma, eh_frame_hdr) = section(".eh_frame_hdr");
    let (got_svma, _) = section(".got");
    let (_, debug_frame) = section(".debug_frame");
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        got_svma,
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr_svma,
        eh_frame_hdr,
        debug_frame,
        ..Default::default()
    };
    Some(Module::new(m.module(), m.start..m.end, bias, info))
}
