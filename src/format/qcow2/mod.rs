//! The qcow2 format driver: header, guest-to-host mapping through L1/L2
//! slices (each L2 entry decoded once into an `L2Entry`), compressed
//! clusters, and the backing-reference rewrite.
//!
//! The driver answers one question for the graph: how is a guest range mapped
//! in *this* image ([`Mapping`])? It never calls its backing image; the graph
//! walks the chain.

mod alloc;
mod check;
pub mod create;
pub mod header;
mod inflate;
mod l2;
mod refcount;
mod snapshot;
mod snapshot_verbs;
#[cfg(test)]
pub(crate) mod testimg;
mod walk;
mod write;
mod zstd;

pub(crate) use alloc::{Batch, Placement, BATCH};
pub(crate) use check::TableCheck;
pub use header::Compression;
pub use header::Header;
pub(crate) use inflate::{CompressedExtent, Inflater};
pub(crate) use l2::{L2Entry, Layout};
pub use snapshot::{SnapshotInfo, MAX_SHOWN_NAME};
pub(crate) use write::{ClearMode, UsageCheck, WriteTarget};

use super::cache::{device_at, Image, Level, MetaCache, Owner, SLICE_SIZE};
use crate::graph::place::Place;
use core::cell::Cell;

use super::Mapping;
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use header::{Incompatible, HEADER_AREA};

/// L1/L2 entry bit: refcount is exactly one, writable in place.
const COPIED: u64 = 1 << 63;
/// L2 entry bit: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit (standard clusters): reads as zero.
const ZERO: u64 = 1;
/// The error of a qcow2 node whose device is gone.
const NO_DEVICE: &str = "qcow2 image without device";
/// Bits 9..=55: a table or cluster offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Which table a lookup reads: L2 slices are checked when loaded
/// ([`Tables::l2_slice`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TableKind {
    /// An L2 table.
    L2,
    /// The L1 table, the refcount table or a refcount block.
    Other,
}

/// An open qcow2 image's parsed state (its tables live in the shared cache).
#[derive(Clone, Debug)]
pub struct Qcow2 {
    header: Header,
    /// No cluster below this one is free (allocation scans from here).
    free_hint: u64,
    /// The byte after the last compressed stream written since open, in a
    /// host cluster that may take more (0: none): compressed clusters are
    /// packed as QEMU packs them (`Qcow2::write_compressed`, host only).
    #[cfg(feature = "std")]
    compressed_free: u64,
    /// Clusters from here on did not exist at open: any metadata there was
    /// placed (and counted) by this driver, so their refcounts are trusted.
    trusted_from: u64,
    /// L1 entries past this index are all zero.
    l1_used: u64,
    /// Refcount table entries past this index are all zero.
    rt_used: u64,
    /// The internal snapshot table (validated at open; never changed).
    snapshots: snapshot::Table,
    /// Every cluster the active tables use was found counted (checked once,
    /// before the first write).
    counted: bool,
    /// Every entry of every L2 table the L1 table names was found valid
    /// (by [`Qcow2::check_tables_step`] or the check before the first
    /// write); until then each L2 slice is checked as it is loaded.
    tables_checked: bool,
    /// The L1 entry the last lookup read (index, entry): consecutive
    /// requests mostly share it, and this saves a cache probe per layer.
    /// Cleared by every table update.
    last_l1: Cell<Option<(u64, u64)>>,
    /// Zero writes or discards replaced data that stays in place (zero
    /// bits over allocated subclusters, a data file's cluster zeroed
    /// whole) in the cache only: before a write fills such a place, the
    /// tables are made durable (R18, R19).
    zeroed_in_place: bool,
}

/// What a qcow2 node's metadata work borrows: the shared cache (under the
/// node's key) and the graph's device table, in which the node's own device
/// sits (the cache may need any image's device to write back a slice it
/// evicts).
pub struct Tables<'a, D, const S: usize> {
    cache: &'a mut MetaCache<S>,
    devices: &'a mut [Place<D>],
    image: Image,
}

