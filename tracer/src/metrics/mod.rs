//! Fleet metrics (`--metrics ADDR:PORT`): Prometheus metrics over HTTP, per traced process and
//! of vmatrace itself.
//!
//! | file | what |
//! |---|---|
//! | `gather.rs` | the session's numbers at one moment, as plain data: the same functions the snapshots and the summary use (`output::report`, `analysis`, `heap::findings`), and the rule for exited processes |
//! | `render.rs` | that data as the text exposition (`prometheus-client`): names, labels, types |
//! | `server.rs` | the HTTP listener on a thread of its own, and how a scrape asks the event loop for fresh numbers |
//!
//! The event loop never renders and never waits for a scraper: a scrape raises a flag and
//! waits (at most [`server::FRESH_WAIT`]) for the loop, which at its next tick (every 50 ms)
//! sees the flag, gathers the numbers and hands them over (an `Arc` swapped under a lock).
//! With no scraper the loop's cost is one atomic load per tick; nothing is done per event.
//! It gathers at most once every [`GATHER_AT_MOST_EVERY`], and spends at most a twentieth of
//! its time gathering: scrapes closer than that get the same numbers.
//!
//! Exited processes: their series are in the first gather after the exit (with their final
//! values), then dropped.

pub mod gather;
pub mod render;
pub mod server;

pub use gather::{DaemonMetrics, Gatherer, ProcessMetrics, Snapshot};
pub use server::{MetricsError, Publisher};

use std::net::SocketAddr;

use crate::{analysis::Limits, session::Session};

/// What the event loop holds: numbers are gathered at its tick when a scrape waits for them.
#[derive(Debug)]
pub struct Exporter {
    publisher: Publisher,
    gatherer: Gatherer,
    ring_bytes: u32,
    /// Until when scrapes get the last gather's numbers again.
    next_gather: Option<std::time::Instant>,
}

/// Scrapes within this time of a gather get its numbers again: however many scrapers, the
/// loop gathers at most once a second (a gather walks every touched page of every process:
/// about 10-40 ms for 1 GiB touched on this project's VM).
pub const GATHER_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// And at most this share of the loop's time: a gather that took 100 ms is not done again
/// for 2 s (huge processes; the loop reads no event while it gathers).
const GATHER_SHARE: u32 = 20;

