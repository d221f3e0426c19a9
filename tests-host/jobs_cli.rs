//! The block-job commands of the `blockgraph` CLI (`commit`, `stream`,
//! `snapshot`) against `qemu-img` and `qemu-io`.
//!
//! Ports of QEMU's iotests 030 (stream) and 040 (commit), commit-zero-blocks,
//! and direct comparisons with `qemu-img commit` / `qemu-img rebase`. Every
//! test builds small chains with QEMU's tools in its own temporary directory,
//! which is the current directory of every command (backing names stay
//! relative). Guest views are read with `qemu-img convert`, chains with
//! `qemu-img info --backing-chain`, allocation with `qemu-img map`, and every
//! image left in use must pass `qemu-img check`. A missing QEMU tool fails
//! the test; nothing is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

mod common;
use common::{bg_ok, copy_dir, ok, qemu_img, BLOCKGRAPH};

/// Qcow2 layouts each job runs on: small and default clusters, v2, and
/// extended L2 entries (2 KiB subclusters).
const LAYOUTS: [(&str, &str); 4] = [
    ("c512", "cluster_size=512"),
    ("c64k", "cluster_size=65536"),
    ("v2", "compat=0.10"),
    ("ext", "cluster_size=65536,extended_l2=on"),
];

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn tmpdir() -> TempDir {
    common::tmpdir("bg-jobs-")
}

/// A fresh directory `name` below `root`.
fn subdir(root: &TempDir, name: &str) -> PathBuf {
    let dir = root.path().join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// [`common::qemu_io`] with the format taken from the image name.
fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    common::qemu_io(dir, fmt_of(img), img, cmds);
}

/// A blockgraph command that must be refused ([`common::bg_refused`]: exit
/// status 1, one stderr line, no panic) and must leave every file below
/// `root` as it was: none created, removed or changed.
fn bg_refused(root: &Path, dir: &Path, args: &[&str]) {
    let before = files(root);
    let err = common::bg_refused(dir, args);
    let shown = format!(
        "`blockgraph {}` in {}: {}",
        args.join(" "),
        dir.display(),
        err.trim_end()
    );
    assert_files_unchanged(root, &before, &shown);
}

/// Asserts `-p` without a terminal printed exactly one bar line, at 100%.
fn assert_final_progress(out: &str) {
    let bars: Vec<&str> = out.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(bars.len(), 1, "one progress line expected in:\n{out}");
    assert!(bars[0].contains("100%"), "progress not at 100%:\n{out}");
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

fn fmt_of(name: &str) -> &'static str {
    if name.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    }
}

/// Creates `name` (raw or qcow2 by extension) on `backing`, then runs `io`.
fn image(dir: &Path, name: &str, size: &str, opts: &str, backing: Option<&str>, io: &[&str]) {
    if let Some(parent) = dir.join(name).parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let mut args = vec!["create", "-q", "-f", fmt_of(name)];
    if !opts.is_empty() && fmt_of(name) == "qcow2" {
        args.extend(["-o", opts]);
    }
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", fmt_of(b)]);
    }
    args.extend([name, size]);
    qemu_img(dir, &args);
    if !io.is_empty() {
        qemu_io(dir, name, io);
    }
}

/// QEMU 040's chain: base (raw, 0xab @0..512K) <- mid (0xef @512K..1M) <- top,
/// plus writes of top's own (0x22 @32K+4K, 0x11 @768K+64K).
fn chain_040(dir: &Path, opts: &str) {
    image(dir, "base.raw", "1M", "", None, &["write -P 0xab 0 512k"]);
    let mid = ["write -P 0xef 512k 512k"];
    image(dir, "mid.qcow2", "1M", opts, Some("base.raw"), &mid);
    let top = ["write -P 0x22 32k 4k", "write -P 0x11 768k 64k"];
    image(dir, "top.qcow2", "1M", opts, Some("mid.qcow2"), &top);
}

/// base.qcow2 <- mid.qcow2 <- top.qcow2, 2 MiB, with data, zeroes, discards
/// and unaligned writes in each layer.
fn chain3(dir: &Path, opts: &str) {
    image(
        dir,
        "base.qcow2",
        "2M",
        opts,
        None,
        &["write -P 0x11 0 1536k"],
    );
    let mid = [
        "write -P 0x22 64k 192k",
        "write -z 512k 128k",
        "discard 768k 64k",
        "write -P 0x23 1000000 3000",
        "write -P 0x24 1600k 64k",
    ];
    image(dir, "mid.qcow2", "2M", opts, Some("base.qcow2"), &mid);
    let top = [
        "write -P 0x33 128k 64k",
        "write -P 0x34 700k 100k",
        "write -z 1200k 64k",
    ];
    image(dir, "top.qcow2", "2M", opts, Some("mid.qcow2"), &top);
}

/// The guest view of `img` according to `qemu-img convert -O raw`.
fn view(dir: &Path, img: &str) -> Vec<u8> {
    let out = tmpdir();
    let raw = out.path().join("view.raw");
    qemu_img(dir, &["convert", "-O", "raw", img, raw.to_str().unwrap()]);
    fs::read(raw).unwrap()
}

fn assert_view(dir: &Path, img: &str, expected: &[u8], what: &str) {
    let actual = view(dir, img);
    if actual == expected {
        return;
    }
    match expected.iter().zip(&actual).position(|(a, b)| a != b) {
        Some(i) => panic!(
            "{what}: guest view of {img} differs first at byte {i:#x}: expected {:#04x}, \
             got {:#04x}",
            expected[i], actual[i]
        ),
        None => panic!(
            "{what}: guest view of {img} is {} bytes, expected {}",
            actual.len(),
            expected.len()
        ),
    }
}

/// `qemu-img check` exits 0 on every qcow2 image in `imgs`.
fn check(dir: &Path, imgs: &[&str]) {
    for img in imgs.iter().filter(|i| fmt_of(i) == "qcow2") {
        qemu_img(dir, &["check", "-q", img]);
    }
}

/// Every file below `dir` with its contents.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

fn assert_files_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    let after = files(dir);
    let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(before),
        names(&after),
        "files created or removed: {what}"
    );
    for (name, data) in before {
        assert!(
            after[name] == *data,
            "{} was modified: {what}",
            name.display()
        );
    }
}

// ---------------------------------------------------------------------------
// qemu-img info and map
// ---------------------------------------------------------------------------

/// One image of `qemu-img info --backing-chain` (human output).
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    size: u64,
    /// The backing file name as stored in the header.
    backing: Option<String>,
}

