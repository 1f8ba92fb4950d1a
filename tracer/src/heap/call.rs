//! Allocator calls: the functions vmatrace probes, the raw entry and return records the kernel
//! writes, and the paired call that the model applies and recordings hold.

use tracer_common::{
    EventHeader, EventKind, HEAP_CHUNK, HEAP_RETURN, HEAP_STACK_WORDS, HeapEvent, HeapStack,
};

use crate::event::DecodeError;

/// The allocator a library is, from the symbols it defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Allocator {
    /// glibc's malloc (ptmalloc): block sizes from its chunk headers, arenas, `malloc_trim`.
    Glibc,
    /// jemalloc (`mallocx` and friends).
    Jemalloc,
    /// gperftools' tcmalloc (`tc_malloc`).
    Tcmalloc,
    /// Another library that defines `malloc` and `free` (mimalloc, a static allocator, ...).
    Other,
}

impl Allocator {
    /// Every allocator, in name order of [`Allocator::name`]'s output.
    pub const ALL: [Self; 4] = [Self::Glibc, Self::Jemalloc, Self::Tcmalloc, Self::Other];

    /// The name in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Glibc => "glibc",
            Self::Jemalloc => "jemalloc",
            Self::Tcmalloc => "tcmalloc",
            Self::Other => "other",
        }
    }

    /// Parses [`Allocator::name`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

crate::by_name::serde_by_name!(Allocator, "allocator");

/// An allocator function vmatrace probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeapFn {
    Malloc,
    Calloc,
    Realloc,
    Reallocarray,
    Free,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    MallocTrim,
    /// jemalloc's non-standard API.
    Mallocx,
    Rallocx,
    Xallocx,
    Sdallocx,
    Dallocx,
    /// C++ `operator new` and `new[]` (every variant: the size is the first argument), where
    /// the allocator defines them itself (jemalloc, tcmalloc).
    New,
    /// C++ `operator delete` and `delete[]` (every variant).
    Delete,
    /// `free_sized`, `free_aligned_sized`, tcmalloc's `tc_free_sized`.
    FreeSized,
}

impl HeapFn {
    /// Every function, in declaration order.
    pub const ALL: [Self; 19] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Reallocarray,
        Self::Free,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
        Self::MallocTrim,
        Self::Mallocx,
        Self::Rallocx,
        Self::Xallocx,
        Self::Sdallocx,
        Self::Dallocx,
        Self::New,
        Self::Delete,
        Self::FreeSized,
    ];

    /// The name in output (`call`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Reallocarray => "reallocarray",
            Self::Free => "free",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::MallocTrim => "malloc_trim",
            Self::Mallocx => "mallocx",
            Self::Rallocx => "rallocx",
            Self::Xallocx => "xallocx",
            Self::Sdallocx => "sdallocx",
            Self::Dallocx => "dallocx",
            Self::New => "operator_new",
            Self::Delete => "operator_delete",
            Self::FreeSized => "free_sized",
        }
    }

    /// Parses [`HeapFn::name`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The function a library symbol names, if vmatrace probes it. Aliases (`cfree`,
    /// `__libc_malloc`, tcmalloc's `tc_*`) are at the same address as the standard name and
    /// probed once.
    pub fn from_symbol(symbol: &str) -> Option<Self> {
        Some(match symbol {
            "malloc" | "tc_malloc" | "tc_malloc_skip_new_handler" => Self::Malloc,
            "calloc" | "tc_calloc" => Self::Calloc,
            "realloc" | "tc_realloc" => Self::Realloc,
            "reallocarray" => Self::Reallocarray,
            "free" | "cfree" | "tc_free" | "tc_cfree" => Self::Free,
            "posix_memalign" | "tc_posix_memalign" => Self::PosixMemalign,
            "aligned_alloc" => Self::AlignedAlloc,
            "memalign" | "tc_memalign" => Self::Memalign,
            "valloc" | "tc_valloc" => Self::Valloc,
            "pvalloc" | "tc_pvalloc" => Self::Pvalloc,
            "malloc_trim" => Self::MallocTrim,
            "mallocx" => Self::Mallocx,
            "rallocx" => Self::Rallocx,
            "xallocx" => Self::Xallocx,
            "sdallocx" => Self::Sdallocx,
            "dallocx" => Self::Dallocx,
            "free_sized" | "free_aligned_sized" | "tc_free_sized" => Self::FreeSized,
            "tc_new" | "tc_newarray" | "tc_new_nothrow" | "tc_newarray_nothrow" => Self::New,
            "tc_delete"
            | "tc_deletearray"
            | "tc_delete_nothrow"
            | "tc_deletearray_nothrow"
            | "tc_delete_sized"
            | "tc_deletearray_sized" => Self::Delete,
            // operator new/new[] (size_t[, align_val_t][, nothrow_t const&]).
            s if s.starts_with("_Znwm") || s.starts_with("_Znam") => Self::New,
            // operator delete/delete[] (void*[, size_t][, align_val_t][, nothrow_t const&]).
            s if s.starts_with("_ZdlPv") || s.starts_with("_ZdaPv") => Self::Delete,
            _ => return None,
        })
    }

    /// Whether the return is probed too (the call's result matters); frees have no result.
    pub fn has_return(self) -> bool {
        !matches!(
            self,
            Self::Free | Self::FreeSized | Self::Delete | Self::Sdallocx | Self::Dallocx
        )
    }

    /// Whether the first argument is a block the call may free (its glibc size word is read
    /// at the entry).
    pub fn frees_first_argument(self) -> bool {
        matches!(
            self,
            Self::Free
                | Self::FreeSized
                | Self::Delete
                | Self::Sdallocx
                | Self::Dallocx
                | Self::Realloc
                | Self::Reallocarray
                | Self::Rallocx
        )
    }
}

