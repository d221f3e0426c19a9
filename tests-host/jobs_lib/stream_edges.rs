//! Stream edge cases.

use super::*;

#[test]
fn stream_to_the_direct_backing_file_is_a_no_op() {
    let dir = scratch_dir();
    let d = dir.path();
    three_layers(d, 81, 2 * MIB, 64 * KIB);
    let before = std::fs::read(d.join("active.qcow2")).unwrap();
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let nodes = chain(&graph, active);
    let job = graph
        .start_stream(StreamRequest {
            active,
            base: Some(nodes[1]),
            on_error: OnError::Report,
        })
        .unwrap();
    assert_eq!(info(&graph, job).len, 0);
    let mut scratch = vec![0u8; SCRATCH];
    let mut steps = 0;
    while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Concluded {
        steps += 1;
        assert!(steps < 3, "a no-op stream takes steps");
    }
    let last = info(&graph, job);
    assert_eq!((last.offset, last.len, last.error), (0, 0, None));
    assert_eq!(chain(&graph, active), nodes);
    graph.job_dismiss(job).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    assert!(
        std::fs::read(d.join("active.qcow2")).unwrap() == before,
        "a no-op stream changed the image"
    );
}

/// 030 TestSmallerBackingFile: backing 1 MiB under a 2 MiB top.
#[test]
fn stream_with_a_shorter_backing_file() {
    let dir = scratch_dir();
    let d = dir.path();
    create(d, "base.qcow2", MIB, 64 * KIB, None);
    qemu_io(d, "base.qcow2", &["write -P 0x5a 0 1M".to_owned()]);
    create(d, "top.qcow2", 2 * MIB, 64 * KIB, Some("base.qcow2"));
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0x33 0 64k".to_owned(),
            "write -P 0x44 1536k 64k".to_owned(),
        ],
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
    let last = finish(&mut graph, &mut resolver, job, &mut scratch);
    assert_eq!(last.error, None);
    assert_eq!(graph.backing(top).unwrap(), None);
    assert_same("view", &read_backend(&mut graph, backend), &view);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    check(d, "top.qcow2");
    assert_same("qemu-img's view", &guest_view(d, "top.qcow2"), &view);
}

/// base (2 MiB, data everywhere) <- mid (1 MiB) <- top (2 MiB): past mid's
/// end top reads zeros, which hide base's data; streaming mid into top (base
/// kept) must keep them hidden.
#[test]
fn stream_keeps_zeros_past_a_short_intermediate_layer() {
    let dir = scratch_dir();
    let d = dir.path();
    create(d, "base.qcow2", 2 * MIB, 64 * KIB, None);
    qemu_io(d, "base.qcow2", &["write -P 0x5a 0 2M".to_owned()]);
    create(d, "mid.qcow2", MIB, 64 * KIB, Some("base.qcow2"));
    qemu_io(d, "mid.qcow2", &["write -P 0x66 256k 128k".to_owned()]);
    create(d, "top.qcow2", 2 * MIB, 64 * KIB, Some("mid.qcow2"));
    qemu_io(d, "top.qcow2", &["write -P 0x33 1600k 64k".to_owned()]);
    let view = guest_view(d, "top.qcow2");
    assert!(view[(MIB + 4096) as usize..(1600 * KIB) as usize]
        .iter()
        .all(|&b| b == 0));
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "top.qcow2"));
    let nodes = chain(&graph, top);
    let job = graph
        .start_stream(StreamRequest {
            active: top,
            base: Some(nodes[2]),
            on_error: OnError::Report,
        })
        .unwrap();
    let mut scratch = vec![0u8; SCRATCH];
    let last = finish(&mut graph, &mut resolver, job, &mut scratch);
    assert_eq!(last.error, None);
    assert_eq!(chain(&graph, top), vec![top, nodes[2]]);
    assert_same("view", &read_backend(&mut graph, backend), &view);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        check(d, img);
    }
    assert_same("qemu-img's view", &guest_view(d, "top.qcow2"), &view);
}

