//! Typed events: decoded from ring-buffer bytes (live) or read from NDJSON (replay). Decoding
//! checks every length and decodes kinds with `TryFrom`, never by transmute.

use crate::{
    heap::{Allocator, HeapCall, HeapRaw},
    model::ResidentRun,
};
use tracer_common::{
    CommitEvent, EXEC_FILENAME_LEN, EventHeader, EventKind, ExecEvent, ExitEvent, FAULT_BATCH_LEN,
    FAULT_ERROR_UNKNOWN, FaultBatchHead, FaultEvent, ForkEvent, HEAP_BATCH_LEN, HeapEvent,
    JoinEvent, OpenEvent, PF_PROT, PF_WRITE, Syscall, SyscallEvent,
};

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than the {need} bytes its kind needs")]
    Short { got: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown syscall number {0}")]
    UnknownSyscall(u32),
    #[error("fault batch of {0} faults (at most {FAULT_BATCH_LEN})")]
    BatchCount(u32),
    #[error("a fault batch holds a record of kind {0}")]
    BatchKind(u32),
    #[error("allocator batch of {0} events (at most {HEAP_BATCH_LEN})")]
    HeapBatchCount(u32),
    #[error("an allocator batch holds a record of kind {0}")]
    HeapBatchKind(u32),
}

/// `clone`'s flag for a child that shares its parent's memory.
const CLONE_VM: u64 = 0x100;

/// Data the daemon resolved from `/proc` when it saw a syscall (kept in recordings so that a
/// replay needs nothing but the file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The mapped file's path (`mmap` of a file).
    pub path: Option<String>,
    /// The mapped file's device (`major:minor` in hex) and inode.
    pub dev: Option<String>,
    pub inode: Option<u64>,
    /// The System V segment's size and key (`shmat`).
    pub shm: Option<(u64, u64)>,
    /// The target process of `process_madvise`.
    pub target_pid: Option<u32>,
    /// Pages the call made resident without a fault (populate, lock), read from
    /// `/proc/PID/pagemap` right after it.
    pub resident: Option<Vec<ResidentRun>>,
    /// The caller's user stack (`--stacks`): the id of its `stack` record.
    pub stack_id: Option<u64>,
}

/// A memory syscall with its arguments and return value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallRecord {
    pub ts_ns: u64,
    pub enter_ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub call: Syscall,
    pub args: [u64; 6],
    pub ret: i64,
    pub extra: [u64; 2],
    /// Where the call's change is ordered, when the kernel told (see [`Commit`]); else it is
    /// ordered at its exit, `ts_ns`.
    pub commit_ts_ns: Option<u64>,
    pub resolved: Resolved,
}

impl SyscallRecord {
    /// A call of `pid`'s thread `tid` that entered and returned `ret` at `ts_ns`, ordered at
    /// its exit, with nothing looked up in `/proc` (tests, benchmarks, synthetic input).
    pub fn at(ts_ns: u64, pid: u32, tid: u32, call: Syscall, args: [u64; 6], ret: i64) -> Self {
        Self {
            ts_ns,
            enter_ts_ns: ts_ns,
            pid,
            tid,
            call,
            args,
            ret,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Resolved::default(),
        }
    }

    /// Where the call is ordered among the process's events: its commit, else its exit.
    pub fn order_ns(&self) -> u64 {
        self.commit_ts_ns.unwrap_or(self.ts_ns)
    }

    /// The errno when the call failed. `brk` never fails this way: it returns the old break.
    pub fn errno(&self) -> Option<i32> {
        (self.call != Syscall::Brk && (-4095..0).contains(&self.ret)).then(|| (-self.ret) as i32)
    }
}

/// A user page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub address: u64,
    pub ip: u64,
    /// The x86 error code, or None when the backend cannot know it.
    pub error_code: Option<u32>,
    /// Without an error code (perf-event backend): whether the access wrote, judged from the
    /// page the kernel mapped for it (`crate::fault_access`); None when unknown.
    pub write_from_page: Option<bool>,
    /// The faulting thread's user stack (`--fault-stacks`): the id of its `stack` record.
    pub stack_id: Option<u64>,
}

