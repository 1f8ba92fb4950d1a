//! Memory by call stack in the formats profilers already read: a gzipped pprof profile
//! (`go tool pprof`, Pyroscope, Grafana) and folded stacks (flame graph tools, inferno).
//! Both are made from the stacks of a session (live or replayed) and what `stacks::sites`
//! charged to each.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
};

use serde::Serialize;

use crate::{
    session::Session,
    stacks::{
        Frame, StackDef,
        sites::{SiteStats, is_runtime},
    },
};

/// One stack's numbers over every process of the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StackTotals {
    pub stats: SiteStats,
    pub still_mapped_bytes: u64,
}

/// The totals of every stack the session knows, by id (ordered).
pub fn totals(session: &Session) -> BTreeMap<u64, StackTotals> {
    let mut out: BTreeMap<u64, StackTotals> = BTreeMap::new();
    for p in session.processes() {
        let still = p.sites.still_mapped();
        for (&id, s) in &p.sites.by_stack {
            let t = out.entry(id).or_default();
            t.stats.calls += s.calls;
            t.stats.reserved_bytes += s.reserved_bytes;
            t.stats.touched_bytes += s.touched_bytes;
            t.stats.released_bytes += s.released_bytes;
            t.stats.first_touches += s.first_touches;
            t.stats.first_touch_bytes += s.first_touch_bytes;
            t.still_mapped_bytes += still.get(&id).copied().unwrap_or(0);
        }
    }
    out
}

/// The value of a stack in folded output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FoldedValue {
    /// Bytes the stack mapped.
    Reserved,
    /// Bytes of those first touched, plus bytes first touched by code on this stack
    /// (`--fault-stacks`).
    Touched,
    /// Bytes of those still mapped at the end.
    StillMapped,
    /// Syscalls made with the stack.
    Calls,
}

impl FoldedValue {
    fn of(self, t: &StackTotals) -> u64 {
        match self {
            Self::Reserved => t.stats.reserved_bytes,
            Self::Touched => t.stats.touched_bytes + t.stats.first_touch_bytes,
            Self::StillMapped => t.still_mapped_bytes,
            Self::Calls => t.stats.calls,
        }
    }
}

/// A frame's name in folded stacks (`;` and newlines would break the format).
fn folded_name(f: &Frame) -> String {
    let name = match &f.function {
        Some(func) => func.clone(),
        None => f.label(),
    };
    name.replace([';', '\n', '\r'], "_")
}

/// Each unique stack of function names, root first, with its value (stacks that differ
/// only in addresses or lines are one, their values added).
pub fn by_names(
    session: &Session,
    value: impl Fn(&StackTotals) -> u64,
) -> BTreeMap<Vec<String>, u64> {
    let mut stacks: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for (id, t) in totals(session) {
        let Some(def) = session.stacks.get(id) else {
            continue;
        };
        let names: Vec<String> = def.frames.iter().rev().map(folded_name).collect();
        *stacks.entry(names).or_default() += value(&t);
    }
    stacks
}

/// Folded stacks: one line per unique stack of function names (see [`by_names`]), frames
/// separated by `;`, then a space and the stack's value.
pub fn write_folded(out: &mut impl Write, session: &Session, value: FoldedValue) -> io::Result<()> {
    for (names, v) in by_names(session, |t| value.of(t)) {
        writeln!(out, "{} {v}", names.join(";"))?;
    }
    Ok(())
}

/// A protobuf message being written (the pprof schema is small enough to write by hand).
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// An integer field (omitted when 0, as proto3 does).
    fn int(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, 0);
            self.varint(v);
        }
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn msg(&mut self, field: u32, m: Msg) {
        self.bytes(field, &m.0);
    }

    fn packed(&mut self, field: u32, values: impl IntoIterator<Item = u64>) {
        let mut inner = Msg::default();
        for v in values {
            inner.varint(v);
        }
        self.bytes(field, &inner.0);
    }
}

