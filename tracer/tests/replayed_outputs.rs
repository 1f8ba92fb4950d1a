//! `replay`, `replay --json` and `report` (text, `--json`, `--html`, `--perfetto`) on small
//! recordings committed under `tests/data` (how each was made: `tests/data/README.md`). No
//! root and no eBPF: these run wherever the crate builds. Every number asserted is computed
//! here from the recording's own records (the events, and the snapshot the live run wrote
//! at the exit), not copied from a previous output.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use common::{findings_of, parse_lines, run_ok, typed, vmatrace};
use serde_json::Value;
use tracer::{
    finding::{Finding, Severity},
    flags::size,
    output::{
        OutputRecord, SnapshotReason, Summary, process_records::SnapshotJson, report::VmaRow,
    },
};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The memory syscalls that have a record type of their own (docs/json-schema.md).
const SYSCALLS: [&str; 15] = [
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "pkey_mprotect",
    "madvise",
    "process_madvise",
    "shmat",
    "shmdt",
    "mlock",
    "mlock2",
    "munlock",
    "mlockall",
    "munlockall",
];

/// Every recording in `tests/data`.
const RECORDINGS: [&str; 5] = [
    "heap-trim.ndjson",
    "mmap-churn.ndjson.zst",
    "fork.ndjson",
    "threads.ndjson",
    "heap-retained.ndjson.zst",
];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The records of a recording as written, JSON values (zstd-compressed when its name ends in
/// `.zst`): for the comparisons of whole records.
fn recorded_values(name: &str) -> Vec<Value> {
    let bytes = std::fs::read(data(name)).expect("the recording is in tests/data");
    let text = if name.ends_with(".zst") {
        zstd::stream::decode_all(&bytes[..]).expect("a zstd recording")
    } else {
        bytes
    };
    let lines: Vec<String> = String::from_utf8(text)
        .expect("NDJSON is UTF-8")
        .lines()
        .map(str::to_string)
        .collect();
    parse_lines(&lines)
}

/// The records of a recording as written, read by the structs that write them.
fn recorded(name: &str) -> Vec<OutputRecord> {
    typed(&recorded_values(name))
}

/// Stdout of `vmatrace ARGS FILE` (it must succeed).
fn vmatrace_on(args: &[&str], name: &str) -> String {
    let o = run_ok(
        &format!("vmatrace {} {name}", args.join(" ")),
        Command::new(vmatrace()).args(args).arg(data(name)),
    );
    String::from_utf8(o.stdout).expect("UTF-8 output")
}

fn json_lines(text: &str) -> Vec<Value> {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    parse_lines(&lines)
}

/// The records of an NDJSON text, read by the structs that write them.
fn typed_lines(text: &str) -> Vec<OutputRecord> {
    typed(&json_lines(text))
}

fn of_pid(recs: &[OutputRecord], pid: u32) -> impl Iterator<Item = &OutputRecord> {
    recs.iter().filter(move |r| r.pid() == Some(pid))
}

/// The last snapshot of `pid` the live run wrote (at its exit).
fn last_snapshot(recs: &[OutputRecord], pid: u32) -> &SnapshotJson {
    of_pid(recs, pid)
        .filter_map(OutputRecord::snapshot)
        .last()
        .unwrap_or_else(|| panic!("a snapshot of {pid}"))
}

fn vmas(snap: &SnapshotJson) -> &[VmaRow] {
    snap.vmas.as_deref().expect("vmas")
}

fn sum(snap: &SnapshotJson, f: impl Fn(&VmaRow) -> u64) -> u64 {
    vmas(snap).iter().map(f).sum()
}

/// The pids that have a snapshot, in order.
fn pids(recs: &[OutputRecord]) -> Vec<u32> {
    let pids: std::collections::BTreeSet<u32> = recs
        .iter()
        .filter_map(OutputRecord::snapshot)
        .map(|s| s.pid)
        .collect();
    pids.into_iter().collect()
}

/// Calls by record type of `pid`.
fn syscall_counts(recs: &[OutputRecord], pid: u32) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in of_pid(recs, pid) {
        let t = r.type_name();
        if SYSCALLS.contains(&t) {
            *counts.entry(t.to_string()).or_default() += 1;
        }
    }
    counts
}

