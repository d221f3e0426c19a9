//! External data files (`data_file=`, `data_file_raw=`) against qemu-img
//! and qemu-io.
//!
//! 1. **Differential.** Images made by qemu-img with a data file (plain,
//!    over a qcow2 backing file, raw, with extended L2 entries) are copied
//!    to `A` and `B`; the same seeded batches of qemu-io commands (writes,
//!    `write -z`, discards, flushes, at any alignment) run on `A` with
//!    qemu-io and on `B` with `blockgraph io` (every other batch through the
//!    request engine, `-d 16`). After every batch both guest views must be
//!    equal, both data files equal byte for byte, and `qemu-img check`
//!    clean on `B`. Each tool runs in its image's directory: qemu-img
//!    resolves a data file name from its working directory, blockgraph
//!    from the image's.
//! 2. **Create.** `blockgraph create -o data_file=...` (and
//!    `data_file_raw=on`) makes images qemu-img reads, checks and reports
//!    as it reports its own.
//! 3. **Refusals.** Bad option combinations, a data file outside the
//!    image's directory, internal snapshots and convert outputs with a
//!    data file: refused with exit 1, nothing written.
//!
//! A missing qemu-img or qemu-io fails these tests; it never skips them.

use std::fs;
use std::path::Path;

mod common;
use common::{bg, bg_ok, bg_refused, copy_dir, qemu_img, qemu_io, Rng};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const IMG: &str = "img.qcow2";
const DATA: &str = "data.raw";

/// The guest view of `img` in `dir`, as qemu-img converts it (run there,
/// so the data file resolves).
fn view(dir: &Path, img: &str) -> Vec<u8> {
    qemu_img(dir, &["convert", "-O", "raw", img, "view.raw"]);
    let bytes = fs::read(dir.join("view.raw")).unwrap();
    fs::remove_file(dir.join("view.raw")).unwrap();
    bytes
}

/// One seeded batch of qemu-io commands over an image of `size` bytes.
fn batch(rng: &mut Rng, size: u64, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let len = 1 + rng.below(200 * KIB).min(size - 1);
            let off = match rng.below(3) {
                // Cluster aligned, or anywhere.
                0 => rng.below(size / (64 * KIB)) * 64 * KIB,
                _ => rng.below(size),
            };
            let len = len.min(size - off).max(1);
            match rng.below(10) {
                0..=5 => format!("write -P 0x{:02x} {off} {len}", 1 + rng.below(254)),
                6 | 7 => format!("write -z {off} {len}"),
                8 => format!("discard {off} {len}"),
                _ => "flush".to_owned(),
            }
        })
        .collect()
}

/// The differential run of module docs on the image `orig/IMG` (made
/// with its data file `orig/DATA`).
fn differential(name: &str, orig: &Path, size: u64, seed: u64) {
    let root = orig.parent().unwrap();
    let (a, b) = (root.join("A"), root.join("B"));
    copy_dir(orig, &a);
    copy_dir(orig, &b);
    let mut rng = Rng(seed);
    let mut history = Vec::new();
    for round in 0..4 {
        let cmds = batch(&mut rng, size, 12);
        history.push(cmds.clone());
        let what = format!("{name}, seed {seed}, batch {round}; batches so far: {history:?}");
        qemu_io(&a, "qcow2", IMG, &cmds);
        let mut args = vec!["io"];
        if round % 2 == 1 {
            args.extend(["-d", "16"]);
        }
        for cmd in &cmds {
            args.extend(["-c", cmd]);
        }
        args.push(IMG);
        bg_ok(&b, &args);
        assert!(view(&a, IMG) == view(&b, IMG), "{what}: guest views differ");
        let (theirs, ours) = (
            fs::read(a.join(DATA)).unwrap(),
            fs::read(b.join(DATA)).unwrap(),
        );
        if let Some(at) = (0..theirs.len().max(ours.len())).find(|&i| theirs.get(i) != ours.get(i))
        {
            panic!(
                "{what}: data files differ first at {at} ({} and {} bytes long; qemu's map {})",
                theirs.len(),
                ours.len(),
                qemu_img(&a, &["map", "--output=json", IMG])
            );
        }
        qemu_img(&b, &["check", IMG]);
    }
}

