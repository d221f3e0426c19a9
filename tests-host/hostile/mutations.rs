//! Mutations: the hostile edits applied to the seeds.

use super::*;

/// Bytes to write at positions inside a file.
pub(crate) type Patches = Vec<(usize, Vec<u8>)>;

/// A change to a seed's bytes.
pub(crate) enum Change {
    /// Overwrite bytes at these positions (inside the file).
    Patch(Patches),
    /// Keep only the first bytes.
    Truncate(usize),
}

pub(crate) struct Mutant {
    pub(crate) label: String,
    pub(crate) change: Change,
}

impl Mutant {
    pub(crate) fn patch(label: String, pos: usize, data: Vec<u8>) -> Self {
        Self {
            label,
            change: Change::Patch(vec![(pos, data)]),
        }
    }

    pub(crate) fn word(label: String, pos: usize, value: u64) -> Self {
        Self::patch(label, pos, value.to_be_bytes().to_vec())
    }
}

/// Applies each mutant to `seed` in turn and runs it with each of `options`.
pub(crate) fn run_mutants(
    findings: &mut Findings,
    watchdog: &Watchdog,
    seed: &Seed,
    mutants: &[Mutant],
    options: &[OpenOptions],
) {
    let mut work = seed.bytes.clone();
    for m in mutants {
        let bytes: &[u8] = match &m.change {
            Change::Patch(patches) => {
                for (pos, data) in patches {
                    work[*pos..*pos + data.len()].copy_from_slice(data);
                }
                &work
            }
            Change::Truncate(len) => &seed.bytes[..*len],
        };
        for (i, &opts) in options.iter().enumerate() {
            let label = format!("{}: {}{}", seed.name, m.label, mode_label(i));
            findings.run::<64>(watchdog, &seed.case(label, bytes, opts));
        }
        if let Change::Patch(patches) = &m.change {
            for (pos, data) in patches {
                work[*pos..*pos + data.len()].copy_from_slice(&seed.bytes[*pos..*pos + data.len()]);
            }
        }
    }
}

pub(crate) fn mode_label(i: usize) -> &'static str {
    match i {
        0 => "",
        _ => " [opened read-write, raw backing assumed]",
    }
}

pub(crate) const READ_ONLY: OpenOptions = OpenOptions {
    format: None,
    read_only: true,
    writable_devices: false,
    assume_raw_backing: false,
    force_share: false,
    no_backing: false,
    check_tables: false,
};

pub(crate) const READ_WRITE: OpenOptions = OpenOptions {
    format: None,
    read_only: false,
    writable_devices: true,
    assume_raw_backing: true,
    force_share: false,
    no_backing: false,
    check_tables: false,
};

/// Header fields: name, offset, width in bytes.
pub(crate) const FIELDS: &[(&str, usize, usize)] = &[
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
];

