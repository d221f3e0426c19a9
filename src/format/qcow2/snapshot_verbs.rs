//! Internal snapshot verbs: creating one (`qemu-img snapshot -c`),
//! deleting one (`-d`) and applying one (`-a`).
//!
//! A snapshot is a copy of the active L1 table plus an entry in the
//! snapshot table; every cluster the active tables use gains one reference
//! (so the next write to it copies it first: its COPIED flag is cleared).
//! Creating keeps the image safe at every point (`docs/crash-ordering.md`,
//! R15): the COPIED flags are cleared and made durable, then the
//! references are counted and made durable (a COPIED flag never stands on
//! a shared cluster); the L1 copy and the new snapshot table (the old
//! entries and the new one) are written to new clusters and made durable;
//! then one header write of `nb_snapshots` and `snapshots_offset` (12
//! bytes, one sector) and a flush commit the snapshot; only then are the
//! old table's clusters freed. A cut before the commit leaves the image's
//! data and snapshots as they were, with leaked references and missing
//! COPIED flags at most (the latter cost a copy-on-write; `qemu-img check`
//! reports both, and `-r all` repairs them).
//!
//! Deleting runs the other way (R16): the new table without the entry is
//! written and made durable, one header write and a flush commit; then
//! the snapshot's references are dropped (its L1 table and the old table
//! freed) and made durable; last, COPIED flags are set again where a
//! cluster is the active tables' alone. A cut after the commit leaves
//! leaks and missing COPIED flags at most.
//!
//! Applying (R17) counts the snapshot's clusters for the active tables,
//! writes a new L1 table (its entries, COPIED off) to new clusters, and
//! switches to it with one header write; then drops the old tables'
//! references and sets COPIED flags again where they hold.

use super::header::{MAX_SNAPSHOTS, MAX_VIRTUAL_SIZE, OFF_NB_SNAPSHOTS, OFF_SIZE};
use super::refcount::CHUNK;
use super::snapshot::{SnapshotPlace, Table, ENTRY_HEADER, MAX_TABLE_BYTES};
use super::{L2Entry, Level, Qcow2, TableKind, Tables, COPIED, OFFSET_MASK};
use core::fmt::Write;

use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};

/// Extra data written with each new entry: the 64-bit VM state size, the
/// disk size and the icount (0), as `qemu-img snapshot -c` writes it.
const EXTRA: usize = 24;

/// One pass of [`Qcow2::walk_active_tables`].
#[derive(Clone, Copy)]
enum Walk {
    /// Clear every COPIED flag of the active L1 and L2 tables.
    ClearCopied,
    /// Add one reference to every cluster they use, tables included.
    AddReferences,
    /// Set the COPIED flag where a data cluster or table has refcount 1.
    SetCopied,
    /// Drop one reference to every cluster they use, tables included.
    DropReferences,
    /// Change nothing: refuse tables and clusters that lie on metadata (a
    /// hostile snapshot), before anything is written.
    Check,
}

