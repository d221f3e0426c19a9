//! Crash safety, proven by replay (issue "Prove crash safety").
//!
//! Every operation of the write path runs on in-memory images
//! ([`MemDevice`]) made by qemu-img/qemu-io: guest writes of every kind
//! (one at a time, and many in flight through the request engine with
//! their device writes completing out of order),
//! `drop_intermediate`, commit, active commit with pivot, stream and live
//! snapshot. Two attacks follow.
//!
//! 1. **Power cuts.** The devices' observers log every write (offset and
//!    bytes) and flush, in one global sequence across the scenario's images.
//!    For every cut point `k` the images are rebuilt as their initial bytes
//!    plus the first `k` logged writes. At cut points with writes not yet
//!    flushed, a disk may have reordered them, so subsets of those writes
//!    are tried too: all of them when at most three are unflushed, else the
//!    newest write alone (it overtook everything it may depend on) and a few
//!    random subsets. Every rebuilt state must
//!    - open through the library (`Graph::open_image`, `Qcow2::open`) and
//!      pass `qemu-img check` (leaks allowed: exit 0 or 3, never 2);
//!    - show, for every image, a backing reference and a guest view (unit
//!      by unit, the unit being the smallest cluster size) that the image
//!      had at one of the API calls around the cut ("marks"): old or new,
//!      never reaching back past the last mark whose writes are all there;
//!    - hold, in the guest's image, the guest view acknowledged by the last
//!      API call that returned before the cut: a completed flush loses
//!      nothing, whatever the disk did with later writes.
//! 2. **Faults.** The same operations run again with the N-th device
//!    operation of one image failing, for every N until the operation
//!    completes without reaching it. The call must return the I/O error (no
//!    panic), the graph must be unchanged (or consistently advanced), disk
//!    and memory must agree on the chain at once and on the data after one
//!    flush once the fault is gone (the metadata cache is write-back: a
//!    failed flush leaves updates to write), `qemu-img check` must find no
//!    corruption,
//!    nothing acknowledged may be lost (the failed request reads old or
//!    new), and repeating the failed call must succeed and leave the images
//!    as a run without the fault leaves them.
//!
//! A missing qemu-img or qemu-io fails these tests; it never skips them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use blockgraph::device::{
    perform, Completion, DeviceEvent, DeviceId, MemDevice, Op, Queue, Submitted, Tag,
};
use blockgraph::engine::Engine;
use blockgraph::graph::NameBuf;
use blockgraph::jobs::{CommitRequest, JobId, JobStatus, OnError, StreamRequest};
use blockgraph::{
    Access, BackendId, Device, Error, ErrorKind, Format, Graph, NodeId, OpenOptions, Resolver,
};

mod common;
use common::{be32, be64, qemu_img, qemu_io, render, run};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Copy buffer of a job step.
const SCRATCH: usize = 64 * 1024;
/// Upper bound on the steps of one job.
const STEP_LIMIT: u64 = 10_000;
/// Upper bound on N in the fault phase (a run that never ends is a bug).
const FAULT_LIMIT: u64 = 20_000;
/// The graph under test. Its metadata cache is tiny (four 4 KiB slices) so
/// that dirty table slices are evicted, and written back, in the middle of
/// operations: the power cuts hit those write-backs too.
type LiveGraph<'a> = Graph<Disk<'a>, 64, 8, 4>;

/// Random subsets tried at each cut point with unflushed writes.
const REORDERINGS: usize = 4;
/// Failures printed in full (the rest are counted).
const SHOWN_FAILURES: usize = 12;
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

// ===========================================================================
// qemu-img and qemu-io.
// ===========================================================================

/// The guest view of `img` (or of its internal snapshot) as qemu-img
/// converts it.
fn qemu_view(dir: &Path, img: &str, snapshot: Option<&str>) -> Vec<u8> {
    let raw = format!("{img}.view.raw");
    let snap = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-U", "-f", "qcow2"];
    if let Some(snap) = &snap {
        args.extend(["-l", snap.as_str()]);
    }
    args.extend(["-O", "raw", img, &raw]);
    qemu_img(dir, &args);
    let view = std::fs::read(dir.join(&raw)).expect("read converted view");
    std::fs::remove_file(dir.join(&raw)).expect("remove converted view");
    view
}

// ===========================================================================
// Small helpers: random numbers, fingerprints, replay.
// ===========================================================================

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `len` pseudo-random bytes from `seed` (guest data: every unit differs).
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; len as usize];
    for chunk in out.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    out
}

/// Identifies image content: length and two Adler-32 sums (forward, and
/// over 4 KiB blocks taken back to front). The sums run in miniz_oxide,
/// which is built optimised even in debug builds.
type Fp = (usize, u32, u32);

fn fingerprint(bytes: &[u8]) -> Fp {
    let forward = miniz_oxide::mz_adler32_oxide(1, bytes);
    let backward = bytes
        .chunks(4096)
        .rev()
        .fold(7, miniz_oxide::mz_adler32_oxide);
    (bytes.len(), forward, backward)
}

/// One logged device event.
#[derive(Clone, Debug)]
enum Ev {
    Write {
        img: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Flush {
        img: usize,
    },
}

type Log = Rc<RefCell<Vec<Ev>>>;

/// Applies one logged write to an image's bytes (a write past the end
/// grows the image, the gap reading zeros, as a MemDevice or a file does).
fn apply(state: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if state.len() < end {
        state.resize(end, 0);
    }
    state[start..end].copy_from_slice(data);
}

/// Image `img` after every logged write.
fn replay_image(initial: &[u8], events: &[Ev], img: usize) -> Vec<u8> {
    let mut state = initial.to_vec();
    for ev in events {
        if let Ev::Write {
            img: i,
            offset,
            data,
        } = ev
        {
            if *i == img {
                apply(&mut state, *offset, data);
            }
        }
    }
    state
}

fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && &bytes[..4] == QCOW2_MAGIC
}

/// How a view is compared, unit by unit, with the views it may show.
#[derive(Clone, Copy)]
struct Units {
    /// The unit: the smallest cluster size of the scenario.
    size: u64,
}

/// Compares `view` with `candidates` unit by unit: `Ok(())` when every
/// unit equals the same unit of some candidate, `Err(unit)` for the first
/// unit that does not.
fn compare_units(view: &[u8], candidates: &[Rc<Vec<u8>>], units: Units) -> Result<(), usize> {
    let same_len: Vec<&Rc<Vec<u8>>> = candidates
        .iter()
        .filter(|c| c.len() == view.len())
        .collect();
    if same_len.iter().any(|c| c.as_slice() == view) {
        return Ok(());
    }
    if same_len.is_empty() {
        return Err(0);
    }
    let matches = |range: std::ops::Range<usize>| {
        same_len
            .iter()
            .any(|c| c[range.clone()] == view[range.clone()])
    };
    let unit = units.size as usize;
    match (0..view.len().div_ceil(unit))
        .find(|u| !matches(u * unit..((u + 1) * unit).min(view.len())))
    {
        Some(u) => Err(u),
        None => Ok(()),
    }
}

// ===========================================================================
// Live devices: MemDevice with an observer, fault arming and a resolver.
// ===========================================================================

/// Per-image state shared between the test and the image's device.
#[derive(Default)]
struct DiskState {
    /// Current length of the device.
    len: Cell<u64>,
    /// A pending `fail_operation` request, applied at the next operation.
    arm: Cell<Option<Option<u64>>>,
    /// The armed operation index (counted from arming).
    fault_at: Cell<Option<u64>>,
    /// Operations since arming.
    count: Cell<u64>,
    /// Whether the armed operation was reached (and failed).
    hit: Cell<bool>,
}

/// A MemDevice plus the bookkeeping the test needs. Writes the request
/// engine submits stay queued (as copies: the device took the bytes) and
/// are performed, and completed, a few per poll in a pseudo-random order.
struct Disk<'a> {
    mem: MemDevice<'a>,
    st: Rc<DiskState>,
    queued: Vec<(Tag, u64, Vec<u8>)>,
    order: Rng,
}

impl Disk<'_> {
    /// Applies a pending arm request, then counts an operation that reaches
    /// MemDevice's operation counter.
    fn before_op(&mut self, counted: bool) {
        if let Some(request) = self.st.arm.take() {
            self.mem.fail_operation(request);
            self.st.fault_at.set(request);
            self.st.count.set(0);
        }
        if counted {
            let count = self.st.count.get();
            if self.st.fault_at.get() == Some(count) {
                self.st.hit.set(true);
            }
            self.st.count.set(count + 1);
        }
    }
}

impl Device for Disk<'_> {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        self.before_op(true);
        self.mem.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        // MemDevice refuses writes to a read-only device before counting.
        let counted = !self.mem.is_read_only();
        self.before_op(counted);
        let result = self.mem.write_at(offset, buf);
        self.st.len.set(self.mem.size());
        result
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> blockgraph::Result<()> {
        // One operation, as MemDevice counts it.
        let counted = !self.mem.is_read_only();
        self.before_op(counted);
        let result = self.mem.write_vectored_at(offset, bufs);
        self.st.len.set(self.mem.size());
        result
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        self.before_op(true);
        self.mem.flush()
    }

    fn is_read_only(&self) -> bool {
        self.mem.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.mem.identity()
    }
}

impl<'b> Queue<'b> for Disk<'_> {
    fn submit(&mut self, tag: Tag, op: Op<'b>) -> Submitted<'b> {
        match op {
            Op::Write { offset, buf } => {
                self.queued.push((tag, offset, buf.to_vec()));
                Submitted::Queued
            }
            op => {
                let (result, buf) = perform(self, op);
                Submitted::Done(result, buf)
            }
        }
    }

    fn poll(&mut self, done: Completion<'_, 'b>) {
        let count = self.queued.len().div_ceil(2);
        for _ in 0..count {
            let pick = (self.order.next() % self.queued.len() as u64) as usize;
            let (tag, offset, data) = self.queued.swap_remove(pick);
            done(tag, self.write_at(offset, &data), None);
        }
    }

    fn busy(&self) -> bool {
        !self.queued.is_empty()
    }
}

type Observer = Box<dyn FnMut(DeviceEvent<'_>)>;

/// A buffer lent to a device, with the observer that logs its events.
type Lent<'a> = (&'a mut [u8], &'a mut dyn FnMut(DeviceEvent<'_>));

