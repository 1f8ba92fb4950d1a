//! Launch mode: fork a child that waits, before exec, until the daemon has put it in the
//! kernel filter, so that the dynamic loader's own mappings are traced too.
//!
//! The command is not vmatrace's child but its guardian's: a small process forked first, in a
//! process group of its own, that forks the command into vmatrace's process group (the
//! terminal's, so it reads the terminal and gets Ctrl-C as before) and waits for it. The
//! kernel stops the command at each exec until the daemon has read its new map; if vmatrace
//! dies meanwhile (killed, a write error, SIGPIPE), the guardian continues the command (it
//! knows the stop was vmatrace's from the `EXEC_STOPS` map), and since the command's parent
//! is the guardian, in another process group of the same session, the command's group does
//! not become orphaned, which would have sent the stopped command SIGHUP. The guardian hands
//! the command's exit status to vmatrace through a pipe.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    path::{Path, PathBuf},
};

/// Errors launching the command.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("no command given")]
    Empty,
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("no such user: {0}")]
    NoUser(String),
    #[error("cannot start {cmd}")]
    Exec { cmd: String, source: io::Error },
    #[error("{what}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
}

/// The user and groups the command runs as, and the environment entries that name that user
/// (`HOME`, `USER`, `LOGNAME`, as `sudo -u USER -i` sets them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub env: Vec<(&'static str, Vec<u8>)>,
}
/// A forked child that waits for [`HeldChild::release`] before it execs.
#[derive(Debug)]
pub struct HeldChild {
    /// The command.
    pub pid: u32,
    release_fd: i32,
    error_fd: i32,
    guardian: Guardian,
    cmd: String,
}

/// The command's guardian, as seen from vmatrace: its pid and the pipe it reports the
/// command's exit status on.
#[derive(Debug)]
pub struct Guardian {
    pid: u32,
    status_fd: i32,
    /// Held open for the guardian's whole life: its end of this pipe sees EOF when vmatrace
    /// is gone.
    _life_fd: i32,
}

fn os(what: &'static str) -> LaunchError {
    LaunchError::Os {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Looks a command up in `PATH` like `execvp` would, in the parent (before fork).
fn resolve(cmd: &OsStr) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if cmd.as_bytes().contains(&b'/') {
        return p.exists().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(cmd))
        .find(|c| {
            use std::os::unix::fs::PermissionsExt;
            c.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The supplementary groups of `user` (as `initgroups` would set them), with `gid` first.
fn groups_of(user: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(user) else {
        return vec![gid];
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: buffer and length agree; on -1, n is set to the count needed.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            break;
        }
        if n as usize <= groups.len() || groups.len() >= 1 << 16 {
            groups = vec![gid];
            break;
        }
        groups.resize(n as usize, 0);
    }
    groups
}

/// The user to run as: `--user`, else the user who ran `sudo` ([`crate::sudo::invoker`]),
/// else nobody in particular (stay as we are).
pub fn credentials(user: Option<&str>) -> Result<Option<Credentials>, LaunchError> {
    let found = match user {
        Some(name) => match crate::sudo::lookup(name) {
            Some(u) => u,
            // A numeric uid is accepted too (no passwd entry: no groups, home /).
            None => match name.parse::<u32>() {
                Ok(uid) => crate::sudo::User {
                    name: name.to_string(),
                    uid,
                    gid: uid,
                    home: b"/".to_vec(),
                },
                Err(_) => return Err(LaunchError::NoUser(name.to_string())),
            },
        },
        None => match crate::sudo::invoker() {
            Some(u) => u,
            None => return Ok(None),
        },
    };
    let groups = groups_of(&found.name, found.gid);
    Ok(Some(Credentials {
        uid: found.uid,
        gid: found.gid,
        groups,
        env: vec![
            ("HOME", found.home),
            ("USER", found.name.as_bytes().to_vec()),
            ("LOGNAME", found.name.into_bytes()),
        ],
    }))
}

/// vmatrace's environment for the command, with `creds`' entries in place of its own.
fn environment(creds: Option<&Credentials>) -> Vec<CString> {
    let set: &[(&str, Vec<u8>)] = creds.map_or(&[], |c| &c.env);
    let mut out: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !set.iter().any(|(name, _)| k.as_bytes() == name.as_bytes()))
        .filter_map(|(k, v)| {
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            CString::new(entry).ok()
        })
        .collect();
    for (name, value) in set {
        let mut entry = name.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value);
        if let Ok(c) = CString::new(entry) {
            out.push(c);
        }
    }
    out
}

/// `bpf(2)` commands and attribute, for the guardian's two map operations (it must not use
/// aya's objects: it closes every descriptor but this map's).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Whether `pid` is stopped at an exec, waiting for vmatrace (it has an `EXEC_STOPS` entry);
/// the entry is removed.
fn take_exec_stop(map_fd: i32, pid: u32) -> bool {
    let mut value = 0u64;
    let key = pid;
    let attr = MapElemAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &mut value as *mut u64 as u64,
        flags: 0,
    };
    let size = size_of::<MapElemAttr>();
    // SAFETY: bpf(2) with a valid attribute pointing at live key and value buffers.
    let found = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, &attr, size) } == 0;
    if found {
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_ELEM, &attr, size) };
    }
    found
}

