//! Helpers for the privileged end-to-end tests: run the real `vmatrace` binary on the real
//! `workload` program and read what it wrote.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer::{
    model::{Perms, normalize},
    output::OutputRecord,
    procfs,
};

/// Whether this test can load eBPF. When it cannot (not root), prints why and returns false;
/// under `VMATRACE_REQUIRE_PRIVILEGED=1` (CI) a skip is a failure instead.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = format!("{test}: skipped: not root, so eBPF programs cannot be loaded");
    if std::env::var("VMATRACE_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{reason} (VMATRACE_REQUIRE_PRIVILEGED=1 makes a skip a failure)");
    }
    eprintln!("{reason}");
    false
}

/// Whether the kernel has the syscall `name` (its `syscalls:sys_enter_*` tracepoint exists,
/// wherever tracefs is mounted).
pub fn kernel_has_syscall(name: &str) -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|r| Path::new(&format!("{r}/events/syscalls/sys_enter_{name}")).is_dir())
}

/// Whether the kernel has the `mmap_lock` tracepoints (5.11 and later), which order a
/// syscall's change where it held the lock (`--change-order lock`).
pub fn kernel_has_mmap_lock_events() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|r| Path::new(&format!("{r}/events/mmap_lock/mmap_lock_acquire_returned")).is_dir())
}

/// Whether this kernel's `sched_process_exit` has `group_dead` (recent kernels only).
pub fn kernel_has_group_dead() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .filter_map(|r| {
            std::fs::read_to_string(format!("{r}/events/sched/sched_process_exit/format")).ok()
        })
        .any(|f| f.contains(" group_dead;"))
}

/// The vmatrace binary under test.
pub fn vmatrace() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmatrace"))
}

/// Running in a guest of the kernel matrix, under full emulation (`VMATRACE_EMULATED=1`):
/// tests whose size only buys time take a smaller one there.
pub fn emulated() -> bool {
    std::env::var("VMATRACE_EMULATED").is_ok_and(|v| v == "1")
}

static BUILD: Once = Once::new();

/// The workload binary (built on first use, unless `VMATRACE_PREBUILT=1` says it was built
/// beforehand, as in the guests of `cargo xtask kernels`, which have no toolchain to spare).
pub fn workload() -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_vmatrace"))
        .parent()
        .expect("binary has a parent")
        .to_path_buf();
    let bin = target.join("workload");
    if std::env::var("VMATRACE_PREBUILT").is_ok_and(|v| v == "1") {
        return bin;
    }
    BUILD.call_once(|| {
        // The same profile as the vmatrace under test (`target/release` or `target/debug`).
        let release = target.ends_with("release");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "workloads", "--bin", "workload"])
            .args(release.then_some("--release"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the workload failed");
    });
    bin
}

/// Whether the ELF program at `path` is statically linked (no `PT_INTERP` program header):
/// it maps no C library.
pub fn statically_linked(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).expect("the program is readable");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    !(0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == PT_INTERP
    })
}

/// A fresh temporary path for an output file, unique to this call: tests that run at the
/// same time in one process never share a file, whatever `name` they give.
pub fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    // The directories of test binaries that are gone (a run writes hundreds of MB of
    // recordings; kept for a look after a failure, until the next run).
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("vmatrace-test-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let dir = std::env::temp_dir().join(format!("vmatrace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&p);
    p
}

/// Reads every NDJSON record of `path`, asserting each line parses, with each `touches`
/// record (a run of first touches) read as the `fault` records it stands for: one per page,
/// in place, each with the run's fields. [`raw_records`] gives the lines as written.
pub fn records(path: &Path) -> Vec<Value> {
    per_fault(raw_records(path))
}

/// Every NDJSON record of `path` as written, asserting each line parses.
pub fn raw_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("output file readable");
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("line {} is not JSON ({e}): {l}", i + 1))
        })
        .collect()
}

