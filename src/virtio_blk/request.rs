//! The request wire format (virtio 1.2 §5.2.6) and the decoding of one
//! descriptor chain into a checked [`Request`].
//!
//! A chain is what the VMM's split virtqueue hands over: descriptors in
//! order, device-readable ones first. Like QEMU, the decoder sees two byte
//! streams, so a header or a segment may be split across descriptors or
//! share one with data:
//!
//! ```text
//!  readable stream: | header (16) | OUT data / discard segment ... |
//!  writable stream: | IN data / GET_ID data ...           | status (1) |
//! ```
//!
//! The status byte is the last byte of the last non-empty descriptor,
//! which must be device-writable; without it the chain is completed with
//! used length 0 and nothing written. Everything else that is wrong gives
//! a [`Refusal`] with the status to write (`IOERR` for a malformed
//! request, `UNSUPP` for an unknown type or flag) before anything reaches
//! the image. The decoder reads guest memory only through a callback, and
//! only the header and a discard or write-zeroes segment, once each.

use heapless::Vec;

use super::config::Config;

/// Bytes in a sector: the unit of `sector` fields and lengths.
pub const SECTOR: u64 = 512;
/// Bytes in a request header.
pub const HEADER_LEN: usize = 16;
/// Bytes in a discard or write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;
/// Bytes of serial a GET_ID request returns at most.
pub const ID_LEN: usize = 20;

/// Request type: read (`VIRTIO_BLK_T_IN`).
pub const T_IN: u32 = 0;
/// Request type: write (`VIRTIO_BLK_T_OUT`).
pub const T_OUT: u32 = 1;
/// Request type: flush (`VIRTIO_BLK_T_FLUSH`).
pub const T_FLUSH: u32 = 4;
/// Request type: device identifier (`VIRTIO_BLK_T_GET_ID`).
pub const T_GET_ID: u32 = 8;
/// Request type: discard (`VIRTIO_BLK_T_DISCARD`).
pub const T_DISCARD: u32 = 11;
/// Request type: write zeroes (`VIRTIO_BLK_T_WRITE_ZEROES`).
pub const T_WRITE_ZEROES: u32 = 13;

/// Discard / write-zeroes segment flag: unmap (only for write zeroes).
pub const FLAG_UNMAP: u32 = 1;

/// Byte offsets of the header's fields (`reserved` at 4 is ignored).
const HEADER_TYPE: usize = 0;
const HEADER_SECTOR: usize = 8;
/// Byte offsets of a discard / write-zeroes segment's fields.
const SEGMENT_SECTOR: usize = 0;
const SEGMENT_SECTORS: usize = 8;
const SEGMENT_FLAGS: usize = 12;

/// The status byte the device writes last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = 0,
    /// `VIRTIO_BLK_S_IOERR`: a malformed request or a failed operation.
    IoErr = 1,
    /// `VIRTIO_BLK_S_UNSUPP`: an unknown request type or flag.
    Unsupp = 2,
}

/// One descriptor of a chain, as the VMM read it from the descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_WRITE`: the device writes it (else it reads it).
    pub device_writable: bool,
}

impl Descriptor {
    /// The guest bytes `addr..end`, `None` when `end` overflows.
    fn end(&self) -> Option<u64> {
        self.addr.checked_add(u64::from(self.len))
    }

    /// Whether the two descriptors share a guest byte (both non-empty).
    fn overlaps(&self, other: &Descriptor) -> bool {
        let (a, b) = (self.end(), other.end());
        let (a, b) = (a.unwrap_or(u64::MAX), b.unwrap_or(u64::MAX));
        self.len > 0 && other.len > 0 && self.addr < b && other.addr < a
    }
}

/// A piece of guest memory a request reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes, never 0.
    pub len: u32,
}

/// A descriptor chain as taken from the avail ring: at most `D`
/// descriptors kept; a longer one keeps its first `D - 1` and its last
/// (where the status byte is) and is refused.
#[derive(Clone, Debug)]
pub struct Chain<const D: usize> {
    descriptors: Vec<Descriptor, D>,
    too_long: bool,
}

