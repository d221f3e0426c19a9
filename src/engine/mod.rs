//! The request engine: many guest requests in flight on one graph, in fixed
//! storage (design: `docs/engine.md`).
//!
//! A VMM *submits* requests ([`Engine::submit_read`], [`Engine::submit_write`],
//! [`Engine::submit_write_zeroes`], [`Engine::submit_discard`],
//! [`Engine::submit_flush`]) through a BlockBackend, each with its guest
//! buffers (scatter-gather), gets a [`Ticket`], calls [`Engine::poll`] to
//! make progress (or [`Engine::advance`], which blocks in the devices when
//! nothing can progress without them), and collects finished requests with
//! [`Engine::complete`] or [`Engine::take`] (or waits for one with
//! [`Engine::wait`]). A finished
//! read gives its buffers back ([`Done::buffers`]), in guest order, cut at
//! the extents the chain mapped them to.
//!
//! - **Reads** and **writes to clusters the image owns** are planned through
//!   the metadata cache and go to the devices as split-phase operations
//!   ([`Queue`]): many are in flight at once, from many requests, and
//!   complete in any order. Zero ranges are filled at once.
//! - **Allocating writes** on qcow2 that fit one allocation batch and
//!   replace no storage (module `alloc`) allocate at start and send the
//!   guest's buffers to the devices too; their new clusters are mapped in
//!   the metadata cache once all of that data has completed, in the poll
//!   that collects the last operation, before any later request starts. At
//!   most [`ALLOCATIONS`] are in flight; a request overlapping the
//!   clusters of one on its chain waits for it (QEMU's dependent-request
//!   rule).
//! - **Flushes** start once every request submitted before them has
//!   finished (later ones go by), so they cover them. When no layer of the
//!   chain holds table updates not yet written back (in-place writes only
//!   since the last flush), a flush is device flushes in flight like any
//!   operation; with updates and metadata buffers lent, it writes them
//!   back as device operations in R3's order (module `writeback`), holding
//!   allocations meanwhile; otherwise it is synchronous (below).
//! - Everything else — other allocating writes, zero writes, discards,
//!   compressed reads, flushes with table updates and no buffers — runs
//!   the graph's **synchronous path** in the poll, with its crash-ordering
//!   rules, once no request or job run in flight touches the clusters it
//!   covers and no write-back holds the metadata (until then it waits, a
//!   dependency like the others): requests elsewhere stay in flight.
//! - **Metadata misses** of a read's or write's plan load split-phase when
//!   the VMM lent the engine metadata buffers
//!   ([`Engine::lend_metadata_buffer`], module `miss`): the request waits
//!   for its slice while others go ahead. Without buffers (the default) a
//!   plan loads what it misses synchronously, in the poll.
//! - Requests start in submission order, except that one waiting for a
//!   dependency (an overlapping allocation or request in flight, a free
//!   allocation entry, its image's check before a first write, a metadata
//!   load) lets later requests start that overlap no waiting request of
//!   the same backend: a request never overtakes an earlier one it
//!   overlaps.
//!
//! Chain changes (collapse, pivot, snapshot, detaching the backend) and
//! synchronous job steps are refused with [`ErrorKind::Busy`] while
//! requests are in flight through the chain they touch
//! ([`Graph::has_requests_in_flight`]): run them in a drained section,
//! [`Engine::drained`] (non-blocking: requests submitted meanwhile wait and
//! start after it) or after [`Engine::drain`] (blocking). Jobs run through
//! [`Engine::job_step`] (module `job`): their copies go to the devices
//! among the guest's requests, through buffers the VMM lends
//! ([`Engine::lend_job_buffer`]); only their state changes and pivot take
//! a drained section.
//!
//! Memory: a slot is about `80 + 16 × (SEGMENTS + PIECES)` bytes (buffers
//! are borrowed, not stored), and each of the [`ALLOCATIONS`] entries for
//! allocating writes in flight about 3.2 KiB (its batch of new clusters),
//! each of the [`METADATA_BUFFERS`] entries 104 bytes (the lent 4 KiB
//! buffers are the VMM's), the [`JOB_LANES`] job lanes 176 bytes each (the
//! lent job buffers are the VMM's too), a flush's write-back state about
//! 670 bytes; the default engine (64 slots, 16 segments, 32 pieces, 4
//! allocations) is about 70 KiB (`blockgraph sizes`). A read
//! that the chain cuts into more than `PIECES` pieces takes the
//! synchronous path.

mod alloc;
mod cow;
mod job;
mod miss;
mod writeback;

use crate::backend::BackendId;
use crate::device::{Op, Queue, Submitted, Tag};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::qcow2::Batch;
use crate::graph::{Graph, NodeId, Perm, ReadExtent};

/// Bytes of each metadata buffer a VMM lends ([`Engine::lend_metadata_buffer`]):
/// one slice of the metadata cache.
pub use crate::format::cache::SLICE_SIZE;
use alloc::Allocation;
pub use alloc::ALLOCATIONS;
pub use cow::COPY_BUFFERS;
use cow::{CopyBuffer, COW_PIECE};
pub use job::JOB_LANES;
use job::{JobCopies, JOB_SLOT};
pub use miss::METADATA_BUFFERS;
use miss::{plan_or_load, Load, LOAD_SLOT};
use writeback::{WriteBack, WRITEBACK_SLOT};

/// Default number of requests an [`Engine`] keeps in flight.
pub const DEFAULT_SLOTS: usize = 64;
/// Default number of guest buffers one request may carry.
pub const DEFAULT_SEGMENTS: usize = 16;
/// Default number of pieces a read's buffers may be cut into.
pub const DEFAULT_PIECES: usize = 32;