/// `records` with each `touches` record replaced by its faults (docs/json-schema.md: the
/// run's pages from `address` up, one fault each, at `ts_ns` plus its `offsets_ns`), in the
/// order they were taken.
pub fn per_fault(records: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if r["type"] != "touches" {
            out.push(r);
            continue;
        }
        let start = r["address"].as_u64().expect("a touches address");
        let ts = r["ts_ns"].as_u64().expect("a touches time");
        let offsets: Vec<u64> = r["offsets_ns"]
            .as_array()
            .expect("touches offsets")
            .iter()
            .map(|o| o.as_u64().expect("an offset"))
            .collect();
        assert_eq!(Some(offsets.len() as u64), r["pages"].as_u64(), "{r}");
        let mut faults: Vec<Value> = offsets
            .iter()
            .enumerate()
            .map(|(i, offset)| {
                let mut f = r.clone();
                let m = f.as_object_mut().expect("an object");
                m.insert("type".into(), "fault".into());
                m.insert("address".into(), (start + i as u64 * 4096).into());
                m.insert("ts_ns".into(), (ts + offset).into());
                m.insert("pages".into(), 1.into());
                m.insert("stack_grown_to".into(), Value::Null);
                m.remove("end_ns");
                m.remove("offsets_ns");
                f
            })
            .collect();
        faults.sort_by_key(|f| f["ts_ns"].as_u64());
        out.extend(faults);
    }
    out
}

/// The summary record of a run's records.
pub fn summary(recs: &[OutputRecord]) -> &tracer::output::Summary {
    recs.iter()
        .rev()
        .find_map(|r| match r {
            OutputRecord::Summary(s) => Some(&s.record),
            _ => None,
        })
        .expect("a summary record")
}

/// Every record of `path` (NDJSON or binary, maybe compressed), read by the structs that
/// write them, with each `touches` record read as the `fault` records it stands for (as
/// [`records`] does for JSON values). [`raw_typed_records`] gives the records as written.
pub fn typed_records(path: &Path) -> Vec<OutputRecord> {
    typed_per_fault(raw_typed_records(path))
}

/// Every record of `path` as written, read by the structs that write them (each must read).
pub fn raw_typed_records(path: &Path) -> Vec<OutputRecord> {
    let reader = tracer::recording::open(path).expect("output file readable");
    let mut records = tracer::recording::Records::new(reader).expect("a recording");
    let mut out = Vec::new();
    while let Some(v) = records
        .next_record()
        .unwrap_or_else(|e| panic!("{}{}: {e}", path.display(), records.position()))
    {
        out.push(
            OutputRecord::from_value(v)
                .unwrap_or_else(|e| panic!("{}{}: {e}", path.display(), records.position())),
        );
    }
    out
}

/// JSON values read as records (each must be one).
pub fn typed(values: &[Value]) -> Vec<OutputRecord> {
    values
        .iter()
        .map(|v| OutputRecord::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}")))
        .collect()
}

/// `records` with each `touches` record replaced by its faults, in the order they were taken
/// ([`per_fault`] for JSON values).
pub fn typed_per_fault(records: Vec<OutputRecord>) -> Vec<OutputRecord> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        match r {
            OutputRecord::Touches(run) => {
                assert_eq!(run.offsets_ns.len() as u64, run.pages, "{run:?}");
                out.extend(run.fault_records().into_iter().map(OutputRecord::Fault));
            }
            r => out.push(r),
        }
    }
    out
}

/// The indexes strictly between the workload's begin and end markers in `records`
/// (`is_mark(r, advice)`: `r` is the marker `madvise` with that advice).
fn inside_markers<T>(records: &[T], is_mark: impl Fn(&T, u64) -> bool) -> std::ops::Range<usize> {
    let begin = records
        .iter()
        .position(|r| is_mark(r, 0xBEEF))
        .expect("begin marker traced");
    let end = records
        .iter()
        .position(|r| is_mark(r, 0xBEEF + 1))
        .expect("end marker traced");
    begin + 1..end
}

/// Records of `pid` strictly between the workload's begin and end markers.
pub fn typed_between_markers(records: &[OutputRecord], pid: u32) -> Vec<&OutputRecord> {
    let inside = inside_markers(records, |r, advice| {
        r.call("madvise")
            .is_some_and(|s| s.pid == pid && s.args[2] == advice)
    });
    records[inside]
        .iter()
        .filter(|r| r.pid() == Some(pid))
        .collect()
}

/// The pid of the launched workload (from the marker it made).
pub fn typed_marker_pid(records: &[OutputRecord]) -> u32 {
    records
        .iter()
        .filter_map(|r| r.call("madvise"))
        .find(|s| s.args[2] == 0xBEEF)
        .map(|s| s.pid)
        .expect("a marker record")
}

