//! `workload SCENARIO [ARGS]`: small programs with known memory behaviour, for vmatrace's tests
//! and benchmarks. Each scenario makes raw syscalls (no allocator in between) and prints what
//! the kernel returned, one `key value...` line each, on stdout. Scenarios that have
//! checkpoints stop themselves with SIGSTOP so that a test can compare vmatrace's model with
//! /proc/PID/maps while nothing moves.
//!
//! Markers: `madvise(NULL, 0, 0xBEEF)` (begin) and `madvise(NULL, 0, 0xBEEF + 1)` (end) fail
//! with EINVAL and bracket the calls a test asserts on.

use std::{
    io::Write,
    ptr::null_mut,
    time::{Duration, Instant},
};

const PAGE: usize = 4096;
const MARK_BEGIN: i32 = 0xBEEF;
const MARK_END: i32 = 0xBEEF + 1;

fn mark(advice: i32) {
    // SAFETY: madvise on an empty range with an invalid advice only returns EINVAL.
    unsafe { libc::madvise(null_mut(), 0, advice) };
}

fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> usize {
    // SAFETY: raw mmap; callers only touch what they mapped.
    let p = unsafe { libc::mmap(addr as *mut _, len, prot, flags, fd, off) };
    p as usize
}

fn anon(len: usize) -> usize {
    mmap(
        0,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
}

fn munmap(addr: usize, len: usize) -> i32 {
    // SAFETY: unmapping memory this program mapped.
    unsafe { libc::munmap(addr as *mut _, len) }
}

fn brk(addr: usize) -> usize {
    // SAFETY: the raw brk syscall returns the new (or unchanged) break.
    unsafe { libc::syscall(libc::SYS_brk, addr) as usize }
}

fn touch(addr: usize, len: usize) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: within a writable mapping made by this program.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 1) };
    }
}