/// Faults of `pid`: each `fault` record, and each page of a `touches` run.
fn fault_count(recs: &[OutputRecord], pid: u32) -> u64 {
    of_pid(recs, pid)
        .map(|r| match r {
            OutputRecord::Fault(_) => 1,
            OutputRecord::Touches(t) => t.pages,
            _ => 0,
        })
        .sum()
}

/// Pages first touched by `pid`, by page kind.
fn first_touches(recs: &[OutputRecord], pid: u32) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for r in of_pid(recs, pid) {
        let (kind, pages) = match r {
            OutputRecord::Fault(f) if f.first_touch => {
                (f.page_kind.map(|k| k.name().to_string()), f.pages)
            }
            OutputRecord::Touches(t) if t.first_touch => (t.page_kind.clone(), t.pages),
            _ => continue,
        };
        *kinds.entry(kind.expect("a page kind")).or_default() += pages;
    }
    kinds
}

/// The `brk` records of `pid`, their results.
fn brk_results(recs: &[OutputRecord], pid: u32) -> impl Iterator<Item = u64> + '_ {
    of_pid(recs, pid)
        .filter_map(|r| r.call("brk"))
        .map(|b| u64::try_from(b.ret).expect("a break"))
}

/// The heap's high-water mark from the brk calls of `pid` (the kernel's break, page-aligned).
fn heap_high_water(recs: &[OutputRecord], pid: u32, start: u64) -> u64 {
    brk_results(recs, pid)
        .map(|ret| (ret - start).next_multiple_of(PAGE))
        .max()
        .unwrap_or(0)
}

/// How often the break moved up and down (calls that asked for nothing or failed excluded).
fn brk_moves(recs: &[OutputRecord], pid: u32) -> (u64, u64) {
    let mut last = None;
    let (mut grows, mut shrinks) = (0, 0);
    for ret in brk_results(recs, pid) {
        if let Some(before) = last {
            if ret > before {
                grows += 1;
            } else if ret < before {
                shrinks += 1;
            }
        }
        last = Some(ret);
    }
    (grows, shrinks)
}

/// Touched bytes of the `[heap]` VMA of `snap`.
fn heap_touched(snap: &SnapshotJson) -> u64 {
    vmas(snap)
        .iter()
        .filter(|v| v.path.as_deref() == Some("[heap]"))
        .map(|v| v.touched_bytes)
        .sum()
}

/// Never-touched bytes of the VMAs with access in `snap`, by kind (as `untouched` counts).
fn untouched_by_kind(snap: &SnapshotJson) -> BTreeMap<String, u64> {
    let mut by_kind = BTreeMap::new();
    for v in vmas(snap) {
        let perms = v.perms.as_str();
        if !perms.starts_with('r') && perms.as_bytes()[1] != b'w' {
            continue;
        }
        let never = v.end - v.start - v.touched_bytes;
        let kind = format!("{}_bytes", v.kind);
        *by_kind.entry(kind).or_default() += never;
    }
    by_kind
}

/// `(vmas, holes, holes under 1 MiB, largest gap)` of `snap`, below the top of user space
/// (the `[vsyscall]` page is far above it).
fn holes(snap: &SnapshotJson) -> (u64, u64, u64, u64) {
    let v = vmas(snap);
    let (mut holes, mut small, mut largest) = (0, 0, 0);
    for w in v.windows(2) {
        let (end, start) = (w[0].end, w[1].start);
        if start > end && start < 0x7fff_0000_0000 {
            holes += 1;
            largest = largest.max(start - end);
            if start - end < MIB {
                small += 1;
            }
        }
    }
    (v.len() as u64, holes, small, largest)
}