impl FaultRecord {
    /// Whether the access was a write (None: unknown).
    pub fn write(&self) -> Option<bool> {
        self.error_code
            .map(|c| c & PF_WRITE != 0)
            .or(self.write_from_page)
    }

    /// Whether the page was present (a protection fault); None when the backend cannot tell.
    pub fn present(&self) -> Option<bool> {
        self.error_code.map(|c| c & PF_PROT != 0)
    }
}

/// Every event vmatrace handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Syscall(SyscallRecord),
    Fault(FaultRecord),
    /// `pid` created process `child`; `followed` when the child is traced too; `shares_vm`
    /// when the child shares its memory (`CLONE_VM`: `vfork`, `posix_spawn`) instead of
    /// getting a copy.
    Fork {
        ts_ns: u64,
        pid: u32,
        tid: u32,
        child: u32,
        followed: bool,
        shares_vm: bool,
    },
    /// `pid` exec'd `filename`.
    Exec {
        ts_ns: u64,
        pid: u32,
        tid: u32,
        filename: String,
    },
    /// `pid`, a process of the traced cgroup, was seen by the programs and is traced from now
    /// (`--cgroup`): the daemon seeds it. Live only, never written.
    Join {
        ts_ns: u64,
        pid: u32,
        tid: u32,
    },
    /// The last thread of `pid` exited.
    Exit {
        ts_ns: u64,
        pid: u32,
        tid: u32,
    },
    /// `pid` opened `path` as `fd` (used to name files mapped later).
    Open {
        ts_ns: u64,
        pid: u32,
        tid: u32,
        fd: i32,
        path: String,
    },
    /// An allocator function's entry or return as the kernel reported it (`--heap`; live
    /// only: paired into [`Event::Heap`] before the session sees it).
    HeapRaw(HeapRaw),
    /// One allocator call (`--heap`).
    Heap(HeapCall),
    /// The allocator probes cover `pid`'s `allocator` (mapped from `path`) from now; `late`:
    /// the process had it mapped before the probes were attached, so calls were missed.
    HeapAttach {
        ts_ns: u64,
        pid: u32,
        path: String,
        allocator: Allocator,
        late: bool,
    },
    /// CPython's object arenas as their pool headers said when the daemon read them
    /// (`--heap`).
    Pymalloc(crate::heap::pymalloc::Reading),
    /// The kernel made the 2 MiB block at `start` of `pid` one huge page without a fault
    /// (khugepaged, or `MADV_COLLAPSE`): seen by the daemon in pagemap, not sent by the
    /// kernel programs.
    Collapse {
        ts_ns: u64,
        pid: u32,
        start: u64,
    },
}

impl Event {
    /// Where the event is ordered: its time, but a syscall's commit where it has one.
    pub fn order_ns(&self) -> u64 {
        match self {
            Self::Syscall(s) => s.order_ns(),
            other => other.ts_ns(),
        }
    }

    /// The event's time.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Syscall(s) => s.ts_ns,
            Self::Fault(f) => f.ts_ns,
            Self::Fork { ts_ns, .. }
            | Self::Exec { ts_ns, .. }
            | Self::Exit { ts_ns, .. }
            | Self::Join { ts_ns, .. }
            | Self::Open { ts_ns, .. }
            | Self::HeapAttach { ts_ns, .. }
            | Self::Collapse { ts_ns, .. } => *ts_ns,
            Self::HeapRaw(h) => h.ts_ns,
            Self::Heap(h) => h.ts_ns,
            Self::Pymalloc(r) => r.ts_ns,
        }
    }

    /// The thread the event came from.
    pub fn tid(&self) -> u32 {
        match self {
            Self::Syscall(s) => s.tid,
            Self::Fault(f) => f.tid,
            Self::Fork { tid, .. }
            | Self::Exec { tid, .. }
            | Self::Exit { tid, .. }
            | Self::Join { tid, .. }
            | Self::Open { tid, .. } => *tid,
            Self::HeapRaw(h) => h.tid,
            Self::Heap(h) => h.tid,
            // Not a thread's event: the daemon's.
            Self::HeapAttach { pid, .. } => *pid,
            Self::Pymalloc(r) => r.pid,
            Self::Collapse { .. } => 0,
        }
    }

    /// The process the event belongs to.
    pub fn pid(&self) -> u32 {
        match self {
            Self::Syscall(s) => s.pid,
            Self::Fault(f) => f.pid,
            Self::Fork { pid, .. }
            | Self::Exec { pid, .. }
            | Self::Exit { pid, .. }
            | Self::Join { pid, .. }
            | Self::Open { pid, .. }
            | Self::HeapAttach { pid, .. }
            | Self::Collapse { pid, .. } => *pid,
            Self::HeapRaw(h) => h.pid,
            Self::Heap(h) => h.pid,
            Self::Pymalloc(r) => r.pid,
        }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            got: bytes.len(),
            need,
        });
    }
    // SAFETY: the length was checked; T is a plain-old-data ABI type read unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The name before the first NUL, in its reversible text form ([`crate::name`]).
fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    crate::name::from_bytes(&bytes[..len])
}

/// Which batches a watermark is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Page faults ([`EventKind::FaultBatch`]).
    Faults = 0,
    /// Allocator events ([`EventKind::HeapBatch`]).
    Heap = 1,
}

/// A CPU's promise, carried by each batch: every event of its lane it took up to `ts_ns` has
/// been written to the ring (see [`crate::order`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    pub lane: Lane,
    pub cpu: u32,
    pub ts_ns: u64,
}

/// A traced thread's memory syscall reached the point where its change is ordered
/// ([`EventKind::Commit`]): its record, still to come, goes at `ts_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub pid: u32,
    pub tid: u32,
    pub ts_ns: u64,
}

/// What a ring-buffer record tells the reorder besides its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A batch's watermark.
    Watermark(Watermark),
    /// A syscall's commit.
    Commit(Commit),
}

/// Decodes one ring-buffer record into `out`: one event, or every fault of a batch (with the
/// batch's watermark), or nothing but a commit. Nothing is added when the record is bad.
pub fn decode_into(bytes: &[u8], out: &mut Vec<Event>) -> Result<Option<Mark>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    if header.kind == EventKind::HeapBatch as u32 {
        return Ok(decode_heap_batch(bytes, out)?.map(Mark::Watermark));
    }
    if header.kind == EventKind::Commit as u32 {
        let e: CommitEvent = read(bytes)?;
        return Ok(Some(Mark::Commit(Commit {
            pid: e.header.tgid,
            tid: e.header.tid,
            ts_ns: e.header.ts_ns,
        })));
    }
    if header.kind != EventKind::FaultBatch as u32 {
        out.push(decode(bytes)?);
        return Ok(None);
    }
    let head: FaultBatchHead = read(bytes)?;
    let count = header.detail as usize;
    if count > FAULT_BATCH_LEN {
        return Err(DecodeError::BatchCount(header.detail));
    }
    let start = size_of::<FaultBatchHead>();
    let need = start + count * size_of::<FaultEvent>();
    let faults = bytes.get(start..need).ok_or(DecodeError::Short {
        got: bytes.len(),
        need,
    })?;
    let first = out.len();
    for one in faults.chunks_exact(size_of::<FaultEvent>()) {
        match decode(one) {
            Ok(ev @ Event::Fault(_)) => out.push(ev),
            _ => {
                out.truncate(first);
                let kind = read::<EventHeader>(one).map_or(0, |h| h.kind);
                return Err(DecodeError::BatchKind(kind));
            }
        }
    }
    Ok(Some(Mark::Watermark(Watermark {
        lane: Lane::Faults,
        cpu: head.cpu,
        ts_ns: header.ts_ns,
    })))
}

/// Every allocator event of a batch, and the batch's watermark.
fn decode_heap_batch(bytes: &[u8], out: &mut Vec<Event>) -> Result<Option<Watermark>, DecodeError> {
    let head: FaultBatchHead = read(bytes)?;
    let count = head.header.detail as usize;
    if count > HEAP_BATCH_LEN {
        return Err(DecodeError::HeapBatchCount(head.header.detail));
    }
    let start = size_of::<FaultBatchHead>();
    let need = start + count * size_of::<HeapEvent>();
    let events = bytes.get(start..need).ok_or(DecodeError::Short {
        got: bytes.len(),
        need,
    })?;
    let first = out.len();
    for one in events.chunks_exact(size_of::<HeapEvent>()) {
        match decode(one) {
            Ok(ev @ Event::HeapRaw(_)) => out.push(ev),
            _ => {
                out.truncate(first);
                let kind = read::<EventHeader>(one).map_or(0, |h| h.kind);
                return Err(DecodeError::HeapBatchKind(kind));
            }
        }
    }
    Ok(Some(Watermark {
        lane: Lane::Heap,
        cpu: head.cpu,
        ts_ns: head.header.ts_ns,
    }))
}

