//! The allocator's own view (`--heap`): uprobes on the allocator functions of the traced
//! processes, their entries and returns paired into calls, and the live blocks those calls
//! leave, per process and per heap region.
//!
//! | file | what |
//! |---|---|
//! | `call.rs` | the probed functions, the kernel's raw records, a paired call and its effect |
//! | `elf.rs` | which mapped files are allocators and where their functions are |
//! | `tracker.rs` | the live side: which files to probe, attaching, pairing |
//! | `pairing.rs` | entries and returns paired per thread (pure) |
//! | `live.rs` | live blocks per process (pure, applied by the session) |
//! | `regions.rs` | live, touched and retained bytes per heap region, and what pins them |
//! | `pymalloc.rs` | CPython's object arenas, read from their pool headers |
//! | `record.rs` | the `heap` and `heap_attach` NDJSON records |
//! | `findings.rs` | the diagnosis: live data, retained free memory, what each setting would give back |

pub mod call;
pub mod elf;
pub mod findings;
pub mod live;
pub mod pairing;
pub mod pymalloc;
pub mod record;
pub mod regions;
pub mod tracker;

pub use call::{Allocator, Chunk, HeapCall, HeapFn, HeapRaw};
pub use live::{Block, HeapEffect, LiveHeap, LiveKind};
