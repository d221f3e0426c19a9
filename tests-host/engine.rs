//! The request engine with many requests in flight on devices that complete
//! out of order: random overlapping reads, writes, zero writes, discards
//! and flushes against a model, then qemu-img on the result; the same
//! on host files through io_uring (`FileDevice`'s queue), buffered and
//! with cache mode `none` (`O_DIRECT`), where requests of one batch do not
//! overlap (real concurrent transfers may tear overlapping ones); and under
//! an active commit and a stream stepped in drained sections.

mod common;

use std::fs;

use blockgraph::device::FileDevice;
use blockgraph::device::{MemDevice, Queue, Reorder, DIRECT_ALIGN};
use blockgraph::engine::{Engine, Ticket, JOB_LANES};
use blockgraph::graph::{ByName, OpenByName};
use blockgraph::host::PathResolver;
use blockgraph::jobs::{CommitRequest, JobStatus, OnError, StreamRequest};
use blockgraph::{Access, BackendId, Device, Error, ErrorKind, Format, Graph, NodeId, OpenOptions};
use common::*;

const SECTOR: usize = 512;
const SIZE: u64 = 4 << 20;
/// Requests submitted together in one batch, before any is polled.
const BATCH: usize = 48;
const BATCHES: usize = 30;
/// Longest request, in sectors.
const MAX_SECTORS: usize = 48;

type Disk<'a, 'b> = Reorder<'b, MemDevice<'a>>;

/// In-memory images by name; each opens once, on a reordering device.
struct Images<'a> {
    slots: Vec<(String, Option<&'a mut [u8]>, u64)>,
    seed: u64,
}

impl<'a> Images<'a> {
    fn take<'b>(&mut self, name: &str) -> blockgraph::Result<Disk<'a, 'b>> {
        self.seed += 1;
        let seed = self.seed;
        let Some((_, storage, len)) = self.slots.iter_mut().find(|s| s.0 == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        let storage = storage
            .take()
            .ok_or(Error::new(ErrorKind::Busy, "image already open"))?;
        Ok(Reorder::new(MemDevice::new(storage, *len, seed)?, seed))
    }
}

impl<'a, 'b> OpenByName<Disk<'a, 'b>> for Images<'a> {
    fn open_by_name(&mut self, name: &str, _writable: bool) -> blockgraph::Result<Disk<'a, 'b>> {
        self.take(name)
    }
}

/// What one request of a batch does to the model.
enum Kind {
    Read,
    Write(u8),
    Zero,
    Discard,
    Flush,
}

/// Builds `top.qcow2` over `base.qcow2` (both with `cluster_size`) whose
/// every sector holds one byte value; returns the files' bytes and the
/// guest view, one byte per sector.
fn chain(dir: &std::path::Path, cluster_size: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let opts = format!("cluster_size={cluster_size}");
    let size = SIZE.to_string();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "base.qcow2",
            &size,
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 1536k 1M",
            "write -P 0x13 3M 512k",
        ],
    );
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x21 512k 512k",
            "write -P 0x22 2M 64k",
            "write -z 3M 128k",
        ],
    );
    qemu_img(dir, &["convert", "-O", "raw", "top.qcow2", "view.raw"]);
    let view = fs::read(dir.join("view.raw")).unwrap();
    let sectors = view.chunks(SECTOR).map(|s| s[0]).collect();
    let read = |name: &str| fs::read(dir.join(name)).unwrap();
    (read("top.qcow2"), read("base.qcow2"), sectors)
}

/// The chain's two files in memory, each with `room` bytes to grow into.
struct Files {
    top: (Vec<u8>, u64),
    base: (Vec<u8>, u64),
}

impl Files {
    fn new(top: &[u8], base: &[u8], room: usize) -> Self {
        let grown = |bytes: &[u8]| {
            let mut store = bytes.to_vec();
            store.resize(bytes.len() + room, 0);
            (store, bytes.len() as u64)
        };
        Self {
            top: grown(top),
            base: grown(base),
        }
    }

    /// A resolver over the files, their devices completing in an order
    /// `seed` picks.
    fn images(&mut self, seed: u64) -> ByName<Images<'_>> {
        ByName(Images {
            slots: vec![
                ("top.qcow2".into(), Some(&mut self.top.0[..]), self.top.1),
                ("base.qcow2".into(), Some(&mut self.base.0[..]), self.base.1),
            ],
            seed,
        })
    }
}

/// Opens `top.qcow2`'s chain in `graph` behind a backend (writable or
/// not); returns the backend and the top node.
fn attach<'a, 'b, const CACHE: usize>(
    graph: &mut TestGraph<'a, 'b, CACHE>,
    images: &mut ByName<Images<'a>>,
    writable: bool,
) -> (BackendId, NodeId) {
    let options = OpenOptions {
        read_only: !writable,
        ..OpenOptions::new(Format::Qcow2)
    };
    let access = if writable {
        Access::READ_WRITE_DEVICE
    } else {
        Access::READ_ONLY_DEVICE
    };
    let top = graph.open_image(images, "top.qcow2", options).unwrap();
    let backend = graph.attach_backend(top, access).unwrap();
    graph.unref(top).unwrap();
    (backend, top)
}

/// The requests a run draws.
#[derive(Clone, Copy)]
struct Mix {
    /// Offsets, lengths and segment cuts are multiples of this many
    /// sectors (8: 4 KiB, so that `O_DIRECT` can take them).
    grain: usize,
    /// Requests of one batch never overlap a write, zero write or discard
    /// of the same batch (reads may overlap reads).
    disjoint: bool,
    /// The requests drawn: the first `kinds` of [`Batch::submit`]'s 20
    /// (16: reads and writes only).
    kinds: u64,
    /// The sectors requests fall in: first and count (`None`: all).
    within: Option<(usize, usize)>,
}

/// Overlapping requests of a batch, completing in any order.
const ANY: Mix = Mix {
    grain: 1,
    disjoint: false,
    kinds: 20,
    within: None,
};

/// What a sector is claimed by in a batch of a disjoint [`Mix`].
#[derive(Clone, Copy, PartialEq)]
enum Claim {
    Free,
    Read,
    Written,
}

/// Draws the range of a request of `kind` (start sector, count): for a
/// disjoint mix one that does not overlap what `claims` forbids (claimed
/// then), `None` when none was found.
fn draw(rng: &mut Rng, mix: Mix, kind: &Kind, claims: &mut [Claim]) -> Option<(usize, usize)> {
    let (first, sectors) = mix.within.unwrap_or((0, claims.len()));
    let units = sectors / mix.grain;
    let most = MAX_SECTORS / mix.grain;
    for _ in 0..50 {
        let start = rng.below(units as u64) as usize;
        let count = (1 + rng.below(most as u64) as usize).min(units - start);
        let (start, count) = (first + start * mix.grain, count * mix.grain);
        if !mix.disjoint {
            return Some((start, count));
        }
        let claim = match kind {
            Kind::Read => Claim::Read,
            _ => Claim::Written,
        };
        let range = &mut claims[start..start + count];
        let free = match claim {
            Claim::Read => range.iter().all(|&c| c != Claim::Written),
            _ => range.iter().all(|&c| c == Claim::Free),
        };
        if free {
            range.fill(claim);
            return Some((start, count));
        }
    }
    None
}

