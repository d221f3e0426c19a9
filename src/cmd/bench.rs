//! `bench [-f FMT] [-U] [-c COUNT] [-d DEPTH] [-s SIZE] [-o OFFSET] [-S STEP] [-t none|writeback] [-w] [--pattern N] [--with-job] IMAGE`:
//! `qemu-img bench` through a BlockBackend, with up to DEPTH requests in
//! flight; and `sizes`, the static memory of the configuration the
//! interpreter runs with.
//!
//! As `qemu-img bench`: COUNT requests (default 75000) of SIZE bytes
//! (default 4 KiB), the first at OFFSET (default 0), each next one STEP
//! bytes further (default and `-S 0`: SIZE), wrapping as qemu-img 10.0 (the
//! oracle of the tests) does: the next offset is `(offset + STEP) % image
//! size`, and a request that then reaches past the end fails the run, as it
//! does in qemu-img (QEMU 10.1 wraps modulo `image size - SIZE` instead).
//! Reads by default, with `-w` writes of pattern byte N (default 0, as
//! qemu-img; without `-w` the pattern is ignored, as there). The image is
//! opened read-only for reads and read-write for writes; writes are flushed
//! after the timed loop (qemu-img flushes when it closes the image, also
//! untimed). Output as qemu-img's:
//!
//! ```text
//! Sending 20000 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)
//! Run completed in 0.512 seconds.
//! ```
//!
//! Queue depth (`-d`, default 1) as in qemu-img: at most DEPTH requests
//! are outstanding; when one completes the next is submitted, with the next
//! offset of the same sequence. DEPTH 1 runs the requests one at a time
//! through the synchronous path; a greater DEPTH (up to [`MAX_DEPTH`], the
//! request engine's slots) keeps them in flight through
//! [`Engine`](crate::engine::Engine), so they overlap where the devices
//! queue them (host files: io_uring, where the kernel offers it; virtio
//! disks still complete every operation at once), waiting in the devices
//! ([`Engine::advance`](crate::engine::Engine::advance)) rather than
//! spinning while none has completed. A larger DEPTH fails ("unsupported
//! queue depth").
//!
//! Cache mode (`-t`, default `writeback`): `none` bypasses the host's page
//! cache (`O_DIRECT` for transfers aligned to 4 KiB: the scratch memory is
//! aligned, so requests of whole 4 KiB blocks at aligned offsets go
//! direct; metadata and unaligned requests still take the page cache);
//! where the front end has no such mode (the kernel) `none` fails
//! ("unsupported cache mode"). It applies to the image `bench` opens, not
//! to one attached in the session.
//!
//! `--with-job` (an image of the script's session with a job from
//! `job-start`, DEPTH 2 or more): between the requests the job steps
//! through the request engine ([`Engine::job_step`]): its copies go to the
//! devices among the requests, up to four runs at once, each through a
//! 64 KiB buffer of the memory for requests in flight; its state changes run in drained sections; an
//! active commit that is ready is completed, so it pivots while requests
//! are queued — a job under guest load, as a VMM runs it.
//!
//! The request buffers are DEPTH disjoint buffers of SIZE bytes: at DEPTH
//! 1 in the interpreter's scratch memory, above it in the environment's
//! memory for requests in flight ([`Environment::queue_memory`], `'static`
//! because a device that queues holds its buffers until they complete), so
//! SIZE × DEPTH must fit there. A read's buffer
//! comes back from the engine in pieces cut where the chain's extents
//! begin; the next request on it is submitted with those pieces as its
//! segments (the engine offers no join, and a read cut into more pieces
//! than a request may carry runs through the synchronous path and keeps its segments). Where the environment has no clock the command fails
//! ("unsupported: no clock"). An image attached in the session is measured
//! through its own BlockBackend.

use core::mem::size_of;

use super::args::{parse_pattern, parse_size};
use super::{invalid, Ctx, Environment, Failure, ImageOpts, Outcome, Session};
use crate::backend::BackendId;
use crate::device::{Device, Queue};
use crate::engine::{
    Engine, Ticket, ALLOCATIONS, DEFAULT_PIECES, DEFAULT_SEGMENTS, DEFAULT_SLOTS, METADATA_BUFFERS,
};
use crate::error::{Error, ErrorKind};
use crate::format::cache::SLICE_SIZE;
use crate::graph::{Access, Graph, OpenOptions, Resolver};
use crate::jobs::{JobId, JobStatus};
use crate::virtio_blk::{FlatMemory, Server, DEFAULT_DESCRIPTORS, DEFAULT_DISKS, DEFAULT_REQUESTS};

