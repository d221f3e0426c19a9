//! BlockBackend slots: what a device (a virtio disk, a VMM's guest) holds.
//!
//! A backend names a root node. The device never holds a node itself, so
//! replacing the image under a running guest — a pivot after active commit,
//! a live snapshot — is one change of the root ([`Graph::replace_root`]),
//! never a swap of node structs (QEMU's old `bdrv_swap` broke every pointer
//! the device held).

use crate::device::Device;
use crate::error::{fail, ErrorKind, Result};
use crate::format::Format;
use crate::graph::{
    Access, BlockStatus, Graph, Handle, NodeId, OpenOptions, Parent, Perm, Resolver,
};

/// A BlockBackend slot: a root node and the access the device needs.
pub struct Backend {
    pub(crate) root: NodeId,
    pub(crate) access: Access,
}

/// Handle of a BlockBackend slot.
pub type BackendId = Handle<Backend>;

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// Opens the image `name` (and its backing chain) through `resolver`
    /// and attaches a backend to it with `access`: the backend holds the
    /// only reference, so detaching it closes the chain. Open for writing
    /// with [`OpenOptions::writable`] and [`Access::READ_WRITE_DEVICE`].
    ///
    /// # Errors
    /// As [`Graph::open_image`] and [`Graph::attach_backend`]; on error
    /// nothing stays open.
    pub fn attach_image<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        name: &str,
        options: OpenOptions,
        access: Access,
    ) -> Result<BackendId> {
        let root = self.open_image(resolver, name, options)?;
        self.attach_handing_over(root, access)
    }

    /// Adds `device` (named `name`), opens it as a `format` image (without
    /// a backing chain: a base image or a raw disk) and attaches a backend
    /// to it with `access`, which holds the only reference. The image is
    /// writable when `access` writes.
    ///
    /// # Errors
    /// As [`Graph::add_device`], [`Graph::open_format`] and
    /// [`Graph::attach_backend`]; on error nothing stays open.
    pub fn attach_device(
        &mut self,
        device: D,
        name: &str,
        format: Format,
        access: Access,
    ) -> Result<BackendId> {
        let file = self.add_device(device, name)?;
        let read_only = !access.perm.contains(Perm::WRITE);
        let image = self.open_format(file, format, read_only);
        self.unref(file)?;
        self.attach_handing_over(image?, access)
    }

    /// Attaches a backend to `root`, handing it the caller's reference
    /// (released when the attach fails).
    fn attach_handing_over(&mut self, root: NodeId, access: Access) -> Result<BackendId> {
        let attached = self.attach_backend(root, access);
        self.unref(root)?;
        attached
    }

    /// Attaches a new backend to `root` with `access`; it holds a reference
    /// to `root` until detached.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] when `access` needs WRITE and `root` is
    /// read-only, [`ErrorKind::PermissionConflict`] when another user of
    /// `root` conflicts, [`ErrorKind::NoCapacity`] when every slot is taken.
    pub fn attach_backend(&mut self, root: NodeId, access: Access) -> Result<BackendId> {
        self.check_backend_root(root, access, None)?;
        let id = self
            .backends
            .insert(Backend { root, access })
            .map_err(|(err, _)| err)?;
        self.ref_node(root)?;
        Ok(id)
    }

    fn check_backend_root(
        &self,
        root: NodeId,
        access: Access,
        this: Option<BackendId>,
    ) -> Result<()> {
        if access.perm.contains(Perm::WRITE) && self.is_read_only(root)? {
            return fail(
                ErrorKind::ReadOnly,
                "cannot attach a writer to a read-only image",
            );
        }
        if self.format(root)?.is_none() {
            return fail(
                ErrorKind::InvalidInput,
                "a backend's root must be a format node",
            );
        }
        self.check_access_except(root, access, |p| {
            this.is_some_and(|b| p == Parent::Backend(b))
        })
    }

    /// Detaches a backend, releasing its reference to the root.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a detached backend.
    pub fn detach_backend(&mut self, id: BackendId) -> Result<()> {
        self.check_not_held(self.root(id)?)?;
        let backend = self.backends.remove(id)?;
        self.unref(backend.root)
    }

    /// The node a backend currently serves.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a detached backend.
    pub fn root(&self, id: BackendId) -> Result<NodeId> {
        Ok(self.backends.get(id)?.root)
    }

    /// Points backend `id` at `new_root` in one step: after the checks, the
    /// only change is the root itself (and the references that follow it).
    ///
    /// # Errors
    /// As [`Graph::attach_backend`]; on error nothing changed.
    pub fn replace_root(&mut self, id: BackendId, new_root: NodeId) -> Result<()> {
        self.check_not_held(self.root(id)?)?;
        let backend = self.backends.get(id)?;
        let (old, access) = (backend.root, backend.access);
        if old == new_root {
            return Ok(());
        }
        self.check_backend_root(new_root, access, Some(id))?;
        self.ref_node(new_root)?;
        self.backends.get_mut(id)?.root = new_root;
        self.unref(old)
    }

    /// Reads guest bytes through backend `id`.
    ///
    /// # Errors
    /// As [`Graph::read`].
    pub fn backend_read(&mut self, id: BackendId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.backend_readv(id, offset, &mut [buf])
    }

    /// Reads guest bytes through backend `id` into a scatter-gather list
    /// ([`Graph::readv`]).
    ///
    /// # Errors
    /// As [`Graph::readv`].
    pub fn backend_readv(
        &mut self,
        id: BackendId,
        offset: u64,
        segments: &mut [&mut [u8]],
    ) -> Result<()> {
        let root = self.root(id)?;
        self.readv(root, offset, segments)
    }

    /// Writes guest bytes through backend `id`.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] for a backend attached without WRITE, else as
    /// [`Graph::write`].
    pub fn backend_write(&mut self, id: BackendId, offset: u64, data: &[u8]) -> Result<()> {
        self.backend_writev(id, offset, &[data])
    }

    /// Writes a scatter-gather list through backend `id` as one request
    /// ([`Graph::writev`]).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] for a backend attached without WRITE, else as
    /// [`Graph::writev`].
    pub fn backend_writev(&mut self, id: BackendId, offset: u64, segments: &[&[u8]]) -> Result<()> {
        self.backend_writev_with_scratch(id, offset, segments, &mut [])
    }

    /// [`Graph::backend_writev`] with `scratch` for the copy-on-write of a
    /// partly written new cluster ([`Graph::writev_with_scratch`]: a
    /// cluster's worth makes it one device write instead of 4 KiB pieces).
    ///
    /// # Errors
    /// As [`Graph::backend_writev`].
    pub fn backend_writev_with_scratch(
        &mut self,
        id: BackendId,
        offset: u64,
        segments: &[&[u8]],
        scratch: &mut [u8],
    ) -> Result<()> {
        let root = self.writable_root(id)?;
        self.writev_with_scratch(root, offset, segments, scratch)
    }

    /// Makes `len` bytes at `offset` read as zeros through backend `id`
    /// ([`Graph::write_zeroes`]: it may unmap, as a zero write with QEMU's
    /// `may-unmap` does; qcow2 v3 frees whole clusters' storage).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] for a backend attached without WRITE, else as
    /// [`Graph::write_zeroes`].
    pub fn backend_write_zeroes(&mut self, id: BackendId, offset: u64, len: u64) -> Result<()> {
        let root = self.writable_root(id)?;
        self.write_zeroes(root, offset, len)
    }

    /// Discards `len` bytes at `offset` through backend `id`
    /// ([`Graph::discard`]).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] for a backend attached without WRITE, else as
    /// [`Graph::discard`].
    pub fn backend_discard(&mut self, id: BackendId, offset: u64, len: u64) -> Result<()> {
        let root = self.writable_root(id)?;
        self.discard(root, offset, len)
    }

    /// The guest-visible size of backend `id`: its root's virtual size.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a detached backend.
    pub fn backend_size(&self, id: BackendId) -> Result<u64> {
        self.size(self.root(id)?)
    }

    /// The allocation status of `len` bytes at `offset` through backend
    /// `id` (QEMU's `bdrv_block_status` over the chain): the status of the
    /// first byte — allocated, zero, data, and the depth of the layer that
    /// answered, 0 for the root — and how many bytes share it
    /// ([`Graph::block_status`]).
    ///
    /// # Errors
    /// As [`Graph::block_status`].
    pub fn backend_block_status(
        &mut self,
        id: BackendId,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        let root = self.root(id)?;
        self.block_status(root, offset, len)
    }

    /// Backend `id`'s root, when the backend may write.
    fn writable_root(&self, id: BackendId) -> Result<NodeId> {
        let backend = self.backends.get(id)?;
        if !backend.access.perm.contains(Perm::WRITE) {
            return fail(ErrorKind::ReadOnly, "backend is attached read-only");
        }
        Ok(backend.root)
    }

    /// Checks, without writing, that a write of `len` bytes at `offset`
    /// through backend `id` may go ahead as a whole ([`Graph::check_write`]).
    ///
    /// # Errors
    /// As [`Graph::backend_write`].
    pub fn backend_check_write(&mut self, id: BackendId, offset: u64, len: u64) -> Result<()> {
        let root = self.writable_root(id)?;
        self.check_write(root, offset, len)
    }

    /// Flushes backend `id`'s root.
    ///
    /// # Errors
    /// As [`Graph::flush`].
    pub fn backend_flush(&mut self, id: BackendId) -> Result<()> {
        let root = self.root(id)?;
        self.flush(root)
    }

    /// Number of attached backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }
}
