//! One process's address space: its VMAs, its heap (`brk`), its touched pages and its history.
//! Each operation applies one syscall or fault with the kernel's semantics and returns its
//! [`Effect`]. No I/O here: callers resolve file names and segment sizes first.

use std::collections::BTreeMap;

use super::{
    ids::Ids,
    pages::{HugeBlock, PageCounts, Pages, ResidentRun, Touch, TouchKind},
    thp::{PMD_PAGES, ThpPolicy},
    timeline::{self, Cause, Change, Timeline},
    vma::{Backing, PAGE_SHIFT, Perms, ThpAdvice, Vma, page_align_down, page_align_up},
};

/// `madvise` advice values that release pages.
pub const MADV_DONTNEED: u64 = 4;
pub const MADV_FREE: u64 = 8;
pub const MADV_REMOVE: u64 = 9;
pub const MADV_DONTNEED_LOCKED: u64 = 24;
/// `madvise` advice values that set or clear a VMA's huge-page flag (and split it).
pub const MADV_HUGEPAGE: u64 = 14;
pub const MADV_DONTFORK: u64 = 10;
pub const MADV_DOFORK: u64 = 11;
pub const MADV_WIPEONFORK: u64 = 18;
pub const MADV_KEEPONFORK: u64 = 19;
pub const MADV_NOHUGEPAGE: u64 = 15;
/// `mremap` flags.
pub const MREMAP_MAYMOVE: u64 = 1;
pub const MREMAP_FIXED: u64 = 2;
pub const MREMAP_DONTUNMAP: u64 = 4;

/// What an operation did to the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EffectKind {
    /// The call failed (or changed nothing).
    #[default]
    None,
    /// A new VMA in a free range.
    Created,
    /// A new VMA over existing ones (`MAP_FIXED`).
    Replaced,
    Unmapped,
    Grown,
    Shrunk,
    Moved,
    Protected,
    /// Pages released (`madvise`), the map unchanged.
    Released,
    /// Anonymous pages freed lazily (`MADV_FREE`): resident until the kernel reclaims them.
    LazilyFreed,
    /// `mlock`, `mlock2`, `mlockall`: the range (or everything) locked in memory.
    Locked,
    /// `munlock`, `munlockall`.
    Unlocked,
    /// Advice recorded, nothing released.
    Advised,
}

impl EffectKind {
    /// The name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Created => "created",
            Self::Replaced => "replaced",
            Self::Unmapped => "unmapped",
            Self::Grown => "grown",
            Self::Shrunk => "shrunk",
            Self::Moved => "moved",
            Self::Protected => "protected",
            Self::Released => "released",
            Self::Advised => "advised",
            Self::LazilyFreed => "lazily_freed",
            Self::Locked => "locked",
            Self::Unlocked => "unlocked",
        }
    }
}

/// The effect of one operation on the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Effect {
    pub kind: EffectKind,
    /// The range the operation produced or acted on.
    pub start: u64,
    pub end: u64,
    /// For moves: where the range came from.
    pub from: Option<u64>,
    /// Bytes of existing VMAs removed (munmap, MAP_FIXED, shrink).
    pub unmapped_bytes: u64,
    /// Touched pages released.
    pub released_pages: u64,
    /// VMAs the operation split.
    pub splits: u32,
    /// Pages the kernel made resident without a fault (populate, lock).
    pub populated_pages: u64,
}

impl Effect {
    fn new(kind: EffectKind, start: u64, end: u64) -> Self {
        Self {
            kind,
            start,
            end,
            ..Self::default()
        }
    }
}

/// What a page fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEffect {
    pub touch: Touch,
    /// Pages this fault made resident: 1 for a small page, the block for a huge page, 0 when
    /// nothing was first touched.
    pub pages: u64,
    /// Start of the VMA that took the fault (after any stack growth).
    pub vma_start: Option<u64>,
    /// The stack grew down to this address.
    pub stack_grown_to: Option<u64>,
}

/// The heap's bounds: `start_brk` and the current (unaligned) program break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Brk {
    pub start: u64,
    pub current: u64,
}

/// The model of one address space.
#[derive(Clone, Debug, Default)]
pub struct AddressSpace {
    vmas: BTreeMap<u64, Vma>,
    pages: Pages,
    brk: Option<Brk>,
    timeline: Timeline,
    /// Highest heap end seen (bytes past `start_brk`).
    pub heap_high_water: u64,
    /// Faults on addresses no VMA covers (the model has drifted, or the process will crash).
    pub faults_outside: u64,
    /// Which faults get transparent huge pages.
    thp: ThpPolicy,
    /// `mlockall(MCL_FUTURE)` is in force: the kernel makes every later mapping resident.
    pub lock_future: bool,
    /// Huge pages the kernel did not give after all (it fell back to small pages).
    pub thp_fallbacks: u64,
    /// Which mapping each address belongs to (see [`super::ids`]).
    ids: Ids,
}

