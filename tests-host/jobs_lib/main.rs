//! Library-level tests of block jobs (QEMU iotests 030 stream, 040 commit,
//! 041 mirror, ported to the step-wise API): active commit under random guest
//! I/O, cancel before and after READY, intermediate commit, error policies
//! with injected device faults, frozen links and overlapping jobs, parallel
//! streams, stream edge cases, live snapshots, and heap-free stepping.
//!
//! Images are made with qemu-img and qemu-io; every result is judged by a
//! shadow copy of the guest view (initialised from `qemu-img convert -O raw`)
//! and by `qemu-img check` / `convert` on the files afterwards. A missing
//! qemu-img fails these tests; it never skips them.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;

use blockgraph::device::{DeviceId, FileDevice, MemDevice};
use blockgraph::graph::{ByName, OpenByName};
use blockgraph::host::PathResolver;
use blockgraph::jobs::{
    CommitRequest, CopyMode, IoStatus, JobId, JobInfo, JobKind, JobStatus, OnError, StreamRequest,
};
use blockgraph::{
    Access, BackendId, Device, Error, ErrorKind, Graph, NodeId, OpenOptions, Resolver,
};

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/counting.rs"]
mod counting;
use common::{qemu_img, render, run};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Copy buffer handed to every job step.
const SCRATCH: usize = 64 * 1024;
/// Upper bound on steps of any job here (a job that needs more hangs).
const STEP_LIMIT: u64 = 200_000;

// ---------------------------------------------------------------------------
// The oracle: qemu-img and qemu-io.
// ---------------------------------------------------------------------------

/// A temporary directory, on tmpfs when there is one: images are flushed
/// (fdatasync) on every allocating write, which a disk makes slow.
fn scratch_dir() -> tempfile::TempDir {
    common::shm_tmpdir("jobs_lib.")
}

/// Runs qemu-io commands on a qcow2 image ([`common::qemu_io`]); none at all
/// runs nothing.
fn qemu_io(dir: &Path, img: &str, cmds: &[String]) {
    if !cmds.is_empty() {
        common::qemu_io(dir, "qcow2", img, cmds);
    }
}

/// Creates a qcow2 (v3) image, optionally over `backing` (a qcow2 name
/// relative to `dir`).
fn create(dir: &Path, name: &str, size: u64, cluster: u64, backing: Option<&str>) {
    let opts = format!("cluster_size={cluster}");
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if let Some(backing) = backing {
        args.extend(["-b", backing, "-F", "qcow2"]);
    }
    args.extend([name, &size]);
    qemu_img(dir, &args);
}

/// The image's guest view, as `qemu-img convert -O raw` gives it (`-U`: the
/// image may still be open here).
fn guest_view(dir: &Path, img: &str) -> Vec<u8> {
    let raw = format!("{img}.view.raw");
    qemu_img(
        dir,
        &["convert", "-U", "-f", "qcow2", "-O", "raw", img, &raw],
    );
    let view = std::fs::read(dir.join(&raw)).expect("read converted view");
    std::fs::remove_file(dir.join(&raw)).expect("remove converted view");
    view
}

/// `qemu-img check` must exit 0: no corruption, no leak.
fn check(dir: &Path, img: &str) {
    let args = ["check", "-f", "qcow2", img];
    let out = run(dir, "qemu-img", &args);
    assert!(
        out.status.success(),
        "qemu-img check {img} found problems:\n{}",
        render(dir, "qemu-img", &args, &out)
    );
}

/// `qemu-img check` after an injected fault: leaked clusters (exit 3) are
/// tolerated, as after a crash; corruption is not. Returns whether it leaked.
fn check_allowing_leaks(dir: &Path, img: &str) -> bool {
    let args = ["check", "-f", "qcow2", img];
    let out = run(dir, "qemu-img", &args);
    match out.status.code() {
        Some(0) => false,
        Some(3) => {
            println!("note: {img} leaked clusters after an injected fault (tolerated)");
            true
        }
        _ => panic!(
            "qemu-img check {img} found corruption:\n{}",
            render(dir, "qemu-img", &args, &out)
        ),
    }
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().expect("UTF-8 path").to_owned()
}

