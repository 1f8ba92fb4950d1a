//! What follows an event in every run, live or replayed: the session applies it, the sink
//! shows it, and the last map of a process that exited is written. The live run
//! (`run::Runner::handle`) and replay both take this step, so they cannot differ in it; what
//! only a live run can do (read `/proc` after an exec, probe an allocator, resume a stopped
//! command) comes after it there.

use std::io;

use crate::{
    event::Event,
    output::{Sink, SnapshotReason},
    session::{Applied, Session},
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