const USAGE: &str =
    "usage: bench [-f FMT] [-U] [-c COUNT] [-d DEPTH] [-s SIZE] [-o OFFSET] [-S STEP] [-t none|writeback] [-w] [--pattern N] [--with-job] IMAGE";

/// The deepest queue `bench -d` runs: the request engine's slots.
pub const MAX_DEPTH: usize = DEFAULT_SLOTS;
/// Buffers one request may carry, and pieces a read may come back in: equal,
/// so that a read's pieces can always go out again as the next request's
/// segments.
pub(super) const SEGMENTS: usize = 16;
// The "unsupported queue depth" message names the limit.
const _: () = assert!(MAX_DEPTH == 64);

/// Memory lent to the engine for metadata misses when there is room
/// ([`Engine::lend_metadata_buffer`]): a cold metadata slice is then loaded
/// split-phase, without holding up the requests that hit the cache.
const METADATA_MEMORY: usize = METADATA_BUFFERS * SLICE_SIZE;
/// `--with-job`: the buffers the job's runs go through
/// ([`Engine::lend_job_buffer`]), four runs in flight.
const JOB_MEMORY: usize = 4 * JOB_LANE;
/// One of them.
const JOB_LANE: usize = 64 * 1024;

/// The engine `bench -d` runs its requests through.
pub(super) type BenchEngine<'b> = Engine<'b, MAX_DEPTH, SEGMENTS, SEGMENTS>;
const SIZES_USAGE: &str = "usage: sizes";

/// qemu-img's default request count.
const DEFAULT_COUNT: u64 = 75_000;
/// qemu-img's default request size.
const DEFAULT_SIZE: u64 = 4096;
/// qemu-img's limit for counts, sizes and steps (a C `int`).
const INT_MAX: u64 = i32::MAX as u64;
/// The memory the default configuration should fit in: graph, session and
/// scratch together.
const MEMORY_BUDGET: usize = 2 << 20;

/// A parsed `bench` command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan<'a> {
    count: u64,
    len: u64,
    /// `-d`: requests in flight, 1 to [`MAX_DEPTH`].
    depth: usize,
    offset: u64,
    /// 0: the request size.
    step: u64,
    write: bool,
    pattern: u8,
    /// `-t none`: bypass the host's page cache.
    direct: bool,
    /// `--with-job`: step the job of the image (attached in the session)
    /// between the requests.
    with_job: bool,
    image: &'a str,
    /// `-f FMT`, `-U`.
    opts: ImageOpts,
}

