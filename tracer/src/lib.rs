//! vmatrace: an eBPF tracer of a process's memory syscalls, page faults and VMAs.
//!
//! Data flow: `probe` (eBPF load, attach, ring buffer) -> `event` (typed events) -> `order`
//! (back in time order) -> `session`
//! (one address space per process) -> `model` (pure VMA and page model) -> `output`.
//! `replay` feeds recorded events into the same `session`.

pub mod analysis;
pub mod applied;
mod by_name;
pub mod call;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod collapse;
pub mod config;
pub mod convert;
pub mod driver;
pub mod errors;
pub mod event;
pub mod fault_access;
pub mod finding;
pub mod flags;
pub mod generate;
pub mod heap;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod name;
pub mod order;
pub mod output;
pub mod pagemap;
pub mod probe;
pub mod procfs;
pub mod recording;
pub mod remote;
pub mod replay;
pub mod residency;
pub mod run;
pub mod session;
pub mod signals;
pub mod stacks;
pub mod sudo;
