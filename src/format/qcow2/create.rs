//! Creating an empty qcow2 image on a device (`qemu-img create -f qcow2`).
//!
//! The new image holds only metadata, laid out as QEMU lays out a fresh image:
//!
//! ```text
//!  cluster 0        header, extensions (backing format), end marker, backing name
//!  next clusters    refcount table
//!  next clusters    refcount blocks (enough to count every cluster listed here)
//!  last clusters    L1 table, all zero (nothing allocated)
//! ```
//!
//! Every one of those clusters has refcount 1. Nothing needs a heap: zeroed
//! clusters and tables are written through one fixed stack chunk, so a 2 MiB
//! cluster never needs a 2 MiB buffer.
//!
//! Writes are ordered so that a torn create never looks like a valid image:
//! when the device is not empty its old header is wiped (write + flush)
//! first; then the tables are written and flushed; the header goes last, in
//! one write, followed by a flush.

use super::header::{
    align_up_8, put_u32, put_u64, Compatible, Compression, Incompatible, AUTOCLEAR_DATA_FILE_RAW,
    EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_END, HEADER_AREA, MAGIC, MAX_BACKING_NAME,
    MAX_FORMAT_NAME, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE, MIN_EXTENDED_L2_CLUSTER_BITS, OFF_AUTOCLEAR,
    OFF_BACKING_OFFSET, OFF_BACKING_SIZE, OFF_CLUSTER_BITS, OFF_COMPATIBLE, OFF_COMPRESSION_TYPE,
    OFF_HEADER_LENGTH, OFF_INCOMPATIBLE, OFF_L1_OFFSET, OFF_L1_SIZE, OFF_REFCOUNT_CLUSTERS,
    OFF_REFCOUNT_OFFSET, OFF_REFCOUNT_ORDER, OFF_SIZE, OFF_VERSION, V2_HEADER_LENGTH,
};
use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};

/// Header length written for version 3 images: the 104 bytes of the v3
/// header plus the compression type byte padded to 8, as QEMU does.
const V3_CREATE_HEADER_LENGTH: usize = 112;
/// Bytes written per device write when filling tables and zeroed clusters;
/// the same stack buffer later holds the header area.
const CHUNK: usize = HEADER_AREA;
/// Sizes are whole 512-byte sectors, as QEMU requires.
const SECTOR: u64 = 512;

/// What [`create`] builds. Start from [`CreateOptions::new`] (QEMU's
/// defaults) and change fields as needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions<'a> {
    /// Virtual size in bytes; a multiple of 512.
    pub size: u64,
    /// log2 of the cluster size, 9..=21 (512 B .. 2 MiB); default 16.
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits, 0..=6 (1..=64 bits); default 4.
    pub refcount_order: u32,
    /// qcow2 version: 2 (`compat=0.10`) or 3 (`compat=1.1`, the default).
    pub version: u32,
    /// Set the lazy refcounts compatible feature (version 3 only).
    pub lazy_refcounts: bool,
    /// The compression type recorded for compressed clusters (zstd: version
    /// 3 only); default zlib.
    pub compression: Compression,
    /// Extended L2 entries: 32 subclusters per cluster (version 3 and
    /// clusters of at least 16 KiB only); default off.
    pub extended_l2: bool,
    /// The external data file's name, stored as given (version 3 only):
    /// guest data goes there; the caller creates the file.
    pub data_file: Option<&'a str>,
    /// The data file is a raw image of the guest view (`data_file_raw`:
    /// needs `data_file`, no backing file).
    pub data_file_raw: bool,
    /// Backing file reference and its format, stored exactly as given.
    pub backing: Option<(&'a str, &'a str)>,
}

impl<'a> CreateOptions<'a> {
    /// Options for an image of `size` bytes with QEMU's defaults: 64 KiB
    /// clusters, 16-bit refcounts, version 3, no lazy refcounts, no backing
    /// file.
    pub const fn new(size: u64) -> Self {
        Self {
            size,
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
            lazy_refcounts: false,
            compression: Compression::Zlib,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            backing: None,
        }
    }

