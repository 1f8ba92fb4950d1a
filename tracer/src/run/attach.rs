//! Attaching to running processes (`-p`, the members of `--cgroup`): the kernel's filter first,
//! then the seed from `/proc`, its snapshot and the allocator probes.

use super::*;

/// What attaching to a running process changes: the kernel's targets, the session, the
/// output (its seed snapshot) and the allocator probes.
pub(super) struct Attached<'a> {
    pub(super) probe: &'a mut Probe,
    pub(super) session: &'a mut Session,
    pub(super) sink: &'a mut dyn Sink,
    pub(super) heap: Option<&'a mut HeapTracer>,
    pub(super) stacks: Option<&'a mut Collector>,
}

impl Attached<'_> {
    /// Traces the running process `pid` from now (`-p`): in the kernel's filter first, then
    /// seeded from `/proc`, so that nothing it does after the seed is missed.
    pub(super) fn attach(&mut self, pid: u32, follow: bool) -> Result<(), RunError> {
        self.probe.add_target(pid, follow, false)?;
        let ts = monotonic_ns();
        let seed = read_seed(pid, ts).map_err(|e| match e {
            ProcError::NoProcess(p) => RunError::ExitedDuringAttach(p),
            other => RunError::Proc(other),
        })?;
        // Now in the filter: if it died before that, its exit will never be reported.
        if procfs::read_stat(pid).map_or(true, |s| s.is_dead()) {
            return Err(RunError::ExitedDuringAttach(pid));
        }
        self.seeded(pid, seed, ts)?;
        if self.heap.as_deref().is_some_and(|h| !h.covers(pid)) {
            return Err(HeapError::NoAllocator(pid).into());
        }
        Ok(())
    }

    /// Adds `pid` to the session from `seed` (at `ts`), writes its seed snapshot and, with
    /// `--heap`, places the allocator probes in it.
    pub(super) fn seeded(&mut self, pid: u32, seed: Seed, ts: u64) -> Result<(), RunError> {
        crate::driver::seed(
            self.session,
            self.sink,
            pid,
            ts,
            SnapshotReason::Seed,
            Some(seed),
            exe_of(pid),
        )
        .map_err(RunError::Write)?;
        for ev in crate::collapse::in_seed(self.session, pid, ts) {
            crate::driver::step(self.session, self.sink, &ev, true).map_err(RunError::Write)?;
        }
        if let Some(c) = self.stacks.as_deref_mut() {
            c.watch_python(pid);
            self.probe.set_python_procs(c.take_python_changes());
        }
        if let Some(heap) = self.heap.as_deref_mut() {
            for ev in heap.cover(self.probe, pid, ts, true)? {
                crate::driver::step(self.session, self.sink, &ev, true).map_err(RunError::Write)?;
            }
        }
        Ok(())
    }

    /// Attaches a member of the traced cgroup not traced yet (followed: its children stay in
    /// its group). Members that vanish meanwhile, kernel threads, vmatrace itself and
    /// processes without an allocator to probe (`--heap`) are skipped.
    pub(super) fn join(&mut self, pid: u32) -> Result<(), RunError> {
        if pid == std::process::id()
            || self.session.get(pid).is_some_and(|p| p.exited_ns.is_none())
            || procfs::read_stat(pid).map_or(true, |s| s.is_kernel_thread() || s.is_dead())
        {
            return Ok(());
        }
        match self.attach(pid, true) {
            Err(RunError::ExitedDuringAttach(_) | RunError::Proc(_) | RunError::Heap(_)) => {
                let _ = self.probe.remove_target(pid);
                Ok(())
            }
            other => other,
        }
    }

    /// A process of the traced cgroup that the programs added to their filter when they saw
    /// it (at `ts`). Seeded from `/proc` when it can be read; a process already gone (or
    /// about to exec) starts empty, and its events still apply (its exec seeds it again).
    pub(super) fn joined(&mut self, pid: u32, ts: u64) -> Result<(), RunError> {
        if self.session.get(pid).is_some_and(|p| p.exited_ns.is_none()) {
            return Ok(());
        }
        let seed = read_seed(pid, monotonic_ns()).unwrap_or_default();
        self.seeded(pid, seed, ts)
    }
}

impl Live {
    /// What attaching to a process changes.
    pub(super) fn attached(&mut self) -> Attached<'_> {
        Attached {
            probe: &mut self.probe,
            session: &mut self.session,
            sink: self.sink.as_mut(),
            heap: self.heap.as_mut(),
            stacks: self.stacks.as_mut(),
        }
    }

    /// Attaches the members of the traced cgroup that joined it since the last look and gave
    /// no event yet (the programs add those that do at once), and hands the programs the
    /// groups created below it since.
    pub(super) fn join_cgroup(&mut self) -> Result<(), RunError> {
        let Some(group) = self.cgroup.clone() else {
            return Ok(());
        };
        self.probe.trace_cgroups(&group.ids())?;
        let mut attached = self.attached();
        for pid in group.pids() {
            attached.join(pid)?;
        }
        Ok(())
    }
}
