//! Active commit with random guest I/O interleaved.

use super::*;

pub(crate) fn active_commit_with_guest_io(seed: u64, cluster: u64) {
    let size = (4 + seed % 5) * MIB;
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(seed);
    // Sometimes a lower layer is shorter: base grows, and past a short mid
    // the active layer reads zeros that must reach base as zeros.
    let base_size = if rng.below(3) == 0 { size / 2 } else { size };
    let mid_size = if rng.below(3) == 0 { size / 2 } else { size };
    // Sometimes commit into mid: base stays below it.
    let into_mid = rng.below(3) == 0;
    println!(
        "seed {seed}: cluster {cluster}, size {size}, base {base_size}, mid {mid_size}, \
         into mid: {into_mid}"
    );
    make_layer(d, "base.qcow2", base_size, cluster, None, &mut rng, 12);
    make_layer(
        d,
        "mid.qcow2",
        mid_size,
        cluster,
        Some("base.qcow2"),
        &mut rng,
        10,
    );
    make_layer(
        d,
        "active.qcow2",
        size,
        cluster,
        Some("mid.qcow2"),
        &mut rng,
        8,
    );
    let view = guest_view(d, "active.qcow2");
    assert_eq!(view.len() as u64, size);
    let mut guest = Guest::new(seed ^ 0xa11c, view, cluster);

    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let nodes = chain(&graph, active);
    assert_eq!(nodes.len(), 3);
    let (mid, base) = (nodes[1], nodes[2]);
    let (target, target_name) = if into_mid {
        (mid, "mid.qcow2")
    } else {
        (base, "base.qcow2")
    };
    let job = graph
        .start_commit(CommitRequest {
            active,
            top: active,
            base: target,
            on_error: OnError::Report,
        })
        .unwrap();
    let first = info(&graph, job);
    assert_eq!(
        (first.kind, first.active_commit, first.status, first.ready),
        (JobKind::Commit, true, JobStatus::Created, false)
    );
    assert_eq!(
        graph.job_complete(job).map_err(|e| e.kind()),
        Err(ErrorKind::InvalidInput),
        "complete before READY"
    );
    let mut scratch = vec![0u8; SCRATCH];

    // Running: guest I/O between steps until the guest goes quiet (an active
    // commit only converges when the guest dirties less than a step copies).
    let io_steps = 40 + rng.below(200);
    let mut steps = 0u64;
    loop {
        let status = graph.job_step(job, &mut resolver, &mut scratch).unwrap();
        steps += 1;
        let now = info(&graph, job);
        assert_eq!((now.error, now.io_status), (None, IoStatus::Ok), "{now:?}");
        assert!(now.offset <= now.len, "{now:?}");
        if status == JobStatus::Ready {
            assert!(now.ready);
            break;
        }
        assert_eq!(status, JobStatus::Running);
        assert!(steps < STEP_LIMIT, "active commit never became READY");
        if steps < io_steps {
            guest.burst(&mut graph, backend);
        }
        if rng.below(50) == 0 {
            pause_round(
                &mut graph,
                &mut resolver,
                job,
                &mut scratch,
                &mut guest,
                backend,
            );
        }
    }
    assert_eq!(
        graph.root(backend).unwrap(),
        active,
        "pivot before complete"
    );

    // Ready: the guest keeps writing; the job keeps re-copying.
    for _ in 0..5 + rng.below(20) {
        guest.burst(&mut graph, backend);
        assert_eq!(
            graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
            JobStatus::Ready
        );
        if rng.below(8) == 0 {
            pause_round(
                &mut graph,
                &mut resolver,
                job,
                &mut scratch,
                &mut guest,
                backend,
            );
        }
    }
    assert_eq!(graph.root(backend).unwrap(), active);
    assert_same(
        "view while READY",
        &read_backend(&mut graph, backend),
        &guest.shadow,
    );

    // Complete (maybe with dirty data left): a few more writes, then steps
    // until the pivot.
    graph.job_complete(job).unwrap();
    let mut after = 0;
    loop {
        if after < 3 {
            guest.burst(&mut graph, backend);
        }
        let status = graph.job_step(job, &mut resolver, &mut scratch).unwrap();
        after += 1;
        if status == JobStatus::Concluded {
            break;
        }
        assert_eq!(status, JobStatus::Ready);
        assert!(after < STEP_LIMIT, "complete never pivoted");
    }
    let last = info(&graph, job);
    assert_eq!(
        (last.error, last.cancelled, last.io_status),
        (None, false, IoStatus::Ok)
    );
    assert_eq!(last.offset, last.len, "progress at the end: {last:?}");
    assert_eq!(graph.root(backend).unwrap(), target, "backend not pivoted");
    assert!(!graph.contains(active));
    let expected_chain = if into_mid {
        vec![mid, base]
    } else {
        vec![base]
    };
    assert_eq!(chain(&graph, target), expected_chain);
    assert!(!graph.is_read_only(target).unwrap());
    assert_eq!(graph.size(target).unwrap(), size);
    // The guest goes on, on base.
    for _ in 0..5 {
        guest.burst(&mut graph, backend);
    }
    assert_same(
        &format!("seed {seed}: view after the pivot"),
        &read_backend(&mut graph, backend),
        &guest.shadow,
    );
    graph.job_dismiss(job).unwrap();
    assert_eq!(
        graph.job_info(job).map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::StaleHandle)
    );
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
    drop(graph);
    println!(
        "seed {seed}: {steps} steps to READY, {} guest requests, {last:?}",
        guest.ops
    );
    for img in ["base.qcow2", "mid.qcow2", "active.qcow2"] {
        check(d, img);
    }
    assert_same(
        &format!("seed {seed}: qemu-img's view of {target_name}"),
        &guest_view(d, target_name),
        &guest.shadow,
    );
}

