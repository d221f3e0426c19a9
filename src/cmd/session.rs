//! Scripts: several commands sharing open images and running jobs.
//!
//! A [`Session`] keeps images attached between commands, each through a
//! BlockBackend standing for a guest device, so a script can start a job,
//! do guest I/O between its steps, and complete it — what a VMM does, in
//! text. The kernel runs its command line as one script; the host CLI's
//! `script` command does the same.
//!
//! | command | does |
//! |---|---|
//! | `job-start commit [-f FMT] [--top TOP] [--base BASE] IMAGE` | starts a commit job on IMAGE (attached) |
//! | `job-start stream [-f FMT] [--base BASE] IMAGE` | starts a stream job on IMAGE |
//! | `job-step IMAGE [COUNT]` | steps IMAGE's job up to COUNT times (default 1), while it runs |
//! | `job-pause`, `job-resume`, `job-complete`, `job-cancel`, `job-info` `IMAGE` | QMP verbs |
//! | `job-wait IMAGE` | steps to the end (completing when ready) and reports |
//! | `checksum [-f FMT] [-U] [-d DEPTH] IMAGE` | FNV-1a 64 of the guest view (DEPTH requests in flight) |
//! | `image-format NAME FMT` | from now on, commands that name no format open NAME as FMT |
//!
//! `io IMAGE` on an attached image goes through its BlockBackend, so guest
//! writes reach whatever node the device is on (after a pivot: the base).

use super::jobs::{parse_format, parse_job_args, step_job};
use super::{invalid, Ctx, Environment, Failure, Outcome};
use crate::backend::BackendId;
use crate::error::{Error, ErrorKind};
use crate::format::Format;
use crate::graph::{Access, Graph};
use crate::jobs::{JobId, JobStatus};

/// Longest image name a session keeps.
const NAME_CAPACITY: usize = 256;

/// An image attached in a session.
struct Attached {
    name: heapless::String<NAME_CAPACITY>,
    backend: BackendId,
    job: Option<JobId>,
}

/// Images attached across the commands of one script (at most `SLOTS`).
pub struct Session<const SLOTS: usize = 8> {
    slots: [Option<Attached>; SLOTS],
}

