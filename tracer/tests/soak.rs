//! The soak tests: a process that maps, touches and unmaps memory without end, traced for ten
//! minutes, and the always-on mode (bounded, rotated, compressed output with periodic
//! snapshots) on a steadier server-like load for an hour. vmatrace's memory and its output
//! must stay bounded and the run must end cleanly with everything counted. Ignored by default;
//! `cargo xtask bench --soak` runs them on a release build. `VMATRACE_SOAK_SECS` shortens them
//! (at least 60 s).

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
use tracer::output::OutputRecord;

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

/// How long a soak runs: `VMATRACE_SOAK_SECS`, else `default`; at least a minute.
fn soak_secs(default: u64) -> u64 {
    std::env::var("VMATRACE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(60)
}

#[test]
#[ignore = "ten minutes: run by `cargo xtask bench --soak`"]
fn soak_memory_stays_bounded() {
    if !privileged("soak_memory_stays_bounded") {
        return;
    }
    let secs = soak_secs(600);
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
    let summary = match OutputRecord::from_value(summary) {
        Ok(OutputRecord::Summary(s)) => s.record,
        other => panic!("the last record is a summary: {other:?}"),
    };
    println!(
        "soak: {secs} s, {records} records, vmatrace RSS every {} s (KiB): {samples:?}",
        interval.as_secs()
    );
    println!("soak: losses {:?}", summary.lost);
    assert!(status.success(), "vmatrace ended with {status}");
    let p = &summary.processes[0];
    println!(
        "soak: syscalls {:?}, faults {}, history entries {}",
        p.syscalls, p.faults, p.history_entries
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

/// Issue #20: always on for an hour, as a service would run it (`record --max-size 8M
/// --max-files 4 --snapshot-every 10s -o trace.ndjson.zst`), on a server-like load (a round of
/// map, touch 16 pages, unmap every half millisecond: about 40,000 events a second). The
/// daemon's resident memory stays flat, the files on disk stay within the caps, and every file
/// kept replays on its own.
#[test]
#[ignore = "an hour: run by `cargo xtask bench --soak`"]
fn always_on_output_and_memory_stay_within_their_caps() {
    if !privileged("always_on_output_and_memory_stay_within_their_caps") {
        return;
    }
    const MAX_SIZE: u64 = 8 << 20;
    const MAX_FILES: u64 = 4;
    let secs = soak_secs(3600);
    let dir = temp_path("always-on");
    std::fs::create_dir_all(&dir).expect("a directory");
    let out = dir.join("trace.ndjson.zst");
    let vm = Command::new(vmatrace())
        .args([
            "record",
            "--max-size",
            "8M",
            "--max-files",
            "4",
            "--snapshot-every",
            "10s",
        ])
        .args(["--duration", &format!("{secs}s"), "--force", "-o"])
        .arg(&out)
        .arg("--")
        .arg(workload())
        .args(["spin", &((secs + 60) * 1000).to_string(), "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmatrace starts");
    let pid = vm.id();
    let on_disk = || -> (u64, u64) {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
            })
            .unwrap_or((0, 0))
    };
    let interval = Duration::from_secs(secs / 20);
    let (mut rss, mut disk) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        std::thread::sleep(interval);
        rss.push(rss_kib(pid));
        disk.push(on_disk());
    }
    let output = vm.wait_with_output().expect("vmatrace ends");
    let err = String::from_utf8_lossy(&output.stderr);
    println!(
        "always on: {secs} s, vmatrace RSS every {} s (KiB): {rss:?}",
        interval.as_secs()
    );
    println!("always on: files and bytes on disk: {disk:?}");
    println!("always on: {}", err.lines().last().unwrap_or(""));
    // Ended by --duration: the launched workload's SIGTERM status.
    assert!(!err.contains("error"), "{err}");
    // The model's history fills up to its cap (200,000 entries) in the first minute or two;
    // flat is asserted for runs long enough to see past that (the hour).
    let (early, late) = rss.split_at(rss.len() / 2);
    let early_max = early.iter().copied().max().unwrap_or(0);
    let late_max = late.iter().copied().max().unwrap_or(0);
    assert!(
        secs < 600 || late_max <= early_max + 8 * 1024,
        "vmatrace grew: first half peak {early_max} KiB, second half {late_max} KiB"
    );
    // The caps: the files kept, each at most the cap plus the compressor's unwritten block.
    let slack = 128 << 10;
    for &(files, bytes) in &disk {
        assert!(files <= MAX_FILES, "{files} files");
        assert!(bytes <= MAX_FILES * (MAX_SIZE + slack), "{bytes} bytes");
    }
    // An hour fills the four files many times over (a minute fills about 7 MB of zstd).
    let rotated = disk.iter().map(|&(n, _)| n).max().unwrap_or(0);
    assert!(
        secs < 600 || rotated == MAX_FILES,
        "the output rotated: {disk:?}"
    );
    for entry in std::fs::read_dir(&dir).expect("the files") {
        let path = entry.expect("a file").path();
        let o = Command::new(vmatrace())
            .arg("replay")
            .arg(&path)
            .stdout(Stdio::null())
            .output()
            .expect("replay runs");
        assert!(
            o.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
