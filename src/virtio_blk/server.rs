//! The server: descriptor chains in, engine requests out, used-ring
//! entries back, out of order.
//!
//! ```text
//!  VMM avail ring ──> Server::submit(engine, disk, head, chain)
//!                        │ held back while it conflicts with a chain in
//!                        │ flight or queued before it
//!                        ├─ decode ─ refused ──> status written
//!                        ├─ GET_ID ───────────> serial written
//!                        └─ Engine::submit_* (guest slices, zero copy)
//!  Server::poll(graph, engine) ──> Engine::poll, status of finished ones
//!  Server::next_used() ──> (disk, head, used length) for the used ring
//! ```
//!
//! Every chain the server accepts takes one of its `REQUESTS` records until
//! the VMM collects its used entry; a full server refuses the chain and
//! hands it back ([`Rejected`]), so the VMM leaves it in its avail ring
//! until [`Server::has_room`]. An engine with every slot taken leaves
//! chains queued, in order, for a later poll: nothing is lost.

use heapless::Vec;

use crate::backend::BackendId;
use crate::device::Queue;
use crate::engine::{Engine, Ticket, DEFAULT_SEGMENTS};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::graph::Graph;

use super::config::Config;
use super::guest::{self, GuestMemory};
use super::request::{Chain, Descriptor, Op, Refusal, Request, Span, Status, ID_LEN, SECTOR};

/// Default number of chains a [`Server`] holds (queued, in flight, or
/// finished and not yet collected).
pub const DEFAULT_REQUESTS: usize = 64;
/// Default number of descriptors of one chain: a header, the engine's
/// [`DEFAULT_SEGMENTS`] data segments and a status descriptor.
pub const DEFAULT_DESCRIPTORS: usize = DEFAULT_SEGMENTS + 2;
/// Default number of disks (or virtqueues) one [`Server`] serves.
pub const DEFAULT_DISKS: usize = 4;

/// Names a disk of a [`Server`] ([`Server::add_disk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiskId(usize);

/// A chain the server is done with: what the VMM puts in the used ring of
/// `disk`'s virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The disk the chain came for.
    pub disk: DiskId,
    /// The chain's head descriptor index.
    pub head: u16,
    /// Bytes written into guest memory (IN and GET_ID data, the status
    /// byte; a read that failed in the engine counts its data too, which
    /// may be partly written); 1 for a refused chain, 0 for one without a
    /// status byte.
    pub len: u32,
}

/// A chain [`Server::submit`] did not take, given back untouched.
#[derive(Debug)]
pub struct Rejected<I> {
    /// [`ErrorKind::NoCapacity`] when every record is in use (retry after
    /// collecting used entries), [`ErrorKind::InvalidInput`] for an
    /// unknown disk.
    pub error: Error,
    /// The chain's head descriptor index.
    pub head: u16,
    /// The chain's descriptors, not iterated.
    pub chain: I,
}

/// One disk: where its requests go and what its driver was told.
struct Disk {
    backend: BackendId,
    config: Config,
    serial: [u8; ID_LEN],
}

/// Where a chain is.
enum Phase<'b> {
    /// Not started: held back, or the engine was full.
    Waiting,
    /// In the engine; its status byte is written when it finishes.
    InFlight {
        ticket: Ticket,
        status: &'b mut u8,
        used: u32,
    },
    /// Finished with this used length; waiting for [`Server::next_used`].
    Used(u32),
}

/// A chain the server holds.
struct Record<'b, const D: usize> {
    disk: DiskId,
    head: u16,
    seq: u64,
    chain: Chain<D>,
    phase: Phase<'b>,
    /// Its disk was reset ([`Server::reset`]): no used entry is reported.
    forgotten: bool,
}

/// What trying to start a chain did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Started, finished or not waiting.
    Done,
    /// Held back by a conflicting chain.
    Held,
    /// The engine has no free slot: nothing later starts either.
    EngineFull,
}

/// A virtio-blk device's request side over guest memory `M`: up to
/// `REQUESTS` chains of up to `DESCRIPTORS` descriptors, each with at most
/// `SEGMENTS` data segments (the engine's), for up to `DISKS` disks.
pub struct Server<
    'b,
    M,
    const REQUESTS: usize = DEFAULT_REQUESTS,
    const SEGMENTS: usize = DEFAULT_SEGMENTS,
    const DESCRIPTORS: usize = DEFAULT_DESCRIPTORS,
    const DISKS: usize = DEFAULT_DISKS,
