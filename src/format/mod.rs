//! Format layer: drivers that map guest offsets of an image onto its device.
//!
//! - [`qcow2`]: the qcow2 driver (header, L1/L2 mapping, compressed
//!   clusters, backing-reference rewrite);
//! - [`raw`]: raw images, mapped one to one;
//! - `cache`: the bounded table-slice cache every qcow2 node shares;
//! - `driver`: a graph node's driver, through whose methods the graph asks
//!   every format question.
//!
//! A driver reports a [`Mapping`] for a range of *its own* image; walking down
//! the backing chain is the graph's job.

pub(crate) mod cache;
pub(crate) mod driver;
pub mod qcow2;
pub mod raw;

use core::fmt;

use crate::error::{fail, ErrorKind, Result};
use qcow2::CompressedExtent;

/// Image formats a node can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
}

/// Bytes at the start of an image that format probing looks at (QEMU's
/// `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_BYTES: usize = 512;

/// What the first bytes of an image look like to format probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// A qcow2 header.
    Qcow2,
    /// The magic of another image format QEMU knows (named here); this
    /// crate would open it as raw, QEMU would not.
    Foreign(&'static str),
    /// Nothing recognisable: raw.
    Raw,
}

/// Magics of image formats QEMU probes for, other than qcow2: `(offset,
/// bytes, format)`. A raw image whose first sector starts to look like one
/// of these would be opened as that format by QEMU.
const FOREIGN_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
];

/// Classifies the first bytes of an image (at most [`PROBE_BYTES`] are
/// looked at). Any version of the qcow2 magic is qcow2; the qcow (v1) magic
/// shares it, so an image starting `QFI\xfb` is always qcow2 here.
pub fn probe(first_bytes: &[u8]) -> Probed {
    let bytes = &first_bytes[..first_bytes.len().min(PROBE_BYTES)];
    if bytes.starts_with(&qcow2::header::MAGIC.to_be_bytes()) {
        return Probed::Qcow2;
    }
    FOREIGN_MAGICS
        .iter()
        .find(|(at, magic, _)| bytes.get(*at..).is_some_and(|b| b.starts_with(magic)))
        .map_or(Probed::Raw, |&(_, _, name)| Probed::Foreign(name))
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
