//! Allocating writes: the clusters one batch of a guest write needs, from
//! the checks before anything is written to the link that maps them.
//!
//! A guest write reaches a qcow2 image in batches of at most [`BATCH`]
//! clusters (the bound of the bookkeeping on the stack):
//! 1. [`Qcow2::check_cluster_write`] for every cluster, then
//!    [`Qcow2::check_replacements`]: nothing is written before the whole
//!    batch is known to go through (R14);
//! 2. [`Qcow2::place_cluster`]: an owned cluster is written in place; any
//!    other gets a new cluster, counted (R1) and recorded in the [`Batch`]
//!    (with extended L2 entries, so does an owned cluster whose subclusters
//!    written hold no data yet: it is filled where it is);
//! 3. the caller fills every new cluster — its bytes and the untouched head
//!    and tail copied from the current guest view, the whole cluster or,
//!    with extended L2 entries, only the subclusters written — before any
//!    is mapped (R2);
//! 4. [`Qcow2::link`] maps them in the metadata cache (R2, R3) and releases
//!    what they replaced once that is durable (R5); a failed batch gives
//!    back what it did not map with [`Qcow2::abandon`] (R14).

use super::{L2Entry, Qcow2, Tables, WriteTarget};
use crate::device::Device;
use crate::error::Result;
use core::ops::Range;

/// Clusters a request allocates and maps together.
pub const BATCH: usize = 64;

/// A cluster allocated for a write, or (extended L2) an owned cluster
/// filled: guest cluster, device offset, the L2 entry it replaces, and
/// the units ([`Layout::unit_bits`](super::Layout::unit_bits)) the write
/// fills.
#[derive(Clone, Copy)]
struct Fresh {
    cluster: u64,
    new: u64,
    old: L2Entry,
    /// First and end unit filled.
    units: (u8, u8),
    /// `new` is the cluster `old` holds already (nothing to give back).
    kept: bool,
}

/// The new clusters of one batch, in fixed storage: each is linked
/// ([`Qcow2::link`]) or given back ([`Qcow2::abandon`]).
#[must_use = "a batch's new clusters must be linked or abandoned"]
pub struct Batch {
    fresh: [Fresh; BATCH],
    count: usize,
    mapped: usize,
}

impl Batch {
    /// A batch with no cluster yet.
    pub const fn new() -> Self {
        let unused = Fresh {
            cluster: 0,
            new: 0,
            old: L2Entry::Unallocated,
            units: (0, 0),
            kept: false,
        };
        Self {
            fresh: [unused; BATCH],
            count: 0,
            mapped: 0,
        }
    }

    /// Empties the batch for reuse in place (its clusters were linked or
    /// abandoned): a batch in fixed storage needs no new one on the stack.
    pub fn clear(&mut self) {
        self.count = 0;
        self.mapped = 0;
    }

    /// The cluster allocated (or filled) for guest `cluster`, if this
    /// batch holds one.
    pub fn fresh_host(&self, cluster: u64) -> Option<u64> {
        self.fresh[..self.count]
            .iter()
            .find(|f| f.cluster == cluster)
            .map(|f| f.new)
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// Where [`Qcow2::place_cluster`] puts a guest cluster's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The image owns it: write at this device offset (the cluster's
    /// start).
    InPlace(u64),
    /// A cluster at device offset `host` (new, or with extended L2 entries
    /// an owned one) whose bytes `fill` (offsets in the cluster, around
    /// those written) must hold the current guest view before the batch
    /// is linked: the untouched head and tail in it are copied.
    Fresh {
        /// The cluster's device offset.
        host: u64,
        /// The bytes of the cluster to fill.
        fill: Range<u64>,
    },
}

impl Qcow2 {
    /// Checks, without writing, one cluster a write of bytes `range` (in
    /// the cluster) touches: its entry valid and its storage releasable,
    /// an owned cluster clear of metadata. Returns the entry a new cluster
    /// will replace, `None` when the cluster is written where it is.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) for a hostile
    /// entry, metadata and device errors.
    pub fn check_cluster_write<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        range: Range<u64>,
    ) -> Result<Option<L2Entry>> {
        self.check_replaceable(t, cluster)?;
        match self.write_target(t, cluster, range)? {
            WriteTarget::InPlace(_) | WriteTarget::Fill { .. } => Ok(None),
            WriteTarget::Allocate { old } => Ok(Some(old)),
        }
    }

