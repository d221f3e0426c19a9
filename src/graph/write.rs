//! Guest writes, zero writes and discards on a format node.
//!
//! For qcow2 the graph drives each cluster: an owned cluster is written in
//! place; otherwise a new cluster is allocated and filled (the new bytes,
//! and the untouched head and tail copied from the node's *current* guest
//! view — old data, a compressed cluster, zeros or the backing chain — each
//! byte written once), and then mapped in the metadata cache, which writes
//! the mapping back only after a flush has made the data durable. Reading
//! the current view through the graph is what makes copy-on-write right for
//! every kind of old entry.

use super::segments::{piece_len, Segments};
use super::source::{Source, View};
use super::{Graph, NodeId};
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::qcow2::{Batch, ClearMode, L2Entry, Placement, Qcow2, Tables, BATCH};
use crate::format::{probe, Mapping, Probed, PROBE_BYTES};
use crate::graph::place::Place;

/// The stack buffer copies go through when the caller lends no scratch
/// (4 KiB pieces: no smaller, so that no device write is cut inside a
/// 4 KiB block of the guest).
pub(super) const BOUNCE: usize = 4096;
/// Scratch a partly written new cluster is assembled in, when the request
/// brings that much ([`Graph::writev_with_scratch`]); larger clusters are
/// filled piece by piece.
pub(super) const COW_BUFFER: usize = 64 * 1024;
/// Least alignment, in guest offsets, of the boundaries the write path cuts
/// a request at (batches of clusters under 4 KiB end on it too).
const BLOCK: u64 = 4096;

/// Consecutive pieces of a request that lie next to each other on the
/// device: where they start there, which bytes of the request they are,
/// and how many bytes of the node's current view a new cluster at either
/// end copies around them (its untouched head and tail).
#[derive(Clone, Copy, Default)]
struct Run {
    host: u64,
    start: u64,
    len: u64,
    head: u64,
    tail: u64,
}