fn read_touch(addr: usize, len: usize) -> u64 {
    let mut sum = 0u64;
    for off in (0..len).step_by(PAGE) {
        // SAFETY: within a readable mapping made by this program.
        sum += u64::from(unsafe { std::ptr::read_volatile((addr + off) as *const u8) });
    }
    sum
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints `cpu_ns N`: the CPU time (user and system) this process has used so far, which a
/// benchmark subtracts from its tracer's to get the tracer's own.
fn say_cpu() {
    // SAFETY: getrusage writes one rusage into the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    say(&format!("cpu_ns {}", ns(ru.ru_utime) + ns(ru.ru_stime)));
}

fn checkpoint(name: &str) {
    say(&format!("checkpoint {name}"));
    // SAFETY: stopping ourselves; the test continues us with SIGCONT.
    unsafe { libc::raise(libc::SIGSTOP) };
}

/// Issue #2: known mmap, munmap and brk calls between markers.
fn basic() {
    mark(MARK_BEGIN);
    let a = anon(64 * 1024);
    touch(a, 64 * 1024);
    let r1 = munmap(a + 16 * 1024, 16 * 1024);
    let cur = brk(0);
    let grown = brk(cur + 128 * 1024);
    let shrunk = brk(cur);
    mark(MARK_END);
    say(&format!("mmap {a} {}", 64 * 1024));
    say(&format!("munmap {} {} {r1}", a + 16 * 1024, 16 * 1024));
    say(&format!("brk {cur} {grown} {shrunk}"));
}

/// Issue #8: prints the real and effective user ids (a setuid binary runs with another
/// effective id), then does what `basic` does.
fn ids() {
    // SAFETY: getuid and geteuid have no preconditions.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    say(&format!("ids {uid} {euid}"));
    basic();
}

/// Issue #4: transparent huge pages. An 8 MiB region aligned to 2 MiB and advised
/// `MADV_HUGEPAGE`: one write in each of three 2 MiB blocks (three huge pages), one read in a
/// fourth (the huge zero page); then `MADV_DONTNEED` of one small page splits the first.
fn thp() {
    const MIB2: usize = 2 << 20;
    let raw = anon(5 * MIB2);
    let base = (raw + MIB2 - 1) & !(MIB2 - 1);
    // SAFETY: advice on memory this program mapped.
    let r = unsafe { libc::madvise(base as *mut _, 4 * MIB2, libc::MADV_HUGEPAGE) };
    for block in 0..3 {
        // SAFETY: within the writable mapping.
        unsafe { std::ptr::write_volatile((base + block * MIB2 + 12345) as *mut u8, 1) };
    }
    let sum = read_touch(base + 3 * MIB2, PAGE);
    say(&format!("thp {base} {r} {sum}"));
    checkpoint("huge");
    // SAFETY: releasing one page of memory this program mapped.
    unsafe { libc::madvise((base + PAGE) as *mut _, PAGE, libc::MADV_DONTNEED) };
    checkpoint("split");
    munmap(raw, 5 * MIB2);
}

/// Issue #16 (amplification): one read per 2 MiB of a 64 GiB `MADV_HUGEPAGE` reservation, each
/// mapping the huge zero page, and one write (so the VMA has resident memory to seed from);
/// then `MADV_POPULATE_READ` of a second 8 GiB reservation. A checkpoint before, after each.
fn sparse_scan() {
    const MIB2: usize = 2 << 20;
    let reserve = |len: usize| {
        let raw = mmap(
            0,
            len + MIB2,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        let base = (raw + MIB2 - 1) & !(MIB2 - 1);
        // SAFETY: advice on memory this program mapped.
        let r = unsafe { libc::madvise(base as *mut _, len, libc::MADV_HUGEPAGE) };
        (raw, base, r)
    };
    let len = 64 << 30;
    let (raw, base, r) = reserve(len);
    say(&format!("sparse {base} {len} {r}"));
    checkpoint("start");
    let mut sum = 0u64;
    for off in (0..len).step_by(MIB2) {
        sum += read_touch(base + off, 1);
    }
    // SAFETY: within the writable mapping.
    unsafe { std::ptr::write_volatile((base + 12345) as *mut u8, 1) };
    say(&format!("scanned {sum}"));
    checkpoint("scanned");
    let len2 = 8 << 30;
    let (raw2, base2, _) = reserve(len2);
    // SAFETY: advice on memory this program mapped.
    let r = unsafe { libc::madvise(base2 as *mut _, len2, libc::MADV_POPULATE_READ) };
    say(&format!("populated {base2} {len2} {r}"));
    checkpoint("populated");
    munmap(raw, len + MIB2);
    munmap(raw2, len2 + MIB2);
}

/// Memory that was only read: a 16 MiB mapping populated with `MADV_POPULATE_READ` (Linux
/// 5.14+; its result printed) and a 1 MiB read-only one (so that the two never merge) read
/// page by page, both `MADV_NOHUGEPAGE` (small zero pages). `Rss` counts neither (zero pages
/// are no normal page), so a model seeded from `/proc` must read them from pagemap. Then a
/// stop, for a `-p` attach to compare.
fn read_only() {
    let populated = anon(16 << 20);
    let read = mmap(
        0,
        1 << 20,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    for (a, len) in [(populated, 16 << 20), (read, 1 << 20)] {
        // SAFETY: advice on memory this program mapped.
        unsafe { libc::madvise(a as *mut _, len, libc::MADV_NOHUGEPAGE) };
    }
    // SAFETY: advice on memory this program mapped.
    let r = unsafe { libc::madvise(populated as *mut _, 16 << 20, libc::MADV_POPULATE_READ) };
    let sum = read_touch(read, 1 << 20);
    say(&format!(
        "read-only {populated} {} {read} {} {r} {sum}",
        16 << 20,
        1 << 20
    ));
    checkpoint("read");
}

/// Issue #17 (huge pages made without a fault): two 2 MiB blocks, aligned, in VMAs of their
/// own (the block between them unmapped), first touched as small pages under
/// `MADV_NOHUGEPAGE` (a write and a read in each); then `MADV_HUGEPAGE`, and `MADV_COLLAPSE`
/// of the first (Linux 6.1+; its result printed). The second is left to khugepaged while the
/// program waits at a checkpoint.
fn collapse() {
    const MIB2: usize = 2 << 20;
    let raw = anon(4 * MIB2);
    let base = (raw + MIB2 - 1) & !(MIB2 - 1);
    // SAFETY: advice on memory this program mapped.
    unsafe { libc::madvise(base as *mut _, 3 * MIB2, libc::MADV_NOHUGEPAGE) };
    munmap(base + MIB2, MIB2);
    let mut sum = 0;
    for block in [0, 2] {
        // SAFETY: within the writable mapping.
        unsafe { std::ptr::write_volatile((base + block * MIB2 + 12345) as *mut u8, 1) };
        sum += read_touch(base + block * MIB2 + 64 * PAGE, PAGE);
    }
    let mut huge = 0;
    for block in [0, 2] {
        // SAFETY: advice on memory this program mapped.
        huge |=
            unsafe { libc::madvise((base + block * MIB2) as *mut _, MIB2, libc::MADV_HUGEPAGE) };
    }
    // SAFETY: as above (MADV_COLLAPSE = 25; EINVAL before Linux 6.1).
    let r = unsafe { libc::madvise(base as *mut _, MIB2, 25) };
    say(&format!("collapse {base} {huge} {r} {sum}"));
    checkpoint("advised");
    checkpoint("khugepaged");
    munmap(raw, base - raw + MIB2);
    munmap(base + 2 * MIB2, raw + 4 * MIB2 - (base + 2 * MIB2));
}

/// What the child of [`vfork_map`] mapped, for the parent to print.
static VFORK_MAPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The child of [`vfork_map`]: on the parent's memory, it maps 1 MiB, writes its first page
/// and exits.
extern "C" fn vfork_child(_: *mut libc::c_void) -> libc::c_int {
    let a = anon(256 * PAGE);
    // SAFETY: within the mapping just made.
    unsafe { std::ptr::write_volatile(a as *mut u8, 1) };
    VFORK_MAPPED.store(a, std::sync::atomic::Ordering::SeqCst);
    0
}

/// Issue #17 (`CLONE_VM`): a child made as `vfork` and `posix_spawn` make theirs (`CLONE_VM |
/// CLONE_VFORK`, on a stack of its own) maps memory and exits without exec: the mapping is
/// the parent's. Checkpoint after.
fn vfork_map() {
    let stack = anon(16 * PAGE);
    // SAFETY: the child runs `vfork_child` on its own stack while this thread waits
    // (CLONE_VFORK); it only maps memory and stores to an atomic.
    let child = unsafe {
        libc::clone(
            vfork_child,
            (stack + 16 * PAGE) as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    let mut status = 0;
    // SAFETY: reaping the child made above.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let mapped = VFORK_MAPPED.load(std::sync::atomic::Ordering::SeqCst);
    say(&format!("vfork {child} {mapped} {status}"));
    checkpoint("after");
    munmap(mapped, 256 * PAGE);
    munmap(stack, 16 * PAGE);
}

/// Issue #4 (`-p` mode): memory touched before vmatrace attaches. Writes 256 pages and reads 64
/// (the zero page) of a 4 MiB mapping, stops; once continued, writes 128 more and stops again.
fn pretouched() {
    let a = anon(1024 * PAGE);
    touch(a, 256 * PAGE);
    let sum = read_touch(a + 256 * PAGE, 64 * PAGE);
    say(&format!("pretouched {a} {sum}"));
    checkpoint("before_attach");
    touch(a + 512 * PAGE, 128 * PAGE);
    checkpoint("after_attach");
    munmap(a, 1024 * PAGE);
}

/// Issue #3/#4: every kind of change, with a checkpoint after each.
fn checkpoints() {
    // MAP_FIXED over the middle of an existing mapping.
    let a = anon(16 * PAGE);
    touch(a, 16 * PAGE);
    let fixed = mmap(
        a + 4 * PAGE,
        4 * PAGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        0,
    );
    say(&format!("fixed {a} {fixed}"));
    checkpoint("map_fixed");

    // A partial munmap across two mappings: c (read-write) directly followed by b (read-only).
    let c = anon(16 * PAGE);
    let b = mmap(
        c + 8 * PAGE,
        8 * PAGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        -1,
        0,
    );
    touch(c, 8 * PAGE);
    let _ = read_touch(b, 8 * PAGE);
    let r = munmap(c + 4 * PAGE, 8 * PAGE);
    say(&format!("munmap_across {c} {b} {r}"));
    checkpoint("munmap_across");

    // mremap: grow in place (room after it), then move.
    // Map 8 pages and give the last 4 back, so that the grow can be in place.
    let m = anon(8 * PAGE);
    munmap(m + 4 * PAGE, 4 * PAGE);
    touch(m, 4 * PAGE);
    // SAFETY: remapping our own mapping.
    let grown = unsafe { libc::mremap(m as *mut _, 4 * PAGE, 6 * PAGE, 0) } as usize;
    say(&format!("mremap_grow {m} {grown}"));
    checkpoint("mremap_grow");
    // SAFETY: as above; MAYMOVE to a larger size.
    let moved =
        unsafe { libc::mremap(m as *mut _, 6 * PAGE, 64 * PAGE, libc::MREMAP_MAYMOVE) } as usize;
    touch(moved, 64 * PAGE);
    say(&format!("mremap_move {m} {moved}"));
    checkpoint("mremap_move");

    // mprotect of the middle of a mapping.
    let p = anon(12 * PAGE);
    touch(p, 12 * PAGE);
    // SAFETY: our mapping.
    let r = unsafe { libc::mprotect((p + 4 * PAGE) as *mut _, 4 * PAGE, libc::PROT_READ) };
    say(&format!("mprotect {p} {r}"));
    checkpoint("mprotect_middle");

    // madvise(DONTNEED) then touch half again.
    let d = anon(32 * PAGE);
    touch(d, 32 * PAGE);
    // SAFETY: our mapping.
    let r = unsafe { libc::madvise(d as *mut _, 32 * PAGE, libc::MADV_DONTNEED) };
    touch(d, 8 * PAGE);
    let _ = read_touch(d + 8 * PAGE, 8 * PAGE);
    say(&format!("madvise {d} {r}"));
    checkpoint("madvise_dontneed");

    // brk grow and shrink.
    let cur = brk(0);
    let grown = brk(cur + 64 * PAGE);
    touch(cur.next_multiple_of(PAGE), 32 * PAGE);
    let shrunk = brk(cur + 16 * PAGE);
    say(&format!("brk {cur} {grown} {shrunk}"));
    checkpoint("brk");

    // Threads faulting in one shared region.
    let t = anon(64 * PAGE);
    let handles: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || touch(t + i * 16 * PAGE, 16 * PAGE)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
    say(&format!("threads {t}"));
    checkpoint("threads");
}

/// Faults from several threads on distinct pages, reported per thread.
fn threads(n: usize, pages: usize) {
    let t = anon(n * pages * PAGE);
    mark(MARK_BEGIN);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                touch(t + i * pages * PAGE, pages * PAGE);
                (tid, t + i * pages * PAGE)
            })
        })
        .collect();
    let got: Vec<_> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    mark(MARK_END);
    for (tid, start) in got {
        say(&format!("thread {tid} {start} {pages}"));
    }
}

/// Issue #17 item 6: `threads` threads race for `iters` iterations, three rounds, each round
/// ending at a checkpoint. Each maps a few pages (non-fixed: the kernel hands out the ranges
/// other threads just unmapped), touches them, sometimes protects a page, and unmaps them,
/// keeping one mapping in 50. With `fixed`, each also grows its mapping with `mremap`
/// (which may move it, freeing its old range for the others), and changes random ranges of a
/// shared 256-page arena with `MAP_FIXED` maps of random protections and `mprotect`: the
/// arena's final layout depends on the order in which the kernel took the calls. The arena
/// stays mapped throughout (no hole for a non-fixed map to land in), and only a thread's own
/// mappings are touched.
fn map_race(threads: usize, iters: usize, fixed: bool) {
    const ARENA_PAGES: usize = 256;
    let arena = if fixed { anon(ARENA_PAGES * PAGE) } else { 0 };
    say(&format!("arena {arena}"));
    for round in 0..3 {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    // xorshift64, seeded per thread and round.
                    let mut x = ((round * 1000 + t + 1) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as usize
                    };
                    for i in 0..iters {
                        let mut pages = 1 + next() % 8;
                        let mut a = anon(pages * PAGE);
                        touch(a, pages * PAGE);
                        if fixed && next() % 4 == 0 {
                            // SAFETY: remapping this thread's own mapping.
                            let b = unsafe {
                                libc::mremap(
                                    a as *mut _,
                                    pages * PAGE,
                                    (pages + 4) * PAGE,
                                    libc::MREMAP_MAYMOVE,
                                )
                            };
                            if b != libc::MAP_FAILED {
                                (a, pages) = (b as usize, pages + 4);
                                touch(a, pages * PAGE);
                            }
                        }
                        if next() % 3 == 0 {
                            // SAFETY: this thread's own mapping.
                            unsafe { libc::mprotect(a as *mut _, PAGE, libc::PROT_READ) };
                        }
                        if i % 50 != 0 {
                            munmap(a, pages * PAGE);
                        }
                        if fixed {
                            let start = next() % ARENA_PAGES;
                            let len = (1 + next() % 16).min(ARENA_PAGES - start);
                            let at = arena + start * PAGE;
                            let prot = [
                                libc::PROT_NONE,
                                libc::PROT_READ,
                                libc::PROT_READ | libc::PROT_WRITE,
                            ][next() % 3];
                            if next() % 2 == 0 {
                                mmap(
                                    at,
                                    len * PAGE,
                                    prot,
                                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                                    -1,
                                    0,
                                );
                            } else {
                                // SAFETY: a range of the arena, which stays mapped.
                                unsafe { libc::mprotect(at as *mut _, len * PAGE, prot) };
                            }
                        }
                    }
                });
            }
        });
        checkpoint(&format!("race_{round}"));
    }
}