/// A graph over reordering in-memory devices with a metadata cache of
/// `CACHE` table slices.
type TestGraph<'a, 'b, const CACHE: usize = 128> = Graph<Disk<'a, 'b>, 64, 8, CACHE>;

/// The smallest cache: two table slices, evicted and written back all the
/// time while requests are in flight.
const TINY_CACHE: usize = 2;

/// One batch of random requests in flight together, and the values each
/// sector may show while they run and after.
struct Batch {
    number: usize,
    mix: Mix,
    allowed: Vec<Vec<u8>>,
    claims: Vec<Claim>,
    submitted: Vec<(Ticket, Kind, usize, usize)>,
    finished: usize,
}

impl Batch {
    fn new(number: usize, mix: Mix, model: &[u8]) -> Self {
        Self {
            number,
            mix,
            allowed: model.iter().map(|&v| vec![v]).collect(),
            claims: vec![Claim::Free; model.len()],
            submitted: Vec::new(),
            finished: 0,
        }
    }

    /// Submits one random request (a write stores `value`) using `chunk`.
    fn submit<'b>(
        &mut self,
        engine: &mut Engine<'b>,
        backend: BackendId,
        rng: &mut Rng,
        chunk: &'b mut [u8],
        value: u8,
    ) {
        let mix = self.mix;
        let mut kind = match rng.below(mix.kinds) {
            0..=8 => Kind::Read,
            9..=15 => Kind::Write(value),
            16 => Kind::Zero,
            17..=18 => Kind::Discard,
            _ => Kind::Flush,
        };
        let (start, count) = match draw(rng, mix, &kind, &mut self.claims) {
            Some(range) => range,
            None => {
                kind = Kind::Flush;
                (0, 0)
            }
        };
        let (offset, len) = ((start * SECTOR) as u64, count * SECTOR);
        // Two segments, split at a random place of the grain or, every
        // other request, of a 4 KiB block of the guest (a write cut inside
        // a block takes the synchronous path).
        let cut = match rng.below(2) {
            0 => rng.below((count / mix.grain) as u64 + 1) as usize * mix.grain * SECTOR,
            _ => {
                let at = offset + rng.below(len as u64 + 1);
                ((at / 4096 * 4096).max(offset) - offset) as usize
            }
        };
        let ticket = match kind {
            Kind::Read => {
                let (a, b) = chunk[..len].split_at_mut(cut);
                engine.submit_read(backend, offset, [a, b])
            }
            Kind::Write(value) => {
                chunk[..len].fill(value);
                let data: &[u8] = chunk;
                let (a, b) = data[..len].split_at(cut);
                engine.submit_write(backend, offset, [a, b])
            }
            Kind::Zero => engine.submit_write_zeroes(backend, offset, len as u64),
            Kind::Discard => engine.submit_discard(backend, offset, len as u64),
            Kind::Flush => engine.submit_flush(backend),
        }
        .unwrap();
        let written = match kind {
            Kind::Write(value) => Some(value),
            Kind::Zero | Kind::Discard => Some(0),
            Kind::Read | Kind::Flush => None,
        };
        if let Some(value) = written {
            for values in &mut self.allowed[start..start + count] {
                values.push(value);
            }
        }
        self.submitted.push((ticket, kind, start, count));
    }

    fn is_finished(&self) -> bool {
        self.finished == self.submitted.len()
    }

    /// Collects the engine's finished requests; a read must show, per
    /// sector, a value some order of the batch's requests allows.
    fn collect(&mut self, engine: &mut Engine<'_>) {
        let batch = self.number;
        while let Some((ticket, mut done)) = engine.complete() {
            self.finished += 1;
            done.result
                .unwrap_or_else(|e| panic!("batch {batch}: request failed: {e}"));
            let (_, kind, start, count) =
                self.submitted.iter().find(|(t, ..)| *t == ticket).unwrap();
            if let Kind::Read = kind {
                let bytes: Vec<u8> = done.buffers().flat_map(|b| b.iter().copied()).collect();
                assert_eq!(bytes.len(), count * SECTOR);
                for (k, sector) in bytes.chunks(SECTOR).enumerate() {
                    let s = start + k;
                    assert!(
                        sector.iter().all(|&b| b == sector[0]),
                        "batch {batch}: sector {s} read torn"
                    );
                    assert!(
                        self.allowed[s].contains(&sector[0]),
                        "batch {batch}: sector {s} read {:#x}, allowed {:x?}",
                        sector[0],
                        self.allowed[s]
                    );
                }
            }
        }
    }

    /// After the batch: each sector holds an allowed value (the only write
    /// that touched it, if there was one); the model takes the view.
    fn settle<D: Device, const CACHE: usize>(
        self,
        graph: &mut Graph<D, 64, 8, CACHE>,
        backend: BackendId,
        model: &mut [u8],
    ) {
        let mut view = vec![0u8; SIZE as usize];
        let root = graph.root(backend).unwrap();
        graph.read(root, 0, &mut view).unwrap();
        // Without discards (which may leave partial clusters alone), a
        // sector the batch wrote holds one of the values written: none is
        // lost.
        let discards = self.mix.kinds > 16;
        for (s, sector) in view.chunks(SECTOR).enumerate() {
            let value = sector[0];
            assert!(sector.iter().all(|&b| b == value), "sector {s} torn");
            let written = &self.allowed[s][1..];
            let allowed = match written.is_empty() || discards {
                true => &self.allowed[s][..],
                false => written,
            };
            assert!(
                allowed.contains(&value),
                "batch {}: sector {s} holds {value:#x}, allowed {allowed:x?}",
                self.number,
            );
            model[s] = value;
        }
    }
}

/// Runs [`BATCHES`] batches of [`BATCH`] random requests drawn from `mix`
/// through an engine on `backend` ([`batches_of`]).
fn batches<'b, D: Queue<'b>, const CACHE: usize>(
    graph: &mut Graph<D, 64, 8, CACHE>,
    backend: BackendId,
    chunks: &mut impl Iterator<Item = &'b mut [u8]>,
    model: &mut [u8],
    (mix, seed): (Mix, u64),
) {
    let rounds: (usize, &dyn Fn(usize) -> Mix) = (BATCHES, &|_| mix);
    let lent = (Vec::new(), Vec::new());
    batches_of(graph, (backend, chunks), model, rounds, (seed, lent));
}

/// Buffers lent to an engine: metadata buffers and copy buffers.
type Lent<'b> = (Vec<&'b mut [u8]>, Vec<&'b mut [u8]>);