impl<'a, D: Device, const S: usize> Tables<'a, D, S> {
    /// The tables of the image keyed `owner` whose device is
    /// `devices[device]` and whose data lies on `devices[data]` (`device`,
    /// or an external data file's).
    pub fn new(
        cache: &'a mut MetaCache<S>,
        devices: &'a mut [Place<D>],
        owner: Owner,
        (device, data): (usize, usize),
    ) -> Self {
        Self {
            cache,
            devices,
            image: Image {
                owner,
                device,
                data,
            },
        }
    }

    /// The image's device.
    fn device(&mut self) -> Result<&mut D> {
        device_at(self.devices, self.image.device, NO_DEVICE)
    }

    /// The size of the image's device (0 when it is missing).
    fn device_size(&self) -> u64 {
        self.devices
            .get(self.image.device)
            .and_then(Place::as_ref)
            .map_or(0, Device::size)
    }

    /// The cached slice of `len` bytes at `offset`.
    fn slice(&mut self, offset: u64, len: usize) -> Result<&[u8]> {
        self.cache.slice(self.image, self.devices, offset, len)
    }

    /// The cached L2 table slice of `len` bytes at `offset`, every entry of
    /// it checked ([`L2Entry::decode`]) when it is read from the device: no
    /// entry of a slice that fails is ever used.
    fn l2_slice(&mut self, offset: u64, len: usize, layout: Layout) -> Result<&[u8]> {
        let device_size = self.device_size();
        self.cache
            .slice_checked(self.image, self.devices, offset, len, |slice| {
                check_l2_entries(slice, layout, device_size)
            })
    }

    /// Writes metadata bytes through to the device, then into the cache
    /// (structural changes, ordered by explicit flushes).
    fn write_meta(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.device()?.write_at(offset, bytes)?;
        self.cache.patch(self.image.owner, offset, bytes);
        Ok(())
    }

    /// Changes table bytes at `at`, inside the slice `slice`, in the cache
    /// only (written back in [`Level`] order later).
    fn update(&mut self, slice: (u64, usize), at: u64, bytes: &[u8], level: Level) -> Result<()> {
        self.cache
            .update(self.image, self.devices, slice, at, bytes, level)
    }

    /// Writes the image's dirty slices back (ordered; no final flush).
    ///
    /// # Errors
    /// Device errors (what was not written stays dirty).
    pub fn write_back(&mut self) -> Result<()> {
        self.cache.write_back_image(self.image, self.devices)
    }

    /// Writes the dirty slices back and flushes: everything written so far
    /// is durable (R3; what R5, R7 and R8 wait for).
    ///
    /// # Errors
    /// Device errors.
    pub fn sync(&mut self) -> Result<()> {
        self.write_back()?;
        self.device()?.flush()
    }

    /// Whether the image has table updates not yet written back.
    pub fn is_dirty(&self) -> bool {
        self.cache.is_dirty(self.image.owner)
    }
}

