//! The default human output of a live run: a view a person can follow on a busy process.
//!
//! Events are rolled up per region and per second: the heap, the stack, each mapped file, each
//! 64 MiB block of anonymous memory (a glibc arena is one such block), with what changed there
//! (`heap: +4.0 MiB reserved, +3.2 MiB touched, 812 faults (brk 12)`). A call that changes at
//! least `--min-size` bytes is shown on its own line as it happens. Every second's output is
//! bounded ([`MAX_LINES_PER_SECOND`]) however busy the process is: the least active regions,
//! the extra large calls and the extra process starts and ends are folded into one line each.
//! `-v` gives every event instead ([`super::human::HumanSink`]); `--quiet` only the summary.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
    sync::Arc,
};

use tracer_common::Syscall;

use super::{
    LossSummary, Meta, Sink, SnapshotReason, Summary,
    human::{call_text, effect_text, paint, write_findings, write_snapshot, write_summary},
    thousands,
};
use crate::{
    analysis::Finding,
    call::MemCall,
    clock::monotonic_ns,
    event::{Event, SyscallRecord},
    flags::{errno, size},
    heap::LiveKind,
    model::{Backing, EffectKind, PAGE_SIZE, Touch, Vma, vma::page_align_up},
    name::shown,
    session::{ARENA_SHIFT, Applied, Process, Session},
};

/// How the live view shows events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewOptions {
    /// Every event on its own line (today's `-v` lines) instead of the roll-up.
    pub verbose: bool,
    /// No event lines at all: the summary only.
    pub quiet: bool,
    /// Calls that change at least this many bytes are shown on their own line.
    pub min_size: u64,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            verbose: false,
            quiet: false,
            min_size: DEFAULT_MIN_SIZE,
        }
    }
}

/// `--min-size` when not given.
pub const DEFAULT_MIN_SIZE: u64 = 1 << 20;

/// Large calls shown on their own line per second; more are counted in their region's line.
pub const MAX_LARGE_CALLS: usize = 5;
/// Region lines per second; the least active regions are folded into one more line.
pub const MAX_REGION_LINES: usize = 12;
/// Process starts, execs and ends shown per second; more are folded into one more line.
pub const MAX_LIFECYCLE_LINES: usize = 4;
/// The most lines the view writes in a second (besides SIGUSR1 snapshots and the summary):
/// large calls, regions and the line of the others, process lines and the line of the
/// others, and the losses.
pub const MAX_LINES_PER_SECOND: usize =
    MAX_LARGE_CALLS + MAX_REGION_LINES + 1 + MAX_LIFECYCLE_LINES + 1 + 1;

const WINDOW_NS: u64 = 1_000_000_000;

/// What a rolled-up line is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Region {
    Heap,
    Stack,
    File(Arc<str>),
    Shm(u64),
    Special(Arc<str>),
    /// A 64 MiB-aligned block of anonymous memory (address >> [`ARENA_SHIFT`]).
    Anon(u64),
    /// Faults where no VMA is.
    Outside,
    /// Calls that failed.
    Failed,
    /// The allocator's calls (`--heap`).
    Allocator,
}

/// The region of `address` inside `v`.
fn region_of(v: &Vma, address: u64) -> Region {
    match &v.backing {
        Backing::Heap => Region::Heap,
        Backing::Stack => Region::Stack,
        Backing::File { path, .. } => Region::File(path.clone()),
        Backing::Shm { key, .. } => Region::Shm(*key),
        Backing::Special(name) => Region::Special(name.clone()),
        Backing::Anonymous => Region::Anon(address >> ARENA_SHIFT),
    }
}

/// What happened in one region during one second.
#[derive(Clone, Debug, Default)]
struct Rollup {
    /// What the line calls the region (named when the region first shows up in the second).
    label: String,
    calls: BTreeMap<&'static str, u64>,
    failed: BTreeMap<(&'static str, i32), u64>,
    mapped: u64,
    unmapped: u64,
    protected: u64,
    touched_pages: u64,
    released_pages: u64,
    faults: u64,
    /// Calls already shown on their own line.
    shown: u64,
    /// Allocator calls by what they did to the live blocks (`--heap`).
    heap_calls: BTreeMap<&'static str, u64>,
    /// The process's live bytes before the second's first allocator call, and after its last.
    live: Option<(u64, u64)>,
}

impl Rollup {
    fn calls_total(&self) -> u64 {
        self.calls.values().sum::<u64>()
            + self.failed.values().sum::<u64>()
            + self.heap_calls.values().sum::<u64>()
    }