/// The buffers and observers of one run; every device event lands in `log`.
struct Storage {
    /// Per image: buffers (several for a blank image, which a failed
    /// snapshot may need to take again) with their observers.
    copies: Vec<Vec<(Vec<u8>, Observer)>>,
    disks: Vec<Rc<DiskState>>,
    log: Log,
}

impl Storage {
    fn new(fx: &Fixture) -> Self {
        let log: Log = Rc::default();
        let spare = (2 * fx.max_size + MIB) as usize;
        let mut copies = Vec::new();
        let mut disks = Vec::new();
        for (img, initial) in fx.initial.iter().enumerate() {
            let count = if fx.blank[img] { 3 } else { 1 };
            let mut list: Vec<(Vec<u8>, Observer)> = Vec::new();
            for _ in 0..count {
                let mut buf = vec![0u8; initial.len() + spare];
                buf[..initial.len()].copy_from_slice(initial);
                let log = Rc::clone(&log);
                let observer: Observer = Box::new(move |event: DeviceEvent<'_>| {
                    let ev = match event {
                        DeviceEvent::Write { offset, data } => Ev::Write {
                            img,
                            offset,
                            data: data.to_vec(),
                        },
                        DeviceEvent::Flush => Ev::Flush { img },
                    };
                    log.borrow_mut().push(ev);
                });
                list.push((buf, observer));
            }
            copies.push(list);
            let state = DiskState::default();
            state.len.set(initial.len() as u64);
            disks.push(Rc::new(state));
        }
        Self { copies, disks, log }
    }

    /// Back to the initial images, for the next run (the buffers are kept:
    /// bytes past an image's length are never read, and a write past it
    /// zeroes the gap).
    fn reset(&mut self, fx: &Fixture) {
        self.log.borrow_mut().clear();
        for (img, list) in self.copies.iter_mut().enumerate() {
            let initial = &fx.initial[img];
            for (buf, _) in list.iter_mut() {
                buf[..initial.len()].copy_from_slice(initial);
            }
            let state = DiskState::default();
            state.len.set(initial.len() as u64);
            self.disks[img] = Rc::new(state);
        }
    }
}

/// One image a [`LiveResolver`] serves.
struct Slot<'a> {
    name: String,
    id: u64,
    /// Buffers not handed out yet, last first.
    copies: Vec<Lent<'a>>,
    taken: usize,
    disk: Rc<DiskState>,
}

/// Serves the scenario's images by name as observed MemDevices.
struct LiveResolver<'a> {
    slots: Vec<Slot<'a>>,
    initial: Rc<Vec<Vec<u8>>>,
    log: Log,
}

impl<'a> LiveResolver<'a> {
    fn new(storage: &'a mut Storage, fx: &Fixture) -> Self {
        let log = Rc::clone(&storage.log);
        let slots = storage
            .copies
            .iter_mut()
            .zip(&storage.disks)
            .enumerate()
            .map(|(img, (list, disk))| {
                let mut copies: Vec<Lent<'a>> = list
                    .iter_mut()
                    .map(|(buf, observer)| {
                        let observer: &'a mut dyn FnMut(DeviceEvent<'_>) = &mut **observer;
                        (&mut buf[..], observer)
                    })
                    .collect();
                copies.reverse();
                Slot {
                    name: fx.names[img].clone(),
                    id: img as u64 + 1,
                    copies,
                    taken: 0,
                    disk: Rc::clone(disk),
                }
            })
            .collect();
        Self {
            slots,
            initial: Rc::clone(&fx.initial),
            log,
        }
    }

    fn take(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        let Some(img) = self.slots.iter().position(|s| s.name == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such in-memory image"));
        };
        let slot = &mut self.slots[img];
        let Some((buf, observer)) = slot.copies.pop() else {
            return Err(Error::new(ErrorKind::Busy, "in-memory image already open"));
        };
        if slot.taken > 0 {
            // Opened again (after a failed snapshot): what is on the disk now.
            let current = replay_image(&self.initial[img], &self.log.borrow(), img);
            buf[..current.len()].copy_from_slice(&current);
            slot.disk.len.set(current.len() as u64);
        }
        slot.taken += 1;
        let mut mem = MemDevice::new(buf, slot.disk.len.get(), slot.id)?;
        mem.set_read_only(!writable);
        mem.observe(observer);
        Ok(Disk {
            mem,
            st: Rc::clone(&slot.disk),
            queued: Vec::new(),
            order: Rng::new(img as u64 + 1),
        })
    }
}

fn store_name(name: &str, out: &mut NameBuf) -> blockgraph::Result<()> {
    out.clear();
    out.push_str(name)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "name too long"))
}

impl<'a> Resolver<Disk<'a>> for LiveResolver<'a> {
    fn open(&mut self, name: &str, writable: bool) -> blockgraph::Result<Disk<'a>> {
        self.take(name, writable)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> blockgraph::Result<Disk<'a>> {
        store_name(reference, resolved)?;
        self.take(reference, writable)
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        store_name(target, out)
    }
}

// ===========================================================================
// Rebuilt images: a read-only device over bytes, opened in a fresh graph.
// ===========================================================================

struct RoDisk<'s> {
    data: &'s [u8],
    id: u64,
}

impl Device for RoDisk<'_> {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.size())
            .ok_or(Error::new(ErrorKind::Io, "read past the end of the image"))?;
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }

    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> blockgraph::Result<()> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            "rebuilt images are read-only",
        ))
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn identity(&self) -> DeviceId {
        DeviceId(7, self.id)
    }
}

struct RoResolver<'s> {
    names: &'s [String],
    states: &'s [Vec<u8>],
}

impl<'s> RoResolver<'s> {
    fn disk(&self, name: &str) -> blockgraph::Result<RoDisk<'s>> {
        let img = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or(Error::new(ErrorKind::NotFound, "no such image"))?;
        Ok(RoDisk {
            data: &self.states[img],
            id: img as u64 + 1,
        })
    }
}

impl<'s> Resolver<RoDisk<'s>> for RoResolver<'s> {
    fn open(&mut self, name: &str, _writable: bool) -> blockgraph::Result<RoDisk<'s>> {
        self.disk(name)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        _writable: bool,
        resolved: &mut NameBuf,
    ) -> blockgraph::Result<RoDisk<'s>> {
        store_name(reference, resolved)?;
        self.disk(reference)
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        store_name(target, out)
    }
}

/// A small graph for reading rebuilt chains.
type ViewGraph<'s> = Graph<RoDisk<'s>, 16, 2, 8, 1>;

/// An image as the library opens it: its chain (names, top first) and its
/// guest view.
#[derive(Clone)]
struct Opened {
    chain: Vec<String>,
    view: Rc<Vec<u8>>,
}

/// Opens image `img` of `states` (and its backing chain) through the
/// library and reads its whole guest view. `Ok(None)`: a blank image that
/// holds no qcow2 header yet.
fn open_fresh(
    names: &[String],
    states: &[Vec<u8>],
    blank: &[bool],
    img: usize,
) -> Result<Option<Opened>, String> {
    if !has_magic(&states[img]) {
        if blank[img] {
            return Ok(None);
        }
        return Err(format!(
            "{}: no qcow2 magic ({} bytes)",
            names[img],
            states[img].len()
        ));
    }
    let mut resolver = RoResolver { names, states };
    let mut graph = Box::new(ViewGraph::new());
    let options = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::probing()
    };
    let top = graph
        .open_image(&mut resolver, &names[img], options)
        .map_err(|e| {
            format!(
                "{}: the library cannot open it: {e} ({:?})",
                names[img],
                e.kind()
            )
        })?;
    let mut chain = Vec::new();
    let mut node = Some(top);
    while let Some(n) = node {
        chain.push(graph.name(n).expect("live node").to_owned());
        node = graph.backing(n).expect("live node");
    }
    let size = graph.size(top).expect("live node");
    let mut view = vec![0u8; size as usize];
    let read = graph.read(top, 0, &mut view);
    graph.unref(top).expect("release the chain");
    read.map_err(|e| {
        format!(
            "{}: the library cannot read it: {e} ({:?})",
            names[img],
            e.kind()
        )
    })?;
    Ok(Some(Opened {
        chain,
        view: Rc::new(view),
    }))
}

// ===========================================================================
// Scenarios.
// ===========================================================================

/// An image made with qemu-img and qemu-io (or a blank device).
struct ImageSpec {
    name: &'static str,
    /// Virtual size; 0 for a blank device.
    size: u64,
    cluster: u64,
    refcount_bits: u32,
    backing: Option<&'static str>,
    cmds: Vec<String>,
    internal_snapshot: Option<&'static str>,
}

impl ImageSpec {
    fn new(name: &'static str, size: u64, cluster: u64) -> Self {
        Self {
            name,
            size,
            cluster,
            refcount_bits: 16,
            backing: None,
            cmds: Vec::new(),
            internal_snapshot: None,
        }
    }

    fn blank(name: &'static str) -> Self {
        Self::new(name, 0, 0)
    }

    fn on(mut self, backing: &'static str) -> Self {
        self.backing = Some(backing);
        self
    }

    fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }

    fn io(mut self, cmds: &[&str]) -> Self {
        self.cmds.extend(cmds.iter().map(|c| (*c).to_owned()));
        self
    }

    fn snapshot(mut self, name: &'static str) -> Self {
        self.internal_snapshot = Some(name);
        self
    }
}

/// A guest write issued between two job steps.
#[derive(Clone, Copy, Debug)]
struct GuestWrite {
    /// Issued once this many steps have run.
    after_step: u64,
    off: u64,
    len: u64,
    seed: u64,
}

