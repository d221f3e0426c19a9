//! An in-memory device over a caller-provided buffer, built to be adversarial
//! in tests: it can fail the Nth operation, counts every operation and reports
//! each write and flush to an observer (for power-cut replay).

use super::{Device, DeviceId};
use crate::error::{fail, ErrorKind, Result};

/// One mutating operation, as reported to a [`MemDevice`] observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent<'d> {
    /// `data` was written at `offset`.
    Write {
        /// Byte offset of the write.
        offset: u64,
        /// The bytes written.
        data: &'d [u8],
    },
    /// A flush completed.
    Flush,
}

/// A device backed by a borrowed byte buffer.
///
/// The device starts `len` bytes long and may grow up to the buffer's length;
/// growing further is [`ErrorKind::NoSpace`].
pub struct MemDevice<'a> {
    storage: &'a mut [u8],
    len: u64,
    read_only: bool,
    id: u64,
    fail_at: Option<u64>,
    ops: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
    observer: Option<&'a mut dyn FnMut(DeviceEvent<'_>)>,
}

impl<'a> MemDevice<'a> {
    /// A device whose first `len` bytes of `storage` are its content.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when `len` exceeds the buffer.
    pub fn new(storage: &'a mut [u8], len: u64, id: u64) -> Result<Self> {
        if len > storage.len() as u64 {
            return fail(ErrorKind::InvalidInput, "device length exceeds its buffer");
        }
        Ok(Self {
            storage,
            len,
            read_only: false,
            id,
            fail_at: None,
            ops: 0,
            reads: 0,
            writes: 0,
            flushes: 0,
            observer: None,
        })
    }

    /// Refuses writes from now on (or allows them again).
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// Makes the operation with 0-based index `n` (counting reads, writes and
    /// flushes from now) fail with an I/O error; `None` disarms.
    pub fn fail_operation(&mut self, n: Option<u64>) {
        self.fail_at = n.map(|n| self.ops + n);
    }

    /// Registers a callback told about every write and flush that succeeds.
    pub fn observe(&mut self, observer: &'a mut dyn FnMut(DeviceEvent<'_>)) {
        self.observer = Some(observer);
    }

    /// Number of successful reads.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Number of successful writes.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Number of successful flushes.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// The device's current content.
    pub fn contents(&self) -> &[u8] {
        &self.storage[..self.len as usize]
    }

    fn begin_operation(&mut self) -> Result<()> {
        let index = self.ops;
        self.ops += 1;
        if self.fail_at == Some(index) {
            return fail(ErrorKind::Io, "injected device failure");
        }
        Ok(())
    }

    fn notify(&mut self, event: DeviceEvent<'_>) {
        if let Some(observer) = self.observer.as_mut() {
            observer(event);
        }
    }
}

impl Device for MemDevice<'_> {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.begin_operation()?;
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len => {
                buf.copy_from_slice(&self.storage[offset as usize..end as usize]);
                self.reads += 1;
                Ok(())
            }
            _ => fail(ErrorKind::Io, "read past the end of the device"),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored_at(offset, &[buf])
    }

    /// One operation and one reported write, however many buffers.
    fn write_vectored_at(&mut self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        if self.read_only {
            return fail(ErrorKind::ReadOnly, "device is read-only");
        }
        self.begin_operation()?;
        let len = bufs
            .iter()
            .try_fold(0u64, |sum, b| sum.checked_add(b.len() as u64));
        let end = match len.and_then(|len| offset.checked_add(len)) {
            Some(end) if end <= self.storage.len() as u64 => end,
            _ => return fail(ErrorKind::NoSpace, "no space left on the device"),
        };
        if offset > self.len {
            self.storage[self.len as usize..offset as usize].fill(0);
        }
        let mut at = offset as usize;
        for buf in bufs {
            self.storage[at..at + buf.len()].copy_from_slice(buf);
            at += buf.len();
        }
        self.len = self.len.max(end);
        self.writes += 1;
        if let Some(observer) = self.observer.as_mut() {
            observer(DeviceEvent::Write {
                offset,
                data: &self.storage[offset as usize..end as usize],
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.begin_operation()?;
        self.flushes += 1;
        self.notify(DeviceEvent::Flush);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> DeviceId {
        DeviceId(0, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_buffer_and_refuses_beyond() {
        let mut buf = [0u8; 16];
        let mut dev = MemDevice::new(&mut buf, 4, 1).unwrap();
        dev.write_at(6, &[7, 7]).unwrap();
        assert_eq!(dev.size(), 8);
        assert_eq!(dev.contents(), &[0, 0, 0, 0, 0, 0, 7, 7]);
        let err = dev.write_at(15, &[1, 2]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        let mut out = [0u8; 4];
        assert_eq!(dev.read_at(6, &mut out).unwrap_err().kind(), ErrorKind::Io);
    }

    #[test]
    fn fails_the_chosen_operation_once() {
        let mut buf = [0u8; 8];
        let mut dev = MemDevice::new(&mut buf, 8, 1).unwrap();
        dev.fail_operation(Some(1));
        let mut out = [0u8; 2];
        dev.read_at(0, &mut out).unwrap();
        assert_eq!(dev.flush().unwrap_err().kind(), ErrorKind::Io);
        dev.flush().unwrap();
        assert_eq!((dev.reads(), dev.flushes()), (1, 1));
    }

    #[test]
    fn vectored_write_is_one_operation() {
        let mut seen = [0u64; 2];
        let mut observer = |event: DeviceEvent<'_>| {
            if let DeviceEvent::Write { offset, data } = event {
                seen = [offset, data.len() as u64];
            }
        };
        let mut buf = [0u8; 8];
        {
            let mut dev = MemDevice::new(&mut buf, 0, 1).unwrap();
            dev.observe(&mut observer);
            dev.write_vectored_at(2, &[&[1, 2], &[], &[3]]).unwrap();
            assert_eq!(dev.writes(), 1);
            assert_eq!(dev.contents(), &[0, 0, 1, 2, 3]);
        }
        assert_eq!(seen, [2, 3]);
    }

    #[test]
    fn observer_sees_writes_and_flushes() {
        let mut log = 0usize;
        let mut observer = |event: DeviceEvent<'_>| {
            log += match event {
                DeviceEvent::Write { data, .. } => data.len(),
                DeviceEvent::Flush => 100,
            }
        };
        let mut buf = [0u8; 8];
        {
            let mut dev = MemDevice::new(&mut buf, 8, 1).unwrap();
            dev.observe(&mut observer);
            dev.write_at(0, &[1, 2, 3]).unwrap();
            dev.flush().unwrap();
        }
        assert_eq!(log, 103);
    }
}