impl Qcow2 {
    /// Reads and validates the image on `device`: the header (with QEMU's
    /// limits: cluster bits 9..=21, L1 table at most 32 MiB, refcount table
    /// at most 8 MiB, at most 65536 snapshots), the snapshot table (each
    /// entry walked once: at most 1 KiB of extra data, inside the file and
    /// the 64 MiB a table may use, its L1 table aligned, at most 32 MiB and
    /// inside the file), and every L1 and refcount table entry. L2 tables
    /// are not read: each L2 slice is checked when the metadata cache first
    /// loads it (every entry: aligned, inside the image), and
    /// [`Qcow2::check_tables_step`] checks them all in bounded steps.
    ///
    /// The cost is bounded by the header and those tables, whatever the
    /// number of L2 tables. With an L1 table of `L1` bytes (at most 32 MiB
    /// and inside the file) and a refcount table of `RT` bytes (at most
    /// 8 MiB), open reads at most `2 * L1 + 2 * RT + 40 * nb_snapshots +
    /// 4 KiB`: each table twice (its entries, then where they point), 40
    /// bytes per snapshot. The whole-image check of the L2 tables reads
    /// each distinct table once (they lie inside the file: at most `F`
    /// bytes of an `F`-byte file), plus the L1 table once per 32768-cluster
    /// window of the file that holds L2 tables; the check before the first
    /// write ([`Qcow2::prepare_for_writes`]) reads the same and one
    /// refcount lookup (through the metadata cache) per used cluster, and
    /// completes the L2 check with it.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] or [`ErrorKind::Unsupported`] for images that
    /// cannot be opened, device errors as returned.
    pub fn open<D: Device>(device: &mut D) -> Result<Self> {
        let header = read_header(device)?;
        let cs = header.cluster_size();
        let snapshots =
            snapshot::Table::check(&header, device.size(), |at, raw| device.read_at(at, raw))?;
        // Every table entry must point inside the image, cluster aligned,
        // with its reserved bits clear: checked once, before any use.
        let l1 = (header.l1_table_offset, u64::from(header.l1_size));
        let l1_used = check_entries(
            device,
            l1,
            OFFSET_MASK | COPIED,
            cs,
            "qcow2 L1 table entry is invalid",
        )?;
        let rt_entries = u64::from(header.refcount_table_clusters) * cs / 8;
        let rt = (header.refcount_table_offset, rt_entries);
        let rt_used = check_entries(
            device,
            rt,
            !0x1ff,
            cs,
            "qcow2 refcount table entry is invalid",
        )?;
        // Refcount blocks and L2 tables must not sit on the header or the
        // tables; every L2 entry must stay inside the image.
        let fixed = [
            (0, cs),
            (
                header.l1_table_offset,
                (u64::from(header.l1_size) * 8).div_ceil(cs) * cs,
            ),
            (
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) * cs,
            ),
            (snapshots.offset, snapshots.bytes.div_ceil(cs) * cs),
        ];
        let on_fixed = |offset: u64| {
            fixed
                .iter()
                .any(|&(at, len)| offset >= at && offset < at + len)
        };
        let (l1_offset, rt_offset) = (header.l1_table_offset, header.refcount_table_offset);
        for (table, count) in [(rt_offset, rt_used), (l1_offset, l1_used)] {
            for_each_entry(device, (table, count), |entry| {
                let offset = entry & OFFSET_MASK;
                if offset != 0 && on_fixed(offset) {
                    return fail(
                        ErrorKind::Corrupt,
                        "qcow2 table points at the header or another table",
                    );
                }
                Ok(())
            })?;
        }
        Ok(Self {
            trusted_from: device.size().div_ceil(cs),
            header,
            free_hint: 0,
            #[cfg(feature = "std")]
            compressed_free: 0,
            l1_used,
            rt_used,
            snapshots,
            counted: false,
            tables_checked: false,
            last_l1: Cell::new(None),
            zeroed_in_place: false,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Calls `visit` with each internal snapshot of the image on `device`,
    /// in table order ([`SnapshotInfo`]).
    ///
    /// # Errors
    /// Device errors, and those of `visit`.
    pub fn visit_snapshots<D: Device>(
        &self,
        device: &mut D,
        visit: impl FnMut(&SnapshotInfo<'_>) -> Result<()>,
    ) -> Result<()> {
        self.snapshots
            .visit(|at, buf| device.read_at(at, buf), visit)
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Whether the dirty bit (stale refcounts) is set.
    pub fn is_dirty(&self) -> bool {
        self.header.incompatible.contains(Incompatible::DIRTY)
    }

    /// Calls `found` with the external data file name the image on
    /// `device` records (read again from its header: a chain change may
    /// have moved it) and returns `true`; `false` without one.
    ///
    /// # Errors
    /// Device and header errors, and those of `found`.
    #[inline(never)] // Stack: the header area, off the caller's frame.
    pub fn data_file_name<D: Device>(
        &self,
        device: &mut D,
        found: impl FnOnce(&str) -> Result<()>,
    ) -> Result<bool> {
        if !self.header.has_data_file() {
            return Ok(false);
        }
        let mut area = [0u8; HEADER_AREA];
        let read = read_header_area(device, &mut area)?;
        let (current, _) = Header::parse(&area[..read], device.size())?;
        match header::data_file_name(&current, &area[..read]) {
            Some(name) => found(name).map(|()| true),
            None => fail(
                ErrorKind::Corrupt,
                "qcow2 external data file name is missing",
            ),
        }
    }

    /// The backing file name stored in the image, if any.
    pub fn backing_name(&self) -> Option<&str> {
        self.header.backing_name.as_deref()
    }

    /// The backing format stored in the image's header extension, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.header.backing_format.as_deref()
    }

    fn slice_len(&self) -> u64 {
        self.cluster_size().min(SLICE_SIZE as u64)
    }

    /// How the image lays out its L2 entries.
    pub(crate) fn layout(&self) -> Layout {
        Layout {
            cluster_bits: self.header.cluster_bits,
            extended: self.header.incompatible.contains(Incompatible::EXTENDED_L2),
            external: self.header.has_data_file(),
        }
    }

    /// Visits the entries of the `kind` table at `table` from `index` to
    /// the end of the cached slice that holds it, while `visit` returns
    /// true: each entry, and for extended L2 entries the subcluster bitmap
    /// (0 otherwise).
    fn table_entries<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        kind: TableKind,
        (table, index): (u64, u64),
        visit: impl FnMut(u64, u64) -> bool,
    ) -> Result<()> {
        let layout = self.layout();
        let entry_bytes = match kind {
            TableKind::L2 => layout.entry_bytes(),
            TableKind::Other => 8,
        };
        let (start, first) = self.slice_of(table, index * entry_bytes);
        let len = self.slice_len() as usize;
        let slice = match kind {
            TableKind::L2 => t.l2_slice(start, len, layout)?,
            TableKind::Other => t.slice(start, len)?,
        };
        visit_entries(&slice[first..], entry_bytes, visit);
        Ok(())
    }

    /// The start of the slice holding byte `byte` of the table at `table`,
    /// and the byte's offset in it.
    fn slice_of(&self, table: u64, byte: u64) -> (u64, usize) {
        // Slice lengths are powers of two: masks instead of divisions (this
        // runs for every layer of every request).
        let slice_len = self.slice_len();
        (
            table + (byte & !(slice_len - 1)),
            (byte & (slice_len - 1)) as usize,
        )
    }

    /// Changes table bytes at `at` (inside one slice) in the cache only,
    /// dirty at `level` until written back.
    fn update_table<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        at: u64,
        bytes: &[u8],
        level: Level,
    ) -> Result<()> {
        self.last_l1.set(None);
        let len = self.slice_len();
        t.update((at / len * len, len as usize), at, bytes, level)
    }

    /// L1 entry `index` for a lookup (the last one read is kept).
    fn lookup_l1<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        index: u64,
    ) -> Result<u64> {
        if let Some((last, entry)) = self.last_l1.get() {
            if last == index {
                return Ok(entry);
            }
        }
        let entry = self.read_entry(t, TableKind::Other, self.header.l1_table_offset, index)?;
        self.last_l1.set(Some((index, entry)));
        Ok(entry)
    }

