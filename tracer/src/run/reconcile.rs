//! `--reconcile`: the model compared with `/proc/PID/maps`, differences written as `drift`.

use super::*;

/// How far the reader may be behind the clock for a comparison to count (two ticks).
const KEEPING_UP_NS: u64 = 100_000_000;

impl Live {
    pub(super) fn reconcile(&mut self) -> Result<(), RunError> {
        // The model is compared only while the reader keeps up. Behind the process (a loaded
        // machine, a burst), the model is older than the map read now, and every change in
        // between would be a difference (a busy loop that maps and unmaps one address shows
        // the same one round after round). Such a round compares nothing, and a difference
        // must be seen again at two rounds in a row that kept up.
        let now = monotonic_ns();
        let behind = now.saturating_sub(self.caught_up_ns) > KEEPING_UP_NS
            || self
                .order
                .oldest()
                .is_some_and(|t| t.saturating_add(KEEPING_UP_NS) < now);
        if behind {
            log::debug!("--reconcile: the reader is behind, nothing compared this round");
            self.drift_seen.clear();
            return Ok(());
        }
        let pids: Vec<u32> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none())
            .map(|p| p.pid)
            .collect();
        for pid in pids {
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            let kernel = normalize::normalize(
                maps.iter()
                    .map(|m| (m.start, m.end, m.perms, m.path.as_deref())),
            );
            let Some(space) = self.session.space_of(pid) else {
                continue;
            };
            let diff = normalize::diff(&kernel, &normalize::model_ranges(space));
            // A running process changes its map between our drain and our read: report only
            // the differences that were already there at the previous check.
            let previous = self
                .drift_seen
                .insert(pid, diff.clone())
                .unwrap_or_default();
            let diff: Vec<String> = diff.into_iter().filter(|d| previous.contains(d)).collect();
            if !diff.is_empty() {
                log::warn!(
                    "model of {pid} differs from /proc/{pid}/maps in {} ranges",
                    diff.len()
                );
                self.sink
                    .drift(monotonic_ns(), pid, &diff)
                    .map_err(RunError::Write)?;
                self.sink.boundary(&self.session).map_err(RunError::Write)?;
            }
        }
        Ok(())
    }
}
