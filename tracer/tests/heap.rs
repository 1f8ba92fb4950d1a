//! Privileged end-to-end tests of `--heap`: live bytes against glibc's own figures
//! (`mallinfo2`, `malloc_info`) at checkpoints where the workload has stopped itself, launched
//! and attached; jemalloc and tcmalloc preloaded; and the diagnosis: live data is not
//! fragmentation, pinned pages are, and every knob a finding suggests is applied and must
//! give back at least half of what the finding predicted.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Once, OnceLock},
};

use common::*;
use serde_json::Value;
use tracer::{
    finding::{Finding, Severity},
    heap::{
        call::HeapFn,
        regions::{HeapView, RegionKind, RegionRow},
    },
    output::{OutputRecord, process_records::SnapshotJson},
};

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
const TCMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";
/// glibc counts the chunks in its per-thread cache as in use, vmatrace as free (they were
/// freed): the comparisons with glibc's figures turn the cache off.
const NO_TCACHE: &str = "GLIBC_TUNABLES=glibc.malloc.tcache_count=0";

static BUILD: Once = Once::new();
static BUILD_CXX: Once = Once::new();

/// Builds `tests/c/{source}` with `compiler` and `flags` into `name` once per test run, in
/// the run's temporary directory (the target directory is read-only in the kernel matrix's
/// guests).
fn built(once: &Once, compiler: &str, flags: &[&str], source: &str, name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let bin = DIR.get_or_init(|| temp_path("workloads")).join(name);
    once.call_once(|| {
        std::fs::create_dir_all(bin.parent().expect("a directory")).expect("the directory");
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/c")
            .join(source);
        let status = Command::new(compiler)
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("{compiler} runs (the tests build their workloads with it): {e}")
            });
        assert!(status.success(), "building {} failed", src.display());
    });
    bin
}

/// The C workload (`tests/c/heap_workload.c`), built with gcc on first use.
fn heap_workload() -> PathBuf {
    built(
        &BUILD,
        "gcc",
        &["-O1", "-g", "-pthread"],
        "heap_workload.c",
        "heap_workload",
    )
}

/// The C++ workload (`tests/c/heap_cxx.cc`), built with g++ on first use: `-O1`, so without
/// frame pointers, as distributions build.
fn heap_cxx() -> PathBuf {
    built(&BUILD_CXX, "g++", &["-O1", "-g"], "heap_cxx.cc", "heap_cxx")
}

fn hw() -> String {
    heap_workload().to_string_lossy().into_owned()
}

/// A snapshot through SIGUSR1 of the stopped `pid`.
fn signal_snapshot(vmatrace_pid: u32, out: &Path, pid: u32) -> SnapshotJson {
    wait_until_stopped(pid, "the traced process to stop");
    signal_snapshot_typed(vmatrace_pid, out, pid)
}

/// The number `key` of a finding.
fn num(f: &Finding, key: &str) -> u64 {
    *f.numbers
        .get(key)
        .unwrap_or_else(|| panic!("no number '{key}' in {f:?}"))
}

/// The allocator view of a snapshot.
fn heap_of(snap: &SnapshotJson) -> &HeapView {
    snap.heap
        .as_ref()
        .unwrap_or_else(|| panic!("no heap view: {snap:?}"))
}

/// The live bytes of a heap region (it must have them).
fn region_live(r: &RegionRow) -> u64 {
    r.live_bytes
        .unwrap_or_else(|| panic!("no live bytes in {r:?}"))
}

fn within(actual: u64, expected: u64, percent: f64) -> bool {
    (actual as f64 - expected as f64).abs() <= expected as f64 * percent / 100.0
}

/// Per arena (`<heap nr=...>`), the bytes `malloc_info` counts in use: the arena's system
/// memory less its free chunks (fast bins, the other bins and the top).
fn malloc_info_in_use(xml: &str) -> Vec<u64> {
    let attr = |block: &str, tag: &str, name: &str| -> u64 {
        let at = block
            .find(tag)
            .unwrap_or_else(|| panic!("no {tag} in {block}"));
        let rest = &block[at..];
        let key = format!("{name}=\"");
        let start = rest.find(&key).expect("attribute") + key.len();
        rest[start..]
            .split('"')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a number")
    };
    xml.split("<heap nr=")
        .skip(1)
        .map(|h| {
            let h = h.split("</heap>").next().unwrap_or(h);
            attr(h, "<system type=\"current\"", "size")
                - attr(h, "<total type=\"fast\"", "size")
                - attr(h, "<total type=\"rest\"", "size")
        })
        .collect()
}

