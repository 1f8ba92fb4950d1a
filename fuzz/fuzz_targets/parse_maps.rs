//! Any bytes parse as /proc/PID/maps, smaps or stat, or give an error; parsed lines convert
//! to VMAs. Bytes, not text: a process chooses its own name and its files' names.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = tracer::procfs::parse_maps(data, "fuzz") {
        for e in entries {
            let v = e.to_vma(0);
            assert!(v.start <= v.end);
            if let Some(p) = &e.path {
                // The text form always gives bytes back.
                let _ = tracer::name::to_bytes(p);
            }
        }
    }
    let _ = tracer::procfs::parse_smaps(data, "fuzz");
    let _ = tracer::procfs::parse_stat(data, "fuzz");
});
