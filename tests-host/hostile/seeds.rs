//! Seeds: images qemu-img makes, and their layout read by a small parser of this test's own.

use super::*;

/// What a seed's metadata looks like, read by this test's own small parser.
#[derive(Clone, Debug, Default)]
pub(crate) struct Layout {
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    pub(crate) size: u64,
    pub(crate) header_length: usize,
    pub(crate) l1_offset: u64,
    pub(crate) l1_size: u64,
    pub(crate) refcount_offset: u64,
    pub(crate) refcount_clusters: u64,
    /// The first refcount block.
    pub(crate) refcount_block: Option<u64>,
    pub(crate) backing: Option<(usize, usize)>,
    /// Header extensions: position of the 8-byte extension header, type, length.
    pub(crate) extensions: Vec<(usize, u32, usize)>,
    /// Position of the end marker, when there is one.
    pub(crate) end_marker: Option<usize>,
    /// L1 entries: position in the file, value.
    pub(crate) l1: Vec<(usize, u64)>,
    /// Bytes of one L2 entry: 8, or 16 with extended L2 entries (the entry,
    /// then its subcluster bitmap).
    pub(crate) entry_bytes: u64,
    /// The image keeps its data in an external data file.
    pub(crate) external: bool,
    /// L2 entries inside the virtual size.
    pub(crate) l2: Vec<L2Entry>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct L2Entry {
    /// Position of the entry in the file.
    pub(crate) pos: usize,
    pub(crate) value: u64,
    /// The subcluster bitmap of an extended entry (at `pos + 8`), else 0.
    pub(crate) bitmap: u64,
    /// Guest offset of its cluster.
    pub(crate) guest: u64,
    /// Offset of the L2 table holding it.
    pub(crate) table: u64,
    pub(crate) kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Unallocated,
    Zero,
    Data(u64),
    Compressed { host: u64, len: u64 },
}

pub(crate) fn be(bytes: &[u8], pos: usize, width: usize) -> u64 {
    let mut word = [0u8; 8];
    word[8 - width..].copy_from_slice(&bytes[pos..pos + width]);
    u64::from_be_bytes(word)
}

/// The first offset where `a` and `b` differ (within the shorter one).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let block = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x[..x.len().min(y.len())] != y[..x.len().min(y.len())])?;
    let (x, y) = (&a[block * 4096..], &b[block * 4096..]);
    x.iter()
        .zip(y)
        .position(|(p, q)| p != q)
        .map(|i| block * 4096 + i)
}

pub(crate) fn put_be(bytes: &mut [u8], pos: usize, width: usize, value: u64) {
    for i in 0..width {
        bytes[pos + i] = (value >> (8 * (width - 1 - i))) as u8;
    }
}

pub(crate) fn be_bytes(width: usize, value: u64) -> Vec<u8> {
    let mut out = vec![0u8; width];
    put_be(&mut out, 0, width, value);
    out
}

/// Bits of the host offset in a compressed L2 entry.
pub(crate) fn compressed_offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

