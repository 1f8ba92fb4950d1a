//! The live side of `--heap`: which files the traced processes map are allocators, the probes
//! on their functions, and the pairing of the kernel's raw records into calls.
//!
//! Probes are attached per file (uprobes are keyed by inode in the kernel, so every process
//! that maps the file gets them, now and later): for the traced processes only when children
//! are not followed (the kernel installs the breakpoints in those processes alone, and keeps
//! doing so across their execs), else for every process, filtered by the traced-process map in
//! the programs. A launched command gets probes on the C library before it runs; an attached
//! process on what it has mapped; a library mapped later on first sight (late: its first calls
//! are missed, which the `heap_attach` record says).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    call::{Allocator, EntryStack, HeapCall, HeapFn, HeapRaw},
    elf::{self, AllocatorFile},
    pairing::{Pairing, PairingStats},
};
use crate::{
    event::{Event, SyscallRecord},
    model::{Backing, Effect},
    probe::{Probe, ProbeError},
    procfs,
    session::Session,
};

/// Errors of `--heap` that end a run, one line each.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    #[error(
        "--heap: process {0} maps no allocator vmatrace knows (no library or executable of it defines malloc and free)"
    )]
    NoAllocator(u32),
    #[error(
        "--heap: no C library found to probe for the launched command (looked in vmatrace's own map and {0})"
    )]
    NoLibc(String),
    #[error("--heap: cannot attach the allocator probes to {path}")]
    Attach {
        path: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// A mapped file and where to reach it.
#[derive(Clone, Debug)]
struct MappedFile {
    /// The path as the process's map shows it.
    path: String,
    /// Where vmatrace opens it: the process's `map_files` link (the very file mapped, in any
    /// mount namespace), else the path.
    open: PathBuf,
    inode: u64,
}

/// Where the probes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Each traced process's own probes (no bystander pays a trap).
    PerProcess,
    /// Every process that maps the file, filtered in the programs (children are followed).
    All,
}

/// The live run's allocator side.
#[derive(Debug)]
pub struct HeapTracer {
    scope: Scope,
    /// Files examined, by inode: the allocator in them, if any.
    examined: HashMap<u64, Option<Arc<AllocatorFile>>>,
    /// Probes attached: (inode, pid; 0 for every process) -> when.
    attached: HashMap<(u64, u32), u64>,
    /// (pid, inode) whose coverage was announced with a `heap_attach` event.
    announced: HashSet<(u32, u64)>,
    pairing: Pairing,
    /// (pid, address) -> the function there.
    resolved: HashMap<(u32, u64), Option<(HeapFn, Allocator)>>,
    /// The kernel's stack words of entries returning into a wrapper, per (pid, tid), in time
    /// order, until their entry is paired (they come first: written at once, the entry is
    /// batched).
    entry_stacks: HashMap<(u32, u32), VecDeque<TimedStack>>,
    /// How many `entry_stacks` hold.
    entry_stacks_held: usize,
    /// Entry stacks dropped before their entry came.
    stacks_dropped: u64,
    /// (pid, address) put in the programs' wrapper sites.
    wrapper_sites: HashSet<(u32, u64)>,
}

/// An entry's stack words and when the kernel wrote them.
type TimedStack = (u64, Box<EntryStack>);

/// Entry stacks held at most (an entry lost leaves its stack behind).
const MAX_ENTRY_STACKS: usize = 65_536;
/// Entry stacks held per thread at most: a thread's entries wait for a tick or two, and each
/// takes a few microseconds (its uprobe traps).
const MAX_THREAD_STACKS: usize = 16_384;
/// How much older than an entry of its thread a stack may be and still find its own entry
/// (one still in a batch of the CPU the thread left). The batches are written at every
/// tick of the daemon, which a daemon busy with a burst can be seconds late for: at 2 s,
/// a tight C++ loop traced on a loaded host had two calls lose their words. The words
/// held meanwhile are only those whose entry has not come (bounded per thread and in all).
const ORPHAN_NS: u64 = 20_000_000_000;

