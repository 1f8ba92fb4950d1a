//! Reading `/proc`: the maps a trace is seeded from, the heap start, per-VMA RSS, process
//! state, and the small look-ups that name what a syscall referred to.

use std::{fs, io, path::PathBuf, sync::Arc};

use tracer_common::layout::PidNamespace;

use crate::model::{Backing, ForkAdvice, Perms, ThpAdvice, ThpPolicy, Vma};

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
    /// Huge-page advice (`hg`/`nh` in smaps `VmFlags`; maps does not show it).
    pub thp: ThpAdvice,
    /// Fork advice (`dc`/`wf` in smaps `VmFlags`).
    pub fork: ForkAdvice,
    /// smaps shows anonymous memory in the VMA (so the kernel gave it an `anon_vma`).
    pub anon_vma: bool,
}

/// The bytes of `/proc/PID/NAME`: never text, since the names in it (a process's `comm`, the
/// paths of mapped files) are whatever bytes the process chose.
fn read(pid: u32, name: &str) -> Result<Vec<u8>, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::InvalidInput => ProcError::NoProcess(pid),
        _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::NoProcess(pid),
        _ => ProcError::Io { path, source },
    })
}

/// The lines of a `/proc` file's bytes.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b'\n')
}

/// The first whitespace-separated token of a line.
fn first_token(line: &[u8]) -> Option<&[u8]> {
    line.split(u8::is_ascii_whitespace).find(|t| !t.is_empty())
}

/// A path as maps shows it, in vmatrace's text form ([`crate::name`]). maps writes a newline
/// in a name as `\012` (and nothing else escaped); it is turned back into the newline, so that
/// a name from maps equals the same name read from a link.
fn maps_path(raw: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i..].starts_with(b"\\012") {
            bytes.push(b'\n');
            i += 4;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    crate::name::from_bytes(&bytes)
}

/// Parses the bytes of a maps file (`origin` names it in errors).
pub fn parse_maps(text: impl AsRef<[u8]>, origin: &str) -> Result<Vec<MapsEntry>, ProcError> {
    let mut out = Vec::new();
    for (i, line) in lines(text.as_ref()).enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push(parse_maps_line(line).map_err(|what| ProcError::Parse {
            path: origin.to_string(),
            line: i + 1,
            what,
        })?);
    }
    Ok(out)
}

/// One line of maps (or a VMA header line of smaps); the error names the bad column.
fn parse_maps_line(line: &[u8]) -> Result<MapsEntry, &'static str> {
    let mut it = line.splitn(6, |&b| b == b' ');
    // The five columns before the path are ASCII; the path is any bytes.
    let mut column = |what| {
        it.next()
            .and_then(|c| std::str::from_utf8(c).ok())
            .ok_or(what)
    };
    let range = column("range")?;
    let perms = column("perms")?;
    let offset = column("offset")?;
    let dev = column("dev")?;
    let inode = column("inode")?;
    let (s, e) = range.split_once('-').ok_or("range")?;
    let start = u64::from_str_radix(s, 16).map_err(|_| "start")?;
    let end = u64::from_str_radix(e, 16).map_err(|_| "end")?;
    if end < start {
        return Err("range");
    }
    let perms = Perms::parse(perms).ok_or("perms")?;
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "offset")?;
    let inode = inode.parse().map_err(|_| "inode")?;
    let path = it
        .next()
        .map(|p| p.trim_ascii_start())
        .filter(|p| !p.is_empty())
        .map(maps_path);
    Ok(MapsEntry {
        start,
        end,
        perms,
        offset,
        dev: dev.to_string(),
        inode,
        path,
        thp: ThpAdvice::Default,
        fork: ForkAdvice::default(),
        anon_vma: false,
    })
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
                shmid: self.inode,
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
            offset: if matches!(backing, Backing::File { .. } | Backing::Shm { .. }) {
                self.offset
            } else {
                0
            },
            backing,
            created_ns,
            thp: self.thp,
            fork: self.fork,
            anon_vma: self.anon_vma,
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

/// Parses the bytes of `/proc/PID/stat`.
pub fn parse_stat(text: impl AsRef<[u8]>, origin: &str) -> Result<Stat, ProcError> {
    let err = |what| ProcError::Parse {
        path: origin.to_string(),
        line: 1,
        what,
    };
    // The command name may hold any bytes, spaces and parentheses included: fields start
    // after the last ')', and only they need to be text.
    let text = text.as_ref();
    let close = text.iter().rposition(|&b| b == b')').ok_or(err("comm"))?;
    let rest = std::str::from_utf8(&text[close + 1..]).map_err(|_| err("fields"))?;
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

/// One VMA of `/proc/PID/smaps`: its maps line and resident memory, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmapsEntry {
    pub map: MapsEntry,
    pub rss: u64,
    pub anonymous: u64,
    /// Anonymous memory in PMD-sized transparent huge pages (`AnonHugePages`).
    pub anon_huge: u64,
    /// Anonymous memory freed with `MADV_FREE`, not yet reclaimed (`LazyFree`).
    pub lazyfree: u64,
}

/// `/proc/PID/smaps`.
pub fn read_smaps(pid: u32) -> Result<Vec<SmapsEntry>, ProcError> {
    parse_smaps(&read(pid, "smaps")?, &format!("/proc/{pid}/smaps"))
}

