//! Finding tracefs, and mounting it when it is missing (the kernel's tracepoint ids live there).

use std::{ffi::CString, io, path::Path};

use tracer_common::{Syscall, layout};

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

/// A tracepoint whose record does not have what the eBPF programs read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "this kernel has no tracepoint {0}; vmatrace needs the syscall, sched and task tracepoints (CONFIG_FTRACE_SYSCALLS)"
    )]
    Missing(String),
    #[error(
        "this kernel's tracepoint {tracepoint} has no {field} of {size} bytes at offset {offset} (its format file says otherwise): vmatrace would read wrong data, so it stops; vmatrace supports the layouts of Linux 6.x"
    )]
    Mismatch {
        tracepoint: String,
        field: String,
        offset: usize,
        size: usize,
    },
}

/// One field the probe reads: category, event, name (`None`: any name), offset, size.
struct Expected<'a> {
    category: &'a str,
    event: &'a str,
    field: Option<&'a str>,
    offset: usize,
    size: usize,
}

/// Checks every tracepoint the probe attaches to against the kernel's `format` files: each must
/// exist and hold each field the eBPF programs read at the offset and size they read it.
pub fn check_layout(root: &str) -> Result<(), LayoutError> {
    let mut expected = Vec::new();
    let names: Vec<(String, String)> = Syscall::ALL
        .iter()
        .map(|c| {
            (
                format!("sys_enter_{}", c.name()),
                format!("sys_exit_{}", c.name()),
            )
        })
        .collect();
    for (enter, exit) in &names {
        expected.push(Expected {
            category: "syscalls",
            event: enter,
            field: None,
            offset: layout::SYS_ENTER_ARGS_OFFSET,
            size: 8,
        });
        expected.push(Expected {
            category: "syscalls",
            event: exit,
            field: Some("ret"),
            offset: layout::SYS_EXIT_RET_OFFSET,
            size: 8,
        });
    }
    expected.extend(layout::LIFECYCLE_FIELDS.iter().map(|f| Expected {
        category: f.category,
        event: f.event,
        field: Some(f.field),
        offset: f.offset,
        size: f.size,
    }));
    for e in &expected {
        let tracepoint = format!("{}:{}", e.category, e.event);
        let path = Path::new(root)
            .join("events")
            .join(e.category)
            .join(e.event)
            .join("format");
        let text =
            std::fs::read_to_string(&path).map_err(|_| LayoutError::Missing(tracepoint.clone()))?;
        let found = format_fields(&text).any(|f| {
            f.offset == e.offset && f.size == e.size && e.field.is_none_or(|n| n == f.name)
        });
        if !found {
            return Err(LayoutError::Mismatch {
                tracepoint,
                field: e.field.unwrap_or("argument").to_string(),
                offset: e.offset,
                size: e.size,
            });
        }
    }
    Ok(())
}

/// A field line of a tracepoint `format` file.
#[derive(Debug, PartialEq, Eq)]
struct FormatField<'a> {
    name: &'a str,
    offset: usize,
    size: usize,
}

/// The fields of a `format` file: lines like
/// `field:unsigned long len; offset:24; size:8; signed:0;`.
fn format_fields(text: &str) -> impl Iterator<Item = FormatField<'_>> {
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
            name,
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
                name: "comm",
                offset: 8,
                size: 16
            }
        );
        assert_eq!(
            fields[7],
            FormatField {
                name: "group_dead",
                offset: 32,
                size: 1
            }
        );
    }

    /// The layout check on this machine's own tracefs (6.x): it holds.
    #[test]
    fn this_kernels_layout_is_the_one_the_programs_read() {
        let Some(root) = [TRACEFS, DEBUGFS_TRACING]
            .into_iter()
            .find(|r| Path::new(r).join("events/syscalls").is_dir())
        else {
            eprintln!("skipped: no readable tracefs (not root, or not mounted)");
            return;
        };
        assert_eq!(check_layout(root), Ok(()));
    }

    #[test]
    fn a_missing_or_moved_field_is_refused() {
        let dir = std::env::temp_dir().join(format!("vmatrace-layout-{}", std::process::id()));
        let write = |cat: &str, ev: &str, text: &str| {
            let d = dir.join("events").join(cat).join(ev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("format"), text).unwrap();
        };
        let root = dir.to_str().unwrap();
        assert_eq!(
            check_layout(root),
            Err(LayoutError::Missing("syscalls:sys_enter_brk".into()))
        );
        for c in Syscall::ALL {
            let arg = "\tfield:unsigned long a;\toffset:16;\tsize:8;\tsigned:0;\n";
            write("syscalls", &format!("sys_enter_{}", c.name()), arg);
            let ret = "\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n";
            write("syscalls", &format!("sys_exit_{}", c.name()), ret);
        }
        write(
            "task",
            "task_newtask",
            "\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n",
        );
        write(
            "sched",
            "sched_process_exec",
            "\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;\n",
        );
        // An older kernel: sched_process_exit without group_dead.
        let old_exit: String = EXIT_FORMAT
            .lines()
            .filter(|l| !l.contains("group_dead"))
            .map(|l| format!("{l}\n"))
            .collect();
        write("sched", "sched_process_exit", &old_exit);
        let err = check_layout(root).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Mismatch {
                tracepoint: "sched:sched_process_exit".into(),
                field: "group_dead".into(),
                offset: 32,
                size: 1
            }
        );
        assert!(
            err.to_string()
                .contains("group_dead of 1 bytes at offset 32")
        );
        write("sched", "sched_process_exit", EXIT_FORMAT);
        assert_eq!(check_layout(root), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
