//! Block jobs from the command line, run to completion:
//! `commit [--top TOP] [--base BASE] [-p] IMAGE`,
//! `stream [--base BASE] [-p] IMAGE` and `snapshot IMAGE NEW_OVERLAY`.
//!
//! IMAGE is opened as a VMM would run it: a BlockBackend stands for the
//! guest's device. An active commit (TOP is IMAGE, the default) ends with
//! that backend on BASE, which is then the active image; IMAGE itself is not
//! modified. `-p` draws a progress bar (percent, bytes, rate) when the output
//! is a terminal.

use core::fmt;

use super::collapse::find_in_chain;
use super::{invalid, open_as_device, Environment, Failure, Outcome};
use crate::error::{Error, ErrorKind};
use crate::graph::{Access, Graph, NodeId};
use crate::jobs::{CommitRequest, JobId, JobInfo, JobKind, JobStatus, OnError, StreamRequest};
use crate::BackendId;

const COMMIT_USAGE: &str = "usage: commit [--top TOP] [--base BASE] [-p] IMAGE";
const STREAM_USAGE: &str = "usage: stream [--base BASE] [-p] IMAGE";
const SNAPSHOT_USAGE: &str = "usage: snapshot IMAGE NEW_OVERLAY";

/// The words of a job command.
pub(crate) struct JobArgs<'a> {
    top: Option<&'a str>,
    base: Option<&'a str>,
    progress: bool,
    pub(crate) image: &'a str,
}

/// Parses `[--top TOP] [--base BASE] [-p] IMAGE` (`--top` for commit only).
pub(crate) fn parse_job_args<'a>(
    words: &[&'a str],
    allow_top: bool,
    usage: &'static str,
) -> Result<JobArgs<'a>, Failure<'a>> {
    let (mut top, mut base, mut image, mut progress) = (None, None, None, false);
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        match word {
            "--top" | "-t" if allow_top => top = Some(words.next().ok_or_else(|| invalid(usage))?),
            "--base" | "-b" => base = Some(words.next().ok_or_else(|| invalid(usage))?),
            "-p" => progress = true,
            _ if word.starts_with('-') || image.is_some() => return Err(invalid(usage)),
            _ => image = Some(word),
        }
    }
    let image = image.ok_or_else(|| invalid(usage))?;
    Ok(JobArgs {
        top,
        base,
        progress,
        image,
    })
}

/// Starts a commit (`commit`) or stream job on the chain of `active`, as
/// `args` name its top and base.
pub(crate) fn start_job<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    active: NodeId,
    commit: bool,
    args: &JobArgs<'a>,
) -> Result<JobId, Failure<'a>> {
    let base = match args.base {
        Some(name) => Some(find_in_chain(env, graph, active, name)?),
        None => None,
    };
    let started = if commit {
        let top = match args.top {
            Some(name) => find_in_chain(env, graph, active, name)?,
            None => active,
        };
        let base = match base {
            Some(base) => base,
            None => graph.backing(top)?.ok_or_else(|| {
                Failure::new(
                    Error::new(
                        ErrorKind::InvalidInput,
                        "top has no backing file: nothing to commit into",
                    ),
                    args.top.unwrap_or(args.image),
                )
            })?,
        };
        graph.start_commit(CommitRequest {
            active,
            top,
            base,
            on_error: OnError::Report,
        })
    } else {
        graph.start_stream(StreamRequest {
            active,
            base,
            on_error: OnError::Report,
        })
    };
    started.map_err(|e| Failure::new(e, args.image))
}

/// Says what a finished job left: the new active image after an active
/// commit, the new backing file after a stream.
pub(crate) fn finish_report<
    'a,
    D: crate::Device,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    graph: &Graph<D, N, B, C, J>,
    backend: BackendId,
    kind: JobKind,
    active_commit: bool,
    image: &str,
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let root = graph.root(backend)?;
    match kind {
        JobKind::Commit if active_commit => {
            writeln!(out, "Image '{}' is now the active image", graph.name(root)?)?
        }
        JobKind::Commit => writeln!(out, "Image committed.")?,
        JobKind::Stream => match graph.backing(root)? {
            Some(base) => writeln!(
                out,
                "Image '{image}' now has backing file '{}'",
                graph.name(base)?
            )?,
            None => writeln!(out, "Image '{image}' no longer has a backing file")?,
        },
    }
    Ok(())
}

/// Runs a `commit` (`commit` true) or `stream` command to completion.
pub fn run_command<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    words: &[&'a str],
    commit: bool,
    scratch: &mut [u8],
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let usage = if commit { COMMIT_USAGE } else { STREAM_USAGE };
    let args = parse_job_args(words, commit, usage)?;
    let (active, backend) = open_as_device(env, graph, args.image, Access::READ_WRITE_DEVICE)?;
    let result = (|| {
        let job = start_job(env, graph, active, commit, &args)?;
        let info = graph.job_info(job)?;
        run_job(env, graph, job, scratch, args.progress, out)?;
        finish_report(
            graph,
            backend,
            info.kind,
            info.active_commit,
            args.image,
            out,
        )
    })();
    graph.detach_backend(backend)?;
    result
}

