//! Privileged end-to-end tests of bounded output (issue #20): `--max-size` rotation, zstd
//! recordings, `--snapshot-every`. Each runs the real vmatrace on the real `workload` and
//! checks the files with the real tools (`vmatrace replay`, Debian's `zstd`) and the kernel's
//! own view of the process (`/proc/PID/maps` and `smaps` while it is stopped).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use tracer::output::{
    OutputRecord, SnapshotReason as Reason,
    process_records::SnapshotJson,
    report::{ProcessSummary, VmaRow},
};
use tracer::{model::normalize, procfs};

/// A number of a record, named for the failure message.
type Field<T> = (&'static str, fn(&T) -> u64);

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let d = temp_path(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The file names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Runs vmatrace with `args` on `workload churn-then-stop ITERS PAUSE_US` until the workload
/// stops at its checkpoint; returns vmatrace and the workload's pid, stopped.
fn until_checkpoint(args: &[&str], iters: &str, pause_us: &str) -> (Running, u32) {
    let w = workload();
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--",
        w.to_str().expect("utf-8"),
        "churn-then-stop",
        iters,
        pause_us,
    ]);
    let mut v = spawn(&all);
    let mut pid = None;
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("churn_then_stop ") {
            pid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        }
        if line == "checkpoint end" {
            break;
        }
    }
    let pid: u32 = pid.expect("the workload said its pid");
    wait_until_stopped(pid, "the workload to stop");
    (v, pid)
}

/// Lets the workload end and vmatrace with it; vmatrace must succeed.
fn finish(mut v: Running, pid: u32) {
    kill(pid, libc::SIGCONT);
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
}