/// The glibc regions of a snapshot's heap view: (main heap, thread arenas sorted, mmapped).
fn glibc_regions(heap: &HeapView) -> (u64, Vec<u64>, u64) {
    let live = |kind: RegionKind| -> Vec<u64> {
        heap.regions
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.live_bytes.unwrap_or(0))
            .collect()
    };
    let mut arenas = live(RegionKind::GlibcArena);
    arenas.sort_unstable();
    (
        live(RegionKind::MainHeap).iter().sum(),
        arenas,
        live(RegionKind::MmappedBlocks).iter().sum(),
    )
}

/// Compares a checkpoint's snapshot with the workload's `checkpoint` line (mallinfo2 and
/// the malloc_info file): the live bytes, and per arena.
fn compare_checkpoint(line: &str, heap: &HeapView, baseline: u64) {
    let w: Vec<&str> = line.split_whitespace().collect();
    let (name, uordblks, hblkhd) = (
        w[1],
        w[2].parse::<u64>().expect("n"),
        w[3].parse::<u64>().expect("n"),
    );
    let glibc = uordblks + hblkhd - baseline;
    let live = heap.live_bytes;
    eprintln!(
        "checkpoint {name}: vmatrace {live} live bytes, glibc uordblks + hblkhd {glibc} ({:+.3} %)",
        (live as f64 - glibc as f64) * 100.0 / glibc as f64
    );
    assert!(
        within(live, glibc, 1.0),
        "checkpoint {name}: vmatrace {live} live bytes, glibc {glibc}"
    );
    if baseline > 0 {
        return;
    }
    let xml = std::fs::read_to_string(w[5]).expect("the malloc_info file");
    let mut info = malloc_info_in_use(&xml);
    let main = info.remove(0);
    info.sort_unstable();
    let (ours_main, ours_arenas, ours_mmapped) = glibc_regions(heap);
    eprintln!(
        "checkpoint {name}: main heap {ours_main} / {main}, arenas {ours_arenas:?} / {info:?}, mmapped {ours_mmapped} / {hblkhd}"
    );
    assert!(
        within(ours_main, main, 1.0),
        "checkpoint {name}: main heap {ours_main} / {main}"
    );
    assert_eq!(ours_arenas.len(), info.len(), "checkpoint {name}: arenas");
    for (ours, theirs) in ours_arenas.iter().zip(&info) {
        assert!(
            within(*ours, *theirs, 1.0),
            "checkpoint {name}: arena {ours} / {theirs}"
        );
    }
    assert!(
        within(ours_mmapped, hblkhd, 1.0),
        "checkpoint {name}: mmapped {ours_mmapped} / {hblkhd}"
    );
}

#[test]
fn live_bytes_match_glibcs_own_figures_at_every_checkpoint() {
    if !privileged("live_bytes_match_glibcs_own_figures_at_every_checkpoint") {
        return;
    }
    let out = temp_path("heap-checkpoints.ndjson");
    let prefix = temp_path("heap-checkpoints-info");
    let w = hw();
    let (o, p) = (out.to_string_lossy(), prefix.to_string_lossy());
    // Through `env`, which execs the workload: the probes follow the exec.
    let mut v = spawn(&[
        "--json",
        "-o",
        &o,
        "--heap",
        "--",
        "env",
        NO_TCACHE,
        &w,
        "checkpoints",
        &p,
    ]);
    let vmatrace_pid = v.child.id();
    let mut pid = 0u32;
    let mut seen = Vec::new();
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("pid ") {
            pid = rest.trim().parse().expect("pid");
        }
        if !line.starts_with("checkpoint ") {
            continue;
        }
        let snap = signal_snapshot(vmatrace_pid, &out, pid);
        let heap = heap_of(&snap);
        assert!(heap.complete, "{heap:?}");
        compare_checkpoint(&line, heap, 0);
        seen.push(
            line.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string(),
        );
        kill(pid, libc::SIGCONT);
    }
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    assert_eq!(seen, ["allocated", "freed", "threads", "joined"]);
    // Every glibc function of the workload was seen, and replay rebuilds the same live bytes.
    let recs = typed_records(&out);
    let heap_in = |recs: &[OutputRecord]| {
        last_summary(recs)
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .expect("the workload in the summary")
            .heap
            .clone()
    };
    let heap = heap_in(&recs).expect("the workload's heap view");
    for call in [
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "free",
        "posix_memalign",
        "memalign",
        "valloc",
        "pvalloc",
    ] {
        assert!(
            heap.calls.get(call).copied().unwrap_or(0) > 0,
            "no {call}: {:?}",
            heap.calls
        );
    }
    let r = Command::new(vmatrace())
        .args(["replay", "--json"])
        .arg(&out)
        .output()
        .expect("replay runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let replayed: Value = String::from_utf8_lossy(&r.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a replayed summary");
    let again = heap_in(&typed(&[replayed]));
    assert_eq!(again, Some(heap), "replay rebuilds the same allocator view");
}