/// The `--json` findings of `report`.
fn findings(name: &str) -> Vec<Finding> {
    findings_of(&typed_lines(&vmatrace_on(&["report", "--json"], name)))
        .into_iter()
        .cloned()
        .collect()
}

fn finding<'a>(findings: &'a [Finding], pid: u32, id: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.pid == pid && f.id == id)
        .unwrap_or_else(|| panic!("no '{id}' finding of {pid} in {findings:#?}"))
}

fn numbers(f: &Finding) -> BTreeMap<String, u64> {
    f.numbers.clone()
}

/// The last record of a replay's output, its summary.
fn summary_of(out: &[OutputRecord]) -> &Summary {
    match out.last() {
        Some(OutputRecord::Summary(s)) => &s.record,
        other => panic!("a summary last: {other:?}"),
    }
}

#[test]
fn replay_json_ends_with_a_summary_that_follows_from_the_recorded_events() {
    for name in RECORDINGS {
        let recs = recorded(name);
        let out = typed_lines(&vmatrace_on(&["replay", "--json"], name));
        let meta = |recs: &[OutputRecord]| match &recs[0] {
            OutputRecord::Meta(m) => m.clone(),
            other => panic!("{name}: meta first: {other:?}"),
        };
        assert_eq!(meta(&out).syscall_backend, "replay", "{name}");
        assert_eq!(meta(&out).boot_id, meta(&recs).boot_id, "{name}");
        let procs = &summary_of(&out).processes;
        assert_eq!(
            procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
            pids(&recs),
            "{name}: every recorded process, and only those"
        );
        for p in procs {
            let pid = p.pid;
            let what = format!("{name}, pid {pid}");
            let live = last_snapshot(&recs, pid);
            let again = last_snapshot(&out, pid);
            assert_eq!(again.reason, SnapshotReason::Exit, "{what}");
            assert_eq!(again.vmas, live.vmas, "{what}: the live run's last map");
            assert!(p.exited, "{what}");
            assert_eq!(p.syscalls, syscall_counts(&recs, pid), "{what}: calls");
            assert_eq!(p.faults, fault_count(&recs, pid), "{what}: faults");
            assert_eq!(
                p.first_touches
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| (k.clone(), *n))
                    .collect::<BTreeMap<_, _>>(),
                first_touches(&recs, pid),
                "{what}: first touches"
            );
            assert_eq!(p.vma_count, vmas(live).len(), "{what}");
            assert_eq!(
                p.reserved_bytes,
                sum(live, |v| v.end - v.start),
                "{what}: reserved"
            );
            assert_eq!(
                p.touched_bytes,
                sum(live, |v| v.touched_bytes),
                "{what}: touched"
            );
            assert_eq!(
                p.anon_bytes,
                sum(live, |v| v.anon_bytes),
                "{what}: anonymous"
            );
            let start = live.brk_start.expect("brk_start");
            assert_eq!(
                p.heap_bytes,
                (live.brk.expect("brk") - start).next_multiple_of(PAGE),
                "{what}: heap"
            );
            let high = heap_high_water(&recs, pid, start);
            assert_eq!(
                p.heap_high_water_bytes,
                high.max(p.heap_bytes),
                "{what}: heap high-water"
            );
        }
    }
}

