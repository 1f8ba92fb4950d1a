//! Allocator and address-space findings, from a process's model and the patterns the session
//! recorded: the main heap, glibc arenas, mmap-threshold churn, purge churn, reserved but
//! untouched memory, and fragmentation of the address space. Pure: no I/O.

use std::collections::BTreeMap;

use tracer_common::Syscall;

use crate::{
    flags::size,
    model::{Backing, PAGE_SIZE},
    session::{ARENA_SHIFT, Process},
    stacks::{StackTable, sites},
};

pub use crate::finding::{Finding, Severity};

/// Thresholds, so that a healthy process raises no warning.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `vm.max_map_count` of the machine the trace came from.
    pub max_map_count: u64,
    /// CPUs of that machine (glibc creates up to 8 arenas per CPU).
    pub cpus: u64,
}

impl Limits {
    /// This machine's: its `vm.max_map_count` and CPU count.
    pub fn of_this_machine() -> Self {
        Self {
            max_map_count: crate::procfs::max_map_count().unwrap_or(Self::default().max_map_count),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_map_count: 65530,
            cpus: 1,
        }
    }
}

const MIB: u64 = 1 << 20;
/// glibc's arena heap size on 64-bit (`HEAP_MAX_SIZE`).
const ARENA_SIZE: u64 = 64 * MIB;

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

/// Call sites a finding names at most.
const FINDING_SITES: usize = 3;

/// Every finding for one process; with stacks, each names the call sites responsible.
pub fn analyze(p: &Process, limits: &Limits, stacks: &StackTable) -> Vec<Finding> {
    let labels = |rows: Vec<sites::SiteRow>| rows.into_iter().map(|r| r.site).collect();
    let mut heap = heap(p);
    let mut growers = sites::table_of_calls(&p.sites, stacks, usize::MAX, &[Syscall::Brk]);
    growers.retain(|r| r.stats.reserved_bytes > 0);
    growers.truncate(FINDING_SITES);
    heap.call_sites = labels(growers);
    let mut out = vec![heap];
    for mut f in arenas(p, limits) {
        f.call_sites = labels(sites::table_of(&p.sites, stacks, FINDING_SITES, |id| {
            stacks.get(id).is_some_and(|d| sites::through_malloc(d))
                && p.sites.calls_by_stack.get(&id).is_some_and(|m| {
                    m & (1 << Syscall::Mmap as u32 | 1 << Syscall::Mprotect as u32) != 0
                })
        }));
        out.push(f);
    }
    out.extend(mmap_churn(p, stacks));
    for mut f in purge_churn(p) {
        f.call_sites = labels(sites::table_of_calls(
            &p.sites,
            stacks,
            FINDING_SITES,
            &[Syscall::Madvise, Syscall::ProcessMadvise],
        ));
        out.push(f);
    }
    let mut untouched = untouched(p);
    let mut idle = sites::table(&p.sites, stacks, usize::MAX);
    idle.retain(|r| r.still_mapped_bytes > 0);
    idle.sort_by_key(|r| {
        std::cmp::Reverse(
            r.still_mapped_bytes
                .saturating_sub(r.stats.touched_bytes + r.stats.first_touch_bytes),
        )
    });
    idle.truncate(FINDING_SITES);
    untouched.call_sites = labels(idle);
    out.push(untouched);
    out.extend(growth(p));
    let mut frag = fragmentation(p, limits);
    let mut mapped = sites::table(&p.sites, stacks, usize::MAX);
    mapped.sort_by_key(|r| std::cmp::Reverse(r.still_mapped_bytes));
    mapped.retain(|r| r.still_mapped_bytes > 0);
    mapped.truncate(FINDING_SITES);
    frag.call_sites = labels(mapped);
    out.push(frag);
    out.extend(crate::heap::findings::findings(p));
    out
}

/// Where mapping `id` of `p` is now, for a person: its path or kind and address.
fn mapping_label(p: &Process, id: u64) -> String {
    let Some((start, _, _)) = p
        .space
        .ids()
        .ranges_in(0, u64::MAX)
        .into_iter()
        .find(|(_, _, i)| *i == id)
    else {
        return format!("mapping {id} (unmapped since)");
    };
    let what = p
        .space
        .find(start)
        .and_then(|v| p.space.maps_path(v))
        .unwrap_or_else(|| "anonymous".to_string());
    format!("mapping {id} ({} at {start:#x})", crate::name::shown(&what))
}

