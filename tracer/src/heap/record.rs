//! The NDJSON records of `--heap`: one `heap` record per allocator call and one `heap_attach`
//! record when the probes start to cover a process's allocator; written live, read back by
//! replay into the same events.

use serde::Serialize;
use serde_json::Value;

use super::{
    call::{Allocator, Chunk, HeapCall, HeapFn},
    live::HeapEffect,
};
use crate::event::Event;

/// The `effect` object of a `heap` record.
#[derive(Serialize)]
struct EffectJson {
    kind: &'static str,
    live_bytes: u64,
}

/// A `heap` record; fields in sorted key order, as `serde_json` writes other records.
#[derive(Serialize)]
pub struct HeapJson {
    allocator: &'static str,
    args: [u64; 3],
    block_bytes: Option<u64>,
    call: &'static str,
    caller: Option<u64>,
    effect: Option<EffectJson>,
    enter_ts_ns: u64,
    freed: Option<u64>,
    freed_block_bytes: Option<u64>,
    mmapped: bool,
    pid: u32,
    ptr: Option<u64>,
    ret: u64,
    size: u64,
    stack: Option<u64>,
    thread_arena: bool,
    tid: u32,
    ts_ns: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl HeapJson {
    /// The `heap` record of `c` (what the live model did: `effect`).
    pub fn new(c: &HeapCall, effect: Option<&HeapEffect>) -> Self {
        let e = c.effect();
        Self {
            allocator: c.allocator.name(),
            args: c.args,
            block_bytes: c.chunk.map(|k| k.bytes),
            call: c.func.name(),
            caller: (c.caller != 0).then_some(c.caller),
            effect: effect.map(|e| EffectJson {
                kind: e.kind.name(),
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
}

/// The record of an [`Event::HeapAttach`].
pub fn attach_json(ts_ns: u64, pid: u32, path: &str, allocator: Allocator, late: bool) -> Value {
    serde_json::json!({
        "type": "heap_attach", "ts_ns": ts_ns, "pid": pid, "path": path,
        "allocator": allocator.name(), "late": late,
    })
}

/// The `pymalloc` record of a reading of CPython's pool headers.
pub fn pymalloc_json(r: &super::pymalloc::Reading) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("type".into(), "pymalloc".into());
        m.insert("live_bytes".into(), r.live_bytes().into());
    }
    v
}

/// Reads a `pymalloc` record back.
pub fn parse_pymalloc(v: Value) -> Result<Event, String> {
    serde_json::from_value(v)
        .map(Event::Pymalloc)
        .map_err(|e| format!("bad pymalloc record: {e}"))
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

fn allocator_of(v: &Value) -> Result<Allocator, String> {
    let name = v.get("allocator").and_then(Value::as_str).unwrap_or("");
    Allocator::parse(name)
        .ok_or_else(|| format!("unknown allocator '{}'", crate::name::shown(name)))
}

/// Reads a `heap` record back into its call.
pub fn parse_heap(v: &Value) -> Result<Event, String> {
    let name = v.get("call").and_then(Value::as_str).unwrap_or("");
    let func = HeapFn::parse(name)
        .ok_or_else(|| format!("unknown allocator call '{}'", crate::name::shown(name)))?;
    let args = v
        .get("args")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 3)
        .ok_or("field 'args' must be an array of 3 integers")?;
    let mut a = [0u64; 3];
    for (o, x) in a.iter_mut().zip(args) {
        *o = x.as_u64().ok_or("field 'args' holds a non-integer")?;
    }
    let block = v.get("block_bytes").and_then(Value::as_u64);
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(Event::Heap(HeapCall {
        ts_ns: u64_of(v, "ts_ns")?,
        enter_ts_ns: v.get("enter_ts_ns").and_then(Value::as_u64).unwrap_or(0),
        pid: u32_of(v, "pid")?,
        tid: u32_of(v, "tid")?,
        func,
        allocator: allocator_of(v)?,
        args: a,
        ret: v.get("ret").and_then(Value::as_u64).unwrap_or(0),
        ptr: v.get("ptr").and_then(Value::as_u64).unwrap_or(0),
        chunk: block.map(|bytes| Chunk {
            bytes,
            mmapped: flag("mmapped"),
            thread_arena: flag("thread_arena"),
        }),
        freed_chunk: v
            .get("freed_block_bytes")
            .and_then(Value::as_u64)
            .map(|bytes| Chunk {
                bytes,
                mmapped: false,
                thread_arena: false,
            }),
        caller: v.get("caller").and_then(Value::as_u64).unwrap_or(0),
        stack: v.get("stack").and_then(Value::as_u64),
    }))
}

/// Reads a `heap_attach` record back.
pub fn parse_attach(v: &Value) -> Result<Event, String> {
    Ok(Event::HeapAttach {
        ts_ns: u64_of(v, "ts_ns")?,
        pid: u32_of(v, "pid")?,
        path: v
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        allocator: allocator_of(v)?,
        late: v.get("late").and_then(Value::as_bool).unwrap_or(false),
    })
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
        assert_eq!(parse_heap(&v), Ok(Event::Heap(c)));
        let a = attach_json(3, 5, "/lib/libc.so.6", Allocator::Glibc, true);
        assert_eq!(
            parse_attach(&a),
            Ok(Event::HeapAttach {
                ts_ns: 3,
                pid: 5,
                path: "/lib/libc.so.6".into(),
                allocator: Allocator::Glibc,
                late: true
            })
        );
        let mut bad = v.clone();
        bad["call"] = "mmap".into();
        assert!(parse_heap(&bad).is_err());
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
        assert_eq!(parse_pymalloc(v), Ok(Event::Pymalloc(r)));
        assert!(parse_pymalloc(serde_json::json!({"type": "pymalloc", "pid": 1})).is_err());
    }
}