impl AddressSpace {
    /// An address space seeded from its VMAs (usually `/proc/PID/maps`) and its heap start
    /// (`start_brk` from `/proc/PID/stat`).
    pub fn seeded(vmas: impl IntoIterator<Item = Vma>, start_brk: Option<u64>, ts: u64) -> Self {
        let mut s = Self::default();
        s.seed(vmas, start_brk, ts);
        s
    }

    /// Replaces everything with a new seed (also used after exec): the old map is unmapped in
    /// the history, pages and heap are forgotten.
    pub fn seed(&mut self, vmas: impl IntoIterator<Item = Vma>, start_brk: Option<u64>, ts: u64) {
        self.clear(ts, Cause::Exec);
        let mut heap_end = None;
        for v in vmas {
            if v.backing == Backing::Heap {
                heap_end = Some(heap_end.map_or(v.end, |e: u64| e.max(v.end)));
            }
            let (start, end) = (v.start, v.end);
            self.place(ts, Cause::Seed, v);
            let id = self.ids.fresh();
            self.ids.set(start, end, id, ts);
        }
        self.brk = start_brk.map(|start| Brk {
            start,
            current: heap_end.unwrap_or(start).max(start),
        });
        self.heap_high_water = self.heap_size();
    }

    /// Which mapping each address belongs to.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// Sets the transparent huge page policy (the kernel's settings for this process).
    pub fn set_thp(&mut self, policy: ThpPolicy) {
        self.thp = policy;
    }

    /// The transparent huge page policy.
    pub fn thp(&self) -> &ThpPolicy {
        &self.thp
    }

    /// Marks pages found resident when tracing began as touched before tracing (first-touch
    /// time 0). Only the parts of the runs inside VMAs count.
    pub fn seed_resident(&mut self, runs: &[ResidentRun]) {
        for r in runs {
            for (_, start, end) in self.overlaps(r.start, r.end) {
                self.pages
                    .seed_resident(start >> PAGE_SHIFT, end >> PAGE_SHIFT, r.kind);
            }
        }
    }

    /// The parts of `[start, end)` inside VMAs: (VMA start, start, end), last first.
    fn overlaps(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        self.vmas
            .range(..end)
            .rev()
            .map(|(_, v)| (v.start, v.start.max(start), v.end.min(end)))
            .take_while(|(_, s, e)| s < e)
            .collect()
    }

    /// Pages the kernel made resident without a fault (`MAP_POPULATE`, `MAP_LOCKED`,
    /// `MADV_POPULATE_*`, `mlock`), as `/proc/PID/pagemap` showed them right after the call:
    /// each untouched page is a first touch now (a zero or page-cache page that became
    /// anonymous, an upgrade). Returns how many pages became resident or anonymous.
    pub fn populate(&mut self, ts: u64, runs: &[ResidentRun]) -> u64 {
        let mut n = 0;
        for r in runs {
            for (vma_start, start, end) in self.overlaps(r.start, r.end) {
                let (first, last) = (start >> PAGE_SHIFT, end >> PAGE_SHIFT);
                let rest = if r.kind == TouchKind::Zero {
                    let (mapped, rest) = self.pages.map_zero_blocks(first, last, ts);
                    n += mapped;
                    rest
                } else {
                    vec![(first, last)]
                };
                for page in rest.into_iter().flat_map(|(a, b)| a..b) {
                    match self.pages.touch(page, ts, r.kind) {
                        Touch::Again => continue,
                        Touch::First {
                            kind: TouchKind::Anon,
                            ..
                        }
                        | Touch::Upgraded { .. } => self.mark_anon_vma(ts, vma_start),
                        Touch::First { .. } => {}
                    }
                    n += 1;
                }
            }
        }
        n
    }

    /// The 2 MiB blocks (their addresses) that the kernel may collapse into huge pages
    /// without a fault: aligned and whole inside a private anonymous VMA, holding a small
    /// anonymous page (khugepaged needs one; `MADV_COLLAPSE` too), in `[start, end)`.
    /// khugepaged works where huge pages are enabled; `MADV_COLLAPSE` (`advised`) wherever
    /// they are not refused (`MADV_NOHUGEPAGE`), whatever the system setting.
    pub fn collapsible(&self, start: u64, end: u64, advised: bool) -> Vec<u64> {
        let mut out = Vec::new();
        for v in self.vmas.values() {
            let (s, e) = (v.start.max(start), v.end.min(end));
            let enabled = if advised {
                v.thp != ThpAdvice::NoHuge
            } else {
                self.thp.size_mask(v.thp) & PMD_PAGES != 0
            };
            if s >= e
                || v.perms.shared
                || !matches!(v.backing, Backing::Anonymous | Backing::Heap)
                || !enabled
            {
                continue;
            }
            out.extend(
                self.pages
                    .collapsible_blocks(s >> PAGE_SHIFT, e >> PAGE_SHIFT, PMD_PAGES)
                    .into_iter()
                    .map(|p| p << PAGE_SHIFT),
            );
        }
        out
    }

