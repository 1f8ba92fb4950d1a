//! Per-process bookkeeping shared by live tracing and replay: one [`AddressSpace`] per traced
//! process, events dispatched to the right one, fork/exec/exit handled, counters kept.

use std::{collections::BTreeMap, sync::Arc};

use tracer_common::Syscall;

use crate::{
    call::{MemCall, linux, map_anonymous, map_shared},
    event::{Event, FaultRecord, SyscallRecord},
    heap::{HeapEffect, LiveHeap, LiveKind},
    model::{AddressSpace, Backing, Effect, EffectKind, Perms, ResidentRun, ThpPolicy, Touch, Vma},
};

/// What a process's address space starts from.
#[derive(Clone, Debug, Default)]
pub struct Seed {
    pub vmas: Vec<Vma>,
    pub start_brk: Option<u64>,
    /// Pages already resident (touched before tracing began).
    pub resident: Vec<ResidentRun>,
    /// The kernel's transparent huge page settings for the process.
    pub thp: ThpPolicy,
}

/// Replaces `space` with `seed`: map, heap, huge page policy, resident pages.
fn seed_space(space: &mut AddressSpace, seed: Seed, ts: u64) {
    space.seed(seed.vmas, seed.start_brk, ts);
    space.set_thp(seed.thp);
    space.seed_resident(&seed.resident);
}

/// Counters of one process.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Calls per syscall name, failed ones included.
    pub syscalls: BTreeMap<&'static str, u64>,
    /// Failed calls per `(syscall, errno)`.
    pub failed: BTreeMap<(&'static str, i32), u64>,
    pub faults: u64,
    /// First touches by kind.
    /// First touches by kind, indexed by `TouchKind as usize`.
    pub first_touches: [u64; 3],
    /// Zero or page-cache pages turned into private anonymous pages by a write.
    pub cow_upgrades: u64,
    /// Faults that could not be placed in any VMA.
    pub faults_outside: u64,
    /// Times the map was read again from `/proc` after events were lost: the counts above
    /// miss what the lost events did.
    pub resyncs: u64,
}

/// Same-size `mmap`/`munmap` pairs of one size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    pub count: u64,
    /// Touched pages the unmaps released (faulted in again by the next pair).
    pub released_pages: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Pairs whose mapping an allocator call made, and glibc's among them (`--heap`).
    pub in_allocator_calls: u64,
    pub by_glibc: u64,
    /// Pairs whose mapping was `MAP_SHARED` (no allocator's arenas are).
    pub shared: u64,
}

/// Bookkeeping for the allocator analysis, kept as events are applied.
#[derive(Clone, Debug, Default)]
pub struct Patterns {
    /// First touches per (64 MiB-aligned region, thread): which threads use which arena.
    touches_by_region_tid: BTreeMap<(u64, u32), u64>,
    /// The run of first touches in progress (same region and thread), not yet in the map:
    /// most first touches come in runs, and this keeps the map off the per-fault path.
    touch_run: Option<((u64, u32), u64)>,
    /// Anonymous mappings still in place, by address: (length, whether `MAP_SHARED`).
    live_anon: BTreeMap<u64, (u64, bool)>,
    /// Anonymous mappings unmapped whole, by length.
    pub pairs: BTreeMap<u64, PairStats>,
    pub brk_grows: u64,
    pub brk_shrinks: u64,
}

impl Patterns {
    fn first_touch(&mut self, region: u64, tid: u32) {
        match &mut self.touch_run {
            Some((key, n)) if *key == (region, tid) => *n += 1,
            run => {
                if let Some((key, n)) = run.replace(((region, tid), 1)) {
                    *self.touches_by_region_tid.entry(key).or_default() += n;
                }
            }
        }
    }

    /// First touches in 64 MiB region `region` (address >> [`ARENA_SHIFT`]), by thread.
    pub fn touches_in_region(&self, region: u64) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = self
            .touches_by_region_tid
            .range((region, 0)..=(region, u32::MAX))
            .map(|((_, tid), n)| (*tid, *n))
            .collect();
        if let Some(((r, tid), n)) = self.touch_run
            && r == region
        {
            *out.entry(tid).or_default() += n;
        }
        out
    }
}

