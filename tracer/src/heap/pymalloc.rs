//! CPython's object allocator (pymalloc), read from its own pool headers: each arena (an
//! anonymous mapping of `ARENA_SIZE` made outside malloc) is cut into pools of `POOL_SIZE`,
//! and each pool's header says how many blocks of which size class are allocated in it. That
//! is pymalloc's own count of live bytes (what `sys._debugmallocstats()` calls "bytes in
//! allocated blocks"), read from the process's memory without any probe.
//!
//! The header (`struct pool_header`, unchanged since CPython 2.5): `ref.count` (u32 in an
//! 8-byte union) at 0, then `freeblock`, `nextpool`, `prevpool` (pointers), `arenaindex` (u32)
//! at 32, `szidx` (u32) at 36. A block of class `szidx` is `(szidx + 1) << 4` bytes on 64-bit
//! builds from CPython 3.8.

use serde::{Deserialize, Serialize};

use crate::model::{AddressSpace, Backing, PAGE_SIZE};

/// Bytes of a pool header vmatrace reads (through `maxnextoffset`).
pub const HEADER_BYTES: usize = 48;
/// Size classes: blocks up to 512 bytes in steps of 16.
const SIZE_CLASSES: u32 = 32;
const ALIGNMENT_SHIFT: u32 = 4;

/// Arena and pool sizes of a CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub arena_size: u64,
    pub pool_size: u64,
}

impl Layout {
    /// The layout of CPython 3.`minor` (64-bit): 1 MiB arenas of 16 KiB pools from 3.10
    /// (`USE_LARGE_ARENAS`, `USE_LARGE_POOLS`), 256 KiB arenas of 4 KiB pools for 3.8 and
    /// 3.9; none before 3.8 (8-byte alignment).
    pub fn for_minor(minor: u32) -> Option<Self> {
        match minor {
            0..=7 => None,
            8 | 9 => Some(Self {
                arena_size: 256 << 10,
                pool_size: 4 << 10,
            }),
            _ => Some(Self {
                arena_size: 1 << 20,
                pool_size: 16 << 10,
            }),
        }
    }

    /// The layout of the CPython a file name shows (`python3.11`, `libpython3.12.so.1.0`).
    pub fn for_name(name: &str) -> Option<Self> {
        Self::for_minor(minor_of_name(name)?)
    }

    /// The pools of the arena mapped at `start`: glibc's mmap gives page alignment, and
    /// pymalloc skips to the first pool boundary (losing one pool when it is not aligned).
    pub fn pools(&self, start: u64) -> impl Iterator<Item = u64> + use<> {
        let first = start.next_multiple_of(self.pool_size);
        let (end, step) = (start + self.arena_size, self.pool_size);
        (0..)
            .map(move |i| first + i * step)
            .take_while(move |p| p + step <= end)
    }
}

/// The minor version of the CPython 3 a file name shows (`python3.11`, `libpython3.12.so.1.0`):
/// none for a free-threaded build (`python3.13t`), whose objects come from mimalloc, not
/// from pymalloc's arenas.
pub fn minor_of_name(name: &str) -> Option<u32> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let rest = base
        .strip_prefix("libpython3.")
        .or_else(|| base.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if rest[digits.len()..].starts_with('t') {
        return None;
    }
    digits.parse().ok()
}

/// The minor version of the CPython 3 a process runs: its executable `exe`, or a libpython
/// it maps.
pub fn cpython_of(exe: Option<&str>, space: &AddressSpace) -> Option<u32> {
    exe.and_then(minor_of_name).or_else(|| {
        space.vmas().find_map(|v| match &v.backing {
            Backing::File { path, .. } => minor_of_name(path),
            _ => None,
        })
    })
}

/// The layout of the CPython a process runs: its executable `exe`, or a libpython it maps.
pub fn layout_of(exe: Option<&str>, space: &AddressSpace) -> Option<Layout> {
    Layout::for_minor(cpython_of(exe, space)?)
}