impl HeapTracer {
    /// A tracer whose probes go to `scope`.
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            examined: HashMap::new(),
            attached: HashMap::new(),
            announced: HashSet::new(),
            pairing: Pairing::default(),
            resolved: HashMap::new(),
            entry_stacks: HashMap::new(),
            entry_stacks_held: 0,
            stacks_dropped: 0,
            wrapper_sites: HashSet::new(),
        }
    }

    /// Keeps the stack words of an entry (a `HeapStack` record) until the entry is paired.
    pub fn receive_stack(&mut self, pid: u32, tid: u32, ts_ns: u64, stack: EntryStack) {
        if self.entry_stacks_held >= MAX_ENTRY_STACKS {
            // Entries lost in numbers left their stacks behind.
            self.stacks_dropped += self.entry_stacks_held as u64;
            self.entry_stacks.clear();
            self.entry_stacks_held = 0;
        }
        let queue = self.entry_stacks.entry((pid, tid)).or_default();
        if queue.len() >= MAX_THREAD_STACKS {
            // A thread's entries wait at most a tick or two: the oldest is one whose entry
            // was lost.
            queue.pop_front();
            self.stacks_dropped += 1;
            self.entry_stacks_held -= 1;
        }
        queue.push_back((ts_ns, Box::new(stack)));
        self.entry_stacks_held += 1;
    }

    /// Entry stacks dropped before their entry came (their calls keep the wrapper as site).
    pub fn stacks_dropped(&self) -> u64 {
        self.stacks_dropped
    }

    /// Gives each allocator entry among `events`, as they are read (before they are put in
    /// time order), the stack words written for it. The words reach the ring at once, the
    /// entry when its CPU's batch is written: matched here, they wait only for that, not
    /// for the reorder too (a thread's words then piled up past the bound and were dropped).
    pub fn attach_stacks(&mut self, events: &mut [Event]) {
        if self.entry_stacks.is_empty() {
            return;
        }
        for ev in events {
            if let Event::HeapRaw(raw) = ev
                && !raw.ret
            {
                raw.stack = self.stack_of(raw);
            }
        }
    }

    /// The stack words written just before the entry `raw` (by the same program run: the
    /// last of its thread's older than the entry, at its stack pointer). Older words stay for
    /// entries still in another CPU's batch (the thread moved), until they are
    /// [`ORPHAN_NS`] older than an entry of the thread.
    fn stack_of(&mut self, raw: &HeapRaw) -> Option<Box<EntryStack>> {
        let queue = self.entry_stacks.get_mut(&(raw.pid, raw.tid))?;
        let stale = raw.ts_ns.saturating_sub(ORPHAN_NS);
        while queue.front().is_some_and(|(ts, _)| *ts < stale) {
            queue.pop_front();
            self.entry_stacks_held -= 1;
            self.stacks_dropped += 1;
        }
        // A thread's words come in time order (it runs on one CPU at a time).
        let i = queue.partition_point(|(ts, _)| *ts <= raw.ts_ns);
        let found = match i.checked_sub(1) {
            Some(last) if queue[last].1.return_sp() == raw.sp => {
                self.entry_stacks_held -= 1;
                queue.remove(last).map(|(_, s)| s)
            }
            _ => None,
        };
        if queue.is_empty() {
            self.entry_stacks.remove(&(raw.pid, raw.tid));
        }
        found
    }

    /// Has the programs write the stack words of `pid`'s allocator calls that return to
    /// `addr`, code of an allocation wrapper, from now on.
    pub fn wrapper_site(&mut self, probe: &mut Probe, pid: u32, addr: u64) {
        if !self.wrapper_sites.insert((pid, addr)) {
            return;
        }
        if let Err(e) = probe.set_wrapper_site(pid, addr, true) {
            // A full map: those calls keep the wrapper as their site.
            log::debug!("wrapper site {addr:#x} of {pid}: {e}");
        }
    }

    /// What could not be paired.
    pub fn pairing_stats(&self) -> PairingStats {
        self.pairing.stats
    }

    fn key_pid(&self, pid: u32) -> u32 {
        match self.scope {
            Scope::PerProcess => pid,
            Scope::All => 0,
        }
    }

    /// The allocator in `f`, examined once per inode.
    fn examine(&mut self, f: &MappedFile) -> Option<Arc<AllocatorFile>> {
        if let Some(known) = self.examined.get(&f.inode) {
            return known.clone();
        }
        let found = match elf::allocator_in(&f.open) {
            Ok(found) => found.map(Arc::new),
            Err(e) => {
                log::debug!("--heap: {}", crate::errors::Chain(&e));
                None
            }
        };
        self.examined.insert(f.inode, found.clone());
        found
    }

    /// Attaches the probes for `alloc` in `f` for `pid` (its scope), once; returns when they
    /// were attached (`CLOCK_MONOTONIC`).
    fn attach(
        &mut self,
        probe: &mut Probe,
        pid: u32,
        f: &MappedFile,
        alloc: &AllocatorFile,
    ) -> Result<u64, HeapError> {
        let key = (f.inode, self.key_pid(pid));
        if let Some(&when) = self.attached.get(&key) {
            return Ok(when);
        }
        let scope_pid = (self.scope == Scope::PerProcess).then_some(pid);
        let glibc = alloc.allocator == Allocator::Glibc;
        for (&offset, &func) in &alloc.functions {
            for program in programs(func, glibc) {
                probe
                    .attach_uprobe(program, &f.open, offset, scope_pid)
                    .map_err(|source| HeapError::Attach {
                        path: crate::name::shown(&f.path).to_string(),
                        source,
                    })?;
            }
        }
        let when = crate::clock::monotonic_ns();
        self.attached.insert(key, when);
        log::info!(
            "--heap: probes on {} ({}, {} functions) for {}",
            crate::name::shown(&f.path),
            alloc.allocator.name(),
            alloc.functions.len(),
            scope_pid.map_or("every process".to_string(), |p| format!("process {p}"))
        );
        Ok(when)
    }

    /// Before a launched command (`pid`, held before its exec) runs: probes on the C library
    /// vmatrace itself runs with, which the command most likely loads too.
    pub fn prepare_launch(&mut self, probe: &mut Probe, pid: u32) -> Result<(), HeapError> {
        let libc = own_libc().ok_or_else(|| HeapError::NoLibc(LIBC_PATHS.join(", ")))?;
        let Some(alloc) = self.examine(&libc) else {
            return Err(HeapError::NoLibc(libc.path.clone()));
        };
        self.attach(probe, pid, &libc, &alloc)?;
        Ok(())
    }

    /// Covers every allocator `pid` maps now, and those its image will preload (after an
    /// exec, from its environment's `LD_PRELOAD` and `/etc/ld.so.preload`): attaches what is
    /// missing and returns the `heap_attach` events of what `pid` maps (`late`: the process
    /// has been running, so what had no probes yet was called unseen).
    pub fn cover(
        &mut self,
        probe: &mut Probe,
        pid: u32,
        ts_ns: u64,
        late: bool,
    ) -> Result<Vec<Event>, HeapError> {
        let mut out = Vec::new();
        for f in mapped_executables(pid) {
            let Some(alloc) = self.examine(&f) else {
                continue;
            };
            let when = self.attach(probe, pid, &f, &alloc)?;
            // At an exec the kernel holds (`late` false) nothing has run yet.
            if self.announced.insert((pid, f.inode)) {
                out.push(Event::HeapAttach {
                    ts_ns,
                    pid,
                    path: f.path.clone(),
                    allocator: alloc.allocator,
                    late: late && when >= ts_ns,
                });
            }
        }
        for f in preloads(pid) {
            if let Some(alloc) = self.examine(&f) {
                self.attach(probe, pid, &f, &alloc)?;
            }
        }
        Ok(out)
    }

    /// Whether the probes cover any allocator of `pid` (announced).
    pub fn covers(&self, pid: u32) -> bool {
        self.announced.iter().any(|(p, _)| *p == pid)
    }

    /// A traced process mapped a file executable (`s`, an `mmap` whose `effect` made the VMA
    /// `[start, end)`): when the file is an allocator, the probes cover it (attached now if
    /// they were not: late) and the returned event says so.
    pub fn mapped(
        &mut self,
        probe: &mut Probe,
        s: &SyscallRecord,
        effect: &Effect,
    ) -> Option<Event> {
        let (Some(path), Some(inode)) = (s.resolved.path.as_deref(), s.resolved.inode) else {
            return None;
        };
        let (pid, ts_ns, start, end) = (s.pid, s.ts_ns, effect.start, effect.end);
        if self.announced.contains(&(pid, inode)) {
            return None;
        }
        let link = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
        let f = MappedFile {
            path: path.to_string(),
            open: if link.exists() {
                link
            } else {
                PathBuf::from(crate::name::to_os(path))
            },
            inode,
        };
        let alloc = self.examine(&f)?;
        // Late when the probes came after the process mapped the file.
        let late = match self.attach(probe, pid, &f, &alloc) {
            Ok(when) => when > ts_ns,
            Err(e) => {
                log::warn!("{}", crate::errors::Chain(&e));
                return None;
            }
        };
        if late {
            log::warn!(
                "--heap: process {pid} loaded the allocator {} ({}) that vmatrace had not probed: its calls before now are not seen",
                crate::name::shown(path),
                alloc.allocator.name()
            );
        }
        self.announced.insert((pid, inode));
        Some(Event::HeapAttach {
            ts_ns,
            pid,
            path: path.to_string(),
            allocator: alloc.allocator,
            late,
        })
    }

    /// Pairs one raw record; returns the call it completes.
    pub fn pair(&mut self, raw: HeapRaw, session: &Session) -> Option<HeapCall> {
        let (examined, resolved) = (&self.examined, &mut self.resolved);
        self.pairing.push(raw, |pid, ip| {
            *resolved
                .entry((pid, ip))
                .or_insert_with(|| resolve(examined, session, pid, ip))
        })
    }

    /// `pid` exec'd or exited: its waiting entries, addresses and wrapper sites are stale.
    pub fn forget(&mut self, probe: &mut Probe, pid: u32) {
        self.pairing.forget(pid);
        self.resolved.retain(|(p, _), _| *p != pid);
        self.announced.retain(|(p, _)| *p != pid);
        let held = &mut self.entry_stacks_held;
        self.entry_stacks.retain(|(p, _), q| {
            if *p == pid {
                *held -= q.len();
            }
            *p != pid
        });
        let sites: Vec<u64> = self
            .wrapper_sites
            .iter()
            .filter(|(p, _)| *p == pid)
            .map(|&(_, a)| a)
            .collect();
        for addr in sites {
            self.wrapper_sites.remove(&(pid, addr));
            let _ = probe.set_wrapper_site(pid, addr, false);
        }
    }
}

