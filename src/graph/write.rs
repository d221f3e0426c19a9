//! Guest writes, zero writes and discards on a format node.
//!
//! For qcow2 the graph drives each cluster: an owned cluster is written in
//! place; otherwise a new cluster is allocated and filled (the untouched
//! head and tail copied from the node's *current* guest view — old data, a
//! compressed cluster, zeros or the backing chain — then the new bytes), and
//! then mapped in the metadata cache, which writes the mapping back only
//! after a flush has made the data durable. Reading the current view through
//! the graph is what makes copy-on-write right for every kind of old entry.

use super::segments::{piece_len, Segments, MAX_SEGMENTS};
use super::{Driver, Graph, NodeId};
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::qcow2::{references_storage, ClearMode, Qcow2, Tables, WriteTarget};
use crate::format::{probe, Mapping, Probed, PROBE_BYTES};

/// Bounce buffer for checking compressed sources (on the stack).
const BOUNCE: usize = 4096;
/// Buffer a partly written new cluster is assembled in (on the stack);
/// larger clusters are filled piece by piece.
const COW_BUFFER: usize = 64 * 1024;
/// Clusters a request allocates and maps together (the bound of the
/// per-batch bookkeeping on the stack).
const BATCH: usize = 64;
/// L2 entry flag of an owned cluster.
const COPIED: u64 = 1 << 63;
/// L2 entry flag of a compressed cluster.
const COMPRESSED: u64 = 1 << 62;

/// What a write puts down: guest bytes (a scatter-gather list's, sliced
/// without copying), or zeros.
#[derive(Clone, Copy)]
enum Source<'a> {
    Data(Segments<'a>),
    Zeros(u64),
}

impl<'a> Source<'a> {
    fn len(self) -> u64 {
        match self {
            Source::Data(data) => data.len(),
            Source::Zeros(len) => len,
        }
    }

