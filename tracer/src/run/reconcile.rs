//! `--reconcile`: the model compared with `/proc/PID/maps`, differences written as `drift`.

use super::*;
use crate::{applied::Applied, model::normalize::Range};

/// How far the reader may be behind the clock for a comparison to count (two ticks).
const KEEPING_UP_NS: u64 = 100_000_000;

/// Changed ranges kept per process between two rounds before they count as "everything".
const MAX_CHANGED: usize = 256;

/// What `--reconcile` keeps between its rounds.
#[derive(Default)]
pub(super) struct Rounds {
    /// Differences from /proc/PID/maps at the previous round, by process.
    seen: HashMap<u32, Vec<String>>,
    /// The address ranges traced events changed since the previous round, by process.
    changed: HashMap<u32, Changed>,
}

/// Address ranges a process's traced calls changed.
#[derive(Debug, Default, PartialEq)]
enum Changed {
    /// `[start, end)` ranges; once there are more than [`MAX_CHANGED`], sorted, merged, and
    /// coarsened until half as many.
    Ranges(Vec<(u64, u64)>),
    /// The whole map was replaced (exec, resync).
    #[default]
    All,
}

impl Changed {
    fn add(&mut self, start: u64, end: u64) {
        let Changed::Ranges(ranges) = self else {
            return;
        };
        if start >= end {
            return;
        }
        ranges.push((start, end));
        if ranges.len() > MAX_CHANGED {
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
            for &(s, e) in ranges.iter() {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            // Still too many: coarser, each two neighbours and the gap between them as one
            // (what lies between counts as changed, the rest of the map is still compared).
            while merged.len() > MAX_CHANGED / 2 {
                merged = merged
                    .chunks(2)
                    .map(|pair| (pair[0].0, pair[pair.len() - 1].1))
                    .collect();
            }
            *ranges = merged;
        }
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        match self {
            Changed::All => true,
            Changed::Ranges(ranges) => ranges.iter().any(|&(s, e)| s < end && start < e),
        }
    }
}

impl Rounds {
    /// Notes what an applied event changed in its process's map.
    pub(super) fn note(&mut self, ev: &Event, applied: &Applied) {
        match (ev, applied) {
            (Event::Syscall(s), Applied::Syscall { pid, effect }) => {
                let changed = self
                    .changed
                    .entry(*pid)
                    .or_insert_with(|| Changed::Ranges(Vec::new()));
                changed.add(effect.start, effect.end);
                // What the call acted on beyond what it produced: a moved or shrunk mremap's
                // old range (a shrink in place reports only the part kept).
                if let MemCall::Mremap { addr, old_len, .. } = s.mem() {
                    changed.add(addr, addr.saturating_add(old_len));
                }
                if let Some(from) = effect.from {
                    changed.add(from, from.saturating_add(effect.end - effect.start));
                }
            }
            (_, Applied::Exec) => self.replaced(ev.pid()),
            _ => {}
        }
    }

    /// The model of `pid` was replaced as a whole (a resync).
    pub(super) fn replaced(&mut self, pid: u32) {
        self.changed.insert(pid, Changed::All);
    }

    /// The differences of this round that count: seen at the previous round too, in ranges
    /// that no traced call changed in between. A running process changes its map between our
    /// drain and our read, and a call in flight at the read has changed the kernel's map
    /// before its record comes; a loop that maps and unmaps one address makes the same
    /// difference round after round, but never without a traced change between them.
    fn confirmed(&mut self, pid: u32, diff: Vec<(String, u64, u64)>) -> Vec<String> {
        let changed = self.changed.remove(&pid);
        let previous = self
            .seen
            .insert(pid, diff.iter().map(|(d, ..)| d.clone()).collect())
            .unwrap_or_default();
        diff.into_iter()
            .filter(|(d, start, end)| {
                previous.contains(d) && !changed.as_ref().is_some_and(|c| c.overlaps(*start, *end))
            })
            .map(|(d, ..)| d)
            .collect()
    }

