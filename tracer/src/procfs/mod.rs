//! Reading `/proc`: the maps a trace is seeded from (`maps`, `smaps`, parsed as bytes), the
//! heap start, per-VMA RSS, process state; the look-ups that name what a syscall referred to
//! (`lookup.rs`) and what holds for the whole system (`system.rs`).

mod lookup;
mod system;

pub use lookup::*;
pub use system::*;

use std::{fs, io, path::PathBuf, sync::Arc};

use crate::model::{Backing, ForkAdvice, Perms, ThpAdvice, ThpPolicy, Vma};

/// Errors reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with pid {0}")]
    NoProcess(u32),
    #[error("cannot read {path}")]
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

/// Whether every thread of `pid` is stopped (a group stop, a tracer's): its memory cannot
/// change while it is read. False when it cannot be told.
pub fn is_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let path = t.path().join("stat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        match parse_stat(&text, &path.to_string_lossy()) {
            Ok(s) if matches!(s.state, 'T' | 't') => any = true,
            Ok(s) if s.is_dead() => {}
            _ => return false,
        }
    }
    any
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
    /// Pages swapped out (`Swap`): touched, and in no frame now.
    pub swap: u64,
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
                swap: 0,
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
            "Swap:" => last.swap = kb()?,
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
    fn a_process_is_stopped_only_while_all_its_threads_are() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        assert!(!is_stopped(pid), "running (sleeping)");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_stopped(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(is_stopped(pid), "after SIGSTOP");
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!is_stopped(pid), "after SIGCONT");
        let _ = child.kill();
        let _ = child.wait();
        assert!(!is_stopped(pid), "gone");
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
