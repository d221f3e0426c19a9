//! Job copies between guest requests: a job's runs performed split-phase
//! through buffers the VMM lends ([`Engine::lend_job_buffer`], up to
//! [`JOB_LANES`]: one run in flight per buffer), stepped by
//! [`Engine::job_step`].
//!
//! A run (`Graph::job_next`: first-pass ranges, then an active commit's
//! dirty ranges, never over a run in flight) is read from its source chain
//! into its buffer, one device operation at a time ([`Op::ReadPart`]: the buffer goes to the device
//! whole and comes back whole), then written into the target the same way
//! ([`Op::WritePart`]): in place, or into new clusters placed and linked as
//! a guest's allocating write is (an entry of the engine's allocation
//! table, so guest requests overlapping it wait: the dependent-request
//! rule; linked after its data completed, R2). Guest requests start and
//! complete meanwhile; only state changes (start, pivot, end), zero ranges
//! and writes that cannot go in flight (several allocation batches,
//! replaced storage) run through the synchronous [`Graph::job_step`] in a
//! drained section.
//!
//! Two races with the guest are closed where they meet:
//! - an active commit reads the active layer while the guest writes it:
//!   guest writes mark the dirty bitmap when they *complete*, so a run that
//!   read old or torn data is copied again;
//! - a stream writes into the active layer what its backing chain holds:
//!   at write time it writes only where the layer still holds nothing
//!   (`holes_only`), so a guest write that got there first is never
//!   overwritten with older data; a guest write arriving later waits for
//!   the run's allocation in flight.
//!
//! Runs of one job in flight together cover disjoint ranges; the lanes
//! serve one job at a time (another job's step waits until they are idle).
//!
//! Memory: [`JOB_LANES`] lanes of 176 bytes in the engine (1.4 KiB); the
//! buffers are the VMM's.

use super::{
    lost_buffer, read_view_into, submit_lent, tag, Engine, LentBuffer, Payload, PREPARE_STEP,
};
use crate::device::{Op, Queue};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::graph::{Graph, NodeId, Resolver};
use crate::jobs::copy::{JobAction, JobNext, JobRun};
use crate::jobs::{JobId, JobStatus};

use super::alloc::Allocation;

/// The slot index in the tags of job copy operations (the piece is the
/// lane).
pub(super) const JOB_SLOT: usize = 0xfffe;

/// Most job buffers an [`Engine`] takes: runs in flight at once.
pub const JOB_LANES: usize = 8;

/// Polls after an [`Engine::job_step`] during which a job that fell behind
/// holds guest writes to its top back.
const STEPPED_WITHIN: u8 = 4;

/// One lent buffer and the run it carries.
struct Lane<'b> {
    /// The buffer and its length.
    lent: LentBuffer<'b>,
    /// The run in flight.
    copy: Option<Copy>,
}

impl Lane<'_> {
    const IDLE: Self = Self {
        lent: LentBuffer::IDLE,
        copy: None,
    };
}

/// The lent buffers and the runs in flight.
pub(super) struct JobCopies<'b> {
    lanes: [Lane<'b>; JOB_LANES],
    /// A synchronous step waits for a drained section.
    synchronous: bool,
    /// A run's write must go through the synchronous path: no request
    /// starts until the devices are quiet.
    pub(super) barrier: bool,
    /// Polls since [`Engine::job_step`] was last called: a job the VMM
    /// steps makes guest writes yield when it falls behind, one it stopped
    /// stepping does not.
    pub(super) since_step: u8,
}

