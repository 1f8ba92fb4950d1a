//! A recording's records read back typed, each by the struct that writes it: the one reader
//! of the schema (`docs/json-schema.md`) for replay's dispatch and for the tests.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use tracer_common::Syscall;

use super::{
    LossSummary, Summary,
    process_records::{CollapseJson, ExecJson, ExitJson, ForkJson, MetaJson, SnapshotJson},
    records::{FaultJson, SyscallJson},
    touch_runs::TouchesRecord,
};
use crate::{
    finding::Finding,
    heap::{
        pymalloc::Reading,
        record::{AttachJson, HeapJson},
    },
    stacks::StackDef,
};

/// A record whose body is a plain type that knows nothing of records (`stack`, `lost`,
/// `summary`, `finding`, `drift`): the body with the record's `type` and `ts_ns`. Written
/// through a JSON value, so that its keys come sorted like every record's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
    #[serde(flatten)]
    pub record: T,
}

impl<T: Serialize> Stamped<T> {
    /// The record `kind` of `record` at `ts_ns`, as a JSON value.
    pub(crate) fn value(kind: &'static str, ts_ns: u64, record: T) -> serde_json::Result<Value> {
        serde_json::to_value(Self {
            ts_ns,
            kind,
            record,
        })
    }
}

/// The body of a `drift` record: where the model and the kernel disagree (`--reconcile`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drift {
    pub differences: Vec<String>,
    pub pid: u32,
}

/// The types of record other than syscalls (whose type is the call's name), by their
/// `type`.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RecordType {
    Meta,
    Snapshot,
    Fault,
    Touches,
    Stack,
    Fork,
    Exec,
    Exit,
    Collapse,
    Lost,
    Heap,
    HeapAttach,
    Pymalloc,
    Summary,
    Drift,
    Finding,
}

/// The type of a record `v`: a syscall, or one of the others.
pub(crate) enum TypeOf {
    Syscall(Syscall),
    Other(RecordType),
}

/// The type of the record `v` (by its `type` field).
pub(crate) fn type_of(v: &Value) -> Result<TypeOf, String> {
    let ty = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no 'type' field")?;
    if let Some(call) = Syscall::ALL.iter().copied().find(|s| s.name() == ty) {
        return Ok(TypeOf::Syscall(call));
    }
    RecordType::deserialize(&v["type"])
        .map(TypeOf::Other)
        .map_err(|_| format!("unknown record type '{ty}'"))
}

/// `v` read as the record type `T` (`ty` names it in errors).
pub(crate) fn typed<T: DeserializeOwned>(v: Value, ty: &str) -> Result<T, String> {
    serde_json::from_value(v)
        .map_err(|e| format!("bad {ty} record: {}", crate::name::shown(&e.to_string())))
}

/// One record of a recording, read by the struct that writes it. Fields that replay
/// recomputes (a fault's `vma_start`, a syscall's `effect`) are read too. The two large
/// records are boxed, so that a list of records costs about what its faults do.
#[derive(Clone, Debug)]
pub enum OutputRecord {
    Meta(MetaJson),
    Snapshot(Box<SnapshotJson>),
    Fault(FaultJson),
    /// A run of first touches ([`TouchesRecord::fault_records`] gives its faults).
    Touches(TouchesRecord),
    Stack(Stamped<StackDef>),
    Fork(ForkJson),
    Exec(ExecJson),
    Exit(ExitJson),
    Collapse(CollapseJson),
    Lost(Stamped<LossSummary>),
    Heap(HeapJson),
    HeapAttach(AttachJson),
    /// A reading of pymalloc's arenas (its `live_bytes` is [`Reading::live_bytes`]).
    Pymalloc(Reading),
    Summary(Stamped<Summary>),
    Drift(Stamped<Drift>),
    Finding(Stamped<Finding>),
    /// A memory syscall (its `type` is the call's name: [`SyscallJson::name`]).
    Syscall(Box<SyscallJson<'static>>),
}

impl OutputRecord {
    /// Reads the record `v` (a line of NDJSON, or a binary record, as a JSON value).
    pub fn from_value(v: Value) -> Result<Self, String> {
        let kind = match type_of(&v)? {
            TypeOf::Syscall(call) => return Ok(Self::Syscall(Box::new(typed(v, call.name())?))),
            TypeOf::Other(kind) => kind,
        };
        Ok(match kind {
            RecordType::Meta => Self::Meta(typed(v, "meta")?),
            RecordType::Snapshot => Self::Snapshot(Box::new(typed(v, "snapshot")?)),
            RecordType::Fault => Self::Fault(typed(v, "fault")?),
            RecordType::Touches => Self::Touches(typed(v, "touches")?),
            RecordType::Stack => Self::Stack(typed(v, "stack")?),
            RecordType::Fork => Self::Fork(typed(v, "fork")?),
            RecordType::Exec => Self::Exec(typed(v, "exec")?),
            RecordType::Exit => Self::Exit(typed(v, "exit")?),
            RecordType::Collapse => Self::Collapse(typed(v, "collapse")?),
            RecordType::Lost => Self::Lost(typed(v, "lost")?),
            RecordType::Heap => Self::Heap(typed(v, "heap")?),
            RecordType::HeapAttach => Self::HeapAttach(typed(v, "heap_attach")?),
            RecordType::Pymalloc => Self::Pymalloc(typed(v, "pymalloc")?),
            RecordType::Summary => Self::Summary(typed(v, "summary")?),
            RecordType::Drift => Self::Drift(typed(v, "drift")?),
            RecordType::Finding => Self::Finding(typed(v, "finding")?),
        })
    }