/// The probe programs for `func` (glibc's read its chunk headers).
fn programs(func: HeapFn, glibc: bool) -> Vec<&'static str> {
    let entry = match func {
        HeapFn::PosixMemalign => "heap_entry_memptr",
        f if glibc && f.frees_first_argument() => "heap_entry_chunk",
        _ => "heap_entry",
    };
    let ret = match (func, glibc) {
        (f, _) if !f.has_return() => None,
        (HeapFn::PosixMemalign, true) => Some("heap_return_memptr_chunk"),
        (HeapFn::PosixMemalign, false) => Some("heap_return_memptr"),
        (HeapFn::MallocTrim, _) | (_, false) => Some("heap_return"),
        (_, true) => Some("heap_return_chunk"),
    };
    // The return first: an entry seen is then always followed by its return.
    ret.into_iter().chain([entry]).collect()
}

/// The function at address `ip` of `pid`: the file mapped there and the offset in it.
fn resolve(
    examined: &HashMap<u64, Option<Arc<AllocatorFile>>>,
    session: &Session,
    pid: u32,
    ip: u64,
) -> Option<(HeapFn, Allocator)> {
    let vma = session.get(pid)?.space.find(ip)?;
    let Backing::File { inode, .. } = &vma.backing else {
        return None;
    };
    let alloc = examined.get(inode)?.as_ref()?;
    let offset = vma.offset + (ip - vma.start);
    Some((alloc.at(offset)?, alloc.allocator))
}

