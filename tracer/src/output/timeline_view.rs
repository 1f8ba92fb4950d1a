//! The address space over time, for pictures that hold at scale: instead of one band per VMA
//! piece (70,000 of them for a 0.44 s multi-threaded run), each process's memory is kept per
//! *lane*, a region a person recognises (the heap, the stack, each mapped file, each 64 MiB
//! block of anonymous memory, which is one glibc arena when it looks like one), and per time
//! bucket: the reserved bytes with access, the reserved bytes without any (`PROT_NONE`
//! reservations, such as the unused part of an arena), the touched bytes, their peaks in the
//! bucket, and the pieces created and removed there (churn). Buckets start at 1 ms and double
//! when a lane would hold more than [`MAX_POINTS`], so memory stays bounded and the whole run
//! is covered however long it is. [`Pictures::picture`] turns this into dense columns, the most
//! active lanes of the most active processes kept and the others folded, for `html` and
//! `perfetto`.
//!
//! Reserved bytes follow the model's history exactly (every change of the map, read after each
//! event). Touched bytes follow the faults, releases and populates of each lane, and are read
//! again from the model whenever a process's map is (re)seeded; a release by a call whose
//! range spans two lanes is counted to the lane where it starts.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{LossSummary, Meta, Sink, SnapshotReason, Summary, live_view::is_arena};
use crate::{
    analysis::Finding,
    event::Event,
    model::{
        Backing, EffectKind, PAGE_SIZE, Touch, TouchKind, Vma,
        timeline::{Cause, Change},
    },
    session::{ARENA_SHIFT, Applied, Process, Session},
};

/// The most buckets a lane keeps before every bucket doubles.
pub const MAX_POINTS: usize = 2048;
/// Lanes of one process drawn on their own; the others are folded by kind.
pub const MAX_LANES_PER_PROCESS: usize = 12;
/// Processes drawn on their own; the others are folded into one.
pub const MAX_PROCESSES: usize = 6;

const FIRST_BUCKET_NS: u64 = 1_000_000;

/// A region of one process's address space.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LaneKey {
    Heap,
    Stack,
    /// A 64 MiB-aligned block of anonymous memory (address >> [`ARENA_SHIFT`]).
    Anon(u64),
    File(Arc<str>),
    Shm(u64),
    Special(Arc<str>),
}

/// What a piece of the map is, without where: its lane is this and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Heap,
    Stack,
    Anon,
    File(Arc<str>),
    Shm(u64),
    Special(Arc<str>),
}

impl Kind {
    fn of(v: &Vma) -> Self {
        match &v.backing {
            Backing::Heap => Self::Heap,
            Backing::Stack => Self::Stack,
            Backing::Anonymous => Self::Anon,
            Backing::File { path, .. } => Self::File(path.clone()),
            Backing::Shm { key, .. } => Self::Shm(*key),
            Backing::Special(name) => Self::Special(name.clone()),
        }
    }

    fn lane(&self, address: u64) -> LaneKey {
        match self {
            Self::Heap => LaneKey::Heap,
            Self::Stack => LaneKey::Stack,
            Self::Anon => LaneKey::Anon(address >> ARENA_SHIFT),
            Self::File(p) => LaneKey::File(p.clone()),
            Self::Shm(k) => LaneKey::Shm(*k),
            Self::Special(n) => LaneKey::Special(n.clone()),
        }
    }

    /// `[start, end)` cut where its lane changes (anonymous memory at each 64 MiB block).
    fn parts(&self, start: u64, end: u64) -> Vec<(LaneKey, u64)> {
        if *self != Self::Anon {
            return vec![(self.lane(start), end - start)];
        }
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let next = (((at >> ARENA_SHIFT) + 1) << ARENA_SHIFT).min(end);
            out.push((self.lane(at), next - at));
            at = next;
        }
        out
    }
}

/// A piece of the map as the pictures know it.
#[derive(Clone, Debug)]
struct Piece {
    end: u64,
    kind: Kind,
    /// Readable, writable or executable: memory the process may use.
    access: bool,
}

/// A lane's values now.
#[derive(Clone, Copy, Debug, Default)]
struct Now {
    access: u64,
    none: u64,
    touched: u64,
}

/// One bucket of a lane: its values at the bucket's end, peaks and churn within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Point {
    bucket: u64,
    access: u64,
    none: u64,
    touched: u64,
    peak_reserved: u64,
    peak_touched: u64,
    created: u32,
    removed: u32,
}

