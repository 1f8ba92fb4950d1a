//! What the perf-event fault backend cannot say: whether a fault wrote. The x86 exception
//! tracepoints carry the error code; the software page-fault perf event (arm64's only source,
//! and x86's where the tracepoints are missing) does not. Without it, a write to a private
//! file mapping (copy on write: new anonymous memory) looks like a read (page cache), and a
//! read of fresh anonymous memory (the shared zero page) like a write.
//!
//! So the daemon looks at the page the kernel mapped, in `/proc/PID/pagemap`, when it reads
//! the fault: an anonymous page means the access wrote, a page-cache page or the zero page
//! that it read. The page may have changed since (a later write makes it anonymous; that
//! write's own fault follows, so the final state is the same), or be gone (the answer stays
//! unknown and the model keeps its guess). The answer is written into the fault record
//! (`write`), so a replay needs nothing but the recording. Faults are looked up in runs of
//! nearby pages, one `pread` per run.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::unix::fs::FileExt as _,
};

use crate::{
    event::Event,
    model::{PAGE_SIZE, TouchKind},
    pagemap::{PM_PRESENT, ZeroFrames},
};

/// Pages closer than this to the previous one are read in the same `pread`.
const GAP_PAGES: u64 = 64;
/// At most this many entries per `pread` (32 KiB).
const MAX_RUN: u64 = 4096;

/// Reads pagemap entries for faults without an error code.
#[derive(Debug)]
pub struct FaultAccess {
    frames: ZeroFrames,
}

impl Default for FaultAccess {
    fn default() -> Self {
        Self {
            frames: ZeroFrames::of_this_kernel(),
        }
    }
}

/// Whether the access that mapped a page with pagemap entry `bits` wrote (None: unknown).
pub fn write_from_entry(bits: u64, frames: &ZeroFrames) -> Option<bool> {
    if bits & PM_PRESENT == 0 {
        return None;
    }
    match frames.kind(bits, false) {
        // Without frame numbers (not root) the zero page cannot be told apart.
        _ if !frames.known() => None,
        TouchKind::Anon => Some(true),
        TouchKind::Zero | TouchKind::File => Some(false),
    }
}

impl FaultAccess {
    /// Fills `write_from_page` of every fault in `events` that has no error code. A
    /// `pagemap` file shows the address space its process had when it was opened, so each
    /// call opens them afresh, and faults that came before an exec in `events` (their address
    /// space is gone) stay unknown.
    pub fn resolve(&mut self, events: &mut [Event]) {
        let mut last_exec: HashMap<u32, usize> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            if let Event::Exec { pid, .. } = e {
                last_exec.insert(*pid, i);
            }
        }
        let current = |i: usize, pid: u32| last_exec.get(&pid).is_none_or(|&x| i > x);
        let mut wanted: HashMap<u32, BTreeSet<u64>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            if let Event::Fault(f) = e
                && f.error_code.is_none()
                && current(i, f.pid)
            {
                wanted
                    .entry(f.pid)
                    .or_default()
                    .insert(f.address / PAGE_SIZE);
            }
        }
        if wanted.is_empty() {
            return;
        }
        let mut found: HashMap<(u32, u64), bool> = HashMap::new();
        for (pid, pages) in wanted {
            let Ok(file) = File::open(format!("/proc/{pid}/pagemap")) else {
                continue;
            };
            for (first, last) in runs(&pages) {
                let n = (last - first + 1) as usize;
                let mut buf = vec![0u8; n * 8];
                let Ok(got) = file.read_at(&mut buf, first * 8) else {
                    continue;
                };
                for (i, entry) in buf[..got - got % 8].chunks_exact(8).enumerate() {
                    let page = first + i as u64;
                    if !pages.contains(&page) {
                        continue;
                    }
                    let bits = u64::from_ne_bytes(entry.try_into().unwrap_or([0; 8]));
                    if let Some(w) = write_from_entry(bits, &self.frames) {
                        found.insert((pid, page), w);
                    }
                }
            }
        }
        for (i, e) in events.iter_mut().enumerate() {
            if let Event::Fault(f) = e
                && f.error_code.is_none()
                && current(i, f.pid)
            {
                f.write_from_page = found.get(&(f.pid, f.address / PAGE_SIZE)).copied();
            }
        }
    }
}

/// Sorted pages grouped into `(first, last)` runs read with one `pread` each.
fn runs(pages: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, last)) if p - *last <= GAP_PAGES && p - *first < MAX_RUN => *last = p,
            _ => out.push((p, p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::PM_FILE;

    #[test]
    fn entries_tell_writes_from_reads() {
        let zero = &ZeroFrames {
            small: Some(0x1234),
            huge: Some(0x400),
        };
        assert_eq!(write_from_entry(0, zero), None, "not present");
        assert_eq!(
            write_from_entry(PM_PRESENT | PM_FILE | 99, zero),
            Some(false)
        );
        assert_eq!(
            write_from_entry(PM_PRESENT | 0x1234, zero),
            Some(false),
            "zero page"
        );
        assert_eq!(
            write_from_entry(PM_PRESENT | 0x401, zero),
            Some(false),
            "huge zero page"
        );
        assert_eq!(write_from_entry(PM_PRESENT | 0x5678, zero), Some(true));
        assert_eq!(write_from_entry(PM_PRESENT, &ZeroFrames::default()), None);
    }

    #[test]
    fn nearby_pages_share_a_read() {
        let pages: BTreeSet<u64> = [1, 2, 3, 60, 200, 201, 10_000].into_iter().collect();
        assert_eq!(runs(&pages), vec![(1, 60), (200, 201), (10_000, 10_000)]);
        let many: BTreeSet<u64> = (0..10_000).collect();
        let r = runs(&many);
        assert!(r.iter().all(|(f, l)| l - f < MAX_RUN), "{r:?}");
        assert_eq!(r.len(), 3);
    }

    /// This process's own pages: one written, one only read, one never touched.
    #[test]
    fn own_pages_are_classified_from_pagemap() {
        // SAFETY: a fresh private anonymous mapping of three pages, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: within the mapping.
        unsafe {
            std::ptr::write_volatile(p as *mut u8, 1);
            std::ptr::read_volatile((p + PAGE_SIZE) as *const u8);
        }
        let fault = |address| {
            Event::Fault(crate::event::FaultRecord {
                ts_ns: 0,
                pid: std::process::id(),
                tid: 0,
                address,
                ip: 0,
                error_code: None,
                write_from_page: None,
                stack_id: None,
            })
        };
        let mut events = vec![fault(p), fault(p + PAGE_SIZE), fault(p + 2 * PAGE_SIZE)];
        let mut access = FaultAccess::default();
        access.resolve(&mut events);
        let got: Vec<Option<bool>> = events
            .iter()
            .map(|e| match e {
                Event::Fault(f) => f.write_from_page,
                _ => None,
            })
            .collect();
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p as *mut _, 3 * PAGE_SIZE as usize) };
        if !access.frames.known() {
            eprintln!("not root: frame numbers hidden, the zero page cannot be told apart");
            assert_eq!(got[2], None);
            return;
        }
        assert_eq!(got, vec![Some(true), Some(false), None]);
    }
}
