//! Errors: one small `Copy` type for the whole crate.
//!
//! An [`Error`] pairs an [`ErrorKind`] a caller can match on with a static
//! message that says what went wrong and, where the failing layer knows
//! them, the OS error number behind it ([`Error::os_error`]) and the device
//! byte offset at fault ([`Error::offset`]). It is `Copy` and 32 bytes;
//! nothing here allocates, so errors can be returned from the kernel's
//! interrupt-free paths as cheaply as from the host.

use core::fmt;

/// What class of failure happened; stable for callers to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
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

/// An error: a kind plus a human-readable static message, with the OS
/// error number and the device offset at fault when they are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    /// The OS error number (0: none known).
    os_error: i32,
    message: &'static str,
    /// The device byte offset at fault ([`UNKNOWN_OFFSET`]: none known).
    offset: u64,
}

/// [`Error::offset`]'s "not known".
const UNKNOWN_OFFSET: u64 = u64::MAX;

impl Error {
    /// Builds an error of `kind` described by `message`.
    pub const fn new(kind: ErrorKind, message: &'static str) -> Self {
        Self {
            kind,
            os_error: 0,
            message,
            offset: UNKNOWN_OFFSET,
        }
    }

    /// This error with the OS error number `errno` behind it (0 leaves
    /// none), as a host device reports it.
    #[must_use]
    pub const fn with_os_error(mut self, errno: i32) -> Self {
        self.os_error = errno;
        self
    }

    /// This error at device byte `offset`: where the failing transfer
    /// started.
    #[must_use]
    pub const fn at_offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// The OS error number behind this error (`errno` on the host), if
    /// known.
    pub const fn os_error(&self) -> Option<i32> {
        match self.os_error {
            0 => None,
            errno => Some(errno),
        }
    }

    /// The device byte offset at fault, if known.
    pub const fn offset(&self) -> Option<u64> {
        match self.offset {
            UNKNOWN_OFFSET => None,
            offset => Some(offset),
        }
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
        f.write_str(self.message)?;
        if let Some(offset) = self.offset() {
            write!(f, " at byte {offset}")?;
        }
        if let Some(errno) = self.os_error() {
            write!(f, " (os error {errno})")?;
        }
        Ok(())
    }
}

impl core::error::Error for Error {}

/// The crate's result type.
pub type Result<T> = core::result::Result<T, Error>;

/// Shorthand for `Err(Error::new(kind, message))`.
pub(crate) const fn fail<T>(kind: ErrorKind, message: &'static str) -> Result<T> {
    Err(Error::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_optional_small_and_shown() {
        let plain = Error::new(ErrorKind::Corrupt, "bad table");
        assert_eq!((plain.os_error(), plain.offset()), (None, None));
        assert_eq!(plain.to_string(), "bad table");
        let full = plain.with_os_error(28).at_offset(0);
        assert_eq!((full.os_error(), full.offset()), (Some(28), Some(0)));
        assert_eq!(full.to_string(), "bad table at byte 0 (os error 28)");
        assert_eq!(full.kind(), ErrorKind::Corrupt);
        assert_eq!(core::mem::size_of::<Error>(), 32);
        assert_eq!(core::mem::size_of::<Option<Error>>(), 32);
    }
}