/// Runs `count` batches of [`BATCH`] random requests through an engine on
/// `backend`, batch `n` drawn from `mix(n)`, each request with its own
/// chunk of `chunks`, checking reads and then the whole guest view against
/// `model` (one byte per sector), which it keeps up to date. At some point
/// 8 or more device operations, and two or more allocating writes, must be
/// in flight at once. The engine is lent `metadata` buffers; with some, a
/// metadata slice must be loaded split-phase at some point.
fn batches_of<'b, D: Queue<'b>, const CACHE: usize>(
    graph: &mut Graph<D, 64, 8, CACHE>,
    (backend, chunks): (BackendId, &mut impl Iterator<Item = &'b mut [u8]>),
    model: &mut [u8],
    (count, mix): (usize, &dyn Fn(usize) -> Mix),
    (seed, (metadata, copies)): (u64, Lent<'b>),
) {
    let mut engine: Engine<'b> = Engine::new();
    let lent = !metadata.is_empty();
    for buf in metadata {
        engine.lend_metadata_buffer(buf).unwrap();
    }
    for buf in copies {
        engine.lend_copy_buffer(buf).unwrap();
    }
    let mut rng = Rng(seed);
    let (mut most_ops, mut most_allocations, mut most_loads) = (0, 0, 0);
    for number in 0..count {
        let mut batch = Batch::new(number, mix(number), model);
        for i in 0..BATCH {
            let value = (number * BATCH + i) as u8 | 0x80;
            let chunk = chunks.next().unwrap();
            batch.submit(&mut engine, backend, &mut rng, chunk, value);
        }
        let mut polls = 0;
        while !batch.is_finished() {
            polls += 1;
            assert!(polls < 100_000, "batch {number}: requests never finish");
            engine.advance(graph);
            most_ops = most_ops.max(engine.operations());
            most_allocations = most_allocations.max(engine.allocations_in_flight());
            most_loads = most_loads.max(engine.metadata_loads_in_flight());
            batch.collect(&mut engine);
        }
        batch.settle(graph, backend, model);
    }
    assert!(
        most_ops >= 8,
        "the engine never had many device operations in flight ({most_ops})"
    );
    assert!(
        most_allocations >= 2,
        "allocating writes never went to the devices together ({most_allocations})"
    );
    assert!(
        !lent || most_loads >= 1,
        "no metadata slice was loaded without blocking"
    );
}

/// What qemu-img reads from `image` in `dir` equals `model` (one byte per
/// sector), and the image is consistent.
fn qemu_img_agrees(dir: &std::path::Path, image: &str, model: &[u8]) {
    qemu_img(dir, &["check", image]);
    qemu_img(dir, &["convert", "-O", "raw", image, "after.raw"]);
    let after = fs::read(dir.join("after.raw")).unwrap();
    for (s, sector) in after.chunks(SECTOR).enumerate() {
        assert!(
            sector.iter().all(|&b| b == model[s]),
            "qemu-img reads sector {s} of {image} differently from the model"
        );
    }
}

/// Writes the in-memory files back to `dir`, then [`qemu_img_agrees`].
fn check_on_disk(dir: &std::path::Path, files: &Files, image: &str, model: &[u8]) {
    fs::write(dir.join("top.qcow2"), &files.top.0).unwrap();
    fs::write(dir.join("base.qcow2"), &files.base.0).unwrap();
    qemu_img_agrees(dir, image, model);
}

fn run<const CACHE: usize>(cluster_size: &str, seed: u64) {
    run_lending::<CACHE>(cluster_size, seed, (0, 0));
}

/// [`run`] with `metadata` buffers and `copies` copy buffers (of a
/// cluster each) lent to the engine: metadata misses of reads load
/// split-phase, the copy-on-write of allocating writes goes to the devices.
fn run_lending<const CACHE: usize>(
    cluster_size: &str,
    seed: u64,
    (metadata, copies): (usize, usize),
) {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, cluster_size);
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let requests = BATCH * BATCHES;
    let mut arena = vec![0u8; requests * MAX_SECTORS * SECTOR];
    let mut chunks = arena.chunks_mut(MAX_SECTORS * SECTOR);
    let mut slices = vec![0u8; metadata * 4096];
    let cluster: usize = cluster_size.parse().unwrap();
    let mut copy_memory = vec![0u8; copies * cluster];
    let lent = (
        slices.chunks_mut(4096).collect(),
        copy_memory.chunks_mut(cluster).collect(),
    );
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_, CACHE>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, true);
    let rounds: (usize, &dyn Fn(usize) -> Mix) = (BATCHES, &|_| ANY);
    batches_of(
        &mut graph,
        (backend, &mut chunks),
        &mut model,
        rounds,
        (seed, lent),
    );

    // On disk, as qemu-img sees it: consistent, and the model's view.
    graph.flush(graph.root(backend).unwrap()).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "top.qcow2", &model);
}

/// Allocating writes in flight together, on fresh clusters: round after
/// round, a batch of overlapping reads and writes inside a window of four
/// clusters `top.qcow2` does not own yet (over nothing, over backing data,
/// over zero clusters), all submitted before any is polled, on reordering
/// devices. Writes to the same new clusters must wait for the allocation in
/// flight (each would otherwise allocate its own, and one be lost), reads
/// of them too (or they would see a half-built cluster); every read shows,
/// per sector, a value some order allows, the view after each round holds
/// an allowed value, and at the end qemu-img finds the image consistent
/// and reads the model's view.
fn overlapping_allocations<const CACHE: usize>(cluster: usize, seed: u64) {
    const ROUNDS: usize = 12;
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, &cluster.to_string());
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let mut arena = vec![0u8; BATCH * ROUNDS * MAX_SECTORS * SECTOR];
    let mut chunks = arena.chunks_mut(MAX_SECTORS * SECTOR);
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_, CACHE>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, true);
    // Windows the top does not own: over nothing (1M, 2.5M, 3.5M), over
    // backing data (1.5M, 0, 3M + 128k) and over zero clusters (3M).
    let window = 4 * cluster / SECTOR;
    let starts = [1 << 20, 3 << 19, 5 << 19, 0, 3 << 20, 7 << 19];
    let mix = |round: usize| Mix {
        kinds: 16,
        within: Some((
            starts[round % starts.len()] / SECTOR + round / starts.len() * window,
            window,
        )),
        ..ANY
    };
    let rounds = (ROUNDS, &mix as &dyn Fn(usize) -> Mix);
    batches_of(
        &mut graph,
        (backend, &mut chunks),
        &mut model,
        rounds,
        (seed, (Vec::new(), Vec::new())),
    );
    graph.flush(graph.root(backend).unwrap()).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "top.qcow2", &model);
}

/// [`batches`] on the chain's host files, through io_uring, buffered or
/// with cache mode `none` (4 KiB-aligned requests and buffers, so that
/// data transfers go direct), then qemu-img on the files.
fn run_on_files(direct: bool, seed: u64) {
    // Not tmpfs: it has no O_DIRECT.
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (_, _, mut model) = chain(dir, "65536");
    let mix = Mix {
        grain: if direct { DIRECT_ALIGN / SECTOR } else { 1 },
        disjoint: true,
        ..ANY
    };
    let chunk = MAX_SECTORS * SECTOR;
    let mut chunks = leaked_buffer(BATCH * BATCHES * chunk).chunks_mut(chunk);
    let mut resolver = PathResolver {
        direct,
        ..PathResolver::default()
    };
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let top = dir.join("top.qcow2");
    let top = graph
        .open_image(
            &mut resolver,
            top.to_str().unwrap(),
            OpenOptions {
                read_only: false,
                ..OpenOptions::new(Format::Qcow2)
            },
        )
        .unwrap();
    let backend = graph
        .attach_backend(top, Access::READ_WRITE_DEVICE)
        .unwrap();
    graph.unref(top).unwrap();
    // Only operations io_uring holds stay in flight: synchronous ones
    // complete in `submit`, and `batches` checks that many were.
    batches(&mut graph, backend, &mut chunks, &mut model, (mix, seed));
    let root = graph.root(backend).unwrap();
    graph.flush(root).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    qemu_img_agrees(dir, "top.qcow2", &model);
}