    /// The kernel made the 2 MiB block at `addr` one anonymous huge page (khugepaged or
    /// `MADV_COLLAPSE`, seen in pagemap): its pages are resident and anonymous now. Returns
    /// how many pages became resident or anonymous (0 when the block is no longer wholly
    /// inside a VMA).
    pub fn collapse(&mut self, ts: u64, addr: u64) -> u64 {
        let start = addr & !((PMD_PAGES << PAGE_SHIFT) - 1);
        let end = start + (PMD_PAGES << PAGE_SHIFT);
        let Some(vma_start) = self.find(start).filter(|v| v.end >= end).map(|v| v.start) else {
            return 0;
        };
        let n = self.pages.collapse(start >> PAGE_SHIFT, PMD_PAGES, ts);
        self.mark_anon_vma(ts, vma_start);
        n
    }

    /// The VMA at `vma_start` has private anonymous pages now: recorded once, in the history
    /// too.
    fn mark_anon_vma(&mut self, ts: u64, vma_start: u64) {
        let Some(v) = self.vmas.get(&vma_start).filter(|v| !v.anon_vma) else {
            return;
        };
        let v = Vma {
            anon_vma: true,
            ..v.clone()
        };
        self.timeline.push(
            ts,
            Cause::Fault,
            Change::Unmapped {
                start: v.start,
                end: v.end,
            },
        );
        self.timeline
            .push(ts, Cause::Fault, Change::Mapped(v.clone()));
        self.vmas.insert(v.start, v);
    }

    /// Forgets the whole map (exec, or the start of a seed).
    pub fn clear(&mut self, ts: u64, cause: Cause) {
        let bounds = self
            .vmas
            .values()
            .next()
            .map(|v| v.start)
            .zip(self.vmas.values().next_back().map(|v| v.end));
        if let Some((start, end)) = bounds {
            self.unmap_range(ts, cause, start, end);
        }
        self.pages = Pages::default();
        self.brk = None;
        self.heap_high_water = 0;
    }

    /// The VMAs in address order.
    pub fn vmas(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// Number of VMAs.
    pub fn vma_count(&self) -> usize {
        self.vmas.len()
    }

    /// The VMA containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.end > addr)
    }

    /// Touched-page counts in `[start, end)`.
    pub fn pages_in(&self, start: u64, end: u64) -> PageCounts {
        self.pages
            .count(start >> PAGE_SHIFT, page_align_up(end) >> PAGE_SHIFT)
    }

    /// The addresses of the resident pages in `[start, end)`, in order.
    pub fn resident_pages(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        self.pages
            .resident_pages(start >> PAGE_SHIFT, page_align_up(end) >> PAGE_SHIFT)
            .map(|p| p << PAGE_SHIFT)
    }

    /// The page map (for whole-space counters such as refaults).
    pub fn pages(&self) -> &Pages {
        &self.pages
    }

    /// The heap bounds, when known.
    pub fn heap(&self) -> Option<Brk> {
        self.brk
    }

    /// The path column `/proc/PID/maps` shows for `v`. The kernel names by position: a
    /// private anonymous VMA that overlaps the heap `[start_brk, brk)` is `[heap]` whatever
    /// made it (musl's malloc maps guard pages there).
    pub fn maps_path(&self, v: &Vma) -> Option<String> {
        if v.backing == Backing::Anonymous
            && !v.perms.shared
            && self
                .brk
                .is_some_and(|b| v.start < page_align_up(b.current) && v.end > b.start)
        {
            return Some("[heap]".to_string());
        }
        v.backing.path(v.perms.shared)
    }

    /// Current heap size in bytes (page aligned, as the heap VMA).
    pub fn heap_size(&self) -> u64 {
        self.brk
            .map_or(0, |b| page_align_up(b.current).saturating_sub(b.start))
    }

