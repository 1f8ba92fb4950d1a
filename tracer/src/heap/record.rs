//! The NDJSON records of `--heap`: one `heap` record per allocator call and one `heap_attach`
//! record when the probes start to cover a process's allocator; written live, read back by
//! replay into the same events.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    call::{Allocator, Chunk, HeapCall, HeapFn},
    live::HeapEffect,
};
use crate::event::Event;

/// The `effect` object of a `heap` record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EffectJson {
    pub kind: Cow<'static, str>,
    pub live_bytes: u64,
}

/// A `heap` record, written and read by this one struct; fields in sorted key order, as
/// `serde_json` writes other records. What the model did (`effect`) and what is computed from
/// the call (`freed`, `size`) are read too, but replay does not use them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeapJson {
    pub allocator: Allocator,
    pub args: [u64; 3],
    pub block_bytes: Option<u64>,
    pub call: HeapFn,
    pub caller: Option<u64>,
    #[serde(default)]
    pub effect: Option<EffectJson>,
    #[serde(default)]
    pub enter_ts_ns: u64,
    #[serde(default)]
    pub freed: Option<u64>,
    pub freed_block_bytes: Option<u64>,
    #[serde(default)]
    pub mmapped: bool,
    pub pid: u32,
    pub ptr: Option<u64>,
    #[serde(default)]
    pub ret: u64,
    #[serde(default)]
    pub size: u64,
    pub stack: Option<u64>,
    #[serde(default)]
    pub thread_arena: bool,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

impl HeapJson {
    /// The `heap` record of `c` (what the live model did: `effect`).
    pub fn new(c: &HeapCall, effect: Option<&HeapEffect>) -> Self {
        let e = c.effect();
        Self {
            allocator: c.allocator,
            args: c.args,
            block_bytes: c.chunk.map(|k| k.bytes),
            call: c.func,
            caller: (c.caller != 0).then_some(c.caller),
            effect: effect.map(|e| EffectJson {
                kind: Cow::Borrowed(e.kind.name()),
                live_bytes: e.live_bytes,
            }),
            enter_ts_ns: c.enter_ts_ns,
            freed: e.freed,
            freed_block_bytes: c.freed_chunk.map(|k| k.bytes),
            mmapped: c.chunk.is_some_and(|k| k.mmapped),
            pid: c.pid,
            ptr: (c.ptr != 0).then_some(c.ptr),
            ret: c.ret,
            size: c.requested(),
            stack: c.stack,
            thread_arena: c.chunk.is_some_and(|k| k.thread_arena),
            tid: c.tid,
            ts_ns: c.ts_ns,
            kind: "heap",
        }
    }

    /// The call a record read back holds.
    pub fn into_event(self) -> Event {
        Event::Heap(HeapCall {
            ts_ns: self.ts_ns,
            enter_ts_ns: self.enter_ts_ns,
            pid: self.pid,
            tid: self.tid,
            func: self.call,
            allocator: self.allocator,
            args: self.args,
            ret: self.ret,
            ptr: self.ptr.unwrap_or(0),
            chunk: self.block_bytes.map(|bytes| Chunk {
                bytes,
                mmapped: self.mmapped,
                thread_arena: self.thread_arena,
            }),
            freed_chunk: self.freed_block_bytes.map(|bytes| Chunk {
                bytes,
                mmapped: false,
                thread_arena: false,
            }),
            caller: self.caller.unwrap_or(0),
            stack: self.stack,
            entry_stack: None,
        })
    }
}

/// A `heap_attach` record: the probes start to cover a process's allocator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachJson {
    pub allocator: Allocator,
    #[serde(default)]
    pub late: bool,
    #[serde(default)]
    pub path: String,
    pub pid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type", skip_deserializing)]
    kind: &'static str,
}