/// A block job under load: batches of [`IN_FLIGHT`] random guest requests,
/// the job stepped through the engine ([`Engine::job_step`]) while they are
/// submitted and in flight, until it concludes (an active commit is
/// completed as soon as it is ready: the pivot happens under load). Its
/// runs go to the devices among the guest's requests: guest requests
/// complete while a run is in flight. No request is lost or misrouted:
/// reads match the model throughout, and at the end the image the backend
/// uses holds the model's view.
fn job_under_load(commit: bool, seed: u64) {
    const IN_FLIGHT: usize = 32;
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    /// Batches after the job concluded; most batches in all.
    const AFTER: usize = 4;
    const MOST: usize = 200;
    let mut arena = vec![0u8; IN_FLIGHT * MOST * MAX_SECTORS * SECTOR];
    let mut chunks = arena.chunks_mut(MAX_SECTORS * SECTOR);
    let mut job_buffers = vec![0u8; JOB_LANES * (64 << 10)];
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, true);
    let base = graph.backing(top).unwrap().unwrap();
    let job = if commit {
        graph.start_commit(CommitRequest {
            active: top,
            top,
            base,
            on_error: OnError::Report,
        })
    } else {
        graph.start_stream(StreamRequest {
            active: top,
            base: None,
            on_error: OnError::Report,
        })
    }
    .unwrap();
    let mut engine: Engine<'_> = Engine::new();
    let mut rng = Rng(seed);
    for buffer in job_buffers.chunks_mut(64 << 10) {
        engine.lend_job_buffer(buffer).unwrap();
    }
    // Guest requests that completed while a run of the job was in flight;
    // whether guest requests were in flight when the job's last step (the
    // pivot, the stream's backing change) was asked for.
    let mut finished_during_runs = 0;
    let mut ended_with_requests_in_flight = None;
    let mut concluded_in_batch = None;
    let mut completing = false;

    for number in 0.. {
        match concluded_in_batch {
            Some(concluded) if number == concluded + AFTER => break,
            None => assert!(number < MOST, "the job never concluded"),
            _ => {}
        }
        let mut batch = Batch::new(number, ANY, &model);
        for i in 0..IN_FLIGHT {
            let value = (number * IN_FLIGHT + i) as u8 | 0x80;
            let chunk = chunks.next().unwrap();
            batch.submit(&mut engine, backend, &mut rng, chunk, value);
        }
        let mut polls = 0;
        while !batch.is_finished() {
            polls += 1;
            assert!(polls < 100_000, "batch {number}: requests never finish");
            if concluded_in_batch.is_none() {
                let before = graph.job_info(job).unwrap().status;
                if completing || before == JobStatus::Pending {
                    ended_with_requests_in_flight.get_or_insert(engine.in_flight() > 0);
                }
                let status = engine.job_step(&mut graph, job, &mut images).unwrap();
                assert_eq!(graph.job_info(job).unwrap().error, None, "the job failed");
                if status == JobStatus::Ready && !completing {
                    graph.job_complete(job).unwrap();
                    completing = true;
                }
                if status == JobStatus::Concluded {
                    graph.job_dismiss(job).unwrap();
                    concluded_in_batch = Some(number);
                }
            }
            let running = engine.job_running();
            engine.poll(&mut graph);
            let before = batch.finished;
            batch.collect(&mut engine);
            if running {
                finished_during_runs += batch.finished - before;
            }
        }
        batch.settle(&mut graph, backend, &mut model);
    }
    assert!(
        finished_during_runs > 0,
        "guest requests did not complete while the job's runs were in flight \
         ({finished_during_runs})"
    );
    assert_eq!(
        ended_with_requests_in_flight,
        Some(true),
        "the job did not end with guest requests in flight"
    );

    // The backend reached the job's result: base after the pivot, the
    // stand-alone top after the stream; qemu-img agrees with the model.
    let root = graph.root(backend).unwrap();
    assert_eq!(root, if commit { base } else { top });
    assert_eq!(graph.backing(root).unwrap(), None);
    graph.flush(root).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    let image = if commit { "base.qcow2" } else { "top.qcow2" };
    check_on_disk(dir, &files, image, &model);
}

/// A stream's runs and guest writes to the same clusters in flight
/// together, completing in the order `seed` picks: the guest's data stays
/// (a run writes only where the layer still lacks data when it gets
/// there; a guest write overlapping a run's allocation waits for it), and
/// every other range holds what the chain held.
fn stream_racing_guest_writes(seed: u64) {
    const CLUSTER: usize = 64 << 10;
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let data = vec![0xeeu8; 8 * CLUSTER];
    let mut job_buffers = vec![0u8; JOB_LANES * CLUSTER];
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, true);
    let job = graph
        .start_stream(StreamRequest {
            active: top,
            base: None,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut engine: Engine<'_> = Engine::new();
    for buffer in job_buffers.chunks_mut(CLUSTER) {
        engine.lend_job_buffer(buffer).unwrap();
    }
    // The first step starts the job (synchronously); the next starts runs
    // reading the base's data, in flight on the reordering devices.
    for _ in 0..100 {
        if engine.job_running() {
            break;
        }
        engine.job_step(&mut graph, job, &mut images).unwrap();
        engine.poll(&mut graph);
    }
    assert!(engine.job_running(), "no run of the stream started");
    let tickets: Vec<Ticket> = data
        .chunks(CLUSTER)
        .enumerate()
        .map(|(i, chunk)| {
            engine
                .submit_write(backend, (i * CLUSTER) as u64, [chunk])
                .unwrap()
        })
        .collect();
    let mut finished = Vec::new();
    for polls in 0.. {
        assert!(polls < 100_000, "the stream never concluded");
        let status = engine.job_step(&mut graph, job, &mut images).unwrap();
        assert_eq!(
            graph.job_info(job).unwrap().error,
            None,
            "the stream failed"
        );
        engine.poll(&mut graph);
        while let Some((ticket, done)) = engine.complete() {
            done.result.unwrap();
            finished.push(ticket);
        }
        if status == JobStatus::Concluded && finished.len() == tickets.len() {
            break;
        }
    }
    graph.job_dismiss(job).unwrap();
    assert_eq!(graph.backing(top).unwrap(), None);
    model[..data.len() / SECTOR].fill(0xee);
    graph.flush(top).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "top.qcow2", &model);
}

