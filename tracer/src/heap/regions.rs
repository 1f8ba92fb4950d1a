//! Live, touched and retained bytes per heap region, from a process's model and its live
//! blocks: the main heap, each glibc arena, glibc's blocks with their own mappings, the other
//! allocators' mappings, CPython's object arenas. For each region, which live blocks (and
//! call sites) pin pages that are otherwise free, and what glibc's `malloc_trim(0)` would give
//! back. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    call::Allocator,
    live::{Block, GLIBC_ARENA_SIZE},
    pymalloc::Reading,
};
use crate::{
    model::{Backing, PAGE_SIZE},
    session::Process,
};

/// A page counts as pinned when it is touched, holds live bytes and at least this much of it
/// is free.
const PINNED_FREE: u64 = PAGE_SIZE / 2;
/// glibc's free chunk header (`struct malloc_chunk`): `malloc_trim` keeps the page it is on.
const FREE_CHUNK_HEADER: u64 = 48;
/// Blocks and call sites listed per region.
const TOP: usize = 5;

/// A live block that pins otherwise free pages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinRow {
    pub ptr: u64,
    pub size: u64,
    pub bytes: u64,
    /// The call site (return address of its allocation), and where that is.
    pub caller: Option<u64>,
    pub site: Option<String>,
    pub allocated_ns: u64,
    /// Free bytes on the pinned pages it lies on (shared with the other live bytes there, in
    /// proportion).
    pub pinned_free_bytes: u64,
}

/// A call site whose live blocks pin otherwise free pages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteRow {
    pub caller: Option<u64>,
    pub site: Option<String>,
    pub blocks: u64,
    pub live_bytes: u64,
    pub pinned_free_bytes: u64,
}

/// A call site's live blocks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveSiteRow {
    /// The return address of the allocations (null: not known), and where that is.
    pub caller: Option<u64>,
    pub site: Option<String>,
    pub blocks: u64,
    pub live_bytes: u64,
    pub largest_block_bytes: u64,
}

/// Call sites listed by live bytes.
const TOP_SITES: usize = 10;

/// The call sites holding the most live bytes, most first.
pub fn live_sites(p: &Process) -> Vec<LiveSiteRow> {
    let mut by: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for (_, b) in p.heap.blocks() {
        let e = by.entry(b.caller).or_default();
        e.0 += 1;
        e.1 += b.bytes;
        e.2 = e.2.max(b.bytes);
    }
    let mut rows: Vec<LiveSiteRow> = by
        .into_iter()
        .map(|(caller, (blocks, live_bytes, largest))| LiveSiteRow {
            caller: (caller != 0).then_some(caller),
            site: site_label(p, caller),
            blocks,
            live_bytes,
            largest_block_bytes: largest,
        })
        .collect();
    rows.sort_by_key(|r| (std::cmp::Reverse(r.live_bytes), r.caller));
    rows.truncate(TOP_SITES);
    rows
}

/// What a heap region is (its `kind` in records).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// glibc's main heap, grown with `brk`.
    MainHeap,
    /// A glibc arena of other threads.
    GlibcArena,
    /// Blocks with mappings of their own.
    MmappedBlocks,
    /// The other mappings of an allocator (jemalloc's extents, tcmalloc's spans, ...).
    AllocatorMappings,
    /// CPython's object arenas.
    PymallocArenas,
    Other,
}

/// One heap region in a snapshot or the summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionRow {
    pub kind: RegionKind,
    pub allocator: Option<String>,
    /// The extent (for regions made of several mappings, from the first to the last).
    pub start: u64,
    pub end: u64,
    /// Mappings the region is made of.
    pub mappings: u64,
    /// Resident bytes (the process's memory) in the region.
    pub touched_bytes: u64,
    /// Bytes the allocator holds for live blocks (null: not known, as for CPython's arenas,
    /// whose objects are not allocated with malloc).
    pub live_bytes: Option<u64>,
    pub live_blocks: u64,
    /// Free bytes on touched pages: touched minus live, page by page.
    pub retained_bytes: u64,
    /// Touched pages that hold no live byte.
    pub free_page_bytes: u64,
    /// Touched pages that hold live bytes but are at least half free.
    pub pinned_pages: u64,
    /// glibc: touched bytes `malloc_trim(0)` would give back (whole pages inside free
    /// chunks, and the top of the main heap).
    pub trim_bytes: Option<u64>,
    /// glibc: touched bytes in the free top of the region (after its last live block), which
    /// glibc gives back at a free once the top exceeds `M_TRIM_THRESHOLD`.
    pub top_free_bytes: Option<u64>,
    /// The live blocks pinning the most otherwise free bytes.
    pub pinning: Vec<PinRow>,
    /// Their call sites.
    pub pinning_sites: Vec<SiteRow>,
}

