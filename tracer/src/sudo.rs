//! Who ran vmatrace through `sudo`: the user a launched command runs as and the owner of the
//! files vmatrace writes. Decided here once, from what sudo sets: `SUDO_USER` names the user
//! (and their passwd entry gives the uid, group and home); `SUDO_UID`, when set, must agree.
//! `SUDO_UID` without `SUDO_USER` is not something sudo produces, so it is not trusted: the
//! command then runs as root, with a warning.

use std::{ffi::CString, sync::Once};

/// The user who ran `sudo vmatrace`, from the passwd database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: Vec<u8>,
}

/// Looks `name` up in the passwd database.
pub fn lookup(name: &str) -> Option<User> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or NULL; everything is copied
    // out at once.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            return None;
        }
        let home = if (*pw).pw_dir.is_null() {
            b"/".to_vec()
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_dir).to_bytes().to_vec()
        };
        Some(User {
            name: name.to_string(),
            uid: (*pw).pw_uid,
            gid: (*pw).pw_gid,
            home,
        })
    }
}

static DISTRUST: Once = Once::new();

fn distrust(why: &str) {
    DISTRUST.call_once(|| log::warn!("{why}; not trusted: acting as root"));
}

/// The invoking user when vmatrace runs as root under sudo (None when not root, when sudo
/// was run by root, or when the variables do not hold together).
pub fn invoker() -> Option<User> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(name) = env("SUDO_USER") else {
        if env("SUDO_UID").is_some() {
            distrust("SUDO_UID is set without SUDO_USER");
        }
        return None;
    };
    if name == "root" {
        return None;
    }
    let Some(user) = lookup(&name) else {
        distrust(&format!("SUDO_USER={name} is not a known user"));
        return None;
    };
    if let Some(uid) = env("SUDO_UID")
        && uid.parse::<u32>().ok() != Some(user.uid)
    {
        distrust(&format!(
            "SUDO_UID={uid} is not the uid of SUDO_USER={name} ({})",
            user.uid
        ));
        return None;
    }
    Some(user)
}