fn canonical(dir: &Path, name: &str) -> PathBuf {
    fs::canonicalize(dir.join(name))
        .unwrap_or_else(|e| panic!("{name} (in {}) does not resolve: {e}", dir.display()))
}

fn chain(dir: &Path, img: &str) -> Vec<Layer> {
    let text = qemu_img(dir, &["info", "--backing-chain", img]);
    let mut layers: Vec<Layer> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("image: ") {
            let (path, size, backing) = (canonical(dir, name), 0, None);
            layers.push(Layer {
                path,
                size,
                backing,
            });
        } else if let Some(v) = line.strip_prefix("virtual size: ") {
            let bytes = v.split('(').nth(1).and_then(|s| s.split(' ').next());
            layers.last_mut().unwrap().size = bytes.unwrap().parse().unwrap();
        } else if let Some(b) = line.strip_prefix("backing file: ") {
            let name = b.split(" (actual path: ").next().unwrap();
            layers.last_mut().unwrap().backing = Some(name.to_string());
        }
    }
    layers
}

/// `img`'s chain is exactly `expected` (names relative to `dir`), top first.
fn assert_chain(dir: &Path, img: &str, expected: &[&str]) {
    let actual: Vec<PathBuf> = chain(dir, img).into_iter().map(|l| l.path).collect();
    let expected: Vec<PathBuf> = expected.iter().map(|e| canonical(dir, e)).collect();
    assert_eq!(
        actual,
        expected,
        "backing chain of {img} (in {})",
        dir.display()
    );
}

fn virtual_size(dir: &Path, img: &str) -> u64 {
    chain(dir, img)[0].size
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug)]
struct Extent {
    start: u64,
    length: u64,
    depth: u64,
    zero: bool,
    data: bool,
}

fn map(dir: &Path, img: &str) -> Vec<Extent> {
    fn field<'a>(line: &'a str, key: &str) -> &'a str {
        let pat = format!("\"{key}\": ");
        let rest =
            &line[line.find(&pat).unwrap_or_else(|| panic!("{key} in {line}")) + pat.len()..];
        rest[..rest.find([',', '}']).unwrap()].trim()
    }
    let text = qemu_img(dir, &["map", "--output=json", img]);
    text.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| Extent {
            start: field(l, "start").parse().unwrap(),
            length: field(l, "length").parse().unwrap(),
            depth: field(l, "depth").parse().unwrap(),
            zero: field(l, "zero") == "true",
            data: field(l, "data") == "true",
        })
        .collect()
}

/// The extents of `img`'s map that overlap `start..start + len`.
fn extents_in(dir: &Path, img: &str, start: u64, len: u64) -> Vec<Extent> {
    let hits: Vec<Extent> = map(dir, img)
        .into_iter()
        .filter(|e| e.start < start + len && start < e.start + e.length)
        .collect();
    assert!(!hits.is_empty(), "{img}: map does not cover {start}+{len}");
    hits
}

/// `start..start + len` of `img` reads zero and is a zero cluster of `img`
/// itself (depth 0, zero: true, data: false).
fn assert_sparse_zero(dir: &Path, img: &str, start: u64, len: u64) {
    qemu_io(dir, img, &[&format!("read -P 0 {start} {len}")]);
    for e in extents_in(dir, img, start, len) {
        assert!(
            e.depth == 0 && e.zero && !e.data,
            "{img} {start}+{len} must be a zero range of the image itself \
             (depth 0, zero, no data), map says {e:?}"
        );
    }
}

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// 1. QEMU 040: commit
// ---------------------------------------------------------------------------

#[test]
fn commit_040_intermediate_into_raw_base() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, tag);
        chain_040(dir, opts);
        let before = view(dir, "top.qcow2");
        let out = bg_ok(
            dir,
            &[
                "commit",
                "--top",
                "mid.qcow2",
                "--base",
                "base.raw",
                "top.qcow2",
            ],
        );
        assert!(out.contains("Image committed."), "{tag}: {out}");
        qemu_io(
            dir,
            "base.raw",
            &["read -P 0xab 0 512k", "read -P 0xef 512k 512k"],
        );
        assert_chain(dir, "top.qcow2", &["top.qcow2", "base.raw"]);
        assert_eq!(
            chain(dir, "top.qcow2")[0].backing.as_deref(),
            Some("base.raw")
        );
        assert_view(dir, "top.qcow2", &before, tag);
        check(dir, &["top.qcow2"]);
    }
}

#[test]
fn commit_040_active() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, tag);
        chain_040(dir, opts);
        let before = view(dir, "top.qcow2");
        let top_file = fs::read(dir.join("top.qcow2")).unwrap();
        let out = bg_ok(dir, &["commit", "-p", "--base", "base.raw", "top.qcow2"]);
        assert!(
            out.contains("Image 'base.raw' is now the active image"),
            "{tag}: {out}"
        );
        assert_final_progress(&out);
        qemu_io(
            dir,
            "base.raw",
            &[
                "read -P 0xab 0 32k",
                "read -P 0x22 32k 4k",
                "read -P 0xab 36k 476k",
                "read -P 0xef 512k 256k",
                "read -P 0x11 768k 64k",
                "read -P 0xef 832k 192k",
            ],
        );
        assert_view(dir, "base.raw", &before, tag);
        assert!(
            fs::read(dir.join("top.qcow2")).unwrap() == top_file,
            "{tag}: an active commit must not modify top.qcow2"
        );
        check(dir, &["top.qcow2", "mid.qcow2"]);
    }
}

#[test]
fn commit_active_explicit_top_and_default_base() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        // --top IMAGE is an active commit too.
        let dir = &subdir(&root, &format!("{tag}-explicit"));
        chain_040(dir, opts);
        let before = view(dir, "top.qcow2");
        let args = [
            "commit",
            "--top",
            "top.qcow2",
            "--base",
            "mid.qcow2",
            "top.qcow2",
        ];
        let out = bg_ok(dir, &args);
        assert!(
            out.contains("Image 'mid.qcow2' is now the active image"),
            "{out}"
        );
        assert_view(dir, "mid.qcow2", &before, tag);
        assert_chain(dir, "mid.qcow2", &["mid.qcow2", "base.raw"]);
        check(dir, &["mid.qcow2", "top.qcow2"]);

        // Default base: top's backing file.
        let dir = &subdir(&root, &format!("{tag}-default"));
        chain_040(dir, opts);
        let out = bg_ok(dir, &["commit", "top.qcow2"]);
        assert!(
            out.contains("Image 'mid.qcow2' is now the active image"),
            "{out}"
        );
        assert_view(dir, "mid.qcow2", &before, tag);
        qemu_io(
            dir,
            "base.raw",
            &["read -P 0xab 0 512k", "read -P 0 512k 512k"],
        );
        check(dir, &["mid.qcow2", "top.qcow2"]);
    }
}

