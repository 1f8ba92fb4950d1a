//! The signals vmatrace handles (SIGINT, SIGTERM and SIGHUP to stop cleanly, SIGUSR1 for
//! snapshots) are blocked from its first instruction until its handlers are in place, so that
//! one sent early is handled late instead of killing vmatrace by its default action (which
//! left an empty output and, before the guardian, a stopped command). Once a stop is asked, a
//! watchdog thread makes sure the run ends even when the main thread is blocked writing to a
//! reader that does not read; an end that is only slow (a loaded machine, many processes to
//! snapshot) goes on.

use crate::clock::monotonic_ns;
use std::{
    io::{self, Write},
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The signals held.
const HELD: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

fn set(how: libc::c_int) {
    // SAFETY: building a signal set on the stack and changing this thread's mask; threads
    // started later inherit it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HELD {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Blocks the handled signals (first thing in `main`, before any thread starts).
pub fn hold() {
    set(libc::SIG_BLOCK);
}

/// Unblocks them: once the handlers are installed (pending ones are handled now), or at once
/// for the commands that install none.
pub fn release() {
    set(libc::SIG_UNBLOCK);
}

/// Stop requests (SIGINT, SIGTERM, SIGHUP) received in a live run.
static STOP_REQUESTS: AtomicU32 = AtomicU32::new(0);
/// The run has written all it had to.
static FINISHED: AtomicBool = AtomicBool::new(false);
/// When the write the main thread is in began (`CLOCK_MONOTONIC` ns; 0: not writing), so
/// that the watchdog tells an end blocked on its output from a slow one.
static WRITING_SINCE_NS: AtomicU64 = AtomicU64::new(0);

/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(20);

/// Watches the end of a live run from a thread of its own, which nothing in the run can
/// block. Once a stop is asked (SIGINT, SIGTERM or SIGHUP, or `duration` after now), the run
/// goes on for as long as it needs, unless it is stuck in one write of its output for
/// `grace` (counted from the stop at the earliest), or a second SIGINT comes: then vmatrace
/// exits without the rest of its output (the kernel unloads its programs when its
/// descriptors close, and the launched command's guardian continues the command should it be
/// stopped at an exec). What this guards against: a reader of stdout that does not read.
pub fn watch_stop(duration: Option<Duration>, grace: Duration) -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the action is one atomic add, which is async-signal-safe; tokio's handlers
        // for the same signals stay registered.
        unsafe {
            signal_hook_registry::register(sig, || {
                STOP_REQUESTS.fetch_add(1, Ordering::SeqCst);
            })
        }?;
    }
    let ends_at = duration.map(|d| Instant::now() + d);
    std::thread::Builder::new()
        .name("stop-watchdog".into())
        .spawn(move || {
            // When the watchdog first saw the stop (within one look of it), as a clock value.
            let mut stop_seen: Option<u64> = None;
            loop {
                std::thread::sleep(WATCH_EVERY);
                if FINISHED.load(Ordering::SeqCst) {
                    return;
                }
                if STOP_REQUESTS.load(Ordering::SeqCst) >= 2 {
                    exit_now(
                        "vmatrace: stopped at once (asked twice); the rest of the output and the summary are not written\n",
                        130,
                    );
                }
                let now = monotonic_ns();
                if stop_seen.is_none()
                    && (STOP_REQUESTS.load(Ordering::SeqCst) > 0
                        || ends_at.is_some_and(|t| Instant::now() >= t))
                {
                    stop_seen = Some(now);
                }
                let writing = WRITING_SINCE_NS.load(Ordering::SeqCst);
                if let Some(stopped) = stop_seen
                    && writing != 0
                    && now.saturating_sub(writing.max(stopped)) > grace.as_nanos() as u64
                {
                    exit_now(
                        "vmatrace: its output was not taken for a second after the stop (is it being read?); the rest of the output and the summary are not written\n",
                        1,
                    );
                }
            }
        })?;
    Ok(())
}

/// Marks the main thread as in a write of its output (`true`) or out of it: the watchdog's
/// view of a blocked output.
pub fn writing(now: bool) {
    let since = if now { monotonic_ns().max(1) } else { 0 };
    WRITING_SINCE_NS.store(since, Ordering::SeqCst);
}

/// Whether a stop was asked by a signal since [`watch_stop`]: seen at once, even while the
/// event loop is too busy for tokio to poll its signal streams.
pub fn stop_asked() -> bool {
    STOP_REQUESTS.load(Ordering::SeqCst) > 0
}

/// The run has written everything: the watchdog has nothing left to guard.
pub fn finished() {
    FINISHED.store(true, Ordering::SeqCst);
}

fn exit_now(message: &str, code: i32) -> ! {
    // SAFETY: a write to stderr, then `_exit`, which ends every thread at once: no lock that
    // the blocked thread may hold is taken, nothing is flushed into the output that is not
    // being read, and no descriptor is closed under the feet of the main thread (the kernel
    // closes them all, detaching the programs).
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(code)
    }
}

/// The output, telling the stop watchdog when a write is under way: an end blocked on its
/// output is cut short, a slow one is not.
pub struct Watched<W>(pub W);

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        writing(true);
        let r = self.0.write(buf);
        writing(false);
        r
    }

    /// Passed on whole: a record is one `write_all`, which the writers below count and cut
    /// files by (a binary record may hold newline bytes anywhere).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        writing(true);
        let r = self.0.write_all(buf);
        writing(false);
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        writing(true);
        let r = self.0.flush();
        writing(false);
        r
    }
}
