//! Reading `/proc/PID/pagemap` (`Documentation/admin-guide/mm/pagemap.rst`): which pages of a
//! process are present, and what backs them. It seeds the model from a running process, shows
//! what calls made resident without faults, and tells a read fault from a write when the
//! backend cannot.
//!
//! The kernel's zero pages are told apart by frame number, which pagemap shows to root only:
//! the small zero page, and the huge zero page (2 MiB of zeroes that a read fault in a
//! transparent-huge-page region maps whole). Both are found by reading memory of vmatrace's
//! own ([`ZeroFrames::of_this_kernel`]).

use std::{fs, io, os::unix::fs::FileExt as _, path::PathBuf, sync::OnceLock};

use crate::{
    model::{Backing, PAGE_SIZE, PMD_PAGES, ResidentRun, TouchKind},
    procfs::{ProcError, SmapsEntry},
};

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_PFN: u64 = (1 << 55) - 1;
/// Entries read per `pread` (64 KiB).
const CHUNK: u64 = 8192;

/// The frame numbers of the kernel's zero pages (None where pagemap hides them or the kernel
/// has no huge zero page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFrames {
    pub small: Option<u64>,
    /// The first frame of the huge zero page; it spans [`PMD_PAGES`] frames.
    pub huge: Option<u64>,
}

impl ZeroFrames {
    /// This kernel's zero frames, found once. The huge zero page is freed when nothing maps it
    /// and may come back elsewhere, so the memory read to find it stays mapped (2 MiB of
    /// address space, no memory) for vmatrace's lifetime, keeping its frames fixed.
    pub fn of_this_kernel() -> ZeroFrames {
        static FRAMES: OnceLock<ZeroFrames> = OnceLock::new();
        *FRAMES.get_or_init(|| {
            let small = read_fresh(PAGE_SIZE, false);
            let huge = read_fresh(2 * PMD_PAGES * PAGE_SIZE, true)
                .filter(|&pfn| Some(pfn) != small && pfn.is_multiple_of(PMD_PAGES));
            ZeroFrames { small, huge }
        })
    }

    /// Whether frame `pfn` is a zero page's.
    pub fn holds(&self, pfn: u64) -> bool {
        self.small == Some(pfn) || self.huge.is_some_and(|h| (h..h + PMD_PAGES).contains(&pfn))
    }

    /// Whether zero pages can be told apart at all (frame numbers are shown).
    pub fn known(&self) -> bool {
        self.small.is_some()
    }

    /// What a present or swapped page with pagemap entry `bits` is, in a `shared` mapping or
    /// not: a zero page, page cache or shared memory (`PM_FILE`, or swapped shared memory), or
    /// private anonymous memory (including copies of file pages and swapped pages).
    pub fn kind(&self, bits: u64, shared: bool) -> TouchKind {
        if bits & PM_PRESENT != 0 && self.holds(bits & PM_PFN) {
            TouchKind::Zero
        } else if bits & PM_FILE == 0 && !shared {
            TouchKind::Anon
        } else {
            TouchKind::File
        }
    }
}

/// Maps `len` bytes of private anonymous memory (aligned to `len / 2` when `huge`, advised
/// `MADV_HUGEPAGE`), reads its first byte and returns the frame pagemap shows for it. The
/// huge one is left mapped (see [`ZeroFrames::of_this_kernel`]).
fn read_fresh(len: u64, huge: bool) -> Option<u64> {
    // SAFETY: a fresh private anonymous mapping of our own, only read below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let addr = if huge {
        let aligned = (p as u64).next_multiple_of(len / 2);
        // SAFETY: advice on the aligned half of the mapping made above.
        unsafe { libc::madvise(aligned as *mut _, (len / 2) as usize, libc::MADV_HUGEPAGE) };
        aligned
    } else {
        p as u64
    };
    // SAFETY: within the readable mapping made above; the read maps a zero page.
    unsafe { std::ptr::read_volatile(addr as *const u8) };
    let mut entry = [0u8; 8];
    let read = fs::File::open("/proc/self/pagemap")
        .and_then(|f| f.read_exact_at(&mut entry, addr / PAGE_SIZE * 8));
    if !huge {
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, len as usize) };
    }
    let bits = u64::from_ne_bytes(entry);
    (read.is_ok() && bits & PM_PRESENT != 0 && bits & PM_PFN != 0).then_some(bits & PM_PFN)
}

/// One process's pagemap, open.
struct Pagemap {
    file: fs::File,
    path: PathBuf,
}

