//! L2 entries: how one guest cluster is stored in an image, decoded once
//! from the table's raw bits.
//!
//! ```text
//!  standard:   63 COPIED | 62 = 0 | 56..61 reserved | 9..55 host offset | 1..8 reserved | 0 ZERO
//!  compressed: 63 COPIED | 62 = 1 | x..61 extra 512-byte sectors | 0..x host byte offset
//!              (x = 62 - (cluster_bits - 8))
//!  extended:   the 64 bits above (bit 0 reserved), then a subcluster bitmap:
//!              bits 0..31 subcluster k stored at host + k * subcluster size,
//!              bits 32..63 subcluster k - 32 reads as zeros (neither: unallocated)
//! ```
//!
//! An image with extended L2 entries (a [`Layout`] says which) divides each
//! standard cluster into 32 subclusters, each allocated, zero or unallocated
//! on its own; compressed clusters have none. [`L2Entry::parse`] reads
//! either layout into one enum: a cluster whose subclusters all agree is the
//! same [`L2Entry`] a standard entry would be, and only a cluster whose
//! subclusters differ is [`L2Entry::Mixed`]. [`L2Entry::decode`] also
//! checks what a hostile image could get wrong before any offset is used —
//! a data cluster unaligned or past the end of the file, a compressed
//! stream starting past it, a subcluster both allocated and zero, or
//! allocated without a cluster. Everything else in the driver works on the
//! typed entry; only [`L2Entry::raw`] turns one back into bits, to store
//! it.

use super::{CompressedExtent, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{fail, ErrorKind, Result};
use crate::format::Mapping;
use core::ops::Range;

/// Bitmap bits: every subcluster allocated.
const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Bitmap bits: every subcluster reads as zeros.
const ALL_ZERO: u64 = ALL_ALLOCATED << 32;

/// How an image lays out its L2 entries: its cluster size, whether they
/// are extended (128 bits, with subclusters), and whether the data they
/// map lies in an external data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the cluster size (9..=21; at least 14 when extended).
    pub cluster_bits: u32,
    /// Extended L2 entries: 32 subclusters per cluster.
    pub extended: bool,
    /// Data in an external data file: host offsets are offsets in it (0,
    /// with COPIED, is a valid one), its clusters have no refcounts, and
    /// there are no compressed clusters.
    pub external: bool,
}

impl Layout {
    /// Bytes of one L2 entry: 8, or 16 when extended.
    pub const fn entry_bytes(self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// log2 of the entries in one L2 table.
    pub const fn table_bits(self) -> u32 {
        self.cluster_bits - if self.extended { 4 } else { 3 }
    }

    /// log2 of the unit a mapping, a copy-on-write and a zero flag cover:
    /// a subcluster when extended, else a cluster.
    pub const fn unit_bits(self) -> u32 {
        self.cluster_bits - if self.extended { 5 } else { 0 }
    }

    /// Units per cluster: 32 when extended, else 1.
    pub const fn units(self) -> u32 {
        1 << (self.cluster_bits - self.unit_bits())
    }
}

/// The bitmap bits of units `units` (allocated half; `<< 32` for zero).
fn unit_mask(units: Range<u32>) -> u64 {
    let below = |n: u32| (1u64 << n) - 1;
    below(units.end) & !below(units.start)
}

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
    /// Extended L2 only: a cluster whose subclusters are not all alike,
    /// each allocated (at `host` plus its offset), zero or unallocated as
    /// `bitmap` says.
    Mixed {
        /// Device offset of the cluster (0: none; then no subcluster is
        /// allocated).
        host: u64,
        /// The COPIED bit.
        copied: bool,
        /// The subcluster bitmap (module docs).
        bitmap: u64,
    },
}

impl L2Entry {
    /// A data cluster at `host` this image owns alone: what a write that
    /// allocated it maps.
    pub const fn owned(host: u64) -> Self {
        L2Entry::Normal { host, copied: true }
    }

