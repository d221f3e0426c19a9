//! Live external snapshots: a new, empty overlay becomes the active layer.
//!
//! ```text
//! before:  backend ──▶ active ──▶ ...
//! after:   backend ──▶ overlay ──▶ active (now read-only) ──▶ ...
//! ```
//!
//! The overlay is created and opened first (only the new device is
//! written); then every backend of `active` is re-pointed to it in one
//! in-memory step that cannot fail.

use super::{Access, Graph, NodeId, Parent, Resolver};
use crate::backend::BackendId;
use crate::device::Device;
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::qcow2::create::{create, CreateOptions};
use crate::format::Format;
use crate::graph::NameBuf;

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Takes a live snapshot of what backend `backend` serves
    /// ([`Graph::snapshot`] of its root): the backend moves to the new
    /// overlay, which it holds; the returned handle is for naming the
    /// overlay (a job, `info`), not a reference to release.
    ///
    /// # Errors
    /// As [`Graph::snapshot`].
    pub fn snapshot_backend<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        backend: BackendId,
        device: D,
        name: &str,
    ) -> Result<NodeId> {
        let active = self.root(backend)?;
        let overlay = self.snapshot(resolver, active, device, name)?;
        self.unref(overlay)?;
        Ok(overlay)
    }

    /// Formats `device` as an empty qcow2 overlay of `active` (named `name`,
    /// its backing reference formed by `resolver`), opens it read-write and
    /// re-points every backend of `active` to it; `active` becomes
    /// read-only. Returns the overlay; the caller holds one reference.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `active` is not a format node or
    /// `device` holds an image of its chain (nothing is written then),
    /// [`ErrorKind::Busy`] when a live job works on `active`, device and
    /// format errors from creating the overlay. On error no backend moved.
    pub fn snapshot<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        active: NodeId,
        mut device: D,
        name: &str,
    ) -> Result<NodeId> {
        self.check_not_held(active)?;
        let format = self.format(active)?.ok_or(Error::new(
            ErrorKind::InvalidInput,
            "only an image can be snapshotted",
        ))?;
        if self.jobs.iter().any(|(_, job)| job.involves(active)) {
            return fail(ErrorKind::Busy, "a running job works on the active layer");
        }
        if self.chain_contains_device(active, device.identity())? {
            return fail(
                ErrorKind::InvalidInput,
                "the new overlay's device holds an image of the chain",
            );
        }
        // R13: as QEMU, the old active layer is flushed before the overlay
        // goes on top of it; the overlay is created header last.
        self.flush(active)?;
        let mut reference = NameBuf::new();
        let active_name = self.name(active)?;
        let mut active_copy = NameBuf::new();
        let _ = active_copy.push_str(active_name);
        resolver.reference(name, &active_copy, &mut reference)?;
        let mut options = CreateOptions::new(self.size(active)?.next_multiple_of(512));
        options.backing = Some((&reference, format.name()));
        create(&mut device, &options)?;
        let file = self.add_device(device, name)?;
        let overlay = self.open_format(file, Format::Qcow2, false);
        self.unref(file)?;
        let overlay = overlay?;
        if let Err(err) = self.append_overlay(active, overlay) {
            self.unref(overlay)?;
            return Err(err);
        }
        Ok(overlay)
    }

    /// Puts `overlay` on top of `active`, moving every backend over.
    fn append_overlay(&mut self, active: NodeId, overlay: NodeId) -> Result<()> {
        let mut moving: heapless::Vec<BackendId, BACKENDS> = heapless::Vec::new();
        for parent in self.parents(active) {
            if let Parent::Backend(b) = parent {
                let _ = moving.push(b);
            }
        }
        // The overlay reads `active`; the devices that leave it no longer
        // count against that.
        self.check_access_except(
            active,
            Access::BACKING,
            |p| matches!(p, Parent::Backend(b) if moving.contains(&b)),
        )?;
        for &b in &moving {
            let access = self.backends.get(b)?.access;
            self.check_access_except(overlay, access, |_| false)?;
        }
        // Checked above; the overlay is new, so no cycle and no frozen link.
        self.nodes.get_mut(active)?.refs += 1;
        self.nodes.get_mut(overlay)?.backing = Some(active);
        for &b in &moving {
            self.backends.get_mut(b)?.root = overlay;
            self.nodes.get_mut(overlay)?.refs += 1;
            self.nodes.get_mut(active)?.refs -= 1;
        }
        let active_node = self.nodes.get_mut(active)?;
        active_node.read_only = true;
        for file in [active_node.file, active_node.data_file]
            .into_iter()
            .flatten()
        {
            self.relax_access(file);
        }
        Ok(())
    }
}
