//! Privileged end-to-end tests of the fragmentation report: real workloads that exhibit each
//! pathology are recorded, `vmatrace report` names it with numbers that match what the
//! workload did, and a healthy workload gets no warning.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use serde_json::Value;
use tracer::{
    finding::{Finding, Severity},
    output::OutputRecord,
};

const MIB: u64 = 1 << 20;
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// Records `cmd` and returns the findings of `vmatrace report --json`.
fn report(name: &str, cmd: &[&str]) -> Vec<Finding> {
    let (_, file) = record(name, &[], cmd);
    report_findings_typed(name, &file)
}

fn warning<'a>(findings: &'a [Finding], id: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.id == id && f.severity == Severity::Warning)
        .unwrap_or_else(|| panic!("no '{id}' warning in {findings:#?}"))
}

fn n(f: &Finding, key: &str) -> u64 {
    *f.numbers
        .get(key)
        .unwrap_or_else(|| panic!("no number '{key}' in {f:?}"))
}

fn within(actual: u64, expected: u64, percent: u64) -> bool {
    actual.abs_diff(expected) * 100 <= expected * percent
}

#[test]
fn glibc_arenas_of_a_multithreaded_program_are_named() {
    if !privileged("glibc_arenas_of_a_multithreaded_program_are_named") {
        return;
    }
    let w = workload();
    // 4 threads, each keeping 8 MiB of 4 KB blocks: one arena each.
    let f = report("arenas", &[w.to_str().expect("utf-8"), "arenas", "4", "8"]);
    let a = warning(&f, "arenas");
    assert_eq!(n(a, "arenas"), 4, "{a:?}");
    // 8 MiB of 4000-byte blocks (plus headers) per arena.
    assert!(within(n(a, "touched_bytes"), 4 * 8 * MIB, 10), "{a:?}");
    assert!(
        a.suggestion
            .as_deref()
            .is_some_and(|s| s.contains("MALLOC_ARENA_MAX"))
    );
    // Each arena's first touches come from one worker thread.
    let text = &a.explanation;
    assert_eq!(
        text.matches("first touches by threads").count(),
        4,
        "{text}"
    );
}

#[test]
fn a_heap_freed_but_not_trimmed_is_named() {
    if !privileged("a_heap_freed_but_not_trimmed_is_named") {
        return;
    }
    let w = workload();
    let f = report("heap", &[w.to_str().expect("utf-8"), "heap-retained", "64"]);
    let h = warning(&f, "heap");
    assert!(within(n(h, "high_water_bytes"), 64 * MIB, 5), "{h:?}");
    assert_eq!(n(h, "current_bytes"), n(h, "high_water_bytes"));
    assert!(within(n(h, "touched_bytes"), 64 * MIB, 5), "{h:?}");
    assert_eq!(n(h, "brk_shrinks"), 0);
    assert!(
        h.suggestion
            .as_deref()
            .is_some_and(|s| s.contains("malloc_trim"))
    );
}

#[test]
fn mmap_threshold_churn_is_named_with_its_size_and_count() {
    if !privileged("mmap_threshold_churn_is_named_with_its_size_and_count") {
        return;
    }
    let w = workload();
    let f = report(
        "churn",
        &[w.to_str().expect("utf-8"), "mmap-churn", "500", "512"],
    );
    let c = warning(&f, "mmap_churn");
    assert_eq!(n(c, "pairs"), 500, "{c:?}");
    // 512 KiB plus malloc's header, page-rounded.
    assert_eq!(n(c, "size_bytes"), 512 * 1024 + 4096, "{c:?}");
    // Every pair faults its 512 KiB in again.
    assert!(n(c, "refaulted_bytes") >= 500 * 512 * 1024, "{c:?}");
    assert!(
        c.suggestion
            .as_deref()
            .is_some_and(|s| s.contains("M_MMAP_THRESHOLD"))
    );
    // With --heap (no stacks), every one of these mappings is seen made inside a malloc call.
    let (_, file) = record(
        "churn-heap",
        &["--heap"],
        &[w.to_str().expect("utf-8"), "mmap-churn", "500", "512"],
    );
    let f = report_findings_typed("churn-heap", &file);
    let c = warning(&f, "mmap_churn");
    assert_eq!(n(c, "in_allocator_calls"), n(c, "pairs"), "{c:?}");
    assert!(c.explanation.contains("inside allocator calls"), "{c:?}");
    assert!(
        c.suggestion
            .as_deref()
            .is_some_and(|s| s.contains("M_MMAP_THRESHOLD")),
        "{c:?}"
    );
}

