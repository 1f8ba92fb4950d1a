//! Stacks the kernel recognises without walking them (`KNOWN_STACKS`). Once the daemon has
//! unwound a stack from the registers and the stack words its walk read, the same
//! registers and the same words in the same mappings give the same frames: it hands those
//! to the programs, which then compare them with one read of the stack and send the stack's
//! id instead of the walk and the copy (`EventKind::KnownStack`). A call site in a loop is
//! copied and unwound once.
//!
//! What is registered is exactly what the daemon's own repeat check (`Collector`'s memo)
//! compares, less what the kernel cannot see cheaply: only walks whose frames are the DWARF
//! walk's alone (the frame-pointer walk added nothing), of processes whose Python frames
//! are not walked. A process's entries go when its mappings are read again (a library was
//! mapped), at its exec and at its exit.

use std::collections::{HashMap, HashSet};

use tracer_common::{KNOWN_READS_MAX, KNOWN_SPAN_MAX, KNOWN_STACKS_MAX, KnownStack, KnownStackKey};

/// The entry for a walk from `regs` of `pid` that read `reads` (offset from sp, word) and
/// gave stack `id`; `None` when the kernel could not compare it (too many words, or too far
/// from sp).
pub fn entry(
    pid: u32,
    regs: [u64; 4],
    reads: &[(u64, u64)],
    id: u64,
) -> Option<(KnownStackKey, KnownStack)> {
    let mut words: Vec<(u64, u64)> = reads.to_vec();
    words.sort_unstable();
    words.dedup();
    if words.is_empty() || words.len() > KNOWN_READS_MAX {
        return None;
    }
    // The same offset read twice with two values cannot be.
    if words.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let span = words.last()?.0.checked_add(8)?;
    if span > KNOWN_SPAN_MAX as u64 {
        return None;
    }
    let mut known = KnownStack {
        id,
        reads: words.len() as u32,
        span: span as u32,
        offsets: [0; KNOWN_READS_MAX],
        words: [0; KNOWN_READS_MAX],
    };
    for (i, (off, word)) in words.into_iter().enumerate() {
        known.offsets[i] = off as u32;
        known.words[i] = word;
    }
    Some((
        KnownStackKey {
            tgid: pid,
            _pad: 0,
            regs,
        },
        known,
    ))
}

/// The generation of a process's mappings in the unwinder (`Unwinder::generation`).
type Generation = Option<(usize, usize)>;

/// The entries handed to the programs, by process, and the changes still to hand.
#[derive(Default)]
pub struct Registry {
    /// Each process's entries, and the generation of its mappings they were unwound in.
    by_pid: HashMap<u32, (Generation, HashSet<KnownStackKey>)>,
    /// Entries to add (`Some`) or remove (`None`).
    changes: Vec<(KnownStackKey, Option<KnownStack>)>,
    /// Stacks the kernel recognised.
    pub hits: u64,
}

impl Registry {
    /// Adds an entry unwound in the mappings of `generation`, first dropping the process's
    /// entries from other mappings.
    pub fn add(&mut self, generation: Generation, key: KnownStackKey, known: KnownStack) {
        let pid = key.tgid;
        if self.by_pid.get(&pid).is_some_and(|(g, _)| *g != generation) {
            self.forget(pid);
        }
        let (_, keys) = self
            .by_pid
            .entry(pid)
            .or_insert_with(|| (generation, HashSet::new()));
        // (The same walk again: the memo also compares the frame-pointer walk, which the
        // kernel's comparison leaves out, and may have missed.)
        if keys.len() >= KNOWN_STACKS_MAX as usize || !keys.insert(key) {
            return;
        }
        self.changes.push((key, Some(known)));
    }

    /// Removes a process's entries (its mappings changed, it exec'd or exited).
    pub fn forget(&mut self, pid: u32) {
        if let Some((_, keys)) = self.by_pid.remove(&pid) {
            self.changes.extend(keys.into_iter().map(|k| (k, None)));
        }
    }

    /// Whether `pid`'s entries were unwound in other mappings than `generation`'s.
    pub fn stale(&self, pid: u32, generation: Generation) -> bool {
        self.by_pid.get(&pid).is_some_and(|(g, _)| *g != generation)
    }

    /// The changes since last asked, for the programs' map.
    pub fn take_changes(&mut self) -> Vec<(KnownStackKey, Option<KnownStack>)> {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_holds_each_word_once_in_offset_order() {
        let (key, known) =
            entry(7, [1, 2, 3, 0], &[(24, 0xb), (8, 0xa), (24, 0xb)], 5).expect("an entry");
        assert_eq!((key.tgid, key.regs), (7, [1, 2, 3, 0]));
        assert_eq!((known.id, known.reads, known.span), (5, 2, 32));
        assert_eq!(&known.offsets[..2], &[8, 24]);
        assert_eq!(&known.words[..2], &[0xa, 0xb]);
    }

    #[test]
    fn walks_the_kernel_cannot_compare_get_no_entry() {
        assert!(entry(1, [0; 4], &[], 1).is_none(), "no word read");
        let far = (KNOWN_SPAN_MAX as u64 - 7, 1);
        assert!(entry(1, [0; 4], &[far], 1).is_none(), "past the span");
        let edge = (KNOWN_SPAN_MAX as u64 - 8, 1);
        assert!(
            entry(1, [0; 4], &[edge], 1).is_some(),
            "the span's last word"
        );
        let many: Vec<_> = (0..=KNOWN_READS_MAX as u64).map(|i| (8 * i, i)).collect();
        assert!(entry(1, [0; 4], &many, 1).is_none(), "too many words");
        assert!(entry(1, [0; 4], &many[1..], 1).is_some(), "as many as fit");
        assert!(
            entry(1, [0; 4], &[(8, 1), (8, 2)], 1).is_none(),
            "two values"
        );
    }

    #[test]
    fn new_mappings_exec_and_exit_take_a_process_entries_away() {
        let mut r = Registry::default();
        let (k1, v1) = entry(7, [1; 4], &[(0, 1)], 1).expect("entry");
        let (k2, v2) = entry(7, [2; 4], &[(0, 1)], 2).expect("entry");
        let (k3, v3) = entry(8, [3; 4], &[(0, 1)], 3).expect("entry");
        r.add(Some((1, 1)), k1, v1);
        r.add(Some((1, 1)), k2, v2);
        r.add(Some((1, 1)), k3, v3);
        assert_eq!(r.take_changes().len(), 3);
        assert!(!r.stale(7, Some((1, 1))));
        assert!(r.stale(7, Some((2, 1))));
        // Unwound in other mappings: the process's old entries go first.
        let (k4, v4) = entry(7, [4; 4], &[(0, 1)], 4).expect("entry");
        r.add(Some((2, 1)), k4, v4);
        let changes: Vec<_> = r
            .take_changes()
            .iter()
            .map(|(k, v)| (k.regs[0], v.map(|v| v.id)))
            .collect();
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[2], (4, Some(4)), "added after the removals");
        let mut removed = changes[..2].to_vec();
        removed.sort();
        assert_eq!(removed, [(1, None), (2, None)]);
        // The same walk again is handed once.
        r.add(Some((2, 1)), k4, v4);
        assert!(r.take_changes().is_empty());
        r.forget(8);
        r.forget(9);
        assert_eq!(
            r.take_changes()
                .iter()
                .map(|(k, v)| (k.tgid, v.is_some()))
                .collect::<Vec<_>>(),
            [(8, false)]
        );
    }
}
