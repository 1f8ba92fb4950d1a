//! Names for the numeric arguments of memory syscalls (`PROT_*`, `MAP_*`, `MADV_*`, ...) and
//! human sizes.

fn join(value: u64, names: &[(u64, &str)], zero: &str) -> String {
    if value == 0 {
        return zero.to_string();
    }
    let mut out = Vec::new();
    let mut rest = value;
    for &(bit, name) in names {
        if bit != 0 && value & bit == bit {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out.join("|")
}

/// `PROT_READ|PROT_WRITE`, ...
pub fn prot(v: u64) -> String {
    join(
        v,
        &[
            (1, "PROT_READ"),
            (2, "PROT_WRITE"),
            (4, "PROT_EXEC"),
            (0x0100_0000, "PROT_GROWSDOWN"),
            (0x0200_0000, "PROT_GROWSUP"),
        ],
        "PROT_NONE",
    )
}

/// `MAP_PRIVATE|MAP_ANONYMOUS`, ...
pub fn map(v: u64) -> String {
    let kind = match v & 0x0f {
        0x01 => "MAP_SHARED",
        0x02 => "MAP_PRIVATE",
        0x03 => "MAP_SHARED_VALIDATE",
        _ => "",
    };
    let rest = join(
        v & !0x0f,
        &[
            (0x10, "MAP_FIXED"),
            (0x20, "MAP_ANONYMOUS"),
            (0x100, "MAP_GROWSDOWN"),
            (0x800, "MAP_DENYWRITE"),
            (0x1000, "MAP_EXECUTABLE"),
            (0x2000, "MAP_LOCKED"),
            (0x4000, "MAP_NORESERVE"),
            (0x8000, "MAP_POPULATE"),
            (0x10000, "MAP_NONBLOCK"),
            (0x20000, "MAP_STACK"),
            (0x40000, "MAP_HUGETLB"),
            (0x80000, "MAP_SYNC"),
            (0x100000, "MAP_FIXED_NOREPLACE"),
            (0x4000000, "MAP_UNINITIALIZED"),
        ],
        "",
    );
    match (kind.is_empty(), rest.is_empty()) {
        (true, true) => format!("{v:#x}"),
        (false, true) => kind.to_string(),
        (true, false) => rest,
        (false, false) => format!("{kind}|{rest}"),
    }
}

/// `MREMAP_MAYMOVE|MREMAP_FIXED`, ...
pub fn mremap(v: u64) -> String {
    join(
        v,
        &[
            (1, "MREMAP_MAYMOVE"),
            (2, "MREMAP_FIXED"),
            (4, "MREMAP_DONTUNMAP"),
        ],
        "0",
    )
}

/// `MCL_CURRENT|MCL_FUTURE`, ...
pub fn mlockall(v: u64) -> String {
    join(
        v,
        &[(1, "MCL_CURRENT"), (2, "MCL_FUTURE"), (4, "MCL_ONFAULT")],
        "0",
    )
}

/// `MADV_DONTNEED`, ...
pub fn madvise(v: u64) -> String {
    let name = match v {
        0 => "MADV_NORMAL",
        1 => "MADV_RANDOM",
        2 => "MADV_SEQUENTIAL",
        3 => "MADV_WILLNEED",
        4 => "MADV_DONTNEED",
        8 => "MADV_FREE",
        9 => "MADV_REMOVE",
        10 => "MADV_DONTFORK",
        11 => "MADV_DOFORK",
        12 => "MADV_MERGEABLE",
        13 => "MADV_UNMERGEABLE",
        14 => "MADV_HUGEPAGE",
        15 => "MADV_NOHUGEPAGE",
        16 => "MADV_DONTDUMP",
        17 => "MADV_DODUMP",
        18 => "MADV_WIPEONFORK",
        19 => "MADV_KEEPONFORK",
        20 => "MADV_COLD",
        21 => "MADV_PAGEOUT",
        22 => "MADV_POPULATE_READ",
        23 => "MADV_POPULATE_WRITE",
        24 => "MADV_DONTNEED_LOCKED",
        25 => "MADV_COLLAPSE",
        100 => "MADV_HWPOISON",
        _ => return format!("{v}"),
    };
    name.to_string()
}

/// The name of an errno value (`ENOMEM`), or its number.
pub fn errno(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ESRCH => "ESRCH",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// `4 KiB`, `2 MiB`, `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_flags() {
        assert_eq!(prot(3), "PROT_READ|PROT_WRITE");
        assert_eq!(prot(0), "PROT_NONE");
        assert_eq!(map(0x22), "MAP_PRIVATE|MAP_ANONYMOUS");
        assert_eq!(map(0x32), "MAP_PRIVATE|MAP_FIXED|MAP_ANONYMOUS");
        assert_eq!(madvise(4), "MADV_DONTNEED");
        assert_eq!(size(65536), "64 KiB");
        assert_eq!(size(3 << 19), "1.5 MiB");
        assert_eq!(errno(libc::ENOMEM), "ENOMEM");
    }
}
