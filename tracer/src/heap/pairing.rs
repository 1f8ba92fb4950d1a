//! Pairs each allocator function's entry with its return, per thread, into one [`HeapCall`].
//!
//! A thread's entries wait on a stack. The stack pointer each entry will return with pairs it
//! with its return exactly, and tells which waiting entries are dead: a frame whose return
//! stack pointer is at or below a new entry's cannot be a caller of it (the stack grows down),
//! so its return was missed (a `longjmp`, a lost event). Only the outermost allocator call
//! counts: glibc's `realloc(NULL, n)` calls `malloc`, `realloc(p, 0)` calls `free`,
//! `reallocarray` calls `realloc`; the inner calls are the outer call's own business. Pure.

use std::collections::HashMap;

use super::call::{Allocator, Chunk, HeapCall, HeapFn, HeapRaw};

/// An entry older than this is not the caller of a new one: no allocator call lasts this long
/// (its return was lost).
const STALE_NS: u64 = 10_000_000_000;

/// An entry at the same stack pointer as the waiting one, right after it (nothing else of the
/// thread in between, within this long), is a tail call it made: glibc's `reallocarray` ends
/// with `return realloc (...)`, `realloc (NULL, n)` with `return malloc (n)`. The frame is the
/// same, so both returns come at once with the same stack pointer.
const TAIL_CALL_NS: u64 = 1_000_000;

/// An entry waiting for its return.
#[derive(Clone, Debug)]
struct Pending {
    raw: HeapRaw,
    func: HeapFn,
    allocator: Allocator,
}

/// What could not be paired, for the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairingStats {
    /// Entries at an address that is no probed function (the map changed under them).
    pub unresolved: u64,
    /// Returns whose entry was not seen (a call in flight when tracing began, a lost event).
    pub returns_without_entry: u64,
    /// Entries whose return was never seen.
    pub lost_returns: u64,
    /// Calls made by another allocator call (left to the outer call).
    pub nested: u64,
}

/// One thread's entries waiting for their returns, outermost first.
#[derive(Debug, Default)]
struct Thread {
    stack: Vec<Pending>,
    /// The time of the thread's last record.
    last_ts: u64,
}

/// The entries waiting for their returns, per thread.
#[derive(Debug, Default)]
pub struct Pairing {
    pending: HashMap<(u32, u32), Thread>,
    pub stats: PairingStats,
}

impl Pairing {
    /// Takes one raw record in time order; returns the call it completes, if any. `resolve`
    /// names the function at an entry's address in a process.
    pub fn push(
        &mut self,
        raw: HeapRaw,
        resolve: impl FnOnce(u32, u64) -> Option<(HeapFn, Allocator)>,
    ) -> Option<HeapCall> {
        let key = (raw.pid, raw.tid);
        if !raw.ret {
            let Some((func, allocator)) = resolve(raw.pid, raw.ip) else {
                self.stats.unresolved += 1;
                return None;
            };
            let thread = self.pending.entry(key).or_default();
            let last_ts = std::mem::replace(&mut thread.last_ts, raw.ts_ns);
            let stack = &mut thread.stack;
            // Waiting entries that cannot be callers of this one are dead: below its return
            // stack pointer, at it but for a tail call, or too old.
            while let Some(top) = stack.last() {
                let tail_call = top.raw.ts_ns == last_ts
                    && raw.ts_ns.saturating_sub(top.raw.ts_ns) < TAIL_CALL_NS;
                let dead = top.raw.sp < raw.sp
                    || (top.raw.sp == raw.sp && !tail_call)
                    || raw.ts_ns.saturating_sub(top.raw.ts_ns) > STALE_NS;
                if !dead {
                    break;
                }
                stack.pop();
                self.stats.lost_returns += 1;
            }
            let nested = !stack.is_empty();
            if func.has_return() {
                stack.push(Pending {
                    raw,
                    func,
                    allocator,
                });
                return None;
            }
            if stack.is_empty() {
                self.pending.remove(&key);
            }
            if nested {
                self.stats.nested += 1;
                return None;
            }
            return Some(call(raw, None, func, allocator));
        }
        let Some(thread) = self.pending.get_mut(&key) else {
            self.stats.returns_without_entry += 1;
            return None;
        };
        thread.last_ts = raw.ts_ns;
        let stack = &mut thread.stack;
        while stack.last().is_some_and(|p| p.raw.sp < raw.sp) {
            stack.pop();
            self.stats.lost_returns += 1;
        }
        let entry = match stack.last() {
            Some(p) if p.raw.sp == raw.sp => stack.pop(),
            _ => None,
        };
        let nested = !stack.is_empty();
        if stack.is_empty() {
            self.pending.remove(&key);
        }
        let Some(entry) = entry else {
            self.stats.returns_without_entry += 1;
            return None;
        };
        if nested {
            self.stats.nested += 1;
            return None;
        }
        Some(call(entry.raw, Some(&raw), entry.func, entry.allocator))
    }

