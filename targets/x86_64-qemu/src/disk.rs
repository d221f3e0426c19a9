//! The kernel's disks: a fixed table of virtio-blk devices and
//! [`VirtioDisk`], the `blockgraph::Device` over one of them.
//!
//! The table owns the drivers (`static`, [`MAX_DISKS`] slots, each with a
//! 64 KiB sector-aligned bounce buffer). A [`VirtioDisk`] is a small handle
//! (disk index, access mode), so the graph can hold as many devices on one
//! disk as it opens, and dropping them closes nothing. Disks are known by
//! their virtio serial (QEMU's `-device ...,serial=NAME`, at most 20 bytes),
//! which is how a resolver finds an image by name:
//!
//! ```text
//!  SerialResolver.open("base.qcow2", w) -> disk::find("base.qcow2")
//!                                       -> VirtioDisk::open(index, w)
//! ```
//!
//! Requests of any offset and length are split by [`crate::sectors`]; every
//! request waits for its completion (one core, no interrupts).

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use blockgraph::device::DeviceId;
use blockgraph::graph::NameBuf;
use blockgraph::{Device, Error, ErrorKind, Resolver, Result};
use spin::Mutex;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::SomeTransport;

use crate::sectors::{self, SectorIo, SECTOR};
use crate::virtio::hal::KernelHal;

/// Most disks the kernel attaches.
pub const MAX_DISKS: usize = 8;
/// Bytes of each disk's bounce buffer (unaligned heads and tails).
pub const BOUNCE_LEN: usize = 64 * 1024;
/// Bytes of a virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;

type Blk = VirtIOBlk<KernelHal, SomeTransport<'static>>;

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
    blk: Blk,
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
    /// virtio-drivers refused the device (feature negotiation, queue setup,
    /// DMA pool, the serial request).
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
    let mut blk = Blk::new(transport).map_err(AttachError::Driver)?;
    let mut id = [0u8; SERIAL_LEN];
    let len = blk.device_id(&mut id).map_err(AttachError::Driver)?;
    let len = len.min(SERIAL_LEN);
    id[len..].fill(0);
    let info = DiskInfo {
        index,
        serial: Serial {
            bytes: id,
            len: len as u8,
        },
        size: blk.capacity().saturating_mul(SECTOR as u64),
        read_only: blk.readonly(),
    };
    *SLOTS[index].lock() = Some(Attached { blk, info });
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

/// The sector interface of one attached disk.
struct Sectors<'a>(&'a mut Blk);

impl SectorIo for Sectors<'_> {
    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
        let sector = usize::try_from(sector)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "sector out of range"))?;
        self.0.read_blocks(sector, buf).map_err(driver_error)
    }

    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
        let sector = usize::try_from(sector)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "sector out of range"))?;
        self.0.write_blocks(sector, buf).map_err(driver_error)
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

    /// Runs `body` on the disk's driver and bounce buffer.
    fn with<T>(&self, body: impl FnOnce(&mut Blk, &mut [u8]) -> Result<T>) -> Result<T> {
        let mut slot = SLOTS[self.index].lock();
        let disk = slot
            .as_mut()
            .ok_or(Error::new(ErrorKind::NotFound, "no such disk"))?;
        body(&mut disk.blk, &mut BOUNCE[self.index].lock().0)
    }
}

impl Device for VirtioDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size;
        self.with(|blk, bounce| sectors::read_at(&mut Sectors(blk), bounce, size, offset, buf))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the disk is open read-only",
            ));
        }
        let size = self.size;
        self.with(|blk, bounce| sectors::write_at(&mut Sectors(blk), bounce, size, offset, buf))
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(()); // nothing was written through this device
        }
        self.with(|blk, _| blk.flush().map_err(driver_error))
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn identity(&self) -> DeviceId {
        DeviceId(0, self.index as u64)
    }
}

/// Split-phase access for the request engine (`bench -d`), with the
/// synchronous defaults: every operation completes inside `submit`
/// (virtio-blk's non-blocking calls come later, docs/engine.md).
impl<'b> blockgraph::device::Queue<'b> for VirtioDisk {}

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

fn store(name: &str, out: &mut NameBuf) -> Result<()> {
    out.clear();
    out.push_str(name)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "image name is too long"))
}

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
        store(name, out)
    }

    fn reference(&mut self, _overlay: &str, target: &str, out: &mut NameBuf) -> Result<()> {
        store(target, out)
    }
}
