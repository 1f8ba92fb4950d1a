//! The allocator probes (`--heap`): the uprobe and uretprobe programs loaded once and attached
//! to each allocator function of each library, and the per-CPU flush of their batches.

use std::{num::NonZeroU32, path::Path};

use aya::programs::{
    ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun, UProbe,
    uprobe::{UProbeAttachLocation, UProbeScope},
};

use super::{FlushOutcome, Probe, ProbeError};

/// The allocator programs (see `tracer-ebpf/src/heap.rs`).
pub const HEAP_PROGRAMS: [&str; 7] = [
    "heap_entry",
    "heap_entry_chunk",
    "heap_entry_memptr",
    "heap_return",
    "heap_return_chunk",
    "heap_return_memptr",
    "heap_return_memptr_chunk",
];

/// What [`Probe::flush_heap`] could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapFlushOutcome {
    /// As for faults: refused batches (lost, counted) and CPUs that cannot run the flush.
    pub faults_like: FlushOutcome,
    /// CPUs where a program was adding to the batch: no watermark this time.
    pub busy: Vec<u32>,
}

impl Probe {
    /// Loads the allocator programs and their flush; from now on [`Probe::heap_cpus`] are
    /// flushed by [`Probe::flush_heap`].
    pub fn load_heap(&mut self) -> Result<(), ProbeError> {
        for name in HEAP_PROGRAMS {
            let err = |source| ProbeError::Attach {
                name: format!("the allocator program {name}"),
                source,
            };
            let program: &mut UProbe = self.program(name, name)?;
            program.load().map_err(err)?;
        }
        let what = "the allocator batches' flush program";
        let err = |source| ProbeError::Attach {
            name: what.into(),
            source,
        };
        let flush: &mut RawTracePoint = self.program("heap_flush", what)?;
        flush.load().map_err(err)?;
        self.heap_cpus =
            aya::util::online_cpus().map_err(|(_, e)| err(ProgramError::IOError(e)))?;
        Ok(())
    }

    /// The CPUs whose allocator events come in batches with watermarks.
    pub fn heap_cpus(&self) -> &[u32] {
        &self.heap_cpus
    }

    /// Attaches `program` (one of [`HEAP_PROGRAMS`]) at file offset `offset` of the ELF file
    /// `target`, for process `pid` only or (None) for every process that maps the file.
    pub fn attach_uprobe(
        &mut self,
        program: &str,
        target: &Path,
        offset: u64,
        pid: Option<u32>,
    ) -> Result<(), ProgramError> {
        let scope = match pid.and_then(NonZeroU32::new) {
            Some(p) => UProbeScope::OneProcess(p),
            None => UProbeScope::AllProcesses,
        };
        let p: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        p.attach(UProbeAttachLocation::AbsoluteOffset(offset), target, scope)?;
        Ok(())
    }

    /// Has every CPU in [`Probe::heap_cpus`] write its allocator-event batch with a watermark;
    /// a CPU where a program holds the batch is asked up to three times.
    pub fn flush_heap(&mut self) -> HeapFlushOutcome {
        let mut outcome = HeapFlushOutcome::default();
        let Some(Ok(flush)) = self
            .ebpf
            .program("heap_flush")
            .map(<&RawTracePoint>::try_from)
        else {
            outcome.faults_like.gone = std::mem::take(&mut self.heap_cpus);
            return outcome;
        };
        for &cpu in &self.heap_cpus {
            let opts = || RawTracePointRunOptions {
                cpu: Some(cpu),
                ..RawTracePointRunOptions::new()
            };
            let mut tries = 0;
            loop {
                tries += 1;
                match flush.test_run(opts()) {
                    Ok(r) if r.return_value == 0 => {}
                    Ok(r) if r.return_value == 2 && tries < 3 => continue,
                    Ok(r) if r.return_value == 2 => outcome.busy.push(cpu),
                    Ok(_) => outcome.faults_like.refused.push(cpu),
                    Err(e) => {
                        log::warn!("cannot collect the allocator events of CPU {cpu}: {e}");
                        outcome.faults_like.gone.push(cpu);
                    }
                }
                break;
            }
        }
        self.heap_cpus
            .retain(|c| !outcome.faults_like.gone.contains(c));
        outcome
    }
}
