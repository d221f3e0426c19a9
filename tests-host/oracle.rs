//! Oracle tests: the `blockgraph` host CLI against the real `qemu-img` and `qemu-io`.
//!
//! Every test builds small images with QEMU's tools in its own temporary directory,
//! which is also the current directory of every command (so backing file names stay
//! relative), runs one operation through `blockgraph` and through QEMU, and compares
//! the results: guest data byte for byte, `info`/`map` JSON field by field, and the
//! chain left behind by a collapse. A missing QEMU tool fails the test with a clear
//! message: nothing here is ever skipped.
//!
//! Sections: helpers (commands, files, a tiny JSON reader, test data, chains), then
//! 1. convert, 2. info, 3. map, 4. collapse, 5. refused operations, 6. io.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

mod common;
use common::{
    be32, be64, bg, bg_ok, bg_refused, copy_dir, qemu_compare, qemu_img, qemu_io, render, run,
    BLOCKGRAPH, QEMU_IMG, QEMU_IO,
};

// ---------------------------------------------------------------------------
// Helpers: running commands
// ---------------------------------------------------------------------------

fn tmpdir() -> TempDir {
    common::tmpdir("bg-oracle-")
}

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME [SIZE]`.
fn qcow2(dir: &Path, name: &str, size: Option<&str>, opts: &str, backing: Option<(&str, &str)>) {
    if let Some(parent) = dir.join(name).parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((file, fmt)) = backing {
        args.extend(["-b", file, "-F", fmt]);
    }
    args.push(name);
    args.extend(size);
    qemu_img(dir, &args);
}

// ---------------------------------------------------------------------------
// Helpers: files
// ---------------------------------------------------------------------------

fn assert_same_bytes(what: &str, expected: &[u8], actual: &[u8]) {
    if expected == actual {
        return;
    }
    match expected.iter().zip(actual).position(|(a, b)| a != b) {
        Some(i) => panic!(
            "{what}: first difference at byte {i} (0x{i:x}): expected 0x{:02x}, got 0x{:02x} \
             (lengths: expected {}, got {})",
            expected[i],
            actual[i],
            expected.len(),
            actual.len()
        ),
        None => panic!(
            "{what}: lengths differ: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        ),
    }
}

/// Every file below `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that no file below `dir` was created, removed or changed, except `skip`.
fn assert_unchanged_except(
    dir: &Path,
    before: &BTreeMap<PathBuf, Vec<u8>>,
    skip: &[&str],
    what: &str,
) {
    let after = snapshot(dir);
    let keep = |p: &&PathBuf| !skip.iter().any(|s| Path::new(s) == p.as_path());
    let names_before: Vec<&PathBuf> = before.keys().filter(keep).collect();
    let names_after: Vec<&PathBuf> = after.keys().filter(keep).collect();
    assert_eq!(
        names_before, names_after,
        "{what}: files were created or removed"
    );
    for name in names_before {
        assert_same_bytes(
            &format!("{what}: {} must be unchanged", name.display()),
            &before[name],
            &after[name],
        );
    }
}

fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    assert_unchanged_except(dir, before, &[], what);
}

/// Overwrites bytes of a file in place.
fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = fs::read(path).unwrap();
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    fs::write(path, data).unwrap();
}

/// The guest view of `img` according to `qemu-img convert -O raw`.
fn qemu_guest_data(dir: &Path, img: &str) -> Vec<u8> {
    let out = tmpdir();
    let raw = out.path().join("qemu.raw");
    qemu_img(dir, &["convert", "-O", "raw", img, raw.to_str().unwrap()]);
    fs::read(raw).unwrap()
}

/// Converts `img` with qemu-img and with blockgraph (`-O raw` unless
/// `with_format` is false) and byte-compares the outputs; returns the guest data.
fn assert_convert_matches_with(dir: &Path, img: &str, with_format: bool) -> Vec<u8> {
    let expected = qemu_guest_data(dir, img);
    let out = tmpdir();
    let raw = out.path().join("blockgraph.raw");
    let raw = raw.to_str().unwrap();
    if with_format {
        bg_ok(dir, &["convert", "-O", "raw", img, raw]);
    } else {
        bg_ok(dir, &["convert", img, raw]);
    }
    let actual = fs::read(raw).unwrap();
    assert_same_bytes(
        &format!("blockgraph convert {img} (in {})", dir.display()),
        &expected,
        &actual,
    );
    expected
}

fn assert_convert_matches(dir: &Path, img: &str) -> Vec<u8> {
    assert_convert_matches_with(dir, img, true)
}

// ---------------------------------------------------------------------------
// Helpers: qcow2 header surgery and comparison
// ---------------------------------------------------------------------------

const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// What QEMU rebuilds in cluster 0 when it changes a backing file.
#[derive(Debug, PartialEq)]
struct Header {
    /// The fixed header (72 bytes for v2, header_length for v3) with
    /// backing_file_offset and backing_file_size zeroed.
    fixed: Vec<u8>,
    /// Header extensions (type, data) in order, without the end marker.
    extensions: Vec<(u32, Vec<u8>)>,
    backing: Option<Vec<u8>>,
}

fn read_header(path: &Path) -> Header {
    let data = fs::read(path).unwrap();
    let header_len = if be32(&data, 4) >= 3 {
        be32(&data, 100) as usize
    } else {
        72
    };
    let mut fixed = data[..header_len].to_vec();
    fixed[8..20].fill(0);
    let mut extensions = Vec::new();
    let mut off = header_len;
    loop {
        let (kind, len) = (be32(&data, off), be32(&data, off + 4) as usize);
        if kind == 0 {
            break;
        }
        extensions.push((kind, data[off + 8..off + 8 + len].to_vec()));
        off += 8 + len.next_multiple_of(8);
    }
    let (name_off, name_len) = (be64(&data, 8) as usize, be32(&data, 16) as usize);
    let backing = (name_off != 0).then(|| data[name_off..name_off + name_len].to_vec());
    Header {
        fixed,
        extensions,
        backing,
    }
}

