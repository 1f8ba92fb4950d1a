//! Which pages of an address space were touched, when, and how (lazy allocation).
//!
//! Each touched page costs one `u64 -> u64` entry in a B-tree: the first-touch time in the low
//! 60 bits, a refault flag, a huge-page flag and the [`TouchKind`] in the top 2. A page
//! released by `munmap` or `madvise(MADV_DONTNEED)` keeps its entry, marked released with the
//! time of the release, up to a bound, so that a later touch of it is a refault: a fault costs
//! one B-tree look-up whether the page is new, released or touched. Pages made resident
//! together by one fault on a transparent huge page are a block, remembered until part of it
//! goes.

use std::collections::{BTreeMap, btree_map::Entry};

/// How a page was first backed by memory. The rules (see `docs/architecture.md`):
/// - a read or exec fault on private anonymous memory maps the shared zero page: `Zero`;
/// - a write fault on private memory allocates a private anonymous page: `Anon`
///   (for a private file mapping this is the copy on write of the file page);
/// - any fault on a file or shared mapping maps a page-cache or shmem page: `File`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TouchKind {
    Zero = 0,
    Anon = 1,
    File = 2,
}

impl TouchKind {
    /// The name used in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero_page",
            Self::Anon => "anon",
            Self::File => "page_cache",
        }
    }

    /// Parses [`TouchKind::name`].
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Zero, Self::Anon, Self::File]
            .into_iter()
            .find(|k| k.name() == name)
    }

    fn from_bits(b: u64) -> Self {
        match b {
            0 => Self::Zero,
            1 => Self::Anon,
            _ => Self::File,
        }
    }
}

crate::by_name::serde_by_name!(TouchKind, "page kind");

const KIND_SHIFT: u32 = 62;
/// The kind bits of a released page's entry (no [`TouchKind`] has this value).
const RELEASED: u64 = 3;
/// The page was touched again after a release.
const REFAULTED: u64 = 1 << 60;
/// In a released page's entry: released by `madvise` (rather than an unmap).
const ADVISED: u64 = REFAULTED;
/// The page is part of a transparent huge page.
const HUGE: u64 = 1 << 61;
/// An anonymous page freed lazily (`MADV_FREE`): still resident until the kernel reclaims it,
/// which only a later fault on it shows (a rewrite takes no fault and keeps it).
const LAZYFREE: u64 = 1 << 59;
/// A refault this soon after the release counts as churn.
pub const QUICK_REFAULT_NS: u64 = 1_000_000_000;
const TS_MASK: u64 = LAZYFREE - 1;
/// At most this many released pages are remembered for refault detection.
const RELEASED_CAP: u64 = 1 << 18;

/// What a touch did to the page map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touch {
    /// The page had not been touched: this is its lazy allocation.
    First { kind: TouchKind, refault: bool },
    /// A zero or page-cache page became private anonymous memory (copy on write).
    Upgraded { from: TouchKind },
    /// Nothing new (a repeated fault, or a protection fault that changes nothing).
    Again,
}

/// Touched-page counts over a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCounts {
    pub zero: u64,
    pub anon: u64,
    pub file: u64,
    /// Of the resident pages, those in transparent huge pages.
    pub huge: u64,
    /// Of the touched pages, those touched again after a release.
    pub refaulted: u64,
    /// Of the anonymous pages, those freed lazily (`MADV_FREE`) and not seen reclaimed.
    pub lazyfree: u64,
    /// Earliest first touch in the range.
    pub first_touch_ns: Option<u64>,
}

impl PageCounts {
    /// Pages that are resident (the zero page is not counted: it is not the process's memory).
    pub fn resident(&self) -> u64 {
        self.anon + self.file
    }

    /// All touched pages, the zero page included.
    pub fn touched(&self) -> u64 {
        self.zero + self.anon + self.file
    }
}

/// Pages `[start, end)` (addresses) found resident when tracing began, and their kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentRun {
    pub start: u64,
    pub end: u64,
    pub kind: TouchKind,
}

/// Pages made resident by one fault on a transparent huge page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugeBlock {
    pub start: u64,
    pub pages: u64,
    /// The page whose fault allocated the block.
    pub origin: u64,
}

