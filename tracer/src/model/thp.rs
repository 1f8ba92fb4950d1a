//! Transparent huge pages: which first touches the kernel backs with a huge page (2 MiB, or a
//! smaller multi-size THP), so that one fault makes many pages resident at once.
//!
//! The rules follow `mm/huge_memory.c` and `mm/memory.c`: a fault on private anonymous memory
//! (heap included, the stack excluded) may be backed by a huge page of a size that is enabled
//! for the VMA (`always`, or `madvise` with `MADV_HUGEPAGE`, never with `MADV_NOHUGEPAGE` or
//! `PR_SET_THP_DISABLE`), whose naturally aligned block lies inside the VMA and has no page
//! mapped yet. Larger sizes are tried first. A read fault maps the huge zero page (2 MiB only,
//! when `use_zero_page` is on); smaller sizes map the ordinary zero page. When the kernel falls
//! back to small pages (no huge page free), the next fault in the block shows it and the model
//! takes the block back (see `Pages::revert_block`).

use super::vma::{PAGE_SIZE, ThpAdvice};

/// Pages in a PMD-sized (2 MiB) huge page.
pub const PMD_PAGES: u64 = (2 << 20) / PAGE_SIZE;

/// The huge-page sizes a process's anonymous faults can get, in pages, largest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThpPolicy {
    /// Sizes used for any eligible VMA without `MADV_NOHUGEPAGE`.
    pub always: Vec<u64>,
    /// Sizes used only for VMAs with `MADV_HUGEPAGE`.
    pub madvise: Vec<u64>,
    /// A read fault maps the 2 MiB huge zero page.
    pub huge_zero_page: bool,
    /// A write to the huge zero page gets a huge page in its place (Linux 6.13 and later);
    /// before, one small page is copied and the rest of the block maps the small zero page.
    pub zero_write_huge: bool,
}

impl ThpPolicy {
    /// The policy from the kernel's settings: `enabled` is the text of
    /// `/sys/kernel/mm/transparent_hugepage/enabled`, `sizes` each `hugepages-NkB` directory's
    /// size in KiB with the text of its `enabled`, `use_zero_page` that file's text, and
    /// `process_enabled` the `THP_enabled` line of `/proc/PID/status` (false after
    /// `PR_SET_THP_DISABLE`).
    pub fn from_settings(
        enabled: &str,
        sizes: &[(u64, String)],
        use_zero_page: &str,
        process_enabled: bool,
    ) -> Self {
        let mut p = Self {
            huge_zero_page: use_zero_page.trim() == "1",
            ..Self::default()
        };
        if !process_enabled {
            return p;
        }
        let top = selected(enabled);
        // Kernels before multi-size THP have no per-size settings: 2 MiB follows the top one.
        let default_sizes = [(2048, "[inherit]".to_string())];
        let sizes = if sizes.is_empty() {
            &default_sizes[..]
        } else {
            sizes
        };
        for (kib, text) in sizes {
            let pages = kib * 1024 / PAGE_SIZE;
            let mode = match selected(text) {
                Some("inherit") => top,
                other => other,
            };
            match mode {
                Some("always") => p.always.push(pages),
                Some("madvise") => p.madvise.push(pages),
                _ => {}
            }
        }
        p.always.sort_unstable_by(|a, b| b.cmp(a));
        p.madvise.sort_unstable_by(|a, b| b.cmp(a));
        p
    }

    /// Whether no huge page is ever used.
    pub fn is_off(&self) -> bool {
        self.always.is_empty() && self.madvise.is_empty()
    }

    /// The sizes (pages, each a power of two) a VMA with `advice` can get, as a bit mask: bit
    /// `n` set means `1 << n` pages. No allocation: this is asked on first touches.
    pub fn size_mask(&self, advice: ThpAdvice) -> u64 {
        let mask = |sizes: &[u64]| sizes.iter().fold(0, |m, n| m | n);
        match advice {
            ThpAdvice::NoHuge => 0,
            ThpAdvice::Default => mask(&self.always),
            ThpAdvice::Huge => mask(&self.always) | mask(&self.madvise),
        }
    }
}

