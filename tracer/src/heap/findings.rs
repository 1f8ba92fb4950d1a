//! The diagnosis from the allocator's own view (`--heap`): live data reported as live, and a
//! fragmentation finding only on free bytes the process keeps resident, with where they are,
//! which live blocks (and call sites) pin them, and only the allocator settings that would act
//! on them, each with what it is expected to give back. Pure.

use std::collections::BTreeMap;

use super::{
    call::Allocator,
    regions::{RegionKind, RegionRow, live_sites, regions},
};
use crate::{
    finding::{Finding, Severity},
    flags::size,
    session::Process,
};

const MIB: u64 = 1 << 20;
/// glibc keeps this much at the top of a heap when it trims (`M_TOP_PAD`'s default).
pub const GLIBC_TOP_PAD: u64 = 128 << 10;
/// glibc's default `M_TRIM_THRESHOLD`: a free top above it is given back at a free.
pub const GLIBC_TRIM_THRESHOLD: u64 = 128 << 10;

/// What each allocator setting would give back, from what was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Savings {
    /// `malloc_trim(0)`: whole free pages inside glibc's heaps, and the main heap's top.
    pub malloc_trim: u64,
    /// `MALLOC_TRIM_THRESHOLD_`: the free tops glibc kept (less its pad).
    pub trim_threshold: u64,
    /// `MALLOC_ARENA_MAX=1`: what the arenas hold beyond the most all of them held at once.
    pub arena_max: u64,
    /// jemalloc's `dirty_decay_ms:0`: its touched pages without a live block.
    pub jemalloc_decay: u64,
}

/// The savings each setting would bring to `p` (whose regions are `rows`).
pub fn savings(p: &Process, rows: &[RegionRow]) -> Savings {
    let glibc_heap =
        |r: &&RegionRow| matches!(r.kind, RegionKind::MainHeap | RegionKind::GlibcArena);
    let glibc: Vec<&RegionRow> = rows
        .iter()
        .filter(glibc_heap)
        .filter(|r| r.allocator.as_deref() == Some("glibc"))
        .collect();
    let thread_arenas = glibc
        .iter()
        .filter(|r| r.kind == RegionKind::GlibcArena)
        .count();
    let touched: u64 = glibc.iter().map(|r| r.touched_bytes).sum();
    Savings {
        malloc_trim: glibc.iter().filter_map(|r| r.trim_bytes).sum(),
        trim_threshold: glibc
            .iter()
            .filter_map(|r| r.top_free_bytes)
            .filter(|t| *t > GLIBC_TRIM_THRESHOLD)
            .map(|t| t - GLIBC_TOP_PAD)
            .sum(),
        arena_max: if thread_arenas > 0 {
            touched.saturating_sub(p.heap.arenas_total.peak)
        } else {
            0
        },
        jemalloc_decay: rows
            .iter()
            .filter(|r| r.allocator.as_deref() == Some("jemalloc"))
            .map(|r| r.free_page_bytes)
            .sum(),
    }
}

/// Whether a saving is worth a setting: at least 1 MiB and a twentieth of what it acts on.
fn worth(saving: u64, of: u64) -> bool {
    saving >= MIB && saving * 20 >= of
}

fn finding(p: &Process, id: &str, severity: Severity, title: String) -> Finding {
    Finding {
        id: id.to_string(),
        pid: p.pid,
        severity,
        title,
        numbers: BTreeMap::new(),
        explanation: String::new(),
        suggestion: None,
        call_sites: Vec::new(),
    }
}

/// A region named for people: kind, allocator and where.
pub fn region_name(r: &RegionRow) -> String {
    let what = match r.kind {
        RegionKind::MainHeap => "main heap".to_string(),
        RegionKind::GlibcArena => "glibc arena".to_string(),
        RegionKind::MmappedBlocks => format!("{} blocks with their own mappings", r.mappings),
        RegionKind::AllocatorMappings => {
            format!("{} mappings", r.allocator.as_deref().unwrap_or("allocator"))
        }
        RegionKind::PymallocArenas => format!("{} CPython object arenas", r.mappings),
        RegionKind::Other if r.start == r.end => {
            return "blocks in no mapping (their memory was unmapped, their free not seen)".into();
        }
        RegionKind::Other => "other memory".to_string(),
    };
    format!("{what} {:#x}-{:#x}", r.start, r.end)
}

