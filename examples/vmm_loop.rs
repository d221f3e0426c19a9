//! The loop a VMM runs, end to end, on in-memory disks:
//!
//! 1. format a base image and give the guest a BlockBackend on it;
//! 2. take a live external snapshot (the backend moves to the new overlay);
//! 3. run an active commit of the overlay into the base while the guest keeps
//!    writing between job steps;
//! 4. complete the job: the backend pivots to the base in one step.
//!
//! Run with `cargo run --example vmm_loop`.

use blockgraph::device::MemDevice;
use blockgraph::format::qcow2::create::{create, CreateOptions};
use blockgraph::graph::NamesOnly;
use blockgraph::jobs::{CommitRequest, JobStatus, OnError};
use blockgraph::{Access, Format, Graph, Result};

const DISK: u64 = 8 << 20;

fn main() -> Result<()> {
    // Two "disks" of 16 MiB each; a VMM would have virtio disks or files.
    let mut base_disk = vec![0u8; 16 << 20];
    let mut overlay_disk = vec![0u8; 16 << 20];
    let mut scratch = vec![0u8; 256 << 10];
    let mut graph: Box<Graph<MemDevice<'_>>> = Box::default();
    // No image store: the example adds its devices itself.
    let mut names = NamesOnly;

    // 1. A fresh base image and the guest's BlockBackend on it.
    let mut device = MemDevice::new(&mut base_disk, 0, 1)?;
    create(&mut device, &CreateOptions::new(DISK))?;
    // The backend holds every reference: detaching it closes the chain.
    let guest = graph.attach_device(
        device,
        "base.qcow2",
        Format::Qcow2,
        Access::READ_WRITE_DEVICE,
    )?;
    let base = graph.root(guest)?;
    graph.backend_write(guest, 0, &[0x11; 64 << 10])?;

    // 2. Live snapshot: the guest now writes into the overlay.
    let overlay_device = MemDevice::new(&mut overlay_disk, 0, 2)?;
    let overlay = graph.snapshot_backend(&mut names, guest, overlay_device, "overlay.qcow2")?;
    assert_eq!(graph.root(guest)?, overlay);
    graph.backend_write(guest, 1 << 20, &[0x22; 64 << 10])?;

    // 3. Active commit while the guest keeps running.
    let job = graph.start_commit(CommitRequest {
        active: overlay,
        top: overlay,
        base,
        on_error: OnError::Report,
    })?;
    let mut tick = 0u64;
    loop {
        // A guest request between job steps...
        let offset = (tick * 12_345) % (DISK - 4096);
        graph.backend_write(guest, offset, &[tick as u8; 4096])?;
        let mut check = [0u8; 4096];
        graph.backend_read(guest, offset, &mut check)?;
        assert_eq!(check, [tick as u8; 4096]);
        tick += 1;
        // ...then one bounded step of the job (a job that fails returns
        // its error from the step that concludes it).
        match graph.job_step(job, &mut names, &mut scratch)? {
            // 4. pivot: asked once, done at a coming step.
            JobStatus::Ready if !graph.job_info(job)?.completing && tick.is_multiple_of(50) => {
                graph.job_complete(job)?
            }
            JobStatus::Concluded => break,
            _ => {}
        }
    }
    graph.job_dismiss(job)?;
    // The same BlockBackend now serves the base image, with every write.
    assert_eq!(graph.root(guest)?, base);
    let mut first = [0u8; 8];
    graph.backend_read(guest, 1 << 20, &mut first)?;
    println!(
        "active commit done after {tick} guest writes; the guest now runs on '{}' (bytes at 1 MiB: {first:02x?})",
        graph.name(graph.root(guest)?)?
    );
    graph.detach_backend(guest)?;
    assert_eq!(graph.node_count(), 0);
    Ok(())
}
