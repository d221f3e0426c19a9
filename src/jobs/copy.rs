//! A job's copy work as runs: what the next run copies and where
//! ([`Graph::job_plan`]), and the bookkeeping once it is done
//! ([`Graph::job_run_done`]). The synchronous step
//! ([`Graph::job_step`]) performs runs at once; the request engine performs
//! them split-phase between guest requests (`src/engine/job.rs`), through
//! [`Graph::job_next`].

use super::{IoStatus, JobId, JobKind, JobStatus};
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::{piece_len, Graph, NodeId};

/// What one run of a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JobAction {
    /// Nothing to copy: the layers above the job's base do not hold it, or
    /// the target already does.
    Skip,
    /// Write zeroes into `target`.
    Zero {
        /// Where they go.
        target: NodeId,
    },
    /// Copy `source`'s guest view into `target`.
    Copy {
        /// The node read, whole chain.
        source: NodeId,
        /// The node written.
        target: NodeId,
        /// Stream: write only where `target` itself holds nothing by then
        /// (a guest write that got there first wins).
        holes_only: bool,
    },
}

/// A run of a job's copy work: `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JobRun {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Taken from an active commit's dirty bitmap (not the first pass).
    pub(crate) dirty: bool,
    pub(crate) action: JobAction,
}

/// What a job needs next, as [`Graph::job_next`] finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JobNext {
    /// A copy to perform, then report with [`Graph::job_run_done`].
    Copy(JobRun),
    /// A step only the synchronous path does ([`Graph::job_step`]): a
    /// state change, zeroes to write, a copy larger than the buffer.
    Synchronous,
    /// Nothing now (ranges skipped, a state changed, nothing dirty).
    Idle,
}