/// Parses the bytes of an smaps file: a maps line per VMA, then `Key: value` lines.
pub fn parse_smaps(text: impl AsRef<[u8]>, origin: &str) -> Result<Vec<SmapsEntry>, ProcError> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for (i, bytes) in lines(text.as_ref()).enumerate() {
        let err = |what| ProcError::Parse {
            path: origin.to_string(),
            line: i + 1,
            what,
        };
        let Some(key) = first_token(bytes) else {
            continue;
        };
        if !key.ends_with(b":") {
            let map = parse_maps_line(bytes).map_err(err)?;
            out.push(SmapsEntry {
                map,
                rss: 0,
                anonymous: 0,
                anon_huge: 0,
                lazyfree: 0,
            });
            continue;
        }
        let Some(last) = out.last_mut() else {
            return Err(err("a field before any VMA"));
        };
        // Field lines are ASCII (only the VMA lines carry names).
        let line = std::str::from_utf8(bytes).map_err(|_| err("field"))?;
        let key = line.split_whitespace().next().unwrap_or_default();
        let kb = || -> Result<u64, ProcError> {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .and_then(|v| v.checked_mul(1024))
                .ok_or(err("size"))
        };
        match key {
            "Rss:" => last.rss = kb()?,
            "Anonymous:" => {
                last.anonymous = kb()?;
                last.map.anon_vma = last.anonymous > 0;
            }
            "AnonHugePages:" => last.anon_huge = kb()?,
            "LazyFree:" => last.lazyfree = kb()?,
            "VmFlags:" => {
                for flag in line.split_whitespace().skip(1) {
                    match flag {
                        "hg" => last.map.thp = ThpAdvice::Huge,
                        "nh" => last.map.thp = ThpAdvice::NoHuge,
                        "dc" => last.map.fork.dont_copy = true,
                        "wf" => last.map.fork.wipe = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

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
fn parse_release(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

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

/// This machine's `vm.max_map_count`.
pub fn max_map_count() -> Option<u64> {
    fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether an ELF header (the first bytes of a program) is of a 32-bit program.
pub fn elf_is_32bit(header: &[u8]) -> bool {
    // e_ident: the magic, then EI_CLASS (1: ELFCLASS32, 2: ELFCLASS64).
    header.len() >= 5 && header[..4] == *b"\x7fELF" && header[4] == 1
}

/// Whether `pid` runs a 32-bit program (its syscalls are compat ones). False when unknown.
pub fn runs_32bit_program(pid: u32) -> bool {
    use std::io::Read;
    let mut header = [0u8; 5];
    std::fs::File::open(format!("/proc/{pid}/exe"))
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| elf_is_32bit(&header))
}

/// The name (`comm`) of `pid`, in vmatrace's text form ([`crate::name`]).
pub fn comm(pid: u32) -> Option<String> {
    let bytes = read(pid, "comm").ok()?;
    Some(crate::name::from_bytes(
        bytes.strip_suffix(b"\n").unwrap_or(&bytes),
    ))
}

/// The cgroup v2 path of `pid` (the `0::PATH` line of `/proc/PID/cgroup`); None on a host
/// with cgroup v1 only, or when the process is gone.
pub fn cgroup(pid: u32) -> Option<String> {
    let bytes = read(pid, "cgroup").ok()?;
    lines(&bytes)
        .find_map(|l| l.strip_prefix(b"0::"))
        .map(crate::name::from_bytes)
}

/// Resident bytes of `pid` (`/proc/PID/statm`'s second field, in pages).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let bytes = read(pid, "statm").ok()?;
    let pages: u64 = std::str::from_utf8(&bytes)
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
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
        assert!(matches!(
            m[3].to_vma(0).backing,
            Backing::Shm { key: 0xabcd, .. }
        ));
    }

    #[test]
    fn names_in_proc_files_are_bytes() {
        // A path with invalid UTF-8 and a newline (which maps writes as `\012`), and a comm
        // with invalid UTF-8 and a parenthesis.
        let maps: &[u8] =
            b"7f0000000000-7f0000004000 r--p 00001000 fe:01 99     /tmp/\xff\xfe\\012x\x1b[2J\n";
        let m = parse_maps(maps, "t").expect("parses");
        let path = m[0].path.as_deref().expect("a path");
        assert_eq!(crate::name::to_bytes(path), b"/tmp/\xff\xfe\nx\x1b[2J");
        assert_eq!((m[0].offset, m[0].inode), (0x1000, 99));
        let mut smaps = maps.to_vec();
        smaps.extend_from_slice(b"Rss:                  16 kB\nVmFlags: rd mr hg\n");
        let s = parse_smaps(&smaps, "t").expect("parses");
        assert_eq!((s[0].rss, s[0].map.thp), (16384, ThpAdvice::Huge));
        assert_eq!(s[0].map.path, m[0].path);
        let mut stat = b"42 (\xff\xfe) \x1b) S".to_vec();
        for i in 4..=52 {
            stat.extend_from_slice(format!(" {i}").as_bytes());
        }
        assert_eq!(parse_stat(&stat, "t").expect("parses").start_brk, 47);
        // Fields after the name must still be text.
        assert!(parse_stat(b"42 (a) S \xff 5", "t").is_err());
    }

    #[test]
    fn rejects_garbage_with_line_number() {
        let err = parse_maps("zz-10 rw-p 0 0 0\n", "x").unwrap_err();
        assert!(err.to_string().contains("x:1"), "{err}");
        // A size in kB that overflows in bytes (found by the parse_maps fuzz target).
        let err =
            parse_smaps("1000-2000 rw-p 0 00:00 0\nRss: 18446744073709551 kB\n", "s").unwrap_err();
        assert!(err.to_string().contains("s:2"), "{err}");
    }

    #[test]
    fn tells_32_bit_programs_apart() {
        assert!(elf_is_32bit(b"\x7fELF\x01\x01\x01"));
        assert!(!elf_is_32bit(b"\x7fELF\x02\x01\x01"));
        assert!(!elf_is_32bit(b"#!/bin/sh"));
        assert!(!elf_is_32bit(b"\x7fEL"));
        // This test binary is a 64-bit program.
        assert!(!runs_32bit_program(std::process::id()));
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
