//! The same deterministic workloads recorded on every kernel and compared with the host's
//! recording: the multiset of the workload's syscalls between its markers (with what each
//! did to the model) and its first touches of anonymous memory there, and its final VMAs.
//! Addresses differ between kernels (the `[vvar]` size moves what is mapped below it), so
//! sizes, permissions, names and effects are compared, not addresses.

use std::{collections::BTreeMap, path::Path};

use serde_json::Value;

/// Recorded on every kernel: name, (vmatrace options, workload arguments).
pub const WORKLOADS: &[(&str, (&str, &str))] = &[
    ("basic", ("--faults all", "basic")),
    ("fork", ("-f --faults all", "fork")),
];

fn records(path: &Path) -> Option<Vec<Value>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().map(|l| serde_json::from_str(l).ok()).collect()
}

/// The syscall and fault backends a recording names in its `meta`.
pub fn backends(path: &Path) -> (String, String) {
    let meta = records(path).and_then(|r| r.into_iter().find(|r| r["type"] == "meta"));
    let get = |k: &str| {
        meta.as_ref()
            .and_then(|m| m[k].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    (get("syscall_backend"), get("fault_backend"))
}

/// What is compared of one recording, as sorted lines.
fn digest(recs: &[Value]) -> Result<Vec<String>, String> {
    let is_mark = |r: &Value, a: u64| r["type"] == "madvise" && r["args"][2] == a;
    let begin = recs
        .iter()
        .position(|r| is_mark(r, 0xBEEF))
        .ok_or("no begin marker")?;
    let end = recs
        .iter()
        .position(|r| is_mark(r, 0xBEEF + 1))
        .ok_or("no end marker")?;
    let pid = recs[begin]["pid"].clone();
    let mut out = Vec::new();
    for r in &recs[begin + 1..end] {
        if r["pid"] != pid {
            continue;
        }
        let ty = r["type"].as_str().unwrap_or("?");
        if ty == "fault" {
            // Page-cache touches depend on the kernel's fault-around and on what the page
            // cache already holds (a text page touched first between the markers on one
            // kernel was mapped around an earlier fault on another): not compared.
            if r["first_touch"] == true && r["page_kind"] != "page_cache" {
                out.push(format!("first touch {} {}", r["page_kind"], r["pages"]));
            }
            continue;
        }
        let e = &r["effect"];
        let size = e["end"].as_u64().unwrap_or(0) - e["start"].as_u64().unwrap_or(0);
        out.push(format!(
            "{ty} errno={} effect={} size={size} unmapped={} released={} splits={}",
            r["errno"], e["kind"], e["unmapped_bytes"], e["released_pages"], e["splits"]
        ));
    }
    // The final map of every process of the run (special mappings differ between kernels).
    let mut per_pid = BTreeMap::new();
    for r in recs
        .iter()
        .filter(|r| r["type"] == "snapshot" && r["reason"] == "exit")
    {
        let mut vmas: Vec<String> = r["vmas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["kind"] != "special")
            .map(|v| {
                let name = v["path"]
                    .as_str()
                    .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
                    .unwrap_or_default();
                format!(
                    "vma {} {} {} {}",
                    v["reserved_bytes"], v["perms"], v["kind"], name
                )
            })
            .collect();
        vmas.sort();
        per_pid.insert(r["pid"].to_string(), vmas);
    }
    // Pids differ between runs: the processes in order of appearance.
    for (i, vmas) in per_pid.into_values().enumerate() {
        out.extend(vmas.into_iter().map(|v| format!("process {i}: {v}")));
    }
    if out.is_empty() {
        return Err("nothing recorded between the markers".into());
    }
    out.sort();
    Ok(out)
}

/// `same`, or what differs between this kernel's recordings and the host's.
pub fn against(dir: &Path, host: &Path) -> String {
    let mut differences = Vec::new();
    for (name, _) in WORKLOADS {
        let file = format!("{name}.ndjson");
        let (Some(mine), Some(theirs)) = (records(&dir.join(&file)), records(&host.join(&file)))
        else {
            differences.push(format!("{name}: no recording"));
            continue;
        };
        match (digest(&mine), digest(&theirs)) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => {
                let only_here: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
                let only_host: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
                differences.push(format!(
                    "{name}: here only {only_here:?}, host only {only_host:?}"
                ));
            }
            (Err(e), _) => differences.push(format!("{name}: {e}")),
            (_, Err(e)) => differences.push(format!("{name} (host): {e}")),
        }
    }
    if differences.is_empty() {
        "same".into()
    } else {
        format!("DIFFERS: {}", differences.join("; "))
    }
}

/// Without a host recording of the same architecture: each recording is complete and has
/// what the workload is known to do (`basic`: a 64 KiB mmap, 16 first touches, a 16 KiB
/// munmap, the heap grown and shrunk).
pub fn self_check(dir: &Path) -> String {
    let Some(recs) = records(&dir.join("basic.ndjson")) else {
        return "DIFFERS: no recording".into();
    };
    match digest(&recs) {
        Ok(d) => {
            let touches = d.iter().filter(|l| l.starts_with("first touch")).count();
            let mmap = d
                .iter()
                .any(|l| l.starts_with("mmap ") && l.contains("size=65536"));
            let munmap = d
                .iter()
                .any(|l| l.starts_with("munmap ") && l.contains("unmapped=16384"));
            let brk = d.iter().filter(|l| l.starts_with("brk ")).count();
            if touches == 16 && mmap && munmap && brk == 3 {
                "ok (basic as expected)".into()
            } else {
                format!("DIFFERS: {d:?}")
            }
        }
        Err(e) => format!("DIFFERS: {e}"),
    }
}
