//! A bounded cache of metadata table slices shared by every format node.
//!
//! qcow2 L1 and L2 tables are read through here in slices of at most
//! [`SLICE_SIZE`] bytes, so memory stays fixed whatever the cluster size or
//! the number of open images. Entries are keyed by (owner, byte offset) and
//! evicted least-recently-used. Metadata is written through: a writer updates
//! the device first and then [`MetaCache::patch`]es the cached copy, so a
//! slice never holds anything the device does not.

use crate::device::Device;
use crate::error::Result;

/// Largest slice held by one cache entry.
pub const SLICE_SIZE: usize = 4096;

/// Identifies which open image a slice belongs to (a node's pool key).
pub type Owner = u64;

#[derive(Clone, Copy)]
struct Tag {
    owner: Owner,
    offset: u64,
    len: u64,
    last_use: u64,
    valid: bool,
}

const EMPTY: Tag = Tag {
    owner: 0,
    offset: 0,
    len: 0,
    last_use: 0,
    valid: false,
};

/// `SLOTS` slices of table data.
pub struct MetaCache<const SLOTS: usize> {
    tags: [Tag; SLOTS],
    data: [[u8; SLICE_SIZE]; SLOTS],
    clock: u64,
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
        }
    }

    /// The slice of `slice_len` bytes at `offset` of `owner`'s image, read from
    /// `device` on a miss. Bytes past the device's end read as zero.
    ///
    /// # Errors
    /// Whatever the device returns on a failed read.
    pub fn slice<D: Device>(
        &mut self,
        owner: Owner,
        device: &mut D,
        offset: u64,
        slice_len: usize,
    ) -> Result<&[u8]> {
        self.clock += 1;
        let hit = self.tags.iter().position(|t| {
            t.valid && t.owner == owner && t.offset == offset && t.len == slice_len as u64
        });
        let slot = match hit {
            Some(slot) => slot,
            None => {
                let slot = self.victim();
                self.tags[slot].valid = false;
                let present = device.size().saturating_sub(offset).min(slice_len as u64) as usize;
                let buf = &mut self.data[slot][..slice_len];
                if present > 0 {
                    device.read_at(offset, &mut buf[..present])?;
                }
                buf[present..].fill(0);
                self.tags[slot] = Tag {
                    owner,
                    offset,
                    len: slice_len as u64,
                    last_use: 0,
                    valid: true,
                };
                slot
            }
        };
        self.tags[slot].last_use = self.clock;
        Ok(&self.data[slot][..slice_len])
    }

    /// Copies `bytes`, just written to `owner`'s device at `offset`, into
    /// every cached slice that covers them.
    pub fn patch(&mut self, owner: Owner, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        for (tag, data) in self.tags.iter().zip(self.data.iter_mut()) {
            let slice_end = tag.offset + tag.len;
            if !tag.valid || tag.owner != owner || end <= tag.offset || offset >= slice_end {
                continue;
            }
            let from = offset.max(tag.offset);
            let to = end.min(slice_end);
            let dst = (from - tag.offset) as usize;
            let src = (from - offset) as usize;
            let n = (to - from) as usize;
            data[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
        }
    }

    /// Forgets every slice of `owner` (its image was closed).
    pub fn forget(&mut self, owner: Owner) {
        for tag in self.tags.iter_mut().filter(|t| t.owner == owner) {
            tag.valid = false;
        }
    }

    fn victim(&self) -> usize {
        let mut best = 0;
        for (i, tag) in self.tags.iter().enumerate() {
            if !tag.valid {
                return i;
            }
            if tag.last_use < self.tags[best].last_use {
                best = i;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    #[test]
    fn hits_evicts_lru_and_zero_fills_past_end() {
        let mut storage = [0u8; 64];
        for (i, b) in storage.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut dev = MemDevice::new(&mut storage, 40, 1).unwrap();
        let mut cache = MetaCache::<2>::new();
        assert_eq!(cache.slice(1, &mut dev, 0, 16).unwrap()[3], 3);
        assert_eq!(cache.slice(1, &mut dev, 16, 16).unwrap()[0], 16);
        assert_eq!(cache.slice(1, &mut dev, 0, 16).unwrap()[3], 3);
        assert_eq!(dev.reads(), 2);
        // Slot of offset 16 is least recent: evicted by offset 32.
        let tail = cache.slice(1, &mut dev, 32, 16).unwrap();
        assert_eq!(&tail[..9], &[32, 33, 34, 35, 36, 37, 38, 39, 0]);
        cache.slice(1, &mut dev, 0, 16).unwrap();
        assert_eq!(dev.reads(), 3);
        cache.forget(1);
        cache.slice(1, &mut dev, 0, 16).unwrap();
        assert_eq!(dev.reads(), 4);
        cache.patch(1, 14, &[0xee, 0xef, 0xf0]);
        assert_eq!(
            &cache.slice(1, &mut dev, 0, 16).unwrap()[13..],
            &[13, 0xee, 0xef]
        );
        cache.patch(2, 0, &[1]);
        assert_eq!(cache.slice(1, &mut dev, 0, 16).unwrap()[0], 0);
    }
}
