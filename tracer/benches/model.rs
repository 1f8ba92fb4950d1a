//! Userspace cost: events per second that the session and model apply (replay speed), and
//! model operations at 100, 10,000 and 60,000 VMAs (they must stay logarithmic).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    event::{Event, FaultRecord, SyscallRecord},
    model::{AddressSpace, Backing, PAGE_SIZE, Perms},
    session::{Seed, Session},
};
use tracer_common::{PF_USER, PF_WRITE, Syscall};

const BASE: u64 = 0x7f00_0000_0000;

fn syscall(ts: u64, call: Syscall, args: [u64; 6], ret: i64) -> Event {
    Event::Syscall(SyscallRecord::at(ts, 1, 1, call, args, ret))
}

/// A recorded-trace-like stream: mmap 64 pages, touch each, munmap; repeated.
fn stream(events: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(events);
    let mut ts = 1;
    let mut round = 0u64;
    while out.len() < events {
        let addr = BASE + (round % 1024) * 64 * PAGE_SIZE;
        out.push(syscall(
            ts,
            Syscall::Mmap,
            [0, 64 * PAGE_SIZE, 3, 0x22, u64::MAX, 0],
            addr as i64,
        ));
        for p in 0..64 {
            ts += 1;
            out.push(Event::Fault(FaultRecord {
                ts_ns: ts,
                pid: 1,
                tid: 1,
                address: addr + p * PAGE_SIZE,
                ip: 0,
                error_code: Some(PF_WRITE | PF_USER),
                write_from_page: None,
                stack_id: None,
            }));
        }
        ts += 1;
        out.push(syscall(
            ts,
            Syscall::Munmap,
            [addr, 64 * PAGE_SIZE, 0, 0, 0, 0],
            0,
        ));
        round += 1;
    }
    out.truncate(events);
    out
}

fn replay(c: &mut Criterion) {
    let events = stream(200_000);
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(20);
    g.bench_function("apply_200k_events", |b| {
        b.iter(|| {
            let mut s = Session::default();
            s.add(1, Seed::default(), 0, None);
            for e in &events {
                black_box(s.apply(e));
            }
        })
    });
    g.finish();
}

/// An address space with `n` separate VMAs (gaps keep them from merging).
fn space(n: u64) -> AddressSpace {
    let rw = Perms::from_prot(3, false);
    let mut m = AddressSpace::default();
    for i in 0..n {
        m.mmap(
            i + 1,
            BASE + i * 4 * PAGE_SIZE,
            2 * PAGE_SIZE,
            rw,
            Backing::Anonymous,
            0,
        );
    }
    m
}

fn scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("model_ops");
    for n in [100u64, 10_000, 60_000] {
        let mut m = space(n);
        let mid = BASE + (n / 2) * 4 * PAGE_SIZE;
        let rw = Perms::from_prot(3, false);
        g.bench_with_input(BenchmarkId::new("mmap_munmap", n), &n, |b, _| {
            b.iter(|| {
                m.mmap(1, mid + 2 * PAGE_SIZE, PAGE_SIZE, rw, Backing::Anonymous, 0);
                m.munmap(2, mid + 2 * PAGE_SIZE, PAGE_SIZE);
            })
        });
        g.bench_with_input(
            BenchmarkId::new("mprotect_split_and_merge", n),
            &n,
            |b, _| {
                b.iter(|| {
                    m.mprotect(3, mid, PAGE_SIZE, 1);
                    m.mprotect(4, mid, PAGE_SIZE, 3);
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("fault", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % n;
                black_box(m.fault(5, BASE + i * 4 * PAGE_SIZE, Some(true), false));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, replay, scaling);
criterion_main!(benches);