impl<const SLOTS: usize> Default for Session<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const SLOTS: usize> Session<SLOTS> {
    /// An empty session.
    pub const fn new() -> Self {
        Self {
            slots: [const { None }; SLOTS],
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|a| a.name == name))
    }

    /// The backend of attached image `name`.
    pub(crate) fn backend(&self, name: &str) -> Option<BackendId> {
        self.find(name)
            .and_then(|i| self.slots[i].as_ref())
            .map(|a| a.backend)
    }

    /// The job started on attached image `name`, if any.
    pub(crate) fn job(&self, name: &str) -> Option<JobId> {
        self.find(name)
            .and_then(|i| self.slots[i].as_ref())
            .and_then(|a| a.job)
    }

    /// Ends the session: jobs still running are cancelled and stepped to
    /// their end, then every image is detached.
    ///
    /// # Errors
    /// Graph errors while releasing (the first one is returned).
    pub fn close<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        env: &mut E,
        graph: &mut Graph<E::Device, N, B, C, J>,
        scratch: &mut [u8],
    ) -> crate::Result<()> {
        let mut first_error = Ok(());
        for slot in self.slots.iter_mut() {
            let Some(attached) = slot.take() else {
                continue;
            };
            if let Some(job) = attached.job {
                // Cancels the job unless it has ended, and drains it.
                let ended = (|| {
                    if !matches!(
                        graph.job_info(job)?.status,
                        JobStatus::Concluded | JobStatus::Aborting
                    ) {
                        graph.job_cancel(job)?;
                    }
                    while step_job(graph, job, env.resolver(), scratch)? != JobStatus::Concluded {}
                    graph.job_dismiss(job)
                })();
                first_error = first_error.and(ended);
            }
            first_error = first_error.and(graph.detach_backend(attached.backend));
        }
        first_error
    }
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Runs a session command; `None` when `name` is not one.
    pub(crate) fn session_command<'a, const S: usize>(
        &mut self,
        session: &mut Session<S>,
        name: &str,
        words: &[&'a str],
    ) -> Option<Outcome<'a>> {
        let outcome = match name {
            "job-start" => self.job_start(session, words),
            "checksum" => self.checksum(session, words),
            "image-format" => self.image_format(words),
            "job-step" | "job-pause" | "job-resume" | "job-complete" | "job-cancel"
            | "job-info" | "job-wait" => self.job_verb(session, name, words),
            _ => return None,
        };
        Some(outcome)
    }

    /// `image-format NAME FMT`: NAME is opened as FMT by the commands that
    /// name no format.
    fn image_format<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        const USAGE: &str = "usage: image-format NAME qcow2|raw";
        let [name, format] = words else {
            return Err(invalid(USAGE));
        };
        let format = parse_format(Some(format), USAGE)?;
        self.env
            .pin_format(name, format)
            .map_err(|e| Failure::new(e, name))
    }

    /// Attaches `name` (of `format`, probed when `None`) in `session`
    /// (read-write, as a device) unless it already is; returns its slot.
    fn attach<'a, const S: usize>(
        &mut self,
        session: &mut Session<S>,
        name: &'a str,
        format: Option<Format>,
    ) -> Result<usize, Failure<'a>> {
        if let Some(i) = session.find(name) {
            return Ok(i);
        }
        let free = session
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| {
                Failure::new(
                    Error::new(
                        ErrorKind::NoCapacity,
                        "too many images attached in the session",
                    ),
                    name,
                )
            })?;
        let mut stored = heapless::String::new();
        stored.push_str(name).map_err(|_| {
            Failure::new(
                Error::new(ErrorKind::InvalidInput, "image name is too long"),
                name,
            )
        })?;
        let (_, backend) = self.open_as_device(name, format, Access::READ_WRITE_DEVICE)?;
        session.slots[free] = Some(Attached {
            name: stored,
            backend,
            job: None,
        });
        Ok(free)
    }

    /// `job-start commit|stream ... IMAGE`: attaches IMAGE and starts a job on it.
    fn job_start<'a, const S: usize>(
        &mut self,
        session: &mut Session<S>,
        words: &[&'a str],
    ) -> Outcome<'a> {
        const USAGE: &str =
            "usage: job-start commit|stream [-f FMT] [--top TOP] [--base BASE] IMAGE";
        let (&kind, rest) = words.split_first().ok_or_else(|| invalid(USAGE))?;
        let commit = match kind {
            "commit" => true,
            "stream" => false,
            _ => return Err(invalid(USAGE)),
        };
        let args = parse_job_args(rest, commit, USAGE)?;
        let slot = self.attach(session, args.image, args.format)?;
        let attached = session.slots[slot].as_mut().ok_or_else(|| invalid(USAGE))?;
        if attached.job.is_some() {
            return Err(Failure::new(
                Error::new(ErrorKind::Busy, "the image already has a job"),
                args.image,
            ));
        }
        let active = self.graph.root(attached.backend)?;
        let job = self.start_job(active, commit, &args)?;
        attached.job = Some(job);
        writeln!(self.out, "job started: {kind} on {}", args.image)?;
        Ok(())
    }

    /// `job-VERB IMAGE`: applies the verb to IMAGE's job and reports its state.
    fn job_verb<'a, const S: usize>(
        &mut self,
        session: &mut Session<S>,
        verb: &str,
        words: &[&'a str],
    ) -> Outcome<'a> {
        let (image, count) = match words {
            [image] => (*image, 1),
            [image, count] if verb == "job-step" => (
                *image,
                super::args::parse_size(count).map_err(|e| Failure::new(e, count))?,
            ),
            _ => return Err(invalid("usage: job-VERB IMAGE (job-step IMAGE [COUNT])")),
        };
        let no_job = || {
            Failure::new(
                Error::new(ErrorKind::InvalidInput, "no job on this image"),
                image,
            )
        };
        let slot = session.find(image).ok_or_else(no_job)?;
        let attached = session.slots[slot].as_mut().ok_or_else(no_job)?;
        let job = attached.job.ok_or_else(no_job)?;
        let in_verb = |e: Error| Failure::new(e, image);
        match verb {
            "job-step" => {
                // Steps while the job runs: a paused, ready or finished job
                // would make further steps idle.
                for _ in 0..count {
                    let status = step_job(self.graph, job, self.env.resolver(), self.scratch)?;
                    if status != JobStatus::Running {
                        break;
                    }
                }
            }
            "job-pause" => self.graph.job_pause(job).map_err(in_verb)?,
            "job-resume" => self.graph.job_resume(job).map_err(in_verb)?,
            "job-complete" => self.graph.job_complete(job).map_err(in_verb)?,
            "job-cancel" => self.graph.job_cancel(job).map_err(in_verb)?,
            "job-wait" => {
                attached.job = None;
                let info = self.graph.job_info(job)?;
                self.run_job(job, false)?;
                return self.finish_report(attached.backend, info.kind, info.active_commit, image);
            }
            _ => {}
        }
        let info = self.graph.job_info(job)?;
        writeln!(
            self.out,
            "job {} on {image}: {} {}/{}",
            info.kind.name(),
            info.status,
            info.offset,
            info.len
        )?;
        Ok(())
    }
}
