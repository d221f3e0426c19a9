//! QMP jobs: ids, flags, speed, and the events QEMU's job state machine
//! raises, for the graph's jobs stepped through the request engine.
//!
//! QEMU reports every status a job passes through; the graph's jobs skip
//! `waiting` (no transactions) and end a force-cancelled ready job through
//! its copy path, so the status reported is mapped:
//!
//! ```text
//!  created ─▶ running ─▶ (ready ─▶ BLOCK_JOB_READY) ─▶ waiting ─▶ pending
//!     ─▶ BLOCK_JOB_COMPLETED ─▶ concluded ─▶ (dismiss) null
//!  any live state ─cancel/failure─▶ aborting
//!     ─▶ BLOCK_JOB_CANCELLED (or BLOCK_JOB_COMPLETED with error) ─▶ concluded
//! ```

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::engine::JOB_LANES;
use crate::jobs::{CopyMode, IoStatus, JobId, JobInfo, JobKind, JobStatus, RateLimit};

use super::args::Args;
use super::{Control, ErrorClass, HostGraph, QmpError, Reply};

/// Job buffers lent to the engine (runs in flight at once).
const JOB_BUFFERS: usize = 4;
const _: () = assert!(JOB_BUFFERS <= JOB_LANES);
/// Bytes of each job buffer: whole 64 KiB clusters, several per run.
const JOB_BUFFER_BYTES: usize = 256 << 10;

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name (`JOB_STATUS_CHANGE`, `BLOCK_JOB_COMPLETED`, ...).
    pub name: &'static str,
    /// Its `data` member.
    pub data: Value,
    /// When it happened: wall-clock seconds and microseconds since the
    /// Unix epoch, as QEMU stamps events.
    pub timestamp: (u64, u32),
}

impl Event {
    fn now(name: &'static str, data: Value) -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            name,
            data,
            timestamp: (since.as_secs(), since.subsec_micros()),
        }
    }

    /// The line QMP sends (members in QSD's order):
    /// `{"timestamp": {"seconds": .., "microseconds": ..}, "event": ..., "data": ...}`.
    pub fn to_line(&self) -> String {
        json!({
            "timestamp": {"seconds": self.timestamp.0, "microseconds": self.timestamp.1},
            "event": self.name,
            "data": self.data,
        })
        .to_string()
    }
}

/// One QMP job.
#[derive(Debug)]
struct Entry {
    id: String,
    job: JobId,
    kind: JobKind,
    auto_finalize: bool,
    auto_dismiss: bool,
    /// `job-finalize` was given (for `auto-finalize: false`).
    finalize: bool,
    /// The status last reported (`JOB_STATUS_CHANGE`).
    reported: JobStatus,
    /// It reported `ready` once (`BLOCK_JOB_READY` is sent once).
    was_ready: bool,
    /// Cancelled with `force` (`job-cancel`): ends as `BLOCK_JOB_CANCELLED`
    /// even when ready.
    force_cancel: bool,
    bucket: RateLimit,
    /// Bytes done at the last look (for the bucket).
    offset: u64,
    /// The last state read from the graph.
    info: JobInfo,
}

impl Entry {
    /// Whether the job ends without its result: failed, or cancelled
    /// (a ready active commit cancelled without `force` completes).
    fn aborts(&self, info: &JobInfo) -> bool {
        info.error.is_some()
            || info.status == JobStatus::Aborting
            || info.cancelled && (self.force_cancel || !self.was_ready)
    }

    /// The status QMP shows for `info`.
    fn status(&self, info: &JobInfo) -> JobStatus {
        match info.status {
            JobStatus::Concluded => JobStatus::Concluded,
            _ if self.aborts(info) => JobStatus::Aborting,
            // QMP starts a job as it creates it.
            JobStatus::Created => JobStatus::Running,
            status => status,
        }
    }

    /// The members QEMU's `BLOCK_JOB_*` events carry (in QSD's order).
    fn block_event(&self) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("device".into(), self.id.as_str().into());
        data.insert("len".into(), self.info.len.into());
        data.insert("offset".into(), self.info.offset.into());
        data.insert("speed".into(), self.bucket.speed().into());
        data.insert("type".into(), self.kind.name().into());
        data
    }

    /// The `error` QEMU reports for a job that ended without its result.
    fn error(&self) -> Option<String> {
        match (self.info.status, self.info.error) {
            (_, Some(err)) => Some(err.to_string()),
            (JobStatus::Concluded, None) if self.aborts(&self.info) => {
                Some("Operation canceled".to_owned())
            }
            _ => None,
        }
    }
}

