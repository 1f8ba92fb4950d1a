//! Opening an output file safely, before anything is attached. The path is walked one
//! component at a time without following links (`O_PATH | O_NOFOLLOW`), so that nobody but
//! the user decides where the output goes:
//!
//! - a symbolic link in the middle of the path is followed only where no one but root or the
//!   invoking user could have planted it (a directory they own and nobody else can write, a
//!   link they own); the last component is never a link;
//! - a new file is created 0600 and, under sudo, given to the invoking user
//!   ([`crate::sudo`]), so that `vmatrace replay` works without sudo;
//! - an existing regular file needs `--force`, and is then replaced by a new file renamed over
//!   it: vmatrace never writes into a file that someone else may own or hold open;
//! - a FIFO or character device (`-o /dev/null`, a pipe the user made) is written to as it is,
//!   since nothing is overwritten, unless another user owns it in a directory everyone can
//!   write; it is opened without blocking, and a FIFO with no reader yet is opened in the
//!   background, so that vmatrace attaches at once (its first write-out waits for a reader).

use std::{
    collections::VecDeque,
    ffi::{CString, OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
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
    #[error(
        "{path}: {link} is a symbolic link that another user could have planted; refusing to follow it"
    )]
    UntrustedLink { path: String, link: String },
    #[error(
        "{path} is owned by another user (uid {uid}) in a directory everyone can write; refusing to write to it"
    )]
    NotYours { path: String, uid: u32 },
    #[error("{0} is not a regular file, FIFO or character device")]
    Unsupported(String),
    #[error("cannot write {path}")]
    Io { path: String, source: io::Error },
    #[error(
        "--max-size rotates a regular file; {0} is not one (a FIFO or a device cannot be rotated)"
    )]
    NotRotatable(String),
    #[error("--max-size needs -o FILE, a regular file (stdout cannot be rotated)")]
    RotateStdout,
    #[error("--max-size needs NDJSON output (--json, or record): each file is a recording")]
    RotateNeedsJson,
    #[error(
        "the binary format is not for a terminal: give -o FILE, or pipe it (vmatrace convert reads it)"
    )]
    BinaryToTerminal,
}

/// The users whose files and links are trusted: root, the effective user, the sudo user.
struct Trusted {
    uids: [u32; 3],
}

impl Trusted {
    fn now() -> Self {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let sudo = crate::sudo::invoker().map_or(0, |u| u.uid);
        Self {
            uids: [0, euid, sudo],
        }
    }

    fn owns(&self, st: &libc::stat) -> bool {
        self.uids.contains(&st.st_uid)
    }

    /// Whether a link (`link`) in directory `dir` can only have been made by a trusted user.
    fn may_follow(&self, dir: &libc::stat, link: &libc::stat) -> bool {
        self.owns(dir) && dir.st_mode & (libc::S_IWGRP | libc::S_IWOTH) == 0 && self.owns(link)
    }
}

/// The kernel's limit on links followed in one look-up.
const MAX_LINKS: usize = 40;

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat(dir: &OwnedFd, name: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: a valid directory fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_root(absolute: bool) -> io::Result<OwnedFd> {
    let start = CString::new(if absolute { "/" } else { "." }).unwrap_or_default();
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            start.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstatat(dir: &OwnedFd, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, name and out-pointer.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn is(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// Pushes the components of `path` in front of `todo` (in order); true when it is absolute.
fn push_front(todo: &mut VecDeque<OsString>, path: &Path) -> bool {
    let mut absolute = false;
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::Normal(n) => parts.push(n.to_os_string()),
        }
    }
    for p in parts.into_iter().rev() {
        todo.push_front(p);
    }
    absolute
}

fn readlinkat(dir: &OwnedFd, name: &CString) -> io::Result<std::path::PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: a valid directory fd and name; the buffer's length is passed.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(std::path::PathBuf::from(OsString::from(
        <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&buf),
    )))
}