/// An active commit's dirty run taken while the guest write that dirtied
/// the range is still in flight (three writes, more dirty than the one
/// 64 KiB job buffer holds, so runs start at once), the run's read and
/// the write completing in the order `seed` picks: a run that read the
/// old data copies the range again (the write marks it dirty when it
/// completes), so base holds every write after the pivot.
fn commit_runs_racing_guest_writes(seed: u64) {
    const GRANULE: usize = 64 << 10;
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let data = vec![0xeeu8; GRANULE];
    let mut job_buffer = vec![0u8; GRANULE];
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, true);
    let base = graph.backing(top).unwrap().unwrap();
    let job = graph
        .start_commit(CommitRequest {
            active: top,
            top,
            base,
            on_error: OnError::Report,
        })
        .unwrap();
    let mut engine: Engine<'_> = Engine::new();
    engine.lend_job_buffer(&mut job_buffer).unwrap();
    let mut steps = 0;
    while engine.job_step(&mut graph, job, &mut images).unwrap() != JobStatus::Ready {
        if engine.job_running() {
            // A buffer that carries a run stays lent.
            assert_eq!(engine.reclaim_job_buffers().count(), 0);
            assert_eq!(engine.job_buffers_lent(), 1);
        }
        engine.poll(&mut graph);
        steps += 1;
        assert!(steps < 10_000, "the commit never became ready");
    }
    // Not stepped for a while: the job holds no write back.
    for _ in 0..8 {
        engine.poll(&mut graph);
    }
    // In place (top owns 512k..1M) and allocating writes, in flight.
    let places = [512 << 10, 640 << 10, 3 << 20];
    let tickets: Vec<Ticket> = places
        .iter()
        .map(|&at| engine.submit_write(backend, at, [&data[..]]).unwrap())
        .collect();
    // Until two are on the devices (the top's first-write check runs in
    // steps first): then runs start over their ranges.
    for polls in 0.. {
        engine.poll(&mut graph);
        if engine.operations() >= 2 {
            break;
        }
        assert!(polls < 1000, "the writes never went to the devices");
    }
    graph.job_complete(job).unwrap();
    let mut finished = 0;
    for polls in 0.. {
        assert!(polls < 100_000, "the commit never concluded");
        let status = engine.job_step(&mut graph, job, &mut images).unwrap();
        assert_eq!(
            graph.job_info(job).unwrap().error,
            None,
            "the commit failed"
        );
        engine.poll(&mut graph);
        while let Some((_, done)) = engine.complete() {
            done.result.unwrap();
            finished += 1;
        }
        if status == JobStatus::Concluded && finished == tickets.len() {
            break;
        }
    }
    graph.job_dismiss(job).unwrap();
    assert_eq!(graph.root(backend).unwrap(), base, "no pivot");
    // No run left: the job buffer comes back.
    let back: Vec<&mut [u8]> = engine.reclaim_job_buffers().collect();
    assert_eq!(back.iter().map(|b| b.len()).collect::<Vec<_>>(), [GRANULE]);
    assert_eq!(engine.job_buffers_lent(), 0);
    for at in places {
        let first = at as usize / SECTOR;
        model[first..first + GRANULE / SECTOR].fill(0xee);
    }
    graph.flush(base).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "base.qcow2", &model);
}

/// A flush when no layer has table updates to write back (in-place
/// writes only) is device flushes in flight: a read submitted after it
/// goes to the devices in the same poll. After an allocating write (its
/// new mapping waits in the metadata cache) the flush is exclusive: it
/// writes the update back in R3's order before anything after it starts;
/// with metadata buffers lent, it writes it back as device operations and
/// requests after it go on. All cover the writes before them: the image
/// is what qemu-img reads.
fn flushes(seed: u64) {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let data = vec![0x5au8; 64 << 10];
    let mut read = vec![0u8; 6144];
    let mut metadata = vec![0u8; 2 * 4096];
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, true);
    let mut engine: Engine<'_> = Engine::new();

    // In place (top owns 512k..1M).
    let write = engine
        .submit_write(backend, 512 << 10, [&data[..]])
        .unwrap();
    engine.wait(&mut graph, write).unwrap().result.unwrap();
    let flush = engine.submit_flush(backend).unwrap();
    let (head, rest) = read.split_at_mut(2048);
    let (tail, third) = rest.split_at_mut(2048);
    let after = engine.submit_read(backend, 0, [head]).unwrap();
    engine.poll(&mut graph);
    assert!(
        engine.operations() >= 2,
        "the flush and the read after it are not in flight together ({} operations)",
        engine.operations()
    );
    engine.wait(&mut graph, flush).unwrap().result.unwrap();
    engine.wait(&mut graph, after).unwrap().result.unwrap();

    // Allocating (top holds nothing at 1536k): the mapping is cached.
    let write = engine
        .submit_write(backend, 1536 << 10, [&data[..]])
        .unwrap();
    engine.wait(&mut graph, write).unwrap().result.unwrap();
    let flush = engine.submit_flush(backend).unwrap();
    let after = engine.submit_read(backend, 0, [tail]).unwrap();
    engine.poll(&mut graph);
    assert!(
        engine
            .take(flush)
            .unwrap()
            .is_some_and(|done| done.result.is_ok()),
        "the exclusive flush did not run first, alone"
    );
    engine.wait(&mut graph, after).unwrap().result.unwrap();

    // With metadata buffers lent, a flush with a table update writes it
    // back as device operations: a read after it goes to the devices
    // before the flush completes.
    for buf in metadata.chunks_mut(4096) {
        engine.lend_metadata_buffer(buf).unwrap();
    }
    let write = engine
        .submit_write(backend, 1024 << 10, [&data[..]])
        .unwrap();
    engine.wait(&mut graph, write).unwrap().result.unwrap();
    let flush = engine.submit_flush(backend).unwrap();
    let after = engine.submit_read(backend, 0, [third]).unwrap();
    engine.poll(&mut graph);
    assert!(
        engine.take(flush).unwrap().is_none() && engine.operations() >= 2,
        "the write-back and the read after it are not in flight together ({} operations)",
        engine.operations()
    );
    engine.wait(&mut graph, flush).unwrap().result.unwrap();
    engine.wait(&mut graph, after).unwrap().result.unwrap();
    for at in [512usize << 10, 1536 << 10, 1024 << 10] {
        model[at / SECTOR..(at + data.len()) / SECTOR].fill(0x5a);
    }
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "top.qcow2", &model);
}