/// Rewrites the header extensions of a qcow2 file (the backing name moves to
/// just after the end marker, as QEMU places it).
fn write_header_extensions(path: &Path, extensions: &[(u32, Vec<u8>)]) {
    let mut data = fs::read(path).unwrap();
    let header = read_header(path);
    let (header_len, cluster_size) = (header.fixed.len(), 1usize << be32(&data, 20));
    let mut area = Vec::new();
    for (kind, body) in extensions {
        area.extend(kind.to_be_bytes());
        area.extend((body.len() as u32).to_be_bytes());
        area.extend(body);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend([0; 8]);
    let name_off = (header_len + area.len()) as u64;
    if let Some(name) = &header.backing {
        area.extend(name);
        data[8..16].copy_from_slice(&name_off.to_be_bytes());
    }
    assert!(
        header_len + area.len() <= cluster_size,
        "crafted header does not fit cluster 0"
    );
    data[header_len..cluster_size].fill(0);
    data[header_len..header_len + area.len()].copy_from_slice(&area);
    fs::write(path, data).unwrap();
}

// ---------------------------------------------------------------------------
// Helpers: a small JSON reader (no serde here)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// The number's literal text: qemu-img prints plain integers.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = JsonParser {
            b: text.as_bytes(),
            i: 0,
        };
        let value = p.value().and_then(|v| {
            p.ws();
            if p.i == p.b.len() {
                Ok(v)
            } else {
                Err(p.err("trailing characters"))
            }
        });
        value.unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn items(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            other => panic!("expected a JSON array, got {other:?}"),
        }
    }

    fn u64_field(&self, key: &str) -> u64 {
        match self.get(key) {
            Some(Json::Num(n)) => n
                .parse()
                .unwrap_or_else(|_| panic!("field {key:?} is not an integer in {self:?}")),
            _ => panic!("missing integer field {key:?} in {self:?}"),
        }
    }

    fn bool_field(&self, key: &str) -> bool {
        match self.get(key) {
            Some(Json::Bool(b)) => *b,
            _ => panic!("missing boolean field {key:?} in {self:?}"),
        }
    }

    fn str_field(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Json::Str(s)) => Some(s),
            None => None,
            Some(other) => panic!("field {key:?} is not a string: {other:?}"),
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.i)
    }

    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err("unknown literal"))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.i) {
            None => Err(self.err("unexpected end")),
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                if self.eat(b'}') {
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return Err(self.err("expected ':'"));
                    }
                    fields.push((key, self.value()?));
                    if self.eat(b'}') {
                        return Ok(Json::Obj(fields));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("expected ',' or '}'"));
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    if self.eat(b']') {
                        return Ok(Json::Arr(items));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("expected ',' or ']'"));
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(_) => {
                let start = self.i;
                while matches!(
                    self.b.get(self.i),
                    Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                ) {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(self.err("unexpected character"));
                }
                let text = String::from_utf8_lossy(&self.b[start..self.i]).into_owned();
                Ok(Json::Num(text))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(self.err("expected a string"));
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.b.get(self.i).copied() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"));
                }
                Some(b'\\') => {
                    let esc = self.b.get(self.i + 1).copied();
                    self.i += 2;
                    let c = match esc {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            let code = self
                                .b
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| self.err("bad \\u escape"))?;
                            self.i += 4;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(self.err("bad escape")),
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

#[test]
fn json_reader_reads_qemu_shapes() {
    let v =
        Json::parse(r#" [{"a": 1, "b": [true, false, null], "c": "x\"y\\z\u0041", "d": {}}, []] "#);
    let first = &v.items()[0];
    assert_eq!(first.u64_field("a"), 1);
    assert_eq!(
        first.get("b"),
        Some(&Json::Arr(vec![
            Json::Bool(true),
            Json::Bool(false),
            Json::Null
        ]))
    );
    assert_eq!(first.str_field("c"), Some("x\"y\\zA"));
    assert_eq!(first.get("d"), Some(&Json::Obj(Vec::new())));
    assert_eq!(v.items()[1], Json::Arr(Vec::new()));
}

// ---------------------------------------------------------------------------
// Helpers: info and map comparisons
// ---------------------------------------------------------------------------

/// The `info` fields blockgraph promises to print with qemu-img's names and values.
const INFO_FIELDS: [&str; 8] = [
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "dirty-flag",
];

fn assert_info_fields_equal(what: &str, qemu: &Json, ours: &Json) {
    let qcow2 = qemu.str_field("format") == Some("qcow2");
    for field in INFO_FIELDS {
        let (expected, actual) = (qemu.get(field), ours.get(field));
        // The contract prints "cluster-size" and "dirty-flag" for qcow2 images only
        // (qemu-img also prints "dirty-flag": false for raw).
        if !qcow2 && actual.is_none() && matches!(field, "cluster-size" | "dirty-flag") {
            continue;
        }
        assert_eq!(
            actual, expected,
            "{what}: field {field:?} differs (left: blockgraph, right: qemu-img)"
        );
    }
}

/// `info --output=json` (one object) and `info --backing-chain --output=json`
/// (array, top first) must agree with qemu-img on [`INFO_FIELDS`]; returns
/// qemu-img's chain.
fn assert_info_matches(dir: &Path, img: &str) -> Json {
    let single = ["info", "--output=json", img];
    let qemu = Json::parse(&qemu_img(dir, &single));
    let ours = Json::parse(&bg_ok(dir, &single));
    assert_info_fields_equal(&format!("info {img}"), &qemu, &ours);

    let chain = ["info", "--backing-chain", "--output=json", img];
    let qemu = Json::parse(&qemu_img(dir, &chain));
    let ours = Json::parse(&bg_ok(dir, &chain));
    assert_eq!(
        ours.items().len(),
        qemu.items().len(),
        "info --backing-chain {img}: chain lengths differ\n blockgraph: {ours:?}\n qemu-img: {qemu:?}"
    );
    for (i, (q, o)) in qemu.items().iter().zip(ours.items()).enumerate() {
        assert_info_fields_equal(&format!("info --backing-chain {img}, entry {i}"), q, o);
    }
    qemu
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
}

/// Keeps start/length/depth/present/zero/data and merges adjacent entries with
/// equal (depth, present, zero, data).
fn normalised_map(who: &str, text: &str) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in Json::parse(text).items() {
        let x = Extent {
            start: e.u64_field("start"),
            length: e.u64_field("length"),
            depth: e.u64_field("depth"),
            present: e.bool_field("present"),
            zero: e.bool_field("zero"),
            data: e.bool_field("data"),
        };
        let expected_start = out.last().map_or(0, |l| l.start + l.length);
        assert_eq!(
            x.start, expected_start,
            "{who}: map entries are not contiguous:\n{text}"
        );
        match out.last_mut() {
            Some(l)
                if (l.depth, l.present, l.zero, l.data) == (x.depth, x.present, x.zero, x.data) =>
            {
                l.length += x.length;
            }
            _ => out.push(x),
        }
    }
    out
}

fn show_map(map: &[Extent]) -> String {
    map.iter()
        .map(|e| {
            format!(
                "\n  {:>9} +{:<9} depth {} present {} zero {} data {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data
            )
        })
        .collect()
}

/// `map --output=json` must agree with qemu-img's after normalisation; returns it.
fn assert_map_matches(dir: &Path, img: &str) -> Vec<Extent> {
    let args = ["map", "--output=json", img];
    let qemu = normalised_map("qemu-img map", &qemu_img(dir, &args));
    let ours = normalised_map("blockgraph map", &bg_ok(dir, &args));
    assert!(
        qemu == ours,
        "map {img} differs\nqemu-img:{}\nblockgraph:{}",
        show_map(&qemu),
        show_map(&ours)
    );
    qemu
}

// ---------------------------------------------------------------------------
// Helpers: test data and chains
// ---------------------------------------------------------------------------

/// xorshift64*: deterministic "random-ish" bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Clone, Copy)]
enum Fill {
    /// Incompressible.
    Random,
    Byte(u8),
    /// Repeated numbered text lines.
    Text,
    Zero,
    /// First half random, second half 0xaa.
    HalfRandom,
    /// Random over a four-symbol alphabet: compresses, but not trivially.
    FewSymbols,
}

fn fill(kind: Fill, len: usize, rng: &mut Rng) -> Vec<u8> {
    match kind {
        Fill::Random => (0..len).map(|_| rng.next() as u8).collect(),
        Fill::Byte(b) => vec![b; len],
        Fill::Text => {
            let mut out = Vec::with_capacity(len);
            let mut n = rng.next() % 1000;
            while out.len() < len {
                out.extend(format!("blockgraph oracle line {n}: the quick brown fox\n").bytes());
                n += 1;
            }
            out.truncate(len);
            out
        }
        Fill::Zero => vec![0; len],
        Fill::HalfRandom => {
            let mut out = fill(Fill::Random, len / 2, rng);
            out.resize(len, 0xaa);
            out
        }
        Fill::FewSymbols => (0..len)
            .map(|_| b"ACGT"[(rng.next() % 4) as usize])
            .collect(),
    }
}

fn mixed_data(kinds: &[Fill], chunk: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    kinds
        .iter()
        .flat_map(|&k| fill(k, chunk, &mut rng))
        .collect()
}

/// base <- mid <- top, 4 MiB, relative names, with data, zero writes and
/// discards at offsets that are unaligned for most cluster sizes.
fn data_chain(d: &Path, opts: &str) -> &'static str {
    qcow2(d, "base.qcow2", Some("4M"), opts, None);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0x11 0 300k",
            "write -P 0x12 1M 64k",
            "write -P 0x5a 1000 3000",
            "write -P 0x13 3000000 70000",
        ],
    );
    qcow2(d, "mid.qcow2", None, opts, Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0x21 128k 128k",
            "write -z 1M 32k",
            "write -P 0x22 2M 100",
            "discard 3M 64k",
            "write -P 0x23 123457 4321",
        ],
    );
    qcow2(d, "top.qcow2", None, opts, Some(("mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x31 250k 20k",
            "write -z 2000000 300000",
            "write -P 0x32 4190000 4304",
            "write -z 0 4k",
        ],
    );
    "top.qcow2"
}

/// QEMU iotest 040's TestRelativePaths layout:
/// `dir2/dir3/top.qcow2 -> ../mid.qcow2 (dir2/mid.qcow2) -> ../dir1/base.qcow2`.
fn relative_chain(d: &Path) -> &'static str {
    qcow2(d, "dir1/base.qcow2", Some("4M"), "", None);
    qemu_io(d, "qcow2", "dir1/base.qcow2", &["write -P 0xab 0 512k"]);
    qcow2(
        d,
        "dir2/mid.qcow2",
        None,
        "",
        Some(("../dir1/base.qcow2", "qcow2")),
    );
    qemu_io(d, "qcow2", "dir2/mid.qcow2", &["write -P 0xef 512k 512k"]);
    qcow2(
        d,
        "dir2/dir3/top.qcow2",
        None,
        "",
        Some(("../mid.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "dir2/dir3/top.qcow2",
        &["write -P 0x5a 1000 3000", "write -z 768k 64k"],
    );
    "dir2/dir3/top.qcow2"
}

/// A raw base (given by `-F raw`) of 1 MiB (+ `extra` bytes) under a 2 MiB
/// qcow2 overlay.
fn raw_base_chain(d: &Path, extra: usize) -> &'static str {
    let mut data = mixed_data(
        &[Fill::Byte(0x11), Fill::Text, Fill::Random, Fill::Zero],
        256 * 1024,
        7,
    );
    data.extend(vec![0x77; extra]);
    fs::write(d.join("base.raw"), data).unwrap();
    qcow2(d, "top.qcow2", Some("2M"), "", Some(("base.raw", "raw")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x22 100k 10k",
            "write -z 300k 64k",
            "write -P 0x23 1040000 20000",
        ],
    );
    "top.qcow2"
}

