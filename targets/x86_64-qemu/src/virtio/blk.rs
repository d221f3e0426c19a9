//! A virtio-blk driver with many requests in flight: virtio-drivers'
//! transports and virtqueue, the block protocol here.
//!
//! virtio-drivers 0.13's `VirtIOBlk` has non-blocking calls, but a fixed
//! queue of 16 descriptors and, without `alloc`, no indirect descriptors:
//! five requests in flight at most. [`Driver`] speaks the same protocol
//! over a [`Ring`] sized to the device (42 requests with QEMU's defaults).
//!
//! A request is three buffers (two for a flush): a 16-byte header the
//! device reads, the data, and a status byte the device writes. Header and
//! status live in a [`Request`] the caller keeps in place until the request
//! completes:
//!
//! ```text
//!  start(request, sector, transfer) -> token, kick() ... peek() == Some(token)
//!                                                   -> finish(token, request, transfer)
//! ```
//!
//! `start` only puts a request in the ring; `kick` notifies the device of
//! every request started since the last kick, so a burst of requests costs
//! one notification (a trap into QEMU each).
//!
//! Only one queue (0); the kernel polls, interrupts are suppressed.

use bitflags::bitflags;
use virtio_drivers::transport::{DeviceStatus, SomeTransport, Transport};
use virtio_drivers::Error;

use super::ring::Ring;
use crate::sectors::SECTOR;

/// The request queue.
const QUEUE: u16 = 0;
/// Bytes of a virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;
/// Descriptors of a read or write request: header, data, status.
pub const DESCRIPTORS_PER_REQUEST: usize = 3;

bitflags! {
    /// The virtio-blk features the driver takes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// The disk is read-only.
        const RO = 1 << 5;
        /// The device has a write cache that `FLUSH` empties.
        const FLUSH = 1 << 9;
        /// virtio 1.0 (modern) rather than legacy.
        const VERSION_1 = 1 << 32;
    }
}

/// Request types (`VIRTIO_BLK_T_*`).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values (`VIRTIO_BLK_S_*`).
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