/// Names a submitted request until it is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    slot: u16,
    generation: u16,
}

/// A finished request: its result and, for a read, its buffers.
#[derive(Debug)]
pub struct Done<'b, const PIECES: usize = DEFAULT_PIECES> {
    /// The request's result.
    pub result: Result<()>,
    pieces: [Option<&'b mut [u8]>; PIECES],
}

impl<'b, const PIECES: usize> Done<'b, PIECES> {
    /// A read's buffers, given back in guest order (cut where the chain's
    /// extents begin); nothing for other requests.
    pub fn buffers(&mut self) -> impl Iterator<Item = &mut [u8]> + use<'_, 'b, PIECES> {
        self.pieces.iter_mut().flatten().map(|piece| &mut **piece)
    }

    /// The buffers, for keeping beyond this value.
    pub fn into_buffers(self) -> impl Iterator<Item = &'b mut [u8]> {
        self.pieces.into_iter().flatten()
    }
}

/// What a request does, with its buffers.
enum Payload<'b, const S: usize> {
    Read(heapless::Vec<&'b mut [u8], S>),
    Write(heapless::Vec<&'b [u8], S>),
    WriteZeroes(u64),
    Discard(u64),
    Flush,
}

/// What starting a queued request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// It started (or finished at once).
    Started,
    /// It waits for a dependency (an overlapping allocation in flight, a
    /// free allocation entry, its image's first-write check, a metadata
    /// slice loading); later
    /// requests that do not overlap it may start.
    Wait,
    /// A drained section or a job's synchronous step is due: nothing later
    /// starts either.
    Barrier,
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Submitted, not started.
    Queued,
    /// Device operations in flight.
    Running,
    /// Finished, waiting to be collected.
    Done,
}

struct Slot<'b, const S: usize, const P: usize> {
    generation: u16,
    seq: u64,
    backend: BackendId,
    offset: u64,
    len: u64,
    payload: Payload<'b, S>,
    /// A read's buffers as cut, by piece index; in flight ones are `None`.
    pieces: [Option<&'b mut [u8]>; P],
    state: State,
    /// Device operations in flight.
    ops: u32,
    /// The first error met.
    error: Option<Error>,
    /// The node whose chain this request holds while its operations are in
    /// flight ([`Graph::has_requests_in_flight`]).
    held: Option<NodeId>,
    /// A read that the plan found in one extent: issued without walking
    /// the chain again.
    extent: Option<ReadExtent>,
    /// The metadata load (module `miss`) this request waits for.
    load: Option<usize>,
    /// A write sent to the devices from this node: an active commit of it
    /// marks the range dirty when the write is issued (so what is dirty
    /// counts the writes in flight) and again once it completes (so a job
    /// run that read the range meanwhile copies it again; module `job`).
    written: Option<NodeId>,
    /// Metadata slices its plans missed so far (module `miss`).
    misses: u8,
}

impl<'b, const S: usize, const P: usize> Slot<'b, S, P> {
    fn fail(&mut self, err: Error) {
        self.error.get_or_insert(err);
    }

    /// Whether this request, if it writes, may be planned now: its image's
    /// check before a first write has run. Otherwise one bounded step of
    /// it runs here (so no poll reads every L2 table of a large image) and
    /// the request waits. An error lets the plan report it.
    fn writes_prepared<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &self,
        graph: &mut Graph<D, N, B, C, J>,
    ) -> bool {
        if matches!(self.payload, Payload::Read(_) | Payload::Flush) {
            return true;
        }
        match root_for(graph, self.backend, true) {
            Ok(root) => graph
                .prepare_writes_step(root, PREPARE_STEP)
                .unwrap_or(true),
            Err(_) => true,
        }
    }
}

/// Requests in flight on a graph: `SLOTS` of them, each with up to
/// `SEGMENTS` guest buffers that live for `'b`, cut into at most `PIECES`
/// pieces.
///
/// # Example
///
/// A write and four reads submitted together, then collected (a VMM
/// polls from its event loop with [`Engine::poll`] and
/// [`Engine::complete`]; [`Engine::wait`] is the blocking wrapper):
///
/// ```
/// # use blockgraph::device::MemDevice;
/// # use blockgraph::format::qcow2::create::{create, CreateOptions};
/// # use blockgraph::{Access, Format, Graph};
/// use blockgraph::engine::Engine;
///
/// # fn main() -> blockgraph::Result<()> {
/// # let mut disk = vec![0u8; 4 << 20];
/// # let mut device = MemDevice::new(&mut disk, 0, 1)?;
/// # create(&mut device, &CreateOptions::new(64 << 20))?;
/// # let mut graph: Box<Graph<MemDevice<'_>>> = Box::default();
/// # let guest = graph.attach_device(device, "disk.qcow2", Format::Qcow2, Access::READ_WRITE_DEVICE)?;
/// // The guest's buffers outlive the engine, which borrows them.
/// let data = [0x5au8; 4096];
/// let mut pages = [[0u8; 4096]; 4];
/// let mut engine: Engine<'_> = Engine::new();
/// let write = engine.submit_write(guest, 0, [&data[..]])?;
/// let mut reads = Vec::new();
/// for (i, page) in pages.iter_mut().enumerate() {
///     // The read of page 0 overlaps the write: it starts after it.
///     reads.push(engine.submit_read(guest, i as u64 * 4096, [&mut page[..]])?);
/// }
/// engine.wait(&mut graph, write)?.result?;
/// for (i, read) in reads.into_iter().enumerate() {
///     let mut done = engine.wait(&mut graph, read)?;
///     done.result?;
///     let want = if i == 0 { 0x5a } else { 0 };
///     assert!(done.buffers().flatten().all(|b| *b == want));
/// }
/// # Ok(())
/// # }
/// ```
pub struct Engine<
    'b,
    const SLOTS: usize = DEFAULT_SLOTS,
    const SEGMENTS: usize = DEFAULT_SEGMENTS,
    const PIECES: usize = DEFAULT_PIECES,
