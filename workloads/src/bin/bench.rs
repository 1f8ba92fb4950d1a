//! `cargo xtask bench`: each workload untraced and under each tracer, alternating, several
//! rounds in one invocation; prints medians and the traced/untraced ratio as Markdown tables.
//! The workload times its own loop, so a tracer's start-up is not counted. Also: the slowdown
//! of a process that is not traced while vmatrace traces another one, and the event rate
//! vmatrace sustained without losing events. Run as root, after a release build.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

fn workload() -> PathBuf {
    target_dir().join("workload")
}

fn vmatrace() -> PathBuf {
    target_dir().join("vmatrace")
}

/// A way to run a workload.
struct Tracer {
    name: &'static str,
    /// Command prefix; the workload and its arguments follow.
    prefix: Vec<String>,
    /// The workload and its arguments go as one string (bpftrace -c).
    one_string: bool,
}

/// What vmatrace captures, printed by bpftrace for the `-c` child: every memory syscall's
/// exit with its return value and every user page fault.
const BPFTRACE_SCRIPT: &str = "tracepoint:syscalls:sys_exit_mmap, tracepoint:syscalls:sys_exit_munmap, \
tracepoint:syscalls:sys_exit_brk, tracepoint:syscalls:sys_exit_mremap, \
tracepoint:syscalls:sys_exit_mprotect, tracepoint:syscalls:sys_exit_madvise \
/pid == cpid/ { printf(\"%d %s %ld\\n\", tid, probe, args->ret); } \
tracepoint:exceptions:page_fault_user /pid == cpid/ \
{ printf(\"%d %lx %lx %lu\\n\", tid, args->address, args->ip, args->error_code); }";

/// What `--heap` captures of the workload's allocator, printed by bpftrace for the `-c` child:
/// each `malloc` with its size and result (entry and return probes), each `free` with its
/// pointer (entry probe), the probes vmatrace attaches. bpftrace puts the `free` probe on the
/// function's first instruction, which the kernel single-steps (vmatrace's skips glibc's
/// null test to an emulated push: `heap::elf`).
const BPFTRACE_HEAP_SCRIPT: &str = "uprobe:/lib/x86_64-linux-gnu/libc.so.6:malloc /pid == cpid/ \
{ @size[tid] = arg0; } \
uretprobe:/lib/x86_64-linux-gnu/libc.so.6:malloc /pid == cpid/ \
{ printf(\"%d malloc %lu %lx\\n\", tid, @size[tid], retval); delete(@size[tid]); } \
uprobe:/lib/x86_64-linux-gnu/libc.so.6:free /pid == cpid/ { printf(\"%d free %lx\\n\", tid, arg0); }";

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_string()).collect()
}

fn tracers() -> Vec<Tracer> {
    let v = vmatrace().display().to_string();
    let mut t = vec![
        Tracer {
            name: "untraced",
            prefix: vec![],
            one_string: false,
        },
        Tracer {
            name: "vmatrace",
            prefix: strings(&[
                &v,
                "--json",
                "-o",
                "/dev/null",
                "--force",
                "--faults",
                "first",
                "--",
            ]),
            one_string: false,
        },
    ];
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("strace") {
        t.push(Tracer {
            name: "strace -f -e trace=memory",
            prefix: strings(&[
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=memory",
                "-o",
                "/dev/null",
            ]),
            one_string: false,
        });
    }
    if have("perf") {
        t.push(Tracer {
            name: "perf trace -F all",
            prefix: strings(&["perf", "trace", "-F", "all", "-o", "/dev/null", "--"]),
            one_string: false,
        });
    }
    if have("bpftrace") {
        t.push(Tracer {
            name: "bpftrace (print each event)",
            prefix: strings(&[
                "bpftrace",
                "-q",
                "-o",
                "/dev/null",
                "-e",
                BPFTRACE_SCRIPT,
                "-c",
            ]),
            one_string: true,
        });
    }
    t
}

/// Runs the workload under `prefix`; returns the nanoseconds the workload reported.
fn once(prefix: &[String], one_string: bool, args: &[&str]) -> Result<f64, String> {
    once_of(&workload(), prefix, one_string, args)
}

