//! A virtqueue sized to the device: virtio-drivers' `VirtQueue<H, SIZE>`
//! fixes its size at compile time, so [`Ring`] holds one of a few sizes and
//! picks the largest the device offers, up to [`MAX_SIZE`].
//!
//! A virtio-blk request takes three descriptors (header, data, status):
//! without the `alloc` feature virtio-drivers has no indirect descriptors.
//! QEMU 10.0's virtio-blk-pci offers its `queue-size` (256 by default),
//! virtio-mmio always 1024, so a disk gets [`MAX_SIZE`] = 128 (42 requests
//! in flight) unless `queue-size` is set below 128 on PCI.

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{SomeTransport, Transport};
use virtio_drivers::Result;

use super::hal::KernelHal;

/// The largest ring the kernel sets up, in descriptors.
pub const MAX_SIZE: usize = 128;

/// A virtqueue of 128, 64, 32 or 16 descriptors.
// Rings live in the static disk table: the smaller variants' unused room
// costs less than a heap the kernel does not have.
#[allow(clippy::large_enum_variant)]
pub enum Ring {
    /// 128 descriptors.
    Q128(VirtQueue<KernelHal, 128>),
    /// 64 descriptors.
    Q64(VirtQueue<KernelHal, 64>),
    /// 32 descriptors.
    Q32(VirtQueue<KernelHal, 32>),
    /// 16 descriptors.
    Q16(VirtQueue<KernelHal, 16>),
}

/// Runs `$body` with `$q` bound to the ring's queue, whatever its size.
macro_rules! with_queue {
    ($ring:expr, $q:ident => $body:expr) => {
        match $ring {
            Ring::Q128($q) => $body,
            Ring::Q64($q) => $body,
            Ring::Q32($q) => $body,
            Ring::Q16($q) => $body,
        }
    };
}

impl Ring {
    /// Sets up virtqueue `index` of `transport` with the largest size both
    /// the device (its maximum) and the kernel ([`MAX_SIZE`]) allow.
    ///
    /// # Errors
    /// virtio-drivers' (a device offering fewer than 16 descriptors,
    /// no DMA pages left, a queue already in use).
    pub fn new(transport: &mut SomeTransport<'static>, index: u16) -> Result<Self> {
        let max = transport.max_queue_size(index) as usize;
        Ok(match max {
            _ if max >= 128 => Ring::Q128(VirtQueue::new(transport, index, false, false)?),
            _ if max >= 64 => Ring::Q64(VirtQueue::new(transport, index, false, false)?),
            _ if max >= 32 => Ring::Q32(VirtQueue::new(transport, index, false, false)?),
            _ => Ring::Q16(VirtQueue::new(transport, index, false, false)?),
        })
    }

    /// Descriptors in the ring.
    pub fn size(&self) -> usize {
        match self {
            Ring::Q128(_) => 128,
            Ring::Q64(_) => 64,
            Ring::Q32(_) => 32,
            Ring::Q16(_) => 16,
        }
    }

    /// Descriptors not in use.
    pub fn free_descriptors(&self) -> usize {
        with_queue!(self, q => q.available_desc())
    }

    /// Asks the device not to interrupt: the kernel polls, with interrupts
    /// off.
    pub fn quiet(&mut self) {
        with_queue!(self, q => q.set_dev_notify(false))
    }

    /// Makes `inputs` and `outputs` one request of the ring; returns its
    /// token.
    ///
    /// # Safety
    /// As `VirtQueue::add`: the buffers stay valid and untouched until
    /// [`Ring::pop_used`] returns them for this token.
    pub unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> Result<u16> {
        // SAFETY: the caller keeps the buffers as `add` requires.
        with_queue!(self, q => unsafe { q.add(inputs, outputs) })
    }

    /// Whether the device wants to be told about new requests.
    pub fn should_notify(&self) -> bool {
        with_queue!(self, q => q.should_notify())
    }

    /// The token of the next completed request, if any.
    pub fn peek_used(&self) -> Option<u16> {
        with_queue!(self, q => q.peek_used())
    }

    /// Takes completed request `token` (the one [`Ring::peek_used`] named)
    /// out of the ring.
    ///
    /// # Safety
    /// As `VirtQueue::pop_used`: the buffers are those [`Ring::add`] was
    /// given for `token`.
    pub unsafe fn pop_used<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> Result<u32> {
        // SAFETY: the caller passes the buffers `add` was given.
        with_queue!(self, q => unsafe { q.pop_used(token, inputs, outputs) })
    }
}
