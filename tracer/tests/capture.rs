//! Privileged end-to-end tests of the capture path: real eBPF programs, a real child process,
//! and the exact calls it made.

mod common;

use common::*;
use tracer::{
    model::TouchKind,
    output::{OutputRecord, records::SyscallJson},
};

/// The records that are not faults, losses or snapshots.
fn syscalls<'a>(recs: &[&'a OutputRecord]) -> Vec<&'a OutputRecord> {
    recs.iter()
        .copied()
        .filter(|r| {
            !matches!(
                r,
                OutputRecord::Fault(_) | OutputRecord::Lost(_) | OutputRecord::Snapshot(_)
            )
        })
        .collect()
}

/// `records`, each of which must be a syscall.
fn calls<'a>(records: &[&'a OutputRecord]) -> Vec<&'a SyscallJson<'static>> {
    records
        .iter()
        .map(|r| r.syscall().unwrap_or_else(|| panic!("a syscall: {r:?}")))
        .collect()
}

#[test]
fn sees_exactly_the_mmap_munmap_brk_calls_of_the_child() {
    if !privileged("sees_exactly_the_mmap_munmap_brk_calls_of_the_child") {
        return;
    }
    let t = trace_workload(&["--faults", "none"], &["basic"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    let records = t.typed();
    let pid = typed_marker_pid(&records);
    let inside = typed_between_markers(&records, pid);
    let calls = syscalls(&inside);
    let types: Vec<&str> = calls.iter().map(|r| r.type_name()).collect();
    assert_eq!(types, ["mmap", "munmap", "brk", "brk", "brk"], "{calls:#?}");
    let calls = self::calls(&calls);
    let kind = |c: &SyscallJson| c.effect.as_ref().map(|e| e.kind.to_string());

    let mmap = line_numbers(&t.stdout, "mmap");
    let munmap = line_numbers(&t.stdout, "munmap");
    let brk = line_numbers(&t.stdout, "brk");
    // mmap(NULL, 64 KiB, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
    assert_eq!(calls[0].args[..4], [0, 65536, 3, 0x22]);
    assert_eq!(calls[0].fd, Some(-1));
    assert_eq!(calls[0].ret, mmap[0]);
    assert_eq!(kind(calls[0]).as_deref(), Some("created"));
    // munmap of the middle 16 KiB: it splits the VMA.
    assert_eq!(calls[1].args[0] as i64, munmap[0]);
    assert_eq!(calls[1].args[1] as i64, munmap[1]);
    assert_eq!(calls[1].ret, munmap[2]);
    let effect = calls[1].effect.as_ref().expect("an effect");
    assert_eq!(effect.unmapped_bytes, 16384);
    assert_eq!(effect.splits, 2, "two cuts: one VMA becomes two");
    // brk(0) -> cur, brk(cur + 128 KiB) -> grown, brk(cur) -> cur.
    assert_eq!(calls[2].args[0], 0);
    assert_eq!(calls[2].ret, brk[0]);
    assert_eq!(calls[3].args[0] as i64, brk[0] + 128 * 1024);
    assert_eq!(calls[3].ret, brk[1]);
    assert_eq!(kind(calls[3]).as_deref(), Some("grown"));
    assert_eq!(calls[4].args[0] as i64, brk[0]);
    assert_eq!(calls[4].ret, brk[2]);
    assert_eq!(kind(calls[4]).as_deref(), Some("shrunk"));
    for c in &calls {
        assert_eq!(c.pid, pid);
        assert_eq!(c.tid, pid);
        assert!(c.ts_ns >= c.enter_ts_ns);
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
    let records = t.typed();
    let exec = records
        .iter()
        .position(|r| matches!(r, OutputRecord::Exec(_)))
        .expect("exec record");
    let pid = records[exec].pid();
    let maps_after_exec = records[exec..]
        .iter()
        .filter(|r| r.call("mmap").is_some() && r.pid() == pid)
        .count();
    assert!(
        maps_after_exec >= 3,
        "the loader maps libc: {maps_after_exec}"
    );
    let libc_mapped = records
        .iter()
        .filter_map(|r| r.call("mmap"))
        .any(|m| m.path.as_deref().is_some_and(|p| p.contains("libc.so")));
    assert!(libc_mapped, "the libc mapping is named");
    assert!(
        records
            .iter()
            .any(|r| matches!(r, OutputRecord::Exit(_)) && r.pid() == pid)
    );
    last_summary(&records);
}

#[test]
fn failed_calls_carry_their_errno() {
    if !privileged("failed_calls_carry_their_errno") {
        return;
    }
    let t = trace_workload(&["--faults", "none"], &["fail"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    let records = t.typed();
    let pid = typed_marker_pid(&records);
    let inside = typed_between_markers(&records, pid);
    let calls = syscalls(&inside);
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let calls = self::calls(&calls);
    assert_eq!(calls[0].name(), "mmap");
    assert_eq!(calls[0].args[1], 1u64 << 46);
    assert_eq!(calls[0].errno.as_deref(), Some("ENOMEM"));
    assert_eq!(calls[0].ret, -12);
    assert_eq!(calls[1].name(), "munmap");
    assert_eq!(calls[1].errno.as_deref(), Some("EINVAL"));
}

#[test]
fn faults_from_several_threads_are_attributed_to_their_threads() {
    if !privileged("faults_from_several_threads_are_attributed_to_their_threads") {
        return;
    }
    let t = trace_workload(&["--faults", "all"], &["threads", "4", "16"]);
    assert_eq!(t.status, 0, "stderr: {}", t.stderr);
    // The x86 exception tracepoints carry the error code; the perf event (arm64) has none.
    let records = t.typed();
    let has_code = records
        .iter()
        .any(|r| matches!(r, OutputRecord::Meta(m) if m.fault_backend == "tracepoint"));
    let pid = typed_marker_pid(&records);
    let faults: Vec<_> = records
        .iter()
        .filter_map(OutputRecord::fault)
        .filter(|f| f.pid == pid)
        .collect();
    for (tid, start, pages) in thread_lines(&t.stdout) {
        assert_ne!(
            tid,
            u64::from(pid),
            "workers are threads, not the main thread"
        );
        let end = start + pages * 4096;
        let mine: Vec<_> = faults
            .iter()
            .filter(|f| f.address >= start && f.address < end && f.first_touch)
            .collect();
        assert_eq!(
            mine.len() as u64,
            pages,
            "one first touch per page of thread {tid}"
        );
        for f in mine {
            assert_eq!(u64::from(f.tid), tid);
            assert_eq!(
                f.page_kind,
                Some(TouchKind::Anon),
                "a write fault allocates an anonymous page"
            );
            if has_code {
                let code = f.error_code.expect("tracepoint backend has the code");
                assert_ne!(code & 2, 0, "write bit set");
            } else {
                assert!(f.error_code.is_none(), "{f:?}");
            }
        }
    }
}