/// [`once`] for another program than the workload.
fn once_of(
    program: &std::path::Path,
    prefix: &[String],
    one_string: bool,
    args: &[&str],
) -> Result<f64, String> {
    let mut cmd = match prefix.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest);
            c
        }
    };
    if prefix.is_empty() {
        cmd.args(args);
    } else if one_string {
        cmd.arg(format!("{} {}", program.display(), args.join(" ")));
    } else {
        cmd.arg(program).args(args);
    }
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prefix:?} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[2] == "ns")
                .then(|| w[1].parse::<f64>().ok())
                .flatten()
        })
        .ok_or_else(|| format!("no timing in output: {text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn minimum(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn fail(e: String) -> ! {
    eprintln!("bench: {e}");
    std::process::exit(1)
}

fn background_target() -> Child {
    Command::new("sleep")
        .arg("3600")
        .spawn()
        .unwrap_or_else(|e| fail(format!("sleep: {e}")))
}

/// `--syscall-backends tracepoint,fentry` (`flag` `--syscall-backend`) or
/// `--change-orders exit,entry,lock` (`flag` `--change-order`): what each value of `flag`
/// costs, as ratios in one run: churn traced with it, and three bystanders (churn, a
/// `getppid` loop and fault-loop, not traced) beside vmatrace tracing a sleeping process
/// with it. The syscall backends are run in the guests of `cargo xtask kernels --bench`,
/// where fentry attaches.
fn option_sweep(rounds: usize, flag: &str, values: &[String]) {
    let v = vmatrace().display().to_string();
    let backends = values;
    println!("{flag}: medians of {rounds} alternating rounds; ratio = with vmatrace / without.\n");
    println!("| measurement | untraced | {} |", backends.join(" | "));
    println!("|---|---|{}", "---|".repeat(backends.len()));
    // Traced: churn under each value, in one thread and in two.
    for churn in [
        &["churn", "40000"][..],
        &["churn-threads", "2", "40000"][..],
    ] {
        let mut base = Vec::new();
        let mut traced: Vec<Vec<f64>> = vec![Vec::new(); backends.len()];
        for _ in 0..rounds {
            base.push(once(&[], false, churn).unwrap_or_else(|e| fail(e)));
            for (i, b) in backends.iter().enumerate() {
                let prefix = strings(&[&v, "--json", "-o", "/dev/null", "--force", flag, b, "--"]);
                traced[i].push(once(&prefix, false, churn).unwrap_or_else(|e| fail(e)));
            }
        }
        let b = median(base);
        print!("| {}, traced | {:.1} ms |", churn.join(" "), b / 1e6);
        for t in traced {
            let m = median(t);
            print!(" {:.1} ms ({:.2}x) |", m / 1e6, m / b);
        }
        println!();
    }
    // Bystanders beside vmatrace tracing another (sleeping) process.
    let mut target = background_target();
    for args in [
        &["churn", "40000"][..],
        &["getppid", "2000000"][..],
        &["fault-loop", "400", "256"][..],
    ] {
        let mut alone = Vec::new();
        let mut beside: Vec<Vec<f64>> = vec![Vec::new(); backends.len()];
        for _ in 0..rounds {
            alone.push(once(&[], false, args).unwrap_or_else(|e| fail(e)));
            for (i, b) in backends.iter().enumerate() {
                let mut tracer = Command::new(vmatrace())
                    .args(["--json", "-o", "/dev/null", "--force", flag, b])
                    .arg("-p")
                    .arg(target.id().to_string())
                    .spawn()
                    .unwrap_or_else(|e| fail(format!("vmatrace: {e}")));
                std::thread::sleep(std::time::Duration::from_millis(1500));
                beside[i].push(once(&[], false, args).unwrap_or_else(|e| fail(e)));
                // SAFETY: stopping our own child.
                unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
                let _ = tracer.wait();
            }
        }
        let a = median(alone);
        print!("| bystander {}, not traced | {:.1} ms |", args[0], a / 1e6);
        for t in beside {
            let m = median(t);
            print!(" {:.1} ms ({:.3}x) |", m / 1e6, m / a);
        }
        println!();
    }
    let _ = target.kill();
    let _ = target.wait();
}

/// One traced run as users run it: what the workload paid, what vmatrace itself used, and
/// what it wrote.
struct Costed {
    /// The workload's own time for its loop.
    ns: f64,
    /// vmatrace's CPU time (user and system), the workload's own taken out.
    daemon_cpu_ns: f64,
    /// Syscalls and faults vmatrace reported.
    events: f64,
    /// Bytes of output (0 for /dev/null).
    bytes: f64,
}

/// Runs `vmatrace -o OUT EXTRA -- workload ARGS` and measures it (see [`Costed`]).
fn costed(out: &Path, extra: &[&str], args: &[&str]) -> Result<Costed, String> {
    let child = Command::new(vmatrace())
        .arg("-o")
        .arg(out)
        .arg("--force")
        .args(extra)
        .arg("--")
        .arg(workload())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vmatrace: {e}"))?;
    let pid = child.id() as i32;
    let (mut stdout, mut stderr) = (child.stdout, child.stderr);
    let read = |s: &mut Option<std::process::ChildStdout>| {
        let mut text = String::new();
        if let Some(s) = s {
            let _ = std::io::Read::read_to_string(s, &mut text);
        }
        text
    };
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = std::io::Read::read_to_string(s, &mut text);
        }
        text
    });
    let text = read(&mut stdout);
    let err = err_reader.join().unwrap_or_default();
    // SAFETY: wait4 on our own child writes its status and rusage (which includes the
    // workload it launched and reaped).
    let (status, ru) = unsafe {
        let mut status = 0;
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::wait4(pid, &mut status, 0, &mut ru);
        (status, ru)
    };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("vmatrace {extra:?} {args:?} failed: {err}"));
    }
    let ns_of = |t: libc::timeval| t.tv_sec as f64 * 1e9 + t.tv_usec as f64 * 1e3;
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&key))
                .then(|| w.get(1).and_then(|n| n.parse::<f64>().ok()))
                .flatten()
        })
    };
    let ns = text
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[2] == "ns")
                .then(|| w[1].parse::<f64>().ok())
                .flatten()
        })
        .ok_or_else(|| format!("no timing in output: {text}"))?;
    let workload_cpu = value("cpu_ns").ok_or_else(|| format!("no cpu_ns in output: {text}"))?;
    // "... traced for 1.8 s: 823 syscalls, 102,488 faults, 0 events lost"
    let count_before = |word: &str| -> f64 {
        err.lines()
            .find(|l| l.contains("traced for"))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| w.trim_end_matches(',') == word)?;
                words.get(at.checked_sub(1)?)?.replace(',', "").parse().ok()
            })
            .unwrap_or(0.0)
    };
    Ok(Costed {
        ns,
        daemon_cpu_ns: ns_of(ru.ru_utime) + ns_of(ru.ru_stime) - workload_cpu,
        events: count_before("syscalls") + count_before("faults"),
        bytes: std::fs::metadata(out).map_or(
            0.0,
            |m| {
                if m.is_file() { m.len() as f64 } else { 0.0 }
            },
        ),
    })
}

