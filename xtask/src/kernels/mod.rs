//! `cargo xtask kernels`: vmatrace's privileged tests on the kernels people run, under qemu.
//!
//! Downloads the pinned Debian kernels ([`pins`]), boots each under full emulation with a
//! busybox initramfs ([`boot`]) and runs the chosen end-to-end tests there, plus a
//! deterministic workload whose recording is compared with the host's ([`compare`]); the
//! same runs on the host kernel. Prints a table kernel x result and fails when a row does.

mod boot;
mod compare;
mod fetch;
mod pins;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use self::pins::Arch;
use self::{
    boot::{Guest, Kernel},
    pins::{KERNELS, Pin},
};
use crate::{cargo, is_root, output, root, run, step};

/// The end-to-end tests of the smoke set: what changes with the kernel. Capture, the model
/// against `/proc/PID/maps` and `smaps`, follow, exec, exit, loss accounting, both syscall and
/// fault backends, attaching with `-p`, tracefs mounting, `--heap`'s uprobes and the walk of
/// Python frames for `--stacks`. What does not change with the kernel (the CLI's signals,
/// `--duration`, bad input, the schema of the records) runs in the host's tests only. Not the
/// pymalloc tests: the guests' root is a 9p share, whose reads fill buffers through
/// get_user_pages (no page fault), which no fault backend sees (docs/kernels.md).
const SMOKE: &[(&str, &[&str])] = &[
    ("capture", &[]),
    ("probe", &[]),
    (
        "kernel_side",
        &[
            "fork_with_follow_traces_the_child_from_its_first_instruction",
            "exec_replaces_the_model_and_is_followed_by_the_new_image",
            "a_process_ends_with_its_last_thread_not_its_first",
            "overflowing_a_tiny_ring_counts_the_lost_faults",
            "perf_event_backend_reports_first_touches",
            "syscall_backends_give_the_same_records",
            "btf_and_raw_fault_tracepoints_give_the_same_faults",
            "inside_a_pid_namespace_the_same_calls_and_maps_are_seen_with_its_pids",
        ],
    ),
    (
        "model_vs_kernel",
        &[
            "model_matches_proc_maps_and_smaps_at_every_checkpoint",
            "a_followed_fork_child_matches_its_own_maps_and_smaps",
            "a_sparse_scan_of_huge_zero_pages_costs_the_model_one_entry_per_block",
            "an_attach_seeds_the_zero_pages_of_memory_that_was_only_read",
            "an_attach_sees_the_huge_pages_made_before_it",
            "collapsed_huge_pages_are_seen_after_madv_collapse_and_khugepaged",
            "a_child_sharing_memory_changes_its_parents_model",
            "threads_racing_on_the_same_addresses_match_the_kernel",
            "racing_threads_in_a_tiny_ring_count_every_commit_they_lose",
        ],
    ),
    (
        "cli",
        &[
            "attach_with_pid_sees_the_next_calls",
            "tracefs_is_mounted_when_missing_and_own_pid_is_refused",
        ],
    ),
    // `--heap`'s uprobes and its stack words past a wrapper (g++ builds the workload).
    (
        "heap",
        &["cxx_blocks_from_new_are_charged_to_the_code_that_called_new"],
    ),
    // `--stacks` with the kernel's walk of Python frames (thread state by the GIL and by
    // the thread's own slot, the code objects copied).
    (
        "stacks",
        &[
            "python_call_sites_name_the_scripts_functions_and_lines",
            "known_stacks_are_recognised_by_the_kernel_and_keep_each_call_site_its_own",
        ],
    ),
    // `--stacks` and `--fault-stacks` refused in one line before Linux 5.15.
    (
        "schema",
        &["stack_records_are_defined_once_before_the_records_that_name_them"],
    ),
];

