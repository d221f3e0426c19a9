//! The qcow2 write side: L2 tables and entries, and what a guest write,
//! zero write or discard does to one cluster.
//!
//! [`Qcow2::write_target`] says whether a guest write to a cluster goes in
//! place (an owned data cluster) or needs a new cluster (the batch of
//! `alloc.rs` allocates, the caller fills it, [`Qcow2::link`] maps it);
//! [`Qcow2::set_entry`] points an L2 entry at a cluster in the metadata
//! cache, which writes it back only after a flush (see `format::cache`);
//! what the entry referenced before is released once the change is
//! durable. Zero writes and discards of whole clusters change the entry
//! alone ([`Qcow2::clear_cluster`]).

use super::check::{Piece, TableCheck};
use super::header::{Incompatible, AUTOCLEAR_DATA_FILE_RAW};
use super::refcount::CHUNK;
use super::{entry_words, L2Entry, Level, Qcow2, TableKind, Tables, BATCH, COPIED, OFFSET_MASK};
use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use core::ops::Range;

/// What a guest write to (part of) one cluster needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteTarget {
    /// The cluster is owned (COPIED) and the units written hold its data:
    /// write at this device offset (the cluster's start).
    InPlace(u64),
    /// Extended L2: the cluster at this device offset is owned, but some
    /// subclusters written do not hold its data yet: they are filled
    /// there (copy-on-write of their untouched parts) and then mapped.
    Fill {
        /// The cluster's device offset.
        host: u64,
        /// Its current L2 entry.
        entry: L2Entry,
    },
    /// A new cluster must be allocated; `old` is the current L2 entry.
    Allocate {
        /// The L2 entry being replaced.
        old: L2Entry,
    },
}

/// What a whole-cluster zero write or discard leaves in the L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearMode {
    /// Reads as zeros (the zero flag).
    Zero,
    /// Unallocated: the backing file shows through (or zeros without one).
    Unallocated,
}

/// Where the check before a first write is
/// ([`Qcow2::check_counted_step`]): a walk over the L2 tables, as the L2
/// check's.
pub type UsageCheck = TableCheck;

impl Qcow2 {
    /// Refuses writes to images marked corrupt; before the first write,
    /// checks that the refcounts count every cluster the active L2 tables
    /// use (an image where they do not is marked corrupt, in the header on
    /// v3) and clears unknown autoclear bits (with one header write and a
    /// flush).
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for an image marked corrupt or found so,
    /// device errors.
    pub fn prepare_for_writes<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<()> {
        if self.header.incompatible.contains(Incompatible::CORRUPT) {
            return fail(
                ErrorKind::Corrupt,
                "image is marked corrupt: writes are refused",
            );
        }
        if !self.counted {
            self.check_used_clusters_counted(t)?;
            self.counted = true;
        }
        // R9: the only autoclear feature we maintain is a raw external
        // data file (zeros written into it, never only flagged); the
        // others (e.g. bitmaps) are cleared durably before the first write.
        let kept = self.header.autoclear & AUTOCLEAR_DATA_FILE_RAW;
        let kept = if self.header.has_data_file() { kept } else { 0 };
        if self.header.version >= 3 && self.header.autoclear != kept {
            let device = t.device()?;
            device.write_at(88, &kept.to_be_bytes())?;
            device.flush()?;
            self.header.autoclear = kept;
        }
        Ok(())
    }

    /// Refuses writes when the refcounts call a cluster that the active L2
    /// tables use (data or compressed) free: the allocator would hand it
    /// out again and two guest clusters would share storage. One pass over
    /// the distinct L2 tables (an [`L2Walk`]: each is read once, however
    /// many L1 entries name it), before the first write: all of it here,
    /// or step by step with [`Qcow2::check_counted_step`].
    fn check_used_clusters_counted<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<()> {
        let mut check = UsageCheck::new();
        while !self.check_counted_step(t, &mut check, u64::MAX)? {}
        Ok(())
    }

    /// Whether the check before the first write
    /// ([`Qcow2::prepare_for_writes`]) has run: a write then costs no scan.
    pub fn counted(&self) -> bool {
        self.counted
    }

