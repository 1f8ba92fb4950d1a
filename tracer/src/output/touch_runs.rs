//! Runs of first touches: consecutive pages of one kind touched by one thread, written as one
//! `touches` record instead of a `fault` record per page (`--faults first`). The model still
//! sees every fault; only the output is compact. A run holds faults that each made exactly one
//! page resident, with the same thread, error code, access, outcome and VMA, on pages that
//! extend it at either end.
//!
//! The record type is written and read here: [`TouchesRecord`] is serialized by the NDJSON
//! sink and deserialized by replay, which gives back one [`FaultRecord`] per page
//! ([`TouchesRecord::faults`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::records::FaultJson;
use crate::{
    event::FaultRecord,
    model::{FaultEffect, PAGE_SIZE, Touch, TouchKind},
};

/// The most pages one record holds (256 MiB of small pages): a longer run is cut, and replay
/// refuses a record that claims more.
pub const MAX_RUN_PAGES: u64 = 1 << 16;

/// The tag of the record (`"type": "touches"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Tag {
    #[serde(rename = "touches")]
    Touches,
}

/// One `touches` record. Fields in sorted key order, as in every record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchesRecord {
    /// The lowest page of the run.
    pub address: u64,
    /// The faults changed a page already known (a refault, or a copy on write).
    pub changed: bool,
    /// The time of the last fault of the run (`ts_ns` is the first's).
    pub end_ns: u64,
    pub error_code: Option<u32>,
    /// The faults were first touches (not copies on write of present pages).
    pub first_touch: bool,
    /// The first fault's instruction pointer.
    pub ip: u64,
    /// When each page was touched, in nanoseconds after `ts_ns`, from the lowest page up.
    pub offsets_ns: VecDeque<u64>,
    pub page_kind: Option<String>,
    /// Pages in the run, one per fault.
    pub pages: u64,
    pub pid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    #[serde(rename = "type")]
    tag: Tag,
    pub vma_start: Option<u64>,
    /// Whether the accesses wrote (null: unknown).
    pub write: Option<bool>,
}