/// The mappings that grew most (by their ids, so that merges and moves do not count).
fn growth(p: &Process) -> Option<Finding> {
    let mut grown: Vec<(u64, crate::model::ids::Growth)> = p
        .space
        .ids()
        .grown()
        .iter()
        .map(|(id, g)| (*id, *g))
        .collect();
    grown.sort_by(|a, b| {
        (b.1.peak_bytes - b.1.first_bytes)
            .cmp(&(a.1.peak_bytes - a.1.first_bytes))
            .then(a.0.cmp(&b.0))
    });
    let (id, top) = *grown.first()?;
    let mut f = finding(
        p,
        "growth",
        Severity::Info,
        format!(
            "the mapping that grew most: {}, from {} to {} (+{})",
            mapping_label(p, id),
            size(top.first_bytes),
            size(top.peak_bytes),
            size(top.peak_bytes - top.first_bytes)
        ),
    );
    f.numbers = BTreeMap::from([
        ("mapping_id".into(), id),
        ("first_bytes".into(), top.first_bytes),
        ("peak_bytes".into(), top.peak_bytes),
        ("now_bytes".into(), top.now_bytes),
        ("grown_bytes".into(), top.peak_bytes - top.first_bytes),
        ("mappings_grown".into(), grown.len() as u64),
    ]);
    let list: Vec<String> = grown
        .iter()
        .take(5)
        .map(|(id, g)| {
            format!(
                "{}: {} to {}, {} now",
                mapping_label(p, *id),
                size(g.first_bytes),
                size(g.peak_bytes),
                size(g.now_bytes)
            )
        })
        .collect();
    f.explanation = format!(
        "Growth is counted per mapping (the call that created it): a mapping keeps its id when it \
         is split, merged with a neighbour or moved, so neighbours the kernel merged do not look \
         like growth. {} mapping(s) grew: {}.",
        grown.len(),
        list.join("; ")
    );
    Some(f)
}

/// Said by the findings that need live bytes when the run did not trace the allocator.
const ESTIMATE: &str = " This is an estimate from the pages alone: without --heap vmatrace cannot \
                        tell live data from freed memory. Run with --heap for exact live bytes.";

/// The main heap: high-water mark, current size, touched bytes, trims.
fn heap(p: &Process) -> Finding {
    let sp = &p.space;
    let current = sp.heap_size();
    let high = sp.heap_high_water.max(current);
    let touched = sp.heap().map_or(0, |b| {
        sp.pages_in(b.start, b.start + current).resident() * PAGE_SIZE
    });
    let pat = &p.patterns;
    // With the allocator traced, the free memory in the heap is known (heap_fragmentation);
    // without it, a large heap never trimmed is the sign to look at.
    let live = crate::heap::findings::heap_view(p);
    let retained = match live {
        Some((_, free)) => free >= 32 * MIB,
        None => high >= 32 * MIB && pat.brk_shrinks == 0 && current == high,
    };
    let mut f = finding(
        p,
        "heap",
        if retained {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "main heap: {} now, {} high-water, {} touched, trimmed {} times",
            size(current),
            size(high),
            size(touched),
            pat.brk_shrinks
        ),
    );
    f.numbers = BTreeMap::from([
        ("current_bytes".into(), current),
        ("high_water_bytes".into(), high),
        ("touched_bytes".into(), touched),
        ("brk_grows".into(), pat.brk_grows),
        ("brk_shrinks".into(), pat.brk_shrinks),
    ]);
    if let Some((live, free)) = live {
        f.numbers.insert("live_bytes".into(), live);
        f.numbers.insert("free_bytes".into(), free);
        f.explanation = format!(
            "Of the {} touched in the heap, {} is live data and {} is free memory kept \
             resident{}.",
            size(touched),
            size(live),
            size(free),
            if retained {
                " (heap_fragmentation says where and what would give it back)"
            } else {
                ""
            }
        );
    } else if retained {
        f.explanation = format!(
            "The heap grew to {} and was never given back with brk: glibc returns the top of \
             the heap only when the free space there exceeds M_TRIM_THRESHOLD, and one live \
             chunk near the top keeps everything below it. If the program freed this memory, \
             it stays resident ({} touched); if it still holds it, it is live data.{ESTIMATE}",
            size(high),
            size(touched)
        );
        f.suggestion = Some(
            "If the program has freed most of this, call malloc_trim(0) after large frees (it \
             also releases free pages in the middle of the heap), or lower M_TRIM_THRESHOLD \
             (MALLOC_TRIM_THRESHOLD_=131072); --heap says whether they would help and how much."
                .into(),
        );
    } else if pat.brk_shrinks > 0 {
        f.explanation = format!(
            "The heap grew and was given back to the kernel {} times.",
            pat.brk_shrinks
        );
    } else if high > 0 {
        f.explanation = format!(
            "The heap grew to {} and was not given back with brk; at this size that costs \
             little.{ESTIMATE}",
            size(high)
        );
    } else {
        f.explanation = "The main heap was not used.".into();
    }
    f
}

/// glibc arenas: 64 MiB aligned anonymous reservations, committed by mprotect.
/// The glibc arenas of `p`, as `(start, committed bytes, touched bytes)`: the `arenas`
/// finding and the metrics (`vmatrace_arenas`) count the same ones.
pub fn arena_ranges(p: &Process) -> Vec<(u64, u64, u64)> {
    // A 64 MiB-aligned range covered by contiguous private anonymous VMAs, partly accessible
    // (committed) and partly PROT_NONE (reserved). The model, like the kernel, may merge an
    // arena's ends with neighbouring VMAs of the same protection, so ranges are clipped.
    let vmas: Vec<_> = p
        .space
        .vmas()
        .filter(|v| v.backing == Backing::Anonymous && !v.perms.shared)
        .collect();
    let mut found = Vec::new();
    let mut next_free = 0;
    for (i, v) in vmas.iter().enumerate() {
        let mut a = v.start.next_multiple_of(ARENA_SIZE).max(next_free);
        while a < v.end {
            let limit = a + ARENA_SIZE;
            let (mut covered, mut committed) = (a, 0);
            for w in &vmas[i..] {
                if w.start > covered || covered >= limit {
                    break;
                }
                let end = w.end.min(limit);
                if w.perms.read || w.perms.write {
                    committed += end - covered;
                }
                covered = end;
            }
            if covered == limit && committed > 0 && committed < ARENA_SIZE {
                let touched = p.space.pages_in(a, limit).resident() * PAGE_SIZE;
                found.push((a, committed, touched));
                next_free = limit;
            }
            a = limit;
        }
    }
    found
}