> {
    slots: [Option<Slot<'b, SEGMENTS, PIECES>>; SLOTS],
    generations: [u16; SLOTS],
    next_seq: u64,
    /// Device operations in flight, over all slots.
    ops: usize,
    /// A drained section waits ([`Engine::drained`]): no request starts.
    draining: bool,
    /// Allocating writes whose data operations are in flight.
    allocations: [Option<Allocation>; ALLOCATIONS],
    /// The new clusters of each allocation entry (kept apart and reused in
    /// place: a batch is 2.5 KiB, too much to build on the stack).
    batches: [Batch; ALLOCATIONS],
    /// Lent metadata buffers and their loads (module `miss`).
    loads: [Load<'b>; METADATA_BUFFERS],
    /// The lent job buffers and the job runs in flight (module `job`).
    job: JobCopies<'b>,
    /// A flush's write-back of table updates (module `writeback`).
    writeback: Option<WriteBack>,
    /// Lent buffers for the copy-on-write of allocating writes (module
    /// `cow`).
    copies: [CopyBuffer<'b>; COPY_BUFFERS],
}

impl<const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize> Default
    for Engine<'_, SLOTS, SEGMENTS, PIECES>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Request slots are told apart from metadata loads and job runs in
    /// device tags.
    const SLOTS_FIT_TAGS: () = assert!(
        SLOTS < WRITEBACK_SLOT
            && WRITEBACK_SLOT < JOB_SLOT
            && JOB_SLOT < LOAD_SLOT
            && PIECES < COW_PIECE
            && SEGMENTS <= crate::graph::MAX_SEGMENTS,
        "too many request slots, segments or pieces"
    );

    /// An engine with no requests; `const` so it can live in a `static`.
    pub const fn new() -> Self {
        let () = Self::SLOTS_FIT_TAGS;
        Self {
            slots: [const { None }; SLOTS],
            generations: [0; SLOTS],
            next_seq: 0,
            ops: 0,
            draining: false,
            allocations: [const { None }; ALLOCATIONS],
            batches: [const { Batch::new() }; ALLOCATIONS],
            loads: [const { Load::IDLE }; METADATA_BUFFERS],
            job: JobCopies::IDLE,
            writeback: None,
            copies: [const { CopyBuffer::IDLE }; COPY_BUFFERS],
        }
    }

    /// Requests submitted and not yet collected.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Whether no request is held.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Requests submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.state != State::Done)
            .count()
    }

    /// Device operations in flight.
    pub fn operations(&self) -> usize {
        self.ops
    }

    /// Submits a read of guest bytes at `offset` of `backend` into
    /// `segments`, in order.
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when every slot is in use,
    /// [`ErrorKind::InvalidInput`] for more than `SEGMENTS` buffers.
    pub fn submit_read(
        &mut self,
        backend: BackendId,
        offset: u64,
        segments: impl IntoIterator<Item = &'b mut [u8]>,
    ) -> Result<Ticket> {
        let (list, len) = gather(segments)?;
        self.submit(backend, (offset, len), Payload::Read(list))
    }

    /// Submits a write of `segments`, in order, at guest `offset` of
    /// `backend`.
    ///
    /// # Errors
    /// As [`Engine::submit_read`].
    pub fn submit_write(
        &mut self,
        backend: BackendId,
        offset: u64,
        segments: impl IntoIterator<Item = &'b [u8]>,
    ) -> Result<Ticket> {
        let (list, len) = gather(segments)?;
        self.submit(backend, (offset, len), Payload::Write(list))
    }

    /// Submits a write of `len` zero bytes at `offset` of `backend`
    /// ([`Graph::write_zeroes`]).
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when every slot is in use.
    pub fn submit_write_zeroes(
        &mut self,
        backend: BackendId,
        offset: u64,
        len: u64,
    ) -> Result<Ticket> {
        self.submit(backend, (offset, len), Payload::WriteZeroes(len))
    }

    /// Submits a discard of `len` bytes at `offset` of `backend`
    /// ([`Graph::discard`]).
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when every slot is in use.
    pub fn submit_discard(&mut self, backend: BackendId, offset: u64, len: u64) -> Result<Ticket> {
        self.submit(backend, (offset, len), Payload::Discard(len))
    }

    /// Submits a flush of `backend`: it completes when every write that
    /// completed before it was submitted is durable.
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when every slot is in use.
    pub fn submit_flush(&mut self, backend: BackendId) -> Result<Ticket> {
        self.submit(backend, (0, 0), Payload::Flush)
    }

    fn submit(
        &mut self,
        backend: BackendId,
        (offset, len): (u64, u64),
        payload: Payload<'b, SEGMENTS>,
    ) -> Result<Ticket> {
        let Some(index) = self.slots.iter().position(Option::is_none) else {
            return fail(ErrorKind::NoCapacity, "every request slot is in use");
        };
        let generation = self.generations[index];
        self.slots[index] = Some(Slot {
            generation,
            seq: self.next_seq,
            backend,
            offset,
            len,
            payload,
            pieces: [const { None }; PIECES],
            state: State::Queued,
            ops: 0,
            error: None,
            held: None,
            extent: None,
            load: None,
            misses: 0,
            written: None,
        });
        self.next_seq += 1;
        Ok(Ticket {
            slot: index as u16,
            generation,
        })
    }

    /// Takes finished request `ticket`, freeing its slot; `None` while it
    /// is not finished.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a ticket already collected.
    pub fn take(&mut self, ticket: Ticket) -> Result<Option<Done<'b, PIECES>>> {
        let index = usize::from(ticket.slot);
        match self.slots.get(index) {
            Some(Some(slot)) if slot.generation == ticket.generation => {
                Ok((slot.state == State::Done).then(|| self.release(index)))
            }
            _ => fail(ErrorKind::StaleHandle, "request ticket already collected"),
        }
    }

    /// Collects the earliest-submitted finished request, if any.
    pub fn complete(&mut self) -> Option<(Ticket, Done<'b, PIECES>)> {
        let (index, generation) = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| s.state == State::Done)
            .min_by_key(|(_, s)| s.seq)
            .map(|(i, s)| (i, s.generation))?;
        let ticket = Ticket {
            slot: index as u16,
            generation,
        };
        Some((ticket, self.release(index)))
    }

    fn release(&mut self, index: usize) -> Done<'b, PIECES> {
        self.generations[index] = self.generations[index].wrapping_add(1);
        let slot = self.slots[index].take();
        slot.map_or(
            Done {
                result: Ok(()),
                pieces: [const { None }; PIECES],
            },
            |slot| Done {
                result: slot.error.map_or(Ok(()), Err),
                pieces: slot.pieces,
            },
        )
    }

    /// Makes progress: collects device completions and starts the requests
    /// that can start. Returns the number of requests still in flight.
    /// Never blocks.
    pub fn poll<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) -> usize {
        self.step(graph);
        self.in_flight()
    }

    /// Polls; when that collected no completion and started no request,
    /// first blocks until a device completes an operation ([`Queue::wait`])
    /// and polls again. Returns the number of requests still in flight.
    /// For a VMM with nothing else to do until a request finishes: it
    /// waits for the kernel instead of spinning.
    pub fn advance<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) -> usize {
        if !self.step(graph) && self.ops > 0 {
            block(graph);
            self.step(graph);
        }
        self.in_flight()
    }

    /// One round of [`Engine::poll`]: whether it collected a completion or
    /// started a request.
    fn step<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) -> bool {
        let mut progressed = false;
        if self.ops > 0 {
            progressed = self.collect(graph) > 0;
            // Requests waiting for a load are planned again below.
            self.finish_loads(graph);
        }
        // Copies-on-write go on; then, before any later request starts,
        // the allocations whose data all landed are linked: a flush or a
        // read after them sees the new clusters mapped (unless a
        // write-back holds the links: those requests finish after it).
        self.advance_copies_on_write(graph);
        self.finish_allocations(graph);
        self.advance_write_back(graph);
        // A job's run goes on (or, waiting for the devices to go quiet,
        // holds back every request).
        self.advance_copies(graph);
        self.job.since_step = self.job.since_step.saturating_add(1);
        // Queued requests in submission order. One that waits for a
        // dependency lets later ones start unless they overlap it (or
        // another waiting one) on the same backend; a drained section or a
        // job's synchronous step that waits for the devices stops the round.
        let mut waiting = heapless::Vec::<(BackendId, u64, u64), SLOTS>::new();
        let mut after = None;
        while let Some(index) = self.next_queued(after) {
            let Some(slot) = self.slots[index].as_ref() else {
                break;
            };
            after = Some(slot.seq);
            let range = (
                slot.backend,
                slot.offset,
                slot.offset.saturating_add(slot.len),
            );
            let behind = waiting
                .iter()
                .any(|w| w.0 == range.0 && range.1 < w.2 && w.1 < range.2);
            let started = match self.draining || self.job.holds_requests() {
                true => Start::Barrier,
                false if behind => Start::Wait,
                false => self.start(graph, index),
            };
            match started {
                Start::Started => progressed = true,
                // Never full: one entry per slot.
                Start::Wait => {
                    let _ = waiting.push(range);
                }
                Start::Barrier => break,
            }
        }
        self.settle_finished(graph);
        progressed
    }

    /// What finished requests leave behind, before the VMM sees them
    /// finished: their chains let go, their writes marked in the dirty
    /// bitmap of an active commit (on completion, so a job run that read
    /// the range meanwhile copies it again).
    fn settle_finished<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        for slot in self.slots.iter_mut().flatten() {
            if slot.state != State::Done {
                continue;
            }
            if let Some(root) = slot.held.take() {
                graph.hold_chain(root, false);
            }
            if let Some(root) = slot.written.take() {
                graph.note_guest_write(root, slot.offset, slot.len);
            }
        }
    }

    /// Polls until request `ticket` finishes and takes it (other finished
    /// requests stay to be collected). A pending [`Engine::drained`]
    /// section is given up: every request may start.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a collected ticket; the request's own
    /// error is in [`Done::result`].
    pub fn wait<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        ticket: Ticket,
    ) -> Result<Done<'b, PIECES>> {
        self.draining = false;
        loop {
            if let Some(done) = self.take(ticket)? {
                return Ok(done);
            }
            self.advance(graph);
        }
    }

    /// Polls until no request is in flight (finished ones stay to be
    /// collected), blocking in the devices while nothing else can progress
    /// ([`Engine::advance`]). Call it before changing the graph's chains.
    pub fn drain<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        while self.advance(graph) > 0 || self.job.copy_in_flight() {}
    }

    /// Runs `change` on the graph in a drained section, without blocking:
    /// once no device operation of the engine is in flight, so that no
    /// request holds a chain. Returns `None` while operations are in
    /// flight; from then on the engine starts no new request (queued ones
    /// wait, in order) until a later call runs `change`: poll and call
    /// again.
    ///
    /// This is how a VMM runs chain changes (snapshot, pivot, collapse)
    /// and job steps ([`Graph::job_step`]) while its guest keeps submitting:
    /// requests queued meanwhile start after `change`, through the chain as
    /// `change` left it (a pivoted backend reaches its new root).
    pub fn drained<
        T,
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        change: impl FnOnce(&mut Graph<D, N, B, C, J>) -> T,
    ) -> Option<T> {
        self.draining = true;
        self.poll(graph);
        if self.ops > 0 || self.job.copy_in_flight() || self.writing_back() {
            return None;
        }
        self.draining = false;
        let changed = change(graph);
        self.poll(graph);
        Some(changed)
    }

    /// Gives up a pending [`Engine::drained`] section: queued requests
    /// start again (a VMM that must see requests finish before it can run
    /// its change, or that no longer wants it, calls this; a later
    /// [`Engine::drained`] asks again).
    pub fn cancel_drained(&mut self) {
        self.draining = false;
    }

    /// The queued request submitted first (after sequence number `after`).
    fn next_queued(&self, after: Option<u64>) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| s.state == State::Queued && after.is_none_or(|a| s.seq > a))
            .min_by_key(|(_, s)| s.seq)
            .map(|(i, _)| i)
    }

    /// Takes the completed device operations of every busy device; returns
    /// how many.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    fn collect<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) -> usize {
        let before = self.ops;
        let (slots, ops, loads) = (&mut self.slots, &mut self.ops, &mut self.loads);
        let copies = &mut self.job;
        let writeback = &mut self.writeback;
        let (cow_buffers, allocations) = (&mut self.copies, &mut self.allocations);
        for device in graph.devices.iter_mut().flatten() {
            if !device.busy() {
                continue;
            }
            device.poll(&mut |tag, result, buf| {
                let (index, piece) = untag(tag);
                if index == LOAD_SLOT {
                    miss::collected(loads, piece, result, buf);
                    *ops -= 1;
                    return;
                }
                if index == JOB_SLOT {
                    job::collected(copies, piece, result, buf);
                    *ops -= 1;
                    return;
                }
                if index == WRITEBACK_SLOT {
                    writeback::collected((writeback, loads), piece, result, buf);
                    *ops -= 1;
                    return;
                }
                let Some(Some(slot)) = slots.get_mut(index) else {
                    return;
                };
                // A copy-on-write's operation: its buffer goes back to
                // its entry (module `cow`).
                let buf = match piece.checked_sub(COW_PIECE) {
                    Some(copy) => {
                        let cows = allocations
                            .iter_mut()
                            .flatten()
                            .flat_map(|a| a.cows.iter_mut().flatten());
                        cow::collected(cow_buffers, cows, copy, buf);
                        None
                    }
                    None => buf,
                };
                if let Err(err) = result {
                    slot.fail(err);
                }
                if let (Some(buf), Some(place)) = (buf, slot.pieces.get_mut(piece)) {
                    *place = Some(buf);
                }
                slot.ops -= 1;
                *ops -= 1;
                if slot.ops == 0 && slot.state == State::Running {
                    slot.state = State::Done;
                }
            });
        }
        before - self.ops
    }

    /// Whether a request submitted before sequence number `seq` has not
    /// finished.
    fn earlier_unfinished(&self, seq: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|s| s.seq < seq && s.state != State::Done)
    }

    /// Whether a request or a job run in flight touches the clusters of
    /// queued request `index` (its guest range widened to its root's
    /// clusters), on any chain: what the synchronous path may replace or
    /// release there must not change under a device operation.
    fn overlaps_in_flight<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &self,
        graph: &Graph<D, N, B, C, J>,
        index: usize,
    ) -> bool {
        let Some(slot) = self.slots[index].as_ref() else {
            return false;
        };
        let (start, end) = match graph.root(slot.backend) {
            Ok(root) => graph.cluster_span(root, slot.offset, slot.len),
            Err(_) => (slot.offset, slot.offset.saturating_add(slot.len)),
        };
        let hits = |(offset, len): (u64, u64)| start < offset.saturating_add(len) && offset < end;
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.state == State::Running)
            .any(|s| hits((s.offset, s.len)))
            || self.job.runs_in_flight().any(hits)
    }

    /// Starts queued request `index`; `false` when it must wait: it
    /// overlaps an allocation in flight, it allocates and every entry for
    /// allocations is taken, or it takes the synchronous path and a request
    /// or job run in flight touches its clusters.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    fn start<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        index: usize,
    ) -> Start {
        if self.waits_for_allocation(graph, index) || self.waits_for_job(graph, index) {
            return Start::Wait;
        }
        let Some(slot) = self.slots[index].as_mut() else {
            return Start::Started;
        };
        if slot.load.is_some() {
            return Start::Wait;
        }
        if !slot.writes_prepared(graph) {
            // A step of the image's check before its first write is done;
            // the request waits for the next poll (the check's errors are
            // the request's, met again in the plan).
            return Start::Wait;
        }
        let seq = slot.seq;
        let flush = matches!(slot.payload, Payload::Flush);
        if flush && self.earlier_unfinished(seq) {
            // A flush starts once every request submitted before it has
            // finished, so it covers them; later ones go by meanwhile.
            return Start::Wait;
        }
        let Some(slot) = self.slots[index].as_mut() else {
            return Start::Started;
        };
        let route = match plan_or_load((&mut self.loads, &mut self.ops), graph, slot) {
            None => return Start::Wait,
            Some(Ok(route)) => route,
            Some(Err(err)) => {
                slot.fail(err);
                slot.state = State::Done;
                return Start::Started;
            }
        };
        if let Route::Allocate(root) = route {
            return match self.start_allocating(graph, index, root) {
                true => Start::Started,
                false => Start::Wait,
            };
        }
        if route == Route::Direct {
            let queued = issue(graph, slot, index);
            self.ops += queued;
            if queued > 0 {
                // Until they complete, no chain change may touch the chain.
                if let Ok(root) = graph.root(slot.backend) {
                    graph.hold_chain(root, true);
                    slot.held = Some(root);
                }
            }
            slot.state = if slot.ops == 0 {
                State::Done
            } else {
                State::Running
            };
            return Start::Started;
        }
        let root = graph.root(slot.backend);
        if let (Payload::Flush, Ok(root)) = (&slot.payload, root) {
            // A chain with an external data file takes the synchronous
            // path: its data file is flushed before mappings go out (R3).
            if self.can_write_back() && !graph.chain_has_data_file(root) {
                self.start_write_back(graph, index, root);
                return Start::Started;
            }
        }
        // The synchronous path, in the poll, once nothing in flight could
        // see it half done: no request or job run on the clusters it
        // touches, no write-back holding the metadata still.
        if self.writing_back() || self.overlaps_in_flight(graph, index) {
            return Start::Wait;
        }
        let Some(slot) = self.slots[index].as_mut() else {
            return Start::Started;
        };
        let scratch = cow::idle_copy_buffer(&mut self.copies);
        if let Err(err) = run_synchronously(graph, slot, scratch) {
            slot.fail(err);
        }
        slot.state = State::Done;
        Start::Started
    }
}

