//! Where events go: human lines or NDJSON, snapshots, summaries. Every sink sees the same calls
//! from the live runner and from replay.

pub mod binary;
pub mod compress;
pub mod counted;
pub mod file;
pub mod html;
pub mod human;
pub mod live_view;
pub mod perfetto;
pub mod process_records;
pub mod profile;
pub mod records;
pub mod report;
pub mod rotate;
pub mod status;
pub mod timeline_view;
pub mod touch_runs;
pub mod typed;

use std::io;

use crate::{
    analysis::{Finding, Limits},
    event::Event,
    session::{Applied, Process, Session},
};

/// What a run starts with: the kernel backends and the machine's limits.
#[derive(Clone, Debug)]
pub struct Meta {
    pub fault_backend: String,
    pub syscall_backend: String,
    /// Where syscalls' changes are ordered (`lock`, `entry`, `exit`).
    pub change_order: String,
    pub limits: Limits,
    /// The wall-clock time of the run's start and its boot (replay: the recording's).
    pub clock: Option<crate::clock::Anchor>,
}
pub use report::{LossSummary, Summary};
pub use typed::OutputRecord;

/// Which faults reach the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultFilter {
    /// No faults are captured at all (cheapest; touched bytes stay unknown).
    None,
    /// Faults are captured; only first touches (and copy-on-write upgrades) are shown.
    First,
    /// Every fault is shown.
    All,
}

/// Why a snapshot of a process's whole map was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// Tracing of the process starts (attach, launch, a followed fork).
    Seed,
    /// The process replaced its image.
    Exec,
    /// The map was read again from `/proc` after events were lost.
    Resync,
    /// SIGUSR1.
    Signal,
    /// `--snapshot-every`.
    Periodic,
    /// The last map before the process's teardown.
    Exit,
    /// The end of the run.
    Final,
}

impl SnapshotReason {
    const ALL: [Self; 7] = [
        Self::Seed,
        Self::Exec,
        Self::Resync,
        Self::Signal,
        Self::Periodic,
        Self::Exit,
        Self::Final,
    ];

    /// The name in output (`reason`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Exec => "exec",
            Self::Resync => "resync",
            Self::Signal => "signal",
            Self::Periodic => "periodic",
            Self::Exit => "exit",
            Self::Final => "final",
        }
    }

    /// Parses [`SnapshotReason::name`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether the snapshot (re)starts the model from `/proc`: it lists the resident pages,
    /// and a replay seeds from it.
    pub fn seeds(self) -> bool {
        matches!(self, Self::Seed | Self::Exec | Self::Resync)
    }
}

crate::by_name::serde_by_name!(SnapshotReason, "snapshot reason");

/// A consumer of the trace. It must take events, snapshots and the summary; the rest is
/// nothing unless it says otherwise.
pub trait Sink {
    /// The start of a run.
    fn start(&mut self, _meta: &Meta) -> io::Result<()> {
        Ok(())
    }
    /// One applied event.
    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()>;
    /// A user stack, before the first event that names it.
    fn stack(&mut self, _def: &crate::stacks::StackDef) -> io::Result<()> {
        Ok(())
    }
    /// A process's whole map.
    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()>;
    /// Events lost since the last report.
    fn lost(&mut self, _ts_ns: u64, _delta: &LossSummary) -> io::Result<()> {
        Ok(())
    }
    /// The model and the kernel disagree (`--reconcile`).
    fn drift(&mut self, _ts_ns: u64, _pid: u32, _lines: &[String]) -> io::Result<()> {
        Ok(())
    }
    /// Called on the reader's timer: flush anything coalesced.
    fn tick(&mut self, _session: &Session) -> io::Result<()> {
        Ok(())
    }
    /// The end-of-run summary.
    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()>;
    /// Allocator and address-space findings (`--report`, `vmatrace report`).
    fn findings(&mut self, _findings: &[Finding]) -> io::Result<()> {
        Ok(())
    }
    /// Flushes buffered output.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Everything written so far is consistent with `session` (each event written is applied,
    /// no other is): an output that starts new files (`--max-size`) may start one here.
    fn boundary(&mut self, _session: &Session) -> io::Result<()> {
        Ok(())
    }
}

/// A sink that writes nothing (tests and the fuzz targets replay into it).
pub struct NullSink;

impl Sink for NullSink {
    fn event(&mut self, _: &Event, _: &Applied, _: &Session) -> io::Result<()> {
        Ok(())
    }
    fn snapshot(&mut self, _: u64, _: SnapshotReason, _: &Process) -> io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, _: u64, _: &Summary) -> io::Result<()> {
        Ok(())
    }
}

/// Whether a fault event should be shown under `filter`.
pub fn show_fault(filter: FaultFilter, applied: &Applied) -> bool {
    match (filter, applied) {
        (FaultFilter::All, _) => true,
        (FaultFilter::None, _) => false,
        (FaultFilter::First, Applied::Fault(f)) => {
            !matches!(f.touch, crate::model::Touch::Again) || f.stack_grown_to.is_some()
        }
        (FaultFilter::First, _) => false,
    }
}

/// `12345678` as `12,345,678`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