/// The bracketed choice of a sysfs setting such as `always [madvise] never`.
fn selected(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AddressSpace, Backing, Perms, Touch, TouchKind, address_space as a};

    const MIB2: u64 = 2 << 20;
    /// A 2 MiB-aligned base with room for 8 MiB.
    const BASE: u64 = 0x4000_0000;

    /// An address space with the policy of this kind of machine (`madvise`, huge zero page)
    /// and one 8 MiB anonymous VMA at `BASE`, advised `MADV_HUGEPAGE` when `advise`.
    fn space(advise: bool) -> AddressSpace {
        let mut s = AddressSpace::default();
        s.set_thp(ThpPolicy {
            always: vec![],
            madvise: vec![PMD_PAGES],
            huge_zero_page: true,
            zero_write_huge: false,
        });
        s.mmap(
            0,
            BASE,
            4 * MIB2,
            Perms::from_prot(3, false),
            Backing::Anonymous,
            0,
        );
        if advise {
            s.madvise(1, BASE, 4 * MIB2, a::MADV_HUGEPAGE);
        }
        s
    }

    fn counts(s: &AddressSpace, start: u64, end: u64) -> (u64, u64, u64) {
        let c = s.pages_in(start, end);
        (c.anon, c.huge, c.zero)
    }

    #[test]
    fn a_write_fault_in_an_advised_block_makes_a_huge_page_resident() {
        let mut s = space(true);
        let e = s.fault(2, BASE + MIB2 + 5 * PAGE_SIZE, Some(true), false);
        assert_eq!(e.pages, PMD_PAGES);
        assert!(matches!(
            e.touch,
            Touch::First {
                kind: TouchKind::Anon,
                ..
            }
        ));
        assert_eq!(counts(&s, BASE, BASE + 4 * MIB2), (512, 512, 0));
        // The other pages of the block never fault; a fault in the next block is another one.
        let e = s.fault(3, BASE + 2 * MIB2, Some(true), false);
        assert_eq!(e.pages, PMD_PAGES);
        assert_eq!(counts(&s, BASE, BASE + 4 * MIB2), (1024, 1024, 0));
    }

    #[test]
    fn without_advice_or_with_nohugepage_faults_get_small_pages() {
        let mut s = space(false);
        assert_eq!(s.fault(2, BASE, Some(true), false).pages, 1);
        let mut s = space(true);
        s.madvise(2, BASE, MIB2, a::MADV_NOHUGEPAGE);
        assert_eq!(s.vma_count(), 2, "the advice split the VMA");
        assert_eq!(s.fault(3, BASE, Some(true), false).pages, 1);
        assert_eq!(s.fault(4, BASE + MIB2, Some(true), false).pages, PMD_PAGES);
    }

    #[test]
    fn a_block_that_does_not_fit_or_has_pages_gets_small_pages() {
        let mut s = AddressSpace::default();
        s.set_thp(ThpPolicy {
            always: vec![PMD_PAGES, 16],
            madvise: vec![],
            huge_zero_page: true,
            zero_write_huge: false,
        });
        // 1 MiB + 64 KiB: no 2 MiB block fits, 64 KiB ones do.
        let len = (1 << 20) + (64 << 10);
        s.mmap(
            0,
            BASE,
            len,
            Perms::from_prot(3, false),
            Backing::Anonymous,
            0,
        );
        assert_eq!(s.fault(1, BASE, Some(true), false).pages, 16);
        // A read of a multi-size block maps the small zero page.
        assert_eq!(s.fault(2, BASE + (64 << 10), Some(false), false).pages, 1);
        // That block now has a page: the next write in it gets a small page.
        assert_eq!(s.fault(3, BASE + (68 << 10), Some(true), false).pages, 1);
        // A shared mapping is not eligible.
        let shared = BASE + 8 * MIB2;
        s.mmap(
            4,
            shared,
            MIB2,
            Perms::from_prot(3, true),
            Backing::Anonymous,
            0,
        );
        assert_eq!(s.fault(5, shared, Some(true), false).pages, 1);
    }

    #[test]
    fn a_read_maps_the_huge_zero_page_and_a_write_then_splits_it() {
        let mut s = space(true);
        let e = s.fault(2, BASE, Some(false), false);
        assert_eq!(e.pages, PMD_PAGES);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (0, 0, 512));
        assert_eq!(s.pages_in(BASE, BASE + MIB2).resident(), 0);
        // A write to the huge zero page: copy on write of one small page.
        let e = s.fault(3, BASE + PAGE_SIZE, Some(true), true);
        assert_eq!(
            e.touch,
            Touch::Upgraded {
                from: TouchKind::Zero
            }
        );
        assert_eq!(counts(&s, BASE, BASE + MIB2), (1, 0, 511));
    }

    /// The perf-event backend has no error code: a write seen on the mapped page, to a page
    /// the model has as the (huge) zero page, is the same copy on write, not a fault on an
    /// unmapped page of a block the kernel split (seen on arm64: the block's 511 zero pages
    /// were dropped).
    #[test]
    fn without_an_error_code_a_write_to_the_huge_zero_page_is_still_a_copy_on_write() {
        let mut s = space(true);
        s.fault(2, BASE, Some(false), false);
        let at = BASE + 3 * PAGE_SIZE;
        assert!(s.likely_present(at, Some(true)));
        assert!(!s.likely_present(at, None), "unknown access");
        assert!(!s.likely_present(BASE + MIB2, Some(true)), "not mapped");
        let present = s.likely_present(at, Some(true));
        s.fault(3, at, Some(true), present);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (1, 0, 511));
    }

    #[test]
    fn since_6_13_a_write_to_the_huge_zero_page_gets_a_huge_page() {
        let mut s = space(true);
        s.set_thp(ThpPolicy {
            zero_write_huge: true,
            ..s.thp().clone()
        });
        s.fault(2, BASE, Some(false), false);
        let e = s.fault(3, BASE + 9 * PAGE_SIZE, Some(true), true);
        assert_eq!(
            (e.touch, e.pages),
            (
                Touch::Upgraded {
                    from: TouchKind::Zero
                },
                PMD_PAGES
            )
        );
        assert_eq!(counts(&s, BASE, BASE + MIB2), (512, 512, 0));
        assert_eq!(
            s.fault(4, BASE + PAGE_SIZE, Some(true), true).touch,
            Touch::Again
        );
        // A small zero page (the block split by a release) is copied alone.
        s.fault(5, BASE + MIB2 + PAGE_SIZE, Some(false), false);
        s.madvise(6, BASE + MIB2, PAGE_SIZE, a::MADV_DONTNEED);
        let e = s.fault(7, BASE + MIB2 + PAGE_SIZE, Some(true), true);
        assert_eq!(
            e.touch,
            Touch::Upgraded {
                from: TouchKind::Zero
            }
        );
        assert_eq!(counts(&s, BASE + MIB2, BASE + 2 * MIB2), (1, 0, 510));
    }

    #[test]
    fn a_fault_inside_a_supposed_huge_page_takes_it_back() {
        let mut s = space(true);
        s.fault(2, BASE + 3 * PAGE_SIZE, Some(true), false);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (512, 512, 0));
        // Another page of the block faults: the kernel gave small pages after all.
        let e = s.fault(3, BASE + 7 * PAGE_SIZE, Some(true), false);
        assert_eq!(e.pages, 1);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (2, 0, 0));
        assert_eq!(s.thp_fallbacks, 1);
        // A retried fault on the page that made the block changes nothing.
        let mut s = space(true);
        s.fault(2, BASE, Some(true), false);
        assert_eq!(s.fault(3, BASE, Some(true), false).touch, Touch::Again);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (512, 512, 0));
    }

    #[test]
    fn releasing_part_of_a_huge_page_splits_it_and_the_rest_stays() {
        let mut s = space(true);
        s.fault(2, BASE, Some(true), false);
        s.madvise(3, BASE + MIB2 - PAGE_SIZE, PAGE_SIZE, a::MADV_DONTNEED);
        assert_eq!(counts(&s, BASE, BASE + MIB2), (511, 0, 0));
        // Touched again: a small page (the block has pages), counted as refaulted.
        let e = s.fault(4, BASE + MIB2 - PAGE_SIZE, Some(true), false);
        assert!(matches!(e.touch, Touch::First { refault: true, .. }));
        assert_eq!(e.pages, 1);
        assert_eq!(s.pages_in(BASE, BASE + MIB2).refaulted, 1);
        // Releasing a whole huge page and touching it again: a huge page again.
        s.fault(5, BASE + MIB2, Some(true), false);
        s.madvise(6, BASE + MIB2, MIB2, a::MADV_DONTNEED);
        assert_eq!(s.pages_in(BASE + MIB2, BASE + 2 * MIB2).touched(), 0);
        assert_eq!(s.fault(7, BASE + MIB2, Some(true), false).pages, PMD_PAGES);
        assert_eq!(s.pages_in(BASE + MIB2, BASE + 2 * MIB2).refaulted, 512);
    }

    #[test]
    fn reads_of_a_huge_sparse_mapping_cost_one_entry_per_block() {
        // A 64 GiB advised reservation read once per 2 MiB block (a sparse-array scan) maps the
        // huge zero page each time: the model keeps one entry per block, not 512 per block.
        let mut s = AddressSpace::default();
        s.set_thp(ThpPolicy {
            always: vec![],
            madvise: vec![PMD_PAGES],
            huge_zero_page: true,
            zero_write_huge: false,
        });
        let len = 64 << 30;
        s.mmap(
            0,
            BASE,
            len,
            Perms::from_prot(3, false),
            Backing::Anonymous,
            0,
        );
        s.madvise(1, BASE, len, a::MADV_HUGEPAGE);
        let blocks = 8192;
        for i in 0..blocks {
            let e = s.fault(2 + i, BASE + i * MIB2 + 123 * PAGE_SIZE, Some(false), false);
            assert_eq!(e.pages, PMD_PAGES);
        }
        assert_eq!(s.pages().entries(), blocks as usize);
        assert_eq!(counts(&s, BASE, BASE + len), (0, 0, blocks * PMD_PAGES));
        // A write to one block splits only that block; releasing a range drops only its blocks.
        s.fault(20_000, BASE + 5 * MIB2, Some(true), true);
        assert_eq!(counts(&s, BASE + 5 * MIB2, BASE + 6 * MIB2), (1, 0, 511));
        s.madvise(20_001, BASE + 100 * MIB2, 100 * MIB2, a::MADV_DONTNEED);
        assert_eq!(
            counts(&s, BASE, BASE + len),
            (1, 0, (blocks - 100) * PMD_PAGES - 1)
        );
        assert!(s.pages().entries() < blocks as usize + PMD_PAGES as usize);
        // Releasing half a block splits it: the other half stays mapped to the zero page.
        s.munmap(20_002, BASE + 300 * MIB2, MIB2 / 2);
        assert_eq!(
            counts(&s, BASE + 300 * MIB2, BASE + 301 * MIB2),
            (0, 0, 256)
        );
        // Moving the reservation whole to an aligned address keeps one entry per block.
        let before = s.pages().entries();
        let to = BASE + len + 64 * MIB2;
        let from = BASE + 1024 * MIB2;
        s.mremap(
            20_003,
            from,
            1024 * MIB2,
            1024 * MIB2,
            a::MREMAP_MAYMOVE | a::MREMAP_FIXED,
            to,
        );
        assert_eq!(s.pages().entries(), before);
        assert_eq!(counts(&s, to, to + 1024 * MIB2), (0, 0, 1024 * PMD_PAGES));
        // Unmapping the rest drops the whole blocks without expanding them; only the pages of
        // the two split blocks stay known as released (for refault detection).
        s.munmap(20_004, BASE, len);
        assert_eq!(counts(&s, BASE, BASE + len).2, 0);
        assert!(s.pages().entries() <= 1024 + 2 * PMD_PAGES as usize);
    }

    #[test]
    fn a_huge_page_moved_whole_to_an_aligned_address_stays_huge() {
        let mut s = space(true);
        s.fault(2, BASE, Some(true), false);
        let to = BASE + 16 * MIB2;
        s.mremap(
            3,
            BASE,
            4 * MIB2,
            4 * MIB2,
            a::MREMAP_MAYMOVE | a::MREMAP_FIXED,
            to,
        );
        assert_eq!(counts(&s, to, to + MIB2), (512, 512, 0));
        let odd = to + 8 * MIB2 + PAGE_SIZE;
        s.mremap(
            4,
            to,
            4 * MIB2,
            4 * MIB2,
            a::MREMAP_MAYMOVE | a::MREMAP_FIXED,
            odd,
        );
        assert_eq!(
            counts(&s, odd, odd + MIB2),
            (512, 0, 0),
            "split into small pages"
        );
    }

    #[test]
    fn resident_pages_seeded_before_tracing() {
        let mut s = space(false);
        // Two VMAs; one run across both and past the end of the second.
        s.mprotect(1, BASE, 2 * PAGE_SIZE, 1);
        s.seed_resident(&[crate::model::ResidentRun {
            start: BASE - 2 * PAGE_SIZE,
            end: BASE + 4 * PAGE_SIZE,
            kind: TouchKind::Anon,
        }]);
        let c = s.pages_in(BASE, BASE + MIB2);
        assert_eq!((c.anon, c.first_touch_ns), (4, Some(0)));
        assert_eq!(s.pages().len(), 4, "nothing outside the VMAs");
        assert_eq!(s.fault(2, BASE, Some(true), false).touch, Touch::Again);
        assert_eq!(s.pages().runs().len(), 1);
    }

    fn sizes(list: &[(u64, &str)]) -> Vec<(u64, String)> {
        list.iter().map(|(k, t)| (*k, t.to_string())).collect()
    }

    #[test]
    fn settings_of_this_kind_of_machine() {
        // 6.18 defaults: 2 MiB inherits `madvise`, the smaller sizes are off.
        let p = ThpPolicy::from_settings(
            "always [madvise] never\n",
            &sizes(&[
                (2048, "always [inherit] madvise never"),
                (64, "always inherit madvise [never]"),
            ]),
            "1\n",
            true,
        );
        assert_eq!(p.always, Vec::<u64>::new());
        assert_eq!(p.madvise, vec![PMD_PAGES]);
        assert!(p.huge_zero_page);
        assert_eq!(p.size_mask(ThpAdvice::Default), 0);
        assert_eq!(p.size_mask(ThpAdvice::Huge), 512);
        assert_eq!(p.size_mask(ThpAdvice::NoHuge), 0);
    }

    #[test]
    fn always_with_multi_size_and_disabled_processes() {
        let s = sizes(&[
            (64, "always inherit madvise [never]"),
            (2048, "always [inherit] madvise never"),
            (16, "[always] inherit madvise never"),
        ]);
        let p = ThpPolicy::from_settings("[always] madvise never", &s, "0", true);
        assert_eq!(p.size_mask(ThpAdvice::Default), 512 | 4);
        assert!(!p.huge_zero_page);
        let off = ThpPolicy::from_settings("[always] madvise never", &s, "1", false);
        assert!(off.is_off());
        let old_kernel = ThpPolicy::from_settings("[always] madvise never", &[], "1", true);
        assert_eq!(old_kernel.always, vec![512]);
        let never = ThpPolicy::from_settings("always madvise [never]", &[], "1", true);
        assert!(never.is_off());
    }
}
