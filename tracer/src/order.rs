//! Puts ring-buffer events back in time order before the model sees them.
//!
//! Faults reach the ring in per-CPU batches (`tracer_common::FaultBatch`), later than the
//! syscalls around them: when a batch fills, or when the daemon has every CPU write its batch
//! before it reads the ring. Allocator events (`--heap`) come in batches of their own
//! (`tracer_common::HeapBatch`), each CPU's a second lane with its own watermarks. Every other
//! record is stamped after it is reserved, so the ring
//! holds those in time order already. Each batch carries its CPU's watermark: all of that
//! CPU's faults up to then are in the ring. An event is released once every CPU's watermark
//! has passed it, since nothing still to be read can be older. (When a full ring refuses a
//! CPU's batch, the daemon gives that CPU's watermark itself: the batch was counted lost.)
//!
//! Pure: no clock, no I/O.

use std::collections::BinaryHeap;

use crate::event::{Event, Lane, Watermark};

/// Something with a time stamp.
pub trait Timed {
    /// Nanoseconds, `CLOCK_MONOTONIC`.
    fn ts_ns(&self) -> u64;
}

impl Timed for Event {
    fn ts_ns(&self) -> u64 {
        Event::ts_ns(self)
    }
}

/// An event held back, ordered by time, then by arrival (so that events with the same time
/// keep their ring order), earliest first out of a [`BinaryHeap`]. The event itself waits in
/// a slot of [`Reorder::slots`]: the heap moves only these 24 bytes as it sifts, not events
/// of a few hundred bytes (moving those was a sixth of the daemon's time on syscall churn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    ts_ns: u64,
    seq: u64,
    slot: u32,
}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: the max-heap gives the earliest first.
        (other.ts_ns, other.seq).cmp(&(self.ts_ns, self.seq))
    }
}

/// Holds events until no event still to come can precede them.
#[derive(Debug)]
pub struct Reorder<T> {
    /// Per lane (faults, allocator events), the latest watermark of each CPU that sends them
    /// (index: CPU number); `None` until the first. Empty when nothing is batched in that
    /// lane: events are then released as they come.
    watermarks: [Vec<Option<u64>>; 2],
    /// Events just decoded, in ring order, not yet sorted in.
    incoming: Vec<T>,
    /// Events waiting for the watermarks. A heap, so that each release costs what it
    /// releases: when a reader far behind holds a ring's worth of events (an idle CPU's
    /// watermark comes only with the flush written at the ring's end), sorting them all at
    /// each release took most of the reader's time.
    held: BinaryHeap<Held>,
    /// The events of `held`, by slot; `free` lists the empty slots.
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    /// Arrival counter, for stable order among equal times.
    seq: u64,
}

/// The watermarks of `cpus`: CPUs not listed do not hold anything back.
fn lane_of(cpus: &[u32]) -> Vec<Option<u64>> {
    let len = cpus.iter().max().map_or(0, |&c| c as usize + 1);
    (0..len)
        .map(|i| (!cpus.contains(&(i as u32))).then_some(u64::MAX))
        .collect()
}

impl<T: Timed> Reorder<T> {
    /// Waits for the fault watermarks of `cpus` before releasing an event.
    pub fn new(cpus: &[u32]) -> Self {
        Self {
            watermarks: [lane_of(cpus), Vec::new()],
            incoming: Vec::new(),
            held: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            seq: 0,
        }
    }

    /// Also waits for the allocator-event watermarks of `cpus`.
    pub fn wait_for_heap(&mut self, cpus: &[u32]) {
        self.watermarks[Lane::Heap as usize] = lane_of(cpus);
    }

    /// Releases every event as soon as it comes (nothing is batched).
    pub fn in_order() -> Self {
        Self::new(&[])
    }

    /// Where new events go, in ring order (they may be changed there until the next release).
    pub fn incoming(&mut self) -> &mut Vec<T> {
        &mut self.incoming
    }

    /// Records a CPU's watermark. Watermarks of CPUs not waited for are ignored.
    pub fn watermark(&mut self, w: Watermark) {
        if let Some(slot) = self.watermarks[w.lane as usize].get_mut(w.cpu as usize)
            && *slot != Some(u64::MAX)
        {
            *slot = Some(slot.map_or(w.ts_ns, |old| old.max(w.ts_ns)));
        }
    }

    /// Stops waiting for `cpu` in `lane` (it can no longer write its batches).
    pub fn forget(&mut self, lane: Lane, cpu: u32) {
        if let Some(slot) = self.watermarks[lane as usize].get_mut(cpu as usize) {
            *slot = Some(u64::MAX);
        }
    }