/// What a decoded request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Read into the data segments from guest byte `offset`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Write the data segments at guest byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the serial into the data segments.
    GetId,
    /// Discard `len` bytes at `offset`.
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write `len` zero bytes at `offset`.
    WriteZeroes {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The driver allows unmapping (the flag; the engine's zero write
        /// chooses for itself).
        unmap: bool,
    },
}

/// A checked request: what to do, the guest memory of its data (at most
/// `S` segments) and where its status byte is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<const S: usize> {
    /// What the request does.
    pub op: Op,
    /// Its data segments in guest order: IN and GET_ID write them, OUT
    /// reads them; none for the others.
    pub data: Vec<Span, S>,
    /// Guest address of the status byte.
    pub status: u64,
}

impl<const S: usize> Request<S> {
    /// Bytes in the data segments.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }

    /// The used length reported when the request succeeds: bytes written
    /// into guest memory (IN and GET_ID data, and the status byte).
    pub fn used_len(&self) -> u32 {
        let data = match self.op {
            Op::Read { .. } | Op::GetId => self.data_len(),
            _ => 0,
        };
        u32::try_from(data + 1).unwrap_or(u32::MAX)
    }
}

/// Why a chain is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The chain has no status byte (empty, its last non-empty descriptor
    /// is not writable or ends past the address space): complete it with
    /// used length 0, writing nothing.
    NoStatus,
    /// Write `status` at guest address `at` and complete with used
    /// length 1.
    Status {
        /// Where the status byte is.
        at: u64,
        /// `IoErr` or `Unsupp`.
        status: Status,
    },
}

impl<const D: usize> Chain<D> {
    /// Takes the descriptors of a chain.
    pub fn new(descriptors: impl IntoIterator<Item = Descriptor>) -> Self {
        let mut chain = Self {
            descriptors: Vec::new(),
            too_long: false,
        };
        for descriptor in descriptors {
            if let Err(descriptor) = chain.descriptors.push(descriptor) {
                chain.too_long = true;
                if let Some(last) = chain.descriptors.last_mut() {
                    *last = descriptor;
                }
            }
        }
        chain
    }

    /// The descriptors kept.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// Whether the chain had more descriptors than it keeps.
    pub fn is_too_long(&self) -> bool {
        self.too_long
    }

    /// Whether serving both chains at once could touch one guest byte
    /// through a writable descriptor of either (two readers may share).
    pub fn conflicts<const E: usize>(&self, other: &Chain<E>) -> bool {
        // Chains far apart (the common case) need no pairwise look.
        let (Some(a), Some(b)) = (self.bounds(), other.bounds()) else {
            return false;
        };
        if a.1 <= b.0 || b.1 <= a.0 {
            return false;
        }
        self.descriptors.iter().any(|a| {
            other
                .descriptors
                .iter()
                .any(|b| (a.device_writable || b.device_writable) && a.overlaps(b))
        })
    }

    /// The guest bytes from the lowest to the end of the highest of the
    /// non-empty descriptors kept (an end past the address space as
    /// `u64::MAX`).
    fn bounds(&self) -> Option<(u64, u64)> {
        let kept = self.descriptors.iter().filter(|d| d.len > 0);
        let start = kept.clone().map(|d| d.addr).min()?;
        let end = kept.map(|d| d.end().unwrap_or(u64::MAX)).max()?;
        Some((start, end))
    }

    /// Guest address of the status byte: the last byte of the last
    /// non-empty descriptor, if that one is writable.
    fn status(&self) -> Option<u64> {
        let last = self.descriptors.iter().rev().find(|d| d.len > 0)?;
        last.device_writable.then_some(())?;
        last.addr.checked_add(u64::from(last.len) - 1)
    }

