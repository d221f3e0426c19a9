//! Format layer: drivers that map guest offsets of an image onto its device.
//!
//! - [`qcow2`]: the qcow2 driver (header, L1/L2 mapping, compressed
//!   clusters, backing-reference rewrite);
//! - [`raw`]: raw images, mapped one to one;
//! - [`cache`]: the bounded table-slice cache every qcow2 node shares.
//!
//! A driver reports a [`Mapping`] for a range of *its own* image; walking down
//! the backing chain is the graph's job.

pub mod cache;
pub mod qcow2;
pub mod raw;

use core::fmt;

use crate::error::{fail, ErrorKind, Result};
use qcow2::CompressedExtent;

/// Image formats a node can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The qcow2 format.
    Qcow2,
    /// A raw image: guest offset == device offset.
    Raw,
}

impl Format {
    /// The format's QEMU name (`qcow2`, `raw`).
    pub const fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a QEMU format name.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] for any other format name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            _ => fail(ErrorKind::Unsupported, "unsupported image format"),
        }
    }

    /// Detects the format of an image from its first bytes: qcow2 by its
    /// magic, raw otherwise. Used only for images named by the user, never for
    /// backing files.
    pub fn detect(first_bytes: &[u8]) -> Self {
        if first_bytes.len() >= 4 && first_bytes[..4] == qcow2::header::MAGIC.to_be_bytes() {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the start of a guest range is stored in one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored uncompressed at this device offset.
    Data(u64),
    /// Reads as zeros here, whatever the backing chain holds.
    Zero,
    /// Not stored here: look in the backing image.
    Unallocated,
    /// Stored compressed; the range starts inside that cluster.
    Compressed(CompressedExtent),
}