#[test]
fn attached_to_a_running_process_live_bytes_count_what_it_allocates_after() {
    if !privileged("attached_to_a_running_process_live_bytes_count_what_it_allocates_after") {
        return;
    }
    let prefix = temp_path("heap-attach-info");
    let mut child = Command::new("env")
        .args([NO_TCACHE, &hw(), "attach"])
        .arg(&prefix)
        .stdout(Stdio::piped())
        .spawn()
        .expect("workload starts");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().expect("stdout"),
    ));
    let child = KillOnDrop(child);
    let pid = child.0.id();
    let mut baseline = 0;
    for line in lines.by_ref() {
        let line = line.expect("a line");
        if let Some(rest) = line.strip_prefix("baseline ") {
            baseline = rest
                .split_whitespace()
                .map(|w| w.parse::<u64>().expect("n"))
                .sum();
            break;
        }
    }
    wait_until_stopped(pid, "the workload to stop before the attach");
    let out = temp_path("heap-attach.ndjson");
    let o = out.to_string_lossy().into_owned();
    let p = pid.to_string();
    let mut v = spawn(&["--json", "-o", &o, "--heap", "-p", &p]);
    wait_for(30, "the probes to be attached", || {
        complete_typed_records(&out)
            .iter()
            .any(|r| matches!(r, OutputRecord::HeapAttach(a) if a.pid == pid))
    });
    kill(pid, libc::SIGCONT);
    for line in lines.by_ref() {
        let line = line.expect("a line");
        if line.starts_with("checkpoint ") {
            let snap = signal_snapshot(v.child.id(), &out, pid);
            let heap = heap_of(&snap);
            assert!(!heap.complete, "an attached run knows it is not: {heap:?}");
            compare_checkpoint(&line, heap, baseline);
            kill(pid, libc::SIGCONT);
        }
    }
    drop(child);
    let _ = v.child.wait();
}

/// The call site of the workload's allocations as the report names it: the `malloc` call in
/// its `xmalloc` (function and line, from the workload's source).
fn xmalloc_site() -> String {
    let src = include_str!("c/heap_workload.c");
    let line = src
        .lines()
        .position(|l| l.contains("void *p = malloc(n);"))
        .expect("xmalloc's malloc call")
        + 1;
    format!("xmalloc (heap_workload.c:{line})")
}

/// Records the workload (`env` then `args`) with `--heap`; returns the findings of
/// `vmatrace report --json` and the workload's last line.
fn heap_report(name: &str, env: &[&str], args: &[&str]) -> (Vec<Finding>, String) {
    report_of(name, &["--heap"], env, args)
}

/// Records the workload with `flags`; returns the findings and the workload's last line.
fn report_of(name: &str, flags: &[&str], env: &[&str], args: &[&str]) -> (Vec<Finding>, String) {
    let mut cmd = vec!["env"];
    cmd.extend_from_slice(env);
    let hw = hw();
    cmd.push(&hw);
    cmd.extend_from_slice(args);
    let (o, file) = record(name, flags, &cmd);
    let findings = report_findings_typed(name, &file);
    let last = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    (findings, last)
}

/// Runs the workload untraced; returns the resident bytes it reported at its end.
fn rss(env: &[&str], args: &[&str]) -> u64 {
    let o = Command::new("env")
        .args(env)
        .arg(hw())
        .args(args)
        .output()
        .expect("workload runs");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let kib: u64 = text
        .split_whitespace()
        .skip_while(|w| *w != "rss")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rss in {text}"));
    kib * 1024
}

/// The number after `key` in a workload line.
fn value(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The findings of `vmatrace report --json`'s output.
fn findings_from(stdout: &[u8]) -> Vec<Finding> {
    let values: Vec<Value> = String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    findings_of(&typed(&values)).into_iter().cloned().collect()
}

/// The CPython arenas region of a snapshot's heap view.
fn pymalloc_region(snap: &SnapshotJson) -> &RegionRow {
    let heap = heap_of(snap);
    heap.regions
        .iter()
        .find(|r| r.kind == RegionKind::PymallocArenas)
        .unwrap_or_else(|| panic!("no pymalloc region: {heap:?}"))
}

fn find<'a>(findings: &'a [Finding], id: &str) -> Option<&'a Finding> {
    findings.iter().find(|f| f.id == id)
}

const KNOBS: [&str; 4] = [
    "malloc_trim",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "dirty_decay_ms",
];

fn suggestion(f: &Finding) -> &str {
    f.suggestion.as_deref().unwrap_or("")
}

/// Applying a suggested knob (the workload run untraced with and without it) must give back
/// at least half of what the finding predicted.
fn assert_knob_gives_back(what: &str, predicted: u64, before: u64, after: u64) {
    let fell = before.saturating_sub(after);
    eprintln!(
        "{what}: predicted {} MiB back, RSS fell {} MiB ({before} -> {after} bytes)",
        predicted >> 20,
        fell >> 20
    );
    assert!(predicted > 0, "{what}: nothing predicted");
    assert!(
        fell * 2 >= predicted,
        "{what}: predicted {predicted} bytes back, RSS fell by {fell} ({before} -> {after})"
    );
}

