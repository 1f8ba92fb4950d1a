//! `cargo xtask`: provisioning, running, testing and benchmarking vmatrace.
//!
//! - `setup`: the nightly `rust-src`, a `bpf-linker` built against the nightly toolchain's own
//!   libLLVM, tracefs mounted, and the Debian packages `--heap` is tested and measured with
//!   (jemalloc, tcmalloc, gcc, g++, heaptrack, bpftrace). Idempotent; quick when already done.
//! - `run -- ARGS`: setup, build, run `vmatrace ARGS`.
//! - `test`: setup, lint (rustfmt, clippy on the workspace, clippy on the eBPF crate for the BPF
//!   target), unit tests, privileged end-to-end tests, fuzz smoke runs.
//! - `bench`: setup, then the benchmarks in `tracer/benches` and `workloads`.
//! - `kernels`: the privileged tests on other kernels (5.10 to 7.x, x86_64 and arm64) under
//!   qemu, and a table kernel x result.
//! - `dist`: static binaries and Debian packages for machines without Rust (`--check`: run on
//!   the 6.1 guests; `--verify`: installed into a fresh Debian root).

mod dist;
mod kernels;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker version the eBPF build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo-fuzz version the fuzz smoke runs use.
const CARGO_FUZZ_VERSION: &str = "0.13.1";
/// The fuzz targets in `fuzz/`, each run briefly by `cargo xtask test`.
const FUZZ_TARGETS: [&str; 4] = ["decode_event", "parse_maps", "replay_line", "model_ops"];

#[derive(Parser)]
#[command(name = "xtask", about = "vmatrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (nightly rust-src, bpf-linker), mount tracefs, and
    /// install the allocators and tools `--heap`'s tests and benchmark use.
    Setup,
    /// Set up, build in release mode and run vmatrace with ARGS (e.g. `-- -- ls -l /`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: lints, unit and property tests, privileged end-to-end
    /// tests (real eBPF, real processes), fuzz smoke runs.
    Test {
        /// Skip clippy and rustfmt.
        #[arg(long)]
        no_lint: bool,
        /// Seconds each fuzz target runs (0: skip fuzzing). Runs of up to a minute are built
        /// unoptimised (3 minutes to build on 2 cores, against 8-9 optimised), longer ones
        /// optimised.
        #[arg(long, default_value_t = 10)]
        fuzz_seconds: u32,
        /// Skip the kernel matrix (`cargo xtask kernels` for x86_64 and arm64 under qemu).
        #[arg(long)]
        no_kernels: bool,
        /// Extra arguments for the privileged test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Set up, then run the benchmarks and print the tables for docs/benchmarks.md.
    Bench {
        /// Rounds per configuration.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Also run the 10-minute soak test.
        #[arg(long)]
        soak: bool,
        /// Only these tools besides the untraced baseline (comma-separated: vmatrace, strace,
        /// perf, bpftrace).
        #[arg(long)]
        only: Option<String>,
        /// Only the `--heap` comparison (vmatrace --heap, heaptrack, bpftrace uprobes).
        #[arg(long)]
        heap: bool,
    },
    /// Boot pinned Debian kernels under qemu, run the privileged tests in each, print a table
    /// kernel x result (e.g. `--kernel 6.1,6.12`, `--arch arm64`).
    Kernels(kernels::Options),
    /// Build static binaries (x86_64, arm64) and Debian packages into target/dist, with man
    /// pages, completions and the systemd unit; `--check` runs them on the 6.1 guests,
    /// `--verify` installs the amd64 package into a fresh Debian 12 root.
    Dist(dist::Options),
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    step(&format!("running {cmd:?}"));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs a build whose output is shown afterwards, and fails if the eBPF build's progress
/// leaked into it as cargo warnings (`warning: tracer@0.1.0: Compiling ...`).
fn quiet_build(cmd: &mut Command) -> Result<()> {
    step(&format!("running {cmd:?}"));
    let out = cmd
        .stdout(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    let leaked: Vec<&str> = err.lines().filter(|l| leaked_progress(l)).collect();
    if let Some(first) = leaked.first() {
        bail!(
            "the eBPF build printed its progress as {} cargo warnings (the first: {first})",
            leaked.len()
        );
    }
    Ok(())
}

/// Whether `line` is cargo's progress report of the inner eBPF build forwarded as a warning.
fn leaked_progress(line: &str) -> bool {
    line.strip_prefix("warning: tracer@")
        .and_then(|rest| rest.split_once(": "))
        .is_some_and(|(_, text)| {
            [
                "Compiling ",
                "Finished ",
                "Fresh ",
                "Downloaded ",
                "Updating ",
            ]
            .iter()
            .any(|p| text.trim_start().starts_with(p))
        })
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn setup() -> Result<()> {
    // 1. The nightly toolchain and its rust-src (for -Z build-std=core).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: present");
    } else {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker, linked against the nightly toolchain's own libLLVM.
    let linker = cargo_home().join("bin").join("bpf-linker");
    if linker.exists() {
        step(&format!("bpf-linker: present at {}", linker.display()));
    } else {
        install_bpf_linker()?;
    }

    // 3. tracefs (attaching tracepoints needs it).
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        step("tracefs: mounted");
    } else if is_root() {
        step("mounting tracefs on /sys/kernel/tracing");
        run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))?;
    } else {
        step("tracefs is not mounted; vmatrace mounts it when run as root");
    }

    // 4. What `--heap` is tested and measured with: the allocators its tests preload, gcc and g++
    //    for their C and C++ workloads, and the tools its benchmark compares with.
    heap_dependencies()
}