/// Reads the pool headers of the CPython arenas of process `pid` (running `exe`, with the
/// map `space`), when it runs CPython and has some. `candidates`: the blocks of the arena
/// size its allocators mapped while traced; `owned`: all the memory they mapped.
pub fn read_process(
    pid: u32,
    exe: Option<&str>,
    space: &AddressSpace,
    candidates: impl Iterator<Item = (u64, u64)>,
    owned: impl Iterator<Item = (u64, u64)>,
    ts_ns: u64,
) -> Option<Reading> {
    let layout = layout_of(exe, space)?;
    let arenas: Vec<(u64, u64)> = candidates
        .filter(|(s, e)| e - s == layout.arena_size)
        .collect();
    let resident = |pool: u64| space.pages_in(pool, pool + PAGE_SIZE).resident() > 0;
    let mut reading = read(pid, ts_ns, layout, &arenas, resident);
    // Arenas mapped before vmatrace saw the process (`-p`, a late attach): found by their
    // pools in the other anonymous memory the allocators did not map while traced.
    let mut known: Vec<(u64, u64)> = arenas.clone();
    known.extend(owned);
    known.sort_unstable();
    let ranges: Vec<(u64, u64)> = space
        .vmas()
        .filter(|v| matches!(v.backing, Backing::Anonymous))
        .filter(|v| v.perms.read && v.perms.write)
        .flat_map(|v| without(v.start, v.end, &known))
        .collect();
    reading.arenas.extend(scan(pid, layout, &ranges, resident));
    reading
        .arenas
        .retain(|a| !a.pools.is_empty() || arenas.contains(&(a.start, a.end)));
    (!reading.arenas.is_empty()).then_some(reading)
}

/// `[start, end)` less the sorted ranges `cut`.
fn without(start: u64, end: u64, cut: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(s, e) in cut {
        if e <= at || s >= end {
            continue;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// The arenas in `ranges` of process `pid`, found by their carved pools (pool-aligned, first
/// page resident): one per arena index, from its first pool to the end of its last. Only the
/// pools with allocated blocks are kept, as in [`read`].
pub fn scan(
    pid: u32,
    layout: Layout,
    ranges: &[(u64, u64)],
    resident: impl Fn(u64) -> bool,
) -> Vec<Arena> {
    let mut pools: Vec<u64> = Vec::new();
    for &(s, e) in ranges {
        let mut p = s.next_multiple_of(layout.pool_size);
        while p + layout.pool_size <= e {
            if resident(p) {
                pools.push(p);
            }
            p += layout.pool_size;
        }
    }
    let mut by_arena: std::collections::BTreeMap<u32, Arena> = std::collections::BTreeMap::new();
    for chunk in pools.chunks(256) {
        let mut buf = vec![0u8; chunk.len() * HEADER_BYTES];
        let read = read_headers(pid, chunk, &mut buf);
        for (i, &pool) in chunk.iter().enumerate().take(read) {
            let bytes = &buf[i * HEADER_BYTES..(i + 1) * HEADER_BYTES];
            let Some((block_bytes, blocks, index)) = parse_carved(bytes, layout.pool_size) else {
                continue;
            };
            let a = by_arena.entry(index).or_insert(Arena {
                start: pool,
                end: pool,
                pools: Vec::new(),
                unreadable_pools: 0,
            });
            // Pools of one arena lie within one arena's size of each other.
            if pool.saturating_sub(a.start) >= layout.arena_size {
                continue;
            }
            a.end = pool + layout.pool_size;
            if blocks > 0 {
                a.pools.push(Pool {
                    start: pool,
                    block_bytes,
                    blocks,
                });
            }
        }
    }
    by_arena.into_values().collect()
}

/// One pool in use, as its header says.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pool {
    /// Its address.
    pub start: u64,
    /// The size of its blocks.
    pub block_bytes: u64,
    /// Blocks allocated in it.
    pub blocks: u64,
}

impl Pool {
    pub fn live_bytes(&self) -> u64 {
        self.block_bytes * self.blocks
    }
}

/// Reads a pool header: `(block size, allocated blocks)`; None when the bytes cannot be one
/// (a size class out of range, more blocks than fit).
pub fn parse_header(bytes: &[u8], pool_size: u64) -> Option<(u64, u64)> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let count = u64::from(u32_at(0)?);
    let szidx = u32_at(36)?;
    if szidx >= SIZE_CLASSES {
        return None;
    }
    let block = u64::from(szidx + 1) << ALIGNMENT_SHIFT;
    (count * block <= pool_size).then_some((block, count))
}

/// A pool header as pymalloc writes it when it carves the pool (`init_pool`), strictly:
/// `maxnextoffset` is the pool size less one block, `nextoffset` a block boundary after the
/// header, and the allocated blocks fit below it. Returns `(block size, allocated blocks,
/// arena index)`. Used to find arenas vmatrace did not see mapped (a `-p` run).
pub fn parse_carved(bytes: &[u8], pool_size: u64) -> Option<(u64, u64, u32)> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let (block, count) = parse_header(bytes, pool_size)?;
    let arena = u32_at(32)?;
    let next = u64::from(u32_at(40)?);
    let max_next = u64::from(u32_at(44)?);
    let header = 48;
    let carved = max_next == pool_size - block
        && next >= header
        && next <= pool_size
        && (next - header) % block == 0
        && count * block <= next - header;
    carved.then_some((block, count, arena))
}

