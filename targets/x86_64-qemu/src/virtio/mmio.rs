//! virtio-mmio transports of QEMU's `microvm`.
//!
//! microvm places its transports at 0xfeb0_0000 + n * 0x200 (24 slots, or 8
//! without the second IOAPIC) and fills them from the highest slot down: the
//! first `-device` is in the highest slot. A slot without a device still
//! answers with the magic value but device id 0. Slots are scanned from the
//! top, so disks come out in command-line order.

use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};

use super::Location;

const BASE: u64 = 0xfeb0_0000;
const SLOT_SIZE: usize = 0x200;
const SLOTS: usize = 24;
/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
const OFF_MAGIC: u64 = 0x000;
const OFF_DEVICE_ID: u64 = 0x008;
/// virtio device id of a block device.
const DEVICE_ID_BLOCK: u32 = 2;

fn read_reg(slot: usize, offset: u64) -> u32 {
    let addr = BASE + (slot * SLOT_SIZE) as u64 + offset;
    // SAFETY: the microvm virtio-mmio window is identity-mapped (uncached)
    // device memory; these registers are read-only and reading has no side
    // effects. Elsewhere the window is unassigned and reads as 0 or ~0.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Whether the machine has virtio-mmio transports.
pub fn present() -> bool {
    (0..SLOTS).any(|slot| read_reg(slot, OFF_MAGIC) == MAGIC)
}

/// Attaches every virtio-mmio block device, highest slot first.
pub fn probe(attach: &mut impl FnMut(Location, SomeTransport<'static>)) {
    for slot in (0..SLOTS).rev() {
        if read_reg(slot, OFF_MAGIC) != MAGIC || read_reg(slot, OFF_DEVICE_ID) != DEVICE_ID_BLOCK {
            continue;
        }
        let addr = BASE + (slot * SLOT_SIZE) as u64;
        let at = Location::Mmio(slot, addr);
        let Some(header) = NonNull::new(addr as *mut VirtIOHeader) else {
            continue;
        };
        // SAFETY: `header` is the start of a virtio-mmio register block of
        // SLOT_SIZE bytes (magic checked above), identity-mapped device
        // memory that stays valid forever and is handed to one transport only.
        match unsafe { MmioTransport::new(header, SLOT_SIZE) } {
            Ok(transport) if transport.device_type() == DeviceType::Block => {
                attach(at, transport.into())
            }
            Ok(_) => {}
            Err(err) => kprintln!("warning: {at}: skipped: {err}"),
        }
    }
}
