//! Compact output (issue #22): runs of first touches written as `touches` records are much
//! smaller than a fault record per page, and replay gives back what the live run saw.

mod common;

use common::*;
use serde_json::Value;

fn final_vmas(recs: &[Value], pid: &Value) -> Value {
    recs.iter()
        .rev()
        .find(|r| r["type"] == "snapshot" && r["pid"] == *pid && r["reason"] != "signal")
        .map(|r| r["vmas"].clone())
        .unwrap_or(Value::Null)
}

/// Traces `args` with the default `--faults first` into a file; checks that replay of it
/// gives the live summary and final maps; returns the records as written.
fn traced_and_replayed(name: &str, args: &[&str]) -> Vec<Value> {
    let traced = trace_workload(&[], args);
    assert_eq!(traced.status, 0, "{name}: {}", traced.stderr);
    let raw = traced.raw;
    assert_eq!(raw[0]["faults"], "first");
    let live = raw.last().expect("records");
    assert_eq!(live["type"], "summary");
    let again = replayed(&traced.path);
    let summary = again.last().expect("replay output");
    assert_eq!(summary["type"], "summary");
    // With `--faults first` the faults that changed nothing are not written: replay counts
    // the others. Everything else is the live run's.
    assert_eq!(
        processes_without_fault_counts(summary),
        processes_without_fault_counts(live),
        "{name}: replay reproduces the live summary"
    );
    for (again, p) in summary["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .zip(live["processes"].as_array().expect("processes"))
    {
        assert!(
            again["faults"].as_u64() <= p["faults"].as_u64(),
            "{again} {p}"
        );
    }
    for p in live["processes"].as_array().expect("processes") {
        let pid = &p["pid"];
        assert_eq!(
            final_vmas(&again, pid),
            final_vmas(&raw, pid),
            "{name}: replay ends with the live run's map of {pid}"
        );
    }
    raw
}

#[test]
fn runs_of_first_touches_are_ten_times_smaller_and_replay_to_the_live_summary() {
    if !privileged("runs_of_first_touches_are_ten_times_smaller_and_replay_to_the_live_summary") {
        return;
    }
    // The fault-heavy benchmark's shape: map 256 pages, touch each, unmap; 200 times.
    let raw = traced_and_replayed("fault-loop", &["fault-loop", "200", "256"]);
    let bytes = |recs: &[Value]| -> usize {
        recs.iter()
            .map(|r| serde_json::to_string(r).expect("serializes").len() + 1)
            .sum()
    };
    let runs = raw.iter().filter(|r| r["type"] == "touches").count();
    let touched: u64 = raw
        .iter()
        .filter(|r| r["type"] == "touches")
        .filter_map(|r| r["pages"].as_u64())
        .sum();
    // The same records with a fault record per page: the output before runs.
    let per_page = per_fault(raw.clone());
    let (compact, expanded) = (bytes(&raw), bytes(&per_page));
    let live = raw.last().expect("summary");
    let events = live["processes"][0]["faults"].as_u64().unwrap_or(0)
        + live["processes"][0]["syscalls"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
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
    let raw = traced_and_replayed("threads", &["threads", "4", "512"]);
    let tids: std::collections::BTreeSet<u64> = raw
        .iter()
        .filter(|r| r["type"] == "touches")
        .filter_map(|r| r["tid"].as_u64())
        .collect();
    assert!(tids.len() >= 4, "runs of several threads: {tids:?}");
    let times: Vec<u64> = raw
        .iter()
        .filter(|r| !matches!(r["type"].as_str(), Some("meta" | "summary" | "snapshot")))
        .filter_map(|r| r["ts_ns"].as_u64())
        .collect();
    assert!(times.is_sorted(), "records stay in time order");
    // A forked child copies its parent's map: runs of both, and of the copies on write.
    traced_and_replayed("fork", &["fork"]);
}
