//! NDJSON output: one complete JSON object per line (schema: `docs/json-schema.md`).

use std::io::{self, Write};

use serde_json::{Value, json};
use tracer_common::Syscall;

use super::{FaultFilter, LossSummary, Meta, Sink, Summary, report::vma_rows, show_fault};
use crate::{
    analysis::Finding,
    event::{Event, FaultRecord, SyscallRecord},
    flags,
    model::{Effect, PAGE_SIZE, Touch},
    session::{Applied, Process, Session},
};

/// The version of the record schema; replay refuses files of another version.
pub const SCHEMA_VERSION: u64 = 1;

/// Writes NDJSON records.
pub struct NdjsonSink<W: Write> {
    out: W,
    faults: FaultFilter,
    /// A fault record is formatted here first and reaches `out` in one write.
    scratch: Vec<u8>,
}

impl<W: Write> NdjsonSink<W> {
    /// A sink writing to `out`, showing faults as `faults` says.
    pub fn new(out: W, faults: FaultFilter) -> Self {
        Self {
            out,
            faults,
            scratch: Vec::with_capacity(512),
        }
    }

    fn line(&mut self, v: &Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")
    }
}

fn effect_json(e: &Effect) -> Value {
    json!({
        "kind": e.kind.name(),
        "start": e.start,
        "end": e.end,
        "from": e.from,
        "unmapped_bytes": e.unmapped_bytes,
        "released_pages": e.released_pages,
        "splits": e.splits,
    })
}

/// Writes a fault record as one JSON object, without building a `Value` first: faults are
/// most of a trace, and this is the daemon's hottest output path. Every value is a number, a
/// boolean, null or one of the fixed page-kind names, so nothing needs escaping. Keys are in
/// the order `serde_json` writes the other records' keys (sorted).
fn write_fault(out: &mut impl Write, f: &FaultRecord, applied: &Applied) -> io::Result<()> {
    let fe = match applied {
        Applied::Fault(fe) => Some(fe),
        _ => None,
    };
    let (first, kind, changed) = match fe.map(|fe| fe.touch) {
        Some(Touch::First { kind, refault }) => (true, Some(kind.name()), refault),
        Some(Touch::Upgraded { .. }) => (false, Some("anon"), true),
        Some(Touch::Again) | None => (false, None, false),
    };
    write!(
        out,
        "{{\"address\":{},\"changed\":{changed},\"error_code\":{},\"first_touch\":{first},\"ip\":{},\"page_kind\":{},\"pages\":{},\"pid\":{},\"stack_grown_to\":{},\"tid\":{},\"ts_ns\":{},\"type\":\"fault\",\"vma_start\":{}}}",
        f.address,
        JsonOpt(f.error_code.map(u64::from)),
        f.ip,
        JsonName(kind),
        fe.map_or(0, |fe| fe.pages),
        f.pid,
        JsonOpt(fe.and_then(|fe| fe.stack_grown_to)),
        f.tid,
        f.ts_ns,
        JsonOpt(fe.and_then(|fe| fe.vma_start)),
    )
}

/// A JSON number or null.
struct JsonOpt(Option<u64>);

impl std::fmt::Display for JsonOpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

/// A JSON string that needs no escaping (a fixed name), or null.
struct JsonName(Option<&'static str>);

impl std::fmt::Display for JsonName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "\"{v}\""),
            None => f.write_str("null"),
        }
    }
}

