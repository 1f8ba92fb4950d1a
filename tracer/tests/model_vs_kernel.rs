//! Privileged end-to-end tests of the model: at checkpoints where the traced workload has
//! stopped itself, vmatrace's reconstructed map must equal the kernel's `/proc/PID/maps`, and
//! its touched anonymous bytes must agree with `/proc/PID/smaps`.

mod common;

use std::{path::Path, process::Command};

use common::*;
use serde_json::Value;
use tracer::{
    model::{Perms, normalize},
    procfs,
};

/// Complete lines written so far (the writer may be mid-line).
fn complete_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

/// The pid of the launched process, from its exec record (waits for it to be written).
fn exec_pid(out: &Path) -> u64 {
    let mut pid = None;
    wait_for(10, "the exec record", || {
        pid = complete_records(out)
            .iter()
            .find(|r| r["type"] == "exec")
            .and_then(|r| r["pid"].as_u64());
        pid.is_some()
    });
    pid.unwrap_or_default()
}

fn state(pid: u32) -> char {
    procfs::read_stat(pid).map_or('?', |s| s.state)
}

/// The model's normalised map from a snapshot record.
fn snapshot_ranges(snap: &Value) -> Vec<normalize::Range> {
    let vmas = snap["vmas"].as_array().expect("vmas");
    let items: Vec<(u64, u64, Perms, Option<String>)> = vmas
        .iter()
        .map(|v| {
            (
                v["start"].as_u64().expect("start"),
                v["end"].as_u64().expect("end"),
                Perms::parse(v["perms"].as_str().expect("perms")).expect("valid perms"),
                v["path"].as_str().map(str::to_string),
            )
        })
        .collect();
    normalize::normalize(
        items
            .iter()
            .map(|(s, e, p, path)| (*s, *e, *p, path.as_deref())),
    )
}

/// Takes a snapshot through SIGUSR1 and returns it.
fn signal_snapshot(vmatrace_pid: u32, out: &Path, pid: u64) -> Value {
    let count = |recs: &[Value]| {
        recs.iter()
            .filter(|r| r["type"] == "snapshot" && r["reason"] == "signal" && r["pid"] == pid)
            .count()
    };
    let before = count(&complete_records(out));
    kill(vmatrace_pid, libc::SIGUSR1);
    let mut snap = Value::Null;
    wait_for(10, "the signal snapshot", || {
        let recs = complete_records(out);
        if count(&recs) > before {
            snap = recs
                .iter()
                .rev()
                .find(|r| r["type"] == "snapshot" && r["reason"] == "signal" && r["pid"] == pid)
                .cloned()
                .unwrap_or(Value::Null);
            true
        } else {
            false
        }
    });
    snap
}

/// Anonymous bytes the kernel and the model disagree on, summed over the normalised ranges
/// (both sides split and merge VMAs differently, so each normalised range is compared whole),
/// with the largest single difference.
fn anon_difference(snap: &Value, smaps: &[procfs::SmapsEntry]) -> (u64, u64, String) {
    let rows = snap["vmas"].as_array().expect("vmas");
    let mut total = 0u64;
    let mut worst = (0u64, String::new());
    for r in snapshot_ranges(snap) {
        let inside = |s: u64, e: u64| s >= r.start && e <= r.end;
        let model: u64 = rows
            .iter()
            .filter(|v| {
                inside(
                    v["start"].as_u64().unwrap_or(0),
                    v["end"].as_u64().unwrap_or(0),
                )
            })
            .map(|v| v["anon_bytes"].as_u64().unwrap_or(0))
            .sum();
        let kernel: u64 = smaps
            .iter()
            .filter(|e| inside(e.start, e.end))
            .map(|e| e.anonymous)
            .sum();
        let d = model.abs_diff(kernel);
        total += d;
        if d > worst.0 {
            worst = (d, format!("{r}: model {model} kernel {kernel}"));
        }
    }
    (total, worst.0, worst.1)
}

/// At a checkpoint (the workload stopped itself): the map differences between the kernel and
/// a fresh SIGUSR1 snapshot, the kernel's smaps and the snapshot.
fn compare_stopped(
    vmatrace_pid: u32,
    out: &Path,
    pid: u64,
) -> (u64, Vec<String>, Vec<procfs::SmapsEntry>, Value) {
    wait_for(10, "the traced process to stop", || {
        state(pid as u32) == 'T'
    });
    let maps = procfs::read_maps(pid as u32).expect("maps");
    let smaps = procfs::read_smaps(pid as u32).expect("smaps");
    let snap = signal_snapshot(vmatrace_pid, out, pid);
    let kernel = normalize::normalize(
        maps.iter()
            .map(|m| (m.start, m.end, m.perms, m.path.as_deref())),
    );
    let diff = normalize::diff(&kernel, &snapshot_ranges(&snap));
    (pid, diff, smaps, snap)
}

