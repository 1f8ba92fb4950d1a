//! Replay: read a recording (NDJSON or binary, through [`crate::recording`]) back into typed
//! events and feed the same session and sinks as a live run, so that live and replay cannot
//! disagree.

use std::{
    io::{self, BufRead},
    path::Path,
    sync::Arc,
};

use serde_json::Value;

use crate::{
    analysis::Limits,
    call::MemCall,
    event::{Event, SyscallRecord},
    heap::record::{AttachJson, HeapJson},
    model::{
        Backing, ForkAdvice, PAGE_SIZE, Perms, ResidentRun, ThpAdvice, ThpPolicy, TouchKind, Vma,
    },
    output::{
        LossSummary, Meta, Sink, SnapshotReason,
        process_records::{
            CollapseJson, ExecJson, ExitJson, ForkJson, MetaJson, SnapshotJson, ThpJson,
        },
        records::{FaultJson, SCHEMA_VERSION, SyscallJson},
        report::{VmaRow, summarize},
        touch_runs::TouchesRecord,
        typed::{RecordType, TypeOf, type_of, typed},
    },
    recording::{Position, Records},
    session::{Seed, Session},
    stacks::StackDef,
};

pub use crate::recording::MAX_LINE;

/// Errors reading a recording; each names the line.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}")]
    Open { path: String, source: io::Error },
    #[error("{path} is empty: nothing to replay")]
    Empty { path: String },
    #[error("{path}{at}: {what}")]
    Bad {
        path: String,
        at: Position,
        what: String,
    },
    #[error("writing output")]
    Write(#[source] io::Error),
}

/// The end of the largest user address space (x86-64 with five-level page tables; arm64's is
/// smaller). No VMA goes past it except the x86-64 `[vsyscall]` page.
pub const USER_ADDRESS_END: u64 = 1 << 57;

/// The most resident memory all the seed and exec snapshots of one recording may list
/// (256 GiB): the model keeps about 16 bytes per resident 4 KiB page, so this bounds replay's
/// memory for seeds at about 1 GiB, where a hostile seed (`[0, 2^47)` resident) would ask for
/// 512 GiB.
pub const MAX_RESIDENT_BYTES: u64 = 1 << 38;

/// The most frames a `stack` record may have (vmatrace writes at most 128 addresses, each
/// with its inlined functions).
pub const MAX_STACK_FRAMES: usize = 4096;

/// What one line of a recording holds.
pub enum Record {
    Meta {
        version: u64,
        limits: Limits,
        /// The recording's wall-clock anchor (none in recordings made before it was written).
        clock: Option<crate::clock::Anchor>,
    },
    Seed {
        pid: u32,
        ts_ns: u64,
        reason: SnapshotReason,
        seed: Seed,
        exe: Option<String>,
    },
    Snapshot {
        pid: u32,
        ts_ns: u64,
        reason: SnapshotReason,
    },
    Event(Event),
    /// A run of first touches, one fault per page.
    Touches(TouchesRecord),
    /// A unique user stack, defined before the records that name it.
    Stack(StackDef),
    Lost(LossSummary),
    /// Summary, drift and other records that replay recomputes or ignores.
    Other,
}

