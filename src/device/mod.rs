//! Protocol layer: the [`Device`] trait that every storage back end implements.
//!
//! A device is a flat array of bytes addressed by byte offset. Format drivers
//! (qcow2, raw) sit on top of a device and never assume any alignment from it:
//! a device whose hardware needs sectors (virtio-blk) handles the read-modify-
//! write itself.
//!
//! Implementations here: [`MemDevice`] (a caller-provided buffer with fault
//! injection, operation counters and a write observer, for tests) and, with the
//! `std` feature, [`FileDevice`] (a host file, with an io_uring queue for
//! split-phase operations).

mod either;
pub use either::Either;

mod memory;
pub use memory::{DeviceEvent, MemDevice};

mod queue;
pub use queue::{perform, Completion, Op, Queue, Reorder, Submitted, Tag, REORDER_DEPTH};

#[cfg(feature = "std")]
mod file;
#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
pub use file::{FileDevice, DIRECT_ALIGN};

use crate::error::Result;
use crate::graph::Access;

/// Identifies the storage behind a device, so two opens of one image compare
/// equal (a host file's device and inode numbers, a disk's index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId(pub u64, pub u64);

/// A byte-addressed storage back end (a protocol node's payload).
///
/// # Example
///
/// A RAM disk of fixed size; only the required methods are written, the
/// others keep their defaults.
///
/// ```
/// use blockgraph::device::{Device, DeviceId};
/// use blockgraph::{Error, ErrorKind, Result};
///
/// struct RamDisk<'a> {
///     bytes: &'a mut [u8],
///     id: u64,
/// }
///
/// impl RamDisk<'_> {
///     /// The bytes of `len` at `offset`, when they lie inside the disk.
///     fn range(&self, offset: u64, len: usize) -> Result<core::ops::Range<usize>> {
///         let start = usize::try_from(offset).ok();
///         match start.and_then(|s| Some(s..s.checked_add(len)?)) {
///             Some(r) if r.end <= self.bytes.len() => Ok(r),
///             _ => Err(Error::new(ErrorKind::Io, "past the end of the RAM disk")),
///         }
///     }
/// }
///
/// impl Device for RamDisk<'_> {
///     fn size(&self) -> u64 {
///         self.bytes.len() as u64
///     }
///     fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
///         let range = self.range(offset, buf.len())?;
///         buf.copy_from_slice(&self.bytes[range]);
///         Ok(())
///     }
///     fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
///         let range = self.range(offset, buf.len())?;
///         self.bytes[range].copy_from_slice(buf);
///         Ok(())
///     }
///     fn flush(&mut self) -> Result<()> {
///         Ok(()) // RAM: every write is as durable as it gets
///     }
///     fn is_read_only(&self) -> bool {
///         false
///     }
///     fn identity(&self) -> DeviceId {
///         DeviceId(0x7261_6d, self.id)
///     }
/// }
///
/// let mut memory = [0u8; 4096];
/// let mut disk = RamDisk { bytes: &mut memory, id: 1 };
/// disk.write_at(512, b"hello")?;
/// let mut back = [0u8; 5];
/// disk.read_at(512, &mut back)?;
/// assert_eq!(&back, b"hello");
/// assert!(disk.read_at(4095, &mut back).is_err());
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub trait Device {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. Reading past [`Device::size`] is an error.
    ///
    /// # Errors
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) when the device fails or the
    /// range lies past its end.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `offset`, growing the device when it can grow.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`](crate::ErrorKind::ReadOnly) on a read-only
    /// device, [`ErrorKind::NoSpace`](crate::ErrorKind::NoSpace) when it cannot
    /// grow that far, [`ErrorKind::Io`](crate::ErrorKind::Io) on failure.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Writes the buffers of `bufs` one after the other from `offset`, as
    /// one write where the back end can (a host file: `pwritev`; the graph
    /// hands a scatter-gather request's pieces down this way, so they need
    /// no bounce copy). The default writes each buffer with
    /// [`Device::write_at`] in turn: the boundaries between buffers become
    /// boundaries between device writes.
    ///
    /// # Errors
    /// As [`Device::write_at`]; on error a prefix of the bytes may have
    /// been written.
    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(at, buf)?;
            at = at.saturating_add(buf.len() as u64);
        }
        Ok(())
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) when the device fails.
    fn flush(&mut self) -> Result<()>;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Which storage this is; equal ids mean the same image.
    fn identity(&self) -> DeviceId;

    /// Tells the device what the graph's users of it now need together
    /// (`access.perm`: the union of their needs) and let others do
    /// (`access.shared`: what all of them share). The graph calls it
    /// whenever that changes, before it uses the new permissions. A device
    /// that other programs can open too (a host file) locks its storage to
    /// match; the default accepts anything.
    ///
    /// # Errors
    /// [`ErrorKind::PermissionConflict`](crate::ErrorKind::PermissionConflict)
    /// when another user of the storage conflicts; the device then keeps
    /// its previous access.
    fn set_access(&mut self, access: Access) -> Result<()> {
        let _ = access;
        Ok(())
    }

    /// Whether [`Device::copy_from`] can ever copy on this device; when not,
    /// callers copy through a buffer without looking for runs to offload.
    /// The default cannot.
    fn can_copy(&self) -> bool {
        false
    }

    /// Copies `len` bytes at `source_offset` of `source` to `offset` of this
    /// device, inside both devices' current size, without passing them
    /// through the caller's memory where the back end can (a host file:
    /// `copy_file_range`). Returns `false`, having written nothing, when it
    /// cannot; the caller then copies through a buffer. The default cannot.
    ///
    /// # Errors
    /// As [`Device::write_at`] and [`Device::read_at`].
    fn copy_from(
        &mut self,
        offset: u64,
        source: &Self,
        source_offset: u64,
        len: u64,
    ) -> Result<bool>
    where
        Self: Sized,
    {
        let _ = (offset, source, source_offset, len);
        Ok(false)
    }
}
