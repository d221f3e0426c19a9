//! Allocating writes in flight: the engine's table of them (QEMU's
//! `cluster_allocs`) and their three steps.
//!
//! 1. **Start** ([`Engine::start_allocating`]), synchronous, once the
//!    request is validated as a whole (`Graph::check_write`, R14) and
//!    qualifies (`Graph::allocates_in_flight`: qcow2, one allocation batch,
//!    no old storage to release): every cluster placed in the entry's [`Batch`] (new clusters
//!    counted in the cache, R1), the copy-on-write of the head and tail of
//!    a partly covered new cluster started as device operations through a
//!    lent copy buffer (module `cow`; without a free one, written through
//!    the synchronous path at once), and the guest's own buffers handed to
//!    the device as [`Op::Write`]s, into the new clusters and in place.
//!    Nothing is mapped yet (R2).
//! 2. **In flight**: a later request whose guest range overlaps the
//!    clusters of an allocation in flight on a layer of its chain waits
//!    ([`Engine::waits_for_allocation`]), queued, and so does any later
//!    request of its backend that overlaps it. Others — reads, in-place
//!    writes, other allocating writes — go ahead.
//!    Requests through the synchronous path (zero writes, discards, writes
//!    that do not qualify) that touch its clusters wait for it too.
//! 3. **Finish** ([`Engine::finish_allocations`]), in the same poll that
//!    collected the last data operation, before any later request starts:
//!    the batch is linked (mapped in the metadata cache, which writes the
//!    mapping back only after a flush made the data durable, R2, R3), or
//!    abandoned when an operation failed (R14), and the entry is free again.
//!
//! The mapping reaches the cache only after the data operations have
//! completed, so any write-back meanwhile (an eviction while another
//! request is planned, a flush) flushes the device before mappings that
//! point at data it has, whatever else is still in flight: the argument of
//! R3 holds unchanged.
//!
//! Memory: [`ALLOCATIONS`] entries of a [`Batch`] (64 clusters of 48
//! bytes), two copy-on-write states and 40 bytes of bookkeeping each,
//! about 3.2 KiB per allocating write in flight, 13 KiB per engine. A qualifying write that finds every
//! entry taken waits for one.

use super::cow::Cow;
use super::job::JOB_SLOT;
use super::{issue_write, tag, Engine, Payload, State};
use crate::device::Queue;
use crate::graph::{Graph, NodeId};

/// Most allocating writes an [`Engine`] keeps in flight at once.
pub const ALLOCATIONS: usize = 4;

/// One allocating write in flight.
pub(super) struct Allocation {
    /// The request's slot ([`JOB_SLOT`] for a job's run: it links its
    /// segments itself).
    slot: usize,
    /// The qcow2 node it allocates in.
    pub(super) node: NodeId,
    /// The guest bytes of the clusters it touches (whole clusters).
    pub(super) start: u64,
    pub(super) end: u64,
    /// The copy-on-write of its head and tail in flight (module `cow`).
    pub(super) cows: [Option<Cow>; 2],
}

impl Allocation {
    /// The allocation of slot `slot` in `node` over the whole clusters
    /// `start..end`; its new clusters go in the engine's batch of the same
    /// entry (`Engine::batches`, cleared, linked or abandoned at the end).
    pub(super) fn new(slot: usize, node: NodeId, (start, end): (u64, u64)) -> Self {
        Self {
            slot,
            node,
            start,
            end,
            cows: [None; 2],
        }
    }

    /// The request's slot.
    pub(super) fn slot(&self) -> usize {
        self.slot
    }
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Allocating writes whose data operations are in flight (at most
    /// [`ALLOCATIONS`]): a statistic for tests and monitoring.
    pub fn allocations_in_flight(&self) -> usize {
        self.allocations.iter().flatten().count()
    }

    /// Whether queued request `index` must wait: its guest range overlaps
    /// the clusters of an allocation in flight on a layer of its chain (the
    /// dependent-request rule; a read would see the old view, a write
    /// would allocate the same cluster again).
    pub(super) fn waits_for_allocation<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &self,
        graph: &Graph<D, N, B, C, J>,
        index: usize,
    ) -> bool {
        let Some(slot) = self.slots[index].as_ref() else {
            return false;
        };
        let Ok(root) = graph.root(slot.backend) else {
            return false;
        };
        let (start, end) = (slot.offset, slot.offset.saturating_add(slot.len));
        self.allocations
            .iter()
            .flatten()
            .any(|a| start < a.end && a.start < end && graph.chain_contains(root, a.node))
    }