fn arenas(p: &Process, limits: &Limits) -> Vec<Finding> {
    let found = arena_ranges(p);
    if found.is_empty() {
        return Vec::new();
    }
    let committed: u64 = found.iter().map(|a| a.1).sum();
    let touched: u64 = found.iter().map(|a| a.2).sum();
    let many = found.len() as u64 > limits.cpus.max(1) && touched >= 16 * MIB;
    let mut f = finding(
        p,
        "arenas",
        if many {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "{} glibc arenas: {} committed, {} touched",
            found.len(),
            size(committed),
            size(touched)
        ),
    );
    f.numbers = BTreeMap::from([
        ("arenas".into(), found.len() as u64),
        ("committed_bytes".into(), committed),
        ("touched_bytes".into(), touched),
        ("cpus".into(), limits.cpus),
    ]);
    let mut lines = Vec::new();
    for (start, committed, touched) in &found {
        let threads: Vec<String> = p
            .patterns
            .touches_in_region(start >> ARENA_SHIFT)
            .into_iter()
            .map(|(tid, pages)| format!("{tid} ({pages} pages)"))
            .collect();
        lines.push(format!(
            "arena {start:#x}: {} committed, {} touched; first touches by threads {}",
            size(*committed),
            size(*touched),
            if threads.is_empty() {
                "none".to_string()
            } else {
                threads.join(", ")
            }
        ));
    }
    f.explanation = format!(
        "Each thread that contends on malloc gets an arena (up to 8 per CPU); each arena keeps \
         its own free memory, so freed memory in one cannot serve another. {}",
        lines.join("; ")
    );
    if p.heap.enabled {
        // The allocator's view says what fewer arenas would save (heap_fragmentation).
        let rows = crate::heap::regions::regions(p);
        let saves = crate::heap::findings::savings(p, &rows).arena_max;
        f.numbers.insert("arena_max_saves_bytes".into(), saves);
        f.explanation.push_str(&format!(
            " All the arenas together held at most {} live at once; one shared arena would \
             need about {} less.",
            size(p.heap.arenas_total.peak),
            size(saves)
        ));
        if saves < MIB {
            f.severity = Severity::Info;
        }
    } else if many {
        f.explanation.push_str(ESTIMATE);
        f.suggestion = Some(format!(
            "Cap the arenas: MALLOC_ARENA_MAX={} in the environment; memory then is shared \
             between threads at some cost in lock contention.",
            limits.cpus.max(1)
        ));
    }
    vec![f]
}

