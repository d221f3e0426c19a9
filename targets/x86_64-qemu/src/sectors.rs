//! Byte-granular reads and writes over hardware that moves whole sectors.
//!
//! virtio-blk transfers non-empty multiples of 512 bytes at 512-byte
//! aligned offsets; `blockgraph::Device` takes any offset and length. The
//! aligned middle of a request goes straight to or from the caller's buffer
//! (the kernel's memory is identity-mapped, so any buffer can be DMA'd);
//! an unaligned head or tail goes through a sector-aligned bounce buffer,
//! read-modify-write for writes:
//!
//! ```text
//!  offset 777, 1000 bytes           sector 1         sector 2    sector 3
//!                                |.....[#####|###########|####].....|
//!  write: read sectors 1..=3 into bounce, copy the 1000 bytes in at 265,
//!         write sectors 1..=3 back
//! ```
//!
//! Pure logic over the [`SectorIo`] trait, unit-tested on the host.

use blockgraph::{Error, ErrorKind, Result};

/// The sector size of virtio-blk requests.
pub const SECTOR: usize = 512;

/// The largest request made straight from or into a caller's buffer.
pub const DIRECT_MAX: usize = 1 << 20;

/// Writes are cut only at multiples of this on the disk (besides their
/// ends), when the bounce buffer allows.
const BLOCK: usize = 4096;

/// How many of the `rest` bytes of a write at sector-aligned `pos` go
/// straight from the caller's buffer: whole sectors, cut at multiples of
/// [`DIRECT_MAX`] on the disk, and ending on a [`BLOCK`] boundary when a
/// partial sector follows (0 when none is reached: the bounce buffer takes
/// the piece, up to that boundary or the end).
fn direct_len(pos: u64, rest: usize) -> usize {
    let n = (rest - rest % SECTOR).min(DIRECT_MAX - (pos % DIRECT_MAX as u64) as usize);
    if n == rest {
        return n;
    }
    let end = (pos + n as u64) / BLOCK as u64 * BLOCK as u64;
    end.saturating_sub(pos) as usize
}

