//! `image`: the input is a qcow2 image, opened read-write in a `Graph` over
//! a `MemDevice` with room to grow, its backing chain served from memory.
//! Then, each step bounded so that one input runs in milliseconds:
//!
//! 1. the guest view: a `block_status` walk and reads of the whole virtual
//!    size (a sample when it is over [`READ_CAP`]);
//! 2. up to [`OPS`] writes, zero writes, discards or flushes chosen by the
//!    input's last bytes; a write or zero write that succeeds must read
//!    back; then the same through the request engine, on a BlockBackend: reads in
//!    flight together (each must equal the synchronous read of its range),
//!    then writes, zero writes, discards and flushes in flight together;
//!    every request must finish;
//! 3. a `drop_intermediate` when the image has a backing file: drop the
//!    backing file, drop an intermediate layer, or drop the active layer
//!    under a BlockBackend (a writing one that is the image's only holder,
//!    as a VMM's device; a reading one while the caller holds the image
//!    too, as the CLI). A failed one must leave the image's bytes as they
//!    were, and dropping the active layer never writes them;
//! 4. the view again, then the graph must be empty once the image is
//!    released;
//! 5. the image's bytes as left must open again (read-only), with the
//!    backing reference the graph believed it had.
//!
//! An image that does not open read-write (a dirty one, for instance) is
//! opened read-only and only read.
//!
//! Backing names resolve by their last path component: `top` or `self`
//! name the image itself (a loop: refused), `deep...` the input again as a
//! new image (at most as many copies as the input's last byte but one
//! says, modulo 40; then `deep` names the base: past 30 copies the graph's
//! 64 nodes run out), `missing...` nothing, and any other name
//! `fixtures/base.qcow2` (1 MiB, 4 KiB clusters, with data).
//!
//! The last byte's bit 0 sets `assume_raw_backing`.

use blockgraph::device::MemDevice;
use blockgraph::engine::Engine;
use blockgraph::graph::{Access, NameBuf};
use blockgraph::{Error, ErrorKind, Format, Graph, NodeId, OpenOptions, Resolver};

use crate::Tail;

type G<'a> = Graph<MemDevice<'a>>;
/// The request engine of step 2: a slot per request, two buffers each.
type Requests<'b> = Engine<'b, OPS, 2, 16>;

/// The name the input is opened by.
const TOP: &str = "top";
/// The image every other backing name resolves to.
const BASE: &[u8] = include_bytes!("../fixtures/base.qcow2");
const TOP_ID: u64 = 1;
const BASE_ID: u64 = 2;
/// Room for the top image to grow into (writes allocate clusters).
const TOP_SPARE: usize = 1 << 20;
/// Room after every other image (a header rewrite may grow a tiny file).
const SPARE: usize = 64 << 10;
/// Most `deep` copies of the input in one chain (more than the graph's 64
/// nodes hold: 2 per layer).
const MAX_DEEP: u8 = 40;
/// Virtual sizes up to this are read whole; larger ones are sampled.
const READ_CAP: u64 = 8 << 20;
/// Bytes per read: odd, so reads start and end inside clusters.
const CHUNK: usize = 65536 + 4099;
/// Reads of a sampled image.
const SAMPLES: u64 = 16;
/// Most `block_status` calls of one walk.
const STATUS_CALLS: usize = 2048;
/// Guest requests per input, and the longest one.
const OPS: usize = 4;
const MAX_WRITE: usize = 256 << 10;
/// Control bytes are taken from this many last bytes of the input.
const TAIL: usize = 64;