/// The QMP jobs of a serve loop, and the events they raised since the
/// loop last took them.
#[derive(Debug, Default)]
pub struct Jobs {
    entries: Vec<Entry>,
    events: Vec<Event>,
}

impl Jobs {
    /// No jobs. The engine's job buffers are its VMM's
    /// ([`Engine::lend_job_buffer`](crate::engine::Engine::lend_job_buffer));
    /// an engine without any gets some at the first step, for the
    /// process's life.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the events raised since the last call, oldest first, for
    /// every connection's [`Monitor::render_events`](super::Monitor::render_events).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether the table holds no job (every one dismissed): the serve loop
    /// need not call [`Control::step_jobs`] then.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    fn emit(&mut self, name: &'static str, data: Value) {
        self.events.push(Event::now(name, data));
    }

    fn status_change(&mut self, id: &str, status: &str) {
        self.emit("JOB_STATUS_CHANGE", json!({"status": status, "id": id}));
    }

    /// Checks a new job's id as QEMU does (well-formed, unused).
    pub(super) fn check_new_id(&self, id: Option<&str>) -> Result<String, QmpError> {
        // A node has no device name to default to.
        let id = id.unwrap_or_default();
        let mut chars = id.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !well_formed {
            return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
        }
        if self.index(id).is_some() {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        Ok(id.to_owned())
    }

    /// Adds graph job `job`, just started, as `id` (checked by
    /// [`Jobs::check_new_id`]) and reports it `created` and `running`, as
    /// QEMU does before the command returns.
    pub(super) fn add(
        &mut self,
        id: String,
        job: JobId,
        info: JobInfo,
        (speed, auto_finalize, auto_dismiss): (u64, bool, bool),
    ) {
        self.status_change(&id, JobStatus::Created.name());
        self.entries.push(Entry {
            id,
            job,
            kind: info.kind,
            auto_finalize,
            auto_dismiss,
            finalize: false,
            reported: JobStatus::Created,
            was_ready: false,
            force_cancel: false,
            bucket: RateLimit::new(speed),
            offset: info.offset,
            info,
        });
        let index = self.entries.len() - 1;
        self.entries[index].reported = JobStatus::Running;
        let id = self.entries[index].id.clone();
        self.status_change(&id, JobStatus::Running.name());
    }

    /// Reads entry `index`'s job from the graph and reports what changed:
    /// the statuses QEMU passes through on the way, `BLOCK_JOB_READY`,
    /// `BLOCK_JOB_PENDING`, `BLOCK_JOB_COMPLETED`/`CANCELLED`; then
    /// dismisses it when it concluded with `auto-dismiss`.
    fn report(&mut self, graph: &mut HostGraph, index: usize) {
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let Ok(info) = graph.job_info(entry.job) else {
            return;
        };
        entry
            .bucket
            .charge(info.offset.saturating_sub(entry.offset));
        entry.offset = info.offset;
        entry.info = info;
        let (from, to) = (entry.reported, entry.status(&info));
        if from == to {
            return;
        }
        let aborted = entry.aborts(&info);
        let mut path = Vec::new();
        let finishing = matches!(to, JobStatus::Waiting | JobStatus::Pending)
            || to == JobStatus::Concluded && !aborted;
        // A cancelled paused job is resumed to see the cancel. (A job is
        // reported running from its start: never from `created` here.)
        if from == JobStatus::Paused && aborted {
            path.push(JobStatus::Running);
        }
        if finishing && !matches!(from, JobStatus::Waiting | JobStatus::Pending) {
            path.push(JobStatus::Waiting);
        }
        if to == JobStatus::Concluded {
            if aborted && from != JobStatus::Aborting {
                path.push(JobStatus::Aborting);
            }
            if !aborted && from != JobStatus::Pending {
                path.push(JobStatus::Pending);
            }
        }
        path.push(to);
        entry.reported = to;
        let entry = &self.entries[index];
        let id = entry.id.clone();
        let (kind, auto_finalize, auto_dismiss, job) = (
            entry.kind,
            entry.auto_finalize,
            entry.auto_dismiss,
            entry.job,
        );
        let block_event = entry.block_event();
        let first_ready = to == JobStatus::Ready && !entry.was_ready;
        for status in path {
            if status == JobStatus::Concluded {
                let mut data = block_event.clone();
                if aborted && info.error.is_none() {
                    self.emit("BLOCK_JOB_CANCELLED", Value::Object(data));
                } else {
                    if let Some(error) = info.error {
                        data.insert("error".into(), error.to_string().into());
                    }
                    self.emit("BLOCK_JOB_COMPLETED", Value::Object(data));
                }
            }
            self.status_change(&id, status.name());
            if status == JobStatus::Ready && first_ready {
                self.entries[index].was_ready = true;
                self.emit("BLOCK_JOB_READY", Value::Object(block_event.clone()));
            }
            if status == JobStatus::Pending && !auto_finalize {
                self.emit("BLOCK_JOB_PENDING", json!({"type": kind.name(), "id": id}));
            }
        }
        if to == JobStatus::Concluded && auto_dismiss && graph.job_dismiss(job).is_ok() {
            self.entries.remove(index);
            self.status_change(&id, "null");
        }
    }
}

