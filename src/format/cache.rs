//! A bounded cache of metadata table slices shared by every format node.
//!
//! qcow2 L1, L2 and refcount tables are read through here in slices of at
//! most [`SLICE_SIZE`] bytes, so memory stays fixed whatever the cluster size
//! or the number of open images. Entries are keyed by (owner, byte offset);
//! the cache is set-associative ([`WAYS`] slots per set, the set chosen by a
//! hash of the key), so a lookup looks at a few slots whatever the capacity,
//! and a set evicts its least recently used clean slice first.
//!
//! Table updates stay in the cache (write-back) and carry a [`Level`]: when
//! an image's slices are written back, its refcount slices go first, then one
//! flush makes them and every data write before it durable, and only then are
//! its mapping slices (L1/L2 entries) written. So a mapping never reaches the
//! disk before the data and the refcounts it depends on, however late the
//! write-back happens (eviction, a guest flush, a chain change, close).
//! Structural changes (new tables, header fields) are written through and
//! [`MetaCache::patch`]ed in. This is rule R3 of `docs/crash-ordering.md`
//! (R1 and R2 rest on it; R14 on failed write-backs keeping slices dirty).
//!
//! Misses without blocking: with loading off ([`MetaCache::set_loading`]) a
//! miss reads nothing; the lookup fails and the cache records the slice it
//! needed ([`MetaCache::take_miss`]). The caller reads it split-phase and
//! hands the bytes over with [`MetaCache::insert`], which places them as a
//! load would (same eviction and write-back) unless the image's metadata
//! was written meanwhile (the bytes may be stale: dropped, the lookup
//! misses again).

use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use crate::graph::place::Place;

/// Largest slice held by one cache entry.
pub const SLICE_SIZE: usize = 4096;

/// Identifies which open image a slice belongs to (a node's pool key).
pub type Owner = u64;

/// A copy of a dirty slice on its way to the device
/// ([`MetaCache::take_dirty`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    slot: usize,
    owner: Owner,
    /// Where the slice goes on the image's device.
    pub offset: u64,
    /// How many bytes of the copy.
    pub len: usize,
    level: Level,
}

/// Slots per set (fewer when the whole cache has fewer). Sixteen keep
/// conflict misses rare when the tables in use nearly fill the cache (a
/// miss is a device read; under QEMU's TCG a virtio request costs as much as
/// thousands of probes); four ways missed on a quarter of the reads through
/// a 3-deep chain whose tables filled 99 of 128 slots.
pub const WAYS: usize = 16;

/// An open image as the cache sees it: its key, and where its device sits in
/// the device table handed to the cache (to write its slices back when they
/// are evicted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// The image's cache key.
    pub owner: Owner,
    /// Index of the image's device in the device table.
    pub device: usize,
    /// Index of the device its data lies on: `device`, or an external data
    /// file's (flushed before mappings are written back: R3).
    pub data: usize,
}

/// The device at `index` of a device table, or a corruption error naming
/// `what` when that slot is empty (an image whose device was released).
pub(crate) fn device_at<'d, D>(
    devices: &'d mut [Place<D>],
    index: usize,
    what: &'static str,
) -> Result<&'d mut D> {
    match devices.get_mut(index).and_then(Place::as_mut) {
        Some(device) => Ok(device),
        None => fail(ErrorKind::Corrupt, what),
    }
}

/// What a dirty slice holds, in write-back order. No variant is 0, so
/// that a clean tag's `Option<Level>` is a zero byte (the compiler marks
/// `None` with the free value 0): an empty cache is all zeros, and a
/// `static` graph lives in `.bss` (the kernel checks that it does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Refcounts: written first (an early refcount increase only leaks;
    /// R1).
    Refcount = 1,
    /// L1/L2 entries: written after a flush has made data and refcounts
    /// durable (R2, R3).
    Mapping = 2,
}