/// Debian packages for `--heap`: jemalloc and tcmalloc (preloaded by the tests), gcc and g++
/// (the tests' C and C++ workloads, the benchmark's C++ one), heaptrack and bpftrace (the benchmark's comparison).
fn heap_dependencies() -> Result<()> {
    apt_install(
        "--heap's tests and benchmark",
        &[
            ("libjemalloc2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
            (
                "libtcmalloc-minimal4",
                "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            ),
            ("gcc", "/usr/bin/gcc"),
            ("g++", "/usr/bin/g++"),
            ("heaptrack", "/usr/bin/heaptrack"),
            ("bpftrace", "/usr/bin/bpftrace"),
        ],
    )
}

/// Installs the Debian packages of `wanted` (package, a file it installs) that are missing.
fn apt_install(what: &str, wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, path)| !Path::new(path).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        step(&format!("packages for {what}: present"));
        return Ok(());
    }
    if !is_root() {
        step(&format!(
            "missing {missing:?} for {what} and not root: what needs them will fail"
        ));
        return Ok(());
    }
    step(&format!(
        "installing Debian packages for {what}: {missing:?}"
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian packages the end-to-end tests use: jemalloc (purge-churn workload), Chromium
/// (renders the HTML report), tmux (drives the live view as a terminal would), gcc (the stack
/// tests build C workloads), Go (`go tool pprof` reads the exported profile), Python (a
/// script's stacks), Prometheus (scrapes `--metrics`; the test runs its own server, the
/// package's service is not needed) and strace (the oracle of a suggestion's effect).
fn test_dependencies() -> Result<()> {
    apt_install(
        "the tests",
        &[
            ("libjemalloc2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
            ("chromium", "/usr/bin/chromium"),
            ("tmux", "/usr/bin/tmux"),
            ("gcc", "/usr/bin/gcc"),
            ("golang-go", "/usr/bin/go"),
            ("python3", "/usr/bin/python3"),
            ("prometheus", "/usr/bin/prometheus"),
            ("strace", "/usr/bin/strace"),
        ],
    )
}

/// Tools the benchmark compares against, from Debian's packages: strace, perf, bpftrace,
/// heaptrack.
fn bench_dependencies() -> Result<()> {
    apt_install(
        "the comparison",
        &[
            ("strace", "/usr/bin/strace"),
            ("linux-perf", "/usr/bin/perf"),
            ("bpftrace", "/usr/bin/bpftrace"),
            ("heaptrack", "/usr/bin/heaptrack"),
        ],
    )
}

/// Runs every fuzz target for `seconds` from the committed corpus (`cargo fuzz`, nightly).
fn fuzz(seconds: u32) -> Result<()> {
    if !cargo_home().join("bin").join("cargo-fuzz").exists() {
        step(&format!("installing cargo-fuzz {CARGO_FUZZ_VERSION}"));
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }
    let dir = root().join("fuzz");
    // A short smoke run spends most of its time building: unoptimised then.
    let dev = seconds <= 60;
    for target in FUZZ_TARGETS {
        // New inputs go to a scratch corpus; the committed one is only read.
        let scratch = root().join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        run(Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", target])
            .args(dev.then_some("--dev"))
            .arg(&scratch)
            .arg(dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}")))?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("rustc +nightly -vV does not name its LLVM version"))?;
    let major = llvm
        .split('.')
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| anyhow!("cannot read the LLVM major version from '{llvm}'"))?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .ok_or_else(|| anyhow!("no libLLVM in {}", lib.display()))?;
    let prefix = root()
        .join("target")
        .join("xtask")
        .join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} ({}); this takes a few minutes",
        libllvm.display()
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Clippy on the eBPF crate, as aya-template lints its own: the nightly toolchain, the BPF
/// target with `core` built from source (`setup` installed rust-src), and the
/// `bpf_target_arch` cfg aya-build gives the real build (this machine's architecture). It
/// checks only (no bpf-linker), in a target directory of its own.
fn clippy_ebpf() -> Command {
    let arch = match env::consts::ARCH {
        "aarch64" => "aarch64",
        _ => "x86_64",
    };
    let mut c = Command::new("cargo");
    c.current_dir(root());
    // The outer cargo's (stable) compiler must not be the one the nightly cargo uses.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        c.env_remove(key);
    }
    c.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\""),
    );
    c.args([
        "+nightly",
        "clippy",
        "-p",
        "tracer-ebpf",
        "--bins",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
    ]);
    c.arg(root().join("target").join("clippy-ebpf"));
    c.args(["--", "-D", "warnings"]);
    c
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "tracer"]))?;
            let bin = root().join("target/release/vmatrace");
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                let mut c = Command::new("sudo");
                c.arg("-E").arg(&bin);
                c
            };
            // `cargo xtask run -- -- ls` passes `-- ls`; drop the separator meant for us.
            let args: Vec<&String> = match args.first().map(String::as_str) {
                Some("--") if args.iter().filter(|a| *a == "--").count() > 1 => {
                    args[1..].iter().collect()
                }
                _ => args.iter().collect(),
            };
            let status = cmd.args(args).status().context("running vmatrace")?;
            if !status.success() {
                bail!("vmatrace exited with {status}");
            }
            Ok(())
        }
        Task::Test {
            no_lint,
            fuzz_seconds,
            no_kernels,
            filter,
        } => {
            setup()?;
            test_dependencies()?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--check"]))?;
                // On a fresh clone (CI) this is the first build, eBPF included: its progress
                // must not show (issue #21: hundreds of `warning: tracer@...: Compiling` lines).
                quiet_build(cargo().args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "tracer-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
                run(&mut clippy_ebpf())?;
            }
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--lib",
                "--bins",
            ]))?;
            if !is_root() {
                step("not root: the privileged tests will skip (they need to load eBPF programs)");
            }
            // Privileged end-to-end tests share kernel state: one at a time.
            let mut c = cargo();
            c.args(["test", "-p", "tracer", "--tests", "--", "--test-threads=1"]);
            c.args(&filter);
            run(&mut c)?;
            if fuzz_seconds > 0 {
                fuzz(fuzz_seconds)?;
            }
            // The other kernels (a focused run with a filter skips them).
            if !no_kernels && filter.is_empty() && is_root() {
                kernels::kernels(&kernels::Options {
                    arch: vec![kernels::ArchArg::X86_64, kernels::ArchArg::Arm64],
                    kernel: vec!["all".into()],
                    tests: kernels::Selection::Smoke,
                    jobs: 2,
                    no_host: false,
                    host_recordings_only: true,
                    timeout: 1500,
                    bench: false,
                    rounds: 5,
                })?;
            }
            Ok(())
        }
        Task::Kernels(opts) => {
            setup()?;
            kernels::kernels(&opts)
        }
        Task::Dist(opts) => {
            setup()?;
            dist::dist(&opts)
        }
        Task::Bench {
            rounds,
            soak,
            only,
            heap,
        } => {
            setup()?;
            bench_dependencies()?;
            let mut c = cargo();
            c.args([
                "run",
                "--release",
                "-p",
                "workloads",
                "--bin",
                "bench",
                "--",
            ])
            .arg("--rounds")
            .arg(rounds.to_string());
            if let Some(only) = only {
                c.arg("--only").arg(only);
            }
            if heap {
                c.arg("--heap");
            }
            run(cargo().args(["build", "--release", "-p", "tracer", "-p", "workloads"]))?;
            run(&mut c)?;
            if heap {
                return Ok(());
            }
            if soak {
                // Ten minutes traced; bounded memory is asserted by the (ignored) test.
                run(cargo().args([
                    "test",
                    "--release",
                    "-p",
                    "tracer",
                    "--test",
                    "soak",
                    "--",
                    "--ignored",
                    "--nocapture",
                ]))?;
            }
            // Userspace: replay speed and model scaling (criterion), memory for 1M pages.
            run(cargo().args(["bench", "-p", "tracer", "--bench", "model_memory"]))?;
            run(cargo().args([
                "bench",
                "-p",
                "tracer",
                "--bench",
                "model",
                "--",
                "--warm-up-time",
                "1",
                "--measurement-time",
                "3",
            ]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_builds_progress_is_told_from_real_warnings() {
        assert!(leaked_progress(
            "warning: tracer@0.1.0: Compiling tracer-ebpf v0.1.0 (/work/main/tracer-ebpf)"
        ));
        assert!(leaked_progress(
            "warning: tracer@0.1.0:    Finished `release` profile [optimized] target(s) in 9.1s"
        ));
        assert!(!leaked_progress(
            "warning: tracer@0.1.0: unused variable: `x` (tracer-ebpf/src/maps.rs:3)"
        ));
        assert!(!leaked_progress(
            "   Compiling tracer v0.1.0 (/work/main/tracer)"
        ));
    }
}
