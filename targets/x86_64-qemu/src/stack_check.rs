//! The built-in check run for the command line `stack-check`: how much
//! stack each of the library's request paths and job steps takes, in this
//! release build, called straight (no interpreter in between).
//!
//! On the disks `base.qcow2` <- `mid.qcow2` <- `top.qcow2` (a qcow2 chain)
//! and the blank disks `s1.qcow2`, `s2.qcow2`, `s3.qcow2`, a VMM's flow:
//! open the chain on a backend; synchronous reads, writes (allocating with
//! and without copy-on-write scratch, in place), zero writes, discards,
//! block status, flushes; requests in flight through an [`Engine`]; two
//! live snapshots and the collapse of the empty one; an intermediate
//! commit and a stream ([`Graph::job_step`]); an active commit through
//! [`Engine::job_step`] under guest writes, completed with a pivot; a
//! snapshot and a second active commit through [`Graph::job_step`];
//! detaching the backend. Every call is measured ([`crate::stack`]): the
//! most each path took is printed as `stack: PATH N bytes`, and a path over
//! [`BUDGET`] fails the check.
//!
//! Each guest write, zero write and discard is also printed as the qemu-io
//! command that makes the same change (`stack-check: guest: write -P 0x44
//! 0 4096`), so that the host can replay them on a copy of the chain and
//! compare the final base with it: every job keeps the guest's view, and
//! the flow ends with the guest on `base.qcow2`.

use blockgraph::engine::{Engine, Ticket, SLICE_SIZE};
use blockgraph::prelude::*;
use blockgraph::SharedGraph;
use spin::{Mutex, MutexGuard};

use crate::disk::{SerialResolver, VirtioDisk};
use crate::stack;

/// The most stack one request path or job step may take (docs/stack.md).
pub const REQUEST_BUDGET: usize = 16 * 1024;
/// The most stack setting up may take: opening a chain, snapshots,
/// collapse, starting a job (opening a 3-image chain takes 28 KiB).
pub const SETUP_BUDGET: usize = 32 * 1024;

/// Size of the check's larger buffers: sync reads, copy-on-write scratch,
/// job scratch, each engine copy and job buffer.
const BUF: usize = 64 * 1024;
/// The engine's requests carry a 4 KiB page each: [`PAGES`] in flight at
/// once, then as many guest writes during the engine's active commit.
const PAGES: usize = 16;
const PAGE: usize = 4096;
/// Engine copy buffers and job buffers lent (each [`BUF`] bytes) and
/// metadata buffers ([`SLICE_SIZE`] each).
const COPY_BUFFERS: usize = 2;
const JOB_BUFFERS: usize = 2;
const METADATA_BUFFERS: usize = 2;
const LENT: usize = (COPY_BUFFERS + JOB_BUFFERS) * BUF + METADATA_BUFFERS * SLICE_SIZE;
const MEMORY: usize = 3 * BUF + PAGE + 2 * PAGES * PAGE + LENT;

/// Steps after which a job that has not concluded fails the check.
const MAX_STEPS: usize = 100_000;

/// The check's memory, page-aligned, in `.bss`; taken once for good
/// ([`MutexGuard::leak`]): the engine borrows pieces of it for `'static`.
#[repr(C, align(4096))]
struct Memory([u8; MEMORY]);

static MEMORY_POOL: Mutex<Memory> = Mutex::new(Memory([0; MEMORY]));

/// The engine of the requests-in-flight phase (73 KB: kept off the stack).
static ENGINE: Mutex<Engine<'static>> = Mutex::new(Engine::new());

/// One measured path: its name, its budget and the most stack it took.
#[derive(Clone, Copy)]
struct Path {
    name: &'static str,
    budget: usize,
    most: usize,
}

/// The most stack seen per path, in the order first measured.
struct Meter {
    paths: [Path; 32],
    len: usize,
}

impl Meter {
    /// Runs request path or job step `call`, recording the stack it took
    /// under `name` ([`REQUEST_BUDGET`]).
    fn measure<T>(&mut self, name: &'static str, call: impl FnOnce() -> T) -> T {
        self.measure_within(name, REQUEST_BUDGET, call)
    }

