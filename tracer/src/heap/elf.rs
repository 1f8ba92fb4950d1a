//! Which mapped files are allocators, and where their functions are: the ELF symbols (dynamic
//! and static) of a library or executable, turned into file offsets for uprobes.

use std::{collections::BTreeMap, path::Path};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

use super::call::{Allocator, HeapFn};

/// An allocator found in a file: its kind and its probed functions by file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorFile {
    pub allocator: Allocator,
    /// File offset of each probed function's first instruction (aliases at one address once).
    pub functions: BTreeMap<u64, HeapFn>,
}

impl AllocatorFile {
    /// The function at file offset `offset`.
    pub fn at(&self, offset: u64) -> Option<HeapFn> {
        self.functions.get(&offset).copied()
    }
}

/// Why a file could not be examined.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file vmatrace can read")]
    Parse {
        path: String,
        #[source]
        source: object::Error,
    },
}

/// Examines the ELF file at `path`: Some when it defines both `malloc` and `free`.
pub fn allocator_in(path: &Path) -> Result<Option<AllocatorFile>, ElfError> {
    let data = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    allocator_in_bytes(&data).map_err(|source| ElfError::Parse {
        path: path.display().to_string(),
        source,
    })
}

/// [`allocator_in`] on the file's bytes.
pub fn allocator_in_bytes(data: &[u8]) -> Result<Option<AllocatorFile>, object::Error> {
    let file = object::File::parse(data)?;
    // Names to addresses: the dynamic symbols first (what other objects call), then the
    // static ones (a statically linked allocator).
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // `malloc@@GLIBC_2.2.5` in some tables: the version is not part of the name.
        let name = name.split('@').next().unwrap_or(name);
        by_name.entry(name.to_string()).or_insert(sym.address());
    }
    if !by_name.contains_key("malloc") || !by_name.contains_key("free") {
        return Ok(None);
    }
    // tcmalloc defines glibc's `__libc_malloc` too (to take its internal calls).
    let allocator = if by_name.contains_key("tc_malloc") {
        Allocator::Tcmalloc
    } else if by_name.contains_key("mallocx") {
        Allocator::Jemalloc
    } else if by_name.contains_key("__libc_malloc") {
        Allocator::Glibc
    } else {
        Allocator::Other
    };
    // glibc's own C++ operators are libstdc++'s, which call malloc: only allocators that
    // define `operator new` themselves have it probed.
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0))
        .collect();
    let mut functions = BTreeMap::new();
    // Standard names first, so that an address with several names gets the standard one.
    let mut names: Vec<(&String, &u64)> = by_name.iter().collect();
    names.sort_by_key(|(n, _)| (n.starts_with('_') || n.starts_with("tc_"), n.len()));
    for (name, &address) in names {
        let Some(func) = HeapFn::from_symbol(name) else {
            continue;
        };
        let Some(mut offset) = file_offset(&segments, address) else {
            continue;
        };
        if !func.has_return()
            && let Some(code) = usize::try_from(offset)
                .ok()
                .and_then(|o| data.get(o..o + 16))
            && let Some(skip) = past_null_test(code)
        {
            offset += skip;
        }
        functions.entry(offset).or_insert(func);
    }
    Ok(Some(AllocatorFile {
        allocator,
        functions,
    }))
}

/// Where to put the entry probe of a function without a return probe that starts (x86-64)
/// `test %rdi,%rdi; je ...` and then a `push`, as glibc's `free` does: after the branch, on
/// the push, bytes from the start. The kernel emulates a `push` at a uprobe but single-steps
/// a `test` out of line, which cost 13.5 µs per `free` on this project's VM against 1.8 µs
/// for `malloc`, whose first instruction is a push. Only a null pointer takes the branch, and
/// `free(NULL)` frees nothing; the stack pointer and the arguments are still the entry's.
fn past_null_test(code: &[u8]) -> Option<u64> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let rest = code.strip_prefix(&[0x48, 0x85, 0xff])?;
    let branch = match rest {
        [0x74, ..] => 2,
        [0x0f, 0x84, ..] => 6,
        _ => return None,
    };
    let push = matches!(
        rest.get(branch..)?,
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..]
    );
    push.then_some(3 + branch as u64)
}

/// The file offset of virtual address `address` (the loadable segment that holds it).
fn file_offset(segments: &[(u64, u64, u64)], address: u64) -> Option<u64> {
    segments
        .iter()
        .find(|(start, size, _)| address >= *start && address < start.saturating_add(*size))
        .map(|(start, _, offset)| address - start + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C library this test runs with (glibc on every machine of this project's kind).
    fn own_libc() -> Option<std::path::PathBuf> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("/libc.so"))
            .map(std::path::PathBuf::from)
    }

    #[test]
    fn glibc_is_found_with_its_functions_at_their_offsets() {
        let Some(libc) = own_libc() else {
            eprintln!("not linked against a shared libc: skipped");
            return;
        };
        let found = allocator_in(&libc)
            .expect("readable")
            .expect("an allocator");
        assert_eq!(found.allocator, Allocator::Glibc);
        let funcs: Vec<HeapFn> = found.functions.values().copied().collect();
        for f in [
            HeapFn::Malloc,
            HeapFn::Free,
            HeapFn::Calloc,
            HeapFn::Realloc,
            HeapFn::PosixMemalign,
            HeapFn::MallocTrim,
        ] {
            assert!(funcs.contains(&f), "{f:?} in {funcs:?}");
        }
        // Each function once, though glibc names malloc also __libc_malloc.
        assert_eq!(
            funcs.iter().filter(|f| **f == HeapFn::Malloc).count(),
            1,
            "{funcs:?}"
        );
        // libc's malloc, where the dynamic linker found it, is at that file offset (the text
        // is mapped at its file offset plus the load bias).
        // SAFETY: a look-up by a NUL-terminated name in the global scope.
        let malloc_addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let offset = maps
            .lines()
            .filter(|l| l.ends_with(&*libc.to_string_lossy()))
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let (range, _, off) = (w.next()?, w.next()?, w.next()?);
                let (s, e) = range.split_once('-')?;
                let (s, e) = (
                    u64::from_str_radix(s, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                );
                let off = u64::from_str_radix(off, 16).ok()?;
                (malloc_addr >= s && malloc_addr < e).then(|| malloc_addr - s + off)
            })
            .expect("malloc is in a mapping of libc");
        assert_eq!(found.at(offset), Some(HeapFn::Malloc));
    }

    #[test]
    fn a_probe_skips_a_leading_null_test_only_before_a_push() {
        // glibc 2.36's free: test %rdi,%rdi; je rel32; push %rbp.
        let free = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d,
        ];
        let short = [0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54, 0x55];
        let expected = |n: u64| cfg!(target_arch = "x86_64").then_some(n);
        assert_eq!(past_null_test(&free), expected(9));
        assert_eq!(past_null_test(&short), expected(5));
        // Another register tested, or no push after the branch: the entry stays.
        assert_eq!(past_null_test(&[0x48, 0x85, 0xc0, 0x74, 0x10, 0x55]), None);
        assert_eq!(
            past_null_test(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89]),
            None
        );
        assert_eq!(past_null_test(&[0x48, 0x85, 0xff]), None);
    }

    #[test]
    fn a_file_without_malloc_is_not_an_allocator_and_garbage_is_an_error() {
        let exe = std::env::current_exe().expect("exe");
        // The test binary calls malloc but does not define it.
        assert_eq!(allocator_in(&exe).expect("readable"), None);
        assert!(allocator_in_bytes(b"not an elf").is_err());
    }
}