/// One API call of an operation.
#[derive(Clone, Debug)]
enum Step {
    /// Guest write through the backend, then a backend flush.
    Write { off: u64, len: u64, seed: u64 },
    /// The same as one scatter-gather request of `segments` buffers (cut
    /// at seeded points, some empty).
    WriteV {
        off: u64,
        len: u64,
        seed: u64,
        segments: usize,
    },
    /// Guest writes `(off, len, seed)`, not overlapping, all in flight at
    /// once through the request engine (their device writes completing
    /// out of order; allocating ones too, several of them in flight
    /// together), then a flush.
    Requests(Vec<(u64, u64, u64)>),
    /// `write -z` on the backend's root, then a flush.
    Zero { off: u64, len: u64 },
    /// Discard on the backend's root, then a flush.
    Discard { off: u64, len: u64 },
    /// `drop_intermediate` on the backend's chain.
    Collapse {
        top: &'static str,
        base: Option<&'static str>,
    },
    /// Commit job (active when `top` is the backend's root), with guest
    /// writes between steps; an active commit is completed (pivot).
    Commit {
        top: &'static str,
        base: &'static str,
        writes: Vec<GuestWrite>,
    },
    /// Stream job into the backend's root.
    Stream { base: Option<&'static str> },
    /// Live snapshot onto the blank image `image`.
    Snapshot { image: &'static str },
}

fn write(off: u64, len: u64, seed: u64) -> Step {
    Step::Write { off, len, seed }
}

struct Scenario {
    name: &'static str,
    images: Vec<ImageSpec>,
    /// The image the guest's backend is attached to.
    root: &'static str,
    steps: Vec<Step>,
    /// Images whose device operations fail in the fault phase.
    faults: Vec<&'static str>,
    /// `(overlay, new backing)`: the final guest view is the overlay's view
    /// after `qemu-img rebase -u` onto the new backing (collapse).
    rebase: Option<(&'static str, &'static str)>,
    /// `(image, other)`: the image's final view is `other`'s initial view.
    final_equals: Vec<(&'static str, &'static str)>,
    /// Check the reordered states of the replay with qemu-img every this
    /// many new ones (1: all of them; every power cut is always checked).
    qemu_sample: usize,
    /// Extra assertions on the final images (what the scenario must cover).
    covers: Option<Covers>,
}

impl Scenario {
    fn new(name: &'static str, images: Vec<ImageSpec>, root: &'static str) -> Self {
        Self {
            name,
            images,
            root,
            steps: Vec::new(),
            faults: Vec::new(),
            rebase: None,
            final_equals: Vec::new(),
            qemu_sample: 1,
            covers: None,
        }
    }

    fn steps(mut self, steps: Vec<Step>) -> Self {
        self.steps = steps;
        self
    }

    fn faults(mut self, images: &[&'static str]) -> Self {
        self.faults = images.to_vec();
        self
    }

    fn qemu_sample(mut self, every: usize) -> Self {
        self.qemu_sample = every;
        self
    }
}

/// Assertions on the fixture and the final image bytes.
type Covers = fn(&Fixture, &[Vec<u8>]);

/// The scenario's images on disk and in memory.
struct Fixture {
    dir: tempfile::TempDir,
    names: Vec<String>,
    initial: Rc<Vec<Vec<u8>>>,
    blank: Vec<bool>,
    root: usize,
    /// Comparison unit: the smallest cluster size of the scenario.
    unit: u64,
    max_size: u64,
    /// Guest view expected after the steps (qemu's rebase), if computed.
    expected_final: Option<Vec<u8>>,
    /// `(image, snapshot name, its view)` for internal snapshots.
    snapshots: Vec<(usize, String, Vec<u8>)>,
}

impl Fixture {
    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no image {name}"))
    }
}

fn build(sc: &Scenario) -> Fixture {
    let dir = common::shm_tmpdir("crash.");
    let d = dir.path();
    let mut snapshots = Vec::new();
    for (img, spec) in sc.images.iter().enumerate() {
        if spec.size == 0 {
            continue;
        }
        let opts = format!(
            "cluster_size={},refcount_bits={}",
            spec.cluster, spec.refcount_bits
        );
        let size = spec.size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        if let Some(backing) = spec.backing {
            args.extend(["-b", backing, "-F", "qcow2"]);
        }
        args.extend([spec.name, &size]);
        qemu_img(d, &args);
        if !spec.cmds.is_empty() {
            qemu_io(d, "qcow2", spec.name, &spec.cmds);
        }
        if let Some(snap) = spec.internal_snapshot {
            qemu_img(d, &["snapshot", "-c", snap, spec.name]);
            let view = qemu_view(d, spec.name, Some(snap));
            snapshots.push((img, snap.to_owned(), view));
        }
    }
    let names: Vec<String> = sc.images.iter().map(|s| s.name.to_owned()).collect();
    let blank: Vec<bool> = sc.images.iter().map(|s| s.size == 0).collect();
    let initial: Vec<Vec<u8>> = sc
        .images
        .iter()
        .map(|s| {
            if s.size == 0 {
                Vec::new()
            } else {
                std::fs::read(d.join(s.name)).expect("read image")
            }
        })
        .collect();
    let expected_final = sc.rebase.map(|(overlay, backing)| {
        let copy = d.join("rebased");
        std::fs::create_dir(&copy).expect("mkdir");
        for name in &names {
            if d.join(name).exists() {
                std::fs::copy(d.join(name), copy.join(name)).expect("copy image");
            }
        }
        qemu_img(
            &copy,
            &[
                "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", overlay,
            ],
        );
        qemu_view(&copy, overlay, None)
    });
    let unit = sc
        .images
        .iter()
        .filter(|s| s.size > 0)
        .map(|s| s.cluster)
        .min()
        .expect("a scenario has images");
    let max_size = sc.images.iter().map(|s| s.size).max().unwrap_or(0);
    let root = names.iter().position(|n| n == sc.root).expect("root image");
    Fixture {
        dir,
        names,
        initial: Rc::new(initial),
        blank,
        root,
        unit,
        max_size,
        expected_final,
        snapshots,
    }
}

// ===========================================================================
// Running an operation on a live graph.
// ===========================================================================

/// An API call has returned: the log position and what the guest sees.
struct Mark {
    pos: usize,
    /// The backend's root image.
    root: usize,
    /// The backend's chain (names, top first).
    chain: Vec<String>,
    /// The acknowledged guest view.
    shadow: Rc<Vec<u8>>,
}

fn writable() -> OpenOptions {
    OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::probing()
    }
}

/// The live side of one run: the graph, the guest's backend and a shadow
/// of everything the guest was told is written.
struct Live<'g, 'a> {
    graph: &'g mut LiveGraph<'a>,
    resolver: &'g mut LiveResolver<'a>,
    names: &'g [String],
    backend: BackendId,
    shadow: Vec<u8>,
    shadow_rc: Rc<Vec<u8>>,
    /// The guest request in flight: offset and the bytes it should leave.
    pending: Option<(u64, Vec<u8>)>,
    marks: Vec<Mark>,
    /// Keep marks (the recording run); fault runs do not need them.
    recording: bool,
    log: Log,
    scratch: Vec<u8>,
}

impl<'g, 'a> Live<'g, 'a> {
    /// Opens the scenario's chain and attaches the guest's backend; the
    /// guest's initial view is read unless `known`.
    fn open(
        graph: &'g mut LiveGraph<'a>,
        resolver: &'g mut LiveResolver<'a>,
        fx: &'g Fixture,
        known: Option<&[u8]>,
    ) -> Self {
        let log = Rc::clone(&resolver.log);
        let node = graph
            .open_image(resolver, &fx.names[fx.root], writable())
            .expect("open the scenario's chain");
        let backend = graph
            .attach_backend(node, Access::READ_WRITE_DEVICE)
            .expect("attach the guest's backend");
        graph.unref(node).expect("the backend holds the root");
        let mut live = Self {
            graph,
            resolver,
            names: &fx.names,
            backend,
            shadow: Vec::new(),
            shadow_rc: Rc::default(),
            pending: None,
            marks: Vec::new(),
            recording: true,
            log,
            scratch: vec![0u8; SCRATCH],
        };
        live.shadow = match known {
            Some(view) => view.to_vec(),
            None => live.live_view().expect("read the initial view"),
        };
        live.mark();
        live
    }

    fn root(&self) -> blockgraph::Result<NodeId> {
        self.graph.root(self.backend)
    }

    fn chain(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut node = self.root().ok();
        while let Some(n) = node {
            names.push(self.graph.name(n).expect("live node").to_owned());
            node = self.graph.backing(n).expect("live node");
        }
        names
    }

    /// The node of image `name` in the backend's chain.
    fn node(&self, name: &str) -> blockgraph::Result<NodeId> {
        let mut node = Some(self.root()?);
        while let Some(n) = node {
            if self.graph.name(n)? == name {
                return Ok(n);
            }
            node = self.graph.backing(n)?;
        }
        Err(Error::new(ErrorKind::NotFound, "image not in the chain"))
    }

    fn live_view(&mut self) -> blockgraph::Result<Vec<u8>> {
        let root = self.root()?;
        let mut view = vec![0u8; self.graph.size(root)? as usize];
        self.graph.backend_read(self.backend, 0, &mut view)?;
        Ok(view)
    }

    fn mark(&mut self) {
        if !self.recording {
            return;
        }
        if *self.shadow_rc != self.shadow {
            self.shadow_rc = Rc::new(self.shadow.clone());
        }
        let root = self.root().expect("backend root");
        let name = self.graph.name(root).expect("live root");
        let root = self
            .names
            .iter()
            .position(|n| n == name)
            .expect("root is a scenario image");
        let chain = self.chain();
        self.marks.push(Mark {
            pos: self.log.borrow().len(),
            root,
            chain,
            shadow: Rc::clone(&self.shadow_rc),
        });
    }

    /// Records the guest request in flight; it becomes acknowledged with
    /// [`Live::acknowledge`].
    fn begin(&mut self, off: u64, new: Vec<u8>) {
        self.pending = Some((off, new));
    }

    fn acknowledge(&mut self) {
        if let Some((off, new)) = self.pending.take() {
            let off = off as usize;
            self.shadow[off..off + new.len()].copy_from_slice(&new);
        }
        self.mark();
    }