#[test]
fn replay_prints_each_processs_summary_and_last_map_as_the_recording_has_them() {
    for name in ["heap-trim.ndjson", "fork.ndjson"] {
        let recs = recorded(name);
        let text = vmatrace_on(&["replay"], name);
        for pid in pids(&recs) {
            let live = last_snapshot(&recs, pid);
            let exe = live.exe.as_deref().expect("exe");
            let n = vmas(live).len();
            assert!(
                text.contains(&format!("[{pid}] snapshot (exit): {n} VMAs")),
                "{name}: {text}"
            );
            assert!(
                text.contains(&format!("process {pid} ({exe}), exited")),
                "{name}: {text}"
            );
            let touched = sum(live, |v| v.touched_bytes);
            let anon = sum(live, |v| v.anon_bytes);
            let reserved = sum(live, |v| v.end - v.start);
            let line = format!(
                "  {n} VMAs, reserved {}, touched {} ({} anonymous)",
                size(reserved),
                size(touched),
                size(anon)
            );
            assert!(text.contains(&line), "{name}: no '{line}' in {text}");
            let calls = syscall_counts(&recs, pid)
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            assert!(
                text.contains(&format!("  syscalls: {calls}\n")),
                "{name}: syscalls {calls} in {text}"
            );
            // Each VMA of the last map is a row: its range and perms.
            for v in vmas(live) {
                let range = format!("{:x}-{:x}", v.start, v.end);
                let perms = v.perms.as_str();
                assert!(
                    text.lines().any(|l| {
                        let mut w = l.split_whitespace();
                        w.next() == Some(&range) && w.next() == Some(perms)
                    }),
                    "{name}: no row '{range} {perms}' in {text}"
                );
            }
        }
    }
}

#[test]
fn a_heap_that_grew_and_was_trimmed_is_reported_with_its_high_water_and_trims() {
    let name = "heap-trim.ndjson";
    let recs = recorded(name);
    let pid = pids(&recs)[0];
    let live = last_snapshot(&recs, pid);
    let start = live.brk_start.expect("brk_start");
    let (grows, shrinks) = brk_moves(&recs, pid);
    assert!(grows >= 1 && shrinks >= 1, "the recording trims its heap");
    let high = heap_high_water(&recs, pid, start);
    let now = (live.brk.expect("brk") - start).next_multiple_of(PAGE);
    assert!(high > now, "{high} {now}");
    let heap_touched = heap_touched(live);

    let f = findings(name);
    let heap = finding(&f, pid, "heap");
    assert_eq!(
        heap.severity,
        Severity::Info,
        "a small heap given back: {heap:?}"
    );
    assert_eq!(
        numbers(heap),
        BTreeMap::from([
            ("brk_grows".to_string(), grows),
            ("brk_shrinks".to_string(), shrinks),
            ("current_bytes".to_string(), now),
            ("high_water_bytes".to_string(), high),
            ("touched_bytes".to_string(), heap_touched),
        ])
    );
    assert!(heap.suggestion.is_none());
    let growth = finding(&f, pid, "growth");
    assert_eq!(numbers(growth)["peak_bytes"], high);
    assert_eq!(numbers(growth)["now_bytes"], now);
    assert_eq!(
        numbers(growth)["grown_bytes"],
        high - numbers(growth)["first_bytes"]
    );
    assert!(
        !f.iter().any(|f| f.severity == Severity::Warning),
        "nothing to warn about: {f:#?}"
    );

    let text = vmatrace_on(&["report"], name);
    let title = format!(
        "[{pid}] info main heap: {} now, {} high-water, {} touched, trimmed {shrinks} times",
        size(now),
        size(high),
        size(heap_touched)
    );
    assert!(text.contains(&title), "no '{title}' in {text}");
    assert!(
        text.contains(&format!(
            "The heap grew and was given back to the kernel {shrinks} times."
        )),
        "{text}"
    );
}