/// Sixteen layers `l00.qcow2 <- ... <- l15.qcow2`, each writing a distinct
/// pattern at a distinct offset plus an overlapping unaligned write.
fn sixteen_layers(d: &Path) -> &'static str {
    for i in 0..16u32 {
        let name = format!("l{i:02}.qcow2");
        if i == 0 {
            qcow2(d, &name, Some("4M"), "", None);
        } else {
            let below = format!("l{:02}.qcow2", i - 1);
            qcow2(d, &name, None, "", Some((&below, "qcow2")));
        }
        let own = format!("write -P {} {} 64k", 0x40 + i, i * 256 * 1024);
        let overlap = format!("write -P {} {} 150000", 0x80 + i, i * 200 * 1024 + 3000);
        let mut cmds = vec![own, overlap];
        if i == 10 {
            cmds.push("write -z 512k 200k".to_string());
        }
        if i == 12 {
            cmds.push("discard 1M 128k".to_string());
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "qcow2", &name, &cmds);
    }
    "l15.qcow2"
}

// ---------------------------------------------------------------------------
// 1. convert: guest data equals `qemu-img convert -O raw`
// ---------------------------------------------------------------------------

fn convert_data_chain(opts: &str) {
    let t = tmpdir();
    let top = data_chain(t.path(), opts);
    let data = assert_convert_matches(t.path(), top);
    // Sanity of the construction (qemu's own view): the top's zero write wins.
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert_convert_matches(t.path(), "mid.qcow2");
    assert_convert_matches(t.path(), "base.qcow2");
}

/// Images of 64 MiB and more are copied by several threads (on a machine
/// with more than one CPU), each over a part of the range: data on both
/// sides of every part boundary, from every layer, must come out whole.
#[test]
fn convert_large_chain_in_parts() {
    let t = tmpdir();
    qcow2(t.path(), "base.qcow2", Some("200M"), "", None);
    qemu_io(
        t.path(),
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 98M 6M",
            "write -P 0x13 196M 4M",
        ],
    );
    qcow2(
        t.path(),
        "top.qcow2",
        None,
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        t.path(),
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x21 104853504 8k",
            "write -z 50M 4M",
            "write -P 0x22 140508672 1k",
            "write -P 0x23 209714688 512",
        ],
    );
    assert_convert_matches(t.path(), "top.qcow2");
}

/// `convert` with the options `bad` on `top` exits 1 and creates nothing.
fn convert_is_refused(d: &Path, top: &str, bad: &[&str]) {
    let mut args = vec!["convert"];
    args.extend_from_slice(bad);
    args.extend([top, "refused.qcow2"]);
    let out = bg(d, &args);
    assert_eq!(out.status.code(), Some(1), "{args:?}");
    assert!(!d.join("refused.qcow2").exists(), "{args:?}");
}

/// `convert -O qcow2`: a new image without a backing file whose guest view
/// qemu-img finds equal to the chain's, clean, with the `-o` options asked
/// for; options are checked before anything is created.
#[test]
fn convert_to_qcow2_with_options() {
    let t = tmpdir();
    let d = t.path();
    let top = data_chain(d, "");
    for (out, opts) in [
        ("plain.qcow2", None),
        ("small.qcow2", Some("cluster_size=4096,refcount_bits=8")),
        ("v2.qcow2", Some("compat=0.10")),
    ] {
        let mut args = vec!["convert", "-O", "qcow2"];
        if let Some(opts) = opts {
            args.extend(["-o", opts]);
        }
        args.extend([top, out]);
        bg_ok(d, &args);
        qemu_img(d, &["check", out]);
        qemu_compare(d, top, out, out);
        let info = qemu_img(d, &["info", "--output=json", out]);
        assert!(!info.contains("backing-filename"), "{out}: {info}");
        if out == "small.qcow2" {
            assert!(info.contains("\"cluster-size\": 4096"), "{info}");
            assert!(info.contains("\"refcount-bits\": 8"), "{info}");
        }
        if out == "v2.qcow2" {
            assert!(info.contains("\"compat\": \"0.10\""), "{info}");
        }
    }
    for bad in [
        &["-O", "qcow2", "-o", "cluster_size=3000"][..],
        &["-O", "raw", "-o", "cluster_size=4096"][..],
        &["-O", "vmdk"][..],
    ] {
        convert_is_refused(d, top, bad);
    }
}

/// `convert -O qcow2 -B`: a delta over `base.qcow2` whose view qemu-img
/// finds equal to the chain's, clean, backed by base, holding less than a
/// full copy; where the input's backing file is -B's, qemu-img's own delta
/// reads the same. (Ours holds what differs from -B's view, so it is right
/// even when the input's backing chain differs from -B.)
#[test]
fn convert_to_a_delta_over_a_backing_file() {
    let t = tmpdir();
    let d = t.path();
    let top = data_chain(d, "");
    bg_ok(d, &["convert", "-O", "qcow2", top, "full.qcow2"]);
    let delta = ["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
    bg_ok(d, &[&delta[..], &[top, "delta.qcow2"]].concat());
    qemu_img(d, &["check", "delta.qcow2"]);
    qemu_compare(d, top, "delta.qcow2", "delta");
    let info = qemu_img(d, &["info", "--output=json", "delta.qcow2"]);
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    let bytes = |img: &str| -> u64 { common::own_data_extents(d, img).iter().map(|e| e.1).sum() };
    assert!(
        bytes("delta.qcow2") < bytes("full.qcow2"),
        "the delta copied base's data too"
    );
    // qemu-img copies what the input holds above its own backing file,
    // taken to equal -B's: with mid (backed by base) both deltas agree.
    bg_ok(d, &[&delta[..], &["mid.qcow2", "mid-ours.qcow2"]].concat());
    qemu_img(d, &[&delta[..], &["mid.qcow2", "mid-qemu.qcow2"]].concat());
    qemu_compare(
        d,
        "mid-qemu.qcow2",
        "mid-ours.qcow2",
        "qemu-img's delta and ours",
    );
    qemu_compare(d, "mid.qcow2", "mid-ours.qcow2", "the delta of mid");
    for bad in [
        &["-O", "qcow2", "-B", "base.qcow2"][..],
        &["-O", "raw", "-B", "base.qcow2", "-F", "qcow2"][..],
        &["-O", "qcow2", "-F", "qcow2"][..],
    ] {
        convert_is_refused(d, top, bad);
    }
}

#[test]
fn convert_cache_modes() {
    let t = tmpdir();
    let top = data_chain(t.path(), "");
    let expected = qemu_guest_data(t.path(), top);
    for mode in ["writeback", "unsafe"] {
        let out = format!("{mode}.raw");
        bg_ok(t.path(), &["convert", "-t", mode, "-O", "raw", top, &out]);
        assert_same_bytes(&out, &expected, &fs::read(t.path().join(&out)).unwrap());
    }
    for bad in [&["-t", "none"][..], &["-t"][..]] {
        let mut args = vec!["convert"];
        args.extend_from_slice(bad);
        args.extend([top, "refused.raw"]);
        let out = bg(t.path(), &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!t.path().join("refused.raw").exists(), "{args:?}");
    }
}

#[test]
fn convert_cluster_size_512() {
    convert_data_chain("cluster_size=512");
}

#[test]
fn convert_cluster_size_4k() {
    convert_data_chain("cluster_size=4k");
}

#[test]
fn convert_cluster_size_64k() {
    convert_data_chain("cluster_size=64k");
}

#[test]
fn convert_cluster_size_2m() {
    convert_data_chain("cluster_size=2M");
}

#[test]
fn convert_compat_v2() {
    convert_data_chain("compat=0.10");
}

#[test]
fn convert_refcount_bits_1() {
    convert_data_chain("refcount_bits=1");
}

#[test]
fn convert_refcount_bits_64() {
    convert_data_chain("refcount_bits=64");
}

#[test]
fn convert_mixed_cluster_sizes() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "cluster_size=2M", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
    qcow2(
        d,
        "mid.qcow2",
        None,
        "cluster_size=512",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x22 1000 70000", "write -z 2M 4k"],
    );
    qcow2(
        d,
        "top.qcow2",
        None,
        "cluster_size=64k",
        Some(("mid.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x33 60000 10000", "write -z 3M 128k"],
    );
    assert_convert_matches(d, "top.qcow2");
    assert_map_matches(d, "top.qcow2");
}

#[test]
fn convert_zero_clusters_over_data() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
    qcow2(d, "mid.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -z 64k 128k", "write -z 1M 1M", "write -z 3000 5000"],
    );
    // A partial write into a zero cluster of the layer below: the copy-on-write
    // fill must come from the zero cluster, not from base.
    qcow2(d, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x33 1052672 512"]);
    let data = assert_convert_matches(d, "top.qcow2");
    assert!(
        data[1024 * 1024..1052672].iter().all(|&b| b == 0),
        "qemu: zero cluster reads as zero"
    );
    let map = assert_map_matches(d, "mid.qcow2");
    assert!(
        map.iter().any(|e| e.depth == 0 && e.zero && !e.data),
        "construction: qemu-io write -z must have made zero clusters:{}",
        show_map(&map)
    );
    assert_convert_matches(d, "mid.qcow2");
}

