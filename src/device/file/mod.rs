//! A host file as a device (feature `std`).
//!
//! Opening: the file is opened with `O_NONBLOCK` (a FIFO cannot block the
//! open) and the descriptor obtained is checked with `fstat`: anything but a
//! regular file or a block device is refused. Checking the path before
//! opening it would race with a path that changes in between.
//!
//! Locking, as QEMU locks images (`block/file-posix.c`), so that QEMU and
//! blockgraph refuse each other: open file description (OFD) read locks on
//! single bytes of the file itself. For each permission bit `i`
//! ([`Perm`]: consistent read 0, write 1, write unchanged 2, resize 3) the
//! file holds byte `100 + i` while its users need that permission and byte
//! `200 + i` while they do not share it. A new access conflicts when another
//! open file description holds `200 + i` for a bit it needs, or `100 + i`
//! for a bit it does not share. The locks live as long as the descriptor.
//!
//! Split-phase access ([`Queue`](super::Queue)): reads, writes and flushes
//! submitted through the queue go to an io_uring of the device's own
//! (module `ring`), many in flight at once; the [`Device`] methods stay
//! synchronous (`pread`/`pwrite`). Both choose the descriptor (direct or
//! buffered) by the same rule and report errors alike.

use core::fmt::Write as _;

use super::{Device, DeviceId};
use crate::error::{fail, Error, ErrorKind, Result};
use crate::graph::{Access, Perm};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use nix::sys::uio::pwritev;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

mod ring;
use ring::RingState;

/// Buffers one `pwritev` takes (Linux allows 1024, `IOV_MAX`).
const IOV_GROUP: usize = 64;

/// The alignment of buffer address, offset and length that an `O_DIRECT`
/// transfer needs: 4096 covers devices of 512- and 4096-byte logical
/// blocks alike.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether a transfer of `buf` at `offset` may bypass the page cache.
fn aligned(offset: u64, buf: &[u8]) -> bool {
    let align = DIRECT_ALIGN as u64;
    offset.is_multiple_of(align)
        && (buf.len() as u64).is_multiple_of(align)
        && buf.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
}

/// The descriptor a transfer of `buf` at `offset` goes through: `direct`
/// (cache mode `none`) when there is one and the transfer is aligned,
/// otherwise `buffered`. A file or its raw descriptor number alike.
fn through<'f, F: ?Sized>(
    buffered: &'f F,
    direct: Option<&'f F>,
    offset: u64,
    buf: &[u8],
) -> &'f F {
    match direct {
        Some(direct) if aligned(offset, buf) => direct,
        _ => buffered,
    }
}

/// Lock byte of "holds permission `i`" is `PERM_BASE + i` (QEMU's
/// `RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// Lock byte of "does not share permission `i`" is `SHARED_BASE + i` (QEMU's
/// `RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// What creating a file locks before it truncates (QEMU's
/// `raw_co_create`): writing and resizing, sharing all but resizing.
const CREATING: Access = Access {
    perm: Perm::WRITE.union(Perm::RESIZE),
    shared: Perm::all().difference(Perm::RESIZE),
};

/// Refusals when another user does not share a permission this one needs,
/// by permission bit (QEMU's wording).
const NOT_SHARED: [&str; 4] = [
    "Failed to get \"consistent read\" lock: is another process using the image?",
    "Failed to get \"write\" lock: is another process using the image?",
    "Failed to get \"write unchanged\" lock: is another process using the image?",
    "Failed to get \"resize\" lock: is another process using the image?",
];

/// Refusals when another user holds a permission this one does not share.
const HELD: [&str; 4] = [
    "Failed to get shared \"consistent read\" lock: is another process using the image?",
    "Failed to get shared \"write\" lock: is another process using the image?",
    "Failed to get shared \"write unchanged\" lock: is another process using the image?",
    "Failed to get shared \"resize\" lock: is another process using the image?",
];

/// A host file opened read-only or read-write, optionally capped in size so
/// it behaves like a fixed-size disk.
pub struct FileDevice {
    file: File,
    len: u64,
    read_only: bool,
    max_len: Option<u64>,
    id: DeviceId,
    /// The access the file's lock bytes stand for.
    locked: Access,
    /// [`FileDevice::create`] made the file (it did not exist before).
    created: bool,
    /// The same file opened again with `O_DIRECT` (cache mode `none`):
    /// transfers aligned to [`DIRECT_ALIGN`] go through it, bypassing the
    /// page cache; the others, and the locks, use `file`.
    direct: Option<File>,
    /// The io_uring of split-phase operations, made at the first one.
    ring: RingState,
}

