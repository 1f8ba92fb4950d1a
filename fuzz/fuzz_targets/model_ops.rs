//! Arbitrary sequences of successful syscalls and faults keep the model consistent: VMAs
//! sorted, non-overlapping, non-empty; the history replays to the present.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracer::model::{AddressSpace, Backing, PAGE_SIZE, Perms};

const BASE: u64 = 0x1000_0000;

fuzz_target!(|data: &[u8]| {
    let mut m = AddressSpace::seeded(Vec::new(), Some(BASE + 512 * PAGE_SIZE), 0);
    for (i, op) in data.chunks_exact(4).enumerate() {
        let ts = i as u64 + 1;
        let a = BASE + u64::from(op[1]) * PAGE_SIZE;
        let len = (u64::from(op[2] % 16) + 1) * PAGE_SIZE;
        let prot = u64::from(op[3] % 8);
        match op[0] % 9 {
            0 => {
                m.mmap(
                    ts,
                    a,
                    len,
                    Perms::from_prot(prot, op[3] & 8 != 0),
                    Backing::Anonymous,
                    0,
                );
            }
            1 => {
                m.munmap(ts, a, len);
            }
            2 => {
                m.mprotect(ts, a, len, prot);
            }
            3 => {
                m.madvise(ts, a, len, 4);
            }
            4 => {
                m.fault(
                    ts,
                    a + u64::from(op[3]) * 8,
                    Some(op[3] & 1 == 0),
                    op[3] & 2 != 0,
                );
            }
            5 => {
                m.brk(ts, BASE + 512 * PAGE_SIZE + u64::from(op[1]) * 100);
            }
            6 => {
                let to = BASE + u64::from(op[3]) * PAGE_SIZE;
                m.mremap(
                    ts,
                    a,
                    len,
                    len + PAGE_SIZE * u64::from(op[2] % 3),
                    1 | 2,
                    to,
                );
            }
            7 => {
                m.mremap(ts, a, len, len / 2, 0, a);
            }
            _ => {
                m.shmat(ts, a, len, u64::from(op[3]), u64::from(op[2]), false, false);
            }
        }
        let v: Vec<_> = m.vmas().cloned().collect();
        for w in v.windows(2) {
            assert!(w[0].end <= w[1].start, "overlap");
        }
        assert!(v.iter().all(|x| x.start < x.end), "empty VMA");
    }
    let now: Vec<_> = m.vmas().cloned().collect();
    let replayed: Vec<_> = m.timeline().state_at(u64::MAX).into_values().collect();
    assert_eq!(now, replayed);
});
