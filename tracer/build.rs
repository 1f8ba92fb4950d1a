//! Builds `tracer-ebpf` for the BPF target with aya-build; `src/probe` embeds the object.
//!
//! aya-build turns every line of the inner cargo's progress (`Compiling ...`, `Finished ...`)
//! into a `cargo:warning`, so a first build printed hundreds of warnings that were not. The
//! build therefore runs in a child process (this same script, asked to by an environment
//! variable) whose output is read here: cargo's instructions pass through, progress lines are
//! dropped, and everything is shown when the eBPF build fails. Diagnostics of the eBPF code
//! itself (a real compiler warning) still pass through as warnings.
use std::{
    io::Write as _,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Set in the child that runs aya-build.
const INNER: &str = "VMATRACE_EBPF_BUILD_INNER";

fn build() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::default())
}

/// Whether a line aya-build forwarded as a warning is only cargo's progress report.
fn is_progress(text: &str) -> bool {
    const STATUS: [&str; 12] = [
        "Compiling",
        "Finished",
        "Fresh",
        "Blocking",
        "Updating",
        "Downloading",
        "Downloaded",
        "Locking",
        "Adding",
        "Checking",
        "Building",
        "Running",
    ];
    let t = text.trim_start();
    t.is_empty()
        || STATUS
            .iter()
            .any(|s| t.strip_prefix(s).is_some_and(|r| r.starts_with(' ')))
}

fn main() -> ExitCode {
    if std::env::var_os(INNER).is_some() {
        return match build() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => {
            eprintln!("the build script cannot find itself: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match Command::new(me).env(INNER, "1").output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("the eBPF build could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut cargo = std::io::stdout().lock();
    if !out.status.success() {
        // Everything, so that the failure can be understood.
        let mut err = std::io::stderr().lock();
        for line in stdout.lines() {
            let _ = writeln!(
                err,
                "{}",
                line.strip_prefix("cargo:warning=").unwrap_or(line)
            );
        }
        let _ = err.write_all(&out.stderr);
        return ExitCode::FAILURE;
    }
    for line in stdout.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) if is_progress(text) => {}
            _ if line.starts_with("cargo:") => {
                let _ = writeln!(cargo, "{line}");
            }
            _ => {}
        }
    }
    ExitCode::SUCCESS
}