pub fn run(data: &[u8]) {
    let mut tail = Tail::new(data, TAIL);
    let flags = tail.byte();
    let deep = tail.byte() % MAX_DEEP;
    let options = OpenOptions {
        read_only: false,
        writable_devices: true,
        assume_raw_backing: flags & 1 != 0,
        ..OpenOptions::new(Format::Qcow2)
    };
    let mut arena = vec![0u8; arena_size(data.len(), deep)];
    let expect = {
        let mut images = Images::new(&mut arena, data, deep);
        let mut graph: Box<G<'_>> = Box::default();
        let expect = exercise(&mut graph, &mut images, options, &mut tail);
        assert_eq!(
            graph.node_count(),
            0,
            "nodes are left after the image is released"
        );
        assert_eq!(graph.backend_count(), 0, "backends are left");
        expect
    };
    // The top image was the first device cut from the arena.
    if let Some(expect) = expect {
        let bytes = arena[..expect.device_size].to_vec();
        drop(arena);
        reopen(&bytes, deep, options, &expect);
    }
}

/// Arena bytes for the top image (input) and every layer below it.
fn arena_size(len: usize, deep: u8) -> usize {
    let layers = usize::from(deep) + 3; // deep copies, base, a loop's copy
    len + TOP_SPARE + layers * (len.max(BASE.len()) + SPARE)
}

/// What the image must look like when it is opened again.
struct Expect {
    device_size: usize,
    size: u64,
    backing: Option<String>,
    format: Option<String>,
}

/// Serves the input (`top`), copies of it and the base image as
/// `MemDevice`s cut from one arena.
struct Images<'a, 'd> {
    free: &'a mut [u8],
    top: &'d [u8],
    /// `deep` copies left to hand out; then `deep` names the base.
    deep: u8,
    next_id: u64,
}

impl<'a, 'd> Images<'a, 'd> {
    fn new(arena: &'a mut [u8], top: &'d [u8], deep: u8) -> Self {
        Self {
            free: arena,
            top,
            deep,
            next_id: 100,
        }
    }

    fn device(
        &mut self,
        bytes: &[u8],
        spare: usize,
        id: u64,
        writable: bool,
    ) -> blockgraph::Result<MemDevice<'a>> {
        let capacity = bytes.len() + spare;
        if self.free.len() < capacity {
            return Err(Error::new(ErrorKind::NoCapacity, "fuzz arena exhausted"));
        }
        let (buf, rest) = std::mem::take(&mut self.free).split_at_mut(capacity);
        self.free = rest;
        buf[..bytes.len()].copy_from_slice(bytes);
        let mut device = MemDevice::new(buf, bytes.len() as u64, id)?;
        device.set_read_only(!writable);
        Ok(device)
    }
}

impl<'a> Resolver<MemDevice<'a>> for Images<'a, '_> {
    fn open(&mut self, name: &str, writable: bool) -> blockgraph::Result<MemDevice<'a>> {
        if name != TOP {
            return Err(Error::new(ErrorKind::NotFound, "no such image"));
        }
        let top = self.top;
        self.device(top, TOP_SPARE, TOP_ID, writable)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> blockgraph::Result<MemDevice<'a>> {
        resolved.set(reference)?;
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let top = self.top;
        if name == TOP || name == "self" {
            self.device(top, SPARE, TOP_ID, writable)
        } else if name.starts_with("missing") {
            Err(Error::new(ErrorKind::NotFound, "backing file not found"))
        } else if name.starts_with("deep") && self.deep > 0 {
            self.deep -= 1;
            self.next_id += 1;
            let id = self.next_id;
            self.device(top, SPARE, id, writable)
        } else {
            self.device(BASE, SPARE, BASE_ID, writable)
        }
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        out.set(target)
    }
}

