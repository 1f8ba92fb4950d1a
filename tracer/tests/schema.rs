//! Every record vmatrace writes matches the schema documented in docs/json-schema.md.
//!
//! These tests read records as JSON values on purpose, not as the typed records of
//! `tracer::output::OutputRecord` (which the other tests use): what they check is the JSON as
//! written, the documented field names and their JSON types, which a typed reader would
//! accept or fill in without telling (a missing field with a default, an extra one ignored).

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

/// Record type -> required fields, from the ```schema block of the document.
fn documented() -> BTreeMap<String, Vec<String>> {
    let doc = include_str!("../../docs/json-schema.md");
    let block = doc
        .split("```schema")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the document has a schema block");
    let mut out = BTreeMap::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (types, fields) = line.split_once(':').expect("type: fields");
        let fields: Vec<String> = fields.split_whitespace().map(str::to_string).collect();
        for t in types.split_whitespace() {
            out.insert(t.to_string(), fields.clone());
        }
    }
    out
}

fn check(
    records: &[Value],
    schema: &BTreeMap<String, Vec<String>>,
    seen: &mut BTreeMap<String, usize>,
) {
    for r in records {
        let ty = r["type"].as_str().expect("every record has a string type");
        let fields = schema
            .get(ty)
            .unwrap_or_else(|| panic!("record type '{ty}' is not documented: {r}"));
        for f in fields {
            assert!(
                r.get(f).is_some(),
                "record '{ty}' lacks documented field '{f}': {r}"
            );
        }
        // `type.field: ...` lines: each element of the array `field` has those fields.
        for (key, fields) in schema {
            let Some(array) = key.strip_prefix(&format!("{ty}.")) else {
                continue;
            };
            let items = r[array]
                .as_array()
                .unwrap_or_else(|| panic!("record '{ty}' has no array '{array}': {r}"));
            for item in items {
                for f in fields {
                    assert!(
                        item.get(f).is_some(),
                        "an element of '{ty}.{array}' lacks documented field '{f}': {item}"
                    );
                }
            }
        }
        *seen.entry(ty.to_string()).or_default() += 1;
    }
}

#[test]
fn record_types_match_the_documented_schema() {
    if !privileged("record_types_match_the_documented_schema") {
        return;
    }
    let schema = documented();
    let mut seen = BTreeMap::new();
    for (extra, args) in [
        (vec!["--faults", "all"], vec!["ipc"]),
        (vec!["--faults", "all", "-f"], vec!["fork"]),
        (
            vec!["--faults", "first", "--ring-size", "4K"],
            vec!["burst", "4000"],
        ),
        (vec!["--heap"], vec!["ipc"]),
    ] {
        let t = trace_workload(&extra, &args);
        // A static workload (the arm64 guests' musl build) maps no C library: `--heap` has
        // nothing to probe and must say so in one line.
        if extra.contains(&"--heap") && statically_linked(&workload()) {
            assert_ne!(t.status, 0, "--heap on a static program is refused");
            assert!(
                t.stderr.trim().lines().count() == 1 && t.stderr.contains("no C library"),
                "{}",
                t.stderr
            );
            continue;
        }
        assert_eq!(t.status, 0, "{}", t.stderr);
        check(&t.raw, &schema, &mut seen);
    }
    for ty in [
        "meta",
        "snapshot",
        "mmap",
        "munmap",
        "brk",
        "mprotect",
        "madvise",
        "shmat",
        "shmdt",
        "process_madvise",
        "fault",
        "touches",
        "fork",
        "exec",
        "exit",
        "lost",
        "summary",
        "heap",
        "heap_attach",
    ] {
        if ty.starts_with("heap") && statically_linked(&workload()) {
            continue; // refused above
        }
        assert!(
            seen.contains_key(ty),
            "no '{ty}' record was produced: {seen:?}"
        );
    }
    // Memory protection keys exist on x86 (not on arm64): their call is traced where the
    // kernel has it.
    if kernel_has_syscall("pkey_mprotect") {
        assert!(seen.contains_key("pkey_mprotect"), "{seen:?}");
    }
}