impl Run {
    /// Whether the piece at device offset `host`, request byte `start`,
    /// continues this run (a run with a copied tail ends there).
    fn extends(self, host: u64, start: u64) -> bool {
        self.len > 0
            && self.tail == 0
            && self.host + self.len == host
            && self.start + self.len == start
    }
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Runs `work` on qcow2 node `id`'s state and metadata tables.
    pub(crate) fn with_qcow2<T>(
        &mut self,
        id: NodeId,
        work: impl FnOnce(&mut Qcow2, &mut Tables<'_, D, CACHE>) -> Result<T>,
    ) -> Result<T> {
        let (driver, tables) = self.driver_and_tables(id)?;
        work(driver.qcow2_mut()?, &mut tables.open())
    }

    /// Checks that guest bytes `offset..offset + len` of `id` may be written.
    fn check_writable(&mut self, id: NodeId, offset: u64, len: u64) -> Result<bool> {
        self.check_range(id, offset, len)?;
        self.prepare_writable(id)
    }

    /// [`Self::check_writable`] without a range: the node is open for
    /// writing and its first-write check has run.
    pub(super) fn prepare_writable(&mut self, id: NodeId) -> Result<bool> {
        if self.nodes.get(id)?.read_only {
            return fail(ErrorKind::ReadOnly, "image is open read-only");
        }
        let (driver, tables) = self.driver_and_tables(id)?;
        driver.prepare_for_writes(tables)
    }

    /// Stores the guest cluster at `offset` (cluster aligned) of qcow2 node
    /// `id`, where nothing is allocated yet, as the compressed `stream`
    /// ([`Qcow2::write_compressed`]: packed as QEMU packs compressed
    /// clusters). For writers of new images (`convert -c`, host only): no
    /// job's dirty bitmap or mirror sees it.
    ///
    /// # Errors
    /// As [`Graph::write`]'s checks; [`ErrorKind::InvalidInput`] for an
    /// unaligned offset, an allocated cluster or a stream not shorter than
    /// a cluster.
    #[cfg(feature = "std")]
    pub(crate) fn write_compressed(
        &mut self,
        id: NodeId,
        offset: u64,
        stream: &[u8],
    ) -> Result<()> {
        let cs = self.cluster_size(id)?;
        if !offset.is_multiple_of(cs) {
            return fail(
                ErrorKind::InvalidInput,
                "a compressed write starts a cluster",
            );
        }
        let len = self.size(id)?.saturating_sub(offset).min(cs);
        self.check_writable(id, offset, len)?;
        self.with_qcow2(id, |q, t| q.write_compressed(t, offset / cs, stream))
    }

    /// Maps every guest cluster of qcow2 node `id`, an image with a raw
    /// external data file, to the same offset of that file
    /// ([`Qcow2::map_data_file`]: QEMU's metadata preallocation for
    /// `data_file_raw`), in the metadata cache.
    ///
    /// # Errors
    /// As [`Graph::write`]'s checks, metadata and device errors.
    pub(crate) fn map_raw_data_file(&mut self, id: NodeId) -> Result<()> {
        self.prepare_writable(id)?;
        self.with_qcow2(id, |q, t| q.map_data_file(t))
    }

    /// One step of the check qcow2 node `id` needs before its first write
    /// (the refcounts count every cluster its L2 tables use, R9):
    /// examines at most about `budget` table entries and returns whether
    /// writes may go ahead without a scan (always, for raw images and once
    /// the check has run). A write runs whatever is left of the check
    /// itself; calling this first, in idle time or between requests (the
    /// request engine does), spreads a large image's scan over many short
    /// calls. One node's check is kept at a time: starting another's starts
    /// over when the first is taken up again.
    ///
    /// # Errors
    /// As [`Graph::write`]'s first-write check: [`ErrorKind::Corrupt`] for
    /// a cluster in use counted free (the image is marked corrupt), device
    /// errors.
    pub fn prepare_writes_step(&mut self, id: NodeId, budget: u64) -> Result<bool> {
        self.kept_check_step(
            id,
            |g| &mut g.usage_check,
            Qcow2::counted,
            |q, t, check| q.check_counted_step(t, check, budget),
        )
    }

    /// Writes guest bytes at `offset` of format node `id` (its own layer;
    /// the backing chain is only read, for copy-on-write): the one-buffer
    /// case of [`Graph::writev`].
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] for a read-only node,
    /// [`ErrorKind::InvalidInput`] for a range outside the image,
    /// [`ErrorKind::NoSpace`] when the device is full (the image stays
    /// consistent; leaked clusters at most), metadata and device errors.
    pub fn write(&mut self, id: NodeId, offset: u64, data: &[u8]) -> Result<()> {
        self.writev(id, offset, &[data])
    }

    /// Writes the concatenation of `segments` (at most [`MAX_SEGMENTS`](super::MAX_SEGMENTS)
    /// buffers, any lengths, empty ones too) at guest `offset` of format
    /// node `id`, as one request: validated whole before any byte is
    /// written, and executed as [`Graph::write`] of one buffer holding the
    /// same bytes would be, without copying the segments anywhere first.
    /// Within the request each byte of the device is written at most once;
    /// a qcow2 cluster the request only partly covers is assembled (or, for
    /// clusters over 64 KiB, copied) with its old head and tail around the
    /// new bytes. Device writes start and end only at the request's ends,
    /// at cluster boundaries, at the boundaries of 64-cluster batches (4
    /// KiB-aligned guest offsets, also for smaller clusters) and, for the
    /// copied head and tail of a large cluster, at 64 KiB boundaries; the
    /// segment boundaries are not among them (the pieces of one run go to
    /// the device in one [`Device::write_vectored_at`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for more than [`MAX_SEGMENTS`](super::MAX_SEGMENTS) segments
    /// (nothing is written), else as [`Graph::write`].
    pub fn writev(&mut self, id: NodeId, offset: u64, segments: &[&[u8]]) -> Result<()> {
        self.writev_with_scratch(id, offset, segments, &mut [])
    }