/// A guest that writes far more per step than a step copies keeps a
/// background active commit from ever becoming ready; switched to
/// write-blocking, the same job becomes ready within about one pass over
/// the disk whatever the guest does, pivots, and base holds every write.
#[test]
fn write_blocking_active_commit_converges_under_a_guest_that_outruns_it() {
    let (size, cluster) = (4 * MIB, 64 * KIB);
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(0x0b10c);
    make_layer(d, "base.qcow2", size, cluster, None, &mut rng, 12);
    make_layer(
        d,
        "active.qcow2",
        size,
        cluster,
        Some("base.qcow2"),
        &mut rng,
        8,
    );
    let mut guest = Guest::new(0xfa57, guest_view(d, "active.qcow2"), cluster);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let base = chain(&graph, active)[1];
    let request = CommitRequest {
        active,
        top: active,
        base,
        on_error: OnError::Report,
    };
    let job = graph.start_commit(request).unwrap();
    assert_eq!(info(&graph, job).copy_mode, CopyMode::Background);
    let mut scratch = vec![0u8; SCRATCH];
    // Three passes' worth of steps, each after 8 guest requests (about 300
    // KiB written against 64 KiB copied): never ready in background mode.
    let pass = size / SCRATCH as u64;
    let mut outrun = |graph: &mut FileGraph, guest: &mut Guest, resolver: &mut PathResolver| {
        for _ in 0..8 {
            guest.one(graph, backend);
        }
        graph.job_step(job, resolver, &mut scratch).unwrap()
    };
    for step in 0..3 * pass {
        let status = outrun(&mut graph, &mut guest, &mut resolver);
        assert_eq!(
            status,
            JobStatus::Running,
            "background caught up at step {step}"
        );
    }

    graph
        .job_change_copy_mode(job, CopyMode::WriteBlocking)
        .unwrap();
    assert_eq!(info(&graph, job).copy_mode, CopyMode::WriteBlocking);
    let mut steps = 0;
    while outrun(&mut graph, &mut guest, &mut resolver) != JobStatus::Ready {
        steps += 1;
        assert!(
            steps <= pass + 8,
            "write-blocking did not converge: {:?}",
            info(&graph, job)
        );
    }
    graph.job_complete(job).unwrap();
    while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Concluded {}
    assert_eq!(graph.root(backend).unwrap(), base, "not pivoted");
    assert_same(
        "view after the pivot",
        &read_backend(&mut graph, backend),
        &guest.shadow,
    );
    graph.job_dismiss(job).unwrap();
    assert_eq!(
        graph
            .job_change_copy_mode(job, CopyMode::Background)
            .map_err(|e| e.kind()),
        Err(ErrorKind::StaleHandle)
    );
    graph.detach_backend(backend).unwrap();
    drop(graph);
    println!(
        "write-blocking: ready {steps} steps after the switch, {} guest requests",
        guest.ops
    );
    check(d, "base.qcow2");
    assert_same(
        "qemu-img's view of base",
        &guest_view(d, "base.qcow2"),
        &guest.shadow,
    );
}

#[test]
fn active_commit_with_guest_writes_64k_clusters() {
    for seed in [1, 2, 3, 4] {
        active_commit_with_guest_io(seed, 64 * KIB);
    }
}

#[test]
fn active_commit_with_guest_writes_512_byte_clusters() {
    for seed in [21, 22] {
        active_commit_with_guest_io(seed, 512);
    }
}