/// Blocks until the first busy device of `graph` has a completion to report
/// ([`Queue::wait`]). One device is enough: the caller polls them all
/// afterwards, and a device that completes operations on its own returns
/// at once.
fn block<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
) {
    if let Some(device) = graph.devices.iter_mut().flatten().find(|d| d.busy()) {
        device.wait();
    }
}

/// Device operation `piece` of request slot `index`.
fn tag(index: usize, piece: usize) -> Tag {
    Tag(((index as u32) << 16) | piece as u32)
}

/// The slot and piece of a device operation.
fn untag(tag: Tag) -> (usize, usize) {
    ((tag.0 >> 16) as usize, (tag.0 & 0xffff) as usize)
}

/// A request's buffers (at most `S`) and their total length.
fn gather<T: AsRef<[u8]>, const S: usize>(
    segments: impl IntoIterator<Item = T>,
) -> Result<(heapless::Vec<T, S>, u64)> {
    let mut list = heapless::Vec::new();
    let mut len = 0u64;
    for segment in segments {
        len += segment.as_ref().len() as u64;
        if list.push(segment).is_err() {
            return fail(
                ErrorKind::InvalidInput,
                "more guest buffers than a request may carry",
            );
        }
    }
    Ok((list, len))
}

/// The format node a request goes to, after the backend's permission check.
fn root_for<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &Graph<D, N, B, C, J>,
    backend: BackendId,
    write: bool,
) -> Result<NodeId> {
    if write && !graph.backend_access(backend)?.perm.contains(Perm::WRITE) {
        return fail(ErrorKind::ReadOnly, "backend is attached read-only");
    }
    graph.root(backend)
}