/// The executable file mappings of `pid`, one per file.
fn mapped_executables(pid: u32) -> Vec<MappedFile> {
    let Ok(maps) = procfs::read_maps(pid) else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    maps.iter()
        .filter(|m| m.perms.exec && m.inode != 0)
        .filter_map(|m| {
            let path = m.path.clone()?;
            seen.insert(m.inode).then(|| MappedFile {
                open: PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)),
                path,
                inode: m.inode,
            })
        })
        .collect()
}

/// Where a C library usually is, when vmatrace's own map has none (a static build).
const LIBC_PATHS: [&str; 6] = [
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/aarch64-linux-gnu/libc.so.6",
    "/usr/lib/aarch64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
];

/// The C library vmatrace runs with, else the first of [`LIBC_PATHS`] that exists.
fn own_libc() -> Option<MappedFile> {
    let own = procfs::read_maps(std::process::id()).ok().and_then(|maps| {
        maps.into_iter()
            .find(|m| m.path.as_deref().is_some_and(|p| p.contains("/libc.so")))
    });
    if let Some(m) = own {
        let path = m.path.unwrap_or_default();
        return Some(MappedFile {
            open: PathBuf::from(crate::name::to_os(&path)),
            path,
            inode: m.inode,
        });
    }
    LIBC_PATHS.iter().find_map(|p| file_at(Path::new(p)))
}