#[test]
fn live_data_is_reported_as_live_not_as_fragmentation() {
    if !privileged("live_data_is_reported_as_live_not_as_fragmentation") {
        return;
    }
    let (f, line) = heap_report("live", &[], &["live", "64"]);
    assert!(find(&f, "heap_fragmentation").is_none(), "{f:#?}");
    let live = find(&f, "live").expect("a live finding");
    assert!(
        within(num(live, "live_bytes"), value(&line, "live"), 2.0),
        "{live:?}"
    );
    assert!(
        live.explanation.contains(&xmalloc_site()),
        "the call site holding the live bytes is named, function and line: {live:?}"
    );
    let heap = find(&f, "heap").expect("the heap finding");
    assert_eq!(heap.severity, Severity::Info, "{heap:?}");
    assert!(
        !f.iter()
            .any(|x| KNOBS.iter().any(|k| suggestion(x).contains(k))),
        "no setting suggested for live data: {f:#?}"
    );
}

/// Runs the C++ workload with `args` under `--heap` (and `extra` options), letting it go on
/// past its first megabyte once vmatrace has written those calls; returns its pid, its `live`
/// line and the recording.
fn run_cxx(name: &str, extra: &[&str], args: &[&str]) -> (u32, String, PathBuf) {
    // Every block comes through libstdc++'s `operator new`, built without frame pointers:
    // the site is found by unwinding the entry's stack words through it.
    let bin = heap_cxx();
    let file = temp_path(name);
    let out = file.to_string_lossy().into_owned();
    let mut argv = vec!["--json", "-o", &out, "--heap"];
    argv.extend_from_slice(extra);
    argv.push("--");
    argv.push(bin.to_str().expect("utf-8"));
    argv.extend_from_slice(args);
    let mut v = spawn(&argv);
    let (mut pid, mut live_line) = (0u32, String::new());
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("pid ") {
            pid = rest.trim().parse().expect("pid");
        }
        if line.starts_with("live ") {
            live_line = line.clone();
        }
        if line.starts_with("checkpoint ") {
            // Once vmatrace has written the first megabyte's calls, it has named the wrapper
            // to the programs (before writing them).
            wait_until_stopped(pid, "the workload to stop");
            wait_for(120, "the first calls written", || {
                complete_typed_records(&file)
                    .iter()
                    .filter(|r| matches!(r, OutputRecord::Heap(h) if h.pid == pid))
                    .count()
                    >= 256
            });
            kill(pid, libc::SIGCONT);
        }
    }
    assert!(v.child.wait().expect("vmatrace exits").success());
    (pid, live_line, file)
}

#[test]
fn cxx_blocks_from_new_are_charged_to_the_code_that_called_new() {
    if !privileged("cxx_blocks_from_new_are_charged_to_the_code_that_called_new") {
        return;
    }
    let (_, live_line, file) = run_cxx("cxx.ndjson", &[], &["32"]);
    let f = report_findings_typed("cxx", &file);
    let live = find(&f, "live").expect("a live finding");
    assert!(
        within(num(live, "live_bytes"), value(&live_line, "live"), 2.0),
        "{live:?} vs {live_line}"
    );
    let src = include_str!("c/heap_cxx.cc");
    let line = src
        .lines()
        .position(|l| l.contains("Record *r = new Record;"))
        .expect("the new in keep_records")
        + 1;
    let site = format!("keep_records (heap_cxx.cc:{line})");
    assert!(
        live.explanation
            .contains(&format!("Held most by the blocks from {site} (8192 blocks")),
        "the live bytes are charged to {site}, not to operator new: {live:?}"
    );
    // Only the first megabyte's blocks (256), before vmatrace was told of the wrapper, may
    // still be charged to it.
    if let Some((_, after)) = live.explanation.split_once("operator new(unsigned long) (") {
        let blocks: u64 = after
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a block count");
        assert!(blocks <= 256, "{live:?}");
    }
    // The recording's stack for that site goes through operator new to the program's code.
    let records = typed_records(&file);
    let through_new = records.iter().any(|r| {
        matches!(r, OutputRecord::Stack(s)
            if s.record.frames.iter().any(|f| f.function.as_deref() == Some("operator new(unsigned long)"))
                && s.record.frames.iter().any(|f| f.function.as_deref() == Some("keep_records")))
    });
    assert!(
        through_new,
        "a stack record from malloc through operator new to keep_records"
    );
}

