//! Fuzz target `script`: see `blockgraph_fuzz::script`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockgraph_fuzz::script::run(data));