    /// [`Step::Requests`]: the writes and a flush through a request
    /// engine, drained before returning (also on failure: nothing stays in
    /// flight); the first failure is returned.
    fn requests_in_flight(&mut self, writes: &[(u64, u64, u64)]) -> blockgraph::Result<()> {
        let data: Vec<Vec<u8>> = writes
            .iter()
            .map(|&(_, len, seed)| pattern(seed, len))
            .collect();
        let mut new = self.shadow.clone();
        for (&(off, ..), bytes) in writes.iter().zip(&data) {
            new[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        }
        self.begin(0, new);
        // Lent metadata buffers: the flush writes the table updates back
        // split-phase (R3's order as device operations).
        let mut metadata = vec![0u8; 2 * 4096];
        // And copy buffers: the copy-on-write of allocating writes goes to
        // the device as operations of its own.
        let mut copies = vec![0u8; 4 * 65536];
        let mut engine: Engine<'_> = Engine::new();
        for buf in metadata.chunks_mut(4096) {
            engine.lend_metadata_buffer(buf).unwrap();
        }
        for buf in copies.chunks_mut(65536) {
            engine.lend_copy_buffer(buf).unwrap();
        }
        for (&(off, ..), bytes) in writes.iter().zip(&data) {
            engine.submit_write(self.backend, off, [&bytes[..]])?;
        }
        let flush = engine.submit_flush(self.backend)?;
        let (mut most, mut most_allocations) = (0, 0);
        let flushed = loop {
            engine.poll(self.graph);
            most = most.max(engine.operations());
            most_allocations = most_allocations.max(engine.allocations_in_flight());
            if let Some(done) = engine.take(flush)? {
                break done.result;
            }
        };
        // The guest learns its writes are durable when the flush completes.
        let mut result = flushed;
        engine.drain(self.graph);
        while let Some((_, done)) = engine.complete() {
            result = result.and(done.result);
        }
        result?;
        assert!(
            most > 1,
            "the requests never had device writes in flight together"
        );
        // (A retry after a fault may find the clusters mapped already.)
        assert!(
            !self.recording || most_allocations > 1,
            "allocating writes never had their data in flight together"
        );
        self.acknowledge();
        Ok(())
    }

    fn guest_write(&mut self, off: u64, len: u64, seed: u64) -> blockgraph::Result<()> {
        let data = pattern(seed, len);
        self.begin(off, data.clone());
        self.graph.backend_write(self.backend, off, &data)?;
        self.graph.backend_flush(self.backend)?;
        self.acknowledge();
        Ok(())
    }

    fn do_step(&mut self, step: &Step) -> blockgraph::Result<()> {
        self.pending = None;
        match step {
            Step::Write { off, len, seed } => self.guest_write(*off, *len, *seed),
            Step::WriteV {
                off,
                len,
                seed,
                segments,
            } => {
                let data = pattern(*seed, *len);
                let mut rng = Rng::new(*seed);
                let mut cuts: Vec<usize> = (1..*segments)
                    .map(|_| (rng.next() % (*len + 1)) as usize)
                    .collect();
                cuts.sort_unstable();
                let mut list: Vec<&[u8]> = Vec::new();
                let mut at = 0;
                for cut in cuts {
                    list.push(&data[at..cut]);
                    at = cut;
                }
                list.push(&data[at..]);
                self.begin(*off, data.clone());
                self.graph.backend_writev(self.backend, *off, &list)?;
                self.graph.backend_flush(self.backend)?;
                self.acknowledge();
                Ok(())
            }
            Step::Requests(writes) => self.requests_in_flight(writes),
            Step::Zero { off, len } => {
                self.begin(*off, vec![0u8; *len as usize]);
                let root = self.root()?;
                self.graph.write_zeroes(root, *off, *len)?;
                self.graph.flush(root)?;
                self.acknowledge();
                Ok(())
            }
            Step::Discard { off, len } => {
                // Whole clusters read zeros afterwards (v3: the zero flag
                // over a backing file, unallocated without one); partial
                // clusters are left alone.
                let root = self.root()?;
                let cs = self.graph.qcow2(root)?.cluster_size();
                let size = self.graph.size(root)?;
                let mut new = self.shadow[*off as usize..(*off + *len) as usize].to_vec();
                let mut cluster = off.div_ceil(cs) * cs;
                while cluster < off + len {
                    let end = (cluster + cs).min(size);
                    if end <= off + len {
                        new[(cluster - off) as usize..(end - off) as usize].fill(0);
                    }
                    cluster += cs;
                }
                self.begin(*off, new);
                self.graph.discard(root, *off, *len)?;
                self.graph.flush(root)?;
                self.acknowledge();
                Ok(())
            }
            Step::Collapse { top, base } => {
                let root = self.root()?;
                let top = self.node(top)?;
                let base = match base {
                    Some(base) => Some(self.node(base)?),
                    None => None,
                };
                self.graph
                    .drop_intermediate(&mut *self.resolver, root, top, base)?;
                // The dropped layers' data is gone from the guest's view: what
                // it reads now is the new acknowledged state.
                self.shadow = self.live_view()?;
                self.mark();
                Ok(())
            }
            Step::Commit { top, base, writes } => {
                let request = CommitRequest {
                    active: self.root()?,
                    top: self.node(top)?,
                    base: self.node(base)?,
                    on_error: OnError::Report,
                };
                let job = self.graph.start_commit(request)?;
                self.mark();
                let result = self.drive(job, writes);
                if result.is_err() {
                    self.abandon(job);
                }
                result
            }
            Step::Stream { base } => {
                let base = match base {
                    Some(base) => Some(self.node(base)?),
                    None => None,
                };
                let request = StreamRequest {
                    active: self.root()?,
                    base,
                    on_error: OnError::Report,
                };
                let job = self.graph.start_stream(request)?;
                self.mark();
                let result = self.drive(job, &[]);
                if result.is_err() {
                    self.abandon(job);
                }
                result
            }
            Step::Snapshot { image } => {
                let device = self.resolver.take(image, true)?;
                let root = self.root()?;
                let overlay = self
                    .graph
                    .snapshot(&mut *self.resolver, root, device, image)?;
                self.graph.unref(overlay)?;
                self.mark();
                Ok(())
            }
        }
    }

    /// Steps `job` to its end with `writes` in between; an active commit is
    /// completed once ready and every write is done.
    fn drive(&mut self, job: JobId, writes: &[GuestWrite]) -> blockgraph::Result<()> {
        let mut done = 0;
        let mut completed = false;
        for steps in 1..=STEP_LIMIT {
            let status = self
                .graph
                .job_step(job, &mut *self.resolver, &mut self.scratch)?;
            self.mark();
            match status {
                JobStatus::Concluded => {
                    let info = self.graph.job_info(job)?;
                    self.graph.job_dismiss(job)?;
                    return info.error.map_or(Ok(()), Err);
                }
                JobStatus::Paused => {
                    return Err(Error::new(ErrorKind::Io, "job paused on an error"));
                }
                _ => {}
            }
            while done < writes.len() && writes[done].after_step <= steps {
                let w = writes[done];
                self.guest_write(w.off, w.len, w.seed)?;
                done += 1;
            }
            if status == JobStatus::Ready && done == writes.len() && !completed {
                self.graph.job_complete(job)?;
                completed = true;
            }
        }
        panic!("job did not conclude in {STEP_LIMIT} steps");
    }

    /// Ends a job after a failure: cancel, step it out, dismiss.
    fn abandon(&mut self, job: JobId) {
        let Ok(info) = self.graph.job_info(job) else {
            return;
        };
        if info.status != JobStatus::Concluded {
            let _ = self.graph.job_cancel(job);
            for _ in 0..STEP_LIMIT {
                match self
                    .graph
                    .job_step(job, &mut *self.resolver, &mut self.scratch)
                {
                    Ok(JobStatus::Concluded) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let _ = self.graph.job_dismiss(job);
    }
}

/// What a fault-free run of the operation did.
struct Recording {
    events: Vec<Ev>,
    marks: Vec<Mark>,
    /// The backend's chain after each step.
    step_chains: Vec<Vec<String>>,
    /// The guest's view after each step.
    step_shadows: Vec<Vec<u8>>,
    final_shadow: Vec<u8>,
}

fn record(sc: &Scenario, fx: &Fixture) -> Recording {
    let mut storage = Storage::new(fx);
    let log = Rc::clone(&storage.log);
    let (marks, step_chains, step_shadows, final_shadow) = {
        let mut resolver = LiveResolver::new(&mut storage, fx);
        let mut graph: Box<LiveGraph<'_>> = Box::default();
        let mut live = Live::open(&mut graph, &mut resolver, fx, None);
        let mut step_chains = Vec::new();
        let mut step_shadows = Vec::new();
        for (i, step) in sc.steps.iter().enumerate() {
            live.do_step(step)
                .unwrap_or_else(|e| panic!("{}: step {i} {step:?} failed: {e}", sc.name));
            step_chains.push(live.chain());
            step_shadows.push(live.shadow.clone());
        }
        let view = live.live_view().expect("read the final view");
        assert!(
            view == live.shadow,
            "{}: the guest's view differs from what it wrote",
            sc.name
        );
        (
            std::mem::take(&mut live.marks),
            step_chains,
            step_shadows,
            live.shadow,
        )
    };
    let events = std::mem::take(&mut *log.borrow_mut());
    Recording {
        events,
        marks,
        step_chains,
        step_shadows,
        final_shadow,
    }
}

// ===========================================================================
// Judging rebuilt images.
// ===========================================================================

/// A mark with the images as the library reads them at that point.
struct MarkView {
    pos: usize,
    images: Vec<Option<Opened>>,
}

/// Which writes of one image a rebuilt state holds: its first `count`
/// writes, then (after the first one left out) the log indices in `extra`.
type Desc = (usize, usize, Vec<usize>);

/// A judged image: image, window of marks, the mark whose acknowledged
/// view it must hold (as the guest's image), fingerprints of what it reads.
type JudgeKey = (usize, usize, usize, Option<usize>, Vec<Fp>);

/// qemu-img check on image states, each distinct one once.
struct QemuChecker {
    dir: PathBuf,
    seen: HashMap<(usize, Fp), Result<(), String>>,
    runs: usize,
}

impl QemuChecker {
    fn check(&mut self, fx: &Fixture, img: usize, bytes: &[u8], fp: Fp) -> Result<(), String> {
        if let Some(result) = self.seen.get(&(img, fp)) {
            return result.clone();
        }
        self.runs += 1;
        let name = format!("check.{}", fx.names[img]);
        std::fs::write(self.dir.join(&name), bytes).expect("write image for qemu-img");
        // The backing file is not needed (and not opened): "backing": null.
        let spec = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{name}"}},"backing":null}}"#
        );
        let args = ["check", spec.as_str()];
        let out = run(&self.dir, "qemu-img", &args);
        let mut result = match out.status.code() {
            Some(0 | 3) => Ok(()),
            _ => Err(format!(
                "qemu-img check {}: {}",
                fx.names[img],
                render(&self.dir, "qemu-img", &args, &out)
            )),
        };
        for (_, snap, expected) in fx.snapshots.iter().filter(|s| s.0 == img) {
            if result.is_ok() && qemu_view(&self.dir, &name, Some(snap)) != *expected {
                result = Err(format!(
                    "{}: internal snapshot {snap} no longer reads as it was taken",
                    fx.names[img]
                ));
            }
        }
        self.seen.insert((img, fp), result.clone());
        result
    }
}

/// Per-scenario verdicts and counters.
struct Judge<'f> {
    sc: &'f Scenario,
    fx: &'f Fixture,
    rec: &'f Recording,
    marks: Vec<MarkView>,
    /// Images each image's view may depend on (its chains at all marks).
    relevant: Vec<Vec<usize>>,
    qemu: QemuChecker,
    fps: HashMap<Desc, Fp>,
    passed: HashSet<JudgeKey>,
    /// New reordered states seen by the replay (for qemu-img sampling).
    new_states: usize,
    units: Units,
    failures: Vec<String>,
}

impl<'f> Judge<'f> {
    fn new(sc: &'f Scenario, fx: &'f Fixture, rec: &'f Recording) -> Self {
        let n = fx.names.len();
        let mut marks = Vec::new();
        let mut failures = Vec::new();
        let mut state: Vec<Vec<u8>> = fx.initial.to_vec();
        let mut applied = 0;
        let mut previous: Vec<Option<Opened>> = vec![None; n];
        for (m, mark) in rec.marks.iter().enumerate() {
            for ev in &rec.events[applied..mark.pos] {
                if let Ev::Write { img, offset, data } = ev {
                    apply(&mut state[*img], *offset, data);
                }
            }
            applied = mark.pos;
            let mut images = Vec::new();
            for (img, previous) in previous.iter_mut().enumerate() {
                let opened = match open_fresh(&fx.names, &state, &fx.blank, img) {
                    Ok(opened) => opened,
                    Err(err) => {
                        failures.push(format!("mark {m} (after an API call returned): {err}"));
                        None
                    }
                };
                // Share equal views between marks.
                let opened = opened.map(|mut o| {
                    if let Some(p) = previous.as_ref() {
                        if *p.view == *o.view {
                            o.view = Rc::clone(&p.view);
                        }
                    }
                    o
                });
                previous.clone_from(&opened);
                images.push(opened);
            }
            match &images[mark.root] {
                Some(root) if root.chain == mark.chain && *root.view == *mark.shadow => {}
                Some(root) => failures.push(format!(
                    "mark {m}: on disk, {} has chain {:?} and {} the acknowledged guest view; \
                     in memory the chain is {:?}",
                    fx.names[mark.root],
                    root.chain,
                    if *root.view == *mark.shadow {
                        "holds"
                    } else {
                        "does NOT hold"
                    },
                    mark.chain
                )),
                None => failures.push(format!(
                    "mark {m}: the guest's image {} is not on disk",
                    fx.names[mark.root]
                )),
            }
            marks.push(MarkView {
                pos: mark.pos,
                images,
            });
        }
        let relevant = (0..n)
            .map(|img| {
                let mut set = vec![img];
                for mark in &marks {
                    for name in mark.images[img].iter().flat_map(|o| &o.chain) {
                        let i = fx.index(name);
                        if !set.contains(&i) {
                            set.push(i);
                        }
                    }
                }
                set
            })
            .collect();
        let check_dir = fx.dir.path().join("check");
        std::fs::create_dir_all(&check_dir).expect("mkdir");
        Self {
            sc,
            fx,
            rec,
            marks,
            relevant,
            qemu: QemuChecker {
                dir: check_dir,
                seen: HashMap::new(),
                runs: 0,
            },
            fps: HashMap::new(),
            passed: HashSet::new(),
            new_states: 0,
            units: Units { size: fx.unit },
            failures,
        }
    }

    /// The marks a state may show for image `img`: from the last mark all of
    /// whose writes (of the images the view depends on) are on the disk, to
    /// the first mark at or after the cut.
    fn window(&self, img: usize, k: usize, first_missing: &[usize]) -> (usize, usize) {
        let stable = self.relevant[img]
            .iter()
            .map(|&r| first_missing[r])
            .min()
            .unwrap_or(k);
        let lo = self
            .marks
            .iter()
            .rposition(|m| m.pos <= stable)
            .unwrap_or(0);
        let hi = self
            .marks
            .iter()
            .position(|m| m.pos >= k)
            .unwrap_or(self.marks.len() - 1);
        (lo.min(hi), lo.max(hi))
    }

    fn fp(&mut self, desc: &Desc, bytes: &[u8]) -> Fp {
        if let Some(fp) = self.fps.get(desc) {
            return *fp;
        }
        let fp = fingerprint(bytes);
        self.fps.insert(desc.clone(), fp);
        fp
    }

    /// Judges one rebuilt state; `what` names it in failures. Returns
    /// whether every image passed.
    fn judge(
        &mut self,
        states: &[Vec<u8>],
        descs: &[Desc],
        (k, first_missing): (usize, &[usize]),
        reordered: bool,
        what: &dyn Fn() -> String,
    ) -> bool {
        let n = states.len();
        let fps: Vec<Fp> = (0..n).map(|i| self.fp(&descs[i], &states[i])).collect();
        let mut ok = true;
        let mut qemu_due = false;
        // The last API call that returned before the cut: whatever it
        // acknowledged was flushed, so no reordering may lose it from the
        // guest's image.
        let acked = self.marks.iter().rposition(|m| m.pos <= k).unwrap_or(0);
        for img in 0..n {
            let (lo, hi) = self.window(img, k, first_missing);
            let ack = (self.rec.marks[acked].root == img).then_some(acked);
            let key: JudgeKey = (
                img,
                lo,
                hi,
                ack,
                self.relevant[img].iter().map(|&r| fps[r]).collect(),
            );
            if self.passed.contains(&key) {
                continue;
            }
            qemu_due = true;
            match self.judge_image(states, img, (lo, hi), ack) {
                Ok(()) => {
                    self.passed.insert(key);
                }
                Err(err) => {
                    ok = false;
                    self.fail(format!("{}: {err}", what()), k);
                }
            }
        }
        // Every new power-cut state, and every `qemu_sample`-th new
        // reordered one, goes through qemu-img check.
        let sampled = !reordered || {
            self.new_states += usize::from(qemu_due);
            self.new_states % self.sc.qemu_sample == 1 % self.sc.qemu_sample
        };
        if qemu_due && sampled {
            for img in 0..n {
                if !has_magic(&states[img]) {
                    continue;
                }
                if let Err(err) = self.qemu.check(self.fx, img, &states[img], fps[img]) {
                    ok = false;
                    self.fail(format!("{}: {err}", what()), k);
                }
            }
        }
        ok
    }

    /// Judges image `img` of a rebuilt state against the marks `lo..=hi`;
    /// with `ack`, it is the guest's image at mark `ack` and must also hold
    /// the guest view acknowledged there (or a later one up to `hi`).
    fn judge_image(
        &self,
        states: &[Vec<u8>],
        img: usize,
        (lo, hi): (usize, usize),
        ack: Option<usize>,
    ) -> Result<(), String> {
        let fx = self.fx;
        let window = &self.marks[lo..=hi];
        let opened = open_fresh(&fx.names, states, &fx.blank, img)?;
        let Some(opened) = opened else {
            if ack.is_none() && window.iter().any(|m| m.images[img].is_none()) {
                return Ok(());
            }
            return Err(format!("{} lost its qcow2 header", fx.names[img]));
        };
        if let Some(ack) = ack {
            let last = hi.max(ack);
            let mut shadows: Vec<Rc<Vec<u8>>> = Vec::new();
            for mark in &self.rec.marks[ack..=last] {
                if !shadows.iter().any(|s| Rc::ptr_eq(s, &mark.shadow)) {
                    shadows.push(Rc::clone(&mark.shadow));
                }
            }
            if let Err(unit) = compare_units(&opened.view, &shadows, self.units) {
                return Err(format!(
                    "{}: acknowledged data lost: guest bytes {:#x}..{:#x} of the guest's image \
                     do not read as acknowledged at mark {ack}",
                    fx.names[img],
                    unit as u64 * fx.unit,
                    (unit as u64 + 1) * fx.unit
                ));
            }
        }
        let known: Vec<&Opened> = window
            .iter()
            .filter_map(|m| m.images[img].as_ref())
            .collect();
        if !known.iter().any(|o| o.chain == opened.chain) {
            let chains: Vec<&Vec<String>> = known.iter().map(|o| &o.chain).collect();
            return Err(format!(
                "{}: chain {:?} is neither the old nor the new one ({chains:?}, marks {lo}..={hi})",
                fx.names[img], opened.chain
            ));
        }
        let mut candidates: Vec<Rc<Vec<u8>>> = Vec::new();
        for o in &known {
            if !candidates.iter().any(|c| Rc::ptr_eq(c, &o.view)) {
                candidates.push(Rc::clone(&o.view));
            }
        }
        compare_units(&opened.view, &candidates, self.units).map_err(|unit| {
            format!(
                "{}: guest bytes {:#x}..{:#x} read as neither the old nor the new content \
                 (marks {lo}..={hi}: {} candidate views)",
                fx.names[img],
                unit as u64 * fx.unit,
                (unit as u64 + 1) * fx.unit,
                candidates.len()
            )
        })
    }

    fn fail(&mut self, message: String, k: usize) {
        if self.failures.len() < SHOWN_FAILURES {
            let context = describe_events(&self.rec.events, k, &self.fx.names);
            self.failures.push(format!("{message}\n{context}"));
        } else {
            self.failures.push(message);
        }
    }

    /// Power cuts at every point, and reordered unflushed writes.
    fn replay(&mut self) -> (usize, usize, usize, usize) {
        let events = &self.rec.events;
        let n = self.fx.names.len();
        let mut rng = Rng::new(0xc0ffee ^ events.len() as u64);
        let mut cur: Vec<Vec<u8>> = self.fx.initial.to_vec();
        let mut counts = vec![0usize; n];
        let mut unflushed: Vec<Vec<usize>> = vec![Vec::new(); n];
        let (mut cuts, mut cuts_ok, mut reordered, mut reordered_ok) = (0, 0, 0, 0);
        let mut seen_variants: HashSet<Vec<Desc>> = HashSet::new();
        // One set of buffers for every reordered state (allocating fresh
        // megabytes each time costs more than the checks).
        let mut state: Vec<Vec<u8>> = self.fx.initial.to_vec();
        for k in 0..=events.len() {
            if k > 0 {
                match &events[k - 1] {
                    Ev::Write { img, offset, data } => {
                        apply(&mut cur[*img], *offset, data);
                        counts[*img] += 1;
                        unflushed[*img].push(k - 1);
                    }
                    Ev::Flush { img } => unflushed[*img].clear(),
                }
            }
            let descs: Vec<Desc> = (0..n).map(|i| (i, counts[i], Vec::new())).collect();
            let first_missing = vec![k; n];
            cuts += 1;
            let what = || format!("power cut after event #{k} of {}", events.len());
            if self.judge(&cur, &descs, (k, &first_missing), false, &what) {
                cuts_ok += 1;
            }
            // A disk may reorder the writes issued since each image's last
            // flush: some of them may be lost while later ones are not.
            let mut pending: Vec<usize> = unflushed.iter().flatten().copied().collect();
            pending.sort_unstable();
            if pending.len() < 2 {
                continue;
            }
            for keep in subsets(&pending, &mut rng) {
                let dropped: Vec<usize> = pending
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &kept)| !kept)
                    .map(|(&ev, _)| ev)
                    .collect();
                let mut descs = Vec::new();
                let mut first_missing = vec![k; n];
                for (img, pending) in unflushed.iter().enumerate() {
                    let mut count = counts[img] - pending.len();
                    let mut extra = Vec::new();
                    for &ev in pending {
                        if dropped.contains(&ev) {
                            first_missing[img] = first_missing[img].min(ev);
                        } else if first_missing[img] == k {
                            count += 1;
                        } else {
                            extra.push(ev);
                        }
                    }
                    descs.push((img, count, extra));
                }
                if !seen_variants.insert(descs.clone()) {
                    continue;
                }
                for (buf, initial) in state.iter_mut().zip(self.fx.initial.iter()) {
                    buf.clone_from(initial);
                }
                for (i, ev) in events[..k].iter().enumerate() {
                    if let Ev::Write { img, offset, data } = ev {
                        if !dropped.contains(&i) {
                            apply(&mut state[*img], *offset, data);
                        }
                    }
                }
                reordered += 1;
                let what = || {
                    let lost: Vec<String> = dropped.iter().map(|e| format!("#{}", e + 1)).collect();
                    format!(
                        "power cut after event #{k} of {}, unflushed writes {} lost",
                        events.len(),
                        lost.join(" ")
                    )
                };
                if self.judge(&state, &descs, (k, &first_missing), true, &what) {
                    reordered_ok += 1;
                }
            }
        }
        (cuts, cuts_ok, reordered, reordered_ok)
    }
}

/// Which of the `pending` (unflushed) writes reach the disk, as keep
/// masks, never all of them: every subset of up to 3 writes; otherwise the
/// newest write alone (it overtook every write it may depend on) and
/// [`REORDERINGS`] random subsets.
fn subsets(pending: &[usize], rng: &mut Rng) -> Vec<Vec<bool>> {
    let u = pending.len();
    if u <= 3 {
        return (0..(1u32 << u) - 1)
            .map(|bits| (0..u).map(|i| bits & (1 << i) != 0).collect())
            .collect();
    }
    let mut masks = vec![(0..u).map(|i| i == u - 1).collect::<Vec<bool>>()];
    for _ in 0..REORDERINGS {
        masks.push((0..u).map(|_| rng.next() & 1 == 0).collect());
    }
    masks.retain(|m| m.iter().any(|&kept| !kept));
    masks
}

/// The events just before cut `k`, for failure reports.
fn describe_events(events: &[Ev], k: usize, names: &[String]) -> String {
    let start = k.saturating_sub(24);
    let mut out = format!(
        "  events {}..={k} (the cut falls after event #{k}):\n",
        start + 1
    );
    for (i, ev) in events.iter().enumerate().take(k).skip(start) {
        let line = match ev {
            Ev::Write { img, offset, data } => format!(
                "    #{} write {} @{:#x} +{:#x}\n",
                i + 1,
                names[*img],
                offset,
                data.len()
            ),
            Ev::Flush { img } => format!("    #{} flush {}\n", i + 1, names[*img]),
        };
        out.push_str(&line);
    }
    out
}

// ===========================================================================
// The fault phase.
// ===========================================================================

#[derive(Default)]
struct FaultStats {
    runs: u64,
    hit: u64,
    failed_calls: u64,
    absorbed: u64,
    advanced: u64,
}

/// The graph's root after a failure: name, chain, and the guest view the
/// disk must show (`None`: not compared).
type LiveRoot<'v> = (&'v str, &'v [String], Option<&'v [u8]>);

