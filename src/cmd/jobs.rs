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

use super::{invalid, Ctx, Environment, Failure, Outcome};
use crate::device::Device;
use crate::error::{Error, ErrorKind};
use crate::format::Format;
use crate::graph::{Access, Graph, NodeId, Resolver};
use crate::jobs::{CommitRequest, JobId, JobInfo, JobKind, JobStatus, OnError, StreamRequest};
use crate::BackendId;

const COMMIT_USAGE: &str = "usage: commit [-f FMT] [--top TOP] [--base BASE] [-p] IMAGE";
const STREAM_USAGE: &str = "usage: stream [-f FMT] [--base BASE] [-p] IMAGE";
const SNAPSHOT_USAGE: &str = "usage: snapshot [-f FMT] IMAGE NEW_OVERLAY";

/// The words of a job command.
pub(crate) struct JobArgs<'a> {
    top: Option<&'a str>,
    base: Option<&'a str>,
    progress: bool,
    pub(crate) image: &'a str,
    /// `-f FMT`: IMAGE's format (`None` probes).
    pub(crate) format: Option<Format>,
}

/// Parses `[-f FMT] [--top TOP] [--base BASE] [-p] IMAGE` (`--top` for
/// commit only).
pub(crate) fn parse_job_args<'a>(
    words: &[&'a str],
    allow_top: bool,
    usage: &'static str,
) -> Result<JobArgs<'a>, Failure<'a>> {
    let (mut top, mut base, mut image, mut progress) = (None, None, None, false);
    let mut format = None;
    let mut words = words.iter().copied();
    while let Some(word) = words.next() {
        match word {
            "-f" => format = Some(parse_format(words.next(), usage)?),
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
        format,
    })
}

/// The format named by `-f`'s value.
/// [`Graph::job_step`], where the step that concludes a failed job is
/// just `Concluded`: the commands report the job's error from `job_info`
/// once they have shown its progress and dismissed it.
pub(crate) fn step_job<
    D: Device,
    R: Resolver<D>,
    const N: usize,
    const B: usize,
    const C: usize,
    const J: usize,
>(
    graph: &mut Graph<D, N, B, C, J>,
    job: JobId,
    resolver: &mut R,
    scratch: &mut [u8],
) -> crate::Result<JobStatus> {
    match graph.job_step(job, resolver, scratch) {
        Err(_)
            if graph
                .job_info(job)
                .is_ok_and(|i| i.status == JobStatus::Concluded) =>
        {
            Ok(JobStatus::Concluded)
        }
        stepped => stepped,
    }
}

pub(crate) fn parse_format<'a>(
    name: Option<&'a str>,
    usage: &'static str,
) -> Result<Format, Failure<'a>> {
    let name = name.ok_or_else(|| invalid(usage))?;
    Format::from_name(name).map_err(|e| Failure::new(e, name))
}

