//! The copy-on-write of allocating writes as device operations: the head
//! and tail of a new cluster that a write covers only in part are read
//! from the node's current guest view into a buffer the VMM lent
//! ([`Engine::lend_copy_buffer`]) and written into the new cluster, while
//! other requests go on. Without a free buffer large enough, the copy runs
//! synchronously at the write's start, as before.
//!
//! A copy holds its request open: the request's operation count carries
//! one guard per copy from its start until its write is sent, so the
//! request finishes — and its clusters are linked (R2) — only once every
//! copy and every data write completed. A copy of a request that failed
//! is given up; the clusters are then abandoned (R14).
//!
//! Memory: [`COPY_BUFFERS`] entries of a few words; the buffers are the
//! VMM's (at least a cluster each to be of use).

use super::alloc::ALLOCATIONS;
use super::{lost_buffer, read_view_into, submit_lent, tag, Engine, LentBuffer, State};
use crate::device::{Op, Queue};
use crate::error::{fail, ErrorKind, Result};
use crate::graph::{CowRange, Graph, NodeId};

/// Most copy buffers an [`Engine`] takes: copies in flight at once.
pub const COPY_BUFFERS: usize = 8;

/// Pieces of a request's tags from here on are its copies' operations
/// (the piece minus this is the copy buffer's entry).
pub(super) const COW_PIECE: usize = 0xff00;

/// One lent copy buffer.
pub(super) struct CopyBuffer<'b> {
    /// The buffer and its length.
    lent: LentBuffer<'b>,
    /// A copy uses it.
    busy: bool,
}

impl CopyBuffer<'_> {
    /// No buffer lent.
    pub(super) const IDLE: Self = Self {
        lent: LentBuffer::IDLE,
        busy: false,
    };
}

/// The largest lent copy buffer no copy uses (empty when there is none):
/// the scratch of a request on the synchronous path, which runs while no
/// device operation is in flight on its clusters.
pub(super) fn idle_copy_buffer<'s>(copies: &'s mut [CopyBuffer<'_>; COPY_BUFFERS]) -> &'s mut [u8] {
    copies
        .iter_mut()
        .filter(|e| !e.busy)
        .filter_map(|e| e.lent.buf.as_deref_mut())
        .max_by_key(|buf| buf.len())
        .unwrap_or(&mut [])
}

/// Which half of a copy is going on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
}

/// One copy-on-write in flight, of an allocation's request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cow {
    /// The copy buffer's entry.
    copy: usize,
    range: CowRange,
    phase: Phase,
    /// Bytes of the range read so far.
    pos: u64,
    /// A device operation of it is in flight.
    in_flight: bool,
}

