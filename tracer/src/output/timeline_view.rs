//! The address space over time, for pictures: each VMA piece with its lifetime (from the
//! model's history), and reserved/touched counters sampled while a recording is replayed.

use std::collections::BTreeMap;

use super::{LossSummary, Meta, Sink, Summary};
use crate::{
    analysis::Finding,
    event::Event,
    model::{
        PAGE_SIZE, Vma,
        timeline::{Cause, Change, carve},
    },
    session::{Applied, Process, Session},
};

/// One VMA piece and the time it existed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Band {
    pub pid: u32,
    pub vma: Vma,
    pub from_ns: u64,
    /// None: still mapped at the end.
    pub to_ns: Option<u64>,
    pub created_by: Cause,
    pub removed_by: Option<Cause>,
    /// Touched fraction in per mille (known for pieces still mapped).
    pub touched_permille: Option<u32>,
}

/// Every VMA piece of `p` over its recorded history, in the order they were created.
pub fn bands(p: &Process) -> Vec<Band> {
    let tl = p.space.timeline();
    // Live pieces keyed by start: (piece with created_ns = start of life, cause).
    let mut live: BTreeMap<u64, Vma> = tl.state_at(tl.horizon_ns());
    let mut causes: BTreeMap<u64, Cause> = live.keys().map(|k| (*k, Cause::Seed)).collect();
    let mut out = Vec::new();
    for e in tl.entries() {
        if e.ts_ns < tl.horizon_ns() {
            continue;
        }
        match &e.change {
            Change::Unmapped { start, end } => {
                for piece in carve_keeping(&mut live, &mut causes, *start, *end) {
                    let by = causes.get(&piece.start).copied().unwrap_or(Cause::Seed);
                    out.push(Band {
                        pid: p.pid,
                        from_ns: piece.created_ns,
                        vma: piece,
                        to_ns: Some(e.ts_ns),
                        created_by: by,
                        removed_by: Some(e.cause),
                        touched_permille: None,
                    });
                }
            }
            Change::Mapped(v) => {
                let mut piece = v.clone();
                piece.created_ns = e.ts_ns;
                carve_keeping(&mut live, &mut causes, piece.start, piece.end);
                causes.insert(piece.start, e.cause);
                live.insert(piece.start, piece);
            }
        }
    }
    for (start, piece) in live {
        let c = p.space.pages_in(piece.start, piece.end);
        let permille = (c.resident() * PAGE_SIZE * 1000 / piece.len().max(1)) as u32;
        out.push(Band {
            pid: p.pid,
            from_ns: piece.created_ns,
            created_by: causes.get(&start).copied().unwrap_or(Cause::Seed),
            vma: piece,
            to_ns: None,
            removed_by: None,
            touched_permille: Some(permille.min(1000)),
        });
    }
    out
}

/// `carve`, keeping the creation cause of a piece whose right part is cut off into a new key.
fn carve_keeping(
    live: &mut BTreeMap<u64, Vma>,
    causes: &mut BTreeMap<u64, Cause>,
    start: u64,
    end: u64,
) -> Vec<Vma> {
    let right = live
        .range(..end)
        .next_back()
        .filter(|(_, v)| v.end > end)
        .and_then(|(k, _)| causes.get(k).copied());
    let removed = carve(live, start, end);
    if let Some(cause) = right {
        causes.insert(end, cause);
    }
    removed
}

/// The first and last moments the bands and samples cover (`end > start`).
pub fn time_span(bands: &[Band], samples: &[Sample]) -> (u64, u64) {
    let start = bands
        .iter()
        .map(|b| b.from_ns)
        .chain(samples.iter().map(|s| s.ts_ns))
        .min()
        .unwrap_or(0);
    let end = bands
        .iter()
        .flat_map(|b| [Some(b.from_ns), b.to_ns])
        .flatten()
        .chain(samples.iter().map(|s| s.ts_ns))
        .max()
        .unwrap_or(start)
        .max(start + 1);
    (start, end)
}

/// Reserved and touched bytes of a process at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub ts_ns: u64,
    pub pid: u32,
    pub reserved_bytes: u64,
    pub touched_bytes: u64,
}

/// A sink that keeps counter samples, at most one per process per `every_ns` of trace time.
pub struct Sampler {
    every_ns: u64,
    last: BTreeMap<u32, u64>,
    pub samples: Vec<Sample>,
}

impl Sampler {
    /// Samples every `every_ns` nanoseconds of trace time.
    pub fn new(every_ns: u64) -> Self {
        Self {
            every_ns: every_ns.max(1),
            last: BTreeMap::new(),
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, ts_ns: u64, p: &Process, force: bool) {
        let due = self
            .last
            .get(&p.pid)
            .is_none_or(|l| ts_ns.saturating_sub(*l) >= self.every_ns);
        if !(due || force) {
            return;
        }
        self.last.insert(p.pid, ts_ns);
        self.samples.push(Sample {
            ts_ns,
            pid: p.pid,
            reserved_bytes: p.space.vmas().map(Vma::len).sum(),
            touched_bytes: p.space.pages().len() as u64 * PAGE_SIZE,
        });
    }
}

impl Sink for Sampler {
    fn start(&mut self, _: &Meta) -> std::io::Result<()> {
        Ok(())
    }
    fn event(&mut self, event: &Event, _: &Applied, session: &Session) -> std::io::Result<()> {
        if let Some(p) = session.get(event.pid()) {
            self.sample(event.ts_ns(), p, false);
        }
        Ok(())
    }
    fn snapshot(
        &mut self,
        ts_ns: u64,
        _: super::SnapshotReason,
        p: &Process,
    ) -> std::io::Result<()> {
        self.sample(ts_ns, p, true);
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
    fn summary(&mut self, _: u64, _: &Summary) -> std::io::Result<()> {
        Ok(())
    }
    fn findings(&mut self, _: &[Finding]) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