fn parse<'a>(words: &[&'a str]) -> Result<Plan<'a>, Failure<'a>> {
    let mut plan = Plan {
        count: DEFAULT_COUNT,
        len: DEFAULT_SIZE,
        depth: 1,
        offset: 0,
        step: 0,
        write: false,
        pattern: 0,
        direct: false,
        with_job: false,
        image: "",
        opts: ImageOpts::default(),
    };
    let mut image = None;
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        if let Some(taken) = plan.opts.take(word, &mut words) {
            taken?;
            continue;
        }
        let mut value = || words.next().ok_or_else(|| invalid(USAGE));
        let size = |text: &'a str| parse_size(text).map_err(|e| Failure::new(e, text));
        match word {
            "-c" => plan.count = size(value()?)?,
            "-s" => plan.len = size(value()?)?,
            "-o" => plan.offset = size(value()?)?,
            "-S" => plan.step = size(value()?)?,
            "-d" => {
                let text = value()?;
                let depth = size(text)?;
                if !(1..=INT_MAX).contains(&depth) {
                    return Err(invalid("queue depth must be between 1 and 2147483647"));
                }
                if depth > MAX_DEPTH as u64 {
                    return Err(Failure::new(
                        Error::new(
                            ErrorKind::Unsupported,
                            "unsupported queue depth (at most 64 requests in flight)",
                        ),
                        text,
                    ));
                }
                plan.depth = depth as usize;
            }
            "-t" => {
                plan.direct = match value()? {
                    "none" => true,
                    "writeback" => false,
                    _ => {
                        return Err(Failure::new(
                            Error::new(
                                ErrorKind::Unsupported,
                                "unsupported cache mode (none or writeback)",
                            ),
                            "-t",
                        ))
                    }
                }
            }
            "-w" => plan.write = true,
            "--with-job" => plan.with_job = true,
            "--pattern" => {
                let text = value()?;
                plan.pattern = parse_pattern(text).map_err(|e| Failure::new(e, text))?;
            }
            _ if word.starts_with('-') || image.is_some() => return Err(invalid(USAGE)),
            _ => image = Some(word),
        }
    }
    plan.image = image.ok_or_else(|| invalid(USAGE))?;
    if !(1..=INT_MAX).contains(&plan.count) {
        return Err(invalid("request count must be between 1 and 2147483647"));
    }
    if !(1..=INT_MAX).contains(&plan.len) {
        return Err(invalid("request size must be between 1 and 2147483647"));
    }
    if plan.step > INT_MAX {
        return Err(invalid("step size must be between 0 and 2147483647"));
    }
    if plan.step == 0 {
        plan.step = plan.len;
    }
    if plan.with_job && plan.depth == 1 {
        return Err(invalid(
            "--with-job steps the job between requests in flight: it needs -d 2 or more",
        ));
    }
    Ok(plan)
}

