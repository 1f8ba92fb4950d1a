//! User call stacks of memory events: decoded from the kernel's stack records
//! (`EventKind::Stack`), unwound (`unwind`), symbolized (`symbols`) and deduplicated while
//! recording, so that a recording names its code without the binaries. `python` puts the
//! functions of a CPython program in place of its evaluation loop. `sites` charges memory to
//! the code that asked for it.

pub mod known;
pub mod python;
pub mod sites;
pub mod symbols;
mod unwind;

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};
use tracer_common::{
    EventHeader, EventKind, KnownStack, KnownStackEvent, KnownStackKey, PyFrameRaw, PyProc,
    STACK_FRAMES_MAX, StackHead,
};

use crate::{
    event::{DecodeError, Event},
    heap::call::EntryStack,
    model::AddressSpace,
};

/// One frame of a symbolized stack (innermost first). An inlined function is a frame of its
/// own at the same `addr`, before the function it was inlined into, as `perf` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    /// The instruction pointer (first frame) or the return address.
    pub addr: u64,
    /// The mapped file's path, `[anon]` for anonymous executable memory (JIT), `[vdso]`, or
    /// null when the address was in no mapping.
    pub module: Option<String>,
    /// `addr`'s offset in the module's file (in `[anon]`, from the start of its mapping).
    pub offset: u64,
    /// The function, demangled; null when the module has no symbol for it.
    pub function: Option<String>,
    /// Source file and line, where the module has DWARF line information.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The frame is a function inlined into the next one.
    pub inlined: bool,
}

impl Frame {
    /// `function (file:line)`, `function`, or `module+0xoffset`.
    pub fn label(&self) -> String {
        match (&self.function, &self.file, self.line) {
            (Some(f), Some(file), Some(line)) => {
                let short = file.rsplit('/').next().unwrap_or(file);
                format!("{f} ({short}:{line})")
            }
            (Some(f), _, _) => f.clone(),
            _ => format!(
                "{}+{:#x}",
                self.module
                    .as_deref()
                    .map_or("[unknown]", |m| m.rsplit('/').next().unwrap_or(m)),
                self.offset
            ),
        }
    }
}

/// A unique stack: written once (a `stack` record) before the first record that names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackDef {
    pub id: u64,
    pub frames: Vec<Frame>,
}

/// The stacks known so far, by id (live: as symbolized; replay: as read).
#[derive(Clone, Debug, Default)]
pub struct StackTable {
    by_id: HashMap<u64, Arc<StackDef>>,
}

impl StackTable {
    pub fn insert(&mut self, def: Arc<StackDef>) {
        self.by_id.insert(def.id, def);
    }

    pub fn get(&self, id: u64) -> Option<&Arc<StackDef>> {
        self.by_id.get(&id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<StackDef>> {
        self.by_id.values()
    }
}

/// A stack as the kernel wrote it, before unwinding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub pid: u32,
    pub tid: u32,
    /// The kind of record it belongs to (`Syscall` or `Fault`).
    pub owner: u32,
    /// That record's key time: a syscall's `enter_ts_ns`, a fault's `ts_ns`.
    pub key_ts: u64,
    /// x86_64 `[ip, sp, bp, 0]`; aarch64 `[pc, sp, fp, lr]`.
    pub regs: [u64; 4],
    /// The kernel's frame-pointer walk (first: the ip).
    pub fp_frames: Vec<u64>,
    /// The top of the user stack, from `regs[1]` up.
    pub stack: Vec<u8>,
    /// The thread's Python frames, innermost first (`EventKind::PyStack`), when it ran a
    /// CPython the kernel knew.
    pub python: Vec<PyFrameRaw>,
    /// The id of a stack the kernel recognised (`EventKind::KnownStack`: nothing else is
    /// set but the header's fields).
    pub known: Option<u64>,
}

impl RawStack {
    /// The stack record in `bytes`, or `None` when the record is of another kind.
    pub fn decode(bytes: &[u8]) -> Result<Option<RawStack>, DecodeError> {
        let header: EventHeader = read(bytes)?;
        if header.kind == EventKind::KnownStack as u32 {
            let known: KnownStackEvent = read(bytes)?;
            return Ok(Some(RawStack {
                pid: header.tgid,
                tid: header.tid,
                owner: header.detail,
                key_ts: header.ts_ns,
                regs: [0; 4],
                fp_frames: Vec::new(),
                stack: Vec::new(),
                python: Vec::new(),
                known: Some(known.id),
            }));
        }
        if header.kind != EventKind::Stack as u32 {
            return Ok(None);
        }
        let head: StackHead = read(bytes)?;
        let frames = (head.frames as usize).min(STACK_FRAMES_MAX);
        let frames_start = size_of::<StackHead>();
        let stack_start = frames_start + 8 * STACK_FRAMES_MAX;
        let need = stack_start + head.stack_bytes as usize;
        if bytes.len() < need {
            return Err(DecodeError::Short {
                got: bytes.len(),
                need,
            });
        }
        let fp_frames = bytes[frames_start..frames_start + 8 * frames]
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .take_while(|&a| a != 0)
            .collect();
        Ok(Some(RawStack {
            pid: header.tgid,
            tid: header.tid,
            owner: header.detail,
            key_ts: header.ts_ns,
            regs: head.regs,
            fp_frames,
            stack: bytes[stack_start..need].to_vec(),
            python: Vec::new(),
            known: None,
        }))
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            got: bytes.len(),
            need,
        });
    }
    // SAFETY: the length was checked; T is a plain-old-data ABI type read unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Raw stacks waiting for their record, at most this many (a record lost with a full ring