pub(crate) fn layout(bytes: &[u8]) -> Layout {
    let version = be(bytes, 4, 4);
    let cluster_bits = be(bytes, 20, 4) as u32;
    let cs = 1u64 << cluster_bits;
    let mut l = Layout {
        cluster_bits,
        cluster_size: cs,
        size: be(bytes, 24, 8),
        header_length: if version == 2 {
            72
        } else {
            be(bytes, 100, 4) as usize
        },
        l1_offset: be(bytes, 40, 8),
        l1_size: be(bytes, 36, 4),
        refcount_offset: be(bytes, 48, 8),
        refcount_clusters: be(bytes, 56, 4),
        ..Layout::default()
    };
    let block = be(bytes, l.refcount_offset as usize, 8) & !0x1ff;
    if block != 0 && block + cs <= bytes.len() as u64 {
        l.refcount_block = Some(block);
    }
    let backing_offset = be(bytes, 8, 8) as usize;
    if backing_offset != 0 {
        l.backing = Some((backing_offset, be(bytes, 16, 4) as usize));
    }
    let limit = l.backing.map_or(cs.min(4096) as usize, |b| b.0);
    let mut pos = l.header_length;
    while pos + 8 <= limit {
        let (kind, len) = (be(bytes, pos, 4) as u32, be(bytes, pos + 4, 4) as usize);
        if kind == 0 {
            l.end_marker = Some(pos);
            break;
        }
        l.extensions.push((pos, kind, len));
        pos += 8 + len.div_ceil(8) * 8;
    }
    let extended = version >= 3 && be(bytes, 72, 8) & 16 != 0;
    l.external = version >= 3 && be(bytes, 72, 8) & 4 != 0;
    l.entry_bytes = if extended { 16 } else { 8 };
    let l2_entries = cs / l.entry_bytes;
    for i in 0..l.l1_size {
        let pos = (l.l1_offset + 8 * i) as usize;
        let entry = be(bytes, pos, 8);
        l.l1.push((pos, entry));
        let table = entry & OFFSET_MASK;
        if table == 0 {
            continue;
        }
        for j in 0..l2_entries {
            let guest = (i * l2_entries + j) * cs;
            if guest >= l.size {
                break;
            }
            let pos = (table + l.entry_bytes * j) as usize;
            let value = be(bytes, pos, 8);
            let bitmap = if extended { be(bytes, pos + 8, 8) } else { 0 };
            let kind = if value & COMPRESSED != 0 {
                let bits = compressed_offset_bits(cluster_bits);
                let host = value & ((1 << bits) - 1);
                let sectors = ((value & !(COPIED | COMPRESSED)) >> bits) + 1;
                Kind::Compressed {
                    host,
                    len: sectors * 512 - (host & 511),
                }
            } else if value & OFFSET_MASK != 0 {
                Kind::Data(value & OFFSET_MASK)
            } else if (!extended && value & ZERO != 0) || bitmap >> 32 != 0 {
                Kind::Zero
            } else {
                Kind::Unallocated
            };
            l.l2.push(L2Entry {
                pos,
                value,
                bitmap,
                guest,
                table,
                kind,
            });
        }
    }
    l
}

/// A seed image: its bytes, its guest view as `qemu-img convert` sees it, its
/// layout and its backing image, if any.
pub(crate) struct Seed {
    pub(crate) name: &'static str,
    pub(crate) bytes: Vec<u8>,
    pub(crate) raw: Vec<u8>,
    pub(crate) layout: Layout,
    pub(crate) backing: Option<(&'static str, Vec<u8>)>,
}

impl Seed {
    /// The images a case over `top` (this seed, mutated) needs.
    pub(crate) fn images<'d>(&'d self, top: &'d [u8]) -> Vec<Img<'d>> {
        let mut images = vec![Img {
            name: self.name.to_owned(),
            bytes: top,
            id: Some(1),
        }];
        if let Some((name, bytes)) = &self.backing {
            images.push(Img {
                name: (*name).to_owned(),
                bytes,
                id: Some(2),
            });
        }
        images
    }

    pub(crate) fn case<'d>(
        &'d self,
        label: String,
        top: &'d [u8],
        options: OpenOptions,
    ) -> Case<'d> {
        let images = self.images(top);
        Case {
            label,
            opens: images.len() + 1,
            images,
            top: self.name.to_owned(),
            options,
            reads: Reads::Whole,
            expect: None,
            writes: false,
            collapse: false,
        }
    }

    pub(crate) fn entries(&self, pick: impl Fn(&Kind) -> bool) -> impl Iterator<Item = &L2Entry> {
        self.layout.l2.iter().filter(move |e| pick(&e.kind))
    }
}

