//! The Python frames of a thread at a memory event (`--stacks` on a CPython 3.11 the daemon
//! described in `PY_PROCS`; `docs/design/python-frames.md`). The native stack of an
//! interpreter shows only its evaluation loop; which Python function runs is in the
//! interpreter's own memory, and only at the event: the frames are gone by the time the daemon
//! reads the record. So the program finds the thread's `PyThreadState` (the GIL holder's when
//! it is this thread's, else the one in this thread's own thread-specific slot: `munmap` of an
//! mmap object runs with the GIL released), follows its frame chain innermost first, and
//! writes each frame's code object and instruction. The daemon reads the code objects, which
//! live as long as their functions, for names and lines; since the process may be gone by
//! then, the first time a process's stack names a code object the program also copies the
//! start of it and of its name, file name and line table (`PyCodeRecord`).

use aya_ebpf::{
    Global,
    helpers::generated::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, LruHashMap},
};
use tracer_common::{
    EventHeader, EventKind, PY_CODE_AT, PY_CODE_HEAD, PY_FRAMES_MAX, PY_STR_BYTES, PY_TABLE_BYTES,
    PY_VIA_GIL, PY_VIA_TSD, PyCodeKey, PyCodeRecord, PyFrameRaw, PyFrameWindow, PyProc,
    PyStackHead, PyStackRecord, layout::FIELD_ABSENT,
};

use crate::stacks::output_cut;

/// The processes running a CPython whose frames the programs can walk, by tgid (the daemon
/// adds them when it finds the interpreter, and removes them at exit and exec).
#[map]
pub static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(1024, 0);

/// The code objects copied so far (`PyCodeRecord`), per process and finding of its
/// interpreter.
#[map]
static PY_CODES_SEEN: LruHashMap<PyCodeKey, u8> = LruHashMap::with_max_entries(16384, 0);

/// Offset of the user TLS base (`thread.fsbase`, x86_64) in `struct task_struct`, from BTF;
/// `FIELD_ABSENT` where unknown (other architectures): no Python frames then.
#[unsafe(no_mangle)]
static TASK_TLS_BASE: Global<u32> = Global::new(FIELD_ABSENT);

/// glibc's `specific_1stblock` holds this many thread-specific slots.
const TSD_FIRST_BLOCK: u32 = 32;

/// The word at user address `addr`, or `None` when it cannot be read.
#[inline(always)]
fn user_u64(addr: u64) -> Option<u64> {
    let mut v = 0u64;
    // SAFETY: a fault-tolerant read into a local of the size given.
    let r = unsafe { bpf_probe_read_user(&mut v as *mut u64 as *mut _, 8, addr as *const _) };
    (r == 0).then_some(v)
}

/// The current thread's TLS base (its `pthread_self()` under glibc).
#[inline(always)]
fn tls_base() -> Option<u64> {
    let off = TASK_TLS_BASE.load();
    if off == FIELD_ABSENT {
        return None;
    }
    let mut v = 0u64;
    // SAFETY: the current task, at an offset from the kernel's BTF, read fault-tolerantly.
    let r = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(
            &mut v as *mut u64 as *mut _,
            8,
            task.add(off as usize) as *const _,
        )
    };
    (r == 0 && v != 0).then_some(v)
}

/// The current thread's `PyThreadState` in the process described by `p`, and how it was
/// found. A candidate counts only when its `thread_id` is this thread's TLS base: a stale or
/// misread pointer gives nothing, never another thread's frames.
#[inline(always)]
fn thread_state(p: &PyProc, tls: u64) -> Option<(u64, u32)> {
    let mine = |t: u64| t != 0 && user_u64(t + p.thread_id as u64) == Some(tls);
    let holder = user_u64(p.runtime + p.tstate_current as u64).unwrap_or(0);
    if mine(holder) {
        return Some((holder, PY_VIA_GIL));
    }
    if p.tsd_block == 0 {
        return None;
    }
    // `Py_tss_t { int _is_initialized; pthread_key_t _key; }`, read as one word.
    let tss = user_u64(p.runtime + p.tss_key as u64)?;
    let (initialized, key) = (tss as u32, (tss >> 32) as u32);
    if initialized != 1 || key >= TSD_FIRST_BLOCK {
        return None;
    }
    // Each slot is `{ uintptr_t seq; void *data; }`.
    let t = user_u64(tls + p.tsd_block as u64 + 16 * key as u64 + 8)?;
    mine(t).then_some((t, PY_VIA_TSD))
}

/// Copies `len` bytes at user address `addr` to `to`, or the first `short` when the whole
/// length cannot be read (it runs into an unmapped page); returns the bytes copied.
#[inline(always)]
fn copy_user(to: *mut u8, addr: u64, len: u32, short: u32) -> u32 {
    if addr == 0 {
        return 0;
    }
    for n in [len, short] {
        // SAFETY: `to` has room for `len` bytes (the callers pass their arrays' sizes).
        if unsafe { bpf_probe_read_user(to as *mut _, n, addr as *const _) } == 0 {
            return n;
        }
    }
    0
}