/// The main thread exits first (`exit`, not `exit_group`: the process lives on), then a
/// second thread maps, touches and unmaps 4 pages between the markers, `ms` later, and ends
/// the process by returning. Prints `leader TID` and `worker TID`.
fn leader_exits_first(ms: u64) {
    // SAFETY: gettid has no preconditions.
    let leader = unsafe { libc::syscall(libc::SYS_gettid) };
    say(&format!("leader {leader}"));
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        say(&format!("worker {tid}"));
        mark(MARK_BEGIN);
        let a = anon(4 * PAGE);
        touch(a, 4 * PAGE);
        munmap(a, 4 * PAGE);
        mark(MARK_END);
        // Returning ends this thread, the last one: the process exits with status 0.
    });
    // SAFETY: ends this thread only; nothing of this thread is used after it (no unwinding).
    unsafe { libc::syscall(libc::SYS_exit, 0) };
}

/// A failing mmap (ENOMEM) and a failing munmap (EINVAL).
fn fail() {
    mark(MARK_BEGIN);
    let huge = mmap(
        0,
        1 << 46,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    let bad = munmap(3, PAGE);
    mark(MARK_END);
    say(&format!("fail {} {bad}", huge as isize));
}

/// Maps a file and reports its path.
fn file() {
    let path = format!("/tmp/vmatrace-workload-{}.dat", std::process::id());
    let _ = std::fs::write(&path, vec![7u8; 4 * PAGE]);
    let Ok(f) = std::fs::File::open(&path) else {
        say("error open");
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    mark(MARK_BEGIN);
    let a = mmap(0, 4 * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0);
    let sum = read_touch(a, 4 * PAGE);
    mark(MARK_END);
    say(&format!("file {a} {path} {sum}"));
    checkpoint("file");
    munmap(a, 4 * PAGE);
    let _ = std::fs::remove_file(&path);
}

/// The name `hostile-names` gives itself and its file: bytes that are not UTF-8, and
/// terminal controls that would clear the screen, retitle the window and forge a line.
pub const HOSTILE_COMM: &[u8] = b"\xff\xfe\x1b[2J\nX";
pub const HOSTILE_FILE: &[u8] = b"\x1b]0;PWNED\x07\x1b[2J\nFAKE LINE\r\xff\xfe\\x41";

/// A process with a hostile name mapping a file with a hostile name in `dir`, between markers;
/// then (`wait`) it waits for stdin to close, so that a test can attach with `-p`.
fn hostile_names(dir: &str, wait: bool) {
    use std::os::unix::ffi::OsStrExt;
    let mut comm = HOSTILE_COMM.to_vec();
    comm.push(0);
    // SAFETY: a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr()) };
    let mut bytes = dir.as_bytes().to_vec();
    bytes.push(b'/');
    bytes.extend_from_slice(HOSTILE_FILE);
    let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
    let _ = std::fs::write(&path, vec![7u8; 4 * PAGE]);
    let Ok(f) = std::fs::File::open(&path) else {
        say("error open");
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    mark(MARK_BEGIN);
    let a = mmap(0, 4 * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0);
    let sum = read_touch(a, 4 * PAGE);
    mark(MARK_END);
    say(&format!("hostile {a} {sum}"));
    if wait {
        say(&format!("ready {}", std::process::id()));
        let mut buf = String::new();
        let _ = std::io::stdin().read_line(&mut buf);
    }
    munmap(a, 4 * PAGE);
}

/// A file mapped, unmapped and closed, and its descriptor reused at once for another file
/// (`planted`) mapped at another offset: the first mmap must still name the first file, though
/// when vmatrace reads /proc its fd names the second one.
fn fd_reuse(dir: &str) {
    let first = format!("{dir}/first.dat");
    let planted = format!("{dir}/planted.dat");
    let _ = std::fs::write(&first, vec![1u8; 4 * PAGE]);
    let _ = std::fs::write(&planted, vec![2u8; 8 * PAGE]);
    let open = |p: &str| {
        let c = std::ffi::CString::new(p).unwrap_or_default();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) }
    };
    mark(MARK_BEGIN);
    let fd = open(&first);
    let a = mmap(0, 4 * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0);
    read_touch(a, 4 * PAGE);
    munmap(a, 4 * PAGE);
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    let fd2 = open(&planted);
    let b = mmap(
        0,
        4 * PAGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        fd2,
        4 * PAGE as i64,
    );
    read_touch(b, 4 * PAGE);
    mark(MARK_END);
    say(&format!("fd_reuse {fd} {fd2} {a} {b}"));
    // Keep the planted mapping and fd while vmatrace resolves the first mmap.
    std::thread::sleep(Duration::from_millis(300));
}

/// Fork: the child maps and touches memory, then exits; the parent waits.
fn fork() {
    mark(MARK_BEGIN);
    // SAFETY: the process has one thread, so the child may print and exit through the runtime.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let a = anon(8 * PAGE);
        touch(a, 8 * PAGE);
        say(&format!("child {} {a}", std::process::id()));
        // `exit`, not `_exit`: the runtime's cleanup unmaps the main thread's alternate signal
        // stack, as the parent's return from `main` does. Its size follows the CPU's signal
        // frame (`AT_MINSIGSTKSZ`, larger with AVX-512 and AMX), so left mapped it would make
        // the child's last map differ between machines (the kernel matrix compares it with
        // the host's).
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    mark(MARK_END);
    say(&format!("forked {pid}"));
}

/// Fork checkpoint: the parent maps and touches memory and forks; the child unmaps part of the
/// inherited mapping, maps its own, touches some, and stops itself; the parent waits.
fn fork_checkpoint() {
    let shared = anon(32 * PAGE);
    touch(shared, 32 * PAGE);
    // SAFETY: the child only makes raw syscalls, prints and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        munmap(shared + 8 * PAGE, 8 * PAGE);
        let own = anon(16 * PAGE);
        touch(own, 8 * PAGE);
        // Copy on write of inherited pages.
        touch(shared, 4 * PAGE);
        say(&format!("fork_child {} {shared} {own}", std::process::id()));
        checkpoint("fork_child");
        // SAFETY: leaving the child without running destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    say(&format!("fork_parent {pid}"));
}

/// Issue #17: memory made resident without faults, locks, lazy frees and System V segments,
/// each followed by a checkpoint (the test compares the model with smaps there).
fn residency() {
    const MIB: usize = 1 << 20;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let private_anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // 16 MiB populated by mmap itself.
    let p = mmap(0, 16 * MIB, rw, private_anon | libc::MAP_POPULATE, -1, 0);
    say(&format!("populate {p}"));
    checkpoint("map_populate");
    // MADV_POPULATE_WRITE of 16 MiB, and MADV_POPULATE_READ (zero pages) of 4 MiB.
    let w = anon(16 * MIB);
    let r = anon(4 * MIB);
    // SAFETY: advice on memory this program mapped.
    let (pw, pr) = unsafe {
        (
            libc::madvise(w as *mut _, 16 * MIB, 23),
            libc::madvise(r as *mut _, 4 * MIB, 22),
        )
    };
    say(&format!("madv_populate {w} {pw} {r} {pr}"));
    checkpoint("madv_populate");
    // A populate that fails partway: the second half is PROT_NONE (EFAULT there), the first
    // half is populated all the same.
    let half = anon(8 * MIB);
    // SAFETY: on memory this program mapped.
    let pf = unsafe {
        libc::mprotect((half + 4 * MIB) as *mut _, 4 * MIB, libc::PROT_NONE);
        libc::madvise(half as *mut _, 8 * MIB, 23)
    };
    say(&format!("partial {half} {pf}"));
    checkpoint("populate_partial");
    // mlock of 8 MiB, and mlock2(MLOCK_ONFAULT), which populates nothing.
    let l = anon(8 * MIB);
    let onfault = anon(4 * MIB);
    // SAFETY: locking memory this program mapped (as root: no RLIMIT_MEMLOCK).
    let (ml, ml2) = unsafe {
        (
            libc::mlock(l as *const _, 8 * MIB),
            libc::syscall(libc::SYS_mlock2, onfault, 4 * MIB, 1) as i32,
        )
    };
    say(&format!("mlock {l} {ml} {onfault} {ml2}"));
    checkpoint("mlock");
    // mlockall(MCL_CURRENT | MCL_FUTURE): what is mapped is made resident, and a later plain
    // mmap and brk too.
    // SAFETY: locking this process's memory.
    let mla = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    let later = anon(4 * MIB);
    let heap = brk(0);
    brk(heap + MIB);
    say(&format!("mlockall {mla} {later} {heap}"));
    checkpoint("mlockall");
    // SAFETY: unlocking.
    unsafe { libc::munlockall() };
    // MADV_FREE of 16 MiB, then the program writes it all again (no fault: still resident).
    let f = anon(16 * MIB);
    touch(f, 16 * MIB);
    // SAFETY: advice on memory this program mapped.
    let mf = unsafe { libc::madvise(f as *mut _, 16 * MIB, libc::MADV_FREE) };
    say(&format!("madv_free {f} {mf}"));
    checkpoint("madv_free");
    touch(f, 16 * MIB);
    checkpoint("madv_free_rewritten");
    // Two private segments attached side by side (same /SYSV00000000 name), the first
    // detached: the second stays.
    // SAFETY: System V calls on ids this program creates.
    unsafe {
        let a = libc::shmget(libc::IPC_PRIVATE, MIB, libc::IPC_CREAT | 0o600);
        let b = libc::shmget(libc::IPC_PRIVATE, MIB, libc::IPC_CREAT | 0o600);
        // A reserved 2 MiB, each segment attached over one half (SHM_REMAP).
        let region = mmap(0, 2 * MIB, libc::PROT_NONE, private_anon, -1, 0);
        let at_a = libc::shmat(a, region as *const _, libc::SHM_REMAP) as usize;
        let at_b = libc::shmat(b, (region + MIB) as *const _, libc::SHM_REMAP) as usize;
        touch(at_a, MIB);
        touch(at_b, MIB / 2);
        // Used for a while, as programs do (vmatrace reads the size from the map on its next
        // read of the ring).
        std::thread::sleep(Duration::from_millis(200));
        libc::shmctl(a, libc::IPC_RMID, null_mut());
        libc::shmctl(b, libc::IPC_RMID, null_mut());
        let dt = libc::shmdt(at_a as *const _);
        say(&format!("shm_adjacent {at_a} {at_b} {dt}"));
        checkpoint("shm_adjacent");
    }
}

/// Issue #17: maps, touches and unmaps fast enough to overflow a small ring, then waits for
/// vmatrace to read the map again and stops at a checkpoint.
fn lossy() {
    let mut kept = Vec::new();
    for i in 0..4000 {
        let a = anon(16 * PAGE);
        touch(a, 16 * PAGE);
        if i % 2 == 0 {
            munmap(a, 16 * PAGE);
        } else {
            kept.push(a);
        }
    }
    say(&format!("lossy {}", kept.len()));
    std::thread::sleep(Duration::from_millis(1500));
    checkpoint("after_losses");
}

/// Issue #17: fork's copy rules. The parent has anonymous memory plain, `MADV_DONTFORK`,
/// `MADV_WIPEONFORK`, a shared anonymous mapping and a private file mapping that was only
/// read, all touched; the child and then the parent stop at checkpoints.
fn fork_advice() {
    const MIB: usize = 1 << 20;
    let plain = anon(4 * MIB);
    let dontfork = anon(4 * MIB);
    let wipe = anon(4 * MIB);
    let shared = mmap(
        0,
        8 * MIB,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    for (a, len) in [(plain, 4), (dontfork, 4), (wipe, 4), (shared, 8)] {
        touch(a, len * MIB);
    }
    let path = format!("/tmp/vmatrace-fork-advice-{}.dat", std::process::id());
    let _ = std::fs::write(&path, vec![7u8; 64 * PAGE]);
    let file = std::fs::File::open(&path).map(|f| {
        use std::os::fd::AsRawFd;
        let m = mmap(
            0,
            64 * PAGE,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        let _ = read_touch(m, 64 * PAGE);
        m
    });
    let _ = std::fs::remove_file(&path);
    // SAFETY: advice on memory this program mapped.
    unsafe {
        libc::madvise(dontfork as *mut _, 4 * MIB, libc::MADV_DONTFORK);
        libc::madvise(wipe as *mut _, 4 * MIB, libc::MADV_WIPEONFORK);
    }
    say(&format!(
        "fork_advice {plain} {dontfork} {wipe} {shared} {}",
        file.unwrap_or(0)
    ));
    // SAFETY: the child only makes raw syscalls, prints, stops and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        say(&format!("fork_child {}", std::process::id()));
        checkpoint("fork_child");
        // SAFETY: leaving the child without running destructors.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    checkpoint("fork_parent");
}

/// A burst of `n` forks: each child maps a page, touches it and exits; the parent reaps all.
fn fork_burst(n: usize) {
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: the child only makes raw syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let a = anon(PAGE);
            touch(a, PAGE);
            // SAFETY: leaving the child without running destructors.
            unsafe { libc::_exit(0) };
        }
        pids.push(pid);
    }
    for pid in pids {
        let mut status = 0;
        // SAFETY: reaping our children.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    say(&format!("fork_burst {n}"));
}

/// `n` threads at once, each touching one page of a shared region.
fn many_threads(n: usize) {
    let region = anon(n * PAGE);
    let hs: Vec<_> = (0..n)
        .map(|i| {
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || touch(region + i * PAGE, PAGE))
        })
        .collect();
    let started = hs.iter().filter(|h| h.is_ok()).count();
    for h in hs.into_iter().flatten() {
        let _ = h.join();
    }
    say(&format!("many_threads {region} {started}"));
}

/// Touches `pages` fresh pages as fast as possible (ring-buffer overflow tests). Quiet before
/// and after, so that the only events in the lossy moment are the burst's own faults.
fn burst(pages: usize) {
    let a = anon(pages * PAGE);
    std::thread::sleep(Duration::from_millis(300));
    touch(a, pages * PAGE);
    std::thread::sleep(Duration::from_millis(300));
    say(&format!("burst {a} {pages}"));
}

/// System V shared memory, pkey_mprotect and process_madvise on itself, between markers.
fn ipc() {
    // SAFETY: plain syscalls on memory and ids this program owns.
    unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, 16 * PAGE, libc::IPC_CREAT | 0o600);
        let p = anon(8 * PAGE);
        let pidfd = libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) as i32;
        mark(MARK_BEGIN);
        let at = libc::shmat(id, null_mut(), 0) as usize;
        touch(at, 16 * PAGE);
        // Programs use a segment for a while; vmatrace reads its size from /proc/sysvipc/shm
        // when it handles the shmat (within one 50 ms tick).
        std::thread::sleep(Duration::from_millis(200));
        let dt = libc::shmdt(at as *const _);
        let pk = libc::syscall(libc::SYS_pkey_mprotect, p, 4 * PAGE, libc::PROT_READ, -1) as i64;
        let iov = libc::iovec {
            iov_base: p as *mut _,
            iov_len: 8 * PAGE,
        };
        let pm = libc::syscall(
            libc::SYS_process_madvise,
            pidfd,
            &iov,
            1,
            libc::MADV_COLD,
            0,
        ) as i64;
        mark(MARK_END);
        // Keep the pidfd open while vmatrace resolves its target (/proc/PID/fdinfo).
        std::thread::sleep(Duration::from_millis(200));
        libc::shmctl(id, libc::IPC_RMID, null_mut());
        say(&format!("shm {id} {at} {dt}"));
        say(&format!("pkey {p} {pk}"));
        say(&format!("pmadvise {pidfd} {pm}"));
    }
}