/// leaves its stack behind).
const MAX_WAITING: usize = 16384;

/// What links a stack to its record: thread, record kind, the record's key time.
type StackKey = (u32, u32, u64);

/// The key of the stack an event waits for, and where its id goes.
fn key_of(ev: &mut Event) -> Option<(StackKey, &mut Option<u64>)> {
    match ev {
        Event::Syscall(s) => Some((
            (s.tid, EventKind::Syscall as u32, s.enter_ts_ns),
            &mut s.resolved.stack_id,
        )),
        Event::Fault(f) => Some(((f.tid, EventKind::Fault as u32, f.ts_ns), &mut f.stack_id)),
        _ => None,
    }
}

/// The start and file inode (0 for anonymous memory) of a mapping.
type CodeAt = Option<(u64, u64)>;

/// The mapping holding `addr` in the model `space`: what a cached call site is checked
/// against.
fn code_at(space: Option<&AddressSpace>, addr: u64) -> CodeAt {
    let v = space?.find(addr)?;
    Some(match &v.backing {
        crate::model::Backing::File { inode, .. } => (v.start, *inode),
        _ => (v.start, 0),
    })
}

/// What makes a stack unique: each native frame's [`unwind::FrameKey`], and each Python
/// frame's process, code object and instruction.
type StackKeys = (Vec<unwind::FrameKey>, Vec<(u32, u64, u32)>);

/// Walks remembered at most.
const MAX_MEMO: usize = 65536;

/// A remembered walk (see `Collector::memo`).
struct Memo {
    generation: Option<(usize, usize)>,
    fp_frames: Vec<u64>,
    python: Vec<PyFrameRaw>,
    reads: Vec<(u64, u64)>,
    id: Option<u64>,
    /// The address of its call-site frame, and whether that frame is the runtime's.
    site: Option<(u64, bool)>,
}

/// Where a stack's call site ([`sites::call_site`]) is among its unwound frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SiteFrame {
    /// The index of the unwound frame (inlined frames share their caller's).
    frame: usize,
    /// No frame is outside the allocator, libc and the loader.
    runtime: bool,
}

impl SiteFrame {
    fn of(def: &StackDef) -> Self {
        let at = sites::call_site(def)
            .and_then(|site| def.frames.iter().position(|f| std::ptr::eq(f, site)))
            .unwrap_or(0);
        Self {
            // The frames before it that were not inlined are one unwound frame each (Python
            // frames are none).
            frame: def.frames[..at]
                .iter()
                .filter(|f| !f.inlined && !python::is_python(f))
                .count(),
            runtime: def.frames.iter().all(sites::is_runtime),
        }
    }
}

