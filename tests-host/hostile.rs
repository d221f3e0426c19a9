//! Hostile images: a corrupt or crafted image must give a clear error — never a
//! panic, never a hang, and never a write to an image that failed validation.
//!
//! Seed images are made once per process by `qemu-img` and `qemu-io` (a missing
//! tool fails the test; nothing is skipped): a v3 image with 64 KiB clusters, data
//! and zero clusters; a v2 image with 512-byte clusters; two compressed images
//! (64 KiB and 512-byte clusters); an overlay over a qcow2 base and one over a raw
//! base. The tests mutate their bytes (header fields, header extensions, L1/L2
//! entries, refcount structures, compressed payloads, truncation, random flips,
//! looping and over-deep backing chains) and run the library in-process over
//! [`MemDevice`]s: `Graph::open_image`, `Graph::read` over the whole virtual size
//! (a sample of offsets when it is over 8 MiB) and a `Graph::block_status` walk.
//!
//! Every case runs under `catch_unwind`. A panic is recorded with the mutation that
//! caused it and the panic's message and location; one key (say, a location) is
//! reported once, with the number of cases and the first of them. Read-only cases
//! must not write: every device reports its writes to an observer, and its buffer
//! must still hold the image's bytes afterwards (the spare room after it
//! untouched). The graph must be empty again once the image is released, or after
//! a failed open. A watchdog thread aborts the test process, naming the case, when
//! one case runs longer than [`CASE_TIME_LIMIT`]: that is a hang.
//!
//! The resolver hands out writable devices even when a read-only open asks for
//! one, so a write the library attempts lands and is caught, instead of being
//! refused by the device and going unnoticed.
//!
//! Two phases write on purpose. The write phase ([`write_phase`], test
//! `writes_on_hostile_images`) opens hostile images read-write and sends guest
//! writes, zero writes and discards: no write may land on the image's metadata
//! (QEMU's overlap check), a request that fails as corrupt must leave the image as
//! it was (a v3 image may gain exactly the corrupt bit in its header), and a
//! successful one must read back. Its cases run in a child process
//! (the test re-runs itself as a worker), so a hang is reported with its case and
//! the remaining cases still run. The collapse phase ([`collapse_phase`]) drops the
//! backing file of overlays with hostile headers.
//!
//! Last, the `blockgraph` binary runs on corrupt files (exit status 1, never 101,
//! a signal or a hang; read-only commands leave every file byte for byte as it
//! was).
//!
//! Sections: 1. harness (panic capture, watchdog, resolver, one case, write and
//! collapse phases, findings), 2. seeds and their layout, 3. mutations, 4. tests
//! (in-process), 5. tests of the `blockgraph` binary, 6. QEMU's open limits
//! (judged by qemu-img), bounded open (bytes read counted, not timed), writes
//! onto inactive L1 tables and the corrupt bit in the header.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::device::{DeviceEvent, DeviceId, MemDevice, Queue};
use blockgraph::engine::Engine;
use blockgraph::format::qcow2::Header;
use blockgraph::graph::{NameBuf, MAX_CHAIN_DEPTH};
use blockgraph::{Device, Error, ErrorKind, Graph, NodeId, OpenOptions, Resolver};

mod common;
use common::{be64, bg_ok, bg_refused, big_stack, qemu_img, qemu_io, run, tmpdir, BLOCKGRAPH};

/// Virtual sizes up to this are read whole; larger ones are sampled.
const READ_CAP: u64 = 8 << 20;
/// Bytes per `Graph::read`: odd on purpose, so reads start and end inside
/// clusters.
const CHUNK: u64 = 3 * 65536 + 4099;
/// Room left after an image in its device buffer: a write that grows the
/// device would land there.
const SPARE: usize = 64 * 1024;
/// Room for the top image to grow in the write phase.
const WRITE_SPARE: usize = 1 << 20;
/// What the spare room must still hold (compared in pieces of this size).
static ZEROS: [u8; SPARE] = [0; SPARE];
/// Most `block_status` calls of one walk (a huge image is not walked whole).
const STATUS_CALLS: u32 = 4096;
/// One case running longer than this is a hang.
const CASE_TIME_LIMIT: Duration = Duration::from_secs(15);
/// Longest a `blockgraph` command may run.
const CLI_TIME_LIMIT: Duration = Duration::from_secs(20);

/// L1/L2 entry bit: refcount exactly one.
const COPIED: u64 = 1 << 63;
/// L2 entry bit: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit: reads as zeros.
const ZERO: u64 = 1;
/// Offset bits of an L1 entry or a standard L2 entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Header extension: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

// ---------------------------------------------------------------------------
// 1. Harness
// ---------------------------------------------------------------------------

thread_local! {
    /// Whether a panic on this thread is caught by [`catch`] (and so must not
    /// be printed by the default hook).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The last caught panic: message and location.
    static CAUGHT: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(panic payload is not a string)")
                    .to_owned();
                let location = info.location().map_or_else(
                    || "(unknown location)".to_owned(),
                    |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
                );
                CAUGHT.with(|c| *c.borrow_mut() = Some((message, location)));
            } else {
                default(info);
            }
        }));
    });
}

/// Runs `f`; a panic becomes `Err((message, location))`.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, (String, String)> {
    install_panic_hook();
    CAPTURING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| ("(panic message lost)".into(), "(unknown location)".into()))
    })
}

/// Aborts the process when one case runs for longer than [`CASE_TIME_LIMIT`].
struct Watchdog {
    current: Arc<Mutex<(String, Instant)>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(test: &'static str) -> Self {
        let current = Arc::new(Mutex::new(("(starting)".to_owned(), Instant::now())));
        let done = Arc::new(AtomicBool::new(false));
        let (watched, finished) = (Arc::clone(&current), Arc::clone(&done));
        thread::spawn(move || {
            while !finished.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100));
                let (case, since) = watched
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if since.elapsed() > CASE_TIME_LIMIT && !finished.load(Ordering::Relaxed) {
                    eprintln!(
                        "HANG in test `{test}`: case `{case}` still running after {:?}; \
                         aborting the test process",
                        since.elapsed()
                    );
                    std::process::abort();
                }
            }
        });
        Self { current, done }
    }

    fn case(&self, label: &str) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.0.clear();
        current.0.push_str(label);
        current.1 = Instant::now();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// An image the resolver serves by name.
#[derive(Clone)]
struct Img<'d> {
    name: String,
    bytes: &'d [u8],
    /// Device identity; `None` gives every open a new one (the resolver
    /// cannot tell that two names are the same image).
    id: Option<u64>,
}

/// One device handed out: where its buffer lies in the arena.
struct Opened<'d> {
    name: String,
    start: usize,
    bytes: &'d [u8],
    capacity: usize,
}

/// A write a device reported: the device's number (in order of opening),
/// offset, length, and whether it carries guest data (an 8-byte word, aligned
/// on the device, made of [`PATTERN`]).
type WriteEvent = (usize, u64, usize, bool);

/// Whether `data`, written at device offset `offset`, holds an aligned
/// 8-byte word of guest data.
fn carries_guest_data(offset: u64, data: &[u8]) -> bool {
    let skip = (offset.next_multiple_of(8) - offset) as usize;
    data.get(skip..).is_some_and(|words| {
        words
            .chunks_exact(8)
            .any(|w| w.iter().all(|&b| b == PATTERN))
    })
}

/// Serves [`Img`]s as [`MemDevice`]s whose buffers are cut from one arena, so
/// that nothing is leaked and every buffer can be inspected afterwards. Each
/// device gets the next of `observers`, which logs its writes.
struct MemResolver<'a, 'd, 'l, O> {
    images: Vec<Img<'d>>,
    free: &'a mut [u8],
    used: usize,
    next_id: u64,
    log: &'l mut Vec<Opened<'d>>,
    exhausted: &'l mut bool,
    observers: std::slice::IterMut<'a, O>,
    /// Room after the first image opened (the top one).
    top_spare: usize,
}

impl<'a, 'd, O: FnMut(DeviceEvent<'_>)> MemResolver<'a, 'd, '_, O> {
    fn device(&mut self, name: &str) -> blockgraph::Result<MemDevice<'a>> {
        let Some(img) = self.images.iter().find(|i| i.name == name) else {
            return Err(Error::new(ErrorKind::NotFound, "no such test image"));
        };
        let (bytes, id) = (img.bytes, img.id);
        let id = id.unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id
        });
        let spare = if self.log.is_empty() {
            self.top_spare
        } else {
            SPARE
        };
        let capacity = bytes.len() + spare;
        if self.free.len() < capacity {
            *self.exhausted = true;
            return Err(Error::new(ErrorKind::NoCapacity, "test arena exhausted"));
        }
        let (buf, rest) = std::mem::take(&mut self.free).split_at_mut(capacity);
        self.free = rest;
        buf[..bytes.len()].copy_from_slice(bytes);
        self.log.push(Opened {
            name: name.to_owned(),
            start: self.used,
            bytes,
            capacity,
        });
        self.used += capacity;
        let mut device = MemDevice::new(buf, bytes.len() as u64, id)?;
        if let Some(observer) = self.observers.next() {
            device.observe(observer);
        }
        Ok(device)
    }
}

impl<'a, O: FnMut(DeviceEvent<'_>)> Resolver<MemDevice<'a>> for MemResolver<'a, '_, '_, O> {
    fn open(&mut self, name: &str, _writable: bool) -> blockgraph::Result<MemDevice<'a>> {
        self.device(name)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        _writable: bool,
        resolved: &mut NameBuf,
    ) -> blockgraph::Result<MemDevice<'a>> {
        resolved.clear();
        resolved
            .push_str(reference)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "name too long"))?;
        self.device(reference)
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        out.clear();
        out.push_str(target)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "name too long"))
    }
}

/// What a case reads after a successful open.
#[derive(Clone)]
enum Reads {
    /// The whole virtual size, or a sample of it when over [`READ_CAP`].
    Whole,
    /// These guest ranges (clipped to the virtual size).
    Ranges(Vec<(u64, u64)>),
}

/// One run of the library on a set of images.
struct Case<'d> {
    label: String,
    images: Vec<Img<'d>>,
    top: String,
    options: OpenOptions,
    reads: Reads,
    /// Device opens the arena has room for.
    opens: usize,
    /// The guest view every successful read must match.
    expect: Option<&'d [u8]>,
    /// Run the write phase ([`write_phase`]) on the top image before reading.
    writes: bool,
    /// Drop the top image's backing file ([`collapse_phase`]) after reading.
    collapse: bool,
}

/// A broken rule, keyed so that repeats are counted once.
struct Problem {
    key: String,
    detail: String,
}

/// What one case did.
#[derive(Default)]
struct Outcome {
    open_error: Option<Error>,
    size: u64,
    reads_ok: u64,
    reads_failed: u64,
    status_ok: u64,
    status_failed: u64,
    writes_ok: u64,
    writes_failed: u64,
    /// The write phase ran: the top image may legitimately have changed.
    wrote_top: bool,
    problems: Vec<Problem>,
}

impl Outcome {
    /// Records a problem, once per key and case.
    fn problem(&mut self, key: impl Into<String>, detail: impl Into<String>) {
        let key = key.into();
        if self.problems.iter().all(|p| p.key != key) {
            self.problems.push(Problem {
                key,
                detail: detail.into(),
            });
        }
    }
}

/// Runs `case` on a fresh `Graph` with `N` node slots.
fn run_case<const N: usize>(case: &Case<'_>) -> Outcome {
    // The top image (opened first) gets room to grow in write cases.
    let top_spare = if case.writes { WRITE_SPARE } else { SPARE };
    let largest = case
        .images
        .iter()
        .map(|i| i.bytes.len() + SPARE)
        .max()
        .unwrap_or(0);
    let mut arena = vec![0u8; largest * case.opens + top_spare];
    let mut log = Vec::new();
    let mut exhausted = false;
    let mut outcome = Outcome::default();
    let events: RefCell<Vec<WriteEvent>> = RefCell::new(Vec::new());
    let mut observers: Vec<_> = (0..case.opens)
        .map(|device| {
            let events = &events;
            move |event: DeviceEvent<'_>| {
                if let DeviceEvent::Write { offset, data } = event {
                    let guest = carries_guest_data(offset, data);
                    events
                        .borrow_mut()
                        .push((device, offset, data.len(), guest));
                }
            }
        })
        .collect();
    let caught = catch(|| {
        let mut resolver = MemResolver {
            images: case.images.clone(),
            free: &mut arena,
            used: 0,
            next_id: 1000,
            log: &mut log,
            exhausted: &mut exhausted,
            observers: observers.iter_mut(),
            top_spare,
        };
        let mut graph: Box<Graph<MemDevice<'_>, N>> = Box::default();
        exercise(&mut graph, &mut resolver, case, &events, &mut outcome);
    });
    if let Err((message, location)) = caught {
        outcome.problem(
            format!("PANIC at {location}"),
            format!("panicked at {location}: {message}"),
        );
    }
    if exhausted {
        outcome.problem(
            "test harness: arena exhausted",
            "the test's device arena is too small for this case",
        );
    }
    // Only the top image (device 0) may be written, and only by the write
    // phase.
    let wrote_top = outcome.wrote_top;
    let may_write = |device: usize| device == 0 && wrote_top;
    let stray = events.borrow().iter().find(|e| !may_write(e.0)).copied();
    if let Some((device, offset, len, _)) = stray {
        let name = log.get(device).map_or("?", |o| o.name.as_str());
        outcome.problem(
            "WRITE to an image",
            format!("device `{name}` was written: {len} bytes at {offset}"),
        );
    }
    for (device, opened) in log.iter().enumerate() {
        if may_write(device) {
            continue;
        }
        let buf = &arena[opened.start..opened.start + opened.capacity];
        let (image, spare) = buf.split_at(opened.bytes.len());
        // Slice equality is a memcmp even in debug builds; search only on a
        // difference.
        if image != opened.bytes {
            let at = first_difference(image, opened.bytes);
            outcome.problem(
                "WRITE to an image",
                format!("device `{}` changed at byte {at:?}", opened.name),
            );
        }
        if spare.chunks(SPARE).any(|c| c != &ZEROS[..c.len()]) {
            let at = spare.iter().position(|&b| b != 0).unwrap_or(0);
            outcome.problem(
                "WRITE to an image",
                format!(
                    "device `{}` grew: byte {} written",
                    opened.name,
                    opened.bytes.len() + at
                ),
            );
        }
    }
    outcome
}

/// Guest ranges read for [`Reads::Whole`].
fn whole_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= READ_CAP {
        return (0..size)
            .step_by(CHUNK as usize)
            .map(|off| (off, CHUNK.min(size - off)))
            .collect();
    }
    let mut rng = Rng(size | 1);
    let mut offsets = vec![0, size / 3, size / 2, size - CHUNK, size - 1];
    offsets.extend((0..4).map(|_| rng.below(size)));
    offsets
        .into_iter()
        .map(|off| (off, CHUNK.min(size - off)))
        .collect()
}

fn exercise<'a, const N: usize, O: FnMut(DeviceEvent<'_>)>(
    graph: &mut Graph<MemDevice<'a>, N>,
    resolver: &mut MemResolver<'a, '_, '_, O>,
    case: &Case<'_>,
    events: &RefCell<Vec<WriteEvent>>,
    out: &mut Outcome,
) {
    let top = match graph.open_image(resolver, &case.top, case.options) {
        Ok(top) => top,
        Err(err) => {
            if graph.node_count() != 0 {
                out.problem(
                    "nodes left behind by a failed open",
                    format!(
                        "{} nodes still in the graph after open failed ({:?}: {})",
                        graph.node_count(),
                        err.kind(),
                        err.message()
                    ),
                );
            }
            if case.expect.is_some() {
                out.problem(
                    "expected image failed to open",
                    format!("{:?}: {}", err.kind(), err.message()),
                );
            }
            out.open_error = Some(err);
            return;
        }
    };
    let size = match graph.size(top) {
        Ok(size) => size,
        Err(err) => {
            out.problem("size of an open image", format!("{err:?}"));
            return;
        }
    };
    out.size = size;
    if case.writes {
        out.wrote_top = true;
        write_phase(graph, top, size, events, case.expect.is_some(), out);
    }
    let ranges = match &case.reads {
        Reads::Whole => whole_ranges(size),
        Reads::Ranges(ranges) => ranges
            .iter()
            .filter(|&&(off, _)| off < size)
            .map(|&(off, len)| (off, len.min(size - off)))
            .collect(),
    };
    let mut buf = vec![0u8; ranges.iter().map(|r| r.1).max().unwrap_or(0) as usize];
    for &(off, len) in &ranges {
        let data = &mut buf[..len as usize];
        match graph.read(top, off, data) {
            Ok(()) => {
                out.reads_ok += 1;
                if let Some(expect) = case.expect {
                    let want = expect.get(off as usize..(off + len) as usize);
                    if want != Some(&*data) {
                        out.problem(
                            "wrong data",
                            format!("read of {len} bytes at {off} differs from the expected view"),
                        );
                    }
                }
            }
            Err(err) => {
                out.reads_failed += 1;
                if case.expect.is_some() {
                    out.problem(
                        "expected read failed",
                        format!("read {len} at {off}: {:?}: {}", err.kind(), err.message()),
                    );
                }
            }
        }
    }
    status_walk(graph, top, size, &ranges, out);
    if case.collapse {
        out.wrote_top = true;
        collapse_phase(graph, resolver, top, events, out);
    }
    check_no_writes(graph, top, case.writes || case.collapse, out);
    if let Err(err) = graph.unref(top) {
        out.problem("unref of the top node", format!("{err:?}"));
    }
    if graph.node_count() != 0 {
        out.problem(
            "nodes left behind after release",
            format!("{} nodes left after unref(top)", graph.node_count()),
        );
    }
}