/// Table entries one poll examines of an image's check before its first
/// write ([`Graph::prepare_writes_step`]): a few 4 KiB reads.
const PREPARE_STEP: u64 = 4096;

/// How a request goes to the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// As split-phase operations, the cache's mappings as they are.
    Direct,
    /// A write allocating in this qcow2 node, its data operations in flight
    /// (module `alloc`).
    Allocate(NodeId),
    /// Through the synchronous path, once nothing in flight touches its
    /// clusters.
    Synchronous,
}

/// How `slot` goes to the devices. Nothing is written.
fn plan<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
    const P: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    slot: &mut Slot<'b, S, P>,
) -> Result<Route> {
    let (offset, len) = (slot.offset, slot.len);
    match &slot.payload {
        Payload::Read(segments) => {
            let root = root_for(graph, slot.backend, false)?;
            if len == 0 {
                return Ok(Route::Direct);
            }
            graph.check_range(root, offset, len)?;
            // Pieces: one per extent, plus one per segment boundary inside.
            let mut pieces = segments.len();
            let mut pos = offset;
            while pos < offset + len {
                let (extent, run) = graph.read_extent(root, pos, offset + len - pos)?;
                if extent == ReadExtent::Slow {
                    return Ok(Route::Synchronous);
                }
                if run == len {
                    slot.extent = Some(extent);
                }
                pieces += 1;
                pos += run;
            }
            Ok(match pieces <= P {
                true => Route::Direct,
                false => Route::Synchronous,
            })
        }
        Payload::Write(segments) => {
            let root = root_for(graph, slot.backend, true)?;
            if len == 0 {
                return Ok(Route::Direct);
            }
            if graph.write_blocking_base(root).is_some() {
                // Written to the commit's base too, by the synchronous
                // path, before the request completes.
                return Ok(Route::Synchronous);
            }
            // The whole request is validated before any of it is written.
            graph.check_write(root, offset, len)?;
            if !segments_end_aligned(offset, segments) {
                // Each segment would be a device write of its own: the
                // synchronous path writes them as one.
                return Ok(Route::Synchronous);
            }
            let mut pos = offset;
            while pos < offset + len {
                match graph.in_place_extent(root, pos, offset + len - pos)? {
                    Some((_, _, run)) => pos += run,
                    None if graph.allocates_in_flight(root, offset, len)? => {
                        return Ok(Route::Allocate(root))
                    }
                    None => return Ok(Route::Synchronous),
                }
            }
            Ok(Route::Direct)
        }
        Payload::Flush => {
            // Device flushes in flight when no table update waits to be
            // written back (R3 needs the synchronous order otherwise).
            let root = graph.root(slot.backend)?;
            Ok(match graph.flush_files(root) {
                Some(_) => Route::Direct,
                None => Route::Synchronous,
            })
        }
        Payload::WriteZeroes(_) | Payload::Discard(_) => Ok(Route::Synchronous),
    }
}

