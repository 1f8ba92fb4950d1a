//! The live runner: validate targets, open the output, load the probe, attach or launch, then
//! read the ring buffer until the targets are gone, the duration is over or a signal arrives.

use std::{
    collections::{HashMap, HashSet},
    io,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    analysis,
    call::{MemCall, linux, map_anonymous},
    clock::monotonic_ns,
    event::{self, Event, Lane, Watermark},
    fault_access::FaultAccess,
    heap::tracker::{HeapError, HeapTracer, Scope},
    launch::{self, LaunchError},
    model::normalize,
    order::Reorder,
    output::{
        FaultFilter, LossSummary, Meta, Sink, SnapshotReason, file::OutputError, report::summarize,
    },
    pagemap,
    probe::{FaultBackend, KernelStats, Probe, ProbeError, ProbeOptions},
    procfs::{self, ProcError},
    residency,
    session::{Applied, Seed, Session},
    stacks::{Collector, RawStack},
};

pub use crate::config::RunConfig;

/// Errors of a live run, each one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("nothing to trace: give -p PID, --cgroup PATH or a command after --")]
    NoTarget,
    #[error("give either -p PID (or --cgroup) or a command, not both")]
    PidAndCommand,
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("pid {0} is given twice")]
    DuplicatePid(u32),
    #[error("pid {0} is vmatrace itself")]
    SelfPid(u32),
    #[error("no process with pid {0}")]
    NoProcess(u32),
    #[error("pid {0} is a kernel thread: it has no user address space to trace")]
    KernelThread(u32),
    #[error("pid {0} is a zombie: it has already exited")]
    Zombie(u32),
    #[error("process {0} exited while vmatrace was attaching")]
    ExitedDuringAttach(u32),
    #[error("--user applies to a launched command only")]
    UserWithoutCommand,
    #[error(
        "--stacks and --fault-stacks need Linux 5.15 or later (bpf_task_pt_regs); this kernel is {0}.{1}"
    )]
    StacksNeedNewerKernel(u32, u32),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Heap(#[from] HeapError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("writing output: {0}")]
    Write(#[source] io::Error),
    #[error("{0}")]
    Runtime(#[source] io::Error),
}

/// Checks a `-p` pid before anything is loaded.
fn validate_pid(pid: u32) -> Result<(), RunError> {
    if pid == std::process::id() {
        return Err(RunError::SelfPid(pid));
    }
    let stat = procfs::read_stat(pid).map_err(|e| match e {
        ProcError::NoProcess(p) => RunError::NoProcess(p),
        other => RunError::Proc(other),
    })?;
    if stat.is_kernel_thread() {
        return Err(RunError::KernelThread(pid));
    }
    if stat.is_dead() {
        return Err(RunError::Zombie(pid));
    }
    Ok(())
}

/// Reads the seed of `pid` from `/proc`: its VMAs (smaps, for the huge page flags), heap
/// start, the pages already resident (pagemap) and the huge page policy. Every seed (attach,
/// exec) is also where a 32-bit program, whose syscalls are not reported, is warned about.
pub fn read_seed(pid: u32, ts: u64) -> Result<Seed, ProcError> {
    if procfs::runs_32bit_program(pid) {
        log::warn!(
            "process {pid} runs a 32-bit program ({}): the kernel's syscall tracepoints do not report 32-bit syscalls, so only its page faults are traced (--reconcile shows what its syscalls changed)",
            crate::name::shown(&exe_of(pid).unwrap_or_default())
        );
    }
    let smaps = procfs::read_smaps(pid)?;
    let stat = procfs::read_stat(pid)?;
    let resident = pagemap::read_resident(pid, &smaps)?;
    Ok(Seed {
        vmas: smaps.iter().map(|e| e.map.to_vma(ts)).collect(),
        start_brk: Some(stat.start_brk),
        resident,
        thp: procfs::thp_policy(pid),
    })
}

fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| crate::name::from_os(p.as_os_str()))
}

/// Fills in what the kernel could not know: file names, segment sizes, pidfd targets.
/// `opened` holds the paths of the fds the traced processes opened.
fn resolve(event: &mut Event, opened: &mut HashMap<(u32, i32), String>) {
    let s = match event {
        Event::Open { pid, fd, path, .. } => {
            opened.insert((*pid, *fd), std::mem::take(path));
            return;
        }
        Event::Exit { pid, .. } => {
            opened.retain(|(p, _), _| p != pid);
            return;
        }
        Event::Syscall(s) => s,
        _ => return,
    };
    if s.errno().is_some() {
        return;
    }
    match s.mem() {
        MemCall::Mmap {
            flags, fd, offset, ..
        } if !map_anonymous(flags) => {
            // The kernel's own mapping at the returned address first; else the path the
            // process opened as that fd (events are handled in order, so that is the file
            // the fd named at the call, unlike /proc/PID/fd now), with its identity now.
            if let Some(f) = procfs::mapped_file(s.pid, s.ret as u64, offset) {
                s.resolved.path = Some(f.path);
                s.resolved.dev = f.dev;
                s.resolved.inode = f.inode;
            } else if let Some(path) = opened.get(&(s.pid, fd)) {
                (s.resolved.dev, s.resolved.inode) =
                    procfs::file_id(std::path::Path::new(&crate::name::to_os(path)));
                s.resolved.path = Some(path.clone());
            }
        }
        MemCall::Shmat { shmid, .. } if s.resolved.shm.is_none() => {
            s.resolved.shm = shm_of(s.pid, s.ret as u64, shmid)
        }
        MemCall::ProcessMadvise { pidfd, .. } => {
            s.resolved.target_pid = procfs::pidfd_target(s.pid, pidfd as i32);
        }
        _ => {}
    }
}