impl TouchesRecord {
    /// Checks a record read from a file: a run within user space and within the bound.
    pub fn check(&self, user_end: u64) -> Result<(), String> {
        if self.pages == 0 || self.pages > MAX_RUN_PAGES {
            return Err(format!(
                "touches record of {} pages (1 to {MAX_RUN_PAGES})",
                self.pages
            ));
        }
        let end = self
            .pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| self.address.checked_add(len));
        if !self.address.is_multiple_of(PAGE_SIZE) || end.is_none_or(|e| e > user_end) {
            return Err(format!(
                "touches record at {:#x} of {} pages is not pages of user space",
                self.address, self.pages
            ));
        }
        let span = self.end_ns.checked_sub(self.ts_ns).ok_or_else(|| {
            format!(
                "touches record ends ({}) before it starts ({})",
                self.end_ns, self.ts_ns
            )
        })?;
        if self.offsets_ns.len() as u64 != self.pages {
            return Err(format!(
                "touches record of {} pages has {} offsets_ns",
                self.pages,
                self.offsets_ns.len()
            ));
        }
        if let Some(o) = self.offsets_ns.iter().find(|&&o| o > span) {
            return Err(format!(
                "touches record has a page touched {o} ns after its start, past its end ({span} ns)"
            ));
        }
        Ok(())
    }

    /// The faults of the run in the order they were taken (each at its own time), as the
    /// live run saw them.
    pub fn faults(&self) -> Vec<FaultRecord> {
        let mut faults: Vec<FaultRecord> = self
            .offsets_ns
            .iter()
            .enumerate()
            .map(|(i, offset)| FaultRecord {
                ts_ns: self.ts_ns + offset,
                pid: self.pid,
                tid: self.tid,
                address: self.address + i as u64 * PAGE_SIZE,
                ip: self.ip,
                error_code: self.error_code,
                write_from_page: self.write,
                stack_id: None,
            })
            .collect();
        faults.sort_by_key(|f| f.ts_ns);
        faults
    }

    /// The fault records the run stands for (docs/json-schema.md): one per page from
    /// `address` up, each at `ts_ns` plus its offset, in the order they were taken.
    pub fn fault_records(&self) -> Vec<FaultJson> {
        let mut faults: Vec<FaultJson> = self
            .offsets_ns
            .iter()
            .enumerate()
            .map(|(i, offset)| FaultJson {
                address: self.address + i as u64 * PAGE_SIZE,
                changed: self.changed,
                error_code: self.error_code,
                first_touch: self.first_touch,
                ip: self.ip,
                page_kind: self.page_kind.as_deref().and_then(TouchKind::parse),
                pages: 1,
                pid: self.pid,
                stack_grown_to: None,
                stack_id: None,
                tid: self.tid,
                ts_ns: self.ts_ns + offset,
                kind: "fault",
                vma_start: self.vma_start,
                write: self.write,
            })
            .collect();
        faults.sort_by_key(|f| f.ts_ns);
        faults
    }

    /// A run of the one fault `step` describes.
    fn start(step: &Step) -> Self {
        Self {
            address: step.page,
            changed: step.changed,
            end_ns: step.ts_ns,
            error_code: step.error_code,
            first_touch: step.first_touch,
            ip: step.ip,
            offsets_ns: VecDeque::from([0]),
            page_kind: Some(step.page_kind.to_string()),
            pages: 1,
            pid: step.pid,
            tid: step.tid,
            ts_ns: step.ts_ns,
            tag: Tag::Touches,
            vma_start: step.vma_start,
            write: step.write,
        }
    }

    /// Takes `next` into this run if it is the same kind of fault on the page just above or
    /// just below.
    fn extend(&mut self, next: &Step) -> bool {
        let same = next.pid == self.pid
            && next.tid == self.tid
            && next.error_code == self.error_code
            && next.write == self.write
            && next.first_touch == self.first_touch
            && next.changed == self.changed
            && self.page_kind.as_deref() == Some(next.page_kind)
            && next.vma_start == self.vma_start
            && self.pages < MAX_RUN_PAGES;
        if !same {
            return false;
        }
        // Times only grow within a thread; the check keeps offsets unsigned.
        let Some(offset) = next.ts_ns.checked_sub(self.ts_ns) else {
            return false;
        };
        if next.page == self.address + self.pages * PAGE_SIZE {
            self.offsets_ns.push_back(offset);
        } else if next.page + PAGE_SIZE == self.address {
            self.address = next.page;
            self.offsets_ns.push_front(offset);
        } else {
            return false;
        }
        self.pages += 1;
        self.end_ns = self.end_ns.max(next.ts_ns);
        true
    }
}

/// What a run needs of one fault, taken without allocating (most faults only extend a run).
struct Step {
    page: u64,
    ts_ns: u64,
    pid: u32,
    tid: u32,
    ip: u64,
    error_code: Option<u32>,
    write: Option<bool>,
    first_touch: bool,
    changed: bool,
    page_kind: &'static str,
    vma_start: Option<u64>,
}

impl Step {
    /// The fault as a step of a run, or None when it cannot be one (it made more or fewer
    /// than one page resident, grew the stack, or names a stack).
    fn of(f: &FaultRecord, fe: &FaultEffect) -> Option<Self> {
        let (first_touch, page_kind, changed) = match fe.touch {
            Touch::First { kind, refault } => (true, kind.name(), refault),
            Touch::Upgraded { .. } => (false, "anon", true),
            Touch::Again => return None,
        };
        if fe.pages != 1 || fe.stack_grown_to.is_some() || f.stack_id.is_some() {
            return None;
        }
        Some(Self {
            page: f.address & !(PAGE_SIZE - 1),
            ts_ns: f.ts_ns,
            pid: f.pid,
            tid: f.tid,
            ip: f.ip,
            error_code: f.error_code,
            write: f.write(),
            first_touch,
            changed,
            page_kind,
            vma_start: fe.vma_start,
        })
    }
}

/// What a pending run is written as: a run of one page is the fault itself (its exact
/// address, through the fault record's writer), a longer one a `touches` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    Fault(FaultRecord, FaultEffect),
    Run(TouchesRecord),
}