#[test]
fn commit_040_refused() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain_040(dir, "");
    image(
        dir,
        "other_base.qcow2",
        "1M",
        "",
        None,
        &["write -P 0x99 0 64k"],
    );
    image(dir, "other.qcow2", "1M", "", Some("other_base.qcow2"), &[]);
    image(dir, "lone.qcow2", "1M", "", None, &["write -P 0x42 0 64k"]);
    let r = root.path();
    let commit = |extra: &[&str]| {
        let mut args = vec!["commit"];
        args.extend(extra);
        args.push("top.qcow2");
        bg_refused(r, dir, &args);
    };
    // top == base
    commit(&["--top", "mid.qcow2", "--base", "mid.qcow2"]);
    commit(&["--top", "top.qcow2", "--base", "top.qcow2"]);
    // unknown top / base (missing files)
    commit(&["--top", "nonexistent.qcow2", "--base", "base.raw"]);
    commit(&["--top", "mid.qcow2", "--base", "nonexistent.qcow2"]);
    // top and base reversed
    commit(&["--top", "base.raw", "--base", "mid.qcow2"]);
    commit(&["--top", "mid.qcow2", "--base", "top.qcow2"]);
    // nodes of another chain
    commit(&["--top", "other.qcow2", "--base", "base.raw"]);
    commit(&["--top", "mid.qcow2", "--base", "other_base.qcow2"]);
    commit(&["--base", "other_base.qcow2"]);
    commit(&["--top", "lone.qcow2"]);
    // nothing to commit into
    commit(&["--top", "base.raw"]);
    bg_refused(r, dir, &["commit", "lone.qcow2"]);
    bg_refused(r, dir, &["commit", "-f", "raw", "base.raw"]);
    // unknown image, bad usage
    bg_refused(r, dir, &["commit", "nonexistent.qcow2"]);
    bg_refused(r, dir, &["commit", "--top"]);
    bg_refused(r, dir, &["commit", "-x", "top.qcow2"]);
    bg_refused(r, dir, &["commit"]);
    check(
        dir,
        &["top.qcow2", "mid.qcow2", "other.qcow2", "lone.qcow2"],
    );
}

#[test]
fn commit_matches_top_and_base_by_file() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain_040(dir, "");
    fs::create_dir(dir.join("sub")).unwrap();
    let before = view(dir, "top.qcow2");
    let args = [
        "commit",
        "--top",
        "./mid.qcow2",
        "--base",
        "sub/../base.raw",
        "top.qcow2",
    ];
    assert!(bg_ok(dir, &args).contains("Image committed."));
    assert_chain(dir, "top.qcow2", &["top.qcow2", "base.raw"]);
    assert_view(dir, "top.qcow2", &before, "spelled paths");
    qemu_io(
        dir,
        "base.raw",
        &["read -P 0xab 0 512k", "read -P 0xef 512k 512k"],
    );
    check(dir, &["top.qcow2"]);

    // From a parent directory, every name spelled differently.
    let dir = &subdir(&root, "d");
    chain_040(dir, "");
    let args = [
        "commit",
        "--top",
        "d/./mid.qcow2",
        "--base",
        "d/sub/../base.raw",
        "d/top.qcow2",
    ];
    fs::create_dir(dir.join("sub")).unwrap();
    assert!(bg_ok(root.path(), &args).contains("Image committed."));
    assert_chain(dir, "top.qcow2", &["top.qcow2", "base.raw"]);
    assert_view(dir, "top.qcow2", &before, "from the parent directory");
    check(dir, &["top.qcow2"]);
}

// ---------------------------------------------------------------------------
// 2. Commit compared with qemu-img commit
// ---------------------------------------------------------------------------

/// In copies of `orig` (a chain base.qcow2 <- mid.qcow2 <- top.qcow2 and
/// whatever lies below base), commits mid into base with blockgraph (`{tag}-a`)
/// and with `qemu-img commit` + `rebase -u` (`{tag}-b`). The bases and the
/// tops must compare identical, top keep its view, every image check clean.
/// Returns the blockgraph copy.
fn commit_like_qemu(root: &Path, orig: &Path, tag: &str) -> PathBuf {
    let before = view(orig, "top.qcow2");
    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
    let (da, db) = (&root.join(&a), &root.join(&b));
    copy_dir(orig, da);
    copy_dir(orig, db);
    let args = [
        "commit",
        "--top",
        "mid.qcow2",
        "--base",
        "base.qcow2",
        "top.qcow2",
    ];
    bg_ok(da, &args);
    qemu_img(db, &["commit", "-q", "-b", "base.qcow2", "mid.qcow2"]);
    let rebase = [
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    qemu_img(db, &rebase);
    for img in ["base.qcow2", "top.qcow2"] {
        let (ia, ib) = (format!("{a}/{img}"), format!("{b}/{img}"));
        qemu_img(root, &["compare", &ia, &ib]);
    }
    assert_eq!(chain(da, "top.qcow2")[1].path, canonical(da, "base.qcow2"));
    assert_view(da, "top.qcow2", &before, tag);
    check(da, &["top.qcow2", "base.qcow2"]);
    da.clone()
}

/// As [`commit_like_qemu`] for an active commit of top (and mid) into base
/// (`qemu-img commit -b base.qcow2 top.qcow2`).
fn active_commit_like_qemu(root: &Path, orig: &Path, tag: &str) -> PathBuf {
    let before = view(orig, "top.qcow2");
    let (a, b) = (format!("{tag}-active-a"), format!("{tag}-active-b"));
    let (da, db) = (&root.join(&a), &root.join(&b));
    copy_dir(orig, da);
    copy_dir(orig, db);
    bg_ok(da, &["commit", "--base", "base.qcow2", "top.qcow2"]);
    qemu_img(db, &["commit", "-q", "-b", "base.qcow2", "top.qcow2"]);
    let (ia, ib) = (format!("{a}/base.qcow2"), format!("{b}/base.qcow2"));
    qemu_img(root, &["compare", &ia, &ib]);
    assert_view(da, "base.qcow2", &before, tag);
    check(da, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
    da.clone()
}

#[test]
fn commit_matches_qemu_img_commit() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let orig = &subdir(&root, &format!("{tag}-orig"));
        chain3(orig, opts);
        let da = commit_like_qemu(root.path(), orig, tag);
        assert_chain(&da, "top.qcow2", &["top.qcow2", "base.qcow2"]);
        active_commit_like_qemu(root.path(), orig, tag);
    }
}