#[test]
fn mmap_churn_is_found_with_the_pairs_and_size_the_recording_holds() {
    let name = "mmap-churn.ndjson.zst";
    let recs = recorded(name);
    let pid = pids(&recs)[0];
    // Anonymous mappings unmapped whole, by length: (count, first and last munmap time).
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pairs: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for r in of_pid(&recs, pid).filter_map(OutputRecord::syscall) {
        let args = r.args;
        match r.name() {
            "mmap" if args[3] & 0x20 != 0 && r.ret > 0 => {
                live.insert(r.ret as u64, args[1].next_multiple_of(PAGE));
            }
            "munmap" if r.ret == 0 => {
                let (at, len) = (args[0], args[1].next_multiple_of(PAGE));
                if live.get(&at) == Some(&len) {
                    live.remove(&at);
                    let ts = r.ts_ns;
                    let p = pairs.entry(len).or_insert((0, ts, ts));
                    p.0 += 1;
                    p.2 = ts;
                }
            }
            _ => {}
        }
    }
    let (&len, &(count, first, last)) = pairs
        .iter()
        .max_by_key(|(_, p)| p.0)
        .expect("mmap/munmap pairs");
    assert!(count >= 100 && len >= 64 * 1024, "{count} pairs of {len}");

    let f = findings(name);
    let churn = finding(&f, pid, "mmap_churn");
    assert_eq!(churn.severity, Severity::Warning);
    let n = numbers(churn);
    assert_eq!(n["pairs"], count);
    assert_eq!(n["size_bytes"], len);
    assert_eq!(n["per_second"], count * 1_000_000_000 / (last - first));
    // Every pair's touched pages were released by its munmap.
    assert!(
        n["refaulted_bytes"] > 0 && n["refaulted_bytes"] <= count * len,
        "{churn:?}"
    );
    assert!(
        churn
            .suggestion
            .as_deref()
            .is_some_and(|s| s.contains(&format!(
                "MALLOC_MMAP_THRESHOLD_={}",
                (len * 2).next_power_of_two()
            ))),
        "{churn:?}"
    );
    let text = vmatrace_on(&["report"], name);
    let title = format!(
        "[{pid}] WARNING mmap-threshold churn: {count} mmap/munmap pairs of {} ({} per second)",
        size(len),
        n["per_second"]
    );
    assert!(text.contains(&title), "no '{title}' in {text}");
}

#[test]
fn a_followed_fork_is_replayed_as_two_processes_each_with_its_own_findings() {
    let name = "fork.ndjson";
    let recs = recorded(name);
    let fork = recs
        .iter()
        .find_map(|r| match r {
            OutputRecord::Fork(f) => Some(f),
            _ => None,
        })
        .expect("a fork record");
    let (parent, child) = (fork.pid, fork.child);
    assert!(fork.followed);
    assert_eq!(pids(&recs), vec![parent, child]);
    // The child maps and touches 8 pages of its own: more VMAs and anonymous bytes than
    // the copy of its parent's map it started with.
    let child_calls = syscall_counts(&recs, child);
    assert_eq!(child_calls.get("mmap"), Some(&1), "{child_calls:?}");
    assert!(fault_count(&recs, child) >= 8);

    let out = typed_lines(&vmatrace_on(&["replay", "--json"], name));
    let summary = summary_of(&out);
    for pid in [parent, child] {
        let p = summary
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .unwrap_or_else(|| panic!("{pid} in the summary"));
        assert_eq!(p.vma_count, vmas(last_snapshot(&recs, pid)).len());
    }
    let f = findings(name);
    for pid in [parent, child] {
        for id in ["heap", "untouched", "fragmentation"] {
            finding(&f, pid, id);
        }
    }
    // Only the parent moved its break; the child inherited the heap as it was.
    let (grows, _) = brk_moves(&recs, parent);
    assert_eq!(numbers(finding(&f, parent, "heap"))["brk_grows"], grows);
    assert_eq!(numbers(finding(&f, child, "heap"))["brk_grows"], 0);
    assert_eq!(
        numbers(finding(&f, child, "heap"))["current_bytes"],
        numbers(finding(&f, parent, "heap"))["current_bytes"]
    );
}