/// The size and key of the segment `shmid` that a successful `shmat` of `pid` attached at
/// `at`: from the process's map while it is attached, else from `/proc/sysvipc/shm` while the
/// segment exists.
fn shm_of(pid: u32, at: u64, shmid: i64) -> Option<(u64, u64)> {
    procfs::attached_segment(pid, at).or_else(|| procfs::shm_segment(shmid as u64))
}

fn delta(now: &KernelStats, last: &KernelStats, undecodable: u64, unread: u64) -> LossSummary {
    LossSummary {
        lost_syscall: now.lost_syscall - last.lost_syscall,
        lost_fault: now.lost_fault - last.lost_fault,
        lost_lifecycle: now.lost_lifecycle - last.lost_lifecycle,
        pending_full: now.pending_full - last.pending_full,
        exit_without_enter: now.exit_without_enter - last.exit_without_enter,
        targets_full: now.targets_full - last.targets_full,
        read_error: now.read_error - last.read_error,
        undecodable,
        lost_heap: now.lost_heap - last.lost_heap,
        unread,
        lost_stack: now.lost_stack - last.lost_stack,
        lost_open: now.lost_open - last.lost_open,
    }
}

/// The live state between setup and the end.
struct Live {
    probe: Probe,
    session: Session,
    sink: Box<dyn Sink>,
    /// Our launched child: stopped by the kernel at each exec, continued once reseeded.
    launched: Option<u32>,
    last_stats: KernelStats,
    undecodable: u64,
    undecodable_total: u64,
    /// Events left unhandled in the ring at a stop (not yet in a `lost` record, and in all).
    unread: u64,
    unread_total: u64,
    events: u64,
    /// Paths of the fds traced processes opened, by (pid, fd).
    opened: HashMap<(u32, i32), String>,
    /// Differences from /proc/PID/maps at the previous `--reconcile` check.
    drift_seen: HashMap<u32, Vec<String>>,
    /// Decoded events, until they can be handled in time order.
    order: Reorder<Event>,
    /// Events released to be handled (kept for its capacity).
    batch: Vec<Event>,
    /// The perf-event backend's faults have no error code: whether they wrote is read from
    /// the pages the kernel mapped.
    access: Option<FaultAccess>,
    /// Execs handled from a stop whose event was lost (pid, time): should the event come
    /// after all, it is ignored.
    recovered_execs: HashSet<(u32, u64)>,
    /// Events were lost since the maps were last read again.
    resync_due: bool,
    /// Events were lost in the last tick.
    losing: bool,
    last_resync_ns: u64,
    /// The allocator side (`--heap`).
    heap: Option<HeapTracer>,
    /// Watermarks owed to CPUs whose flushed batch was refused.
    refused: Vec<Refused>,
    /// khugepaged's collapses, looked for in the traced processes when its count moves.
    khugepaged: crate::collapse::Khugepaged,
    /// User stacks: unwound and symbolized as they arrive (`--stacks`, `--fault-stacks`).
    stacks: Option<Collector>,
    /// When the last collection that emptied the ring began: every event before then has
    /// been read (it is handled, or held in the reorder).
    caught_up_ns: u64,
    /// A snapshot asked for (SIGUSR1) at this time, written once every event before it is
    /// handled: a reader that is behind (under overload, or emulation) must not write the
    /// model of an earlier moment. At most [`SNAPSHOT_WAIT`] later, it is written anyway.
    snapshot_due: Option<(u64, Instant, SnapshotReason)>,
    /// Live processes already warned about for giving no event at all.
    silent_warned: HashSet<u32>,
    /// The cgroup whose members are traced (`--cgroup`), looked at for newcomers each tick.
    cgroup: Option<crate::cgroup::Cgroup>,
    /// `--metrics`: numbers for the scrapes that wait, gathered at the tick.
    metrics: Option<crate::metrics::Exporter>,
}

/// A traced process alive this long without a single event gets a warning: a run must not
/// look empty without saying why.
const SILENT_AFTER_NS: u64 = 10_000_000_000;

/// While events go on being lost, the maps are read again at most this often.
const RESYNC_EVERY_NS: u64 = 1_000_000_000;

/// A stop at exec this old without its exec event handled: the event was lost.
const LOST_EXEC_AFTER_NS: u64 = 1_000_000_000;

/// Events taken from the ring before they are handled (small enough that a batch takes a few
/// milliseconds, so that a deadline is kept to within that).
const DRAIN_BATCH: usize = 1024;

/// How long one read of the ring may go on before the loop sees to its other work (signals,
/// the timer, `--duration`): a reader that is behind still stops on time.
const DRAIN_SLICE: Duration = Duration::from_millis(20);

/// How long the end of a run (after SIGINT, SIGTERM, SIGHUP or `--duration`) may be stuck in
/// one write of its output before vmatrace gives up on the rest: a reader of its output that
/// does not read must not keep it (and the kernel programs) alive.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// A snapshot asked for (SIGUSR1) is written at most this long after, even if the reader
/// has not yet handled every event up to the asking.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(30);