pub(crate) struct Seeds {
    pub(crate) all: Vec<Seed>,
    /// The base of the `overlay` seed and its name.
    pub(crate) base: (&'static str, Vec<u8>),
}

impl Seeds {
    pub(crate) fn get(&self, name: &str) -> &Seed {
        self.all
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
    }
}

/// Guest data for the compressed seeds, `clusters` clusters of `cs` bytes:
/// text, zeros, incompressible noise, low-entropy noise, half text, a fill.
pub(crate) fn compressible_data(clusters: usize, cs: usize) -> Vec<u8> {
    let mut rng = Rng(0x5eed_0000_0000_0001);
    let mut data = Vec::with_capacity(clusters * cs);
    for c in 0..clusters {
        let start = data.len();
        match c % 6 {
            0 => {
                while data.len() < start + cs {
                    data.extend_from_slice(format!("hostile line {c} {}\n", data.len()).as_bytes());
                }
                data.truncate(start + cs);
            }
            1 => data.resize(start + cs, 0),
            2 => data.extend((0..cs).map(|_| rng.next() as u8)),
            3 => data.extend((0..cs).map(|_| b'a' + (rng.next() % 4) as u8)),
            4 => {
                data.extend((0..cs / 2).map(|i| b"qcow2 "[i % 6]));
                data.resize(start + cs, 0);
            }
            _ => data.resize(start + cs, 0xab),
        }
    }
    data
}

/// `qemu-img create -q -f qcow2 -o OPTIONS NAME SIZE` in `dir`.
fn create(dir: &std::path::Path, options: &str, name: &str, size: &str) {
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", options, name, size],
    );
}