/// An address range: (start, end).
type Range = (u64, u64);

/// A block's allocator span and address: (start, end, pointer).
type Span = (u64, u64, u64);

/// A region before it is measured.
struct Def {
    kind: RegionKind,
    allocator: Option<Allocator>,
    ranges: Vec<(u64, u64)>,
    /// glibc's heap (main or arena): its free chunks and top.
    glibc_heap: bool,
    /// The top can be trimmed by `malloc_trim` (the main heap only).
    trims_top: bool,
    blocks: Vec<Span>,
}

/// The regions of `p`'s heap (empty without `--heap`).
pub fn regions(p: &Process) -> Vec<RegionRow> {
    let h = &p.heap;
    if !h.enabled {
        return Vec::new();
    }
    let sp = &p.space;
    let mut defs: Vec<Def> = Vec::new();
    let glibc = h.allocators.contains(&Allocator::Glibc);
    // The main heap is glibc's when glibc serves calls; else the one allocator's that does
    // (tcmalloc grows it with sbrk too).
    let heap_allocator = if glibc {
        Some(Allocator::Glibc)
    } else if h.allocators.len() == 1 {
        h.allocators.first().copied()
    } else {
        None
    };
    if let Some(b) = sp
        .heap()
        .filter(|b| crate::model::vma::page_align_up(b.current) > b.start)
    {
        defs.push(Def {
            kind: RegionKind::MainHeap,
            allocator: heap_allocator,
            ranges: vec![(b.start, crate::model::vma::page_align_up(b.current))],
            glibc_heap: glibc,
            trims_top: glibc,
            blocks: Vec::new(),
        });
    }
    // glibc arenas: from the blocks' headers (and those that held blocks before).
    let mut arena_bases: Vec<u64> = h.arenas.keys().copied().filter(|&k| k != 0).collect();
    for (ptr, b) in h.blocks() {
        if b.headed && b.thread_arena {
            arena_bases.push(ptr & !(GLIBC_ARENA_SIZE - 1));
        }
    }
    arena_bases.sort_unstable();
    arena_bases.dedup();
    for base in arena_bases {
        // The arena's heap: its accessible mappings inside the 64 MiB reservation.
        let end = sp
            .vmas()
            .filter(|v| v.start < base + GLIBC_ARENA_SIZE && v.end > base)
            .filter(|v| v.perms.read || v.perms.write)
            .map(|v| v.end.min(base + GLIBC_ARENA_SIZE))
            .max()
            .unwrap_or(base);
        if end > base {
            defs.push(Def {
                kind: RegionKind::GlibcArena,
                allocator: Some(Allocator::Glibc),
                ranges: vec![(base, end)],
                glibc_heap: true,
                trims_top: false,
                blocks: Vec::new(),
            });
        }
    }
    // glibc's blocks with their own mappings, as one region.
    let mut mmapped: Vec<(u64, u64)> = h
        .blocks()
        .filter(|(_, b)| b.headed && b.mmapped)
        .map(|(ptr, b)| b.span(ptr))
        .collect();
    mmapped.sort_unstable();
    if !mmapped.is_empty() {
        defs.push(Def {
            kind: RegionKind::MmappedBlocks,
            allocator: Some(Allocator::Glibc),
            ranges: mmapped,
            glibc_heap: false,
            trims_top: false,
            blocks: Vec::new(),
        });
    }
    // What the allocators mapped for themselves, outside the regions above, in runs of
    // adjacent mappings.
    let taken = |s: u64, e: u64, defs: &[Def]| {
        defs.iter()
            .flat_map(|d| &d.ranges)
            .any(|(a, b)| s < *b && e > *a)
    };
    let mut owned: Vec<(u64, u64, Allocator)> = Vec::new();
    for (s, e, a) in h.owned() {
        if taken(s, e, &defs) {
            continue;
        }
        match owned.last_mut() {
            Some(last) if last.1 == s && last.2 == a => last.1 = e,
            _ => owned.push((s, e, a)),
        }
    }
    for (s, e, a) in owned {
        defs.push(Def {
            kind: RegionKind::AllocatorMappings,
            allocator: Some(a),
            ranges: vec![(s, e)],
            glibc_heap: false,
            trims_top: false,
            blocks: Vec::new(),
        });
    }
    // CPython's object arenas (mapped directly, not through malloc): those whose pool
    // headers were read, and those not read (live bytes unknown).
    let mut pymalloc_read = Vec::new();
    if is_python(p) {
        let (_, unread): (Vec<Range>, Vec<Range>) = h
            .arena_candidates()
            .filter(|(s, e)| !taken(*s, *e, &defs))
            .partition(|(s, _)| h.pymalloc.as_ref().is_some_and(|r| r.arena(*s).is_some()));
        // Every arena read, also those found by their pools (mapped before tracing), while
        // still mapped.
        pymalloc_read = h
            .pymalloc
            .iter()
            .flat_map(|r| &r.arenas)
            .map(|a| (a.start, a.end))
            .filter(|(s, e)| s < e && sp.find(*s).is_some() && !taken(*s, *e, &defs))
            .collect();
        pymalloc_read.sort_unstable();
        if !unread.is_empty() {
            defs.push(Def {
                kind: RegionKind::PymallocArenas,
                allocator: None,
                ranges: unread,
                glibc_heap: false,
                trims_top: false,
                blocks: Vec::new(),
            });
        }
    }
    // Each live block goes to the region holding its start; the others to their mapping.
    let mut index: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    for (i, d) in defs.iter().enumerate() {
        for &(s, e) in &d.ranges {
            index.insert(s, (e, i));
        }
    }
    let mut stray: BTreeMap<(u64, u64), Vec<Span>> = BTreeMap::new();
    for (ptr, b) in h.blocks() {
        let (s, e) = b.span(ptr);
        match index.range(..=s).next_back() {
            Some((_, (end, i))) if *end > s => defs[*i].blocks.push((s, e, ptr)),
            _ => {
                // Blocks in no mapping (their unmap was seen, their free not: events lost)
                // are one region, without a range.
                let key = sp.find(ptr).map_or((0, 0), |v| (v.start, v.end));
                stray.entry(key).or_default().push((s, e, ptr));
            }
        }
    }
    for ((s, e), blocks) in stray {
        defs.push(Def {
            kind: RegionKind::Other,
            allocator: None,
            ranges: if s < e { vec![(s, e)] } else { Vec::new() },
            glibc_heap: false,
            trims_top: false,
            blocks,
        });
    }
    let mut rows: Vec<RegionRow> = defs
        .into_iter()
        .map(|d| measure(p, d))
        .filter(|r| r.touched_bytes > 0 || r.live_blocks > 0)
        .collect();
    if let Some(r) = h.pymalloc.as_ref().filter(|_| !pymalloc_read.is_empty()) {
        rows.push(measure_pymalloc(p, &pymalloc_read, r));
    }
    rows
}

