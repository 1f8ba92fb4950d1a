//! Privileged end-to-end test of mapping ids (docs/json-schema.md, "Mapping ids"), checked
//! against what the kernel did: at each checkpoint where the traced workload has stopped
//! itself, the model's VMAs are exactly the kernel's (`/proc/PID/maps`), and the ids say which
//! mapping each range is, through a split, a merge back, a merge with a neighbour, a move, a
//! growth in place and a hole. A replay of the recording gives the same ids, and the report's
//! growth finding names the mapping that grew.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use tracer::procfs;

const PAGE: u64 = 4096;

fn signal_snapshots(recs: &[Value], pid: u64) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["type"] == "snapshot" && r["reason"] == "signal" && r["pid"] == pid)
        .cloned()
        .collect()
}

/// The VMAs of a snapshot inside `[lo, hi)`, clipped: (start, end, perms).
fn model_vmas(snap: &Value, lo: u64, hi: u64) -> Vec<(u64, u64, String)> {
    snap["vmas"]
        .as_array()
        .expect("vmas")
        .iter()
        .filter_map(|v| {
            let (s, e) = (v["start"].as_u64()?, v["end"].as_u64()?);
            let perms = v["perms"].as_str()?.to_string();
            (s < hi && e > lo).then(|| (s.max(lo), e.min(hi), perms))
        })
        .collect()
}

/// The mapping id at `addr` in a snapshot (from the VMA's parts when it has several).
fn id_at(snap: &Value, addr: u64) -> Option<u64> {
    let row = snap["vmas"].as_array()?.iter().find(|v| {
        v["start"].as_u64().is_some_and(|s| s <= addr)
            && v["end"].as_u64().is_some_and(|e| e > addr)
    })?;
    match row["parts"].as_array() {
        Some(parts) => parts.iter().find_map(|p| {
            (p[0].as_u64()? <= addr && p[1].as_u64()? > addr).then(|| p[2].as_u64())?
        }),
        None => row["id"].as_u64(),
    }
}

