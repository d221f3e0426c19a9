//! Refcounts and cluster allocation.
//!
//! Refcount updates stay in the metadata cache until written back, which
//! always writes refcounts before the flush that precedes any mapping, so a
//! refcount increase is durable before anything points at the new cluster;
//! a reference is removed (and that made durable) before the refcount it
//! held is decreased. A crash can therefore leak a cluster, never hand one
//! out twice. New refcount blocks and tables are written through, each with
//! its own flushes. Rules R1, R5, R6, R7 and R10 of `docs/crash-ordering.md`.

use super::header::{Incompatible, OFF_INCOMPATIBLE};
use super::snapshot::{Entry, ENTRY_HEADER};
use super::{Level, Qcow2, TableKind, Tables, OFFSET_MASK};
use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};

/// Bytes of a table read, copied or zeroed per device call (walking a
/// table, filling whole clusters): the buffer lies on the stack, and small
/// pieces keep each request path's stack small (docs/stack.md).
pub(super) const CHUNK: usize = 1024;

impl Qcow2 {
    fn refcount_bits(&self) -> u64 {
        1 << self.header.refcount_order
    }

    /// Refcount entries in one refcount block.
    fn entries_per_block(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// Entries in the refcount table.
    fn table_len(&self) -> u64 {
        u64::from(self.header.refcount_table_clusters) * self.cluster_size() / 8
    }

    /// The refcount block covering `cluster`, if one is allocated.
    fn block_for<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<Option<u64>> {
        let index = cluster / self.entries_per_block();
        if index >= self.table_len() {
            return Ok(None);
        }
        let entry = self.read_entry(
            t,
            TableKind::Other,
            self.header.refcount_table_offset,
            index,
        )?;
        let block = entry & !0x1ff;
        if block == 0 {
            return Ok(None);
        }
        if block & (self.cluster_size() - 1) != 0 || entry & 0x1ff != 0 {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcount table entry is unaligned",
            );
        }
        if block >= t.device_size() {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcount block lies past the end of the image",
            );
        }
        Ok(Some(block))
    }

    /// Where the refcount of `cluster` sits in `block`: byte offset on the
    /// device, byte count, and bit shift (sub-byte widths).
    fn refcount_position(&self, block: u64, cluster: u64) -> (u64, usize, u32) {
        let bits = self.refcount_bits();
        let bit = (cluster % self.entries_per_block()) * bits;
        let bytes = (bits / 8).max(1) as usize;
        (block + bit / 8, bytes, (bit % 8) as u32)
    }

    /// The refcount of host cluster `cluster` (0 when no block covers it).
    pub(super) fn refcount<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
    ) -> Result<u64> {
        let Some(block) = self.block_for(t, cluster)? else {
            return Ok(0);
        };
        let (at, bytes, shift) = self.refcount_position(block, cluster);
        let mut raw = [0u8; 8];
        self.read_bytes(t, at, &mut raw[..bytes])?;
        Ok(self.decode_refcount(&raw[..bytes], shift))
    }

    fn decode_refcount(&self, raw: &[u8], shift: u32) -> u64 {
        let bits = self.refcount_bits();
        if bits < 8 {
            u64::from(raw[0] >> shift) & ((1 << bits) - 1)
        } else {
            raw.iter().fold(0u64, |v, &b| v << 8 | u64::from(b))
        }
    }

    /// Sets the refcount of `cluster`, which a block must already cover.
    pub(super) fn set_refcount<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        let bits = self.refcount_bits();
        if bits < 64 && value >> bits != 0 {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: refcount would overflow its width",
            );
        }
        let Some(block) = self.block_for(t, cluster)? else {
            return fail(ErrorKind::Corrupt, "qcow2 cluster has no refcount block");
        };
        let (at, bytes, shift) = self.refcount_position(block, cluster);
        let mut raw = [0u8; 8];
        if bits < 8 {
            self.read_bytes(t, at, &mut raw[..1])?;
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            raw[0] = (raw[0] & !mask) | ((value as u8) << shift);
        } else {
            raw[..bytes].copy_from_slice(&value.to_be_bytes()[8 - bytes..]);
        }
        self.update_table(t, at, &raw[..bytes], Level::Refcount)
    }

    /// Reads `out.len()` metadata bytes at `offset` through the cache, from
    /// as many slices as they span.
    fn read_bytes<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let slice_len = self.slice_len();
        let mut done = 0;
        while done < out.len() {
            let pos = offset + done as u64;
            let start = pos / slice_len * slice_len;
            let slice = t.slice(start, slice_len as usize)?;
            let at = (pos - start) as usize;
            let n = (slice_len as usize - at).min(out.len() - done);
            out[done..done + n].copy_from_slice(&slice[at..at + n]);
            done += n;
        }
        Ok(())
    }

    /// Allocates one cluster (refcount 0 -> 1, written but not flushed) and
    /// returns its device offset.
    ///
    /// # Errors
    /// Device errors ([`ErrorKind::NoSpace`] on a full device) and
    /// [`ErrorKind::Corrupt`] for broken refcount structures.
    pub(super) fn allocate<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<u64> {
        loop {
            let cluster = self.find_free(t)?;
            if self.block_for(t, cluster)?.is_some() {
                let offset = cluster << self.header.cluster_bits;
                self.check_overlap(t, offset, self.cluster_size())?;
                // R1: counted (a cached Level::Refcount update) before
                // anything can point at it.
                self.set_refcount(t, cluster, 1)?;
                self.free_hint = cluster + 1;
                return Ok(offset);
            }
            let index = cluster / self.entries_per_block();
            if index >= self.table_len() {
                self.grow_table(t, index)?;
            } else {
                self.add_block(t, index, cluster)?;
            }
        }
    }

    /// Checks, without writing, that the next `count` clusters the allocator
    /// would hand out are clear of metadata (hostile refcounts can call
    /// metadata free): a request refuses before it changes anything.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] when one of them overlaps metadata.
    pub(super) fn check_allocatable<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        count: u64,
    ) -> Result<()> {
        let hint = self.free_hint;
        let mut found = 0;
        let mut result = Ok(());
        while found < count {
            let cluster = match self.find_free(t) {
                Ok(cluster) => cluster,
                Err(err) => {
                    result = Err(err);
                    break;
                }
            };
            if let Err(err) =
                self.check_overlap(t, cluster << self.header.cluster_bits, self.cluster_size())
            {
                result = Err(err);
                break;
            }
            found += 1;
            self.free_hint = cluster + 1;
        }
        self.free_hint = hint;
        result
    }

    /// The first cluster at or after the hint with refcount 0.
    fn find_free<D: Device, const S: usize>(&mut self, t: &mut Tables<'_, D, S>) -> Result<u64> {
        // Clusters past the end of the image are free unless refcounts
        // (hostile ones) claim them: give up after a bounded stretch.
        const PAST_END_LIMIT: u64 = 1 << 16;
        let file_clusters = t.device_size().div_ceil(self.cluster_size());
        let max_cluster =
            ((1u64 << 56) >> self.header.cluster_bits).min(file_clusters + PAST_END_LIMIT);
        let mut cluster = self.free_hint.max(1);
        while cluster < max_cluster {
            if self.refcount(t, cluster)? == 0 {
                self.free_hint = cluster;
                return Ok(cluster);
            }
            cluster += 1;
        }
        fail(
            ErrorKind::Corrupt,
            "qcow2 refcounts claim clusters far past the end of the image",
        )
    }

    /// Places a new refcount block for table entry `index` at the free
    /// cluster `at`, which it covers itself (so it counts its own use).
    fn add_block<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        index: u64,
        at: u64,
    ) -> Result<()> {
        let offset = at << self.header.cluster_bits;
        self.check_overlap(t, offset, self.cluster_size())?;
        let mut first = [0u8; CHUNK];
        let (own, bytes, shift) = self.refcount_position(0, at);
        let mut one = [0u8; 8];
        if self.refcount_bits() < 8 {
            one[0] = 1 << shift;
        } else {
            one[bytes - 1] = 1;
        }
        let slice = (self.cluster_size() as usize).min(CHUNK);
        // The block's own entry may lie in any chunk of the block.
        let own_chunk = own / slice as u64;
        let mut done = 0;
        let mut chunk = 0;
        while done < self.cluster_size() {
            first.fill(0);
            if chunk == own_chunk {
                let at = (own % slice as u64) as usize;
                first[at..at + bytes].copy_from_slice(&one[..bytes]);
            }
            t.write_meta(offset + done, &first[..slice])?;
            done += slice as u64;
            chunk += 1;
        }
        // R6: the block, counting itself, durable before the table names it.
        t.device()?.flush()?;
        let entry_at = self.header.refcount_table_offset + index * 8;
        t.write_meta(entry_at, &offset.to_be_bytes())?;
        self.rt_used = self.rt_used.max(index + 1);
        t.device()?.flush()
    }

    /// Replaces the refcount table by a larger one that covers block
    /// `needed`, placed after the end of the image with the new blocks that
    /// cover it; the header switches to it in one write.
    fn grow_table<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        needed: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let per_block = self.entries_per_block();
        let per_table_cluster = cs / 8;
        let old_len = self.table_len();
        let start = t.device_size().div_ceil(cs).max(self.free_hint);
        // Fixed point: table clusters n and new blocks k for [start, start + n + k).
        let (mut n, mut k) = (0u64, 0u64);
        loop {
            let end = start + n + k;
            let blocks = (needed + 1).max(end.div_ceil(per_block)).max(old_len + 1);
            let new_n = blocks.div_ceil(per_table_cluster);
            let first_block = start / per_block;
            let last_block = (start + new_n + k).div_ceil(per_block);
            let new_k = (first_block..last_block)
                .filter(|&b| b >= old_len || self.table_block(t, b).is_ok_and(|e| e == 0))
                .count() as u64;
            if (new_n, new_k) == (n, k) {
                break;
            }
            (n, k) = (new_n, new_k);
        }
        if n * cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
            // A larger table would make the image one QEMU refuses to open.
            return fail(
                ErrorKind::NoSpace,
                "qcow2 refcount table would grow over 8 MiB",
            );
        }
        let table_at = start * cs;
        self.check_overlap(t, table_at, (n + k) * cs)?;
        let new_blocks_at = start + n;
        // New blocks: refcounts for every new cluster they cover.
        let mut block_index = new_blocks_at;
        let mut placed = [0u64; 64];
        let mut placed_count = 0;
        for b in start / per_block..(start + n + k).div_ceil(per_block) {
            if b < old_len && self.table_block(t, b)? != 0 {
                continue;
            }
            if placed_count == placed.len() {
                return fail(
                    ErrorKind::Unsupported,
                    "unsupported: refcount table growth too large at once",
                );
            }
            placed[placed_count] = b;
            placed_count += 1;
            let block_at = block_index * cs;
            block_index += 1;
            self.write_block_covering(t, block_at, b, start, start + n + k)?;
        }
        // Existing blocks that cover part of the new area count it too.
        for cluster in start..start + n + k {
            let b = cluster / per_block;
            if b < old_len && self.table_block(t, b)? != 0 {
                self.set_refcount(t, cluster, 1)?;
            }
        }
        // The new table: old entries, then the new blocks.
        let mut buf = [0u8; CHUNK];
        let table_bytes = n * cs;
        let mut done = 0;
        let mut new_block_no = 0;
        while done < table_bytes {
            let len = (table_bytes - done).min(CHUNK as u64) as usize;
            buf.fill(0);
            for (i, entry) in buf[..len].chunks_exact_mut(8).enumerate() {
                let index = done / 8 + i as u64;
                let mut value = if index < old_len {
                    self.table_block(t, index)?
                } else {
                    0
                };
                if new_block_no < placed_count && placed[new_block_no] == index {
                    value = (new_blocks_at + new_block_no as u64) * cs;
                    new_block_no += 1;
                }
                entry.copy_from_slice(&value.to_be_bytes());
            }
            t.write_meta(table_at + done, &buf[..len])?;
            done += len as u64;
        }
        // R7: the new table, its blocks and every refcount durable before
        // the switch.
        t.write_back()?;
        t.device()?.flush()?;
        // R7: the switch: offset (8 bytes) and cluster count (4 bytes) in
        // one write, then a flush.
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_at.to_be_bytes());
        let clusters = u32::try_from(n)
            .map_err(|_| crate::Error::new(ErrorKind::NoSpace, "refcount table too large"))?;
        fields[8..].copy_from_slice(&clusters.to_be_bytes());
        let device = t.device()?;
        device.write_at(48, &fields)?;
        device.flush()?;
        self.header.refcount_table_offset = table_at;
        self.header.refcount_table_clusters = clusters;
        self.rt_used = self.rt_used.max(
            placed
                .get(placed_count.wrapping_sub(1))
                .map_or(0, |b| b + 1),
        );
        // R5: the old table is durably unreferenced: release its clusters.
        for c in 0..old_clusters {
            self.release_cluster(t, old_offset + c * cs)?;
        }
        Ok(())
    }

    /// The raw offset stored in refcount table entry `index`.
    fn table_block<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        index: u64,
    ) -> Result<u64> {
        Ok(self.read_entry(
            t,
            TableKind::Other,
            self.header.refcount_table_offset,
            index,
        )? & !0x1ff)
    }

    /// Writes a refcount block at `at` for table entry `index`, with refcount
    /// 1 for every cluster of `first..end` it covers.
    fn write_block_covering<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        at: u64,
        index: u64,
        first: u64,
        end: u64,
    ) -> Result<()> {
        let per_block = self.entries_per_block();
        let covered = index * per_block..(index + 1) * per_block;
        let mut buf = [0u8; CHUNK];
        let cs = self.cluster_size();
        let chunk = (cs as usize).min(CHUNK) as u64;
        let mut done = 0;
        while done < cs {
            buf.fill(0);
            for cluster in first.max(covered.start)..end.min(covered.end) {
                let (pos, bytes, shift) = self.refcount_position(0, cluster);
                if (done..done + chunk).contains(&pos) {
                    let i = (pos - done) as usize;
                    if self.refcount_bits() < 8 {
                        buf[i] |= 1 << shift;
                    } else {
                        buf[i + bytes - 1] = 1;
                    }
                }
            }
            t.write_meta(at + done, &buf[..chunk as usize])?;
            done += chunk;
        }
        Ok(())
    }

    /// Drops one reference to the cluster at device offset `offset`. The
    /// caller has made the removal of the reference durable first (R5).
    pub(super) fn release_cluster<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
    ) -> Result<()> {
        let cluster = (offset & OFFSET_MASK) >> self.header.cluster_bits;
        let count = self.refcount(t, cluster)?;
        if count == 0 {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 refcount underflow (cluster already free)",
            );
        }
        self.set_refcount(t, cluster, count - 1)?;
        if count == 1 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Refuses a write of `len` bytes at device offset `offset` that would
    /// land on metadata: the header cluster, the L1 and refcount tables, the
    /// whole snapshot table, any L2 table of the active L1, any refcount
    /// block or any snapshot's (inactive) L1 table (QEMU's default overlap
    /// check). A write to a cluster that existed at open costs one pass
    /// over the used L1 and refcount table entries and, when it falls where
    /// inactive L1 tables lie, over the snapshot table, all through the
    /// cache (each bounded by QEMU's table limits and the file size); a
    /// write past the end of the file at open costs none. Images whose refcounts or mappings point data
    /// at metadata are hostile or corrupt: the write is refused and the image
    /// is treated as corrupt from then on.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] on overlap, metadata and device errors.
    pub(super) fn check_overlap<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        self.check_overlap_with(t, offset, len, true)
    }

    /// [`Self::check_overlap`] for an L2 table about to be written: the
    /// other L2 tables are not checked (the table is one of them).
    pub(super) fn check_l2_overlap<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        self.check_overlap_with(t, offset, cs, false)
    }

    fn check_overlap_with<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        offset: u64,
        len: u64,
        l2_tables: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset.saturating_add(len);
        let hits = |start: u64, bytes: u64| {
            bytes > 0 && start < end && offset < start.saturating_add(bytes)
        };
        let h = &self.header;
        let l1_bytes = (u64::from(h.l1_size) * 8).div_ceil(cs) * cs;
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        let snapshots = self.snapshots;
        let mut overlap = hits(0, cs)
            || hits(h.l1_table_offset, l1_bytes)
            || hits(h.refcount_table_offset, rt_bytes)
            || hits(snapshots.offset, snapshots.bytes.div_ceil(cs) * cs);
        // Clusters that did not exist at open hold only metadata this driver
        // placed and counted: the fixed regions above are all they can hit.
        let trusted = offset >= self.trusted_from * cs;
        let (l1_offset, l1_size) = (h.l1_table_offset, self.l1_used);
        let mut index = 0;
        while l2_tables && !trusted && !overlap && index < l1_size {
            self.table_entries(t, TableKind::Other, (l1_offset, index), |entry, _| {
                index += 1;
                overlap |= hits(
                    entry & OFFSET_MASK,
                    if entry & OFFSET_MASK == 0 { 0 } else { cs },
                );
                !overlap && index < l1_size
            })?;
        }
        let (rt_offset, rt_len) = (self.header.refcount_table_offset, self.rt_used);
        let mut index = 0;
        while !trusted && !overlap && index < rt_len {
            self.table_entries(t, TableKind::Other, (rt_offset, index), |entry, _| {
                index += 1;
                let block = entry & !0x1ff;
                overlap |= hits(block, if block == 0 { 0 } else { cs });
                !overlap && index < rt_len
            })?;
        }
        // Inactive L1 tables (each snapshot's): walk the snapshot table only
        // when the write reaches into the span they occupy.
        let (lo, hi) = snapshots.l1_span;
        if !trusted && !overlap && hits(lo, hi - lo) {
            let mut at = snapshots.offset;
            for _ in 0..snapshots.count {
                let mut raw = [0u8; ENTRY_HEADER];
                self.read_bytes(t, at, &mut raw)?;
                let entry = Entry::parse(&raw, (snapshots.offset, at), cs, t.device_size())?;
                let (l1, l1_len) = entry.l1;
                if hits(l1, l1_len.div_ceil(cs) * cs) {
                    overlap = true;
                    break;
                }
                at = entry.next;
            }
        }
        if overlap {
            self.mark_corrupt(t);
            return fail(
                ErrorKind::Corrupt,
                "qcow2 write would overwrite metadata: image is corrupt",
            );
        }
        Ok(())
    }

    /// Marks the image corrupt: in memory (every later write is refused)
    /// and, on v3, in the header (incompatible bit 1: the 8-byte feature
    /// field written through and flushed), so QEMU and later opens see it
    /// too. v2 has no such bit. Nothing else is written. Best effort: the
    /// caller fails its request as corrupt whether or not the header write
    /// reached the disk.
    pub(super) fn mark_corrupt<D: Device, const S: usize>(&mut self, t: &mut Tables<'_, D, S>) {
        self.header.incompatible |= Incompatible::CORRUPT;
        if self.header.version >= 3 {
            // R10: the feature field alone, written through and flushed.
            let bits = self.header.incompatible.bits().to_be_bytes();
            let _ = t
                .write_meta(OFF_INCOMPATIBLE as u64, &bits)
                .and_then(|()| t.device()?.flush());
        }
    }
}
