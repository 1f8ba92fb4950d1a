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
//! A memory syscall is ordered at its commit where the kernel tells it (see
//! `tracer-ebpf/src/commit.rs`): the point where it held its process's `mmap_lock`, which
//! orders racing changes of one process as the kernel made them. Its record comes at its exit,
//! after events stamped later than its commit: a [`Commit`] read from the ring opens a hold,
//! and nothing from that time on is released until the record arrives (or a later event of
//! its thread, or its process's exit, shows that the record was lost; or [`HOLD_CAP_NS`] have
//! passed without it).
//!
//! Pure: no clock, no I/O.

use std::collections::BinaryHeap;

use crate::event::{Commit, Event, Lane, Watermark};

/// How far past a commit (in the times of the events read since, or of the clock once the
/// ring is read empty) its record is waited for: 10 s, since a thread can be kept off the CPU
/// that long between its commit and its exit on a loaded machine (seen under emulation).
/// A call that populates gigabytes can take longer: its record is then placed as it comes
/// (counted in [`Reorder::late`]).
pub const HOLD_CAP_NS: u64 = 10_000_000_000;

/// Something with a time stamp.
pub trait Timed {
    /// Where it is ordered: nanoseconds, `CLOCK_MONOTONIC`.
    fn ts_ns(&self) -> u64;
    /// Which holds it ends.
    fn ends_hold(&self) -> Ends {
        Ends::Nothing
    }
}

/// What an event ends of the holds opened by commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    Nothing,
    /// The record of this thread's committed syscall.
    Thread(u32),
    /// A later event of this thread (it returned from the syscall: a commit of it older than
    /// this event had its record lost to a full ring).
    Later(u32),
    /// This process is gone: its syscalls in flight will not come.
    Process(u32),
}

impl Timed for Event {
    fn ts_ns(&self) -> u64 {
        self.order_ns()
    }

