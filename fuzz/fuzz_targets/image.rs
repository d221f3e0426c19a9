//! Fuzz target `image`: see `blockgraph_fuzz::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockgraph_fuzz::image::run(data));