/// The live side: raw stacks wait here for their record, are unwound and symbolized while
/// the process lives, and each unique stack gets an id.
pub struct Collector {
    waiting: HashMap<StackKey, RawStack>,
    /// The executable ranges whose files were opened, by process.
    warmed: HashMap<u32, Vec<std::ops::Range<u64>>>,
    unwinder: unwind::Unwinder,
    symbols: symbols::Symbols,
    /// Unique stacks: module identity and offset of each frame, and the process, code object
    /// and instruction of each Python frame -> id.
    ids: HashMap<StackKeys, u64>,
    /// The CPython interpreters of the traced processes, and their code objects.
    python: python::Codes,
    /// Processes whose interpreter the programs are to know (`Some`) or forget (`None`).
    python_changes: Vec<(u32, Option<PyProc>)>,
    /// Whether Python frames are walked (the programs take stacks of memory events).
    walk_python: bool,
    /// Symbolized, not yet written.
    fresh: HashMap<u64, Arc<StackDef>>,
    /// The last walk from each (pid, ip, sp, bp): the same registers, the same stack words
    /// where the walk read them, the same frame-pointer frames and the same mappings give the
    /// same stack, so a call site in a loop is unwound once.
    memo: HashMap<(u32, [u64; 4]), Memo>,
    /// The one-frame stack of each allocator call site seen (`--heap`): (pid, return
    /// address) -> the code mapped there then ([`code_at`]) and the id (`None`: in no
    /// executable mapping).
    sites: HashMap<(u32, u64), (CodeAt, Option<u64>)>,
    /// Where each stack's call site is.
    site_of: HashMap<u64, SiteFrame>,
    /// New native stacks not named yet (see `remember_walk`).
    unnamed: HashMap<u64, unwind::Unwound>,
    /// Wrapper call sites not yet handed to the programs ([`Collector::take_wrapper_sites`]).
    wrapper_sites: Vec<(u32, u64)>,
    /// Walks handed to the programs to recognise (`None`: not handed).
    known: Option<known::Registry>,
    next_id: u64,
    /// Stacks the reader received, and those whose record never came.
    pub received: u64,
    /// Stacks recognised as an earlier walk without unwinding.
    pub memo_hits: u64,
    pub orphaned: u64,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    pub fn new() -> Self {
        Self {
            waiting: HashMap::new(),
            warmed: HashMap::new(),
            unwinder: unwind::Unwinder::default(),
            symbols: symbols::Symbols::new(),
            ids: HashMap::new(),
            python: python::Codes::default(),
            python_changes: Vec::new(),
            walk_python: false,
            fresh: HashMap::new(),
            memo: HashMap::new(),
            sites: HashMap::new(),
            site_of: HashMap::new(),
            unnamed: HashMap::new(),
            wrapper_sites: Vec::new(),
            known: None,
            next_id: 1,
            received: 0,
            memo_hits: 0,
            orphaned: 0,
        }
    }

    /// Keeps a stack record (native, or the Python frames of one just received) until its
    /// event is handled; `Ok(false)` for a record of another kind.
    pub fn receive_record(&mut self, bytes: &[u8]) -> Result<bool, DecodeError> {
        if let Some(raw) = RawStack::decode(bytes)? {
            self.receive(raw);
            return Ok(true);
        }
        if let Some((pid, generation, code, copy)) = python::decode_code(bytes)? {
            self.python.copied(pid, generation, code, copy);
            return Ok(true);
        }
        let Some((pid, key, frames)) = python::decode(bytes)? else {
            return Ok(false);
        };
        // It follows its native stack; that one may have been dropped (the ring was full).
        if let Some(raw) = self.waiting.get_mut(&key) {
            // The code objects can be read only while the process lives.
            self.python.prefetch(pid, &frames);
            raw.python = frames;
        }
        Ok(true)
    }

    /// Walks the Python frames of the interpreters found (`on`), or not.
    pub fn with_python(mut self, on: bool) -> Self {
        self.walk_python = on;
        self
    }

    /// Hands the walks it remembers to the programs, which then send a known stack's id
    /// instead of its copy ([`known`]), or not.
    pub fn with_known_stacks(mut self, on: bool) -> Self {
        self.known = on.then(known::Registry::default);
        self
    }

