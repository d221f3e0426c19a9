//! L2 entries: how one guest cluster is stored in an image, decoded once
//! from the table's raw 64 bits.
//!
//! ```text
//!  standard:   63 COPIED | 62 = 0 | 56..61 reserved | 9..55 host offset | 1..8 reserved | 0 ZERO
//!  compressed: 63 COPIED | 62 = 1 | x..61 extra 512-byte sectors | 0..x host byte offset
//!              (x = 62 - (cluster_bits - 8))
//! ```
//!
//! [`L2Entry::parse`] reads the layout (it cannot fail: every bit pattern
//! is some entry); [`L2Entry::decode`] also checks what a hostile image
//! could get wrong before any offset is used — a data cluster unaligned or
//! past the end of the file, a compressed stream starting past it.
//! Everything else in the driver works on the typed entry; only
//! [`L2Entry::raw`] turns one back into bits, to store it.

use super::{CompressedExtent, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{fail, ErrorKind, Result};
use crate::format::Mapping;

/// One L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not stored in this image: the backing file shows through (zeros
    /// without one).
    Unallocated,
    /// Reads as zeros, whatever the backing file holds; `host` is storage
    /// kept for the cluster (0: none), `copied` its COPIED bit.
    Zero {
        /// Device offset of preallocated storage, or 0.
        host: u64,
        /// The COPIED bit.
        copied: bool,
    },
    /// Stored uncompressed at `host`; `copied` when its refcount is exactly
    /// one (the image may write it in place).
    Normal {
        /// Device offset of the cluster.
        host: u64,
        /// The COPIED bit.
        copied: bool,
    },
    /// Stored compressed.
    Compressed(CompressedExtent),
}

impl L2Entry {
    /// A data cluster at `host` this image owns alone: what a write that
    /// allocated it maps.
    pub const fn owned(host: u64) -> Self {
        L2Entry::Normal { host, copied: true }
    }