#[derive(Clone, Debug, Default)]
struct Lane {
    now: Now,
    points: Vec<Point>,
    /// The block looked like a glibc arena heap at some point.
    arena: bool,
}

#[derive(Clone, Debug, Default)]
struct Proc {
    /// [`crate::model::timeline::Timeline::pushed`] when last read.
    seen: u64,
    pieces: BTreeMap<u64, Piece>,
}

/// A sink that keeps the lanes while a recording is replayed (see the module documentation).
#[derive(Debug, Default)]
pub struct Pictures {
    t0: Option<u64>,
    last_ns: u64,
    width_ns: u64,
    lanes: HashMap<(u32, LaneKey), Lane>,
    procs: HashMap<u32, Proc>,
    names: BTreeMap<u32, String>,
    /// VMA pieces created over the run.
    pieces_created: u64,
}

impl Pictures {
    /// An empty collector.
    pub fn new() -> Self {
        Self {
            width_ns: FIRST_BUCKET_NS,
            ..Self::default()
        }
    }

    /// VMA pieces created over the run (each mapping, each part a call cut off).
    pub fn pieces_created(&self) -> u64 {
        self.pieces_created
    }

    fn bucket(&mut self, ts: u64) -> u64 {
        let t0 = *self.t0.get_or_insert(ts);
        self.last_ns = self.last_ns.max(ts);
        ts.saturating_sub(t0) / self.width_ns
    }

    /// Changes lane `key` of `pid` at `ts` with `f`, keeping the bucket's point.
    fn update(&mut self, pid: u32, key: LaneKey, ts: u64, f: impl FnOnce(&mut Now, &mut Point)) {
        let bucket = self.bucket(ts);
        let lane = self.lanes.entry((pid, key)).or_default();
        if lane.points.last().is_none_or(|p| p.bucket != bucket) {
            let n = lane.now;
            lane.points.push(Point {
                bucket,
                access: n.access,
                none: n.none,
                touched: n.touched,
                peak_reserved: n.access + n.none,
                peak_touched: n.touched,
                ..Point::default()
            });
        }
        let Some(point) = lane.points.last_mut() else {
            return;
        };
        f(&mut lane.now, point);
        let n = lane.now;
        point.access = n.access;
        point.none = n.none;
        point.touched = n.touched;
        point.peak_reserved = point.peak_reserved.max(n.access + n.none);
        point.peak_touched = point.peak_touched.max(n.touched);
        if lane.points.len() > MAX_POINTS {
            self.coarsen();
        }
    }

    /// Doubles the buckets of every lane.
    fn coarsen(&mut self) {
        self.width_ns *= 2;
        for lane in self.lanes.values_mut() {
            let mut merged: Vec<Point> = Vec::with_capacity(lane.points.len() / 2 + 1);
            for mut p in lane.points.drain(..) {
                p.bucket /= 2;
                match merged.last_mut() {
                    Some(m) if m.bucket == p.bucket => {
                        m.peak_reserved = m.peak_reserved.max(p.peak_reserved);
                        m.peak_touched = m.peak_touched.max(p.peak_touched);
                        m.created += p.created;
                        m.removed += p.removed;
                        (m.access, m.none, m.touched) = (p.access, p.none, p.touched);
                    }
                    _ => merged.push(p),
                }
            }
            lane.points = merged;
        }
    }

    fn touched(&mut self, pid: u32, key: LaneKey, ts: u64, delta: i64) {
        if delta == 0 {
            return;
        }
        self.update(pid, key, ts, |n, _| {
            n.touched = n.touched.saturating_add_signed(delta);
        });
    }

    fn reserve(&mut self, pid: u32, piece: &Piece, start: u64, ts: u64, sign: i64, churn: bool) {
        for (i, (key, len)) in piece.kind.parts(start, piece.end).into_iter().enumerate() {
            let delta = sign * len as i64;
            self.update(pid, key, ts, |n, p| {
                let v = if piece.access {
                    &mut n.access
                } else {
                    &mut n.none
                };
                *v = v.saturating_add_signed(delta);
                if churn && i == 0 {
                    if sign > 0 {
                        p.created += 1;
                    } else {
                        p.removed += 1;
                    }
                }
            });
        }
    }

