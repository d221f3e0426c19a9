//! Graph layer: the node pool, edges, permissions and the chain walk.
//!
//! ```text
//!  BlockBackend ──root──▶ active (qcow2) ──backing──▶ snap (qcow2) ──backing──▶ base (raw)
//!                            │ file                      │ file                   │ file
//!                            ▼                           ▼                        ▼
//!                         protocol                    protocol                 protocol
//!                         (device)                    (device)                 (device)
//! ```
//!
//! Nodes live in a fixed `Pool`; a [`NodeId`] carries a generation, so a
//! stale id is an error. Every edge (`file`, `backing`, a backend's root)
//! holds one reference; callers hold the references they are given and
//! release them with [`Graph::unref`]. Releasing walks down the chain in a
//! loop, never by recursion.
//!
//! Reads walk from a node down its backing chain one layer at a time
//! ([`Graph::block_status`]); format drivers only describe their own image.

mod alloc;
mod check;
mod collapse;
mod plan;
pub(crate) use alloc::CowRange;
pub(crate) use plan::ReadExtent;
pub mod perm;
pub(crate) mod place;
mod pool;
pub mod resolve;
mod segments;
mod snapshot;
mod source;
mod write;

pub use perm::{Access, Perm};
pub use pool::Handle;
pub(crate) use pool::Pool;
pub use resolve::{ByName, NameBuf, NamesOnly, OpenByName, Resolver, NAME_CAPACITY};
pub(crate) use segments::piece_len;
pub use segments::MAX_SEGMENTS;

use crate::backend::{Backend, BackendId};
use crate::device::{Device, DeviceId};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::format::cache::MetaCache;
use crate::format::driver::{Driver, ImageTables};
use crate::format::qcow2::{Inflater, Qcow2, SnapshotInfo, TableCheck, UsageCheck};
use crate::format::{probe, Format, Mapping, Probed, PROBE_BYTES};
use crate::graph::place::Place;
use crate::jobs::Job;

// The default graph must stay small enough for a unikernel's static memory.
static_assertions::const_assert!(
    core::mem::size_of::<Graph<crate::device::MemDevice<'static>>>() <= 768 * 1024
);

/// Longest backing chain [`Graph::open_image`] follows, in images. A chain
/// of N images also needs 2N nodes of the pool (a format node and a
/// protocol node each): the default pool of 64 holds a chain of 32.
pub const MAX_CHAIN_DEPTH: usize = 64;
// The error message names the limit.
static_assertions::const_assert_eq!(MAX_CHAIN_DEPTH, 64);

/// A node of the graph: a protocol node (a device) or a format node (an
/// image over a protocol node). Fields are reached through [`Graph`].
pub struct Node {
    driver: Driver,
    name: NameBuf,
    refs: u32,
    file: Option<NodeId>,
    /// The protocol node of a qcow2 image's external data file, once
    /// attached ([`Graph::open_image`] does).
    data_file: Option<NodeId>,
    backing: Option<NodeId>,
    read_only: bool,
    /// Opened with [`OpenOptions::force_share`]: its file edge shares
    /// everything.
    force_share: bool,
    frozen: u32,
}

impl Node {
    /// The access a format node's edge to its file holds.
    fn file_access(&self) -> Access {
        if self.force_share {
            Access::FORCE_SHARE
        } else {
            Access::file(!self.read_only)
        }
    }
}

/// Handle of a node.
pub type NodeId = Handle<Node>;

/// How [`Graph::open_image`] opens a chain.
///
/// The caller names the format of the image it opens
/// ([`OpenOptions::new`]); guessing it from the content is a separate,
/// explicit choice ([`OpenOptions::probing`]) because a guest controls the
/// content of a raw disk. Backing formats always come from the overlay's
/// header and are never guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Format of the named image; `None` probes it from its first bytes
    /// (a raw image found that way keeps its first sector from being made
    /// to look like another format: see [`Graph::is_probed`]).
    pub format: Option<Format>,
    /// Open the named image read-only.
    pub read_only: bool,
    /// Open every device of the chain read-write where the storage allows,
    /// so that headers can be rewritten later (collapse); backing files on
    /// read-only storage are opened read-only. The nodes keep their own
    /// read-only flag.
    pub writable_devices: bool,
    /// Treat a backing file whose format the image does not record as raw
    /// instead of refusing it.
    pub assume_raw_backing: bool,
    /// Share every layer's file with any other user, writers included, as
    /// `qemu-img -U` does: each layer's file edge needs consistent reads
    /// only and shares everything. Only valid for read-only opens (what is
    /// read may change underneath).
    pub force_share: bool,
    /// Open only the named image, not its backing chain (QEMU's
    /// `BDRV_O_NO_BACKING`, what `qemu-img info` without `--backing-chain`
    /// does): for looking at its header, which works while a backing file
    /// is missing. Only valid for read-only opens; what the backing chain
    /// would supply reads as zeros.
    pub no_backing: bool,
    /// Check every entry of every L2 table of each qcow2 layer at open
    /// ([`Graph::check_tables`]), so that a hostile table fails the open
    /// (the command-line tools set it). Without it open reads no L2 table:
    /// each slice is checked when first loaded, and
    /// [`Graph::check_tables_step`] checks them all in idle time.
    pub check_tables: bool,
}

impl OpenOptions {
    /// Opens an image of the named `format`, read-only.
    pub const fn new(format: Format) -> Self {
        Self {
            format: Some(format),
            read_only: true,
            writable_devices: false,
            assume_raw_backing: false,
            force_share: false,
            no_backing: false,
            check_tables: false,
        }
    }

    /// The same options, opening the named image for writing (its backing
    /// files stay read-only, as QEMU opens them).
    #[must_use]
    pub const fn writable(self) -> Self {
        Self {
            read_only: false,
            ..self
        }
    }

    /// Opens an image read-only after probing its format from its first
    /// bytes (qcow2 by its magic, raw otherwise), as QEMU does when no format
    /// is given.
    pub const fn probing() -> Self {
        Self {
            format: None,
            ..Self::new(Format::Raw)
        }
    }
}

/// Where a guest range is served from, after walking the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Layer that answered (0 = the queried node).
    pub depth: u32,
    /// Some layer allocates the range (data or a zero cluster).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by stored data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
}

/// A resolved location: what the chain walk found for a range.
#[derive(Clone, Copy)]
struct Located {
    status: BlockStatus,
    layer: NodeId,
    mapping: Mapping,
    /// The range lies past the end of a backing layer (reads zeros).
    beyond_end: bool,
}