    /// Forgets the waiting entries of `pid` (it exec'd or exited).
    pub fn forget(&mut self, pid: u32) {
        self.pending.retain(|(p, _), _| *p != pid);
    }

    /// Threads with entries waiting.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

/// The call of an entry and its return (None: a call without a return probe).
fn call(entry: HeapRaw, ret: Option<&HeapRaw>, func: HeapFn, allocator: Allocator) -> HeapCall {
    let [a0, a1, a2, size_word] = entry.args;
    let mut c = HeapCall {
        ts_ns: ret.map_or(entry.ts_ns, |r| r.ts_ns),
        enter_ts_ns: entry.ts_ns,
        pid: entry.pid,
        tid: entry.tid,
        func,
        allocator,
        args: [a0, a1, a2],
        ret: ret.map_or(0, |r| r.args[0]),
        ptr: ret.map_or(0, |r| r.args[1]),
        chunk: None,
        freed_chunk: None,
        caller: ret.map_or(0, |r| r.ip),
        stack: None,
        entry_stack: None,
    };
    if allocator == Allocator::Glibc {
        if let Some(r) = ret.filter(|r| r.chunk && r.args[1] != 0) {
            c.chunk = Chunk::decode(r.args[2], r.args[3], c.requested());
        }
        if entry.chunk && func.frees_first_argument() && a0 != 0 {
            c.freed_chunk = Chunk::decode(0, size_word, 0);
        }
    }
    // The words were matched to the entry by thread, time and stack pointer; a call at the
    // same depth whose own words were not written cannot keep another's: they return
    // elsewhere.
    c.entry_stack = entry
        .stack
        .filter(|s| ret.is_none() || s.return_address() == c.caller);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::call::EntryStack;

    const MALLOC: u64 = 0x7000;
    const REALLOC: u64 = 0x7100;
    const FREE: u64 = 0x7200;

    fn resolve(_pid: u32, ip: u64) -> Option<(HeapFn, Allocator)> {
        let f = match ip {
            MALLOC => HeapFn::Malloc,
            REALLOC => HeapFn::Realloc,
            FREE => HeapFn::Free,
            _ => return None,
        };
        Some((f, Allocator::Glibc))
    }

    fn entry(ts: u64, tid: u32, ip: u64, sp: u64, args: [u64; 3]) -> HeapRaw {
        HeapRaw {
            ts_ns: ts,
            pid: 1,
            tid,
            ret: false,
            chunk: false,
            ip,
            sp,
            args: [args[0], args[1], args[2], 0],
            stack: None,
        }
    }

    fn ret(ts: u64, tid: u32, sp: u64, value: u64) -> HeapRaw {
        HeapRaw {
            ts_ns: ts,
            pid: 1,
            tid,
            ret: true,
            chunk: false,
            ip: 0x4242,
            sp,
            args: [value, value, 0, 0],
            stack: None,
        }
    }

    #[test]
    fn an_entry_and_its_return_make_one_call() {
        let mut p = Pairing::default();
        assert!(
            p.push(entry(1, 5, MALLOC, 0x9000, [100, 0, 0]), resolve)
                .is_none()
        );
        let c = p.push(ret(2, 5, 0x9000, 0xa0), resolve).expect("a call");
        assert_eq!(
            (c.func, c.args[0], c.ptr, c.ts_ns, c.enter_ts_ns, c.caller),
            (HeapFn::Malloc, 100, 0xa0, 2, 1, 0x4242)
        );
        // free has no return: its entry is the call.
        let c = p
            .push(entry(3, 5, FREE, 0x9000, [0xa0, 0, 0]), resolve)
            .expect("a call");
        assert_eq!((c.func, c.args[0], c.ts_ns), (HeapFn::Free, 0xa0, 3));
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn stack_words_are_kept_only_by_the_call_that_returns_where_they_say() {
        let words = |ret_addr: u64| {
            let mut words = [0; tracer_common::HEAP_STACK_WORDS];
            words[0] = ret_addr;
            Box::new(EntryStack {
                regs: [MALLOC, 0x9000 - 8, 0, ret_addr],
                words,
            })
        };
        let mut p = Pairing::default();
        let mut e = entry(1, 5, MALLOC, 0x9000, [100, 0, 0]);
        e.stack = Some(words(0x4242));
        p.push(e, resolve);
        let c = p.push(ret(2, 5, 0x9000, 0xa0), resolve).expect("a call");
        assert_eq!(c.entry_stack.map(|s| s.return_address()), Some(0x4242));
        let mut e = entry(3, 5, MALLOC, 0x9000, [100, 0, 0]);
        e.stack = Some(words(0x5555));
        p.push(e, resolve);
        let c = p.push(ret(4, 5, 0x9000, 0xb0), resolve).expect("a call");
        assert!(c.entry_stack.is_none(), "another call's words");
    }

    #[test]
    fn calls_inside_another_allocator_call_are_left_to_it() {
        let mut p = Pairing::default();
        // realloc(NULL, 64) -> malloc(64); realloc(p, 0) -> free(p).
        p.push(entry(1, 5, REALLOC, 0x9000, [0, 64, 0]), resolve);
        p.push(entry(2, 5, MALLOC, 0x8f00, [64, 0, 0]), resolve);
        assert!(p.push(ret(3, 5, 0x8f00, 0xb0), resolve).is_none());
        let c = p
            .push(ret(4, 5, 0x9000, 0xb0), resolve)
            .expect("the realloc");
        assert_eq!((c.func, c.ptr), (HeapFn::Realloc, 0xb0));
        p.push(entry(5, 5, REALLOC, 0x9000, [0xb0, 0, 0]), resolve);
        assert!(
            p.push(entry(6, 5, FREE, 0x8f00, [0xb0, 0, 0]), resolve)
                .is_none()
        );
        let c = p.push(ret(7, 5, 0x9000, 0), resolve).expect("the realloc");
        assert_eq!(c.effect().freed, Some(0xb0));
        assert_eq!(p.stats.nested, 2);
    }

    #[test]
    fn threads_are_paired_apart_and_dead_frames_dropped() {
        let mut p = Pairing::default();
        p.push(entry(1, 5, MALLOC, 0x9000, [1, 0, 0]), resolve);
        p.push(entry(2, 6, MALLOC, 0x9000, [2, 0, 0]), resolve);
        let c6 = p.push(ret(3, 6, 0x9000, 0x60), resolve).expect("thread 6");
        let c5 = p.push(ret(4, 5, 0x9000, 0x50), resolve).expect("thread 5");
        assert_eq!((c5.args[0], c6.args[0]), (1, 2));
        // A malloc whose return was lost (longjmp out of a handler, say), then another call at
        // the same depth later: the first is dropped, the second pairs.
        p.push(entry(5, 5, MALLOC, 0x9000, [3, 0, 0]), resolve);
        p.push(entry(5_000_000, 5, MALLOC, 0x9000, [4, 0, 0]), resolve);
        let c = p
            .push(ret(5_000_001, 5, 0x9000, 0x70), resolve)
            .expect("the second");
        assert_eq!(c.args[0], 4);
        assert_eq!(p.stats.lost_returns, 1);
        // A free at the same depth is not nested in a dead malloc.
        p.push(entry(8_000_000, 5, MALLOC, 0x9000, [5, 0, 0]), resolve);
        assert!(
            p.push(entry(19_000_000, 5, FREE, 0x9000, [0x70, 0, 0]), resolve)
                .is_some()
        );
        // A return without its entry, an unknown address.
        assert!(p.push(ret(20_000_000, 7, 0x9000, 1), resolve).is_none());
        assert!(
            p.push(entry(21_000_000, 5, 0xdead, 0x9000, [0; 3]), resolve)
                .is_none()
        );
        assert_eq!(p.stats.returns_without_entry, 1);
        assert_eq!(p.stats.unresolved, 1);
        p.forget(1);
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn a_tail_call_is_the_outer_calls_business() {
        const REALLOCARRAY: u64 = 0x7300;
        let resolve = |pid, ip| match ip {
            REALLOCARRAY => Some((HeapFn::Reallocarray, Allocator::Glibc)),
            other => resolve(pid, other),
        };
        let mut p = Pairing::default();
        // reallocarray jumps to realloc, which jumps to malloc: one frame, three returns at
        // once.
        p.push(entry(1, 5, REALLOCARRAY, 0x9000, [0, 100, 30]), resolve);
        p.push(entry(2, 5, REALLOC, 0x9000, [0, 3000, 0]), resolve);
        p.push(entry(3, 5, MALLOC, 0x9000, [3000, 0, 0]), resolve);
        assert!(p.push(ret(4, 5, 0x9000, 0xc0), resolve).is_none());
        assert!(p.push(ret(4, 5, 0x9000, 0xc0), resolve).is_none());
        let c = p
            .push(ret(4, 5, 0x9000, 0xc0), resolve)
            .expect("the reallocarray");
        assert_eq!(
            (c.func, c.requested(), c.ptr),
            (HeapFn::Reallocarray, 3000, 0xc0)
        );
        assert_eq!(p.stats.lost_returns, 0);
        // A malloc whose return was lost is not taken for the caller of the next call at its
        // depth once something else happened between them.
        p.push(entry(10, 5, MALLOC, 0x9000, [7, 0, 0]), resolve);
        p.push(entry(11, 5, FREE, 0x8000, [0xc0, 0, 0]), resolve);
        p.push(entry(12, 5, MALLOC, 0x9000, [8, 0, 0]), resolve);
        let c = p
            .push(ret(13, 5, 0x9000, 0xd0), resolve)
            .expect("the second malloc");
        assert_eq!(c.args[0], 8);
        p.forget(1);
        // An entry left waiting for ten seconds is dead, whatever its depth.
        p.push(entry(10, 5, MALLOC, 0x9100, [1, 0, 0]), resolve);
        p.push(entry(20_000_000_000, 5, MALLOC, 0x9000, [2, 0, 0]), resolve);
        let c = p
            .push(ret(20_000_000_001, 5, 0x9000, 0x10), resolve)
            .expect("a call");
        assert_eq!(c.args[0], 2);
    }

    #[test]
    fn glibc_headers_give_block_sizes() {
        let mut p = Pairing::default();
        p.push(entry(1, 5, MALLOC, 0x9000, [100, 0, 0]), resolve);
        let mut r = ret(2, 5, 0x9000, 0xa0);
        r.chunk = true;
        r.args[3] = 112 | 1;
        let c = p.push(r, resolve).expect("a call");
        assert_eq!(c.chunk.map(|c| c.bytes), Some(112));
        let mut e = entry(3, 5, FREE, 0x9000, [0xa0, 0, 0]);
        e.chunk = true;
        e.args[3] = 112 | 1;
        let c = p.push(e, resolve).expect("a call");
        assert_eq!(c.freed_chunk.map(|c| c.bytes), Some(112));
    }
}
