//! Finding virtio-blk disks: virtio-mmio on QEMU's `microvm`, virtio-pci on
//! `q35` (or any machine with a PCI host bridge).
//!
//! [`probe`] looks for virtio-mmio transports first; a machine that has them
//! is taken to be a microvm and PCI is not touched. Otherwise bus 0 of PCI
//! is scanned. Every block device found is handed to
//! [`disk::attach`](crate::disk::attach), in the order of QEMU's `-device`
//! options, so `disk N` is the Nth disk given to `cargo xtask qemu`.
//!
//! The block driver itself: [`blk`] (the virtio-blk protocol over a ring
//! sized to the device, `ring`) and [`requests`] (the requests in flight on
//! one disk, for the request engine).

pub mod blk;
pub mod hal;
mod mmio;
mod pci;
pub mod requests;
mod ring;

use core::fmt;

use virtio_drivers::transport::SomeTransport;

use crate::disk;

/// How the disks were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// virtio-mmio transports (QEMU `microvm`).
    Mmio,
    /// virtio-pci on PCI bus 0 (QEMU `q35`).
    Pci,
    /// Neither virtio-mmio nor a PCI host bridge.
    Unknown,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Mmio => "virtio-mmio",
            Machine::Pci => "virtio-pci",
            Machine::Unknown => "none found",
        })
    }
}

/// Finds every virtio-blk device and attaches it as a disk; problems with
/// single devices are printed as warnings and the device is skipped.
pub fn probe() -> Machine {
    if mmio::present() {
        mmio::probe(&mut attach);
        Machine::Mmio
    } else if pci::present() {
        pci::probe(&mut attach);
        Machine::Pci
    } else {
        Machine::Unknown
    }
}

/// Where a device was found, for messages.
#[derive(Clone, Copy, Debug)]
pub enum Location {
    /// A virtio-mmio slot and its physical address.
    Mmio(usize, u64),
    /// A PCI function, `bus:device.function`.
    Pci(virtio_drivers::transport::pci::bus::DeviceFunction),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Mmio(slot, addr) => write!(f, "virtio-mmio slot {slot} at {addr:#x}"),
            Location::Pci(df) => write!(f, "PCI {df}"),
        }
    }
}

fn attach(at: Location, transport: SomeTransport<'static>) {
    if let Err(err) = disk::attach(transport) {
        kprintln!("warning: {at}: skipped: {err}");
    }
}
