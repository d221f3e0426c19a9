//! A fixed-size dirty bitmap whose granularity coarsens for large disks.

/// Bits in every bitmap (4 KiB of memory).
pub const BITS: usize = 32 * 1024;
/// Finest granularity in bytes.
pub const MIN_GRANULARITY: u64 = 64 * 1024;

/// Which granules of a disk were written since they were last copied.
#[derive(Clone)]
pub struct DirtyBitmap {
    words: [u64; BITS / 64],
    granularity: u64,
    size: u64,
    count: usize,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes: the granularity is the
    /// smallest power of two (at least [`MIN_GRANULARITY`]) that covers the
    /// disk with [`BITS`] bits.
    pub const fn new(size: u64) -> Self {
        let mut granularity = MIN_GRANULARITY;
        while granularity * (BITS as u64) < size {
            granularity *= 2;
        }
        Self {
            words: [0; BITS / 64],
            granularity,
            size,
            count: 0,
        }
    }

    /// Bytes per bit.
    pub const fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of dirty granules.
    pub const fn dirty_granules(&self) -> usize {
        self.count
    }

    /// Marks `offset..offset + len` dirty.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1).min(self.size - 1) / self.granularity;
        for bit in first..=last {
            let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[word] & mask == 0 {
                self.words[word] |= mask;
                self.count += 1;
            }
        }
    }

    /// Takes the first dirty granule, clearing it: its byte range.
    pub fn take_first(&mut self) -> Option<(u64, u64)> {
        let (word, bits) = self.words.iter().enumerate().find(|(_, w)| **w != 0)?;
        let bit = word as u64 * 64 + u64::from(bits.trailing_zeros());
        self.words[word] &= !(1 << (bit % 64));
        self.count -= 1;
        let start = bit * self.granularity;
        Some((start, self.granularity.min(self.size - start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_coarsens_and_ranges_round_trip() {
        assert_eq!(DirtyBitmap::new(1 << 30).granularity(), MIN_GRANULARITY);
        assert_eq!(DirtyBitmap::new(1 << 40).granularity(), 32 << 20);
        let mut map = DirtyBitmap::new(1 << 20);
        map.mark(65_535, 2);
        map.mark(0, 1);
        assert_eq!(map.dirty_granules(), 2);
        assert_eq!(map.take_first(), Some((0, 65_536)));
        assert_eq!(map.take_first(), Some((65_536, 65_536)));
        assert_eq!(map.take_first(), None);
        let mut odd = DirtyBitmap::new(100_000);
        odd.mark(99_999, 10);
        assert_eq!(odd.take_first(), Some((65_536, 100_000 - 65_536)));
    }
}
