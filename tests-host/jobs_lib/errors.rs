//! Error injection ("error at sector 1024"), MemDevice faults.

use super::*;

/// 040/030's images: base 0xab @0..512K (+0x11 @1M..1.5M), mid 0xef
/// @512K..1M (+0x22 @1.25M..1.75M), top 0x33 @1600K (+0x44 @100K); 2 MiB,
/// 64 KiB clusters. Returns the top's guest view.
pub(crate) fn fault_images(d: &Path) -> Vec<u8> {
    create(d, "base.qcow2", 2 * MIB, 64 * KIB, None);
    create(d, "mid.qcow2", 2 * MIB, 64 * KIB, Some("base.qcow2"));
    create(d, "top.qcow2", 2 * MIB, 64 * KIB, Some("mid.qcow2"));
    let cmds = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    qemu_io(
        d,
        "base.qcow2",
        &cmds(&["write -P 0xab 0 512k", "write -P 0x11 1M 512k"]),
    );
    qemu_io(
        d,
        "mid.qcow2",
        &cmds(&["write -P 0xef 512k 512k", "write -P 0x22 1280k 512k"]),
    );
    qemu_io(
        d,
        "top.qcow2",
        &cmds(&["write -P 0x33 1600k 64k", "write -P 0x44 100k 8k"]),
    );
    guest_view(d, "top.qcow2")
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Faulted {
    /// Commit mid into base; base's device fails in the first pass.
    Commit,
    /// Active commit of top into base; base's device fails while READY,
    /// re-copying a guest write.
    ActiveCommit,
    /// Stream mid into top (base kept); mid's device fails.
    Stream,
}

/// Runs a job to its end: an active commit through READY and complete.
pub(crate) fn run_out<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    job: JobId,
    scratch: &mut [u8],
) -> JobInfo {
    if info(graph, job).active_commit {
        if !info(graph, job).ready {
            step_until(graph, resolver, job, scratch, |i| {
                i.ready || i.status == JobStatus::Concluded
            });
        }
        graph.job_complete(job).unwrap();
        assert!(info(graph, job).completing);
        assert_eq!(
            graph.job_complete(job).map_err(|e| e.kind()),
            Err(ErrorKind::InvalidInput),
            "job_complete is accepted once"
        );
    }
    finish(graph, resolver, job, scratch)
}

