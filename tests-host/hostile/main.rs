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
use blockgraph::graph::{ByName, OpenByName, MAX_CHAIN_DEPTH};
use blockgraph::{Device, Error, ErrorKind, Graph, NodeId, OpenOptions};

#[path = "../common/mod.rs"]
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
struct MemImages<'a, 'd, 'l, O> {
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

impl<'a, 'd, O: FnMut(DeviceEvent<'_>)> MemImages<'a, 'd, '_, O> {
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

impl<'a, O: FnMut(DeviceEvent<'_>)> OpenByName<MemDevice<'a>> for MemImages<'a, '_, '_, O> {
    fn open_by_name(&mut self, name: &str, _writable: bool) -> blockgraph::Result<MemDevice<'a>> {
        self.device(name)
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
        let mut resolver = ByName(MemImages {
            images: case.images.clone(),
            free: &mut arena,
            used: 0,
            next_id: 1000,
            log: &mut log,
            exhausted: &mut exhausted,
            observers: observers.iter_mut(),
            top_spare,
        });
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
    resolver: &mut ByName<MemImages<'a, '_, '_, O>>,
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
    resolver: &mut ByName<MemImages<'a, '_, '_, O>>,
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

mod seeds;
use seeds::*;
mod mutations;
use mutations::*;
mod binary;
mod in_process;
use binary::*;
mod limits;