/// Waits for stdin to close, then maps once (the `-p` attach test).
/// Issue #18: memory asked for by named functions, for the stack tests: `stacks_map_region`
/// maps 1 MiB itself and `stacks_touch_region` touches it; `stacks_grow_heap` grows the heap
/// through malloc (a 100 KB vector, under the mmap threshold).
fn stacks_scenario() {
    mark(MARK_BEGIN);
    let mut heap = Vec::new();
    for _ in 0..4 {
        let a = stacks_map_region(1 << 20);
        stacks_touch_region(a, 1 << 20);
        heap.push(stacks_grow_heap());
    }
    mark(MARK_END);
    say(&format!(
        "heap {}",
        heap.iter().map(Vec::len).sum::<usize>()
    ));
}

#[inline(never)]
fn stacks_map_region(len: usize) -> usize {
    std::hint::black_box(anon(len))
}

#[inline(never)]
fn stacks_touch_region(addr: usize, len: usize) {
    touch(addr, len);
}

#[inline(never)]
fn stacks_grow_heap() -> Vec<u8> {
    let mut v = Vec::with_capacity(100_000);
    v.resize(100_000, 1u8);
    std::hint::black_box(v)
}

fn wait_then_map() {
    say(&format!("ready {}", std::process::id()));
    let mut buf = String::new();
    let _ = std::io::stdin().read_line(&mut buf);
    let a = anon(32 * PAGE);
    touch(a, 32 * PAGE);
    say(&format!("mmap {a}"));
    let _ = std::io::stdin().read_line(&mut buf);
}

