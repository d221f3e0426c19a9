//! Fuzz target `header`: see `blockgraph_fuzz::header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockgraph_fuzz::header::run(data));