    /// Entry `index` of the `kind` table at `table`, with its subcluster
    /// bitmap (extended L2 entries; 0 otherwise).
    fn read_entry_pair<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        kind: TableKind,
        table: u64,
        index: u64,
    ) -> Result<(u64, u64)> {
        let mut value = (0, 0);
        self.table_entries(t, kind, (table, index), |entry, bitmap| {
            value = (entry, bitmap);
            false
        })?;
        Ok(value)
    }

    /// Entry `index` of the `kind` table at `table` (for an extended L2
    /// entry, its first 64 bits).
    fn read_entry<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        kind: TableKind,
        table: u64,
        index: u64,
    ) -> Result<u64> {
        Ok(self.read_entry_pair(t, kind, table, index)?.0)
    }

    /// How guest bytes `offset..offset + len` begin in this image: the mapping
    /// of the first byte and the length of the run (at most `len`) that shares
    /// it. `offset` must be below the virtual size.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for entries pointing outside the image or
    /// unaligned, device errors as returned.
    pub fn map<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
        len: u64,
    ) -> Result<(Mapping, u64)> {
        let layout = self.layout();
        let (bits, unit_bits) = (layout.cluster_bits, layout.unit_bits());
        let (l2_bits, unit) = (layout.table_bits(), 1u64 << unit_bits);
        let cluster = offset >> bits;
        let l1_index = cluster >> l2_bits;
        let l2_index = cluster & ((1 << l2_bits) - 1);
        let first_unit = ((offset >> unit_bits) & u64::from(layout.units() - 1)) as u32;
        let in_unit = offset & (unit - 1);
        // Units this request may span inside the current L2 table.
        let table_units =
            (((1 << l2_bits) - l2_index) << (bits - unit_bits)) - u64::from(first_unit);
        let span = ((in_unit + len).div_ceil(unit)).min(table_units);
        let run_len = |units: u64| ((units << unit_bits) - in_unit).min(len);

        if l1_index >= u64::from(self.header.l1_size) {
            return fail(ErrorKind::Corrupt, "qcow2 offset beyond the L1 table");
        }
        let l1_entry = self.lookup_l1(t, l1_index)?;
        let l2_table = l1_entry & OFFSET_MASK;
        if l2_table == 0 {
            return Ok((Mapping::Unallocated, run_len(span)));
        }
        if l2_table & ((1 << bits) - 1) != 0 || l1_entry & 0x1ff != 0 {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 L1 entry is unaligned or has reserved bits set",
            );
        }
        if l2_table >= t.device_size() {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 L2 table lies past the end of the image",
            );
        }

        let device_size = t.device_size();
        let mut first: Option<Mapping> = None;
        let mut units = 0u64;
        let mut error: Option<Error> = None;
        let mut unit_in_entry = first_unit;
        self.table_entries(t, TableKind::L2, (l2_table, l2_index), |raw, bitmap| {
            let entry = match self.decode_l2(raw, bitmap, device_size) {
                Ok(entry) => entry,
                Err(err) => {
                    error = Some(err);
                    return false;
                }
            };
            while unit_in_entry < layout.units() {
                if units == span {
                    return false;
                }
                let (mapping, alike) = entry.mapping_run(layout, unit_in_entry);
                let continues = match (first, mapping) {
                    (None, _) => true,
                    (Some(Mapping::Data(start)), Mapping::Data(next)) => {
                        next == start + (units << unit_bits)
                    }
                    (Some(Mapping::Zero), Mapping::Zero) => true,
                    (Some(Mapping::Unallocated), Mapping::Unallocated) => true,
                    _ => false,
                };
                if !continues {
                    return false;
                }
                first.get_or_insert(mapping);
                units += u64::from(alike);
                unit_in_entry += alike;
                if matches!(mapping, Mapping::Compressed(_)) {
                    return false;
                }
            }
            unit_in_entry = 0;
            true
        })?;
        if let Some(err) = error.filter(|_| units == 0) {
            return Err(err);
        }
        let units = units.min(span);
        match first {
            Some(Mapping::Data(host)) => Ok((Mapping::Data(host + in_unit), run_len(units))),
            Some(mapping) => Ok((mapping, run_len(units))),
            None => fail(ErrorKind::Corrupt, "qcow2 L2 table could not be read"),
        }
    }

    /// L2 entry `raw` (with `bitmap`, when extended) of this image,
    /// checked against a device of `device_size` bytes
    /// ([`L2Entry::decode`]).
    fn decode_l2(&self, raw: u64, bitmap: u64, device_size: u64) -> Result<L2Entry> {
        L2Entry::decode(raw, bitmap, self.layout(), device_size)
    }

    /// Writes `backing` (name, format if recorded) or none as the image's
    /// backing reference into its header on `device`: cluster 0 is rebuilt
    /// and written in one write, then flushed (R11). When the write or the
    /// flush fails, the old header is written back before the error is
    /// returned (R12). The in-memory header is not changed: a chain change
    /// writes every overlay first, then [`Qcow2::adopt_backing`] on each
    /// (or [`Qcow2::restore_backing`] on those written, if one fails).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a name over 1023 bytes,
    /// [`ErrorKind::NoSpace`] when it does not fit in cluster 0 (nothing is
    /// written in either case), device errors as returned.
    pub fn write_backing<D: Device>(
        &self,
        device: &mut D,
        backing: Option<(&str, Option<&str>)>,
    ) -> Result<()> {
        let mut area = [0u8; HEADER_AREA];
        let read = read_header_area(device, &mut area)?;
        let (current, range) = Header::parse(&area[..read], device.size())?;
        let used = header::used_bytes(&current, range);
        let mut out = [0u8; HEADER_AREA];
        let len = header::rebuild_with_backing(&current, &area, &mut out, used, backing)?;
        let committed = device
            .write_at(0, &out[..len])
            .and_then(|()| device.flush());
        if let Err(err) = committed {
            // R12: the new header may have reached the disk: put the old one
            // back (best effort; the caller sees the original error anyway).
            let _ = device
                .write_at(0, &area[..len])
                .and_then(|()| device.flush());
            return Err(err);
        }
        Ok(())
    }

    /// Makes the in-memory header reference `backing`, as
    /// [`Qcow2::write_backing`] wrote it on the device.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a name or format too long (which
    /// [`Qcow2::write_backing`] refused already).
    pub fn adopt_backing(&mut self, backing: Option<(&str, Option<&str>)>) -> Result<()> {
        let too_long = || Error::new(ErrorKind::InvalidInput, "backing name or format too long");
        let Some((name, format)) = backing else {
            self.header.backing_name = None;
            self.header.backing_format = None;
            return Ok(());
        };
        let mut stored = heapless::String::new();
        if let Some(format) = format {
            stored.push_str(format).map_err(|_| too_long())?;
        }
        if name.len() > header::MAX_BACKING_NAME {
            return Err(too_long());
        }
        self.header.set_backing_name(name.as_bytes())?;
        self.header.backing_format = format.map(|_| stored);
        Ok(())
    }

    /// Writes the reference of the in-memory header back into the header
    /// on `device`: undoes a [`Qcow2::write_backing`] not adopted (R12).
    ///
    /// # Errors
    /// As [`Qcow2::write_backing`].
    pub fn restore_backing<D: Device>(&self, device: &mut D) -> Result<()> {
        let format = self.header.backing_format.as_deref();
        let backing = self
            .header
            .backing_name
            .as_deref()
            .map(|name| (name, format));
        self.write_backing(device, backing)
    }
}

