//! Block jobs: commit, active commit and stream, as step-wise state machines.
//!
//! A job is started on a [`Graph`](crate::Graph) and then advanced by
//! [`Graph::job_step`](crate::Graph::job_step), which does a bounded amount of work — one chunk of at
//! most the caller's scratch buffer — so a VMM can serve guest requests
//! between steps; or, with requests in flight, by
//! [`Engine::job_step`](crate::engine::Engine::job_step), whose copies go to
//! the devices among the guest's requests (runs planned by the `copy`
//! module). States and verbs carry QMP's names:
//!
//! ```text
//!  created ──step──▶ running ◀──pause/resume──▶ paused
//!                       │  (active commit) ──▶ ready ──complete──▶ (pivot)
//!                       ▼
//!                    pending ──step──▶ concluded ──dismiss──▶ (gone)
//!  any live state ──cancel──▶ aborting ──step──▶ concluded
//! ```
//!
//! `waiting` (waiting for transaction peers) is never entered: jobs here are
//! not grouped in transactions.
//!
//! # Example: a VMM's flow
//!
//! A guest on a base image; two live snapshots; the empty middle layer
//! collapsed away; an active commit under guest writes, completed with a
//! pivot back to the base. No node reference is handled by hand: the
//! backend holds them.
//!
//! ```
//! use blockgraph::device::MemDevice;
//! use blockgraph::format::qcow2::create::{create, CreateOptions};
//! use blockgraph::prelude::*;
//!
//! # fn main() -> blockgraph::Result<()> {
//! let mut disks = [(); 3].map(|()| vec![0u8; 2 << 20]);
//! let [base_disk, snap_disk, top_disk] = &mut disks;
//! let mut scratch = vec![0u8; 64 << 10];
//! let mut graph: Box<Graph<MemDevice<'_>, 8, 2, 16, 1>> = Box::default();
//!
//! let mut device = MemDevice::new(base_disk, 0, 1)?;
//! create(&mut device, &CreateOptions::new(1 << 20))?;
//! let guest = graph.attach_device(device, "base", Format::Qcow2, Access::READ_WRITE_DEVICE)?;
//! let base = graph.root(guest)?;
//! graph.backend_write(guest, 0, &[0x11; 4096])?;
//!
//! // Live snapshots: the guest now writes into `top`, above `snap`.
//! let snap = graph.snapshot_backend(&mut NamesOnly, guest, MemDevice::new(snap_disk, 0, 2)?, "snap")?;
//! let top = graph.snapshot_backend(&mut NamesOnly, guest, MemDevice::new(top_disk, 0, 3)?, "top")?;
//! graph.backend_write(guest, 65536, &[0x22; 4096])?;
//!
//! // Collapse: `snap` holds nothing, so dropping it changes no byte.
//! graph.drop_intermediate(&mut NamesOnly, top, snap, Some(base))?;
//! assert_eq!(graph.backing(top)?, Some(base));
//!
//! // Active commit of `top` into `base` while the guest keeps writing.
//! let request = CommitRequest { active: top, top, base, on_error: OnError::Report };
//! let job = graph.start_commit(request)?;
//! let mut tick = 0u64;
//! loop {
//!     graph.backend_write(guest, (tick % 16) * 4096, &[tick as u8; 512])?;
//!     tick += 1;
//!     match graph.job_step(job, &mut NamesOnly, &mut scratch)? {
//!         JobStatus::Ready if !graph.job_info(job)?.completing => graph.job_complete(job)?,
//!         JobStatus::Concluded => break,
//!         _ => {}
//!     }
//! }
//! graph.job_dismiss(job)?;
//! assert_eq!(graph.root(guest)?, base, "the guest pivoted to the base");
//! let mut sector = [0u8; 512];
//! graph.backend_read(guest, 65536, &mut sector)?;
//! assert_eq!(sector, [0x22; 512], "what the guest wrote into top is in base");
//!
//! graph.detach_backend(guest)?;
//! assert_eq!(graph.node_count(), 0, "nothing leaked");
//! # Ok(())
//! # }
//! ```
//!
//! While a job runs it freezes the backing links it depends on, so a second
//! job over an overlapping range, or a chain change that would rewrite a
//! reference the job holds, is refused with
//! [`ErrorKind::Busy`](crate::ErrorKind::Busy).

pub(crate) mod copy;
pub mod dirty;
mod run;

pub use dirty::DirtyBitmap;
mod rate;
pub use rate::RateLimit;

use core::fmt;

use crate::error::Error;
use crate::graph::{Handle, NodeId};

/// What a job does (QMP's job types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobKind {
    /// `block-commit`: merge layers down into a base (active or not).
    Commit,
    /// `block-stream`: pull layers up into the active layer.
    Stream,
}

impl JobKind {
    /// QMP's name for the job type.
    pub const fn name(self) -> &'static str {
        match self {
            JobKind::Commit => "commit",
            JobKind::Stream => "stream",
        }
    }
}

/// A job's state, named as QMP names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobStatus {
    /// Started, not stepped yet.
    Created,
    /// Copying.
    Running,
    /// Paused by the user or by an error with `on-error: stop`.
    Paused,
    /// Active commit: everything copied; `complete` pivots.
    Ready,
    /// Waiting for transaction peers (never entered here).
    Waiting,
    /// Work done; the next step applies the chain change.
    Pending,
    /// Cancelled or failed; the next step cleans up.
    Aborting,
    /// Finished (successfully or not); `dismiss` removes it.
    Concluded,
}