/// Steps 1 to 4; `Some` with what a reopen must find when the image opened
/// read-write.
fn exercise<'a>(
    graph: &mut G<'a>,
    images: &mut Images<'a, '_>,
    options: OpenOptions,
    tail: &mut Tail<'_>,
) -> Option<Expect> {
    let top = match graph.open_image(images, TOP, options) {
        Ok(top) => top,
        Err(_) => {
            assert_eq!(graph.node_count(), 0, "a failed open left nodes behind");
            let read_only = OpenOptions {
                read_only: true,
                writable_devices: false,
                ..options
            };
            if let Ok(top) = graph.open_image(images, TOP, read_only) {
                read_view(graph, top);
                graph.unref(top).expect("release the image");
            }
            return None;
        }
    };
    read_view(graph, top);
    guest_requests(graph, top, tail);
    engine_requests(graph, top, tail);
    // Keep the image file's node (a protocol node) alive to look at its
    // bytes even when the collapse gives the image node away.
    let file = graph
        .file(top)
        .expect("a live node")
        .expect("a format node has a file");
    graph.ref_node(file).expect("a live node");
    let header = |graph: &G<'_>, top: NodeId| {
        let q = graph.qcow2(top).expect("opened as qcow2");
        (
            q.size(),
            q.backing_name().map(str::to_owned),
            q.backing_format().map(str::to_owned),
        )
    };
    let before = header(graph, top);
    let (size, backing, format) = match collapse(graph, images, top, file, tail) {
        Some(top) => {
            read_view(graph, top);
            let after = header(graph, top);
            graph.unref(top).expect("release the image");
            after
        }
        // The image node is gone; its header was not rewritten.
        None => before,
    };
    let device_size = graph.size(file).expect("a live node") as usize;
    graph.unref(file).expect("release the image file");
    Some(Expect {
        device_size,
        size,
        backing,
        format,
    })
}