// ---------------------------------------------------------------------------
// 3. Relative backing paths (040 TestRelativePaths)
// ---------------------------------------------------------------------------

/// dir1/base.qcow2 <- dir2/mid.qcow2 <- dir2/dir3/top.qcow2, backing names
/// "../dir1/base.qcow2" and "../mid.qcow2".
fn chain_relative(dir: &Path) {
    image(
        dir,
        "dir1/base.qcow2",
        "1M",
        "",
        None,
        &["write -P 0xab 0 512k"],
    );
    let mid = ["write -P 0xef 512k 512k"];
    image(
        dir,
        "dir2/mid.qcow2",
        "1M",
        "",
        Some("../dir1/base.qcow2"),
        &mid,
    );
    let top = ["write -P 0x11 768k 64k"];
    image(
        dir,
        "dir2/dir3/top.qcow2",
        "1M",
        "",
        Some("../mid.qcow2"),
        &top,
    );
}

/// After a commit of mid into base: top -> base, relative name, same view.
fn assert_relative_committed(dir: &Path, before: &[u8]) {
    let top = "dir2/dir3/top.qcow2";
    assert_chain(dir, top, &[top, "dir1/base.qcow2"]);
    let name = chain(dir, top)[0].backing.clone().unwrap();
    assert!(
        !name.starts_with('/'),
        "backing name must stay relative: {name}"
    );
    assert_eq!(
        canonical(&dir.join("dir2/dir3"), &name),
        canonical(dir, "dir1/base.qcow2"),
        "backing name {name:?} must resolve from top's directory"
    );
    assert_view(dir, top, before, "relative paths");
    qemu_io(
        dir,
        "dir1/base.qcow2",
        &["read -P 0xab 0 512k", "read -P 0xef 512k 512k"],
    );
    check(dir, &[top, "dir1/base.qcow2"]);
}

#[test]
fn commit_relative_paths() {
    let root = tmpdir();
    let dir = &subdir(&root, "a");
    chain_relative(dir);
    let before = view(dir, "dir2/dir3/top.qcow2");
    let args = [
        "commit",
        "--top",
        "dir2/mid.qcow2",
        "--base",
        "dir1/base.qcow2",
        "dir2/dir3/top.qcow2",
    ];
    assert!(bg_ok(dir, &args).contains("Image committed."));
    assert_relative_committed(dir, &before);

    // From inside dir2, other spellings.
    let dir = &subdir(&root, "b");
    chain_relative(dir);
    let args = [
        "commit",
        "--top",
        "dir3/../mid.qcow2",
        "--base",
        "../dir1/base.qcow2",
        "./dir3/top.qcow2",
    ];
    assert!(bg_ok(&dir.join("dir2"), &args).contains("Image committed."));
    assert_relative_committed(dir, &before);

    // From inside dir3: an active commit into base.
    let dir = &subdir(&root, "c");
    chain_relative(dir);
    let args = ["commit", "--base", "../../dir1/base.qcow2", "top.qcow2"];
    bg_ok(&dir.join("dir2/dir3"), &args);
    assert_view(
        dir,
        "dir1/base.qcow2",
        &before,
        "active commit, relative paths",
    );
    check(
        dir,
        &["dir1/base.qcow2", "dir2/mid.qcow2", "dir2/dir3/top.qcow2"],
    );
}

#[test]
fn stream_relative_paths() {
    let root = tmpdir();
    let dir = &subdir(&root, "a");
    chain_relative(dir);
    let top = "dir2/dir3/top.qcow2";
    let before = view(dir, top);
    bg_ok(dir, &["stream", "--base", "dir1/./base.qcow2", top]);
    assert_chain(dir, top, &[top, "dir1/base.qcow2"]);
    let name = chain(dir, top)[0].backing.clone().unwrap();
    assert!(
        !name.starts_with('/'),
        "backing name must stay relative: {name}"
    );
    assert_view(dir, top, &before, "stream, relative paths");
    check(dir, &[top, "dir1/base.qcow2"]);

    let dir = &subdir(&root, "b");
    chain_relative(dir);
    bg_ok(&dir.join("dir2/dir3"), &["stream", "top.qcow2"]);
    assert_chain(dir, top, &[top]);
    assert_view(dir, top, &before, "full stream, relative paths");
    check(dir, &[top]);
}

// ---------------------------------------------------------------------------
// 4. Longer chains: the rewritten overlay is itself a backing file
// ---------------------------------------------------------------------------

fn chain4(dir: &Path, opts: &str) {
    image(dir, "0.qcow2", "1M", opts, None, &["write -P 0x10 0 1M"]);
    let one = ["write -P 0x11 64k 128k", "write -z 512k 64k"];
    image(dir, "1.qcow2", "1M", opts, Some("0.qcow2"), &one);
    let two = ["write -P 0x12 128k 128k", "write -P 0x22 700k 1k"];
    image(dir, "2.qcow2", "1M", opts, Some("1.qcow2"), &two);
    image(
        dir,
        "3.qcow2",
        "1M",
        opts,
        Some("2.qcow2"),
        &["write -P 0x13 192k 128k"],
    );
}

#[test]
fn commit_below_a_backing_overlay() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, &format!("{tag}-a"));
        chain4(dir, opts);
        let before = view(dir, "3.qcow2");
        let three = fs::read(dir.join("3.qcow2")).unwrap();
        let args = ["commit", "--top", "1.qcow2", "--base", "0.qcow2", "3.qcow2"];
        assert!(bg_ok(dir, &args).contains("Image committed."));
        assert_chain(dir, "3.qcow2", &["3.qcow2", "2.qcow2", "0.qcow2"]);
        assert_view(dir, "3.qcow2", &before, tag);
        assert!(
            fs::read(dir.join("3.qcow2")).unwrap() == three,
            "{tag}: 3.qcow2 is not involved and must not change"
        );
        check(dir, &["3.qcow2", "2.qcow2", "0.qcow2"]);

        // Default base (the backing file of TOP): 2 into 1.
        let dir = &subdir(&root, &format!("{tag}-b"));
        chain4(dir, opts);
        assert!(bg_ok(dir, &["commit", "--top", "2.qcow2", "3.qcow2"]).contains("committed"));
        assert_chain(dir, "3.qcow2", &["3.qcow2", "1.qcow2", "0.qcow2"]);
        assert_view(dir, "3.qcow2", &before, tag);
        check(dir, &["3.qcow2", "1.qcow2", "0.qcow2"]);

        // Two layers at once: 2 and 1 into 0.
        let dir = &subdir(&root, &format!("{tag}-c"));
        chain4(dir, opts);
        let args = ["commit", "--top", "2.qcow2", "--base", "0.qcow2", "3.qcow2"];
        bg_ok(dir, &args);
        assert_chain(dir, "3.qcow2", &["3.qcow2", "0.qcow2"]);
        assert_view(dir, "3.qcow2", &before, tag);
        check(dir, &["3.qcow2", "0.qcow2"]);
    }
}

