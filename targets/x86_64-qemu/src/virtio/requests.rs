//! The requests in flight on one virtio-blk disk: split-phase operations
//! from the request engine (`blockgraph::device::Queue`), their completions
//! until `poll` reports them, and synchronous requests among them.
//!
//! [`Requests`] has one record per request the disk's ring holds (42 with
//! a ring of 128 descriptors). A record keeps the request's header and
//! status (the device reads and writes them: records live in the static
//! disk table and never move), the engine's tag, and the buffer as a raw
//! pointer: the engine lent it for `'b`, and gets it back from `poll`.
//! Every step is O(1): free and finished records are kept on stacks, the
//! record of a request in flight is found by its virtio token.
//!
//! ```text
//!  queue(tag, op) --> in flight (token) --reap--> finished (result) --take--> free
//!                     (the device is told at the next reap or run)
//!        | no free record, not whole sectors, too long: Err(op), the caller
//!        | runs it synchronously (Submitted::Done)
//!  run(sector, transfer): start, then reap others until its own token completes
//! ```
//!
//! A full ring never fails an operation: `queue` only takes one while a
//! record is free, and every record free means room in the ring (a record
//! per request the ring holds). Otherwise the operation runs synchronously
//! through [`Requests::run`], which waits for room (reaping completions into
//! their records, reported later) and then for its own completion. So the
//! engine needs no cap on operations in flight.
//!
//! A device that completes a request the driver never started breaks the
//! protocol: it is reset, every request in flight fails, and the disk
//! refuses I/O from then on (no panic).

use core::hint::spin_loop;
use core::ptr::NonNull;

use blockgraph::device::{Op, Tag};
use virtio_drivers::Error;

use super::blk::{Driver, Request, Transfer, DESCRIPTORS_PER_REQUEST};
use super::ring::MAX_SIZE;
use crate::sectors::SECTOR;

/// Most requests one disk keeps in flight.
pub const MAX_REQUESTS: usize = MAX_SIZE / DESCRIPTORS_PER_REQUEST;
/// Largest transfer queued as one request (larger ones run synchronously,
/// split by the caller).
pub const MAX_TRANSFER: usize = 1 << 20;

/// What a record's buffer is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// One operation from the engine.
struct Record {
    tag: Tag,
    kind: Kind,
    /// The engine's buffer (dangling for a flush), whole.
    data: NonNull<u8>,
    len: usize,
    /// The part of it transferred: `at..at + part`.
    at: usize,
    part: usize,
    /// Whether the buffer goes back to the engine at completion (a read,
    /// a part write).
    lent: bool,
    request: Request,
    /// The result, once finished.
    result: Result<(), Error>,
}

impl Record {
    const FREE: Record = Record {
        tag: Tag(0),
        kind: Kind::Flush,
        data: NonNull::dangling(),
        len: 0,
        at: 0,
        part: 0,
        lent: false,
        request: Request::new(),
        result: Ok(()),
    };

    /// The transfer the record's request was started with.
    ///
    /// # Safety
    /// The record holds a buffer the engine lent (`queue`) and nothing else
    /// uses it: the device is done with it or gets it only through the
    /// driver's `start`/`finish`.
    unsafe fn transfer<'t>(&self) -> Transfer<'t> {
        // SAFETY: `data`/`len` describe the buffer lent in `queue`, valid
        // until the engine gets it back (the caller's promise), and `queue`
        // checked that `at..at + part` lies in it.
        unsafe {
            let data = self.data.as_ptr().add(self.at);
            match self.kind {
                Kind::Read => Transfer::Read(core::slice::from_raw_parts_mut(data, self.part)),
                Kind::Write => Transfer::Write(core::slice::from_raw_parts(data, self.part)),
                Kind::Flush => Transfer::Flush,
            }
        }
    }
}

/// Record indices, last in first out.
struct Stack {
    items: [u8; MAX_REQUESTS],
    len: usize,
}

impl Stack {
    /// Indices `0..count`, `0` on top.
    fn counting(count: usize) -> Self {
        let mut stack = Stack {
            items: [0; MAX_REQUESTS],
            len: 0,
        };
        for index in (0..count.min(MAX_REQUESTS)).rev() {
            stack.push(index);
        }
        stack
    }

    /// Pushes `index`; there is room for every record.
    fn push(&mut self, index: usize) {
        if let Some(place) = self.items.get_mut(self.len) {
            *place = index as u8;
            self.len += 1;
        }
    }

    fn pop(&mut self) -> Option<usize> {
        self.len = self.len.checked_sub(1)?;
        Some(usize::from(self.items[self.len]))
    }
}