pub fn snapshot<
    'a,
    E: Environment,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    env: &mut E,
    graph: &mut Graph<E::Device, N, B, C, J>,
    words: &[&'a str],
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let [image, overlay_name] = words else {
        return Err(invalid(SNAPSHOT_USAGE));
    };
    if overlay_name.starts_with('-') || image.starts_with('-') {
        return Err(invalid(SNAPSHOT_USAGE));
    }
    let (active, backend) = open_as_device(env, graph, image, Access::READ_WRITE_DEVICE)?;
    let result = (|| {
        // Creating truncates: never let the new overlay be a chain member.
        if find_in_chain(env, graph, active, overlay_name).is_ok() {
            return Err(Failure::new(
                Error::new(
                    ErrorKind::InvalidInput,
                    "the new overlay is an image of the chain",
                ),
                overlay_name,
            ));
        }
        let device = env
            .create(overlay_name, 0)
            .map_err(|e| Failure::new(e, overlay_name))?;
        let overlay = graph
            .snapshot(env.resolver(), active, device, overlay_name)
            .map_err(|e| Failure::new(e, overlay_name))?;
        graph.unref(overlay)?;
        report_active(graph, backend, image, out)
    })();
    graph.detach_backend(backend)?;
    result
}

fn report_active<
    'a,
    D: crate::Device,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    graph: &Graph<D, N, B, C, J>,
    backend: BackendId,
    previous: &str,
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let now: NodeId = graph.root(backend)?;
    writeln!(
        out,
        "Image '{}' is now the active image (backing file '{previous}')",
        graph.name(now)?
    )?;
    Ok(())
}

/// Steps `job` until it concludes, completing it when it becomes ready, and
/// dismisses it. Fails when the job failed.
pub(crate) fn run_job<
    'a,
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
    progress: bool,
    out: &mut dyn fmt::Write,
) -> Outcome<'a> {
    let mut bar = Progress::new(env, progress);
    let mut completing = false;
    loop {
        let status = graph.job_step(job, env.resolver(), scratch)?;
        let info = graph.job_info(job)?;
        bar.update(env, &info, out)?;
        match status {
            JobStatus::Ready if !completing => {
                graph.job_complete(job)?;
                completing = true;
            }
            JobStatus::Paused => graph.job_cancel(job)?,
            JobStatus::Concluded => break,
            _ => {}
        }
    }
    let info = graph.job_info(job)?;
    bar.finish(env, &info, out)?;
    graph.job_dismiss(job)?;
    match info.error {
        Some(err) => Err(err.into()),
        None if info.cancelled => Err(Error::new(ErrorKind::Io, "job was cancelled").into()),
        None => Ok(()),
    }
}

/// A progress bar on a terminal: percent, bytes, rate.
struct Progress {
    enabled: bool,
    terminal: bool,
    started: Option<u64>,
    shown_percent: Option<u64>,
}

impl Progress {
    fn new<E: Environment>(env: &mut E, enabled: bool) -> Self {
        Self {
            enabled,
            terminal: env.is_terminal(),
            started: env.now_micros(),
            shown_percent: None,
        }
    }

    fn update<E: Environment>(
        &mut self,
        env: &mut E,
        info: &JobInfo,
        out: &mut dyn fmt::Write,
    ) -> fmt::Result {
        if !self.enabled || !self.terminal {
            return Ok(());
        }
        let percent = (info.offset * 100).checked_div(info.len).unwrap_or(100);
        if self.shown_percent == Some(percent) {
            return Ok(());
        }
        self.shown_percent = Some(percent);
        out.write_str("\r")?;
        self.draw(env, info, percent, out)
    }

    fn finish<E: Environment>(
        &mut self,
        env: &mut E,
        info: &JobInfo,
        out: &mut dyn fmt::Write,
    ) -> fmt::Result {
        if !self.enabled {
            return Ok(());
        }
        if self.terminal {
            out.write_str("\r")?;
        }
        let percent = (info.offset * 100).checked_div(info.len).unwrap_or(100);
        self.draw(env, info, percent, out)?;
        out.write_str("\n")
    }

    fn draw<E: Environment>(
        &self,
        env: &mut E,
        info: &JobInfo,
        percent: u64,
        out: &mut dyn fmt::Write,
    ) -> fmt::Result {
        const WIDTH: u64 = 30;
        let filled = percent.min(100) * WIDTH / 100;
        out.write_str("[")?;
        for i in 0..WIDTH {
            out.write_char(if i < filled { '#' } else { ' ' })?;
        }
        write!(
            out,
            "] {percent:>3}% {}/{}",
            Bytes(info.offset),
            Bytes(info.len)
        )?;
        if let (Some(start), Some(now)) = (self.started, env.now_micros()) {
            let elapsed = now.saturating_sub(start).max(1);
            let rate = info.offset.saturating_mul(1_000_000) / elapsed;
            write!(out, " {}/s", Bytes(rate))?;
        }
        Ok(())
    }
}

/// A byte count in binary units.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0;
        let mut unit = 0;
        let mut tenths = 0;
        while value >= 1024 && unit < UNITS.len() - 1 {
            tenths = (value % 1024) * 10 / 1024;
            value /= 1024;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{value} B")
        } else {
            write!(f, "{value}.{tenths} {}", UNITS[unit])
        }
    }
}