pub(crate) fn fault_scenario(which: Faulted, policy: OnError) {
    println!("{which:?} with on-error {policy:?}");
    let dir = scratch_dir();
    let d = dir.path();
    let mut view = fault_images(d);
    let mut images = load_images(
        d,
        &[
            ("base.qcow2", 4 * MIB),
            ("mid.qcow2", 4 * MIB),
            ("top.qcow2", 4 * MIB),
        ],
    );
    // Where the guest's view ends up on disk when the job succeeds.
    let mut final_image = "top.qcow2";
    {
        let mut resolver = ByName(MemImages::new(&mut images));
        let mut graph = Graph::<Disk<'_>>::boxed();
        let (top, backend) = open_attached(&mut graph, &mut resolver, "top.qcow2");
        let nodes = chain(&graph, top);
        let (mid, base) = (nodes[1], nodes[2]);
        let start = |graph: &mut Graph<Disk<'_>>, on_error| match which {
            Faulted::Commit => graph.start_commit(CommitRequest {
                active: top,
                top: mid,
                base,
                on_error,
            }),
            Faulted::ActiveCommit => graph.start_commit(CommitRequest {
                active: top,
                top,
                base,
                on_error,
            }),
            Faulted::Stream => graph.start_stream(StreamRequest {
                active: top,
                base: Some(base),
                on_error,
            }),
        };
        let faulty = if which == Faulted::Stream { mid } else { base };
        // The chain after success (the backend's root first).
        let done_chain = match which {
            Faulted::Commit | Faulted::Stream => vec![top, base],
            Faulted::ActiveCommit => vec![base],
        };
        let job = start(&mut graph, policy).unwrap();
        let mut scratch = vec![0u8; SCRATCH];
        if which == Faulted::ActiveCommit {
            // READY, then a guest write at sector 1200 that must be re-copied.
            step_until(&mut graph, &mut resolver, job, &mut scratch, |i| i.ready);
            graph
                .backend_write(backend, 600 * KIB, &[0x5c; 4096])
                .unwrap();
            view[600 * 1024..604 * 1024].fill(0x5c);
        } else {
            // Run up to sector 1024.
            let reached = step_until(&mut graph, &mut resolver, job, &mut scratch, |i| {
                i.offset >= 512 * KIB
            });
            assert_eq!(reached.offset, 512 * KIB, "steps are 64 KiB here");
        }
        // Fail the faulty device's next operation.
        disk_of(&mut graph, faulty).mem.fail_operation(Some(0));
        let before = info(&graph, job);
        let failed = step_until(&mut graph, &mut resolver, job, &mut scratch, |i| {
            i.io_status != IoStatus::Ok || i.status == JobStatus::Concluded
        });
        println!("  after the fault: {failed:?}");
        assert_ne!(failed.io_status, IoStatus::Ok, "the fault was not seen");
        let root = |graph: &Graph<Disk<'_>>| {
            let root = graph.root(backend).unwrap();
            chain(graph, root)
        };
        match policy {
            OnError::Report => {
                // Failed: aborting; the next step releases the job and
                // returns its error.
                assert_eq!(failed.status, JobStatus::Aborting);
                let concluded = graph.job_step(job, &mut resolver, &mut scratch);
                assert_eq!(
                    concluded.map_err(|e| e.kind()),
                    Err(ErrorKind::Io),
                    "the step that concludes a failed job did not return its error"
                );
                let failed = info(&graph, job);
                assert_eq!(failed.status, JobStatus::Concluded);
                assert_eq!(failed.error.map(|e| e.kind()), Some(ErrorKind::Io));
                assert_eq!(failed.io_status, IoStatus::Failed);
                assert!(!failed.cancelled);
                assert_eq!(root(&graph), nodes, "a failed job changed the chain");
                assert_same(
                    "view after the failed job",
                    &read_backend(&mut graph, backend),
                    &view,
                );
                graph.job_dismiss(job).unwrap();
                // A retry succeeds.
                let retry = start(&mut graph, OnError::Report).unwrap();
                let last = run_out(&mut graph, &mut resolver, retry, &mut scratch);
                assert_eq!((last.error, last.io_status), (None, IoStatus::Ok));
                assert_eq!(root(&graph), done_chain, "retry's chain");
            }
            OnError::Stop => {
                assert_eq!(failed.status, JobStatus::Paused);
                assert_eq!((failed.io_status, failed.error), (IoStatus::Failed, None));
                assert_eq!(
                    graph.job_step(job, &mut resolver, &mut scratch).unwrap(),
                    JobStatus::Paused
                );
                assert_eq!(info(&graph, job).offset, failed.offset);
                assert_eq!(root(&graph), nodes);
                graph.job_resume(job).unwrap();
                let resumed = info(&graph, job);
                assert_eq!(
                    (resumed.status, resumed.io_status),
                    (before.status, IoStatus::Ok),
                    "resumed into the state it failed in"
                );
                let last = run_out(&mut graph, &mut resolver, job, &mut scratch);
                assert_eq!((last.error, last.io_status), (None, IoStatus::Ok));
                assert_eq!(last.offset, last.len);
                assert_eq!(root(&graph), done_chain);
            }
            OnError::Ignore => {
                assert_eq!(failed.status, before.status, "ignore goes on");
                assert_eq!(failed.error, None);
                let last = run_out(&mut graph, &mut resolver, job, &mut scratch);
                assert_eq!(last.error, None, "{last:?}");
                match which {
                    // The chunk was retried: the commit completed.
                    Faulted::Commit | Faulted::ActiveCommit => {
                        assert_eq!(root(&graph), done_chain)
                    }
                    // A chunk was skipped: the backing file stays.
                    Faulted::Stream => assert_eq!(root(&graph), nodes),
                }
            }
            other => panic!("no scenario for on-error {other:?}"),
        }
        if which == Faulted::ActiveCommit {
            final_image = "base.qcow2";
        }
        assert_same(
            &format!("{which:?}/{policy:?}: view at the end"),
            &read_backend(&mut graph, backend),
            &view,
        );
        graph.detach_backend(backend).unwrap();
        assert_eq!(graph.node_count(), 0);
    }
    store_images(d, &images);
    let mut leaked = false;
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        leaked |= check_allowing_leaks(d, img);
    }
    println!("  leaked clusters: {leaked}");
    assert_same(
        &format!("{which:?}/{policy:?}: qemu-img's view of {final_image}"),
        &guest_view(d, final_image),
        &view,
    );
}

