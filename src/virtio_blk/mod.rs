//! The virtio-blk device side (virtio 1.2 §5.2), without a heap: what a
//! VMM embeds to serve a guest's virtio-blk queues from a graph.
//!
//! It knows no vring: the VMM walks its own split virtqueue and hands each
//! descriptor chain to a [`Server`], which decodes it (module `request`:
//! the wire format, every guest byte hostile), borrows the guest's data
//! buffers through [`GuestMemory`] (zero copy) and submits them to the
//! request [`Engine`](crate::engine::Engine) for the disk's BlockBackend.
//! Finished chains come back out of order as [`Used`] entries.
//!
//! ```text
//!  request  descriptors, header, segments: Chain::decode -> Request
//!  config   config space and feature bits: Config
//!  guest    GuestMemory: guest addresses -> host slices (the unsafe part);
//!           FlatMemory: guest RAM in one host buffer
//!  server   Server: records, overlap hold-back, engine submission, status
//! ```
//!
//! A VMM's loop:
//!
//! ```text
//!  while server.has_room() and the avail ring has a chain:
//!      server.submit(&mut engine, disk, head, descriptors)
//!  server.poll(&mut graph, &mut engine)
//!  while let Some(used) = server.next_used(): push (head, len) to the
//!      used ring of used.disk, notify the guest
//! ```

mod config;
mod guest;
mod request;
mod server;
#[cfg(test)]
mod tests;

pub use config::{
    Config, CONFIG_LEN, DEFAULT_MAX_ZERO_SECTORS, DEFAULT_SIZE_MAX, F_BLK_SIZE, F_DISCARD, F_FLUSH,
    F_RO, F_SEG_MAX, F_SIZE_MAX, F_VERSION_1, F_WRITE_ZEROES,
};
pub use guest::{FlatMemory, GuestMemory};
pub use request::{
    Chain, Descriptor, Op, Refusal, Request, Span, Status, FLAG_UNMAP, HEADER_LEN, ID_LEN, SECTOR,
    SEGMENT_LEN, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
pub use server::{
    DiskId, Rejected, Server, Used, DEFAULT_DESCRIPTORS, DEFAULT_DISKS, DEFAULT_REQUESTS,
};