    /// [`Meter::measure`] of a setup call ([`SETUP_BUDGET`]).
    fn measure_setup<T>(&mut self, name: &'static str, call: impl FnOnce() -> T) -> T {
        self.measure_within(name, SETUP_BUDGET, call)
    }

    #[inline(never)]
    fn measure_within<T>(
        &mut self,
        name: &'static str,
        budget: usize,
        call: impl FnOnce() -> T,
    ) -> T {
        let entry = stack::paint();
        let out = call();
        let used = stack::deepest().saturating_sub(entry);
        let room = self.len < self.paths.len();
        match self.paths[..self.len].iter_mut().find(|p| p.name == name) {
            Some(path) => path.most = path.most.max(used),
            None if room => {
                self.paths[self.len] = Path {
                    name,
                    budget,
                    most: used,
                };
                self.len += 1;
            }
            None => kprintln!("stack-check: too many paths to record {name}"),
        }
        out
    }

    /// Prints every path; whether all are within their budgets.
    fn report(&self) -> bool {
        let paths = &self.paths[..self.len];
        for path in paths {
            kprintln!("stack: {} {} bytes", path.name, path.most);
        }
        let worst = |budget| {
            let within = paths.iter().filter(|p| p.budget == budget);
            within.map(|p| p.most).max().unwrap_or(0)
        };
        let (request, setup) = (worst(REQUEST_BUDGET), worst(SETUP_BUDGET));
        kprintln!("stack-check: worst request path {request} bytes (budget {REQUEST_BUDGET})");
        kprintln!("stack-check: worst setup path {setup} bytes (budget {SETUP_BUDGET})");
        paths.iter().all(|p| p.most <= p.budget)
    }
}

/// The check's buffers, cut from [`MEMORY_POOL`].
struct Buffers {
    read: &'static mut [u8],
    cow: &'static mut [u8],
    job: &'static mut [u8],
    /// The data of synchronous guest writes.
    data: &'static mut [u8],
    /// The pages of the engine's requests, each used once.
    pages: core::slice::ChunksExactMut<'static, u8>,
    /// Lent to the engine.
    lent: Option<&'static mut [u8]>,
}

impl Buffers {
    fn take() -> Self {
        let memory = &mut MutexGuard::leak(MEMORY_POOL.lock()).0[..];
        let (read, rest) = memory.split_at_mut(BUF);
        let (cow, rest) = rest.split_at_mut(BUF);
        let (job, rest) = rest.split_at_mut(BUF);
        let (data, rest) = rest.split_at_mut(PAGE);
        let (pages, lent) = rest.split_at_mut(2 * PAGES * PAGE);
        Self {
            read,
            cow,
            job,
            data,
            pages: pages.chunks_exact_mut(PAGE),
            lent: Some(lent),
        }
    }

    /// The next unused engine page.
    fn page(&mut self) -> Result<&'static mut [u8]> {
        self.pages
            .next()
            .ok_or(Error::new(ErrorKind::NoCapacity, "out of engine pages"))
    }
}

/// Runs the check; prints `stack-check ok` when every step worked and
/// every path stayed within the budget.
pub fn run(graph: &SharedGraph<VirtioDisk>) -> bool {
    let mut meter = Meter {
        paths: [Path {
            name: "",
            budget: 0,
            most: 0,
        }; 32],
        len: 0,
    };
    let mut graph = graph.lock();
    let flowed = flow(&mut graph, &mut meter, Buffers::take());
    let within = meter.report();
    match flowed {
        Ok(()) if within => {
            kprintln!("stack-check ok");
            true
        }
        Ok(()) => {
            kprintln!("error: a path used more stack than its budget");
            false
        }
        Err(err) => {
            kprintln!("error: stack-check: {err}");
            false
        }
    }
}

