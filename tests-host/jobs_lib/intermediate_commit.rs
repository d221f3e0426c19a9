//! Intermediate commit while the guest writes to the active layer.

use super::*;

#[test]
fn intermediate_commit_with_guest_writes() {
    for (seed, cluster) in [(51, 64 * KIB), (52, 4 * KIB)] {
        let size = 6 * MIB;
        let dir = scratch_dir();
        let d = dir.path();
        let view = three_layers(d, seed, size, cluster);
        let mid_view = guest_view(d, "mid.qcow2");
        let mut guest = Guest::new(seed, view, cluster);
        let mut graph = FileGraph::boxed();
        let mut resolver = PathResolver::default();
        let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
        let nodes = chain(&graph, active);
        let (mid, base) = (nodes[1], nodes[2]);
        let job = graph
            .start_commit(CommitRequest {
                active,
                top: mid,
                base,
                on_error: OnError::Report,
            })
            .unwrap();
        assert!(!info(&graph, job).active_commit);
        let mut scratch = vec![0u8; SCRATCH];
        let mut steps = 0;
        loop {
            guest.burst(&mut graph, backend);
            let status = graph.job_step(job, &mut resolver, &mut scratch).unwrap();
            steps += 1;
            assert!(steps < STEP_LIMIT);
            assert_ne!(
                status,
                JobStatus::Ready,
                "an intermediate commit is never READY"
            );
            if status == JobStatus::Concluded {
                break;
            }
        }
        let last = info(&graph, job);
        assert_eq!((last.error, last.cancelled), (None, false), "{last:?}");
        assert_eq!(last.offset, last.len);
        assert_eq!(graph.root(backend).unwrap(), active);
        assert_eq!(
            chain(&graph, active),
            vec![active, base],
            "chain after commit"
        );
        assert!(!graph.contains(mid));
        for _ in 0..5 {
            guest.burst(&mut graph, backend);
        }
        assert_same(
            "view after intermediate commit",
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
            "qemu-img's view of active (backing reference rewritten)",
            &guest_view(d, "active.qcow2"),
            &guest.shadow,
        );
        assert_same(
            "base holds what mid showed",
            &guest_view(d, "base.qcow2"),
            &mid_view,
        );
    }
}

/// QEMU reopens a commit's base read-only again when the job ends without
/// making it the active layer (commit_clean / mirror_exit_common): base is
/// then a backing file, and a backing file written under its overlays
/// changes what they show.
#[test]
fn commit_jobs_give_base_back_read_only() {
    let dir = scratch_dir();
    let d = dir.path();
    three_layers(d, 61, 2 * MIB, 64 * KIB);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let nodes = chain(&graph, active);
    let (mid, base) = (nodes[1], nodes[2]);
    assert!(graph.is_read_only(base).unwrap() && graph.is_read_only(mid).unwrap());
    let mut scratch = vec![0u8; SCRATCH];
    let mut problems = Vec::new();

    // An active commit cancelled before READY.
    let job = graph
        .start_commit(CommitRequest {
            active,
            top: active,
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    graph.job_step(job, &mut resolver, &mut scratch).unwrap();
    graph.job_cancel(job).unwrap();
    finish(&mut graph, &mut resolver, job, &mut scratch);
    graph.job_dismiss(job).unwrap();
    if !graph.is_read_only(base).unwrap() {
        let written = graph.write(base, 0, &[0x77; 512]);
        problems.push(format!(
            "after a cancelled active commit base is still writable (a write to it: {:?})",
            written.map_err(|e| e.kind())
        ));
    }

    // An intermediate commit of mid into base, to completion: base is now
    // active's backing file.
    let job = graph
        .start_commit(CommitRequest {
            active,
            top: mid,
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    let last = finish(&mut graph, &mut resolver, job, &mut scratch);
    assert_eq!(last.error, None);
    assert_eq!(chain(&graph, active), vec![active, base]);
    if !graph.is_read_only(base).unwrap() {
        let written = graph.write(base, MIB, &[0x77; 512]);
        problems.push(format!(
            "after an intermediate commit the backing file base is still writable \
             (a write to it: {:?})",
            written.map_err(|e| e.kind())
        ));
    }
    graph.detach_backend(backend).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