impl FileDevice {
    /// Opens `path`; `writable` asks for read-write access. Takes no lock:
    /// the graph sets the file's access ([`Device::set_access`]) when a node
    /// uses it.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when the file does not exist,
    /// [`ErrorKind::InvalidInput`] when it is neither a regular file nor a
    /// block device (a FIFO, a directory) or the path is unusable (a symbolic
    /// link loop, a name too long, a file used as a directory),
    /// [`ErrorKind::ReadOnly`] when permission is denied, otherwise
    /// [`ErrorKind::Io`].
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io_error)?;
        Self::from_file(file, !writable, false)
    }

    /// Opens `path` as [`FileDevice::open`] does, for cache mode `none`
    /// (QEMU's `cache=none`): data transfers whose buffer, offset and length
    /// are aligned to [`DIRECT_ALIGN`] bypass the page cache (`O_DIRECT`,
    /// on a second descriptor of the same file); unaligned ones (metadata,
    /// odd requests) still go through it, which Linux keeps coherent with
    /// the direct ones.
    ///
    /// # Errors
    /// As [`FileDevice::open`]; [`ErrorKind::Unsupported`] when the file
    /// system does not support `O_DIRECT` (tmpfs).
    pub fn open_direct(path: &Path, writable: bool) -> Result<Self> {
        let mut device = Self::open(path, writable)?;
        // The descriptor's own file, whatever the path names by now.
        let mut again = heapless::String::<32>::new();
        write!(again, "/proc/self/fd/{}", device.file.as_raw_fd())
            .map_err(|_| Error::new(ErrorKind::Io, "descriptor number too long"))?;
        let direct = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | libc::O_DIRECT)
            .open(Path::new(again.as_str()))
            .map_err(|err| match err.raw_os_error() {
                Some(libc::EINVAL) => Error::new(
                    ErrorKind::Unsupported,
                    "the file system does not support O_DIRECT (cache mode none)",
                ),
                _ => io_error(err),
            })?;
        blocking(&direct)?;
        let meta = direct.metadata().map_err(io_error)?;
        if DeviceId(meta.dev(), meta.ino()) != device.id {
            return fail(ErrorKind::Io, "the file changed while it was opened");
        }
        device.direct = Some(direct);
        Ok(device)
    }

    /// Opens `path` read-write as the output of a copy that several writers
    /// (threads, each with its own descriptor) fill at once, after
    /// [`FileDevice::create`] made it: it locks writing and shares
    /// everything, so the writers and the creator coexist while a reader
    /// that does not share writes (QEMU, a blockgraph node) is refused.
    ///
    /// # Errors
    /// As [`FileDevice::open`]; [`ErrorKind::PermissionConflict`] when
    /// another user of the file does not share writes.
    pub fn open_output(path: &Path) -> Result<Self> {
        let mut device = Self::open(path, true)?;
        device.set_access(Access::READ_WRITE_DEVICE)?;
        Ok(device)
    }

    /// Creates `path` as an empty read-write file, or empties it when it
    /// exists, as QEMU creates images: the file is opened without
    /// truncating, locked for writing and resizing (refused when another
    /// user does not share that, for example when it is open as an image),
    /// and only then truncated. [`FileDevice::created`] says whether the
    /// file is new. The file keeps that lock (other writers may share it)
    /// until a node's access replaces it.
    ///
    /// # Errors
    /// [`ErrorKind::PermissionConflict`] when the file is in use (nothing is
    /// truncated then), otherwise as [`FileDevice::open`].
    pub fn create(path: &Path) -> Result<Self> {
        let mut device = Self::create_or_open(path)?;
        device.set_access(CREATING)?;
        // Only a file with content is truncated: on ext4 truncating even an
        // empty file marks it for block allocation at every close, which
        // makes closing a freshly written output wait for writeback.
        if device.len > 0 {
            device.file.set_len(0).map_err(io_error)?;
            device.len = 0;
        }
        Ok(device)
    }

    /// Opens `path` read-write, creating it when it does not exist, and
    /// records which it did.
    fn create_or_open(path: &Path) -> Result<Self> {
        // The file may appear or vanish between the tries: a few rounds.
        let mut last = Error::new(ErrorKind::NotFound, "no such file");
        for _ in 0..3 {
            let new = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
            match new {
                Ok(file) => return Self::from_file(file, false, true),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io_error(err)),
            }
            match Self::open(path, true) {
                Err(err) if err.kind() == ErrorKind::NotFound => last = err,
                other => return other,
            }
        }
        Err(last)
    }

    fn from_file(file: File, read_only: bool, created: bool) -> Result<Self> {
        let meta = file.metadata().map_err(io_error)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            return fail(ErrorKind::InvalidInput, "is a directory");
        }
        if !kind.is_file() && !kind.is_block_device() {
            return fail(
                ErrorKind::InvalidInput,
                "not a regular file or block device",
            );
        }
        blocking(&file)?;
        let len = if kind.is_block_device() {
            // A block device's inode says nothing of its size.
            (&file).seek(SeekFrom::End(0)).map_err(io_error)?
        } else {
            meta.len()
        };
        Ok(Self {
            file,
            len,
            read_only,
            max_len: None,
            id: DeviceId(meta.dev(), meta.ino()),
            locked: Access::UNUSED,
            created,
            direct: None,
            ring: RingState::Untried,
        })
    }

    /// Whether [`FileDevice::create`] made the file, rather than emptying
    /// one that existed.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Refuses to grow the file past `max_len` bytes ([`ErrorKind::NoSpace`]),
    /// like a disk of that size.
    pub fn limit_size(&mut self, max_len: u64) {
        self.max_len = Some(max_len);
    }

    /// Sets the file's length (truncating or extending with zeros).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`], [`ErrorKind::NoSpace`] or [`ErrorKind::Io`].
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        self.check_writable(len)?;
        self.file.set_len(len).map_err(io_error)?;
        self.len = len;
        Ok(())
    }

    /// Refuses a read of `len` bytes at `offset` that reaches past the end
    /// of the file.
    fn check_read(&self, offset: u64, len: usize) -> Result<()> {
        if within(offset, len as u64, self.len) {
            Ok(())
        } else {
            fail(ErrorKind::Io, "read past the end of the file")
        }
    }

    /// The end of a write of `len` bytes at `offset`, when the file may
    /// take it.
    fn write_end(&self, offset: u64, len: usize) -> Result<u64> {
        let Some(end) = offset.checked_add(len as u64) else {
            return fail(ErrorKind::InvalidInput, "write offset overflows");
        };
        self.check_writable(end)?;
        Ok(end)
    }

    /// The descriptor a transfer of `buf` at `offset` goes through.
    fn transfer_file(&self, offset: u64, buf: &[u8]) -> &File {
        through(&self.file, self.direct.as_ref(), offset, buf)
    }

    fn check_writable(&self, end: u64) -> Result<()> {
        if self.read_only {
            return fail(ErrorKind::ReadOnly, "file is open read-only");
        }
        if self.max_len.is_some_and(|max| end > max) {
            return fail(ErrorKind::NoSpace, "no space left on the device");
        }
        Ok(())
    }
}