/// The VMA a snapshot's row describes, checked: page-aligned, not empty, inside the user
/// address space.
fn vma_of(row: &VmaRow) -> Result<Vma, String> {
    let perms = Perms::parse(&row.perms)
        .ok_or_else(|| format!("bad perms '{}'", crate::name::shown(&row.perms)))?;
    let path = row.path.as_deref();
    let backing = match (row.kind.as_str(), path) {
        ("heap", _) => Backing::Heap,
        ("stack", _) => Backing::Stack,
        ("anon", _) => Backing::Anonymous,
        ("shm", Some(p)) => Backing::Shm {
            key: p
                .get(5..13)
                .and_then(|k| u64::from_str_radix(k, 16).ok())
                .unwrap_or(0),
            shmid: row.inode,
        },
        ("special", Some(p)) => Backing::Special(Arc::from(p)),
        ("file", Some(p)) => Backing::File {
            path: Arc::from(p),
            inode: row.inode,
        },
        (k, _) => return Err(format!("unknown vma kind '{k}'")),
    };
    let (start, end) = (row.start, row.end);
    if end <= start {
        return Err(format!("VMA {start:#x}-{end:#x} ends before it starts"));
    }
    if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
        return Err(format!("VMA {start:#x}-{end:#x} is not page-aligned"));
    }
    let vsyscall =
        matches!(&backing, Backing::Special(n) if &**n == "[vsyscall]") && end - start == PAGE_SIZE;
    if end > USER_ADDRESS_END && !vsyscall {
        return Err(format!(
            "VMA {start:#x}-{end:#x} goes past the end of any user address space ({USER_ADDRESS_END:#x})"
        ));
    }
    let advice = row.fork_advice.as_deref().unwrap_or("");
    Ok(Vma {
        start,
        end,
        perms,
        offset: row.offset,
        backing,
        created_ns: row.created_ns,
        thp: ThpAdvice::parse(row.thp_advice.as_deref()),
        fork: ForkAdvice {
            dont_copy: advice.split(',').any(|a| a == "dontfork"),
            wipe: advice.split(',').any(|a| a == "wipeonfork"),
        },
        anon_vma: row.anon_vma,
    })
}

/// Checks the pages a seed snapshot (or a call) lists as resident: each run is page-aligned,
/// in address order, and inside the snapshot's VMAs (`vmas`, in address order, without gaps
/// under the run: a run may cross from one VMA into the next).
fn check_resident(runs: &[ResidentRun], vmas: &[Vma]) -> Result<(), String> {
    let mut last_end = 0;
    for &ResidentRun { start, end, .. } in runs {
        if end <= start || start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 || start < last_end {
            return Err(format!(
                "resident run {start:#x}-{end:#x} is empty, not page-aligned or out of order"
            ));
        }
        last_end = end;
        // Walk the VMAs from the one holding `start` until `end` is covered.
        let mut i = vmas.partition_point(|m| m.end <= start);
        let mut covered = start;
        while covered < end {
            match vmas.get(i) {
                Some(m) if m.start <= covered => covered = m.end,
                _ => {
                    return Err(format!(
                        "resident run {start:#x}-{end:#x} goes beyond its VMA (nothing mapped at {covered:#x})"
                    ));
                }
            }
            i += 1;
        }
    }
    Ok(())
}

/// The seed's VMAs cut where the rows say several mappings were merged (`parts`): the live
/// run seeded each of those apart, one mapping id each, and so does the replay, so that the
/// ids given after are the same. Parts that are not inside their row are ignored.
fn split_parts(rows: &[VmaRow], vmas: Vec<Vma>) -> Vec<Vma> {
    let mut out = Vec::with_capacity(vmas.len());
    for (v, row) in vmas.into_iter().zip(rows) {
        let parts: Vec<(u64, u64)> = row
            .parts
            .iter()
            .flatten()
            .map(|&[s, e, _]| (s, e))
            .collect();
        let whole = parts.first().is_some_and(|p| p.0 == v.start)
            && parts.last().is_some_and(|p| p.1 == v.end)
            && parts
                .windows(2)
                .all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1)
            && parts.iter().all(|p| p.0 < p.1 && p.0 % PAGE_SIZE == 0);
        if parts.len() > 1 && whole {
            out.extend(parts.iter().map(|&(s, e)| v.slice(s, e)));
        } else {
            out.push(v);
        }
    }
    out
}

/// One VMA over the whole user address space, for checks that need no finer map.
fn user_space() -> [Vma; 1] {
    [Vma {
        start: 0,
        end: USER_ADDRESS_END,
        perms: Perms::default(),
        offset: 0,
        backing: Backing::Anonymous,
        created_ns: 0,
        thp: ThpAdvice::Default,
        fork: ForkAdvice::default(),
        anon_vma: false,
    }]
}

/// Bytes of memory that `runs` list as resident.
pub fn resident_bytes(runs: &[ResidentRun]) -> u64 {
    runs.iter().map(|r| r.end - r.start).sum()
}

/// The huge page policy of a seed snapshot (off when absent).
fn thp_of(thp: &ThpJson) -> ThpPolicy {
    let pages = |kib: &[u64]| -> Vec<u64> { kib.iter().map(|k| k * 1024 / PAGE_SIZE).collect() };
    ThpPolicy {
        always: pages(&thp.always_kib),
        madvise: pages(&thp.madvise_kib),
        huge_zero_page: thp.huge_zero_page,
        zero_write_huge: thp.zero_write_huge,
    }
}

