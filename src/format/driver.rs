//! The driver of a graph node, and the format dispatch: every question the
//! graph asks of a node's format goes through a method here, so the graph
//! never matches on formats itself.
//!
//! A node is a protocol node (a device, no format) or a format node (a raw
//! or qcow2 image over a protocol node).

use super::cache::{device_at, MetaCache};
use super::qcow2::{Qcow2, Tables};
use super::{raw, Format, Mapping, PROBE_BYTES};
use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use crate::graph::place::Place;
use crate::graph::NodeId;

/// What a node is: a device, or an image of a format with that format's
/// state.
// No heap: nodes are stored inline in the graph's fixed pool, so the large
// qcow2 variant cannot be boxed.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Driver {
    /// A protocol node: its device is the graph's.
    Protocol,
    /// A raw image; `probed` when its format was guessed, not named.
    Raw {
        /// The format was probed.
        probed: bool,
    },
    /// A qcow2 image.
    Qcow2(Qcow2),
}

/// The error for a protocol node asked to act as an image.
const NOT_AN_IMAGE: &str = "a protocol node is not an image";

impl Driver {
    /// Opens an image of `format` on `device` (named, not probed). A
    /// writable qcow2 image must not be dirty: refcounts are eager (R1).
    ///
    /// # Errors
    /// The driver's errors for a bad image, [`ErrorKind::Unsupported`] for
    /// a dirty qcow2 image opened read-write.
    pub(crate) fn open<D: Device>(format: Format, device: &mut D, read_only: bool) -> Result<Self> {
        match format {
            Format::Raw => Ok(Driver::Raw { probed: false }),
            Format::Qcow2 => {
                let q = Qcow2::open(device)?;
                // R1: refcounts are eager; a dirty (lazy) image stays read-only.
                if !read_only && q.is_dirty() {
                    return fail(
                        ErrorKind::Unsupported,
                        "unsupported: dirty image (lazy refcounts) cannot be opened read-write; repair it with qemu-img check -r all or open it read-only",
                    );
                }
                Ok(Driver::Qcow2(q))
            }
        }
    }

    /// The image format, `None` for a protocol node.
    pub(crate) fn format(&self) -> Option<Format> {
        match self {
            Driver::Protocol => None,
            Driver::Raw { .. } => Some(Format::Raw),
            Driver::Qcow2(_) => Some(Format::Qcow2),
        }
    }

    /// Whether this is a protocol node.
    pub(crate) fn is_protocol(&self) -> bool {
        matches!(self, Driver::Protocol)
    }

    /// Whether this is a raw image whose format was probed.
    pub(crate) fn is_probed(&self) -> bool {
        matches!(self, Driver::Raw { probed: true })
    }

    /// Records that a raw image's format was probed (nothing for other
    /// nodes).
    pub(crate) fn set_probed(&mut self, probed: bool) {
        if let Driver::Raw { probed: mark } = self {
            *mark = probed;
        }
    }

    /// The qcow2 state.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for any other node.
    pub(crate) fn qcow2(&self) -> Result<&Qcow2> {
        match self {
            Driver::Qcow2(q) => Ok(q),
            _ => fail(ErrorKind::InvalidInput, "node is not a qcow2 image"),
        }
    }

    /// The qcow2 state, to change it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for any other node.
    pub(crate) fn qcow2_mut(&mut self) -> Result<&mut Qcow2> {
        match self {
            Driver::Qcow2(q) => Ok(q),
            _ => fail(ErrorKind::InvalidInput, "node is not a qcow2 image"),
        }
    }

    /// Whether the image stores a backing reference (only qcow2 does).
    pub(crate) fn has_backing_reference(&self) -> bool {
        matches!(self, Driver::Qcow2(_))
    }

    /// Whether the image keeps its data in an external data file.
    pub(crate) fn has_data_file(&self) -> bool {
        self.qcow2().is_ok_and(|q| q.header().has_data_file())
    }

    /// The backing file name and format the image records, if any.
    pub(crate) fn backing_reference(&self) -> Option<(&str, Option<&str>)> {
        let q = self.qcow2().ok()?;
        Some((q.backing_name()?, q.backing_format()))
    }

    /// The allocation unit of the image's own layer: the cluster size for
    /// qcow2, 1 for raw.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node.
    pub(crate) fn cluster_size(&self) -> Result<u64> {
        match self {
            Driver::Qcow2(q) => Ok(q.cluster_size()),
            Driver::Raw { .. } => Ok(1),
            Driver::Protocol => fail(ErrorKind::InvalidInput, NOT_AN_IMAGE),
        }
    }