    /// The entry `raw` stands for in an image of `cluster_bits` (9..=21),
    /// unchecked.
    pub fn parse(raw: u64, cluster_bits: u32) -> Self {
        let copied = raw & COPIED != 0;
        if raw & COMPRESSED != 0 {
            let offset_bits = 62 - (cluster_bits - 8);
            let host = raw & ((1u64 << offset_bits) - 1);
            let sectors = ((raw & !(COPIED | COMPRESSED)) >> offset_bits) + 1;
            return L2Entry::Compressed(CompressedExtent {
                host_offset: host,
                length: sectors * 512 - (host & 511),
            });
        }
        let host = raw & OFFSET_MASK;
        if raw & ZERO != 0 {
            return L2Entry::Zero { host, copied };
        }
        if host == 0 {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal { host, copied }
    }

    /// [`L2Entry::parse`], refusing entries whose offsets a hostile image
    /// got wrong: a data cluster unaligned or at or past `device_size`, a
    /// compressed stream starting at or past it.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for those.
    pub fn decode(raw: u64, cluster_bits: u32, device_size: u64) -> Result<Self> {
        let entry = Self::parse(raw, cluster_bits);
        match entry {
            L2Entry::Compressed(extent) if extent.host_offset >= device_size => fail(
                ErrorKind::Corrupt,
                "qcow2 compressed cluster lies past the end of the image",
            ),
            L2Entry::Normal { host, .. } if host & ((1 << cluster_bits) - 1) != 0 => {
                fail(ErrorKind::Corrupt, "qcow2 data cluster offset is unaligned")
            }
            L2Entry::Normal { host, .. } if host >= device_size => fail(
                ErrorKind::Corrupt,
                "qcow2 data cluster lies past the end of the image",
            ),
            _ => Ok(entry),
        }
    }

    /// The raw bits of the entry in an image of `cluster_bits`.
    pub fn raw(self, cluster_bits: u32) -> u64 {
        let copied = |copied: bool| if copied { COPIED } else { 0 };
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied: c } => copied(c) | host | ZERO,
            L2Entry::Normal { host, copied: c } => copied(c) | host,
            L2Entry::Compressed(extent) => {
                let offset_bits = 62 - (cluster_bits - 8);
                let host = extent.host_offset;
                let sectors = (extent.length + (host & 511)) / 512;
                COMPRESSED | (sectors.saturating_sub(1) << offset_bits) | host
            }
        }
    }

    /// How a guest read of the cluster is served (the start of it, for
    /// data: the caller adds the offset inside the cluster).
    pub fn mapping(self) -> Mapping {
        match self {
            L2Entry::Unallocated => Mapping::Unallocated,
            L2Entry::Zero { .. } => Mapping::Zero,
            L2Entry::Normal { host, .. } => Mapping::Data(host),
            L2Entry::Compressed(extent) => Mapping::Compressed(extent),
        }
    }

    /// The device offset of a cluster the image may write in place (a data
    /// cluster with COPIED), if this is one.
    pub fn in_place(self) -> Option<u64> {
        match self {
            L2Entry::Normal { host, copied: true } => Some(host),
            _ => None,
        }
    }

    /// The host clusters the entry holds, as the device range `start..end`
    /// (`start` aligned to `cluster_size`), if it holds any: a data
    /// cluster, a zero cluster's preallocated storage, the clusters a
    /// compressed stream touches. They are released when the entry is
    /// replaced.
    pub fn storage(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            L2Entry::Unallocated | L2Entry::Zero { host: 0, .. } => None,
            L2Entry::Zero { host, .. } | L2Entry::Normal { host, .. } => {
                Some((host, host + cluster_size))
            }
            L2Entry::Compressed(extent) => {
                let start = extent.host_offset / cluster_size * cluster_size;
                Some((start, extent.host_offset + extent.length))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bits_round_trip() {
        let bits = 16;
        for raw in [
            0,
            COPIED,
            ZERO,
            ZERO | COPIED | 0x3_0000,
            0x5_0000,
            COPIED | 0x5_0000,
            COMPRESSED | (3 << 54) | 0x12_3456,
        ] {
            let entry = L2Entry::parse(raw, bits);
            let again = L2Entry::parse(entry.raw(bits), bits);
            assert_eq!(entry, again, "{raw:#x}");
        }
        assert_eq!(L2Entry::parse(COPIED, bits), L2Entry::Unallocated);
        assert_eq!(L2Entry::owned(0x5_0000).raw(bits), COPIED | 0x5_0000);
    }

    #[test]
    fn decode_refuses_hostile_offsets() {
        let bits = 16;
        let size = 1 << 20;
        let corrupt = |raw| L2Entry::decode(raw, bits, size).unwrap_err().kind();
        assert_eq!(corrupt(0x5_0200), ErrorKind::Corrupt);
        assert_eq!(corrupt(1 << 20), ErrorKind::Corrupt);
        assert_eq!(corrupt(COMPRESSED | (1 << 20)), ErrorKind::Corrupt);
        assert!(L2Entry::decode(ZERO | (1 << 40), bits, size).is_ok());
        assert_eq!(
            L2Entry::decode(COPIED | 0x5_0000, bits, size).unwrap(),
            L2Entry::owned(0x5_0000)
        );
    }

    #[test]
    fn storage_of_each_kind() {
        let cs = 1 << 16;
        let compressed = L2Entry::parse(COMPRESSED | (1 << 54) | 0x1_fe00, 16);
        // Two sectors from 0x1fe00: into the next cluster.
        assert_eq!(compressed.storage(cs), Some((0x1_0000, 0x2_0200)));
        assert_eq!(L2Entry::Unallocated.storage(cs), None);
        let zero = L2Entry::Zero {
            host: 0,
            copied: true,
        };
        assert_eq!(zero.storage(cs), None);
        assert_eq!(L2Entry::owned(cs).storage(cs), Some((cs, 2 * cs)));
    }
}
