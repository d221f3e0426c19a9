//! The whole-image check of the L2 tables, in bounded steps
//! ([`Qcow2::check_tables_step`]).
//!
//! Open does not read the L2 tables: each L2 slice is checked as the
//! metadata cache loads it (`Tables::l2_slice`), so no entry is used
//! unchecked. This check visits every distinct L2 table once (an
//! [`L2Walk`]) and refuses the image on the first bad entry with the same
//! errors, so a front end (the CLI's commands) or a VMM's idle time can
//! find a hostile table before a guest touches it. The check before the
//! first write ([`Qcow2::check_counted_step`]) walks the same tables and
//! checks every entry too: when it completes, so has this one.

use super::refcount::CHUNK;
use super::walk::{Found, L2Walk};
use super::{check_l2_entries, Qcow2, Tables};
use crate::device::Device;
use crate::error::Result;

/// Where a walk over every entry of the L2 tables is: the walk over the
/// tables and the table being read. About 4 KiB. Both the L2 check
/// ([`Qcow2::check_tables_step`]) and the check before the first write
/// ([`Qcow2::check_counted_step`]) resume one.
pub struct TableCheck {
    walk: L2Walk,
    /// The table being checked, and its bytes done.
    table: Option<(u64, u64)>,
}

impl Default for TableCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl TableCheck {
    /// A check at its start.
    pub const fn new() -> Self {
        Self {
            walk: L2Walk::new(),
            table: None,
        }
    }
}

/// What one read of a [`TableCheck`] gave.
pub(super) enum Piece {
    /// L2 entries, in the first bytes of the chunk.
    Entries(usize),
    /// L1 entries: the walk went on (it may have found the next table).
    Walked,
    /// The L1 entry budget ran out before a read.
    Later,
    /// Every table was visited.
    Done,
}

impl Qcow2 {
    /// Whether every entry of every L2 table has been checked (by
    /// [`Qcow2::check_tables_step`] or the check before the first write).
    pub fn tables_checked(&self) -> bool {
        self.tables_checked
    }

    /// One step of the whole-image check of the L2 tables, resumed from
    /// `check`: at most `budget` device reads of at most 4 KiB (L1 entries
    /// or L2 entries), each L2 entry checked as a lookup decodes it
    /// (aligned, inside the image). Returns `true` once every distinct L2
    /// table the L1 table names has been checked (at once when it was
    /// before). Nothing is written.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`](crate::error::ErrorKind::Corrupt) for the
    /// first bad entry (the same error a lookup of it returns), device
    /// errors.
    pub fn check_tables_step<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
        check: &mut TableCheck,
        budget: u64,
    ) -> Result<bool> {
        // Until this check or the first-write check (which needs every
        // entry checked before anything is written) completes, the tables
        // on the device are as they were at open: read from there.
        if self.tables_checked {
            return Ok(true);
        }
        let device_size = t.device_size();
        let mut chunk = [0u8; CHUNK];
        for _ in 0..budget {
            // One L1 read at most: its entry budget is one read's worth.
            let mut one_read = check.walk.next_read_len(self.l1_used);
            match self.next_piece(t, check, &mut chunk, &mut one_read)? {
                Piece::Entries(n) => {
                    check_l2_entries(&chunk[..n], self.layout(), device_size)?;
                }
                Piece::Walked | Piece::Later => {}
                Piece::Done => {
                    self.tables_checked = true;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// One device read of the walk `check`: the next piece (at most 4 KiB)
    /// of the L2 table being read into `chunk`, or else L1 entries (at most
    /// `l1_budget`, taken off it) to the next table.
    ///
    /// # Errors
    /// Device errors.
    pub(super) fn next_piece<D: Device, const S: usize>(
        &self,
        t: &mut Tables<'_, D, S>,
        check: &mut TableCheck,
        chunk: &mut [u8; CHUNK],
        l1_budget: &mut u64,
    ) -> Result<Piece> {
        let cs = self.cluster_size();
        if let Some((table, done)) = check.table {
            let n = (cs - done).min(CHUNK as u64) as usize;
            t.device()?.read_at(table + done, &mut chunk[..n])?;
            check.table = (done + (n as u64) < cs).then_some((table, done + n as u64));
            return Ok(Piece::Entries(n));
        }
        let l1 = (self.header.l1_table_offset, self.l1_used);
        let read = |t: &mut Tables<'_, D, S>, at: u64, buf: &mut [u8]| t.device()?.read_at(at, buf);
        Ok(
            match check
                .walk
                .next_table(t, l1, self.header.cluster_bits, read, l1_budget)?
            {
                Found::Table(table) => {
                    check.table = Some((table, 0));
                    Piece::Walked
                }
                Found::Later => Piece::Later,
                Found::Done => Piece::Done,
            },
        )
    }

    /// Checks every L2 table at once: [`Qcow2::check_tables_step`] to the
    /// end.
    ///
    /// # Errors
    /// As [`Qcow2::check_tables_step`].
    pub fn check_tables<D: Device, const S: usize>(
        &mut self,
        t: &mut Tables<'_, D, S>,
    ) -> Result<()> {
        let mut check = TableCheck::new();
        while !self.check_tables_step(t, &mut check, u64::MAX)? {}
        Ok(())
    }
}
