//! The timeline in the Chrome trace event format (JSON), which ui.perfetto.dev and
//! chrome://tracing open, drawn from the lanes of [`super::timeline_view`]: per process, one
//! counter track per region (heap, stack, arena or block of anonymous memory, file, the least
//! active folded by kind) with its touched bytes, reserved bytes with access and reserved bytes
//! without access, plus the process's totals; and one slice per region for its life, named by
//! it, with its peaks and how many mappings it saw created and removed. A value is written when
//! it changes, over the whole run (the first and last columns always), so the size depends on
//! the regions and columns, not on the number of VMA pieces.

use serde_json::{Value, json};

use super::timeline_view::{Picture, Series};
use crate::flags::size;

/// Columns of the trace.
pub const COLUMNS: usize = 500;

/// Counter events of `series` named `name` for `pid`, at each column where a value changed.
fn counters(pic: &Picture, pid: u32, name: &str, s: &Series, events: &mut Vec<Value>) {
    // Each column's values at its start, and the last ones again at the end of the run.
    let us = |c: usize| pic.column_ns(c) as f64 / 1000.0;
    let mut last = None;
    for c in 0..=pic.columns {
        // The most in the column, so that churn within it is not lost.
        let i = c.min(pic.columns - 1);
        let now = (s.peak_touched[i], s.access[i], s.none[i]);
        if last == Some(now) && c < pic.columns - 1 {
            continue;
        }
        last = Some(now);
        events.push(json!({
            "ph": "C",
            "name": name,
            "pid": pid,
            "tid": 0,
            "ts": us(c),
            "args": {
                "touched_bytes": now.0,
                "reserved_bytes": now.1,
                "reserved_no_access_bytes": now.2,
            },
        }));
    }
}

/// The column range where `s` has anything.
fn life(s: &Series) -> Option<(usize, usize)> {
    let busy = |c: usize| {
        s.peak_reserved[c] > 0 || s.peak_touched[c] > 0 || s.created[c] > 0 || s.removed[c] > 0
    };
    let first = (0..s.access.len()).find(|&c| busy(c))?;
    let last = (0..s.access.len()).rev().find(|&c| busy(c))?;
    Some((first, last))
}

/// Builds the trace. Timestamps are microseconds from the first event.
pub fn trace(pic: &Picture) -> Value {
    let mut events = Vec::new();
    let end_us = (pic.t1_ns - pic.t0_ns) as f64 / 1000.0;
    for p in &pic.processes {
        let name = if p.processes > 1 {
            p.name.clone()
        } else {
            format!("{} ({})", p.name, p.pid)
        };
        events.push(json!({"ph": "M", "name": "process_name", "pid": p.pid, "tid": 0, "args": {"name": name}}));
        counters(pic, p.pid, "memory (all regions)", &p.total, &mut events);
        for (i, lane) in p.lanes.iter().enumerate() {
            let s = &lane.series;
            counters(pic, p.pid, &lane.label, s, &mut events);
            let Some((first, last)) = life(s) else {
                continue;
            };
            let tid = i as u64 + 1;
            events.push(json!({"ph": "M", "name": "thread_name", "pid": p.pid, "tid": tid, "args": {"name": lane.label}}));
            let from = pic.column_ns(first) as f64 / 1000.0;
            let to = if last + 1 >= pic.columns {
                end_us
            } else {
                pic.column_ns(last + 1) as f64 / 1000.0
            };
            events.push(json!({
                "ph": "X",
                "name": format!("{} {}", lane.kind, size(s.max_access().max(s.max_touched()))),
                "cat": "region",
                "pid": p.pid,
                "tid": tid,
                "ts": from,
                "dur": (to - from).max(0.001),
                "args": {
                    "region": lane.label,
                    "kind": lane.kind,
                    "regions": lane.regions,
                    "max_touched_bytes": s.max_touched(),
                    "max_reserved_bytes": s.max_access(),
                    "max_reserved_no_access_bytes": s.max_none(),
                    "mappings_created": s.total_created(),
                    "mappings_removed": s.removed.iter().map(|&c| u64::from(c)).sum::<u64>(),
                },
            }));
        }
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}
