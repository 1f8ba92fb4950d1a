//! Reading another process's memory (`process_vm_readv`): what the daemon reads from a traced
//! process while it runs, racing it (CPython's pool headers, code objects and frames). A
//! range that is not mapped, or a process that is gone, reads as nothing.

/// The `len` bytes at `addr` in process `pid`, whole, or `None`.
pub fn read(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    (read_each(pid, &[addr], len, &mut buf) == 1 || len == 0).then_some(buf)
}

/// Reads `each` bytes at every address of `addrs` into consecutive pieces of `buf` (which
/// holds `addrs.len() * each` bytes) in one call; returns how many pieces were read whole, in
/// order (the kernel stops at the first range it cannot read).
pub fn read_each(pid: u32, addrs: &[u64], each: usize, buf: &mut [u8]) -> usize {
    if each == 0 || addrs.is_empty() {
        return 0;
    }
    let len = buf.len().min(addrs.len() * each);
    let local = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    let remote: Vec<libc::iovec> = addrs
        .iter()
        .take(len / each)
        .map(|&a| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: each,
        })
        .collect();
    // SAFETY: `local` covers the first `len` bytes of `buf`, which outlives the call; the
    // remote ranges are only read, by the kernel, in the other process.
    let n = unsafe {
        libc::process_vm_readv(
            pid as libc::pid_t,
            local.as_ptr(),
            1,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    usize::try_from(n).map_or(0, |n| n / each)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_stops_at_what_is_not_mapped() {
        let data: Vec<u8> = (0..64).collect();
        let at = data.as_ptr() as u64;
        let me = std::process::id();
        assert_eq!(read(me, at + 8, 16).as_deref(), Some(&data[8..24]));
        let mut buf = [0u8; 24];
        // The third address is not mapped: two pieces come back.
        assert_eq!(read_each(me, &[at + 32, at, 8], 8, &mut buf), 2);
        assert_eq!((&buf[..8], &buf[8..16]), (&data[32..40], &data[..8]));
        assert_eq!(read(me, 8, 8), None);
    }
}