/// What output costs, as users run it: the workloads untraced, traced with NDJSON to
/// /dev/null, to a file on the disk of this checkout (first touches in runs, the default),
/// and to a file with a record per fault (`--faults all`), then the same two files in the
/// binary format; alternating rounds, medians.
/// Prints the ratio, the bytes written per event and vmatrace's own CPU per event (both
/// beyond those of the same run without the workload's loop).
fn output_costs(rounds: usize) {
    let dir = target_dir();
    let file = dir.join(format!("bench-output-{}.ndjson", std::process::id()));
    let binary = dir.join(format!("bench-output-{}.vmat", std::process::id()));
    let devnull = PathBuf::from("/dev/null");
    let configs: [(&str, &Path, &[&str]); 5] = [
        (
            "NDJSON to /dev/null",
            &devnull,
            &["--json", "--faults", "first"],
        ),
        (
            "NDJSON to a file (runs of first touches)",
            &file,
            &["--json", "--faults", "first"],
        ),
        (
            "NDJSON to a file, a record per fault (--faults all)",
            &file,
            &["--json", "--faults", "all"],
        ),
        (
            "binary to a file (runs of first touches)",
            &binary,
            &["--format", "binary", "--faults", "first"],
        ),
        (
            "binary to a file, a record per fault (--faults all)",
            &binary,
            &["--format", "binary", "--faults", "all"],
        ),
    ];
    println!(
        "Output costs: medians of {rounds} alternating rounds; output files in {} (the checkout's disk).\n",
        dir.display()
    );
    println!(
        "| workload | output | workload time | ratio | bytes per event | vmatrace CPU per event |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, args, idle) in [
        (
            "fault-heavy x400",
            &["fault-loop", "400", "256"][..],
            &["fault-loop", "0", "256"][..],
        ),
        (
            "syscall churn x40000",
            &["churn", "40000"][..],
            &["churn", "0"][..],
        ),
    ] {
        let mut base = Vec::new();
        let mut runs: Vec<Vec<Costed>> = configs.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            base.push(once(&[], false, args).unwrap_or_else(|e| fail(e)));
            for (i, (_, out, extra)) in configs.iter().enumerate() {
                // vmatrace's CPU for the same run without the loop (loading, attaching, the
                // start and end of the process): what is left is the cost of the events.
                let fixed = costed(out, extra, idle).unwrap_or_else(|e| fail(e));
                let mut c = costed(out, extra, args).unwrap_or_else(|e| fail(e));
                c.daemon_cpu_ns -= fixed.daemon_cpu_ns;
                c.events -= fixed.events;
                c.bytes -= fixed.bytes;
                runs[i].push(c);
            }
        }
        let b = median(base);
        println!("| {name} | untraced | {:.1} ms | 1.00x | | |", b / 1e6);
        for ((label, _, _), r) in configs.iter().zip(runs) {
            let t = median(r.iter().map(|c| c.ns).collect());
            let per_event = |f: fn(&Costed) -> f64| {
                median(r.iter().map(|c| f(c) / c.events.max(1.0)).collect())
            };
            let bytes = per_event(|c| c.bytes);
            println!(
                "| {name} | {label} | {:.1} ms | {:.2}x | {} | {:.0} ns |",
                t / 1e6,
                t / b,
                if bytes > 0.0 {
                    format!("{bytes:.1}")
                } else {
                    "-".into()
                },
                per_event(|c| c.daemon_cpu_ns)
            );
        }
    }
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&binary);
}

