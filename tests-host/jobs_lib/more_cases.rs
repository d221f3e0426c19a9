//! More 040/041 cases: every backend pivots, raw base, relative paths, zero-length images, refused starts leave nothing behind.

use super::*;

/// Any non-empty scratch buffer is allowed, so a step may copy less than a
/// dirty granule (64 KiB at least; more on disks over 2 GiB). An active
/// commit whose guest wrote a whole granule must still become READY.
#[test]
fn active_commit_with_a_scratch_smaller_than_a_granule() {
    let dir = scratch_dir();
    let d = dir.path();
    create(d, "base.qcow2", MIB, 64 * KIB, None);
    qemu_io(d, "base.qcow2", &["write -P 0x11 0 1M".to_owned()]);
    create(d, "active.qcow2", MIB, 64 * KIB, Some("base.qcow2"));
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
    let mut scratch = vec![0u8; 16 * 1024];
    graph.job_step(job, &mut resolver, &mut scratch).unwrap();
    // One whole granule dirty (behind the cursor).
    graph.backend_write(backend, 0, &[0x22; 64 * 1024]).unwrap();
    // The first pass takes 64 steps; the re-copy four more.
    let mut steps = 1;
    while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Ready {
        steps += 1;
        if steps == 5_000 {
            let now = info(&graph, job);
            panic!(
                "not READY after {steps} steps of 16 KiB over a 1 MiB disk with one \
                 dirty 64 KiB granule: {now:?}"
            );
        }
    }
    graph.job_complete(job).unwrap();
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    let view = read_backend(&mut graph, backend);
    assert!(view[..64 * 1024].iter().all(|&b| b == 0x22));
    assert!(view[64 * 1024..].iter().all(|&b| b == 0x11));
    graph.detach_backend(backend).unwrap();
}

/// Two devices on the active layer: the pivot moves both.
#[test]
fn pivot_moves_every_backend() {
    let dir = scratch_dir();
    let d = dir.path();
    let view = three_layers(d, 131, MIB, 64 * KIB);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let second = graph
        .attach_backend(active, Access::READ_ONLY_DEVICE)
        .unwrap();
    let base = chain(&graph, active)[2];
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
    graph.job_complete(job).unwrap();
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    assert_eq!(graph.root(backend).unwrap(), base);
    assert_eq!(graph.root(second).unwrap(), base);
    assert_same("first device", &read_backend(&mut graph, backend), &view);
    assert_same("second device", &read_backend(&mut graph, second), &view);
    graph.detach_backend(second).unwrap();
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
}

/// 040: raw base (0xab @0..512K) <- mid (0xef @512K..1M) <- top. Commit mid
/// into base, then actively commit top into base under guest writes.
#[test]
fn commit_into_a_raw_base() {
    let dir = scratch_dir();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "1M"]);
    common::qemu_io(d, "raw", "base.raw", &["write -P 0xab 0 512k"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "2M",
        ],
    );
    qemu_io(d, "mid.qcow2", &["write -P 0xef 512k 512k".to_owned()]);
    create(d, "top.qcow2", 2 * MIB, 64 * KIB, Some("mid.qcow2"));
    qemu_io(d, "top.qcow2", &["write -P 0x33 1536k 4k".to_owned()]);
    let view = guest_view(d, "top.qcow2");
    assert!(view[..512 * 1024].iter().all(|&b| b == 0xab));
    assert!(view[512 * 1024..1024 * 1024].iter().all(|&b| b == 0xef));
    let mut guest = Guest::new(132, view, 64 * KIB);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "top.qcow2"));
    let n = chain(&graph, top);
    let base = n[2];
    let mut scratch = vec![0u8; SCRATCH];
    let job = graph
        .start_commit(CommitRequest {
            active: top,
            top: n[1],
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    assert_eq!(graph.size(base).unwrap(), 2 * MIB, "raw base grown");
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    graph.job_dismiss(job).unwrap();
    assert_eq!(chain(&graph, top), vec![top, base]);
    let job = graph
        .start_commit(CommitRequest {
            active: top,
            top,
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut steps = 0;
    while graph.job_step(job, &mut resolver, &mut scratch).unwrap() != JobStatus::Ready {
        steps += 1;
        assert!(steps < STEP_LIMIT);
        if steps < 40 {
            guest.burst(&mut graph, backend);
        }
    }
    graph.job_complete(job).unwrap();
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    assert_eq!(graph.root(backend).unwrap(), base);
    assert_same("view", &read_backend(&mut graph, backend), &guest.shadow);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    let raw = std::fs::read(d.join("base.raw")).unwrap();
    assert_same("raw base file", &raw, &guest.shadow);
}

/// 040 TestRelativePaths: dir2/dir3/top -> ../mid -> ../dir1/base. After
/// committing mid into base, top's new reference resolves (from top's
/// directory, as QEMU resolves it) to dir1/base.
#[test]
fn relative_backing_paths_survive_commit() {
    let dir = scratch_dir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("dir1")).unwrap();
    std::fs::create_dir_all(d.join("dir2/dir3")).unwrap();
    create(&d.join("dir1"), "base.qcow2", MIB, 64 * KIB, None);
    qemu_io(
        &d.join("dir1"),
        "base.qcow2",
        &["write -P 0xab 0 512k".to_owned()],
    );
    create(
        &d.join("dir2"),
        "mid.qcow2",
        MIB,
        64 * KIB,
        Some("../dir1/base.qcow2"),
    );
    qemu_io(
        &d.join("dir2"),
        "mid.qcow2",
        &["write -P 0xef 512k 512k".to_owned()],
    );
    create(
        &d.join("dir2/dir3"),
        "top.qcow2",
        MIB,
        64 * KIB,
        Some("../mid.qcow2"),
    );
    let view = guest_view(d, "dir2/dir3/top.qcow2");
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "dir2/dir3/top.qcow2"));
    let n = chain(&graph, top);
    let job = graph
        .start_commit(CommitRequest {
            active: top,
            top: n[1],
            base: n[2],
            on_error: OnError::Report,
        })
        .unwrap();
    let mut scratch = vec![0u8; SCRATCH];
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    graph.detach_backend(backend).unwrap();
    drop(graph);
    let info = qemu_img(d, &["info", "-U", "--output=json", "dir2/dir3/top.qcow2"]);
    let key = "\"backing-filename\": \"";
    let at = info.find(key).expect("top has a backing file") + key.len();
    let reference = &info[at..at + info[at..].find('"').unwrap()];
    println!("top's backing reference after the commit: {reference}");
    let resolved = d.join("dir2/dir3").join(reference).canonicalize().unwrap();
    assert_eq!(resolved, d.join("dir1/base.qcow2").canonicalize().unwrap());
    check(d, "dir2/dir3/top.qcow2");
    assert_same("view", &guest_view(d, "dir2/dir3/top.qcow2"), &view);
}

