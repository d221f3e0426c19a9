//! Oracle tests for `blockgraph create`: images it creates must satisfy the real
//! `qemu-img` and `qemu-io`.
//!
//! Each test works in its own temporary directory (the current directory of every
//! command, so backing names stay relative). For every created qcow2 image:
//! `qemu-img check` exits 0; `qemu-img info --output=json` reports the requested
//! virtual size, cluster size, compat level, refcount width, lazy refcounts and
//! backing reference; `qemu-io` can write and read back 64 KiB; `qemu-img check`
//! still exits 0 afterwards; and `blockgraph info`/`convert` read the result like
//! `qemu-img`. Refused option sets exit 1 and leave no image behind. A missing QEMU
//! tool fails the test: nothing here is ever skipped.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tempfile::TempDir;

mod common;
use common::{bg_ok, bg_refused, qemu_img, qemu_io};

// ---------------------------------------------------------------------------
// Helpers: commands
// ---------------------------------------------------------------------------

fn tmpdir() -> TempDir {
    common::tmpdir("bg-create-")
}

/// `qemu-img check` must exit 0 (no corruption, no leak).
fn check(dir: &Path, img: &str) {
    qemu_img(dir, &["check", "-f", "qcow2", img]);
}

/// Writes and reads back 64 KiB of 0x5a at offset 0 with qemu-io.
fn qemu_io_write_read(dir: &Path, img: &str) {
    let out = qemu_io(
        dir,
        "qcow2",
        img,
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    assert!(
        out.contains("wrote 65536/65536") && out.contains("read 65536/65536"),
        "qemu-io on {img}: {out}"
    );
}

// ---------------------------------------------------------------------------
// Helpers: a small JSON reader (qemu-img's output shapes)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(i128),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing text after JSON: {text}");
        v
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn at(&self, path: &[&str]) -> &Json {
        path.iter().fold(self, |v, key| {
            v.get(key)
                .unwrap_or_else(|| panic!("no field {path:?} in {self:?}"))
        })
    }

    fn num(&self, path: &[&str]) -> i128 {
        match self.at(path) {
            Json::Num(n) => *n,
            other => panic!("{path:?} is not a number: {other:?}"),
        }
    }

    fn str(&self, path: &[&str]) -> &str {
        match self.at(path) {
            Json::Str(s) => s,
            other => panic!("{path:?} is not a string: {other:?}"),
        }
    }

    fn bool(&self, path: &[&str]) -> bool {
        match self.at(path) {
            Json::Bool(b) => *b,
            other => panic!("{path:?} is not a boolean: {other:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.s.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                if !self.eat(b'}') {
                    loop {
                        self.ws();
                        let key = self.string();
                        assert!(self.eat(b':'), "':' expected at {}", self.i);
                        fields.push((key, self.value()));
                        if self.eat(b'}') {
                            break;
                        }
                        assert!(self.eat(b','), "',' expected at {}", self.i);
                    }
                }
                Json::Obj(fields)
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.value());
                        if self.eat(b']') {
                            break;
                        }
                        assert!(self.eat(b','), "',' expected at {}", self.i);
                    }
                }
                Json::Arr(items)
            }
            b'"' => Json::Str(self.string()),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'0'..=b'9') {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(
                    text.parse()
                        .unwrap_or_else(|_| panic!("bad number at {start}")),
                )
            }
        }
    }

    fn word(&mut self, word: &str, v: Json) -> Json {
        assert!(
            self.s[self.i..].starts_with(word.as_bytes()),
            "bad literal at {}",
            self.i
        );
        self.i += word.len();
        v
    }

    fn string(&mut self) -> String {
        assert_eq!(self.s[self.i], b'"', "string expected at {}", self.i);
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            let c = char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap();
                            self.i += 4;
                            out.extend(c.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).unwrap()
    }
}

// ---------------------------------------------------------------------------
// Helpers: what an image must look like
// ---------------------------------------------------------------------------

/// What `qemu-img info` must report for a created qcow2 image.
#[derive(Clone, Copy, Debug)]
struct Expect<'a> {
    size: u64,
    cluster_size: u64,
    compat: &'a str,
    refcount_bits: u64,
    lazy_refcounts: bool,
    extended_l2: bool,
    backing: Option<(&'a str, &'a str)>,
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Self {
            size: 1 << 20,
            cluster_size: 65536,
            compat: "1.1",
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            backing: None,
        }
    }
}