impl<'f> Judge<'f> {
    /// Checks every image on disk after a fault (or at the end of a run).
    /// `exact` holds the views the images must have (the recording's final
    /// ones); otherwise each unit must read as at some mark.
    fn disk_after(
        &mut self,
        events: &[Ev],
        live_root: Option<LiveRoot<'_>>,
        exact: bool,
        what: &str,
    ) {
        let fx = self.fx;
        let n = fx.names.len();
        let states: Vec<Vec<u8>> = (0..n)
            .map(|img| replay_image(&fx.initial[img], events, img))
            .collect();
        let last = self.marks.len() - 1;
        for img in 0..n {
            let opened = match open_fresh(&fx.names, &states, &fx.blank, img) {
                Ok(opened) => opened,
                Err(err) => {
                    self.failures.push(format!("{what}: {err}"));
                    continue;
                }
            };
            if let Some((root, chain, view)) = live_root {
                if fx.names[img] == root {
                    match &opened {
                        Some(o) if o.chain == chain && view.is_none_or(|v| *o.view == v) => {}
                        Some(o) => self.failures.push(format!(
                            "{what}: {root} on disk (chain {:?}) disagrees with the graph \
                             (chain {chain:?}){}",
                            o.chain,
                            if view.is_none_or(|v| *o.view == v) {
                                ""
                            } else {
                                ", and its view differs"
                            }
                        )),
                        None => self.failures.push(format!("{what}: {root} is not on disk")),
                    }
                }
            }
            let expected: Vec<&Option<Opened>> = if exact {
                vec![&self.marks[last].images[img]]
            } else {
                self.marks.iter().map(|m| &m.images[img]).collect()
            };
            match &opened {
                None if expected.iter().any(|e| e.is_none()) => {}
                None => self
                    .failures
                    .push(format!("{what}: {} has no qcow2 header", fx.names[img])),
                Some(o) => {
                    let known: Vec<&Opened> = expected.iter().filter_map(|e| e.as_ref()).collect();
                    let views: Vec<Rc<Vec<u8>>> =
                        known.iter().map(|k| Rc::clone(&k.view)).collect();
                    if !known.iter().any(|k| k.chain == o.chain) {
                        self.failures.push(format!(
                            "{what}: {} has chain {:?}, which no fault-free run showed",
                            fx.names[img], o.chain
                        ));
                    } else if let Err(unit) = compare_units(&o.view, &views, self.units) {
                        self.failures.push(format!(
                            "{what}: {} reads wrong data at {:#x} ({})",
                            fx.names[img],
                            unit as u64 * fx.unit,
                            if exact {
                                "not the fault-free result"
                            } else {
                                "neither old nor new"
                            }
                        ));
                    }
                }
            }
            if has_magic(&states[img]) {
                let fp = fingerprint(&states[img]);
                if let Err(err) = self.qemu.check(fx, img, &states[img], fp) {
                    self.failures.push(format!("{what}: {err}"));
                }
            }
        }
    }