/// Every header field set to boundary values; feature fields get every bit.
pub(crate) fn header_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let mut out = Vec::new();
    for &(name, pos, width) in FIELDS {
        let orig = be(&seed.bytes, pos, width);
        let mut values: Vec<u64> = match width {
            1 => vec![0, 1, 2, 0x7f, 0x80, 0xff],
            4 => vec![
                0,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                12,
                16,
                20,
                21,
                22,
                31,
                32,
                63,
                64,
                65,
                72,
                100,
                103,
                104,
                105,
                111,
                112,
                120,
                511,
                512,
                513,
                1023,
                1024,
                4095,
                4096,
                4097,
                cs - 1,
                cs,
                cs + 1,
                len,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_fffe,
                0xffff_ffff,
            ],
            _ => vec![
                0,
                1,
                7,
                8,
                72,
                104,
                511,
                512,
                513,
                cs - 1,
                cs,
                cs + 1,
                2 * cs,
                len - 8,
                len - 1,
                len,
                eof,
                eof + cs,
                1 << 32,
                1 << 40,
                1 << 55,
                (1 << 56) - cs,
                1 << 56,
                1 << 61,
                (1 << 61) + 1,
                1 << 62,
                1 << 63,
                i64::MAX as u64,
                u64::MAX - cs + 1,
                u64::MAX,
            ],
        };
        values.extend([
            orig.wrapping_add(1),
            orig.wrapping_sub(1),
            orig.wrapping_add(cs),
            orig.wrapping_mul(2),
            orig.wrapping_add(512),
        ]);
        if name.ends_with("_features") {
            for bit in 0..64 {
                values.extend([1 << bit, orig | (1 << bit)]);
            }
        }
        let mask = if width == 8 {
            u64::MAX
        } else {
            (1 << (8 * width)) - 1
        };
        let mut seen = Vec::new();
        for v in values.into_iter().map(|v| v & mask) {
            if v == orig || seen.contains(&v) {
                continue;
            }
            seen.push(v);
            out.push(Mutant::patch(
                format!("header {name} = {v:#x} (was {orig:#x})"),
                pos,
                be_bytes(width, v),
            ));
        }
    }
    // Combinations that pass the single-field checks.
    let l2_bytes = (cs / 8) * cs;
    let field = |pos: usize, width: usize, v: u64| (pos, be_bytes(width, v));
    let mut combos: Vec<(String, Patches)> = vec![
        (
            "size = what the L1 table covers".into(),
            vec![field(24, 8, l.l1_size * l2_bytes)],
        ),
        (
            "size = 2^61 with l1_size too small".into(),
            vec![field(24, 8, 1 << 61)],
        ),
        (
            "zstd compression (incompatible bit 3, type 1)".into(),
            vec![field(72, 8, 1 << 3), field(104, 1, 1)],
        ),
        (
            "incompatible bit 3 with type zlib and header_length 104".into(),
            vec![field(72, 8, 1 << 3), field(100, 4, 104)],
        ),
        ("dirty and corrupt bits".into(), vec![field(72, 8, 3)]),
        (
            "l1_table_offset = refcount table, l1_size = its entries".into(),
            vec![
                field(40, 8, l.refcount_offset),
                field(36, 4, (cs / 8).min(l.l1_size.max(1))),
            ],
        ),
        (
            "L1 table ends exactly at EOF".into(),
            vec![field(40, 8, (len / cs - 1) * cs), field(36, 4, cs / 8)],
        ),
        (
            "L1 table one entry past EOF".into(),
            vec![field(40, 8, (len / cs - 1) * cs), field(36, 4, cs / 8 + 1)],
        ),
        (
            "cluster_bits 9 with the 64 KiB layout".into(),
            vec![field(20, 4, 9)],
        ),
        (
            "cluster_bits 21 with the original layout".into(),
            vec![field(20, 4, 21)],
        ),
    ];
    // The backing name: every range that passes the bounds checks but holds
    // the wrong bytes, and names that are not UTF-8.
    let hl = l.header_length as u64;
    for (off, size) in [
        (hl, 8),
        (hl, 1023),
        (72, 1),
        (cs - 1, 1),
        (cs.saturating_sub(1023), 1023),
        (l.header_length.div_ceil(8) as u64 * 8, 16),
    ] {
        if off >= hl && off + size <= cs && off + size <= len {
            combos.push((
                format!("backing name at {off}, {size} bytes"),
                vec![field(8, 8, off), field(16, 4, size)],
            ));
        }
    }
    if let Some((off, size)) = l.backing {
        combos.push((
            "backing name not UTF-8".into(),
            vec![(off, vec![0xff; size])],
        ));
        combos.push((
            "backing name with NUL and slash".into(),
            vec![(off, b"/\0".repeat(size / 2 + 1)[..size].to_vec())],
        ));
        combos.push((
            "backing name = the image's own name".into(),
            vec![
                (off, seed.name.as_bytes().to_vec()),
                field(16, 4, seed.name.len() as u64),
            ],
        ));
    }
    out.extend(combos.into_iter().map(|(label, patches)| Mutant {
        label: format!("header {label}"),
        change: Change::Patch(patches),
    }));
    out
}