/// Walks `block_status` from 0 (as `map` and `convert` do), then asks it at
/// each read offset. A run of 0 or past the end would hang those loops.
fn status_walk<const N: usize>(
    graph: &mut Graph<MemDevice<'_>, N>,
    top: NodeId,
    size: u64,
    ranges: &[(u64, u64)],
    out: &mut Outcome,
) {
    let mut check = |out: &mut Outcome, off: u64, len: u64| -> Option<u64> {
        match graph.block_status(top, off, len) {
            Ok((_, run)) if run == 0 || run > len => {
                out.problem(
                    "block_status run out of range (map/convert would hang or overrun)",
                    format!("block_status({off}, {len}) returned a run of {run}"),
                );
                None
            }
            Ok((_, run)) => {
                out.status_ok += 1;
                Some(run)
            }
            Err(_) => {
                out.status_failed += 1;
                Some((off / 65536 + 1) * 65536 - off)
            }
        }
    };
    let mut offset = 0;
    let mut calls = 0;
    while offset < size && calls < STATUS_CALLS {
        calls += 1;
        match check(out, offset, size - offset) {
            Some(step) => offset = offset.saturating_add(step),
            None => break,
        }
    }
    for &(off, len) in ranges {
        if len > 0 {
            check(out, off, len);
        }
    }
}

/// Every device of the chain (below the top one when it was written) must
/// report no write and no flush.
fn check_no_writes<const N: usize>(
    graph: &mut Graph<MemDevice<'_>, N>,
    top: NodeId,
    skip_top: bool,
    out: &mut Outcome,
) {
    let mut layer = Some(top);
    let mut depth = 0;
    while let Some(node) = layer {
        if let (Ok(Some(file)), false) = (graph.file(node), skip_top && depth == 0) {
            if let Ok(device) = graph.device_mut(file) {
                if device.writes() != 0 || device.flushes() != 0 {
                    let (writes, flushes) = (device.writes(), device.flushes());
                    out.problem(
                        "WRITE to an image",
                        format!("layer {depth}: {writes} writes, {flushes} flushes"),
                    );
                }
            }
        }
        layer = graph.backing(node).ok().flatten();
        depth += 1;
        if depth > 1000 {
            out.problem("chain walk does not end", "more than 1000 layers");
            break;
        }
    }
}

/// Guest data the write phase writes (a byte no metadata structure is made of).
const PATTERN: u8 = 0xc3;

/// One guest request of the write phase.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64),
    Zeroes(u64, u64),
    Discard(u64, u64),
    Flush,
}

/// The write phase: a write into cluster 1, one at 0, one straddling a
/// cluster boundary in the middle, a zero write, a discard, a write of the
/// last sector, a flush (ranges clipped to the virtual size).
fn write_ops(size: u64, cs: u64) -> Vec<Op> {
    let mut ops = vec![
        Op::Write(cs, 4096),
        Op::Write(0, 512),
        Op::Write((size / 2).saturating_sub(512) & !511, cs + 1024),
        Op::Zeroes(3 * cs, cs),
        Op::Discard(0, 2 * cs),
        Op::Write(size.saturating_sub(512), 512),
        Op::Flush,
    ];
    ops.retain_mut(|op| match op {
        Op::Write(off, len) | Op::Zeroes(off, len) | Op::Discard(off, len) => {
            *len = (*len).min(size.saturating_sub(*off));
            *len > 0
        }
        Op::Flush => true,
    });
    ops
}

/// `view` (a guest view of `cs`-byte clusters) after `ops`; a discard
/// clears whole clusters unless `discard_ignored` (v2 with a backing file).
fn apply_ops(view: &mut [u8], ops: &[Op], cs: u64, discard_ignored: bool) {
    let size = view.len() as u64;
    for op in ops {
        match *op {
            Op::Write(off, len) => view[off as usize..(off + len) as usize].fill(PATTERN),
            Op::Zeroes(off, len) => view[off as usize..(off + len) as usize].fill(0),
            Op::Discard(off, len) if !discard_ignored => {
                let mut pos = off;
                while pos < off + len {
                    let end = ((pos / cs + 1) * cs).min(off + len);
                    if pos % cs == 0 && (end % cs == 0 || end == size) {
                        view[pos as usize..end as usize].fill(0);
                    }
                    pos = end;
                }
            }
            Op::Discard(..) | Op::Flush => {}
        }
    }
}

/// The metadata of an image (as its header and bytes say): header cluster,
/// L1 table, refcount table, L2 tables, refcount blocks, clipped to the file.
fn metadata_regions(h: &Header, bytes: &[u8]) -> Vec<(&'static str, u64, u64)> {
    let len = bytes.len() as u64;
    let cs = h.cluster_size();
    let span = |what, start: u64, n: u64| (what, start.min(len), start.saturating_add(n).min(len));
    let entries = |table: u64, n: u64| {
        (0..n.min(4096))
            .map(move |i| table + 8 * i)
            .take_while(|&p| p + 8 <= len)
            .map(|p| be(bytes, p as usize, 8))
    };
    let refcount_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    let mut regions = vec![
        span("header cluster", 0, cs),
        span("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8),
        span(
            "refcount table",
            h.refcount_table_offset,
            refcount_entries * 8,
        ),
    ];
    for entry in entries(h.l1_table_offset, u64::from(h.l1_size)) {
        let table = entry & OFFSET_MASK;
        if table != 0 && table.is_multiple_of(cs) && table < len {
            regions.push(span("L2 table", table, cs));
        }
    }
    for entry in entries(h.refcount_table_offset, refcount_entries) {
        let block = entry & !0x1ff;
        if block != 0 && block.is_multiple_of(cs) && block < len {
            regions.push(span("refcount block", block, cs));
        }
    }
    regions.retain(|r| r.1 < r.2);
    regions
}

/// Whether a write of `len` bytes at `at` into metadata `what` is an update
/// the write path makes: an entry or refcount (at most 8 bytes), the
/// refcount table switch (12 bytes at 48), the autoclear field, the
/// incompatible features field when the request failed as corrupt (the
/// corrupt bit, `marking`), or the write-back of one cached table slice
/// (`slice` bytes, aligned, no guest data in it).
fn metadata_update(
    what: &str,
    (at, len, guest): (u64, usize, bool),
    slice: u64,
    marking: bool,
) -> bool {
    let table = matches!(what, "L1 table" | "L2 table" | "refcount block");
    let slice_write = table && len as u64 == slice && at.is_multiple_of(slice) && !guest;
    let header = match (at, len) {
        (48, 12) | (88, 8) => true,
        (72, 8) => marking,
        _ => false,
    };
    len <= 8 || slice_write || (what == "header cluster" && header)
}

/// `bytes` (a qcow2 image) with the corrupt bit (incompatible bit 1) set in
/// its header, as a request that finds corruption leaves a v3 image; `None`
/// for v2, which has no such bit.
fn with_corrupt_bit(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 80 || be(bytes, 4, 4) != 3 {
        return None;
    }
    let mut marked = bytes.to_vec();
    marked[79] |= 2;
    Some(marked)
}

/// Runs [`write_ops`] on `top`. Each request must keep guest data and new
/// structures off the image's metadata (QEMU's overlap check), a request
/// that fails as corrupt must leave the image as it found it, and a write
/// within one cluster that succeeds must read back.
fn write_phase<const N: usize>(
    graph: &mut Graph<MemDevice<'_>, N>,
    top: NodeId,
    size: u64,
    events: &RefCell<Vec<WriteEvent>>,
    expect_success: bool,
    out: &mut Outcome,
) {
    let cs = graph.qcow2(top).map_or(512, |q| q.cluster_size());
    let Ok(Some(file)) = graph.file(top) else {
        return;
    };
    let intact = expect_success;
    for op in write_ops(size, cs) {
        let Ok(device) = graph.device_mut(file) else {
            return;
        };
        let before = device.contents().to_vec();
        let regions = graph
            .qcow2(top)
            .map_or_else(|_| Vec::new(), |q| metadata_regions(q.header(), &before));
        let first = events.borrow().len();
        let result = match op {
            Op::Write(off, len) => graph.write(top, off, &vec![PATTERN; len as usize]),
            Op::Zeroes(off, len) => graph.write_zeroes(top, off, len),
            Op::Discard(off, len) => graph.discard(top, off, len),
            Op::Flush => graph.flush(top),
        };
        let writes: Vec<(u64, usize, bool)> = events.borrow()[first..]
            .iter()
            .filter(|e| e.0 == 0)
            .map(|e| (e.1, e.2, e.3))
            .collect();
        let request = format!("{op:?}");
        let kind = request.split('(').next().unwrap_or("").to_owned();
        let marking = matches!(&result, Err(e) if e.kind() == ErrorKind::Corrupt);
        for &(at, n, guest) in &writes {
            let end = at + n as u64;
            for &(what, start, stop) in &regions {
                let update = metadata_update(what, (at, n, guest), cs.min(4096), marking);
                if at < stop && end > start && !update {
                    out.problem(
                        format!("METADATA OVERWRITTEN: a {kind} request wrote over a {what}"),
                        format!(
                            "{request}: the device was written at {at}..{end}, over the {what}                              at {start}..{stop}; result {result:?}"
                        ),
                    );
                }
            }
        }
        match result {
            Ok(()) => {
                out.writes_ok += 1;
                if let Op::Write(off, len) = op {
                    if off / cs == (off + len - 1) / cs {
                        let mut back = vec![0u8; len as usize];
                        if graph.read(top, off, &mut back).is_ok()
                            && back.iter().any(|&b| b != PATTERN)
                        {
                            out.problem(
                                "write acknowledged but reads back different data",
                                format!("{request} succeeded; a read of the range differs"),
                            );
                        }
                    }
                }
            }
            Err(err) => {
                out.writes_failed += 1;
                if intact {
                    out.problem(
                        "write request on an intact image failed",
                        format!("{request}: {:?}: {}", err.kind(), err.message()),
                    );
                }
                let after = graph.device_mut(file).map(|d| d.contents().to_vec());
                // The image as it was, or (v3) with only the corrupt bit set.
                let marked = after.as_ref().ok() == with_corrupt_bit(&before).as_ref();
                if err.kind() == ErrorKind::Corrupt
                    && after.as_deref() != Ok(&before[..])
                    && !marked
                {
                    let after = after.unwrap_or_default();
                    let at = first_difference(&before, &after);
                    let how = match at {
                        Some(_) => "changed bytes of the image",
                        None => "left the file longer (data appended past the old end)",
                    };
                    out.problem(
                        format!("a {kind} request that failed as corrupt {how}"),
                        format!(
                            "{request} failed ({}) after {} device writes; first changed byte                              {at:?}, length {} -> {}",
                            err.message(),
                            writes.len(),
                            before.len(),
                            after.len()
                        ),
                    );
                }
            }
        }
    }
}

/// Drops the top image's backing file (`drop_intermediate` with no base):
/// cluster 0 is rewritten. On success the new header must parse and record
/// no backing file; on failure the image must be as it was.
fn collapse_phase<'a, const N: usize, O: FnMut(DeviceEvent<'_>)>(
    graph: &mut Graph<MemDevice<'a>, N>,
    resolver: &mut MemResolver<'a, '_, '_, O>,
    top: NodeId,
    events: &RefCell<Vec<WriteEvent>>,
    out: &mut Outcome,
) {
    let (Ok(Some(base)), Ok(Some(file))) = (graph.backing(top), graph.file(top)) else {
        return;
    };
    let Ok(device) = graph.device_mut(file) else {
        return;
    };
    let before = device.contents().to_vec();
    let first = events.borrow().len();
    let result = graph.drop_intermediate(resolver, top, base, None);
    let writes = events.borrow().len() - first;
    let after = match graph.device_mut(file) {
        Ok(device) => device.contents().to_vec(),
        Err(_) => return,
    };
    match result {
        Ok(()) => {
            out.writes_ok += 1;
            let area = &after[..after.len().min(4096)];
            match Header::parse(area, after.len() as u64) {
                Ok((_, None)) => {}
                Ok((_, Some(name))) => out.problem(
                    "collapse left a backing file name in the header",
                    format!("drop_intermediate succeeded; the header still names {name:?}"),
                ),
                Err(err) => out.problem(
                    "collapse wrote a header that does not parse",
                    format!("{:?}: {}", err.kind(), err.message()),
                ),
            }
        }
        Err(err) => {
            out.writes_failed += 1;
            if after != before {
                out.problem(
                    "a collapse that failed changed the image",
                    format!(
                        "drop_intermediate failed ({:?}: {}) after {writes} device writes; \
                         first changed byte {:?}",
                        err.kind(),
                        err.message(),
                        first_difference(&before, &after)
                    ),
                );
            }
        }
    }
}

/// Problems found over many cases, and what the cases did.
struct Findings {
    test: &'static str,
    found: BTreeMap<String, (String, String, u64)>,
    cases: u64,
    opened: u64,
    open_errors: BTreeMap<String, u64>,
    reads: (u64, u64),
    statuses: (u64, u64),
    writes: (u64, u64),
    started: Instant,
}

impl Findings {
    fn new(test: &'static str) -> Self {
        Self {
            test,
            found: BTreeMap::new(),
            cases: 0,
            opened: 0,
            open_errors: BTreeMap::new(),
            reads: (0, 0),
            statuses: (0, 0),
            writes: (0, 0),
            started: Instant::now(),
        }
    }

    fn add(&mut self, label: &str, outcome: &Outcome) {
        self.cases += 1;
        match outcome.open_error {
            None => self.opened += 1,
            Some(err) => {
                *self
                    .open_errors
                    .entry(format!("{:?}: {}", err.kind(), err.message()))
                    .or_default() += 1;
            }
        }
        self.reads.0 += outcome.reads_ok;
        self.reads.1 += outcome.reads_failed;
        self.statuses.0 += outcome.status_ok;
        self.statuses.1 += outcome.status_failed;
        self.writes.0 += outcome.writes_ok;
        self.writes.1 += outcome.writes_failed;
        for p in &outcome.problems {
            self.problem(&p.key, label, &p.detail);
        }
    }

    fn problem(&mut self, key: &str, label: &str, detail: &str) {
        self.found
            .entry(key.to_owned())
            .or_insert_with(|| (label.to_owned(), detail.to_owned(), 0))
            .2 += 1;
    }

    /// Runs `case` on a graph with `N` node slots and records its outcome.
    fn run<const N: usize>(&mut self, watchdog: &Watchdog, case: &Case<'_>) -> Outcome {
        watchdog.case(&case.label);
        let outcome = run_case::<N>(case);
        self.add(&case.label, &outcome);
        outcome
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} cases in {:.1?}: {} opened ({} reads ok, {} failed; {} block_status ok, \
             {} failed; {} write requests ok, {} failed)",
            self.test,
            self.cases,
            self.started.elapsed(),
            self.opened,
            self.reads.0,
            self.reads.1,
            self.statuses.0,
            self.statuses.1,
            self.writes.0,
            self.writes.1
        );
        s.push_str("\n  open errors:");
        for (error, count) in &self.open_errors {
            s.push_str(&format!("\n    {count:>6} × {error}"));
        }
        s
    }

    /// Prints the summary and fails with every problem found.
    fn assert_clean(&self) {
        eprintln!("{}", self.summary());
        if self.found.is_empty() {
            return;
        }
        let mut report = format!("{}: {} distinct problems:\n", self.test, self.found.len());
        for (key, (first_case, detail, count)) in &self.found {
            report.push_str(&format!(
                "- {key}\n    {count} case(s); first: {first_case}\n    {detail}\n"
            ));
        }
        panic!("{report}");
    }
}