    /// [`Graph::writev`] with `scratch` for the copy-on-write of a new
    /// cluster the request only partly covers: with a cluster's worth (64
    /// KiB for larger clusters) the cluster is assembled there and written
    /// in one device write; with less, the old head and tail are copied in
    /// pieces of 4 KiB through a buffer on the stack. The bytes written
    /// are the same either way; only the number of device operations
    /// differs.
    ///
    /// # Errors
    /// As [`Graph::writev`].
    pub fn writev_with_scratch(
        &mut self,
        id: NodeId,
        offset: u64,
        segments: &[&[u8]],
        scratch: &mut [u8],
    ) -> Result<()> {
        let data = Segments::new(segments)?;
        self.write_request(id, offset, Source::Data(data), scratch)
    }

    /// Writes `source` at `offset` of format node `id` as one request
    /// (nothing for an empty one); `scratch` carries a view's bytes and,
    /// when it holds [`COW_BUFFER`] bytes, a new cluster's assembly.
    fn write_request(
        &mut self,
        id: NodeId,
        offset: u64,
        source: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        if source.len() == 0 {
            return Ok(());
        }
        let raw = !self.check_writable(id, offset, source.len())?;
        let mirror = self.guest_write_starts(id, offset, source.len());
        match raw {
            true => self.write_raw(id, offset, source, scratch)?,
            false => self.write_source(id, offset, source, scratch)?,
        }
        if let Some(base) = mirror {
            self.mirror_to_base(id, (offset, source.len()), |graph| {
                graph.write_request(base, offset, source, scratch)
            });
        }
        Ok(())
    }

    /// A guest write of `len` bytes at `offset` of `id` starts: an active
    /// commit of `id` marks it dirty, unless it is write-blocking; then
    /// its base is returned, to get the same change
    /// ([`Graph::mirror_to_base`]).
    fn guest_write_starts(&mut self, id: NodeId, offset: u64, len: u64) -> Option<NodeId> {
        let mirror = self.write_blocking_base(id);
        if mirror.is_none() {
            self.note_guest_write(id, offset, len);
        }
        mirror
    }

    /// Write-blocking: `change` makes the commit's base match what a guest
    /// write did to `range` of `id`, before the request completes; when it
    /// fails the range is marked dirty instead, for the job to copy.
    fn mirror_to_base(
        &mut self,
        id: NodeId,
        (offset, len): (u64, u64),
        change: impl FnOnce(&mut Self) -> Result<()>,
    ) {
        if change(self).is_err() {
            self.note_guest_write(id, offset, len);
        }
    }

    /// Writes `source` at `offset` of raw node `id`. On a raw image whose
    /// format was probed, a write into the first [`PROBE_BYTES`] bytes that
    /// would make them probe as another format is refused and nothing is
    /// written (QEMU's rule for probed raw images).
    fn write_raw(
        &mut self,
        id: NodeId,
        offset: u64,
        source: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        let file = self.layer_file(id)?;
        if offset < PROBE_BYTES as u64 && self.is_probed(id)? {
            let device = self.device_mut(file)?;
            let mut first = [0u8; PROBE_BYTES];
            let present = device.size().min(PROBE_BYTES as u64) as usize;
            device.read_at(0, &mut first[..present])?;
            let start = offset as usize;
            let end = offset.saturating_add(source.len()).min(PROBE_BYTES as u64) as usize;
            self.fill_from(
                source.slice(0, (end - start) as u64),
                &mut first[start..end],
            )?;
            if probe(&first[..present.max(end)]) != Probed::Raw {
                return fail(
                    ErrorKind::NotPermitted,
                    "operation not permitted: the write would make this probed raw image look like another image format (name its format, -f raw, to write it)",
                );
            }
        }
        self.put(file, offset, source, scratch)
    }

