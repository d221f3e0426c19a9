//! What the request engine ([`crate::engine`]) asks of the graph: where a
//! request's bytes are on the devices, without doing its I/O.

use super::{Graph, NodeId};
use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use crate::format::cache::{Level, Miss, Outgoing};
use crate::format::Mapping;

/// Where the start of a read lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadExtent {
    /// Reads as zeros.
    Zeros,
    /// Stored on protocol node `file` at `host`, every byte of the run on
    /// the device.
    Data {
        /// The protocol node.
        file: NodeId,
        /// Device offset.
        host: u64,
    },
    /// Needs the synchronous path (compressed data).
    Slow,
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Whether requests of a request engine ([`crate::engine`]) are in
    /// flight through node `id` (they go through the chain below the node
    /// they were submitted to). Chain changes that touch such a node —
    /// [`Graph::detach_backend`], [`Graph::replace_root`],
    /// [`Graph::drop_intermediate`], [`Graph::snapshot`],
    /// [`Graph::set_backing`], a job step — are refused
    /// ([`ErrorKind::Busy`]) until the engine is drained, so a request in
    /// flight is never dropped or sent to another node.
    pub fn has_requests_in_flight(&self, id: NodeId) -> bool {
        self.nodes.get(id).is_ok() && self.held[id.index()] > 0
    }

    /// Refuses a chain change at `id` while requests are in flight there.
    ///
    /// # Errors
    /// [`ErrorKind::Busy`] then.
    pub(crate) fn check_not_held(&self, id: NodeId) -> Result<()> {
        if self.has_requests_in_flight(id) {
            return fail(
                ErrorKind::Busy,
                "requests are in flight on this chain: drain the request engine first",
            );
        }
        Ok(())
    }

    /// Counts one more (`hold`) or one fewer request in flight through every
    /// node of `root`'s chain.
    pub(crate) fn hold_chain(&mut self, root: NodeId, hold: bool) {
        let mut layer = Some(root);
        while let Some(node) = layer {
            let count = &mut self.held[node.index()];
            *count = if hold {
                *count + 1
            } else {
                count.saturating_sub(1)
            };
            layer = self.nodes.get(node).ok().and_then(|n| n.backing);
        }
    }

    /// The protocol nodes a flush of `id`'s chain goes to as device
    /// flushes — the file of every writable layer, and of `id` — when no
    /// layer holds table updates not yet written back; `None` when one does
    /// (the synchronous [`Graph::flush`] writes them back first, R3). What
    /// [`Graph::flush`] does, as device operations the request engine can
    /// keep in flight.
    pub(crate) fn flush_files(&self, id: NodeId) -> Option<heapless::Vec<NodeId, NODES>> {
        let mut files = heapless::Vec::new();
        for node in self.chain_from(id) {
            if self.cache.is_dirty(node.key()) {
                return None;
            }
            if self.flushed_in(node, id) {
                // One entry per node of the pool: never full (a data
                // file is a node too).
                files.push(self.layer_file(node).ok()?).ok()?;
                if let Some(data) = self.nodes.get(node).ok()?.data_file {
                    files.push(data).ok()?;
                }
            }
        }
        Some(files)
    }

    /// Copies the next slice of layer `id` dirty at `level` into `buf` for
    /// the request engine's split-phase write-back
    /// ([`MetaCache::take_dirty`](crate::format::cache::MetaCache::take_dirty));
    /// with the protocol node it goes to.
    pub(crate) fn take_dirty(
        &mut self,
        id: NodeId,
        level: Level,
        buf: &mut [u8],
    ) -> Result<Option<(NodeId, Outgoing)>> {
        let file = self.layer_file(id)?;
        Ok(self
            .cache
            .take_dirty(id.key(), level, buf)
            .map(|out| (file, out)))
    }

    /// Ends the write of a slice taken by [`Graph::take_dirty`].
    pub(crate) fn written(&mut self, outgoing: Outgoing, succeeded: bool) {
        self.cache.written(outgoing, succeeded);
    }

    /// Whether layer `id` holds table updates at `level` not yet written
    /// back.
    pub(crate) fn dirty_at(&self, id: NodeId, level: Level) -> bool {
        self.cache.is_dirty_at(id.key(), level)
    }

    /// Whether layer `id` is flushed by a flush of a chain whose top is
    /// `root`: it is writable, or it is `root`.
    pub(crate) fn flushed_in(&self, id: NodeId, root: NodeId) -> bool {
        id == root || self.nodes.get(id).is_ok_and(|n| !n.read_only)
    }

    /// What BlockBackend `id` may do with its root.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a detached backend.
    pub(crate) fn backend_access(&self, id: crate::BackendId) -> Result<crate::graph::Access> {
        Ok(self.backends.get(id)?.access)
    }

    /// The first extent of a read of `len` bytes at `pos` of `id`'s chain,
    /// and how many bytes it covers. Stored data that reaches past its
    /// device's end is cut there: the rest reads as zeros (the next extent).
    ///
    /// # Errors
    /// Metadata and device errors of the lookup.
    pub(crate) fn read_extent(
        &mut self,
        id: NodeId,
        pos: u64,
        len: u64,
    ) -> Result<(ReadExtent, u64)> {
        let (located, run) = self.locate(id, pos, len)?;
        Ok(match located.mapping {
            Mapping::Zero | Mapping::Unallocated => (ReadExtent::Zeros, run),
            Mapping::Data(host) => {
                let file = self.data_file(located.layer)?;
                match self.device_mut(file)?.size().saturating_sub(host).min(run) {
                    0 => (ReadExtent::Zeros, run),
                    present => (ReadExtent::Data { file, host }, present),
                }
            }
            Mapping::Compressed(_) => (ReadExtent::Slow, run),
        })
    }

    /// Where the start of a write of `len` bytes at `pos` of format node
    /// `id` goes when it can be written in place, without allocating: the
    /// protocol node, the device offset and the bytes of the run (clusters
    /// that follow on from there on the device). `None` when it needs the
    /// synchronous path (an allocation, or the first sector of a probed raw
    /// image).
    ///
    /// # Errors
    /// Metadata errors, and the overlap check of a cluster written in place.
    pub(crate) fn in_place_extent(
        &mut self,
        id: NodeId,
        pos: u64,
        len: u64,
    ) -> Result<Option<(NodeId, u64, u64)>> {
        let file = self.data_file(id)?;
        let (driver, tables) = self.driver_and_tables(id)?;
        let extent = driver.in_place(tables, pos, len)?;
        Ok(extent.map(|(host, run)| (file, host, run)))
    }

    /// Runs `plan` with metadata loading off: a lookup that misses the
    /// cache reads nothing and fails; the slice it needed comes back with
    /// the result (then the result is that failure, or something built on
    /// it: discard it, load the slice, run `plan` again).
    pub(crate) fn without_loading<T>(
        &mut self,
        plan: impl FnOnce(&mut Self) -> T,
    ) -> (T, Option<Miss>) {
        self.cache.set_loading(false);
        let planned = plan(self);
        self.cache.set_loading(true);
        (planned, self.cache.take_miss())
    }

    /// Puts a slice read for `miss` in the metadata cache
    /// ([`crate::format::cache::MetaCache::insert`]): `false` when it was
    /// not needed or may be stale.
    ///
    /// # Errors
    /// As `MetaCache::insert` (the write-back of an evicted slice).
    pub(crate) fn insert_loaded(&mut self, miss: &Miss, bytes: &[u8]) -> Result<bool> {
        self.cache.insert(miss, &mut self.devices, bytes)
    }
}