/// Header extensions with corrupted types and lengths, the end marker lost,
/// and extensions added where the end marker was.
pub(crate) fn extension_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let cs = l.cluster_size as usize;
    let limit = l.backing.map_or(cs.min(4096), |b| b.0);
    let mut out = Vec::new();
    let mut headers: Vec<(usize, u32, usize)> = l.extensions.clone();
    if let Some(end) = l.end_marker {
        headers.push((end, 0, 0));
    }
    for &(pos, kind, len) in &headers {
        for t in [
            0,
            1,
            EXT_BACKING_FORMAT,
            EXT_FEATURE_TABLE,
            0x2385_2875,
            0x4441_5441,
            0x0537_be77,
            u32::MAX,
        ] {
            if t != kind {
                out.push(Mutant::patch(
                    format!("extension at {pos}: type {kind:#x} -> {t:#x}"),
                    pos,
                    t.to_be_bytes().to_vec(),
                ));
            }
        }
        let room = |end: usize| end.saturating_sub(pos + 8) as u64;
        for v in [
            0,
            1,
            3,
            7,
            8,
            9,
            16,
            room(limit),
            room(limit) + 1,
            room(limit) + 8,
            room(cs),
            room(cs) + 1,
            room(4096),
            room(4096) + 1,
            room(4096 + 8),
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fff8,
            0xffff_ffff,
            len as u64 + 8,
            len as u64 * 2,
        ] {
            let v = v & 0xffff_ffff;
            if v != len as u64 {
                out.push(Mutant::patch(
                    format!("extension at {pos} (type {kind:#x}): length {len} -> {v:#x}"),
                    pos + 4,
                    be_bytes(4, v),
                ));
            }
        }
        if kind == EXT_BACKING_FORMAT {
            for (what, name) in [
                ("empty", &b""[..]),
                ("raw", b"raw"),
                ("vmdk", b"vmdk"),
                ("16 bytes", b"qcow2qcow2qcow2q"),
                ("17 bytes", b"qcow2qcow2qcow2qc"),
                ("not UTF-8", b"\xff\xfeq"),
            ] {
                if 8 + name.len().div_ceil(8) * 8 <= limit - pos {
                    let mut data = EXT_BACKING_FORMAT.to_be_bytes().to_vec();
                    data.extend(be_bytes(4, name.len() as u64));
                    data.extend_from_slice(name);
                    data.resize(8 + name.len().div_ceil(8) * 8, 0);
                    out.push(Mutant::patch(
                        format!("backing format extension: {what}"),
                        pos,
                        data,
                    ));
                }
            }
        }
    }
    // Extensions written where the end marker was, up to the limit.
    if let Some(end) = l.end_marker {
        let fill = |unit: &[u8], label: &str, out: &mut Vec<Mutant>| {
            let mut data = Vec::new();
            while end + data.len() + unit.len() <= limit {
                data.extend_from_slice(unit);
            }
            out.push(Mutant::patch(
                format!("extensions from {end} to {limit}: {label}"),
                end,
                data,
            ));
        };
        fill(
            &[0, 0, 0, 1, 0, 0, 0, 0],
            "empty unknown extensions, no end",
            &mut out,
        );
        fill(
            &[
                0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3, b'r', b'a', b'w', 0, 0, 0, 0, 0,
            ],
            "repeated backing format extensions",
            &mut out,
        );
        fill(&[0xff; 8], "0xff bytes", &mut out);
    }
    out
}