/// Clears `O_NONBLOCK` from `file`, a regular file or block device by now:
/// it kept the open from blocking on a FIFO, but io_uring would answer a
/// transfer that has to wait with `EAGAIN` instead of waiting.
fn blocking(file: &File) -> Result<()> {
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(|errno| io_error(errno.into()))?;
    let flags =
        nix::fcntl::OFlag::from_bits_retain(flags).difference(nix::fcntl::OFlag::O_NONBLOCK);
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(|errno| io_error(errno.into()))?;
    Ok(())
}

/// Whether `offset..offset + len` lies inside `size` bytes.
fn within(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Names the cause of a failed file operation.
fn io_error(err: std::io::Error) -> Error {
    let (kind, message) = match err.raw_os_error() {
        Some(libc::ENOENT) => (ErrorKind::NotFound, "no such file"),
        Some(libc::ELOOP) => (ErrorKind::InvalidInput, "too many levels of symbolic links"),
        Some(libc::ENOTDIR) => (ErrorKind::InvalidInput, "not a directory"),
        Some(libc::EISDIR) => (ErrorKind::InvalidInput, "is a directory"),
        Some(libc::ENAMETOOLONG) => (ErrorKind::InvalidInput, "file name too long"),
        Some(libc::ENXIO | libc::ENODEV) => (ErrorKind::InvalidInput, "no such device"),
        Some(libc::EACCES | libc::EPERM) => (ErrorKind::ReadOnly, "permission denied"),
        Some(libc::EROFS) => (ErrorKind::ReadOnly, "read-only file system"),
        Some(libc::ENOSPC | libc::EDQUOT) => (ErrorKind::NoSpace, "no space left on the device"),
        Some(libc::EFBIG) => (ErrorKind::NoSpace, "file too large"),
        _ => (ErrorKind::Io, "file I/O failed"),
    };
    let errno = err.raw_os_error().unwrap_or(0);
    Error::new(kind, message).with_os_error(errno)
}

/// The lock byte of permission bit `bit` in the range starting at `base`.
fn lock_byte(base: i64, bit: usize) -> i64 {
    base + bit as i64
}

/// Bits of `perm` as indexes 0..4.
fn bits(perm: Perm) -> impl Iterator<Item = usize> {
    (0..4).filter(move |&i| perm.bits() & (1 << i) != 0)
}

/// The bytes `access` holds: `100 + i` for what it needs, `200 + i` for
/// what it does not share.
fn held_bytes(access: Access) -> impl Iterator<Item = i64> {
    let needed = bits(access.perm).map(|i| lock_byte(PERM_BASE, i));
    let unshared = bits(access.shared.complement()).map(|i| lock_byte(SHARED_BASE, i));
    needed.chain(unshared)
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn lock_error(_: nix::Error) -> Error {
    Error::new(ErrorKind::Io, "could not lock the image file")
}

impl FileDevice {
    /// Takes (`lock`) or drops a shared lock on `byte`.
    fn set_lock(&self, byte: i64, lock: bool) -> Result<()> {
        let kind = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
        fcntl(&self.file, FcntlArg::F_OFD_SETLK(&flock(kind, byte))).map_err(lock_error)?;
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte`.
    fn held_elsewhere(&self, byte: i64) -> Result<bool> {
        let mut probe = flock(libc::F_WRLCK, byte);
        fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(lock_error)?;
        Ok(i32::from(probe.l_type) != libc::F_UNLCK)
    }

    /// Makes the lock bytes those of `target` (QEMU's
    /// `raw_apply_lock_bytes`): bytes of `keep` stay locked as well.
    fn apply_locks(&self, target: Access, keep: Access) -> Result<()> {
        let wanted = |byte: i64| {
            held_bytes(target)
                .chain(held_bytes(keep))
                .any(|b| b == byte)
        };
        for byte in (0..4).flat_map(|i| [lock_byte(PERM_BASE, i), lock_byte(SHARED_BASE, i)]) {
            self.set_lock(byte, wanted(byte))?;
        }
        Ok(())
    }

    /// Refuses `access` when another open file description's locks
    /// conflict with it (QEMU's `raw_check_lock_bytes`).
    fn check_locks(&self, access: Access) -> Result<()> {
        for i in bits(access.perm) {
            if self.held_elsewhere(lock_byte(SHARED_BASE, i))? {
                return fail(ErrorKind::PermissionConflict, NOT_SHARED[i]);
            }
        }
        for i in bits(access.shared.complement()) {
            if self.held_elsewhere(lock_byte(PERM_BASE, i))? {
                return fail(ErrorKind::PermissionConflict, HELD[i]);
            }
        }
        Ok(())
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_read(offset, buf.len())?;
        let file = self.transfer_file(offset, buf);
        file.read_exact_at(buf, offset)
            .map_err(|err| io_error(err).at_offset(offset))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let end = self.write_end(offset, buf.len())?;
        let file = self.transfer_file(offset, buf);
        file.write_all_at(buf, offset)
            .map_err(|err| io_error(err).at_offset(offset))?;
        self.len = self.len.max(end);
        Ok(())
    }

    /// One `pwritev` per 64 buffers (more when the kernel
    /// writes less than asked).
    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let len = bufs
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(b.len() as u64));
        let Some(end) = len.and_then(|len| offset.checked_add(len)) else {
            return fail(ErrorKind::InvalidInput, "write offset overflows");
        };
        self.check_writable(end)?;
        let file = match &self.direct {
            Some(direct) if bufs.iter().all(|buf| aligned(offset, buf)) => direct,
            _ => &self.file,
        };
        let mut at = offset;
        let mut bufs = bufs.iter().filter(|b| !b.is_empty()).peekable();
        while bufs.peek().is_some() {
            let mut group = [IoSlice::new(&[]); IOV_GROUP];
            let mut count = 0;
            for (slot, buf) in group.iter_mut().zip(bufs.by_ref()) {
                *slot = IoSlice::new(buf);
                count += 1;
            }
            let mut rest = &mut group[..count];
            while !rest.is_empty() {
                let pos = libc::off_t::try_from(at)
                    .map_err(|_| Error::new(ErrorKind::InvalidInput, "write offset overflows"))?;
                match pwritev(file, rest, pos) {
                    Ok(0) => return fail(ErrorKind::Io, "the file took no bytes"),
                    Ok(n) => {
                        at += n as u64;
                        IoSlice::advance_slices(&mut rest, n);
                    }
                    Err(Errno::EINTR) => {}
                    Err(errno) => return Err(io_error(errno.into()).at_offset(at)),
                }
            }
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// `fdatasync` (nothing on a read-only file).
    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(io_error)
    }

    fn can_copy(&self) -> bool {
        true
    }

    fn copy_from(
        &mut self,
        offset: u64,
        source: &Self,
        source_offset: u64,
        len: u64,
    ) -> Result<bool> {
        if !within(offset, len, self.len) || !within(source_offset, len, source.len) {
            return Ok(false);
        }
        self.check_writable(offset + len)?;
        // `io::copy` between files uses copy_file_range (and falls back to
        // a buffer itself); the files' positions are not used elsewhere.
        let (mut from, mut to) = (&source.file, &self.file);
        from.seek(SeekFrom::Start(source_offset))
            .map_err(io_error)?;
        to.seek(SeekFrom::Start(offset)).map_err(io_error)?;
        let copied = std::io::copy(&mut from.take(len), &mut to).map_err(io_error)?;
        if copied != len {
            return fail(ErrorKind::Io, "file copy ended early");
        }
        Ok(true)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Locks the file's bytes for `access` as QEMU does: the new bytes are
    /// taken first (together with the old ones, so there is no moment
    /// without a lock), then checked against other open file descriptions;
    /// on a conflict the old bytes are restored. A pure downgrade (needing
    /// less, sharing more) cannot conflict and is not checked.
    fn set_access(&mut self, access: Access) -> Result<()> {
        let old = self.locked;
        if access == old {
            return Ok(());
        }
        self.apply_locks(access, old)?;
        let downgrade = old.perm.contains(access.perm) && access.shared.contains(old.shared);
        if !downgrade {
            if let Err(err) = self.check_locks(access) {
                // Restoring only drops bytes: best effort, the refusal is
                // what the caller needs to see.
                let _ = self.apply_locks(old, old);
                return Err(err);
            }
        }
        self.apply_locks(access, access)?;
        self.locked = access;
        if access != Access::UNUSED {
            // The ring is made when a node starts using the file, not at
            // its first operation: I/O allocates nothing.
            self.prepare_ring();
        }
        Ok(())
    }

    fn identity(&self) -> DeviceId {
        self.id
    }
}

/// Waits for the operations in flight (the kernel still uses their buffers
/// and may still write the file), then releases the lock bytes before the
/// descriptor closes: a child process forked by another thread shares the
/// open file description until it execs, and would otherwise keep the
/// bytes locked until then.
impl Drop for FileDevice {
    fn drop(&mut self) {
        // Dropping the ring waits for its operations.
        self.ring = RingState::Unavailable;
        if self.locked != Access::UNUSED {
            // Best effort: closing releases them in the end anyway.
            let _ = self.apply_locks(Access::UNUSED, Access::UNUSED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Op, Queue, Submitted, Tag};

    /// A fresh directory `blockgraph-NAME-PID` under the system's temporary
    /// one, with file `a` of 8 KiB counting 0, 1, ... 255, 0, ...
    fn counting_file(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("blockgraph-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        std::fs::write(&a, (0..=255u8).cycle().take(8192).collect::<Vec<_>>()).unwrap();
        (dir, a)
    }

    #[test]
    fn errors_carry_the_real_errno_and_the_offset() {
        let (dir, _) = counting_file("errno");
        let Err(err) = FileDevice::open(&dir, true) else {
            panic!("a directory opened as an image file");
        };
        assert_eq!(
            (err.kind(), err.os_error()),
            (ErrorKind::InvalidInput, Some(libc::EISDIR))
        );
        let eio = io_error(std::io::Error::from_raw_os_error(libc::EIO)).at_offset(4096);
        assert_eq!(
            (eio.kind(), eio.os_error(), eio.offset()),
            (ErrorKind::Io, Some(5), Some(4096))
        );
        assert_eq!(eio.to_string(), "file I/O failed at byte 4096 (os error 5)");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn without_a_ring_operations_complete_at_once() {
        let (dir, path) = counting_file("ring");
        let mut device = FileDevice::open(&path, true).unwrap();
        // As where io_uring_setup fails (seccomp, io_uring_disabled).
        device.ring = RingState::Unavailable;
        let buf = Box::leak(Box::new([0u8; 100]));
        let read = Op::Read {
            offset: 1000,
            buf: &mut buf[..],
        };
        match device.submit(Tag(1), read) {
            Submitted::Done(Ok(()), Some(back)) => {
                assert!(back
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == ((1000 + i) % 256) as u8));
            }
            other => panic!("{other:?}"),
        }
        let write = Op::Write {
            offset: 8190,
            buf: &[7; 4],
        };
        let done = device.submit(Tag(2), write);
        assert!(matches!(done, Submitted::Done(Ok(()), None)));
        assert_eq!(device.size(), 8194);
        let done = device.submit(Tag(3), Op::Flush);
        assert!(matches!(done, Submitted::Done(Ok(()), None)));
        assert!(!device.busy());
        device.wait();
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copies_between_files_inside_both_sizes_only() {
        let (dir, a) = counting_file("file");
        let b = dir.join("b");
        std::fs::write(&b, vec![0u8; 4096]).unwrap();
        let source = FileDevice::open(&a, false).unwrap();
        let mut target = FileDevice::open(&b, true).unwrap();
        assert!(target.copy_from(100, &source, 1000, 3000).unwrap());
        let mut back = vec![0u8; 3000];
        target.read_at(100, &mut back).unwrap();
        let expected: Vec<u8> = (1000..4000).map(|i| (i % 256) as u8).collect();
        assert_eq!(back, expected);
        // Past the target's or the source's end: not copied, nothing written.
        assert!(!target.copy_from(4000, &source, 0, 200).unwrap());
        assert!(!target.copy_from(0, &source, 8000, 200).unwrap());
        assert_eq!(target.size(), 4096);
        let mut read_only = FileDevice::open(&b, false).unwrap();
        let refused = read_only.copy_from(0, &source, 0, 10).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ReadOnly);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// 4 KiB-aligned memory for `O_DIRECT` transfers.
    #[repr(align(4096))]
    struct Block([u8; 8192]);

    #[test]
    fn direct_transfers_see_the_buffered_ones() {
        // In the target directory: the system's temporary one may be tmpfs,
        // which has no O_DIRECT.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("blockgraph-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a");
        std::fs::write(&path, vec![0u8; 3 * 4096 + 100]).unwrap();
        let mut device = match FileDevice::open_direct(&path, true) {
            Err(err) if err.kind() == ErrorKind::Unsupported => {
                std::fs::remove_dir_all(&dir).unwrap();
                return;
            }
            other => other.unwrap(),
        };
        assert!(device.direct.is_some());
        let mut block = Block([0; 8192]);
        // Aligned: direct; unaligned: buffered; each sees the other.
        block.0.fill(7);
        device.write_at(4096, &block.0).unwrap();
        device.write_at(5000, &[9; 10]).unwrap();
        device.write_vectored_at(0, &[&block.0[..4096]]).unwrap();
        block.0.fill(0);
        device.read_at(4096, &mut block.0).unwrap();
        assert!(block.0[..904].iter().all(|&b| b == 7));
        assert_eq!(&block.0[904..914], &[9; 10]);
        assert!(block.0[914..].iter().all(|&b| b == 7));
        let mut odd = [0u8; 50];
        device.read_at(3 * 4096 + 50, &mut odd).unwrap();
        assert_eq!(odd, [0; 50]);
        device.read_at(4090, &mut odd[..10]).unwrap();
        assert_eq!(&odd[..10], &[7; 10]);
        device.flush().unwrap();
        assert_eq!(device.size(), 3 * 4096 + 100);
        drop(device);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
