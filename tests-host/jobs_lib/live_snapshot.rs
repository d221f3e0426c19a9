//! Live snapshot during guest I/O.

use super::*;

#[test]
fn live_snapshot_during_guest_io() {
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(101);
    let size = 4 * MIB;
    make_layer(d, "base.qcow2", size, 64 * KIB, None, &mut rng, 10);
    make_layer(
        d,
        "active.qcow2",
        size,
        64 * KIB,
        Some("base.qcow2"),
        &mut rng,
        8,
    );
    let mut guest = Guest::new(101, guest_view(d, "active.qcow2"), 64 * KIB);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let base = graph.backing(active).unwrap().unwrap();
    for _ in 0..20 {
        guest.one(&mut graph, backend);
    }
    let snap_path = path(d, "snap.qcow2");
    let device = FileDevice::create(Path::new(&snap_path)).unwrap();
    let overlay = graph
        .snapshot(&mut resolver, active, device, &snap_path)
        .unwrap();
    graph.unref(overlay).unwrap();
    assert_eq!(graph.root(backend).unwrap(), overlay, "backend not moved");
    assert_eq!(chain(&graph, overlay), vec![overlay, active, base]);
    assert!(graph.is_read_only(active).unwrap());
    assert_eq!(
        graph.write(active, 0, &[1]).map_err(|e| e.kind()),
        Err(ErrorKind::ReadOnly)
    );
    let at_snapshot = guest.shadow.clone();
    let active_bytes = std::fs::read(d.join("active.qcow2")).unwrap();
    assert_same(
        "view right after the snapshot",
        &read_backend(&mut graph, backend),
        &at_snapshot,
    );
    for _ in 0..60 {
        guest.one(&mut graph, backend);
    }
    assert_same("view", &read_backend(&mut graph, backend), &guest.shadow);
    assert!(
        std::fs::read(d.join("active.qcow2")).unwrap() == active_bytes,
        "the snapshotted image changed"
    );
    assert_same(
        "qemu-img's view of the old active layer",
        &guest_view(d, "active.qcow2"),
        &at_snapshot,
    );

    // Commit the overlay back (active commit); a second snapshot is refused
    // while the job tracks the overlay's writes.
    let job = graph
        .start_commit(CommitRequest {
            active: overlay,
            top: overlay,
            base: active,
            on_error: OnError::Report,
        })
        .unwrap();
    let device = FileDevice::create(&d.join("snap2.qcow2")).unwrap();
    assert_eq!(
        graph
            .snapshot(&mut resolver, overlay, device, &path(d, "snap2.qcow2"))
            .map(|_| ())
            .map_err(|e| e.kind()),
        Err(ErrorKind::Busy)
    );
    let mut scratch = vec![0u8; SCRATCH];
    let mut steps = 0;
    while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Ready {
        steps += 1;
        assert!(steps < STEP_LIMIT);
        if steps < 30 {
            guest.burst(&mut graph, backend);
        }
    }
    graph.job_complete(job).unwrap();
    let last = finish(&mut graph, &mut resolver, job, &mut scratch);
    assert_eq!(last.error, None);
    assert_eq!(graph.root(backend).unwrap(), active);
    assert_eq!(chain(&graph, active), vec![active, base]);
    assert_same(
        "view after committing back",
        &read_backend(&mut graph, backend),
        &guest.shadow,
    );
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
    drop(graph);
    for img in ["base.qcow2", "active.qcow2", "snap.qcow2"] {
        check(d, img);
    }
    assert_same(
        "qemu-img's view",
        &guest_view(d, "active.qcow2"),
        &guest.shadow,
    );
}

/// A snapshot of a layer a stream job writes into must either be refused
/// (QEMU: the node is busy with a block job) or leave the stream working.
#[test]
fn snapshot_during_stream_does_not_break_the_stream() {
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(111);
    make_layer(d, "base.qcow2", 2 * MIB, 64 * KIB, None, &mut rng, 8);
    make_layer(
        d,
        "top.qcow2",
        2 * MIB,
        64 * KIB,
        Some("base.qcow2"),
        &mut rng,
        4,
    );
    let view = guest_view(d, "top.qcow2");
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "top.qcow2"));
    let job = graph
        .start_stream(StreamRequest {
            active: top,
            base: None,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut scratch = vec![0u8; SCRATCH];
    for _ in 0..4 {
        graph.job_step(job, &mut resolver, &mut scratch).unwrap();
    }
    let snap_path = path(d, "snap.qcow2");
    let device = FileDevice::create(Path::new(&snap_path)).unwrap();
    let snapshot = graph.snapshot(&mut resolver, top, device, &snap_path);
    println!(
        "snapshot during stream: {:?}",
        snapshot.map_err(|e| e.kind())
    );
    if let Ok(overlay) = snapshot {
        graph.unref(overlay).unwrap();
    }
    let last = finish(&mut graph, &mut resolver, job, &mut scratch);
    assert!(
        snapshot.is_err() || last.error.is_none(),
        "the snapshot was taken, then the stream failed: {last:?}"
    );
    assert_same("view", &read_backend(&mut graph, backend), &view);
    graph.detach_backend(backend).unwrap();
}
