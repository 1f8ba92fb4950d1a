//! The daemon's memory for a target with 1,000,000 touched pages and 10,000 VMAs: builds that
//! model and prints the process's resident-set growth (target: at most 64 MiB).

use tracer::{
    model::{PAGE_SIZE, Perms},
    session::{Seed, Session},
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let before = rss_kib();
    let mut s = Session::default();
    s.add(1, Seed::default(), 0, None);
    const VMAS: u64 = 10_000;
    const PAGES: u64 = 1_000_000;
    let per_vma = PAGES / VMAS;
    let base = 0x7f00_0000_0000u64;
    let mut ts = 1;
    for v in 0..VMAS {
        let start = base + v * (per_vma + 1) * PAGE_SIZE;
        let ev = tracer::event::Event::Syscall(tracer::event::SyscallRecord {
            ts_ns: ts,
            enter_ts_ns: ts,
            pid: 1,
            tid: 1,
            call: tracer_common::Syscall::Mmap,
            args: [0, per_vma * PAGE_SIZE, 3, 0x22, u64::MAX, 0],
            ret: start as i64,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Default::default(),
        });
        s.apply(&ev);
        for p in 0..per_vma {
            ts += 1;
            s.apply(&tracer::event::Event::Fault(tracer::event::FaultRecord {
                ts_ns: ts,
                pid: 1,
                tid: 1,
                address: start + p * PAGE_SIZE,
                ip: 0,
                error_code: Some(tracer_common::PF_WRITE | tracer_common::PF_USER),
                write_from_page: None,
                stack_id: None,
            }));
        }
    }
    let _ = Perms::default();
    let p = s
        .get(1)
        .map(|p| (p.space.vma_count(), p.space.pages().len()));
    let after = rss_kib();
    let grown = after.saturating_sub(before);
    println!(
        "model_memory: {:?} (VMAs, touched pages): RSS grew by {} KiB ({:.1} MiB); target 64 MiB",
        p,
        grown,
        grown as f64 / 1024.0
    );
}