    /// The lane of `address` in `pid`: the piece there before this event's changes, else the
    /// model's VMA there after them, else the block of anonymous memory.
    fn lane_at(&self, pid: u32, p: &Process, address: u64) -> LaneKey {
        let before = self
            .procs
            .get(&pid)
            .and_then(|s| s.pieces.range(..=address).next_back())
            .filter(|(_, piece)| piece.end > address)
            .map(|(_, piece)| piece.kind.lane(address));
        before
            .or_else(|| p.space.find(address).map(|v| Kind::of(v).lane(address)))
            .unwrap_or(LaneKey::Anon(address >> ARENA_SHIFT))
    }

    /// A process seen for the first time at an event of `ts` that the model has applied
    /// (replay adds processes without telling the sinks): its map as it was just before (from
    /// the history), so that the event's own changes are followed like any other's, and its
    /// touched pages now. Returns false when the history does not reach back that far (the
    /// map is then read as it is now).
    fn first_sight(&mut self, pid: u32, p: &Process, ts: u64) -> bool {
        let tl = p.space.timeline();
        let own = tl
            .entries()
            .iter()
            .rev()
            .take_while(|e| e.ts_ns == ts && !matches!(e.cause, Cause::Seed | Cause::Exec))
            .count();
        self.rebuild(pid, p, ts);
        if own == 0 || tl.horizon_ns() >= ts {
            return false;
        }
        let before = tl.state_at(ts - 1);
        let mut reserved: HashMap<LaneKey, (u64, u64)> = HashMap::new();
        let mut pieces = BTreeMap::new();
        for v in before.values() {
            let kind = Kind::of(v);
            let access = v.perms.read || v.perms.write || v.perms.exec;
            for (key, len) in kind.parts(v.start, v.end) {
                let r = reserved.entry(key).or_default();
                if access {
                    r.0 += len;
                } else {
                    r.1 += len;
                }
            }
            pieces.insert(
                v.start,
                Piece {
                    end: v.end,
                    kind,
                    access,
                },
            );
        }
        let mut keys: Vec<LaneKey> = self
            .lanes
            .keys()
            .filter(|(q, _)| *q == pid)
            .map(|(_, k)| k.clone())
            .chain(reserved.keys().cloned())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let (access, none) = reserved.get(&key).copied().unwrap_or_default();
            self.update(pid, key, ts, |n, _| {
                n.access = access;
                n.none = none;
            });
        }
        let seen = tl.pushed() - own as u64;
        self.procs.insert(pid, Proc { seen, pieces });
        true
    }

    /// Every lane of `pid` read again from the model (its map and touched pages now).
    fn rebuild(&mut self, pid: u32, p: &Process, ts: u64) {
        let keys: Vec<LaneKey> = self
            .lanes
            .keys()
            .filter(|(q, _)| *q == pid)
            .map(|(_, k)| k.clone())
            .collect();
        let mut wanted: HashMap<LaneKey, Now> =
            keys.into_iter().map(|k| (k, Now::default())).collect();
        let mut pieces = BTreeMap::new();
        for v in p.space.vmas() {
            let kind = Kind::of(v);
            let access = v.perms.read || v.perms.write || v.perms.exec;
            let mut at = v.start;
            for (key, len) in kind.parts(v.start, v.end) {
                let n = wanted.entry(key).or_default();
                if access {
                    n.access += len;
                } else {
                    n.none += len;
                }
                n.touched += p.space.pages_in(at, at + len).resident() * PAGE_SIZE;
                at += len;
            }
            pieces.insert(
                v.start,
                Piece {
                    end: v.end,
                    kind,
                    access,
                },
            );
        }
        for (key, want) in wanted {
            self.update(pid, key, ts, |n, _| *n = want);
        }
        let seen = p.space.timeline().pushed();
        self.procs.insert(pid, Proc { seen, pieces });
        if let Some(exe) = &p.exe {
            self.names.insert(pid, exe.clone());
        }
    }

    /// Follows the changes of `pid`'s map since the last look.
    fn follow(&mut self, pid: u32, p: &Process, ts: u64) {
        let Some(seen) = self.procs.get(&pid).map(|s| s.seen) else {
            self.rebuild(pid, p, ts);
            return;
        };
        let tl = p.space.timeline();
        let new = tl.pushed().saturating_sub(seen) as usize;
        let entries = tl.entries();
        if new == 0 {
            return;
        }
        // A new map (exec, resync) or more changes than the history kept: read it whole.
        let fresh = &entries[entries.len().saturating_sub(new)..];
        if new > entries.len()
            || fresh
                .iter()
                .any(|e| matches!(e.cause, Cause::Seed | Cause::Exec))
        {
            self.rebuild(pid, p, ts);
            return;
        }
        let fresh = fresh.to_vec();
        let mut arenas = Vec::new();
        for e in &fresh {
            let churn = matches!(
                e.cause,
                Cause::Mmap
                    | Cause::Munmap
                    | Cause::Brk
                    | Cause::Mremap
                    | Cause::Shmat
                    | Cause::Shmdt
            );
            match &e.change {
                Change::Unmapped { start, end } => {
                    for (s, piece) in self.carve(pid, *start, *end) {
                        self.reserve(pid, &piece, s, e.ts_ns, -1, churn);
                    }
                }
                Change::Mapped(v) => {
                    self.carve(pid, v.start, v.end);
                    let piece = Piece {
                        end: v.end,
                        kind: Kind::of(v),
                        access: v.perms.read || v.perms.write || v.perms.exec,
                    };
                    if churn {
                        self.pieces_created += 1;
                    }
                    if piece.kind == Kind::Anon && matches!(e.cause, Cause::Mprotect | Cause::Mmap)
                    {
                        arenas.push(v.start >> ARENA_SHIFT);
                    }
                    self.reserve(pid, &piece, v.start, e.ts_ns, 1, churn);
                    if let Some(s) = self.procs.get_mut(&pid) {
                        s.pieces.insert(v.start, piece);
                    }
                }
            }
        }
        if let Some(s) = self.procs.get_mut(&pid) {
            s.seen = tl.pushed();
        }
        arenas.sort_unstable();
        arenas.dedup();
        for block in arenas {
            let start = block << ARENA_SHIFT;
            if is_arena(p, start, start + (1 << ARENA_SHIFT))
                && let Some(lane) = self.lanes.get_mut(&(pid, LaneKey::Anon(block)))
            {
                lane.arena = true;
            }
        }
    }

    /// Removes `[start, end)` from `pid`'s pieces; returns what was there (start, piece).
    fn carve(&mut self, pid: u32, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let Some(s) = self.procs.get_mut(&pid) else {
            return Vec::new();
        };
        let keys: Vec<u64> = s
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(k, _)| *k)
            .collect();
        let mut removed = Vec::new();
        for k in keys.into_iter().rev() {
            let Some(p) = s.pieces.remove(&k) else {
                continue;
            };
            if k < start {
                s.pieces.insert(
                    k,
                    Piece {
                        end: start,
                        ..p.clone()
                    },
                );
            }
            if p.end > end {
                s.pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        ..p.clone()
                    },
                );
            }
            removed.push((
                k.max(start),
                Piece {
                    end: p.end.min(end),
                    ..p
                },
            ));
        }
        removed
    }

    /// Everything of `pid` ends at `ts` (it exited).
    fn end(&mut self, pid: u32, ts: u64) {
        let keys: Vec<LaneKey> = self
            .lanes
            .keys()
            .filter(|(q, _)| *q == pid)
            .map(|(_, k)| k.clone())
            .collect();
        for key in keys {
            self.update(pid, key, ts, |n, _| *n = Now::default());
        }
        self.procs.remove(&pid);
    }
}