/// Zero writes and discards run through the synchronous path in the poll
/// without waiting for the devices to be quiet: only for requests in flight
/// on the clusters they touch.
fn zero_writes_and_discards_beside_requests_in_flight(seed: u64) {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, mut model) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 16 << 20);
    let mut arena = vec![0u8; 2 * 4096];
    let mut images = files.images(seed);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, true);
    let mut engine: Engine<'_> = Engine::new();
    let (first, second) = arena.split_at_mut(4096);
    // The image's check before a first write, done (top reads zeroes there).
    let warm = engine
        .submit_write_zeroes(backend, 3 << 20, 64 << 10)
        .unwrap();
    engine.wait(&mut graph, warm).unwrap().result.unwrap();

    // Elsewhere than a read in flight: both finish in the poll that
    // starts the read, the read still in flight.
    let read = engine.submit_read(backend, 0, [first]).unwrap();
    let zero = engine
        .submit_write_zeroes(backend, 512 << 10, 64 << 10)
        .unwrap();
    let discard = engine.submit_discard(backend, 2 << 20, 64 << 10).unwrap();
    engine.poll(&mut graph);
    assert!(engine.operations() >= 1, "the read is not in flight");
    for ticket in [zero, discard] {
        let done = engine.take(ticket).unwrap();
        assert!(
            done.is_some_and(|done| done.result.is_ok()),
            "a zero write or discard waited for a read elsewhere"
        );
    }
    let mut done = engine.wait(&mut graph, read).unwrap();
    assert!(done.buffers().flatten().all(|b| *b == model[0]));

    // On the bytes a read in flight reads: the zero write waits for it,
    // and the read sees the bytes from before.
    let at = 608 << 10;
    let read = engine.submit_read(backend, at, [second]).unwrap();
    let zero = engine.submit_write_zeroes(backend, at, 4096).unwrap();
    engine.poll(&mut graph);
    if engine.take(read).unwrap().is_none() {
        assert!(
            engine.take(zero).unwrap().is_none(),
            "a zero write ran under a read in flight on its bytes"
        );
    }
    let mut done = engine.wait(&mut graph, read).unwrap();
    let sector = (at as usize) / SECTOR;
    assert!(
        done.buffers().flatten().all(|b| *b == model[sector]),
        "the read saw the later zero write"
    );
    engine.drain(&mut graph);
    while engine.complete().is_some() {}
    model[(512 << 10) / SECTOR..(576 << 10) / SECTOR].fill(0);
    model[sector..sector + 8].fill(0);
    // A discarded cluster of an overlay reads as zeroes (qcow2 v3).
    model[(2 << 20) / SECTOR..((2 << 20) + (64 << 10)) / SECTOR].fill(0);
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    check_on_disk(dir, &files, "top.qcow2", &model);
}

/// Refusals: a full engine, too many buffers, collected tickets; failing
/// requests report their error and do not stop the others.
fn refusals() {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, view) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 1 << 20);
    let mut arena = vec![0u8; 70 * SECTOR];
    let mut chunks: Vec<&mut [u8]> = arena.chunks_mut(SECTOR).collect();
    let mut images = files.images(7);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, false);
    let mut engine: Engine<'_, 4, 2> = Engine::new();

    let three: Vec<&mut [u8]> = chunks.drain(..3).collect();
    let err = engine.submit_read(backend, 0, three).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let outside = engine
        .submit_read(backend, SIZE, [chunks.pop().unwrap()])
        .unwrap();
    let denied = engine
        .submit_write(backend, 0, [&[0x55u8; 512][..]])
        .unwrap();
    let good = engine
        .submit_read(backend, 512 << 10, [chunks.pop().unwrap()])
        .unwrap();
    let _fourth = engine.submit_flush(backend).unwrap();
    let err = engine.submit_flush(backend).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);

    let done = engine.wait(&mut graph, outside).unwrap();
    assert_eq!(done.result.unwrap_err().kind(), ErrorKind::InvalidInput);
    let done = engine.wait(&mut graph, denied).unwrap();
    assert_eq!(done.result.unwrap_err().kind(), ErrorKind::ReadOnly);
    let mut done = engine.wait(&mut graph, good).unwrap();
    done.result.unwrap();
    let sector = (512 << 10) / SECTOR;
    assert!(done.buffers().flatten().all(|b| *b == view[sector]));
    let err = engine.take(good).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleHandle);
    engine.drain(&mut graph);
    assert_eq!(engine.in_flight(), 0);
    assert_eq!(engine.len(), 1, "the flush waits to be collected");
    let (_, flushed) = engine.complete().unwrap();
    flushed.result.unwrap();
    assert!(engine.is_empty());
}

/// While requests are in flight, chain changes that touch their chain are
/// refused; after a drain they go ahead.
fn chain_changes_wait_for_a_drain() {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    let (top_bytes, base_bytes, _) = chain(dir, "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 1 << 20);
    let mut arena = vec![0u8; 8 * 4096];
    let mut images = files.images(9);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, false);
    let base = graph.backing(top).unwrap().unwrap();
    let mut engine: Engine<'_> = Engine::new();
    for (i, buf) in arena.chunks_mut(4096).enumerate() {
        engine
            .submit_read(backend, i as u64 * (256 << 10), [buf])
            .unwrap();
    }
    engine.poll(&mut graph);
    assert!(engine.operations() > 0, "nothing went in flight");
    assert!(graph.has_requests_in_flight(top) && graph.has_requests_in_flight(base));
    let busy = |r: blockgraph::Result<()>| assert_eq!(r.unwrap_err().kind(), ErrorKind::Busy);
    busy(graph.detach_backend(backend));
    busy(graph.replace_root(backend, base));
    busy(graph.set_backing(top, None));
    busy(graph.drop_intermediate(&mut images, top, top, Some(base)));
    engine.drain(&mut graph);
    assert!(!graph.has_requests_in_flight(top) && !graph.has_requests_in_flight(base));
    while let Some((_, done)) = engine.complete() {
        done.result.unwrap();
    }
    graph.detach_backend(backend).unwrap();
    assert_eq!(graph.node_count(), 0);
}