/// The records `vmatrace replay --json PATH` writes (it must succeed).
pub fn replayed(path: &Path) -> Vec<Value> {
    let o = Command::new(vmatrace())
        .args(["replay", "--json"])
        .arg(path)
        .output()
        .expect("replay runs");
    assert!(
        o.status.success(),
        "replay {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("replay writes JSON"))
        .collect()
}

/// The records `vmatrace replay --json PATH` writes, read by their writers' structs.
pub fn replayed_typed(path: &Path) -> Vec<OutputRecord> {
    typed(&replayed(path))
}

/// The result of `vmatrace --json -o FILE [extra] -- workload ARGS`.
pub struct Traced {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// The records, each run of first touches read as its faults ([`records`]).
    pub records: Vec<Value>,
    /// The records as written.
    pub raw: Vec<Value>,
    /// The output file.
    pub path: PathBuf,
}

/// Runs a workload under vmatrace with NDJSON output and returns everything.
pub fn trace_workload(extra: &[&str], args: &[&str]) -> Traced {
    let out = temp_path(&format!(
        "trace-{}.ndjson",
        args.join("-").replace('/', "_")
    ));
    let o = Command::new(vmatrace())
        .args(["--json", "-o"])
        .arg(&out)
        .args(extra)
        .arg("--")
        .arg(workload())
        .args(args)
        .output()
        .expect("vmatrace runs");
    let raw = if out.exists() {
        raw_records(&out)
    } else {
        Vec::new()
    };
    Traced {
        status: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        records: per_fault(raw.clone()),
        raw,
        path: out,
    }
}

/// Records of `pid` strictly between the workload's begin and end markers, as JSON values
/// (for comparisons of whole records as written).
pub fn between_markers(records: &[Value], pid: u64) -> Vec<Value> {
    let inside = inside_markers(records, |r, advice| {
        r["type"] == "madvise" && r["pid"] == pid && r["args"][2] == advice
    });
    records[inside]
        .iter()
        .filter(|r| r["pid"] == pid)
        .cloned()
        .collect()
}

/// The pid of the launched workload (from the marker it made).
pub fn marker_pid(records: &[Value]) -> u64 {
    records
        .iter()
        .find(|r| r["type"] == "madvise" && r["args"][2] == 0xBEEF)
        .and_then(|r| r["pid"].as_u64())
        .expect("a marker record")
}

/// Parses `key n1 n2 ...` lines of the workload's stdout into numbers.
pub fn line_numbers(stdout: &str, key: &str) -> Vec<i64> {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("workload printed no '{key}' line: {stdout}"))
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The `thread TID START PAGES` lines of the `threads` workload.
pub fn thread_lines(stdout: &str) -> Vec<(u64, u64, u64)> {
    let lines: Vec<(u64, u64, u64)> = stdout
        .lines()
        .filter(|l| l.starts_with("thread "))
        .filter_map(|l| {
            let n: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect();
            (n.len() == 3).then(|| (n[0], n[1], n[2]))
        })
        .collect();
    assert!(
        !lines.is_empty(),
        "the workload reported its threads: {stdout}"
    );
    lines
}

/// A vmatrace process with its stdout read line by line.
pub struct Running {
    pub child: Child,
    pub lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Traced {
    /// The records read by the structs that write them, each run of first touches read as
    /// its faults ([`typed_records`]).
    pub fn typed(&self) -> Vec<OutputRecord> {
        typed_per_fault(typed(&self.raw))
    }
}

impl Drop for Running {
    /// A test that fails midway leaves nothing behind: vmatrace and what it launched (a
    /// process group of their own) are killed, stopped processes included.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            kill(self.child.id(), libc::SIGKILL);
        }
        // SAFETY: signalling the process group this helper created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Starts vmatrace with piped stdout (the launched workload inherits it), in a process group
/// of its own.
pub fn spawn(args: &[&str]) -> Running {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(vmatrace())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("vmatrace starts");
    let stdout = child.stdout.take().expect("piped stdout");
    Running {
        child,
        lines: BufReader::new(stdout).lines(),
    }
}

/// Starts `vmatrace --json -o TEMP [extra] -- workload SCENARIO` with piped stdout; returns it
/// and the output file. `scenario` may carry the scenario's arguments after spaces.
pub fn spawn_workload(extra: &[&str], scenario: &str) -> (Running, PathBuf) {
    let out = temp_path(&format!("{}.ndjson", scenario.replace(' ', "-")));
    let out_s = out.to_string_lossy().into_owned();
    let w = workload();
    let mut args = vec!["--json", "-o", &out_s];
    args.extend_from_slice(extra);
    args.extend(["--", w.to_str().expect("utf-8 path")]);
    args.extend(scenario.split(' '));
    (spawn(&args), out)
}

/// Waits until `f` holds, or panics after `secs`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: sending a signal.
    unsafe { libc::kill(pid as i32, sig) };
}

/// What the open file descriptors of `pid` point at (`anon_inode:bpf-prog`, `socket:[123]`,
/// paths); empty when the process is gone.
pub fn open_files(pid: u32) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves no process
/// behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` or `VmHWM` of `pid`, in bytes.
pub fn memory_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .expect("a size in kB")
        * 1024
}