    /// Times the mappings of a process were read again to unwind: from `/proc`, and from the
    /// model (for `-v`).
    pub fn mappings_reread(&self) -> (u64, u64) {
        self.unwinder.reread
    }

    /// Stacks the kernel recognised.
    pub fn known_hits(&self) -> u64 {
        self.known.as_ref().map_or(0, |k| k.hits)
    }

    /// Walks to hand to the programs (`Some`) or to take back (`None`) since last asked.
    pub fn take_known_changes(&mut self) -> Vec<(KnownStackKey, Option<KnownStack>)> {
        self.known
            .as_mut()
            .map(known::Registry::take_changes)
            .unwrap_or_default()
    }

    /// Takes back `pid`'s walks from the programs if its mappings changed (after anything
    /// that may have read them again).
    fn check_known(&mut self, pid: u32) {
        let generation = self.unwinder.generation(pid);
        if let Some(k) = self.known.as_mut()
            && k.stale(pid, generation)
        {
            k.forget(pid);
        }
    }

    /// Looks for a CPython in process `pid` (seeded, or after exec), so that the programs
    /// walk its Python frames from now on.
    pub fn watch_python(&mut self, pid: u32) {
        if !self.walk_python {
            return;
        }
        if let Some(p) = self.python.watch(pid) {
            self.python_changes.push((pid, Some(p)));
            // Its stacks get Python frames, which the kernel's comparison does not see.
            if let Some(k) = self.known.as_mut() {
                k.forget(pid);
            }
        }
    }

    /// A traced process forked: the child runs its parent's interpreter, if any.
    pub fn forked(&mut self, parent: u32, child: u32) {
        if let Some(p) = self.python.forked(parent, child) {
            self.python_changes.push((child, Some(p)));
        }
    }

    /// Interpreters found or gone since last asked, for the programs' `PY_PROCS`.
    pub fn take_python_changes(&mut self) -> Vec<(u32, Option<PyProc>)> {
        std::mem::take(&mut self.python_changes)
    }

    /// Keeps a raw stack until its record is handled, and opens the files of the process's
    /// code now, while it lives.
    pub fn receive(&mut self, raw: RawStack) {
        self.received += 1;
        if self.waiting.len() >= MAX_WAITING {
            self.orphaned += self.waiting.len() as u64;
            self.waiting.clear();
        }
        let (pid, ip) = (raw.pid, raw.regs[0]);
        let warmed = self.warmed.entry(pid).or_default();
        // (A stack the kernel recognised was unwound already: no file to open for it.)
        if raw.known.is_none() && !warmed.iter().any(|r| r.contains(&ip)) {
            *warmed = self.unwinder.warm(pid);
        }
        self.waiting.insert((raw.tid, raw.owner, raw.key_ts), raw);
    }

    /// At read time: gives each syscall and fault in `events` its stack's id now, while the
    /// process lives (its mappings from `/proc/PID/maps`), or at once when the stack is one
    /// walked before (same registers, same stack words where the walk read them). Stacks of a
    /// process already gone wait for [`Collector::resolve`], which walks them in the model's
    /// mappings at the event.
    pub fn attach(&mut self, events: &mut [Event]) {
        if self.waiting.is_empty() {
            return;
        }
        for ev in events {
            let Some((key, slot)) = key_of(ev) else {
                continue;
            };
            let Some(raw) = self.waiting.get(&key) else {
                continue;
            };
            if let Some(id) = self.memo_hit(raw) {
                self.count_hit(raw.known.is_some());
                *slot = id;
                self.waiting.remove(&key);
            } else if let Some(raw) = self.waiting.remove(&key) {
                match self.id_if_mapped(&raw, None) {
                    Some(id) => *slot = id,
                    // Gone (or a zombie): walked at the event, in the model's mappings.
                    None => {
                        self.waiting.insert(key, raw);
                    }
                }
            }
        }
    }