#[test]
fn model_matches_proc_maps_and_smaps_at_every_checkpoint() {
    if !privileged("model_matches_proc_maps_and_smaps_at_every_checkpoint") {
        return;
    }
    let out = temp_path("checkpoints.ndjson");
    let workload = workload();
    let out_s = out.to_string_lossy().into_owned();
    let mut v = spawn(&[
        "--json",
        "-o",
        &out_s,
        "--faults",
        "all",
        "--",
        workload.to_str().expect("utf-8 path"),
        "checkpoints",
    ]);
    let vmatrace_pid = v.child.id();
    let mut seen = Vec::new();
    while let Some(Ok(line)) = v.lines.next() {
        let Some(name) = line.strip_prefix("checkpoint ") else {
            continue;
        };
        let (pid, diff, smaps, snap) = compare_stopped(vmatrace_pid, &out, exec_pid(&out));
        assert!(
            diff.is_empty(),
            "checkpoint {name}: model differs from /proc/{pid}/maps:\n{}",
            diff.join("\n")
        );

        // Touched anonymous bytes. Tolerance: pages the kernel fills without a user-visible
        // fault of this process — the stack pages exec writes the arguments and environment
        // into, and pages the kernel pre-faults for the loader — are invisible to a fault trace.
        // They are few and fixed: at most 64 KiB over the whole address space.
        let (total, worst, where_) = anon_difference(&snap, &smaps);
        assert!(
            total <= 64 * 1024,
            "checkpoint {name}: anonymous bytes differ by {total} in all (worst {worst}: {where_})"
        );
        eprintln!("checkpoint {name}: anonymous bytes differ by {total} in all");
        seen.push(name.to_string());
        kill(pid as u32, libc::SIGCONT);
    }
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    assert_eq!(
        seen,
        [
            "map_fixed",
            "munmap_across",
            "mremap_grow",
            "mremap_move",
            "mprotect_middle",
            "madvise_dontneed",
            "brk",
            "threads"
        ]
    );
    // The whole run parses and ends with a summary.
    let recs = records(&out);
    assert_eq!(
        recs.last().map(|r| r["type"].clone()),
        Some(Value::from("summary"))
    );
}

#[test]
fn model_matches_a_real_python_allocating_and_freeing() {
    if !privileged("model_matches_a_real_python_allocating_and_freeing") {
        return;
    }
    let Ok(python) = which_python() else {
        panic!("python3 is needed for this test (it is on every machine of this kind)");
    };
    // Allocate ~300 MiB in many objects, free most, stop for the comparison, then exit.
    let script = "import os,signal\n\
a=[bytearray(1<<20) for _ in range(200)]\n\
b=[bytes(100000) for _ in range(1000)]\n\
del a[::2]\n\
del b\n\
print('checkpoint python', flush=True)\n\
os.kill(os.getpid(), signal.SIGSTOP)\n";
    let out = temp_path("python.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let mut v = spawn(&[
        "--json", "-o", &out_s, "--faults", "all", "--", &python, "-c", script,
    ]);
    let vmatrace_pid = v.child.id();
    let mut compared = false;
    while let Some(Ok(line)) = v.lines.next() {
        if line != "checkpoint python" {
            continue;
        }
        let (pid, diff, smaps, snap) = compare_stopped(vmatrace_pid, &out, exec_pid(&out));
        assert!(
            diff.is_empty(),
            "python: model differs from /proc/{pid}/maps:\n{}",
            diff.join("\n")
        );
        let kernel_anon: u64 = smaps.iter().map(|e| e.anonymous).sum();
        let (total, worst, where_) = anon_difference(&snap, &smaps);
        // Same tolerance rule as above, relative to a process with ~100 MiB anonymous memory.
        assert!(
            total <= 64 * 1024 + kernel_anon / 100,
            "python: anonymous bytes differ by {total} of {kernel_anon} (worst {worst}: {where_})"
        );
        compared = true;
        kill(pid as u32, libc::SIGCONT);
    }
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    assert!(compared, "python reached its checkpoint");
}

fn which_python() -> Result<String, ()> {
    let o = Command::new("sh")
        .args(["-c", "command -v python3"])
        .output()
        .map_err(|_| ())?;
    let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if p.is_empty() { Err(()) } else { Ok(p) }
}

#[test]
fn a_followed_fork_child_matches_its_own_maps_and_smaps() {
    if !privileged("a_followed_fork_child_matches_its_own_maps_and_smaps") {
        return;
    }
    let out = temp_path("fork-checkpoint.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let w = workload();
    let mut v = spawn(&[
        "-f",
        "--json",
        "-o",
        &out_s,
        "--faults",
        "all",
        "--",
        w.to_str().expect("utf-8"),
        "fork-checkpoint",
    ]);
    let vmatrace_pid = v.child.id();
    let mut child = 0u64;
    let mut compared = false;
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("fork_child ") {
            child = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("child pid");
        }
        if line != "checkpoint fork_child" {
            continue;
        }
        let (pid, diff, smaps, snap) = compare_stopped(vmatrace_pid, &out, child);
        assert!(
            diff.is_empty(),
            "child {pid}: model differs from its maps:\n{}",
            diff.join("\n")
        );
        let (total, worst, where_) = anon_difference(&snap, &smaps);
        eprintln!("fork child: anonymous bytes differ by {total} in all");
        assert!(
            total <= 64 * 1024,
            "child: anonymous bytes differ by {total} (worst {worst}: {where_})"
        );
        compared = true;
        kill(pid as u32, libc::SIGCONT);
    }
    assert!(v.child.wait().expect("exits").success());
    assert!(compared, "the child reached its checkpoint");
}
