//! How an active commit's scratch size and copy mode trade the guest's
//! latency against the job's progress, measured.
//!
//! A 64 MiB disk whose overlay holds 32 MiB is committed into its base
//! while a guest writes between job steps: `GUEST` bytes per step, 4 KiB
//! writes at scattered offsets. For each scratch size (the most a step
//! copies) and copy mode the table shows how long one step holds the guest
//! (mean and longest), how many steps the job takes to become ready, and
//! the time from start to pivot. The disks are in memory, so a step's time
//! is the library's own cost of copying; a real disk adds its transfer
//! time for each byte a step copies.
//!
//! Run with `cargo run --release --example commit_tradeoff` (debug builds
//! are an order of magnitude slower). The README's table comes from it.

use std::time::{Duration, Instant};

use blockgraph::device::MemDevice;
use blockgraph::format::qcow2::create::{create, CreateOptions};
use blockgraph::prelude::*;

const DISK: u64 = 64 << 20;
const DATA: u64 = 32 << 20;
/// Guest bytes written between two steps, in 4 KiB writes.
const GUEST: [u64; 2] = [16 << 10, 256 << 10];
const SCRATCH: [usize; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// A job not ready after this many steps is reported as such.
const MAX_STEPS: u64 = 20_000;

/// One run's measurements.
struct Run {
    steps_to_ready: Option<u64>,
    mean_step: Duration,
    longest_step: Duration,
    to_pivot: Duration,
}

fn main() -> Result<()> {
    println!("| copy mode | guest bytes per step | scratch | mean step | longest step | steps to ready | start to pivot |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for mode in [CopyMode::Background, CopyMode::WriteBlocking] {
        for guest in GUEST {
            for scratch in SCRATCH {
                let run = run(mode, guest, scratch)?;
                println!(
                    "| {} | {} KiB | {} KiB | {:.2} ms | {:.2} ms | {} | {} |",
                    mode.name(),
                    guest >> 10,
                    scratch >> 10,
                    run.mean_step.as_secs_f64() * 1e3,
                    run.longest_step.as_secs_f64() * 1e3,
                    run.steps_to_ready
                        .map_or(format!("not after {MAX_STEPS}"), |s| s.to_string()),
                    match run.steps_to_ready {
                        Some(_) => format!("{:.0} ms", run.to_pivot.as_secs_f64() * 1e3),
                        None => "-".into(),
                    },
                );
            }
        }
    }
    Ok(())
}

/// Commits a fresh overlay holding [`DATA`] bytes into its base, `guest`
/// bytes written between steps of at most `scratch` bytes each.
fn run(mode: CopyMode, guest: u64, scratch: usize) -> Result<Run> {
    let mut base_disk = vec![0u8; 80 << 20];
    let mut top_disk = vec![0u8; 80 << 20];
    let mut scratch = vec![0u8; scratch];
    let mut graph: Box<Graph<MemDevice<'_>, 8, 2, 64, 1>> = Box::default();

    let mut device = MemDevice::new(&mut base_disk, 0, 1)?;
    create(&mut device, &CreateOptions::new(DISK))?;
    let backend = graph.attach_device(device, "base", Format::Qcow2, Access::READ_WRITE_DEVICE)?;
    let base = graph.root(backend)?;
    let top = MemDevice::new(&mut top_disk, 0, 2)?;
    let top = graph.snapshot_backend(&mut NamesOnly, backend, top, "top")?;
    let chunk = vec![0x5a; 1 << 20];
    for at in (0..DATA).step_by(chunk.len()) {
        graph.backend_write(backend, at, &chunk)?;
    }

    let request = CommitRequest {
        active: top,
        top,
        base,
        on_error: OnError::Report,
    };
    let job = graph.start_commit(request)?;
    graph.job_change_copy_mode(job, mode)?;
    let started = Instant::now();
    let (mut steps, mut total, mut longest) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut steps_to_ready = None;
    let mut offset = 0u64;
    let page = [0xa5u8; 4096];
    while steps < MAX_STEPS {
        for _ in 0..guest / 4096 {
            offset = (offset + 7 * 65536 + 4096) % DISK;
            graph.backend_write(backend, offset, &page)?;
        }
        let step = Instant::now();
        let status = graph.job_step(job, &mut NamesOnly, &mut scratch)?;
        let took = step.elapsed();
        steps += 1;
        total += took;
        longest = longest.max(took);
        match status {
            JobStatus::Ready if !graph.job_info(job)?.completing => {
                steps_to_ready.get_or_insert(steps);
                graph.job_complete(job)?;
            }
            JobStatus::Concluded => break,
            _ => {}
        }
    }
    let to_pivot = started.elapsed();
    if graph.job_info(job)?.status == JobStatus::Concluded {
        graph.job_dismiss(job)?;
    } else {
        graph.job_cancel(job)?;
        while graph.job_step(job, &mut NamesOnly, &mut scratch)? != JobStatus::Concluded {}
        graph.job_dismiss(job)?;
    }
    graph.detach_backend(backend)?;
    Ok(Run {
        steps_to_ready,
        mean_step: total / steps.max(1) as u32,
        longest_step: longest,
        to_pivot,
    })
}
