//! `drop_intermediate`: removing layers from a backing chain.
//!
//! ```text
//! before:  base <- X <- top <- overlay <- ... <- active
//! after:   base <- overlay <- ... <- active          (X and top released)
//! ```
//!
//! Cases: a general intermediate drop; `base` at the bottom of the chain;
//! `top == active`, where every user of `active` — backends included — is
//! re-pointed to `base`; and no `base`, where the overlays of `top` lose their
//! backing file.
//!
//! The operation is a plan, then a commit. The plan validates everything and
//! has no side effects. The commit point is the on-disk rewrite of every
//! overlay's backing reference (one header write plus flush each; R11 of
//! `docs/crash-ordering.md`); if one fails, the ones already rewritten are
//! restored and the graph is untouched (R12).
//! Only then are links changed in memory, which cannot fail, and dropped nodes
//! released by refcount (a node another chain still uses stays alive).

use heapless::Vec;

use super::{Graph, NodeId, Parent, Resolver};
use crate::backend::BackendId;
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::qcow2::Qcow2;
use crate::graph::{Access, NameBuf, Perm};

/// Everything the commit needs, computed without side effects.
pub(crate) struct Plan<const NODES: usize, const BACKENDS: usize> {
    overlays: Vec<NodeId, NODES>,
    backends: Vec<BackendId, BACKENDS>,
    make_base_writable: bool,
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Removes every layer above `base` up to and including `top` from
    /// `active`'s chain: every user of `top` is re-pointed to `base` (or, for
    /// overlays with no `base`, loses its backing file). `top == base` is a
    /// successful no-op. Backing references are written with names from
    /// `resolver`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `top` is not in `active`'s chain,
    /// `base` is not below `top`, or a device would be left without a node;
    /// [`ErrorKind::Busy`] when a link involved is frozen by a job;
    /// [`ErrorKind::PermissionConflict`] when `base`'s other users object;
    /// [`ErrorKind::ReadOnly`] when an overlay's device cannot be written;
    /// header rewrite errors. On any error, disk and graph are as before.
    pub fn drop_intermediate<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        active: NodeId,
        top: NodeId,
        base: Option<NodeId>,
    ) -> Result<()> {
        self.nodes.get(active)?;
        self.nodes.get(top)?;
        self.check_not_held(active)?;
        self.check_not_held(top)?;
        if let Some(base) = base {
            self.nodes.get(base)?;
        }
        if Some(top) == base {
            if !self.chain_from(active).any(|n| n == top) {
                return fail(
                    ErrorKind::InvalidInput,
                    "top is not in the active layer's backing chain",
                );
            }
            return Ok(());
        }
        let plan = self.plan_drop(active, top, base)?;
        // A base a writing device moves to is opened for writing first: its
        // file's lock may be refused, and then nothing has changed.
        let reopened = base.filter(|_| plan.make_base_writable);
        if let Some(base) = reopened {
            self.set_read_only(base, false)?;
        }
        if let Err(err) = self.rewrite_references(resolver, &plan.overlays, base) {
            if let Some(base) = reopened {
                // Closing again needs nothing new: it cannot be refused.
                let _ = self.set_read_only(base, true);
            }
            return Err(err);
        }

        // R11: commit point passed: relink in memory. Nothing below can fail
        // for live handles, which the plan verified.
        let moved = plan.overlays.len() + plan.backends.len();
        for &overlay in &plan.overlays {
            self.nodes.get_mut(overlay)?.backing = base;
        }
        for &backend in &plan.backends {
            self.backends.get_mut(backend)?.root =
                base.ok_or(Error::new(ErrorKind::InvalidInput, "no base"))?;
        }
        if let Some(base) = base {
            self.nodes.get_mut(base)?.refs += moved as u32;
        }
        for _ in 0..moved {
            self.unref(top)?;
        }
        Ok(())
    }

    pub(crate) fn plan_drop(
        &self,
        active: NodeId,
        top: NodeId,
        base: Option<NodeId>,
    ) -> Result<Plan<NODES, BACKENDS>> {
        if !self.chain_from(active).any(|n| n == top) {
            return fail(
                ErrorKind::InvalidInput,
                "top is not in the active layer's backing chain",
            );
        }
        let below_top = self.nodes.get(top)?.backing;
        if let Some(base) = base {
            if !below_top.is_some_and(|b| self.chain_from(b).any(|n| n == base)) {
                return fail(
                    ErrorKind::InvalidInput,
                    "base is not below top in the backing chain",
                );
            }
        }
        // Links that disappear: top's parents' and those inside the dropped range.
        let mut overlays = Vec::new();
        let mut backends = Vec::new();
        for parent in self.parents(top) {
            match parent {
                Parent::Backing(node) => {
                    let _ = overlays.push(node);
                }
                Parent::Backend(b) => {
                    let _ = backends.push(b);
                }
                Parent::File(_) => {
                    return fail(ErrorKind::InvalidInput, "top is used as a file node")
                }
            }
        }
        for &overlay in &overlays {
            if self.nodes.get(overlay)?.frozen > 0 {
                return fail(
                    ErrorKind::Busy,
                    "a backing link to drop is frozen by a running job",
                );
            }
        }
        for dropped in self.chain_from(top).take_while(|&n| Some(n) != base) {
            if self.nodes.get(dropped)?.frozen > 0 {
                return fail(
                    ErrorKind::Busy,
                    "a backing link to drop is frozen by a running job",
                );
            }
        }
        for &overlay in &overlays {
            let node = self.nodes.get(overlay)?;
            if !node.driver.has_backing_reference() {
                return fail(
                    ErrorKind::Unsupported,
                    "unsupported: only qcow2 overlays carry backing references",
                );
            }
            let file = self.layer_file(overlay)?;
            if self.devices[file.index()]
                .as_ref()
                .is_none_or(Device::is_read_only)
            {
                return fail(
                    ErrorKind::ReadOnly,
                    "an overlay's image cannot be written to update its backing file",
                );
            }
        }
        let Some(base) = base else {
            if !backends.is_empty() {
                return fail(
                    ErrorKind::InvalidInput,
                    "a device uses the dropped layer and no base replaces it",
                );
            }
            return Ok(Plan {
                overlays,
                backends,
                make_base_writable: false,
            });
        };

        // Which dropped nodes will actually be freed: the first one loses one
        // reference per moved edge, each freed one its backing edge below.
        let freed_above_base = {
            let mut lost = (overlays.len() + backends.len()) as u32;
            let mut last_freed = None;
            for dropped in self.chain_from(top).take_while(|&n| n != base) {
                if self.nodes.get(dropped)?.refs > lost {
                    break;
                }
                last_freed = Some(dropped);
                lost = 1;
            }
            last_freed.filter(|&n| {
                self.nodes
                    .get(n)
                    .is_ok_and(|node| node.backing == Some(base))
            })
        };
        let stays = |p: Parent| Some(p) != freed_above_base.map(Parent::Backing);
        let mut make_base_writable = false;
        if !overlays.is_empty() {
            self.check_access_except(base, Access::BACKING, |p| !stays(p))?;
        }
        for &backend in &backends {
            let access = self.backends.get(backend)?.access;
            self.check_access_except(base, access, |p| !stays(p))?;
            if access.perm.contains(Perm::WRITE) && self.nodes.get(base)?.read_only {
                let file = self.layer_file(base)?;
                if self.devices[file.index()]
                    .as_ref()
                    .is_none_or(Device::is_read_only)
                {
                    return fail(
                        ErrorKind::ReadOnly,
                        "base cannot be made writable for the device",
                    );
                }
                self.check_access_except(file, Access::file(true), |p| p == Parent::File(base))?;
                make_base_writable = true;
            }
        }
        if !overlays.is_empty() && !backends.is_empty() {
            // Overlays read base while a device writes it: they conflict.
            let writer = backends.iter().any(|&b| {
                self.backends
                    .get(b)
                    .is_ok_and(|b| b.access.perm.contains(Perm::WRITE))
            });
            if writer {
                return fail(
                    ErrorKind::PermissionConflict,
                    "conflicting permissions on a node",
                );
            }
        }
        Ok(Plan {
            overlays,
            backends,
            make_base_writable,
        })
    }

    /// Writes `base`'s reference into every overlay's header; when one
    /// fails, writes the old references back into those done (R12: the
    /// in-memory headers still hold them), else makes the in-memory
    /// headers follow.
    pub(crate) fn rewrite_references<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        overlays: &[NodeId],
        base: Option<NodeId>,
    ) -> Result<()> {
        // R11: what the new chains read is durable before any header names
        // them.
        for &overlay in overlays {
            self.write_back_chain(overlay)?;
        }
        self.claim_writes(overlays)?;
        let mut result = Ok(());
        for (done, &overlay) in overlays.iter().enumerate() {
            let written = self.with_new_reference(resolver, overlay, base, |q, device, new| {
                q.write_backing(device, new)
            });
            if let Err(err) = written {
                for &node in overlays[..done].iter().rev() {
                    // Best effort: the first failure is what the caller sees.
                    let _ = self.with_layer(node, |q, device| q.restore_backing(device));
                }
                result = Err(err);
                break;
            }
        }
        if result.is_ok() {
            for &overlay in overlays {
                result = result.and(self.with_new_reference(
                    resolver,
                    overlay,
                    base,
                    |q, _, new| q.adopt_backing(new),
                ));
            }
        }
        self.release_writes(overlays);
        result
    }

    /// Takes write access on the files of `overlays` for the rewrite of
    /// their headers (their nodes may be read-only: a collapse writes
    /// nothing else); a user of one that does not share writes refuses it,
    /// and then none is taken.
    fn claim_writes(&mut self, overlays: &[NodeId]) -> Result<()> {
        for (claimed, &overlay) in overlays.iter().enumerate() {
            let file = self.layer_file(overlay)?;
            if let Err(err) = self.update_access(file, Access::file(true)) {
                self.release_writes(&overlays[..claimed]);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Gives back what [`Graph::claim_writes`] took.
    fn release_writes(&mut self, overlays: &[NodeId]) {
        for &overlay in overlays {
            if let Ok(file) = self.layer_file(overlay) {
                self.relax_access(file);
            }
        }
    }

    /// Runs `apply` on `overlay`'s qcow2 state, its device and the
    /// reference to `base` (or none) as `resolver` names it from there.
    fn with_new_reference<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        overlay: NodeId,
        base: Option<NodeId>,
        apply: impl FnOnce(&mut Qcow2, &mut D, Option<(&str, Option<&str>)>) -> Result<()>,
    ) -> Result<()> {
        let Some(base) = base else {
            return self.with_layer(overlay, |q, device| apply(q, device, None));
        };
        let format = self.format(base)?.ok_or(Error::new(
            ErrorKind::InvalidInput,
            "base is not a format node",
        ))?;
        let mut reference = NameBuf::new();
        let (overlay_name, base_name) =
            (&self.nodes.get(overlay)?.name, &self.nodes.get(base)?.name);
        resolver.reference(overlay_name, base_name, &mut reference)?;
        self.with_layer(overlay, |q, device| {
            apply(q, device, Some((&reference, Some(format.name()))))
        })
    }

    /// Runs `body` on qcow2 overlay `overlay`'s state and its device.
    fn with_layer<T>(
        &mut self,
        overlay: NodeId,
        body: impl FnOnce(&mut Qcow2, &mut D) -> Result<T>,
    ) -> Result<T> {
        let node = self.nodes.get_mut(overlay)?;
        let file = node
            .file
            .ok_or(Error::new(ErrorKind::Corrupt, "qcow2 node without file"))?;
        let Ok(q) = node.driver.qcow2_mut() else {
            return fail(
                ErrorKind::Unsupported,
                "unsupported: only qcow2 overlays carry backing references",
            );
        };
        let device = self.devices[file.index()]
            .as_mut()
            .ok_or(Error::new(ErrorKind::Corrupt, "file node without device"))?;
        body(q, device)
    }

    /// `start` and every node below it.
    pub(crate) fn chain_from(&self, start: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        core::iter::successors(Some(start), move |&n| {
            self.nodes.get(n).ok().and_then(|n| n.backing)
        })
    }
}
