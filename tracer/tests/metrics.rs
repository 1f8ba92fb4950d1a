//! Privileged end-to-end test of `--metrics`: a real Prometheus server (Debian's `prometheus`,
//! installed by `cargo xtask test`) scrapes vmatrace every second, and what it stored for the
//! traced workload is what vmatrace's own snapshot says, which is what the kernel says.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use serde_json::Value;
use tracer::output::{OutputRecord, SnapshotReason};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server of this test's own (config and storage in a temporary directory),
/// killed and its directory removed when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus on 127.0.0.1, scraping `target` every second.
    fn start(target: &str) -> Self {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "Prometheus is needed for this test: `cargo xtask test` (or `apt-get install prometheus`) installs Debian's"
        );
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: vmatrace\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        let port = free_port();
        let log = std::fs::File::create(dir.join("log")).expect("prometheus log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Self { child, dir, port }
    }

    /// `GET path` on its HTTP API: the body of a 200 answer.
    fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        head.lines()
            .next()
            .is_some_and(|l| l.contains(" 200 "))
            .then(|| body.to_string())
    }

    /// The samples `[unix seconds, value]` of the range query `query`.
    fn samples(&self, query: &str) -> Vec<(f64, f64)> {
        let encoded: String = query
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' => c.to_string(),
                _ => format!("%{:02X}", c as u32),
            })
            .collect();
        let Some(body) = self.get(&format!("/api/v1/query?query={encoded}")) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"][0]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s[0].as_f64()?, s[1].as_str().and_then(|v| v.parse().ok())?)))
            .collect()
    }

    /// What it says of its targets and what it logged (for a failure message).
    fn diagnosis(&self) -> String {
        format!(
            "targets: {}\nlog: {}",
            self.get("/api/v1/targets").unwrap_or_default(),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn prometheus_scrapes_the_touched_bytes_of_the_snapshot_and_the_kernel() {
    if !privileged("prometheus_scrapes_the_touched_bytes_of_the_snapshot_and_the_kernel") {
        return;
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus::start(&metrics);
    let (mut v, out) = spawn_workload(&["--metrics", &metrics], "wait-then-map");
    let vmatrace_pid = v.child.id();
    let mut next_line = || v.lines.next().and_then(Result::ok).unwrap_or_default();
    let ready = next_line();
    let pid: u64 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the workload said: {ready}"));
    // Map and write 32 pages, then hold them until told to end.
    let mut stdin = v.child.stdin.take().expect("piped stdin");
    writeln!(stdin).expect("go");
    let mapped = next_line();
    let addr: u64 = mapped
        .strip_prefix("mmap ")
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("the workload said: {mapped}"));

    // vmatrace's snapshot, and the kernel's view of the same moment (the workload waits).
    let smaps = tracer::procfs::read_smaps(pid as u32).expect("smaps");
    let snap = signal_snapshot_typed(vmatrace_pid, &out, pid as u32);
    let taken = now_unix();
    let touched = snapshot_sum(&snap, |r| r.touched_bytes);
    let anon = snapshot_sum(&snap, |r| r.anon_bytes);
    let vmas = snap.vmas.as_ref().map_or(0, Vec::len);

    // The kernel: the workload's mapping is resident page for page as the model says, and
    // the anonymous bytes agree (to the pages the kernel fills for exec and the loader, as
    // in model_vs_kernel).
    let row = snap
        .vmas
        .iter()
        .flatten()
        .find(|r| r.start <= addr && r.end > addr)
        .expect("the mapping in the snapshot");
    let kernel_vma = smaps
        .iter()
        .find(|e| e.map.start <= addr && e.map.end > addr)
        .expect("the mapping in smaps");
    assert_eq!(
        (row.start, row.end),
        (kernel_vma.map.start, kernel_vma.map.end),
        "the mapping's bounds"
    );
    assert_eq!(row.touched_bytes, kernel_vma.rss, "{row:?}");
    assert!(kernel_vma.rss >= 32 * 4096, "{row:?}");
    let kernel_anon: u64 = smaps.iter().map(|e| e.anonymous).sum();
    assert!(
        anon.abs_diff(kernel_anon) <= 64 * 1024,
        "anonymous bytes: snapshot {anon}, smaps {kernel_anon}"
    );

    // Prometheus: every sample scraped after the snapshot equals it (the memory is steady;
    // vmatrace gathers at most once a second, so a scrape just after the snapshot may get
    // numbers of up to a second before it).
    let taken = taken + 1.5;
    let series = |name: &str| format!("{name}{{pid=\"{pid}\"}}[60s]");
    let mut after = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while after.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus has no sample of vmatrace_touched_bytes for pid {pid} after the snapshot\n{}",
            prometheus.diagnosis()
        );
        std::thread::sleep(Duration::from_millis(500));
        after = prometheus
            .samples(&series("vmatrace_touched_bytes"))
            .into_iter()
            .filter(|(t, _)| *t > taken)
            .collect();
    }
    for (t, value) in &after {
        assert_eq!(
            *value as u64, touched,
            "vmatrace_touched_bytes scraped at {t}: the snapshot says {touched}"
        );
    }
    let last = |name: &str| {
        prometheus
            .samples(&series(name))
            .into_iter()
            .rfind(|(t, _)| *t > taken)
            .map(|(_, v)| v as u64)
    };
    assert_eq!(last("vmatrace_anon_bytes"), Some(anon));
    assert_eq!(last("vmatrace_vmas"), Some(vmas as u64));
    assert!(last("vmatrace_faults_total").is_some_and(|n| n >= 32));
    // The ring's fill, read from the kernel at the tick: within the ring.
    let ring = prometheus
        .samples("vmatrace_ring_buffer_bytes[1h]")
        .last()
        .map(|(_, v)| *v as u64)
        .expect("the ring's size");
    let used = prometheus.samples("vmatrace_ring_buffer_used_bytes[1h]");
    assert!(!used.is_empty(), "the ring's fill is exported");
    assert!(used.iter().all(|&(_, v)| (v as u64) < ring), "{used:?}");
    eprintln!(
        "pid {pid}: Prometheus has touched {touched} bytes ({} samples after the snapshot), anon {anon}, {vmas} VMAs",
        after.len()
    );

    // The end: the workload exits, and so does vmatrace.
    writeln!(stdin).expect("end");
    drop(stdin);
    let status = v.child.wait().expect("vmatrace exits");
    assert!(status.success(), "vmatrace: {status:?}");
    let records = typed_records(&out);
    let end = records
        .iter()
        .rev()
        .filter_map(OutputRecord::snapshot)
        .find(|s| s.reason == SnapshotReason::Exit && u64::from(s.pid) == pid)
        .expect("an exit snapshot");
    assert!(snapshot_sum(end, |r| r.touched_bytes) >= 32 * 4096);
}

#[test]
fn a_port_in_use_or_a_bad_address_is_one_line_and_nothing_is_written() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("its address").port();
    let out = temp_path("metrics-port-in-use.ndjson");
    let o = Command::new(vmatrace())
        .args(["--json", "-o"])
        .arg(&out)
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--", "true"])
        .output()
        .expect("vmatrace runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics 127.0.0.1:{port}: cannot listen there")),
        "{stderr}"
    );
    assert!(!out.exists(), "no output file is left");
    for bad in ["127.0.0.1", "localhost:9464", "127.0.0.1:99999", ""] {
        let o = Command::new(vmatrace())
            .args(["--metrics", bad, "--", "true"])
            .output()
            .expect("vmatrace runs");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("is not ADDR:PORT"), "{bad}: {stderr}");
    }
}