    /// Checks, without writing, that a batch replacing `replaced` (one new
    /// cluster each) can go ahead: their storage releasable together, and
    /// room for the new clusters and an L2 table each clear of metadata.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) for hostile
    /// refcounts.
    pub fn check_replacements<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        replaced: &[L2Entry],
    ) -> Result<()> {
        self.check_releases(t, replaced)?;
        // Each allocation may also need a new L2 table.
        self.check_allocatable(t, 2 * replaced.len() as u64)
    }

    /// Where the bytes `range` (in the cluster) of guest `cluster` go: in
    /// place, or into a cluster to fill — a new one allocated now (its
    /// refcount a cached update, R1), or with extended L2 entries the
    /// owned one — recorded in `batch`. A new cluster replacing storage is
    /// filled whole; one replacing none, and an owned one, only in the
    /// units written (standard entries: one unit, the cluster).
    ///
    /// # Errors
    /// [`ErrorKind::NoSpace`](crate::ErrorKind::NoSpace) on a full device,
    /// [`ErrorKind::NoCapacity`](crate::ErrorKind::NoCapacity) when the
    /// batch holds `BATCH` clusters already, metadata errors.
    pub fn place_cluster<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        batch: &mut Batch,
        cluster: u64,
        range: Range<u64>,
    ) -> Result<Placement> {
        let (cs, layout) = (self.cluster_size(), self.layout());
        let written = self.units_of(range.clone());
        let unit_bits = layout.unit_bits();
        let unit_bytes = |units: &Range<u32>| {
            u64::from(units.start) << unit_bits..u64::from(units.end) << unit_bits
        };
        let (old, kept, units, fill) = match self.write_target(t, cluster, range.clone())? {
            WriteTarget::InPlace(host) => return Ok(Placement::InPlace(host)),
            WriteTarget::Fill { host, entry } => {
                // R18: filled in place, no bit maps them yet. Units that
                // hold data already need no copy around the write.
                let mut fill = unit_bytes(&written);
                if entry.allocated(written.start..written.start + 1) {
                    fill.start = range.start;
                }
                if entry.allocated(written.end - 1..written.end) {
                    fill.end = range.end;
                }
                (entry, Some(host), written, fill)
            }
            // What the old entry holds moves whole: its storage, or (a data
            // file's cluster elsewhere than where the new one goes) its data.
            WriteTarget::Allocate { old }
                if old.storage(layout).is_some()
                    || (layout.external && old.holds_data(0..layout.units())) =>
            {
                (old, None, 0..layout.units(), 0..cs)
            }
            WriteTarget::Allocate { old } => (old, None, written.clone(), unit_bytes(&written)),
        };
        if batch.count == BATCH {
            return crate::error::fail(
                crate::ErrorKind::NoCapacity,
                "a write batch holds at most 64 new clusters",
            );
        }
        let in_place = kept.is_some() || layout.external;
        if in_place && self.zeroed_in_place {
            // R18, R19: data zeroed in place since the tables were last
            // made durable may be where this write goes: the disk stops
            // mapping it before the write lands there.
            t.sync()?;
            self.zeroed_in_place = false;
        }
        let slot = &mut batch.fresh[batch.count];
        // An external data file's clusters lie where the guest's do, with
        // no refcount: nothing to allocate (or give back).
        let new = match kept {
            Some(host) => host,
            None if layout.external => cluster * cs,
            None => self.allocate(t)?,
        };
        *slot = Fresh {
            cluster,
            new,
            old,
            units: (units.start as u8, units.end as u8),
            kept: kept.is_some() || layout.external,
        };
        batch.count += 1;
        Ok(Placement::Fresh { host: new, fill })
    }

    /// Maps every new cluster of `batch`, filled by now, in the metadata
    /// cache, which writes the entries back only after a flush has made
    /// the data and the refcounts durable (R2, R3); then, when any of them
    /// replaced storage, makes the new entries durable and releases it
    /// (R5).
    ///
    /// # Errors
    /// Metadata and device errors; the clusters not yet mapped stay for
    /// [`Qcow2::abandon`].
    pub fn link<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        batch: &mut Batch,
    ) -> Result<()> {
        let fresh = &batch.fresh[..batch.count];
        let layout = self.layout();
        for f in &fresh[batch.mapped..] {
            // R18: the entry now: an extended one keeps what the units not
            // written read (nothing else maps the cluster meanwhile: the
            // request engine holds back requests that overlap it).
            let now = match layout.extended {
                true => self.l2_entry(t, f.cluster)?,
                false => f.old,
            };
            let units = u32::from(f.units.0)..u32::from(f.units.1);
            self.set_entry(t, f.cluster, now.written(layout, f.new, units))?;
            batch.mapped += 1;
        }
        let replaced = |f: &&Fresh| !f.kept && f.old.storage(layout).is_some();
        if fresh.iter().any(|f| replaced(&f)) {
            // R5: the new mappings durable before the old storage is freed.
            t.sync()?;
            for f in fresh.iter().filter(replaced) {
                self.release_entry(t, f.old)?;
            }
        }
        Ok(())
    }

    /// Gives back the new clusters of a failed batch that nothing maps
    /// (R14: best effort; a crash here only leaks them). Those it mapped
    /// stay mapped.
    pub fn abandon<D: Device, const S: usize>(&mut self, t: &mut Tables<'_, D, S>, batch: &Batch) {
        for f in batch.fresh[batch.mapped..batch.count]
            .iter()
            .filter(|f| !f.kept)
        {
            let _ = self.release_entry(t, L2Entry::owned(f.new));
        }
    }
}