/// The 64 MiB (glibc `HEAP_MAX_SIZE`) region an address is in.
pub const ARENA_SHIFT: u32 = 26;

/// One traced process.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    pub space: AddressSpace,
    pub counts: Counts,
    pub exe: Option<String>,
    pub started_ns: u64,
    pub exited_ns: Option<u64>,
    pub patterns: Patterns,
    /// Live blocks as the allocator sees them (`--heap`).
    pub heap: LiveHeap,
    /// Memory by the user stack that asked for it (`--stacks`).
    pub sites: crate::stacks::sites::CallSites,
    /// When the map was last read again from `/proc` after lost events (0: never). A call
    /// that changed the map before then is in that reading: one that comes after it (held
    /// back for ordering, or from a CPU's batch) is counted, not applied again.
    pub resynced_ns: u64,
}

impl Process {
    pub(crate) fn new(pid: u32, space: AddressSpace, exe: Option<String>, ts: u64) -> Self {
        Self {
            pid,
            space,
            counts: Counts::default(),
            exe,
            started_ns: ts,
            exited_ns: None,
            patterns: Patterns::default(),
            heap: LiveHeap::default(),
            sites: Default::default(),
            resynced_ns: 0,
        }
    }
}

pub use crate::applied::Applied;

impl Process {
    /// A reading of its CPython arenas' pool headers (`--heap`), when it runs CPython, lives
    /// and has some.
    pub fn pymalloc_reading(&self, ts_ns: u64) -> Option<crate::heap::pymalloc::Reading> {
        if !self.heap.enabled || self.exited_ns.is_some() {
            return None;
        }
        crate::heap::pymalloc::read_process(
            self.pid,
            self.exe.as_deref(),
            &self.space,
            self.heap.arena_candidates(),
            self.heap.owned().map(|(s, e, _)| (s, e)),
            ts_ns,
        )
    }
}

/// Every traced process.
#[derive(Clone, Debug, Default)]
pub struct Session {
    procs: BTreeMap<u32, Process>,
    /// Processes that share another's memory (`CLONE_VM`: `vfork`, `posix_spawn`), until
    /// they exec or exit: child -> the process whose model holds that memory. Their memory
    /// events act on that model; their own stays empty.
    shared_vm: BTreeMap<u32, u32>,
    /// The user stacks the events name, by id.
    pub stacks: crate::stacks::StackTable,
}

impl Session {
    /// Starts tracking `pid` from `seed`.
    pub fn add(&mut self, pid: u32, seed: Seed, ts: u64, exe: Option<String>) {
        let mut space = AddressSpace::default();
        seed_space(&mut space, seed, ts);
        self.procs.insert(pid, Process::new(pid, space, exe, ts));
    }

    /// Replaces `pid`'s map after an exec.
    pub fn reseed(&mut self, pid: u32, seed: Seed, ts: u64) {
        if let Some(p) = self.procs.get_mut(&pid) {
            seed_space(&mut p.space, seed, ts);
        }
    }

    /// Reseeds `pid` from `/proc` after lost events (`seed` read now), and counts it.
    pub fn resync(&mut self, pid: u32, seed: Seed, ts: u64) {
        self.reseed(pid, seed, ts);
        if let Some(p) = self.procs.get_mut(&pid) {
            p.counts.resyncs += 1;
            p.resynced_ns = ts;
        }
    }