/// Opens the directory `dir` (every component of it a directory), following only the links
/// a trusted user made.
fn open_dir(dir: &Path, trusted: &Trusted, name: &str) -> Result<OwnedFd, OutputError> {
    let io_err = |source| OutputError::Io {
        path: name.to_string(),
        source,
    };
    let mut todo = VecDeque::new();
    let mut fd = open_root(push_front(&mut todo, dir)).map_err(io_err)?;
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        let c = c_name(&part).map_err(io_err)?;
        let next = openat(
            &fd,
            &c,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        )
        .map_err(io_err)?;
        let st = fstat(&next).map_err(io_err)?;
        if is(&st, libc::S_IFDIR) {
            fd = next;
            continue;
        }
        if !is(&st, libc::S_IFLNK) {
            return Err(io_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let here = fstat(&fd).map_err(io_err)?;
        if !trusted.may_follow(&here, &st) {
            return Err(OutputError::UntrustedLink {
                path: name.to_string(),
                link: part.to_string_lossy().into_owned(),
            });
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(io_err(io::Error::from_raw_os_error(libc::ELOOP)));
        }
        let target = readlinkat(&fd, &c).map_err(io_err)?;
        if push_front(&mut todo, &target) {
            fd = open_root(true).map_err(io_err)?;
        }
    }
    Ok(fd)
}

/// An opened output: a file, or a FIFO still waiting for its reader (opened in the
/// background; the first write waits for it).
pub struct Output {
    file: Option<File>,
    pending: Option<JoinHandle<io::Result<File>>>,
}

impl Output {
    fn ready(fd: OwnedFd) -> Self {
        Self {
            file: Some(File::from(fd)),
            pending: None,
        }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if let Some(pending) = self.pending.take() {
            let file = pending
                .join()
                .map_err(|_| io::Error::other("the thread opening the FIFO panicked"))??;
            self.file = Some(file);
        }
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("output not open"))
    }

    /// Cuts a regular file back to `len` bytes (nothing for a FIFO or device).
    pub(crate) fn cut_back(&mut self, len: u64) {
        if let Ok(f) = self.file() {
            let _ = f.set_len(len);
            let _ = io::Seek::seek(f, io::SeekFrom::Start(len));
        }
    }
}

