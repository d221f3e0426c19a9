//! Each request writes each data byte once, and cuts its device writes only
//! at 4 KiB boundaries of the guest (issue "Many requests in flight", item
//! 6: crash-safe chunking, no double writes).
//!
//! The images live in memory behind a recording device that logs every
//! write (offset and length). Each request runs in a graph of its own;
//! afterwards the image is written out and `qemu-img map` tells which of
//! its clusters hold guest data. Of the logged writes that land on data
//! clusters (metadata tables may be written more than once: a new L2 table
//! is zeroed, then written back with its entries), none may overlap another
//! of the same request, none may straddle data and metadata, and each must
//! start and end at the request's own ends or at a multiple of 4 KiB of the
//! guest (of the cluster size, for clusters under 4 KiB, which the device
//! places apart). The image must equal what qemu-io (or qemu-img, for the
//! jobs) makes of a copy, and pass `qemu-img check`.
//!
//! Requests: writes aligned and unaligned, inside one cluster and across
//! many, over clusters the image owns (in place) and ones it must allocate
//! (copy-on-write from the backing file or zeros), scatter-gather writes
//! with segment boundaries inside sectors, partial zero writes; cluster
//! sizes 512 B, 4 KiB, 64 KiB, 128 KiB and 2 MiB, with and without a
//! backing file. Jobs: a commit into a base with 2 MiB clusters and a
//! stream into an overlay with 2 MiB clusters, with a scratch smaller than
//! a cluster (each new cluster is still filled once).

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use blockgraph::device::{DeviceId, Queue};
use blockgraph::engine::Engine;
use blockgraph::graph::{ByName, OpenByName};
use blockgraph::jobs::{CommitRequest, JobStatus, OnError, StreamRequest};
use blockgraph::{Access, Device, Error, ErrorKind, Format, Graph, OpenOptions};

use tempfile::TempDir;

mod common;
use common::{copy_dir, own_data_extents, qemu_compare, qemu_img, qemu_io};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The image the requests write.
const IMG: &str = "img.qcow2";
/// Its backing file, when it has one.
const BASE: &str = "base.qcow2";
/// Virtual size of both.
const SIZE: u64 = 16 * MIB;
/// The alignment every cut must keep (for clusters of at least this size).
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------
// A recording in-memory device
// ---------------------------------------------------------------------------

/// One logged device write: which image, where, how long.
#[derive(Clone, Copy, Debug)]
struct Logged {
    image: usize,
    offset: u64,
    len: u64,
}

type Log = Rc<RefCell<Vec<Logged>>>;

/// An image's bytes, shared with the test so they outlive the graph.
type Bytes = Rc<RefCell<Vec<u8>>>;

/// A device over shared bytes that logs every write (a vectored write is
/// one write).
struct Recorder {
    bytes: Bytes,
    log: Log,
    image: usize,
    read_only: bool,
}

impl Device for Recorder {
    fn size(&self) -> u64 {
        self.bytes.borrow().len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        let bytes = self.bytes.borrow();
        let start = offset as usize;
        match bytes.get(start..start + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::new(ErrorKind::Io, "read past the end")),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        self.write_vectored_at(offset, &[buf])
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> blockgraph::Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "read-only"));
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let mut bytes = self.bytes.borrow_mut();
        let end = offset as usize + len;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        let mut at = offset as usize;
        for buf in bufs {
            bytes[at..at + buf.len()].copy_from_slice(buf);
            at += buf.len();
        }
        self.log.borrow_mut().push(Logged {
            image: self.image,
            offset,
            len: len as u64,
        });
        Ok(())
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> DeviceId {
        DeviceId(0, self.image as u64 + 1)
    }
}

/// Split-phase access for the request engine: every operation completes in
/// `submit`.
impl Queue<'_> for Recorder {}

/// In-memory images by name, each opened on a [`Recorder`].
struct Images {
    names: Vec<&'static str>,
    bytes: Vec<Bytes>,
    log: Log,
}

