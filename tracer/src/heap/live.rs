//! Live memory as the allocator sees it: every block allocated and not yet freed, per process,
//! with the bytes the allocator holds for it, and what the allocator mapped for itself. Pure:
//! the session applies [`HeapCall`]s to it, live and in replay alike.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
};

use super::call::{Allocator, HeapCall, HeapFn};

/// glibc's thread arenas are 64 MiB-aligned heaps (`HEAP_MAX_SIZE`): a block's arena is its
/// address rounded down, as glibc's `heap_for_ptr` does.
pub const GLIBC_ARENA_SIZE: u64 = 64 << 20;

/// Sizes of CPython's object-allocator arenas: 1 MiB from 3.10, 256 KiB before.
pub const PYMALLOC_ARENA_SIZES: [u64; 2] = [1 << 20, 256 << 10];

/// One live block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Bytes asked for.
    pub size: u64,
    /// Bytes the allocator holds for it (glibc's chunk, header included, or its whole mapping;
    /// else the size asked for).
    pub bytes: u64,
    /// When it was allocated.
    pub ts_ns: u64,
    /// The call site (the address its allocation returned to; 0 when not known).
    pub caller: u64,
    /// A call-site key from the user stack, when stacks are recorded.
    pub stack: Option<u64>,
    pub allocator: Allocator,
    /// A glibc chunk with its own mapping.
    pub mmapped: bool,
    /// A glibc chunk of a thread arena.
    pub thread_arena: bool,
    /// `bytes` and the flags come from the allocator's header (glibc), not the size asked.
    pub headed: bool,
}

impl Block {
    /// Where the allocator's bytes for the block start: glibc's chunk begins 16 bytes before
    /// the pointer (`prev_size`, size), and a mmapped chunk's mapping before that by its
    /// alignment offset.
    pub fn span(&self, ptr: u64) -> (u64, u64) {
        if self.headed {
            let start = if self.mmapped {
                // The mapping is page aligned and ends where the chunk ends.
                (ptr - 16) & !4095
            } else {
                ptr - 16
            };
            (start, start + self.bytes)
        } else {
            (ptr, ptr + self.bytes)
        }
    }
}

/// A fast hasher for block addresses (16-byte aligned: the low bits carry nothing).
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// Counters of one process's allocator calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapCounts {
    /// Calls by function name.
    pub calls: BTreeMap<&'static str, u64>,
    pub allocations: u64,
    pub frees: u64,
    /// Frees of blocks not seen allocated (allocated before tracing began, or before the
    /// allocator's probes were attached), with the bytes their headers gave (glibc) and how
    /// many had no readable header.
    pub untracked_frees: u64,
    pub untracked_free_bytes: u64,
    pub untracked_free_unknown: u64,
    /// Allocations that returned an address still live here (its free was not seen).
    pub replaced: u64,
    /// Allocating calls that failed (returned no block).
    pub failed: u64,
    /// `malloc_trim` calls, and those that released memory.
    pub trims: u64,
    pub trims_released: u64,
}

/// What applying a call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveKind {
    Allocated,
    Freed,
    /// Freed one block and allocated another (a realloc that moved or stayed).
    Reallocated,
    Resized,
    /// Freed a block not seen allocated.
    UntrackedFree,
    Failed,
    Trimmed,
    None,
}

impl LiveKind {
    /// The name in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Allocated => "allocated",
            Self::Freed => "freed",
            Self::Reallocated => "reallocated",
            Self::Resized => "resized",
            Self::UntrackedFree => "untracked_free",
            Self::Failed => "failed",
            Self::Trimmed => "trimmed",
            Self::None => "none",
        }
    }
}

/// The effect of one call on the live model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapEffect {
    pub kind: LiveKind,
    /// The process's live bytes after the call.
    pub live_bytes: u64,
}

/// A change of the map made by a thread, kept briefly to learn whether it was made inside an
/// allocator call (the call's record comes at its return, after its syscalls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapChange {
    ts_ns: u64,
    start: u64,
    end: u64,
}

/// Map changes remembered per thread.
const RECENT_PER_THREAD: usize = 8;

