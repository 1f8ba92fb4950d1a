//! The loop of a live run: the ring, the tick, signals, `--duration` and the launched command's
//! end, until the run is over.

use super::*;

/// `--duration` is over: true when the run should stop now. A launched command still running
/// is ended first (SIGTERM, then SIGKILL, see [`launch::Ending`]) and the run goes on until
/// its end is traced; an attached process is left running.
pub(super) fn duration_over(
    live: &Live,
    child_done: bool,
    ending: &mut Option<launch::Ending>,
) -> bool {
    match (live.launched, child_done) {
        (Some(pid), false) => ending
            .get_or_insert_with(|| launch::Ending::start(pid))
            .step(),
        _ => true,
    }
}

pub(super) async fn event_loop(
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
                live.report_losses(false)?;
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