/// Writes a copy of the code object at `code` of process `tgid` (see the module's doc), built
/// in `rec`, a part of the caller's scratch slot; whether it went to the ring.
#[inline(always)]
fn emit_code(rec: *mut PyCodeRecord, p: &PyProc, tgid: u32, tid: u32, code: u64) -> bool {
    // SAFETY: `rec` lies inside the owned scratch slot (`PY_CODE_AT`, size-asserted); every
    // read below writes inside the array it is given, with that array's size at most.
    unsafe {
        if copy_user(
            (*rec).head.as_mut_ptr(),
            code,
            PY_CODE_HEAD as u32,
            PY_CODE_HEAD as u32,
        ) == 0
        {
            return false;
        }
        let qualname = user_u64(code + p.code_qualname as u64).unwrap_or(0);
        let filename = user_u64(code + p.code_filename as u64).unwrap_or(0);
        let linetable = user_u64(code + p.code_linetable as u64).unwrap_or(0);
        (*rec).header = EventHeader::new(EventKind::PyCode, tgid, tid, p.generation, 0);
        (*rec).code = code;
        (*rec).qualname = qualname;
        (*rec).filename = filename;
        (*rec).linetable = linetable;
        (*rec).qualname_len = copy_user(
            (*rec).qualname_bytes.as_mut_ptr(),
            qualname,
            PY_STR_BYTES as u32,
            64,
        );
        (*rec).filename_len = copy_user(
            (*rec).filename_bytes.as_mut_ptr(),
            filename,
            PY_STR_BYTES as u32,
            64,
        );
        (*rec).linetable_len = copy_user(
            (*rec).linetable_bytes.as_mut_ptr(),
            linetable,
            PY_TABLE_BYTES as u32,
            128,
        );
        (*rec)._pad = 0;
    }
    output_cut(rec, size_of::<PyCodeRecord>() as u64)
}

/// Writes the Python frames of the current thread of `tgid`, when it has any, after its
/// native stack record: `slot` is this CPU's stack scratch slot, owned by the caller and free
/// again once the native record is written.
#[inline(always)]
pub fn emit(slot: *mut u8, owner: EventKind, tgid: u32, tid: u32, key_ts: u64) {
    let rec = slot as *mut PyStackRecord;
    // SAFETY: inside the slot, as asserted in `tracer_common`.
    let code_rec = unsafe { slot.add(PY_CODE_AT) } as *mut PyCodeRecord;
    // SAFETY: a lookup; the value is copied out at once.
    let Some(p) = (unsafe { PY_PROCS.get(tgid) }).copied() else {
        return;
    };
    let Some(tls) = tls_base() else {
        return;
    };
    let Some((tstate, via)) = thread_state(&p, tls) else {
        return;
    };
    let Some(cframe) = user_u64(tstate + p.cframe as u64).filter(|&c| c != 0) else {
        return;
    };
    let mut frame = user_u64(cframe + p.current_frame as u64).unwrap_or(0);
    let mut n = 0usize;
    for i in 0..PY_FRAMES_MAX {
        if frame == 0 {
            break;
        }
        let mut w = PyFrameWindow::default();
        // SAFETY: a fault-tolerant read of the window into a local of its size.
        let r = unsafe {
            bpf_probe_read_user(
                &mut w as *mut PyFrameWindow as *mut _,
                size_of::<PyFrameWindow>() as u32,
                (frame + p.frame_window as u64) as *const _,
            )
        };
        if r != 0 || w.code == 0 {
            break;
        }
        let key = PyCodeKey {
            tgid,
            generation: p.generation,
            code: w.code,
        };
        // Marked once its copy is on its way: a copy the ring had no room for is tried again.
        // SAFETY: a lookup; the value is not kept.
        if unsafe { PY_CODES_SEEN.get(key) }.is_none() && emit_code(code_rec, &p, tgid, tid, w.code)
        {
            let _ = PY_CODES_SEEN.insert(key, 1, 0);
        }
        // SAFETY: `i` is below PY_FRAMES_MAX, inside the owned scratch slot.
        unsafe {
            (*rec).frames[i] = PyFrameRaw {
                code: w.code,
                instr_offset: w.prev_instr.wrapping_sub(w.code) as u32,
                is_entry: w.is_entry,
                owner: w.owner,
                _pad: 0,
            };
        }
        n = i + 1;
        frame = w.previous;
    }
    if n == 0 {
        return;
    }
    // SAFETY: as above; the record is cut after its `n` frames.
    unsafe {
        (*rec).head = PyStackHead {
            header: EventHeader::new(EventKind::PyStack, tgid, tid, owner as u32, key_ts),
            frames: n as u32,
            via,
        };
    }
    output_cut(
        rec,
        (size_of::<PyStackHead>() + n * size_of::<PyFrameRaw>()) as u64,
    );
}
