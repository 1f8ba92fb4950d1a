//! One VMA: a range of addresses with permissions and a backing.

use std::{fmt, sync::Arc};

/// The size of a page, in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Rounds `v` up to a page boundary (saturating at the top of the address space).
pub fn page_align_up(v: u64) -> u64 {
    v.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Rounds `v` down to a page boundary.
pub fn page_align_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

/// Access permissions and sharing, as the four characters of `/proc/PID/maps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
}

impl Perms {
    /// From `PROT_*` bits and whether the mapping is `MAP_SHARED`.
    pub fn from_prot(prot: u64, shared: bool) -> Self {
        Self {
            read: prot & 1 != 0,
            write: prot & 2 != 0,
            exec: prot & 4 != 0,
            shared,
        }
    }

    /// Parses `rw-p` and the like.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 4 {
            return None;
        }
        let flag = |i: usize, c: u8| match b[i] {
            x if x == c => Some(true),
            b'-' => Some(false),
            _ => None,
        };
        Some(Self {
            read: flag(0, b'r')?,
            write: flag(1, b'w')?,
            exec: flag(2, b'x')?,
            shared: match b[3] {
                b's' => true,
                b'p' => false,
                _ => return None,
            },
        })
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// What a VMA maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Anonymous memory (private, or shared: `/dev/zero (deleted)` in maps).
    Anonymous,
    /// A file, by path, with the device and inode when known.
    File { path: Arc<str>, inode: u64 },
    /// The main heap grown by `brk`.
    Heap,
    /// The main thread's stack, which grows down on faults.
    Stack,
    /// A System V shared memory segment (`shmat`): its key and id (the inode column of
    /// `/proc/PID/maps`). The VMA's `offset` is its offset in the segment, so `start - offset`
    /// is where the segment was attached: the attach is its identity (the kernel never merges
    /// two attaches, even of one segment side by side, and `shmdt` detaches one).
    Shm { key: u64, shmid: u64 },
    /// A kernel-provided mapping such as `[vdso]` or `[vvar]`.
    Special(Arc<str>),
}

impl Backing {
    /// A short name for the kind of backing, as used in NDJSON (`kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Anonymous => "anon",
            Self::File { .. } => "file",
            Self::Heap => "heap",
            Self::Stack => "stack",
            Self::Shm { .. } => "shm",
            Self::Special(_) => "special",
        }
    }

    /// The path column of `/proc/PID/maps` (None when it is empty).
    pub fn path(&self, shared: bool) -> Option<String> {
        match self {
            Self::Anonymous if shared => Some("/dev/zero (deleted)".to_string()),
            Self::Anonymous => None,
            Self::File { path, .. } => Some(path.to_string()),
            Self::Heap => Some("[heap]".to_string()),
            Self::Stack => Some("[stack]".to_string()),
            Self::Shm { key, .. } => Some(format!("/SYSV{key:08x} (deleted)")),
            Self::Special(name) => Some(name.to_string()),
        }
    }

    /// Whether two VMAs map the same object, as the kernel's merge rule asks: the same file
    /// (by inode where known: a path may be spelled two ways, `/lib/...` through a symlink or
    /// `/usr/lib/...` from `/proc`), else equal backings.
    pub fn same_object(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::File { inode: a, .. }, Self::File { inode: b, .. }) if *a != 0 && *b != 0 => {
                a == b
            }
            _ => self == other,
        }
    }

    /// Whether the VMA's private pages are anonymous memory once touched.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Self::Anonymous | Self::Heap | Self::Stack)
    }
}

/// What `fork` does with a VMA: `madvise(MADV_DONTFORK)` leaves it out of the child,
/// `MADV_WIPEONFORK` gives the child the range empty (fresh zero-filled memory). The kernel
/// keeps these as VMA flags, so they split VMAs as `mprotect` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ForkAdvice {
    pub dont_copy: bool,
    pub wipe: bool,
}

/// A virtual memory area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    /// File offset of `start` (0 for anonymous memory).
    pub offset: u64,
    pub backing: Backing,
    /// When the range was first reserved (0: before tracing started).
    pub created_ns: u64,
    /// Huge-page advice (`MADV_HUGEPAGE`/`MADV_NOHUGEPAGE`); the kernel splits VMAs on it.
    pub thp: ThpAdvice,
    /// `fork` advice.
    pub fork: ForkAdvice,
    /// The VMA has had private anonymous pages (the kernel then gives it an `anon_vma`):
    /// `fork` copies the page tables of such VMAs only; the child touches the others' pages
    /// anew.
    pub anon_vma: bool,
}

impl Vma {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the VMA is empty (never true of a VMA in an address space).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The part of this VMA in `[start, end)`, with the file offset moved along.
    pub fn slice(&self, start: u64, end: u64) -> Vma {
        let start = start.max(self.start);
        let end = end.min(self.end);
        let mut v = self.clone();
        if matches!(v.backing, Backing::File { .. } | Backing::Shm { .. }) {
            v.offset = self.offset + (start - self.start);
        }
        v.start = start;
        v.end = end;
        v
    }
}

/// A VMA's own huge-page advice (`madvise`, or `hg`/`nh` in `/proc/PID/smaps` `VmFlags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ThpAdvice {
    #[default]
    Default,
    /// `MADV_HUGEPAGE`.
    Huge,
    /// `MADV_NOHUGEPAGE`.
    NoHuge,
}

impl ThpAdvice {
    /// The name used in output (`None` for no advice).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::Huge => Some("huge"),
            Self::NoHuge => Some("nohuge"),
        }
    }

    /// Parses [`ThpAdvice::name`].
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("huge") => Self::Huge,
            Some("nohuge") => Self::NoHuge,
            _ => Self::Default,
        }
    }
}
