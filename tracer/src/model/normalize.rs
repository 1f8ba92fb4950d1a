//! A common form for comparing the model with `/proc/PID/maps`: adjacent ranges with the same
//! permissions and name merged (the kernel merges or splits VMAs for reasons a syscall trace
//! cannot see, such as anon_vma compatibility or `madvise` flags), anonymous names dropped.
//! The `[uprobes]` page is left out: the kernel maps it (for the instructions it steps out of
//! line) at a process's first hit of any uprobe, anyone's, without a syscall.

use std::fmt;

use super::{AddressSpace, vma::Perms};

/// One range of the normalised map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    /// The maps path column; `None` for anonymous memory.
    pub path: Option<String>,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}-{:x} {} {}",
            self.start,
            self.end,
            self.perms,
            self.path.as_deref().unwrap_or("")
        )
    }
}

/// The name a range is compared by: anonymous VMA names (`[anon:...]`) count as anonymous.
fn canonical_path(path: Option<&str>) -> Option<String> {
    match path {
        None | Some("") => None,
        Some(p) if p.starts_with("[anon:") || p.starts_with("[anon_shmem:") => None,
        Some(p) => Some(p.to_string()),
    }
}

/// Normalises `(start, end, perms, path)` ranges given in address order.
pub fn normalize<'a>(
    items: impl IntoIterator<Item = (u64, u64, Perms, Option<&'a str>)>,
) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for (start, end, perms, path) in items {
        if path == Some("[uprobes]") {
            continue;
        }
        let path = canonical_path(path);
        if let Some(last) = out.last_mut()
            && last.end == start
            && last.perms == perms
            && last.path == path
        {
            last.end = end;
            continue;
        }
        out.push(Range {
            start,
            end,
            perms,
            path,
        });
    }
    out
}

/// The model's map in normalised form.
pub fn model_ranges(space: &AddressSpace) -> Vec<Range> {
    let paths: Vec<(u64, u64, Perms, Option<String>)> = space
        .vmas()
        .map(|v| (v.start, v.end, v.perms, space.maps_path(v)))
        .collect();
    normalize(
        paths
            .iter()
            .map(|(s, e, p, path)| (*s, *e, *p, path.as_deref())),
    )
}

/// Lines present in one map and not the other, `-` for `expected` only, `+` for `actual` only.
pub fn diff(expected: &[Range], actual: &[Range]) -> Vec<String> {
    differences(expected, actual)
        .map(|(sign, r)| format!("{sign} {r}"))
        .collect()
}

/// The ranges of [`diff`] with their sign, `'-'` for `expected` only, `'+'` for `actual` only.
pub fn differences<'a>(
    expected: &'a [Range],
    actual: &'a [Range],
) -> impl Iterator<Item = (char, &'a Range)> {
    let only_expected = expected.iter().filter(|r| !actual.contains(r));
    let only_actual = actual.iter().filter(|r| !expected.contains(r));
    only_expected
        .map(|r| ('-', r))
        .chain(only_actual.map(|r| ('+', r)))
}