    /// The `len` bytes from `start`.
    fn slice(self, start: u64, len: u64) -> Source<'a> {
        match self {
            Source::Data(data) => Source::Data(data.slice(start, len)),
            Source::Zeros(_) => Source::Zeros(len),
        }
    }

    /// Copies the bytes into `out` (exactly [`Self::len`] bytes long).
    fn copy_to(self, out: &mut [u8]) {
        match self {
            Source::Data(data) => data.copy_to(out),
            Source::Zeros(_) => out.fill(0),
        }
    }

    /// Writes the bytes at device offset `at` as one vectored device write
    /// (zeros: up to [`MAX_SEGMENTS`] × 64 KiB per write, the pieces cut at
    /// 64 KiB boundaries of the device).
    fn write_to<D: Device>(self, device: &mut D, at: u64) -> Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut list = heapless::Vec::<&[u8], MAX_SEGMENTS>::new();
        let full = || Error::new(ErrorKind::InvalidInput, "too many segments in one request");
        match self {
            Source::Data(data) => {
                for piece in data.pieces() {
                    list.push(piece).map_err(|_| full())?;
                }
                device.write_vectored_at(at, &list)
            }
            Source::Zeros(len) => {
                let (mut start, mut done) = (0, 0);
                while done < len {
                    let pos = at + done;
                    let n = (ZEROS.len() as u64 - pos % ZEROS.len() as u64).min(len - done);
                    list.push(&ZEROS[..n as usize]).map_err(|_| full())?;
                    done += n;
                    if list.is_full() || done == len {
                        device.write_vectored_at(at + start, &list)?;
                        list.clear();
                        start = done;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Consecutive pieces of a request that lie next to each other on the
/// device: where they start there, and which bytes of the request they are.
#[derive(Clone, Copy, Default)]
struct Run {
    host: u64,
    start: u64,
    len: u64,
}

impl Run {
    /// Whether the piece at device offset `host`, request byte `start`,
    /// continues this run.
    fn extends(self, host: u64, start: u64) -> bool {
        self.len > 0 && self.host + self.len == host && self.start + self.len == start
    }

    /// Writes the run's bytes of `data` (nothing for an empty run).
    fn write<D: Device>(self, device: &mut D, data: Source<'_>) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        data.slice(self.start, self.len).write_to(device, self.host)
    }
}

/// A cluster allocated for a write: guest cluster, new device offset, and
/// the L2 entry it replaces.
#[derive(Clone, Copy, Default)]
struct Fresh {
    cluster: u64,
    new: u64,
    old: u64,
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
        let node = self.nodes.get_mut(id)?;
        let file = node
            .file
            .ok_or(Error::new(ErrorKind::Corrupt, "qcow2 node without file"))?;
        let Driver::Qcow2(q) = &mut node.driver else {
            return fail(ErrorKind::InvalidInput, "node is not a qcow2 image");
        };
        let mut tables = Tables::new(&mut self.cache, &mut self.devices, id.key(), file.index());
        work(q, &mut tables)
    }

    /// Checks that guest bytes `offset..offset + len` of `id` may be written.
    fn check_writable(&mut self, id: NodeId, offset: u64, len: u64) -> Result<bool> {
        self.check_range(id, offset, len)?;
        let node = self.nodes.get(id)?;
        if node.read_only {
            return fail(ErrorKind::ReadOnly, "image is open read-only");
        }
        match node.driver {
            Driver::Qcow2(_) => {
                // R9: refcounts checked, autoclear cleared before a first write.
                self.with_qcow2(id, |q, t| q.prepare_for_writes(t))?;
                Ok(true)
            }
            Driver::Raw { .. } => Ok(false),
            Driver::Protocol => fail(
                ErrorKind::InvalidInput,
                "cannot write a protocol node as an image",
            ),
        }
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

    /// Writes the concatenation of `segments` (at most [`MAX_SEGMENTS`]
    /// buffers, any lengths, empty ones too) at guest `offset` of format
    /// node `id`, as one request: validated whole before any byte is
    /// written, and executed as [`Graph::write`] of one buffer holding the
    /// same bytes would be, without copying the segments anywhere first.
    /// Within the request each byte of the device is written at most once;
    /// a qcow2 cluster the request only partly covers is assembled (or, for
    /// clusters over 64 KiB, copied) with its old head and tail around the
    /// new bytes. Device writes start and end only at the request's ends,
    /// at cluster boundaries, at the boundaries of 64-cluster batches and, for
    /// the copied head and tail of a large cluster, at 64 KiB boundaries;
    /// the segment boundaries are not among them (the pieces of one run go
    /// to the device in one [`Device::write_vectored_at`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for more than [`MAX_SEGMENTS`] segments
    /// (nothing is written), else as [`Graph::write`].
    pub fn writev(&mut self, id: NodeId, offset: u64, segments: &[&[u8]]) -> Result<()> {
        let data = Segments::new(segments)?;
        if data.len() == 0 {
            return Ok(());
        }
        let raw = !self.check_writable(id, offset, data.len())?;
        self.note_guest_write(id, offset, data.len());
        if raw {
            return self.write_raw(id, offset, Source::Data(data));
        }
        self.write_source(id, offset, Source::Data(data))
    }

    /// Writes `source` at `offset` of raw node `id`. On a raw image whose
    /// format was probed, a write into the first [`PROBE_BYTES`] bytes that
    /// would make them probe as another format is refused and nothing is
    /// written (QEMU's rule for probed raw images).
    fn write_raw(&mut self, id: NodeId, offset: u64, source: Source<'_>) -> Result<()> {
        let file = self.layer_file(id)?;
        if offset < PROBE_BYTES as u64 && self.is_probed(id)? {
            let device = self.device_mut(file)?;
            let mut first = [0u8; PROBE_BYTES];
            let present = device.size().min(PROBE_BYTES as u64) as usize;
            device.read_at(0, &mut first[..present])?;
            let start = offset as usize;
            let end = offset.saturating_add(source.len()).min(PROBE_BYTES as u64) as usize;
            source
                .slice(0, (end - start) as u64)
                .copy_to(&mut first[start..end]);
            if probe(&first[..present.max(end)]) != Probed::Raw {
                return fail(
                    ErrorKind::NotPermitted,
                    "operation not permitted: the write would make this probed raw image look like another image format (name its format, -f raw, to write it)",
                );
            }
        }
        source.write_to(self.device_mut(file)?, offset)
    }

    /// Copies guest bytes `offset..offset + len` of `source`'s chain into
    /// format node `id`'s own layer at the same offsets: what
    /// [`Graph::write`] of what [`Graph::read`] returns would do. Where a
    /// run of the source is stored data of one layer and `id` holds those
    /// clusters in place, one after the other on its device, the devices
    /// copy it themselves ([`Device::copy_from`]); `scratch` carries the
    /// rest, in pieces cut as [`piece_len`] cuts them: at multiples of the
    /// largest power of two that fits in `scratch` (whole clusters whenever
    /// `scratch` holds a cluster; at least 4 KiB-aligned guest offsets for
    /// a scratch of 4 KiB or more).
    ///
    /// # Errors
    /// As [`Graph::read`] and [`Graph::write`].
    pub(crate) fn copy_into(
        &mut self,
        id: NodeId,
        source: NodeId,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
    ) -> Result<()> {
        let file = self.layer_file(id)?;
        let offloads = self.device_mut(file)?.can_copy();
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
                    let n = piece_len(at, len - done, scratch.len() as u64);
                    let buf = &mut scratch[..n as usize];
                    self.read(source, at, buf)?;
                    self.write(id, at, buf)?;
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
        let raw = !self.check_writable(id, offset, len)?;
        if raw && offset < PROBE_BYTES as u64 && self.is_probed(id)? {
            // The buffered path checks what the first sector becomes.
            return Ok(None);
        }
        let (located, run) = self.locate(source, offset, len)?;
        let Mapping::Data(source_host) = located.mapping else {
            return Ok(None);
        };
        let (source_file, file) = (self.layer_file(located.layer)?, self.layer_file(id)?);
        let (target_host, run) = if raw {
            (offset, run)
        } else {
            match self.in_place_run(id, offset, run)? {
                Some(found) => found,
                None => return Ok(None),
            }
        };
        let Ok([Some(target), Some(from)]) = self
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

    /// Where qcow2 node `id` holds guest bytes from `offset` in place: the
    /// device offset and how many of the `len` bytes follow on from there
    /// (`None` when the first cluster is not written in place).
    fn in_place_run(&mut self, id: NodeId, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let cs = self.qcow2(id)?.cluster_size();
        let mut first = None;
        let mut at = offset;
        while at < offset + len {
            let cluster = at / cs;
            let WriteTarget::InPlace(host) =
                self.with_qcow2(id, |q, t| q.write_target(t, cluster))?
            else {
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

    /// Writes `source` at `offset` of qcow2 node `id`, in batches of at
    /// most [`BATCH`] clusters. A request of several batches is validated
    /// whole before its first batch is written.
    fn write_source(&mut self, id: NodeId, offset: u64, source: Source<'_>) -> Result<()> {
        let len = source.len();
        let first = self.batch_at(id, offset, len)?;
        if first < len {
            self.validate_batches(id, offset, len)?;
        }
        let mut done = 0u64;
        while done < len {
            let n = self.batch_at(id, offset + done, len - done)?;
            self.write_clusters(id, offset + done, source.slice(done, n))?;
            done += n;
        }
        Ok(())
    }

    /// The bytes of the first batch of a request of `len` bytes at `pos` of
    /// qcow2 node `id`.
    fn batch_at(&self, id: NodeId, pos: u64, len: u64) -> Result<u64> {
        let cs = self.qcow2(id)?.cluster_size();
        let span = ((pos % cs) + len).div_ceil(cs).min(BATCH as u64);
        Ok((span * cs - pos % cs).min(len))
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
    /// filled, one flush makes data and refcounts durable, then the L2
    /// entries are set, and after another flush the replaced storage is
    /// released.
    fn write_clusters(&mut self, id: NodeId, pos: u64, data: Source<'_>) -> Result<()> {
        self.validate_clusters(id, pos, data.len())?;
        let mut fresh = [Fresh::default(); BATCH];
        let mut count = 0;
        let mut mapped = 0;
        // R2: every new cluster is filled before any of them is mapped.
        let result = self
            .fill_clusters(id, pos, data, &mut fresh, &mut count)
            .and_then(|()| self.map_fresh(id, &fresh[..count], &mut mapped));
        if result.is_err() {
            // R14: nothing references the clusters not yet mapped: give them
            // back (best effort; a crash here would only leak them).
            for f in &fresh[mapped..count] {
                let _ = self.with_qcow2(id, |q, t| q.release_entry(t, f.new | COPIED));
            }
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
        let mut allocations = 0;
        let mut replaced = [0u64; BATCH];
        while at < end {
            let cluster = at / cs;
            let target = self.with_qcow2(id, |q, t| {
                q.check_replaceable(t, cluster)?;
                q.write_target(t, cluster)
            })?;
            let piece_end = ((cluster + 1) * cs).min(end);
            if let WriteTarget::Allocate { old } = target {
                replaced[allocations] = old;
                allocations += 1;
                if old & COMPRESSED != 0 {
                    self.verify_view(id, cluster * cs, at - cluster * cs)?;
                    self.verify_view(id, piece_end, (cluster + 1) * cs - piece_end)?;
                }
            }
            at = piece_end;
        }
        // Each allocation may also need a new L2 table.
        self.with_qcow2(id, |q, t| {
            q.check_releases(t, &replaced[..allocations])?;
            q.check_allocations(t, 2 * allocations as u64)
        })
    }

    /// Reads (and drops) `len` bytes of `id`'s guest view at `guest`.
    fn verify_view(&mut self, id: NodeId, guest: u64, len: u64) -> Result<()> {
        let readable = self.size(id)?.saturating_sub(guest).min(len);
        let mut buf = [0u8; BOUNCE];
        let mut done = 0;
        while done < readable {
            let n = (readable - done).min(BOUNCE as u64) as usize;
            self.read(id, guest + done, &mut buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Writes owned clusters in place and allocates and fills the others,
    /// recording each allocation in `fresh[..count]` as soon as it exists.
    /// Pieces that land next to each other on the device go out as one
    /// write; a new cluster only partly written is assembled with its
    /// copy-on-write head and tail and written whole.
    fn fill_clusters(
        &mut self,
        id: NodeId,
        pos: u64,
        data: Source<'_>,
        fresh: &mut [Fresh; BATCH],
        count: &mut usize,
    ) -> Result<()> {
        let cs = self.qcow2(id)?.cluster_size();
        let file = self.layer_file(id)?;
        // Pieces not yet written: device offset, and their range of `data`.
        let mut run = Run::default();
        let mut done = 0u64;
        while done < data.len() {
            let at = pos + done;
            let (cluster, in_cluster) = (at / cs, at % cs);
            let len = (cs - in_cluster).min(data.len() - done);
            let host = match self.with_qcow2(id, |q, t| q.write_target(t, cluster))? {
                WriteTarget::InPlace(host) => host + in_cluster,
                WriteTarget::Allocate { old } => {
                    let new = self.with_qcow2(id, |q, t| q.allocate_data(t))?;
                    fresh[*count] = Fresh { cluster, new, old };
                    *count += 1;
                    if len < cs {
                        run.write(self.device_mut(file)?, data)?;
                        run = Run::default();
                        self.fill_partial(
                            id,
                            cluster * cs,
                            in_cluster,
                            data.slice(done, len),
                            new,
                        )?;
                        done += len;
                        continue;
                    }
                    new
                }
            };
            if !run.extends(host, done) {
                run.write(self.device_mut(file)?, data)?;
                run = Run {
                    host,
                    start: done,
                    len: 0,
                };
            }
            run.len += len;
            done += len;
        }
        run.write(self.device_mut(file)?, data)
    }

    /// Fills the new cluster at device offset `host` for guest cluster
    /// `guest`: its current view, with `piece` at `in_cluster`. Clusters up
    /// to [`COW_BUFFER`] bytes are assembled and written in one write.
    fn fill_partial(
        &mut self,
        id: NodeId,
        guest: u64,
        in_cluster: u64,
        piece: Source<'_>,
        host: u64,
    ) -> Result<()> {
        let cs = self.qcow2(id)?.cluster_size();
        let tail = in_cluster + piece.len();
        let file = self.layer_file(id)?;
        if cs > COW_BUFFER as u64 {
            self.copy_view(id, guest, in_cluster, host)?;
            piece.write_to(self.device_mut(file)?, host + in_cluster)?;
            return self.copy_view(id, guest + tail, cs - tail, host + tail);
        }
        let mut buf = [0u8; COW_BUFFER];
        let (head, rest) = buf[..cs as usize].split_at_mut(in_cluster as usize);
        let (middle, end) = rest.split_at_mut(piece.len() as usize);
        self.read_view(id, guest, head)?;
        piece.copy_to(middle);
        self.read_view(id, guest + tail, end)?;
        self.device_mut(file)?.write_at(host, &buf[..cs as usize])
    }

    /// Reads `id`'s current guest view at `guest` into `buf`; bytes past the
    /// virtual size read as zeros.
    fn read_view(&mut self, id: NodeId, guest: u64, buf: &mut [u8]) -> Result<()> {
        let readable = self.size(id)?.saturating_sub(guest).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(readable);
        self.read(id, guest, inside)?;
        past.fill(0);
        Ok(())
    }

    /// Maps the filled clusters in the metadata cache (counting in
    /// `mapped`: the cache writes them back after the data is durable), and
    /// releases what they replaced once the new mapping is durable.
    fn map_fresh(&mut self, id: NodeId, fresh: &[Fresh], mapped: &mut usize) -> Result<()> {
        for f in fresh {
            self.with_qcow2(id, |q, t| q.set_entry(t, f.cluster, f.new | COPIED))?;
            *mapped += 1;
        }
        if fresh.iter().any(|f| references_storage(f.old)) {
            // R5: the new mappings durable before the old storage is freed.
            self.with_qcow2(id, |_, t| t.sync())?;
            for f in fresh {
                self.with_qcow2(id, |q, t| q.release_entry(t, f.old))?;
            }
        }
        Ok(())
    }

    /// Copies `len` bytes of `id`'s current guest view at `guest` to device
    /// offset `host` of its file (bytes past the virtual size as zeros), in
    /// writes cut at [`COW_BUFFER`] boundaries of the device (of the guest
    /// too: `host` and `guest` lie alike in a cluster larger than that).
    fn copy_view(&mut self, id: NodeId, guest: u64, len: u64, host: u64) -> Result<()> {
        let file = self.layer_file(id)?;
        let mut buf = [0u8; COW_BUFFER];
        let mut done = 0;
        while done < len {
            let to_boundary = COW_BUFFER as u64 - (host + done) % COW_BUFFER as u64;
            let n = (len - done).min(to_boundary) as usize;
            self.read_view(id, guest + done, &mut buf[..n])?;
            self.device_mut(file)?.write_at(host + done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes guest range `offset..offset + len` of format node `id` read as
    /// zeros. qcow2 v3 sets the zero flag on whole clusters (freeing their
    /// storage) and writes zeros into partial ones; v2 and raw write zeros.
    ///
    /// # Errors
    /// As [`Graph::write`].
    pub fn write_zeroes(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let qcow2 = self.check_writable(id, offset, len)?;
        self.note_guest_write(id, offset, len);
        let zero_flag = qcow2 && self.qcow2(id)?.header().version >= 3;
        if zero_flag {
            self.validate_clears(id, offset, len)?;
        }
        self.for_each_piece(id, offset, len, |graph, pos, n, whole| {
            if whole && zero_flag {
                let cluster = pos / graph.qcow2(id)?.cluster_size();
                return graph.with_qcow2(id, |q, t| q.clear_cluster(t, cluster, ClearMode::Zero));
            }
            if qcow2 {
                // R2: one request per piece: a new cluster is filled, then
                // mapped, so a crash leaves it old or new, never torn.
                graph.write_source(id, pos, Source::Zeros(n))
            } else {
                graph.write_raw(id, pos, Source::Zeros(n))
            }
        })
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
        self.note_guest_write(id, offset, len);
        let has_backing = self.nodes.get(id)?.backing.is_some();
        let mode = match (self.qcow2(id)?.header().version >= 3, has_backing) {
            (true, true) => ClearMode::Zero,
            (_, false) => ClearMode::Unallocated,
            // v2 cannot hide backing data: QEMU ignores the discard.
            (false, true) => return Ok(()),
        };
        self.validate_clears(id, offset, len)?;
        self.for_each_piece(id, offset, len, |graph, pos, _, whole| {
            if !whole {
                return Ok(());
            }
            let cluster = pos / graph.qcow2(id)?.cluster_size();
            graph.with_qcow2(id, |q, t| q.clear_cluster(t, cluster, mode))
        })
    }

    /// Checks every whole cluster of `offset..offset + len` of qcow2 node `id`
    /// before a zero write or discard changes any of them: each entry valid,
    /// and each window of [`BATCH`] clusters releasable together.
    fn validate_clears(&mut self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        let mut window = [0u64; BATCH];
        let mut count = 0;
        self.for_each_piece(id, offset, len, |graph, pos, _, whole| {
            if !whole {
                return Ok(());
            }
            let cluster = pos / graph.qcow2(id)?.cluster_size();
            window[count] = graph.with_qcow2(id, |q, t| {
                q.check_replaceable(t, cluster)?;
                q.entry(t, cluster)
            })?;
            count += 1;
            if count == BATCH {
                count = 0;
                graph.with_qcow2(id, |q, t| q.check_releases(t, &window))?;
            }
            Ok(())
        })?;
        self.with_qcow2(id, |q, t| q.check_releases(t, &window[..count]))
    }

    /// Splits `offset..offset + len` at cluster boundaries (qcow2) and calls
    /// `each(graph, pos, len, whole_cluster)`; raw images are one piece. A
    /// cluster that ends at the virtual size counts as whole.
    fn for_each_piece(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
        mut each: impl FnMut(&mut Self, u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let size = self.size(id)?;
        let cs = match self.qcow2(id) {
            Ok(q) => q.cluster_size(),
            Err(_) => return each(self, offset, len, false),
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let cluster_end = (pos / cs + 1) * cs;
            let piece_end = cluster_end.min(end);
            let whole = pos.is_multiple_of(cs) && (piece_end == cluster_end || piece_end == size);
            each(self, pos, piece_end - pos, whole)?;
            pos = piece_end;
        }
        Ok(())
    }
}