/// CPython maps its object arenas (1 MiB from 3.10) itself, not through malloc: with --heap
/// and no stacks the churn is named as CPython's arenas (no allocator call made them, and
/// the process runs a CPython of that arena size), PYTHONMALLOC=malloc is suggested, and
/// malloc's mmap threshold, which would change nothing, is not.
#[test]
fn pythons_own_arena_churn_gets_no_malloc_threshold_advice() {
    if !privileged("pythons_own_arena_churn_gets_no_malloc_threshold_advice") {
        return;
    }
    let script = "for i in range(150):\n    d = [str(j) for j in range(60000)]\n    del d\n";
    let (_, file) = record("py-arenas", &["--heap"], &["python3", "-c", script]);
    let f = report_findings_typed("py-arenas", &file);
    let c = warning(&f, "mmap_churn");
    assert_eq!(n(c, "in_allocator_calls"), 0, "{c:?}");
    assert!(c.explanation.contains("CPython's object arenas"), "{c:?}");
    let suggestion = c.suggestion.as_deref().unwrap_or_default();
    assert!(
        suggestion.contains("PYTHONMALLOC=malloc") && !suggestion.contains("MALLOC_MMAP"),
        "{c:?}"
    );
}

/// With `--stacks` the same churn is named as CPython's arenas at the script's line, and the
/// suggestion is checked by strace: under `PYTHONMALLOC=malloc` the script maps no arena.
#[test]
fn pythons_arena_churn_is_named_at_the_scripts_line_and_pythonmalloc_ends_it() {
    if !privileged("pythons_arena_churn_is_named_at_the_scripts_line_and_pythonmalloc_ends_it") {
        return;
    }
    let script = "for i in range(150):\n    d = [str(j) for j in range(60000)]\n    del d\n";
    let python = "/usr/bin/python3";
    let (_, file) = record("py-arenas-stacks", &["--stacks"], &[python, "-c", script]);
    let f = report_findings_typed("py-arenas-stacks", &file);
    let c = warning(&f, "mmap_churn");
    assert_eq!(n(c, "size_bytes"), MIB, "{c:?}");
    assert!(n(c, "pairs") >= 100, "{c:?}");
    assert!(c.explanation.contains("pymalloc"), "{c:?}");
    assert_eq!(
        c.call_sites.first().map(String::as_str),
        Some("<listcomp> (<string>:2)"),
        "{c:?}"
    );
    let suggestion = c.suggestion.as_deref().unwrap_or_default();
    assert!(
        suggestion.contains("PYTHONMALLOC=malloc") && !suggestion.contains("MALLOC_MMAP"),
        "{c:?}"
    );
    // The oracle: the script's maps of an arena's size, as strace sees them, as it is and with
    // the suggestion.
    let arenas = |malloc: bool| -> usize {
        let log = temp_path(&format!("py-arenas-strace-{malloc}"));
        let mut cmd = Command::new("strace");
        cmd.args(["-e", "trace=mmap", "-o"])
            .arg(&log)
            .args([python, "-c", script]);
        if malloc {
            cmd.env("PYTHONMALLOC", "malloc");
        }
        run_ok("strace python3", &mut cmd);
        std::fs::read_to_string(&log)
            .expect("strace's log")
            .lines()
            .filter(|l| l.contains(&format!(", {MIB}, ")))
            .count()
    };
    let (before, after) = (arenas(false), arenas(true));
    assert!(
        before >= 100 && after * 10 <= before,
        "1 MiB maps: {before} as it is, {after} with PYTHONMALLOC=malloc"
    );
}

#[test]
fn jemalloc_purge_churn_is_named() {
    if !privileged("jemalloc_purge_churn_is_named") {
        return;
    }
    assert!(
        std::path::Path::new(JEMALLOC).exists(),
        "{JEMALLOC} is missing: `cargo xtask test` installs Debian's libjemalloc2"
    );
    let w = workload();
    let preload = format!("LD_PRELOAD={JEMALLOC}");
    let f = report(
        "purge",
        &[
            "env",
            &preload,
            "MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0",
            w.to_str().expect("utf-8"),
            "purge",
            "20",
            "16",
        ],
    );
    let p = warning(&f, "purge_churn");
    // 16 MiB allocated, freed (purged at once) and allocated again, 19 times after the first.
    assert!(
        n(p, "quick_refaulted_bytes") >= 19 * 16 * MIB * 9 / 10,
        "{p:?}"
    );
    assert!(
        p.suggestion
            .as_deref()
            .is_some_and(|s| s.contains("dirty_decay_ms"))
    );
}