#[test]
fn convert_discarded_ranges() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 4M", "discard 1M 1M"],
    );
    qcow2(d, "top.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x22 2M 1M",
            "discard 2112k 128k", // allocated in top, data below
            "discard 3M 64k",     // unallocated in top, data below
            "discard 1536k 64k",  // unallocated in top, discarded below
        ],
    );
    let data = assert_convert_matches(d, "top.qcow2");
    assert!(data[3 * 1024 * 1024..3 * 1024 * 1024 + 65536]
        .iter()
        .all(|&b| b == 0));
    assert_convert_matches(d, "base.qcow2");
    assert_map_matches(d, "top.qcow2");
}

fn convert_compressed(cluster: &str, chunk: usize, kinds: &[Fill]) {
    let t = tmpdir();
    let d = t.path();
    let data = mixed_data(kinds, chunk, 0x1234_5678);
    fs::write(d.join("src.raw"), &data).unwrap();
    let opt = format!("cluster_size={cluster}");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opt,
            "src.raw",
            "comp.qcow2",
        ],
    );
    let check = Json::parse(&qemu_img(d, &["check", "--output=json", "comp.qcow2"]));
    assert!(
        check.u64_field("compressed-clusters") > 0,
        "construction: qemu-img convert -c wrote no compressed cluster: {check:?}"
    );
    let guest = assert_convert_matches(d, "comp.qcow2");
    assert_same_bytes("qemu's round trip of the source", &data, &guest);

    qcow2(d, "top.qcow2", None, "", Some(("comp.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x71 5000 70000",
            "write -z 3M 64k",
            "write -P 0x72 5000000 1234",
        ],
    );
    assert_convert_matches(d, "top.qcow2");
    // Rewriting part of a compressed cluster copies it out in comp.qcow2 itself.
    qemu_io(d, "qcow2", "comp.qcow2", &["write -P 0x73 100000 3000"]);
    assert_convert_matches(d, "comp.qcow2");
    assert_convert_matches(d, "top.qcow2");
    assert_map_matches(d, "top.qcow2");
}

#[test]
fn convert_compressed_64k() {
    let mut rng = Rng(99);
    let all = [
        Fill::Random,
        Fill::Byte(0x3c),
        Fill::Text,
        Fill::Zero,
        Fill::HalfRandom,
        Fill::FewSymbols,
    ];
    let kinds: Vec<Fill> = (0..96).map(|_| all[(rng.next() % 6) as usize]).collect();
    convert_compressed("64k", 64 * 1024, &kinds); // 6 MiB
}

#[test]
fn convert_compressed_2m() {
    use Fill::*;
    // 1 MiB chunks: each 2 MiB cluster mixes two kinds; R,R is incompressible.
    let kinds = [
        Random,
        Byte(0x5a),
        Text,
        Zero,
        HalfRandom,
        FewSymbols,
        Random,
        Random,
        Byte(7),
        Text,
        FewSymbols,
        HalfRandom,
    ];
    convert_compressed("2M", 1024 * 1024, &kinds); // 12 MiB
}

#[test]
fn convert_raw_base() {
    let t = tmpdir();
    // An odd size: qemu rounds a raw file's size up to 512 bytes; the guest
    // data is the same either way.
    let top = raw_base_chain(t.path(), 1000);
    let data = assert_convert_matches(t.path(), top);
    let base_len = 1024 * 1024 + 1000;
    assert_eq!(data.len(), 2 * 1024 * 1024);
    assert!(
        data[1040000 + 20000..].iter().all(|&b| b == 0),
        "beyond the raw base reads zero"
    );
    assert_eq!(
        data[base_len - 1],
        0x23,
        "construction: 0x23 write covers the base end"
    );
}

#[test]
fn convert_raw_format_backing_is_not_probed() {
    // The backing file is a qcow2 image declared as raw: its bytes are the data.
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "inner.qcow2", Some("1M"), "", None);
    qemu_io(d, "qcow2", "inner.qcow2", &["write -P 0x66 0 64k"]);
    qcow2(d, "top.qcow2", Some("2M"), "", Some(("inner.qcow2", "raw")));
    let data = assert_convert_matches(d, "top.qcow2");
    assert_eq!(&data[..4], b"QFI\xfb");
}

#[test]
fn convert_relative_paths_in_subdirectories() {
    let t = tmpdir();
    let d = t.path();
    let top = relative_chain(d);
    let data = assert_convert_matches(d, top);
    assert!(data[4000..512 * 1024].iter().all(|&b| b == 0xab));
    assert!(data[512 * 1024..768 * 1024].iter().all(|&b| b == 0xef));
    // Same chain opened from another directory, and without "-O raw".
    assert_convert_matches_with(&d.join("dir2"), "dir3/top.qcow2", false);
    assert_convert_matches(&d.join("dir1"), "../dir2/dir3/top.qcow2");
}

#[test]
fn convert_backing_shorter_and_longer_than_overlay() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("1M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(
        d,
        "long.qcow2",
        Some("4M"),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "long.qcow2",
        &["write -P 0x22 0 64k", "write -P 0x23 1000000 100000"],
    );
    let data = assert_convert_matches(d, "long.qcow2");
    assert_eq!(data.len(), 4 * 1024 * 1024);
    assert!(
        data[1100000..].iter().all(|&b| b == 0),
        "reads past the backing end are zero"
    );
    qcow2(
        d,
        "short.qcow2",
        Some("512k"),
        "",
        Some(("long.qcow2", "qcow2")),
    );
    qemu_io(d, "qcow2", "short.qcow2", &["write -P 0x24 100k 1k"]);
    let data = assert_convert_matches(d, "short.qcow2");
    assert_eq!(data.len(), 512 * 1024);
}

#[test]
fn convert_sixteen_layer_chain() {
    let t = tmpdir();
    let top = sixteen_layers(t.path());
    assert_convert_matches(t.path(), top);
    assert_convert_matches(t.path(), "l07.qcow2");
}

#[test]
fn convert_unaligned_writes() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("1M"), "cluster_size=4k", None);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 0x5a 1000 3000", "write -P 0x11 4095 2"],
    );
    qcow2(d, "top.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x22 1 1",
            "write -P 0x23 65535 2",
            "write -z 2000 100",
            "write -P 0x24 777777 12345",
        ],
    );
    let data = assert_convert_matches(d, "top.qcow2");
    assert_eq!(&data[..2], &[0, 0x22]);
    assert_eq!(data[1000], 0x5a);
    assert_eq!(data[2000], 0);
    assert_eq!(&data[4095..4097], &[0x11, 0x11]);
}

#[test]
fn convert_internal_snapshot() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x10 3M 1M"]);
    qcow2(d, "snap.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 0x11 0 2M"]);
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "snap.qcow2",
        &[
            "write -P 0x22 512k 64k",
            "write -P 0x23 1000 3000",
            "write -z 1M 64k",
            "discard 1536k 64k",
        ],
    );
    qemu_img(d, &["snapshot", "-c", "s2", "snap.qcow2"]);
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 0x24 3100000 5000"]);
    let data = assert_convert_matches(d, "snap.qcow2");
    assert_eq!(data[1000], 0x23);
    assert_info_matches(d, "snap.qcow2");
    assert_map_matches(d, "snap.qcow2");
}

#[test]
fn convert_lazy_refcounts_clean_and_dirty() {
    let t = tmpdir();
    let d = t.path();
    // Closed cleanly: the dirty bit is cleared again.
    qcow2(d, "clean.qcow2", Some("4M"), "lazy_refcounts=on", None);
    qemu_io(d, "qcow2", "clean.qcow2", &["write -P 0x5a 0 512k"]);
    let info = assert_info_matches(d, "clean.qcow2");
    assert_eq!(info.items()[0].get("dirty-flag"), Some(&Json::Bool(false)));
    assert_convert_matches(d, "clean.qcow2");

    // Observed with QEMU 10.0: qemu-io killed by "sigraise 9" after a write leaves
    // incompatible bit 0 (dirty) set; qemu-img info reports "dirty-flag": true,
    // read-only opens (info, convert) read the data, and qemu-img check reports
    // refcount errors (exit 2) because the lazy refcounts were never written.
    qcow2(d, "dirty.qcow2", Some("4M"), "lazy_refcounts=on", None);
    let killed = run(
        d,
        QEMU_IO,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5b 64k 512k",
            "-c",
            "sigraise 9",
            "dirty.qcow2",
        ],
    );
    assert_eq!(killed.status.code(), None, "qemu-io must die from SIGKILL");
    let info = assert_info_matches(d, "dirty.qcow2");
    assert_eq!(
        info.items()[0].get("dirty-flag"),
        Some(&Json::Bool(true)),
        "construction: the image must stay dirty"
    );
    let before = snapshot(d);
    let data = assert_convert_matches(d, "dirty.qcow2");
    assert!(data[64 * 1024..576 * 1024].iter().all(|&b| b == 0x5b));
    assert_unchanged(d, &before, "reading a dirty image");
}