/// A directory `orig` holding `IMG` made by qemu-img with `DATA` and
/// `options`, `size` bytes, some data written by qemu-io; over
/// `base.qcow2` (data everywhere) when `backing`.
fn made_by_qemu(root: &Path, options: &str, size: u64, backing: bool) -> std::path::PathBuf {
    let orig = root.join("orig");
    fs::create_dir(&orig).unwrap();
    let opts = format!("data_file={DATA},{options}");
    let size_text = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if backing {
        qemu_img(
            &orig,
            &["create", "-q", "-f", "qcow2", "base.qcow2", &size_text],
        );
        qemu_io(
            &orig,
            "qcow2",
            "base.qcow2",
            &[format!("write -P 0x5b 0 {size}")],
        );
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend([IMG, &size_text]);
    qemu_img(&orig, &args);
    qemu_io(
        &orig,
        "qcow2",
        IMG,
        &[
            "write -P 0x11 0 100k",
            "write -z 1M 64k",
            "write -P 0x12 2M 3000",
        ],
    );
    orig
}

#[test]
fn differential_plain_backing_raw_and_extended() {
    for (i, (name, options, backing)) in [
        ("data file", "cluster_size=64k", false),
        ("data file over a backing file", "cluster_size=64k", true),
        ("raw data file", "cluster_size=64k,data_file_raw=on", false),
        ("data file, 4k clusters", "cluster_size=4k", false),
        (
            "data file, extended L2",
            "cluster_size=64k,extended_l2=on",
            true,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        for seed in 0..2 {
            let t = common::tmpdir("bg-data-file-");
            let size = 4 * MIB + 3 * KIB;
            let orig = made_by_qemu(t.path(), options, size, backing);
            if std::env::var_os("DATA_FILE_KEEP").is_some() {
                eprintln!("keeping {}", t.keep().display());
            }
            differential(name, &orig, size, 0xda7a_f11e + 100 * i as u64 + seed);
        }
    }
}

/// What qemu-img reports of an image with a data file, field by field.
fn qemu_info(dir: &Path, img: &str) -> String {
    qemu_img(dir, &["info", "--output=json", img])
}

fn field<'a>(info: &'a str, key: &str) -> &'a str {
    let at = info
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {info}"));
    let rest = &info[at + key.len() + 4..];
    rest[..rest.find([',', '\n']).unwrap()].trim()
}

/// `create -q -f qcow2 -o OPTIONS IMG SIZE`, as either tool takes it.
fn create<'a>(options: &'a str, img: &'a str, size: &'a str) -> [&'a str; 8] {
    ["create", "-q", "-f", "qcow2", "-o", options, img, size]
}

#[test]
fn created_images_are_read_by_qemu() {
    let t = common::tmpdir("bg-data-file-");
    let d = t.path();
    bg_ok(d, &create("data_file=plain.raw", "plain.qcow2", "3M"));
    bg_ok(
        d,
        &create("data_file=raw.raw,data_file_raw=on", "raw.qcow2", "3M"),
    );
    for (img, data, raw) in [
        ("plain.qcow2", "plain.raw", "false"),
        ("raw.qcow2", "raw.raw", "true"),
    ] {
        qemu_img(d, &["check", img]);
        let (ours, theirs) = (bg_ok(d, &["info", "--output=json", img]), qemu_info(d, img));
        for key in ["data-file", "data-file-raw", "extended-l2"] {
            assert_eq!(field(&ours, key), field(&theirs, key), "{img}: {key}");
        }
        assert_eq!(field(&theirs, "data-file"), format!("\"{data}\""));
        assert_eq!(field(&theirs, "data-file-raw"), raw);
        assert_eq!(fs::metadata(d.join(data)).unwrap().len(), 3 * MIB);
        // Written by blockgraph, read by qemu-io, and the other way round.
        bg_ok(
            d,
            &[
                "io",
                "-c",
                "write -P 0x21 1000 70000",
                "-c",
                "write -z 2M 4k",
                img,
            ],
        );
        qemu_io(
            d,
            "qcow2",
            img,
            &[
                "read -P 0x21 1000 70000",
                "read -P 0 2M 4k",
                "write -P 0x22 1M 4k",
            ],
        );
        let out = bg_ok(d, &["io", "-c", "read -P 0x22 1M 4k", img]);
        assert!(!out.contains("failed"), "{img}: {out}");
        qemu_img(d, &["check", img]);
    }
    // The raw data file is the guest view, all mapped as QEMU maps it.
    assert!(view(d, "raw.qcow2") == fs::read(d.join("raw.raw")).unwrap());
    bg_ok(
        d,
        &create("data_file=q.raw,data_file_raw=on", "mine.qcow2", "1M"),
    );
    qemu_img(
        d,
        &create("data_file=q2.raw,data_file_raw=on", "theirs.qcow2", "1M"),
    );
    let map = |img: &str| qemu_img(d, &["map", "--output=json", img]).replace("q2.raw", "q.raw");
    assert_eq!(map("mine.qcow2"), map("theirs.qcow2"));
}

