//! Tracing a cgroup (v2), which is how production names a container or a systemd unit: every
//! process in it or in a group below it, and every process that joins later.
//!
//! The programs are given the group's id and those of the groups below it (`CGROUPS`): the
//! first event of a process of those groups that is not traced yet adds it to the traced set
//! (`TARGETS`, its children followed) and tells the daemon (a `Join` event), which seeds it from
//! `/proc`. The members are also read from `cgroup.procs` at the start and at every tick
//! (50 ms), for those that give no event (idle), and new groups below it are handed over then.
//! A process that leaves the group is traced until it exits.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

/// `statfs` type of a cgroup v2 file system (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Why a cgroup cannot be traced.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("--cgroup {path}")]
    Unreadable { path: String, source: io::Error },
    #[error(
        "--cgroup {0}: not a cgroup v2 group (give a directory under the cgroup2 mount, such as /sys/fs/cgroup/system.slice/NAME.service, or a path relative to that mount)"
    )]
    NotV2(String),
    #[error("--cgroup {0}: relative, but no cgroup2 file system is mounted")]
    NoMount(String),
}

/// A cgroup v2 group whose processes are traced.
#[derive(Clone, Debug)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// The group at `path`: a directory of a cgroup v2 file system, or a path relative to
    /// where cgroup2 is mounted (`system.slice/nginx.service`).
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let shown = path.display().to_string();
        let dir = if path.is_absolute() {
            path.to_path_buf()
        } else {
            cgroup2_mount()
                .ok_or_else(|| CgroupError::NoMount(shown.clone()))?
                .join(path)
        };
        let meta = fs::metadata(&dir).map_err(|source| CgroupError::Unreadable {
            path: shown.clone(),
            source,
        })?;
        if !meta.is_dir() || !is_cgroup2(&dir) {
            return Err(CgroupError::NotV2(shown));
        }
        Ok(Self { dir })
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ids (as `bpf_get_current_cgroup_id` gives them: the directory's inode) of the group
    /// and of every group below it now.
    pub fn ids(&self) -> Vec<u64> {
        use std::os::unix::fs::MetadataExt as _;
        self.dirs()
            .iter()
            .filter_map(|d| fs::metadata(d).ok().map(|m| m.ino()))
            .collect()
    }

    /// The group's directory and those below it.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![self.dir.clone()];
        while let Some(dir) = todo.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                todo.extend(
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            out.push(dir);
        }
        out
    }

    /// The processes in the group and in every group below it now (a group removed meanwhile
    /// is skipped).
    pub fn pids(&self) -> BTreeSet<u32> {
        self.dirs()
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Whether `dir` is on a cgroup v2 file system.
fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed struct the call fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == CGROUP2_MAGIC
}

/// Where the cgroup v2 file system is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid systems), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_point_of(&info, "cgroup2")
}

/// The mount point of the first file system of type `fstype` in `mountinfo` text.
fn mount_point_of(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == fstype)
            .then(|| before.split_whitespace().nth(4).map(unescape))
            .flatten()
    })
}

/// A mountinfo path, whose spaces, tabs, newlines and backslashes are octal escapes.
fn unescape(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let info = "22 1 0:21 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                    30 22 0:26 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n\
                    31 22 0:27 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            mount_point_of(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point_of(info, "cgroup3"), None);
        let odd = "40 1 0:30 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            mount_point_of(odd, "cgroup2"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn what_is_not_a_cgroup2_group_is_refused() {
        assert!(matches!(
            Cgroup::open(Path::new("/tmp")),
            Err(CgroupError::NotV2(_))
        ));
        assert!(matches!(
            Cgroup::open(Path::new("/nonexistent/group")),
            Err(CgroupError::Unreadable { .. })
        ));
    }
}
