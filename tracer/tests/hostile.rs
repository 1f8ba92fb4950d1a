//! A hostile world (issue #16): names that are not text and carry terminal controls, file
//! descriptors reused under vmatrace's feet, planted symlinks and FIFOs where the output
//! goes, recordings built to exhaust memory, and sudo's environment.

mod common;

use std::{
    ffi::OsStr,
    io::Read,
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use tracer::name;
use tracer::output::{OutputRecord, SnapshotReason};

/// The bytes the `hostile-names` workload names itself and its file with (workloads/src/main.rs).
const HOSTILE_COMM: &[u8] = b"\xff\xfe\x1b[2J\nX";
const HOSTILE_FILE: &[u8] = b"\x1b]0;PWNED\x07\x1b[2J\nFAKE LINE\r\xff\xfe\\x41";

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = temp_path(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn hostile_path(dir: &Path) -> Vec<u8> {
    let mut p = dir.as_os_str().as_bytes().to_vec();
    p.push(b'/');
    p.extend_from_slice(HOSTILE_FILE);
    p
}

/// Human output holds no terminal control (colours are off when not a terminal) and is text.
fn assert_inert(what: &str, out: &[u8]) {
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    if let Some(c) = text.chars().find(|&c| c.is_control() && c != '\n') {
        panic!("{what}: a control character {c:?} reached the output:\n{text}");
    }
    for line in text.lines() {
        assert!(
            !line.starts_with("FAKE LINE"),
            "{what}: a forged line:\n{text}"
        );
    }
}

#[test]
fn names_that_are_not_utf8_are_traced_launched_attached_and_replayed() {
    if !privileged("names_that_are_not_utf8_are_traced_launched_attached_and_replayed") {
        return;
    }
    let dir = temp_dir("names");
    let file = hostile_path(&dir);
    let want = name::from_bytes(&file);
    let dir_s = dir.to_str().expect("utf-8 dir");

    // Launched: the exec snapshot has the process's VMAs, the mmap names the file.
    let t = trace_workload(&[], &["hostile-names", dir_s]);
    assert_eq!(t.status, 0, "{}", t.stderr);
    let records = t.typed();
    let exec = records
        .iter()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.reason == SnapshotReason::Exec)
        .expect("an exec snapshot");
    assert!(
        exec.vmas.as_ref().is_some_and(|v| v.len() > 5),
        "the exec snapshot has the new image's VMAs: {exec:?}"
    );
    let pid = typed_marker_pid(&records);
    let mmaps: Vec<_> = typed_between_markers(&records, pid)
        .into_iter()
        .filter_map(|r| r.call("mmap"))
        .collect();
    assert_eq!(mmaps.len(), 1, "{mmaps:?}");
    let path = mmaps[0].path.as_deref().expect("a path");
    assert_eq!(path, want);
    assert_eq!(
        name::to_bytes(path),
        file,
        "the JSON text gives the bytes back"
    );
    let ino = std::fs::metadata(OsStr::from_bytes(&file))
        .expect("file")
        .ino();
    assert_eq!(mmaps[0].inode, Some(ino));

    // Attached: -p works on a process whose comm is not UTF-8, and its seed lists the file.
    let _ = std::fs::remove_file(OsStr::from_bytes(&file));
    let mut w = KillOnDrop(
        Command::new(workload())
            .args(["hostile-names", dir_s, "wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("workload starts"),
    );
    let mut stdout = std::io::BufReader::new(w.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.starts_with("ready") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stdout, &mut line).expect("reads") > 0,
            "workload ended early"
        );
    }
    let wpid = w.0.id();
    let comm = std::fs::read(format!("/proc/{wpid}/comm")).expect("comm");
    assert_eq!(
        &comm[..comm.len() - 1],
        HOSTILE_COMM,
        "the kernel took the name"
    );
    let out = temp_path("attached.ndjson");
    let o = Command::new(vmatrace())
        .args(["--json", "--duration", "500ms", "-o"])
        .arg(&out)
        .args(["-p", &wpid.to_string()])
        .output()
        .expect("runs");
    drop(w);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = typed_records(&out);
    let seed = recs
        .iter()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.reason == SnapshotReason::Seed)
        .expect("a seed");
    assert!(
        seed.vmas
            .as_ref()
            .expect("vmas")
            .iter()
            .any(|v| v.path.as_deref() == Some(want.as_str())),
        "the seed names the mapped file: {seed:?}"
    );

    // Replayed: the same names come back out, byte for byte.
    let o = Command::new(vmatrace())
        .args(["replay", "--json"])
        .arg(&out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("JSON is UTF-8");
    let found = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match OutputRecord::from_value(v) {
            Ok(OutputRecord::Snapshot(s)) => Some(s),
            _ => None,
        })
        .flat_map(|s| s.vmas.unwrap_or_default())
        .any(|v| v.path.as_deref().map(name::to_bytes) == Some(file.clone()));
    assert!(found, "replay keeps the name: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn human_output_shows_hostile_names_as_one_escaped_line_live_and_in_replay() {
    if !privileged("human_output_shows_hostile_names_as_one_escaped_line_live_and_in_replay") {
        return;
    }
    let dir = temp_dir("human");
    let dir_s = dir.to_str().expect("utf-8 dir");
    let escaped = format!("{dir_s}/\\x1b]0;PWNED\\x07\\x1b[2J\\x0aFAKE LINE\\x0d\\xff\\xfe\\\\x41");
    // Every event (-v), and the default view (one line per region and second, which names
    // the file's region), and what vmatrace writes on stderr (banner, summary).
    for (view, line_shows_name) in [
        (
            "-v",
            &(|l: &str, e: &str| l.contains("mmap(") && l.contains(&format!("<{e}>")))
                as &dyn Fn(&str, &str) -> bool,
        ),
        ("--min-size=1G", &|l: &str, e: &str| {
            l.contains(&format!("] {e}: "))
        }),
    ] {
        let o = Command::new(vmatrace())
            .args([view, "--faults", "first", "--"])
            .arg(workload())
            .args(["hostile-names", dir_s])
            .output()
            .expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The workload's own stdout line is not vmatrace's: keep vmatrace's lines only.
        let live: Vec<u8> = o
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.starts_with(b"hostile "))
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect();
        assert_inert(&format!("live {view}"), &live);
        assert_inert(&format!("stderr {view}"), &o.stderr);
        let live = String::from_utf8_lossy(&live);
        assert!(
            live.lines().any(|l| line_shows_name(l, &escaped)),
            "{view}: a line shows the escaped name: {live}"
        );
    }

    let t = trace_workload(&[], &["hostile-names", dir_s]);
    let rec = temp_path("human.ndjson");
    std::fs::write(
        &rec,
        t.records
            .iter()
            .map(|r| format!("{r}\n"))
            .collect::<String>(),
    )
    .expect("writes");
    let o = Command::new(vmatrace())
        .args(["replay", "--events"])
        .arg(&rec)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_inert("replay", &o.stdout);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&escaped));
    // A recording can say anything: controls in exe and exec file names are shown escaped;
    // a snapshot reason that is not one is refused in one line, escaped too.
    let forged = temp_path("forged.ndjson");
    std::fs::write(
        &forged,
        concat!(
            "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n",
            "{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":\"/bin/\\u001b[31mred\\nFAKE LINE\",\"vmas\":[]}\n",
            "{\"type\":\"exec\",\"ts_ns\":3,\"pid\":7,\"tid\":7,\"filename\":\"\\u001b]0;PWNED\\u0007\\r\\nFAKE LINE\\u009b2J\"}\n",
        ),
    )
    .expect("writes");
    let o = Command::new(vmatrace())
        .args(["replay", "--events"])
        .arg(&forged)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_inert("forged recording", &o.stdout);
    let bad_reason = temp_path("forged-reason.ndjson");
    std::fs::write(
        &bad_reason,
        concat!(
            "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n",
            "{\"type\":\"snapshot\",\"ts_ns\":4,\"pid\":7,\"reason\":\"signal\\u001b[2J\\nFAKE LINE\",\"vmas\":[]}\n",
        ),
    )
    .expect("writes");
    let o = Command::new(vmatrace())
        .args(["replay", "--events"])
        .arg(&bad_reason)
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(1));
    assert_inert("refused recording", &o.stderr);
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim().lines().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_mmap_is_named_by_its_mapping_not_by_a_reused_fd() {
    if !privileged("an_mmap_is_named_by_its_mapping_not_by_a_reused_fd") {
        return;
    }
    let dir = temp_dir("fd-reuse");
    let t = trace_workload(
        &["--faults", "none"],
        &["fd-reuse", dir.to_str().expect("utf-8")],
    );
    assert_eq!(t.status, 0, "{}", t.stderr);
    let records = t.typed();
    let pid = typed_marker_pid(&records);
    let paths: Vec<(u64, String)> = typed_between_markers(&records, pid)
        .into_iter()
        .filter_map(|r| r.call("mmap"))
        .map(|m| (m.args[5], m.path.as_deref().unwrap_or("null").to_string()))
        .collect();
    let first = format!("{}/first.dat", dir.display());
    let planted = format!("{}/planted.dat", dir.display());
    assert_eq!(
        paths,
        [(0, first), (4 * 4096, planted)],
        "each mmap names the file it mapped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `vmatrace --faults none -o OUT [extra] -- true` (the cheapest trace) and returns it.
fn trace_true(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(vmatrace());
    c.args(["--json", "--faults", "none", "-o"])
        .arg(out)
        .args(extra)
        .args(["--", "true"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("runs")
}

/// A directory everyone can write, with the sticky bit, as /tmp.
fn world_writable(name: &str) -> PathBuf {
    let d = temp_dir(name);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    d
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("chown");
}

fn one_error_line(o: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
}

#[test]
fn output_paths_with_planted_symlinks_are_refused() {
    if !privileged("output_paths_with_planted_symlinks_are_refused") {
        return;
    }
    let tmp = world_writable("planted");
    let secret = temp_dir("root-only");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // The last component a link (to a file that does not exist yet), planted by nobody.
    let victim = secret.join("victim");
    let link = tmp.join("trace.ndjson");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    chown(&link, 65534, 65534);
    for extra in [&[][..], &["--force"][..]] {
        one_error_line(&trace_true(&link, extra, &[]), "symbolic link");
        assert!(!victim.exists(), "nothing written through the link");
    }
    // A parent directory that is a link in a world-writable directory.
    let dir_link = tmp.join("dir");
    std::os::unix::fs::symlink(&secret, &dir_link).expect("symlink");
    chown(&dir_link, 65534, 65534);
    std::fs::write(&victim, "root's file").expect("writes");
    for extra in [&[][..], &["--force"][..]] {
        one_error_line(
            &trace_true(&dir_link.join("victim"), extra, &[]),
            "another user could have planted",
        );
        assert_eq!(
            std::fs::read_to_string(&victim).expect("reads"),
            "root's file"
        );
        let o = trace_true(&dir_link.join("new.ndjson"), extra, &[]);
        one_error_line(&o, "another user could have planted");
        assert!(!secret.join("new.ndjson").exists());
    }
    // Even one root made: others could have replaced it, since everyone can write there.
    let root_link = tmp.join("rootdir");
    std::os::unix::fs::symlink(&secret, &root_link).expect("symlink");
    one_error_line(
        &trace_true(&root_link.join("x"), &[], &[]),
        "another user could have planted",
    );
    // A link in a directory only root can write is root's own choice, and is followed.
    let safe_link = secret.join("self");
    std::os::unix::fs::symlink(&secret, &safe_link).expect("symlink");
    let o = trace_true(&safe_link.join("ok.ndjson"), &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(secret.join("ok.ndjson").exists());
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&secret);
}

#[test]
fn force_replaces_another_users_file_with_a_new_private_one() {
    if !privileged("force_replaces_another_users_file_with_a_new_private_one") {
        return;
    }
    let tmp = world_writable("force");
    let planted = tmp.join("trace.ndjson");
    std::fs::write(&planted, "planted\n").expect("writes");
    chown(&planted, 65534, 65534);
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    // The planter keeps the old file open: it must never see the trace.
    let mut held = std::fs::File::open(&planted).expect("opens");
    let old_ino = std::fs::metadata(&planted).expect("meta").ino();
    let o = trace_true(&planted, &["--force"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = std::fs::metadata(&planted).expect("meta");
    assert_ne!(m.ino(), old_ino, "a new file");
    assert_eq!(
        (m.uid(), m.gid()),
        (0, 0),
        "owned by the user who ran vmatrace"
    );
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert!(
        typed_records(&planted)
            .iter()
            .any(|r| matches!(r, OutputRecord::Summary(_)))
    );
    let mut old = String::new();
    held.read_to_string(&mut old).expect("reads");
    assert_eq!(old, "planted\n", "the old file was never written");
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(&tmp)
        .expect("lists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["trace.ndjson"]);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn fifos_and_devices_are_written_without_force_unless_another_user_planted_them() {
    if !privileged("fifos_and_devices_are_written_without_force_unless_another_user_planted_them") {
        return;
    }
    let o = trace_true(Path::new("/dev/null"), &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &std::fs::metadata("/dev/null").expect("meta").file_type()
    ));

    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    // A FIFO the user made, read by a reader that starts only after vmatrace (so vmatrace
    // must not block on the open before it attaches).
    let dir = temp_dir("fifo");
    let fifo = dir.join("pipe");
    mkfifo(&fifo);
    let start = Instant::now();
    let mut v = KillOnDrop(
        Command::new(vmatrace())
            .args(["--json", "--faults", "none", "-o"])
            .arg(&fifo)
            .arg("--")
            .arg(workload())
            .args(["wait-then-map"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts"),
    );
    // The launched workload prints `ready` once vmatrace has attached and let it run.
    let mut out = std::io::BufReader::new(v.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("reads");
    assert!(line.starts_with("ready"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(30));
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read_to_string(fifo).expect("reads the fifo")
    });
    drop(v.0.stdin.take());
    let status = v.0.wait().expect("waits");
    let text = reader.join().expect("reader");
    assert!(status.success());
    assert!(
        text.lines().any(|l| l.contains("\"type\":\"summary\"")),
        "the reader got the trace: {text}"
    );

    // A FIFO another user made in a world-writable directory: refused, and at once.
    let tmp = world_writable("fifo-planted");
    let planted = tmp.join("pipe");
    mkfifo(&planted);
    chown(&planted, 65534, 65534);
    let start = Instant::now();
    one_error_line(
        &trace_true(&planted, &[], &[]),
        "owned by another user (uid 65534)",
    );
    one_error_line(
        &trace_true(&planted, &["--force"], &[]),
        "owned by another user",
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn under_sudo_the_output_belongs_to_the_invoking_user_who_can_replay_it() {
    if !privileged("under_sudo_the_output_belongs_to_the_invoking_user_who_can_replay_it") {
        return;
    }
    let dir = temp_dir("sudo-owner");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        dir.parent().expect("parent"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let out = dir.join("trace.ndjson");
    let sudo = [
        ("SUDO_USER", "nobody"),
        ("SUDO_UID", "65534"),
        ("SUDO_GID", "65534"),
    ];
    let o = trace_true(&out, &[], &sudo);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = std::fs::metadata(&out).expect("meta");
    let nobody_gid = tracer::sudo::lookup("nobody").expect("nobody exists").gid;
    assert_eq!((m.uid(), m.gid()), (65534, nobody_gid));
    assert_eq!(m.mode() & 0o7777, 0o600);
    // --force makes a new file, given to the user too.
    let o = trace_true(&out, &["--force"], &sudo);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = std::fs::metadata(&out).expect("meta");
    assert_eq!((m.uid(), m.mode() & 0o7777), (65534, 0o600));
    // The user replays it without sudo.
    let o = Command::new(vmatrace())
        .args(["replay"])
        .arg(&out)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("vmatrace summary"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_launched_command_gets_the_invoking_users_environment_and_groups() {
    if !privileged("the_launched_command_gets_the_invoking_users_environment_and_groups") {
        return;
    }
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(vmatrace());
        c.args(["--faults", "none", "-o", "/dev/null", "--"]).args([
            "sh",
            "-c",
            "echo $HOME $USER $LOGNAME; id -u; id -G",
        ]);
        c.env("HOME", "/root")
            .env("USER", "root")
            .env("LOGNAME", "root")
            .env_remove("SUDO_USER")
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let nobody = tracer::sudo::lookup("nobody").expect("nobody exists");
    let home = String::from_utf8(nobody.home).expect("utf-8 home");
    // The oracle for the groups: id(1) itself, asked about the user.
    let groups = Command::new("id")
        .args(["-G", "nobody"])
        .output()
        .expect("id runs");
    let groups = String::from_utf8_lossy(&groups.stdout).trim().to_string();
    let (out, _) = run(&[("SUDO_USER", "nobody"), ("SUDO_UID", "65534")]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{home} nobody nobody").as_str(),
            "65534",
            groups.as_str()
        ],
        "{out}"
    );
    // SUDO_UID without SUDO_USER is not what sudo sets: root, with a warning.
    let (out, err) = run(&[("SUDO_UID", "65534")]);
    assert_eq!(out.lines().nth(1), Some("0"), "{out}");
    assert!(
        err.contains("SUDO_UID") && err.contains("not trusted"),
        "{err}"
    );
    // SUDO_UID that is not SUDO_USER's: not trusted either.
    let (out, err) = run(&[("SUDO_USER", "nobody"), ("SUDO_UID", "12345")]);
    assert_eq!(out.lines().nth(1), Some("0"), "{out}");
    assert!(err.contains("not trusted"), "{err}");
}

/// Runs `vmatrace ARGS` and returns its output and its peak memory (`ru_maxrss`, KiB).
fn run_measured(args: &[&str], input: Option<&Path>) -> (std::process::Output, i64) {
    let mut c = Command::new(vmatrace());
    c.args(args);
    if let Some(i) = input {
        c.arg(i);
    }
    // Reaped by wait4 below, which also gives its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let pid = child.id() as i32;
    let mut stdout = child.stdout.expect("stdout");
    let mut stderr = child.stderr.expect("stderr");
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let mut out = Vec::new();
    let _ = stdout.read_to_end(&mut out);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-buffer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    use std::os::unix::process::ExitStatusExt;
    (
        std::process::Output {
            status: std::process::ExitStatus::from_raw(status),
            stdout: out,
            stderr: err.join().expect("stderr"),
        },
        usage.ru_maxrss,
    )
}

#[test]
fn hostile_recordings_are_refused_in_one_line_with_bounded_memory() {
    const META: &str = "{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n";
    let seed = |vmas: &str, resident: &str| {
        format!(
            "{META}{{\"type\":\"snapshot\",\"ts_ns\":2,\"pid\":7,\"reason\":\"seed\",\"exe\":null,\"vmas\":[{vmas}],\"resident\":[{resident}]}}\n"
        )
    };
    let vma = |start: u64, end: u64| {
        format!(
            "{{\"start\":{start},\"end\":{end},\"perms\":\"rw-p\",\"offset\":0,\"path\":null,\"kind\":\"anon\",\"inode\":0}}"
        )
    };
    let cases = [
        (
            seed(&vma(0x2000, 0x1000), ""),
            ":2: VMA 0x2000-0x1000 ends before it starts",
        ),
        (seed(&vma(0x1000, 0x1000), ""), ":2: VMA 0x1000-0x1000 ends"),
        (
            seed(&vma(0x1000, 1 << 60), ""),
            ":2: VMA 0x1000-0x1000000000000000 goes past the end of any user address space",
        ),
        (
            seed(&vma(0x1000, 0x3000), "[4096, 16384, \"anon\"]"),
            ":2: resident run 0x1000-0x4000 goes beyond its VMA",
        ),
        (
            seed(&vma(0, 1 << 47), "[0, 140737488355328, \"anon\"]"),
            ":2: the snapshot lists 140737488355328 bytes resident",
        ),
        (
            seed(
                &format!("{},{}", vma(0x1000, 0x4000), vma(0x2000, 0x5000)),
                "",
            ),
            ":2: VMAs 0x1000-0x4000 and 0x2000-0x5000 overlap",
        ),
        (format!("{META}\u{ff}\n"), ":2: not JSON"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = temp_path(&format!("hostile-{i}.ndjson"));
        std::fs::write(&p, text).expect("writes");
        for cmd in ["replay", "report"] {
            let (o, rss_kib) = run_measured(&[cmd], Some(&p));
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd} {i}: {err}");
            assert_eq!(err.lines().count(), 1, "{cmd} {i}: {err}");
            assert!(err.contains(needle), "{cmd} {i}: '{needle}' not in {err}");
            assert!(rss_kib < 64 << 10, "{cmd} {i}: {rss_kib} KiB");
        }
    }
    // Bytes that are not text, and a file with no end and no newline.
    let p = temp_path("binary.ndjson");
    std::fs::write(
        &p,
        b"{\"type\":\"meta\",\"ts_ns\":1,\"version\":1}\n\xff\xfe\n",
    )
    .expect("writes");
    let (o, _) = run_measured(&["replay"], Some(&p));
    assert!(String::from_utf8_lossy(&o.stderr).contains(":2: not UTF-8"));
    for cmd in ["replay", "report"] {
        let start = Instant::now();
        let (o, rss_kib) = run_measured(&[cmd, "/dev/zero"], None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("/dev/zero:1: line longer than 64 MiB"),
            "{err}"
        );
        assert!(rss_kib < 256 << 10, "{cmd} /dev/zero: {rss_kib} KiB");
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}