    /// Cluster size in bytes (meaningful once the options are valid).
    pub const fn cluster_size(&self) -> u64 {
        1 << (self.cluster_bits & 63)
    }

    /// Refcount width in bits (meaningful once the options are valid).
    pub const fn refcount_bits(&self) -> u32 {
        1 << (self.refcount_order & 31)
    }

    /// Checks the options without touching any device, so a front end can
    /// refuse them before it creates the image file.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an unsupported combination (cluster
    /// bits outside 9..=21, refcount order outside 0..=6, a version other
    /// than 2 or 3, version 2 with a refcount width other than 16 bits or
    /// with lazy refcounts, a size that is not a multiple of 512 or too large
    /// for the L1 table, an empty backing name or format, a backing name
    /// over 1023 bytes or a format name over 16 bytes);
    /// [`ErrorKind::NoSpace`] when the backing reference does not fit in
    /// cluster 0.
    pub fn validate(&self) -> Result<()> {
        Layout::plan(self).map(|_| ())
    }
}

impl Default for CreateOptions<'_> {
    /// [`CreateOptions::new`] with a size of zero.
    fn default() -> Self {
        Self::new(0)
    }
}

/// Where everything goes, in clusters, and how cluster 0 is filled.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cluster_bits: u32,
    refcount_order: u32,
    l1_size: u64,
    /// First cluster and length of each area.
    refcount_table: (u64, u64),
    refcount_blocks: (u64, u64),
    l1_table: (u64, u64),
}

impl Layout {
    fn plan(options: &CreateOptions<'_>) -> Result<Self> {
        let invalid = |message| fail(ErrorKind::InvalidInput, message);
        if options.version != 2 && options.version != 3 {
            return invalid("qcow2 version must be 2 (compat=0.10) or 3 (compat=1.1)");
        }
        if !(9..=21).contains(&options.cluster_bits) {
            return invalid("cluster size must be a power of two between 512 and 2M");
        }
        if options.refcount_order > 6 {
            return invalid("refcount width must be a power of two up to 64 bits");
        }
        if options.version == 2 && options.refcount_order != 4 {
            return invalid("refcount widths other than 16 bits need compat=1.1");
        }
        if options.version == 2 && options.lazy_refcounts {
            return invalid("lazy refcounts need compat=1.1");
        }
        if options.version == 2 && options.compression != Compression::Zlib {
            return invalid("compression types other than zlib need compat=1.1");
        }
        if options.data_file.is_some() && options.version == 2 {
            return invalid("external data files need compat=1.1");
        }
        if options.data_file_raw && options.data_file.is_none() {
            return invalid("data_file_raw needs a data_file");
        }
        if options.data_file_raw && options.backing.is_some() {
            return invalid("a backing file and data_file_raw cannot be used at the same time");
        }
        if options
            .data_file
            .is_some_and(|name| name.is_empty() || name.len() > MAX_BACKING_NAME)
        {
            return invalid("data file name must be 1 to 1023 bytes");
        }
        if options.extended_l2 && options.version == 2 {
            return invalid("extended L2 entries need compat=1.1");
        }
        if options.extended_l2 && options.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return invalid("extended L2 entries need clusters of at least 16 KiB");
        }
        if !options.size.is_multiple_of(SECTOR) {
            return invalid("image size must be a multiple of 512 bytes");
        }
        if options.size > MAX_VIRTUAL_SIZE {
            return invalid("image size is too large");
        }
        let cluster_bits = options.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        // One L1 entry maps an L2 table of cluster_size / 8 entries (16
        // bytes each when extended).
        let entry_bits = if options.extended_l2 { 4 } else { 3 };
        let l1_size = options.size.div_ceil(1 << (2 * cluster_bits - entry_bits));
        if l1_size > MAX_L1_ENTRIES {
            return invalid("image size is too large for this cluster size");
        }
        let header_used = header_bytes(options)?;
        if header_used as u64 > cluster_size.min(HEADER_AREA as u64) {
            return fail(
                ErrorKind::NoSpace,
                "backing file name does not fit in the qcow2 header cluster",
            );
        }