    /// Gives a syscall or fault its stack's id, unwinding and symbolizing a stack not seen
    /// before. `space` is the process's model just before the event: the mappings the stack's
    /// addresses were in.
    pub fn resolve(&mut self, ev: &mut Event, space: Option<&AddressSpace>) {
        if let Event::Heap(call) = ev {
            let entry = call.entry_stack.take();
            if call.stack.is_none() {
                let (id, site) = self.call_site(call.pid, call.caller, entry.as_deref(), space);
                if entry.is_none() && id.is_some_and(|id| self.is_wrapper(id)) {
                    self.wrapper_sites.push((call.pid, call.caller));
                }
                call.stack = id;
                call.caller = site;
            }
            return;
        }
        if self.waiting.is_empty() {
            return;
        }
        let Some((key, slot)) = key_of(ev) else {
            return;
        };
        if slot.is_some() {
            return;
        }
        let Some(raw) = self.waiting.remove(&key) else {
            return;
        };
        *slot = self.id_of(&raw, space);
    }

    /// The id of the remembered walk `raw` repeats, if it does (`Some(None)`: a walk that
    /// gave no stack).
    fn memo_hit(&self, raw: &RawStack) -> Option<Option<u64>> {
        if let Some(id) = raw.known {
            return Some(Some(id));
        }
        self.memo_walk(raw).map(|m| m.id)
    }

    /// Counts a stack recognised without unwinding, by the kernel (`known`) or the memo.
    fn count_hit(&mut self, known: bool) {
        match self.known.as_mut() {
            Some(k) if known => k.hits += 1,
            _ => self.memo_hits += 1,
        }
    }

    /// The remembered walk `raw` repeats, if it does.
    fn memo_walk(&self, raw: &RawStack) -> Option<&Memo> {
        let generation = self.unwinder.generation(raw.pid);
        let m = self.memo.get(&(raw.pid, raw.regs))?;
        (generation.is_some()
            && m.generation == generation
            && m.fp_frames == raw.fp_frames
            && m.python == raw.python
            && m.reads
                .iter()
                .all(|&(off, v)| unwind::word_at(&raw.stack, off) == Some(v)))
        .then_some(m)
    }

    /// Forgets a process's mappings (it exited; its files stay open for the others).
    pub fn forget(&mut self, pid: u32) {
        self.unwinder.forget(pid);
        if let Some(k) = self.known.as_mut() {
            k.forget(pid);
        }
        self.warmed.remove(&pid);
        self.memo.retain(|(p, _), _| *p != pid);
        self.sites.retain(|(p, _), _| *p != pid);
        if self.python.forget(pid) {
            self.python_changes.push((pid, None));
            // Its Python frames are keyed by pid and code address, which a later process
            // of that pid may reuse for other code.
            self.ids
                .retain(|(_, py), _| py.first().is_none_or(|&(p, _, _)| p != pid));
        }
    }

    /// The stack naming the code that made an allocator call of `pid`, and that code's
    /// address (the call site of the blocks it allocated). `caller` is the address the call
    /// returned to; when the code there is a wrapper of the allocator (`operator new`,
    /// `__rust_alloc`: every frame the runtime's), the call is unwound from its `entry` registers and
    /// stack words to the first frame outside the runtime. `space`: the process's model (its
    /// mappings now).
    fn call_site(
        &mut self,
        pid: u32,
        caller: u64,
        entry: Option<&EntryStack>,
        space: Option<&AddressSpace>,
    ) -> (Option<u64>, u64) {
        let one = self.return_site(pid, caller, space);
        let through_wrapper = one.is_some_and(|id| self.is_wrapper(id));
        let Some(entry) = entry.filter(|_| through_wrapper) else {
            return (one, caller);
        };
        let raw = RawStack {
            pid,
            tid: 0,
            owner: 0,
            key_ts: 0,
            regs: entry.regs,
            fp_frames: Vec::new(),
            stack: entry.bytes(),
            python: Vec::new(),
            known: None,
        };
        let (id, site) = match self.memo_walk(&raw).map(|m| (m.id, m.site)) {
            Some(hit) => {
                self.memo_hits += 1;
                hit
            }
            None => {
                let unwound = self.unwinder.unwind(&raw, space);
                self.remember_walk(&raw, &unwound)
            }
        };
        match (id, site) {
            (Some(id), Some((addr, false))) => (Some(id), addr),
            // The walk ended inside the runtime: the one frame it returned to.
            _ => (one, caller),
        }
    }

