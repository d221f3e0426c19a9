//! Guest memory: the [`GuestMemory`] trait a VMM implements, and the only
//! code of the crate that turns guest addresses into slices.
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
/// corruption, as on real hardware.
pub unsafe trait GuestMemory<'b> {
    /// The host address of guest bytes `addr..addr + len` (`len` > 0), or
    /// `None` when any of them lies outside guest RAM or the range is not
    /// contiguous in host memory.
    fn translate(&self, addr: u64, len: u32) -> Option<NonNull<u8>>;
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
