//! Refused operations: exit 1, one stderr line, every file unchanged.

use super::*;

pub(crate) fn assert_all_refused(d: &Path, cases: &[&[&str]]) -> Vec<String> {
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
pub(crate) fn strip_backing_format_extension(path: &Path) {
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