/// The touched pages of one address space, by page number (`address >> 12`).
#[derive(Clone, Debug, Default)]
pub struct Pages {
    /// Touched and released pages.
    entries: BTreeMap<u64, u64>,
    /// How many entries are released pages.
    released: u64,
    /// Huge-page blocks by first page.
    huge_blocks: BTreeMap<u64, HugeBlock>,
    /// Huge zero pages kept whole: a read of an untouched 2 MiB block maps one page-table
    /// entry, so the model keeps one entry (block, first-touch time), not 512, until
    /// something acts on a page inside ([`Pages::expand_zero`]). A process reading one byte
    /// per 2 MiB of a huge mapping costs what the kernel spends, not 512 times that.
    zero_blocks: BTreeMap<u64, (HugeBlock, u64)>,
    /// Pages touched again after they were released.
    pub refaults: u64,
    /// Pages touched again after `madvise` released them, and of those within
    /// [`QUICK_REFAULT_NS`] (purge churn).
    pub refaults_after_advice: u64,
    pub quick_refaults_after_advice: u64,
    /// Pages released by `munmap`, `madvise` or `brk` shrink while touched.
    pub released_total: u64,
    /// Lazily freed pages that faulted again: the kernel had reclaimed them.
    pub lazyfree_reclaimed: u64,
}

/// Whether an entry is a released page.
fn is_released(v: u64) -> bool {
    v >> KIND_SHIFT == RELEASED
}

impl Pages {
    /// Turns the whole huge zero pages that `[start_page, end_page)` meets into page entries
    /// (what every other operation works on).
    pub fn expand_zero(&mut self, start_page: u64, end_page: u64) {
        if self.zero_blocks.is_empty() || start_page >= end_page {
            return;
        }
        let met: Vec<u64> = self
            .zero_blocks
            .range(..end_page)
            .rev()
            .take_while(|(_, (b, _))| b.start + b.pages > start_page)
            .map(|(&k, _)| k)
            .collect();
        for k in met {
            if let Some((block, ts)) = self.zero_blocks.remove(&k) {
                for page in block.start..block.start + block.pages {
                    self.entries.insert(page, value(ts, TouchKind::Zero, HUGE));
                }
                self.huge_blocks.insert(block.start, block);
            }
        }
    }

    /// Takes out the huge zero pages lying wholly inside `[start_page, end_page)`, so that an
    /// operation on a large range costs one step per such page instead of 512.
    fn take_zero_within(&mut self, start_page: u64, end_page: u64) -> Vec<(HugeBlock, u64)> {
        let inside: Vec<u64> = self
            .zero_blocks
            .range(start_page..end_page)
            .filter(|(_, (b, _))| b.start + b.pages <= end_page)
            .map(|(&k, _)| k)
            .collect();
        inside
            .into_iter()
            .filter_map(|k| self.zero_blocks.remove(&k))
            .collect()
    }

    /// The whole huge zero pages in `[start_page, end_page)`: (overlapping pages, time).
    fn zero_overlaps(&self, start_page: u64, end_page: u64) -> impl Iterator<Item = (u64, u64)> {
        self.zero_blocks
            .range(..end_page)
            .rev()
            .take_while(move |(_, (b, _))| b.start + b.pages > start_page)
            .map(move |(_, (b, ts))| {
                let overlap = (b.start + b.pages).min(end_page) - b.start.max(start_page);
                (overlap, *ts)
            })
    }

    /// Records a touch of `page` at `ts` that backs it as `kind`.
    pub fn touch(&mut self, page: u64, ts: u64, kind: TouchKind) -> Touch {
        self.expand_zero(page, page + 1);
        let old = match self.entries.entry(page) {
            Entry::Vacant(e) => {
                e.insert(value(ts, kind, 0));
                return Touch::First {
                    kind,
                    refault: false,
                };
            }
            Entry::Occupied(mut e) => {
                let v = *e.get();
                if is_released(v) {
                    e.insert(value(ts, kind, REFAULTED));
                    self.refaulted(v, ts);
                    return Touch::First {
                        kind,
                        refault: true,
                    };
                }
                if v & LAZYFREE != 0 {
                    // A lazily freed page faults only once the kernel has reclaimed it: this
                    // is a new page.
                    e.insert(value(ts, kind, REFAULTED));
                    self.refaults += 1;
                    self.lazyfree_reclaimed += 1;
                    return Touch::First {
                        kind,
                        refault: true,
                    };
                }
                let old = TouchKind::from_bits(v >> KIND_SHIFT);
                if kind != TouchKind::Anon || old == TouchKind::Anon {
                    return Touch::Again;
                }
                e.insert((v & !(3 << KIND_SHIFT)) | ((TouchKind::Anon as u64) << KIND_SHIFT));
                old
            }
        };
        // Copy on write of one page of the huge zero page splits it into small pages.
        if let Some(b) = self.huge_block_of(page) {
            self.split_block(b);
        }
        Touch::Upgraded { from: old }
    }