    /// The record's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Meta(_) => "meta",
            Self::Snapshot(_) => "snapshot",
            Self::Fault(_) => "fault",
            Self::Touches(_) => "touches",
            Self::Stack(_) => "stack",
            Self::Fork(_) => "fork",
            Self::Exec(_) => "exec",
            Self::Exit(_) => "exit",
            Self::Collapse(_) => "collapse",
            Self::Lost(_) => "lost",
            Self::Heap(_) => "heap",
            Self::HeapAttach(_) => "heap_attach",
            Self::Pymalloc(_) => "pymalloc",
            Self::Summary(_) => "summary",
            Self::Drift(_) => "drift",
            Self::Finding(_) => "finding",
            Self::Syscall(s) => s.name(),
        }
    }

    /// The record's `ts_ns` (a `meta` record written before it had one: 0).
    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Meta(r) => r.ts_ns.unwrap_or(0),
            Self::Snapshot(r) => r.ts_ns,
            Self::Fault(r) => r.ts_ns,
            Self::Touches(r) => r.ts_ns,
            Self::Stack(r) => r.ts_ns,
            Self::Fork(r) => r.ts_ns,
            Self::Exec(r) => r.ts_ns,
            Self::Exit(r) => r.ts_ns,
            Self::Collapse(r) => r.ts_ns,
            Self::Lost(r) => r.ts_ns,
            Self::Heap(r) => r.ts_ns,
            Self::HeapAttach(r) => r.ts_ns,
            Self::Pymalloc(r) => r.ts_ns,
            Self::Summary(r) => r.ts_ns,
            Self::Drift(r) => r.ts_ns,
            Self::Finding(r) => r.ts_ns,
            Self::Syscall(r) => r.ts_ns,
        }
    }

    /// The process the record is about, if it is about one.
    pub fn pid(&self) -> Option<u32> {
        Some(match self {
            Self::Snapshot(r) => r.pid,
            Self::Fault(r) => r.pid,
            Self::Touches(r) => r.pid,
            Self::Fork(r) => r.pid,
            Self::Exec(r) => r.pid,
            Self::Exit(r) => r.pid,
            Self::Collapse(r) => r.pid,
            Self::Heap(r) => r.pid,
            Self::HeapAttach(r) => r.pid,
            Self::Pymalloc(r) => r.pid,
            Self::Drift(r) => r.record.pid,
            Self::Finding(r) => r.record.pid,
            Self::Syscall(r) => r.pid,
            Self::Meta(_) | Self::Stack(_) | Self::Lost(_) | Self::Summary(_) => return None,
        })
    }

    /// The stack (its `stack` record's id) of a syscall or a fault, if it has one.
    pub fn stack_id(&self) -> Option<u64> {
        match self {
            Self::Syscall(s) => s.stack_id,
            Self::Fault(f) => f.stack_id,
            _ => None,
        }
    }

    /// The record as a syscall, if it is one.
    pub fn syscall(&self) -> Option<&SyscallJson<'static>> {
        match self {
            Self::Syscall(s) => Some(s),
            _ => None,
        }
    }

    /// The record as a syscall named `name` (`mmap`), if it is one.
    pub fn call(&self, name: &str) -> Option<&SyscallJson<'static>> {
        self.syscall().filter(|s| s.name() == name)
    }

    /// The record as a fault, if it is one.
    pub fn fault(&self) -> Option<&FaultJson> {
        match self {
            Self::Fault(f) => Some(f),
            _ => None,
        }
    }

    /// The record as a snapshot, if it is one.
    pub fn snapshot(&self) -> Option<&SnapshotJson> {
        match self {
            Self::Snapshot(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_by_their_writers_and_written_back_the_same() {
        let lines = [
            r#"{"address":4096,"changed":false,"error_code":6,"first_touch":true,"ip":1,"page_kind":"anon","pages":1,"pid":2,"stack_grown_to":null,"tid":3,"ts_ns":4,"type":"fault","vma_start":4096,"write":true}"#,
            r#"{"differences":["a"],"pid":5,"ts_ns":6,"type":"drift"}"#,
        ];
        for line in lines {
            let v: Value = serde_json::from_str(line).expect("JSON");
            let typed = OutputRecord::from_value(v).expect("a record");
            let back = match &typed {
                OutputRecord::Fault(f) => {
                    let mut out = Vec::new();
                    super::super::records::write_fault(&mut out, f);
                    String::from_utf8(out).expect("utf-8")
                }
                OutputRecord::Drift(d) => serde_json::to_string(
                    &Stamped::value("drift", d.ts_ns, &d.record).expect("a value"),
                )
                .expect("JSON"),
                _ => unreachable!(),
            };
            assert_eq!(back, line);
        }
        let bad = serde_json::json!({"type": "mmap"});
        assert!(OutputRecord::from_value(bad).is_err());
    }
}
