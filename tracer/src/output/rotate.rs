//! Bounded output (`--max-size`, `--max-files`): NDJSON written to `-o FILE` goes to a new
//! file once the current one has reached the size. `FILE` is always the newest; the older
//! ones are renamed `FILE.1`, `FILE.2`, ... before the extension (`trace.1.ndjson`,
//! `trace.1.ndjson.zst`; higher is older), and the oldest beyond `--max-files` is removed.
//!
//! Each file is a recording of its own: it starts with the run's `meta` record, the `stack`
//! records seen so far (events name them), and a `seed` snapshot of every traced process's
//! model at the cut, written by the one snapshot writer ([`RecordSink::snapshot`]), so that
//! `vmatrace replay FILE.3` starts from the model as it was there.
//!
//! A file is cut only where everything written is consistent with the session (after an
//! event, at a tick, and where the runner says so: [`Sink::boundary`]), so it holds at most
//! `--max-size` plus the record that crossed it (compressed, plus what the compressor still
//! held: see [`super::compress::Frames::bytes`]); the last file also keeps the end of the run
//! (once no traced process is alive: exit snapshots, summary). A file whose start alone is large (many
//! processes, many stacks) is cut only once its events weigh as much as its start, so that
//! the run never rotates at every record.
//!
//! Names are renamed and created in the one directory opened at start, as
//! [`super::file`] opens an output: no link is followed, new files are 0600 and the sudo
//! user's.

use std::{
    ffi::{OsStr, OsString},
    io::{self, Write},
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::Path,
    sync::Arc,
};

use super::{
    LossSummary, Meta, Sink, SnapshotReason, Summary,
    compress::{self, OutFile},
    counted::{Counted, Written},
    file::{OutputError, Place},
    records::{Format, RecordSink},
};
use crate::{
    analysis::Finding,
    event::Event,
    session::{Applied, Process, Session},
    signals::Watched,
    stacks::StackDef,
};

/// `--max-size` and `--max-files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// A file is cut once it holds this many bytes.
    pub max_size: u64,
    /// Files kept, the current one included.
    pub max_files: u32,
}

/// The name of the `n`th older file of the output `name` (`n` = 0: `name` itself): `.n`
/// before the last extension, not counting `.zst` (`trace.ndjson` -> `trace.1.ndjson`,
/// `trace.ndjson.zst` -> `trace.1.ndjson.zst`, `trace` -> `trace.1`, `.trace` -> `.trace.1`).
pub fn rotated_name(name: &OsStr, n: u32) -> OsString {
    if n == 0 {
        return name.to_os_string();
    }
    let bytes = name.as_bytes();
    let (body, zst) = match bytes.strip_suffix(b".zst") {
        Some(body) if !body.is_empty() => (body, &b".zst"[..]),
        _ => (bytes, &b""[..]),
    };
    // The last dot that is not the name's first character.
    let split = body
        .iter()
        .rposition(|&b| b == b'.')
        .filter(|&i| i > 0)
        .unwrap_or(body.len());
    let mut out = body[..split].to_vec();
    out.extend_from_slice(format!(".{n}").as_bytes());
    out.extend_from_slice(&body[split..]);
    out.extend_from_slice(zst);
    OsString::from_vec(out)
}

/// The files of a rotated output: the current one and the names of the older ones.
pub struct Segments {
    /// The output as given: always the newest file.
    base: Place,
    /// `FILE.1` ... `FILE.(max_files - 1)`.
    older: Vec<Place>,
    compressed: bool,
    format: Format,
    file: Option<OutFile>,
}

impl Segments {
    /// Opens `path` as [`super::file::create`] does, refusing anything but a regular file;
    /// older files of an earlier run under the names rotation uses need `force` (and are then
    /// removed), like the output itself.
    pub fn open(
        path: &std::path::Path,
        force: bool,
        max_files: u32,
        format: Format,
    ) -> Result<Self, OutputError> {
        let base = Place::new(path)?;
        if matches!(base.file_type()?, Some(libc::S_IFIFO | libc::S_IFCHR)) {
            return Err(OutputError::NotRotatable(base.shown().to_string()));
        }
        let name = path.file_name().unwrap_or_default();
        let older = (1..max_files.max(1))
            .map(|n| base.sibling(&rotated_name(name, n)))
            .collect::<Result<Vec<_>, _>>()?;
        for p in &older {
            match p.file_type()? {
                None => {}
                Some(_) if !force => return Err(OutputError::Exists(p.shown().to_string())),
                Some(_) => {
                    p.remove()?;
                }
            }
        }
        let compressed = compress::by_name(path);
        let file = OutFile::new(base.create(force)?, compressed, format).map_err(|source| {
            OutputError::Io {
                path: base.shown().to_string(),
                source,
            }
        })?;
        Ok(Self {
            base,
            older,
            compressed,
            format,
            file: Some(file),
        })
    }

    /// Bytes in the current file.
    pub fn bytes(&self) -> u64 {
        self.file.as_ref().map_or(0, OutFile::bytes)
    }