/// A check of a slice's bytes ([`MetaCache::slice_checked`]).
type Check = fn(&[u8]) -> Result<()>;

/// No check for [`MetaCache::load`].
const NO_CHECK: Option<Check> = None;

#[derive(Clone, Copy)]
struct Tag {
    image: Image,
    offset: u64,
    len: u64,
    last_use: u64,
    valid: bool,
    dirty: Option<Level>,
    /// The slice passed the check of a [`MetaCache::slice_checked`] (a
    /// slice inserted, or loaded by [`MetaCache::slice`], has not yet).
    checked: bool,
    /// A copy of the slice is being written back split-phase
    /// ([`MetaCache::take_dirty`]).
    writing: bool,
}

const EMPTY: Tag = Tag {
    image: Image {
        owner: 0,
        device: 0,
        data: 0,
    },
    offset: 0,
    len: 0,
    last_use: 0,
    valid: false,
    dirty: None,
    checked: false,
    writing: false,
};

/// A slice a lookup needed while loading was off ([`MetaCache::set_loading`]):
/// read `len` bytes at `offset` of `image`'s device, then
/// [`MetaCache::insert`] them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Miss {
    /// The image whose table the slice belongs to.
    pub image: Image,
    /// The slice's device offset.
    pub offset: u64,
    /// The slice's length (at most [`SLICE_SIZE`]).
    pub len: usize,
    /// The cache's count of metadata writes when the slice was missed: bytes
    /// read after a later write may be stale.
    writes: u64,
}

impl Miss {
    /// Whether `other` names the same slice.
    pub fn same_slice(&self, other: &Miss) -> bool {
        (self.image, self.offset, self.len) == (other.image, other.offset, other.len)
    }
}

/// `SLOTS` slices of table data.
pub struct MetaCache<const SLOTS: usize> {
    tags: [Tag; SLOTS],
    data: [[u8; SLICE_SIZE]; SLOTS],
    clock: u64,
    /// Whether a miss records [`Miss`] and fails instead of reading the
    /// device (loading is off; false, the zero byte, by default).
    misses_deferred: bool,
    /// The last slice missed while loading was off.
    missed: Place<Miss>,
    /// Metadata writes (write-backs, patches) so far, for [`Miss::writes`].
    writes: u64,
}

impl<const SLOTS: usize> Default for MetaCache<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const SLOTS: usize> MetaCache<SLOTS> {
    const NON_EMPTY: () = assert!(SLOTS > 0, "the metadata cache needs at least one slot");

    /// An empty cache.
    pub const fn new() -> Self {
        let () = Self::NON_EMPTY;
        Self {
            tags: [EMPTY; SLOTS],
            data: [[0; SLICE_SIZE]; SLOTS],
            clock: 0,
            misses_deferred: false,
            missed: Place::Empty,
            writes: 0,
        }
    }

    /// Turns loading on a miss on (the default) or off. While it is off, a
    /// lookup that misses reads nothing: it fails with
    /// [`ErrorKind::Busy`] and the slice is recorded for
    /// [`MetaCache::take_miss`].
    pub fn set_loading(&mut self, on: bool) {
        self.misses_deferred = !on;
    }

    /// The slice the last lookup missed while loading was off, if any
    /// (forgotten here).
    pub fn take_miss(&mut self) -> Option<Miss> {
        self.missed.take()
    }

