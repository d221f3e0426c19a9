//! Proves the library does not allocate on the heap once images are open:
//! reads (plain, compressed, through a backing chain), writes (allocating,
//! copy-on-write, in place), zero writes, discards and flushes run with a
//! counting global allocator that must see no allocation on this thread,
//! called directly and through the request engine.

use blockgraph::device::FileDevice;
use blockgraph::engine::Engine;
use blockgraph::host::PathResolver;
use blockgraph::jobs::{JobStatus, OnError, StreamRequest};
use blockgraph::{Access, BackendId, Graph, NodeId, OpenOptions};

mod common;
#[path = "common/counting.rs"]
mod counting;
use common::{qemu_img, qemu_io};

/// Opens `path` writable behind a backend: the graph, the image's node
/// and the backend.
fn open_writable(path: &str) -> (Box<Graph<FileDevice>>, NodeId, BackendId) {
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let mut resolver = PathResolver::default();
    let options = OpenOptions {
        read_only: false,
        ..OpenOptions::probing()
    };
    let node = graph.open_image(&mut resolver, path, options).unwrap();
    let backend = graph
        .attach_backend(node, Access::READ_WRITE_DEVICE)
        .unwrap();
    (graph, node, backend)
}

/// Builds, in `d`, `top.qcow2` (4 KiB clusters, data at 8k..72k, an
/// internal snapshot) over a compressed `base.qcow2` holding 0x5a in its
/// first 2 MiB; returns the path of `top.qcow2`.
fn chain(d: &std::path::Path) -> String {
    qemu_img(d, &["create", "-q", "-f", "qcow2", "raw-src.qcow2", "4M"]);
    qemu_io(d, "qcow2", "raw-src.qcow2", &["write -P 0x5a 0 2M"]);
    // A compressed base under a small-cluster overlay with an internal snapshot.
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "raw-src.qcow2",
            "base.qcow2",
        ],
    );
    let overlay_opts = "cluster_size=4096";
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            overlay_opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x21 8k 64k"]);
    qemu_img(d, &["snapshot", "-c", "s1", "top.qcow2"]);
    d.join("top.qcow2").to_str().unwrap().to_owned()
}

#[test]
fn reads_writes_and_flushes_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let top = chain(d);
    let top = top.as_str();

    let (mut graph, node, backend) = open_writable(top);
    let mut buf = vec![0u8; 300_000];
    let data = vec![0x77u8; 100_000];

    let count = counting::allocations_during(|| {
        graph.backend_read(backend, 0, &mut buf).unwrap();
        graph
            .backend_read(backend, 1_000_001, &mut buf[..70_000])
            .unwrap();
        graph.backend_write(backend, 5_000, &data).unwrap(); // snapshot-shared: COW
        graph.backend_write(backend, 1_500_000, &data).unwrap(); // over compressed base
        graph.backend_write(backend, 5_001, &data[..10]).unwrap(); // in place
        graph.write_zeroes(node, 2_000_000, 300_000).unwrap();
        graph.discard(node, 3_000_000, 100_000).unwrap();
        graph.backend_flush(backend).unwrap();
        graph.backend_read(backend, 0, &mut buf).unwrap();
    });
    assert_eq!(
        count,
        0,
        "heap allocations during I/O after open (last of {} bytes)",
        counting::last_size()
    );
    assert_eq!(&buf[5_000..105_000], &data[..]);
    assert!(buf[..5_000].iter().all(|&b| b == 0x5a));
    assert!(buf[105_000..].iter().all(|&b| b == 0x5a));
    graph.detach_backend(backend).unwrap();
    graph.unref(node).unwrap();
    assert_eq!(graph.node_count(), 0);
    qemu_img(d, &["check", "-q", "top.qcow2"]);
}

/// The same kinds of request through the request engine, many in flight
/// at once: submitting, polling and collecting allocate nothing either.
#[test]
fn requests_through_the_engine_do_not_allocate() {
    // The engine and a graph's stack frames together exceed a test
    // thread's default stack.
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(engine_requests)
        .unwrap()
        .join()
        .unwrap();
}

