//! info: fields equal qemu-img's.

use super::*;

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

/// `snapshot -l` lists what `qemu-img snapshot -l` lists (in UTC), line
/// for line: none, one, several with long and odd names, after a delete;
/// raw images list nothing.
#[test]
fn snapshot_list_equals_qemu_img() {
    let t = tmpdir();
    let d = t.path();
    let list = |img: &str| {
        let qemu = run(d, "env", &["TZ=UTC", "qemu-img", "snapshot", "-l", img]);
        assert!(
            qemu.status.success(),
            "{}",
            render(d, "qemu-img", &[img], &qemu)
        );
        let ours = bg_ok(d, &["snapshot", "-l", img]);
        assert_eq!(
            ours,
            String::from_utf8_lossy(&qemu.stdout),
            "snapshot -l {img}"
        );
        ours
    };
    qcow2(d, "s.qcow2", Some("4M"), "", None);
    assert_eq!(list("s.qcow2"), "");
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 1 0 64k"]);
    for name in [
        "first",
        "a name with spaces",
        "x",
        &"long".repeat(10),
        "second",
    ] {
        qemu_img(d, &["snapshot", "-c", name, "s.qcow2"]);
    }
    qemu_img(d, &["snapshot", "-d", "x", "s.qcow2"]);
    let listed = list("s.qcow2");
    assert_eq!(listed.lines().count(), 2 + 4, "{listed}");
    qcow2(d, "v2.qcow2", Some("1M"), "compat=0.10", None);
    qemu_img(d, &["snapshot", "-c", "old", "v2.qcow2"]);
    list("v2.qcow2");
    fs::write(d.join("r.raw"), vec![0u8; 65536]).unwrap();
    assert_eq!(bg_ok(d, &["snapshot", "-l", "-f", "raw", "r.raw"]), "");
}

/// `snapshot -c` makes snapshots qemu-img lists, checks clean and applies:
/// on an image with data, compressed clusters and a snapshot of qemu-img's
/// own, with 64 KiB and 512-byte clusters; writes after it copy shared
/// clusters out, so the snapshot keeps reading as it was taken.
#[test]
fn snapshot_create_is_applied_by_qemu_img() {
    for cluster in ["64k", "512"] {
        let t = tmpdir();
        let d = t.path();
        let data = mixed_data(
            &[Fill::Text, Fill::Random, Fill::Zero, Fill::FewSymbols],
            256 * 1024,
            5,
        );
        fs::write(d.join("src.raw"), &data).unwrap();
        let opt = format!("cluster_size={cluster}");
        qemu_img(
            d,
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opt, "src.raw", "s.qcow2",
            ],
        );
        qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x31 100k 300k"]);
        qemu_img(d, &["snapshot", "-c", "theirs", "s.qcow2"]);
        qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x32 0 64k"]);
        let at_ours = qemu_guest_data(d, "s.qcow2");
        bg_ok(d, &["snapshot", "-c", "ours", "s.qcow2"]);
        qemu_img(d, &["check", "s.qcow2"]);
        // Writes after it, in place before it, now copy-on-write.
        for w in [
            "write -P 0x33 0 64k",
            "write -P 0x34 200k 5000",
            "write -z 600k 64k",
        ] {
            bg_ok(d, &["io", "s.qcow2", "-c", w]);
        }
        bg_ok(d, &["snapshot", "-c", "ours", "s.qcow2"]);
        qemu_img(d, &["check", "s.qcow2"]);
        let listed = bg_ok(d, &["snapshot", "-l", "s.qcow2"]);
        let theirs = run(
            d,
            "env",
            &["TZ=UTC", "qemu-img", "snapshot", "-l", "s.qcow2"],
        );
        assert_eq!(listed, String::from_utf8_lossy(&theirs.stdout), "{cluster}");
        assert_eq!(listed.lines().count(), 5, "{listed}");
        let now = qemu_guest_data(d, "s.qcow2");
        fs::copy(d.join("s.qcow2"), d.join("a.qcow2")).unwrap();
        qemu_img(d, &["snapshot", "-a", "1", "a.qcow2"]);
        let mut first = data.clone();
        first[100 * 1024..400 * 1024].fill(0x31);
        assert_same_bytes(
            "qemu-img's snapshot",
            &first,
            &qemu_guest_data(d, "a.qcow2"),
        );
        qemu_img(d, &["snapshot", "-a", "2", "a.qcow2"]);
        assert_same_bytes(
            "our first snapshot",
            &at_ours,
            &qemu_guest_data(d, "a.qcow2"),
        );
        qemu_img(d, &["snapshot", "-a", "3", "a.qcow2"]);
        assert_same_bytes("our second snapshot", &now, &qemu_guest_data(d, "a.qcow2"));
        qemu_img(d, &["check", "a.qcow2"]);
    }
}