impl io::Write for Output {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.file()?.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

/// Gives a file vmatrace created to the user who ran sudo (still 0600).
fn give_to_invoker(fd: &OwnedFd) -> io::Result<()> {
    if let Some(user) = crate::sudo::invoker() {
        // SAFETY: a valid fd.
        if unsafe { libc::fchown(fd.as_raw_fd(), user.uid, user.gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

const NEW_FILE: i32 =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Creates `name` in `dir`, 0600, owned by the invoking user.
fn create_new(dir: &OwnedFd, name: &CString) -> io::Result<OwnedFd> {
    let fd = openat(dir, name, NEW_FILE, 0o600)?;
    give_to_invoker(&fd)?;
    Ok(fd)
}

/// Replaces the regular file `name` in `dir` by a new one: written under a temporary name in
/// the same directory, then renamed over it, so that the old file (whoever owns it, whatever
/// its mode, whoever holds it open) is never written.
fn replace(dir: &OwnedFd, name: &CString) -> io::Result<OwnedFd> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let tmp = CString::new(format!(
        ".vmatrace-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
    .map_err(io::Error::other)?;
    let fd = create_new(dir, &tmp)?;
    // SAFETY: a valid directory fd and NUL-terminated names.
    let rc = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: as above; removing our own temporary file.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
        return Err(e);
    }
    Ok(fd)
}

/// Opens the FIFO or character device `name` in `dir` for writing, never blocking: the file
/// opened must be the one checked (`st`).
fn open_special(dir: OwnedFd, name: CString, st: &libc::stat) -> io::Result<Output> {
    let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC;
    let same = |fd: &OwnedFd, want: (u64, u64)| -> io::Result<()> {
        let got = fstat(fd)?;
        if (got.st_dev, got.st_ino) == want {
            Ok(())
        } else {
            Err(io::Error::other("replaced while being opened"))
        }
    };
    let want = (st.st_dev, st.st_ino);
    match openat(&dir, &name, flags | libc::O_NONBLOCK, 0) {
        Ok(fd) => {
            same(&fd, want)?;
            // Writes block as usual from now on (a slow reader slows vmatrace, as on stdout).
            // SAFETY: a valid fd; clearing O_NONBLOCK.
            unsafe {
                let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
            Ok(Output::ready(fd))
        }
        // A FIFO nobody reads yet: wait for its reader on another thread.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) && is(st, libc::S_IFIFO) => {
            let pending = std::thread::Builder::new()
                .name("vmatrace-fifo".into())
                .spawn(move || {
                    let fd = openat(&dir, &name, flags, 0)?;
                    same(&fd, want)?;
                    Ok(File::from(fd))
                })?;
            Ok(Output {
                file: None,
                pending: Some(pending),
            })
        }
        Err(e) => Err(e),
    }
}

/// A name in a directory opened as the module documentation describes (no untrusted link on
/// the way): where an output is created, and where a rotated output (`output::rotate`)
/// renames and creates its files again, always by name in that one directory.
pub struct Place {
    dir: OwnedFd,
    name: CString,
    shown: String,
    trusted: Trusted,
}

impl Place {
    /// Walks to the directory of `path`.
    pub fn new(path: &Path) -> Result<Self, OutputError> {
        let shown = path.display().to_string();
        let Some(file_name) = path.file_name() else {
            return Err(OutputError::Directory(shown));
        };
        let trusted = Trusted::now();
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = open_dir(parent.unwrap_or(Path::new(".")), &trusted, &shown)?;
        let name = c_name(file_name).map_err(|source| OutputError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            name,
            shown,
            trusted,
        })
    }

    /// The same directory, another name in it.
    pub fn sibling(&self, file_name: &OsStr) -> Result<Self, OutputError> {
        let path = Path::new(&self.shown).with_file_name(file_name);
        let shown = path.display().to_string();
        let io_err = |source| OutputError::Io {
            path: shown.clone(),
            source,
        };
        Ok(Self {
            dir: self.dir.try_clone().map_err(io_err)?,
            name: c_name(file_name).map_err(io_err)?,
            shown: shown.clone(),
            trusted: Trusted::now(),
        })
    }

    /// The path as the user gave it (for messages).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn error(&self, source: io::Error) -> OutputError {
        let shown = self.shown.clone();
        match source.raw_os_error() {
            Some(libc::ELOOP) => OutputError::Symlink(shown),
            Some(libc::EISDIR) => OutputError::Directory(shown),
            Some(libc::EEXIST) => OutputError::Exists(shown),
            _ => OutputError::Io {
                path: shown,
                source,
            },
        }
    }

    /// What is there now (`S_IFREG`, `S_IFIFO`, ...; links not followed), or None.
    pub fn file_type(&self) -> Result<Option<libc::mode_t>, OutputError> {
        match fstatat(&self.dir, &self.name) {
            Ok(st) => Ok(Some(st.st_mode & libc::S_IFMT)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Creates a new file here (nothing may be there), 0600, owned by the invoking user.
    pub fn create_new(&self) -> Result<Output, OutputError> {
        create_new(&self.dir, &self.name)
            .map(Output::ready)
            .map_err(|e| self.error(e))
    }

    /// Renames the file here to `to` (in the same directory), replacing what is there; false
    /// when there was nothing to rename. Names, not files, are renamed: a link is never
    /// followed.
    pub fn rename_to(&self, to: &Place) -> Result<bool, OutputError> {
        // SAFETY: valid directory fds and NUL-terminated names.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                to.dir.as_raw_fd(),
                to.name.as_ptr(),
            )
        };
        match rc {
            0 => Ok(true),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                e => Err(self.error(e)),
            },
        }
    }

    /// Removes the file (or link) here; false when there was none.
    pub fn remove(&self) -> Result<bool, OutputError> {
        // SAFETY: a valid directory fd and a NUL-terminated name.
        match unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } {
            0 => Ok(true),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                e => Err(self.error(e)),
            },
        }
    }

    /// Opens the output here for writing as the module documentation describes.
    pub fn create(&self, force: bool) -> Result<Output, OutputError> {
        let io_err = |e| self.error(e);
        let st = match fstatat(&self.dir, &self.name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return self.create_new(),
            Err(e) => return Err(io_err(e)),
            Ok(st) => st,
        };
        let shown = self.shown.clone();
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => Err(OutputError::Symlink(shown)),
            libc::S_IFDIR => Err(OutputError::Directory(shown)),
            libc::S_IFREG if !force => Err(OutputError::Exists(shown)),
            libc::S_IFREG => replace(&self.dir, &self.name)
                .map(Output::ready)
                .map_err(io_err),
            libc::S_IFIFO | libc::S_IFCHR => {
                let here = fstat(&self.dir).map_err(io_err)?;
                if here.st_mode & libc::S_IWOTH != 0 && !self.trusted.owns(&st) {
                    return Err(OutputError::NotYours {
                        path: shown,
                        uid: st.st_uid,
                    });
                }
                let dir = self.dir.try_clone().map_err(io_err)?;
                open_special(dir, self.name.clone(), &st).map_err(io_err)
            }
            _ => Err(OutputError::Unsupported(shown)),
        }
    }
}