fn engine_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let top = chain(d);
    let (mut graph, node, backend) = open_writable(&top);
    // `'static`: host files queue through io_uring.
    let reads = common::leaked_buffer(8 * 65536);
    let data: &'static [u8] = vec![0x77u8; 100_000].leak();
    let mut engine: Engine<'_> = Engine::new();
    // Metadata misses of reads load split-phase into these.
    for slice in common::leaked_buffer(2 * 4096).chunks_mut(4096) {
        engine.lend_metadata_buffer(slice).unwrap();
    }
    // And the copy-on-write of allocating writes goes to the device.
    for buffer in common::leaked_buffer(2 * 65536).chunks_mut(65536) {
        engine.lend_copy_buffer(buffer).unwrap();
    }
    let mut results = Vec::with_capacity(64);
    let mut seen_writes = true;

    let count = counting::allocations_during(|| {
        let mut buffers = reads.chunks_mut(65536);
        for i in 0..4u64 {
            let buf = buffers.next().unwrap();
            engine.submit_read(backend, i * 300_000, [buf]).unwrap();
        }
        let (head, tail) = data.split_at(40_000);
        engine.submit_write(backend, 5_000, [head, tail]).unwrap(); // COW
        engine.submit_write(backend, 9_000, [&data[..10]]).unwrap(); // in place
                                                                     // Allocating, data in flight: over a compressed base, over nothing.
        engine.submit_write(backend, 1_500_000, [data]).unwrap();
        let (head, tail) = data[..20_000].split_at(3_096);
        engine
            .submit_write(backend, 2_401_000, [head, tail])
            .unwrap();
        engine
            .submit_write_zeroes(backend, 2_000_000, 300_000)
            .unwrap();
        engine.submit_discard(backend, 3_000_000, 100_000).unwrap();
        engine.submit_flush(backend).unwrap();
        let mut last = None;
        for buf in buffers {
            last = Some(engine.submit_read(backend, 0, [buf]).unwrap());
        }
        engine.drain(&mut graph);
        while let Some((ticket, mut done)) = engine.complete() {
            if Some(ticket) == last {
                // It came after the writes: it sees them.
                let mut pos = 0;
                for piece in done.buffers() {
                    for &byte in piece.iter() {
                        seen_writes &= byte == if pos < 5_000 { 0x5a } else { 0x77 };
                        pos += 1;
                    }
                }
            }
            results.push(done.result);
        }
    });
    assert_eq!(
        count,
        0,
        "heap allocations in the request engine (last of {} bytes)",
        counting::last_size()
    );
    assert_eq!(results.len(), 15);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        seen_writes,
        "the last read does not see the writes before it"
    );
    graph.detach_backend(backend).unwrap();
    graph.unref(node).unwrap();
    assert_eq!(graph.node_count(), 0);
    qemu_img(d, &["check", "-q", "top.qcow2"]);
}

/// A stream stepped through the request engine: its runs (reads of the
/// compressed base, allocating writes into the overlay) and the polls that
/// carry them allocate nothing; only the end, which writes the new backing
/// name through the resolver, runs outside the count.
#[test]
fn job_runs_through_the_engine_do_not_allocate() {
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(job_runs)
        .unwrap()
        .join()
        .unwrap();
}

fn job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let top = chain(d);
    qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    let (mut graph, node, backend) = open_writable(&top);
    let mut resolver = PathResolver::default();
    let job = graph
        .start_stream(StreamRequest {
            active: node,
            base: None,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut engine: Engine<'_> = Engine::new();
    for lane in common::leaked_buffer(2 * 65536).chunks_mut(65536) {
        engine.lend_job_buffer(lane).unwrap();
    }
    // Created to running: the synchronous first step.
    while engine.job_step(&mut graph, job, &mut resolver).unwrap() == JobStatus::Created {}
    let mut steps = 0;
    let count = counting::allocations_during(|| {
        while engine.job_step(&mut graph, job, &mut resolver).unwrap() == JobStatus::Running {
            engine.poll(&mut graph);
            steps += 1;
        }
    });
    assert_eq!(
        count,
        0,
        "heap allocations in the job's runs (last of {} bytes)",
        counting::last_size()
    );
    assert!(steps > 4, "the stream ran in {steps} steps");
    while engine.job_step(&mut graph, job, &mut resolver).unwrap() != JobStatus::Concluded {
        engine.poll(&mut graph);
    }
    assert_eq!(graph.job_info(job).unwrap().error, None);
    graph.job_dismiss(job).unwrap();
    assert_eq!(graph.backing(node).unwrap(), None);
    graph.detach_backend(backend).unwrap();
    graph.unref(node).unwrap();
    qemu_img(d, &["check", "-q", "top.qcow2"]);
    let compare = [
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "before.raw",
        "top.qcow2",
    ];
    qemu_img(d, &compare);
}