/// xorshift64*: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Seeds
// ---------------------------------------------------------------------------

/// What a seed's metadata looks like, read by this test's own small parser.
#[derive(Clone, Debug, Default)]
struct Layout {
    cluster_bits: u32,
    cluster_size: u64,
    size: u64,
    header_length: usize,
    l1_offset: u64,
    l1_size: u64,
    refcount_offset: u64,
    refcount_clusters: u64,
    /// The first refcount block.
    refcount_block: Option<u64>,
    backing: Option<(usize, usize)>,
    /// Header extensions: position of the 8-byte extension header, type, length.
    extensions: Vec<(usize, u32, usize)>,
    /// Position of the end marker, when there is one.
    end_marker: Option<usize>,
    /// L1 entries: position in the file, value.
    l1: Vec<(usize, u64)>,
    /// L2 entries inside the virtual size.
    l2: Vec<L2Entry>,
}

#[derive(Clone, Copy, Debug)]
struct L2Entry {
    /// Position of the entry in the file.
    pos: usize,
    value: u64,
    /// Guest offset of its cluster.
    guest: u64,
    /// Offset of the L2 table holding it.
    table: u64,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unallocated,
    Zero,
    Data(u64),
    Compressed { host: u64, len: u64 },
}

fn be(bytes: &[u8], pos: usize, width: usize) -> u64 {
    let mut word = [0u8; 8];
    word[8 - width..].copy_from_slice(&bytes[pos..pos + width]);
    u64::from_be_bytes(word)
}

/// The first offset where `a` and `b` differ (within the shorter one).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let block = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x[..x.len().min(y.len())] != y[..x.len().min(y.len())])?;
    let (x, y) = (&a[block * 4096..], &b[block * 4096..]);
    x.iter()
        .zip(y)
        .position(|(p, q)| p != q)
        .map(|i| block * 4096 + i)
}

fn put_be(bytes: &mut [u8], pos: usize, width: usize, value: u64) {
    for i in 0..width {
        bytes[pos + i] = (value >> (8 * (width - 1 - i))) as u8;
    }
}

fn be_bytes(width: usize, value: u64) -> Vec<u8> {
    let mut out = vec![0u8; width];
    put_be(&mut out, 0, width, value);
    out
}

/// Bits of the host offset in a compressed L2 entry.
fn compressed_offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

fn layout(bytes: &[u8]) -> Layout {
    let version = be(bytes, 4, 4);
    let cluster_bits = be(bytes, 20, 4) as u32;
    let cs = 1u64 << cluster_bits;
    let mut l = Layout {
        cluster_bits,
        cluster_size: cs,
        size: be(bytes, 24, 8),
        header_length: if version == 2 {
            72
        } else {
            be(bytes, 100, 4) as usize
        },
        l1_offset: be(bytes, 40, 8),
        l1_size: be(bytes, 36, 4),
        refcount_offset: be(bytes, 48, 8),
        refcount_clusters: be(bytes, 56, 4),
        ..Layout::default()
    };
    let block = be(bytes, l.refcount_offset as usize, 8) & !0x1ff;
    if block != 0 && block + cs <= bytes.len() as u64 {
        l.refcount_block = Some(block);
    }
    let backing_offset = be(bytes, 8, 8) as usize;
    if backing_offset != 0 {
        l.backing = Some((backing_offset, be(bytes, 16, 4) as usize));
    }
    let limit = l.backing.map_or(cs.min(4096) as usize, |b| b.0);
    let mut pos = l.header_length;
    while pos + 8 <= limit {
        let (kind, len) = (be(bytes, pos, 4) as u32, be(bytes, pos + 4, 4) as usize);
        if kind == 0 {
            l.end_marker = Some(pos);
            break;
        }
        l.extensions.push((pos, kind, len));
        pos += 8 + len.div_ceil(8) * 8;
    }
    let l2_entries = cs / 8;
    for i in 0..l.l1_size {
        let pos = (l.l1_offset + 8 * i) as usize;
        let entry = be(bytes, pos, 8);
        l.l1.push((pos, entry));
        let table = entry & OFFSET_MASK;
        if table == 0 {
            continue;
        }
        for j in 0..l2_entries {
            let guest = (i * l2_entries + j) * cs;
            if guest >= l.size {
                break;
            }
            let pos = (table + 8 * j) as usize;
            let value = be(bytes, pos, 8);
            let kind = if value & COMPRESSED != 0 {
                let bits = compressed_offset_bits(cluster_bits);
                let host = value & ((1 << bits) - 1);
                let sectors = ((value & !(COPIED | COMPRESSED)) >> bits) + 1;
                Kind::Compressed {
                    host,
                    len: sectors * 512 - (host & 511),
                }
            } else if value & ZERO != 0 {
                Kind::Zero
            } else if value & OFFSET_MASK != 0 {
                Kind::Data(value & OFFSET_MASK)
            } else {
                Kind::Unallocated
            };
            l.l2.push(L2Entry {
                pos,
                value,
                guest,
                table,
                kind,
            });
        }
    }
    l
}

/// A seed image: its bytes, its guest view as `qemu-img convert` sees it, its
/// layout and its backing image, if any.
struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    raw: Vec<u8>,
    layout: Layout,
    backing: Option<(&'static str, Vec<u8>)>,
}

impl Seed {
    /// The images a case over `top` (this seed, mutated) needs.
    fn images<'d>(&'d self, top: &'d [u8]) -> Vec<Img<'d>> {
        let mut images = vec![Img {
            name: self.name.to_owned(),
            bytes: top,
            id: Some(1),
        }];
        if let Some((name, bytes)) = &self.backing {
            images.push(Img {
                name: (*name).to_owned(),
                bytes,
                id: Some(2),
            });
        }
        images
    }

    fn case<'d>(&'d self, label: String, top: &'d [u8], options: OpenOptions) -> Case<'d> {
        let images = self.images(top);
        Case {
            label,
            opens: images.len() + 1,
            images,
            top: self.name.to_owned(),
            options,
            reads: Reads::Whole,
            expect: None,
            writes: false,
            collapse: false,
        }
    }

    fn entries(&self, pick: impl Fn(&Kind) -> bool) -> impl Iterator<Item = &L2Entry> {
        self.layout.l2.iter().filter(move |e| pick(&e.kind))
    }
}

struct Seeds {
    all: Vec<Seed>,
    /// The base of the `overlay` seed and its name.
    base: (&'static str, Vec<u8>),
}

impl Seeds {
    fn get(&self, name: &str) -> &Seed {
        self.all
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
    }
}

/// Guest data for the compressed seeds, `clusters` clusters of `cs` bytes:
/// text, zeros, incompressible noise, low-entropy noise, half text, a fill.
fn compressible_data(clusters: usize, cs: usize) -> Vec<u8> {
    let mut rng = Rng(0x5eed_0000_0000_0001);
    let mut data = Vec::with_capacity(clusters * cs);
    for c in 0..clusters {
        let start = data.len();
        match c % 6 {
            0 => {
                while data.len() < start + cs {
                    data.extend_from_slice(format!("hostile line {c} {}\n", data.len()).as_bytes());
                }
                data.truncate(start + cs);
            }
            1 => data.resize(start + cs, 0),
            2 => data.extend((0..cs).map(|_| rng.next() as u8)),
            3 => data.extend((0..cs).map(|_| b'a' + (rng.next() % 4) as u8)),
            4 => {
                data.extend((0..cs / 2).map(|i| b"qcow2 "[i % 6]));
                data.resize(start + cs, 0);
            }
            _ => data.resize(start + cs, 0xab),
        }
    }
    data
}

fn make_seeds() -> Seeds {
    let tmp = tmpdir("bg-hostile-");
    let d = tmp.path();
    let k = |n: u64| (n * 1024).to_string();

    // (a) v3, 64 KiB clusters: data at several offsets (one write crossing a
    // cluster boundary), a zero cluster keeping its allocation, zero clusters
    // without one, data in the last sector.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "v3-64k.qcow2",
            "4M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "v3-64k.qcow2",
        &[
            format!("write -P 0x11 0 {}", k(64)),
            format!("write -P 0x22 {} {}", k(1024), k(4)),
            format!("write -P 0x33 {} {}", k(3 * 1024 + 40), k(64)),
            format!("write -P 0x12 {} {}", k(2048), k(128)),
            format!("write -z {} {}", k(2048), k(64)),
            format!("write -z -u {} {}", k(2112), k(64)),
            format!("write -z {} {}", k(2496), k(64)),
            format!("write -P 0x44 {} 512", 4 * 1024 * 1024 - 512),
        ],
    );

    // (b) v2 (compat=0.10), 512-byte clusters: many L2 tables.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=512",
            "v2-512.qcow2",
            "1M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "v2-512.qcow2",
        &[
            "write -P 0x55 0 1536".to_owned(),
            "write -P 0x56 40000 5000".to_owned(),
            "write -P 0x66 102400 700".to_owned(),
            format!("write -P 0x77 {} 1024", 1024 * 1024 - 1024),
        ],
    );

    // (c) compressed, 64 KiB and 512-byte clusters.
    fs::write(d.join("comp-64k.raw"), compressible_data(16, 65536)).expect("write raw data");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "comp-64k.raw",
            "comp-64k.qcow2",
        ],
    );
    fs::write(d.join("comp-512.raw"), compressible_data(128, 512)).expect("write raw data");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "comp-512.raw",
            "comp-512.qcow2",
        ],
    );

    // (d) overlays: over a qcow2 base and over a raw base.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "base.qcow2",
            "2M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &[
            format!("write -P 0xa1 0 {}", k(128)),
            format!("write -P 0xa2 {} {}", k(1024), k(64)),
            format!("write -P 0xa3 {} {}", k(1984), k(64)),
        ],
    );
    for (name, backing, format) in [
        ("overlay.qcow2", "base.qcow2", "qcow2"),
        ("overlay-raw.qcow2", "base.raw", "raw"),
    ] {
        if format == "raw" {
            qemu_img(d, &["convert", "-O", "raw", "base.qcow2", "base.raw"]);
        }
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "-b",
                backing,
                "-F",
                format,
                name,
            ],
        );
        qemu_io(
            d,
            "qcow2",
            name,
            &[
                format!("write -P 0xb1 {} 4096", k(64)),
                format!("write -z {} {}", k(1024), k(64)),
                format!("write -P 0xb2 {} {}", k(1536), k(64)),
            ],
        );
    }

    let read = |name: &str| fs::read(d.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
    let mut all = Vec::new();
    for (name, backing) in [
        ("v3-64k.qcow2", None),
        ("v2-512.qcow2", None),
        ("comp-64k.qcow2", None),
        ("comp-512.qcow2", None),
        ("overlay.qcow2", Some("base.qcow2")),
        ("overlay-raw.qcow2", Some("base.raw")),
    ] {
        let raw_name = format!("{name}.view");
        qemu_img(d, &["convert", "-O", "raw", name, &raw_name]);
        let bytes = read(name);
        all.push(Seed {
            name,
            layout: layout(&bytes),
            raw: read(&raw_name),
            bytes,
            backing: backing.map(|b| (b, read(b))),
        });
    }
    let seeds = Seeds {
        base: ("base.qcow2", read("base.qcow2")),
        all,
    };
    // The seeds must contain what the mutations aim at.
    let has = |seed: &str, pick: fn(&Kind) -> bool| seeds.get(seed).entries(pick).count() > 0;
    assert!(has("v3-64k.qcow2", |k| matches!(k, Kind::Data(_))));
    assert!(has("v3-64k.qcow2", |k| *k == Kind::Zero));
    assert!(has("comp-64k.qcow2", |k| matches!(
        k,
        Kind::Compressed { .. }
    )));
    assert!(has("comp-512.qcow2", |k| matches!(
        k,
        Kind::Compressed { .. }
    )));
    assert!(seeds.get("overlay.qcow2").layout.backing.is_some());
    seeds
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(make_seeds)
}

// ---------------------------------------------------------------------------
// 3. Mutations
// ---------------------------------------------------------------------------

/// Bytes to write at positions inside a file.
type Patches = Vec<(usize, Vec<u8>)>;

/// A change to a seed's bytes.
enum Change {
    /// Overwrite bytes at these positions (inside the file).
    Patch(Patches),
    /// Keep only the first bytes.
    Truncate(usize),
}

struct Mutant {
    label: String,
    change: Change,
}

impl Mutant {
    fn patch(label: String, pos: usize, data: Vec<u8>) -> Self {
        Self {
            label,
            change: Change::Patch(vec![(pos, data)]),
        }
    }

    fn word(label: String, pos: usize, value: u64) -> Self {
        Self::patch(label, pos, value.to_be_bytes().to_vec())
    }
}

/// Applies each mutant to `seed` in turn and runs it with each of `options`.
fn run_mutants(
    findings: &mut Findings,
    watchdog: &Watchdog,
    seed: &Seed,
    mutants: &[Mutant],
    options: &[OpenOptions],
) {
    let mut work = seed.bytes.clone();
    for m in mutants {
        let bytes: &[u8] = match &m.change {
            Change::Patch(patches) => {
                for (pos, data) in patches {
                    work[*pos..*pos + data.len()].copy_from_slice(data);
                }
                &work
            }
            Change::Truncate(len) => &seed.bytes[..*len],
        };
        for (i, &opts) in options.iter().enumerate() {
            let label = format!("{}: {}{}", seed.name, m.label, mode_label(i));
            findings.run::<64>(watchdog, &seed.case(label, bytes, opts));
        }
        if let Change::Patch(patches) = &m.change {
            for (pos, data) in patches {
                work[*pos..*pos + data.len()].copy_from_slice(&seed.bytes[*pos..*pos + data.len()]);
            }
        }
    }
}

fn mode_label(i: usize) -> &'static str {
    match i {
        0 => "",
        _ => " [opened read-write, raw backing assumed]",
    }
}

const READ_ONLY: OpenOptions = OpenOptions {
    format: None,
    read_only: true,
    writable_devices: false,
    assume_raw_backing: false,
    force_share: false,
    no_backing: false,
    check_tables: false,
};

const READ_WRITE: OpenOptions = OpenOptions {
    format: None,
    read_only: false,
    writable_devices: true,
    assume_raw_backing: true,
    force_share: false,
    no_backing: false,
    check_tables: false,
};

/// Header fields: name, offset, width in bytes.
const FIELDS: &[(&str, usize, usize)] = &[
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
];

