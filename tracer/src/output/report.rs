//! Derived views of a session shared by every output format: snapshot rows and the end-of-run
//! summary. Both are plain data (serde) so that NDJSON and human output agree.

use serde::{Deserialize, Serialize};

use crate::{
    model::{TouchKind, Vma, timeline::Cause},
    probe::KernelStats,
    session::{Process, Session},
    stacks::sites::{self, SiteRow},
};

/// One VMA of a snapshot (replay reads back what it needs: the fields that describe the
/// VMA, not its counts, may be absent).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmaRow {
    pub start: u64,
    pub end: u64,
    /// The mapping the VMA belongs to (`model::ids`): the one at its start.
    #[serde(default)]
    pub id: u64,
    /// When the kernel merged several mappings into this VMA: each one's `[start, end, id]`.
    #[serde(default)]
    pub parts: Option<Vec<[u64; 3]>>,
    pub perms: String,
    #[serde(default)]
    pub offset: u64,
    pub path: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub inode: u64,
    #[serde(default)]
    pub reserved_bytes: u64,
    /// Bytes backed by memory (anonymous or page cache) after a first touch.
    #[serde(default)]
    pub touched_bytes: u64,
    /// Of those, private anonymous bytes.
    #[serde(default)]
    pub anon_bytes: u64,
    /// Pages that were read but only map the shared zero page.
    #[serde(default)]
    pub zero_page_bytes: u64,
    /// Of the touched bytes, those in transparent huge pages.
    #[serde(default)]
    pub huge_bytes: u64,
    /// Of the touched bytes, those touched again after `munmap` or `madvise` released them.
    #[serde(default)]
    pub refaulted_bytes: u64,
    /// `huge` (`MADV_HUGEPAGE`), `nohuge` (`MADV_NOHUGEPAGE`) or none.
    #[serde(default)]
    pub thp_advice: Option<String>,
    /// Of the anonymous bytes, those freed lazily (`MADV_FREE`) and not seen reclaimed.
    #[serde(default)]
    pub lazyfree_bytes: u64,
    /// `dontfork` (`MADV_DONTFORK`), `wipeonfork` (`MADV_WIPEONFORK`), both, or none.
    #[serde(default)]
    pub fork_advice: Option<String>,
    /// The VMA has had private anonymous pages, so `fork` copies its pages.
    #[serde(default)]
    pub anon_vma: bool,
    #[serde(default)]
    pub created_ns: u64,
    #[serde(default)]
    pub first_touch_ns: Option<u64>,
}

/// The rows of one process's map.
pub fn vma_rows(p: &Process) -> Vec<VmaRow> {
    p.space.vmas().map(|v| row(p, v)).collect()
}

fn row(p: &Process, v: &Vma) -> VmaRow {
    let c = p.space.pages_in(v.start, v.end);
    let page = crate::model::PAGE_SIZE;
    let ids = p.space.ids().ranges_in(v.start, v.end);
    VmaRow {
        start: v.start,
        end: v.end,
        id: p.space.ids().at(v.start).unwrap_or(0),
        parts: (ids.len() > 1).then(|| ids.iter().map(|&(s, e, id)| [s, e, id]).collect()),
        perms: v.perms.to_string(),
        offset: v.offset,
        path: p.space.maps_path(v),
        kind: v.backing.kind().to_string(),
        inode: match &v.backing {
            crate::model::Backing::File { inode, .. } => *inode,
            crate::model::Backing::Shm { shmid, .. } => *shmid,
            _ => 0,
        },
        reserved_bytes: v.len(),
        touched_bytes: c.resident() * page,
        anon_bytes: c.anon * page,
        zero_page_bytes: c.zero * page,
        huge_bytes: c.huge * page,
        refaulted_bytes: c.refaulted * page,
        thp_advice: v.thp.name().map(str::to_string),
        lazyfree_bytes: c.lazyfree * page,
        fork_advice: match (v.fork.dont_copy, v.fork.wipe) {
            (false, false) => None,
            (true, false) => Some("dontfork".to_string()),
            (false, true) => Some("wipeonfork".to_string()),
            (true, true) => Some("dontfork,wipeonfork".to_string()),
        },
        anon_vma: v.anon_vma,
        created_ns: v.created_ns,
        first_touch_ns: c.first_touch_ns,
    }
}

