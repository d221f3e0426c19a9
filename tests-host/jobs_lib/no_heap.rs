//! No heap allocation while jobs run.

use super::*;

#[test]
fn jobs_step_without_heap_allocation() {
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(121);
    let size = 2 * MIB;
    for prefix in ["a", "b"] {
        let base = format!("{prefix}_base.qcow2");
        let mid = format!("{prefix}_mid.qcow2");
        let top = format!("{prefix}_top.qcow2");
        make_layer(d, &base, size, 64 * KIB, None, &mut rng, 8);
        make_layer(d, &mid, size, 64 * KIB, Some(&base), &mut rng, 6);
        make_layer(d, &top, size, 64 * KIB, Some(&mid), &mut rng, 4);
    }
    let mut guest_a = Guest::new(1, guest_view(d, "a_top.qcow2"), 64 * KIB);
    let mut guest_b = Guest::new(2, guest_view(d, "b_top.qcow2"), 64 * KIB);
    let spare = 8 * MIB;
    let mut images = load_images(
        d,
        &[
            ("a_base.qcow2", spare),
            ("a_mid.qcow2", spare),
            ("a_top.qcow2", spare),
            ("b_base.qcow2", spare),
            ("b_mid.qcow2", spare),
            ("b_top.qcow2", spare),
        ],
    );
    {
        let mut resolver = ByName(MemImages::new(&mut images));
        let mut graph = Graph::<Disk<'_>>::boxed();
        let (a_top, a_backend) = open_attached(&mut graph, &mut resolver, "a_top.qcow2");
        let (b_top, b_backend) = open_attached(&mut graph, &mut resolver, "b_top.qcow2");
        let a_base = chain(&graph, a_top)[2];
        let b_base = chain(&graph, b_top)[2];
        let mut scratch = vec![0u8; SCRATCH];
        let commit = graph
            .start_commit(CommitRequest {
                active: a_top,
                top: a_top,
                base: a_base,
                on_error: OnError::Report,
            })
            .unwrap();
        let stream = graph
            .start_stream(StreamRequest {
                active: b_top,
                base: Some(b_base),
                on_error: OnError::Report,
            })
            .unwrap();
        let mut outcome = (JobStatus::Created, JobStatus::Created, 0u64);
        let count = counting::allocations_during(|| {
            let (mut commit_done, mut stream_done, mut completed) = (false, false, false);
            let mut rounds = 0u64;
            while !(commit_done && stream_done) && rounds < STEP_LIMIT {
                rounds += 1;
                if rounds < 80 {
                    guest_a.burst(&mut graph, a_backend);
                    guest_b.burst(&mut graph, b_backend);
                }
                if !commit_done {
                    let status = graph.job_step(commit, &mut resolver, &mut scratch).unwrap();
                    if status == JobStatus::Ready && !completed && rounds > 100 {
                        graph.job_complete(commit).unwrap();
                        completed = true;
                    }
                    commit_done = status == JobStatus::Concluded;
                }
                if !stream_done {
                    stream_done = graph.job_step(stream, &mut resolver, &mut scratch).unwrap()
                        == JobStatus::Concluded;
                }
            }
            guest_a.burst(&mut graph, a_backend);
            guest_b.burst(&mut graph, b_backend);
            graph.job_dismiss(commit).unwrap();
            graph.job_dismiss(stream).unwrap();
            outcome = (
                if commit_done {
                    JobStatus::Concluded
                } else {
                    JobStatus::Running
                },
                if stream_done {
                    JobStatus::Concluded
                } else {
                    JobStatus::Running
                },
                rounds,
            );
        });
        assert_eq!(
            count,
            0,
            "heap allocations while jobs ran (last of {} bytes)",
            counting::last_size()
        );
        println!("jobs finished after {} rounds", outcome.2);
        assert_eq!(
            (outcome.0, outcome.1),
            (JobStatus::Concluded, JobStatus::Concluded)
        );
        assert_eq!(graph.root(a_backend).unwrap(), a_base);
        assert_eq!(chain(&graph, b_top), vec![b_top, b_base]);
        assert_same(
            "commit view",
            &read_backend(&mut graph, a_backend),
            &guest_a.shadow,
        );
        assert_same(
            "stream view",
            &read_backend(&mut graph, b_backend),
            &guest_b.shadow,
        );
        graph.detach_backend(a_backend).unwrap();
        graph.detach_backend(b_backend).unwrap();
        assert_eq!(graph.node_count(), 0);
    }
    store_images(d, &images);
    for image in &images {
        check(d, &image.name);
    }
    assert_same(
        "qemu-img: a_base",
        &guest_view(d, "a_base.qcow2"),
        &guest_a.shadow,
    );
    assert_same(
        "qemu-img: b_top",
        &guest_view(d, "b_top.qcow2"),
        &guest_b.shadow,
    );
}