/// Every header field set to boundary values; feature fields get every bit.
fn header_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let mut out = Vec::new();
    for &(name, pos, width) in FIELDS {
        let orig = be(&seed.bytes, pos, width);
        let mut values: Vec<u64> = match width {
            1 => vec![0, 1, 2, 0x7f, 0x80, 0xff],
            4 => vec![
                0,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                12,
                16,
                20,
                21,
                22,
                31,
                32,
                63,
                64,
                65,
                72,
                100,
                103,
                104,
                105,
                111,
                112,
                120,
                511,
                512,
                513,
                1023,
                1024,
                4095,
                4096,
                4097,
                cs - 1,
                cs,
                cs + 1,
                len,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_fffe,
                0xffff_ffff,
            ],
            _ => vec![
                0,
                1,
                7,
                8,
                72,
                104,
                511,
                512,
                513,
                cs - 1,
                cs,
                cs + 1,
                2 * cs,
                len - 8,
                len - 1,
                len,
                eof,
                eof + cs,
                1 << 32,
                1 << 40,
                1 << 55,
                (1 << 56) - cs,
                1 << 56,
                1 << 61,
                (1 << 61) + 1,
                1 << 62,
                1 << 63,
                i64::MAX as u64,
                u64::MAX - cs + 1,
                u64::MAX,
            ],
        };
        values.extend([
            orig.wrapping_add(1),
            orig.wrapping_sub(1),
            orig.wrapping_add(cs),
            orig.wrapping_mul(2),
            orig.wrapping_add(512),
        ]);
        if name.ends_with("_features") {
            for bit in 0..64 {
                values.extend([1 << bit, orig | (1 << bit)]);
            }
        }
        let mask = if width == 8 {
            u64::MAX
        } else {
            (1 << (8 * width)) - 1
        };
        let mut seen = Vec::new();
        for v in values.into_iter().map(|v| v & mask) {
            if v == orig || seen.contains(&v) {
                continue;
            }
            seen.push(v);
            out.push(Mutant::patch(
                format!("header {name} = {v:#x} (was {orig:#x})"),
                pos,
                be_bytes(width, v),
            ));
        }
    }
    // Combinations that pass the single-field checks.
    let l2_bytes = (cs / 8) * cs;
    let field = |pos: usize, width: usize, v: u64| (pos, be_bytes(width, v));
    let mut combos: Vec<(String, Patches)> = vec![
        (
            "size = what the L1 table covers".into(),
            vec![field(24, 8, l.l1_size * l2_bytes)],
        ),
        (
            "size = 2^61 with l1_size too small".into(),
            vec![field(24, 8, 1 << 61)],
        ),
        (
            "zstd compression (incompatible bit 3, type 1)".into(),
            vec![field(72, 8, 1 << 3), field(104, 1, 1)],
        ),
        (
            "incompatible bit 3 with type zlib and header_length 104".into(),
            vec![field(72, 8, 1 << 3), field(100, 4, 104)],
        ),
        ("dirty and corrupt bits".into(), vec![field(72, 8, 3)]),
        (
            "l1_table_offset = refcount table, l1_size = its entries".into(),
            vec![
                field(40, 8, l.refcount_offset),
                field(36, 4, (cs / 8).min(l.l1_size.max(1))),
            ],
        ),
        (
            "L1 table ends exactly at EOF".into(),
            vec![field(40, 8, (len / cs - 1) * cs), field(36, 4, cs / 8)],
        ),
        (
            "L1 table one entry past EOF".into(),
            vec![field(40, 8, (len / cs - 1) * cs), field(36, 4, cs / 8 + 1)],
        ),
        (
            "cluster_bits 9 with the 64 KiB layout".into(),
            vec![field(20, 4, 9)],
        ),
        (
            "cluster_bits 21 with the original layout".into(),
            vec![field(20, 4, 21)],
        ),
    ];
    // The backing name: every range that passes the bounds checks but holds
    // the wrong bytes, and names that are not UTF-8.
    let hl = l.header_length as u64;
    for (off, size) in [
        (hl, 8),
        (hl, 1023),
        (72, 1),
        (cs - 1, 1),
        (cs.saturating_sub(1023), 1023),
        (l.header_length.div_ceil(8) as u64 * 8, 16),
    ] {
        if off >= hl && off + size <= cs && off + size <= len {
            combos.push((
                format!("backing name at {off}, {size} bytes"),
                vec![field(8, 8, off), field(16, 4, size)],
            ));
        }
    }
    if let Some((off, size)) = l.backing {
        combos.push((
            "backing name not UTF-8".into(),
            vec![(off, vec![0xff; size])],
        ));
        combos.push((
            "backing name with NUL and slash".into(),
            vec![(off, b"/\0".repeat(size / 2 + 1)[..size].to_vec())],
        ));
        combos.push((
            "backing name = the image's own name".into(),
            vec![
                (off, seed.name.as_bytes().to_vec()),
                field(16, 4, seed.name.len() as u64),
            ],
        ));
    }
    out.extend(combos.into_iter().map(|(label, patches)| Mutant {
        label: format!("header {label}"),
        change: Change::Patch(patches),
    }));
    out
}

/// Header extensions with corrupted types and lengths, the end marker lost,
/// and extensions added where the end marker was.
fn extension_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let cs = l.cluster_size as usize;
    let limit = l.backing.map_or(cs.min(4096), |b| b.0);
    let mut out = Vec::new();
    let mut headers: Vec<(usize, u32, usize)> = l.extensions.clone();
    if let Some(end) = l.end_marker {
        headers.push((end, 0, 0));
    }
    for &(pos, kind, len) in &headers {
        for t in [
            0,
            1,
            EXT_BACKING_FORMAT,
            EXT_FEATURE_TABLE,
            0x2385_2875,
            0x4441_5441,
            0x0537_be77,
            u32::MAX,
        ] {
            if t != kind {
                out.push(Mutant::patch(
                    format!("extension at {pos}: type {kind:#x} -> {t:#x}"),
                    pos,
                    t.to_be_bytes().to_vec(),
                ));
            }
        }
        let room = |end: usize| end.saturating_sub(pos + 8) as u64;
        for v in [
            0,
            1,
            3,
            7,
            8,
            9,
            16,
            room(limit),
            room(limit) + 1,
            room(limit) + 8,
            room(cs),
            room(cs) + 1,
            room(4096),
            room(4096) + 1,
            room(4096 + 8),
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fff8,
            0xffff_ffff,
            len as u64 + 8,
            len as u64 * 2,
        ] {
            let v = v & 0xffff_ffff;
            if v != len as u64 {
                out.push(Mutant::patch(
                    format!("extension at {pos} (type {kind:#x}): length {len} -> {v:#x}"),
                    pos + 4,
                    be_bytes(4, v),
                ));
            }
        }
        if kind == EXT_BACKING_FORMAT {
            for (what, name) in [
                ("empty", &b""[..]),
                ("raw", b"raw"),
                ("vmdk", b"vmdk"),
                ("16 bytes", b"qcow2qcow2qcow2q"),
                ("17 bytes", b"qcow2qcow2qcow2qc"),
                ("not UTF-8", b"\xff\xfeq"),
            ] {
                if 8 + name.len().div_ceil(8) * 8 <= limit - pos {
                    let mut data = EXT_BACKING_FORMAT.to_be_bytes().to_vec();
                    data.extend(be_bytes(4, name.len() as u64));
                    data.extend_from_slice(name);
                    data.resize(8 + name.len().div_ceil(8) * 8, 0);
                    out.push(Mutant::patch(
                        format!("backing format extension: {what}"),
                        pos,
                        data,
                    ));
                }
            }
        }
    }
    // Extensions written where the end marker was, up to the limit.
    if let Some(end) = l.end_marker {
        let fill = |unit: &[u8], label: &str, out: &mut Vec<Mutant>| {
            let mut data = Vec::new();
            while end + data.len() + unit.len() <= limit {
                data.extend_from_slice(unit);
            }
            out.push(Mutant::patch(
                format!("extensions from {end} to {limit}: {label}"),
                end,
                data,
            ));
        };
        fill(
            &[0, 0, 0, 1, 0, 0, 0, 0],
            "empty unknown extensions, no end",
            &mut out,
        );
        fill(
            &[
                0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3, b'r', b'a', b'w', 0, 0, 0, 0, 0,
            ],
            "repeated backing format extensions",
            &mut out,
        );
        fill(&[0xff; 8], "0xff bytes", &mut out);
    }
    out
}

/// L1 and L2 entries overwritten with hostile values.
fn table_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let last_cluster = (len - 1) / cs * cs;
    let data_hosts: Vec<u64> = seed
        .entries(|k| matches!(k, Kind::Data(_)))
        .filter_map(|e| match e.kind {
            Kind::Data(h) => Some(h),
            _ => None,
        })
        .collect();
    let comp: Vec<(u64, u64)> = seed
        .layout
        .l2
        .iter()
        .filter_map(|e| match e.kind {
            Kind::Compressed { host, len } => Some((host, len)),
            _ => None,
        })
        .collect();
    let some_data = data_hosts.first().copied().unwrap_or(l.l1_offset);
    let some_table = l.l2.first().map_or(l.l1_offset, |e| e.table);
    let mut out = Vec::new();

    // L1: the first allocated entry, the last entry, an unallocated one.
    let mut l1_targets: Vec<(usize, u64)> = Vec::new();
    l1_targets.extend(l.l1.iter().find(|e| e.1 != 0));
    l1_targets.extend(l.l1.last());
    l1_targets.extend(l.l1.iter().find(|e| e.1 == 0));
    l1_targets.dedup();
    for (pos, orig) in l1_targets {
        let values = [
            orig ^ COPIED,
            COPIED,
            eof,
            eof | COPIED,
            (eof + cs) | COPIED,
            eof + (1 << 40),
            OFFSET_MASK & !(cs - 1),
            OFFSET_MASK,
            u64::MAX,
            orig + 512,
            orig + cs / 2,
            orig + 8,
            orig | 1,
            orig | 0x100,
            orig | (1 << 56),
            orig | (1 << 62),
            l.l1_offset | COPIED,
            l.refcount_offset | COPIED,
            cs | COPIED,
            some_data | COPIED,
            last_cluster | COPIED,
            some_table | COPIED,
            comp.first().map_or(cs, |c| c.0 / cs * cs) | COPIED,
        ];
        for v in values {
            if v != orig {
                out.push(Mutant::word(
                    format!("L1 entry at {pos}: {orig:#x} -> {v:#x}"),
                    pos,
                    v,
                ));
            }
        }
    }

    // L2: first and last data, zero, compressed, an unallocated entry, the
    // last entry inside the virtual size.
    let mut targets: Vec<L2Entry> = Vec::new();
    let kinds: [fn(&Kind) -> bool; 4] = [
        |k| matches!(k, Kind::Data(_)),
        |k| *k == Kind::Zero,
        |k| matches!(k, Kind::Compressed { .. }),
        |k| *k == Kind::Unallocated,
    ];
    for pick in kinds {
        targets.extend(seed.entries(pick).next());
        targets.extend(seed.entries(pick).last());
    }
    targets.extend(l.l2.last());
    targets.sort_by_key(|e| e.pos);
    targets.dedup_by_key(|e| e.pos);

    let bits = compressed_offset_bits(l.cluster_bits);
    let max_sectors = (1u64 << (62 - bits)) - 1;
    let compressed = |host: u64, sectors: u64| {
        COMPRESSED | ((sectors & max_sectors) << bits) | (host & ((1 << bits) - 1))
    };
    let (comp_host, _) = comp.first().copied().unwrap_or((some_data, cs));
    for e in targets {
        let orig = e.value;
        let host = orig & OFFSET_MASK;
        let mut values = vec![
            eof | COPIED,
            (eof + cs) | COPIED,
            (OFFSET_MASK & !(cs - 1)) | COPIED,
            u64::MAX,
            COPIED,
            COPIED | ZERO,
            ZERO,
            ZERO | eof,
            ZERO | (some_data + 512),
            2,
            0x100 | some_data,
            some_data | 2,
            some_data | 0x1fe,
            some_data | (1 << 56),
            some_data | (0x3f << 56),
            some_data + 512,
            some_data + cs / 2,
            l.l1_offset | COPIED,
            e.table | COPIED,
            l.refcount_offset | COPIED,
            last_cluster | COPIED,
            orig ^ COPIED,
            orig | (1 << 56),
            // Compressed entries.
            compressed(comp_host, max_sectors),
            compressed(comp_host, 0),
            compressed(comp_host + 1, max_sectors),
            compressed(comp_host.saturating_sub(1), 1),
            compressed(comp_host + 4096, max_sectors),
            compressed(len, 0),
            compressed(len - 1, 0),
            compressed(len - 1, max_sectors),
            compressed(len - 8, max_sectors),
            compressed(0, 0),
            compressed(0, max_sectors),
            compressed(e.table, max_sectors),
            compressed(l.l1_offset, 0),
            compressed(some_data, max_sectors),
            compressed(u64::MAX, max_sectors),
            compressed(u64::MAX, 0),
            COMPRESSED,
            COMPRESSED | COPIED,
            COMPRESSED | COPIED | u64::from(u32::MAX),
        ];
        if host != 0 {
            values.extend([orig + 1, orig + 2, orig + 512, orig + cs / 2, orig - 512]);
        }
        if let Kind::Compressed { host, .. } = e.kind {
            values.extend([
                orig ^ (1 << bits),
                orig + 1,
                orig - 1,
                orig | COPIED,
                compressed(host, max_sectors),
                compressed(host, 0),
            ]);
            values.extend(
                comp.iter()
                    .map(|&(other, len)| compressed(other, len / 512)),
            );
        }
        let mut seen = Vec::new();
        for v in values {
            if v != orig && !seen.contains(&v) {
                seen.push(v);
                out.push(Mutant::word(
                    format!(
                        "L2 entry at {} (guest {}, {:?}): {orig:#x} -> {v:#x}",
                        e.pos, e.guest, e.kind
                    ),
                    e.pos,
                    v,
                ));
            }
        }
    }

    // A whole L2 table overwritten: every entry one hostile value.
    if let Some(first) = l.l2.first() {
        let entries = l.l2.iter().filter(|e| e.table == first.table).count();
        for (what, v) in [
            ("past EOF", eof | COPIED),
            ("compressed, max sectors, at 0", compressed(0, max_sectors)),
            ("all the same data cluster", some_data | COPIED),
            ("all ones", u64::MAX),
        ] {
            out.push(Mutant::patch(
                format!("whole L2 table at {}: {what}", first.table),
                first.table as usize,
                v.to_be_bytes().repeat(entries),
            ));
        }
    }
    out
}

/// Compressed payloads: deterministic damage to each compressed cluster, and
/// a stored deflate block inflating to more than a cluster.
fn payload_mutants(seed: &Seed) -> Vec<Mutant> {
    let len = seed.bytes.len();
    let cs = seed.layout.cluster_size as usize;
    let bits = compressed_offset_bits(seed.layout.cluster_bits);
    let max_sectors = (1u64 << (62 - bits)) - 1;
    let mut out = Vec::new();
    let entries: Vec<L2Entry> = seed
        .entries(|k| matches!(k, Kind::Compressed { .. }))
        .copied()
        .collect();
    for e in &entries {
        let Kind::Compressed { host, len: clen } = e.kind else {
            continue;
        };
        let (h, n) = (host as usize, (clen as usize).min(len - host as usize));
        let at = |what: &str, pos: usize, data: Vec<u8>| {
            Mutant::patch(
                format!("compressed cluster at guest {}: {what}", e.guest),
                pos,
                data,
            )
        };
        out.extend([
            at("first byte 0x00", h, vec![0]),
            at("first byte 0x01 (final stored block)", h, vec![0x01]),
            at("first byte 0x03", h, vec![0x03]),
            at("first byte 0x07 (reserved block type)", h, vec![0x07]),
            at("first byte 0xff", h, vec![0xff]),
            at("first 16 bytes zero", h, vec![0; 16.min(n)]),
            at("payload all 0xff", h, vec![0xff; n]),
            at("payload all zero", h, vec![0; n]),
            at("last byte flipped", h + n - 1, vec![!seed.bytes[h + n - 1]]),
            at(
                "middle byte flipped",
                h + n / 2,
                vec![seed.bytes[h + n / 2] ^ 0x5a],
            ),
            at(
                "stored block LEN 0xffff",
                h,
                vec![0x01, 0xff, 0xff, 0x00, 0x00],
            ),
            at(
                "stored block LEN/NLEN mismatch",
                h,
                vec![0x01, 0x10, 0x00, 0x10, 0x00],
            ),
        ]);
    }
    // Stored deflate blocks of more than a cluster, with the sector count of
    // the entry raised to cover them: more output than a cluster.
    if let Some(e) = entries.first() {
        let Kind::Compressed { host, .. } = e.kind else {
            unreachable!()
        };
        let total = cs + 100;
        let mut stream = Vec::new();
        let mut left = total;
        while left > 0 {
            let n = left.min(0xffff);
            left -= n;
            stream.push(u8::from(left == 0));
            stream.extend((n as u16).to_le_bytes());
            stream.extend((!(n as u16)).to_le_bytes());
            stream.extend((0..n).map(|i| (i % 251) as u8));
        }
        let sectors = ((host % 512) as usize + stream.len()).div_ceil(512) as u64;
        if host as usize + stream.len() <= len && sectors <= max_sectors + 1 {
            let entry = COMPRESSED | ((sectors - 1) << bits) | host;
            out.push(Mutant {
                label: format!(
                    "compressed cluster at guest {}: stored stream of {total} bytes",
                    e.guest
                ),
                change: Change::Patch(vec![
                    (host as usize, stream),
                    (e.pos, entry.to_be_bytes().to_vec()),
                ]),
            });
        }
    }
    out
}

