//! Reading from compressed clusters without a heap.
//!
//! qcow2 stores a compressed cluster as raw deflate. The stream is inflated
//! into a 32 KiB ring (deflate's window), so a 2 MiB cluster needs no 2 MiB
//! buffer: bytes are copied out as they pass the requested range.

use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use crate::graph::place::Place;
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Deflate's window, the ring the output cycles through.
const WINDOW: usize = 32 * 1024;
/// Compressed bytes read from the device at a time.
const INPUT_CHUNK: usize = 4096;

/// Fixed working memory for inflating (about 47 KiB).
pub struct Inflater {
    /// Made on first use (empty: zero bytes, see [`Place`]).
    state: Place<DecompressorOxide>,
    window: [u8; WINDOW],
    input: [u8; INPUT_CHUNK],
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a compressed cluster's stream lies on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedExtent {
    /// Byte offset of the deflate stream.
    pub host_offset: u64,
    /// Upper bound of its length in bytes.
    pub length: u64,
}

impl Inflater {
    /// Working memory with the decompressor not yet set up.
    pub const fn new() -> Self {
        Self {
            state: Place::Empty,
            window: [0; WINDOW],
            input: [0; INPUT_CHUNK],
        }
    }

    /// Fills `out` with the bytes at `skip..skip + out.len()` of the cluster
    /// whose deflate stream is `extent` on `device`.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] when the stream is invalid or ends early,
    /// device errors as returned.
    pub fn read<D: Device>(
        &mut self,
        device: &mut D,
        extent: CompressedExtent,
        skip: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let state = decompressor(&mut self.state);
        state.init();
        let stream_end = extent
            .host_offset
            .saturating_add(extent.length)
            .min(device.size());
        let want_end = skip + out.len() as u64;
        let mut next_read = extent.host_offset;
        let (mut in_start, mut in_end) = (0usize, 0usize);
        let mut produced = 0u64; // decompressed bytes so far
        let mut ring_pos = 0usize;
        while produced < want_end {
            if in_start == in_end && next_read < stream_end {
                let n = (stream_end - next_read).min(INPUT_CHUNK as u64) as usize;
                device.read_at(next_read, &mut self.input[..n])?;
                next_read += n as u64;
                in_start = 0;
                in_end = n;
            }
            let more_input = next_read < stream_end;
            let flags = if more_input {
                inflate_flags::TINFL_FLAG_HAS_MORE_INPUT
            } else {
                0
            };
            let (status, consumed, written) = decompress(
                state,
                &self.input[in_start..in_end],
                &mut self.window,
                ring_pos,
                flags,
            );
            in_start += consumed;
            copy_out(&self.window, ring_pos, written, produced, skip, out);
            produced += written as u64;
            ring_pos = (ring_pos + written) % WINDOW;
            match status {
                TINFLStatus::Done | TINFLStatus::HasMoreOutput => {
                    if status == TINFLStatus::Done && produced < want_end {
                        return fail(
                            ErrorKind::Corrupt,
                            "compressed cluster is shorter than a cluster",
                        );
                    }
                }
                TINFLStatus::NeedsMoreInput if more_input || in_start < in_end => {}
                _ => return fail(ErrorKind::Corrupt, "compressed cluster data is corrupt"),
            }
            let can_refill = in_start == in_end && more_input;
            if consumed == 0 && written == 0 && !can_refill {
                return fail(ErrorKind::Corrupt, "compressed cluster data is truncated");
            }
        }
        Ok(())
    }
}

/// Copies the `written` bytes that just landed at `ring_pos` (stream offsets
/// `produced..produced + written`) into `out` where they overlap the wanted
/// range starting at stream offset `skip`.
fn copy_out(
    window: &[u8],
    ring_pos: usize,
    written: usize,
    produced: u64,
    skip: u64,
    out: &mut [u8],
) {
    let start = produced.max(skip);
    let end = (produced + written as u64).min(skip + out.len() as u64);
    let mut pos = start;
    while pos < end {
        let ring = (ring_pos + (pos - produced) as usize) % WINDOW;
        let n = ((end - pos) as usize).min(WINDOW - ring);
        let dst = (pos - skip) as usize;
        out[dst..dst + n].copy_from_slice(&window[ring..ring + n]);
        pos += n as u64;
    }
}

/// The decompressor in `place`, made on first use. Not inlined: making one
/// takes about 11 KiB of stack for a moment, which only the first
/// compressed read pays (docs/stack.md).
#[inline(never)]
fn decompressor(place: &mut Place<DecompressorOxide>) -> &mut DecompressorOxide {
    place.get_or_insert_with(DecompressorOxide::new)
}