    /// Whether stack `id` is all runtime: a one-frame site in an allocation wrapper.
    fn is_wrapper(&self, id: u64) -> bool {
        self.site_of.get(&id).is_some_and(|s| s.runtime)
    }

    /// Call sites in allocation wrappers seen since last asked: (pid, address the calls
    /// return to), for the programs to copy those calls' stack words (`--heap`).
    pub fn take_wrapper_sites(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.wrapper_sites)
    }

    /// The id of the one-frame stack of the code an allocator call of `pid` returned to
    /// (`caller`, its return address), symbolized once per file and offset.
    fn return_site(&mut self, pid: u32, caller: u64, space: Option<&AddressSpace>) -> Option<u64> {
        if caller == 0 {
            return None;
        }
        let code = code_at(space, caller);
        let reload = match self.sites.get(&(pid, caller)) {
            Some(&(seen, id)) if seen == code => return id,
            // Other code is mapped there now (a library closed, another opened there).
            Some(_) => true,
            None => false,
        };
        let unwound = self.unwinder.return_frame(pid, caller, space, reload);
        self.check_known(pid);
        let id = if unwound.frames.iter().all(|f| f.mapping.is_some()) {
            self.id_of_unwound(&unwound, &[], true)
        } else {
            None
        };
        if self.sites.len() >= MAX_MEMO {
            self.sites.clear();
        }
        self.sites.insert((pid, caller), (code, id));
        id
    }

    /// The id of `raw`'s stack (symbolized once per unique stack).
    fn id_of(&mut self, raw: &RawStack, space: Option<&AddressSpace>) -> Option<u64> {
        if let Some(id) = self.memo_hit(raw) {
            self.count_hit(raw.known.is_some());
            return id;
        }
        let unwound = self.unwinder.unwind(raw, space);
        self.remember(raw, &unwound)
    }

    /// The id of `raw`'s stack walked in the mappings `space` (or `/proc/PID/maps`), or
    /// `None` when there are none (the process is gone).
    fn id_if_mapped(
        &mut self,
        raw: &RawStack,
        space: Option<&AddressSpace>,
    ) -> Option<Option<u64>> {
        let unwound = self.unwinder.unwind(raw, space);
        if self.unwinder.generation(raw.pid).is_none() {
            self.check_known(raw.pid);
            return None;
        }
        Some(self.remember(raw, &unwound))
    }

    /// Names `unwound` and remembers the walk of `raw`.
    fn remember(&mut self, raw: &RawStack, unwound: &unwind::Unwound) -> Option<u64> {
        self.remember_walk(raw, unwound).0
    }

    /// Names `unwound`, remembers the walk of `raw`, and says where its call site is.
    fn remember_walk(
        &mut self,
        raw: &RawStack,
        unwound: &unwind::Unwound,
    ) -> (Option<u64>, Option<(u64, bool)>) {
        let memo_key = (raw.pid, raw.regs);
        // A syscall's or fault's new stack is named when first written: until then it
        // holds back neither its walk's registration for the kernel nor the other stacks
        // read with it (the first naming in a file reads its DWARF: tens of ms). An
        // allocator call's is named now: its call site is asked for at once.
        let name_now = raw.owner == 0 || !raw.python.is_empty();
        let id = self.id_of_unwound(unwound, &raw.python, name_now);
        // The call site's address in this process (ids are shared by processes that map the
        // same files at other addresses).
        // (A frame in no mapping, such as a return address still signed by arm64's pointer
        // authentication, is no site: the call keeps its one frame.)
        let site = id.and_then(|id| self.site_of.get(&id)).and_then(|s| {
            let f = unwound.frames.get(s.frame)?;
            f.mapping.as_ref()?;
            Some((f.addr, s.runtime))
        });
        if self.memo.len() >= MAX_MEMO {
            self.memo.clear();
        }
        let generation = self.unwinder.generation(raw.pid);
        self.check_known(raw.pid);
        // A walk of a syscall's or fault's stack the kernel can compare, in a process whose
        // Python frames are not walked: handed to the programs.
        if let (Some(k), Some(id)) = (self.known.as_mut(), id)
            && raw.owner != 0
            && unwound.self_contained
            && generation.is_some()
            && raw.python.is_empty()
            && !self.python.runs_python(raw.pid)
            && let Some((key, entry)) = known::entry(raw.pid, raw.regs, &self.unwinder.reads, id)
        {
            k.add(generation, key, entry);
        }
        self.memo.insert(
            memo_key,
            Memo {
                generation,
                fp_frames: raw.fp_frames.clone(),
                python: raw.python.clone(),
                reads: self.unwinder.reads.clone(),
                id,
                site,
            },
        );
        (id, site)
    }

    /// The id of the stack `unwound` with the Python frames `python` (symbolized, and the
    /// code objects read, once per unique stack: now when `name_now`, else at its first use;
    /// native stacks only, as Python's code objects are read while the process lives).
    fn id_of_unwound(
        &mut self,
        unwound: &unwind::Unwound,
        python: &[PyFrameRaw],
        name_now: bool,
    ) -> Option<u64> {
        if unwound.frames.is_empty() {
            return None;
        }
        let pid = unwound.pid;
        let keys = (
            unwound.keys(),
            python
                .iter()
                .map(|f| (pid, f.code, f.instr_offset))
                .collect::<Vec<_>>(),
        );
        if let Some(&id) = self.ids.get(&keys) {
            if name_now {
                self.name(id);
            }
            return Some(id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(keys, id);
        if name_now || !python.is_empty() {
            let native = self.symbols.symbolize(unwound);
            let frames = python::merge(native, &self.python.frames(pid, python));
            self.named(StackDef { id, frames });
        } else {
            // (Its files stay open with it: named the same if they are deleted meanwhile.)
            self.unnamed.insert(id, unwound.clone());
        }
        Some(id)
    }

    /// Names stack `id` if it is not yet.
    fn name(&mut self, id: u64) {
        if let Some(unwound) = self.unnamed.remove(&id) {
            let frames = self.symbols.symbolize(&unwound);
            self.named(StackDef { id, frames });
        }
    }

    fn named(&mut self, def: StackDef) {
        self.site_of.insert(def.id, SiteFrame::of(&def));
        self.fresh.insert(def.id, Arc::new(def));
    }

    /// The stack `id` the first time it is asked for (to be written before its first use).
    pub fn first_use(&mut self, id: u64) -> Option<Arc<StackDef>> {
        self.name(id);
        self.fresh.remove(&id)
    }

    /// Unique stacks so far.
    pub fn unique(&self) -> u64 {
        self.next_id - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::StackRecord;

    #[test]
    fn decodes_a_stack_record_cut_after_its_bytes() {
        let mut rec = StackRecord {
            head: StackHead {
                header: EventHeader {
                    kind: EventKind::Stack as u32,
                    tgid: 5,
                    tid: 6,
                    detail: EventKind::Syscall as u32,
                    ts_ns: 77,
                },
                regs: [0x1000, 0x7ff0, 0x7ff8, 0],
                frames: 2,
                stack_bytes: 16,
            },
            frames: [0; STACK_FRAMES_MAX],
            stack: [0; tracer_common::STACK_COPY_MAX],
        };
        rec.frames[0] = 0x1000;
        rec.frames[1] = 0x2000;
        rec.stack[..16].copy_from_slice(&[7; 16]);
        // SAFETY: test helper over a plain-old-data ABI type.
        let all = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const StackRecord).cast::<u8>(),
                size_of::<StackRecord>(),
            )
        };
        let cut = &all[..size_of::<StackHead>() + 8 * STACK_FRAMES_MAX + 16];
        let raw = RawStack::decode(cut).expect("decodes").expect("a stack");
        assert_eq!(
            (raw.pid, raw.tid, raw.key_ts, raw.fp_frames, raw.stack),
            (5, 6, 77, vec![0x1000, 0x2000], vec![7; 16])
        );
        // One byte short of what it says it carries.
        assert!(RawStack::decode(&cut[..cut.len() - 1]).is_err());
        // Another kind is not a stack.
        let mut other = cut.to_vec();
        other[..4].copy_from_slice(&(EventKind::Exit as u32).to_ne_bytes());
        assert_eq!(RawStack::decode(&other), Ok(None));
    }
}