#[test]
fn commit_error_report_then_retry() {
    fault_scenario(Faulted::Commit, OnError::Report);
}

#[test]
fn commit_error_stop_then_resume() {
    fault_scenario(Faulted::Commit, OnError::Stop);
}

#[test]
fn commit_error_ignore_retries() {
    fault_scenario(Faulted::Commit, OnError::Ignore);
}

#[test]
fn active_commit_error_report_then_retry() {
    fault_scenario(Faulted::ActiveCommit, OnError::Report);
}

#[test]
fn active_commit_error_stop_then_resume() {
    fault_scenario(Faulted::ActiveCommit, OnError::Stop);
}

#[test]
fn active_commit_error_ignore_retries() {
    fault_scenario(Faulted::ActiveCommit, OnError::Ignore);
}

#[test]
fn stream_error_report_then_retry() {
    fault_scenario(Faulted::Stream, OnError::Report);
}

#[test]
fn stream_error_stop_then_resume() {
    fault_scenario(Faulted::Stream, OnError::Stop);
}

#[test]
fn stream_error_ignore_keeps_backing() {
    fault_scenario(Faulted::Stream, OnError::Ignore);
}

/// A base that cannot grow: `stop` pauses with io-status `nospace`; a cancel
/// then leaves the chain as it was.
#[test]
fn commit_into_a_full_base_stops_with_nospace() {
    let dir = scratch_dir();
    let d = dir.path();
    let view = fault_images(d);
    let mut images = load_images(
        d,
        &[
            ("base.qcow2", 64 * KIB),
            ("mid.qcow2", 0),
            ("top.qcow2", MIB),
        ],
    );
    {
        let mut resolver = ByName(MemImages::new(&mut images));
        let mut graph = Graph::<Disk<'_>>::boxed();
        let (top, backend) = open_attached(&mut graph, &mut resolver, "top.qcow2");
        let nodes = chain(&graph, top);
        let job = graph
            .start_commit(CommitRequest {
                active: top,
                top: nodes[1],
                base: nodes[2],
                on_error: OnError::Stop,
            })
            .unwrap();
        let mut scratch = vec![0u8; SCRATCH];
        let paused = step_until(&mut graph, &mut resolver, job, &mut scratch, |i| {
            i.status != JobStatus::Running
        });
        assert_eq!(
            (paused.status, paused.io_status, paused.error),
            (JobStatus::Paused, IoStatus::NoSpace, None),
            "{paused:?}"
        );
        graph.job_cancel(job).unwrap();
        let last = finish(&mut graph, &mut resolver, job, &mut scratch);
        assert!(last.cancelled);
        assert_eq!(chain(&graph, top), nodes);
        assert_same("view", &read_backend(&mut graph, backend), &view);
        graph.detach_backend(backend).unwrap();
    }
    store_images(d, &images);
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        check_allowing_leaks(d, img);
    }
    assert_same("qemu-img's view", &guest_view(d, "top.qcow2"), &view);
}
