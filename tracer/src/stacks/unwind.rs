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

use std::os::unix::ffi::OsStrExt;

use super::RawStack;
use crate::{
    model::{AddressSpace, Backing},
    procfs,
};

/// Files larger than this are not read for unwinding (their frames are still named by
/// module and offset).
const MAX_FILE_BYTES: u64 = 1 << 30;

const PAGE: u64 = 4096;

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
    pub inode: u64,
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
#[derive(Clone)]
pub struct Unwound {
    pub pid: u32,
    pub frames: Vec<UnwoundFrame>,
    /// The frames are the DWARF walk's alone, which never read past the copy: a pure
    /// function of the registers, the words it read ([`Unwinder::reads`]) and the mappings,
    /// which the frame-pointer walk changed nothing of.
    pub self_contained: bool,
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
    /// The model's generation the maps were last read from (`None`: from `/proc/PID/maps`).
    seen: Option<usize>,
    /// Which build of the maps this is: it changes only when they do.
    generation: usize,
}

/// The word at `off` of a copied stack.
pub fn word_at(stack: &[u8], off: u64) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let bytes = stack.get(off..off.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Unwinds stacks of every traced process.
#[derive(Default)]
pub struct Unwinder {
    procs: HashMap<u32, Process>,
    /// The stack words (offset from sp, value) the last DWARF walk read: the walk is a pure
    /// function of the registers, these words and the mappings.
    pub reads: Vec<(u64, u64)>,
    /// Times a process's mappings were read again: from `/proc`, and from the model.
    pub reread: (u64, u64),
    /// Builds of a process's unwinder (mappings that changed), the last one's number.
    builds: usize,
    /// Whether the last DWARF walk ended without reading past the copy: where the stack
    /// ends, at the most frames kept, or on a frame it could not unwind (all of which the
    /// same registers and words give again).
    walk_ended: bool,
    /// Mapped files by (path, inode), opened while the process lives where possible.
    files: HashMap<(String, u64), Option<Arc<ModuleFile>>>,
}

/// An executable mapping as the model or `/proc/PID/maps` has it.
struct ExecMapping {
    start: u64,
    end: u64,
    offset: u64,
    path: Option<String>,
    inode: u64,
}

/// The executable mappings of the model (the address space at the time of the event), and a
/// generation that changes whenever the model does.
fn model_mappings(space: &AddressSpace) -> (Vec<ExecMapping>, usize) {
    let maps = space
        .vmas()
        .filter(|v| v.perms.exec)
        .map(|v| ExecMapping {
            start: v.start,
            end: v.end,
            offset: v.offset,
            path: space.maps_path(v),
            inode: match &v.backing {
                Backing::File { inode, .. } => *inode,
                _ => 0,
            },
        })
        .collect();
    (maps, model_generation(space))
}

fn model_generation(space: &AddressSpace) -> usize {
    space.timeline().entries().len() ^ (space.vma_count() << 32)
}

impl Unwinder {
    /// The frames of `raw`: DWARF unwinding of the copy, joined to or replaced by the
    /// kernel's frame-pointer walk where that one sees further.
    /// `space` is the process's model just before the event (its mappings then); without
    /// it, `/proc/PID/maps` now.
    pub fn unwind(&mut self, raw: &RawStack, space: Option<&AddressSpace>) -> Unwound {
        let ip = raw.regs[0];
        let mut refreshed = false;
        if self.mapping_of(raw.pid, ip).is_none() {
            refreshed = self.refresh(raw.pid, space);
        }
        let mut dwarf = self.dwarf_frames(raw);
        // The walk went into code mapped since the mappings were read (a library just
        // loaded): read them again and walk again.
        if !refreshed
            && dwarf
                .iter()
                .any(|&(a, _)| self.mapping_of(raw.pid, a).is_none())
            && self.refresh(raw.pid, space)
        {
            refreshed = true;
            dwarf = self.dwarf_frames(raw);
        }
        let fp = &raw.fp_frames;
        let mut self_contained = dwarf.len() >= 2 && self.walk_ended;
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
            && at + 1 < fp.len()
        {
            addrs.extend(fp[at + 1..].iter().map(|&a| (a, false)));
            self_contained = false;
        }
        addrs.truncate(MAX_FRAMES);
        // A return address outside every known mapping may be a module mapped since.
        if !refreshed
            && addrs
                .iter()
                .any(|&(a, _)| self.mapping_of(raw.pid, a).is_none())
        {
            self.refresh(raw.pid, space);
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
            self_contained,
        }
    }

    /// The one frame of a return address `addr` of `pid` (where an allocator call returns
    /// to, `--heap`), in the mappings `space` (or `/proc/PID/maps`), read again when no known
    /// mapping holds it.
    /// `reload`: read the mappings again even when one holds `addr` (other code may be
    /// mapped there since).
    pub fn return_frame(
        &mut self,
        pid: u32,
        addr: u64,
        space: Option<&AddressSpace>,
        reload: bool,
    ) -> Unwound {
        if reload || self.mapping_of(pid, addr).is_none() {
            self.refresh(pid, space);
        }
        Unwound {
            pid,
            frames: vec![UnwoundFrame {
                addr,
                lookup: addr.saturating_sub(1),
                mapping: self.mapping_of(pid, addr).cloned(),
            }],
            self_contained: false,
        }
    }

    /// The executable mapping of `pid` holding `addr`.
    pub fn mapping_of(&self, pid: u32, addr: u64) -> Option<&Mapping> {
        let p = self.procs.get(&pid)?;
        let i = p.maps.partition_point(|m| m.start <= addr);
        p.maps[..i].last().filter(|m| addr < m.end)
    }

    /// A number that changes whenever `pid`'s mappings are read again.
    pub fn generation(&self, pid: u32) -> Option<(usize, usize)> {
        self.procs.get(&pid).map(|p| (p.generation, p.maps.len()))
    }

    /// Forgets a process (its files stay open for other processes and for symbolizing).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    fn dwarf_frames(&mut self, raw: &RawStack) -> Vec<(u64, bool)> {
        self.walk_ended = false;
        let Some(p) = self.procs.get_mut(&raw.pid) else {
            return vec![(raw.regs[0], true)];
        };
        let sp = raw.regs[1];
        let stack = &raw.stack;
        let reads = &mut self.reads;
        reads.clear();
        let mut past_copy = false;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = addr.checked_sub(sp).ok_or(())?;
            let Some(value) = word_at(stack, off) else {
                past_copy = true;
                return Err(());
            };
            reads.push((off, value));
            Ok(value)
        };
        #[cfg(target_arch = "x86_64")]
        let regs = framehop::x86_64::UnwindRegsX86_64::new(raw.regs[0], sp, raw.regs[2]);
        #[cfg(target_arch = "aarch64")]
        let regs = framehop::aarch64::UnwindRegsAarch64::new(raw.regs[3], sp, raw.regs[2]);
        let mut out = Vec::new();
        let mut it = p
            .unwinder
            .iter_frames(raw.regs[0], regs, &mut p.cache, &mut read_stack);
        loop {
            match it.next() {
                Ok(Some(frame)) => {
                    out.push((frame.address(), out.is_empty()));
                    if out.len() >= MAX_FRAMES {
                        break;
                    }
                }
                Ok(None) => {
                    log::trace!(
                        "unwinding {} ended after {} frames (sp {:#x}, {} bytes of stack)",
                        raw.pid,
                        out.len(),
                        sp,
                        stack.len()
                    );
                    break;
                }
                Err(e) => {
                    log::trace!(
                        "unwinding {} stopped after {} frames: {e}",
                        raw.pid,
                        out.len()
                    );
                    break;
                }
            }
        }
        // (The walk is over: its reads of the copy are done.)
        self.walk_ended = !past_copy;
        if out.is_empty() {
            out.push((raw.regs[0], true));
        }
        out
    }

    /// Opens the files of `pid`'s executable mappings now, while the process lives (a
    /// binary deleted since, or in another mount namespace, can only be opened through it).
    /// Returns the executable ranges read.
    pub fn warm(&mut self, pid: u32) -> Vec<Range<u64>> {
        let Some(maps) = proc_mappings(pid) else {
            return Vec::new();
        };
        for m in &maps {
            if let Some(path) = &m.path
                && m.inode != 0
            {
                self.file(pid, m, path);
            }
        }
        maps.iter().map(|m| m.start..m.end).collect()
    }

    /// Rebuilds `pid`'s mappings and unwinder: from the model when it changed since, else
    /// from `/proc/PID/maps`. Whether anything was read again.
    fn refresh(&mut self, pid: u32, space: Option<&AddressSpace>) -> bool {
        let (entries, generation) = match space {
            Some(space) => {
                let generation = model_generation(space);
                if self
                    .procs
                    .get(&pid)
                    .is_some_and(|p| p.seen == Some(generation))
                {
                    return false;
                }
                let (maps, generation) = model_mappings(space);
                self.reread.1 += 1;
                (maps, Some(generation))
            }
            None => match proc_mappings(pid) {
                Some(maps) if !maps.is_empty() => {
                    self.reread.0 += 1;
                    (maps, None)
                }
                // Gone, or a zombie (no map left).
                _ => {
                    self.procs.remove(&pid);
                    return false;
                }
            },
        };
        // The same mappings (a frame outside them all, which no reading finds, or the model
        // read again after other changes): the unwinder, and what was remembered of walks in
        // it, stay.
        if let Some(p) = self.procs.get_mut(&pid)
            && same_mappings(&p.maps, &entries)
        {
            p.seen = generation;
            return false;
        }
        self.builds += 1;
        let mut maps = Vec::new();
        let mut unwinder = Native::new();
        for e in &entries {
            let file = match &e.path {
                Some(path) if e.inode != 0 => self.file(pid, e, path),
                _ => None,
            };
            let m = Mapping {
                start: e.start,
                end: e.end,
                offset: e.offset,
                path: e.path.clone(),
                inode: e.inode,
                file,
            };
            match m.file.as_ref().map(|f| module_of(&m, f)) {
                Some(Some(module)) => unwinder.add_module(module),
                Some(None) => log::debug!("no unwind information for {:?}", m.path),
                None => {}
            }
            maps.push(m);
        }
        self.procs.insert(
            pid,
            Process {
                maps,
                unwinder,
                cache: NativeCache::new(),
                seen: generation,
                generation: self.builds,
            },
        );
        true
    }

    /// The file of mapping `m` (at `path`), read once per (path, inode).
    fn file(&mut self, pid: u32, m: &ExecMapping, path: &str) -> Option<Arc<ModuleFile>> {
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let key = (path.to_string(), m.inode);
        if let Some(f) = self.files.get(&key) {
            return f.clone();
        }
        let next_id = self.files.len() as u64 + 1;
        let opened = open_module(pid, m, path, next_id);
        // A file that cannot be opened now may be openable later (a process still loading).
        if opened.is_some() {
            self.files.insert(key, opened.clone());
        }
        opened
    }
}