/// Calls `visit` on the `entry_bytes`-byte entries of `bytes` (8, or 16
/// for extended L2 entries: the entry and its subcluster bitmap; the
/// bitmap is 0 for 8-byte entries), while it returns true.
fn visit_entries(bytes: &[u8], entry_bytes: u64, mut visit: impl FnMut(u64, u64) -> bool) {
    for chunk in bytes.chunks_exact(entry_bytes as usize) {
        let (raw, bitmap) = entry_words(chunk);
        if !visit(raw, bitmap) {
            break;
        }
    }
}

/// The entry, and for a 16-byte extended entry its subcluster bitmap (0
/// for an 8-byte one), in `bytes`.
fn entry_words(bytes: &[u8]) -> (u64, u64) {
    let word = |at: &[u8]| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&at[..8]);
        u64::from_be_bytes(raw)
    };
    let bitmap = if bytes.len() == 16 {
        word(&bytes[8..])
    } else {
        0
    };
    (word(bytes), bitmap)
}

/// Checks every L2 entry in `bytes` (laid out as `layout` says) as a
/// lookup decodes it ([`L2Entry::decode`]: aligned, inside a device of
/// `device_size` bytes, a valid subcluster bitmap).
///
/// # Errors
/// [`ErrorKind::Corrupt`] for the first entry that fails.
fn check_l2_entries(bytes: &[u8], layout: Layout, device_size: u64) -> Result<()> {
    let mut result = Ok(());
    visit_entries(bytes, layout.entry_bytes(), |raw, bitmap| {
        result = L2Entry::decode(raw, bitmap, layout, device_size).map(|_| ());
        result.is_ok()
    });
    result
}

