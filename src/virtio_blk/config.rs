//! The device configuration space (virtio 1.2 §5.2.4) and the feature bits
//! a disk offers.
//!
//! [`Config`] holds the fields the server enforces; [`Config::bytes`]
//! lays them out as the little-endian structure a driver reads, so a VMM
//! serves config-space reads with [`Config::read`].

use crate::backend::BackendId;
use crate::device::Device;
use crate::engine::DEFAULT_SEGMENTS;
use crate::error::Result;
use crate::graph::{Graph, Perm};

use super::request::SECTOR;

/// Feature bit: `size_max` holds the largest data segment.
pub const F_SIZE_MAX: u32 = 1;
/// Feature bit: `seg_max` holds the most data segments of a request.
pub const F_SEG_MAX: u32 = 2;
/// Feature bit: the disk is read-only.
pub const F_RO: u32 = 5;
/// Feature bit: `blk_size` holds the block size.
pub const F_BLK_SIZE: u32 = 6;
/// Feature bit: flush requests are served.
pub const F_FLUSH: u32 = 9;
/// Feature bit: discard requests are served.
pub const F_DISCARD: u32 = 13;
/// Feature bit: write-zeroes requests are served.
pub const F_WRITE_ZEROES: u32 = 14;
/// Feature bit: virtio 1.0 or later (`VIRTIO_F_VERSION_1`).
pub const F_VERSION_1: u32 = 32;

/// Bytes of the configuration space laid out by [`Config::bytes`]: every
/// field up to `write_zeroes_may_unmap` and its padding (the secure-erase
/// and zoned fields follow, for features not offered).
pub const CONFIG_LEN: usize = 60;

/// Byte offsets of the fields (§5.2.4). `geometry` (16) and `topology`
/// (24) belong to features not offered and stay zero.
const CAPACITY: usize = 0;
const SIZE_MAX: usize = 8;
const SEG_MAX: usize = 12;
const BLK_SIZE: usize = 20;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS: usize = 36;
const MAX_DISCARD_SEG: usize = 40;
const DISCARD_SECTOR_ALIGNMENT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS: usize = 48;
const MAX_WRITE_ZEROES_SEG: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Default largest data segment: 1 MiB.
pub const DEFAULT_SIZE_MAX: u32 = 1 << 20;
/// Default most sectors of one discard or write-zeroes request (32 MiB).
pub const DEFAULT_MAX_ZERO_SECTORS: u32 = 1 << 16;

/// A disk's configuration: what the driver reads and the server enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Size of the disk in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment in bytes.
    pub size_max: u32,
    /// Most data segments of one request (at most the server's
    /// `SEGMENTS`).
    pub seg_max: u32,
    /// Logical block size in bytes (a power of two, at least 512): reads,
    /// writes, discards and write zeroes start and end on its multiples.
    pub blk_size: u32,
    /// Most sectors of one discard; 0 offers no discard.
    pub max_discard_sectors: u32,
    /// Most segments of one discard: the server serves 1.
    pub max_discard_seg: u32,
    /// Discards start and end on multiples of this many sectors (0 or 1:
    /// any sector).
    pub discard_sector_alignment: u32,
    /// Most sectors of one write zeroes; 0 offers no write zeroes.
    pub max_write_zeroes_sectors: u32,
    /// Most segments of one write zeroes: the server serves 1.
    pub max_write_zeroes_seg: u32,
    /// Whether a write zeroes may unmap (told to the driver; the engine's
    /// zero write chooses for itself whatever the request's flag says).
    pub write_zeroes_may_unmap: bool,
    /// Writes, discards and write zeroes are refused (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
}

impl Config {
    /// A disk of `capacity` sectors with the defaults: segments of up to
    /// 1 MiB, [`DEFAULT_SEGMENTS`] of them, 512-byte blocks, discard and
    /// write zeroes of up to 32 MiB in one segment unless `read_only`
    /// (then none).
    pub const fn new(capacity: u64, read_only: bool) -> Self {
        let (zeroes, segments) = match read_only {
            true => (0, 0),
            false => (DEFAULT_MAX_ZERO_SECTORS, 1),
        };
        Self {
            capacity,
            size_max: DEFAULT_SIZE_MAX,
            seg_max: DEFAULT_SEGMENTS as u32,
            blk_size: SECTOR as u32,
            max_discard_sectors: zeroes,
            max_discard_seg: segments,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: zeroes,
            max_write_zeroes_seg: segments,
            write_zeroes_may_unmap: false,
            read_only,
        }
    }

    /// The defaults ([`Config::new`]) for the disk `backend` serves: its
    /// size (whole sectors) and whether it is attached without WRITE.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`](crate::ErrorKind::StaleHandle) for a
    /// detached backend.
    pub fn for_backend<
        D: Device,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        graph: &Graph<D, N, B, C, J>,
        backend: BackendId,
    ) -> Result<Self> {
        let size = graph.backend_size(backend)?;
        let writable = graph.backend_access(backend)?.perm.contains(Perm::WRITE);
        Ok(Self::new(size / SECTOR, !writable))
    }

    /// Whether discard requests are served.
    pub const fn offers_discard(&self) -> bool {
        !self.read_only && self.max_discard_sectors > 0
    }

    /// Whether write-zeroes requests are served.
    pub const fn offers_write_zeroes(&self) -> bool {
        !self.read_only && self.max_write_zeroes_sectors > 0
    }

    /// The device feature bits offered (bit `n` is feature `n`).
    pub const fn features(&self) -> u64 {
        let mut bits = 1 << F_SIZE_MAX | 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH;
        bits |= 1 << F_VERSION_1;
        if self.read_only {
            bits |= 1 << F_RO;
        }
        if self.offers_discard() {
            bits |= 1 << F_DISCARD;
        }
        if self.offers_write_zeroes() {
            bits |= 1 << F_WRITE_ZEROES;
        }
        bits
    }

    /// The configuration space, little-endian, as the driver reads it.
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut out = [0u8; CONFIG_LEN];
        let mut put = |at: usize, field: &[u8]| out[at..at + field.len()].copy_from_slice(field);
        put(CAPACITY, &self.capacity.to_le_bytes());
        put(SIZE_MAX, &self.size_max.to_le_bytes());
        put(SEG_MAX, &self.seg_max.to_le_bytes());
        put(BLK_SIZE, &self.blk_size.to_le_bytes());
        put(NUM_QUEUES, &1u16.to_le_bytes());
        put(MAX_DISCARD_SECTORS, &self.max_discard_sectors.to_le_bytes());
        put(MAX_DISCARD_SEG, &self.max_discard_seg.to_le_bytes());
        put(
            DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SECTORS,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SEG,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(
            WRITE_ZEROES_MAY_UNMAP,
            &[u8::from(self.write_zeroes_may_unmap)],
        );
        out
    }

    /// Serves a driver's read of `buf.len()` config-space bytes at
    /// `offset`: bytes past [`CONFIG_LEN`] read as zero.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let bytes = self.bytes();
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = usize::try_from(at)
                .ok()
                .and_then(|at| bytes.get(at))
                .copied()
                .unwrap_or(0);
        }
    }
}