/// A completed operation for the engine: tag, result and, for a read or a
/// part operation, its buffer.
pub type Completion<'b> = (Tag, Result<(), Error>, Option<&'b mut [u8]>);

/// The requests in flight on one disk.
pub struct Requests {
    records: [Record; MAX_REQUESTS],
    /// Records not in use (as many as the disk's ring holds requests).
    free: Stack,
    /// Records finished and not yet taken.
    finished: Stack,
    /// The record of each token in flight.
    by_token: [Option<u8>; MAX_SIZE],
    /// Requests in flight now, and at most so far.
    in_flight: usize,
    peak: usize,
    /// The device broke the protocol and was reset.
    broken: bool,
}

// SAFETY: the raw buffer pointers are only dereferenced by the owner of
// the `Requests` (the disk table's lock serialises that), and the buffers
// they point to were lent to this disk by whoever submitted them.
unsafe impl Send for Requests {}

impl Requests {
    /// No requests, for a disk whose ring holds `capacity` requests (at
    /// most [`MAX_REQUESTS`] are used).
    pub fn new(capacity: usize) -> Self {
        Self {
            records: [Record::FREE; MAX_REQUESTS],
            free: Stack::counting(capacity),
            finished: Stack::counting(0),
            by_token: [None; MAX_SIZE],
            in_flight: 0,
            peak: 0,
            broken: false,
        }
    }

    /// Whether an operation is in flight or completed and not yet
    /// reported.
    pub fn busy(&self) -> bool {
        self.in_flight + self.finished.len > 0
    }