#[test]
fn a_healthy_workload_raises_no_warning_and_live_report_works() {
    if !privileged("a_healthy_workload_raises_no_warning_and_live_report_works") {
        return;
    }
    let t = trace_workload(&["--report"], &["basic"]);
    assert_eq!(t.status, 0, "{}", t.stderr);
    let records = t.typed();
    let findings = findings_of(&records);
    assert!(findings.iter().any(|f| f.id == "heap"), "{findings:#?}");
    assert!(
        findings.iter().any(|f| f.id == "fragmentation"),
        "{findings:#?}"
    );
    let warnings: Vec<&&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .collect();
    assert!(warnings.is_empty(), "false alarm: {warnings:#?}");
}

/// Headless Chromium, as the workplace's machines run it.
fn chromium(args: &[&str], page: &std::path::Path) -> std::process::Output {
    let profile = temp_path("chromium-profile");
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs (cargo xtask test installs Debian's chromium)")
}

/// `vmatrace report FILE --html NAME.html --perfetto NAME.trace.json` (it must succeed);
/// returns the page and the trace.
fn pictures(file: &Path, name: &str) -> (PathBuf, PathBuf) {
    let html = temp_path(&format!("{name}.html"));
    let trace = temp_path(&format!("{name}.trace.json"));
    run_ok(
        "report",
        Command::new(vmatrace())
            .arg("report")
            .arg(file)
            .arg("--html")
            .arg(&html)
            .arg("--perfetto")
            .arg(&trace),
    );
    (html, trace)
}

#[test]
fn html_report_renders_and_perfetto_trace_is_valid() {
    if !privileged("html_report_renders_and_perfetto_trace_is_valid") {
        return;
    }
    let w = workload();
    let (_, file) = record(
        "pictures",
        &[],
        &[w.to_str().expect("utf-8"), "mmap-churn", "300", "512"],
    );
    let (html, trace) = pictures(&file, "report");

    // The Chrome trace event format: an object with traceEvents, each event well formed.
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("reads")).expect("JSON");
    let events = t["traceEvents"].as_array().expect("traceEvents array");
    let mut complete = 0;
    let mut counters = 0;
    for e in events {
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        match e["ph"].as_str().expect("ph") {
            "M" => assert!(e["args"]["name"].is_string(), "{e}"),
            "X" => {
                assert!(e["name"].is_string(), "{e}");
                assert!(e["ts"].as_f64().is_some_and(|v| v >= 0.0), "{e}");
                assert!(e["dur"].as_f64().is_some_and(|v| v > 0.0), "{e}");
                complete += 1;
            }
            "C" => {
                assert!(e["ts"].as_f64().is_some_and(|v| v >= 0.0), "{e}");
                let args = e["args"].as_object().expect("counter args");
                assert!(
                    !args.is_empty() && args.values().all(Value::is_number),
                    "{e}"
                );
                counters += 1;
            }
            other => panic!("unexpected phase {other}: {e}"),
        }
    }
    // The churn is one region whose slice counts every churned mapping (no band per piece).
    let churned: u64 = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| e["args"]["mappings_created"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        churned >= 300,
        "the churned mappings are counted: {churned}"
    );
    assert!(complete > 0 && counters > 0);

    // The page renders in headless Chromium; keep a screenshot as an artefact.
    let dom = chromium(&["--dump-dom"], &html);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let mappings = |dom: &str| -> u64 {
        dom.split("<title>")
            .filter_map(|t| t.split(" mappings").next())
            .filter_map(|t| t.rsplit(' ').next())
            .filter_map(|n| n.parse().ok())
            .max()
            .unwrap_or(0)
    };
    assert!(
        dom.contains("class=\"lane\"") && mappings(&dom) >= 300,
        "a row of the rendered DOM counts the churned mappings"
    );
    assert!(
        dom.contains("mmap-threshold churn"),
        "the findings are on the page"
    );
    screenshot(&html, "report.png");
}