    /// The history of this address space.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The child's address space after `fork`, by the kernel's copy rules: a VMA advised
    /// `MADV_DONTFORK` is left out, one advised `MADV_WIPEONFORK` is there but empty, and
    /// page tables are copied only for VMAs with an `anon_vma` (private anonymous pages): the
    /// child touches the pages of the others (shared mappings, file mappings never written)
    /// anew. The history starts at the fork.
    pub fn fork(&self, ts: u64) -> Self {
        let mut child = Self {
            pages: self.pages.clone(),
            thp: self.thp.clone(),
            brk: self.brk,
            heap_high_water: self.heap_high_water,
            ids: self.ids.clone(),
            ..Self::default()
        };
        for v in self.vmas.values() {
            let (first, last) = (v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT);
            if v.fork.dont_copy || v.fork.wipe || !v.anon_vma {
                child.pages.forget(first, last);
            }
            if v.fork.dont_copy {
                child.ids.remove(v.start, v.end);
                continue;
            }
            let mut v = v.clone();
            // Wiped, the child's range has no anonymous pages yet.
            v.anon_vma &= !v.fork.wipe;
            child.place(ts, Cause::Fork, v);
        }
        child
    }

    /// `mmap` that returned `addr`: a new VMA of `len` bytes, replacing whatever was there
    /// (`MAP_FIXED`).
    pub fn mmap(
        &mut self,
        ts: u64,
        addr: u64,
        len: u64,
        perms: Perms,
        backing: Backing,
        offset: u64,
    ) -> Effect {
        let end = addr.saturating_add(page_align_up(len));
        let mut e = self.unmap_range(ts, Cause::Mmap, addr, end);
        e.kind = if e.unmapped_bytes > 0 {
            EffectKind::Replaced
        } else {
            EffectKind::Created
        };
        e.start = addr;
        e.end = end;
        self.place(
            ts,
            Cause::Mmap,
            Vma {
                start: addr,
                end,
                perms,
                offset,
                backing,
                created_ns: ts,
                thp: ThpAdvice::Default,
                fork: Default::default(),
                anon_vma: false,
            },
        );
        let id = self.ids.fresh();
        self.ids.set(addr, end, id, ts);
        e
    }

    /// `munmap(addr, len)` that succeeded.
    pub fn munmap(&mut self, ts: u64, addr: u64, len: u64) -> Effect {
        let end = addr.saturating_add(page_align_up(len));
        let mut e = self.unmap_range(ts, Cause::Munmap, addr, end);
        e.kind = if e.unmapped_bytes > 0 {
            EffectKind::Unmapped
        } else {
            EffectKind::None
        };
        e
    }

    /// `brk` that returned `new_brk`. The first call teaches the model the heap start when it
    /// was not seeded; a failed grow returns the old break and changes nothing.
    pub fn brk(&mut self, ts: u64, new_brk: u64) -> Effect {
        let Some(old) = self.brk else {
            self.brk = Some(Brk {
                start: new_brk,
                current: new_brk,
            });
            return Effect::new(EffectKind::None, new_brk, new_brk);
        };
        let start = old.start;
        let new_brk = new_brk.max(start);
        let old_end = page_align_up(old.current);
        let new_end = page_align_up(new_brk);
        self.brk = Some(Brk {
            start,
            current: new_brk,
        });
        if new_end > old_end {
            let perms = self
                .find(old_end.saturating_sub(1))
                .filter(|v| v.backing == Backing::Heap)
                .map_or(Perms::from_prot(3, false), |v| v.perms);
            let mut e = self.unmap_range(ts, Cause::Brk, old_end, new_end);
            self.place(
                ts,
                Cause::Brk,
                Vma {
                    start: old_end,
                    end: new_end,
                    perms,
                    offset: 0,
                    backing: Backing::Heap,
                    created_ns: ts,
                    thp: ThpAdvice::Default,
                    fork: Default::default(),
                    anon_vma: false,
                },
            );
            // The heap's mapping grows (a new one when there was no heap yet).
            let id = match self.ids.at(old_end.saturating_sub(1)) {
                Some(id) if old_end > start => id,
                _ => self.ids.fresh(),
            };
            self.ids.set(old_end, new_end, id, ts);
            self.heap_high_water = self.heap_high_water.max(new_end - start);
            e.kind = EffectKind::Grown;
            e.start = start;
            e.end = new_end;
            e
        } else if new_end < old_end {
            let mut e = self.unmap_range(ts, Cause::Brk, new_end, old_end);
            e.kind = EffectKind::Shrunk;
            e.start = start;
            e.end = new_end;
            e
        } else {
            Effect::new(EffectKind::None, start, new_end)
        }
    }