#[test]
fn a_tight_new_loop_keeps_every_calls_stack_words() {
    if !privileged("a_tight_new_loop_keeps_every_calls_stack_words") {
        return;
    }
    // 100,000 rounds of new + delete in a tight loop: each call's words are written at once,
    // its entry when the CPU's batch is; none may lose its words and stay charged to
    // operator new (a thread's words piled up past their bound when they waited for the
    // reorder too), but for those the kernel dropped on a full ring. Not in the kernel
    // matrix: under emulation the loop takes longer than a guest's whole time.
    let (pid, _, file) = run_cxx(
        "cxx-churn.ndjson",
        // The burst (about 50 MB of records) waits whole for the test build's reader.
        &["--ring-size", "128M"],
        &["1", "churn", "100000"],
    );
    let records = typed_records(&file);
    let one_frame_new: std::collections::HashSet<u64> = records
        .iter()
        .filter_map(|r| match r {
            OutputRecord::Stack(s)
                if s.record.frames.len() == 1
                    && s.record.frames[0]
                        .function
                        .as_deref()
                        .is_some_and(|f| f.starts_with("operator new")) =>
            {
                Some(s.record.id)
            }
            _ => None,
        })
        .collect();
    let mallocs = |charged_to_new: bool| {
        records
            .iter()
            .filter(|r| {
                matches!(r, OutputRecord::Heap(h) if h.pid == pid && h.call == HeapFn::Malloc
                    && h.stack.is_some_and(|id| one_frame_new.contains(&id)) == charged_to_new)
            })
            .count()
    };
    let lost = &summary(&records).lost;
    let lost_stacks = lost.lost_stack;
    assert!(
        mallocs(false) as u64 + lost.lost_heap >= 100_000,
        "{} calls past the wrapper, {lost:?}",
        mallocs(false)
    );
    assert!(
        // The first megabyte's 256 records and their vector, before the wrapper was named.
        mallocs(true) as u64 <= 257 + lost_stacks,
        "{} calls charged to operator new ({lost_stacks} stacks dropped in the kernel)",
        mallocs(true)
    );
}

#[test]
fn pages_pinned_by_live_blocks_are_fragmentation_that_no_setting_gives_back() {
    if !privileged("pages_pinned_by_live_blocks_are_fragmentation_that_no_setting_gives_back") {
        return;
    }
    let (f, line) = heap_report("pinned", &[NO_TCACHE], &["pinned", "32"]);
    let frag = find(&f, "heap_fragmentation").expect("a fragmentation finding");
    assert_eq!(frag.severity, Severity::Warning);
    let retained = num(frag, "retained_bytes");
    let expected = value(&line, "retained");
    eprintln!("pinned: vmatrace {retained} retained bytes, the workload {expected}");
    assert!(within(retained, expected, 5.0), "{frag:?}");
    assert!(
        frag.explanation.contains(&xmalloc_site()),
        "the call site that pins them is named, function and line: {frag:?}"
    );
    for k in KNOBS {
        assert!(
            !suggestion(frag).contains(k),
            "{k} would not help: {frag:?}"
        );
    }
    // And indeed: malloc_trim(0) gives back next to nothing.
    let before = rss(&[NO_TCACHE], &["pinned", "32"]);
    let after = rss(&[NO_TCACHE], &["pinned", "32", "trim"]);
    assert!(
        before.saturating_sub(after) * 10 < retained,
        "malloc_trim gave back {} of {retained}",
        before.saturating_sub(after)
    );
}

#[test]
fn malloc_trim_suggested_for_free_pages_below_a_live_block_gives_them_back() {
    if !privileged("malloc_trim_suggested_for_free_pages_below_a_live_block_gives_them_back") {
        return;
    }
    let (f, _) = heap_report("trimmable", &[], &["trimmable", "64"]);
    let frag = find(&f, "heap_fragmentation").expect("a fragmentation finding");
    assert!(suggestion(frag).contains("malloc_trim(0)"), "{frag:?}");
    // The free memory is below a live block, not in the heap's top: no trim threshold helps.
    assert!(
        !suggestion(frag).contains("MALLOC_TRIM_THRESHOLD_"),
        "{frag:?}"
    );
    let predicted = num(frag, "malloc_trim_saves_bytes");
    assert_knob_gives_back(
        "malloc_trim(0)",
        predicted,
        rss(&[], &["trimmable", "64"]),
        rss(&[], &["trimmable", "64", "trim"]),
    );
    let threshold = rss(&["MALLOC_TRIM_THRESHOLD_=131072"], &["trimmable", "64"]);
    assert!(
        rss(&[], &["trimmable", "64"]).saturating_sub(threshold) * 10 < predicted,
        "the threshold, not suggested, does not help either"
    );
}