/// L1 and L2 entries overwritten with hostile values.
pub(crate) fn table_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let last_cluster = (len - 1) / cs * cs;
    let data_hosts: Vec<u64> = seed
        .entries(|k| matches!(k, Kind::Data(_)))
        .filter_map(|e| match e.kind {
            Kind::Data(h) => Some(h),
            _ => None,
        })
        .collect();
    let comp: Vec<(u64, u64)> = seed
        .layout
        .l2
        .iter()
        .filter_map(|e| match e.kind {
            Kind::Compressed { host, len } => Some((host, len)),
            _ => None,
        })
        .collect();
    let some_data = data_hosts.first().copied().unwrap_or(l.l1_offset);
    let some_table = l.l2.first().map_or(l.l1_offset, |e| e.table);
    let mut out = Vec::new();

    // L1: the first allocated entry, the last entry, an unallocated one.
    let mut l1_targets: Vec<(usize, u64)> = Vec::new();
    l1_targets.extend(l.l1.iter().find(|e| e.1 != 0));
    l1_targets.extend(l.l1.last());
    l1_targets.extend(l.l1.iter().find(|e| e.1 == 0));
    l1_targets.dedup();
    for (pos, orig) in l1_targets {
        let values = [
            orig ^ COPIED,
            COPIED,
            eof,
            eof | COPIED,
            (eof + cs) | COPIED,
            eof + (1 << 40),
            OFFSET_MASK & !(cs - 1),
            OFFSET_MASK,
            u64::MAX,
            orig + 512,
            orig + cs / 2,
            orig + 8,
            orig | 1,
            orig | 0x100,
            orig | (1 << 56),
            orig | (1 << 62),
            l.l1_offset | COPIED,
            l.refcount_offset | COPIED,
            cs | COPIED,
            some_data | COPIED,
            last_cluster | COPIED,
            some_table | COPIED,
            comp.first().map_or(cs, |c| c.0 / cs * cs) | COPIED,
        ];
        for v in values {
            if v != orig {
                out.push(Mutant::word(
                    format!("L1 entry at {pos}: {orig:#x} -> {v:#x}"),
                    pos,
                    v,
                ));
            }
        }
    }

    // L2: first and last data, zero, compressed, an unallocated entry, the
    // last entry inside the virtual size.
    let mut targets: Vec<L2Entry> = Vec::new();
    let kinds: [fn(&Kind) -> bool; 4] = [
        |k| matches!(k, Kind::Data(_)),
        |k| *k == Kind::Zero,
        |k| matches!(k, Kind::Compressed { .. }),
        |k| *k == Kind::Unallocated,
    ];
    for pick in kinds {
        targets.extend(seed.entries(pick).next());
        targets.extend(seed.entries(pick).last());
    }
    targets.extend(l.l2.last());
    targets.sort_by_key(|e| e.pos);
    targets.dedup_by_key(|e| e.pos);

    let bits = compressed_offset_bits(l.cluster_bits);
    let max_sectors = (1u64 << (62 - bits)) - 1;
    let compressed = |host: u64, sectors: u64| {
        COMPRESSED | ((sectors & max_sectors) << bits) | (host & ((1 << bits) - 1))
    };
    let (comp_host, _) = comp.first().copied().unwrap_or((some_data, cs));
    for e in targets {
        let orig = e.value;
        let host = orig & OFFSET_MASK;
        let mut values = vec![
            eof | COPIED,
            (eof + cs) | COPIED,
            (OFFSET_MASK & !(cs - 1)) | COPIED,
            u64::MAX,
            COPIED,
            COPIED | ZERO,
            ZERO,
            ZERO | eof,
            ZERO | (some_data + 512),
            2,
            0x100 | some_data,
            some_data | 2,
            some_data | 0x1fe,
            some_data | (1 << 56),
            some_data | (0x3f << 56),
            some_data + 512,
            some_data + cs / 2,
            l.l1_offset | COPIED,
            e.table | COPIED,
            l.refcount_offset | COPIED,
            last_cluster | COPIED,
            orig ^ COPIED,
            orig | (1 << 56),
            // Compressed entries.
            compressed(comp_host, max_sectors),
            compressed(comp_host, 0),
            compressed(comp_host + 1, max_sectors),
            compressed(comp_host.saturating_sub(1), 1),
            compressed(comp_host + 4096, max_sectors),
            compressed(len, 0),
            compressed(len - 1, 0),
            compressed(len - 1, max_sectors),
            compressed(len - 8, max_sectors),
            compressed(0, 0),
            compressed(0, max_sectors),
            compressed(e.table, max_sectors),
            compressed(l.l1_offset, 0),
            compressed(some_data, max_sectors),
            compressed(u64::MAX, max_sectors),
            compressed(u64::MAX, 0),
            COMPRESSED,
            COMPRESSED | COPIED,
            COMPRESSED | COPIED | u64::from(u32::MAX),
        ];
        if host != 0 {
            values.extend([orig + 1, orig + 2, orig + 512, orig + cs / 2, orig - 512]);
        }
        if let Kind::Compressed { host, .. } = e.kind {
            values.extend([
                orig ^ (1 << bits),
                orig + 1,
                orig - 1,
                orig | COPIED,
                compressed(host, max_sectors),
                compressed(host, 0),
            ]);
            values.extend(
                comp.iter()
                    .map(|&(other, len)| compressed(other, len / 512)),
            );
        }
        let mut seen = Vec::new();
        for v in values {
            if v != orig && !seen.contains(&v) {
                seen.push(v);
                out.push(Mutant::word(
                    format!(
                        "L2 entry at {} (guest {}, {:?}): {orig:#x} -> {v:#x}",
                        e.pos, e.guest, e.kind
                    ),
                    e.pos,
                    v,
                ));
            }
        }
    }

    // Extended entries: subcluster bitmaps a hostile image got wrong (a
    // subcluster allocated and zero, allocated in no cluster), and every
    // other shape.
    if l.entry_bytes == 16 {
        let mut bitmaps: Vec<L2Entry> = Vec::new();
        bitmaps.extend(l.l2.iter().find(|e| e.value & OFFSET_MASK != 0));
        bitmaps.extend(l.l2.iter().find(|e| e.value == 0));
        bitmaps.extend(l.l2.iter().find(|e| e.value & COMPRESSED != 0));
        for e in bitmaps {
            for v in [
                1 | 1 << 32,
                u64::MAX,
                0xffff_ffff,
                0xffff_ffff_0000_0000,
                0x8000_0000,
                0x5555_5555_aaaa_aaaa,
                0x5555_5555_5555_5555,
                e.bitmap ^ 1,
                e.bitmap ^ (1 << 40),
                0,
            ] {
                if v != e.bitmap {
                    out.push(Mutant::word(
                        format!(
                            "L2 bitmap at {} (guest {}, {:?}): {:#x} -> {v:#x}",
                            e.pos + 8,
                            e.guest,
                            e.kind,
                            e.bitmap
                        ),
                        e.pos + 8,
                        v,
                    ));
                }
            }
        }
    }

    // A whole L2 table overwritten: every entry one hostile value (and,
    // extended, every subcluster allocated).
    if let Some(first) = l.l2.first() {
        let entries = l.l2.iter().filter(|e| e.table == first.table).count();
        let bitmap: &[u8] = match l.entry_bytes {
            16 => &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            _ => &[],
        };
        for (what, v) in [
            ("past EOF", eof | COPIED),
            ("compressed, max sectors, at 0", compressed(0, max_sectors)),
            ("all the same data cluster", some_data | COPIED),
            ("all ones", u64::MAX),
        ] {
            out.push(Mutant::patch(
                format!("whole L2 table at {}: {what}", first.table),
                first.table as usize,
                [&v.to_be_bytes()[..], bitmap].concat().repeat(entries),
            ));
        }
    }
    out
}