/// One arena as read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Arena {
    pub start: u64,
    pub end: u64,
    /// Its pools with allocated blocks.
    pub pools: Vec<Pool>,
    /// Pools whose header could not be read or was not one (counted as unknown).
    pub unreadable_pools: u64,
}

impl Arena {
    pub fn live_bytes(&self) -> u64 {
        self.pools.iter().map(Pool::live_bytes).sum()
    }
}

/// A reading of one process's pymalloc arenas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reading {
    pub ts_ns: u64,
    pub pid: u32,
    pub pool_bytes: u64,
    pub arenas: Vec<Arena>,
}

impl Reading {
    pub fn live_bytes(&self) -> u64 {
        self.arenas.iter().map(Arena::live_bytes).sum()
    }

    /// The arena at `start`, if read.
    pub fn arena(&self, start: u64) -> Option<&Arena> {
        self.arenas.iter().find(|a| a.start == start)
    }
}

/// Reads the headers of the pools of `arenas` in process `pid` whose first page `resident`
/// says is resident (a pool never touched was never used). Live only.
pub fn read(
    pid: u32,
    ts_ns: u64,
    layout: Layout,
    arenas: &[(u64, u64)],
    resident: impl Fn(u64) -> bool,
) -> Reading {
    let mut out = Vec::new();
    for &(start, end) in arenas {
        let pools: Vec<u64> = layout.pools(start).filter(|p| resident(*p)).collect();
        let mut arena = Arena {
            start,
            end,
            pools: Vec::new(),
            unreadable_pools: 0,
        };
        for chunk in pools.chunks(256) {
            let mut buf = vec![0u8; chunk.len() * HEADER_BYTES];
            let read = read_headers(pid, chunk, &mut buf);
            for (i, &pool) in chunk.iter().enumerate() {
                let bytes = &buf[i * HEADER_BYTES..(i + 1) * HEADER_BYTES];
                match (i < read)
                    .then(|| parse_header(bytes, layout.pool_size))
                    .flatten()
                {
                    Some((_, 0)) => {}
                    Some((block_bytes, blocks)) => arena.pools.push(Pool {
                        start: pool,
                        block_bytes,
                        blocks,
                    }),
                    None => arena.unreadable_pools += 1,
                }
            }
        }
        out.push(arena);
    }
    Reading {
        ts_ns,
        pid,
        pool_bytes: layout.pool_size,
        arenas: out,
    }
}

