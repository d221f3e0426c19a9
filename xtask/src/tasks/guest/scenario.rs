//! The live block jobs, in QEMU's QMP only, while the guest's fio writes:
//!
//! ```text
//! start      base <- mid <- top                     (export on top)
//! snapshot   base <- mid <- top <- snap             blockdev-snapshot-sync
//!                                                   (the export moves to snap)
//! stream     base <- mid <- snap                    block-stream snap, base mid
//!                                                   (top's data copied into snap)
//! commit     base <- mid                            block-commit snap into mid,
//!                                                   READY, job-complete (pivot:
//!                                                   the export moves to mid)
//! ```
//!
//! Jobs are started with `auto-dismiss=false` and dismissed with
//! `job-dismiss` after `JOB_STATUS_CHANGE` reports `concluded`, so the run
//! exercises the verbs a QSD-compatible server must answer.
//!
//! The events qemu-storage-daemon 10.0.2 sends (what a stand-in must send
//! too; `device` in `BLOCK_JOB_*` is the job id):
//!
//! ```text
//! block-stream   JOB_STATUS_CHANGE created, running, waiting, pending;
//!                BLOCK_JOB_COMPLETED {device, len, offset, speed, type:
//!                "stream"}; JOB_STATUS_CHANGE concluded
//! block-commit   created, running, ready; BLOCK_JOB_READY {.., type:
//!                "commit"}; after job-complete: waiting, pending,
//!                BLOCK_JOB_COMPLETED, concluded
//! job-dismiss    JOB_STATUS_CHANGE null
//! quit           BLOCK_EXPORT_DELETED {id} before the socket closes
//! ```
//!
//! Guest writes reach the new overlay within about a second of the
//! snapshot (fio is already writing when `/init` prints its start marker).

use std::thread;
use std::time::{Duration, Instant};

use super::qmp::{Event, Qmp};
use crate::json::{object, Value};
use crate::tasks::lab::Lab;
use crate::{Error, Result};

/// How long one job may take to reach the next state.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the new overlay may stay untouched by guest writes.
const GROWTH_TIMEOUT: Duration = Duration::from_secs(30);

/// What the scenario saw, for the report.
pub struct Outcome {
    /// How much the new overlay grew before any job copied into it (guest
    /// writes allocating clusters): proof that the export followed the
    /// snapshot.
    pub snap_guest_bytes: u64,
    pub elapsed: Duration,
}

/// The live snapshot: `blockdev-snapshot-sync` puts a new qcow2 overlay
/// `snap.qcow2` (node `snap`) on the node `top`; the export follows it.
pub fn snapshot(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "blockdev-snapshot-sync",
        Some(object([
            ("node-name", "top".into()),
            ("snapshot-file", "snap.qcow2".into()),
            ("snapshot-node-name", "snap".into()),
            ("format", "qcow2".into()),
        ])),
    )
    .map(drop)
}

/// Runs the three jobs. `pause` is how long to let guest writes land
/// between steps (and in the commit's READY state, when the mirror copies
/// every guest write to both sides).
pub fn run(qmp: &mut Qmp, lab: &Lab, pause: Duration) -> Result<Outcome> {
    let started = Instant::now();
    snapshot(qmp)?;
    // The server caches qcow2 metadata until a flush, but data clusters are
    // written to the file at once: a growing file shows guest writes landing.
    // (fio takes a few seconds to start under TCG: poll.)
    let created = lab.file_len("snap.qcow2")?;
    let waited = Instant::now();
    let snap_guest_bytes = loop {
        let grown = lab.file_len("snap.qcow2")?.saturating_sub(created);
        if grown > 0 {
            break grown;
        }
        if waited.elapsed() > GROWTH_TIMEOUT {
            return Err(Error::msg(format!(
                "no guest write reached snap.qcow2 within {} s of the live snapshot: \
                 the export did not follow the snapshot (or the guest is not writing)",
                GROWTH_TIMEOUT.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(50));
    };
    println!(
        "    snap.qcow2 grew by {snap_guest_bytes} bytes under guest writes {:.1} s after the snapshot",
        waited.elapsed().as_secs_f64()
    );
    thread::sleep(pause);

    qmp.execute(
        "block-stream",
        Some(object([
            ("job-id", "stream0".into()),
            ("device", "snap".into()),
            ("base-node", "mid".into()),
            ("backing-file", "mid.qcow2".into()),
            ("auto-dismiss", false.into()),
        ])),
    )?;
    finish_job(qmp, "stream0")?;
    thread::sleep(pause);

    qmp.execute(
        "block-commit",
        Some(object([
            ("job-id", "commit0".into()),
            ("device", "snap".into()),
            ("base-node", "mid".into()),
            ("auto-dismiss", false.into()),
        ])),
    )?;
    qmp.wait_event("BLOCK_JOB_READY for commit0", JOB_TIMEOUT, |e| {
        e.name == "BLOCK_JOB_READY" && e.field("device") == Some("commit0")
    })?;
    thread::sleep(pause);
    qmp.execute("job-complete", Some(object([("id", "commit0".into())])))?;
    finish_job(qmp, "commit0")?;

    let jobs = qmp.execute("query-jobs", None)?;
    if jobs.as_array().is_none_or(|jobs| !jobs.is_empty()) {
        return Err(Error::msg(format!(
            "query-jobs lists jobs after all were dismissed: {}",
            crate::json::render(&jobs)
        )));
    }
    Ok(Outcome {
        snap_guest_bytes,
        elapsed: started.elapsed(),
    })
}

/// Waits for `BLOCK_JOB_COMPLETED` (without an `error`) and the
/// `concluded` status, then dismisses the job.
fn finish_job(qmp: &mut Qmp, id: &str) -> Result<()> {
    let completed = qmp.wait_event(&format!("BLOCK_JOB_COMPLETED for {id}"), JOB_TIMEOUT, |e| {
        e.name == "BLOCK_JOB_COMPLETED" && e.field("device") == Some(id)
    })?;
    if let Some(error) = completed.field("error") {
        return Err(Error::msg(format!("job {id} failed: {error}")));
    }
    qmp.wait_event(&format!("{id} concluded"), JOB_TIMEOUT, |e: &Event| {
        e.name == "JOB_STATUS_CHANGE"
            && e.field("id") == Some(id)
            && e.field("status") == Some("concluded")
    })?;
    qmp.execute("job-dismiss", Some(object([("id", Value::from(id))])))?;
    qmp.wait_event(&format!("{id} null"), JOB_TIMEOUT, |e: &Event| {
        e.name == "JOB_STATUS_CHANGE"
            && e.field("id") == Some(id)
            && e.field("status") == Some("null")
    })?;
    Ok(())
}
