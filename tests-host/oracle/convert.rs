//! convert: guest data equals `qemu-img convert -O raw`.

use super::*;

pub(crate) fn convert_data_chain(opts: &str) {
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
pub(crate) fn convert_is_refused(d: &Path, top: &str, bad: &[&str]) {
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

pub(crate) fn convert_compressed(cluster: &str, chunk: usize, kinds: &[Fill]) {
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

/// zstd-compressed images (`compression_type=zstd`) qemu-img makes, with
/// every cluster size: their guest view, `info`, and writes that copy
/// part of a compressed cluster out equal qemu's.
#[test]
fn zstd_images_read_and_write_like_qemu() {
    use Fill::*;
    let kinds = [
        Random,
        Byte(0x5a),
        Text,
        Zero,
        HalfRandom,
        FewSymbols,
        Text,
        Random,
    ];
    for cluster in ["512", "4k", "64k", "2M"] {
        let t = tmpdir();
        let d = t.path();
        let data = mixed_data(&kinds, 512 * 1024, 0x2545_f491);
        fs::write(d.join("src.raw"), &data).unwrap();
        let opt = format!("compression_type=zstd,cluster_size={cluster}");
        let src = ["-f", "raw", "-O", "qcow2", "-o", &opt, "src.raw", "z.qcow2"];
        qemu_img(d, &[&["convert", "-c"][..], &src[..]].concat());
        let check = Json::parse(&qemu_img(d, &["check", "--output=json", "z.qcow2"]));
        assert!(
            check.u64_field("compressed-clusters") > 0,
            "construction ({cluster}): no compressed cluster: {check:?}"
        );
        let guest = assert_convert_matches(d, "z.qcow2");
        assert_same_bytes("qemu's round trip of the source", &data, &guest);
        let info = assert_info_matches(d, "z.qcow2");
        assert!(format!("{info:?}").contains("zstd"), "{info:?}");

        // Partial writes over compressed clusters: the rest of each is
        // read (zstd) and copied into a new cluster.
        fs::copy(d.join("z.qcow2"), d.join("ref.qcow2")).unwrap();
        let writes = [
            "write -P 0x71 5000 70000",
            "write -z 1M 3000",
            "write -P 0x72 3000000 1234",
        ];
        for w in writes {
            bg_ok(d, &["io", "z.qcow2", "-c", w]);
        }
        qemu_io(d, "qcow2", "ref.qcow2", &writes);
        qemu_compare(
            d,
            "z.qcow2",
            "ref.qcow2",
            &format!("zstd writes, {cluster} clusters"),
        );
        qemu_img(d, &["check", "z.qcow2"]);
    }
}

/// `create -o compression_type=zstd` records zstd as qemu-img does (and
/// refuses it for version 2 images).
#[test]
fn create_records_zstd_compression() {
    let t = tmpdir();
    let d = t.path();
    bg_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "z.qcow2",
            "1M",
        ],
    );
    let info = Json::parse(&qemu_img(d, &["info", "--output=json", "z.qcow2"]));
    assert!(format!("{info:?}").contains("\"zstd\""), "{info:?}");
    qemu_img(d, &["check", "z.qcow2"]);
    assert_info_matches(d, "z.qcow2");
    let refused = bg_refused(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,compression_type=zstd",
            "v2.qcow2",
            "1M",
        ],
    );
    assert!(refused.contains("compat=1.1"), "{refused}");
    assert!(!d.join("v2.qcow2").exists());
}

/// A zstd image whose compressed data is damaged: reading it fails cleanly
/// (exit 1, one line) or, where the damage decodes, succeeds; never a
/// panic.
#[test]
fn damaged_zstd_clusters_fail_cleanly() {
    use Fill::*;
    let t = tmpdir();
    let d = t.path();
    let data = mixed_data(&[Text, HalfRandom, FewSymbols, Text], 256 * 1024, 7);
    fs::write(d.join("src.raw"), &data).unwrap();
    let src = [
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "src.raw",
        "z.qcow2",
    ];
    qemu_img(d, &[&["convert", "-c"][..], &src[..]].concat());
    let pristine = fs::read(d.join("z.qcow2")).unwrap();
    let mut rng = Rng(0x5eed);
    let mut refused = 0;
    for _ in 0..24 {
        let mut bytes = pristine.clone();
        let start = bytes.len() / 2;
        for _ in 0..4 {
            let at = start + (rng.next() as usize) % (bytes.len() - start);
            bytes[at] ^= 1 << (rng.next() % 8);
        }
        fs::write(d.join("bad.qcow2"), &bytes).unwrap();
        let args = ["convert", "-O", "raw", "bad.qcow2", "out.raw"];
        let out = bg(d, &args);
        let shown = render(d, "blockgraph", &args, &out);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{shown}"
        );
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                refused += 1;
                bg_refused(d, &args);
            }
            _ => panic!("neither success nor a clean refusal: {shown}"),
        }
    }
    assert!(refused > 0, "no damage was ever noticed");
}