    /// One step of the check before the first write (the refcounts count
    /// every cluster the active L2 tables use), resumed from `check`:
    /// examines at most about `budget` L1 and L2 entries (4 KiB device
    /// reads, and for each L2 entry that holds data its refcount, through
    /// the metadata cache). Returns `true` once the check is complete; a
    /// first write then goes ahead without it. A VMM runs these steps in
    /// idle time, the request engine between requests, so that no single
    /// call reads every L2 table of a large image. When a cluster in use is
    /// found counted free the image is marked corrupt (the header bit on
    /// v3); nothing else is written. Every L2 entry is checked on the way
    /// as [`Qcow2::check_tables_step`] does, so a completed check completes
    /// that one too.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for a cluster in use counted free or a bad L2
    /// entry, device errors.
    pub fn check_counted_step<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        check: &mut UsageCheck,
        mut budget: u64,
    ) -> Result<bool> {
        if self.counted {
            return Ok(true);
        }
        // The tables are read from the device: bring it up to date first.
        t.write_back()?;
        let layout = self.layout();
        let device_size = t.device_size();
        let mut chunk = [0u8; CHUNK];
        while budget > 0 {
            let n = match self.next_piece(t, check, &mut chunk, &mut budget)? {
                Piece::Entries(n) => n,
                Piece::Walked => continue,
                Piece::Later => return Ok(false),
                Piece::Done => {
                    self.counted = true;
                    self.tables_checked = true;
                    return Ok(true);
                }
            };
            for raw in chunk[..n].chunks_exact(layout.entry_bytes() as usize) {
                let (raw, bitmap) = entry_words(raw);
                // Every entry checked as a lookup decodes it: this check
                // completes the L2 check (`check.rs`) before any write can
                // grow the image under an entry pointing past its end.
                let entry = L2Entry::decode(raw, bitmap, layout, device_size)?;
                self.check_counted(t, entry)?;
            }
            budget = budget.saturating_sub(n as u64 / layout.entry_bytes());
        }
        Ok(false)
    }

    /// Refuses (and marks the image corrupt) when the refcounts call a
    /// cluster that `entry` uses free.
    fn check_counted<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        entry: L2Entry,
    ) -> Result<()> {
        if self.counts_free(t, entry)? {
            self.mark_corrupt(t);
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcounts call a cluster in use free (repair with qemu-img check -r all): writes are refused",
            );
        }
        Ok(())
    }

    /// Whether the refcounts call a cluster of `entry`'s storage free.
    fn counts_free<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        entry: L2Entry,
    ) -> Result<bool> {
        let cs = self.cluster_size();
        let Some((mut cluster, end)) = entry.storage(self.layout()) else {
            return Ok(false);
        };
        while cluster < end {
            if self.refcount(t, cluster / cs)? == 0 {
                return Ok(true);
            }
            cluster += cs;
        }
        Ok(false)
    }

    /// The L1 index and L2 index of guest cluster `cluster`.
    fn indices(&self, cluster: u64) -> (u64, u64) {
        let l2_bits = self.layout().table_bits();
        (cluster >> l2_bits, cluster & ((1 << l2_bits) - 1))
    }

    fn l1_entry<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        l1_index: u64,
    ) -> Result<u64> {
        if l1_index >= u64::from(self.header.l1_size) {
            return fail(
                ErrorKind::InvalidInput,
                "offset beyond the image's L1 table",
            );
        }
        let entry = self.lookup_l1(t, l1_index)?;
        if entry & 0x1ff != 0 {
            return fail(ErrorKind::Corrupt, "qcow2 L1 entry has reserved bits set");
        }
        Ok(entry)
    }

    /// The L2 entry of guest `cluster`, decoded ([`L2Entry::decode`]);
    /// unallocated when its table is absent.
    pub(super) fn l2_entry<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<L2Entry> {
        let (l1_index, l2_index) = self.indices(cluster);
        let table = self.l1_entry(t, l1_index)? & OFFSET_MASK;
        if table == 0 {
            return Ok(L2Entry::Unallocated);
        }
        self.check_offset(t, table, "qcow2 L2 table")?;
        let (raw, bitmap) = self.read_entry_pair(t, TableKind::L2, table, l2_index)?;
        self.decode_l2(raw, bitmap, t.device_size())
    }

    fn check_offset<D: Device, const S: usize>(
        &self,
        t: &Tables<'_, D, S>,
        offset: u64,
        _what: &str,
    ) -> Result<()> {
        if offset & (self.cluster_size() - 1) != 0 || offset >= t.device_size() {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 metadata points outside the image or is unaligned",
            );
        }
        Ok(())
    }

    /// How a guest write to bytes `range` (offsets inside the cluster) of
    /// `cluster` must proceed.
    ///
    /// # Errors
    /// Metadata and device errors.
    pub fn write_target<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        range: Range<u64>,
    ) -> Result<WriteTarget> {
        let (l1_index, _) = self.indices(cluster);
        let l1 = self.l1_entry(t, l1_index)?;
        // Decoded with the same checks as the read path: alignment, bounds.
        let entry = self.l2_entry(t, cluster)?;
        let layout = self.layout();
        match entry.owned_host(layout) {
            Some(host) if l1 & COPIED != 0 => {
                if !layout.external {
                    // Data and metadata share the file: never write over a table.
                    self.check_overlap(t, host, self.cluster_size())?;
                }
                match entry.allocated(self.units_of(range)) {
                    true => Ok(WriteTarget::InPlace(host)),
                    false => Ok(WriteTarget::Fill { host, entry }),
                }
            }
            _ => Ok(WriteTarget::Allocate { old: entry }),
        }
    }

    /// The units ([`Layout::unit_bits`](super::Layout::unit_bits)) of a
    /// cluster that bytes `range` of it touch.
    pub(super) fn units_of(&self, range: Range<u64>) -> Range<u32> {
        let unit_bits = self.layout().unit_bits();
        let unit = 1u64 << unit_bits;
        (range.start >> unit_bits) as u32..range.end.div_ceil(unit) as u32
    }

    /// Points guest `cluster` at `entry` (an owned data cluster, zero, or
    /// unallocated), in the cache: the entry reaches the disk only after
    /// a flush has made the data written so far and the refcounts durable.
    /// The caller releases what the old entry referenced with
    /// [`Qcow2::release_entry`] once the change is durable
    /// ([`Tables::sync`]).
    ///
    /// # Errors
    /// Metadata and device errors; the old entry stays in place then.
    pub fn set_entry<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        entry: L2Entry,
    ) -> Result<()> {
        let at = self.owned_l2_entry(t, cluster)?;
        let layout = self.layout();
        let [raw, bitmap] = entry.raw(layout);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&raw.to_be_bytes());
        bytes[8..].copy_from_slice(&bitmap.to_be_bytes());
        // R2, R3: a cached mapping, written back after data and refcounts;
        // an extended entry and its bitmap in one update (one slice).
        let len = layout.entry_bytes() as usize;
        self.update_table(t, at, &bytes[..len], Level::Mapping)
    }

    /// Maps every guest cluster to the same offset of the image's external
    /// data file (QEMU's metadata preallocation for `data_file_raw`), in
    /// the cache: new L2 tables are written through (R4), the entries
    /// written back later (R3). A data file's clusters need no refcount.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an image without a data file;
    /// metadata and device errors.
    pub fn map_data_file<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<()> {
        if !self.header.has_data_file() {
            return fail(
                ErrorKind::InvalidInput,
                "the image has no external data file",
            );
        }
        let cs = self.cluster_size();
        for cluster in 0..self.size().div_ceil(cs) {
            self.set_entry(t, cluster, L2Entry::owned(cluster * cs))?;
        }
        Ok(())
    }

    /// Stores guest `cluster`, unallocated in this image, as the compressed
    /// `stream` (shorter than a cluster, compressed as the header's
    /// compression type says): right after the previous compressed stream,
    /// spilling into a newly allocated cluster when that one follows on
    /// the device, else at the start of a new one (QEMU's packing). A host
    /// cluster's refcount counts the streams that touch it (each adds one,
    /// as `qemu-img check` counts them). The stream is written before its
    /// entry is cached (R1, R2: refcount, data, then mapping at write-back).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty or too long stream or an
    /// allocated cluster; metadata and device errors.
    #[cfg(feature = "std")]
    pub fn write_compressed<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        stream: &[u8],
    ) -> Result<()> {
        let (cs, len) = (self.cluster_size(), stream.len() as u64);
        if self.header.has_data_file() {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: compressed clusters in an image with an external data file",
            );
        }
        if len == 0 || len >= cs {
            return fail(
                ErrorKind::InvalidInput,
                "a compressed cluster must be shorter than a cluster",
            );
        }
        if self.l2_entry(t, cluster)? != L2Entry::Unallocated {
            return fail(
                ErrorKind::InvalidInput,
                "compressed clusters are written only where nothing is allocated",
            );
        }
        let free = self.compressed_free;
        let host = if free.is_multiple_of(cs) {
            self.allocate(t)?
        } else {
            // Right after the last stream, spilling into a new cluster
            // when that one follows on the device.
            let spills = free % cs + len > cs;
            let next = if spills {
                Some(self.allocate(t)?)
            } else {
                None
            };
            match next {
                Some(next) if next != free.next_multiple_of(cs) => next,
                _ => {
                    let host_cluster = free / cs;
                    let streams = self.refcount(t, host_cluster)?;
                    self.set_refcount(t, host_cluster, streams + 1)?;
                    free
                }
            }
        };
        t.device()?.write_at(host, stream)?;
        self.compressed_free = host + len;
        let sectors = ((host & 511) + len).div_ceil(512);
        let extent = super::CompressedExtent {
            host_offset: host,
            length: sectors * 512 - (host & 511),
        };
        self.set_entry(t, cluster, L2Entry::Compressed(extent))
    }

    /// Points guest `cluster` at `entry` and releases what the old entry
    /// `old` referenced once that is durable.
    ///
    /// # Errors
    /// Metadata and device errors.
    fn map_cluster<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        entry: L2Entry,
        old: L2Entry,
    ) -> Result<()> {
        self.set_entry(t, cluster, entry)?;
        if old.storage(self.layout()).is_some() {
            // R5: the new entry durable before the old storage is freed.
            t.sync()?;
            self.release_entry(t, old)?;
        }
        Ok(())
    }

    /// Makes a whole guest `cluster` read as zeros or unallocated, releasing
    /// its storage; returns the entry it replaced.
    ///
    /// # Errors
    /// Metadata and device errors.
    pub fn clear_cluster<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        mode: ClearMode,
    ) -> Result<L2Entry> {
        let old = self.l2_entry(t, cluster)?;
        let layout = self.layout();
        let entry = match mode {
            // An external data file's cluster stays where it is, as QEMU
            // keeps it (nothing to release: it has no refcount).
            ClearMode::Zero => match old.owned_host(layout).filter(|_| layout.external) {
                Some(host) => L2Entry::Zero { host, copied: true },
                None => L2Entry::Zero {
                    host: 0,
                    copied: false,
                },
            },
            ClearMode::Unallocated => L2Entry::Unallocated,
        };
        if old == entry {
            return Ok(old);
        }
        let (l1_index, _) = self.indices(cluster);
        if entry == L2Entry::Unallocated && self.l1_entry(t, l1_index)? & OFFSET_MASK == 0 {
            return Ok(old);
        }
        self.map_cluster(t, cluster, entry, old)?;
        // R19: an external data file's cluster keeps its place, where a
        // later write fills it in place: not before the disk stops mapping
        // its old data (`Qcow2::place_cluster`).
        self.zeroed_in_place |= layout.external && old.holds_data(0..layout.units());
        Ok(old)
    }

    /// Makes units `units` of guest `cluster` read as zeros with their
    /// zero flags, the cluster's storage kept (extended L2 entries: whole
    /// subclusters of a cluster a zero write covers only in part, as QEMU
    /// zeroes them). Returns `false`, changing nothing, for a compressed
    /// cluster (it has no subclusters: the caller writes zeros instead).
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for a hostile entry, metadata and device
    /// errors.
    pub fn zero_units<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        units: Range<u32>,
    ) -> Result<bool> {
        self.check_replaceable(t, cluster)?;
        let old = self.l2_entry(t, cluster)?;
        match old.zeroed(units.clone()) {
            None => Ok(false),
            Some(entry) if entry == old => Ok(true),
            // R18: a cached mapping; nothing is released. Units that held
            // data stay in the cluster, where a later write may fill them
            // in place: not before the disk stops mapping their old data
            // (`Qcow2::place_cluster`).
            Some(entry) => {
                self.set_entry(t, cluster, entry)?;
                self.zeroed_in_place |= old.holds_data(units);
                Ok(true)
            }
        }
    }

    /// The units of guest `cluster` that its bytes `range` cover whole (a
    /// unit that ends at the virtual size counts as whole).
    pub fn whole_units(&self, cluster: u64, range: Range<u64>) -> Range<u32> {
        let unit_bits = self.layout().unit_bits();
        let unit = 1u64 << unit_bits;
        let ends_image = cluster * self.cluster_size() + range.end == self.size();
        let end = match ends_image {
            true => range.end.div_ceil(unit),
            false => range.end / unit,
        };
        let start = range.start.div_ceil(unit).min(end);
        start as u32..end as u32
    }

    /// Bytes of the unit a zero flag covers: a subcluster with extended L2
    /// entries, else a cluster.
    pub fn unit_size(&self) -> u64 {
        1 << self.layout().unit_bits()
    }

    /// Whether a zero write of whole clusters sets the zero flag (v3)
    /// rather than writing zeros (v2 has no such flag, and a raw external
    /// data file must hold the zeros itself).
    pub fn has_zero_flag(&self) -> bool {
        self.header.version >= 3 && !self.header.data_file_raw()
    }

    /// What a discard leaves in the whole clusters it covers: unallocated
    /// without a backing file; with one, the zero flag (v3), so backing
    /// data never shows through, or nothing on v2, which cannot hide it
    /// (`None`: QEMU ignores the discard). With an external data file
    /// (raw or not) the zero flag, as QEMU: the caller discards the data
    /// there too, so a raw data file stays the guest view.
    pub fn discard_mode(&self, has_backing: bool) -> Option<ClearMode> {
        if self.header.has_data_file() {
            return Some(ClearMode::Zero);
        }
        match (self.has_zero_flag(), has_backing) {
            (_, false) => Some(ClearMode::Unallocated),
            (true, true) => Some(ClearMode::Zero),
            (false, true) => None,
        }
    }

    /// The guest clusters that `offset..offset + len` covers whole (a
    /// cluster that ends at the virtual size counts as whole).
    pub fn whole_clusters(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = self.cluster_size();
        let end = offset.saturating_add(len);
        let last = match end == self.size() {
            true => end.div_ceil(cs),
            false => end / cs,
        };
        offset.div_ceil(cs)..last
    }

    /// Checks, without writing, that every guest cluster of `clusters` may
    /// be cleared ([`Qcow2::clear_cluster`]): each entry valid, and the
    /// storage of each window of `BATCH` clusters releasable together.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for hostile entries or refcounts.
    pub fn check_clears<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        clusters: Range<u64>,
    ) -> Result<()> {
        let mut window = heapless::Vec::<L2Entry, BATCH>::new();
        for cluster in clusters {
            self.check_replaceable(t, cluster)?;
            let entry = self.l2_entry(t, cluster)?;
            if window.push(entry).is_err() {
                self.check_releases(t, &window)?;
                window.clear();
                let _ = window.push(entry);
            }
        }
        self.check_releases(t, &window)
    }

    /// Releases the clusters an L2 entry referenced (nothing for entries
    /// that reference no storage). The entry must no longer be in use,
    /// durably.
    ///
    /// # Errors
    /// Metadata and device errors.
    pub fn release_entry<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        entry: L2Entry,
    ) -> Result<()> {
        let Some((mut cluster, end)) = entry.storage(self.layout()) else {
            return Ok(());
        };
        while cluster < end {
            self.release_cluster(t, cluster)?;
            cluster += self.cluster_size();
        }
        Ok(())
    }

    /// Where this image holds guest bytes from `offset` in place: the
    /// device offset and how many of the `len` bytes follow on from there,
    /// cluster after cluster on the device (`None` when the first cluster
    /// is not written in place).
    ///
    /// # Errors
    /// Metadata errors, and the overlap check of a cluster written in
    /// place.
    pub fn in_place_run<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, u64)>> {
        let cs = self.cluster_size();
        let mut first = None;
        let mut at = offset;
        while at < offset + len {
            let cluster = at / cs;
            let piece = at % cs..(offset + len - cluster * cs).min(cs);
            let WriteTarget::InPlace(host) = self.write_target(t, cluster, piece)? else {
                break;
            };
            let host = host + at % cs;
            match first {
                None => first = Some(host),
                Some(start) if start + (at - offset) == host => {}
                Some(_) => break,
            }
            at = ((cluster + 1) * cs).min(offset + len);
        }
        Ok(first.map(|start| (start, at - offset)))
    }

    /// Checks, without writing, that guest `cluster`'s current entry is
    /// valid and its storage can be released: a request validates every
    /// cluster this way before it changes any.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for a hostile entry or refcount.
    pub fn check_replaceable<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<()> {
        let (l1_index, _) = self.indices(cluster);
        let table = self.l1_entry(t, l1_index)? & OFFSET_MASK;
        if table != 0 {
            self.check_l2_overlap(t, table)?;
        }
        let old = self.l2_entry(t, cluster)?;
        self.check_releasable(t, old)
    }

    /// Refuses when releasing the storage of all of `entries` together would
    /// take a refcount below zero (hostile images alias one cluster from
    /// several entries). Up to 256 distinct clusters are tracked; a larger
    /// set is refused as unsupported.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] on underflow.
    pub fn check_releases<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        entries: &[L2Entry],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let mut uses: heapless::LinearMap<u64, u64, 256> = heapless::LinearMap::new();
        for (mut cluster, end) in entries.iter().filter_map(|e| e.storage(self.layout())) {
            while cluster < end {
                let count = uses.get(&cluster).copied().unwrap_or(0) + 1;
                if uses.insert(cluster, count).is_err() {
                    return fail(
                        ErrorKind::Unsupported,
                        "unsupported: too many clusters released at once",
                    );
                }
                cluster += cs;
            }
        }
        for (&cluster, &count) in uses.iter() {
            if self.refcount(t, cluster / cs)? < count {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 clusters in use have too small a refcount",
                );
            }
        }
        Ok(())
    }

    /// Refuses when the storage of `entry` has a zero refcount (releasing it
    /// would underflow).
    fn check_releasable<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        entry: L2Entry,
    ) -> Result<()> {
        if self.counts_free(t, entry)? {
            return fail(ErrorKind::Corrupt, "qcow2 cluster in use has refcount zero");
        }
        Ok(())
    }

    /// The device offset of `cluster`'s L2 entry in a table this image owns:
    /// a missing table is allocated (zeroed), a shared one (an internal
    /// snapshot's) is copied first. A new table is written through at once;
    /// the L1 entry pointing to it is a cached mapping update, so the table
    /// is durable before the entry reaches the disk. A replaced shared table
    /// is released once the new entry is durable.
    fn owned_l2_entry<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<u64> {
        let (l1_index, l2_index) = self.indices(cluster);
        let l1 = self.l1_entry(t, l1_index)?;
        let table = l1 & OFFSET_MASK;
        if table != 0 {
            self.check_offset(t, table, "qcow2 L2 table")?;
            if l1 & COPIED != 0 {
                self.check_l2_overlap(t, table)?;
                return Ok(table + l2_index * self.layout().entry_bytes());
            }
        }
        let cs = self.cluster_size();
        let new_table = self.allocate(t)?;
        let mut buf = [0u8; CHUNK];
        let chunk = (cs as usize).min(CHUNK);
        let mut done = 0;
        while done < cs {
            if table != 0 {
                t.device()?.read_at(table + done, &mut buf[..chunk])?;
            }
            t.write_meta(new_table + done, &buf[..chunk])?;
            done += chunk as u64;
        }
        // R4: the table is written through before its L1 entry is cached.
        let l1_at = self.header.l1_table_offset + l1_index * 8;
        self.update_table(
            t,
            l1_at,
            &(new_table | COPIED).to_be_bytes(),
            Level::Mapping,
        )?;
        self.l1_used = self.l1_used.max(l1_index + 1);
        if table != 0 {
            // R5: the shared table is released once the new entry is durable.
            t.sync()?;
            self.release_cluster(t, table)?;
        }
        Ok(new_table + l2_index * self.layout().entry_bytes())
    }
}