/// Compressed payloads: deterministic damage to each compressed cluster, and
/// a stored deflate block inflating to more than a cluster.
pub(crate) fn payload_mutants(seed: &Seed) -> Vec<Mutant> {
    let len = seed.bytes.len();
    let cs = seed.layout.cluster_size as usize;
    let bits = compressed_offset_bits(seed.layout.cluster_bits);
    let max_sectors = (1u64 << (62 - bits)) - 1;
    let mut out = Vec::new();
    let entries: Vec<L2Entry> = seed
        .entries(|k| matches!(k, Kind::Compressed { .. }))
        .copied()
        .collect();
    for e in &entries {
        let Kind::Compressed { host, len: clen } = e.kind else {
            continue;
        };
        let (h, n) = (host as usize, (clen as usize).min(len - host as usize));
        let at = |what: &str, pos: usize, data: Vec<u8>| {
            Mutant::patch(
                format!("compressed cluster at guest {}: {what}", e.guest),
                pos,
                data,
            )
        };
        out.extend([
            at("first byte 0x00", h, vec![0]),
            at("first byte 0x01 (final stored block)", h, vec![0x01]),
            at("first byte 0x03", h, vec![0x03]),
            at("first byte 0x07 (reserved block type)", h, vec![0x07]),
            at("first byte 0xff", h, vec![0xff]),
            at("first 16 bytes zero", h, vec![0; 16.min(n)]),
            at("payload all 0xff", h, vec![0xff; n]),
            at("payload all zero", h, vec![0; n]),
            at("last byte flipped", h + n - 1, vec![!seed.bytes[h + n - 1]]),
            at(
                "middle byte flipped",
                h + n / 2,
                vec![seed.bytes[h + n / 2] ^ 0x5a],
            ),
            at(
                "stored block LEN 0xffff",
                h,
                vec![0x01, 0xff, 0xff, 0x00, 0x00],
            ),
            at(
                "stored block LEN/NLEN mismatch",
                h,
                vec![0x01, 0x10, 0x00, 0x10, 0x00],
            ),
        ]);
    }
    // Stored deflate blocks of more than a cluster, with the sector count of
    // the entry raised to cover them: more output than a cluster.
    if let Some(e) = entries.first() {
        let Kind::Compressed { host, .. } = e.kind else {
            unreachable!()
        };
        let total = cs + 100;
        let mut stream = Vec::new();
        let mut left = total;
        while left > 0 {
            let n = left.min(0xffff);
            left -= n;
            stream.push(u8::from(left == 0));
            stream.extend((n as u16).to_le_bytes());
            stream.extend((!(n as u16)).to_le_bytes());
            stream.extend((0..n).map(|i| (i % 251) as u8));
        }
        let sectors = ((host % 512) as usize + stream.len()).div_ceil(512) as u64;
        if host as usize + stream.len() <= len && sectors <= max_sectors + 1 {
            let entry = COMPRESSED | ((sectors - 1) << bits) | host;
            out.push(Mutant {
                label: format!(
                    "compressed cluster at guest {}: stored stream of {total} bytes",
                    e.guest
                ),
                change: Change::Patch(vec![
                    (host as usize, stream),
                    (e.pos, entry.to_be_bytes().to_vec()),
                ]),
            });
        }
    }
    out
}