/// Refcount structures damaged: the first table entry moved, blocks zeroed
/// or full, the refcounts of metadata clusters cleared, every table entry on
/// one full block, other refcount widths over the same bytes.
fn refcount_mutants(seed: &Seed) -> Vec<Mutant> {
    let l = &seed.layout;
    let (cs, len) = (l.cluster_size, seed.bytes.len() as u64);
    let eof = len.next_multiple_of(cs);
    let rt = l.refcount_offset as usize;
    let Some(block) = l.refcount_block else {
        return Vec::new();
    };
    let some_table = l.l2.first().map_or(l.l1_offset, |e| e.table);
    let some_data = seed
        .entries(|k| matches!(k, Kind::Data(_)))
        .find_map(|e| match e.kind {
            Kind::Data(h) => Some(h),
            _ => None,
        })
        .unwrap_or(l.l1_offset);
    let mut out = Vec::new();
    for v in [
        0,
        1,
        block + 1,
        block + 512,
        eof,
        eof + cs,
        OFFSET_MASK,
        u64::MAX,
        l.l1_offset,
        cs,
        some_table,
        some_data,
        block | COPIED,
        l.refcount_offset,
    ] {
        if v != block {
            out.push(Mutant::word(
                format!("refcount table entry 0: {block:#x} -> {v:#x}"),
                rt,
                v,
            ));
        }
    }
    let table_entries = (l.refcount_clusters * cs / 8) as usize;
    if table_entries > 1 {
        for v in [block, eof, l.l1_offset] {
            out.push(Mutant::word(
                format!("refcount table entry 1 -> {v:#x}"),
                rt + 8,
                v,
            ));
        }
    }
    let b = block as usize;
    let n = cs as usize;
    out.extend([
        Mutant::patch("refcount block zeroed".into(), b, vec![0; n]),
        Mutant::patch("refcount block all 0xff".into(), b, vec![0xff; n]),
        Mutant::patch("refcount block: first 64 bytes zero".into(), b, vec![0; 64]),
    ]);
    // 16-bit refcounts (QEMU's default): clear the count of one cluster.
    let version = be(&seed.bytes, 4, 4);
    let order = if version == 2 {
        4
    } else {
        be(&seed.bytes, 96, 4)
    };
    if order == 4 {
        for (what, offset) in [
            ("header", 0),
            ("refcount table", l.refcount_offset),
            ("refcount block", block),
            ("L1 table", l.l1_offset),
            ("an L2 table", some_table),
            ("a data cluster", some_data),
        ] {
            let cluster = (offset / cs) as usize;
            if 2 * cluster + 2 <= n {
                out.push(Mutant::patch(
                    format!("refcount of the {what} cluster set to 0"),
                    b + 2 * cluster,
                    vec![0, 0],
                ));
            }
        }
    }
    let entries = table_entries.min(n / 8);
    out.push(Mutant {
        label: format!("all {entries} refcount table entries -> the first block"),
        change: Change::Patch(vec![(rt, block.to_be_bytes().repeat(entries))]),
    });
    out.push(Mutant {
        label: format!("all {entries} refcount table entries -> the first block, all 0xff"),
        change: Change::Patch(vec![
            (rt, block.to_be_bytes().repeat(entries)),
            (b, vec![0xff; n]),
        ]),
    });
    if version == 3 {
        for order in (0..=6).filter(|&o| o != 4) {
            out.push(Mutant::patch(
                format!("refcount_order {order} over 16-bit refcount blocks"),
                96,
                be_bytes(4, order),
            ));
        }
    }
    out
}

/// File lengths to truncate at.
fn truncation_lengths(seed: &Seed) -> Vec<usize> {
    let l = &seed.layout;
    let cs = l.cluster_size as usize;
    let len = seed.bytes.len();
    let mut at = vec![
        0,
        1,
        3,
        4,
        8,
        71,
        72,
        73,
        103,
        104,
        105,
        111,
        112,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        cs - 1,
        cs,
        cs + 1,
        len - 1,
        len - 512,
        len.saturating_sub(cs),
    ];
    let step = (len / cs / 48).max(1) * cs;
    at.extend((0..len).step_by(step));
    let l1 = l.l1_offset as usize;
    at.extend([l1, l1 + 4, l1 + 8, l1 + 8 * l.l1_size as usize - 1]);
    if let Some((off, size)) = l.backing {
        at.extend([off, off + size / 2, off + size - 1]);
    }
    let mut tables: Vec<u64> = l.l2.iter().map(|e| e.table).collect();
    tables.dedup();
    for t in tables.into_iter().take(4) {
        let t = t as usize;
        at.extend([t, t + 8, t + cs / 2, t + cs - 1]);
    }
    for e in l.l2.iter().take(512) {
        match e.kind {
            Kind::Data(h) => {
                let h = h as usize;
                at.extend([h, h + 1, h + cs / 2, h + cs - 1]);
            }
            Kind::Compressed { host, len } => {
                let (h, n) = (host as usize, len as usize);
                at.extend([h, h + 1, h + n / 2, h + n - 1]);
            }
            _ => {}
        }
    }
    at.sort_unstable();
    at.dedup();
    at.retain(|&n| n < len);
    at
}

/// Positions the fuzzer favours: the header area, the L1 table, the L2
/// entries in use and compressed payloads.
fn fuzz_regions(seed: &Seed) -> Vec<(usize, usize)> {
    let l = &seed.layout;
    let len = seed.bytes.len();
    let mut regions = vec![
        (0, (l.cluster_size as usize).min(4096).min(len)),
        (l.l1_offset as usize, 8 * l.l1_size as usize),
        (0, len.min(128 * 1024)),
    ];
    let mut tables: Vec<u64> = l.l2.iter().map(|e| e.table).collect();
    tables.dedup();
    for t in tables {
        let used = l.l2.iter().filter(|e| e.table == t).count();
        regions.push((t as usize, 8 * used));
    }
    regions.push((l.refcount_offset as usize, 64));
    if let Some(block) = l.refcount_block {
        regions.push((block as usize, 512));
    }
    for e in &l.l2 {
        if let Kind::Compressed { host, len: n } = e.kind {
            regions.push((host as usize, (n as usize).min(len - host as usize)));
        }
    }
    regions.retain(|&(start, n)| n > 0 && start + n <= len);
    regions
}

/// One fuzz mutation: 1 to 8 changes, each a byte xor, a byte set to 0x00 or
/// 0xff, or an aligned 8-byte word replaced by a value tables care about.
fn fuzz_mutant(seed: &Seed, regions: &[(usize, usize)], rng: &mut Rng, i: u64) -> Mutant {
    let len = seed.bytes.len();
    let cs = seed.layout.cluster_size;
    let mut patches = Vec::new();
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let (start, n) = regions[rng.below(regions.len() as u64) as usize];
        let pos = start + rng.below(n as u64) as usize;
        match rng.below(8) {
            0..=4 => {
                let x = (rng.below(255) + 1) as u8;
                patches.push((pos, vec![seed.bytes[pos] ^ x]));
                what.push(format!("{pos}^{x:#x}"));
            }
            5 => {
                let v = if rng.below(2) == 0 { 0 } else { 0xff };
                patches.push((pos, vec![v]));
                what.push(format!("{pos}={v:#x}"));
            }
            _ => {
                let pos = (pos & !7).min(len - 8);
                let old = be(&seed.bytes, pos, 8);
                let v = match rng.below(10) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => COPIED,
                    3 => COMPRESSED | rng.next() >> 2,
                    4 => (len as u64).next_multiple_of(cs) | COPIED,
                    5 => rng.next(),
                    6 => old ^ (1 << rng.below(64)),
                    7 => old.wrapping_add(cs),
                    8 => old.wrapping_add(1),
                    _ => (rng.below(len as u64) & !(cs - 1)) | COPIED,
                };
                patches.push((pos, v.to_be_bytes().to_vec()));
                what.push(format!("{pos}:={v:#x}"));
            }
        }
    }
    Mutant {
        label: format!("fuzz #{i}: {}", what.join(" ")),
        change: Change::Patch(patches),
    }
}

/// `bytes` with its backing name replaced by `name` (which must fit in
/// cluster 0 where the old one was).
fn with_backing_name(bytes: &[u8], name: &str) -> Vec<u8> {
    let l = layout(bytes);
    let (off, old) = l.backing.expect("image has a backing name");
    let mut out = bytes.to_vec();
    out[off..off + old].fill(0);
    out[off..off + name.len()].copy_from_slice(name.as_bytes());
    put_be(&mut out, 16, 4, name.len() as u64);
    out
}

// ---------------------------------------------------------------------------
// 4. Tests, in-process
// ---------------------------------------------------------------------------

/// The harness reports a panic with its message and location.
#[test]
fn harness_catches_panics() {
    let empty: Vec<u8> = Vec::new();
    let (message, location) =
        catch(|| empty[std::hint::black_box(3)]).expect_err("the closure panics");
    assert!(message.contains("index out of bounds"), "{message}");
    assert!(location.contains("hostile.rs"), "{location}");
    assert_eq!(first_difference(b"abcd", b"abxd"), Some(2));
    assert_eq!(first_difference(b"ab", b"abcd"), None);
}

/// The harness itself: every seed opens, reads exactly `qemu-img convert`'s
/// view and writes nothing. Without this the other tests could pass vacuously.
#[test]
fn seeds_read_like_qemu() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("seeds_read_like_qemu");
        let mut findings = Findings::new("seeds_read_like_qemu");
        for seed in &seeds.all {
            for opts in [READ_ONLY, READ_WRITE] {
                let mut case = seed.case(format!("{} unmodified", seed.name), &seed.bytes, opts);
                case.expect = Some(&seed.raw);
                let outcome = findings.run::<64>(&watchdog, &case);
                assert!(
                    outcome.open_error.is_none() && outcome.reads_failed == 0,
                    "{}: {:?}",
                    seed.name,
                    outcome.open_error
                );
            }
        }
        findings.assert_clean();
    });
}

#[test]
fn header_fields_at_boundaries() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("header_fields_at_boundaries");
        let mut findings = Findings::new("header_fields_at_boundaries");
        for seed in &seeds.all {
            let mutants = header_mutants(seed);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &mutants,
                &[READ_ONLY, READ_WRITE],
            );
        }
        assert!(findings.opened > 0 && findings.open_errors.len() > 10);
        findings.assert_clean();
    });
}

#[test]
fn header_extensions_corrupted() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("header_extensions_corrupted");
        let mut findings = Findings::new("header_extensions_corrupted");
        for seed in &seeds.all {
            let mutants = extension_mutants(seed);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &mutants,
                &[READ_ONLY, READ_WRITE],
            );
        }
        assert!(findings.cases > 100);
        findings.assert_clean();
    });
}

/// Overlays with hostile headers and extensions that still open: dropping
/// their backing file rewrites cluster 0, which must work or change nothing.
#[test]
fn collapse_of_hostile_headers() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("collapse_of_hostile_headers");
        let mut findings = Findings::new("collapse_of_hostile_headers");
        let options = OpenOptions {
            writable_devices: true,
            ..READ_ONLY
        };
        for name in ["overlay.qcow2", "overlay-raw.qcow2"] {
            let seed = seeds.get(name);
            let mut mutants = header_mutants(seed);
            mutants.extend(extension_mutants(seed));
            mutants.push(Mutant {
                label: "unmodified".into(),
                change: Change::Patch(Vec::new()),
            });
            let mut work = seed.bytes.clone();
            for m in &mutants {
                let Change::Patch(patches) = &m.change else {
                    continue;
                };
                for (pos, data) in patches {
                    work[*pos..*pos + data.len()].copy_from_slice(data);
                }
                let label = format!("{name}: {} [collapse]", m.label);
                let mut case = seed.case(label, &work, options);
                case.collapse = true;
                case.reads = Reads::Ranges(Vec::new());
                findings.run::<64>(&watchdog, &case);
                work.copy_from_slice(&seed.bytes);
            }
        }
        assert!(findings.writes.0 > 100, "collapse succeeded too rarely");
        findings.assert_clean();
    });
}

#[test]
fn l1_and_l2_entries_hostile() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("l1_and_l2_entries_hostile");
        let mut findings = Findings::new("l1_and_l2_entries_hostile");
        for seed in &seeds.all {
            let mutants = table_mutants(seed);
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        // Hostile entries must be caught: at open (L1/L2/refcount tables are
        // validated there) or, for what open cannot see, when read.
        let refused_at_open = findings.open_errors.values().sum::<u64>();
        assert!(refused_at_open > 0 || (findings.reads.1 > 0 && findings.statuses.1 > 0));
        findings.assert_clean();
    });
}

#[test]
fn compressed_payloads_corrupted() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("compressed_payloads_corrupted");
        let mut findings = Findings::new("compressed_payloads_corrupted");
        for name in ["comp-64k.qcow2", "comp-512.qcow2"] {
            let seed = seeds.get(name);
            run_mutants(
                &mut findings,
                &watchdog,
                seed,
                &payload_mutants(seed),
                &[READ_ONLY],
            );

            // Random flips inside compressed payloads; read only that cluster.
            let entries: Vec<L2Entry> = seed
                .entries(|k| matches!(k, Kind::Compressed { .. }))
                .copied()
                .collect();
            let cs = seed.layout.cluster_size;
            let mut rng = Rng(0xc0ff_ee00_0000_0001);
            let mut work = seed.bytes.clone();
            for i in 0..300 {
                let e = entries[rng.below(entries.len() as u64) as usize];
                let Kind::Compressed { host, len } = e.kind else {
                    unreachable!()
                };
                let n = len.min(work.len() as u64 - host);
                let mut flips = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let pos = (host + rng.below(n)) as usize;
                    let x = (rng.below(255) + 1) as u8;
                    work[pos] ^= x;
                    flips.push(format!("{pos}^{x:#x}"));
                }
                let label = format!(
                    "{name}: payload flips #{i} in the cluster at guest {}: {}",
                    e.guest,
                    flips.join(" ")
                );
                let mut case = seed.case(label, &work, READ_ONLY);
                case.reads = Reads::Ranges(vec![(e.guest, cs), (e.guest + cs / 3, cs / 2)]);
                findings.run::<64>(&watchdog, &case);
                work.copy_from_slice(&seed.bytes);
            }
        }
        // Inflating damaged streams must fail at least sometimes.
        assert!(findings.reads.1 > 0);
        findings.assert_clean();
    });
}

/// A valid stored deflate block as a compressed cluster reads back as its
/// payload: "error or valid data" includes data that is right.
#[test]
fn crafted_stored_block_reads_back() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("crafted_stored_block_reads_back");
        let mut findings = Findings::new("crafted_stored_block_reads_back");
        let seed = seeds.get("comp-512.qcow2");
        let e = *seed
            .entries(|k| matches!(k, Kind::Compressed { .. }))
            .next()
            .expect("a compressed cluster");
        let Kind::Compressed { host, .. } = e.kind else {
            unreachable!()
        };
        let bits = compressed_offset_bits(seed.layout.cluster_bits);
        let mut bytes = seed.bytes.clone();
        let mut stream = vec![0x01, 0x00, 0x02, 0xff, 0xfd];
        stream.extend([0x5a; 512]);
        let sectors = ((host % 512) as usize + stream.len()).div_ceil(512) as u64;
        let h = host as usize;
        bytes[h..h + stream.len()].copy_from_slice(&stream);
        put_be(
            &mut bytes,
            e.pos,
            8,
            COMPRESSED | ((sectors - 1) << bits) | host,
        );
        let mut case = seed.case(
            "stored block of 512 bytes of 0x5a".into(),
            &bytes,
            READ_ONLY,
        );
        case.reads = Reads::Ranges(vec![(e.guest, 512)]);
        let mut view = seed.raw.clone();
        view[e.guest as usize..e.guest as usize + 512].fill(0x5a);
        case.expect = Some(&view);
        findings.run::<64>(&watchdog, &case);
        findings.assert_clean();
    });
}

#[test]
fn truncated_files() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("truncated_files");
        let mut findings = Findings::new("truncated_files");
        for seed in &seeds.all {
            let mutants: Vec<Mutant> = truncation_lengths(seed)
                .into_iter()
                .map(|n| Mutant {
                    label: format!("truncated to {n} bytes (of {})", seed.bytes.len()),
                    change: Change::Truncate(n),
                })
                .collect();
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        // The backing image truncated under an intact overlay.
        let seed = seeds.get("overlay.qcow2");
        let (base_name, base) = &seeds.base;
        let cs = seed.layout.cluster_size as usize;
        for n in [
            0,
            3,
            72,
            104,
            512,
            cs,
            cs + 8,
            base.len() / 2,
            base.len() - 1,
        ] {
            let mut case = seed.case(
                format!("overlay.qcow2 over {base_name} truncated to {n}"),
                &seed.bytes,
                READ_ONLY,
            );
            case.images[1].bytes = &base[..n];
            findings.run::<64>(&watchdog, &case);
        }
        findings.assert_clean();
    });
}