#[test]
fn untouched_and_fragmentation_numbers_follow_from_the_last_map_of_every_recording() {
    for name in RECORDINGS {
        let recs = recorded(name);
        let OutputRecord::Meta(meta) = &recs[0] else {
            panic!("{name}: meta first");
        };
        let f = findings(name);
        for pid in pids(&recs) {
            let live = last_snapshot(&recs, pid);
            let untouched = finding(&f, pid, "untouched");
            assert_eq!(
                numbers(untouched),
                untouched_by_kind(live),
                "{name}, pid {pid}"
            );
            let frag = finding(&f, pid, "fragmentation");
            assert_eq!(frag.severity, Severity::Info, "{name}: far from the limit");
            let (count, holes, small, largest) = holes(live);
            assert_eq!(
                numbers(frag),
                BTreeMap::from([
                    ("vmas".to_string(), count),
                    ("holes".to_string(), holes),
                    ("small_holes".to_string(), small),
                    ("largest_gap_bytes".to_string(), largest),
                    ("max_map_count".to_string(), meta.max_map_count),
                ]),
                "{name}, pid {pid}"
            );
        }
    }
}

#[test]
fn untouched_thread_stacks_are_named_by_the_mappings_that_hold_them() {
    let name = "threads.ndjson";
    let recs = recorded(name);
    let pid = pids(&recs)[0];
    let live = last_snapshot(&recs, pid);
    // The mappings of anonymous memory with access, each `(start, id, length, never
    // touched)`: a VMA of one mapping, or each mapping of a VMA the kernel merged from
    // several (its `parts`, whose touched bytes the row does not split).
    let mut mappings: Vec<(u64, u64, u64, Option<u64>)> = Vec::new();
    for v in vmas(live) {
        if v.kind != "anon" || !v.perms.starts_with("rw") {
            continue;
        }
        let (start, end) = (v.start, v.end);
        match &v.parts {
            None => mappings.push((
                start,
                v.id,
                end - start,
                Some(end - start - v.touched_bytes),
            )),
            Some(parts) => {
                for &[s, e, id] in parts {
                    mappings.push((s, id, e - s, None));
                }
            }
        }
    }
    // The two threads' stacks: 2 MiB each, of which a few pages were touched.
    let large: Vec<_> = mappings
        .into_iter()
        .filter(|(_, _, len, never)| *len >= 2 * MIB && never.is_none_or(|n| n >= MIB))
        .collect();
    assert_eq!(large.len(), 2, "one stack per thread: {large:?}");

    let f = findings(name);
    let untouched = finding(&f, pid, "untouched");
    let anon = untouched_by_kind(live)["anon_bytes"] + untouched_by_kind(live)["heap_bytes"];
    assert_eq!(
        untouched.title,
        format!(
            "reserved but never touched: {} of anonymous memory with access",
            size(anon)
        )
    );
    let explanation = untouched.explanation.as_str();
    for (start, id, len, never) in large {
        let named = format!("{start:#x} (mapping {id}: ");
        let at = explanation
            .find(&named)
            .unwrap_or_else(|| panic!("no '{named}' in {explanation}"));
        let said = &explanation[at + named.len()..];
        let of = format!(" of {} never touched)", size(len));
        assert!(
            said.split_once(')')
                .is_some_and(|(n, _)| format!("{n})").ends_with(&of)),
            "{said}"
        );
        if let Some(never) = never {
            assert!(said.starts_with(&format!("{}{of}", size(never))), "{said}");
        }
    }
    // The threads' arenas are named too, one per thread.
    let arenas = finding(&f, pid, "arenas");
    assert_eq!(numbers(arenas)["arenas"], 2, "{arenas:?}");
    let OutputRecord::Meta(meta) = &recs[0] else {
        panic!("meta first");
    };
    assert_eq!(numbers(arenas)["cpus"], meta.cpus);
}