/// Tests of the smoke set that run on some kernels only (`arch label`). The longest (about
/// three minutes a guest), whose kernel side changes only between those: the huge zero
/// page's written block is one anonymous and 511 zero pages before Linux 6.13 (6.12 stands
/// for 5.10 and 6.1) and a huge page from 6.13 (7.2).
const ONLY_ON: &[(&str, &[&str])] = &[
    (
        "a_sparse_scan_of_huge_zero_pages_costs_the_model_one_entry_per_block",
        &["amd64 host", "amd64 6.12", "amd64 7.2"],
    ),
    // Stacks need Linux 5.15 (`bpf_task_pt_regs`); Python frames need the thread's TLS base,
    // which the programs find on x86_64 only. The oldest kernel with stacks (fentry syscalls)
    // and the newest (tracepoints, preemptible programs).
    (
        "python_call_sites_name_the_scripts_functions_and_lines",
        &["amd64 host", "amd64 6.1", "amd64 7.2"],
    ),
    // Stacks recognised in the kernel, on the newest kernel (the verifiers of 6.1 and 7.2
    // load the comparison loop in the Python test too; on 6.1 this one took 397 s of a
    // guest's 25 minutes). On arm64 no walk of the static musl workload repeats, for the
    // daemon's memo either: left out until that is understood.
    (
        "known_stacks_are_recognised_by_the_kernel_and_keep_each_call_site_its_own",
        &["amd64 host", "amd64 7.2"],
    ),
    // Where the stacks' refusal (no `bpf_task_pt_regs`) is checked.
    (
        "stack_records_are_defined_once_before_the_records_that_name_them",
        &["amd64 host", "amd64 5.10"],
    ),
];

/// Tests that need what an arm64 guest (busybox only, static musl builds) does not have: left
/// out of the arm64 smoke set. The first checks the dynamic loader's mappings (the static
/// workload has none), the next two use util-linux's `unshare` and `umount`, the last g++ and
/// glibc.
const NOT_ON_ARM64: &[&str] = &[
    "launch_mode_sees_the_dynamic_loader_and_propagates_the_exit_status",
    "tracefs_is_mounted_when_missing_and_own_pid_is_refused",
    "inside_a_pid_namespace_the_same_calls_and_maps_are_seen_with_its_pids",
    "cxx_blocks_from_new_are_charged_to_the_code_that_called_new",
];

/// Which tests run in each guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Selection {
    /// The smoke set (about 20 tests): capture, model vs kernel, follow, losses, CLI modes.
    Smoke,
    /// Every privileged end-to-end test binary.
    Full,
}

/// `cargo xtask kernels` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// The guests' architectures (comma-separated): all their guests share the `--jobs`
    /// slots, longest first.
    #[arg(long, value_enum, default_value = "x86-64", value_delimiter = ',')]
    pub arch: Vec<ArchArg>,
    /// Kernels to boot (comma-separated labels: 5.10, 6.1, 6.12, 7.2), or `all`.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    pub kernel: Vec<String>,
    /// Which tests run in each guest.
    #[arg(long, value_enum, default_value = "smoke")]
    pub tests: Selection,
    /// Guests run at once (each takes one host core under single-threaded emulation).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Do not run the same tests on the host kernel.
    #[arg(long)]
    pub no_host: bool,
    /// The host's tests already ran (`cargo xtask test`): the host makes only the recordings
    /// the guests' are compared with.
    #[arg(skip)]
    pub host_recordings_only: bool,
    /// Wall-clock limit per guest, in seconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout: u64,
    /// Instead of the tests, measure each syscall backend in each guest (x86_64): churn
    /// traced, and the churn and getppid bystanders, as ratios within one run.
    #[arg(long)]
    pub bench: bool,
    /// Rounds of `--bench`.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

/// `--arch` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchArg {
    X86_64,
    Arm64,
}

/// Debian packages the guests need on the host.
fn dependencies(arch: Arch) -> Result<()> {
    let mut wanted = vec![
        ("curl", "/usr/bin/curl"),
        ("kmod", "/usr/bin/kmod"),
        ("xz-utils", "/usr/bin/xz"),
        ("zstd", "/usr/bin/zstd"),
        ("cpio", "/usr/bin/cpio"),
    ];
    match arch {
        Arch::X86_64 => wanted.push(("qemu-system-x86", "/usr/bin/qemu-system-x86_64")),
        Arch::Arm64 => {
            wanted.push(("qemu-system-arm", "/usr/bin/qemu-system-aarch64"));
            // C code in the test binaries' dependencies (criterion's alloca) for aarch64.
            wanted.push(("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"));
            wanted.push((
                "libc6-dev-arm64-cross",
                "/usr/aarch64-linux-gnu/include/stdio.h",
            ));
        }
    }
    crate::apt_install("the kernel matrix", &wanted)?;
    if arch == Arch::Arm64 {
        run(Command::new("rustup").args(["target", "add", arch.musl_target()]))?;
    }
    Ok(())
}

