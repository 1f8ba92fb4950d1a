//! The binary recording format (issue #22): `record -o FILE.vmat` writes the same records as
//! NDJSON in fewer bytes; `replay` reads it directly and gives what the live run saw;
//! `vmatrace convert` turns it into NDJSON and back without changing a record; broken files
//! are refused in one line.

mod common;

use std::{path::Path, process::Command};

use common::*;
use tracer::output::OutputRecord;

/// `vmatrace ARGS` (it must succeed); its stderr.
/// The `faults` of a `meta` record (the record must be one).
fn meta_faults(r: &OutputRecord) -> &str {
    match r {
        OutputRecord::Meta(m) => &m.faults,
        other => panic!("a meta record: {other:?}"),
    }
}

fn vmatrace_ok(args: &[&std::ffi::OsStr]) -> String {
    let o = run_ok("vmatrace", Command::new(vmatrace()).args(args));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `vmatrace convert FROM -o TO`.
fn convert(from: &Path, to: &Path) {
    vmatrace_ok(&[
        "convert".as_ref(),
        from.as_os_str(),
        "-o".as_ref(),
        to.as_os_str(),
    ]);
}

#[test]
fn a_binary_recording_replays_as_the_live_run_and_converts_to_the_same_records() {
    if !privileged("a_binary_recording_replays_as_the_live_run_and_converts_to_the_same_records") {
        return;
    }
    // The fault-heavy benchmark's shape, every fault recorded (record's default).
    let bin = temp_path("binary-fault-loop.vmat");
    let stderr = vmatrace_ok(&[
        "record".as_ref(),
        "-o".as_ref(),
        bin.as_os_str(),
        "--".as_ref(),
        workload().as_os_str(),
        "fault-loop".as_ref(),
        "100".as_ref(),
        "256".as_ref(),
    ]);
    assert!(stderr.contains("(binary)"), "{stderr}");
    let head = std::fs::read(&bin).expect("the recording");
    assert!(head.starts_with(b"\x89VMAT\r\n\n"), "the binary magic");

    // NDJSON from it: every line a JSON record, meta first, the live summary last.
    let ndjson = temp_path("binary-fault-loop.ndjson");
    convert(&bin, &ndjson);
    let recs = raw_typed_records(&ndjson);
    assert_eq!(meta_faults(&recs[0]), "all");
    let live = last_summary(&recs);
    let faults = recs.iter().filter(|r| r.fault().is_some()).count();
    assert!(faults >= 100 * 256, "every touch recorded: {faults}");

    // Replay reads the binary file directly, as it reads the NDJSON: the same output (the
    // two compared whole, as the JSON written), and the live run's summary (every fault was
    // recorded, so every counter).
    let (from_bin, from_ndjson) = (replayed(&bin), replayed(&ndjson));
    assert_eq!(from_bin, from_ndjson, "replay of either format");
    let from_bin = typed(&from_bin);
    let again = last_summary(&from_bin);
    assert_eq!(
        again.processes, live.processes,
        "replay gives the live summary"
    );

    // Back to binary and to NDJSON again: the same records, byte for byte.
    let bin2 = temp_path("binary-fault-loop-2.vmat.zst");
    let ndjson2 = temp_path("binary-fault-loop-2.ndjson");
    convert(&ndjson, &bin2);
    convert(&bin2, &ndjson2);
    assert_eq!(
        std::fs::read(&ndjson).expect("reads"),
        std::fs::read(&ndjson2).expect("reads"),
        "NDJSON -> binary (zstd) -> NDJSON changes nothing"
    );

    let (b, n) = (
        std::fs::metadata(&bin).expect("binary").len(),
        std::fs::metadata(&ndjson).expect("ndjson").len(),
    );
    eprintln!(
        "{} records: {b} bytes binary, {n} NDJSON ({:.1}x); {:.1} against {:.1} bytes per record",
        recs.len(),
        n as f64 / b as f64,
        b as f64 / recs.len() as f64,
        n as f64 / recs.len() as f64
    );
    assert!(3 * b <= n, "binary at least 3x smaller: {b} against {n}");
    for p in [&bin, &ndjson, &bin2, &ndjson2] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn runs_of_first_touches_and_threads_in_binary_replay_to_the_live_summary() {
    if !privileged("runs_of_first_touches_and_threads_in_binary_replay_to_the_live_summary") {
        return;
    }
    // Live tracing to a .vmat name (with --json, and without: the name asks for records):
    // binary, with the default --faults first (runs of first touches), four threads and a
    // followed fork.
    for (name, args) in [
        ("binary-threads.vmat", &["threads", "4", "512"][..]),
        ("binary-fork.vmat.zst", &["fork"][..]),
    ] {
        let bin = temp_path(name);
        let w = workload();
        let mut cmd: Vec<&std::ffi::OsStr> = vec!["-f".as_ref(), "-o".as_ref(), bin.as_os_str()];
        cmd.push("--".as_ref());
        cmd.push(w.as_os_str());
        cmd.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        if name.contains("threads") {
            cmd.insert(0, "--json".as_ref());
        }
        let stderr = vmatrace_ok(&cmd);
        assert!(
            stderr.contains(&format!("binary records to {}", bin.display())),
            "{name}: the banner names the format: {stderr}"
        );
        let ndjson = temp_path(&format!("{name}.ndjson"));
        convert(&bin, &ndjson);
        let recs = raw_typed_records(&ndjson);
        assert_eq!(meta_faults(&recs[0]), "first", "{name}");
        if name.contains("threads") {
            assert!(
                recs.iter().any(|r| matches!(r, OutputRecord::Touches(_))),
                "{name}: runs of first touches"
            );
        }
        let live = recs.last().expect("records");
        let again = replayed(&bin);
        let typed_again = typed(&again);
        let summary = typed_again.last().expect("replay output");
        let processes = |r: &OutputRecord| match r {
            OutputRecord::Summary(s) => processes_without_fault_counts(&s.record),
            other => panic!("{name}: a summary: {other:?}"),
        };
        assert_eq!(
            processes(summary),
            processes(live),
            "{name}: replay of the binary file gives the live summary"
        );
        // The two replays' outputs are compared whole, as the JSON written.
        assert_eq!(
            again,
            replayed(&ndjson),
            "{name}: either format replays alike"
        );
        let _ = std::fs::remove_file(&bin);
        let _ = std::fs::remove_file(&ndjson);
    }
}

#[test]
fn a_rotated_binary_recording_replays_file_by_file() {
    if !privileged("a_rotated_binary_recording_replays_file_by_file") {
        return;
    }
    let dir = temp_path("binary-rotated");
    std::fs::create_dir_all(&dir).expect("a directory");
    let out = dir.join("trace.vmat");
    vmatrace_ok(&[
        "record".as_ref(),
        "--max-size".as_ref(),
        "256K".as_ref(),
        "--max-files".as_ref(),
        "3".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--".as_ref(),
        workload().as_os_str(),
        "fault-loop".as_ref(),
        "100".as_ref(),
        "256".as_ref(),
    ]);
    let names = ["trace.vmat", "trace.1.vmat", "trace.2.vmat"];
    for name in names {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes.starts_with(b"\x89VMAT"), "{name} starts a stream");
        let again = replayed_typed(&path);
        assert_eq!(
            again.last().map(OutputRecord::type_name),
            Some("summary"),
            "{name} replays alone"
        );
        let ndjson = dir.join(format!("{name}.ndjson"));
        convert(&path, &ndjson);
        let recs = raw_typed_records(&ndjson);
        assert_eq!(recs[0].type_name(), "meta", "{name}");
        assert_eq!(recs[1].type_name(), "snapshot", "{name} starts with a seed");
    }
    assert!(!dir.join("trace.3.vmat").exists(), "three files kept");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_or_foreign_files_are_refused_in_one_line() {
    if !privileged("broken_or_foreign_files_are_refused_in_one_line") {
        return;
    }
    let bin = temp_path("binary-broken.vmat");
    vmatrace_ok(&[
        "record".as_ref(),
        "-o".as_ref(),
        bin.as_os_str(),
        "--".as_ref(),
        workload().as_os_str(),
        "basic".as_ref(),
    ]);
    let bytes = std::fs::read(&bin).expect("the recording");
    let cut = temp_path("binary-cut.vmat");
    // Inside the last record (the summary).
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("writes");
    let text = temp_path("binary-text.vmat");
    std::fs::write(&text, "hello\n").expect("writes");
    let header_only = temp_path("binary-header.vmat");
    std::fs::write(&header_only, &bytes[..9]).expect("writes");
    let mut flipped = bytes.clone();
    flipped[8] = 99;
    let version = temp_path("binary-version.vmat");
    std::fs::write(&version, &flipped).expect("writes");
    let missing = temp_path("binary-missing.vmat");
    for (sub, path, why) in [
        ("replay", &cut, "ends inside a record"),
        ("convert", &cut, "ends inside a record"),
        ("report", &cut, "ends inside a record"),
        ("replay", &text, ":1: not JSON"),
        ("convert", &text, ":1: not JSON"),
        ("replay", &header_only, "is empty"),
        ("replay", &version, "binary format version 99"),
        ("convert", &missing, "cannot read"),
    ] {
        let o = Command::new(vmatrace())
            .arg(sub)
            .arg(path)
            .output()
            .expect("vmatrace runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{sub} {}: {err}", path.display());
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(why), "{sub} {}: {err}", path.display());
        if why.contains("inside") {
            assert!(err.contains(": record "), "names the record: {err}");
        }
    }
    // The output of convert is not overwritten without --force.
    let o = Command::new(vmatrace())
        .arg("convert")
        .arg(&bin)
        .arg("-o")
        .arg(&text)
        .output()
        .expect("vmatrace runs");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&text).expect("reads"), "hello\n");
    vmatrace_ok(&[
        "convert".as_ref(),
        bin.as_os_str(),
        "-o".as_ref(),
        text.as_os_str(),
        "--force".as_ref(),
        // Its name ends in .vmat: binary unless told.
        "--format".as_ref(),
        "ndjson".as_ref(),
    ]);
    assert_eq!(raw_typed_records(&text)[0].type_name(), "meta");
    for p in [&bin, &cut, &text, &header_only, &version] {
        let _ = std::fs::remove_file(p);
    }
}