/// 040 zero-length images: every job over 0-byte images finishes.
#[test]
fn jobs_on_zero_length_images() {
    let dir = scratch_dir();
    let d = dir.path();
    create(d, "base.qcow2", 0, 64 * KIB, None);
    create(d, "mid.qcow2", 0, 64 * KIB, Some("base.qcow2"));
    create(d, "active.qcow2", 0, 64 * KIB, Some("mid.qcow2"));
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (active, backend) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let n = chain(&graph, active);
    let mut scratch = vec![0u8; SCRATCH];
    let job = graph
        .start_stream(StreamRequest {
            active,
            base: Some(n[2]),
            on_error: OnError::Report,
        })
        .unwrap();
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    graph.job_dismiss(job).unwrap();
    assert_eq!(chain(&graph, active), vec![active, n[2]]);
    let job = graph
        .start_commit(CommitRequest {
            active,
            top: active,
            base: n[2],
            on_error: OnError::Report,
        })
        .unwrap();
    let ready = step_until(&mut graph, &mut resolver, job, &mut scratch, |i| i.ready);
    assert_eq!((ready.offset, ready.len), (0, 0));
    graph.job_complete(job).unwrap();
    assert_eq!(
        finish(&mut graph, &mut resolver, job, &mut scratch).error,
        None
    );
    assert_eq!(graph.root(backend).unwrap(), n[2]);
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
    drop(graph);
    for img in ["base.qcow2", "mid.qcow2", "active.qcow2"] {
        check(d, img);
    }
}

/// A job refused for want of a slot leaves nothing changed: no frozen link,
/// and a node it would have written keeps its read-only flag.
#[test]
fn refused_job_starts_change_nothing() {
    let dir = scratch_dir();
    let d = dir.path();
    let mut rng = Rng::new(141);
    let names: Vec<String> = (0..9).map(|i| format!("img{i}.qcow2")).collect();
    for (i, name) in names.iter().enumerate() {
        let backing = i.checked_sub(1).map(|b| names[b].as_str());
        make_layer(d, name, MIB, 64 * KIB, backing, &mut rng, 2);
    }
    three_layers(d, 142, MIB, 64 * KIB);
    let mut graph = FileGraph::boxed();
    let mut resolver = PathResolver::default();
    let (top, backend) = open_attached(&mut graph, &mut resolver, &path(d, "img8.qcow2"));
    let mut n = chain(&graph, top);
    n.reverse();
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
    // Every slot is taken: jobs on another chain are refused.
    let (active, other) = open_attached(&mut graph, &mut resolver, &path(d, "active.qcow2"));
    let c = chain(&graph, active);
    let (mid, base) = (c[1], c[2]);
    let mut problems = Vec::new();
    let stream = graph.start_stream(StreamRequest {
        active: mid,
        base: Some(base),
        on_error: OnError::Report,
    });
    assert_eq!(
        stream.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::NoCapacity)
    );
    if !graph.is_read_only(mid).unwrap() {
        problems.push("a stream refused with NoCapacity left its node writable");
    }
    let commit = graph.start_commit(CommitRequest {
        active,
        top: mid,
        base,
        on_error: OnError::Report,
    });
    assert_eq!(
        commit.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::NoCapacity)
    );
    if !graph.is_read_only(base).unwrap() {
        problems.push("a commit refused with NoCapacity left its base writable");
    }
    for node in c {
        assert!(
            !graph.is_frozen(node).unwrap(),
            "a refused job froze a link"
        );
    }
    let mut scratch = vec![0u8; SCRATCH];
    for job in jobs {
        graph.job_cancel(job).unwrap();
        finish(&mut graph, &mut resolver, job, &mut scratch);
        graph.job_dismiss(job).unwrap();
    }
    graph.detach_backend(other).unwrap();
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
