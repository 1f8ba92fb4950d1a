//! What the kernel could not know about an event, filled in from `/proc` and the fds the traced
//! processes opened: mapped files' names, System V segments, `process_madvise` targets.

use super::*;

/// Fills in what the kernel could not know: file names, segment sizes, pidfd targets.
/// `opened` holds the paths of the fds the traced processes opened.
pub(super) fn resolve(event: &mut Event, opened: &mut HashMap<(u32, i32), String>) {
    let s = match event {
        Event::Open { pid, fd, path, .. } => {
            opened.insert((*pid, *fd), std::mem::take(path));
            return;
        }
        Event::Exit { pid, .. } => {
            opened.retain(|(p, _), _| p != pid);
            return;
        }
        Event::Syscall(s) => s,
        _ => return,
    };
    if s.errno().is_some() {
        return;
    }
    match s.mem() {
        MemCall::Mmap {
            flags, fd, offset, ..
        } if !map_anonymous(flags) => {
            // The kernel's own mapping at the returned address first; else the path the
            // process opened as that fd (events are handled in order, so that is the file
            // the fd named at the call, unlike /proc/PID/fd now), with its identity now.
            if let Some(f) = procfs::mapped_file(s.pid, s.ret as u64, offset) {
                s.resolved.path = Some(f.path);
                s.resolved.dev = f.dev;
                s.resolved.inode = f.inode;
            } else if let Some(path) = opened.get(&(s.pid, fd)) {
                (s.resolved.dev, s.resolved.inode) =
                    procfs::file_id(std::path::Path::new(&crate::name::to_os(path)));
                s.resolved.path = Some(path.clone());
            }
        }
        MemCall::Shmat { shmid, .. } if s.resolved.shm.is_none() => {
            s.resolved.shm = shm_of(s.pid, s.ret as u64, shmid)
        }
        MemCall::ProcessMadvise { pidfd, .. } => {
            s.resolved.target_pid = procfs::pidfd_target(s.pid, pidfd as i32);
        }
        _ => {}
    }
}

/// The size and key of the segment `shmid` that a successful `shmat` of `pid` attached at
/// `at`: from the process's map while it is attached, else from `/proc/sysvipc/shm` while the
/// segment exists.
pub(super) fn shm_of(pid: u32, at: u64, shmid: i64) -> Option<(u64, u64)> {
    procfs::attached_segment(pid, at).or_else(|| procfs::shm_segment(shmid as u64))
}
