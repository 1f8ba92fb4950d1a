//! Reading `/proc`: the maps a trace is seeded from, the heap start, per-VMA RSS, process
//! state, and the small look-ups that name what a syscall referred to.

use std::{fs, io, path::PathBuf, sync::Arc};

use crate::model::{Backing, Perms, Vma};

/// Errors reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with pid {0}")]
    NoProcess(u32),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: cannot parse {what}")]
    Parse {
        path: String,
        line: usize,
        what: &'static str,
    },
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    pub offset: u64,
    /// Device as `major:minor` in hex, as maps shows it.
    pub dev: String,
    pub inode: u64,
    pub path: Option<String>,
}

fn read(pid: u32, name: &str) -> Result<String, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read_to_string(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::InvalidInput => ProcError::NoProcess(pid),
        _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::NoProcess(pid),
        _ => ProcError::Io { path, source },
    })
}

/// Parses the text of a maps file (`origin` names it in errors).
pub fn parse_maps(text: &str, origin: &str) -> Result<Vec<MapsEntry>, ProcError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |what| ProcError::Parse {
            path: origin.to_string(),
            line: i + 1,
            what,
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut it = line.splitn(6, ' ');
        let range = it.next().ok_or(err("range"))?;
        let (s, e) = range.split_once('-').ok_or(err("range"))?;
        let start = u64::from_str_radix(s, 16).map_err(|_| err("start"))?;
        let end = u64::from_str_radix(e, 16).map_err(|_| err("end"))?;
        if end < start {
            return Err(err("range"));
        }
        let perms = it.next().and_then(Perms::parse).ok_or(err("perms"))?;
        let offset = it
            .next()
            .and_then(|o| u64::from_str_radix(o, 16).ok())
            .ok_or(err("offset"))?;
        let dev = it.next().ok_or(err("dev"))?.to_string();
        let inode = it.next().and_then(|n| n.parse().ok()).ok_or(err("inode"))?;
        let path = it.next().map(str::trim_start).filter(|p| !p.is_empty());
        out.push(MapsEntry {
            start,
            end,
            perms,
            offset,
            dev,
            inode,
            path: path.map(str::to_string),
        });
    }
    Ok(out)
}

/// `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> Result<Vec<MapsEntry>, ProcError> {
    parse_maps(&read(pid, "maps")?, &format!("/proc/{pid}/maps"))
}

impl MapsEntry {
    /// The model's VMA for this line.
    pub fn to_vma(&self, created_ns: u64) -> Vma {
        let backing = match self.path.as_deref() {
            None => Backing::Anonymous,
            Some("[heap]") => Backing::Heap,
            Some("[stack]") => Backing::Stack,
            Some("/dev/zero (deleted)") if self.perms.shared => Backing::Anonymous,
            Some(p) if p.starts_with("[anon:") => Backing::Anonymous,
            Some(p) if p.starts_with("/SYSV") => Backing::Shm {
                key: p
                    .get(5..13)
                    .and_then(|k| u64::from_str_radix(k, 16).ok())
                    .unwrap_or(0),
            },
            Some(p) if p.starts_with('[') => Backing::Special(Arc::from(p)),
            Some(p) => Backing::File {
                path: Arc::from(p),
                inode: self.inode,
            },
        };
        Vma {
            start: self.start,
            end: self.end,
            perms: self.perms,
            offset: if matches!(backing, Backing::File { .. }) {
                self.offset
            } else {
                0
            },
            backing,
            created_ns,
        }
    }
}

/// The fields of `/proc/PID/stat` vmatrace uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// One of `R S D Z T t X I ...`.
    pub state: char,
    /// The kernel's `PF_*` task flags.
    pub flags: u64,
    /// Where the heap starts.
    pub start_brk: u64,
}

const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    /// A kernel thread: it has no user address space to trace.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// A zombie or dead process.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/PID/stat` text.
pub fn parse_stat(text: &str, origin: &str) -> Result<Stat, ProcError> {
    let err = |what| ProcError::Parse {
        path: origin.to_string(),
        line: 1,
        what,
    };
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = text.rsplit_once(')').ok_or(err("comm"))?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3).copied().ok_or(err("field count"));
    let state = field(3)?.chars().next().ok_or(err("state"))?;
    let flags = field(9)?.parse().map_err(|_| err("flags"))?;
    let start_brk = field(47)?.parse().map_err(|_| err("start_brk"))?;
    Ok(Stat {
        state,
        flags,
        start_brk,
    })
}