    fn ends_hold(&self) -> Ends {
        match self {
            Event::Syscall(s) if s.commit_ts_ns.is_some() => Ends::Thread(s.tid),
            Event::Exit { pid, .. } => Ends::Process(*pid),
            // Events of a thread; not those the daemon makes (allocator attach, pymalloc,
            // collapse), whose times are the daemon's.
            Event::Syscall(_)
            | Event::Fault(_)
            | Event::Fork { .. }
            | Event::Exec { .. }
            | Event::Open { .. }
            | Event::HeapRaw(_)
            | Event::Heap(_) => Ends::Later(self.tid()),
            _ => Ends::Nothing,
        }
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
    /// Commits whose syscall's record has not come yet: nothing at or after the oldest is
    /// released.
    holds: Vec<Commit>,
    /// The newest time among the events read, which expires holds.
    newest: u64,
    /// The newest time released.
    released: u64,
    /// Committed syscall records that came after newer events had been released.
    late: u64,
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
            holds: Vec::new(),
            newest: 0,
            released: 0,
            late: 0,
        }
    }

    /// A syscall of `c.tid` committed at `c.ts_ns`: nothing from then on is released before
    /// its record. A thread's earlier hold ends (its record was lost).
    pub fn commit(&mut self, c: Commit) {
        self.holds.retain(|h| h.tid != c.tid);
        self.holds.push(c);
    }

    /// The reader has read everything the ring held at `now_ns`: a record that is not there
    /// [`HOLD_CAP_NS`] after its commit (lost to a full ring, or a call that runs that long)
    /// is no longer waited for, even when no later event comes to show the time.
    pub fn caught_up(&mut self, now_ns: u64) {
        self.newest = self.newest.max(now_ns);
    }

    /// How many committed syscall records came after newer events had been released (waited
    /// for longer than [`HOLD_CAP_NS`]): each was placed when it came.
    pub fn late(&self) -> u64 {
        self.late
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

    /// Stops waiting for the records of the commits seen so far: after lost events (a full
    /// ring, or an exit program the kernel skipped) some may never come, and what they hold
    /// back must be handled before the maps are read again, not on top of them later.
    pub fn end_holds(&mut self) {
        self.holds.clear();
    }

    /// Moves every event into `out`, oldest first (at the end of a run).
    pub fn release_all(&mut self, out: &mut Vec<T>) {
        self.holds.clear();
        self.release_upto(u64::MAX, out);
    }

    fn release_upto(&mut self, upto: u64, out: &mut Vec<T>) {
        self.release_upto_at_most(upto, usize::MAX, out);
    }

    fn release_upto_at_most(&mut self, upto: u64, max: usize, out: &mut Vec<T>) {
        if self.watermarks.iter().all(Vec::is_empty)
            && self.holds.is_empty()
            && self.held.is_empty()
        {
            // Nothing is batched or waited for: the ring's order is the time order.
            let n = self.incoming.len().min(max);
            for event in self.incoming.drain(..n) {
                let ts_ns = event.ts_ns();
                if matches!(event.ends_hold(), Ends::Thread(_)) && ts_ns < self.released {
                    self.late += 1;
                }
                self.released = self.released.max(ts_ns);
                out.push(event);
            }
            return;
        }
        for event in self.incoming.drain(..) {
            self.seq += 1;
            let ts_ns = event.ts_ns();
            self.newest = self.newest.max(ts_ns);
            match event.ends_hold() {
                Ends::Nothing => {}
                Ends::Thread(tid) => {
                    if ts_ns < self.released {
                        self.late += 1;
                    }
                    self.holds.retain(|h| h.tid != tid || h.ts_ns > ts_ns);
                }
                Ends::Process(pid) => self.holds.retain(|h| h.pid != pid),
                Ends::Later(tid) => self.holds.retain(|h| h.tid != tid || h.ts_ns >= ts_ns),
            }
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
        let newest = self.newest;
        self.holds
            .retain(|h| h.ts_ns.saturating_add(HOLD_CAP_NS) >= newest);
        let upto = self
            .holds
            .iter()
            .map(|h| h.ts_ns.saturating_sub(1))
            .fold(upto, u64::min);
        let mut released = 0;
        while let Some(&top) = self.held.peek() {
            if top.ts_ns > upto || released == max {
                break;
            }
            self.released = self.released.max(top.ts_ns);
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

    /// A test event that may end holds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct H(u64, u32, Ends);
    impl Timed for H {
        fn ts_ns(&self) -> u64 {
            self.0
        }
        fn ends_hold(&self) -> Ends {
            self.2
        }
    }

    fn commit(pid: u32, tid: u32, ts_ns: u64) -> Commit {
        Commit { pid, tid, ts_ns }
    }

    #[test]
    fn a_committed_syscall_comes_out_at_its_commit() {
        let mut r = Reorder::in_order();
        let mut out = Vec::new();
        r.incoming().push(H(10, 1, Ends::Nothing));
        r.commit(commit(1, 7, 20));
        r.incoming()
            .extend([H(30, 2, Ends::Nothing), H(40, 3, Ends::Nothing)]);
        r.release(&mut out);
        assert_eq!(out, [H(10, 1, Ends::Nothing)], "held from the commit on");
        // The record, at its commit, ends the hold.
        r.incoming()
            .extend([H(20, 4, Ends::Thread(7)), H(50, 5, Ends::Nothing)]);
        r.release(&mut out);
        let ids: Vec<u32> = out.iter().map(|h| h.1).collect();
        assert_eq!(ids, [1, 4, 2, 3, 5]);
        assert_eq!(r.late(), 0);
        // Nothing held: ring order again.
        out.clear();
        r.incoming()
            .extend([H(70, 6, Ends::Nothing), H(60, 7, Ends::Nothing)]);
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [6, 7]);
    }

    #[test]
    fn a_hold_ends_with_its_process_or_after_the_cap() {
        let mut r = Reorder::in_order();
        let mut out = Vec::new();
        r.commit(commit(1, 7, 20));
        r.commit(commit(2, 8, 25));
        r.incoming().push(H(30, 1, Ends::Nothing));
        r.release(&mut out);
        assert!(out.is_empty());
        // Process 1 exits: its thread's call will not come; process 2's still holds.
        r.incoming().push(H(35, 2, Ends::Process(1)));
        r.release(&mut out);
        assert!(out.is_empty(), "thread 8 still holds from 25");
        // Events a second past the commit: given up, and the record is late when it comes.
        r.incoming().push(H(25 + HOLD_CAP_NS + 1, 3, Ends::Nothing));
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [1, 2, 3]);
        r.incoming().push(H(25, 4, Ends::Thread(8)));
        out.clear();
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [4]);
        assert_eq!(r.late(), 1);
    }

    #[test]
    fn ending_the_holds_releases_what_a_lost_record_held_back() {
        let mut r = Reorder::in_order();
        let mut out = Vec::new();
        r.commit(commit(1, 7, 20));
        r.incoming()
            .extend([H(30, 1, Ends::Nothing), H(40, 2, Ends::Nothing)]);
        r.release(&mut out);
        assert!(out.is_empty(), "held for thread 7's record");
        // Before the maps are read again after losses: its record may never come.
        r.end_holds();
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [1, 2]);
        // Should it come after all, it is placed where it comes, and counted.
        r.incoming().push(H(20, 3, Ends::Thread(7)));
        out.clear();
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [3]);
        assert_eq!(r.late(), 1);
    }

    #[test]
    fn a_later_event_of_the_thread_shows_its_record_was_lost() {
        let mut r = Reorder::in_order();
        let mut out = Vec::new();
        r.commit(commit(1, 7, 20));
        r.incoming()
            .extend([H(15, 1, Ends::Later(7)), H(30, 2, Ends::Later(8))]);
        r.release(&mut out);
        assert_eq!(
            out,
            [H(15, 1, Ends::Later(7))],
            "an earlier event of 7 ends nothing"
        );
        // Thread 7 faults after its call: the call's record is gone.
        r.incoming().push(H(40, 3, Ends::Later(7)));
        r.release(&mut out);
        assert_eq!(out.iter().map(|h| h.1).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_lost_record_is_not_waited_for_once_the_ring_is_read_past_the_cap() {
        let mut r = Reorder::in_order();
        let mut out = Vec::new();
        r.commit(commit(1, 7, 20));
        r.incoming().push(H(30, 1, Ends::Nothing));
        r.caught_up(20 + HOLD_CAP_NS / 2);
        r.release(&mut out);
        assert!(out.is_empty(), "still within the cap");
        r.caught_up(21 + HOLD_CAP_NS);
        r.release(&mut out);
        assert_eq!(out, [H(30, 1, Ends::Nothing)]);
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

        /// Threads make syscalls that commit inside them; their records arrive at their
        /// exits, after other threads' events. The ring holds everything in the order it
        /// was stamped (commits at their commit, records at their exit); the reader takes
        /// it in pieces. The output is every event in commit (else time) order.
        #[test]
        fn committed_records_come_out_in_commit_order(
            calls in prop::collection::vec((0u32..4, 1u64..50, 1u64..50, 0u8..3), 1..100),
            cuts in prop::collection::vec(1usize..8, 1..40),
        ) {
            // What was stamped, when: (time, what); what: Ok(commit) or Err(event).
            let mut stamped: Vec<(u64, Result<Commit, H>)> = Vec::new();
            let mut busy_until = [0u64; 4];
            let mut id = 0;
            for (tid, gap, len, kind) in calls {
                let enter = busy_until[tid as usize] + gap;
                let (commit_at, exit) = (enter + len / 2, enter + len);
                busy_until[tid as usize] = exit;
                id += 1;
                match kind {
                    // A fault-like event: one time.
                    0 => stamped.push((enter, Err(H(enter, id, Ends::Nothing)))),
                    // A call ordered at its exit.
                    1 => stamped.push((exit, Err(H(exit, id, Ends::Nothing)))),
                    // A call with a commit.
                    _ => {
                        stamped.push((commit_at, Ok(commit(1, tid, commit_at))));
                        stamped.push((exit, Err(H(commit_at, id, Ends::Thread(tid)))));
                    }
                }
            }
            stamped.sort_by_key(|(t, what)| (*t, what.is_err()));
            let mut expected: Vec<H> = stamped.iter().filter_map(|(_, w)| w.err()).collect();
            expected.sort_by_key(|h| h.0);
            let mut r = Reorder::in_order();
            let mut out = Vec::new();
            let mut ring = stamped.into_iter().peekable();
            let mut cuts = cuts.into_iter().cycle();
            while ring.peek().is_some() {
                for (_, what) in ring.by_ref().take(cuts.next().unwrap_or(1)) {
                    match what {
                        Ok(c) => r.commit(c),
                        Err(h) => r.incoming().push(h),
                    }
                }
                r.release(&mut out);
            }
            r.release_all(&mut out);
            prop_assert_eq!(r.late(), 0);
            let keys: Vec<u64> = out.iter().map(|h| h.0).collect();
            prop_assert!(keys.is_sorted(), "{:?}", keys);
            let (mut got, mut want) = (out.clone(), expected);
            got.sort_by_key(|h| h.1);
            want.sort_by_key(|h| h.1);
            prop_assert_eq!(got, want);
        }
    }
}