#[test]
fn a_free_heap_top_kept_by_a_raised_threshold_is_given_back_by_both_suggestions() {
    if !privileged("a_free_heap_top_kept_by_a_raised_threshold_is_given_back_by_both_suggestions") {
        return;
    }
    let (f, _) = heap_report("top", &[], &["top", "48"]);
    let frag = find(&f, "heap_fragmentation").expect("a fragmentation finding");
    let s = suggestion(frag);
    assert!(
        s.contains("MALLOC_TRIM_THRESHOLD_=131072") && s.contains("malloc_trim(0)"),
        "{frag:?}"
    );
    let before = rss(&[], &["top", "48"]);
    assert_knob_gives_back(
        "MALLOC_TRIM_THRESHOLD_",
        num(frag, "trim_threshold_saves_bytes"),
        before,
        rss(&["MALLOC_TRIM_THRESHOLD_=131072"], &["top", "48"]),
    );
    assert_knob_gives_back(
        "malloc_trim(0)",
        num(frag, "malloc_trim_saves_bytes"),
        before,
        rss(&[], &["top", "48", "trim"]),
    );
}

#[test]
fn free_memory_kept_by_thread_arenas_is_given_back_by_each_suggestion() {
    if !privileged("free_memory_kept_by_thread_arenas_is_given_back_by_each_suggestion") {
        return;
    }
    let (f, _) = heap_report("arenas", &[], &["arenas", "16", "4"]);
    let frag = find(&f, "heap_fragmentation").expect("a fragmentation finding");
    let s = suggestion(frag);
    assert!(
        s.contains("MALLOC_ARENA_MAX=1") && s.contains("malloc_trim(0)"),
        "{frag:?}"
    );
    let before = rss(&[], &["arenas", "16", "4"]);
    assert_knob_gives_back(
        "MALLOC_ARENA_MAX=1",
        num(frag, "arena_max_saves_bytes"),
        before,
        rss(&["MALLOC_ARENA_MAX=1"], &["arenas", "16", "4"]),
    );
    assert_knob_gives_back(
        "malloc_trim(0)",
        num(frag, "malloc_trim_saves_bytes"),
        before,
        rss(&[], &["arenas", "16", "4", "trim"]),
    );
    let arenas = find(&f, "arenas").expect("the arenas finding");
    assert_eq!(num(arenas, "arenas"), 4, "{arenas:?}");
}

fn preload(lib: &str) -> String {
    assert!(
        Path::new(lib).exists(),
        "{lib} is missing: `cargo xtask setup` installs Debian's libjemalloc2 and libtcmalloc-minimal4"
    );
    format!("LD_PRELOAD={lib}")
}

#[test]
fn jemalloc_decay_suggested_for_its_dirty_pages_gives_them_back() {
    if !privileged("jemalloc_decay_suggested_for_its_dirty_pages_gives_them_back") {
        return;
    }
    let p = preload(JEMALLOC);
    let (f, _) = heap_report("decay", &[&p], &["decay", "64"]);
    let frag = find(&f, "heap_fragmentation").expect("a fragmentation finding");
    assert!(suggestion(frag).contains("dirty_decay_ms:0"), "{frag:?}");
    for k in ["malloc_trim", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"] {
        assert!(!suggestion(frag).contains(k), "{k} is glibc's: {frag:?}");
    }
    assert_knob_gives_back(
        "dirty_decay_ms:0",
        num(frag, "jemalloc_decay_saves_bytes"),
        rss(&[&p], &["decay", "64"]),
        rss(
            &[&p, "MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0"],
            &["decay", "64"],
        ),
    );
}

#[test]
fn jemalloc_and_tcmalloc_live_bytes_are_what_the_workload_holds() {
    if !privileged("jemalloc_and_tcmalloc_live_bytes_are_what_the_workload_holds") {
        return;
    }
    for (lib, name) in [(JEMALLOC, "jemalloc"), (TCMALLOC, "tcmalloc")] {
        let p = preload(lib);
        let (f, line) = heap_report(name, &[&p], &["hold", "32"]);
        let live = find(&f, "live").expect("a live finding");
        let ours = num(live, "live_bytes");
        let held = value(&line, "hold");
        eprintln!("{name}: vmatrace {ours} live bytes, the workload holds {held}");
        assert!(within(ours, held, 1.0), "{name}: {live:?}");
        assert!(
            live.explanation.contains(name),
            "{name} serves the calls: {live:?}"
        );
    }
}