/// Prints `ready PID`, waits for a line on stdin, writes `pages` fresh pages (faults that
/// fill a small ring while vmatrace is frozen), then execs itself as `basic`: an exec the
/// kernel stops for vmatrace, at a moment the test chooses.
fn reexec(pages: usize) {
    say(&format!("ready {}", std::process::id()));
    let mut buf = String::new();
    let _ = std::io::stdin().read_line(&mut buf);
    if pages > 0 {
        let a = anon(pages * PAGE);
        touch(a, pages * PAGE);
    }
    let exe = c"/proc/self/exe";
    let args = [c"workload".as_ptr(), c"basic".as_ptr(), std::ptr::null()];
    // SAFETY: NUL-terminated strings and a NULL-terminated argument vector.
    unsafe { libc::execv(exe.as_ptr(), args.as_ptr()) };
    say("exec failed");
    std::process::exit(1);
}

/// Benchmark: map, touch every page, unmap; `secs` seconds or `iters` rounds.
fn fault_loop(iters: usize, pages: usize) {
    let start = Instant::now();
    for _ in 0..iters {
        let a = anon(pages * PAGE);
        touch(a, pages * PAGE);
        munmap(a, pages * PAGE);
    }
    say(&format!("fault_loop {} ns", start.elapsed().as_nanos()));
    say_cpu();
}