/// Refcount structures damaged: the first table entry moved, blocks zeroed
/// or full, the refcounts of metadata clusters cleared, every table entry on
/// one full block, other refcount widths over the same bytes.
pub(crate) fn refcount_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let rt = l.refcount_offset as usize;
    let Some(block) = l.refcount_block else {
        return Vec::new();
    };
    let some_table = l.l2.first().map_or(l.l1_offset, |e| e.table);
    let some_data = seed
        .entries(|k| matches!(k, Kind::Data(_)))
        .find_map(|e| match e.kind {
            Kind::Data(h) => Some(h),
            _ => None,
        })
        .unwrap_or(l.l1_offset);
    let mut out = Vec::new();
    for v in [
        0,
        1,
        block + 1,
        block + 512,
        eof,
        eof + cs,
        OFFSET_MASK,
        u64::MAX,
        l.l1_offset,
        cs,
        some_table,
        some_data,
        block | COPIED,
        l.refcount_offset,
    ] {
        if v != block {
            out.push(Mutant::word(
                format!("refcount table entry 0: {block:#x} -> {v:#x}"),
                rt,
                v,
            ));
        }
    }
    let table_entries = (l.refcount_clusters * cs / 8) as usize;
    if table_entries > 1 {
        for v in [block, eof, l.l1_offset] {
            out.push(Mutant::word(
                format!("refcount table entry 1 -> {v:#x}"),
                rt + 8,
                v,
            ));
        }
    }
    let b = block as usize;
    let n = cs as usize;
    out.extend([
        Mutant::patch("refcount block zeroed".into(), b, vec![0; n]),
        Mutant::patch("refcount block all 0xff".into(), b, vec![0xff; n]),
        Mutant::patch("refcount block: first 64 bytes zero".into(), b, vec![0; 64]),
    ]);
    // 16-bit refcounts (QEMU's default): clear the count of one cluster.
    let version = be(&seed.bytes, 4, 4);
    let order = if version == 2 {
        4
    } else {
        be(&seed.bytes, 96, 4)
    };
    if order == 4 {
        for (what, offset) in [
            ("header", 0),
            ("refcount table", l.refcount_offset),
            ("refcount block", block),
            ("L1 table", l.l1_offset),
            ("an L2 table", some_table),
            ("a data cluster", some_data),
        ] {
            let cluster = (offset / cs) as usize;
            if 2 * cluster + 2 <= n {
                out.push(Mutant::patch(
                    format!("refcount of the {what} cluster set to 0"),
                    b + 2 * cluster,
                    vec![0, 0],
                ));
            }
        }
    }
    let entries = table_entries.min(n / 8);
    out.push(Mutant {
        label: format!("all {entries} refcount table entries -> the first block"),
        change: Change::Patch(vec![(rt, block.to_be_bytes().repeat(entries))]),
    });
    out.push(Mutant {
        label: format!("all {entries} refcount table entries -> the first block, all 0xff"),
        change: Change::Patch(vec![
            (rt, block.to_be_bytes().repeat(entries)),
            (b, vec![0xff; n]),
        ]),
    });
    if version == 3 {
        for order in (0..=6).filter(|&o| o != 4) {
            out.push(Mutant::patch(
                format!("refcount_order {order} over 16-bit refcount blocks"),
                96,
                be_bytes(4, order),
            ));
        }
    }
    out
}

