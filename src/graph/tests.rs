use super::*;
use crate::device::MemDevice;
use crate::format::qcow2::testimg::{TestImage, CLUSTER};

type TestGraph = Graph<MemDevice<'static>, 64, 4, 8>;

/// Names resolve to themselves; nothing is opened by name in these tests.
use super::NamesOnly as Names;

fn graph() -> Box<TestGraph> {
    Box::default()
}

/// Adds `image` as a writable qcow2 node named `name`; the test holds the ref.
fn add(g: &mut TestGraph, image: TestImage, name: &str) -> NodeId {
    let len = image.bytes.len() as u64;
    let mut storage = image.bytes;
    storage.resize(storage.len() + 4 * CLUSTER, 0);
    let storage: &'static mut [u8] = Box::leak(storage.into_boxed_slice());
    // Distinct storage has distinct identities (the graph refuses one image
    // open twice with conflicting permissions).
    static NEXT_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let id = NEXT_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    let file = g
        .add_device(MemDevice::new(storage, len, id).unwrap(), name)
        .unwrap();
    let node = g.open_format(file, Format::Qcow2, false).unwrap();
    g.unref(file).unwrap();
    node
}

/// A chain of qcow2 layers named `l0` (bottom) .. `lN` (top), each backed by
/// the one below; layer i stores byte `i + 1` in cluster i. Returns the
/// nodes bottom first; the test holds a reference only to the top.
fn chain(g: &mut TestGraph, layers: usize) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = Vec::new();
    for i in 0..layers {
        let below = i.checked_sub(1).map(|b| format!("l{b}"));
        let mut image = TestImage::new(
            16 * CLUSTER as u64,
            below.as_deref().map(|n| (n, Some("qcow2"))),
        );
        image.fill((i * CLUSTER) as u64, i as u8 + 1);
        let node = add(g, image, &format!("l{i}"));
        if let Some(&below) = nodes.last() {
            g.set_backing(node, Some(below)).unwrap();
            g.unref(below).unwrap();
        }
        nodes.push(node);
    }
    nodes
}

fn byte_at(g: &mut TestGraph, node: NodeId, offset: u64) -> u8 {
    let mut b = [0u8];
    g.read(node, offset, &mut b).unwrap();
    b[0]
}

fn stored_backing(g: &TestGraph, node: NodeId) -> Option<String> {
    g.qcow2(node).unwrap().backing_name().map(str::to_owned)
}

fn device_bytes(g: &mut TestGraph, node: NodeId) -> Vec<u8> {
    let file = g.file(node).unwrap().unwrap();
    g.device_mut(file).unwrap().contents().to_vec()
}

