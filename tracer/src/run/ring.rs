//! Reading the ring buffer: records decoded in batches, put back in time order, handled.

use super::*;

impl Live {
    /// Reads the records waiting in the ring, until it is empty or `until` has passed, and
    /// handles, in time order, the events that nothing still to come can precede (see
    /// [`crate::order`]). Returns whether the ring was emptied. Records are decoded and
    /// released in batches first and handled after: the ring's consumer position (a cache
    /// line the producing CPU reads for every record it reserves) then moves in a short burst
    /// instead of once per handled event, which keeps that line from bouncing between the
    /// cores all the time.
    pub(super) fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<bool, RunError> {
        loop {
            // Up to DRAIN_BATCH events (a fault batch holds up to 64), so that the reorder
            // sorts little at a time.
            let first = self.order.incoming().len();
            let mut empty = false;
            while self.order.incoming().len() - first < DRAIN_BATCH {
                let Some(item) = ring.next() else {
                    empty = true;
                    break;
                };
                // Stacks come before the records they belong to, and are kept aside for them.
                let stack = match (self.heap.as_mut(), self.stacks.as_mut()) {
                    (Some(heap), _) if EntryStack::is(&item) => EntryStack::decode(&item)
                        .map(|s| s.map(|(h, s)| heap.receive_stack(h.tgid, h.tid, h.ts_ns, s))),
                    (_, Some(stacks)) => stacks
                        .receive_record(&item)
                        .map(|taken| taken.then_some(())),
                    _ => Ok(None),
                };
                match stack {
                    Ok(Some(())) => continue,
                    Ok(None) => {}
                    Err(e) => {
                        self.undecodable += 1;
                        self.undecodable_total += 1;
                        log::warn!("undecodable stack record: {e}");
                        continue;
                    }
                }
                let decoded = event::decode_into(&item, self.order.incoming());
                drop(item);
                match decoded {
                    Ok(Some(Mark::Watermark(watermark))) => {
                        self.order.watermark(watermark);
                        self.settle_refused(watermark.ts_ns);
                    }
                    Ok(Some(Mark::Commit(commit))) => self.order.commit(commit),
                    Ok(None) => {}
                    Err(e) => {
                        self.undecodable += 1;
                        self.undecodable_total += 1;
                        log::warn!("undecodable ring-buffer record: {e}");
                    }
                }
            }
            if empty {
                self.settle_refused(u64::MAX);
                self.order.caught_up(crate::clock::monotonic_ns());
            }
            if let Some(stacks) = self.stacks.as_mut() {
                stacks.attach(&mut self.order.incoming()[first..]);
                // The stacks just unwound, for the kernel to recognise from now on.
                self.probe.set_known_stacks(stacks.take_known_changes());
            }
            if let Some(heap) = self.heap.as_mut() {
                heap.attach_stacks(&mut self.order.incoming()[first..]);
            }
            if let Some(access) = self.access.as_mut() {
                // As soon as read, while the pages are most likely as the faults left them.
                access.resolve(&mut self.order.incoming()[first..]);
            }
            // A segment's size too, while it is most likely still attached.
            for ev in &mut self.order.incoming()[first..] {
                if let Event::Syscall(s) = ev
                    && let MemCall::Shmat { shmid, .. } = s.mem()
                    && s.errno().is_none()
                {
                    s.resolved.shm = shm_of(s.pid, s.ret as u64, shmid);
                }
            }
            self.handle_released(until)?;
            if empty {
                return Ok(true);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(false);
            }
        }
    }

    /// Gives the watermarks owed to CPUs whose batch was refused at a flush that ended before
    /// `read_past` (the stamp of a batch just read, stamped before it was reserved; `MAX` once
    /// the ring is empty): every record those CPUs reserved before the flush is read.
    pub(super) fn settle_refused(&mut self, read_past: u64) {
        let order = &mut self.order;
        self.refused.retain(|r| {
            let due = r.flushed < read_past;
            if due {
                order.watermark(Watermark {
                    lane: r.lane,
                    cpu: r.cpu,
                    ts_ns: r.asked,
                });
            }
            !due
        });
    }

