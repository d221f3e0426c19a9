//! What the request engine's allocating writes ([`crate::engine`]) ask of
//! the graph: whether a write can allocate with its data in flight, its
//! clusters placed (R1) and the copied head and tail of its new clusters
//! written, where its bytes go on the devices, and the link (R2, R3) or
//! abandon (R14) once its data operations are done.
//!
//! The engine's part of each step is in `src/engine/alloc.rs`; the
//! synchronous path does the same in `Graph::write_clusters`.

use super::source::{Source, View};
use super::write::BOUNCE;
use super::{Graph, NodeId};

/// A copy-on-write an allocating write needs: `len` bytes of the node's
/// guest view at `guest`, to device offset `host` (in a new cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CowRange {
    pub(crate) guest: u64,
    pub(crate) host: u64,
    pub(crate) len: u64,
}
use crate::device::Device;
use crate::error::Result;
use crate::format::qcow2::{Batch, Placement};
use core::ops::Range;

/// The bytes of guest `cluster` (of `cs` bytes) that a write of `len`
/// bytes at `offset` covers, as offsets inside it.
fn in_cluster(cluster: u64, cs: u64, (offset, len): (u64, u64)) -> Range<u64> {
    let base = cluster * cs;
    offset.max(base) - base..(offset + len).min(base + cs) - base
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Whether a write of `len` bytes at `offset` of format node `id`,
    /// already validated ([`Graph::check_write`]), can allocate with its
    /// data in flight: `id` is qcow2, the write fits one allocation batch
    /// ([`BATCH`](crate::format::qcow2::BATCH) clusters, as the
    /// synchronous path cuts batches), and every cluster it touches is
    /// either owned (written in place) or replaces an entry that holds no
    /// storage (unallocated, or zero without preallocated storage), so that
    /// linking the batch releases nothing (no R5 sync).
    ///
    /// # Errors
    /// Metadata errors.
    pub(crate) fn allocates_in_flight(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        let Ok(qcow2) = self.qcow2(id) else {
            return Ok(false);
        };
        let (cs, layout) = (qcow2.cluster_size(), qcow2.layout());
        if len == 0 || self.batch_at(id, offset, len)? < len {
            return Ok(false);
        }
        for cluster in offset / cs..=(offset + len - 1) / cs {
            let range = in_cluster(cluster, cs, (offset, len));
            let old = self.with_qcow2(id, |q, t| q.check_cluster_write(t, cluster, range))?;
            if old.is_some_and(|old| old.storage(layout).is_some()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `node` is one of the layers of `root`'s chain (`root`
    /// included).
    pub(crate) fn chain_contains(&self, root: NodeId, node: NodeId) -> bool {
        let mut layer = Some(root);
        while let Some(at) = layer {
            if at == node {
                return true;
            }
            layer = self.nodes.get(at).ok().and_then(|n| n.backing);
        }
        false
    }

    /// Places every cluster of a write of `len` bytes at `offset` of qcow2
    /// node `id` ([`Graph::allocates_in_flight`]): an owned one stays in
    /// place, any other gets a new cluster, counted in the cache (R1) and
    /// recorded in `batch` (with extended L2 entries, an owned cluster
    /// whose subclusters written hold no data is recorded too). Returns the
    /// copy-on-write the write needs: the untouched head and tail of the
    /// part of a recorded cluster it fills ([`Placement::Fresh`]), as
    /// `(guest offset, device offset, length)`, to be copied from `id`'s
    /// current guest view ([`Graph::copy_view`], or as device operations);
    /// the write's own bytes go separately ([`Graph::write_extent`]), so
    /// each byte is written once. Nothing is mapped (R2): on error the
    /// caller abandons `batch`.
    ///
    /// # Errors
    /// [`ErrorKind::NoSpace`](crate::ErrorKind::NoSpace) on a full device,
    /// metadata and device errors.
    pub(crate) fn place_in_flight(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
        batch: &mut Batch,
    ) -> Result<[Option<CowRange>; 2]> {
        let cs = self.qcow2(id)?.cluster_size();
        let end = offset + len;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let (mut head, mut tail) = (None, None);
        for cluster in first..=last {
            let range = in_cluster(cluster, cs, (offset, len));
            let placed =
                self.with_qcow2(id, |q, t| q.place_cluster(t, batch, cluster, range.clone()))?;
            let Placement::Fresh { host, fill } = placed else {
                continue;
            };
            // Only the first and the last cluster can be partly covered.
            let base = cluster * cs;
            if fill.start < range.start {
                head = Some(CowRange {
                    guest: base + fill.start,
                    host: host + fill.start,
                    len: range.start - fill.start,
                });
            }
            if range.end < fill.end {
                tail = Some(CowRange {
                    guest: base + range.end,
                    host: host + range.end,
                    len: fill.end - range.end,
                });
            }
        }
        Ok([head, tail])
    }

    /// Copies `len` bytes of `id`'s current guest view at `guest` to device
    /// offset `host` of its file, in pieces of a 4 KiB stack buffer (the
    /// engine's fallback when no copy buffer is free).
    pub(crate) fn copy_view(&mut self, id: NodeId, range: CowRange) -> Result<()> {
        let CowRange { guest, host, len } = range;
        if len == 0 {
            return Ok(());
        }
        let file = self.data_file(id)?;
        let mut buf = [0u8; BOUNCE];
        let view = View {
            node: id,
            guest,
            len,
        };
        self.put(file, host, Source::View(view), &mut buf)
    }

    /// Where the start of `len` bytes of a write at `pos` of format node
    /// `id` goes: a new cluster of `fresh` (and those of it that follow on
    /// on the device), else in place ([`Graph::in_place_extent`]). `None`
    /// when neither holds it.
    ///
    /// # Errors
    /// As [`Graph::in_place_extent`].
    pub(crate) fn write_extent(
        &mut self,
        id: NodeId,
        fresh: Option<&Batch>,
        pos: u64,
        len: u64,
    ) -> Result<Option<(NodeId, u64, u64)>> {
        let cs = self.cluster_size(id)?;
        let Some((batch, new)) = fresh.and_then(|b| Some((b, b.fresh_host(pos / cs)?))) else {
            return self.in_place_extent(id, pos, len);
        };
        let host = new + pos % cs;
        let mut run = (cs - pos % cs).min(len);
        while run < len && batch.fresh_host((pos + run) / cs) == Some(host + run) {
            run = (run + cs).min(len);
        }
        Ok(Some((self.data_file(id)?, host, run)))
    }

    /// Maps the new clusters of `batch`, filled by now, in qcow2 node `id`'s
    /// metadata cache ([`Qcow2::link`](crate::format::qcow2::Qcow2::link):
    /// R2, R3).
    ///
    /// # Errors
    /// Metadata errors; what is not mapped stays for
    /// [`Graph::abandon_batch`].
    pub(crate) fn link_batch(&mut self, id: NodeId, batch: &mut Batch) -> Result<()> {
        self.with_qcow2(id, |q, t| q.link(t, batch))
    }

    /// Gives back the new clusters of `batch` that nothing maps (R14).
    pub(crate) fn abandon_batch(&mut self, id: NodeId, batch: &Batch) {
        let _ = self.with_qcow2(id, |q, t| {
            q.abandon(t, batch);
            Ok(())
        });
    }
}
