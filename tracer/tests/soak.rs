//! The soak test: a process that maps, touches and unmaps memory without end, traced for ten
//! minutes. vmatrace's memory must stay bounded and the run must end cleanly with everything
//! counted. Ignored by default (it takes ten minutes); `cargo xtask bench --soak` runs it on a
//! release build. `VMATRACE_SOAK_SECS` shortens it (at least 60 s).

mod common;

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use serde_json::Value;

/// Resident memory of `pid` in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "ten minutes: run by `cargo xtask bench --soak`"]
fn soak_memory_stays_bounded() {
    if !privileged("soak_memory_stays_bounded") {
        return;
    }
    let secs: u64 = std::env::var("VMATRACE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
        .max(60);
    // Every event as NDJSON on a pipe that this test reads (and counts) as fast as it comes.
    let mut vm = Command::new(vmatrace())
        .args(["--json", "--"])
        .arg(workload())
        .args(["spin", &(secs * 1000).to_string(), "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("vmatrace starts");
    let pid = vm.id();
    let stdout = vm.stdout.take().expect("piped");
    let lines = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        let mut last = VecDeque::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("whole lines");
            counter.fetch_add(1, Ordering::Relaxed);
            if last.len() == 3 {
                last.pop_front();
            }
            last.push_back(line);
        }
        last
    });
    let interval = Duration::from_secs(secs / 20);
    let mut samples = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(interval);
        samples.push(rss_kib(pid));
    }
    let status = vm.wait().expect("vmatrace ends");
    let last = reader.join().expect("reader");
    let records = lines.load(Ordering::Relaxed);
    let summary: Value = serde_json::from_str(last.back().expect("output")).expect("JSON");
    println!(
        "soak: {secs} s, {records} records, vmatrace RSS every {} s (KiB): {samples:?}",
        interval.as_secs()
    );
    println!("soak: losses {}", summary["lost"]);
    assert!(status.success(), "vmatrace ended with {status}");
    assert_eq!(summary["type"], "summary");
    let p = &summary["processes"][0];
    println!(
        "soak: syscalls {}, faults {}, history entries {}",
        p["syscalls"], p["faults"], p["history_entries"]
    );
    assert!(records > 1_000_000, "the workload ran: {records} records");
    // Bounded: the second half never grows past the first half's peak by more than 8 MiB
    // (allocator slack), and everything stays under the 64 MiB budget.
    let (early, late) = samples.split_at(samples.len() / 2);
    let early_max = early.iter().copied().max().unwrap_or(0);
    let late_max = late.iter().copied().max().unwrap_or(0);
    assert!(
        late_max <= early_max + 8 * 1024,
        "vmatrace grew: first half peak {early_max} KiB, second half {late_max} KiB"
    );
    assert!(late_max <= 64 * 1024, "over 64 MiB: {late_max} KiB");
}
