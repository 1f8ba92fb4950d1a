//! The records of a recording, and the sink that writes them: NDJSON (one complete JSON
//! object per line; schema: `docs/json-schema.md`) or the binary format of [`super::binary`],
//! which carries the same records value for value.

use std::{
    borrow::Cow,
    io::{self, Write},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracer_common::Syscall;

use super::{
    FaultFilter, LossSummary, Meta, Sink, SnapshotReason, Summary, binary,
    process_records::{CollapseJson, ExecJson, ExitJson, ForkJson, MetaJson, SnapshotJson},
    show_fault,
    touch_runs::{PendingRuns, Written},
    typed::{Drift, Stamped},
};
use crate::{
    analysis::Finding,
    call::MemCall,
    event::{Event, FaultRecord, Resolved, SyscallRecord},
    flags, heap,
    model::{ResidentRun, Touch, TouchKind},
    session::{Applied, Process, Session},
    stacks::StackDef,
};

/// The version of the record schema: 2 added `touches` records (runs of first touches).
/// Replay reads every version up to this one (each is a superset of the one before) and
/// refuses later ones.
pub const SCHEMA_VERSION: u64 = 2;

/// How a recording's records are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Ndjson,
    /// The same records in vmatrace's binary format (`vmatrace convert` gives the NDJSON).
    Binary,
}

impl Format {
    /// The format of an output named `path` unless told: binary for `.vmat` (`.vmat.zst`).
    pub fn by_name(path: &std::path::Path) -> Self {
        if binary::by_name(path) {
            Self::Binary
        } else {
            Self::Ndjson
        }
    }
}

/// Turns records into bytes, as NDJSON lines or binary: the one place a record is encoded,
/// for the live sink and for `vmatrace convert`.
#[derive(Default)]
pub struct Encoding(Option<Box<binary::Encoder>>);

impl Encoding {
    /// An encoding of records as `format`.
    pub fn new(format: Format) -> Self {
        Self((format == Format::Binary).then(Box::default))
    }

    /// Makes the next record start a new file: a binary stream's header comes again.
    pub fn restart(&mut self) {
        if let Some(enc) = &mut self.0 {
            enc.restart();
        }
    }

    /// Appends `record` to `out`: a JSON line, or a binary record.
    pub fn record<T: Serialize + ?Sized>(
        &mut self,
        out: &mut Vec<u8>,
        record: &T,
    ) -> io::Result<()> {
        match &mut self.0 {
            None => {
                serde_json::to_writer(&mut *out, record)?;
                out.push(b'\n');
            }
            Some(enc) => enc.record(out, record)?,
        }
        Ok(())
    }

    /// Appends a fault record: the fast writer for NDJSON, the derived form for binary.
    fn fault(&mut self, out: &mut Vec<u8>, record: &FaultJson) -> io::Result<()> {
        match &mut self.0 {
            None => {
                write_fault(out, record);
                out.push(b'\n');
            }
            Some(enc) => enc.record(out, record)?,
        }
        Ok(())
    }
}

/// Writes records, as NDJSON or binary.
pub struct RecordSink<W: Write> {
    out: W,
    faults: FaultFilter,
    /// A record is encoded here first and reaches `out` in one write.
    scratch: Vec<u8>,
    encoding: Encoding,
    /// First touches not yet written (`--faults first`): written before any other record.
    runs: PendingRuns,
    ready: Vec<Written>,
}

impl<W: Write> RecordSink<W> {
    /// A sink writing NDJSON to `out`, showing faults as `faults` says.
    pub fn new(out: W, faults: FaultFilter) -> Self {
        Self::with_format(out, faults, Format::Ndjson)
    }

    /// A sink writing `format` to `out`.
    pub fn with_format(out: W, faults: FaultFilter, format: Format) -> Self {
        Self {
            out,
            faults,
            scratch: Vec::with_capacity(512),
            encoding: Encoding::new(format),
            runs: PendingRuns::default(),
            ready: Vec::new(),
        }
    }

