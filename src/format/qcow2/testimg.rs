//! Test support: builds small qcow2 images in memory (512-byte clusters).

/// Cluster size of built images.
pub const CLUSTER: usize = 512;
const L2_ENTRIES: usize = CLUSTER / 8;

/// A qcow2 v3 image under construction: header, one L1 cluster, then L2
/// tables and data clusters appended as needed.
pub struct TestImage {
    pub bytes: Vec<u8>,
}

impl TestImage {
    /// A blank image of `size` virtual bytes with an optional backing
    /// reference (name, format).
    pub fn new(size: u64, backing: Option<(&str, Option<&str>)>) -> Self {
        let mut bytes = vec![0u8; 2 * CLUSTER];
        let l1_size = (size as usize).div_ceil(CLUSTER * L2_ENTRIES) as u32;
        assert!(l1_size as usize <= L2_ENTRIES);
        let mut put = |off: usize, v: &[u8]| bytes[off..off + v.len()].copy_from_slice(v);
        put(0, &super::header::MAGIC.to_be_bytes());
        put(4, &3u32.to_be_bytes());
        put(20, &9u32.to_be_bytes());
        put(24, &size.to_be_bytes());
        put(36, &l1_size.to_be_bytes());
        put(40, &(CLUSTER as u64).to_be_bytes());
        put(96, &4u32.to_be_bytes());
        put(100, &104u32.to_be_bytes());
        let mut pos = 104;
        if let Some((name, format)) = backing {
            if let Some(format) = format {
                put(pos, &0xe279_2acau32.to_be_bytes());
                put(pos + 4, &(format.len() as u32).to_be_bytes());
                put(pos + 8, format.as_bytes());
                pos += 8 + format.len().div_ceil(8) * 8;
            }
            pos += 8; // end marker (zeros)
            put(pos, name.as_bytes());
            put(8, &(pos as u64).to_be_bytes());
            put(16, &(name.len() as u32).to_be_bytes());
        }
        Self { bytes }
    }

    fn entry(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.bytes[off..off + 8].try_into().unwrap())
    }

    fn set_entry(&mut self, off: usize, value: u64) {
        self.bytes[off..off + 8].copy_from_slice(&value.to_be_bytes());
    }

    fn append_cluster(&mut self) -> u64 {
        let at = self.bytes.len();
        self.bytes.resize(at + CLUSTER, 0);
        at as u64
    }

    /// The byte offset of the L2 entry for guest `offset`, allocating its
    /// L2 table.
    fn l2_slot(&mut self, offset: u64) -> usize {
        let cluster = offset as usize / CLUSTER;
        let l1_off = CLUSTER + cluster / L2_ENTRIES * 8;
        let mut l2 = self.entry(l1_off) & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            l2 = self.append_cluster();
            self.set_entry(l1_off, l2 | 1 << 63);
        }
        l2 as usize + cluster % L2_ENTRIES * 8
    }

    /// Stores a cluster filled with `byte` at guest `offset` (cluster aligned).
    pub fn fill(&mut self, offset: u64, byte: u8) {
        let slot = self.l2_slot(offset);
        let data = self.append_cluster();
        self.bytes[data as usize..data as usize + CLUSTER].fill(byte);
        self.set_entry(slot, data | 1 << 63);
    }

    /// Marks the cluster at guest `offset` as reading zeros.
    pub fn zero(&mut self, offset: u64) {
        let slot = self.l2_slot(offset);
        self.set_entry(slot, 1);
    }
}