/// Runs [`Graph::job_next`] skips before it gives the caller a turn.
const SKIPS: usize = 64;

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// What job `id` does with the first at most `want` bytes at `offset`
    /// (runs of equal allocation merged), and how many bytes that covers.
    ///
    /// # Errors
    /// Metadata errors.
    pub(crate) fn job_plan(
        &mut self,
        id: JobId,
        offset: u64,
        want: u64,
    ) -> Result<(JobAction, u64)> {
        let job = self.jobs.get(id)?;
        let (kind, active, top, base) = (job.kind, job.active, job.top, job.base);
        if kind == JobKind::Commit {
            let base = base.ok_or(Error::new(ErrorKind::InvalidInput, "commit without base"))?;
            let (status, run) = self.allocation_run(top, Some(base), offset, want)?;
            let action = match (status.present, status.zero) {
                (false, _) => JobAction::Skip,
                (true, true) => JobAction::Zero { target: base },
                (true, false) => JobAction::Copy {
                    source: top,
                    target: base,
                    holes_only: false,
                },
            };
            return Ok((action, run));
        }
        let below = self.backing(active)?;
        let (own, run) = self.allocation_above(active, below, offset, want)?;
        if own.present {
            return Ok((JobAction::Skip, run));
        }
        let (status, run) = self.allocation_run(active, base, offset, run)?;
        let action = match (status.present, status.zero) {
            (true, true) if base.is_some() => JobAction::Zero { target: active },
            (true, false) => JobAction::Copy {
                source: active,
                target: active,
                holes_only: true,
            },
            _ => JobAction::Skip,
        };
        Ok((action, run))
    }

    /// Performs `action` over `len` bytes at `offset` synchronously, with
    /// `scratch` as the copy buffer.
    pub(crate) fn job_apply(
        &mut self,
        action: JobAction,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> Result<()> {
        match action {
            JobAction::Skip => Ok(()),
            JobAction::Zero { target } => self.write_zeroes(target, offset, len),
            JobAction::Copy { source, target, .. } => {
                self.copy_into(target, source, offset, len, scratch)
            }
        }
    }

    /// [`Graph::allocation_above`], with adjacent runs that are equally
    /// present and zero merged up to `want` bytes: a zero range spanning
    /// several small clusters of a layer stays one zero write (and base
    /// sparse), a data range one copy.
    pub(crate) fn allocation_run(
        &mut self,
        top: NodeId,
        bottom: Option<NodeId>,
        offset: u64,
        want: u64,
    ) -> Result<(crate::graph::BlockStatus, u64)> {
        let (status, mut run) = self.allocation_above(top, bottom, offset, want)?;
        while run < want {
            let (next, more) = self.allocation_above(top, bottom, offset + run, want - run)?;
            if (next.present, next.zero) != (status.present, status.zero) {
                break;
            }
            run += more;
        }
        Ok((status, run))
    }

    /// The node job `id` writes into.
    pub(crate) fn job_target(&self, id: JobId) -> Result<Option<NodeId>> {
        let job = self.jobs.get(id)?;
        Ok(match job.kind {
            JobKind::Commit => job.base,
            JobKind::Stream => Some(job.active),
        })
    }

    /// The next run of running or ready job `id` for a copy buffer of
    /// `max` bytes, `busy` being the ranges of its runs still in flight
    /// and `small` the dirty bytes an active commit may have to be ready:
    /// first-pass ranges in order (the cursor moves past a run when it is
    /// planned), then (active commit) what the guest wrote since, never
    /// over a run in flight. Ranges with nothing to copy are accounted
    /// here, up to a bound; the state changes a pass's end brings
    /// (`running` to `pending`, or to `ready`) happen here too, once no run
    /// is in flight: an active commit is ready once at most `small` bytes
    /// are dirty. A ready job asked to complete (or cancelled) gets
    /// [`JobNext::Synchronous`] then: its end, in a drained section, is one
    /// bounded copy.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a dismissed job. A planning error is
    /// the job's: its `on-error` policy applies.
    pub(crate) fn job_next(
        &mut self,
        id: JobId,
        (max, small): (u64, u64),
        busy: &[(u64, u64)],
    ) -> Result<JobNext> {
        let cluster = match self.job_target(id)? {
            Some(target) => self.cluster_size(target)?,
            None => 1,
        };
        // A run fills the target's clusters whole: a cluster larger than
        // the buffer is copied in pieces, synchronously.
        if max < cluster || max == 0 {
            return Ok(JobNext::Synchronous);
        }
        for _ in 0..SKIPS {
            let job = self.jobs.get_mut(id)?;
            if !matches!(job.status, JobStatus::Running | JobStatus::Ready) {
                return Ok(JobNext::Idle);
            }
            let (cursor, size) = (job.cursor, job.size);
            let (offset, want, dirty) = if cursor < size {
                (cursor, piece_len(cursor, size - cursor, max), false)
            } else {
                if busy.is_empty() && self.job_settle(id, small)? {
                    return Ok(JobNext::Synchronous);
                }
                let job = self.jobs.get_mut(id)?;
                let Some(bitmap) = job.dirty.as_mut() else {
                    return Ok(JobNext::Idle);
                };
                // At most `small` bytes dirty: no new run (the job is, or
                // is about to be, ready; its end copies that much).
                if bitmap.dirty_granules() as u64 * bitmap.granularity() <= small {
                    return Ok(JobNext::Idle);
                }
                let Some((start, len)) = bitmap.take_first() else {
                    return Ok(JobNext::Idle);
                };
                let overlaps = busy.iter().any(|&(o, l)| start < o + l && o < start + len);
                if len > max || overlaps {
                    bitmap.mark(start, len);
                    return Ok(match overlaps {
                        true => JobNext::Idle,
                        false => JobNext::Synchronous,
                    });
                }
                (start, len, true)
            };
            let (action, run) = match self.job_plan(id, offset, want) {
                Ok(planned) => planned,
                Err(err) => {
                    let run = JobRun {
                        offset,
                        len: want,
                        dirty,
                        action: JobAction::Skip,
                    };
                    self.job_run_done(id, run, Err(err))?;
                    return Ok(JobNext::Idle);
                }
            };
            if let JobAction::Zero { .. } = action {
                self.remark(id, dirty, (offset, want))?;
                return Ok(JobNext::Synchronous);
            }
            // What a dirty granule holds beyond this run stays dirty.
            self.remark(id, dirty, (offset + run, want - run))?;
            if !dirty {
                self.jobs.get_mut(id)?.cursor += run;
            }
            let run = JobRun {
                offset,
                len: run,
                dirty,
                action,
            };
            if action != JobAction::Skip {
                return Ok(JobNext::Copy(run));
            }
            self.job_run_done(id, run, Ok(()))?;
        }
        Ok(JobNext::Idle)
    }

    /// The state change the end of a pass brings to running or ready job
    /// `id` once no run of it is in flight: a commit or stream whose first
    /// pass is over becomes `pending`; an active commit with at most
    /// `small` bytes dirty becomes `ready` (its end is one bounded copy).
    /// Returns whether the job now needs its synchronous step: pending, or
    /// ready and asked to complete (or cancelled) with at most `small`
    /// bytes dirty — that step, in a drained section, copies what is dirty
    /// by then (that much, and what the requests in flight at its start
    /// write) and ends the job.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a dismissed job.
    pub(crate) fn job_settle(&mut self, id: JobId, small: u64) -> Result<bool> {
        let job = self.jobs.get_mut(id)?;
        let live = matches!(job.status, JobStatus::Running | JobStatus::Ready);
        if !live || job.cursor < job.size {
            return Ok(false);
        }
        let Some(bitmap) = job.dirty.as_ref() else {
            job.status = JobStatus::Pending;
            return Ok(true);
        };
        if bitmap.dirty_granules() as u64 * bitmap.granularity() > small {
            return Ok(false);
        }
        if job.status == JobStatus::Running {
            job.status = JobStatus::Ready;
            return Ok(false);
        }
        Ok(job.complete_requested || job.soft_cancel)
    }

    /// The active commit of `node` (running or ready) and the bytes it has
    /// dirty: while a VMM steps it through the request engine, guest writes
    /// to `node` wait when it falls behind.
    pub(crate) fn commit_of(&self, node: NodeId) -> Option<(JobId, u64)> {
        self.jobs.iter().find_map(|(id, job)| {
            let live = matches!(job.status, JobStatus::Running | JobStatus::Ready);
            let dirty = job.dirty.as_ref().filter(|_| live && job.tracks(node))?;
            Some((id, dirty.dirty_granules() as u64 * dirty.granularity()))
        })
    }

    /// Marks `len` bytes at `offset` dirty again in job `id`'s bitmap, for
    /// a run `taken` from it.
    fn remark(&mut self, id: JobId, taken: bool, (offset, len): (u64, u64)) -> Result<()> {
        if let (true, Some(dirty)) = (taken, self.jobs.get_mut(id)?.dirty.as_mut()) {
            dirty.mark(offset, len);
        }
        Ok(())
    }

    /// Records run `run` of job `id` (planned: a first-pass run moved the
    /// cursor) as done with `result`: progress, or the job's `on-error`
    /// policy (a dirty run's range is dirty again).
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a dismissed job.
    pub(crate) fn job_run_done(
        &mut self,
        id: JobId,
        run: JobRun,
        result: Result<()>,
    ) -> Result<()> {
        match (run.dirty, result) {
            (false, Ok(())) => {
                let job = self.jobs.get_mut(id)?;
                job.offset += run.len;
                job.io_status = IoStatus::Ok;
                Ok(())
            }
            (false, Err(err)) => self.job_failed(id, err, Some((run.offset, run.len))),
            (true, Ok(())) => {
                let job = self.jobs.get_mut(id)?;
                job.offset += run.len;
                job.len += run.len;
                Ok(())
            }
            (true, Err(err)) => {
                self.remark(id, true, (run.offset, run.len))?;
                self.job_failed(id, err, None)
            }
        }
    }
}
