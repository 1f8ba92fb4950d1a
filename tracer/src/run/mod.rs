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
    errors::Chain,
    event::{self, Event, Lane, Mark, Watermark},
    fault_access::FaultAccess,
    heap::{
        call::EntryStack,
        tracker::{HeapError, HeapTracer, Scope},
    },
    launch::{self, LaunchError},
    model::normalize,
    order::Reorder,
    output::{
        FaultFilter, LossSummary, Meta, Sink, SnapshotReason, file::OutputError, report::summarize,
    },
    pagemap,
    probe::{FaultBackend, Probe, ProbeError, ProbeOptions},
    procfs::{self, ProcError},
    residency,
    session::{Applied, Seed, Session},
    stacks::Collector,
};

mod attach;
mod event_loop;
mod exec_stops;
mod losses;
mod reconcile;
mod resolve;
mod ring;
mod snapshots;
mod target;

use attach::Attached;
use event_loop::event_loop;
use resolve::{resolve, shm_of};
pub use target::read_seed;
use target::{exe_of, validate_pid};

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
    #[error("writing output")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Runtime(io::Error),
}

/// The live state between setup and the end.
struct Live {
    probe: Probe,
    session: Session,
    sink: Box<dyn Sink>,
    /// Our launched child: stopped by the kernel at each exec, continued once reseeded.
    launched: Option<u32>,
    /// The kernel's loss counters at the last `lost` record.
    kernel_lost: LossSummary,
    undecodable: u64,
    undecodable_total: u64,
    /// Events left unhandled in the ring at a stop (not yet in a `lost` record, and in all).
    unread: u64,
    unread_total: u64,
    events: u64,
    /// Paths of the fds traced processes opened, by (pid, fd).
    opened: HashMap<(u32, i32), String>,
    /// What `--reconcile` keeps between its rounds (`None` without it).
    reconcile: Option<reconcile::Rounds>,
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
    /// The last resync read the maps of a process that was running: what changed while they
    /// were read may be counted twice, so an asked snapshot reads them again.
    resync_unconfirmed: bool,
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

