//! What a live run is asked to do (from the command line), apart from how it does it
//! (`run`), so that the output side can read it without depending on the run.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::{
    output::{FaultFilter, live_view::ViewOptions, records::Format},
    probe::{ChangeOrder, ExitRule, FaultBackend, StackOptions, SyscallBackend},
};

/// Everything a live run needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub pids: Vec<u32>,
    /// Trace the processes of this cgroup (v2) and those that join it (`--cgroup`).
    pub cgroup: Option<PathBuf>,
    pub command: Vec<OsString>,
    pub follow: bool,
    pub json: bool,
    /// How records are written when `json` (NDJSON or binary).
    pub format: Format,
    pub output: Option<PathBuf>,
    pub force: bool,
    pub duration: Option<Duration>,
    pub faults: FaultFilter,
    pub backend: FaultBackend,
    pub syscall_backend: SyscallBackend,
    pub change_order: ChangeOrder,
    pub exit_rule: ExitRule,
    pub ring_bytes: u32,
    pub user: Option<String>,
    pub reconcile: Option<Duration>,
    /// Print allocator and address-space findings at the end.
    pub report: bool,
    /// How human output shows events (roll-up, `-v`, `--quiet`, `--min-size`).
    pub view: ViewOptions,
    /// `vmatrace record` (for the banner and the status line).
    pub recording: bool,
    /// Trace the allocator functions too (`--heap`).
    pub heap: bool,
    /// User stacks of syscalls and faults (`--stacks`, `--fault-stacks`, `--stack-bytes`).
    pub stacks: StackOptions,
    /// `--max-size`, `--max-files`: the output rotated.
    pub rotation: Option<crate::output::rotate::Rotation>,
    /// `--snapshot-every`.
    pub snapshot_every: Option<Duration>,
    /// Serve Prometheus metrics on this address (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}
