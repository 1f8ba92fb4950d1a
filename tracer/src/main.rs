//! The `vmatrace` binary: parse the command line, call the library, map errors to exit codes.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use clap::Parser as _;
use tracer::{
    analysis,
    cli::{BackendArg, ChangeOrderArg, Cli, Command, ExitRuleArg, SyscallBackendArg, TraceArgs},
    output::{
        FaultFilter,
        compress::OutFile,
        file, html,
        human::{self, HumanSink},
        live_view::ViewOptions,
        perfetto, profile,
        records::{Format, RecordSink},
        timeline_view::Pictures,
    },
    probe::{ChangeOrder, ExitRule, FaultBackend, StackOptions, SyscallBackend},
    replay,
    run::{self, RunConfig},
};

fn config(t: TraceArgs, record: bool, verbose: u8) -> RunConfig {
    RunConfig {
        pids: t.pids,
        cgroup: t.cgroup,
        command: t.command,
        follow: t.follow,
        // Records, not human lines, when a format is asked for or the file is named for it.
        json: t.json
            || record
            || t.format.is_some()
            || t.output
                .as_deref()
                .is_some_and(tracer::output::binary::by_name),
        format: t
            .format
            .or_else(|| t.output.as_deref().map(Format::by_name))
            .unwrap_or_default(),
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
            BackendArg::BtfTracepoint => FaultBackend::BtfTracepoint,
            BackendArg::RawTracepoint => FaultBackend::RawTracepoint,
            BackendArg::PerfEvent => FaultBackend::PerfEvent,
        },
        syscall_backend: match t.syscall_backend {
            SyscallBackendArg::Auto => SyscallBackend::Auto,
            SyscallBackendArg::Tracepoint => SyscallBackend::Tracepoint,
            SyscallBackendArg::Fentry => SyscallBackend::Fentry,
        },
        change_order: match t.change_order {
            ChangeOrderArg::Auto => ChangeOrder::Auto,
            ChangeOrderArg::Lock => ChangeOrder::Lock,
            ChangeOrderArg::Entry => ChangeOrder::Entry,
            ChangeOrderArg::Exit => ChangeOrder::Exit,
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
        heap: t.heap,
        stacks: StackOptions {
            syscalls: t.stacks,
            fault_every: t.fault_stacks.unwrap_or(0),
            stack_bytes: t.stack_bytes,
            known: !t.no_known_stacks,
        },
        rotation: t.max_size.map(|max_size| tracer::output::rotate::Rotation {
            max_size,
            max_files: t.max_files,
        }),
        snapshot_every: t.snapshot_every,
        metrics: t.metrics,
    }
}

fn real_main() -> anyhow::Result<u8> {
    // `vmatrace generate ...` (for packagers) is parsed apart: it stays out of the man pages
    // and completions it writes.
    if std::env::args_os().nth(1).is_some_and(|a| a == "generate") {
        tracer::generate::main(std::env::args_os().skip(1))?;
        return Ok(0);
    }
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
                Box::new(RecordSink::new(stdout, FaultFilter::All))
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
            let pprof_out = r
                .pprof
                .as_ref()
                .map(|p| file::create(p, r.force))
                .transpose()?;
            let folded_out = r
                .folded
                .as_ref()
                .map(|p| file::create(p, r.force))
                .transpose()?;
            let mut pictures = Pictures::new();
            let replayed = replay::replay(&r.file, &mut pictures, true)?;
            let findings: Vec<_> = replayed
                .session
                .processes()
                .flat_map(|p| analysis::analyze(p, &replayed.limits, &replayed.session.stacks))
                .collect();
            let stdout = std::io::BufWriter::new(std::io::stdout());
            let mut sink: Box<dyn tracer::output::Sink> = if r.json {
                Box::new(RecordSink::new(stdout, FaultFilter::None))
            } else {
                let tty = std::io::stdout().is_terminal();
                Box::new(HumanSink::new(stdout, FaultFilter::None, tty, 0))
            };
            sink.findings(&findings)?;
            sink.flush()?;
            drop(sink);
            if !r.json {
                let mut stdout = std::io::BufWriter::new(std::io::stdout());
                human::write_call_sites(&mut stdout, &replayed.session, r.stacks)?;
                stdout.flush()?;
            }
            if let Some(out) = pprof_out {
                let mut out = std::io::BufWriter::new(out);
                profile::write_pprof(&mut out, &replayed.session, 0)
                    .and_then(|()| out.flush())
                    .map_err(|e| anyhow::anyhow!("writing the pprof profile: {e}"))?;
            }
            if let Some(out) = folded_out {
                let mut out = std::io::BufWriter::new(out);
                profile::write_folded(&mut out, &replayed.session, r.folded_value)
                    .and_then(|()| out.flush())
                    .map_err(|e| anyhow::anyhow!("writing the folded stacks: {e}"))?;
            }
            if let Some(out) = html_out.as_mut() {
                let code = html::Code {
                    names: replayed
                        .session
                        .processes()
                        .map(|p| (p.pid, p.exe.clone().unwrap_or_else(|| "?".into())))
                        .collect(),
                    sites: replayed
                        .session
                        .processes()
                        .map(|p| {
                            let rows = tracer::stacks::sites::table(
                                &p.sites,
                                &replayed.session.stacks,
                                usize::MAX,
                            );
                            (p.pid, rows)
                        })
                        .collect(),
                    // Charged to the stacks that mapped the memory, not also to those
                    // that touched it (--fault-stacks), which would count it twice.
                    touched: profile::by_names(&replayed.session, |t| t.stats.touched_bytes),
                };
                let page = html::page(&pictures.picture(html::COLUMNS), &findings, &code);
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
        Some(Command::Convert(c)) => {
            let format = c
                .format
                .or_else(|| c.output.as_deref().map(Format::by_name))
                .unwrap_or_default();
            // The input is open before the output is created (--force may replace it).
            let input = replay::open(&c.file)?;
            let mut out: Box<dyn Write> = match &c.output {
                Some(path) => Box::new(OutFile::create(path, c.force, format)?),
                None if format == Format::Binary && std::io::stdout().is_terminal() => {
                    return Err(file::OutputError::BinaryToTerminal.into());
                }
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            tracer::convert::convert(input, &c.file.display().to_string(), out.as_mut(), format)?;
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
            eprintln!("vmatrace: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each once (see [`tracer::errors::chain`]).
fn chain(e: &anyhow::Error) -> String {
    tracer::errors::chain(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Read {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn an_error_is_printed_with_each_of_its_causes_once_on_one_line() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let e = anyhow::Error::new(Read {
            path: "/x".into(),
            source: io,
        })
        .context("setting up");
        assert_eq!(
            chain(&e),
            "setting up: cannot read /x: Permission denied (os error 13)"
        );
        let e = anyhow::anyhow!("loading failed. Verifier output:\n0: r1 = 0\n1: exit")
            .context("cannot attach x");
        assert_eq!(
            chain(&e),
            "cannot attach x: loading failed. Verifier output:\n0: r1 = 0\n1: exit"
        );
    }
}