/// The offset after `offset`, wrapped as `qemu-img bench` 10.0 wraps it.
fn next_offset(offset: u64, step: u64, image_size: u64) -> u64 {
    match image_size {
        0 => 0,
        _ => offset.saturating_add(step) % image_size,
    }
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs `bench`.
    pub(crate) fn bench<'a, const S: usize>(
        &mut self,
        session: &Session<S>,
        words: &[&'a str],
    ) -> Outcome<'a> {
        let plan = parse(words)?;
        if self.env.now_micros().is_none() {
            return Err(Failure::new(
                Error::new(ErrorKind::Unsupported, "unsupported: no clock"),
                "bench",
            ));
        }
        if plan.len as usize > self.scratch.len() {
            return Err(invalid("request size is larger than the scratch memory"));
        }
        if let Some(backend) = session.backend(plan.image) {
            if plan.direct {
                return Err(Failure::new(
                    Error::new(
                        ErrorKind::Unsupported,
                        "-t none applies to images bench opens, not to attached ones",
                    ),
                    plan.image,
                ));
            }
            let job = match plan.with_job {
                true => Some(session.job(plan.image).ok_or_else(|| no_job(plan.image))?),
                false => None,
            };
            return self.measure(backend, &plan, job);
        }
        if plan.with_job {
            return Err(no_job(plan.image));
        }
        if plan.direct {
            self.env
                .set_direct(true)
                .map_err(|e| Failure::new(e, "-t"))?;
        }
        let result = self.bench_image(&plan);
        if plan.direct {
            // Back to the default for the commands after this one.
            self.env
                .set_direct(false)
                .map_err(|e| Failure::new(e, "-t"))?;
        }
        result
    }

    /// Opens the plan's image and measures it through a BlockBackend of its
    /// own.
    fn bench_image<'a>(&mut self, plan: &Plan<'a>) -> Outcome<'a> {
        let options = OpenOptions {
            read_only: !plan.write,
            ..plan.opts.read_only()
        };
        self.with_image(plan.image, options, |cx, top| {
            let access = if plan.write {
                Access::READ_WRITE_DEVICE
            } else {
                Access::READ_ONLY_DEVICE
            };
            let backend = cx
                .graph
                .attach_backend(top, access)
                .map_err(|e| Failure::new(e, plan.image))?;
            let result = cx.measure(backend, plan, None);
            let detached = cx.graph.detach_backend(backend);
            result.and(detached.map_err(Into::into))
        })
    }

    /// Runs the plan's requests on `backend`, `plan.depth` in flight, with
    /// the scratch memory as the buffers, and reports the time.
    fn measure<'a>(
        &mut self,
        backend: BackendId,
        plan: &Plan<'a>,
        job: Option<JobId>,
    ) -> Outcome<'a> {
        let (env, graph, out) = (&mut *self.env, &mut *self.graph, &mut *self.out);
        let image_size = graph.backend_size(backend)?;
        writeln!(
            out,
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if plan.write { "write" } else { "read" },
            plan.len,
            plan.depth,
            plan.offset,
            plan.step
        )?;
        let len = plan.len as usize * plan.depth;
        let queued = if plan.depth == 1 {
            None
        } else {
            // A job's runs go through a buffer of their own; with room,
            // the engine also gets buffers for metadata misses.
            let len = len + if plan.with_job { JOB_MEMORY } else { 0 };
            let memory = env
                .queue_memory(len + METADATA_MEMORY)
                .or_else(|| env.queue_memory(len))
                .ok_or(invalid(
                    "request size × queue depth is larger than the memory for requests in flight",
                ))?;
            Some(memory)
        };
        let mut offsets = Offsets {
            next: plan.offset,
            plan,
            image_size,
        };
        let no_clock = || Error::new(ErrorKind::Unsupported, "unsupported: no clock");
        let started = match queued {
            Some(memory) => {
                memory.fill(plan.pattern);
                let started = env.now_micros().ok_or_else(no_clock)?;
                let resolver = env.resolver();
                let mut stepper = JobStepper {
                    job,
                    completing: false,
                };
                let mut between =
                    |engine: &mut BenchEngine<'static>,
                     graph: &mut Graph<E::Device, N, B, C, J>| {
                        stepper.step(engine, graph, resolver)
                    };
                run_queued(graph, backend, &mut offsets, memory, &mut between)?;
                started
            }
            None => {
                let (memory, cow) = self.scratch.split_at_mut(len);
                memory.fill(plan.pattern);
                let started = env.now_micros().ok_or_else(no_clock)?;
                run_serial(graph, backend, &mut offsets, memory, cow)?;
                started
            }
        };
        let ended = env.now_micros().ok_or_else(no_clock)?;
        if plan.write {
            graph
                .backend_flush(backend)
                .map_err(|e| Failure::new(e, plan.image))?;
        }
        let millis = (ended.saturating_sub(started) + 500) / 1000;
        writeln!(
            out,
            "Run completed in {}.{:03} seconds.",
            millis / 1000,
            millis % 1000
        )?;
        Ok(())
    }

    /// `sizes`: the bytes the interpreter's working set takes (the graph as
    /// instantiated, what one more slot of each kind costs, the session and the
    /// scratch memory) against [`MEMORY_BUDGET`], for a session of `S` slots.
    pub(crate) fn sizes<'a, const S: usize>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        if !words.is_empty() {
            return Err(invalid(SIZES_USAGE));
        }
        let graph = size_of::<Graph<E::Device, N, B, C, J>>();
        // The cost of one slot: a graph with two of them minus a graph with one.
        let one = size_of::<Graph<E::Device, 1, 1, 1, 1>>();
        let node = size_of::<Graph<E::Device, 2, 1, 1, 1>>() - one;
        let backend = size_of::<Graph<E::Device, 1, 2, 1, 1>>() - one;
        let cache = size_of::<Graph<E::Device, 1, 1, 2, 1>>() - one;
        let job = size_of::<Graph<E::Device, 1, 1, 1, 2>>() - one;
        let session = size_of::<Session<S>>();
        let total = graph + session + self.scratch.len();
        writeln!(
            self.out,
            "graph: {graph} bytes ({N} nodes, {B} backends, {C} cache slots, {J} jobs)"
        )?;
        writeln!(self.out, "  node slot: {node} bytes (with its device)")?;
        writeln!(self.out, "  backend slot: {backend} bytes")?;
        writeln!(self.out, "  cache slot: {cache} bytes")?;
        writeln!(self.out, "  job slot: {job} bytes")?;
        writeln!(self.out, "session: {session} bytes ({S} slots)")?;
        writeln!(self.out, "scratch: {} bytes", self.scratch.len())?;
        // A VMM's request engine (the default one), outside this budget.
        let engine = size_of::<Engine<'static>>();
        let request = size_of::<Engine<'static, 2>>() - size_of::<Engine<'static, 1>>();
        writeln!(
            self.out,
            "engine: {engine} bytes ({DEFAULT_SLOTS} requests in flight, {DEFAULT_SEGMENTS} \
             segments, {DEFAULT_PIECES} pieces, {ALLOCATIONS} allocating writes; not in the \
             total)"
        )?;
        writeln!(self.out, "  request slot: {request} bytes")?;
        // A VMM's virtio-blk server (the default one), outside this budget.
        type Vblk<const R: usize> = Server<'static, FlatMemory<'static>, R>;
        let server = size_of::<Vblk<DEFAULT_REQUESTS>>();
        let chain = size_of::<Vblk<2>>() - size_of::<Vblk<1>>();
        writeln!(
            self.out,
            "virtio-blk server: {server} bytes ({DEFAULT_REQUESTS} chains of up to \
             {DEFAULT_DESCRIPTORS} descriptors, {DEFAULT_DISKS} disks; not in the total)"
        )?;
        writeln!(self.out, "  chain record: {chain} bytes")?;
        writeln!(
            self.out,
            "total: {total} bytes of a {MEMORY_BUDGET}-byte budget: {}",
            if total <= MEMORY_BUDGET {
                "met"
            } else {
                "exceeded"
            }
        )?;
        Ok(())
    }
}

