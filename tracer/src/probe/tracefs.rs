//! Finding tracefs, and mounting it when it is missing (the kernel's tracepoint ids live there).

use std::{ffi::CString, io, path::Path};

/// Where tracefs is mounted on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The old location under debugfs.
pub const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Errors finding or mounting tracefs.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it failed ({0}); run `sudo mount -t tracefs tracefs {TRACEFS}` and try again"
    )]
    Mount(io::Error),
}

/// Returns the tracefs root, mounting tracefs on [`TRACEFS`] when no mount is found.
pub fn ensure_mounted() -> Result<&'static str, TracefsError> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(root);
        }
    }
    let c = |s: &str| CString::new(s).map_err(|e| TracefsError::Mount(io::Error::other(e)));
    let (src, target, fstype) = (c("tracefs")?, c(TRACEFS)?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(io::Error::last_os_error()));
    }
    log::info!("mounted tracefs on {TRACEFS}");
    Ok(TRACEFS)
}

/// Whether the tracepoint `category:name` exists.
pub fn has_tracepoint(root: &str, category: &str, name: &str) -> bool {
    Path::new(root)
        .join("events")
        .join(category)
        .join(name)
        .join("id")
        .exists()
}
