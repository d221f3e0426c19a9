//! Guest memory: the [`GuestMemory`] trait a VMM implements, [`FlatMemory`]
//! for guest RAM that is one host buffer, and the only code of the crate
//! that turns guest addresses into slices.
//!
//! The request engine borrows guest buffers as `&'b mut [u8]` and
//! `&'b [u8]` (zero copy). Rust forbids two live references to one byte
//! when either is `&mut`, and a hostile guest may point descriptors of one
//! request, or of two requests in flight, at the same memory. The
//! [`Server`](super::Server) keeps the rule: it refuses a chain whose own
//! descriptors overlap where one is written, and holds back a chain that
//! conflicts with one in flight (or queued before it) until that one has
//! completed, so the functions here are only called on guest bytes no
//! live slice covers.
#![allow(unsafe_code)]

use core::marker::PhantomData;
use core::ptr::NonNull;

use heapless::Vec;

use super::request::Span;

/// Translates guest physical addresses to host memory the server may
/// borrow for `'b`.
///
/// # Safety
///
/// An implementation promises, for every `Some(ptr)` that
/// [`translate`](GuestMemory::translate)`(addr, len)` returns:
///
/// 1. `ptr` is valid for reads and writes of `len` bytes for all of `'b`:
///    the memory stays mapped at that place (not unmapped, remapped or
///    freed) while `'b` lasts, and any byte value is allowed in it.
/// 2. The translation is a consistent, one-to-one map of guest bytes to
///    host bytes: translations of two guest ranges overlap in host memory
///    exactly where the guest ranges overlap (guest RAM mapped at two guest
///    addresses, or a translation that changes during `'b`, breaks the
///    server's overlap checks, which work on guest addresses).
/// 3. During `'b`, no Rust reference (`&` or `&mut`) to that memory exists
///    except the slices the one [`Server`](super::Server) owning this value
///    makes: the VMM reaches guest RAM (its virtqueues, other devices) only
///    through raw pointers or volatile accesses, and never hands the same
///    guest RAM to a second `Server` (one server serves every disk of a
///    guest, [`Server::add_disk`](super::Server::add_disk)).
///
/// The guest itself may change its memory at any time, as a device's DMA
/// target may be changed: the memory must be mapped so that this is
/// allowed (shared with the guest, never assumed immutable by the VMM).
/// The server does not rely on guest bytes staying put: it reads each
/// header and segment once, into its own copy, and checks the copy; data
/// the guest changes under a request in flight is the guest's own
/// corruption, as on real hardware. A guest may also point a buffer at its
/// own virtqueue: the VMM's volatile reads of the ring then meet the
/// engine's writes there like the guest's own accesses do, and give bytes
/// the VMM checks as it checks every ring entry. Zero copy accepts this
/// (a VMM that cannot should copy through bounce buffers instead).
pub unsafe trait GuestMemory<'b> {
    /// The host address of guest bytes `addr..addr + len` (`len` > 0), or
    /// `None` when any of them lies outside guest RAM or the range is not
    /// contiguous in host memory.
    fn translate(&self, addr: u64, len: u32) -> Option<NonNull<u8>>;
}

/// Guest RAM that is one host buffer, lent for `'m`: guest physical
/// addresses `start..start + len` are its bytes, in order. Nothing else
/// can reach the buffer while it is lent, which is what [`GuestMemory`]
/// asks (the guest's own concurrent changes aside, as its documentation
/// says).
pub struct FlatMemory<'m> {
    base: NonNull<u8>,
    len: usize,
    start: u64,
    memory: PhantomData<&'m mut [u8]>,
}

// SAFETY: it stands for the `&'m mut [u8]` it was made from, which may be
// sent to another thread.
unsafe impl Send for FlatMemory<'_> {}

impl<'m> FlatMemory<'m> {
    /// Guest RAM `memory`, its first byte at guest address `start`.
    pub fn new(memory: &'m mut [u8], start: u64) -> Self {
        Self {
            len: memory.len(),
            base: NonNull::from(memory).cast(),
            start,
            memory: PhantomData,
        }
    }