impl Exporter {
    /// Listens on `addr` (findings judged with this machine's `limits`; the ring buffer has
    /// `ring_bytes`).
    pub fn start(addr: SocketAddr, limits: Limits, ring_bytes: u32) -> Result<Self, MetricsError> {
        Ok(Self {
            publisher: server::start(addr)?,
            gatherer: Gatherer::new(limits),
            ring_bytes,
            next_gather: None,
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.publisher.local_addr
    }

    /// At the event loop's tick: when a scrape waits, gathers the session's numbers (and
    /// vmatrace's own, from `daemon`) and hands them over. Else one atomic load.
    pub fn tick(&mut self, session: &Session, daemon: impl FnOnce() -> DaemonMetrics) {
        if let Some(mark) = self.publisher.due() {
            let started = std::time::Instant::now();
            if self.next_gather.is_some_and(|t| started < t) {
                self.publisher.republish(mark);
                return;
            }
            let mut daemon = daemon();
            daemon.ring_bytes = self.ring_bytes.into();
            let snapshot = self.gatherer.gather(session, daemon);
            self.publisher.publish(mark, snapshot);
            let took = started.elapsed();
            self.next_gather = Some(started + GATHER_AT_MOST_EVERY.max(took * GATHER_SHARE));
            log::debug!("metrics gathered in {took:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use tracer_common::Syscall;

    use super::*;
    use crate::{
        event::{Event, FaultRecord, Resolved, SyscallRecord},
        output::{LossSummary, report::summarize},
        session::{Seed, Session},
    };

    const PAGE: u64 = 4096;
    const ADDR: u64 = 0x7f00_0000_0000;

    fn labels(pid: u32) -> (Option<String>, Option<String>) {
        match pid {
            7 => (
                Some("web \"1\"\nx".into()),
                Some("/system.slice/web.service".into()),
            ),
            _ => (Some("batch".into()), None),
        }
    }

    /// A process that maps 64 pages and writes 16 of them.
    fn traced(s: &mut Session, pid: u32) {
        s.add(pid, Seed::default(), 0, Some("/usr/bin/w".into()));
        s.apply(&Event::Syscall(SyscallRecord {
            ts_ns: 1,
            enter_ts_ns: 1,
            pid,
            tid: pid,
            call: Syscall::Mmap,
            args: [0, 64 * PAGE, 3, 0x22, u64::MAX, 0],
            ret: ADDR as i64,
            extra: [0; 2],
            commit_ts_ns: None,
            resolved: Resolved::default(),
        }));
        for i in 0..16 {
            s.apply(&Event::Fault(FaultRecord {
                ts_ns: 2 + i,
                pid,
                tid: pid,
                address: ADDR + i * PAGE,
                ip: 0,
                error_code: Some(0x6),
                write_from_page: None,
                stack_id: None,
            }));
        }
    }

    fn gatherer() -> Gatherer {
        Gatherer::with_labels(Limits::default(), labels)
    }

    fn daemon() -> DaemonMetrics {
        DaemonMetrics {
            lost: LossSummary {
                lost_fault: 3,
                ..LossSummary::default()
            },
            events: 17,
            rss_bytes: Some(40 << 20),
            ring_bytes: 8 << 20,
            ring_used_bytes: Some(4096),
        }
    }

    /// The value of the sample `name{labels}` in an exposition (labels as written).
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let key = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn the_exposition_names_types_and_labels_every_metric() {
        let mut s = Session::default();
        traced(&mut s, 7);
        let snap = gatherer().gather(&s, daemon());
        let summary = summarize(&s, LossSummary::default());
        let touched = summary.processes[0].touched_bytes;
        assert_eq!(touched, 16 * PAGE);
        for openmetrics in [true, false] {
            let text = render::render(&snap, openmetrics).expect("renders");
            // A control character in the comm is shown as vmatrace shows names (`\x0a`), and
            // the format's specials are escaped (quote, backslash).
            let l = r#"pid="7",comm="web \"1\"\\x0ax",cgroup="/system.slice/web.service""#;
            assert_eq!(
                sample(&text, "vmatrace_touched_bytes", l),
                Some(touched as f64),
                "{text}"
            );
            assert_eq!(
                sample(&text, "vmatrace_reserved_bytes", l),
                Some((64 * PAGE) as f64)
            );
            assert_eq!(
                sample(&text, "vmatrace_anon_bytes", l),
                Some((16 * PAGE) as f64)
            );
            assert_eq!(sample(&text, "vmatrace_vmas", l), Some(1.0));
            assert_eq!(sample(&text, "vmatrace_faults_total", l), Some(16.0));
            assert_eq!(
                sample(
                    &text,
                    "vmatrace_syscalls_total",
                    &format!(r#"{l},syscall="mmap""#)
                ),
                Some(1.0)
            );
            assert_eq!(
                sample(&text, "vmatrace_lost_events_total", r#"kind="fault""#),
                Some(3.0)
            );
            assert!(
                text.contains("\nvmatrace_daemon_rss_bytes 41943040\n"),
                "{text}"
            );
            assert!(text.contains("\nvmatrace_events_total 17\n"), "{text}");
            assert!(
                text.contains("\nvmatrace_ring_buffer_used_bytes 4096\n"),
                "{text}"
            );
            assert!(
                text.lines().any(|l| l.starts_with("vmatrace_findings{")
                    && l.contains(r#"id="heap",severity="info""#)),
                "{text}"
            );
            // Without --heap, no allocator series.
            assert!(!text.contains("vmatrace_heap_live_bytes{"), "{text}");
            for (name, kind) in [
                ("vmatrace_touched_bytes", "gauge"),
                ("vmatrace_reserved_bytes", "gauge"),
                ("vmatrace_heap_high_water_bytes", "gauge"),
                ("vmatrace_arenas", "gauge"),
                ("vmatrace_findings", "gauge"),
                ("vmatrace_daemon_rss_bytes", "gauge"),
                ("vmatrace_ring_buffer_bytes", "gauge"),
            ] {
                assert!(
                    text.contains(&format!("# TYPE {name} {kind}\n")),
                    "{name}: {text}"
                );
            }
            // Counters: OpenMetrics names the family without `_total`, the 0.0.4 text with it.
            for name in ["faults", "syscalls", "lost_events", "events", "resyncs"] {
                let family = if openmetrics {
                    format!("vmatrace_{name}")
                } else {
                    format!("vmatrace_{name}_total")
                };
                assert!(
                    text.contains(&format!("# TYPE {family} counter\n")),
                    "{name}: {text}"
                );
            }
            assert_eq!(text.ends_with("# EOF\n"), openmetrics, "{text}");
        }
    }

    #[test]
    fn an_exited_process_is_shown_once_with_its_final_numbers_then_dropped() {
        let mut s = Session::default();
        traced(&mut s, 7);
        traced(&mut s, 8);
        let mut g = gatherer();
        let pids = |snap: &Snapshot| snap.processes.iter().map(|p| p.pid).collect::<Vec<_>>();
        assert_eq!(pids(&g.gather(&s, daemon())), [7, 8]);
        s.apply(&Event::Exit {
            ts_ns: 100,
            pid: 8,
            tid: 8,
        });
        // The first scrape after the exit: still there, marked exited, final numbers kept
        // (and with the labels read while it was alive).
        let first = g.gather(&s, daemon());
        assert_eq!(pids(&first), [7, 8]);
        let gone = &first.processes[1];
        assert!(gone.exited && gone.totals.touched_bytes == 16 * PAGE);
        assert_eq!(gone.comm, "batch");
        let text = render::render(&first, true).expect("renders");
        assert!(text.contains("\nvmatrace_traced_processes 1\n"), "{text}");
        // The next: its series are gone; the live process's remain.
        let next = g.gather(&s, daemon());
        assert_eq!(pids(&next), [7]);
        let text = render::render(&next, true).expect("renders");
        assert!(!text.contains(r#"pid="8""#), "{text}");
        assert!(text.contains(r#"pid="7""#), "{text}");
        // A new process that reuses the pid is a new series set, shown again.
        traced(&mut s, 8);
        assert_eq!(pids(&g.gather(&s, daemon())), [7, 8]);
    }

    /// `GET path` with `accept`, returns the status line and the body.
    fn get(addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
        let mut c = TcpStream::connect(addr).expect("connects");
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
        )
        .expect("sends");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("reads");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
        (head.to_string(), body.to_string())
    }

    #[test]
    fn a_scrape_gets_numbers_gathered_after_it_asked() {
        let mut s = Session::default();
        traced(&mut s, 7);
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut exporter = Exporter {
            publisher: server::start(addr).expect("listens"),
            gatherer: gatherer(),
            ring_bytes: 1 << 20,
            next_gather: None,
        };
        let addr = exporter.local_addr();
        // Nothing asked yet: the tick does nothing.
        assert_eq!(exporter.publisher.due(), None);
        let scrape = std::thread::spawn(move || {
            get(
                addr,
                "/metrics",
                "application/openmetrics-text; version=1.0.0",
            )
        });
        // The loop's ticks, until the scrape has asked and been answered.
        while !scrape.is_finished() {
            exporter.tick(&s, daemon);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (head, body) = scrape.join().expect("the scrape");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("application/openmetrics-text"), "{head}");
        assert!(body.contains("vmatrace_touched_bytes{pid=\"7\""), "{body}");
        assert!(
            body.contains("vmatrace_ring_buffer_bytes 1048576"),
            "{body}"
        );
        // A second scrape within a second: answered with the same numbers, not gathered again.
        let next = exporter.next_gather;
        assert!(next.is_some());
        let scrape = std::thread::spawn(move || get(addr, "/metrics", "text/plain"));
        while !scrape.is_finished() {
            exporter.tick(&s, daemon);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (head, _) = scrape.join().expect("the scrape");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            exporter.next_gather == next || next.is_some_and(|t| std::time::Instant::now() >= t)
        );
        // No loop answering: after the wait, the last numbers.
        let (head, body) = get(addr, "/metrics", "text/plain");
        assert!(
            head.starts_with("HTTP/1.1 200") && head.contains("version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("vmatrace_touched_bytes{pid=\"7\""), "{body}");
        let (head, _) = get(addr, "/other", "*/*");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    }
}
