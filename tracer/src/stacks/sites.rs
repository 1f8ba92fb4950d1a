//! Memory charged to code: per stack, the calls it made, the bytes it reserved, how many of
//! those were touched, released, and are still mapped; and per call site (the first frame
//! outside the allocator, libc and the dynamic loader), the same summed over its stacks.
//! Fed from the session with every applied event, so live runs and replays agree.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tracer_common::Syscall;

use super::{Frame, StackDef, StackTable};
use crate::{
    applied::Applied,
    call::MemCall,
    event::Event,
    model::{EffectKind, PAGE_SIZE, Touch},
};

/// What one stack did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStats {
    /// Syscalls made with this stack.
    pub calls: u64,
    /// Bytes mapped by those calls (mmap, brk growth, mremap growth, shmat).
    pub reserved_bytes: u64,
    /// Of those, bytes first touched (by any code).
    pub touched_bytes: u64,
    /// Of those, bytes unmapped again (by any code).
    pub released_bytes: u64,
    /// First-touch faults with this stack (`--fault-stacks`) and the bytes they made resident.
    pub first_touches: u64,
    pub first_touch_bytes: u64,
}

impl SiteStats {
    fn add(&mut self, o: &SiteStats) {
        self.calls += o.calls;
        self.reserved_bytes += o.reserved_bytes;
        self.touched_bytes += o.touched_bytes;
        self.released_bytes += o.released_bytes;
        self.first_touches += o.first_touches;
        self.first_touch_bytes += o.first_touch_bytes;
    }
}

/// One process's memory by stack.
#[derive(Clone, Debug, Default)]
pub struct CallSites {
    pub by_stack: HashMap<u64, SiteStats>,
    /// The syscalls each stack made (bit `Syscall as u32`).
    pub calls_by_stack: HashMap<u64, u32>,
    /// Successful mmap calls by (length, stack).
    pub mmap_lens: HashMap<(u64, u64), u64>,
    /// Mapped ranges by the stack that mapped them: start -> (end, stack id).
    owners: BTreeMap<u64, (u64, u64)>,
    heap_end: Option<u64>,
}

