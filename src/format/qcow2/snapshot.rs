//! The internal snapshot table, read as hostile bytes: a bounded walk at
//! open, and the inactive (snapshot) L1 tables it names, which the overlap
//! check keeps guest data off.
//!
//! An entry is a fixed 40-byte part, then its extra data, ID and name; the
//! next entry starts at the next multiple of 8:
//!
//! ```text
//!  0 l1_table_offset (u64)   8 l1_size (u32)   12 id_str_size (u16)
//! 14 name_size (u16)        16 date, vm clock, vm state size
//! 36 extra_data_size (u32)  40 extra data, ID, name
//! ```

use super::header::{Header, MAX_L1_ENTRIES};
use crate::error::{fail, ErrorKind, Result};

/// Largest snapshot table accepted, in bytes (QEMU: 64 MiB).
pub(crate) const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// Most extra data accepted in one entry, in bytes (QEMU's limit).
pub(crate) const MAX_EXTRA_DATA: u64 = 1024;
/// Length of an entry's fixed part.
pub(crate) const ENTRY_HEADER: usize = 40;

const OFF_L1_OFFSET: usize = 0;
const OFF_L1_SIZE: usize = 8;
const OFF_ID_SIZE: usize = 12;
const OFF_NAME_SIZE: usize = 14;
const OFF_DATE_SEC: usize = 16;
const OFF_DATE_NSEC: usize = 20;
const OFF_VM_CLOCK: usize = 24;
const OFF_VM_STATE_SIZE: usize = 32;
const OFF_EXTRA_SIZE: usize = 36;
/// Extra data: the 64-bit VM state size, the disk size, the icount.
const EXTRA_VM_STATE_LARGE: usize = 0;
const EXTRA_DISK_SIZE: usize = 8;
const EXTRA_ICOUNT: usize = 16;

/// Longest ID or name a listed snapshot shows; longer ones are cut.
pub const MAX_SHOWN_NAME: usize = 1024;

/// Where a snapshot's entry lies (device offset, bytes with padding) and
/// its L1 table (device offset, entries).
pub(crate) type SnapshotPlace = ((u64, u64), (u64, u32));

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo<'a> {
    /// Its ID (`"1"`, `"2"`, ...), at most [`MAX_SHOWN_NAME`] bytes of it.
    pub id: &'a str,
    /// Its name (QEMU's tag), at most [`MAX_SHOWN_NAME`] bytes of it.
    pub name: &'a str,
    /// When it was taken: seconds and nanoseconds since the Unix epoch.
    pub date: (u32, u32),
    /// The guest clock when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// The instruction count when it was taken, if recorded.
    pub icount: Option<u64>,
    /// The image's virtual size when it was taken, if recorded.
    pub disk_size: Option<u64>,
    /// Where its entry and its L1 table lie.
    pub(crate) place: SnapshotPlace,
}

/// What the overlap check needs of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The snapshot's L1 table: byte offset and length in bytes.
    pub l1: (u64, u64),
    /// Where the next entry starts.
    pub next: u64,
}

/// The snapshot table of an image, as validated at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Table {
    /// Byte offset of the first entry.
    pub offset: u64,
    /// Number of entries.
    pub count: u32,
    /// Bytes from the first entry to the end of the last one.
    pub bytes: u64,
    /// The lowest start and highest end of the snapshots' L1 tables
    /// (`(0, 0)` when there are none): a write outside needs no walk.
    pub l1_span: (u64, u64),
}

