//! Human output: one line per memory syscall with decoded flags and its effect on the map,
//! first touches coalesced per VMA per timer tick, snapshot tables and the summary.

use std::{
    collections::BTreeMap,
    io::{self, Write},
};

use tracer_common::Syscall;

use super::{
    FaultFilter, LossSummary, Meta, Sink, SnapshotReason, Summary, report::vma_rows, show_fault,
};
use crate::{
    analysis::{Finding, Severity},
    call::MemCall,
    event::{Event, SyscallRecord},
    flags::{self, size},
    model::{EffectKind, PAGE_SIZE, Touch},
    name::shown,
    session::{Applied, Process, Session},
    stacks::sites::SiteRow,
};

/// Writes human-readable lines.
pub struct HumanSink<W: Write> {
    out: W,
    faults: FaultFilter,
    color: bool,
    start_ns: u64,
    /// Coalesced first touches: (pid, vma start) -> what was touched there.
    touches: BTreeMap<(u32, u64), Touched>,
}

/// First touches coalesced in one VMA within one timer tick.
struct Touched {
    pages: u64,
    label: String,
    /// The faulting pages' range: from the lowest to the end of the highest.
    low: u64,
    high: u64,
}

impl<W: Write> HumanSink<W> {
    /// A sink writing to `out`; `color` adds ANSI colours (only for a terminal).
    pub fn new(out: W, faults: FaultFilter, color: bool, start_ns: u64) -> Self {
        Self {
            out,
            faults,
            color,
            start_ns,
            touches: BTreeMap::new(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        paint(self.color, code, text)
    }

    fn time(&self, ts: u64) -> String {
        format!("{:>11.6}", ts.saturating_sub(self.start_ns) as f64 / 1e9)
    }

    fn flush_touches(&mut self) -> io::Result<()> {
        let touches = std::mem::take(&mut self.touches);
        for ((pid, _), t) in touches {
            let line = format!(
                "{} [{pid}] first touch: {} pages ({}) of {} in {:#x}-{:#x}",
                " ".repeat(11),
                t.pages,
                size(t.pages * PAGE_SIZE),
                t.label,
                t.low,
                t.high
            );
            writeln!(self.out, "{}", self.paint("2", &line))?;
        }
        Ok(())
    }
}

/// The pages a fault at `address` made resident: its page, or the aligned block of `pages`
/// pages (a transparent huge page) around it.
pub fn touched_range(address: u64, pages: u64) -> (u64, u64) {
    let block = pages.max(1).next_power_of_two() * PAGE_SIZE;
    let low = address & !(block - 1);
    (low, low.saturating_add(block))
}

/// `text` in the ANSI colour `code` when `color` is on.
pub fn paint(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn addr(a: u64) -> String {
    if a == 0 {
        "NULL".into()
    } else {
        format!("{a:#x}")
    }
}

fn len(l: u64) -> String {
    size(l).to_string()
}

/// `mmap(NULL, 64 KiB, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)`.
pub fn call_text(s: &SyscallRecord) -> String {
    let args = match s.mem() {
        MemCall::Brk { addr: a } | MemCall::Shmdt { addr: a } => addr(a),
        MemCall::Mmap {
            addr: a,
            len: l,
            prot,
            flags,
            fd,
            offset,
        } => format!(
            "{}, {}, {}, {}, {fd}, {offset:#x}",
            addr(a),
            len(l),
            flags::prot(prot),
            flags::map(flags),
        ),
        MemCall::Munmap { addr: a, len: l }
        | MemCall::Mlock { addr: a, len: l }
        | MemCall::Munlock { addr: a, len: l } => format!("{}, {}", addr(a), len(l)),
        MemCall::Mremap {
            addr: a,
            old_len,
            new_len,
            flags,
            new_addr,
        } => format!(
            "{}, {}, {}, {}, {}",
            addr(a),
            len(old_len),
            len(new_len),
            flags::mremap(flags),
            addr(new_addr)
        ),
        MemCall::Mprotect {
            addr: a,
            len: l,
            prot,
        } => format!("{}, {}, {}", addr(a), len(l), flags::prot(prot)),
        MemCall::PkeyMprotect {
            addr: a,
            len: l,
            prot,
            pkey,
        } => format!("{}, {}, {}, {pkey}", addr(a), len(l), flags::prot(prot)),
        MemCall::Madvise {
            addr: a,
            len: l,
            advice,
        } => format!("{}, {}, {}", addr(a), len(l), flags::madvise(advice)),
        MemCall::ProcessMadvise {
            pidfd,
            addr: a,
            len: l,
            vlen,
            advice,
            flags,
        } => format!(
            "{pidfd}, [{{{}, {}}}], {vlen}, {}, {flags}",
            addr(a),
            len(l),
            flags::madvise(advice)
        ),
        MemCall::Shmat {
            shmid,
            addr: a,
            shmflg,
        } => format!("{shmid}, {}, {shmflg:#o}", addr(a)),
        MemCall::Openat { dfd, path, flags } => format!("{dfd}, {path:#x}, {flags:#o}"),
        MemCall::Mlock2 {
            addr: a,
            len: l,
            flags,
        } => format!("{}, {}, {flags:#x}", addr(a), len(l)),
        MemCall::Mlockall { flags } => flags::mlockall(flags),
        MemCall::Munlockall => String::new(),
    };
    let ret = match s.errno() {
        Some(e) => format!("-1 {}", flags::errno(e)),
        None if matches!(
            s.call,
            Syscall::Brk | Syscall::Mmap | Syscall::Mremap | Syscall::Shmat
        ) =>
        {
            format!("{:#x}", s.ret as u64)
        }
        None => s.ret.to_string(),
    };
    let mut text = format!("{}({args}) = {ret}", s.call.name());
    if let Some(p) = &s.resolved.path {
        text.push_str(&format!(" <{}>", shown(p)));
    }
    text
}

/// What the effect did, in words.
pub fn effect_text(applied: &Applied) -> Option<String> {
    let Applied::Syscall { effect: e, .. } = applied else {
        return None;
    };
    let range = format!("{:#x}-{:#x}", e.start, e.end);
    let text = match e.kind {
        EffectKind::None => return None,
        EffectKind::Created => format!("new VMA {range} ({})", size(e.end - e.start)),
        EffectKind::Replaced => format!(
            "new VMA {range} ({}) over {} of existing mappings",
            size(e.end - e.start),
            size(e.unmapped_bytes)
        ),
        EffectKind::Unmapped => format!("unmapped {}", size(e.unmapped_bytes)),
        EffectKind::Grown => format!("grown to {range} ({})", size(e.end - e.start)),
        EffectKind::Shrunk => format!("shrunk to {range} ({})", size(e.end - e.start)),
        EffectKind::Moved => format!(
            "moved {:#x} -> {range} ({})",
            e.from.unwrap_or(0),
            size(e.end - e.start)
        ),
        EffectKind::Protected => format!("protection changed on {range}"),
        EffectKind::Released => format!(
            "released {} pages ({})",
            e.released_pages,
            size(e.released_pages * PAGE_SIZE)
        ),
        EffectKind::Advised => "advice recorded".to_string(),
        EffectKind::LazilyFreed => {
            format!("{range} freed lazily: resident until the kernel reclaims it")
        }
        EffectKind::Locked => format!("locked {range}"),
        EffectKind::Unlocked => format!("unlocked {range}"),
    };
    let mut extra = Vec::new();
    if e.splits > 0 {
        let plural = if e.splits == 1 { "" } else { "s" };
        extra.push(format!("{} VMA cut{plural}", e.splits));
    }
    if e.released_pages > 0 && e.kind != EffectKind::Released {
        extra.push(format!("{} touched pages released", e.released_pages));
    }
    Some(if extra.is_empty() {
        text
    } else {
        format!("{text}; {}", extra.join(", "))
    })
}

impl<W: Write> Sink for HumanSink<W> {
    fn start(&mut self, meta: &Meta) -> io::Result<()> {
        log::info!(
            "tracing (syscall events: {}, fault events: {}); Ctrl-C to stop",
            meta.syscall_backend,
            meta.fault_backend
        );
        Ok(())
    }

    fn findings(&mut self, findings: &[Finding]) -> io::Result<()> {
        write_findings(&mut self.out, findings, self.color)
    }

    fn event(&mut self, event: &Event, applied: &Applied, session: &Session) -> io::Result<()> {
        if matches!(applied, Applied::Ignored) {
            return Ok(());
        }
        match event {
            Event::Syscall(s) => {
                self.flush_touches()?;
                let call = call_text(s);
                let call = if s.errno().is_some() {
                    self.paint("31", &call)
                } else {
                    call
                };
                let effect = effect_text(applied)
                    .map(|t| format!("  {}", self.paint("36", &format!("-> {t}"))))
                    .unwrap_or_default();
                let pid = if s.pid == s.tid {
                    format!("[{}]", s.pid)
                } else {
                    format!("[{}/{}]", s.pid, s.tid)
                };
                writeln!(self.out, "{} {pid} {call}{effect}", self.time(s.ts_ns))?;
            }
            Event::Fault(f) => {
                if !show_fault(self.faults, applied) {
                    return Ok(());
                }
                let Applied::Fault(fe) = applied else {
                    return Ok(());
                };
                if self.faults == FaultFilter::All {
                    let what = match fe.touch {
                        Touch::First { kind, .. } if fe.pages > 1 => format!(
                            "first touch ({}, a huge page of {})",
                            kind.name(),
                            size(fe.pages * crate::model::PAGE_SIZE)
                        ),
                        Touch::First { kind, .. } => format!("first touch ({})", kind.name()),
                        Touch::Upgraded { from } => format!("copy on write from {}", from.name()),
                        Touch::Again => "again".into(),
                    };
                    writeln!(
                        self.out,
                        "{} [{}/{}] fault {:#x} ip {:#x} {what}",
                        self.time(f.ts_ns),
                        f.pid,
                        f.tid,
                        f.address,
                        f.ip
                    )?;
                } else if let Some(start) = fe.vma_start {
                    let label = session
                        .get(f.pid)
                        .and_then(|p| p.space.find(start))
                        .map(|v| match v.backing.path(v.perms.shared) {
                            Some(path) => shown(&path).to_string(),
                            None => "anonymous memory".into(),
                        })
                        .unwrap_or_default();
                    // Pages, not faults: one fault on a huge page makes many resident.
                    let pages = fe.pages.max(1);
                    let (low, high) = touched_range(f.address, pages);
                    let t = self.touches.entry((f.pid, start)).or_insert(Touched {
                        pages: 0,
                        label,
                        low,
                        high,
                    });
                    t.pages += pages;
                    t.low = t.low.min(low);
                    t.high = t.high.max(high);
                }
            }
            Event::Fork {
                pid,
                child,
                followed,
                shares_vm,
                ts_ns,
                ..
            } => {
                let how = match (*followed, *shares_vm) {
                    (true, false) => "followed",
                    (true, true) => "followed, shares its memory",
                    (false, false) => "not followed",
                    (false, true) => "not followed, shares its memory",
                };
                writeln!(
                    self.out,
                    "{} [{pid}] fork -> {child} ({how})",
                    self.time(*ts_ns)
                )?;
            }
            Event::Exec {
                pid,
                filename,
                ts_ns,
                ..
            } => {
                writeln!(
                    self.out,
                    "{} [{pid}] exec {}",
                    self.time(*ts_ns),
                    shown(filename)
                )?;
            }
            Event::Exit { pid, ts_ns, .. } => {
                self.flush_touches()?;
                writeln!(self.out, "{} [{pid}] exited", self.time(*ts_ns))?;
            }
            Event::Open { .. } | Event::Join { .. } => {}
            // Allocator calls are too many to show one by one: the summary has their sums.
            Event::HeapRaw(_) | Event::Heap(_) | Event::Pymalloc(_) => {}
            Event::HeapAttach {
                ts_ns,
                pid,
                path,
                allocator,
                late,
            } => {
                writeln!(
                    self.out,
                    "{} [{pid}] heap: allocator {} ({}) probed{}",
                    self.time(*ts_ns),
                    shown(path),
                    allocator.name(),
                    if *late {
                        ", late: its calls before now were not seen"
                    } else {
                        ""
                    }
                )?;
            }
            Event::Collapse { pid, ts_ns, start } => {
                self.flush_touches()?;
                let pages = match applied {
                    Applied::Collapsed { pages } => *pages,
                    _ => 0,
                };
                writeln!(
                    self.out,
                    "{} [{pid}] huge page made without a fault at {start:#x} (khugepaged or MADV_COLLAPSE): {} more resident or anonymous",
                    self.time(*ts_ns),
                    size(pages * PAGE_SIZE)
                )?;
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, ts_ns: u64, reason: SnapshotReason, p: &Process) -> io::Result<()> {
        if matches!(reason, SnapshotReason::Seed | SnapshotReason::Exec) {
            return Ok(());
        }
        self.flush_touches()?;
        let time = self.time(ts_ns);
        write_snapshot(&mut self.out, &time, reason, p)
    }

    fn lost(&mut self, ts_ns: u64, delta: &LossSummary) -> io::Result<()> {
        let line = format!(
            "{} LOST {} events ({})",
            self.time(ts_ns),
            delta.total_lost(),
            delta.breakdown()
        );
        writeln!(self.out, "{}", self.paint("1;31", &line))
    }

    fn drift(&mut self, ts_ns: u64, pid: u32, lines: &[String]) -> io::Result<()> {
        let line = format!(
            "{} [{pid}] model differs from /proc/{pid}/maps:",
            self.time(ts_ns)
        );
        writeln!(self.out, "{}", self.paint("33", &line))?;
        for l in lines {
            writeln!(self.out, "    {}", shown(l))?;
        }
        Ok(())
    }

    fn tick(&mut self, _session: &Session) -> io::Result<()> {
        self.flush_touches()?;
        self.out.flush()
    }

    fn summary(&mut self, _ts_ns: u64, s: &Summary) -> io::Result<()> {
        self.flush_touches()?;
        write_summary(&mut self.out, s)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_touches()?;
        self.out.flush()
    }
}

/// The findings of `--report` and `vmatrace report`, as human lines.
pub fn write_findings(out: &mut impl Write, findings: &[Finding], color: bool) -> io::Result<()> {
    writeln!(out, "\n=== vmatrace report ===")?;
    for f in findings {
        let tag = match f.severity {
            Severity::Warning => paint(color, "1;33", "WARNING"),
            Severity::Info => paint(color, "2", "info"),
        };
        writeln!(out, "[{}] {tag} {}", f.pid, f.title)?;
        writeln!(out, "    {}", f.explanation)?;
        if !f.call_sites.is_empty() {
            let sites: Vec<String> = f.call_sites.iter().map(|s| shown(s).to_string()).collect();
            writeln!(out, "    call sites: {}", sites.join("; "))?;
        }
        if let Some(s) = &f.suggestion {
            writeln!(out, "    try: {s}")?;
        }
    }
    out.flush()
}

/// The end-of-run summary, as human lines.
pub fn write_summary(out: &mut impl Write, s: &Summary) -> io::Result<()> {
    writeln!(out, "\n=== vmatrace summary ===")?;
    for p in &s.processes {
        writeln!(
            out,
            "process {} ({}){}",
            p.pid,
            shown(p.exe.as_deref().unwrap_or("?")),
            if p.exited { ", exited" } else { "" }
        )?;
        writeln!(
            out,
            "  {} VMAs, reserved {}, touched {} ({} anonymous), heap {} (high-water {})",
            p.vma_count,
            size(p.reserved_bytes),
            size(p.touched_bytes),
            size(p.anon_bytes),
            size(p.heap_bytes),
            size(p.heap_high_water_bytes)
        )?;
        let calls: Vec<String> = p.syscalls.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(
            out,
            "  syscalls: {}",
            if calls.is_empty() {
                "none".into()
            } else {
                calls.join(", ")
            }
        )?;
        if !p.failed_syscalls.is_empty() {
            let failed: Vec<String> = p
                .failed_syscalls
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            writeln!(out, "  failed: {}", failed.join(", "))?;
        }
        let touches: Vec<String> = p
            .first_touches
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            out,
            "  faults: {}, first touches: {}, copy-on-write: {}, released pages: {}, refaulted: {}",
            p.faults,
            if touches.is_empty() {
                "0".into()
            } else {
                touches.join(", ")
            },
            p.cow_upgrades,
            p.released_pages,
            p.refaulted_pages
        )?;
        if p.resyncs > 0 {
            writeln!(
                out,
                "  events were lost: the map was read again {} time(s), so it is exact, but the counts above miss the lost events",
                p.resyncs
            )?;
        }
        writeln!(out, "  top VMAs by touched bytes:")?;
        for r in p.top_vmas.iter().filter(|r| r.touched_bytes > 0).take(10) {
            writeln!(
                out,
                "    {:>12x}-{:<12x} {} {:>10} of {:>10}  {}",
                r.start,
                r.end,
                r.perms,
                size(r.touched_bytes),
                size(r.reserved_bytes),
                shown(r.path.as_deref().unwrap_or("[anon]"))
            )?;
        }
        write_sites(out, &p.call_sites)?;
        if let Some(h) = &p.heap {
            write_heap(out, h)?;
        }
    }
    let l = &s.lost;
    writeln!(out, "lost events: {} ({})", l.total_lost(), l.breakdown())?;
    if l.lost_stack > 0 {
        writeln!(
            out,
            "stacks dropped: {} (the ring was too full; their events were kept)",
            l.lost_stack
        )?;
    }
    out.flush()
}

/// Heap regions the summary lists by name (the rest in one line).
const SUMMARY_REGIONS: usize = 6;

/// The allocator's view (`--heap`): live bytes, the regions' touched, live and retained
/// bytes, and the call sites holding the most.
fn write_heap(out: &mut impl Write, h: &crate::heap::regions::HeapView) -> io::Result<()> {
    writeln!(
        out,
        "  allocator ({}): live {} in {} blocks (peak {}); {} allocations, {} frees{}",
        if h.allocators.is_empty() {
            "no calls".to_string()
        } else {
            h.allocators.join(", ")
        },
        size(h.live_bytes),
        h.live_blocks,
        size(h.peak_live_bytes),
        h.allocations,
        h.frees,
        if h.complete {
            ""
        } else {
            "; not every allocation was seen (attached late, or events lost)"
        }
    )?;
    // The regions holding the most touched memory (a JVM has dozens of arenas).
    let mut regions: Vec<_> = h.regions.iter().filter(|r| r.touched_bytes > 0).collect();
    regions.sort_by_key(|r| std::cmp::Reverse(r.touched_bytes));
    for r in regions.iter().take(SUMMARY_REGIONS) {
        writeln!(
            out,
            "    {}: {} touched, {} live, {} retained free",
            shown(&crate::heap::findings::region_name(r)),
            size(r.touched_bytes),
            r.live_bytes.map_or("unknown".into(), size),
            size(r.retained_bytes)
        )?;
    }
    if regions.len() > SUMMARY_REGIONS {
        let rest = &regions[SUMMARY_REGIONS..];
        writeln!(
            out,
            "    and {} more regions: {} touched, {} retained free",
            rest.len(),
            size(rest.iter().map(|r| r.touched_bytes).sum()),
            size(rest.iter().map(|r| r.retained_bytes).sum())
        )?;
    }
    if !h.sites.is_empty() {
        writeln!(out, "  top call sites by live bytes:")?;
        for r in h.sites.iter().take(5) {
            let site = r
                .site
                .clone()
                .or(r.caller.map(|c| format!("{c:#x}")))
                .unwrap_or_else(|| "unknown call site".into());
            writeln!(
                out,
                "    {:>10} in {:>7} blocks  {}",
                size(r.live_bytes),
                r.blocks,
                shown(&site)
            )?;
        }
    }
    Ok(())
}

/// A process's whole map as a table (`time` is the line's time column).
pub fn write_snapshot(
    out: &mut impl Write,
    time: &str,
    reason: SnapshotReason,
    p: &Process,
) -> io::Result<()> {
    writeln!(
        out,
        "{time} [{}] snapshot ({}): {} VMAs",
        p.pid,
        shown(reason.name()),
        p.space.vma_count()
    )?;
    writeln!(
        out,
        "  {:<33} {:<4} {:>10} {:>10} {:>10}  path",
        "range", "perm", "reserved", "touched", "anon"
    )?;
    for r in vma_rows(p) {
        writeln!(
            out,
            "  {:>16x}-{:<16x} {:<4} {:>10} {:>10} {:>10}  {}",
            r.start,
            r.end,
            r.perms,
            size(r.reserved_bytes),
            size(r.touched_bytes),
            size(r.anon_bytes),
            shown(r.path.as_deref().unwrap_or(""))
        )?;
    }
    Ok(())
}

/// The call-site table of a process (with stacks): what each site reserved, how much of it
/// was touched, is still mapped and was released, and how many calls it made.
pub fn write_sites(out: &mut impl Write, rows: &[SiteRow]) -> io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "  top call sites:   reserved    touched  still mapped   released   calls"
    )?;
    for r in rows {
        write_site(out, r)?;
    }
    Ok(())
}

/// One row of the call-site table.
fn write_site(out: &mut impl Write, r: &SiteRow) -> io::Result<()> {
    {
        writeln!(
            out,
            "    {:>24} {:>10} {:>13} {:>10} {:>7}  {}{}",
            size(r.stats.reserved_bytes),
            size(r.stats.touched_bytes + r.stats.first_touch_bytes),
            size(r.still_mapped_bytes),
            size(r.stats.released_bytes),
            r.stats.calls,
            shown(&r.site),
            if r.through_malloc {
                " (through malloc)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// `vmatrace report`: each process's call sites (recorded with `--stacks`), and with
/// `full`, the whole stack of each under it.
pub fn write_call_sites(out: &mut impl Write, session: &Session, full: bool) -> io::Result<()> {
    for p in session.processes() {
        let rows = crate::stacks::sites::table(&p.sites, &session.stacks, usize::MAX);
        if rows.is_empty() {
            continue;
        }
        writeln!(
            out,
            "\n=== call sites of {} ({}) ===",
            p.pid,
            shown(p.exe.as_deref().unwrap_or("?"))
        )?;
        let shown_rows = if full {
            &rows[..]
        } else {
            &rows[..rows.len().min(20)]
        };
        writeln!(
            out,
            "  call sites:       reserved    touched  still mapped   released   calls"
        )?;
        for r in shown_rows {
            write_site(out, r)?;
            if !full {
                continue;
            }
            for id in &r.stack_ids {
                let Some(def) = session.stacks.get(*id) else {
                    continue;
                };
                writeln!(out, "      stack {id}:")?;
                for f in &def.frames {
                    writeln!(
                        out,
                        "        {:#x} {}{}",
                        f.addr,
                        shown(&f.label()),
                        if f.inlined { " (inlined)" } else { "" }
                    )?;
                }
            }
        }
        if !full && rows.len() > shown_rows.len() {
            writeln!(
                out,
                "    ... {} more (--stacks shows all, with their stacks)",
                rows.len() - shown_rows.len()
            )?;
        }
    }
    Ok(())
}