/// The test binaries and the programs they run, built for `arch` on the host.
struct Built {
    /// Test binary name -> path.
    tests: BTreeMap<String, PathBuf>,
    vmatrace: PathBuf,
    workload: PathBuf,
}

fn build(arch: Arch) -> Result<Built> {
    let target = match arch {
        Arch::X86_64 => None,
        Arch::Arm64 => Some(arch.musl_target()),
    };
    let with_target = |c: &mut Command| {
        if let Some(t) = target {
            c.args(["--target", t]);
            // The musl targets link statically with the toolchain's own lld; the little C
            // in dependencies is compiled by Debian's cross gcc.
            c.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld");
            c.env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc");
        }
    };
    let mut c = cargo();
    c.args(["build", "-p", "workloads", "--bin", "workload"]);
    with_target(&mut c);
    run(&mut c)?;
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "tracer",
        "--tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    with_target(&mut c);
    let json = output(&mut c)?;
    let mut tests = BTreeMap::new();
    let mut vmatrace = None;
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(kind)) = (v["executable"].as_str(), v["target"]["kind"][0].as_str())
        else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default().to_string();
        // `cargo test` also builds the binary's own unit tests (profile.test): not those.
        let harness = v["profile"]["test"].as_bool().unwrap_or(false);
        match kind {
            "test" => {
                tests.insert(name, PathBuf::from(exe));
            }
            "bin" if name == "vmatrace" && !harness => vmatrace = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    let vmatrace = vmatrace.context("cargo built no vmatrace binary")?;
    let workload = vmatrace.with_file_name("workload");
    Ok(Built {
        tests,
        vmatrace,
        workload,
    })
}

/// The script each guest (and the host) runs: `VT-*` lines frame what the table reads.
fn script(
    arch: Arch,
    label: &str,
    built: &Built,
    sel: Option<Selection>,
    results: &Path,
) -> String {
    let mut s = String::new();
    let dir = root();
    let _ = writeln!(
        s,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8"
    );
    let _ = writeln!(
        s,
        "export VMATRACE_REQUIRE_PRIVILEGED=1 VMATRACE_PREBUILT=1 RUST_BACKTRACE=1"
    );
    if label != "host" {
        // The tests that scale with the machine's speed take their emulated size.
        let _ = writeln!(s, "export VMATRACE_EMULATED=1");
    }
    let _ = writeln!(s, "cd '{}' || exit 125", dir.display());
    let _ = writeln!(s, "echo \"VT-INFO release $(uname -r)\"");
    let _ = writeln!(
        s,
        "if grep -qs ' group_dead;' /sys/kernel/tracing/events/sched/sched_process_exit/format; then echo 'VT-INFO group_dead yes'; else echo 'VT-INFO group_dead no'; fi"
    );
    let _ = writeln!(s, "rc=0");
    let selected: Vec<(&str, Vec<&str>)> = match sel {
        None => Vec::new(),
        Some(Selection::Smoke) => SMOKE
            .iter()
            .map(|(bin, names)| (*bin, names.to_vec()))
            .collect(),
        Some(Selection::Full) => built
            .tests
            .keys()
            .filter(|t| *t != "soak")
            .map(|t| (t.as_str(), Vec::new()))
            .collect(),
    };
    for (bin, names) in selected {
        let Some(path) = built.tests.get(bin) else {
            continue;
        };
        let _ = writeln!(s, "echo 'VT-BEGIN {bin}'; r=0");
        // One run of the binary per named test, so that each one's time is known (VT-TIME:
        // the guest's uptime before and after).
        let here = format!("{} {label}", arch.debian());
        let skipped = |n: &&str| {
            (arch == Arch::Arm64 && NOT_ON_ARM64.contains(n))
                || ONLY_ON
                    .iter()
                    .any(|(t, on)| t == n && !on.contains(&here.as_str()))
        };
        let runs: Vec<(String, String)> = if names.is_empty() {
            let mut args = String::new();
            if arch == Arch::Arm64 {
                for n in NOT_ON_ARM64 {
                    args.push_str(" --skip ");
                    args.push_str(n);
                }
            }
            vec![("*".to_string(), args)]
        } else {
            names
                .iter()
                .filter(|n| !skipped(n))
                .map(|n| (n.to_string(), format!(" --exact {n}")))
                .collect()
        };
        for (name, args) in runs {
            let _ = writeln!(
                s,
                "read t0 _ < /proc/uptime; '{}' --test-threads=1{args} || r=$?; read t1 _ < /proc/uptime; echo \"VT-TIME {bin} {name} $t0 $t1\"",
                path.display()
            );
        }
        let _ = writeln!(s, "echo \"VT-END {bin} $r\"; [ $r = 0 ] || rc=1");
    }
    // The deterministic workload whose recording is compared with the host's.
    for (name, args) in compare::WORKLOADS {
        let _ = writeln!(
            s,
            "'{}' --json -o '{}/{name}.ndjson' --force {} -- '{}' {} > /dev/null; echo \"VT-RECORD {name} $?\"",
            built.vmatrace.display(),
            results.display(),
            args.0,
            built.workload.display(),
            args.1
        );
    }
    // Which page-fault programs the kernel took (x86: BTF tracepoints, or raw where refused).
    let _ = writeln!(
        s,
        "'{}' -v --faults first -o /dev/null --force -- true 2>&1 | sed -n 's/.*page faults: \\([A-Za-z]*\\) tracepoints.*/VT-INFO fault_programs \\1/p'",
        built.vmatrace.display()
    );
    let _ = writeln!(s, "exit $rc");
    s
}