/// The offsets of a plan's requests, in submission order.
struct Offsets<'p, 'a> {
    plan: &'p Plan<'a>,
    image_size: u64,
    /// The next request's offset.
    next: u64,
}

impl<'a> Offsets<'_, 'a> {
    /// The next request's offset; a request reaching past the end of the
    /// image fails the run, as in qemu-img.
    fn take(&mut self) -> Result<u64, Failure<'a>> {
        let offset = self.next;
        if offset.saturating_add(self.plan.len) > self.image_size {
            return Err(Failure::new(
                Error::new(
                    ErrorKind::InvalidInput,
                    "request reaches past the end of the image",
                ),
                self.plan.image,
            ));
        }
        self.next = next_offset(offset, self.plan.step, self.image_size);
        Ok(offset)
    }

    /// `err` as the run's failure.
    fn fail(&self, err: Error) -> Failure<'a> {
        Failure::new(err, self.plan.image)
    }
}

/// Runs the requests one at a time through the synchronous path, with
/// `buffer` (filled with the pattern) as the buffer and `cow` as the
/// writes' copy-on-write scratch.
fn run_serial<'a, D: Device, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    backend: BackendId,
    offsets: &mut Offsets<'_, 'a>,
    buffer: &mut [u8],
    cow: &mut [u8],
) -> Result<(), Failure<'a>> {
    for _ in 0..offsets.plan.count {
        let offset = offsets.take()?;
        let done = if offsets.plan.write {
            graph.backend_writev_with_scratch(backend, offset, &[buffer], cow)
        } else {
            graph.backend_read(backend, offset, buffer)
        };
        done.map_err(|e| offsets.fail(e))?;
    }
    Ok(())
}

/// Runs the requests through a request engine, `offsets.plan.depth` in
/// flight, each with its own `plan.len`-byte piece of `memory` (filled with
/// the pattern). Returns with nothing in flight, also on an error.
fn run_queued<'a, 'b, D, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    backend: BackendId,
    offsets: &mut Offsets<'_, 'a>,
    memory: &'b mut [u8],
    between: Between<'_, 'b, D, N, B, C, J>,
) -> Result<(), Failure<'a>>
where
    D: Queue<'b>,
{
    let mut engine = BenchEngine::new();
    let len = offsets.plan.len as usize * offsets.plan.depth;
    let (memory, rest) = memory.split_at_mut(len.min(memory.len()));
    let job_len = if offsets.plan.with_job { JOB_MEMORY } else { 0 };
    let (job, metadata) = rest.split_at_mut(job_len.min(rest.len()));
    for lane in job.chunks_exact_mut(JOB_LANE) {
        engine.lend_job_buffer(lane).map_err(|e| offsets.fail(e))?;
    }
    for buffer in metadata.chunks_exact_mut(SLICE_SIZE) {
        // At most METADATA_BUFFERS fit in METADATA_MEMORY: none comes back.
        let _ = engine.lend_metadata_buffer(buffer);
    }
    let result = if offsets.plan.write {
        queue_writes(&mut engine, graph, (backend, between), offsets, memory)
    } else {
        queue_reads(&mut engine, graph, (backend, between), offsets, memory)
    };
    // An engine is never dropped with device operations in flight.
    engine.drain(graph);
    result
}

