//! The qcow2 header and its extensions: a checked parse of cluster 0 and the
//! rebuild used to change the backing file reference.
//!
//! Every byte comes from an untrusted image. [`Header::parse`] validates each
//! field once; the accessors of the result cannot fail afterwards.

use crate::error::{fail, ErrorKind, Result};
use heapless::String;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes of cluster 0 examined for the header and its extensions. An image
/// whose extensions reach beyond this is refused as unsupported.
pub const HEADER_AREA: usize = 4096;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// Longest backing format name kept (QEMU's format names are short).
pub const MAX_FORMAT_NAME: usize = 16;
/// Largest L1 table accepted, in entries (QEMU: 32 MiB of entries).
pub(crate) const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// Largest virtual size accepted (QEMU's limit, 2^61 bytes).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Largest refcount table accepted, in bytes (QEMU: 8 MiB).
pub(crate) const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Most internal snapshots accepted (QEMU's limit).
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// The least cluster bits of an image with extended L2 entries (16 KiB
/// clusters: 512-byte subclusters), as QEMU requires.
pub(crate) const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

pub(crate) const V2_HEADER_LENGTH: usize = 72;
pub(crate) const V3_HEADER_LENGTH: usize = 104;

// Field offsets.
pub(crate) const OFF_VERSION: usize = 4;
pub(crate) const OFF_BACKING_OFFSET: usize = 8;
pub(crate) const OFF_BACKING_SIZE: usize = 16;
pub(crate) const OFF_CLUSTER_BITS: usize = 20;
pub(crate) const OFF_SIZE: usize = 24;
pub(crate) const OFF_CRYPT: usize = 32;
pub(crate) const OFF_L1_SIZE: usize = 36;
pub(crate) const OFF_L1_OFFSET: usize = 40;
pub(crate) const OFF_REFCOUNT_OFFSET: usize = 48;
pub(crate) const OFF_REFCOUNT_CLUSTERS: usize = 56;
pub(crate) const OFF_NB_SNAPSHOTS: usize = 60;
pub(crate) const OFF_SNAPSHOTS_OFFSET: usize = 64;
pub(crate) const OFF_INCOMPATIBLE: usize = 72;
pub(crate) const OFF_COMPATIBLE: usize = 80;
pub(crate) const OFF_AUTOCLEAR: usize = 88;
pub(crate) const OFF_REFCOUNT_ORDER: usize = 96;
pub(crate) const OFF_HEADER_LENGTH: usize = 100;
pub(crate) const OFF_COMPRESSION_TYPE: usize = 104;

/// Header extension types.
pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// The header extension naming the external data file ("DATA").
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Autoclear bit: the external data file is a raw image of the guest view
/// (`data_file_raw`).
pub(crate) const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

bitflags::bitflags! {
    /// Incompatible feature bits (v3): an unknown one means "do not open".
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Incompatible: u64 {
        /// Refcounts may be stale (lazy refcounts were in use).
        const DIRTY = 1 << 0;
        /// Metadata is known to be corrupt; writes are refused.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA = 1 << 2;
        /// The compression type field is not zlib.
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries carry subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags::bitflags! {
    /// Compatible feature bits (v3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Compatible: u64 {
        /// Refcount updates may be deferred; the dirty bit guards them.
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

/// A validated qcow2 header.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// L1 table length in entries.
    pub l1_size: u32,
    /// Byte offset of the L1 table (cluster aligned).
    pub l1_table_offset: u64,
    /// Byte offset of the refcount table (cluster aligned).
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Byte offset of the snapshot table (cluster aligned; 0 without
    /// snapshots).
    pub snapshots_offset: u64,
    /// Incompatible feature bits (known ones only; unknown bits refuse open).
    pub incompatible: Incompatible,
    /// Compatible feature bits as stored.
    pub compatible: u64,
    /// Autoclear feature bits as stored.
    pub autoclear: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Length of the fixed header; extensions start here.
    pub header_length: u32,
    /// How compressed clusters are compressed (the `compression_type`
    /// field; zlib when the header does not reach it).
    pub compression: Compression,
    /// The backing file name, if any.
    pub backing_name: Option<String<MAX_BACKING_NAME>>,
    /// The backing format from its header extension, if present.
    pub backing_format: Option<String<MAX_FORMAT_NAME>>,
    /// End of the extension area (after the end marker), within cluster 0.
    pub extensions_end: u32,
}

/// The `compression_type` of a qcow2 image: how its compressed clusters
/// are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Raw deflate (type 0, the default).
    Zlib,
    /// One zstd frame per cluster (type 1, with the incompatible bit 3).
    Zstd,
}

impl Compression {
    /// qemu-img's name for it.
    pub const fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

fn be_u32(buf: &[u8], off: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[off..off + 4]);
    u32::from_be_bytes(bytes)
}

fn be_u64(buf: &[u8], off: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(bytes)
}

pub(crate) fn put_u32(buf: &mut [u8], off: usize, value: u32) {
    buf[off..off + 4].copy_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], off: usize, value: u64) {
    buf[off..off + 8].copy_from_slice(&value.to_be_bytes());
}

pub(crate) const fn align_up_8(n: usize) -> usize {
    (n + 7) & !7
}

/// One header extension as found in cluster 0.
struct Extension {
    kind: u32,
    /// Offset and length of its data.
    data: (usize, usize),
}

/// Refuses an external data file name a hostile image got wrong: empty,
/// longer than a backing name may be, or not UTF-8.
fn check_data_file_name(name: &[u8]) -> Result<&str> {
    if name.is_empty() || name.len() > MAX_BACKING_NAME {
        return fail(
            ErrorKind::Corrupt,
            "qcow2 external data file name is empty or too long",
        );
    }
    core::str::from_utf8(name).map_err(|_| {
        crate::Error::new(
            ErrorKind::Corrupt,
            "qcow2 external data file name is not UTF-8",
        )
    })
}

/// The external data file name the header extensions in `area` (cluster 0,
/// validated by [`Header::parse`]) record, if any.
pub(crate) fn data_file_name<'a>(header: &Header, area: &'a [u8]) -> Option<&'a str> {
    let end = (header.extensions_end as usize).min(area.len());
    let mut found = None;
    let _ = walk_extensions(&area[..end], header.header_length as usize, |ext| {
        if ext.kind == EXT_DATA_FILE {
            let (off, len) = ext.data;
            found = check_data_file_name(&area[off..off + len])
                .ok()
                .map(|_| (off, len));
        }
        Ok(())
    });
    let (off, len) = found?;
    core::str::from_utf8(&area[off..off + len]).ok()
}

