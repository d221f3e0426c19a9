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
//! | `job-start commit [--top TOP] [--base BASE] IMAGE` | starts a commit job on IMAGE (attached) |
//! | `job-start stream [--base BASE] IMAGE` | starts a stream job on IMAGE |
//! | `job-step IMAGE [COUNT]` | steps IMAGE's job up to COUNT times (default 1), while it runs |
//! | `job-pause`, `job-resume`, `job-complete`, `job-cancel`, `job-info` `IMAGE` | QMP verbs |
//! | `job-wait IMAGE` | steps to the end (completing when ready) and reports |
//! | `checksum IMAGE` | FNV-1a 64 of the guest view |
//!
//! `io IMAGE` on an attached image goes through its BlockBackend, so guest
//! writes reach whatever node the device is on (after a pivot: the base).

use core::fmt;

use super::jobs::{finish_report, parse_job_args, run_job, start_job};
use super::{invalid, open_as_device, with_image, Environment, Failure, Outcome};
use crate::backend::BackendId;
use crate::error::{Error, ErrorKind};
use crate::graph::{Access, Graph, OpenOptions};
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

    /// Attaches `name` (read-write, as a device) unless it already is.
    fn attach<
        'a,
        E: Environment,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        env: &mut E,
        graph: &mut Graph<E::Device, N, B, C, J>,
        name: &'a str,
    ) -> Result<usize, Failure<'a>> {
        if let Some(i) = self.find(name) {
            return Ok(i);
        }
        let free = self.slots.iter().position(Option::is_none).ok_or_else(|| {
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
        let (_, backend) = open_as_device(env, graph, name, Access::READ_WRITE_DEVICE)?;
        self.slots[free] = Some(Attached {
            name: stored,
            backend,
            job: None,
        });
        Ok(free)
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
                let ended = cancel_and_drain(env, graph, job, scratch);
                first_error = first_error.and(ended);
            }
            first_error = first_error.and(graph.detach_backend(attached.backend));
        }
        first_error
    }
}

fn cancel_and_drain<
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    job: JobId,
    scratch: &mut [u8],
) -> crate::Result<()> {
    if !matches!(
        graph.job_info(job)?.status,
        JobStatus::Concluded | JobStatus::Aborting
    ) {
        graph.job_cancel(job)?;
    }
    while graph.job_step(job, env.resolver(), scratch)? != JobStatus::Concluded {}
    graph.job_dismiss(job)
}

/// Runs a session command; `None` when `name` is not one.
pub(crate) fn run<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    session: &mut Session<S>,
    name: &str,
    words: &[&'a str],
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
) -> Option<Outcome<'a>> {
    let outcome = match name {
        "job-start" => job_start(env, graph, session, words, out),
        "checksum" => checksum(env, graph, session, words, scratch, out),
        "job-step" | "job-pause" | "job-resume" | "job-complete" | "job-cancel" | "job-info"
        | "job-wait" => job_verb(env, graph, session, name, words, scratch, out),
        _ => return None,
    };
    Some(outcome)
}

fn job_start<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    session: &mut Session<S>,
    words: &[&'a str],
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    const USAGE: &str = "usage: job-start commit|stream [--top TOP] [--base BASE] IMAGE";
    let (&kind, rest) = words.split_first().ok_or_else(|| invalid(USAGE))?;
    let commit = match kind {
        "commit" => true,
        "stream" => false,
        _ => return Err(invalid(USAGE)),
    };
    let args = parse_job_args(rest, commit, USAGE)?;
    let slot = session.attach(env, graph, args.image)?;
    let attached = session.slots[slot].as_mut().ok_or_else(|| invalid(USAGE))?;
    if attached.job.is_some() {
        return Err(Failure::new(
            Error::new(ErrorKind::Busy, "the image already has a job"),
            args.image,
        ));
    }
    let active = graph.root(attached.backend)?;
    let job = start_job(env, graph, active, commit, &args)?;
    attached.job = Some(job);
    writeln!(out, "job started: {kind} on {}", args.image)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn job_verb<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    session: &mut Session<S>,
    verb: &str,
    words: &[&'a str],
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
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
                if graph.job_step(job, env.resolver(), scratch)? != JobStatus::Running {
                    break;
                }
            }
        }
        "job-pause" => graph.job_pause(job).map_err(in_verb)?,
        "job-resume" => graph.job_resume(job).map_err(in_verb)?,
        "job-complete" => graph.job_complete(job).map_err(in_verb)?,
        "job-cancel" => graph.job_cancel(job).map_err(in_verb)?,
        "job-wait" => {
            attached.job = None;
            let info = graph.job_info(job)?;
            run_job(env, graph, job, scratch, false, out)?;
            return finish_report(
                graph,
                attached.backend,
                info.kind,
                info.active_commit,
                image,
                out,
            );
        }
        _ => {}
    }
    let info = graph.job_info(job)?;
    writeln!(
        out,
        "job {} on {image}: {} {}/{}",
        info.kind.name(),
        info.status,
        info.offset,
        info.len
    )?;
    Ok(())
}

/// `checksum IMAGE`: FNV-1a 64 over every byte of the guest view.
fn checksum<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
    const S: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    session: &mut Session<S>,
    words: &[&'a str],
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let [image] = words else {
        return Err(invalid("usage: checksum IMAGE"));
    };
    let digest = match session.backend(image) {
        Some(backend) => {
            let root = graph.root(backend)?;
            digest(graph, root, scratch)?
        }
        None => with_image(
            env,
            graph,
            image,
            OpenOptions::default(),
            |_, graph, node| Ok(digest(graph, node, scratch)?),
        )?,
    };
    writeln!(
        out,
        "checksum {image}: {:016x} ({} bytes)",
        digest.0, digest.1
    )?;
    Ok(())
}

/// FNV-1a 64 of `node`'s guest view, and its size.
fn digest<D: crate::Device, const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &mut Graph<D, N, B, C, J>,
    node: crate::NodeId,
    scratch: &mut [u8],
) -> crate::Result<(u64, u64)> {
    let size = graph.size(node)?;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(scratch.len() as u64) as usize;
        graph.read(node, offset, &mut scratch[..n])?;
        for &byte in &scratch[..n] {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        offset += n as u64;
    }
    Ok((hash, size))
}