    /// Puts `bytes`, read from the device for `miss`, in the cache as a load
    /// would: bytes past `bytes.len()` (past the device's end) read as
    /// zero; evicting a dirty slice writes its image back first
    /// (synchronously, in [`Level`] order: R3). Returns `false` when
    /// nothing was inserted: the slice is cached already (perhaps with
    /// updates newer than the device) or metadata was written since the
    /// miss (the bytes may be stale). The cache validates nothing at load;
    /// the format checks each entry where it reads it, so inserted slices
    /// are checked exactly as loaded ones.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for more bytes than the slice;
    /// device errors of the write-back of an evicted slice.
    pub fn insert<D: Device>(
        &mut self,
        miss: &Miss,
        devices: &mut [Place<D>],
        bytes: &[u8],
    ) -> Result<bool> {
        if miss.len > SLICE_SIZE || bytes.len() > miss.len {
            return fail(
                ErrorKind::InvalidInput,
                "loaded metadata larger than its slice",
            );
        }
        self.clock += 1;
        if miss.writes != self.writes || self.find(miss.image, miss.offset, miss.len).is_some() {
            return Ok(false);
        }
        let slot = self.place(miss.image, devices, miss.offset)?;
        let buf = &mut self.data[slot][..miss.len];
        buf[..bytes.len()].copy_from_slice(bytes);
        buf[bytes.len()..].fill(0);
        // Checked at its first `slice_checked`, as a loaded slice is.
        self.admit(slot, (miss.image, miss.offset, miss.len), false);
        Ok(true)
    }