/// `/proc/PID/stat`.
pub fn read_stat(pid: u32) -> Result<Stat, ProcError> {
    parse_stat(&read(pid, "stat")?, &format!("/proc/{pid}/stat"))
}

/// Per-VMA resident memory from `/proc/PID/smaps`, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmapsEntry {
    pub start: u64,
    pub end: u64,
    pub rss: u64,
    pub anonymous: u64,
}

/// `/proc/PID/smaps`: RSS and anonymous bytes of each VMA.
pub fn read_smaps(pid: u32) -> Result<Vec<SmapsEntry>, ProcError> {
    let text = read(pid, "smaps")?;
    let origin = format!("/proc/{pid}/smaps");
    let mut out: Vec<SmapsEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let kb = |l: &str| -> Result<u64, ProcError> {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v * 1024)
                .ok_or(ProcError::Parse {
                    path: origin.clone(),
                    line: i + 1,
                    what: "size",
                })
        };
        if line.starts_with("Rss:") {
            if let Some(last) = out.last_mut() {
                last.rss = kb(line)?;
            }
        } else if line.starts_with("Anonymous:") {
            if let Some(last) = out.last_mut() {
                last.anonymous = kb(line)?;
            }
        } else if let Some((range, _)) = line.split_once(' ')
            && let Some((s, e)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
        {
            out.push(SmapsEntry {
                start,
                end,
                rss: 0,
                anonymous: 0,
            });
        }
    }
    Ok(out)
}

/// A mapped file: path, device (`major:minor` in hex, as maps shows it) and inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    pub path: String,
    pub dev: Option<String>,
    pub inode: Option<u64>,
}

/// Device and inode of `path` (`stat`), in the form maps uses.
pub fn file_id(path: &str) -> (Option<String>, Option<u64>) {
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

/// The file mapped at `addr` in `pid`, from its maps, else from its fd.
pub fn mapped_file(pid: u32, addr: u64, fd: i32) -> Option<MappedFile> {
    if let Ok(maps) = read_maps(pid)
        && let Some(e) = maps
            .iter()
            .find(|e| e.start <= addr && addr < e.end && e.inode != 0)
        && let Some(path) = &e.path
    {
        return Some(MappedFile {
            path: path.clone(),
            dev: Some(e.dev.clone()),
            inode: Some(e.inode),
        });
    }
    let link = format!("/proc/{pid}/fd/{fd}");
    let path = fs::read_link(&link).ok()?;
    let (dev, inode) = file_id(&link);
    Some(MappedFile {
        path: path.to_string_lossy().into_owned(),
        dev,
        inode,
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

/// The pid a pidfd held by `pid` refers to (`process_madvise`).
pub fn pidfd_target(pid: u32, fd: i32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// This machine's `vm.max_map_count` and CPU count, for the analysis.
pub fn limits() -> crate::analysis::Limits {
    let default = crate::analysis::Limits::default();
    crate::analysis::Limits {
        max_map_count: fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(default.max_map_count),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    }
}

/// Whether `pid` exists.
pub fn exists(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1234                       /usr/bin/cat
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f1e2a000000-7f1e2a021000 rw-p 00000000 00:00 0 
7f1e2b000000-7f1e2b001000 rw-s 00000000 00:01 7                          /SYSV0000abcd (deleted)
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0                          [stack]
7ffd1a1f0000-7ffd1a1f2000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn parses_maps_and_classifies_backings() {
        let m = parse_maps(MAPS, "test").expect("parses");
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(m[2].path, None);
        let kinds: Vec<&str> = m.iter().map(|e| e.to_vma(0).backing.kind()).collect();
        assert_eq!(kinds, ["file", "heap", "anon", "shm", "stack", "special"]);
        assert_eq!(m[3].to_vma(0).backing, Backing::Shm { key: 0xabcd });
    }

    #[test]
    fn rejects_garbage_with_line_number() {
        let err = parse_maps("zz-10 rw-p 0 0 0\n", "x").unwrap_err();
        assert!(err.to_string().contains("x:1"), "{err}");
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let mut text = String::from("42 (a) b) (c) S");
        for i in 4..=52 {
            text.push_str(&format!(" {}", if i == 9 { 0x0020_0000 } else { i }));
        }
        let s = parse_stat(&text, "t").expect("parses");
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_brk, 47);
        assert!(s.is_kernel_thread());
    }
}