/// The complete lines written so far to `path` (the writer may be mid-line, or the file not
/// there yet).
pub fn complete_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete.lines().map(str::to_string).collect()
}

/// `lines` parsed, each of which must be JSON.
pub fn parse_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

/// The complete NDJSON records written so far to `path`, as written (the writer may be
/// mid-line).
pub fn complete_records(path: &Path) -> Vec<Value> {
    parse_lines(&complete_lines(path))
}

/// Asks vmatrace (`vmatrace_pid`, writing to `out`) for a snapshot with SIGUSR1 and returns
/// the new `signal` snapshot of `pid`.
pub fn signal_snapshot_of(vmatrace_pid: u32, out: &Path, pid: u64) -> Value {
    let is_snap = |r: &Value| r["type"] == "snapshot" && r["reason"] == "signal" && r["pid"] == pid;
    let before = complete_records(out).iter().filter(|r| is_snap(r)).count();
    kill(vmatrace_pid, libc::SIGUSR1);
    let mut snap = Value::Null;
    // The snapshot follows the events already in the ring: under emulation, with other
    // guests on the same cores, a backlog of faults takes minutes.
    wait_for(
        if emulated() { 300 } else { 60 },
        "the signal snapshot",
        || {
            let recs = complete_records(out);
            if recs.iter().filter(|r| is_snap(r)).count() > before {
                snap = recs
                    .iter()
                    .rev()
                    .find(|r| is_snap(r))
                    .cloned()
                    .unwrap_or_default();
                true
            } else {
                false
            }
        },
    );
    snap
}

/// The complete records written so far to `path`, as written, read by their writers'
/// structs.
pub fn complete_typed_records(path: &Path) -> Vec<OutputRecord> {
    typed(&complete_records(path))
}

/// [`signal_snapshot_of`], read by the snapshot's writer struct.
pub fn signal_snapshot_typed(
    vmatrace_pid: u32,
    out: &Path,
    pid: u32,
) -> tracer::output::process_records::SnapshotJson {
    let snap = signal_snapshot_of(vmatrace_pid, out, u64::from(pid));
    match OutputRecord::from_value(snap) {
        Ok(OutputRecord::Snapshot(s)) => *s,
        other => panic!("a snapshot: {other:?}"),
    }
}