    /// Writes the runs of first touches that are ready, then (`all`) every pending one.
    fn write_runs(&mut self, all: bool) -> io::Result<()> {
        if all {
            self.ready.extend(self.runs.drain());
        }
        for written in self.ready.drain(..) {
            self.scratch.clear();
            match written {
                Written::Fault(f, fe) => self
                    .encoding
                    .fault(&mut self.scratch, &FaultJson::new(&f, &Applied::Fault(fe)))?,
                Written::Run(run) => self.encoding.record(&mut self.scratch, &run)?,
            }
            self.out.write_all(&self.scratch)?;
        }
        Ok(())
    }

    /// Makes the next record start a new file (a binary stream's header comes again).
    pub fn new_file(&mut self) {
        self.encoding.restart();
    }

    /// The writer (a rotated output starts its next file through it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes a record in one write (the output below is told of each write: see
    /// `signals::Watched`), after the pending runs.
    fn line<T: Serialize + ?Sized>(&mut self, v: &T) -> io::Result<()> {
        self.write_runs(true)?;
        self.scratch.clear();
        self.encoding.record(&mut self.scratch, v)?;
        self.out.write_all(&self.scratch)
    }
}

/// A fault record, written and read by this one struct: serialized by serde for the binary
/// format, and by [`write_fault`] for NDJSON; read back by replay and by
/// [`super::OutputRecord`] (the fields the model computes are read, with defaults where
/// absent, but replay does not use them: it computes them again). Its fields are in sorted
/// key order, as `serde_json` writes the other records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultJson {
    pub address: u64,
    #[serde(default)]
    pub changed: bool,
    pub error_code: Option<u32>,
    #[serde(default)]
    pub first_touch: bool,
    #[serde(default)]
    pub ip: u64,
    #[serde(default)]
    pub page_kind: Option<TouchKind>,
    #[serde(default)]
    pub pages: u64,
    pub pid: u32,
    #[serde(default)]
    pub stack_grown_to: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack_id: Option<u64>,
    pub tid: u32,
    pub ts_ns: u64,
    /// The `type`: read by the dispatch ([`super::typed`]), not here.
    #[serde(rename = "type", skip_deserializing)]
    pub(super) kind: &'static str,
    #[serde(default)]
    pub vma_start: Option<u64>,
    pub write: Option<bool>,
}

impl FaultJson {
    fn new(f: &FaultRecord, applied: &Applied) -> Self {
        let fe = match applied {
            Applied::Fault(fe) => Some(fe),
            _ => None,
        };
        let (first_touch, page_kind, changed) = match fe.map(|fe| fe.touch) {
            Some(Touch::First { kind, refault }) => (true, Some(kind), refault),
            Some(Touch::Upgraded { .. }) => (false, Some(TouchKind::Anon), true),
            Some(Touch::Again) | None => (false, None, false),
        };
        Self {
            address: f.address,
            changed,
            error_code: f.error_code,
            first_touch,
            ip: f.ip,
            page_kind,
            pages: fe.map_or(0, |fe| fe.pages),
            pid: f.pid,
            stack_grown_to: fe.and_then(|fe| fe.stack_grown_to),
            stack_id: f.stack_id,
            tid: f.tid,
            ts_ns: f.ts_ns,
            kind: "fault",
            vma_start: fe.and_then(|fe| fe.vma_start),
            write: f.write(),
        }
    }

    /// The fault a record read back holds.
    pub(crate) fn into_record(self) -> FaultRecord {
        FaultRecord {
            ts_ns: self.ts_ns,
            pid: self.pid,
            tid: self.tid,
            address: self.address,
            ip: self.ip,
            error_code: self.error_code,
            write_from_page: self.write,
            stack_id: self.stack_id,
        }
    }
}