/// Opens `path` for writing as the module documentation describes.
pub fn create(path: &Path, force: bool) -> Result<Output, OutputError> {
    Place::new(path)?.create(force)
}

/// A file writer that only ever leaves whole records on disk: it buffers, writes up to the
/// end of the last whole record, and when a write fails (a full disk) it cuts the file back
/// to the last whole record, so that every record already written stays valid. Records end
/// at newlines (NDJSON), or each write is one whole record (binary, whose bytes may hold
/// newlines anywhere).
pub struct LineFile {
    file: Output,
    whole_writes: bool,
    buf: Vec<u8>,
    /// Where the last newline in `buf` is (found when it was written, so that a long line
    /// written in many small pieces is not scanned again and again).
    last_newline: Option<usize>,
    /// Bytes on disk, all whole lines.
    committed: u64,
}

const LINE_FILE_BUFFER: usize = 1 << 16;

impl LineFile {
    /// Wraps an output opened for writing at its start, whose records end at newlines.
    pub fn new(file: Output) -> Self {
        Self::with_records(file, false)
    }

    /// Wraps an output opened for writing at its start: records end at newlines, or (with
    /// `whole_writes`) each write is one whole record.
    pub fn with_records(file: Output, whole_writes: bool) -> Self {
        Self {
            file,
            whole_writes,
            buf: Vec::with_capacity(LINE_FILE_BUFFER),
            last_newline: None,
            committed: 0,
        }
    }

    /// Bytes this file holds once flushed.
    pub fn bytes(&self) -> u64 {
        self.committed + self.buf.len() as u64
    }

    fn write_whole_lines(&mut self) -> io::Result<()> {
        use std::io::Write as _;
        let Some(last) = self.last_newline else {
            return Ok(());
        };
        let lines = &self.buf[..=last];
        if let Err(e) = self.file.write_all(lines) {
            // Cut a partly written line back off; what remains is whole lines.
            self.file.cut_back(self.committed);
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
        if self.whole_writes && !data.is_empty() {
            self.last_newline = Some(self.buf.len() - 1);
        } else if let Some(i) = data.iter().rposition(|&b| b == b'\n') {
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
