//! `blockgraph bench` and `blockgraph sizes` against `qemu-img bench`, and
//! `checksum -d DEPTH` (reads in flight) against the guest view.
//!
//! The output is qemu-img's, at queue depth 1 and at depths 8 and 32
//! (through the request engine); a write bench leaves the same guest view
//! as `qemu-img bench -w` with the same arguments on a copy of the chain
//! (`qemu-img compare`), offsets wrapping at the end of the image as
//! qemu-img wraps them, also with `-t none` (O_DIRECT); a queue depth above the engine's 64 slots, or
//! buffers (size × depth) beyond the scratch memory, are refused; bad
//! arguments exit with status 1 and
//! one line on stderr, writing nothing. Every test works in its own
//! temporary directory with small images; a missing QEMU tool fails the
//! test.

use std::fs;
use std::path::Path;

use tempfile::TempDir;

mod common;
use common::{bg_refused, ok, qemu_io, render, run, BLOCKGRAPH};

fn tmpdir() -> TempDir {
    common::tmpdir("bg-bench-")
}

/// base.qcow2 (0x11 @0 512k, 0x12 @700k 100k) <- top.qcow2 (0x22 @256k
/// 512k), 1 MiB, 64 KiB clusters.
fn chain(dir: &Path) {
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    let writes = ["write -P 0x11 0 512k", "write -P 0x12 700k 100k"];
    qemu_io(dir, "qcow2", "base.qcow2", &writes);
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    ok(dir, "qemu-img", &args);
    qemu_io(dir, "qcow2", "top.qcow2", &["write -P 0x22 256k 512k"]);
}

/// `expected-NAME` copies of the chain whose top names the copied base.
fn copy_chain(dir: &Path) {
    fs::copy(dir.join("base.qcow2"), dir.join("expected-base.qcow2")).unwrap();
    fs::copy(dir.join("top.qcow2"), dir.join("expected-top.qcow2")).unwrap();
    let args = [
        "rebase",
        "-u",
        "-b",
        "expected-base.qcow2",
        "-F",
        "qcow2",
        "expected-top.qcow2",
    ];
    ok(dir, "qemu-img", &args);
}

/// Checks the "Run completed in X.YYY seconds." line.
fn assert_completed(line: &str) {
    let seconds = line
        .strip_prefix("Run completed in ")
        .and_then(|rest| rest.strip_suffix(" seconds."))
        .unwrap_or_else(|| panic!("not a completion line: {line:?}"));
    let (whole, millis) = seconds.split_once('.').expect("seconds with decimals");
    assert!(
        !whole.is_empty() && whole.bytes().all(|b| b.is_ascii_digit()),
        "{line:?}"
    );
    assert!(
        millis.len() == 3 && millis.bytes().all(|b| b.is_ascii_digit()),
        "three decimals: {line:?}"
    );
}

#[test]
fn output_is_qemu_img_s_at_queue_depth_one() {
    let tmp = tmpdir();
    let dir = tmp.path();
    chain(dir);
    for args in [
        &["-c", "200", "-s", "4k"][..],
        &["-c", "50", "-s", "64k", "-S", "128k"],
        &["-c", "9", "-s", "64k", "-o", "3", "-S", "100000"],
        &["-w", "-c", "20", "--pattern", "0x5a"],
    ] {
        let mut ours = vec!["bench"];
        ours.extend_from_slice(args);
        ours.push("top.qcow2");
        let out = ok(dir, BLOCKGRAPH, &ours);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let mut theirs = vec!["bench", "-d", "1"];
        theirs.extend_from_slice(args);
        theirs.push("top.qcow2");
        let qemu = ok(dir, "qemu-img", &theirs);
        assert_eq!(lines[0], qemu.lines().next().unwrap(), "the Sending line");
        assert_completed(lines[1]);
    }
    // The default: 75000 reads of 4 KiB.
    let out = ok(dir, BLOCKGRAPH, &["bench", "base.qcow2"]);
    assert!(
        out.starts_with(
            "Sending 75000 read requests, 4096 bytes each, 1 in parallel \
             (starting at offset 0, step size 4096)\n"
        ),
        "{out}"
    );
}

