//! vmatrace without root: a non-root user (uid `nobody`) with only the capabilities that
//! docs/production.md lists, set by util-linux's `setpriv` (ambient capabilities, a bounding
//! set of exactly those). The same calls are seen as by root; each capability left out gives
//! a one-line error; without CAP_SYS_ADMIN the one documented degradation shows (pagemap
//! hides frame numbers, so pages read before an attach count as anonymous, not zero page).

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::*;
use tracer::output::{OutputRecord, SnapshotReason, report::VmaRow};

/// The unprivileged user the runs take (`nobody`).
const UID: u32 = 65534;

/// What tracing one's own processes needs: loading and attaching the programs (CAP_BPF,
/// CAP_PERFMON) and reading tracefs, which is root's only (CAP_DAC_READ_SEARCH).
const OWN: [&str; 3] = ["bpf", "perfmon", "dac_read_search"];

/// A directory `nobody` can write its output into.
fn out_dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // The parent is root's 0755 temp dir: nobody needs to pass through it.
    if let Some(parent) = dir.parent() {
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

/// `setpriv` running `program args` as `nobody` with exactly `caps` (ambient, inheritable and
/// bounding set), without sudo's variables.
fn as_nobody(caps: &[&str], program: &Path) -> Command {
    let list = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let with = |base: &str| {
        if list.is_empty() {
            base.to_string()
        } else {
            format!("{base},{list}")
        }
    };
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={}", with("-all")))
        .arg(format!("--ambient-caps={}", with("-all")))
        .arg(format!("--bounding-set={}", with("-all")))
        .arg("--")
        .arg(program)
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env_remove("SUDO_COMMAND");
    c
}

/// `vmatrace --json -o OUT --faults first -- workload basic` as nobody with `caps`.
fn basic_as_nobody(caps: &[&str], name: &str) -> (Output, PathBuf) {
    let out = out_dir(name).join("trace.ndjson");
    let o = as_nobody(caps, &vmatrace())
        .args(["--json", "--faults", "first", "-o"])
        .arg(&out)
        .arg("--")
        .arg(workload())
        .arg("basic")
        .output()
        .expect("setpriv runs");
    (o, out)
}

/// The calls and first touches of the workload between its markers, without addresses:
/// type, lengths, results' kinds, fault pages.
fn shape(records: &[OutputRecord]) -> Vec<String> {
    let pid = typed_marker_pid(records);
    typed_between_markers(records, pid)
        .iter()
        .map(|r| match r {
            OutputRecord::Fault(f) => format!("fault pages={} write={:?}", f.pages, f.write),
            r => {
                let call = r.syscall();
                let effect = call.and_then(|s| s.effect.as_ref());
                format!(
                    "{} len={:?} effect={:?} unmapped={:?}",
                    r.type_name(),
                    call.map(|s| s.args[1]),
                    effect.map(|e| &e.kind),
                    effect.map(|e| e.unmapped_bytes)
                )
            }
        })
        .collect()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_user_with_only_bpf_perfmon_and_dac_read_search_sees_what_root_sees() {
    if !privileged("a_user_with_only_bpf_perfmon_and_dac_read_search_sees_what_root_sees") {
        return;
    }
    let root = trace_workload(&["--faults", "first"], &["basic"]);
    assert_eq!(root.status, 0, "root run: {}", root.stderr);
    let (o, out) = basic_as_nobody(&OWN, "caps-own");
    assert!(o.status.success(), "as nobody: {}", stderr_of(&o));
    let records = typed_records(&out);
    let expected = shape(&root.typed());
    assert!(
        expected.iter().any(|s| s.starts_with("mmap")),
        "{expected:?}"
    );
    assert_eq!(shape(&records), expected);
    // The workload ran as nobody too (launch mode keeps vmatrace's user).
    let meta = std::fs::metadata(&out).expect("output");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), UID);
}

