//! `--cgroup` (issue #20): the processes of a cgroup v2 group, and those that join it later,
//! are traced; others are not.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use common::*;
use tracer::model::normalize;
use tracer::output::{OutputRecord, SnapshotReason};

/// A fresh cgroup v2 group, removed (its processes moved back to the root) when dropped.
struct Group(PathBuf);

impl Group {
    fn new(name: &str) -> Self {
        let mount = tracer::cgroup::cgroup2_mount().expect("a cgroup2 file system is mounted");
        let dir = mount.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("a new group");
        Self(dir)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("moved into the group");
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let root = self.0.parent().expect("the mount").join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn spin(ms: &str) -> Child {
    Command::new(workload())
        .args(["spin", ms, "1000"])
        .stdout(Stdio::null())
        .spawn()
        .expect("the workload runs")
}

fn mmaps_of(recs: &[OutputRecord], pid: u32) -> usize {
    recs.iter()
        .filter_map(|r| r.call("mmap"))
        .filter(|m| m.pid == pid)
        .count()
}

/// The last snapshot of `pid` (the end of the run).
fn last_map(recs: &[OutputRecord], pid: u32) -> Vec<normalize::Range> {
    let snap = recs
        .iter()
        .rev()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.pid == pid)
        .unwrap_or_else(|| panic!("a snapshot of {pid}"));
    snapshot_ranges(snap)
}

#[test]
fn a_cgroup_is_traced_with_the_processes_that_join_it_and_no_others() {
    if !privileged("a_cgroup_is_traced_with_the_processes_that_join_it_and_no_others") {
        return;
    }
    let group = Group::new("vmatrace-test");
    let mut member = spin("15000");
    group.add(member.id());
    let mut outsider = spin("15000");
    let out = temp_path("cgroup.ndjson");
    let mut v = Command::new(vmatrace())
        .args(["--json", "--force", "--duration", "4s", "-o"])
        .arg(&out)
        .arg("--cgroup")
        .arg(&group.0)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmatrace runs");
    // Joins once tracing has started (the member's seed is written).
    wait_for(20, "the member's seed snapshot", || {
        out.exists()
            && complete_typed_records(&out)
                .iter()
                .any(|r| r.snapshot().is_some())
    });
    let mut joiner = spin("15000");
    group.add(joiner.id());
    // Stopped for the end of the run, so that its last map is the kernel's now.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    kill(joiner.id(), libc::SIGSTOP);
    wait_until_stopped(joiner.id(), "the joiner to stop");
    let kernel = kernel_ranges(joiner.id());
    let status = v.wait().expect("vmatrace ends");
    let mut err = String::new();
    if let Some(mut e) = v.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    for c in [&mut member, &mut outsider, &mut joiner] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(status.success(), "{err}");
    assert!(err.contains("tracing cgroup"), "{err}");
    let recs = typed_records(&out);
    assert!(
        mmaps_of(&recs, member.id()) >= 4,
        "the member's calls are seen"
    );
    assert!(
        mmaps_of(&recs, joiner.id()) >= 4,
        "the joiner's calls are seen"
    );
    assert_eq!(
        mmaps_of(&recs, outsider.id()),
        0,
        "the outsider is not traced"
    );
    assert!(
        !recs.iter().any(|r| r.pid() == Some(outsider.id())),
        "nothing of the outsider"
    );
    let diff = normalize::diff(&kernel, &last_map(&recs, joiner.id()));
    assert!(diff.is_empty(), "the joiner's map:\n{}", diff.join("\n"));
}

/// A process that joins the group and is gone within a tick (a shell that moves itself into
/// the group, then execs a short program) is traced from its first event: the programs add it
/// as they see it, so its exec and every call of the program are in the recording (a look at
/// `cgroup.procs` each tick alone would see it too late, or not at all).
#[test]
fn a_short_lived_process_joining_the_cgroup_is_traced_from_its_first_event() {
    if !privileged("a_short_lived_process_joining_the_cgroup_is_traced_from_its_first_event") {
        return;
    }
    let group = Group::new("vmatrace-test-short");
    let out = temp_path("cgroup-short.ndjson");
    let mut v = Command::new(vmatrace())
        .args(["--json", "--force", "--duration", "3s", "-o"])
        .arg(&out)
        .arg("--cgroup")
        .arg(&group.0)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmatrace runs");
    wait_for(20, "the run's start", || {
        complete_typed_records(&out)
            .iter()
            .any(|r| matches!(r, OutputRecord::Meta(_)))
    });
    // Tracing has started once meta is written; give the attach a moment on a busy machine.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let script = format!(
        "echo $$ > {} && exec {} basic",
        group.0.join("cgroup.procs").display(),
        workload().display()
    );
    let o = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("sh runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status = v.wait().expect("vmatrace ends");
    assert!(status.success());
    let recs = typed_records(&out);
    let pid = recs
        .iter()
        .find_map(|r| match r {
            OutputRecord::Exec(e) => Some(e.pid),
            _ => None,
        })
        .expect("the exec is traced");
    assert!(
        recs.iter()
            .filter_map(OutputRecord::snapshot)
            .any(|s| s.reason == SnapshotReason::Seed && s.pid == pid),
        "seeded when it joined"
    );
    // The workload's known calls between its markers (see capture::basic_... for the values):
    // the records with `args` (syscalls and allocator calls).
    let calls = typed_between_markers(&recs, pid);
    let kinds: Vec<&str> = calls
        .iter()
        .filter(|r| matches!(r, OutputRecord::Syscall(_) | OutputRecord::Heap(_)))
        .map(|r| r.type_name())
        .collect();
    assert_eq!(kinds, ["mmap", "munmap", "brk", "brk", "brk"], "{calls:#?}");
}

#[test]
fn what_is_not_a_cgroup2_group_is_refused_in_one_line() {
    if !privileged("what_is_not_a_cgroup2_group_is_refused_in_one_line") {
        return;
    }
    for path in ["/tmp", "/nonexistent/group"] {
        let o = Command::new(vmatrace())
            .args(["--cgroup", path])
            .output()
            .expect("vmatrace runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{path}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{path}: {err}");
        assert!(err.contains("--cgroup"), "{path}: {err}");
    }
    let o = Command::new(vmatrace())
        .args(["--cgroup", "/tmp", "--", "true"])
        .output()
        .expect("vmatrace runs");
    assert_eq!(o.status.code(), Some(1));
}
