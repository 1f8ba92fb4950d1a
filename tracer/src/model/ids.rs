//! Mapping ids: which mapping each mapped address belongs to, so that "which mapping grew" has
//! one answer whatever the kernel did to the VMAs.
//!
//! A mapping is what one call created: an `mmap`, a `shmat`, the heap (`brk`), the stack, or a
//! VMA found at a seed. Its id (per process, from 1, never reused within the process) stays
//! with its pages' addresses:
//!
//! - a split (`mprotect`, `madvise`, a partial `munmap`) leaves every piece its id;
//! - a merge (the kernel joins neighbours of the same protection and backing into one VMA)
//!   keeps each part's id: the ids are kept apart from the VMAs, so one VMA may hold several
//!   mappings (its `parts`);
//! - a move (`mremap`) takes the ids with the pages, and a growth (`brk`, `mremap` in place,
//!   the stack growing down) extends the id of the mapping that grew; the old range of
//!   `MREMAP_DONTUNMAP` is a new mapping;
//! - a `MAP_FIXED` mapping over others is a new mapping, and the ranges it replaced are gone;
//! - a fork gives the child the parent's ids; an exec or a resync after lost events (a map
//!   read again from `/proc`, where the kernel had merged what it merges) starts new ones.
//!
//! Each id's size is kept, and for the ids that ever grew beyond their first size, their first
//! and largest sizes ([`Growth`]).

use std::collections::{BTreeMap, HashMap};

/// How one mapping grew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Growth {
    /// Bytes right after the call that created it.
    pub first_bytes: u64,
    /// The most it ever had.
    pub peak_bytes: u64,
    /// Bytes now (0 once unmapped).
    pub now_bytes: u64,
    pub created_ns: u64,
}

/// Address ranges to mapping ids (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct Ids {
    /// start -> (end, id); ranges never overlap, neighbours of one id are joined.
    ranges: BTreeMap<u64, (u64, u64)>,
    /// Bytes of each mapped id, with when it was created.
    sizes: HashMap<u64, Growth>,
    /// Ids that grew past their first size, kept after they are unmapped.
    grown: BTreeMap<u64, Growth>,
    last: u64,
}

impl Ids {
    /// A new id.
    pub fn fresh(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    /// The id of the mapping at `address`.
    pub fn at(&self, address: u64) -> Option<u64> {
        self.ranges
            .range(..=address)
            .next_back()
            .filter(|(_, (end, _))| *end > address)
            .map(|(_, (_, id))| *id)
    }

    /// The mappings in `[start, end)`: (start, end, id), in address order.
    pub fn ranges_in(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .unwrap_or(start);
        self.ranges
            .range(first..end)
            .map(|(s, (e, id))| ((*s).max(start), (*e).min(end), *id))
            .filter(|(s, e, _)| s < e)
            .collect()
    }

    /// Cuts `[start, end)` out of the ranges, without counting; returns what was there.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let removed = self.ranges_in(start, end);
        for &(s, e, id) in &removed {
            let Some((&rs, &(re, _))) = self.ranges.range(..=s).next_back() else {
                continue;
            };
            self.ranges.remove(&rs);
            if rs < s {
                self.ranges.insert(rs, (s, id));
            }
            if re > e {
                self.ranges.insert(e, (re, id));
            }
        }
        removed
    }

    /// Puts `[start, end)` (free) under `id`, joined with neighbours of the same id.
    fn put(&mut self, start: u64, end: u64, id: u64) {
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &(pe, pid))) = self.ranges.range(..start).next_back()
            && pe == start
            && pid == id
        {
            self.ranges.remove(&ps);
            s = ps;
        }
        if let Some(&(ne, nid)) = self.ranges.get(&end)
            && nid == id
        {
            self.ranges.remove(&end);
            e = ne;
        }
        self.ranges.insert(s, (e, id));
    }

    /// `[start, end)` belongs to mapping `id` now (at `ts`).
    pub fn set(&mut self, start: u64, end: u64, id: u64, ts: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        self.put(start, end, id);
        let g = self.sizes.entry(id).or_insert(Growth {
            first_bytes: 0,
            peak_bytes: 0,
            now_bytes: 0,
            created_ns: ts,
        });
        g.now_bytes += end - start;
        if g.created_ns == ts {
            g.first_bytes = g.first_bytes.max(g.now_bytes);
        }
        g.peak_bytes = g.peak_bytes.max(g.now_bytes);
        if g.peak_bytes > g.first_bytes {
            self.grown.insert(id, *g);
        }
    }

    /// `[start, end)` is no longer mapped; returns what was there (start, end, id).
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let removed = self.take(start, end);
        for &(s, e, id) in &removed {
            if let Some(g) = self.sizes.get_mut(&id) {
                g.now_bytes = g.now_bytes.saturating_sub(e - s);
                let g = *g;
                if let Some(kept) = self.grown.get_mut(&id) {
                    *kept = g;
                }
                if g.now_bytes == 0 {
                    self.sizes.remove(&id);
                }
            }
        }
        removed
    }

    /// The mappings of `[start, start + len)` move to `to`, sizes unchanged.
    pub fn relocate(&mut self, start: u64, len: u64, to: u64) {
        let moved = self.take(start, start.saturating_add(len));
        // Whatever was at the destination is replaced (the caller unmapped it already).
        self.remove(to, to.saturating_add(len));
        for (s, e, id) in moved {
            self.put(to + (s - start), to + (e - start), id);
        }
    }

    /// Nothing is mapped any more (exec, a new seed); ids go on from where they were.
    pub fn clear(&mut self) {
        let all: Vec<(u64, u64)> = self.ranges.iter().map(|(s, (e, _))| (*s, *e)).collect();
        for (s, e) in all {
            self.remove(s, e);
        }
    }

    /// The ids that grew past their first size, with how.
    pub fn grown(&self) -> &BTreeMap<u64, Growth> {
        &self.grown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_splits_merges_and_moves() {
        let mut ids = Ids::default();
        let a = ids.fresh();
        ids.set(0x1000, 0x9000, a, 1);
        let b = ids.fresh();
        ids.set(0x9000, 0xb000, b, 2);
        // Two mappings side by side stay two, whatever the VMAs do.
        assert_eq!(
            ids.ranges_in(0, u64::MAX),
            [(0x1000, 0x9000, a), (0x9000, 0xb000, b)]
        );
        // A hole splits a into two pieces of a.
        ids.remove(0x3000, 0x4000);
        assert_eq!(ids.at(0x2000), Some(a));
        assert_eq!(ids.at(0x3000), None);
        assert_eq!(ids.at(0x4000), Some(a));
        // a's pieces move; b stays.
        ids.relocate(0x1000, 0x8000, 0x100000);
        assert_eq!(ids.at(0x100000), Some(a));
        assert_eq!(ids.at(0x102000), None, "the hole moved too");
        assert_eq!(ids.at(0x9000), Some(b));
        // a grows in place; the growth is recorded, b's is not.
        ids.set(0x108000, 0x110000, a, 4);
        let g = ids.grown()[&a];
        assert_eq!((g.first_bytes, g.peak_bytes), (0x8000, 0xf000));
        assert!(!ids.grown().contains_key(&b));
        // Unmapped, a's growth is still known.
        ids.clear();
        assert_eq!(ids.ranges_in(0, u64::MAX), []);
        assert_eq!(ids.grown()[&a].now_bytes, 0);
        assert_eq!(ids.fresh(), 3, "ids are never reused");
    }
}
