//! `header`: `Header::parse` on arbitrary bytes, and for every header that
//! parses, the backing-reference rebuild (what `collapse` writes), checked
//! by parsing its result again.
//!
//! The input is the start of an image file. It is parsed twice, as the
//! whole file (tables must lie inside it) and as the start of a 1 TiB file
//! whose other bytes are zero. Both go the way `Qcow2::open` and
//! `Qcow2::write_backing` go: the header area is the first
//! `min(file size, 4 KiB)` bytes, the backing name is read from the file.

use blockgraph::format::qcow2::header::{rebuild_with_backing, used_bytes, HEADER_AREA};
use blockgraph::format::qcow2::Header;

/// The backing name every rebuild writes.
const NEW_NAME: &str = "fuzz/new-backing.qcow2";
const NEW_FORMAT: &str = "qcow2";

/// Size of the large file the input may be the start of.
const LARGE_FILE: u64 = 1 << 40;

pub fn run(data: &[u8]) {
    check(data, data.len() as u64);
    check(data, LARGE_FILE);
}

/// An image file: `prefix` followed by zeros up to `size` bytes.
struct File<'d> {
    prefix: &'d [u8],
    size: u64,
}

impl File<'_> {
    /// Bytes `offset..offset + len` when they lie inside the file.
    fn read(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&end| end <= self.size)?;
        let mut out = vec![0u8; len as usize];
        let present = (self.prefix.len() as u64).min(end);
        if present > offset {
            out[..(present - offset) as usize]
                .copy_from_slice(&self.prefix[offset as usize..present as usize]);
        }
        Some(out)
    }

    /// The header area as `Qcow2::open` reads it, and how much of it counts.
    fn area(&self) -> ([u8; HEADER_AREA], usize) {
        let used = self.size.min(HEADER_AREA as u64) as usize;
        let mut area = [0u8; HEADER_AREA];
        let n = self.prefix.len().min(used);
        area[..n].copy_from_slice(&self.prefix[..n]);
        (area, used)
    }
}

/// Parses like `Qcow2::open`: the header, then its backing name.
fn parse(file: &File<'_>) -> Option<(Header, Option<(u64, u32)>)> {
    let (area, used) = file.area();
    let (mut header, range) = Header::parse(&area[..used], file.size).ok()?;
    if let Some((offset, len)) = range {
        let name = file.read(offset, u64::from(len))?;
        header.set_backing_name(&name).ok()?;
    }
    Some((header, range))
}

fn check(data: &[u8], size: u64) {
    let file = File { prefix: data, size };
    let Some((header, range)) = parse(&file) else {
        return;
    };
    assert!(
        (9..=21).contains(&header.cluster_bits) && header.refcount_order <= 6,
        "a parsed header holds a field out of range: {header:?}"
    );
    for backing in [Some((NEW_NAME, Some(NEW_FORMAT))), None] {
        // As write_backing: the area as read, the bytes in use.
        let (area, _) = file.area();
        let mut out = [0u8; HEADER_AREA];
        let used = used_bytes(&header, range);
        let Ok(len) = rebuild_with_backing(&header, &area, &mut out, used, backing) else {
            continue; // it does not fit: nothing was written
        };
        assert!(
            len <= HEADER_AREA && len as u64 <= header.cluster_size(),
            "the rebuild writes {len} bytes, past cluster 0 or the header area"
        );
        // The file with the rewritten start.
        let mut bytes = data.to_vec();
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        bytes[..len].copy_from_slice(&out[..len]);
        let rewritten = File {
            prefix: &bytes,
            size: size.max(len as u64),
        };
        let Some((after, _)) = parse(&rewritten) else {
            let (area, used) = rewritten.area();
            let error = Header::parse(&area[..used], rewritten.size).err();
            panic!(
                "the rebuilt header (backing {backing:?}) does not parse ({error:?}); \
                 before: {header:?}"
            );
        };
        let expected = backing.map(|(name, format)| (name, format.unwrap_or("")));
        let found = after
            .backing_name
            .as_deref()
            .map(|name| (name, after.backing_format.as_deref().unwrap_or("")));
        assert_eq!(
            found, expected,
            "the rebuilt header names another backing file"
        );
        if backing.is_none() {
            assert_eq!(
                after.backing_format, None,
                "a backing format without a file"
            );
        }
        let fields = |h: &Header| {
            (
                h.version,
                h.cluster_bits,
                h.size,
                h.l1_size,
                h.l1_table_offset,
                h.refcount_table_offset,
                h.refcount_table_clusters,
                h.nb_snapshots,
                h.snapshots_offset,
                h.incompatible,
                (h.compatible, h.autoclear, h.refcount_order, h.header_length),
            )
        };
        assert_eq!(
            fields(&after),
            fields(&header),
            "the rebuild changed a header field besides the backing reference"
        );
    }
}
