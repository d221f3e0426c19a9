//! Reading zstd-compressed clusters (`compression_type=zstd`).
//!
//! QEMU compresses each cluster into one zstd frame; the cluster's
//! descriptor covers the frame rounded up to 512-byte sectors, and bytes
//! past the frame are ignored. A frame may refer back anywhere in the
//! cluster (its window is the cluster), so decoding needs a cluster of
//! memory: on the host (`std`) it is decoded with `ruzstd`, bounded by
//! the cluster; a `no_std` build refuses such a read as unsupported
//! rather than keep 2 MiB for it.

use super::CompressedExtent;
use crate::device::Device;
use crate::error::Result;

/// Fills `out` with the bytes at `skip..skip + out.len()` of the cluster
/// whose zstd frame is `extent` on `device`.
///
/// # Errors
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) when the frame is
/// invalid or ends early, device errors as returned;
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) in `no_std`
/// builds.
#[cfg(feature = "std")]
pub(crate) fn read<D: Device>(
    device: &mut D,
    extent: CompressedExtent,
    skip: u64,
    out: &mut [u8],
) -> Result<()> {
    use crate::error::{Error, ErrorKind};
    use std::io::Read;

    let corrupt = || Error::new(ErrorKind::Corrupt, "invalid zstd-compressed cluster");
    let end = extent
        .host_offset
        .saturating_add(extent.length)
        .min(device.size());
    let mut input = std::vec![0u8; end.saturating_sub(extent.host_offset) as usize];
    device.read_at(extent.host_offset, &mut input)?;
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(&input[..]).map_err(|_| corrupt())?;
    let skipped = std::io::copy(&mut (&mut decoder).take(skip), &mut std::io::sink());
    if skipped.ok() != Some(skip) {
        return Err(corrupt());
    }
    decoder.read_exact(out).map_err(|_| corrupt())
}

/// The `no_std` build: zstd clusters are refused (module docs).
///
/// # Errors
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), always.
#[cfg(not(feature = "std"))]
pub(crate) fn read<D: Device>(
    _device: &mut D,
    _extent: CompressedExtent,
    _skip: u64,
    _out: &mut [u8],
) -> Result<()> {
    crate::error::fail(
        crate::ErrorKind::Unsupported,
        "unsupported: zstd-compressed clusters are read only by host (std) builds",
    )
}
