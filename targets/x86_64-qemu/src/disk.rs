//! The kernel's disks: a fixed table of virtio-blk devices and
//! [`VirtioDisk`], the `blockgraph::Device` over one of them.
//!
//! The table owns the drivers (`static`, [`MAX_DISKS`] slots, each with
//! its requests in flight and a 64 KiB sector-aligned bounce buffer). A
//! [`VirtioDisk`] is a small handle (disk index, access mode), so the graph
//! can hold as many devices on one disk as it opens, and dropping them
//! closes nothing. Disks are known by their virtio serial (QEMU's
//! `-device ...,serial=NAME`, at most 20 bytes), which is how a resolver
//! finds an image by name:
//!
//! ```text
//!  SerialResolver.open("base.qcow2", w) -> disk::find("base.qcow2")
//!                                       -> VirtioDisk::open(index, w)
//! ```
//!
//! Two ways to the device (one core, no interrupts: the kernel polls):
//!
//! - `Device` calls (metadata, the synchronous path) wait for their
//!   completion; requests of any offset and length are split by
//!   [`crate::sectors`] (read-modify-write for partial sectors).
//! - `Queue` (the request engine, `bench -d`): whole-sector reads, writes
//!   and flushes go in flight, many per disk, and `poll` reports them in
//!   the order the device completes them ([`crate::virtio::requests`]);
//!   other operations (partial sectors, more than 1 MiB, no free record)
//!   complete synchronously inside `submit`.
//!
//! A `VirtioDisk` is `Copy` and cannot drain in `Drop`: whoever submits
//! drains (the engine's `drain`, which `bench -d` always calls, also after
//! an error); the script runner checks that no disk is left busy.

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use blockgraph::device::{perform, Completion, DeviceId, Op, Queue, Submitted, Tag};
use blockgraph::graph::NameBuf;
use blockgraph::{Device, Error, ErrorKind, Resolver, Result};
use spin::Mutex;
use virtio_drivers::transport::SomeTransport;

use crate::sectors::{self, SectorIo, SECTOR};
use crate::virtio::blk::{Driver, Transfer, SERIAL_LEN};
use crate::virtio::requests::Requests;

/// Most disks the kernel attaches.
pub const MAX_DISKS: usize = 8;
/// Bytes of each disk's bounce buffer (unaligned heads and tails).
pub const BOUNCE_LEN: usize = 64 * 1024;

/// A disk's serial: what QEMU's `serial=` said, without trailing NULs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Serial {
    bytes: [u8; SERIAL_LEN],
    len: u8,
}

impl Serial {
    /// The serial's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The serial as text: its longest UTF-8 prefix (device bytes are not
    /// trusted to be text).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(self.as_bytes()) {
            Ok(text) => text,
            Err(err) => {
                let valid = &self.as_bytes()[..err.valid_up_to()];
                core::str::from_utf8(valid).unwrap_or("")
            }
        }
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// What is known about a disk.
#[derive(Clone, Copy, Debug)]
pub struct DiskInfo {
    /// Its index in the table (order of discovery = order of `-device`).
    pub index: usize,
    /// Its virtio serial.
    pub serial: Serial,
    /// Its size in bytes (capacity in 512-byte sectors times 512).
    pub size: u64,
    /// Whether the device refuses writes (`readonly=on` on `-drive`).
    pub read_only: bool,
}

struct Attached {
    driver: Driver,
    requests: Requests,
    info: DiskInfo,
}

/// Sector-aligned so whole-sector transfers start on a sector boundary.
#[repr(C, align(512))]
struct Bounce([u8; BOUNCE_LEN]);

/// The drivers. Locked before the bounce buffer of the same index.
static SLOTS: [Mutex<Option<Attached>>; MAX_DISKS] = [const { Mutex::new(None) }; MAX_DISKS];
/// The bounce buffers: all zero, so they stay in `.bss` (not in the ELF file).
static BOUNCE: [Mutex<Bounce>; MAX_DISKS] =
    [const { Mutex::new(Bounce([0; BOUNCE_LEN])) }; MAX_DISKS];
/// Slots in use; slots are filled in order and never emptied.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Why a device could not become a disk.
#[derive(Clone, Copy, Debug)]
pub enum AttachError {
    /// The table is full.
    TooMany,
    /// The device failed its setup (feature negotiation, queue setup, DMA
    /// pool, the serial request).
    Driver(virtio_drivers::Error),
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany => write!(f, "more than {MAX_DISKS} disks"),
            Self::Driver(err) => write!(f, "virtio-blk: {err}"),
        }
    }
}