#[test]
fn reads_leave_every_file_alone() {
    let tmp = tmpdir();
    let dir = tmp.path();
    chain(dir);
    let before: Vec<Vec<u8>> = ["base.qcow2", "top.qcow2"]
        .iter()
        .map(|name| fs::read(dir.join(name)).unwrap())
        .collect();
    ok(
        dir,
        BLOCKGRAPH,
        &["bench", "-c", "300", "-S", "12k", "top.qcow2"],
    );
    for (name, bytes) in ["base.qcow2", "top.qcow2"].iter().zip(&before) {
        assert!(
            fs::read(dir.join(name)).unwrap() == *bytes,
            "{name} changed"
        );
    }
}

#[test]
fn writes_equal_qemu_img_bench_writes() {
    // Offsets wrapping at every step, unaligned requests, a request ending
    // exactly at the end of the image before the wrap, default and explicit
    // patterns, writes over backing data.
    let cases: [&[&str]; 5] = [
        &["-c", "40", "-s", "4k", "-S", "1028k"],
        &["-c", "9", "-s", "64k", "-S", "300k", "--pattern", "0x33"],
        &[
            "-c",
            "30",
            "-s",
            "3000",
            "-o",
            "5",
            "-S",
            "70001",
            "--pattern",
            "7",
        ],
        &["-c", "4", "-s", "4k", "-o", "1040384", "--pattern", "0xee"],
        &[
            "-c",
            "64",
            "-s",
            "512",
            "-o",
            "300k",
            "-S",
            "512",
            "--pattern",
            "1",
        ],
    ];
    for args in cases {
        let tmp = tmpdir();
        let dir = tmp.path();
        chain(dir);
        copy_chain(dir);
        let mut theirs = vec!["bench", "-w", "-d", "1"];
        theirs.extend_from_slice(args);
        theirs.push("expected-top.qcow2");
        ok(dir, "qemu-img", &theirs);
        let mut ours = vec!["bench", "-w"];
        ours.extend_from_slice(args);
        ours.push("top.qcow2");
        ok(dir, BLOCKGRAPH, &ours);
        let compare = ["compare", "top.qcow2", "expected-top.qcow2"];
        let out = run(dir, "qemu-img", &compare);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            render(dir, "qemu-img", &compare, &out)
        );
        ok(dir, "qemu-img", &["check", "top.qcow2"]);
        let base = fs::read(dir.join("base.qcow2")).unwrap();
        let expected = fs::read(dir.join("expected-base.qcow2")).unwrap();
        assert!(base == expected, "{args:?}: the backing file was written");
    }
}

#[test]
fn a_wrapped_request_past_the_end_fails_like_qemu_img() {
    // 64 KiB at 0, then at 1000 KiB of a 1 MiB image: qemu-img 10.0 fails
    // the second request, and so does blockgraph. (qemu-img exits without
    // writing back its metadata cache, so the images are not compared; ours
    // must still be consistent.)
    let tmp = tmpdir();
    let dir = tmp.path();
    chain(dir);
    copy_chain(dir);
    let args = ["-c", "5", "-s", "64k", "-S", "1000k", "--pattern", "9"];
    let mut theirs = vec!["bench", "-w", "-d", "1"];
    theirs.extend_from_slice(&args);
    theirs.push("expected-top.qcow2");
    let out = run(dir, "qemu-img", &theirs);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        render(dir, "qemu-img", &theirs, &out)
    );
    let mut ours = vec!["bench", "-w"];
    ours.extend_from_slice(&args);
    ours.push("top.qcow2");
    let out = run(dir, BLOCKGRAPH, &ours);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        render(dir, BLOCKGRAPH, &ours, &out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past the end of the image"), "{err}");
    ok(dir, "qemu-img", &["check", "top.qcow2"]);
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["read -P 9 0 64k", "read -P 0x11 64k 192k"],
    );
}

