//! Memory the kernel makes resident without a page fault: `mmap` with `MAP_POPULATE` or
//! `MAP_LOCKED`, `madvise(MADV_POPULATE_READ/WRITE)`, `mlock`, `mlock2`, `mlockall`, and every
//! later mapping once `mlockall(MCL_FUTURE)` is in force. The kernel fills these through
//! `get_user_pages`, which no fault event reports, and how much it filled depends on what
//! succeeded (a populate stops at the first failure, `mmap` ignores it). So the daemon reads
//! the range's pages from `/proc/PID/pagemap` when it handles the call and records them in
//! the syscall record (`resident`), which the model (and a replay) applies as first touches.

use tracer_common::Syscall;

use crate::{
    call::{MemCall, linux::*},
    event::SyscallRecord,
    model::{AddressSpace, PAGE_SIZE},
    pagemap,
};

/// The ranges a successful call `s` may have made resident without faults, given the
/// process's model before the call (`space`: for `mlockall` and `MCL_FUTURE`).
pub fn populated_ranges(s: &SyscallRecord, space: Option<&AddressSpace>) -> Vec<(u64, u64)> {
    let future = space.is_some_and(|m| m.lock_future);
    let range = |start: u64, len: u64| vec![(start, start.saturating_add(len))];
    let ret = s.ret as u64;
    match s.mem() {
        MemCall::Mmap { len, flags, .. }
            if future
                || (flags & MAP_POPULATE != 0 && flags & MAP_NONBLOCK == 0)
                || flags & MAP_LOCKED != 0 =>
        {
            range(ret, len)
        }
        MemCall::Madvise {
            addr,
            len,
            advice: MADV_POPULATE_READ | MADV_POPULATE_WRITE,
        } => range(addr, len),
        MemCall::Mlock { addr, len } => range(addr, len),
        MemCall::Mlock2 { addr, len, flags } if flags & MLOCK_ONFAULT == 0 => range(addr, len),
        MemCall::Mlockall { flags } if flags & MCL_CURRENT != 0 && flags & MCL_ONFAULT == 0 => {
            space
                .map(|m| m.vmas().map(|v| (v.start, v.end)).collect())
                .unwrap_or_default()
        }
        // The heap up to the new break, the grown or moved range: what exists now.
        MemCall::Brk { .. } if future => space
            .and_then(AddressSpace::heap)
            .map(|b| vec![(b.start, ret.next_multiple_of(PAGE_SIZE))])
            .unwrap_or_default(),
        MemCall::Mremap { new_len, .. } if future => range(ret, new_len),
        _ => Vec::new(),
    }
}

/// Fills `s.resolved.resident` with the present pages of the ranges `s` populated (left
/// `None` for other calls, and when the process is gone).
pub fn resolve(s: &mut SyscallRecord, space: Option<&AddressSpace>) {
    // A populate or lock that failed partway has populated what came before the failure.
    if s.errno().is_some() && !matches!(s.call, Syscall::Madvise | Syscall::Mlock | Syscall::Mlock2)
    {
        return;
    }
    let ranges = populated_ranges(s, space);
    if ranges.is_empty() {
        return;
    }
    let mut runs = Vec::new();
    for (start, end) in ranges {
        match pagemap::present_runs(s.pid, start, end) {
            Ok(r) => runs.extend(r),
            Err(_) => return,
        }
    }
    s.resolved.resident = Some(runs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(call: Syscall, args: [u64; 6], ret: i64) -> SyscallRecord {
        SyscallRecord {
            ts_ns: 1,
            enter_ts_ns: 0,
            pid: 1,
            tid: 1,
            call,
            args,
            ret,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Default::default(),
        }
    }

    #[test]
    fn which_calls_populate() {
        let mmap = |flags| call(Syscall::Mmap, [0, 8192, 3, flags, 0, 0], 0x10000);
        assert_eq!(populated_ranges(&mmap(0x22), None), vec![]);
        assert_eq!(
            populated_ranges(&mmap(0x22 | MAP_POPULATE), None),
            vec![(0x10000, 0x12000)]
        );
        assert_eq!(
            populated_ranges(&mmap(0x22 | MAP_POPULATE | MAP_NONBLOCK), None),
            vec![],
            "MAP_NONBLOCK turns MAP_POPULATE off"
        );
        assert_eq!(
            populated_ranges(&mmap(0x22 | MAP_LOCKED | MAP_NONBLOCK), None),
            vec![(0x10000, 0x12000)]
        );
        let mut locked = AddressSpace::default();
        locked.lock_future = true;
        assert_eq!(
            populated_ranges(&mmap(0x22), Some(&locked)),
            vec![(0x10000, 0x12000)],
            "after mlockall(MCL_FUTURE)"
        );
        let madv = |advice| call(Syscall::Madvise, [0x20000, 4096, advice, 0, 0, 0], 0);
        assert_eq!(populated_ranges(&madv(4), None), vec![]);
        assert_eq!(
            populated_ranges(&madv(MADV_POPULATE_WRITE), None),
            vec![(0x20000, 0x21000)]
        );
        let mlock2 = |flags| call(Syscall::Mlock2, [0x20000, 4096, flags, 0, 0, 0], 0);
        assert_eq!(populated_ranges(&mlock2(0), None).len(), 1);
        assert_eq!(populated_ranges(&mlock2(MLOCK_ONFAULT), None), vec![]);
    }
}
