//! End-to-end tests of vmatrace as its users run it: attach with -p, Ctrl-C, record and
//! replay, and every error case ending in one line and a non-zero exit.

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use common::*;
use tracer::output::{OutputRecord, SnapshotReason, process_records::ExecJson, typed::Drift};

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(vmatrace()).args(args).output().expect("runs");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// One line on stderr, starting with `vmatrace:`, containing `needle`; non-zero exit.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let o = Command::new(vmatrace()).args(args).output().expect("runs");
    assert_one_line(&format!("{args:?}"), &o, needle);
}

/// `o` (of the run named `what`) failed with one `vmatrace:` line on stderr holding `needle`.
fn assert_one_line(what: &str, o: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{what} must fail");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected, got: {err}");
    assert!(lines[0].starts_with("vmatrace: "), "{what}: {err}");
    assert!(
        lines[0].contains(needle),
        "{what}: '{needle}' not in: {err}"
    );
}

/// The pid of the first exec record.
fn exec_pid(recs: &[OutputRecord]) -> Option<u32> {
    recs.iter().find_map(|r| match r {
        OutputRecord::Exec(ExecJson { pid, .. }) => Some(*pid),
        _ => None,
    })
}

/// The drift records of a run.
fn drifts(recs: &[OutputRecord]) -> Vec<&Drift> {
    recs.iter()
        .filter_map(|r| match r {
            OutputRecord::Drift(d) => Some(&d.record),
            _ => None,
        })
        .collect()
}

#[test]
fn bad_input_gives_one_line_and_non_zero_exit() {
    // Argument errors (clap) exit 2 with a usage hint; none of them panics.
    for args in [
        vec!["-p", "0"],
        vec!["-p", "-5"],
        vec!["-p", "abc"],
        vec!["--ring-size", "5000", "-p", "1"],
        vec!["--duration", "0s", "-p", "1"],
        vec!["--duration", "18446744073709551615s", "-p", "1"],
        vec!["--duration", "9999999h", "-p", "1"],
        vec!["--reconcile", "0", "-p", "1"],
        vec!["--reconcile", "18446744073709551616", "-p", "1"],
        vec!["--ring-size", "18446744073709551615K", "-p", "1"],
        vec!["--ring-size", "2G", "-p", "1"],
        vec!["-p", "4194305"],
        vec!["-p", "99999999999999999999999"],
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_one_line_error(&[], "nothing to trace");
    let dir = std::env::temp_dir();
    assert_one_line_error(
        &["-p", "1", "-o", dir.to_str().expect("utf-8")],
        "is a directory",
    );
    let replay_missing = temp_path("missing.ndjson");
    assert_one_line_error(
        &["replay", replay_missing.to_str().expect("utf-8")],
        "cannot read",
    );
}

#[test]
fn bad_targets_are_refused_before_anything_is_loaded() {
    if !privileged("bad_targets_are_refused_before_anything_is_loaded") {
        return;
    }
    // The last pid Linux can hand out (higher ones are usage errors), so almost surely free.
    assert!(!std::path::Path::new("/proc/4194303").exists());
    assert_one_line_error(&["-p", "4194303"], "no process with pid 4194303");
    assert_one_line_error(&["-p", "2"], "kernel thread");
    let me = std::process::id().to_string();
    assert_one_line_error(&["-p", &me, "-p", &me], "given twice");
    // A zombie: a child that exited and was not reaped.
    let mut z = Command::new("true").spawn().expect("spawns");
    wait_for(5, "the zombie", || {
        tracer::procfs::read_stat(z.id()).is_ok_and(|s| s.state == 'Z')
    });
    assert_one_line_error(&["-p", &z.id().to_string()], "zombie");
    let _ = z.wait();
    assert_one_line_error(&["-p", "1", "--", "true"], "not both");
    assert_one_line_error(&["--", "/nonexistent/cmd"], "command not found");
    let exists = temp_path("exists.ndjson");
    std::fs::write(&exists, "x").expect("writes");
    assert_one_line_error(
        &[
            "--json",
            "-o",
            exists.to_str().expect("utf-8"),
            "--",
            "true",
        ],
        "--force",
    );
}

#[test]
fn not_root_is_explained() {
    // Run as nobody: the probe cannot load. Skipped when we are not root (we could not switch).
    if !privileged("not_root_is_explained") {
        return;
    }
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmatrace())
        .args(["--", "true"])
        .output()
        .expect("setpriv runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON") && err.contains("sudo"),
        "{err}"
    );
}

