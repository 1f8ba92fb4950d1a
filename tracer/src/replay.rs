//! Replay: read a recorded NDJSON file back into typed events and feed the same session and
//! sinks as a live run, so that live and replay cannot disagree.

use std::{
    io::{self, BufRead},
    path::Path,
    sync::Arc,
};

use serde_json::Value;
use tracer_common::Syscall;

use crate::{
    analysis::Limits,
    event::{Event, FaultRecord, Resolved, SyscallRecord},
    model::{
        Backing, ForkAdvice, PAGE_SIZE, Perms, ResidentRun, ThpAdvice, ThpPolicy, TouchKind, Vma,
    },
    output::{LossSummary, Meta, Sink, SnapshotReason, ndjson::SCHEMA_VERSION, report::summarize},
    session::{Applied, Seed, Session},
};

/// Errors reading a recording; each names the line.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is empty: nothing to replay")]
    Empty { path: String },
    #[error("{path}:{line}: {what}")]
    Bad {
        path: String,
        line: usize,
        what: String,
    },
    #[error("writing output: {0}")]
    Write(#[source] io::Error),
}

/// What one line of a recording holds.
pub enum Record {
    Meta {
        version: u64,
        limits: Limits,
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
    Lost(LossSummary),
    /// Summary, drift and other records that replay recomputes or ignores.
    Other,
}

fn u64_of(v: &Value, key: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("field '{key}' is missing or not an unsigned integer"))
}

fn u32_of(v: &Value, key: &str) -> Result<u32, String> {
    u64_of(v, key)?
        .try_into()
        .map_err(|_| format!("field '{key}' is out of range"))
}

fn array_of<const N: usize>(v: &Value, key: &str) -> Result<[u64; N], String> {
    let a = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("field '{key}' is missing or not an array"))?;
    if a.len() != N {
        return Err(format!("field '{key}' must have {N} elements"));
    }
    let mut out = [0u64; N];
    for (o, x) in out.iter_mut().zip(a) {
        *o = x
            .as_u64()
            .ok_or_else(|| format!("field '{key}' holds a non-integer"))?;
    }
    Ok(out)
}

fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn vma_of(v: &Value) -> Result<Vma, String> {
    let perms_s = v
        .get("perms")
        .and_then(Value::as_str)
        .ok_or("vma without perms")?;
    let perms = Perms::parse(perms_s).ok_or_else(|| format!("bad perms '{perms_s}'"))?;
    let path = opt_str(v, "path");
    let kind = opt_str(v, "kind").unwrap_or_default();
    let backing = match (kind.as_str(), path) {
        ("heap", _) => Backing::Heap,
        ("stack", _) => Backing::Stack,
        ("anon", _) => Backing::Anonymous,
        ("shm", Some(p)) => Backing::Shm {
            key: p
                .get(5..13)
                .and_then(|k| u64::from_str_radix(k, 16).ok())
                .unwrap_or(0),
            shmid: v.get("inode").and_then(Value::as_u64).unwrap_or(0),
        },
        ("special", Some(p)) => Backing::Special(Arc::from(p)),
        ("file", Some(p)) => Backing::File {
            path: Arc::from(p),
            inode: v.get("inode").and_then(Value::as_u64).unwrap_or(0),
        },
        (k, _) => return Err(format!("unknown vma kind '{k}'")),
    };
    Ok(Vma {
        start: u64_of(v, "start")?,
        end: u64_of(v, "end")?,
        perms,
        offset: v.get("offset").and_then(Value::as_u64).unwrap_or(0),
        backing,
        created_ns: v.get("created_ns").and_then(Value::as_u64).unwrap_or(0),
        thp: ThpAdvice::parse(v.get("thp_advice").and_then(Value::as_str)),
        fork: {
            let advice = v.get("fork_advice").and_then(Value::as_str).unwrap_or("");
            ForkAdvice {
                dont_copy: advice.split(',').any(|a| a == "dontfork"),
                wipe: advice.split(',').any(|a| a == "wipeonfork"),
            }
        },
        anon_vma: v.get("anon_vma").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The pages a seed snapshot (or a populating syscall) lists as resident: `[[start, end,
/// kind], ...]` (none in recordings made before vmatrace read them).
fn resident_of(v: &Value) -> Result<Vec<ResidentRun>, String> {
    let Some(runs) = v.get("resident").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    runs.iter()
        .map(|r| {
            let bad = || format!("bad resident run {r}");
            let start = r.get(0).and_then(Value::as_u64).ok_or_else(bad)?;
            let end = r.get(1).and_then(Value::as_u64).ok_or_else(bad)?;
            let kind = r
                .get(2)
                .and_then(Value::as_str)
                .and_then(TouchKind::parse)
                .ok_or_else(bad)?;
            Ok(ResidentRun { start, end, kind })
        })
        .collect()
}

/// The huge page policy of a seed snapshot (off when absent).
fn thp_of(v: &Value) -> ThpPolicy {
    let pages = |key: &str| -> Vec<u64> {
        v["thp"][key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|kib| kib * 1024 / PAGE_SIZE)
                    .collect()
            })
            .unwrap_or_default()
    };
    ThpPolicy {
        always: pages("always_kib"),
        madvise: pages("madvise_kib"),
        huge_zero_page: v["thp"]["huge_zero_page"].as_bool().unwrap_or(false),
    }
}

/// Parses one line of a recording.
pub fn parse_line(line: &str) -> Result<Record, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let ty = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no 'type' field")?;
    let ts_ns = || u64_of(&v, "ts_ns");
    let syscall = Syscall::ALL.iter().copied().find(|s| s.name() == ty);
    if let Some(call) = syscall {
        let extra = if v.get("extra").is_some() {
            array_of::<2>(&v, "extra")?
        } else {
            [0; 2]
        };
        let shm = match (
            v.get("shm_size").and_then(Value::as_u64),
            v.get("shm_key").and_then(Value::as_u64),
        ) {
            (Some(size), Some(key)) => Some((size, key)),
            _ => None,
        };
        return Ok(Record::Event(Event::Syscall(SyscallRecord {
            ts_ns: ts_ns()?,
            enter_ts_ns: v.get("enter_ts_ns").and_then(Value::as_u64).unwrap_or(0),
            pid: u32_of(&v, "pid")?,
            tid: u32_of(&v, "tid")?,
            call,
            args: array_of::<6>(&v, "args")?,
            ret: v
                .get("ret")
                .and_then(Value::as_i64)
                .ok_or("field 'ret' is missing or not an integer")?,
            extra,
            resolved: Resolved {
                path: opt_str(&v, "path"),
                dev: opt_str(&v, "dev"),
                inode: v.get("inode").and_then(Value::as_u64),
                shm,
                target_pid: v
                    .get("target_pid")
                    .and_then(Value::as_u64)
                    .and_then(|p| u32::try_from(p).ok()),
                resident: match v.get("resident") {
                    Some(Value::Array(_)) => Some(resident_of(&v)?),
                    _ => None,
                },
            },
        })));
    }
    Ok(match ty {
        "meta" => Record::Meta {
            version: u64_of(&v, "version")?,
            limits: Limits {
                max_map_count: v
                    .get("max_map_count")
                    .and_then(Value::as_u64)
                    .unwrap_or(Limits::default().max_map_count),
                cpus: v.get("cpus").and_then(Value::as_u64).unwrap_or(1),
            },
        },
        "fault" => Record::Event(Event::Fault(FaultRecord {
            ts_ns: ts_ns()?,
            pid: u32_of(&v, "pid")?,
            tid: u32_of(&v, "tid")?,
            address: u64_of(&v, "address")?,
            ip: v.get("ip").and_then(Value::as_u64).unwrap_or(0),
            error_code: v
                .get("error_code")
                .and_then(Value::as_u64)
                .and_then(|c| u32::try_from(c).ok()),
            write_from_page: v.get("write").and_then(Value::as_bool),
        })),
        "fork" => Record::Event(Event::Fork {
            ts_ns: ts_ns()?,
            pid: u32_of(&v, "pid")?,
            tid: u32_of(&v, "tid")?,
            child: u32_of(&v, "child")?,
            followed: v.get("followed").and_then(Value::as_bool).unwrap_or(false),
        }),
        "exec" => Record::Event(Event::Exec {
            ts_ns: ts_ns()?,
            pid: u32_of(&v, "pid")?,
            tid: u32_of(&v, "tid")?,
            filename: opt_str(&v, "filename").unwrap_or_default(),
        }),
        "exit" => Record::Event(Event::Exit {
            ts_ns: ts_ns()?,
            pid: u32_of(&v, "pid")?,
            tid: u32_of(&v, "tid")?,
        }),
        "snapshot" => {
            let name = opt_str(&v, "reason").unwrap_or_default();
            let reason = SnapshotReason::parse(&name)
                .ok_or_else(|| format!("unknown snapshot reason '{name}'"))?;
            let pid = u32_of(&v, "pid")?;
            if reason.seeds() {
                let vmas = v
                    .get("vmas")
                    .and_then(Value::as_array)
                    .ok_or("snapshot without 'vmas'")?
                    .iter()
                    .map(vma_of)
                    .collect::<Result<Vec<_>, _>>()?;
                Record::Seed {
                    pid,
                    ts_ns: ts_ns()?,
                    reason,
                    seed: Seed {
                        vmas,
                        start_brk: v.get("brk_start").and_then(Value::as_u64),
                        resident: resident_of(&v)?,
                        thp: thp_of(&v),
                    },
                    exe: opt_str(&v, "exe"),
                }
            } else {
                Record::Snapshot {
                    pid,
                    ts_ns: ts_ns()?,
                    reason,
                }
            }
        }
        "lost" => {
            Record::Lost(serde_json::from_value(v).map_err(|e| format!("bad lost record: {e}"))?)
        }
        "summary" | "drift" | "finding" => Record::Other,
        other => return Err(format!("unknown record type '{other}'")),
    })
}

