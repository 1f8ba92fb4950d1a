//! Which pages of an address space were touched, when, and how (lazy allocation).
//!
//! Each touched page costs one `u64 -> u64` entry in a B-tree: the first-touch time in the low
//! 62 bits and the [`TouchKind`] in the top 2. Released pages (by `munmap` or
//! `madvise(MADV_DONTNEED)`) are remembered, up to a bound, so that a later touch of the same
//! page is counted as a refault.

use std::collections::BTreeMap;

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

    fn from_bits(b: u64) -> Self {
        match b {
            0 => Self::Zero,
            1 => Self::Anon,
            _ => Self::File,
        }
    }
}

const KIND_SHIFT: u32 = 62;
/// A refault this soon after the release counts as churn.
pub const QUICK_REFAULT_NS: u64 = 1_000_000_000;
/// Marks a release by `madvise` (rather than an unmap) in the released map's value.
const ADVISED: u64 = 1 << 63;
const TS_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// At most this many released pages are remembered for refault detection.
const RELEASED_CAP: usize = 1 << 18;

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

/// The touched pages of one address space, by page number (`address >> 12`).
#[derive(Clone, Debug, Default)]
pub struct Pages {
    touched: BTreeMap<u64, u64>,
    released: BTreeMap<u64, u64>,
    /// Pages touched again after they were released.
    pub refaults: u64,
    /// Pages touched again after `madvise` released them, and of those within
    /// [`QUICK_REFAULT_NS`] (purge churn).
    pub refaults_after_advice: u64,
    pub quick_refaults_after_advice: u64,
    /// Pages released by `munmap`, `madvise` or `brk` shrink while touched.
    pub released_total: u64,
}

impl Pages {
    /// Records a touch of `page` at `ts` that backs it as `kind`.
    pub fn touch(&mut self, page: u64, ts: u64, kind: TouchKind) -> Touch {
        match self.touched.get_mut(&page) {
            None => {
                self.touched
                    .insert(page, (ts & TS_MASK) | ((kind as u64) << KIND_SHIFT));
                let released = if self.released.is_empty() {
                    None
                } else {
                    self.released.remove(&page)
                };
                let refault = released.is_some();
                if let Some(r) = released {
                    self.refaults += 1;
                    if r & ADVISED != 0 {
                        self.refaults_after_advice += 1;
                        if ts.saturating_sub(r & !ADVISED) <= QUICK_REFAULT_NS {
                            self.quick_refaults_after_advice += 1;
                        }
                    }
                }
                Touch::First { kind, refault }
            }
            Some(v) => {
                let old = TouchKind::from_bits(*v >> KIND_SHIFT);
                if kind == TouchKind::Anon && old != TouchKind::Anon {
                    *v = (*v & TS_MASK) | ((TouchKind::Anon as u64) << KIND_SHIFT);
                    Touch::Upgraded { from: old }
                } else {
                    Touch::Again
                }
            }
        }
    }

    /// Forgets the pages in `[start_page, end_page)`, remembering them as released at `ts`
    /// (`advised`: by `madvise`, else by an unmap). Returns how many touched pages went.
    pub fn release(&mut self, start_page: u64, end_page: u64, ts: u64, advised: bool) -> u64 {
        let gone = self.take(start_page, end_page);
        let n = gone.len() as u64;
        let mark = (ts & !ADVISED) | if advised { ADVISED } else { 0 };
        for page in gone.into_keys() {
            if self.released.len() < RELEASED_CAP {
                self.released.insert(page, mark);
            }
        }
        self.released_total += n;
        n
    }

    /// Moves the touched pages of `[start_page, end_page)` to start at `to_page` (mremap).
    pub fn relocate(&mut self, start_page: u64, end_page: u64, to_page: u64) {
        let moved = self.take(start_page, end_page);
        for (page, v) in moved {
            self.touched.insert(page - start_page + to_page, v);
        }
    }

    /// Counts touched pages in `[start_page, end_page)`.
    pub fn count(&self, start_page: u64, end_page: u64) -> PageCounts {
        let mut c = PageCounts::default();
        if start_page >= end_page {
            return c;
        }
        for &v in self.touched.range(start_page..end_page).map(|(_, v)| v) {
            match TouchKind::from_bits(v >> KIND_SHIFT) {
                TouchKind::Zero => c.zero += 1,
                TouchKind::Anon => c.anon += 1,
                TouchKind::File => c.file += 1,
            }
            let ts = v & TS_MASK;
            c.first_touch_ns = Some(c.first_touch_ns.map_or(ts, |t: u64| t.min(ts)));
        }
        c
    }

    /// The state of one page: its first-touch time and kind.
    pub fn get(&self, page: u64) -> Option<(u64, TouchKind)> {
        self.touched
            .get(&page)
            .map(|v| (v & TS_MASK, TouchKind::from_bits(v >> KIND_SHIFT)))
    }

    /// Number of touched pages in the whole address space.
    pub fn len(&self) -> usize {
        self.touched.len()
    }

    /// Whether no page is touched.
    pub fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    fn take(&mut self, start_page: u64, end_page: u64) -> BTreeMap<u64, u64> {
        if start_page >= end_page {
            return BTreeMap::new();
        }
        let mut middle = self.touched.split_off(&start_page);
        let mut tail = middle.split_off(&end_page);
        self.touched.append(&mut tail);
        middle
    }
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
}