> {
    memory: M,
    disks: Vec<Disk, DISKS>,
    records: [Option<Record<'b, DESCRIPTORS>>; REQUESTS],
    next_seq: u64,
}

impl<
        'b,
        M: GuestMemory<'b>,
        const REQUESTS: usize,
        const SEGMENTS: usize,
        const DESCRIPTORS: usize,
        const DISKS: usize,
    > Server<'b, M, REQUESTS, SEGMENTS, DESCRIPTORS, DISKS>
{
    /// A server with no disk over guest memory `memory`.
    pub const fn new(memory: M) -> Self {
        Self {
            memory,
            disks: Vec::new(),
            records: [const { None }; REQUESTS],
            next_seq: 0,
        }
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Adds a disk served from `backend`, configured as `config`, whose
    /// GET_ID returns `serial` (zero-padded to 20 bytes). A multi-queue
    /// device adds one disk per virtqueue.
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when `DISKS` disks exist,
    /// [`ErrorKind::InvalidInput`] for a serial over 20 bytes or a config
    /// the server cannot keep: `seg_max` 0 or over `SEGMENTS`, `size_max`
    /// 0, `blk_size` not a power of two of at least 512, more than one
    /// discard or write-zeroes segment offered.
    pub fn add_disk(
        &mut self,
        backend: BackendId,
        config: Config,
        serial: &[u8],
    ) -> Result<DiskId> {
        let segments = config.seg_max as usize;
        if segments == 0 || segments > SEGMENTS || config.size_max == 0 {
            return fail(ErrorKind::InvalidInput, "seg_max or size_max out of range");
        }
        if !config.blk_size.is_power_of_two() || u64::from(config.blk_size) < SECTOR {
            return fail(ErrorKind::InvalidInput, "blk_size out of range");
        }
        let one = |offered: bool, seg: u32| !offered || seg == 1;
        if !one(config.offers_discard(), config.max_discard_seg)
            || !one(config.offers_write_zeroes(), config.max_write_zeroes_seg)
        {
            return fail(
                ErrorKind::InvalidInput,
                "one discard or write-zeroes segment per request is served",
            );
        }
        let mut id = [0u8; ID_LEN];
        let Some(field) = id.get_mut(..serial.len()) else {
            return fail(ErrorKind::InvalidInput, "a serial has at most 20 bytes");
        };
        field.copy_from_slice(serial);
        let disk = Disk {
            backend,
            config,
            serial: id,
        };
        let index = self.disks.len();
        match self.disks.push(disk) {
            Ok(()) => Ok(DiskId(index)),
            Err(_) => fail(ErrorKind::NoCapacity, "every disk of the server is in use"),
        }
    }

    /// The configuration of `disk`, for its config-space reads
    /// ([`Config::read`]).
    pub fn config(&self, disk: DiskId) -> Option<&Config> {
        self.disks.get(disk.0).map(|d| &d.config)
    }

    /// Whether a record is free: [`Server::submit`] takes a chain.
    pub fn has_room(&self) -> bool {
        self.records.iter().any(Option::is_none)
    }

    /// Chains held: queued, in flight, or finished and not collected.
    pub fn len(&self) -> usize {
        self.records.iter().flatten().count()
    }

    /// Whether no chain is held.
    pub fn is_empty(&self) -> bool {
        self.records.iter().all(Option::is_none)
    }

    /// Chains not finished yet (queued or in the engine).
    pub fn in_flight(&self) -> usize {
        self.records
            .iter()
            .flatten()
            .filter(|r| !matches!(r.phase, Phase::Used(_)))
            .count()
    }

    /// Takes the chain with head descriptor `head` for `disk` and starts it
    /// at once unless it conflicts with a chain in flight or queued, or
    /// `engine` is full (then a later [`Server::poll`] starts it).
    ///
    /// `chain` is read to its end (a chain of more than `DESCRIPTORS` is
    /// refused with `IOERR`): the VMM's vring walk must bound it, as
    /// virtio asks of a device (a looping or overlong chain).
    ///
    /// Requests go to `engine` for the disk's backend; the VMM must not
    /// collect them itself ([`Engine::complete`], [`Engine::take`]): one
    /// it takes finishes with `IOERR`.
    ///
    /// # Errors
    /// The chain given back, not iterated ([`Rejected`]).
    pub fn submit<I, const SLOTS: usize, const PIECES: usize>(
        &mut self,
        engine: &mut Engine<'b, SLOTS, SEGMENTS, PIECES>,
        disk: DiskId,
        head: u16,
        chain: I,
    ) -> core::result::Result<(), Rejected<I>>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let free = match self.records.iter().position(Option::is_none) {
            _ if disk.0 >= self.disks.len() => {
                Err(Error::new(ErrorKind::InvalidInput, "no such disk"))
            }
            None => Err(Error::new(
                ErrorKind::NoCapacity,
                "every request record is in use",
            )),
            Some(index) => Ok(index),
        };
        let index = match free {
            Ok(index) => index,
            Err(error) => return Err(Rejected { error, head, chain }),
        };
        self.records[index] = Some(Record {
            disk,
            head,
            seq: self.next_seq,
            chain: Chain::new(chain),
            phase: Phase::Waiting,
            forgotten: false,
        });
        self.next_seq += 1;
        self.start(engine, index);
        Ok(())
    }

    /// Makes progress: collects the engine's finished requests (writing
    /// their status bytes), starts queued chains that may start, polls the
    /// engine ([`Engine::poll`]). Returns the chains not finished yet.
    pub fn poll<
        D: Queue<'b>,
        const N: usize,
        const B: usize,
        const C: usize,
        const J: usize,
        const SLOTS: usize,
        const PIECES: usize,
    >(
        &mut self,
        graph: &mut Graph<D, N, B, C, J>,
        engine: &mut Engine<'b, SLOTS, SEGMENTS, PIECES>,
    ) -> usize {
        self.collect(engine);
        self.start_queued(engine);
        engine.poll(graph);
        if self.collect(engine) > 0 {
            self.start_queued(engine);
        }
        self.in_flight()
    }

    /// Forgets `disk`'s chains for a device reset (the driver wrote 0 to
    /// the device status, or the VMM tears the queue down): those queued
    /// never start, finished ones are not reported, and those in the
    /// engine still finish (their status byte written, as QEMU drains
    /// them) but are not reported either. Returns how many are still in
    /// the engine: the reset is complete once [`Server::poll`] brought
    /// [`Server::in_engine`] to 0 for the disk.
    pub fn reset(&mut self, disk: DiskId) -> usize {
        for slot in self.records.iter_mut() {
            match slot {
                Some(record) if record.disk == disk => match record.phase {
                    Phase::InFlight { .. } => record.forgotten = true,
                    _ => *slot = None,
                },
                _ => {}
            }
        }
        self.in_engine(disk)
    }

    /// Chains of `disk` in the engine.
    pub fn in_engine(&self, disk: DiskId) -> usize {
        self.records
            .iter()
            .flatten()
            .filter(|r| r.disk == disk && matches!(r.phase, Phase::InFlight { .. }))
            .count()
    }

    /// A finished chain for the used ring, in no particular order; its
    /// record is free again.
    pub fn next_used(&mut self) -> Option<Used> {
        self.records.iter_mut().find_map(|slot| {
            let len = match slot.as_ref()?.phase {
                Phase::Used(len) => len,
                _ => return None,
            };
            let record = slot.take()?;
            Some(Used {
                disk: record.disk,
                head: record.head,
                len,
            })
        })
    }

    /// Writes the status of every finished engine request; returns how
    /// many.
    fn collect<const SLOTS: usize, const PIECES: usize>(
        &mut self,
        engine: &mut Engine<'b, SLOTS, SEGMENTS, PIECES>,
    ) -> usize {
        let mut finished = 0;
        for slot in self.records.iter_mut() {
            let Some(record) = slot else {
                continue;
            };
            let Phase::InFlight {
                ticket,
                status,
                used,
            } = &mut record.phase
            else {
                continue;
            };
            // A read's buffers come back in `Done` and are dropped here:
            // from now on nothing borrows the chain's memory.
            let ok = match engine.take(*ticket) {
                Ok(None) => continue,
                Ok(Some(done)) => done.result.is_ok(),
                Err(_) => false,
            };
            **status = match ok {
                true => Status::Ok,
                false => Status::IoErr,
            } as u8;
            record.phase = Phase::Used(*used);
            if record.forgotten {
                *slot = None;
            }
            finished += 1;
        }
        finished
    }

    /// Starts queued chains in submission order, until the engine is full.
    fn start_queued<const SLOTS: usize, const PIECES: usize>(
        &mut self,
        engine: &mut Engine<'b, SLOTS, SEGMENTS, PIECES>,
    ) {
        let mut after = None;
        while let Some((index, seq)) = self.next_queued(after) {
            after = Some(seq);
            if self.start(engine, index) == Start::EngineFull {
                break;
            }
        }
    }

    /// The queued chain submitted first after sequence number `after`.
    fn next_queued(&self, after: Option<u64>) -> Option<(usize, u64)> {
        self.records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
            .filter(|(_, r)| matches!(r.phase, Phase::Waiting) && after.is_none_or(|a| r.seq > a))
            .min_by_key(|(_, r)| r.seq)
            .map(|(i, r)| (i, r.seq))
    }

    /// Whether chain `index` must wait: it conflicts with a chain in the
    /// engine or one queued before it ([`Chain::conflicts`]).
    fn held_back(&self, index: usize) -> bool {
        let Some(Some(this)) = self.records.get(index) else {
            return false;
        };
        self.records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().filter(|_| i != index))
            .any(|other| {
                let before = match other.phase {
                    Phase::InFlight { .. } => true,
                    Phase::Waiting => other.seq < this.seq,
                    Phase::Used(_) => false,
                };
                before && this.chain.conflicts(&other.chain)
            })
    }

    /// Starts queued chain `index`: decodes it, then refuses it, answers
    /// it (GET_ID) or submits it to `engine`.
    #[allow(unsafe_code)]
    fn start<const SLOTS: usize, const PIECES: usize>(
        &mut self,
        engine: &mut Engine<'b, SLOTS, SEGMENTS, PIECES>,
        index: usize,
    ) -> Start {
        if self.held_back(index) {
            return Start::Held;
        }
        if engine.len() >= SLOTS {
            return Start::EngineFull;
        }
        let Self {
            memory,
            disks,
            records,
            ..
        } = self;
        let Some(record) = records[index].as_mut() else {
            return Start::Done;
        };
        let Some(disk) = disks.get(record.disk.0) else {
            return Start::Done;
        };
        let decoded = record.chain.decode::<SEGMENTS>(&disk.config, |addr, buf| {
            // SAFETY: the decoder reads only bytes of the chain's
            // readable descriptors, and no chain in the engine has a
            // writable descriptor over them (`held_back`); this chain's
            // own writable ones overlap none (checked by the decoder
            // before it reads).
            unsafe { guest::read(memory, addr, buf) }
        });
        let phase = match decoded {
            Err(refusal) => refuse(memory, refusal),
            Ok(request) => match issue(memory, engine, disk, &request) {
                Some(phase) => phase,
                None => return Start::EngineFull,
            },
        };
        record.phase = phase;
        Start::Done
    }
}