/// Random chains (fixed seeds): 1-4 layers with random cluster sizes,
/// versions and virtual sizes, each doing random unaligned writes, zero
/// writes and discards; convert, map and info must equal QEMU's.
#[test]
fn random_chains_match_qemu() {
    const CLUSTERS: [&str; 4] = ["512", "4k", "64k", "2M"];
    const SIZES: [u64; 4] = [1 << 20, 3 << 20, (2 << 20) + 512, 4 << 20];
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let t = tmpdir();
        let d = t.path();
        let layers = 1 + rng.next() % 4;
        let mut log = Vec::new();
        for i in 0..layers {
            let name = format!("r{i}.qcow2");
            let compat = if rng.next().is_multiple_of(4) {
                ",compat=0.10"
            } else {
                ""
            };
            let opts = format!(
                "cluster_size={}{compat}",
                CLUSTERS[(rng.next() % 4) as usize]
            );
            let size = SIZES[(rng.next() % 4) as usize];
            let below = format!("r{}.qcow2", i.saturating_sub(1));
            let backing = (i > 0).then_some((below.as_str(), "qcow2"));
            qcow2(d, &name, Some(&size.to_string()), &opts, backing);
            let mut cmds = Vec::new();
            for _ in 0..1 + rng.next() % 6 {
                let off = rng.next() % size;
                let len = 1 + rng.next() % (size - off).min(300_000);
                cmds.push(match rng.next() % 4 {
                    0 => format!("write -z {off} {len}"),
                    1 => format!("discard {off} {len}"),
                    _ => format!("write -P {} {off} {len}", rng.next() % 256),
                });
            }
            log.push(format!("{name} ({opts}, {size}): {cmds:?}"));
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(d, "qcow2", &name, &cmds);
        }
        let top = format!("r{}.qcow2", layers - 1);
        let case = std::panic::AssertUnwindSafe(|| {
            assert_convert_matches(d, &top);
            assert_map_matches(d, &top);
            assert_info_matches(d, &top);
        });
        if let Err(e) = std::panic::catch_unwind(case) {
            eprintln!("random chain, seed {seed}:\n  {}", log.join("\n  "));
            std::panic::resume_unwind(e);
        }
    }
}

// ---------------------------------------------------------------------------
// 2. info: fields equal qemu-img's
// ---------------------------------------------------------------------------

#[test]
fn info_relative_subdirectory_chain() {
    let t = tmpdir();
    let d = t.path();
    let top = relative_chain(d);
    let chain = assert_info_matches(d, top);
    assert_eq!(chain.items().len(), 3);
    assert_info_matches(&d.join("dir2"), "dir3/top.qcow2");
    assert_info_matches(&d.join("dir2"), "mid.qcow2");
}

#[test]
fn info_raw_base() {
    let t = tmpdir();
    let top = raw_base_chain(t.path(), 0);
    let chain = assert_info_matches(t.path(), top);
    assert_eq!(chain.items()[1].str_field("format"), Some("raw"));
}

#[test]
fn info_cluster_sizes_and_versions() {
    for opts in [
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
    ] {
        let t = tmpdir();
        let top = data_chain(t.path(), opts);
        assert_info_matches(t.path(), top);
    }
}

#[test]
fn info_sixteen_layers_and_compressed() {
    let t = tmpdir();
    let d = t.path();
    let top = sixteen_layers(d);
    let chain = assert_info_matches(d, top);
    assert_eq!(chain.items().len(), 16);

    let data = mixed_data(&[Fill::Text, Fill::FewSymbols], 64 * 1024, 3);
    fs::write(d.join("src.raw"), data).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "comp.qcow2",
        ],
    );
    assert_info_matches(d, "comp.qcow2");
}

#[test]
fn info_absolute_and_dotted_names() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("1M"), "", None);
    let abs = d.join("base.qcow2");
    qcow2(
        d,
        "sub/abs.qcow2",
        None,
        "",
        Some((abs.to_str().unwrap(), "qcow2")),
    );
    qcow2(d, "sub/top.qcow2", None, "", Some(("./abs.qcow2", "qcow2")));
    assert_info_matches(d, "./sub/top.qcow2");
    assert_info_matches(d, "sub//top.qcow2");
    assert_info_matches(&d.join("sub"), "top.qcow2");
}

// ---------------------------------------------------------------------------
// 3. map: equals qemu-img map after normalisation
// ---------------------------------------------------------------------------

#[test]
fn map_three_layer_chain() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 2M 512k"],
    );
    qcow2(d, "mid.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -z 256k 128k",
            "discard 2M 64k",
            "write -P 0x21 3M 100k",
        ],
    );
    qcow2(d, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x31 512k 64k", "discard 0 64k"],
    );
    let map = assert_map_matches(d, "top.qcow2");
    assert!(
        map.iter().any(|e| e.depth == 1 && e.zero && !e.data),
        "construction:{}",
        show_map(&map)
    );
    assert!(
        map.iter().any(|e| !e.present),
        "construction:{}",
        show_map(&map)
    );
    assert_map_matches(d, "mid.qcow2");
    assert_map_matches(d, "base.qcow2");
    assert_convert_matches(d, "top.qcow2");
}

#[test]
fn map_overlay_longer_than_backing() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("1M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(
        d,
        "top.qcow2",
        Some("4M"),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x22 0 64k", "write -P 0x23 2M 64k"],
    );
    assert_map_matches(d, "top.qcow2");
}

#[test]
fn map_small_clusters_and_many_layers() {
    let t = tmpdir();
    let top = data_chain(t.path(), "cluster_size=512");
    assert_map_matches(t.path(), top);
    let t = tmpdir();
    let top = sixteen_layers(t.path());
    assert_map_matches(t.path(), top);
}

// ---------------------------------------------------------------------------
// 4. collapse: equals `qemu-img rebase -u`
// ---------------------------------------------------------------------------

/// base <- mid <- top <- active (relative names, all in one directory).
fn four_layer_chain(d: &Path, opts: &str, base: &str) {
    qcow2(d, base, Some("4M"), opts, None);
    qemu_io(d, "qcow2", base, &["write -P 0x11 0 1M"]);
    qcow2(d, "mid.qcow2", None, opts, Some((base, "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x22 512k 512k", "write -z 0 64k"],
    );
    qcow2(d, "top.qcow2", None, opts, Some(("mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x33 768k 64k", "write -P 0x34 2M 100000"],
    );
    qcow2(d, "active.qcow2", None, opts, Some(("top.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "active.qcow2", &["write -P 0x44 3M 4096"]);
}

/// qemu-img's view of `img`'s backing reference: (backing-filename, format).
fn qemu_backing(dir: &Path, img: &str) -> (Option<String>, Option<String>) {
    let info = Json::parse(&qemu_img(dir, &["info", "--output=json", img]));
    (
        info.str_field("backing-filename").map(str::to_string),
        info.str_field("backing-filename-format")
            .map(str::to_string),
    )
}

/// The chain of `img` as qemu-img resolves it, as paths relative to `root`.
fn qemu_chain(root: &Path, cwd: &Path, img: &str) -> Vec<PathBuf> {
    let info = Json::parse(&qemu_img(
        cwd,
        &["info", "--backing-chain", "--output=json", img],
    ));
    let root = root.canonicalize().unwrap();
    info.items()
        .iter()
        .map(|e| {
            let name = e.str_field("filename").expect("filename");
            let path = cwd.join(name).canonicalize().unwrap();
            path.strip_prefix(&root).unwrap().to_path_buf()
        })
        .collect()
}

/// `qemu-img check` must exit 0 on every qcow2 image below `dir`.
fn check_all(dir: &Path) {
    for name in snapshot(dir).keys() {
        if name.extension().is_some_and(|e| e == "qcow2") {
            qemu_img(dir, &["check", "-q", name.to_str().unwrap()]);
        }
    }
}

struct Collapse<'a> {
    /// Directory (below the copy's root) to run blockgraph in.
    cwd: &'a str,
    /// Arguments after `blockgraph`.
    args: &'a [&'a str],
    /// `qemu-img` arguments doing the same, run in the copy's root.
    rebase: &'a [&'a str],
    /// The overlay whose header changes (relative to the root).
    overlay: &'a str,
    /// The image whose chain is compared (relative to the root).
    active: &'a str,
    /// Its expected chain afterwards (relative to the root), top first.
    chain: &'a [&'a str],
    /// The written name must equal qemu-img's byte for byte; otherwise it
    /// must only be relative and resolve to the same file.
    same_name: bool,
}

/// Runs a collapse on copy A of `orig` and the equivalent rebase on copy B, then
/// compares both.
fn assert_collapse_matches_rebase(orig: &Path, c: &Collapse) {
    let t = tmpdir();
    let (a, b) = (t.path().join("A"), t.path().join("B"));
    copy_dir(orig, &a);
    copy_dir(orig, &b);
    let before = snapshot(&a);
    bg_ok(&a.join(c.cwd), c.args);
    qemu_img(&b, c.rebase);

    // Metadata only: nothing but the overlay changes.
    assert_unchanged_except(&a, &before, &[c.overlay], &format!("collapse {:?}", c.args));
    check_all(&a);
    check_all(&b);

    let expected: Vec<PathBuf> = c.chain.iter().map(PathBuf::from).collect();
    assert_eq!(
        qemu_chain(&b, &b, c.active),
        expected,
        "construction: qemu-img's chain"
    );
    assert_eq!(
        qemu_chain(&a, &a, c.active),
        expected,
        "chain after blockgraph collapse {:?}",
        c.args
    );

    let (ours, ours_fmt) = qemu_backing(&a, c.overlay);
    let (theirs, theirs_fmt) = qemu_backing(&b, c.overlay);
    if c.same_name {
        assert_eq!(ours, theirs, "backing name written into {}", c.overlay);
    } else if let Some(name) = &ours {
        assert!(
            !name.starts_with('/'),
            "backing name {name:?} should be relative to the overlay's directory"
        );
    }
    assert_eq!(
        ours.is_some(),
        theirs.is_some(),
        "backing file presence in {}",
        c.overlay
    );
    assert_eq!(
        ours_fmt, theirs_fmt,
        "backing format written into {}",
        c.overlay
    );

    assert_same_bytes(
        &format!("guest data of {} after collapse vs rebase", c.active),
        &qemu_guest_data(&b, c.active),
        &qemu_guest_data(&a, c.active),
    );
    assert_convert_matches(&a, c.active);
}

#[test]
fn collapse_intermediate_matches_rebase() {
    let t = tmpdir();
    four_layer_chain(t.path(), "", "base.qcow2");
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            "base.qcow2",
            "active.qcow2",
        ],
        rebase: &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        overlay: "top.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "top.qcow2", "base.qcow2"],
        same_name: true,
    };
    assert_collapse_matches_rebase(t.path(), &c);
}