    /// `mremap(old, old_len, new_len, flags, ..)` that returned `new_addr`.
    pub fn mremap(
        &mut self,
        ts: u64,
        old: u64,
        old_len: u64,
        new_len: u64,
        flags: u64,
        new_addr: u64,
    ) -> Effect {
        let old_len = page_align_up(old_len);
        let new_len = page_align_up(new_len);
        let old_end = old.saturating_add(old_len);
        if new_addr == old {
            if new_len < old_len {
                let mut e = self.unmap_range(ts, Cause::Mremap, old + new_len, old_end);
                e.kind = EffectKind::Shrunk;
                e.start = old;
                e.end = old + new_len;
                return e;
            }
            if new_len > old_len {
                let Some(template) = self.find(old_end.saturating_sub(1)).cloned() else {
                    return Effect::default();
                };
                let grown = Vma {
                    start: old_end,
                    end: old + new_len,
                    offset: template.offset + (old_end - template.start),
                    created_ns: ts,
                    ..template
                };
                self.place(ts, Cause::Mremap, grown);
                let id = self.ids.at(old_end - 1).unwrap_or_else(|| self.ids.fresh());
                self.ids.set(old_end, old + new_len, id, ts);
                return Effect::new(EffectKind::Grown, old, old + new_len);
            }
            return Effect::new(EffectKind::None, old, old_end);
        }
        // Moved.
        let new_end = new_addr.saturating_add(new_len);
        let mut e = self.unmap_range(ts, Cause::Mremap, new_addr, new_end);
        let pieces: Vec<Vma> = if old_len == 0 {
            // Duplicate of a shared mapping: the old one stays.
            self.find(old)
                .map(|v| v.slice(old, v.end))
                .into_iter()
                .collect()
        } else {
            let pieces = timeline::carve(&mut self.vmas, old, old_end);
            self.timeline.push(
                ts,
                Cause::Mremap,
                Change::Unmapped {
                    start: old,
                    end: old_end,
                },
            );
            pieces
        };
        let keep = old_len.min(new_len);
        if old_len > 0 {
            // The mapping's ids go with its pages; what is beyond the new length is gone.
            self.ids.remove(old + keep, old_end);
            self.ids.relocate(old, keep, new_addr);
            // Pages beyond the new length are released; the rest move.
            e.released_pages +=
                self.pages
                    .release((old + keep) >> PAGE_SHIFT, old_end >> PAGE_SHIFT, ts, false);
            self.pages.relocate(
                old >> PAGE_SHIFT,
                (old + keep) >> PAGE_SHIFT,
                new_addr >> PAGE_SHIFT,
            );
        }
        let mut last = None;
        for p in &pieces {
            let start = new_addr + (p.start - old);
            let end = (new_addr + (p.end - old)).min(new_end);
            if start >= end {
                continue;
            }
            let moved = Vma {
                start,
                end,
                ..p.clone()
            };
            last = Some(moved.clone());
            self.place(ts, Cause::Mremap, moved);
        }
        if old_len == 0 {
            // A second mapping of the same pages.
            let id = self.ids.fresh();
            self.ids.set(new_addr, new_end, id, ts);
        }
        if let Some(last) = last
            && last.end < new_end
        {
            let tail = Vma {
                start: last.end,
                end: new_end,
                offset: last.offset + last.len(),
                created_ns: ts,
                ..last
            };
            let id = self
                .ids
                .at(last.end - 1)
                .unwrap_or_else(|| self.ids.fresh());
            self.ids.set(last.end, new_end, id, ts);
            self.place(ts, Cause::Mremap, tail);
        }
        if flags & MREMAP_DONTUNMAP != 0 && old_len > 0 {
            // The old range stays mapped, emptied of its pages: a new mapping.
            let id = self.ids.fresh();
            for p in pieces {
                self.ids.set(p.start, p.end, id, ts);
                self.place(ts, Cause::Mremap, p);
            }
        }
        e.kind = EffectKind::Moved;
        e.start = new_addr;
        e.end = new_end;
        e.from = Some(old);
        e
    }

    /// `mprotect(addr, len, prot)` (or `pkey_mprotect`) that succeeded.
    pub fn mprotect(&mut self, ts: u64, addr: u64, len: u64, prot: u64) -> Effect {
        let end = addr.saturating_add(page_align_up(len));
        let Some(splits) = self.reflag(ts, Cause::Mprotect, addr, end, |v| {
            v.perms = Perms::from_prot(prot, v.perms.shared);
        }) else {
            return Effect::default();
        };
        let mut e = Effect::new(EffectKind::Protected, addr, end);
        e.splits = splits;
        e
    }