// ---------------------------------------------------------------------------
// 5. commit-zero-blocks
// ---------------------------------------------------------------------------

/// base (0x11 everywhere) <- mid (zero write 256K+128K, discard 1M+256K)
/// <- top (0x33 @64K+64K).
fn chain_zero(dir: &Path, opts: &str) {
    image(dir, "base.qcow2", "2M", opts, None, &["write -P 0x11 0 2M"]);
    let mid = [
        "write -z 256k 128k",
        "discard 1M 256k",
        "write -z 1700000 1000",
    ];
    image(dir, "mid.qcow2", "2M", opts, Some("base.qcow2"), &mid);
    image(
        dir,
        "top.qcow2",
        "2M",
        opts,
        Some("mid.qcow2"),
        &["write -P 0x33 64k 64k"],
    );
}

#[test]
fn commit_zero_blocks_stay_sparse() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let v3 = tag != "v2";
        let dir = &subdir(&root, &format!("{tag}-intermediate"));
        chain_zero(dir, opts);
        let before = view(dir, "top.qcow2");
        let args = [
            "commit",
            "--top",
            "mid.qcow2",
            "--base",
            "base.qcow2",
            "top.qcow2",
        ];
        bg_ok(dir, &args);
        qemu_io(
            dir,
            "base.qcow2",
            &["read -P 0 256k 128k", "read -P 0 1700000 1000"],
        );
        qemu_io(
            dir,
            "base.qcow2",
            &["read -P 0x11 0 256k", "read -P 0x11 384k 640k"],
        );
        if v3 {
            // A discard with a backing file reads as zero in v3 only.
            assert_sparse_zero(dir, "base.qcow2", 256 * K, 128 * K);
            assert_sparse_zero(dir, "base.qcow2", M, 256 * K);
        }
        assert_view(dir, "top.qcow2", &before, tag);
        check(dir, &["top.qcow2", "base.qcow2"]);

        let dir = &subdir(&root, &format!("{tag}-active"));
        chain_zero(dir, opts);
        bg_ok(dir, &["commit", "--base", "base.qcow2", "top.qcow2"]);
        qemu_io(
            dir,
            "base.qcow2",
            &["read -P 0 256k 128k", "read -P 0x33 64k 64k"],
        );
        if v3 {
            assert_sparse_zero(dir, "base.qcow2", 256 * K, 128 * K);
            assert_sparse_zero(dir, "base.qcow2", M, 256 * K);
        }
        assert_view(dir, "base.qcow2", &before, tag);
        check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
    }
}

// ---------------------------------------------------------------------------
// 6. Zero-length images
// ---------------------------------------------------------------------------

#[test]
fn jobs_on_zero_length_images() {
    let root = tmpdir();
    let fresh = |name: &str| {
        let dir = subdir(&root, name);
        image(&dir, "base.qcow2", "0", "", None, &[]);
        image(&dir, "mid.qcow2", "0", "", Some("base.qcow2"), &[]);
        image(&dir, "top.qcow2", "0", "", Some("mid.qcow2"), &[]);
        dir
    };
    let dir = &fresh("commit");
    let args = [
        "commit",
        "--top",
        "mid.qcow2",
        "--base",
        "base.qcow2",
        "top.qcow2",
    ];
    bg_ok(dir, &args);
    assert_chain(dir, "top.qcow2", &["top.qcow2", "base.qcow2"]);
    check(dir, &["top.qcow2", "base.qcow2"]);

    let dir = &fresh("active");
    let out = bg_ok(dir, &["commit", "-p", "--base", "base.qcow2", "top.qcow2"]);
    assert!(
        out.contains("Image 'base.qcow2' is now the active image"),
        "{out}"
    );
    assert_final_progress(&out);
    check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);

    let dir = &fresh("stream");
    bg_ok(dir, &["stream", "-p", "top.qcow2"]);
    assert_chain(dir, "top.qcow2", &["top.qcow2"]);
    check(dir, &["top.qcow2"]);

    let dir = &fresh("partial");
    bg_ok(dir, &["stream", "--base", "base.qcow2", "top.qcow2"]);
    assert_chain(dir, "top.qcow2", &["top.qcow2", "base.qcow2"]);
    check(dir, &["top.qcow2", "base.qcow2"]);

    let dir = &fresh("snapshot");
    bg_ok(dir, &["snapshot", "top.qcow2", "new.qcow2"]);
    assert_chain(
        dir,
        "new.qcow2",
        &["new.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"],
    );
    check(dir, &["new.qcow2", "top.qcow2"]);
}

// ---------------------------------------------------------------------------
// 7. A base smaller than top grows
// ---------------------------------------------------------------------------

#[test]
fn commit_into_smaller_base() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        for base in ["base.qcow2", "base.raw"] {
            // Active: base 1M <- top 4M with data at 3M.
            let dir = &subdir(&root, &format!("{tag}-{}-active", fmt_of(base)));
            image(dir, base, "1M", opts, None, &["write -P 0xab 0 1M"]);
            let top = ["write -P 0x5a 3M 64k", "write -P 0x5b 512k 4k"];
            image(dir, "top.qcow2", "4M", opts, Some(base), &top);
            let before = view(dir, "top.qcow2");
            bg_ok(dir, &["commit", "top.qcow2"]);
            assert_eq!(virtual_size(dir, base), 4 * M, "{tag}: {base} must grow");
            let reads = [
                "read -P 0x5a 3M 64k",
                "read -P 0 1M 2M",
                "read -P 0x5b 512k 4k",
            ];
            qemu_io(dir, base, &reads);
            assert_view(dir, base, &before, tag);
            check(dir, &[base, "top.qcow2"]);

            // Intermediate: base 1M <- mid 4M (data at 3M) <- top 4M.
            let dir = &subdir(&root, &format!("{tag}-{}-intermediate", fmt_of(base)));
            image(dir, base, "1M", opts, None, &["write -P 0xab 0 1M"]);
            image(
                dir,
                "mid.qcow2",
                "4M",
                opts,
                Some(base),
                &["write -P 0x5a 3M 64k"],
            );
            image(
                dir,
                "top.qcow2",
                "4M",
                opts,
                Some("mid.qcow2"),
                &["write -P 1 0 4k"],
            );
            let before = view(dir, "top.qcow2");
            let args = ["commit", "--top", "mid.qcow2", "--base", base, "top.qcow2"];
            bg_ok(dir, &args);
            assert_eq!(virtual_size(dir, base), 4 * M, "{tag}: {base} must grow");
            qemu_io(dir, base, &["read -P 0x5a 3M 64k", "read -P 0 1M 2M"]);
            assert_chain(dir, "top.qcow2", &["top.qcow2", base]);
            assert_view(dir, "top.qcow2", &before, tag);
            check(dir, &[base, "top.qcow2"]);
        }
    }
}