    /// Records a fault on `block.origin` that made the whole block resident as one
    /// transparent huge page. The block's pages must all be untouched (released is fine).
    pub fn touch_block(&mut self, block: HugeBlock, ts: u64, kind: TouchKind) -> Touch {
        let end = block.start + block.pages;
        if kind == TouchKind::Zero && self.entries.range(block.start..end).next().is_none() {
            self.expand_zero(block.start, end);
            self.zero_blocks.insert(block.start, (block, ts));
            return Touch::First {
                kind,
                refault: false,
            };
        }
        self.expand_zero(block.start, end);
        let mut refault_origin = false;
        for page in block.start..block.start + block.pages {
            let old = self.entries.insert(page, value(ts, kind, HUGE));
            if let Some(old) = old.filter(|v| is_released(*v)) {
                self.refaulted(old, ts);
                if let Some(v) = self.entries.get_mut(&page) {
                    *v |= REFAULTED;
                }
                refault_origin |= page == block.origin;
            }
        }
        self.huge_blocks.insert(block.start, block);
        Touch::First {
            kind,
            refault: refault_origin,
        }
    }

    /// A write to a huge zero page that gets a huge page in its place: the block's pages
    /// become anonymous, keeping their first-touch times.
    pub fn fill_zero_block(&mut self, block: HugeBlock) -> Touch {
        self.expand_zero(block.start, block.start + block.pages);
        for (_, v) in self
            .entries
            .range_mut(block.start..block.start + block.pages)
        {
            if !is_released(*v) {
                *v = (*v & !(3 << KIND_SHIFT)) | ((TouchKind::Anon as u64) << KIND_SHIFT) | HUGE;
            }
        }
        Touch::Upgraded {
            from: TouchKind::Zero,
        }
    }

    /// The first pages of the whole, aligned blocks of `pages` pages in `[start_page,
    /// end_page)` that hold a small anonymous page: what khugepaged (or `MADV_COLLAPSE`) may
    /// turn into a huge page. Blocks already huge, or with only zero pages, are not.
    pub fn collapsible_blocks(&self, start_page: u64, end_page: u64, pages: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        let first = start_page.next_multiple_of(pages);
        if first >= end_page {
            return out;
        }
        for (&page, &v) in self.entries.range(first..end_page) {
            let block = page - page % pages;
            if block + pages > end_page {
                break;
            }
            if out.last() != Some(&block)
                && !is_released(v)
                && v & HUGE == 0
                && TouchKind::from_bits(v >> KIND_SHIFT) == TouchKind::Anon
            {
                out.push(block);
            }
        }
        out
    }

    /// The kernel made `[start, start + pages)` one anonymous huge page without a fault
    /// (khugepaged, `MADV_COLLAPSE`): every page of it is resident and anonymous now, those
    /// touched before keeping their first-touch times. Returns the pages that became
    /// resident or anonymous.
    pub fn collapse(&mut self, start: u64, pages: u64, ts: u64) -> u64 {
        let end = start + pages;
        self.expand_zero(start, end);
        self.split_blocks_in(start, end);
        let mut n = 0;
        for page in start..end {
            let old = self.entries.get(&page).copied();
            let v = match old {
                Some(v) if !is_released(v) => {
                    if TouchKind::from_bits(v >> KIND_SHIFT) != TouchKind::Anon {
                        n += 1;
                    }
                    (v & !(3 << KIND_SHIFT)) | ((TouchKind::Anon as u64) << KIND_SHIFT) | HUGE
                }
                released => {
                    if released.is_some() {
                        self.released -= 1;
                    }
                    n += 1;
                    value(ts, TouchKind::Anon, HUGE)
                }
            };
            self.entries.insert(page, v);
        }
        self.huge_blocks.insert(
            start,
            HugeBlock {
                start,
                pages,
                origin: start,
            },
        );
        n
    }