/// Calls `visit` on each of the `count` 8-byte entries of the table at
/// `table`, read in pieces of [`refcount::CHUNK`] bytes.
fn for_each_entry<D: Device>(
    device: &mut D,
    (table, count): (u64, u64),
    mut visit: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut buf = [0u8; refcount::CHUNK];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(buf.len() as u64 / 8) as usize;
        device.read_at(table + done * 8, &mut buf[..n * 8])?;
        for raw in buf[..n * 8].chunks_exact(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(raw);
            visit(u64::from_be_bytes(bytes))?;
        }
        done += n as u64;
    }
    Ok(())
}

/// Checks the `count` 8-byte entries of the table at `table`: only the bits
/// in `allowed` may be set, and the offset they hold (bits 9..) must be
/// cluster aligned and inside the device. Returns one past the index of the
/// last non-zero entry.
fn check_entries<D: Device>(
    device: &mut D,
    (table, count): (u64, u64),
    allowed: u64,
    cluster_size: u64,
    message: &'static str,
) -> Result<u64> {
    let mut buf = [0u8; refcount::CHUNK];
    let mut done = 0u64;
    let mut used = 0;
    while done < count {
        let n = (count - done).min(buf.len() as u64 / 8) as usize;
        device.read_at(table + done * 8, &mut buf[..n * 8])?;
        for (i, raw) in buf[..n * 8].chunks_exact(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(raw);
            let entry = u64::from_be_bytes(bytes);
            let offset = entry & OFFSET_MASK;
            let bad = entry & !allowed != 0
                || offset & (cluster_size - 1) != 0
                || (offset != 0 && offset >= device.size());
            if bad {
                return fail(ErrorKind::Corrupt, message);
            }
            if entry != 0 {
                used = done + i as u64 + 1;
            }
        }
        done += n as u64;
    }
    Ok(used)
}

