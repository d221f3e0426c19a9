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

#[path = "../common/mod.rs"]
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
    pub(crate) fn parse(text: &str) -> Json {
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

    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn items(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            other => panic!("expected a JSON array, got {other:?}"),
        }
    }

    pub(crate) fn u64_field(&self, key: &str) -> u64 {
        match self.get(key) {
            Some(Json::Num(n)) => n
                .parse()
                .unwrap_or_else(|_| panic!("field {key:?} is not an integer in {self:?}")),
            _ => panic!("missing integer field {key:?} in {self:?}"),
        }
    }

    pub(crate) fn bool_field(&self, key: &str) -> bool {
        match self.get(key) {
            Some(Json::Bool(b)) => *b,
            _ => panic!("missing boolean field {key:?} in {self:?}"),
        }
    }

    pub(crate) fn str_field(&self, key: &str) -> Option<&str> {
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
    pub(crate) fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.i)
    }

    pub(crate) fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    pub(crate) fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    pub(crate) fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err("unknown literal"))
        }
    }

    pub(crate) fn value(&mut self) -> Result<Json, String> {
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

    pub(crate) fn string(&mut self) -> Result<String, String> {
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
const INFO_FIELDS: [&str; 9] = [
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "dirty-flag",
    "format-specific",
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
    pub(crate) fn next(&mut self) -> u64 {
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

mod collapse;
mod convert;
mod info;
mod map;
use collapse::*;
mod io;
mod refused;
