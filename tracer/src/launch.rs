//! Launch mode: fork a child that waits, before exec, until the daemon has put it in the
//! kernel filter, so that the dynamic loader's own mappings are traced too.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::unix::ffi::{OsStrExt, OsStringExt},
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
    #[error("cannot start {cmd}: {source}")]
    Exec { cmd: String, source: io::Error },
    #[error("{what}: {source}")]
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
    pub pid: u32,
    release_fd: i32,
    error_fd: i32,
    cmd: String,
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

/// Forks `argv` held before exec. Call [`HeldChild::release`] once it is traced.
pub fn spawn_held(
    argv: &[OsString],
    creds: Option<&Credentials>,
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

    let mut hold = [0i32; 2];
    let mut err = [0i32; 2];
    // SAFETY: arrays of two fds.
    if unsafe { libc::pipe2(hold.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe"));
    }
    // SAFETY: as above.
    if unsafe { libc::pipe2(err.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe"));
    }
    // SAFETY: the child only calls async-signal-safe functions on memory prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("fork"));
    }
    if pid == 0 {
        // SAFETY: child side of fork; async-signal-safe calls only, then exec or _exit.
        unsafe {
            libc::close(hold[1]);
            libc::close(err[0]);
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
            libc::execve(c_path.as_ptr(), c_argv.as_ptr(), c_envp.as_ptr());
            report_and_exit(err[1]);
        }
    }
    // SAFETY: closing the child's ends in the parent.
    unsafe {
        libc::close(hold[0]);
        libc::close(err[1]);
    }
    Ok(HeldChild {
        pid: pid as u32,
        release_fd: hold[1],
        error_fd: err[0],
        cmd,
    })
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
    /// Lets the child exec; returns an error if the exec failed.
    pub fn release(self) -> Result<u32, LaunchError> {
        let byte = 1u8;
        // SAFETY: valid fds owned by self, closed here.
        unsafe {
            libc::write(self.release_fd, (&byte as *const u8).cast(), 1);
            libc::close(self.release_fd);
            let mut errno = 0i32;
            let n = libc::read(self.error_fd, (&mut errno as *mut i32).cast(), 4);
            libc::close(self.error_fd);
            if n == 4 {
                let mut status = 0;
                libc::waitpid(self.pid as i32, &mut status, 0);
                return Err(LaunchError::Exec {
                    cmd: self.cmd,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
        Ok(self.pid)
    }
}

/// Waits for `pid` and returns the exit status the shell would show (128+N for signal N).
pub fn wait_exit_code(pid: u32) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        if rc == pid as i32 {
            break;
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}
