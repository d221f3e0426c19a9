//! Cancel before and after READY.

use super::*;

/// Builds base <- mid <- active with data; returns the guest view.
pub(crate) fn three_layers(d: &Path, seed: u64, size: u64, cluster: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    make_layer(d, "base.qcow2", size, cluster, None, &mut rng, 12);
    make_layer(
        d,
        "mid.qcow2",
        size,
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
    guest_view(d, "active.qcow2")
}

#[test]
fn active_commit_cancelled_before_ready_keeps_the_chain() {
    for seed in [31, 32] {
        let size = 4 * MIB;
        let dir = scratch_dir();
        let d = dir.path();
        let view = three_layers(d, seed, size, 64 * KIB);
        let mut guest = Guest::new(seed, view, 64 * KIB);
        let mut graph = FileGraph::boxed();
        let mut resolver = PathResolver::default();
        let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
        let before = chain(&graph, active);
        let base = before[2];
        let job = graph
            .start_commit(CommitRequest {
                active,
                top: active,
                base,
                on_error: OnError::Report,
            })
            .unwrap();
        let mut scratch = vec![0u8; SCRATCH];
        // Fewer steps than half the first pass: never READY.
        let steps = 1 + guest.rng.below(size / SCRATCH as u64 / 2);
        for _ in 0..steps {
            guest.burst(&mut graph, backend);
            let status = graph.job_step(job, &mut resolver, &mut scratch).unwrap();
            assert_eq!(status, JobStatus::Running);
        }
        graph.job_cancel(job).unwrap();
        assert_eq!(info(&graph, job).status, JobStatus::Aborting);
        assert_eq!(
            graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
            JobStatus::Concluded
        );
        let last = info(&graph, job);
        assert!(last.cancelled && last.error.is_none(), "{last:?}");
        assert_eq!(graph.root(backend).unwrap(), active, "cancel pivoted");
        assert_eq!(chain(&graph, active), before, "cancel changed the chain");
        assert_same(
            "view after cancel",
            &read_backend(&mut graph, backend),
            &guest.shadow,
        );
        for _ in 0..10 {
            guest.burst(&mut graph, backend);
        }
        assert_same(
            "view after more writes",
            &read_backend(&mut graph, backend),
            &guest.shadow,
        );
        graph.job_dismiss(job).unwrap();
        graph.detach_backend(backend).unwrap();
        assert_eq!(graph.node_count(), 0);
        drop(graph);
        for img in ["base.qcow2", "mid.qcow2", "active.qcow2"] {
            check(d, img);
        }
        assert_same(
            "qemu-img's view of active",
            &guest_view(d, "active.qcow2"),
            &guest.shadow,
        );
    }
}

#[test]
fn active_commit_soft_cancelled_after_ready_leaves_base_consistent() {
    for seed in [41, 42] {
        let size = 4 * MIB;
        let dir = scratch_dir();
        let d = dir.path();
        let view = three_layers(d, seed, size, 64 * KIB);
        let mut guest = Guest::new(seed, view, 64 * KIB);
        let mut graph = FileGraph::boxed();
        let mut resolver = PathResolver::default();
        let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
        let before = chain(&graph, active);
        let base = before[2];
        let job = graph
            .start_commit(CommitRequest {
                active,
                top: active,
                base,
                on_error: OnError::Report,
            })
            .unwrap();
        let mut scratch = vec![0u8; SCRATCH];
        let mut steps = 0;
        while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Ready {
            steps += 1;
            assert!(steps < STEP_LIMIT);
            if steps < 60 {
                guest.burst(&mut graph, backend);
            }
        }
        for _ in 0..10 {
            guest.burst(&mut graph, backend);
            graph.job_step(job, &mut resolver, &mut scratch).unwrap();
        }
        // Let the job catch up: a step that copies nothing had nothing dirty.
        loop {
            let done = info(&graph, job).offset;
            assert_eq!(
                graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
                JobStatus::Ready
            );
            if info(&graph, job).offset == done {
                break;
            }
        }
        let at_last_step = guest.shadow.clone();
        graph.job_cancel(job).unwrap();
        assert_eq!(
            graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
            JobStatus::Concluded
        );
        let last = info(&graph, job);
        assert!(last.cancelled && last.error.is_none(), "{last:?}");
        assert_eq!(graph.root(backend).unwrap(), active, "soft cancel pivoted");
        assert_eq!(chain(&graph, active), before);
        assert_same(
            "view after soft cancel",
            &read_backend(&mut graph, backend),
            &guest.shadow,
        );
        graph.job_dismiss(job).unwrap();
        graph.detach_backend(backend).unwrap();
        drop(graph);
        for img in ["base.qcow2", "mid.qcow2", "active.qcow2"] {
            check(d, img);
        }
        assert_same(
            "base after a soft cancel vs the view at the last step",
            &guest_view(d, "base.qcow2"),
            &at_last_step,
        );
        assert_same(
            "qemu-img's view of active",
            &guest_view(d, "active.qcow2"),
            &guest.shadow,
        );
    }
}

/// A ready active commit holds two dirty granules, written high then low;
/// one step copies the low one, then the job is soft-cancelled. Base must be
/// a point-in-time copy (QEMU: "the destination now has a point-in-time copy
/// tied to the time of the cancellation"); with no write between the last
/// step and the cancel, that is the guest view at the last step.
#[test]
fn soft_cancel_after_ready_copies_every_dirty_granule() {
    let dir = scratch_dir();
    let d = dir.path();
    create(d, "base.qcow2", 2 * MIB, 64 * KIB, None);
    qemu_io(d, "base.qcow2", &["write -P 0x11 0 2M".to_owned()]);
    create(d, "active.qcow2", 2 * MIB, 64 * KIB, Some("base.qcow2"));
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let base = graph.backing(active).unwrap().unwrap();
    let job = graph
        .start_commit(CommitRequest {
            active,
            top: active,
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut scratch = vec![0u8; SCRATCH];
    step_until(&mut graph, &mut resolver, job, &mut scratch, |i| i.ready);
    graph
        .backend_write(backend, MIB + 100, &[0xbb; 4096])
        .unwrap();
    graph.backend_write(backend, 100, &[0xaa; 4096]).unwrap();
    assert_eq!(
        graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
        JobStatus::Ready
    );
    let at_last_step = read_backend(&mut graph, backend);
    graph.job_cancel(job).unwrap();
    finish(&mut graph, &mut resolver, job, &mut scratch);
    assert_eq!(graph.root(backend).unwrap(), active);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    check(d, "base.qcow2");
    assert_same(
        "base after a soft cancel (0xbb written at 1 MiB + 100 before the last step)",
        &guest_view(d, "base.qcow2"),
        &at_last_step,
    );
}