/// A run being gathered, with the fault that started it.
struct Pending {
    run: TouchesRecord,
    first: (FaultRecord, FaultEffect),
}

impl Pending {
    fn written(self) -> Written {
        if self.run.pages == 1 {
            Written::Fault(self.first.0, self.first.1)
        } else {
            Written::Run(self.run)
        }
    }
}

/// The runs not yet written, one at most per thread. Every record written so far is no
/// later than the start of each pending run, so writing them in start order before any other
/// record keeps the output in time order.
#[derive(Default)]
pub struct PendingRuns {
    runs: Vec<Pending>,
}

impl PendingRuns {
    /// Takes the fault into its thread's run. Returns false when it cannot be part of a run:
    /// the caller writes everything pending ([`PendingRuns::drain`]) and then the fault. The
    /// runs that must be written now (`ready`, in start order) are those that started no later
    /// than a run the fault ended.
    pub fn take(&mut self, f: &FaultRecord, fe: &FaultEffect, ready: &mut Vec<Written>) -> bool {
        let Some(step) = Step::of(f, fe) else {
            return false;
        };
        match self
            .runs
            .iter()
            .position(|p| p.run.pid == f.pid && p.run.tid == f.tid)
        {
            Some(i) if self.runs[i].run.extend(&step) => {}
            Some(i) => {
                let ended = self.runs[i].run.ts_ns;
                self.runs.sort_by_key(|p| p.run.ts_ns);
                let cut = self.runs.partition_point(|p| p.run.ts_ns <= ended);
                ready.extend(self.runs.drain(..cut).map(Pending::written));
                self.runs.push(Pending {
                    run: TouchesRecord::start(&step),
                    first: (*f, *fe),
                });
            }
            None => self.runs.push(Pending {
                run: TouchesRecord::start(&step),
                first: (*f, *fe),
            }),
        }
        true
    }

