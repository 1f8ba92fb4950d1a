//! Property tests: the model against a page-by-page reference model on random sequences of
//! mmap (fixed or not), munmap, mprotect, mremap (shrink, grow in place, move, fixed,
//! dontunmap), madvise (release, lazy free, fork advice), brk, faults and fork (the model
//! then follows the child).

use std::{collections::BTreeMap, sync::Arc};

use proptest::prelude::*;

use super::{
    AddressSpace, Backing, PAGE_SIZE, Perms, TouchKind,
    address_space::{
        MADV_DOFORK, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE, MADV_KEEPONFORK, MADV_WIPEONFORK,
        MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE,
    },
    vma::{ForkAdvice, Vma},
};

const BASE: u64 = 0x1000_0000;
const PAGES: u64 = 96;
const HEAP: u64 = BASE + PAGES * PAGE_SIZE + 16 * PAGE_SIZE;

/// What the reference knows of one page.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RefPage {
    perms: Perms,
    /// Backing identity: kind name plus, for files, the file offset of this page.
    backing: Backing,
    file_offset: Option<u64>,
    touched: Option<TouchKind>,
    /// First touched after a release of the same address.
    refaulted: bool,
    /// Freed lazily (`MADV_FREE`), not touched since.
    lazyfree: bool,
    fork: ForkAdvice,
    /// The page's VMA got private anonymous memory here (its share of the anon_vma; the
    /// whole VMA has one when any of its pages has).
    anon_vma: bool,
    /// The mapping the page belongs to (the reference's own numbering: the model's ids must
    /// group the pages the same way).
    mapping: u64,
}

impl RefPage {
    fn new(perms: Perms, backing: Backing, file_offset: Option<u64>) -> Self {
        Self {
            perms,
            backing,
            file_offset,
            touched: None,
            refaulted: false,
            lazyfree: false,
            fork: ForkAdvice::default(),
            anon_vma: false,
            mapping: 0,
        }
    }

    /// Whether the page at `a` continues this one (at `a - PAGE_SIZE`) in one VMA.
    fn continued_by(&self, next: &RefPage) -> bool {
        self.perms == next.perms
            && self.backing == next.backing
            && self.fork == next.fork
            && match (self.file_offset, next.file_offset) {
                (Some(a), Some(b)) => a + PAGE_SIZE == b,
                (None, None) => true,
                _ => false,
            }
    }
}

#[derive(Default, Debug)]
struct Reference {
    pages: BTreeMap<u64, RefPage>,
    brk: Option<(u64, u64)>,
    /// Addresses whose touched page was released (unmapped or advised away), not touched since.
    released: std::collections::BTreeSet<u64>,
    refaults: u64,
    /// The last mapping number given.
    mappings: u64,
}

