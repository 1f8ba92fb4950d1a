//! Reading a recording, one record at a time with bounded memory: NDJSON or binary, plain or
//! zstd-compressed, told by the first bytes whatever the name. Replay and `vmatrace convert`
//! read through here; what a record means is replay's business.

use std::{
    fmt,
    io::{self, BufRead, Read},
    path::Path,
};

use serde_json::Value;

use crate::output::{binary, compress};

/// The longest line (or binary record) a recording may hold. A real snapshot of 65,530 VMAs
/// (the default `vm.max_map_count`) with every page resident takes well under this; anything
/// longer (such as `/dev/zero`, which has no newline at all) is refused instead of read into
/// memory.
pub const MAX_LINE: usize = 64 << 20;

/// Where a record is in its recording: a line of NDJSON, the nth record of a binary one.
/// Shown after the file's name: `trace.ndjson:12`, `trace.vmat: record 12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Line(usize),
    Record(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(n) => write!(f, ":{n}"),
            Self::Record(n) => write!(f, ": record {n}"),
        }
    }
}

enum Input<'a> {
    Ndjson {
        reader: Box<dyn BufRead + 'a>,
        buf: Vec<u8>,
    },
    Binary(binary::Decoder<Box<dyn BufRead + 'a>>),
}

/// The records of a recording.
pub struct Records<'a> {
    input: Input<'a>,
    /// Lines (NDJSON) or records (binary) read so far.
    n: usize,
}

/// Opens `path` for reading, through zstd when its first bytes are a zstd frame's.
pub fn open(path: &Path) -> io::Result<Box<dyn BufRead>> {
    let mut file = io::BufReader::new(std::fs::File::open(path)?);
    if file.fill_buf()?.starts_with(&compress::MAGIC) {
        let decoder = zstd::stream::read::Decoder::with_buffer(file)?;
        return Ok(Box::new(io::BufReader::new(decoder)));
    }
    Ok(Box::new(file))
}

impl<'a> Records<'a> {
    /// The records read from `reader` (already decompressed): binary if it starts with the
    /// binary format's magic, NDJSON otherwise.
    pub fn new(reader: impl BufRead + 'a) -> io::Result<Self> {
        let mut reader: Box<dyn BufRead + 'a> = Box::new(reader);
        let input = if reader.fill_buf()?.starts_with(&binary::MAGIC[..1]) {
            Input::Binary(binary::Decoder::new(reader, MAX_LINE))
        } else {
            Input::Ndjson {
                reader,
                buf: Vec::new(),
            }
        };
        Ok(Self { input, n: 0 })
    }

    /// Whether the records are binary.
    pub fn is_binary(&self) -> bool {
        matches!(self.input, Input::Binary(_))
    }

    /// Where the last record read was (or what failed).
    pub fn position(&self) -> Position {
        match self.input {
            Input::Ndjson { .. } => Position::Line(self.n),
            Input::Binary(_) => Position::Record(self.n),
        }
    }

    /// The next record as a JSON value (blank lines are skipped), None at the end; an error
    /// says what is wrong at [`Self::position`].
    pub fn next_record(&mut self) -> Result<Option<Value>, String> {
        match &mut self.input {
            Input::Binary(dec) => {
                self.n += 1;
                dec.next_record()
            }
            Input::Ndjson { reader, buf } => loop {
                self.n += 1;
                if !next_line(reader, buf).map_err(|e| format!("cannot read: {e}"))? {
                    return Ok(None);
                }
                if buf.len() > MAX_LINE {
                    return Err(format!(
                        "line longer than {} MiB: not a recording",
                        MAX_LINE >> 20
                    ));
                }
                let Ok(line) = std::str::from_utf8(buf) else {
                    return Err("not UTF-8 text: not a recording".to_string());
                };
                if line.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(line)
                    .map(Some)
                    .map_err(|e| format!("not JSON: {e}"));
            },
        }
    }
}

/// Reads the next line of `reader` into `buf` (without its newline), reading at most
/// [`MAX_LINE`] + 1 bytes of it (a longer line is cut there: the caller refuses it). False at
/// the end of the input.
fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok(true)
}