    /// Changes the VMAs in `[start, end)` with `change`, splitting those that cross its ends
    /// and merging what became compatible (the VMA split logic of `mprotect` and `madvise`).
    /// Returns how many VMA boundaries the range cut, or None when nothing is mapped there.
    fn reflag(
        &mut self,
        ts: u64,
        cause: Cause,
        start: u64,
        end: u64,
        change: impl Fn(&mut Vma),
    ) -> Option<u32> {
        let splits = self.boundary_splits(start, end);
        let pieces = timeline::carve(&mut self.vmas, start, end);
        if pieces.is_empty() {
            return None;
        }
        self.timeline
            .push(ts, cause, Change::Unmapped { start, end });
        for mut p in pieces {
            change(&mut p);
            self.place(ts, cause, p);
        }
        Some(splits)
    }

    /// `madvise(addr, len, advice)` that succeeded. Releasing advices drop the touched pages.
    pub fn madvise(&mut self, ts: u64, addr: u64, len: u64, advice: u64) -> Effect {
        let end = addr.saturating_add(page_align_up(len));
        match advice {
            MADV_FREE => {
                self.pages
                    .free_lazily(addr >> PAGE_SHIFT, end >> PAGE_SHIFT);
                Effect::new(EffectKind::LazilyFreed, addr, end)
            }
            MADV_DONTFORK | MADV_DOFORK | MADV_WIPEONFORK | MADV_KEEPONFORK => {
                let mut e = Effect::new(EffectKind::Advised, addr, end);
                e.splits = self
                    .reflag(ts, Cause::Madvise, addr, end, |v| match advice {
                        MADV_DONTFORK => v.fork.dont_copy = true,
                        MADV_DOFORK => v.fork.dont_copy = false,
                        MADV_WIPEONFORK => v.fork.wipe = true,
                        _ => v.fork.wipe = false,
                    })
                    .unwrap_or(0);
                e
            }
            MADV_DONTNEED | MADV_REMOVE | MADV_DONTNEED_LOCKED => {
                let mut e = Effect::new(EffectKind::Released, addr, end);
                e.released_pages =
                    self.pages
                        .release(addr >> PAGE_SHIFT, end >> PAGE_SHIFT, ts, true);
                e
            }
            MADV_HUGEPAGE | MADV_NOHUGEPAGE => {
                let thp = if advice == MADV_HUGEPAGE {
                    ThpAdvice::Huge
                } else {
                    ThpAdvice::NoHuge
                };
                let mut e = Effect::new(EffectKind::Advised, addr, end);
                e.splits = self
                    .reflag(ts, Cause::Madvise, addr, end, |v| v.thp = thp)
                    .unwrap_or(0);
                e
            }
            _ => Effect::new(EffectKind::Advised, addr, end),
        }
    }

    /// `mlock`, `mlock2` (`locked`) or `munlock` of `[addr, addr + len)`. What becomes resident
    /// comes from pagemap (see [`AddressSpace::populate`]); the kernel's split of locked VMAs
    /// is not modelled (`/proc/PID/maps` shows the pieces with the same permissions).
    pub fn lock(&mut self, addr: u64, len: u64, locked: bool) -> Effect {
        let end = addr.saturating_add(page_align_up(len));
        let kind = if locked {
            EffectKind::Locked
        } else {
            EffectKind::Unlocked
        };
        Effect::new(kind, addr, end)
    }

    /// `mlockall(flags)` (or `munlockall`, `None`): `MCL_FUTURE` makes later mappings
    /// resident.
    pub fn lock_all(&mut self, flags: Option<u64>) -> Effect {
        const MCL_FUTURE: u64 = 2;
        self.lock_future = flags.is_some_and(|f| f & MCL_FUTURE != 0);
        let (start, end) = (
            self.vmas.values().next().map_or(0, |v| v.start),
            self.vmas.values().next_back().map_or(0, |v| v.end),
        );
        let kind = if flags.is_some() {
            EffectKind::Locked
        } else {
            EffectKind::Unlocked
        };
        Effect::new(kind, start, end)
    }

    /// `shmat` that attached segment `shmid` of `size` bytes (System V key `key`) at `addr`.
    #[allow(clippy::too_many_arguments)]
    pub fn shmat(
        &mut self,
        ts: u64,
        addr: u64,
        size: u64,
        key: u64,
        shmid: u64,
        read_only: bool,
        exec: bool,
    ) -> Effect {
        let end = addr.saturating_add(page_align_up(size));
        let mut e = self.unmap_range(ts, Cause::Shmat, addr, end);
        let perms = Perms {
            read: true,
            write: !read_only,
            exec,
            shared: true,
        };
        self.place(
            ts,
            Cause::Shmat,
            Vma {
                start: addr,
                end,
                perms,
                offset: 0,
                backing: Backing::Shm { key, shmid },
                created_ns: ts,
                thp: ThpAdvice::Default,
                fork: Default::default(),
                anon_vma: false,
            },
        );
        let id = self.ids.fresh();
        self.ids.set(addr, end, id, ts);
        e.kind = EffectKind::Created;
        e.start = addr;
        e.end = end;
        e
    }