#[test]
fn bad_arguments_exit_1_and_write_nothing() {
    let tmp = tmpdir();
    let dir = tmp.path();
    chain(dir);
    let before = fs::read(dir.join("top.qcow2")).unwrap();
    for args in [
        &["bench"][..],
        &["bench", "top.qcow2", "base.qcow2"],
        &["bench", "-c", "0", "top.qcow2"],
        &["bench", "-c", "x", "top.qcow2"],
        &["bench", "-s", "0", "top.qcow2"],
        &["bench", "-s", "2M", "top.qcow2"],
        &["bench", "-d", "0", "top.qcow2"],
        &["bench", "-w", "-t", "unsafe", "top.qcow2"],
        &["bench", "-t", "directsync", "top.qcow2"],
        &["bench", "-d", "65", "top.qcow2"],
        &["bench", "-w", "-d", "100", "top.qcow2"],
        // 1 MiB of scratch: 8 × 256 KiB and 32 × 64 KiB do not fit.
        &["bench", "-d", "8", "-s", "256k", "top.qcow2"],
        &["bench", "-w", "-d", "32", "-s", "64k", "top.qcow2"],
        &["bench", "-w", "--pattern", "256", "top.qcow2"],
        &["bench", "-S", "4G", "top.qcow2"],
        &["bench", "-x", "top.qcow2"],
        &["bench", "-c"],
        &["bench", "-w", "-o", "1M", "top.qcow2"],
        &["bench", "-w", "-o", "1020k", "-s", "8k", "top.qcow2"],
        &["bench", "missing.qcow2"],
        &["sizes", "top.qcow2"],
    ] {
        let err = bg_refused(dir, args);
        let shown = format!("`blockgraph {}`: {}", args.join(" "), err.trim_end());
        assert!(err.starts_with("blockgraph: "), "{shown}");
        assert!(
            fs::read(dir.join("top.qcow2")).unwrap() == before,
            "{shown}: top.qcow2 changed"
        );
    }
}

#[test]
fn sizes_add_up() {
    let tmp = tmpdir();
    let out = ok(tmp.path(), BLOCKGRAPH, &["sizes"]);
    let bytes = |prefix: &str| -> usize {
        let line = out
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"));
        line[prefix.len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in {line:?}"))
    };
    let (graph, session, scratch) = (bytes("graph: "), bytes("session: "), bytes("scratch: "));
    assert!(
        out.contains("(64 nodes, 8 backends, 128 cache slots, 4 jobs)"),
        "{out}"
    );
    for slot in [
        "  node slot: ",
        "  backend slot: ",
        "  cache slot: ",
        "  job slot: ",
    ] {
        assert!(bytes(slot) > 0, "{out}");
    }
    assert!(bytes("  cache slot: ") >= 4096, "{out}");
    // The request engine: its slots, each well under a kilobyte.
    let (engine, request) = (bytes("engine: "), bytes("  request slot: "));
    assert!(
        request > 0 && request < 1024 && engine >= 64 * request,
        "{out}"
    );
    // The virtio-blk server: its records, each well under a kilobyte.
    let (server, chain) = (bytes("virtio-blk server: "), bytes("  chain record: "));
    assert!(chain > 0 && chain < 1024 && server >= 64 * chain, "{out}");
    assert_eq!(bytes("total: "), graph + session + scratch, "{out}");
    let verdict = out.lines().last().unwrap();
    assert!(
        verdict.ends_with("of a 2097152-byte budget: met")
            || verdict.ends_with("of a 2097152-byte budget: exceeded"),
        "{out}"
    );
}

/// base.qcow2 (0x11 @0 512k, 0x12 @700k 100k) <- mid.qcow2 (0x33 @64k
/// 200k, 0x34 @900k 30000) <- top.qcow2 (0x22 @256k 512k): three layers,
/// 1 MiB, 64 KiB clusters; and raw.img, 1 MiB of the same top layer's
/// view.
fn three_layers(dir: &Path) {
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    let writes = ["write -P 0x11 0 512k", "write -P 0x12 700k 100k"];
    qemu_io(dir, "qcow2", "base.qcow2", &writes);
    for (name, backing, writes) in [
        (
            "mid.qcow2",
            "base.qcow2",
            &["write -P 0x33 64k 200k", "write -P 0x34 900k 30000"][..],
        ),
        ("top.qcow2", "mid.qcow2", &["write -P 0x22 256k 512k"]),
    ] {
        let args = [
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
        ];
        ok(dir, "qemu-img", &args);
        qemu_io(dir, "qcow2", name, writes);
    }
    let args = ["convert", "-O", "raw", "top.qcow2", "raw.img"];
    ok(dir, "qemu-img", &args);
}

/// `expected-NAME` copies of [`three_layers`]'s files, the copied chain
/// naming the copied backing files.
fn copy_three_layers(dir: &Path) {
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2", "raw.img"] {
        fs::copy(dir.join(name), dir.join(format!("expected-{name}"))).unwrap();
    }
    for (name, backing) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        let (name, backing) = (format!("expected-{name}"), format!("expected-{backing}"));
        let args = ["rebase", "-u", "-b", &backing, "-F", "qcow2", &name];
        ok(dir, "qemu-img", &args);
    }
}

