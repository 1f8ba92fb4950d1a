//! The timeline in the Chrome trace event format (JSON), which ui.perfetto.dev and
//! chrome://tracing open: one track per VMA piece (a complete `X` event for its lifetime),
//! counters of reserved and touched bytes per process, process and track names.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::timeline_view::{Band, Sample, time_span};
use crate::flags::size;

/// Builds the trace. Timestamps are microseconds from the first event.
pub fn trace(names: &BTreeMap<u32, String>, bands: &[Band], samples: &[Sample]) -> Value {
    let (t0, end) = time_span(bands, samples);
    let us = |ns: u64| ns.saturating_sub(t0) as f64 / 1000.0;
    let mut events = Vec::new();
    for (pid, name) in names {
        events.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": format!("{name} ({pid})")}}));
    }
    for (i, b) in bands.iter().enumerate() {
        let tid = i as u64 + 1;
        let path = b
            .vma
            .backing
            .path(b.vma.perms.shared)
            .unwrap_or_else(|| "anon".into());
        let label = format!("{:x}-{:x} {} {}", b.vma.start, b.vma.end, b.vma.perms, path);
        events.push(json!({"ph": "M", "name": "thread_name", "pid": b.pid, "tid": tid, "args": {"name": label}}));
        let to = b.to_ns.unwrap_or(end).max(b.from_ns);
        events.push(json!({
            "ph": "X",
            "name": format!("{} {}", b.vma.backing.kind(), size(b.vma.len())),
            "cat": "vma",
            "pid": b.pid,
            "tid": tid,
            "ts": us(b.from_ns),
            "dur": (us(to) - us(b.from_ns)).max(0.001),
            "args": {
                "start": format!("{:#x}", b.vma.start),
                "end": format!("{:#x}", b.vma.end),
                "perms": b.vma.perms.to_string(),
                "path": path,
                "created_by": b.created_by.name(),
                "removed_by": b.removed_by.map(|c| c.name()),
                "touched_permille": b.touched_permille,
            },
        }));
    }
    for s in samples {
        events.push(json!({
            "ph": "C",
            "name": "memory",
            "pid": s.pid,
            "tid": 0,
            "ts": us(s.ts_ns),
            "args": {"reserved_bytes": s.reserved_bytes, "touched_bytes": s.touched_bytes},
        }));
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}
