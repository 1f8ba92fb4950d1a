//! The pure address-space model: VMAs, heap, touched pages and history, rebuilt from events.
//! Nothing here does I/O; `session` feeds it and `procfs` seeds it.

pub mod address_space;
pub mod ids;
pub mod normalize;
pub mod pages;
pub mod thp;
pub mod timeline;
pub mod vma;

pub use address_space::{AddressSpace, Effect, EffectKind, FaultEffect};
pub use pages::{PageCounts, ResidentRun, Touch, TouchKind};
pub use thp::{PMD_PAGES, ThpPolicy};
pub use vma::{Backing, ForkAdvice, PAGE_SIZE, Perms, ThpAdvice, Vma};

#[cfg(test)]
mod reference_tests;