#[test]
fn a_heap_that_grew_and_shrank_is_told_apart_from_one_that_never_shrank() {
    if !privileged("a_heap_that_grew_and_shrank_is_told_apart_from_one_that_never_shrank") {
        return;
    }
    for flags in [&[][..], &["--heap"][..]] {
        // 24 MiB kept: the heap grows and is never given back, at a size that costs little.
        let (f, _) = report_of("kept", flags, &[], &["live", "24"]);
        let heap = find(&f, "heap").expect("the heap finding");
        let (title, text) = (heap.title.as_str(), heap.explanation.as_str());
        assert!(title.contains("trimmed 0 times"), "{flags:?}: {heap:?}");
        assert!(
            !text.contains("shrank") && !text.contains("given back to the kernel"),
            "{flags:?}: {heap:?}"
        );
        assert_eq!(num(heap, "brk_shrinks"), 0);
        if flags.is_empty() {
            assert!(
                text.contains("Run with --heap"),
                "an estimate says so: {heap:?}"
            );
        } else {
            assert!(text.contains("is live data"), "{heap:?}");
        }
        // 24 MiB freed from the top: glibc gives the heap back as it shrinks.
        let (f, line) = report_of("shrank", flags, &[], &["grow_shrink", "24"]);
        let heap = find(&f, "heap").expect("the heap finding");
        let shrinks = num(heap, "brk_shrinks");
        assert!(shrinks > 0, "{heap:?}");
        let title = heap.title.as_str();
        assert!(
            title.contains(&format!("trimmed {shrinks} times")),
            "{heap:?}"
        );
        assert_eq!(heap.severity, Severity::Info, "{heap:?}");
        assert!(
            value(&line, "rss") * 4 < value(&line, "high"),
            "the workload's RSS fell as it shrank: {line}"
        );
        assert!(find(&f, "heap_fragmentation").is_none(), "{f:#?}");
    }
}

#[test]
fn children_followed_with_f_have_their_own_live_bytes() {
    if !privileged("children_followed_with_f_have_their_own_live_bytes") {
        return;
    }
    let out = temp_path("heap-follow.ndjson");
    let script = format!("{w} live 8; {w} live 16", w = hw());
    let o = Command::new(vmatrace())
        .args(["record", "--heap", "-f", "-o"])
        .arg(&out)
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("vmatrace runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let mut held: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("live "))
        .map(|l| value(l, "live"))
        .collect();
    let recs = typed_records(&out);
    let summary = last_summary(&recs);
    let mut ours: Vec<u64> = summary
        .processes
        .iter()
        .filter(|p| {
            p.exe
                .as_deref()
                .is_some_and(|e| e.ends_with("heap_workload"))
        })
        .map(|p| p.heap.as_ref().expect("a heap view").live_bytes)
        .collect();
    held.sort_unstable();
    ours.sort_unstable();
    eprintln!("children: vmatrace {ours:?} live bytes, the workloads {held:?}");
    assert_eq!(ours.len(), 2, "{summary:?}");
    for (o, h) in ours.iter().zip(&held) {
        assert!(within(*o, *h, 1.0), "{ours:?} / {held:?}");
    }
}

/// A CPython program that fills its object arenas with small strings and frees all but one in
/// a hundred: every pool keeps a few, so no arena can be given back. Writes CPython's own
/// statistics (`sys._debugmallocstats`) to the file in argv[1], says "ready" and stops.
const PYMALLOC_FRAGMENTED: &str = r#"
import os, signal, sys
print("pid", os.getpid(), flush=True)
x = [str(i) * 3 for i in range(1_500_000)]
keep = x[::100]
del x
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
saved = os.dup(2)
os.dup2(fd, 2)
sys._debugmallocstats()
os.dup2(saved, 2)
print("ready", len(keep), flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"#;

/// A number after `key` in `_debugmallocstats`'s output (`# bytes in allocated blocks = 1,234`).
fn mallocstat(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.rsplit('=').next())
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in {text}"))
}

#[test]
fn pymalloc_fragmentation_is_found_in_cpythons_object_arenas() {
    if !privileged("pymalloc_fragmentation_is_found_in_cpythons_object_arenas") {
        return;
    }
    let out = temp_path("heap-pymalloc.ndjson");
    let stats = temp_path("heap-pymalloc-stats.txt");
    let (o, s) = (out.to_string_lossy(), stats.to_string_lossy());
    let mut v = spawn(&[
        "--json",
        "-o",
        &o,
        "--heap",
        "--",
        "python3",
        "-c",
        PYMALLOC_FRAGMENTED,
        &s,
    ]);
    let mut pid = 0u32;
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("pid ") {
            pid = rest.trim().parse().expect("pid");
        }
        if line.starts_with("ready") {
            break;
        }
    }
    let snap = signal_snapshot(v.child.id(), &out, pid);
    let text = std::fs::read_to_string(&stats).expect("the statistics file");
    let allocated = mallocstat(&text, "# bytes in allocated blocks");
    let region = pymalloc_region(&snap);
    let live = region_live(region);
    eprintln!(
        "pymalloc: vmatrace {live} live bytes in {} arenas, CPython {allocated} bytes in allocated blocks; {} touched",
        region.mappings, region.touched_bytes
    );
    assert!(within(live, allocated, 1.0), "{region:?}");
    assert_eq!(
        region.mappings,
        mallocstat(&text, "# arenas allocated current"),
        "{region:?}"
    );
    // Tracing ends while the program still runs (as with -p on a server): the findings see
    // its arenas as they are.
    kill(v.child.id(), libc::SIGINT);
    let status = v.child.wait().expect("vmatrace exits");
    kill(pid, libc::SIGKILL);
    assert!(status.success(), "{status:?}");
    let r = Command::new(vmatrace())
        .args(["report", "--json"])
        .arg(&out)
        .output()
        .expect("report runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let findings = findings_from(&r.stdout);
    let frag = find(&findings, "heap_fragmentation").expect("a fragmentation finding");
    let text = frag.explanation.as_str();
    assert!(text.contains("CPython object arenas"), "{frag:?}");
    let retained = num(frag, "retained_bytes");
    let touched = region.touched_bytes;
    assert!(
        within(retained, touched - live, 5.0),
        "retained {retained}, touched {touched} - live {live}: {frag:?}"
    );
    for k in KNOBS {
        assert!(
            !suggestion(frag).contains(k),
            "{k} does not act on pymalloc: {frag:?}"
        );
    }
}

#[test]
fn pymalloc_arenas_of_a_running_process_are_found_by_their_pools_with_p() {
    if !privileged("pymalloc_arenas_of_a_running_process_are_found_by_their_pools_with_p") {
        return;
    }
    let stats = temp_path("heap-pymalloc-p-stats.txt");
    let mut child = Command::new("python3")
        .args(["-c", PYMALLOC_FRAGMENTED])
        .arg(&stats)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().expect("stdout"),
    ));
    let child = KillOnDrop(child);
    let pid = child.0.id();
    for line in lines.by_ref() {
        if line.expect("a line").starts_with("ready") {
            break;
        }
    }
    wait_until_stopped(pid, "python to stop itself");
    // Every arena was mapped before vmatrace came.
    let out = temp_path("heap-pymalloc-p.ndjson");
    let o = out.to_string_lossy().into_owned();
    let p = pid.to_string();
    let mut v = spawn(&["--json", "-o", &o, "--heap", "-p", &p]);
    wait_for(30, "the probes to be attached", || {
        complete_typed_records(&out)
            .iter()
            .any(|r| matches!(r, OutputRecord::HeapAttach(a) if a.pid == pid))
    });
    let snap = signal_snapshot(v.child.id(), &out, pid);
    let text = std::fs::read_to_string(&stats).expect("the statistics file");
    let allocated = mallocstat(&text, "# bytes in allocated blocks");
    let region = pymalloc_region(&snap);
    let live = region_live(region);
    eprintln!(
        "pymalloc -p: vmatrace {live} live bytes in {} arenas, CPython {allocated} bytes in allocated blocks",
        region.mappings
    );
    assert!(within(live, allocated, 1.0), "{region:?}");
    assert_eq!(
        region.mappings,
        mallocstat(&text, "# arenas allocated current"),
        "{region:?}"
    );
    kill(v.child.id(), libc::SIGINT);
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "{status:?}");
    drop(child);
    let r = Command::new(vmatrace())
        .args(["report", "--json"])
        .arg(&out)
        .output()
        .expect("report runs");
    let findings = findings_from(&r.stdout);
    let frag = find(&findings, "heap_fragmentation").expect("a fragmentation finding");
    assert!(
        frag.explanation.contains("CPython object arenas"),
        "{frag:?}"
    );
    for k in KNOBS {
        assert!(!suggestion(frag).contains(k), "{k}: {frag:?}");
    }
}