/// Repeated same-size mmap/munmap pairs: allocations just above the mmap threshold, or a
/// program that maps and unmaps buffers itself (which the stacks tell apart).
fn mmap_churn(p: &Process, stacks: &StackTable) -> Vec<Finding> {
    let span = |s: &crate::session::PairStats| s.last_ns.saturating_sub(s.first_ns).max(1);
    let Some((len, stats)) = p
        .patterns
        .pairs
        .iter()
        .filter(|(len, s)| **len >= 64 * 1024 && s.count >= 100)
        .max_by_key(|(_, s)| s.count)
    else {
        return Vec::new();
    };
    let rate = stats.count * 1_000_000_000 / span(stats);
    let title = |kind: &str| {
        format!(
            "{kind}: {} mmap/munmap pairs of {} ({} per second), {} faulted in again and again",
            stats.count,
            size(*len),
            rate,
            size(stats.released_pages * PAGE_SIZE)
        )
    };
    let mut f = finding(p, "mmap_churn", Severity::Warning, title("mmap churn"));
    f.numbers = BTreeMap::from([
        ("pairs".into(), stats.count),
        ("size_bytes".into(), *len),
        ("per_second".into(), rate),
        ("refaulted_bytes".into(), stats.released_pages * PAGE_SIZE),
    ]);
    // Who made these mmap calls: malloc, or the program itself.
    let callers: Vec<u64> = p
        .sites
        .mmap_lens
        .keys()
        .filter(|(l, _)| l == len)
        .map(|&(_, id)| id)
        .collect();
    let known: Vec<_> = callers.iter().filter_map(|id| stacks.get(*id)).collect();
    let by_malloc = known.iter().filter(|d| sites::through_malloc(d)).count();
    f.call_sites = sites::table_of(&p.sites, stacks, FINDING_SITES, |id| callers.contains(&id))
        .into_iter()
        .map(|r| r.site)
        .collect();
    let threshold_advice = format!(
        "Raise the threshold above {} (mallopt(M_MMAP_THRESHOLD, ...) or \
         MALLOC_MMAP_THRESHOLD_={}) so that these blocks are reused from the heap, or keep and \
         reuse the buffers.",
        size(*len),
        (len * 2).next_power_of_two()
    );
    // Where malloc's threshold is the advice, the title says "mmap-threshold churn".
    let advise_threshold = |f: &mut Finding| {
        f.suggestion = Some(threshold_advice.clone());
        f.title = title("mmap-threshold churn");
    };
    // Without stacks, `--heap` tells whether an allocator call made these mappings.
    let heap = p.heap.enabled;
    let n = stats.in_allocator_calls;
    if heap {
        f.numbers.insert("in_allocator_calls".into(), n);
    }
    if known.is_empty() && heap && n * 2 >= stats.count {
        f.explanation = format!(
            "Allocations of this size are mapped by the allocator ({n} of these {} mappings \
             were made inside allocator calls, as --heap saw), so each one is a fresh mmap \
             whose pages are faulted in and then unmapped on free.",
            stats.count
        );
        if stats.by_glibc * 2 >= stats.count {
            advise_threshold(&mut f);
        } else {
            f.suggestion = Some(
                "Keep and reuse the blocks of this size; glibc's mmap threshold does not \
                 apply to the allocator that maps them."
                    .into(),
            );
        }
    } else if known.is_empty()
        && heap
        && n == 0
        && p.heap.complete
        && cpython_arenas(p, stats, *len)
    {
        f.explanation = format!(
            "These are most likely CPython's object arenas: no probed allocator call made \
             these private mappings (as --heap saw), and {} is the arena size of the CPython \
             this process runs. Its small-object allocator (pymalloc) maps arenas itself and \
             unmaps each one once every object in it is freed, so objects made and dropped in \
             bursts map, fault in and unmap them again and again; malloc's settings change \
             nothing.{}",
            size(*len),
            if cpython_of(p) == Some(crate::stacks::python::WALKED_MINOR) {
                " Record with --stacks to see the script's lines that make the objects."
            } else {
                ""
            }
        );
        f.suggestion = Some(PYMALLOC_ADVICE.into());
    } else if known.is_empty() && heap && n == 0 && p.heap.complete {
        f.explanation = "The program maps and unmaps these buffers itself (no probed allocator \
                         call made them, as --heap saw), so each one is faulted in again and \
                         malloc's settings change nothing."
            .into();
        f.suggestion = Some("Keep and reuse these buffers instead of mapping them again.".into());
    } else if known.is_empty() {
        f.explanation = format!(
            "Allocations of this size are above malloc's mmap threshold, so each one is a \
             fresh mmap whose pages are faulted in and then unmapped on free ({}).",
            if heap {
                format!(
                    "--heap saw {n} of these {} mappings made inside allocator calls; record \
                     with --stacks to see who made the others",
                    stats.count
                )
            } else {
                "record with --stacks or --heap to see whether malloc makes these calls".into()
            }
        );
        advise_threshold(&mut f);
    } else if by_malloc == 0 && (pymalloc_frames(&known, *len) || cpython_arenas(p, stats, *len)) {
        f.explanation = format!(
            "These are CPython's object arenas: its small-object allocator (pymalloc) maps \
             arenas of {} itself and unmaps each one once every object in it is freed, so \
             objects made and dropped in bursts{} map, fault in and unmap them again and \
             again; malloc's settings change nothing.",
            size(*len),
            joined(&f.call_sites, " (", ")")
        );
        f.suggestion = Some(PYMALLOC_ADVICE.into());
    } else if by_malloc == 0 {
        f.explanation = format!(
            "The program maps and unmaps these buffers itself (no malloc on the stacks of \
             these calls{}), so each one is faulted in again and malloc's settings change \
             nothing.",
            joined(&f.call_sites, ": ", "")
        );
        f.suggestion = Some(
            "Keep and reuse the buffers at these call sites instead of mapping them again.".into(),
        );
    } else {
        f.explanation = "Allocations of this size are above malloc's mmap threshold (malloc \
                         is on the stacks of these calls), so each one is a fresh mmap whose \
                         pages are faulted in and then unmapped on free."
            .into();
        advise_threshold(&mut f);
    }
    vec![f]
}

/// `sites` joined by `; ` between `before` and `after`; nothing when there are none.
fn joined(sites: &[String], before: &str, after: &str) -> String {
    if sites.is_empty() {
        String::new()
    } else {
        format!("{before}{}{after}", sites.join("; "))
    }
}

/// What ends CPython's arena churn.
const PYMALLOC_ADVICE: &str = "Run with PYTHONMALLOC=malloc, which takes small objects from \
                               malloc's heap instead of arenas, or keep and reuse the objects \
                               made in the bursts.";

/// The minor version of the CPython 3 that `p` runs (its executable, or a libpython it maps).
fn cpython_of(p: &Process) -> Option<u32> {
    crate::heap::pymalloc::cpython_of(p.exe.as_deref(), &p.space)
}

/// Whether the mapping and unmapping of `len` bytes counted in `stats`, which no malloc made
/// (as the stacks or `--heap` saw), are pymalloc's arenas: private (arenas are), in a
/// process that runs a CPython whose arenas are of that size.
fn cpython_arenas(p: &Process, stats: &crate::session::PairStats, len: u64) -> bool {
    stats.shared * 2 < stats.count
        && cpython_of(p)
            .and_then(crate::heap::pymalloc::Layout::for_minor)
            .is_some_and(|l| l.arena_size == len)
}