/// Writes a refused chain's status byte; its phase.
#[allow(unsafe_code)]
fn refuse<'b, M: GuestMemory<'b>>(memory: &M, refusal: Refusal) -> Phase<'b> {
    let Refusal::Status { at, status } = refusal else {
        return Phase::Used(0);
    };
    let span = Span { addr: at, len: 1 };
    // SAFETY: the status byte lies in a writable descriptor of a chain that
    // no chain in the engine conflicts with (`held_back`): no live slice
    // covers it, and this one dies here.
    match unsafe { guest::slice_mut(memory, span) } {
        Some([byte]) => {
            *byte = status as u8;
            Phase::Used(1)
        }
        _ => Phase::Used(0),
    }
}

/// Starts a decoded request: its phase, `None` when `engine` has no free
/// slot (nothing was written; the chain stays queued).
#[allow(unsafe_code)]
fn issue<'b, M: GuestMemory<'b>, const SLOTS: usize, const S: usize, const P: usize>(
    memory: &M,
    engine: &mut Engine<'b, SLOTS, S, P>,
    disk: &Disk,
    request: &Request<S>,
) -> Option<Phase<'b>> {
    // SAFETY (every borrow below): the status byte and the data spans lie
    // in the chain's descriptors, which no chain in the engine conflicts
    // with (`held_back`); the decoder refused chains whose writable
    // descriptors overlap any other of theirs, the data spans are disjoint
    // pieces of them and the status byte is in none. So the slices made
    // here overlap no live one, nor each other where one is writable.
    let span = Span {
        addr: request.status,
        len: 1,
    };
    let Some([status]) = (unsafe { guest::slice_mut(memory, span) }) else {
        return Some(Phase::Used(0));
    };
    let backend = disk.backend;
    let data = &request.data[..];
    let submitted = match request.op {
        Op::Read { offset } => unsafe { guest::slices_mut::<M, S>(memory, data) }
            .map(|buffers| engine.submit_read(backend, offset, buffers)),
        Op::Write { offset } => unsafe { guest::slices::<M, S>(memory, data) }
            .map(|buffers| engine.submit_write(backend, offset, buffers)),
        Op::GetId => {
            let Some(buffers) = (unsafe { guest::slices_mut::<M, S>(memory, data) }) else {
                *status = Status::IoErr as u8;
                return Some(Phase::Used(1));
            };
            let mut serial = &disk.serial[..];
            for buffer in buffers {
                let (head, rest) = serial.split_at(buffer.len().min(serial.len()));
                buffer[..head.len()].copy_from_slice(head);
                serial = rest;
            }
            *status = Status::Ok as u8;
            return Some(Phase::Used(request.used_len()));
        }
        Op::Flush => Some(engine.submit_flush(backend)),
        Op::Discard { offset, len } => Some(engine.submit_discard(backend, offset, len)),
        Op::WriteZeroes { offset, len, .. } => {
            Some(engine.submit_write_zeroes(backend, offset, len))
        }
    };
    Some(match submitted {
        Some(Ok(ticket)) => Phase::InFlight {
            ticket,
            status,
            used: request.used_len(),
        },
        Some(Err(err)) if err.kind() == ErrorKind::NoCapacity => return None,
        _ => {
            *status = Status::IoErr as u8;
            Phase::Used(1)
        }
    })
}