/// A `block_status` walk and reads of the whole view (or a sample).
fn read_view(graph: &mut G<'_>, node: NodeId) {
    let Ok(size) = graph.size(node) else {
        return;
    };
    let mut offset = 0;
    for _ in 0..STATUS_CALLS {
        if offset >= size {
            break;
        }
        match graph.block_status(node, offset, size - offset) {
            Ok((_, run)) => {
                assert!(
                    run > 0 && run <= size - offset,
                    "block_status at {offset} of {size} reports a run of {run} bytes"
                );
                offset += run;
            }
            Err(_) => break,
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let chunk = CHUNK as u64;
    let mut read = |offset: u64| {
        let n = (size - offset).min(chunk) as usize;
        let _ = graph.read(node, offset, &mut buf[..n]);
    };
    if size <= READ_CAP {
        for offset in (0..size).step_by(CHUNK) {
            read(offset);
        }
    } else {
        for i in 0..SAMPLES {
            read(size / SAMPLES * i);
        }
        read(size - chunk);
    }
}

/// Up to [`OPS`] guest requests chosen by the input's last bytes.
fn guest_requests(graph: &mut G<'_>, top: NodeId, tail: &mut Tail<'_>) {
    let Ok(size) = graph.size(top) else {
        return;
    };
    if size == 0 {
        return;
    }
    let mut data = vec![0u8; MAX_WRITE];
    for _ in 0..OPS {
        let op = tail.byte();
        let offset = (u64::from(tail.u16()) << (tail.byte() % 32)) % size;
        let len = ((u64::from(tail.u16()) + 1) << (tail.byte() % 8))
            .min(size - offset)
            .min(MAX_WRITE as u64) as usize;
        match op % 5 {
            0 | 1 => {
                data[..len].fill(op | 1);
                if graph.write(top, offset, &data[..len]).is_ok() {
                    reads_back(graph, top, offset, &data[..len], "write");
                }
            }
            2 => {
                if graph.write_zeroes(top, offset, len as u64).is_ok() {
                    data[..len].fill(0);
                    reads_back(graph, top, offset, &data[..len], "write_zeroes");
                }
            }
            3 => {
                let _ = graph.discard(top, offset, len as u64);
            }
            _ => {
                let _ = graph.flush(top);
            }
        }
    }
}

/// The request engine on a BlockBackend of `top`: [`OPS`] reads in flight
/// together, each of which, when it and the synchronous read of its range
/// succeed, must read the same bytes; then [`OPS`] writes, zero writes,
/// discards or flushes in flight together. Every request must finish.
fn engine_requests(graph: &mut G<'_>, top: NodeId, tail: &mut Tail<'_>) {
    let (Ok(size), Ok(backend)) = (
        graph.size(top),
        graph.attach_backend(top, Access::READ_WRITE_DEVICE),
    ) else {
        return;
    };
    let mut ranges = [(0u64, 0usize); OPS];
    for range in &mut ranges {
        let offset = (u64::from(tail.u16()) << (tail.byte() % 32)) % size.max(1);
        let len = ((u64::from(tail.u16()) + 1) << (tail.byte() % 3)).min(size - offset);
        *range = (offset, len as usize);
    }
    let mut reads = vec![0u8; OPS * (256 << 10)];
    let data = vec![0x5au8; 256 << 10];
    {
        let mut engine: Requests<'_> = Engine::new();
        let mut tickets = [None; OPS];
        for ((&(offset, len), buf), ticket) in ranges
            .iter()
            .zip(reads.chunks_mut(256 << 10))
            .zip(&mut tickets)
        {
            let (a, b) = buf[..len].split_at_mut(len / 3);
            *ticket = engine.submit_read(backend, offset, [a, b]).ok();
        }
        finish(&mut engine, graph);
        for (&(offset, len), ticket) in ranges.iter().zip(tickets) {
            let Some(Ok(Some(mut done))) = ticket.map(|t| engine.take(t)) else {
                continue;
            };
            let mut direct = vec![0u8; len];
            if done.result.is_ok() && graph.read(top, offset, &mut direct).is_ok() {
                let got: Vec<u8> = done.buffers().flat_map(|b| b.iter().copied()).collect();
                assert!(got == direct, "the engine reads {offset}+{len} differently");
            }
        }
    }
    let mut engine: Requests<'_> = Engine::new();
    for &(offset, len) in &ranges {
        let _ = match tail.byte() % 4 {
            0 => engine.submit_write(backend, offset, [&data[..len]]),
            1 => engine.submit_write_zeroes(backend, offset, len as u64),
            2 => engine.submit_discard(backend, offset, len as u64),
            _ => engine.submit_flush(backend),
        };
    }
    finish(&mut engine, graph);
    while engine.complete().is_some() {}
    graph
        .detach_backend(backend)
        .expect("detach the engine's backend");
}

/// Polls `engine` until no request is in flight; it must get there.
fn finish<'b>(engine: &mut Requests<'b>, graph: &mut G<'_>) {
    for _ in 0..10_000 {
        if engine.poll(graph) == 0 {
            return;
        }
    }
    panic!("requests in the engine never finish");
}

/// A successful request's range must read back as `expected` (when it can
/// be read at all).
fn reads_back(graph: &mut G<'_>, node: NodeId, offset: u64, expected: &[u8], what: &str) {
    let mut got = vec![0u8; expected.len()];
    if graph.read(node, offset, &mut got).is_ok() {
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "{what} of {} bytes at {offset} succeeded, but byte {} reads {:#04x}, not {:#04x}",
                expected.len(),
                offset + i as u64,
                got[i],
                expected[i]
            );
        }
    }
}

/// The bytes of the image file under protocol node `file`.
fn file_bytes(graph: &mut G<'_>, file: NodeId) -> Vec<u8> {
    graph
        .device_mut(file)
        .expect("a protocol node")
        .contents()
        .to_vec()
}