        let clusters_for = |bytes: u64| bytes.div_ceil(cluster_size);
        let l1_clusters = clusters_for(l1_size * 8);
        let block_entries_bits = cluster_bits + 3 - options.refcount_order;
        // The refcount blocks must count themselves and the table that lists
        // them: grow both until they cover every metadata cluster.
        let (mut table, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + table + blocks + l1_clusters;
            let need_blocks = total.div_ceil(1 << block_entries_bits);
            let need_table = clusters_for(need_blocks * 8);
            if (need_table, need_blocks) == (table, blocks) {
                break;
            }
            table = table.max(need_table);
            blocks = blocks.max(need_blocks);
        }
        Ok(Self {
            cluster_bits,
            refcount_order: options.refcount_order,
            l1_size,
            refcount_table: (1, table),
            refcount_blocks: (1 + table, blocks),
            l1_table: (1 + table + blocks, l1_clusters),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn offset(&self, cluster: u64) -> u64 {
        cluster << self.cluster_bits
    }

    /// Number of clusters the new image consists of.
    fn total_clusters(&self) -> u64 {
        self.l1_table.0 + self.l1_table.1
    }

    fn fixed_header_length(version: u32) -> usize {
        if version == 2 {
            V2_HEADER_LENGTH
        } else {
            V3_CREATE_HEADER_LENGTH
        }
    }
}

/// How many bytes of cluster 0 the header, its extensions and the backing
/// name take for `options`, after checking the backing reference.
fn header_bytes(options: &CreateOptions<'_>) -> Result<usize> {
    let fixed = Layout::fixed_header_length(options.version);
    // The data file extension (before the end marker).
    let fixed = fixed
        + options
            .data_file
            .map_or(0, |name| 8 + align_up_8(name.len()));
    let Some((name, format)) = options.backing else {
        return Ok(fixed + 8);
    };
    if name.len() > MAX_BACKING_NAME {
        return fail(
            ErrorKind::InvalidInput,
            "backing file name longer than 1023 bytes",
        );
    }
    if name.is_empty() || format.is_empty() {
        return fail(
            ErrorKind::InvalidInput,
            "backing file name and format must not be empty",
        );
    }
    if format.len() > MAX_FORMAT_NAME {
        return fail(ErrorKind::InvalidInput, "backing format name is too long");
    }
    // Backing format extension, end marker, then the name.
    Ok(fixed + 8 + align_up_8(format.len()) + 8 + name.len())
}

/// Fills `area` (at least the planned header bytes long, zeroed) with the
/// header, its extensions and the backing name.
fn emit_header(options: &CreateOptions<'_>, layout: &Layout, area: &mut [u8]) {
    let fixed = Layout::fixed_header_length(options.version);
    put_u32(area, 0, MAGIC);
    put_u32(area, OFF_VERSION, options.version);
    put_u32(area, OFF_CLUSTER_BITS, layout.cluster_bits);
    put_u64(area, OFF_SIZE, options.size);
    // crypt_method, snapshots, autoclear features are zero; so are the
    // incompatible features and the compression type for zlib.
    put_u32(area, OFF_L1_SIZE, layout.l1_size as u32);
    put_u64(area, OFF_L1_OFFSET, layout.offset(layout.l1_table.0));
    put_u64(
        area,
        OFF_REFCOUNT_OFFSET,
        layout.offset(layout.refcount_table.0),
    );
    put_u32(area, OFF_REFCOUNT_CLUSTERS, layout.refcount_table.1 as u32);
    if options.version == 3 {
        let compatible = if options.lazy_refcounts {
            Compatible::LAZY_REFCOUNTS.bits()
        } else {
            0
        };
        put_u64(area, OFF_COMPATIBLE, compatible);
        put_u32(area, OFF_REFCOUNT_ORDER, layout.refcount_order);
        put_u32(area, OFF_HEADER_LENGTH, fixed as u32);
        let mut incompatible = Incompatible::empty();
        if options.compression == Compression::Zstd {
            incompatible |= Incompatible::COMPRESSION_TYPE;
            area[OFF_COMPRESSION_TYPE] = 1;
        }
        if options.extended_l2 {
            incompatible |= Incompatible::EXTENDED_L2;
        }
        if options.data_file.is_some() {
            incompatible |= Incompatible::EXTERNAL_DATA;
        }
        put_u64(area, OFF_INCOMPATIBLE, incompatible.bits());
        if options.data_file_raw {
            put_u64(area, OFF_AUTOCLEAR, AUTOCLEAR_DATA_FILE_RAW);
        }
    }
    let mut pos = fixed;
    if let Some(name) = options.data_file {
        put_u32(area, pos, EXT_DATA_FILE);
        put_u32(area, pos + 4, name.len() as u32);
        area[pos + 8..pos + 8 + name.len()].copy_from_slice(name.as_bytes());
        pos += 8 + align_up_8(name.len());
    }
    if let Some((name, format)) = options.backing {
        put_u32(area, pos, EXT_BACKING_FORMAT);
        put_u32(area, pos + 4, format.len() as u32);
        area[pos + 8..pos + 8 + format.len()].copy_from_slice(format.as_bytes());
        pos += 8 + align_up_8(format.len());
        put_u32(area, pos, EXT_END);
        put_u32(area, pos + 4, 0);
        pos += 8;
        area[pos..pos + name.len()].copy_from_slice(name.as_bytes());
        put_u64(area, OFF_BACKING_OFFSET, pos as u64);
        put_u32(area, OFF_BACKING_SIZE, name.len() as u32);
    } else {
        put_u32(area, pos, EXT_END);
        put_u32(area, pos + 4, 0);
    }
}

/// Writes `len` bytes at `offset` chunk by chunk; `fill(position, chunk)`
/// receives each zeroed chunk and its position inside the region.
fn write_region<D: Device>(
    device: &mut D,
    chunk: &mut [u8; CHUNK],
    (offset, len): (u64, u64),
    mut fill: impl FnMut(u64, &mut [u8]),
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        let buf = &mut chunk[..n];
        buf.fill(0);
        fill(done, buf);
        device.write_at(offset + done, buf)?;
        done += n as u64;
    }
    Ok(())
}

/// Writes a valid, empty qcow2 image described by `options` onto `device`,
/// starting at offset 0 (the device is expected to be new; any old content
/// past the new image is left alone and unreferenced).
///
/// Order: when the device is not empty, its first bytes are zeroed and
/// flushed (an old header must not describe the new tables); then the
/// refcount table, refcount blocks, L1 table and the rest of cluster 0 are
/// written and flushed; finally the header is written in one write and
/// flushed. A device cut short at any point before the end holds no valid
/// qcow2 header.
///
/// # Errors
/// As [`CreateOptions::validate`] (nothing is written then); device errors as
/// returned: the device then holds no valid image, unless only the final
/// flush failed (the header may then have reached the device).
pub fn create<D: Device>(device: &mut D, options: &CreateOptions<'_>) -> Result<()> {
    let layout = Layout::plan(options)?;
    let cluster_size = layout.cluster_size();
    let header_area = cluster_size.min(HEADER_AREA as u64);
    let mut chunk = [0u8; CHUNK];

    // R13: an old header is wiped first, the new one goes last.
    if device.size() > 0 {
        write_region(device, &mut chunk, (0, header_area), |_, _| {})?;
        device.flush()?;
    }

    // The rest of cluster 0 (only clusters larger than the header area).
    write_region(
        device,
        &mut chunk,
        (header_area, cluster_size - header_area),
        |_, _| {},
    )?;

    // Refcount table: one entry per refcount block.
    let (first_block, blocks) = layout.refcount_blocks;
    let block_offset = |block: u64| layout.offset(first_block + block);
    let (table, table_clusters) = layout.refcount_table;
    write_region(
        device,
        &mut chunk,
        (layout.offset(table), table_clusters * cluster_size),
        |at, buf| {
            let first = at / 8;
            let last = (first + buf.len() as u64 / 8).min(blocks);
            for entry in first..last {
                let pos = ((entry - first) * 8) as usize;
                put_u64(buf, pos, block_offset(entry));
            }
        },
    )?;

    // Refcount blocks: refcount 1 for every cluster of the new image.
    let order = layout.refcount_order;
    let width = 1u64 << order;
    let block_entries = (cluster_size * 8) >> order;
    let used = layout.total_clusters();
    for block in 0..blocks {
        let first_cluster = block * block_entries;
        let used_here = used.saturating_sub(first_cluster).min(block_entries);
        write_region(
            device,
            &mut chunk,
            (block_offset(block), cluster_size),
            |at, buf| {
                // Entries never straddle a chunk: chunks are whole bytes and
                // at least 8 bytes long, entries at most 8 bytes and aligned.
                let first = (at * 8) >> order;
                let last = (((at + buf.len() as u64) * 8) >> order).min(used_here);
                for entry in first..last {
                    let bit = entry * width - at * 8;
                    // Value 1 sets the entry's least significant bit. Narrow
                    // entries pack from bit 0 (the LSB) of each byte; wider
                    // ones are big-endian, so their LSB is in the last byte.
                    let (byte, shift) = if width < 8 {
                        (bit / 8, bit % 8)
                    } else {
                        ((bit + width) / 8 - 1, 0)
                    };
                    buf[byte as usize] |= 1 << shift;
                }
            },
        )?;
    }

    // L1 table: all entries zero (unallocated).
    let (l1, l1_clusters) = layout.l1_table;
    write_region(
        device,
        &mut chunk,
        (layout.offset(l1), l1_clusters * cluster_size),
        |_, _| {},
    )?;
    device.flush()?;

    // R13: the header, last and in one write, after the tables are durable.
    let area = &mut chunk[..header_area as usize];
    area.fill(0);
    emit_header(options, &layout, area);
    device.write_at(0, area)?;
    device.flush()
}

#[cfg(test)]
mod tests {
    use super::super::Qcow2;
    use super::*;
    use crate::device::{DeviceEvent, MemDevice};
    use std::vec;
    use std::vec::Vec;