const USAGE: &str = "usage: bench [--rounds N] [--only TOOL,...]
       bench [--rounds N] (--heap | --output-only | --stacks-only | --syscall-sweep-only)
       bench [--rounds N] (--syscall-backends B,... | --change-orders O,...)
Runs as root after a release build (cargo xtask bench builds and runs it); prints Markdown
tables of medians and ratios against the untraced run of the same round.";

/// Refuses what `main` does not read, in one line, before anything runs.
fn check_args(args: &[String]) {
    const FLAGS: [&str; 4] = [
        "--heap",
        "--output-only",
        "--stacks-only",
        "--syscall-sweep-only",
    ];
    const WITH_VALUE: [&str; 4] = [
        "--rounds",
        "--only",
        "--syscall-backends",
        "--change-orders",
    ];
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        if a == "--help" || a == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if WITH_VALUE.contains(&a.as_str()) {
            if rest.next().is_none() {
                eprintln!("bench: {a} needs a value\n{USAGE}");
                std::process::exit(2);
            }
        } else if !FLAGS.contains(&a.as_str()) {
            eprintln!("bench: unknown argument {a:?}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    check_args(&args);
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    if args.iter().any(|a| a == "--heap") {
        heap(rounds);
        return;
    }
    if let Some(list) = args
        .iter()
        .position(|a| a == "--syscall-backends")
        .and_then(|i| args.get(i + 1))
    {
        let backends: Vec<String> = list.split(',').map(str::to_string).collect();
        option_sweep(rounds, "--syscall-backend", &backends);
        return;
    }
    if let Some(list) = args
        .iter()
        .position(|a| a == "--change-orders")
        .and_then(|i| args.get(i + 1))
    {
        let orders: Vec<String> = list.split(',').map(str::to_string).collect();
        option_sweep(rounds, "--change-order", &orders);
        return;
    }
    // `--syscall-sweep-only`: just the syscall rate sustained without losses.
    if args.iter().any(|a| a == "--syscall-sweep-only") {
        syscall_sweep();
        return;
    }
    // `--output-only`: just what output costs.
    if args.iter().any(|a| a == "--output-only") {
        output_costs(rounds);
        return;
    }
    // `--stacks-only`: just the cost of user stacks.
    if args.iter().any(|a| a == "--stacks-only") {
        stacks_cost(rounds);
        return;
    }
    let workloads: [(&str, Vec<&str>); 3] = [
        (
            "fault-heavy (map, touch 256 pages, unmap) x400",
            vec!["fault-loop", "400", "256"],
        ),
        (
            "syscall churn (mmap, touch 1 page, munmap) x40000",
            vec!["churn", "40000"],
        ),
        (
            "malloc, 4 threads x 100000",
            vec!["malloc-mt", "4", "100000"],
        ),
    ];
    // `--only vmatrace,strace`: just those tools (and the untraced baseline).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|l| l.split(',').map(str::to_string).collect());
    let tracers: Vec<Tracer> = tracers()
        .into_iter()
        .filter(|t| {
            t.name == "untraced"
                || only
                    .as_ref()
                    .is_none_or(|o| o.iter().any(|n| t.name.starts_with(n.as_str())))
        })
        .collect();
    println!(
        "Medians of {rounds} rounds, each configuration alternating; ratio = traced / untraced (and of the fastest rounds).\n"
    );
    print!("| workload |");
    for t in &tracers {
        print!(" {} |", t.name);
    }
    println!();
    println!("|---|{}", "---|".repeat(tracers.len()));
    for (name, wargs) in &workloads {
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); tracers.len()];
        for _ in 0..rounds {
            for (i, t) in tracers.iter().enumerate() {
                times[i].push(once(&t.prefix, t.one_string, wargs).unwrap_or_else(|e| fail(e)));
            }
        }
        let base = median(times[0].clone());
        let base_min = minimum(&times[0]);
        print!("| {name} | {:.1} ms |", base / 1e6);
        for t in times.iter().skip(1) {
            let m = median(t.clone());
            // Noise on this VM only ever adds time: the ratio of the fastest rounds is the
            // steadier second view.
            print!(
                " {:.1} ms ({:.2}x; fastest {:.2}x) |",
                m / 1e6,
                m / base,
                minimum(t) / base_min
            );
        }
        println!();
    }

    // Bystanders: a workload not traced while vmatrace traces a sleeping process. Memory
    // syscalls and faults (churn), and a syscall that is not a memory one (getppid): the
    // syscall tracepoints put every task's syscalls on the slower path.
    let mut target = background_target();
    println!();
    for args in [&["churn", "40000"][..], &["getppid", "2000000"][..]] {
        let mut alone = Vec::new();
        let mut beside = Vec::new();
        for _ in 0..rounds {
            alone.push(once(&[], false, args).unwrap_or_else(|e| fail(e)));
            let mut v = Command::new(vmatrace())
                .args([
                    "--json",
                    "-o",
                    "/dev/null",
                    "--force",
                    "-p",
                    &target.id().to_string(),
                ])
                .spawn()
                .unwrap_or_else(|e| fail(format!("vmatrace: {e}")));
            std::thread::sleep(std::time::Duration::from_millis(700));
            beside.push(once(&[], false, args).unwrap_or_else(|e| fail(e)));
            // SAFETY: stopping our own child.
            unsafe { libc::kill(v.id() as i32, libc::SIGINT) };
            let _ = v.wait();
        }
        let fastest = minimum(&beside) / minimum(&alone);
        let (a, b) = (median(alone), median(beside));
        println!(
            "Bystander ({}, not traced, while vmatrace traces another process): {:.1} ms alone, {:.1} ms beside vmatrace: {:.3}x (fastest rounds: {fastest:.3}x)",
            args.join(" "),
            a / 1e6,
            b / 1e6,
            b / a
        );
    }
    let _ = target.kill();
    let _ = target.wait();

    println!();
    output_costs(rounds);

    println!();
    stacks_cost(rounds);

    // Sustained rate: the fault-heavy workload with every fault recorded; events and losses
    // from the summary.
    let file = std::env::temp_dir().join(format!("vmatrace-bench-{}.ndjson", std::process::id()));
    let out = Command::new(vmatrace())
        .args(["record", "--force", "-o"])
        .arg(&file)
        .arg("--")
        .arg(workload())
        .args(["fault-loop", "400", "256"])
        .output()
        .unwrap_or_else(|e| fail(format!("vmatrace: {e}")));
    let ns = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(1.0);
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let faults = text.matches("\"type\":\"fault\"").count() as f64;
    let lost = text
        .lines()
        .last()
        .and_then(|l| l.split("\"lost_fault\":").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or("?")
        .to_string();
    let _ = std::fs::remove_file(&file);
    println!(
        "\nSustained: {:.0} fault events per second recorded in full (record mode, NDJSON of every fault), {lost} lost.",
        faults / (ns / 1e9)
    );
    sweep();
    syscall_sweep();
    heap(rounds);
}

/// `--heap`: a malloc-heavy workload (one malloc and one free per round, straight through
/// libc) untraced, under `vmatrace --heap`, heaptrack (launch mode) and a bpftrace script with
/// the same probes; medians, ratios and the cost per allocator call.
fn heap(rounds: usize) {
    const ITERS: usize = 1_000_000;
    let iters = ITERS.to_string();
    let wargs = ["malloc-calls", iters.as_str()];
    let v = vmatrace().display().to_string();
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let heaptrack_out =
        std::env::temp_dir().join(format!("vmatrace-bench-heaptrack-{}", std::process::id()));
    let mut tracers = vec![
        Tracer {
            name: "untraced",
            prefix: vec![],
            one_string: false,
        },
        Tracer {
            name: "vmatrace --heap",
            prefix: strings(&[&v, "--heap", "--json", "-o", "/dev/null", "--force", "--"]),
            one_string: false,
        },
        Tracer {
            name: "vmatrace (no --heap)",
            prefix: strings(&[&v, "--json", "-o", "/dev/null", "--force", "--"]),
            one_string: false,
        },
    ];
    if have("heaptrack") {
        tracers.push(Tracer {
            name: "heaptrack",
            prefix: strings(&["heaptrack", "-o", &heaptrack_out.display().to_string()]),
            one_string: false,
        });
    }
    if have("bpftrace") {
        tracers.push(Tracer {
            name: "bpftrace (same probes, print each call)",
            prefix: strings(&[
                "bpftrace",
                "-q",
                "-o",
                "/dev/null",
                "-e",
                BPFTRACE_HEAP_SCRIPT,
                "-c",
            ]),
            one_string: true,
        });
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); tracers.len()];
    for _ in 0..rounds {
        for (i, t) in tracers.iter().enumerate() {
            times[i].push(once(&t.prefix, t.one_string, &wargs).unwrap_or_else(|e| fail(e)));
        }
    }
    // heaptrack writes a compressed trace per run.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        let prefix = heaptrack_out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    println!(
        "\n`--heap`: {ITERS} rounds of malloc + free (2 allocator calls each), medians of {rounds} alternating rounds.\n"
    );
    println!("| tool | time | ratio to untraced (fastest rounds) | per allocator call |");
    println!("|---|---|---|---|");
    let base = median(times[0].clone());
    let base_min = minimum(&times[0]);
    println!(
        "| untraced | {:.1} ms | 1.00x | {:.0} ns |",
        base / 1e6,
        base / (2 * ITERS) as f64
    );
    for (t, ts) in tracers.iter().zip(&times).skip(1) {
        let m = median(ts.clone());
        println!(
            "| {} | {:.1} ms | {:.2}x ({:.2}x) | +{:.0} ns |",
            t.name,
            m / 1e6,
            m / base,
            minimum(ts) / base_min,
            (m - base) / (2 * ITERS) as f64
        );
    }
    heap_past_a_wrapper(rounds, &v, ITERS);
}

