//! Counting what an output takes: records (lines) and bytes, for the status line and the
//! end summary.

use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// Records (lines) and bytes an output has taken.
#[derive(Debug, Default)]
pub struct Written {
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
}

/// A writer that counts what passes through it.
pub struct Counted<W: Write> {
    inner: W,
    written: Arc<Written>,
    /// Each write is one record (binary), rather than records ending at newlines.
    whole_writes: bool,
}

impl<W: Write> Counted<W> {
    /// Counts into `written` what is written to `inner`, records ending at newlines.
    pub fn new(inner: W, written: Arc<Written>) -> Self {
        Self {
            inner,
            written,
            whole_writes: false,
        }
    }

    /// Counts each write as one record (the binary format's writes, which may hold newline
    /// bytes anywhere).
    pub fn whole_writes(mut self, yes: bool) -> Self {
        self.whole_writes = yes;
        self
    }

    /// The writer counted.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let lines = if self.whole_writes {
            u64::from(n > 0)
        } else {
            buf[..n].iter().filter(|&&b| b == b'\n').count() as u64
        };
        self.written.lines.fetch_add(lines, Ordering::Relaxed);
        self.written.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    /// A whole record: counted once however the writer below takes it.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        let lines = if self.whole_writes {
            u64::from(!buf.is_empty())
        } else {
            buf.iter().filter(|&&b| b == b'\n').count() as u64
        };
        self.written.lines.fetch_add(lines, Ordering::Relaxed);
        self.written
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_writes_count_lines_and_bytes() {
        let w = Arc::new(Written::default());
        let mut c = Counted::new(Vec::new(), w.clone());
        c.write_all(b"{\"a\":1}\n{\"b\":2}\n").expect("writes");
        assert_eq!(w.lines.load(Ordering::Relaxed), 2);
        assert_eq!(w.bytes.load(Ordering::Relaxed), 16);
    }
}
