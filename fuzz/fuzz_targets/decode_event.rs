//! Ring-buffer bytes of any length and content decode to an event or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = tracer::event::decode_into(data, &mut out);
});