    fn be(bytes: &[u8], off: usize, len: usize) -> u64 {
        bytes[off..off + len]
            .iter()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// Creates an image in memory and returns its bytes.
    fn build(options: &CreateOptions<'_>) -> Vec<u8> {
        let mut storage = vec![0u8; 64 << 20];
        let mut device = MemDevice::new(&mut storage, 0, 1).unwrap();
        create(&mut device, options).unwrap();
        device.contents().to_vec()
    }

    /// Refcount of `cluster` read back independently of the writer: the
    /// spec's layout, narrow entries packed from the LSB of each byte.
    fn refcount(image: &[u8], cluster: u64) -> u64 {
        let bits = be(image, 20, 4) as u32;
        let cs = 1u64 << bits;
        let order = if be(image, 4, 4) == 3 {
            be(image, 96, 4) as u32
        } else {
            4
        };
        let width = 1u64 << order;
        let per_block = cs * 8 / width;
        let table = be(image, 48, 8);
        let table_len = be(image, 56, 4) * cs;
        let index = cluster / per_block;
        if index * 8 >= table_len {
            return 0;
        }
        let block = be(image, (table + index * 8) as usize, 8);
        if block == 0 {
            return 0;
        }
        let entry = cluster % per_block;
        let bit = entry * width;
        if width < 8 {
            let byte = image[(block + bit / 8) as usize];
            u64::from(byte >> (bit % 8)) & ((1 << width) - 1)
        } else {
            be(image, (block + bit / 8) as usize, (width / 8) as usize)
        }
    }

    fn open(image: &mut [u8]) -> Result<Qcow2> {
        let len = image.len() as u64;
        let mut device = MemDevice::new(image, len, 2)?;
        Qcow2::open(&mut device)
    }

    #[test]
    fn default_image_reopens_with_the_requested_fields() {
        let options = CreateOptions::new(1 << 30);
        let mut image = build(&options);
        let q = open(&mut image).unwrap();
        let h = q.header();
        assert_eq!(
            (h.version, h.cluster_bits, h.size, h.refcount_order),
            (3, 16, 1 << 30, 4)
        );
        assert_eq!((h.header_length, h.compatible, h.nb_snapshots), (112, 0, 0));
        assert_eq!(h.l1_size, 2, "1 GiB of 512 MiB L2 tables");
        assert_eq!((q.backing_name(), q.backing_format()), (None, None));
        assert!(!q.is_dirty());
        // header, refcount table, refcount block, L1 table.
        assert_eq!(image.len(), 4 << 16);
        assert_eq!(
            (h.refcount_table_offset, h.l1_table_offset),
            (1 << 16, 3 << 16)
        );
        assert!(image[3 << 16..].iter().all(|&b| b == 0), "L1 is zero");
    }

    #[test]
    fn every_width_and_cluster_size_counts_exactly_the_metadata() {
        for cluster_bits in [9, 12, 16, 21] {
            for refcount_order in 0..=6 {
                // Enough L1 clusters for several refcount blocks at 1 bit.
                let mut options = CreateOptions::new(16 << 30);
                options.cluster_bits = cluster_bits;
                options.refcount_order = refcount_order;
                let mut image = build(&options);
                let cs = 1u64 << cluster_bits;
                let what = format!("cluster_bits {cluster_bits} order {refcount_order}");
                assert_eq!(image.len() as u64 % cs, 0, "{what}");
                let clusters = image.len() as u64 / cs;
                for cluster in 0..clusters {
                    assert_eq!(refcount(&image, cluster), 1, "{what} cluster {cluster}");
                }
                // Nothing beyond the image is counted.
                for cluster in clusters..clusters + 70 {
                    assert_eq!(refcount(&image, cluster), 0, "{what} cluster {cluster}");
                }
                let q = open(&mut image).unwrap();
                assert_eq!(q.header().refcount_order, refcount_order, "{what}");
                assert_eq!(q.size(), 16 << 30, "{what}");
            }
        }
    }

    #[test]
    fn tiny_clusters_with_wide_refcounts_need_several_blocks() {
        // 100 GiB with 512-byte clusters and 64-bit refcounts: a 25 MiB L1
        // table, counted by hundreds of refcount blocks and a multi-cluster
        // refcount table.
        let mut options = CreateOptions::new(100 << 30);
        options.cluster_bits = 9;
        options.refcount_order = 6;
        let layout = Layout::plan(&options).unwrap();
        assert!(layout.refcount_table.1 > 1 && layout.refcount_blocks.1 > 1);
        let image = build(&options);
        assert_eq!(image.len() as u64, layout.total_clusters() * 512);
        for cluster in 0..layout.total_clusters() {
            assert_eq!(refcount(&image, cluster), 1, "cluster {cluster}");
        }
    }

    #[test]
    fn sub_byte_refcounts_pack_from_the_least_significant_bit() {
        // 512-byte clusters, 1-bit refcounts: header, table, block, L1 =
        // the four low bits of the block's first byte (as qemu-img writes).
        let mut options = CreateOptions::new(1 << 20);
        options.cluster_bits = 9;
        options.refcount_order = 0;
        let image = build(&options);
        assert_eq!(image.len(), 4 * 512);
        assert_eq!(&image[1024..1026], &[0x0f, 0]);
        options.refcount_order = 1;
        assert_eq!(&build(&options)[1024..1026], &[0x55, 0]);
        options.refcount_order = 2;
        assert_eq!(&build(&options)[1024..1027], &[0x11, 0x11, 0]);
    }

    #[test]
    fn version_2_lazy_refcounts_backing_and_size_zero() {
        let mut options = CreateOptions::new(0);
        options.version = 2;
        options.backing = Some(("dir/base.qcow2", "qcow2"));
        let mut image = build(&options);
        let q = open(&mut image).unwrap();
        assert_eq!(
            (q.header().version, q.header().l1_size, q.size()),
            (2, 0, 0)
        );
        assert_eq!(q.backing_name(), Some("dir/base.qcow2"));
        assert_eq!(q.backing_format(), Some("qcow2"));
        // header, table, block; no L1 cluster.
        assert_eq!(image.len(), 3 << 16);

        let mut options = CreateOptions::new(1 << 20);
        options.lazy_refcounts = true;
        options.backing = Some(("b.raw", "raw"));
        let mut image = build(&options);
        let q = open(&mut image).unwrap();
        assert_eq!(q.header().compatible, 1);
        assert_eq!(
            (q.backing_name(), q.backing_format()),
            (Some("b.raw"), Some("raw"))
        );
    }

    #[test]
    fn longest_backing_name_fits_a_4k_cluster_but_not_512_bytes() {
        let name = "n".repeat(MAX_BACKING_NAME);
        let mut options = CreateOptions::new(1 << 20);
        options.cluster_bits = 12;
        options.backing = Some((&name, "qcow2"));
        let mut image = build(&options);
        assert_eq!(open(&mut image).unwrap().backing_name(), Some(&*name));
        options.cluster_bits = 9;
        let err = options.validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn invalid_options_are_refused_before_any_write() {
        let long = "x".repeat(MAX_BACKING_NAME + 1);
        let base = CreateOptions::new(1 << 20);
        let cases: [(&str, CreateOptions<'_>); 13] = [
            (
                "cluster_bits 8",
                CreateOptions {
                    cluster_bits: 8,
                    ..base
                },
            ),
            (
                "cluster_bits 22",
                CreateOptions {
                    cluster_bits: 22,
                    ..base
                },
            ),
            (
                "refcount_order 7",
                CreateOptions {
                    refcount_order: 7,
                    ..base
                },
            ),
            ("version 1", CreateOptions { version: 1, ..base }),
            ("version 4", CreateOptions { version: 4, ..base }),
            (
                "v2 with 8-bit refcounts",
                CreateOptions {
                    version: 2,
                    refcount_order: 3,
                    ..base
                },
            ),
            (
                "v2 with lazy refcounts",
                CreateOptions {
                    version: 2,
                    lazy_refcounts: true,
                    ..base
                },
            ),
            ("unaligned size", CreateOptions { size: 1000, ..base }),
            ("size over 2^61", CreateOptions { size: !511, ..base }),
            (
                "size beyond the L1 limit",
                CreateOptions {
                    size: 129 << 30,
                    cluster_bits: 9,
                    ..base
                },
            ),
            (
                "long name",
                CreateOptions {
                    backing: Some((&long, "qcow2")),
                    ..base
                },
            ),
            (
                "empty name",
                CreateOptions {
                    backing: Some(("", "qcow2")),
                    ..base
                },
            ),
            (
                "long format",
                CreateOptions {
                    backing: Some(("b", "a-very-long-format-name")),
                    ..base
                },
            ),
        ];
        for (what, options) in cases {
            let mut storage = vec![0u8; 1 << 20];
            let mut device = MemDevice::new(&mut storage, 0, 1).unwrap();
            let err = create(&mut device, &options).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{what}");
            assert_eq!(options.validate().unwrap_err(), err, "{what}");
            assert_eq!((device.writes(), device.flushes()), (0, 0), "{what}");
        }
        // The largest size 512-byte clusters can map is fine.
        let max = CreateOptions {
            size: 128 << 30,
            cluster_bits: 9,
            ..base
        };
        assert!(max.validate().is_ok());
    }

    /// Writes (offset and data) and flushes (`None`), in order.
    type Events = Vec<(Option<u64>, Vec<u8>)>;

    /// Records every write and flush of a create onto a device that already
    /// holds `old` bytes; returns the events with their data.
    fn record(options: &CreateOptions<'_>, old: &[u8]) -> (Events, Vec<u8>) {
        let mut events = Vec::new();
        let mut storage = vec![0u8; 8 << 20];
        storage[..old.len()].copy_from_slice(old);
        let mut observer = |event: DeviceEvent<'_>| match event {
            DeviceEvent::Write { offset, data } => events.push((Some(offset), data.to_vec())),
            DeviceEvent::Flush => events.push((None, Vec::new())),
        };
        let mut device = MemDevice::new(&mut storage, old.len() as u64, 1).unwrap();
        device.observe(&mut observer);
        create(&mut device, options).unwrap();
        let image = device.contents().to_vec();
        (events, image)
    }

    /// Replays `events` onto `old` one by one and reports, for every prefix
    /// (0 to all events), whether the bytes open as a qcow2 image.
    fn replay(events: &Events, old: &[u8]) -> Vec<bool> {
        let mut bytes = old.to_vec();
        let mut opens = vec![open(&mut bytes.clone()).is_ok()];
        for (offset, data) in events {
            if let Some(offset) = offset {
                let end = *offset as usize + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*offset as usize..end].copy_from_slice(data);
                // Opening only reads.
                opens.push(open(&mut bytes).is_ok());
            } else {
                opens.push(*opens.last().unwrap());
            }
        }
        opens
    }

    #[test]
    fn header_is_written_last_and_no_prefix_is_an_image() {
        let mut options = CreateOptions::new(1 << 30);
        options.cluster_bits = 21;
        options.backing = Some(("base.qcow2", "qcow2"));
        let (events, image) = record(&options, &[]);
        let n = events.len();
        assert!(n >= 4);
        assert_eq!(events[n - 1].0, None, "flushed at the end");
        assert_eq!(events[n - 2].0, Some(0), "header written last");
        assert_eq!(events[n - 3].0, None, "tables flushed before the header");
        assert!(
            events[..n - 2].iter().all(|(_, data)| data.len() <= CHUNK),
            "bounded writes"
        );
        let opens = replay(&events, &[]);
        assert!(opens[..n - 1].iter().all(|&ok| !ok), "{opens:?}");
        assert!(opens[n - 1] && opens[n]);
        assert_eq!(image.len(), 4 << 21);
    }

    #[test]
    fn an_old_image_on_the_device_is_wiped_first() {
        let old = build(&CreateOptions::new(1 << 30));
        let mut options = CreateOptions::new(1 << 20);
        options.cluster_bits = 12;
        let (events, image) = record(&options, &old);
        assert_eq!(events[0].0, Some(0));
        assert!(events[0].1.iter().all(|&b| b == 0));
        assert_eq!(events[1].0, None, "wipe flushed before anything else");
        let n = events.len();
        let opens = replay(&events, &old);
        assert!(opens[0], "the old image was valid");
        assert!(opens[1..n - 1].iter().all(|&ok| !ok), "{opens:?}");
        assert!(opens[n - 1] && opens[n]);
        let mut image = image;
        let q = open(&mut image).unwrap();
        assert_eq!((q.size(), q.cluster_size()), (1 << 20, 4096));
    }

    #[test]
    fn device_failures_are_returned_and_leave_no_image() {
        let options = CreateOptions::new(1 << 20);
        let mut storage = vec![0u8; 1 << 20];
        let mut device = MemDevice::new(&mut storage, 0, 1).unwrap();
        create(&mut device, &options).unwrap();
        let ops = device.writes() + device.flushes();
        // Every operation but the header write and the final flush.
        for n in 0..ops - 2 {
            let mut storage = vec![0u8; 1 << 20];
            let mut device = MemDevice::new(&mut storage, 0, 1).unwrap();
            device.fail_operation(Some(n));
            let err = create(&mut device, &options).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Io, "operation {n}");
            let mut bytes = device.contents().to_vec();
            assert!(open(&mut bytes).is_err(), "operation {n}");
        }
    }
}