impl Qcow2 {
    /// Allocates `count` adjacent clusters (refcounts written, not flushed)
    /// and returns the device offset of the first.
    pub(super) fn allocate_run<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        count: u64,
    ) -> Result<u64> {
        let cs = self.cluster_size();
        for _ in 0..8 {
            let first = self.allocate(t)?;
            let mut got = 1;
            while got < count {
                let next = self.allocate(t)?;
                if next != first + got * cs {
                    // A refcount block landed in between: start again after it.
                    for c in 0..got {
                        self.release_cluster(t, first + c * cs)?;
                    }
                    self.release_cluster(t, next)?;
                    self.free_hint = (next / cs).max(self.free_hint);
                    break;
                }
                got += 1;
            }
            if got == count {
                return Ok(first);
            }
        }
        fail(ErrorKind::NoSpace, "no room for adjacent qcow2 clusters")
    }

    /// Grows the virtual size to `new_size` bytes (a smaller size is left
    /// alone). A larger L1 table, when needed, is written and flushed first
    /// and switched in by one header write; then the size field is written.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a size over the format's limits,
    /// metadata and device errors (the image stays valid at its old size).
    pub fn grow<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        new_size: u64,
    ) -> Result<()> {
        if new_size <= self.size() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let coverage = cs / self.layout().entry_bytes() * cs;
        let needed = new_size.div_ceil(coverage);
        if needed > super::header::MAX_L1_ENTRIES || new_size > super::header::MAX_VIRTUAL_SIZE {
            return fail(ErrorKind::InvalidInput, "new size exceeds the qcow2 limits");
        }
        if needed > u64::from(self.header.l1_size) {
            // The old table is copied from the disk: bring it up to date.
            t.write_back()?;
            let old_offset = self.header.l1_table_offset;
            let old_bytes = u64::from(self.header.l1_size) * 8;
            let clusters = (needed * 8).div_ceil(cs);
            let table = self.allocate_run(t, clusters)?;
            let mut buf = [0u8; CHUNK];
            let mut done = 0;
            while done < clusters * cs {
                let n = (clusters * cs - done).min(CHUNK as u64) as usize;
                buf.fill(0);
                let old = old_bytes.saturating_sub(done).min(n as u64) as usize;
                t.device()?.read_at(old_offset + done, &mut buf[..old])?;
                t.write_meta(table + done, &buf[..n])?;
                done += n as u64;
            }
            // R8: the new table's refcounts and contents are durable first,
            // then one header write switches to it.
            t.sync()?;
            let mut fields = [0u8; 12];
            fields[..4].copy_from_slice(&(needed as u32).to_be_bytes());
            fields[4..].copy_from_slice(&table.to_be_bytes());
            let device = t.device()?;
            device.write_at(36, &fields)?;
            device.flush()?;
            self.header.l1_size = needed as u32;
            self.header.l1_table_offset = table;
            self.last_l1.set(None);
            // R5: the old table is durably unreferenced.
            let mut cluster = old_offset;
            while old_bytes > 0 && cluster < old_offset + old_bytes {
                self.release_cluster(t, cluster)?;
                cluster += cs;
            }
        }
        // R8: the size last: a larger L1 table than it needs is valid.
        let device = t.device()?;
        device.write_at(24, &new_size.to_be_bytes())?;
        device.flush()?;
        self.header.size = new_size;
        Ok(())
    }
}
