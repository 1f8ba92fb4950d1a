//! Snapshots of the traced processes' maps: asked for (SIGUSR1, `--snapshot-every`), at the
//! end, each written once the reader has caught up with the moment it was asked.

use super::*;

impl Live {
    /// Writes the snapshot asked for (SIGUSR1, `--snapshot-every`) once every event before the asking is
    /// handled: then collapses are looked for (on a model that has caught up), handled, and
    /// the maps read again if events were lost since the last resync.
    pub(super) fn snapshot_if_due(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), RunError> {
        let Some((asked, when, reason)) = self.snapshot_due else {
            return Ok(());
        };
        let behind = self.caught_up_ns < asked || self.order.oldest().is_some_and(|t| t <= asked);
        if behind && when.elapsed() < SNAPSHOT_WAIT {
            return Ok(());
        }
        if behind {
            log::warn!(
                "the snapshot asked for {:.1} s ago is written before the events up to then were all read: vmatrace is behind",
                when.elapsed().as_secs_f64()
            );
        }
        self.snapshot_due = None;
        self.look_for_collapses();
        self.collect(ring, Some(Instant::now() + STOP_GRACE))?;
        self.report_losses(true)?;
        self.resync_after_losses(true)?;
        self.snapshots(reason)
    }

    pub(super) fn snapshots(&mut self, reason: SnapshotReason) -> Result<(), RunError> {
        let ts = monotonic_ns();
        if self.heap.is_some() {
            // CPython's own count of its objects' bytes, read now from its pool headers, so
            // that the snapshot (and the findings) see its arenas' live bytes.
            let readings: Vec<Event> = self
                .session
                .processes()
                .filter_map(|p| p.pymalloc_reading(ts))
                .map(Event::Pymalloc)
                .collect();
            for ev in readings {
                self.handle(ev)?;
            }
        }
        for p in self.session.processes().filter(|p| p.exited_ns.is_none()) {
            self.sink.snapshot(ts, reason, p).map_err(RunError::Write)?;
            self.sink.boundary(&self.session).map_err(RunError::Write)?;
        }
        self.sink.flush().map_err(RunError::Write)
    }

    /// A snapshot of every traced process now (SIGUSR1, `--snapshot-every`): written as soon
    /// as the reader has handled every event up to now (at once, unless it is behind).
    pub(super) fn snapshot_now(
        &mut self,
        ring: &mut RingBuf<MapData>,
        reason: SnapshotReason,
    ) -> Result<(), RunError> {
        // One snapshot pending at a time, the latest asked for; a signal's is never relabelled.
        let reason = match self.snapshot_due {
            Some((_, _, SnapshotReason::Signal)) => SnapshotReason::Signal,
            _ => reason,
        };
        self.snapshot_due = Some((monotonic_ns(), Instant::now(), reason));
        self.collect(ring, Some(Instant::now() + DRAIN_SLICE))?;
        self.snapshot_if_due(ring)
    }
}