    /// One run with operation `n` of image `target` failing.
    fn fault_run(
        &mut self,
        storage: &mut Storage,
        (target, n): (usize, u64),
        stats: &mut FaultStats,
    ) -> bool {
        let (sc, fx, rec) = (self.sc, self.fx, self.rec);
        storage.reset(fx);
        let log = Rc::clone(&storage.log);
        let disk = Rc::clone(&storage.disks[target]);
        let label = format!(
            "{}: fault at operation {n} of {}",
            sc.name, fx.names[target]
        );
        let mut problems: Vec<String> = Vec::new();
        // What the graph showed after the failure: root, chain, guest view.
        let mut after_failure: Option<(String, Vec<String>, Vec<u8>)> = None;
        let mut failures = 0;
        let hit;
        {
            let mut resolver = LiveResolver::new(storage, fx);
            let mut graph: Box<LiveGraph<'_>> = Box::default();
            let known = Rc::clone(&rec.marks[0].shadow);
            let mut live = Live::open(&mut graph, &mut resolver, fx, Some(&known));
            live.recording = false;
            disk.arm.set(Some(Some(n)));
            for (si, step) in sc.steps.iter().enumerate() {
                let before_chain = live.chain();
                let err = match live.do_step(step) {
                    Ok(()) => continue,
                    Err(err) => err,
                };
                stats.failed_calls += 1;
                failures += 1;
                let at = format!("{label}: step {si} ({step:?}) failed with \"{err}\"");
                if !disk.hit.get() {
                    problems.push(format!("{at}, but the fault was not reached"));
                    break;
                }
                if err.kind() != ErrorKind::Io {
                    problems.push(format!(
                        "{at}: reported as {:?}, not as the device's I/O error",
                        err.kind()
                    ));
                }
                // The graph: unchanged, or (rarely) advanced to the step's
                // result, and in memory what it is on disk.
                let chain = live.chain();
                let advanced = chain != before_chain && chain == rec.step_chains[si];
                if chain != before_chain && !advanced {
                    problems.push(format!(
                        "{at}: the chain became {chain:?} (before: {before_chain:?})"
                    ));
                }
                // Nothing acknowledged is lost; the failed request's units
                // read old or new.
                match live.live_view() {
                    Ok(view) => {
                        let mut candidates = vec![Rc::new(live.shadow.clone())];
                        if let Some((off, data)) = &live.pending {
                            let mut new = live.shadow.clone();
                            let off = *off as usize;
                            new[off..off + data.len()].copy_from_slice(data);
                            candidates.push(Rc::new(new));
                        }
                        if advanced {
                            candidates = vec![Rc::new(rec.step_shadows[si].clone())];
                        }
                        if let Err(unit) = compare_units(&view, &candidates, self.units) {
                            problems.push(format!(
                                "{at}: the guest reads wrong data at {:#x} after the failure",
                                unit as u64 * fx.unit
                            ));
                        }
                        if advanced {
                            live.shadow = view.clone();
                        }
                        let root = live.root().expect("backend root");
                        let root = live.graph.name(root).expect("live root").to_owned();
                        after_failure = Some((root, chain, view));
                    }
                    Err(e) => problems.push(format!("{at}: the guest cannot read: {e}")),
                }
                // Disk state right after the failure: the graph's chain, and
                // every unit old or new.
                let live_root = after_failure
                    .as_ref()
                    .map(|(root, chain, _)| (root.as_str(), chain.as_slice(), None));
                self.disk_after(&log.borrow(), live_root, false, &at);
                // With the fault gone, one flush writes back what the
                // failure left cached: then disk and graph agree exactly.
                disk.arm.set(Some(None));
                let flushed = live.root().and_then(|root| live.graph.flush(root));
                if let Err(e) = flushed {
                    problems.push(format!("{at}: the flush after the failure failed: {e}"));
                    break;
                }
                let live_root = after_failure.as_ref().map(|(root, chain, view)| {
                    (root.as_str(), chain.as_slice(), Some(view.as_slice()))
                });
                let flushed_at = format!("{at}, then a flush");
                self.disk_after(&log.borrow(), live_root, false, &flushed_at);
                // Repeat the failed call.
                live.pending = None;
                if advanced {
                    stats.advanced += 1;
                    continue;
                }
                if let Err(e) = live.do_step(step) {
                    problems.push(format!("{at}: the retry failed too: {e}"));
                    break;
                }
            }
            hit = disk.hit.get();
            if hit && problems.is_empty() {
                if failures == 0 {
                    stats.absorbed += 1;
                }
                match live.live_view() {
                    Ok(view) if view == rec.final_shadow && view == live.shadow => {}
                    Ok(_) => problems.push(format!(
                        "{label}: after the retry the guest does not read what a fault-free run reads"
                    )),
                    Err(e) => problems.push(format!("{label}: the guest cannot read: {e}")),
                }
                let chain = live.chain();
                let final_chain = rec.step_chains.last().cloned().unwrap_or_default();
                if chain != final_chain {
                    problems.push(format!(
                        "{label}: final chain {chain:?}, a fault-free run ends with {final_chain:?}"
                    ));
                }
            }
        }
        stats.runs += 1;
        if hit {
            stats.hit += 1;
            let what = format!("{label}: after the retry");
            self.disk_after(&log.borrow(), None, true, &what);
        }
        self.failures.extend(problems);
        hit
    }

