//! Runs of vmatrace's programs that the kernel skipped.
//!
//! The kernel does not run a BPF program on a CPU where it is already running: a trampoline
//! (fentry/fexit) or raw tracepoint program checks its own per-CPU counter, and the classic
//! tracepoints share one counter for all programs of that kind. Such a program is running
//! there when a run was preempted, which kernels that preempt BPF programs do (7.x's default,
//! lazy preemption; `preempt=full`), or when a program of another tool is running there. A
//! skipped run loses its event as a full ring does: an enter or exit loses the call, the
//! perf-event fault program the fault, a lifecycle program a fork, exec or exit, the commit
//! program a call's place among its racing threads'. The page-fault tracepoint programs'
//! skipped runs are not counted: they are faults the kernel did not handle
//! (`FAULT_TRACEPOINTS`). The kernel counts the skipped runs per program
//! (`recursion_misses` in the program's fdinfo: 5.12 and later for trampoline and raw
//! tracepoint programs, 6.7 and later for classic tracepoints); vmatrace reads them as
//! losses (`missed`) and recovers as after other losses.

use std::{
    cell::Cell,
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use aya::Ebpf;

/// How often the counts are read again, unless asked for fresh: a reading opens one fdinfo
/// file per loaded program (about a millisecond for vmatrace's).
const READ_EVERY: Duration = Duration::from_secs(1);

/// The last reading of the skipped runs, and when it was taken.
#[derive(Default)]
pub(super) struct Misses(Cell<(u64, Option<Instant>)>);

impl Misses {
    /// The skipped runs of `ebpf`'s programs: read again when `fresh` or the last reading is
    /// a second old, else that reading.
    pub(super) fn read(&self, ebpf: &Ebpf, fresh: bool) -> u64 {
        let (n, at) = self.0.get();
        if !fresh && at.is_some_and(|t| t.elapsed() < READ_EVERY) {
            return n;
        }
        let n = recursion_misses(ebpf);
        self.0.set((n, Some(Instant::now())));
        n
    }
}

/// The page-fault tracepoints, whose programs (raw, or BTF with a `_btf` suffix) run with
/// interrupts off: a run is only ever skipped for a fault taken inside a run on the same CPU,
/// by a read of user memory with page faults disabled (the program's own stack read, or an
/// NMI handler's), which the kernel does not handle. Such a fault changes no memory: its
/// skipped run loses nothing.
const FAULT_TRACEPOINTS: [&str; 2] = ["page_fault_user", "page_fault_kernel"];

fn is_fault_tracepoint_program(name: &str) -> bool {
    FAULT_TRACEPOINTS.contains(&name.strip_suffix("_btf").unwrap_or(name))
}

/// The runs of `ebpf`'s programs that the kernel skipped so far and that may have lost an
/// event (0 where the kernel does not count them).
fn recursion_misses(ebpf: &Ebpf) -> u64 {
    ebpf.programs()
        .filter(|(name, _)| !is_fault_tracepoint_program(name))
        .filter_map(|(_, program)| program.fd().ok())
        .filter_map(|fd| {
            let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
            std::fs::read_to_string(path).ok()
        })
        .filter_map(|info| parse(&info))
        .sum()
}

/// The `recursion_misses` line of a program's fdinfo.
fn parse(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_count_and_nothing_where_the_kernel_has_none() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_id:\t6\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t37\nverified_insns:\t275\n";
        assert_eq!(parse(info), Some(37));
        assert_eq!(parse("prog_type:\t26\nprog_id:\t6\n"), None);
    }

    #[test]
    fn the_page_fault_tracepoint_programs_are_told_apart() {
        for name in [
            "page_fault_user",
            "page_fault_kernel_btf",
            "page_fault_user_btf",
        ] {
            assert!(is_fault_tracepoint_program(name), "{name}");
        }
        for name in [
            "page_fault_perf",
            "sys_exit_mmap",
            "fexit_mmap",
            "mmap_lock",
        ] {
            assert!(!is_fault_tracepoint_program(name), "{name}");
        }
    }
}