/// Whether every boundary between `segments` of a write at guest `offset`
/// lies on a 4 KiB boundary of the guest or at one of the write's ends
/// (empty segments), so that device writes cut there never split a block
/// (or a 512-byte sector) the write does not split anyway.
fn segments_end_aligned(offset: u64, segments: &[&[u8]]) -> bool {
    let end = offset + segments.iter().map(|s| s.len() as u64).sum::<u64>();
    let mut at = offset;
    let inner = segments.len().saturating_sub(1);
    segments[..inner].iter().all(|segment| {
        at += segment.len() as u64;
        at.is_multiple_of(4096) || at == offset || at == end
    })
}

/// Hands a planned request's extents to the devices; returns how many
/// operations went in flight (the others completed at once).
fn issue<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
    const P: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    slot: &mut Slot<'b, S, P>,
    index: usize,
) -> usize {
    let offset = slot.offset;
    let write = matches!(slot.payload, Payload::Write(_));
    let mut queued = 0;
    let result = root_for(graph, slot.backend, write).and_then(|root| match &mut slot.payload {
        Payload::Read(segments) => {
            let segments = core::mem::take(segments);
            let target = Target {
                root,
                index,
                whole: slot.extent.map(|extent| (extent, offset)),
                pieces: &mut slot.pieces,
            };
            issue_read(graph, target, offset, segments, &mut queued)
        }
        Payload::Write(segments) => {
            graph.note_guest_write(root, offset, slot.len);
            slot.written = Some(root);
            let segments = core::mem::take(segments);
            let at = (root, tag(index, 0));
            issue_write(graph, at, (offset, None), &segments, &mut queued)
        }
        Payload::Flush => {
            let Some(files) = graph.flush_files(root) else {
                return fail(ErrorKind::Busy, "a planned flush found table updates");
            };
            for file in files {
                submit(graph, (file, tag(index, 0)), Op::Flush, &mut queued)?;
            }
            Ok(())
        }
        _ => Ok(()),
    });
    if let Err(err) = result {
        slot.fail(err);
    }
    slot.ops += queued as u32;
    queued
}