/// Bounded output (issue #20): `iters` rounds of mapping 16 pages, touching them and
/// unmapping them, the first half of one mapping in 8 kept (so that the map at the end has
/// history), `pause_us` between rounds; prints `churn_then_stop KEPT PID`, then a checkpoint
/// `end`.
fn churn_then_stop(iters: usize, pause_us: u64) {
    let mut kept = 0;
    for i in 0..iters {
        let a = anon(16 * PAGE);
        touch(a, 16 * PAGE);
        if i % 8 == 0 {
            munmap(a + 8 * PAGE, 8 * PAGE);
            kept += 1;
        } else {
            munmap(a, 16 * PAGE);
        }
        if pause_us > 0 {
            std::thread::sleep(Duration::from_micros(pause_us));
        }
    }
    say(&format!("churn_then_stop {kept} {}", std::process::id()));
    checkpoint("end");
}

/// Benchmark: mmap, touch one page, munmap.
fn churn(iters: usize) {
    let start = Instant::now();
    for _ in 0..iters {
        let a = anon(16 * PAGE);
        touch(a, PAGE);
        munmap(a, 16 * PAGE);
    }
    say(&format!("churn {} ns", start.elapsed().as_nanos()));
    say_cpu();
}

/// Two calls of one function from one loop, alike but for their length, made in turn
/// `iters` times: their registers at the syscall are most likely the same, and only the
/// return address into this function tells them apart (the kernel's recognition of known
/// stacks must read it). `pause_us` between calls.
fn two_sites(iters: usize, pause_us: u64) {
    for i in 0..iters {
        if i % 2 == 0 {
            map_pages(1); // SITE(one)
        } else {
            map_pages(2); // SITE(two)
        }
        if pause_us > 0 {
            std::thread::sleep(Duration::from_micros(pause_us));
        }
    }
    say(&format!("two_sites {iters}"));
}

#[inline(never)]
fn map_pages(pages: usize) {
    let a = anon(pages * PAGE);
    touch(a, PAGE);
    munmap(a, pages * PAGE);
}

/// Benchmark: `churn` in `threads` threads at once, `iters` iterations in all: the calls of
/// a process whose threads may race (each gets a commit where it takes the mmap lock).
fn churn_threads(threads: usize, iters: usize) {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters / threads.max(1) {
                    let a = anon(16 * PAGE);
                    touch(a, PAGE);
                    munmap(a, 16 * PAGE);
                }
            });
        }
    });
    say(&format!("churn-threads {} ns", start.elapsed().as_nanos()));
    say_cpu();
}

/// Pins the calling thread to `cpu`; false if it cannot run there.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Touches pages on CPU 0, then unmaps them from CPU 1, `iters` times: the faults and the
/// `munmap` after them are reported by different CPUs. Prints `migrate_regions START...`
/// (one per iteration), or `migrate_skipped` with fewer than two CPUs.
fn migrate(iters: usize) {
    if !pin_to(0) || !pin_to(1) {
        say("migrate_skipped");
        return;
    }
    let mut line = String::from("migrate_regions");
    for _ in 0..iters {
        pin_to(0);
        let a = anon(8 * PAGE);
        touch(a, 8 * PAGE);
        pin_to(1);
        munmap(a, 8 * PAGE);
        line.push_str(&format!(" {a}"));
    }
    say(&line);
}

/// Benchmark: a syscall that is not a memory syscall (`getppid`, never answered by the vDSO),
/// for the cost vmatrace adds to every other syscall on the machine.
fn getppid_loop(iters: usize) {
    let start = Instant::now();
    for _ in 0..iters {
        // SAFETY: getppid has no preconditions.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    say(&format!("getppid {} ns", start.elapsed().as_nanos()));
}

/// Issue #21: a busy multi-threaded process for `seconds` (the live view's test): each thread
/// mallocs and frees mixed sizes through glibc (its own arena, the heap, mmaps above the
/// threshold) and maps, touches and unmaps 16 pages now and then.
fn busy(threads: usize, seconds: u64) {
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::with_capacity(64);
                let mut i = 0usize;
                while start.elapsed() < Duration::from_secs(seconds) {
                    let size = [64, 1024, 16 << 10, 200 << 10][(i + t) % 4];
                    keep.push(vec![1u8; size]);
                    if keep.len() >= 64 {
                        keep.drain(..32);
                    }
                    if i.is_multiple_of(64) {
                        let a = anon(16 * PAGE);
                        touch(a, 16 * PAGE);
                        munmap(a, 16 * PAGE);
                    }
                    i += 1;
                }
                i
            })
        })
        .collect();
    let rounds: usize = hs.into_iter().filter_map(|h| h.join().ok()).sum();
    say(&format!("busy {threads} {rounds}"));
}