#[test]
fn queued_output_is_qemu_img_s() {
    let tmp = tmpdir();
    let dir = tmp.path();
    three_layers(dir);
    for depth in ["8", "32"] {
        for image in [&["top.qcow2"][..], &["-f", "raw", "raw.img"]] {
            for args in [
                &["-c", "2000", "-s", "4k"][..],
                &["-c", "100", "-s", "16k", "-o", "3", "-S", "100000"],
                &["-c", "5", "-s", "32k", "-S", "192k"],
                &["-w", "-c", "300", "--pattern", "0x5a"],
            ] {
                let mut ours = vec!["bench", "-d", depth];
                ours.extend_from_slice(args);
                ours.extend_from_slice(image);
                let out = ok(dir, BLOCKGRAPH, &ours);
                let lines: Vec<&str> = out.lines().collect();
                assert_eq!(lines.len(), 2, "{ours:?}: {out}");
                let qemu = ok(dir, "qemu-img", &ours);
                assert_eq!(
                    lines[0],
                    qemu.lines().next().unwrap(),
                    "{ours:?}: the Sending line"
                );
                assert!(
                    lines[0].contains(&format!(" {depth} in parallel ")),
                    "{out}"
                );
                assert_completed(lines[1]);
            }
        }
    }
    // The deepest queue the engine holds, with buffers filling the scratch
    // memory exactly.
    let out = ok(
        dir,
        BLOCKGRAPH,
        &["bench", "-d", "64", "-s", "16k", "-c", "500", "top.qcow2"],
    );
    assert!(out.contains(", 64 in parallel "), "{out}");
}

#[test]
fn queued_reads_leave_every_file_alone() {
    let tmp = tmpdir();
    let dir = tmp.path();
    three_layers(dir);
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2", "raw.img"];
    let before: Vec<Vec<u8>> = names
        .iter()
        .map(|name| fs::read(dir.join(name)).unwrap())
        .collect();
    for depth in ["8", "32"] {
        let args = ["bench", "-d", depth, "-c", "300", "-s", "4000", "-S", "12k"];
        ok(dir, BLOCKGRAPH, &[&args[..], &["top.qcow2"]].concat());
        ok(
            dir,
            BLOCKGRAPH,
            &[&args[..], &["-f", "raw", "raw.img"]].concat(),
        );
    }
    for (name, bytes) in names.iter().zip(&before) {
        assert!(
            fs::read(dir.join(name)).unwrap() == *bytes,
            "{name} changed"
        );
    }
}

/// FNV-1a 64, as `checksum` prints it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn checksum_at_any_depth_is_the_guest_view_s() {
    let tmp = tmpdir();
    let dir = tmp.path();
    three_layers(dir);
    let view = fs::read(dir.join("raw.img")).unwrap();
    let line = format!(
        "checksum top.qcow2: {:016x} ({} bytes)",
        fnv1a(&view),
        view.len()
    );
    for depth in ["1", "2", "7", "32", "64"] {
        let out = ok(dir, BLOCKGRAPH, &["checksum", "-d", depth, "top.qcow2"]);
        assert_eq!(out.trim_end(), line, "-d {depth}");
    }
    // Through the BlockBackend of an image attached in the session.
    let script = "job-start stream --base mid.qcow2 top.qcow2; checksum -d 8 top.qcow2; \
                  job-cancel top.qcow2";
    let out = ok(dir, BLOCKGRAPH, &["script", script]);
    assert!(out.lines().any(|l| l == line), "{out}");
    for depth in ["0", "65", "x"] {
        bg_refused(dir, &["checksum", "-d", depth, "top.qcow2"]);
    }
}