#[test]
fn each_missing_capability_gives_one_line_that_names_it() {
    if !privileged("each_missing_capability_gives_one_line_that_names_it") {
        return;
    }
    for missing in OWN {
        let caps: Vec<&str> = OWN.iter().copied().filter(|c| *c != missing).collect();
        let (o, out) = basic_as_nobody(&caps, &format!("caps-no-{missing}"));
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "without {missing}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "without {missing}, one line: {err}");
        assert!(lines[0].starts_with("vmatrace: "), "{err}");
        let name = format!("lacks CAP_{}", missing.to_uppercase());
        assert!(
            lines[0].contains(&name),
            "without {missing}, the line names {name}: {err}"
        );
        let written = std::fs::read(&out).unwrap_or_default();
        assert!(written.is_empty(), "nothing traced without {missing}");
    }
}

/// Starts `workload pretouched` as `uid` (root or nobody), waits until it has touched its
/// pages and stopped; returns it and the address of its region.
fn pretouched(as_user: bool) -> (KillOnDrop, u64) {
    let mut c = if as_user {
        as_nobody(&[], &workload())
    } else {
        Command::new(workload())
    };
    let (target, _, region) = pretouched_before_attach(&mut c);
    (target, region)
}

/// Attaches as nobody with `caps` to `pid` for a moment; returns the run and its seed
/// snapshot's bytes of `kind` in the 4 MiB region at `region`.
fn seed_as_nobody(caps: &[&str], pid: u32, region: u64, name: &str) -> (Output, u64, u64) {
    let out = out_dir(name).join("trace.ndjson");
    let o = as_nobody(caps, &vmatrace())
        .args(["--json", "--duration", "2s", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .output()
        .expect("setpriv runs");
    if !o.status.success() {
        return (o, 0, 0);
    }
    let records = typed_records(&out);
    let seed = records
        .iter()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.reason == SnapshotReason::Seed)
        .expect("a seed snapshot");
    let end = region + 1024 * 4096;
    let bytes = |key: fn(&VmaRow) -> u64| -> u64 {
        seed.vmas
            .as_deref()
            .expect("vmas")
            .iter()
            .filter(|v| v.start >= region && v.end <= end)
            .map(key)
            .sum()
    };
    (o, bytes(|v| v.anon_bytes), bytes(|v| v.zero_page_bytes))
}

#[test]
fn attaching_with_sys_ptrace_and_sys_admin_seeds_as_root_and_without_sys_admin_zero_pages_count_as_anonymous()
 {
    if !privileged(
        "attaching_with_sys_ptrace_and_sys_admin_seeds_as_root_and_without_sys_admin_zero_pages_count_as_anonymous",
    ) {
        return;
    }
    // Root's process: with CAP_SYS_PTRACE (its /proc files are checked as ptrace is) and
    // CAP_SYS_ADMIN, the seed is what root's would be.
    let (target, region) = pretouched(false);
    let pid = target.0.id();
    let mut with_ptrace = OWN.to_vec();
    with_ptrace.extend(["sys_ptrace", "sys_admin"]);
    let (o, anon, zero) = seed_as_nobody(&with_ptrace, pid, region, "caps-attach-ptrace");
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!((anon, zero), (256 * 4096, 64 * 4096), "written, read");
    drop(target);

    // Its own process, without CAP_SYS_ADMIN: pagemap shows no frame numbers, so the 64 pages
    // it read (the zero page) count as anonymous memory.
    let (target, region) = pretouched(true);
    let pid = target.0.id();
    let (o, anon, zero) = seed_as_nobody(&OWN, pid, region, "caps-attach-own");
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!((anon, zero), (320 * 4096, 0), "without CAP_SYS_ADMIN");
    let mut with_admin = OWN.to_vec();
    with_admin.push("sys_admin");
    let (o, anon, zero) = seed_as_nobody(&with_admin, pid, region, "caps-attach-admin");
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!((anon, zero), (256 * 4096, 64 * 4096), "with CAP_SYS_ADMIN");
}