/// Walks the extensions stored in `area` from `start`, calling `visit` on
/// each, and returns the offset after the end marker (or the end of `area`
/// when the extensions simply run up to it, as QEMU accepts).
fn walk_extensions(
    area: &[u8],
    start: usize,
    mut visit: impl FnMut(&Extension) -> Result<()>,
) -> Result<usize> {
    let mut pos = start;
    loop {
        if pos + 8 > area.len() {
            return Ok(area.len());
        }
        let kind = be_u32(area, pos);
        let len = be_u32(area, pos + 4) as usize;
        if kind == EXT_END {
            return Ok(pos + 8);
        }
        let data = pos + 8;
        let end = match data.checked_add(align_up_8(len)) {
            Some(end) if end <= area.len() => end,
            _ => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 header extension runs past cluster 0",
                )
            }
        };
        visit(&Extension {
            kind,
            data: (data, len),
        })?;
        pos = end;
    }
}

impl Header {
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible.contains(Incompatible::EXTERNAL_DATA)
    }

    /// Whether the external data file is a raw image of the guest view
    /// (`data_file_raw`: only with a data file).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Size of a cluster in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Validates the header in `area` (the first bytes of the image, at most
    /// [`HEADER_AREA`] and at most one cluster) of an image file of
    /// `file_size` bytes. Returns the header and the byte range (offset,
    /// length) of the backing name, which the caller reads and hands to
    /// [`Header::set_backing_name`].
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for malformed fields, [`ErrorKind::Unsupported`]
    /// for features this crate does not implement.
    pub fn parse(area: &[u8], file_size: u64) -> Result<(Self, Option<(u64, u32)>)> {
        if area.len() < V2_HEADER_LENGTH || be_u32(area, 0) != MAGIC {
            return fail(ErrorKind::Corrupt, "not a qcow2 image (bad magic)");
        }
        let version = be_u32(area, OFF_VERSION);
        if version != 2 && version != 3 {
            return fail(ErrorKind::Unsupported, "unsupported qcow2 version");
        }
        let cluster_bits = be_u32(area, OFF_CLUSTER_BITS);
        if !(9..=21).contains(&cluster_bits) {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 cluster_bits out of range (9..=21)",
            );
        }
        let cluster_size = 1u64 << cluster_bits;
        let area = &area[..area.len().min(cluster_size as usize)];
        let (header_length, incompatible_bits, compatible, autoclear, refcount_order) =
            if version == 2 {
                (V2_HEADER_LENGTH as u32, 0, 0, 0, 4)
            } else {
                if area.len() < V3_HEADER_LENGTH {
                    return fail(ErrorKind::Corrupt, "qcow2 v3 header is truncated");
                }
                (
                    be_u32(area, OFF_HEADER_LENGTH),
                    be_u64(area, OFF_INCOMPATIBLE),
                    be_u64(area, OFF_COMPATIBLE),
                    be_u64(area, OFF_AUTOCLEAR),
                    be_u32(area, OFF_REFCOUNT_ORDER),
                )
            };
        if version == 3
            && (header_length < V3_HEADER_LENGTH as u32
                || header_length % 8 != 0
                || u64::from(header_length) > cluster_size)
        {
            return fail(ErrorKind::Corrupt, "qcow2 header_length is invalid");
        }
        if header_length as usize > area.len() {
            return fail(
                ErrorKind::Unsupported,
                "unsupported qcow2 header_length (over 4 KiB)",
            );
        }
        let Some(incompatible) = Incompatible::from_bits(incompatible_bits) else {
            return fail(
                ErrorKind::Unsupported,
                "unsupported qcow2 incompatible feature bits",
            );
        };
        let extended_l2 = incompatible.contains(Incompatible::EXTENDED_L2);
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 extended L2 entries need clusters of at least 16 KiB",
            );
        }
        // The compression type byte exists when the header reaches it; it
        // is zlib (0) otherwise. As in QEMU: an unknown type is unsupported,
        // and the incompatible bit is set exactly when the type is not zlib.
        let compression = if header_length as usize > OFF_COMPRESSION_TYPE {
            area[OFF_COMPRESSION_TYPE]
        } else {
            0
        };
        let compression_bit = incompatible.contains(Incompatible::COMPRESSION_TYPE);
        let compression = match (compression, compression_bit) {
            (0, false) => Compression::Zlib,
            (0, true) => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 compression type bit set for zlib compression",
                )
            }
            (1, false) => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 compression type is not zlib but its incompatible bit is clear",
                )
            }
            (1, true) => Compression::Zstd,
            _ => {
                return fail(
                    ErrorKind::Unsupported,
                    "unsupported qcow2 compression type (unknown)",
                )
            }
        };
        if refcount_order > 6 {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcount_order out of range (0..=6)",
            );
        }
        match be_u32(area, OFF_CRYPT) {
            0 => {}
            1 | 2 => {
                return fail(
                    ErrorKind::Unsupported,
                    "unsupported qcow2 feature: encryption",
                )
            }
            _ => return fail(ErrorKind::Corrupt, "qcow2 crypt_method is invalid"),
        }

        let size = be_u64(area, OFF_SIZE);
        if size > MAX_VIRTUAL_SIZE {
            return fail(ErrorKind::Corrupt, "qcow2 virtual size is too large");
        }
        let l1_size = be_u32(area, OFF_L1_SIZE);
        let l1_table_offset = be_u64(area, OFF_L1_OFFSET);
        let l2_entries = cluster_size / if extended_l2 { 16 } else { 8 };
        let bytes_per_l1_entry = l2_entries * cluster_size;
        let l1_needed = size.div_ceil(bytes_per_l1_entry);
        if u64::from(l1_size) > MAX_L1_ENTRIES {
            return fail(ErrorKind::Corrupt, "qcow2 L1 table too large (over 32 MiB)");
        }
        if u64::from(l1_size) < l1_needed {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 L1 table size does not match the image size",
            );
        }
        check_table(
            l1_table_offset,
            u64::from(l1_size) * 8,
            cluster_size,
            Some(file_size),
        )?;
        let refcount_table_offset = be_u64(area, OFF_REFCOUNT_OFFSET);
        let refcount_table_clusters = be_u32(area, OFF_REFCOUNT_CLUSTERS);
        if u64::from(refcount_table_clusters) * cluster_size > MAX_REFCOUNT_TABLE_BYTES {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcount table too large (over 8 MiB)",
            );
        }
        check_table(
            refcount_table_offset,
            u64::from(refcount_table_clusters) * cluster_size,
            cluster_size,
            Some(file_size),
        )?;
        let nb_snapshots = be_u32(area, OFF_NB_SNAPSHOTS);
        if nb_snapshots > MAX_SNAPSHOTS {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 has too many snapshots (over 65536)",
            );
        }
        if nb_snapshots > 0 && !be_u64(area, OFF_SNAPSHOTS_OFFSET).is_multiple_of(cluster_size) {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot table offset is unaligned",
            );
        }

        let backing_offset = be_u64(area, OFF_BACKING_OFFSET);
        let backing_size = be_u32(area, OFF_BACKING_SIZE);
        let backing = if backing_offset == 0 {
            None
        } else {
            if backing_size as usize > MAX_BACKING_NAME {
                return fail(ErrorKind::Corrupt, "qcow2 backing file name is too long");
            }
            if backing_size == 0 {
                return fail(ErrorKind::Corrupt, "qcow2 backing file name is empty");
            }
            match backing_offset.checked_add(u64::from(backing_size)) {
                Some(end) if end <= cluster_size && backing_offset >= u64::from(header_length) => {}
                _ => {
                    return fail(
                        ErrorKind::Corrupt,
                        "qcow2 backing file name lies outside cluster 0",
                    )
                }
            }
            Some((backing_offset, backing_size))
        };

        // Extensions end at the backing name (when it exists) or cluster 0.
        let area_limit = match backing {
            Some((off, _)) => off as usize,
            None => cluster_size as usize,
        }
        .min(area.len());
        let mut backing_format = None;
        let mut data_file = false;
        let extensions_end = if version == 2 && area_limit <= V2_HEADER_LENGTH {
            V2_HEADER_LENGTH
        } else {
            walk_extensions(&area[..area_limit], header_length as usize, |ext| {
                if ext.kind == EXT_DATA_FILE {
                    let (off, len) = ext.data;
                    check_data_file_name(&area[off..off + len])?;
                    data_file = true;
                }
                if ext.kind == EXT_BACKING_FORMAT {
                    let (off, len) = ext.data;
                    let name = core::str::from_utf8(&area[off..off + len]).map_err(|_| {
                        crate::Error::new(ErrorKind::Corrupt, "qcow2 backing format is not UTF-8")
                    })?;
                    let mut format = String::new();
                    if format.push_str(name).is_err() {
                        return fail(ErrorKind::Unsupported, "unsupported backing format name");
                    }
                    backing_format = Some(format);
                }
                Ok(())
            })?
        };

        if incompatible.contains(Incompatible::EXTERNAL_DATA) && !data_file {
            return fail(
                ErrorKind::Unsupported,
                "unsupported qcow2 image: an external data file without its name (the DATA header extension)",
            );
        }
        let header = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset: if nb_snapshots > 0 {
                be_u64(area, OFF_SNAPSHOTS_OFFSET)
            } else {
                0
            },
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_name: None,
            backing_format,
            extensions_end: extensions_end as u32,
        };
        Ok((header, backing))
    }

    /// Stores the backing name read from the range [`Header::parse`]
    /// returned. As in QEMU, the name is a C string: it ends at its first
    /// NUL byte, and an empty name means no backing file.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] when the name is not UTF-8.
    pub fn set_backing_name(&mut self, bytes: &[u8]) -> Result<()> {
        let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
        if bytes.is_empty() {
            self.backing_name = None;
            return Ok(());
        }
        let Ok(name) = core::str::from_utf8(bytes) else {
            return fail(ErrorKind::Corrupt, "qcow2 backing file name is not UTF-8");
        };
        let mut stored = String::new();
        // The parser already bounded the length to MAX_BACKING_NAME.
        stored
            .push_str(name)
            .map_err(|_| crate::Error::new(ErrorKind::Corrupt, "qcow2 backing name too long"))?;
        self.backing_name = Some(stored);
        Ok(())
    }
}