/// The named arguments of a syscall record (the raw ones are in `args`).
fn named_args(s: &SyscallRecord) -> Value {
    let [a0, a1, a2, a3, a4, a5] = s.args;
    match s.call {
        Syscall::Brk => json!({ "addr": a0 }),
        Syscall::Mmap => json!({
            "addr": a0, "len": a1, "prot": flags::prot(a2), "flags": flags::map(a3),
            "fd": a4 as i64 as i32, "offset": a5,
        }),
        Syscall::Munmap => json!({ "addr": a0, "len": a1 }),
        Syscall::Mremap => json!({
            "addr": a0, "old_len": a1, "new_len": a2, "flags": flags::mremap(a3), "new_addr": a4,
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
        Syscall::Shmdt => json!({ "addr": a0 }),
        Syscall::Openat => json!({ "dfd": a0 as i64 as i32, "flags": a2 }),
    }
}

/// The JSON record of an event.
pub fn event_json(event: &Event, applied: &Applied) -> Value {
    match event {
        Event::Syscall(s) => {
            let mut v = json!({
                "type": s.call.name(),
                "ts_ns": s.ts_ns,
                "enter_ts_ns": s.enter_ts_ns,
                "pid": s.pid,
                "tid": s.tid,
                "args": s.args,
                "ret": s.ret,
                "errno": s.errno().map(flags::errno),
                "extra": s.extra,
                "path": s.resolved.path,
                "dev": s.resolved.dev,
                "inode": s.resolved.inode,
                "shm_size": s.resolved.shm.map(|(size, _)| size),
                "shm_key": s.resolved.shm.map(|(_, key)| key),
                "target_pid": s.resolved.target_pid,
            });
            if let (Value::Object(m), Value::Object(named)) = (&mut v, named_args(s)) {
                for (k, val) in named {
                    m.entry(k).or_insert(val);
                }
                m.insert(
                    "effect".into(),
                    match applied {
                        Applied::Syscall { effect, .. } => effect_json(effect),
                        _ => Value::Null,
                    },
                );
            }
            v
        }
        Event::Fault(f) => {
            let mut line = Vec::with_capacity(256);
            // Writing to a Vec cannot fail.
            let _ = write_fault(&mut line, f, applied);
            serde_json::from_slice(&line).unwrap_or(Value::Null)
        }
        Event::Fork {
            ts_ns,
            pid,
            tid,
            child,
            followed,
        } => json!({
            "type": "fork", "ts_ns": ts_ns, "pid": pid, "tid": tid,
            "child": child, "followed": followed,
        }),
        Event::Exec {
            ts_ns,
            pid,
            tid,
            filename,
        } => {
            json!({ "type": "exec", "ts_ns": ts_ns, "pid": pid, "tid": tid, "filename": filename })
        }
        Event::Exit { ts_ns, pid, tid } => {
            json!({ "type": "exit", "ts_ns": ts_ns, "pid": pid, "tid": tid })
        }
        Event::Open {
            ts_ns,
            pid,
            tid,
            fd,
            path,
        } => {
            json!({ "type": "open", "ts_ns": ts_ns, "pid": pid, "tid": tid, "fd": fd, "path": path })
        }
    }
}

/// The JSON record of a snapshot.
pub fn snapshot_json(ts_ns: u64, reason: &str, p: &Process) -> Value {
    let brk = p.space.heap();
    let thp = p.space.thp();
    let kib = |pages: &[u64]| -> Vec<u64> { pages.iter().map(|n| n * PAGE_SIZE / 1024).collect() };
    // A seed (or exec) lists the pages already resident, so that a replay starts from them.
    let resident = matches!(reason, "seed" | "exec").then(|| {
        p.space
            .pages()
            .runs()
            .iter()
            .map(|r| json!([r.start, r.end, r.kind.name()]))
            .collect::<Vec<_>>()
    });
    json!({
        "type": "snapshot",
        "ts_ns": ts_ns,
        "pid": p.pid,
        "reason": reason,
        "exe": p.exe,
        "brk_start": brk.map(|b| b.start),
        "brk": brk.map(|b| b.current),
        "vmas": vma_rows(p),
        "thp": {
            "always_kib": kib(&thp.always),
            "madvise_kib": kib(&thp.madvise),
            "huge_zero_page": thp.huge_zero_page,
        },
        "resident": resident,
    })
}

impl<W: Write> Sink for NdjsonSink<W> {
    fn start(&mut self, meta: &Meta) -> io::Result<()> {
        self.line(&json!({
            "type": "meta",
            "ts_ns": crate::clock::monotonic_ns(),
            "version": SCHEMA_VERSION,
            "tool": concat!("vmatrace ", env!("CARGO_PKG_VERSION")),
            "fault_backend": meta.fault_backend,
            "faults": format!("{:?}", self.faults).to_lowercase(),
            "max_map_count": meta.limits.max_map_count,
            "cpus": meta.limits.cpus,
        }))
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        for f in findings {
            let mut v = serde_json::to_value(f).map_err(io::Error::other)?;
            if let Value::Object(m) = &mut v {
                m.insert("type".into(), json!("finding"));
                m.insert("ts_ns".into(), json!(crate::clock::monotonic_ns()));
            }
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
        if let Event::Fault(f) = event {
            self.scratch.clear();
            write_fault(&mut self.scratch, f, applied)?;
            self.scratch.push(b'\n');
            return self.out.write_all(&self.scratch);
        }
        self.line(&event_json(event, applied))
    }

    fn snapshot(&mut self, ts_ns: u64, reason: &str, p: &Process) -> io::Result<()> {
        self.line(&snapshot_json(ts_ns, reason, p))
    }

    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        let mut v = serde_json::to_value(delta).map_err(io::Error::other)?;
        if let Value::Object(m) = &mut v {
            m.insert("type".into(), json!("lost"));
            m.insert("ts_ns".into(), json!(ts_ns));
        }
        self.line(&v)
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        self.line(&json!({ "type": "drift", "ts_ns": ts_ns, "pid": pid, "differences": lines }))
    }

    fn tick(&mut self, _session: &Session) -> io::Result<()> {
        // Readers of a growing file (tail -f, tests) see records within one tick.
        self.out.flush()
    }

    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()> {
        let mut v = serde_json::to_value(summary).map_err(io::Error::other)?;
        if let Value::Object(m) = &mut v {
            m.insert("type".into(), json!("summary"));
            m.insert("ts_ns".into(), json!(ts_ns));
        }
        self.line(&v)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FaultEffect, TouchKind};

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
        json!({
            "type": "fault", "ts_ns": f.ts_ns, "pid": f.pid, "tid": f.tid,
            "address": f.address, "ip": f.ip, "error_code": f.error_code,
            "first_touch": first, "page_kind": kind, "pages": fe.map_or(0, |fe| fe.pages),
            "changed": changed, "vma_start": fe.and_then(|fe| fe.vma_start),
            "stack_grown_to": fe.and_then(|fe| fe.stack_grown_to),
        })
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
            for error_code in [Some(6), None] {
                let f = FaultRecord { error_code, ..f };
                let mut line = Vec::new();
                write_fault(&mut line, &f, applied).expect("writes");
                let text = String::from_utf8(line).expect("utf-8");
                assert_eq!(
                    text,
                    serde_json::to_string(&reference(&f, applied)).expect("serializes"),
                    "{applied:?}"
                );
            }
        }
    }
}
