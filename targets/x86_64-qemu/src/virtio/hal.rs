//! The virtio-drivers `Hal`: DMA pages from a static pool, identity mapping.
//!
//! The kernel identity-maps the first 4 GiB and lives in it, so a physical
//! address is the virtual address: `share` hands the device the buffer's own
//! address (caller buffers on the stack or in statics are DMA'd in place)
//! and MMIO regions are used where they are.
//!
//! DMA pages (the virtqueues) come from [`DMA_PAGES`] static pages, zero
//! from `.bss`, by bump allocation: a page is handed out once and never
//! again, so every page handed out is zeroed, as the trait requires. A disk
//! keeps its queue for the whole boot, so nothing is ever really freed; a
//! device that fails half-way through its setup costs its pages.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Pages in the DMA pool: a virtio-blk ring of 128 descriptors takes 2
/// (legacy or modern layout), so 8 disks need 16.
pub const DMA_PAGES: usize = 64;

#[repr(C, align(4096))]
struct Pool(UnsafeCell<[u8; DMA_PAGES * PAGE_SIZE]>);

// SAFETY: the pool's bytes are only reached through pointers handed out by
// `dma_alloc`, each range exactly once (the atomic bump below), and from then
// on belong to the one driver (and device) that received them.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([0; DMA_PAGES * PAGE_SIZE]));
/// The first page of the pool not handed out yet.
static NEXT_PAGE: AtomicUsize = AtomicUsize::new(0);

/// Pages of the DMA pool handed out so far.
pub fn dma_pages_used() -> usize {
    NEXT_PAGE.load(Ordering::Relaxed)
}

/// The kernel's `Hal` for virtio-drivers.
pub struct KernelHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, identity-mapped pages that
// nothing else uses (or paddr 0 for failure, which virtio-drivers checks);
// `share` returns the physical address of the buffer itself, valid for the
// device because all memory is identity-mapped and DMA is coherent on x86.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let taken = NEXT_PAGE.fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            next.checked_add(pages)
                .filter(|&end| pages != 0 && end <= DMA_PAGES)
        });
        let Ok(first) = taken else {
            return (0, NonNull::dangling()); // paddr 0: virtio-drivers' DmaError
        };
        let base = POOL.0.get().cast::<u8>();
        // `first + pages <= DMA_PAGES`, so the offset stays inside the pool.
        let vaddr = base.wrapping_add(first * PAGE_SIZE);
        match NonNull::new(vaddr) {
            Some(vaddr) => (vaddr.as_ptr() as PhysAddr, vaddr),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Bump allocation: pages are never reused (see the module docs).
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("virtio MMIO region at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // The device worked on the buffer in place: nothing to copy back.
    }
}