#[test]
fn refusals_write_nothing() {
    let t = common::tmpdir("bg-data-file-");
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for options in [
        "data_file=new.raw,compat=0.10",
        "data_file_raw=on",
        "data_file=,cluster_size=64k",
    ] {
        bg_refused(
            d,
            &["create", "-f", "qcow2", "-o", options, "new.qcow2", "1M"],
        );
        assert!(
            !d.join("new.qcow2").exists() && !d.join("new.raw").exists(),
            "{options}"
        );
    }
    bg_refused(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=new.raw,data_file_raw=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
    );
    assert!(!d.join("new.qcow2").exists() && !d.join("new.raw").exists());
    qemu_img(d, &create("data_file=img.raw", IMG, "1M"));
    let before = (
        fs::read(d.join(IMG)).unwrap(),
        fs::read(d.join("img.raw")).unwrap(),
    );
    // As QEMU: no internal snapshot of an image with a data file.
    bg_refused(d, &["snapshot", "-c", "s1", IMG]);
    bg_refused(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "data_file=out.raw",
            IMG,
            "out.qcow2",
        ],
    );
    assert!(!d.join("out.qcow2").exists());
    let after = (
        fs::read(d.join(IMG)).unwrap(),
        fs::read(d.join("img.raw")).unwrap(),
    );
    assert!(
        before == after,
        "a refused command changed the image or its data file"
    );
}

/// A chain change rewrites the header of an image with a data file: the
/// data file extension stays, and so does the guest view (an empty layer
/// collapsed below it, then the base streamed into it).
#[test]
fn chain_changes_keep_the_data_file() {
    let t = common::tmpdir("bg-data-file-");
    let d = t.path();
    qemu_img(d, &create("cluster_size=64k", "base.qcow2", "2M"));
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x41 0 2M"]);
    // Empty: dropping it changes no view.
    let over = |backing| format!("backing_file={backing},backing_fmt=qcow2");
    qemu_img(d, &create(&over("base.qcow2"), "mid.qcow2", "2M"));
    let top = format!("data_file=top.data,{}", over("mid.qcow2"));
    qemu_img(d, &create(&top, IMG, "2M"));
    qemu_io(
        d,
        "qcow2",
        IMG,
        &["write -P 0x43 10k 5000", "write -z 1500k 64k"],
    );
    let before = view(d, IMG);
    bg_ok(
        d,
        &[
            "collapse",
            "--top",
            "mid.qcow2",
            "--base",
            "base.qcow2",
            IMG,
        ],
    );
    qemu_img(d, &["check", IMG]);
    let info = qemu_info(d, IMG);
    assert_eq!(field(&info, "data-file"), "\"top.data\"", "{info}");
    assert_eq!(field(&info, "backing-filename"), "\"base.qcow2\"", "{info}");
    assert!(view(d, IMG) == before, "the view changed by the collapse");
    bg_ok(d, &["stream", IMG]);
    qemu_img(d, &["check", IMG]);
    assert_eq!(field(&qemu_info(d, IMG), "data-file"), "\"top.data\"");
    assert!(view(d, IMG) == before, "the view changed by the stream");
}

/// A hostile header names as its data file the image itself, or another
/// driver (a protocol prefix, as a backing name may not): refused, nothing
/// written. (A plain path is followed as QEMU follows it, relative to the
/// image's directory or absolute: opening an image read-write trusts its
/// data file name as much as its backing name.)
#[test]
fn hostile_data_file_names_are_refused() {
    let t = common::tmpdir("bg-data-file-");
    let d = t.path();
    let sub = d.join("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(d.join("outside.raw"), vec![0x66u8; MIB as usize]).unwrap();
    for name in [IMG, "nbd:localhost:10809", "json:{\"a\":1}"] {
        // qemu-img stores a name of the same length, patched in place.
        let stored = "x".repeat(name.len());
        let opts = format!("data_file={stored}");
        qemu_img(
            &sub,
            &["create", "-q", "-f", "qcow2", "-o", &opts, IMG, "1M"],
        );
        let mut bytes = fs::read(sub.join(IMG)).unwrap();
        let at = bytes
            .windows(stored.len())
            .position(|w| w == stored.as_bytes())
            .unwrap();
        bytes[at..at + name.len()].copy_from_slice(name.as_bytes());
        fs::write(sub.join(IMG), &bytes).unwrap();
        let outside = fs::read(d.join("outside.raw")).unwrap();
        let out = bg(&sub, &["io", "-c", "write -P 0x99 0 64k", IMG]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert!(
            fs::read(sub.join(IMG)).unwrap() == bytes,
            "{name}: image changed"
        );
        assert!(
            fs::read(d.join("outside.raw")).unwrap() == outside,
            "{name}: outside file written"
        );
        fs::remove_file(sub.join(IMG)).unwrap();
        let _ = fs::remove_file(sub.join(&stored));
    }
}