    /// Starts queued write `index`, planned to allocate in qcow2 node
    /// `root` ([`super::Route::Allocate`]); `false` when it must wait for a
    /// free entry.
    pub(super) fn start_allocating<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        index: usize,
        root: NodeId,
    ) -> bool {
        // A write-back in progress holds the metadata still.
        if self.writeback.is_some() {
            return false;
        }
        let Some(entry) = self.allocations.iter().position(Option::is_none) else {
            return false;
        };
        let Some(slot) = self.slots[index].as_mut() else {
            return true;
        };
        let (offset, len) = (slot.offset, slot.len);
        let clusters = graph.cluster_span(root, offset, len);
        graph.note_guest_write(root, offset, len);
        slot.written = Some(root);
        let segments = match &mut slot.payload {
            Payload::Write(segments) => core::mem::take(segments),
            _ => heapless::Vec::new(),
        };
        self.allocations[entry] = Some(Allocation::new(index, root, clusters));
        let batch = &mut self.batches[entry];
        batch.clear();
        let placed = graph.place_in_flight(root, offset, len, batch);
        // The copy-on-write: as device operations through a lent buffer
        // (each holding the request open: module `cow`), else at once.
        let copies = placed.and_then(|ranges| {
            let mut cows = [None; 2];
            for (half, range) in ranges.into_iter().enumerate() {
                let Some(range) = range else { continue };
                match self.take_copy(range) {
                    Some(cow) => cows[half] = Some(cow),
                    None => graph.copy_view(root, range)?,
                }
            }
            Ok(cows)
        });
        let mut queued = 0;
        let (Some(slot), Some(allocation)) =
            (self.slots[index].as_mut(), self.allocations[entry].as_mut())
        else {
            return true;
        };
        let result = copies.and_then(|cows| {
            // One guard per copy until its write is sent.
            slot.ops += cows.iter().flatten().count() as u32;
            allocation.cows = cows;
            let fresh = (offset, Some(&self.batches[entry]));
            issue_write(graph, (root, tag(index, 0)), fresh, &segments, &mut queued)
        });
        if let Err(err) = result {
            slot.fail(err);
        }
        slot.ops += queued as u32;
        self.ops += queued;
        if slot.ops > 0 {
            // Until they complete, no chain change may touch the chain.
            graph.hold_chain(root, true);
            slot.held = Some(root);
            slot.state = State::Running;
            // Copies that complete at once may finish the request here.
            self.advance_copies_on_write(graph);
        } else {
            slot.state = State::Done;
        }
        // A request that finished is linked before anything later starts.
        self.finish_allocations(graph);
        true
    }

    /// Links (or, after a failure, abandons) the batch of every allocating
    /// write whose data operations have all completed, and frees its entry.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    pub(super) fn finish_allocations<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        // A write-back in progress holds the metadata still: links (and
        // abandons) wait for its end, and so do their requests.
        let frozen = self.writeback.is_some();
        for (entry, batch) in self.allocations.iter_mut().zip(&mut self.batches) {
            let Some(allocation) = entry.as_mut().filter(|a| a.slot != JOB_SLOT) else {
                continue;
            };
            let slot = self.slots.get_mut(allocation.slot).and_then(Option::as_mut);
            let node = allocation.node;
            let linked = match slot {
                Some(slot) if slot.ops > 0 => continue,
                Some(slot) if frozen => {
                    slot.state = State::Running;
                    continue;
                }
                // R2: every data operation of the batch completed.
                Some(slot) => {
                    slot.state = State::Done;
                    let linked = match slot.error {
                        Some(_) => Ok(false),
                        None => graph.link_batch(node, batch).map(|()| true),
                    };
                    linked.unwrap_or_else(|err| {
                        slot.fail(err);
                        false
                    })
                }
                None => false,
            };
            if !linked {
                // R14: nothing maps the clusters not yet linked.
                graph.abandon_batch(node, batch);
            }
            *entry = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qcow2::Batch;

    /// The memory the module's documentation states.
    #[test]
    fn an_allocation_in_flight_is_about_3_2_kib() {
        let size = core::mem::size_of::<Option<Allocation>>() + core::mem::size_of::<Batch>();
        assert!((3_100..=3_300).contains(&size), "{size} bytes");
    }
}