    /// Closes the current file, drops the oldest, renames each one to the next older name,
    /// and starts a new, empty current file.
    pub fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let rename = io::Error::other::<OutputError>;
        match self.older.last() {
            Some(oldest) => oldest.remove().map_err(rename)?,
            None => self.base.remove().map_err(rename)?,
        };
        for i in (1..self.older.len()).rev() {
            self.older[i - 1]
                .rename_to(&self.older[i])
                .map_err(rename)?;
        }
        if let Some(first) = self.older.first() {
            self.base.rename_to(first).map_err(rename)?;
        }
        let out = self.base.create_new().map_err(rename)?;
        self.file = Some(OutFile::new(out, self.compressed, self.format)?);
        Ok(())
    }
}

impl Write for Segments {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.file.as_mut() {
            Some(f) => f.write(data),
            None => Err(io::Error::other(
                "the output file could not be opened again",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// The NDJSON sink of a rotated output.
pub struct RotatingSink {
    ndjson: RecordSink<Watched<Counted<Segments>>>,
    max_size: u64,
    /// The run's `meta`, written again at the start of every file.
    meta: Option<Meta>,
    /// Bytes of the current file's start (meta, stacks, seeds).
    start_bytes: u64,
    /// The time of the latest record written: the time of the seeds at a cut.
    last_ts: u64,
    warned: bool,
}

/// The sink of a run with `--max-size`: NDJSON (`faults` as asked) into `path` and the files
/// it rotates into, counted into `written`. `path` may not be a FIFO or character device.
pub fn sink(
    path: &Path,
    force: bool,
    rotation: Rotation,
    faults: super::FaultFilter,
    format: Format,
    written: &Arc<Written>,
) -> Result<Box<dyn Sink>, OutputError> {
    let segments = Segments::open(path, force, rotation.max_files, format)?;
    Ok(Box::new(RotatingSink::new(
        Watched(Counted::new(segments, written.clone()).whole_writes(format == Format::Binary)),
        faults,
        format,
        rotation.max_size,
    )))
}

impl RotatingSink {
    fn new(
        out: Watched<Counted<Segments>>,
        faults: super::FaultFilter,
        format: Format,
        max_size: u64,
    ) -> Self {
        Self {
            ndjson: RecordSink::with_format(out, faults, format),
            max_size,
            meta: None,
            start_bytes: 0,
            last_ts: 0,
            warned: false,
        }
    }

    fn segments(&mut self) -> &mut Segments {
        self.ndjson.get_mut().0.get_mut()
    }

    /// Written to the current file so far (once flushed).
    fn bytes(&mut self) -> u64 {
        self.segments().bytes()
    }

    /// Starts a new file: `meta`, the stacks, a seed of every live process that has a model
    /// of its own (a child sharing its parent's memory has none).
    fn rotate(&mut self, session: &Session) -> io::Result<()> {
        self.ndjson.flush()?;
        self.segments().rotate()?;
        self.ndjson.new_file();
        if let Some(meta) = self.meta.clone() {
            self.ndjson.start(&meta)?;
        }
        for def in session.stacks.iter() {
            self.ndjson.stack(def)?;
        }
        for p in session
            .processes()
            .filter(|p| p.exited_ns.is_none() && session.memory_owner(p.pid) == p.pid)
        {
            self.ndjson
                .snapshot(self.last_ts, SnapshotReason::Seed, p)?;
        }
        self.ndjson.flush()?;
        self.start_bytes = self.bytes();
        if !self.warned && self.start_bytes > self.max_size / 2 {
            self.warned = true;
            log::warn!(
                "the start of each output file (meta, stacks and a snapshot of each process) takes {} bytes, more than half of --max-size: files will be larger than {} bytes",
                self.start_bytes,
                self.max_size
            );
        }
        Ok(())
    }
}

impl Sink for RotatingSink {
    fn start(&mut self, meta: &Meta) -> io::Result<()> {
        self.meta = Some(meta.clone());
        self.ndjson.start(meta)?;
        self.start_bytes = self.bytes();
        Ok(())
    }

    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()> {
        self.last_ts = self.last_ts.max(event.ts_ns());
        self.ndjson.event(event, applied, session)?;
        self.boundary(session)
    }

    fn stack(&mut self, def: &StackDef) -> io::Result<()> {
        self.ndjson.stack(def)
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()> {
        self.last_ts = self.last_ts.max(ts_ns);
        self.ndjson.snapshot(ts_ns, reason, p)
    }

    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        self.ndjson.lost(ts_ns, delta)
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        self.ndjson.drift(ts_ns, pid, lines)
    }

    fn tick(&mut self, session: &Session) -> io::Result<()> {
        self.ndjson.tick(session)?;
        self.boundary(session)
    }

    fn summary(&mut self, ts_ns: u64, summary: &Summary) -> io::Result<()> {
        self.ndjson.summary(ts_ns, summary)
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        self.ndjson.findings(findings)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ndjson.flush()
    }

    fn boundary(&mut self, session: &Session) -> io::Result<()> {
        // Once no traced process is alive the run is ending: its last records (exit
        // snapshots, summary) stay with its last events rather than make a file of their own.
        if !session.any_alive() {
            return Ok(());
        }
        let bytes = self.bytes();
        if bytes >= self.max_size && bytes - self.start_bytes >= self.start_bytes {
            self.rotate(session)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, path::Path};

    use super::*;

    #[test]
    fn older_files_are_named_before_the_extension() {
        let name = |s: &str, n| {
            rotated_name(OsStr::new(s), n)
                .into_string()
                .unwrap_or_default()
        };
        assert_eq!(name("trace.ndjson", 0), "trace.ndjson");
        assert_eq!(name("trace.ndjson", 1), "trace.1.ndjson");
        assert_eq!(name("trace.ndjson", 12), "trace.12.ndjson");
        assert_eq!(name("trace.ndjson.zst", 2), "trace.2.ndjson.zst");
        assert_eq!(name("my.trace.ndjson", 1), "my.trace.1.ndjson");
        assert_eq!(name("trace", 3), "trace.3");
        assert_eq!(name("trace.zst", 1), "trace.1.zst");
        assert_eq!(name(".trace", 1), ".trace.1");
        assert_eq!(name(".zst", 1), ".zst.1");
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmatrace-rotate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn lines_of(path: &Path) -> String {
        let bytes = std::fs::read(path).unwrap_or_default();
        if bytes.starts_with(&compress::MAGIC) {
            let mut text = String::new();
            zstd::stream::read::Decoder::new(bytes.as_slice())
                .expect("decoder")
                .read_to_string(&mut text)
                .expect("complete frames");
            text
        } else {
            String::from_utf8(bytes).expect("text")
        }
    }

    /// Rotating five times with three files kept: the newest is the output's own name, the
    /// next ones `.1` and `.2` in order, the older ones gone.
    #[test]
    fn rotation_keeps_the_newest_files_in_order_and_drops_the_oldest() {
        for output in ["t.ndjson", "t.ndjson.zst"] {
            let d = dir(output);
            let path = d.join(output);
            let mut s = Segments::open(&path, false, 3, Format::Ndjson).expect("opens");
            for i in 0..6 {
                if i > 0 {
                    s.rotate().expect("rotates");
                }
                writeln!(s, "{{\"file\":{i}}}").expect("writes");
            }
            s.flush().expect("flushes");
            let mut names: Vec<String> = std::fs::read_dir(&d)
                .expect("dir")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            names.sort();
            let want = |n| {
                rotated_name(OsStr::new(output), n)
                    .into_string()
                    .unwrap_or_default()
            };
            let mut expected = vec![want(0), want(1), want(2)];
            expected.sort();
            assert_eq!(names, expected, "{output}");
            for (n, i) in [(0, 5), (1, 4), (2, 3)] {
                assert_eq!(lines_of(&d.join(want(n))), format!("{{\"file\":{i}}}\n"));
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(d.join(want(n)))
                    .expect("exists")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            // One file kept: each rotation starts the one file afresh.
            let one = d.join("one.ndjson");
            let mut s = Segments::open(&one, false, 1, Format::Ndjson).expect("opens");
            writeln!(s, "a").expect("writes");
            s.rotate().expect("rotates");
            writeln!(s, "b").expect("writes");
            s.flush().expect("flushes");
            assert_eq!(lines_of(&one), "b\n");
            assert!(!d.join("one.1.ndjson").exists());
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// Older files of an earlier run under the names rotation would use are not overwritten
    /// without --force (and are removed with it); a FIFO cannot be rotated; a planted link
    /// where an older file goes is renamed over, never followed.
    #[test]
    fn earlier_files_need_force_fifos_are_refused_links_are_not_followed() {
        let d = dir("earlier");
        let path = d.join("t.ndjson");
        std::fs::write(d.join("t.2.ndjson"), "old\n").expect("writes");
        assert!(matches!(
            Segments::open(&path, false, 3, Format::Ndjson),
            Err(OutputError::Exists(p)) if p.ends_with("t.2.ndjson")
        ));
        let mut s = Segments::open(&path, true, 3, Format::Ndjson).expect("opens with --force");
        assert!(!d.join("t.2.ndjson").exists());
        // A link planted where the oldest file goes, to a file that must stay untouched.
        let victim = d.join("victim");
        std::fs::write(&victim, "precious\n").expect("writes");
        std::os::unix::fs::symlink(&victim, d.join("t.1.ndjson")).expect("symlink");
        writeln!(s, "x").expect("writes");
        s.rotate().expect("rotates");
        s.rotate().expect("rotates");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("reads"),
            "precious\n"
        );
        assert_eq!(lines_of(&d.join("t.2.ndjson")), "x\n");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            Segments::open(&fifo, true, 3, Format::Ndjson),
            Err(OutputError::NotRotatable(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