impl Sink for Pictures {
    fn start(&mut self, _: &Meta) -> std::io::Result<()> {
        Ok(())
    }

    fn event(
        &mut self,
        event: &Event,
        applied: &Applied,
        session: &Session,
    ) -> std::io::Result<()> {
        let ts = event.ts_ns();
        // The run starts at its first event, whatever it changed.
        self.bucket(ts);
        let pid = match applied {
            Applied::Syscall { pid, .. } => *pid,
            Applied::Ignored => return Ok(()),
            // A child sharing its parent's memory (vfork, posix_spawn) acts on the parent's.
            Applied::Fault(_) | Applied::Collapsed { .. } => session.memory_owner(event.pid()),
            _ => event.pid(),
        };
        let Some(p) = session.get(pid) else {
            return Ok(());
        };
        // Seen first now: its touched pages are read whole, this event's included.
        let counted = !self.procs.contains_key(&pid) && {
            self.first_sight(pid, p, ts);
            true
        };
        let mut moved = None;
        match (event, applied) {
            _ if counted => {}
            (Event::Fault(f), Applied::Fault(fe)) => {
                let pages = match fe.touch {
                    Touch::First {
                        kind: TouchKind::Anon | TouchKind::File,
                        ..
                    } => fe.pages,
                    Touch::Upgraded {
                        from: TouchKind::Zero,
                    } => fe.pages.max(1),
                    _ => 0,
                };
                let key = self.lane_at(pid, p, f.address);
                self.touched(pid, key, ts, (pages * PAGE_SIZE) as i64);
            }
            (_, Applied::Syscall { effect: e, .. }) => {
                let key = self.lane_at(pid, p, e.start);
                let delta = e.populated_pages as i64 - e.released_pages as i64;
                self.touched(pid, key, ts, delta * PAGE_SIZE as i64);
                if e.kind == EffectKind::Moved
                    && let Some(from) = e.from
                {
                    moved = Some((self.lane_at(pid, p, from), e.start, e.end));
                }
            }
            _ => {}
        }
        self.follow(pid, p, ts);
        if let Some((from, start, end)) = moved {
            let bytes = (p.space.pages_in(start, end).resident() * PAGE_SIZE) as i64;
            let to = self.lane_at(pid, p, start);
            self.touched(pid, from, ts, -bytes);
            self.touched(pid, to, ts, bytes);
        }
        match (event, applied) {
            (Event::Fork { child, .. }, Applied::Fork { traced: true, .. }) => {
                if let Some(c) = session.get(*child) {
                    self.rebuild(*child, c, ts);
                }
            }
            (Event::Exit { .. }, Applied::Exit) => self.end(pid, ts),
            _ => {}
        }
        Ok(())
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> std::io::Result<()> {
        if reason.seeds() {
            self.rebuild(p.pid, p, ts_ns);
        } else {
            self.bucket(ts_ns);
        }
        Ok(())
    }
    fn lost(&mut self, _: u64, _: &LossSummary) -> std::io::Result<()> {
        Ok(())
    }
    fn drift(&mut self, _: u64, _: u32, _: &[String]) -> std::io::Result<()> {
        Ok(())
    }
    fn tick(&mut self, _: &Session) -> std::io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, ts_ns: u64, _: &Summary) -> std::io::Result<()> {
        self.bucket(ts_ns);
        Ok(())
    }
    fn findings(&mut self, _: &[Finding]) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Dense columns of one lane (or of several folded together, or of a whole process).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Series {
    /// Reserved bytes with access (readable, writable or executable) at each column's end.
    pub access: Vec<u64>,
    /// Reserved bytes without access (`PROT_NONE`).
    pub none: Vec<u64>,
    /// Touched (resident) bytes at each column's end.
    pub touched: Vec<u64>,
    /// The most reserved and touched bytes within each column.
    pub peak_reserved: Vec<u64>,
    pub peak_touched: Vec<u64>,
    /// Pieces created and removed by mapping calls within each column.
    pub created: Vec<u32>,
    pub removed: Vec<u32>,
}

impl Series {
    fn zeros(columns: usize) -> Self {
        Self {
            access: vec![0; columns],
            none: vec![0; columns],
            touched: vec![0; columns],
            peak_reserved: vec![0; columns],
            peak_touched: vec![0; columns],
            created: vec![0; columns],
            removed: vec![0; columns],
        }
    }

