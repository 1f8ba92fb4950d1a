//! The kernel side in-process, as aya's integration tests do: load the probe, trace this test
//! process itself, make known calls, read the ring and decode it. No daemon, no launched
//! command: what the programs wrote, checked against what the calls returned.

mod common;

use std::{ptr::null_mut, sync::mpsc, thread};

use common::privileged;
use tracer::{
    call::MemCall,
    event::{self, Commit, Event, Mark},
    probe::{ChangeOrder, Probe, ProbeOptions},
};

const PAGE: usize = 4096;

#[test]
fn the_programs_report_this_processs_own_calls_faults_and_commits() {
    if !privileged("the_programs_report_this_processs_own_calls_faults_and_commits") {
        return;
    }
    let mut probe = Probe::load(ProbeOptions::default()).expect("the probe loads");
    let me = std::process::id();
    probe
        .add_target(me, false, false)
        .expect("this process is traced");
    // A second thread alive throughout: the calls of a process that may race get commits.
    let (done, wait) = mpsc::channel::<()>();
    let other = thread::spawn(move || wait.recv());
    let len = 4 * PAGE;
    // SAFETY: a fresh anonymous mapping, written within its length, then unmapped.
    let addr = unsafe {
        let p = libc::mmap(
            null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        for i in 0..4 {
            std::ptr::write_volatile((p as *mut u8).add(i * PAGE), 1);
        }
        assert_eq!(libc::munmap(p, len), 0);
        p as u64
    };
    let _ = done.send(());
    let _ = other.join();
    probe.flush_faults();
    let mut ring = probe.take_ring().expect("the ring");
    let (mut events, mut commits): (Vec<Event>, Vec<Commit>) = (Vec::new(), Vec::new());
    while let Some(item) = ring.next() {
        match event::decode_into(&item, &mut events).expect("every record decodes") {
            Some(Mark::Commit(c)) => commits.push(c),
            Some(Mark::Watermark(_)) | None => {}
        }
    }
    let mine = |e: &&Event| e.pid() == me;
    let calls: Vec<_> = events
        .iter()
        .filter(mine)
        .filter_map(|e| match e {
            Event::Syscall(s) => Some((s, s.mem())),
            _ => None,
        })
        .collect();
    let mmap = calls
        .iter()
        .find(|(s, m)| {
            matches!(m, MemCall::Mmap { len: l, .. } if *l == len as u64) && s.ret as u64 == addr
        })
        .unwrap_or_else(|| panic!("the mmap that returned {addr:#x}: {calls:?}"));
    let munmap = calls
        .iter()
        .find(|(_, m)| matches!(m, MemCall::Munmap { addr: a, len: l } if *a == addr && *l == len as u64))
        .unwrap_or_else(|| panic!("the munmap of {addr:#x}: {calls:?}"));
    // The four first touches, between the two calls.
    let faults: Vec<u64> = events
        .iter()
        .filter(mine)
        .filter_map(|e| match e {
            Event::Fault(f) if (addr..addr + len as u64).contains(&f.address) => Some(f.address),
            _ => None,
        })
        .collect();
    assert_eq!(faults.len(), 4, "{faults:x?}");
    // Each call committed where it held the mmap lock (or, without the lock's tracepoint, the
    // munmap at its entry), inside the call, and its commit record says so.
    let order = probe.change_order();
    for (s, _) in [mmap, munmap] {
        let wanted = order == ChangeOrder::Lock || std::ptr::eq(*s, munmap.0);
        let Some(at) = s.commit_ts_ns else {
            assert!(!wanted, "{order:?}: no commit for {s:?}");
            continue;
        };
        assert!(s.enter_ts_ns <= at && at <= s.ts_ns, "{s:?}");
        assert!(
            commits
                .iter()
                .any(|c| c.tid == s.tid && c.ts_ns == at && c.pid == me),
            "the commit record of {s:?}: {commits:?}"
        );
    }
}