    /// How much happened, to choose which regions get a line.
    fn activity(&self) -> u64 {
        self.mapped
            + self.unmapped
            + self.protected
            + (self.touched_pages + self.released_pages + self.faults + self.calls_total())
                * PAGE_SIZE
    }

    /// Whether the line would only repeat calls already shown.
    fn nothing_new(&self) -> bool {
        self.faults == 0
            && self.touched_pages == 0
            && self.failed.is_empty()
            && self.calls_total() > 0
            && self.shown >= self.calls_total()
    }

    fn add(&mut self, o: &Rollup) {
        for (k, v) in &o.calls {
            *self.calls.entry(k).or_default() += v;
        }
        for (k, v) in &o.failed {
            *self.failed.entry(*k).or_default() += v;
        }
        self.mapped += o.mapped;
        self.unmapped += o.unmapped;
        self.protected += o.protected;
        self.touched_pages += o.touched_pages;
        self.released_pages += o.released_pages;
        self.faults += o.faults;
        self.shown += o.shown;
        for (k, v) in &o.heap_calls {
            *self.heap_calls.entry(k).or_default() += v;
        }
    }

    /// `+4.0 MiB reserved, +3.2 MiB touched, 812 faults (brk 12)`.
    fn text(&self) -> String {
        let mut parts = Vec::new();
        if self.mapped > 0 {
            parts.push(format!("+{} reserved", size(self.mapped)));
        }
        if self.unmapped > 0 {
            parts.push(format!("-{} unmapped", size(self.unmapped)));
        }
        if self.touched_pages > 0 {
            parts.push(format!("+{} touched", size(self.touched_pages * PAGE_SIZE)));
        }
        if self.released_pages > 0 {
            parts.push(format!(
                "-{} released",
                size(self.released_pages * PAGE_SIZE)
            ));
        }
        if self.protected > 0 {
            parts.push(format!("{} re-protected", size(self.protected)));
        }
        if self.faults > 0 {
            parts.push(format!(
                "{} fault{}",
                thousands(self.faults),
                if self.faults == 1 { "" } else { "s" }
            ));
        }
        for ((call, e), n) in &self.failed {
            parts.push(format!("{call} failed {n}x ({})", errno(*e)));
        }
        for (kind, n) in &self.heap_calls {
            parts.push(format!("{} {kind}", thousands(*n)));
        }
        if let Some((from, to)) = self.live {
            let change = if to >= from {
                format!("+{}", size(to - from))
            } else {
                format!("-{}", size(from - to))
            };
            parts.push(format!("live {} ({change})", size(to)));
        }
        let mut text = parts.join(", ");
        if !self.calls.is_empty() {
            let calls: Vec<String> = self.calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&format!("({})", calls.join(", ")));
        }
        text
    }
}

/// Process starts, execs, ends and resyncs not shown on their own line.
#[derive(Clone, Copy, Debug, Default)]
struct Folded {
    forks: u64,
    execs: u64,
    exits: u64,
    resyncs: u64,
    large_calls: u64,
}

impl Folded {
    fn any(&self) -> bool {
        self.forks + self.execs + self.exits + self.resyncs + self.large_calls > 0
    }
}