fn assert_qemu_info(dir: &Path, img: &str, expect: &Expect<'_>) {
    let info = Json::parse(&qemu_img(dir, &["info", "--output=json", img]));
    let what = format!("qemu-img info {img} ({expect:?})");
    assert_eq!(info.str(&["format"]), "qcow2", "{what}");
    assert_eq!(info.num(&["virtual-size"]), expect.size.into(), "{what}");
    assert_eq!(
        info.num(&["cluster-size"]),
        expect.cluster_size.into(),
        "{what}"
    );
    let data = ["format-specific", "data"];
    let field = |name: &'static str| [data[0], data[1], name];
    assert_eq!(info.str(&field("compat")), expect.compat, "{what}");
    assert_eq!(
        info.num(&field("refcount-bits")),
        expect.refcount_bits.into(),
        "{what}"
    );
    if expect.compat == "1.1" {
        assert_eq!(
            info.bool(&field("lazy-refcounts")),
            expect.lazy_refcounts,
            "{what}"
        );
        assert_eq!(
            info.bool(&field("extended-l2")),
            expect.extended_l2,
            "{what}"
        );
    }
    assert!(!info.bool(&["dirty-flag"]), "{what}");
    match expect.backing {
        Some((name, format)) => {
            assert_eq!(info.str(&["backing-filename"]), name, "{what}");
            assert_eq!(info.str(&["backing-filename-format"]), format, "{what}");
        }
        None => assert_eq!(info.get("backing-filename"), None, "{what}"),
    }
}

/// The full oracle run on a freshly created qcow2 image: check, info, blockgraph
/// info and convert (compared with qemu-img convert), qemu-io write + read, check
/// again and convert again.
fn assert_image(dir: &Path, img: &str, expect: &Expect<'_>) {
    check(dir, img);
    assert_qemu_info(dir, img, expect);
    assert_blockgraph_reads(dir, img, expect);
    if expect.size >= 65536 {
        qemu_io_write_read(dir, img);
        check(dir, img);
        assert_blockgraph_reads(dir, img, expect);
    }
}

/// `blockgraph info` agrees with what was requested, and `blockgraph convert`
/// gives qemu-img's guest view (compared in full up to 1 GiB; beyond that the
/// length, the first 128 KiB and sparseness).
fn assert_blockgraph_reads(dir: &Path, img: &str, expect: &Expect<'_>) {
    let info = Json::parse(&bg_ok(dir, &["info", "--output=json", img]));
    let what = format!("blockgraph info {img}");
    assert_eq!(info.num(&["virtual-size"]), expect.size.into(), "{what}");
    assert_eq!(
        info.num(&["cluster-size"]),
        expect.cluster_size.into(),
        "{what}"
    );
    match expect.backing {
        Some((name, format)) => {
            assert_eq!(info.str(&["backing-filename"]), name, "{what}");
            assert_eq!(info.str(&["backing-filename-format"]), format, "{what}");
        }
        None => assert_eq!(info.get("backing-filename"), None, "{what}"),
    }

    let ours = format!("{img}.bg.raw");
    let theirs = format!("{img}.qemu.raw");
    bg_ok(dir, &["convert", "-O", "raw", img, &ours]);
    qemu_img(dir, &["convert", "-O", "raw", img, &theirs]);
    let (ours, theirs) = (dir.join(ours), dir.join(theirs));
    let len = fs::metadata(&ours).unwrap().len();
    assert_eq!(len, expect.size, "convert {img}: output length");
    if expect.size <= 1 << 30 {
        assert!(
            fs::read(&ours).unwrap() == fs::read(&theirs).unwrap(),
            "convert {img}: blockgraph and qemu-img outputs differ"
        );
    } else {
        use std::io::Read;
        let head = |path: &Path| {
            let mut buf = vec![0u8; 128 << 10];
            fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
            buf
        };
        assert!(head(&ours) == head(&theirs), "convert {img}: heads differ");
        let blocks = fs::metadata(&ours).unwrap().blocks();
        assert!(blocks * 512 < 64 << 20, "convert {img}: output not sparse");
    }
    fs::remove_file(ours).unwrap();
    fs::remove_file(theirs).unwrap();
}

fn create(dir: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend(args);
    bg_ok(dir, &all);
}

// ---------------------------------------------------------------------------
// 1. Cluster sizes, refcount widths, compat levels, sizes
// ---------------------------------------------------------------------------

#[test]
fn every_cluster_size_with_every_refcount_width() {
    let d = tmpdir();
    for (cluster, cluster_size) in [("512", 512), ("4k", 4096), ("64k", 65536), ("2M", 2 << 20)] {
        for refcount_bits in [1u64, 2, 4, 8, 16, 32, 64] {
            let img = format!("c{cluster}-r{refcount_bits}.qcow2");
            let opts = format!("cluster_size={cluster},refcount_bits={refcount_bits}");
            create(d.path(), &["-o", &opts, &img, "1M"]);
            let expect = Expect {
                cluster_size,
                refcount_bits,
                ..Expect::default()
            };
            assert_image(d.path(), &img, &expect);
        }
    }
}