/// Issue #21: the live view shows the allocator's calls, rolled up per process and second
/// (`allocator: 5,000 allocated, 4,936 freed, live 40 KiB (+2 KiB)`): a program making 5,000
/// `malloc` and `free` pairs shows at least those, and ends with what it still holds.
#[test]
fn the_live_view_rolls_up_allocator_calls_per_second() {
    if !privileged("the_live_view_rolls_up_allocator_calls_per_second") {
        return;
    }
    let iters: u64 = 5000;
    let out = temp_path("heap-live-view.txt");
    let o = Command::new(vmatrace())
        .args(["--heap", "--force", "-o"])
        .arg(&out)
        .arg("--")
        .arg(workload())
        .args(["malloc-calls", &iters.to_string()])
        .output()
        .expect("vmatrace runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).expect("the view");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("] allocator: "))
        .collect();
    assert!(!lines.is_empty(), "allocator lines:\n{text}");
    let count = |what: &str| -> u64 {
        lines
            .iter()
            .flat_map(|l| l.split(", "))
            .filter_map(|part| {
                let part = part.rsplit(": ").next()?;
                let (n, kind) = part.split_once(' ')?;
                (kind == what).then(|| n.replace(',', "").parse::<u64>().ok())?
            })
            .sum()
    };
    // free(NULL) of the 64 empty slots frees nothing; the last 64 blocks are freed at the end.
    assert!(count("allocated") >= iters, "{lines:#?}");
    assert!(count("freed") >= iters, "{lines:#?}");
    let last = lines.last().expect("a line");
    assert!(last.contains("live "), "{last}");
}
