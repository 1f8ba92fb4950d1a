//! Privileged end-to-end test of mapping ids (docs/json-schema.md, "Mapping ids"), checked
//! against what the kernel did: at each checkpoint where the traced workload has stopped
//! itself, the model's VMAs are exactly the kernel's (`/proc/PID/maps`), and the ids say which
//! mapping each range is, through a split, a merge back, a merge with a neighbour, a move, a
//! growth in place and a hole. A replay of the recording gives the same ids, and the report's
//! growth finding names the mapping that grew.

mod common;

use std::process::Command;

use common::*;
use tracer::{
    output::{OutputRecord, SnapshotReason, process_records::SnapshotJson, report::VmaRow},
    procfs,
};

const PAGE: u64 = 4096;

fn signal_snapshots(recs: &[OutputRecord], pid: u32) -> Vec<SnapshotJson> {
    recs.iter()
        .filter_map(OutputRecord::snapshot)
        .filter(|s| s.reason == SnapshotReason::Signal && s.pid == pid)
        .cloned()
        .collect()
}

/// A row's range, mapping id and parts (`[start, end, id]`).
type Ids = (u64, u64, u64, Option<Vec<[u64; 3]>>);

/// The rows of a snapshot.
fn rows(snap: &SnapshotJson) -> &[VmaRow] {
    snap.vmas.as_deref().expect("vmas")
}

/// The VMAs of a snapshot inside `[lo, hi)`, clipped: (start, end, perms).
fn model_vmas(snap: &SnapshotJson, lo: u64, hi: u64) -> Vec<(u64, u64, String)> {
    rows(snap)
        .iter()
        .filter_map(|v| {
            let (s, e) = (v.start, v.end);
            (s < hi && e > lo).then(|| (s.max(lo), e.min(hi), v.perms.clone()))
        })
        .collect()
}

/// The mapping id at `addr` in a snapshot (from the VMA's parts when it has several).
fn id_at(snap: &SnapshotJson, addr: u64) -> Option<u64> {
    let row = rows(snap)
        .iter()
        .find(|v| v.start <= addr && v.end > addr)?;
    match &row.parts {
        Some(parts) => parts
            .iter()
            .find_map(|p| (p[0] <= addr && p[1] > addr).then_some(p[2])),
        None => Some(row.id),
    }
}

/// The row starting at `addr`.
fn row_at(snap: &SnapshotJson, addr: u64) -> Option<VmaRow> {
    rows(snap).iter().find(|r| r.start == addr).cloned()
}

#[test]
fn mapping_ids_follow_splits_merges_moves_and_growth_as_the_kernel_did_them() {
    if !privileged("mapping_ids_follow_splits_merges_moves_and_growth_as_the_kernel_did_them") {
        return;
    }
    let (mut v, out) = spawn_workload(&["--faults", "all"], "vma-ids");
    let vmatrace_pid = v.child.id();
    let (mut r, mut a) = (0u64, 0u64);
    let mut pid = 0u32;
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
                pid = complete_typed_records(&out)
                    .iter()
                    .find_map(|r| match r {
                        OutputRecord::Exec(e) => Some(e.pid),
                        _ => None,
                    })
                    .unwrap_or(0);
                pid != 0
            });
        }
        wait_for(10, "the workload to stop", || process_state(pid) == 'T');
        let (lo, hi) = (r, r + 64 * PAGE);
        let kernel: Vec<(u64, u64, String)> = procfs::read_maps(pid)
            .expect("maps")
            .iter()
            .filter(|m| m.start < hi && m.end > lo)
            .map(|m| (m.start.max(lo), m.end.min(hi), m.perms.to_string()))
            .collect();
        let snap = signal_snapshot_typed(vmatrace_pid, &out, pid);
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
                    assert!(row_at(&snap, at).is_some(), "a VMA starts at {at:#x}");
                    assert_eq!(id(at), id_a);
                }
            }
            "merged_back" => {
                let row = row_at(&snap, a).expect("a VMA at A");
                assert_eq!(row.end, a + p(8));
                assert_eq!(Some(row.id), id_a);
                assert!(row.parts.is_none(), "one mapping: {row:?}");
            }
            "neighbour_merged" => {
                // The kernel merged B into A's VMA: one VMA, two mappings.
                let row = row_at(&snap, a).expect("a VMA at A");
                assert_eq!(row.end, a + p(12), "{row:?}");
                id_b = id(a + p(8));
                assert!(id_b.is_some() && id_b != id_a && id_b != id(r));
                let parts = row.parts.expect("parts");
                assert_eq!(
                    parts,
                    [
                        [a, a + p(8), id_a.unwrap_or(0)],
                        [a + p(8), a + p(12), id_b.unwrap_or(0)]
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
                let row = row_at(&snap, r + p(40)).expect("a VMA at the moved A");
                assert_eq!(row.end, r + p(52));
                assert_eq!(Some(row.id), id_a);
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
        kill(pid, libc::SIGCONT);
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
    let replayed = replayed_typed(&out);
    let key = |snap: &SnapshotJson| -> Vec<Ids> {
        rows(snap)
            .iter()
            .map(|v| (v.start, v.end, v.id, v.parts.clone()))
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
    let records: Vec<OutputRecord> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter_map(|v| OutputRecord::from_value(v).ok())
        .collect();
    let growth = findings_of(&records)
        .into_iter()
        .find(|f| f.id == "growth" && f.pid == pid)
        .expect("a growth finding");
    assert_eq!(
        growth.numbers.get("mapping_id").copied(),
        id_a,
        "{growth:?}"
    );
    assert_eq!(growth.numbers.get("first_bytes"), Some(&(8 * PAGE)));
    assert_eq!(growth.numbers.get("peak_bytes"), Some(&(12 * PAGE)));
}