/// CPython's arenas whose pool headers were read: live bytes pool by pool, as pymalloc
/// counts them; the free bytes of a touched pool are its touched bytes less its live bytes.
fn measure_pymalloc(p: &Process, ranges: &[(u64, u64)], reading: &Reading) -> RegionRow {
    let sp = &p.space;
    let pool_size = reading.pool_bytes;
    let (mut touched, mut live, mut blocks, mut retained, mut free_pools, mut pinned) =
        (0, 0, 0, 0, 0, 0);
    for &(s, e) in ranges {
        let arena_touched = sp.pages_in(s, e).resident() * PAGE_SIZE;
        touched += arena_touched;
        let mut in_pools = 0;
        if let Some(a) = reading.arena(s) {
            for pool in &a.pools {
                let t = sp.pages_in(pool.start, pool.start + pool_size).resident() * PAGE_SIZE;
                in_pools += t;
                let l = pool.live_bytes();
                live += l;
                blocks += pool.blocks;
                retained += t.saturating_sub(l);
                if t.saturating_sub(l) * 2 >= t && t > 0 {
                    pinned += t / PAGE_SIZE;
                }
            }
        }
        // Touched pages in no pool with allocated blocks: emptied pools and the arena's
        // header page.
        free_pools += arena_touched.saturating_sub(in_pools);
        retained += arena_touched.saturating_sub(in_pools);
    }
    RegionRow {
        kind: RegionKind::PymallocArenas,
        allocator: Some("pymalloc".into()),
        start: ranges.first().map_or(0, |r| r.0),
        end: ranges.last().map_or(0, |r| r.1),
        mappings: ranges.len() as u64,
        touched_bytes: touched,
        live_bytes: Some(live),
        live_blocks: blocks,
        retained_bytes: retained,
        free_page_bytes: free_pools,
        pinned_pages: pinned,
        trim_bytes: None,
        top_free_bytes: None,
        pinning: Vec::new(),
        pinning_sites: Vec::new(),
    }
}