/// How many events one ring-buffer record holds (the faults or allocator events of a batch, none
/// for a stack, else one), from its header alone: for records counted without being handled.
pub fn events_in(bytes: &[u8]) -> Result<u64, DecodeError> {
    let header: EventHeader = read(bytes)?;
    Ok(if header.kind == EventKind::FaultBatch as u32 {
        u64::from(header.detail.min(FAULT_BATCH_LEN as u32))
    } else if header.kind == EventKind::HeapBatch as u32 {
        u64::from(header.detail.min(HEAP_BATCH_LEN as u32))
    } else if header.kind == EventKind::Stack as u32
        || header.kind == EventKind::KnownStack as u32
        || header.kind == EventKind::PyStack as u32
        || header.kind == EventKind::PyCode as u32
        || header.kind == EventKind::Commit as u32
        || header.kind == EventKind::HeapStack as u32
    {
        // A stack belongs to the event after it; a commit to a syscall's record.
        0
    } else {
        1
    })
}

/// Decodes one ring-buffer record that is a single event (not a [`EventKind::FaultBatch`]).
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes)?;
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    let (pid, tid, ts_ns) = (header.tgid, header.tid, header.ts_ns);
    Ok(match kind {
        EventKind::Syscall => {
            let e: SyscallEvent = read(bytes)?;
            let call = Syscall::try_from(header.detail).map_err(DecodeError::UnknownSyscall)?;
            Event::Syscall(SyscallRecord {
                ts_ns,
                enter_ts_ns: e.enter_ts_ns,
                pid,
                tid,
                call,
                args: e.args,
                ret: e.ret,
                extra: e.extra,
                commit_ts_ns: (e.commit_ts_ns != 0).then_some(e.commit_ts_ns),
                resolved: Resolved::default(),
            })
        }
        EventKind::Fault => {
            let e: FaultEvent = read(bytes)?;
            Event::Fault(FaultRecord {
                ts_ns,
                pid,
                tid,
                address: e.address,
                ip: e.ip,
                error_code: (header.detail != FAULT_ERROR_UNKNOWN).then_some(header.detail),
                write_from_page: None,
                stack_id: None,
            })
        }
        EventKind::Fork => {
            let e: ForkEvent = read(bytes)?;
            Event::Fork {
                ts_ns,
                pid,
                tid,
                child: e.child_pid,
                followed: e.followed != 0,
                shares_vm: e.clone_flags & CLONE_VM != 0,
            }
        }
        EventKind::Exec => {
            let e: ExecEvent = read(bytes)?;
            Event::Exec {
                ts_ns,
                pid,
                tid,
                filename: c_string(&e.filename[..EXEC_FILENAME_LEN]),
            }
        }
        EventKind::Exit => {
            let _: ExitEvent = read(bytes)?;
            Event::Exit { ts_ns, pid, tid }
        }
        EventKind::Join => {
            let _: JoinEvent = read(bytes)?;
            Event::Join { ts_ns, pid, tid }
        }
        EventKind::FaultBatch
        | EventKind::Stack
        | EventKind::KnownStack
        | EventKind::PyStack
        | EventKind::PyCode
        | EventKind::Commit
        | EventKind::HeapStack => {
            return Err(DecodeError::BatchKind(header.kind));
        }
        EventKind::HeapBatch => return Err(DecodeError::HeapBatchKind(header.kind)),
        EventKind::Heap => {
            let e: HeapEvent = read(bytes)?;
            Event::HeapRaw(HeapRaw::from_event(&e))
        }
        EventKind::Open => {
            let e: OpenEvent = read(bytes)?;
            Event::Open {
                ts_ns,
                pid,
                tid,
                fd: header.detail as i32,
                path: c_string(&e.path),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over plain-old-data ABI types.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_a_syscall() {
        let e = SyscallEvent {
            header: EventHeader {
                kind: EventKind::Syscall as u32,
                tgid: 10,
                tid: 11,
                detail: Syscall::Mmap as u32,
                ts_ns: 99,
            },
            enter_ts_ns: 98,
            args: [0, 4096, 3, 0x22, u64::MAX, 0],
            ret: 0x7f00_0000_0000,
            extra: [0; 2],
            commit_ts_ns: 0,
        };
        let Event::Syscall(s) = decode(&bytes_of(&e)).expect("decodes") else {
            panic!("not a syscall")
        };
        assert_eq!(
            (s.pid, s.tid, s.call, s.ret),
            (10, 11, Syscall::Mmap, 0x7f00_0000_0000)
        );
        assert_eq!(s.errno(), None);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(matches!(decode(&[0u8; 10]), Err(DecodeError::Short { .. })));
        let h = EventHeader {
            kind: 77,
            ..EventHeader::default()
        };
        assert_eq!(decode(&bytes_of(&h)), Err(DecodeError::UnknownKind(77)));
        let h = EventHeader {
            kind: EventKind::Syscall as u32,
            ..EventHeader::default()
        };
        assert!(matches!(
            decode(&bytes_of(&h)),
            Err(DecodeError::Short { .. })
        ));
    }

    fn batch_of(addresses: &[u64]) -> Vec<u8> {
        let mut bytes = bytes_of(&FaultBatchHead {
            header: EventHeader {
                kind: EventKind::FaultBatch as u32,
                detail: addresses.len() as u32,
                ts_ns: 500,
                ..EventHeader::default()
            },
            cpu: 3,
            _pad: 0,
        });
        for (i, &address) in addresses.iter().enumerate() {
            bytes.extend(bytes_of(&FaultEvent {
                header: EventHeader {
                    kind: EventKind::Fault as u32,
                    tgid: 7,
                    tid: 8,
                    detail: PF_WRITE,
                    ts_ns: 100 + i as u64,
                },
                address,
                ip: 1,
            }));
        }
        bytes
    }

    #[test]
    fn a_commit_is_a_mark_and_its_syscall_is_ordered_there() {
        let commit = CommitEvent {
            header: EventHeader::new(EventKind::Commit, 10, 11, Syscall::Munmap as u32, 50),
        };
        let mut out = Vec::new();
        let mark = decode_into(&bytes_of(&commit), &mut out).expect("decodes");
        assert_eq!(
            mark,
            Some(Mark::Commit(Commit {
                pid: 10,
                tid: 11,
                ts_ns: 50
            }))
        );
        assert!(out.is_empty());
        assert_eq!(events_in(&bytes_of(&commit)).ok(), Some(0));
        let e = SyscallEvent {
            header: EventHeader::new(EventKind::Syscall, 10, 11, Syscall::Munmap as u32, 60),
            commit_ts_ns: 50,
            ..SyscallEvent::default()
        };
        let ev = decode(&bytes_of(&e)).expect("decodes");
        assert_eq!((ev.ts_ns(), ev.order_ns()), (60, 50));
    }

    #[test]
    fn decodes_a_fault_batch_and_its_watermark() {
        let mut out = Vec::new();
        let w = decode_into(&batch_of(&[0x1000, 0x2000]), &mut out).expect("decodes");
        assert_eq!(
            w,
            Some(Mark::Watermark(Watermark {
                lane: Lane::Faults,
                cpu: 3,
                ts_ns: 500
            }))
        );
        let faults: Vec<_> = out
            .iter()
            .map(|e| match e {
                Event::Fault(f) => (f.pid, f.tid, f.address, f.ts_ns, f.write()),
                other => panic!("not a fault: {other:?}"),
            })
            .collect();
        assert_eq!(
            faults,
            [
                (7, 8, 0x1000, 100, Some(true)),
                (7, 8, 0x2000, 101, Some(true))
            ]
        );
        // An empty batch is a watermark alone.
        out.clear();
        let w = decode_into(&batch_of(&[]), &mut out).expect("decodes");
        assert!(matches!(
            w,
            Some(Mark::Watermark(Watermark { ts_ns: 500, .. }))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn rejects_bad_fault_batches_whole() {
        let mut out = Vec::new();
        // Cut inside its second fault.
        let mut bytes = batch_of(&[0x1000, 0x2000]);
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::Short { .. })
        ));
        // More faults than a batch holds.
        let mut bytes = batch_of(&[]);
        bytes[12..16].copy_from_slice(&(FAULT_BATCH_LEN as u32 + 1).to_ne_bytes());
        assert!(matches!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::BatchCount(_))
        ));
        // Something other than a fault inside.
        let mut bytes = batch_of(&[0x1000, 0x2000]);
        let second = size_of::<FaultBatchHead>() + size_of::<FaultEvent>();
        bytes[second..second + 4].copy_from_slice(&(EventKind::Exit as u32).to_ne_bytes());
        assert_eq!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::BatchKind(EventKind::Exit as u32))
        );
        assert!(out.is_empty(), "nothing of a bad batch is kept");
        // A batch is never decoded as a single event.
        assert!(decode(&batch_of(&[0x1000])).is_err());
    }

    fn heap_batch_of(n: usize) -> Vec<u8> {
        let mut bytes = bytes_of(&FaultBatchHead {
            header: EventHeader {
                kind: EventKind::HeapBatch as u32,
                detail: n as u32,
                ts_ns: 900,
                ..EventHeader::default()
            },
            cpu: 1,
            _pad: 0,
        });
        for i in 0..n {
            bytes.extend(bytes_of(&HeapEvent {
                header: EventHeader {
                    kind: EventKind::Heap as u32,
                    tgid: 7,
                    tid: 9,
                    detail: if i % 2 == 1 {
                        tracer_common::HEAP_RETURN | tracer_common::HEAP_CHUNK
                    } else {
                        0
                    },
                    ts_ns: 800 + i as u64,
                },
                ip: 0x7000,
                sp: 0x9000,
                args: [100, 0xa0, 0, 113],
            }));
        }
        bytes
    }

    #[test]
    fn decodes_an_allocator_batch_as_a_lane_of_its_own() {
        let mut out = Vec::new();
        let w = decode_into(&heap_batch_of(2), &mut out).expect("decodes");
        assert_eq!(
            w,
            Some(Mark::Watermark(Watermark {
                lane: Lane::Heap,
                cpu: 1,
                ts_ns: 900
            }))
        );
        let raws: Vec<(bool, bool, u64)> = out
            .iter()
            .map(|e| match e {
                Event::HeapRaw(h) => (h.ret, h.chunk, h.ts_ns),
                other => panic!("not an allocator event: {other:?}"),
            })
            .collect();
        assert_eq!(raws, [(false, false, 800), (true, true, 801)]);
        out.clear();
        let mut bytes = heap_batch_of(2);
        bytes.truncate(bytes.len() - 8);
        assert!(matches!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::Short { .. })
        ));
        let mut bytes = heap_batch_of(0);
        bytes[12..16].copy_from_slice(&(HEAP_BATCH_LEN as u32 + 1).to_ne_bytes());
        assert!(matches!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::HeapBatchCount(_))
        ));
        let mut bytes = heap_batch_of(1);
        bytes[32..36].copy_from_slice(&(EventKind::Fault as u32).to_ne_bytes());
        assert!(matches!(
            decode_into(&bytes, &mut out),
            Err(DecodeError::HeapBatchKind(_))
        ));
        assert!(out.is_empty());
        // One event alone (written directly when the batch was busy).
        let single = &heap_batch_of(1)[32..];
        assert!(matches!(decode(single), Ok(Event::HeapRaw(_))));
    }

    #[test]
    fn failed_calls_carry_errno() {
        let mut s = SyscallRecord {
            ts_ns: 0,
            enter_ts_ns: 0,
            pid: 1,
            tid: 1,
            call: Syscall::Mmap,
            args: [0; 6],
            ret: -12,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Resolved::default(),
        };
        assert_eq!(s.errno(), Some(12));
        s.call = Syscall::Brk;
        assert_eq!(s.errno(), None);
    }
}