    /// The columns of a lane's points (bucket `b` covers `[b * width, (b + 1) * width)` from
    /// the start; a column's values are those at its end, carried over when nothing changed).
    fn from_points(points: &[Point], width_ns: u64, span_ns: u64, columns: usize) -> Self {
        let mut s = Self::zeros(columns);
        let column = |bucket: u64| {
            ((u128::from(bucket * width_ns) * columns as u128 / u128::from(span_ns.max(1)))
                as usize)
                .min(columns - 1)
        };
        let mut now = Point::default();
        let mut points = points.iter().peekable();
        for c in 0..columns {
            let (mut peak_r, mut peak_t) = (now.access + now.none, now.touched);
            while let Some(p) = points.next_if(|p| column(p.bucket) <= c) {
                peak_r = peak_r.max(p.peak_reserved);
                peak_t = peak_t.max(p.peak_touched);
                s.created[c] += p.created;
                s.removed[c] += p.removed;
                now = *p;
            }
            s.access[c] = now.access;
            s.none[c] = now.none;
            s.touched[c] = now.touched;
            s.peak_reserved[c] = peak_r.max(now.access + now.none);
            s.peak_touched[c] = peak_t.max(now.touched);
        }
        s
    }

    fn add(&mut self, o: &Series) {
        let sum = |a: &mut Vec<u64>, b: &Vec<u64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        sum(&mut self.access, &o.access);
        sum(&mut self.none, &o.none);
        sum(&mut self.touched, &o.touched);
        sum(&mut self.peak_reserved, &o.peak_reserved);
        sum(&mut self.peak_touched, &o.peak_touched);
        self.created
            .iter_mut()
            .zip(&o.created)
            .for_each(|(x, y)| *x += y);
        self.removed
            .iter_mut()
            .zip(&o.removed)
            .for_each(|(x, y)| *x += y);
    }

