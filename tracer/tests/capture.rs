//! Privileged end-to-end tests of the capture path: real eBPF programs, a real child process,
//! and the exact calls it made.

mod common;

use common::*;
use serde_json::Value;

fn syscalls(recs: &[Value]) -> Vec<&Value> {
    recs.iter()
        .filter(|r| !matches!(r["type"].as_str(), Some("fault" | "lost" | "snapshot")))
        .collect()
}

#[test]
fn sees_exactly_the_mmap_munmap_brk_calls_of_the_child() {
    if !privileged("sees_exactly_the_mmap_munmap_brk_calls_of_the_child") {
        return;
    }
    let t = trace_workload(&["--faults", "none"], &["basic"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    let pid = marker_pid(&t.records);
    let inside = between_markers(&t.records, pid);
    let calls = syscalls(&inside);
    let types: Vec<&str> = calls.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(types, ["mmap", "munmap", "brk", "brk", "brk"], "{calls:#?}");

    let mmap = line_numbers(&t.stdout, "mmap");
    let munmap = line_numbers(&t.stdout, "munmap");
    let brk = line_numbers(&t.stdout, "brk");
    // mmap(NULL, 64 KiB, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
    assert_eq!(calls[0]["args"][0], 0);
    assert_eq!(calls[0]["args"][1], 65536);
    assert_eq!(calls[0]["args"][2], 3);
    assert_eq!(calls[0]["args"][3], 0x22);
    assert_eq!(calls[0]["fd"], -1);
    assert_eq!(calls[0]["ret"], mmap[0]);
    assert_eq!(calls[0]["effect"]["kind"], "created");
    // munmap of the middle 16 KiB: it splits the VMA.
    assert_eq!(calls[1]["args"][0], munmap[0]);
    assert_eq!(calls[1]["args"][1], munmap[1]);
    assert_eq!(calls[1]["ret"], munmap[2]);
    assert_eq!(calls[1]["effect"]["unmapped_bytes"], 16384);
    assert_eq!(
        calls[1]["effect"]["splits"], 2,
        "two cuts: one VMA becomes two"
    );
    // brk(0) -> cur, brk(cur + 128 KiB) -> grown, brk(cur) -> cur.
    assert_eq!(calls[2]["args"][0], 0);
    assert_eq!(calls[2]["ret"], brk[0]);
    assert_eq!(calls[3]["args"][0], brk[0] + 128 * 1024);
    assert_eq!(calls[3]["ret"], brk[1]);
    assert_eq!(calls[3]["effect"]["kind"], "grown");
    assert_eq!(calls[4]["args"][0], brk[0]);
    assert_eq!(calls[4]["ret"], brk[2]);
    assert_eq!(calls[4]["effect"]["kind"], "shrunk");
    for c in &calls {
        assert_eq!(c["pid"], pid);
        assert_eq!(c["tid"], pid);
        assert!(c["ts_ns"].as_u64() >= c["enter_ts_ns"].as_u64());
    }
}

#[test]
fn launch_mode_sees_the_dynamic_loader_and_propagates_the_exit_status() {
    if !privileged("launch_mode_sees_the_dynamic_loader_and_propagates_the_exit_status") {
        return;
    }
    let t = trace_workload(&["--faults", "none"], &["exit", "7"]);
    assert_eq!(t.status, 7, "stderr: {}", t.stderr);
    // The exec is traced, and the loader's first mmaps come after it.
    let exec = t
        .records
        .iter()
        .position(|r| r["type"] == "exec")
        .expect("exec record");
    let pid = t.records[exec]["pid"].clone();
    let maps_after_exec = t.records[exec..]
        .iter()
        .filter(|r| r["type"] == "mmap" && r["pid"] == pid)
        .count();
    assert!(
        maps_after_exec >= 3,
        "the loader maps libc: {maps_after_exec}"
    );
    let libc_mapped = t
        .records
        .iter()
        .any(|r| r["type"] == "mmap" && r["path"].as_str().is_some_and(|p| p.contains("libc.so")));
    assert!(libc_mapped, "the libc mapping is named");
    assert!(
        t.records
            .iter()
            .any(|r| r["type"] == "exit" && r["pid"] == pid)
    );
    let summary = t.records.last().expect("records");
    assert_eq!(summary["type"], "summary");
}

#[test]
fn failed_calls_carry_their_errno() {
    if !privileged("failed_calls_carry_their_errno") {
        return;
    }
    let t = trace_workload(&["--faults", "none"], &["fail"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    let pid = marker_pid(&t.records);
    let inside = between_markers(&t.records, pid);
    let calls = syscalls(&inside);
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[0]["type"], "mmap");
    assert_eq!(calls[0]["args"][1], 1u64 << 46);
    assert_eq!(calls[0]["errno"], "ENOMEM");
    assert_eq!(calls[0]["ret"], -12);
    assert_eq!(calls[1]["type"], "munmap");
    assert_eq!(calls[1]["errno"], "EINVAL");
}

#[test]
fn faults_from_several_threads_are_attributed_to_their_threads() {
    if !privileged("faults_from_several_threads_are_attributed_to_their_threads") {
        return;
    }
    let t = trace_workload(&["--faults", "all"], &["threads", "4", "16"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    // The x86 exception tracepoints carry the error code; the perf event (arm64) has none.
    let has_code = t
        .records
        .iter()
        .any(|r| r["type"] == "meta" && r["fault_backend"] == "tracepoint");
    let pid = marker_pid(&t.records);
    let faults: Vec<&Value> = t
        .records
        .iter()
        .filter(|r| r["type"] == "fault" && r["pid"] == pid)
        .collect();
    for (tid, start, pages) in thread_lines(&t.stdout) {
        assert_ne!(tid, pid, "workers are threads, not the main thread");
        let end = start + pages * 4096;
        let mine: Vec<&&Value> = faults
            .iter()
            .filter(|f| {
                f["address"].as_u64().is_some_and(|a| a >= start && a < end)
                    && f["first_touch"] == true
            })
            .collect();
        assert_eq!(
            mine.len() as u64,
            pages,
            "one first touch per page of thread {tid}"
        );
        for f in mine {
            assert_eq!(f["tid"], tid);
            assert_eq!(
                f["page_kind"], "anon",
                "a write fault allocates an anonymous page"
            );
            if has_code {
                let code = f["error_code"]
                    .as_u64()
                    .expect("tracepoint backend has the code");
                assert_ne!(code & 2, 0, "write bit set");
            } else {
                assert!(f["error_code"].is_null(), "{f}");
            }
        }
    }
}
