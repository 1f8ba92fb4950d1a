//! Where events go: human lines or NDJSON, snapshots, summaries. Every sink sees the same calls
//! from the live runner and from replay.

pub mod file;
pub mod human;
pub mod ndjson;
pub mod report;

use std::io;

use crate::{
    event::Event,
    session::{Applied, Process, Session},
};
pub use report::{LossSummary, Summary};

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

/// A consumer of the trace.
pub trait Sink {
    /// The start of a run.
    fn start(&mut self, fault_backend: &str) -> io::Result<()>;
    /// One applied event.
    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()>;
    /// A process's whole map. `reason`: seed, exec, signal, exit, final.
    fn snapshot(&mut self, ts_ns: u64, reason: &str, p: &Process) -> io::Result<()>;
    /// Events lost since the last report.
    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()>;
    /// The model and the kernel disagree (`--reconcile`).
    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()>;
    /// Called on the reader's timer: flush anything coalesced.
    fn tick(&mut self, session: &Session) -> io::Result<()>;
    /// The end-of-run summary.
    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()>;
    /// Flushes buffered output.
    fn flush(&mut self) -> io::Result<()>;
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