impl Images {
    /// The images `names` of `dir`, read into memory.
    fn load(dir: &Path, names: &[&'static str]) -> Self {
        let bytes = names
            .iter()
            .map(|n| Rc::new(RefCell::new(fs::read(dir.join(n)).unwrap())))
            .collect();
        Self {
            names: names.to_vec(),
            bytes,
            log: Rc::default(),
        }
    }

    /// Writes the images back to `dir`.
    fn store(&self, dir: &Path) {
        for (name, bytes) in self.names.iter().zip(&self.bytes) {
            fs::write(dir.join(name), &*bytes.borrow()).unwrap();
        }
    }

    /// The writes logged so far to image `name`.
    fn writes_to(&self, name: &str) -> Vec<Logged> {
        let image = self.names.iter().position(|n| *n == name).unwrap();
        let log = self.log.borrow();
        log.iter().filter(|w| w.image == image).copied().collect()
    }
}

impl OpenByName<Recorder> for Images {
    fn open_by_name(&mut self, name: &str, writable: bool) -> blockgraph::Result<Recorder> {
        let Some(image) = self.names.iter().position(|n| *n == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        Ok(Recorder {
            bytes: Rc::clone(&self.bytes[image]),
            log: Rc::clone(&self.log),
            image,
            read_only: !writable,
        })
    }
}

// ---------------------------------------------------------------------------
// Checking the logged writes
// ---------------------------------------------------------------------------

/// The guest offset of host byte `host` of `img`'s data, if it is data.
fn guest_of(extents: &[(u64, u64, u64)], host: u64) -> Option<u64> {
    extents
        .iter()
        .find(|&&(_, len, at)| host >= at && host < at + len)
        .map(|&(start, _, at)| start + (host - at))
}

/// The host offset of guest byte `guest` of `img`'s own data, if it is
/// data.
fn host_of(extents: &[(u64, u64, u64)], guest: u64) -> Option<u64> {
    extents
        .iter()
        .find(|&&(start, len, _)| guest >= start && guest < start + len)
        .map(|&(start, _, at)| at + (guest - start))
}

/// Checks the data writes among `writes` (to `img` of `dir`, as it is now):
/// no two overlap, none straddles data and metadata, and each starts and
/// ends at one of `ends`, on a 4 KiB boundary of the guest, or (clusters
/// under 4 KiB) where the device does not hold the guest bytes on either
/// side next to each other. Returns how many data bytes were written.
fn check_data_writes(dir: &Path, img: &str, writes: &[Logged], ends: &[u64], what: &str) -> u64 {
    let extents = own_data_extents(dir, img);
    let mut data = Vec::new();
    for w in writes {
        let (first, last) = (w.offset, w.offset + w.len - 1);
        let touches = extents
            .iter()
            .any(|&(_, len, at)| first < at + len && at <= last);
        if !touches {
            continue;
        }
        let (Some(start), Some(end)) = (guest_of(&extents, first), guest_of(&extents, last)) else {
            panic!("{what}: write {w:?} straddles data and metadata");
        };
        assert_eq!(
            end - start,
            last - first,
            "{what}: write {w:?} spans guest ranges that are not contiguous"
        );
        for edge in [start, end + 1] {
            let apart = || {
                let before = edge.checked_sub(1).and_then(|e| host_of(&extents, e));
                match (before, host_of(&extents, edge)) {
                    (Some(before), Some(after)) => before + 1 != after,
                    _ => true,
                }
            };
            assert!(
                ends.contains(&edge) || edge.is_multiple_of(BLOCK) || apart(),
                "{what}: data write {w:?} (guest {start}..={end}) is cut at guest {edge}, \
                 inside a 4 KiB block the device holds in one piece ({:?})",
                &writes[..writes.len().min(8)]
            );
        }
        data.push((w.offset, w.len));
    }
    data.sort_unstable();
    for pair in data.windows(2) {
        let ((o1, l1), (o2, l2)) = (pair[0], pair[1]);
        assert!(
            o1 + l1 <= o2,
            "{what}: device bytes {o1}+{l1} and {o2}+{l2} written twice by one request"
        );
    }
    data.iter().map(|w| w.1).sum()
}

fn writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::new(Format::Qcow2)
    }
}

// ---------------------------------------------------------------------------
// Guest requests
// ---------------------------------------------------------------------------