    /// The most touched bytes at any time.
    pub fn max_touched(&self) -> u64 {
        self.peak_touched.iter().copied().max().unwrap_or(0)
    }

    /// The most reserved bytes with access at any time.
    pub fn max_access(&self) -> u64 {
        self.access.iter().copied().max().unwrap_or(0)
    }

    /// The most reserved bytes without access at any time.
    pub fn max_none(&self) -> u64 {
        self.none.iter().copied().max().unwrap_or(0)
    }

    /// Pieces created over the whole run.
    pub fn total_created(&self) -> u64 {
        self.created.iter().map(|&c| u64::from(c)).sum()
    }

    fn weight(&self) -> (u64, u64, u64) {
        (
            self.max_touched(),
            self.max_access(),
            self.total_created() + self.removed.iter().map(|&c| u64::from(c)).sum::<u64>(),
        )
    }
}

/// One row of the pictures.
#[derive(Clone, Debug)]
pub struct LanePicture {
    pub label: String,
    /// `heap`, `stack`, `arena`, `anon`, `file`, `shm`, `special`, or `other` (folded).
    pub kind: &'static str,
    /// How many regions the row stands for (more than one when folded).
    pub regions: usize,
    pub series: Series,
}

/// One process (or several folded) in the pictures.
#[derive(Clone, Debug)]
pub struct ProcessPicture {
    pub pid: u32,
    pub name: String,
    /// How many processes this stands for.
    pub processes: usize,
    pub total: Series,
    pub lanes: Vec<LanePicture>,
}

/// What `html` and `perfetto` draw.
#[derive(Clone, Debug)]
pub struct Picture {
    pub t0_ns: u64,
    pub t1_ns: u64,
    pub columns: usize,
    pub pieces_created: u64,
    /// Regions over all processes, folded ones included.
    pub regions: usize,
    pub processes: Vec<ProcessPicture>,
}

impl Picture {
    /// The start of column `c`, in nanoseconds from the start.
    pub fn column_ns(&self, c: usize) -> u64 {
        ((u128::from(self.t1_ns - self.t0_ns) * c as u128) / self.columns.max(1) as u128) as u64
    }
}

fn lane_label(key: &LaneKey, arena: bool) -> (String, &'static str) {
    let name = |s: &str| crate::name::shown(s).to_string();
    match key {
        LaneKey::Heap => ("heap".into(), "heap"),
        LaneKey::Stack => ("stack".into(), "stack"),
        LaneKey::Anon(b) if arena => (format!("arena {:#x}", b << ARENA_SHIFT), "arena"),
        LaneKey::Anon(b) => (
            format!("anon {:#x}-{:#x}", b << ARENA_SHIFT, (b + 1) << ARENA_SHIFT),
            "anon",
        ),
        LaneKey::File(p) => (name(p), "file"),
        LaneKey::Shm(k) => (format!("shm {k:#x}"), "shm"),
        LaneKey::Special(n) => (name(n), "special"),
    }
}

/// The kind a folded lane goes with.
fn fold_kind(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "arena" | "anon" | "heap" | "stack" => ("other anonymous memory", "anon"),
        "file" => ("other files", "file"),
        _ => ("other mappings", "other"),
    }
}