/// Step 3: one `drop_intermediate` on the chain, when there is one.
/// Returns `top` while the caller still holds it (`None` when it was
/// handed to a BlockBackend, as a VMM does, and released with it).
fn collapse<'a>(
    graph: &mut G<'a>,
    images: &mut Images<'a, '_>,
    top: NodeId,
    file: NodeId,
    tail: &mut Tail<'_>,
) -> Option<NodeId> {
    let Ok(Some(below)) = graph.backing(top) else {
        return Some(top);
    };
    // Earlier writes' table updates are cached: write them back first, so
    // that what follows shows only what the chain change itself writes.
    if graph.flush(top).is_err() {
        return Some(top);
    }
    let before = file_bytes(graph, file);
    let (result, expected_backing) = match tail.byte() % 4 {
        // The backing file goes: the image's header names none.
        0 => (graph.drop_intermediate(images, top, below, None), None),
        // An intermediate layer goes, when there is one.
        1 => match graph.backing(below) {
            Ok(Some(bottom)) => (
                graph.drop_intermediate(images, top, below, Some(bottom)),
                Some(bottom),
            ),
            _ => return Some(top),
        },
        // The active layer goes under a writing BlockBackend that is its
        // only holder (a VMM's device): the backend moves to the backing
        // file, the image node is released. No file is written.
        2 => {
            let Ok(backend) = graph.attach_backend(top, Access::READ_WRITE_DEVICE) else {
                return Some(top);
            };
            graph.unref(top).expect("a live node");
            let dropped = graph.drop_intermediate(images, top, top, Some(below));
            if dropped.is_ok() {
                assert_eq!(
                    graph.root(backend).ok(),
                    Some(below),
                    "dropping the active layer did not move its BlockBackend"
                );
                assert!(
                    !graph.contains(top),
                    "the dropped active layer is still alive"
                );
            }
            backend_reads(graph, backend);
            graph.detach_backend(backend).expect("detach the backend");
            assert!(
                file_bytes(graph, file) == before,
                "dropping the active layer wrote to its image"
            );
            return None;
        }
        // The same under a reading BlockBackend (the CLI's `collapse`),
        // while the caller still holds the image node.
        _ => {
            let Ok(backend) = graph.attach_backend(top, Access::READ_ONLY_DEVICE) else {
                return Some(top);
            };
            let dropped = graph.drop_intermediate(images, top, top, Some(below));
            if dropped.is_ok() {
                assert_eq!(
                    graph.root(backend).ok(),
                    Some(below),
                    "dropping the active layer did not move its BlockBackend"
                );
            }
            backend_reads(graph, backend);
            graph.detach_backend(backend).expect("detach the backend");
            (dropped, Some(below))
        }
    };
    match result {
        Ok(()) => {
            let backing = graph.backing(top).expect("a live node");
            assert_eq!(backing, expected_backing, "the chain was not relinked");
        }
        Err(_) => assert!(
            file_bytes(graph, file) == before,
            "a failed drop_intermediate changed the image's bytes"
        ),
    }
    Some(top)
}

/// A read through a BlockBackend of the start of its image.
fn backend_reads(graph: &mut G<'_>, backend: blockgraph::BackendId) {
    let Ok(root) = graph.root(backend) else {
        return;
    };
    let mut buf = [0u8; 4096];
    let n = graph.size(root).map_or(0, |s| s.min(4096) as usize);
    let _ = graph.backend_read(backend, 0, &mut buf[..n]);
}

/// Step 5: the bytes as left open again, with the backing reference the
/// graph had.
fn reopen(bytes: &[u8], deep: u8, options: OpenOptions, expect: &Expect) {
    let mut arena = vec![0u8; arena_size(bytes.len(), deep)];
    let mut images = Images::new(&mut arena, bytes, deep);
    let mut graph: Box<G<'_>> = Box::default();
    let read_only = OpenOptions {
        read_only: true,
        writable_devices: false,
        ..options
    };
    let top = match graph.open_image(&mut images, TOP, read_only) {
        Ok(top) => top,
        Err(err) => panic!(
            "the image opened read-write, but after the requests and the collapse \
             it does not open again: {err}"
        ),
    };
    let q = graph.qcow2(top).expect("opened as qcow2");
    assert_eq!(q.size(), expect.size, "the virtual size changed");
    assert_eq!(
        (q.backing_name(), q.backing_format()),
        (expect.backing.as_deref(), expect.format.as_deref()),
        "the image's header and the graph disagree on the backing file"
    );
    graph.unref(top).expect("release the image");
    assert_eq!(graph.node_count(), 0, "nodes are left after the reopen");
}
