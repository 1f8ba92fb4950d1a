//! Huge pages the kernel makes from small ones without a fault: khugepaged, in the
//! background, and `madvise(MADV_COLLAPSE)`, within the call. Either fills the rest of a
//! 2 MiB block (zero pages, pages never touched) with anonymous memory, which no fault event
//! reports. The daemon looks at the blocks that may have been collapsed (the model's
//! [`AddressSpace::collapsible`]) in `/proc/PID/pagemap`: after each `MADV_COLLAPSE`, and
//! whenever khugepaged's system-wide count of collapses has moved. What it finds becomes an
//! [`Event::Collapse`], recorded (`collapse`) so that a replay applies it too.

use crate::{
    call::{MemCall, linux::MADV_COLLAPSE},
    event::{Event, SyscallRecord},
    model::AddressSpace,
    pagemap, procfs,
    session::Session,
};

/// khugepaged's count of collapses, as last seen.
#[derive(Debug)]
pub struct Khugepaged {
    seen: Option<u64>,
}

impl Default for Khugepaged {
    /// Starts from the count now.
    fn default() -> Self {
        Self {
            seen: procfs::khugepaged_collapses(),
        }
    }
}

impl Khugepaged {
    /// Whether khugepaged has collapsed pages (in any process) since the last look.
    pub fn collapsed_since(&mut self) -> bool {
        let now = procfs::khugepaged_collapses();
        let moved = now.is_some() && now != self.seen;
        self.seen = now;
        moved
    }
}

/// The range a successful `MADV_COLLAPSE` acted on, and whose process.
pub fn advised(s: &SyscallRecord) -> Option<(u32, u64, u64)> {
    if s.errno().is_some() {
        return None;
    }
    let call = s.mem();
    let (addr, len, advice) = call.advice()?;
    let pid = match call {
        MemCall::ProcessMadvise { .. } => s.resolved.target_pid.unwrap_or(s.pid),
        _ => s.pid,
    };
    (advice == MADV_COLLAPSE).then(|| (pid, addr, addr.saturating_add(len)))
}

/// The huge pages of `pid` that a map just read from `/proc` (an attach, a resync after lost
/// events) holds: the seed reads their pages from pagemap as small ones, so each 2 MiB block
/// the kernel holds as one huge page (a fault's, khugepaged's, a `MADV_COLLAPSE` whose call
/// was lost) is found as after a collapse, as events at `ts_ns`.
pub fn in_seed(session: &Session, pid: u32, ts_ns: u64) -> Vec<Event> {
    session
        .space_of(pid)
        .map(|space| found(pid, space, (0, u64::MAX), true, ts_ns))
        .unwrap_or_default()
}

/// The collapses of `pid`'s blocks in `[start, end)` that pagemap shows now, as events at
/// `ts_ns` (none when the process is gone); `advised`: by `MADV_COLLAPSE`, else khugepaged.
pub fn found(
    pid: u32,
    space: &AddressSpace,
    (start, end): (u64, u64),
    advised: bool,
    ts_ns: u64,
) -> Vec<Event> {
    let blocks = space.collapsible(start, end, advised);
    match pagemap::huge_blocks(pid, &blocks) {
        Ok(huge) => huge
            .into_iter()
            .map(|start| Event::Collapse { ts_ns, pid, start })
            .collect(),
        Err(e) => {
            log::debug!(
                "cannot look for collapsed huge pages of {pid}: {}",
                crate::errors::Chain(&e)
            );
            Vec::new()
        }
    }
}
