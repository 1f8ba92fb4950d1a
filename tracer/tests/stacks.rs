//! Privileged end-to-end tests of user call stacks (issue 18): C programs built with and
//! without frame pointers, a Rust workload and a Python script, attached with -p, with the
//! binary deleted while it runs; the call sites in the report, the pprof profile that
//! `go tool pprof` reads and the folded stacks.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use common::*;
use tracer::{
    output::OutputRecord,
    stacks::{Frame, StackDef},
};

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/stack_workload.c");
const MIB: u64 = 1 << 20;

/// Compiles the C workload into a fresh temporary file, with or without frame pointers.
fn compile(frame_pointers: bool) -> PathBuf {
    let out = temp_path(if frame_pointers {
        "stack-workload-fp"
    } else {
        "stack-workload-nofp"
    });
    let status = Command::new("gcc")
        .args(["-g", "-O1"])
        .arg(if frame_pointers {
            "-fno-omit-frame-pointer"
        } else {
            "-fomit-frame-pointer"
        })
        .arg("-o")
        .arg(&out)
        .arg(SOURCE)
        .status()
        .expect("gcc runs (cargo xtask setup installs it)");
    assert!(status.success(), "gcc failed");
    out
}

/// The line of the source marked `LINE(tag)`.
fn line_of(tag: &str) -> u64 {
    let text = std::fs::read_to_string(SOURCE).expect("source readable");
    let mark = format!("LINE({tag})");
    text.lines()
        .position(|l| l.contains(&mark))
        .map(|i| i as u64 + 1)
        .unwrap_or_else(|| panic!("no {mark} in the source"))
}

/// Runs `vmatrace record -o OUT [extra] -- cmd...` to the end; returns the records and OUT.
fn record(extra: &[&str], cmd: &[&str]) -> (Vec<OutputRecord>, PathBuf) {
    let (_, out) = common::record("stacks", extra, cmd);
    (typed_records(&out), out)
}

/// The stack records by id.
fn stacks(recs: &[OutputRecord]) -> HashMap<u64, &StackDef> {
    recs.iter()
        .filter_map(|r| match r {
            OutputRecord::Stack(s) => Some((s.record.id, &s.record)),
            _ => None,
        })
        .collect()
}

/// The frames of the stack `record` names (empty when it has none).
fn frames_of<'a>(stacks: &HashMap<u64, &'a StackDef>, record: &OutputRecord) -> Vec<&'a Frame> {
    record
        .stack_id()
        .and_then(|id| stacks.get(&id))
        .map(|s| s.frames.iter().collect())
        .unwrap_or_default()
}

/// The first frame of the stack in `module` (a path that ends so).
fn first_in<'a>(frames: &[&'a Frame], module: &str) -> Option<&'a Frame> {
    frames
        .iter()
        .copied()
        .find(|f| f.module.as_deref().is_some_and(|m| m.ends_with(module)))
}

/// Whether the frame is the function `name`.
fn is(f: &Frame, name: &str) -> bool {
    f.function.as_deref() == Some(name)
}