// ---------------------------------------------------------------------------
// Random numbers, images with data, comparisons.
// ---------------------------------------------------------------------------

/// SplitMix64: small, seedable, allocation-free.
struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// A random sector-aligned range of at most `max_len` bytes inside `size`.
fn sector_range(rng: &mut Rng, size: u64, max_len: u64) -> (u64, u64) {
    let sectors = size / 512;
    let first = rng.below(sectors);
    let most = (max_len / 512).clamp(1, sectors - first);
    (first * 512, (1 + rng.below(most)) * 512)
}

/// qemu-io commands that put `writes` random patterned extents into a layer
/// of `size` bytes, plus (for overlays) a zeroed and a discarded extent.
fn layer_cmds(rng: &mut Rng, size: u64, writes: usize, holes: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..writes {
        let (off, len) = sector_range(rng, size, size / 6);
        let pattern = 1 + rng.below(255);
        cmds.push(format!("write -P {pattern} {off} {len}"));
    }
    if holes {
        let (off, len) = sector_range(rng, size, size / 12);
        cmds.push(format!("write -z {off} {len}"));
        let (off, len) = sector_range(rng, size, size / 12);
        cmds.push(format!("discard {off} {len}"));
    }
    cmds
}

/// Creates a layer and fills it with random data.
fn make_layer(
    dir: &Path,
    name: &str,
    size: u64,
    cluster: u64,
    backing: Option<&str>,
    rng: &mut Rng,
    writes: usize,
) {
    create(dir, name, size, cluster, backing);
    qemu_io(dir, name, &layer_cmds(rng, size, writes, backing.is_some()));
}

/// Fails with the first differing range when `actual != expected`.
fn assert_same(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i..actual.len())
            .find(|&j| actual[j] == expected[j])
            .unwrap_or(actual.len());
        panic!(
            "{what}: bytes {i}..{end} ({} bytes) differ: got {:#04x}.., expected {:#04x}..",
            end - i,
            actual[i],
            expected[i]
        );
    }
}

// ---------------------------------------------------------------------------
// Graph helpers.
// ---------------------------------------------------------------------------

type FileGraph = Graph<FileDevice>;

/// A graph is large (hundreds of KiB): it lives on the heap here.
trait Boxed {
    fn boxed() -> Box<Self>;
}

impl<D: Device> Boxed for Graph<D> {
    fn boxed() -> Box<Self> {
        Box::default()
    }
}

fn writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::probing()
    }
}

/// Opens `name` and attaches a read-write backend to it, which is then its
/// only holder (as in a VMM). Returns the active node and the backend.
fn open_attached<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    name: &str,
) -> (NodeId, BackendId) {
    let node = graph.open_image(resolver, name, writable()).unwrap();
    let backend = graph
        .attach_backend(node, Access::READ_WRITE_DEVICE)
        .unwrap();
    graph.unref(node).unwrap();
    (node, backend)
}

/// `top` and every node below it.
fn chain<D: Device>(graph: &Graph<D>, top: NodeId) -> Vec<NodeId> {
    let mut nodes = vec![top];
    while let Some(below) = graph.backing(*nodes.last().unwrap()).unwrap() {
        nodes.push(below);
    }
    nodes
}

/// File names of the chain from `top`, for messages.
fn chain_names<D: Device>(graph: &Graph<D>, top: NodeId) -> Vec<String> {
    chain(graph, top)
        .into_iter()
        .map(|n| {
            let name = graph.name(n).unwrap();
            name.rsplit('/').next().unwrap_or(name).to_owned()
        })
        .collect()
}

fn read_backend<D: Device>(graph: &mut Graph<D>, backend: BackendId) -> Vec<u8> {
    let root = graph.root(backend).unwrap();
    let mut buf = vec![0u8; graph.size(root).unwrap() as usize];
    graph.backend_read(backend, 0, &mut buf).unwrap();
    buf
}