/// Hardware that reads and writes whole sectors.
pub trait SectorIo {
    /// Reads sectors from `sector` on into `buf`, whose length is a non-zero
    /// multiple of [`SECTOR`].
    ///
    /// # Errors
    /// As the hardware reports.
    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf`, a non-zero multiple of [`SECTOR`] bytes, from `sector` on.
    ///
    /// # Errors
    /// As the hardware reports.
    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()>;
}

fn check_bounce(bounce: &[u8]) -> Result<()> {
    if bounce.is_empty() || !bounce.len().is_multiple_of(SECTOR) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "bounce buffer must be a non-zero multiple of 512 bytes",
        ));
    }
    Ok(())
}

/// The end of `offset..offset+len`, if it lies within `size`.
fn end_within(offset: u64, len: usize, size: u64) -> Option<u64> {
    offset.checked_add(len as u64).filter(|&end| end <= size)
}

/// Fills `buf` from byte `offset` of a device of `size` bytes.
///
/// # Errors
/// [`ErrorKind::Io`] for a range past the end (as `Device::read_at`
/// documents) and for hardware errors; [`ErrorKind::InvalidInput`] for a
/// bounce buffer that is not a non-zero multiple of [`SECTOR`].
pub fn read_at(
    io: &mut impl SectorIo,
    bounce: &mut [u8],
    size: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    check_bounce(bounce)?;
    if end_within(offset, buf.len(), size).is_none() {
        return Err(Error::new(ErrorKind::Io, "read past the end of the disk"));
    }
    let mut done = 0;
    while done < buf.len() {
        let pos = offset + done as u64;
        let sector = pos / SECTOR as u64;
        let skip = (pos % SECTOR as u64) as usize;
        let rest = buf.len() - done;
        if skip == 0 && rest >= SECTOR {
            let n = (rest - rest % SECTOR).min(DIRECT_MAX);
            io.read_sectors(sector, &mut buf[done..done + n])?;
            done += n;
        } else {
            let n = rest.min(bounce.len() - skip);
            let span = (skip + n).div_ceil(SECTOR) * SECTOR;
            io.read_sectors(sector, &mut bounce[..span])?;
            buf[done..done + n].copy_from_slice(&bounce[skip..skip + n]);
            done += n;
        }
    }
    Ok(())
}

/// Writes `buf` at byte `offset` of a device of `size` bytes (which cannot
/// grow).
///
/// # Errors
/// [`ErrorKind::NoSpace`] for a range past the end (nothing is written),
/// [`ErrorKind::Io`] for hardware errors, [`ErrorKind::InvalidInput`] for a
/// bad bounce buffer.
pub fn write_at(
    io: &mut impl SectorIo,
    bounce: &mut [u8],
    size: u64,
    offset: u64,
    buf: &[u8],
) -> Result<()> {
    check_bounce(bounce)?;
    if end_within(offset, buf.len(), size).is_none() {
        return Err(Error::new(
            ErrorKind::NoSpace,
            "no space left on the device (write past the end of the disk)",
        ));
    }
    let mut done = 0;
    while done < buf.len() {
        let pos = offset + done as u64;
        let sector = pos / SECTOR as u64;
        let skip = (pos % SECTOR as u64) as usize;
        let rest = buf.len() - done;
        let direct = match skip == 0 && rest >= SECTOR {
            true => direct_len(pos, rest),
            false => 0,
        };
        if direct > 0 {
            io.write_sectors(sector, &buf[done..done + direct])?;
            done += direct;
        } else {
            // Read-modify-write of the sectors the piece touches: only the
            // first and the last can be partial. The piece ends on a 4 KiB
            // boundary when the bounce buffer reaches one, so a power cut
            // between pieces never splits a 4 KiB block the write covers.
            let to_block = BLOCK - (pos % BLOCK as u64) as usize;
            let n = rest.min(bounce.len() - skip).min(to_block);
            let span = (skip + n).div_ceil(SECTOR) * SECTOR;
            if skip != 0 {
                io.read_sectors(sector, &mut bounce[..SECTOR])?;
            }
            let tail_partial = !(skip + n).is_multiple_of(SECTOR);
            if tail_partial && !(skip != 0 && span == SECTOR) {
                let last = span / SECTOR - 1;
                io.read_sectors(sector + last as u64, &mut bounce[span - SECTOR..span])?;
            }
            bounce[skip..skip + n].copy_from_slice(&buf[done..done + n]);
            io.write_sectors(sector, &bounce[..span])?;
            done += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sector disk in memory that checks every request's shape.
    struct Disk {
        data: Vec<u8>,
        reads: usize,
        writes: usize,
        fail_after: Option<usize>,
    }

    impl Disk {
        fn new(sectors: usize) -> Self {
            let data = (0..sectors * SECTOR).map(|i| (i % 253) as u8).collect();
            Disk {
                data,
                reads: 0,
                writes: 0,
                fail_after: None,
            }
        }

        fn range(&mut self, sector: u64, len: usize) -> Result<core::ops::Range<usize>> {
            assert!(
                len != 0 && len.is_multiple_of(SECTOR),
                "bad request length {len}"
            );
            assert!(len <= DIRECT_MAX, "request of {len} bytes is too large");
            if let Some(n) = self.fail_after.as_mut() {
                if *n == 0 {
                    return Err(Error::new(ErrorKind::Io, "injected failure"));
                }
                *n -= 1;
            }
            let start = sector as usize * SECTOR;
            assert!(start + len <= self.data.len(), "request past the end");
            Ok(start..start + len)
        }
    }

    impl SectorIo for Disk {
        fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
            let range = self.range(sector, buf.len())?;
            self.reads += 1;
            buf.copy_from_slice(&self.data[range]);
            Ok(())
        }

        fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
            let range = self.range(sector, buf.len())?;
            self.writes += 1;
            self.data[range].copy_from_slice(buf);
            Ok(())
        }
    }

    /// xorshift64: deterministic, no dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A disk that records where each write request starts and ends.
    struct Recorder {
        disk: Disk,
        cuts: Vec<(u64, u64)>,
    }

    impl SectorIo for Recorder {
        fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<()> {
            self.disk.read_sectors(sector, buf)
        }

        fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<()> {
            let start = sector * SECTOR as u64;
            self.cuts.push((start, start + buf.len() as u64));
            self.disk.write_sectors(sector, buf)
        }
    }

    #[test]
    fn writes_are_cut_only_on_4_kib_boundaries() {
        let sectors = 8 * DIRECT_MAX / SECTOR;
        let mut io = Recorder {
            disk: Disk::new(sectors),
            cuts: Vec::new(),
        };
        let mut bounce = vec![0u8; 64 * 1024];
        let size = (sectors * SECTOR) as u64;
        for offset in [777u64, 3 * 4096 + 512, (1 << 20) - 100, 4096] {
            let data = vec![0x5au8; 6 * DIRECT_MAX + 333];
            io.cuts.clear();
            write_at(&mut io, &mut bounce, size, offset, &data).unwrap();
            let (first, last) = (io.cuts[0].0, io.cuts[io.cuts.len() - 1].1);
            for &(start, end) in &io.cuts {
                for at in [start, end] {
                    if at != first && at != last {
                        assert!(at % 4096 == 0, "a write cut at {at} (offset {offset})");
                    }
                }
            }
        }
    }

    #[test]
    fn the_example_of_the_module_docs() {
        let mut disk = Disk::new(16);
        let mut model = disk.data.clone();
        let mut bounce = vec![0u8; 64 * 1024];
        let size = disk.data.len() as u64;
        let data: Vec<u8> = (0..1000).map(|i| (i * 7) as u8).collect();
        write_at(&mut disk, &mut bounce, size, 777, &data).unwrap();
        model[777..1777].copy_from_slice(&data);
        assert_eq!(disk.data, model);
        // Sector 1 and sector 3 are read, sectors 1..=3 written once.
        assert_eq!((disk.reads, disk.writes), (2, 1));
        let mut back = vec![0u8; 1000];
        read_at(&mut disk, &mut bounce, size, 777, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn random_requests_match_a_byte_model() {
        let sectors = 700; // ~350 KiB: crosses several bounce and direct chunks
        let mut disk = Disk::new(sectors);
        let mut model = disk.data.clone();
        let size = model.len() as u64;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for bounce_len in [SECTOR, 2 * SECTOR, 64 * 1024] {
            let mut bounce = vec![0u8; bounce_len];
            for round in 0..400 {
                let offset = match round % 4 {
                    0 => rng.below(size),
                    1 => rng.below(sectors as u64) * SECTOR as u64,
                    2 => rng.below(sectors as u64) * SECTOR as u64 + SECTOR as u64 - 1,
                    _ => size - rng.below(2 * SECTOR as u64) - 1,
                };
                let max = (size - offset) as usize;
                let len = match round % 3 {
                    0 => rng.below(max as u64 + 1) as usize,
                    1 => (rng.below(3 * SECTOR as u64) as usize).min(max),
                    _ => max.min(SECTOR * (1 + rng.below(4) as usize)),
                };
                if round % 2 == 0 {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    write_at(&mut disk, &mut bounce, size, offset, &data).unwrap();
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                    assert!(
                        disk.data == model,
                        "write {offset}+{len} with bounce {bounce_len}"
                    );
                } else {
                    let mut got = vec![0u8; len];
                    read_at(&mut disk, &mut bounce, size, offset, &mut got).unwrap();
                    assert!(got[..] == model[offset as usize..offset as usize + len]);
                }
            }
        }
    }

    #[test]
    fn past_the_end_and_bad_bounce_buffers_are_errors_without_io() {
        let mut disk = Disk::new(4);
        let size = disk.data.len() as u64;
        let mut bounce = vec![0u8; 1024];
        let err = write_at(&mut disk, &mut bounce, size, size - 1, &[1, 2]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        let err = write_at(&mut disk, &mut bounce, size, u64::MAX, &[1]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        let err = read_at(&mut disk, &mut bounce, size, size, &mut [0]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        let err = read_at(&mut disk, &mut [0u8; 100], size, 0, &mut [0]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!((disk.reads, disk.writes), (0, 0));
        // Empty requests at the very end are fine and do nothing.
        write_at(&mut disk, &mut bounce, size, size, &[]).unwrap();
        read_at(&mut disk, &mut bounce, size, size, &mut []).unwrap();
        assert_eq!((disk.reads, disk.writes), (0, 0));
    }

    #[test]
    fn hardware_errors_are_passed_on() {
        let mut disk = Disk::new(8);
        let size = disk.data.len() as u64;
        let mut bounce = vec![0u8; 1024];
        disk.fail_after = Some(1); // the head's read works, the tail's fails
        let err = write_at(&mut disk, &mut bounce, size, 10, &[7; 600]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(disk.writes, 0, "nothing written after a failed read");
    }
}