/// The anonymous mmaps of 1 MiB.
fn mmaps_of_a_mib(recs: &[OutputRecord]) -> Vec<&OutputRecord> {
    recs.iter()
        .filter(|r| {
            r.call("mmap")
                .is_some_and(|m| m.args[1] == MIB && m.fd == Some(-1))
        })
        .collect()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// Checks that every 1 MiB mmap, every grown brk and every first touch with a stack in
/// `recs` names the C workload's function and source line.
fn assert_c_call_sites(recs: &[OutputRecord], binary: &str, with_faults: bool) {
    let stacks = stacks(recs);
    assert!(!stacks.is_empty(), "no stack records");
    let mmaps = mmaps_of_a_mib(recs);
    assert_eq!(mmaps.len(), 4, "the four 1 MiB mmaps");
    let mut regions = Vec::new();
    for m in &mmaps {
        let frames = frames_of(&stacks, m);
        let site = first_in(&frames, binary)
            .unwrap_or_else(|| panic!("no frame in {binary}: {frames:#?}"));
        assert!(is(site, "map_region"), "{frames:#?}");
        assert!(
            site.file
                .as_deref()
                .is_some_and(|f| f.ends_with("stack_workload.c")),
            "{site:?}"
        );
        assert_eq!(
            site.line.map(u64::from),
            Some(line_of("map_region")),
            "{site:?}"
        );
        assert!(
            frames.iter().any(|f| is(f, "main")),
            "the stack reaches main: {frames:#?}"
        );
        let start = m.syscall().expect("a syscall").ret as u64;
        regions.push(start..start + MIB);
    }
    let grown: Vec<&OutputRecord> = recs
        .iter()
        .filter(|r| {
            r.call("brk")
                .and_then(|b| b.effect.as_ref())
                .is_some_and(|e| e.kind == "grown")
        })
        .filter(|r| !frames_of(&stacks, r).is_empty())
        .filter(|r| first_in(&frames_of(&stacks, r), binary).is_some())
        .collect();
    assert!(!grown.is_empty(), "malloc grew the heap with brk");
    for b in grown {
        let frames = frames_of(&stacks, b);
        let site = first_in(&frames, binary).expect("a frame in the binary");
        assert!(is(site, "grow_heap"), "{frames:#?}");
        assert_eq!(
            site.line.map(u64::from),
            Some(line_of("grow_heap")),
            "{site:?}"
        );
        assert!(
            frames
                .iter()
                .any(|f| f.function.as_deref().is_some_and(|n| n.contains("malloc"))),
            "malloc is on the stack: {frames:#?}"
        );
    }
    if !with_faults {
        return;
    }
    let touches: Vec<&OutputRecord> = recs
        .iter()
        .filter(|r| stacked_first_touch_in(r, &regions))
        .collect();
    assert!(
        !touches.is_empty(),
        "first touches of the regions have stacks"
    );
    for t in touches {
        let frames = frames_of(&stacks, t);
        let site = first_in(&frames, binary).expect("a frame in the binary");
        assert!(is(site, "touch_region"), "{frames:#?}");
        assert_eq!(
            site.line.map(u64::from),
            Some(line_of("touch_region")),
            "{site:?}"
        );
    }
}

/// The rows of the call-site table that `vmatrace report FILE` prints.
fn report_sites(file: &Path, extra: &[&str]) -> Vec<String> {
    let o = run_ok(
        "vmatrace report",
        Command::new(vmatrace()).arg("report").arg(file).args(extra),
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("=== call sites of"))
        .skip(2)
        .take_while(|l| !l.starts_with("==="))
        .map(str::to_string)
        .collect()
}

#[test]
fn c_call_sites_name_function_and_line_with_and_without_frame_pointers() {
    if !privileged("c_call_sites_name_function_and_line_with_and_without_frame_pointers") {
        return;
    }
    for fp in [false, true] {
        let bin = compile(fp);
        let (recs, out) = record(
            &["--stacks", "--fault-stacks", "1"],
            &[bin.to_str().expect("utf-8 path")],
        );
        assert_c_call_sites(&recs, &file_name(&bin), true);
        // The report's top call site is the function that mapped the most.
        let rows = report_sites(&out, &[]);
        assert!(
            rows.first()
                .is_some_and(|r| r.contains("map_region (stack_workload.c:")),
            "frame pointers {fp}: {rows:#?}"
        );
        assert!(
            rows.iter()
                .any(|r| r.contains("grow_heap") && r.contains("through malloc")),
            "{rows:#?}"
        );
    }
}

#[test]
fn fault_stacks_with_the_perf_event_backend_name_the_touching_function() {
    if !privileged("fault_stacks_with_the_perf_event_backend_name_the_touching_function") {
        return;
    }
    // The backend arm64 uses (no fault tracepoints there), forced here.
    let bin = compile(false);
    let (recs, _) = record(
        &[
            "--fault-backend",
            "perf-event",
            "--stacks",
            "--fault-stacks",
            "1",
        ],
        &[bin.to_str().expect("utf-8 path")],
    );
    assert_c_call_sites(&recs, &file_name(&bin), true);
}

#[test]
fn rust_workload_call_sites_name_its_functions() {
    if !privileged("rust_workload_call_sites_name_its_functions") {
        return;
    }
    let w = workload();
    let (recs, out) = record(
        &["--stacks", "--fault-stacks", "1"],
        &[w.to_str().expect("utf-8 path"), "stacks"],
    );
    let stacks = stacks(&recs);
    let mmaps = mmaps_of_a_mib(&recs);
    assert_eq!(mmaps.len(), 4);
    for m in mmaps {
        let frames = frames_of(&stacks, m);
        assert!(
            frames.iter().any(|f| is(f, "workload::stacks_map_region")),
            "{frames:#?}"
        );
    }
    let rows = report_sites(&out, &[]);
    for name in [
        "workload::mmap",
        "workload::stacks_grow_heap",
        "workload::touch",
    ] {
        assert!(rows.iter().any(|r| r.contains(name)), "{name} in {rows:#?}");
    }
    assert!(
        rows.iter()
            .any(|r| r.contains("workload::stacks_grow_heap") && r.contains("through malloc")),
        "{rows:#?}"
    );
}

/// A call site in a loop is copied and unwound once; the kernel then recognises its
/// registers and stack words and sends the stack's id alone. Two call sites whose
/// registers at the syscall can be the same (same caller, same depth) and whose return
/// addresses differ must each keep their own stack.
#[test]
fn known_stacks_are_recognised_by_the_kernel_and_keep_each_call_site_its_own() {
    if !privileged("known_stacks_are_recognised_by_the_kernel_and_keep_each_call_site_its_own") {
        return;
    }
    let w = workload();
    let (o, out) = common::record(
        "stacks-two-sites",
        &["--stacks", "-v"],
        // 50 µs between calls: about 2 s in all, time for the first stacks to be unwound
        // while the loop runs (the test build's daemon is slow at its first); under the
        // kernel matrix's emulation a fifth of it (else 150 s).
        &[
            w.to_str().expect("utf-8 path"),
            "two-sites",
            if emulated() { "4000" } else { "20000" },
            "50",
        ],
    );
    let recs = typed_records(&out);
    let stacks = stacks(&recs);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let recognised: u64 = stderr
        .lines()
        .find_map(|l| l.split("stacks: ").nth(1))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stacks line in:\n{stderr}"));
    // Calls of each site with a stack (the others' stacks were dropped while the ring was
    // more than half full, counted), and calls named after the wrong site.
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../workloads/src/main.rs");
    let text = std::fs::read_to_string(source).expect("the workload's source");
    let site = |tag: &str| {
        text.lines()
            .position(|l| l.contains(&format!("// SITE({tag})")))
            .map(|i| i as u32 + 1)
            .expect("the site's line")
    };
    let lines = [site("one"), site("two")];
    let (mut named, mut wrong) = ([0u64; 2], Vec::new());
    for r in &recs {
        let Some(m) = r.call("mmap").filter(|m| m.fd == Some(-1)) else {
            continue;
        };
        let frames = frames_of(&stacks, r);
        if !frames.iter().any(|f| is(f, "workload::map_pages")) {
            continue;
        }
        let caller = frames
            .iter()
            .find(|f| is(f, "workload::two_sites"))
            .and_then(|f| f.line);
        let want = if m.args[1] == 4096 { 0 } else { 1 };
        if caller == Some(lines[want]) {
            named[want] += 1;
        } else {
            wrong.push(format!("{} bytes from line {caller:?}", m.args[1]));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} calls named after the other site (lines {lines:?}): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert!(
        named.iter().all(|&n| n >= 100),
        "calls named per site {named:?}"
    );
    // Most calls come after the first of each site was unwound (under the kernel matrix's
    // emulation, where the daemon is slower still, at least some).
    let least = if emulated() { 100 } else { 10_000 };
    assert!(
        recognised > least,
        "{recognised} stacks recognised by the kernel:\n{stderr}"
    );
    // Without the kernel's recognition, the same sites.
    let (o, out) = common::record(
        "stacks-two-sites-copied",
        &["--stacks", "--no-known-stacks", "-v"],
        &[w.to_str().expect("utf-8 path"), "two-sites", "2000"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("(0 recognised by the kernel"), "{stderr}");
    let recs = typed_records(&out);
    let stacks = self::stacks(&recs);
    assert!(
        recs.iter().any(|r| frames_of(&stacks, r)
            .iter()
            .any(|f| is(f, "workload::map_pages"))),
        "the copied stacks name the sites too"
    );
}

#[test]
fn a_burst_of_stacks_loses_no_event_and_counts_every_stack_it_drops() {
    if !privileged("a_burst_of_stacks_loses_no_event_and_counts_every_stack_it_drops") {
        return;
    }
    // 5,000 rounds of mmap, first touch, munmap, each with a stack.
    let w = workload();
    let (recs, _) = record(
        &["--stacks", "--fault-stacks", "1"],
        &[w.to_str().expect("utf-8 path"), "churn", "5000"],
    );
    let lost = recs
        .iter()
        .rev()
        .find_map(|r| match r {
            OutputRecord::Summary(s) => Some(s.record.lost),
            _ => None,
        })
        .expect("a summary record");
    assert_eq!(
        (lost.lost_syscall, lost.lost_fault),
        (0, 0),
        "stacks cost no event: {lost:?}"
    );
    let dropped = lost.lost_stack;
    let churn: Vec<_> = recs
        .iter()
        .filter_map(OutputRecord::syscall)
        .filter(|s| matches!(s.name(), "mmap" | "munmap") && s.args[1] == 16 * 4096)
        .collect();
    assert_eq!(churn.len(), 10_000, "every churn call recorded");
    let without = churn.iter().filter(|s| s.stack_id.is_none()).count() as u64;
    assert!(
        without <= dropped,
        "{without} churn calls without a stack, only {dropped} stacks counted as dropped"
    );
    // A call site in a loop is one stack, however often it runs.
    let ids: std::collections::HashSet<u64> = churn.iter().filter_map(|s| s.stack_id).collect();
    assert!(
        !ids.is_empty() && ids.len() <= 4,
        "{} stacks for the two call sites of the loop",
        ids.len()
    );
}

/// The script of the Python test: each memory call made from a function of its own.
const PY_SCRIPT: &str = "import mmap, threading\n\
def make_buffers():\n\
\x20   bufs = []\n\
\x20   for _ in range(4):\n\
\x20       m = mmap.mmap(-1, 1 << 20)\n\
\x20       for off in range(0, 1 << 20, 4096):\n\
\x20           m[off] = 1\n\
\x20       bufs.append(m)\n\
\x20   return bufs\n\
def drop(bufs):\n\
\x20   bufs.clear()\n\
def grow_heap():\n\
\x20   held = []\n\
\x20   for _ in range(50):\n\
\x20       held.append(bytearray(100000))\n\
\x20   return held\n\
def worker_a():\n\
\x20   for _ in range(20):\n\
\x20       m = mmap.mmap(-1, 2 << 20)\n\
\x20       m.close()\n\
def worker_b():\n\
\x20   for _ in range(20):\n\
\x20       m = mmap.mmap(-1, 3 << 20)\n\
\x20       m.close()\n\
drop(make_buffers())\n\
h = grow_heap()\n\
threads = [threading.Thread(target=worker_a), threading.Thread(target=worker_b)]\n\
for t in threads: t.start()\n\
for t in threads: t.join()\n";

/// Whether `r` is a first touch with a stack inside one of `regions`.
fn stacked_first_touch_in(r: &OutputRecord, regions: &[std::ops::Range<u64>]) -> bool {
    r.fault().is_some_and(|f| {
        f.first_touch && f.stack_id.is_some() && regions.iter().any(|reg| reg.contains(&f.address))
    })
}

/// The line of the script that holds `text`.
fn py_line(text: &str) -> u32 {
    PY_SCRIPT
        .lines()
        .position(|l| l.contains(text))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no {text} in the script"))
}

#[test]
fn python_call_sites_name_the_scripts_functions_and_lines() {
    if !privileged("python_call_sites_name_the_scripts_functions_and_lines") {
        return;
    }
    let version = Command::new("/usr/bin/python3")
        .args(["-c", "import sys; print(sys.version_info[:2] == (3, 11))"])
        .output()
        .expect("python3 runs");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "True",
        "the Python frames are CPython 3.11's (Debian 12's python3)"
    );
    let script = temp_path("stacks.py");
    std::fs::write(&script, PY_SCRIPT).expect("script written");
    // Under emulation one fault in 8 gets a stack: the interpreter's start-up takes thousands
    // of faults, each stack unwound by the daemon.
    let every = if emulated() { 8 } else { 1 };
    let (recs, out) = record(
        &["--stacks", "--fault-stacks", &every.to_string()],
        &["/usr/bin/python3", script.to_str().expect("utf-8 path")],
    );
    let stacks = stacks(&recs);
    let script_name = file_name(&script);
    // The call site of a record: its innermost Python frame, as `function (file:line)`.
    let site = |r: &OutputRecord| -> Option<String> {
        let id = r.stack_id()?;
        Some(tracer::stacks::sites::site_label(stacks.get(&id)?))
    };
    let at = |function: &str, line: &str| format!("{function} ({script_name}:{})", py_line(line));
    // The call sites of the mmap module's calls of `call` of `len` bytes (malloc's arenas
    // map and unmap other sizes, or by chance the same).
    let by_mmap_module = |r: &&OutputRecord| {
        frames_of(&stacks, r).iter().any(|f| {
            f.module
                .as_deref()
                .is_some_and(|m| m.contains("/mmap.cpython"))
        })
    };
    let calls_of = |call: &'static str, len: u64| {
        recs.iter().filter(move |r| {
            r.call(call).is_some_and(|s| {
                s.args[1] == len && (call != "mmap" || s.fd == Some(-1)) && s.ret >= 0
            })
        })
    };
    let sites_of = |call: &'static str, len: u64| -> Vec<Option<String>> {
        calls_of(call, len)
            .filter(by_mmap_module)
            .map(site)
            .collect()
    };
    // The kernel drops stacks while the ring is more than half full (counted, the calls
    // kept), and a kernel that preempts BPF programs skips runs (counted): under emulation a
    // few of these calls may come without a stack, or not at all.
    let lost = &last_summary(&recs).lost;
    let excused = |call: &'static str, len: u64| -> usize {
        let stackless = calls_of(call, len)
            .filter(|r| r.stack_id().is_none())
            .count() as u64;
        (stackless.min(lost.lost_stack) + lost.missed + lost.lost_syscall) as usize
    };
    // Of `want` calls, how many are named: all of them, or all but those excused.
    let named = |call: &'static str, len: u64, sites: &[Option<String>], want: usize| {
        let excuse = excused(call, len);
        assert!(
            sites.len() <= want && sites.len() + excuse >= want,
            "{} of {want} {call}s of {len} bytes named ({excuse} without a stack or lost)",
            sites.len()
        );
    };
    // The mmap module's maps and unmaps: with the GIL held (mmap), and released (munmap).
    let made = at("make_buffers", "m = mmap.mmap(-1, 1 << 20)");
    for (call, want) in [("mmap", &made), ("munmap", &at("drop", "bufs.clear()"))] {
        let sites = sites_of(call, MIB);
        let right: Vec<_> = sites
            .iter()
            .filter(|s| s.as_deref() == Some(want.as_str()))
            .cloned()
            .collect();
        named(call, MIB, &right, 4);
        assert!(
            !right.is_empty(),
            "each 1 MiB {call} of the mmap module is named {want}: {sites:#?}"
        );
    }
    // Two threads, each mapping and unmapping in its own function, while the other may hold
    // the GIL: each call names its own thread's function.
    for (len, function, map_line) in [
        (2 * MIB, "worker_a", "m = mmap.mmap(-1, 2 << 20)"),
        (3 * MIB, "worker_b", "m = mmap.mmap(-1, 3 << 20)"),
    ] {
        let maps = sites_of("mmap", len);
        named("mmap", len, &maps, 20);
        let want = at(function, map_line);
        assert!(
            maps.iter().all(|s| s.as_deref() == Some(want.as_str())),
            "every map of {len} bytes is named {want}: {maps:#?}"
        );
        let unmaps = sites_of("munmap", len);
        named("munmap", len, &unmaps, 20);
        // `m.close()` is on the line after the map.
        let want = format!("{function} ({script_name}:{})", py_line(map_line) + 1);
        assert!(
            unmaps.iter().all(|s| s.as_deref() == Some(want.as_str())),
            "every unmap of {len} bytes is named {want}: {unmaps:#?}"
        );
    }
    // malloc growing the heap with brk for the bytearrays.
    let grow = at("grow_heap", "held.append(bytearray(100000))");
    let grown: Vec<(Option<String>, bool)> = recs
        .iter()
        .filter(|r| {
            r.call("brk")
                .and_then(|b| b.effect.as_ref())
                .is_some_and(|e| e.kind == "grown")
        })
        .map(|r| {
            let through_malloc = r
                .stack_id()
                .and_then(|id| stacks.get(&id))
                .is_some_and(|d| tracer::stacks::sites::through_malloc(d));
            (site(r), through_malloc)
        })
        .collect();
    let by_grow_heap = grown
        .iter()
        .filter(|(s, malloc)| s.as_deref() == Some(grow.as_str()) && *malloc)
        .count();
    assert!(
        by_grow_heap >= 5,
        "malloc grew the heap for {grow} ({by_grow_heap} times): {grown:#?}"
    );
    // First touches of the 1 MiB buffers.
    let regions: Vec<std::ops::Range<u64>> = recs
        .iter()
        .filter(|r| {
            r.call("mmap")
                .is_some_and(|s| s.args[1] == MIB && s.fd == Some(-1))
                && site(r).as_deref() == Some(made.as_str())
        })
        .map(|r| {
            let start = r.syscall().expect("a syscall").ret as u64;
            start..start + MIB
        })
        .collect();
    let touched = at("make_buffers", "m[off] = 1");
    // Touches while the buffers are mapped: once `drop` has unmapped them the kernel hands
    // their addresses out again (a new thread's stack and its first touches, for one).
    let dropped_at = recs
        .iter()
        .position(|r| r.call("munmap").is_some_and(|s| s.args[1] == MIB) && by_mmap_module(&r))
        .expect("drop unmapped the buffers");
    let touches: Vec<Option<String>> = recs[..dropped_at]
        .iter()
        .filter(|r| stacked_first_touch_in(r, &regions))
        .map(site)
        .collect();
    // (Fault stacks give way to events when the ring fills: most, not all, have one.)
    assert!(
        touches.len() >= 100 / every,
        "first touches of the buffers: {}",
        touches.len()
    );
    assert!(
        touches
            .iter()
            .all(|s| s.as_deref() == Some(touched.as_str())),
        "every touch is named {touched}: {touches:#?}"
    );
    // The interpreter's evaluation loop is gone from those stacks, the native frames around
    // it stay: the program's start, the mmap module.
    let def = recs
        .iter()
        .find(|r| r.call("mmap").is_some() && site(r).as_deref() == Some(made.as_str()))
        .and_then(|r| stacks.get(&r.stack_id()?))
        .expect("a stack of make_buffers");
    assert!(
        !def.frames.iter().any(|f| is(f, "_PyEval_EvalFrameDefault")),
        "{def:#?}"
    );
    assert!(
        def.frames.iter().any(|f| is(f, "<module>"))
            && def.frames.iter().any(|f| is(f, "main") || is(f, "_start")),
        "{def:#?}"
    );
    // The report names the script's functions too.
    let rows = report_sites(&out, &[]);
    for want in [&made, &grow] {
        assert!(
            rows.iter().any(|r| r.contains(want.as_str())),
            "{want}: {rows:#?}"
        );
    }
}