// ---------------------------------------------------------------------------
// 8. QEMU 030: stream
// ---------------------------------------------------------------------------

#[test]
fn stream_full() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, tag);
        chain3(dir, opts);
        let before = view(dir, "top.qcow2");
        let out = bg_ok(dir, &["stream", "-p", "top.qcow2"]);
        assert_final_progress(&out);
        assert_chain(dir, "top.qcow2", &["top.qcow2"]);
        assert_eq!(chain(dir, "top.qcow2")[0].backing, None);
        assert_view(dir, "top.qcow2", &before, tag);
        // Everything the chain had is now in top itself.
        for e in map(dir, "top.qcow2") {
            assert!(e.depth == 0 || !e.data, "{tag}: data left below top: {e:?}");
        }
        check(dir, &["top.qcow2"]);
    }
}

#[test]
fn stream_to_direct_backing_is_a_noop() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain3(dir, "");
    let before = files(root.path());
    let out = bg_ok(dir, &["stream", "--base", "mid.qcow2", "top.qcow2"]);
    assert!(out.contains("mid.qcow2"), "{out}");
    assert_files_unchanged(root.path(), &before, "stream --base mid.qcow2 top.qcow2");
    check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
}

#[test]
fn stream_partial() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, tag);
        chain3(dir, opts);
        let before = view(dir, "top.qcow2");
        let base_file = fs::read(dir.join("base.qcow2")).unwrap();
        let out = bg_ok(dir, &["stream", "--base", "base.qcow2", "top.qcow2"]);
        assert!(out.contains("base.qcow2"), "{out}");
        assert_chain(dir, "top.qcow2", &["top.qcow2", "base.qcow2"]);
        assert_view(dir, "top.qcow2", &before, tag);
        assert!(fs::read(dir.join("base.qcow2")).unwrap() == base_file);
        // mid's data (0x22 @64K+192K, 0x24 @1600K+64K) now sits in top.
        for (start, len) in [(64 * K, 192 * K), (1600 * K, 64 * K)] {
            for e in extents_in(dir, "top.qcow2", start, len) {
                assert!(e.depth == 0 && e.data, "{tag}: {start}+{len}: {e:?}");
            }
        }
        // mid's zero write over base data reads zero, from top itself.
        if tag != "v2" {
            assert_sparse_zero(dir, "top.qcow2", 512 * K, 128 * K);
        }
        // base's own data is still read from base.
        for e in extents_in(dir, "top.qcow2", 1300 * K, 64 * K) {
            assert!(e.depth == 1 && e.data, "{tag}: base data: {e:?}");
        }
        check(dir, &["top.qcow2", "base.qcow2"]);
    }
}

#[test]
fn stream_backing_smaller_than_top() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        for base in ["base.qcow2", "base.raw"] {
            let dir = &subdir(&root, &format!("{tag}-{}", fmt_of(base)));
            image(dir, base, "1M", opts, None, &["write -P 0xab 0 1M"]);
            let top = ["write -P 0x5a 3M 64k", "write -P 0x5b 512k 4k"];
            image(dir, "top.qcow2", "4M", opts, Some(base), &top);
            let before = view(dir, "top.qcow2");
            bg_ok(dir, &["stream", "top.qcow2"]);
            assert_chain(dir, "top.qcow2", &["top.qcow2"]);
            assert_view(dir, "top.qcow2", &before, tag);
            check(dir, &["top.qcow2"]);
        }
    }
}

#[test]
fn stream_matches_qemu_img_rebase() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let (a, b) = (&format!("{tag}-a"), &format!("{tag}-b"));
        let da = &subdir(&root, a);
        chain3(da, opts);
        let db = &root.path().join(b);
        copy_dir(da, db);
        bg_ok(da, &["stream", "--base", "base.qcow2", "top.qcow2"]);
        qemu_img(
            db,
            &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        );
        let (ia, ib) = (format!("{a}/top.qcow2"), format!("{b}/top.qcow2"));
        qemu_img(root.path(), &["compare", &ia, &ib]);
        // Without its backing file, top holds the same data as qemu's.
        for dir in [da, db] {
            qemu_img(dir, &["rebase", "-u", "-b", "", "top.qcow2"]);
        }
        qemu_img(root.path(), &["compare", &ia, &ib]);
        check(da, &["top.qcow2"]);
    }
}

#[test]
fn stream_refused() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain3(dir, "");
    image(dir, "other.qcow2", "2M", "", None, &[]);
    let r = root.path();
    bg_refused(
        r,
        dir,
        &["stream", "--base", "nonexistent.qcow2", "top.qcow2"],
    );
    bg_refused(r, dir, &["stream", "--base", "other.qcow2", "top.qcow2"]);
    bg_refused(r, dir, &["stream", "--base", "top.qcow2", "top.qcow2"]);
    bg_refused(r, dir, &["stream", "nonexistent.qcow2"]);
    bg_refused(r, dir, &["stream", "--top", "mid.qcow2", "top.qcow2"]);
    bg_refused(r, dir, &["stream"]);
    check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
}

// ---------------------------------------------------------------------------
// 9. Live snapshot
// ---------------------------------------------------------------------------