    /// Copies guest bytes `offset..offset + len` of `source`'s chain into
    /// format node `id`'s own layer at the same offsets: what
    /// [`Graph::write`] of what [`Graph::read`] returns would do. Where a
    /// run of the source is stored data of one layer and `id` holds those
    /// clusters in place, one after the other on its device, the devices
    /// copy it themselves ([`Device::copy_from`]). The rest goes as write
    /// requests of whole clusters of `id` where `scratch` holds less than
    /// one, else of pieces cut as [`piece_len`] cuts them (whole clusters
    /// whenever `scratch` holds a cluster); the bytes are read into
    /// `scratch` as they are written, in pieces whose guest offsets are
    /// multiples of the largest power of two that fits in it (at least 4
    /// KiB-aligned for a scratch of 4 KiB or more). So a new cluster is
    /// filled once: no copied head or tail is written over again.
    ///
    /// # Errors
    /// As [`Graph::read`] and [`Graph::write`]; [`ErrorKind::InvalidInput`]
    /// for an empty `scratch`.
    pub(crate) fn copy_into(
        &mut self,
        id: NodeId,
        source: NodeId,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> Result<()> {
        if scratch.is_empty() {
            return fail(ErrorKind::InvalidInput, "a copy needs a scratch buffer");
        }
        let file = self.data_file(id)?;
        let offloads = self.device_mut(file)?.can_copy();
        let piece = (scratch.len() as u64).max(self.cluster_size(id)?);
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let copied = match offloads {
                true => self.offload(id, source, at, len - done)?,
                false => None,
            };
            done += match copied {
                Some(copied) => copied,
                None => {
                    let n = piece_len(at, len - done, piece);
                    let view = View {
                        node: source,
                        guest: at,
                        len: n,
                    };
                    self.write_request(id, at, Source::View(view), scratch)?;
                    n
                }
            };
        }
        Ok(())
    }

    /// Copies the first run of `offset..offset + len` device to device when
    /// the source stores it as data and `id` holds it in place; returns the
    /// bytes copied, or `None` when nothing was.
    fn offload(
        &mut self,
        id: NodeId,
        source: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        self.check_writable(id, offset, len)?;
        let (located, run) = self.locate(source, offset, len)?;
        let Mapping::Data(source_host) = located.mapping else {
            return Ok(None);
        };
        let (source_file, file) = (self.data_file(located.layer)?, self.data_file(id)?);
        // Not in place (or the first sector of a probed raw image, whose new
        // content the buffered path checks): no offload.
        let (driver, tables) = self.driver_and_tables(id)?;
        let Some((target_host, run)) = driver.in_place(tables, offset, run)? else {
            return Ok(None);
        };
        let Ok([Place::Held(target), Place::Held(from)]) = self
            .devices
            .get_disjoint_mut([file.index(), source_file.index()])
        else {
            return Ok(None);
        };
        if !target.copy_from(target_host, from, source_host, run)? {
            return Ok(None);
        }
        self.note_guest_write(id, offset, run);
        Ok(Some(run))
    }

    /// Writes `source` at `offset` of qcow2 node `id`, in batches of at
    /// most [`BATCH`] clusters. A request of several batches is validated
    /// whole before its first batch is written.
    fn write_source(
        &mut self,
        id: NodeId,
        offset: u64,
        source: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        let len = source.len();
        let first = self.batch_at(id, offset, len)?;
        if first < len {
            self.validate_batches(id, offset, len)?;
        }
        let mut done = 0u64;
        while done < len {
            let n = self.batch_at(id, offset + done, len - done)?;
            self.write_clusters(id, offset + done, source.slice(done, n), scratch)?;
            done += n;
        }
        Ok(())
    }

    /// The bytes of the first batch of a request of `len` bytes at `pos` of
    /// qcow2 node `id`: at most [`BATCH`] clusters, ending at a cluster
    /// boundary that is also a [`BLOCK`] boundary of the guest (a batch of
    /// 64 clusters spans at least 32 KiB).
    pub(super) fn batch_at(&self, id: NodeId, pos: u64, len: u64) -> Result<u64> {
        let cs = self.qcow2(id)?.cluster_size();
        let span = ((pos % cs) + len).div_ceil(cs).min(BATCH as u64);
        let end = pos + (span * cs - pos % cs).min(len);
        if end == pos + len {
            return Ok(len);
        }
        Ok(end / BLOCK * BLOCK - pos)
    }