    fn fault_phase(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for &target in &self.sc.faults {
            let img = self.fx.index(target);
            let mut stats = FaultStats::default();
            let before = self.failures.len();
            let mut n = 0;
            let mut panics = 0;
            let mut storage = Storage::new(self.fx);
            loop {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    self.fault_run(&mut storage, (img, n), &mut stats)
                }));
                match result {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => {
                        self.failures.push(format!(
                            "{}: fault at operation {n} of {target}: PANIC (see the message above)",
                            self.sc.name
                        ));
                        panics += 1;
                        if panics > 20 {
                            break;
                        }
                    }
                }
                n += 1;
                assert!(
                    n < FAULT_LIMIT,
                    "{}: fault phase does not end",
                    self.sc.name
                );
            }
            lines.push(format!(
                "faults on {target}: N = 0..{n}: {} runs reached the fault, {} calls failed \
                 and were retried, {} faults absorbed, {} advanced; {} problems",
                stats.hit,
                stats.failed_calls,
                stats.absorbed,
                stats.advanced,
                self.failures.len() - before
            ));
        }
        lines
    }
}

// ===========================================================================
// The driver.
// ===========================================================================

/// Which halves of the proof a test runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phases {
    All,
    PowerCuts,
    Faults,
}

fn prove(sc: Scenario) {
    prove_phases(sc, Phases::All);
}