    /// Counts the refault of a page whose released entry was `released`.
    fn refaulted(&mut self, released: u64, ts: u64) {
        self.released -= 1;
        self.refaults += 1;
        if released & ADVISED != 0 {
            self.refaults_after_advice += 1;
            if ts.saturating_sub(released & TS_MASK) <= QUICK_REFAULT_NS {
                self.quick_refaults_after_advice += 1;
            }
        }
    }

    /// Whether any page of `[start_page, end_page)` is touched.
    pub fn any_touched(&self, start_page: u64, end_page: u64) -> bool {
        start_page < end_page
            && (self
                .entries
                .range(start_page..end_page)
                .any(|(_, v)| !is_released(*v))
                || self.zero_overlaps(start_page, end_page).next().is_some())
    }

    /// The huge-page block that holds `page`.
    pub fn huge_block_of(&self, page: u64) -> Option<HugeBlock> {
        if self.huge_blocks.is_empty() {
            return None;
        }
        self.huge_blocks
            .range(..=page)
            .next_back()
            .map(|(_, b)| *b)
            .filter(|b| page < b.start + b.pages)
    }

    /// The kernel did not back `block` with a huge page after all (it fell back to small
    /// pages): only its origin page stays touched. Returns the pages taken back.
    pub fn revert_block(&mut self, block: HugeBlock) -> u64 {
        self.expand_zero(block.start, block.start + block.pages);
        self.huge_blocks.remove(&block.start);
        let mut pages = self.take_entries(block.start, block.start + block.pages);
        let origin = pages.remove(&block.origin);
        if let Some(v) = origin {
            self.entries.insert(block.origin, v & !HUGE);
        }
        pages.len() as u64
    }

    /// A huge page became small pages: its pages stay, without the huge flag.
    fn split_block(&mut self, b: HugeBlock) {
        self.huge_blocks.remove(&b.start);
        for (_, v) in self.entries.range_mut(b.start..b.start + b.pages) {
            *v &= !HUGE;
        }
    }

    /// Splits the huge pages that `[start_page, end_page)` cuts or covers.
    fn split_blocks_in(&mut self, start_page: u64, end_page: u64) {
        if self.huge_blocks.is_empty() || start_page >= end_page {
            return;
        }
        let cut: Vec<HugeBlock> = self
            .huge_blocks
            .range(..end_page)
            .rev()
            .map(|(_, b)| *b)
            .take_while(|b| b.start + b.pages > start_page)
            .collect();
        for b in cut {
            self.split_block(b);
        }
    }

    /// Maps the zero page over each whole aligned 2 MiB block of `[start_page, end_page)` that
    /// has no page known, as one entry at `ts` (for pages pagemap shows: the huge zero page, or
    /// 512 small ones, which count the same). Returns how many pages that mapped and the
    /// ranges left for the caller to take page by page.
    pub fn map_zero_blocks(
        &mut self,
        start_page: u64,
        end_page: u64,
        ts: u64,
    ) -> (u64, Vec<(u64, u64)>) {
        use super::thp::PMD_PAGES;
        let (mut mapped, mut rest) = (0, Vec::new());
        let mut add_rest = |from: u64, to: u64| match rest.last_mut() {
            Some((_, end)) if *end == from => *end = to,
            _ if from < to => rest.push((from, to)),
            _ => {}
        };
        let mut page = start_page;
        let mut block = start_page.next_multiple_of(PMD_PAGES);
        while block + PMD_PAGES <= end_page {
            add_rest(page, block);
            let end = block + PMD_PAGES;
            let empty = self.entries.range(block..end).next().is_none()
                && self.zero_overlaps(block, end).next().is_none();
            if empty {
                let b = HugeBlock {
                    start: block,
                    pages: PMD_PAGES,
                    origin: block,
                };
                self.zero_blocks.insert(block, (b, ts));
                mapped += PMD_PAGES;
            } else {
                add_rest(block, end);
            }
            page = end;
            block = end;
        }
        add_rest(page, end_page);
        (mapped, rest)
    }

    /// Marks the pages `[start_page, end_page)` as touched as `kind` before tracing began
    /// (first-touch time 0).
    pub fn seed_resident(&mut self, start_page: u64, end_page: u64, kind: TouchKind) {
        if kind == TouchKind::Zero {
            let (_, rest) = self.map_zero_blocks(start_page, end_page, 0);
            for (start, end) in rest {
                self.seed_pages(start, end, kind);
            }
        } else {
            self.seed_pages(start_page, end_page, kind);
        }
    }

