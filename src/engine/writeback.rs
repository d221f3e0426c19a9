//! Flushes with table updates to write back, as device operations: the
//! updates go out in R3's order while requests that need no metadata change
//! (reads, in-place writes, flushes queue behind) go on.
//!
//! A flush whose chain holds table updates not yet written back takes this
//! path when the VMM lent metadata buffers ([`Engine::lend_metadata_buffer`])
//! and no other write-back runs; otherwise it runs the synchronous
//! [`Graph::flush`] in the poll. Layer by layer, from the chain's top:
//!
//! 1. each slice dirty at the refcount level is copied into a free lent
//!    buffer and written from it ([`Op::WritePart`]), as many at once as
//!    there are buffers;
//! 2. once they completed, and when mapping slices are dirty, a device
//!    flush: refcounts and every data write completed before it are
//!    durable before any mapping that needs them (R3);
//! 3. the mapping slices, the same way;
//! 4. a device flush of the layer's file (every writable layer, and the
//!    top), as [`Graph::flush`] ends.
//!
//! A slice is clean once its write completed, unless it failed (R14: it
//! stays dirty and the flush fails). While the write-back runs, the
//! metadata may not change: allocating writes (guest and job runs) wait to
//! start, those whose data completed wait to be linked (their requests
//! finish after), and synchronous requests and drained sections wait for
//! the end. A slice evicted meanwhile (a load needing its slot) is written back
//! synchronously first, with the same bytes.
//!
//! Memory: a few words in the engine; the buffers are the lent metadata
//! buffers.

use super::miss::{Load, METADATA_BUFFERS};
use super::{tag, Engine, State};
use crate::device::{Op, Queue, Submitted};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::cache::{Level, Outgoing};
use crate::graph::{Graph, NodeId};

/// The slot index in the tags of write-back operations (the piece is the
/// buffer's entry, or [`FLUSH_PIECE`]).
pub(super) const WRITEBACK_SLOT: usize = 0xfffd;
/// The piece of a write-back's device flush.
const FLUSH_PIECE: usize = 0xffff;

/// Where a layer's write-back is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Writing the slices dirty at this level.
    Writes(Level),
    /// A device flush, then the mapping slices.
    FlushThenMappings,
    /// The layer's final device flush, then the next layer.
    FlushThenNext,
}

/// A flush request's write-back in progress.
pub(super) struct WriteBack {
    /// The flush request's slot.
    slot: usize,
    /// The chain's top, and the layer being written back.
    root: NodeId,
    layer: NodeId,
    stage: Stage,
    /// Slices of the layer were written: its file is flushed at the end.
    wrote: bool,
    /// The slice copy each lent buffer carries, in flight, and its result
    /// once collected.
    outgoing: [Option<(Outgoing, Option<Result<()>>)>; METADATA_BUFFERS],
    /// The device flush: in flight (`Some(None)`), or its result.
    flush: Option<Option<Result<()>>>,
    error: Option<Error>,
}