impl<E: Environment, const N: usize, const B: usize, const C: usize, const J: usize>
    Ctx<'_, E, N, B, C, J>
{
    /// Starts a commit (`commit`) or stream job on the chain of `active`, as
    /// `args` name its top and base.
    pub(crate) fn start_job<'a>(
        &mut self,
        active: NodeId,
        commit: bool,
        args: &JobArgs<'a>,
    ) -> Result<JobId, Failure<'a>> {
        let base = match args.base {
            Some(name) => Some(self.find_in_chain(active, name)?),
            None => None,
        };
        let started = if commit {
            let top = match args.top {
                Some(name) => self.find_in_chain(active, name)?,
                None => active,
            };
            let base = match base {
                Some(base) => base,
                None => self.graph.backing(top)?.ok_or_else(|| {
                    Failure::new(
                        Error::new(
                            ErrorKind::InvalidInput,
                            "top has no backing file: nothing to commit into",
                        ),
                        args.top.unwrap_or(args.image),
                    )
                })?,
            };
            self.graph.start_commit(CommitRequest {
                active,
                top,
                base,
                on_error: OnError::Report,
            })
        } else {
            self.graph.start_stream(StreamRequest {
                active,
                base,
                on_error: OnError::Report,
            })
        };
        started.map_err(|e| Failure::new(e, args.image))
    }

    /// Says what a finished job left: the new active image after an active
    /// commit, the new backing file after a stream.
    pub(crate) fn finish_report<'a>(
        &mut self,
        backend: BackendId,
        kind: JobKind,
        active_commit: bool,
        image: &str,
    ) -> Outcome<'a> {
        let (graph, out) = (&*self.graph, &mut *self.out);
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
    pub(crate) fn commit_or_stream<'a>(&mut self, words: &[&'a str], commit: bool) -> Outcome<'a> {
        let usage = if commit { COMMIT_USAGE } else { STREAM_USAGE };
        let args = parse_job_args(words, commit, usage)?;
        let (active, backend) =
            self.open_as_device(args.image, args.format, Access::READ_WRITE_DEVICE)?;
        let result = (|| {
            let job = self.start_job(active, commit, &args)?;
            let info = self.graph.job_info(job)?;
            self.run_job(job, args.progress)?;
            self.finish_report(backend, info.kind, info.active_commit, args.image)
        })();
        self.graph.detach_backend(backend)?;
        result
    }

    /// Runs `snapshot`.
    pub(crate) fn snapshot<'a>(&mut self, words: &[&'a str]) -> Outcome<'a> {
        let (format, words) = match words {
            ["-f", name, rest @ ..] => (Some(parse_format(Some(name), SNAPSHOT_USAGE)?), rest),
            _ => (None, words),
        };
        let [image, overlay_name] = words else {
            return Err(invalid(SNAPSHOT_USAGE));
        };
        if overlay_name.starts_with('-') || image.starts_with('-') {
            return Err(invalid(SNAPSHOT_USAGE));
        }
        let (active, backend) = self.open_as_device(image, format, Access::READ_WRITE_DEVICE)?;
        let result = (|| {
            // Creating truncates: never let the new overlay be a chain member.
            if self.find_in_chain(active, overlay_name).is_ok() {
                return Err(Failure::new(
                    Error::new(
                        ErrorKind::InvalidInput,
                        "the new overlay is an image of the chain",
                    ),
                    overlay_name,
                ));
            }
            let device = self
                .env
                .create(overlay_name, 0)
                .map_err(|e| Failure::new(e, overlay_name))?;
            let overlay = self
                .graph
                .snapshot(self.env.resolver(), active, device, overlay_name)
                .map_err(|e| {
                    self.env.remove(overlay_name);
                    Failure::new(e, overlay_name)
                })?;
            self.graph.unref(overlay)?;
            self.report_active(backend, image)
        })();
        self.graph.detach_backend(backend)?;
        result
    }

    /// Says which image is active after a snapshot of `previous`.
    fn report_active<'a>(&mut self, backend: BackendId, previous: &str) -> Outcome<'a> {
        let now: NodeId = self.graph.root(backend)?;
        writeln!(
            self.out,
            "Image '{}' is now the active image (backing file '{previous}')",
            self.graph.name(now)?
        )?;
        Ok(())
    }

    /// Steps `job` until it concludes, completing it when it becomes ready, and
    /// dismisses it. Fails when the job failed.
    pub(crate) fn run_job<'a>(&mut self, job: JobId, progress: bool) -> Outcome<'a> {
        let mut bar = Progress::new(self.env, progress);
        let mut completing = false;
        loop {
            let status = step_job(self.graph, job, self.env.resolver(), self.scratch)?;
            let info = self.graph.job_info(job)?;
            bar.update(self.env, &info, self.out)?;
            match status {
                JobStatus::Ready if !completing => {
                    self.graph.job_complete(job)?;
                    completing = true;
                }
                JobStatus::Paused => self.graph.job_cancel(job)?,
                JobStatus::Concluded => break,
                _ => {}
            }
        }
        let info = self.graph.job_info(job)?;
        bar.finish(self.env, &info, self.out)?;
        self.graph.job_dismiss(job)?;
        match info.error {
            Some(err) => Err(err.into()),
            None if info.cancelled => Err(Error::new(ErrorKind::Io, "job was cancelled").into()),
            None => Ok(()),
        }
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