/// The string table of a profile.
#[derive(Default)]
struct Strings {
    index: HashMap<String, u64>,
    table: Vec<String>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> u64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as u64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The sample types of the profile, in value order.
pub const SAMPLE_TYPES: [(&str, &str); 6] = [
    ("calls", "count"),
    ("reserved", "bytes"),
    ("touched", "bytes"),
    ("still_mapped", "bytes"),
    ("released", "bytes"),
    ("touched_by_code", "bytes"),
];

/// The frames a pprof sample keeps: from the call site out. The allocator's and libc's frames
/// above it are left out (as Go's heap profiles leave out the runtime's), so a function's
/// flat value is what it asked for; the whole stack stays in the recording and in the
/// folded output.
fn sample_frames(def: &StackDef) -> &[Frame] {
    let first = def.frames.iter().position(|f| !is_runtime(f)).unwrap_or(0);
    // An inlined function is its caller's location: start at the first frame of that
    // location.
    let mut start = first;
    while start > 0 && def.frames[start - 1].addr == def.frames[first].addr {
        start -= 1;
    }
    &def.frames[start..]
}

/// The pprof profile (`profile.proto`) of the session, uncompressed.
pub fn pprof(session: &Session, time_ns: u64) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut profile = Msg::default();
    for (ty, unit) in SAMPLE_TYPES {
        let mut vt = Msg::default();
        vt.int(1, strings.get(ty));
        vt.int(2, strings.get(unit));
        profile.msg(1, vt);
    }
    // Mappings: one per module, covering the addresses seen in it.
    let mut modules: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut locations: HashMap<(Option<String>, u64), u64> = HashMap::new();
    let mut functions_msg = Vec::new();
    let mut locations_msg = Vec::new();
    let mut samples = Vec::new();
    let totals = totals(session);
    for def in session.stacks.iter() {
        for f in &def.frames {
            if let Some(m) = &f.module {
                let e = modules
                    .entry(m.clone())
                    .or_insert((f.addr, f.addr + 1, f.offset));
                if f.addr < e.0 {
                    (e.0, e.2) = (f.addr, f.offset);
                }
                e.1 = e.1.max(f.addr + 1);
            }
        }
    }
    let mapping_ids: HashMap<String, u64> = modules
        .keys()
        .enumerate()
        .map(|(i, m)| (m.clone(), i as u64 + 1))
        .collect();
    for (id, t) in &totals {
        let Some(def) = session.stacks.get(*id) else {
            continue;
        };
        let frames = sample_frames(def);
        let mut loc_ids = Vec::new();
        let mut i = 0;
        while i < frames.len() {
            // The frames of one address: inlined functions, then the one they are in.
            let mut j = i;
            while j + 1 < frames.len() && frames[j].inlined && frames[j + 1].addr == frames[i].addr
            {
                j += 1;
            }
            let group = &frames[i..=j];
            let key = (frames[i].module.clone(), frames[i].addr);
            let next_id = locations.len() as u64 + 1;
            let loc_id = *locations.entry(key).or_insert_with(|| {
                let mut loc = Msg::default();
                loc.int(1, next_id);
                if let Some(m) = &frames[i].module {
                    loc.int(2, mapping_ids.get(m).copied().unwrap_or(0));
                }
                loc.int(3, frames[i].addr);
                for f in group {
                    let name = f.function.clone().unwrap_or_else(|| f.label());
                    let file = f.file.clone().unwrap_or_default();
                    let next_fn = functions.len() as u64 + 1;
                    let fn_id = *functions
                        .entry((name.clone(), file.clone()))
                        .or_insert_with(|| {
                            let mut func = Msg::default();
                            func.int(1, next_fn);
                            func.int(2, strings.get(&name));
                            func.int(3, strings.get(&name));
                            func.int(4, strings.get(&file));
                            functions_msg.push(func);
                            next_fn
                        });
                    let mut line = Msg::default();
                    line.int(1, fn_id);
                    line.int(2, u64::from(f.line.unwrap_or(0)));
                    loc.msg(4, line);
                }
                locations_msg.push(loc);
                next_id
            });
            loc_ids.push(loc_id);
            i = j + 1;
        }
        let mut sample = Msg::default();
        sample.packed(1, loc_ids);
        sample.packed(
            2,
            [
                t.stats.calls,
                t.stats.reserved_bytes,
                t.stats.touched_bytes,
                t.still_mapped_bytes,
                t.stats.released_bytes,
                t.stats.first_touch_bytes,
            ],
        );
        samples.push(sample);
    }
    for s in samples {
        profile.msg(2, s);
    }
    for (module, (start, limit, offset)) in &modules {
        let mut m = Msg::default();
        m.int(1, mapping_ids.get(module).copied().unwrap_or(0));
        m.int(2, *start);
        m.int(3, *limit);
        m.int(4, *offset);
        m.int(5, strings.get(module));
        m.int(7, 1);
        m.int(8, 1);
        m.int(9, 1);
        m.int(10, 1);
        profile.msg(3, m);
    }
    for l in locations_msg {
        profile.msg(4, l);
    }
    for f in functions_msg {
        profile.msg(5, f);
    }
    let default_type = strings.get("reserved");
    for s in &strings.table {
        profile.bytes(6, s.as_bytes());
    }
    profile.int(9, time_ns);
    profile.int(14, default_type);
    profile.0
}

/// The gzipped pprof profile of the session.
pub fn write_pprof(out: &mut impl Write, session: &Session, time_ns: u64) -> io::Result<()> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&pprof(session, time_ns))?;
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_are_protobuf() {
        let mut m = Msg::default();
        m.int(1, 150);
        assert_eq!(m.0, [0x08, 0x96, 0x01]);
        let mut m = Msg::default();
        m.bytes(2, b"ab");
        assert_eq!(m.0, [0x12, 2, b'a', b'b']);
        let mut m = Msg::default();
        m.int(3, 0);
        assert!(m.0.is_empty(), "zero is the default and not written");
        let mut m = Msg::default();
        m.packed(4, [1, 300]);
        assert_eq!(m.0, [0x22, 3, 1, 0xac, 0x02]);
    }

    #[test]
    fn samples_start_at_the_call_site() {
        let frame = |module: &str, function: &str, addr: u64, inlined: bool| Frame {
            addr,
            module: Some(module.into()),
            function: Some(function.into()),
            inlined,
            ..Frame::default()
        };
        let def = StackDef {
            id: 1,
            frames: vec![
                frame("/lib/libc.so.6", "__mmap64", 1, false),
                frame("/bin/w", "helper", 2, true),
                frame("/bin/w", "map_region", 2, false),
                frame("/bin/w", "main", 3, false),
            ],
        };
        let kept: Vec<_> = sample_frames(&def)
            .iter()
            .filter_map(|f| f.function.as_deref())
            .collect();
        assert_eq!(kept, ["helper", "map_region", "main"]);
    }
}