impl Reference {
    /// Unmaps `[start, end)`, releasing its touched pages.
    fn unmap(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self.pages.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            if self.pages.remove(&k).is_some_and(|p| p.touched.is_some()) {
                self.released.insert(k);
            }
        }
    }

    /// Releases the touched page at `a` (madvise), keeping it mapped.
    fn release(&mut self, a: u64) {
        if let Some(p) = self.pages.get_mut(&a)
            && p.touched.take().is_some()
        {
            p.refaulted = false;
            p.lazyfree = false;
            self.released.insert(a);
        }
    }

    /// Removes `[start, end)` without releasing (the pages moved elsewhere).
    fn forget(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self.pages.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            self.pages.remove(&k);
        }
    }

    fn map(&mut self, start: u64, len: u64, perms: Perms, backing: Backing, offset: u64) {
        self.unmap(start, start + len);
        self.mappings += 1;
        for i in 0..len / PAGE_SIZE {
            let file = matches!(backing, Backing::File { .. });
            let mut p = RefPage::new(
                perms,
                backing.clone(),
                file.then_some(offset + i * PAGE_SIZE),
            );
            p.mapping = self.mappings;
            self.pages.insert(start + i * PAGE_SIZE, p);
        }
    }

    fn free(&self, start: u64, len: u64) -> bool {
        self.pages.range(start..start + len).next().is_none()
    }

    /// Whether every page of `[start, end)` is mapped and passes `f`.
    fn all(&self, start: u64, end: u64, f: impl Fn(&RefPage) -> bool) -> bool {
        (start..end)
            .step_by(PAGE_SIZE as usize)
            .all(|a| self.pages.get(&a).is_some_and(&f))
    }

    /// Spreads the anon_vma flag over each VMA (maximal run of pages that continue one
    /// another): the kernel shares one anon_vma in a VMA, keeps it in the pieces of a split,
    /// and a merged VMA has one when either part had.
    fn settle(&mut self) {
        let addrs: Vec<u64> = self.pages.keys().copied().collect();
        let mut i = 0;
        while i < addrs.len() {
            let mut j = i + 1;
            while j < addrs.len()
                && addrs[j] == addrs[j - 1] + PAGE_SIZE
                && self.pages[&addrs[j - 1]].continued_by(&self.pages[&addrs[j]])
            {
                j += 1;
            }
            if addrs[i..j].iter().any(|a| self.pages[a].anon_vma) {
                for a in &addrs[i..j] {
                    if let Some(p) = self.pages.get_mut(a) {
                        p.anon_vma = true;
                    }
                }
            }
            i = j;
        }
    }

    /// The child after `fork`, by the kernel's rules: `dontfork` pages are not there, `wipe`
    /// pages are there untouched, and the touched state is copied only from VMAs (maximal
    /// runs of pages that continue one another) where some page has an anon_vma.
    fn fork(&self) -> Reference {
        let mut child = Reference {
            brk: self.brk,
            refaults: self.refaults,
            mappings: self.mappings,
            // Released addresses no longer mapped stay known (for refaults) in the child.
            released: self
                .released
                .iter()
                .filter(|a| !self.pages.contains_key(a))
                .copied()
                .collect(),
            ..Reference::default()
        };
        let mut run: Vec<(u64, &RefPage)> = Vec::new();
        let flush = |run: &mut Vec<(u64, &RefPage)>, child: &mut Reference| {
            let copied = run.iter().any(|(_, p)| p.anon_vma);
            for (a, p) in run.drain(..) {
                if p.fork.dont_copy {
                    continue;
                }
                let mut c = p.clone();
                if p.fork.wipe || !copied {
                    c.touched = None;
                    c.refaulted = false;
                    c.lazyfree = false;
                    c.anon_vma = false;
                } else if self.released.contains(&a) {
                    child.released.insert(a);
                }
                if !p.fork.wipe && copied {
                    c.anon_vma = true;
                }
                child.pages.insert(a, c);
            }
        };
        for (&a, p) in &self.pages {
            let continues = run
                .last()
                .is_some_and(|(la, lp)| la + PAGE_SIZE == a && lp.continued_by(p));
            if !continues {
                flush(&mut run, &mut child);
            }
            run.push((a, p));
        }
        flush(&mut run, &mut child);
        child
    }
}

