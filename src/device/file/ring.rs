//! [`FileDevice`]'s split-phase queue: an io_uring per device, made when a
//! node starts using the file (Linux).
//!
//! - **Submit** checks the operation as the synchronous path does (range,
//!   writability), parks its buffer in a slot of the ring's table and
//!   queues a submission entry: a read or write on the descriptor the
//!   synchronous path would choose (direct when aligned), a flush as
//!   `fdatasync`. Entries go to the kernel together, at the next
//!   [`Queue::poll`] or [`Queue::wait`]. At most [`RING_DEPTH`] operations
//!   are in the kernel; one more first reaps, and waits for a completion
//!   when none has come.
//! - **Poll** reaps completions without blocking. A short transfer goes on
//!   with the rest (on the descriptor the rest's alignment chooses), an
//!   interrupted one is tried again, end of file and errors complete it
//!   with the synchronous path's errors. **Wait** blocks until the kernel
//!   completes one.
//! - **Buffers** are `'static` ([`Queue`] is implemented for `'static`
//!   only): the kernel may use them until the operation completes whatever
//!   the submitter does, so no borrow could promise that. They stay parked
//!   until the operation is reported; dropping the ring waits for the
//!   kernel, so the file's last writes land before it closes.
//! - **Fallback**: where no ring can be made (seccomp, `io_uring_disabled`,
//!   an old kernel) the device completes every operation synchronously,
//!   as [`Queue`]'s defaults do.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use nix::libc;

use super::{io_error, through, FileDevice};
use crate::device::queue::perform;
use crate::device::{Completion, Op, Queue, Submitted, Tag};
use crate::error::{fail, Error, ErrorKind, Result};

/// Operations one device keeps in the kernel at once (the size of its
/// submission queue); the completion queue is twice as large, so it never
/// overflows.
pub const RING_DEPTH: u32 = 128;

/// The most bytes one submission entry transfers; a longer buffer goes on
/// as a short transfer does.
const MOST_PER_ENTRY: usize = 1 << 30;

/// A device's ring, once it tried to make one.
pub(super) enum RingState {
    /// No operation was submitted yet.
    Untried,
    /// Operations go through this ring.
    Ready(Box<Ring>),
    /// No ring could be made: operations complete synchronously.
    Unavailable,
}

/// An operation's memory while the kernel may use it: `'static`, so that
/// nothing the submitter does (freeing it, leaking the device) can pull it
/// from under the kernel.
enum Parked {
    /// A read into `buf[at..at + len]`; `buf` comes back.
    Read {
        buf: &'static mut [u8],
        at: usize,
        len: usize,
    },
    Write(&'static [u8]),
    /// A write of `buf[at..at + len]`; `buf` comes back.
    WritePart {
        buf: &'static mut [u8],
        at: usize,
        len: usize,
    },
    Flush,
}

impl Parked {
    /// The bytes to transfer (none for a flush).
    fn bytes(&self) -> &[u8] {
        match self {
            Parked::Read { buf, at, len } | Parked::WritePart { buf, at, len } => {
                &buf[*at..*at + *len]
            }
            Parked::Write(buf) => buf,
            Parked::Flush => &[],
        }
    }