/// The live view (see the module documentation).
pub struct LiveView<W: Write> {
    out: W,
    color: bool,
    start_ns: u64,
    opts: ViewOptions,
    window_start_ns: u64,
    regions: HashMap<(u32, Region), Rollup>,
    /// Mappings that are not anonymous, by process and start: what an unmapped range was.
    named: HashMap<u32, BTreeMap<u64, (u64, Region)>>,
    /// The end of each process's heap, to tell how much a `brk` added.
    heap_end: HashMap<u32, u64>,
    large_shown: usize,
    /// Regions and calls that had a large call shown this second: one line each is enough.
    large_seen: std::collections::HashSet<(u32, Region, &'static str)>,
    lifecycle_shown: usize,
    /// Process ends, written after the second's region lines.
    exits: Vec<String>,
    /// The latest event of the second: the time of its lines.
    window_last_ns: u64,
    folded: Folded,
    lost: LossSummary,
    /// The region of the last fault's VMA (pid, VMA start): most faults come in runs.
    last_fault: Option<((u32, u64), Region)>,
    /// Each process's live bytes after its latest allocator call (`--heap`).
    live_bytes: HashMap<u32, u64>,
}

impl<W: Write> LiveView<W> {
    /// A view writing to `out` (`color` for a terminal); times are from `start_ns`.
    pub fn new(out: W, color: bool, start_ns: u64, opts: ViewOptions) -> Self {
        Self {
            out,
            color,
            start_ns,
            opts,
            window_start_ns: monotonic_ns(),
            regions: HashMap::new(),
            named: HashMap::new(),
            heap_end: HashMap::new(),
            large_shown: 0,
            large_seen: std::collections::HashSet::new(),
            lifecycle_shown: 0,
            exits: Vec::new(),
            window_last_ns: start_ns,
            folded: Folded::default(),
            lost: LossSummary::default(),
            last_fault: None,
            live_bytes: HashMap::new(),
        }
    }

    fn time(&self, ts: u64) -> String {
        format!("{:>8.2}s", ts.saturating_sub(self.start_ns) as f64 / 1e9)
    }

    fn rollup(&mut self, session: &Session, pid: u32, region: Region) -> &mut Rollup {
        self.regions
            .entry((pid, region))
            .or_insert_with_key(|(pid, region)| Rollup {
                label: label(session, *pid, region),
                ..Rollup::default()
            })
    }

    /// The region of `address` in `pid`: the VMA there, else (unmapped just now) the named
    /// mapping that was there, the heap, or the block of anonymous memory.
    fn region_at(&self, p: Option<&Process>, pid: u32, address: u64) -> Region {
        if let Some(v) = p.and_then(|p| p.space.find(address)) {
            return region_of(v, address);
        }
        if let Some((_, (end, r))) = self
            .named
            .get(&pid)
            .and_then(|m| m.range(..=address).next_back())
            && *end > address
        {
            return r.clone();
        }
        if let Some(b) = p.and_then(|p| p.space.heap()) {
            let end = self.heap_end.get(&pid).copied().unwrap_or(0);
            if address >= b.start && address < end.max(page_align_up(b.current)) {
                return Region::Heap;
            }
        }
        Region::Anon(address >> ARENA_SHIFT)
    }

    /// Remembers the named mappings of `p` (at a seed, an exec or a resync).
    fn learn(&mut self, p: &Process) {
        let named: BTreeMap<u64, (u64, Region)> = p
            .space
            .vmas()
            .filter(|v| v.backing != Backing::Anonymous)
            .map(|v| (v.start, (v.end, region_of(v, v.start))))
            .collect();
        self.named.insert(p.pid, named);
        let heap_end = p.space.heap().map_or(0, |b| page_align_up(b.current));
        self.heap_end.insert(p.pid, heap_end);
        self.last_fault = None;
    }

    fn forget_named(&mut self, pid: u32, start: u64, end: u64) {
        let Some(m) = self.named.get_mut(&pid) else {
            return;
        };
        let inside: Vec<u64> = m.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            m.remove(&k);
        }
        if let Some((_, (e, _))) = m.range_mut(..start).next_back()
            && *e > start
        {
            *e = start;
        }
    }

    fn remember_named(&mut self, p: Option<&Process>, pid: u32, start: u64, end: u64) {
        let Some(v) = p.and_then(|p| p.space.find(start)) else {
            return;
        };
        if v.backing != Backing::Anonymous {
            let r = region_of(v, start);
            self.forget_named(pid, start, end);
            self.named.entry(pid).or_default().insert(start, (end, r));
        }
    }