impl Control<'_> {
    /// Advances every live job a bounded amount through
    /// [`Engine::job_step`](crate::engine::Engine::job_step) (a job over
    /// its `speed` budget, or pending with `auto-finalize: false` and no
    /// `job-finalize` yet, is skipped) and queues the events of what
    /// changed. The serve loop calls it every iteration, between polls of
    /// the engine. Lends an engine that has no job buffers some (leaked:
    /// for the process's life).
    ///
    /// Errors of a step (a chain busy with guest requests) are not the
    /// job's: the step is tried again next time. A job's own failure ends
    /// it, reported in `BLOCK_JOB_COMPLETED`'s `error`.
    pub fn step_jobs(&mut self) {
        if self.jobs.entries.is_empty() {
            return;
        }
        // An engine that has job buffers (its VMM's, or lent here for
        // another table) steps with those.
        if self.engine.job_buffers_lent() == 0 {
            for _ in 0..JOB_BUFFERS {
                // Lent for the process's life: the engine keeps the
                // buffers of runs in flight, and runs outlive any one call.
                let buffer = Box::leak(vec![0u8; JOB_BUFFER_BYTES].into_boxed_slice());
                let _ = self.engine.lend_job_buffer(buffer);
            }
        }
        // Progress since the last look is charged before deciding.
        refresh(self);
        let now = monotonic_ns();
        for entry in self.jobs.entries.iter_mut() {
            let held = match entry.info.status {
                JobStatus::Running | JobStatus::Ready => !entry.bucket.allows(now),
                JobStatus::Pending => !entry.auto_finalize && !entry.finalize,
                _ => false,
            };
            if !held {
                let _ = self.engine.job_step(self.graph, entry.job, self.resolver);
            }
        }
        refresh(self);
    }
}

/// The verb a command applies, with the states QEMU's `JobVerbTable`
/// accepts it in.
fn verb_allowed(verb: &str, status: JobStatus) -> bool {
    use JobStatus::*;
    match verb {
        "cancel" => !matches!(status, Aborting | Concluded),
        "pause" | "resume" | "set-speed" => matches!(status, Created | Running | Paused | Ready),
        "complete" => status == Ready,
        "finalize" => status == Pending,
        "dismiss" => status == Concluded,
        _ => false,
    }
}

/// `job-*` and `block-job-*` verbs.
pub(super) fn verb(command: &str, args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let block = command.starts_with("block-job-");
    let id = match block {
        true => args.str("device")?,
        false => args.str("id")?,
    };
    let (verb, force, speed) = match command {
        "block-job-cancel" => ("cancel", args.opt_bool("force")?.unwrap_or(false), 0),
        "job-cancel" => ("cancel", true, 0),
        "block-job-set-speed" => ("set-speed", false, args.u64("speed")?),
        other => (other.trim_start_matches("job-"), false, 0),
    };
    args.finish()?;
    let index = cx.jobs.index(&id).ok_or_else(|| match block {
        true => QmpError {
            class: ErrorClass::DeviceNotActive,
            desc: format!("Block job '{id}' not found"),
        },
        false => QmpError::generic("Job not found"),
    })?;
    cx.jobs.report(cx.graph, index);
    let Some(index) = cx.jobs.index(&id) else {
        return Err(QmpError::generic("Job not found"));
    };
    let entry = &mut cx.jobs.entries[index];
    let status = entry.reported;
    if !verb_allowed(verb, status) {
        return Err(QmpError::generic(format!(
            "Job '{id}' in state '{}' cannot accept command verb '{verb}'",
            status.name()
        )));
    }
    let job = entry.job;
    let result = match verb {
        "pause" if status == JobStatus::Paused => {
            return Err(QmpError::generic("Job is already paused"))
        }
        "pause" => cx.graph.job_pause(job),
        "resume" if status != JobStatus::Paused => {
            return Err(QmpError::generic("Can't resume a job that was not paused"))
        }
        "resume" => cx.graph.job_resume(job),
        "complete" => cx.graph.job_complete(job),
        "cancel" if block && !force && status == JobStatus::Paused => {
            return Err(QmpError::generic(format!(
                "The block job for device '{id}' is currently paused"
            )))
        }
        "cancel" => {
            let cancelled = cx.graph.job_cancel(job);
            if cancelled.is_ok() {
                entry.force_cancel = force;
            }
            cancelled
        }
        "finalize" => {
            entry.finalize = true;
            Ok(())
        }
        "set-speed" => {
            entry.bucket = RateLimit::new(speed);
            Ok(())
        }
        _ => {
            // "dismiss"
            cx.graph.job_dismiss(job)?;
            cx.jobs.entries.remove(index);
            cx.jobs.status_change(&id, "null");
            return Ok(json!({}));
        }
    };
    result?;
    cx.jobs.report(cx.graph, index);
    Ok(json!({}))
}