#[test]
fn snapshot_adds_an_active_overlay() {
    let root = tmpdir();
    for (tag, opts) in LAYOUTS {
        let dir = &subdir(&root, tag);
        chain3(dir, opts);
        let before = view(dir, "top.qcow2");
        let top_file = fs::read(dir.join("top.qcow2")).unwrap();
        let out = bg_ok(dir, &["snapshot", "top.qcow2", "new.qcow2"]);
        assert!(out.contains("'new.qcow2' is now the active image"), "{out}");
        let expected = ["new.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"];
        assert_chain(dir, "new.qcow2", &expected);
        assert_eq!(
            chain(dir, "new.qcow2")[0].backing.as_deref(),
            Some("top.qcow2")
        );
        assert_eq!(virtual_size(dir, "new.qcow2"), 2 * M);
        check(dir, &["new.qcow2"]);
        assert!(
            fs::read(dir.join("top.qcow2")).unwrap() == top_file,
            "{tag}: snapshot must not modify top.qcow2"
        );
        assert_view(dir, "new.qcow2", &before, tag);

        bg_ok(dir, &["io", "new.qcow2", "-c", "write -P 0x77 0 64k"]);
        assert_view(dir, "top.qcow2", &before, tag);
        let mut expected = before.clone();
        expected[..64 * 1024].fill(0x77);
        assert_view(dir, "new.qcow2", &expected, tag);
        check(dir, &["new.qcow2", "top.qcow2"]);
    }
}

#[test]
fn snapshot_refused() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain3(dir, "");
    let r = root.path();
    bg_refused(r, dir, &["snapshot", "nonexistent.qcow2", "new.qcow2"]);
    bg_refused(r, dir, &["snapshot", "top.qcow2"]);
    bg_refused(r, dir, &["snapshot", "top.qcow2", "a.qcow2", "b.qcow2"]);
    check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
}

/// The new overlay may not be a file of the chain it is put on: creating it
/// would truncate an image in use (qemu-img create refuses "the same
/// filename as the backing file"; QEMU's image locking refuses the rest).
#[test]
fn snapshot_onto_a_chain_member_is_refused() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain3(dir, "");
    let r = root.path();
    for overlay in ["top.qcow2", "./top.qcow2", "mid.qcow2", "base.qcow2"] {
        bg_refused(r, dir, &["snapshot", "top.qcow2", overlay]);
    }
    check(dir, &["top.qcow2", "mid.qcow2", "base.qcow2"]);
}

// ---------------------------------------------------------------------------
// 10. Progress on a terminal
// ---------------------------------------------------------------------------

/// `-p` on a terminal redraws the bar in place (`\r`) and shows a rate.
/// The terminal is a pty from util-linux `script`.
#[test]
fn progress_bar_on_a_terminal() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    chain3(dir, "");
    let line = format!("{BLOCKGRAPH} commit -p --top mid.qcow2 top.qcow2");
    let out = ok(dir, "script", &["-qec", &line, "/dev/null"]);
    assert!(out.contains("Image committed."), "{out:?}");
    assert!(out.contains("100%"), "{out:?}");
    assert!(
        out.contains("\r["),
        "on a terminal the bar must be redrawn in place with \\r: {out:?}"
    );
    assert!(
        out.contains("/s"),
        "on a terminal the bar shows a rate: {out:?}"
    );
}

// ---------------------------------------------------------------------------
// 11. Unusual layouts (against qemu-img) and snapshot paths
// ---------------------------------------------------------------------------

/// Cluster sizes differ per layer: zero writes and discards of 512-byte
/// clusters land inside 64 KiB clusters of base that hold data.
#[test]
fn commit_mixed_cluster_sizes() {
    let root = tmpdir();
    let orig = &subdir(&root, "orig");
    let base = ["write -P 0x11 0 2M"];
    image(orig, "base.qcow2", "2M", "cluster_size=65536", None, &base);
    let mid = [
        "write -P 0x22 1000 3000",
        "write -z 70000 512",
        "write -z 128k 64k",
        "discard 256k 512",
        "write -P 0x23 1M 512",
        "write -P 0x24 1999k 1k",
    ];
    let backing = Some("base.qcow2");
    image(orig, "mid.qcow2", "2M", "cluster_size=512", backing, &mid);
    let top = ["write -P 0x33 0 4k", "write -z 300k 8k"];
    let backing = Some("mid.qcow2");
    image(orig, "top.qcow2", "2M", "cluster_size=4096", backing, &top);
    let da = commit_like_qemu(root.path(), orig, "mixed");
    // Not necessarily sparse: mid's zero run is reported per 512-byte-cluster
    // L2 table (32 KiB), less than a base cluster (as in QEMU).
    let reads = [
        "read -P 0 128k 64k",
        "read -P 0 70000 512",
        "read -P 0x11 70512 1000",
    ];
    qemu_io(&da, "base.qcow2", &reads);
    active_commit_like_qemu(root.path(), orig, "mixed");
}

/// Base has compressed clusters and an internal snapshot: every cluster a
/// commit writes must be copied, the snapshot keeps its data.
#[test]
fn commit_into_compressed_base_with_internal_snapshot() {
    let root = tmpdir();
    let orig = &subdir(&root, "orig");
    image(orig, "src.raw", "1M", "", None, &["write -P 0x11 0 512k"]);
    let convert = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "src.raw",
        "base.qcow2",
    ];
    qemu_img(orig, &convert);
    fs::remove_file(orig.join("src.raw")).unwrap();
    qemu_img(orig, &["snapshot", "-c", "s1", "base.qcow2"]);
    let snap = |dir: &Path| {
        let out = tmpdir();
        let raw = out.path().join("s1.raw");
        let args = [
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            "base.qcow2",
        ];
        qemu_img(dir, &[&args[..], &[raw.to_str().unwrap()]].concat());
        fs::read(raw).unwrap()
    };
    let s1 = snap(orig);
    let mid = [
        "write -P 0x22 1000 3000",
        "write -z 8k 8k",
        "write -P 0x23 100k 100",
        "write -P 0x24 600k 64k",
    ];
    image(orig, "mid.qcow2", "1M", "", Some("base.qcow2"), &mid);
    image(
        orig,
        "top.qcow2",
        "1M",
        "",
        Some("mid.qcow2"),
        &["write -P 0x33 0 4k"],
    );
    for dir in [
        commit_like_qemu(root.path(), orig, "compressed"),
        active_commit_like_qemu(root.path(), orig, "compressed"),
    ] {
        assert!(snap(&dir) == s1, "internal snapshot s1 of base changed");
    }
}

