//! Any bytes given to `replay` as a recording (NDJSON or binary) are replayed or refused with
//! an error, never a panic: each line is parsed alone, then the whole input is streamed
//! through the replay reader into a session (hostile VMAs, resident runs and calls included).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = tracer::replay::parse_line(line);
    }
    let mut sink = tracer::output::NullSink;
    let _ = tracer::replay::replay_from(data, "fuzz", &mut sink, true);
});