/// A C++ program making N rounds of `new` + `delete` of 64 bytes through libstdc++, whose
/// `operator new` calls `malloc`: every call returns into that wrapper, so `--heap` copies its
/// registers and stack words to name the code past it.
const NEW_CALLS_CC: &str = r#"#include <chrono>
#include <cstdio>
#include <cstdlib>
struct Block { char bytes[64]; };
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; i++) {
    Block *b = new Block;
    asm volatile("" : : "r"(b) : "memory");
    delete b;
  }
  auto t1 = std::chrono::steady_clock::now();
  printf("new-calls %lld ns\n",
         (long long)std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  return 0;
}
"#;

/// `--heap` on calls that return into an allocation wrapper (libstdc++'s `operator new`):
/// the program above untraced and traced, alternated; its cost per call beside the direct
/// calls' above. Skipped, said so, without g++.
fn heap_past_a_wrapper(rounds: usize, v: &str, iters: usize) {
    let dir = std::env::temp_dir().join(format!("vmatrace-bench-new-{}", std::process::id()));
    let exe = dir.join("new_calls");
    let built = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("new_calls.cc"), NEW_CALLS_CC))
        .and_then(|()| {
            Command::new("g++")
                .args(["-O1", "-o"])
                .arg(&exe)
                .arg(dir.join("new_calls.cc"))
                .status()
        });
    if !built.is_ok_and(|s| s.success()) {
        println!("\n(`--heap` past a wrapper not measured: g++ could not build the C++ workload.)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let n = iters.to_string();
    let traced = strings(&[v, "--heap", "--json", "-o", "/dev/null", "--force", "--"]);
    let (mut plain, mut heap) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(once_of(&exe, &[], false, &[&n]).unwrap_or_else(|e| fail(e)));
        heap.push(once_of(&exe, &traced, false, &[&n]).unwrap_or_else(|e| fail(e)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (base, m) = (median(plain.clone()), median(heap.clone()));
    println!(
        "\nPast a wrapper: {iters} rounds of C++ `new` + `delete` (libstdc++'s `operator new` calls `malloc`; each call copies its registers and 16 stack words), medians of {rounds} alternating rounds.\n"
    );
    println!("| tool | time | ratio to untraced (fastest rounds) | per allocator call |");
    println!("|---|---|---|---|");
    println!(
        "| untraced | {:.1} ms | 1.00x | {:.0} ns |",
        base / 1e6,
        base / (2 * iters) as f64
    );
    println!(
        "| vmatrace --heap | {:.1} ms | {:.2}x ({:.2}x) | +{:.0} ns |",
        m / 1e6,
        m / base,
        minimum(&heap) / minimum(&plain),
        (m - base) / (2 * iters) as f64
    );
}

/// The syscall rate sustained with nothing lost: one to three `churn` processes at once
/// (mmap, touch one page, munmap: two syscalls and one fault an iteration), followed, every
/// event recorded with the default ring.
/// The duration of a run of workloads, in seconds: the longest of their own loop times
/// (`churn N ns`, `fault_loop N ns` lines of their output).
fn longest_loop_secs(output: &str) -> f64 {
    output
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[2] == "ns").then(|| w[1].parse::<f64>().ok())?
        })
        .fold(0.0, f64::max)
        / 1e9
}