/// Writes a fault record as one JSON object, the bytes `serde_json` writes for it (unit
/// test), without `core::fmt`: faults are most of a trace, and this is the daemon's hottest
/// output path (formatting through `write!` was half of the daemon's time). Every value is a
/// number, a boolean, null or one of the fixed page-kind names, so nothing needs escaping.
pub(super) fn write_fault(out: &mut Vec<u8>, j: &FaultJson) {
    let mut num = itoa::Buffer::new();
    let mut put = |out: &mut Vec<u8>, key: &str, value: Option<u64>| {
        out.extend_from_slice(key.as_bytes());
        match value {
            Some(v) => out.extend_from_slice(num.format(v).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    };
    let boolean = |b: bool| if b { "true" } else { "false" };
    put(out, "{\"address\":", Some(j.address));
    out.extend_from_slice(b",\"changed\":");
    out.extend_from_slice(boolean(j.changed).as_bytes());
    put(out, ",\"error_code\":", j.error_code.map(u64::from));
    out.extend_from_slice(b",\"first_touch\":");
    out.extend_from_slice(boolean(j.first_touch).as_bytes());
    put(out, ",\"ip\":", Some(j.ip));
    out.extend_from_slice(b",\"page_kind\":");
    match j.page_kind {
        Some(kind) => {
            out.push(b'"');
            out.extend_from_slice(kind.name().as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    put(out, ",\"pages\":", Some(j.pages));
    put(out, ",\"pid\":", Some(u64::from(j.pid)));
    put(out, ",\"stack_grown_to\":", j.stack_grown_to);
    if j.stack_id.is_some() {
        put(out, ",\"stack_id\":", j.stack_id);
    }
    put(out, ",\"tid\":", Some(u64::from(j.tid)));
    put(out, ",\"ts_ns\":", Some(j.ts_ns));
    out.extend_from_slice(b",\"type\":\"fault\"");
    put(out, ",\"vma_start\":", j.vma_start);
    out.extend_from_slice(b",\"write\":");
    out.extend_from_slice(j.write.map_or("null", boolean).as_bytes());
    out.push(b'}');
}

/// The `effect` object of a syscall record (fields in sorted key order, as everywhere).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EffectJson {
    pub end: u64,
    pub from: Option<u64>,
    pub kind: Cow<'static, str>,
    pub populated_pages: u64,
    pub released_pages: u64,
    pub splits: u32,
    pub start: u64,
    pub unmapped_bytes: u64,
}

/// The `flags` of a syscall record: names for `mmap`/`mremap`, the number for `openat`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FlagsJson {
    Names(String),
    Bits(u64),
}

/// A syscall record, written and read by this one struct. Its fields are in the order
/// `serde_json` sorts object keys, so the bytes are those of the same record built as a
/// `Value` (unit test); it is serialized directly because building that `Value` (a B-tree of
/// owned keys) cost the daemon about 5 µs per record. The named arguments appear only for the
/// calls that take them (the raw ones are always in `args`); they, the errno and the effect
/// are read too ([`super::OutputRecord`]), but replay does not use them: it decodes `args`
/// and applies the call again.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct SyscallJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    pub args: [u64; 6],
    /// Where the call's change is ordered (taken under the process's mmap lock), when the
    /// kernel told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_ts_ns: Option<u64>,
    pub dev: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dfd: Option<i32>,
    #[serde(default)]
    pub effect: Option<EffectJson>,
    #[serde(default)]
    pub enter_ts_ns: u64,
    #[serde(default)]
    pub errno: Option<String>,
    #[serde(default)]
    pub extra: [u64; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<FlagsJson>,
    pub inode: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_addr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_len: Option<u64>,
    pub path: Option<Cow<'a, str>>,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pidfd: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkey: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prot: Option<String>,
    /// Pages made resident without a fault, from pagemap: `[start, end, kind]` runs.
    pub resident: Option<Vec<(u64, u64, TouchKind)>>,
    pub ret: i64,
    pub shm_key: Option<u64>,
    pub shm_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shmflg: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shmid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack_id: Option<u64>,
    pub target_pid: Option<u32>,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type")]
    kind: CallName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vlen: Option<u64>,
}

/// The name of a syscall, the `type` of its record.
#[derive(Clone, Debug, Copy, Default, Serialize)]
#[serde(transparent)]
pub struct CallName(&'static str);

impl<'de> Deserialize<'de> for CallName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = Cow::<str>::deserialize(d)?;
        Syscall::ALL
            .iter()
            .map(|c| CallName(c.name()))
            .find(|c| c.0 == name)
            .ok_or_else(|| {
                serde::de::Error::custom(format_args!(
                    "unknown syscall '{}'",
                    crate::name::shown(&name)
                ))
            })
    }
}

impl<'a> SyscallJson<'a> {
    /// The call's name (the record's `type`).
    pub fn name(&self) -> &'static str {
        self.kind.0
    }

    fn new(s: &'a SyscallRecord, applied: &Applied) -> Self {
        let mut j = Self {
            args: s.args,
            commit_ts_ns: s.commit_ts_ns,
            dev: s.resolved.dev.as_deref().map(Cow::Borrowed),
            effect: match applied {
                Applied::Syscall { effect: e, .. } => Some(EffectJson {
                    end: e.end,
                    from: e.from,
                    kind: Cow::Borrowed(e.kind.name()),
                    populated_pages: e.populated_pages,
                    released_pages: e.released_pages,
                    splits: e.splits,
                    start: e.start,
                    unmapped_bytes: e.unmapped_bytes,
                }),
                _ => None,
            },
            enter_ts_ns: s.enter_ts_ns,
            errno: s.errno().map(flags::errno),
            extra: s.extra,
            inode: s.resolved.inode,
            path: s.resolved.path.as_deref().map(Cow::Borrowed),
            pid: s.pid,
            ret: s.ret,
            shm_key: s.resolved.shm.map(|(_, key)| key),
            shm_size: s.resolved.shm.map(|(size, _)| size),
            target_pid: s.resolved.target_pid,
            stack_id: s.resolved.stack_id,
            resident: s
                .resolved
                .resident
                .as_ref()
                .map(|runs| runs.iter().map(|r| (r.start, r.end, r.kind)).collect()),
            tid: s.tid,
            ts_ns: s.ts_ns,
            kind: CallName(s.call.name()),
            ..Self::default()
        };
        match s.mem() {
            MemCall::Brk { addr } | MemCall::Shmdt { addr } => j.addr = Some(addr),
            MemCall::Mmap {
                addr,
                len,
                prot,
                flags: f,
                fd,
                offset,
            } => {
                (j.addr, j.len, j.prot) = (Some(addr), Some(len), Some(flags::prot(prot)));
                j.flags = Some(FlagsJson::Names(flags::map(f)));
                (j.fd, j.offset) = (Some(fd), Some(offset));
            }
            MemCall::Munmap { addr, len }
            | MemCall::Mlock { addr, len }
            | MemCall::Munlock { addr, len } => (j.addr, j.len) = (Some(addr), Some(len)),
            MemCall::Mremap {
                addr,
                old_len,
                new_len,
                flags: f,
                new_addr,
            } => {
                (j.addr, j.old_len, j.new_len) = (Some(addr), Some(old_len), Some(new_len));
                (j.flags, j.new_addr) = (Some(FlagsJson::Names(flags::mremap(f))), Some(new_addr));
            }
            MemCall::Mprotect { addr, len, prot } => {
                (j.addr, j.len, j.prot) = (Some(addr), Some(len), Some(flags::prot(prot)));
            }
            MemCall::PkeyMprotect {
                addr,
                len,
                prot,
                pkey,
            } => {
                (j.addr, j.len, j.prot) = (Some(addr), Some(len), Some(flags::prot(prot)));
                j.pkey = Some(pkey);
            }
            MemCall::Madvise { addr, len, advice } => {
                (j.addr, j.len, j.advice) = (Some(addr), Some(len), Some(flags::madvise(advice)));
            }
            MemCall::ProcessMadvise {
                pidfd,
                addr,
                len,
                vlen,
                advice,
                ..
            } => {
                (j.pidfd, j.vlen, j.advice) =
                    (Some(pidfd), Some(vlen), Some(flags::madvise(advice)));
                (j.addr, j.len) = (Some(addr), Some(len));
            }
            MemCall::Shmat {
                shmid,
                addr,
                shmflg,
            } => {
                (j.shmid, j.addr, j.shmflg) = (Some(shmid), Some(addr), Some(shmflg));
            }
            MemCall::Openat { dfd, flags: f, .. } => {
                (j.dfd, j.flags) = (Some(dfd), Some(FlagsJson::Bits(f)));
            }
            MemCall::Mlock2 {
                addr,
                len,
                flags: f,
            } => {
                (j.addr, j.len, j.flags) = (Some(addr), Some(len), Some(FlagsJson::Bits(f)));
            }
            MemCall::Mlockall { flags: f } => j.flags = Some(FlagsJson::Names(flags::mlockall(f))),
            MemCall::Munlockall => {}
        }
        j
    }

    /// The call a record read back holds (`call`: its `type`). Its resident runs are as
    /// read: the reader checks them.
    pub(crate) fn into_record(self, call: Syscall) -> SyscallRecord {
        SyscallRecord {
            ts_ns: self.ts_ns,
            enter_ts_ns: self.enter_ts_ns,
            pid: self.pid,
            tid: self.tid,
            call,
            args: self.args,
            ret: self.ret,
            extra: self.extra,
            commit_ts_ns: self.commit_ts_ns,
            resolved: Resolved {
                path: self.path.map(Cow::into_owned),
                dev: self.dev.map(Cow::into_owned),
                inode: self.inode,
                shm: self.shm_size.zip(self.shm_key),
                target_pid: self.target_pid,
                resident: self.resident.map(|runs| {
                    runs.into_iter()
                        .map(|(start, end, kind)| ResidentRun { start, end, kind })
                        .collect()
                }),
                stack_id: self.stack_id,
            },
        }
    }
}

/// The JSON record of an event.
pub fn event_json(event: &Event, applied: &Applied) -> Value {
    match event {
        Event::Syscall(s) => {
            serde_json::to_value(SyscallJson::new(s, applied)).unwrap_or(Value::Null)
        }
        Event::Fault(f) => serde_json::to_value(FaultJson::new(f, applied)).unwrap_or(Value::Null),
        Event::Fork {
            ts_ns,
            pid,
            tid,
            child,
            followed,
            shares_vm,
        } => to_value(ForkJson::new(
            *ts_ns, *pid, *tid, *child, *followed, *shares_vm,
        )),
        Event::Exec {
            ts_ns,
            pid,
            tid,
            filename,
        } => to_value(ExecJson::new(*ts_ns, *pid, *tid, filename.clone())),
        Event::Exit { ts_ns, pid, tid } => to_value(ExitJson::new(*ts_ns, *pid, *tid)),
        // Handled by the live run before any sink: the seed snapshot that follows is recorded.
        Event::Join { .. } => Value::Null,
        Event::Open {
            ts_ns,
            pid,
            tid,
            fd,
            path,
        } => {
            json!({ "type": "open", "ts_ns": ts_ns, "pid": pid, "tid": tid, "fd": fd, "path": path })
        }
        Event::Heap(c) => {
            let effect = match applied {
                Applied::Heap(e) => Some(e),
                _ => None,
            };
            serde_json::to_value(heap::record::HeapJson::new(c, effect)).unwrap_or(Value::Null)
        }
        Event::HeapAttach {
            ts_ns,
            pid,
            path,
            allocator,
            late,
        } => to_value(heap::record::AttachJson::new(
            *ts_ns, *pid, path, *allocator, *late,
        )),
        Event::Pymalloc(r) => heap::record::pymalloc_json(r),
        // Paired before it reaches a sink.
        Event::HeapRaw(_) => Value::Null,
        Event::Collapse { ts_ns, pid, start } => {
            let pages = match applied {
                Applied::Collapsed { pages } => *pages,
                _ => 0,
            };
            to_value(CollapseJson::new(*ts_ns, *pid, *start, pages))
        }
    }
}

/// `record` as a JSON value (null if it cannot be one: never for vmatrace's records).
fn to_value(record: impl Serialize) -> Value {
    serde_json::to_value(record).unwrap_or(Value::Null)
}

/// The JSON record of a unique stack (`stack`), read back by replay as a [`StackDef`].
pub fn stack_json(ts_ns: u64, def: &StackDef) -> Value {
    Stamped::value("stack", ts_ns, def).unwrap_or(Value::Null)
}

/// The JSON record of a snapshot.
pub fn snapshot_json(ts_ns: u64, reason: SnapshotReason, p: &Process) -> Value {
    to_value(SnapshotJson::new(ts_ns, reason, p))
}

impl<W: Write> Sink for RecordSink<W> {
    fn start(&mut self, meta: &Meta) -> io::Result<()> {
        // A new file (or the first): a binary stream starts again with its header.
        self.encoding.restart();
        let ts_ns = meta
            .clock
            .as_ref()
            .map_or_else(crate::clock::monotonic_ns, |c| c.ts_ns);
        let faults = format!("{:?}", self.faults).to_lowercase();
        self.line(&to_value(MetaJson::new(
            meta,
            ts_ns,
            faults,
            SCHEMA_VERSION,
        )))
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        for f in findings {
            let v = Stamped::value("finding", crate::clock::monotonic_ns(), f)
                .map_err(io::Error::other)?;
            self.line(&v)?;
        }
        Ok(())
    }

    fn event(&mut self, event: &Event, applied: &Applied, _session: &Session) -> io::Result<()> {
        if matches!(applied, Applied::Ignored) {
            return Ok(());
        }
        if matches!(event, Event::Fault(_)) && !show_fault(self.faults, applied) {
            return Ok(());
        }
        if let (Event::Fault(f), Applied::Fault(fe), FaultFilter::First) =
            (event, applied, self.faults)
        {
            let taken = self.runs.take(f, fe, &mut self.ready);
            self.write_runs(!taken)?;
            if taken {
                return Ok(());
            }
        } else {
            self.write_runs(true)?;
        }
        self.scratch.clear();
        let (scratch, encoding) = (&mut self.scratch, &mut self.encoding);
        match event {
            Event::Fault(f) => encoding.fault(scratch, &FaultJson::new(f, applied))?,
            Event::Syscall(s) => encoding.record(scratch, &SyscallJson::new(s, applied))?,
            Event::Heap(c) => {
                let effect = match applied {
                    Applied::Heap(e) => Some(e),
                    _ => None,
                };
                encoding.record(scratch, &heap::record::HeapJson::new(c, effect))?;
            }
            Event::HeapRaw(_) => return Ok(()),
            other => return self.line(&event_json(other, applied)),
        }
        self.out.write_all(&self.scratch)
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()> {
        self.line(&snapshot_json(ts_ns, reason, p))
    }

    fn stack(&mut self, def: &StackDef) -> io::Result<()> {
        self.line(&stack_json(crate::clock::monotonic_ns(), def))
    }

    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        let v = Stamped::value("lost", ts_ns, delta).map_err(io::Error::other)?;
        self.line(&v)
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        let drift = Drift {
            differences: lines.to_vec(),
            pid,
        };
        let v = Stamped::value("drift", ts_ns, drift).map_err(io::Error::other)?;
        self.line(&v)
    }

    fn tick(&mut self, _session: &Session) -> io::Result<()> {
        // Readers of a growing file (tail -f, tests) see records within one tick.
        self.flush()
    }

    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()> {
        let v = Stamped::value("summary", ts_ns, summary).map_err(io::Error::other)?;
        self.line(&v)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_runs(true)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FaultEffect;

    /// The fault record as `serde_json` would build it: what the direct writer must equal.
    fn reference(f: &FaultRecord, applied: &Applied) -> Value {
        let fe = match applied {
            Applied::Fault(fe) => Some(*fe),
            _ => None,
        };
        let (first, kind, changed) = match fe.map(|fe| fe.touch) {
            Some(Touch::First { kind, refault }) => (true, Some(kind.name()), refault),
            Some(Touch::Upgraded { .. }) => (false, Some("anon"), true),
            _ => (false, None, false),
        };
        let mut v = json!({
            "type": "fault", "ts_ns": f.ts_ns, "pid": f.pid, "tid": f.tid,
            "address": f.address, "ip": f.ip, "error_code": f.error_code,
            "first_touch": first, "page_kind": kind, "pages": fe.map_or(0, |fe| fe.pages),
            "changed": changed, "vma_start": fe.and_then(|fe| fe.vma_start),
            "stack_grown_to": fe.and_then(|fe| fe.stack_grown_to), "write": f.write(),
        });
        if let (Value::Object(m), Some(id)) = (&mut v, f.stack_id) {
            m.insert("stack_id".into(), json!(id));
        }
        v
    }

    #[test]
    fn fault_records_written_directly_are_the_same_json() {
        let f = FaultRecord {
            ts_ns: u64::MAX,
            pid: 7,
            tid: 8,
            address: 0x7fff_ffff_f000,
            ip: 0x40_1000,
            error_code: Some(6),
            write_from_page: None,
            stack_id: None,
        };
        let effect = |touch, pages, stack| {
            Applied::Fault(FaultEffect {
                touch,
                pages,
                vma_start: Some(0x7fff_0000_0000),
                stack_grown_to: stack,
            })
        };
        let cases = [
            effect(
                Touch::First {
                    kind: TouchKind::Anon,
                    refault: true,
                },
                512,
                Some(0x7ffe_0000_0000),
            ),
            effect(
                Touch::Upgraded {
                    from: TouchKind::Zero,
                },
                0,
                None,
            ),
            effect(Touch::Again, 0, None),
            Applied::Ignored,
        ];
        for applied in &cases {
            for (error_code, write_from_page, stack_id) in [
                (Some(6), None, None),
                (None, Some(true), Some(3)),
                (None, None, None),
            ] {
                let f = FaultRecord {
                    error_code,
                    write_from_page,
                    stack_id,
                    ..f
                };
                let record = FaultJson::new(&f, applied);
                let mut line = Vec::new();
                write_fault(&mut line, &record);
                let text = String::from_utf8(line).expect("utf-8");
                assert_eq!(
                    text,
                    serde_json::to_string(&record).expect("serializes"),
                    "{applied:?}: the fast writer against the derived form"
                );
                assert_eq!(
                    text,
                    serde_json::to_string(&reference(&f, applied)).expect("serializes"),
                    "{applied:?}"
                );
            }
        }
    }

    /// A syscall record built as a `Value`, the generic way: what `SyscallJson` must equal.
    fn syscall_reference(s: &SyscallRecord, applied: &Applied) -> Value {
        let [a0, a1, a2, a3, a4, a5] = s.args;
        let named = match s.call {
            Syscall::Brk | Syscall::Shmdt => json!({ "addr": a0 }),
            Syscall::Mmap => json!({
                "addr": a0, "len": a1, "prot": flags::prot(a2), "flags": flags::map(a3),
                "fd": a4 as i64 as i32, "offset": a5,
            }),
            Syscall::Munmap => json!({ "addr": a0, "len": a1 }),
            Syscall::Mremap => json!({
                "addr": a0, "old_len": a1, "new_len": a2, "flags": flags::mremap(a3),
                "new_addr": a4,
            }),
            Syscall::Mprotect => json!({ "addr": a0, "len": a1, "prot": flags::prot(a2) }),
            Syscall::PkeyMprotect => {
                json!({ "addr": a0, "len": a1, "prot": flags::prot(a2), "pkey": a3 as i64 })
            }
            Syscall::Madvise => json!({ "addr": a0, "len": a1, "advice": flags::madvise(a2) }),
            Syscall::ProcessMadvise => json!({
                "pidfd": a0 as i64, "vlen": a2, "advice": flags::madvise(a3),
                "addr": s.extra[0], "len": s.extra[1],
            }),
            Syscall::Shmat => json!({ "shmid": a0 as i64, "addr": a1, "shmflg": a2 }),
            Syscall::Openat => json!({ "dfd": a0 as i64 as i32, "flags": a2 }),
            Syscall::Mlock | Syscall::Munlock => json!({ "addr": a0, "len": a1 }),
            Syscall::Mlock2 => json!({ "addr": a0, "len": a1, "flags": a2 }),
            Syscall::Mlockall => json!({ "flags": flags::mlockall(a0) }),
            Syscall::Munlockall => json!({}),
        };
        let effect = match applied {
            Applied::Syscall { effect: e, .. } => json!({
                "kind": e.kind.name(), "start": e.start, "end": e.end, "from": e.from,
                "unmapped_bytes": e.unmapped_bytes, "released_pages": e.released_pages,
                "splits": e.splits, "populated_pages": e.populated_pages,
            }),
            _ => Value::Null,
        };
        let mut v = json!({
            "type": s.call.name(), "ts_ns": s.ts_ns, "enter_ts_ns": s.enter_ts_ns,
            "pid": s.pid, "tid": s.tid, "args": s.args, "ret": s.ret,
            "errno": s.errno().map(flags::errno), "extra": s.extra,
            "path": s.resolved.path, "dev": s.resolved.dev, "inode": s.resolved.inode,
            "shm_size": s.resolved.shm.map(|(size, _)| size),
            "shm_key": s.resolved.shm.map(|(_, key)| key),
            "target_pid": s.resolved.target_pid, "effect": effect,
            "resident": s.resolved.resident.as_ref().map(|runs| {
                runs.iter().map(|r| json!([r.start, r.end, r.kind.name()])).collect::<Vec<_>>()
            }),
        });
        if let (Value::Object(m), Value::Object(named)) = (&mut v, named) {
            m.extend(named);
        }
        if let (Value::Object(m), Some(id)) = (&mut v, s.resolved.stack_id) {
            m.insert("stack_id".into(), json!(id));
        }
        v
    }

    #[test]
    fn syscall_records_serialized_directly_are_the_same_json() {
        use crate::model::{Effect, EffectKind};
        let effect = Effect {
            kind: EffectKind::Moved,
            start: 0x7f00_0000_0000,
            end: 0x7f00_0001_0000,
            from: Some(0x7e00_0000_0000),
            unmapped_bytes: 4096,
            released_pages: 3,
            splits: 2,
            populated_pages: 5,
        };
        let resolved = Resolved {
            path: Some("/usr/lib/libc.so.6 \"quoted\"".into()),
            dev: Some("fe:00".into()),
            inode: Some(42),
            shm: Some((8192, 0x1234)),
            target_pid: Some(77),
            resident: Some(vec![crate::model::ResidentRun {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0000_2000,
                kind: crate::model::TouchKind::Anon,
            }]),
            stack_id: Some(12),
        };
        for call in Syscall::ALL {
            for (ret, applied) in [
                (0x7f00_0000_0000, Applied::Syscall { pid: 5, effect }),
                (-12, Applied::Failed { errno: 12 }),
            ] {
                for resolved in [Resolved::default(), resolved.clone()] {
                    let s = SyscallRecord {
                        ts_ns: 1_000,
                        enter_ts_ns: 999,
                        pid: 5,
                        tid: 6,
                        call,
                        args: [0x7f00_0000_0000, 8192, 3, 0x22, u64::from(u32::MAX), 4096],
                        ret,
                        extra: [0x5000, 4096],
                        commit_ts_ns: None,
                        resolved,
                    };
                    let mut direct = Vec::new();
                    serde_json::to_writer(&mut direct, &SyscallJson::new(&s, &applied))
                        .expect("serializes");
                    assert_eq!(
                        String::from_utf8(direct).expect("utf-8"),
                        serde_json::to_string(&syscall_reference(&s, &applied))
                            .expect("serializes"),
                        "{call:?}"
                    );
                    assert_eq!(
                        event_json(&Event::Syscall(s.clone()), &applied),
                        syscall_reference(&s, &applied)
                    );
                }
            }
        }
    }
}
