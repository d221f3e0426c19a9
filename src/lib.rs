//! blockgraph: a block layer for unikernel and firmware VMMs, without a heap.
//!
//! It gives a VMM what QEMU's block layer gives: qcow2 images stacked in
//! backing chains, devices that reach them through BlockBackend slots, and
//! chain collapse (`drop_intermediate`) that can drop even the active layer by
//! re-pointing a slot. Every table has a capacity fixed at compile time;
//! running out is an error, never a panic.
//!
//! Layers, top to bottom (data flows down on a guest request):
//!
//! ```text
//!  cmd        one command interpreter: host CLI and kernel scripts
//!  qmp        (host) QEMU's QMP control protocol for a serving process:
//!             live snapshot, block jobs and their events
//!  virtio_blk the device side of a guest's virtio-blk queues: chains
//!             decoded, guest buffers lent to the engine
//!  engine     many requests in flight: slots, scatter-gather, split-phase
//!  backend    BlockBackend slots: the root a device uses
//!  graph      node pool, refcounts, file/backing edges, permissions,
//!             chain walk, drop_intermediate
//!  format     each node's driver (all format dispatch), qcow2 (header,
//!             L1/L2 slices, typed L2 entries, allocation, compressed
//!             clusters), raw; the shared metadata cache
//!  device     Device trait: host file, memory (tests), virtio-blk (kernel)
//! ```
//!
//! # Example
//!
//! A qcow2 image made in memory, opened behind a BlockBackend, written and
//! read back (a VMM would use its virtio disks or host files instead):
//!
//! ```
//! use blockgraph::device::MemDevice;
//! use blockgraph::format::qcow2::create::{create, CreateOptions};
//! use blockgraph::{Access, Format, Graph};
//!
//! # fn main() -> blockgraph::Result<()> {
//! let mut disk = vec![0u8; 4 << 20];
//! let mut device = MemDevice::new(&mut disk, 0, 1)?;
//! create(&mut device, &CreateOptions::new(64 << 20))?;
//! // A graph is large: keep it off the stack (or in a `static`).
//! let mut graph: Box<Graph<MemDevice<'_>>> = Box::default();
//! // The backend holds the image (and its file): detaching it closes them.
//! let guest = graph.attach_device(device, "disk.qcow2", Format::Qcow2, Access::READ_WRITE_DEVICE)?;
//!
//! graph.backend_write(guest, 4096, &[0xab; 512])?;
//! let mut sector = [0u8; 512];
//! graph.backend_read(guest, 4096, &mut sector)?;
//! assert_eq!(sector, [0xab; 512]);
//! assert_eq!(graph.backend_size(guest)?, 64 << 20);
//! graph.backend_flush(guest)?;
//! graph.detach_backend(guest)?;
//! assert_eq!(graph.node_count(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! Crash safety rests on numbered ordering rules (R1, R2, ...) kept in
//! `docs/crash-ordering.md`; the code cites them by number at each ordering
//! point.
//!
//! Built with the default `std` feature it also provides the host pieces: a
//! [`FileDevice`](device::FileDevice), the [`PathResolver`](host::PathResolver),
//! QEMU's QMP control protocol for a serving process ([`qmp`]), the
//! `blockgraph` command-line tool and, on Linux, `serve`: a chain
//! exported over vhost-user-blk (through `virtio_blk`) and NBD, every
//! request through one engine (the only part that uses rust-vmm crates
//! and allocates).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod backend;
// Unstable: the interpreter the CLI and the kernel's scripts share, not
// part of the library's API (hidden from its docs).
#[doc(hidden)]
pub mod cmd;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod graph;
#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
pub mod host;
pub mod jobs;
#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
pub mod qmp;
#[cfg(all(feature = "std", target_os = "linux"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "std", target_os = "linux"))))]
pub mod serve;
pub mod virtio_blk;

/// The names most VMMs need: `use blockgraph::prelude::*;`.
pub mod prelude {
    pub use crate::device::{Device, Queue};
    pub use crate::engine::Engine;
    pub use crate::graph::{NamesOnly, OpenOptions, Resolver};
    pub use crate::jobs::{CommitRequest, CopyMode, JobId, JobStatus, OnError, StreamRequest};
    pub use crate::{Access, BackendId, Error, ErrorKind, Format, Graph, NodeId, Result};
}

pub use backend::{Backend, BackendId};
pub use device::Device;
pub use error::{Error, ErrorKind, Result};
pub use format::Format;
pub use graph::{Access, Graph, NodeId, OpenOptions, Perm, Resolver};

/// A graph shared between cores: the kernel keeps one in a `static`.
pub type SharedGraph<
    D,
    const NODES: usize = 64,
    const BACKENDS: usize = 8,
    const CACHE: usize = 128,
    const JOBS: usize = 4,
> = spin::Mutex<Graph<D, NODES, BACKENDS, CACHE, JOBS>>;