    /// The time up to which every CPU has reported (`u64::MAX` when none is waited for).
    fn reported(&self) -> u64 {
        self.watermarks
            .iter()
            .flatten()
            .map(|w| w.unwrap_or(0))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Whether every CPU has reported up to `ts_ns`.
    #[cfg(test)]
    fn covers(&self, ts_ns: u64) -> bool {
        self.reported() >= ts_ns
    }

    /// The time of the oldest event held back (incoming ones included), if any.
    pub fn oldest(&self) -> Option<u64> {
        let incoming = self.incoming.iter().map(Timed::ts_ns).min();
        let held = self.held.peek().map(|h| h.ts_ns);
        incoming.into_iter().chain(held).min()
    }

    /// Number of events held back (incoming ones included).
    pub fn held(&self) -> usize {
        self.incoming.len() + self.held.len()
    }

    /// Moves into `out`, oldest first, every event nothing still to come can precede: those
    /// no newer than every CPU's watermark.
    pub fn release(&mut self, out: &mut Vec<T>) {
        self.release_upto(self.reported(), out);
    }

    /// Like [`Reorder::release`], but at most `max` events (the oldest): the rest stay held.
    pub fn release_at_most(&mut self, max: usize, out: &mut Vec<T>) {
        self.release_upto_at_most(self.reported(), max, out);
    }

    /// Moves every event into `out`, oldest first (at the end of a run).
    pub fn release_all(&mut self, out: &mut Vec<T>) {
        self.release_upto(u64::MAX, out);
    }

    fn release_upto(&mut self, upto: u64, out: &mut Vec<T>) {
        self.release_upto_at_most(upto, usize::MAX, out);
    }

    fn release_upto_at_most(&mut self, upto: u64, max: usize, out: &mut Vec<T>) {
        if self.watermarks.iter().all(Vec::is_empty) {
            // Nothing is batched: the ring's order is the time order.
            let n = self.incoming.len().min(max);
            out.extend(self.incoming.drain(..n));
            return;
        }
        for event in self.incoming.drain(..) {
            self.seq += 1;
            let ts_ns = event.ts_ns();
            let slot = match self.free.pop() {
                Some(slot) => {
                    self.slots[slot as usize] = Some(event);
                    slot
                }
                None => {
                    self.slots.push(Some(event));
                    (self.slots.len() - 1) as u32
                }
            };
            self.held.push(Held {
                ts_ns,
                seq: self.seq,
                slot,
            });
        }
        let mut released = 0;
        while let Some(&top) = self.held.peek() {
            if top.ts_ns > upto || released == max {
                break;
            }
            self.held.pop();
            if let Some(event) = self.slots[top.slot as usize].take() {
                out.push(event);
            }
            self.free.push(top.slot);
            released += 1;
        }
        if self.held.is_empty() {
            // Nothing held: the slots go (a burst's worth of them would otherwise stay).
            self.slots.clear();
            self.free.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (time, what) pairs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct E(u64, u32);
    impl Timed for E {
        fn ts_ns(&self) -> u64 {
            self.0
        }
    }

    fn wm(cpu: u32, ts_ns: u64) -> Watermark {
        Watermark {
            lane: Lane::Faults,
            cpu,
            ts_ns,
        }
    }

    #[test]
    fn holds_events_until_every_cpu_has_passed_them() {
        let mut r = Reorder::new(&[0, 1]);
        r.incoming().extend([E(10, 1), E(30, 2)]);
        let mut out = Vec::new();
        r.release(&mut out);
        assert!(out.is_empty(), "no watermark yet");
        r.watermark(wm(0, 40));
        r.release(&mut out);
        assert!(out.is_empty(), "CPU 1 has not reported");
        // CPU 1's batch: a fault older than the syscall already read.
        r.incoming().extend([E(20, 3)]);
        r.watermark(wm(1, 25));
        r.release(&mut out);
        assert_eq!(out, [E(10, 1), E(20, 3)]);
        assert_eq!(r.held(), 1);
        assert!(r.covers(25) && !r.covers(26));
        out.clear();
        r.release_all(&mut out);
        assert_eq!(out, [E(30, 2)]);
    }

    #[test]
    fn a_bounded_release_gives_the_oldest_and_keeps_the_rest_in_order() {
        let mut r = Reorder::new(&[0]);
        r.incoming()
            .extend([E(30, 1), E(10, 2), E(20, 3), E(50, 4)]);
        r.watermark(wm(0, 40));
        let mut out = Vec::new();
        r.release_at_most(2, &mut out);
        assert_eq!(out, [E(10, 2), E(20, 3)]);
        r.incoming().extend([E(25, 5)]);
        out.clear();
        r.release_at_most(2, &mut out);
        assert_eq!(
            out,
            [E(25, 5), E(30, 1)],
            "a later arrival still in time order"
        );
        out.clear();
        r.release_at_most(2, &mut out);
        assert!(out.is_empty(), "50 is past the watermark");
        // Nothing batched: ring order, at most `max` at a time.
        let mut plain = Reorder::new(&[]);
        plain.incoming().extend([E(1, 1), E(2, 2), E(3, 3)]);
        out.clear();
        plain.release_at_most(2, &mut out);
        assert_eq!(out, [E(1, 1), E(2, 2)]);
        out.clear();
        plain.release_at_most(2, &mut out);
        assert_eq!(out, [E(3, 3)]);
    }

    #[test]
    fn a_forgotten_cpu_holds_nothing_back() {
        let mut r = Reorder::new(&[0, 1]);
        r.incoming().extend([E(10, 1), E(70, 2)]);
        r.watermark(wm(0, 1_000));
        let mut out = Vec::new();
        r.release(&mut out);
        assert!(out.is_empty(), "CPU 1 has not reported");
        r.forget(Lane::Faults, 1);
        r.release(&mut out);
        assert_eq!(out, [E(10, 1), E(70, 2)]);
    }

    #[test]
    fn watermarks_never_go_back_and_unknown_cpus_are_ignored() {
        let mut r: Reorder<E> = Reorder::new(&[0, 2]);
        r.watermark(wm(0, 50));
        r.watermark(wm(0, 40));
        r.watermark(wm(2, 60));
        r.watermark(wm(7, 10));
        assert!(r.covers(50) && !r.covers(51));
        // CPU 1 is not waited for.
        r.watermark(wm(1, 0));
        assert!(r.covers(50));
    }

    #[test]
    fn without_batches_events_pass_in_ring_order() {
        let mut r = Reorder::in_order();
        r.incoming().extend([E(30, 1), E(10, 2)]);
        let mut out = Vec::new();
        r.release(&mut out);
        assert_eq!(out, [E(30, 1), E(10, 2)]);
    }

    #[test]
    fn allocator_batches_are_a_lane_of_their_own() {
        let mut r = Reorder::new(&[0]);
        r.wait_for_heap(&[0]);
        r.incoming().extend([E(10, 1), E(30, 2)]);
        r.watermark(wm(0, 40));
        let mut out = Vec::new();
        r.release(&mut out);
        assert!(out.is_empty(), "the heap lane of CPU 0 has not reported");
        r.incoming().push(E(20, 3));
        r.watermark(Watermark {
            lane: Lane::Heap,
            cpu: 0,
            ts_ns: 35,
        });
        r.release(&mut out);
        assert_eq!(out, [E(10, 1), E(20, 3), E(30, 2)]);
        // Only the heap lane batched (the perf-event fault backend): still reordered.
        let mut r = Reorder::in_order();
        r.wait_for_heap(&[0]);
        r.incoming().extend([E(30, 1), E(10, 2)]);
        r.watermark(Watermark {
            lane: Lane::Heap,
            cpu: 0,
            ts_ns: 35,
        });
        out.clear();
        r.release(&mut out);
        assert_eq!(out, [E(10, 2), E(30, 1)]);
        r.forget(Lane::Heap, 0);
    }

    proptest! {
        /// Two CPUs each fault in time order and write their faults in batches; syscalls go
        /// to the ring directly; a full ring sometimes refuses a batch. Whatever the
        /// interleaving, the output is every event not refused, in time order, and nothing
        /// is released early.
        #[test]
        fn output_is_complete_and_in_time_order(
            steps in prop::collection::vec((0u8..5, 1u64..5), 1..200),
            batch_len in 1usize..6,
        ) {
            let mut r = Reorder::new(&[0, 1]);
            let mut now = 0u64;
            let mut pending: [Vec<E>; 2] = [Vec::new(), Vec::new()];
            let mut out = Vec::new();
            let mut all = Vec::new();
            let mut id = 0u32;
            let flush = |r: &mut Reorder<E>, pending: &mut Vec<E>, cpu: u32, now: u64| {
                r.incoming().append(pending);
                r.watermark(wm(cpu, now));
            };
            for (what, dt) in steps {
                now += dt;
                id += 1;
                match what {
                    0 | 1 => {
                        let cpu = usize::from(what);
                        pending[cpu].push(E(now, id));
                        all.push(E(now, id));
                        if pending[cpu].len() >= batch_len {
                            flush(&mut r, &mut pending[cpu], cpu as u32, now);
                        }
                    }
                    2 => {
                        r.incoming().push(E(now, id));
                        all.push(E(now, id));
                    }
                    3 => {
                        flush(&mut r, &mut pending[0], 0, now);
                        flush(&mut r, &mut pending[1], 1, now);
                    }
                    _ => {
                        // A full ring refuses CPU 0's batch: its faults are lost (counted),
                        // and the daemon gives CPU 0's watermark itself.
                        all.retain(|e| !pending[0].contains(e));
                        pending[0].clear();
                        r.watermark(wm(0, now));
                    }
                }
                let before = out.len();
                r.release(&mut out);
                // Nothing released may be newer than what both CPUs have reported.
                for e in &out[before..] {
                    prop_assert!(r.covers(e.0));
                }
            }
            flush(&mut r, &mut pending[0], 0, now);
            flush(&mut r, &mut pending[1], 1, now);
            r.release_all(&mut out);
            let mut expected = all.clone();
            expected.sort_by_key(|e| e.0);
            prop_assert_eq!(out, expected);
        }
    }
}
