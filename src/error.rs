//! Errors: one small `Copy` type for the whole crate.
//!
//! An [`Error`] pairs an [`ErrorKind`] a caller can match on with a static
//! message that says what went wrong. Nothing here allocates, so errors can be
//! returned from the kernel's interrupt-free paths as cheaply as from the host.

use core::fmt;

/// What class of failure happened; stable for callers to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller-supplied argument is wrong (bad offset, unknown node, ...).
    InvalidInput,
    /// A handle refers to a slot that was freed (its generation moved on).
    StaleHandle,
    /// A fixed-capacity table (node pool, backend slots, cache) is full.
    NoCapacity,
    /// The object is in use by a job, a frozen link or a conflicting user.
    Busy,
    /// The permissions of two users of one node conflict.
    PermissionConflict,
    /// A write was attempted on something opened or attached read-only.
    ReadOnly,
    /// A device has no room left for the data.
    NoSpace,
    /// A device operation failed.
    Io,
    /// The image uses a feature this crate does not implement.
    Unsupported,
    /// The image's metadata is inconsistent or hostile.
    Corrupt,
    /// A name (backing file, image) could not be found.
    NotFound,
    /// Data read back differs from what was expected (pattern checks).
    Mismatch,
    /// The operation is refused to protect the host (QEMU's `EPERM`), e.g.
    /// a write that would change how a probed raw image probes.
    NotPermitted,
}

/// An error: a kind plus a human-readable static message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: &'static str,
}

impl Error {
    /// Builds an error of `kind` described by `message`.
    pub const fn new(kind: ErrorKind, message: &'static str) -> Self {
        Self { kind, message }
    }

    /// The class of this error.
    pub const fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The static description of this error.
    pub const fn message(&self) -> &'static str {
        self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl core::error::Error for Error {}

/// The crate's result type.
pub type Result<T> = core::result::Result<T, Error>;

/// Shorthand for `Err(Error::new(kind, message))`.
pub(crate) const fn fail<T>(kind: ErrorKind, message: &'static str) -> Result<T> {
    Err(Error::new(kind, message))
}