#[test]
fn collapse_two_layers_matches_rebase() {
    let t = tmpdir();
    four_layer_chain(t.path(), "", "base.qcow2");
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "top.qcow2",
            "--base",
            "base.qcow2",
            "active.qcow2",
        ],
        rebase: &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "active.qcow2",
        ],
        overlay: "active.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "base.qcow2"],
        same_name: true,
    };
    assert_collapse_matches_rebase(t.path(), &c);
}

#[test]
fn collapse_without_base_matches_rebase() {
    let t = tmpdir();
    four_layer_chain(t.path(), "", "base.qcow2");
    let c = Collapse {
        cwd: ".",
        args: &["collapse", "--top", "mid.qcow2", "active.qcow2"],
        rebase: &["rebase", "-u", "-b", "", "top.qcow2"],
        overlay: "top.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "top.qcow2"],
        same_name: true,
    };
    assert_collapse_matches_rebase(t.path(), &c);
}

#[test]
fn collapse_compat_v2_matches_rebase() {
    let t = tmpdir();
    four_layer_chain(t.path(), "compat=0.10", "base.qcow2");
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            "base.qcow2",
            "active.qcow2",
        ],
        rebase: &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        overlay: "top.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "top.qcow2", "base.qcow2"],
        same_name: true,
    };
    assert_collapse_matches_rebase(t.path(), &c);
}

#[test]
fn collapse_512_byte_clusters_matches_rebase() {
    // Cluster 0 is 512 bytes: the header, the backing format extension and a
    // 160-byte name must still fit in it.
    let t = tmpdir();
    let base = format!("base-{}.qcow2", "x".repeat(149));
    four_layer_chain(t.path(), "cluster_size=512", &base);
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            &base,
            "active.qcow2",
        ],
        rebase: &["rebase", "-u", "-b", &base, "-F", "qcow2", "top.qcow2"],
        overlay: "top.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "top.qcow2", &base],
        same_name: true,
    };
    assert_collapse_matches_rebase(t.path(), &c);
}

#[test]
fn collapse_onto_raw_base_matches_rebase() {
    let t = tmpdir();
    let d = t.path();
    fs::write(
        d.join("base.raw"),
        mixed_data(&[Fill::Text, Fill::Byte(0x11)], 512 * 1024, 1),
    )
    .unwrap();
    qcow2(d, "mid.qcow2", Some("2M"), "", Some(("base.raw", "raw")));
    qemu_io(d, "qcow2", "mid.qcow2", &["write -P 0x22 100k 100k"]);
    qcow2(d, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x33 1M 4k"]);
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            "base.raw",
            "top.qcow2",
        ],
        rebase: &["rebase", "-u", "-b", "base.raw", "-F", "raw", "top.qcow2"],
        overlay: "top.qcow2",
        active: "top.qcow2",
        chain: &["top.qcow2", "base.raw"],
        same_name: true,
    };
    assert_collapse_matches_rebase(d, &c);
}

#[test]
fn collapse_preserves_unknown_header_extensions() {
    for opts in ["", "compat=0.10"] {
        let t = tmpdir();
        let d = t.path();
        four_layer_chain(d, opts, "base.qcow2");
        let top = d.join("top.qcow2");
        let mut exts = read_header(&top).extensions;
        let unknown = (0x1234_5678, b"kept by every rewrite".to_vec());
        exts.push(unknown.clone());
        write_header_extensions(&top, &exts);
        qemu_img(d, &["check", "-q", "top.qcow2"]);
        let c = Collapse {
            cwd: ".",
            args: &[
                "collapse",
                "--top",
                "mid.qcow2",
                "--base",
                "base.qcow2",
                "active.qcow2",
            ],
            rebase: &[
                "rebase",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            overlay: "top.qcow2",
            active: "active.qcow2",
            chain: &["active.qcow2", "top.qcow2", "base.qcow2"],
            same_name: true,
        };
        assert_collapse_matches_rebase(d, &c);
    }
}

#[test]
fn collapse_relative_subdirectories() {
    let t = tmpdir();
    let d = t.path().join("orig");
    relative_chain(&d);
    // Image = top: the overlay of mid is the image itself.
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "dir2/mid.qcow2",
            "--base",
            "dir1/base.qcow2",
            "dir2/dir3/top.qcow2",
        ],
        rebase: &[
            "rebase",
            "-u",
            "-b",
            "../../dir1/base.qcow2",
            "-F",
            "qcow2",
            "dir2/dir3/top.qcow2",
        ],
        overlay: "dir2/dir3/top.qcow2",
        active: "dir2/dir3/top.qcow2",
        chain: &["dir2/dir3/top.qcow2", "dir1/base.qcow2"],
        same_name: false,
    };
    assert_collapse_matches_rebase(&d, &c);

    // A fourth layer in the root: the rewritten overlay lives in neither the
    // current directory nor the image's directory.
    qcow2(
        &d,
        "active.qcow2",
        None,
        "",
        Some(("dir2/dir3/top.qcow2", "qcow2")),
    );
    qemu_io(&d, "qcow2", "active.qcow2", &["write -P 0x77 2M 64k"]);
    let c = Collapse {
        cwd: ".",
        args: &[
            "collapse",
            "--top",
            "dir2/mid.qcow2",
            "--base",
            "dir1/base.qcow2",
            "active.qcow2",
        ],
        rebase: &[
            "rebase",
            "-u",
            "-b",
            "../../dir1/base.qcow2",
            "-F",
            "qcow2",
            "dir2/dir3/top.qcow2",
        ],
        overlay: "dir2/dir3/top.qcow2",
        active: "active.qcow2",
        chain: &["active.qcow2", "dir2/dir3/top.qcow2", "dir1/base.qcow2"],
        same_name: false,
    };
    assert_collapse_matches_rebase(&d, &c);

    // The same, run from dir2 with differently spelled paths: chain members are
    // compared canonically.
    let c = Collapse {
        cwd: "dir2",
        args: &[
            "collapse",
            "--top",
            "./mid.qcow2",
            "--base",
            "../dir1/./base.qcow2",
            "../active.qcow2",
        ],
        ..c
    };
    assert_collapse_matches_rebase(&d, &c);
}

#[test]
fn collapse_absolute_paths() {
    let t = tmpdir();
    let d = t.path().join("orig");
    relative_chain(&d);
    let t2 = tmpdir();
    let (a, b) = (t2.path().join("A"), t2.path().join("B"));
    copy_dir(&d, &a);
    copy_dir(&d, &b);
    let abs = |p: &str| a.join(p).to_str().unwrap().to_string();
    let (top, base, img) = (
        abs("dir2/mid.qcow2"),
        abs("dir1/base.qcow2"),
        abs("dir2/dir3/top.qcow2"),
    );
    bg_ok(
        Path::new("/"),
        &["collapse", "--top", &top, "--base", &base, &img],
    );
    qemu_img(
        &b,
        &[
            "rebase",
            "-u",
            "-b",
            "../../dir1/base.qcow2",
            "-F",
            "qcow2",
            "dir2/dir3/top.qcow2",
        ],
    );
    check_all(&a);
    let expected = vec![
        PathBuf::from("dir2/dir3/top.qcow2"),
        PathBuf::from("dir1/base.qcow2"),
    ];
    assert_eq!(qemu_chain(&a, &a, "dir2/dir3/top.qcow2"), expected);
    assert_same_bytes(
        "guest data after collapse with absolute paths",
        &qemu_guest_data(&b, "dir2/dir3/top.qcow2"),
        &qemu_guest_data(&a, "dir2/dir3/top.qcow2"),
    );
}

