//! A [`Snapshot`] as the text exposition Prometheus scrapes: OpenMetrics when the scraper
//! asks for it (Prometheus does), else the Prometheus text format 0.0.4. Every name has the
//! `vmatrace_` prefix; sizes end in `_bytes`, counters in `_total`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

use super::gather::{ProcessMetrics, Snapshot};

/// The `Content-Type` of [`render`]'s two formats.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The labels of a traced process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
    cgroup: String,
}

impl ProcessLabels {
    fn of(p: &ProcessMetrics) -> Self {
        Self {
            pid: p.pid,
            comm: p.comm.clone(),
            cgroup: p.cgroup.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyscallLabels {
    pid: u32,
    comm: String,
    cgroup: String,
    syscall: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    pid: u32,
    comm: String,
    cgroup: String,
    id: String,
    severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

type ByteGauge = Gauge<u64, AtomicU64>;

/// A gauge per process, registered under `name`.
fn per_process(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    snap: &Snapshot,
    value: impl Fn(&ProcessMetrics) -> Option<u64>,
) {
    let family = Family::<ProcessLabels, ByteGauge>::default();
    for p in &snap.processes {
        if let Some(v) = value(p) {
            family.get_or_create(&ProcessLabels::of(p)).set(v);
        }
    }
    match unit {
        Some(unit) => reg.register_with_unit(name, help, unit, family),
        None => reg.register(name, help, family),
    }
}

/// The registry of one scrape.
fn registry(snap: &Snapshot) -> Registry {
    let mut reg = Registry::with_prefix("vmatrace");
    let bytes = || Some(Unit::Bytes);
    per_process(
        &mut reg,
        "reserved",
        "Bytes of the traced process's VMAs (address space mapped, touched or not)",
        bytes(),
        snap,
        |p| Some(p.totals.reserved_bytes),
    );
    per_process(
        &mut reg,
        "touched",
        "Bytes backed by memory after a first touch (anonymous or page cache, not the zero page): the snapshot's touched_bytes summed",
        bytes(),
        snap,
        |p| Some(p.totals.touched_bytes),
    );
    per_process(
        &mut reg,
        "anon",
        "Of the touched bytes, private anonymous ones (the snapshot's anon_bytes summed)",
        bytes(),
        snap,
        |p| Some(p.totals.anon_bytes),
    );
    per_process(
        &mut reg,
        "heap",
        "Size of the brk heap",
        bytes(),
        snap,
        |p| Some(p.heap_bytes),
    );
    per_process(
        &mut reg,
        "heap_high_water",
        "Largest size the brk heap has had",
        bytes(),
        snap,
        |p| Some(p.heap_high_water_bytes),
    );
    per_process(
        &mut reg,
        "vmas",
        "VMAs in the traced process's map",
        None,
        snap,
        |p| Some(p.totals.vma_count as u64),
    );
    per_process(
        &mut reg,
        "arenas",
        "glibc arenas (64 MiB reservations partly committed), as the arenas finding counts them",
        None,
        snap,
        |p| Some(p.arenas),
    );
    per_process(
        &mut reg,
        "heap_live",
        "Bytes the allocator holds for live blocks (--heap only)",
        bytes(),
        snap,
        |p| p.heap_live_bytes,
    );
    per_process(
        &mut reg,
        "heap_retained_free",
        "Free bytes the allocator keeps on touched pages, in regions whose live bytes are known (--heap only)",
        bytes(),
        snap,
        |p| p.retained_free_bytes,
    );

    let faults = Family::<ProcessLabels, Counter>::default();
    let resyncs = Family::<ProcessLabels, Counter>::default();
    let syscalls = Family::<SyscallLabels, Counter>::default();
    let findings = Family::<FindingLabels, Gauge<u64, AtomicU64>>::default();
    for p in &snap.processes {
        let l = ProcessLabels::of(p);
        faults.get_or_create(&l).inc_by(p.faults);
        resyncs.get_or_create(&l).inc_by(p.resyncs);
        for (call, n) in &p.syscalls {
            syscalls
                .get_or_create(&SyscallLabels {
                    pid: p.pid,
                    comm: p.comm.clone(),
                    cgroup: p.cgroup.clone(),
                    syscall: (*call).to_string(),
                })
                .inc_by(*n);
        }
        for (id, severity, n) in &p.findings {
            findings
                .get_or_create(&FindingLabels {
                    pid: p.pid,
                    comm: p.comm.clone(),
                    cgroup: p.cgroup.clone(),
                    id: id.clone(),
                    severity: (*severity).to_string(),
                })
                .set(*n);
        }
    }
    reg.register(
        "faults",
        "Page faults of the traced process (every fault traced, first touches or not)",
        faults,
    );
    reg.register(
        "syscalls",
        "Memory syscalls of the traced process, failed ones included",
        syscalls,
    );
    reg.register(
        "resyncs",
        "Times the process's map was read again from /proc after lost events",
        resyncs,
    );
    reg.register(
        "findings",
        "Findings of the analysis (vmatrace report) now true of the process, by id and severity",
        findings,
    );

    let d = &snap.daemon;
    let lost = Family::<KindLabels, Counter>::default();
    let l = &d.lost;
    for (kind, n) in [
        ("syscall", l.lost_syscall),
        ("fault", l.lost_fault),
        ("lifecycle", l.lost_lifecycle),
        ("heap", l.lost_heap),
        ("open", l.lost_open),
        ("commit", l.lost_commit),
        ("missed", l.missed),
        ("pending_full", l.pending_full),
        ("undecodable", l.undecodable),
        ("unread", l.unread),
    ] {
        lost.get_or_create(&KindLabels { kind: kind.into() })
            .inc_by(n);
    }
    reg.register(
        "lost_events",
        "Events lost, by kind: dropped by a full ring (syscall, fault, lifecycle, heap, open, commit), a full table of pending syscalls, undecodable records, left unread at a stop",
        lost,
    );
    let errors = Family::<KindLabels, Counter>::default();
    for (kind, n) in [
        ("exit_without_enter", l.exit_without_enter),
        ("targets_full", l.targets_full),
        ("read_error", l.read_error),
    ] {
        errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc_by(n);
    }
    reg.register(
        "probe_errors",
        "Kernel-side errors, by kind: a syscall exit without its entry, the target table full, a failed read of user memory",
        errors,
    );
    let stacks = Counter::<u64>::default();
    stacks.inc_by(l.lost_stack);
    reg.register(
        "stacks_dropped",
        "Call stacks dropped in the kernel (their events were kept, without a stack)",
        stacks,
    );
    let events = Counter::<u64>::default();
    events.inc_by(d.events);
    reg.register("events", "Events handled", events);
    let gauge = |reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: u64| {
        let g = ByteGauge::default();
        g.set(v);
        match unit {
            Some(unit) => reg.register_with_unit(name, help, unit, g),
            None => reg.register(name, help, g),
        }
    };
    gauge(
        &mut reg,
        "traced_processes",
        "Traced processes alive",
        None,
        snap.processes.iter().filter(|p| !p.exited).count() as u64,
    );
    gauge(
        &mut reg,
        "ring_buffer",
        "Size of the ring buffer the kernel programs write to",
        bytes(),
        d.ring_bytes,
    );
    if let Some(used) = d.ring_used_bytes {
        gauge(
            &mut reg,
            "ring_buffer_used",
            "Bytes waiting in the ring buffer at the last tick, not yet read by vmatrace",
            bytes(),
            used,
        );
    }
    if let Some(rss) = d.rss_bytes {
        gauge(
            &mut reg,
            "daemon_rss",
            "Resident memory of vmatrace itself",
            bytes(),
            rss,
        );
    }
    reg
}

/// The exposition of `snap`: OpenMetrics when `openmetrics`, else the Prometheus text format.
pub fn render(snap: &Snapshot, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let reg = registry(snap);
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &reg)?;
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)?;
    }
    Ok(out)
}
