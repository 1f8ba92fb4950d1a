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
    #[error(
        "cannot read tracefs at {0} (permission denied): without root, vmatrace needs CAP_DAC_READ_SEARCH besides CAP_BPF and CAP_PERFMON; this process lacks CAP_DAC_READ_SEARCH"
    )]
    Unreadable(&'static str),
}

/// Returns the tracefs root, mounting tracefs on [`TRACEFS`] when no mount is found.
pub fn ensure_mounted() -> Result<&'static str, TracefsError> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(root);
        }
    }
    // Mounted but root's only (mode 0700): a non-root user with the BPF capabilities but not
    // CAP_DAC_READ_SEARCH. Mounting again would fail too, with a less useful message.
    let lacks_dac = !super::missing_caps(&[(super::CAP_DAC_READ_SEARCH, "")]).is_empty();
    if lacks_dac
        && std::fs::read_dir(Path::new(TRACEFS).join("events"))
            .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    {
        return Err(TracefsError::Unreadable(TRACEFS));
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
        .join("format")
        .exists()
}

/// The fields of the tracepoint `category:event` as its `format` file lists them; `None` when
/// the kernel has no such tracepoint.
pub fn read_format(root: &str, category: &str, event: &str) -> Option<Vec<FormatField>> {
    let path = Path::new(root)
        .join("events")
        .join(category)
        .join(event)
        .join("format");
    let text = std::fs::read_to_string(path).ok()?;
    Some(format_fields(&text).collect())
}

/// A field line of a tracepoint `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// The fields of a `format` file: lines like
/// `field:unsigned long len; offset:24; size:8; signed:0;`.
fn format_fields(text: &str) -> impl Iterator<Item = FormatField> + '_ {
    text.lines().filter_map(|line| {
        let mut decl = None;
        let (mut offset, mut size) = (None, None);
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.parse().ok();
            }
        }
        // The name is the declaration's last word, without an array suffix (`comm[16]`).
        let word = decl?.split_whitespace().last()?;
        let name = word.split('[').next().unwrap_or(word);
        Some(FormatField {
            name: name.to_string(),
            offset: offset?,
            size: size?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_FORMAT: &str = "name: sched_process_exit
ID: 369
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;

print fmt: \"comm=%s pid=%d\", REC->comm, REC->pid
";

    #[test]
    fn format_lines_are_parsed() {
        let fields: Vec<_> = format_fields(EXIT_FORMAT).collect();
        assert_eq!(fields.len(), 8);
        assert_eq!(
            fields[4],
            FormatField {
                name: "comm".into(),
                offset: 8,
                size: 16
            }
        );
        assert_eq!(
            fields[7],
            FormatField {
                name: "group_dead".into(),
                offset: 32,
                size: 1
            }
        );
    }
}