/// Reads the leading bytes of the image (up to [`HEADER_AREA`]) into `area`
/// and returns how many were present.
/// Reads and parses the header of the image on `device`, with its backing
/// file name. Not inlined: its 4 KiB buffer is off the stack before
/// [`Qcow2::open`] goes on to check the tables.
#[inline(never)]
fn read_header<D: Device>(device: &mut D) -> Result<Header> {
    let mut area = [0u8; HEADER_AREA];
    let used = read_header_area(device, &mut area)?;
    let (mut header, backing) = Header::parse(&area[..used], device.size())?;
    if let Some((offset, len)) = backing {
        // The parser bounded `len` to MAX_BACKING_NAME (under HEADER_AREA).
        let name = &mut area[..len as usize];
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= device.size() => device.read_at(offset, name)?,
            _ => {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 backing file name lies past the end of the image",
                )
            }
        }
        header.set_backing_name(name)?;
    }
    Ok(header)
}

fn read_header_area<D: Device>(device: &mut D, area: &mut [u8; HEADER_AREA]) -> Result<usize> {
    let used = device.size().min(HEADER_AREA as u64) as usize;
    device.read_at(0, &mut area[..used])?;
    Ok(used)
}

/// Fills `out` with the bytes at `skip..skip + out.len()` of the
/// compressed cluster `extent` on `device`, compressed as `compression`
/// says (zlib through the graph's `inflater`).
///
/// # Errors
/// [`ErrorKind::Corrupt`] for a stream that is invalid or ends early,
/// [`ErrorKind::Unsupported`] for zstd in `no_std` builds, device errors.
pub(crate) fn read_compressed<D: Device>(
    (compression, inflater): (Compression, &mut Inflater),
    device: &mut D,
    extent: CompressedExtent,
    skip: u64,
    out: &mut [u8],
) -> Result<()> {
    match compression {
        Compression::Zlib => inflater.read(device, extent, skip, out),
        Compression::Zstd => zstd::read(device, extent, skip, out),
    }
}