/// Who uses a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A format node over it as its file.
    File(NodeId),
    /// An overlay with it as backing image.
    Backing(NodeId),
    /// A BlockBackend with it as root.
    Backend(BackendId),
}

/// The block graph: nodes, devices, backends and the shared caches.
///
/// Capacities: `NODES` nodes (protocol and format nodes count alike),
/// `BACKENDS` BlockBackend slots, `CACHE` metadata slices of 4 KiB, `JOBS`
/// block jobs (about 4.2 KiB each, mostly the dirty bitmap).
///
/// # Memory
///
/// All of it is in the value; nothing is allocated. Measured by
/// `blockgraph sizes` with the host's `FileDevice` (x86_64):
///
/// | capacity | bytes each | default | bytes |
/// |---|---:|---:|---:|
/// | `NODES` (node and its device) | 2440 | 64 | 156160 |
/// | `BACKENDS` | 24 | 8 | 192 |
/// | `CACHE` (a 4 KiB slice and its tag) | 4144 | 128 | 530432 |
/// | `JOBS` | 4272 | 4 | 17088 |
///
/// The default graph is 759352 bytes with the first-write and table
/// checks in progress (about 4 KiB each) and the inflater. A device type
/// larger or smaller than `FileDevice` moves the node row.
///
/// Where it lives: [`Graph::new`] is `const` and its empty state is all
/// zero bytes, so a `static` (in a `spin::Mutex`, [`crate::SharedGraph`])
/// holds it in `.bss`: no room in the binary, no stack (the kernel checks
/// that its graph is in `.bss`). `Box::default()` builds it on the stack
/// first: give such a thread (or the test harness) more than 1 MiB of
/// stack, or pick smaller capacities. What each call takes on the stack is
/// measured in `docs/stack.md`.
pub struct Graph<
    D: Device,
    const NODES: usize = 64,
    const BACKENDS: usize = 8,
    const CACHE: usize = 128,
    const JOBS: usize = 4,
> {
    pub(crate) nodes: Pool<Node, NODES>,
    pub(crate) devices: [Place<D>; NODES],
    pub(crate) backends: Pool<Backend, BACKENDS>,
    pub(crate) jobs: Pool<Job, JOBS>,
    cache: MetaCache<CACHE>,
    /// Requests of a request engine in flight through each node's chain
    /// ([`Graph::has_requests_in_flight`]).
    held: [u32; NODES],
    /// The check before a first write in progress, step by step, and its
    /// node ([`Graph::prepare_writes_step`]).
    usage_check: Place<(NodeId, UsageCheck)>,
    /// The check of a node's L2 tables in progress, step by step, and its
    /// node ([`Graph::check_tables_step`]).
    table_check: Place<(NodeId, TableCheck)>,
    inflater: Inflater,
}