/// 040's error cases and the verbs' state checks.
#[test]
fn invalid_job_requests_are_refused() {
    let dir = scratch_dir();
    let d = dir.path();
    three_layers(d, 91, MIB, 64 * KIB);
    create(d, "other.qcow2", MIB, 64 * KIB, None);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let other = graph
        .open_image(&mut resolver, &path(d, "other.qcow2"), writable())
        .unwrap();
    let n = chain(&graph, active);
    let (mid, base) = (n[1], n[2]);
    let commit = |graph: &mut FileGraph, top, base| {
        graph
            .start_commit(CommitRequest {
                active,
                top,
                base,
                on_error: OnError::Report,
            })
            .map(|_| ())
            .map_err(|e| e.kind())
    };
    let invalid = Err(ErrorKind::InvalidInput);
    assert_eq!(commit(&mut graph, mid, mid), invalid, "top == base");
    assert_eq!(
        commit(&mut graph, base, mid),
        invalid,
        "top and base reversed"
    );
    assert_eq!(
        commit(&mut graph, mid, other),
        invalid,
        "base from another chain"
    );
    assert_eq!(
        commit(&mut graph, other, base),
        invalid,
        "top from another chain"
    );
    let stream = |graph: &mut FileGraph, node, base| {
        graph
            .start_stream(StreamRequest {
                active: node,
                base,
                on_error: OnError::Report,
            })
            .map(|_| ())
            .map_err(|e| e.kind())
    };
    assert_eq!(
        stream(&mut graph, active, Some(active)),
        invalid,
        "base is the node"
    );
    assert_eq!(
        stream(&mut graph, mid, Some(active)),
        invalid,
        "base above the node"
    );
    assert_eq!(
        stream(&mut graph, active, Some(other)),
        invalid,
        "base elsewhere"
    );
    // Nothing was left frozen by the refusals.
    for node in [active, mid, base] {
        assert!(!graph.is_frozen(node).unwrap());
    }

    let job = graph
        .start_stream(StreamRequest {
            active,
            base: None,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut scratch = vec![0u8; SCRATCH];
    assert_eq!(
        graph
            .job_step(job, &mut resolver, &mut [])
            .map(|_| ())
            .map_err(|e| e.kind()),
        invalid,
        "empty scratch"
    );
    assert_eq!(graph.job_complete(job).map_err(|e| e.kind()), invalid);
    assert_eq!(graph.job_resume(job).map_err(|e| e.kind()), invalid);
    assert_eq!(graph.job_dismiss(job).map_err(|e| e.kind()), invalid);
    // Frozen links refuse direct chain changes too.
    assert_eq!(
        graph.set_backing(active, Some(base)).map_err(|e| e.kind()),
        Err(ErrorKind::Busy)
    );
    assert_eq!(
        graph
            .drop_intermediate(&mut resolver, active, mid, Some(base))
            .map_err(|e| e.kind()),
        Err(ErrorKind::Busy)
    );
    graph.job_cancel(job).unwrap();
    assert_eq!(graph.job_cancel(job).map_err(|e| e.kind()), invalid);
    assert_eq!(graph.job_pause(job).map_err(|e| e.kind()), invalid);
    finish(&mut graph, &mut resolver, job, &mut scratch);
    graph.job_dismiss(job).unwrap();
    assert_eq!(
        graph.job_info(job).map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::StaleHandle)
    );
    for node in [active, mid, base] {
        assert!(!graph.is_frozen(node).unwrap());
    }
    graph.detach_backend(backend).unwrap();
    graph.unref(other).unwrap();
    assert_eq!(graph.node_count(), 0);

    // An intermediate node on a read-only device cannot be streamed into.
    let mut graph = FileGraph::boxed();
    let options = OpenOptions {
        read_only: false,
        ..OpenOptions::probing()
    };
    let active = graph
        .open_image(&mut resolver, &path(d, "active.qcow2"), options)
        .unwrap();
    let n = chain(&graph, active);
    assert_eq!(
        stream(&mut graph, n[1], Some(n[2])),
        Err(ErrorKind::ReadOnly)
    );
    assert!(graph.is_read_only(n[1]).unwrap());
    assert!(!graph.is_frozen(n[1]).unwrap());
    graph.unref(active).unwrap();
}