impl Pictures {
    /// The pictures in `columns` columns over the whole run.
    pub fn picture(&self, columns: usize) -> Picture {
        let columns = columns.max(1);
        let t0 = self.t0.unwrap_or(0);
        let t1 = self.last_ns.max(t0 + 1);
        let span = t1 - t0;
        let mut by_pid: BTreeMap<u32, Vec<LanePicture>> = BTreeMap::new();
        for ((pid, key), lane) in &self.lanes {
            let (label, kind) = lane_label(key, lane.arena);
            by_pid.entry(*pid).or_default().push(LanePicture {
                label,
                kind,
                regions: 1,
                series: Series::from_points(&lane.points, self.width_ns, span, columns),
            });
        }
        let regions = self.lanes.len();
        let mut procs: Vec<ProcessPicture> = by_pid
            .into_iter()
            .map(|(pid, mut lanes)| {
                let mut total = Series::zeros(columns);
                for l in &lanes {
                    total.add(&l.series);
                }
                lanes.sort_by(|a, b| {
                    b.series
                        .weight()
                        .cmp(&a.series.weight())
                        .then(a.label.cmp(&b.label))
                });
                let rest = lanes.split_off(lanes.len().min(MAX_LANES_PER_PROCESS));
                lanes.extend(fold(rest, columns));
                ProcessPicture {
                    pid,
                    name: self.names.get(&pid).cloned().unwrap_or_else(|| "?".into()),
                    processes: 1,
                    total,
                    lanes,
                }
            })
            .collect();
        procs.sort_by(|a, b| {
            b.total
                .weight()
                .cmp(&a.total.weight())
                .then(a.pid.cmp(&b.pid))
        });
        let rest = procs.split_off(procs.len().min(MAX_PROCESSES));
        if !rest.is_empty() {
            let mut total = Series::zeros(columns);
            let mut lanes = Vec::new();
            for p in &rest {
                total.add(&p.total);
                lanes.extend(p.lanes.iter().cloned());
            }
            procs.push(ProcessPicture {
                pid: rest[0].pid,
                name: format!("{} other processes", rest.len()),
                processes: rest.len(),
                total,
                lanes: fold(lanes, columns),
            });
        }
        Picture {
            t0_ns: t0,
            t1_ns: t1,
            columns,
            pieces_created: self.pieces_created,
            regions,
            processes: procs,
        }
    }
}