    /// Copies the guest bytes at `addr` into `buf`; `false` (nothing
    /// copied) when they are not all guest RAM.
    ///
    /// # Safety
    /// No chain of the [`Server`](super::Server) owning this memory that
    /// writes those bytes is in flight ([`Server::in_flight`] is 0, for
    /// example).
    ///
    /// [`Server::in_flight`]: super::Server::in_flight
    pub unsafe fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        // SAFETY: the caller's promise: no slice covers the bytes.
        unsafe { read(self, addr, buf) }
    }

    /// Copies `bytes` into guest RAM at `addr`; `false` (nothing copied)
    /// when they are not all guest RAM.
    ///
    /// # Safety
    /// No chain of the [`Server`](super::Server) owning this memory that
    /// reads or writes those bytes is in flight.
    pub unsafe fn write(&self, addr: u64, bytes: &[u8]) -> bool {
        let Ok(len) = u32::try_from(bytes.len()) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        // SAFETY: the caller's promise: no slice covers the bytes, and
        // this one dies here.
        match unsafe { slice_mut(self, Span { addr, len }) } {
            Some(place) => {
                place.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

// SAFETY: the buffer was lent for `'m` (`new` takes the `&'m mut`), so it
// stays valid and nothing else references it; guest bytes map one-to-one
// to its bytes, and `translate` returns only ranges inside it.
unsafe impl<'m> GuestMemory<'m> for FlatMemory<'m> {
    fn translate(&self, addr: u64, len: u32) -> Option<NonNull<u8>> {
        let offset = addr.checked_sub(self.start)?;
        let end = offset.checked_add(u64::from(len))?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: `offset` <= `end` <= `len`: inside the buffer, or just past
        // its end for an empty range (`len` is a `usize`).
        Some(unsafe { self.base.add(offset as usize) })
    }
}

/// The host bytes of `span`, if translated and addressable as one slice.
fn host<'b, M: GuestMemory<'b>>(memory: &M, span: Span) -> Option<(NonNull<u8>, usize)> {
    let len = usize::try_from(span.len)
        .ok()
        .filter(|&l| l <= isize::MAX as usize)?;
    Some((memory.translate(span.addr, span.len)?, len))
}

/// Borrows the guest bytes of `span` for writing; `None` outside guest
/// RAM.
///
/// # Safety
/// No other live slice made from `memory` (by this or [`slice`]) overlaps
/// `span`, nor will one be made while this one lives.
pub(super) unsafe fn slice_mut<'b, M: GuestMemory<'b>>(
    memory: &M,
    span: Span,
) -> Option<&'b mut [u8]> {
    let (ptr, len) = host(memory, span)?;
    // SAFETY: `GuestMemory` promises `ptr` valid for reads and writes of
    // `len` bytes for `'b` and referenced by nothing but slices of this
    // module; the caller promises none of those overlaps it.
    Some(unsafe { core::slice::from_raw_parts_mut(ptr.as_ptr(), len) })
}

/// Borrows the guest bytes of `span` for reading; `None` outside guest
/// RAM.
///
/// # Safety
/// No live slice made from `memory` by [`slice_mut`] overlaps `span`,
/// nor will one be made while this one lives.
pub(super) unsafe fn slice<'b, M: GuestMemory<'b>>(memory: &M, span: Span) -> Option<&'b [u8]> {
    let (ptr, len) = host(memory, span)?;
    // SAFETY: as `slice_mut`; the caller promises no writable slice
    // overlaps it, so shared slices may.
    Some(unsafe { core::slice::from_raw_parts(ptr.as_ptr(), len) })
}

/// Copies `buf.len()` guest bytes at `addr` into `buf`, each read once
/// (volatile); `false` outside guest RAM.
///
/// # Safety
/// As [`slice`] for the bytes read, while the copy runs.
pub(super) unsafe fn read<'b, M: GuestMemory<'b>>(memory: &M, addr: u64, buf: &mut [u8]) -> bool {
    let Ok(len) = u32::try_from(buf.len()) else {
        return false;
    };
    let Some((ptr, _)) = host(memory, Span { addr, len }) else {
        return false;
    };
    for (i, byte) in buf.iter_mut().enumerate() {
        // SAFETY: `i` < `len`, so the byte is inside what `translate`
        // returned, valid for reads (`GuestMemory`); the caller promises
        // no `&mut` slice covers it.
        *byte = unsafe { ptr.as_ptr().add(i).read_volatile() };
    }
    true
}

/// Borrows a request's data segments; `None` when one lies outside guest
/// RAM.
///
/// # Safety
/// The spans are disjoint, and no live slice overlaps them while the
/// returned ones live.
pub(super) unsafe fn slices_mut<'b, M: GuestMemory<'b>, const S: usize>(
    memory: &M,
    spans: &[Span],
) -> Option<Vec<&'b mut [u8], S>> {
    let mut out = Vec::new();
    for &span in spans {
        // SAFETY: the caller's promise, span by span.
        out.push(unsafe { slice_mut(memory, span) }?).ok()?;
    }
    Some(out)
}

/// Borrows a request's data segments for reading; `None` when one lies
/// outside guest RAM.
///
/// # Safety
/// No live writable slice overlaps the spans while the returned ones live.
pub(super) unsafe fn slices<'b, M: GuestMemory<'b>, const S: usize>(
    memory: &M,
    spans: &[Span],
) -> Option<Vec<&'b [u8], S>> {
    let mut out = Vec::new();
    for &span in spans {
        // SAFETY: the caller's promise, span by span.
        out.push(unsafe { slice(memory, span) }?).ok()?;
    }
    Some(out)
}
