//! Compact output (issue #22): runs of first touches written as `touches` records are much
//! smaller than a fault record per page, and replay gives back what the live run saw.

mod common;

use common::*;
use serde_json::Value;
use tracer::output::{OutputRecord, report::VmaRow};

fn final_vmas(recs: &[OutputRecord], pid: u32) -> Option<Option<Vec<VmaRow>>> {
    recs.iter()
        .rev()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.pid == pid && s.reason != tracer::output::SnapshotReason::Signal)
        .map(|s| s.vmas.clone())
}

/// Traces `args` with the default `--faults first` into a file; checks that replay of it
/// gives the live summary and final maps; returns the records as written.
fn traced_and_replayed(name: &str, args: &[&str]) -> Traced {
    let traced = trace_workload(&[], args);
    assert_eq!(traced.status, 0, "{name}: {}", traced.stderr);
    let raw = typed(&traced.raw);
    match &raw[0] {
        OutputRecord::Meta(m) => assert_eq!(m.faults, "first"),
        other => panic!("the first record is meta: {other:?}"),
    }
    let live = last_summary(&raw);
    let again = replayed_typed(&traced.path);
    let summary = last_summary(&again);
    // With `--faults first` the faults that changed nothing are not written: replay counts
    // the others. Everything else is the live run's.
    assert_eq!(
        processes_without_fault_counts(summary),
        processes_without_fault_counts(live),
        "{name}: replay reproduces the live summary"
    );
    for (again, p) in summary.processes.iter().zip(&live.processes) {
        assert!(again.faults <= p.faults, "{again:?} {p:?}");
    }
    for p in &live.processes {
        assert_eq!(
            final_vmas(&again, p.pid),
            final_vmas(&raw, p.pid),
            "{name}: replay ends with the live run's map of {}",
            p.pid
        );
    }
    traced
}

#[test]
fn runs_of_first_touches_are_ten_times_smaller_and_replay_to_the_live_summary() {
    if !privileged("runs_of_first_touches_are_ten_times_smaller_and_replay_to_the_live_summary") {
        return;
    }
    // The fault-heavy benchmark's shape: map 256 pages, touch each, unmap; 200 times.
    let traced = traced_and_replayed("fault-loop", &["fault-loop", "200", "256"]);
    // Sizes are of the JSON as written: measured on the values, not the typed records.
    let bytes = |recs: &[Value]| -> usize {
        recs.iter()
            .map(|r| serde_json::to_string(r).expect("serializes").len() + 1)
            .sum()
    };
    let raw = typed(&traced.raw);
    let run_pages: Vec<u64> = raw
        .iter()
        .filter_map(|r| match r {
            OutputRecord::Touches(t) => Some(t.pages),
            _ => None,
        })
        .collect();
    let runs = run_pages.len();
    let touched: u64 = run_pages.iter().sum();
    // The same records with a fault record per page: the output before runs.
    let per_page = per_fault(traced.raw.clone());
    let (compact, expanded) = (bytes(&traced.raw), bytes(&per_page));
    let live = last_summary(&raw);
    let events = live.processes[0].faults + live.processes[0].syscalls.values().sum::<u64>();
    eprintln!(
        "{runs} touches records for {touched} pages; {compact} bytes against {expanded} with a record per fault ({:.1}x); {events} events: {:.1} against {:.1} bytes per event",
        expanded as f64 / compact as f64,
        compact as f64 / events as f64,
        expanded as f64 / events as f64,
    );
    assert!(
        touched >= 200 * 256,
        "every loop's pages are in runs: {touched}"
    );
    assert!(
        runs <= 4 * 200,
        "about one run per loop, not one per page: {runs}"
    );
    assert!(
        expanded >= 10 * compact,
        "at least ten times smaller: {compact} against {expanded}"
    );
}

#[test]
fn interleaved_threads_and_processes_replay_to_the_live_summary() {
    if !privileged("interleaved_threads_and_processes_replay_to_the_live_summary") {
        return;
    }
    // Four threads touching their own regions at once: their runs interleave and break.
    let raw = typed(&traced_and_replayed("threads", &["threads", "4", "512"]).raw);
    let tids: std::collections::BTreeSet<u32> = raw
        .iter()
        .filter_map(|r| match r {
            OutputRecord::Touches(t) => Some(t.tid),
            _ => None,
        })
        .collect();
    assert!(tids.len() >= 4, "runs of several threads: {tids:?}");
    let times: Vec<u64> = raw
        .iter()
        .filter(|r| {
            !matches!(
                r,
                OutputRecord::Meta(_) | OutputRecord::Summary(_) | OutputRecord::Snapshot(_)
            )
        })
        .map(|r| {
            r.syscall()
                .and_then(|s| s.commit_ts_ns)
                .unwrap_or(r.ts_ns())
        })
        .collect();
    assert!(
        times.is_sorted(),
        "records stay in time order (syscalls at their commit)"
    );
    // A forked child copies its parent's map: runs of both, and of the copies on write.
    traced_and_replayed("fork", &["fork"]);
}