/// `convert -S`: zero runs of at least SPARSE bytes are left unwritten, as
/// qemu-img leaves them: a raw output allocates what qemu-img's does, a
/// qcow2 output maps what qemu-img's maps; `-S 0` allocates everything;
/// a size that is no multiple of 512 is refused before any file exists.
#[test]
fn convert_sparse_size_allocates_like_qemu() {
    use std::os::unix::fs::MetadataExt;
    let t = tmpdir();
    let d = t.path();
    // Explicit zeros among data: runs of 300000 bytes of 'x' every MiB,
    // a short zero run inside one of them.
    let mut data = vec![0u8; 8 << 20];
    for start in (0..data.len()).step_by(1 << 20) {
        data[start..start + 300_000].fill(b'x');
    }
    data[2_200_000..2_208_192].fill(0);
    fs::write(d.join("src.raw"), &data).unwrap();
    let allocated = |name: &str| fs::metadata(d.join(name)).unwrap().blocks() * 512;
    for sparse in ["0", "512", "4k", "64k", "1M"] {
        for format in ["raw", "qcow2"] {
            let ours = format!("ours-{sparse}.{format}");
            let theirs = format!("qemu-{sparse}.{format}");
            let args = ["-f", "raw", "-S", sparse, "-O", format, "src.raw"];
            bg_ok(
                d,
                &[&["convert"][..], &args[..], &[ours.as_str()][..]].concat(),
            );
            qemu_img(
                d,
                &[&["convert"][..], &args[..], &[theirs.as_str()][..]].concat(),
            );
            let guest = assert_convert_matches(d, &ours);
            assert_same_bytes(&format!("-S {sparse} -O {format}"), &data, &guest);
            match format {
                "raw" => assert_eq!(
                    allocated(&ours),
                    allocated(&theirs),
                    "-S {sparse}: allocated bytes of the raw output (left: blockgraph)"
                ),
                _ => {
                    let map = |tool: &str, out: String| normalised_map(tool, &out);
                    let args = ["map", "--output=json"];
                    let a = map(
                        "ours",
                        qemu_img(d, &[&args[..], &[ours.as_str()][..]].concat()),
                    );
                    let b = map(
                        "qemu",
                        qemu_img(d, &[&args[..], &[theirs.as_str()][..]].concat()),
                    );
                    assert!(
                        a == b,
                        "-S {sparse}: maps differ\n{}\n{}",
                        show_map(&a),
                        show_map(&b)
                    );
                }
            }
        }
    }
    let before = snapshot(d);
    let refused = bg_refused(
        d,
        &["convert", "-S", "1000", "-O", "raw", "src.raw", "x.raw"],
    );
    assert!(refused.contains("multiples of 512"), "{refused}");
    assert_unchanged(d, &before, "a refused -S");
}

/// `convert -c`: compressed qcow2 output (zlib and zstd, every cluster
/// size) that qemu-img reads as the source, `qemu-img check` finds clean
/// with compressed clusters counted, about as small as qemu-img's own,
/// and that qemu-io can write into; raw output and `-B` refuse `-c`.
#[test]
fn convert_compressed_output_reads_in_qemu() {
    use Fill::*;
    let t = tmpdir();
    let d = t.path();
    let kinds = [
        Text,
        Random,
        FewSymbols,
        Zero,
        HalfRandom,
        Byte(9),
        Text,
        Text,
    ];
    let data = mixed_data(&kinds, 300 * 1024, 0x0dd_c0de);
    let data = &data[..data.len() / 512 * 512];
    fs::write(d.join("src.raw"), data).unwrap();
    for compression in ["zlib", "zstd"] {
        for cluster in ["512", "4k", "64k", "2M"] {
            let opt = format!("cluster_size={cluster},compression_type={compression}");
            let common = ["-c", "-f", "raw", "-O", "qcow2", "-o", &opt, "src.raw"];
            bg_ok(
                d,
                &[&["convert"][..], &common[..], &["ours.qcow2"][..]].concat(),
            );
            qemu_img(
                d,
                &[&["convert"][..], &common[..], &["qemu.qcow2"][..]].concat(),
            );
            let what = format!("-c {opt}");
            let check = Json::parse(&qemu_img(d, &["check", "--output=json", "ours.qcow2"]));
            assert!(
                check.u64_field("compressed-clusters") > 0,
                "{what}: {check:?}"
            );
            let guest = qemu_guest_data(d, "ours.qcow2");
            assert_same_bytes(&what, data, &guest);
            let (ours, theirs) = (
                fs::metadata(d.join("ours.qcow2")).unwrap().len(),
                fs::metadata(d.join("qemu.qcow2")).unwrap().len(),
            );
            assert!(
                ours * 4 <= theirs * 5,
                "{what}: {ours} bytes, qemu-img's {theirs}"
            );
            // qemu-io copies out of our compressed clusters as it writes.
            qemu_io(d, "qcow2", "ours.qcow2", &["write -P 0x61 70000 5000"]);
            qemu_io(d, "qcow2", "qemu.qcow2", &["write -P 0x61 70000 5000"]);
            qemu_compare(d, "ours.qcow2", "qemu.qcow2", &what);
            qemu_img(d, &["check", "ours.qcow2"]);
        }
    }
    let before = snapshot(d);
    bg_refused(d, &["convert", "-c", "-O", "raw", "src.raw", "x.raw"]);
    let delta = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-B",
        "qemu.qcow2",
        "-F",
        "qcow2",
        "src.raw",
        "x.qcow2",
    ];
    bg_refused(d, &delta);
    assert_unchanged(d, &before, "refused -c");
}