    /// The virtual size of a node whose device holds `device_size` bytes:
    /// the qcow2 header's, a raw image's device rounded up to whole
    /// 512-byte sectors (as QEMU; the tail reads as zeros), a protocol
    /// node's device size.
    pub(crate) fn size(&self, device_size: u64) -> u64 {
        match self {
            Driver::Qcow2(q) => q.size(),
            Driver::Raw { .. } => device_size.next_multiple_of(512),
            Driver::Protocol => device_size,
        }
    }

    /// How guest bytes `offset..offset + len` of this image begin, and for
    /// how many bytes that holds (see [`Qcow2::map`]); `tables` gives a
    /// qcow2 image its metadata.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node, metadata errors.
    pub(crate) fn map<D: Device, const S: usize>(
        &self,
        tables: ImageTables<'_, D, S>,
        offset: u64,
        len: u64,
    ) -> Result<(Mapping, u64)> {
        match self {
            Driver::Qcow2(q) => q.map(&mut tables.open(), offset, len),
            Driver::Raw { .. } => Ok(raw::map(offset, len)),
            Driver::Protocol => fail(
                ErrorKind::InvalidInput,
                "cannot read a protocol node as an image",
            ),
        }
    }
}

impl Driver {
    /// Makes the image ready for a guest write (qcow2: the checks and
    /// header change before a first write, R9); returns whether it is
    /// qcow2 (written cluster by cluster) rather than raw.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node, qcow2's refusals.
    pub(crate) fn prepare_for_writes<D: Device, const S: usize>(
        &mut self,
        tables: ImageTables<'_, D, S>,
    ) -> Result<bool> {
        match self {
            Driver::Qcow2(q) => {
                // R9: refcounts checked, autoclear cleared before a first write.
                q.prepare_for_writes(&mut tables.open())?;
                Ok(true)
            }
            Driver::Raw { .. } => Ok(false),
            Driver::Protocol => fail(
                ErrorKind::InvalidInput,
                "cannot write a protocol node as an image",
            ),
        }
    }

    /// Where the start of a write of `len` bytes at guest `pos` goes when
    /// it can be written in place, without allocating: the device offset
    /// and how many of the bytes follow on from there on the device
    /// ([`Qcow2::in_place_run`]). `None` when it needs the write path: an
    /// allocation, or the first sector of a probed raw image (whose new
    /// content must be checked).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node, metadata errors and
    /// the overlap check of a cluster written in place.
    pub(crate) fn in_place<D: Device, const S: usize>(
        &mut self,
        tables: ImageTables<'_, D, S>,
        pos: u64,
        len: u64,
    ) -> Result<Option<(u64, u64)>> {
        match self {
            Driver::Raw { probed } => {
                let guarded = *probed && pos < PROBE_BYTES as u64;
                Ok((!guarded).then_some((pos, len)))
            }
            Driver::Qcow2(q) => q.in_place_run(&mut tables.open(), pos, len),
            Driver::Protocol => fail(
                ErrorKind::InvalidInput,
                "cannot write a protocol node as an image",
            ),
        }
    }
}

impl Driver {
    /// Grows the image to a virtual size of at least `size` bytes: qcow2
    /// switches to a larger L1 table first and writes the size last (R8);
    /// a raw image's device gets its last byte written.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node or a size over the
    /// format's limits, metadata and device errors.
    pub(crate) fn grow<D: Device, const S: usize>(
        &mut self,
        tables: ImageTables<'_, D, S>,
        size: u64,
    ) -> Result<()> {
        match self {
            // R8: a larger L1 table switched in first, the size last.
            Driver::Qcow2(q) => q.grow(&mut tables.open(), size),
            Driver::Raw { .. } => {
                let device =
                    device_at(tables.devices, tables.file.index(), "image without device")?;
                match size.checked_sub(1) {
                    Some(last) if last >= device.size() => device.write_at(last, &[0]),
                    _ => Ok(()),
                }
            }
            Driver::Protocol => fail(ErrorKind::InvalidInput, NOT_AN_IMAGE),
        }
    }
}

/// What a format node's metadata lives in: the graph's shared cache and
/// device table, with the node and its file node.
pub(crate) struct ImageTables<'a, D, const S: usize> {
    /// The shared metadata cache.
    pub(crate) cache: &'a mut MetaCache<S>,
    /// The graph's devices.
    pub(crate) devices: &'a mut [Place<D>],
    /// The format node.
    pub(crate) node: NodeId,
    /// Its protocol node.
    pub(crate) file: NodeId,
    /// The protocol node its data lies on: `file`, or its external data
    /// file.
    pub(crate) data: NodeId,
}

impl<'a, D: Device, const S: usize> ImageTables<'a, D, S> {
    /// The node's [`Tables`].
    pub(crate) fn open(self) -> Tables<'a, D, S> {
        let devices = (self.file.index(), self.data.index());
        Tables::new(self.cache, self.devices, self.node.key(), devices)
    }
}