    /// No traced process is alive, and no event that could add one waits to be handled.
    fn all_exited(&self) -> bool {
        !self.session.any_alive() && self.order.held() == 0
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
        if let Event::HeapRaw(raw) = ev {
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
            if let Some(heap) = self.heap.as_mut() {
                for (pid, addr) in c.take_wrapper_sites() {
                    heap.wrapper_site(&mut self.probe, pid, addr);
                }
            }
        }
        let stack_id = match &ev {
            Event::Syscall(s) => s.resolved.stack_id,
            Event::Fault(f) => f.stack_id,
            Event::Heap(h) => h.stack,
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
        if let Some(r) = self.reconcile.as_mut() {
            r.note(&ev, &applied);
        }
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
            if let Event::Exec { pid, .. } = &ev {
                // Before the launched command runs, when the kernel holds it at its exec.
                c.watch_python(*pid);
            }
        }
        // A child that is not traced never tells its exit: it is not watched.
        if let (
            Some(c),
            Event::Fork {
                pid,
                child,
                followed: true,
                ..
            },
        ) = (self.stacks.as_mut(), &ev)
        {
            c.forked(*pid, *child);
        }
        if let Some(c) = self.stacks.as_mut() {
            self.probe.set_python_procs(c.take_python_changes());
            self.probe.set_known_stacks(c.take_known_changes());
        }
        match (&ev, &applied) {
            (Event::Exec { pid, ts_ns, .. }, Applied::Exec) => {
                let pid = *pid;
                let seed = read_seed(pid, *ts_ns)
                    .inspect_err(|e| {
                        log::warn!("cannot read the map of {pid} after exec: {}", Chain(e));
                    })
                    .ok();
                crate::driver::seed(
                    &mut self.session,
                    &mut *self.sink,
                    pid,
                    *ts_ns,
                    SnapshotReason::Exec,
                    seed,
                    None,
                )
                .map_err(RunError::Write)?;
                if let Some(heap) = self.heap.as_mut() {
                    // The new image may preload another allocator: probed before it runs
                    // when the kernel holds it (our launched command), else as soon as seen.
                    heap.forget(&mut self.probe, pid);
                    let held = self.launched == Some(pid);
                    match heap.cover(&mut self.probe, pid, *ts_ns, !held) {
                        Ok(events) => follow_up.extend(events),
                        Err(e) => log::warn!("{}", Chain(&e)),
                    }
                }
                if self.launched == Some(pid) {
                    self.continue_after_exec(pid, *ts_ns);
                }
            }
            (Event::Exit { pid, .. }, Applied::Exit) => {
                if let Some(heap) = self.heap.as_mut() {
                    heap.forget(&mut self.probe, *pid);
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
                crate::driver::seed(
                    &mut self.session,
                    &mut *self.sink,
                    *child,
                    *ts_ns,
                    SnapshotReason::Seed,
                    None,
                    None,
                )
                .map_err(RunError::Write)?;
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

    /// `--metrics`: when a scrape waits, the numbers of now (the counters the summary uses).
    fn export_metrics(&mut self) {
        if let Some(m) = self.metrics.as_mut() {
            let probe = &mut self.probe;
            m.tick(&self.session, || crate::metrics::DaemonMetrics {
                lost: self.kernel_lost
                    + LossSummary::reader(self.undecodable_total, self.unread_total),
                events: self.events,
                rss_bytes: procfs::rss_bytes(std::process::id()),
                ring_used_bytes: probe.ring_fill(),
                ..Default::default()
            });
        }
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
        order: cfg.change_order,
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
        change_order: format!("{:?}", probe.change_order()).to_lowercase(),
        limits,
        clock: Some(crate::clock::anchor()),
    };
    sink.start(&meta).map_err(RunError::Write)?;
    let mut session = Session::default();
    let mut child = None;
    let mut guardian = None;
    // `--heap` names the call sites of allocations with one-frame stacks; the stacks of
    // memory events name Python functions too.
    let mut stacks = (cfg.stacks.any() || cfg.heap).then(|| {
        Collector::new()
            .with_python(cfg.stacks.any())
            .with_known_stacks(cfg.stacks.any() && cfg.stacks.known)
    });
    if cfg.command.is_empty() {
        let mut attached = Attached {
            probe: &mut probe,
            session: &mut session,
            sink: sink.as_mut(),
            heap: heap.as_mut(),
            stacks: stacks.as_mut(),
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
        // The (empty) seed, so that a replay knows the process before its exec.
        crate::driver::seed(
            &mut session,
            &mut *sink,
            pid,
            ts,
            SnapshotReason::Seed,
            Some(Seed::default()),
            None,
        )
        .map_err(RunError::Write)?;
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
        kernel_lost: LossSummary::default(),
        undecodable: 0,
        batch: Vec::with_capacity(DRAIN_BATCH),
        undecodable_total: 0,
        unread: 0,
        unread_total: 0,
        events: 0,
        opened: HashMap::new(),
        reconcile: cfg.reconcile.map(|_| reconcile::Rounds::default()),
        recovered_execs: HashSet::new(),
        resync_due: false,
        losing: false,
        caught_up_ns: 0,
        snapshot_due: None,
        silent_warned: HashSet::new(),
        cgroup,
        last_resync_ns: 0,
        resync_unconfirmed: false,
        heap,
        refused: Vec::new(),
        khugepaged: crate::collapse::Khugepaged::default(),
        stacks,
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
    live.report_losses(true)?;
    live.probe.flush_logs();
    live.snapshots(SnapshotReason::Final)?;
    // The same counters the last `lost` record reported, so that they add up.
    let lost = live.kernel_lost + LossSummary::reader(live.undecodable_total, live.unread_total);
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
        if h.stacks_dropped() > 0 {
            log::info!(
                "--heap: {} calls through a wrapper lost their stack words (their site is the wrapper)",
                h.stacks_dropped()
            );
        }
    }
    if let Some(c) = &live.stacks {
        log::info!(
            "stacks: {} received ({} recognised by the kernel, {} known from an earlier walk), {} unique, {} without their record, {} lost in the kernel; mappings read again {} times from /proc, {} from the model",
            c.received,
            c.known_hits(),
            c.memo_hits,
            c.unique(),
            c.orphaned,
            live.kernel_lost.lost_stack,
            c.mappings_reread().0,
            c.mappings_reread().1
        );
    }
    Ok(status)
}