/// File lengths to truncate at.
pub(crate) fn truncation_lengths(seed: &Seed) -> Vec<usize> {
    let l = &seed.layout;
    let cs = l.cluster_size as usize;
    let len = seed.bytes.len();
    let mut at = vec![
        0,
        1,
        3,
        4,
        8,
        71,
        72,
        73,
        103,
        104,
        105,
        111,
        112,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        cs - 1,
        cs,
        cs + 1,
        len - 1,
        len - 512,
        len.saturating_sub(cs),
    ];
    let step = (len / cs / 48).max(1) * cs;
    at.extend((0..len).step_by(step));
    let l1 = l.l1_offset as usize;
    at.extend([l1, l1 + 4, l1 + 8, l1 + 8 * l.l1_size as usize - 1]);
    if let Some((off, size)) = l.backing {
        at.extend([off, off + size / 2, off + size - 1]);
    }
    let mut tables: Vec<u64> = l.l2.iter().map(|e| e.table).collect();
    tables.dedup();
    for t in tables.into_iter().take(4) {
        let t = t as usize;
        at.extend([t, t + 8, t + cs / 2, t + cs - 1]);
    }
    for e in l.l2.iter().take(512) {
        match e.kind {
            Kind::Data(h) => {
                let h = h as usize;
                at.extend([h, h + 1, h + cs / 2, h + cs - 1]);
            }
            Kind::Compressed { host, len } => {
                let (h, n) = (host as usize, len as usize);
                at.extend([h, h + 1, h + n / 2, h + n - 1]);
            }
            _ => {}
        }
    }
    at.sort_unstable();
    at.dedup();
    at.retain(|&n| n < len);
    at
}

