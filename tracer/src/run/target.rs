//! Checking a `-p` pid before anything is loaded, and reading a process's seed (its map, resident
//! pages and huge page policy) from `/proc`.

use super::*;

/// Checks a `-p` pid before anything is loaded.
pub(super) fn validate_pid(pid: u32) -> Result<(), RunError> {
    if pid == std::process::id() {
        return Err(RunError::SelfPid(pid));
    }
    let stat = procfs::read_stat(pid).map_err(|e| match e {
        ProcError::NoProcess(p) => RunError::NoProcess(p),
        other => RunError::Proc(other),
    })?;
    if stat.is_kernel_thread() {
        return Err(RunError::KernelThread(pid));
    }
    if stat.is_dead() {
        return Err(RunError::Zombie(pid));
    }
    Ok(())
}

/// Reads the seed of `pid` from `/proc`: its VMAs (smaps, for the huge page flags), heap
/// start, the pages already resident (pagemap) and the huge page policy. Every seed (attach,
/// exec) is also where a 32-bit program, whose syscalls are not reported, is warned about.
pub fn read_seed(pid: u32, ts: u64) -> Result<Seed, ProcError> {
    if procfs::runs_32bit_program(pid) {
        log::warn!(
            "process {pid} runs a 32-bit program ({}): the kernel's syscall tracepoints do not report 32-bit syscalls, so only its page faults are traced (--reconcile shows what its syscalls changed)",
            crate::name::shown(&exe_of(pid).unwrap_or_default())
        );
    }
    let smaps = procfs::read_smaps(pid)?;
    let stat = procfs::read_stat(pid)?;
    let resident = pagemap::read_resident(pid, &smaps)?;
    Ok(Seed {
        vmas: smaps.iter().map(|e| e.map.to_vma(ts)).collect(),
        start_brk: Some(stat.start_brk),
        resident,
        thp: procfs::thp_policy(pid),
    })
}

pub(super) fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| crate::name::from_os(p.as_os_str()))
}