/// Whether mappings of `len` bytes whose stacks are `known` are pymalloc's arenas by their
/// stacks: Python frames on them (of the CPython whose frames are walked) and its arena size.
fn pymalloc_frames(known: &[&std::sync::Arc<crate::stacks::StackDef>], len: u64) -> bool {
    crate::heap::pymalloc::Layout::for_minor(crate::stacks::python::WALKED_MINOR)
        .is_some_and(|l| l.arena_size == len)
        && known
            .iter()
            .any(|d| d.frames.iter().any(crate::stacks::python::is_python))
}

/// Pages released by madvise and touched again soon after.
fn purge_churn(p: &Process) -> Vec<Finding> {
    let pages = p.space.pages();
    if pages.refaults_after_advice == 0 {
        return Vec::new();
    }
    let quick = pages.quick_refaults_after_advice;
    let warn = quick >= 1024;
    let mut f = finding(
        p,
        "purge_churn",
        if warn {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "purge churn: {} released by madvise were touched again, {} of it within a second",
            size(pages.refaults_after_advice * PAGE_SIZE),
            size(quick * PAGE_SIZE)
        ),
    );
    f.numbers = BTreeMap::from([
        (
            "refaulted_bytes".into(),
            pages.refaults_after_advice * PAGE_SIZE,
        ),
        ("quick_refaulted_bytes".into(), quick * PAGE_SIZE),
    ]);
    f.explanation = "The allocator gives free pages back to the kernel (MADV_DONTNEED or \
                     MADV_FREE) and the program needs them again soon after: each page costs a \
                     fault and a zeroing."
        .into();
    if warn {
        f.suggestion = Some(
            "With jemalloc, purge later: MALLOC_CONF=dirty_decay_ms:10000,muzzy_decay_ms:10000; \
             with glibc, raise M_TRIM_THRESHOLD (MALLOC_TRIM_THRESHOLD_)."
                .into(),
        );
    }
    vec![f]
}