/// A raw image whose file ends inside its last sector: the view reads
/// zeros past the file's end, with requests in flight as without.
#[test]
fn checksum_in_flight_reads_zeros_past_the_end_of_the_file() {
    let tmp = tmpdir();
    let dir = tmp.path();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("odd.raw"), &bytes).unwrap();
    let mut view = bytes;
    view.resize(100_000usize.next_multiple_of(512), 0);
    let line = format!(
        "checksum odd.raw: {:016x} ({} bytes)",
        fnv1a(&view),
        view.len()
    );
    for depth in ["1", "3", "8"] {
        let out = ok(
            dir,
            BLOCKGRAPH,
            &["checksum", "-f", "raw", "-d", depth, "odd.raw"],
        );
        assert_eq!(out.trim_end(), line, "-d {depth}");
    }
}

#[test]
fn queued_writes_equal_qemu_img_bench_writes() {
    // qemu-img writes at queue depth 8; blockgraph at 8 and 32, on the
    // three-layer chain and on a raw file: allocating and in-place writes,
    // wrapping offsets, unaligned requests.
    let cases: [&[&str]; 4] = [
        &["-c", "40", "-s", "4k", "-S", "1028k"],
        &["-c", "9", "-s", "16k", "-S", "300k", "--pattern", "0x33"],
        &[
            "-c",
            "30",
            "-s",
            "3000",
            "-o",
            "5",
            "-S",
            "70001",
            "--pattern",
            "7",
        ],
        &[
            "-c",
            "600",
            "-s",
            "512",
            "-o",
            "300k",
            "-S",
            "1536",
            "--pattern",
            "1",
        ],
    ];
    for depth in ["8", "32"] {
        for args in cases {
            let tmp = tmpdir();
            let dir = tmp.path();
            three_layers(dir);
            copy_three_layers(dir);
            let backing = ["base.qcow2", "mid.qcow2"].map(|name| fs::read(dir.join(name)).unwrap());
            for (image, format) in [("top.qcow2", "qcow2"), ("raw.img", "raw")] {
                let expected = format!("expected-{image}");
                let mut theirs = vec!["bench", "-w", "-d", "8", "-f", format];
                theirs.extend_from_slice(args);
                theirs.push(&expected);
                ok(dir, "qemu-img", &theirs);
                let mut ours = vec!["bench", "-w", "-d", depth, "-f", format];
                ours.extend_from_slice(args);
                ours.push(image);
                ok(dir, BLOCKGRAPH, &ours);
                let compare = ["compare", "-f", format, "-F", format, image, &expected];
                let out = run(dir, "qemu-img", &compare);
                assert!(
                    out.status.success(),
                    "-d {depth} {args:?}: {}",
                    render(dir, "qemu-img", &compare, &out)
                );
            }
            ok(dir, "qemu-img", &["check", "top.qcow2"]);
            for (name, before) in ["base.qcow2", "mid.qcow2"].iter().zip(&backing) {
                let after = fs::read(dir.join(name)).unwrap();
                assert!(after == *before, "-d {depth} {args:?}: {name} was written");
            }
        }
    }
}

#[test]
fn a_queued_request_past_the_end_fails() {
    // As at depth 1: the fifth request (64 KiB at 1000k) reaches past
    // the end; the run fails after the requests in flight complete, leaving
    // a consistent image.
    let tmp = tmpdir();
    let dir = tmp.path();
    three_layers(dir);
    let args = [
        "bench",
        "-w",
        "-d",
        "8",
        "-c",
        "5",
        "-s",
        "64k",
        "-S",
        "250k",
        "--pattern",
        "9",
        "top.qcow2",
    ];
    let out = run(dir, BLOCKGRAPH, &args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        render(dir, BLOCKGRAPH, &args, &out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past the end of the image"), "{err}");
    ok(dir, "qemu-img", &["check", "top.qcow2"]);
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "read -P 9 0 64k",
            "read -P 9 250k 64k",
            "read -P 9 750k 64k",
        ],
    );
}

