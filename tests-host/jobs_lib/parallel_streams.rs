//! Four parallel streams on a 9-image chain (030 test_stream_parallel).

use super::*;

#[test]
fn four_parallel_streams_on_a_nine_image_chain() {
    let dir = scratch_dir();
    let d = dir.path();
    let names: Vec<String> = (0..9).map(|i| format!("img{i}.qcow2")).collect();
    for (i, name) in names.iter().enumerate() {
        let backing = i.checked_sub(1).map(|b| names[b].as_str());
        create(d, name, 2 * MIB, 64 * KIB, backing);
        // Distinct data per image: its own band, plus a write overlapping
        // the next image's band.
        let at = i as u64 * 192 * KIB;
        qemu_io(
            d,
            name,
            &[
                format!("write -P {} {at} 256k", 0x10 + i),
                format!("write -P {} {} 64k", 0x80 + i, at + 320 * KIB),
            ],
        );
    }
    let views: Vec<Vec<u8>> = names.iter().map(|name| guest_view(d, name)).collect();
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "img8.qcow2"));
    let mut n = chain(&graph, top);
    n.reverse();
    assert_eq!(n.len(), 9);
    let mut scratch = vec![0u8; SCRATCH];
    let jobs: Vec<JobId> = [8, 6, 4, 2]
        .iter()
        .map(|&i| {
            graph
                .start_stream(StreamRequest {
                    active: n[i],
                    base: Some(n[i - 2]),
                    on_error: OnError::Report,
                })
                .unwrap()
        })
        .collect();
    // Intermediate nodes are written by their streams.
    for i in [6, 4, 2] {
        assert!(!graph.is_read_only(n[i]).unwrap());
    }
    let mut done = [false; 4];
    let mut rounds = 0;
    while done != [true; 4] {
        rounds += 1;
        assert!(rounds < STEP_LIMIT);
        for (k, &job) in jobs.iter().enumerate() {
            if !done[k] {
                done[k] = graph.job_step(job, &mut resolver, &mut scratch).unwrap()
                    == JobStatus::Concluded;
            }
        }
    }
    for &job in &jobs {
        let last = info(&graph, job);
        assert_eq!((last.error, last.cancelled), (None, false), "{last:?}");
        graph.job_dismiss(job).unwrap();
    }
    assert_eq!(
        chain(&graph, top),
        vec![n[8], n[6], n[4], n[2], n[0]],
        "chain: {:?}",
        chain_names(&graph, top)
    );
    for i in [7, 5, 3, 1] {
        assert!(!graph.contains(n[i]), "img{i} still open");
    }
    for i in [6, 4, 2] {
        assert!(graph.is_read_only(n[i]).unwrap(), "img{i} left writable");
        assert_same(
            &format!("img{i}'s own view"),
            &read_node(&mut graph, n[i]),
            &views[i],
        );
    }
    assert_same("top view", &read_backend(&mut graph, backend), &views[8]);
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
    drop(graph);
    for name in &names {
        check(d, name);
    }
    for i in [8, 6, 4, 2] {
        assert_same(
            &format!("qemu-img's view of img{i}"),
            &guest_view(d, &names[i]),
            &views[i],
        );
    }
    // The on-disk references: reopen and walk.
    let mut graph = FileGraph::boxed();
    let node = graph
        .open_image(
            &mut resolver,
            &path(d, "img8.qcow2"),
            OpenOptions::probing(),
        )
        .unwrap();
    assert_eq!(
        chain_names(&graph, node),
        [
            "img8.qcow2",
            "img6.qcow2",
            "img4.qcow2",
            "img2.qcow2",
            "img0.qcow2"
        ]
    );
    graph.unref(node).unwrap();
}