/// A metadata table must be cluster aligned, outside the header cluster and,
/// when `file_size` is given, inside the image file.
fn check_table(offset: u64, bytes: u64, cluster_size: u64, file_size: Option<u64>) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) || offset == 0 {
        return fail(ErrorKind::Corrupt, "qcow2 metadata table offset is invalid");
    }
    match (offset.checked_add(bytes), file_size) {
        (None, _) => fail(ErrorKind::Corrupt, "qcow2 metadata table offset overflows"),
        (Some(end), Some(file_size)) if end > file_size => fail(
            ErrorKind::Corrupt,
            "qcow2 metadata table lies past the end of the image",
        ),
        _ => Ok(()),
    }
}

/// Builds in `out` the header area that replaces `area` (the `used`
/// leading bytes of cluster 0 as read from the image) so that it
/// references `backing` (name and, when known, format) or nothing,
/// preserving every other extension. Returns the number of bytes of `out`
/// to write at offset 0: the new content, zero-padded to cover what the
/// old one used.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] when the name exceeds 1023 bytes,
/// [`ErrorKind::NoSpace`] when the result does not fit in cluster 0 (or
/// `area` or `out`).
pub fn rebuild_with_backing(
    header: &Header,
    area: &[u8],
    out: &mut [u8],
    used: usize,
    backing: Option<(&str, Option<&str>)>,
) -> Result<usize> {
    if let Some((name, format)) = backing {
        if name.len() > MAX_BACKING_NAME {
            return fail(
                ErrorKind::InvalidInput,
                "backing file name longer than 1023 bytes",
            );
        }
        if name.is_empty() || format.is_some_and(|f| f.len() > MAX_FORMAT_NAME) {
            return fail(
                ErrorKind::InvalidInput,
                "invalid backing file name or format",
            );
        }
    }
    let limit = (header.cluster_size() as usize)
        .min(area.len())
        .min(out.len());
    let out = &mut out[..limit];
    out.fill(0);
    let header_length = header.header_length as usize;
    if header_length > limit {
        return fail(
            ErrorKind::NoSpace,
            "the qcow2 header does not fit the buffer",
        );
    }
    out[..header_length].copy_from_slice(&area[..header_length]);
    let mut pos = header_length;
    let mut overflow = false;
    let mut append = |out: &mut [u8], pos: &mut usize, kind: u32, data: &[u8]| {
        let end = *pos + 8 + align_up_8(data.len());
        if end > limit {
            overflow = true;
            return;
        }
        put_u32(out, *pos, kind);
        put_u32(out, *pos + 4, data.len() as u32);
        out[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
        *pos = end;
    };
    // v2 images may carry extensions too; a v2 image without any keeps none
    // unless a backing format must be recorded.
    if let Some((_, Some(format))) = backing {
        append(out, &mut pos, EXT_BACKING_FORMAT, format.as_bytes());
    }
    let old_area_end = header.extensions_end as usize;
    if old_area_end > header_length {
        walk_extensions(&area[..old_area_end], header_length, |ext| {
            if ext.kind != EXT_BACKING_FORMAT {
                let (off, len) = ext.data;
                append(out, &mut pos, ext.kind, &area[off..off + len]);
            }
            Ok(())
        })?;
    }
    if pos + 8 > limit {
        overflow = true;
    } else {
        put_u32(out, pos, EXT_END);
        put_u32(out, pos + 4, 0);
        pos += 8;
    }
    match backing {
        Some((name, _)) if !overflow && pos + name.len() <= limit => {
            out[pos..pos + name.len()].copy_from_slice(name.as_bytes());
            put_u64(out, OFF_BACKING_OFFSET, pos as u64);
            put_u32(out, OFF_BACKING_SIZE, name.len() as u32);
            pos += name.len();
        }
        Some(_) => overflow = true,
        None => {
            put_u64(out, OFF_BACKING_OFFSET, 0);
            put_u32(out, OFF_BACKING_SIZE, 0);
        }
    }
    if overflow {
        return fail(
            ErrorKind::NoSpace,
            "backing file name does not fit in the qcow2 header cluster",
        );
    }
    Ok(pos.max(used).min(limit))
}

/// How many bytes of cluster 0 the current header content occupies.
pub fn used_bytes(header: &Header, backing: Option<(u64, u32)>) -> usize {
    let ext_end = header.extensions_end as usize;
    match backing {
        Some((off, len)) => ext_end.max((off + u64::from(len)) as usize),
        None => ext_end,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testimg::{TestImage, CLUSTER};
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Header> {
        let area = &bytes[..bytes.len().min(HEADER_AREA)];
        let (mut header, name) = Header::parse(area, bytes.len() as u64)?;
        if let Some((off, len)) = name {
            header.set_backing_name(&bytes[off as usize..(off + u64::from(len)) as usize])?;
        }
        Ok(header)
    }

    fn kind_of(bytes: &[u8]) -> ErrorKind {
        parse(bytes).unwrap_err().kind()
    }

    #[test]
    fn parses_backing_name_and_format() {
        let image = TestImage::new(1 << 20, Some(("base.qcow2", Some("qcow2"))));
        let h = parse(&image.bytes).unwrap();
        assert_eq!(
            (h.version, h.cluster_size(), h.size),
            (3, CLUSTER as u64, 1 << 20)
        );
        assert_eq!(h.backing_name.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn rebuild_changes_the_reference_and_keeps_unknown_extensions() {
        let mut image = TestImage::new(1 << 20, Some(("old", Some("raw"))));
        // Insert an unknown extension before the end marker: rebuild from a
        // header with [backing format][unknown][end].
        let unknown_at = 104 + 16;
        image
            .bytes
            .copy_within(unknown_at..unknown_at + 11, unknown_at + 16);
        image.bytes[unknown_at..unknown_at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        image.bytes[unknown_at + 4..unknown_at + 8].copy_from_slice(&3u32.to_be_bytes());
        image.bytes[unknown_at + 8..unknown_at + 16].copy_from_slice(b"abc\0\0\0\0\0");
        put_u64(
            &mut image.bytes,
            OFF_BACKING_OFFSET,
            (unknown_at + 16 + 8) as u64,
        );
        let h = parse(&image.bytes).unwrap();
        assert_eq!(h.backing_name.as_deref(), Some("old"));

        let area = image.bytes[..CLUSTER].to_vec();
        let mut out = vec![0xee; CLUSTER];
        let used = used_bytes(&h, Some(((unknown_at + 24) as u64, 3)));
        let new = Some(("dir/new.qcow2", Some("qcow2")));
        let len = rebuild_with_backing(&h, &area, &mut out, used, new).unwrap();
        assert!(len >= used);
        let mut rebuilt = image.bytes.clone();
        rebuilt[..CLUSTER].copy_from_slice(&out);
        let h2 = parse(&rebuilt).unwrap();
        assert_eq!(h2.backing_name.as_deref(), Some("dir/new.qcow2"));
        assert_eq!(h2.backing_format.as_deref(), Some("qcow2"));
        let mut seen = false;
        walk_extensions(&rebuilt[..CLUSTER], 104, |ext| {
            if ext.kind == 0x1234_5678 {
                seen = &rebuilt[ext.data.0..ext.data.0 + ext.data.1] == b"abc";
            }
            Ok(())
        })
        .unwrap();
        assert!(seen, "unknown extension preserved");

        let area = rebuilt[..CLUSTER].to_vec();
        let len = rebuild_with_backing(&h2, &area, &mut out, len, None).unwrap();
        rebuilt[..len].copy_from_slice(&out[..len]);
        let h3 = parse(&rebuilt).unwrap();
        assert_eq!((h3.backing_name, h3.backing_format), (None, None));
    }

    #[test]
    fn names_too_long_or_not_fitting_are_refused_untouched() {
        let image = TestImage::new(1 << 20, Some(("b", Some("qcow2"))));
        let h = parse(&image.bytes).unwrap();
        let area = image.bytes[..CLUSTER].to_vec();
        let mut out = vec![0; CLUSTER];
        let long = "x".repeat(1024);
        let err = rebuild_with_backing(&h, &area, &mut out, CLUSTER, Some((&long, Some("qcow2"))))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let big = "y".repeat(500); // fits 1023 but not a 512-byte cluster 0
        let err = rebuild_with_backing(&h, &area, &mut out, CLUSTER, Some((&big, Some("qcow2"))))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn hostile_fields_are_refused() {
        let good = TestImage::new(1 << 20, Some(("b", Some("qcow2")))).bytes;
        let with = |off: usize, value: &[u8]| {
            let mut bytes = good.clone();
            bytes[off..off + value.len()].copy_from_slice(value);
            bytes
        };
        assert_eq!(kind_of(&with(0, b"QFI\0")), ErrorKind::Corrupt);
        assert_eq!(
            kind_of(&with(OFF_VERSION, &4u32.to_be_bytes())),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind_of(&with(OFF_CLUSTER_BITS, &8u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_CLUSTER_BITS, &22u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_INCOMPATIBLE, &(1u64 << 9).to_be_bytes())),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind_of(&with(OFF_INCOMPATIBLE, &4u64.to_be_bytes())),
            ErrorKind::Unsupported
        );
        // Extended L2 entries need clusters of at least 16 KiB (these are
        // 512 bytes).
        assert_eq!(
            kind_of(&with(OFF_INCOMPATIBLE, &16u64.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_CRYPT, &2u32.to_be_bytes())),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind_of(&with(OFF_REFCOUNT_ORDER, &7u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_HEADER_LENGTH, &100u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_L1_SIZE, &0u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_L1_OFFSET, &7u64.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_L1_OFFSET, &(1u64 << 40).to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_BACKING_OFFSET, &512u64.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_BACKING_SIZE, &2000u32.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind_of(&with(OFF_SIZE, &u64::MAX.to_be_bytes())),
            ErrorKind::Corrupt
        );
        assert_eq!(kind_of(&good[..50]), ErrorKind::Corrupt);
        let err = parse(&with(OFF_CRYPT, &1u32.to_be_bytes())).unwrap_err();
        assert!(err.message().contains("unsupported"));
    }

    #[test]
    fn qemu_limits_are_enforced() {
        let good = TestImage::new(1 << 20, None).bytes;
        let with = |patches: &[(usize, &[u8])]| {
            let mut bytes = good.clone();
            for &(off, value) in patches {
                bytes[off..off + value.len()].copy_from_slice(value);
            }
            parse(&bytes).unwrap_err()
        };
        // 8 MiB of 512-byte clusters, plus one.
        let clusters = (MAX_REFCOUNT_TABLE_BYTES / CLUSTER as u64 + 1) as u32;
        let err = with(&[(OFF_REFCOUNT_CLUSTERS, &clusters.to_be_bytes())]);
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.message().contains("refcount table too large"));
        let err = with(&[(OFF_NB_SNAPSHOTS, &u32::MAX.to_be_bytes())]);
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.message().contains("too many snapshots"));
        let l1 = (MAX_L1_ENTRIES + 1) as u32;
        let err = with(&[(OFF_L1_SIZE, &l1.to_be_bytes())]);
        assert!(err.message().contains("L1 table too large"));
        // The compression type byte is read once the header covers it.
        let long = 112u32.to_be_bytes();
        let bit = 8u64.to_be_bytes();
        for (patches, kind) in [
            (
                &[(OFF_COMPRESSION_TYPE, &[1u8][..])][..],
                ErrorKind::Corrupt,
            ),
            (&[(OFF_INCOMPATIBLE, &bit[..])][..], ErrorKind::Corrupt),
            (
                &[(OFF_INCOMPATIBLE, &bit[..]), (OFF_COMPRESSION_TYPE, &[2])][..],
                ErrorKind::Unsupported,
            ),
        ] {
            let mut all = vec![(OFF_HEADER_LENGTH, &long[..])];
            all.extend_from_slice(patches);
            assert_eq!(with(&all).kind(), kind, "{patches:?}");
        }
        // zstd: type 1 with its incompatible bit.
        let mut zstd = good.clone();
        zstd[OFF_HEADER_LENGTH..OFF_HEADER_LENGTH + 4].copy_from_slice(&long);
        zstd[OFF_INCOMPATIBLE..OFF_INCOMPATIBLE + 8].copy_from_slice(&bit);
        zstd[OFF_COMPRESSION_TYPE] = 1;
        assert_eq!(parse(&zstd).unwrap().compression, Compression::Zstd);
        // With a 104-byte header the byte is not part of it: zlib.
        let mut short = good.clone();
        short[OFF_COMPRESSION_TYPE] = 1;
        parse(&short).unwrap();
    }
}
