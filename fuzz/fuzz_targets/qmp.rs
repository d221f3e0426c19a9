//! Fuzz target `qmp`: see `blockgraph_fuzz::qmp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockgraph_fuzz::qmp::run(data));