#[test]
fn attached_with_p_a_running_process_gets_symbolized_stacks() {
    if !privileged("attached_with_p_a_running_process_gets_symbolized_stacks") {
        return;
    }
    let bin = compile(false);
    let go = temp_path("go");
    let child = Command::new(&bin)
        .arg(&go)
        .stdout(Stdio::null())
        .spawn()
        .expect("workload starts");
    let pid = child.id();
    let _child = KillOnDrop(child);
    let out = temp_path("attach.ndjson");
    let pid_s = pid.to_string();
    let mut run = spawn(&[
        "record",
        "-o",
        out.to_str().expect("utf-8"),
        "--stacks",
        "-p",
        &pid_s,
    ]);
    wait_for(20, "the seed snapshot", || {
        out.exists()
            && std::fs::read_to_string(&out).is_ok_and(|t| t.contains("\"reason\":\"seed\""))
    });
    std::fs::write(&go, b"").expect("go file");
    wait_for(20, "the four mmaps", || {
        std::fs::read_to_string(&out)
            .is_ok_and(|t| t.matches(&format!("\"len\":{MIB}")).count() >= 4)
    });
    std::fs::remove_file(&go).expect("go file removed");
    let status = run.child.wait().expect("vmatrace ends with its target");
    assert!(status.success());
    assert_c_call_sites(&typed_records(&out), &file_name(&bin), false);
}