fn align_up(x: u64) -> u64 {
    x.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

impl CallSites {
    /// Whether any event carried a stack.
    pub fn is_empty(&self) -> bool {
        self.by_stack.is_empty()
    }

    /// Bytes still mapped by each stack.
    pub fn still_mapped(&self) -> HashMap<u64, u64> {
        let mut out = HashMap::new();
        for (&start, &(end, id)) in &self.owners {
            *out.entry(id).or_default() += end - start;
        }
        out
    }

    /// Takes account of one applied event of this process.
    pub fn observe(&mut self, event: &Event, applied: &Applied) {
        match (event, applied) {
            (Event::Syscall(s), _) => {
                let sid = s.resolved.stack_id;
                if let Some(id) = sid {
                    self.by_stack.entry(id).or_default().calls += 1;
                    *self.calls_by_stack.entry(id).or_default() |= 1 << (s.call as u32);
                }
                let Applied::Syscall { effect: e, .. } = applied else {
                    return;
                };
                if let (Syscall::Mmap, Some(id)) = (s.call, sid) {
                    *self.mmap_lens.entry((e.end - e.start, id)).or_default() += 1;
                }
                match (s.call, e.kind) {
                    (
                        Syscall::Mmap | Syscall::Shmat,
                        EffectKind::Created | EffectKind::Replaced,
                    ) => {
                        self.release(e.start, e.end);
                        self.own(e.start, e.end, sid);
                    }
                    (Syscall::Munmap | Syscall::Shmdt, EffectKind::Unmapped) => {
                        self.release(e.start, e.end)
                    }
                    (Syscall::Brk, kind) => {
                        // The break the kernel returned (brk returns the break it kept, also
                        // when it refuses): the effect is empty for a call the model did not
                        // apply (one older than a resync).
                        let brk = u64::try_from(s.ret).unwrap_or(0);
                        if brk == 0 {
                            return;
                        }
                        let new_end = align_up(brk);
                        match (kind, self.heap_end) {
                            (EffectKind::Grown, Some(old)) if new_end > old => {
                                self.own(old, new_end, sid)
                            }
                            (EffectKind::Shrunk, Some(old)) if new_end < old => {
                                self.release(new_end, old)
                            }
                            _ => {}
                        }
                        self.heap_end = Some(new_end);
                    }
                    (Syscall::Mremap, kind) => {
                        let (old, old_len) = match s.mem() {
                            MemCall::Mremap { addr, old_len, .. } => (addr, old_len),
                            _ => (e.start, 0),
                        };
                        let old_end = old.saturating_add(align_up(old_len));
                        match kind {
                            EffectKind::Shrunk => self.release(e.end, old_end),
                            EffectKind::Grown => self.own(old_end, e.end, sid),
                            EffectKind::Moved => {
                                let from = e.from.unwrap_or(old);
                                let keep = (old_end - old).min(e.end - e.start);
                                let moved = self.take(from, from + keep);
                                self.release(from, old_end);
                                self.release(e.start, e.end);
                                for (start, end, id) in moved {
                                    let (ns, ne) =
                                        (e.start + (start - from), e.start + (end - from));
                                    self.owners.insert(ns, (ne, id));
                                }
                                self.own(e.start + keep, e.end, sid);
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            (Event::Fault(f), Applied::Fault(fe)) => {
                if !matches!(fe.touch, Touch::First { .. }) || fe.pages == 0 {
                    return;
                }
                let bytes = fe.pages * PAGE_SIZE;
                if let Some(owner) = self.owner_at(f.address) {
                    self.by_stack.entry(owner).or_default().touched_bytes += bytes;
                }
                if let Some(id) = f.stack_id {
                    let s = self.by_stack.entry(id).or_default();
                    s.first_touches += 1;
                    s.first_touch_bytes += bytes;
                }
            }
            (Event::Exec { .. }, Applied::Exec) => {
                self.release(0, u64::MAX);
                self.heap_end = None;
            }
            _ => {}
        }
    }

    fn owner_at(&self, addr: u64) -> Option<u64> {
        self.owners
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| addr < *end)
            .map(|(_, &(_, id))| id)
    }

    fn own(&mut self, start: u64, end: u64, sid: Option<u64>) {
        let Some(id) = sid else { return };
        if start >= end {
            return;
        }
        self.by_stack.entry(id).or_default().reserved_bytes += end - start;
        self.owners.insert(start, (end, id));
    }

    /// Removes `[start, end)` from the owned ranges, returning the pieces removed.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = self
            .owners
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let keys: Vec<u64> = self.owners.range(first..end).map(|(&s, _)| s).collect();
        for s in keys {
            let Some((e, id)) = self.owners.remove(&s) else {
                continue;
            };
            let (cs, ce) = (s.max(start), e.min(end));
            if s < cs {
                self.owners.insert(s, (cs, id));
            }
            if ce < e {
                self.owners.insert(ce, (e, id));
            }
            if cs < ce {
                out.push((cs, ce, id));
            }
        }
        out
    }

    fn release(&mut self, start: u64, end: u64) {
        for (s, e, id) in self.take(start, end) {
            self.by_stack.entry(id).or_default().released_bytes += e - s;
        }
    }
}

/// Libraries whose frames are not the caller's code: the C library, the dynamic loader and
/// allocators.
const RUNTIME_MODULES: &[&str] = &[
    "libc.so",
    "libc-",
    "ld-linux",
    "ld64.so",
    "libpthread",
    "libjemalloc",
    "libtcmalloc",
    "libmimalloc",
    "libstdc++",
];

/// Functions of Rust's and C++'s allocation layers.
const ALLOCATOR_FUNCTIONS: &[&str] = &[
    "__rust_alloc",
    "__rust_realloc",
    "__rust_alloc_zeroed",
    "__rdl_",
    "__rg_",
    "alloc::",
    "<alloc::",
    "std::alloc",
    "std::sys::alloc",
    "std::sys::pal::unix::alloc",
    "core::alloc",
    "<std::alloc",
    "hashbrown::raw",
    // Rust's standard library below the program's own code.
    "core::",
    "<core::",
    "std::",
    "<std::",
    "operator new",
    "malloc",
    "calloc",
    "realloc",
    "free",
];

fn module_base(f: &Frame) -> &str {
    let module = f.module.as_deref().unwrap_or("");
    module.rsplit('/').next().unwrap_or(module)
}

/// Whether `f` belongs to the allocator, libc or the loader.
pub fn is_runtime(f: &Frame) -> bool {
    let base = module_base(f);
    if RUNTIME_MODULES.iter().any(|m| base.starts_with(m)) {
        return true;
    }
    f.function
        .as_deref()
        .is_some_and(|name| ALLOCATOR_FUNCTIONS.iter().any(|p| name.starts_with(p)))
}

/// Whether `f` is a syscall wrapper (`__mmap64`, `__GI___sbrk`, ...).
fn is_wrapper(f: &Frame) -> bool {
    f.function.as_deref().is_some_and(|n| {
        let n = n
            .trim_start_matches('_')
            .trim_start_matches("GI_")
            .trim_start_matches('_');
        [
            "mmap", "munmap", "mremap", "mprotect", "madvise", "brk", "sbrk", "shmat", "shmdt",
            "mlock", "munlock", "syscall",
        ]
        .iter()
        .any(|w| n.starts_with(w))
    })
}

/// The call site of a stack: its innermost named Python function when it has one (the
/// interpreter's and its extensions' frames are not the program's code), else its first frame
/// outside the runtime; for the runtime's own calls (the loader mapping libraries), its first
/// frame past the syscall wrapper.
pub fn call_site(def: &StackDef) -> Option<&Frame> {
    def.frames
        .iter()
        .find(|f| super::python::is_python(f) && f.function.is_some())
        .or_else(|| def.frames.iter().find(|f| !is_runtime(f)))
        .or_else(|| def.frames.iter().find(|f| !f.inlined && !is_wrapper(f)))
        .or(def.frames.first())
}

/// The label of a stack's call site: `function (file:line)`, `function` or `module+offset`.
pub fn site_label(def: &StackDef) -> String {
    call_site(def).map_or_else(|| format!("[stack {}]", def.id), Frame::label)
}

/// Whether glibc's malloc (or calloc, realloc, memalign) is on the stack: the mmap threshold
/// and arena advice apply to these calls only.
pub fn through_malloc(def: &StackDef) -> bool {
    def.frames.iter().any(|f| {
        let base = module_base(f);
        (base.starts_with("libc.so") || base.starts_with("libc-"))
            && f.function.as_deref().is_some_and(|n| {
                [
                    "malloc",
                    "calloc",
                    "realloc",
                    "memalign",
                    "valloc",
                    "aligned_alloc",
                ]
                .iter()
                .any(|a| n.contains(a))
            })
    })
}

/// One row of the call-site table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    /// `function (file:line)` or `module+offset` of the call site.
    pub site: String,
    /// The stacks through this site.
    pub stack_ids: Vec<u64>,
    #[serde(flatten)]
    pub stats: SiteStats,
    pub still_mapped_bytes: u64,
    /// Whether malloc made some of these calls.
    pub through_malloc: bool,
}

/// The call sites of `sites`, by reserved bytes (then touched, then calls), at most `top`.
pub fn table(sites: &CallSites, stacks: &StackTable, top: usize) -> Vec<SiteRow> {
    table_of(sites, stacks, top, |_| true)
}

/// The call sites of the stacks that made one of `calls`.
pub fn table_of_calls(
    sites: &CallSites,
    stacks: &StackTable,
    top: usize,
    calls: &[Syscall],
) -> Vec<SiteRow> {
    let mask = calls.iter().fold(0u32, |m, c| m | 1 << (*c as u32));
    table_of(sites, stacks, top, |id| {
        sites.calls_by_stack.get(&id).is_some_and(|m| m & mask != 0)
    })
}

/// The call sites of the stacks that `keep` accepts.
pub fn table_of(
    sites: &CallSites,
    stacks: &StackTable,
    top: usize,
    keep: impl Fn(u64) -> bool,
) -> Vec<SiteRow> {
    let still = sites.still_mapped();
    let mut rows: BTreeMap<String, SiteRow> = BTreeMap::new();
    for (&id, stats) in sites.by_stack.iter().filter(|(id, _)| keep(**id)) {
        let def = stacks.get(id);
        let label = def.map_or_else(|| format!("[stack {id}]"), |d| site_label(d));
        let row = rows.entry(label.clone()).or_insert_with(|| SiteRow {
            site: label,
            stack_ids: Vec::new(),
            stats: SiteStats::default(),
            still_mapped_bytes: 0,
            through_malloc: false,
        });
        row.stack_ids.push(id);
        row.stats.add(stats);
        row.still_mapped_bytes += still.get(&id).copied().unwrap_or(0);
        row.through_malloc |= def.is_some_and(|d| through_malloc(d));
    }
    let mut rows: Vec<SiteRow> = rows.into_values().collect();
    for r in &mut rows {
        r.stack_ids.sort_unstable();
    }
    rows.sort_by(|a, b| {
        (
            b.stats.reserved_bytes,
            b.stats.touched_bytes + b.stats.first_touch_bytes,
            b.stats.calls,
        )
            .cmp(&(
                a.stats.reserved_bytes,
                a.stats.touched_bytes + a.stats.first_touch_bytes,
                a.stats.calls,
            ))
            .then_with(|| a.site.cmp(&b.site))
    });
    rows.truncate(top);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Resolved, SyscallRecord},
        model::Effect,
    };

    fn call(call: Syscall, args: [u64; 6], ret: i64, stack: u64) -> Event {
        Event::Syscall(SyscallRecord {
            ts_ns: 1,
            enter_ts_ns: 1,
            pid: 1,
            tid: 1,
            call,
            args,
            ret,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Resolved {
                stack_id: Some(stack),
                ..Resolved::default()
            },
        })
    }

    fn effect(kind: EffectKind, start: u64, end: u64) -> Applied {
        Applied::Syscall {
            pid: 1,
            effect: Effect {
                kind,
                start,
                end,
                ..Effect::default()
            },
        }
    }

    #[test]
    fn memory_is_charged_to_the_stack_that_mapped_it() {
        let mut s = CallSites::default();
        let mmap = call(Syscall::Mmap, [0, 0x4000, 3, 0x22, 0, 0], 0x10000, 7);
        s.observe(&mmap, &effect(EffectKind::Created, 0x10000, 0x14000));
        // Another stack unmaps half of it: released bytes stay with the mapper.
        let munmap = call(Syscall::Munmap, [0x12000, 0x2000, 0, 0, 0, 0], 0, 8);
        s.observe(&munmap, &effect(EffectKind::Unmapped, 0x12000, 0x14000));
        let seven = s.by_stack[&7];
        assert_eq!(
            (seven.calls, seven.reserved_bytes, seven.released_bytes),
            (1, 0x4000, 0x2000)
        );
        assert_eq!(s.by_stack[&8].calls, 1);
        assert_eq!(s.still_mapped().get(&7), Some(&0x2000));
        // The heap: brk growth is charged to the caller of the growing call.
        let brk0 = call(Syscall::Brk, [0; 6], 0x50000, 9);
        s.observe(&brk0, &effect(EffectKind::None, 0x50000, 0x50000));
        let grow = call(Syscall::Brk, [0x71000, 0, 0, 0, 0, 0], 0x71000, 9);
        s.observe(&grow, &effect(EffectKind::Grown, 0x50000, 0x71000));
        assert_eq!(s.by_stack[&9].reserved_bytes, 0x21000);
        let shrink = call(Syscall::Brk, [0x60000, 0, 0, 0, 0, 0], 0x60000, 10);
        s.observe(&shrink, &effect(EffectKind::Shrunk, 0x50000, 0x60000));
        assert_eq!(s.by_stack[&9].released_bytes, 0x11000);
        assert_eq!(s.still_mapped().get(&9), Some(&0x10000));
        // A brk the model did not apply (older than a resync: no effect) still moves the end
        // the next growth is charged from, and charges nothing itself.
        let unapplied = call(Syscall::Brk, [0x62000, 0, 0, 0, 0, 0], 0x62000, 11);
        s.observe(&unapplied, &effect(EffectKind::None, 0, 0));
        let grow = call(Syscall::Brk, [0x63000, 0, 0, 0, 0, 0], 0x63000, 12);
        s.observe(&grow, &effect(EffectKind::Grown, 0x50000, 0x63000));
        assert_eq!(s.by_stack[&12].reserved_bytes, 0x1000);
        assert_eq!(s.by_stack.get(&11).map_or(0, |st| st.reserved_bytes), 0);
    }

    #[test]
    fn the_call_site_is_the_first_frame_outside_libc_and_the_allocator() {
        let frame = |module: &str, function: &str| Frame {
            module: Some(module.into()),
            function: Some(function.into()),
            ..Frame::default()
        };
        let def = StackDef {
            id: 1,
            frames: vec![
                frame("/usr/lib/x86_64-linux-gnu/libc.so.6", "__mmap"),
                frame("/usr/lib/x86_64-linux-gnu/libc.so.6", "sysmalloc"),
                frame("/usr/lib/x86_64-linux-gnu/libc.so.6", "malloc"),
                frame("/work/a.out", "alloc::raw_vec::finish_grow"),
                frame("/work/a.out", "grow_table"),
                frame("/work/a.out", "main"),
                frame(
                    "/usr/lib/x86_64-linux-gnu/libc.so.6",
                    "__libc_start_call_main",
                ),
            ],
        };
        assert_eq!(
            call_site(&def).and_then(|f| f.function.as_deref()),
            Some("grow_table")
        );
        assert!(through_malloc(&def));
        // A program's own mmap: not malloc's, though libc started the program.
        let own = StackDef {
            id: 2,
            frames: vec![
                frame("/usr/lib/x86_64-linux-gnu/libc.so.6", "__GI___mmap64"),
                frame("/work/a.out", "map_region"),
                frame("/work/a.out", "main"),
                frame(
                    "/usr/lib/x86_64-linux-gnu/libc.so.6",
                    "__libc_start_call_main",
                ),
            ],
        };
        assert!(!through_malloc(&own));
        assert_eq!(
            call_site(&own).and_then(|f| f.function.as_deref()),
            Some("map_region")
        );
        // The loader's own calls: the first frame past the wrapper.
        let ld = StackDef {
            id: 3,
            frames: vec![
                frame("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "__mmap64"),
                frame(
                    "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                    "_dl_map_segments",
                ),
            ],
        };
        assert_eq!(
            call_site(&ld).and_then(|f| f.function.as_deref()),
            Some("_dl_map_segments")
        );
    }
}