/// `block-job-change`: an active commit's copy mode (QEMU's mirror
/// `copy-mode`, `background` or `write-blocking`). Our active commit takes
/// it with `type` `mirror` (what QEMU runs it as) or `commit`.
pub(super) fn change(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    let id = args.str("id")?;
    let kind = args.str("type")?;
    let mode = match args.str("copy-mode")?.as_str() {
        "background" => CopyMode::Background,
        "write-blocking" => CopyMode::WriteBlocking,
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'copy-mode' does not accept value '{other}'"
            )))
        }
    };
    args.finish()?;
    let index = cx.jobs.index(&id).ok_or_else(|| QmpError {
        class: ErrorClass::DeviceNotActive,
        desc: format!("Block job '{id}' not found"),
    })?;
    let job = cx.jobs.entries[index].job;
    if !matches!(kind.as_str(), "mirror" | "commit") || !cx.graph.job_info(job)?.active_commit {
        return Err(QmpError::generic("Job type does not match"));
    }
    cx.graph.job_change_copy_mode(job, mode)?;
    Ok(json!({}))
}

/// `query-jobs`: QEMU's `JobInfo` for every job.
pub(super) fn query_jobs(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    args.finish()?;
    refresh(cx);
    let jobs = cx.jobs.entries.iter().map(|entry| {
        let mut info = json!({
            "id": entry.id,
            "type": entry.kind.name(),
            "status": entry.reported.name(),
            "current-progress": entry.info.offset,
            "total-progress": entry.info.len,
        });
        if let (Some(error), Value::Object(members)) = (entry.error(), &mut info) {
            members.insert("error".into(), error.into());
        }
        info
    });
    Ok(Value::Array(jobs.collect()))
}

/// `query-block-jobs`: QEMU's `BlockJobInfo` for every job.
pub(super) fn query_block_jobs(args: &mut Args, cx: &mut Control<'_>) -> Reply {
    args.finish()?;
    refresh(cx);
    let jobs = cx.jobs.entries.iter().map(|entry| {
        let mut info = entry.block_event();
        let io_status = match entry.info.io_status {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        };
        for (key, value) in [
            ("busy", Value::from(entry.reported == JobStatus::Running)),
            ("paused", (entry.reported == JobStatus::Paused).into()),
            ("io-status", io_status.into()),
            ("ready", entry.info.ready.into()),
            ("status", entry.reported.name().into()),
            ("auto-finalize", entry.auto_finalize.into()),
            ("auto-dismiss", entry.auto_dismiss.into()),
        ] {
            info.insert(key.into(), value);
        }
        if let Some(error) = entry.error() {
            info.insert("error".into(), error.into());
        }
        Value::Object(info)
    });
    Ok(Value::Array(jobs.collect()))
}

/// Reports what changed in every job since the last look.
fn refresh(cx: &mut Control<'_>) {
    let mut index = 0;
    while index < cx.jobs.entries.len() {
        let before = cx.jobs.entries.len();
        cx.jobs.report(cx.graph, index);
        if cx.jobs.entries.len() == before {
            index += 1;
        }
    }
}

/// Nanoseconds on a monotonic clock (since the first call), for the jobs'
/// rate limits.
fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_qemus_table() {
        use JobStatus::*;
        let all = [
            Created, Running, Paused, Ready, Waiting, Pending, Aborting, Concluded,
        ];
        let accepted = |verb: &str| -> Vec<JobStatus> {
            all.into_iter().filter(|&s| verb_allowed(verb, s)).collect()
        };
        assert_eq!(accepted("complete"), [Ready]);
        assert_eq!(accepted("dismiss"), [Concluded]);
        assert_eq!(accepted("finalize"), [Pending]);
        assert_eq!(accepted("pause"), [Created, Running, Paused, Ready]);
        assert_eq!(
            accepted("cancel"),
            [Created, Running, Paused, Ready, Waiting, Pending]
        );
        assert_eq!(accepted("unknown"), []);
    }
}