/// One guest request, as the library makes it and as qemu-io does.
#[derive(Clone, Copy, Debug)]
enum Request {
    /// `len` bytes of `byte` at `offset`, in segments of these lengths (the
    /// last segment takes the rest).
    Write {
        offset: u64,
        len: u64,
        byte: u8,
        cuts: &'static [u64],
    },
    /// Zeros.
    Zeroes { offset: u64, len: u64 },
    /// As `Write`, through the request engine; `fresh` when the engine
    /// allocates its clusters with the data in flight (its copied head then
    /// goes to the device apart from its data).
    Engine {
        offset: u64,
        len: u64,
        byte: u8,
        cuts: &'static [u64],
        fresh: bool,
    },
}

impl Request {
    fn qemu_io(self) -> String {
        match self {
            Request::Write {
                offset, len, byte, ..
            }
            | Request::Engine {
                offset, len, byte, ..
            } => format!("write -P 0x{byte:02x} {offset} {len}"),
            Request::Zeroes { offset, len } => format!("write -z {offset} {len}"),
        }
    }

    fn range(self) -> (u64, u64) {
        match self {
            Request::Write { offset, len, .. }
            | Request::Zeroes { offset, len }
            | Request::Engine { offset, len, .. } => (offset, len),
        }
    }
}

/// The requests run on every configuration: unaligned across many
/// clusters (some owned, some not), aligned whole clusters, a short one
/// inside a cluster, a scatter-gather write cut inside sectors, and a
/// partial zero write.
fn requests(cluster: u64) -> Vec<Request> {
    vec![
        Request::Write {
            offset: 12345,
            len: 6 * MIB,
            byte: 0x55,
            cuts: &[],
        },
        Request::Write {
            offset: 4 * cluster.max(MIB),
            len: 3 * cluster,
            byte: 0x66,
            cuts: &[],
        },
        Request::Write {
            offset: 10 * MIB + 1000,
            len: 3000,
            byte: 0x77,
            cuts: &[],
        },
        Request::Write {
            offset: 9 * MIB + 777,
            len: MIB + 5000,
            byte: 0x88,
            cuts: &[1000, 4999, 333, 70_000],
        },
        // In place (the image owns 3 MiB..4 MiB): the engine's own path.
        Request::Engine {
            offset: 3 * MIB + 100,
            len: 200_000,
            byte: 0x99,
            cuts: &[1000, 3000, 4096, 100_000],
            fresh: false,
        },
        // Allocating (copy-on-write from the backing file or zeros), one
        // batch: the engine's allocating path, its data as device writes,
        // the copied head and tail apart from it (small enough for the
        // synchronous path to assemble them, for clusters up to 64 KiB).
        Request::Engine {
            offset: 11 * MIB + 1000,
            len: (32 * cluster).min(40 * KIB) - 5000,
            byte: 0xaa,
            cuts: &[3096, 8192],
            fresh: true,
        },
        Request::Zeroes {
            offset: 13 * MIB + 512,
            len: (3 * cluster.max(64 * KIB) + 1000).min(3 * MIB - 512),
        },
    ]
}

/// Makes `img.qcow2` with `cluster`-byte clusters in `dir`, over a
/// patterned `base.qcow2` when `backing`, with some clusters already
/// allocated (written in place later).
fn make_images(dir: &Path, cluster: u64, backing: bool) {
    let size = SIZE.to_string();
    let opts = format!("cluster_size={cluster}");
    let mut args = vec!["create", "-f", "qcow2", "-o", &opts];
    if backing {
        qemu_img(dir, &["create", "-f", "qcow2", BASE, &size]);
        qemu_io(dir, "qcow2", BASE, &["write -P 0x5a 0 16M"]);
        args.extend(["-b", BASE, "-F", "qcow2"]);
    }
    args.extend([IMG, &size]);
    qemu_img(dir, &args);
    qemu_io(
        dir,
        "qcow2",
        IMG,
        &["write -P 0x21 3M 1M", "write -P 0x22 9M 64k"],
    );
}