/// Whether `p` runs CPython (its executable, or a libpython it maps).
fn is_python(p: &Process) -> bool {
    let named = |s: &str| {
        let base = s.rsplit('/').next().unwrap_or(s);
        base.starts_with("python") || base.starts_with("libpython")
    };
    p.exe.as_deref().is_some_and(named)
        || p.space.vmas().any(|v| match &v.backing {
            Backing::File { path, .. } => named(path),
            _ => false,
        })
}

/// The code at call site `addr` of `p`: its function and `file:line` when its calls carried
/// a stack, else the file mapped there and the offset in it, else nothing.
pub fn site_label(p: &Process, addr: u64) -> Option<String> {
    if let Some(name) = p.heap.site_name(addr) {
        return Some(name.to_string());
    }
    let v = p.space.find(addr)?;
    match &v.backing {
        Backing::File { path, .. } => {
            let base = path.rsplit('/').next().unwrap_or(path);
            Some(format!("{base}+{:#x}", v.offset + (addr - v.start)))
        }
        _ => None,
    }
}

fn measure(p: &Process, d: Def) -> RegionRow {
    let sp = &p.space;
    let h = &p.heap;
    let page = PAGE_SIZE;
    let touched: Vec<u64> = d
        .ranges
        .iter()
        .flat_map(|&(s, e)| sp.resident_pages(s, e))
        .collect();
    let mut blocks = d.blocks;
    blocks.sort_unstable();
    // Live bytes on each touched page.
    let mut live = vec![0u64; touched.len()];
    let touched_ref = &touched;
    let overlaps = |s: u64, e: u64| {
        let first = touched_ref.partition_point(|&pg| pg + page <= s);
        let last = touched_ref.partition_point(|&pg| pg < e);
        (first..last).map(move |i| (i, e.min(touched_ref[i] + page) - s.max(touched_ref[i])))
    };
    for &(s, e, _) in &blocks {
        for (i, n) in overlaps(s, e) {
            live[i] += n;
        }
    }
    let retained: u64 = live.iter().map(|l| page - (*l).min(page)).sum();
    let free_pages = live.iter().filter(|l| **l == 0).count() as u64;
    let pinned = |l: u64| l > 0 && page - l.min(page) >= PINNED_FREE;
    let pinned_pages = live.iter().filter(|l| pinned(**l)).count() as u64;
    // Each block's share of the free bytes on the pinned pages it lies on.
    let mut pins: Vec<(u64, u64)> = Vec::new();
    let mut sites: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for &(s, e, ptr) in &blocks {
        let share: u64 = overlaps(s, e)
            .filter(|(i, _)| pinned(live[*i]))
            .map(|(i, n)| (page - live[i]) * n / live[i])
            .sum();
        let Some(b) = h.block(ptr) else { continue };
        if share > 0 {
            pins.push((share, ptr));
            let site = sites.entry(b.caller).or_default();
            site.0 += 1;
            site.1 += b.bytes;
            site.2 += share;
        }
    }
    pins.sort_unstable_by(|a, b| b.cmp(a));
    let pinning = pins
        .iter()
        .take(TOP)
        .filter_map(|&(share, ptr)| {
            let b: &Block = h.block(ptr)?;
            Some(PinRow {
                ptr,
                size: b.size,
                bytes: b.bytes,
                caller: (b.caller != 0).then_some(b.caller),
                site: site_label(p, b.caller),
                allocated_ns: b.ts_ns,
                pinned_free_bytes: share,
            })
        })
        .collect();
    let mut site_rows: Vec<SiteRow> = sites
        .into_iter()
        .map(|(caller, (n, bytes, share))| SiteRow {
            caller: (caller != 0).then_some(caller),
            site: site_label(p, caller),
            blocks: n,
            live_bytes: bytes,
            pinned_free_bytes: share,
        })
        .collect();
    site_rows.sort_by_key(|s| std::cmp::Reverse(s.pinned_free_bytes));
    site_rows.truncate(TOP);
    // glibc: whole pages inside the gaps between live chunks (free chunks), and the top.
    let (mut trim, mut top) = (None, None);
    if d.glibc_heap
        && let (Some(&(rs, _)), Some(&(_, re))) = (d.ranges.first(), d.ranges.last())
    {
        let in_touched = |s: u64, e: u64| -> u64 {
            if s >= e {
                return 0;
            }
            let first = touched.partition_point(|&pg| pg < s);
            let last = touched.partition_point(|&pg| pg < e);
            (last - first) as u64 * page
        };
        let mut released = 0;
        let mut cursor = rs;
        for &(s, e, _) in &blocks {
            if s > cursor {
                released += in_touched(
                    (cursor + FREE_CHUNK_HEADER).next_multiple_of(page),
                    s & !(page - 1),
                );
            }
            cursor = cursor.max(e);
        }
        let top_bytes = in_touched(cursor.next_multiple_of(page), re);
        if d.trims_top {
            released += top_bytes;
        }
        trim = Some(released);
        top = Some(top_bytes);
    }
    let known_live = d.kind != RegionKind::PymallocArenas;
    RegionRow {
        kind: d.kind,
        allocator: d.allocator.map(|a| a.name().to_string()),
        start: d.ranges.first().map_or(0, |r| r.0),
        end: d.ranges.last().map_or(0, |r| r.1),
        mappings: d.ranges.len() as u64,
        touched_bytes: touched.len() as u64 * page,
        live_bytes: known_live.then(|| {
            blocks
                .iter()
                .filter_map(|b| h.block(b.2))
                .map(|b| b.bytes)
                .sum()
        }),
        live_blocks: blocks.len() as u64,
        retained_bytes: if known_live { retained } else { 0 },
        free_page_bytes: if known_live { free_pages * page } else { 0 },
        pinned_pages,
        trim_bytes: trim,
        top_free_bytes: top,
        pinning,
        pinning_sites: site_rows,
    }
}