    /// A traced process.
    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.procs.get(&pid)
    }

    /// The process whose model holds `pid`'s memory: itself, or the one it shares it with.
    pub fn memory_owner(&self, pid: u32) -> u32 {
        self.shared_vm.get(&pid).copied().unwrap_or(pid)
    }

    /// The model of `pid`'s memory (shared memory included).
    pub fn space_of(&self, pid: u32) -> Option<&AddressSpace> {
        self.procs.get(&self.memory_owner(pid)).map(|p| &p.space)
    }

    /// Every traced process, by pid.
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.procs.values()
    }

    /// Allocator events were lost: every live process's live bytes may be wrong from now.
    pub fn heap_events_lost(&mut self) {
        for p in self.procs.values_mut().filter(|p| p.exited_ns.is_none()) {
            p.heap.lost_events();
        }
    }

    /// Marks `pid` exited at `ts_ns` without its exit event (the event was lost); returns
    /// whether it was alive until now.
    pub fn mark_gone(&mut self, pid: u32, ts_ns: u64) -> bool {
        match self.procs.get_mut(&pid) {
            Some(p) if p.exited_ns.is_none() => {
                p.exited_ns = Some(ts_ns);
                true
            }
            _ => false,
        }
    }

    /// Whether any traced process is still alive.
    pub fn any_alive(&self) -> bool {
        self.procs.values().any(|p| p.exited_ns.is_none())
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let applied = self.apply_to_model(event);
        let pid = match &applied {
            Applied::Syscall { pid, .. } => *pid,
            _ => event.pid(),
        };
        if let Some(p) = self.procs.get_mut(&pid) {
            p.sites.observe(event, &applied);
        }
        applied
    }

    fn apply_to_model(&mut self, event: &Event) -> Applied {
        match event {
            Event::Syscall(s) => self.syscall(s),
            Event::Fault(f) => self.fault(f),
            Event::Fork {
                ts_ns,
                pid,
                child,
                followed,
                shares_vm,
                ..
            } => {
                let owner = self.memory_owner(*pid);
                let Some(parent) = self.procs.get(&owner) else {
                    return Applied::Ignored;
                };
                if *followed {
                    // A child that shares the memory gets no model of its own until it execs.
                    let (space, heap) = if *shares_vm {
                        (AddressSpace::default(), Default::default())
                    } else {
                        (parent.space.fork(*ts_ns), parent.heap.fork())
                    };
                    let mut child_proc = Process::new(*child, space, parent.exe.clone(), *ts_ns);
                    child_proc.heap = heap;
                    self.procs.insert(*child, child_proc);
                    if *shares_vm {
                        self.shared_vm.insert(*child, owner);
                    }
                }
                Applied::Fork {
                    child: *child,
                    traced: *followed,
                    shares_vm: *shares_vm,
                }
            }
            Event::Exec {
                ts_ns,
                pid,
                filename,
                ..
            } => {
                let Some(p) = self.procs.get_mut(pid) else {
                    return Applied::Ignored;
                };
                // An exec gives a process that shared its parent's memory its own.
                self.shared_vm.remove(pid);
                p.space.clear(*ts_ns, crate::model::timeline::Cause::Exec);
                p.heap.exec();
                p.exe = Some(filename.clone());
                Applied::Exec
            }
            Event::Exit { ts_ns, pid, .. } => {
                let Some(p) = self.procs.get_mut(pid) else {
                    return Applied::Ignored;
                };
                p.exited_ns = Some(*ts_ns);
                self.shared_vm.remove(pid);
                Applied::Exit
            }
            // Opens only name files for later mmaps (see `run`); the model ignores them.
            Event::Open { .. } | Event::Join { .. } => Applied::Ignored,
            // Raw allocator records are paired into calls first (`heap::tracker`).
            Event::HeapRaw(_) => Applied::Ignored,
            Event::Heap(call) => match self.procs.get_mut(&self.memory_owner(call.pid)) {
                Some(p) => {
                    if let Some(def) = call.stack.and_then(|id| self.stacks.get(id)) {
                        p.heap.name_site(call.caller, def.id, || {
                            crate::stacks::sites::site_label(def)
                        });
                    }
                    Applied::Heap(p.heap.apply(call))
                }
                None => Applied::Ignored,
            },
            Event::Pymalloc(r) => match self.procs.get_mut(&r.pid) {
                Some(p) => {
                    p.heap.pymalloc = Some(r.clone());
                    Applied::Heap(HeapEffect {
                        kind: LiveKind::None,
                        live_bytes: p.heap.live_bytes(),
                    })
                }
                None => Applied::Ignored,
            },
            Event::HeapAttach {
                ts_ns,
                pid,
                allocator,
                late,
                ..
            } => match self.procs.get_mut(pid) {
                Some(p) => {
                    p.heap.attached(*allocator, *late, *ts_ns);
                    Applied::Heap(HeapEffect {
                        kind: LiveKind::None,
                        live_bytes: p.heap.live_bytes(),
                    })
                }
                None => Applied::Ignored,
            },
            Event::Collapse { ts_ns, pid, start } => {
                match self.procs.get_mut(&self.memory_owner(*pid)) {
                    Some(p) => Applied::Collapsed {
                        pages: p.space.collapse(*ts_ns, *start),
                    },
                    None => Applied::Ignored,
                }
            }
        }
    }

    fn syscall(&mut self, s: &SyscallRecord) -> Applied {
        // process_madvise acts on its target, which may be another process.
        let pid = match s.call {
            Syscall::ProcessMadvise => match s.resolved.target_pid {
                Some(t) if self.procs.contains_key(&t) => t,
                _ if self.procs.contains_key(&s.pid) => s.pid,
                _ => return Applied::Ignored,
            },
            Syscall::Openat => return Applied::Ignored,
            _ => s.pid,
        };
        let pid = self.memory_owner(pid);
        let Some(p) = self.procs.get_mut(&pid) else {
            return Applied::Ignored;
        };
        *p.counts.syscalls.entry(s.call.name()).or_default() += 1;
        if let Some(errno) = s.errno() {
            // What a failed populate made resident before it failed.
            if let Some(runs) = &s.resolved.resident {
                p.space.populate(s.ts_ns, runs);
            }
            *p.counts.failed.entry((s.call.name(), errno)).or_default() += 1;
            return Applied::Failed { errno };
        }
        if s.order_ns() < p.resynced_ns {
            // Its change is in the map read since (see `Process::resynced_ns`).
            return Applied::Syscall {
                pid,
                effect: Effect::default(),
            };
        }
        let call = s.mem();
        let ret = s.ret as u64;
        let ts = s.ts_ns;
        let space = &mut p.space;
        let effect = match call {
            MemCall::Brk { .. } => space.brk(ts, ret),
            MemCall::Mmap {
                len,
                prot,
                flags,
                offset,
                ..
            } => {
                let (backing, offset) = if map_anonymous(flags) {
                    (Backing::Anonymous, 0)
                } else {
                    let backing = Backing::File {
                        path: Arc::from(s.resolved.path.as_deref().unwrap_or("[unknown file]")),
                        inode: s.resolved.inode.unwrap_or(0),
                    };
                    (backing, offset)
                };
                let perms = Perms::from_prot(prot, map_shared(flags));
                space.mmap(ts, ret, len, perms, backing, offset)
            }
            MemCall::Munmap { addr, len } => space.munmap(ts, addr, len),
            MemCall::Mremap {
                addr,
                old_len,
                new_len,
                flags,
                ..
            } => space.mremap(ts, addr, old_len, new_len, flags, ret),
            MemCall::Mprotect { addr, len, prot }
            | MemCall::PkeyMprotect {
                addr, len, prot, ..
            } => space.mprotect(ts, addr, len, prot),
            MemCall::Madvise { addr, len, advice }
            | MemCall::ProcessMadvise {
                addr, len, advice, ..
            } => space.madvise(ts, addr, len, advice),
            MemCall::Shmat { shmid, shmflg, .. } => {
                let (size, key) = s.resolved.shm.unwrap_or((crate::model::PAGE_SIZE, 0));
                space.shmat(
                    ts,
                    ret,
                    size,
                    key,
                    shmid as u64,
                    shmflg & linux::SHM_RDONLY != 0,
                    shmflg & linux::SHM_EXEC != 0,
                )
            }
            MemCall::Shmdt { addr } => space.shmdt(ts, addr),
            MemCall::Mlock { addr, len } | MemCall::Mlock2 { addr, len, .. } => {
                space.lock(addr, len, true)
            }
            MemCall::Munlock { addr, len } => space.lock(addr, len, false),
            MemCall::Mlockall { flags } => space.lock_all(Some(flags)),
            MemCall::Munlockall => space.lock_all(None),
            MemCall::Openat { .. } => return Applied::Ignored,
        };
        let mut effect = effect;
        if let Some(runs) = &s.resolved.resident {
            effect.populated_pages = space.populate(ts, runs);
        }
        // Who made a mapping being unmapped (before the heap forgets it): munmaps only.
        let owner = (s.call == Syscall::Munmap && p.heap.enabled)
            .then(|| p.heap.owner_of(effect.start))
            .flatten();
        if p.heap.enabled {
            note_mapping(&mut p.heap, s, &effect);
        }
        let pat = &mut p.patterns;
        match (s.call, effect.kind) {
            (Syscall::Brk, EffectKind::Grown) => pat.brk_grows += 1,
            (Syscall::Brk, EffectKind::Shrunk) => pat.brk_shrinks += 1,
            (Syscall::Mmap, EffectKind::Created) if matches!(call, MemCall::Mmap { flags, .. } if map_anonymous(flags)) =>
            {
                let shared = matches!(call, MemCall::Mmap { flags, .. } if map_shared(flags));
                pat.live_anon
                    .insert(effect.start, (effect.end - effect.start, shared));
            }
            (Syscall::Munmap, EffectKind::Unmapped) => {
                let len = effect.end - effect.start;
                if let Some(&(_, shared)) =
                    pat.live_anon.get(&effect.start).filter(|(l, _)| *l == len)
                {
                    pat.live_anon.remove(&effect.start);
                    let pair = pat.pairs.entry(len).or_default();
                    pair.shared += u64::from(shared);
                    if pair.count == 0 {
                        pair.first_ns = ts;
                    }
                    pair.count += 1;
                    pair.last_ns = ts;
                    if let Some(a) = owner {
                        pair.in_allocator_calls += 1;
                        pair.by_glibc += u64::from(a == crate::heap::Allocator::Glibc);
                    }
                    pair.released_pages += effect.released_pages;
                }
            }
            _ => {}
        }
        Applied::Syscall { pid, effect }
    }

    fn fault(&mut self, f: &FaultRecord) -> Applied {
        let Some(p) = self.procs.get_mut(&self.memory_owner(f.pid)) else {
            return Applied::Ignored;
        };
        p.counts.faults += 1;
        let present = f
            .present()
            .unwrap_or_else(|| p.space.likely_present(f.address, f.write()));
        let effect = p.space.fault(f.ts_ns, f.address, f.write(), present);
        match effect.touch {
            Touch::First { kind, .. } => {
                p.counts.first_touches[kind as usize] += effect.pages;
                p.patterns.first_touch(f.address >> ARENA_SHIFT, f.tid);
            }
            Touch::Upgraded { .. } => p.counts.cow_upgrades += 1,
            Touch::Again => {}
        }
        if effect.vma_start.is_none() {
            p.counts.faults_outside += 1;
        }
        Applied::Fault(effect)
    }
}

