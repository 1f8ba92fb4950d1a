//! An append-only history of an address space: every change to its VMA map as a primitive
//! (`Unmapped` range or `Mapped` VMA) with the time and the cause. Replaying the history from
//! its base gives the map at any past moment. The history is bounded: past `cap` entries the
//! oldest half is folded into the base.

use std::collections::BTreeMap;

use super::vma::Vma;

/// Why the map changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    Seed,
    Mmap,
    Munmap,
    Brk,
    Mremap,
    Mprotect,
    Madvise,
    Shmat,
    Shmdt,
    StackGrowth,
    Exec,
    Fork,
    /// A VMA's first private anonymous page (it gets an anon_vma).
    Fault,
}

impl Cause {
    /// The name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Mmap => "mmap",
            Self::Munmap => "munmap",
            Self::Brk => "brk",
            Self::Mremap => "mremap",
            Self::Mprotect => "mprotect",
            Self::Madvise => "madvise",
            Self::Fault => "fault",
            Self::Shmat => "shmat",
            Self::Shmdt => "shmdt",
            Self::StackGrowth => "stack_growth",
            Self::Exec => "exec",
            Self::Fork => "fork",
        }
    }
}

/// One primitive change of the VMA map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `[start, end)` no longer mapped.
    Unmapped { start: u64, end: u64 },
    /// A VMA placed into a free range (merged with compatible neighbours).
    Mapped(Vma),
}

/// A change with its time and cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ts_ns: u64,
    pub cause: Cause,
    pub change: Change,
}

/// The history of one address space.
#[derive(Clone, Debug)]
pub struct Timeline {
    base: BTreeMap<u64, Vma>,
    base_ts_ns: u64,
    entries: Vec<Entry>,
    cap: usize,
    /// Entries pushed since the history began, folded ones included.
    pushed: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::with_capacity(200_000)
    }
}

impl Timeline {
    /// A history that keeps at most `cap` entries (at least 2).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            base: BTreeMap::new(),
            base_ts_ns: 0,
            entries: Vec::new(),
            cap: cap.max(2),
            pushed: 0,
        }
    }

    /// Appends a change.
    pub fn push(&mut self, ts_ns: u64, cause: Cause, change: Change) {
        if self.entries.len() >= self.cap {
            let fold = self.entries.len() / 2;
            let folded: Vec<Entry> = self.entries.drain(..fold).collect();
            for e in &folded {
                apply(&mut self.base, &e.change);
                self.base_ts_ns = e.ts_ns;
            }
        }
        self.pushed += 1;
        self.entries.push(Entry {
            ts_ns,
            cause,
            change,
        });
    }

    /// Entries pushed since the history began (folded ones included): a reader that kept this
    /// number finds the entries pushed since at the end of [`Timeline::entries`], unless more
    /// than `entries().len()` were pushed.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// The recorded entries (after the base).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The earliest moment the history can answer for.
    pub fn horizon_ns(&self) -> u64 {
        self.base_ts_ns
    }

    /// The VMA map as it was just after every change at or before `ts_ns`.
    pub fn state_at(&self, ts_ns: u64) -> BTreeMap<u64, Vma> {
        let mut map = self.base.clone();
        for e in self.entries.iter().take_while(|e| e.ts_ns <= ts_ns) {
            apply(&mut map, &e.change);
        }
        map
    }
}

/// Applies one primitive change to a VMA map. The live model uses the same two functions, so
/// the history and the model cannot disagree.
pub fn apply(map: &mut BTreeMap<u64, Vma>, change: &Change) {
    match change {
        Change::Unmapped { start, end } => {
            carve(map, *start, *end);
        }
        Change::Mapped(vma) => insert_merging(map, vma.clone()),
    }
}

/// Removes `[start, end)` from `map`, splitting VMAs that cross its bounds. Returns the removed
/// pieces in address order. This is where VMAs are split.
pub fn carve(map: &mut BTreeMap<u64, Vma>, start: u64, end: u64) -> Vec<Vma> {
    if start >= end {
        return Vec::new();
    }
    let keys: Vec<u64> = map
        .range(..end)
        .rev()
        .take_while(|(_, v)| v.end > start)
        .map(|(k, _)| *k)
        .collect();
    let mut removed = Vec::with_capacity(keys.len());
    for k in keys.into_iter().rev() {
        let Some(v) = map.remove(&k) else { continue };
        if v.start < start {
            map.insert(v.start, v.slice(v.start, start));
        }
        if v.end > end {
            map.insert(end, v.slice(end, v.end));
        }
        removed.push(v.slice(start, end));
    }
    removed
}

/// Whether `b` can extend `a` (which ends where `b` starts) as one VMA, as the kernel would
/// merge them: same permissions, backing and huge-page advice, contiguous file offsets.
pub fn mergeable(a: &Vma, b: &Vma) -> bool {
    a.end == b.start
        && a.perms == b.perms
        && a.backing.same_object(&b.backing)
        && a.thp == b.thp
        && a.fork == b.fork
        && (!matches!(
            a.backing,
            super::vma::Backing::File { .. } | super::vma::Backing::Shm { .. }
        ) || a.offset + a.len() == b.offset)
}

/// Inserts `vma` into `map`, merged with compatible neighbours. Whatever overlapped its range
/// is removed first, so that no input (a hostile recording included) can make VMAs overlap.
pub fn insert_merging(map: &mut BTreeMap<u64, Vma>, mut vma: Vma) {
    if vma.is_empty() {
        return;
    }
    if map
        .range(..vma.end)
        .next_back()
        .is_some_and(|(_, v)| v.end > vma.start)
    {
        carve(map, vma.start, vma.end);
    }
    let prev_key = map
        .range(..vma.start)
        .next_back()
        .filter(|(_, prev)| mergeable(prev, &vma))
        .map(|(&k, _)| k);
    // A merged VMA has an anon_vma when either part had one (the kernel shares it).
    if let Some(prev) = prev_key.and_then(|k| map.remove(&k)) {
        vma.anon_vma |= prev.anon_vma;
        vma.created_ns = vma.created_ns.min(prev.created_ns);
        vma.offset = prev.offset;
        vma.start = prev.start;
    }
    let next_mergeable = map.get(&vma.end).is_some_and(|next| mergeable(&vma, next));
    if let Some(next) = next_mergeable.then(|| map.remove(&vma.end)).flatten() {
        vma.anon_vma |= next.anon_vma;
        vma.created_ns = vma.created_ns.min(next.created_ns);
        vma.end = next.end;
    }
    map.insert(vma.start, vma);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vma::{Backing, Perms};

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            perms: Perms::from_prot(3, false),
            offset: 0,
            backing: Backing::Anonymous,
            created_ns: 0,
            thp: Default::default(),
            fork: Default::default(),
            anon_vma: false,
        }
    }

    #[test]
    fn a_bounded_history_still_replays_to_the_present() {
        let mut t = Timeline::with_capacity(4);
        let mut map = BTreeMap::new();
        for i in 0..100u64 {
            let change = if i % 3 == 2 {
                Change::Unmapped {
                    start: (i - 1) * 0x2000,
                    end: (i - 1) * 0x2000 + 0x1000,
                }
            } else {
                Change::Mapped(vma(i * 0x2000, i * 0x2000 + 0x1000))
            };
            apply(&mut map, &change);
            t.push(i, Cause::Mmap, change);
            assert!(t.entries().len() <= 4);
        }
        assert_eq!(t.state_at(u64::MAX), map);
        assert!(t.horizon_ns() > 0, "old entries were folded");
    }
}