    /// Validates every batch of a write of `len` bytes at `offset` of qcow2
    /// node `id` ([`Self::validate_clusters`]); nothing is written.
    fn validate_batches(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = self.batch_at(id, offset + done, len - done)?;
            self.validate_clusters(id, offset + done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Checks, without writing anything, that a write of `len` bytes at
    /// `offset` of format node `id` may go ahead as a whole: the range, the
    /// node's permission, and for qcow2 every cluster it touches (valid
    /// entries, storage clear of metadata). Callers that hand one guest
    /// request to [`Graph::write`] in pieces call this first, so a request
    /// that fails is refused before any of its bytes change. (Running out
    /// of space can still stop such a request part way.)
    ///
    /// # Errors
    /// As [`Graph::write`].
    pub fn check_write(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.check_writable(id, offset, len)? {
            self.validate_batches(id, offset, len)?;
        }
        Ok(())
    }

    /// Writes `data` (at most [`BATCH`] clusters) at guest `pos`: owned
    /// clusters in place; for the others, every new cluster is allocated and
    /// filled, then the batch is linked ([`Qcow2::link`]: mapped in the
    /// cache, what it replaced released once durable).
    fn write_clusters(
        &mut self,
        id: NodeId,
        pos: u64,
        data: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        self.validate_clusters(id, pos, data.len())?;
        let mut batch = Batch::new();
        // R2: every new cluster is filled before any of them is mapped.
        let result = self
            .fill_clusters(id, pos, data, scratch, &mut batch)
            .and_then(|()| self.with_qcow2(id, |q, t| q.link(t, &mut batch)));
        if result.is_err() {
            // R14: nothing references the clusters not yet mapped.
            let _ = self.with_qcow2(id, |q, t| {
                q.abandon(t, &batch);
                Ok(())
            });
        }
        result
    }

    /// Checks every cluster `pos..pos + len` touches before anything is
    /// written: valid entries, releasable storage, owned clusters clear of
    /// metadata, and compressed data that copy-on-write will inflate.
    fn validate_clusters(&mut self, id: NodeId, pos: u64, len: u64) -> Result<()> {
        let cs = self.qcow2(id)?.cluster_size();
        let end = pos + len;
        let mut at = pos;
        let mut replaced = heapless::Vec::<L2Entry, BATCH>::new();
        while at < end {
            let cluster = at / cs;
            let piece_end = ((cluster + 1) * cs).min(end);
            let range = at - cluster * cs..piece_end - cluster * cs;
            let old = self.with_qcow2(id, |q, t| q.check_cluster_write(t, cluster, range))?;
            if let Some(old) = old {
                let full = Error::new(ErrorKind::NoCapacity, "more than 64 clusters in a batch");
                replaced.push(old).map_err(|_| full)?;
                if let L2Entry::Compressed(_) = old {
                    self.verify_view(id, cluster * cs, at - cluster * cs)?;
                    self.verify_view(id, piece_end, (cluster + 1) * cs - piece_end)?;
                }
            }
            at = piece_end;
        }
        self.with_qcow2(id, |q, t| q.check_replacements(t, &replaced))
    }

    /// Checks that `len` bytes of `id`'s guest view at `guest`, part of a
    /// compressed cluster, read: reads (and drops) the last of them, which
    /// inflates the cluster's stream from its start through that byte, so
    /// a stream that is corrupt or ends early anywhere before fails here.
    fn verify_view(&mut self, id: NodeId, guest: u64, len: u64) -> Result<()> {
        let readable = self.size(id)?.saturating_sub(guest).min(len);
        if readable == 0 {
            return Ok(());
        }
        self.read(id, guest + readable - 1, &mut [0u8; 1])
    }

    /// Writes owned clusters in place and allocates and fills the others,
    /// recording each allocation in `batch` as soon as it exists.
    /// Pieces that land next to each other on the device go out together
    /// ([`Self::write_run`]), with the copied head and tail of a new
    /// cluster the batch only partly covers (only its first and last
    /// clusters can be).
    fn fill_clusters(
        &mut self,
        id: NodeId,
        pos: u64,
        data: Source<'_>,
        scratch: &mut [u8],
        batch: &mut Batch,
    ) -> Result<()> {
        let cs = self.qcow2(id)?.cluster_size();
        // Pieces not yet written.
        let mut run = Run::default();
        let mut done = 0u64;
        while done < data.len() {
            let at = pos + done;
            let (cluster, in_cluster) = (at / cs, at % cs);
            let len = (cs - in_cluster).min(data.len() - done);
            let range = in_cluster..in_cluster + len;
            let placed = self.with_qcow2(id, |q, t| q.place_cluster(t, batch, cluster, range))?;
            let (host, head, tail) = match placed {
                Placement::InPlace(host) => (host + in_cluster, 0, 0),
                Placement::Fresh { host, fill } => (
                    host + in_cluster,
                    in_cluster - fill.start,
                    fill.end - in_cluster - len,
                ),
            };
            if head > 0 || !run.extends(host, done) {
                self.write_run(id, pos, run, data, scratch)?;
                run = Run {
                    host,
                    start: done,
                    head,
                    ..Run::default()
                };
            }
            run.len += len;
            run.tail = tail;
            done += len;
        }
        self.write_run(id, pos, run, data, scratch)
    }

    /// Writes `run` (nothing for an empty one) of the batch `data` at guest
    /// `pos` of `id`: the bytes of `data` alone as one write; with a copied
    /// head or tail, all of it assembled in one write when it fits the
    /// buffer — `scratch` when it holds [`COW_BUFFER`] bytes or the whole
    /// run, else one of [`BOUNCE`] bytes on the stack — and otherwise
    /// as the head, the bytes of `data` and the tail, the copies carried
    /// through that buffer. Each byte is written once.
    fn write_run(
        &mut self,
        id: NodeId,
        pos: u64,
        run: Run,
        data: Source<'_>,
        scratch: &mut [u8],
    ) -> Result<()> {
        if run.len == 0 {
            return Ok(());
        }
        let file = self.data_file(id)?;
        let body = data.slice(run.start, run.len);
        if run.head == 0 && run.tail == 0 {
            return self.put(file, run.host, body, scratch);
        }
        let whole = (run.head + run.len + run.tail) as usize;
        if scratch.len() >= COW_BUFFER.min(whole) {
            return self.write_copied_run(id, pos, run, body, scratch);
        }
        self.write_copied_run_bounced(id, pos, run, body)
    }

    /// [`Self::write_copied_run`] through a [`BOUNCE`] buffer on the stack;
    /// not inlined, so that only this fallback carries it.
    #[inline(never)]
    fn write_copied_run_bounced(
        &mut self,
        id: NodeId,
        pos: u64,
        run: Run,
        body: Source<'_>,
    ) -> Result<()> {
        let mut buf = [0u8; BOUNCE];
        self.write_copied_run(id, pos, run, body, &mut buf)
    }

    /// [`Self::write_run`] of a run with a copied head or tail (`body`: its
    /// bytes of the batch), with the buffer `buf`.
    fn write_copied_run(
        &mut self,
        id: NodeId,
        pos: u64,
        run: Run,
        body: Source<'_>,
        buf: &mut [u8],
    ) -> Result<()> {
        let file = self.data_file(id)?;
        let guest = pos + run.start;
        let head = Source::View(View {
            node: id,
            guest: guest - run.head,
            len: run.head,
        });
        let tail = Source::View(View {
            node: id,
            guest: guest + run.len,
            len: run.tail,
        });
        let start = run.host - run.head;
        let whole = (run.head + run.len + run.tail) as usize;
        let Some(assembly) = buf.get_mut(..whole) else {
            self.put(file, start, head, buf)?;
            self.put(file, run.host, body, buf)?;
            return self.put(file, run.host + run.len, tail, buf);
        };
        let (head_bytes, rest) = assembly.split_at_mut(run.head as usize);
        let (body_bytes, tail_bytes) = rest.split_at_mut(run.len as usize);
        self.fill_from(head, head_bytes)?;
        self.fill_from(body, body_bytes)?;
        self.fill_from(tail, tail_bytes)?;
        self.device_mut(file)?.write_at(start, assembly)
    }

    /// Makes guest range `offset..offset + len` of format node `id` read as
    /// zeros. qcow2 v3 sets the zero flag on whole clusters (freeing their
    /// storage) and writes zeros into partial ones — with extended L2
    /// entries it sets the zero flags of the whole subclusters of a partial
    /// one (keeping its storage) and writes zeros only into partial
    /// subclusters; v2 and raw write zeros.
    ///
    /// # Errors
    /// As [`Graph::write`].
    pub fn write_zeroes(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let qcow2 = self.check_writable(id, offset, len)?;
        let mirror = self.guest_write_starts(id, offset, len);
        self.write_zeroes_in_place(id, offset, len, qcow2)?;
        if let Some(base) = mirror {
            self.mirror_to_base(id, (offset, len), |graph| {
                graph.write_zeroes(base, offset, len)
            });
        }
        Ok(())
    }

    /// The zero write of [`Graph::write_zeroes`] on `id` itself.
    fn write_zeroes_in_place(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
        qcow2: bool,
    ) -> Result<()> {
        if !qcow2 {
            return self.write_raw(id, offset, Source::Zeros(len), &mut []);
        }
        let zero_flag = self.qcow2(id)?.has_zero_flag();
        let (offset, len) = match zero_flag {
            true => self.widen_over_zeros(id, offset, len)?,
            false => (offset, len),
        };
        if zero_flag {
            self.validate_clears(id, offset, len)?;
        }
        let (cs, unit) = (self.qcow2(id)?.cluster_size(), self.qcow2(id)?.unit_size());
        self.for_each_piece(id, offset, len, |graph, pos, n, whole| {
            let cluster = pos / cs;
            if whole && zero_flag {
                return graph
                    .with_qcow2(id, |q, t| q.clear_cluster(t, cluster, ClearMode::Zero))
                    .map(drop);
            }
            let in_cluster = pos - cluster * cs..pos + n - cluster * cs;
            let units = graph.qcow2(id)?.whole_units(cluster, in_cluster);
            let flagged = zero_flag
                && !units.is_empty()
                && graph.with_qcow2(id, |q, t| q.zero_units(t, cluster, units.clone()))?;
            // R2: one request per piece: a new cluster is filled, then
            // mapped, so a crash leaves it old or new, never torn.
            let mut write = |from: u64, to: u64| match from < to {
                true => graph.write_source(id, from, Source::Zeros(to - from), &mut []),
                false => Ok(()),
            };
            if !flagged {
                return write(pos, pos + n);
            }
            let base = cluster * cs;
            let (start, end) = (u64::from(units.start) * unit, u64::from(units.end) * unit);
            write(pos, base + start)?;
            write((base + end).min(pos + n), pos + n)
        })
    }

    /// A zero write of `len` bytes at `offset` of qcow2 node `id`, widened
    /// at either end to the boundary of the unit a zero flag covers (a
    /// cluster, or a subcluster) where the bytes it adds read as zeros by
    /// the metadata already: QEMU's rule, so that a partial zero write
    /// next to zeros sets a flag instead of writing zeros.
    ///
    /// # Errors
    /// Metadata errors.
    fn widen_over_zeros(&mut self, id: NodeId, offset: u64, len: u64) -> Result<(u64, u64)> {
        let (unit, size) = (self.qcow2(id)?.unit_size(), self.size(id)?);
        let (mut start, mut end) = (offset, offset + len);
        let head = start / unit * unit;
        if head < start && self.reads_zeros(id, head, start - head)? {
            start = head;
        }
        let tail = end.next_multiple_of(unit).min(size);
        if end < tail && self.reads_zeros(id, end, tail - end)? {
            end = tail;
        }
        Ok((start, end - start))
    }

    /// Whether `len` bytes of `id`'s view at `offset` read as zeros by the
    /// metadata (zero flags, nothing allocated down the chain, past a
    /// backing file's end), without reading data.
    fn reads_zeros(&mut self, id: NodeId, offset: u64, len: u64) -> Result<bool> {
        let mut at = offset;
        while at < offset + len {
            let (located, run) = self.locate(id, at, offset + len - at)?;
            if !located.status.zero {
                return Ok(false);
            }
            at += run;
        }
        Ok(true)
    }

    /// Discards guest range `offset..offset + len` of format node `id`.
    /// qcow2 deallocates the whole clusters inside it (v3 with a backing
    /// file marks them zero, so backing data never shows through; v2 with a
    /// backing file cannot, and ignores the discard) and leaves partial
    /// clusters alone, as QEMU does; raw images read zeros there, as after a
    /// hole punch.
    ///
    /// # Errors
    /// As [`Graph::write`].
    pub fn discard(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.check_writable(id, offset, len)? {
            return self.write_zeroes(id, offset, len);
        }
        let mirror = self.guest_write_starts(id, offset, len);
        let has_backing = self.nodes.get(id)?.backing.is_some();
        let Some(mode) = self.qcow2(id)?.discard_mode(has_backing) else {
            return Ok(());
        };
        self.validate_clears(id, offset, len)?;
        self.for_each_piece(id, offset, len, |graph, pos, n, whole| {
            if !whole {
                return Ok(());
            }
            let cluster = pos / graph.qcow2(id)?.cluster_size();
            let old = graph.with_qcow2(id, |q, t| q.clear_cluster(t, cluster, mode))?;
            graph.discard_data(id, old, n)?;
            if let Some(base) = mirror {
                // The cluster now reads as zeros: in the base too.
                graph.mirror_to_base(id, (pos, n), |graph| graph.write_zeroes(base, pos, n));
            }
            Ok(())
        })
    }

    /// After a discard cleared a cluster of `id` whose entry was `old`:
    /// with an external data file, the `len` bytes it held there are
    /// discarded too (written as zeros), as QEMU discards them, so the data
    /// file holds what QEMU's would. The flag already hides them.
    fn discard_data(&mut self, id: NodeId, old: L2Entry, len: u64) -> Result<()> {
        let layout = self.qcow2(id)?.layout();
        let Some(host) = old.owned_host(layout).filter(|_| layout.external) else {
            return Ok(());
        };
        let file = self.data_file(id)?;
        self.put(file, host, Source::Zeros(len), &mut [])
    }

    /// Checks every whole cluster of `offset..offset + len` of qcow2 node `id`
    /// before a zero write or discard changes any of them: each entry valid,
    /// and each window of [`BATCH`] clusters releasable together; the
    /// partial clusters at either end too, whose entry a zero write may
    /// change (extended L2 entries).
    fn validate_clears(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        self.with_qcow2(id, |q, t| {
            let clusters = q.whole_clusters(offset, len);
            let cs = q.cluster_size();
            for end in [offset / cs, (offset + len - 1) / cs] {
                if !clusters.contains(&end) {
                    q.check_replaceable(t, end)?;
                }
            }
            q.check_clears(t, clusters)
        })
    }

    /// Splits `offset..offset + len` of qcow2 node `id` at cluster
    /// boundaries and calls `each(graph, pos, len, whole_cluster)`, a piece
    /// being whole as [`Qcow2::whole_clusters`] counts it.
    fn for_each_piece(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
        mut each: impl FnMut(&mut Self, u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let q = self.qcow2(id)?;
        let (cs, whole) = (q.cluster_size(), q.whole_clusters(offset, len));
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let piece_end = ((pos / cs + 1) * cs).min(end);
            let is_whole = pos.is_multiple_of(cs) && whole.contains(&(pos / cs));
            each(self, pos, piece_end - pos, is_whole)?;
            pos = piece_end;
        }
        Ok(())
    }
}