/// Forks the guardian, which forks `argv` held before exec. Call [`HeldChild::release`] once
/// the command is traced. `exec_stops` is the probe's `EXEC_STOPS` map.
pub fn spawn_held(
    argv: &[OsString],
    creds: Option<&Credentials>,
    exec_stops: OwnedFd,
) -> Result<HeldChild, LaunchError> {
    let first = argv.first().ok_or(LaunchError::Empty)?;
    let cmd = first.to_string_lossy().into_owned();
    let path = resolve(first).ok_or_else(|| LaunchError::NotFound(cmd.clone()))?;
    let to_c =
        |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| LaunchError::NotFound(cmd.clone()));
    let c_path = to_c(path.as_os_str())?;
    let c_args: Vec<CString> = argv.iter().map(|a| to_c(a)).collect::<Result<_, _>>()?;
    let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    c_argv.push(std::ptr::null());
    // Built before fork: the child may only make async-signal-safe calls.
    let c_env = environment(creds);
    let mut c_envp: Vec<*const libc::c_char> = c_env.iter().map(|e| e.as_ptr()).collect();
    c_envp.push(std::ptr::null());

    let pipe = || {
        let mut fds = [0i32; 2];
        // SAFETY: an array of two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os("pipe"));
        }
        Ok(fds)
    };
    let (hold, err, status, life) = (pipe()?, pipe()?, pipe()?, pipe()?);
    // SAFETY: getpgrp has no preconditions.
    let group = unsafe { libc::getpgrp() };
    let map_fd = exec_stops.as_raw_fd();
    // SAFETY: the children only call async-signal-safe functions on memory prepared above.
    let guardian = unsafe { libc::fork() };
    if guardian < 0 {
        return Err(os("fork"));
    }
    if guardian == 0 {
        // SAFETY: the guardian's side of fork.
        unsafe {
            guard(
                hold, err, status, life, group, map_fd, creds, &c_path, &c_argv, &c_envp,
            )
        }
    }
    drop(exec_stops);
    // SAFETY: closing the guardian's and the command's ends in vmatrace.
    unsafe {
        libc::close(hold[0]);
        libc::close(err[1]);
        libc::close(status[1]);
        libc::close(life[0]);
    }
    let guardian = Guardian {
        pid: guardian as u32,
        status_fd: status[0],
        _life_fd: life[1],
    };
    // The guardian's first word: the command's pid.
    let mut pid = 0i32;
    // SAFETY: reading 4 bytes into an i32.
    let n = unsafe { libc::read(guardian.status_fd, (&mut pid as *mut i32).cast(), 4) };
    if n != 4 || pid <= 0 {
        return Err(LaunchError::Os {
            what: "starting the command's guardian",
            source: io::Error::other("it did not report the command's pid"),
        });
    }
    Ok(HeldChild {
        pid: pid as u32,
        release_fd: hold[1],
        error_fd: err[0],
        guardian,
        cmd,
    })
}