/// The write loop of [`run_queued`]: request buffers are shared, so each
/// lane (a piece of `memory`) remembers the request it carries and goes out
/// again when that completes.
fn queue_writes<'a, 'b, D, const N: usize, const B: usize, const C: usize, const J: usize>(
    engine: &mut BenchEngine<'b>,
    graph: &mut Graph<D, N, B, C, J>,
    (backend, between): (BackendId, Between<'_, 'b, D, N, B, C, J>),
    offsets: &mut Offsets<'_, 'a>,
    memory: &'b [u8],
) -> Result<(), Failure<'a>>
where
    D: Queue<'b>,
{
    let (count, len) = (offsets.plan.count, offsets.plan.len as usize);
    let mut lanes: [Option<Ticket>; MAX_DEPTH] = [None; MAX_DEPTH];
    let (mut submitted, mut finished) = (0, 0);
    while finished < count {
        for (lane, buffer) in lanes.iter_mut().zip(memory.chunks_exact(len)) {
            if lane.is_none() && submitted < count {
                let offset = offsets.take()?;
                let ticket = engine.submit_write(backend, offset, [buffer]);
                *lane = Some(ticket.map_err(|e| offsets.fail(e))?);
                submitted += 1;
            }
        }
        between(engine, graph).map_err(|e| offsets.fail(e))?;
        engine.advance(graph);
        while let Some((ticket, done)) = engine.complete() {
            done.result.map_err(|e| offsets.fail(e))?;
            finished += 1;
            if let Some(lane) = lanes.iter_mut().find(|lane| **lane == Some(ticket)) {
                *lane = None;
            }
        }
    }
    Ok(())
}

/// The read loop of [`run_queued`]: a completed read's buffer, in the
/// pieces the engine gives back, goes out again as the next request.
fn queue_reads<'a, 'b, D, const N: usize, const B: usize, const C: usize, const J: usize>(
    engine: &mut BenchEngine<'b>,
    graph: &mut Graph<D, N, B, C, J>,
    (backend, between): (BackendId, Between<'_, 'b, D, N, B, C, J>),
    offsets: &mut Offsets<'_, 'a>,
    memory: &'b mut [u8],
) -> Result<(), Failure<'a>>
where
    D: Queue<'b>,
{
    let (count, len) = (offsets.plan.count, offsets.plan.len);
    let mut submitted = 0;
    for buffer in memory.chunks_exact_mut(len as usize) {
        if submitted == count {
            break;
        }
        let offset = offsets.take()?;
        let ticket = engine.submit_read(backend, offset, [buffer]);
        ticket.map_err(|e| offsets.fail(e))?;
        submitted += 1;
    }
    let mut finished = 0;
    while finished < count {
        between(engine, graph).map_err(|e| offsets.fail(e))?;
        engine.advance(graph);
        while let Some((_, done)) = engine.complete() {
            done.result.map_err(|e| offsets.fail(e))?;
            finished += 1;
            if submitted == count {
                continue;
            }
            let mut pieces = heapless::Vec::<&'b mut [u8], SEGMENTS>::new();
            for piece in done.into_buffers() {
                pieces
                    .push(piece)
                    .map_err(|_| offsets.fail(lost_buffer()))?;
            }
            if pieces.iter().map(|piece| piece.len() as u64).sum::<u64>() != len {
                return Err(offsets.fail(lost_buffer()));
            }
            let offset = offsets.take()?;
            let ticket = engine.submit_read(backend, offset, pieces);
            ticket.map_err(|e| offsets.fail(e))?;
            submitted += 1;
        }
    }
    Ok(())
}

/// What runs between the rounds of [`run_queued`] (`--with-job`: the job
/// steps).
type Between<'c, 'b, D, const N: usize, const B: usize, const C: usize, const J: usize> =
    &'c mut dyn FnMut(&mut BenchEngine<'b>, &mut Graph<D, N, B, C, J>) -> crate::Result<()>;