#[test]
fn attach_with_pid_sees_the_next_calls() {
    if !privileged("attach_with_pid_sees_the_next_calls") {
        return;
    }
    let mut w = Command::new(workload())
        .arg("wait-then-map")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("workload starts");
    let mut out = std::io::BufReader::new(w.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("ready line");
    let pid = w.id();
    let file = temp_path("attach.ndjson");
    let mut v = Command::new(vmatrace())
        .args(["--json", "-o"])
        .arg(&file)
        .args(["-p", &pid.to_string()])
        .spawn()
        .expect("vmatrace starts");
    // Wait until the seed snapshot is written: the probe is attached.
    wait_for(20, "the seed snapshot", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"reason\":\"seed\""))
    });
    let mut stdin = w.stdin.take().expect("stdin");
    writeln!(stdin).expect("wakes the workload");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).expect("mmap line");
    let addr: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("address");
    drop(stdin);
    let _ = w.wait();
    // The process is gone: vmatrace ends by itself.
    let status = v.wait().expect("vmatrace exits");
    assert!(status.success());
    let recs = typed_records(&file);
    let mmap = recs
        .iter()
        .filter_map(|r| r.call("mmap"))
        .find(|m| m.ret as u64 == addr)
        .expect("the mmap after attach is seen");
    assert_eq!(mmap.pid, pid);
    assert_eq!(mmap.args[1], 32 * 4096);
    // The seed matched the process as it was.
    let seed = recs.iter().find_map(OutputRecord::snapshot).expect("seed");
    assert_eq!(seed.reason, SnapshotReason::Seed);
    assert!(seed.vmas.as_ref().is_some_and(|v| v.len() > 5));
    assert_eq!(recs.last().map(OutputRecord::type_name), Some("summary"));
}

#[test]
fn sigint_gives_a_complete_summary_and_valid_ndjson_and_replay_reproduces_it() {
    if !privileged("sigint_gives_a_complete_summary_and_valid_ndjson_and_replay_reproduces_it") {
        return;
    }
    let file = temp_path("record.ndjson");
    let w = workload();
    let mut v = Command::new(vmatrace())
        .args(["record", "-o"])
        .arg(&file)
        .args(["--", w.to_str().expect("utf-8"), "spin", "30000", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .expect("vmatrace starts");
    wait_for(20, "events recorded", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.matches("\"type\":\"munmap\"").count() > 50)
    });
    kill(v.id(), libc::SIGINT);
    let status = v.wait().expect("exits");
    // The workload is killed by the terminal's SIGINT in real life; here only vmatrace got it,
    // so it stops tracing and exits on its own.
    assert!(status.code().is_some(), "{status:?}");
    let recs = typed_records(&file); // every line parses
    let live = last_summary(&recs);
    let procs = &live.processes;
    assert_eq!(procs.len(), 1);
    assert!(procs[0].syscalls.get("mmap").is_some_and(|n| *n > 50));
    // Stop the workload we left running.
    kill(procs[0].pid, libc::SIGKILL);

    // Replay from the file alone gives the same summary.
    let replayed = replayed_typed(&file);
    let again = last_summary(&replayed);
    assert_eq!(
        again.processes, live.processes,
        "replay reproduces the live summary"
    );
    assert_eq!(again.lost, live.lost);
    // And the same final snapshot.
    let final_of = |recs: &[OutputRecord]| {
        recs.iter()
            .rev()
            .filter_map(OutputRecord::snapshot)
            .find(|s| s.reason == SnapshotReason::Final)
            .map(|s| s.vmas.clone())
    };
    assert_eq!(final_of(&replayed), final_of(&recs));
}