impl JobCopies<'_> {
    /// Whether a job's run is under way.
    pub(super) fn copy_in_flight(&self) -> bool {
        self.runs().next().is_some()
    }

    /// The runs in flight.
    fn runs(&self) -> impl Iterator<Item = &Copy> {
        self.lanes.iter().flat_map(|lane| &lane.copy)
    }

    /// The guest ranges `(offset, len)` of the runs in flight.
    pub(super) fn runs_in_flight(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs().map(|copy| (copy.run.offset, copy.run.len))
    }

    /// Bytes of all the lent buffers: an active commit with at most this
    /// much dirty is ready, its end one bounded copy.
    fn small(&self) -> usize {
        self.lanes.iter().map(|lane| lane.lent.size).sum()
    }

    /// Whether queued requests wait for the job: its synchronous step is
    /// due and the VMM steps it (one it stopped stepping holds nothing).
    pub(super) fn holds_requests(&self) -> bool {
        self.barrier || self.synchronous && self.since_step <= STEPPED_WITHIN
    }

    /// No buffer lent.
    pub(super) const IDLE: Self = Self {
        lanes: [const { Lane::IDLE }; JOB_LANES],
        synchronous: false,
        barrier: false,
        since_step: u8::MAX,
    };
}

/// Which half of a run is going on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
}

/// A run of a job in flight.
struct Copy {
    job: JobId,
    /// The lane whose buffer it uses.
    lane: usize,
    run: JobRun,
    source: NodeId,
    target: NodeId,
    holes_only: bool,
    phase: Phase,
    /// Bytes of the run issued in this phase.
    pos: u64,
    /// Write: the end of the segment planned (relative to the run), while
    /// one is.
    segment: Option<u64>,
    /// The allocation entry of the segment's new clusters.
    allocation: Option<usize>,
    /// A device operation is in flight.
    in_flight: bool,
    error: Option<Error>,
}

impl Copy {
    fn fail(&mut self, err: Error) {
        self.error.get_or_insert(err);
    }
}

