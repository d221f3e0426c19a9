//! The `io` command against qemu-io.

use super::*;

/// base (0x11 at 0..1M) <- mid (0x22 at 512k..768k) <- top (0x33 at 600000..600100).
pub(crate) fn pattern_chain(d: &Path) {
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
pub(crate) fn qcow2_write_matches_qemu_io(a: &Path, b: &Path, img: &str, cmd: &str) -> bool {
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
pub(crate) fn qcow2_writes(orig: &Path, img: &str, cmds: &[&str]) {
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