#[test]
fn a_binary_deleted_while_it_runs_is_still_named_and_replay_prints_it() {
    if !privileged("a_binary_deleted_while_it_runs_is_still_named_and_replay_prints_it") {
        return;
    }
    let bin = compile(true);
    let go = temp_path("go");
    let out = temp_path("deleted.ndjson");
    let mut run = spawn(&[
        "record",
        "-o",
        out.to_str().expect("utf-8"),
        "--stacks",
        "--",
        bin.to_str().expect("utf-8"),
        go.to_str().expect("utf-8"),
    ]);
    wait_for(20, "the exec snapshot", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("\"reason\":\"exec\""))
    });
    std::fs::remove_file(&bin).expect("binary deleted");
    std::fs::write(&go, b"").expect("go file");
    wait_for(20, "the four mmaps", || {
        std::fs::read_to_string(&out)
            .is_ok_and(|t| t.matches(&format!("\"len\":{MIB}")).count() >= 4)
    });
    std::fs::remove_file(&go).expect("go file removed");
    let status = run.child.wait().expect("vmatrace ends with its target");
    assert!(status.success());
    assert!(!bin.exists());
    assert_c_call_sites(&typed_records(&out), &file_name(&bin), false);
    let o = Command::new(vmatrace())
        .arg("replay")
        .arg(&out)
        .output()
        .expect("replay runs");
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    let want = format!("map_region (stack_workload.c:{})", line_of("map_region"));
    assert!(text.contains(&want), "{want} in:\n{text}");
}

