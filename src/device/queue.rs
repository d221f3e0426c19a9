//! Split-phase device operations: submitted now, completed later, in any
//! order ([`Queue`]), and [`Reorder`], a device that completes them out of
//! order for tests.
//!
//! A device that works synchronously (a [`MemDevice`](super::MemDevice), a
//! virtio disk today) implements [`Queue`] with its defaults: every
//! operation completes inside [`Queue::submit`]. A device with a real queue
//! (a host file over io_uring) keeps the buffers it was handed until the
//! operation completes, reports it from [`Queue::poll`], and can block in
//! [`Queue::wait`] until one does.

use super::{Device, DeviceId};
use crate::error::{fail, ErrorKind, Result};

/// Names one operation submitted to a device; the submitter chooses it and
/// gets it back with the operation's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag(pub u32);

/// A device operation and its buffer, borrowed until it completes.
#[derive(Debug)]
#[non_exhaustive]
pub enum Op<'b> {
    /// Fill `buf` from byte `offset`.
    Read {
        /// Byte offset on the device.
        offset: u64,
        /// Where the bytes go.
        buf: &'b mut [u8],
    },
    /// Write `buf` at byte `offset`.
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// The bytes.
        buf: &'b [u8],
    },
    /// Fill `buf[at..at + len]` from byte `offset`; `buf` comes back whole
    /// with the completion. For a buffer lent for a series of operations
    /// (a job's copy buffer), each on a part of it.
    ReadPart {
        /// Byte offset on the device.
        offset: u64,
        /// The whole buffer.
        buf: &'b mut [u8],
        /// Where in `buf` the bytes go.
        at: usize,
        /// How many.
        len: usize,
    },
    /// Write `buf[at..at + len]` at byte `offset`; `buf` comes back whole
    /// with the completion.
    WritePart {
        /// Byte offset on the device.
        offset: u64,
        /// The whole buffer.
        buf: &'b mut [u8],
        /// Where in `buf` the bytes are.
        at: usize,
        /// How many.
        len: usize,
    },
    /// Make every completed write durable.
    Flush,
}

impl<'b> Op<'b> {
    /// What the operation transfers: its device offset, its bytes (a part
    /// operation's part) and whether it writes them; `None` for a flush
    /// and for a part that does not lie in its buffer.
    pub fn transfer(&self) -> Option<(u64, &[u8], bool)> {
        match self {
            Op::Read { offset, buf } => Some((*offset, &**buf, false)),
            Op::Write { offset, buf } => Some((*offset, &**buf, true)),
            Op::ReadPart {
                offset,
                buf,
                at,
                len,
            } => Some((*offset, buf.get(*at..at.checked_add(*len)?)?, false)),
            Op::WritePart {
                offset,
                buf,
                at,
                len,
            } => Some((*offset, buf.get(*at..at.checked_add(*len)?)?, true)),
            Op::Flush => None,
        }
    }

    /// The buffer of a read or a part operation, given back (one not
    /// submitted after all).
    pub fn into_buffer(self) -> Option<&'b mut [u8]> {
        match self {
            Op::Read { buf, .. } | Op::ReadPart { buf, .. } | Op::WritePart { buf, .. } => {
                Some(buf)
            }
            Op::Write { .. } | Op::Flush => None,
        }
    }
}

/// `buf[at..at + len]`, the part of a [`Op::ReadPart`] or
/// [`Op::WritePart`].
///
/// # Errors
/// [`ErrorKind::InvalidInput`] when it does not lie in `buf`.
pub(crate) fn part(buf: &mut [u8], at: usize, len: usize) -> Result<&mut [u8]> {
    let end = at.checked_add(len);
    match end.and_then(|end| buf.get_mut(at..end)) {
        Some(part) => Ok(part),
        None => fail(
            ErrorKind::InvalidInput,
            "an operation's part lies outside its buffer",
        ),
    }
}

/// What [`Queue::submit`] did with an operation.
#[derive(Debug)]
pub enum Submitted<'b> {
    /// It completed at once, with this result (and a read's or a part
    /// operation's buffer, given back); [`Queue::poll`] will not report it.
    Done(Result<()>, Option<&'b mut [u8]>),
    /// It is in flight; [`Queue::poll`] reports its completion.
    Queued,
}

