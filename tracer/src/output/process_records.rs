//! The records of a run and of its processes' lives (`meta`, `fork`, `exec`, `exit`,
//! `collapse`, `snapshot`), each one struct that writes it and reads it back. Fields are in
//! sorted key order, as `serde_json` writes every record. The fields the model computes are
//! read too ([`super::OutputRecord`] gives them), with defaults where absent; replay does not
//! use them (it computes them again). The `type` is read by the dispatch, not by the struct.

use serde::{Deserialize, Serialize};

use super::{Meta, SnapshotReason, report::VmaRow};
use crate::{
    analysis::Limits,
    clock::Anchor,
    event::Event,
    heap::regions::HeapView,
    model::{PAGE_SIZE, PMD_PAGES, TouchKind},
    session::Process,
};

fn one() -> u64 {
    1
}

fn default_max_map_count() -> u64 {
    Limits::default().max_map_count
}

/// The first record of every file: the schema version, the backends and the machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaJson {
    pub boot_id: Option<String>,
    #[serde(default)]
    pub change_order: String,
    #[serde(default = "one")]
    pub cpus: u64,
    #[serde(default)]
    pub fault_backend: String,
    #[serde(default)]
    pub faults: String,
    #[serde(default = "default_max_map_count")]
    pub max_map_count: u64,
    pub realtime_ns: Option<u64>,
    #[serde(default)]
    pub syscall_backend: String,
    #[serde(default)]
    pub tool: String,
    pub ts_ns: Option<u64>,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
    pub version: u64,
}

impl MetaJson {
    /// The `meta` record of `meta`, at `ts_ns`, showing faults as `faults` says.
    pub fn new(meta: &Meta, ts_ns: u64, faults: String, version: u64) -> Self {
        let clock = meta.clock.as_ref();
        Self {
            boot_id: clock.and_then(|c| c.boot_id.clone()),
            change_order: meta.change_order.clone(),
            cpus: meta.limits.cpus,
            fault_backend: meta.fault_backend.clone(),
            faults,
            max_map_count: meta.limits.max_map_count,
            realtime_ns: clock.map(|c| c.realtime_ns),
            syscall_backend: meta.syscall_backend.clone(),
            tool: concat!("vmatrace ", env!("CARGO_PKG_VERSION")).to_string(),
            ts_ns: Some(ts_ns),
            kind: "meta",
            version,
        }
    }

    /// The limits of the machine the recording came from.
    pub fn limits(&self) -> Limits {
        Limits {
            max_map_count: self.max_map_count,
            cpus: self.cpus,
        }
    }

    /// The recording's wall-clock anchor (none in recordings made before it was written).
    pub fn clock(self) -> Option<Anchor> {
        Some(Anchor {
            ts_ns: self.ts_ns?,
            realtime_ns: self.realtime_ns?,
            boot_id: self.boot_id,
        })
    }
}

/// A `fork` record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ForkJson {
    pub child: u32,
    #[serde(default)]
    pub followed: bool,
    pub pid: u32,
    #[serde(default)]
    pub shares_vm: bool,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

/// An `exec` record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecJson {
    #[serde(default)]
    pub filename: String,
    pub pid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

/// An `exit` record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExitJson {
    pub pid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

/// A `collapse` record (`khugepaged` made a huge page of `[start, end)`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CollapseJson {
    #[serde(default)]
    pub end: u64,
    #[serde(default)]
    pub pages: u64,
    pub pid: u32,
    pub start: u64,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

impl ForkJson {
    pub fn new(
        ts_ns: u64,
        pid: u32,
        tid: u32,
        child: u32,
        followed: bool,
        shares_vm: bool,
    ) -> Self {
        Self {
            child,
            followed,
            pid,
            shares_vm,
            tid,
            ts_ns,
            kind: "fork",
        }
    }

    pub fn into_event(self) -> Event {
        Event::Fork {
            ts_ns: self.ts_ns,
            pid: self.pid,
            tid: self.tid,
            child: self.child,
            followed: self.followed,
            shares_vm: self.shares_vm,
        }
    }
}

impl ExecJson {
    pub fn new(ts_ns: u64, pid: u32, tid: u32, filename: String) -> Self {
        Self {
            filename,
            pid,
            tid,
            ts_ns,
            kind: "exec",
        }
    }

    pub fn into_event(self) -> Event {
        Event::Exec {
            ts_ns: self.ts_ns,
            pid: self.pid,
            tid: self.tid,
            filename: self.filename,
        }
    }
}

impl ExitJson {
    pub fn new(ts_ns: u64, pid: u32, tid: u32) -> Self {
        Self {
            pid,
            tid,
            ts_ns,
            kind: "exit",
        }
    }

    pub fn into_event(self) -> Event {
        Event::Exit {
            ts_ns: self.ts_ns,
            pid: self.pid,
            tid: self.tid,
        }
    }
}

impl CollapseJson {
    /// The record of a collapse at `start` that made `pages` pages huge.
    pub fn new(ts_ns: u64, pid: u32, start: u64, pages: u64) -> Self {
        Self {
            end: start + PMD_PAGES * PAGE_SIZE,
            pages,
            pid,
            start,
            ts_ns,
            kind: "collapse",
        }
    }

    pub fn into_event(self) -> Event {
        Event::Collapse {
            ts_ns: self.ts_ns,
            pid: self.pid,
            start: self.start,
        }
    }
}

/// The huge page policy of a snapshot, in KiB per page size.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ThpJson {
    pub always_kib: Vec<u64>,
    pub huge_zero_page: bool,
    pub madvise_kib: Vec<u64>,
    pub zero_write_huge: bool,
}

/// A `snapshot` record: a process's whole map. A seed (exec, resync) also lists the pages
/// already resident, so a replay starts from them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotJson {
    #[serde(default)]
    pub brk: Option<u64>,
    pub brk_start: Option<u64>,
    pub exe: Option<String>,
    #[serde(default)]
    pub heap: Option<HeapView>,
    pub pid: u32,
    pub reason: SnapshotReason,
    /// `[start, end, kind]` runs.
    pub resident: Option<Vec<(u64, u64, TouchKind)>>,
    #[serde(default)]
    pub thp: ThpJson,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
    pub vmas: Option<Vec<VmaRow>>,
}

impl SnapshotJson {
    /// The snapshot of `p`, written for `reason`.
    pub fn new(ts_ns: u64, reason: SnapshotReason, p: &Process) -> Self {
        let brk = p.space.heap();
        let thp = p.space.thp();
        let kib =
            |pages: &[u64]| -> Vec<u64> { pages.iter().map(|n| n * PAGE_SIZE / 1024).collect() };
        Self {
            brk: brk.map(|b| b.current),
            brk_start: brk.map(|b| b.start),
            exe: p.exe.clone(),
            heap: crate::heap::regions::view(p),
            pid: p.pid,
            reason,
            resident: reason.seeds().then(|| {
                p.space
                    .pages()
                    .runs()
                    .iter()
                    .map(|r| (r.start, r.end, r.kind))
                    .collect()
            }),
            thp: ThpJson {
                always_kib: kib(&thp.always),
                huge_zero_page: thp.huge_zero_page,
                madvise_kib: kib(&thp.madvise),
                zero_write_huge: thp.zero_write_huge,
            },
            ts_ns,
            kind: "snapshot",
            vmas: Some(super::report::vma_rows(p)),
        }
    }
}