/// `snapshot -d` deletes by ID or by name what qemu-img then no longer
/// lists: snapshots of ours and of qemu-img's, in any order; the others
/// keep reading as taken; once all are gone `qemu-img check` finds no
/// leak and no COPIED flag missing (every cluster is the image's alone
/// again), and the guest view is unchanged.
#[test]
fn snapshot_delete_leaves_what_qemu_img_expects() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "s.qcow2", Some("8M"), "", None);
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x41 0 2M"]);
    bg_ok(d, &["snapshot", "-c", "one", "s.qcow2"]);
    let at_one = qemu_guest_data(d, "s.qcow2");
    bg_ok(d, &["io", "s.qcow2", "-c", "write -P 0x42 0 64k"]);
    qemu_img(d, &["snapshot", "-c", "two", "s.qcow2"]);
    let at_two = qemu_guest_data(d, "s.qcow2");
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x43 1M 100k"]);
    bg_ok(d, &["snapshot", "-c", "three", "s.qcow2"]);
    bg_ok(d, &["io", "s.qcow2", "-c", "write -P 0x44 3M 64k"]);
    let now = qemu_guest_data(d, "s.qcow2");
    let list = |d: &Path| {
        let theirs = run(
            d,
            "env",
            &["TZ=UTC", "qemu-img", "snapshot", "-l", "s.qcow2"],
        );
        let ours = bg_ok(d, &["snapshot", "-l", "s.qcow2"]);
        assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
        ours
    };
    bg_ok(d, &["snapshot", "-d", "two", "s.qcow2"]);
    qemu_img(d, &["check", "s.qcow2"]);
    let listed = list(d);
    assert!(
        !listed.contains(" two ") && listed.contains(" one "),
        "{listed}"
    );
    fs::copy(d.join("s.qcow2"), d.join("a.qcow2")).unwrap();
    qemu_img(d, &["snapshot", "-a", "one", "a.qcow2"]);
    assert_same_bytes(
        "snapshot one after two went",
        &at_one,
        &qemu_guest_data(d, "a.qcow2"),
    );
    assert_ne!(at_two, at_one);
    bg_ok(d, &["snapshot", "-d", "1", "s.qcow2"]);
    bg_ok(d, &["snapshot", "-d", "three", "s.qcow2"]);
    assert_eq!(list(d), "");
    let check = Json::parse(&qemu_img(d, &["check", "--output=json", "s.qcow2"]));
    assert_eq!(format!("{:?}", check.get("leaks")), "None", "{check:?}");
    assert_same_bytes("the guest view", &now, &qemu_guest_data(d, "s.qcow2"));
    let before = snapshot(d);
    let refused = bg_refused(d, &["snapshot", "-d", "nothing", "s.qcow2"]);
    assert!(refused.contains("no snapshot"), "{refused}");
    assert_unchanged(d, &before, "deleting a snapshot that is not there");
}

/// `snapshot -a` reverts to a snapshot (ours or qemu-img's, by ID or by
/// name) as `qemu-img snapshot -a` does: the same guest view, `qemu-img
/// check` clean, the snapshots kept; writes after it copy shared clusters.
#[test]
fn snapshot_apply_equals_qemu_img() {
    // Standard and extended L2 entries (subclusters shared with snapshots).
    for opts in ["", "extended_l2=on"] {
        snapshot_apply_on(opts);
    }
}