/// Tells the live heap what a successful call did to the map: mappings an allocator may have
/// made (claimed when its call returns), ranges that are gone.
fn note_mapping(heap: &mut LiveHeap, s: &SyscallRecord, effect: &Effect) {
    let (start, end) = (effect.start, effect.end);
    match (s.call, effect.kind) {
        (Syscall::Mmap, EffectKind::Created | EffectKind::Replaced) => {
            heap.note_unmap(start, end);
            if matches!(s.mem(), MemCall::Mmap { flags, .. } if map_anonymous(flags)) {
                heap.note_mapping(s.tid, s.ts_ns, start, end, true);
            }
        }
        (Syscall::Mremap, EffectKind::Moved | EffectKind::Grown) => {
            if let (Some(from), MemCall::Mremap { old_len, .. }) = (effect.from, s.mem()) {
                heap.note_unmap(from, from.saturating_add(old_len));
            }
            heap.note_mapping(s.tid, s.ts_ns, start, end, false);
        }
        (Syscall::Mremap, EffectKind::Shrunk) | (Syscall::Munmap | Syscall::Shmdt, _) => {
            heap.note_unmap(start, end);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0x7f00_0000_0000;

    fn call(s: &mut Session, ts: u64, call: Syscall, args: [u64; 6], ret: i64) {
        s.apply(&Event::Syscall(SyscallRecord::at(
            ts, 7, 8, call, args, ret,
        )));
    }

    fn starts(s: &Session) -> Vec<u64> {
        s.space_of(7)
            .map(|sp| sp.vmas().map(|v| v.start).collect())
            .unwrap_or_default()
    }

    /// After lost events the map is read again at `ts`; a call older than that which comes
    /// afterwards (held back for ordering) is already in the reading, and applying it again
    /// would remove another thread's mapping that reused its range since.
    #[test]
    fn a_call_older_than_a_resync_is_counted_not_applied_again() {
        let mmap = [0, 4096, 3, 0x22, u64::MAX, 0];
        let mut s = Session::default();
        s.add(7, Seed::default(), 0, None);
        // The map as read at 100: thread 9 mapped A again after thread 8 had unmapped it.
        let mut kernel = Session::default();
        kernel.add(7, Seed::default(), 0, None);
        call(&mut kernel, 60, Syscall::Mmap, mmap, A as i64);
        let vmas: Vec<Vma> = kernel
            .space_of(7)
            .into_iter()
            .flat_map(|sp| sp.vmas().cloned())
            .collect();
        s.resync(
            7,
            Seed {
                vmas,
                ..Seed::default()
            },
            100,
        );
        assert_eq!(starts(&s), [A]);
        // Thread 8's munmap of A at 50 comes late: A stays.
        call(&mut s, 50, Syscall::Munmap, [A, 4096, 0, 0, 0, 0], 0);
        assert_eq!(starts(&s), [A], "a call older than the resync");
        assert_eq!(s.get(7).map(|p| p.counts.syscalls["munmap"]), Some(1));
        // A munmap after the resync applies.
        call(&mut s, 150, Syscall::Munmap, [A, 4096, 0, 0, 0, 0], 0);
        assert!(starts(&s).is_empty());
    }

    /// An allocator call carrying the id of a `stack` record (its call site, one frame) names
    /// the code that holds its blocks, function and line, wherever live bytes are told per
    /// call site; a call site seen without a stack keeps its module and offset.
    #[test]
    fn a_heap_call_with_a_stack_names_its_call_site() {
        use crate::{
            heap::{HeapCall, HeapFn},
            stacks::{Frame, StackDef},
        };
        let mut s = Session::default();
        s.add(7, Seed::default(), 0, None);
        s.stacks.insert(std::sync::Arc::new(StackDef {
            id: 3,
            frames: vec![Frame {
                addr: 0x40_1234,
                module: Some("/usr/bin/server".into()),
                offset: 0x1234,
                function: Some("make_nodes".into()),
                file: Some("/src/server.c".into()),
                line: Some(42),
                inlined: false,
            }],
        }));
        let malloc = |ts: u64, ptr: u64, caller: u64, stack: Option<u64>| {
            Event::Heap(HeapCall {
                tid: 8,
                caller,
                stack,
                ..HeapCall::at(ts, 7, HeapFn::Malloc, [100, 0, 0], ptr)
            })
        };
        s.apply(&malloc(10, 0x1000, 0x40_1234, Some(3)));
        s.apply(&malloc(11, 0x2000, 0x40_1234, Some(3)));
        s.apply(&malloc(12, 0x3000, 0x40_9999, None));
        let p = s.get(7).expect("the process");
        let sites: Vec<(Option<String>, u64)> = crate::heap::regions::live_sites(p)
            .into_iter()
            .map(|r| (r.site, r.blocks))
            .collect();
        assert_eq!(
            sites,
            [(Some("make_nodes (server.c:42)".into()), 2), (None, 1)]
        );
    }
}