/// A v2 base that has a backing file cannot hold zero clusters: zeroes
/// committed from a v3 mid over data of base's backing must be written.
#[test]
fn commit_zeroes_into_v2_base_with_backing() {
    let root = tmpdir();
    let orig = &subdir(&root, "orig");
    image(orig, "b0.qcow2", "2M", "", None, &["write -P 0x11 0 2M"]);
    let base = ["write -P 0x44 512k 64k"];
    image(
        orig,
        "base.qcow2",
        "2M",
        "compat=0.10",
        Some("b0.qcow2"),
        &base,
    );
    let mid = ["write -z 0 128k", "discard 1M 128k", "write -z 520k 4k"];
    image(orig, "mid.qcow2", "2M", "", Some("base.qcow2"), &mid);
    image(
        orig,
        "top.qcow2",
        "2M",
        "",
        Some("mid.qcow2"),
        &["write -P 0x33 4k 4k"],
    );
    let da = commit_like_qemu(root.path(), orig, "v2base");
    let reads = ["read -P 0 0 128k", "read -P 0 1M 128k", "read -P 0 520k 4k"];
    qemu_io(&da, "base.qcow2", &reads);
    assert_chain(&da, "top.qcow2", &["top.qcow2", "base.qcow2", "b0.qcow2"]);
    active_commit_like_qemu(root.path(), orig, "v2base");
}

/// Base with 1-bit refcounts and 512-byte clusters.
#[test]
fn commit_into_base_with_one_bit_refcounts() {
    let root = tmpdir();
    let orig = &subdir(&root, "orig");
    let opts = "cluster_size=512,refcount_bits=1";
    image(
        orig,
        "base.qcow2",
        "1M",
        opts,
        None,
        &["write -P 0x11 0 256k"],
    );
    let mid = ["write -P 0x22 200k 200k", "write -z 0 64k"];
    image(orig, "mid.qcow2", "1M", "", Some("base.qcow2"), &mid);
    image(
        orig,
        "top.qcow2",
        "1M",
        "",
        Some("mid.qcow2"),
        &["write -P 0x33 0 1k"],
    );
    commit_like_qemu(root.path(), orig, "refcount1");
    active_commit_like_qemu(root.path(), orig, "refcount1");
}

/// A v2 top cannot hold zero clusters: zeroes streamed from a v3 mid over
/// data of base must be written into top.
#[test]
fn stream_zeroes_into_v2_top() {
    let root = tmpdir();
    let dir = &subdir(&root, "c");
    image(dir, "base.qcow2", "2M", "", None, &["write -P 0x11 0 2M"]);
    let mid = [
        "write -z 0 128k",
        "discard 1M 128k",
        "write -P 0x22 300k 5k",
    ];
    image(dir, "mid.qcow2", "2M", "", Some("base.qcow2"), &mid);
    let top = ["write -P 0x33 4k 4k"];
    image(
        dir,
        "top.qcow2",
        "2M",
        "compat=0.10",
        Some("mid.qcow2"),
        &top,
    );
    let before = view(dir, "top.qcow2");
    bg_ok(dir, &["stream", "--base", "base.qcow2", "top.qcow2"]);
    assert_chain(dir, "top.qcow2", &["top.qcow2", "base.qcow2"]);
    assert_view(dir, "top.qcow2", &before, "v2 top");
    check(dir, &["top.qcow2", "base.qcow2"]);
}

/// The new overlay's backing name is relative to the overlay's directory.
#[test]
fn snapshot_relative_paths() {
    let root = tmpdir();
    let dir = root.path();
    image(dir, "a/top.qcow2", "1M", "", None, &["write -P 0x11 0 64k"]);
    let before = view(dir, "a/top.qcow2");
    bg_ok(dir, &["snapshot", "a/top.qcow2", "a/new.qcow2"]);
    assert_chain(dir, "a/new.qcow2", &["a/new.qcow2", "a/top.qcow2"]);
    fs::create_dir(dir.join("b")).unwrap();
    bg_ok(dir, &["snapshot", "a/new.qcow2", "b/new2.qcow2"]);
    let expected = ["b/new2.qcow2", "a/new.qcow2", "a/top.qcow2"];
    assert_chain(dir, "b/new2.qcow2", &expected);
    bg_ok(&dir.join("b"), &["snapshot", "new2.qcow2", "../new3.qcow2"]);
    let expected = ["new3.qcow2", "b/new2.qcow2", "a/new.qcow2", "a/top.qcow2"];
    assert_chain(dir, "new3.qcow2", &expected);
    for img in ["new3.qcow2", "b/new2.qcow2", "a/new.qcow2"] {
        let name = chain(dir, img)[0].backing.clone().unwrap();
        assert!(
            !name.starts_with('/'),
            "{img}: backing name {name} is absolute"
        );
    }
    assert_view(dir, "new3.qcow2", &before, "snapshots");
    check(
        dir,
        &["new3.qcow2", "b/new2.qcow2", "a/new.qcow2", "a/top.qcow2"],
    );
}

/// A script command that opens an image afresh sees what earlier commands
/// wrote through an attached node of the same file, even though those
/// writes' table updates are still cached (the open writes them back
/// first); and the disk holds it all after the script.
#[test]
fn script_reopening_an_image_sees_the_writes_of_its_attached_node() {
    let t = tmpdir();
    let d = t.path();
    image(d, "base.qcow2", "16M", "", None, &["write -P 0x11 0 1M"]);
    image(
        d,
        "top.qcow2",
        "16M",
        "",
        Some("base.qcow2"),
        &["write -P 0x22 1M 3M"],
    );
    let out = bg_ok(
        d,
        &[
            "script",
            "job-start commit top.qcow2; job-step top.qcow2 1000; \
             io top.qcow2 -c \"write -P 0x46 100k 5000\"; job-complete top.qcow2; \
             job-wait top.qcow2; io top.qcow2 -c \"write -P 0x48 12M 1M\"; \
             checksum top.qcow2; checksum base.qcow2",
        ],
    );
    let sums: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("checksum "))
        .filter_map(|l| l.split(": ").nth(1))
        .collect();
    assert_eq!(sums.len(), 2, "{out}");
    assert_eq!(sums[0], sums[1], "the pivoted active layer is base: {out}");
    let after = bg_ok(d, &["checksum", "base.qcow2"]);
    assert!(
        after.contains(sums[1]),
        "on disk after the script: {after}\nin it: {out}"
    );
    let data = view(d, "base.qcow2");
    assert!(data[100 * 1024..100 * 1024 + 5000]
        .iter()
        .all(|&b| b == 0x46));
    assert!(data[12 << 20..13 << 20].iter().all(|&b| b == 0x48));
    check(d, &["base.qcow2"]);
}