/// The check before an image's first write (every cluster in use
/// counted) runs a bounded step per poll when the write comes through the
/// engine: no poll reads every L2 table of the image; reads that do not
/// overlap the waiting write — submitted before it or after it — complete
/// meanwhile; a read after it that overlaps it waits, and sees it.
/// A cache of 8 slices, an image of 32 L2 tables, two metadata buffers
/// lent: a read whose L2 slice is not cached waits for it, loaded as a
/// device operation, while reads that hit go to the device in the same
/// poll and complete meanwhile; no poll reads metadata synchronously (a
/// poll's device reads are operations in flight before it); two reads
/// missing one slice share its load, and a load that fails fails them; a
/// write in place that misses loads its slice split-phase too.
fn metadata_misses() {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    // 4 KiB clusters: each L2 table maps 2 MiB of guest.
    let create = "create -q -f qcow2 -o cluster_size=4096 top.qcow2 64M";
    qemu_img(dir, &create.split(' ').collect::<Vec<_>>());
    let mut writes: Vec<String> = (0..32)
        .map(|i| format!("write -P {:#x} {}M 8k", 0x40 + i, 2 * i))
        .collect();
    writes.push("write -P 0x3f 0 32k".into());
    qemu_io(dir, "qcow2", "top.qcow2", &writes);
    let top_bytes = fs::read(dir.join("top.qcow2")).unwrap();
    let mut files = Files::new(&top_bytes, &[], 1 << 20);
    // The buffers outlive the graph, whose devices may hold them.
    let mut arena = vec![0u8; 32 * 4096];
    let mut slices = vec![0u8; 2 * 4096];
    let data = [0x99u8; 4096];
    let mut images = files.images(5);
    let mut graph: Box<TestGraph<'_, '_, 8>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, true);
    let file = graph.file(top).unwrap().unwrap();
    let reads = |g: &mut TestGraph<'_, '_, 8>| g.device_mut(file).unwrap().inner().reads();
    let mut engine: Engine<'_> = Engine::new();
    for buf in slices.chunks_mut(4096) {
        engine.lend_metadata_buffer(buf).unwrap();
    }
    let mut buffers = arena.chunks_mut(4096);
    let mut buf = || [buffers.next().unwrap()];
    // Table 0 (and the L1 table) cached.
    let warm = engine.submit_read(backend, 0, buf()).unwrap();
    engine.wait(&mut graph, warm).unwrap().result.unwrap();

    let table = |n: u64| n * (2 << 20);
    let missing = engine.submit_read(backend, table(20), buf()).unwrap();
    let hits: Vec<Ticket> = (1..7)
        .map(|i| engine.submit_read(backend, i * 4096, buf()).unwrap())
        .collect();
    let (mut polls, mut hits_while_loading, mut finished) = (0, 0, 0);
    while finished < 7 {
        polls += 1;
        assert!(polls < 1000, "the reads never finish");
        let (before, in_flight) = (reads(&mut graph), engine.operations() as u64);
        engine.poll(&mut graph);
        assert!(
            reads(&mut graph) - before <= in_flight,
            "poll {polls} read metadata synchronously"
        );
        if polls == 1 {
            // The slice's load and the six hits' data, together.
            assert_eq!(engine.metadata_loads_in_flight(), 1);
            assert_eq!(engine.operations(), 7);
        }
        while let Some((ticket, mut done)) = engine.complete() {
            done.result.unwrap();
            finished += 1;
            let byte = done.buffers().next().unwrap()[0];
            if ticket == missing {
                assert_eq!(byte, 0x40 + 20);
            } else {
                assert!(hits.contains(&ticket));
                assert_eq!(byte, 0x3f);
                hits_while_loading += engine.metadata_loads_in_flight();
            }
        }
    }
    assert!(
        hits_while_loading > 0,
        "no hit completed while the miss loaded"
    );

    // Two reads of table 21: one load; it fails, and so do both.
    graph
        .device_mut(file)
        .unwrap()
        .inner_mut()
        .fail_operation(Some(0));
    let (a, b) = (
        engine.submit_read(backend, table(21), buf()).unwrap(),
        engine
            .submit_read(backend, table(21) + 4096, buf())
            .unwrap(),
    );
    engine.poll(&mut graph);
    assert_eq!(
        (engine.metadata_loads_in_flight(), engine.operations()),
        (1, 1)
    );
    for ticket in [a, b] {
        let done = engine.wait(&mut graph, ticket).unwrap();
        assert_eq!(done.result.unwrap_err().kind(), ErrorKind::Io);
    }
    // Loaded again on the next read.
    graph
        .device_mut(file)
        .unwrap()
        .inner_mut()
        .fail_operation(None);
    let again = engine.submit_read(backend, table(21), buf()).unwrap();
    let mut done = engine.wait(&mut graph, again).unwrap();
    done.result.unwrap();
    assert_eq!(done.buffers().next().unwrap()[0], 0x40 + 21);

    // A write in place to table 22, not cached: its plan misses too (once
    // the first-write check, which reads the tables itself, has run).
    let write = engine
        .submit_write(backend, table(22), [&data[..]])
        .unwrap();
    let (mut polls, mut loaded) = (0, false);
    let done = loop {
        polls += 1;
        assert!(polls < 10_000, "the write never finishes");
        engine.poll(&mut graph);
        loaded |= engine.metadata_loads_in_flight() > 0;
        if let Some(done) = engine.take(write).unwrap() {
            break done;
        }
    };
    done.result.unwrap();
    assert!(loaded, "the write's plan loaded its slice synchronously");
    let check = engine.submit_read(backend, table(22), buf()).unwrap();
    let mut done = engine.wait(&mut graph, check).unwrap();
    assert!(done.buffers().next().unwrap().iter().all(|&b| b == 0x99));

    // An allocating write once reads of eight other tables have evicted
    // both its L2 slice and the refcount slices its new cluster is counted
    // through: its plan's validation (room for the new clusters) loads
    // them split-phase, so placing the cluster in the same poll finds
    // them cached, and no poll reads metadata synchronously.
    for n in 24..32 {
        let read = engine.submit_read(backend, table(n), buf()).unwrap();
        engine.wait(&mut graph, read).unwrap().result.unwrap();
    }
    let fresh = table(23) + (64 << 10);
    let write = engine.submit_write(backend, fresh, [&data[..]]).unwrap();
    let (mut polls, first) = (0, reads(&mut graph));
    let done = loop {
        polls += 1;
        assert!(polls < 10_000, "the allocating write never finishes");
        let (before, in_flight) = (reads(&mut graph), engine.operations() as u64);
        engine.poll(&mut graph);
        assert!(
            reads(&mut graph) - before <= in_flight,
            "poll {polls} of the allocating write read metadata synchronously"
        );
        if let Some(done) = engine.take(write).unwrap() {
            break done;
        }
    };
    done.result.unwrap();
    // A whole cluster: no copy-on-write, so every read was a load.
    let loads = reads(&mut graph) - first;
    assert!(loads >= 2, "the allocating write loaded {loads} slices");
    let check = engine.submit_read(backend, fresh, buf()).unwrap();
    let mut done = engine.wait(&mut graph, check).unwrap();
    assert!(done.buffers().next().unwrap().iter().all(|&b| b == 0x99));
}

fn first_write_check_in_steps() {
    let tmp = tmpdir("bg-engine-");
    let dir = tmp.path();
    // 128 L2 tables of 4 KiB (4 KiB clusters: 2 MiB of guest each).
    let create = "create -q -f qcow2 -o cluster_size=4096 top.qcow2 256M";
    qemu_img(dir, &create.split(' ').collect::<Vec<_>>());
    let writes: Vec<String> = (0..128)
        .map(|i| format!("write -P 0x5a {}M 4k", 2 * i))
        .collect();
    qemu_io(dir, "qcow2", "top.qcow2", &writes);
    let top_bytes = fs::read(dir.join("top.qcow2")).unwrap();
    let mut files = Files::new(&top_bytes, &[], 1 << 20);
    // The buffers outlive the graph, whose devices may hold them.
    let mut arena = vec![0u8; 6 * 4096];
    let data = [0x77u8; 4096];
    let mut images = files.images(11);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, top) = attach(&mut graph, &mut images, true);
    let file = graph.file(top).unwrap().unwrap();
    let reads = |graph: &mut TestGraph<'_, '_>| graph.device_mut(file).unwrap().inner().reads();

    let mut buffers = arena.chunks_mut(4096);
    let mut engine: Engine<'_> = Engine::new();
    let mut early: Vec<Option<Ticket>> = (0..3u64)
        .map(|i| {
            let buf = buffers.next().unwrap();
            Some(engine.submit_read(backend, i * (2 << 20), [buf]).unwrap())
        })
        .collect();
    let write = engine
        .submit_write(backend, 100 << 20, [&data[..]])
        .unwrap();
    for i in 3..5u64 {
        let buf = buffers.next().unwrap();
        early.push(Some(
            engine.submit_read(backend, i * (2 << 20), [buf]).unwrap(),
        ));
    }
    let buf = buffers.next().unwrap();
    let overlapping = engine.submit_read(backend, 100 << 20, [buf]).unwrap();
    let (mut polls, mut most) = (0, 0);
    let mut early_done = 0;
    let written = loop {
        let before = reads(&mut graph);
        engine.poll(&mut graph);
        polls += 1;
        most = most.max(reads(&mut graph) - before);
        assert!(polls < 10_000, "the write never goes");
        for ticket in &mut early {
            let Some(waiting) = *ticket else {
                continue;
            };
            if let Some(mut done) = engine.take(waiting).unwrap() {
                *ticket = None;
                done.result.unwrap();
                assert!(done.buffers().flatten().all(|b| *b == 0x5a));
                early_done += 1;
            }
        }
        if let Some(done) = engine.take(write).unwrap() {
            break done.result;
        }
        assert!(
            engine.take(overlapping).unwrap().is_none(),
            "a read overtook the write it overlaps"
        );
    };
    written.unwrap();
    assert_eq!(
        early_done, 5,
        "the reads that do not overlap the write finished first"
    );
    let mut after = engine.wait(&mut graph, overlapping).unwrap();
    after.result.unwrap();
    assert!(after.buffers().flatten().all(|b| *b == 0x77));
    assert!(polls >= 8, "the check ran in {polls} polls: not in steps");
    assert!(most <= 64, "one poll made {most} device reads");
    let mut back = [0u8; 4096];
    graph.backend_read(backend, 100 << 20, &mut back).unwrap();
    assert_eq!(back, data);
    graph.flush(top).unwrap();
    graph.detach_backend(backend).unwrap();
    drop(graph);
    drop(images);
    fs::write(dir.join("top.qcow2"), &files.top.0).unwrap();
    qemu_img(dir, &["check", "top.qcow2"]);
}

