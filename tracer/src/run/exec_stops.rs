//! The launched command's stops at exec: continued once its new image is seeded (SIGCONT), and
//! recovered when the exec event was lost.

use super::*;

impl Live {
    /// Continues the launched command if the kernel stopped it at the exec of `ts_ns` (not a
    /// stop of its own, which only it may end).
    pub(super) fn continue_after_exec(&mut self, pid: u32, ts_ns: u64) {
        if self
            .probe
            .exec_stops()
            .iter()
            .any(|&(p, t)| p == pid && t == ts_ns)
        {
            self.probe.clear_exec_stop(pid);
            // SAFETY: signalling the process the kernel stopped for us.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }

    /// A stop at exec whose exec event the full ring lost: handled as that exec (the process
    /// is stopped, so its map is read consistently), with a warning; the event, should it
    /// arrive after all, is then ignored.
    pub(super) fn recover_lost_exec_stops(&mut self) -> Result<(), RunError> {
        let now = monotonic_ns();
        for (pid, ts) in self.probe.exec_stops() {
            if now.saturating_sub(ts) < LOST_EXEC_AFTER_NS {
                continue;
            }
            log::warn!(
                "the exec event of process {pid} was lost with others when the ring buffer was full: its map is read again now"
            );
            self.recovered_execs.insert((pid, ts));
            let filename = exe_of(pid).unwrap_or_default();
            self.handle(Event::Exec {
                ts_ns: ts,
                pid,
                tid: pid,
                filename,
            })?;
            // Continued in any case (a process gone meanwhile has no entry to clear).
            if self.probe.clear_exec_stop(pid) {
                // SAFETY: signalling the process the kernel stopped for us.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
        }
        Ok(())
    }

    /// At the end: a command still stopped at an exec is continued.
    pub(super) fn continue_all_exec_stops(&mut self) {
        for (pid, _) in self.probe.exec_stops() {
            if self.probe.clear_exec_stop(pid) {
                // SAFETY: signalling the process the kernel stopped for us.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
        }
    }
}