    fn syscall(
        &mut self,
        s: &SyscallRecord,
        pid: u32,
        e: &crate::model::Effect,
        session: &Session,
    ) -> io::Result<()> {
        let p = session.get(pid);
        let name = s.call.name();
        let len = e.end.saturating_sub(e.start);
        let here = if s.call == Syscall::Brk {
            Region::Heap
        } else {
            self.region_at(p, pid, e.start)
        };
        let changed = match e.kind {
            EffectKind::Created | EffectKind::Replaced => {
                let r = self.rollup(session, pid, here.clone());
                r.mapped += len;
                r.unmapped += e.unmapped_bytes;
                self.remember_named(p, pid, e.start, e.end);
                len
            }
            EffectKind::Unmapped => {
                self.rollup(session, pid, here.clone()).unmapped += e.unmapped_bytes;
                self.forget_named(pid, e.start, e.end);
                e.unmapped_bytes
            }
            EffectKind::Grown => {
                let added = if s.call == Syscall::Brk {
                    // The heap's end before (its start when not known yet).
                    let before = self
                        .heap_end
                        .insert(pid, e.end)
                        .filter(|&end| end >= e.start)
                        .unwrap_or(e.start);
                    e.end.saturating_sub(before)
                } else {
                    match s.mem() {
                        MemCall::Mremap {
                            old_len, new_len, ..
                        } => page_align_up(new_len).saturating_sub(page_align_up(old_len)),
                        _ => 0,
                    }
                };
                self.rollup(session, pid, here.clone()).mapped += added;
                added
            }
            EffectKind::Shrunk => {
                if s.call == Syscall::Brk {
                    self.heap_end.insert(pid, e.end);
                }
                self.rollup(session, pid, here.clone()).unmapped += e.unmapped_bytes;
                e.unmapped_bytes
            }
            EffectKind::Moved => {
                let old_len = match s.mem() {
                    MemCall::Mremap { old_len, .. } => page_align_up(old_len),
                    _ => 0,
                };
                let from = e.from.unwrap_or(e.start);
                let there = self.region_at(p, pid, from);
                self.rollup(session, pid, there).unmapped += old_len;
                self.rollup(session, pid, here.clone()).mapped += len;
                self.forget_named(pid, from, from + old_len);
                self.remember_named(p, pid, e.start, e.end);
                len
            }
            EffectKind::Protected => {
                self.rollup(session, pid, here.clone()).protected += len;
                len
            }
            EffectKind::Released => e.released_pages * PAGE_SIZE,
            EffectKind::LazilyFreed
            | EffectKind::Advised
            | EffectKind::Locked
            | EffectKind::Unlocked => len,
            EffectKind::None => {
                if s.call == Syscall::Brk {
                    // The first brk teaches the model where the heap starts.
                    self.heap_end.insert(pid, e.end);
                }
                0
            }
        };
        let region = here;
        let large = changed >= self.opts.min_size && changed > 0;
        // One line per region and call a second is enough; the region's line counts the rest.
        let first = large && self.large_seen.insert((pid, region.clone(), name));
        let show = first && self.large_shown < MAX_LARGE_CALLS;
        let r = self.rollup(session, pid, region);
        *r.calls.entry(name).or_default() += 1;
        r.released_pages += e.released_pages;
        r.touched_pages += e.populated_pages;
        if show {
            r.shown += 1;
        }
        if show {
            self.large_shown += 1;
            let applied = Applied::Syscall { pid, effect: *e };
            let effect = effect_text(&applied)
                .map(|t| format!("  {}", paint(self.color, "36", &format!("-> {t}"))))
                .unwrap_or_default();
            let who = if s.pid == s.tid {
                format!("[{}]", s.pid)
            } else {
                format!("[{}/{}]", s.pid, s.tid)
            };
            let line = format!("{} {who} {}{effect}", self.time(s.ts_ns), call_text(s));
            writeln!(self.out, "{line}")?;
        } else if first {
            self.folded.large_calls += 1;
        }
        Ok(())
    }

    /// A process line (fork, exec, exit, resync), or a count of them past the limit. Ends are
    /// written after the second's region lines, which they follow.
    fn lifecycle(
        &mut self,
        line: String,
        end: bool,
        fold: impl FnOnce(&mut Folded),
    ) -> io::Result<()> {
        if self.lifecycle_shown >= MAX_LIFECYCLE_LINES {
            fold(&mut self.folded);
            return Ok(());
        }
        self.lifecycle_shown += 1;
        if end {
            self.exits.push(line);
            Ok(())
        } else {
            writeln!(self.out, "{line}")
        }
    }