impl Pagemap {
    fn open(pid: u32) -> Result<Self, ProcError> {
        let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        match fs::File::open(&path) {
            Ok(file) => Ok(Self { file, path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProcError::NoProcess(pid)),
            Err(source) => Err(ProcError::Io { path, source }),
        }
    }

    /// Calls `f(page, entry)` for each page of `[start_page, end_page)` that is present or
    /// swapped, in order.
    fn scan(
        &self,
        start_page: u64,
        end_page: u64,
        mut f: impl FnMut(u64, u64),
    ) -> Result<(), ProcError> {
        let mut buf = vec![0u8; CHUNK as usize * 8];
        let mut page = start_page;
        while page < end_page {
            let n = (end_page - page).min(CHUNK) as usize;
            let got = self
                .file
                .read_at(&mut buf[..n * 8], page * 8)
                .map_err(|source| ProcError::Io {
                    path: self.path.clone(),
                    source,
                })?
                / 8;
            if got == 0 {
                break;
            }
            for (i, entry) in buf[..got * 8].chunks_exact(8).enumerate() {
                let bits = u64::from_ne_bytes(entry.try_into().unwrap_or([0; 8]));
                if bits & (PM_PRESENT | PM_SWAP) != 0 {
                    f(page + i as u64, bits);
                }
            }
            page += got as u64;
        }
        Ok(())
    }
}

/// Adds the page at `page` of `kind` to `runs`, extending the last run when it continues it.
fn push_page(runs: &mut Vec<ResidentRun>, page: u64, kind: TouchKind) {
    let addr = page * PAGE_SIZE;
    match runs.last_mut() {
        Some(r) if r.end == addr && r.kind == kind => r.end += PAGE_SIZE,
        _ => runs.push(ResidentRun {
            start: addr,
            end: addr + PAGE_SIZE,
            kind,
        }),
    }
}

/// The pages of `pid` that are resident or in swap, as runs, in each VMA of `smaps` that has
/// any: with `Rss` or `Swap`, or private readable anonymous memory that may hold zero pages
/// (which `Rss` never counts), up to [`ZERO_SCAN_BUDGET`] of those. Special VMAs such as
/// `[vvar]` are skipped.
pub fn read_resident(pid: u32, smaps: &[SmapsEntry]) -> Result<Vec<ResidentRun>, ProcError> {
    let map = Pagemap::open(pid)?;
    let frames = ZeroFrames::of_this_kernel();
    let mut runs = Vec::new();
    // Bytes of VMAs without Rss or Swap still to read for zero pages: a few populated
    // regions, not a sanitizer's terabytes of shadow (read only while it lasts; one VMA
    // larger than the whole is not read).
    let mut zero_budget = ZERO_SCAN_BUDGET;
    for e in smaps {
        let vma = e.map.to_vma(0);
        if matches!(vma.backing, Backing::Special(_)) {
            continue;
        }
        // `Rss` counts no zero page (the kernel's `vm_normal_page` gives none for it): a
        // private anonymous VMA that was only read (`MADV_POPULATE_READ`, a read scan) has
        // `Rss` 0 and every page present. Swapped pages are not in `Rss` either.
        // Without CAP_SYS_ADMIN frames read as 0 and a zero page cannot be told apart (it would
        // count as anonymous memory): those VMAs are left out then.
        let may_hold_zero_pages = frames.known()
            && vma.perms.read
            && !vma.perms.shared
            && matches!(
                vma.backing,
                Backing::Anonymous | Backing::Heap | Backing::Stack
            );
        if e.rss == 0 && e.swap == 0 {
            let len = e.map.end - e.map.start;
            if !may_hold_zero_pages || len > zero_budget {
                continue;
            }
            zero_budget -= len;
        }
        map.scan(
            e.map.start / PAGE_SIZE,
            e.map.end / PAGE_SIZE,
            |page, bits| {
                push_page(&mut runs, page, frames.kind(bits, vma.perms.shared));
            },
        )?;
    }
    Ok(runs)
}

/// Bytes of address space without `Rss` or `Swap` that one [`read_resident`] reads for zero
/// pages at most (a pagemap entry per page: 64 GiB is 128 MiB of entries).
pub const ZERO_SCAN_BUDGET: u64 = 64 << 30;

/// The pages of `[start, end)` that are present in `pid`'s page tables now, as runs by kind.
/// For calls that make memory resident without a fault.
pub fn present_runs(pid: u32, start: u64, end: u64) -> Result<Vec<ResidentRun>, ProcError> {
    let map = Pagemap::open(pid)?;
    let frames = ZeroFrames::of_this_kernel();
    let mut runs = Vec::new();
    map.scan(start / PAGE_SIZE, end.div_ceil(PAGE_SIZE), |page, bits| {
        if bits & PM_PRESENT != 0 {
            push_page(&mut runs, page, frames.kind(bits, false));
        }
    })?;
    Ok(runs)
}

/// Which of the 2 MiB blocks at `blocks` (addresses, aligned) `pid` has as one anonymous huge
/// page now: every page present, private, on physically contiguous frames that start at a
/// 2 MiB frame boundary, and not the huge zero page. How a collapse by khugepaged or
/// `MADV_COLLAPSE`, which takes no fault, is seen.
pub fn huge_blocks(pid: u32, blocks: &[u64]) -> Result<Vec<u64>, ProcError> {
    if blocks.is_empty() {
        return Ok(Vec::new());
    }
    let map = Pagemap::open(pid)?;
    let frames = ZeroFrames::of_this_kernel();
    let pages = crate::model::PMD_PAGES;
    let mut buf = vec![0u8; pages as usize * 8];
    let mut out = Vec::new();
    for &addr in blocks {
        match map.file.read_at(&mut buf, addr / PAGE_SIZE * 8) {
            Ok(n) if n == buf.len() => {}
            Ok(_) => continue,
            Err(source) => {
                return Err(ProcError::Io {
                    path: map.path.clone(),
                    source,
                });
            }
        }
        let entry =
            |i: usize| u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let first = entry(0);
        let pfn = first & PM_PFN;
        let huge = pfn != 0
            && pfn.is_multiple_of(pages)
            && !frames.holds(pfn)
            && (0..pages as usize).all(|i| {
                let bits = entry(i);
                bits & PM_PRESENT != 0 && bits & PM_FILE == 0 && bits & PM_PFN == pfn + i as u64
            });
        if huge {
            out.push(addr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_told_apart_by_frame() {
        let frames = ZeroFrames {
            small: Some(7),
            huge: Some(1024),
        };
        let present = |pfn| PM_PRESENT | pfn;
        assert_eq!(frames.kind(present(7), false), TouchKind::Zero);
        assert_eq!(frames.kind(present(1024 + 511), false), TouchKind::Zero);
        assert_eq!(frames.kind(present(1024 + 512), false), TouchKind::Anon);
        assert_eq!(frames.kind(present(9) | PM_FILE, false), TouchKind::File);
        assert_eq!(frames.kind(PM_SWAP, false), TouchKind::Anon);
        assert_eq!(frames.kind(PM_SWAP, true), TouchKind::File);
    }

    /// This kernel's zero frames, checked against memory of our own: a read of fresh memory
    /// shows the small zero page, a read in a huge-page-advised block the huge one (when the
    /// policy gives it: `use_zero_page` and THP not `never`).
    #[test]
    fn the_zero_frames_of_this_kernel() {
        let frames = ZeroFrames::of_this_kernel();
        if !frames.known() {
            eprintln!("not root: frame numbers hidden");
            return;
        }
        let thp = crate::procfs::thp_policy(std::process::id());
        if thp.huge_zero_page && thp.size_mask(crate::model::ThpAdvice::Huge) & PMD_PAGES != 0 {
            let huge = frames.huge.expect("the huge zero page was found");
            assert_ne!(Some(huge), frames.small);
            // Another block read maps the same frames, page by page.
            let len = 4 * PMD_PAGES * PAGE_SIZE;
            // SAFETY: a fresh mapping of our own, read and unmapped here.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            } as u64;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            let block = p.next_multiple_of(PMD_PAGES * PAGE_SIZE);
            // SAFETY: advice on and a read of the mapping made above.
            unsafe {
                libc::madvise(
                    block as *mut _,
                    (PMD_PAGES * PAGE_SIZE) as usize,
                    libc::MADV_HUGEPAGE,
                );
                std::ptr::read_volatile(block as *const u8);
            }
            let runs = present_runs(std::process::id(), block, block + PMD_PAGES * PAGE_SIZE)
                .expect("own pagemap");
            // SAFETY: unmapping the mapping made above.
            unsafe { libc::munmap(p as *mut _, len as usize) };
            assert_eq!(
                runs,
                vec![ResidentRun {
                    start: block,
                    end: block + PMD_PAGES * PAGE_SIZE,
                    kind: TouchKind::Zero,
                }]
            );
        }
    }
}