    /// `shmdt(addr)` that succeeded: the VMAs of the segment attached at `addr` go (every
    /// piece of that attach, as the kernel finds them: same segment, `start - offset ==
    /// addr`), and nothing else, not another attach beside it.
    pub fn shmdt(&mut self, ts: u64, addr: u64) -> Effect {
        let Some(first) = self
            .find(addr)
            .filter(|v| v.start == addr && v.offset == 0)
            .cloned()
        else {
            return Effect::default();
        };
        let Backing::Shm { shmid, .. } = first.backing else {
            return Effect::default();
        };
        let pieces: Vec<(u64, u64)> = self
            .vmas
            .range(addr..)
            .map(|(_, v)| v)
            .filter(|v| {
                matches!(v.backing, Backing::Shm { shmid: s, .. } if s == shmid)
                    && v.start - v.offset == addr
            })
            .map(|v| (v.start, v.end))
            .collect();
        let mut e = Effect::new(EffectKind::Unmapped, addr, first.end);
        for (start, end) in pieces {
            let piece = self.unmap_range(ts, Cause::Shmdt, start, end);
            e.unmapped_bytes += piece.unmapped_bytes;
            e.released_pages += piece.released_pages;
            e.end = end;
        }
        e
    }

    /// Whether a fault at `addr` whose backend cannot tell if the page was present (the
    /// perf-event backend) hit a mapped page: a write (as the mapped page showed) to a page
    /// the model has read-only mapped, the zero page or a page-cache page of a private
    /// mapping, is a copy on write of that present page. Anything else is taken as a fault on
    /// a page not mapped.
    pub fn likely_present(&self, addr: u64, write: Option<bool>) -> bool {
        write == Some(true)
            && matches!(
                self.pages.get(addr >> PAGE_SHIFT),
                Some((_, TouchKind::Zero | TouchKind::File))
            )
            && self.find(addr).is_some_and(|v| !v.perms.shared)
    }

    /// A user page fault at `addr`. `write` is None when the backend cannot tell.
    pub fn fault(&mut self, ts: u64, addr: u64, write: Option<bool>, present: bool) -> FaultEffect {
        // A fault inside a huge zero page kept whole acts on its pages one by one.
        self.pages
            .expand_zero(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + 1);
        let mut stack_grown_to = None;
        if self.find(addr).is_none() {
            let stack = self
                .vmas
                .range(addr..)
                .next()
                .map(|(_, v)| v)
                .filter(|v| v.backing == Backing::Stack)
                .cloned();
            match stack {
                Some(stack) => {
                    let start = page_align_down(addr);
                    let id = self.ids.at(stack.start).unwrap_or_else(|| self.ids.fresh());
                    self.ids.set(start, stack.start, id, ts);
                    self.place(
                        ts,
                        Cause::StackGrowth,
                        Vma {
                            start,
                            end: stack.start,
                            created_ns: ts,
                            ..stack
                        },
                    );
                    stack_grown_to = Some(start);
                }
                None => {
                    self.faults_outside += 1;
                    return FaultEffect {
                        touch: Touch::Again,
                        pages: 0,
                        vma_start: None,
                        stack_grown_to: None,
                    };
                }
            }
        }
        let Some(vma) = self.find(addr) else {
            return FaultEffect {
                touch: Touch::Again,
                pages: 0,
                vma_start: None,
                stack_grown_to,
            };
        };
        let vma_start = Some(vma.start);
        // The kernel's data pages for the vDSO (`[vvar]`, `[vvar_vclock]`) are mapped by pfn:
        // never the process's memory (smaps shows Rss 0).
        if matches!(&vma.backing, Backing::Special(name) if name.starts_with("[vvar")) {
            return FaultEffect {
                touch: Touch::Again,
                pages: 0,
                vma_start,
                stack_grown_to,
            };
        }
        let kind = classify(vma, write, present);
        let page = addr >> PAGE_SHIFT;
        let block = self.huge_block(vma, page, kind);
        if !present
            && let Some(block) = self.pages.huge_block_of(page)
            && block.origin != page
        {
            // A page of a block taken as a huge page faults in: the kernel fell back to small
            // pages for it.
            self.pages.revert_block(block);
            self.thp_fallbacks += 1;
        }
        let written_zero = self.written_zero_block(page, kind);
        let (touch, pages) = match (block, written_zero) {
            (_, Some(zero)) => (self.pages.fill_zero_block(zero), zero.pages),
            (Some(block), None) => (self.pages.touch_block(block, ts, kind), block.pages),
            (None, None) => {
                let touch = self.pages.touch(page, ts, kind);
                (touch, u64::from(matches!(touch, Touch::First { .. })))
            }
        };
        // A private anonymous page gives the VMA an anon_vma (fork then copies it).
        if matches!(
            touch,
            Touch::First {
                kind: TouchKind::Anon,
                ..
            } | Touch::Upgraded { .. }
        ) && let Some(start) = vma_start
        {
            self.mark_anon_vma(ts, start);
        }
        FaultEffect {
            touch,
            pages,
            vma_start,
            stack_grown_to,
        }
    }