crate::by_name::serde_by_name!(HeapFn, "allocator call");

/// The registers and top of the user stack at an allocator function's entry: what the call
/// site is unwound from when the code that called the function is a wrapper (`operator new`,
/// `__rust_alloc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryStack {
    /// As a stack record's: x86_64 `[ip, sp, bp, 0]`; aarch64 `[pc, sp, fp, lr]`, with `sp`
    /// the function's own (on x86_64 the return address is the first word).
    pub regs: [u64; 4],
    /// The stack from `regs[1]` up.
    pub words: [u64; HEAP_STACK_WORDS],
}

impl EntryStack {
    /// The copied stack as bytes, as a stack record holds it.
    pub fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// Whether `bytes` is a [`HeapStack`] record (by its kind).
    pub fn is(bytes: &[u8]) -> bool {
        bytes.len() >= size_of::<EventHeader>()
            && bytes[..4] == (EventKind::HeapStack as u32).to_ne_bytes()
    }

    /// The [`HeapStack`] record in `bytes` (its header, and the stack), or `None` when the
    /// record is of another kind.
    pub fn decode(bytes: &[u8]) -> Result<Option<(EventHeader, EntryStack)>, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Ok(None);
        }
        // SAFETY: the length was checked; plain-old-data ABI types read unaligned.
        let header: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if header.kind != EventKind::HeapStack as u32 {
            return Ok(None);
        }
        if bytes.len() < size_of::<HeapStack>() {
            return Err(DecodeError::Short {
                got: bytes.len(),
                need: size_of::<HeapStack>(),
            });
        }
        // SAFETY: as above.
        let rec: HeapStack = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Ok(Some((
            header,
            EntryStack {
                regs: rec.regs,
                words: rec.words,
            },
        )))
    }

    /// The stack pointer the entry's call returns with (the [`HeapRaw::sp`] of the entry it
    /// belongs to).
    pub fn return_sp(&self) -> u64 {
        self.regs[1].wrapping_add(RETURN_ADDRESS_BYTES)
    }

    /// The address the call returns to (x86-64: the word at `sp`; arm64: the link register),
    /// which is the paired call's `caller`.
    pub fn return_address(&self) -> u64 {
        if cfg!(target_arch = "x86_64") {
            self.words[0]
        } else {
            self.regs[3]
        }
    }
}

/// On x86_64 an allocator function's entry is stamped with the stack pointer the call returns
/// with, above the return address `call` pushed; its own is one word lower.
#[cfg(target_arch = "x86_64")]
const RETURN_ADDRESS_BYTES: u64 = 8;
#[cfg(not(target_arch = "x86_64"))]
const RETURN_ADDRESS_BYTES: u64 = 0;

