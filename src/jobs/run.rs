//! Starting, stepping and steering jobs.

use super::copy::JobRun;
use super::{
    CommitRequest, CopyMode, DirtyBitmap, IoStatus, Job, JobId, JobInfo, JobKind, JobStatus,
    OnError, StreamRequest,
};
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::graph::{piece_len, Access, Graph, NodeId, Parent, Perm, Resolver};

/// What a job's writer needs on the node it writes into.
const JOB_WRITER: Access = Access {
    perm: Perm::CONSISTENT_READ.union(Perm::WRITE),
    shared: Perm::all(),
};

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Starts a commit job: the data of `top` and every layer down to (not
    /// including) `base` is copied into `base`, which grows if it is smaller;
    /// then the layers are dropped from the chain. With `top == active` this
    /// is an active commit: guest writes are tracked and re-copied, the job
    /// becomes [`JobStatus::Ready`], and [`Graph::job_complete`] pivots every
    /// device to `base`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `top` is not in `active`'s chain or
    /// `base` is not below it; [`ErrorKind::Busy`] when a running job holds
    /// a link of the range; [`ErrorKind::PermissionConflict`] when another
    /// user of `base` forbids writes; [`ErrorKind::ReadOnly`] when `base` or
    /// the overlay to rewrite cannot be written; [`ErrorKind::NoCapacity`]
    /// when every job slot is taken. Nothing changes on error, except that
    /// `base` may have grown.
    pub fn start_commit(&mut self, request: CommitRequest) -> Result<JobId> {
        let CommitRequest {
            active,
            top,
            base,
            on_error,
        } = request;
        self.nodes.get(active)?;
        self.nodes.get(top)?;
        self.nodes.get(base)?;
        if top == base {
            return fail(ErrorKind::InvalidInput, "top and base are the same image");
        }
        // The final chain change must be possible: validate it now.
        self.plan_drop(active, top, Some(base))?;
        let frozen_from = if top == active {
            active
        } else {
            self.chain_from(active)
                .find(|&n| self.backing(n).ok().flatten() == Some(top))
                .ok_or(Error::new(
                    ErrorKind::InvalidInput,
                    "top is not in the active layer's backing chain",
                ))?
        };
        self.check_unfrozen(frozen_from, Some(base))?;
        let range_start = top;
        let in_range = |graph: &Self, p: Parent| match p {
            Parent::Backing(n) => graph
                .chain_from(range_start)
                .take_while(|&x| x != base)
                .any(|x| x == n),
            _ => false,
        };
        self.check_access_except(base, JOB_WRITER, |p| in_range(self, p))?;
        self.check_job_slot()?;
        let size = self.size(top)?;
        let reopened = self.reopen_writable(base)?;
        if let Err(err) = self.grow_to(base, size) {
            if let Some(node) = reopened {
                self.set_read_only(node, true)?;
            }
            return Err(err);
        }
        let dirty = (top == active).then(|| DirtyBitmap::new(size));
        let mut job = Job::new(
            JobKind::Commit,
            (active, top, Some(base)),
            frozen_from,
            on_error,
            size,
        );
        job.reopened = reopened;
        job.dirty = dirty;
        self.insert_job(job)
    }

    /// Starts a stream job: every range the active layer lacks is copied
    /// into it from the layers above `base`; then its backing file becomes
    /// `base` (or none). Streaming stops at the backing file's end.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `base` is not below `active`,
    /// [`ErrorKind::ReadOnly`] when `active` (which may be an intermediate
    /// node: it is opened for writing while the job runs) sits on a read-only
    /// device,
    /// [`ErrorKind::Busy`] when a running job holds a link of the range,
    /// [`ErrorKind::NoCapacity`] when every job slot is taken.
    pub fn start_stream(&mut self, request: StreamRequest) -> Result<JobId> {
        let StreamRequest {
            active,
            base,
            on_error,
        } = request;
        let below = self.backing(active)?;
        if let Some(base) = base {
            self.nodes.get(base)?;
            if !below.is_some_and(|b| self.chain_from(b).any(|n| n == base)) {
                return fail(
                    ErrorKind::InvalidInput,
                    "base is not below the active layer",
                );
            }
        }
        self.check_unfrozen(active, base)?;
        self.check_job_slot()?;
        // Streaming writes what the node already reads (QEMU's
        // WRITE_UNCHANGED), so an intermediate node may be streamed into:
        // it is opened for writing for the job's duration.
        let reopened = self.reopen_writable(active)?;
        let size = self.size(active)?;
        let nothing_to_do = below == base;
        let mut job = Job::new(
            JobKind::Stream,
            (active, active, base),
            active,
            on_error,
            size,
        );
        job.reopened = reopened;
        if nothing_to_do {
            (job.cursor, job.len) = (size, 0);
        }
        self.insert_job(job)
    }

    fn check_job_slot(&self) -> Result<()> {
        if self.jobs.len() >= JOBS {
            return fail(ErrorKind::NoCapacity, "every job slot is taken");
        }
        Ok(())
    }

    /// Opens `node` for writing when it is read-only; returns it then, so
    /// the job can close it again at the end.
    fn reopen_writable(&mut self, node: NodeId) -> Result<Option<NodeId>> {
        if !self.is_read_only(node)? {
            return Ok(None);
        }
        self.set_read_only(node, false)?;
        Ok(Some(node))
    }

    fn check_unfrozen(&self, from: NodeId, base: Option<NodeId>) -> Result<()> {
        for node in self.chain_from(from).take_while(|&n| Some(n) != base) {
            if self.is_frozen(node)? {
                return fail(
                    ErrorKind::Busy,
                    "a backing link of the range is held by a running job",
                );
            }
        }
        Ok(())
    }

    fn set_frozen(&mut self, from: NodeId, base: Option<NodeId>, frozen: bool) -> Result<()> {
        let mut node = Some(from);
        while let Some(n) = node.filter(|&n| Some(n) != base) {
            if frozen {
                self.freeze_backing(n)?;
            } else {
                self.unfreeze_backing(n)?;
            }
            node = self.backing(n)?;
        }
        Ok(())
    }

    fn insert_job(&mut self, job: Job) -> Result<JobId> {
        let (from, base) = (job.frozen_from, job.base);
        let id = self.jobs.insert(job).map_err(|(err, _)| err)?;
        self.ref_node(from)?;
        self.set_frozen(from, base, true)?;
        Ok(id)
    }

    /// Grows `node` (qcow2 or raw) to at least `size` bytes.
    fn grow_to(&mut self, node: NodeId, size: u64) -> Result<()> {
        let current = self.size(node)?;
        if current >= size {
            return Ok(());
        }
        let (driver, tables) = self.driver_and_tables(node)?;
        driver.grow(tables, size)
    }

    /// Advances job `id` by one bounded step, using `scratch` (any non-empty
    /// size; larger copies more per step) as its copy buffer and `resolver`
    /// for the backing reference written when it finishes. Returns the state
    /// after the step. I/O failures are handled by the job's `on-error`
    /// policy and show in [`Graph::job_info`]; a job that fails (`on-error:
    /// report`) goes `aborting`, and the step that then concludes it, once
    /// it has let go of its nodes, returns the job's error (the job is
    /// [`JobStatus::Concluded`] then, `job_info` says why, and it still
    /// waits for [`Graph::job_dismiss`]).
    ///
    /// Copies are cut into steps and writes only at multiples of the
    /// largest power of two that fits in `scratch` (and where what the
    /// layers hold changes, at their cluster boundaries): whole clusters of
    /// the target whenever `scratch` holds one, guest offsets aligned to at
    /// least 4 KiB for any `scratch` of 4 KiB or more. A target cluster
    /// larger than `scratch` is filled by several writes.
    ///
    /// # Errors
    /// The job's own error from the step that concludes a failed job;
    /// [`ErrorKind::StaleHandle`] for a dismissed job,
    /// [`ErrorKind::InvalidInput`] for an empty `scratch`, and errors that
    /// leave the job as it was ([`ErrorKind::Busy`] while requests are in
    /// flight through its chain: step again later).
    pub fn job_step<R: Resolver<D>>(
        &mut self,
        id: JobId,
        resolver: &mut R,
        scratch: &mut [u8],
    ) -> Result<JobStatus> {
        if scratch.is_empty() {
            return fail(ErrorKind::InvalidInput, "a job step needs a scratch buffer");
        }
        // A guest write in flight is marked dirty but not yet on the disk:
        // a step could copy the old data and call it clean.
        self.check_not_held(self.jobs.get(id)?.active)?;
        let before = self.jobs.get(id)?.status;
        match before {
            JobStatus::Created => {
                self.jobs.get_mut(id)?.status = JobStatus::Running;
                self.job_work(id, resolver, scratch)?;
            }
            JobStatus::Running | JobStatus::Ready => self.job_work(id, resolver, scratch)?,
            JobStatus::Pending => self.job_finish(id, resolver, false)?,
            JobStatus::Aborting => self.job_finish(id, resolver, true)?,
            JobStatus::Paused | JobStatus::Waiting | JobStatus::Concluded => {}
        }
        let job = self.jobs.get(id)?;
        match job.error {
            Some(err) if job.status == JobStatus::Concluded && before != JobStatus::Concluded => {
                Err(err)
            }
            _ => Ok(job.status),
        }
    }

    fn job_work<R: Resolver<D>>(
        &mut self,
        id: JobId,
        resolver: &mut R,
        scratch: &mut [u8],
    ) -> Result<()> {
        let job = self.jobs.get(id)?;
        let (cursor, size) = (job.cursor, job.size);
        if cursor < size {
            // Steps end on multiples of the largest power of two that fits
            // in `scratch`, or of the target's cluster when `scratch` is
            // smaller: a step fills a new cluster of the target whole.
            let want = piece_len(cursor, size - cursor, self.step_bytes(id, scratch)?);
            match self.job_plan(id, cursor, want) {
                Err(err) => self.job_failed(id, err, Some((cursor, want)))?,
                Ok((action, run)) => {
                    self.jobs.get_mut(id)?.cursor += run;
                    let result = self.job_apply(action, cursor, run, scratch);
                    let run = JobRun {
                        offset: cursor,
                        len: run,
                        dirty: false,
                        action,
                    };
                    self.job_run_done(id, run, result)?;
                }
            }
        }
        let job = self.jobs.get(id)?;
        if job.cursor < job.size
            || job.status != JobStatus::Running && job.status != JobStatus::Ready
        {
            return Ok(());
        }
        if job.dirty.is_none() {
            self.jobs.get_mut(id)?.status = JobStatus::Pending;
            return Ok(());
        }
        // Active commit, first pass done: re-copy what the guest wrote,
        // whole granules, about a scratch buffer's worth per step; a ready
        // job asked to end copies all of it, then ends in this step (no
        // guest write comes in meanwhile: the request engine runs this
        // step in a drained section, once little is dirty).
        let ending = job.status == JobStatus::Ready && (job.complete_requested || job.soft_cancel);
        let mut budget = match ending {
            true => u64::MAX,
            false => scratch.len() as u64,
        };
        while budget > 0 {
            let job = self.jobs.get_mut(id)?;
            let Some((start, len)) = job.dirty.as_mut().and_then(DirtyBitmap::take_first) else {
                break;
            };
            if let Err(err) = self.job_chunk_all(id, start, len, scratch) {
                if let Some(dirty) = self.jobs.get_mut(id)?.dirty.as_mut() {
                    dirty.mark(start, len);
                }
                return self.job_failed(id, err, None);
            }
            let job = self.jobs.get_mut(id)?;
            job.offset += len;
            job.len += len;
            budget = budget.saturating_sub(len);
        }
        let job = self.jobs.get_mut(id)?;
        let clean = job.dirty.as_ref().is_some_and(|d| d.dirty_granules() == 0);
        match job.status {
            JobStatus::Running if clean => job.status = JobStatus::Ready,
            // Nothing is dirty and no guest request can come in before the
            // pivot (or, cancelled, the end): it happens in this very step.
            JobStatus::Ready if clean && (job.complete_requested || job.soft_cancel) => {
                let cancelled = job.soft_cancel;
                self.job_finish(id, resolver, cancelled)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Copies what job `id` copies of the first at most `want` bytes at
    /// `offset` ([`Graph::job_plan`]); returns the bytes handled.
    fn job_chunk(&mut self, id: JobId, offset: u64, want: u64, scratch: &mut [u8]) -> Result<u64> {
        let (action, run) = self.job_plan(id, offset, want)?;
        self.job_apply(action, offset, run, scratch)?;
        Ok(run)
    }

    /// Runs [`Self::job_chunk`] until all of `offset..offset + len` is done.
    fn job_chunk_all(
        &mut self,
        id: JobId,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> Result<()> {
        let step = self.step_bytes(id, scratch)?;
        let mut done = 0;
        while done < len {
            let want = piece_len(offset + done, len - done, step);
            done += self.job_chunk(id, offset + done, want, scratch)?;
        }
        Ok(())
    }

    /// The most bytes one step of job `id` copies with `scratch`: the
    /// scratch's length, or the target's cluster size when larger (the copy
    /// then streams through `scratch`: [`Graph::copy_into`]).
    fn step_bytes(&self, id: JobId, scratch: &[u8]) -> Result<u64> {
        let cluster = match self.job_target(id)? {
            Some(target) => self.cluster_size(target)?,
            None => 1,
        };
        Ok((scratch.len() as u64).max(cluster))
    }

    /// Applies the job's `on-error` policy to a failure; `first_pass` is
    /// the range of the first pass that failed (the cursor may be past it
    /// already: it was planned), `None` for a dirty range (marked again by
    /// the caller).
    pub(crate) fn job_failed(
        &mut self,
        id: JobId,
        err: Error,
        first_pass: Option<(u64, u64)>,
    ) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        job.io_status = if err.kind() == ErrorKind::NoSpace {
            IoStatus::NoSpace
        } else {
            IoStatus::Failed
        };
        // Stop and (commit) ignore retry the range: the cursor goes back.
        let retry = |job: &mut Job| {
            if let Some((offset, _)) = first_pass {
                job.cursor = job.cursor.min(offset);
            }
        };
        match job.on_error {
            OnError::Report => {
                job.error = Some(err);
                job.status = JobStatus::Aborting;
            }
            OnError::Stop => {
                retry(job);
                job.resume_to = job.status;
                job.status = JobStatus::Paused;
            }
            OnError::Ignore if job.kind == JobKind::Stream => {
                job.skipped_chunks = true;
                if let Some((offset, len)) = first_pass {
                    job.cursor = job.cursor.max(offset + len);
                    job.offset += len;
                }
            }
            OnError::Ignore => retry(job),
        }
        Ok(())
    }

    /// Ends job `id`: releases what it holds and, unless `aborted`, applies
    /// the chain change.
    fn job_finish<R: Resolver<D>>(
        &mut self,
        id: JobId,
        resolver: &mut R,
        aborted: bool,
    ) -> Result<()> {
        let job = self.jobs.get(id)?;
        let (kind, active, top, base, from) =
            (job.kind, job.active, job.top, job.base, job.frozen_from);
        let (skipped, reopened) = (job.skipped_chunks, job.reopened);
        let pivots = kind == JobKind::Commit && top == active && !aborted;
        self.set_frozen(from, base, false)?;
        // R11: whatever was copied is made durable (cancelled or not: a
        // cancelled ready active commit leaves base consistent) before the
        // chain change writes a header.
        let target = if kind == JobKind::Commit {
            base
        } else {
            Some(active)
        };
        let mut result = match target {
            Some(node) => self.flush(node),
            None => Ok(()),
        };
        // The node opened for the job's writes is closed again, unless the
        // pivot makes it the device's image.
        if let (Some(node), false) = (reopened, pivots) {
            result = result.and(self.set_read_only(node, true));
        }
        // The chain change may release the nodes: let go of them first.
        self.unref(from)?;
        if !aborted && result.is_ok() {
            result = match kind {
                JobKind::Commit => self.drop_intermediate(resolver, active, top, base),
                JobKind::Stream if skipped => Ok(()),
                JobKind::Stream => self.change_backing(resolver, active, base),
            };
        }
        let job = self.jobs.get_mut(id)?;
        job.status = JobStatus::Concluded;
        if let Err(err) = result {
            job.error.get_or_insert(err);
        }
        Ok(())
    }

    /// Points `node`'s backing file (on disk first, then in memory) at
    /// `backing`, releasing the layers in between that nothing else uses.
    fn change_backing<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        node: NodeId,
        backing: Option<NodeId>,
    ) -> Result<()> {
        if self.backing(node)? == backing {
            return Ok(());
        }
        if let Some(b) = backing {
            self.check_access_except(b, Access::BACKING, |_| false)?;
        }
        self.rewrite_references(resolver, &[node], backing)?;
        self.set_backing(node, backing)
    }

    /// Pauses a created, running or ready job.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] in any other state.
    pub fn job_pause(&mut self, id: JobId) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        match job.status {
            JobStatus::Created | JobStatus::Running | JobStatus::Ready => {
                job.resume_to = if job.status == JobStatus::Ready {
                    JobStatus::Ready
                } else {
                    JobStatus::Running
                };
                job.status = JobStatus::Paused;
                Ok(())
            }
            _ => fail(
                ErrorKind::InvalidInput,
                "job cannot be paused in its current state",
            ),
        }
    }

    /// Resumes a paused job (retrying a chunk that failed with `stop`).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] unless the job is paused.
    pub fn job_resume(&mut self, id: JobId) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        if job.status != JobStatus::Paused {
            return fail(ErrorKind::InvalidInput, "job is not paused");
        }
        job.status = job.resume_to;
        job.io_status = IoStatus::Ok;
        Ok(())
    }

    /// Asks a ready active commit to pivot: once nothing is dirty (checked
    /// at a step), every user of the active layer is re-pointed to base.
    /// Accepted once: the job then reports [`JobInfo::completing`] (it may
    /// stay `ready` for a few steps while it copies what is dirty).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] unless the job is ready, or when it is
    /// completing already.
    pub fn job_complete(&mut self, id: JobId) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        if job.complete_requested {
            return fail(ErrorKind::InvalidInput, "job is already completing");
        }
        if job.status != JobStatus::Ready {
            return fail(ErrorKind::InvalidInput, "job is not ready to complete");
        }
        job.complete_requested = true;
        Ok(())
    }

    /// Cancels a live job: the next step releases it without changing the
    /// chain. A ready active commit ends with base consistent, no pivot.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a job already ending.
    pub fn job_cancel(&mut self, id: JobId) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        if matches!(job.status, JobStatus::Aborting | JobStatus::Concluded) {
            return fail(ErrorKind::InvalidInput, "job is already ending");
        }
        job.cancelled = true;
        let ready = job.status == JobStatus::Ready
            || job.status == JobStatus::Paused && job.resume_to == JobStatus::Ready;
        if ready {
            // Soft cancel: copy what is still dirty, then end without a
            // pivot, leaving base a point-in-time copy of the guest's view.
            job.soft_cancel = true;
            job.status = JobStatus::Ready;
        } else {
            job.status = JobStatus::Aborting;
        }
        Ok(())
    }

    /// Removes a concluded job.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] unless the job is concluded.
    pub fn job_dismiss(&mut self, id: JobId) -> Result<()> {
        if self.jobs.get(id)?.status != JobStatus::Concluded {
            return fail(
                ErrorKind::InvalidInput,
                "only a concluded job can be dismissed",
            );
        }
        self.jobs.remove(id).map(|_| ())
    }

    /// The job's state and progress.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a dismissed job.
    pub fn job_info(&self, id: JobId) -> Result<JobInfo> {
        let job = self.jobs.get(id)?;
        Ok(JobInfo {
            kind: job.kind,
            active_commit: job.kind == JobKind::Commit && job.top == job.active,
            status: job.status,
            offset: job.offset,
            len: job.len,
            ready: job.status == JobStatus::Ready
                || job.status == JobStatus::Paused && job.resume_to == JobStatus::Ready,
            io_status: job.io_status,
            error: job.error,
            cancelled: job.cancelled,
            completing: job.complete_requested,
            copy_mode: match job.write_blocking {
                true => CopyMode::WriteBlocking,
                false => CopyMode::Background,
            },
        })
    }

    /// Switches active commit `id` to copy mode `mode` (QEMU's
    /// `block-job-change`): from the next guest write on, writes to its top
    /// are either marked dirty ([`CopyMode::Background`]) or written to its
    /// base too ([`CopyMode::WriteBlocking`]). What is dirty already stays
    /// for the steps to copy.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a job that is not a live active
    /// commit.
    pub fn job_change_copy_mode(&mut self, id: JobId, mode: CopyMode) -> Result<()> {
        let job = self.jobs.get_mut(id)?;
        let live = !matches!(job.status, JobStatus::Aborting | JobStatus::Concluded);
        if job.dirty.is_none() || !live {
            return fail(
                ErrorKind::InvalidInput,
                "only a live active commit has a copy mode",
            );
        }
        job.write_blocking = mode == CopyMode::WriteBlocking;
        Ok(())
    }

    /// The base that guest writes to `node` go to as well: an active
    /// commit in write-blocking copy mode tracks `node` as its top.
    pub(crate) fn write_blocking_base(&self, node: NodeId) -> Option<NodeId> {
        self.jobs
            .iter()
            .find(|(_, job)| job.write_blocking && job.tracks(node))
            .and_then(|(_, job)| job.base)
    }

    /// Records a guest write to `node` in the dirty bitmap of every active
    /// commit whose top it is.
    pub(crate) fn note_guest_write(&mut self, node: NodeId, offset: u64, len: u64) {
        for (_, job) in self.jobs.iter_mut().filter(|(_, job)| job.tracks(node)) {
            if let Some(dirty) = job.dirty.as_mut() {
                dirty.mark(offset, len);
            }
        }
    }
}