fn read_node<D: Device>(graph: &mut Graph<D>, node: NodeId) -> Vec<u8> {
    let mut buf = vec![0u8; graph.size(node).unwrap() as usize];
    graph.read(node, 0, &mut buf).unwrap();
    buf
}

fn info<D: Device>(graph: &Graph<D>, job: JobId) -> JobInfo {
    graph.job_info(job).unwrap()
}

/// Steps `job` (without guest I/O) until it concludes; returns its info.
fn finish<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    job: JobId,
    scratch: &mut [u8],
) -> JobInfo {
    for _ in 0..STEP_LIMIT {
        if graph.job_step(job, resolver, scratch).unwrap() == JobStatus::Concluded {
            return info(graph, job);
        }
    }
    panic!("job did not conclude: {:?}", info(graph, job));
}

/// Steps `job` until `until(status)` holds; returns that status.
fn step_until<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    job: JobId,
    scratch: &mut [u8],
    until: impl Fn(&JobInfo) -> bool,
) -> JobInfo {
    for _ in 0..STEP_LIMIT {
        graph.job_step(job, resolver, scratch).unwrap();
        let now = info(graph, job);
        if until(&now) {
            return now;
        }
    }
    panic!("job never reached the wanted state: {:?}", info(graph, job));
}

// ---------------------------------------------------------------------------
// A guest doing random I/O through its backend, with a shadow of its view.
// ---------------------------------------------------------------------------

/// Longest random guest write.
const MAX_WRITE: usize = 192 * 1024;

struct Guest {
    rng: Rng,
    shadow: Vec<u8>,
    cluster: u64,
    data: Vec<u8>,
    ops: u64,
}

impl Guest {
    pub(crate) fn new(seed: u64, shadow: Vec<u8>, cluster: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            shadow,
            cluster,
            data: vec![0; MAX_WRITE],
            ops: 0,
        }
    }

    /// 0-3 random requests.
    pub(crate) fn burst<D: Device>(&mut self, graph: &mut Graph<D>, backend: BackendId) {
        for _ in 0..self.rng.below(4) {
            self.one(graph, backend);
        }
    }

    pub(crate) fn range(&mut self) -> (u64, u64) {
        let size = self.shadow.len() as u64;
        let max = if self.rng.below(4) == 0 {
            MAX_WRITE as u64
        } else {
            8 * KIB
        };
        let off = self.rng.below(size);
        (off, 1 + self.rng.below(max.min(size - off)))
    }

    /// One random request: a data write through the backend (unaligned), or a
    /// zero write or discard on the backend's root node.
    pub(crate) fn one<D: Device>(&mut self, graph: &mut Graph<D>, backend: BackendId) {
        let root = graph.root(backend).unwrap();
        let size = self.shadow.len() as u64;
        let cs = self.cluster;
        let (mut off, mut len) = self.range();
        match self.rng.below(10) {
            0 => {
                graph.write_zeroes(root, off, len).unwrap();
                self.shadow[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                if self.rng.below(2) == 0 {
                    off = off / cs * cs;
                    len = (len.div_ceil(cs) * cs).min(size - off);
                }
                graph.discard(root, off, len).unwrap();
                // Whole clusters read as zeros (v3: zero flag over a backing
                // file, unallocated without one); partial ones are untouched.
                let first = off.next_multiple_of(cs);
                let end = if off + len == size {
                    size
                } else {
                    (off + len) / cs * cs
                };
                if end > first {
                    self.shadow[first as usize..end as usize].fill(0);
                }
            }
            _ => {
                let data = &mut self.data[..len as usize];
                self.rng.fill(data);
                graph.backend_write(backend, off, data).unwrap();
                self.shadow[off as usize..(off + len) as usize].copy_from_slice(data);
            }
        }
        self.ops += 1;
    }
}