#[test]
fn meta_anchors_record_times_to_the_wall_clock_and_the_boot() {
    if !privileged("meta_anchors_record_times_to_the_wall_clock_and_the_boot") {
        return;
    }
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64
    };
    let before = wall();
    let t = trace_workload(&[], &["basic"]);
    let after = wall();
    assert_eq!(t.status, 0, "{}", t.stderr);
    let meta = &t.records[0];
    assert_eq!(meta["type"], "meta");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(meta["boot_id"].as_str(), Some(boot.trim()));
    let (m_ts, m_wall) = (
        meta["ts_ns"].as_u64().expect("ts_ns"),
        meta["realtime_ns"].as_u64().expect("realtime_ns"),
    );
    // Every record's wall-clock time, by the documented formula, falls within the run.
    for r in &t.records[1..] {
        let ts = r["ts_ns"].as_u64().expect("ts_ns");
        let at = m_wall + ts - m_ts;
        assert!(
            before <= at && at <= after,
            "{r}: {at} not in {before}..{after}"
        );
    }
    // A replay writes the recording's anchor again.
    let rec = temp_path("anchor.ndjson");
    std::fs::write(
        &rec,
        t.records
            .iter()
            .map(|r| format!("{r}\n"))
            .collect::<String>(),
    )
    .expect("writes");
    let o = std::process::Command::new(vmatrace())
        .args(["replay", "--json"])
        .arg(&rec)
        .output()
        .expect("replay runs");
    assert!(o.status.success());
    let replayed: Value = serde_json::from_str(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .expect("a meta line"),
    )
    .expect("JSON");
    for k in ["ts_ns", "realtime_ns", "boot_id"] {
        assert_eq!(replayed[k], meta[k], "{k}");
    }
}

#[test]
fn stack_records_are_defined_once_before_the_records_that_name_them() {
    if !privileged("stack_records_are_defined_once_before_the_records_that_name_them") {
        return;
    }
    let schema = documented();
    let mut seen = BTreeMap::new();
    let t = trace_workload(
        &["--faults", "all", "--stacks", "--fault-stacks", "1"],
        &["stacks"],
    );
    // Before Linux 5.15 (no bpf_task_pt_regs): a one-line refusal, nothing traced.
    if tracer::procfs::kernel_release().is_some_and(|v| v < (5, 15)) {
        assert_eq!(t.status, 1, "{}", t.stderr);
        assert!(
            t.stderr.trim().lines().count() == 1 && t.stderr.contains("need Linux 5.15"),
            "{}",
            t.stderr
        );
        return;
    }
    assert_eq!(t.status, 0, "{}", t.stderr);
    check(&t.records, &schema, &mut seen);
    assert!(seen.contains_key("stack"), "{seen:?}");
    let mut defined = std::collections::HashSet::new();
    let (mut syscalls, mut faults) = (0, 0);
    for r in &t.records {
        if r["type"] == "stack" {
            let id = r["id"].as_u64().expect("an integer id");
            assert!(defined.insert(id), "stack {id} defined twice");
            let frames = r["frames"].as_array().expect("frames");
            assert!(!frames.is_empty());
            for f in frames {
                for field in [
                    "addr", "module", "offset", "function", "file", "line", "inlined",
                ] {
                    assert!(f.get(field).is_some(), "frame lacks '{field}': {f}");
                }
            }
        } else if let Some(id) = r.get("stack_id") {
            let id = id.as_u64().expect("an integer stack_id");
            assert!(
                defined.contains(&id),
                "stack {id} named before it is defined: {r}"
            );
            if r["type"] == "fault" {
                faults += 1;
            } else {
                syscalls += 1;
            }
        }
    }
    assert!(
        syscalls > 0 && faults > 0,
        "{syscalls} syscalls, {faults} faults with stacks"
    );
}