/// Whether `maps` are `entries`, every file among them opened (one that could not be may
/// open now).
fn same_mappings(maps: &[Mapping], entries: &[ExecMapping]) -> bool {
    maps.len() == entries.len()
        && maps.iter().zip(entries).all(|(m, e)| {
            m.start == e.start
                && m.end == e.end
                && m.offset == e.offset
                && m.inode == e.inode
                && m.path == e.path
                && (m.file.is_some() || m.path.is_none() || m.inode == 0)
        })
}

/// The executable mappings in `/proc/PID/maps`; `None` when the process is gone.
fn proc_mappings(pid: u32) -> Option<Vec<ExecMapping>> {
    let entries = procfs::read_maps(pid).ok()?;
    Some(
        entries
            .into_iter()
            .filter(|e| e.perms.exec)
            .map(|e| ExecMapping {
                start: e.start,
                end: e.end,
                offset: e.offset,
                path: e.path,
                inode: e.inode,
            })
            .collect(),
    )
}

/// Opens the file of a mapping: through `/proc/PID/map_files` while the process lives (the
/// file it mapped, even deleted or in another mount namespace), else by its path in the
/// process's root, else by its path here; a file found by path must have the mapping's inode.
fn open_module(pid: u32, m: &ExecMapping, path: &str, id: u64) -> Option<Arc<ModuleFile>> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let bytes = crate::name::to_bytes(path);
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&bytes));
    let candidates = [
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)),
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path)),
        path.to_path_buf(),
    ];
    let mut file = candidates.iter().enumerate().find_map(|(i, c)| {
        let f = File::open(c).ok()?;
        let ino = f.metadata().ok()?.ino();
        (i == 0 || m.inode == 0 || ino == m.inode).then_some(f)
    })?;
    let len = file.metadata().ok()?.len();
    if len > MAX_FILE_BYTES {
        return None;
    }
    let mut data = Vec::with_capacity(len as usize);
    file.read_to_end(&mut data).ok()?;
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
    // The mapping starts at the page of the segment's first byte (lld does not page-align
    // segments in the file, so the previous segment may end in that page too: the last
    // segment that starts at or before the mapping is its own).
    let seg = elf
        .segments()
        .filter(|s| {
            let (off, size) = s.file_range();
            off & !(PAGE - 1) <= m.offset && m.offset < off + size
        })
        .max_by_key(|s| s.file_range().0)?;
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