/// One raw record of the kernel: an allocator function's entry or return, not yet paired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapRaw {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// A return (else an entry).
    pub ret: bool,
    /// The last two argument words hold a glibc chunk header (see `tracer_common::HeapEvent`).
    pub chunk: bool,
    /// Entry: the function's address; return: the address returned to.
    pub ip: u64,
    /// The stack pointer once the call has returned (equal for an entry and its return).
    pub sp: u64,
    pub args: [u64; 4],
    /// An entry's registers and stack words, when the kernel wrote them (a call returning
    /// into a wrapper, see [`EntryStack`]).
    pub stack: Option<Box<EntryStack>>,
}

impl HeapRaw {
    /// From the kernel's record.
    pub fn from_event(e: &HeapEvent) -> Self {
        let d = e.header.detail;
        let ret = d & HEAP_RETURN != 0;
        Self {
            stack: None,
            ts_ns: e.header.ts_ns,
            pid: e.header.tgid,
            tid: e.header.tid,
            ret,
            chunk: d & HEAP_CHUNK != 0,
            ip: e.ip,
            sp: e.sp,
            args: e.args,
        }
    }
}

/// glibc's chunk size bits: the chunk was mmapped, and it belongs to a non-main arena.
const IS_MMAPPED: u64 = 0x2;
const NON_MAIN_ARENA: u64 = 0x4;
const SIZE_BITS: u64 = 0x7;

/// What a glibc chunk header says about a block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Bytes the allocator holds for the block: the chunk size, and for a mmapped chunk the
    /// whole mapping (`prev_size` holds the alignment offset before it).
    pub bytes: u64,
    /// A chunk with its own mapping (above the mmap threshold).
    pub mmapped: bool,
    /// A chunk of a thread arena (not the main heap).
    pub thread_arena: bool,
}

impl Chunk {
    /// Decodes a chunk's `prev_size` and size words, checked against the size asked for
    /// (`requested`; 0 when not known): None when the words are not a plausible header.
    pub fn decode(prev_size: u64, size_word: u64, requested: u64) -> Option<Self> {
        let size = size_word & !SIZE_BITS;
        let mmapped = size_word & IS_MMAPPED != 0;
        let bytes = if mmapped {
            prev_size.checked_add(size)?
        } else {
            size
        };
        // Chunks are at least 32 bytes, 16-byte aligned, smaller than any address space.
        if size < 32 || !size.is_multiple_of(16) || bytes >= 1 << 47 || size < requested {
            return None;
        }
        Some(Self {
            bytes,
            mmapped,
            thread_arena: !mmapped && size_word & NON_MAIN_ARENA != 0,
        })
    }
}

/// One allocator call, its entry and return paired (a call without a return probe is its
/// entry alone): what recordings hold and the live model applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapCall {
    /// When it took effect: the return (the entry for calls without a return).
    pub ts_ns: u64,
    pub enter_ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub func: HeapFn,
    pub allocator: Allocator,
    /// The first three arguments.
    pub args: [u64; 3],
    /// The raw return value (0 for calls without a return).
    pub ret: u64,
    /// The block the call returned (0: none).
    pub ptr: u64,
    /// The allocator's header of that block, when read (glibc).
    pub chunk: Option<Chunk>,
    /// The allocator's header of the block freed or reallocated (`args[0]`), when read
    /// (glibc; its mmapped size without the alignment offset).
    pub freed_chunk: Option<Chunk>,
    /// The call site: the address the call returned to (0: not known, as for frees).
    pub caller: u64,
    /// The call site's stack (the id of a `stack` record), named while recording.
    pub stack: Option<u64>,
    /// The entry's registers and stack words, to unwind the call site through wrappers
    /// (live only: not in recordings).
    pub entry_stack: Option<Box<EntryStack>>,
}

/// What a call does to the live blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallEffect {
    /// The block freed (or given up by a moving realloc).
    pub freed: Option<u64>,
    /// The block allocated and the bytes asked for.
    pub allocated: Option<(u64, u64)>,
    /// A block resized in place (`xallocx`), to this many bytes.
    pub resized: Option<(u64, u64)>,
}

impl HeapCall {
    /// A glibc call of `pid`'s main thread that returned `ptr` (also its raw return value) at
    /// `ts_ns`, entered just before, without headers, call site or stack (tests, synthetic
    /// input).
    pub fn at(ts_ns: u64, pid: u32, func: HeapFn, args: [u64; 3], ptr: u64) -> Self {
        Self {
            ts_ns,
            enter_ts_ns: ts_ns.saturating_sub(1),
            pid,
            tid: pid,
            func,
            allocator: Allocator::Glibc,
            args,
            ret: ptr,
            ptr,
            chunk: None,
            freed_chunk: None,
            caller: 0,
            stack: None,
            entry_stack: None,
        }
    }

