//! How image names become devices: the [`Resolver`] a front end supplies.
//!
//! A backing name read from an image is untrusted. It is only ever resolved
//! through the resolver: on the host, relative to the overlay's directory (as
//! QEMU does) or absolute; in the kernel, by disk serial. The format of a
//! backing file is never guessed from its content.

use core::fmt;
use core::ops::Deref;

use crate::error::{Error, ErrorKind, Result};

/// Longest image name a node keeps.
pub const NAME_CAPACITY: usize = 1024;

/// An image name of at most [`NAME_CAPACITY`] bytes, in fixed storage (a
/// node keeps one; resolvers write resolved names into one). Reads as a
/// `&str`.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct NameBuf(heapless::String<NAME_CAPACITY>);

impl NameBuf {
    /// An empty name.
    pub const fn new() -> Self {
        Self(heapless::String::new())
    }

    /// Empties the name.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Makes the name `text`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `text` is longer than
    /// [`NAME_CAPACITY`] bytes; the name is empty then.
    pub fn set(&mut self, text: &str) -> Result<()> {
        self.clear();
        self.push_str(text)
    }

    /// Appends `text`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when the name would grow past
    /// [`NAME_CAPACITY`] bytes; nothing is appended then.
    pub fn push_str(&mut self, text: &str) -> Result<()> {
        self.0
            .push_str(text)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "image name is too long"))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl Deref for NameBuf {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for NameBuf {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for NameBuf {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for NameBuf {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for NameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Write for NameBuf {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.push_str(text).map_err(|_| fmt::Error)
    }
}

/// Opens images by name for the graph.
pub trait Resolver<D> {
    /// Opens the image the user named `name`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no
    /// such image, others as the back end reports.
    fn open(&mut self, name: &str, writable: bool) -> Result<D>;

    /// Resolves `reference`, a backing name stored in the image `overlay`,
    /// writes the resolved image name into `resolved` and opens it.
    ///
    /// # Errors
    /// As [`Resolver::open`], plus
    /// [`ErrorKind::InvalidInput`] for a name
    /// the resolver does not accept.
    fn open_backing(
        &mut self,
        overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> Result<D>;

    /// Writes into `out` the name the backing reference `reference` stored
    /// in `overlay` resolves to, without opening it (for `info`). The
    /// default is the reference itself.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a
    /// name the resolver does not accept or that does not fit.
    fn resolve_backing(&mut self, overlay: &str, reference: &str, out: &mut NameBuf) -> Result<()> {
        let _ = overlay;
        out.set(reference)
    }

    /// Writes into `out` the reference to store in `overlay`'s header so that
    /// it resolves to the image named `target`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when no
    /// such reference can be formed.
    fn reference(&mut self, overlay: &str, target: &str, out: &mut NameBuf) -> Result<()>;
}

/// A [`Resolver`] for graphs whose devices the VMM adds itself
/// ([`Graph::add_device`](crate::Graph::add_device)), with no image store:
/// nothing opens by name ([`ErrorKind::NotFound`]),
/// and the backing reference stored for an image is its name, as given.
#[derive(Clone, Copy, Debug, Default)]
pub struct NamesOnly;

impl<D> Resolver<D> for NamesOnly {
    fn open(&mut self, _: &str, _: bool) -> Result<D> {
        crate::error::fail(
            crate::ErrorKind::NotFound,
            "no image store: add devices instead",
        )
    }

    fn open_backing(&mut self, _: &str, _: &str, _: bool, _: &mut NameBuf) -> Result<D> {
        crate::error::fail(
            crate::ErrorKind::NotFound,
            "no image store: add devices instead",
        )
    }

    fn reference(&mut self, overlay: &str, target: &str, out: &mut NameBuf) -> Result<()> {
        Resolver::<D>::resolve_backing(self, overlay, target, out)
    }
}

/// Opens images by their names: the one thing a [`ByName`] resolver needs.
/// Closures `FnMut(&str, bool) -> Result<D>` are such openers.
pub trait OpenByName<D> {
    /// Opens the image named `name`, for writing when `writable`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no such image, others as the
    /// back end reports.
    fn open_by_name(&mut self, name: &str, writable: bool) -> Result<D>;
}

impl<D, F: FnMut(&str, bool) -> Result<D>> OpenByName<D> for F {
    fn open_by_name(&mut self, name: &str, writable: bool) -> Result<D> {
        self(name, writable)
    }
}

/// A [`Resolver`] over images known by name alone (an in-memory image set,
/// a test's disks): a backing reference is the name of the backing image,
/// as stored, and the reference stored for an image is its name. The
/// opener `0` makes the devices.
///
/// ```
/// use blockgraph::device::MemDevice;
/// use blockgraph::graph::{ByName, NameBuf, Resolver};
/// use blockgraph::{Error, ErrorKind};
///
/// let mut disk = vec![0u8; 4096];
/// let mut disk = Some(&mut disk[..]);
/// let mut images = ByName(|name: &str, _writable: bool| match (name, disk.take()) {
///     ("base.img", Some(bytes)) => MemDevice::new(bytes, 4096, 1),
///     _ => Err(Error::new(ErrorKind::NotFound, "no such image")),
/// });
/// let mut resolved = NameBuf::new();
/// let device = images.open_backing("top.qcow2", "base.img", false, &mut resolved);
/// assert!(device.is_ok());
/// assert_eq!(resolved, "base.img");
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ByName<T>(pub T);

impl<D, T: OpenByName<D>> Resolver<D> for ByName<T> {
    fn open(&mut self, name: &str, writable: bool) -> Result<D> {
        self.0.open_by_name(name, writable)
    }

    fn open_backing(
        &mut self,
        _overlay: &str,
        reference: &str,
        writable: bool,
        resolved: &mut NameBuf,
    ) -> Result<D> {
        resolved.set(reference)?;
        self.0.open_by_name(reference, writable)
    }

    fn reference(&mut self, _overlay: &str, target: &str, out: &mut NameBuf) -> Result<()> {
        out.set(target)
    }
}
