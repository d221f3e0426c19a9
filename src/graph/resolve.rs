//! How image names become devices: the [`Resolver`] a front end supplies.
//!
//! A backing name read from an image is untrusted. It is only ever resolved
//! through the resolver: on the host, relative to the overlay's directory (as
//! QEMU does) or absolute; in the kernel, by disk serial. The format of a
//! backing file is never guessed from its content.

use crate::error::Result;

/// Longest image name a node keeps.
pub const NAME_CAPACITY: usize = 1024;

/// A fixed-capacity image name.
pub type NameBuf = heapless::String<NAME_CAPACITY>;

/// Opens images by name for the graph.
pub trait Resolver<D> {
    /// Opens the image the user named `name`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when there is no
    /// such image, others as the back end reports.
    fn open(&mut self, name: &str, writable: bool) -> Result<D>;

    /// Resolves `reference`, a backing name stored in the image `overlay`,
    /// writes the resolved image name into `resolved` and opens it.
    ///
    /// # Errors
    /// As [`Resolver::open`], plus
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for a name
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
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for a
    /// name the resolver does not accept or that does not fit.
    fn resolve_backing(&mut self, overlay: &str, reference: &str, out: &mut NameBuf) -> Result<()> {
        let _ = overlay;
        out.clear();
        out.push_str(reference).map_err(|_| {
            crate::Error::new(crate::ErrorKind::InvalidInput, "image name is too long")
        })
    }

    /// Writes into `out` the reference to store in `overlay`'s header so that
    /// it resolves to the image named `target`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when no
    /// such reference can be formed.
    fn reference(&mut self, overlay: &str, target: &str, out: &mut NameBuf) -> Result<()>;
}

/// A [`Resolver`] for graphs whose devices the VMM adds itself
/// ([`Graph::add_device`](crate::Graph::add_device)), with no image store:
/// nothing opens by name ([`ErrorKind::NotFound`](crate::ErrorKind::NotFound)),
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