#[test]
fn heap_fragmentation_is_found_with_the_live_bytes_the_allocator_calls_leave() {
    let name = "heap-retained.ndjson.zst";
    let recs = recorded(name);
    let pid = pids(&recs)[0];
    let calls: Vec<_> = of_pid(&recs, pid)
        .filter_map(|r| match r {
            OutputRecord::Heap(h) => Some(h),
            _ => None,
        })
        .collect();
    let live_bytes = calls
        .last()
        .expect("allocator calls")
        .effect
        .as_ref()
        .expect("an effect")
        .live_bytes;
    let allocations = calls
        .iter()
        .filter(|h| matches!(h.call.name(), "malloc" | "calloc" | "realloc"))
        .count() as u64;
    let heap_touched = heap_touched(last_snapshot(&recs, pid));

    let f = findings(name);
    let live = numbers(finding(&f, pid, "live"));
    assert_eq!(live["live_bytes"], live_bytes);
    assert_eq!(live["allocations"], allocations);
    assert_eq!(live["touched_bytes"], heap_touched);
    let frag = finding(&f, pid, "heap_fragmentation");
    assert_eq!(frag.severity, Severity::Warning);
    let n = numbers(frag);
    assert_eq!(n["live_bytes"], live_bytes);
    assert_eq!(n["touched_bytes"], heap_touched);
    // What decides it: at least 4 MiB retained, and a fifth of the touched heap.
    assert!(
        n["retained_bytes"] >= 4 * MIB && n["retained_bytes"] * 5 >= n["touched_bytes"],
        "{frag:?}"
    );
    // Free memory is what is touched and not live.
    assert!(n["retained_bytes"] <= heap_touched - live_bytes, "{frag:?}");
    assert_eq!(
        n["pinned_bytes"],
        n["retained_bytes"] - n["free_page_bytes"]
    );
    // The heap was never trimmed: malloc_trim gives back the whole free pages.
    assert_eq!(brk_moves(&recs, pid).1, 0);
    assert_eq!(n["malloc_trim_saves_bytes"], n["free_page_bytes"]);
    let heap = finding(&f, pid, "heap");
    assert_eq!(numbers(heap)["live_bytes"], live_bytes);
    // The replayed summary tells the allocator's view as people read it: live bytes and the
    // calls, the main heap's retained free bytes, the call sites holding the live bytes.
    let text = vmatrace_on(&["replay"], name);
    let line = text
        .lines()
        .find(|l| l.starts_with("  allocator (glibc): live "))
        .unwrap_or_else(|| panic!("an allocator line in {text}"));
    assert!(
        line.contains(&format!("live {} in", tracer::flags::size(live_bytes)))
            && line.contains(&format!("; {allocations} allocations")),
        "{line}"
    );
    assert!(
        text.contains("retained free\n  top call sites by live bytes:\n")
            && text.contains(&format!(
                "{} retained free",
                tracer::flags::size(n["retained_bytes"])
            )),
        "{text}"
    );
}

#[test]
fn html_and_perfetto_pictures_are_written_from_a_recording() {
    let name = "heap-trim.ndjson";
    let recs = recorded(name);
    let pid = pids(&recs)[0];
    let live = last_snapshot(&recs, pid);
    let exe = live.exe.as_deref().expect("exe");
    let dir = common::temp_path("pictures");
    std::fs::create_dir_all(&dir).expect("a directory");
    let (html, trace) = (dir.join("report.html"), dir.join("trace.json"));
    run_ok(
        "report --html --perfetto",
        Command::new(vmatrace())
            .arg("report")
            .arg(data(name))
            .arg("--html")
            .arg(&html)
            .arg("--perfetto")
            .arg(&trace),
    );
    let page = std::fs::read_to_string(&html).expect("the page");
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<svg"), "drawn as SVG");
    assert!(
        page.contains(&format!("{exe} ({pid})")),
        "the process is named"
    );
    let (grows, shrinks) = brk_moves(&recs, pid);
    assert!(grows > 0);
    assert!(
        page.contains(&format!("trimmed {shrinks} times")),
        "the findings are on the page"
    );
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("the trace")).expect("JSON");
    let events = t["traceEvents"].as_array().expect("traceEvents");
    assert!(events.iter().any(|e| e["name"] == "process_name"
        && e["pid"] == pid
        && e["args"]["name"] == format!("{exe} ({pid})")));
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "heap" && e["pid"] == pid)
    );
    let most_touched = events
        .iter()
        .filter(|e| e["name"] == "memory (all regions)" && e["pid"] == pid)
        .filter_map(|e| e["args"]["touched_bytes"].as_u64())
        .max()
        .expect("a memory counter");
    assert!(
        most_touched >= sum(live, |v| v.touched_bytes),
        "the counter reaches what the process had touched at its exit: {most_touched}"
    );
}

