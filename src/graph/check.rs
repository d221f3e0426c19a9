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
use crate::format::qcow2::{Qcow2, TableCheck, Tables};
use crate::graph::place::Place;

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
        self.kept_check_step(
            id,
            |g| &mut g.table_check,
            Qcow2::tables_checked,
            |q, t, check| q.check_tables_step(t, check, budget),
        )
    }

    /// One step of a walk over qcow2 node `id`'s L2 tables whose state the
    /// graph keeps in the slot `kept` returns (one node's at a time: another
    /// node's starts over). Returns `true` at once for raw nodes and when
    /// `done` says the qcow2 node needs no more.
    pub(super) fn kept_check_step(
        &mut self,
        id: NodeId,
        kept: fn(&mut Self) -> &mut Place<(NodeId, TableCheck)>,
        done: fn(&Qcow2) -> bool,
        step: impl FnOnce(&mut Qcow2, &mut Tables<'_, D, CACHE>, &mut TableCheck) -> Result<bool>,
    ) -> Result<bool> {
        if !self.nodes.get(id)?.driver.qcow2().is_ok_and(|q| !done(q)) {
            return Ok(true);
        }
        let mut check = match kept(self).take() {
            Some((node, check)) if node == id => check,
            _ => TableCheck::new(),
        };
        let finished = self.with_qcow2(id, |q, t| step(q, t, &mut check))?;
        if !finished {
            *kept(self) = Place::Held((id, check));
        }
        Ok(finished)
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