    /// Decodes the chain for a disk configured as `config`, reading the
    /// guest bytes it needs (the header, a segment) with `read(addr, buf)`,
    /// which fills `buf` from guest address `addr` or returns `false`
    /// (outside guest memory). At most `S` data segments.
    ///
    /// # Errors
    /// A [`Refusal`] for every chain that must not reach the image.
    pub fn decode<const S: usize>(
        &self,
        config: &Config,
        mut read: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<Request<S>, Refusal> {
        let status = self.status().ok_or(Refusal::NoStatus)?;
        let refuse = |status_code| Refusal::Status {
            at: status,
            status: status_code,
        };
        let ioerr = refuse(Status::IoErr);
        self.check_shape().ok_or(ioerr)?;
        let streams = Streams {
            descriptors: &self.descriptors,
        };
        let (readable, writable) = streams.lengths();
        let mut header = [0u8; HEADER_LEN];
        if readable < HEADER_LEN as u64 || !streams.read(0, &mut header, &mut read) {
            return Err(ioerr);
        }
        let kind = le32(&header, HEADER_TYPE);
        let sector = le64(&header, HEADER_SECTOR);
        // Writable bytes before the status byte.
        let returned = writable - 1;
        let extra = readable - HEADER_LEN as u64;
        let mut data = Vec::new();
        let op = match kind {
            T_IN | T_OUT => {
                let (write, start, len) = match kind {
                    T_IN => (false, 0, returned),
                    _ => (true, HEADER_LEN as u64, extra),
                };
                let other = if write { returned } else { extra };
                if other != 0 || (write && config.read_only) {
                    return Err(ioerr);
                }
                let offset = sectors_in_range(config, sector, len).ok_or(ioerr)?;
                if !streams.cut(!write, (start, start + len), &mut data)
                    || !within_limits(config, &data)
                {
                    return Err(ioerr);
                }
                match write {
                    true => Op::Write { offset },
                    false => Op::Read { offset },
                }
            }
            T_FLUSH | T_GET_ID => {
                if extra != 0 || (kind == T_FLUSH && returned != 0) {
                    return Err(ioerr);
                }
                if kind == T_FLUSH {
                    Op::Flush
                } else if streams.cut(true, (0, returned.min(ID_LEN as u64)), &mut data) {
                    Op::GetId
                } else {
                    return Err(ioerr);
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let discard = kind == T_DISCARD;
                let offered = match discard {
                    true => config.offers_discard(),
                    false => config.offers_write_zeroes(),
                };
                if !offered {
                    return Err(refuse(Status::Unsupp));
                }
                // One segment per request (`Config::max_discard_seg`).
                let mut segment = [0u8; SEGMENT_LEN];
                if extra != SEGMENT_LEN as u64
                    || returned != 0
                    || !streams.read(HEADER_LEN as u64, &mut segment, &mut read)
                {
                    return Err(ioerr);
                }
                decode_segment(config, discard, &segment).map_err(refuse)?
            }
            _ => return Err(refuse(Status::Unsupp)),
        };
        Ok(Request { op, data, status })
    }

    /// Whether the chain's shape is servable: not too long, every
    /// descriptor inside the address space, readable ones before writable
    /// ones, and no guest byte written by one descriptor and touched by
    /// another.
    fn check_shape(&self) -> Option<()> {
        if self.too_long {
            return None;
        }
        let mut seen_writable = false;
        for (i, d) in self.descriptors.iter().enumerate() {
            d.end()?;
            if d.len == 0 {
                continue;
            }
            if !d.device_writable && seen_writable {
                return None;
            }
            seen_writable |= d.device_writable;
            let others = &self.descriptors[i + 1..];
            if others
                .iter()
                .any(|o| (d.device_writable || o.device_writable) && d.overlaps(o))
            {
                return None;
            }
        }
        Some(())
    }
}

/// A chain's descriptors seen as its readable and its writable byte stream.
struct Streams<'c> {
    descriptors: &'c [Descriptor],
}

impl Streams<'_> {
    /// Bytes in the readable and in the writable stream.
    fn lengths(&self) -> (u64, u64) {
        let sum = |writable: bool| {
            self.descriptors
                .iter()
                .filter(|d| d.device_writable == writable)
                .map(|d| u64::from(d.len))
                .sum()
        };
        (sum(false), sum(true))
    }

