//! The whole-image check of a qcow2 node's L2 tables, in bounded steps
//! ([`Graph::check_tables_step`]).
//!
//! Opening an image does not read its L2 tables (each slice is checked as
//! the metadata cache loads it, so nothing unchecked is used); a VMM runs
//! this check in idle time to find a hostile table before a guest touches
//! it, and [`OpenOptions::check_tables`](super::OpenOptions::check_tables)
//! runs it to the end at open (what the command-line tools do).

use super::{Graph, NodeId};
use crate::device::Device;
use crate::error::Result;
use crate::format::qcow2::TableCheck;

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// One step of the check of every entry of every L2 table of qcow2
    /// node `id` (its own layer): at most `budget` device reads of at most
    /// 4 KiB. Returns whether the check is complete (always, for raw
    /// images, and once it or the check before the first write has run).
    /// One node's check is kept at a time: starting another's starts over
    /// when the first is taken up again.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`](crate::error::ErrorKind::Corrupt) for a bad
    /// L2 entry (the error a lookup of it returns), device errors.
    pub fn check_tables_step(&mut self, id: NodeId, budget: u64) -> Result<bool> {
        if !self
            .nodes
            .get(id)?
            .driver
            .qcow2()
            .is_ok_and(|q| !q.tables_checked())
        {
            return Ok(true);
        }
        let mut check = match self.table_check.take() {
            Some((node, check)) if node == id => check,
            _ => TableCheck::new(),
        };
        let done = self.with_qcow2(id, |q, t| q.check_tables_step(t, &mut check, budget))?;
        if !done {
            self.table_check = Some((id, check));
        }
        Ok(done)
    }

    /// [`Graph::check_tables_step`] to the end.
    ///
    /// # Errors
    /// As [`Graph::check_tables_step`].
    pub fn check_tables(&mut self, id: NodeId) -> Result<()> {
        while !self.check_tables_step(id, u64::MAX)? {}
        Ok(())
    }
}