/// The number `key` has in the last record of a recording's NDJSON (its summary).
fn summary_count(text: &str, key: &str) -> u64 {
    text.lines()
        .last()
        .and_then(|l| l.split(&format!("\"{key}\":")).nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn syscall_sweep() {
    println!(
        "\nSyscall sweep (record mode, default ring; `lost_syscall` from the summary):\n\n| output | processes | syscalls/s offered | recorded | lost | lost % |\n|---|---|---|---|---|---|"
    );
    for format in ["ndjson", "vmat"] {
        for procs in [1, 2, 3] {
            let file = std::env::temp_dir()
                .join(format!("vmatrace-ssweep-{}.{format}", std::process::id()));
            let w = workload().display().to_string();
            let script = vec![format!("{w} churn 200000 &"); procs].join(" ") + " wait";
            let out = Command::new(vmatrace())
                .args(["record", "-f", "--force", "-o"])
                .arg(&file)
                .args(["--", "sh", "-c", &script])
                .output()
                .unwrap_or_else(|e| fail(format!("vmatrace: {e}")));
            let secs = longest_loop_secs(&String::from_utf8_lossy(&out.stdout));
            // The records as NDJSON (a binary recording through `vmatrace convert`).
            let text = Command::new(vmatrace())
                .arg("convert")
                .arg(&file)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = std::fs::remove_file(&file);
            let recorded = text.matches("\"enter_ts_ns\"").count() as u64;
            let lost = summary_count(&text, "lost_syscall");
            let offered = (recorded + lost) as f64 / secs.max(1e-9);
            let output = if format == "vmat" { "binary" } else { "NDJSON" };
            println!(
                "| {output} | {procs} | {offered:.0} | {recorded} | {lost} | {:.2} % |",
                100.0 * lost as f64 / (recorded + lost).max(1) as f64,
            );
        }
    }
}

/// The cost of user stacks, as ratios in one run: churn traced without and with `--stacks`,
/// and fault-heavy traced without and with `--fault-stacks 64` and `--fault-stacks 1`, each
/// against the untraced workload; with the stacks the kernel dropped (the ring was more than
/// half full) and the records written.
/// The Python workload of [`stacks_cost`]: one page mapped, touched and unmapped 20,000
/// times, from a function three calls deep.
const PY_CHURN: &str = "import mmap, time\n\
def churn(n):\n\
\x20   for _ in range(n):\n\
\x20       m = mmap.mmap(-1, 4096)\n\
\x20       m[0] = 1\n\
\x20       m.close()\n\
def run():\n\
\x20   churn(20000)\n\
def main():\n\
\x20   run()\n\
start = time.perf_counter_ns()\n\
main()\n\
print('churn', time.perf_counter_ns() - start, 'ns')\n";

fn stacks_cost(rounds: usize) {
    let v = vmatrace().display().to_string();
    let file = std::env::temp_dir().join(format!("vmatrace-stacks-{}.ndjson", std::process::id()));
    let f = file.display().to_string();
    println!(
        "User stacks: medians of {rounds} alternating rounds; ratio = traced / untraced; stacks dropped by the kernel (ring over half full) of the last round.\n"
    );
    println!("| workload | untraced | traced | with stacks | with stacks | ");
    println!("|---|---|---|---|---|");
    // (name, program, its arguments, the vmatrace options of each traced configuration)
    type Case<'a> = (&'a str, PathBuf, Vec<&'a str>, Vec<Vec<&'a str>>);
    let mut cases: Vec<Case> = vec![
        (
            "syscall churn x40000: none / --stacks / --stacks, every stack copied and unwound",
            workload(),
            vec!["churn", "40000"],
            vec![
                vec![],
                vec!["--stacks"],
                vec!["--stacks", "--no-known-stacks"],
            ],
        ),
        (
            "fault-heavy x400: none / --fault-stacks 64 / --fault-stacks 1",
            workload(),
            vec!["fault-loop", "400", "256"],
            vec![
                vec![],
                vec!["--fault-stacks", "64"],
                vec!["--fault-stacks", "1"],
            ],
        ),
    ];
    // The same churn from Python functions three calls deep: with `--stacks` the kernel also
    // walks the Python frames (CPython 3.11).
    let python = PathBuf::from("/usr/bin/python3.11");
    if python.exists() {
        cases.push((
            "Python mmap churn x20000: none / --stacks",
            python,
            vec!["-c", PY_CHURN],
            vec![vec![], vec!["--stacks"]],
        ));
    }
    for (name, program, wargs, configs) in cases {
        let mut base = Vec::new();
        let mut traced: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut dropped = vec![String::new(); configs.len()];
        for _ in 0..rounds {
            base.push(once_of(&program, &[], false, &wargs).unwrap_or_else(|e| fail(e)));
            for (i, extra) in configs.iter().enumerate() {
                let mut prefix = strings(&[&v, "record", "--force", "-o", &f]);
                prefix.extend(strings(extra));
                prefix.push("--".into());
                traced[i]
                    .push(once_of(&program, &prefix, false, &wargs).unwrap_or_else(|e| fail(e)));
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let summary = text.lines().last().unwrap_or("");
                let lost = summary
                    .split("\"lost_stack\":")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .unwrap_or("0");
                let stacks = text.matches("\"type\":\"stack\"").count();
                dropped[i] = format!("{stacks} unique, {lost} dropped");
            }
        }
        let b = median(base);
        print!("| {name} | {:.1} ms |", b / 1e6);
        for (t, d) in traced.into_iter().zip(&dropped) {
            let m = median(t);
            print!(" {:.1} ms ({:.2}x; {d}) |", m / 1e6, m / b);
        }
        println!();
    }
    let _ = std::fs::remove_file(&file);
}

/// Past the loss-free rate: one and then two fault-heavy processes at once (followed), with
/// the default ring and with small ones. Every event is recorded; the table shows the rate
/// offered, what was recorded, what was lost (counted by the kernel side) and that every run
/// ended on its own.
fn sweep() {
    println!(
        "\nLoad sweep (record mode, every fault; `lost` from the summary):\n\n| processes | ring | faults/s offered | recorded | lost | lost % | run ended |\n|---|---|---|---|---|---|---|"
    );
    for procs in [1, 2] {
        for ring in ["8388608", "262144", "16384"] {
            let file =
                std::env::temp_dir().join(format!("vmatrace-sweep-{}.ndjson", std::process::id()));
            let w = workload().display().to_string();
            let script = vec![format!("{w} fault-loop 400 256 &"); procs].join(" ") + " wait";
            // The workloads' output goes to a file, so that a run that does not end can be
            // stopped (and reported) instead of hanging the bench.
            let stdout_file = file.with_extension("stdout");
            let stdout = std::fs::File::create(&stdout_file)
                .unwrap_or_else(|e| fail(format!("{}: {e}", stdout_file.display())));
            let mut child = Command::new(vmatrace())
                .args(["record", "-f", "--force", "--ring-size", ring, "-o"])
                .arg(&file)
                .args(["--", "sh", "-c", &script])
                .stdout(stdout)
                .spawn()
                .unwrap_or_else(|e| fail(format!("vmatrace: {e}")));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let mut ended = None;
            while std::time::Instant::now() < deadline {
                ended = child.try_wait().ok().flatten();
                if ended.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let verdict = match ended {
                Some(s) if s.success() => "yes, exit 0".to_string(),
                Some(s) => format!("with an error ({s})"),
                None => {
                    // SAFETY: stopping our own child.
                    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                    let _ = child.wait();
                    "NO: still running after 60 s, stopped with SIGINT".to_string()
                }
            };
            let out = std::fs::read_to_string(&stdout_file).unwrap_or_default();
            let _ = std::fs::remove_file(&stdout_file);
            let secs = longest_loop_secs(&out);
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let _ = std::fs::remove_file(&file);
            let recorded = text.matches("\"type\":\"fault\"").count() as u64;
            let lost = summary_count(&text, "lost_fault");
            let offered = (recorded + lost) as f64 / secs.max(1e-9);
            println!(
                "| {procs} | {} KiB | {offered:.0} | {recorded} | {lost} | {:.2} % | {verdict} |",
                ring.parse::<u64>().unwrap_or(0) / 1024,
                100.0 * lost as f64 / (recorded + lost).max(1) as f64,
            );
        }
    }
}