/// What the run could not know, in a sentence (empty when it saw everything).
fn coverage(p: &Process) -> String {
    let h = &p.heap;
    if h.complete {
        return String::new();
    }
    let c = &h.counts;
    format!(
        " vmatrace did not see every allocation of this process (attached while it ran, \
         probes attached late, or events lost): blocks allocated unseen are not counted as \
         live; {} frees of such blocks were seen ({} by their headers{}).",
        c.untracked_frees,
        size(c.untracked_free_bytes),
        if c.untracked_free_unknown > 0 {
            format!(", {} without a readable header", c.untracked_free_unknown)
        } else {
            String::new()
        }
    )
}

/// "1 block", "2 blocks".
fn blocks(n: u64) -> String {
    format!("{n} block{}", if n == 1 { "" } else { "s" })
}

/// Every finding from the allocator's view (none without `--heap`).
pub fn findings(p: &Process) -> Vec<Finding> {
    if !p.heap.enabled {
        return Vec::new();
    }
    let rows = regions(p);
    let mut out = vec![live(p, &rows)];
    out.extend(fragmentation(p, &rows));
    out
}

/// Live data, per region.
fn live(p: &Process, rows: &[RegionRow]) -> Finding {
    let h = &p.heap;
    let mut f = finding(
        p,
        "live",
        Severity::Info,
        format!(
            "live data: {} in {} blocks (peak {})",
            size(h.live_bytes()),
            h.live_blocks(),
            size(h.peak_bytes)
        ),
    );
    let touched: u64 = rows.iter().map(|r| r.touched_bytes).sum();
    f.numbers = BTreeMap::from([
        ("live_bytes".into(), h.live_bytes()),
        ("live_requested_bytes".into(), h.live_requested()),
        ("live_blocks".into(), h.live_blocks() as u64),
        ("peak_live_bytes".into(), h.peak_bytes),
        ("touched_bytes".into(), touched),
        ("allocations".into(), h.counts.allocations),
        ("frees".into(), h.counts.frees),
        ("untracked_frees".into(), h.counts.untracked_frees),
        ("complete".into(), u64::from(h.complete)),
    ]);
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.touched_bytes > 0 || r.live_bytes.unwrap_or(0) > 0)
        .map(|r| {
            format!(
                "{}: {} live of {} touched",
                region_name(r),
                r.live_bytes.map_or("unknown".into(), size),
                size(r.touched_bytes)
            )
        })
        .collect();
    let sites: Vec<String> = live_sites(p)
        .iter()
        .take(3)
        .map(|s| {
            format!(
                "{} ({}, {})",
                s.site
                    .clone()
                    .or(s.caller.map(|c| format!("{c:#x}")))
                    .unwrap_or_else(|| "unknown call site".into()),
                blocks(s.blocks),
                size(s.live_bytes)
            )
        })
        .collect();
    f.explanation = format!(
        "Memory the program still holds ({}): it is not fragmentation; only the program can \
         make it smaller. {}.{}{}",
        h.allocators
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", "),
        parts.join("; "),
        if sites.is_empty() {
            String::new()
        } else {
            format!(" Held most by the blocks from {}.", sites.join(", "))
        },
        coverage(p)
    );
    f
}

/// Free bytes the allocator keeps on touched pages, over the regions whose live bytes are
/// known: the fragmentation finding and the metrics (`vmatrace_heap_retained_free_bytes`)
/// report this one number.
pub fn retained_bytes(rows: &[RegionRow]) -> u64 {
    rows.iter()
        .filter(|r| r.live_bytes.is_some())
        .map(|r| r.retained_bytes)
        .sum()
}