/// Memory reserved but never touched, by kind and the mappings with the most of it.
fn untouched(p: &Process) -> Finding {
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    // Per anonymous mapping: never touched bytes, reserved bytes, where it starts.
    let mut by_mapping: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for v in p.space.vmas() {
        if !(v.perms.read || v.perms.write) {
            continue; // guard pages and reservations without access are not memory
        }
        let touched = p.space.pages_in(v.start, v.end).touched() * PAGE_SIZE;
        let never = v.len().saturating_sub(touched);
        *by_kind.entry(v.backing.kind().to_string()).or_default() += never;
        // The mappings listed are those the title counts: anonymous memory and the heap.
        if matches!(v.backing, Backing::Anonymous | Backing::Heap) {
            for (s, e, id) in p.space.ids().ranges_in(v.start, v.end) {
                let touched = p.space.pages_in(s, e).touched() * PAGE_SIZE;
                let m = by_mapping.entry(id).or_insert((0, 0, s));
                m.0 += (e - s).saturating_sub(touched);
                m.1 += e - s;
                m.2 = m.2.min(s);
            }
        }
    }
    let untouched_mappings = by_mapping.values().filter(|m| m.0 > 0).count();
    let mut largest: Vec<(u64, u64, u64, u64)> = by_mapping
        .into_iter()
        .filter(|(_, (never, _, _))| *never >= MIB)
        .map(|(id, (never, reserved, start))| (never, reserved, start, id))
        .collect();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let anon =
        by_kind.get("anon").copied().unwrap_or(0) + by_kind.get("heap").copied().unwrap_or(0);
    let mut f = finding(
        p,
        "untouched",
        Severity::Info,
        format!(
            "reserved but never touched: {} of anonymous memory with access",
            size(anon)
        ),
    );
    f.numbers = by_kind
        .iter()
        .map(|(k, v)| (format!("{k}_bytes"), *v))
        .collect();
    f.explanation = format!(
        "Reserved address space costs nothing until it is touched (reservations without \
         access, such as glibc's arena reserves, are not counted). {}.",
        if untouched_mappings == 0 {
            "Every anonymous mapping was touched throughout".to_string()
        } else if largest.is_empty() {
            format!(
                "It is spread over {untouched_mappings} mapping{}, none with 1 MiB or more never \
                 touched",
                if untouched_mappings == 1 { "" } else { "s" }
            )
        } else {
            format!(
                "The anonymous mappings with the most never touched: {}",
                largest
                    .iter()
                    .take(5)
                    .map(|(never, reserved, start, id)| format!(
                        "{start:#x} (mapping {id}: {} of {} never touched)",
                        size(*never),
                        size(*reserved)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    f
}

/// VMA count against vm.max_map_count, holes and the largest free gap.
fn fragmentation(p: &Process, limits: &Limits) -> Finding {
    let vmas: Vec<_> = p.space.vmas().collect();
    let count = vmas.len() as u64;
    let mut holes = 0u64;
    let mut largest = 0u64;
    let mut small = 0u64;
    for w in vmas.windows(2) {
        let gap = w[1].start.saturating_sub(w[0].end);
        if gap > 0 && w[1].start < 0x7fff_0000_0000 {
            holes += 1;
            largest = largest.max(gap);
            if gap < MIB {
                small += 1;
            }
        }
    }
    let near_limit = count * 2 >= limits.max_map_count;
    let mut f = finding(
        p,
        "fragmentation",
        if near_limit {
            Severity::Warning
        } else {
            Severity::Info
        },
        format!(
            "{count} VMAs of vm.max_map_count {}, {holes} holes ({small} under 1 MiB), largest free gap {}",
            limits.max_map_count,
            size(largest)
        ),
    );
    f.numbers = BTreeMap::from([
        ("vmas".into(), count),
        ("max_map_count".into(), limits.max_map_count),
        ("holes".into(), holes),
        ("small_holes".into(), small),
        ("largest_gap_bytes".into(), largest),
    ]);
    f.explanation = "Each VMA costs kernel memory and lookup time; mmap fails with ENOMEM at \
                     vm.max_map_count."
        .into();
    if near_limit {
        f.suggestion = Some(
            "Fewer, larger mappings (allocate in bigger chunks), or raise vm.max_map_count.".into(),
        );
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Event, SyscallRecord},
        session::{Seed, Session},
    };
    use tracer_common::Syscall;

    fn call(s: &mut Session, ts: u64, call: Syscall, args: [u64; 6], ret: i64) {
        s.apply(&Event::Syscall(SyscallRecord::at(
            ts, 7, 7, call, args, ret,
        )));
    }

    #[test]
    fn growth_is_per_mapping_and_merged_neighbours_are_not_growth() {
        let mut s = Session::default();
        let heap = 0x5555_0000_0000u64;
        s.add(
            7,
            Seed {
                start_brk: Some(heap),
                ..Seed::default()
            },
            0,
            None,
        );
        let a = 0x7f00_0000_0000u64;
        // Two anonymous mappings side by side: the kernel (and the model) merge them into one
        // VMA of 16 MiB, which grew by nothing.
        call(
            &mut s,
            1,
            Syscall::Mmap,
            [0, 8 * MIB, 3, 0x22, u64::MAX, 0],
            a as i64,
        );
        call(
            &mut s,
            2,
            Syscall::Mmap,
            [0, 8 * MIB, 3, 0x22, u64::MAX, 0],
            (a + 8 * MIB) as i64,
        );
        // The heap grows from 1 MiB to 4 MiB.
        call(
            &mut s,
            3,
            Syscall::Brk,
            [heap + MIB, 0, 0, 0, 0, 0],
            (heap + MIB) as i64,
        );
        call(
            &mut s,
            4,
            Syscall::Brk,
            [heap + 4 * MIB, 0, 0, 0, 0, 0],
            (heap + 4 * MIB) as i64,
        );
        let p = s.get(7).expect("traced");
        assert_eq!(p.space.vma_count(), 2, "the two mappings are one VMA");
        let f = analyze(p, &Limits::default(), &s.stacks);
        let g = f
            .iter()
            .find(|f| f.id == "growth")
            .expect("a growth finding");
        assert_eq!(g.numbers["first_bytes"], MIB);
        assert_eq!(g.numbers["peak_bytes"], 4 * MIB);
        assert_eq!(g.numbers["mappings_grown"], 1, "{g:?}");
        assert!(g.title.contains("[heap]"), "{}", g.title);
        // Never touched: listed per mapping, each of the merged two on its own.
        let u = f.iter().find(|f| f.id == "untouched").expect("untouched");
        assert_eq!(u.numbers["anon_bytes"], 16 * MIB);
        assert!(
            u.explanation.contains(&format!("{a:#x} (mapping "))
                && u.explanation
                    .contains(&format!("{:#x} (mapping ", a + 8 * MIB))
                && u.explanation.contains("8 MiB of 8 MiB never touched"),
            "{}",
            u.explanation
        );
    }

    /// Without stacks, `--heap` tells who maps a churned size: inside malloc calls, glibc's
    /// mmap threshold is the advice; outside any allocator call (CPython's arenas, a program's
    /// own buffers), no malloc setting is suggested.
    #[test]
    fn mmap_churn_advice_follows_who_made_the_mappings_as_heap_saw() {
        use crate::heap::{Allocator, HeapCall, HeapFn};
        // `long_lived`: 1 MiB blocks malloc maps and keeps, besides the churn; `exe`: what
        // the process runs.
        let churn_in = |exe: &str, flags: u64, inside_malloc: bool, long_lived: u64| {
            let mut s = Session::default();
            s.add(7, Seed::default(), 0, None);
            // Traced from its exec: every allocation is seen.
            s.apply(&Event::Exec {
                ts_ns: 1,
                pid: 7,
                tid: 7,
                filename: exe.into(),
            });
            s.apply(&Event::HeapAttach {
                ts_ns: 2,
                pid: 7,
                path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                allocator: Allocator::Glibc,
                late: false,
            });
            let malloc = |ts: u64, ptr: u64| {
                Event::Heap(HeapCall::at(
                    ts + 1,
                    7,
                    HeapFn::Malloc,
                    [MIB - 4096, 0, 0],
                    ptr + 16,
                ))
            };
            let kept = 0x7e00_0000_0000u64;
            for i in 0..long_lived {
                let (ts, at) = (3 + i, kept + i * 2 * MIB);
                call(
                    &mut s,
                    ts,
                    Syscall::Mmap,
                    [0, MIB, 3, 0x22, u64::MAX, 0],
                    at as i64,
                );
                s.apply(&malloc(ts, at));
            }
            let a = 0x7f00_0000_0000u64;
            for i in 0..120u64 {
                let ts = 10 + i * 10;
                call(
                    &mut s,
                    ts,
                    Syscall::Mmap,
                    [0, MIB, 3, flags, u64::MAX, 0],
                    a as i64,
                );
                if inside_malloc {
                    s.apply(&malloc(ts, a));
                }
                call(&mut s, ts + 5, Syscall::Munmap, [a, MIB, 0, 0, 0, 0], 0);
            }
            let p = s.get(7).expect("traced");
            analyze(p, &Limits::default(), &s.stacks)
                .into_iter()
                .find(|f| f.id == "mmap_churn")
                .expect("an mmap churn finding")
        };
        const PRIVATE: u64 = 0x22;
        let churn = |inside_malloc, long_lived| {
            churn_in("/usr/bin/server", PRIVATE, inside_malloc, long_lived)
        };
        let by_malloc = churn(true, 0);
        assert_eq!(by_malloc.numbers["in_allocator_calls"], 120);
        assert!(
            by_malloc
                .suggestion
                .as_deref()
                .is_some_and(|s| s.contains("MALLOC_MMAP_THRESHOLD_")),
            "{by_malloc:?}"
        );
        assert!(
            by_malloc
                .title
                .starts_with("mmap-threshold churn: 120 mmap/munmap pairs")
        );
        let own = churn(false, 0);
        assert!(
            own.title.starts_with("mmap churn: 120 mmap/munmap pairs"),
            "{own:?}"
        );
        assert_eq!(own.numbers["in_allocator_calls"], 0);
        assert!(own.explanation.contains("itself"), "{own:?}");
        assert!(
            !own.suggestion
                .as_deref()
                .unwrap_or_default()
                .contains("MALLOC_"),
            "{own:?}"
        );
        // malloc's long-lived blocks of the same size do not make the program's own churn
        // malloc's.
        let mixed = churn(false, 200);
        assert_eq!(mixed.numbers["in_allocator_calls"], 0);
        assert!(mixed.explanation.contains("itself"), "{mixed:?}");
        // A CPython 3.11 making 1 MiB private mappings outside allocator calls: its object
        // arenas.
        let arenas = churn_in("/usr/bin/python3.11", PRIVATE, false, 0);
        assert!(
            arenas.explanation.contains("CPython's object arenas"),
            "{arenas:?}"
        );
        assert!(
            arenas
                .suggestion
                .as_deref()
                .is_some_and(|s| s.contains("PYTHONMALLOC=malloc") && !s.contains("MALLOC_MMAP")),
            "{arenas:?}"
        );
        assert!(arenas.title.starts_with("mmap churn: "), "{arenas:?}");
        // Not when malloc made them, whatever the process runs; nor shared mappings (a
        // script's `mmap.mmap(-1, n)`); nor 3.9's (256 KiB arenas) or a free-threaded
        // build's (mimalloc).
        let by_malloc = churn_in("/usr/bin/python3.11", PRIVATE, true, 0);
        assert!(
            by_malloc
                .suggestion
                .as_deref()
                .is_some_and(|s| s.contains("MALLOC_MMAP"))
        );
        for (exe, flags) in [
            ("/usr/bin/python3.11", 0x21),
            ("/usr/bin/python3.9", PRIVATE),
            ("/usr/bin/python3.13t", PRIVATE),
        ] {
            let f = churn_in(exe, flags, false, 0);
            assert!(f.explanation.contains("itself"), "{exe} {flags:#x}: {f:?}");
        }
    }

    #[test]
    fn untouched_memory_spread_over_small_mappings_is_said_so_and_reserves_are_left_out() {
        let mut s = Session::default();
        s.add(7, Seed::default(), 0, None);
        // 300 mappings of 512 KiB with gaps between them, none touched: 150 MiB in all, none
        // with 1 MiB; and a 64 MiB reservation without access, which is not memory.
        let base = 0x7f00_0000_0000u64;
        for i in 0..300u64 {
            let at = base + i * MIB;
            call(
                &mut s,
                i + 1,
                Syscall::Mmap,
                [0, MIB / 2, 3, 0x22, u64::MAX, 0],
                at as i64,
            );
        }
        let reserve = 0x7e00_0000_0000u64;
        call(
            &mut s,
            400,
            Syscall::Mmap,
            [0, 64 * MIB, 0, 0x22, u64::MAX, 0],
            reserve as i64,
        );
        let p = s.get(7).expect("traced");
        let f = analyze(p, &Limits::default(), &s.stacks);
        let u = f.iter().find(|f| f.id == "untouched").expect("untouched");
        assert_eq!(
            u.numbers["anon_bytes"],
            150 * MIB,
            "the reservation is not counted"
        );
        assert!(u.title.contains("150 MiB"), "{}", u.title);
        assert!(
            u.explanation
                .contains("spread over 300 mappings, none with 1 MiB or more never touched"),
            "{}",
            u.explanation
        );
    }

    /// `n` anonymous mappings of `len` bytes, each unmapped whole right after, 1 ms apart.
    fn map_unmap_pairs(s: &mut Session, n: u64, len: u64) {
        let at = 0x7f00_0000_0000u64;
        for i in 0..n {
            let ts = 1_000_000 * (2 * i + 1);
            call(
                s,
                ts,
                Syscall::Mmap,
                [0, len, 3, 0x22, u64::MAX, 0],
                at as i64,
            );
            call(s, ts + 1_000_000, Syscall::Munmap, [at, len, 0, 0, 0, 0], 0);
        }
    }

    fn finding_of<'a>(f: &'a [Finding], id: &str) -> Option<&'a Finding> {
        f.iter().find(|f| f.id == id)
    }

    #[test]
    fn mmap_churn_needs_a_hundred_same_size_pairs_of_64_kib_or_more() {
        // (pairs, size, whether the finding is raised)
        for (n, len, raised) in [
            (99, 64 * 1024, false),
            (100, 64 * 1024, true),
            (100, 60 * 1024, false),
            (150, MIB, true),
        ] {
            let mut s = Session::default();
            s.add(7, Seed::default(), 0, None);
            map_unmap_pairs(&mut s, n, len);
            let p = s.get(7).expect("traced");
            let f = analyze(p, &Limits::default(), &s.stacks);
            let churn = finding_of(&f, "mmap_churn");
            assert_eq!(churn.is_some(), raised, "{n} pairs of {len}: {churn:?}");
            if let Some(c) = churn {
                assert_eq!(c.severity, Severity::Warning);
                assert_eq!(c.numbers["pairs"], n);
                assert_eq!(c.numbers["size_bytes"], len);
                // From the first munmap to the last: 2 ms apart each.
                let span_ns = (n - 1) * 2_000_000;
                assert_eq!(c.numbers["per_second"], n * 1_000_000_000 / span_ns);
                assert_eq!(c.numbers["refaulted_bytes"], 0, "nothing was touched");
                assert!(
                    c.suggestion
                        .as_deref()
                        .is_some_and(|t| t.contains("MALLOC_MMAP_THRESHOLD_"))
                );
            }
        }
    }

    #[test]
    fn a_heap_of_32_mib_never_trimmed_is_a_warning_and_a_smaller_or_trimmed_one_is_not() {
        let heap = 0x5555_0000_0000u64;
        // (brk calls after the start, warning, trims)
        for (brks, warning, shrinks) in [
            (vec![32 * MIB], true, 0),
            (vec![32 * MIB - PAGE_SIZE], false, 0),
            (vec![32 * MIB, 16 * MIB], false, 1),
            (vec![8 * MIB, 40 * MIB], true, 0),
        ] {
            let mut s = Session::default();
            s.add(
                7,
                Seed {
                    start_brk: Some(heap),
                    ..Seed::default()
                },
                0,
                None,
            );
            for (i, to) in brks.iter().enumerate() {
                call(
                    &mut s,
                    i as u64 + 1,
                    Syscall::Brk,
                    [heap + to, 0, 0, 0, 0, 0],
                    (heap + to) as i64,
                );
            }
            let p = s.get(7).expect("traced");
            let f = analyze(p, &Limits::default(), &s.stacks);
            let h = finding_of(&f, "heap").expect("a heap finding, always");
            let expected = if warning {
                Severity::Warning
            } else {
                Severity::Info
            };
            assert_eq!(h.severity, expected, "{brks:?}: {h:?}");
            assert_eq!(h.numbers["current_bytes"], *brks.last().expect("a call"));
            assert_eq!(
                h.numbers["high_water_bytes"],
                *brks.iter().max().expect("a call")
            );
            assert_eq!(h.numbers["brk_shrinks"], shrinks);
            assert_eq!(h.numbers["touched_bytes"], 0);
            assert_eq!(h.suggestion.is_some(), warning, "{brks:?}");
            if shrinks > 0 {
                assert!(
                    h.explanation.contains("given back to the kernel 1 times"),
                    "{}",
                    h.explanation
                );
            }
        }
    }

    #[test]
    fn fragmentation_warns_at_half_of_max_map_count_and_counts_small_holes() {
        let limits = Limits {
            max_map_count: 10,
            cpus: 1,
        };
        // (VMAs, warning): five VMAs are half of 10.
        for (n, warning) in [(4u64, false), (5, true)] {
            let mut s = Session::default();
            s.add(7, Seed::default(), 0, None);
            let base = 0x7f00_0000_0000u64;
            // One page each; the gap after the first is 2 MiB, the others 1 page.
            let starts: Vec<u64> = (0..n)
                .map(|i| {
                    if i == 0 {
                        base
                    } else {
                        base + 2 * MIB + PAGE_SIZE + (i - 1) * 2 * PAGE_SIZE
                    }
                })
                .collect();
            for (i, at) in starts.iter().enumerate() {
                call(
                    &mut s,
                    i as u64 + 1,
                    Syscall::Mmap,
                    [0, PAGE_SIZE, 3, 0x22, u64::MAX, 0],
                    *at as i64,
                );
            }
            let p = s.get(7).expect("traced");
            let f = analyze(p, &limits, &s.stacks);
            let frag = finding_of(&f, "fragmentation").expect("always");
            assert_eq!(frag.numbers["vmas"], n);
            assert_eq!(frag.numbers["holes"], n - 1);
            assert_eq!(frag.numbers["small_holes"], n - 2, "all but the 2 MiB gap");
            assert_eq!(frag.numbers["largest_gap_bytes"], 2 * MIB);
            assert_eq!(
                frag.severity,
                if warning {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                "{n} VMAs"
            );
            assert_eq!(frag.suggestion.is_some(), warning);
        }
    }
}
