//! What follows an event in every run, live or replayed: the session applies it, the sink
//! shows it, and the last map of a process that exited is written ([`step`]); and what
//! follows a process's map, read from `/proc` live or from its snapshot in replay ([`seed`]).
//! The live run (`run::Live::handle`) and replay both take these steps, so they cannot differ
//! in them; what only a live run can do (read `/proc` after an exec, probe an allocator,
//! resume a stopped command) comes around them there.

use std::io;

use crate::{
    event::Event,
    output::{Sink, SnapshotReason},
    session::{Applied, Seed, Session},
};

/// Applies `ev` to `session`, shows it on `sink` (when `show`) and writes an exited process's
/// `exit` snapshot; what the model did.
pub fn step(
    session: &mut Session,
    sink: &mut dyn Sink,
    ev: &Event,
    show: bool,
) -> io::Result<Applied> {
    let applied = session.apply(ev);
    if show {
        sink.event(ev, &applied, session)?;
    }
    if let (Event::Exit { pid, ts_ns, .. }, Applied::Exit) = (ev, &applied)
        && let Some(p) = session.get(*pid)
    {
        sink.snapshot(*ts_ns, SnapshotReason::Exit, p)?;
    }
    Ok(applied)
}

/// A map of process `pid` at `ts`, taken for `reason`: a new process is added from it, an
/// exec or a resync replaces the model's (a followed child's seed repeats the copy its fork
/// made, and is not applied again; `None`: the map could not be read, the model stays), and
/// the snapshot of the result is written.
pub fn seed(
    session: &mut Session,
    sink: &mut dyn Sink,
    pid: u32,
    ts: u64,
    reason: SnapshotReason,
    seed: Option<Seed>,
    exe: Option<String>,
) -> io::Result<()> {
    match (seed, session.get(pid).is_some(), reason) {
        (Some(seed), false, _) => session.add(pid, seed, ts, exe),
        (Some(seed), true, SnapshotReason::Exec) => session.reseed(pid, seed, ts),
        (Some(seed), true, SnapshotReason::Resync) => session.resync(pid, seed, ts),
        _ => {}
    }
    if let Some(p) = session.get(pid) {
        sink.snapshot(ts, reason, p)?;
    }
    Ok(())
}