/// Free memory kept resident: where, what pins it, and what would give it back.
fn fragmentation(p: &Process, rows: &[RegionRow]) -> Option<Finding> {
    let measured: Vec<&RegionRow> = rows.iter().filter(|r| r.live_bytes.is_some()).collect();
    let retained = retained_bytes(rows);
    let touched: u64 = measured.iter().map(|r| r.touched_bytes).sum();
    if retained < 4 * MIB || retained * 5 < touched {
        return None;
    }
    let free_pages: u64 = measured.iter().map(|r| r.free_page_bytes).sum();
    let pinned = retained.saturating_sub(free_pages);
    let s = savings(p, rows);
    let mut f = finding(
        p,
        "heap_fragmentation",
        Severity::Warning,
        format!(
            "retained free memory: {} of {} touched heap memory is free ({} in whole free pages, {} on pages pinned by live blocks)",
            size(retained),
            size(touched),
            size(free_pages),
            size(pinned)
        ),
    );
    f.numbers = BTreeMap::from([
        ("retained_bytes".into(), retained),
        ("touched_bytes".into(), touched),
        ("free_page_bytes".into(), free_pages),
        ("pinned_bytes".into(), pinned),
        ("live_bytes".into(), p.heap.live_bytes()),
        ("malloc_trim_saves_bytes".into(), s.malloc_trim),
        ("trim_threshold_saves_bytes".into(), s.trim_threshold),
        ("arena_max_saves_bytes".into(), s.arena_max),
        ("jemalloc_decay_saves_bytes".into(), s.jemalloc_decay),
        ("complete".into(), u64::from(p.heap.complete)),
    ]);
    let mut by_retained: Vec<&RegionRow> = measured.clone();
    by_retained.sort_by_key(|r| std::cmp::Reverse(r.retained_bytes));
    let mut lines = Vec::new();
    for r in by_retained.iter().take(3).filter(|r| r.retained_bytes > 0) {
        let mut line = format!(
            "{}: {} touched, {} live, {} free ({} in whole free pages, {} pages pinned)",
            region_name(r),
            size(r.touched_bytes),
            size(r.live_bytes.unwrap_or(0)),
            size(r.retained_bytes),
            size(r.free_page_bytes),
            r.pinned_pages
        );
        let sites: Vec<String> = r
            .pinning_sites
            .iter()
            .take(3)
            .map(|s| {
                format!(
                    "{} ({} live, {}, pin {} free)",
                    s.site
                        .clone()
                        .or(s.caller.map(|c| format!("{c:#x}")))
                        .unwrap_or_else(|| "unknown call site".into()),
                    blocks(s.blocks),
                    size(s.live_bytes),
                    size(s.pinned_free_bytes)
                )
            })
            .collect();
        if !sites.is_empty() {
            line.push_str(&format!("; pinned by blocks from {}", sites.join(", ")));
        }
        if let Some(b) = r.pinning.first() {
            line.push_str(&format!(
                "; the largest share: {} bytes at {:#x} pin {}",
                b.size,
                b.ptr,
                size(b.pinned_free_bytes)
            ));
        }
        lines.push(line);
    }
    f.explanation = format!(
        "Free memory inside the heap that the process keeps resident: freed blocks whose pages \
         the allocator has not given back. {}.{}",
        lines.join("; "),
        coverage(p)
    );
    let mut tries = Vec::new();
    let complete = p.heap.complete;
    let glibc_touched: u64 = measured
        .iter()
        .filter(|r| r.allocator.as_deref() == Some("glibc"))
        .map(|r| r.touched_bytes)
        .sum();
    if complete && worth(s.malloc_trim, glibc_touched) {
        tries.push(format!(
            "calling malloc_trim(0) after large frees: it gives back whole free pages inside glibc's heaps and the main heap's free top (expect about {} back)",
            size(s.malloc_trim)
        ));
    }
    if complete && worth(s.trim_threshold, glibc_touched) {
        tries.push(format!(
            "MALLOC_TRIM_THRESHOLD_=131072: glibc kept a free top larger than its default threshold (raised when large mmapped blocks were freed), and a fixed threshold gives it back at the free (expect about {} back)",
            size(s.trim_threshold)
        ));
    }
    if complete && worth(s.arena_max, glibc_touched) {
        tries.push(format!(
            "MALLOC_ARENA_MAX=1: each thread arena keeps its own free memory, and all of them together never held more than {} live; one arena shared by the threads would reuse it (expect about {} less, at some cost in lock contention)",
            size(p.heap.arenas_total.peak),
            size(s.arena_max)
        ));
    }
    let jemalloc_touched: u64 = measured
        .iter()
        .filter(|r| r.allocator.as_deref() == Some("jemalloc"))
        .map(|r| r.touched_bytes)
        .sum();
    if complete && worth(s.jemalloc_decay, jemalloc_touched) {
        tries.push(format!(
            "MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0: jemalloc keeps freed pages until they decay (10 s by default); purging at once gives them back (expect about {} back, at the cost of page faults when they are used again)",
            size(s.jemalloc_decay)
        ));
    }
    let pymalloc_retained: u64 = measured
        .iter()
        .filter(|r| r.kind == RegionKind::PymallocArenas)
        .map(|r| r.retained_bytes)
        .sum();
    let python = if pymalloc_retained >= MIB {
        format!(
            " CPython gives an object arena back only once every object in it is freed, and \
             no setting changes that: the {} free in its arenas stays until the objects still \
             alive there (created among many that were freed) are freed too, or are created \
             apart from the short-lived ones.",
            size(pymalloc_retained)
        )
    } else {
        String::new()
    };
    let note = if pinned >= MIB {
        format!(
            " No allocator setting gives back the {} on pages that still hold a live block: \
             free those blocks, or allocate long-lived data apart from short-lived data (the \
             call sites above).",
            size(pinned)
        )
    } else {
        String::new()
    };
    f.suggestion = if tries.is_empty() {
        Some(format!(
            "{}{note}{python}",
            if complete {
                "No allocator setting would give this memory back."
            } else {
                "Run vmatrace --heap from the program's start for exact numbers before changing settings."
            }
        ))
    } else {
        Some(format!("Try {}.{note}{python}", tries.join("; or ")))
    };
    Some(f)
}