#[test]
fn random_byte_flips() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("random_byte_flips");
        let mut findings = Findings::new("random_byte_flips");
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for seed in &seeds.all {
            let regions = fuzz_regions(seed);
            let mutants: Vec<Mutant> = (0..1000)
                .map(|i| fuzz_mutant(seed, &regions, &mut rng, i))
                .collect();
            run_mutants(&mut findings, &watchdog, seed, &mutants, &[READ_ONLY]);
        }
        findings.assert_clean();
    });
}

/// One layer of a crafted chain: `bytes` served as `name`, with device
/// identity `id` (`None`: a new identity on every open).
fn chain_layer<'d>(name: &str, bytes: &'d [u8], id: Option<u64>) -> Img<'d> {
    Img {
        name: name.to_owned(),
        bytes,
        id,
    }
}

/// A read-only case over a crafted chain whose top is `images[0]`, with
/// room for `opens` device opens.
fn chain_case<'d>(label: &str, images: Vec<Img<'d>>, opens: usize) -> Case<'d> {
    Case {
        label: label.to_owned(),
        top: images[0].name.clone(),
        images,
        options: READ_ONLY,
        reads: Reads::Whole,
        opens,
        expect: None,
        writes: false,
        collapse: false,
    }
}

/// Asserts that `outcome` is a failed open of kind `want` (one of them).
fn expect_open_error(findings: &mut Findings, label: &str, outcome: &Outcome, want: &[ErrorKind]) {
    match outcome.open_error {
        Some(err) if want.contains(&err.kind()) => {}
        other => findings.problem(
            &format!("{label}: wrong result"),
            label,
            &format!("expected an open error of kind {want:?}, got {other:?}"),
        ),
    }
}

#[test]
fn backing_chains_that_loop() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("backing_chains_that_loop");
        let mut findings = Findings::new("backing_chains_that_loop");
        let overlay = &seeds.get("overlay.qcow2").bytes;
        let to_a = with_backing_name(overlay, "a.qcow2");
        let to_b = with_backing_name(overlay, "b.qcow2");
        let to_c = with_backing_name(overlay, "c.qcow2");

        // A -> A: the image names itself.
        let label = "A whose backing is A";
        let case = chain_case(label, vec![chain_layer("a.qcow2", &to_a, Some(1))], 4);
        let outcome = findings.run::<64>(&watchdog, &case);
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> B -> A.
        let label = "A -> B -> A";
        let images = vec![
            chain_layer("a.qcow2", &to_b, Some(1)),
            chain_layer("b.qcow2", &to_a, Some(2)),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images, 4));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> C, where C is another name of A (same device identity).
        let label = "A -> C, C the same file as A";
        let images = vec![
            chain_layer("a.qcow2", &to_c, Some(1)),
            chain_layer("c.qcow2", &to_c, Some(1)),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images, 4));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Corrupt]);

        // A -> B -> A where every open looks like a new file: only the node
        // pool or the depth limit can stop it.
        let label = "A -> B -> A, identities unknown, 64 nodes";
        let images = vec![
            chain_layer("a.qcow2", &to_b, None),
            chain_layer("b.qcow2", &to_a, None),
        ];
        let outcome = findings.run::<64>(&watchdog, &chain_case(label, images.clone(), 80));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::NoCapacity]);
        let label = "A -> B -> A, identities unknown, 256 nodes";
        let outcome = findings.run::<256>(&watchdog, &chain_case(label, images, 80));
        expect_open_error(&mut findings, label, &outcome, &[ErrorKind::Unsupported]);
        findings.assert_clean();
    });
}

/// `depth` images: `depth - 1` overlays, then the base. Every layer holds the
/// same data, so the guest view is the overlay seed's.
fn deep_chain<'d>(layers: &'d [Vec<u8>], base: &'d [u8], depth: usize) -> Vec<Img<'d>> {
    let mut images: Vec<Img<'d>> = layers[..depth - 1]
        .iter()
        .enumerate()
        .map(|(i, bytes)| chain_layer(&format!("l{i:03}.qcow2"), bytes, Some(i as u64 + 1)))
        .collect();
    images.push(chain_layer(
        &format!("l{:03}.qcow2", depth - 1),
        base,
        Some(depth as u64),
    ));
    images
}

#[test]
fn backing_chains_too_deep() {
    big_stack(|| {
        let seeds = seeds();
        let watchdog = Watchdog::start("backing_chains_too_deep");
        let mut findings = Findings::new("backing_chains_too_deep");
        let seed = seeds.get("overlay.qcow2");
        let layers: Vec<Vec<u8>> = (0..200)
            .map(|i| with_backing_name(&seed.bytes, &format!("l{:03}.qcow2", i + 1)))
            .collect();
        let (_, base) = &seeds.base;
        let chain = |depth: usize| deep_chain(&layers, base, depth);
        let run =
            |findings: &mut Findings, depth: usize, nodes: usize, want: Option<&[ErrorKind]>| {
                let label = format!("chain of {depth} images, {nodes} node slots");
                let mut case = chain_case(&label, chain(depth), depth + 2);
                if want.is_none() {
                    case.expect = Some(&seed.raw);
                }
                let outcome = if nodes == 64 {
                    findings.run::<64>(&watchdog, &case)
                } else {
                    findings.run::<256>(&watchdog, &case)
                };
                if let Some(want) = want {
                    expect_open_error(findings, &label, &outcome, want);
                }
            };
        // The pool's limit and the depth limit each have their own kind.
        let pool_full: &[ErrorKind] = &[ErrorKind::NoCapacity];
        run(&mut findings, 32, 64, None);
        run(&mut findings, 33, 64, Some(pool_full));
        run(&mut findings, 40, 64, Some(pool_full));
        run(&mut findings, MAX_CHAIN_DEPTH, 256, None);
        let too_deep: &[ErrorKind] = &[ErrorKind::Unsupported];
        run(&mut findings, MAX_CHAIN_DEPTH + 1, 256, Some(too_deep));
        run(&mut findings, 200, 256, Some(too_deep));
        findings.assert_clean();
    });
}

/// Set in the environment of the write worker: the index of its first case.
const WORKER_ENV: &str = "BG_HOSTILE_WRITE_WORKER";
/// One write case running longer than this is a hang.
const WRITE_CASE_LIMIT: Duration = Duration::from_secs(5);
/// The worker may take this long to make its seeds.
const WORKER_SETUP_LIMIT: Duration = Duration::from_secs(120);
/// Worker restarts (after hangs or crashes) before giving up.
const MAX_WORKER_RUNS: usize = 12;

/// The write-phase cases, in a fixed order (the worker resumes by index).
fn write_case_specs(seeds: &Seeds) -> Vec<(usize, Mutant)> {
    let mut specs = Vec::new();
    let mut rng = Rng(0x7777_0000_0000_0001);
    let written = [
        "v3-64k.qcow2",
        "v2-512.qcow2",
        "comp-64k.qcow2",
        "overlay.qcow2",
    ];
    for (i, seed) in seeds.all.iter().enumerate() {
        if !written.contains(&seed.name) {
            continue;
        }
        let mut add = |m: Mutant| specs.push((i, m));
        add(Mutant {
            label: "unmodified".into(),
            change: Change::Patch(Vec::new()),
        });
        // The full-block mutation makes allocation scan 2^28 clusters on
        // 64 KiB clusters: one hang, reported once (each costs a restart).
        refcount_mutants(seed)
            .into_iter()
            .filter(|m| i == 0 || !m.label.ends_with("all 0xff") || seed.layout.cluster_bits < 16)
            .for_each(&mut add);
        table_mutants(seed).into_iter().for_each(&mut add);
        // The header fields the write path uses.
        header_mutants(seed)
            .into_iter()
            .filter(|m| {
                [
                    "size",
                    "cluster_bits",
                    "l1_size",
                    "l1_table_offset",
                    "refcount_table_offset",
                    "refcount_table_clusters",
                    "refcount_order",
                    "incompatible_features",
                    "autoclear_features",
                    "version",
                ]
                .iter()
                .any(|f| m.label.starts_with(&format!("header {f} =")))
                    || !m.label.contains(" = ")
            })
            .for_each(&mut add);
        for n in truncation_lengths(seed) {
            add(Mutant {
                label: format!("truncated to {n} bytes (of {})", seed.bytes.len()),
                change: Change::Truncate(n),
            });
        }
        let regions = fuzz_regions(seed);
        for f in 0..100 {
            add(fuzz_mutant(seed, &regions, &mut rng, f));
        }
    }
    specs
}

fn clean(text: &str) -> String {
    text.replace(['\t', '\n'], " ")
}

/// The worker: runs the write cases from `start`, one protocol line per event
/// on stdout (`START`, `PROBLEM`, then `STATS`, `OPENERR` and `DONE`).
fn write_worker(start: usize) {
    let seeds = seeds();
    let specs = write_case_specs(seeds);
    let mut findings = Findings::new("write worker");
    for (i, (seed, m)) in specs.iter().enumerate().skip(start) {
        let seed = &seeds.all[*seed];
        let label = format!("{}: {} [write phase]", seed.name, m.label);
        println!("START\t{i}\t{}", clean(&label));
        let bytes: Vec<u8> = match &m.change {
            Change::Patch(patches) => {
                let mut bytes = seed.bytes.clone();
                for (pos, data) in patches {
                    bytes[*pos..*pos + data.len()].copy_from_slice(data);
                }
                bytes
            }
            Change::Truncate(n) => seed.bytes[..*n].to_vec(),
        };
        let expected = matches!(&m.change, Change::Patch(p) if p.is_empty()).then(|| {
            let cs = seed.layout.cluster_size;
            let mut view = seed.raw.clone();
            apply_ops(&mut view, &write_ops(seed.layout.size, cs), cs, false);
            view
        });
        let mut case = seed.case(label.clone(), &bytes, READ_WRITE);
        case.writes = true;
        case.expect = expected.as_deref();
        let outcome = run_case::<64>(&case);
        for p in &outcome.problems {
            println!(
                "PROBLEM\t{}\t{}\t{}",
                clean(&p.key),
                clean(&label),
                clean(&p.detail)
            );
        }
        findings.add(&label, &outcome);
    }
    let f = &findings;
    println!(
        "STATS\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        f.cases, f.opened, f.reads.0, f.reads.1, f.statuses.0, f.statuses.1, f.writes.0, f.writes.1
    );
    for (error, count) in &f.open_errors {
        println!("OPENERR\t{}\t{count}", clean(error));
    }
    println!("DONE");
}

/// Adds what a worker reported in `text` to `findings`; returns whether it
/// finished and the last case it started.
fn absorb_worker_output(text: &str, findings: &mut Findings) -> (bool, Option<(usize, String)>) {
    let mut done = false;
    let mut last = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["START", i, label] => last = i.parse().ok().map(|i| (i, (*label).to_owned())),
            ["PROBLEM", key, label, detail] => findings.problem(key, label, detail),
            ["STATS", numbers @ ..] => {
                let n: Vec<u64> = numbers.iter().filter_map(|n| n.parse().ok()).collect();
                if let [cases, opened, r0, r1, s0, s1, w0, w1] = n[..] {
                    findings.cases += cases;
                    findings.opened += opened;
                    findings.reads = (findings.reads.0 + r0, findings.reads.1 + r1);
                    findings.statuses = (findings.statuses.0 + s0, findings.statuses.1 + s1);
                    findings.writes = (findings.writes.0 + w0, findings.writes.1 + w1);
                }
            }
            ["OPENERR", error, count] => {
                *findings.open_errors.entry((*error).to_owned()).or_default() +=
                    count.parse::<u64>().unwrap_or(0);
            }
            ["DONE"] => done = true,
            _ => {}
        }
    }
    (done, last)
}

/// The last `START` line of a worker's output so far.
fn last_started(text: &str) -> Option<usize> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("START\t"))
        .and_then(|l| l.split('\t').next())
        .and_then(|i| i.parse().ok())
}

/// Hostile images opened read-write and written: no panic, no hang, no
/// metadata overwritten, no change left by a request that failed as corrupt.
/// The cases run in a child process (this test, re-run as a worker) so that
/// a hang is reported with its case, and the remaining cases still run.
#[test]
fn writes_on_hostile_images() {
    if let Ok(start) = std::env::var(WORKER_ENV) {
        let start = start.parse().expect("worker start index");
        big_stack(move || write_worker(start));
        return;
    }
    seeds();
    let tmp = tmpdir("bg-hostile-writes-");
    let mut findings = Findings::new("writes_on_hostile_images");
    let mut start = 0;
    for run in 0.. {
        if run == MAX_WORKER_RUNS {
            findings.problem(
                "write worker restarted too often: later cases did not run",
                "",
                &format!("{MAX_WORKER_RUNS} worker runs; stopped before case {start}"),
            );
            break;
        }
        let out_path = tmp.path().join(format!("worker-{run}.out"));
        let err_path = tmp.path().join(format!("worker-{run}.err"));
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "writes_on_hostile_images", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(WORKER_ENV, start.to_string())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("create the worker's output"))
            .stderr(fs::File::create(&err_path).expect("create the worker's errors"))
            .spawn()
            .expect("start the write worker");
        let mut current = None;
        let mut since = Instant::now();
        let hung = loop {
            let finished = child.try_wait().expect("wait for the worker").is_some();
            let now = last_started(&fs::read_to_string(&out_path).unwrap_or_default());
            if now != current {
                (current, since) = (now, Instant::now());
            }
            if finished {
                break false;
            }
            let limit = match current {
                None => WORKER_SETUP_LIMIT,
                Some(_) => WRITE_CASE_LIMIT,
            };
            if since.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            thread::sleep(Duration::from_millis(25));
        };
        let text = fs::read_to_string(&out_path).unwrap_or_default();
        let (done, last) = absorb_worker_output(&text, &mut findings);
        if done {
            break;
        }
        let errors = fs::read_to_string(&err_path).unwrap_or_default();
        let Some((index, label)) = last else {
            panic!("the write worker failed before its first case:\n{text}\n{errors}");
        };
        if hung {
            findings.problem(
                &format!("HANG (over {WRITE_CASE_LIMIT:?}): {label}"),
                &label,
                "the case did not finish; the worker was killed and resumed after it",
            );
        } else {
            let tail: Vec<&str> = errors.lines().rev().take(6).collect();
            findings.problem(
                &format!("CRASH of the worker process: {label}"),
                &label,
                &tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            );
        }
        start = index + 1;
    }
    findings.assert_clean();
}

// ---------------------------------------------------------------------------
// 5. The `blockgraph` binary
// ---------------------------------------------------------------------------

/// How a command ended.
enum Exit {
    Code(i32, String),
    Signal(String),
    TimedOut,
}

/// Runs `blockgraph args` in `dir`, killing it after [`CLI_TIME_LIMIT`].
fn run_blockgraph(dir: &Path, args: &[&str], limit: Duration) -> Exit {
    let stdout = fs::File::create(dir.join(".stdout")).expect("create stdout file");
    let stderr = fs::File::create(dir.join(".stderr")).expect("create stderr file");
    let mut child = Command::new(BLOCKGRAPH)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start blockgraph");
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().expect("wait for blockgraph") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Exit::TimedOut;
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    };
    let err = fs::read_to_string(dir.join(".stderr")).unwrap_or_default();
    match status.code() {
        Some(code) => Exit::Code(code, err),
        None => Exit::Signal(format!("{status} {err}")),
    }
}

/// Every file of `dir` but the command outputs, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list the directory")
        .map(|e| e.expect("directory entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.starts_with("w-") && !n.ends_with(".out"))
        .map(|n| {
            let bytes = fs::read(dir.join(&n)).expect("read a file");
            (n, bytes)
        })
        .collect()
}

/// A file for the CLI test: which read-only commands must refuse it (exit 1)
/// and which must succeed (exit 0); the others may do either.
struct CliImage {
    name: String,
    /// Virtual size to read with `io -r`.
    size: u64,
    must_fail: Vec<usize>,
    must_succeed: Vec<usize>,
}

/// The read-only commands run on every file: info, chain info as JSON, map
/// as JSON, convert, and a read of the whole virtual size.
fn read_only_commands<'a>(name: &'a str, read: &'a str) -> [Vec<&'a str>; 5] {
    [
        vec!["info", name],
        vec!["info", "--backing-chain", "--output=json", name],
        vec!["map", "--output=json", name],
        vec!["convert", "-O", "raw", name, "convert.out"],
        vec!["io", "-r", name, "-c", read],
    ]
}