/// What a request moves.
pub enum Transfer<'d> {
    /// Sectors into the buffer.
    Read(&'d mut [u8]),
    /// The buffer onto sectors.
    Write(&'d [u8]),
    /// Nothing: the device's write cache to the medium.
    Flush,
    /// The device's serial into the buffer.
    Serial(&'d mut [u8; SERIAL_LEN]),
}

/// Header and status of one request: the device reads the one and writes
/// the other while the request is in flight.
#[derive(Debug)]
pub struct Request {
    /// `type: le32, reserved: le32, sector: le64`.
    header: [u8; 16],
    status: [u8; 1],
}

impl Request {
    /// A request's storage, before it is started.
    pub const fn new() -> Self {
        Self {
            header: [0; 16],
            status: [0xff],
        }
    }
}

/// One virtio-blk device: its transport and request ring.
pub struct Driver {
    transport: SomeTransport<'static>,
    ring: Ring,
    features: Features,
    sectors: u64,
    /// Requests were started since the device was last notified.
    unnotified: bool,
}

impl Driver {
    /// Initialises the device behind `transport`.
    ///
    /// # Errors
    /// virtio-drivers' (configuration space, queue setup, DMA pages).
    pub fn new(mut transport: SomeTransport<'static>) -> Result<Self, Error> {
        let features = transport.begin_init(Features::all());
        let sectors = transport.read_consistent(|| {
            let low: u32 = transport.read_config_space(0)?;
            let high: u32 = transport.read_config_space(4)?;
            Ok(u64::from(low) | u64::from(high) << 32)
        })?;
        let mut ring = Ring::new(&mut transport, QUEUE)?;
        ring.quiet();
        transport.finish_init();
        Ok(Self {
            transport,
            ring,
            features,
            sectors,
            unnotified: false,
        })
    }

    /// The disk's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.features.contains(Features::RO)
    }

    /// Whether the device has a write cache: flushes go to the device only
    /// then (`VIRTIO_BLK_F_FLUSH`); without one every completed write is
    /// durable.
    pub fn has_write_cache(&self) -> bool {
        self.features.contains(Features::FLUSH)
    }

    /// Requests the ring holds at once.
    pub fn capacity(&self) -> usize {
        self.ring.size() / DESCRIPTORS_PER_REQUEST
    }

    /// Whether the ring has room for one more request.
    pub fn has_room(&self) -> bool {
        self.ring.free_descriptors() >= DESCRIPTORS_PER_REQUEST
    }

    /// Puts `transfer` at `sector` in the ring; returns its token. The
    /// device learns of it at the next [`Driver::kick`]. The caller checks
    /// [`Driver::has_room`] first, and sends no flush to a device without a
    /// write cache ([`Driver::has_write_cache`]).
    ///
    /// # Errors
    /// virtio-drivers' (`QueueFull` without room). Read and write buffers
    /// must be non-empty multiples of [`SECTOR`] bytes: others are refused
    /// with `InvalidParam`.
    ///
    /// # Safety
    /// `request` and the transfer's buffer stay valid, in place and
    /// untouched until [`Driver::finish`] is called with this token.
    pub unsafe fn start(
        &mut self,
        request: &mut Request,
        sector: u64,
        transfer: Transfer<'_>,
    ) -> Result<u16, Error> {
        let (kind, data_len) = match &transfer {
            Transfer::Read(buf) => (T_IN, Some(buf.len())),
            Transfer::Write(buf) => (T_OUT, Some(buf.len())),
            Transfer::Flush => (T_FLUSH, None),
            Transfer::Serial(_) => (T_GET_ID, None),
        };
        if data_len.is_some_and(|len| len == 0 || !len.is_multiple_of(SECTOR)) {
            return Err(Error::InvalidParam);
        }
        request.header[..4].copy_from_slice(&kind.to_le_bytes());
        request.header[4..8].fill(0);
        request.header[8..].copy_from_slice(&sector.to_le_bytes());
        request.status = [0xff];
        let Request { header, status } = request;
        // SAFETY: the caller keeps `request` and the buffer in place and
        // untouched until `finish` takes them back for this token.
        let token = unsafe {
            match transfer {
                Transfer::Read(buf) => self.ring.add(&[header], &mut [buf, status]),
                Transfer::Serial(id) => self.ring.add(&[header], &mut [id, status]),
                Transfer::Write(buf) => self.ring.add(&[header, buf], &mut [status]),
                Transfer::Flush => self.ring.add(&[header], &mut [status]),
            }?
        };
        self.unnotified = true;
        Ok(token)
    }

    /// Tells the device about the requests started since the last call
    /// (one notification for all of them, unless the device asked for
    /// none).
    pub fn kick(&mut self) {
        if core::mem::take(&mut self.unnotified) && self.ring.should_notify() {
            self.transport.notify(QUEUE);
        }
    }

    /// The token of the next completed request, if any.
    pub fn peek(&self) -> Option<u16> {
        self.ring.peek_used()
    }

    /// Takes completed request `token` (as [`Driver::peek`] named it) and
    /// returns its status.
    ///
    /// # Errors
    /// virtio-drivers' for a token that is not the next completed one;
    /// `IoError` or `Unsupported` as the device reports.
    ///
    /// # Safety
    /// `request` and `transfer` are what [`Driver::start`] was given for
    /// `token`.
    pub unsafe fn finish(
        &mut self,
        token: u16,
        request: &mut Request,
        transfer: Transfer<'_>,
    ) -> Result<(), Error> {
        let Request { header, status } = request;
        // SAFETY: the caller passes the buffers `start` was given for `token`.
        unsafe {
            match transfer {
                Transfer::Read(buf) => self.ring.pop_used(token, &[header], &mut [buf, status]),
                Transfer::Serial(id) => self.ring.pop_used(token, &[header], &mut [id, status]),
                Transfer::Write(buf) => self.ring.pop_used(token, &[header, buf], &mut [status]),
                Transfer::Flush => self.ring.pop_used(token, &[header], &mut [status]),
            }?;
        }
        match status[0] {
            S_OK => Ok(()),
            S_UNSUPP => Err(Error::Unsupported),
            _ => Err(Error::IoError),
        }
    }

    /// Resets the device: it stops using every buffer it was given. For a
    /// device that broke the protocol; nothing works on it afterwards.
    pub fn reset(&mut self) {
        self.transport.set_status(DeviceStatus::empty());
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The ring's DMA pages are not reused, but the device must not keep
        // pointers into them.
        self.transport.queue_unset(QUEUE);
    }
}
