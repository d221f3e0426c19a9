//! Fuzz target `virtio_blk`: see `blockgraph_fuzz::virtio_blk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blockgraph_fuzz::virtio_blk::run(data));
