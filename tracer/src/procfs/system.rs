//! What the kernel and the machine say about the whole system rather than one process's map:
//! the transparent huge page policy and khugepaged's count, PID namespaces, the kernel's
//! release and `vm.max_map_count`.

use std::fs;

use tracer_common::layout::PidNamespace;

use super::*;

/// How many huge pages khugepaged has made by collapsing small ones, system-wide (none when
/// the kernel has no transparent huge pages). It changes when a collapse happened, in any
/// process: the daemon then looks for collapses in the traced ones.
pub fn khugepaged_collapses() -> Option<u64> {
    fs::read_to_string("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The transparent huge page policy that applies to `pid` now (off when the kernel has none).
pub fn thp_policy(pid: u32) -> ThpPolicy {
    const ROOT: &str = "/sys/kernel/mm/transparent_hugepage";
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let mut sizes = Vec::new();
    if let Ok(dir) = fs::read_dir(ROOT) {
        for d in dir.filter_map(Result::ok) {
            let name = d.file_name().to_string_lossy().into_owned();
            if let Some(kib) = name
                .strip_prefix("hugepages-")
                .and_then(|n| n.strip_suffix("kB"))
                .and_then(|n| n.parse::<u64>().ok())
                && let Ok(text) = fs::read_to_string(d.path().join("enabled"))
            {
                sizes.push((kib, text));
            }
        }
    }
    // Read as bytes: the Name line holds the process's comm, which may be any bytes.
    let status = fs::read(format!("/proc/{pid}/status")).unwrap_or_default();
    let process_enabled = String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .is_none_or(|v| v.trim() != "0");
    ThpPolicy {
        zero_write_huge: kernel_release().is_some_and(|v| v >= (6, 13)),
        ..ThpPolicy::from_settings(
            &read(&format!("{ROOT}/enabled")),
            &sizes,
            &read(&format!("{ROOT}/use_zero_page")),
            process_enabled,
        )
    }
}

/// The inode of the kernel's first PID namespace (`PROC_PID_INIT_INO`), the one the kernel's
/// own pids belong to.
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// The PID namespace vmatrace runs in, as the eBPF programs name it; the kernel's own when it
/// runs in the first one (or cannot tell). In a PID namespace of its own (a container) the
/// pids it is given and sees in `/proc` are that namespace's, so the programs report those.
pub fn own_pid_namespace() -> PidNamespace {
    use std::os::unix::fs::MetadataExt as _;
    match fs::metadata("/proc/self/ns/pid") {
        Ok(m) if m.ino() != INITIAL_PID_NAMESPACE => PidNamespace {
            // The kernel compares its own `dev_t` encoding (major << 20 | minor), not the
            // one `stat` gives.
            dev: (u64::from(libc::major(m.dev())) << 20) | u64::from(libc::minor(m.dev())),
            ino: m.ino(),
        },
        _ => PidNamespace::KERNEL,
    }
}

/// The pids of `pid` in each PID namespace it belongs to, from the reader's outward in
/// (`NSpid` in `/proc/PID/status`): one entry for a process of the reader's namespace, more
/// for one in a container (the last is its pid there).
pub fn namespace_pids(pid: u32) -> Vec<u32> {
    // Read as bytes: the Name line holds the process's comm, which may be any bytes.
    let status = fs::read(format!("/proc/{pid}/status")).unwrap_or_default();
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The running kernel's version as (major, minor), from `/proc/sys/kernel/osrelease`.
pub fn kernel_release() -> Option<(u32, u32)> {
    parse_release(&fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// (major, minor) of a release string such as `6.1.0-31-amd64`.
pub(super) fn parse_release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// This machine's `vm.max_map_count`.
pub fn max_map_count() -> Option<u64> {
    fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}