/// Issue #21: mapping ids through what the kernel does to VMAs, inside a 64-page PROT_NONE
/// reservation R (so that nothing else merges in): A (8 pages) mapped over its pages 8-16;
/// split by mprotect and merged back; B mapped right after A (the kernel merges them into one
/// VMA); A's 8 pages moved to R+40; grown in place to 12 pages; a 2-page hole punched in it.
/// Prints `vma_ids R A`, and a checkpoint after each step.
fn vma_ids() {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let fixed = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    let r = mmap(
        0,
        64 * PAGE,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    let a = mmap(r + 8 * PAGE, 8 * PAGE, rw, fixed, -1, 0);
    touch(a, PAGE);
    say(&format!("vma_ids {r} {a}"));
    checkpoint("mapped");
    // SAFETY: protection changes and remaps of memory this program mapped.
    unsafe {
        libc::mprotect((a + 2 * PAGE) as *mut _, 2 * PAGE, libc::PROT_READ);
        checkpoint("split");
        libc::mprotect((a + 2 * PAGE) as *mut _, 2 * PAGE, rw);
        checkpoint("merged_back");
        mmap(a + 8 * PAGE, 4 * PAGE, rw, fixed, -1, 0);
        checkpoint("neighbour_merged");
        libc::mremap(
            a as *mut _,
            8 * PAGE,
            8 * PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            (r + 40 * PAGE) as *mut libc::c_void,
        );
        checkpoint("moved");
        munmap(r + 48 * PAGE, 4 * PAGE);
        libc::mremap((r + 40 * PAGE) as *mut _, 8 * PAGE, 12 * PAGE, 0);
        checkpoint("grown");
        munmap(r + 44 * PAGE, 2 * PAGE);
        checkpoint("hole");
    }
}

/// Issue #21: a run with many VMA pieces for the pictures: `threads` threads each keep `mib` MiB
/// of small blocks (one glibc arena each, a 64 MiB PROT_NONE reservation committed bit by bit)
/// while the main thread maps, touches one page of and unmaps 16 pages `churn` times.
fn big_picture(threads: usize, mib: usize, churn: usize) {
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut kept = 0usize;
                for _ in 0..mib * 256 {
                    // SAFETY: malloc of a small block, written once, deliberately kept.
                    let p = unsafe { libc::malloc(4000) } as *mut u8;
                    if !p.is_null() {
                        // SAFETY: within the block.
                        unsafe { std::ptr::write_bytes(p, 1, 4000) };
                        kept += 1;
                    }
                    std::thread::yield_now();
                }
                kept
            })
        })
        .collect();
    for _ in 0..churn {
        let a = anon(16 * PAGE);
        touch(a, PAGE);
        munmap(a, 16 * PAGE);
    }
    let kept: usize = hs.into_iter().filter_map(|h| h.join().ok()).sum();
    say(&format!("big_picture {threads} {kept} {churn}"));
}

/// Benchmark: several threads malloc and free mixed sizes through glibc.
fn malloc_mt(threads: usize, iters: usize) {
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut keep: Vec<Vec<u8>> = Vec::with_capacity(64);
                for i in 0..iters {
                    let size = [64, 1024, 16 << 10, 200 << 10][(i + t) % 4];
                    keep.push(vec![1u8; size]);
                    if keep.len() >= 64 {
                        keep.drain(..32);
                    }
                }
                keep.len()
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    say(&format!("malloc_mt {} ns", start.elapsed().as_nanos()));
}

/// `iters` rounds of one `malloc` and one `free` (sizes 16 to 1 KiB, 64 blocks kept live at a
/// time) straight through libc: the per-call cost of tracing the allocator (`--heap`).
fn malloc_calls(iters: usize) {
    const LIVE: usize = 64;
    let mut live = [std::ptr::null_mut::<libc::c_void>(); LIVE];
    let start = Instant::now();
    for i in 0..iters {
        let slot = (i * 7) % LIVE;
        // SAFETY: each pointer is from malloc (or null) and freed once before replaced.
        unsafe {
            libc::free(live[slot]);
            live[slot] = libc::malloc(16 + (i * 37) % 1008);
        }
        if live[slot].is_null() {
            eprintln!("malloc failed");
            std::process::exit(1);
        }
    }
    let ns = start.elapsed().as_nanos();
    for p in live {
        // SAFETY: from malloc.
        unsafe { libc::free(p) };
    }
    say(&format!("malloc_calls {ns} ns"));
}

/// Map, touch and unmap 16 pages in a loop for `millis`, pausing `pause_us` between rounds
/// (a steady load for signal tests; the benchmarks' bystander with no pause).
fn spin(millis: u64, pause_us: u64) {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(millis) {
        let a = anon(16 * PAGE);
        touch(a, 16 * PAGE);
        munmap(a, 16 * PAGE);
        n += 1;
        if pause_us > 0 {
            std::thread::sleep(Duration::from_micros(pause_us));
        }
    }
    say(&format!("spin {n}"));
}

/// glibc arenas: `threads` threads each allocate and keep `mib` MiB in 4 KiB blocks.
fn arenas(threads: usize, mib: usize) {
    // No thread ends before all have allocated: glibc gives an ended thread's arena to the
    // next thread, and the threads would share arenas.
    let all_allocated = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let all_allocated = all_allocated.clone();
            std::thread::spawn(move || {
                let n = mib * 256;
                let mut kept = 0usize;
                for _ in 0..n {
                    // SAFETY: malloc of a small block, written once, deliberately kept.
                    let p = unsafe { libc::malloc(4000) } as *mut u8;
                    if !p.is_null() {
                        // SAFETY: within the block.
                        unsafe { std::ptr::write_bytes(p, 1, 4000) };
                        kept += 1;
                    }
                }
                all_allocated.wait();
                kept
            })
        })
        .collect();
    let kept: usize = hs.into_iter().filter_map(|h| h.join().ok()).sum();
    say(&format!("arenas {threads} {kept}"));
}

/// A heap that grows to `mib` MiB and is freed but not trimmed: one block allocated last (at
/// the top of the heap) stays live and pins everything below it.
fn heap_retained(mib: usize) {
    let blocks: Vec<*mut libc::c_void> = (0..mib * 256)
        .map(|_| {
            // SAFETY: malloc of a small block, written once.
            let p = unsafe { libc::malloc(4000) };
            if !p.is_null() {
                // SAFETY: within the block.
                unsafe { std::ptr::write_bytes(p as *mut u8, 1, 4000) };
            }
            p
        })
        .collect();
    // SAFETY: a block that stays allocated at the top of the heap (a size no free list holds,
    // so it comes from the top chunk).
    let pin = unsafe { libc::malloc(5000) };
    for p in blocks {
        // SAFETY: freeing what was allocated above.
        unsafe { libc::free(p) };
    }
    say(&format!("heap_retained {mib} {}", pin as usize));
    std::thread::sleep(Duration::from_millis(100));
}

/// mmap-threshold churn: a fixed threshold, then `n` malloc/free pairs of `kib` KiB.
fn mmap_churn(n: usize, kib: usize) {
    // SAFETY: mallopt with a documented parameter; a fixed threshold disables glibc's
    // dynamic adjustment, as a program or MALLOC_MMAP_THRESHOLD_ does. (glibc only: the
    // static musl builds for other architectures have no mallopt.)
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024)
    };
    for _ in 0..n {
        // SAFETY: malloc, touch, free.
        unsafe {
            let p = libc::malloc(kib * 1024) as *mut u8;
            if !p.is_null() {
                std::ptr::write_bytes(p, 1, kib * 1024);
                libc::free(p.cast());
            }
        }
    }
    say(&format!("mmap_churn {n} {kib}"));
}