#[test]
fn the_first_write_check_runs_in_steps_between_requests() {
    big_stack(first_write_check_in_steps);
}

#[test]
fn chain_changes_are_refused_until_a_drain() {
    big_stack(chain_changes_wait_for_a_drain);
}

#[test]
fn refusals_and_failures_are_per_request() {
    big_stack(refusals);
}

#[test]
fn zero_writes_and_discards_wait_only_for_what_they_overlap() {
    for seed in 1..=4 {
        big_stack(move || zero_writes_and_discards_beside_requests_in_flight(seed));
    }
}

#[test]
fn many_requests_in_flight_64k_clusters() {
    big_stack(|| run::<128>("65536", 0x5eed_0001));
}

#[test]
fn many_requests_in_flight_with_copy_on_write_in_flight() {
    big_stack(|| run_lending::<128>("65536", 0x5eed_0021, (0, 4)));
    big_stack(|| run_lending::<TINY_CACHE>("4096", 0x5eed_0022, (2, 8)));
}

#[test]
fn many_requests_in_flight_4k_clusters() {
    big_stack(|| run::<128>("4096", 0x5eed_0002));
}

#[test]
fn metadata_misses_wait_without_holding_up_other_reads() {
    metadata_misses();
}

#[test]
fn many_requests_in_flight_with_a_two_slice_cache_and_metadata_buffers() {
    big_stack(|| run_lending::<TINY_CACHE>("4096", 0x5eed_000b, (2, 0)));
}

#[test]
fn many_requests_in_flight_with_a_two_slice_cache() {
    big_stack(|| run::<TINY_CACHE>("4096", 0x5eed_0005));
}

#[test]
fn overlapping_allocating_writes_in_flight_64k_clusters() {
    big_stack(|| overlapping_allocations::<128>(64 << 10, 0x5eed_0008));
}

#[test]
fn overlapping_allocating_writes_in_flight_with_a_two_slice_cache() {
    big_stack(|| overlapping_allocations::<TINY_CACHE>(4 << 10, 0x5eed_0009));
}

#[test]
fn active_commit_under_load_pivots_without_losing_a_request() {
    big_stack(|| job_under_load(true, 0x5eed_0006));
}

#[test]
fn stream_under_load_loses_no_request() {
    big_stack(|| job_under_load(false, 0x5eed_0007));
}

#[test]
fn commit_runs_copy_again_what_writes_in_flight_change() {
    for seed in 0x5eed_0010..0x5eed_0018 {
        big_stack(move || commit_runs_racing_guest_writes(seed));
    }
}

#[test]
fn a_flush_with_nothing_to_write_back_stays_in_flight() {
    big_stack(|| flushes(0x5eed_0020));
}

#[test]
fn stream_runs_never_overwrite_guest_writes() {
    for seed in [0x5eed_000a, 0x5eed_000b, 0x5eed_000c] {
        big_stack(move || stream_racing_guest_writes(seed));
    }
}

#[test]
fn many_requests_in_flight_on_host_files() {
    big_stack(|| run_on_files(false, 0x5eed_0003));
}

#[test]
fn many_requests_in_flight_on_host_files_direct() {
    big_stack(|| run_on_files(true, 0x5eed_0004));
}

/// A drained section that cannot run yet (device operations in flight)
/// holds back the requests queued after it, however often the engine is
/// polled, until it runs or is given up with `Engine::cancel_drained`;
/// then they start and finish.
#[test]
fn a_pending_drained_section_holds_requests_until_given_up() {
    big_stack(pending_drained_section);
}

fn pending_drained_section() {
    let mut early = vec![vec![0u8; 4096]; 8];
    let mut late = vec![0u8; 4096];
    let tmp = tmpdir("bg-engine-");
    let (top_bytes, base_bytes, model) = chain(tmp.path(), "65536");
    let mut files = Files::new(&top_bytes, &base_bytes, 1 << 20);
    let mut images = files.images(7);
    let mut graph: Box<TestGraph<'_, '_>> = Box::default();
    let (backend, _) = attach(&mut graph, &mut images, false);
    let mut engine: Engine<'_> = Engine::new();
    let first: Vec<Ticket> = early
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| {
            engine
                .submit_read(backend, i as u64 * 65536, [&mut buf[..]])
                .unwrap()
        })
        .collect();
    engine.poll(&mut graph);
    assert!(
        engine.operations() > 0,
        "the reads are still on the devices"
    );
    assert!(
        engine.drained(&mut graph, |_| ()).is_none(),
        "not drained yet"
    );
    let ticket = engine
        .submit_read(backend, 1 << 20, [&mut late[..]])
        .unwrap();
    for _ in 0..100 {
        engine.poll(&mut graph);
    }
    assert_eq!(engine.operations(), 0, "the earlier reads finished");
    assert!(
        engine.take(ticket).unwrap().is_none(),
        "held behind the section"
    );
    engine.cancel_drained();
    let mut polls = 0;
    let mut done = loop {
        engine.poll(&mut graph);
        if let Some(done) = engine.take(ticket).unwrap() {
            break done;
        }
        polls += 1;
        assert!(polls < 100, "the late read never finished");
    };
    done.result.as_ref().unwrap();
    let sector = (1 << 20) / SECTOR;
    assert!(
        done.buffers().flatten().all(|b| *b == model[sector]),
        "the late read's data"
    );
    for ticket in first {
        engine.take(ticket).unwrap().unwrap().result.unwrap();
    }
}