/// Dropping a graph writes back and flushes every image's cached table
/// updates (best effort: call [`Graph::flush`] or [`Graph::unref`] first to
/// see errors).
impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Drop for Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    fn drop(&mut self) {
        // Each image is tried once; errors cannot be reported here.
        for id in self.dirty_nodes() {
            let _ = self.write_back_node(id);
        }
    }
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Default for Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<
        D: Device,
        const NODES: usize,
        const BACKENDS: usize,
        const CACHE: usize,
        const JOBS: usize,
    > Graph<D, NODES, BACKENDS, CACHE, JOBS>
{
    /// An empty graph; `const` so it can live in a `static`.
    pub const fn new() -> Self {
        Self {
            nodes: Pool::new(),
            devices: [const { Place::Empty }; NODES],
            backends: Pool::new(),
            jobs: Pool::new(),
            cache: MetaCache::new(),
            held: [0; NODES],
            usage_check: Place::Empty,
            table_check: Place::Empty,
            inflater: Inflater::new(),
        }
    }

    // ----- nodes -------------------------------------------------------

    /// Adds a protocol node over `device`, named `name`. The caller holds
    /// the one reference.
    ///
    /// # Errors
    /// [`ErrorKind::NoCapacity`] when the pool is full,
    /// [`ErrorKind::InvalidInput`] when the name is too long.
    pub fn add_device(&mut self, device: D, name: &str) -> Result<NodeId> {
        let read_only = device.is_read_only();
        let id = self.insert(Driver::Protocol, name, None, read_only)?;
        self.devices[id.index()] = Place::Held(device);
        Ok(id)
    }

    /// Opens a format node of `format` over the protocol node `file`. The new
    /// node takes its own reference to `file`; the caller holds the one
    /// reference to the new node.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `file` is not a protocol node,
    /// [`ErrorKind::ReadOnly`] when a writable node is asked of a read-only
    /// device, [`ErrorKind::PermissionConflict`] when another user of `file`
    /// conflicts (in this graph, also through another protocol node over the
    /// same storage, or outside it: the device's [`Device::set_access`]
    /// refuses before the driver reads anything), and the driver's errors
    /// for a bad image.
    pub fn open_format(&mut self, file: NodeId, format: Format, read_only: bool) -> Result<NodeId> {
        self.open_format_shared(file, format, read_only, false)
    }

    /// [`Graph::open_format`], with `force_share` as in
    /// [`OpenOptions::force_share`].
    fn open_format_shared(
        &mut self,
        file: NodeId,
        format: Format,
        read_only: bool,
        force_share: bool,
    ) -> Result<NodeId> {
        if force_share && !read_only {
            return fail(
                ErrorKind::InvalidInput,
                "force-share can only be used with read-only images",
            );
        }
        let file_node = self.nodes.get(file)?;
        if !file_node.driver.is_protocol() {
            return fail(
                ErrorKind::InvalidInput,
                "a format node's file must be a protocol node",
            );
        }
        if !read_only && file_node.read_only {
            return fail(
                ErrorKind::ReadOnly,
                "cannot open read-write: the device is read-only",
            );
        }
        let edge = if force_share {
            Access::FORCE_SHARE
        } else {
            Access::file(!read_only)
        };
        self.check_access(file, edge, None)?;
        // Claimed before the driver reads anything: a conflicting open fails
        // without touching the file.
        self.update_access(file, edge)?;
        let opened = self.new_format_node(file, format, read_only, force_share);
        if opened.is_err() {
            self.relax_access(file);
        }
        opened
    }

    /// The format node of [`Graph::open_format_shared`], once its access is
    /// claimed.
    fn new_format_node(
        &mut self,
        file: NodeId,
        format: Format,
        read_only: bool,
        force_share: bool,
    ) -> Result<NodeId> {
        let driver = Driver::open(format, self.device_mut(file)?, read_only)?;
        let mut name = NameBuf::new();
        // Same capacity, cannot fail.
        let _ = name.push_str(&self.nodes.get(file)?.name);
        let id = self.insert(driver, &name, Some(file), read_only)?;
        self.nodes.get_mut(id)?.force_share = force_share;
        self.nodes.get_mut(file)?.refs += 1;
        Ok(id)
    }

    fn insert(
        &mut self,
        driver: Driver,
        name: &str,
        file: Option<NodeId>,
        read_only: bool,
    ) -> Result<NodeId> {
        let mut stored = NameBuf::new();
        if stored.push_str(name).is_err() {
            return fail(ErrorKind::InvalidInput, "image name is too long");
        }
        let node = Node {
            driver,
            name: stored,
            refs: 1,
            file,
            data_file: None,
            backing: None,
            read_only,
            force_share: false,
            frozen: 0,
        };
        self.nodes.insert(node).map_err(|(err, _)| err)
    }

    /// Opens the image `name` and its whole backing chain through `resolver`.
    /// Returns the top node; the caller holds its one reference, and every
    /// layer below is held by its overlay's backing edge. Cached table
    /// updates of the images already open are written back first, so a
    /// second node over a file that is open already reads what was written
    /// through the first.
    ///
    /// # Errors
    /// Any open error of any layer (nothing stays open then); a backing file
    /// without a recorded format ([`ErrorKind::Unsupported`], unless
    /// [`OpenOptions::assume_raw_backing`]); a chain that loops
    /// ([`ErrorKind::Corrupt`]); a chain longer than [`MAX_CHAIN_DEPTH`]
    /// images ([`ErrorKind::Unsupported`]) or than the node pool holds, two
    /// nodes per image ([`ErrorKind::NoCapacity`]); a layer in use by a
    /// conflicting user, in this graph or outside it
    /// ([`ErrorKind::PermissionConflict`]); [`OpenOptions::force_share`]
    /// with a writable open ([`ErrorKind::InvalidInput`]).
    pub fn open_image<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        name: &str,
        options: OpenOptions,
    ) -> Result<NodeId> {
        self.open_image_naming(resolver, name, options, &mut NameBuf::new())
    }

    /// [`Graph::open_image`], saying which image an error is about: when a
    /// layer below `name` is at fault (its backing file is missing, a loop,
    /// a corrupt or locked backing image), that layer's name (as resolved,
    /// else as stored in its overlay) is written into `at_fault`; it is left
    /// empty when the error concerns `name` itself.
    ///
    /// # Errors
    /// As [`Graph::open_image`].
    pub fn open_image_naming<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        name: &str,
        options: OpenOptions,
        at_fault: &mut NameBuf,
    ) -> Result<NodeId> {
        at_fault.clear();
        if options.force_share && (!options.read_only || options.writable_devices) {
            return fail(
                ErrorKind::InvalidInput,
                "force-share can only be used with read-only images",
            );
        }
        if options.no_backing && (!options.read_only || options.writable_devices) {
            return fail(
                ErrorKind::InvalidInput,
                "an image opened without its backing chain must be read-only",
            );
        }
        self.write_back_all()?;
        let writable = !options.read_only || options.writable_devices;
        let device = resolver.open(name, writable)?;
        let top = self.open_layer(device, name, options.format, options)?;
        if let Err(err) = self.attach_data_file(resolver, top, writable) {
            self.unref(top)?;
            return Err(err);
        }
        if options.no_backing {
            return Ok(top);
        }
        match self.open_backing_chain(resolver, top, options, at_fault) {
            Ok(()) => Ok(top),
            Err(err) => {
                self.unref(top)?;
                Err(err)
            }
        }
    }

    /// Adds `device` as a protocol node and opens a format node over it
    /// (`options.read_only`, `force_share` and `check_tables`), probing the
    /// format when `format` is `None`.
    fn open_layer(
        &mut self,
        mut device: D,
        name: &str,
        format: Option<Format>,
        options: OpenOptions,
    ) -> Result<NodeId> {
        let (read_only, force_share) = (options.read_only, options.force_share);
        let (format, probed) = match format {
            Some(format) => (format, false),
            None => {
                let mut first = [0u8; PROBE_BYTES];
                let n = device.size().min(PROBE_BYTES as u64) as usize;
                device.read_at(0, &mut first[..n])?;
                match probe(&first[..n]) {
                    Probed::Qcow2 => (Format::Qcow2, true),
                    Probed::Raw => (Format::Raw, true),
                    Probed::Foreign(_) => return fail(
                        ErrorKind::Unsupported,
                        "unsupported image format (it probes as neither qcow2 nor raw; name the format, e.g. -f raw, to open it anyway)",
                    ),
                }
            }
        };
        let file = self.add_device(device, name)?;
        let opened = self.open_format_shared(file, format, read_only, force_share);
        self.unref(file)?;
        let id = opened?;
        self.nodes.get_mut(id)?.driver.set_probed(probed);
        if options.check_tables {
            if let Err(err) = self.check_tables(id) {
                self.unref(id)?;
                return Err(err);
            }
        }
        Ok(id)
    }

    /// Opens the backing chain below `top`, layer by layer; on failure the
    /// name of the image at fault goes into `at_fault` (empty for `top`).
    fn open_backing_chain<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        top: NodeId,
        options: OpenOptions,
        at_fault: &mut NameBuf,
    ) -> Result<()> {
        let mut current = top;
        let blame = |graph: &Self, layer: NodeId, at_fault: &mut NameBuf| {
            if layer != top {
                if let Ok(node) = graph.nodes.get(layer) {
                    at_fault.clone_from(&node.name);
                }
            }
        };
        for depth in 1.. {
            let Some((name, format)) = self.nodes.get(current)?.driver.backing_reference() else {
                return Ok(());
            };
            let mut reference = NameBuf::new();
            let _ = reference.push_str(name);
            let format = match format {
                Some(f) => Format::from_name(f),
                None if options.assume_raw_backing => Ok(Format::Raw),
                None => fail(
                    ErrorKind::Unsupported,
                    "backing file format is not recorded in the image (unsupported: formats are never probed)",
                ),
            };
            let checked = format.and_then(|format| {
                if depth >= MAX_CHAIN_DEPTH {
                    return fail(
                        ErrorKind::Unsupported,
                        "unsupported: backing chain longer than 64 images (MAX_CHAIN_DEPTH)",
                    );
                }
                if self.nodes.len() + 2 > NODES {
                    return fail(
                        ErrorKind::NoCapacity,
                        "backing chain longer than this graph's node pool holds (2 nodes per image: raise NODES)",
                    );
                }
                Ok(format)
            });
            let format = checked.inspect_err(|_| blame(self, current, at_fault))?;
            let mut resolved = NameBuf::new();
            match self.open_backing_layer(
                resolver,
                (top, current),
                &reference,
                format,
                options,
                &mut resolved,
            ) {
                Ok(layer) => current = layer,
                Err(err) => {
                    at_fault.clone_from(if resolved.is_empty() {
                        &reference
                    } else {
                        &resolved
                    });
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Resolves and opens the backing file `reference` of `format` named by
    /// `overlay` (in the chain of `top`) and links it below `overlay`;
    /// `resolved` receives its resolved name.
    fn open_backing_layer<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        (top, overlay): (NodeId, NodeId),
        reference: &str,
        format: Format,
        options: OpenOptions,
        resolved: &mut NameBuf,
    ) -> Result<NodeId> {
        let overlay_name = self.nodes.get(overlay)?.name.clone();
        let opened =
            resolver.open_backing(&overlay_name, reference, options.writable_devices, resolved);
        // A backing file on read-only storage is fine until someone needs
        // to rewrite its header; that operation reports it then.
        let device = match opened {
            Err(err) if err.kind() == ErrorKind::ReadOnly && options.writable_devices => {
                resolver.open_backing(&overlay_name, reference, false, resolved)?
            }
            other => other?,
        };
        if self.chain_contains_device(top, device.identity())? {
            return fail(ErrorKind::Corrupt, "backing chain loops back on itself");
        }
        let backing = OpenOptions {
            read_only: true,
            ..options
        };
        let layer = self.open_layer(device, resolved, Some(format), backing)?;
        if let Err(err) = self.attach_data_file(resolver, layer, options.writable_devices) {
            self.unref(layer)?;
            return Err(err);
        }
        let linked = self.set_backing(overlay, Some(layer));
        self.unref(layer)?;
        linked?;
        Ok(layer)
    }

    pub(crate) fn chain_contains_device(&self, top: NodeId, id: DeviceId) -> Result<bool> {
        let mut layer = Some(top);
        while let Some(node) = layer {
            let n = self.nodes.get(node)?;
            if let Some(file) = n.file {
                if self.devices[file.index()].as_ref().map(Device::identity) == Some(id) {
                    return Ok(true);
                }
            }
            layer = n.backing;
        }
        Ok(false)
    }

    /// Takes one more reference to `id`.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn ref_node(&mut self, id: NodeId) -> Result<()> {
        self.nodes.get_mut(id)?.refs += 1;
        Ok(())
    }

    /// Drops one reference to `id`; a node left without references is
    /// released, and with it the references it held (down the chain, in a
    /// loop). A released image's cached table updates are written back and
    /// flushed first.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node; a device error from
    /// that last write-back (the nodes are released all the same; the image
    /// keeps what its last successful flush made durable).
    pub fn unref(&mut self, id: NodeId) -> Result<()> {
        self.nodes.get(id)?;
        let mut next = Some(id);
        let mut result = Ok(());
        while let Some(id) = next {
            let node = self.nodes.get_mut(id)?;
            node.refs -= 1;
            if node.refs > 0 {
                break;
            }
            if let Err(err) = self.write_back_node(id) {
                result = result.and(Err(err));
            }
            // Only the edges are kept: a whole node on the stack here sat
            // under every write-back a release does.
            let (files, backing) = {
                let node = self.nodes.remove(id)?;
                ([node.file, node.data_file], node.backing)
            };
            self.cache.forget(id.key());
            self.devices[id.index()] = Place::Empty;
            for file in files.into_iter().flatten() {
                // Files are protocol nodes: leaves, released right here (the
                // device, and with it any lock, goes).
                let file_node = self.nodes.get_mut(file)?;
                file_node.refs -= 1;
                if file_node.refs == 0 {
                    self.nodes.remove(file)?;
                    self.devices[file.index()] = Place::Empty;
                } else {
                    self.relax_access(file);
                }
            }
            next = backing;
        }
        result
    }

    /// Number of references held on `id`.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn refcount(&self, id: NodeId) -> Result<u32> {
        Ok(self.nodes.get(id)?.refs)
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Whether `id` refers to a live node.
    pub fn contains(&self, id: NodeId) -> bool {
        self.nodes.get(id).is_ok()
    }

    /// The node's image name (as opened or as resolved from its overlay).
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn name(&self, id: NodeId) -> Result<&str> {
        Ok(&self.nodes.get(id)?.name)
    }

    /// The node's format, or `None` for a protocol node.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn format(&self, id: NodeId) -> Result<Option<Format>> {
        Ok(self.nodes.get(id)?.driver.format())
    }

    /// Whether node `id` is a raw image whose format was probed rather than
    /// named. Writes to its first [`PROBE_BYTES`] bytes that would make it
    /// probe as another format are refused ([`ErrorKind::NotPermitted`]),
    /// as QEMU restricts them: otherwise a guest could turn its disk into,
    /// say, a qcow2 image whose backing file is any host file.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a freed node.
    pub fn is_probed(&self, id: NodeId) -> Result<bool> {
        Ok(self.nodes.get(id)?.driver.is_probed())
    }

    /// The qcow2 state of a qcow2 node (header facts for `info`).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when the node is not qcow2.
    pub fn qcow2(&self, id: NodeId) -> Result<&Qcow2> {
        self.nodes.get(id)?.driver.qcow2()
    }

    /// The allocation unit of format node `id`'s own layer: its cluster
    /// size for qcow2, 1 for raw.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a protocol node.
    pub(crate) fn cluster_size(&self, id: NodeId) -> Result<u64> {
        self.nodes.get(id)?.driver.cluster_size()
    }

    /// The guest bytes of the whole clusters of node `id` that
    /// `len` bytes at `offset` touch, as `(start, end)`; byte-exact for a
    /// node without clusters.
    pub(crate) fn cluster_span(&self, id: NodeId, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cluster_size(id).unwrap_or(1).max(1);
        let end = offset.saturating_add(len).div_ceil(cs).saturating_mul(cs);
        (offset / cs * cs, end)
    }

    /// The node's backing node.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn backing(&self, id: NodeId) -> Result<Option<NodeId>> {
        Ok(self.nodes.get(id)?.backing)
    }

    /// The node's file (protocol) node.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn file(&self, id: NodeId) -> Result<Option<NodeId>> {
        Ok(self.nodes.get(id)?.file)
    }

    /// Whether guest writes to the node are refused.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn is_read_only(&self, id: NodeId) -> Result<bool> {
        Ok(self.nodes.get(id)?.read_only)
    }

    /// Virtual size of the node in bytes.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn size(&self, id: NodeId) -> Result<u64> {
        let node = self.nodes.get(id)?;
        let device = self.devices[node.file.unwrap_or(id).index()].as_ref();
        Ok(node.driver.size(device.map_or(0, Device::size)))
    }

    /// A format node over the storage `identity` (the first one found), if
    /// the graph has one.
    pub fn image_on(&self, identity: DeviceId) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|(_, node)| {
                node.file.is_some_and(|file| {
                    self.devices[file.index()].as_ref().map(Device::identity) == Some(identity)
                })
            })
            .map(|(id, _)| id)
    }

    /// Identity of the device under node `id` (its own, for a protocol node).
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn identity(&self, id: NodeId) -> Result<DeviceId> {
        let file = self.layer_file(id)?;
        self.devices[file.index()]
            .as_ref()
            .map(Device::identity)
            .ok_or(Error::new(ErrorKind::Corrupt, "file node without device"))
    }

    /// The device of the protocol node `id`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `id` is not a protocol node.
    pub fn device_mut(&mut self, id: NodeId) -> Result<&mut D> {
        self.nodes.get(id)?;
        self.devices[id.index()].as_mut().ok_or(Error::new(
            ErrorKind::InvalidInput,
            "node is not a protocol node",
        ))
    }

    /// Every current user of `id`.
    pub fn parents(&self, id: NodeId) -> impl Iterator<Item = Parent> + '_ {
        let nodes = self.nodes.iter().flat_map(move |(h, n)| {
            // An external data file is a file of its image too.
            let file = (n.file == Some(id) || n.data_file == Some(id)).then_some(Parent::File(h));
            let backing = (n.backing == Some(id)).then_some(Parent::Backing(h));
            file.into_iter().chain(backing)
        });
        let backends = self
            .backends
            .iter()
            .filter(move |(_, b)| b.root == id)
            .map(|(h, _)| Parent::Backend(h));
        nodes.chain(backends)
    }

    /// The access a parent holds on its child.
    fn parent_access(&self, parent: Parent) -> Result<Access> {
        Ok(match parent {
            Parent::File(node) => self.nodes.get(node)?.file_access(),
            Parent::Backing(_) => Access::BACKING,
            Parent::Backend(b) => self.backends.get(b)?.access,
        })
    }

    /// Refuses `access` on `id` when it conflicts with a current user other
    /// than the ones `ignore` accepts.
    pub(crate) fn check_access_except(
        &self,
        id: NodeId,
        access: Access,
        ignore: impl Fn(Parent) -> bool,
    ) -> Result<()> {
        for parent in self.parents(id).filter(|p| !ignore(*p)) {
            if self.parent_access(parent)?.conflicts_with(access) {
                return fail(
                    ErrorKind::PermissionConflict,
                    "conflicting permissions on a node",
                );
            }
        }
        Ok(())
    }

    fn check_access(&self, id: NodeId, access: Access, except: Option<Parent>) -> Result<()> {
        self.check_access_except(id, access, |p| Some(p) == except)
    }

    /// What the users of protocol node `file` hold together.
    fn users_access(&self, file: NodeId) -> Result<Access> {
        let mut access = Access::UNUSED;
        for parent in self.parents(file) {
            access = access.combine(self.parent_access(parent)?);
        }
        Ok(access)
    }

    /// Gives the device of protocol node `file` the access of its users
    /// plus `extra` (a user about to be added). Refused when another
    /// protocol node over the same storage has users that conflict (the
    /// image is open twice in this graph) or when the device refuses.
    fn update_access(&mut self, file: NodeId, extra: Access) -> Result<()> {
        let access = self.users_access(file)?.combine(extra);
        let identity = self.identity(file)?;
        for (other, node) in self.nodes.iter() {
            let same_storage = other != file
                && node.driver.is_protocol()
                && self.devices[other.index()].as_ref().map(Device::identity) == Some(identity);
            if same_storage && self.users_access(other)?.conflicts_with(access) {
                return fail(
                    ErrorKind::PermissionConflict,
                    "image is already open in this graph with conflicting permissions",
                );
            }
        }
        self.device_mut(file)?.set_access(access)
    }

    /// Gives the device of protocol node `file` the access its users now
    /// hold (after one of them changed).
    pub(crate) fn sync_access(&mut self, file: NodeId) -> Result<()> {
        self.update_access(file, Access::UNUSED)
    }

    /// [`Graph::sync_access`] after users of `file` left or need less: that
    /// cannot conflict with anyone, and a device that fails to drop a lock
    /// only stays more locked than needed, so it is not an error.
    pub(crate) fn relax_access(&mut self, file: NodeId) {
        let _ = self.sync_access(file);
    }

    /// Sets (in memory only) `node`'s backing node, releasing the old one.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `node` cannot have a backing file or
    /// the link would make a cycle, [`ErrorKind::Busy`] when the link is
    /// frozen by a job, [`ErrorKind::PermissionConflict`].
    pub fn set_backing(&mut self, node: NodeId, backing: Option<NodeId>) -> Result<()> {
        self.check_not_held(node)?;
        let n = self.nodes.get(node)?;
        if !n.driver.has_backing_reference() {
            return fail(
                ErrorKind::InvalidInput,
                "only qcow2 nodes have backing files",
            );
        }
        if n.frozen > 0 {
            return fail(ErrorKind::Busy, "backing link is frozen by a running job");
        }
        let old = n.backing;
        if old == backing {
            return Ok(());
        }
        if let Some(b) = backing {
            if self.nodes.get(b)?.driver.is_protocol() {
                return fail(
                    ErrorKind::InvalidInput,
                    "a backing node must be a format node",
                );
            }
            let mut walk = Some(b);
            while let Some(w) = walk {
                if w == node {
                    return fail(ErrorKind::InvalidInput, "backing link would create a cycle");
                }
                walk = self.nodes.get(w)?.backing;
            }
            self.check_access(b, Access::BACKING, None)?;
            self.nodes.get_mut(b)?.refs += 1;
        }
        self.nodes.get_mut(node)?.backing = backing;
        if let Some(old) = old {
            self.unref(old)?;
        }
        Ok(())
    }

    /// Opens `id` for guest writes (`false`) or closes it to them (`true`).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] when its device is read-only,
    /// [`ErrorKind::PermissionConflict`] when a user of its file objects (in
    /// this graph or outside it: the device's [`Device::set_access`]), or
    /// when closing it while a user (a writing backend) needs to write;
    /// [`ErrorKind::InvalidInput`] when opening a node opened with
    /// [`OpenOptions::force_share`]. On error nothing changed.
    pub fn set_read_only(&mut self, id: NodeId, read_only: bool) -> Result<()> {
        let node = self.nodes.get(id)?;
        if !read_only && node.force_share {
            return fail(
                ErrorKind::InvalidInput,
                "force-share can only be used with read-only images",
            );
        }
        if read_only {
            for parent in self.parents(id) {
                if self.parent_access(parent)?.perm.contains(Perm::WRITE) {
                    return fail(
                        ErrorKind::PermissionConflict,
                        "a user of the image writes to it: it cannot become read-only",
                    );
                }
            }
        }
        let files = [node.file, node.data_file];
        if !read_only {
            for file in files.into_iter().flatten() {
                if self.device_mut(file)?.is_read_only() {
                    return fail(ErrorKind::ReadOnly, "the image's device is read-only");
                }
                self.check_access(file, Access::file(true), Some(Parent::File(id)))?;
            }
        }
        let was = core::mem::replace(&mut self.nodes.get_mut(id)?.read_only, read_only);
        for (done, file) in files.into_iter().flatten().enumerate() {
            if let Err(err) = self.sync_access(file) {
                self.nodes.get_mut(id)?.read_only = was;
                for file in files.into_iter().flatten().take(done) {
                    self.relax_access(file);
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// The external data file name qcow2 node `id` records (as stored,
    /// read from its header), written into `out`; `false` (and `out`
    /// untouched) for an image without one.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node, device and header
    /// errors.
    pub fn data_file_reference(&mut self, id: NodeId, out: &mut NameBuf) -> Result<bool> {
        let node = self.nodes.get(id)?;
        let Ok(qcow2) = node.driver.qcow2() else {
            return Ok(false);
        };
        let file = node.file.unwrap_or(id);
        let device = self.devices[file.index()]
            .as_mut()
            .ok_or(Error::new(ErrorKind::Corrupt, "image without device"))?;
        qcow2.data_file_name(device, |found| out.set(found))
    }

    /// Whether a layer of `id`'s chain keeps its data in an external data
    /// file.
    pub(crate) fn chain_has_data_file(&self, id: NodeId) -> bool {
        self.chain_from(id)
            .any(|node| self.nodes.get(node).is_ok_and(|n| n.driver.has_data_file()))
    }

    /// Opens the external data file qcow2 node `id` names, if it names one,
    /// through `resolver` as a backing file of it would be (relative to the
    /// image and confined as backing names are; `writable` asks for a
    /// writable device), claims it as the image claims its own file, and
    /// attaches it: the image's data is read and written there.
    ///
    /// # Errors
    /// The resolver's errors (a missing or refused name),
    /// [`ErrorKind::PermissionConflict`] when another user of that file
    /// conflicts (the image's own file among them).
    fn attach_data_file<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        id: NodeId,
        writable: bool,
    ) -> Result<()> {
        let node = self.nodes.get(id)?;
        if node.data_file.is_some() || !node.driver.has_data_file() {
            return Ok(());
        }
        self.open_data_file(resolver, id, writable)
    }

    /// [`Graph::attach_data_file`] of an image that has one. Not inlined:
    /// its name buffers (and the header read) stay off the stack of
    /// chains without data files.
    #[inline(never)]
    fn open_data_file<R: Resolver<D>>(
        &mut self,
        resolver: &mut R,
        id: NodeId,
        writable: bool,
    ) -> Result<()> {
        let mut name = NameBuf::new();
        if !self.data_file_reference(id, &mut name)? {
            return Ok(());
        }
        let node = self.nodes.get(id)?;
        let (image, access, read_only) = (node.name.clone(), node.file_access(), node.read_only);
        let mut resolved = NameBuf::new();
        let device = match resolver.open_backing(&image, &name, writable, &mut resolved) {
            // A read-only layer asked for a writable device as a backing
            // file is (OpenOptions::writable_devices): read-only will do.
            Err(err) if err.kind() == ErrorKind::ReadOnly && writable && read_only => {
                resolver.open_backing(&image, &name, false, &mut resolved)?
            }
            other => other?,
        };
        let data = self.add_device(device, &resolved)?;
        let claimed = self
            .check_access(data, access, None)
            .and_then(|()| self.update_access(data, access));
        if let Err(err) = claimed {
            self.unref(data)?;
            return Err(err);
        }
        self.nodes.get_mut(id)?.data_file = Some(data);
        Ok(())
    }

    /// Freezes `id`'s backing link (a job depends on it): changing or
    /// dropping it is refused with [`ErrorKind::Busy`] until unfrozen.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn freeze_backing(&mut self, id: NodeId) -> Result<()> {
        self.nodes.get_mut(id)?.frozen += 1;
        Ok(())
    }

    /// Undoes one [`Graph::freeze_backing`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when the link is not frozen.
    pub fn unfreeze_backing(&mut self, id: NodeId) -> Result<()> {
        let node = self.nodes.get_mut(id)?;
        if node.frozen == 0 {
            return fail(ErrorKind::InvalidInput, "backing link is not frozen");
        }
        node.frozen -= 1;
        Ok(())
    }

    /// Whether `id`'s backing link is frozen.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub fn is_frozen(&self, id: NodeId) -> Result<bool> {
        Ok(self.nodes.get(id)?.frozen > 0)
    }

    // ----- reading -----------------------------------------------------

    /// Walks the chain from `id` for guest range `offset..offset + len`: what
    /// serves its first byte, and for how many bytes (at most `len`) that
    /// holds.
    fn locate(&mut self, id: NodeId, offset: u64, len: u64) -> Result<(Located, u64)> {
        self.locate_above(id, None, offset, len)
    }

    /// [`Graph::locate`] over the layers from `id` down to, not including,
    /// `bottom` (the whole chain for `None`): a range no such layer holds is
    /// reported not present.
    fn locate_above(
        &mut self,
        id: NodeId,
        bottom: Option<NodeId>,
        offset: u64,
        len: u64,
    ) -> Result<(Located, u64)> {
        let mut layer = id;
        let mut run = len;
        for depth in 0u32.. {
            if depth > 0 && Some(layer) == bottom {
                let status = BlockStatus {
                    depth,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                };
                let located = Located {
                    status,
                    layer,
                    mapping: Mapping::Unallocated,
                    beyond_end: false,
                };
                return Ok((located, run));
            }
            let size = self.size(layer)?;
            let node = self.nodes.get(layer)?;
            let beyond = Located {
                status: BlockStatus {
                    depth,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                },
                layer,
                mapping: Mapping::Zero,
                beyond_end: false,
            };
            if offset >= size {
                // Past a backing file's end: zeros, attributed (as QEMU does)
                // to the overlay that reached past it.
                let depth = depth.saturating_sub(1);
                let status = BlockStatus {
                    depth,
                    ..beyond.status
                };
                let located = Located {
                    status,
                    beyond_end: true,
                    ..beyond
                };
                return Ok((located, run));
            }
            run = run.min(size - offset);
            let file = node.file.unwrap_or(layer);
            let tables = ImageTables {
                cache: &mut self.cache,
                devices: &mut self.devices,
                node: layer,
                file,
                data: node.data_file.unwrap_or(file),
            };
            let (mapping, mapped) = node.driver.map(tables, offset, run)?;
            run = mapped;
            let status = |present, zero, data, compressed| BlockStatus {
                depth,
                present,
                zero,
                data,
                compressed,
            };
            let located = match mapping {
                Mapping::Unallocated => match node.backing {
                    Some(backing) => {
                        layer = backing;
                        continue;
                    }
                    None => Located {
                        status: status(false, true, false, false),
                        ..beyond
                    },
                },
                Mapping::Zero => Located {
                    status: status(true, true, false, false),
                    ..beyond
                },
                Mapping::Data(_) => Located {
                    status: status(true, false, true, false),
                    mapping,
                    ..beyond
                },
                Mapping::Compressed(_) => Located {
                    status: status(true, false, true, true),
                    mapping,
                    ..beyond
                },
            };
            return Ok((located, run));
        }
        unreachable!("the depth counter does not run out")
    }

    /// Allocation status of guest range `offset..offset + len` of `id`'s
    /// chain: the status of its first byte and how many bytes share it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a range outside the image, metadata
    /// and device errors as found.
    pub fn block_status(
        &mut self,
        id: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        self.check_range(id, offset, len)?;
        let (located, run) = self.locate(id, offset, len)?;
        Ok((located.status, run))
    }

    /// Whether guest range `offset..offset + len` of `top`'s chain is held
    /// by a layer from `top` down to, not including, `bottom`: the status of
    /// its first byte (`present` set when such a layer holds it, `zero` when
    /// it reads zeros) and how many bytes share it. A range past the end of
    /// such a layer counts as held, reading zeros (it hides what lies below).
    ///
    /// # Errors
    /// As [`Graph::block_status`].
    pub fn allocation_above(
        &mut self,
        top: NodeId,
        bottom: Option<NodeId>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        self.check_range(top, offset, len)?;
        let (located, run) = self.locate_above(top, bottom, offset, len)?;
        let mut status = located.status;
        if located.beyond_end && Some(located.layer) != bottom {
            status.present = true;
        }
        Ok((status, run))
    }

    /// Checks that `offset..offset + len` (not empty) lies inside `id`.
    pub(crate) fn check_range(&self, id: NodeId, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size(id)? && len > 0 => Ok(()),
            _ => fail(ErrorKind::InvalidInput, "range lies outside the image"),
        }
    }

    /// Reads guest bytes of `id`'s chain at `offset` into `buf`: the
    /// one-buffer case of [`Graph::readv`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a range outside the image, metadata
    /// and device errors as found.
    pub fn read(&mut self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.readv(id, offset, &mut [buf])
    }

    /// Reads guest bytes of `id`'s chain from `offset` into `segments` (at
    /// most [`MAX_SEGMENTS`] buffers, any lengths, empty ones too), one
    /// after the other, as one request: the whole range is checked before
    /// any buffer is filled. Each buffer is filled in place, no bounce
    /// copy.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for more than [`MAX_SEGMENTS`] segments
    /// or a range outside the image, metadata and device errors as found.
    pub fn readv(&mut self, id: NodeId, offset: u64, segments: &mut [&mut [u8]]) -> Result<()> {
        segments::check_count(segments.len())?;
        let len = segments
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.len() as u64))
            .ok_or(Error::new(
                ErrorKind::InvalidInput,
                "request length overflows",
            ))?;
        if len == 0 {
            return Ok(());
        }
        self.check_range(id, offset, len)?;
        let mut at = offset;
        for segment in segments.iter_mut() {
            self.read_in_range(id, at, segment)?;
            at += segment.len() as u64;
        }
        Ok(())
    }

    /// Reads guest bytes of `id`'s chain at `offset` into `buf`, a range
    /// already checked to lie inside the image.
    fn read_in_range(&mut self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (located, run) = self.locate(id, pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + run as usize];
            match located.mapping {
                Mapping::Zero | Mapping::Unallocated => chunk.fill(0),
                Mapping::Data(host) => {
                    let file = self.data_file(located.layer)?;
                    let device = self.device_mut(file)?;
                    let present =
                        device.size().saturating_sub(host).min(chunk.len() as u64) as usize;
                    device.read_at(host, &mut chunk[..present])?;
                    chunk[present..].fill(0);
                }
                Mapping::Compressed(extent) => {
                    let q = self.qcow2(located.layer)?;
                    let (cluster_size, compression) = (q.cluster_size(), q.header().compression);
                    let file = self.layer_file(located.layer)?;
                    let device = self.devices[file.index()]
                        .as_mut()
                        .ok_or(Error::new(ErrorKind::Corrupt, "file node without device"))?;
                    let skip = pos & (cluster_size - 1);
                    let decoder = (compression, &mut self.inflater);
                    crate::format::qcow2::read_compressed(decoder, device, extent, skip, chunk)?;
                }
            }
            done += run as usize;
        }
        Ok(())
    }

    /// Calls `visit` with each internal snapshot of qcow2 node `id`, in
    /// table order.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] for a node that is not qcow2, device
    /// errors, and those of `visit`.
    pub fn visit_snapshots(
        &mut self,
        id: NodeId,
        visit: impl FnMut(&SnapshotInfo<'_>) -> Result<()>,
    ) -> Result<()> {
        let file = self.layer_file(id)?;
        let qcow2 = self.nodes.get(id)?.driver.qcow2()?;
        let device = self.devices[file.index()]
            .as_mut()
            .ok_or(Error::new(ErrorKind::Corrupt, "file node without device"))?;
        qcow2.visit_snapshots(device, visit)
    }

    /// Creates an internal snapshot named `name` of qcow2 node `id`'s
    /// current state, taken at `date` (seconds and nanoseconds since the
    /// Unix epoch), as `qemu-img snapshot -c` does
    /// ([`Qcow2::create_snapshot`]: crash-safe, R15). The node must be open
    /// for writing, with no request in flight on its chain.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`], [`ErrorKind::Busy`], and those of
    /// [`Qcow2::create_snapshot`].
    pub fn create_internal_snapshot(
        &mut self,
        id: NodeId,
        name: &str,
        date: (u32, u32),
    ) -> Result<()> {
        self.check_not_held(id)?;
        self.prepare_writable(id)?;
        self.with_qcow2(id, |q, t| q.create_snapshot(t, name, date))
    }

    /// Deletes the internal snapshot of qcow2 node `id` whose ID, else
    /// whose name, is `id_or_name`, as `qemu-img snapshot -d` does
    /// ([`Qcow2::delete_snapshot`]: crash-safe, R16). The node must be open
    /// for writing, with no request in flight on its chain.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no such snapshot;
    /// [`ErrorKind::ReadOnly`], [`ErrorKind::Busy`], and those of
    /// [`Qcow2::delete_snapshot`].
    pub fn delete_internal_snapshot(&mut self, id: NodeId, id_or_name: &str) -> Result<()> {
        self.check_not_held(id)?;
        self.prepare_writable(id)?;
        self.with_qcow2(id, |q, t| q.delete_snapshot(t, id_or_name))
    }

    /// Reverts qcow2 node `id` to its internal snapshot whose ID, else
    /// whose name, is `id_or_name`, as `qemu-img snapshot -a` does
    /// ([`Qcow2::apply_snapshot`]: crash-safe, R17). The node must be open
    /// for writing, with no request in flight on its chain; what is cached
    /// of its tables is written back first.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`], [`ErrorKind::ReadOnly`],
    /// [`ErrorKind::Busy`], and those of [`Qcow2::apply_snapshot`].
    pub fn apply_internal_snapshot(&mut self, id: NodeId, id_or_name: &str) -> Result<()> {
        self.check_not_held(id)?;
        self.prepare_writable(id)?;
        self.with_qcow2(id, |q, t| q.apply_snapshot(t, id_or_name))
    }

    /// The protocol node under format node `id` (or `id` itself).
    pub(crate) fn layer_file(&self, id: NodeId) -> Result<NodeId> {
        Ok(self.nodes.get(id)?.file.unwrap_or(id))
    }

    /// The protocol node `id`'s guest data lies on: a qcow2 image's
    /// external data file, else its file ([`Graph::layer_file`]).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] for an image with an external data file
    /// that was not attached (opened by [`Graph::open_format`] alone).
    pub(crate) fn data_file(&self, id: NodeId) -> Result<NodeId> {
        let node = self.nodes.get(id)?;
        match node.data_file {
            Some(data) => Ok(data),
            None if node.driver.has_data_file() => fail(
                ErrorKind::Unsupported,
                "unsupported: the image's external data file is not open (open the image by name)",
            ),
            None => Ok(node.file.unwrap_or(id)),
        }
    }

    /// Makes every completed write to `id`'s chain durable: each layer's
    /// cached table updates are written back (data and refcounts before
    /// mappings: R3 of `docs/crash-ordering.md`) and its device flushed;
    /// `id`'s device and every writable layer's are flushed even when
    /// nothing was cached.
    ///
    /// # Errors
    /// Device errors as returned (what was not written back stays cached,
    /// so a retry resumes).
    pub fn flush(&mut self, id: NodeId) -> Result<()> {
        let mut layer = Some(id);
        while let Some(node) = layer {
            let n = self.nodes.get(node)?;
            let (writable, backing) = (!n.read_only, n.backing);
            if !self.write_back_node(node)? && (writable || node == id) {
                let file = self.layer_file(node)?;
                self.device_mut(file)?.flush()?;
            }
            if let Some(data) = self.nodes.get(node)?.data_file {
                if writable || node == id {
                    self.device_mut(data)?.flush()?;
                }
            }
            layer = backing;
        }
        Ok(())
    }

    /// Writes back and flushes the cached table updates of every layer of
    /// `id`'s chain that has any (before a chain change depends on them:
    /// R11).
    pub(crate) fn write_back_chain(&mut self, id: NodeId) -> Result<()> {
        let mut layer = Some(id);
        while let Some(node) = layer {
            self.write_back_node(node)?;
            layer = self.nodes.get(node)?.backing;
        }
        Ok(())
    }

    /// Writes back and flushes the cached table updates of every image.
    ///
    /// # Errors
    /// Device errors (what was not written back stays cached).
    pub fn write_back_all(&mut self) -> Result<()> {
        for id in self.dirty_nodes() {
            self.write_back_node(id)?;
        }
        Ok(())
    }

    /// The nodes with cached table updates.
    fn dirty_nodes(&self) -> heapless::Vec<NodeId, NODES> {
        let mut dirty = heapless::Vec::new();
        for (id, _) in self.nodes.iter() {
            if self.cache.is_dirty(id.key()) {
                // At most NODES nodes exist: cannot overflow.
                let _ = dirty.push(id);
            }
        }
        dirty
    }

    /// Node `id`'s driver, with what its metadata lives in.
    ///
    /// # Errors
    /// [`ErrorKind::StaleHandle`] for a released node.
    pub(crate) fn driver_and_tables(
        &mut self,
        id: NodeId,
    ) -> Result<(&mut Driver, ImageTables<'_, D, CACHE>)> {
        let node = self.nodes.get_mut(id)?;
        let file = node.file.unwrap_or(id);
        let tables = ImageTables {
            cache: &mut self.cache,
            devices: &mut self.devices,
            node: id,
            file,
            data: node.data_file.unwrap_or(file),
        };
        Ok((&mut node.driver, tables))
    }

    /// Writes back and flushes `id`'s cached table updates, if it has any;
    /// returns whether it had.
    fn write_back_node(&mut self, id: NodeId) -> Result<bool> {
        if !self.cache.is_dirty(id.key()) {
            return Ok(false);
        }
        self.with_qcow2(id, |_, t| t.sync())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