    fn seed_pages(&mut self, start_page: u64, end_page: u64, kind: TouchKind) {
        self.expand_zero(start_page, end_page);
        for page in start_page..end_page {
            let v = self.entries.entry(page).or_insert(value(0, kind, 0));
            if is_released(*v) {
                *v = value(0, kind, 0);
                self.released -= 1;
            }
        }
    }

    /// Every touched page as runs of neighbours of one kind, in address order.
    pub fn runs(&self) -> Vec<ResidentRun> {
        use super::vma::{PAGE_SHIFT, PAGE_SIZE};
        let pages = self
            .entries
            .iter()
            .filter(|(_, v)| !is_released(**v))
            .map(|(&page, &v)| (page, 1, TouchKind::from_bits(v >> KIND_SHIFT)));
        let blocks = self
            .zero_blocks
            .values()
            .map(|(b, _)| (b.start, b.pages, TouchKind::Zero));
        let mut all: Vec<(u64, u64, TouchKind)> = pages.chain(blocks).collect();
        all.sort_unstable_by_key(|&(page, _, _)| page);
        let mut runs: Vec<ResidentRun> = Vec::new();
        for (page, n, kind) in all {
            let addr = page << PAGE_SHIFT;
            match runs.last_mut() {
                Some(r) if r.end == addr && r.kind == kind => r.end += n * PAGE_SIZE,
                _ => runs.push(ResidentRun {
                    start: addr,
                    end: addr + n * PAGE_SIZE,
                    kind,
                }),
            }
        }
        runs
    }

    /// Releases the touched pages in `[start_page, end_page)` at `ts` (`advised`: by
    /// `madvise`, else by an unmap); they stay known as released for refault detection while
    /// fewer than [`RELEASED_CAP`] are. Returns how many touched pages went.
    pub fn release(&mut self, start_page: u64, end_page: u64, ts: u64, advised: bool) -> u64 {
        if start_page >= end_page {
            return 0;
        }
        // Unmapped huge zero pages are counted but not kept as released: they cost no memory,
        // so touching them again is no refault worth reporting.
        let zero_gone: u64 = self
            .take_zero_within(start_page, end_page)
            .iter()
            .map(|(b, _)| b.pages)
            .sum();
        self.expand_zero(start_page, end_page);
        self.split_blocks_in(start_page, end_page);
        let mark = (ts & TS_MASK) | if advised { ADVISED } else { 0 } | (RELEASED << KIND_SHIFT);
        let (mut gone, mut forget) = (0, Vec::new());
        for (&page, v) in self.entries.range_mut(start_page..end_page) {
            if is_released(*v) {
                continue;
            }
            gone += 1;
            if self.released < RELEASED_CAP {
                *v = mark;
                self.released += 1;
            } else {
                forget.push(page);
            }
        }
        for page in forget {
            self.entries.remove(&page);
        }
        gone += zero_gone;
        self.released_total += gone;
        gone
    }

    /// Marks the anonymous pages of `[start_page, end_page)` freed lazily (`MADV_FREE`); returns
    /// how many. They stay resident (and counted) until a fault shows them reclaimed.
    pub fn free_lazily(&mut self, start_page: u64, end_page: u64) -> u64 {
        if start_page >= end_page {
            return 0;
        }
        // Only anonymous pages are freed lazily: huge zero pages stay as they are.
        let mut n = 0;
        for (_, v) in self.entries.range_mut(start_page..end_page) {
            if !is_released(*v) && TouchKind::from_bits(*v >> KIND_SHIFT) == TouchKind::Anon {
                *v |= LAZYFREE;
                n += 1;
            }
        }
        n
    }

    /// Forgets the pages of `[start_page, end_page)` without releasing them: what a forked
    /// child does not get (its page tables are not copied).
    pub fn forget(&mut self, start_page: u64, end_page: u64) {
        self.take_zero_within(start_page, end_page);
        self.expand_zero(start_page, end_page);
        self.split_blocks_in(start_page, end_page);
        self.take_entries(start_page, end_page);
    }