/// `--max-size 1M --max-files 3` on a workload writing about 20 MB: several rotations, three
/// files kept (the first, with the exec, dropped), each at least 1 MiB and over it by its last
/// record only, each starting with `meta` and a seed snapshot, each accepted by `replay`. The
/// file holding a SIGUSR1 snapshot taken while the workload is stopped, replayed alone (from
/// its seed), gives the kernel's map and the live model's bytes; the newest file's replay ends
/// with the live run's summary of the model.
#[test]
fn max_size_rotates_into_files_that_each_replay_to_the_kernels_map() {
    if !privileged("max_size_rotates_into_files_that_each_replay_to_the_kernels_map") {
        return;
    }
    const CAP: u64 = 1 << 20;
    let dir = temp_dir("rotation");
    let out = dir.join("t.ndjson");
    let out_s = out.to_str().expect("utf-8").to_string();
    let (v, pid) = until_checkpoint(
        &[
            "--json",
            "-o",
            &out_s,
            "--max-size",
            "1M",
            "--max-files",
            "3",
        ],
        "3000",
        "100",
    );
    let kernel = kernel_ranges(pid);
    let smaps = procfs::read_smaps(pid).expect("smaps");
    let kernel_anon: u64 = smaps.iter().map(|e| e.anonymous).sum();
    kill(v.child.id(), libc::SIGUSR1);
    let is_signal = |r: &OutputRecord| r.snapshot().is_some_and(|s| s.reason == Reason::Signal);
    let with_signal = |name: &str| {
        typed(&parse_lines(&complete_lines(&dir.join(name))))
            .iter()
            .any(is_signal)
    };
    wait_for(30, "the signal snapshot", || {
        with_signal("t.ndjson") || with_signal("t.1.ndjson")
    });
    // Where the snapshot is, before the run's end writes more (and may rotate).
    let snap_file = if with_signal("t.ndjson") {
        "t.ndjson"
    } else {
        "t.1.ndjson"
    };
    let snap_copy = dir.join("with-signal.ndjson.copy");
    std::fs::copy(dir.join(snap_file), &snap_copy).expect("copies");
    finish(v, pid);

    assert_eq!(
        names_in(&dir),
        [
            "t.1.ndjson",
            "t.2.ndjson",
            "t.ndjson",
            "with-signal.ndjson.copy"
        ]
    );
    for name in ["t.ndjson", "t.1.ndjson", "t.2.ndjson"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).expect("reads");
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let recs = typed(&parse_lines(&lines));
        assert!(
            matches!(recs[0], OutputRecord::Meta(_)),
            "{name} starts with meta"
        );
        let first_snapshot = recs.iter().find_map(OutputRecord::snapshot);
        assert!(
            recs[1].snapshot().is_some()
                && first_snapshot.is_some_and(|s| s.reason == Reason::Seed && s.pid == pid),
            "{name}: meta is followed by a seed snapshot of {pid}: {:?}",
            recs[1]
        );
        // Over 1 MiB by what its last boundary wrote at most: the last record, and the runs of
        // first touches written just before it (pending runs go first); the newest also keeps
        // the end of the run (from the workload's exit on).
        let mut end = match name {
            "t.ndjson" => recs
                .iter()
                .rposition(|r| matches!(r, OutputRecord::Exit(_)))
                .expect("the newest file has the exit"),
            _ => lines.len() - 1,
        };
        while end > 0 && matches!(recs[end - 1], OutputRecord::Touches(_)) {
            end -= 1;
        }
        let before: u64 = lines[..end].iter().map(|l| l.len() as u64 + 1).sum();
        let size = text.len() as u64;
        assert!(
            before < CAP,
            "{name}: {size} bytes, {before} before its last record"
        );
        if name != "t.ndjson" {
            assert!(size >= CAP, "{name} was cut before 1 MiB: {size} bytes");
        }
        replayed(&path);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let oldest = std::fs::read_to_string(dir.join("t.2.ndjson")).expect("reads");
    assert!(
        !oldest.contains("\"type\":\"exec\""),
        "the first file (with the exec) was dropped"
    );

    // The file with the signal snapshot, replayed from its own seed, gives the kernel's map
    // and the live model's bytes at that moment.
    let signal_of = |recs: Vec<OutputRecord>| {
        recs.into_iter().find_map(|r| match r {
            OutputRecord::Snapshot(s) if s.reason == Reason::Signal && s.pid == pid => Some(s),
            _ => None,
        })
    };
    let live = signal_of(typed(&parse_lines(&complete_lines(&snap_copy))))
        .expect("the live signal snapshot");
    let again = signal_of(replayed_typed(&snap_copy)).expect("the replayed signal snapshot");
    assert_eq!(
        normalize::diff(&kernel, &snapshot_ranges(&again)),
        Vec::<String>::new(),
        "the replayed map differs from /proc/{pid}/maps"
    );
    assert_eq!(snapshot_ranges(&again), snapshot_ranges(&live));
    let fields: [Field<VmaRow>; 3] = [
        ("reserved_bytes", |r| r.reserved_bytes),
        ("touched_bytes", |r| r.touched_bytes),
        ("anon_bytes", |r| r.anon_bytes),
    ];
    for (field, of) in fields {
        assert_eq!(snapshot_sum(&again, of), snapshot_sum(&live, of), "{field}");
    }
    // The same tolerance as model_vs_kernel: pages the kernel fills for exec and the loader.
    let anon = snapshot_sum(&again, |r| r.anon_bytes);
    assert!(
        anon.abs_diff(kernel_anon) <= 64 * 1024,
        "anonymous bytes: replayed {anon} kernel {kernel_anon}"
    );

    // The newest file's replay ends with the model the live run ended with.
    let newest = typed(&parse_lines(&complete_lines(&dir.join("t.ndjson"))));
    let summary_of = |recs: &[OutputRecord]| {
        recs.iter()
            .rev()
            .find_map(|r| match r {
                OutputRecord::Summary(s) => Some(s),
                _ => None,
            })
            .and_then(|s| s.record.processes.iter().find(|p| p.pid == pid).cloned())
            .expect("a summary of the workload")
    };
    let (recorded, again) = (
        summary_of(&newest),
        summary_of(&replayed_typed(&dir.join("t.ndjson"))),
    );
    let fields: [Field<ProcessSummary>; 4] = [
        ("reserved_bytes", |p| p.reserved_bytes),
        ("touched_bytes", |p| p.touched_bytes),
        ("anon_bytes", |p| p.anon_bytes),
        ("heap_bytes", |p| p.heap_bytes),
    ];
    for (field, of) in fields {
        assert_eq!(
            of(&recorded),
            of(&again),
            "{field}: {recorded:?} vs {again:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zstd recording (`-o FILE.zst`), rotated at 256K and ended by SIGINT in the middle of the
/// run: every file is a complete zstd stream (`zstd -t`) and replays; the newest, which holds
/// the end of the run (nothing lost on Ctrl-C: its last record is the summary), replays to
/// exactly what its decompression by Debian's `zstd` replays to.
#[test]
fn zstd_recordings_are_complete_after_ctrl_c_and_replay_like_their_decompression() {
    if !privileged("zstd_recordings_are_complete_after_ctrl_c_and_replay_like_their_decompression")
    {
        return;
    }
    if Command::new("zstd").arg("--version").output().is_err() {
        panic!("the zstd tool is needed (apt-get install zstd)");
    }
    let dir = temp_dir("zstd");
    let out = dir.join("t.ndjson.zst");
    let out_s = out.to_str().expect("utf-8").to_string();
    let w = workload();
    let mut v = spawn(&[
        "--json",
        "-o",
        &out_s,
        "--max-size",
        "256K",
        "--max-files",
        "100",
        "--",
        w.to_str().expect("utf-8"),
        "spin",
        "20000",
        "200",
    ]);
    wait_for(30, "a few rotated files", || {
        dir.join("t.3.ndjson.zst").exists()
    });
    kill(v.child.id(), libc::SIGINT);
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    let names = names_in(&dir);
    assert!(names.len() >= 4, "{names:?}");
    for name in &names {
        let path = dir.join(name);
        assert!(name.ends_with(".ndjson.zst"), "{name}");
        let t = Command::new("zstd")
            .args(["-t", "-q"])
            .arg(&path)
            .output()
            .expect("zstd runs");
        assert!(
            t.status.success(),
            "zstd -t {name}: {}",
            String::from_utf8_lossy(&t.stderr)
        );
        let recs = replayed_typed(&path);
        assert!(matches!(recs[0], OutputRecord::Meta(_)), "{name}");
        if name != "t.ndjson.zst" {
            let size = std::fs::metadata(&path).expect("exists").len();
            // Compressed: over by the last record and what the compressor still held.
            assert!(
                (256 << 10..(256 << 10) + (128 << 10)).contains(&size),
                "{name}: {size} bytes"
            );
        }
    }
    let plain = dir.join("newest.ndjson");
    let d = Command::new("zstd")
        .args(["-d", "-q", "-f"])
        .arg(&out)
        .arg("-o")
        .arg(&plain)
        .output()
        .expect("zstd runs");
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let lines = complete_lines(&plain);
    let recs = typed(&parse_lines(&lines));
    assert!(matches!(recs[0], OutputRecord::Meta(_)));
    assert_eq!(
        recs.last().map(OutputRecord::type_name),
        Some("summary"),
        "the end of the run reached the compressed file"
    );
    // The two replays' outputs are compared whole, as the JSON they wrote.
    let from_zstd = replayed(&out);
    assert!(
        typed(&from_zstd).iter().any(|r| r.snapshot().is_some()) && from_zstd.len() > 2,
        "a replay with snapshots"
    );
    assert_eq!(from_zstd, replayed(&plain));
    let _ = std::fs::remove_dir_all(&dir);
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `ts_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `--snapshot-every 200ms`: `periodic` snapshot records about every 200 ms while the workload
/// runs; one taken while it is stopped has the kernel's map and anonymous bytes; a replay
/// writes them again from its own model, the same.
#[test]
fn snapshot_every_writes_periodic_snapshots_that_match_the_kernel() {
    if !privileged("snapshot_every_writes_periodic_snapshots_that_match_the_kernel") {
        return;
    }
    let dir = temp_dir("periodic");
    let out = dir.join("t.ndjson");
    let out_s = out.to_str().expect("utf-8").to_string();
    let started = monotonic_ns();
    let (v, pid) = until_checkpoint(
        &["--json", "-o", &out_s, "--snapshot-every", "200ms"],
        "2000",
        "500",
    );
    let stopped = monotonic_ns();
    let kernel = kernel_ranges(pid);
    let smaps = procfs::read_smaps(pid).expect("smaps");
    let kernel_anon: u64 = smaps.iter().map(|e| e.anonymous).sum();
    let periodic = |recs: Vec<OutputRecord>| -> Vec<SnapshotJson> {
        recs.into_iter()
            .filter_map(|r| match r {
                OutputRecord::Snapshot(s) if s.reason == Reason::Periodic && s.pid == pid => {
                    Some(*s)
                }
                _ => None,
            })
            .collect()
    };
    let mut after_stop = None;
    wait_for(10, "a periodic snapshot of the stopped workload", || {
        let recs = typed(&parse_lines(&complete_lines(&out)));
        after_stop = periodic(recs).into_iter().find(|s| s.ts_ns > stopped);
        after_stop.is_some()
    });
    let after_stop = after_stop.expect("a periodic snapshot");
    finish(v, pid);
    assert_eq!(
        normalize::diff(&kernel, &snapshot_ranges(&after_stop)),
        Vec::<String>::new(),
        "the periodic snapshot differs from /proc/{pid}/maps"
    );
    let anon = snapshot_sum(&after_stop, |r| r.anon_bytes);
    assert!(
        anon.abs_diff(kernel_anon) <= 64 * 1024,
        "anonymous bytes: snapshot {anon} kernel {kernel_anon}"
    );

    let live = periodic(typed(&parse_lines(&complete_lines(&out))));
    let times: Vec<u64> = live.iter().map(|s| s.ts_ns).collect();
    let ran = Duration::from_nanos(stopped - started);
    assert!(
        times.len() as u128 >= ran.as_millis() / 200 / 2,
        "{} periodic snapshots in {ran:?}",
        times.len()
    );
    let mut gaps: Vec<u64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    assert!(
        (180..=300).contains(&median),
        "periodic snapshots {median} ms apart (median), not about 200: {gaps:?}"
    );
    // A replay writes each periodic snapshot again from its own model: the same maps.
    let again = periodic(replayed_typed(&out));
    assert_eq!(again.len(), live.len());
    for (a, l) in again.iter().zip(&live) {
        assert_eq!(
            snapshot_ranges(a),
            snapshot_ranges(l),
            "periodic snapshot at {}",
            l.ts_ns
        );
        assert_eq!(
            snapshot_sum(a, |r| r.touched_bytes),
            snapshot_sum(l, |r| r.touched_bytes)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--max-size` where nothing can be rotated: stdout, a FIFO, a device, human output; and
/// sizes under 4K, or `--max-files` without it: one line each, before anything is traced.
#[test]
fn max_size_is_refused_in_one_line_where_it_cannot_rotate() {
    let dir = temp_dir("refused");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo_s = fifo.to_str().expect("utf-8");
    let file_s = dir.join("t.ndjson").to_str().expect("utf-8").to_string();
    let cases: [(&[&str], i32, &str); 6] = [
        (
            &["--json", "--max-size", "1M"],
            1,
            "stdout cannot be rotated",
        ),
        (
            &["--json", "-o", fifo_s, "--max-size", "1M"],
            1,
            "is not one",
        ),
        (
            &["--json", "-o", "/dev/null", "--max-size", "1M"],
            1,
            "is not one",
        ),
        (
            &["-o", &file_s, "--max-size", "1M"],
            1,
            "needs NDJSON output",
        ),
        (
            &["--json", "-o", &file_s, "--max-size", "1K"],
            2,
            "at least 4K",
        ),
        (
            &["--json", "-o", &file_s, "--max-files", "3"],
            2,
            "--max-size",
        ),
    ];
    for (args, code, message) in cases {
        let o = Command::new(vmatrace())
            .args(args)
            .args(["--", "true"])
            .output()
            .expect("vmatrace runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        if code == 1 {
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        }
    }
    assert!(!dir.join("t.ndjson").exists(), "nothing was written");
    let _ = std::fs::remove_dir_all(&dir);
}