/// The row starting at `addr`.
fn row_at(snap: &Value, addr: u64) -> Value {
    snap["vmas"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["start"] == addr).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn mapping_ids_follow_splits_merges_moves_and_growth_as_the_kernel_did_them() {
    if !privileged("mapping_ids_follow_splits_merges_moves_and_growth_as_the_kernel_did_them") {
        return;
    }
    let (mut v, out) = spawn_workload(&["--faults", "all"], "vma-ids");
    let vmatrace_pid = v.child.id();
    let (mut r, mut a) = (0u64, 0u64);
    let mut pid = 0u64;
    let mut id_a = None;
    let mut id_b = None;
    let mut seen = Vec::new();
    let mut snaps = Vec::new();
    while let Some(Ok(line)) = v.lines.next() {
        if let Some(rest) = line.strip_prefix("vma_ids ") {
            let n: Vec<u64> = rest.split(' ').filter_map(|w| w.parse().ok()).collect();
            (r, a) = (n[0], n[1]);
            continue;
        }
        let Some(name) = line.strip_prefix("checkpoint ") else {
            continue;
        };
        if pid == 0 {
            wait_for(10, "the exec record", || {
                pid = complete_records(&out)
                    .iter()
                    .find(|r| r["type"] == "exec")
                    .and_then(|r| r["pid"].as_u64())
                    .unwrap_or(0);
                pid != 0
            });
        }
        wait_for(10, "the workload to stop", || {
            process_state(pid as u32) == 'T'
        });
        let (lo, hi) = (r, r + 64 * PAGE);
        let kernel: Vec<(u64, u64, String)> = procfs::read_maps(pid as u32)
            .expect("maps")
            .iter()
            .filter(|m| m.start < hi && m.end > lo)
            .map(|m| (m.start.max(lo), m.end.min(hi), m.perms.to_string()))
            .collect();
        let snap = signal_snapshot_of(vmatrace_pid, &out, pid);
        assert_eq!(
            model_vmas(&snap, lo, hi),
            kernel,
            "{name}: the model's VMAs are the kernel's"
        );
        let id = |addr: u64| id_at(&snap, addr);
        let p = |n: u64| n * PAGE;
        match name {
            "mapped" => {
                id_a = id(a);
                assert!(id_a.is_some() && id_a != id(r), "A is a mapping of its own");
                assert_eq!(id(r), id(r + p(16)), "R's pieces around A are R");
            }
            "split" => {
                // Three VMAs, one mapping.
                for at in [a, a + p(2), a + p(4)] {
                    assert!(!row_at(&snap, at).is_null(), "a VMA starts at {at:#x}");
                    assert_eq!(id(at), id_a);
                }
            }
            "merged_back" => {
                let row = row_at(&snap, a);
                assert_eq!(row["end"], a + p(8));
                assert_eq!(row["id"].as_u64(), id_a);
                assert!(row["parts"].is_null(), "one mapping: {row}");
            }
            "neighbour_merged" => {
                // The kernel merged B into A's VMA: one VMA, two mappings.
                let row = row_at(&snap, a);
                assert_eq!(row["end"], a + p(12), "{row}");
                id_b = id(a + p(8));
                assert!(id_b.is_some() && id_b != id_a && id_b != id(r));
                let parts: Vec<Vec<u64>> =
                    serde_json::from_value(row["parts"].clone()).expect("parts");
                assert_eq!(
                    parts,
                    [
                        vec![a, a + p(8), id_a.unwrap_or(0)],
                        vec![a + p(8), a + p(12), id_b.unwrap_or(0)]
                    ]
                );
            }
            "moved" => {
                // A's 8 pages moved, with their id; B stayed.
                assert_eq!(id(r + p(40)), id_a);
                assert_eq!(id(r + p(47)), id_a);
                assert_eq!(id(a + p(8)), id_b);
                assert_eq!(id(a), None, "nothing is left where A was");
            }
            "grown" => {
                let row = row_at(&snap, r + p(40));
                assert_eq!(row["end"], r + p(52));
                assert_eq!(row["id"].as_u64(), id_a);
            }
            "hole" => {
                assert_eq!(id(r + p(40)), id_a);
                assert_eq!(id(r + p(44)), None);
                assert_eq!(id(r + p(46)), id_a, "both sides of the hole are A");
            }
            other => panic!("unknown checkpoint {other}"),
        }
        seen.push(name.to_string());
        snaps.push(snap);
        kill(pid as u32, libc::SIGCONT);
    }
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    assert_eq!(
        seen,
        [
            "mapped",
            "split",
            "merged_back",
            "neighbour_merged",
            "moved",
            "grown",
            "hole"
        ]
    );

    // A replay of the recording gives the same VMAs with the same ids and parts.
    let replayed = replayed(&out);
    let key = |snap: &Value| -> Vec<(Value, Value, Value, Value)> {
        snap["vmas"]
            .as_array()
            .expect("vmas")
            .iter()
            .map(|v| {
                (
                    v["start"].clone(),
                    v["end"].clone(),
                    v["id"].clone(),
                    v["parts"].clone(),
                )
            })
            .collect()
    };
    let again = signal_snapshots(&replayed, pid);
    assert_eq!(again.len(), snaps.len());
    for (live, replay) in snaps.iter().zip(&again) {
        assert_eq!(key(live), key(replay), "replay gives the same ids");
    }

    // The report names the mapping that grew: A, from 8 to 12 pages, its move not counted.
    let o = Command::new(vmatrace())
        .args(["report", "--json"])
        .arg(&out)
        .output()
        .expect("report runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let growth: Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|f| f["id"] == "growth" && f["pid"] == pid)
        .expect("a growth finding");
    assert_eq!(growth["numbers"]["mapping_id"].as_u64(), id_a, "{growth}");
    assert_eq!(growth["numbers"]["first_bytes"], 8 * PAGE);
    assert_eq!(growth["numbers"]["peak_bytes"], 12 * PAGE);
}