/// A process's allocator view for snapshots and the summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeapView {
    /// Every allocation of the image was seen (false after attaching to a running process,
    /// a late attach or lost events: blocks allocated unseen are not counted).
    pub complete: bool,
    /// When the probes began to cover the process.
    pub since_ns: Option<u64>,
    pub allocators: Vec<String>,
    pub live_bytes: u64,
    pub live_requested_bytes: u64,
    pub live_blocks: u64,
    pub peak_live_bytes: u64,
    pub peak_ns: u64,
    pub calls: BTreeMap<String, u64>,
    pub allocations: u64,
    pub frees: u64,
    /// Frees of blocks not seen allocated, the bytes their headers gave (glibc), and how many
    /// had none.
    pub untracked_frees: u64,
    pub untracked_free_bytes: u64,
    pub untracked_free_unknown: u64,
    pub failed: u64,
    pub trims: u64,
    pub regions: Vec<RegionRow>,
    /// The call sites holding the most live bytes.
    #[serde(default)]
    pub sites: Vec<LiveSiteRow>,
}

/// The allocator view of `p` (None without `--heap`).
pub fn view(p: &Process) -> Option<HeapView> {
    let h = &p.heap;
    if !h.enabled {
        return None;
    }
    let c = &h.counts;
    Some(HeapView {
        complete: h.complete,
        since_ns: h.since_ns,
        allocators: h.allocators.iter().map(|a| a.name().to_string()).collect(),
        live_bytes: h.live_bytes(),
        live_requested_bytes: h.live_requested(),
        live_blocks: h.live_blocks() as u64,
        peak_live_bytes: h.peak_bytes,
        peak_ns: h.peak_ns,
        calls: c.calls.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        allocations: c.allocations,
        frees: c.frees,
        untracked_frees: c.untracked_frees,
        untracked_free_bytes: c.untracked_free_bytes,
        untracked_free_unknown: c.untracked_free_unknown,
        failed: c.failed,
        trims: c.trims,
        regions: regions(p),
        sites: live_sites(p),
    })
}