/// `--with-job`: steps a job between the requests, as a VMM does while its
/// guest keeps submitting.
struct JobStepper {
    job: Option<JobId>,
    /// `job-complete` was sent: the active commit pivots at its next clean
    /// step.
    completing: bool,
}

impl JobStepper {
    /// One step of the job through the engine ([`Engine::job_step`]: its
    /// runs go to the devices between the requests; state changes and the
    /// pivot in drained sections). An active commit that is ready is
    /// completed, so it pivots under the requests. Nothing once the job
    /// has concluded.
    fn step<'b, D, R, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        engine: &mut BenchEngine<'b>,
        graph: &mut Graph<D, N, B, C, J>,
        resolver: &mut R,
    ) -> crate::Result<()>
    where
        D: Queue<'b>,
        R: Resolver<D>,
    {
        let Some(job) = self.job else {
            return Ok(());
        };
        if graph.job_info(job)?.status == JobStatus::Concluded {
            return Ok(());
        }
        let status = engine.job_step(graph, job, resolver)?;
        if status == JobStatus::Ready && !self.completing {
            graph.job_complete(job)?;
            self.completing = true;
        }
        Ok(())
    }
}

/// `--with-job` on an image without a job in the session.
fn no_job(image: &str) -> Failure<'_> {
    Failure::new(
        Error::new(
            ErrorKind::InvalidInput,
            "--with-job: no job on this image (start one with job-start first)",
        ),
        image,
    )
}

/// A read's buffer did not come back whole from the engine.
pub(super) fn lost_buffer() -> Error {
    Error::new(ErrorKind::Busy, "a read's buffer did not come back whole")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemu_img_s() {
        let plan = parse(&["a.qcow2"]).unwrap();
        assert_eq!(
            plan,
            Plan {
                count: 75_000,
                len: 4096,
                depth: 1,
                offset: 0,
                step: 4096,
                write: false,
                pattern: 0,
                direct: false,
                with_job: false,
                image: "a.qcow2",
                opts: ImageOpts::default(),
            }
        );
        let plan = parse(&[
            "-w",
            "--pattern",
            "0xa5",
            "-c",
            "3",
            "-s",
            "64k",
            "-S",
            "0",
            "x",
        ])
        .unwrap();
        assert_eq!((plan.write, plan.pattern, plan.count), (true, 0xa5, 3));
        assert_eq!((plan.len, plan.step), (65536, 65536));
        assert_eq!(parse(&["-d", "1", "-S", "1M", "x"]).unwrap().step, 1 << 20);
        assert_eq!(parse(&["-d", "8", "x"]).unwrap().depth, 8);
        assert!(parse(&["-t", "none", "x"]).unwrap().direct);
        assert!(!parse(&["-t", "writeback", "x"]).unwrap().direct);
        assert_eq!(parse(&["-d", "64", "x"]).unwrap().depth, MAX_DEPTH);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for words in [
            &[][..],
            &["a", "b"],
            &["-c", "0", "a"],
            &["-s", "0", "a"],
            &["-c"],
            &["-d", "0", "a"],
            &["-d", "65", "a"],
            &["-d", "x", "a"],
            &["--pattern", "256", "a"],
            &["-S", "4G", "a"],
            &["-x", "a"],
            &["-t", "unsafe", "a"],
            &["-t"],
        ] {
            assert!(parse(words).is_err(), "{words:?}");
        }
    }

    #[test]
    fn offsets_wrap_like_qemu_img() {
        // 1 MiB image, 4 KiB requests from 1 MiB - 8 KiB: qemu-img 10.0
        // writes 1M-8k, 1M-4k, 0.
        let size = 1 << 20;
        let mut offset = size - 8192;
        let mut seen = [0; 3];
        for slot in &mut seen {
            *slot = offset;
            offset = next_offset(offset, 4096, size);
        }
        assert_eq!(seen, [size - 8192, size - 4096, 0]);
        // 64 KiB at step 300 KiB: 900k, then 176k.
        assert_eq!(next_offset(900 << 10, 300 << 10, size), 176 << 10);
        assert_eq!(next_offset(0, 8, 0), 0);
    }
}
