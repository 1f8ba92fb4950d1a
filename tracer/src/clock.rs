//! The clock the kernel side stamps events with (`bpf_ktime_get_ns` = `CLOCK_MONOTONIC`).

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A wall-clock time and the `CLOCK_MONOTONIC` time it goes with, on one boot of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Anchor {
    /// `CLOCK_MONOTONIC` nanoseconds (the clock of every record's `ts_ns`).
    pub ts_ns: u64,
    /// `CLOCK_REALTIME` nanoseconds since the Unix epoch at `ts_ns`.
    pub realtime_ns: u64,
    /// `/proc/sys/kernel/random/boot_id`: `ts_ns` values compare only within one boot.
    pub boot_id: Option<String>,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; the clocks asked for always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The wall-clock time now with the monotonic time now: the wall clock is read between two
/// reads of the monotonic clock, and paired with their middle.
pub fn anchor() -> Anchor {
    let before = monotonic_ns();
    let realtime_ns = clock_ns(libc::CLOCK_REALTIME);
    let after = monotonic_ns();
    Anchor {
        ts_ns: before + (after - before) / 2,
        realtime_ns,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_anchor_pairs_the_clocks_of_now() {
        let a = anchor();
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let mono = monotonic_ns();
        // What each clock advanced since the anchor agrees within a millisecond.
        let drift = (wall - a.realtime_ns).abs_diff(mono - a.ts_ns);
        assert!(drift < 1_000_000, "{drift} ns");
        let id = a.boot_id.expect("Linux has a boot id");
        assert_eq!(id.len(), 36, "{id}");
    }
}