    /// Writes the second's lines and starts the next second.
    fn end_window(&mut self) -> io::Result<()> {
        let now = monotonic_ns();
        let time = self.time(self.window_last_ns);
        let mut rows: Vec<((u32, Region), Rollup)> = self
            .regions
            .drain()
            .filter(|(_, r)| r.activity() > 0 && !r.nothing_new())
            .collect();
        rows.sort_by(|a, b| b.1.activity().cmp(&a.1.activity()).then(a.0.cmp(&b.0)));
        let rest: Vec<_> = rows.split_off(rows.len().min(MAX_REGION_LINES));
        rows.sort_by(|a, b| a.0.0.cmp(&b.0.0).then(b.1.activity().cmp(&a.1.activity())));
        for ((pid, _), r) in &rows {
            writeln!(self.out, "{time} [{pid}] {}: {}", r.label, r.text())?;
        }
        if !rest.is_empty() {
            let mut all = Rollup::default();
            let mut pids: Vec<u32> = rest.iter().map(|((pid, _), _)| *pid).collect();
            pids.sort_unstable();
            pids.dedup();
            for (_, r) in &rest {
                all.add(r);
            }
            // The calls by name would be a long list: their number only.
            let calls = all.calls_total();
            all.calls.clear();
            all.failed.clear();
            let mut text = all.text();
            if calls > 0 {
                if !text.is_empty() {
                    text.push_str(", ");
                }
                text.push_str(&format!(
                    "{} call{}",
                    thousands(calls),
                    if calls == 1 { "" } else { "s" }
                ));
            }
            let line = format!(
                "{time} ... {} more region{} in {} process{}: {text}",
                rest.len(),
                if rest.len() == 1 { "" } else { "s" },
                pids.len(),
                if pids.len() == 1 { "" } else { "es" },
            );
            writeln!(self.out, "{}", paint(self.color, "2", &line))?;
        }
        let f = std::mem::take(&mut self.folded);
        if f.any() {
            let mut parts = Vec::new();
            for (n, what) in [
                (f.forks, "forks"),
                (f.execs, "execs"),
                (f.exits, "exits"),
                (f.resyncs, "maps read again"),
                (f.large_calls, "more large calls"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            let line = format!("{time} ... and {}", parts.join(", "));
            writeln!(self.out, "{}", paint(self.color, "2", &line))?;
        }
        for line in std::mem::take(&mut self.exits) {
            writeln!(self.out, "{line}")?;
        }
        let l = std::mem::take(&mut self.lost);
        if l.total_lost() > 0 {
            let line = format!("{time} LOST {} events ({})", l.total_lost(), l.breakdown());
            writeln!(self.out, "{}", paint(self.color, "1;31", &line))?;
        }
        self.window_start_ns = now;
        self.large_shown = 0;
        self.large_seen.clear();
        self.lifecycle_shown = 0;
        Ok(())
    }
}

/// A label for a region a person recognises.
fn label(session: &Session, pid: u32, region: &Region) -> String {
    match region {
        Region::Heap => "heap".into(),
        Region::Stack => "stack".into(),
        Region::File(path) => shown(path).to_string(),
        Region::Shm(key) => format!("shm {key:#x}"),
        Region::Special(name) => shown(name).to_string(),
        Region::Outside => "outside any known VMA".into(),
        Region::Failed => "failed calls".into(),
        Region::Allocator => "allocator".into(),
        Region::Anon(block) => {
            let start = block << ARENA_SHIFT;
            let end = (block + 1) << ARENA_SHIFT;
            let arena = session.get(pid).is_some_and(|p| is_arena(p, start, end));
            if arena {
                format!("arena {start:#x}")
            } else {
                format!("anon {start:#x}-{end:#x}")
            }
        }
    }
}

/// Whether `[start, end)` looks like a glibc arena heap: covered by private anonymous VMAs, part
/// of it without access (reserved, not yet committed).
pub(crate) fn is_arena(p: &Process, start: u64, end: u64) -> bool {
    let mut at = start;
    let mut reserved = false;
    while at < end {
        match p.space.find(at) {
            Some(v) if v.backing == Backing::Anonymous && !v.perms.shared => {
                reserved |= !(v.perms.read || v.perms.write || v.perms.exec);
                at = v.end;
            }
            _ => return false,
        }
    }
    reserved
}

impl<W: Write> Sink for LiveView<W> {
    fn start(&mut self, _meta: &Meta) -> io::Result<()> {
        Ok(())
    }

    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()> {
        if self.opts.quiet {
            return Ok(());
        }
        self.window_last_ns = self.window_last_ns.max(event.ts_ns());
        match (event, applied) {
            (Event::Fault(f), Applied::Fault(fe)) => {
                // A child sharing its parent's memory (vfork, posix_spawn) touches the parent's.
                let pid = session.memory_owner(f.pid);
                let region = match fe.vma_start {
                    // A launched command faults before its exec gives it a map: not news.
                    None if session.get(pid).is_none_or(|p| p.space.vma_count() == 0) => {
                        return Ok(());
                    }
                    None => Region::Outside,
                    Some(start) => match &self.last_fault {
                        Some((key, Region::Anon(_))) if *key == (pid, start) => {
                            Region::Anon(f.address >> ARENA_SHIFT)
                        }
                        Some((key, r)) if *key == (pid, start) => r.clone(),
                        _ => {
                            let r = self.region_at(session.get(pid), pid, f.address);
                            self.last_fault = Some(((pid, start), r.clone()));
                            r
                        }
                    },
                };
                let r = self.rollup(session, pid, region);
                r.faults += 1;
                if matches!(fe.touch, Touch::First { .. }) {
                    r.touched_pages += fe.pages.max(1);
                }
            }
            (Event::Syscall(s), Applied::Syscall { pid, effect }) => {
                self.last_fault = None;
                self.syscall(s, *pid, effect, session)?;
            }
            (Event::Syscall(s), Applied::Failed { errno }) => {
                *self
                    .rollup(session, s.pid, Region::Failed)
                    .failed
                    .entry((s.call.name(), *errno))
                    .or_default() += 1;
            }
            (
                Event::Fork {
                    ts_ns,
                    pid,
                    child,
                    followed,
                    ..
                },
                Applied::Fork { .. },
            ) => {
                let how = if *followed {
                    "followed"
                } else {
                    "not followed"
                };
                let line = format!("{} [{pid}] fork -> {child} ({how})", self.time(*ts_ns));
                self.lifecycle(line, false, |f| f.forks += 1)?;
            }
            (Event::Heap(call), Applied::Heap(effect)) if effect.kind != LiveKind::None => {
                let pid = session.memory_owner(call.pid);
                let before = self.live_bytes.get(&pid).copied().unwrap_or(0);
                self.live_bytes.insert(pid, effect.live_bytes);
                let r = self.rollup(session, pid, Region::Allocator);
                *r.heap_calls.entry(effect.kind.name()).or_default() += 1;
                let from = r.live.map_or(before, |(from, _)| from);
                r.live = Some((from, effect.live_bytes));
            }
            (
                Event::Exec {
                    ts_ns,
                    pid,
                    filename,
                    ..
                },
                Applied::Exec,
            ) => {
                let line = format!("{} [{pid}] exec {}", self.time(*ts_ns), shown(filename));
                self.lifecycle(line, false, |f| f.execs += 1)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()> {
        if reason.seeds() {
            self.learn(p);
        }
        if self.opts.quiet && !matches!(reason, SnapshotReason::Signal | SnapshotReason::Periodic) {
            return Ok(());
        }
        match reason {
            SnapshotReason::Signal | SnapshotReason::Periodic => {
                let time = self.time(ts_ns);
                write_snapshot(&mut self.out, &time, reason, p)
            }
            SnapshotReason::Exit => {
                let rows = super::report::vma_rows(p);
                let line = format!(
                    "{} [{}] exited: {} VMAs, reserved {}, touched {}",
                    self.time(ts_ns),
                    p.pid,
                    rows.len(),
                    size(rows.iter().map(|r| r.reserved_bytes).sum()),
                    size(rows.iter().map(|r| r.touched_bytes).sum()),
                );
                self.named.remove(&p.pid);
                self.lifecycle(line, true, |f| f.exits += 1)
            }
            SnapshotReason::Resync => {
                let line = format!(
                    "{} [{}] events were lost: the map was read again",
                    self.time(ts_ns),
                    p.pid
                );
                self.lifecycle(line, false, |f| f.resyncs += 1)
            }
            SnapshotReason::Seed | SnapshotReason::Exec | SnapshotReason::Final => Ok(()),
        }
    }

    fn lost(&mut self, _ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        self.lost += delta;
        Ok(())
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        let line = format!(
            "{} [{pid}] model differs from /proc/{pid}/maps in {} ranges",
            self.time(ts_ns),
            lines.len()
        );
        writeln!(self.out, "{}", paint(self.color, "33", &line))
    }

    fn tick(&mut self, _session: &Session) -> io::Result<()> {
        if monotonic_ns().saturating_sub(self.window_start_ns) >= WINDOW_NS {
            self.end_window()?;
        }
        self.out.flush()
    }

    fn summary(&mut self, _ts_ns: u64, s: &Summary) -> io::Result<()> {
        if !self.opts.quiet {
            self.end_window()?;
        }
        write_summary(&mut self.out, s)
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        write_findings(&mut self.out, findings, self.color)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{FaultRecord, Resolved},
        output::{LossSummary, report::summarize},
        session::Seed,
    };

    const PID: u32 = 7;
    const MIB: u64 = 1 << 20;

    /// A session with one process, and a view writing into memory.
    struct Run {
        session: Session,
        view: LiveView<Vec<u8>>,
        ts: u64,
    }

    impl Run {
        fn new(opts: ViewOptions) -> Self {
            let mut session = Session::default();
            session.add(PID, Seed::default(), 0, Some("/bin/x".into()));
            let mut view = LiveView::new(Vec::new(), false, 0, opts);
            if let Some(p) = session.get(PID) {
                view.snapshot(0, SnapshotReason::Seed, p).expect("writes");
            }
            Self {
                session,
                view,
                ts: 1,
            }
        }

        fn apply(&mut self, ev: Event) {
            self.ts += 1;
            let applied = self.session.apply(&ev);
            self.view
                .event(&ev, &applied, &self.session)
                .expect("writes");
        }

        fn call(&mut self, call: Syscall, args: [u64; 6], ret: i64, path: Option<&str>) {
            let ts = self.ts;
            self.apply(Event::Syscall(SyscallRecord {
                ts_ns: ts,
                enter_ts_ns: ts,
                pid: PID,
                tid: PID,
                call,
                args,
                ret,
                extra: [0; 2],
                commit_ts_ns: None,
                resolved: Resolved {
                    path: path.map(str::to_string),
                    ..Resolved::default()
                },
            }));
        }

        fn mmap_anon(&mut self, addr: u64, len: u64) {
            self.call(
                Syscall::Mmap,
                [0, len, 3, 0x22, u64::MAX, 0],
                addr as i64,
                None,
            );
        }

        fn fault(&mut self, address: u64) {
            self.fault_by(PID, address);
        }

        fn fault_by(&mut self, pid: u32, address: u64) {
            let ts = self.ts;
            self.apply(Event::Fault(FaultRecord {
                ts_ns: ts,
                pid,
                tid: pid,
                address,
                ip: 0,
                error_code: Some(6),
                write_from_page: None,
                stack_id: None,
            }));
        }

        /// Everything written, the summary included.
        fn text(mut self) -> String {
            let summary = summarize(&self.session, LossSummary::default());
            self.view.summary(self.ts, &summary).expect("writes");
            String::from_utf8(self.view.out).expect("utf-8")
        }
    }

    fn lines_before_summary(text: &str) -> Vec<&str> {
        text.lines()
            .take_while(|l| !l.is_empty() && !l.starts_with("==="))
            .collect()
    }

    #[test]
    fn a_child_sharing_its_parents_memory_touches_the_parents_regions() {
        let mut r = Run::new(ViewOptions::default());
        let a = 0x7f00_0000_0000u64;
        r.mmap_anon(a, 2 * MIB);
        // posix_spawn: a CLONE_VM child writes to its parent's memory before it execs.
        let ts = r.ts;
        r.apply(Event::Fork {
            ts_ns: ts,
            pid: PID,
            tid: PID,
            child: 8,
            followed: true,
            shares_vm: true,
        });
        for i in 0..4 {
            r.fault_by(8, a + i * 4096);
        }
        let text = r.text();
        let lines = lines_before_summary(&text);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("[{PID}] anon {a:#x}"))
                    && l.contains("+16 KiB touched")
                    && l.contains("4 faults")),
            "{text}"
        );
        assert!(!lines.iter().any(|l| l.contains("[8] anon")), "{text}");
    }

    #[test]
    fn the_heap_is_rolled_up_into_one_line() {
        let mut r = Run::new(ViewOptions {
            min_size: 1 << 30,
            ..ViewOptions::default()
        });
        let base = 0x5555_0000_0000u64;
        r.call(Syscall::Brk, [0; 6], base as i64, None);
        r.call(
            Syscall::Brk,
            [base + 4 * MIB, 0, 0, 0, 0, 0],
            (base + 4 * MIB) as i64,
            None,
        );
        for page in 0..812 {
            r.fault(base + page * PAGE_SIZE + 8);
        }
        // Touched again: a fault, no new page.
        r.fault(base + 8);
        let text = r.text();
        let lines = lines_before_summary(&text);
        assert_eq!(
            lines,
            ["    0.00s [7] heap: +4 MiB reserved, +3.2 MiB touched, 813 faults (brk 2)"],
            "{text}"
        );
    }

    #[test]
    fn a_busy_second_stays_within_its_lines() {
        let mut r = Run::new(ViewOptions::default());
        // 100 blocks of anonymous memory, each mapped, touched and unmapped 20 times; 40 files
        // mapped; 300 large mappings; 100 followed children that exit.
        for i in 0..100u64 {
            let a = 0x7f00_0000_0000 + (i << ARENA_SHIFT);
            for _ in 0..20 {
                r.mmap_anon(a, 64 * 1024);
                r.fault(a);
                r.call(Syscall::Munmap, [a, 64 * 1024, 0, 0, 0, 0], 0, None);
            }
        }
        for i in 0..40u64 {
            let a = 0x7e00_0000_0000 + i * MIB;
            let path = format!("/lib/lib{i}.so");
            r.call(
                Syscall::Mmap,
                [0, 8192, 1, 0x02, 3, 0],
                a as i64,
                Some(&path),
            );
        }
        for i in 0..300u64 {
            r.mmap_anon(0x7d00_0000_0000 + i * 4 * MIB, 2 * MIB);
        }
        for i in 0..100u32 {
            let child = 1000 + i;
            let ts = r.ts;
            r.apply(Event::Fork {
                ts_ns: ts,
                pid: PID,
                tid: PID,
                child,
                followed: true,
                shares_vm: false,
            });
            r.apply(Event::Exit {
                ts_ns: ts + 1,
                pid: child,
                tid: child,
            });
            let p = r.session.get(child).cloned().expect("followed");
            r.view
                .snapshot(ts + 1, SnapshotReason::Exit, &p)
                .expect("writes");
        }
        let text = r.text();
        let lines = lines_before_summary(&text);
        assert!(lines.len() <= MAX_LINES_PER_SECOND, "{}", lines.join("\n"));
        // Large calls: one per region and call, at most MAX_LARGE_CALLS; the rest are counted.
        let large: Vec<&&str> = lines.iter().filter(|l| l.contains("mmap(")).collect();
        assert_eq!(large.len(), MAX_LARGE_CALLS, "{text}");
        // 100 + 40 + 19 regions, 12 with a line.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("... 147 more regions in 1 process: ")),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("... and 98 forks, 98 exits, 14 more large calls")),
            "{text}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("] fork -> ") || l.contains("] exited: "))
                .count(),
            MAX_LIFECYCLE_LINES
        );
    }

    #[test]
    fn an_unmapped_file_range_is_counted_to_its_file() {
        let mut r = Run::new(ViewOptions::default());
        let a = 0x7e00_0000_0000u64;
        r.call(
            Syscall::Mmap,
            [0, 3 * MIB, 1, 0x02, 3, 0],
            a as i64,
            Some("/data/big.bin"),
        );
        r.call(Syscall::Munmap, [a + MIB, MIB, 0, 0, 0, 0], 0, None);
        r.call(Syscall::Munmap, [a, MIB, 0, 0, 0, 0], 0, None);
        let text = r.text();
        let lines = lines_before_summary(&text);
        assert!(
            lines.iter().any(|l| l.contains("mmap(NULL, 3 MiB")),
            "a call of 1 MiB or more has its own line: {text}"
        );
        assert!(
            lines.iter().any(|l| l
                .ends_with("/data/big.bin: +3 MiB reserved, -2 MiB unmapped (mmap 1, munmap 2)")),
            "{text}"
        );
    }

    #[test]
    fn quiet_writes_the_summary_only() {
        let mut r = Run::new(ViewOptions {
            quiet: true,
            ..ViewOptions::default()
        });
        r.mmap_anon(0x7f00_0000_0000, 64 * MIB);
        r.fault(0x7f00_0000_0000);
        let text = r.text();
        assert!(text.starts_with("\n=== vmatrace summary ==="), "{text}");
    }
}