/// Live bytes and blocks of one glibc arena, and the most it held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaLive {
    pub live: u64,
    pub peak: u64,
}

/// One process's live blocks.
#[derive(Clone, Debug, Default)]
pub struct LiveHeap {
    blocks: AddrMap<Block>,
    live_bytes: u64,
    live_requested: u64,
    /// The most live bytes at any time, and when.
    pub peak_bytes: u64,
    pub peak_ns: u64,
    pub counts: HeapCounts,
    /// Allocator probes cover this process (`--heap`).
    pub enabled: bool,
    /// Every allocation of the process's image was seen: traced from its exec with the
    /// allocator's probes in place, nothing lost. False after attaching to a running process,
    /// a late attach or lost events.
    pub complete: bool,
    /// When the allocator's probes began to cover the process.
    pub since_ns: Option<u64>,
    /// The allocators its calls went to (a preloaded one takes the calls of glibc's, which
    /// is probed too).
    pub allocators: BTreeSet<Allocator>,
    /// glibc arenas by base (0: the main arena), for the arena-count knob.
    pub arenas: BTreeMap<u64, ArenaLive>,
    /// The bytes of all glibc arenas together (main heap included, mmapped chunks not), now
    /// and at most: what one arena for every thread would have had to hold.
    pub arenas_total: ArenaLive,
    /// Mappings made inside allocator calls: start -> (end, allocator).
    owned: BTreeMap<u64, (u64, Allocator)>,
    recent: HashMap<u32, VecDeque<MapChange>>,
    /// Anonymous mappings of a pymalloc arena's size made outside allocator calls: start ->
    /// end.
    arena_candidates: BTreeMap<u64, u64>,
    /// The last reading of CPython's pool headers.
    pub pymalloc: Option<super::pymalloc::Reading>,
    /// The code at each call site (`caller`), named from the stack its calls carried:
    /// `function (file:line)`.
    site_names: HashMap<u64, (u64, String)>,
}

impl LiveHeap {
    /// Bytes the allocator holds for live blocks.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Bytes asked for by live blocks.
    pub fn live_requested(&self) -> u64 {
        self.live_requested
    }

    /// Number of live blocks.
    pub fn live_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The live blocks (any order).
    pub fn blocks(&self) -> impl Iterator<Item = (u64, &Block)> {
        self.blocks.iter().map(|(p, b)| (*p, b))
    }

    /// The live block at `ptr`.
    pub fn block(&self, ptr: u64) -> Option<&Block> {
        self.blocks.get(&ptr)
    }

    /// Names the code at call site `caller` (the first time it is seen with a stack).
    /// Names the code at call site `caller` from the stack `stack` of a call made there (the
    /// name is built only when the address shows a stack it did not before: other code mapped
    /// there since).
    pub fn name_site(&mut self, caller: u64, stack: u64, name: impl FnOnce() -> String) {
        if caller == 0 {
            return;
        }
        match self.site_names.get(&caller) {
            Some((id, _)) if *id == stack => {}
            _ => {
                self.site_names.insert(caller, (stack, name()));
            }
        }
    }

    /// The code at call site `caller`, when its calls carried a stack.
    pub fn site_name(&self, caller: u64) -> Option<&str> {
        self.site_names.get(&caller).map(|(_, n)| n.as_str())
    }