    fn forget(&mut self) {
        self.seen.clear();
        self.changed.clear();
    }
}

impl Live {
    pub(super) fn reconcile(&mut self) -> Result<(), RunError> {
        // The model is compared only while the reader keeps up. Behind the process (a loaded
        // machine, a burst), the model is older than the map read now, and every change in
        // between would be a difference. Such a round compares nothing.
        let now = monotonic_ns();
        let behind = now.saturating_sub(self.caught_up_ns) > KEEPING_UP_NS
            || self
                .order
                .oldest()
                .is_some_and(|t| t.saturating_add(KEEPING_UP_NS) < now);
        let Some(rounds) = self.reconcile.as_mut() else {
            return Ok(());
        };
        if behind {
            log::debug!("--reconcile: the reader is behind, nothing compared this round");
            rounds.forget();
            return Ok(());
        }
        // Each memory once: a child sharing its parent's (CLONE_VM) has the parent's model,
        // and the calls of both are noted under the parent.
        let pids: Vec<u32> = self
            .session
            .processes()
            .filter(|p| p.exited_ns.is_none() && self.session.memory_owner(p.pid) == p.pid)
            .map(|p| p.pid)
            .collect();
        rounds.seen.retain(|pid, _| pids.contains(pid));
        rounds.changed.retain(|pid, _| pids.contains(pid));
        for pid in pids {
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            let kernel = normalize::normalize(
                maps.iter()
                    .map(|m| (m.start, m.end, m.perms, m.path.as_deref())),
            );
            let Some(space) = self.session.space_of(pid) else {
                continue;
            };
            let model = normalize::model_ranges(space);
            let diff = normalize::differences(&kernel, &model)
                .map(|(sign, r): (char, &Range)| (format!("{sign} {r}"), r.start, r.end))
                .collect();
            let diff = rounds.confirmed(pid, diff);
            if !diff.is_empty() {
                log::warn!(
                    "model of {pid} differs from /proc/{pid}/maps in {} ranges",
                    diff.len()
                );
                self.sink
                    .drift(monotonic_ns(), pid, &diff)
                    .map_err(RunError::Write)?;
                self.sink.boundary(&self.session).map_err(RunError::Write)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(lines: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
        lines
            .iter()
            .map(|&(d, s, e)| (d.to_string(), s, e))
            .collect()
    }

    #[test]
    fn a_difference_counts_when_seen_twice_with_no_traced_change_between() {
        let mut r = Rounds::default();
        let compat = ("- 10000-18000 rw-p ", 0x10000, 0x18000);
        assert!(r.confirmed(1, diff(&[compat])).is_empty(), "seen once");
        assert_eq!(r.confirmed(1, diff(&[compat])), vec![compat.0.to_string()]);
    }

    #[test]
    fn a_range_remapped_between_rounds_is_never_drift() {
        // A loop that maps, touches and unmaps one address: the read catches it unmapped
        // while the model, a few records behind, has it mapped (`+`: the model's only), at
        // two rounds in a row.
        let mut r = Rounds::default();
        let spin = (
            "+ 7f0000093000-7f00000a6000 rw-p ",
            0x7f00_0009_3000,
            0x7f00_000a_6000,
        );
        let other = ("- 20000-21000 r--p ", 0x20000, 0x21000);
        r.confirmed(7, diff(&[spin, other]));
        let mut c = Changed::Ranges(Vec::new());
        for _ in 0..1000 {
            c.add(0x7f00_0009_3000 + 0x3000, 0x7f00_0009_3000 + 0x13000);
        }
        assert!(matches!(&c, Changed::Ranges(v) if v.len() <= MAX_CHANGED));
        r.changed.insert(7, c);
        assert_eq!(
            r.confirmed(7, diff(&[spin, other])),
            vec![other.0.to_string()],
            "only the untouched range is drift"
        );
    }

    #[test]
    fn too_many_changed_ranges_become_coarser_not_everything() {
        let mut c = Changed::Ranges(Vec::new());
        for i in 0..(4 * MAX_CHANGED as u64) {
            c.add(0x10000 + i * 0x2000, 0x10000 + i * 0x2000 + 0x1000);
        }
        let Changed::Ranges(v) = &c else {
            panic!("ranges kept: {c:?}");
        };
        assert!(v.len() <= MAX_CHANGED);
        // Every changed range still counts as changed...
        let last = 0x10000 + (4 * MAX_CHANGED as u64 - 1) * 0x2000;
        for a in (0x10000..=last).step_by(0x2000) {
            assert!(c.overlaps(a, a + 0x1000), "{a:#x}");
        }
        // ...and the rest of the map is still compared.
        assert!(!c.overlaps(0, 0x10000));
        assert!(!c.overlaps(last + 0x1000, u64::MAX));
    }
}