/// Where a read's pieces go: the chain's top, the request's slot, and the
/// places its pieces come back to.
struct Target<'s, 'b, const P: usize> {
    root: NodeId,
    index: usize,
    /// The one extent the whole read maps to, and where the read starts.
    whole: Option<(ReadExtent, u64)>,
    pieces: &'s mut [Option<&'b mut [u8]>; P],
}

impl<const P: usize> Target<'_, '_, P> {
    /// The first extent of the `len` bytes at `pos` of the read: from the
    /// plan when it found the read in one extent, else from the chain.
    fn extent<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &self,
        graph: &mut Graph<D, N, B, C, J>,
        pos: u64,
        len: u64,
    ) -> Result<(ReadExtent, u64)> {
        match self.whole {
            Some((ReadExtent::Data { file, host }, start)) => Ok((
                ReadExtent::Data {
                    file,
                    host: host + (pos - start),
                },
                len,
            )),
            Some((extent, _)) => Ok((extent, len)),
            None => graph.read_extent(self.root, pos, len),
        }
    }
}

/// Submits `op` (tagged `tag`) to the device of protocol node `file`;
/// counts it in `queued` when it stays in flight. What completed at once
/// gives back a read's buffer.
fn submit<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    (file, tag): (NodeId, Tag),
    op: Op<'b>,
    queued: &mut usize,
) -> Result<Option<&'b mut [u8]>> {
    match graph.device_mut(file)?.submit(tag, op) {
        Submitted::Done(result, buf) => result.map(|()| buf),
        Submitted::Queued => {
            *queued += 1;
            Ok(None)
        }
    }
}

/// A buffer the VMM lent the engine, for operations on parts of it
/// ([`Op::ReadPart`], [`Op::WritePart`]): held here while no device has it.
pub(super) struct LentBuffer<'b> {
    /// The buffer, while no device holds it.
    pub(super) buf: Option<&'b mut [u8]>,
    /// Its length (0: none lent, or lost).
    pub(super) size: usize,
}

impl LentBuffer<'_> {
    /// No buffer lent.
    pub(super) const IDLE: Self = Self { buf: None, size: 0 };
}

/// The error of an operation whose lent buffer did not come back (a
/// device that broke the [`Queue`] contract).
pub(super) fn lost_buffer() -> Error {
    Error::new(ErrorKind::Busy, "a lent buffer did not come back")
}