#[test]
fn replay_rejects_bad_files_naming_the_line() {
    let cases: [(&str, &str); 5] = [
        ("", "is empty"),
        (
            "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n{\"type\":\"mmap\",\"ts",
            ":2: not JSON",
        ),
        ("hello\n", ":1: not JSON"),
        (
            "{\"type\":\"meta\",\"ts_ns\":1,\"version\":99}\n",
            ":1: schema version 99",
        ),
        (
            "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n{\"type\":\"exit\",\"ts_ns\":50,\"pid\":1,\"tid\":1}\n{\"type\":\"exit\",\"ts_ns\":40,\"pid\":1,\"tid\":1}\n",
            ":3: record out of order",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = temp_path(&format!("bad-{i}.ndjson"));
        std::fs::write(&p, text).expect("writes");
        assert_one_line_error(&["replay", p.to_str().expect("utf-8")], needle);
    }
}

#[test]
fn reconcile_reports_a_compat_mapping_it_cannot_see_and_nothing_else() {
    if !privileged("reconcile_reports_a_compat_mapping_it_cannot_see_and_nothing_else") {
        return;
    }
    // 32-bit int 0x80 calls from a 64-bit process: the syscall tracepoints do not report
    // compat calls (their numbers and registers are i386's), so none is misread as a 64-bit
    // call, and the reconciliation sees the compat mmap2.
    let t = trace_workload(
        &["--faults", "none", "--reconcile", "1"],
        &["compat-mmap", "3500"],
    );
    assert_eq!(t.status, 0, "{}", t.stderr);
    // i386 execve (11) and chdir (12) have the numbers of x86-64 munmap and brk.
    for nr in [11, 12] {
        let ret = line_numbers(&t.stdout, &format!("compat_lookalike_{nr}"))[0];
        assert_eq!(ret, -i64::from(libc::EFAULT), "{}", t.stdout);
    }
    let records = t.typed();
    assert!(
        !records
            .iter()
            .filter_map(OutputRecord::syscall)
            .any(|s| matches!(s.name(), "munmap" | "brk") && s.errno.as_deref() == Some("EFAULT")),
        "a compat call is not misread as a 64-bit one"
    );
    let addr = line_numbers(&t.stdout, "compat_mmap")[0] as u64;
    assert!(
        !records
            .iter()
            .filter_map(|r| r.call("mmap"))
            .any(|m| m.ret as u64 == addr),
        "the compat call is not misread as a 64-bit mmap"
    );
    let range = format!("- {addr:x}-{:x} rw-p", addr + 8 * 4096);
    let drift = drifts(&records);
    assert!(!drift.is_empty(), "the drift is reported");
    for d in &drift {
        let diffs = &d.differences;
        assert_eq!(diffs.len(), 1, "{d:?}");
        assert!(diffs[0].starts_with(&range), "{d:?} vs {range}");
    }

    // A busy process whose every change is traced: silence.
    let t = trace_workload(
        &["--faults", "all", "--reconcile", "1"],
        &["spin", "3500", "500"],
    );
    assert_eq!(t.status, 0, "{}", t.stderr);
    let records = t.typed();
    let drift = drifts(&records);
    assert!(drift.is_empty(), "false drift: {drift:?}");
}

#[test]
fn launched_command_runs_as_the_invoking_user() {
    if !privileged("launched_command_runs_as_the_invoking_user") {
        return;
    }
    let id = |extra_env: Option<(&str, &str)>, args: &[&str]| {
        let mut c = Command::new(vmatrace());
        c.args(["--faults", "none", "-o", "/dev/null", "--force"])
            .args(args)
            .args(["--", "id", "-u"]);
        if let Some((k, v)) = extra_env {
            c.env(k, v);
        }
        let o = c.output().expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(id(None, &["-u", "nobody"]), "65534", "-u nobody");
    assert_eq!(
        id(Some(("SUDO_USER", "nobody")), &[]),
        "65534",
        "under sudo: the invoking user"
    );
    assert_eq!(
        id(Some(("SUDO_USER", "nobody")), &["-u", "root"]),
        "0",
        "-u root keeps root"
    );
    assert_one_line_error(&["-u", "no-such-user-here", "--", "true"], "no such user");
}

#[test]
fn duration_ends_the_run_with_a_summary() {
    if !privileged("duration_ends_the_run_with_a_summary") {
        return;
    }
    // The traced process outlives the run by far, so the run can only have ended because
    // its duration was over: no bound on how long loading and draining take (minutes under
    // the kernel matrix's emulation on a busy machine), only that the process is still there.
    let mut sleeper = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep starts");
    let file = temp_path("duration.ndjson");
    let start = std::time::Instant::now();
    let o = Command::new(vmatrace())
        .args(["--json", "--duration", "1s", "-o"])
        .arg(&file)
        .args(["-p", &sleeper.id().to_string()])
        .output()
        .expect("runs");
    let took = start.elapsed();
    let still_running = matches!(sleeper.try_wait(), Ok(None));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        still_running,
        "the run ended with its process, not its duration ({took:?})"
    );
    assert!(took.as_secs_f64() >= 1.0, "{took:?}");
    let recs = typed_records(&file);
    assert_eq!(recs.last().map(OutputRecord::type_name), Some("summary"));
    assert!(
        recs.iter()
            .filter_map(OutputRecord::snapshot)
            .any(|s| s.reason == SnapshotReason::Final)
    );
}

#[test]
fn tracefs_is_mounted_when_missing_and_own_pid_is_refused() {
    if !privileged("tracefs_is_mounted_when_missing_and_own_pid_is_refused") {
        return;
    }
    // In a private mount namespace, so the machine's mounts stay as they are: wherever
    // tracefs and debugfs are mounted (distributions, bpftrace and the test guests mount
    // debugfs, which brings tracefs at /sys/kernel/debug/tracing too), both are taken away,
    // and vmatrace mounts tracefs again where current kernels put it.
    let o = in_private_mounts(
        "umount /sys/kernel/debug/tracing 2>/dev/null || true
         umount /sys/kernel/debug 2>/dev/null || true
         while umount /sys/kernel/tracing 2>/dev/null; do :; done
         test ! -d /sys/kernel/tracing/events
         test ! -d /sys/kernel/debug/tracing/events
         \"$VMATRACE\" --faults none -o /dev/null --force -- true
         test -d /sys/kernel/tracing/events && echo remounted",
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("remounted"),
        "vmatrace mounted tracefs again: {out}{err}"
    );
    // vmatrace refuses to trace itself: a shell execs it with the shell's (now its) own pid.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} -p $$", vmatrace().display()))
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is vmatrace itself"), "{err}");
}

/// Runs `script` in a private mount namespace (`unshare -m`), where it can hide parts of the
/// kernel's interfaces from vmatrace without touching anything outside.
fn in_private_mounts(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", script])
        .env("VMATRACE", vmatrace())
        .env("WORKLOAD", workload())
        .output()
        .expect("unshare runs")
}

#[test]
fn a_kernel_without_the_tracepoints_is_refused_and_btf_is_not_needed() {
    if !privileged("a_kernel_without_the_tracepoints_is_refused_and_btf_is_not_needed") {
        return;
    }
    // A tracefs without syscall tracepoints: what a kernel without CONFIG_FTRACE_SYSCALLS has.
    let o = in_private_mounts(
        "mount -t tmpfs none /sys/kernel/tracing
         mkdir -p /sys/kernel/tracing/events/syscalls /sys/kernel/tracing/events/sched
         exec \"$VMATRACE\" -o /dev/null --force -- true",
    );
    assert_one_line(
        "fake tracefs",
        &o,
        "this kernel has no tracepoint syscalls:sys_enter_brk",
    );
    assert_eq!(o.status.code(), Some(1));

    // Without BTF (an empty vmlinux): the programs read tracepoint records at offsets checked
    // against the kernel's format files, and `struct pt_regs` (an ABI, for the faulting
    // instruction); they use no CO-RE relocation, so tracing still works.
    let out = temp_path("no-btf.ndjson");
    let o = in_private_mounts(&format!(
        ": > /tmp/vmatrace-empty-btf
         mount --bind /tmp/vmatrace-empty-btf /sys/kernel/btf/vmlinux
         test ! -s /sys/kernel/btf/vmlinux
         exec \"$VMATRACE\" --json -o {} -- \"$WORKLOAD\" basic",
        out.display()
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    if !kernel_has_group_dead() {
        // 5.10 to 6.12: the end of a process is told from BTF, so without it, one line.
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{err}");
    let recs = typed_records(&out);
    let pid = typed_marker_pid(&recs);
    let traced = typed_between_markers(&recs, pid);
    assert!(
        traced.iter().any(|r| r.call("mmap").is_some())
            && traced.iter().any(|r| r.fault().is_some()),
        "syscalls and faults traced without BTF: {traced:?}"
    );
}

#[test]
fn a_process_that_exits_during_attach_is_an_error() {
    if !privileged("a_process_that_exits_during_attach_is_an_error") {
        return;
    }
    // The target dies (killed and reaped) as soon as vmatrace has loaded its first eBPF
    // program: after vmatrace checked the pid, before it could put it in the filter. vmatrace
    // is stopped (SIGSTOP) for that moment, since loading all its programs takes only
    // milliseconds.
    let mut target = Command::new("sleep").arg("600").spawn().expect("spawns");
    let pid = target.id();
    let vm = Command::new(vmatrace())
        .args(["-p", &pid.to_string(), "-o", "/dev/null", "--force"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmatrace starts");
    let vm_pid = vm.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !open_files(vm_pid)
        .iter()
        .any(|f| f == "anon_inode:bpf-prog")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "vmatrace loaded no program"
        );
        std::hint::spin_loop();
    }
    kill(vm_pid, libc::SIGSTOP);
    target.kill().expect("kills the target");
    target.wait().expect("reaps the target");
    kill(vm_pid, libc::SIGCONT);
    let o = vm.wait_with_output().expect("vmatrace ends");
    assert_one_line(
        "target killed during attach",
        &o,
        &format!("process {pid} exited while vmatrace was attaching"),
    );
    assert_eq!(o.status.code(), Some(1));
}

/// The smallest 32-bit x86 program: one ELF header, one loadable segment, and `exit(0)` through
/// `int $0x80`.
fn tiny_32bit_program() -> Vec<u8> {
    const BASE: u32 = 0x0804_8000;
    const EHSIZE: u16 = 52;
    const PHSIZE: u16 = 32;
    // mov eax, 1 (exit); xor ebx, ebx; int 0x80
    let code = [0xb8, 0x01, 0x00, 0x00, 0x00, 0x31, 0xdb, 0xcd, 0x80];
    let size = u32::from(EHSIZE + PHSIZE) + code.len() as u32;
    let mut elf = b"\x7fELF\x01\x01\x01".to_vec(); // 32-bit, little-endian, version 1
    elf.resize(16, 0);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(3u16.to_le_bytes()); // EM_386
    elf.extend(1u32.to_le_bytes()); // e_version
    elf.extend((BASE + u32::from(EHSIZE + PHSIZE)).to_le_bytes()); // e_entry
    elf.extend(u32::from(EHSIZE).to_le_bytes()); // e_phoff
    elf.extend(0u32.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend(EHSIZE.to_le_bytes());
    elf.extend(PHSIZE.to_le_bytes());
    elf.extend(1u16.to_le_bytes()); // e_phnum
    elf.extend([0u8; 6]); // no section headers
    for v in [1, 0, BASE, BASE, size, size, 5, 0x1000] {
        // PT_LOAD at offset 0, R+X, page-aligned
        elf.extend(u32::to_le_bytes(v));
    }
    elf.extend(code);
    assert_eq!(elf.len() as u32, size);
    elf
}

#[test]
fn a_32_bit_program_is_traced_with_a_warning_that_its_syscalls_are_not() {
    if !privileged("a_32_bit_program_is_traced_with_a_warning_that_its_syscalls_are_not") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let prog = temp_path("tiny32");
    std::fs::write(&prog, tiny_32bit_program()).expect("writes the program");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let prog_s = prog.to_str().expect("utf-8 path");
    let out = temp_path("tiny32.ndjson");
    let out_s = out.to_str().expect("utf-8 path");
    let (code, _, err) = run(&["--json", "--force", "-o", out_s, "--", prog_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("runs a 32-bit program") && err.contains(prog_s),
        "the user is told why no syscall shows up: {err}"
    );
    let recs = typed_records(&out);
    assert!(
        recs.iter().any(|r| matches!(r, OutputRecord::Exec(_))),
        "the process is traced"
    );
    // A 64-bit program gets no such warning.
    let (code, _, err) = run(&["--json", "--force", "-o", out_s, "--", "true"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("32-bit"), "{err}");
}

/// Issue #20 (containers): `-p` takes the pid that the container's own tools show, from
/// inside its PID namespace (the kernel's differs); from the host, a process of a container is
/// traced by its host pid and shown with both.
#[test]
fn a_process_in_a_pid_namespace_is_traced_by_its_pid_from_inside_and_from_the_host() {
    if !privileged(
        "a_process_in_a_pid_namespace_is_traced_by_its_pid_from_inside_and_from_the_host",
    ) {
        return;
    }
    let w = workload();
    let calls_of = |recs: &[OutputRecord], pid: u32| {
        recs.iter()
            .filter_map(OutputRecord::syscall)
            .filter(|s| s.pid == pid && matches!(s.name(), "mmap" | "munmap"))
            .count()
    };
    // Inside: the shell's `$!` is the namespace's pid.
    let out = temp_path("pidns-inside.ndjson");
    let script = format!(
        "{} spin 4000 1000 > /dev/null & exec {} --json -o {} --force --duration 2s -p $!",
        w.display(),
        vmatrace().display(),
        out.display()
    );
    let o = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pids are this PID namespace's"), "{err}");
    let recs = typed_records(&out);
    let seed = recs
        .iter()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.reason == SnapshotReason::Seed)
        .expect("a seed snapshot");
    let pid = seed.pid;
    assert!(pid < 100, "the namespace's pid: {pid}");
    assert!(err.contains(&format!("process {pid} (")), "{err}");
    assert!(seed.vmas.as_ref().is_some_and(|v| v.len() > 5), "{seed:?}");
    assert!(calls_of(&recs, pid) >= 4, "the target's calls are seen");

    // From the host: the container's pid 1.
    let mut container = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(&w)
        .args(["spin", "4000", "1000"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("unshare runs");
    let unshare = container.id();
    let mut host_pid: u32 = 0;
    wait_for(10, "the container's first process", || {
        host_pid = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        host_pid != 0
            && std::fs::read_to_string(format!("/proc/{host_pid}/cmdline"))
                .is_ok_and(|c| c.contains("spin"))
    });
    let out = temp_path("pidns-host.ndjson");
    let o = Command::new(vmatrace())
        .args(["--json", "--force", "--duration", "1500ms", "-o"])
        .arg(&out)
        .args(["-p", &host_pid.to_string()])
        .output()
        .expect("vmatrace runs");
    let _ = container.kill();
    let _ = container.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("process {host_pid} = pid 1 in its PID namespace")),
        "{err}"
    );
    assert!(
        calls_of(&typed_records(&out), host_pid) >= 4,
        "the target's calls are seen"
    );
}

#[test]
fn duration_ends_a_launched_command_the_same_way_in_every_subcommand() {
    if !privileged("duration_ends_a_launched_command_the_same_way_in_every_subcommand") {
        return;
    }
    let w = workload();
    for sub in [&["--json"][..], &["record"][..]] {
        let file = temp_path("duration-launched.ndjson");
        let start = std::time::Instant::now();
        let o = Command::new(vmatrace())
            .args(sub)
            .args(["--duration", "1s", "-o"])
            .arg(&file)
            .args(["--", w.to_str().expect("utf-8"), "spin", "600000", "1000"])
            .output()
            .expect("runs");
        let took = start.elapsed().as_secs_f64();
        // Ended with SIGTERM: the status the shell would show, and the end is traced.
        assert_eq!(
            o.status.code(),
            Some(128 + libc::SIGTERM),
            "{sub:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!((1.0..15.0).contains(&took), "{sub:?}: {took} s");
        let recs = typed_records(&file);
        let pid = exec_pid(&recs).expect("exec record");
        assert!(
            recs.iter()
                .any(|r| matches!(r, OutputRecord::Exit(e) if e.pid == pid)),
            "{sub:?}: the command's end is in the output"
        );
        assert_eq!(recs.last().map(OutputRecord::type_name), Some("summary"));
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{sub:?}: the command is not left running"
        );
    }
}

#[test]
fn record_honours_faults_first_and_records_every_fault_by_default() {
    if !privileged("record_honours_faults_first_and_records_every_fault_by_default") {
        return;
    }
    let w = workload();
    let repeated = |recs: &[OutputRecord]| {
        recs.iter()
            .filter_map(OutputRecord::fault)
            .filter(|f| !f.first_touch && !f.changed && f.stack_grown_to.is_none())
            .count()
    };
    for (extra, faults) in [(&[][..], "all"), (&["--faults", "first"][..], "first")] {
        let file = temp_path("record-faults.ndjson");
        let o = Command::new(vmatrace())
            .arg("record")
            .args(extra)
            .arg("-o")
            .arg(&file)
            .args(["--", w.to_str().expect("utf-8"), "basic"])
            .output()
            .expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let recs = typed_records(&file);
        let OutputRecord::Meta(meta) = &recs[0] else {
            panic!("meta first: {:?}", recs[0]);
        };
        assert_eq!(meta.faults, faults, "{extra:?}");
        let n = repeated(&recs);
        if faults == "first" {
            assert_eq!(n, 0, "only faults that changed the model are recorded");
            assert!(recs.iter().any(|r| r.fault().is_some()));
        } else {
            assert!(n > 0, "every fault is recorded");
        }
        // record says what it wrote, and what was lost.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.lines().any(|l| l.starts_with("vmatrace: ")
                && l.contains(" records (")
                && l.contains("written to")),
            "{err}"
        );
        assert!(err.contains(" events lost"), "{err}");
        let replayed = Command::new(vmatrace())
            .args(["replay"])
            .arg(&file)
            .output()
            .expect("runs");
        assert!(replayed.status.success());
    }
}

#[test]
fn a_banner_says_what_is_traced_and_the_end_is_summarised_on_stderr() {
    if !privileged("a_banner_says_what_is_traced_and_the_end_is_summarised_on_stderr") {
        return;
    }
    let w = workload();
    let file = temp_path("banner.ndjson");
    let o = Command::new(vmatrace())
        .args(["--json", "-o"])
        .arg(&file)
        .args(["--", w.to_str().expect("utf-8"), "basic"])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    // The banner first: what, how, where to.
    assert!(
        lines[0].starts_with("vmatrace: tracing `") && lines[0].contains(" basic` (pid "),
        "{err}"
    );
    assert!(
        lines[1].contains("syscalls from ")
            && lines[1].contains("page faults from ")
            && lines[1].contains(&format!("NDJSON to {}", file.display()))
            && lines[1].contains("Ctrl-C to stop"),
        "{err}"
    );
    // The end: processes, events, losses, and what was written.
    let pid = exec_pid(&typed_records(&file)).expect("exec");
    assert!(
        err.contains("vmatrace: 1 process traced for ")
            && err.contains(" events lost")
            && err.contains(&format!("  [{pid}] "))
            && err.contains("exited: "),
        "{err}"
    );
    let written = raw_typed_records(&file).len();
    assert!(
        err.contains(&format!(
            "vmatrace: {} records (",
            tracer::output::thousands(written as u64)
        )),
        "{written} records: {err}"
    );
}

/// Issue #20: a traced process that is alive but gives no event at all (an idle one, or one
/// vmatrace cannot see) is named in a warning after 10 s, never left as a silent empty run;
/// a busy one traced alongside is not.
#[test]
fn a_target_alive_without_any_event_gets_a_warning() {
    if !privileged("a_target_alive_without_any_event_gets_a_warning") {
        return;
    }
    let mut idle = Command::new("sleep").arg("60").spawn().expect("sleep runs");
    let mut busy = Command::new(workload())
        .args(["spin", "20000", "1000"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("workload runs");
    let (idle_pid, busy_pid) = (idle.id().to_string(), busy.id().to_string());
    let o = Command::new(vmatrace())
        .args([
            "--quiet",
            "--duration",
            "12s",
            "-p",
            &idle_pid,
            "-p",
            &busy_pid,
        ])
        .output()
        .expect("vmatrace runs");
    let _ = idle.kill();
    let _ = busy.kill();
    let _ = idle.wait();
    let _ = busy.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let warned = |pid: &str| {
        err.lines()
            .any(|l| l.contains(&format!("process {pid} (")) && l.contains("gave no event in 10 s"))
    };
    assert!(warned(&idle_pid), "{err}");
    assert!(!warned(&busy_pid), "{err}");
}
