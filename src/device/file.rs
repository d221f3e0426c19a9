//! A host file as a device (feature `std`).

use super::{Device, DeviceId};
use crate::error::{fail, Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

/// A host file opened read-only or read-write, optionally capped in size so
/// it behaves like a fixed-size disk.
pub struct FileDevice {
    file: File,
    len: u64,
    read_only: bool,
    max_len: Option<u64>,
    id: DeviceId,
}

impl FileDevice {
    /// Opens `path`; `writable` asks for read-write access.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when the file does not exist,
    /// [`ErrorKind::InvalidInput`] when it is neither a regular file nor a
    /// block device (a FIFO would block), otherwise [`ErrorKind::Io`].
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        // Opening a FIFO or a character device could block forever.
        let kind = std::fs::metadata(path).map_err(io_error)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return fail(
                ErrorKind::InvalidInput,
                "not a regular file or block device",
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_error)?;
        Self::from_file(file, !writable)
    }

    /// Creates (or truncates) `path` as an empty read-write file.
    ///
    /// # Errors
    /// [`ErrorKind::Io`] when the file cannot be created.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_error)?;
        Self::from_file(file, false)
    }

    fn from_file(file: File, read_only: bool) -> Result<Self> {
        let meta = file.metadata().map_err(io_error)?;
        Ok(Self {
            file,
            len: meta.len(),
            read_only,
            max_len: None,
            id: DeviceId(meta.dev(), meta.ino()),
        })
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

/// Whether `offset..offset + len` lies inside `size` bytes.
fn within(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

fn io_error(err: std::io::Error) -> Error {
    match err.kind() {
        std::io::ErrorKind::NotFound => Error::new(ErrorKind::NotFound, "no such file"),
        std::io::ErrorKind::PermissionDenied => {
            Error::new(ErrorKind::ReadOnly, "permission denied")
        }
        std::io::ErrorKind::StorageFull => {
            Error::new(ErrorKind::NoSpace, "no space left on the device")
        }
        _ => Error::new(ErrorKind::Io, "file I/O failed"),
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.file.read_exact_at(buf, offset).map_err(io_error),
            _ => fail(ErrorKind::Io, "read past the end of the file"),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return fail(ErrorKind::InvalidInput, "write offset overflows");
        };
        self.check_writable(end)?;
        self.file.write_all_at(buf, offset).map_err(io_error)?;
        self.len = self.len.max(end);
        Ok(())
    }

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

    fn identity(&self) -> DeviceId {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_between_files_inside_both_sizes_only() {
        let dir = std::env::temp_dir().join(format!("blockgraph-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, (0..=255u8).cycle().take(8192).collect::<Vec<_>>()).unwrap();
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
}