impl JobStatus {
    /// QMP's name for the state.
    pub const fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a job does when an I/O operation fails (QMP `on-error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Pause the job; `resume` retries the failed chunk.
    Stop,
    /// Carry on: commit retries the chunk on the next step; stream skips it
    /// and keeps the backing file at the end.
    Ignore,
}

/// QMP's `io-status` of a job: the result of its last chunk (QEMU reports
/// it only for `stop`; here every policy shows it until a chunk succeeds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoStatus {
    /// No error.
    Ok,
    /// The last I/O failed.
    Failed,
    /// The last I/O failed for lack of space.
    NoSpace,
}

/// A job slot's state (reached through [`Graph`](crate::Graph) methods).
pub struct Job {
    kind: JobKind,
    /// The active layer of the chain.
    active: NodeId,
    /// Commit: the top layer to merge; stream: the active layer.
    top: NodeId,
    base: Option<NodeId>,
    /// Highest node whose backing link is frozen (the job holds a reference).
    frozen_from: NodeId,
    status: JobStatus,
    resume_to: JobStatus,
    on_error: OnError,
    io_status: IoStatus,
    error: Option<Error>,
    cancelled: bool,
    complete_requested: bool,
    /// Cancelled while ready: finish copying, then end without a pivot.
    soft_cancel: bool,
    skipped_chunks: bool,
    /// The node made writable for the job, to close again at the end.
    reopened: Option<NodeId>,
    cursor: u64,
    size: u64,
    offset: u64,
    len: u64,
    dirty: Option<DirtyBitmap>,
    /// An active commit in QEMU mirror's `write-blocking` copy mode:
    /// guest writes to its top reach its base too before they complete.
    write_blocking: bool,
}

impl Job {
    /// A job in state `created` over `(active, top, base)` of `size` bytes,
    /// holding the links from `frozen_from` down.
    fn new(
        kind: JobKind,
        (active, top, base): (NodeId, NodeId, Option<NodeId>),
        frozen_from: NodeId,
        on_error: OnError,
        size: u64,
    ) -> Self {
        Self {
            kind,
            active,
            top,
            base,
            frozen_from,
            status: JobStatus::Created,
            resume_to: JobStatus::Running,
            on_error,
            io_status: IoStatus::Ok,
            error: None,
            cancelled: false,
            complete_requested: false,
            soft_cancel: false,
            skipped_chunks: false,
            reopened: None,
            cursor: 0,
            size,
            offset: 0,
            len: size,
            dirty: None,
            write_blocking: false,
        }
    }

    /// Whether this job records guest writes to `node` (an active commit of
    /// it that has not concluded).
    pub(crate) fn tracks(&self, node: NodeId) -> bool {
        self.top == node && self.dirty.is_some() && self.status != JobStatus::Concluded
    }

    /// Whether this live job works on `node` as its active or top layer.
    pub(crate) fn involves(&self, node: NodeId) -> bool {
        (self.active == node || self.top == node) && self.status != JobStatus::Concluded
    }
}

/// Handle of a job.
pub type JobId = Handle<Job>;

/// A snapshot of a job's state, as QMP `query-block-jobs` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// Job type.
    pub kind: JobKind,
    /// Whether this commit merges the active layer (QEMU runs it as mirror).
    pub active_commit: bool,
    /// State.
    pub status: JobStatus,
    /// Bytes done.
    pub offset: u64,
    /// Bytes to do (grows while an active commit re-copies guest writes).
    pub len: u64,
    /// Whether `complete` may be given (active commit, everything copied).
    pub ready: bool,
    /// Result of the last I/O.
    pub io_status: IoStatus,
    /// Why the job failed, once concluded with an error.
    pub error: Option<Error>,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// Whether [`Graph::job_complete`](crate::Graph::job_complete) was
    /// accepted: the job pivots at a coming step.
    pub completing: bool,
    /// How an active commit keeps up with guest writes
    /// ([`Graph::job_change_copy_mode`](crate::Graph::job_change_copy_mode)).
    pub copy_mode: CopyMode,
}

/// How an active commit keeps up with guest writes (QEMU mirror's
/// `copy-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyMode {
    /// Guest writes to the top are marked dirty and copied by later steps
    /// (QEMU's `background`, the default): the guest never waits for the
    /// base, but a guest that writes faster than the steps copy keeps the
    /// job from becoming ready.
    Background,
    /// Guest writes to the top are written to the base too before they
    /// complete (QEMU's `write-blocking`): nothing new becomes dirty, so
    /// the job becomes ready in a bounded number of steps whatever the
    /// guest does, at the cost of a second write per guest write.
    WriteBlocking,
}

impl CopyMode {
    /// QMP's name for the mode.
    pub const fn name(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// Parameters of a commit job.
#[derive(Clone, Copy, Debug)]
pub struct CommitRequest {
    /// The chain's active layer.
    pub active: NodeId,
    /// Highest layer to merge (== `active` for an active commit).
    pub top: NodeId,
    /// Where to merge into (must be below `top`).
    pub base: NodeId,
    /// Error policy.
    pub on_error: OnError,
}

/// Parameters of a stream job.
#[derive(Clone, Copy, Debug)]
pub struct StreamRequest {
    /// The chain's active layer, which receives the data.
    pub active: NodeId,
    /// Lowest layer kept as backing file (`None`: stream everything).
    pub base: Option<NodeId>,
    /// Error policy.
    pub on_error: OnError,
}
