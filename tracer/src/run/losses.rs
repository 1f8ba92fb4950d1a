//! Lost events: reported as `lost` records each second while they go on, the maps read again
//! from `/proc` after them, and exits that may have been among them looked for.

use super::*;

impl Live {
    /// `fresh`: the kernel's count of skipped runs read now (before a snapshot and at the
    /// end), not up to a second ago.
    pub(super) fn report_losses(&mut self, fresh: bool) -> Result<(), RunError> {
        let now = LossSummary::from(&self.probe.stats(fresh)?);
        let d = now - self.kernel_lost
            + LossSummary::reader(
                std::mem::take(&mut self.undecodable),
                std::mem::take(&mut self.unread),
            );
        if d != LossSummary::default() {
            self.sink
                .lost(monotonic_ns(), &d)
                .map_err(RunError::Write)?;
            self.sink.boundary(&self.session).map_err(RunError::Write)?;
        }
        // A lost open leaves a mapped file unnamed: the resync names it again.
        self.losing = d.model_events_lost();
        if d.lost_heap > 0 {
            self.session.heap_events_lost();
        }
        self.resync_due |= self.losing;
        self.kernel_lost = now;
        Ok(())
    }

    /// After lost events the model of every live process may be wrong: once the losses stop
    /// (or every second while they go on), each map is read again from `/proc` (its VMAs and
    /// resident pages, as at attach) and written as a `resync` snapshot, from which a replay
    /// reseeds too. The process runs meanwhile, so what it changes while its map is read may
    /// be applied twice; the counts (calls, faults) miss the lost events, and the summary
    /// says how many resyncs there were. `now_asked`: before a SIGUSR1 snapshot, at once
    /// whatever the pace, so that the snapshot is the kernel's state.
    pub(super) fn resync_after_losses(&mut self, now_asked: bool) -> Result<(), RunError> {
        let now = monotonic_ns();
        // Asked for a snapshot after a resync of a running process: read again, exact if the
        // process is stopped now (a checkpoint), as close as can be otherwise, and only once
        // (a process that keeps running would have its maps read at every snapshot).
        let confirm = now_asked && self.resync_unconfirmed;
        let only_confirming = confirm && !self.resync_due;
        if !(self.resync_due || confirm)
            || (!now_asked
                && self.losing
                && now.saturating_sub(self.last_resync_ns) < RESYNC_EVERY_NS)
        {
            return Ok(());
        }
        self.resync_due = false;
        self.last_resync_ns = now;
        // A commit whose record was lost holds back everything after it (up to 10 s): that
        // is handled now, before the maps are read, rather than applied on top of them.
        self.order.end_holds();
        self.handle_released(None)?;
        // (A process sharing another's memory is resynchronised with that one.)
        let pids: Vec<u32> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none() && self.session.memory_owner(p.pid) == p.pid)
            .map(|p| p.pid)
            .collect();
        self.resync_unconfirmed = false;
        for pid in pids {
            let stopped = procfs::is_stopped(pid);
            let Ok(seed) = read_seed(pid, now) else {
                continue;
            };
            self.resync_unconfirmed |= !stopped && !only_confirming;
            if let Some(r) = self.reconcile.as_mut() {
                r.replaced(pid);
            }
            crate::driver::seed(
                &mut self.session,
                &mut *self.sink,
                pid,
                now,
                SnapshotReason::Resync,
                Some(seed),
                None,
            )
            .map_err(RunError::Write)?;
            self.sink.boundary(&self.session).map_err(RunError::Write)?;
            for ev in crate::collapse::in_seed(&self.session, pid, now) {
                self.handle(ev)?;
            }
        }
        Ok(())
    }

    /// Once lifecycle events have been lost (a full ring), an exit may be among them: a
    /// process the session still thinks alive but that /proc shows gone (or a zombie) is
    /// marked exited, so that a run waiting for its processes ends.
    pub(super) fn reap_lost_exits(&mut self) {
        // (A skipped run may have been a lifecycle program's.)
        if self.kernel_lost.lost_lifecycle + self.kernel_lost.missed == 0 {
            return;
        }
        let gone: Vec<u32> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none())
            .map(|p| p.pid)
            .filter(|&pid| procfs::read_stat(pid).map_or(true, |s| s.is_dead()))
            .collect();
        for pid in gone {
            if self.session.mark_gone(pid, monotonic_ns()) {
                log::warn!("process {pid} has exited; its exit event was lost with others");
            }
        }
    }
}