/// Runs `request` on `dir/img.qcow2` through the library; returns the
/// writes it made to the image (those of closing the graph not included).
fn run_request(dir: &Path, names: &[&'static str], request: Request) -> Vec<Logged> {
    let mut images = ByName(Images::load(dir, names));
    let writes;
    {
        let mut graph: Box<Graph<Recorder>> = Box::default();
        let node = graph.open_image(&mut images, IMG, writable()).unwrap();
        let backend = graph
            .attach_backend(node, Access::READ_WRITE_DEVICE)
            .unwrap();
        graph.unref(node).unwrap();
        let before = images.0.log.borrow().len();
        match request {
            Request::Write {
                offset,
                len,
                byte,
                cuts,
            } => {
                let data = vec![byte; len as usize];
                let segments = cut(&data, cuts);
                graph.backend_writev(backend, offset, &segments).unwrap();
            }
            Request::Engine {
                offset,
                len,
                byte,
                cuts,
                ..
            } => {
                let data = vec![byte; len as usize];
                let mut engine: Engine<'_> = Engine::new();
                let ticket = engine
                    .submit_write(backend, offset, cut(&data, cuts))
                    .unwrap();
                let done = engine.wait(&mut graph, ticket).unwrap();
                done.result.unwrap();
            }
            Request::Zeroes { offset, len } => {
                let root = graph.root(backend).unwrap();
                graph.write_zeroes(root, offset, len).unwrap();
            }
        }
        let log = images.0.log.borrow();
        let image = names.iter().position(|n| *n == IMG).unwrap();
        writes = log[before..]
            .iter()
            .filter(|w| w.image == image)
            .copied()
            .collect();
        drop(log);
        graph.backend_flush(backend).unwrap();
        graph.detach_backend(backend).unwrap();
    }
    images.0.store(dir);
    writes
}

/// `data` cut into segments of the lengths `cuts` (the last takes the
/// rest).
fn cut<'d>(data: &'d [u8], cuts: &[u64]) -> Vec<&'d [u8]> {
    let mut segments = Vec::new();
    let mut rest = data;
    for &cut in cuts {
        let (head, tail) = rest.split_at((cut as usize).min(rest.len()));
        segments.push(head);
        rest = tail;
    }
    segments.push(rest);
    segments
}

/// A temporary directory with an empty `A` (for the QEMU tools) in it, and
/// the path of `B` (for the library).
fn dirs() -> (TempDir, PathBuf, PathBuf) {
    let root = common::shm_tmpdir("bg-write-once-");
    let (a, b) = (root.path().join("A"), root.path().join("B"));
    fs::create_dir_all(&a).unwrap();
    (root, a, b)
}