/// `extended_l2=on` for every cluster size it allows (16 KiB to 2 MiB),
/// with a backing file and with an odd size: qemu-img reads and writes
/// what blockgraph made, and blockgraph's writes (subcluster by
/// subcluster) read back in qemu-io.
#[test]
fn extended_l2_for_every_cluster_size() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]);
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x61 0 3M"]);
    for (cluster, cluster_size) in [
        ("16k", 16384),
        ("64k", 65536),
        ("128k", 131072),
        ("2M", 2 << 20),
    ] {
        let img = format!("ext-{cluster}.qcow2");
        let opts = format!("extended_l2=on,cluster_size={cluster}");
        create(dir, &["-o", &opts, &img, "1M"]);
        let expect = Expect {
            cluster_size,
            extended_l2: true,
            ..Expect::default()
        };
        assert_image(dir, &img, &expect);

        let over = format!("ext-{cluster}-over.qcow2");
        create(
            dir,
            &[
                "-o",
                &opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &over,
                "3000k",
            ],
        );
        // One subcluster's worth inside the first cluster, across two
        // clusters, and zeros in the middle of a written stretch.
        bg_ok(dir, &["io", "-c", "write -P 0x62 1000 3000", &over]);
        bg_ok(dir, &["io", "-c", "write -P 0x63 250k 100k", &over]);
        bg_ok(dir, &["io", "-c", "write -z 260k 30k", &over]);
        check(dir, &over);
        let out = qemu_io(
            dir,
            "qcow2",
            &over,
            &[
                "read -P 0x61 0 1000",
                "read -P 0x62 1000 3000",
                "read -P 0x61 4000 246000",
                "read -P 0x63 250k 10k",
                "read -P 0 260k 30k",
                "read -P 0x63 290k 60k",
                "read -P 0x61 350k 2650k",
            ],
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{over}: {out}"
        );
        let expect = Expect {
            size: 3000 * 1024,
            cluster_size,
            extended_l2: true,
            backing: Some(("base.qcow2", "qcow2")),
            ..Expect::default()
        };
        assert_image(dir, &over, &expect);
    }
}

#[test]
fn compat_levels_and_lazy_refcounts() {
    let d = tmpdir();
    create(d.path(), &["-o", "compat=0.10", "v2.qcow2", "1M"]);
    assert_image(
        d.path(),
        "v2.qcow2",
        &Expect {
            compat: "0.10",
            ..Expect::default()
        },
    );
    create(d.path(), &["-o", "compat=1.1", "v3.qcow2", "1M"]);
    assert_image(d.path(), "v3.qcow2", &Expect::default());
    create(
        d.path(),
        &["-o", "compat=1.1,lazy_refcounts=on", "lazy.qcow2", "1M"],
    );
    assert_image(
        d.path(),
        "lazy.qcow2",
        &Expect {
            lazy_refcounts: true,
            ..Expect::default()
        },
    );
    // Two -o words combine, as with qemu-img.
    create(
        d.path(),
        &[
            "-o",
            "lazy_refcounts=on",
            "-o",
            "cluster_size=4k",
            "both.qcow2",
            "1M",
        ],
    );
    assert_image(
        d.path(),
        "both.qcow2",
        &Expect {
            lazy_refcounts: true,
            cluster_size: 4096,
            ..Expect::default()
        },
    );
}

#[test]
fn sizes_from_zero_to_a_sparse_100g() {
    let d = tmpdir();
    for (word, size) in [
        ("0", 0u64),
        ("1M", 1 << 20),
        ("1G", 1 << 30),
        ("100G", 100 << 30),
    ] {
        let img = format!("s{word}.qcow2");
        create(d.path(), &[&img, word]);
        let expect = Expect {
            size,
            ..Expect::default()
        };
        assert_image(d.path(), &img, &expect);
        let file = fs::metadata(d.path().join(&img)).unwrap();
        assert!(file.len() < 1 << 20, "{img}: {} bytes", file.len());
    }
    // 512-byte clusters map at most 128 GiB (a 32 MiB L1 table) and the
    // 100G image's L1 table then fills 25 MiB of clusters.
    create(d.path(), &["-o", "cluster_size=512", "small.qcow2", "100G"]);
    assert_image(
        d.path(),
        "small.qcow2",
        &Expect {
            size: 100 << 30,
            cluster_size: 512,
            ..Expect::default()
        },
    );
    // As qemu-img: a size is rounded up to whole 512-byte sectors.
    create(d.path(), &["odd.qcow2", "1000"]);
    assert_qemu_info(
        d.path(),
        "odd.qcow2",
        &Expect {
            size: 1024,
            ..Expect::default()
        },
    );
    check(d.path(), "odd.qcow2");
}

