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