fn prove_phases(sc: Scenario, phases: Phases) {
    let started = Instant::now();
    let fx = build(&sc);
    let rec = record(&sc, &fx);
    let writes = rec
        .events
        .iter()
        .filter(|e| matches!(e, Ev::Write { .. }))
        .count();
    let mut judge = Judge::new(&sc, &fx, &rec);

    // The library reads what qemu-img reads, before and after.
    let first = &judge.marks[0].images[fx.root];
    let qemu_first = qemu_view(fx.dir.path(), &fx.names[fx.root], None);
    assert!(
        first.as_ref().is_some_and(|o| *o.view == qemu_first),
        "{}: the library and qemu-img disagree on the initial view",
        sc.name
    );
    let final_states: Vec<Vec<u8>> = (0..fx.names.len())
        .map(|img| replay_image(&fx.initial[img], &rec.events, img))
        .collect();
    let final_dir = fx.dir.path().join("final");
    std::fs::create_dir_all(&final_dir).expect("mkdir");
    for (name, bytes) in fx.names.iter().zip(&final_states) {
        if !bytes.is_empty() {
            std::fs::write(final_dir.join(name), bytes).expect("write final image");
        }
    }
    let last_root = rec.marks.last().expect("marks").root;
    let qemu_last = qemu_view(&final_dir, &fx.names[last_root], None);
    assert!(
        qemu_last == rec.final_shadow,
        "{}: qemu-img reads the final images differently from the guest's writes",
        sc.name
    );
    if let Some(expected) = &fx.expected_final {
        assert!(
            *expected == rec.final_shadow,
            "{}: the final guest view is not what qemu-img rebase -u gives",
            sc.name
        );
    }
    let last = judge.marks.len() - 1;
    for (image, other) in &sc.final_equals {
        let (a, b) = (fx.index(image), fx.index(other));
        let got = judge.marks[last].images[a]
            .as_ref()
            .map(|o| Rc::clone(&o.view));
        let want = judge.marks[0].images[b]
            .as_ref()
            .map(|o| Rc::clone(&o.view));
        assert!(
            got.is_some() && got == want,
            "{}: {image} does not end with {other}'s old view",
            sc.name
        );
    }
    if let Some(covers) = sc.covers {
        covers(&fx, &final_states);
    }

    let mut lines = Vec::new();
    if phases != Phases::Faults {
        let (cuts, cuts_ok, reordered, reordered_ok) = judge.replay();
        lines.push(format!(
            "power cuts: {cuts} cut points tried, {cuts_ok} passed; {reordered} reordered \
             states tried, {reordered_ok} passed; qemu-img check on {} distinct images \
             ({:.1?})",
            judge.qemu.runs,
            started.elapsed()
        ));
    }
    if phases != Phases::PowerCuts {
        lines.extend(judge.fault_phase());
    }
    println!(
        "crash/{}: {} events ({writes} writes) on {} images, {} marks\n  {}\n  \
         qemu-img check runs in all: {}; total {:.1?}",
        sc.name,
        rec.events.len(),
        fx.names.len(),
        rec.marks.len(),
        lines.join("\n  "),
        judge.qemu.runs,
        started.elapsed()
    );
    if !judge.failures.is_empty() {
        let shown: Vec<&String> = judge.failures.iter().take(SHOWN_FAILURES).collect();
        panic!(
            "{}: {} failures; the first ones:\n{}",
            sc.name,
            judge.failures.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ===========================================================================
// Guest writes of every kind.
// ===========================================================================

fn base_and_top(size: u64, cluster: u64, base: &[&str], top: &[&str]) -> Vec<ImageSpec> {
    vec![
        ImageSpec::new("base.qcow2", size, cluster).io(base),
        ImageSpec::new("top.qcow2", size, cluster)
            .on("base.qcow2")
            .io(top),
    ]
}

#[test]
fn allocating_write_into_empty_overlay() {
    let images = base_and_top(2 * MIB, 64 * KIB, &["write -P 0x11 0 2M"], &[]);
    prove(
        Scenario::new("allocating write", images, "top.qcow2")
            .steps(vec![write(192 * KIB, 128 * KIB, 1)])
            .faults(&["top.qcow2"]),
    );
}

#[test]
fn copy_on_write_over_backing_data() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x22 0 1M", "write -P 0x23 1M 1M"],
        &[],
    );
    prove(
        Scenario::new("copy-on-write", images, "top.qcow2")
            .steps(vec![
                write(64 * KIB + 1000, 70_000, 2),
                write(MIB - 300, 600, 3),
            ])
            .faults(&["top.qcow2", "base.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn scatter_gather_write() {
    // One request of many segments: an unaligned copy-on-write head and
    // tail over backing data, whole clusters between, one batch boundary.
    let images = base_and_top(
        6 * MIB,
        64 * KIB,
        &["write -P 0x24 0 3M", "write -P 0x25 3M 3M"],
        &[],
    );
    prove(
        Scenario::new("scatter-gather write", images, "top.qcow2")
            .steps(vec![Step::WriteV {
                off: 12345,
                len: 4 * MIB + 777,
                seed: 4,
                segments: 40,
            }])
            .faults(&["top.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn many_writes_in_flight() {
    // In place (clusters top owns) and allocating (over backing data and
    // over nothing, partial and whole clusters), all submitted together;
    // the engine sends the in-place writes and the data of the allocating
    // ones (more of them than it keeps in flight at once) to the device,
    // which completes them out of order; the new clusters are mapped as
    // their data completes.
    let images = base_and_top(
        4 * MIB,
        64 * KIB,
        &["write -P 0x26 0 2M"],
        &["write -P 0x27 0 1M"],
    );
    let mut writes: Vec<(u64, u64, u64)> = (0..8u64)
        .map(|i| (i * 128 * KIB + 512 * i, 4 * KIB + 512 * i, 10 + i))
        .collect();
    writes.push((MIB + 1000, 70_000, 20));
    writes.push((3 * MIB, 64 * KIB, 21));
    writes.push((MIB + 256 * KIB + 512, 512, 22));
    writes.push((3 * MIB / 2, 128 * KIB, 23));
    writes.push((2 * MIB + 4 * KIB, 8 * KIB, 24));
    writes.push((5 * MIB / 2 - 1000, 3000, 25));
    prove(
        Scenario::new("requests in flight", images, "top.qcow2")
            .steps(vec![Step::Requests(writes)])
            .faults(&["top.qcow2"])
            .qemu_sample(2),
    );
}

#[test]
fn write_zeroes() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x31 0 2M"],
        &["write -P 0x32 0 512k"],
    );
    let sc = Scenario::new("write -z", images, "top.qcow2")
        .steps(vec![
            // Whole owned clusters: the zero flag, storage freed.
            Step::Zero {
                off: 64 * KIB,
                len: 192 * KIB,
            },
            // Part of an owned cluster: zeros written in place.
            Step::Zero {
                off: 300 * KIB,
                len: 10 * KIB,
            },
            // Part of a cluster the backing file holds: copy-on-write.
            Step::Zero {
                off: MIB + 4 * KIB,
                len: 8 * KIB,
            },
        ])
        .faults(&["top.qcow2", "base.qcow2"]);
    prove(sc);
}

#[test]
fn discard() {
    let images = base_and_top(
        2 * MIB,
        64 * KIB,
        &["write -P 0x41 0 2M"],
        &["write -P 0x42 0 1M"],
    );
    prove(
        Scenario::new("discard", images, "top.qcow2")
            .steps(vec![
                Step::Discard {
                    off: 128 * KIB,
                    len: 256 * KIB,
                },
                Step::Discard {
                    off: MIB + 100,
                    len: 200 * KIB,
                },
            ])
            .faults(&["top.qcow2"]),
    );
}

#[test]
fn write_needing_new_l2_tables() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 512).io(&["write -P 0x51 0 64k"])];
    let sc = Scenario::new("new L2 tables", images, "disk.qcow2")
        .steps(vec![
            write(300 * KIB, KIB, 4),
            // 80 clusters: two batches, two new L2 tables.
            write(700 * KIB + 512, 40 * KIB, 5),
            write(MIB - 512, 512, 6),
        ])
        .faults(&["disk.qcow2"]);
    prove(sc.qemu_sample(4));
}

/// Refcount table clusters and used entries of a qcow2 image.
fn refcount_table(bytes: &[u8]) -> (u64, u32, usize) {
    let offset = be64(bytes, 48);
    let clusters = be32(bytes, 56);
    let cs = 1usize << be32(bytes, 20);
    let table = &bytes[offset as usize..offset as usize + clusters as usize * cs];
    let used = table
        .chunks(8)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count();
    (offset, clusters, used)
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 64
/// clusters (32 KiB), the one-cluster refcount table 64 blocks (2 MiB of
/// file). The file is filled to just below a block boundary under 2 MiB;
/// scattered writes then need a new block, and then a larger table.
fn refcount_growth() -> Scenario {
    let images = vec![ImageSpec::new("disk.qcow2", 2 * MIB + 512 * KIB, 512)
        .refcount_bits(64)
        .io(&["write -P 0x61 0 1945k"])];
    // Each write: 16 data clusters and a new L2 table.
    let steps = (0..5u64)
        .map(|i| write(1960 * KIB + i * 110 * KIB + 1024, 8 * KIB, 100 + i))
        .collect();
    let mut sc = Scenario::new("refcount growth", images, "disk.qcow2")
        .steps(steps)
        .faults(&["disk.qcow2"]);
    // The largest scenario: qemu-img checks every power cut but only every
    // eighth reordered state.
    sc.qemu_sample = 8;
    sc.covers = Some(|fx, finals| {
        let before = refcount_table(&fx.initial[0]);
        let after = refcount_table(&finals[0]);
        println!("refcount table (offset, clusters, used entries): {before:?} -> {after:?}");
        assert!(
            after.0 != before.0 && after.1 > before.1,
            "the refcount table did not grow"
        );
        assert!(after.2 >= before.2 + 2, "no new refcount block besides");
    });
    sc
}

/// [`refcount_growth`] with the writes in flight together through the
/// request engine: new refcount blocks and a new table placed while the
/// data of other allocating writes has not reached the device yet (the
/// device's end lags behind the clusters counted), new L2 tables at link;
/// the fault phase fails data writes in flight too.
fn refcount_growth_in_flight() -> Scenario {
    let mut sc = refcount_growth();
    sc.name = "refcount growth, writes in flight";
    let writes = (0..8u64)
        .map(|i| (1960 * KIB + i * 70 * KIB + 1024, 8 * KIB, 200 + i))
        .collect();
    sc.steps = vec![Step::Requests(writes)];
    sc
}

#[test]
fn refcount_growth_with_writes_in_flight_faults() {
    prove_phases(refcount_growth_in_flight(), Phases::Faults);
}

#[test]
fn refcount_growth_with_writes_in_flight_power_cuts() {
    prove_phases(refcount_growth_in_flight(), Phases::PowerCuts);
}

// The largest scenario runs as two tests, so that they share the cores.
#[test]
fn refcount_block_and_table_growth_power_cuts() {
    prove_phases(refcount_growth(), Phases::PowerCuts);
}

#[test]
fn refcount_block_and_table_growth_faults() {
    prove_phases(refcount_growth(), Phases::Faults);
}

#[test]
fn write_over_snapshot_shared_cluster() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 64 * KIB)
        .io(&["write -P 0x71 0 512k"])
        .snapshot("s1")];
    prove(
        Scenario::new("internal snapshot", images, "disk.qcow2")
            .steps(vec![
                // Partial write: copy-on-write of the shared cluster and of
                // the shared L2 table.
                write(64 * KIB + 100, 4 * KIB, 7),
                // A whole shared cluster: no copy, one reference dropped.
                write(128 * KIB, 64 * KIB, 8),
                write(700 * KIB, 4 * KIB, 9),
            ])
            .faults(&["disk.qcow2"]),
    );
}

#[test]
fn write_over_compressed_cluster() {
    let images = vec![ImageSpec::new("disk.qcow2", MIB, 64 * KIB).io(&[
        "write -c -P 0x81 0 64k",
        "write -c -P 0x82 64k 64k",
        "write -c -P 0x83 128k 64k",
    ])];
    prove(
        Scenario::new("compressed", images, "disk.qcow2")
            .steps(vec![
                // Partial: the rest of the cluster is inflated.
                write(64 * KIB + 512, KIB, 10),
                // Whole cluster: nothing to inflate, the extent is released.
                write(0, 64 * KIB, 11),
            ])
            .faults(&["disk.qcow2"]),
    );
}

// ===========================================================================
// Chain changes and jobs.
// ===========================================================================

/// base <- mid <- top, 1 MiB, 64 KiB clusters, with data, zero clusters and
/// holes in every layer.
fn three_layers() -> Vec<ImageSpec> {
    vec![
        ImageSpec::new("base.qcow2", MIB, 64 * KIB).io(&["write -P 0x91 0 768k"]),
        ImageSpec::new("mid.qcow2", MIB, 64 * KIB)
            .on("base.qcow2")
            .io(&[
                "write -P 0x92 256k 256k",
                "write -z 640k 64k",
                "write -P 0x95 832k 64k",
            ]),
        ImageSpec::new("top.qcow2", MIB, 64 * KIB)
            .on("mid.qcow2")
            .io(&["write -P 0x93 0 128k", "write -P 0x94 900k 10k"]),
    ]
}

#[test]
fn drop_intermediate_collapse() {
    let mut sc = Scenario::new("drop_intermediate", three_layers(), "top.qcow2")
        .steps(vec![Step::Collapse {
            top: "mid.qcow2",
            base: Some("base.qcow2"),
        }])
        .faults(&["top.qcow2"]);
    sc.rebase = Some(("top.qcow2", "base.qcow2"));
    prove(sc);
}

#[test]
fn intermediate_commit() {
    let mut sc = Scenario::new("commit", three_layers(), "top.qcow2")
        .steps(vec![Step::Commit {
            top: "mid.qcow2",
            base: "base.qcow2",
            writes: Vec::new(),
        }])
        .faults(&["base.qcow2", "mid.qcow2", "top.qcow2"]);
    sc.final_equals = vec![("base.qcow2", "mid.qcow2")];
    prove(sc);
}

#[test]
fn active_commit_with_pivot() {
    let images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xa1 0 1M"],
        &[
            "write -P 0xa2 128k 256k",
            "write -z 640k 64k",
            "write -P 0xa3 900k 10k",
        ],
    );
    let writes = vec![
        GuestWrite {
            after_step: 1,
            off: 64 * KIB + 10,
            len: 5000,
            seed: 20,
        },
        GuestWrite {
            after_step: 3,
            off: 800 * KIB,
            len: 64 * KIB,
            seed: 21,
        },
        // Issued while ready: re-copied before the pivot.
        GuestWrite {
            after_step: 40,
            off: 300 * KIB,
            len: 512,
            seed: 22,
        },
    ];
    prove(
        Scenario::new("active commit", images, "top.qcow2")
            .steps(vec![
                Step::Commit {
                    top: "top.qcow2",
                    base: "base.qcow2",
                    writes,
                },
                // After the pivot the guest writes into base.
                write(500 * KIB, 4 * KIB, 23),
            ])
            .faults(&["base.qcow2", "top.qcow2"]),
    );
}

#[test]
fn stream() {
    prove(
        Scenario::new("stream", three_layers(), "top.qcow2")
            .steps(vec![Step::Stream {
                base: Some("base.qcow2"),
            }])
            .faults(&["top.qcow2", "mid.qcow2"]),
    );
}

#[test]
fn live_snapshot() {
    let mut images = base_and_top(
        MIB,
        64 * KIB,
        &["write -P 0xb1 0 1M"],
        &["write -P 0xb2 0 256k"],
    );
    images.push(ImageSpec::blank("snap.qcow2"));
    prove(
        Scenario::new("live snapshot", images, "top.qcow2")
            .steps(vec![
                Step::Snapshot {
                    image: "snap.qcow2",
                },
                write(100 * KIB, 8 * KIB, 30),
            ])
            .faults(&["snap.qcow2", "top.qcow2"]),
    );
}