/// Initialises the virtio-blk device behind `transport` and adds it to the
/// table as the next disk.
///
/// # Errors
/// [`AttachError`]; the device is reset (dropped) then.
pub fn attach(transport: SomeTransport<'static>) -> core::result::Result<usize, AttachError> {
    let index = COUNT.load(Ordering::Acquire);
    if index == MAX_DISKS {
        return Err(AttachError::TooMany);
    }
    let mut driver = Driver::new(transport).map_err(AttachError::Driver)?;
    let mut requests = Requests::new(driver.capacity());
    let mut id = [0u8; SERIAL_LEN];
    requests
        .run(&mut driver, 0, Transfer::Serial(&mut id))
        .map_err(AttachError::Driver)?;
    let len = id.iter().position(|&b| b == 0).unwrap_or(SERIAL_LEN);
    let info = DiskInfo {
        index,
        serial: Serial {
            bytes: id,
            len: len as u8,
        },
        size: driver.sectors().saturating_mul(SECTOR as u64),
        read_only: driver.read_only(),
    };
    *SLOTS[index].lock() = Some(Attached {
        driver,
        requests,
        info,
    });
    COUNT.store(index + 1, Ordering::Release);
    Ok(index)
}

/// Number of disks.
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire)
}

/// The disk at `index`, if there is one.
pub fn info(index: usize) -> Option<DiskInfo> {
    if index >= count() {
        return None;
    }
    SLOTS[index].lock().as_ref().map(|d| d.info)
}

/// Every disk, in index order.
pub fn disks() -> impl Iterator<Item = DiskInfo> {
    (0..count()).filter_map(info)
}

/// The first disk whose serial is `serial`.
pub fn find(serial: &str) -> Option<DiskInfo> {
    disks().find(|d| d.serial.as_bytes() == serial.as_bytes())
}

fn driver_error(err: virtio_drivers::Error) -> Error {
    match err {
        virtio_drivers::Error::IoError => Error::new(
            ErrorKind::Io,
            "virtio-blk: the device reported an I/O error",
        ),
        virtio_drivers::Error::Unsupported => Error::new(
            ErrorKind::Unsupported,
            "virtio-blk: the device does not support the request",
        ),
        _ => Error::new(ErrorKind::Io, "virtio-blk: driver error"),
    }
}

/// The most requests that were in flight at once on disk `index` (0 for
/// no such disk).
pub fn peak_in_flight(index: usize) -> usize {
    SLOTS.get(index).map_or(0, |slot| {
        slot.lock().as_ref().map_or(0, |disk| disk.requests.peak())
    })
}

/// Whether some disk has split-phase operations in flight or unreported:
/// an engine was left undrained.
pub fn any_busy() -> bool {
    (0..count()).any(|index| {
        SLOTS[index]
            .lock()
            .as_ref()
            .is_some_and(|disk| disk.requests.busy())
    })
}

/// The sector interface of one attached disk: each request waits for its
/// completion (others in flight keep going).
impl SectorIo for Attached {
    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let transfer = Transfer::Read(buf);
        let result = self.requests.run(&mut self.driver, sector, transfer);
        result.map_err(driver_error)
    }

    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
        let transfer = Transfer::Write(buf);
        let result = self.requests.run(&mut self.driver, sector, transfer);
        result.map_err(driver_error)
    }
}

/// A `blockgraph::Device` on one disk: a handle, cheap to create and drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioDisk {
    index: usize,
    writable: bool,
    size: u64,
}

