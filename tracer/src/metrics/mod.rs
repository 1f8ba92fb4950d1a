//! Fleet metrics (`--metrics ADDR:PORT`): Prometheus metrics over HTTP, per traced process and
//! of vmatrace itself.
//!
//! | file | what |
//! |---|---|
//! | `gather.rs` | the session's numbers at one moment, as plain data: the same functions the snapshots and the summary use (`output::report`, `analysis`, `heap::findings`), and the rule for exited processes |
//! | `render.rs` | that data as the text exposition (`prometheus-client`): names, labels, types |
//! | `server.rs` | the HTTP listener on a thread of its own, and how a scrape asks the event loop for fresh numbers |
//!
//! The event loop never renders and never waits for a scraper: a scrape raises a flag and
//! waits (at most [`server::FRESH_WAIT`]) for the loop, which at its next tick (every 50 ms)
//! sees the flag, gathers the numbers and hands them over (an `Arc` swapped under a lock).
//! With no scraper the loop's cost is one atomic load per tick; nothing is done per event.
//!
//! Exited processes: their series are kept for the first scrape after the exit (with their
//! final values), then dropped.

pub mod gather;
pub mod render;
pub mod server;

pub use gather::{DaemonMetrics, Gatherer, ProcessMetrics, Snapshot};
pub use server::{MetricsError, Publisher};

use std::net::SocketAddr;

use crate::{analysis::Limits, session::Session};

/// What the event loop holds: numbers are gathered at its tick when a scrape waits for them.
#[derive(Debug)]
pub struct Exporter {
    publisher: Publisher,
    gatherer: Gatherer,
    ring_bytes: u32,
}

impl Exporter {
    /// Listens on `addr` (findings judged with this machine's `limits`; the ring buffer has
    /// `ring_bytes`).
    pub fn start(addr: SocketAddr, limits: Limits, ring_bytes: u32) -> Result<Self, MetricsError> {
        Ok(Self {
            publisher: server::start(addr)?,
            gatherer: Gatherer::new(limits),
            ring_bytes,
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.publisher.local_addr
    }

    /// At the event loop's tick: when a scrape waits, gathers the session's numbers (and
    /// vmatrace's own, from `daemon`) and hands them over. Else one atomic load.
    pub fn tick(&mut self, session: &Session, daemon: impl FnOnce() -> DaemonMetrics) {
        if let Some(mark) = self.publisher.due() {
            let mut daemon = daemon();
            daemon.ring_bytes = self.ring_bytes.into();
            let snapshot = self.gatherer.gather(session, daemon);
            self.publisher.publish(mark, snapshot);
        }
    }
}