/// The resident runs of a record, as read (checked by [`check_resident`]).
fn runs_of(runs: Option<Vec<(u64, u64, TouchKind)>>) -> Vec<ResidentRun> {
    runs.into_iter()
        .flatten()
        .map(|(start, end, kind)| ResidentRun { start, end, kind })
        .collect()
}

/// Whether `[start, start + len)` (the length rounded up to pages, as the kernel does) lies in
/// the user address space.
fn in_user_space(start: u64, len: u64) -> bool {
    crate::model::vma::page_align_up(len)
        .checked_add(start)
        .is_some_and(|end| end <= USER_ADDRESS_END)
}

/// A successful call can only have named ranges inside the user address space (the kernel
/// refuses the others), and a file offset that does not wrap: a recording that says otherwise
/// was not written by vmatrace.
fn check_ranges(s: &SyscallRecord) -> Result<(), String> {
    if s.errno().is_some() {
        return Ok(());
    }
    let ret = s.ret as u64;
    let ranges: &[(u64, u64)] = match s.mem() {
        MemCall::Brk { .. } | MemCall::Shmdt { .. } => &[(ret, 0)],
        MemCall::Mmap { len, offset, .. }
            if crate::model::vma::page_align_up(len)
                .checked_add(offset)
                .is_none_or(|e| e > i64::MAX as u64) =>
        {
            return Err(format!(
                "mmap of {len:#x} bytes at file offset {offset:#x} goes past the largest file offset"
            ));
        }
        MemCall::Mmap { len, .. } => &[(ret, len)],
        MemCall::Munmap { addr, len }
        | MemCall::Mprotect { addr, len, .. }
        | MemCall::PkeyMprotect { addr, len, .. }
        | MemCall::Madvise { addr, len, .. }
        | MemCall::ProcessMadvise { addr, len, .. }
        | MemCall::Mlock { addr, len }
        | MemCall::Mlock2 { addr, len, .. }
        | MemCall::Munlock { addr, len } => &[(addr, len)],
        MemCall::Mremap {
            addr,
            old_len,
            new_len,
            ..
        } => &[(addr, old_len), (ret, new_len)],
        MemCall::Shmat { .. } => &[(ret, s.resolved.shm.map_or(0, |(size, _)| size))],
        MemCall::Openat { .. } | MemCall::Mlockall { .. } | MemCall::Munlockall => &[],
    };
    match ranges
        .iter()
        .find(|(start, len)| !in_user_space(*start, *len))
    {
        Some((start, len)) => Err(format!(
            "{} succeeded on {start:#x} + {len:#x} bytes, beyond the end of any user address space ({USER_ADDRESS_END:#x})",
            s.call.name()
        )),
        None => Ok(()),
    }
}

/// Parses one line of an NDJSON recording.
pub fn parse_line(line: &str) -> Result<Record, String> {
    parse_record(serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?)
}

/// Parses one record of a recording, read as a JSON value (from NDJSON or binary): each type
/// is read by the struct that writes it.
pub fn parse_record(v: Value) -> Result<Record, String> {
    let kind = match type_of(&v)? {
        TypeOf::Other(kind) => kind,
        TypeOf::Syscall(call) => {
            return syscall(typed::<SyscallJson>(v, call.name())?.into_record(call));
        }
    };
    Ok(match kind {
        RecordType::Meta => {
            let meta: MetaJson = typed(v, "meta")?;
            Record::Meta {
                version: meta.version,
                limits: meta.limits(),
                clock: meta.clock(),
            }
        }
        RecordType::Touches => {
            let run: TouchesRecord = typed(v, "touches")?;
            run.check(USER_ADDRESS_END)?;
            Record::Touches(run)
        }
        RecordType::Fault => {
            Record::Event(Event::Fault(typed::<FaultJson>(v, "fault")?.into_record()))
        }
        RecordType::Stack => {
            let def: StackDef = typed(v, "stack")?;
            if def.frames.len() > MAX_STACK_FRAMES {
                return Err(format!(
                    "stack {} has {} frames, more than {MAX_STACK_FRAMES}",
                    def.id,
                    def.frames.len()
                ));
            }
            Record::Stack(def)
        }
        RecordType::Fork => Record::Event(typed::<ForkJson>(v, "fork")?.into_event()),
        RecordType::Exec => Record::Event(typed::<ExecJson>(v, "exec")?.into_event()),
        RecordType::Exit => Record::Event(typed::<ExitJson>(v, "exit")?.into_event()),
        RecordType::Collapse => Record::Event(typed::<CollapseJson>(v, "collapse")?.into_event()),
        RecordType::Snapshot => snapshot(typed(v, "snapshot")?)?,
        RecordType::Lost => Record::Lost(typed(v, "lost")?),
        RecordType::Heap => Record::Event(typed::<HeapJson>(v, "heap")?.into_event()),
        RecordType::HeapAttach => {
            Record::Event(typed::<AttachJson>(v, "heap_attach")?.into_event())
        }
        RecordType::Pymalloc => Record::Event(Event::Pymalloc(typed(v, "pymalloc")?)),
        RecordType::Summary | RecordType::Drift | RecordType::Finding => Record::Other,
    })
}