/// What [`Queue::poll`] reports for each completed operation: its tag, its
/// result and, for a read or a part operation, its buffer given back.
pub type Completion<'c, 'b> = &'c mut dyn FnMut(Tag, Result<()>, Option<&'b mut [u8]>);

/// Split-phase access to a device, with buffers that live for `'b`.
pub trait Queue<'b>: Device {
    /// Starts `op`, named `tag`. The default runs it synchronously through
    /// the [`Device`] methods.
    fn submit(&mut self, tag: Tag, op: Op<'b>) -> Submitted<'b> {
        let _ = tag;
        let (result, buf) = perform(self, op);
        Submitted::Done(result, buf)
    }

    /// Reports operations that completed since the last call, each once, to
    /// `done`. The default has none (everything completed in `submit`).
    fn poll(&mut self, done: Completion<'_, 'b>) {
        let _ = done;
    }

    /// Whether operations are in flight (submitted, not yet reported).
    fn busy(&self) -> bool {
        false
    }

    /// Blocks until [`Queue::poll`] has something to report, when an
    /// operation is in flight that has not completed; returns at once
    /// otherwise (a completion is waiting to be reported, or nothing is in
    /// flight). A caller with nothing else to do waits here instead of
    /// polling in a loop. The default returns at once: a device that
    /// completes operations on its own only when polled never blocks.
    fn wait(&mut self) {}
}

/// Runs `op` synchronously on `device`; a read's or a part operation's
/// buffer comes back.
pub fn perform<'b, D: Device + ?Sized>(
    device: &mut D,
    op: Op<'b>,
) -> (Result<()>, Option<&'b mut [u8]>) {
    match op {
        Op::Read { offset, buf } => (device.read_at(offset, buf), Some(buf)),
        Op::Write { offset, buf } => (device.write_at(offset, buf), None),
        Op::ReadPart {
            offset,
            buf,
            at,
            len,
        } => {
            let result = part(buf, at, len).and_then(|part| device.read_at(offset, part));
            (result, Some(buf))
        }
        Op::WritePart {
            offset,
            buf,
            at,
            len,
        } => {
            let result = part(buf, at, len).and_then(|part| device.write_at(offset, part));
            (result, Some(buf))
        }
        Op::Flush => (device.flush(), None),
    }
}

impl<'b> Queue<'b> for super::MemDevice<'_> {}

/// Most operations a [`Reorder`] device holds in flight; more complete at
/// once.
pub const REORDER_DEPTH: usize = 64;

/// A device for tests: it queues the operations submitted to it and
/// performs and completes them later, in a pseudo-random order (a seeded
/// xorshift), a few per [`Queue::poll`] — as a real queue may. Synchronous
/// [`Device`] calls go straight to the inner device.
pub struct Reorder<'b, D: Device> {
    inner: D,
    pending: heapless::Vec<(Tag, Op<'b>), REORDER_DEPTH>,
    state: u64,
}

impl<'b, D: Device> Reorder<'b, D> {
    /// Wraps `inner`; `seed` picks the completion order.
    pub fn new(inner: D, seed: u64) -> Self {
        Self {
            inner,
            pending: heapless::Vec::new(),
            state: seed | 1,
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped device, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

impl<D: Device> Device for Reorder<'_, D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }

    /// Makes the writes that completed durable (queued ones have not).
    fn flush(&mut self) -> Result<()> {
        self.inner.flush()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn identity(&self) -> DeviceId {
        self.inner.identity()
    }

    fn set_access(&mut self, access: crate::graph::Access) -> Result<()> {
        self.inner.set_access(access)
    }
}

impl<'b, D: Device> Queue<'b> for Reorder<'b, D> {
    fn submit(&mut self, tag: Tag, op: Op<'b>) -> Submitted<'b> {
        match self.pending.push((tag, op)) {
            Ok(()) => Submitted::Queued,
            Err((_, op)) => {
                let (result, buf) = perform(&mut self.inner, op);
                Submitted::Done(result, buf)
            }
        }
    }

    fn poll(&mut self, done: Completion<'_, 'b>) {
        // Complete one to four operations, chosen at random.
        let count = (self.next() % 4 + 1) as usize;
        for _ in 0..count.min(self.pending.len()) {
            let pick = (self.next() % self.pending.len() as u64) as usize;
            let (tag, op) = self.pending.swap_remove(pick);
            let (result, buf) = perform(&mut self.inner, op);
            done(tag, result, buf);
        }
    }

    fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}
