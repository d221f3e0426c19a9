//! What the guest wrote, checked on the host: fio's verification redone
//! over the final image, block by block, against the chain before the run.
//!
//! fio's job writes every 4 KiB block of its region once, each with fio's
//! verify header (`struct verify_header`, little-endian: magic `0xacca`,
//! type, length, seed, the block's own offset, time, thread, number, and
//! a crc32c of the header) followed by a crc32c of the rest of the block.
//! So the host can tell, without the guest, that each block of the region
//! holds the write fio made *for that offset*, whole, and that every byte
//! outside it is the chain's from before the run. The guest's own checks
//! (fio's `--verify_only`, the hash of its disk) cover what it reads; this
//! covers what the images hold, independently of the server's reads.

use std::fmt;

/// fio's block size in the job (`bs=4k`).
pub const BLOCK: usize = 4096;
/// `FIO_HDR_MAGIC`.
const MAGIC: u16 = 0xacca;
/// Bytes of `struct verify_header`; its last field is the header's crc32c.
const HEADER: usize = 40;
/// The data's crc32c (`struct vhdr_crc32c`) follows the header.
const DATA: usize = HEADER + 4;

/// A block the check refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// The block's byte offset in the guest's disk.
    pub offset: u64,
    /// Why.
    pub reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block at byte {}: {}", self.offset, self.reason)
    }
}

/// Checks the final guest view `after` against the view `before` the run:
/// each block of the first `written` bytes is fio's block for its offset,
/// every other block is unchanged. Returns the number of fio blocks.
///
/// # Errors
/// The first block refused.
pub fn check(before: &[u8], after: &[u8], written: usize) -> Result<usize, Refused> {
    if before.len() != after.len() {
        return Err(Refused {
            offset: before.len().min(after.len()) as u64,
            reason: "the final view's size differs from the chain's before the run",
        });
    }
    let mut blocks = 0;
    for (index, (was, now)) in before.chunks(BLOCK).zip(after.chunks(BLOCK)).enumerate() {
        let offset = (index * BLOCK) as u64;
        let refuse = |reason| Refused { offset, reason };
        if index * BLOCK < written {
            fio_block(now, offset).map_err(refuse)?;
            blocks += 1;
        } else if was != now {
            return Err(refuse("changed, though fio never wrote there"));
        }
    }
    Ok(blocks)
}

/// Whether `block` is fio's verified write for `offset`.
fn fio_block(block: &[u8], offset: u64) -> Result<(), &'static str> {
    if block.len() != BLOCK {
        return Err("a partial block");
    }
    let u16_at = |at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap_or_default());
    if u16_at(0) != MAGIC {
        return Err("no fio verify header (a lost or misplaced write)");
    }
    if u32_at(4) as usize != BLOCK {
        return Err("fio's header names another length");
    }
    if u64_at(16) != offset {
        return Err("fio's block for another offset (a misplaced write)");
    }
    if u32_at(HEADER - 4) != crc32c(&block[..HEADER - 4]) {
        return Err("fio's header fails its crc32c (a torn write)");
    }
    if u32_at(HEADER) != crc32c(&block[DATA..]) {
        return Err("the block's data fails fio's crc32c (a torn or mixed write)");
    }
    Ok(())
}

/// CRC-32C (Castagnoli, reflected, initial value all ones) as fio's
/// `fio_crc32c` computes it: without the final inversion of the standard
/// CRC (checked against blocks fio wrote in the guest).
fn crc32c(bytes: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78;
    let table: [u32; 256] = std::array::from_fn(|n| {
        (0..8).fold(
            n as u32,
            |c, _| if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 },
        )
    });
    bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block laid out as fio writes it, for `offset`.
    fn block(offset: u64, fill: u8) -> Vec<u8> {
        let mut b = vec![fill; BLOCK];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&offset.to_le_bytes());
        let header = crc32c(&b[..HEADER - 4]);
        b[HEADER - 4..HEADER].copy_from_slice(&header.to_le_bytes());
        let data = crc32c(&b[DATA..]);
        b[HEADER..DATA].copy_from_slice(&data.to_le_bytes());
        b
    }

    #[test]
    fn crc32c_is_the_standard_check_value_not_inverted() {
        assert_eq!(!crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn fio_blocks_and_untouched_bytes_pass_and_every_fault_is_named() {
        let before = vec![7u8; 4 * BLOCK];
        let mut after: Vec<u8> = (0..2)
            .flat_map(|i| block(i * BLOCK as u64, i as u8))
            .collect();
        after.extend_from_slice(&before[2 * BLOCK..]);
        assert_eq!(check(&before, &after, 2 * BLOCK), Ok(2));

        let refused = |after: &[u8]| check(&before, after, 2 * BLOCK).unwrap_err();
        let mut swapped = after.clone();
        swapped.copy_within(0..BLOCK, BLOCK);
        assert_eq!(refused(&swapped).offset, BLOCK as u64);
        let mut torn = after.clone();
        torn[BLOCK + 2048] ^= 1;
        assert!(refused(&torn).reason.contains("data fails"));
        let mut lost = after.clone();
        lost[..BLOCK].fill(7);
        assert!(refused(&lost).reason.contains("no fio verify header"));
        let mut stray = after.clone();
        stray[3 * BLOCK] = 0;
        assert_eq!(refused(&stray).offset, 3 * BLOCK as u64);
    }
}