/// A guest write of `len` bytes of `pattern` at `offset`, through the
/// synchronous path with `scratch`, measured as `path`.
fn guest_write(
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    (path, guest): (&'static str, BackendId),
    (offset, len, pattern): (u64, usize, u8),
    (data, scratch): (&mut [u8], &mut [u8]),
) -> Result<()> {
    let data = &mut data[..len];
    data.fill(pattern);
    meter.measure(path, || {
        graph.backend_writev_with_scratch(guest, offset, &[data], scratch)
    })?;
    kprintln!("stack-check: guest: write -P {pattern:#04x} {offset} {len}");
    Ok(())
}

/// Where and what the guest writes while a job runs, at its `n`th write:
/// 3000 bytes somewhere in the first 15 MiB.
fn write_during_job(n: usize) -> (u64, usize, u8) {
    let offset = (n as u64 * 1_114_111) % (15 << 20);
    (offset, 3000, 0x60 + (n % 32) as u8)
}

/// Steps job `job` through [`Graph::job_step`] (measured as `path`) to
/// its end, completing it when ready, with a guest write every few steps;
/// dismisses it.
fn graph_job(
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    (guest, job, path): (BackendId, JobId, &'static str),
    buffers: &mut Buffers,
) -> Result<()> {
    for step in 0..MAX_STEPS {
        if step % 4 == 1 {
            let space = (&mut *buffers.data, &mut *buffers.cow);
            let write = write_during_job(step);
            guest_write(
                graph,
                meter,
                ("backend_write (during a job)", guest),
                write,
                space,
            )?;
        }
        let scratch = &mut *buffers.job;
        let status = meter.measure(path, || graph.job_step(job, &mut SerialResolver, scratch))?;
        match status {
            JobStatus::Ready if !graph.job_info(job)?.completing => {
                meter.measure("job_complete", || graph.job_complete(job))?;
            }
            JobStatus::Concluded => return graph.job_dismiss(job),
            _ => {}
        }
    }
    Err(Error::new(ErrorKind::Busy, "a job did not conclude"))
}

/// The whole flow (module docs).
fn flow(graph: &mut Graph<VirtioDisk>, meter: &mut Meter, mut buffers: Buffers) -> Result<()> {
    let guest = meter.measure_setup("attach_image (3-image chain)", || {
        graph.attach_image(
            &mut SerialResolver,
            "top.qcow2",
            // Jobs write into backing files: their devices open writable.
            OpenOptions {
                writable_devices: true,
                ..OpenOptions::new(Format::Qcow2).writable()
            },
            Access::READ_WRITE_DEVICE,
        )
    })?;
    let [base, mid, top] = {
        let top = graph.root(guest)?;
        let mid = graph
            .backing(top)?
            .ok_or(Error::new(ErrorKind::InvalidInput, "no mid"))?;
        let base = graph
            .backing(mid)?
            .ok_or(Error::new(ErrorKind::InvalidInput, "no base"))?;
        [base, mid, top]
    };
    requests(graph, meter, guest, &mut buffers)?;
    in_flight(graph, meter, guest, &mut buffers)?;

    // Two live snapshots; the first, empty, collapsed away.
    let s1 = VirtioDisk::by_serial("s1.qcow2", true)?;
    let s1 = meter.measure_setup("snapshot_backend", || {
        graph.snapshot_backend(&mut SerialResolver, guest, s1, "s1.qcow2")
    })?;
    let s2 = VirtioDisk::by_serial("s2.qcow2", true)?;
    let s2 = meter.measure_setup("snapshot_backend", || {
        graph.snapshot_backend(&mut SerialResolver, guest, s2, "s2.qcow2")
    })?;
    meter.measure_setup("drop_intermediate", || {
        graph.drop_intermediate(&mut SerialResolver, s2, s1, Some(top))
    })?;

    // mid into base, then top's data up into s2: base <- s2.
    let on_error = OnError::Report;
    let commit = CommitRequest {
        active: s2,
        top: mid,
        base,
        on_error,
    };
    let job = meter.measure_setup("start_commit", || graph.start_commit(commit))?;
    graph_job(
        graph,
        meter,
        (guest, job, "job_step (commit)"),
        &mut buffers,
    )?;
    let stream = StreamRequest {
        active: s2,
        base: Some(base),
        on_error,
    };
    let job = meter.measure_setup("start_stream", || graph.start_stream(stream))?;
    graph_job(
        graph,
        meter,
        (guest, job, "job_step (stream)"),
        &mut buffers,
    )?;

    // s2 into base through the engine, then once more synchronously.
    engine_active_commit(graph, meter, (guest, s2, base), &mut buffers)?;
    let s3 = VirtioDisk::by_serial("s3.qcow2", true)?;
    let s3 = meter.measure_setup("snapshot_backend", || {
        graph.snapshot_backend(&mut SerialResolver, guest, s3, "s3.qcow2")
    })?;
    let active = CommitRequest {
        active: s3,
        top: s3,
        base,
        on_error,
    };
    let job = meter.measure_setup("start_commit", || graph.start_commit(active))?;
    graph_job(
        graph,
        meter,
        (guest, job, "job_step (active commit)"),
        &mut buffers,
    )?;
    if graph.root(guest)? != base {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the guest did not pivot to base",
        ));
    }
    meter.measure("backend_flush", || graph.backend_flush(guest))?;
    meter.measure_setup("detach_backend", || graph.detach_backend(guest))
}

