//! Visiting each distinct L2 table the L1 table names, once, in steps of
//! bounded work ([`L2Walk`]): to check every entry (`check.rs`), and
//! before the first write to check that the refcounts count every cluster
//! in use (`write.rs`).
//!
//! A hostile L1 table may name one L2 table millions of times; without a
//! heap, a bitmap marks the tables visited in a window of
//! [`WINDOW_CLUSTERS`] file clusters. Each pass reads the L1 entries once
//! and yields the unmarked tables of its window; the next window starts at
//! the lowest table past it, so windows holding no table cost nothing.
//! Tables lie inside the file (checked at open), so a file of `F` bytes
//! and `cs`-byte clusters takes at most `F / (cs * WINDOW_CLUSTERS) + 1`
//! passes (one for files up to 16 MiB of 512-byte clusters, or 2 GiB of
//! 64 KiB clusters). Table offsets are cluster aligned (checked at open).

use super::OFFSET_MASK;
use crate::error::Result;

/// Clusters of the file one pass covers (one bit each in a 4 KiB bitmap).
const WINDOW_CLUSTERS: u64 = 4096 * 8;

/// L1 entries read at a time (1 KiB, on the stack).
const L1_CHUNK: usize = 128;

/// What one step of an [`L2Walk`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// The device offset of a table not visited before.
    Table(u64),
    /// The step's budget of L1 entries ran out: call again.
    Later,
    /// Every table was visited.
    Done,
}

/// Where a walk over the L2 tables of an L1 table is: about 4 KiB.
pub struct L2Walk {
    /// Tables visited in the window, one bit per cluster.
    seen: [u8; (WINDOW_CLUSTERS / 8) as usize],
    /// First file cluster of the window.
    window: u64,
    /// Lowest table cluster past the window seen in this pass.
    next: u64,
    /// The next L1 entry of the pass.
    index: u64,
}

impl Default for L2Walk {
    fn default() -> Self {
        Self::new()
    }
}

impl L2Walk {
    /// A walk at its start.
    pub const fn new() -> Self {
        Self {
            seen: [0; (WINDOW_CLUSTERS / 8) as usize],
            window: 0,
            next: u64::MAX,
            index: 0,
        }
    }

    /// Reads on through the first `used` entries of the L1 table at `l1`
    /// (with `read`, a chunk at a time) to the next table not yet visited,
    /// examining at most `budget` entries (taken off it).
    ///
    /// # Errors
    /// The first error of `read`.
    pub(super) fn next_table<C>(
        &mut self,
        ctx: &mut C,
        (l1, used): (u64, u64),
        cluster_bits: u32,
        mut read: impl FnMut(&mut C, u64, &mut [u8]) -> Result<()>,
        budget: &mut u64,
    ) -> Result<Found> {
        let mut buf = [0u8; L1_CHUNK * 8];
        loop {
            if self.index >= used {
                // The pass is over: on to the next window holding a table.
                if self.next == u64::MAX {
                    return Ok(Found::Done);
                }
                self.window = self.next;
                self.next = u64::MAX;
                self.index = 0;
                self.seen.fill(0);
            }
            if *budget == 0 {
                return Ok(Found::Later);
            }
            let n = (used - self.index).min(L1_CHUNK as u64).min(*budget) as usize;
            read(ctx, l1 + self.index * 8, &mut buf[..n * 8])?;
            for raw in buf[..n * 8].chunks_exact(8) {
                self.index += 1;
                *budget -= 1;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(raw);
                let table = u64::from_be_bytes(bytes) & OFFSET_MASK;
                if let Some(table) = self.first_visit(table, cluster_bits) {
                    return Ok(Found::Table(table));
                }
            }
        }
    }

    /// The L1 entries the walk's next read covers (through the first
    /// `used`): as a budget for [`L2Walk::next_table`], one read at most.
    pub(super) fn next_read_len(&self, used: u64) -> u64 {
        let from = if self.index >= used { 0 } else { self.index };
        (used - from).min(L1_CHUNK as u64)
    }

    /// Whether `table` (0: none) is in the window and not visited yet, and
    /// marks it; notes the lowest table past the window.
    fn first_visit(&mut self, table: u64, cluster_bits: u32) -> Option<u64> {
        let cluster = table >> cluster_bits;
        if table == 0 || cluster < self.window {
            return None;
        }
        let bit = cluster - self.window;
        if bit >= WINDOW_CLUSTERS {
            self.next = self.next.min(cluster);
            return None;
        }
        let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
        if self.seen[byte] & mask != 0 {
            return None;
        }
        self.seen[byte] |= mask;
        Some(table)
    }
}
