//! Feedback for a person at a terminal, on stderr: a banner once tracing has started (what is
//! traced, which kernel programs, where the output goes), a status line redrawn in place while
//! it runs (processes, events per second, losses, time, what was written), and a short summary
//! at the end when the output went to a file or a pipe.
//!
//! The status line is drawn only when stderr is a terminal, and never reaches stdout: every
//! write of vmatrace's own to the terminal (output lines, log messages) first clears it
//! ([`clear_status_line`]), and it is drawn again at the next tick.

use std::{
    collections::VecDeque,
    io::{self, IsTerminal, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    FaultFilter, LossSummary, Meta, Sink, SnapshotReason, Summary,
    compress::OutFile,
    counted::{Counted, Written},
    file::OutputError,
    human::HumanSink,
    live_view::LiveView,
    records::{Format, RecordSink},
    thousands,
};
use crate::{
    analysis::Finding,
    config::RunConfig,
    event::Event,
    flags::size,
    name::shown,
    session::{Applied, Process, Session},
    signals::Watched,
};

/// Whether a status line is on the terminal now.
static LINE_DRAWN: AtomicBool = AtomicBool::new(false);

/// Clears the status line if one is drawn (before anything else is written to the terminal).
pub fn clear_status_line() {
    if LINE_DRAWN.swap(false, Ordering::Relaxed) {
        let mut err = io::stderr().lock();
        let _ = err.write_all(b"\r\x1b[K");
        let _ = err.flush();
    }
}

/// stderr for log messages: clears the status line first.
pub struct LogStderr;

impl Write for LogStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        clear_status_line();
        io::stderr().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// A terminal's stdout: clears the status line before bytes reach the terminal.
pub struct TerminalOut<W: Write>(pub W);

impl<W: Write> Write for TerminalOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        clear_status_line();
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Bytes as `12.3 MB` (the unit people see for files).
fn file_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// `m:ss` or `h:mm:ss`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The terminal's width in columns (80 when it cannot be read).
fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize; stderr is a valid descriptor.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

/// How often the status line is drawn again.
const REDRAW: Duration = Duration::from_millis(250);

/// A sink around the run's real sink that gives the feedback described in the module
/// documentation.
pub struct Feedback {
    inner: Box<dyn Sink>,
    /// Draw a status line (stderr is a terminal).
    status: bool,
    /// Print a short summary on stderr at the end (the output is not on the terminal).
    end_summary: bool,
    recording: bool,
    /// The output is NDJSON (counted in records, else in lines).
    json: bool,
    /// Where the output goes, for the status line and the summary.
    output: Option<String>,
    written: Option<Arc<Written>>,
    started: Instant,
    duration: Option<Duration>,
    events: u64,
    lost: u64,
    alive: usize,
    rate: VecDeque<(Instant, u64)>,
    last_draw: Option<Instant>,
    summary: Option<Summary>,
}

impl Feedback {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Sink>) -> Self {
        Self {
            inner,
            status: false,
            end_summary: false,
            recording: false,
            json: false,
            output: None,
            written: None,
            started: Instant::now(),
            duration: None,
            events: 0,
            lost: 0,
            alive: 0,
            rate: VecDeque::new(),
            last_draw: None,
            summary: None,
        }
    }

    fn line(&mut self) -> String {
        let now = Instant::now();
        self.rate.push_back((now, self.events));
        while self.rate.len() > 2
            && self
                .rate
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_millis(1500))
        {
            self.rate.pop_front();
        }
        let per_second = match (self.rate.front(), self.rate.back()) {
            (Some((t0, e0)), Some((t1, e1))) if t1 > t0 => {
                ((e1 - e0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let mut parts = vec![
            format!(
                "{} process{}",
                self.alive,
                if self.alive == 1 { "" } else { "es" }
            ),
            format!("{} events/s", thousands(per_second)),
            format!("{} lost", thousands(self.lost)),
        ];
        let elapsed = self.started.elapsed();
        parts.push(match self.duration {
            Some(d) => format!("{} of {}", clock(elapsed), clock(d)),
            None => format!("{} elapsed", clock(elapsed)),
        });
        if let (Some(w), Some(out)) = (&self.written, &self.output) {
            parts.push(format!(
                "{} {} ({}) to {out}",
                thousands(w.lines.load(Ordering::Relaxed)),
                if self.json { "records" } else { "lines" },
                file_size(w.bytes.load(Ordering::Relaxed))
            ));
        }
        let what = if self.recording {
            "recording"
        } else {
            "tracing"
        };
        format!("[vmatrace {what}] {}", parts.join(", "))
    }

    fn draw(&mut self) {
        let now = Instant::now();
        if !self.status
            || self
                .last_draw
                .is_some_and(|t| now.duration_since(t) < REDRAW)
        {
            return;
        }
        self.last_draw = Some(now);
        let mut text = self.line();
        let width = terminal_width().saturating_sub(1).max(10);
        if text.chars().count() > width {
            text = text.chars().take(width).collect();
        }
        let mut err = io::stderr().lock();
        let _ = write!(err, "\r\x1b[K\x1b[7m{text}\x1b[0m");
        let _ = err.flush();
        LINE_DRAWN.store(true, Ordering::Relaxed);
    }

    /// The short summary for stderr.
    fn report(&self, s: &Summary) {
        let mut err = io::stderr().lock();
        let total = s.processes.len();
        let syscalls: u64 = s.processes.iter().flat_map(|p| p.syscalls.values()).sum();
        let faults: u64 = s.processes.iter().map(|p| p.faults).sum();
        let _ = writeln!(
            err,
            "vmatrace: {} process{} traced for {:.1} s: {} syscalls, {} faults, {} events lost",
            total,
            if total == 1 { "" } else { "es" },
            self.started.elapsed().as_secs_f64(),
            thousands(syscalls),
            thousands(faults),
            thousands(s.lost.total_lost())
        );
        let mut procs: Vec<_> = s.processes.iter().collect();
        procs.sort_by(|a, b| {
            b.touched_bytes
                .cmp(&a.touched_bytes)
                .then(a.pid.cmp(&b.pid))
        });
        for p in procs.iter().take(5) {
            let _ = writeln!(
                err,
                "  [{}] {}{}: {} VMAs, reserved {}, touched {} ({} anonymous)",
                p.pid,
                shown(p.exe.as_deref().unwrap_or("?")),
                if p.exited { ", exited" } else { "" },
                p.vma_count,
                size(p.reserved_bytes),
                size(p.touched_bytes),
                size(p.anon_bytes)
            );
        }
        if total > 5 {
            let _ = writeln!(err, "  ... and {} more processes", total - 5);
        }
        let l = &s.lost;
        if l.total_lost() > 0 {
            let ring = l.ring_full();
            let mut why = Vec::new();
            if ring > 0 {
                why.push(format!(
                    "{} with the ring buffer full (a larger --ring-size helps)",
                    thousands(ring)
                ));
            }
            if l.missed > 0 {
                why.push(format!(
                    "{} skipped by the kernel, which does not start a program on a CPU where one is running (preempted, or another tool's); the maps were read again",
                    thousands(l.missed)
                ));
            }
            let other = l.total_lost() - ring - l.missed;
            if other > 0 {
                why.push(format!(
                    "{} otherwise (see `lost` in the summary)",
                    thousands(other)
                ));
            }
            let _ = writeln!(
                err,
                "vmatrace: {} events were lost: {}",
                thousands(l.total_lost()),
                why.join("; ")
            );
        }
        if let (Some(w), Some(out)) = (&self.written, &self.output) {
            let _ = writeln!(
                err,
                "vmatrace: {} {} ({}) written to {out}",
                thousands(w.lines.load(Ordering::Relaxed)),
                if self.json { "records" } else { "lines" },
                file_size(w.bytes.load(Ordering::Relaxed))
            );
        }
    }
}

impl Sink for Feedback {
    fn start(&mut self, meta: &Meta) -> io::Result<()> {
        self.inner.start(meta)
    }

    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()> {
        self.events += 1;
        self.inner.event(event, applied, session)
    }

    fn stack(&mut self, def: &crate::stacks::StackDef) -> io::Result<()> {
        self.inner.stack(def)
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()> {
        self.inner.snapshot(ts_ns, reason, p)
    }

    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        self.lost += delta.total_lost();
        self.inner.lost(ts_ns, delta)
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        self.inner.drift(ts_ns, pid, lines)
    }

    fn tick(&mut self, session: &Session) -> io::Result<()> {
        self.inner.tick(session)?;
        self.alive = session
            .processes()
            .filter(|p| p.exited_ns.is_none())
            .count();
        self.draw();
        Ok(())
    }

    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()> {
        clear_status_line();
        self.status = false;
        self.summary = Some(summary.clone());
        self.inner.summary(ts_ns, summary)
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        self.inner.findings(findings)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        if let Some(s) = self.summary.take()
            && self.end_summary
        {
            self.report(&s);
        }
        Ok(())
    }

    fn boundary(&mut self, session: &Session) -> io::Result<()> {
        self.inner.boundary(session)
    }
}

/// The sink of a live run: NDJSON, every event (`-v`) or the live view, to the output file or
/// stdout, with the feedback of [`Feedback`] around it.
pub fn live_sink(cfg: &RunConfig, start_ns: u64) -> Result<Box<dyn Sink>, OutputError> {
    let stdout_tty = io::stdout().is_terminal();
    if stdout_tty && cfg.output.is_none() && cfg.json && cfg.format == Format::Binary {
        return Err(OutputError::BinaryToTerminal);
    }
    let written = Arc::new(Written::default());
    // What is written: records of the format asked for, or human lines.
    let format = if cfg.json { cfg.format } else { Format::Ndjson };
    let binary = format == Format::Binary;
    // --max-size: NDJSON into files that it rotates (no other writer is opened).
    let rotating = match (cfg.rotation, &cfg.output) {
        (None, _) => None,
        (Some(_), None) => return Err(OutputError::RotateStdout),
        (Some(_), Some(_)) if !cfg.json => return Err(OutputError::RotateNeedsJson),
        (Some(rotation), Some(path)) => Some(super::rotate::sink(
            path, cfg.force, rotation, cfg.faults, cfg.format, &written,
        )?),
    };
    // Every writer tells the stop watchdog when a write is under way (see
    // [`crate::signals::watch_stop`]).
    let (writer, tty): (Box<dyn Write>, bool) = match &cfg.output {
        _ if rotating.is_some() => (Box::new(io::sink()), false),
        Some(path) => (
            Box::new(Watched(
                Counted::new(OutFile::create(path, cfg.force, format)?, written.clone())
                    .whole_writes(binary),
            )),
            false,
        ),
        None if stdout_tty => (
            Box::new(Watched(io::BufWriter::with_capacity(
                1 << 16,
                TerminalOut(io::stdout()),
            ))),
            true,
        ),
        None => (
            Box::new(Watched(
                Counted::new(
                    io::BufWriter::with_capacity(1 << 16, io::stdout()),
                    written.clone(),
                )
                .whole_writes(binary),
            )),
            false,
        ),
    };
    let inner: Box<dyn Sink> = if let Some(rotating) = rotating {
        rotating
    } else if cfg.json {
        Box::new(RecordSink::with_format(writer, cfg.faults, cfg.format))
    } else if cfg.view.verbose {
        Box::new(HumanSink::new(writer, cfg.faults, tty, start_ns))
    } else {
        Box::new(LiveView::new(writer, tty, start_ns, cfg.view))
    };
    let mut f = Feedback::new(inner);
    f.status = io::stderr().is_terminal();
    f.end_summary = !tty;
    f.recording = cfg.recording;
    f.json = cfg.json;
    f.duration = cfg.duration;
    if !tty {
        f.written = Some(written);
        f.output = Some(match &cfg.output {
            Some(path) => output_name(path, cfg),
            None => "stdout".into(),
        });
    }
    Ok(Box::new(f))
}

/// The output file as shown: its name, and how it is compressed and rotated.
fn output_name(path: &std::path::Path, cfg: &RunConfig) -> String {
    let mut name = shown(&crate::name::from_os(path.as_os_str())).to_string();
    if cfg.json && cfg.format == Format::Binary {
        name.push_str(" (binary)");
    }
    if super::compress::by_name(path) {
        name.push_str(" (zstd; sizes before compression)");
    }
    if let Some(r) = cfg.rotation {
        name.push_str(&format!(
            " and older files (a new one at {}, the {} newest kept)",
            size(r.max_size),
            r.max_files
        ));
    }
    name
}

/// The banner: what is traced, by which kernel programs, where the output goes.
pub fn banner(cfg: &RunConfig, meta: &Meta, session: &Session) {
    let what = if cfg.recording {
        "recording"
    } else {
        "tracing"
    };
    let follow = if cfg.follow {
        ", and the processes they start"
    } else {
        ""
    };
    let targets = if let Some(group) = &cfg.cgroup {
        format!(
            "{what} cgroup {} ({} processes now, and those that join it; what they start is followed)",
            shown(&crate::name::from_os(group.as_os_str())),
            session.processes().count()
        )
    } else if cfg.command.is_empty() {
        let procs: Vec<String> = session
            .processes()
            .map(|p| {
                format!(
                    "{}{} ({})",
                    p.pid,
                    in_container(p.pid),
                    shown(p.exe.as_deref().unwrap_or("?"))
                )
            })
            .collect();
        format!("{what} process {}{follow}", procs.join(", "))
    } else {
        let cmd: Vec<String> = cfg
            .command
            .iter()
            .map(|a| shown(&crate::name::from_os(a)).to_string())
            .collect();
        let pids: Vec<String> = session.processes().map(|p| p.pid.to_string()).collect();
        format!(
            "{what} `{}` (pid {}) from its first instruction{follow}",
            cmd.join(" "),
            pids.join(", ")
        )
    };
    let faults = match cfg.faults {
        FaultFilter::None => "page faults not traced".to_string(),
        FaultFilter::First => format!("page faults from {} (first touches)", meta.fault_backend),
        FaultFilter::All => format!("page faults from {} (all)", meta.fault_backend),
    };
    let records = match cfg.format {
        Format::Ndjson => "NDJSON",
        Format::Binary => "binary records",
    };
    let output = match (&cfg.output, cfg.json) {
        (Some(path), json) => format!(
            "{} to {}",
            if json { records } else { "human lines" },
            output_name(path, cfg)
        ),
        (None, true) => format!("{records} on stdout"),
        (None, false) if cfg.view.quiet => "the summary only (--quiet)".into(),
        (None, false) if cfg.view.verbose => "every event on stdout (-v)".into(),
        (None, false) => format!(
            "one line per active region per second, calls of {} or more on their own (-v: every event)",
            size(cfg.view.min_size)
        ),
    };
    let stop = match cfg.duration {
        Some(d) => format!("Ctrl-C to stop (stops by itself after {})", clock(d)),
        None => "Ctrl-C to stop".into(),
    };
    let namespace = if crate::procfs::own_pid_namespace().is_kernel() {
        ""
    } else {
        " (pids are this PID namespace's; processes of other namespaces are not seen)"
    };
    clear_status_line();
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "vmatrace: {targets}{namespace}");
    let _ = writeln!(
        err,
        "vmatrace: syscalls from {}, {faults}; output: {output}; {stop}",
        meta.syscall_backend
    );
}

/// ` = pid N in its PID namespace` for a process of a container seen from outside, else
/// nothing.
fn in_container(pid: u32) -> String {
    match crate::procfs::namespace_pids(pid).as_slice() {
        [_, .., inner] => format!(" = pid {inner} in its PID namespace"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
        assert_eq!(file_size(12_300_000), "12.3 MB");
        assert_eq!(clock(Duration::from_secs(75)), "1:15");
        assert_eq!(clock(Duration::from_secs(3675)), "1:01:15");
    }
}