fn snapshot_apply_on(opts: &str) {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "s.qcow2", Some("8M"), opts, None);
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x51 0 3M"]);
    bg_ok(d, &["snapshot", "-c", "one", "s.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &["write -P 0x52 64k 64k", "write -z 1M 128k"],
    );
    qemu_img(d, &["snapshot", "-c", "two", "s.qcow2"]);
    bg_ok(d, &["io", "s.qcow2", "-c", "write -P 0x53 2M 100k"]);
    for target in ["one", "2", "1"] {
        fs::copy(d.join("s.qcow2"), d.join("q.qcow2")).unwrap();
        qemu_img(d, &["snapshot", "-a", target, "q.qcow2"]);
        bg_ok(d, &["snapshot", "-a", target, "s.qcow2"]);
        qemu_img(d, &["check", "s.qcow2"]);
        let (ours, theirs) = (qemu_guest_data(d, "s.qcow2"), qemu_guest_data(d, "q.qcow2"));
        assert_same_bytes(&format!("snapshot -a {target}"), &theirs, &ours);
        bg_ok(d, &["io", "s.qcow2", "-c", "write -P 0x54 70k 5000"]);
        qemu_io(d, "qcow2", "q.qcow2", &["write -P 0x54 70k 5000"]);
        qemu_compare(
            d,
            "s.qcow2",
            "q.qcow2",
            &format!("a write after -a {target}"),
        );
        qemu_img(d, &["check", "s.qcow2"]);
    }
    assert_eq!(bg_ok(d, &["snapshot", "-l", "s.qcow2"]).lines().count(), 4);
    // A snapshot taken at another virtual size: the apply resizes, as
    // qemu-img's does, growing and shrinking.
    qemu_img(d, &["resize", "s.qcow2", "12M"]);
    bg_ok(d, &["io", "s.qcow2", "-c", "write -P 0x55 11M 64k"]);
    bg_ok(d, &["snapshot", "-c", "big", "s.qcow2"]);
    for (target, size) in [("one", 8 << 20), ("big", 12 << 20)] {
        fs::copy(d.join("s.qcow2"), d.join("q.qcow2")).unwrap();
        qemu_img(d, &["snapshot", "-a", target, "q.qcow2"]);
        bg_ok(d, &["snapshot", "-a", target, "s.qcow2"]);
        qemu_img(d, &["check", "s.qcow2"]);
        let info = qemu_img(d, &["info", "--output=json", "s.qcow2"]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{target}: {info}"
        );
        let (ours, theirs) = (qemu_guest_data(d, "s.qcow2"), qemu_guest_data(d, "q.qcow2"));
        assert_same_bytes(
            &format!("snapshot -a {target} across sizes"),
            &theirs,
            &ours,
        );
    }
    let before = snapshot(d);
    let refused = bg_refused(d, &["snapshot", "-a", "nothing", "s.qcow2"]);
    assert!(refused.contains("no snapshot"), "{refused}");
    assert_unchanged(d, &before, "applying a snapshot that is not there");
}

/// A hostile snapshot (its L1 table naming the refcount block as an L2
/// table, or an L2 entry pointing data at the L1 table) is refused by
/// `snapshot -d` and `-a` before anything is written, but for the corrupt
/// bit the overlap check sets on data aimed at metadata (R10, as QEMU).
#[test]
fn hostile_snapshot_tables_are_refused_untouched() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "s.qcow2", Some("4M"), "", None);
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 1 0 128k"]);
    qemu_img(d, &["snapshot", "-c", "s", "s.qcow2"]);
    let bytes = fs::read(d.join("s.qcow2")).unwrap();
    let table = be64(&bytes, 64) as usize;
    let snapshot_l1 = be64(&bytes, table) as usize;
    let refcount_block = be64(&bytes, be64(&bytes, 48) as usize) as usize;
    let l2 = (be64(&bytes, snapshot_l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let active_l1 = be64(&bytes, 40);
    let copied = 1u64 << 63;
    let cases: [(&str, usize, u64, bool); 2] = [
        (
            "L1 entry on the refcount block",
            snapshot_l1,
            refcount_block as u64 | copied,
            false,
        ),
        (
            "data cluster on the active L1 table",
            l2,
            active_l1 | copied,
            true,
        ),
    ];
    for (what, at, value, marks_corrupt) in cases {
        for verb in ["-d", "-a"] {
            fs::write(d.join("h.qcow2"), &bytes).unwrap();
            patch(&d.join("h.qcow2"), at, &value.to_be_bytes());
            let mut expected = fs::read(d.join("h.qcow2")).unwrap();
            bg_refused(d, &["snapshot", verb, "s", "h.qcow2"]);
            if marks_corrupt {
                expected[79] |= 2;
            }
            let after = fs::read(d.join("h.qcow2")).unwrap();
            assert_same_bytes(&format!("snapshot {verb} with {what}"), &expected, &after);
        }
    }
}