    /// Mappings made inside allocator calls, in address order: (start, end, allocator).
    pub fn owned(&self) -> impl Iterator<Item = (u64, u64, Allocator)> + '_ {
        self.owned.iter().map(|(s, (e, a))| (*s, *e, *a))
    }

    /// The allocator that made the mapping holding `addr`, if an allocator call made it.
    pub fn owner_of(&self, addr: u64) -> Option<Allocator> {
        self.owned
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| addr < *end)
            .map(|(_, (_, a))| *a)
    }

    /// Anonymous mappings of a pymalloc arena's size made outside allocator calls.
    pub fn arena_candidates(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.arena_candidates.iter().map(|(s, e)| (*s, *e))
    }

    /// Probes for `allocator` cover the process from `ts_ns`; `late`: it had mapped the
    /// allocator before, so calls may have been missed.
    pub fn attached(&mut self, allocator: Allocator, late: bool, ts_ns: u64) {
        if !self.enabled {
            self.enabled = true;
            self.since_ns = Some(ts_ns);
        }
        // Which allocator serves the calls shows in the calls (`allocators`).
        let _ = allocator;
        if late {
            self.complete = false;
        }
    }

    /// Events of the allocator probes were lost: the live bytes may be wrong from now.
    pub fn lost_events(&mut self) {
        if self.enabled {
            self.complete = false;
        }
    }

    /// The process replaced its image: nothing of the old one is live. The new image is
    /// traced from its start.
    pub fn exec(&mut self) {
        *self = Self {
            complete: true,
            ..Self::default()
        };
    }

    /// The child's view after `fork`: the same live blocks.
    pub fn fork(&self) -> Self {
        let mut child = self.clone();
        child.recent.clear();
        child
    }

    /// Notes a successful change of the map by thread `tid` that an allocator may have made:
    /// a new or moved anonymous mapping, a grown heap.
    pub fn note_mapping(&mut self, tid: u32, ts_ns: u64, start: u64, end: u64, anon_mmap: bool) {
        if !self.enabled {
            return;
        }
        let q = self.recent.entry(tid).or_default();
        if q.len() == RECENT_PER_THREAD {
            q.pop_front();
        }
        q.push_back(MapChange { ts_ns, start, end });
        if anon_mmap && PYMALLOC_ARENA_SIZES.contains(&(end - start)) {
            self.arena_candidates.insert(start, end);
        }
    }

    /// `[start, end)` was unmapped (or moved away): it is no longer the allocator's.
    pub fn note_unmap(&mut self, start: u64, end: u64) {
        if !self.enabled || start >= end {
            return;
        }
        remove_range(&mut self.owned, start, end);
        let gone: Vec<u64> = self
            .arena_candidates
            .range(..end)
            .filter(|(s, e)| **e > start && **s < end)
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            self.arena_candidates.remove(&s);
        }
    }

    /// Applies one call.
    pub fn apply(&mut self, call: &HeapCall) -> HeapEffect {
        self.enabled = true;
        self.since_ns.get_or_insert(call.enter_ts_ns);
        self.allocators.insert(call.allocator);
        *self.counts.calls.entry(call.func.name()).or_default() += 1;
        self.claim_mappings(call);
        let e = call.effect();
        let mut kind = LiveKind::None;
        if let Some(ptr) = e.freed {
            kind = if self.remove(ptr) {
                self.counts.frees += 1;
                LiveKind::Freed
            } else {
                self.counts.untracked_frees += 1;
                match call.freed_chunk {
                    Some(c) => self.counts.untracked_free_bytes += c.bytes,
                    None => self.counts.untracked_free_unknown += 1,
                }
                LiveKind::UntrackedFree
            };
        }
        if let Some((ptr, size)) = e.allocated {
            let (bytes, mmapped, thread_arena, headed) = match call.chunk {
                Some(c) => (c.bytes, c.mmapped, c.thread_arena, true),
                None => (size, false, false, false),
            };
            if self.remove(ptr) {
                self.counts.replaced += 1;
            }
            self.insert(
                ptr,
                Block {
                    size,
                    bytes,
                    ts_ns: call.ts_ns,
                    caller: call.caller,
                    stack: call.stack,
                    allocator: call.allocator,
                    mmapped,
                    thread_arena,
                    headed,
                },
            );
            self.counts.allocations += 1;
            kind = if kind == LiveKind::None {
                LiveKind::Allocated
            } else {
                LiveKind::Reallocated
            };
            if self.live_bytes > self.peak_bytes {
                self.peak_bytes = self.live_bytes;
                self.peak_ns = call.ts_ns;
            }
        }
        if let Some((ptr, size)) = e.resized
            && let Some(mut b) = self.blocks.get(&ptr).copied()
        {
            self.remove(ptr);
            b.size = size;
            b.bytes = size;
            b.headed = false;
            self.insert(ptr, b);
            kind = LiveKind::Resized;
        }
        if call.func == HeapFn::MallocTrim {
            self.counts.trims += 1;
            if call.ret == 1 {
                self.counts.trims_released += 1;
            }
            kind = LiveKind::Trimmed;
        } else if kind == LiveKind::None && call.func.has_return() && call.requested() > 0 {
            self.counts.failed += 1;
            kind = LiveKind::Failed;
        }
        HeapEffect {
            kind,
            live_bytes: self.live_bytes,
        }
    }

    /// The map changes this call's thread made while the call ran are the allocator's.
    fn claim_mappings(&mut self, call: &HeapCall) {
        let Some(q) = self.recent.get_mut(&call.tid) else {
            return;
        };
        let inside: Vec<MapChange> = q
            .iter()
            .filter(|m| m.ts_ns >= call.enter_ts_ns && m.ts_ns <= call.ts_ns)
            .copied()
            .collect();
        q.retain(|m| m.ts_ns > call.ts_ns);
        for m in inside {
            remove_range(&mut self.owned, m.start, m.end);
            self.owned.insert(m.start, (m.end, call.allocator));
            self.arena_candidates.remove(&m.start);
        }
    }

    fn arena_key(ptr: u64, b: &Block) -> Option<u64> {
        (b.headed && !b.mmapped).then_some(if b.thread_arena {
            ptr & !(GLIBC_ARENA_SIZE - 1)
        } else {
            0
        })
    }

    fn insert(&mut self, ptr: u64, b: Block) {
        self.live_bytes += b.bytes;
        self.live_requested += b.size;
        if let Some(key) = Self::arena_key(ptr, &b) {
            let a = self.arenas.entry(key).or_default();
            a.live += b.bytes;
            a.peak = a.peak.max(a.live);
            let t = &mut self.arenas_total;
            t.live += b.bytes;
            t.peak = t.peak.max(t.live);
        }
        self.blocks.insert(ptr, b);
    }

    fn remove(&mut self, ptr: u64) -> bool {
        let Some(b) = self.blocks.remove(&ptr) else {
            return false;
        };
        self.live_bytes -= b.bytes;
        self.live_requested -= b.size;
        if let Some(key) = Self::arena_key(ptr, &b)
            && let Some(a) = self.arenas.get_mut(&key)
        {
            a.live -= b.bytes;
            self.arenas_total.live -= b.bytes;
        }
        true
    }
}

