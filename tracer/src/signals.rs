//! The signals vmatrace handles (SIGINT, SIGTERM and SIGHUP to stop cleanly, SIGUSR1 for
//! snapshots) are blocked from its first instruction until its handlers are in place, so that
//! one sent early is handled late instead of killing vmatrace by its default action (which
//! left an empty output and, before the guardian, a stopped command).

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