impl AttachJson {
    /// The record of an [`Event::HeapAttach`].
    pub fn new(ts_ns: u64, pid: u32, path: &str, allocator: Allocator, late: bool) -> Self {
        Self {
            allocator,
            late,
            path: path.to_string(),
            pid,
            ts_ns,
            kind: "heap_attach",
        }
    }

    /// The event a record read back holds.
    pub fn into_event(self) -> Event {
        Event::HeapAttach {
            ts_ns: self.ts_ns,
            pid: self.pid,
            path: self.path,
            allocator: self.allocator,
            late: self.late,
        }
    }
}

/// The `pymalloc` record of a reading of CPython's pool headers (read back as the
/// [`super::pymalloc::Reading`] itself).
pub fn pymalloc_json(r: &super::pymalloc::Reading) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("type".into(), "pymalloc".into());
        m.insert("live_bytes".into(), r.live_bytes().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::live::LiveKind;

    #[test]
    fn a_heap_record_reads_back_as_the_same_call() {
        let c = HeapCall {
            ts_ns: 20,
            enter_ts_ns: 19,
            pid: 5,
            tid: 6,
            func: HeapFn::Realloc,
            allocator: Allocator::Glibc,
            args: [0x1000, 300, 0],
            ret: 0x2000,
            ptr: 0x2000,
            chunk: Some(Chunk {
                bytes: 320,
                mmapped: false,
                thread_arena: true,
            }),
            freed_chunk: Some(Chunk {
                bytes: 112,
                mmapped: false,
                thread_arena: false,
            }),
            caller: 0x40_1234,
            stack: None,
            entry_stack: None,
        };
        let mut line = Vec::new();
        let effect = HeapEffect {
            kind: LiveKind::Reallocated,
            live_bytes: 320,
        };
        serde_json::to_writer(&mut line, &HeapJson::new(&c, Some(&effect))).expect("writes");
        let v: Value = serde_json::from_slice(&line).expect("JSON");
        assert_eq!(v["type"], "heap");
        assert_eq!(v["freed"], 0x1000);
        assert_eq!(v["size"], 300);
        assert_eq!(v["effect"]["kind"], "reallocated");
        let heap = |v: Value| serde_json::from_value::<HeapJson>(v).map(HeapJson::into_event);
        assert_eq!(heap(v.clone()).ok(), Some(Event::Heap(c)));
        let a = serde_json::to_value(AttachJson::new(
            3,
            5,
            "/lib/libc.so.6",
            Allocator::Glibc,
            true,
        ))
        .expect("serializes");
        assert_eq!(
            serde_json::from_value::<AttachJson>(a)
                .map(AttachJson::into_event)
                .ok(),
            Some(Event::HeapAttach {
                ts_ns: 3,
                pid: 5,
                path: "/lib/libc.so.6".into(),
                allocator: Allocator::Glibc,
                late: true
            })
        );
        let mut bad = v.clone();
        bad["call"] = "mmap".into();
        let err = heap(bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "unknown allocator call 'mmap'");
    }

    #[test]
    fn a_pymalloc_record_reads_back_as_the_same_reading() {
        use crate::heap::pymalloc::{Arena, Pool, Reading};
        let r = Reading {
            ts_ns: 7,
            pid: 3,
            pool_bytes: 16384,
            arenas: vec![Arena {
                start: 0x10_0000,
                end: 0x20_0000,
                pools: vec![Pool {
                    start: 0x10_4000,
                    block_bytes: 48,
                    blocks: 10,
                }],
                unreadable_pools: 1,
            }],
        };
        let v = pymalloc_json(&r);
        assert_eq!(
            (v["type"].as_str(), v["live_bytes"].as_u64()),
            (Some("pymalloc"), Some(480))
        );
        assert_eq!(serde_json::from_value::<Reading>(v).ok(), Some(r));
        assert!(
            serde_json::from_value::<Reading>(serde_json::json!({"type": "pymalloc", "pid": 1}))
                .is_err()
        );
    }
}