/// The guardian: forks the command, then waits for it and for vmatrace's end. Never returns.
///
/// # Safety
/// Called in a freshly forked child of a single-threaded vmatrace (before the runtime starts).
#[allow(clippy::too_many_arguments)]
unsafe fn guard(
    hold: [i32; 2],
    err: [i32; 2],
    status: [i32; 2],
    life: [i32; 2],
    group: libc::pid_t,
    map_fd: i32,
    creds: Option<&Credentials>,
    c_path: &CString,
    c_argv: &[*const libc::c_char],
    c_envp: &[*const libc::c_char],
) -> ! {
    // SAFETY: async-signal-safe calls only, on descriptors and memory prepared by the caller.
    unsafe {
        // Its own process group (same session): the command's parent is then outside the
        // command's group, which therefore never becomes orphaned while the guardian lives.
        libc::setpgid(0, 0);
        let cmd = libc::fork();
        if cmd < 0 {
            libc::_exit(127);
        }
        if cmd == 0 {
            // The command: in vmatrace's process group (the terminal's foreground one).
            libc::setpgid(0, group);
            libc::close(hold[1]);
            libc::close(err[0]);
            libc::close(status[0]);
            libc::close(status[1]);
            libc::close(life[0]);
            libc::close(life[1]);
            libc::close(map_fd);
            let mut byte = 0u8;
            let n = libc::read(hold[0], (&mut byte as *mut u8).cast(), 1);
            if n != 1 {
                libc::_exit(127); // the daemon went away before releasing us
            }
            if let Some(c) = creds
                && (libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    || libc::setgid(c.gid) != 0
                    || libc::setuid(c.uid) != 0)
            {
                report_and_exit(err[1]);
            }
            // vmatrace blocks its signals until its handlers are in place: not the command.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::execve(c_path.as_ptr(), c_argv.as_ptr(), c_envp.as_ptr());
            report_and_exit(err[1]);
        }
        libc::setpgid(cmd, group);
        libc::write(status[1], (&cmd as *const i32).cast(), 4);
        // Nothing of vmatrace's terminal or pipes either.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        // Keep only the status pipe, vmatrace's life pipe and the map, at 3, 4 and 5: no
        // descriptor of vmatrace's programs may outlive vmatrace here. Copied first to free
        // descriptors above 5 (`F_DUPFD` never replaces one: with many programs loaded, the
        // map's own number may be any), then into place.
        let mut kept = [status[1], life[0], map_fd];
        for fd in &mut kept {
            *fd = libc::fcntl(*fd, libc::F_DUPFD, 6);
        }
        for (to, from) in [3, 4, 5].into_iter().zip(kept) {
            libc::dup2(from, to);
        }
        libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32);
        let (status_fd, life_fd, map_fd) = (3, 4, 5);
        let mut wstatus = 0;
        let mut vmatrace_gone = false;
        loop {
            let mut pfd = libc::pollfd {
                fd: life_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = if vmatrace_gone { -1 } else { 100 };
            if !vmatrace_gone && libc::poll(&mut pfd, 1, timeout) > 0 {
                // EOF: vmatrace is gone. A command it stopped at exec is continued.
                vmatrace_gone = true;
                if take_exec_stop(map_fd, cmd as u32) {
                    libc::kill(cmd, libc::SIGCONT);
                }
                libc::close(map_fd);
            }
            let flags = if vmatrace_gone { 0 } else { libc::WNOHANG };
            let rc = libc::waitpid(cmd, &mut wstatus, flags);
            if rc == cmd {
                break;
            }
            if rc < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
        let code = exit_code(wstatus);
        libc::write(status_fd, (&code as *const i32).cast(), 4);
        libc::_exit(0)
    }
}

/// The exit status the shell would show for a `waitpid` status (128+N for signal N).
fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Writes errno to the error pipe and exits (child side).
unsafe fn report_and_exit(fd: i32) -> ! {
    // SAFETY: async-signal-safe calls on a valid fd.
    unsafe {
        let e = *libc::__errno_location();
        libc::write(fd, (&e as *const i32).cast(), 4);
        libc::_exit(127)
    }
}

impl HeldChild {
    /// Lets the child exec; returns its guardian, or an error if the exec failed.
    pub fn release(self) -> Result<Guardian, LaunchError> {
        let byte = 1u8;
        // SAFETY: valid fds owned by self, closed here.
        unsafe {
            libc::write(self.release_fd, (&byte as *const u8).cast(), 1);
            libc::close(self.release_fd);
            let mut errno = 0i32;
            let n = libc::read(self.error_fd, (&mut errno as *mut i32).cast(), 4);
            libc::close(self.error_fd);
            if n == 4 {
                self.guardian.wait_exit_code();
                return Err(LaunchError::Exec {
                    cmd: self.cmd,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
        Ok(self.guardian)
    }
}

impl Guardian {
    /// Waits for the command to end (the guardian reports it) and returns the exit status
    /// the shell would show (128+N for signal N); 1 when the guardian died first.
    pub fn wait_exit_code(&self) -> i32 {
        let mut code = 0i32;
        let n = loop {
            // SAFETY: reading 4 bytes into an i32 from our end of the status pipe.
            let n = unsafe { libc::read(self.status_fd, (&mut code as *mut i32).cast(), 4) };
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        let mut status = 0;
        // SAFETY: reaping our own child, the guardian.
        unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        if n == 4 {
            code
        } else {
            log::warn!("the command's guardian ended early: its exit status is unknown");
            1
        }
    }
}

/// How a launched command is ended when `--duration` is over, in every subcommand: SIGTERM
/// first; SIGKILL if it is still there [`Ending::KILL_AFTER`] later; the run goes on meanwhile,
/// so that the command's end is traced, and stops [`Ending::GIVE_UP_AFTER`] after the
/// SIGTERM whatever happens. (An attached process is not the run's to end: it is left
/// running, no longer traced.)
#[derive(Debug)]
pub struct Ending {
    pid: u32,
    since: std::time::Instant,
    killed: bool,
}

impl Ending {
    pub const KILL_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
    pub const GIVE_UP_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

    /// Sends the command SIGTERM.
    pub fn start(pid: u32) -> Self {
        // SAFETY: signalling the command vmatrace launched, still running as far as vmatrace
        // knows (its guardian reports its end as soon as it has reaped it; only a pid reused
        // within that moment could be hit).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        Self {
            pid,
            since: std::time::Instant::now(),
            killed: false,
        }
    }

    /// Called on each tick while the command runs: SIGKILL when it is time; true once the run
    /// should stop without waiting any longer.
    pub fn step(&mut self) -> bool {
        let waited = self.since.elapsed();
        if waited >= Self::KILL_AFTER && !self.killed {
            self.killed = true;
            // SAFETY: as in `start`.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        waited >= Self::GIVE_UP_AFTER
    }
}