/// Lanes folded into one per kind of memory (a kind with one lane keeps it).
fn fold(lanes: Vec<LanePicture>, columns: usize) -> Vec<LanePicture> {
    let mut groups: BTreeMap<&'static str, Vec<LanePicture>> = BTreeMap::new();
    for l in lanes {
        groups.entry(fold_kind(l.kind).0).or_default().push(l);
    }
    groups
        .into_iter()
        .map(|(label, mut group)| {
            if group.len() == 1 && group[0].regions == 1 {
                return group.remove(0);
            }
            let mut f = LanePicture {
                label: String::new(),
                kind: fold_kind(group[0].kind).1,
                regions: 0,
                series: Series::zeros(columns),
            };
            for l in &group {
                f.regions += l.regions;
                f.series.add(&l.series);
            }
            f.label = format!("{label} ({} regions)", f.regions);
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{FaultRecord, SyscallRecord},
        session::Seed,
    };
    use tracer_common::Syscall;

    const PID: u32 = 9;

    struct Run {
        session: Session,
        pics: Pictures,
    }

    impl Run {
        fn new() -> Self {
            let mut session = Session::default();
            session.add(PID, Seed::default(), 0, Some("/bin/x".into()));
            Self {
                session,
                pics: Pictures::new(),
            }
        }

        fn apply(&mut self, ev: Event) {
            let applied = self.session.apply(&ev);
            self.pics
                .event(&ev, &applied, &self.session)
                .expect("in memory");
        }

        fn call(&mut self, ts: u64, call: Syscall, args: [u64; 6], ret: i64) {
            self.apply(Event::Syscall(SyscallRecord::at(
                ts, PID, PID, call, args, ret,
            )));
        }

        fn fault(&mut self, ts: u64, address: u64) {
            self.fault_by(ts, PID, address);
        }

        fn fault_by(&mut self, ts: u64, pid: u32, address: u64) {
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
    }

    const MIB: u64 = 1 << 20;
    const MS: u64 = 1_000_000;

    #[test]
    fn an_arena_reservation_is_drawn_apart_from_its_touched_memory() {
        let mut r = Run::new();
        // glibc's new_heap: 64 MiB PROT_NONE at an aligned address, the first 1 MiB made
        // accessible, 256 KiB of it touched.
        let a = 0x7f00_0000_0000u64;
        r.call(
            MS,
            Syscall::Mmap,
            [0, 64 * MIB, 0, 0x4022, u64::MAX, 0],
            a as i64,
        );
        r.call(2 * MS, Syscall::Mprotect, [a, MIB, 3, 0, 0, 0], 0);
        for page in 0..64 {
            r.fault(3 * MS + page, a + page * PAGE_SIZE);
        }
        let pic = r.pics.picture(10);
        let lane = &pic.processes[0].lanes[0];
        assert_eq!(lane.label, "arena 0x7f0000000000");
        assert_eq!(lane.series.max_access(), MIB);
        // The whole reservation had no access until the mprotect.
        assert_eq!(lane.series.max_none(), 64 * MIB);
        assert_eq!(*lane.series.none.last().expect("columns"), 63 * MIB);
        assert_eq!(lane.series.max_touched(), 64 * PAGE_SIZE);
        assert_eq!(lane.series.total_created(), 1);
        // The last column is the end of the run.
        assert_eq!(
            *lane.series.touched.last().expect("columns"),
            64 * PAGE_SIZE
        );
    }

    #[test]
    fn a_child_sharing_its_parents_memory_is_drawn_in_the_parents_rows() {
        let mut r = Run::new();
        let a = 0x7f00_0000_0000u64;
        r.call(MS, Syscall::Mmap, [0, MIB, 3, 0x22, u64::MAX, 0], a as i64);
        // posix_spawn: the CLONE_VM child touches 16 of its parent's pages.
        r.apply(Event::Fork {
            ts_ns: 2 * MS,
            pid: PID,
            tid: PID,
            child: 10,
            followed: true,
            shares_vm: true,
        });
        for page in 0..16 {
            r.fault_by(3 * MS + page, 10, a + page * PAGE_SIZE);
        }
        let pic = r.pics.picture(10);
        let parent = pic
            .processes
            .iter()
            .find(|p| p.pid == PID)
            .expect("the parent");
        let lane = parent
            .lanes
            .iter()
            .find(|l| l.label.contains("0x7f0000000000"))
            .expect("the block's row");
        assert_eq!(lane.series.max_touched(), 16 * PAGE_SIZE);
        assert!(
            pic.processes
                .iter()
                .filter(|p| p.pid == 10)
                .all(|p| p.lanes.iter().all(|l| l.series.max_touched() == 0)),
            "the child has no memory of its own"
        );
    }

    #[test]
    fn churn_over_a_long_run_is_counted_and_covers_the_whole_time() {
        let mut r = Run::new();
        let a = 0x7e00_0000_0000u64;
        // 10,000 mappings, each touched and unmapped, over 100 s: buckets coarsen.
        for i in 0..10_000u64 {
            let ts = i * 10 * MS;
            r.call(
                ts + 1,
                Syscall::Mmap,
                [0, 16 * PAGE_SIZE, 3, 0x22, u64::MAX, 0],
                a as i64,
            );
            r.fault(ts + 2, a);
            r.call(ts + 3, Syscall::Munmap, [a, 16 * PAGE_SIZE, 0, 0, 0, 0], 0);
        }
        assert!(r.pics.lanes.values().all(|l| l.points.len() <= MAX_POINTS));
        assert_eq!(r.pics.pieces_created(), 10_000);
        let pic = r.pics.picture(100);
        assert!(pic.t1_ns - pic.t0_ns >= 99_990 * MS);
        let lane = &pic.processes[0].lanes[0];
        assert_eq!(lane.series.total_created(), 10_000);
        // Every column saw mappings come and go, the last one included.
        assert!(
            lane.series.created.iter().all(|&c| c > 0),
            "{:?}",
            lane.series.created
        );
        assert!(lane.series.peak_touched.iter().all(|&t| t == PAGE_SIZE));
        assert_eq!(*lane.series.access.last().expect("columns"), 0);
    }

    #[test]
    fn many_regions_fold_into_a_bounded_number_of_rows() {
        let mut r = Run::new();
        for i in 0..100u64 {
            let a = 0x7d00_0000_0000 + (i << ARENA_SHIFT);
            r.call(
                i + 1,
                Syscall::Mmap,
                [0, MIB, 3, 0x22, u64::MAX, 0],
                a as i64,
            );
        }
        let pic = r.pics.picture(10);
        let lanes = &pic.processes[0].lanes;
        assert_eq!(lanes.len(), MAX_LANES_PER_PROCESS + 1);
        let other = lanes.last().expect("a folded row");
        assert_eq!(other.label, "other anonymous memory (88 regions)");
        assert_eq!(other.series.max_access(), 88 * MIB);
        assert_eq!(pic.processes[0].total.max_access(), 100 * MIB);
    }
}