    /// The entry `raw` (and `bitmap`, for extended entries) stands for in
    /// an image of `layout`, unchecked.
    pub fn parse(raw: u64, bitmap: u64, layout: Layout) -> Self {
        let copied = raw & COPIED != 0;
        if raw & COMPRESSED != 0 {
            let offset_bits = 62 - (layout.cluster_bits - 8);
            let host = raw & ((1u64 << offset_bits) - 1);
            let sectors = ((raw & !(COPIED | COMPRESSED)) >> offset_bits) + 1;
            return L2Entry::Compressed(CompressedExtent {
                host_offset: host,
                length: sectors * 512 - (host & 511),
            });
        }
        let host = raw & OFFSET_MASK;
        // Offset 0 is a cluster of an external data file when COPIED says
        // so (QEMU's rule: its clusters always have COPIED).
        let stored = host != 0 || (layout.external && copied);
        if layout.extended {
            return Self::with_bitmap(host, copied, bitmap, stored);
        }
        if raw & ZERO != 0 {
            return L2Entry::Zero { host, copied };
        }
        if !stored {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal { host, copied }
    }

    /// The extended entry of a cluster at `host` (`stored`: it has one)
    /// with `bitmap`, as the plain kind when every subcluster is alike.
    fn with_bitmap(host: u64, copied: bool, bitmap: u64, stored: bool) -> Self {
        match bitmap {
            0 if !stored => L2Entry::Unallocated,
            ALL_ZERO => L2Entry::Zero { host, copied },
            ALL_ALLOCATED if stored => L2Entry::Normal { host, copied },
            _ => L2Entry::Mixed {
                host,
                copied,
                bitmap,
            },
        }
    }

    /// [`L2Entry::parse`], refusing entries a hostile image got wrong: a
    /// data cluster unaligned or at or past `device_size`, a compressed
    /// stream starting at or past it, a subcluster both allocated and
    /// zero, or allocated in no cluster.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for those.
    pub fn decode(raw: u64, bitmap: u64, layout: Layout, device_size: u64) -> Result<Self> {
        let entry = Self::parse(raw, bitmap, layout);
        let data_host = match entry {
            L2Entry::Compressed(_) if layout.external => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 compressed cluster in an image with an external data file",
                )
            }
            L2Entry::Compressed(extent) if extent.host_offset >= device_size => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 compressed cluster lies past the end of the image",
                )
            }
            L2Entry::Mixed {
                host,
                bitmap,
                copied,
            } => {
                if bitmap & (bitmap >> 32) & ALL_ALLOCATED != 0 {
                    return fail(
                        ErrorKind::Corrupt,
                        "qcow2 subcluster is both allocated and zero",
                    );
                }
                let stored = host != 0 || (layout.external && copied);
                if !stored && bitmap & ALL_ALLOCATED != 0 {
                    return fail(
                        ErrorKind::Corrupt,
                        "qcow2 subcluster is allocated in an unallocated cluster",
                    );
                }
                host
            }
            L2Entry::Normal { host, .. } => host,
            // Preallocated zero storage may be written (an owned one, with
            // subclusters or a data file): it must be a whole cluster too.
            L2Entry::Zero { host, .. } if host & ((1 << layout.cluster_bits) - 1) != 0 => {
                return fail(ErrorKind::Corrupt, "qcow2 zero cluster offset is unaligned");
            }
            _ => 0,
        };
        if data_host & ((1 << layout.cluster_bits) - 1) != 0 {
            return fail(ErrorKind::Corrupt, "qcow2 data cluster offset is unaligned");
        }
        // A data file is another file: its clusters lie where the guest's
        // do (below 2^56 by the offset mask), not inside this one.
        if !layout.external && data_host != 0 && data_host >= device_size {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 data cluster lies past the end of the image",
            );
        }
        Ok(entry)
    }

    /// The raw bits of the entry in an image of `layout`: the entry, and
    /// the subcluster bitmap of an extended one (0 otherwise).
    pub fn raw(self, layout: Layout) -> [u64; 2] {
        let copied = |copied: bool| if copied { COPIED } else { 0 };
        let (zero_bit, bitmap) = match layout.extended {
            true => (0, self.bitmap()),
            false => (ZERO, 0),
        };
        let entry = match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied: c } => copied(c) | host | zero_bit,
            L2Entry::Normal { host, copied: c }
            | L2Entry::Mixed {
                host, copied: c, ..
            } => copied(c) | host,
            L2Entry::Compressed(extent) => {
                let offset_bits = 62 - (layout.cluster_bits - 8);
                let host = extent.host_offset;
                let sectors = (extent.length + (host & 511)) / 512;
                COMPRESSED | (sectors.saturating_sub(1) << offset_bits) | host
            }
        };
        [entry, bitmap]
    }

    /// The subcluster bitmap equivalent to the entry (0 for compressed
    /// clusters, which have no subclusters).
    fn bitmap(self) -> u64 {
        match self {
            L2Entry::Unallocated | L2Entry::Compressed(_) => 0,
            L2Entry::Zero { .. } => ALL_ZERO,
            L2Entry::Normal { .. } => ALL_ALLOCATED,
            L2Entry::Mixed { bitmap, .. } => bitmap,
        }
    }

    /// How a guest read of unit `unit` of the cluster is served (a
    /// subcluster, or the cluster: [`Layout::unit_bits`]), and how many
    /// units from it on are served alike — the data of the next ones
    /// following on the device. Data maps to the start of the unit (the
    /// caller adds the offset inside it); a compressed cluster is one
    /// mapping whatever the unit.
    pub fn mapping_run(self, layout: Layout, unit: u32) -> (Mapping, u32) {
        let rest = layout.units() - unit;
        let data = |host: u64| Mapping::Data(host + (u64::from(unit) << layout.unit_bits()));
        match self {
            L2Entry::Unallocated => (Mapping::Unallocated, rest),
            L2Entry::Zero { .. } => (Mapping::Zero, rest),
            L2Entry::Normal { host, .. } => (data(host), rest),
            L2Entry::Compressed(extent) => (Mapping::Compressed(extent), rest),
            L2Entry::Mixed { host, bitmap, .. } => {
                let (allocated, zero) = (bitmap as u32, (bitmap >> 32) as u32);
                let (mapping, alike) = if zero >> unit & 1 != 0 {
                    (Mapping::Zero, zero)
                } else if allocated >> unit & 1 != 0 {
                    (data(host), allocated)
                } else {
                    (Mapping::Unallocated, !(allocated | zero))
                };
                (mapping, (alike >> unit).trailing_ones().min(rest))
            }
        }
    }

    /// The device offset of the cluster this image owns (COPIED) and a
    /// write may use in `layout`: with extended entries any cluster with
    /// storage, whatever its subclusters hold (those a write makes
    /// allocated get their copy-on-write inside it); else a data cluster.
    pub fn owned_host(self, layout: Layout) -> Option<u64> {
        match self {
            // An external data file's clusters are the image's alone.
            L2Entry::Normal { host, .. } if layout.external => Some(host),
            L2Entry::Zero { host, .. } | L2Entry::Mixed { host, .. }
                if layout.external && host != 0 =>
            {
                Some(host)
            }
            L2Entry::Normal { host, copied: true } => Some(host),
            L2Entry::Mixed {
                host, copied: true, ..
            }
            | L2Entry::Zero {
                host, copied: true, ..
            } if layout.extended && host != 0 => Some(host),
            _ => None,
        }
    }

    /// Whether some unit of `units` reads from the cluster's own storage
    /// (allocated data).
    pub fn holds_data(self, units: Range<u32>) -> bool {
        self.bitmap() & unit_mask(units) != 0
    }

    /// Whether every unit of `units` reads from the cluster's own storage
    /// (allocated data).
    pub fn allocated(self, units: Range<u32>) -> bool {
        let mask = unit_mask(units);
        self.bitmap() & mask == mask
    }

    /// The entry once units `units` are written at `host`, a cluster the
    /// image owns: they become allocated data, the others keep what they
    /// read (standard entries: the whole cluster is data). Set only once
    /// their bytes are written (R2, R18).
    pub fn written(self, layout: Layout, host: u64, units: Range<u32>) -> Self {
        if !layout.extended {
            return Self::owned(host);
        }
        let mask = unit_mask(units);
        let bitmap = (self.bitmap() | mask) & !(mask << 32);
        Self::with_bitmap(host, true, bitmap, true)
    }

    /// The extended entry once units `units` read as zeros, the storage
    /// kept (QEMU's subcluster zeroing); `None` for a compressed cluster,
    /// which has no subclusters.
    pub fn zeroed(self, units: Range<u32>) -> Option<Self> {
        let mask = unit_mask(units);
        let bitmap = (self.bitmap() | mask << 32) & !mask;
        match self {
            L2Entry::Normal { host, copied } => Some(Self::with_bitmap(host, copied, bitmap, true)),
            L2Entry::Zero { host, copied } | L2Entry::Mixed { host, copied, .. } => {
                Some(Self::with_bitmap(host, copied, bitmap, host != 0))
            }
            L2Entry::Unallocated => Some(Self::with_bitmap(0, false, bitmap, false)),
            L2Entry::Compressed(_) => None,
        }
    }

    /// The host clusters of the image file the entry holds, as the device
    /// range `start..end` (`start` aligned to the cluster size), if it
    /// holds any: a data cluster, a zero cluster's preallocated storage,
    /// the clusters a compressed stream touches. They are released when
    /// the entry is replaced. An external data file's clusters are not the
    /// image file's: none.
    pub fn storage(self, layout: Layout) -> Option<(u64, u64)> {
        let cluster_size = 1u64 << layout.cluster_bits;
        if layout.external {
            return None;
        }
        match self {
            L2Entry::Unallocated
            | L2Entry::Zero { host: 0, .. }
            | L2Entry::Mixed { host: 0, .. } => None,
            L2Entry::Zero { host, .. }
            | L2Entry::Normal { host, .. }
            | L2Entry::Mixed { host, .. } => Some((host, host + cluster_size)),
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

    const STANDARD: Layout = Layout {
        cluster_bits: 16,
        extended: false,
        external: false,
    };
    const EXTENDED: Layout = Layout {
        cluster_bits: 16,
        extended: true,
        external: false,
    };
    const EXTERNAL: Layout = Layout {
        cluster_bits: 16,
        extended: false,
        external: true,
    };

    #[test]
    fn raw_bits_round_trip() {
        for raw in [
            0,
            COPIED,
            ZERO,
            ZERO | COPIED | 0x3_0000,
            0x5_0000,
            COPIED | 0x5_0000,
            COMPRESSED | (3 << 54) | 0x12_3456,
        ] {
            let entry = L2Entry::parse(raw, 0, STANDARD);
            let again = L2Entry::parse(entry.raw(STANDARD)[0], 0, STANDARD);
            assert_eq!(entry, again, "{raw:#x}");
        }
        assert_eq!(L2Entry::parse(COPIED, 0, STANDARD), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::owned(0x5_0000).raw(STANDARD),
            [COPIED | 0x5_0000, 0]
        );
    }

    #[test]
    fn extended_entries_round_trip_and_canonicalise() {
        for (raw, bitmap) in [
            (0, 0),
            (0, ALL_ZERO),
            (0, 0x0000_0003_0000_0000),
            (COPIED | 0x5_0000, ALL_ALLOCATED),
            (COPIED | 0x5_0000, 0x0000_0100_0000_00ff),
            (0x5_0000, 0),
            (0x5_0000, ALL_ZERO),
            (COMPRESSED | (3 << 54) | 0x12_3456, 0),
        ] {
            let entry = L2Entry::parse(raw, bitmap, EXTENDED);
            assert_eq!(entry.raw(EXTENDED), [raw, bitmap], "{raw:#x} {bitmap:#x}");
        }
        assert_eq!(
            L2Entry::parse(COPIED | 0x5_0000, ALL_ALLOCATED, EXTENDED),
            L2Entry::owned(0x5_0000)
        );
        assert_eq!(
            L2Entry::parse(0, ALL_ZERO, EXTENDED),
            L2Entry::Zero {
                host: 0,
                copied: false
            }
        );
        // Bit 0 is reserved in extended entries: no zero flag.
        assert_eq!(L2Entry::parse(ZERO, 0, EXTENDED), L2Entry::Unallocated);
    }

    #[test]
    fn decode_refuses_hostile_offsets() {
        let size = 1 << 20;
        let corrupt = |raw, bitmap, layout| {
            L2Entry::decode(raw, bitmap, layout, size)
                .unwrap_err()
                .kind()
        };
        assert_eq!(corrupt(0x5_0200, 0, STANDARD), ErrorKind::Corrupt);
        assert_eq!(corrupt(1 << 20, 0, STANDARD), ErrorKind::Corrupt);
        assert_eq!(
            corrupt(COMPRESSED | (1 << 20), 0, STANDARD),
            ErrorKind::Corrupt
        );
        assert!(L2Entry::decode(ZERO | (1 << 40), 0, STANDARD, size).is_ok());
        assert_eq!(corrupt(ZERO | 0x5_0200, 0, STANDARD), ErrorKind::Corrupt);
        assert_eq!(corrupt(0x5_0200, ALL_ZERO, EXTENDED), ErrorKind::Corrupt);
        assert_eq!(
            L2Entry::decode(COPIED | 0x5_0000, 0, STANDARD, size).unwrap(),
            L2Entry::owned(0x5_0000)
        );
        // Extended: allocated and zero at once, allocated without a
        // cluster, a partly allocated cluster past the end or unaligned.
        assert_eq!(corrupt(0x5_0000, 1 | 1 << 32, EXTENDED), ErrorKind::Corrupt);
        assert_eq!(corrupt(0, 1, EXTENDED), ErrorKind::Corrupt);
        assert_eq!(corrupt(1 << 20, 1, EXTENDED), ErrorKind::Corrupt);
        assert_eq!(corrupt(0x5_0200, 1, EXTENDED), ErrorKind::Corrupt);
        assert!(L2Entry::decode(0x5_0000, 1 | 2 << 32, EXTENDED, size).is_ok());
    }

    #[test]
    fn subcluster_runs() {
        let sub = 1u64 << EXTENDED.unit_bits();
        // Subclusters 0..4 data, 4..6 zero, 6..32 unallocated.
        let entry = L2Entry::parse(COPIED | 0x5_0000, 0xf | 0x30 << 32, EXTENDED);
        assert_eq!(
            entry.mapping_run(EXTENDED, 1),
            (Mapping::Data(0x5_0000 + sub), 3)
        );
        assert_eq!(entry.mapping_run(EXTENDED, 4), (Mapping::Zero, 2));
        assert_eq!(entry.mapping_run(EXTENDED, 6), (Mapping::Unallocated, 26));
        assert_eq!(
            L2Entry::owned(0x5_0000).mapping_run(EXTENDED, 31),
            (Mapping::Data(0x5_0000 + 31 * sub), 1)
        );
        assert_eq!(
            L2Entry::owned(0x5_0000).mapping_run(STANDARD, 0),
            (Mapping::Data(0x5_0000), 1)
        );
        assert!(entry.allocated(0..4) && !entry.allocated(3..5));
    }

    #[test]
    fn writes_and_zeroes_set_subcluster_bits() {
        let host = 0x5_0000;
        let written = L2Entry::Unallocated.written(EXTENDED, host, 2..4);
        assert_eq!(written.raw(EXTENDED), [COPIED | host, 0xc]);
        let zero = L2Entry::Zero {
            host: 0,
            copied: false,
        };
        let over_zero = zero.written(EXTENDED, host, 0..1);
        assert_eq!(
            over_zero.raw(EXTENDED),
            [COPIED | host, 1 | (ALL_ZERO & !(1 << 32))]
        );
        assert_eq!(written.written(EXTENDED, host, 0..32), L2Entry::owned(host));
        assert_eq!(
            L2Entry::Unallocated.written(STANDARD, host, 0..1),
            L2Entry::owned(host)
        );
        let zeroed = L2Entry::owned(host).zeroed(0..31).unwrap();
        assert_eq!(
            zeroed.raw(EXTENDED),
            [COPIED | host, 1 << 31 | (ALL_ZERO & !(1 << 63))]
        );
        assert_eq!(
            zeroed.zeroed(31..32),
            Some(L2Entry::Zero { host, copied: true })
        );
        let compressed = L2Entry::parse(COMPRESSED | 0x12_3456, 0, EXTENDED);
        assert_eq!(compressed.zeroed(0..1), None);
    }

    #[test]
    fn owned_hosts_of_each_layout() {
        let host = 0x5_0000;
        let zero = L2Entry::Zero { host, copied: true };
        assert_eq!(zero.owned_host(EXTENDED), Some(host));
        assert_eq!(zero.owned_host(STANDARD), None);
        let shared = L2Entry::Mixed {
            host,
            copied: false,
            bitmap: 1,
        };
        assert_eq!(shared.owned_host(EXTENDED), None);
        assert_eq!(L2Entry::owned(host).owned_host(STANDARD), Some(host));
    }

    #[test]
    fn storage_of_each_kind() {
        let cs = 1 << 16;
        let compressed = L2Entry::parse(COMPRESSED | (1 << 54) | 0x1_fe00, 0, STANDARD);
        // Two sectors from 0x1fe00: into the next cluster.
        assert_eq!(compressed.storage(STANDARD), Some((0x1_0000, 0x2_0200)));
        assert_eq!(L2Entry::Unallocated.storage(STANDARD), None);
        let zero = L2Entry::Zero {
            host: 0,
            copied: true,
        };
        assert_eq!(zero.storage(STANDARD), None);
        assert_eq!(L2Entry::owned(cs).storage(STANDARD), Some((cs, 2 * cs)));
        let mixed = L2Entry::parse(0, 1 << 40, EXTENDED);
        assert_eq!(mixed.storage(EXTENDED), None);
        // An external data file's clusters are not the image file's.
        assert_eq!(L2Entry::owned(cs).storage(EXTERNAL), None);
    }

    #[test]
    fn external_data_file_entries() {
        // Offset 0 with COPIED is the data file's first cluster.
        assert_eq!(L2Entry::parse(COPIED, 0, EXTERNAL), L2Entry::owned(0));
        assert_eq!(L2Entry::parse(0, 0, EXTERNAL), L2Entry::Unallocated);
        // Any cluster of the data file lies where the guest's does, past
        // the end of the image file too; compressed clusters cannot exist.
        let far = COPIED | (1 << 40);
        assert!(L2Entry::decode(far, 0, EXTERNAL, 1 << 20).is_ok());
        let compressed = COMPRESSED | 0x1_0000;
        let err = L2Entry::decode(compressed, 0, EXTERNAL, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        // Every data cluster, COPIED or not, is the image's to write.
        let shared = L2Entry::Normal {
            host: 0x5_0000,
            copied: false,
        };
        assert_eq!(shared.owned_host(EXTERNAL), Some(0x5_0000));
        assert_eq!(shared.owned_host(STANDARD), None);
    }
}