/// `go`, or None (the test is skipped) when it is missing outside CI.
fn go_tool() -> Option<&'static str> {
    if Path::new("/usr/bin/go").exists() {
        return Some("/usr/bin/go");
    }
    let reason = "go is missing (cargo xtask setup installs golang-go)";
    if std::env::var("VMATRACE_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{reason}");
    }
    eprintln!("skipped: {reason}");
    None
}

#[test]
fn pprof_lists_the_workload_function_first_and_folded_has_one_line_per_stack() {
    if !privileged("pprof_lists_the_workload_function_first_and_folded_has_one_line_per_stack") {
        return;
    }
    let Some(go) = go_tool() else { return };
    let bin = compile(false);
    let (recs, out) = record(&["--stacks"], &[bin.to_str().expect("utf-8")]);
    let pprof = temp_path("profile.pb.gz");
    let folded = temp_path("folded.txt");
    let html = temp_path("report.html");
    let o = Command::new(vmatrace())
        .arg("report")
        .arg(&out)
        .arg("--pprof")
        .arg(&pprof)
        .arg("--folded")
        .arg(&folded)
        .arg("--html")
        .arg(&html)
        .output()
        .expect("report runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The HTML report: the call-site table and a flame graph of touched bytes, where the
    // four touched MiB of map_region's mappings are a frame of their own.
    let page = std::fs::read_to_string(&html).expect("HTML written");
    let table = &page[page
        .find("<h2>Top call sites")
        .expect("call sites in the HTML")..];
    assert!(
        table.contains(&format!(
            "<td>map_region (stack_workload.c:{})</td><td>4 MiB</td>",
            line_of("map_region")
        )),
        "{table}"
    );
    let flame = &page[page.find("id=\"flame\"").expect("a flame graph")..];
    assert!(flame.contains("<title>map_region (4"), "{flame}");
    assert!(flame.contains("<title>main ("), "{flame}");
    let home = temp_path("gohome");
    std::fs::create_dir_all(&home).expect("home");
    let top = Command::new(go)
        .args(["tool", "pprof", "-top"])
        .arg(&pprof)
        .env("HOME", &home)
        .env("PPROF_TMPDIR", &home)
        .output()
        .expect("go tool pprof runs");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let first = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or("");
    assert!(first.trim_end().ends_with("map_region"), "{text}");
    // Folded: one line per unique stack, each different.
    let lines: Vec<String> = std::fs::read_to_string(&folded)
        .expect("folded written")
        .lines()
        .map(str::to_string)
        .collect();
    let distinct: std::collections::HashSet<String> = stacks(&recs)
        .values()
        .map(|s| {
            let names: Vec<String> = s
                .frames
                .iter()
                .rev()
                .map(|f| match f.function.as_deref() {
                    Some(n) => n.to_string(),
                    // As vmatrace labels a frame without a name: module+offset.
                    None => format!(
                        "{}+{:#x}",
                        f.module
                            .as_deref()
                            .map_or("[unknown]", |m| m.rsplit('/').next().unwrap_or(m)),
                        f.offset
                    ),
                })
                .collect();
            names.join(";")
        })
        .collect();
    assert_eq!(lines.len(), distinct.len(), "{lines:#?}");
    let unique: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l.rsplit_once(' ').map_or(l.as_str(), |(s, _)| s))
        .collect();
    assert_eq!(unique.len(), lines.len(), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(";main;map_region;") || l.contains(";main;map_region ")),
        "{lines:#?}"
    );
}