    /// Handles the events the reorder can release now, oldest first; with `until`, only
    /// until then (checked every [`RELEASE_CHUNK`] events): what is left stays held, in order,
    /// for the next call. A flush can release a ring's worth of events at once, whose
    /// handling took seconds without a tick or a look at the stop.
    pub(super) fn handle_released(&mut self, until: Option<Instant>) -> Result<(), RunError> {
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            self.order.release_at_most(RELEASE_CHUNK, &mut batch);
            let n = batch.len();
            for ev in batch.drain(..) {
                self.handle(ev)?;
            }
            self.batch = batch;
            if n < RELEASE_CHUNK || until.is_some_and(|u| Instant::now() >= u) {
                return Ok(());
            }
        }
    }

    /// Reads the ring, has every CPU write the faults it holds (into the room just made), then
    /// reads the ring again: every event up to now is handled, unless `until` passed first
    /// (the reader is behind; the rest waits in the ring).
    pub(super) fn collect(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<bool, RunError> {
        let began = monotonic_ns();
        self.drain(ring, until)?;
        let asked = monotonic_ns();
        let outcome = self.probe.flush_faults();
        let heap = self.heap.is_some().then(|| self.probe.flush_heap());
        let flushed = monotonic_ns();
        // A refused batch was counted lost and emptied: none of that CPU's faults (or
        // allocator events) up to `asked` can still come once what it wrote before the flush
        // is read. A CPU whose allocator batch was busy gives its watermark next time.
        self.refused
            .extend(outcome.refused.into_iter().map(|cpu| Refused {
                lane: Lane::Faults,
                cpu,
                asked,
                flushed,
            }));
        if let Some(heap) = heap {
            self.refused
                .extend(heap.faults_like.refused.into_iter().map(|cpu| Refused {
                    lane: Lane::Heap,
                    cpu,
                    asked,
                    flushed,
                }));
            for cpu in heap.faults_like.gone {
                self.order.forget(Lane::Heap, cpu);
            }
        }
        for cpu in outcome.gone {
            self.order.forget(Lane::Faults, cpu);
        }
        let emptied = self.drain(ring, until)?;
        self.handle_released(until)?;
        if emptied {
            self.caught_up_ns = began;
        }
        Ok(emptied)
    }

    /// At the end, once nothing is traced: collects what the CPUs still hold and handles
    /// every event left (after a collection, every CPU has reported up to the time it began).
    /// With `until` (a stop was asked), what is still in the ring then, and what the reorder
    /// still holds, is counted as unread instead: a reader far behind must not keep a stopped
    /// run going (handling a reorder's worth of held events took seconds).
    pub(super) fn drain_last(
        &mut self,
        ring: &mut RingBuf<MapData>,
        until: Option<Instant>,
    ) -> Result<(), RunError> {
        let mut unread = 0;
        if !self.collect(ring, until)? {
            while let Some(item) = ring.next() {
                unread += event::events_in(&item).unwrap_or(1);
            }
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.order.release_all(&mut batch);
        if self.order.late() > 0 {
            log::warn!(
                "{} syscall records came more than {} s after their commit and were placed where they came: the model may be wrong around them",
                self.order.late(),
                crate::order::HOLD_CAP_NS / 1_000_000_000
            );
        }
        let mut events = batch.drain(..);
        for (i, ev) in events.by_ref().enumerate() {
            if i % 256 == 0 && until.is_some_and(|u| Instant::now() >= u) {
                unread += 1;
                break;
            }
            self.handle(ev)?;
        }
        unread += events.count() as u64;
        self.batch = batch;
        self.unread += unread;
        self.unread_total += unread;
        Ok(())
    }
}