/// Submits `op`, whose buffer was taken from `lent`, to the device of
/// protocol node `file` as `tag`: `Ok(true)` when it completed at once
/// (the buffer back in `lent`), `Ok(false)` when it is in flight (the
/// device's completion gives the buffer back). A device that keeps a
/// buffer it completed leaves `lent` empty for good.
fn submit_lent<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    (file, tag): (NodeId, Tag),
    op: Op<'b>,
    lent: &mut LentBuffer<'b>,
) -> Result<bool> {
    let device = match graph.device_mut(file) {
        Ok(device) => device,
        Err(err) => {
            lent.buf = op.into_buffer();
            return Err(err);
        }
    };
    match device.submit(tag, op) {
        Submitted::Done(result, buf) => {
            if buf.is_none() {
                lent.size = 0;
                return Err(lost_buffer());
            }
            lent.buf = buf;
            result.map(|()| true)
        }
        Submitted::Queued => Ok(false),
    }
}

/// Reads the first extent of `node`'s guest view at `at` (at most `len`
/// bytes) into the lent buffer `lent` from byte `pos`: stored data as a
/// device read tagged `tag` (`Ok((run, false))` while it is in flight),
/// zeros filled and compressed data read through the synchronous path
/// (`Ok((run, true))`); `run` is the bytes the extent covers.
///
/// # Errors
/// The lookup's, the device's; a buffer not there.
fn read_view_into<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    (node, at, len): (NodeId, u64, u64),
    (lent, pos, tag): (&mut LentBuffer<'b>, usize, Tag),
) -> Result<(u64, bool)> {
    let (extent, run) = graph.read_extent(node, at, len)?;
    let Some(buf) = lent.buf.take() else {
        return Err(lost_buffer());
    };
    let part = pos..pos + run as usize;
    let result = match extent {
        ReadExtent::Data { file, host } => {
            let op = Op::ReadPart {
                offset: host,
                buf,
                at: pos,
                len: run as usize,
            };
            return submit_lent(graph, (file, tag), op, lent).map(|done| (run, done));
        }
        ReadExtent::Slow => graph.read(node, at, &mut buf[part]),
        ReadExtent::Zeros => {
            buf[part].fill(0);
            Ok(())
        }
    };
    lent.buf = Some(buf);
    result.map(|()| (run, true))
}

/// Reads `target.root`'s chain at `offset` into `segments`: zero ranges
/// filled here, stored ranges submitted to the layers' devices; every
/// piece gets a place in `target.pieces`, in guest order.
fn issue_read<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
    const P: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    target: Target<'_, 'b, P>,
    offset: u64,
    segments: heapless::Vec<&'b mut [u8], S>,
    queued: &mut usize,
) -> Result<()> {
    let mut pos = offset;
    let mut next = 0;
    for segment in segments {
        let mut rest = segment;
        while !rest.is_empty() {
            let (extent, run) = target.extent(graph, pos, rest.len() as u64)?;
            let piece = core::mem::take(&mut rest);
            let (head, tail) = piece.split_at_mut(run as usize);
            rest = tail;
            let place = next;
            next += 1;
            match extent {
                ReadExtent::Data { file, host } => {
                    let op = Op::Read {
                        offset: host,
                        buf: head,
                    };
                    let at = (file, tag(target.index, place));
                    target.pieces[place] = submit(graph, at, op, queued)?;
                }
                // Planned: no compressed range (`Slow`) is left.
                _ => {
                    head.fill(0);
                    target.pieces[place] = Some(head);
                }
            }
            pos += run;
        }
    }
    Ok(())
}

/// Writes `segments` at `offset` of `root`: into the new clusters of
/// `fresh` (an allocating write's batch, its clusters placed) and, for the
/// rest, in place (clusters `root` owns), one device operation per run of
/// a segment that lies in one piece on the device.
fn issue_write<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    (root, tag): (NodeId, Tag),
    (offset, fresh): (u64, Option<&Batch>),
    segments: &[&'b [u8]],
    queued: &mut usize,
) -> Result<()> {
    let mut pos = offset;
    for &segment in segments {
        let mut rest = segment;
        while !rest.is_empty() {
            let extent = graph.write_extent(root, fresh, pos, rest.len() as u64)?;
            let Some((file, host, run)) = extent else {
                return fail(ErrorKind::Busy, "a planned write lost its place");
            };
            let (head, tail) = rest.split_at(run as usize);
            rest = tail;
            let op = Op::Write {
                offset: host,
                buf: head,
            };
            submit(graph, (file, tag), op, queued)?;
            pos += run;
        }
    }
    Ok(())
}

/// Runs `slot` through the graph's synchronous path (nothing in flight
/// overlaps its clusters: [`Engine::overlaps_in_flight`]), a write with
/// `scratch` for its copy-on-write.
fn run_synchronously<
    'b,
    D: Queue<'b>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
    const P: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    slot: &mut Slot<'b, S, P>,
    scratch: &mut [u8],
) -> Result<()> {
    let (backend, offset) = (slot.backend, slot.offset);
    match &mut slot.payload {
        Payload::Read(segments) => {
            let read = graph.backend_readv(backend, offset, segments);
            for (place, segment) in core::mem::take(segments).into_iter().enumerate() {
                slot.pieces[place] = Some(segment);
            }
            read
        }
        Payload::Write(segments) => {
            graph.backend_writev_with_scratch(backend, offset, segments, scratch)
        }
        Payload::WriteZeroes(len) => graph.backend_write_zeroes(backend, offset, *len),
        Payload::Discard(len) => graph.backend_discard(backend, offset, *len),
        Payload::Flush => graph.backend_flush(backend),
    }
}