impl VirtioDisk {
    /// A device on disk `index`, writable or not.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for no such disk, [`ErrorKind::ReadOnly`] for
    /// a writable device on a read-only disk.
    pub fn open(index: usize, writable: bool) -> Result<Self> {
        let info = info(index).ok_or(Error::new(ErrorKind::NotFound, "no such disk"))?;
        if writable && info.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "the disk is read-only"));
        }
        Ok(Self {
            index,
            writable,
            size: info.size,
        })
    }

    /// A device on the disk whose serial is `serial`.
    ///
    /// # Errors
    /// As [`VirtioDisk::open`]; [`ErrorKind::NotFound`] when no disk has
    /// that serial.
    pub fn by_serial(serial: &str, writable: bool) -> Result<Self> {
        let info =
            find(serial).ok_or(Error::new(ErrorKind::NotFound, "no disk with that serial"))?;
        Self::open(info.index, writable)
    }

    /// The disk's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs `body` on the disk and its bounce buffer.
    fn with<T>(&self, body: impl FnOnce(&mut Attached, &mut [u8]) -> Result<T>) -> Result<T> {
        let mut slot = SLOTS[self.index].lock();
        let disk = slot
            .as_mut()
            .ok_or(Error::new(ErrorKind::NotFound, "no such disk"))?;
        body(disk, &mut BOUNCE[self.index].lock().0)
    }

    /// Starts `op` as a request in flight; gives it back when it must run
    /// synchronously (see [`Requests::queue`]) or the handle may not
    /// write.
    fn queue(&self, tag: Tag, op: Op<'static>) -> core::result::Result<(), Op<'static>> {
        if !self.writable && !matches!(op, Op::Read { .. }) {
            return Err(op);
        }
        let mut slot = SLOTS[self.index].lock();
        let Some(disk) = slot.as_mut() else {
            return Err(op);
        };
        disk.requests.queue(&mut disk.driver, tag, op)
    }
}

impl Device for VirtioDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size;
        self.with(|disk, bounce| sectors::read_at(disk, bounce, size, offset, buf))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the disk is open read-only",
            ));
        }
        let size = self.size;
        self.with(|disk, bounce| sectors::write_at(disk, bounce, size, offset, buf))
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(()); // nothing was written through this device
        }
        self.with(|disk, _| {
            let result = disk.requests.run(&mut disk.driver, 0, Transfer::Flush);
            result.map_err(driver_error)
        })
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn identity(&self) -> DeviceId {
        DeviceId(0, self.index as u64)
    }
}

/// Split-phase access for the request engine (`bench -d`): whole-sector
/// reads and writes (and flushes) go in flight, up to the disk's ring (42
/// requests with QEMU's defaults); the rest completes in `submit`.
///
/// Only for `'static` buffers: the device reads and writes them by DMA
/// until the request completes, whatever becomes of a borrow, and the
/// handle is `Copy` (it cannot wait in `Drop`).
impl Queue<'static> for VirtioDisk {
    fn submit(&mut self, tag: Tag, op: Op<'static>) -> Submitted<'static> {
        match self.queue(tag, op) {
            Ok(()) => Submitted::Queued,
            Err(op) => {
                let (result, buf) = perform(self, op);
                Submitted::Done(result, buf)
            }
        }
    }

    fn poll(&mut self, done: Completion<'_, 'static>) {
        if let Some(disk) = SLOTS[self.index].lock().as_mut() {
            disk.requests.reap(&mut disk.driver);
        }
        loop {
            let next = {
                let mut slot = SLOTS[self.index].lock();
                slot.as_mut().and_then(|disk| disk.requests.take())
            };
            // Reported without the disk locked: `done` may use the disk.
            let Some((tag, result, buf)) = next else {
                return;
            };
            done(tag, result.map_err(driver_error), buf);
        }
    }

    fn busy(&self) -> bool {
        SLOTS[self.index]
            .lock()
            .as_ref()
            .is_some_and(|disk| disk.requests.busy())
    }
}

/// Resolves image names as disk serials: the kernel's [`Resolver`].
///
/// All disks share one flat namespace, so a backing reference stored in an
/// image resolves to the disk whose serial is the reference's file name (the
/// part after the last `/`): `base.qcow2`, `../images/base.qcow2` and
/// `/srv/base.qcow2` all name the disk `base.qcow2`, which is how
/// `cargo xtask qemu` names disks. New references are written as the bare
/// serial.
#[derive(Clone, Copy, Debug, Default)]
pub struct SerialResolver;

impl Resolver<VirtioDisk> for SerialResolver {
    fn open(&mut self, name: &str, writable: bool) -> Result<VirtioDisk> {
        VirtioDisk::by_serial(name, writable)
    }

    fn open_backing(
        &mut self,
        overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> Result<VirtioDisk> {
        self.resolve_backing(overlay, reference, resolved)?;
        VirtioDisk::by_serial(resolved, writable)
    }

    fn resolve_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        out: &mut NameBuf,
    ) -> Result<()> {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        if name.is_empty() || reference.contains("://") || reference.starts_with("json:") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "backing reference is not a disk name",
            ));
        }
        out.set(name)
    }

    fn reference(&mut self, _overlay: &str, target: &str, out: &mut NameBuf) -> Result<()> {
        out.set(target)
    }
}