/// Removes `[start, end)` from a map of ranges (start -> (end, value)), cutting the ranges it
/// overlaps.
fn remove_range<V: Copy>(map: &mut BTreeMap<u64, (u64, V)>, start: u64, end: u64) {
    let hit: Vec<(u64, u64, V)> = map
        .range(..end)
        .filter(|(s, (e, _))| *e > start && **s < end)
        .map(|(s, (e, v))| (*s, *e, *v))
        .collect();
    for (s, e, v) in hit {
        map.remove(&s);
        if s < start {
            map.insert(s, (start, v));
        }
        if e > end {
            map.insert(end, (e, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::call::Chunk;
    use proptest::prelude::*;

    fn call(func: HeapFn, args: [u64; 3], ptr: u64, ts: u64) -> HeapCall {
        HeapCall {
            caller: 0x400000,
            ..HeapCall::at(ts, 1, func, args, ptr)
        }
    }

    #[test]
    fn blocks_are_counted_live_until_freed() {
        let mut h = LiveHeap::default();
        h.apply(&call(HeapFn::Malloc, [100, 0, 0], 0x1000, 1));
        let mut c = call(HeapFn::Malloc, [100, 0, 0], 0x2000, 2);
        c.chunk = Some(Chunk {
            bytes: 112,
            mmapped: false,
            thread_arena: false,
        });
        h.apply(&c);
        assert_eq!(
            (h.live_bytes(), h.live_requested(), h.live_blocks()),
            (212, 200, 2)
        );
        let e = h.apply(&call(HeapFn::Free, [0x1000, 0, 0], 0, 3));
        assert_eq!((e.kind, e.live_bytes), (LiveKind::Freed, 112));
        // realloc moves the block.
        let e = h.apply(&call(HeapFn::Realloc, [0x2000, 300, 0], 0x3000, 4));
        assert_eq!((e.kind, e.live_bytes), (LiveKind::Reallocated, 300));
        assert_eq!(h.peak_bytes, 300);
        assert_eq!(h.arenas.get(&0).map(|a| (a.live, a.peak)), Some((0, 112)));
        // A free of something never seen.
        let mut f = call(HeapFn::Free, [0x9000, 0, 0], 0, 5);
        f.freed_chunk = Some(Chunk {
            bytes: 64,
            mmapped: false,
            thread_arena: false,
        });
        assert_eq!(h.apply(&f).kind, LiveKind::UntrackedFree);
        assert_eq!(
            (h.counts.untracked_frees, h.counts.untracked_free_bytes),
            (1, 64)
        );
        // A failed malloc, a trim.
        assert_eq!(
            h.apply(&call(HeapFn::Malloc, [1 << 50, 0, 0], 0, 6)).kind,
            LiveKind::Failed
        );
        let mut t = call(HeapFn::MallocTrim, [0, 0, 0], 1, 7);
        t.ret = 1;
        assert_eq!(h.apply(&t).kind, LiveKind::Trimmed);
        assert_eq!((h.counts.trims, h.counts.trims_released), (1, 1));
        assert_eq!(h.counts.calls.get("malloc"), Some(&3));
    }

    #[test]
    fn mappings_made_inside_a_call_are_the_allocators() {
        let mut h = LiveHeap {
            enabled: true,
            ..LiveHeap::default()
        };
        // A 1 MiB mmap outside any call (a pymalloc arena), one inside malloc.
        h.note_mapping(1, 10, 0x10_0000, 0x20_0000, true);
        h.note_mapping(1, 20, 0x40_0000, 0x50_0000, true);
        let mut c = call(HeapFn::Malloc, [1 << 20, 0, 0], 0x40_0010, 21);
        c.enter_ts_ns = 19;
        h.apply(&c);
        assert_eq!(
            h.owned().collect::<Vec<_>>(),
            [(0x40_0000, 0x50_0000, Allocator::Glibc)]
        );
        assert_eq!(
            h.arena_candidates().collect::<Vec<_>>(),
            [(0x10_0000, 0x20_0000)]
        );
        h.note_unmap(0x48_0000, 0x50_0000);
        h.note_unmap(0x10_0000, 0x11_0000);
        assert_eq!(
            h.owned().collect::<Vec<_>>(),
            [(0x40_0000, 0x48_0000, Allocator::Glibc)]
        );
        assert_eq!(h.arena_candidates().count(), 0);
    }

    proptest! {
        /// Whatever sequence of allocations and frees, the live bytes are the sum over the
        /// blocks a reference map holds, and never underflow.
        #[test]
        fn live_bytes_match_a_reference(ops in prop::collection::vec((0u8..3, 0u64..32, 1u64..5000), 1..300)) {
            let mut h = LiveHeap::default();
            let mut reference: BTreeMap<u64, u64> = BTreeMap::new();
            for (i, (op, slot, size)) in ops.into_iter().enumerate() {
                let ptr = 0x1000 + slot * 0x100;
                let ts = i as u64 + 1;
                match op {
                    0 => {
                        h.apply(&call(HeapFn::Malloc, [size, 0, 0], ptr, ts));
                        reference.insert(ptr, size);
                    }
                    1 => {
                        h.apply(&call(HeapFn::Free, [ptr, 0, 0], 0, ts));
                        reference.remove(&ptr);
                    }
                    _ => {
                        let to = 0x1000 + ((slot + 7) % 32) * 0x100;
                        h.apply(&call(HeapFn::Realloc, [ptr, size, 0], to, ts));
                        reference.remove(&ptr);
                        reference.insert(to, size);
                    }
                }
                prop_assert_eq!(h.live_bytes(), reference.values().sum::<u64>());
                prop_assert_eq!(h.live_blocks(), reference.len());
            }
        }
    }
}