impl Entry {
    /// Decodes the fixed part `raw` of the entry at `offset` and checks it
    /// against the table's limits and the file: extra data at most 1 KiB,
    /// the entry inside the 64 MiB the table may use (from `table`) and
    /// inside the file, its L1 table cluster aligned, at most 32 MiB, and
    /// inside the file.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`], one message per broken rule.
    pub fn parse(
        raw: &[u8; ENTRY_HEADER],
        (table, offset): (u64, u64),
        cluster_size: u64,
        file_size: u64,
    ) -> Result<Self> {
        let u16_at = |at: usize| u64::from(u16::from_be_bytes([raw[at], raw[at + 1]]));
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&raw[at..at + 4]);
            u64::from(u32::from_be_bytes(b))
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[OFF_L1_OFFSET..OFF_L1_OFFSET + 8]);
        let l1_offset = u64::from_be_bytes(b);
        let l1_size = u32_at(OFF_L1_SIZE);
        let extra = u32_at(OFF_EXTRA_SIZE);
        if extra > MAX_EXTRA_DATA {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot entry has too much extra data (over 1 KiB)",
            );
        }
        // At most 40 + 1024 + 2 * 65535 bytes: no overflow past the checks
        // on `offset` below.
        let end =
            offset + ENTRY_HEADER as u64 + extra + u16_at(OFF_ID_SIZE) + u16_at(OFF_NAME_SIZE);
        if end - table > MAX_TABLE_BYTES {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot table too large (over 64 MiB)",
            );
        }
        if end > file_size {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot table lies past the end of the image",
            );
        }
        if l1_size > MAX_L1_ENTRIES {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot L1 table too large (over 32 MiB)",
            );
        }
        let l1_bytes = l1_size * 8;
        let misplaced = l1_bytes > 0
            && (l1_offset == 0
                || !l1_offset.is_multiple_of(cluster_size)
                || l1_offset
                    .checked_add(l1_bytes)
                    .is_none_or(|e| e > file_size));
        if misplaced {
            return fail(
                ErrorKind::Corrupt,
                "qcow2 snapshot L1 table offset is invalid",
            );
        }
        Ok(Self {
            l1: (l1_offset, l1_bytes),
            next: end.next_multiple_of(8),
        })
    }
}