/// The stack reads of vmatrace's own programs fault now and then (a frame-pointer walk
/// through a register that holds no frame pointer, a copy past the stack's present pages).
/// The kernel does not handle those faults (the helpers disable page faults): they are not
/// the process's. With a stack for every syscall and every fault, the kernel-mode faults
/// recorded are those of a run without stacks (about 2,300 more were recorded before), and the
/// runs the kernel skipped for them (nested in the fault programs) are not counted as lost
/// events, with a needless resync, as 12 to 16 were in each such run before. A kernel that
/// preempts BPF programs may skip other runs under load: reported, rightly; such a run is
/// tried again, up to three times.
#[test]
fn stack_reads_of_vmatraces_own_programs_are_not_the_processs_faults() {
    if !privileged("stack_reads_of_vmatraces_own_programs_are_not_the_processs_faults") {
        return;
    }
    let bin = compile(false);
    let bin = bin.to_str().expect("utf-8 path");
    let run = |extra: &[&str]| {
        let (recs, _) = record(&[&["--faults", "all"], extra].concat(), &[bin]);
        let meta = recs.iter().find_map(|r| match r {
            OutputRecord::Meta(m) => Some(m.fault_backend.clone()),
            _ => None,
        });
        let kernel_mode = recs
            .iter()
            .filter_map(OutputRecord::fault)
            .filter(|f| f.error_code.is_some_and(|c| c & 4 == 0))
            .count();
        let resyncs = recs
            .iter()
            .filter_map(OutputRecord::snapshot)
            .filter(|s| s.reason == tracer::output::SnapshotReason::Resync)
            .count();
        (meta, kernel_mode, last_summary(&recs).lost, resyncs)
    };
    let (backend, plain, _, _) = run(&[]);
    if backend.as_deref() != Some("tracepoint") {
        // The perf-event backend has no error code, and the kernel does not report the
        // faults it does not handle there.
        eprintln!("fault backend {backend:?}: nothing to compare");
        return;
    }
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let (_, stacked, lost, resyncs) = run(&["--stacks", "--fault-stacks", "1"]);
        assert!(
            stacked <= plain + 8,
            "kernel-mode faults: {stacked} with stacks, {plain} without"
        );
        if (lost.missed, resyncs) == (0, 0) {
            return;
        }
        attempts.push((lost.missed, resyncs));
    }
    panic!("every run counted skipped program runs (missed, resyncs): {attempts:?}");
}