/// The finding records of `records`.
pub fn findings_of(records: &[OutputRecord]) -> Vec<&tracer::finding::Finding> {
    records
        .iter()
        .filter_map(|r| match r {
            OutputRecord::Finding(f) => Some(&f.record),
            _ => None,
        })
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The state letter of `pid` in `/proc/PID/stat` (`T` when stopped), `?` when it is gone.
pub fn process_state(pid: u32) -> char {
    procfs::read_stat(pid).map_or('?', |s| s.state)
}

/// Waits (10 s at most) until `pid` is stopped (`what` names it in the panic).
pub fn wait_until_stopped(pid: u32, what: &str) {
    wait_for(10, what, || process_state(pid) == 'T');
}

/// The sum of `field` over a snapshot's VMA rows.
pub fn snapshot_sum(
    snap: &tracer::output::process_records::SnapshotJson,
    field: impl Fn(&tracer::output::report::VmaRow) -> u64,
) -> u64 {
    snap.vmas.as_deref().expect("vmas").iter().map(field).sum()
}

/// The model's normalised map ([`normalize`]) from a snapshot record.
pub fn snapshot_ranges(
    snap: &tracer::output::process_records::SnapshotJson,
) -> Vec<normalize::Range> {
    let rows: Vec<(u64, u64, Perms, Option<&str>)> = snap
        .vmas
        .as_deref()
        .expect("vmas")
        .iter()
        .map(|v| {
            (
                v.start,
                v.end,
                Perms::parse(&v.perms).expect("valid perms"),
                v.path.as_deref(),
            )
        })
        .collect();
    normalize::normalize(rows.iter().map(|(s, e, p, path)| (*s, *e, *p, *path)))
}

/// The kernel's normalised map of `maps` (read from `/proc/PID/maps`).
pub fn maps_ranges(maps: &[procfs::MapsEntry]) -> Vec<normalize::Range> {
    normalize::normalize(
        maps.iter()
            .map(|m| (m.start, m.end, m.perms, m.path.as_deref())),
    )
}

/// The kernel's normalised map of `pid` now.
pub fn kernel_ranges(pid: u32) -> Vec<normalize::Range> {
    maps_ranges(&procfs::read_maps(pid).expect("maps"))
}

/// Runs `cmd` (`what` names it) and asserts that it succeeded, with its stderr otherwise.
pub fn run_ok(what: &str, cmd: &mut Command) -> std::process::Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `vmatrace record [flags] -o FILE -- cmd` (it must succeed; `what` names it); returns its
/// output and FILE.
pub fn record(what: &str, flags: &[&str], cmd: &[&str]) -> (std::process::Output, PathBuf) {
    let file = temp_path(&format!("record-{}.ndjson", what.replace('/', "_")));
    let o = run_ok(
        what,
        Command::new(vmatrace())
            .arg("record")
            .args(flags)
            .arg("-o")
            .arg(&file)
            .arg("--")
            .args(cmd),
    );
    (o, file)
}

/// The findings of `vmatrace report --json FILE` (it must succeed; `what` names it).
pub fn report_findings(what: &str, file: &Path) -> Vec<Value> {
    let r = run_ok(
        what,
        Command::new(vmatrace())
            .args(["report", "--json"])
            .arg(file),
    );
    String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("finding records are JSON"))
        .collect()
}

/// [`report_findings`], read by the finding records' writer struct.
pub fn report_findings_typed(what: &str, file: &Path) -> Vec<tracer::finding::Finding> {
    let records = typed(&report_findings(what, file));
    findings_of(&records).into_iter().cloned().collect()
}

/// Starts `cmd` (a `workload pretouched`, as whichever user) and reads its stdout until it
/// has touched its pages and stopped itself before the attach; returns it, the rest of its
/// stdout and the address of its region.
pub fn pretouched_before_attach(
    cmd: &mut Command,
) -> (
    KillOnDrop,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    u64,
) {
    let mut child = cmd
        .arg("pretouched")
        .stdout(Stdio::piped())
        .spawn()
        .expect("workload starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let target = KillOnDrop(child);
    let mut region = 0u64;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("pretouched ") {
            region = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .expect("addr");
        }
        if line == "checkpoint before_attach" {
            break;
        }
    }
    wait_until_stopped(target.0.id(), "the workload to stop");
    (target, lines, region)
}

/// A summary's processes without the counters that `--faults first` leaves out of a
/// recording (faults that changed nothing are not written, so a replay cannot count them):
/// those counters are zero here.
pub fn processes_without_fault_counts(
    summary: &tracer::output::Summary,
) -> Vec<tracer::output::report::ProcessSummary> {
    let mut procs = summary.processes.clone();
    for p in &mut procs {
        p.faults = 0;
        p.faults_outside_vmas = 0;
    }
    procs
}

/// The last record of `records`, which must be a summary.
pub fn last_summary(records: &[OutputRecord]) -> &tracer::output::Summary {
    match records.last() {
        Some(OutputRecord::Summary(s)) => &s.record,
        other => panic!("the last record is a summary: {other:?}"),
    }
}