/// The synchronous request paths.
fn requests(
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    guest: BackendId,
    buffers: &mut Buffers,
) -> Result<()> {
    let read = &mut *buffers.read;
    meter.measure("backend_read (64 KiB over 3 layers)", || {
        graph.backend_read(guest, 1_000_000, read)
    })?;
    // Allocating writes into clusters that hold backing data: the head and
    // tail copied through 4 KiB on the stack, then through the scratch.
    let (data, cow) = (&mut *buffers.data, &mut *buffers.cow);
    let writes: [(&'static str, (u64, usize, u8), bool); 3] = [
        (
            "backend_write (allocating, no scratch)",
            (3 << 20 | 5000, 4096, 0x44),
            false,
        ),
        (
            "backend_write (allocating, scratch)",
            (5 << 20 | 7000, 4096, 0x45),
            true,
        ),
        (
            "backend_write (in place)",
            (3 << 20 | 9000, 4096, 0x46),
            false,
        ),
    ];
    for (path, write, with_scratch) in writes {
        let scratch: &mut [u8] = if with_scratch { &mut *cow } else { &mut [] };
        guest_write(graph, meter, (path, guest), write, (&mut *data, scratch))?;
    }
    let (zero, discard) = ((6 << 20, 128 << 10), (7 << 20, 64 << 10));
    meter.measure("backend_write_zeroes", || {
        graph.backend_write_zeroes(guest, zero.0, zero.1)
    })?;
    kprintln!("stack-check: guest: write -z {} {}", zero.0, zero.1);
    meter.measure("backend_discard", || {
        graph.backend_discard(guest, discard.0, discard.1)
    })?;
    kprintln!("stack-check: guest: discard {} {}", discard.0, discard.1);
    meter.measure("backend_block_status", || {
        graph.backend_block_status(guest, 0, 16 << 20)
    })?;
    meter.measure("backend_size", || graph.backend_size(guest))?;
    meter.measure("backend_flush", || graph.backend_flush(guest))
}

/// Lends the engine its copy, job and metadata buffers.
fn lend(engine: &mut Engine<'static>, buffers: &mut Buffers) -> Result<()> {
    let lent = buffers.lent.take().unwrap_or_default();
    let (bufs, metadata) = lent.split_at_mut((COPY_BUFFERS + JOB_BUFFERS) * BUF);
    let (copies, jobs) = bufs.split_at_mut(COPY_BUFFERS * BUF);
    for buf in copies.chunks_exact_mut(BUF) {
        engine.lend_copy_buffer(buf)?;
    }
    for buf in jobs.chunks_exact_mut(BUF) {
        engine.lend_job_buffer(buf)?;
    }
    for buf in metadata.chunks_exact_mut(SLICE_SIZE) {
        if engine.lend_metadata_buffer(buf).is_err() {
            return Err(Error::new(
                ErrorKind::NoCapacity,
                "a metadata buffer was refused",
            ));
        }
    }
    Ok(())
}

/// Submits a guest write of `pattern` on a fresh page at `offset` through
/// the engine.
fn submit_guest_write(
    engine: &mut Engine<'static>,
    meter: &mut Meter,
    (guest, offset, pattern): (BackendId, u64, u8),
    buffers: &mut Buffers,
) -> Result<Ticket> {
    let page = buffers.page()?;
    page.fill(pattern);
    let page: &'static [u8] = page;
    kprintln!("stack-check: guest: write -P {pattern:#04x} {offset} {PAGE}");
    meter.measure("Engine::submit_write", || {
        engine.submit_write(guest, offset, [page])
    })
}

/// Polls `engine` (measured) until `ticket` is done; its result.
fn wait(
    engine: &mut Engine<'static>,
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    ticket: Ticket,
) -> Result<()> {
    loop {
        if let Some(done) = engine.take(ticket)? {
            return done.result;
        }
        meter.measure("Engine::poll", || engine.poll(graph));
    }
}

/// Requests in flight: writes (allocating, copy-on-write through lent
/// buffers) and reads, [`PAGES`] at once, collected as they finish.
fn in_flight(
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    guest: BackendId,
    buffers: &mut Buffers,
) -> Result<()> {
    let mut engine = ENGINE.lock();
    lend(&mut engine, buffers)?;
    let mut tickets: [Option<Ticket>; PAGES] = [None; PAGES];
    for (i, ticket) in tickets.iter_mut().enumerate() {
        let offset = 8 << 20 | (i as u64 * 69_632);
        *ticket = Some(if i % 2 == 0 {
            let write = (guest, offset, 0x50 + i as u8);
            submit_guest_write(&mut engine, meter, write, buffers)?
        } else {
            let page = buffers.page()?;
            meter.measure("Engine::submit_read", || {
                engine.submit_read(guest, offset, [page])
            })?
        });
    }
    for ticket in tickets.into_iter().flatten() {
        wait(&mut engine, graph, meter, ticket)?;
    }
    Ok(())
}

/// Active commit of `top` into `base` through [`Engine::job_step`], with
/// guest writes through the engine while it runs; completed with the pivot.
fn engine_active_commit(
    graph: &mut Graph<VirtioDisk>,
    meter: &mut Meter,
    (guest, top, base): (BackendId, NodeId, NodeId),
    buffers: &mut Buffers,
) -> Result<()> {
    let mut engine = ENGINE.lock();
    let request = CommitRequest {
        active: top,
        top,
        base,
        on_error: OnError::Report,
    };
    let job = meter.measure_setup("start_commit", || graph.start_commit(request))?;
    let mut writes = 0;
    let mut pending = None;
    for step in 0..MAX_STEPS {
        if step % 4 == 1 && writes < PAGES && pending.is_none() {
            let (offset, _, pattern) = write_during_job(100 + writes);
            let offset = offset & !(PAGE as u64 - 1);
            pending = Some(submit_guest_write(
                &mut engine,
                meter,
                (guest, offset, pattern),
                buffers,
            )?);
            writes += 1;
        }
        if let Some(ticket) = pending {
            if let Some(done) = engine.take(ticket)? {
                done.result?;
                pending = None;
            }
        }
        let status = meter.measure("Engine::job_step (active commit)", || {
            engine.job_step(graph, job, &mut SerialResolver)
        })?;
        meter.measure("Engine::poll", || engine.poll(graph));
        match status {
            JobStatus::Ready if !graph.job_info(job)?.completing => {
                meter.measure("job_complete", || graph.job_complete(job))?;
            }
            JobStatus::Concluded => {
                if let Some(ticket) = pending {
                    wait(&mut engine, graph, meter, ticket)?;
                }
                engine.drain(graph);
                return graph.job_dismiss(job);
            }
            _ => {}
        }
    }
    Err(Error::new(
        ErrorKind::Busy,
        "the engine's active commit did not conclude",
    ))
}