/// Events handled between looks at the clock when handling is bounded in time.
const RELEASE_CHUNK: usize = 4096;

/// After a stop is asked, how long the last read of the ring may take; what is left then is
/// counted as unread.
const FINAL_DRAIN: Duration = Duration::from_millis(300);

/// A CPU whose batch a full ring refused at a flush: its watermark `asked` is given once a
/// batch stamped after `flushed` is read (every record reserved before then has been read).
#[derive(Clone, Copy, Debug)]
struct Refused {
    lane: Lane,
    cpu: u32,
    asked: u64,
    flushed: u64,
}
/// The default ring with stacks or `--heap` (`--ring-size` not given): a stack record is up to
/// 17 KiB, an allocator call two 72-byte records at millions of calls a second.
const STACKS_RING_BYTES: u32 = 64 << 20;

impl Live {
    /// Reads the records waiting in the ring, until it is empty or `until` has passed, and
    /// handles, in time order, the events that nothing still to come can precede (see
    /// [`crate::order`]). Returns whether the ring was emptied. Records are decoded and
    /// released in batches first and handled after: the ring's consumer position (a cache
    /// line the producing CPU reads for every record it reserves) then moves in a short burst
    /// instead of once per handled event, which keeps that line from bouncing between the
    /// cores all the time.
    fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<bool, RunError> {
        loop {
            // Up to DRAIN_BATCH events (a fault batch holds up to 64), so that the reorder
            // sorts little at a time.
            let first = self.order.incoming().len();
            let mut empty = false;
            while self.order.incoming().len() - first < DRAIN_BATCH {
                let Some(item) = ring.next() else {
                    empty = true;
                    break;
                };
                if let Some(stacks) = self.stacks.as_mut() {
                    match RawStack::decode(&item) {
                        Ok(Some(raw)) => {
                            stacks.receive(raw);
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.undecodable += 1;
                            self.undecodable_total += 1;
                            log::warn!("undecodable stack record: {e}");
                            continue;
                        }
                    }
                }
                let decoded = event::decode_into(&item, self.order.incoming());
                drop(item);
                match decoded {
                    Ok(Some(watermark)) => {
                        self.order.watermark(watermark);
                        self.settle_refused(watermark.ts_ns);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.undecodable += 1;
                        self.undecodable_total += 1;
                        log::warn!("undecodable ring-buffer record: {e}");
                    }
                }
            }
            if empty {
                self.settle_refused(u64::MAX);
            }
            if let Some(stacks) = self.stacks.as_mut() {
                stacks.attach(&mut self.order.incoming()[first..]);
            }
            if let Some(access) = self.access.as_mut() {
                // As soon as read, while the pages are most likely as the faults left them.
                access.resolve(&mut self.order.incoming()[first..]);
            }
            // A segment's size too, while it is most likely still attached.
            for ev in &mut self.order.incoming()[first..] {
                if let Event::Syscall(s) = ev
                    && let MemCall::Shmat { shmid, .. } = s.mem()
                    && s.errno().is_none()
                {
                    s.resolved.shm = shm_of(s.pid, s.ret as u64, shmid);
                }
            }
            self.handle_released(until)?;
            if empty {
                return Ok(true);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(false);
            }
        }
    }

    /// Gives the watermarks owed to CPUs whose batch was refused at a flush that ended before
    /// `read_past` (the stamp of a batch just read, stamped before it was reserved; `MAX` once
    /// the ring is empty): every record those CPUs reserved before the flush is read.
    fn settle_refused(&mut self, read_past: u64) {
        let order = &mut self.order;
        self.refused.retain(|r| {
            let due = r.flushed < read_past;
            if due {
                order.watermark(Watermark {
                    lane: r.lane,
                    cpu: r.cpu,
                    ts_ns: r.asked,
                });
            }
            !due
        });
    }