    /// The bytes asked for by an allocating call.
    pub fn requested(&self) -> u64 {
        let [a0, a1, a2] = self.args;
        match self.func {
            HeapFn::Malloc | HeapFn::Valloc | HeapFn::Mallocx | HeapFn::New => a0,
            HeapFn::Pvalloc => a0.saturating_add(4095) & !4095,
            HeapFn::Calloc => a0.saturating_mul(a1),
            HeapFn::Realloc | HeapFn::Rallocx | HeapFn::AlignedAlloc | HeapFn::Memalign => a1,
            HeapFn::Reallocarray => a1.saturating_mul(a2),
            HeapFn::PosixMemalign => a2,
            HeapFn::Xallocx => self.ret,
            HeapFn::Free
            | HeapFn::FreeSized
            | HeapFn::Delete
            | HeapFn::Sdallocx
            | HeapFn::Dallocx
            | HeapFn::MallocTrim => 0,
        }
    }

    /// What the call did: which block it freed, allocated or resized.
    pub fn effect(&self) -> CallEffect {
        let a0 = self.args[0];
        let mut e = CallEffect::default();
        match self.func {
            HeapFn::Free
            | HeapFn::FreeSized
            | HeapFn::Delete
            | HeapFn::Sdallocx
            | HeapFn::Dallocx => {
                e.freed = (a0 != 0).then_some(a0);
            }
            HeapFn::Realloc | HeapFn::Reallocarray | HeapFn::Rallocx => {
                let size = self.requested();
                if self.ptr != 0 {
                    e.freed = (a0 != 0).then_some(a0);
                    e.allocated = Some((self.ptr, size));
                } else if size == 0 && a0 != 0 && self.func != HeapFn::Rallocx {
                    // realloc(p, 0) frees p and returns NULL (glibc, jemalloc, tcmalloc).
                    e.freed = Some(a0);
                }
            }
            HeapFn::Xallocx => {
                if a0 != 0 && self.ret != 0 {
                    e.resized = Some((a0, self.ret));
                }
            }
            HeapFn::PosixMemalign => {
                if self.ret == 0 && self.ptr != 0 {
                    e.allocated = Some((self.ptr, self.requested()));
                }
            }
            HeapFn::MallocTrim => {}
            HeapFn::Malloc
            | HeapFn::Calloc
            | HeapFn::AlignedAlloc
            | HeapFn::Memalign
            | HeapFn::Valloc
            | HeapFn::Pvalloc
            | HeapFn::Mallocx
            | HeapFn::New => {
                if self.ptr != 0 {
                    e.allocated = Some((self.ptr, self.requested()));
                }
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heap_stack_record_decodes_to_the_entry_it_belongs_to() {
        let mut rec = HeapStack {
            header: EventHeader {
                kind: EventKind::HeapStack as u32,
                tgid: 3,
                tid: 4,
                detail: 0,
                ts_ns: 10,
            },
            regs: [0x7000, 0x9000, 0x9100, 0],
            ..HeapStack::default()
        };
        rec.words[0] = 0x4242;
        // SAFETY: test helper over a plain-old-data ABI type.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const HeapStack).cast::<u8>(),
                size_of::<HeapStack>(),
            )
        };
        assert!(EntryStack::is(bytes));
        let (header, stack) = EntryStack::decode(bytes)
            .expect("decodes")
            .expect("a stack");
        assert_eq!((header.tgid, header.tid, header.ts_ns), (3, 4, 10));
        assert_eq!(stack.regs, rec.regs);
        // On x86_64 the entry's own sp is one word below the one its call returns with.
        assert_eq!(stack.return_sp(), 0x9000 + RETURN_ADDRESS_BYTES);
        assert_eq!(stack.bytes()[..8], 0x4242u64.to_ne_bytes());
        assert!(EntryStack::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut other = bytes.to_vec();
        other[..4].copy_from_slice(&(EventKind::Heap as u32).to_ne_bytes());
        assert_eq!(EntryStack::decode(&other), Ok(None));
        assert!(!EntryStack::is(&other));
    }

    #[test]
    fn symbols_name_the_functions_and_aliases() {
        assert_eq!(HeapFn::from_symbol("malloc"), Some(HeapFn::Malloc));
        assert_eq!(HeapFn::from_symbol("tc_malloc"), Some(HeapFn::Malloc));
        assert_eq!(
            HeapFn::from_symbol("_ZnwmSt11align_val_t"),
            Some(HeapFn::New)
        );
        assert_eq!(HeapFn::from_symbol("_ZdlPvm"), Some(HeapFn::Delete));
        assert_eq!(HeapFn::from_symbol("malloc_usable_size"), None);
        for f in HeapFn::ALL {
            assert_eq!(HeapFn::parse(f.name()), Some(f));
        }
        for a in Allocator::ALL {
            assert_eq!(Allocator::parse(a.name()), Some(a));
        }
    }

    #[test]
    fn chunk_headers_are_decoded_and_implausible_ones_refused() {
        // A 48-byte in-use chunk of the main heap (PREV_INUSE set).
        assert_eq!(
            Chunk::decode(0, 48 | 1, 40),
            Some(Chunk {
                bytes: 48,
                mmapped: false,
                thread_arena: false
            })
        );
        // A thread arena's chunk.
        assert!(Chunk::decode(0, 64 | 4 | 1, 50).is_some_and(|c| c.thread_arena));
        // A mmapped chunk with 4080 bytes of alignment before it.
        assert_eq!(
            Chunk::decode(4080, (1 << 20) | 2, 1000),
            Some(Chunk {
                bytes: (1 << 20) + 4080,
                mmapped: true,
                thread_arena: false
            })
        );
        assert_eq!(Chunk::decode(0, 0, 0), None);
        assert_eq!(Chunk::decode(0, 24, 0), None);
        assert_eq!(Chunk::decode(0, 48, 100), None, "smaller than asked");
        assert_eq!(Chunk::decode(0, u64::MAX, 0), None);
    }

    fn call(func: HeapFn, args: [u64; 3], ret: u64, ptr: u64) -> HeapCall {
        HeapCall {
            ret,
            ..HeapCall::at(2, 1, func, args, ptr)
        }
    }

    #[test]
    fn effects_follow_each_functions_contract() {
        let e = call(HeapFn::Calloc, [10, 24, 0], 0x1000, 0x1000).effect();
        assert_eq!(e.allocated, Some((0x1000, 240)));
        // realloc: moves, fails, frees with size 0, allocates from NULL.
        let e = call(HeapFn::Realloc, [0x1000, 500, 0], 0x2000, 0x2000).effect();
        assert_eq!((e.freed, e.allocated), (Some(0x1000), Some((0x2000, 500))));
        let e = call(HeapFn::Realloc, [0x1000, 500, 0], 0, 0).effect();
        assert_eq!(e, CallEffect::default(), "a failed realloc keeps the block");
        let e = call(HeapFn::Realloc, [0x1000, 0, 0], 0, 0).effect();
        assert_eq!((e.freed, e.allocated), (Some(0x1000), None));
        let e = call(HeapFn::Realloc, [0, 64, 0], 0x3000, 0x3000).effect();
        assert_eq!((e.freed, e.allocated), (None, Some((0x3000, 64))));
        let e = call(HeapFn::Reallocarray, [0, 8, 9], 0x3000, 0x3000).effect();
        assert_eq!(e.allocated, Some((0x3000, 72)));
        // posix_memalign reports through its pointer: only a 0 return allocated.
        let e = call(HeapFn::PosixMemalign, [0x7ff0, 64, 100], 0, 0x4000).effect();
        assert_eq!(e.allocated, Some((0x4000, 100)));
        let e = call(HeapFn::PosixMemalign, [0x7ff0, 64, 100], 12, 0).effect();
        assert_eq!(e.allocated, None);
        assert_eq!(
            call(HeapFn::Free, [0, 0, 0], 0, 0).effect(),
            CallEffect::default()
        );
        assert_eq!(
            call(HeapFn::Pvalloc, [1, 0, 0], 0x5000, 0x5000)
                .effect()
                .allocated,
            Some((0x5000, 4096))
        );
        let e = call(HeapFn::Xallocx, [0x6000, 100, 50], 160, 0).effect();
        assert_eq!(e.resized, Some((0x6000, 160)));
    }
}
