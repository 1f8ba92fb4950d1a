//! The numbers of one scrape, taken from the session by the functions the snapshots, the
//! summary and the findings use: touched bytes here are the snapshot's touched bytes.

use std::collections::{HashMap, HashSet};

use crate::{
    analysis::{self, Limits, Severity},
    output::{
        LossSummary,
        report::{Totals, totals, vma_rows},
    },
    session::{Process, Session},
};

/// One traced process at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessMetrics {
    pub pid: u32,
    pub comm: String,
    /// The cgroup v2 path (empty when unknown).
    pub cgroup: String,
    /// VMAs, reserved, touched and anonymous bytes: the snapshot's rows summed.
    pub totals: Totals,
    /// The brk heap and its high-water mark (the summary's `heap_bytes` and
    /// `heap_high_water_bytes`).
    pub heap_bytes: u64,
    pub heap_high_water_bytes: u64,
    /// glibc arenas, found as the `arenas` finding finds them.
    pub arenas: u64,
    /// `--heap`: the allocator's live bytes, and the free bytes it keeps on touched pages.
    pub heap_live_bytes: Option<u64>,
    pub retained_free_bytes: Option<u64>,
    pub faults: u64,
    /// Calls per syscall name (failed ones included).
    pub syscalls: Vec<(&'static str, u64)>,
    /// Times the map was read again after lost events.
    pub resyncs: u64,
    /// Findings by (id, severity), and how many.
    pub findings: Vec<(String, &'static str, u64)>,
    pub exited: bool,
}

/// vmatrace's own numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonMetrics {
    /// Losses and kernel-side errors since the start (the summary's `lost`).
    pub lost: LossSummary,
    /// Events handled since the start.
    pub events: u64,
    /// vmatrace's resident bytes.
    pub rss_bytes: Option<u64>,
    /// The ring buffer's size.
    pub ring_bytes: u64,
    /// Bytes waiting in the ring at the tick, not yet read.
    pub ring_used_bytes: Option<u64>,
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub processes: Vec<ProcessMetrics>,
    pub daemon: DaemonMetrics,
}

/// A process's labels, read from `/proc` once per process image.
#[derive(Clone, Debug)]
struct Labels {
    started_ns: u64,
    exe: Option<String>,
    comm: String,
    cgroup: String,
}

/// Reads a live process's `comm` and cgroup.
pub type LabelReader = fn(u32) -> (Option<String>, Option<String>);

fn from_proc(pid: u32) -> (Option<String>, Option<String>) {
    (crate::procfs::comm(pid), crate::procfs::cgroup(pid))
}

/// Gathers [`Snapshot`]s from a session; remembers the labels and which exits were shown.
#[derive(Debug)]
pub struct Gatherer {
    limits: Limits,
    labels: HashMap<u32, Labels>,
    /// Exited processes (pid, start) already in a snapshot: not shown again.
    shown_exited: HashSet<(u32, u64)>,
    read_labels: LabelReader,
}

impl Gatherer {
    /// A gatherer whose findings use `limits` (this machine's), with labels from `/proc`.
    pub fn new(limits: Limits) -> Self {
        Self::with_labels(limits, from_proc)
    }

    /// The same with labels read by `read_labels` (tests).
    pub fn with_labels(limits: Limits, read_labels: LabelReader) -> Self {
        Self {
            limits,
            labels: HashMap::new(),
            shown_exited: HashSet::new(),
            read_labels,
        }
    }

    /// The session's numbers now. A process that exited is in the first snapshot taken
    /// after its exit (with its final numbers), and in none after.
    pub fn gather(&mut self, session: &Session, daemon: DaemonMetrics) -> Snapshot {
        let mut processes = Vec::new();
        for p in session.processes() {
            if p.exited_ns.is_some() && !self.shown_exited.insert((p.pid, p.started_ns)) {
                continue;
            }
            processes.push(self.process(p, session));
        }
        // Forget what no longer names a traced process (its pid reused, or gone).
        self.shown_exited
            .retain(|&(pid, start)| session.get(pid).is_some_and(|p| p.started_ns == start));
        self.labels.retain(|pid, l| {
            session
                .get(*pid)
                .is_some_and(|p| p.started_ns == l.started_ns)
        });
        Snapshot { processes, daemon }
    }

    fn process(&mut self, p: &Process, session: &Session) -> ProcessMetrics {
        let (comm, cgroup) = self.labels_of(p);
        let rows = vma_rows(p);
        let heap = p.heap.enabled.then(|| crate::heap::regions::regions(p));
        let mut findings: Vec<(String, &'static str, u64)> = Vec::new();
        for f in analysis::analyze(p, &self.limits, &session.stacks) {
            let severity = match f.severity {
                Severity::Info => "info",
                Severity::Warning => "warning",
            };
            match findings
                .iter_mut()
                .find(|(id, s, _)| *id == f.id && *s == severity)
            {
                Some(entry) => entry.2 += 1,
                None => findings.push((f.id, severity, 1)),
            }
        }
        ProcessMetrics {
            pid: p.pid,
            comm,
            cgroup,
            totals: totals(&rows),
            heap_bytes: p.space.heap_size(),
            heap_high_water_bytes: p.space.heap_high_water,
            arenas: analysis::arena_ranges(p).len() as u64,
            heap_live_bytes: heap.is_some().then(|| p.heap.live_bytes()),
            retained_free_bytes: heap.as_deref().map(crate::heap::findings::retained_bytes),
            faults: p.counts.faults,
            syscalls: p.counts.syscalls.iter().map(|(k, v)| (*k, *v)).collect(),
            resyncs: p.counts.resyncs,
            findings,
            exited: p.exited_ns.is_some(),
        }
    }

    /// `comm` and cgroup of `p`: read again when it is a new process or a new image (exec);
    /// a process gone before they were read is named by its program's file name.
    fn labels_of(&mut self, p: &Process) -> (String, String) {
        let current = self
            .labels
            .get(&p.pid)
            .filter(|l| l.started_ns == p.started_ns && l.exe == p.exe);
        if let Some(l) = current {
            return (l.comm.clone(), l.cgroup.clone());
        }
        let (comm, cgroup) = if p.exited_ns.is_none() {
            (self.read_labels)(p.pid)
        } else {
            (None, None)
        };
        let comm = comm.unwrap_or_else(|| {
            let exe = p.exe.as_deref().unwrap_or("");
            // As the kernel names a process after exec: the file name, 15 bytes at most.
            let base = exe.rsplit('/').next().unwrap_or(exe);
            let mut end = base.len().min(15);
            while !base.is_char_boundary(end) {
                end -= 1;
            }
            base[..end].to_string()
        });
        let labels = Labels {
            started_ns: p.started_ns,
            exe: p.exe.clone(),
            comm: crate::name::shown(&comm).to_string(),
            cgroup: crate::name::shown(&cgroup.unwrap_or_default()).to_string(),
        };
        let out = (labels.comm.clone(), labels.cgroup.clone());
        if p.exited_ns.is_none() {
            self.labels.insert(p.pid, labels);
        }
        out
    }
}