impl Table {
    /// Calls `visit` with every snapshot of the table, in order, reading
    /// each entry with `read` (its fixed part, extra data, ID and name: the
    /// table was checked at open, so each lies inside the file). An ID or
    /// name that is not UTF-8 shows as `?`.
    ///
    /// # Errors
    /// Errors of `read` and `visit`.
    pub fn visit(
        &self,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
        mut visit: impl FnMut(&SnapshotInfo<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut at = self.offset;
        let mut raw = [0u8; ENTRY_HEADER];
        let mut extra = [0u8; MAX_EXTRA_DATA as usize];
        let (mut id, mut name) = ([0u8; MAX_SHOWN_NAME], [0u8; MAX_SHOWN_NAME]);
        for _ in 0..self.count {
            read(at, &mut raw)?;
            let u16_at = |o: usize| usize::from(u16::from_be_bytes([raw[o], raw[o + 1]]));
            let u32_at =
                |o: usize| u32::from_be_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
            let u64_of = |b: &[u8]| {
                let mut v = [0u8; 8];
                v.copy_from_slice(&b[..8]);
                u64::from_be_bytes(v)
            };
            let extra_len = (u32_at(OFF_EXTRA_SIZE) as usize).min(extra.len());
            let (id_len, name_len) = (u16_at(OFF_ID_SIZE), u16_at(OFF_NAME_SIZE));
            let mut pos = at + ENTRY_HEADER as u64;
            read(pos, &mut extra[..extra_len])?;
            pos += u32_at(OFF_EXTRA_SIZE) as u64;
            let id = &mut id[..id_len.min(MAX_SHOWN_NAME)];
            read(pos, id)?;
            pos += id_len as u64;
            let name = &mut name[..name_len.min(MAX_SHOWN_NAME)];
            read(pos, name)?;
            let state_large = (extra_len >= EXTRA_VM_STATE_LARGE + 8)
                .then(|| u64_of(&extra[EXTRA_VM_STATE_LARGE..]));
            let icount = (extra_len >= EXTRA_ICOUNT + 8)
                .then(|| u64_of(&extra[EXTRA_ICOUNT..]))
                .filter(|&n| n != u64::MAX);
            let end = at
                + ENTRY_HEADER as u64
                + u64::from(u32_at(OFF_EXTRA_SIZE))
                + id_len as u64
                + name_len as u64;
            let l1 = (u64_of(&raw[OFF_L1_OFFSET..]), u32_at(OFF_L1_SIZE));
            let info = SnapshotInfo {
                place: ((at, end.next_multiple_of(8) - at), l1),
                id: core::str::from_utf8(id).unwrap_or("?"),
                name: core::str::from_utf8(name).unwrap_or("?"),
                date: (u32_at(OFF_DATE_SEC), u32_at(OFF_DATE_NSEC)),
                vm_clock_nsec: u64_of(&raw[OFF_VM_CLOCK..]),
                vm_state_size: state_large.unwrap_or(u64::from(u32_at(OFF_VM_STATE_SIZE))),
                icount,
                disk_size: (extra_len >= EXTRA_DISK_SIZE + 8)
                    .then(|| u64_of(&extra[EXTRA_DISK_SIZE..])),
            };
            visit(&info)?;
            at = end.next_multiple_of(8);
        }
        Ok(())
    }

    /// Walks the snapshot table of the image with `header` once, reading
    /// each entry's fixed part with `read` (at most 65536 reads of 40
    /// bytes), and checks every entry ([`Entry::parse`]).
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] for a table or entry QEMU refuses, or whose
    /// snapshot L1 table is misplaced; errors of `read`.
    pub fn check(
        header: &Header,
        file_size: u64,
        mut read: impl FnMut(u64, &mut [u8; ENTRY_HEADER]) -> Result<()>,
    ) -> Result<Self> {
        let offset = header.snapshots_offset;
        let mut table = Self {
            offset,
            count: header.nb_snapshots,
            bytes: 0,
            l1_span: (0, 0),
        };
        if header.nb_snapshots == 0 {
            return Ok(table);
        }
        if offset == 0 || offset >= file_size {
            return fail(ErrorKind::Corrupt, "qcow2 snapshot table offset is invalid");
        }
        let mut at = offset;
        let mut raw = [0u8; ENTRY_HEADER];
        for _ in 0..header.nb_snapshots {
            if at + ENTRY_HEADER as u64 > file_size {
                return fail(
                    ErrorKind::Corrupt,
                    "qcow2 snapshot table lies past the end of the image",
                );
            }
            read(at, &mut raw)?;
            let entry = Entry::parse(&raw, (offset, at), header.cluster_size(), file_size)?;
            table.bytes = entry.next - offset;
            let (l1, len) = entry.l1;
            if len > 0 {
                table.l1_span = match table.l1_span {
                    (0, 0) => (l1, l1 + len),
                    (lo, hi) => (lo.min(l1), hi.max(l1 + len)),
                };
            }
            at = entry.next;
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(l1: u64, l1_size: u32, id: u16, name: u16, extra: u32) -> [u8; ENTRY_HEADER] {
        let mut raw = [0u8; ENTRY_HEADER];
        raw[..8].copy_from_slice(&l1.to_be_bytes());
        raw[8..12].copy_from_slice(&l1_size.to_be_bytes());
        raw[12..14].copy_from_slice(&id.to_be_bytes());
        raw[14..16].copy_from_slice(&name.to_be_bytes());
        raw[36..40].copy_from_slice(&extra.to_be_bytes());
        raw
    }

    #[test]
    fn entries_are_bounded_by_the_limits_and_the_file() {
        let cs = 65536;
        let file = 1 << 20;
        let parse = |raw| Entry::parse(&raw, (cs, cs), cs, file);
        let ok = parse(entry(2 * cs, 4, 1, 2, 16)).unwrap();
        assert_eq!(
            ok,
            Entry {
                l1: (2 * cs, 32),
                next: cs + 64
            }
        );
        let message = |raw| parse(raw).unwrap_err().message();
        assert!(message(entry(2 * cs, 4, 1, 2, 1025)).contains("extra data"));
        assert!(message(entry(2 * cs, 4, 1, 2, u32::MAX)).contains("extra data"));
        let long = entry(2 * cs, 4, u16::MAX, u16::MAX, 1024);
        let past = Entry::parse(&long, (cs, cs), cs, 3 * cs).unwrap_err();
        assert!(past.message().contains("past the end"));
        assert!(message(entry(2 * cs + 8, 4, 1, 2, 0)).contains("L1 table offset"));
        assert!(message(entry(0, 4, 1, 2, 0)).contains("L1 table offset"));
        assert!(message(entry(file, 1, 1, 2, 0)).contains("L1 table offset"));
        assert!(message(entry(cs, u32::MAX, 1, 2, 0)).contains("L1 table too large"));
        // An empty L1 table may sit anywhere.
        assert!(parse(entry(7, 0, 1, 2, 0)).is_ok());
        // The 64 MiB bound counts from the table's start.
        let far = Entry::parse(
            &entry(cs, 1, 1, 1, 0),
            (0, MAX_TABLE_BYTES - 20),
            cs,
            u64::MAX,
        );
        assert!(far.unwrap_err().message().contains("64 MiB"));
    }
}