#[test]
fn cache_mode_none_equals_qemu_img_s() {
    // O_DIRECT on the image files (the temporary directory must be on a
    // file system that supports it, not tmpfs): aligned and unaligned
    // requests, reads and writes, depths 1, 8 and 32, chain and raw file.
    let cases: [&[&str]; 4] = [
        &["-d", "1", "-c", "200", "-s", "4k"],
        &[
            "-d",
            "8",
            "-c",
            "100",
            "-s",
            "64k",
            "-S",
            "128k",
            "--pattern",
            "0x44",
        ],
        &["-d", "8", "-c", "60", "-s", "3000", "-o", "5", "-S", "7001"],
        &[
            "-d",
            "32",
            "-c",
            "300",
            "-s",
            "4k",
            "-S",
            "12k",
            "--pattern",
            "2",
        ],
    ];
    for args in cases {
        let tmp = tmpdir();
        let dir = tmp.path();
        three_layers(dir);
        copy_three_layers(dir);
        for (image, format) in [("top.qcow2", "qcow2"), ("raw.img", "raw")] {
            let mut reads = vec!["bench", "-t", "none", "-f", format];
            reads.extend_from_slice(args);
            reads.push(image);
            let out = ok(dir, BLOCKGRAPH, &reads);
            let qemu = ok(dir, "qemu-img", &reads);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{reads:?}: {out}");
            assert_eq!(lines[0], qemu.lines().next().unwrap(), "{reads:?}");
            assert_completed(lines[1]);
            let expected = format!("expected-{image}");
            let mut theirs = vec!["bench", "-w", "-t", "none", "-f", format];
            theirs.extend_from_slice(args);
            theirs.push(&expected);
            ok(dir, "qemu-img", &theirs);
            let mut ours = vec!["bench", "-w", "-t", "none", "-f", format];
            ours.extend_from_slice(args);
            ours.push(image);
            ok(dir, BLOCKGRAPH, &ours);
            let compare = ["compare", "-f", format, "-F", format, image, &expected];
            let out = run(dir, "qemu-img", &compare);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                render(dir, "qemu-img", &compare, &out)
            );
        }
        ok(dir, "qemu-img", &["check", "top.qcow2"]);
    }
}

/// `bench --with-job`: an active commit stepped through the request engine
/// (its runs among the writes, its end in a drained section) while 32
/// writes stay in flight, completed as soon as it is ready, so it pivots
/// under them; the writes land in base, which ends up as qemu-img's bench
/// leaves a copy of the chain, and consistent.
#[test]
fn an_active_commit_pivots_under_queued_writes() {
    let tmp = tmpdir();
    let dir = tmp.path();
    chain(dir);
    copy_chain(dir);
    const WRITES: &str = "-w -d 32 -c 300 -s 4k -S 3k --pattern 0x44";
    let script = format!(
        "job-start commit top.qcow2; bench {WRITES} --with-job top.qcow2; \
         job-info top.qcow2; job-wait top.qcow2"
    );
    let out = ok(dir, BLOCKGRAPH, &["script", &script]);
    assert!(
        out.contains("job commit on top.qcow2: concluded"),
        "the job did not end during the bench:\n{out}"
    );
    assert!(
        out.contains("Image 'base.qcow2' is now the active image"),
        "{out}"
    );
    let mut args: Vec<&str> = WRITES.split(' ').collect();
    args.insert(0, "bench");
    args.push("expected-top.qcow2");
    ok(dir, "qemu-img", &args);
    ok(dir, "qemu-img", &["check", "base.qcow2"]);
    ok(
        dir,
        "qemu-img",
        &["compare", "expected-top.qcow2", "base.qcow2"],
    );
    // Refused: no job on the image, or no requests in flight to step between.
    bg_refused(dir, &["bench", "-w", "-d", "8", "--with-job", "top.qcow2"]);
    let script = "job-start commit top.qcow2; bench -w --with-job top.qcow2; job-cancel top.qcow2";
    bg_refused(dir, &["script", script]);
}
