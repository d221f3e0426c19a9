//! Scatter-gather requests: one guest request carried by a list of buffers.
//!
//! A VMM hands guest memory segments straight through ([`Graph::writev`],
//! [`Graph::readv`]); the graph never copies them into a bounce buffer. The
//! write path describes "`len` bytes from here" of a segment list as a
//! [`Segments`] view (a borrowed list, an offset into its first buffer and a
//! length), so a request cut at cluster or batch boundaries is sliced
//! without copying. The device gets the pieces of one run as one vectored
//! write ([`Device::write_vectored_at`]).
//!
//! [`Graph::writev`]: super::Graph::writev
//! [`Graph::readv`]: super::Graph::readv
//! [`Device::write_vectored_at`]: crate::device::Device::write_vectored_at

use crate::error::{fail, ErrorKind, Result};

/// Most buffers one scatter-gather request may carry; a request with more is
/// [`ErrorKind::InvalidInput`] and changes nothing. A request's pieces are
/// listed on the stack on their way to the device (16 bytes each), so this
/// bounds the stack a request takes; the virtio-blk device side offers the
/// engine's `SEGMENTS` (16 by default) as its `seg_max`, which may not
/// exceed it.
pub const MAX_SEGMENTS: usize = 64;

/// Checks a segment count against [`MAX_SEGMENTS`].
pub(crate) fn check_count(count: usize) -> Result<()> {
    if count > MAX_SEGMENTS {
        return fail(
            ErrorKind::InvalidInput,
            "too many segments in one request (at most 64)",
        );
    }
    Ok(())
}

/// `len` bytes of a segment list, starting `skip` bytes into its first
/// buffer. Copy: slicing it never copies data.
#[derive(Clone, Copy)]
pub(crate) struct Segments<'a> {
    list: &'a [&'a [u8]],
    skip: usize,
    len: u64,
}

impl<'a> Segments<'a> {
    /// All the bytes of `list`, which holds at most [`MAX_SEGMENTS`] buffers.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for more than [`MAX_SEGMENTS`] buffers.
    pub(crate) fn new(list: &'a [&'a [u8]]) -> Result<Self> {
        check_count(list.len())?;
        let len = list
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.len() as u64));
        match len {
            Some(len) => Ok(Self { list, skip: 0, len }),
            None => fail(ErrorKind::InvalidInput, "request length overflows"),
        }
    }

    /// Number of bytes.
    pub(crate) fn len(self) -> u64 {
        self.len
    }

    /// The `len` bytes from `start` (inside this view).
    pub(crate) fn slice(self, start: u64, len: u64) -> Self {
        debug_assert!(start + len <= self.len);
        let mut list = self.list;
        let mut skip = self.skip as u64 + start;
        // Drop the buffers that lie wholly before `start`.
        while let Some((first, rest)) = list.split_first() {
            if skip < first.len() as u64 || (skip == first.len() as u64 && rest.is_empty()) {
                break;
            }
            skip -= first.len() as u64;
            list = rest;
        }
        Self {
            list,
            skip: skip as usize,
            len,
        }
    }

    /// The non-empty buffer pieces of this view, in order.
    pub(crate) fn pieces(self) -> Pieces<'a> {
        Pieces {
            list: self.list,
            skip: self.skip,
            left: self.len,
        }
    }

    /// Copies the bytes into `out` (exactly [`Self::len`] bytes long).
    pub(crate) fn copy_to(self, out: &mut [u8]) {
        let mut at = 0;
        for piece in self.pieces() {
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
    }
}

/// Iterator over the non-empty pieces of a [`Segments`] view.
pub(crate) struct Pieces<'a> {
    list: &'a [&'a [u8]],
    skip: usize,
    left: u64,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while self.left > 0 {
            let (first, rest) = self.list.split_first()?;
            let tail = first.get(self.skip..).unwrap_or(&[]);
            let n = (tail.len() as u64).min(self.left) as usize;
            self.list = rest;
            self.skip = 0;
            if n > 0 {
                self.left -= n as u64;
                return Some(&tail[..n]);
            }
        }
        None
    }
}

/// The length of the next piece of a transfer at guest offset `pos` with
/// `left` bytes to go, when one piece can carry at most `max` bytes (a
/// scratch buffer): all of it when it fits, else up to the last multiple,
/// within reach, of the largest power of two not above `max`. So every
/// boundary a transfer is cut at lies on that power of two: a cluster
/// boundary whenever the buffer holds a cluster, 1 MiB for a 1 MiB buffer,
/// at least 4 KiB for any buffer of 4 KiB or more. Zero only when `left`
/// or `max` is.
pub(crate) fn piece_len(pos: u64, left: u64, max: u64) -> u64 {
    if left <= max || max == 0 {
        return left.min(max);
    }
    let align = 1u64 << (63 - max.leading_zeros());
    let end = (pos + max) / align * align;
    end - pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_across_buffers_without_copying() {
        let (a, b, c) = ([1u8, 2, 3], [0u8; 0], [4u8, 5, 6, 7]);
        let list: [&[u8]; 3] = [&a, &b, &c];
        let all = Segments::new(&list).unwrap();
        assert_eq!(all.len(), 7);
        let mut out = [0u8; 4];
        all.slice(2, 4).copy_to(&mut out);
        assert_eq!(out, [3, 4, 5, 6]);
        let mut pieces = all.slice(3, 2).pieces();
        assert_eq!(pieces.next(), Some(&[4u8, 5][..]));
        assert_eq!(pieces.next(), None);
        assert_eq!(all.slice(7, 0).pieces().next(), None);
        assert_eq!(all.slice(3, 0).len(), 0);
    }

    #[test]
    fn refuses_too_many_segments() {
        let one = [0u8; 1];
        let list = [&one[..]; MAX_SEGMENTS + 1];
        let err = Segments::new(&list).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(Segments::new(&list[..MAX_SEGMENTS]).is_ok());
    }

    #[test]
    fn pieces_end_on_the_buffer_power_of_two() {
        assert_eq!(piece_len(12345, 100, 1 << 20), 100);
        assert_eq!(piece_len(12345, 6 << 20, 1 << 20), (1 << 20) - 12345);
        assert_eq!(piece_len(1 << 20, 6 << 20, 1 << 20), 1 << 20);
        // A 1.5 MiB buffer cuts at 1 MiB boundaries.
        assert_eq!(piece_len(12345, 6 << 20, 3 << 19), (1 << 20) - 12345);
        assert_eq!(piece_len(1 << 20, 6 << 20, 3 << 19), 1 << 20);
        assert_eq!(piece_len(100, 10_000, 5000), 4096 - 100);
        assert_eq!(piece_len(0, 10, 3), 2);
    }
}