/// Records the completion of copy `copy`'s operation (in a device's poll):
/// its buffer back.
pub(super) fn collected<'b, 'c>(
    copies: &mut [CopyBuffer<'b>; COPY_BUFFERS],
    cows: impl Iterator<Item = &'c mut Cow>,
    copy: usize,
    buf: Option<&'b mut [u8]>,
) {
    if let Some(entry) = copies.get_mut(copy) {
        entry.lent.buf = buf;
    }
    for cow in cows.filter(|c| c.copy == copy) {
        cow.in_flight = false;
    }
}

impl<'b, const SLOTS: usize, const SEGMENTS: usize, const PIECES: usize>
    Engine<'b, SLOTS, SEGMENTS, PIECES>
{
    /// Lends the engine a buffer for the copy-on-write of allocating
    /// writes (module docs): one copy at a time each, of at most its
    /// length (a cluster's worth covers any head or tail).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty buffer,
    /// [`ErrorKind::NoCapacity`] when [`COPY_BUFFERS`] are lent already.
    pub fn lend_copy_buffer(&mut self, buf: &'b mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return fail(ErrorKind::InvalidInput, "a copy buffer must not be empty");
        }
        let Some(entry) = self.copies.iter_mut().find(|e| e.lent.size == 0) else {
            return fail(ErrorKind::NoCapacity, "every copy buffer place is taken");
        };
        entry.lent = LentBuffer {
            size: buf.len(),
            buf: Some(buf),
        };
        Ok(())
    }

    /// Takes a free copy buffer of at least `len` bytes for a copy of
    /// `range`: the copy, or `None` (the caller copies synchronously).
    pub(super) fn take_copy(&mut self, range: CowRange) -> Option<Cow> {
        let copy = self
            .copies
            .iter()
            .position(|e| !e.busy && e.lent.buf.is_some() && e.lent.size as u64 >= range.len)?;
        self.copies[copy].busy = true;
        Some(Cow {
            copy,
            range,
            phase: Phase::Read,
            pos: 0,
            in_flight: false,
        })
    }

    /// Carries every copy on: its next read, its write, its end. Runs in
    /// every poll, after the completions are collected and before the
    /// allocations are linked.
    #[inline(never)] // Stack: its frame and its siblings' do not add up.
    pub(super) fn advance_copies_on_write<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
    ) {
        for entry in 0..ALLOCATIONS {
            for half in 0..2 {
                self.advance_cow(graph, entry, half);
            }
        }
    }

    /// Carries copy `half` of allocation `entry` on.
    fn advance_cow<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        entry: usize,
        half: usize,
    ) {
        let Some(allocation) = self.allocations[entry].as_mut() else {
            return;
        };
        let (index, node) = (allocation.slot(), allocation.node);
        let Some(mut cow) = allocation.cows[half].take() else {
            return;
        };
        let over = loop {
            if cow.in_flight {
                break false;
            }
            let failed = self.slots[index].as_ref().is_none_or(|s| s.error.is_some());
            let step = match (failed, cow.phase) {
                // Given up: the clusters are abandoned anyway.
                (true, Phase::Read) => break true,
                (true, Phase::Write) | (false, Phase::Write) => break true,
                (false, Phase::Read) if cow.pos < cow.range.len => {
                    self.cow_read(graph, (index, node), &mut cow)
                }
                (false, Phase::Read) => self.cow_write(graph, (index, node), &mut cow),
            };
            if let Err(err) = step {
                if let Some(slot) = self.slots[index].as_mut() {
                    slot.fail(err);
                }
            }
        };
        if !over {
            if let Some(allocation) = self.allocations[entry].as_mut() {
                allocation.cows[half] = Some(cow);
            }
            return;
        }
        self.copies[cow.copy].busy = false;
        if cow.phase == Phase::Read {
            // The guard of a copy that never sent its write.
            self.release_guard(index);
        }
    }

    /// Lets go of one copy's hold on request `index`; it finishes when
    /// nothing else is in flight.
    fn release_guard(&mut self, index: usize) {
        if let Some(slot) = self.slots[index].as_mut() {
            slot.ops = slot.ops.saturating_sub(1);
            if slot.ops == 0 && slot.state == State::Running {
                slot.state = State::Done;
            }
        }
    }

    /// Sends `op` for a copy of request `index`; `true` when it completed
    /// at once (its buffer back).
    fn submit_cow<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        (index, file): (usize, NodeId),
        cow: &mut Cow,
        op: Op<'b>,
    ) -> Result<bool> {
        let at = (file, tag(index, COW_PIECE + cow.copy));
        let done = submit_lent(graph, at, op, &mut self.copies[cow.copy].lent)?;
        if !done {
            self.cow_in_flight(index, cow);
        }
        Ok(done)
    }

    /// Counts copy `cow`'s operation of request `index` in flight.
    fn cow_in_flight(&mut self, index: usize, cow: &mut Cow) {
        cow.in_flight = true;
        self.ops += 1;
        if let Some(slot) = self.slots[index].as_mut() {
            slot.ops += 1;
        }
    }

    /// The next piece of a copy's read: one extent of the node's view.
    fn cow_read<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        (index, node): (usize, NodeId),
        cow: &mut Cow,
    ) -> Result<()> {
        let at = cow.range.guest + cow.pos;
        let into = (
            &mut self.copies[cow.copy].lent,
            cow.pos as usize,
            tag(index, COW_PIECE + cow.copy),
        );
        let (run, done) = read_view_into(graph, (node, at, cow.range.len - cow.pos), into)?;
        cow.pos += run;
        if !done {
            self.cow_in_flight(index, cow);
        }
        Ok(())
    }

    /// The copy's write into the new cluster, once it is read; the guard
    /// goes (the write holds the request from here).
    fn cow_write<D: Queue<'b>, const N: usize, const B: usize, const C: usize, const J: usize>(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        (index, node): (usize, NodeId),
        cow: &mut Cow,
    ) -> Result<()> {
        cow.phase = Phase::Write;
        let file = graph.data_file(node);
        let buf = self.copies[cow.copy]
            .lent
            .buf
            .take()
            .ok_or_else(lost_buffer);
        let sent = match (file, buf) {
            (Ok(file), Ok(buf)) => {
                let op = Op::WritePart {
                    offset: cow.range.host,
                    buf,
                    at: 0,
                    len: cow.range.len as usize,
                };
                self.submit_cow(graph, (index, file), cow, op)
            }
            (Err(err), Ok(buf)) => {
                self.copies[cow.copy].lent.buf = Some(buf);
                Err(err)
            }
            (_, Err(err)) => Err(err),
        };
        self.release_guard(index);
        sent.map(drop)
    }
}