#[test]
fn raw_images() {
    let d = tmpdir();
    bg_ok(d.path(), &["create", "-q", "-f", "raw", "a.raw", "1M"]);
    assert_eq!(fs::metadata(d.path().join("a.raw")).unwrap().len(), 1 << 20);
    let info = Json::parse(&qemu_img(d.path(), &["info", "--output=json", "a.raw"]));
    assert_eq!(info.str(&["format"]), "raw");
    assert_eq!(info.num(&["virtual-size"]), 1 << 20);
    // The default format is raw, as with qemu-img.
    bg_ok(d.path(), &["create", "-q", "b.raw", "64k"]);
    assert_eq!(fs::metadata(d.path().join("b.raw")).unwrap().len(), 65536);
}

// ---------------------------------------------------------------------------
// 2. Backing files
// ---------------------------------------------------------------------------

#[test]
fn backing_reference_is_stored_as_given_and_resolved_from_the_image() {
    let d = tmpdir();
    let dir = d.path();
    fs::create_dir(dir.join("sub")).unwrap();
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "sub/base.qcow2", "3M"],
    );
    qemu_io(dir, "qcow2", "sub/base.qcow2", &["write -P 0x11 1M 256k"]);
    qemu_img(dir, &["create", "-q", "-f", "raw", "sub/base.raw", "2M"]);

    // No SIZE: the backing image's size, found relative to the new image.
    create(dir, &["-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2"]);
    let expect = Expect {
        size: 3 << 20,
        backing: Some(("base.qcow2", "qcow2")),
        ..Expect::default()
    };
    assert_image(dir, "sub/top.qcow2", &expect);
    // The base's data shows through the overlay (past the 64k qemu-io wrote).
    qemu_io(dir, "qcow2", "sub/top.qcow2", &["read -P 0x11 1M 256k"]);

    // An explicit SIZE wins; options and a raw backing file.
    create(
        dir,
        &[
            "-o",
            "cluster_size=4k,refcount_bits=8",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/over-raw.qcow2",
            "5M",
        ],
    );
    assert_image(
        dir,
        "sub/over-raw.qcow2",
        &Expect {
            size: 5 << 20,
            cluster_size: 4096,
            refcount_bits: 8,
            backing: Some(("base.raw", "raw")),
            ..Expect::default()
        },
    );

    // compat=0.10 keeps the backing format extension too.
    create(
        dir,
        &[
            "-o",
            "compat=0.10",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "sub/v2.qcow2",
        ],
    );
    assert_image(
        dir,
        "sub/v2.qcow2",
        &Expect {
            size: 3 << 20,
            compat: "0.10",
            backing: Some(("top.qcow2", "qcow2")),
            ..Expect::default()
        },
    );
}

// ---------------------------------------------------------------------------
// 3. Refusals
// ---------------------------------------------------------------------------

#[test]
fn bad_options_exit_1_and_create_nothing() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    let long = "b".repeat(2000);
    let not_in_512 = "c".repeat(500);
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "-o", "cluster_size=1000", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "cluster_size=256", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "cluster_size=4M", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "refcount_bits=3", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "refcount_bits=128", "new.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "new.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "new.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "compat=2", "new.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "new.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,compat=0.10",
            "new.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "extended_l2=maybe", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "preallocation=full", "new.qcow2", "1M"],
        &["-f", "qcow2", "-b", &long, "-F", "qcow2", "new.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            &not_in_512,
            "-F",
            "qcow2",
            "new.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-b", "base.qcow2", "new.qcow2", "1M"],
        &["-f", "qcow2", "-F", "qcow2", "new.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "vmdk", "new.qcow2"],
        &["-f", "qcow2", "new.qcow2"],
        &["-f", "qcow2", "-o", "cluster_size=512", "new.qcow2", "129G"],
        &["-f", "qcow2", "new.qcow2", "1X"],
        &["-f", "vmdk", "new.qcow2", "1M"],
        &["-f", "raw", "-o", "cluster_size=4k", "new.qcow2", "1M"],
        &[
            "-f",
            "raw",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
            "1M",
        ],
    ];
    for args in cases {
        let mut all = vec!["create"];
        all.extend(*args);
        bg_refused(dir, &all);
        assert!(
            !dir.join("new.qcow2").exists(),
            "{:?} left an image behind",
            &args[..args.len().min(6)]
        );
    }
    // An image cannot be its own backing file (it would be truncated).
    let before = fs::read(dir.join("base.qcow2")).unwrap();
    bg_refused(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "base.qcow2",
        ],
    );
    assert!(fs::read(dir.join("base.qcow2")).unwrap() == before);
}