impl Qcow2 {
    /// Creates an internal snapshot named `name`, taken at `date` (seconds
    /// and nanoseconds since the Unix epoch), of the image's current
    /// state: module docs. Its ID is one more than the highest numeric ID
    /// in the table, as QEMU picks it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an empty name or one over 65535
    /// bytes; [`ErrorKind::Unsupported`] for 1-bit refcounts (they cannot
    /// count a second reference), an image with an external data file (as
    /// QEMU) or a table that would exceed QEMU's limits; metadata and device errors (the image keeps its snapshots
    /// then, with leaked references at most).
    pub fn create_snapshot<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        name: &str,
        date: (u32, u32),
    ) -> Result<()> {
        if self.header.has_data_file() {
            // As QEMU: a snapshot could not keep the data file's clusters.
            return fail(
                ErrorKind::Unsupported,
                "unsupported: internal snapshots of an image with an external data file",
            );
        }
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return fail(
                ErrorKind::InvalidInput,
                "a snapshot name is 1 to 65535 bytes",
            );
        }
        if self.header.refcount_order == 0 {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: 1-bit refcounts cannot count a snapshot's references",
            );
        }
        if self.header.nb_snapshots >= MAX_SNAPSHOTS {
            return fail(ErrorKind::Unsupported, "unsupported: too many snapshots");
        }
        let id = self.next_snapshot_id(t)?;
        let old = self.snapshots;
        let entry_len = (ENTRY_HEADER + EXTRA + id.len() + name.len()).next_multiple_of(8) as u64;
        let table_bytes = old.bytes + entry_len;
        if table_bytes > MAX_TABLE_BYTES {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: snapshot table too large",
            );
        }
        // R15: the COPIED flags cleared and durable first, then the
        // references counted and durable (the tables are copied below).
        self.walk_active_tables(t, Walk::ClearCopied)?;
        t.sync()?;
        self.walk_active_tables(t, Walk::AddReferences)?;
        t.sync()?;
        let cs = self.cluster_size();
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        let l1_clusters = l1_bytes.div_ceil(cs).max(1);
        let l1_copy = self.allocate_run(t, l1_clusters)?;
        let active = (self.header.l1_table_offset, self.header.l1_size);
        self.copy_l1_table(t, active, (l1_copy, l1_clusters))?;
        let table = self.allocate_run(t, table_bytes.div_ceil(cs))?;
        self.copy_bytes(t, (old.offset, table), old.bytes)?;
        let mut entry = [0u8; ENTRY_HEADER + EXTRA];
        entry[..8].copy_from_slice(&l1_copy.to_be_bytes());
        entry[8..12].copy_from_slice(&self.header.l1_size.to_be_bytes());
        entry[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        entry[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        entry[16..20].copy_from_slice(&date.0.to_be_bytes());
        entry[20..24].copy_from_slice(&date.1.to_be_bytes());
        entry[36..40].copy_from_slice(&(EXTRA as u32).to_be_bytes());
        entry[48..56].copy_from_slice(&self.size().to_be_bytes());
        let at = table + old.bytes;
        t.write_meta(at, &entry)?;
        t.write_meta(at + entry.len() as u64, id.as_bytes())?;
        t.write_meta(at + (entry.len() + id.len()) as u64, name.as_bytes())?;
        let padding = [0u8; 8];
        let written = (entry.len() + id.len() + name.len()) as u64;
        t.write_meta(at + written, &padding[..(entry_len - written) as usize])?;
        // R15: references, COPIED flags, L1 copy and table durable first.
        t.sync()?;
        let new_l1 = (l1_copy, l1_copy + l1_bytes);
        let l1_span = match (old.l1_span, l1_bytes) {
            (span, 0) => span,
            ((0, 0), _) => new_l1,
            ((lo, hi), _) => (lo.min(new_l1.0), hi.max(new_l1.1)),
        };
        self.commit_snapshot_table(
            t,
            Table {
                offset: table,
                count: old.count + 1,
                bytes: table_bytes,
                l1_span,
            },
        )?;
        // R15: the old table's clusters are freed once no header names it.
        self.release_bytes(t, (old.offset, old.bytes))
    }

    /// Deletes the internal snapshot whose ID, else whose name, is
    /// `id_or_name` (the first found, as QEMU finds it): module docs, R16.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when no snapshot has that ID or name;
    /// metadata and device errors (before the commit the snapshot stays;
    /// after it, leaked references and missing COPIED flags at most).
    pub fn delete_snapshot<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        id_or_name: &str,
    ) -> Result<()> {
        let Some((((at, len), (l1, l1_size)), _)) = self.find_snapshot(t, id_or_name)? else {
            return fail(ErrorKind::NotFound, "no snapshot with that ID or name");
        };
        // Its tables are checked before anything is written.
        self.walk_inactive_tables(t, (l1, l1_size), Walk::Check)?;
        let old = self.snapshots;
        let cs = self.cluster_size();
        let bytes = old.bytes - len;
        let table = match bytes {
            0 => 0,
            _ => self.allocate_run(t, bytes.div_ceil(cs))?,
        };
        let before = at - old.offset;
        self.copy_bytes(t, (old.offset, table), before)?;
        self.copy_bytes(t, (at + len, table + before), bytes - before)?;
        // R16: the new table durable, then one header write commits.
        t.sync()?;
        let remaining = Table {
            offset: table,
            count: old.count - 1,
            bytes,
            // Wider than needed at most: the overlap check stays safe.
            l1_span: if bytes == 0 { (0, 0) } else { old.l1_span },
        };
        self.commit_snapshot_table(t, remaining)?;
        // R16: the snapshot's references dropped, then COPIED flags set
        // again where a cluster is the active tables' alone.
        self.walk_inactive_tables(t, (l1, l1_size), Walk::DropReferences)?;
        self.release_bytes(t, (l1, u64::from(l1_size) * 8))?;
        self.release_bytes(t, (old.offset, old.bytes))?;
        t.sync()?;
        self.walk_active_tables(t, Walk::SetCopied)?;
        t.sync()
    }

    /// Reverts the image to the internal snapshot whose ID, else whose
    /// name, is `id_or_name` (`qemu-img snapshot -a`): module docs, R17.
    /// The snapshot stays.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when no snapshot has that ID or name;
    /// [`ErrorKind::Corrupt`] when its L1 table does not cover its virtual
    /// size; metadata and device errors (before the
    /// commit the image is as it was; after it, leaked references and
    /// missing COPIED flags at most).
    pub fn apply_snapshot<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        id_or_name: &str,
    ) -> Result<()> {
        let Some(((_, (l1, l1_size)), disk_size)) = self.find_snapshot(t, id_or_name)? else {
            return fail(ErrorKind::NotFound, "no snapshot with that ID or name");
        };
        // A snapshot of another virtual size takes the image back to it,
        // as QEMU's resize before the apply does; its L1 table covers it
        // (checked, with QEMU's limit).
        let size = disk_size.unwrap_or(self.size());
        let covered = 1u64 << (self.layout().table_bits() + self.header.cluster_bits);
        let needed = size.div_ceil(covered);
        if size > MAX_VIRTUAL_SIZE
            || needed > u64::from(l1_size).max(u64::from(self.header.l1_size))
        {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot's L1 table does not cover its virtual size",
            );
        }
        // Its tables are checked before anything is written.
        self.walk_inactive_tables(t, (l1, l1_size), Walk::Check)?;
        let cs = self.cluster_size();
        // The active tables on the disk are current (read again below).
        t.sync()?;
        // R17: the snapshot's clusters counted for the active tables too.
        self.walk_inactive_tables(t, (l1, l1_size), Walk::AddReferences)?;
        t.sync()?;
        // The new active L1 table: the snapshot's, COPIED flags off (its
        // clusters are shared), zeros up to the image's L1 size (or the
        // snapshot's, when larger).
        let old_l1 = (self.header.l1_table_offset, self.header.l1_size);
        let l1_bytes = u64::from(old_l1.1) * 8;
        let new_size = old_l1.1.max(l1_size);
        let clusters = (u64::from(new_size) * 8).div_ceil(cs).max(1);
        let table = self.allocate_run(t, clusters)?;
        let used = self.copy_l1_table(t, (l1, l1_size), (table, clusters))?;
        t.sync()?;
        // R17: one header write (the virtual size, the crypt method, 0 in
        // any image that opens, the L1 size and offset: 24 bytes in one
        // sector) switches to the new table (as R8).
        let fields = |(size, l1_size, offset): (u64, u32, u64)| {
            let mut bytes = [0u8; 24];
            bytes[..8].copy_from_slice(&size.to_be_bytes());
            bytes[12..16].copy_from_slice(&l1_size.to_be_bytes());
            bytes[16..].copy_from_slice(&offset.to_be_bytes());
            bytes
        };
        let new = fields((size, new_size, table));
        let old = fields((self.size(), old_l1.1, old_l1.0));
        write_header_fields(t.device()?, OFF_SIZE, (&new, &old))?;
        self.header.size = size;
        self.header.l1_size = new_size;
        self.header.l1_table_offset = table;
        self.l1_used = used;
        self.last_l1.set(None);
        // R17: the old active tables' references dropped, then COPIED
        // flags set again where a cluster is the active tables' alone.
        self.walk_inactive_tables(t, old_l1, Walk::DropReferences)?;
        self.release_bytes(t, (old_l1.0, l1_bytes))?;
        t.sync()?;
        self.walk_active_tables(t, Walk::SetCopied)?;
        t.sync()
    }

    /// Writes the L1 table of `entries` entries at device offset `from`
    /// (read from the device as it lies) into the `clusters` new clusters
    /// at `to`, COPIED flags off (what it names is shared from now on) and
    /// zeros after it, so that its clusters exist in the file. Returns one
    /// past the index of its last non-zero entry.
    fn copy_l1_table<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        (from, entries): (u64, u32),
        (to, clusters): (u64, u64),
    ) -> Result<u64> {
        let mut chunk = [0u8; CHUNK];
        let bytes = u64::from(entries) * 8;
        let (mut done, mut used) = (0, 0);
        while done < clusters * self.cluster_size() {
            let n = (clusters * self.cluster_size() - done).min(CHUNK as u64) as usize;
            let present = bytes.saturating_sub(done).min(n as u64) as usize;
            chunk[present..n].fill(0);
            t.device()?.read_at(from + done, &mut chunk[..present])?;
            for (i, raw) in chunk[..present].chunks_exact_mut(8).enumerate() {
                let mut entry = [0u8; 8];
                entry.copy_from_slice(raw);
                let entry = u64::from_be_bytes(entry) & !COPIED;
                raw.copy_from_slice(&entry.to_be_bytes());
                if entry != 0 {
                    used = done / 8 + i as u64 + 1;
                }
            }
            t.write_meta(to + done, &chunk[..n])?;
            done += n as u64;
        }
        Ok(used)
    }

    /// Where the snapshot whose ID, else whose name, is `key` lies: its
    /// entry and its L1 table ([`SnapshotInfo`]'s place).
    fn find_snapshot<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        key: &str,
    ) -> Result<Option<(SnapshotPlace, Option<u64>)>> {
        let (mut by_id, mut by_name) = (None, None);
        self.snapshots.visit(
            |at, bytes| t.device()?.read_at(at, bytes),
            |info| {
                let found = Some((info.place, info.disk_size));
                if by_id.is_none() && info.id == key {
                    by_id = found;
                } else if by_name.is_none() && info.name == key {
                    by_name = found;
                }
                Ok(())
            },
        )?;
        Ok(by_id.or(by_name))
    }

    /// Switches the header to the snapshot table `table` (R15, R16): one
    /// write of `nb_snapshots` and `snapshots_offset` and a flush; when
    /// they fail, the old fields are written back (best effort, as R12)
    /// and nothing in memory changes. Then the in-memory header and table
    /// follow, without reading the disk again.
    fn commit_snapshot_table<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        table: Table,
    ) -> Result<()> {
        let fields = |count: u32, offset: u64| {
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(&count.to_be_bytes());
            bytes[4..].copy_from_slice(&offset.to_be_bytes());
            bytes
        };
        let old = fields(self.header.nb_snapshots, self.header.snapshots_offset);
        let new = fields(table.count, table.offset);
        write_header_fields(t.device()?, OFF_NB_SNAPSHOTS, (&new, &old))?;
        self.header.nb_snapshots = table.count;
        self.header.snapshots_offset = table.offset;
        self.snapshots = table;
        Ok(())
    }

    /// Drops one reference to every cluster of `len` bytes at device
    /// offset `offset` (nothing for none).
    fn release_bytes<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        (offset, len): (u64, u64),
    ) -> Result<()> {
        let cs = self.cluster_size();
        if len > 0 {
            for cluster in offset / cs..(offset + len).div_ceil(cs) {
                self.release_cluster(t, cluster * cs)?;
            }
        }
        Ok(())
    }

    /// The ID a new snapshot gets: one more than the highest numeric ID
    /// in the table (QEMU's `find_new_snapshot_id`).
    fn next_snapshot_id<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<heapless::String<20>> {
        let mut highest = 0u64;
        self.snapshots.visit(
            |at, bytes| t.device()?.read_at(at, bytes),
            |info| {
                highest = highest.max(info.id.parse().unwrap_or(0));
                Ok(())
            },
        )?;
        let mut id = heapless::String::new();
        // Twenty digits hold any u64: the write cannot fail.
        let _ = write!(id, "{}", highest.saturating_add(1));
        Ok(id)
    }

    /// Walks every entry of the active tables ([`Walk`]), changing them in
    /// the cache.
    fn walk_active_tables<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        walk: Walk,
    ) -> Result<()> {
        let cs = self.cluster_size();
        for l1_index in 0..self.l1_used {
            let l1 = self.lookup_l1(t, l1_index)?;
            let table = l1 & OFFSET_MASK;
            if table == 0 {
                continue;
            }
            self.walk_l2_table(t, table, walk)?;
            let at = self.header.l1_table_offset + l1_index * 8;
            match walk {
                Walk::ClearCopied if l1 & COPIED != 0 => {
                    self.update_table(t, at, &(l1 & !COPIED).to_be_bytes(), Level::Mapping)?;
                }
                Walk::SetCopied if l1 & COPIED == 0 && self.refcount(t, table / cs)? == 1 => {
                    self.update_table(t, at, &(l1 | COPIED).to_be_bytes(), Level::Mapping)?;
                }
                Walk::AddReferences | Walk::DropReferences => self.count_table(t, table, walk)?,
                Walk::ClearCopied | Walk::SetCopied | Walk::Check => {}
            }
        }
        Ok(())
    }

    /// The reference to the L2 table at `table` itself, for the walks that
    /// add or drop references (and the check of its place).
    fn count_table<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        table: u64,
        walk: Walk,
    ) -> Result<()> {
        match walk {
            Walk::AddReferences => self.add_reference(t, table / self.cluster_size()),
            Walk::DropReferences => self.release_cluster(t, table),
            Walk::Check => self.check_l2_overlap(t, table),
            Walk::ClearCopied | Walk::SetCopied => Ok(()),
        }
    }

    /// Adds or drops ([`Walk::AddReferences`], [`Walk::DropReferences`])
    /// one reference to every cluster an inactive L1 table of `entries`
    /// entries at device offset `l1` uses, its L2 tables included, or
    /// checks where they lie ([`Walk::Check`]). The L1
    /// table is read from the device as it lies (it need not fill its
    /// clusters), in pieces.
    fn walk_inactive_tables<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        (l1, entries): (u64, u32),
        walk: Walk,
    ) -> Result<()> {
        let mut chunk = [0u8; CHUNK];
        let l1_bytes = u64::from(entries) * 8;
        let mut done = 0;
        while done < l1_bytes {
            let n = (l1_bytes - done).min(CHUNK as u64) as usize;
            t.device()?.read_at(l1 + done, &mut chunk[..n])?;
            done += n as u64;
            for raw in chunk[..n].chunks_exact(8) {
                let mut entry = [0u8; 8];
                entry.copy_from_slice(raw);
                let table = u64::from_be_bytes(entry) & OFFSET_MASK;
                if table == 0 {
                    continue;
                }
                self.walk_l2_table(t, table, walk)?;
                self.count_table(t, table, walk)?;
            }
        }
        Ok(())
    }

    /// [`Walk`]s the entries of the L2 table at device offset `table`.
    fn walk_l2_table<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        table: u64,
        walk: Walk,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let entry_bytes = self.layout().entry_bytes();
        for index in 0..cs / entry_bytes {
            let (raw, bitmap) = self.read_entry_pair(t, TableKind::L2, table, index)?;
            let entry = self.decode_l2(raw, bitmap, t.device_size())?;
            let at = table + index * entry_bytes;
            match walk {
                Walk::ClearCopied if raw & COPIED != 0 => {
                    self.update_table(t, at, &(raw & !COPIED).to_be_bytes(), Level::Mapping)?;
                }
                Walk::ClearCopied => {}
                Walk::AddReferences => {
                    if let Some((start, end)) = entry.storage(self.layout()) {
                        for cluster in (start / cs)..end.div_ceil(cs) {
                            self.add_reference(t, cluster)?;
                        }
                    }
                }
                Walk::DropReferences => self.release_entry(t, entry)?,
                Walk::Check => {
                    if let Some((start, end)) = entry.storage(self.layout()) {
                        self.check_overlap(t, start, end - start)?;
                    }
                }
                Walk::SetCopied => {
                    let owned = match entry {
                        L2Entry::Normal {
                            host,
                            copied: false,
                        }
                        | L2Entry::Zero {
                            host,
                            copied: false,
                        }
                        | L2Entry::Mixed {
                            host,
                            copied: false,
                            ..
                        } => host != 0,
                        _ => false,
                    };
                    if owned && self.refcount(t, (raw & OFFSET_MASK) / cs)? == 1 {
                        let bytes = (raw | COPIED).to_be_bytes();
                        self.update_table(t, at, &bytes, Level::Mapping)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds one to `cluster`'s refcount (cached, R1).
    fn add_reference<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<()> {
        let count = self.refcount(t, cluster)?;
        self.set_refcount(t, cluster, count + 1)
    }

    /// Copies `len` bytes from device offset `from` to `to` (new clusters,
    /// written through the cache's metadata path), in [`CHUNK`] pieces;
    /// bytes past the end of the device read as zeros (QEMU does not pad
    /// the last snapshot entry in the file).
    fn copy_bytes<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        (from, to): (u64, u64),
        len: u64,
    ) -> Result<()> {
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let present = t.device_size().saturating_sub(from + done).min(n as u64) as usize;
            buf[present..n].fill(0);
            t.device()?.read_at(from + done, &mut buf[..present])?;
            t.write_meta(to + done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Writes the 12 header bytes `new` at `at` and flushes: the commit point
/// of a snapshot verb (R15-R17). When that fails, `old` is written back
/// (best effort, as R12: the new bytes may have reached the disk) and the
/// error returned; the caller changes nothing in memory then.
fn write_header_fields<D: Device>(
    device: &mut D,
    at: usize,
    (new, old): (&[u8], &[u8]),
) -> Result<()> {
    let committed = device
        .write_at(at as u64, new)
        .and_then(|()| device.flush());
    if committed.is_err() {
        let _ = device
            .write_at(at as u64, old)
            .and_then(|()| device.flush());
    }
    committed
}