    /// Moves the touched pages of `[start_page, end_page)` to start at `to_page` (mremap). A
    /// huge page moved whole to an address aligned like it stays huge (the kernel moves the
    /// page-table entry); others are split into small pages. Released pages stay where they
    /// were released.
    pub fn relocate(&mut self, start_page: u64, end_page: u64, to_page: u64) {
        let zero = self.take_zero_within(start_page, end_page);
        self.expand_zero(start_page, end_page);
        self.expand_zero(to_page, to_page + (end_page - start_page));
        let blocks: Vec<HugeBlock> = self
            .huge_blocks
            .range(start_page..end_page)
            .map(|(_, b)| *b)
            .filter(|b| b.start + b.pages <= end_page)
            .collect();
        self.split_blocks_in(start_page, end_page);
        let moved = self.take_entries(start_page, end_page);
        for (page, v) in moved {
            if is_released(v) {
                self.entries.insert(page, v);
                self.released += 1;
            } else if let Some(old) = self.entries.insert(page - start_page + to_page, v)
                && is_released(old)
            {
                self.released -= 1;
            }
        }
        for b in blocks {
            let start = b.start - start_page + to_page;
            if start.is_multiple_of(b.pages) {
                for (_, v) in self.entries.range_mut(start..start + b.pages) {
                    *v |= HUGE;
                }
                self.huge_blocks.insert(
                    start,
                    HugeBlock {
                        start,
                        origin: b.origin - b.start + start,
                        ..b
                    },
                );
            }
        }
        for (b, ts) in zero {
            let start = b.start - start_page + to_page;
            let moved = HugeBlock {
                start,
                origin: b.origin - b.start + start,
                ..b
            };
            let free = self.entries.range(start..start + b.pages).next().is_none();
            if start.is_multiple_of(b.pages) && free {
                self.zero_blocks.insert(start, (moved, ts));
            } else {
                // Moved out of alignment the kernel splits the mapping into small zero pages.
                for page in start..start + b.pages {
                    self.entries.insert(page, value(ts, TouchKind::Zero, 0));
                }
            }
        }
    }

    /// Counts touched pages in `[start_page, end_page)`.
    pub fn count(&self, start_page: u64, end_page: u64) -> PageCounts {
        let mut c = PageCounts::default();
        if start_page >= end_page {
            return c;
        }
        for &v in self.entries.range(start_page..end_page).map(|(_, v)| v) {
            if is_released(v) {
                continue;
            }
            let kind = TouchKind::from_bits(v >> KIND_SHIFT);
            match kind {
                TouchKind::Zero => c.zero += 1,
                TouchKind::Anon => c.anon += 1,
                TouchKind::File => c.file += 1,
            }
            if v & HUGE != 0 && kind != TouchKind::Zero {
                c.huge += 1;
            }
            if v & REFAULTED != 0 {
                c.refaulted += 1;
            }
            if v & LAZYFREE != 0 {
                c.lazyfree += 1;
            }
            let ts = v & TS_MASK;
            c.first_touch_ns = Some(c.first_touch_ns.map_or(ts, |t: u64| t.min(ts)));
        }
        for (pages, ts) in self.zero_overlaps(start_page, end_page) {
            c.zero += pages;
            c.first_touch_ns = Some(c.first_touch_ns.map_or(ts, |t: u64| t.min(ts)));
        }
        c
    }

    /// The resident pages (anonymous or page cache, not the zero page) in
    /// `[start_page, end_page)`, in order.
    pub fn resident_pages(&self, start_page: u64, end_page: u64) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .range(start_page..end_page.max(start_page))
            .filter(|(_, v)| {
                !is_released(**v) && TouchKind::from_bits(**v >> KIND_SHIFT) != TouchKind::Zero
            })
            .map(|(p, _)| *p)
    }

    /// The state of one page: its first-touch time and kind.
    pub fn get(&self, page: u64) -> Option<(u64, TouchKind)> {
        self.entries
            .get(&page)
            .filter(|v| !is_released(**v))
            .map(|v| (v & TS_MASK, TouchKind::from_bits(v >> KIND_SHIFT)))
            .or_else(|| {
                self.zero_overlaps(page, page + 1)
                    .next()
                    .map(|(_, ts)| (ts, TouchKind::Zero))
            })
    }

    /// Number of touched pages in the whole address space.
    pub fn len(&self) -> usize {
        let zero: u64 = self.zero_blocks.values().map(|(b, _)| b.pages).sum();
        (self.entries.len() as u64 - self.released + zero) as usize
    }

    /// Page-map entries the model holds (its memory cost): touched and released pages, and
    /// one per huge zero page kept whole.
    pub fn entries(&self) -> usize {
        self.entries.len() + self.zero_blocks.len()
    }

    /// Whether no page is touched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns the entries of `[start_page, end_page)`, released ones included
    /// (and no longer counted).
    fn take_entries(&mut self, start_page: u64, end_page: u64) -> BTreeMap<u64, u64> {
        if start_page >= end_page {
            return BTreeMap::new();
        }
        let mut middle = self.entries.split_off(&start_page);
        let mut tail = middle.split_off(&end_page);
        self.entries.append(&mut tail);
        self.released -= middle.values().filter(|v| is_released(**v)).count() as u64;
        middle
    }
}

