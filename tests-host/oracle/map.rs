//! map: equals qemu-img map after normalisation.

use super::*;

#[test]
fn map_three_layer_chain() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("4M"), "", None);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 2M 512k"],
    );
    qcow2(d, "mid.qcow2", None, "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -z 256k 128k",
            "discard 2M 64k",
            "write -P 0x21 3M 100k",
        ],
    );
    qcow2(d, "top.qcow2", None, "", Some(("mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x31 512k 64k", "discard 0 64k"],
    );
    let map = assert_map_matches(d, "top.qcow2");
    assert!(
        map.iter().any(|e| e.depth == 1 && e.zero && !e.data),
        "construction:{}",
        show_map(&map)
    );
    assert!(
        map.iter().any(|e| !e.present),
        "construction:{}",
        show_map(&map)
    );
    assert_map_matches(d, "mid.qcow2");
    assert_map_matches(d, "base.qcow2");
    assert_convert_matches(d, "top.qcow2");
}

#[test]
fn map_overlay_longer_than_backing() {
    let t = tmpdir();
    let d = t.path();
    qcow2(d, "base.qcow2", Some("1M"), "", None);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(
        d,
        "top.qcow2",
        Some("4M"),
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x22 0 64k", "write -P 0x23 2M 64k"],
    );
    assert_map_matches(d, "top.qcow2");
}

#[test]
fn map_small_clusters_and_many_layers() {
    let t = tmpdir();
    let top = data_chain(t.path(), "cluster_size=512");
    assert_map_matches(t.path(), top);
    let t = tmpdir();
    let top = sixteen_layers(t.path());
    assert_map_matches(t.path(), top);
}