pub(crate) fn make_seeds() -> Seeds {
    let tmp = tmpdir("bg-hostile-");
    let d = tmp.path();
    let k = |n: u64| (n * 1024).to_string();

    // (a) v3, 64 KiB clusters: data at several offsets (one write crossing a
    // cluster boundary), a zero cluster keeping its allocation, zero clusters
    // without one, data in the last sector.
    create(d, "cluster_size=65536", "v3-64k.qcow2", "4M");
    qemu_io(
        d,
        "qcow2",
        "v3-64k.qcow2",
        &[
            format!("write -P 0x11 0 {}", k(64)),
            format!("write -P 0x22 {} {}", k(1024), k(4)),
            format!("write -P 0x33 {} {}", k(3 * 1024 + 40), k(64)),
            format!("write -P 0x12 {} {}", k(2048), k(128)),
            format!("write -z {} {}", k(2048), k(64)),
            format!("write -z -u {} {}", k(2112), k(64)),
            format!("write -z {} {}", k(2496), k(64)),
            format!("write -P 0x44 {} 512", 4 * 1024 * 1024 - 512),
        ],
    );

    // (b) v2 (compat=0.10), 512-byte clusters: many L2 tables.
    create(d, "compat=0.10,cluster_size=512", "v2-512.qcow2", "1M");
    qemu_io(
        d,
        "qcow2",
        "v2-512.qcow2",
        &[
            "write -P 0x55 0 1536".to_owned(),
            "write -P 0x56 40000 5000".to_owned(),
            "write -P 0x66 102400 700".to_owned(),
            format!("write -P 0x77 {} 1024", 1024 * 1024 - 1024),
        ],
    );

    // (c) compressed, 64 KiB and 512-byte clusters.
    fs::write(d.join("comp-64k.raw"), compressible_data(16, 65536)).expect("write raw data");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "comp-64k.raw",
            "comp-64k.qcow2",
        ],
    );
    fs::write(d.join("comp-512.raw"), compressible_data(128, 512)).expect("write raw data");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "comp-512.raw",
            "comp-512.qcow2",
        ],
    );

    // (d) overlays: over a qcow2 base and over a raw base.
    create(d, "cluster_size=65536", "base.qcow2", "2M");
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &[
            format!("write -P 0xa1 0 {}", k(128)),
            format!("write -P 0xa2 {} {}", k(1024), k(64)),
            format!("write -P 0xa3 {} {}", k(1984), k(64)),
        ],
    );
    // (e) with extended L2 entries over the same base: subclusters
    // allocated, zero and unallocated side by side in one cluster.
    for (name, backing, format, options) in [
        ("overlay.qcow2", "base.qcow2", "qcow2", "cluster_size=65536"),
        ("overlay-raw.qcow2", "base.raw", "raw", "cluster_size=65536"),
        (
            "ext-overlay.qcow2",
            "base.qcow2",
            "qcow2",
            "cluster_size=65536,extended_l2=on",
        ),
    ] {
        if format == "raw" {
            qemu_img(d, &["convert", "-O", "raw", "base.qcow2", "base.raw"]);
        }
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-o", options, "-b", backing, "-F", format, name,
            ],
        );
        qemu_io(
            d,
            "qcow2",
            name,
            &[
                format!("write -P 0xb1 {} 4096", k(64)),
                format!("write -z {} {}", k(1024), k(64)),
                format!("write -P 0xb2 {} {}", k(1536), k(64)),
            ],
        );
    }
    qemu_io(
        d,
        "qcow2",
        "ext-overlay.qcow2",
        &[
            format!("write -P 0xc1 {} 2048", k(4)),
            format!("write -z {} {}", k(8), k(4)),
            format!("write -z {} {}", k(256), k(2)),
            "write -P 0xc3 1025k 3000".to_owned(),
        ],
    );

    // (f) an external data file (offered to the cases as the seed's
    // second image, the way a backing file is).
    create(
        d,
        "cluster_size=4096,data_file=data.raw",
        "data-4k.qcow2",
        "1M",
    );
    qemu_io(
        d,
        "qcow2",
        "data-4k.qcow2",
        &[
            "write -P 0xd1 0 10k".to_owned(),
            "write -z 64k 8k".to_owned(),
            "write -P 0xd2 500k 3000".to_owned(),
        ],
    );

    let read = |name: &str| fs::read(d.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
    let mut all = Vec::new();
    for (name, backing) in [
        ("v3-64k.qcow2", None),
        ("v2-512.qcow2", None),
        ("comp-64k.qcow2", None),
        ("comp-512.qcow2", None),
        ("overlay.qcow2", Some("base.qcow2")),
        ("overlay-raw.qcow2", Some("base.raw")),
        ("ext-overlay.qcow2", Some("base.qcow2")),
        ("data-4k.qcow2", Some("data.raw")),
    ] {
        let raw_name = format!("{name}.view");
        qemu_img(d, &["convert", "-O", "raw", name, &raw_name]);
        let bytes = read(name);
        all.push(Seed {
            name,
            layout: layout(&bytes),
            raw: read(&raw_name),
            bytes,
            backing: backing.map(|b| (b, read(b))),
        });
    }
    let seeds = Seeds {
        base: ("base.qcow2", read("base.qcow2")),
        all,
    };
    // The seeds must contain what the mutations aim at.
    let has = |seed: &str, pick: fn(&Kind) -> bool| seeds.get(seed).entries(pick).count() > 0;
    assert!(has("v3-64k.qcow2", |k| matches!(k, Kind::Data(_))));
    assert!(has("v3-64k.qcow2", |k| *k == Kind::Zero));
    assert!(has("comp-64k.qcow2", |k| matches!(
        k,
        Kind::Compressed { .. }
    )));
    assert!(has("comp-512.qcow2", |k| matches!(
        k,
        Kind::Compressed { .. }
    )));
    assert!(seeds.get("overlay.qcow2").layout.backing.is_some());
    let ext = seeds.get("ext-overlay.qcow2");
    assert_eq!(ext.layout.entry_bytes, 16);
    assert!(ext
        .layout
        .l2
        .iter()
        .any(|e| e.bitmap as u32 != 0 && e.bitmap >> 32 != 0));
    seeds
}

pub(crate) fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(make_seeds)
}