#[derive(Clone, Debug)]
enum Op {
    Mmap {
        page: u64,
        pages: u64,
        prot: u64,
        file: bool,
    },
    Munmap {
        page: u64,
        pages: u64,
    },
    Mprotect {
        page: u64,
        pages: u64,
        prot: u64,
    },
    Madvise {
        page: u64,
        pages: u64,
        advice: u64,
    },
    Fork,
    Touch {
        page: u64,
        pages: u64,
        write: bool,
    },
    MremapShrink {
        page: u64,
        by: u64,
    },
    MremapGrow {
        page: u64,
        by: u64,
    },
    MremapMove {
        page: u64,
        to: u64,
        fixed: bool,
        dontunmap: bool,
    },
    Brk {
        pages: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    let pages = 1..12u64;
    prop_oneof![
        2 => (page.clone(), pages.clone(), 0..8u64, any::<bool>())
            .prop_map(|(page, pages, prot, file)| Op::Mmap { page, pages, prot, file }),
        1 => (page.clone(), pages.clone()).prop_map(|(page, pages)| Op::Munmap { page, pages }),
        1 => (page.clone(), pages.clone(), 0..8u64)
            .prop_map(|(page, pages, prot)| Op::Mprotect { page, pages, prot }),
        2 => (page.clone(), pages.clone(), prop::sample::select(vec![
            MADV_DONTNEED, MADV_FREE, MADV_DONTFORK, MADV_DOFORK, MADV_WIPEONFORK,
            MADV_KEEPONFORK,
        ]))
            .prop_map(|(page, pages, advice)| Op::Madvise { page, pages, advice }),
        1 => Just(Op::Fork),
        3 => (page.clone(), pages.clone(), any::<bool>())
            .prop_map(|(page, pages, write)| Op::Touch { page, pages, write }),
        1 => (page.clone(), 1..4u64).prop_map(|(page, by)| Op::MremapShrink { page, by }),
        1 => (page.clone(), 1..4u64).prop_map(|(page, by)| Op::MremapGrow { page, by }),
        2 => (page.clone(), page, any::<bool>(), any::<bool>())
            .prop_map(|(page, to, fixed, dontunmap)| Op::MremapMove { page, to, fixed, dontunmap }),
        1 => (0..24u64).prop_map(|pages| Op::Brk { pages }),
    ]
}

fn addr(page: u64) -> u64 {
    BASE + page * PAGE_SIZE
}

/// The VMA of the model containing `a`, whose attributes must match the reference page.
fn check(model: &AddressSpace, reference: &Reference) -> Result<(), TestCaseError> {
    let model_pages: u64 = model.vmas().map(|v| v.len() / PAGE_SIZE).sum();
    prop_assert_eq!(
        model_pages,
        reference.pages.len() as u64,
        "mapped page count"
    );
    for (&a, p) in &reference.pages {
        let v = model.find(a);
        prop_assert!(v.is_some(), "page {:#x} mapped in reference only", a);
        let v: &Vma = v.expect("checked");
        prop_assert_eq!(v.perms, p.perms, "perms at {:#x}", a);
        prop_assert_eq!(&v.backing, &p.backing, "backing at {:#x}", a);
        if let Some(off) = p.file_offset {
            prop_assert_eq!(v.offset + (a - v.start), off, "file offset at {:#x}", a);
        }
        let c = model.pages_in(a, a + PAGE_SIZE);
        let kind = match (c.zero, c.anon, c.file) {
            (1, 0, 0) => Some(TouchKind::Zero),
            (0, 1, 0) => Some(TouchKind::Anon),
            (0, 0, 1) => Some(TouchKind::File),
            _ => None,
        };
        prop_assert_eq!(kind, p.touched, "touched state at {:#x}", a);
        prop_assert_eq!(c.refaulted, u64::from(p.refaulted), "refaulted at {:#x}", a);
        prop_assert_eq!(
            c.lazyfree,
            u64::from(p.lazyfree),
            "lazily freed at {:#x}",
            a
        );
        prop_assert_eq!(v.fork, p.fork, "fork advice at {:#x}", a);
        prop_assert_eq!(v.anon_vma, p.anon_vma, "anon_vma at {:#x}", a);
    }
    prop_assert_eq!(model.pages().refaults, reference.refaults, "refaults");
    // No VMA is empty or overlaps its neighbour; neighbours that could merge are merged.
    let vmas: Vec<&Vma> = model.vmas().collect();
    for w in vmas.windows(2) {
        prop_assert!(w[0].end <= w[1].start, "overlap");
        prop_assert!(
            !super::timeline::mergeable(w[0], w[1]),
            "unmerged neighbours"
        );
    }
    // Mapping ids: every mapped page has one, nothing else has, and they group the pages as
    // the reference's mappings do (one id per mapping, one mapping per id).
    let ids = model.ids().ranges_in(0, u64::MAX);
    prop_assert_eq!(
        ids.iter().map(|(s, e, _)| e - s).sum::<u64>(),
        model_pages * PAGE_SIZE,
        "bytes with an id"
    );
    let mut to_model = BTreeMap::new();
    let mut to_ref = BTreeMap::new();
    for (&a, p) in &reference.pages {
        let id = model.ids().at(a);
        prop_assert!(id.is_some(), "page {:#x} has no mapping id", a);
        let id = id.expect("checked");
        prop_assert_eq!(
            *to_model.entry(p.mapping).or_insert(id),
            id,
            "id at {:#x}",
            a
        );
        prop_assert_eq!(
            *to_ref.entry(id).or_insert(p.mapping),
            p.mapping,
            "mapping at {:#x}",
            a
        );
    }
    // The history replays to the present.
    let replayed: Vec<Vma> = model.timeline().state_at(u64::MAX).into_values().collect();
    let now: Vec<Vma> = model.vmas().cloned().collect();
    prop_assert_eq!(replayed, now, "timeline replay");
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let file = Backing::File {
        path: Arc::from("/data/file"),
        inode: 7,
    };
    let mut m = AddressSpace::seeded(Vec::new(), Some(HEAP), 0);
    let mut r = Reference {
        brk: Some((HEAP, HEAP)),
        ..Reference::default()
    };
    for (i, op) in ops.iter().enumerate() {
        let ts = i as u64 + 1;
        match *op {
            Op::Mmap {
                page,
                pages,
                prot,
                file: is_file,
            } => {
                let perms = Perms::from_prot(prot, false);
                let (backing, off) = if is_file {
                    (file.clone(), page * PAGE_SIZE)
                } else {
                    (Backing::Anonymous, 0)
                };
                m.mmap(
                    ts,
                    addr(page),
                    pages * PAGE_SIZE,
                    perms,
                    backing.clone(),
                    off,
                );
                r.map(addr(page), pages * PAGE_SIZE, perms, backing, off);
            }
            Op::Munmap { page, pages } => {
                m.munmap(ts, addr(page), pages * PAGE_SIZE);
                r.unmap(addr(page), addr(page + pages));
            }
            Op::Mprotect { page, pages, prot } => {
                // The kernel fails on a hole; only fully mapped ranges succeed.
                if (page..page + pages).all(|p| r.pages.contains_key(&addr(p))) {
                    m.mprotect(ts, addr(page), pages * PAGE_SIZE, prot);
                    for p in page..page + pages {
                        if let Some(rp) = r.pages.get_mut(&addr(p)) {
                            rp.perms = Perms::from_prot(prot, rp.perms.shared);
                        }
                    }
                }
            }
            Op::Madvise {
                page,
                pages,
                advice,
            } => {
                let (start, end) = (addr(page), addr(page + pages));
                let anon = |p: &RefPage| !p.perms.shared && p.backing.is_anonymous();
                match advice {
                    MADV_DONTNEED => {
                        m.madvise(ts, start, end - start, advice);
                        for p in page..page + pages {
                            r.release(addr(p));
                        }
                    }
                    // EINVAL unless every page is private anonymous memory.
                    MADV_FREE if r.all(start, end, anon) => {
                        m.madvise(ts, start, end - start, advice);
                        for (_, p) in r.pages.range_mut(start..end) {
                            p.lazyfree |= p.touched == Some(TouchKind::Anon);
                        }
                    }
                    MADV_WIPEONFORK | MADV_KEEPONFORK if r.all(start, end, anon) => {
                        m.madvise(ts, start, end - start, advice);
                        for (_, p) in r.pages.range_mut(start..end) {
                            p.fork.wipe = advice == MADV_WIPEONFORK;
                        }
                    }
                    MADV_DONTFORK | MADV_DOFORK if r.all(start, end, |_| true) => {
                        m.madvise(ts, start, end - start, advice);
                        for (_, p) in r.pages.range_mut(start..end) {
                            p.fork.dont_copy = advice == MADV_DONTFORK;
                        }
                    }
                    _ => {}
                }
            }
            Op::Fork => {
                m = m.fork(ts);
                r = r.fork();
            }
            Op::Touch { page, pages, write } => {
                for a in (addr(page)..addr(page + pages)).step_by(PAGE_SIZE as usize) {
                    m.fault(ts, a, Some(write), false);
                    let Some(rp) = r.pages.get_mut(&a) else {
                        continue;
                    };
                    if rp.touched.is_none() && r.released.remove(&a) {
                        r.refaults += 1;
                        rp.refaulted = true;
                    }
                    // A lazily freed page faults only once reclaimed: a new page.
                    if rp.lazyfree {
                        rp.lazyfree = false;
                        rp.touched = None;
                        r.refaults += 1;
                        rp.refaulted = true;
                    }
                    {
                        let kind = if rp.perms.shared {
                            TouchKind::File
                        } else if write {
                            TouchKind::Anon
                        } else if rp.backing == Backing::Anonymous {
                            TouchKind::Zero
                        } else {
                            TouchKind::File
                        };
                        rp.touched = match (rp.touched, kind) {
                            (None, k) => Some(k),
                            (Some(_), TouchKind::Anon) => Some(TouchKind::Anon),
                            (old, _) => old,
                        };
                        rp.anon_vma |= rp.touched == Some(TouchKind::Anon);
                    }
                }
            }
            Op::MremapShrink { page, by } | Op::MremapGrow { page, by } => {
                // The range must lie in one VMA, as the kernel requires.
                let Some(v) = m.find(addr(page)).cloned() else {
                    continue;
                };
                let old_len = v.end - addr(page);
                let grow = matches!(op, Op::MremapGrow { .. });
                if grow {
                    let new_len = old_len + by * PAGE_SIZE;
                    if !r.free(v.end, by * PAGE_SIZE) || v.end + by * PAGE_SIZE > addr(PAGES + 12) {
                        continue;
                    }
                    m.mremap(ts, addr(page), old_len, new_len, 0, addr(page));
                    let template = r.pages[&(v.end - PAGE_SIZE)].clone();
                    for i in 0..by {
                        let a = v.end + i * PAGE_SIZE;
                        let mut p = template.clone();
                        p.file_offset = p.file_offset.map(|o| o + (i + 1) * PAGE_SIZE);
                        p.touched = None;
                        p.refaulted = false;
                        p.lazyfree = false;
                        r.pages.insert(a, p);
                    }
                } else {
                    if old_len <= by * PAGE_SIZE {
                        continue;
                    }
                    let new_len = old_len - by * PAGE_SIZE;
                    m.mremap(ts, addr(page), old_len, new_len, 0, addr(page));
                    r.unmap(addr(page) + new_len, v.end);
                }
            }
            Op::MremapMove {
                page,
                to,
                fixed,
                dontunmap,
            } => {
                let Some(v) = m.find(addr(page)).cloned() else {
                    continue;
                };
                let len = v.end - addr(page);
                let dest = addr(to);
                let overlaps = dest < v.end && addr(page) < dest + len;
                if overlaps || (!fixed && !r.free(dest, len)) {
                    continue;
                }
                // MREMAP_DONTUNMAP needs private anonymous memory of the same size.
                let dontunmap = dontunmap && v.backing == Backing::Anonymous;
                let flags = MREMAP_MAYMOVE
                    | if fixed { MREMAP_FIXED } else { 0 }
                    | if dontunmap { MREMAP_DONTUNMAP } else { 0 };
                m.mremap(ts, addr(page), len, len, flags, dest);
                let moved: Vec<(u64, RefPage)> = r
                    .pages
                    .range(addr(page)..v.end)
                    .map(|(a, p)| (*a, p.clone()))
                    .collect();
                r.unmap(dest, dest + len);
                if dontunmap {
                    // The old range stays, emptied: a new mapping.
                    r.mappings += 1;
                    for (a, _) in &moved {
                        if let Some(p) = r.pages.get_mut(a) {
                            p.touched = None;
                            p.refaulted = false;
                            p.lazyfree = false;
                            p.mapping = r.mappings;
                        }
                    }
                } else {
                    r.forget(addr(page), v.end);
                }
                for (a, p) in moved {
                    r.pages.insert(a - addr(page) + dest, p);
                }
            }
            Op::Brk { pages } => {
                let Some((start, cur)) = r.brk else { continue };
                let new = start + pages * PAGE_SIZE;
                let old_end = cur.next_multiple_of(PAGE_SIZE);
                if new > old_end && !r.free(old_end, new - old_end) {
                    continue;
                }
                m.brk(ts, new);
                if new > old_end {
                    let perms = Perms::from_prot(3, false);
                    // The heap's mapping grows; there is a new one when there was no heap.
                    let mapping = match r.pages.get(&(old_end - PAGE_SIZE)) {
                        Some(p) if old_end > start => p.mapping,
                        _ => {
                            r.mappings += 1;
                            r.mappings
                        }
                    };
                    for a in (old_end..new).step_by(PAGE_SIZE as usize) {
                        let mut p = RefPage::new(perms, Backing::Heap, None);
                        p.mapping = mapping;
                        r.pages.insert(a, p);
                    }
                } else {
                    r.unmap(new, old_end);
                }
                r.brk = Some((start, new));
            }
        }
        r.settle();
        check(&m, &r).map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn model_matches_page_by_page_reference(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

#[test]
fn history_answers_for_past_moments() {
    let mut m = AddressSpace::seeded(Vec::new(), None, 0);
    let rw = Perms::from_prot(3, false);
    m.mmap(10, BASE, 8 * PAGE_SIZE, rw, Backing::Anonymous, 0);
    m.munmap(20, BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE);
    m.mprotect(30, BASE, PAGE_SIZE, 1);
    let at = |t| {
        m.timeline()
            .state_at(t)
            .values()
            .map(|v| (v.start, v.end, v.perms.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(at(5), vec![]);
    assert_eq!(
        at(10),
        vec![(BASE, BASE + 8 * PAGE_SIZE, "rw-p".to_string())]
    );
    assert_eq!(at(20).len(), 2);
    assert_eq!(at(30)[0], (BASE, BASE + PAGE_SIZE, "r--p".to_string()));
}

#[test]
fn stack_grows_down_on_faults_below_it() {
    let stack = Vma {
        start: BASE + 64 * PAGE_SIZE,
        end: BASE + 80 * PAGE_SIZE,
        perms: Perms::from_prot(3, false),
        offset: 0,
        backing: Backing::Stack,
        created_ns: 0,
        thp: Default::default(),
        fork: Default::default(),
        anon_vma: false,
    };
    let mut m = AddressSpace::seeded(vec![stack], None, 0);
    let e = m.fault(5, BASE + 60 * PAGE_SIZE + 8, Some(true), false);
    assert_eq!(e.stack_grown_to, Some(BASE + 60 * PAGE_SIZE));
    assert_eq!(m.vma_count(), 1);
    assert_eq!(
        m.find(BASE + 60 * PAGE_SIZE).map(|v| v.start),
        Some(BASE + 60 * PAGE_SIZE)
    );
}

#[test]
fn brk_learns_the_heap_start_and_tracks_high_water() {
    let mut m = AddressSpace::default();
    assert_eq!(m.brk(1, HEAP).kind, super::EffectKind::None);
    assert_eq!(
        m.brk(2, HEAP + 10 * PAGE_SIZE + 5).kind,
        super::EffectKind::Grown
    );
    assert_eq!(m.heap_size(), 11 * PAGE_SIZE);
    assert_eq!(m.brk(3, HEAP + PAGE_SIZE).kind, super::EffectKind::Shrunk);
    assert_eq!(m.heap_size(), PAGE_SIZE);
    assert_eq!(m.heap_high_water, 11 * PAGE_SIZE);
}
