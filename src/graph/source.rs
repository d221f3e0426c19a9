//! What a write puts down, and how its bytes reach a device.
//!
//! A [`Source`] is the content of a write request, or of a piece of one:
//! guest bytes (a scatter-gather list, sliced without copying), zeros, or
//! a node's guest view (a copy, as a job or a copy-on-write makes). Guest
//! bytes go to the device as one vectored write; a view is read through a
//! scratch buffer and written in pieces cut at multiples of the largest
//! power of two that fits in the buffer ([`piece_len`]), so a piece never
//! starts or ends inside a 4 KiB block of the guest but at the source's own
//! ends (for any buffer of 4 KiB or more).

use super::segments::{piece_len, Segments, MAX_SEGMENTS};
use super::{Graph, NodeId};
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};

/// The content of a write, or of a piece of one.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// Guest bytes.
    Data(Segments<'a>),
    /// This many zeros.
    Zeros(u64),
    /// A node's guest view.
    View(View),
}

/// `len` bytes of node `node`'s guest view from guest offset `guest`
/// (bytes past its virtual size read as zeros).
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) node: NodeId,
    pub(super) guest: u64,
    pub(super) len: u64,
}

impl<'a> Source<'a> {
    /// Number of bytes.
    pub(super) fn len(self) -> u64 {
        match self {
            Source::Data(data) => data.len(),
            Source::Zeros(len) => len,
            Source::View(view) => view.len,
        }
    }

    /// The `len` bytes from `start`.
    pub(super) fn slice(self, start: u64, len: u64) -> Source<'a> {
        match self {
            Source::Data(data) => Source::Data(data.slice(start, len)),
            Source::Zeros(_) => Source::Zeros(len),
            Source::View(view) => Source::View(View {
                guest: view.guest + start,
                len,
                ..view
            }),
        }
    }
}

/// Writes `data` at device offset `at` as one vectored write.
fn write_data<D: Device>(device: &mut D, at: u64, data: Segments<'_>) -> Result<()> {
    let mut list = heapless::Vec::<&[u8], MAX_SEGMENTS>::new();
    for piece in data.pieces() {
        list.push(piece).map_err(|_| too_many())?;
    }
    device.write_vectored_at(at, &list)
}

/// Writes `len` zeros at device offset `at`: up to [`MAX_SEGMENTS`] × 64
/// KiB per vectored write, the pieces cut at 64 KiB boundaries of the
/// device.
fn write_zeros<D: Device>(device: &mut D, at: u64, len: u64) -> Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut list = heapless::Vec::<&[u8], MAX_SEGMENTS>::new();
    let (mut start, mut done) = (0, 0);
    while done < len {
        let pos = at + done;
        let n = (ZEROS.len() as u64 - pos % ZEROS.len() as u64).min(len - done);
        list.push(&ZEROS[..n as usize]).map_err(|_| too_many())?;
        done += n;
        if list.is_full() || done == len {
            device.write_vectored_at(at + start, &list)?;
            list.clear();
            start = done;
        }
    }
    Ok(())
}

fn too_many() -> Error {
    Error::new(ErrorKind::InvalidInput, "too many segments in one request")
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Writes `source` at device offset `host` of protocol node `file`:
    /// guest bytes and zeros as [`write_data`] and [`write_zeros`] do, a
    /// view read into `scratch` and written piece by piece, the pieces cut
    /// as [`piece_len`] cuts them at the view's guest offsets (the device
    /// offsets of a cluster lie alike).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a view and an empty `scratch`, read
    /// and device errors.
    pub(super) fn put(
        &mut self,
        file: NodeId,
        host: u64,
        source: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        match source {
            Source::Data(data) => write_data(self.device_mut(file)?, host, data),
            Source::Zeros(len) => write_zeros(self.device_mut(file)?, host, len),
            Source::View(view) => {
                if scratch.is_empty() && view.len > 0 {
                    return fail(ErrorKind::InvalidInput, "a copy needs a scratch buffer");
                }
                let mut done = 0;
                while done < view.len {
                    let at = view.guest + done;
                    let n = piece_len(at, view.len - done, scratch.len() as u64);
                    let buf = &mut scratch[..n as usize];
                    self.read_view(view.node, at, buf)?;
                    self.device_mut(file)?.write_at(host + done, buf)?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Copies the bytes of `source` into `out` (exactly as long).
    ///
    /// # Errors
    /// Read errors of a view.
    pub(super) fn fill_from(&mut self, source: Source<'_>, out: &mut [u8]) -> Result<()> {
        match source {
            Source::Data(data) => data.copy_to(out),
            Source::Zeros(_) => out.fill(0),
            Source::View(view) => self.read_view(view.node, view.guest, out)?,
        }
        Ok(())
    }

    /// Reads `id`'s current guest view at `guest` into `buf`; bytes past the
    /// virtual size read as zeros.
    ///
    /// # Errors
    /// As [`Graph::read`].
    pub(super) fn read_view(&mut self, id: NodeId, guest: u64, buf: &mut [u8]) -> Result<()> {
        let readable = self.size(id)?.saturating_sub(guest).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(readable);
        self.read(id, guest, inside)?;
        past.fill(0);
        Ok(())
    }
}