/// A syscall read back, checked.
fn syscall(record: SyscallRecord) -> Result<Record, String> {
    if let Some(runs) = &record.resolved.resident {
        // Checked like a seed's, against the user address space: a call's runs are read
        // from pagemap over what it made resident.
        check_resident(runs, &user_space())?;
    }
    check_ranges(&record)?;
    Ok(Record::Event(Event::Syscall(record)))
}

/// A snapshot read back: a seed (checked) or a mark.
fn snapshot(s: SnapshotJson) -> Result<Record, String> {
    if !s.reason.seeds() {
        return Ok(Record::Snapshot {
            pid: s.pid,
            ts_ns: s.ts_ns,
            reason: s.reason,
        });
    }
    let rows = s.vmas.ok_or("snapshot without 'vmas'")?;
    let vmas = rows.iter().map(vma_of).collect::<Result<Vec<_>, _>>()?;
    let vmas = split_parts(&rows, vmas);
    if let Some(w) = vmas.windows(2).find(|w| w[0].end > w[1].start) {
        return Err(format!(
            "VMAs {:#x}-{:#x} and {:#x}-{:#x} overlap or are out of order",
            w[0].start, w[0].end, w[1].start, w[1].end
        ));
    }
    let resident = runs_of(s.resident);
    check_resident(&resident, &vmas)?;
    if resident_bytes(&resident) > MAX_RESIDENT_BYTES {
        return Err(format!(
            "the snapshot lists {} bytes resident, more than the {MAX_RESIDENT_BYTES} a recording may hold",
            resident_bytes(&resident)
        ));
    }
    Ok(Record::Seed {
        pid: s.pid,
        ts_ns: s.ts_ns,
        reason: s.reason,
        seed: Seed {
            vmas,
            start_brk: s.brk_start,
            resident,
            thp: thp_of(&s.thp),
        },
        exe: s.exe,
    })
}

/// What a replay rebuilt.
pub struct Replayed {
    pub session: Session,
    /// The limits of the machine the recording came from.
    pub limits: Limits,
}