#[test]
fn collapse_active_layer_switches_to_base() {
    let t = tmpdir();
    let d = t.path();
    four_layer_chain(d, "", "base.qcow2");
    let before = snapshot(d);
    let out = bg_ok(
        d,
        &[
            "collapse",
            "--top",
            "active.qcow2",
            "--base",
            "top.qcow2",
            "active.qcow2",
        ],
    );
    assert!(
        out.contains("top.qcow2"),
        "stdout must name the new active image top.qcow2: {out:?}"
    );
    assert_unchanged(d, &before, "collapse --top active.qcow2 --base top.qcow2");
    let out = bg_ok(
        d,
        &[
            "collapse",
            "--top",
            "active.qcow2",
            "--base",
            "base.qcow2",
            "active.qcow2",
        ],
    );
    assert!(
        out.contains("base.qcow2"),
        "stdout must name the new active image base.qcow2: {out:?}"
    );
    assert_unchanged(d, &before, "collapse --top active.qcow2 --base base.qcow2");
}

#[test]
fn collapse_top_equals_base_is_a_no_op() {
    let t = tmpdir();
    let d = t.path();
    four_layer_chain(d, "", "base.qcow2");
    let before = snapshot(d);
    bg_ok(
        d,
        &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            "mid.qcow2",
            "active.qcow2",
        ],
    );
    assert_unchanged(d, &before, "collapse with top == base");
}

// ---------------------------------------------------------------------------
// 5. refused operations: exit 1, one stderr line, every file unchanged
// ---------------------------------------------------------------------------

fn assert_all_refused(d: &Path, cases: &[&[&str]]) -> Vec<String> {
    let before = snapshot(d);
    cases
        .iter()
        .map(|args| {
            let err = bg_refused(d, args);
            assert_unchanged(
                d,
                &before,
                &format!("refused `blockgraph {}`", args.join(" ")),
            );
            err
        })
        .collect()
}

#[test]
fn collapse_refuses_bad_top_and_base() {
    let t = tmpdir();
    let d = t.path();
    four_layer_chain(d, "", "base.qcow2");
    qcow2(d, "other.qcow2", Some("4M"), "", None);
    assert_all_refused(
        d,
        &[
            &[
                "collapse",
                "--top",
                "other.qcow2",
                "--base",
                "base.qcow2",
                "active.qcow2",
            ],
            &["collapse", "--top", "other.qcow2", "active.qcow2"],
            &[
                "collapse",
                "--top",
                "mid.qcow2",
                "--base",
                "other.qcow2",
                "active.qcow2",
            ],
            &[
                "collapse",
                "--top",
                "base.qcow2",
                "--base",
                "mid.qcow2",
                "active.qcow2",
            ],
            &[
                "collapse",
                "--top",
                "mid.qcow2",
                "--base",
                "top.qcow2",
                "active.qcow2",
            ],
            &[
                "collapse",
                "--top",
                "nothere.qcow2",
                "--base",
                "base.qcow2",
                "active.qcow2",
            ],
            &[
                "collapse",
                "--top",
                "mid.qcow2",
                "--base",
                "nothere.qcow2",
                "active.qcow2",
            ],
            &[
                "collapse",
                "--top",
                "mid.qcow2",
                "--base",
                "base.qcow2",
                "nothere.qcow2",
            ],
            &["info", "--output=json", "nothere.qcow2"],
            &["convert", "-O", "raw", "nothere.qcow2", "out.raw"],
            &["map", "--output=json", "nothere.qcow2"],
            &["io", "nothere.qcow2", "-c", "read 0 512"],
        ],
    );
}

#[test]
fn corrupt_headers_are_refused() {
    // (offset, bytes, what): each rejected by qemu-img too.
    let cases: [(usize, &[u8], &str); 4] = [
        (4, &[0, 0, 0, 7], "version 7"),
        (76, &[0, 0, 4, 0], "unknown incompatible feature bit 10"),
        (20, &[0, 0, 0, 22], "cluster_bits 22"),
        (16, &[0, 0, 4, 0], "backing_file_size 1024"),
    ];
    for (offset, bytes, what) in cases {
        let t = tmpdir();
        let d = t.path();
        four_layer_chain(d, "", "base.qcow2");
        patch(&d.join("active.qcow2"), offset, bytes);
        let q = run(d, QEMU_IMG, &["info", "-f", "qcow2", "active.qcow2"]);
        assert!(
            !q.status.success(),
            "construction ({what}): qemu-img must refuse it too"
        );
        assert_all_refused(
            d,
            &[
                &["info", "--output=json", "active.qcow2"],
                &["info", "--backing-chain", "--output=json", "active.qcow2"],
                &["convert", "-O", "raw", "active.qcow2", "out.raw"],
                &["map", "--output=json", "active.qcow2"],
                &["io", "active.qcow2", "-c", "read 0 512"],
                &[
                    "collapse",
                    "--top",
                    "mid.qcow2",
                    "--base",
                    "base.qcow2",
                    "active.qcow2",
                ],
            ],
        );
    }
}

#[test]
fn corrupt_backing_header_is_refused() {
    for (offset, bytes, what) in [
        (4, &b"\0\0\0\x07"[..], "version 7"),
        (0, &b"XXXX"[..], "bad magic"),
    ] {
        let t = tmpdir();
        let d = t.path();
        four_layer_chain(d, "", "base.qcow2");
        patch(&d.join("mid.qcow2"), offset, bytes);
        let q = run(
            d,
            QEMU_IMG,
            &["convert", "-O", "raw", "active.qcow2", "/dev/null"],
        );
        assert!(
            !q.status.success(),
            "construction ({what}): qemu-img must refuse the chain"
        );
        assert_all_refused(
            d,
            &[
                &["info", "--backing-chain", "--output=json", "active.qcow2"],
                &["convert", "-O", "raw", "active.qcow2", "out.raw"],
                &["map", "--output=json", "active.qcow2"],
                &["io", "active.qcow2", "-c", "read 0 512"],
                &[
                    "collapse",
                    "--top",
                    "top.qcow2",
                    "--base",
                    "base.qcow2",
                    "active.qcow2",
                ],
            ],
        );
    }
}

#[test]
fn missing_backing_file_is_refused() {
    let t = tmpdir();
    let d = t.path();
    four_layer_chain(d, "", "base.qcow2");
    fs::remove_file(d.join("base.qcow2")).unwrap();
    let errors = assert_all_refused(
        d,
        &[
            &["info", "--backing-chain", "--output=json", "active.qcow2"],
            &["convert", "-O", "raw", "active.qcow2", "out.raw"],
            &["map", "--output=json", "active.qcow2"],
            &["io", "active.qcow2", "-c", "read 0 512"],
            &[
                "collapse",
                "--top",
                "top.qcow2",
                "--base",
                "mid.qcow2",
                "active.qcow2",
            ],
        ],
    );
    for e in errors {
        assert!(
            e.contains("base.qcow2") || e.to_lowercase().contains("backing"),
            "the error should name the missing backing file: {e:?}"
        );
    }
}

#[test]
fn backing_loops_are_refused() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "a.qcow2", Some("1M"), "", None);
    qcow2(d, "b.qcow2", None, "", Some(("a.qcow2", "qcow2")));
    qemu_img(
        d,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    qcow2(d, "self.qcow2", Some("1M"), "", None);
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    let q = run(d, QEMU_IMG, &["info", "--backing-chain", "b.qcow2"]);
    assert!(
        !q.status.success(),
        "construction: qemu-img must refuse the loop"
    );
    assert_all_refused(
        d,
        &[
            &["info", "--backing-chain", "--output=json", "b.qcow2"],
            &["convert", "-O", "raw", "b.qcow2", "out.raw"],
            &["map", "--output=json", "b.qcow2"],
            &["convert", "-O", "raw", "self.qcow2", "out.raw"],
            &["collapse", "--top", "a.qcow2", "b.qcow2"],
        ],
    );
}

/// Removes the backing format header extension from a qcow2 file.
fn strip_backing_format_extension(path: &Path) {
    let mut exts = read_header(path).extensions;
    let n = exts.len();
    exts.retain(|(kind, _)| *kind != EXT_BACKING_FORMAT);
    assert_eq!(
        exts.len() + 1,
        n,
        "no backing format extension in {}",
        path.display()
    );
    write_header_extensions(path, &exts);
}

