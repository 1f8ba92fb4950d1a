//! Privileged robustness tests: vmatrace killed or stopped in every way leaves no eBPF
//! program behind and no broken output; the traced process dying mid-trace; two instances at
//! once; a full disk.

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// Programs of ours currently loaded in the kernel (by the names of our entry points).
fn our_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str().is_some_and(|n| {
                n.starts_with("sys_enter_mmap")
                    || n.starts_with("page_fault_user")
                    || n.starts_with("task_newtask")
            })
        })
        .count()
}

fn assert_nothing_left(what: &str) {
    // Links and programs go with the last fd, which the kernel closes at exit.
    wait_for(10, &format!("{what}: programs unloaded"), || {
        our_programs() == 0
    });
}

fn last_record(path: &std::path::Path) -> Value {
    records(path).last().cloned().expect("some records")
}

#[test]
fn sigterm_and_sigint_end_with_a_summary_and_unload_everything() {
    if !privileged("sigterm_and_sigint_end_with_a_summary_and_unload_everything") {
        return;
    }
    assert_nothing_left("before");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let file = temp_path(&format!("sig-{sig}.ndjson"));
        let w = workload();
        let mut v = Command::new(vmatrace())
            .args(["--json", "-o"])
            .arg(&file)
            .args(["--", w.to_str().expect("utf-8"), "spin", "20000", "1000"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starts");
        wait_for(20, "tracing", || {
            std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"type\":\"munmap\""))
        });
        assert!(our_programs() > 0, "the probe is loaded while tracing");
        kill(v.id(), sig);
        v.wait().expect("exits");
        assert_eq!(last_record(&file)["type"], "summary", "signal {sig}");
        // The workload keeps running untraced; stop it.
        let pid = records(&file)
            .iter()
            .find(|r| r["type"] == "exec")
            .and_then(|r| r["pid"].as_u64())
            .expect("exec");
        kill(pid as u32, libc::SIGKILL);
        assert_nothing_left(&format!("after signal {sig}"));
    }
}

#[test]
fn a_traced_process_killed_mid_trace_ends_the_run_cleanly() {
    if !privileged("a_traced_process_killed_mid_trace_ends_the_run_cleanly") {
        return;
    }
    let file = temp_path("killed.ndjson");
    let w = workload();
    let mut v = Command::new(vmatrace())
        .args(["--json", "--faults", "all", "-o"])
        .arg(&file)
        .args(["--", w.to_str().expect("utf-8"), "spin", "20000", "100"])
        .stdout(Stdio::null())
        .spawn()
        .expect("starts");
    let mut pid = 0;
    wait_for(20, "tracing", || {
        pid = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| {
                t.lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|r| r["type"] == "exec")
                    .and_then(|r| r["pid"].as_u64())
            })
            .unwrap_or(0);
        pid != 0
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    kill(pid as u32, libc::SIGKILL);
    let status = v.wait().expect("exits");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGKILL),
        "the child's fate is vmatrace's status"
    );
    let recs = records(&file);
    assert!(recs.iter().any(|r| r["type"] == "exit" && r["pid"] == pid));
    assert!(
        recs.iter()
            .any(|r| r["type"] == "snapshot" && r["reason"] == "exit")
    );
    assert_eq!(
        recs.last().map(|r| r["type"].clone()),
        Some(Value::from("summary"))
    );
    assert_nothing_left("after the traced process was killed");
}

#[test]
fn output_piped_to_head_ends_quietly() {
    if !privileged("output_piped_to_head_ends_quietly") {
        return;
    }
    let w = workload();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --json -- {} spin 3000 1000 | head -n 3",
            vmatrace().display(),
            w.display()
        ))
        .output()
        .expect("runs");
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    for l in lines {
        serde_json::from_str::<Value>(l).expect("each line that got through is whole JSON");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_nothing_left("after SIGPIPE");
}

#[test]
fn two_instances_trace_their_own_processes_without_disturbing_each_other() {
    if !privileged("two_instances_trace_their_own_processes_without_disturbing_each_other") {
        return;
    }
    let w = workload();
    let files = [temp_path("two-a.ndjson"), temp_path("two-b.ndjson")];
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            Command::new(vmatrace())
                .args(["--json", "--faults", "none", "-o"])
                .arg(f)
                .args(["--", w.to_str().expect("utf-8"), "basic"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("starts")
        })
        .collect();
    for (child, file) in children.into_iter().zip(&files) {
        let o = child.wait_with_output().expect("exits");
        assert!(o.status.success());
        let stdout = String::from_utf8_lossy(&o.stdout);
        let recs = records(file);
        let pid = marker_pid(&recs);
        // Only its own process appears, and its calls are exactly the workload's.
        assert!(
            recs.iter()
                .filter_map(|r| r["pid"].as_u64())
                .all(|p| p == pid)
        );
        let inside = between_markers(&recs, pid);
        let mmap = inside.iter().find(|r| r["type"] == "mmap").expect("mmap");
        assert_eq!(mmap["ret"], line_numbers(&stdout, "mmap")[0]);
    }
}

#[test]
fn a_full_disk_leaves_only_whole_lines() {
    if !privileged("a_full_disk_leaves_only_whole_lines") {
        return;
    }
    let dir = temp_path("tiny-tmpfs");
    std::fs::create_dir_all(&dir).expect("dir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&dir)
        .status()
        .expect("mount runs")
        .success();
    assert!(ok, "mounting a 64 KiB tmpfs");
    let file = dir.join("out.ndjson");
    let w = workload();
    let o = Command::new(vmatrace())
        .args(["--json", "--faults", "all", "-o"])
        .arg(&file)
        .args(["--", w.to_str().expect("utf-8"), "spin", "2000"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&o.stderr);
    let text = std::fs::read_to_string(&file).expect("reads");
    let _ = Command::new("umount").arg(&dir).status();
    assert_ne!(o.status.code(), Some(0), "a full disk is an error");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(text.ends_with('\n'), "no partial last line");
    for l in text.lines() {
        serde_json::from_str::<Value>(l).expect("every line on disk is whole JSON");
    }
    assert_nothing_left("after a full disk");
}