/// Records the completion of the operation of lane `lane` (in a device's
/// poll).
pub(super) fn collected<'b>(
    copies: &mut JobCopies<'b>,
    lane: usize,
    result: Result<()>,
    buf: Option<&'b mut [u8]>,
) {
    let Some(lane) = copies.lanes.get_mut(lane) else {
        return;
    };
    if let Some(copy) = lane.copy.as_mut() {
        copy.in_flight = false;
        if let Err(err) = result {
            copy.fail(err);
        }
        if buf.is_none() {
            copy.fail(lost_buffer());
        }
    }
    lane.lent.buf = buf;
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Lends the engine a buffer for job runs; each buffer carries one run
    /// at a time, so lending several (up to [`JOB_LANES`]) keeps several
    /// runs in flight. A buffer smaller than the target's cluster is of no
    /// use to that job (a larger cluster is copied by the synchronous
    /// step, through the largest buffer). Without one, [`Engine::job_step`]
    /// is refused.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty buffer,
    /// [`ErrorKind::NoCapacity`] when [`JOB_LANES`] are lent already.
    pub fn lend_job_buffer(&mut self, buf: &'b mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return fail(ErrorKind::InvalidInput, "a job buffer must not be empty");
        }
        let Some(lane) = self.job.lanes.iter_mut().find(|lane| lane.lent.size == 0) else {
            return fail(ErrorKind::NoCapacity, "every job buffer place is taken");
        };
        lane.lent = LentBuffer {
            size: buf.len(),
            buf: Some(buf),
        };
        Ok(())
    }

    /// How many job buffers are lent ([`Engine::lend_job_buffer`]) and not
    /// taken back.
    pub fn job_buffers_lent(&self) -> usize {
        self.job
            .lanes
            .iter()
            .filter(|lane| lane.lent.size > 0)
            .count()
    }

    /// Takes back the job buffers that carry no run (all of them once no
    /// job runs), for another engine or to free them; a buffer whose run
    /// is in flight stays lent.
    pub fn reclaim_job_buffers(&mut self) -> impl Iterator<Item = &'b mut [u8]> + '_ {
        self.job
            .lanes
            .iter_mut()
            .filter_map(|lane| match lane.copy {
                Some(_) => None,
                None => {
                    let buf = lane.lent.buf.take();
                    lane.lent = LentBuffer::IDLE;
                    buf
                }
            })
    }

    /// Whether a job's run is in flight (started by [`Engine::job_step`],
    /// not yet ended): a statistic for tests and monitoring.
    pub fn job_running(&self) -> bool {
        self.job.copy_in_flight()
    }

    /// Advances job `id` between guest requests, without blocking: starts
    /// runs as device operations in the idle lanes (later polls carry them
    /// on), or, for what only the synchronous path does (state changes, and
    /// the pivot once a ready job asked to complete is clean; zero ranges,
    /// clusters larger than the buffers), runs
    /// [`Graph::job_step`] in a drained section ([`Engine::drained`]) with
    /// the largest buffer as scratch, once no run is in flight. Returns the
    /// job's state; call again (and poll) until it is concluded.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when no job buffer was lent
    /// ([`Engine::lend_job_buffer`]); [`Graph::job_step`]'s errors. A
    /// failed run is the job's: its `on-error` policy applies, and
    /// [`Graph::job_info`] shows it.
    pub fn job_step<
        D: Queue<'b>,
        R: Resolver<D>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        id: JobId,
        resolver: &mut R,
    ) -> Result<JobStatus> {
        let status = graph.job_info(id)?.status;
        self.job.since_step = 0;
        if self.job.lanes.iter().all(|lane| lane.lent.size == 0) {
            return fail(
                ErrorKind::InvalidInput,
                "lend the engine a job buffer first (Engine::lend_job_buffer)",
            );
        }
        let lanes = &self.job.lanes;
        if lanes
            .iter()
            .flat_map(|l| &l.copy)
            .any(|copy| copy.job != id)
        {
            // The lanes serve another job now.
            return Ok(status);
        }
        let copies = matches!(status, JobStatus::Running | JobStatus::Ready);
        if copies && !self.job.synchronous {
            if self.draining || self.job.barrier {
                return Ok(status);
            }
            if !self.start_runs(graph, id)? {
                return Ok(graph.job_info(id)?.status);
            }
        } else if matches!(
            status,
            JobStatus::Paused | JobStatus::Waiting | JobStatus::Concluded
        ) {
            return Ok(status);
        }
        if self.job.copy_in_flight() {
            return Ok(status);
        }
        let Some(lane) = self
            .job
            .lanes
            .iter()
            .enumerate()
            .max_by_key(|(_, lane)| lane.lent.size)
        else {
            return Ok(status);
        };
        let lane = lane.0;
        let Some(buf) = self.job.lanes[lane].lent.buf.take() else {
            return fail(ErrorKind::Busy, "the job buffer is in use");
        };
        self.job.synchronous = true;
        let stepped = self.drained(graph, |graph| graph.job_step(id, resolver, &mut *buf));
        self.job.lanes[lane].lent.buf = Some(buf);
        match stepped {
            None => Ok(status),
            Some(result) => {
                self.job.synchronous = false;
                result
            }
        }
    }

    /// Whether queued request `index`, a write (or zero write, discard) to
    /// the top of a running or ready active commit that the VMM steps
    /// ([`Engine::job_step`] in the last [`STEPPED_WITHIN`] polls), waits:
    /// while the job has fallen behind (more dirty than all the lent job
    /// buffers hold) or copies what the guest wrote (dirty runs in flight),
    /// the guest's writes yield to it, so it becomes ready, and pivots,
    /// whatever the guest does. Reads go on; a job nobody steps (or a
    /// paused one) holds nothing back.
    pub(super) fn waits_for_job<
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
        if matches!(slot.payload, Payload::Read(_) | Payload::Flush)
            || self.job.since_step > STEPPED_WITHIN
        {
            return false;
        }
        let Some((job, dirty)) = graph
            .root(slot.backend)
            .ok()
            .and_then(|r| graph.commit_of(r))
        else {
            return false;
        };
        let copying = self
            .job
            .runs()
            .any(|copy| copy.job == job && copy.run.dirty);
        dirty > self.job.small() as u64 || copying
    }

    /// Starts runs of job `id` in the idle lanes; `true` when the job needs
    /// the synchronous step (once its runs in flight are over).
    fn start_runs<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        id: JobId,
    ) -> Result<bool> {
        // Ready (the end one bounded copy in a drained section) once what
        // is dirty fits all the lent buffers.
        let small = self.job.small();
        for lane in 0..JOB_LANES {
            let idle = &self.job.lanes[lane];
            if idle.lent.size == 0 || idle.copy.is_some() {
                continue;
            }
            let busy: heapless::Vec<(u64, u64), JOB_LANES> = self
                .job
                .runs()
                .map(|copy| (copy.run.offset, copy.run.len))
                .collect();
            match graph.job_next(id, (idle.lent.size as u64, small as u64), &busy)? {
                JobNext::Copy(run) => self.start_copy(graph, (id, lane), run),
                JobNext::Idle => return Ok(false),
                JobNext::Synchronous => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Starts run `run` of job `id` in lane `lane`: its first device
    /// operation.
    fn start_copy<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        (id, lane): (JobId, usize),
        run: JobRun,
    ) {
        let JobAction::Copy {
            source,
            target,
            holes_only,
        } = run.action
        else {
            return;
        };
        // Until the run ends, no chain change may touch its chain.
        graph.hold_chain(source, true);
        self.job.lanes[lane].copy = Some(Copy {
            job: id,
            lane,
            run,
            source,
            target,
            holes_only,
            phase: Phase::Read,
            pos: 0,
            segment: None,
            allocation: None,
            in_flight: false,
            error: None,
        });
        self.advance_lane(graph, lane);
    }

    /// Carries the runs in flight on: their next operations, or their end.
    /// Runs in every poll, after the completions are collected.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    pub(super) fn advance_copies<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        for lane in 0..JOB_LANES {
            self.advance_lane(graph, lane);
        }
    }

    /// Carries lane `lane`'s run on.
    fn advance_lane<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        lane: usize,
    ) {
        let Some(mut copy) = self.job.lanes[lane].copy.take() else {
            return;
        };
        let over = loop {
            if copy.in_flight {
                break false;
            }
            let step = match (copy.error.is_some(), copy.phase) {
                (true, _) => break true,
                (false, Phase::Read) if copy.pos < copy.run.len => self.read_step(graph, &mut copy),
                (false, Phase::Read) => {
                    (copy.phase, copy.pos) = (Phase::Write, 0);
                    Ok(true)
                }
                // The last segment is linked before the run ends.
                (false, Phase::Write) if copy.pos < copy.run.len || copy.segment.is_some() => {
                    self.write_step(graph, &mut copy)
                }
                (false, Phase::Write) => break true,
            };
            match step {
                Ok(true) => {}
                Ok(false) => break false,
                Err(err) => copy.fail(err),
            }
        };
        // Giving new clusters back changes refcounts: it waits for a
        // write-back in progress.
        if !over || copy.allocation.is_some() && self.writing_back() {
            self.job.lanes[lane].copy = Some(copy);
            return;
        }
        if let Some(entry) = copy.allocation.take() {
            // R14: a failed run maps none of its new clusters.
            if let Some(allocation) = self.allocations[entry].take() {
                graph.abandon_batch(allocation.node, &self.batches[entry]);
            }
        }
        graph.hold_chain(copy.source, false);
        let result = copy.error.map_or(Ok(()), Err);
        // A job dismissed meanwhile has nothing to record.
        let _ = graph.job_run_done(copy.job, copy.run, result);
        // The job's last run landed: the state change it brings happens
        // now, before any request starts (a guest write could make the
        // moment pass); a due synchronous step holds requests back until
        // the VMM's next `job_step` runs it.
        if !self.job.runs().any(|other| other.job == copy.job) {
            let small = self.job.small() as u64;
            if graph.job_settle(copy.job, small).unwrap_or(false) {
                self.job.synchronous = true;
            }
        }
    }

    /// Takes the run's buffer from its lane.
    fn take_buffer(&mut self, copy: &Copy) -> Result<&'b mut [u8]> {
        self.job.lanes[copy.lane]
            .lent
            .buf
            .take()
            .ok_or_else(lost_buffer)
    }

    /// Submits `op` for the run; `Ok(true)` when it completed at once (the
    /// buffer is back), `Ok(false)` when it is in flight.
    fn submit_copy<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
        file: NodeId,
        op: Op<'b>,
    ) -> Result<bool> {
        let at = (file, tag(JOB_SLOT, copy.lane));
        let done = submit_lent(graph, at, op, &mut self.job.lanes[copy.lane].lent)?;
        Ok(self.counted(copy, done))
    }

    /// Counts the run's operation in flight unless it completed at once
    /// (`done`); returns `done`.
    fn counted(&mut self, copy: &mut Copy, done: bool) -> bool {
        if !done {
            copy.in_flight = true;
            self.ops += 1;
        }
        done
    }

    /// The next piece of the read: one extent of the source chain into the
    /// buffer. `Ok(false)` when an operation went in flight.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    fn read_step<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
    ) -> Result<bool> {
        let at = copy.run.offset + copy.pos;
        let lane = &mut self.job.lanes[copy.lane];
        let into = (&mut lane.lent, copy.pos as usize, tag(JOB_SLOT, copy.lane));
        let read = (copy.source, at, copy.run.len - copy.pos);
        let (run, done) = read_view_into(graph, read, into)?;
        copy.pos += run;
        Ok(self.counted(copy, done))
    }

    /// The next piece of the write: plans a segment (validated, placed)
    /// when none is, then one device write of it; links the segment's new
    /// clusters once it is written. `Ok(false)` when it waits (an operation
    /// in flight, an overlapping allocation, the target's first-write
    /// check, the devices for the synchronous path).
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    fn write_step<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
    ) -> Result<bool> {
        let end = match copy.segment {
            // The link waits for a write-back in progress.
            Some(end) if copy.pos == end && copy.allocation.is_some() && self.writing_back() => {
                return Ok(false);
            }
            Some(end) if copy.pos == end => {
                self.link_segment(graph, copy)?;
                return Ok(true);
            }
            Some(end) => end,
            None => match self.plan_segment(graph, copy)? {
                Some(end) => end,
                None => return Ok(false),
            },
        };
        if copy.pos == end {
            return Ok(true);
        }
        let at = copy.run.offset + copy.pos;
        let fresh = copy
            .allocation
            .filter(|&entry| self.allocations[entry].is_some())
            .map(|entry| &self.batches[entry]);
        let extent = graph.write_extent(copy.target, fresh, at, end - copy.pos)?;
        let Some((file, host, run)) = extent else {
            return fail(ErrorKind::Busy, "a job's planned write lost its place");
        };
        let buf = self.take_buffer(copy)?;
        let start = copy.pos as usize;
        copy.pos += run;
        let op = Op::WritePart {
            offset: host,
            buf,
            at: start,
            len: run as usize,
        };
        self.submit_copy(graph, copy, file, op)
    }

    /// Plans the write's next segment from `copy.pos`: for a stream, the
    /// next range the target still lacks (what it holds by now is skipped);
    /// validated, and placed in flight (new clusters in an allocation
    /// entry) or, when it cannot be, written through the synchronous path
    /// once the devices are quiet. Returns the segment's end to write, or
    /// `None` to wait.
    fn plan_segment<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
    ) -> Result<Option<u64>> {
        let (target, at) = (copy.target, copy.run.offset + copy.pos);
        let mut len = copy.run.len - copy.pos;
        if copy.holes_only {
            let below = graph.backing(target)?;
            let (own, run) = graph.allocation_above(target, below, at, len)?;
            if own.present {
                // The guest wrote here first: its data stays.
                copy.pos += run;
                return Ok(Some(copy.pos));
            }
            len = run;
        }
        if !graph.prepare_writes_step(target, PREPARE_STEP)? {
            return Ok(None);
        }
        graph.check_write(target, at, len)?;
        let (start, end) = graph.cluster_span(target, at, len);
        let overlaps = self
            .allocations
            .iter()
            .flatten()
            .any(|a| a.node == target && start < a.end && a.start < end);
        if overlaps {
            return Ok(None);
        }
        if graph.allocates_in_flight(target, at, len)? {
            // A write-back in progress holds the metadata still.
            let free = self.allocations.iter().position(Option::is_none);
            let Some(entry) = free.filter(|_| !self.writing_back()) else {
                return Ok(None);
            };
            self.allocations[entry] = Some(Allocation::new(JOB_SLOT, target, (start, end)));
            copy.allocation = Some(entry);
            let batch = &mut self.batches[entry];
            batch.clear();
            let cows = graph.place_in_flight(target, at, len, batch)?;
            // A run covers whole clusters but at the image's end: what it
            // leaves of a new cluster is copied at once.
            for range in cows.into_iter().flatten() {
                graph.copy_view(target, range)?;
            }
        } else if !in_place(graph, target, at, len)? {
            return self.write_synchronously(graph, copy, len);
        }
        copy.segment = Some(copy.pos + len);
        Ok(Some(copy.pos + len))
    }

    /// Writes `len` bytes of the buffer at the run's position through the
    /// synchronous path, once no operation of the engine is in flight (no
    /// request starts meanwhile).
    fn write_synchronously<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
        len: u64,
    ) -> Result<Option<u64>> {
        if self.ops > 0 || self.writing_back() {
            self.job.barrier = true;
            return Ok(None);
        }
        self.job.barrier = false;
        let Some(buf) = self.job.lanes[copy.lane].lent.buf.as_deref() else {
            return Err(lost_buffer());
        };
        let start = copy.pos as usize;
        let at = copy.run.offset + copy.pos;
        // Nothing is in flight: an idle copy buffer is the scratch of a
        // partly written new cluster (at the image's end).
        let scratch = super::cow::idle_copy_buffer(&mut self.copies);
        let data = &buf[start..start + len as usize];
        graph.writev_with_scratch(copy.target, at, &[data], scratch)?;
        copy.pos += len;
        Ok(Some(copy.pos))
    }

    /// Ends the written segment: its new clusters are mapped (R2: every
    /// data operation of it completed) and its allocation entry is free.
    fn link_segment<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        copy: &mut Copy,
    ) -> Result<()> {
        copy.segment = None;
        let Some(entry) = copy.allocation.take() else {
            return Ok(());
        };
        let Some(allocation) = self.allocations[entry].take() else {
            return Ok(());
        };
        let batch = &mut self.batches[entry];
        let linked = graph.link_batch(allocation.node, batch);
        if linked.is_err() {
            // R14: nothing maps the clusters not yet linked.
            graph.abandon_batch(allocation.node, batch);
        }
        linked
    }
}

/// Whether `len` bytes at `pos` of `id` lie wholly in clusters it owns.
fn in_place<'b, D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    id: NodeId,
    pos: u64,
    len: u64,
) -> Result<bool> {
    let mut done = 0;
    while done < len {
        match graph.in_place_extent(id, pos + done, len - done)? {
            Some((_, _, run)) => done += run,
            None => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory the module's documentation states.
    #[test]
    fn a_lane_is_under_200_bytes() {
        let size = core::mem::size_of::<Lane<'_>>();
        assert!((100..200).contains(&size), "{size} bytes");
    }
}