#[test]
fn each_recording_converted_to_binary_and_back_replays_and_reports_alike() {
    let dir = std::env::temp_dir().join(format!("vmatrace-replayed-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    for name in RECORDINGS {
        let bin = dir.join(format!("{name}.vmat"));
        let back = dir.join(format!("{name}.ndjson"));
        let convert = |from: &Path, to: &Path| {
            run_ok(
                "convert",
                Command::new(vmatrace())
                    .arg("convert")
                    .arg(from)
                    .arg("-o")
                    .arg(to)
                    .arg("--force"),
            );
        };
        convert(&data(name), &bin);
        convert(&bin, &back);
        let bytes = std::fs::read(&bin).expect("binary");
        assert!(bytes.starts_with(b"\x89VMAT"), "{name}: binary");
        // The same records, value for value.
        let back_text = std::fs::read_to_string(&back).expect("NDJSON");
        assert_eq!(
            json_lines(&back_text),
            recorded_values(name),
            "{name}: every record kept"
        );
        // Replay and report read the binary file as they read the NDJSON.
        for args in [&["replay", "--json"][..], &["report", "--json"][..]] {
            // Whole records compared as written (JSON values).
            let of = |path: &Path| {
                let o = run_ok("replay", Command::new(vmatrace()).args(args).arg(path));
                // Without the times of the replay itself (meta's, the findings').
                json_lines(&String::from_utf8_lossy(&o.stdout))
                    .into_iter()
                    .filter(|r| r["type"] != "meta")
                    .map(|mut r| {
                        if r["type"] == "finding"
                            && let Some(m) = r.as_object_mut()
                        {
                            m.remove("ts_ns");
                        }
                        r
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(of(&bin), of(&data(name)), "{name}: {args:?} alike");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #15: replay writes the snapshots the live run wrote, each where the live run wrote
/// it: the seed of each process (launched, followed child), the map after each exec, and the
/// last map at each exit. Compared, in order, as (pid, reason, VMA count, reserved bytes).
#[test]
fn replay_writes_the_seed_exec_and_exit_snapshots_the_live_run_wrote() {
    let key = |s: &SnapshotJson| {
        let vmas = s.vmas.as_deref().unwrap_or_default();
        let reserved: u64 = vmas.iter().map(|v| v.end - v.start).sum();
        (s.pid, s.reason.name().to_string(), vmas.len(), reserved)
    };
    let kept = |s: &&SnapshotJson| {
        matches!(
            s.reason,
            SnapshotReason::Seed | SnapshotReason::Exec | SnapshotReason::Exit
        )
    };
    for name in RECORDINGS {
        let live: Vec<_> = recorded(name)
            .iter()
            .filter_map(OutputRecord::snapshot)
            .filter(kept)
            .map(key)
            .collect();
        assert!(
            live.iter().any(|k| k.1 == "seed") && live.iter().any(|k| k.1 == "exec"),
            "{name}: the live run wrote seed and exec snapshots: {live:?}"
        );
        let text = vmatrace_on(&["replay", "--json"], name);
        let replayed: Vec<_> = typed_lines(&text)
            .iter()
            .filter_map(OutputRecord::snapshot)
            .filter(kept)
            .map(key)
            .collect();
        assert_eq!(replayed, live, "{name}");
    }
}