/// Positions the fuzzer favours: the header area, the L1 table, the L2
/// entries in use and compressed payloads.
pub(crate) fn fuzz_regions(seed: &Seed) -> Vec<(usize, usize)> {
    let l = &seed.layout;
    let len = seed.bytes.len();
    let mut regions = vec![
        (0, (l.cluster_size as usize).min(4096).min(len)),
        (l.l1_offset as usize, 8 * l.l1_size as usize),
        (0, len.min(128 * 1024)),
    ];
    let mut tables: Vec<u64> = l.l2.iter().map(|e| e.table).collect();
    tables.dedup();
    for t in tables {
        let used = l.l2.iter().filter(|e| e.table == t).count();
        regions.push((t as usize, l.entry_bytes as usize * used));
    }
    regions.push((l.refcount_offset as usize, 64));
    if let Some(block) = l.refcount_block {
        regions.push((block as usize, 512));
    }
    for e in &l.l2 {
        if let Kind::Compressed { host, len: n } = e.kind {
            regions.push((host as usize, (n as usize).min(len - host as usize)));
        }
    }
    regions.retain(|&(start, n)| n > 0 && start + n <= len);
    regions
}

/// One fuzz mutation: 1 to 8 changes, each a byte xor, a byte set to 0x00 or
/// 0xff, or an aligned 8-byte word replaced by a value tables care about.
pub(crate) fn fuzz_mutant(
    seed: &Seed,
    regions: &[(usize, usize)],
    rng: &mut Rng,
    i: u64,
) -> Mutant {
    let len = seed.bytes.len();
    let cs = seed.layout.cluster_size;
    let mut patches = Vec::new();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let (start, n) = regions[rng.below(regions.len() as u64) as usize];
        let pos = start + rng.below(n as u64) as usize;
        match rng.below(8) {
            0..=4 => {
                let x = (rng.below(255) + 1) as u8;
                patches.push((pos, vec![seed.bytes[pos] ^ x]));
                what.push(format!("{pos}^{x:#x}"));
            }
            5 => {
                let v = if rng.below(2) == 0 { 0 } else { 0xff };
                patches.push((pos, vec![v]));
                what.push(format!("{pos}={v:#x}"));
            }
            _ => {
                let pos = (pos & !7).min(len - 8);
                let old = be(&seed.bytes, pos, 8);
                let v = match rng.below(10) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => COPIED,
                    3 => COMPRESSED | rng.next() >> 2,
                    4 => (len as u64).next_multiple_of(cs) | COPIED,
                    5 => rng.next(),
                    6 => old ^ (1 << rng.below(64)),
                    7 => old.wrapping_add(cs),
                    8 => old.wrapping_add(1),
                    _ => (rng.below(len as u64) & !(cs - 1)) | COPIED,
                };
                patches.push((pos, v.to_be_bytes().to_vec()));
                what.push(format!("{pos}:={v:#x}"));
            }
        }
    }
    Mutant {
        label: format!("fuzz #{i}: {}", what.join(" ")),
        change: Change::Patch(patches),
    }
}

/// `bytes` with its backing name replaced by `name` (which must fit in
/// cluster 0 where the old one was).
pub(crate) fn with_backing_name(bytes: &[u8], name: &str) -> Vec<u8> {
    let l = layout(bytes);
    let (off, old) = l.backing.expect("image has a backing name");
    let mut out = bytes.to_vec();
    out[off..off + old].fill(0);
    out[off..off + name.len()].copy_from_slice(name.as_bytes());
    put_be(&mut out, 16, 4, name.len() as u64);
    out
}
