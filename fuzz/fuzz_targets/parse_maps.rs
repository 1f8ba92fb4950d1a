//! Any text parses as /proc/PID/maps or gives an error; parsed lines convert to VMAs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(entries) = tracer::procfs::parse_maps(&text, "fuzz") {
        for e in entries {
            let v = e.to_vma(0);
            assert!(v.start <= v.end);
        }
    }
    let _ = tracer::procfs::parse_stat(&text, "fuzz");
});