#[test]
fn reads_walk_the_chain_with_zero_clusters_and_short_backing() {
    let mut g = graph();
    let mut base = TestImage::new(4 * CLUSTER as u64, None);
    base.fill(0, 0xaa);
    base.fill(CLUSTER as u64, 0xbb);
    let base = add(&mut g, base, "base");
    let mut top = TestImage::new(16 * CLUSTER as u64, Some(("base", Some("qcow2"))));
    top.zero(CLUSTER as u64);
    top.fill(2 * CLUSTER as u64, 0xcc);
    let top = add(&mut g, top, "top");
    g.set_backing(top, Some(base)).unwrap();
    g.unref(base).unwrap();

    let mut buf = vec![0xffu8; 8 * CLUSTER];
    g.read(top, 0, &mut buf).unwrap();
    assert!(
        buf[..CLUSTER].iter().all(|&b| b == 0xaa),
        "unallocated reads backing"
    );
    assert!(
        buf[CLUSTER..2 * CLUSTER].iter().all(|&b| b == 0),
        "zero cluster hides backing"
    );
    assert!(buf[2 * CLUSTER..3 * CLUSTER].iter().all(|&b| b == 0xcc));
    assert!(
        buf[3 * CLUSTER..].iter().all(|&b| b == 0),
        "backing end and beyond read zero"
    );
    let (status, run) = g
        .block_status(top, 5 * CLUSTER as u64, CLUSTER as u64)
        .unwrap();
    assert_eq!(
        (status.depth, status.present, status.zero, run),
        (0, false, true, CLUSTER as u64)
    );
    assert_eq!(
        g.read(top, 15 * CLUSTER as u64, &mut buf)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    g.unref(top).unwrap();
    assert_eq!(g.node_count(), 0);
}

#[test]
fn drop_intermediate_general_case_rewrites_overlay_and_releases() {
    let mut g = graph();
    let n = chain(&mut g, 4); // l0 <- l1 <- l2 <- l3
    let (l0, l1, l2, l3) = (n[0], n[1], n[2], n[3]);
    g.drop_intermediate(&mut Names, l3, l2, Some(l0)).unwrap();
    assert_eq!(g.backing(l3).unwrap(), Some(l0));
    assert_eq!(stored_backing(&g, l3).as_deref(), Some("l0"));
    assert!(!g.contains(l1) && !g.contains(l2));
    assert_eq!(g.refcount(l0).unwrap(), 1);
    // l3's own data and l0's show; l1/l2's are gone.
    assert_eq!(byte_at(&mut g, l3, 3 * CLUSTER as u64), 4);
    assert_eq!(byte_at(&mut g, l3, 0), 1);
    assert_eq!(byte_at(&mut g, l3, CLUSTER as u64), 0);
    // The rewritten header reopens with the new reference.
    let bytes = device_bytes(&mut g, l3);
    let mut copy = bytes.clone();
    let mut dev = MemDevice::new(&mut copy, bytes.len() as u64, 99).unwrap();
    let reopened = Qcow2::open(&mut dev).unwrap();
    assert_eq!(
        (reopened.backing_name(), reopened.backing_format()),
        (Some("l0"), Some("qcow2"))
    );
    g.unref(l3).unwrap();
    assert_eq!(g.node_count(), 0);
}

#[test]
fn drop_intermediate_without_base_removes_the_backing_file() {
    let mut g = graph();
    let n = chain(&mut g, 3);
    g.drop_intermediate(&mut Names, n[2], n[1], None).unwrap();
    assert_eq!(g.backing(n[2]).unwrap(), None);
    assert_eq!(stored_backing(&g, n[2]), None);
    assert_eq!(g.node_count(), 2);
    g.unref(n[2]).unwrap();
    assert_eq!(g.node_count(), 0);
}

#[test]
fn dropping_the_active_layer_repoints_every_backend() {
    let mut g = graph();
    let n = chain(&mut g, 3);
    let (l0, l2) = (n[0], n[2]);
    let a = g.attach_backend(l2, Access::READ_ONLY_DEVICE).unwrap();
    let b = g.attach_backend(l2, Access::READ_WRITE_DEVICE).unwrap();
    g.unref(l2).unwrap();
    let before = device_bytes(&mut g, l2);
    g.set_read_only(l0, true).unwrap();
    g.drop_intermediate(&mut Names, l2, l2, Some(l0)).unwrap();
    assert_eq!((g.root(a).unwrap(), g.root(b).unwrap()), (l0, l0));
    assert!(!g.contains(l2), "the dropped active layer is released");
    assert!(
        !g.is_read_only(l0).unwrap(),
        "base opened for the writing device"
    );
    assert_eq!(g.refcount(l0).unwrap(), 2);
    let _ = before;
    g.detach_backend(a).unwrap();
    g.detach_backend(b).unwrap();
    assert_eq!(g.node_count(), 0);
    // Without a base, a device would be left with nothing.
    let n = chain(&mut g, 2);
    let a = g.attach_backend(n[1], Access::READ_ONLY_DEVICE).unwrap();
    let err = g
        .drop_intermediate(&mut Names, n[1], n[1], None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(g.root(a).unwrap(), n[1]);
}

#[test]
fn validation_errors_and_no_op() {
    let mut g = graph();
    let n = chain(&mut g, 3);
    let other = chain(&mut g, 1)[0];
    let snapshot: Vec<_> = n
        .iter()
        .map(|&x| (g.refcount(x).unwrap(), g.backing(x).unwrap()))
        .collect();
    let kind = |r: Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(g.drop_intermediate(&mut Names, n[2], other, None)),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(g.drop_intermediate(&mut Names, n[2], n[0], Some(n[1]))),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(g.drop_intermediate(&mut Names, n[2], n[1], Some(other))),
        ErrorKind::InvalidInput
    );
    g.drop_intermediate(&mut Names, n[2], n[1], Some(n[1]))
        .unwrap();
    let after: Vec<_> = n
        .iter()
        .map(|&x| (g.refcount(x).unwrap(), g.backing(x).unwrap()))
        .collect();
    assert_eq!(snapshot, after);
    g.unref(other).unwrap();
    assert_eq!(
        kind(g.drop_intermediate(&mut Names, n[2], other, None)),
        ErrorKind::StaleHandle
    );
}

#[test]
fn failed_header_write_or_flush_changes_nothing() {
    for fail_at in [0, 1] {
        let mut g = graph();
        let n = chain(&mut g, 3);
        let before = device_bytes(&mut g, n[2]);
        let file = g.file(n[2]).unwrap().unwrap();
        g.device_mut(file)
            .unwrap()
            .fail_operation(Some(fail_at + 1)); // after the header read
        let err = g
            .drop_intermediate(&mut Names, n[2], n[1], Some(n[0]))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(g.backing(n[2]).unwrap(), Some(n[1]));
        assert!(g.contains(n[1]));
        assert_eq!(stored_backing(&g, n[2]).as_deref(), Some("l1"));
        g.device_mut(file).unwrap().fail_operation(None);
        assert_eq!(
            device_bytes(&mut g, n[2]),
            before,
            "a failed write or flush leaves the image as it was"
        );
        // A retry succeeds.
        g.drop_intermediate(&mut Names, n[2], n[1], Some(n[0]))
            .unwrap();
        assert_eq!(g.backing(n[2]).unwrap(), Some(n[0]));
    }
}

#[test]
fn shared_nodes_survive_every_parent_of_top_moves_and_frozen_links_are_busy() {
    let mut g = graph();
    let n = chain(&mut g, 4); // l0 <- l1 <- l2 <- l3
                              // A second chain shares l1 as its backing.
    let second = add(
        &mut g,
        TestImage::new(16 * CLUSTER as u64, Some(("l1", Some("qcow2")))),
        "second",
    );
    g.set_backing(second, Some(n[1])).unwrap();
    g.drop_intermediate(&mut Names, n[3], n[2], Some(n[0]))
        .unwrap();
    assert!(!g.contains(n[2]));
    assert!(g.contains(n[1]), "still used by the second chain");
    assert_eq!(g.backing(second).unwrap(), Some(n[1]));
    assert_eq!(byte_at(&mut g, second, CLUSTER as u64), 2);

    // Now l1 has one parent, `second`; a third overlay joins, and dropping
    // l1 re-points (and rewrites) both of them.
    let third = add(
        &mut g,
        TestImage::new(16 * CLUSTER as u64, Some(("l1", Some("qcow2")))),
        "third",
    );
    g.set_backing(third, Some(n[1])).unwrap();
    g.freeze_backing(second).unwrap();
    let err = g
        .drop_intermediate(&mut Names, second, n[1], Some(n[0]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(
        g.set_backing(second, None).unwrap_err().kind(),
        ErrorKind::Busy
    );
    g.unfreeze_backing(second).unwrap();
    g.drop_intermediate(&mut Names, second, n[1], Some(n[0]))
        .unwrap();
    assert!(!g.contains(n[1]));
    for overlay in [second, third] {
        assert_eq!(g.backing(overlay).unwrap(), Some(n[0]));
        assert_eq!(stored_backing(&g, overlay).as_deref(), Some("l0"));
    }
}

#[test]
fn permissions_refuse_writers_on_backing_images() {
    let mut g = graph();
    let n = chain(&mut g, 2);
    let err = g
        .attach_backend(n[0], Access::READ_WRITE_DEVICE)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    let reader = g.attach_backend(n[0], Access::READ_ONLY_DEVICE).unwrap();
    let writer = g.attach_backend(n[1], Access::READ_WRITE_DEVICE).unwrap();
    assert_eq!(
        g.replace_root(writer, n[0]).unwrap_err().kind(),
        ErrorKind::PermissionConflict
    );
    assert_eq!(g.root(writer).unwrap(), n[1]);
    g.replace_root(reader, n[1]).unwrap();
    assert_eq!(
        g.set_backing(n[0], Some(n[1])).unwrap_err().kind(),
        ErrorKind::InvalidInput,
        "cycle"
    );
}

#[test]
fn attaching_hands_every_reference_to_the_backend_and_failures_leak_nothing() {
    let mut g = graph();
    let mut image = TestImage::new(16 * CLUSTER as u64, None);
    image.fill(0, 7);
    let bytes: &'static mut [u8] = Box::leak(image.bytes.into_boxed_slice());
    let len = bytes.len() as u64;
    let device = MemDevice::new(bytes, len, 1).unwrap();
    let guest = g
        .attach_device(device, "disk", Format::Qcow2, Access::READ_ONLY_DEVICE)
        .unwrap();
    assert_eq!(g.node_count(), 2, "the image and its file");
    let mut first = [0u8];
    g.backend_read(guest, 0, &mut first).unwrap();
    assert_eq!(first, [7]);
    g.detach_backend(guest).unwrap();
    assert_eq!(g.node_count(), 0, "detaching closed everything");

    // Not a qcow2 image: refused, and nothing stays open.
    let junk: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
    let device = MemDevice::new(junk, 4096, 2).unwrap();
    let refused = g.attach_device(device, "junk", Format::Qcow2, Access::READ_ONLY_DEVICE);
    assert!(refused.is_err());
    assert_eq!(g.node_count(), 0);
    let missing = g.attach_image(
        &mut Names,
        "nowhere",
        OpenOptions::new(Format::Qcow2).writable(),
        Access::READ_WRITE_DEVICE,
    );
    assert_eq!(missing.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(g.node_count(), 0);
}

#[test]
fn the_backend_carries_every_request_kind_permission_checked() {
    let mut g = graph();
    let n = chain(&mut g, 2);
    let reader = g.attach_backend(n[1], Access::READ_ONLY_DEVICE).unwrap();
    let cs = CLUSTER as u64;
    for refused in [
        g.backend_write_zeroes(reader, 0, cs),
        g.backend_discard(reader, 0, cs),
        g.backend_write(reader, 0, &[1]),
    ] {
        assert_eq!(refused.unwrap_err().kind(), ErrorKind::ReadOnly);
    }
    assert_eq!(g.backend_size(reader).unwrap(), 16 * cs);
    // l1 holds its own cluster 1; cluster 0 comes from l0 (depth 1).
    let (own, run) = g.backend_block_status(reader, cs, cs).unwrap();
    assert!(
        own.present && own.data && own.depth == 0 && run == cs,
        "{own:?}"
    );
    let (below, _) = g.backend_block_status(reader, 0, cs).unwrap();
    assert!(below.present && below.depth == 1, "{below:?}");
    // (What zero writes and discards do through a writable backend is
    // checked against qemu-io: the CLI's `io` sends them this way.)
    g.detach_backend(reader).unwrap();
}

#[test]
fn deep_chains_release_without_recursion_and_pool_exhaustion_is_an_error() {
    let mut g: Box<Graph<MemDevice<'static>, 200, 1, 4>> = Box::default();
    let mut below: Option<NodeId> = None;
    for i in 0..100 {
        let storage: &'static mut [u8] = Box::leak(
            TestImage::new(CLUSTER as u64, None)
                .bytes
                .into_boxed_slice(),
        );
        let len = storage.len() as u64;
        let file = g
            .add_device(MemDevice::new(storage, len, i).unwrap(), "x")
            .unwrap();
        let node = g.open_format(file, Format::Qcow2, true).unwrap();
        g.unref(file).unwrap();
        if let Some(b) = below {
            g.set_backing(node, Some(b)).unwrap();
            g.unref(b).unwrap();
        }
        below = Some(node);
    }
    assert_eq!(g.node_count(), 200);
    let storage: &'static mut [u8] = Box::leak(vec![0u8; 16].into_boxed_slice());
    let err = g
        .add_device(MemDevice::new(storage, 16, 0).unwrap(), "x")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
    let top = below.unwrap();
    g.unref(top).unwrap();
    assert_eq!(g.node_count(), 0);
    assert_eq!(g.unref(top).unwrap_err().kind(), ErrorKind::StaleHandle);
}

#[test]
fn collapse_costs_one_header_write_and_one_flush_whatever_the_depth() {
    for depth in [3usize, 8, 16] {
        let mut g = graph();
        let n = chain(&mut g, depth);
        let counts = |g: &mut TestGraph, node: NodeId| {
            let file = g.file(node).unwrap().unwrap();
            let dev = g.device_mut(file).unwrap();
            (dev.writes(), dev.flushes())
        };
        let before: Vec<_> = n.iter().map(|&x| counts(&mut g, x)).collect();
        let active = *n.last().unwrap();
        // Drop everything between the bottom and the active layer.
        g.drop_intermediate(&mut Names, active, n[depth - 2], Some(n[0]))
            .unwrap();
        let (writes, flushes) = counts(&mut g, active);
        let (w0, f0) = before[depth - 1];
        assert_eq!((writes - w0, flushes - f0), (1, 1), "depth {depth}");
        assert_eq!(
            counts(&mut g, n[0]),
            before[0],
            "base untouched at depth {depth}"
        );
        assert_eq!(g.node_count(), 4, "only the active layer and base remain");
    }
}

/// A fresh qcow2 image of `size` bytes (64 KiB clusters) in `storage`.
fn created(storage: &mut [u8], size: u64, id: u64) -> MemDevice<'_> {
    let mut device = MemDevice::new(storage, 0, id).unwrap();
    crate::format::qcow2::create::create(
        &mut device,
        &crate::format::qcow2::create::CreateOptions::new(size),
    )
    .unwrap();
    device
}

/// The byte at `offset` of the qcow2 image `bytes`, opened afresh.
fn reopened_byte(bytes: &[u8], offset: u64) -> u8 {
    let mut copy = bytes.to_vec();
    let len = copy.len() as u64;
    let mut g: Box<Graph<MemDevice<'_>, 4, 1, 4>> = Box::default();
    let file = g
        .add_device(MemDevice::new(&mut copy, len, 9).unwrap(), "copy")
        .unwrap();
    let node = g.open_format(file, Format::Qcow2, true).unwrap();
    let mut b = [0u8];
    g.read(node, offset, &mut b).unwrap();
    b[0]
}

#[test]
fn table_updates_stay_cached_until_a_flush_close_or_drop() {
    let mut storage = vec![0u8; 4 << 20];
    {
        let mut g: Box<Graph<MemDevice<'_>, 4, 1, 8>> = Box::default();
        let file = g
            .add_device(created(&mut storage, 1 << 20, 1), "a")
            .unwrap();
        let node = g.open_format(file, Format::Qcow2, false).unwrap();
        g.unref(file).unwrap();
        let flushes = g.device_mut(file).unwrap().flushes();
        for cluster in 0..4u64 {
            g.write(node, cluster * 65536 + 512, &[0x5a; 512]).unwrap();
        }
        // Data went out; no flush, and no mapping on disk yet.
        let device = g.device_mut(file).unwrap();
        assert_eq!(device.flushes(), flushes);
        assert_eq!(reopened_byte(device.contents(), 512), 0);
        let mut b = [0u8];
        g.read(node, 3 * 65536 + 512, &mut b).unwrap();
        assert_eq!(b[0], 0x5a);
        g.flush(node).unwrap();
        let device = g.device_mut(file).unwrap();
        assert_eq!(reopened_byte(device.contents(), 3 * 65536 + 512), 0x5a);
        g.write(node, 5 * 65536, &[0x6b; 512]).unwrap();
        // Dropped with a node still open: written back all the same.
    }
    assert_eq!(reopened_byte(&storage, 5 * 65536), 0x6b);
    {
        let mut g: Box<Graph<MemDevice<'_>, 4, 1, 8>> = Box::default();
        let len = storage.len() as u64;
        let file = g
            .add_device(MemDevice::new(&mut storage, len, 1).unwrap(), "a")
            .unwrap();
        let node = g.open_format(file, Format::Qcow2, false).unwrap();
        g.unref(file).unwrap();
        g.write(node, 6 * 65536, &[0x7c; 512]).unwrap();
        g.unref(node).unwrap();
    }
    assert_eq!(reopened_byte(&storage, 6 * 65536), 0x7c);
}

/// Adds a second device over "the same disk" as an earlier one (same
/// identity, as the kernel's disk opened twice by serial) holding `image`.
fn add_device_with_id(g: &mut TestGraph, image: &TestImage, id: u64) -> NodeId {
    let storage: &'static mut [u8] = Box::leak(image.bytes.clone().into_boxed_slice());
    let len = storage.len() as u64;
    g.add_device(MemDevice::new(storage, len, id).unwrap(), "disk")
        .unwrap()
}

#[test]
fn one_storage_twice_is_refused_when_permissions_conflict_before_anything_is_read() {
    let mut g = graph();
    let image = TestImage::new(16 * CLUSTER as u64, None);
    let first = add_device_with_id(&mut g, &image, 7000);
    let second = add_device_with_id(&mut g, &image, 7000);
    let writer = g.open_format(first, Format::Qcow2, false).unwrap();
    for read_only in [false, true] {
        let err = g.open_format(second, Format::Qcow2, read_only).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionConflict);
        assert!(err.message().contains("already open in this graph"));
    }
    assert_eq!(g.device_mut(second).unwrap().reads(), 0, "refused unread");
    // Readers coexist, and a reader cannot become a writer beside another.
    g.set_read_only(writer, true).unwrap();
    let reader = g.open_format(second, Format::Qcow2, true).unwrap();
    let err = g.set_read_only(writer, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert!(g.is_read_only(writer).unwrap());
    g.unref(reader).unwrap();
    g.set_read_only(writer, false).unwrap();
    g.unref(writer).unwrap();
    g.unref(first).unwrap();
    g.unref(second).unwrap();
    assert_eq!(g.node_count(), 0);
}
