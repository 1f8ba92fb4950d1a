//! What applying an event to the session did (`crate::session::Session::apply`): read by the
//! outputs and by the call-site tables, which must not depend on the session itself.

use crate::{
    heap::HeapEffect,
    model::{Effect, FaultEffect},
};

/// What the session did with an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Syscall {
        pid: u32,
        effect: Effect,
    },
    /// A failed syscall: nothing changed.
    Failed {
        errno: i32,
    },
    Fault(FaultEffect),
    /// A process was forked; `traced` when its model was created; `shares_vm` when it shares
    /// its parent's memory (its model is the parent's).
    Fork {
        child: u32,
        traced: bool,
        shares_vm: bool,
    },
    /// The process's map was cleared; the caller should [`crate::session::Session::reseed`] it.
    Exec,
    Exit,
    /// An allocator call or coverage (`--heap`) applied to the live blocks.
    Heap(HeapEffect),
    /// A block became a huge page without a fault: `pages` became resident or anonymous.
    Collapsed {
        pages: u64,
    },
    /// The event is not about a traced process.
    Ignored,
}
