//! The `vmatrace` binary: parse the command line, call the library, map errors to exit codes.

use std::{
    io::{IsTerminal, Write as _},
    process::ExitCode,
};

use clap::Parser as _;
use tracer::{
    analysis,
    cli::{BackendArg, Cli, Command, ExitRuleArg, SyscallBackendArg, TraceArgs},
    output::{
        FaultFilter, file, html, human::HumanSink, live_view::ViewOptions, ndjson::NdjsonSink,
        perfetto, timeline_view::Pictures,
    },
    probe::{ExitRule, FaultBackend, SyscallBackend},
    replay,
    run::{self, RunConfig},
};

fn config(t: TraceArgs, record: bool, verbose: u8) -> RunConfig {
    RunConfig {
        pids: t.pids,
        command: t.command,
        follow: t.follow,
        json: t.json || record,
        output: t.output,
        force: t.force,
        duration: t.duration,
        // Honoured as given; a recording has every fault unless told otherwise.
        faults: t.faults.unwrap_or(if record {
            FaultFilter::All
        } else {
            FaultFilter::First
        }),
        backend: match t.fault_backend {
            BackendArg::Auto => FaultBackend::Auto,
            BackendArg::Tracepoint => FaultBackend::Tracepoint,
            BackendArg::PerfEvent => FaultBackend::PerfEvent,
        },
        syscall_backend: match t.syscall_backend {
            SyscallBackendArg::Auto => SyscallBackend::Auto,
            SyscallBackendArg::Tracepoint => SyscallBackend::Tracepoint,
            SyscallBackendArg::Fentry => SyscallBackend::Fentry,
        },
        exit_rule: match t.exit_rule {
            ExitRuleArg::Auto => ExitRule::Auto,
            ExitRuleArg::GroupDead => ExitRule::GroupDead,
            ExitRuleArg::LiveThreads => ExitRule::LiveThreads,
        },
        ring_bytes: t.ring_size,
        user: t.user,
        reconcile: t.reconcile,
        report: t.report,
        view: ViewOptions {
            verbose: verbose > 0,
            quiet: t.quiet,
            min_size: t.min_size,
        },
        recording: record,
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
        .target(env_logger::Target::Pipe(Box::new(
            tracer::output::status::LogStderr,
        )))
        .init();
    if !matches!(cli.command, None | Some(Command::Record(_))) {
        // No handlers here: the default actions apply.
        tracer::signals::release();
    }
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
            // Check the outputs before the (possibly long) replay.
            let mut html_out = r
                .html
                .as_ref()
                .map(|p| file::create(p, r.force))
                .transpose()?;
            let mut perfetto_out = r
                .perfetto
                .as_ref()
                .map(|p| file::create(p, r.force))
                .transpose()?;
            let mut pictures = Pictures::new();
            let replayed = replay::replay(&r.file, &mut pictures, true)?;
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
            if let Some(out) = html_out.as_mut() {
                let page = html::page(&pictures.picture(html::COLUMNS), &findings);
                out.write_all(page.as_bytes())
                    .map_err(|e| anyhow::anyhow!("writing the HTML report: {e}"))?;
            }
            if let Some(out) = perfetto_out.as_mut() {
                let trace = perfetto::trace(&pictures.picture(perfetto::COLUMNS));
                serde_json::to_writer(std::io::BufWriter::new(out), &trace)
                    .map_err(|e| anyhow::anyhow!("writing the Perfetto trace: {e}"))?;
            }
            Ok(0)
        }
        Some(Command::Record(t)) => {
            if t.output.is_none() {
                anyhow::bail!("record needs -o FILE");
            }
            let code = run::run(config(t, true, cli.verbose))?;
            Ok(code.clamp(0, 255) as u8)
        }
        None => {
            let code = run::run(config(cli.trace, false, cli.verbose))?;
            Ok(code.clamp(0, 255) as u8)
        }
    }
}

fn main() -> ExitCode {
    // Before anything else: a signal sent while vmatrace starts waits for its handler.
    tracer::signals::hold();
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
