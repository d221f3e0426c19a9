//! virtio-pci on QEMU's `q35`: ECAM, BAR assignment, transports.
//!
//! Configuration space is reached through ECAM at 0xB000_0000 (256 MiB,
//! buses 0-255), where q35's firmware puts it. Firmware that leaves ECAM off
//! is handled too: the Q35 host bridge's PCIEXBAR register is then
//! programmed through the legacy 0xCF8/0xCFC mechanism.
//!
//! With qboot as the firmware, BARs of PCI devices are left unassigned; the
//! kernel assigns every memory BAR of each virtio-blk function that has none
//! (or one above 4 GiB, outside the identity map) from a window between
//! 0xC000_0000 and 0xFE00_0000, naturally aligned, then enables memory
//! decoding and bus mastering. Only bus 0 is scanned: `-device
//! virtio-blk-pci` without `bus=` lands there, in command-line order.

use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, DeviceFunction, MemoryBarType, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::hal::KernelHal;
use super::Location;
use crate::port::{inl, outl};

/// q35's ECAM window.
const ECAM_BASE: u64 = 0xb000_0000;
/// Where the kernel places BARs: above ECAM, below the IOAPIC/HPET/LAPIC.
const BAR_WINDOW: (u64, u64) = (0xc000_0000, 0xfe00_0000);
/// Most virtio-blk functions looked at.
const MAX_FUNCTIONS: usize = 16;

/// The Q35 memory controller hub (host bridge 00:00.0): 8086:29c0.
const Q35_MCH: u32 = 0x29c0_8086;
/// The MCH's PCIEXBAR register (64-bit): ECAM base, size, enable.
const MCH_PCIEXBAR: u8 = 0x60;
/// PCIEXBAR: enable, 256 MiB (length bits 2:1 = 0).
const PCIEXBAR_ENABLE: u32 = 1;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Reads a configuration word of bus 0 through the legacy I/O mechanism.
fn legacy_read(device: u8, function: u8, offset: u8) -> u32 {
    let address = 0x8000_0000
        | (u32::from(device) << 11)
        | (u32::from(function) << 8)
        | u32::from(offset & 0xfc);
    // SAFETY: 0xCF8/0xCFC are the PCI configuration mechanism #1 ports; a
    // read of configuration space has no side effects.
    unsafe {
        outl(CONFIG_ADDRESS, address);
        inl(CONFIG_DATA)
    }
}

fn legacy_write(device: u8, function: u8, offset: u8, value: u32) {
    let address = 0x8000_0000
        | (u32::from(device) << 11)
        | (u32::from(function) << 8)
        | u32::from(offset & 0xfc);
    // SAFETY: as `legacy_read`; the only write made is the host bridge's
    // PCIEXBAR, which maps ECAM where the kernel expects it.
    unsafe {
        outl(CONFIG_ADDRESS, address);
        outl(CONFIG_DATA, value);
    }
}

fn ecam_vendor_device(df: DeviceFunction) -> u32 {
    let addr = ECAM_BASE
        + (u64::from(df.bus) << 20)
        + (u64::from(df.device) << 15)
        + (u64::from(df.function) << 12);
    // SAFETY: ECAM_BASE.. is identity-mapped (uncached) device memory; the
    // vendor/device word is read-only and reading it has no side effects.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

const HOST_BRIDGE: DeviceFunction = DeviceFunction {
    bus: 0,
    device: 0,
    function: 0,
};

/// Whether there is a PCI host bridge with ECAM at [`ECAM_BASE`]; turns ECAM
/// on when the host bridge is a Q35 MCH whose firmware left it off.
pub fn present() -> bool {
    let valid = |id: u32| id != 0 && id != 0xffff_ffff;
    if valid(ecam_vendor_device(HOST_BRIDGE)) {
        return true;
    }
    if legacy_read(0, 0, 0) != Q35_MCH {
        return false;
    }
    legacy_write(0, 0, MCH_PCIEXBAR + 4, 0);
    legacy_write(0, 0, MCH_PCIEXBAR, ECAM_BASE as u32 | PCIEXBAR_ENABLE);
    let on = valid(ecam_vendor_device(HOST_BRIDGE));
    if on {
        kprintln!("pci: the firmware left ECAM off; enabled at {ECAM_BASE:#x}");
    }
    on
}

/// A bump allocator over [`BAR_WINDOW`].
struct Window {
    next: u64,
}

impl Window {
    fn take(&mut self, size: u64) -> Option<u64> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let start = self.next.checked_add(size - 1)? & !(size - 1);
        let end = start.checked_add(size)?;
        if end > BAR_WINDOW.1 {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

/// Gives every memory BAR of `df` an address in the identity map.
fn assign_bars(
    root: &mut PciRoot<MmioCam<'static>>,
    df: DeviceFunction,
    window: &mut Window,
) -> Result<(), &'static str> {
    let bars = root.bars(df).map_err(|_| "invalid BAR type")?;
    for (index, bar) in bars.iter().enumerate() {
        let Some(BarInfo::Memory {
            address_type,
            address,
            size,
            ..
        }) = bar
        else {
            continue;
        };
        let mapped = *address != 0 && address.saturating_add(*size) <= 1 << 32;
        if mapped {
            continue;
        }
        let at = window.take(*size).ok_or("no room left for its BARs")?;
        let index = index as u8;
        match address_type {
            MemoryBarType::Width64 => root.set_bar_64(df, index, at),
            MemoryBarType::Width32 => root.set_bar_32(df, index, at as u32),
            MemoryBarType::Below1MiB => return Err("it wants a BAR below 1 MiB"),
        }
    }
    Ok(())
}

/// Attaches every virtio-blk function on bus 0, in slot order.
pub fn probe(attach: &mut impl FnMut(Location, SomeTransport<'static>)) {
    // SAFETY: ECAM_BASE is q35's configuration window (checked by
    // `present`), 256 MiB of identity-mapped device memory, used through
    // this one root only.
    let mut root = PciRoot::new(unsafe { MmioCam::new(ECAM_BASE as *mut u8, Cam::Ecam) });
    let mut found = [None; MAX_FUNCTIONS];
    let mut count = 0;
    for (df, info) in root.enumerate_bus(0) {
        if virtio_device_type(&info) != Some(DeviceType::Block) {
            continue;
        }
        if count == MAX_FUNCTIONS {
            kprintln!("warning: PCI {df}: skipped: more than {MAX_FUNCTIONS} virtio-blk functions");
            continue;
        }
        found[count] = Some(df);
        count += 1;
    }
    let mut window = Window { next: BAR_WINDOW.0 };
    for df in found.into_iter().flatten() {
        let at = Location::Pci(df);
        if let Err(err) = assign_bars(&mut root, df, &mut window) {
            kprintln!("warning: {at}: skipped: {err}");
            continue;
        }
        let (_, command) = root.get_status_command(df);
        root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
        match PciTransport::new::<KernelHal, _>(&mut root, df) {
            Ok(transport) => attach(at, transport.into()),
            Err(err) => kprintln!("warning: {at}: skipped: {err}"),
        }
    }
}