/// Records the completion of write-back operation `piece` (in a device's
/// poll); a slice write's buffer goes back to its entry.
pub(super) fn collected<'b>(
    (writeback, loads): (&mut Option<WriteBack>, &mut [Load<'b>; METADATA_BUFFERS]),
    piece: usize,
    result: Result<()>,
    buf: Option<&'b mut [u8]>,
) {
    if let Some(load) = loads.get_mut(piece) {
        load.give_back(buf);
    }
    let Some(wb) = writeback.as_mut() else {
        return;
    };
    if piece == FLUSH_PIECE {
        wb.flush = Some(Some(result));
    } else if let Some(Some((_, done))) = wb.outgoing.get_mut(piece) {
        *done = Some(result);
    }
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Whether a flush request with table updates to write back can take
    /// the split-phase path now.
    pub(super) fn can_write_back(&self) -> bool {
        self.writeback.is_none() && self.loads.iter().any(|load| load.lend_ready())
    }

    /// Whether a write-back runs: the metadata may not change.
    pub(super) fn writing_back(&self) -> bool {
        self.writeback.is_some()
    }

    /// Starts the write-back of flush request `index` on the chain of
    /// `root`.
    pub(super) fn start_write_back<
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
    ) {
        self.writeback = Some(WriteBack {
            slot: index,
            root,
            layer: root,
            stage: Stage::Writes(Level::Refcount),
            wrote: false,
            outgoing: [None; METADATA_BUFFERS],
            flush: None,
            error: None,
        });
        if let Some(slot) = self.slots[index].as_mut() {
            slot.state = State::Running;
        }
        self.advance_write_back(graph);
    }

    /// Carries the write-back on: results taken in, the next operations
    /// issued, the next stage or layer, the end.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    pub(super) fn advance_write_back<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        let Some(mut wb) = self.writeback.take() else {
            return;
        };
        // Completed slice writes: the slice clean (or, failed, dirty).
        for out in &mut wb.outgoing {
            if let Some((outgoing, Some(result))) = out.take_if(|(_, done)| done.is_some()) {
                graph.written(outgoing, result.is_ok());
                if let Err(err) = result {
                    wb.error.get_or_insert(err);
                }
            }
        }
        let over = loop {
            if wb.error.is_some() {
                // Nothing more is issued; the end once nothing is in flight.
                break wb.outgoing.iter().all(Option::is_none) && wb.flush != Some(None);
            }
            match self.write_back_step(graph, &mut wb) {
                Ok(Some(true)) => {}
                Ok(Some(false)) => break false,
                Ok(None) => break true,
                Err(err) => {
                    wb.error.get_or_insert(err);
                }
            }
        };
        if !over {
            self.writeback = Some(wb);
            return;
        }
        if let Some(slot) = self.slots[wb.slot].as_mut() {
            if let Some(err) = wb.error {
                slot.fail(err);
            }
            slot.state = State::Done;
        }
    }

    /// One move of the write-back: `Some(true)` to go on, `Some(false)` to
    /// wait for the devices, `None` when every layer is done.
    fn write_back_step<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        wb: &mut WriteBack,
    ) -> Result<Option<bool>> {
        match wb.stage {
            Stage::Writes(level) => {
                let issued = self.issue_slice_writes(graph, wb, level)?;
                if wb.outgoing.iter().any(Option::is_some) {
                    return Ok(Some(false));
                }
                if graph.dirty_at(wb.layer, level) {
                    // Written at once: the next ones; or every buffer is
                    // loading a slice: wait for one.
                    return match issued {
                        Some(true) => Ok(Some(true)),
                        None => Ok(Some(false)),
                        Some(false) => {
                            fail(ErrorKind::Busy, "a metadata write-back made no progress")
                        }
                    };
                }
                wb.stage = match level {
                    Level::Refcount if graph.dirty_at(wb.layer, Level::Mapping) => {
                        Stage::FlushThenMappings
                    }
                    _ => Stage::FlushThenNext,
                };
                Ok(Some(true))
            }
            Stage::FlushThenMappings | Stage::FlushThenNext => {
                let wanted = wb.stage == Stage::FlushThenMappings
                    || wb.wrote
                    || graph.flushed_in(wb.layer, wb.root);
                match wb.flush.take() {
                    None if wanted => {
                        let file = graph.layer_file(wb.layer)?;
                        let op = Op::Flush;
                        match graph
                            .device_mut(file)?
                            .submit(tag(WRITEBACK_SLOT, FLUSH_PIECE), op)
                        {
                            Submitted::Queued => {
                                wb.flush = Some(None);
                                self.ops += 1;
                                return Ok(Some(false));
                            }
                            Submitted::Done(result, _) => result?,
                        }
                    }
                    Some(None) => {
                        wb.flush = Some(None);
                        return Ok(Some(false));
                    }
                    Some(Some(result)) => result?,
                    None => {}
                }
                if wb.stage == Stage::FlushThenMappings {
                    wb.stage = Stage::Writes(Level::Mapping);
                    return Ok(Some(true));
                }
                match graph.backing(wb.layer)? {
                    Some(next) => {
                        (wb.layer, wb.wrote) = (next, false);
                        wb.stage = Stage::Writes(Level::Refcount);
                        Ok(Some(true))
                    }
                    None => Ok(None),
                }
            }
        }
    }

    /// Writes slices of the layer dirty at `level` from every free lent
    /// buffer; whether it wrote (or sent) any, `None` when no buffer was
    /// free (all loading slices).
    fn issue_slice_writes<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        wb: &mut WriteBack,
        level: Level,
    ) -> Result<Option<bool>> {
        let mut issued = None;
        for entry in 0..METADATA_BUFFERS {
            if wb.outgoing[entry].is_some() {
                continue;
            }
            let Some(buf) = self.loads[entry].lend_out() else {
                continue;
            };
            issued = issued.or(Some(false));
            let taken = match graph.take_dirty(wb.layer, level, buf) {
                Ok(Some(taken)) => taken,
                other => {
                    self.loads[entry].give_back(Some(buf));
                    return other.map(|_| issued);
                }
            };
            let (file, outgoing) = taken;
            (wb.wrote, issued) = (true, Some(true));
            let op = Op::WritePart {
                offset: outgoing.offset,
                buf,
                at: 0,
                len: outgoing.len,
            };
            let device = match graph.device_mut(file) {
                Ok(device) => device,
                Err(err) => {
                    self.loads[entry].give_back(op.into_buffer());
                    graph.written(outgoing, false);
                    return Err(err);
                }
            };
            match device.submit(tag(WRITEBACK_SLOT, entry), op) {
                Submitted::Queued => {
                    wb.outgoing[entry] = Some((outgoing, None));
                    self.ops += 1;
                }
                Submitted::Done(result, buf) => {
                    self.loads[entry].give_back(buf);
                    graph.written(outgoing, result.is_ok());
                    result?;
                }
            }
        }
        Ok(issued)
    }
}