    /// The most requests that were in flight at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Puts `op` (tag `tag`) in the device's ring as a request of its own,
    /// reported later by [`Requests::take`]; the device is told at the
    /// next [`Requests::reap`] (the engine's next poll). Gives the
    /// operation back when it must run synchronously instead: no free
    /// record, a transfer that is not whole sectors in range or longer
    /// than [`MAX_TRANSFER`], a flush the device does not need, a broken
    /// device.
    ///
    /// The buffer is `'static` and lent whole (moved into the record): it
    /// stays valid, and nothing else reaches it, until [`Requests::take`]
    /// hands it back.
    pub fn queue(
        &mut self,
        driver: &mut Driver,
        tag: Tag,
        mut op: Op<'static>,
    ) -> Result<(), Op<'static>> {
        let (kind, offset, data, len) = match &mut op {
            Op::Read { offset, buf } | Op::ReadPart { offset, buf, .. } => {
                (Kind::Read, *offset, buf.as_mut_ptr(), buf.len())
            }
            Op::WritePart { offset, buf, .. } => {
                (Kind::Write, *offset, buf.as_mut_ptr(), buf.len())
            }
            Op::Write { offset, buf } => (Kind::Write, *offset, buf.as_ptr().cast_mut(), buf.len()),
            Op::Flush => (Kind::Flush, 0, NonNull::dangling().as_ptr(), 0),
            // An operation this driver does not know runs synchronously.
            _ => return Err(op),
        };
        let (at, part, lent) = match &op {
            Op::ReadPart { at, len, .. } | Op::WritePart { at, len, .. } => (*at, *len, true),
            Op::Read { .. } => (0, len, true),
            _ => (0, len, false),
        };
        let inside = at.checked_add(part).is_some_and(|end| end <= len);
        let whole = match kind {
            Kind::Flush => driver.has_write_cache(),
            _ => inside && whole_sectors(offset, part, driver.sectors()),
        };
        if self.broken || !whole || !driver.has_room() {
            return Err(op);
        }
        let Some(index) = self.free.pop() else {
            return Err(op);
        };
        let record = &mut self.records[index];
        record.tag = tag;
        record.kind = kind;
        record.data = NonNull::new(data).unwrap_or(NonNull::dangling());
        record.len = len;
        (record.at, record.part, record.lent) = (at, part, lent);
        // SAFETY: the record holds the engine's `'static` buffer, moved in
        // here and reached by nothing else until `take` hands it back, and
        // its request storage stays in place in the static disk table.
        let started = unsafe {
            let transfer = record.transfer();
            driver.start(&mut record.request, offset / SECTOR as u64, transfer)
        };
        match started {
            Ok(token) => {
                if let Some(place) = self.by_token.get_mut(usize::from(token)) {
                    *place = Some(index as u8);
                }
                self.in_flight += 1;
                self.peak = self.peak.max(self.in_flight);
            }
            Err(err) => {
                record.result = Err(err);
                self.finished.push(index);
            }
        }
        Ok(())
    }

    /// Tells the device about the requests queued since the last call, and
    /// moves every request it completed into its record.
    pub fn reap(&mut self, driver: &mut Driver) {
        driver.kick();
        while let Some(token) = driver.peek() {
            if self.reap_one(driver, token).is_err() {
                return;
            }
        }
    }

    /// Takes the next completion to report, freeing its record (and
    /// handing back a read's buffer, once).
    pub fn take(&mut self) -> Option<Completion<'static>> {
        let index = self.finished.pop()?;
        self.free.push(index);
        let record = &self.records[index];
        let (data, len) = (record.data.as_ptr(), record.len);
        let buf = match record.lent {
            // SAFETY: the buffer was a `'static` mutable borrow moved into
            // the record by `queue`; the device is done with it, it is
            // handed back once, and the record is free now.
            true => Some(unsafe { core::slice::from_raw_parts_mut(data, len) }),
            false => None,
        };
        Some((record.tag, record.result, buf))
    }

    /// Runs `transfer` at `sector` and waits for it; requests in flight
    /// that complete meanwhile are kept for [`Requests::take`]. A flush the
    /// device does not need succeeds at once.
    ///
    /// # Errors
    /// The device's, or `IoError` on a broken device.
    pub fn run(
        &mut self,
        driver: &mut Driver,
        sector: u64,
        mut transfer: Transfer<'_>,
    ) -> Result<(), Error> {
        if matches!(transfer, Transfer::Flush) && !driver.has_write_cache() {
            return Ok(());
        }
        if self.broken {
            return Err(Error::IoError);
        }
        while !driver.has_room() {
            self.reap_next(driver)?;
        }
        let mut request = Request::new();
        // SAFETY: `request` and the buffer stay borrowed by this function
        // until `finish` below, or until a reset stops the device.
        let token = unsafe { driver.start(&mut request, sector, reborrow(&mut transfer))? };
        driver.kick();
        loop {
            match driver.peek() {
                Some(done) if done == token => {
                    // SAFETY: the buffers `start` was given for `token`.
                    return unsafe { driver.finish(token, &mut request, transfer) };
                }
                Some(other) => self.reap_one(driver, other)?,
                None => spin_loop(),
            }
        }
    }

    /// Waits for the next completion and moves it into its record (the
    /// device is told about queued requests first: they may be the ones to
    /// complete).
    fn reap_next(&mut self, driver: &mut Driver) -> Result<(), Error> {
        driver.kick();
        loop {
            match driver.peek() {
                Some(token) => return self.reap_one(driver, token),
                None => spin_loop(),
            }
        }
    }

    /// Moves completed request `token` (the next one) into its record; a
    /// token that is no request in flight resets the device.
    fn reap_one(&mut self, driver: &mut Driver, token: u16) -> Result<(), Error> {
        let slot = self.by_token.get_mut(usize::from(token));
        let Some(index) = slot.and_then(Option::take).map(usize::from) else {
            self.fail(driver);
            return Err(Error::WrongToken);
        };
        let record = &mut self.records[index];
        // SAFETY: the record's request and buffer are those `start` was
        // given for `token`, still lent by the engine.
        record.result = unsafe {
            let transfer = record.transfer();
            driver.finish(token, &mut record.request, transfer)
        };
        self.in_flight -= 1;
        self.finished.push(index);
        Ok(())
    }

    /// Resets a device that broke the protocol and fails its requests.
    fn fail(&mut self, driver: &mut Driver) {
        driver.reset();
        self.broken = true;
        self.in_flight = 0;
        for index in self.by_token.iter_mut().filter_map(Option::take) {
            let index = usize::from(index);
            self.records[index].result = Err(Error::IoError);
            self.finished.push(index);
        }
    }
}

/// Whether `len` bytes at byte `offset` are whole sectors within a disk of
/// `sectors` sectors, and at most [`MAX_TRANSFER`].
fn whole_sectors(offset: u64, len: usize, sectors: u64) -> bool {
    let size = sectors.saturating_mul(SECTOR as u64);
    len != 0
        && len <= MAX_TRANSFER
        && offset.is_multiple_of(SECTOR as u64)
        && len.is_multiple_of(SECTOR)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

/// The same transfer again, for a shorter borrow.
fn reborrow<'t>(transfer: &'t mut Transfer<'_>) -> Transfer<'t> {
    match transfer {
        Transfer::Read(buf) => Transfer::Read(buf),
        Transfer::Write(buf) => Transfer::Write(buf),
        Transfer::Flush => Transfer::Flush,
        Transfer::Serial(id) => Transfer::Serial(id),
    }
}