/// A process's totals over its VMAs: what the summary and the metrics (`--metrics`) report,
/// summed from the snapshot's rows so that all three agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub vma_count: usize,
    pub reserved_bytes: u64,
    pub touched_bytes: u64,
    pub anon_bytes: u64,
}

/// The totals of a process's snapshot rows ([`vma_rows`]).
pub fn totals(rows: &[VmaRow]) -> Totals {
    Totals {
        vma_count: rows.len(),
        reserved_bytes: rows.iter().map(|r| r.reserved_bytes).sum(),
        touched_bytes: rows.iter().map(|r| r.touched_bytes).sum(),
        anon_bytes: rows.iter().map(|r| r.anon_bytes).sum(),
    }
}

/// A process in the end-of-run summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSummary {
    pub pid: u32,
    pub exe: Option<String>,
    pub exited: bool,
    pub vma_count: usize,
    pub reserved_bytes: u64,
    pub touched_bytes: u64,
    pub anon_bytes: u64,
    pub heap_bytes: u64,
    pub heap_high_water_bytes: u64,
    pub syscalls: std::collections::BTreeMap<String, u64>,
    pub failed_syscalls: std::collections::BTreeMap<String, u64>,
    pub faults: u64,
    pub first_touches: std::collections::BTreeMap<String, u64>,
    pub cow_upgrades: u64,
    pub refaulted_pages: u64,
    pub released_pages: u64,
    pub faults_outside_vmas: u64,
    /// Times the map was read again after lost events (the counts miss those events).
    #[serde(default)]
    pub resyncs: u64,
    pub history_entries: usize,
    /// The VMAs with the most touched bytes, at most ten.
    pub top_vmas: Vec<VmaRow>,
    /// The allocator's view (`--heap`): live bytes, calls, regions.
    #[serde(default)]
    pub heap: Option<crate::heap::regions::HeapView>,
    /// With stacks: the call sites that reserved the most, at most ten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<SiteRow>,
}

/// Call sites listed in the summary.
pub const SUMMARY_SITES: usize = 10;

/// Loss and error counters of the kernel side and of the reader: the one type that counts
/// losses, with arithmetic (a `lost` record is the difference of two readings, replay and the
/// live view add them up).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct LossSummary {
    pub lost_syscall: u64,
    pub lost_fault: u64,
    pub lost_lifecycle: u64,
    pub pending_full: u64,
    pub exit_without_enter: u64,
    pub targets_full: u64,
    pub read_error: u64,
    /// Records that could not be decoded.
    pub undecodable: u64,
    /// Events still in the ring when a stop was asked (SIGINT, SIGTERM, SIGHUP, the end of
    /// `--duration`) that the reader, far behind, had no time left to handle: counted, not
    /// handled (absent in older recordings).
    #[serde(default)]
    pub unread: u64,
    /// Stacks dropped in the kernel (ring more than half full, or three quarters for a
    /// recognised stack's id): their events were kept,
    /// without a stack. Not counted in the lost events.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_stack: u64,
    /// Allocator events (`--heap`) dropped because the ring buffer was full.
    #[serde(default)]
    pub lost_heap: u64,
    /// `openat` records (the path of a new descriptor) dropped because the ring buffer was
    /// full (absent in older recordings, which counted them in `lost_lifecycle`).
    #[serde(default)]
    pub lost_open: u64,
    /// Commits dropped because the ring buffer was full: each was a call's place among the
    /// calls of its process's other threads, which is then its exit. Not counted in the lost
    /// events: the call's record is kept (absent in older recordings).
    #[serde(default)]
    pub lost_commit: u64,
    /// Runs of vmatrace's programs that the kernel skipped because another BPF program was
    /// running on that CPU (one of them preempted, or another tool's): each lost an event
    /// (absent in older recordings).
    #[serde(default)]
    pub missed: u64,
}