/// Saves a screenshot of `page` as `target/tmp/artefacts/NAME`.
fn screenshot(page: &std::path::Path, name: &str) {
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&artefacts).expect("artefact dir");
    let png = artefacts.join(name);
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        &[
            "--window-size=1300,1500",
            &format!("--screenshot={}", png.display()),
        ],
        page,
    );
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "a real picture"
    );
    eprintln!("screenshot: {}", png.display());
}

#[test]
fn pictures_of_a_run_with_over_50000_pieces_cover_it_whole_in_under_5_mb() {
    if !privileged("pictures_of_a_run_with_over_50000_pieces_cover_it_whole_in_under_5_mb") {
        return;
    }
    let w = workload();
    // A ring that holds the whole run, so that no piece is lost whatever the reader's speed.
    let (_, file) = record(
        "big-picture",
        &["--ring-size", "256M"],
        &[w.to_str().expect("utf-8"), "big-picture", "4", "8", "60000"],
    );
    let text = std::fs::read_to_string(&file).expect("reads");
    let mut mmaps = 0u64;
    let (mut first, mut last) = (u64::MAX, 0u64);
    for line in text.lines() {
        let r =
            OutputRecord::from_value(serde_json::from_str(line).expect("JSON")).expect("a record");
        if r.call("mmap").is_some() {
            mmaps += 1;
        }
        if matches!(
            r,
            OutputRecord::Meta(_)
                | OutputRecord::Summary(_)
                | OutputRecord::Finding(_)
                | OutputRecord::Lost(_)
        ) {
            continue;
        }
        // The axis starts at the first event (the launch's empty seed comes before it).
        let ts = r.ts_ns();
        if r.snapshot().is_none() {
            first = first.min(ts);
        }
        last = last.max(ts);
    }
    assert!(mmaps > 50_000, "{mmaps} mappings");
    drop(text);

    let (html, trace) = pictures(&file, "big-picture");
    let limit = 5_000_000;
    for f in [&html, &trace] {
        let len = std::fs::metadata(f).expect("written").len();
        assert!(len < limit, "{}: {len} bytes", f.display());
        eprintln!("{}: {len} bytes", f.display());
    }

    // Perfetto: tracks per region, not per piece; the counters reach the end of the run; the
    // churn region counts every mapping.
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("reads")).expect("JSON");
    let events = t["traceEvents"].as_array().expect("traceEvents");
    let span_us = (last - first) as f64 / 1000.0;
    let tracks: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e["ph"] == "C")
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(tracks.len() <= 100, "{} counter tracks", tracks.len());
    let end = events
        .iter()
        .filter(|e| e["ph"] == "C")
        .filter_map(|e| e["ts"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        end >= span_us * 0.99,
        "the counters end at {end} us of {span_us}"
    );
    let churned = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| e["args"]["mappings_created"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(churned >= 50_000, "{churned}");
    let arenas = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["args"]["kind"] == "arena")
        .count();
    assert_eq!(arenas, 4, "one region per glibc arena");

    // HTML: the whole run on one labelled time axis, the arenas as rows.
    let page = std::fs::read_to_string(&html).expect("reads");
    let about = page
        .split("id=\"about\">")
        .nth(1)
        .and_then(|t| t.split("</p>").next())
        .expect("the page says what it shows");
    let pieces: u64 = about
        .split(" VMA pieces created over ")
        .next()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a number of pieces");
    let seconds: f64 = about
        .split(" VMA pieces created over ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a duration");
    assert!(pieces > 50_000, "{about}");
    assert!(
        (seconds - span_us / 1e6).abs() <= span_us / 1e6 * 0.01 + 0.001,
        "the axis covers the run: {about} ({span_us} us)"
    );
    for label in [
        "time since the first event (s)",
        "touched bytes",
        "reserved bytes",
    ] {
        assert!(page.contains(label), "axis label {label}");
    }
    assert_eq!(
        page.matches("class=\"label\">arena 0x").count(),
        4,
        "four arena rows"
    );

    let dom = chromium(&["--dump-dom"], &html);
    assert!(
        String::from_utf8_lossy(&dom.stdout).contains("class=\"lane\""),
        "the rows are in the rendered DOM"
    );
    screenshot(&html, "big-picture.png");
}