    /// Handles the events the reorder can release now, oldest first; with `until`, only
    /// until then (checked every [`RELEASE_CHUNK`] events): what is left stays held, in order,
    /// for the next call. A flush can release a ring's worth of events at once, whose
    /// handling took seconds without a tick or a look at the stop.
    fn handle_released(&mut self, until: Option<Instant>) -> Result<(), RunError> {
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            self.order.release_at_most(RELEASE_CHUNK, &mut batch);
            let n = batch.len();
            for ev in batch.drain(..) {
                self.handle(ev)?;
            }
            self.batch = batch;
            if n < RELEASE_CHUNK || until.is_some_and(|u| Instant::now() >= u) {
                return Ok(());
            }
        }
    }

    /// Reads the ring, has every CPU write the faults it holds (into the room just made), then
    /// reads the ring again: every event up to now is handled, unless `until` passed first
    /// (the reader is behind; the rest waits in the ring).
    fn collect(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<bool, RunError> {
        let began = monotonic_ns();
        self.drain(ring, until)?;
        let asked = monotonic_ns();
        let outcome = self.probe.flush_faults();
        let heap = self.heap.is_some().then(|| self.probe.flush_heap());
        let flushed = monotonic_ns();
        // A refused batch was counted lost and emptied: none of that CPU's faults (or
        // allocator events) up to `asked` can still come once what it wrote before the flush
        // is read. A CPU whose allocator batch was busy gives its watermark next time.
        self.refused
            .extend(outcome.refused.into_iter().map(|cpu| Refused {
                lane: Lane::Faults,
                cpu,
                asked,
                flushed,
            }));
        if let Some(heap) = heap {
            self.refused
                .extend(heap.faults_like.refused.into_iter().map(|cpu| Refused {
                    lane: Lane::Heap,
                    cpu,
                    asked,
                    flushed,
                }));
            for cpu in heap.faults_like.gone {
                self.order.forget(Lane::Heap, cpu);
            }
        }
        for cpu in outcome.gone {
            self.order.forget(Lane::Faults, cpu);
        }
        let emptied = self.drain(ring, until)?;
        self.handle_released(until)?;
        if emptied {
            self.caught_up_ns = began;
        }
        Ok(emptied)
    }

    /// What attaching to a process changes.
    fn attached(&mut self) -> Attached<'_> {
        Attached {
            probe: &mut self.probe,
            session: &mut self.session,
            sink: self.sink.as_mut(),
            heap: self.heap.as_mut(),
        }
    }

    /// Attaches the members of the traced cgroup that joined it since the last look and gave
    /// no event yet (the programs add those that do at once), and hands the programs the
    /// groups created below it since.
    fn join_cgroup(&mut self) -> Result<(), RunError> {
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

    /// Warns, once per process, about a traced process that is alive but has given no event
    /// at all (no memory call, no fault) for [`SILENT_AFTER_NS`]: it is idle, or something
    /// keeps vmatrace from seeing it; either way the user is told, not shown an empty run.
    fn warn_about_silent_targets(&mut self) {
        let now = monotonic_ns();
        for p in self.session.processes() {
            let c = &p.counts;
            if p.exited_ns.is_none()
                && c.faults == 0
                && c.syscalls.is_empty()
                && now.saturating_sub(p.started_ns) >= SILENT_AFTER_NS
                && self.silent_warned.insert(p.pid)
            {
                log::warn!(
                    "process {} ({}) is alive but gave no event in {} s: no memory call, no page fault (idle?); its memory is as its seed snapshot shows",
                    p.pid,
                    crate::name::shown(p.exe.as_deref().unwrap_or("?")),
                    SILENT_AFTER_NS / 1_000_000_000
                );
            }
        }
    }

    /// Writes the snapshot asked for (SIGUSR1, `--snapshot-every`) once every event before the asking is
    /// handled: then collapses are looked for (on a model that has caught up), handled, and
    /// the maps read again if events were lost since the last resync.
    fn snapshot_if_due(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), RunError> {
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
        self.report_losses()?;
        self.resync_after_losses(true)?;
        self.snapshots(reason)
    }

    /// No traced process is alive, and no event that could add one waits to be handled.
    fn all_exited(&self) -> bool {
        !self.session.any_alive() && self.order.held() == 0
    }

    /// At the end, once nothing is traced: collects what the CPUs still hold and handles
    /// every event left (after a collection, every CPU has reported up to the time it began).
    /// With `until` (a stop was asked), what is still in the ring then, and what the reorder
    /// still holds, is counted as unread instead: a reader far behind must not keep a stopped
    /// run going (handling a reorder's worth of held events took seconds).
    fn drain_last(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<(), RunError> {
        let mut unread = 0;
        if !self.collect(ring, until)? {
            while let Some(item) = ring.next() {
                unread += event::events_in(&item).unwrap_or(1);
            }
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.order.release_all(&mut batch);
        let mut events = batch.drain(..);
        for (i, ev) in events.by_ref().enumerate() {
            if i % 256 == 0 && until.is_some_and(|u| Instant::now() >= u) {
                unread += 1;
                break;
            }
            self.handle(ev)?;
        }
        unread += events.count() as u64;
        self.batch = batch;
        self.unread += unread;
        self.unread_total += unread;
        Ok(())
    }

    /// Continues the launched command if the kernel stopped it at the exec of `ts_ns` (not a
    /// stop of its own, which only it may end).
    fn continue_after_exec(&mut self, pid: u32, ts_ns: u64) {
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
    fn recover_lost_exec_stops(&mut self) -> Result<(), RunError> {
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
    fn continue_all_exec_stops(&mut self) {
        for (pid, _) in self.probe.exec_stops() {
            if self.probe.clear_exec_stop(pid) {
                // SAFETY: signalling the process the kernel stopped for us.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
        }
    }

    fn handle(&mut self, mut ev: Event) -> Result<(), RunError> {
        if let Event::Exec { pid, ts_ns, .. } = ev
            && self.recovered_execs.remove(&(pid, ts_ns))
        {
            // Its exec was handled when the stop was found (recover_lost_exec_stops).
            return Ok(());
        }
        if let Event::Join { pid, ts_ns, .. } = ev {
            // A process of the traced cgroup, seen by the programs (now in their filter).
            return self.attached().joined(pid, ts_ns);
        }
        if let Event::HeapRaw(raw) = &ev {
            let Some(call) = self.heap.as_mut().and_then(|h| h.pair(raw, &self.session)) else {
                return Ok(());
            };
            ev = Event::Heap(call);
        }
        self.events += 1;
        resolve(&mut ev, &mut self.opened);
        if let Event::Syscall(s) = &mut ev {
            let space = self.session.space_of(s.pid);
            residency::resolve(s, space);
        }
        if let Some(c) = self.stacks.as_mut() {
            // Unwound in the mappings the model has just before the event.
            let space = self.session.space_of(ev.pid());
            c.resolve(&mut ev, space);
        }
        let stack_id = match &ev {
            Event::Syscall(s) => s.resolved.stack_id,
            Event::Fault(f) => f.stack_id,
            _ => None,
        };
        if let Some(id) = stack_id
            && let Some(def) = self.stacks.as_mut().and_then(|c| c.first_use(id))
        {
            self.sink.stack(&def).map_err(RunError::Write)?;
            self.session.stacks.insert(def);
            self.sink.boundary(&self.session).map_err(RunError::Write)?;
        }
        let applied = crate::driver::step(&mut self.session, self.sink.as_mut(), &ev, true)
            .map_err(RunError::Write)?;
        let mut follow_up = Vec::new();
        if let (Some(heap), Event::Syscall(s), Applied::Syscall { effect, .. }) =
            (self.heap.as_mut(), &ev, &applied)
            && matches!(s.mem(), MemCall::Mmap { prot, .. } if prot & linux::PROT_EXEC != 0)
        {
            follow_up.extend(heap.mapped(&mut self.probe, s, effect));
        }
        if let (Some(c), Event::Exec { pid, .. } | Event::Exit { pid, .. }) =
            (self.stacks.as_mut(), &ev)
        {
            c.forget(*pid);
        }
        match (&ev, &applied) {
            (Event::Exec { pid, ts_ns, .. }, Applied::Exec) => {
                let pid = *pid;
                match read_seed(pid, *ts_ns) {
                    Ok(seed) => self.session.reseed(pid, seed, *ts_ns),
                    Err(e) => log::warn!("cannot read the map of {pid} after exec: {e}"),
                }
                if let Some(p) = self.session.get(pid) {
                    self.sink
                        .snapshot(*ts_ns, SnapshotReason::Exec, p)
                        .map_err(RunError::Write)?;
                }
                if let Some(heap) = self.heap.as_mut() {
                    // The new image may preload another allocator: probed before it runs
                    // when the kernel holds it (our launched command), else as soon as seen.
                    heap.forget(pid);
                    let held = self.launched == Some(pid);
                    match heap.cover(&mut self.probe, pid, *ts_ns, !held) {
                        Ok(events) => follow_up.extend(events),
                        Err(e) => log::warn!("{e}"),
                    }
                }
                if self.launched == Some(pid) {
                    self.continue_after_exec(pid, *ts_ns);
                }
            }
            (Event::Exit { pid, .. }, Applied::Exit) => {
                if let Some(heap) = self.heap.as_mut() {
                    heap.forget(*pid);
                }
            }
            (
                Event::Fork { child, ts_ns, .. },
                Applied::Fork {
                    traced: true,
                    shares_vm: false,
                    ..
                },
            ) => {
                if let Some(p) = self.session.get(*child) {
                    self.sink
                        .snapshot(*ts_ns, SnapshotReason::Seed, p)
                        .map_err(RunError::Write)?;
                }
            }
            (Event::Syscall(s), Applied::Syscall { .. }) => {
                // MADV_COLLAPSE made huge pages within the call, without faults.
                if let Some((pid, start, end)) = crate::collapse::advised(s)
                    && let Some(space) = self.session.space_of(pid)
                {
                    for c in crate::collapse::found(pid, space, (start, end), true, s.ts_ns) {
                        self.handle(c)?;
                    }
                }
            }
            _ => {}
        }
        // After the snapshot an exec, exit or fork writes: a rotated output may cut here.
        self.sink.boundary(&self.session).map_err(RunError::Write)?;
        for ev in follow_up {
            self.handle(ev)?;
        }
        Ok(())
    }

    /// When khugepaged has collapsed pages since the last look, the traced processes' blocks
    /// that it may have collapsed are looked at in pagemap; collapses found are handled in
    /// time order with the events (stamped now).
    fn look_for_collapses(&mut self) {
        if !self.khugepaged.collapsed_since() {
            return;
        }
        let ts = monotonic_ns();
        let found: Vec<Event> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none())
            .flat_map(|p| crate::collapse::found(p.pid, &p.space, (0, u64::MAX), false, ts))
            .collect();
        self.order.incoming().extend(found);
    }

    fn report_losses(&mut self) -> Result<(), RunError> {
        let now = self.probe.stats()?;
        let d = delta(
            &now,
            &self.last_stats,
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
        self.losing = d.lost_syscall + d.lost_fault + d.lost_lifecycle + d.lost_open > 0;
        if d.lost_heap > 0 {
            self.session.heap_events_lost();
        }
        self.resync_due |= self.losing;
        self.last_stats = now;
        Ok(())
    }

    /// After lost events the model of every live process may be wrong: once the losses stop
    /// (or every second while they go on), each map is read again from `/proc` (its VMAs and
    /// resident pages, as at attach) and written as a `resync` snapshot, from which a replay
    /// reseeds too. The process runs meanwhile, so what it changes while its map is read may
    /// be applied twice; the counts (calls, faults) miss the lost events, and the summary
    /// says how many resyncs there were. `now_asked`: before a SIGUSR1 snapshot, at once
    /// whatever the pace, so that the snapshot is the kernel's state.
    fn resync_after_losses(&mut self, now_asked: bool) -> Result<(), RunError> {
        let now = monotonic_ns();
        if !self.resync_due
            || (!now_asked
                && self.losing
                && now.saturating_sub(self.last_resync_ns) < RESYNC_EVERY_NS)
        {
            return Ok(());
        }
        self.resync_due = false;
        self.last_resync_ns = now;
        // (A process sharing another's memory is resynchronised with that one.)
        let pids: Vec<u32> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none() && self.session.memory_owner(p.pid) == p.pid)
            .map(|p| p.pid)
            .collect();
        for pid in pids {
            let Ok(seed) = read_seed(pid, now) else {
                continue;
            };
            self.session.resync(pid, seed, now);
            if let Some(p) = self.session.get(pid) {
                self.sink
                    .snapshot(now, SnapshotReason::Resync, p)
                    .map_err(RunError::Write)?;
            }
            self.sink.boundary(&self.session).map_err(RunError::Write)?;
        }
        Ok(())
    }

    /// Once lifecycle events have been lost (a full ring), an exit may be among them: a
    /// process the session still thinks alive but that /proc shows gone (or a zombie) is
    /// marked exited, so that a run waiting for its processes ends.
    fn reap_lost_exits(&mut self) {
        if self.last_stats.lost_lifecycle == 0 {
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
                log::warn!(
                    "process {pid} has exited; its exit event was lost with others when the ring buffer was full"
                );
            }
        }
    }

    fn reconcile(&mut self) -> Result<(), RunError> {
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

    /// `--metrics`: when a scrape waits, the numbers of now (the counters the summary uses).
    fn export_metrics(&mut self) {
        if let Some(m) = self.metrics.as_mut() {
            let probe = &mut self.probe;
            m.tick(&self.session, || crate::metrics::DaemonMetrics {
                lost: LossSummary::new(&self.last_stats, self.undecodable_total, self.unread_total),
                events: self.events,
                rss_bytes: procfs::rss_bytes(std::process::id()),
                ring_used_bytes: probe.ring_fill(),
                ..Default::default()
            });
        }
    }

    fn snapshots(&mut self, reason: SnapshotReason) -> Result<(), RunError> {
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
    fn snapshot_now(
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

/// What attaching to a running process changes: the kernel's targets, the session, the
/// output (its seed snapshot) and the allocator probes.
struct Attached<'a> {
    probe: &'a mut Probe,
    session: &'a mut Session,
    sink: &'a mut dyn Sink,
    heap: Option<&'a mut HeapTracer>,
}

impl Attached<'_> {
    /// Traces the running process `pid` from now (`-p`): in the kernel's filter first, then
    /// seeded from `/proc`, so that nothing it does after the seed is missed.
    fn attach(&mut self, pid: u32, follow: bool) -> Result<(), RunError> {
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
    fn seeded(&mut self, pid: u32, seed: Seed, ts: u64) -> Result<(), RunError> {
        self.session.add(pid, seed, ts, exe_of(pid));
        if let Some(p) = self.session.get(pid) {
            self.sink
                .snapshot(ts, SnapshotReason::Seed, p)
                .map_err(RunError::Write)?;
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
    fn join(&mut self, pid: u32) -> Result<(), RunError> {
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
    fn joined(&mut self, pid: u32, ts: u64) -> Result<(), RunError> {
        if self.session.get(pid).is_some_and(|p| p.exited_ns.is_none()) {
            return Ok(());
        }
        let seed = read_seed(pid, monotonic_ns()).unwrap_or_default();
        self.seeded(pid, seed, ts)
    }
}

fn make_sink(cfg: &RunConfig, start_ns: u64) -> Result<Box<dyn Sink>, RunError> {
    Ok(crate::output::status::live_sink(cfg, start_ns)?)
}

/// Runs a live trace; returns the exit code (the launched command's, or 0).
pub fn run(cfg: RunConfig) -> Result<i32, RunError> {
    let attaching = !cfg.pids.is_empty() || cfg.cgroup.is_some();
    match (attaching, cfg.command.is_empty()) {
        (false, true) => return Err(RunError::NoTarget),
        (true, false) => return Err(RunError::PidAndCommand),
        _ => {}
    }
    let cgroup = cfg
        .cgroup
        .as_deref()
        .map(crate::cgroup::Cgroup::open)
        .transpose()?;
    if cfg.user.is_some() && cfg.command.is_empty() {
        return Err(RunError::UserWithoutCommand);
    }
    if cfg.stacks.any()
        && let Some((major, minor)) = procfs::kernel_release().filter(|&v| v < (5, 15))
    {
        return Err(RunError::StacksNeedNewerKernel(major, minor));
    }
    let mut seen = HashSet::new();
    for &pid in &cfg.pids {
        if !seen.insert(pid) {
            return Err(RunError::DuplicatePid(pid));
        }
        validate_pid(pid)?;
    }
    let creds = if cfg.command.is_empty() {
        None
    } else {
        launch::credentials(cfg.user.as_deref())?
    };
    // Stacks are up to 17 KiB a record: the default ring grows to hold a burst of them.
    let ring_bytes =
        if (cfg.stacks.any() || cfg.heap) && cfg.ring_bytes == tracer_common::DEFAULT_RING_BYTES {
            STACKS_RING_BYTES
        } else {
            cfg.ring_bytes
        };
    let limits = crate::analysis::Limits::of_this_machine();
    // Before the output file is made: a port in use leaves nothing behind.
    let metrics = cfg
        .metrics
        .map(|addr| crate::metrics::Exporter::start(addr, limits, ring_bytes))
        .transpose()?;
    let start_ns = monotonic_ns();
    let mut sink = make_sink(&cfg, start_ns)?;
    let mut probe = Probe::load(ProbeOptions {
        ring_bytes,
        faults: if cfg.faults == FaultFilter::None {
            FaultBackend::Off
        } else {
            cfg.backend
        },
        syscalls: cfg.syscall_backend,
        exit_rule: cfg.exit_rule,
        stacks: cfg.stacks,
        pid_namespace: procfs::own_pid_namespace(),
        cgroup: cgroup.is_some(),
        ..ProbeOptions::default()
    })?;
    if let Some(group) = &cgroup {
        probe.trace_cgroups(&group.ids())?;
    }
    let mut heap = if cfg.heap {
        probe.load_heap()?;
        Some(HeapTracer::new(if cfg.follow {
            Scope::All
        } else {
            Scope::PerProcess
        }))
    } else {
        None
    };
    let meta = Meta {
        fault_backend: format!("{:?}", probe.fault_backend()).to_lowercase(),
        syscall_backend: format!("{:?}", probe.syscall_backend()).to_lowercase(),
        limits,
        clock: Some(crate::clock::anchor()),
    };
    sink.start(&meta).map_err(RunError::Write)?;
    let mut session = Session::default();
    let mut child = None;
    let mut guardian = None;
    if cfg.command.is_empty() {
        let mut attached = Attached {
            probe: &mut probe,
            session: &mut session,
            sink: sink.as_mut(),
            heap: heap.as_mut(),
        };
        for &pid in &cfg.pids {
            attached.attach(pid, cfg.follow)?;
        }
        for pid in cgroup.iter().flat_map(|c| c.pids()) {
            attached.join(pid)?;
        }
    } else {
        let stops = probe.exec_stops_fd().map_err(|source| {
            RunError::Launch(LaunchError::Os {
                what: "sharing the exec stops with the guardian",
                source,
            })
        })?;
        let held = launch::spawn_held(&cfg.command, creds.as_ref(), stops)?;
        let pid = held.pid;
        probe.add_target(pid, cfg.follow, true)?;
        if let Some(heap) = heap.as_mut() {
            heap.prepare_launch(&mut probe, pid)?;
        }
        let ts = monotonic_ns();
        session.add(pid, Seed::default(), ts, None);
        // The (empty) seed, so that a replay knows the process before its exec.
        if let Some(p) = session.get(pid) {
            sink.snapshot(ts, SnapshotReason::Seed, p)
                .map_err(RunError::Write)?;
        }
        guardian = Some(held.release()?);
        child = Some(pid);
    }
    crate::output::status::banner(&cfg, &meta, &session);
    if let Some(m) = &metrics {
        // The port too when the kernel chose it (`--metrics 127.0.0.1:0`).
        eprintln!(
            "vmatrace: Prometheus metrics at http://{}/metrics",
            m.local_addr()
        );
    }
    let ring = probe.take_ring().ok_or(ProbeError::Missing("EVENTS"))?;
    let mut order = if probe.batch_cpus().is_empty() {
        Reorder::in_order()
    } else {
        Reorder::new(probe.batch_cpus())
    };
    if heap.is_some() {
        order.wait_for_heap(probe.heap_cpus());
    }
    let access = (probe.fault_backend() == FaultBackend::PerfEvent).then(FaultAccess::default);
    let live = Live {
        access,
        order,
        probe,
        session,
        sink,
        launched: child,
        last_stats: KernelStats::default(),
        undecodable: 0,
        batch: Vec::with_capacity(DRAIN_BATCH),
        undecodable_total: 0,
        unread: 0,
        unread_total: 0,
        events: 0,
        opened: HashMap::new(),
        drift_seen: HashMap::new(),
        recovered_execs: HashSet::new(),
        resync_due: false,
        losing: false,
        caught_up_ns: 0,
        snapshot_due: None,
        silent_warned: HashSet::new(),
        cgroup,
        last_resync_ns: 0,
        heap,
        refused: Vec::new(),
        khugepaged: crate::collapse::Khugepaged::default(),
        stacks: cfg.stacks.any().then(Collector::new),
        metrics,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let looped = runtime.block_on(event_loop(live, ring, guardian, &cfg));
    // Do not wait for the thread blocked in waitpid when we stop before the child does.
    runtime.shutdown_background();
    let (mut live, mut ring, status, stop_asked) = looped?;
    // Stop producing, then read everything still in the ring, then the final state.
    live.probe.clear_targets()?;
    live.continue_all_exec_stops();
    live.look_for_collapses();
    live.drain_last(&mut ring, stop_asked.then(|| Instant::now() + FINAL_DRAIN))?;
    live.report_losses()?;
    live.probe.flush_logs();
    live.snapshots(SnapshotReason::Final)?;
    // The same counters the last `lost` record reported, so that they add up.
    let lost = LossSummary::new(&live.last_stats, live.undecodable_total, live.unread_total);
    let summary = summarize(&live.session, lost);
    live.sink
        .summary(monotonic_ns(), &summary)
        .map_err(RunError::Write)?;
    if cfg.report {
        let findings: Vec<_> = live
            .session
            .processes()
            .flat_map(|p| analysis::analyze(p, &limits, &live.session.stacks))
            .collect();
        live.sink.findings(&findings).map_err(RunError::Write)?;
    }
    live.sink.flush().map_err(RunError::Write)?;
    crate::signals::finished();
    log::debug!("{} events", live.events);
    if let Some(h) = &live.heap {
        let st = h.pairing_stats();
        if st != Default::default() {
            log::info!("--heap: allocator records not paired: {st:?}");
        }
    }
    if let Some(c) = &live.stacks {
        log::info!(
            "stacks: {} received ({} known from an earlier walk), {} unique, {} without their record, {} lost in the kernel",
            c.received,
            c.memo_hits,
            c.unique(),
            c.orphaned,
            live.last_stats.lost_stack
        );
    }
    Ok(status)
}

/// `--duration` is over: true when the run should stop now. A launched command still running
/// is ended first (SIGTERM, then SIGKILL, see [`launch::Ending`]) and the run goes on until
/// its end is traced; an attached process is left running.
fn duration_over(live: &Live, child_done: bool, ending: &mut Option<launch::Ending>) -> bool {
    match (live.launched, child_done) {
        (Some(pid), false) => ending
            .get_or_insert_with(|| launch::Ending::start(pid))
            .step(),
        _ => true,
    }
}

async fn event_loop(
    mut live: Live,
    ring: RingBuf<MapData>,
    guardian: Option<launch::Guardian>,
    cfg: &RunConfig,
) -> Result<(Live, RingBuf<MapData>, i32, bool), RunError> {
    // SAFETY: the RingBuf owns its map fd for as long as it lives, and the AsyncFd owns the
    // RingBuf until `into_inner` below.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| RunError::Runtime(e.into()))?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Runtime)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Runtime)?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(RunError::Runtime)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Runtime)?;
    let mut periodic = cfg.snapshot_every.map(|every| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    crate::signals::watch_stop(cfg.duration, STOP_GRACE).map_err(RunError::Runtime)?;
    // Handlers in place: signals sent since vmatrace started are handled now.
    crate::signals::release();
    let child = guardian.is_some();
    let mut waiter = guardian.map(|g| tokio::task::spawn_blocking(move || g.wait_exit_code()));
    let started = Instant::now();
    let mut last_reconcile = Instant::now();
    let mut status = 0;
    let mut child_done = !child;
    // Once --duration is over: the launched command being ended (see launch::Ending).
    let mut ending: Option<launch::Ending> = None;
    // A stop was asked (a signal, or the end of `--duration`), rather than the run ending.
    let mut stop_asked = false;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard.map_err(RunError::Runtime)?;
                // Left ready while records remain: the next turn reads on, after any tick
                // that is due. A ring that is never empty keeps tokio from polling its signal
                // streams and timers for seconds, so the stop is looked for here too.
                if live.drain(guard.get_inner_mut(), Some(Instant::now() + DRAIN_SLICE))? {
                    guard.clear_ready();
                } else {
                    drop(guard);
                    tokio::task::yield_now().await;
                }
                if crate::signals::stop_asked() {
                    stop_asked = true;
                    break;
                }
                if cfg.duration.is_some_and(|d| started.elapsed() >= d)
                    && duration_over(&live, child_done, &mut ending)
                {
                    stop_asked = true;
                    break;
                }
            }
            _ = tick.tick() => {
                live.collect(fd.get_mut(), Some(Instant::now() + DRAIN_SLICE))?;
                live.snapshot_if_due(fd.get_mut())?;
                live.sink.tick(&live.session).map_err(RunError::Write)?;
                live.report_losses()?;
                live.export_metrics();
                live.recover_lost_exec_stops()?;
                live.resync_after_losses(false)?;
                live.reap_lost_exits();
                live.look_for_collapses();
                live.join_cgroup()?;
                live.warn_about_silent_targets();
                live.probe.flush_logs();
                if cfg.duration.is_some_and(|d| started.elapsed() >= d)
                    && duration_over(&live, child_done, &mut ending)
                {
                    stop_asked = true;
                    break;
                }
                // A cgroup's run goes on while it is empty: processes may join it.
                if child_done && live.all_exited() && live.cgroup.is_none() {
                    break;
                }
                if let Some(every) = cfg.reconcile
                    && last_reconcile.elapsed() >= every
                {
                    last_reconcile = Instant::now();
                    live.reconcile()?;
                }
            }
            _ = sigint.recv() => {
                stop_asked = true;
                break;
            }
            _ = sigterm.recv() => {
                stop_asked = true;
                break;
            }
            _ = sighup.recv() => {
                stop_asked = true;
                break;
            }
            _ = sigusr1.recv() => live.snapshot_now(fd.get_mut(), SnapshotReason::Signal)?,
            _ = async {
                match periodic.as_mut() {
                    Some(every) => every.tick().await,
                    None => std::future::pending().await,
                }
            } => live.snapshot_now(fd.get_mut(), SnapshotReason::Periodic)?,
            code = async {
                match waiter.as_mut() {
                    Some(w) => w.await,
                    None => std::future::pending().await,
                }
            }, if waiter.is_some() => {
                status = code.unwrap_or(1);
                waiter = None;
                child_done = true;
                live.collect(fd.get_mut(), Some(Instant::now() + DRAIN_SLICE))?;
                if ending.is_some() {
                    // Ended by --duration: a stop, its end now traced.
                    stop_asked = true;
                    break;
                }
                if !cfg.follow || live.all_exited() {
                    break;
                }
            }
        }
    }
    Ok((live, fd.into_inner(), status, stop_asked))
}