    /// The slice of `slice_len` bytes at `offset` of `image`, read from its
    /// device in `devices` on a miss. Bytes past the device's end read as
    /// zero.
    ///
    /// # Errors
    /// Whatever a device returns on a failed read, or on the write-back of
    /// an evicted dirty slice.
    pub fn slice<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
        offset: u64,
        slice_len: usize,
    ) -> Result<&[u8]> {
        let slot = self.load(image, devices, (offset, slice_len), NO_CHECK)?;
        Ok(&self.data[slot][..slice_len])
    }

    /// [`MetaCache::slice`], with `check` run on the slice's bytes the
    /// first time they are used this way (read from the device on a miss,
    /// or cached by [`MetaCache::insert`] or [`MetaCache::slice`] without
    /// it): a slice `check` refuses is dropped from the cache, so no caller
    /// of this function ever sees bytes that did not pass it.
    ///
    /// # Errors
    /// As [`MetaCache::slice`], and `check`'s error.
    pub fn slice_checked<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
        offset: u64,
        slice_len: usize,
        check: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<&[u8]> {
        let slot = self.load(image, devices, (offset, slice_len), Some(check))?;
        Ok(&self.data[slot][..slice_len])
    }

    /// Changes `bytes` at device offset `at`, inside the slice of
    /// `slice_len` bytes at `offset`, in the cache only: the slice is dirty
    /// at `level` until written back.
    ///
    /// # Errors
    /// As [`MetaCache::slice`]; [`ErrorKind::InvalidInput`] when the bytes
    /// do not lie inside the slice.
    pub fn update<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
        (offset, slice_len): (u64, usize),
        at: u64,
        bytes: &[u8],
        level: Level,
    ) -> Result<()> {
        let inside = at >= offset && at + bytes.len() as u64 <= offset + slice_len as u64;
        if !inside || slice_len > SLICE_SIZE {
            return fail(ErrorKind::InvalidInput, "metadata update outside its slice");
        }
        let slot = self.load(image, devices, (offset, slice_len), NO_CHECK)?;
        let start = (at - offset) as usize;
        self.data[slot][start..start + bytes.len()].copy_from_slice(bytes);
        let tag = &mut self.tags[slot];
        tag.dirty = tag.dirty.max(Some(level));
        Ok(())
    }

    /// Copies `bytes`, just written to `owner`'s device at `offset`, into
    /// every cached slice that covers them.
    pub fn patch(&mut self, owner: Owner, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        for (tag, data) in self.tags.iter().zip(self.data.iter_mut()) {
            let slice_end = tag.offset + tag.len;
            if !tag.valid || tag.image.owner != owner || end <= tag.offset || offset >= slice_end {
                continue;
            }
            let from = offset.max(tag.offset);
            let to = end.min(slice_end);
            let dst = (from - tag.offset) as usize;
            let src = (from - offset) as usize;
            let n = (to - from) as usize;
            data[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
        }
        self.writes += 1;
    }

    /// Whether `owner` has slices not yet written back.
    pub fn is_dirty(&self, owner: Owner) -> bool {
        self.tags
            .iter()
            .any(|t| t.valid && t.image.owner == owner && t.dirty.is_some())
    }

    /// Writes `image`'s dirty slices back to its device in `devices`
    /// ([`MetaCache::write_back`]); when mapping slices go out and its data
    /// lies on another device (an external data file), that device is
    /// flushed first: the data they map is durable before them (R2, R3).
    ///
    /// # Errors
    /// As [`MetaCache::write_back`]; a device missing from `devices`.
    pub fn write_back_image<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
    ) -> Result<()> {
        if image.data != image.device && self.is_dirty_at(image.owner, Level::Mapping) {
            device_at(devices, image.data, "external data file of a closed image")?.flush()?;
        }
        let device = device_at(devices, image.device, "cached metadata of a closed image")?;
        self.write_back(image.owner, device)
    }

    /// Writes `owner`'s dirty slices to `device` in [`Level`] order: the
    /// refcount slices, then (when there are mapping slices) one flush and
    /// the mapping slices. Ends without a flush of its own.
    ///
    /// # Errors
    /// Device errors; slices not yet written stay dirty, so a retry resumes.
    pub fn write_back<D: Device>(&mut self, owner: Owner, device: &mut D) -> Result<()> {
        self.write_level(owner, device, Level::Refcount)?;
        let mapping =
            |t: &Tag| t.valid && t.image.owner == owner && t.dirty == Some(Level::Mapping);
        if self.tags.iter().any(mapping) {
            // R3: refcounts and earlier data durable before any mapping.
            device.flush()?;
            self.write_level(owner, device, Level::Mapping)?;
        }
        Ok(())
    }

    fn write_level<D: Device>(&mut self, owner: Owner, device: &mut D, level: Level) -> Result<()> {
        for (tag, data) in self.tags.iter_mut().zip(self.data.iter()) {
            if tag.valid && tag.image.owner == owner && tag.dirty == Some(level) {
                self.writes += 1;
                device.write_at(tag.offset, &data[..tag.len as usize])?;
                // R14: clean only once written; a failure leaves it dirty.
                tag.dirty = None;
            }
        }
        Ok(())
    }

    /// Copies into `buf` (at least [`SLICE_SIZE`] bytes) the next slice of
    /// `owner` dirty at `level` that is not being written back already,
    /// for a write-back split into device operations (the request engine's
    /// flush): marks it being written and returns it with its offset and
    /// length. The caller writes the copy at that offset and reports the
    /// result with [`MetaCache::written`]. Nothing may update `owner`'s
    /// slices meanwhile (the engine holds allocations back), so the copy is
    /// what the slice holds until then.
    pub fn take_dirty(&mut self, owner: Owner, level: Level, buf: &mut [u8]) -> Option<Outgoing> {
        let slot = self.tags.iter().position(|t| {
            t.valid && t.image.owner == owner && t.dirty == Some(level) && !t.writing
        })?;
        let tag = &mut self.tags[slot];
        let len = tag.len as usize;
        buf.get_mut(..len)?.copy_from_slice(&self.data[slot][..len]);
        tag.writing = true;
        Some(Outgoing {
            slot,
            owner,
            offset: tag.offset,
            len,
            level,
        })
    }

    /// Ends the write of `outgoing` ([`MetaCache::take_dirty`]): when it
    /// succeeded and the slot still holds that slice, the slice is clean
    /// (R14: a failed write leaves it dirty). The slot may have been
    /// evicted meanwhile (written back synchronously first).
    pub fn written(&mut self, outgoing: Outgoing, succeeded: bool) {
        let Some(tag) = self.tags.get_mut(outgoing.slot) else {
            return;
        };
        if !(tag.valid && tag.image.owner == outgoing.owner && tag.offset == outgoing.offset) {
            return;
        }
        tag.writing = false;
        if succeeded && tag.dirty == Some(outgoing.level) {
            tag.dirty = None;
        }
    }

    /// Whether `owner` has slices dirty at `level` (being written back or
    /// not).
    pub fn is_dirty_at(&self, owner: Owner, level: Level) -> bool {
        self.tags
            .iter()
            .any(|t| t.valid && t.image.owner == owner && t.dirty == Some(level))
    }

    /// Forgets every slice of `owner` (its image was closed), written back
    /// or not.
    pub fn forget(&mut self, owner: Owner) {
        for tag in self.tags.iter_mut().filter(|t| t.image.owner == owner) {
            tag.valid = false;
            tag.dirty = None;
        }
        self.writes += 1;
    }

    /// The slots of the set that holds `image`'s slice at `offset`.
    fn set_of(image: Image, offset: u64) -> core::ops::Range<usize> {
        let ways = WAYS.min(SLOTS);
        let sets = SLOTS / ways;
        // Slices start at multiples of 512 bytes at least.
        let key = image.owner.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (offset >> 9).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let set = ((key >> 32) % sets as u64) as usize;
        set * ways..(set + 1) * ways
    }

    /// The slot holding `image`'s slice at `offset`, loaded on a miss.
    /// With a `check`, a slice not checked yet is checked now and dropped
    /// when refused.
    fn load<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
        (offset, slice_len): (u64, usize),
        check: Option<impl FnOnce(&[u8]) -> Result<()>>,
    ) -> Result<usize> {
        self.clock += 1;
        let slot = match self.find(image, offset, slice_len) {
            Some(slot) => slot,
            None if self.misses_deferred => {
                self.missed = Place::Held(Miss {
                    image,
                    offset,
                    len: slice_len,
                    writes: self.writes,
                });
                return fail(
                    ErrorKind::Busy,
                    "metadata slice not cached (loading is off)",
                );
            }
            None => {
                let slot = self.place(image, devices, offset)?;
                let device = device_at(devices, image.device, "image without device")?;
                let present = device.size().saturating_sub(offset).min(slice_len as u64) as usize;
                let buf = &mut self.data[slot][..slice_len];
                if present > 0 {
                    device.read_at(offset, &mut buf[..present])?;
                }
                buf[present..].fill(0);
                self.admit(slot, (image, offset, slice_len), false);
                slot
            }
        };
        if let (Some(check), false) = (check, self.tags[slot].checked) {
            if let Err(err) = check(&self.data[slot][..slice_len]) {
                // Dropped unless it holds updates (then it stays, and the
                // check keeps refusing it).
                if self.tags[slot].dirty.is_none() {
                    self.tags[slot].valid = false;
                }
                return Err(err);
            }
            self.tags[slot].checked = true;
        }
        self.tags[slot].last_use = self.clock;
        Ok(slot)
    }

    /// The slot holding `image`'s slice at `offset`, if cached.
    fn find(&self, image: Image, offset: u64, slice_len: usize) -> Option<usize> {
        Self::set_of(image, offset).find(|&i| {
            let t = &self.tags[i];
            t.valid && t.image == image && t.offset == offset && t.len == slice_len as u64
        })
    }

    /// A free slot for `image`'s slice at `offset`: the set's victim,
    /// emptied (a dirty victim's image written back first).
    fn place<D: Device>(
        &mut self,
        image: Image,
        devices: &mut [Place<D>],
        offset: u64,
    ) -> Result<usize> {
        let slot = self.victim(Self::set_of(image, offset));
        let evicted = self.tags[slot];
        if evicted.valid && evicted.dirty.is_some() {
            // R3: the evicted slice's image is written back whole.
            self.write_back_image(evicted.image, devices)?;
        }
        self.tags[slot].valid = false;
        Ok(slot)
    }

    /// Marks `slot`, just filled, as `image`'s clean slice at `offset`,
    /// `checked` or not yet.
    fn admit(
        &mut self,
        slot: usize,
        (image, offset, slice_len): (Image, u64, usize),
        checked: bool,
    ) {
        self.tags[slot] = Tag {
            image,
            offset,
            len: slice_len as u64,
            last_use: self.clock,
            valid: true,
            dirty: None,
            checked,
            writing: false,
        };
    }

    /// The slot of `set` to reuse: an empty one, else the least recently
    /// used clean one, else the least recently used (its image is written
    /// back first).
    fn victim(&self, set: core::ops::Range<usize>) -> usize {
        let start = set.start;
        if let Some(free) = set.clone().find(|&i| !self.tags[i].valid) {
            return free;
        }
        let lru = |clean_only: bool| {
            set.clone()
                .filter(|&i| !clean_only || self.tags[i].dirty.is_none())
                .min_by_key(|&i| self.tags[i].last_use)
        };
        lru(true).or_else(|| lru(false)).unwrap_or(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceEvent;
    use crate::device::MemDevice;

    const A: Image = Image {
        owner: 1,
        device: 0,
        data: 0,
    };
    const B: Image = Image {
        owner: 2,
        device: 1,
        data: 1,
    };

    /// 64 bytes, each holding its offset.
    fn numbered() -> [u8; 64] {
        core::array::from_fn(|i| i as u8)
    }

    #[test]
    fn hits_evicts_lru_and_zero_fills_past_end() {
        let mut storage = numbered();
        let mut devices = [Place::Held(MemDevice::new(&mut storage, 40, 1).unwrap())];
        let mut cache = MetaCache::<2>::new();
        assert_eq!(cache.slice(A, &mut devices, 0, 16).unwrap()[3], 3);
        assert_eq!(cache.slice(A, &mut devices, 16, 16).unwrap()[0], 16);
        assert_eq!(cache.slice(A, &mut devices, 0, 16).unwrap()[3], 3);
        let reads = |d: &[Place<MemDevice<'_>>]| d[0].as_ref().unwrap().reads();
        assert_eq!(reads(&devices), 2);
        // Slot of offset 16 is least recent: evicted by offset 32.
        let tail = cache.slice(A, &mut devices, 32, 16).unwrap();
        assert_eq!(&tail[..9], &[32, 33, 34, 35, 36, 37, 38, 39, 0]);
        cache.slice(A, &mut devices, 0, 16).unwrap();
        assert_eq!(reads(&devices), 3);
        cache.forget(1);
        cache.slice(A, &mut devices, 0, 16).unwrap();
        assert_eq!(reads(&devices), 4);
        cache.patch(1, 14, &[0xee, 0xef, 0xf0]);
        assert_eq!(
            &cache.slice(A, &mut devices, 0, 16).unwrap()[13..],
            &[13, 0xee, 0xef]
        );
        cache.patch(2, 0, &[1]);
        assert_eq!(cache.slice(A, &mut devices, 0, 16).unwrap()[0], 0);
    }

    #[test]
    fn write_back_puts_refcounts_then_a_flush_then_mappings() {
        let mut storage = [0u8; 64];
        let mut log = std::vec::Vec::new();
        let mut observer = |event: DeviceEvent<'_>| {
            log.push(match event {
                DeviceEvent::Write { offset, .. } => offset as i64,
                DeviceEvent::Flush => -1,
            })
        };
        let mut device = MemDevice::new(&mut storage, 64, 1).unwrap();
        device.observe(&mut observer);
        let mut devices = [Place::Held(device)];
        let mut cache = MetaCache::<4>::new();
        cache
            .update(A, &mut devices, (0, 16), 8, &[7; 8], Level::Mapping)
            .unwrap();
        cache
            .update(A, &mut devices, (32, 16), 40, &[9; 2], Level::Refcount)
            .unwrap();
        assert!(cache.is_dirty(1));
        // Nothing reached the device yet, and reads see the updates.
        assert_eq!(devices[0].as_ref().unwrap().writes(), 0);
        assert_eq!(cache.slice(A, &mut devices, 0, 16).unwrap()[8], 7);
        assert!(cache
            .update(A, &mut devices, (0, 16), 12, &[1; 8], Level::Mapping)
            .is_err());
        {
            let mut device = devices[0].take().unwrap();
            cache.write_back(1, &mut device).unwrap();
            assert!(!cache.is_dirty(1));
            assert_eq!(device.contents()[8..16], [7; 8]);
            assert_eq!(device.contents()[40..42], [9; 2]);
        }
        assert_eq!(log, [32, -1, 0]);
    }

    #[test]
    fn evicting_a_dirty_slice_writes_its_image_back_on_its_own_device() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        let mut devices = [
            Place::Held(MemDevice::new(&mut a, 64, 1).unwrap()),
            Place::Held(MemDevice::new(&mut b, 64, 2).unwrap()),
        ];
        let mut cache = MetaCache::<1>::new();
        cache
            .update(A, &mut devices, (0, 16), 0, &[5; 4], Level::Mapping)
            .unwrap();
        cache.slice(B, &mut devices, 16, 16).unwrap();
        assert!(!cache.is_dirty(1));
        let a = devices[0].as_ref().unwrap();
        assert_eq!((a.writes(), a.flushes()), (1, 1));
        assert_eq!(a.contents()[..4], [5; 4]);
        // A dirty slice of a closed image cannot be written: an error.
        cache
            .update(B, &mut devices, (16, 16), 16, &[1], Level::Refcount)
            .unwrap();
        devices[1] = Place::Empty;
        assert!(cache.slice(A, &mut devices, 0, 16).is_err());
    }

    #[test]
    fn a_miss_with_loading_off_reads_nothing_and_insert_places_the_slice() {
        let mut storage = numbered();
        let mut devices = [Place::Held(MemDevice::new(&mut storage, 40, 1).unwrap())];
        let mut cache = MetaCache::<1>::new();
        cache.set_loading(false);
        assert_eq!(
            cache.slice(A, &mut devices, 32, 16).unwrap_err().kind(),
            ErrorKind::Busy
        );
        let miss = cache.take_miss().unwrap();
        assert_eq!((miss.image, miss.offset, miss.len), (A, 32, 16));
        assert_eq!(devices[0].as_ref().unwrap().reads(), 0);
        // Too many bytes for the slice: refused.
        assert!(cache.insert(&miss, &mut devices, &[0; 17]).is_err());
        // Past the device's end reads as zero, as a load.
        assert!(cache.insert(&miss, &mut devices, &[7; 8]).unwrap());
        assert_eq!(cache.slice(A, &mut devices, 32, 16).unwrap()[7..9], [7, 0]);
        // Cached already (perhaps updated since): left alone.
        cache
            .update(A, &mut devices, (32, 16), 32, &[9], Level::Mapping)
            .unwrap();
        assert!(!cache.insert(&miss, &mut devices, &[1; 8]).unwrap());
        assert_eq!(cache.slice(A, &mut devices, 32, 16).unwrap()[0], 9);
        // Evicting the dirty slice writes it back: a miss recorded before
        // that write may carry stale bytes and is dropped.
        assert!(cache.slice(A, &mut devices, 0, 16).is_err());
        let stale = cache.take_miss().unwrap();
        cache.set_loading(true);
        cache.slice(A, &mut devices, 16, 16).unwrap();
        assert_eq!(devices[0].as_ref().unwrap().contents()[32], 9);
        assert!(!cache.insert(&stale, &mut devices, &[1; 16]).unwrap());
        assert_eq!(devices[0].as_ref().unwrap().reads(), 1);
    }
}
