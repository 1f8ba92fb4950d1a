//! Opening the output file safely: mode 0600, never through a symlink, never over an existing
//! file without `--force`. Done before anything is attached.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// Errors opening the output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0} exists; use --force to overwrite it")]
    Exists(String),
    #[error("{0} is a directory")]
    Directory(String),
    #[error("{0} is a symbolic link; refusing to write through it")]
    Symlink(String),
    #[error("cannot write {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Creates `path` for writing.
pub fn create(path: &Path, force: bool) -> Result<File, OutputError> {
    let name = path.display().to_string();
    if let Ok(meta) = path.symlink_metadata() {
        if meta.file_type().is_symlink() {
            return Err(OutputError::Symlink(name));
        }
        if meta.is_dir() {
            return Err(OutputError::Directory(name));
        }
        if !force {
            return Err(OutputError::Exists(name));
        }
    }
    let mut opts = OpenOptions::new();
    opts.write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    opts.open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => OutputError::Symlink(name.clone()),
            Some(libc::EISDIR) => OutputError::Directory(name.clone()),
            Some(libc::EEXIST) => OutputError::Exists(name.clone()),
            _ => OutputError::Io { path: name, source },
        })
}

/// A file writer that only ever leaves whole lines on disk: it buffers, writes up to the last
/// newline, and when a write fails (a full disk) it cuts the file back to the last whole line,
/// so that every line already written stays a valid record.
pub struct LineFile {
    file: File,
    buf: Vec<u8>,
    /// Where the last newline in `buf` is (found when it was written, so that a long line
    /// written in many small pieces is not scanned again and again).
    last_newline: Option<usize>,
    /// Bytes on disk, all whole lines.
    committed: u64,
}

const LINE_FILE_BUFFER: usize = 1 << 16;

impl LineFile {
    /// Wraps a file opened for writing at its start.
    pub fn new(file: File) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(LINE_FILE_BUFFER),
            last_newline: None,
            committed: 0,
        }
    }

    fn write_whole_lines(&mut self) -> io::Result<()> {
        use std::io::Write as _;
        let Some(last) = self.last_newline else {
            return Ok(());
        };
        let lines = &self.buf[..=last];
        if let Err(e) = self.file.write_all(lines) {
            // Cut a partly written line back off; what remains is whole lines.
            let _ = self.file.set_len(self.committed);
            let _ = std::io::Seek::seek(&mut self.file, io::SeekFrom::Start(self.committed));
            return Err(e);
        }
        self.committed += lines.len() as u64;
        self.buf.drain(..=last);
        self.last_newline = None;
        Ok(())
    }
}

impl io::Write for LineFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let base = self.buf.len();
        self.buf.extend_from_slice(data);
        if let Some(i) = data.iter().rposition(|&b| b == b'\n') {
            self.last_newline = Some(base + i);
        }
        if self.buf.len() >= LINE_FILE_BUFFER && self.last_newline.is_some() {
            self.write_whole_lines()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_whole_lines()?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_long_line_written_in_small_pieces_is_not_quadratic() {
        let path = std::env::temp_dir().join(format!("vmatrace-longline-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut w = LineFile::new(create(&path, false).expect("creates"));
        // 4 MB in 1-byte writes: rescanning the buffer on each write would not finish.
        for _ in 0..4_000_000 {
            w.write_all(b"x").expect("buffers");
        }
        w.write_all(b"\n").expect("buffers");
        w.flush().expect("flushes");
        assert_eq!(std::fs::metadata(&path).expect("exists").len(), 4_000_001);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn only_whole_lines_reach_the_file() {
        let path = std::env::temp_dir().join(format!("vmatrace-linefile-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut w = LineFile::new(create(&path, false).expect("creates"));
        w.write_all(b"{\"a\":1}\n{\"b\":").expect("buffers");
        w.flush().expect("flushes");
        assert_eq!(
            std::fs::read_to_string(&path).expect("reads"),
            "{\"a\":1}\n"
        );
        w.write_all(b"2}\n").expect("buffers");
        w.flush().expect("flushes");
        assert_eq!(
            std::fs::read_to_string(&path).expect("reads"),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(create(&path, false), Err(OutputError::Exists(_))));
        let link = path.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(matches!(create(&link, true), Err(OutputError::Symlink(_))));
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_file(&path);
    }
}
