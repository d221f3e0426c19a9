//! collapse: equals `qemu-img rebase -u`.

use super::*;

/// base <- mid <- top <- active (relative names, all in one directory).
pub(crate) fn four_layer_chain(d: &Path, opts: &str, base: &str) {
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
pub(crate) fn qemu_backing(dir: &Path, img: &str) -> (Option<String>, Option<String>) {
    let info = Json::parse(&qemu_img(dir, &["info", "--output=json", img]));
    (
        info.str_field("backing-filename").map(str::to_string),
        info.str_field("backing-filename-format")
            .map(str::to_string),
    )
}

/// The chain of `img` as qemu-img resolves it, as paths relative to `root`.
pub(crate) fn qemu_chain(root: &Path, cwd: &Path, img: &str) -> Vec<PathBuf> {
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
pub(crate) fn check_all(dir: &Path) {
    for name in snapshot(dir).keys() {
        if name.extension().is_some_and(|e| e == "qcow2") {
            qemu_img(dir, &["check", "-q", name.to_str().unwrap()]);
        }
    }
}

pub(crate) struct Collapse<'a> {
    /// Directory (below the copy's root) to run blockgraph in.
    pub(crate) cwd: &'a str,
    /// Arguments after `blockgraph`.
    pub(crate) args: &'a [&'a str],
    /// `qemu-img` arguments doing the same, run in the copy's root.
    pub(crate) rebase: &'a [&'a str],
    /// The overlay whose header changes (relative to the root).
    pub(crate) overlay: &'a str,
    /// The image whose chain is compared (relative to the root).
    pub(crate) active: &'a str,
    /// Its expected chain afterwards (relative to the root), top first.
    pub(crate) chain: &'a [&'a str],
    /// The written name must equal qemu-img's byte for byte; otherwise it
    /// must only be relative and resolve to the same file.
    pub(crate) same_name: bool,
}

/// Runs a collapse on copy A of `orig` and the equivalent rebase on copy B, then
/// compares both.
pub(crate) fn assert_collapse_matches_rebase(orig: &Path, c: &Collapse) {
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
    for opts in ["", "compat=0.10", "extended_l2=on"] {
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
