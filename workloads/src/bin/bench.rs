//! `cargo xtask bench`: each workload untraced and traced by vmatrace, alternating, several
//! rounds in one invocation; prints medians and the traced/untraced ratio. The workload times
//! its own loop, so vmatrace's start-up is not counted. Run as root, after a release build.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// Runs the workload (optionally under `tracer` args) and returns the ns it reported.
fn once(tracer: Option<&[&str]>, args: &[&str]) -> Result<f64, String> {
    let dir = target_dir();
    let workload = dir.join("workload");
    let mut cmd = match tracer {
        None => Command::new(&workload),
        Some(t) => {
            let mut c = Command::new(dir.join("vmatrace"));
            c.args(t).arg("--").arg(&workload);
            c
        }
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?} failed: {}",
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let vmatrace_all: &[&str] = &["--json", "-o", "/dev/null", "--force", "--faults", "first"];
    let workloads: [(&str, Vec<&str>, usize); 3] = [
        (
            "fault-heavy (map, touch 256 pages, unmap) x400",
            vec!["fault-loop", "400", "256"],
            400 * 256,
        ),
        (
            "syscall churn (mmap, touch 1 page, munmap) x40000",
            vec!["churn", "40000"],
            40000,
        ),
        (
            "malloc, 4 threads x 100000",
            vec!["malloc-mt", "4", "100000"],
            400_000,
        ),
    ];
    println!("| workload | untraced median | vmatrace median | ratio | per op untraced |");
    println!("|---|---|---|---|---|");
    for (name, wargs, ops) in workloads {
        let mut base = Vec::new();
        let mut traced = Vec::new();
        for _ in 0..rounds {
            match (once(None, &wargs), once(Some(vmatrace_all), &wargs)) {
                (Ok(b), Ok(t)) => {
                    base.push(b);
                    traced.push(t);
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("bench: {e}");
                    std::process::exit(1);
                }
            }
        }
        let (b, t) = (median(base), median(traced));
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.3} | {:.2} µs |",
            b / 1e6,
            t / 1e6,
            t / b,
            b / 1e3 / ops as f64
        );
    }
}