/// What one row of the table ran and found.
#[derive(Clone)]
struct Row {
    label: String,
    release: String,
    group_dead: String,
    syscalls: String,
    faults: String,
    passed: usize,
    failed: Vec<String>,
    /// What each failed test printed (its panic), shortened: the CI log shows it.
    excerpts: Vec<String>,
    vs_host: String,
    seconds: f64,
    error: Option<String>,
    /// Tests were to run (not so on the host when only its recordings are made).
    tests_expected: bool,
    /// Each test's (or whole binary's, `bin *`) seconds, from the `VT-TIME` lines.
    times: Vec<(String, f64)>,
}

impl Row {
    fn ok(&self) -> bool {
        self.error.is_none() && self.failed.is_empty() && (self.passed > 0 || !self.tests_expected)
    }
}

/// Reads a run's `output.log` into a row.
fn read_row(label: &str, results: &Path, seconds: f64, error: Option<String>) -> Row {
    let log = std::fs::read_to_string(results.join("output.log")).unwrap_or_default();
    let info = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("VT-INFO {key} ")))
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    let mut passed = 0;
    let mut failed = Vec::new();
    let mut times = Vec::new();
    // A binary that exits non-zero without a failed test (a crash, a harness error) fails too.
    let mut failed_before_bin = 0;
    for l in log.lines() {
        if let Some(rest) = l.strip_prefix("test result: ") {
            passed += rest
                .split(';')
                .find_map(|p| p.trim().strip_suffix(" passed"))
                .and_then(|n| n.rsplit(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
        } else if let Some(name) = l
            .strip_prefix("test ")
            .and_then(|r| r.strip_suffix(" ... FAILED"))
        {
            failed.push(name.to_string());
        } else if l.starts_with("VT-BEGIN ") {
            failed_before_bin = failed.len();
        } else if let Some(rest) = l.strip_prefix("VT-TIME ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [bin, name, t0, t1] = w[..]
                && let (Ok(t0), Ok(t1)) = (t0.parse::<f64>(), t1.parse::<f64>())
            {
                times.push((format!("{bin} {name}"), t1 - t0));
            }
        } else if let Some(rest) = l.strip_prefix("VT-END ") {
            let mut w = rest.split_whitespace();
            if let (Some(bin), Some(rc)) = (w.next(), w.next())
                && rc != "0"
                && failed.len() == failed_before_bin
            {
                failed.push(format!("{bin} (exit {rc})"));
            }
        }
    }
    let (syscalls, faults) =
        compare::backends(&results.join(format!("{}.ndjson", compare::WORKLOADS[0].0)));
    let faults = match info("fault_programs").as_str() {
        "?" => faults,
        programs => format!("{faults} ({programs})"),
    };
    Row {
        label: label.to_string(),
        release: info("release"),
        group_dead: info("group_dead"),
        syscalls,
        faults,
        passed,
        failed,
        excerpts: failure_excerpts(&log),
        vs_host: String::new(),
        seconds,
        error,
        tests_expected: true,
        times,
    }
}

/// The output of each failed test in a `cargo test` log (the `---- NAME stdout ----` blocks),
/// at most 40 lines of 400 characters each, without the backtrace's frames and their
/// source lines.
fn failure_excerpts(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for l in log.lines() {
        let header = l
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"));
        let ends = header.is_some() || l == "failures:" || l.starts_with("test result: ");
        if ends && let Some((name, lines)) = current.take() {
            out.push(format!("---- {name}\n{}", lines.join("\n")));
        }
        if let Some(name) = header {
            current = Some((name.to_string(), Vec::new()));
        } else if let Some((_, lines)) = current.as_mut()
            && lines.len() < 40
            && !l.trim_start().starts_with("at ")
            && !is_backtrace_frame(l)
            && !l.trim().is_empty()
        {
            lines.push(l.chars().take(400).collect());
        }
    }
    out
}

/// A numbered frame of a backtrace (`   4: model_vs_kernel::seed_snapshot`).
fn is_backtrace_frame(line: &str) -> bool {
    line.starts_with(' ')
        && line
            .trim_start()
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A prepared guest: kernel, images.
struct Prepared {
    pin: Pin,
    kernel: Kernel,
    image: PathBuf,
    initrd: PathBuf,
}

fn prepare(pin: &Pin) -> Result<Prepared> {
    let arch = pin.arch.debian();
    let (paths, debs) = fetch::fetch_all(&pin.debs(), &pin.series, arch)?;
    let name = debs
        .iter()
        .map(|d| format!("{}_{}", d.package, d.version.replace([':', '~'], "_")))
        .collect::<Vec<_>>()
        .join("+");
    let dir = fetch::unpack(&paths, &name)?;
    let kernel = Kernel::find(&dir, pin.arch)?;
    let (bb, bb_series) = pins::busybox(pin.arch);
    let (bb_paths, bb_debs) = fetch::fetch_all(&[bb], &bb_series, arch)?;
    let bb_dir = fetch::unpack(
        &bb_paths,
        &format!("busybox_{arch}_{}", bb_debs[0].version.replace(':', "_")),
    )?;
    let busybox = [bb_dir.join("bin/busybox"), bb_dir.join("usr/bin/busybox")]
        .into_iter()
        .find(|p| p.exists())
        .context("no busybox in busybox-static")?;
    let cache = fetch::cache_dir().join("boot");
    std::fs::create_dir_all(&cache)?;
    let initrd = boot::initramfs(&kernel, &busybox, &cache)?;
    let image = boot::boot_image(&kernel, &cache)?;
    Ok(Prepared {
        pin: *pin,
        kernel,
        image,
        initrd,
    })
}

/// One guest to boot: its kernel, the script it runs and where its results go.
struct GuestRun {
    arch: Arch,
    prepared: Prepared,
    cmd: String,
    results: PathBuf,
}

impl GuestRun {
    /// Boots the guest, waits for it and reads its row.
    fn run(self, timeout: Duration) -> Row {
        let label = self.prepared.pin.label;
        let shares = match self.arch {
            Arch::X86_64 => Vec::new(),
            Arch::Arm64 => vec![root()],
        };
        let go = || -> Result<boot::Outcome> {
            std::fs::create_dir_all(&self.results)?;
            std::fs::write(self.results.join("cmd.sh"), &self.cmd)?;
            Guest {
                kernel: &self.prepared.kernel,
                image: self.prepared.image.clone(),
                initrd: self.prepared.initrd.clone(),
                results: self.results.clone(),
                shares,
                cpus: 2,
                memory: "3G",
                timeout,
            }
            .run()
        };
        match go() {
            Ok(o) => {
                let err = match (o.rc, o.timed_out) {
                    (_, true) => Some(format!("timed out after {}s", timeout.as_secs())),
                    (None, _) => Some("no exit status (see console.log)".into()),
                    (Some(0), _) => None,
                    (Some(rc), _) => Some(format!("exit {rc}")),
                };
                read_row(label, &self.results, o.seconds, err)
            }
            Err(e) => read_row(label, &self.results, 0.0, Some(format!("{e:#}"))),
        }
    }
}

/// Runs `guests` in `jobs` slots, each slot taking the next guest when its last one is done
/// (the list is in the order to start them), and returns each guest's row with its arch.
fn run_guests(guests: Vec<GuestRun>, jobs: usize, timeout: Duration) -> Vec<(Arch, Row)> {
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(guests));
    let rows = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                // The guard goes with the closure: the queue is not held while a guest runs.
                while let Some(guest) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    let arch = guest.arch;
                    step(&format!(
                        "booting {} {} ({}) under qemu",
                        arch.debian(),
                        guest.prepared.pin.label,
                        guest.prepared.kernel.release
                    ));
                    let row = guest.run(timeout);
                    step(&format!(
                        "{} {}: {} passed, {} failed{} in {:.0} s",
                        arch.debian(),
                        row.label,
                        row.passed,
                        row.failed.len(),
                        row.error
                            .as_ref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default(),
                        row.seconds
                    ));
                    if let Ok(mut r) = rows.lock() {
                        r.push((arch, row));
                    }
                }
            });
        }
    });
    rows.into_inner().unwrap_or_default()
}