    /// Every pending run, in start order, leaving none.
    pub fn drain(&mut self) -> impl Iterator<Item = Written> + '_ {
        self.runs.sort_by_key(|p| p.run.ts_ns);
        self.runs.drain(..).map(Pending::written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TouchKind;

    fn fault(ts_ns: u64, tid: u32, address: u64) -> FaultRecord {
        FaultRecord {
            ts_ns,
            pid: 7,
            tid,
            address,
            ip: 0x40_1000,
            error_code: Some(6),
            write_from_page: None,
            stack_id: None,
        }
    }

    fn first(pages: u64) -> FaultEffect {
        FaultEffect {
            touch: Touch::First {
                kind: TouchKind::Anon,
                refault: false,
            },
            pages,
            vma_start: Some(0x1000_0000),
            stack_grown_to: None,
        }
    }

    /// The one run pending.
    fn only_run(pending: &mut PendingRuns) -> TouchesRecord {
        let written: Vec<Written> = pending.drain().collect();
        match written.as_slice() {
            [Written::Run(r)] => r.clone(),
            other => panic!("not one run: {other:?}"),
        }
    }

    /// Feeds faults through the runs; returns what would be written, in order, with `F` for
    /// a fault written on its own.
    fn written(faults: &[(FaultRecord, FaultEffect)]) -> Vec<String> {
        let mut pending = PendingRuns::default();
        let mut out = Vec::new();
        let mut ready = Vec::new();
        let show = |w: &Written| match w {
            Written::Run(r) => format!("{}:{:#x}+{}@{}", r.tid, r.address, r.pages, r.ts_ns),
            Written::Fault(f, _) => format!("{}:{:#x}@{}", f.tid, f.address, f.ts_ns),
        };
        for (f, fe) in faults {
            let taken = pending.take(f, fe, &mut ready);
            out.extend(ready.drain(..).map(|r| show(&r)));
            if !taken {
                out.extend(pending.drain().map(|r| show(&r)));
                out.push(format!("F{:#x}", f.address));
            }
        }
        out.extend(pending.drain().map(|r| show(&r)));
        out
    }

    #[test]
    fn consecutive_pages_of_a_thread_make_one_run_either_way() {
        let a = 0x1000_0000;
        let up: Vec<_> = (0..4)
            .map(|i| (fault(i, 1, a + i * 4096 + 8), first(1)))
            .collect();
        assert_eq!(written(&up), ["1:0x10000000+4@0"]);
        let down: Vec<_> = (0..4)
            .map(|i| (fault(i, 1, a + (3 - i) * 4096), first(1)))
            .collect();
        assert_eq!(written(&down), ["1:0x10000000+4@0"]);
        // Read back, the pages come in the order they were touched, each at its own time.
        let mut pending = PendingRuns::default();
        for (f, fe) in &down {
            assert!(pending.take(f, fe, &mut Vec::new()));
        }
        let run = only_run(&mut pending);
        assert_eq!(run.offsets_ns, [3, 2, 1, 0]);
        let back: Vec<(u64, u64)> = run.faults().iter().map(|f| (f.ts_ns, f.address)).collect();
        assert_eq!(
            back,
            (0..4).map(|i| (i, a + (3 - i) * 4096)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn runs_stay_in_time_order_when_threads_interleave_and_break() {
        let (a, b) = (0x1000_0000, 0x2000_0000);
        let faults = [
            (fault(1, 1, a), first(1)),
            (fault(2, 2, b), first(1)),
            (fault(3, 1, a + 4096), first(1)),
            (fault(4, 2, b + 4096), first(1)),
            // Thread 1 jumps: its run (from 1) ends; thread 2's (from 2) stays pending.
            (fault(5, 1, a + 65536), first(1)),
            // Thread 2 jumps: its run (from 2) ends; thread 1's new one (from 5) stays.
            (fault(6, 2, b + 65536), first(1)),
            // A huge page is written on its own, after everything pending.
            (fault(7, 1, a + (2 << 20)), first(512)),
        ];
        assert_eq!(
            written(&faults),
            [
                "1:0x10000000+2@1",
                "2:0x20000000+2@2",
                "1:0x10010000@5",
                "2:0x20010000@6",
                "F0x10200000"
            ]
        );
    }

    #[test]
    fn a_different_outcome_or_access_starts_a_new_run() {
        let a = 0x1000_0000;
        let mut read = fault(2, 1, a + 4096);
        read.error_code = Some(4);
        let refault = FaultEffect {
            touch: Touch::First {
                kind: TouchKind::Anon,
                refault: true,
            },
            ..first(1)
        };
        let faults = [
            (fault(1, 1, a), first(1)),
            (read, first(1)),
            (fault(3, 1, a + 2 * 4096), refault),
        ];
        assert_eq!(
            written(&faults),
            ["1:0x10000000@1", "1:0x10001000@2", "1:0x10002000@3"]
        );
    }

    #[test]
    fn a_record_reads_back_as_the_faults_it_holds() {
        let a = 0x1000_0000;
        let mut pending = PendingRuns::default();
        let mut ready = Vec::new();
        for i in 0..3 {
            assert!(pending.take(&fault(10 + i, 1, a + i * 4096), &first(1), &mut ready));
        }
        let run = only_run(&mut pending);
        let text = serde_json::to_string(&run).expect("serializes");
        assert!(text.contains("\"type\":\"touches\""), "{text}");
        let back: TouchesRecord = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, run);
        assert_eq!(back.check(1 << 47), Ok(()));
        let faults: Vec<(u64, u64)> = back.faults().iter().map(|f| (f.ts_ns, f.address)).collect();
        assert_eq!(faults, [(10, a), (11, a + 4096), (12, a + 8192)]);
        assert_eq!(back.end_ns, 12);
        for bad in [
            TouchesRecord {
                pages: 0,
                ..back.clone()
            },
            TouchesRecord {
                pages: MAX_RUN_PAGES + 1,
                ..back.clone()
            },
            TouchesRecord {
                address: a + 1,
                ..back.clone()
            },
            TouchesRecord {
                address: (1 << 47) - 4096,
                ..back.clone()
            },
            TouchesRecord {
                end_ns: 1,
                ..back.clone()
            },
        ] {
            assert!(bad.check(1 << 47).is_err(), "{bad:?}");
        }
    }
}
