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