/// Runs the matrix and prints a table per architecture.
pub fn kernels(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("the kernel matrix runs privileged tests: run it as root");
    }
    let mut arches: Vec<Arch> = Vec::new();
    for a in &opts.arch {
        let arch = match a {
            ArchArg::X86_64 => Arch::X86_64,
            ArchArg::Arm64 => Arch::Arm64,
        };
        if !arches.contains(&arch) {
            arches.push(arch);
        }
    }
    let all = opts.kernel.iter().any(|k| k == "all");
    let pins_of = |arch: Arch| -> Result<Vec<&'static Pin>> {
        let pins: Vec<&Pin> = KERNELS
            .iter()
            .filter(|p| p.arch == arch && (all || opts.kernel.iter().any(|k| k == p.label)))
            .collect();
        if pins.is_empty() {
            bail!(
                "no pinned {arch:?} kernel among {:?} (have: {})",
                opts.kernel,
                KERNELS
                    .iter()
                    .filter(|p| p.arch == arch)
                    .map(|p| p.label)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(pins)
    };
    if opts.bench {
        if arches != [Arch::X86_64] {
            bail!("--bench runs on the x86_64 guests");
        }
        dependencies(Arch::X86_64)?;
        return bench(opts, &pins_of(Arch::X86_64)?);
    }
    let base = root().join("target").join("kernels");
    let mut guests = Vec::new();
    let mut rows: Vec<(Arch, Row)> = Vec::new();
    for &arch in &arches {
        dependencies(arch)?;
        let pins = pins_of(arch)?;
        let built = build(arch)?;
        for pin in pins {
            let prepared =
                prepare(pin).with_context(|| format!("preparing kernel {}", pin.label))?;
            let results = base.join(format!("{}-{}", arch.debian(), pin.label));
            let cmd = script(arch, pin.label, &built, Some(opts.tests), &results);
            guests.push(GuestRun {
                arch,
                prepared,
                cmd,
                results,
            });
        }
        if arch == Arch::X86_64 && !opts.no_host {
            rows.push((arch, run_host(&built, opts)?));
        }
    }
    // Longest first, so that no slot is left with a long guest at the end: the arm64 guests
    // (the slower emulation), then the newest kernels.
    guests.sort_by_key(|g| {
        (
            g.arch != Arch::Arm64,
            std::cmp::Reverse(g.prepared.pin.label),
        )
    });
    rows.extend(run_guests(
        guests,
        opts.jobs,
        Duration::from_secs(opts.timeout),
    ));
    // Each kernel's recordings against the host's, a table per architecture.
    let host_dir = base.join("host");
    let mut bad = Vec::new();
    let mut excerpts = Vec::new();
    for &arch in &arches {
        let mut arch_rows: Vec<Row> = rows
            .iter()
            .filter(|(a, _)| *a == arch)
            .map(|(_, r)| r.clone())
            .collect();
        arch_rows.sort_by_key(|r| {
            (
                r.label != "host",
                KERNELS
                    .iter()
                    .position(|p| p.arch == arch && p.label == r.label),
            )
        });
        for row in &mut arch_rows {
            if row.label == "host" {
                row.vs_host = "-".into();
                continue;
            }
            let dir = base.join(format!("{}-{}", arch.debian(), row.label));
            row.vs_host = if arch == Arch::X86_64 && !opts.no_host {
                compare::against(&dir, &host_dir)
            } else {
                compare::self_check(&dir)
            };
        }
        print_table(arch, &arch_rows);
        print_slowest(arch, &arch_rows);
        for r in &arch_rows {
            let compared =
                r.vs_host == "-" || r.vs_host.starts_with("same") || r.vs_host.starts_with("ok");
            if !r.ok() || !compared {
                bad.push(format!("{} {}", arch.debian(), r.label));
            }
            if !r.excerpts.is_empty() {
                excerpts.push((format!("{} {}", arch.debian(), r.label), r.excerpts.clone()));
            }
        }
    }
    if !bad.is_empty() {
        for (label, lines) in &excerpts {
            println!("\nxtask: what the failed tests printed on {label}:");
            for e in lines {
                println!("{e}");
            }
        }
        bail!("failed on {} (logs in {})", bad.join(", "), base.display());
    }
    Ok(())
}