/// Pauses `job`, lets the guest run, checks a paused step does nothing, and
/// resumes it to the state it had.
fn pause_round<D: Device, R: Resolver<D>>(
    graph: &mut Graph<D>,
    resolver: &mut R,
    job: JobId,
    scratch: &mut [u8],
    guest: &mut Guest,
    backend: BackendId,
) {
    let before = info(graph, job);
    graph.job_pause(job).unwrap();
    assert_eq!(info(graph, job).status, JobStatus::Paused);
    guest.burst(graph, backend);
    assert_eq!(
        graph.job_step(job, resolver, scratch).unwrap(),
        JobStatus::Paused
    );
    assert_eq!(info(graph, job).offset, before.offset, "a paused job moved");
    assert_eq!(
        graph.job_complete(job).map_err(|e| e.kind()),
        Err(ErrorKind::InvalidInput),
        "complete on a paused job"
    );
    graph.job_resume(job).unwrap();
    assert_eq!(info(graph, job).status, before.status, "resume state");
}

// ---------------------------------------------------------------------------
// In-memory images for fault injection: MemDevice behind a name resolver.
// ---------------------------------------------------------------------------

/// A MemDevice that reports its length (which grows) to the test.
struct Disk<'a> {
    mem: MemDevice<'a>,
    len: Rc<Cell<u64>>,
}

impl Device for Disk<'_> {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        self.mem.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        let result = self.mem.write_at(offset, buf);
        self.len.set(self.mem.size());
        result
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        self.mem.flush()
    }

    fn is_read_only(&self) -> bool {
        self.mem.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.mem.identity()
    }
}

/// An image file loaded into a buffer with room to grow.
struct MemImage {
    name: String,
    buf: Vec<u8>,
    len: Rc<Cell<u64>>,
}

/// Loads `(name, spare bytes)` images from `dir`.
fn load_images(dir: &Path, images: &[(&str, u64)]) -> Vec<MemImage> {
    images
        .iter()
        .map(|&(name, spare)| {
            let mut buf = std::fs::read(dir.join(name)).expect("read image");
            let len = buf.len() as u64;
            buf.resize((len + spare) as usize, 0);
            MemImage {
                name: name.to_owned(),
                buf,
                len: Rc::new(Cell::new(len)),
            }
        })
        .collect()
}

/// Writes the buffers back to their files (for qemu-img).
fn store_images(dir: &Path, images: &[MemImage]) {
    for image in images {
        std::fs::write(
            dir.join(&image.name),
            &image.buf[..image.len.get() as usize],
        )
        .expect("write image back");
    }
}

/// An image [`MemImages`] serves: name, device id, the buffer (until
/// opened) and the shared length.
type MemSlot<'a> = (String, u64, Option<&'a mut [u8]>, Rc<Cell<u64>>);

/// Serves in-memory images by name; each can be opened once.
struct MemImages<'a> {
    slots: Vec<MemSlot<'a>>,
}

impl<'a> MemImages<'a> {
    pub(crate) fn new(images: &'a mut [MemImage]) -> Self {
        let slots = images
            .iter_mut()
            .enumerate()
            .map(|(i, image)| {
                (
                    image.name.clone(),
                    i as u64 + 1,
                    Some(&mut image.buf[..]),
                    Rc::clone(&image.len),
                )
            })
            .collect();
        Self { slots }
    }

    pub(crate) fn take(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        let Some((_, id, storage, len)) = self.slots.iter_mut().find(|s| s.0 == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        let Some(storage) = storage.take() else {
            return Err(Error::new(ErrorKind::Busy, "in-memory image already open"));
        };
        let mut mem = MemDevice::new(storage, len.get(), *id)?;
        mem.set_read_only(!writable);
        Ok(Disk {
            mem,
            len: Rc::clone(len),
        })
    }
}

impl<'a> OpenByName<Disk<'a>> for MemImages<'a> {
    fn open_by_name(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        self.take(name, writable)
    }
}

/// The device under format node `node`.
fn disk_of<'g, 'a>(graph: &'g mut Graph<Disk<'a>>, node: NodeId) -> &'g mut Disk<'a> {
    let file = graph.file(node).unwrap().expect("format node has a file");
    graph.device_mut(file).unwrap()
}

mod active_commit;
mod cancel;
use cancel::*;
mod errors;
mod intermediate_commit;
mod live_snapshot;
mod more_cases;
mod no_heap;
mod overlapping;
mod parallel_streams;
mod stream_edges;