/// A file by path, with its inode.
fn file_at(path: &Path) -> Option<MappedFile> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some(MappedFile {
        path: crate::name::from_os(path.as_os_str()),
        open: path.to_path_buf(),
        inode: meta.ino(),
    })
}

/// The libraries the dynamic linker will preload into `pid`'s image: `LD_PRELOAD` of its
/// environment and `/etc/ld.so.preload` (names without a slash looked up in the usual
/// directories), resolved in the process's root.
fn preloads(pid: u32) -> Vec<MappedFile> {
    let mut names: Vec<String> = Vec::new();
    if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
        for var in env.split(|&b| b == 0) {
            if let Some(v) = var.strip_prefix(b"LD_PRELOAD=") {
                names.extend(
                    String::from_utf8_lossy(v)
                        .split([' ', ':'])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
        }
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    if let Ok(text) = std::fs::read_to_string(root.join("etc/ld.so.preload")) {
        names.extend(text.split_whitespace().map(str::to_string));
    }
    names
        .iter()
        .filter_map(|name| {
            let candidates: Vec<PathBuf> = if name.contains('/') {
                vec![PathBuf::from(name)]
            } else {
                LIB_DIRS.iter().map(|d| Path::new(d).join(name)).collect()
            };
            candidates.into_iter().find_map(|c| {
                let inside = root.join(c.strip_prefix("/").unwrap_or(&c));
                file_at(&inside).map(|mut f| {
                    f.path = crate::name::from_os(c.as_os_str());
                    f
                })
            })
        })
        .collect()
}

/// Where preloaded libraries named without a directory are looked for.
const LIB_DIRS: [&str; 8] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts_ns: u64, tid: u32, sp: u64) -> HeapRaw {
        HeapRaw {
            ts_ns,
            pid: 1,
            tid,
            ret: false,
            chunk: false,
            ip: 0x7000,
            sp,
            args: [0; 4],
            stack: None,
        }
    }

    fn words(first: u64, sp: u64) -> EntryStack {
        let mut words = [0; tracer_common::HEAP_STACK_WORDS];
        words[0] = first;
        let mut s = EntryStack {
            regs: [0x7000, sp, 0, 0],
            words,
        };
        // The entry's own sp, below what its call returns with.
        s.regs[1] = sp - (s.return_sp() - sp);
        s
    }

    #[test]
    fn an_entry_takes_the_stack_words_written_just_before_it_on_its_thread() {
        let mut h = HeapTracer::new(Scope::PerProcess);
        // Thread 5: two calls at the same stack pointer from two callers (f, then g), whose
        // words both came before either entry (the entries wait in a batch).
        h.receive_stack(1, 5, 10, words(0xf, 0x9000));
        h.receive_stack(1, 5, 30, words(0x9, 0x9000));
        // Thread 6: words at another stack pointer than its entry's (the entry was lost).
        h.receive_stack(1, 6, 15, words(0x6, 0x8000));
        let first = h.stack_of(&entry(11, 5, 0x9000)).expect("f's words");
        assert_eq!(first.words[0], 0xf);
        // An entry with no words of its own (a call not returning into a wrapper) takes none.
        assert!(h.stack_of(&entry(20, 5, 0x9000)).is_none());
        assert_eq!(
            h.stack_of(&entry(31, 5, 0x9000)).expect("g's").words[0],
            0x9
        );
        assert!(h.stack_of(&entry(16, 6, 0x9000)).is_none(), "not at its sp");
        // Thread 6's words wait for an entry of their own until they are orphans.
        assert_eq!(h.entry_stacks_held, 1);
        assert!(h.stack_of(&entry(16 + ORPHAN_NS, 6, 0x7000)).is_none());
        assert_eq!(h.entry_stacks_held, 0);
        assert_eq!(h.stacks_dropped(), 1);
        assert!(h.entry_stacks.is_empty());
    }

    #[test]
    fn an_entry_still_in_the_batch_of_the_cpu_its_thread_left_keeps_its_words() {
        let mut h = HeapTracer::new(Scope::PerProcess);
        // Thread 5 called at 10 on one CPU and at 30 on another, whose batch came first.
        h.receive_stack(1, 5, 10, words(0xa, 0x9000));
        h.receive_stack(1, 5, 30, words(0xb, 0x9000));
        let mut events = vec![Event::HeapRaw(entry(31, 5, 0x9000))];
        h.attach_stacks(&mut events);
        let mut late = vec![Event::HeapRaw(entry(11, 5, 0x9000))];
        h.attach_stacks(&mut late);
        let first_word = |e: &Event| match e {
            Event::HeapRaw(r) => r.stack.as_ref().map(|s| s.words[0]),
            _ => None,
        };
        assert_eq!(first_word(&events[0]), Some(0xb));
        assert_eq!(first_word(&late[0]), Some(0xa));
        assert_eq!((h.entry_stacks_held, h.stacks_dropped()), (0, 0));
    }

    #[test]
    fn each_function_gets_the_programs_its_contract_needs() {
        assert_eq!(
            programs(HeapFn::Malloc, true),
            ["heap_return_chunk", "heap_entry"]
        );
        assert_eq!(programs(HeapFn::Free, true), ["heap_entry_chunk"]);
        assert_eq!(
            programs(HeapFn::Realloc, true),
            ["heap_return_chunk", "heap_entry_chunk"]
        );
        assert_eq!(
            programs(HeapFn::PosixMemalign, true),
            ["heap_return_memptr_chunk", "heap_entry_memptr"]
        );
        assert_eq!(programs(HeapFn::Free, false), ["heap_entry"]);
        assert_eq!(
            programs(HeapFn::PosixMemalign, false),
            ["heap_return_memptr", "heap_entry_memptr"]
        );
        assert_eq!(
            programs(HeapFn::MallocTrim, true),
            ["heap_return", "heap_entry"]
        );
        assert_eq!(programs(HeapFn::Sdallocx, false), ["heap_entry"]);
    }

    #[test]
    fn the_own_c_library_is_found() {
        let libc = own_libc().expect("a C library");
        assert!(libc.inode != 0 && libc.open.exists(), "{libc:?}");
    }
}
