//! The HTTP side of `--metrics`: a listener on a thread of its own that answers `GET /metrics`,
//! and the hand-over of numbers from the event loop.
//!
//! A scrape counts itself in `requests` and waits (at most [`FRESH_WAIT`]) for a snapshot that
//! covers it; the event loop, at its tick, sees requests it has not served, gathers once for
//! all of them and publishes (a lock held only to swap an `Arc`). A loop too busy to answer in
//! time leaves the scrape with the previous snapshot. Rendering happens on this thread.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{gather::Snapshot, render};

/// How long a scrape waits for the event loop's fresh numbers (the loop ticks every 50 ms;
/// Prometheus's shortest scrape timeout is its interval, 1 s at the least).
pub const FRESH_WAIT: Duration = Duration::from_millis(500);

/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request head read.
const MAX_REQUEST: usize = 16 << 10;

/// Errors of `--metrics`, each one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics {addr}: cannot listen there")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--metrics: cannot start its thread")]
    Thread(#[source] io::Error),
}

/// What the published snapshot covers.
#[derive(Debug, Default)]
struct Published {
    /// Requests counted before the snapshot was gathered (it answers them).
    covers: u64,
    snapshot: Arc<Snapshot>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Scrapes asked so far.
    requests: AtomicU64,
    state: Mutex<Published>,
    fresh: Condvar,
}

fn lock(m: &Mutex<Published>) -> MutexGuard<'_, Published> {
    // Nothing panics while holding it; a poisoned lock still holds a whole snapshot.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// A snapshot gathered after this call, or the latest one after `wait`.
    fn fresh(&self, wait: Duration) -> Arc<Snapshot> {
        let deadline = Instant::now() + wait;
        let mine = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let mut g = lock(&self.state);
        while g.covers < mine {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = match self.fresh.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        g.snapshot.clone()
    }
}

/// The event loop's end: tells whether scrapes wait, and publishes.
#[derive(Debug)]
pub struct Publisher {
    shared: Arc<Shared>,
    served: u64,
    /// The address listened on (the port chosen by the kernel when 0 was given).
    pub local_addr: SocketAddr,
}

impl Publisher {
    /// Scrapes wait for numbers gathered from now: returns the mark to [`Publisher::publish`]
    /// them with. One atomic load when none waits.
    pub fn due(&self) -> Option<u64> {
        let asked = self.shared.requests.load(Ordering::Acquire);
        (asked > self.served).then_some(asked)
    }

    /// Publishes `snapshot`, gathered after [`Publisher::due`] returned `mark`.
    pub fn publish(&mut self, mark: u64, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        let old = {
            let mut g = lock(&self.shared.state);
            g.covers = g.covers.max(mark);
            std::mem::replace(&mut g.snapshot, snapshot)
        };
        self.served = mark;
        self.shared.fresh.notify_all();
        // The old snapshot is freed here, outside the lock (or by the last scrape using it).
        drop(old);
    }

    /// Answers the scrapes up to `mark` with the snapshot already published.
    pub fn republish(&mut self, mark: u64) {
        {
            let mut g = lock(&self.shared.state);
            g.covers = g.covers.max(mark);
        }
        self.served = mark;
        self.shared.fresh.notify_all();
    }
}

/// Listens on `addr` and serves the metrics from a thread of its own.
pub fn start(addr: SocketAddr) -> Result<Publisher, MetricsError> {
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let shared = Arc::new(Shared::default());
    let theirs = shared.clone();
    std::thread::Builder::new()
        .name("vmatrace-metrics".into())
        .spawn(move || serve(&listener, &theirs))
        .map_err(MetricsError::Thread)?;
    Ok(Publisher {
        shared,
        served: 0,
        local_addr,
    })
}

fn serve(listener: &TcpListener, shared: &Shared) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, shared) {
                    log::debug!("--metrics: a request failed: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors, say: try again a little later, not in a spin.
                log::debug!("--metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request and answers it; the connection is closed after.
fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request too large\n", false);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&head[..end]);
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let snapshot = shared.fresh(FRESH_WAIT);
            match render::render(&snapshot, openmetrics) {
                Ok(body) => {
                    let kind = if openmetrics {
                        render::OPENMETRICS
                    } else {
                        render::PROMETHEUS_TEXT
                    };
                    respond(&mut stream, 200, kind, &body, head_only)
                }
                Err(_) => respond(&mut stream, 500, "text/plain", "encoding failed\n", false),
            }
        }
        ("GET" | "HEAD", "/") => respond(
            &mut stream,
            200,
            "text/plain; charset=utf-8",
            "vmatrace: metrics at /metrics\n",
            head_only,
        ),
        (_, "/metrics" | "/") => respond(&mut stream, 405, "text/plain", "GET only\n", false),
        _ => respond(&mut stream, 404, "text/plain", "not found\n", false),
    }
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    kind: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    // (std writes to sockets with MSG_NOSIGNAL: a client gone is an error here, not SIGPIPE.)
    stream.write_all(&out)?;
    stream.flush()
}
