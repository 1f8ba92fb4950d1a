#![no_std]
// This library target exists so that `tracer` can name this crate as a build dependency; the
// eBPF programs are in the binary target (`src/main.rs`).