    /// The buffer of a read or a part write, given back.
    fn into_lent(self) -> Option<&'static mut [u8]> {
        match self {
            Parked::Read { buf, .. } | Parked::WritePart { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// `op`'s offset and memory, parked for the kernel (a part's window
/// checked by [`Queue::submit`] first).
fn park(op: Op<'static>) -> (u64, Parked) {
    match op {
        Op::Read { offset, buf } => {
            let len = buf.len();
            (offset, Parked::Read { buf, at: 0, len })
        }
        Op::ReadPart {
            offset,
            buf,
            at,
            len,
        } => (offset, Parked::Read { buf, at, len }),
        Op::Write { offset, buf } => (offset, Parked::Write(buf)),
        Op::WritePart {
            offset,
            buf,
            at,
            len,
        } => (offset, Parked::WritePart { buf, at, len }),
        Op::Flush => (0, Parked::Flush),
    }
}

/// An operation the kernel holds.
struct Transfer {
    tag: Tag,
    parked: Parked,
    /// The device offset of the buffer's first byte.
    offset: u64,
    /// Bytes already transferred: the next entry starts after them.
    done: usize,
}

/// What a completion entry means for its transfer.
enum Outcome {
    /// The rest goes to the kernel again.
    Again,
    /// The operation is over.
    Over(Result<()>),
}

impl Transfer {
    /// Takes the kernel's result `res` for the last entry.
    fn outcome(&mut self, res: i32) -> Outcome {
        let Ok(moved) = usize::try_from(res) else {
            return match -res {
                libc::EINTR | libc::EAGAIN => Outcome::Again,
                errno => {
                    let err = io_error(std::io::Error::from_raw_os_error(errno));
                    Outcome::Over(Err(err.at_offset(self.offset + self.done as u64)))
                }
            };
        };
        let len = self.parked.bytes().len();
        if matches!(self.parked, Parked::Flush) {
            return Outcome::Over(Ok(()));
        }
        if moved == 0 {
            // As `read_exact_at` and `write_all_at` report it.
            let kind = match self.parked {
                Parked::Read { .. } => std::io::ErrorKind::UnexpectedEof,
                _ => std::io::ErrorKind::WriteZero,
            };
            return Outcome::Over(Err(io_error(kind.into())));
        }
        self.done += moved;
        if self.done >= len {
            Outcome::Over(Ok(()))
        } else {
            Outcome::Again
        }
    }

    /// The submission entry for the rest of the transfer, `user_data`
    /// `index`; `buffered` and `direct` are the device's descriptors.
    fn entry(&mut self, index: usize, buffered: RawFd, direct: Option<RawFd>) -> squeue::Entry {
        let offset = self.offset + self.done as u64;
        let entry = match &mut self.parked {
            Parked::Read { buf, at, len } => {
                let rest = &mut buf[*at + self.done..*at + *len];
                let fd = *through(&buffered, direct.as_ref(), offset, rest);
                let len = rest.len().min(MOST_PER_ENTRY) as u32;
                opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
                    .offset(offset)
                    .build()
            }
            Parked::Write(_) | Parked::WritePart { .. } => {
                let rest = &self.parked.bytes()[self.done..];
                let fd = *through(&buffered, direct.as_ref(), offset, rest);
                let len = rest.len().min(MOST_PER_ENTRY) as u32;
                opcode::Write::new(types::Fd(fd), rest.as_ptr(), len)
                    .offset(offset)
                    .build()
            }
            Parked::Flush => opcode::Fsync::new(types::Fd(buffered))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(index as u64)
    }
}

/// An operation over, waiting to be reported.
struct Finished {
    tag: Tag,
    result: Result<()>,
    parked: Parked,
    offset: u64,
}

/// An io_uring and the operations it holds.
pub(super) struct Ring {
    uring: IoUring,
    /// The operations in the kernel, by `user_data`.
    slots: Vec<Option<Transfer>>,
    /// Indexes of the empty slots.
    free: Vec<usize>,
    /// Operations over, in the order they ended.
    finished: Vec<Finished>,
    /// The device's descriptors: buffered, and direct (cache mode `none`).
    buffered: RawFd,
    direct: Option<RawFd>,
}

impl Ring {
    fn new(buffered: RawFd, direct: Option<RawFd>) -> std::io::Result<Self> {
        let uring = IoUring::builder()
            .setup_cqsize(2 * RING_DEPTH)
            .build(RING_DEPTH)?;
        let depth = RING_DEPTH as usize;
        Ok(Self {
            uring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            finished: Vec::with_capacity(depth),
            buffered,
            direct,
        })
    }

    /// Operations in the kernel.
    fn in_kernel(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `op`: parks it in a free slot (reaping, or waiting for a
    /// completion, when none is free) and queues its entry. On failure the
    /// operation is not started and a read's buffer comes back.
    fn start(
        &mut self,
        tag: Tag,
        op: Op<'static>,
    ) -> core::result::Result<(), (Error, Option<&'static mut [u8]>)> {
        let index = match self.free_slot() {
            Ok(index) => index,
            Err(err) => {
                return Err((err, op.into_buffer()));
            }
        };
        let (offset, parked) = park(op);
        let transfer = Transfer {
            tag,
            parked,
            offset,
            done: 0,
        };
        self.slots[index] = Some(transfer);
        if let Err(err) = self.push(index) {
            let buf = self.slots[index].take().and_then(|t| t.parked.into_lent());
            self.free.push(index);
            return Err((err, buf));
        }
        Ok(())
    }

    /// A free slot: one reaped when none is free, waiting for the kernel
    /// when none has completed.
    fn free_slot(&mut self) -> Result<usize> {
        if self.free.is_empty() {
            self.reap();
        }
        while self.free.is_empty() {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return fail(ErrorKind::Io, "waiting for io_uring failed"),
            }
            self.reap();
        }
        self.free
            .pop()
            .ok_or(Error::new(ErrorKind::Busy, "no free io_uring slot"))
    }

    /// Queues the entry of the transfer in slot `index`; a full submission
    /// queue goes to the kernel first.
    #[allow(unsafe_code)]
    fn push(&mut self, index: usize) -> Result<()> {
        let Some(transfer) = self.slots[index].as_mut() else {
            return fail(ErrorKind::Busy, "no operation in this io_uring slot");
        };
        let entry = transfer.entry(index, self.buffered, self.direct);
        for _ in 0..2 {
            // SAFETY: the entry points into the buffer parked in slot
            // `index` (or at nothing, for a flush), which stays there,
            // untouched, until the entry's completion is reaped; the ring
            // is never dropped before every entry in the kernel completed
            // (`Drop`), and the descriptors it names belong to the device
            // that owns the ring.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand the queued entries to the kernel (at most
            // `RING_DEPTH` are in it, so this frees the queue).
            let _ = self.uring.submit();
        }
        fail(ErrorKind::Busy, "the io_uring submission queue stays full")
    }

    /// Hands queued entries to the kernel and takes the completions that
    /// came, without blocking: short transfers go on, the others move to
    /// `finished`.
    fn reap(&mut self) {
        // An error leaves the entries queued for the next call.
        let _ = self.uring.submit();
        loop {
            let Some(cqe) = self.uring.completion().next() else {
                break;
            };
            self.complete(cqe.user_data() as usize, cqe.result());
        }
    }

    /// Takes the kernel's result `res` for the entry of slot `index`.
    fn complete(&mut self, index: usize, res: i32) {
        let Some(transfer) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let result = match transfer.outcome(res) {
            Outcome::Again => match self.push(index) {
                Ok(()) => return,
                Err(err) => Err(err),
            },
            Outcome::Over(result) => result,
        };
        if let Some(transfer) = self.slots[index].take() {
            self.free.push(index);
            self.finished.push(Finished {
                tag: transfer.tag,
                result,
                parked: transfer.parked,
                offset: transfer.offset,
            });
        }
    }

    /// Blocks until an operation is over, unless one is waiting to be
    /// reported or none is in the kernel.
    fn wait(&mut self) {
        while self.finished.is_empty() && self.in_kernel() > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                // The caller polls again rather than wait here forever.
                Err(_) => return,
            }
            self.reap();
        }
    }
}

/// Waits until the kernel completed every operation of the ring: it writes
/// into their buffers until then.
impl Drop for Ring {
    fn drop(&mut self) {
        while self.in_kernel() > 0 {
            if self.uring.submit_and_wait(1).is_err() {
                // Interrupted, or the kernel is short of memory: the
                // buffers are still in use, so try again.
                std::thread::yield_now();
            }
            self.reap();
        }
    }
}

impl FileDevice {
    /// Makes the device's ring, once: [`FileDevice::set_access`] calls it
    /// when a node starts using the file. Where io_uring is unavailable
    /// the device completes operations synchronously from then on. The one
    /// place that decides.
    pub(super) fn prepare_ring(&mut self) {
        if let RingState::Untried = self.ring {
            let direct = self.direct.as_ref().map(AsRawFd::as_raw_fd);
            self.ring = match Ring::new(self.file.as_raw_fd(), direct) {
                Ok(ring) => RingState::Ready(Box::new(ring)),
                Err(_) => RingState::Unavailable,
            };
        }
    }

    /// The device's ring (made now if no node made it yet); `None` where
    /// io_uring is unavailable.
    fn ring(&mut self) -> Option<&mut Ring> {
        self.prepare_ring();
        match &mut self.ring {
            RingState::Ready(ring) => Some(ring),
            _ => None,
        }
    }

    /// Whether `op` goes to the ring: it passes the synchronous path's
    /// checks (range, writability) and has something to do (bytes to
    /// transfer, a writable file to flush). The others complete at once,
    /// synchronously, with the synchronous path's result.
    fn queueable(&self, op: &Op<'_>) -> bool {
        match op.transfer() {
            Some((offset, bytes, false)) => {
                !bytes.is_empty() && self.check_read(offset, bytes.len()).is_ok()
            }
            Some((offset, bytes, true)) => {
                !bytes.is_empty() && self.write_end(offset, bytes.len()).is_ok()
            }
            None => matches!(op, Op::Flush) && !self.read_only,
        }
    }
}

/// Reads, writes and flushes through the device's io_uring, many in
/// flight; synchronous where io_uring is unavailable.
///
/// Only for `'static` buffers: the kernel writes into a read's buffer until
/// the operation completes, whatever happens to the borrow meanwhile, so
/// the memory must outlive any device (a VMM's guest memory, mapped for the
/// machine's life; memory leaked for the purpose). Buffers of shorter
/// lives go through the synchronous [`Device`](crate::Device) calls.
impl Queue<'static> for FileDevice {
    fn submit(&mut self, tag: Tag, op: Op<'static>) -> Submitted<'static> {
        if self.queueable(&op) {
            if let Some(ring) = self.ring() {
                return match ring.start(tag, op) {
                    Ok(()) => Submitted::Queued,
                    Err((err, buf)) => Submitted::Done(Err(err), buf),
                };
            }
        }
        let (result, buf) = perform(self, op);
        Submitted::Done(result, buf)
    }

    fn poll(&mut self, done: Completion<'_, 'static>) {
        let RingState::Ready(ring) = &mut self.ring else {
            return;
        };
        ring.reap();
        for finished in ring.finished.drain(..) {
            let wrote = matches!(finished.parked, Parked::Write(_) | Parked::WritePart { .. });
            if wrote && finished.result.is_ok() {
                let len = finished.parked.bytes().len() as u64;
                self.len = self.len.max(finished.offset + len);
            }
            done(finished.tag, finished.result, finished.parked.into_lent());
        }
    }

    fn busy(&self) -> bool {
        match &self.ring {
            RingState::Ready(ring) => ring.in_kernel() > 0 || !ring.finished.is_empty(),
            _ => false,
        }
    }

    fn wait(&mut self) {
        if let RingState::Ready(ring) = &mut self.ring {
            ring.wait();
        }
    }
}