    /// The huge zero page that a write (`kind` anonymous) to `page` replaces with a huge page,
    /// on kernels that do so ([`ThpPolicy::zero_write_huge`]).
    fn written_zero_block(&self, page: u64, kind: TouchKind) -> Option<HugeBlock> {
        if kind != TouchKind::Anon || !self.thp.zero_write_huge {
            return None;
        }
        let block = self.pages.huge_block_of(page)?;
        let zero = matches!(self.pages.get(page), Some((_, TouchKind::Zero)));
        (zero && block.pages == PMD_PAGES).then_some(block)
    }

    /// The transparent huge page a first touch of `page` (in `vma`) as `kind` gets, if any
    /// (see [`super::thp`] for the rules).
    fn huge_block(&self, vma: &Vma, page: u64, kind: TouchKind) -> Option<HugeBlock> {
        let eligible = !vma.perms.shared
            && matches!(vma.backing, Backing::Anonymous | Backing::Heap)
            && kind != TouchKind::File;
        let mut sizes = if eligible {
            self.thp.size_mask(vma.thp)
        } else {
            0
        };
        if sizes == 0 || self.pages.get(page).is_some() {
            return None;
        }
        let (first, last) = (vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT);
        // Largest first. A read maps the huge zero page (2 MiB only) or the small zero page.
        while sizes != 0 {
            let n = 1u64 << (63 - sizes.leading_zeros());
            sizes &= !n;
            if kind != TouchKind::Anon && !(n == PMD_PAGES && self.thp.huge_zero_page) {
                continue;
            }
            let start = page & !(n - 1);
            if start >= first && start + n <= last && !self.pages.any_touched(start, start + n) {
                return Some(HugeBlock {
                    start,
                    pages: n,
                    origin: page,
                });
            }
        }
        None
    }

    /// Removes `[start, end)` from the map, releasing its pages; the effect counts what went.
    fn unmap_range(&mut self, ts: u64, cause: Cause, start: u64, end: u64) -> Effect {
        let splits = self.boundary_splits(start, end);
        let removed = timeline::carve(&mut self.vmas, start, end);
        let mut e = Effect::new(EffectKind::None, start, end);
        if removed.is_empty() {
            return e;
        }
        self.ids.remove(start, end);
        self.timeline
            .push(ts, cause, Change::Unmapped { start, end });
        e.unmapped_bytes = removed.iter().map(Vma::len).sum();
        e.released_pages = self
            .pages
            .release(start >> PAGE_SHIFT, end >> PAGE_SHIFT, ts, false);
        e.splits = splits;
        e
    }

    /// How many VMAs `[start, end)` cuts in two (0, 1 or 2; 1 when one VMA covers both ends
    /// and is cut into three).
    fn boundary_splits(&self, start: u64, end: u64) -> u32 {
        let cuts = |a: u64| self.find(a).is_some_and(|v| v.start < a);
        u32::from(cuts(start)) + u32::from(cuts(end))
    }

    /// Places a VMA into a free range (merging) and records it.
    fn place(&mut self, ts: u64, cause: Cause, vma: Vma) {
        if vma.is_empty() {
            return;
        }
        self.timeline.push(ts, cause, Change::Mapped(vma.clone()));
        timeline::insert_merging(&mut self.vmas, vma);
    }
}

/// Which kind of page a fault gives, from the VMA and the access (see [`TouchKind`]).
pub fn classify(vma: &Vma, write: Option<bool>, present: bool) -> TouchKind {
    let private_anon = !vma.perms.shared && vma.backing.is_anonymous();
    match (vma.perms.shared, write) {
        (true, _) => TouchKind::File,
        (false, Some(true)) => TouchKind::Anon,
        // A read of private anonymous memory maps the zero page; unknown access (perf-event
        // backend) is taken as a write there, since almost every first touch of fresh
        // anonymous memory in practice is a write.
        (false, None) if private_anon => TouchKind::Anon,
        (false, _) if private_anon && !present => TouchKind::Zero,
        (false, _) if private_anon => TouchKind::Anon,
        (false, _) => TouchKind::File,
    }
}
