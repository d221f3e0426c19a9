//! The harnesses behind the fuzz targets (`fuzz_targets/*.rs` only call
//! them): each takes libFuzzer's bytes and drives the library with them.
//! A panic, a hang or an out-of-memory is a finding; every library call
//! must return `Ok` or `Err`.
//!
//! - [`header::run`]: `Header::parse` and the backing-reference rebuild;
//! - [`image::run`]: a whole image in a `Graph`: open, reads, block
//!   status, writes, collapse, reopen;
//! - [`qmp::run`]: a QMP session on a monitor over a two-image chain;
//! - [`script::run`]: the command-line parsers and `cmd::run_script`;
//! - [`virtio_blk::run`]: a virtio-blk descriptor chain and guest memory
//!   served from a raw image, checked against its decoding.

pub mod header;
pub mod image;
pub mod qmp;
pub mod script;
pub mod virtio_blk;

/// Reads control bytes from the end of the input backwards (zeros once
/// they run out), so the front of an image stays what the seeds made it.
pub(crate) struct Tail<'d> {
    bytes: &'d [u8],
}

impl<'d> Tail<'d> {
    /// At most the last `limit` bytes of `data`.
    pub(crate) fn new(data: &'d [u8], limit: usize) -> Self {
        Self {
            bytes: &data[data.len().saturating_sub(limit)..],
        }
    }

    pub(crate) fn byte(&mut self) -> u8 {
        match self.bytes.split_last() {
            Some((&last, rest)) => {
                self.bytes = rest;
                last
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}