/// Opens the recording `path` for reading (see [`crate::recording::open`]).
pub fn open(path: &Path) -> Result<Box<dyn BufRead>, ReplayError> {
    crate::recording::open(path).map_err(|source| ReplayError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Replays `path` (see [`open`]) into `sink`; `events` also passes every event on.
pub fn replay(path: &Path, sink: &mut dyn Sink, events: bool) -> Result<Replayed, ReplayError> {
    replay_from(open(path)?, &path.display().to_string(), sink, events)
}

/// Replays the recording read from `reader` (`name` in errors), one record at a time:
/// memory holds one record (at most [`MAX_LINE`]) and the model, never the file.
pub fn replay_from(
    reader: impl BufRead,
    name: &str,
    sink: &mut dyn Sink,
    events: bool,
) -> Result<Replayed, ReplayError> {
    replay_bounded(reader, name, sink, events, MAX_RESIDENT_BYTES)
}

/// Why an event could not be replayed.
enum EventError {
    /// Earlier than the thread's previous event.
    OutOfOrder(String),
    Write(io::Error),
}

impl EventError {
    fn at(self, path: &str, at: Position) -> ReplayError {
        match self {
            Self::OutOfOrder(what) => ReplayError::Bad {
                path: path.to_string(),
                at,
                what,
            },
            Self::Write(e) => ReplayError::Write(e),
        }
    }
}

/// Applies one event to the session and shows it, as the live run did (with the exit
/// snapshot the live run writes after an exit).
fn replay_event(
    ev: &Event,
    session: &mut Session,
    last_ts_by_thread: &mut std::collections::HashMap<(u32, u32), u64>,
    sink: &mut dyn Sink,
    events: bool,
) -> Result<(), EventError> {
    // Each thread's events are in order in the ring; across CPUs, two threads' timestamps
    // may cross by the time between reserving and stamping.
    let ts = ev.ts_ns();
    let key = (ev.pid(), ev.tid());
    let last = last_ts_by_thread.entry(key).or_insert(0);
    if ts < *last {
        return Err(EventError::OutOfOrder(format!(
            "record out of order: time {ts} comes after {last} in thread {}",
            key.1
        )));
    }
    *last = ts;
    crate::driver::step(session, sink, ev, events).map_err(EventError::Write)?;
    Ok(())
}

/// [`replay_from`] with `resident_budget` bytes of resident memory for all the snapshots.
fn replay_bounded(
    reader: impl BufRead,
    name: &str,
    sink: &mut dyn Sink,
    events: bool,
    resident_budget: u64,
) -> Result<Replayed, ReplayError> {
    let mut session = Session::default();
    let mut limits = Limits::default();
    let mut lost = LossSummary::default();
    let mut last_ts = 0u64;
    let mut last_ts_by_thread = std::collections::HashMap::new();
    let mut lines = 0usize;
    let mut resident_seeded = 0u64;
    let bad = |at: Position, what: String| ReplayError::Bad {
        path: name.to_string(),
        at,
        what,
    };
    let mut records = Records::new(reader).map_err(|e| ReplayError::Open {
        path: name.to_string(),
        source: e,
    })?;
    loop {
        let v = match records.next_record() {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(what) => return Err(bad(records.position(), what)),
        };
        let n = records.position();
        lines += 1;
        let record = parse_record(v).map_err(|w| bad(n, w))?;
        match record {
            Record::Meta {
                version,
                limits: recorded,
                clock,
            } => {
                if !(1..=SCHEMA_VERSION).contains(&version) {
                    return Err(bad(
                        n,
                        format!(
                            "schema version {version}; this vmatrace reads versions 1 to {SCHEMA_VERSION}"
                        ),
                    ));
                }
                limits = recorded;
                sink.start(&Meta {
                    fault_backend: "replay".into(),
                    syscall_backend: "replay".into(),
                    change_order: "replay".into(),
                    limits,
                    clock,
                })
                .map_err(ReplayError::Write)?;
            }
            Record::Seed {
                pid,
                ts_ns,
                reason,
                seed,
                exe,
            } => {
                resident_seeded += resident_bytes(&seed.resident);
                if resident_seeded > resident_budget {
                    return Err(bad(
                        n,
                        format!(
                            "the snapshots so far list {resident_seeded} bytes resident, more than the {resident_budget} a recording may hold"
                        ),
                    ));
                }
                crate::driver::seed(&mut session, sink, pid, ts_ns, reason, Some(seed), exe)
                    .map_err(ReplayError::Write)?;
            }
            Record::Snapshot { pid, ts_ns, reason } => {
                // Exit snapshots are made again when the exit event is applied.
                if reason != SnapshotReason::Exit
                    && let Some(p) = session.get(pid)
                {
                    sink.snapshot(ts_ns, reason, p)
                        .map_err(ReplayError::Write)?;
                }
            }
            Record::Event(ev) => {
                replay_event(&ev, &mut session, &mut last_ts_by_thread, sink, events)
                    .map_err(|e| e.at(name, n))?;
                last_ts = last_ts.max(ev.ts_ns());
            }
            Record::Touches(run) => {
                for f in run.faults() {
                    let ev = Event::Fault(f);
                    replay_event(&ev, &mut session, &mut last_ts_by_thread, sink, events)
                        .map_err(|e| e.at(name, n))?;
                }
                last_ts = last_ts.max(run.end_ns);
            }
            Record::Stack(def) => {
                let def = Arc::new(def);
                sink.stack(&def).map_err(ReplayError::Write)?;
                session.stacks.insert(def);
            }
            Record::Lost(l) => {
                if l.lost_heap > 0 {
                    session.heap_events_lost();
                }
                lost += &l;
            }
            Record::Other => {}
        }
    }
    if lines == 0 {
        return Err(ReplayError::Empty {
            path: name.to_string(),
        });
    }
    let summary = summarize(&session, lost);
    sink.summary(last_ts, &summary)
        .map_err(ReplayError::Write)?;
    sink.flush().map_err(ReplayError::Write)?;
    Ok(Replayed { session, limits })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::NullSink;

    const META: &str = "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n";

    fn replayed(text: &str) -> Result<Replayed, ReplayError> {
        replay_from(text.as_bytes(), "t", &mut NullSink, true)
    }

    /// A syscall record of `call` with `args` returning `ret`.
    fn call(ts: u64, call: &str, args: [u64; 6], ret: i64) -> String {
        format!(
            "{{\"type\":\"{call}\",\"ts_ns\":{ts},\"pid\":7,\"tid\":7,\"args\":{args:?},\"ret\":{ret}}}\n"
        )
    }

    #[test]
    fn a_lost_record_without_lost_open_reads_it_as_zero() {
        // Recordings made before the field counted lost opens in `lost_lifecycle`.
        let line = "{\"type\":\"lost\",\"ts_ns\":5,\"lost_syscall\":1,\"lost_fault\":2,\"lost_lifecycle\":3,\"pending_full\":0,\"exit_without_enter\":0,\"targets_full\":0,\"read_error\":0,\"undecodable\":0}";
        let Ok(Record::Lost(l)) = parse_line(line) else {
            panic!("a lost record");
        };
        assert_eq!((l.lost_lifecycle, l.lost_open), (3, 0));
        assert_eq!(l.total_lost(), 6);
        let line = line.replace("\"undecodable\":0", "\"undecodable\":0,\"lost_open\":4");
        let Ok(Record::Lost(l)) = parse_line(&line) else {
            panic!("a lost record");
        };
        assert_eq!((l.lost_open, l.total_lost()), (4, 10));
    }

    #[test]
    fn calls_with_impossible_ranges_are_refused_and_edge_ones_do_not_break_the_model() {
        let top = !4095u64;
        let end = USER_ADDRESS_END;
        let seed = format!(
            "{META}{{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":null,\"vmas\":[],\"brk_start\":{}}}\n",
            end - 8192
        );
        let impossible: [(&str, [u64; 6], i64); 10] = [
            ("mmap", [0, u64::MAX, 3, 0x22, u64::MAX, 0], top as i64),
            ("mmap", [0, 1 << 62, 3, 0x22, u64::MAX, 0], 4096),
            ("mmap", [0, 8192, 3, 0x02, 3, !4095u64], 4096),
            ("munmap", [4096, u64::MAX, 0, 0, 0, 0], 0),
            ("mprotect", [top, 4096, 7, 0, 0, 0], 0),
            ("madvise", [end, 4096, 4, 0, 0, 0], 0),
            ("mremap", [4096, 4096, u64::MAX, 1, 0, 0], 4096),
            ("mremap", [top, 4096, 4096, 3, 4096, 0], 4096),
            ("brk", [top, 0, 0, 0, 0, 0], top as i64),
            ("shmat", [1, top, 0, 0, 0, 0], top as i64),
        ];
        for (name, args, ret) in impossible {
            let err = replayed(&format!("{seed}{}", call(10, name, args, ret)))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.starts_with("t:3: ")
                    && (err.contains("beyond the end of any user address space")
                        || err.contains("largest file offset")),
                "{name} {args:?}: {err}"
            );
        }
        // At the very end of user space, and faults anywhere: replayed, no overflow.
        let mut text = seed;
        let edge: [(&str, [u64; 6], i64); 8] = [
            ("mmap", [0, 4096, 3, 0x22, u64::MAX, 0], (end - 4096) as i64),
            ("mmap", [0, 8192, 3, 0x02, 3, 1 << 62], (end - 16384) as i64),
            (
                "mremap",
                [end - 4096, 4096, 8192, 1, 0, 0],
                (end - 8192) as i64,
            ),
            ("madvise", [0, end, 14, 0, 0, 0], 0),
            ("mprotect", [0, end, 1, 0, 0, 0], 0),
            ("brk", [end, 0, 0, 0, 0, 0], end as i64),
            ("munmap", [0, end, 0, 0, 0, 0], 0),
            ("madvise", [end, 0, 4, 0, 0, 0], 0),
        ];
        for (i, (name, args, ret)) in edge.iter().enumerate() {
            text.push_str(&call(10 + i as u64, name, *args, *ret));
        }
        for (i, address) in [u64::MAX, end, end - 1, 0].iter().enumerate() {
            text.push_str(&format!(
                "{{\"type\":\"fault\",\"ts_ns\":{},\"pid\":7,\"tid\":7,\"address\":{address},\"ip\":0,\"error_code\":6}}\n",
                100 + i
            ));
        }
        let r = replayed(&text);
        assert!(r.is_ok(), "{:?}", r.err());
    }

    #[test]
    fn a_stack_of_more_than_4096_frames_is_refused_naming_the_line() {
        let frame = "{\"addr\":4096,\"module\":null,\"offset\":0,\"function\":null,\"file\":null,\"line\":null,\"inlined\":false}";
        let stack = |n: usize| {
            format!(
                "{{\"type\":\"stack\",\"ts_ns\":2,\"id\":1,\"frames\":[{}]}}\n",
                vec![frame; n].join(",")
            )
        };
        let r = replayed(&format!("{META}{}", stack(MAX_STACK_FRAMES)));
        assert_eq!(
            r.map(|r| r.session.stacks.get(1).map(|d| d.frames.len()))
                .map_err(|e| e.to_string()),
            Ok(Some(MAX_STACK_FRAMES))
        );
        let err = replayed(&format!("{META}{}", stack(MAX_STACK_FRAMES + 1)))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("t:2: ") && err.contains("4097 frames"),
            "{err}"
        );
    }

    #[test]
    fn a_touches_run_replays_as_its_faults_and_impossible_ones_are_refused() {
        let seed = format!(
            "{META}{{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":null,\"vmas\":[{{\"start\":65536,\"end\":131072,\"perms\":\"rw-p\",\"kind\":\"anon\"}}]}}\n"
        );
        let run = |address: u64, pages: u64, offsets: &str, end: u64| {
            format!(
                "{{\"type\":\"touches\",\"ts_ns\":10,\"end_ns\":{end},\"pid\":7,\"tid\":7,\"address\":{address},\"pages\":{pages},\"offsets_ns\":[{offsets}],\"ip\":0,\"error_code\":6,\"write\":true,\"first_touch\":true,\"changed\":false,\"page_kind\":\"anon\",\"vma_start\":65536}}\n"
            )
        };
        let r = replayed(&format!("{seed}{}", run(65536 + 4096, 3, "2,1,0", 12)))
            .map_err(|e| e.to_string());
        let touched = r.map(|r| {
            r.session
                .get(7)
                .map(|p| p.space.pages_in(65536, 131072).anon)
        });
        assert_eq!(touched, Ok(Some(3)));
        for (bad, what) in [
            (run(65536, 70_000, "0", 12), "70000 pages"),
            (run(65536 + 1, 1, "0", 12), "not pages of user space"),
            (run(65536, 2, "0", 12), "has 1 offsets_ns"),
            (run(65536, 1, "5", 12), "past its end"),
            (run(65536, 1, "0", 9), "before it starts"),
            (run(65536, 1, "-1", 12), "bad touches record"),
        ] {
            let err = replayed(&format!("{seed}{bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.starts_with("t:3: ") && err.contains(what),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn impossible_snapshots_are_refused_naming_the_line() {
        let seed = |vmas: &str, resident: &str| {
            format!(
                "{META}{{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":null,\"vmas\":[{vmas}],\"resident\":[{resident}]}}\n"
            )
        };
        let special = |start: u64, end: u64, name: &str| {
            format!(
                "{{\"start\":{start},\"end\":{end},\"perms\":\"r-xp\",\"path\":\"{name}\",\"kind\":\"special\"}}"
            )
        };
        // The x86-64 vsyscall page is the one VMA above user space.
        let vsyscall = 0xffff_ffff_ff60_0000u64;
        assert!(replayed(&seed(&special(vsyscall, vsyscall + 4096, "[vsyscall]"), "")).is_ok());
        let err = replayed(&seed(&special(vsyscall, vsyscall + 4096, "[vdso]"), ""))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("t:2: VMA"), "{err}");
        // A run crossing from one VMA into the next one is fine; into a gap is not.
        let anon = |s: u64, e: u64| {
            format!("{{\"start\":{s},\"end\":{e},\"perms\":\"rw-p\",\"kind\":\"anon\"}}")
        };
        let two = format!("{},{}", anon(0x1000, 0x3000), anon(0x3000, 0x5000));
        assert!(replayed(&seed(&two, "[4096, 20480, \"anon\"]")).is_ok());
        let gap = format!("{},{}", anon(0x1000, 0x3000), anon(0x4000, 0x5000));
        let err = replayed(&seed(&gap, "[4096, 20480, \"anon\"]"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nothing mapped at 0x3000"), "{err}");
        // Resident memory adds up over the snapshots of a recording (a small budget here, so
        // that the test does not spend minutes seeding the real one).
        let big = anon(1 << 40, 1 << 41);
        let run = format!("[{}, {}, \"anon\"]", 1u64 << 40, (1u64 << 40) + (1 << 24));
        let mut text = seed(&big, &run);
        text.push_str(&seed(&big, &run)[META.len()..].replace("\"pid\":7", "\"pid\":8"));
        text.push_str(&seed(&big, &run)[META.len()..].replace("\"pid\":7", "\"pid\":9"));
        let err = replay_bounded(text.as_bytes(), "t", &mut NullSink, true, 5 << 23)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("t:4: the snapshots so far"), "{err}");
    }

    /// A recording compressed with zstd (two frames, as vmatrace writes them) is read by its
    /// magic bytes, whatever its name, and replays exactly like the plain one.
    #[test]
    fn a_zstd_recording_replays_like_the_plain_one() {
        // A meta with its clock, so that the replayed meta is the same both times.
        let meta = "{\"type\":\"meta\",\"ts_ns\":1,\"realtime_ns\":5,\"version\":1}\n";
        let text = format!(
            "{meta}{{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":null,\"vmas\":[]}}\n{}{}",
            call(10, "mmap", [0, 8192, 3, 0x22, u64::MAX, 0], 0x10000),
            call(11, "munmap", [0x10000, 4096, 0, 0, 0, 0], 0),
        );
        let (first, second) = text.split_at(meta.len());
        let mut compressed = zstd::encode_all(first.as_bytes(), 3).expect("compresses");
        compressed.extend(zstd::encode_all(second.as_bytes(), 3).expect("compresses"));
        let dir = std::env::temp_dir();
        let plain = dir.join(format!("vmatrace-replay-plain-{}", std::process::id()));
        let packed = dir.join(format!(
            "vmatrace-replay-packed-{}.ndjson",
            std::process::id()
        ));
        std::fs::write(&plain, &text).expect("writes");
        std::fs::write(&packed, &compressed).expect("writes");
        let out = |path: &Path| {
            let mut sink = crate::output::records::RecordSink::new(
                Vec::new(),
                crate::output::FaultFilter::All,
            );
            replay(path, &mut sink, true).map_err(|e| e.to_string())?;
            Ok::<_, String>(String::from_utf8_lossy(sink.get_mut()).into_owned())
        };
        let (a, b) = (out(&plain), out(&packed));
        let _ = std::fs::remove_file(&plain);
        let _ = std::fs::remove_file(&packed);
        assert!(
            a.as_ref().is_ok_and(|a| a.contains("\"type\":\"munmap\"")),
            "{a:?}"
        );
        assert_eq!(a, b);
    }

    #[test]
    fn a_line_without_end_is_refused_at_the_bound() {
        let endless = std::io::repeat(b'x');
        let err = replay_from(io::BufReader::new(endless), "zero", &mut NullSink, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "zero:1: line longer than 64 MiB: not a recording");
    }
}