/// Reads `HEADER_BYTES` at each of `pools` into `buf`; returns how many headers were read
/// whole.
fn read_headers(pid: u32, pools: &[u64], buf: &mut [u8]) -> usize {
    crate::remote::read_each(pid, pools, HEADER_BYTES, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header as pymalloc carves it, in a 16 KiB pool, with `count` blocks allocated.
    fn header(count: u32, szidx: u32) -> Vec<u8> {
        let block = (szidx + 1) * 16;
        let mut b = vec![0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&count.to_ne_bytes());
        b[32..36].copy_from_slice(&7u32.to_ne_bytes());
        b[36..40].copy_from_slice(&szidx.to_ne_bytes());
        b[40..44].copy_from_slice(&(48 + count.max(1) * block).to_ne_bytes());
        b[44..48].copy_from_slice(&(16384u32.saturating_sub(block)).to_ne_bytes());
        b
    }

    #[test]
    fn known_ranges_are_cut_out_of_a_mapping() {
        assert_eq!(
            without(0, 100, &[(10, 20), (15, 30), (90, 120)]),
            [(0, 10), (30, 90)]
        );
        assert_eq!(without(0, 100, &[]), [(0, 100)]);
        assert_eq!(without(40, 50, &[(0, 100)]), []);
    }

    #[test]
    fn a_carved_pool_header_is_told_from_other_bytes() {
        assert_eq!(parse_carved(&header(10, 3), 16384), Some((64, 10, 7)));
        // maxnextoffset not the pool less one block, nextoffset off a block boundary.
        let mut b = header(10, 3);
        b[44..48].copy_from_slice(&100u32.to_ne_bytes());
        assert_eq!(parse_carved(&b, 16384), None);
        let mut b = header(10, 3);
        b[40..44].copy_from_slice(&(48 + 10 * 64 + 8u32).to_ne_bytes());
        assert_eq!(parse_carved(&b, 16384), None);
        assert_eq!(parse_carved(&[0u8; HEADER_BYTES], 16384), None);
    }

    #[test]
    fn a_pool_header_gives_its_block_size_and_count() {
        assert_eq!(parse_header(&header(10, 3), 16384), Some((64, 10)));
        // More blocks than fit, a size class out of range, too few bytes.
        assert_eq!(parse_header(&header(300, 3), 16384), None);
        assert_eq!(parse_header(&header(1, 32), 16384), None);
        assert_eq!(parse_header(&header(1, 1)[..20], 16384), None);
    }

    #[test]
    fn layouts_by_version_and_the_pools_of_an_unaligned_arena() {
        assert_eq!(Layout::for_name("/usr/bin/python3.7"), None);
        // Free-threaded builds take objects from mimalloc.
        assert_eq!(Layout::for_name("/usr/bin/python3.13t"), None);
        assert_eq!(Layout::for_name("libpython3.13t.so.1.0"), None);
        assert_eq!(minor_of_name("libpython3.13.so.1.0"), Some(13));
        assert_eq!(
            Layout::for_name("libpython3.9.so.1.0").map(|l| l.pool_size),
            Some(4096)
        );
        let l = Layout::for_name("/usr/bin/python3.11").expect("3.11");
        assert_eq!((l.arena_size, l.pool_size), (1 << 20, 16 << 10));
        assert_eq!(l.pools(0x10_0000).count(), 64);
        let unaligned: Vec<u64> = l.pools(0x10_1000).collect();
        assert_eq!(unaligned.len(), 63);
        assert_eq!(unaligned[0], 0x10_4000);
    }

    #[test]
    fn reading_this_process_finds_a_planted_pool() {
        // A fake arena in our own memory: pool 2 holds 5 blocks of class 1 (32 bytes).
        let l = Layout {
            arena_size: 64 << 10,
            pool_size: 16 << 10,
        };
        let mut arena = vec![0u8; (l.arena_size + l.pool_size) as usize];
        let base = (arena.as_ptr() as u64).next_multiple_of(l.pool_size);
        let at = (base - arena.as_ptr() as u64 + 2 * l.pool_size) as usize;
        arena[at..at + HEADER_BYTES].copy_from_slice(&header(5, 1));
        let r = read(
            std::process::id(),
            1,
            l,
            &[(base, base + l.arena_size)],
            |_| true,
        );
        assert_eq!(r.live_bytes(), 160);
        assert_eq!(r.arenas[0].pools[0].start, base + 2 * l.pool_size);
        assert_eq!(r.arenas[0].unreadable_pools, 0);
        // Found again by a scan of the memory around it, as an arena vmatrace did not see
        // mapped.
        let found = scan(
            std::process::id(),
            l,
            &[(base, base + l.arena_size)],
            |_| true,
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].start, base + 2 * l.pool_size);
        assert_eq!(found[0].live_bytes(), 160);
    }
}
