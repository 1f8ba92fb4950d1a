//! zstd-compressed recordings (`-o FILE.zst`). The NDJSON goes through a zstd encoder, and
//! every flush (each tick of the live loop, each snapshot on SIGUSR1 or `--snapshot-every`,
//! the end of the run, a rotation) ends the frame: a file is a sequence of complete frames,
//! which `zstd -d`, `zstd -t` and `vmatrace replay` read as one stream, and after each flush
//! it is complete on disk. Flushes come between records, so every frame holds whole lines.
//! When a write fails (a full disk), the file is cut back to the end of its last complete
//! frame, as [`super::file::LineFile`] cuts a plain one back to its last whole line.

use std::{io, path::Path};

use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

use super::{
    file::{self, LineFile, Output, OutputError},
    records::Format,
};

/// The first bytes of a zstd frame (`0xFD2FB528`, little-endian): how a reader tells a
/// compressed recording from a plain one, whatever its name.
pub const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// zstd's own default level (3): 36x smaller on a busy map/touch/unmap loop's NDJSON
/// (docs/reliability.md).
const LEVEL: i32 = zstd::DEFAULT_COMPRESSION_LEVEL;

/// Whether an output named `path` is compressed: its name ends in `.zst`, as for `zstd`
/// itself, `tar` and most tools that choose by name.
pub fn by_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zst")
}

/// A writer that compresses into `file` as described in the module documentation.
pub struct Frames {
    file: Output,
    encoder: Encoder<'static>,
    /// Compressed bytes waiting to be written (kept for its capacity).
    out: Vec<u8>,
    /// Data was given since the last frame ended.
    open: bool,
    /// Bytes on disk, all of them complete frames.
    committed: u64,
    /// Bytes on disk, the frame being written included.
    written: u64,
}

impl Frames {
    /// Compresses into `file`, opened for writing at its start.
    pub fn new(file: Output) -> io::Result<Self> {
        Ok(Self {
            file,
            encoder: Encoder::new(LEVEL)?,
            out: Vec::with_capacity(zstd::zstd_safe::CCtx::out_size()),
            open: false,
            committed: 0,
            written: 0,
        })
    }

    /// Compressed bytes on disk (what the encoder still holds is not counted: at most one
    /// block of 128 KiB before compression).
    pub fn bytes(&self) -> u64 {
        self.written
    }

    /// Writes `self.out` to the file; on failure cuts the file back to its complete frames.
    fn put(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        if let Err(e) = io::Write::write_all(&mut self.file, &self.out) {
            self.file.cut_back(self.committed);
            self.written = self.committed;
            return Err(e);
        }
        self.written += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Ends the frame in progress, if any.
    fn end_frame(&mut self) -> io::Result<()> {
        if !self.open {
            return Ok(());
        }
        loop {
            self.out.clear();
            let left = self
                .encoder
                .finish(&mut OutBuffer::around(&mut self.out), false)?;
            self.put()?;
            if left == 0 {
                break;
            }
        }
        self.open = false;
        self.committed = self.written;
        // The next write starts a new frame with the same context.
        self.encoder.reinit()
    }
}

impl io::Write for Frames {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            self.out.clear();
            self.encoder
                .run(&mut input, &mut OutBuffer::around(&mut self.out))?;
            self.open = true;
            self.put()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.end_frame()?;
        self.file.flush()
    }
}

impl Drop for Frames {
    /// A run that ends through an error still leaves complete frames behind.
    fn drop(&mut self) {
        if let Err(e) = io::Write::flush(self) {
            log::warn!("finishing the compressed output: {e}");
        }
    }
}

/// The writer of an output file: whole records as they are, or whole zstd frames.
pub enum OutFile {
    Plain(LineFile),
    Zstd(Box<Frames>),
}

impl OutFile {
    /// Writes records of `format` into `file` (opened at its start), compressed or not.
    pub fn new(file: Output, compressed: bool, format: Format) -> io::Result<Self> {
        Ok(if compressed {
            Self::Zstd(Box::new(Frames::new(file)?))
        } else {
            Self::Plain(LineFile::with_records(file, format == Format::Binary))
        })
    }

    /// Creates `path` as [`file::create`] does for records of `format`, compressed when its
    /// name says so.
    pub fn create(path: &Path, force: bool, format: Format) -> Result<Self, OutputError> {
        let out = file::create(path, force)?;
        Self::new(out, by_name(path), format).map_err(|source| OutputError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Bytes the file holds (a plain one once flushed; see [`Frames::bytes`]).
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Plain(f) => f.bytes(),
            Self::Zstd(f) => f.bytes(),
        }
    }
}

impl io::Write for OutFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(f) => f.write(data),
            Self::Zstd(f) => f.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(f) => f.flush(),
            Self::Zstd(f) => f.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmatrace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// Every flush leaves a complete stream on disk that zstd decodes to exactly what was
    /// written, frames after frames.
    #[test]
    fn each_flush_leaves_complete_frames_that_decode_to_the_lines() {
        let path = temp("frames.ndjson.zst");
        let mut w = Frames::new(file::create(&path, false).expect("creates")).expect("encoder");
        let mut expected = Vec::new();
        for round in 0..3 {
            for i in 0..1000 {
                let line = format!("{{\"type\":\"fault\",\"round\":{round},\"i\":{i}}}\n");
                w.write_all(line.as_bytes()).expect("writes");
                expected.extend_from_slice(line.as_bytes());
            }
            w.flush().expect("flushes");
            let bytes = std::fs::read(&path).expect("reads");
            assert_eq!(bytes.len() as u64, w.bytes());
            assert!(bytes.starts_with(&MAGIC));
            let mut decoded = Vec::new();
            zstd::stream::read::Decoder::new(bytes.as_slice())
                .expect("decoder")
                .read_to_end(&mut decoded)
                .expect("a complete stream");
            assert_eq!(decoded, expected, "after flush {round}");
        }
        // A flush with nothing new adds no empty frame.
        let before = w.bytes();
        w.flush().expect("flushes");
        assert_eq!(w.bytes(), before);
        drop(w);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn compression_is_chosen_by_the_name() {
        assert!(by_name(Path::new("trace.ndjson.zst")));
        assert!(by_name(Path::new("/tmp/t.zst")));
        assert!(!by_name(Path::new("trace.ndjson")));
        assert!(!by_name(Path::new("zst")));
    }
}
