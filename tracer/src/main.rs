//! The `vmatrace` binary: parse the command line, call the library, map errors to exit codes.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::Parser as _;
use tracer::{
    analysis,
    cli::{BackendArg, Cli, Command, TraceArgs},
    output::{FaultFilter, NullSink, human::HumanSink, ndjson::NdjsonSink},
    probe::FaultBackend,
    replay,
    run::{self, RunConfig},
};

fn config(t: TraceArgs, record: bool) -> RunConfig {
    RunConfig {
        pids: t.pids,
        command: t.command,
        follow: t.follow,
        json: t.json || record,
        output: t.output,
        force: t.force,
        duration: t.duration,
        faults: if record && t.faults != FaultFilter::None {
            FaultFilter::All
        } else {
            t.faults
        },
        backend: match t.fault_backend {
            BackendArg::Auto => FaultBackend::Auto,
            BackendArg::Tracepoint => FaultBackend::Tracepoint,
            BackendArg::PerfEvent => FaultBackend::PerfEvent,
        },
        ring_bytes: t.ring_size,
        user: t.user,
        reconcile: t.reconcile.map(Duration::from_secs),
        report: t.report,
    }
}

fn real_main() -> anyhow::Result<u8> {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    match cli.command {
        Some(Command::Replay(r)) => {
            let stdout = std::io::BufWriter::new(std::io::stdout());
            let mut sink: Box<dyn tracer::output::Sink> = if r.json {
                Box::new(NdjsonSink::new(stdout, FaultFilter::All))
            } else {
                let tty = std::io::stdout().is_terminal();
                Box::new(HumanSink::new(stdout, FaultFilter::First, tty, 0))
            };
            replay::replay(&r.file, sink.as_mut(), r.events)?;
            Ok(0)
        }
        Some(Command::Report(r)) => {
            let replayed = replay::replay(&r.file, &mut NullSink, false)?;
            let findings: Vec<_> = replayed
                .session
                .processes()
                .flat_map(|p| analysis::analyze(p, &replayed.limits))
                .collect();
            let stdout = std::io::BufWriter::new(std::io::stdout());
            let mut sink: Box<dyn tracer::output::Sink> = if r.json {
                Box::new(NdjsonSink::new(stdout, FaultFilter::None))
            } else {
                let tty = std::io::stdout().is_terminal();
                Box::new(HumanSink::new(stdout, FaultFilter::None, tty, 0))
            };
            sink.findings(&findings)?;
            sink.flush()?;
            Ok(0)
        }
        Some(Command::Record(t)) => {
            if t.output.is_none() {
                anyhow::bail!("record needs -o FILE");
            }
            let code = run::run(config(t, true))?;
            Ok(code.clamp(0, 255) as u8)
        }
        None => {
            let code = run::run(config(cli.trace, false))?;
            Ok(code.clamp(0, 255) as u8)
        }
    }
}

fn main() -> ExitCode {
    // A closed pipe (`vmatrace ... | head`) ends the output quietly, like other Unix tools.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: the library's messages already name their causes.
            eprintln!("vmatrace: {e}");
            ExitCode::from(1)
        }
    }
}