/// Allocate and free `mib` MiB in 256 KiB blocks, `rounds` times (purge churn under an
/// allocator that returns free pages at once, e.g. jemalloc with dirty_decay_ms:0).
fn purge(rounds: usize, mib: usize) {
    for _ in 0..rounds {
        let blocks: Vec<*mut u8> = (0..mib * 4)
            .map(|_| {
                // SAFETY: malloc and touch.
                let p = unsafe { libc::malloc(256 * 1024) } as *mut u8;
                if !p.is_null() {
                    // SAFETY: within the block.
                    unsafe { std::ptr::write_bytes(p, 1, 256 * 1024) };
                }
                p
            })
            .collect();
        for p in blocks {
            // SAFETY: freeing what was allocated above.
            unsafe { libc::free(p.cast()) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    say(&format!("purge {rounds} {mib}"));
}

/// A 32-bit compat `mmap2` (int 0x80) from this 64-bit process: the syscall tracepoints do not
/// report compat calls, so vmatrace must not misread it, and `--reconcile` must see the drift.
/// Before it, two compat calls whose i386 numbers are x86-64 memory syscalls' (11 execve is
/// munmap, 12 chdir is brk), both with a NULL path, so they fail with EFAULT. Stays alive for
/// `millis` after printing the address. x86_64 only.
#[cfg(target_arch = "x86_64")]
fn compat_mmap(millis: u64) {
    for nr in [11i32, 12] {
        let ret: i32;
        // SAFETY: i386 execve / chdir with a NULL path: the kernel only returns -EFAULT. rbx
        // (the path) is saved and restored around the call, as LLVM reserves it.
        unsafe {
            std::arch::asm!(
                "push rbx",
                "xor ebx, ebx",
                "int 0x80",
                "pop rbx",
                inlateout("eax") nr => ret,
                in("ecx") 0,
                in("edx") 0,
            );
        }
        say(&format!("compat_lookalike_{nr} {ret}"));
    }
    let ret: i32;
    // SAFETY: the i386 mmap2 syscall (192) with valid arguments; rbx (address hint, 0) and rbp
    // (page offset, 0) are saved and restored around it, as LLVM reserves them.
    unsafe {
        std::arch::asm!(
            "push rbx",
            "push rbp",
            "xor ebx, ebx",
            "xor ebp, ebp",
            "int 0x80",
            "pop rbp",
            "pop rbx",
            inlateout("eax") 192i32 => ret,
            in("ecx") (8 * PAGE) as i32,
            in("edx") libc::PROT_READ | libc::PROT_WRITE,
            in("esi") libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            in("edi") -1i32,
        );
    }
    say(&format!("compat_mmap {}", ret as u32));
    std::thread::sleep(Duration::from_millis(millis));
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The tests count one fault per page, and the kernels they run on may back any anonymous
    // memory with huge pages (Debian's kernels default to THP `always`): only `thp` wants
    // them (and `sparse-scan`, `collapse`). The model reads this setting (`THP_enabled` in /proc/PID/status).
    if !matches!(
        args.get(1).map(String::as_str),
        Some("thp" | "sparse-scan" | "collapse")
    ) {
        // SAFETY: a prctl without pointers; it only changes this process's THP setting.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    match args.get(1).map(String::as_str) {
        Some("basic") => basic(),
        Some("ids") => ids(),
        Some("thp") => thp(),
        Some("sparse-scan") => sparse_scan(),
        Some("collapse") => collapse(),
        Some("vfork-map") => vfork_map(),
        Some("pretouched") => pretouched(),
        Some("checkpoints") => checkpoints(),
        Some("threads") => threads(arg(&args, 2, 4), arg(&args, 3, 16)),
        Some("map-race") => map_race(arg(&args, 2, 8), arg(&args, 3, 300), arg(&args, 4, 1) != 0),
        Some("fail") => fail(),
        Some("file") => file(),
        Some("fork") => fork(),
        Some("burst") => burst(arg(&args, 2, 1 << 16)),
        Some("ipc") => ipc(),
        Some("fork-burst") => fork_burst(arg(&args, 2, 200)),
        Some("many-threads") => many_threads(arg(&args, 2, 2000)),
        Some("fork-checkpoint") => fork_checkpoint(),
        #[cfg(target_arch = "x86_64")]
        Some("compat-mmap") => compat_mmap(arg(&args, 2, 3000) as u64),
        Some("arenas") => arenas(arg(&args, 2, 8), arg(&args, 3, 8)),
        Some("heap-retained") => heap_retained(arg(&args, 2, 64)),
        Some("mmap-churn") => mmap_churn(arg(&args, 2, 500), arg(&args, 3, 512)),
        Some("purge") => purge(arg(&args, 2, 20), arg(&args, 3, 16)),
        Some("wait-then-map") => wait_then_map(),
        Some("fault-loop") => fault_loop(arg(&args, 2, 200), arg(&args, 3, 256)),
        Some("churn") => churn(arg(&args, 2, 20_000)),
        Some("two-sites") => two_sites(arg(&args, 2, 20_000), arg(&args, 3, 0) as u64),
        Some("churn-threads") => churn_threads(arg(&args, 2, 2), arg(&args, 3, 20_000)),
        Some("churn-then-stop") => churn_then_stop(arg(&args, 2, 3000), arg(&args, 3, 0) as u64),
        Some("getppid") => getppid_loop(arg(&args, 2, 1_000_000)),
        Some("migrate") => migrate(arg(&args, 2, 100)),
        Some("vma-ids") => vma_ids(),
        Some("big-picture") => {
            big_picture(arg(&args, 2, 4), arg(&args, 3, 8), arg(&args, 4, 60_000))
        }
        Some("busy") => busy(arg(&args, 2, 4), arg(&args, 3, 10) as u64),
        Some("malloc-mt") => malloc_mt(arg(&args, 2, 4), arg(&args, 3, 100_000)),
        Some("malloc-calls") => malloc_calls(arg(&args, 2, 1_000_000)),
        Some("read-only") => read_only(),
        Some("spin") => spin(arg(&args, 2, 1000) as u64, arg(&args, 3, 0) as u64),
        Some("exit") => std::process::exit(arg(&args, 2, 0) as i32),
        Some("leader-exits-first") => leader_exits_first(arg(&args, 2, 300) as u64),
        Some("reexec") => reexec(arg(&args, 2, 0)),
        Some("residency") => residency(),
        Some("stacks") => stacks_scenario(),
        Some("fork-advice") => fork_advice(),
        Some("lossy") => lossy(),
        Some("hostile-names") => hostile_names(
            args.get(2).map_or("/tmp", String::as_str),
            args.get(3).is_some_and(|w| w == "wait"),
        ),
        Some("fd-reuse") => fd_reuse(args.get(2).map_or("/tmp", String::as_str)),
        _ => {
            eprintln!(
                "usage: workload basic|ids|thp|sparse-scan|read-only|collapse|vfork-map|pretouched|checkpoints|threads N P|fail|file|fork|burst N|ipc|fork-burst N|many-threads N|fork-checkpoint|compat-mmap MS|arenas T MIB|heap-retained MIB|mmap-churn N KIB|purge ROUNDS MIB|wait-then-map|fault-loop I P|churn I|two-sites I [PAUSE_US]|getppid I|migrate I|malloc-mt T I|malloc-calls I|spin MS [PAUSE_US]|exit CODE|leader-exits-first MS|reexec PAGES|residency|fork-advice|lossy|hostile-names DIR [wait]|fd-reuse DIR"
            );
            std::process::exit(2);
        }
    }
}