/// Whether `p`'s allocator view says the retained memory is live data (for the findings that
/// only have the page map): live bytes known, and most of the touched memory live.
pub fn heap_view(p: &Process) -> Option<(u64, u64)> {
    if !p.heap.enabled || !p.heap.allocators.contains(&Allocator::Glibc) {
        return None;
    }
    let rows = regions(p);
    let main = rows.iter().find(|r| r.kind == RegionKind::MainHeap)?;
    Some((main.live_bytes.unwrap_or(0), main.retained_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        heap::{Chunk, HeapCall, HeapFn},
        model::{AddressSpace, PAGE_SIZE},
    };

    const HEAP: u64 = 0x5555_0000_0000;

    /// A process whose main heap spans `pages` touched pages, with glibc blocks of `bytes`
    /// (chunk size) at each of `at` (offsets in the heap), allocated from `site`.
    fn process(pages: u64, blocks: &[(u64, u64, u64)]) -> Process {
        let mut space = AddressSpace::seeded(Vec::new(), Some(HEAP), 0);
        space.brk(1, HEAP + pages * PAGE_SIZE);
        for i in 0..pages {
            space.fault(2, HEAP + i * PAGE_SIZE, Some(true), false);
        }
        let mut p = Process::new(1, space, Some("/usr/bin/server".into()), 0);
        p.heap.exec();
        for (i, &(at, bytes, site)) in blocks.iter().enumerate() {
            let ptr = HEAP + at + 16;
            p.heap.apply(&HeapCall {
                chunk: Some(Chunk {
                    bytes,
                    mmapped: false,
                    thread_arena: false,
                }),
                caller: site,
                ..HeapCall::at(10 + i as u64, 1, HeapFn::Malloc, [bytes - 8, 0, 0], ptr)
            });
        }
        p
    }

    fn frag(p: &Process) -> Option<Finding> {
        findings(p)
            .into_iter()
            .find(|f| f.id == "heap_fragmentation")
    }

    #[test]
    fn a_heap_full_of_live_blocks_is_live_data_not_fragmentation() {
        // 4000 pages (15.6 MiB), each filled by one live 4096-byte chunk.
        let blocks: Vec<_> = (0..4000)
            .map(|i| (i * PAGE_SIZE, PAGE_SIZE, 0x40_1000))
            .collect();
        let p = process(4000, &blocks);
        assert!(frag(&p).is_none());
        let live = findings(&p)
            .into_iter()
            .find(|f| f.id == "live")
            .expect("live");
        assert_eq!(live.numbers["live_bytes"], 4000 * PAGE_SIZE);
        assert!(
            live.explanation.contains("not fragmentation"),
            "{}",
            live.explanation
        );
        let sites = live_sites(&p);
        assert_eq!((sites.len(), sites[0].blocks), (1, 4000));
        let main = &regions(&p)[0];
        assert_eq!((main.retained_bytes, main.pinned_pages), (0, 0));
    }

    #[test]
    fn pages_pinned_by_one_block_each_are_fragmentation_no_setting_gives_back() {
        // 2000 pages, each with one live 208-byte chunk at its start.
        let blocks: Vec<_> = (0..2000).map(|i| (i * PAGE_SIZE, 208, 0x40_2000)).collect();
        let p = process(2000, &blocks);
        let f = frag(&p).expect("a fragmentation finding");
        assert_eq!(f.numbers["retained_bytes"], 2000 * (PAGE_SIZE - 208));
        assert_eq!(f.numbers["free_page_bytes"], 0);
        assert_eq!(f.numbers["malloc_trim_saves_bytes"], 0);
        let s = f.suggestion.unwrap_or_default();
        assert!(s.starts_with("No allocator setting"), "{s}");
        assert!(!s.contains("MALLOC_"), "{s}");
        let r = &regions(&p)[0];
        assert_eq!(r.pinned_pages, 2000);
        assert_eq!(r.pinning_sites[0].caller, Some(0x40_2000));
    }

    #[test]
    fn free_pages_below_a_live_block_are_what_malloc_trim_gives_back() {
        // 3000 pages, one live block on the last: 2999 whole free pages inside one free chunk.
        let p = process(3000, &[(2999 * PAGE_SIZE, 1024, 0x40_3000)]);
        let f = frag(&p).expect("a fragmentation finding");
        assert_eq!(f.numbers["free_page_bytes"], 2999 * PAGE_SIZE);
        // The free chunk's header keeps its first page.
        assert_eq!(f.numbers["malloc_trim_saves_bytes"], 2998 * PAGE_SIZE);
        // Nothing is free at the top: no trim threshold would help.
        assert_eq!(f.numbers["trim_threshold_saves_bytes"], 0);
        let s = f.suggestion.unwrap_or_default();
        assert!(
            s.contains("malloc_trim(0)") && !s.contains("MALLOC_TRIM_THRESHOLD_"),
            "{s}"
        );
    }

    #[test]
    fn a_free_top_is_given_back_by_the_trim_threshold_and_malloc_trim() {
        // 3000 pages, one live block on the first: the rest is the heap's free top.
        let p = process(3000, &[(0, 1024, 0x40_4000)]);
        let f = frag(&p).expect("a fragmentation finding");
        let top = 2999 * PAGE_SIZE;
        assert_eq!(f.numbers["trim_threshold_saves_bytes"], top - GLIBC_TOP_PAD);
        assert_eq!(f.numbers["malloc_trim_saves_bytes"], top);
        let s = f.suggestion.unwrap_or_default();
        assert!(
            s.contains("malloc_trim(0)") && s.contains("MALLOC_TRIM_THRESHOLD_"),
            "{s}"
        );
    }

    #[test]
    fn a_run_that_missed_allocations_suggests_no_setting() {
        let mut p = process(3000, &[(2999 * PAGE_SIZE, 1024, 0x40_3000)]);
        p.heap.lost_events();
        let f = frag(&p).expect("a fragmentation finding");
        assert_eq!(f.numbers["complete"], 0);
        let s = f.suggestion.unwrap_or_default();
        assert!(
            s.starts_with("Run vmatrace --heap from the program's start"),
            "{s}"
        );
        assert!(f.explanation.contains("did not see every allocation"));
    }

    #[test]
    fn blocks_in_no_mapping_are_one_region_without_a_range() {
        // Two live blocks where nothing is mapped (their unmap seen, their free lost).
        let mut p = process(4, &[(0, 4096, 0x40_1000)]);
        for (i, ptr) in [0x1000u64, 0x9000].into_iter().enumerate() {
            p.heap.apply(&HeapCall::at(
                100 + i as u64,
                1,
                HeapFn::Malloc,
                [100, 0, 0],
                ptr,
            ));
        }
        let stray: Vec<_> = regions(&p)
            .into_iter()
            .filter(|r| r.kind == RegionKind::Other)
            .collect();
        assert_eq!(stray.len(), 1, "{stray:?}");
        assert_eq!(
            (stray[0].live_blocks, stray[0].start, stray[0].end),
            (2, 0, 0)
        );
        assert!(region_name(&stray[0]).starts_with("blocks in no mapping"));
    }

    #[test]
    fn without_heap_there_is_no_allocator_finding() {
        let mut p = process(10, &[]);
        p.heap = Default::default();
        assert!(findings(&p).is_empty());
    }
}