/// The stored value of a touched page.
fn value(ts: u64, kind: TouchKind, flags: u64) -> u64 {
    (ts & TS_MASK) | flags | ((kind as u64) << KIND_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_touch_then_upgrade_then_again() {
        let mut p = Pages::default();
        assert_eq!(
            p.touch(10, 5, TouchKind::Zero),
            Touch::First {
                kind: TouchKind::Zero,
                refault: false
            }
        );
        assert_eq!(
            p.touch(10, 6, TouchKind::Anon),
            Touch::Upgraded {
                from: TouchKind::Zero
            }
        );
        assert_eq!(p.touch(10, 7, TouchKind::Anon), Touch::Again);
        assert_eq!(p.get(10), Some((5, TouchKind::Anon)));
    }

    #[test]
    fn release_then_refault_counts() {
        let mut p = Pages::default();
        for page in 0..8 {
            p.touch(page, 1, TouchKind::Anon);
        }
        assert_eq!(p.release(2, 6, 2, true), 4);
        assert_eq!(p.count(0, 8).anon, 4);
        assert!(matches!(
            p.touch(3, 3, TouchKind::Anon),
            Touch::First { refault: true, .. }
        ));
        assert_eq!(p.refaults, 1);
        assert_eq!(p.quick_refaults_after_advice, 1);
    }

    #[test]
    fn relocate_moves_pages() {
        let mut p = Pages::default();
        p.touch(1, 1, TouchKind::Anon);
        p.touch(2, 1, TouchKind::File);
        p.touch(9, 1, TouchKind::Anon);
        p.relocate(0, 4, 100);
        assert_eq!(p.count(0, 4).touched(), 0);
        assert_eq!(p.count(100, 104).anon, 1);
        assert_eq!(p.count(100, 104).file, 1);
        assert_eq!(p.count(9, 10).anon, 1);
    }

    #[test]
    fn a_collapse_fills_the_block_with_anonymous_memory() {
        let mut p = Pages::default();
        // Block 0: one anonymous page, a zero page, a released page. Block 1: zero pages
        // only (nothing to collapse). Block 2: already huge.
        p.touch(3, 1, TouchKind::Anon);
        p.touch(7, 1, TouchKind::Zero);
        p.touch(9, 1, TouchKind::Anon);
        p.release(9, 10, 2, true);
        p.touch(512 + 4, 1, TouchKind::Zero);
        let huge = HugeBlock {
            start: 1024,
            pages: 512,
            origin: 1030,
        };
        p.touch_block(huge, 1, TouchKind::Anon);
        assert_eq!(p.collapsible_blocks(0, 1536, 512), vec![0]);
        assert_eq!(p.collapsible_blocks(1, 1536, 512), Vec::<u64>::new());
        // A range inside one block, starting past its start: none (and no panic).
        assert_eq!(p.collapsible_blocks(3, 100, 512), Vec::<u64>::new());
        // All but the one anonymous page became resident or anonymous.
        assert_eq!(p.collapse(0, 512, 5), 511);
        let c = p.count(0, 512);
        assert_eq!((c.anon, c.zero, c.huge), (512, 0, 512));
        assert_eq!(p.get(3), Some((1, TouchKind::Anon)), "first touch kept");
        assert_eq!(p.get(100), Some((5, TouchKind::Anon)));
        assert_eq!(p.huge_block_of(100).map(|b| b.start), Some(0));
        assert_eq!(p.collapsible_blocks(0, 1536, 512), Vec::<u64>::new());
        // Releasing part of it splits it, as the kernel does.
        p.release(0, 1, 6, true);
        assert_eq!(p.count(0, 512).huge, 0);
    }
}

/// Property: keeping a huge zero page as one entry changes no count. A page-by-page reference
/// (page -> kind) follows random faults, releases, lazy frees, forgets and moves.
#[cfg(test)]
mod zero_block_tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Pages per block in these tests (small, so that ranges cut blocks often).
    const BLOCK: u64 = 4;
    /// Pages in the source area; moves go to `DEST`.
    const AREA: u64 = 8 * BLOCK;
    const DEST: u64 = 64 * BLOCK;

    #[derive(Clone, Debug)]
    enum Op {
        /// A read fault in an empty block maps the huge zero page, else a small one.
        Read(u64),
        Write(u64),
        Release(u64, u64),
        LazyFree(u64, u64),
        Forget(u64, u64),
        /// Moves `[start, start + len)` to `DEST + shift`.
        Move(u64, u64, u64),
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..AREA, 1..AREA).prop_map(|(s, n)| (s, (s + n).min(AREA)))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..AREA).prop_map(Op::Read),
            2 => (0..AREA).prop_map(Op::Write),
            1 => range().prop_map(|(s, e)| Op::Release(s, e)),
            1 => range().prop_map(|(s, e)| Op::LazyFree(s, e)),
            1 => range().prop_map(|(s, e)| Op::Forget(s, e)),
            1 => (range(), 0..2 * BLOCK).prop_map(|((s, e), d)| Op::Move(s, e, d)),
        ]
    }

    /// The reference: each touched page's kind and whether it was freed lazily since.
    type Reference = BTreeMap<u64, (TouchKind, bool)>;

    fn counts(p: &Pages, r: &Reference, start: u64, end: u64) -> [u64; 2] {
        let c = p.count(start, end);
        let zero = r.range(start..end).filter(|(_, k)| k.0 == TouchKind::Zero);
        let anon = r.range(start..end).filter(|(_, k)| k.0 == TouchKind::Anon);
        assert_eq!([c.zero, c.anon], [zero.count() as u64, anon.count() as u64]);
        [c.zero, c.anon]
    }

    proptest! {
        #[test]
        fn counts_match_a_page_by_page_reference(ops in prop::collection::vec(op(), 1..40)) {
            let (mut p, mut r) = (Pages::default(), Reference::new());
            for (ts, op) in ops.into_iter().enumerate() {
                let ts = ts as u64 + 1;
                match op {
                    Op::Read(page) => {
                        let start = page - page % BLOCK;
                        if p.count(start, start + BLOCK).touched() == 0
                            && p.entries.range(start..start + BLOCK).next().is_none()
                        {
                            let block = HugeBlock { start, pages: BLOCK, origin: page };
                            p.touch_block(block, ts, TouchKind::Zero);
                            r.extend((start..start + BLOCK).map(|q| (q, (TouchKind::Zero, false))));
                        } else {
                            p.touch(page, ts, TouchKind::Zero);
                            // A fault on a lazily freed page means the kernel reclaimed it.
                            let e = r.entry(page).or_insert((TouchKind::Zero, false));
                            if e.1 {
                                *e = (TouchKind::Zero, false);
                            }
                        }
                    }
                    Op::Write(page) => {
                        p.touch(page, ts, TouchKind::Anon);
                        r.insert(page, (TouchKind::Anon, false));
                    }
                    Op::Release(s, e) => {
                        p.release(s, e, ts, true);
                        r.retain(|q, _| !(s..e).contains(q));
                    }
                    Op::LazyFree(s, e) => {
                        p.free_lazily(s, e);
                        for (_, k) in r.range_mut(s..e) {
                            k.1 |= k.0 == TouchKind::Anon;
                        }
                    }
                    Op::Forget(s, e) => {
                        p.forget(s, e);
                        r.retain(|q, _| !(s..e).contains(q));
                    }
                    Op::Move(s, e, d) => {
                        let to = DEST + d;
                        p.forget(to, to + (e - s));
                        r.retain(|q, _| !(to..to + (e - s)).contains(q));
                        p.relocate(s, e, to);
                        let moved: Vec<(u64, (TouchKind, bool))> =
                            r.range(s..e).map(|(q, k)| (*q, *k)).collect();
                        r.retain(|q, _| !(s..e).contains(q));
                        r.extend(moved.into_iter().map(|(q, k)| (q - s + to, k)));
                    }
                }
                counts(&p, &r, 0, DEST + AREA + 2 * BLOCK);
                for b in (0..AREA).step_by(BLOCK as usize) {
                    counts(&p, &r, b, b + BLOCK);
                }
            }
        }
    }
}