fn guest_requests(cluster: u64, backing: bool) {
    let what = format!("{cluster}-byte clusters, backing {backing}");
    let (root, a, b) = dirs();
    make_images(&a, cluster, backing);
    copy_dir(&a, &b);
    let names: &[&'static str] = if backing { &[IMG, BASE] } else { &[IMG] };
    for request in requests(cluster) {
        let what = format!("{what}, {request:?}");
        qemu_io(&a, "qcow2", IMG, &[request.qemu_io()]);
        let writes = run_request(&b, names, request);
        let (offset, len) = request.range();
        let data = check_data_writes(&b, IMG, &writes, &[offset, offset + len], &what);
        if let Request::Write { len, .. } | Request::Engine { len, .. } = request {
            assert!(data >= len, "{what}: only {data} data bytes written");
        }
        if let Request::Engine { fresh: true, .. } = request {
            // The synchronous path would have assembled head and data in
            // one write (clusters up to 64 KiB); the engine's allocating
            // path writes the copied head on its own, up to the data.
            let extents = own_data_extents(&b, IMG);
            let start = host_of(&extents, offset);
            let head = writes.iter().any(|w| Some(w.offset + w.len) == start);
            assert!(
                head || cluster > 64 * KIB,
                "{what}: the write did not allocate with its data in flight"
            );
        }
        qemu_compare(root.path(), "A/img.qcow2", "B/img.qcow2", &what);
        qemu_img(&b, &["check", IMG]);
    }
}

/// [`guest_requests`] without and with a backing file, on a thread with a
/// stack large enough for a graph and a request engine built on it in
/// debug builds.
fn both_backings(cluster: u64) {
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(move || {
            guest_requests(cluster, false);
            guest_requests(cluster, true);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn clusters_512() {
    both_backings(512);
}

#[test]
fn clusters_4k() {
    both_backings(4 * KIB);
}

#[test]
fn clusters_64k() {
    both_backings(64 * KIB);
}

#[test]
fn clusters_128k() {
    both_backings(128 * KIB);
}

#[test]
fn clusters_2m() {
    both_backings(2 * MIB);
}

// ---------------------------------------------------------------------------
// Jobs with a scratch smaller than the target's cluster
// ---------------------------------------------------------------------------

/// Runs a job to its end on `dir`'s chain `top.qcow2` over `base.qcow2`
/// with a `scratch`-byte scratch; returns the writes each image received
/// during the job.
fn run_job(dir: &Path, commit: bool, scratch: usize) -> Images {
    let names: &[&'static str] = &["top.qcow2", BASE];
    let images = Images::load(dir, names);
    let mut resolver = ByName(Images {
        names: images.names.clone(),
        bytes: images.bytes.clone(),
        log: Rc::clone(&images.log),
    });
    {
        let mut graph: Box<Graph<Recorder>> = Box::default();
        let top = graph
            .open_image(&mut resolver, "top.qcow2", writable())
            .unwrap();
        let backend = graph
            .attach_backend(top, Access::READ_WRITE_DEVICE)
            .unwrap();
        graph.unref(top).unwrap();
        let top = graph.root(backend).unwrap();
        let base = graph.backing(top).unwrap().unwrap();
        let job = if commit {
            let request = CommitRequest {
                active: top,
                top,
                base,
                on_error: OnError::Report,
            };
            graph.start_commit(request).unwrap()
        } else {
            let request = StreamRequest {
                active: top,
                base: None,
                on_error: OnError::Report,
            };
            graph.start_stream(request).unwrap()
        };
        let mut buf = vec![0u8; scratch];
        for _ in 0..10_000 {
            let status = graph.job_step(job, &mut resolver, &mut buf).unwrap();
            if status == JobStatus::Ready {
                graph.job_complete(job).unwrap();
            }
            if status == JobStatus::Concluded {
                break;
            }
        }
        let info = graph.job_info(job).unwrap();
        assert!(info.error.is_none(), "job failed: {:?}", info.error);
        graph.job_dismiss(job).unwrap();
        graph.backend_flush(backend).unwrap();
        graph.detach_backend(backend).unwrap();
    }
    images.store(dir);
    images
}

/// Commit (into a base with 2 MiB clusters) or stream (into a top with 2
/// MiB clusters) with a scratch of `scratch` bytes: no data byte of the
/// target written twice over the whole job, cuts at 4 KiB, and the target
/// as qemu-img's commit or rebase leaves it.
fn job(commit: bool, scratch: usize) {
    let what = format!("commit {commit}, scratch {scratch}");
    let (root, a, b) = dirs();
    let size = SIZE.to_string();
    let (base_opts, top_opts) = match commit {
        true => ("cluster_size=2M", "cluster_size=64k"),
        false => ("cluster_size=64k", "cluster_size=2M"),
    };
    qemu_img(&a, &["create", "-f", "qcow2", "-o", base_opts, BASE, &size]);
    qemu_io(
        &a,
        "qcow2",
        BASE,
        &["write -P 0x5a 1M 3M", "write -P 0x5b 9M 1M"],
    );
    let args = ["create", "-f", "qcow2", "-o", top_opts, "-b", BASE, "-F"];
    let mut args = args.to_vec();
    args.extend(["qcow2", "top.qcow2", &size]);
    qemu_img(&a, &args);
    let writes = ["write -P 0x33 512k 5M", "write -P 0x34 12M 192k"];
    qemu_io(&a, "qcow2", "top.qcow2", &writes);
    copy_dir(&a, &b);
    let target = if commit { BASE } else { "top.qcow2" };
    if commit {
        qemu_img(&a, &["commit", "-d", "top.qcow2"]);
    } else {
        qemu_img(&a, &["rebase", "-b", "", "top.qcow2"]);
    }
    let images = run_job(&b, commit, scratch);
    let writes = images.writes_to(target);
    check_data_writes(&b, target, &writes, &[], &what);
    let (x, y) = (format!("A/{target}"), format!("B/{target}"));
    qemu_compare(root.path(), &x, &y, &what);
    qemu_img(&b, &["check", target]);
}

#[test]
fn commit_into_large_clusters_with_small_scratch() {
    job(true, 64 * KIB as usize);
    job(true, MIB as usize);
}

#[test]
fn stream_into_large_clusters_with_small_scratch() {
    job(false, 64 * KIB as usize);
    job(false, MIB as usize);
}