/// The host's row: the same script as the guests' (only the recordings when the host's tests
/// already ran).
fn run_host(built: &Built, opts: &Options) -> Result<Row> {
    let results = root().join("target").join("kernels").join("host");
    std::fs::create_dir_all(&results)?;
    let tests = if opts.host_recordings_only {
        None
    } else {
        Some(opts.tests)
    };
    let cmd = script(Arch::X86_64, "host", built, tests, &results);
    std::fs::write(results.join("cmd.sh"), &cmd)?;
    step(if opts.host_recordings_only {
        "making the host kernel's recordings"
    } else {
        "running the tests on the host kernel"
    });
    let started = Instant::now();
    let log = std::fs::File::create(results.join("output.log"))?;
    let status = Command::new("bash")
        .arg(results.join("cmd.sh"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    let err = (!status.success()).then(|| format!("exit {status}"));
    let mut row = read_row("host", &results, started.elapsed().as_secs_f64(), err);
    row.tests_expected = !opts.host_recordings_only;
    Ok(row)
}

/// `--bench`: the syscall-backend benchmark (`bench --syscall-backends`) in each guest, one
/// at a time (each guest then has the host core to itself).
fn bench(opts: &Options, pins: &[&Pin]) -> Result<()> {
    if pins.iter().any(|p| p.arch != Arch::X86_64) {
        bail!("--bench runs on the x86_64 guests");
    }
    run(cargo().args(["build", "--release", "-p", "tracer", "-p", "workloads"]))?;
    let bench_bin = root().join("target/release/bench");
    let base = root().join("target").join("kernels");
    for pin in pins {
        let p = prepare(pin).with_context(|| format!("preparing kernel {}", pin.label))?;
        let results = base.join(format!("bench-{}", pin.label));
        std::fs::create_dir_all(&results)?;
        let cmd = format!(
            "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
             echo \"VT-INFO release $(uname -r)\"\n\
             '{}' --rounds {} --syscall-backends tracepoint,fentry\n",
            bench_bin.display(),
            opts.rounds
        );
        std::fs::write(results.join("cmd.sh"), cmd)?;
        step(&format!(
            "benchmarking the syscall backends on {}",
            pin.label
        ));
        let outcome = Guest {
            kernel: &p.kernel,
            image: p.image.clone(),
            initrd: p.initrd.clone(),
            results: results.clone(),
            shares: Vec::new(),
            cpus: 2,
            memory: "3G",
            timeout: Duration::from_secs(opts.timeout),
        }
        .run()?;
        let log = std::fs::read_to_string(results.join("output.log")).unwrap_or_default();
        println!("\n### {} ({})\n", pin.label, p.kernel.release);
        for l in log
            .lines()
            .filter(|l| l.starts_with('|') || l.starts_with("Syscall"))
        {
            println!("{l}");
        }
        if outcome.rc != Some(0) {
            bail!(
                "the benchmark failed on {} (exit {:?}; see {})",
                pin.label,
                outcome.rc,
                results.join("output.log").display()
            );
        }
    }
    Ok(())
}

fn print_table(arch: Arch, rows: &[Row]) {
    println!();
    println!(
        "| kernel | release | arch | group_dead | syscalls | faults | tests | vs host | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let tests = if let Some(e) = &r.error {
            if r.failed.is_empty() {
                format!("{} passed; {e}", r.passed)
            } else {
                format!("{} passed, FAILED: {}; {e}", r.passed, r.failed.join(", "))
            }
        } else if !r.tests_expected {
            "recordings only".to_string()
        } else if r.failed.is_empty() {
            format!("{} passed", r.passed)
        } else {
            format!("{} passed, FAILED: {}", r.passed, r.failed.join(", "))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            r.label,
            r.release,
            arch.debian(),
            r.group_dead,
            r.syscalls,
            r.faults,
            tests,
            r.vs_host,
            r.seconds
        );
    }
}

/// Each row's slowest tests: where a guest's time goes.
fn print_slowest(arch: Arch, rows: &[Row]) {
    for r in rows.iter().filter(|r| !r.times.is_empty()) {
        let mut times = r.times.clone();
        times.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = times.iter().map(|t| t.1).sum();
        let top: Vec<String> = times
            .iter()
            .take(6)
            .map(|(name, secs)| format!("{name} {secs:.0} s"))
            .collect();
        println!(
            "xtask: {} {}: tests took {total:.0} s, the slowest: {}",
            arch.debian(),
            r.label,
            top.join(", ")
        );
    }
}

/// Boots the pinned `label` kernel of `arch` once and runs `script` there (bash from the host
/// root on x86_64; busybox sh with `shares` mounted read-only on arm64). Returns the exit
/// status and the command's output (`results/output.log`). For `cargo xtask dist --check`.
pub fn run_once(
    arch: Arch,
    label: &str,
    script: &str,
    results: &Path,
    shares: Vec<PathBuf>,
    timeout: Duration,
) -> Result<(Option<i32>, String)> {
    dependencies(arch)?;
    let pin = KERNELS
        .iter()
        .find(|p| p.arch == arch && p.label == label)
        .with_context(|| format!("no pinned {arch:?} kernel {label}"))?;
    let p = prepare(pin).with_context(|| format!("preparing kernel {label}"))?;
    std::fs::create_dir_all(results)?;
    std::fs::write(results.join("cmd.sh"), script)?;
    step(&format!(
        "booting {label} ({}) under qemu",
        p.kernel.release
    ));
    let outcome = Guest {
        kernel: &p.kernel,
        image: p.image.clone(),
        initrd: p.initrd.clone(),
        results: results.to_path_buf(),
        shares,
        cpus: 1,
        memory: "1G",
        timeout,
    }
    .run()?;
    if outcome.timed_out {
        bail!(
            "the {label} guest timed out after {}s (see {})",
            timeout.as_secs(),
            results.join("console.log").display()
        );
    }
    let log = std::fs::read_to_string(results.join("output.log")).unwrap_or_default();
    Ok((outcome.rc, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_tests_panic_is_kept_without_its_backtrace() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                   ---- b stdout ----\n\nthread 'b' panicked at tracer/tests/x.rs:1:2:\n\
                   records differ at 3\nstack backtrace:\n   0: std::panicking\n             at /rustc/x.rs:1\n\n\
                   failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n";
        assert_eq!(
            failure_excerpts(log),
            [
                "---- b\nthread 'b' panicked at tracer/tests/x.rs:1:2:\nrecords differ at 3\nstack backtrace:"
            ]
        );
        assert!(failure_excerpts("test result: ok. 3 passed\n").is_empty());
    }
}