/// Judges one `blockgraph` run: exit status 0 or 1 (as `expect` allows) with
/// one `blockgraph: ` line on stderr for 1; never a panic (101), a signal or
/// a hang.
fn judge(shown: &str, exit: Exit, expect: Option<i32>, failures: &mut Vec<String>) {
    match exit {
        Exit::Code(code, _) if expect.is_some_and(|e| e != code) => {
            failures.push(format!("{shown}: exit {code}, expected {expect:?}"));
        }
        Exit::Code(0, _) => {}
        Exit::Code(1, err) if err.starts_with("blockgraph: ") && err.lines().count() == 1 => {}
        Exit::Code(code, err) => failures.push(format!("{shown}: exit {code}: {}", err.trim_end())),
        Exit::Signal(s) => failures.push(format!("{shown}: killed by a signal: {s}")),
        Exit::TimedOut => failures.push(format!("{shown}: HANG (killed after {CLI_TIME_LIMIT:?})")),
    }
}

#[test]
fn cli_refuses_hostile_images_cleanly() {
    let seeds = seeds();
    let tmp = tmpdir("bg-hostile-cli-");
    let dir = tmp.path();
    let write = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes).expect("write a file");
    let mut images: Vec<CliImage> = Vec::new();
    for seed in &seeds.all {
        write(seed.name, &seed.bytes);
        if let Some((name, bytes)) = &seed.backing {
            write(name, bytes);
        }
        images.push(CliImage {
            name: seed.name.to_owned(),
            size: seed.layout.size,
            must_fail: vec![],
            must_succeed: (0..5).collect(),
        });
    }
    let all: Vec<usize> = (0..5).collect();
    let mut corrupt = |name: &str, seed: &Seed, bytes: Vec<u8>, must_fail: Vec<usize>| {
        write(name, &bytes);
        images.push(CliImage {
            name: name.to_owned(),
            size: seed.layout.size,
            must_fail,
            must_succeed: vec![],
        });
    };
    let patched = |seed: &Seed, pos: usize, v: &[u8]| {
        let mut b = seed.bytes.clone();
        b[pos..pos + v.len()].copy_from_slice(v);
        b
    };
    let v3 = seeds.get("v3-64k.qcow2");
    let comp = seeds.get("comp-64k.qcow2");
    let over = seeds.get("overlay.qcow2");
    let bad_bits = patched(v3, 20, &30u32.to_be_bytes());
    corrupt("bad-cluster-bits.qcow2", v3, bad_bits.clone(), all.clone());
    let eof = (v3.bytes.len() as u64).next_multiple_of(v3.layout.cluster_size);
    corrupt(
        "l1-past-eof.qcow2",
        v3,
        patched(v3, 40, &(eof * 2).to_be_bytes()),
        all.clone(),
    );
    let data = v3
        .entries(|k| matches!(k, Kind::Data(_)))
        .next()
        .expect("data");
    let past_eof = (eof | COPIED).to_be_bytes();
    corrupt(
        "l2-data-past-eof.qcow2",
        v3,
        patched(v3, data.pos, &past_eof),
        vec![2, 3, 4],
    );
    let c = comp
        .entries(|k| matches!(k, Kind::Compressed { .. }))
        .next()
        .expect("compressed");
    let Kind::Compressed { host, .. } = c.kind else {
        unreachable!()
    };
    corrupt(
        "comp-garbage.qcow2",
        comp,
        patched(comp, host as usize, &[0xff; 64]),
        vec![3, 4],
    );
    let ext = v3.layout.extensions[0].0;
    let huge = patched(v3, ext + 4, &u32::MAX.to_be_bytes());
    corrupt("huge-extension.qcow2", v3, huge, all.clone());
    let table = v3.layout.l2[0].table as usize;
    corrupt(
        "truncated-mid-l2.qcow2",
        v3,
        v3.bytes[..table + 4].to_vec(),
        vec![],
    );
    let rebased = |name: &str| with_backing_name(&over.bytes, name);
    // A broken chain under a sound header: `info` without the chain shows
    // the header (as qemu-img does); everything that needs the chain fails.
    let chain_needed: Vec<usize> = (1..5).collect();
    corrupt(
        "loop-self.qcow2",
        over,
        rebased("loop-self.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "loop-a.qcow2",
        over,
        rebased("loop-b.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "loop-b.qcow2",
        over,
        rebased("loop-a.qcow2"),
        chain_needed.clone(),
    );
    corrupt(
        "backing-dir.qcow2",
        over,
        rebased("."),
        chain_needed.clone(),
    );
    corrupt(
        "chain-top.qcow2",
        over,
        rebased("chain-base.qcow2"),
        chain_needed.clone(),
    );
    corrupt("chain-base.qcow2", v3, bad_bits, all.clone());
    let mut rng = Rng(0xdead_beef_0000_0001);
    for seed in [v3, comp, seeds.get("v2-512.qcow2")] {
        let regions = fuzz_regions(seed);
        for i in 0..6 {
            let Change::Patch(patches) = fuzz_mutant(seed, &regions, &mut rng, i).change else {
                unreachable!()
            };
            let mut b = seed.bytes.clone();
            for (pos, data) in patches {
                b[pos..pos + data.len()].copy_from_slice(&data);
            }
            corrupt(&format!("fuzz-{i}-{}", seed.name), seed, b, vec![]);
        }
    }

    for image in &mut images {
        if image.must_fail == chain_needed {
            image.must_succeed = vec![0];
        }
    }

    // Read-only commands: every file stays as it was.
    let before = snapshot(dir);
    let mut failures = Vec::new();
    for image in &images {
        let read = format!("read 0 {}", image.size);
        for (i, args) in read_only_commands(&image.name, &read).iter().enumerate() {
            let expect = if image.must_fail.contains(&i) {
                Some(1)
            } else if image.must_succeed.contains(&i) {
                Some(0)
            } else {
                None
            };
            let shown = format!("`blockgraph {}`", args.join(" "));
            judge(
                &shown,
                run_blockgraph(dir, args, CLI_TIME_LIMIT),
                expect,
                &mut failures,
            );
        }
    }
    // collapse on chains that fail validation.
    for args in [
        &["collapse", "--top", "chain-base.qcow2", "chain-top.qcow2"][..],
        &["collapse", "--top", "chain-top.qcow2", "chain-top.qcow2"][..],
        &["collapse", "--top", "loop-b.qcow2", "loop-a.qcow2"][..],
    ] {
        let shown = format!("`blockgraph {}`", args.join(" "));
        judge(
            &shown,
            run_blockgraph(dir, args, CLI_TIME_LIMIT),
            Some(1),
            &mut failures,
        );
    }
    let after = snapshot(dir);
    for (name, bytes) in &before {
        if after.get(name) != Some(bytes) {
            failures.push(format!(
                "{name} was changed by a read-only command or a refused collapse"
            ));
        }
    }

    // Guest writes, on a copy of each file: an image that fails to open
    // stays byte for byte as it was; the others may be written.
    for image in &images {
        let copy = format!("w-{}", image.name);
        let original = fs::read(dir.join(&image.name)).expect("read an image");
        fs::write(dir.join(&copy), &original).expect("copy an image");
        let args = [
            "io",
            &copy,
            "-c",
            "write -P 0xc3 0 512",
            "-c",
            "write -P 0xc3 65536 4096",
            "-c",
            "write -z 131072 65536",
            "-c",
            "discard 196608 65536",
            "-c",
            "flush",
        ];
        let shown = format!("`blockgraph {}`", args.join(" "));
        // Opening the chain fails (`info --backing-chain` must fail).
        let refused = image.must_fail.contains(&1);
        let expect = if refused {
            Some(1)
        } else if image.must_succeed.is_empty() || image.size < 256 * 1024 {
            None
        } else {
            Some(0)
        };
        judge(
            &shown,
            run_blockgraph(dir, &args, CLI_TIME_LIMIT),
            expect,
            &mut failures,
        );
        if refused && fs::read(dir.join(&copy)).ok().as_ref() != Some(&original) {
            failures.push(format!("{shown}: the image failed to open but was changed"));
        }
    }
    let after_writes = snapshot(dir);
    for (name, bytes) in &before {
        if after_writes.get(name) != Some(bytes) {
            failures.push(format!(
                "{name} (a backing file or another image) was changed by io"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} CLI failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A backing name that names a FIFO: opening it must not block forever.
#[test]
fn cli_backing_file_that_is_a_fifo() {
    let seeds = seeds();
    let tmp = tmpdir("bg-hostile-fifo-");
    let dir = tmp.path();
    let status = Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
    let overlay = &seeds.get("overlay-raw.qcow2").bytes;
    fs::write(dir.join("top.qcow2"), with_backing_name(overlay, "fifo")).expect("write");
    let mut failures = Vec::new();
    for args in [&["info", "top.qcow2"][..], &["map", "top.qcow2"][..]] {
        match run_blockgraph(dir, args, Duration::from_secs(5)) {
            Exit::Code(0 | 1, _) => {}
            Exit::Code(code, err) => failures.push(format!("{args:?}: exit {code}: {err}")),
            Exit::Signal(s) => failures.push(format!("{args:?}: signal {s}")),
            Exit::TimedOut => failures.push(format!(
                "{args:?}: HANG: opening the backing file `fifo` (a FIFO named by the image) \
                 blocks; killed after 5 s"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A data cluster that the refcounts call free (a hostile or damaged
/// image): reads work, but writes are refused before anything changes but
/// the corrupt bit in the header, since the allocator would hand that
/// cluster out a second time. QEMU then sees the image as corrupt too.
#[test]
fn data_cluster_counted_free_refuses_writes() {
    let tmp = tmpdir("bg-hostile-counted-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "img.qcow2", &["write -P 0x5a 1M 64k"]);
    let path = dir.join("img.qcow2");
    let mut bytes = fs::read(&path).expect("read the image");
    let at = |offset: u64| offset as usize;
    // Guest cluster 16 (1 MiB, 64 KiB clusters): L1[0] -> L2 entry 16.
    let l2 = be64(&bytes, at(be64(&bytes, 40))) & 0x00ff_ffff_ffff_fe00;
    let host = be64(&bytes, at(l2 + 16 * 8)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(host, 0, "qemu-io allocated the data cluster");
    // Its 16-bit refcount in the first refcount block.
    let block = be64(&bytes, at(be64(&bytes, 48)));
    let entry = at(block + host / 65536 * 2);
    assert_eq!(&bytes[entry..entry + 2], &[0, 1]);
    bytes[entry..entry + 2].fill(0);
    fs::write(&path, &bytes).expect("write the image");
    // The oracle agrees the image is broken.
    let check = run(dir, "qemu-img", &["check", "img.qcow2"]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "qemu-img check finds the error"
    );
    assert!(!qemu_info_corrupt(dir, "img.qcow2"), "not marked yet");

    bg_ok(dir, &["io", "-r", "img.qcow2", "-c", "read -P 0x5a 1M 64k"]);
    let marked = with_corrupt_bit(&bytes).expect("a v3 image");
    for write in [
        "write -P 0x11 2M 4k",
        "write -P 0x22 1M 512",
        "write -z 3M 64k",
    ] {
        // Each write starts from the unmarked image.
        fs::write(&path, &bytes).expect("write the image");
        let err = bg_refused(dir, &["io", "img.qcow2", "-c", write]);
        assert!(err.contains("refcount"), "{write}: {err}");
        let after = fs::read(&path).unwrap();
        assert_eq!(
            first_difference(&after, &marked),
            None,
            "{write}: the image changed beyond the corrupt bit"
        );
        assert!(after == marked, "{write}: the image changed length");
        assert!(qemu_info_corrupt(dir, "img.qcow2"), "{write}: QEMU sees it");
    }
    // Marked: later writes are refused at once, and reads still work.
    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0x33 0 4k"]);
    assert!(err.contains("marked corrupt"), "{err}");
    assert!(fs::read(&path).unwrap() == marked);
    bg_ok(dir, &["io", "-r", "img.qcow2", "-c", "read -P 0x5a 1M 64k"]);
}

/// Whether `qemu-img info --output=json` reports the qcow2 image `name` as
/// corrupt (`"corrupt": true` in its format-specific data).
fn qemu_info_corrupt(dir: &Path, name: &str) -> bool {
    let out = run(
        dir,
        "qemu-img",
        &["info", "-U", "-f", "qcow2", "--output=json", name],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img info {name} failed: {json}");
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(compact.contains("\"corrupt\":"), "no corrupt field: {json}");
    compact.contains("\"corrupt\":true")
}

// ---------------------------------------------------------------------------
// 6. QEMU's limits, bounded open, complete overlap checks
// ---------------------------------------------------------------------------

/// A [`MemDevice`] that counts what is read: all bytes, and the bytes read
/// from `watched` (a device range); and the reads.
struct Counted<'a> {
    inner: MemDevice<'a>,
    watched: (u64, u64),
    /// (bytes read, bytes read inside `watched`).
    read: Rc<Cell<(u64, u64)>>,
    /// Reads done.
    reads: Rc<Cell<u64>>,
}

/// Synchronous: every operation completes in `submit`.
impl<'b> Queue<'b> for Counted<'_> {}

impl Device for Counted<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> blockgraph::Result<()> {
        self.inner.read_at(offset, buf)?;
        let (start, end) = self.watched;
        let inside = (offset + buf.len() as u64)
            .min(end)
            .saturating_sub(offset.max(start));
        let (all, watched) = self.read.get();
        self.read.set((all + buf.len() as u64, watched + inside));
        self.reads.set(self.reads.get() + 1);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> blockgraph::Result<()> {
        self.inner.write_at(offset, buf)
    }

    fn flush(&mut self) -> blockgraph::Result<()> {
        self.inner.flush()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.inner.identity()
    }
}

/// Hands out one device, once.
struct One<D>(Option<D>);

impl<D: Device> Resolver<D> for One<D> {
    fn open(&mut self, _name: &str, _writable: bool) -> blockgraph::Result<D> {
        self.0
            .take()
            .ok_or(Error::new(ErrorKind::NotFound, "opened already"))
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        _reference: &str,
        _writable: bool,
        _resolved: &mut NameBuf,
    ) -> blockgraph::Result<D> {
        Err(Error::new(ErrorKind::NotFound, "no backing files here"))
    }

    fn reference(
        &mut self,
        _overlay: &str,
        target: &str,
        out: &mut NameBuf,
    ) -> blockgraph::Result<()> {
        out.clear();
        out.push_str(target)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "name too long"))
    }
}

/// A hostile ~50 MB image whose L1 table names two L2 tables thousands of
/// times (entry `i` names table `i % 2`), with 2 MiB and 64 KiB clusters:
/// QEMU opens it; blockgraph opens it and checks it before the first write
/// reading each L2 table once, not once per L1 entry (that took 30 minutes
/// with 2 MiB clusters). Judged by bytes read, not by time.
#[test]
fn l1_naming_one_l2_table_thousands_of_times_is_read_once() {
    let tmp = tmpdir("bg-hostile-l1-alias-");
    let dir = tmp.path();
    for (cluster, entries) in [(2u64 << 20, 2048u64), (64 << 10, 4096)] {
        let coverage = cluster / 8 * cluster;
        let name = format!("alias-{cluster}.qcow2");
        let size = (entries * coverage).to_string();
        let cs_opt = format!("cluster_size={cluster}");
        qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", &cs_opt, &name, &size],
        );
        let second = format!("write -P 0x5a {coverage} 4k");
        qemu_io(dir, "qcow2", &name, &["write -P 0x5a 0 4k", &second]);
        let mut bytes = fs::read(dir.join(&name)).expect("read the image");
        let l1 = be64(&bytes, 40) as usize;
        assert_eq!(be64(&bytes, 36) >> 32, entries, "L1 entries");
        let tables = [be64(&bytes, l1), be64(&bytes, l1 + 8)];
        assert!(
            tables.iter().all(|&t| t & OFFSET_MASK != 0),
            "two L2 tables"
        );
        for i in 0..entries as usize {
            bytes[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&tables[i % 2].to_be_bytes());
        }
        bytes.resize(50 << 20, 0);
        fs::write(dir.join(&name), &bytes).expect("write the image");
        qemu_img(dir, &["info", "-f", "qcow2", &name]);

        let first = tables[0] & OFFSET_MASK;
        let read = Rc::new(Cell::new((0, 0)));
        let mut storage = bytes.clone();
        storage.resize(bytes.len() + (16 << 20), 0);
        let device = Counted {
            inner: MemDevice::new(&mut storage, bytes.len() as u64, 1).expect("device"),
            watched: (first, first + cluster),
            read: Rc::clone(&read),
            reads: Rc::default(),
        };
        let mut graph: Box<Graph<Counted<'_>, 8>> = Box::default();
        let top = graph
            .open_image(&mut One(Some(device)), &name, READ_WRITE)
            .expect("the image opens");
        let (opened, table_at_open) = read.get();
        // The first write runs the "used clusters counted" pass; in place.
        graph
            .write(top, 0, &[0xc3; 4096])
            .expect("an in-place write");
        graph.flush(top).expect("flush");
        let (all, table) = read.get();
        let file = bytes.len() as u64;
        eprintln!(
            "{name}: open read {opened} bytes ({table_at_open} of table 0); \
             open + first write {all} ({table} of table 0); file {file}"
        );
        // Table 0: once at open, once before the first write, and what the
        // write path's cache reads of it (at most the table again).
        assert!(
            table_at_open <= cluster,
            "open read table 0 {table_at_open} bytes"
        );
        assert!(table <= 3 * cluster, "table 0 read {table} bytes in all");
        assert!(all <= 2 * file, "read {all} bytes of a {file}-byte file");
        drop(graph);
        let l2 = &storage[first as usize..(first + cluster) as usize];
        assert!(
            !l2.windows(8).any(|w| w == [0xc3; 8]),
            "guest data never lands on an L2 table"
        );
    }
}

/// Writes `bytes` as `name` in `dir`, checks that `qemu-img info` refuses it
/// and that blockgraph refuses it too (info, and a write) with a message
/// containing `want`, leaving the file as it was.
fn refused_like_qemu(dir: &Path, name: &str, bytes: &[u8], want: &str) {
    fs::write(dir.join(name), bytes).expect("write the image");
    let qemu = run(dir, "qemu-img", &["info", "-f", "qcow2", name]);
    assert!(
        !qemu.status.success(),
        "qemu-img info opens {name}: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    for args in [&["info", name][..], &["io", name, "-c", "write 0 512"][..]] {
        let err = bg_refused(dir, args);
        assert!(
            err.contains(want),
            "{args:?}: {err} (QEMU: {})",
            String::from_utf8_lossy(&qemu.stderr).trim()
        );
    }
    assert!(
        fs::read(dir.join(name)).unwrap() == bytes,
        "{name} was changed"
    );
}

/// QEMU's limits at open: a refcount table over 8 MiB, 0xffffffff
/// snapshots, a snapshot entry with 0xffffffff bytes of extra data, and a
/// compression type other than zlib without its incompatible bit are all
/// refused, by qemu-img and by blockgraph, and nothing is written.
#[test]
fn images_over_qemus_limits_are_refused_like_qemu() {
    let tmp = tmpdir("bg-hostile-limits-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x5a 0 64k"]);
    let base = fs::read(dir.join("base.qcow2")).expect("read");
    let cs = 65536u64;
    let patched = |patches: &[(usize, &[u8])], len: u64| {
        let mut b = base.clone();
        b.resize(len.max(b.len() as u64) as usize, 0);
        for &(at, v) in patches {
            b[at..at + v.len()].copy_from_slice(v);
        }
        b
    };

    // 129 clusters of 64 KiB: 8 MiB + 64 KiB, all inside the file.
    let rt = be64(&base, 48);
    let clusters = (8 << 20) / cs as u32 + 1;
    let big_rt = patched(
        &[(56, &clusters.to_be_bytes())],
        rt + u64::from(clusters) * cs,
    );
    refused_like_qemu(dir, "rt.qcow2", &big_rt, "refcount table too large");

    // nb_snapshots 0xffffffff, the table at a fresh cluster.
    let eof = (base.len() as u64).next_multiple_of(cs);
    let many = patched(
        &[(60, &u32::MAX.to_be_bytes()), (64, &eof.to_be_bytes())],
        eof + cs,
    );
    refused_like_qemu(dir, "many.qcow2", &many, "too many snapshots");

    // A real snapshot, then its entry claims 0xffffffff bytes of extra data.
    fs::write(dir.join("snap.qcow2"), &base).expect("write");
    qemu_img(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    let snap = fs::read(dir.join("snap.qcow2")).expect("read");
    assert_eq!(be64(&snap, 56) & 0xffff_ffff, 1, "one snapshot");
    let table = be64(&snap, 64) as usize;
    let mut extra = snap.clone();
    extra[table + 36..table + 40].copy_from_slice(&u32::MAX.to_be_bytes());
    refused_like_qemu(dir, "extra.qcow2", &extra, "extra data");

    // zstd (type 1) in a 112-byte header, incompatible bit 3 clear.
    assert_eq!(be64(&base, 96) & 0xffff_ffff, 112, "header_length 112");
    let zstd = patched(&[(104, &[1])], 0);
    refused_like_qemu(dir, "zstd.qcow2", &zstd, "incompatible bit");
}

/// An active L2 entry (with COPIED, in an L2 table the L1 calls owned)
/// that points a guest cluster at an internal snapshot's L1 table: a guest
/// write there is refused, the corrupt bit is set in the header (and QEMU
/// sees it), and nothing else in the file changes.
#[test]
fn write_onto_an_inactive_l1_table_is_refused_and_marks_the_image_corrupt() {
    let tmp = tmpdir("bg-hostile-inactive-l1-");
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]);
    qemu_io(dir, "qcow2", "img.qcow2", &["write -P 0x5a 0 128k"]);
    qemu_img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    let path = dir.join("img.qcow2");
    let mut bytes = fs::read(&path).expect("read the image");
    let table = be64(&bytes, 64) as usize;
    let snapshot_l1 = be64(&bytes, table);
    let l1 = be64(&bytes, 40) as usize;
    assert_ne!(snapshot_l1, be64(&bytes, 40), "the snapshot has its own L1");
    let l2 = be64(&bytes, l1) & OFFSET_MASK;
    // L1[0] claims the table (COPIED); L2[0] points at the snapshot's L1.
    let owned = (l2 | COPIED).to_be_bytes();
    bytes[l1..l1 + 8].copy_from_slice(&owned);
    let alias = (snapshot_l1 | COPIED).to_be_bytes();
    bytes[l2 as usize..l2 as usize + 8].copy_from_slice(&alias);
    fs::write(&path, &bytes).expect("write the image");
    assert!(!qemu_info_corrupt(dir, "img.qcow2"));

    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0xc3 0 4k"]);
    assert!(err.contains("metadata"), "{err}");
    let after = fs::read(&path).expect("read the image");
    let marked = with_corrupt_bit(&bytes).expect("v3");
    assert_eq!(
        first_difference(&after, &marked),
        None,
        "only the corrupt bit changed"
    );
    assert_eq!(after.len(), bytes.len(), "nothing appended");
    assert_eq!(
        be64(&after, 72) & 2,
        2,
        "incompatible bit 1 (corrupt) is set"
    );
    assert!(
        qemu_info_corrupt(dir, "img.qcow2"),
        "qemu-img info shows corrupt: true"
    );
    let err = bg_refused(dir, &["io", "img.qcow2", "-c", "write -P 0xc3 1M 4k"]);
    assert!(err.contains("marked corrupt"), "{err}");
    assert!(
        fs::read(&path).unwrap() == after,
        "a later write changed nothing"
    );
}

/// Guest bytes one L2 table of a 512-byte-cluster image maps.
const L2_SPAN: u64 = 512 / 8 * 512;

/// A qcow2 image of 512-byte clusters mapping `ranges` L2 tables' worth of
/// guest bytes, with one sector written (0x5a) in the range of each table
/// in `written`: its bytes and those tables' offsets.
fn l2_tables_at(dir: &Path, ranges: u64, written: &[u64]) -> (Vec<u8>, Vec<u64>) {
    let name = "many-l2.qcow2";
    let size = (ranges * L2_SPAN).to_string();
    let create = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(dir, &[&create[..], &[name, &size]].concat());
    let writes: Vec<String> = written
        .iter()
        .map(|i| format!("write -P 0x5a {} 512", i * L2_SPAN))
        .collect();
    qemu_io(dir, "qcow2", name, &writes);
    let bytes = fs::read(dir.join(name)).expect("read the image");
    let l1 = be64(&bytes, 40) as usize;
    let offsets: Vec<u64> = written
        .iter()
        .map(|&i| be64(&bytes, l1 + 8 * i as usize) & OFFSET_MASK)
        .collect();
    assert!(offsets.iter().all(|&t| t != 0), "an L2 table per range");
    (bytes, offsets)
}

/// [`l2_tables_at`] with a table for each of `tables` ranges.
fn many_l2_tables(dir: &Path, tables: u64) -> (Vec<u8>, Vec<u64>) {
    l2_tables_at(dir, tables, &(0..tables).collect::<Vec<_>>())
}

/// Runs [`Graph::check_tables_step`] on `top` with `budget` to its end,
/// asserting that no call reads more than `budget` times; returns the
/// calls made, or the error that ended the check.
fn check_in_steps<D: Device>(
    graph: &mut Graph<D, 8>,
    top: NodeId,
    budget: u64,
    reads: &Cell<u64>,
) -> blockgraph::Result<u64> {
    let mut steps = 0;
    loop {
        let before = reads.get();
        let done = graph.check_tables_step(top, budget);
        let step = reads.get() - before;
        assert!(step <= budget, "one step read {step} times");
        steps += 1;
        if done? {
            return Ok(steps);
        }
    }
}

/// A graph over `storage` (the image's `len` bytes and room to grow),
/// opened with `options`; the device's read count goes to `reads`.
fn open_counted<'a>(
    storage: &'a mut [u8],
    len: usize,
    options: OpenOptions,
    reads: &Rc<Cell<u64>>,
) -> (Box<Graph<Counted<'a>, 8>>, blockgraph::Result<NodeId>) {
    let device = Counted {
        inner: MemDevice::new(storage, len as u64, 1).expect("device"),
        watched: (0, 0),
        read: Rc::default(),
        reads: Rc::clone(reads),
    };
    let mut graph: Box<Graph<Counted<'a>, 8>> = Box::default();
    let top = graph.open_image(&mut One(Some(device)), "many-l2.qcow2", options);
    (graph, top)
}

/// Opening an image reads none of its L2 tables (a few reads, however many
/// tables); [`Graph::check_tables_step`] then reads them all, never more
/// than its budget of reads per call; a strict open
/// ([`OpenOptions::check_tables`]) reads them all at open.
#[test]
fn open_reads_no_l2_table_and_the_check_keeps_to_its_budget() {
    let tmp = tmpdir("bg-hostile-open-scan-");
    let tables = 256;
    let (bytes, _) = many_l2_tables(tmp.path(), tables);
    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let reads = Rc::new(Cell::new(0));
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    let at_open = reads.get();
    eprintln!("open: {at_open} reads for {tables} L2 tables");
    assert!(at_open <= 16, "open read {at_open} times");
    let budget = 3;
    let steps = check_in_steps(&mut graph, top, budget, &reads).expect("a clean image");
    let checked = reads.get() - at_open;
    assert!(checked >= tables, "the check read {checked} times");
    assert!(steps >= tables / budget, "{steps} steps");
    assert!(graph.qcow2(top).expect("qcow2").tables_checked());
    assert!(graph.check_tables_step(top, 0).expect("done already"));
    graph.unref(top).expect("close");
    drop(graph);

    reads.set(0);
    let strict = OpenOptions {
        check_tables: true,
        ..READ_ONLY
    };
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), strict, &reads);
    let top = top.expect("the image opens");
    assert!(
        reads.get() >= tables,
        "a strict open read {} times",
        reads.get()
    );
    assert!(graph.qcow2(top).expect("qcow2").tables_checked());
    graph.unref(top).expect("close");
    drop(graph);

    // A sparse L1 table (two tables 4095 entries apart): the zero entries
    // between are read in budgeted steps too.
    let (bytes, _) = l2_tables_at(tmp.path(), 4096, &[0, 4095]);
    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    let steps = check_in_steps(&mut graph, top, 1, &reads).expect("a clean image");
    assert!(steps >= 4096 / 512, "{steps} steps");
    graph.unref(top).expect("close");
}

/// A bad L2 entry (a data cluster past the end of the file) in an image
/// opened without the L2 scan: open succeeds; a read through its L2 slice
/// is refused as corrupt (the entry itself and a good neighbour: the slice
/// is checked whole when loaded), a read through another table works, any
/// write is refused (the check before the first write checks every entry)
/// and nothing is written; the check in steps finds it within its budget;
/// a strict open and the CLI refuse the image.
#[test]
fn hostile_l2_entry_is_refused_at_first_use() {
    let tmp = tmpdir("bg-hostile-first-use-");
    let dir = tmp.path();
    let (mut bytes, tables) = many_l2_tables(dir, 64);
    let bad = 40;
    let past_end = (bytes.len() as u64 + (1 << 20)) & OFFSET_MASK;
    let at = tables[bad] as usize;
    bytes[at..at + 8].copy_from_slice(&(past_end | COPIED).to_be_bytes());
    let guest = bad as u64 * L2_SPAN;
    let corrupt = |result: blockgraph::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(
            err.to_string().contains("past the end of the image"),
            "{what}: {err}"
        );
    };

    let mut storage = bytes.clone();
    storage.resize(bytes.len() + (1 << 20), 0);
    let reads = Rc::new(Cell::new(0));
    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_WRITE, &reads);
    let top = top.expect("open does not read the L2 tables");
    let mut buf = [0u8; 512];
    corrupt(graph.read(top, guest, &mut buf), "the bad entry read");
    corrupt(
        graph.read(top, guest + 5 * 512, &mut buf),
        "a neighbour read",
    );
    graph.read(top, 0, &mut buf).expect("another table reads");
    assert_eq!(buf, [0x5a; 512]);
    corrupt(graph.write(top, 0, &[0xc3; 512]), "a write elsewhere");
    corrupt(graph.write(top, guest, &[0xc3; 512]), "a write through it");
    graph.unref(top).expect("close");
    drop(graph);
    assert!(storage[..bytes.len()] == bytes[..], "nothing was written");
    assert!(
        storage[bytes.len()..].iter().all(|&b| b == 0),
        "nor past it"
    );

    let (mut graph, top) = open_counted(&mut storage, bytes.len(), READ_ONLY, &reads);
    let top = top.expect("the image opens");
    {
        // Through the request engine, a buffer lent for metadata misses:
        // the slice it loads is checked at first use all the same, so a
        // good entry next to the bad one is refused too.
        let backend = graph
            .attach_backend(top, blockgraph::Access::READ_ONLY_DEVICE)
            .expect("attach");
        let (mut meta, mut data) = ([0u8; 4096], [0u8; 512]);
        let mut engine: Engine<'_> = Engine::new();
        engine
            .lend_metadata_buffer(&mut meta)
            .expect("lend a buffer");
        let neighbour = guest + 5 * 512;
        let ticket = engine
            .submit_read(backend, neighbour, [&mut data[..]])
            .unwrap();
        let done = engine.wait(&mut graph, ticket).expect("the read finishes");
        corrupt(done.result, "an engine read of a neighbour");
        engine.drain(&mut graph);
        graph.detach_backend(backend).expect("detach");
    }
    let found = check_in_steps(&mut graph, top, 2, &reads).expect_err("the check fails");
    corrupt(Err(found), "the check");
    graph.unref(top).expect("close");
    drop(graph);

    let strict = OpenOptions {
        check_tables: true,
        ..READ_ONLY
    };
    let (_graph, top) = open_counted(&mut storage, bytes.len(), strict, &reads);
    corrupt(top.map(|_| ()), "a strict open");

    fs::write(dir.join("bad.qcow2"), &bytes).expect("write the image");
    let err = bg_refused(dir, &["info", "-f", "qcow2", "bad.qcow2"]);
    assert!(err.contains("past the end of the image"), "{err}");
}