/// The kernel's counters (the reader's own are zero).
impl From<&KernelStats> for LossSummary {
    fn from(k: &KernelStats) -> Self {
        Self {
            lost_syscall: k.lost_syscall,
            lost_fault: k.lost_fault,
            lost_lifecycle: k.lost_lifecycle,
            pending_full: k.pending_full,
            exit_without_enter: k.exit_without_enter,
            targets_full: k.targets_full,
            read_error: k.read_error,
            undecodable: 0,
            unread: 0,
            lost_stack: k.lost_stack,
            lost_heap: k.lost_heap,
            lost_open: k.lost_open,
            lost_commit: k.lost_commit,
            missed: k.missed,
        }
    }
}

impl std::ops::Add for LossSummary {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        self.zip(other, u64::saturating_add)
    }
}

/// Counters since `other` (an earlier reading of the same counters).
impl std::ops::Sub for LossSummary {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        self.zip(other, u64::saturating_sub)
    }
}

impl std::ops::AddAssign<&LossSummary> for LossSummary {
    fn add_assign(&mut self, other: &LossSummary) {
        *self = *self + *other;
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl LossSummary {
    /// Each counter of `self` and `other` through `f`: the one place that lists them all.
    fn zip(self, other: Self, f: impl Fn(u64, u64) -> u64) -> Self {
        Self {
            lost_syscall: f(self.lost_syscall, other.lost_syscall),
            lost_fault: f(self.lost_fault, other.lost_fault),
            lost_lifecycle: f(self.lost_lifecycle, other.lost_lifecycle),
            pending_full: f(self.pending_full, other.pending_full),
            exit_without_enter: f(self.exit_without_enter, other.exit_without_enter),
            targets_full: f(self.targets_full, other.targets_full),
            read_error: f(self.read_error, other.read_error),
            undecodable: f(self.undecodable, other.undecodable),
            unread: f(self.unread, other.unread),
            lost_stack: f(self.lost_stack, other.lost_stack),
            lost_heap: f(self.lost_heap, other.lost_heap),
            lost_open: f(self.lost_open, other.lost_open),
            lost_commit: f(self.lost_commit, other.lost_commit),
            missed: f(self.missed, other.missed),
        }
    }

    /// The reader's own counts: records it could not decode, events it left in the ring.
    pub fn reader(undecodable: u64, unread: u64) -> Self {
        Self {
            undecodable,
            unread,
            ..Self::default()
        }
    }

    /// Events lost in any way.
    pub fn total_lost(&self) -> u64 {
        self.lost_syscall
            + self.lost_fault
            + self.lost_lifecycle
            + self.pending_full
            + self.undecodable
            + self.unread
            + self.lost_heap
            + self.lost_open
            + self.missed
    }

    /// Events dropped because the ring buffer was full (not commits: their calls' records
    /// are kept).
    pub fn ring_full(&self) -> u64 {
        self.lost_syscall + self.lost_fault + self.lost_lifecycle + self.lost_open + self.lost_heap
    }

    /// Whether events that change the model, or their order (commits), were lost (not
    /// counting allocator events, which `--heap` accounts apart): the maps are then read
    /// again from `/proc`.
    pub fn model_events_lost(&self) -> bool {
        self.lost_syscall
            + self.lost_fault
            + self.lost_lifecycle
            + self.lost_open
            + self.lost_commit
            + self.missed
            > 0
    }

    /// The losses by cause, for a person: `(ring full: syscalls 3, faults 0, ...)`.
    pub fn breakdown(&self) -> String {
        let mut s = format!(
            "ring full: syscalls {}, faults {}, lifecycle {}, opens {}, commits {}; unsaved entries {}",
            self.lost_syscall,
            self.lost_fault,
            self.lost_lifecycle,
            self.lost_open,
            self.lost_commit,
            self.pending_full
        );
        if self.missed > 0 {
            s += &format!(
                "; skipped by the kernel {} (another BPF program was running on the CPU)",
                self.missed
            );
        }
        s + &format!(
            "; undecodable {}; unread at the stop {}",
            self.undecodable, self.unread
        )
    }
}

/// The end-of-run summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub processes: Vec<ProcessSummary>,
    pub lost: LossSummary,
}

/// Summarises a session.
pub fn summarize(session: &Session, lost: LossSummary) -> Summary {
    let processes = session
        .processes()
        .map(|p| {
            let rows = vma_rows(p);
            let mut top = rows.clone();
            top.sort_by(|a, b| {
                b.touched_bytes
                    .cmp(&a.touched_bytes)
                    .then(a.start.cmp(&b.start))
            });
            top.truncate(10);
            let pages = p.space.pages();
            let t = totals(&rows);
            ProcessSummary {
                pid: p.pid,
                exe: p.exe.clone(),
                exited: p.exited_ns.is_some(),
                vma_count: t.vma_count,
                reserved_bytes: t.reserved_bytes,
                touched_bytes: t.touched_bytes,
                anon_bytes: t.anon_bytes,
                heap_bytes: p.space.heap_size(),
                heap_high_water_bytes: p.space.heap_high_water,
                syscalls: p
                    .counts
                    .syscalls
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                failed_syscalls: p
                    .counts
                    .failed
                    .iter()
                    .map(|((call, errno), v)| {
                        (format!("{call}:{}", crate::flags::errno(*errno)), *v)
                    })
                    .collect(),
                faults: p.counts.faults,
                first_touches: [TouchKind::Zero, TouchKind::Anon, TouchKind::File]
                    .into_iter()
                    .map(|k| (k.name().to_string(), p.counts.first_touches[k as usize]))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                cow_upgrades: p.counts.cow_upgrades,
                refaulted_pages: pages.refaults,
                released_pages: pages.released_total,
                faults_outside_vmas: p.counts.faults_outside,
                resyncs: p.counts.resyncs,
                history_entries: p
                    .space
                    .timeline()
                    .entries()
                    .iter()
                    .filter(|e| e.cause != Cause::Seed)
                    .count(),
                top_vmas: top,
                heap: crate::heap::regions::view(p),
                call_sites: sites::table(&p.sites, &session.stacks, SUMMARY_SITES),
            }
        })
        .collect();
    Summary { processes, lost }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost commit leaves its call's record but not its order among racing threads: the
    /// maps are read again, and it is not counted as a lost event.
    #[test]
    fn a_lost_commit_alone_reads_the_maps_again_without_counting_an_event() {
        let l = LossSummary {
            lost_commit: 2,
            ..LossSummary::default()
        };
        assert!(l.model_events_lost());
        assert_eq!((l.total_lost(), l.ring_full()), (0, 0));
        assert!(l.breakdown().contains("commits 2"), "{}", l.breakdown());
        let heap_only = LossSummary {
            lost_heap: 5,
            ..LossSummary::default()
        };
        assert!(!heap_only.model_events_lost());
    }

    #[test]
    fn loss_counters_add_up_and_a_difference_is_what_came_since() {
        let earlier = LossSummary {
            lost_fault: 3,
            lost_open: 1,
            ..LossSummary::default()
        };
        let now = LossSummary {
            lost_fault: 10,
            lost_open: 1,
            lost_stack: 2,
            ..LossSummary::default()
        };
        let since = now - earlier + LossSummary::reader(4, 5);
        assert_eq!(
            since,
            LossSummary {
                lost_fault: 7,
                lost_stack: 2,
                undecodable: 4,
                unread: 5,
                ..LossSummary::default()
            }
        );
        assert_eq!(since.total_lost(), 16);
        let mut sum = earlier;
        sum += &(now - earlier);
        assert_eq!(sum, now);
        // A counter that went back (never: the kernel's only grow) gives 0, not a wrap.
        assert_eq!((earlier - now).lost_fault, 0);
    }
}