    /// Calls `each` with the guest spans of bytes `start..end` of the
    /// writable (or readable) stream, in order, and the position in the
    /// stream where each begins; stops at the first `false`.
    fn spans(
        &self,
        writable: bool,
        (start, end): (u64, u64),
        mut each: impl FnMut(Span, u64) -> bool,
    ) -> bool {
        let mut pos = 0u64;
        for d in self
            .descriptors
            .iter()
            .filter(|d| d.device_writable == writable)
        {
            let (from, to) = (pos.max(start), (pos + u64::from(d.len)).min(end));
            if from < to {
                // Both inside the descriptor: the casts cannot truncate.
                let span = Span {
                    addr: d.addr + (from - pos),
                    len: (to - from) as u32,
                };
                if !each(span, from - start) {
                    return false;
                }
            }
            pos += u64::from(d.len);
        }
        true
    }

    /// The spans of bytes `range` of a stream, appended to `out`; `false`
    /// when more than `out` holds.
    fn cut<const S: usize>(
        &self,
        writable: bool,
        range: (u64, u64),
        out: &mut Vec<Span, S>,
    ) -> bool {
        self.spans(writable, range, |span, _| out.push(span).is_ok())
    }

    /// Reads `buf.len()` bytes of the readable stream from `start`.
    fn read(
        &self,
        start: u64,
        buf: &mut [u8],
        read: &mut impl FnMut(u64, &mut [u8]) -> bool,
    ) -> bool {
        let range = (start, start + buf.len() as u64);
        self.spans(false, range, |span, at| {
            let at = at as usize;
            read(span.addr, &mut buf[at..at + span.len as usize])
        })
    }
}

/// The byte offset of `len` bytes at `sector`, when they are whole
/// blocks (`blk_size`, as QEMU checks) inside the disk.
fn sectors_in_range(config: &Config, sector: u64, len: u64) -> Option<u64> {
    let block = u64::from(config.blk_size).max(SECTOR);
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(len)?;
    let capacity = config.capacity.checked_mul(SECTOR)?;
    let whole = offset.is_multiple_of(block) && len.is_multiple_of(block);
    (whole && end <= capacity).then_some(offset)
}

/// Whether the data segments respect `seg_max` and `size_max`.
fn within_limits(config: &Config, data: &[Span]) -> bool {
    data.len() <= config.seg_max as usize && data.iter().all(|s| s.len <= config.size_max)
}

/// Checks a discard or write-zeroes segment; its operation or the status
/// refusing it.
fn decode_segment(
    config: &Config,
    discard: bool,
    segment: &[u8; SEGMENT_LEN],
) -> Result<Op, Status> {
    let sector = le64(segment, SEGMENT_SECTOR);
    let sectors = le32(segment, SEGMENT_SECTORS);
    let flags = le32(segment, SEGMENT_FLAGS);
    // Unknown flags, and unmap on a discard, are unsupported (§5.2.6.2).
    if flags & !FLAG_UNMAP != 0 || (discard && flags & FLAG_UNMAP != 0) {
        return Err(Status::Unsupp);
    }
    let (most, align) = match discard {
        true => (
            config.max_discard_sectors,
            config.discard_sector_alignment.max(1),
        ),
        false => (config.max_write_zeroes_sectors, 1),
    };
    if sectors > most || !sector.is_multiple_of(u64::from(align)) || !sectors.is_multiple_of(align)
    {
        return Err(Status::IoErr);
    }
    let len = u64::from(sectors) * SECTOR;
    let offset = sectors_in_range(config, sector, len).ok_or(Status::IoErr)?;
    Ok(match discard {
        true => Op::Discard { offset, len },
        false => Op::WriteZeroes {
            offset,
            len,
            unmap: flags & FLAG_UNMAP != 0,
        },
    })
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(field)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}