#[test]
fn missing_backing_format_is_refused() {
    for opts in ["", "compat=0.10"] {
        let t = tmpdir();
        let d = t.path();
        qcow2(d, "base.qcow2", Some("1M"), opts, None);
        qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 64k"]);
        qcow2(d, "top.qcow2", None, opts, Some(("base.qcow2", "qcow2")));
        // qemu-img 10 refuses to write a backing name without a format
        // (`rebase -u` without -F fails), so remove the extension by hand.
        strip_backing_format_extension(&d.join("top.qcow2"));
        let (name, fmt) = qemu_backing(d, "top.qcow2");
        assert_eq!(
            (name.as_deref(), fmt),
            (Some("base.qcow2"), None),
            "construction"
        );
        qemu_img(d, &["check", "-q", "top.qcow2"]);
        assert_all_refused(
            d,
            &[
                &["info", "--backing-chain", "--output=json", "top.qcow2"],
                &["convert", "-O", "raw", "top.qcow2", "out.raw"],
                &["map", "--output=json", "top.qcow2"],
                &["io", "top.qcow2", "-c", "read 0 512"],
            ],
        );
    }
}

#[test]
fn collapse_refuses_a_name_that_does_not_fit_cluster_zero() {
    // top.qcow2 has 512-byte clusters; the base's name relative to it is over
    // 400 bytes (< 1023) and does not fit next to the header: qemu-img says ENOSPC.
    let t = tmpdir();
    let d = t.path();
    let base = format!("{}/{}.qcow2", "d".repeat(200), "b".repeat(200));
    qcow2(d, &base, Some("1M"), "", None);
    qcow2(d, "mid.qcow2", None, "", Some((&base, "qcow2")));
    qcow2(
        d,
        "top.qcow2",
        None,
        "cluster_size=512",
        Some(("mid.qcow2", "qcow2")),
    );
    let copy = tmpdir();
    copy_dir(d, copy.path());
    let q = run(
        copy.path(),
        QEMU_IMG,
        &["rebase", "-u", "-b", &base, "-F", "qcow2", "top.qcow2"],
    );
    assert!(
        !q.status.success(),
        "construction: qemu-img rebase must fail with ENOSPC"
    );
    assert_all_refused(
        d,
        &[&[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            &base,
            "top.qcow2",
        ]],
    );
}

// ---------------------------------------------------------------------------
// 6. io
// ---------------------------------------------------------------------------

/// base (0x11 at 0..1M) <- mid (0x22 at 512k..768k) <- top (0x33 at 600000..600100).
fn pattern_chain(d: &Path) {
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(d, "mid.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "mid.qcow2", &["write -P 0x22 512k 256k"]);
    qcow2(d, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x33 600000 100"]);
}

#[test]
fn io_read_verifies_patterns_across_the_chain() {
    let t = tmpdir();
    let d = t.path();
    pattern_chain(d);
    let reads = [
        "read -P 0x11 0 512k",
        "read -P 17 0 1k",
        "read -P 0x22 512k 75712",
        "read -P 0x33 600000 100",
        "read -P 0x22 600100 186332",
        "read -P 0x11 768k 256k",
        "read -P 0 1M 3M",
        "read -P 0x11 1 1",
        "read 0 4M",
    ];
    // Each verified by qemu-io first, then by blockgraph one by one and all at once.
    let mut all = vec!["io", "top.qcow2"];
    for r in reads {
        qemu_io(d, "qcow2", "top.qcow2", &[r]);
        bg_ok(d, &["io", "top.qcow2", "-c", r]);
        all.extend(["-c", r]);
    }
    bg_ok(d, &all);

    let before = snapshot(d);
    for wrong in [
        "read -P 0x11 512k 64k",
        "read -P 0x22 599999 2",
        "read -P 0x33 600099 2",
        "read -P 0x10 0 1",
    ] {
        let q = run(d, QEMU_IO, &["-f", "qcow2", "-c", wrong, "top.qcow2"]);
        assert!(
            !q.status.success(),
            "construction: qemu-io must fail `{wrong}`"
        );
        bg_refused(d, &["io", "top.qcow2", "-c", wrong]);
        bg_refused(
            d,
            &["io", "top.qcow2", "-c", "read -P 0x11 0 512", "-c", wrong],
        );
    }
    assert_unchanged(d, &before, "reads");
}

#[test]
fn io_write_raw_matches_qemu_io() {
    let t = tmpdir();
    let d = t.path();
    let data = mixed_data(
        &[Fill::Random, Fill::Text, Fill::Byte(9), Fill::FewSymbols],
        256 * 1024,
        5,
    );
    fs::write(d.join("a.raw"), &data).unwrap();
    fs::write(d.join("b.raw"), &data).unwrap();
    let cmds = [
        "write -P 0x5a 1000 3000",
        "write -z 70000 5000",
        "write -P 200 512k 1k",
        "write -P 0x11 1048575 1",
        "flush",
        "read -P 0x5a 1000 3000",
    ];
    let mut args = vec!["io", "a.raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    bg_ok(d, &args);
    qemu_io(d, "raw", "b.raw", &cmds);
    assert_same_bytes(
        "raw image after blockgraph io writes",
        &fs::read(d.join("b.raw")).unwrap(),
        &fs::read(d.join("a.raw")).unwrap(),
    );
}

/// Runs one qcow2 write command through blockgraph on `a/img` and qemu-io on
/// `b/img`. Returns false when blockgraph reports the write path as unsupported
/// (then nothing may have changed).
// write path: issue 3
fn qcow2_write_matches_qemu_io(a: &Path, b: &Path, img: &str, cmd: &str) -> bool {
    let before = snapshot(a);
    let out = bg(a, &["io", img, "-c", cmd]);
    if !out.status.success() {
        let shown = render(a, BLOCKGRAPH, &["io", img, "-c", cmd], &out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{shown}");
        assert!(
            err.to_lowercase().contains("unsupported"),
            "write failed other than 'unsupported': {shown}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{shown}");
        assert_unchanged(a, &before, &format!("unsupported `{cmd}`"));
        return false;
    }
    qemu_io(b, "qcow2", img, &[cmd]);
    check_all(a);
    assert_same_bytes(
        &format!("guest data after `{cmd}` on {img}"),
        &qemu_guest_data(b, img),
        &qemu_guest_data(a, img),
    );
    true
}

// write path: issue 3
fn qcow2_writes(orig: &Path, img: &str, cmds: &[&str]) {
    let t = tmpdir();
    let (a, b) = (t.path().join("A"), t.path().join("B"));
    copy_dir(orig, &a);
    copy_dir(orig, &b);
    for cmd in cmds {
        if !qcow2_write_matches_qemu_io(&a, &b, img, cmd) {
            return;
        }
    }
    assert_convert_matches(&a, img);
}

// write path: issue 3
#[test]
fn io_write_qcow2_overlay() {
    let t = tmpdir();
    pattern_chain(t.path());
    qcow2_writes(
        t.path(),
        "top.qcow2",
        &[
            "write -P 0x77 1000 3000",
            "write -P 0x78 64k 64k",
            "write -z 128k 64k",
            "write -z 300000 1000",
            "discard 256k 64k",
            "write -P 0x79 3M 70000",
            "flush",
        ],
    );
}

// write path: issue 3
#[test]
fn io_write_qcow2_small_clusters_and_v2() {
    for opts in ["cluster_size=512", "compat=0.10"] {
        let t = tmpdir();
        let top = data_chain(t.path(), opts);
        qcow2_writes(
            t.path(),
            top,
            &[
                "write -P 0x77 1000 3000",
                "write -z 2M 64k",
                "write -P 0x78 1048000 100000",
            ],
        );
    }
}

// write path: issue 3
#[test]
fn io_write_qcow2_copies_shared_clusters() {
    // Clusters shared with an internal snapshot or compressed lack COPIED: a
    // write must copy them, leaving the snapshot intact.
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "snap.qcow2", Some("2M"), "", None);
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 0x11 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    let data = mixed_data(&[Fill::Text, Fill::FewSymbols], 512 * 1024, 11);
    fs::write(d.join("src.raw"), data).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "comp.qcow2",
        ],
    );
    fs::remove_file(d.join("src.raw")).unwrap();
    let cmds = [
        "write -P 0x22 1000 3000",
        "write -P 0x23 128k 64k",
        "write -z 256k 64k",
    ];
    qcow2_writes(d, "comp.qcow2", &cmds);

    let t2 = tmpdir();
    let (a, b) = (t2.path().join("A"), t2.path().join("B"));
    copy_dir(d, &a);
    copy_dir(d, &b);
    for cmd in cmds {
        if !qcow2_write_matches_qemu_io(&a, &b, "snap.qcow2", cmd) {
            return;
        }
    }
    let s1 = |dir: &Path| {
        let out = tmpdir();
        let raw = out.path().join("s1.raw");
        qemu_img(
            dir,
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                "snap.qcow2",
                raw.to_str().unwrap(),
            ],
        );
        fs::read(raw).unwrap()
    };
    assert_same_bytes(
        "snapshot s1 after writes to the active state",
        &s1(&b),
        &s1(&a),
    );
}