/// What a replay rebuilt.
pub struct Replayed {
    pub session: Session,
    /// The limits of the machine the recording came from.
    pub limits: Limits,
}

/// Replays `path` into `sink`; `events` also passes every event on.
pub fn replay(path: &Path, sink: &mut dyn Sink, events: bool) -> Result<Replayed, ReplayError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ReplayError::Open {
        path: name.clone(),
        source,
    })?;
    let mut session = Session::default();
    let mut limits = Limits::default();
    let mut lost = LossSummary::default();
    let mut last_ts = 0u64;
    let mut last_ts_by_thread = std::collections::HashMap::new();
    let mut lines = 0usize;
    let bad = |line: usize, what: String| ReplayError::Bad {
        path: name.clone(),
        line,
        what,
    };
    for (i, line) in io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| bad(n, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let record = parse_line(&line).map_err(|w| bad(n, w))?;
        match record {
            Record::Meta {
                version,
                limits: recorded,
            } => {
                if version != SCHEMA_VERSION {
                    return Err(bad(
                        n,
                        format!(
                            "schema version {version}; this vmatrace reads version {SCHEMA_VERSION}"
                        ),
                    ));
                }
                limits = recorded;
                sink.start(&Meta {
                    fault_backend: "replay".into(),
                    syscall_backend: "replay".into(),
                    limits,
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
                match (reason, session.get(pid).is_some()) {
                    (SnapshotReason::Exec, true) => session.reseed(pid, seed, ts_ns),
                    (SnapshotReason::Resync, true) => {
                        session.resync(pid, seed, ts_ns);
                        if let Some(p) = session.get(pid) {
                            sink.snapshot(ts_ns, reason, p)
                                .map_err(ReplayError::Write)?;
                        }
                    }
                    // A followed child's seed repeats the fork copy the session already made.
                    (_, true) => {}
                    (_, false) => session.add(pid, seed, ts_ns, exe),
                }
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
                // Each thread's events are in order in the ring; across CPUs, two threads'
                // timestamps may cross by the time between reserving and stamping.
                let ts = ev.ts_ns();
                let key = (ev.pid(), ev.tid());
                let last = last_ts_by_thread.entry(key).or_insert(0);
                if ts < *last {
                    return Err(bad(
                        n,
                        format!(
                            "record out of order: time {ts} comes after {last} in thread {}",
                            key.1
                        ),
                    ));
                }
                *last = ts;
                last_ts = last_ts.max(ts);
                let applied = session.apply(&ev);
                if events {
                    sink.event(&ev, &applied, &session)
                        .map_err(ReplayError::Write)?;
                }
                if let (Event::Exit { pid, ts_ns, .. }, Applied::Exit) = (&ev, &applied)
                    && let Some(p) = session.get(*pid)
                {
                    sink.snapshot(*ts_ns, SnapshotReason::Exit, p)
                        .map_err(ReplayError::Write)?;
                }
            }
            Record::Lost(l) => {
                lost.lost_syscall += l.lost_syscall;
                lost.lost_fault += l.lost_fault;
                lost.lost_lifecycle += l.lost_lifecycle;
                lost.pending_full += l.pending_full;
                lost.exit_without_enter += l.exit_without_enter;
                lost.targets_full += l.targets_full;
                lost.read_error += l.read_error;
                lost.undecodable += l.undecodable;
            }
            Record::Other => {}
        }
    }
    if lines == 0 {
        return Err(ReplayError::Empty { path: name });
    }
    let summary = summarize(&session, lost);
    sink.summary(last_ts, &summary)
        .map_err(ReplayError::Write)?;
    sink.flush().map_err(ReplayError::Write)?;
    Ok(Replayed { session, limits })
}
