//! Two device kinds in one graph: [`Either`] is a [`Device`] (and a
//! [`Queue`]) that is one of two, so a graph of host files can also hold
//! RAM disks, or a kernel's virtio disks a scratch image in memory,
//! without each VMM writing its own enum. Nest it for more kinds:
//! `Either<A, Either<B, C>>`.

use super::{Completion, Device, DeviceId, Op, Queue, Submitted, Tag};
use crate::error::Result;
use crate::graph::Access;

/// A device of kind `A` or of kind `B`.
#[derive(Debug)]
pub enum Either<A, B> {
    /// The first kind.
    Left(A),
    /// The second kind.
    Right(B),
}

/// Runs `$call` on whichever device `$either` holds.
macro_rules! each {
    ($either:expr, $device:ident => $call:expr) => {
        match $either {
            Either::Left($device) => $call,
            Either::Right($device) => $call,
        }
    };
}

impl<A: Device, B: Device> Device for Either<A, B> {
    fn size(&self) -> u64 {
        each!(self, d => d.size())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        each!(self, d => d.read_at(offset, buf))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        each!(self, d => d.write_at(offset, buf))
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        each!(self, d => d.write_vectored_at(offset, bufs))
    }

    fn flush(&mut self) -> Result<()> {
        each!(self, d => d.flush())
    }

    fn is_read_only(&self) -> bool {
        each!(self, d => d.is_read_only())
    }

    /// The inner device's identity. Kinds that number their storage the
    /// same way (two RAM disks of one VMM) must keep their numbers apart.
    fn identity(&self) -> DeviceId {
        each!(self, d => d.identity())
    }

    fn set_access(&mut self, access: Access) -> Result<()> {
        each!(self, d => d.set_access(access))
    }

    fn can_copy(&self) -> bool {
        each!(self, d => d.can_copy())
    }

    /// Offloads between two devices of the same kind; across kinds the
    /// caller copies through a buffer.
    fn copy_from(
        &mut self,
        offset: u64,
        source: &Self,
        source_offset: u64,
        len: u64,
    ) -> Result<bool> {
        match (self, source) {
            (Either::Left(to), Either::Left(from)) => {
                to.copy_from(offset, from, source_offset, len)
            }
            (Either::Right(to), Either::Right(from)) => {
                to.copy_from(offset, from, source_offset, len)
            }
            _ => Ok(false),
        }
    }
}

impl<'b, A: Queue<'b>, B: Queue<'b>> Queue<'b> for Either<A, B> {
    fn submit(&mut self, tag: Tag, op: Op<'b>) -> Submitted<'b> {
        each!(self, d => d.submit(tag, op))
    }

    fn poll(&mut self, done: Completion<'_, 'b>) {
        each!(self, d => d.poll(done))
    }

    fn busy(&self) -> bool {
        each!(self, d => d.busy())
    }

    fn wait(&mut self) {
        each!(self, d => d.wait())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{MemDevice, Reorder};
    use crate::format::qcow2::create::{create, CreateOptions};
    use crate::graph::{Access, Graph, NamesOnly};
    use crate::Format;

    type Mixed<'a> = Either<MemDevice<'a>, Reorder<'a, MemDevice<'a>>>;

    #[test]
    fn a_chain_across_two_device_kinds() {
        // Buffers lent to the engine live as long as the disks' queues.
        let mut pages = [[0u8; 4096]; 3];
        let (mut base_bytes, mut top_bytes) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut base = MemDevice::new(&mut base_bytes, 0, 1).unwrap();
        create(&mut base, &CreateOptions::new(4 << 20)).unwrap();
        // Small capacities: the test thread's stack holds it while boxing.
        let mut graph: Box<Graph<Mixed<'_>, 8, 2, 16, 1>> = Box::default();
        let file = graph.add_device(Either::Left(base), "base.qcow2").unwrap();
        let base = graph.open_format(file, Format::Qcow2, false).unwrap();
        graph.unref(file).unwrap();
        let guest = graph
            .attach_backend(base, Access::READ_WRITE_DEVICE)
            .unwrap();
        graph.backend_write(guest, 0, &[0x11; 4096]).unwrap();

        // A live snapshot onto a device of the other kind.
        let top = Reorder::new(MemDevice::new(&mut top_bytes, 0, 2).unwrap(), 7);
        let top = graph
            .snapshot(&mut NamesOnly, base, Either::Right(top), "top.qcow2")
            .unwrap();
        graph.unref(base).unwrap();
        graph.unref(top).unwrap();
        graph.backend_write(guest, 8192, &[0x22; 4096]).unwrap();
        let mut page = [0u8; 4096];
        graph.backend_read(guest, 0, &mut page).unwrap();
        assert_eq!(page, [0x11; 4096], "read through the overlay from the base");
        graph.backend_read(guest, 8192, &mut page).unwrap();
        assert_eq!(page, [0x22; 4096]);
        // Split-phase too: the overlay's queue completes out of order.
        let mut engine: crate::engine::Engine<'_, 4> = crate::engine::Engine::new();
        let tickets: Vec<_> = pages
            .iter_mut()
            .enumerate()
            .map(|(i, p)| {
                engine
                    .submit_read(guest, i as u64 * 4096, [&mut p[..]])
                    .unwrap()
            })
            .collect();
        for (ticket, want) in tickets.into_iter().zip([0x11, 0, 0x22]) {
            let mut done = engine.wait(&mut graph, ticket).unwrap();
            done.result.unwrap();
            assert!(done.buffers().flatten().all(|b| *b == want));
        }
        graph.detach_backend(guest).unwrap();
        assert_eq!(graph.node_count(), 0);
    }
}
