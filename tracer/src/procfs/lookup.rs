//! The small look-ups that name what a syscall referred to: the file an `mmap` mapped, the
//! System V segment of a `shmat`, the process a `process_madvise` pidfd names.

use std::fs;

use super::*;

/// A mapped file: path, device (`major:minor` in hex, as maps shows it) and inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    pub path: String,
    pub dev: Option<String>,
    pub inode: Option<u64>,
}

/// Device and inode of `path` (`stat`, following links), in the form maps uses.
pub fn file_id(path: &std::path::Path) -> (Option<String>, Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => {
            let dev = m.dev();
            (
                Some(format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))),
                Some(m.ino()),
            )
        }
        Err(_) => (None, None),
    }
}

/// The file that a `mmap` of file offset `offset` returning `addr` mapped, as the kernel shows
/// it now: the VMA at `addr` in `/proc/PID/maps`, named by its `map_files` link (the mapped
/// file itself: exact bytes, and `stat` through it reaches that file whatever its name is now).
/// None when what is mapped at `addr` now cannot be that mapping (unmapped, anonymous, or a
/// file at another offset: replaced since the call), rather than a guess through a file
/// descriptor that may have been closed and reused since.
pub fn mapped_file(pid: u32, addr: u64, offset: u64) -> Option<MappedFile> {
    let maps = read_maps(pid).ok()?;
    let e = maps.iter().find(|e| e.start <= addr && addr < e.end)?;
    if e.inode == 0 || e.offset.checked_add(addr - e.start)? != offset {
        return None;
    }
    let link = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end));
    let (dev, inode) = file_id(&link);
    if inode.is_some_and(|i| i != e.inode) {
        // Replaced between the two reads.
        return None;
    }
    let path = match fs::read_link(&link) {
        Ok(p) => crate::name::from_os(p.as_os_str()),
        Err(_) => e.path.clone()?,
    };
    Some(MappedFile {
        path,
        dev: dev.or_else(|| Some(e.dev.clone())),
        inode: Some(e.inode),
    })
}

/// The size and key of System V segment `shmid`, from `/proc/sysvipc/shm`.
pub fn shm_segment(shmid: u64) -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/sysvipc/shm").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // key shmid perms size ...
        (f.get(1)?.parse::<u64>().ok()? == shmid)
            .then(|| {
                Some((
                    f.get(3)?.parse().ok()?,
                    f.first()?.parse::<i64>().ok()? as u64,
                ))
            })
            .flatten()
    })
}

/// The size and key of the System V segment `pid` has attached at `addr`, from its own map:
/// the pieces of that attach (same segment id in the inode column, offsets from `addr`). The
/// process's map is read in its own IPC namespace's terms, unlike `/proc/sysvipc/shm`.
pub fn attached_segment(pid: u32, addr: u64) -> Option<(u64, u64)> {
    let maps = read_maps(pid).ok()?;
    let first = maps.iter().find(|m| {
        m.start == addr
            && m.offset == 0
            && m.path.as_deref().is_some_and(|p| p.starts_with("/SYSV"))
    })?;
    let end = maps
        .iter()
        .filter(|m| m.inode == first.inode && m.start >= addr && m.start - m.offset == addr)
        .map(|m| m.end)
        .max()?;
    let key = first
        .path
        .as_deref()
        .and_then(|p| p.get(5..13))
        .and_then(|k| u64::from_str_radix(k, 16).ok())
        .unwrap_or(0);
    Some((end - addr, key))
}

/// The pid a pidfd held by `pid` refers to (`process_madvise`).
pub fn pidfd_target(pid: u32, fd: i32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}
