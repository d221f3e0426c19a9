//! blockgraph as an x86_64 kernel, booted by QEMU (`cargo xtask qemu`).
//!
//! Built for `--target x86_64-unknown-none` this is a `no_std`, `no_main`
//! kernel without a heap. On the host it is an empty program, so that
//! workspace-wide builds, clippy and tests work; the pure modules
//! ([`sectors`], [`start_info`]) are unit-tested there.
//!
//! Layers, bottom up (one module each):
//!
//! ```text
//!  boot        PVH ELF note, 32-bit entry -> long mode, .bss, stack (asm)
//!  start_info  the hvm_start_info QEMU hands over: command line, memory map
//!  port        x86 port I/O
//!  serial      COM1 console (core::fmt::Write), kprint!/kprintln!
//!  exit        leave QEMU through isa-debug-exit with a pass/fail status
//!  virtio      DMA pages (Hal), transports (virtio-mmio on microvm,
//!              virtio-pci on q35), the virtio-blk driver (a ring sized
//!              to the device) and its requests in flight
//!  disk        VirtioDisk: blockgraph::Device over a virtio-blk disk,
//!              byte-granular through `sectors` (read-modify-write), and
//!              blockgraph::device::Queue for the request engine
//!  stack       the boot stack's high-water mark (painting)
//!  script      the command line run through blockgraph's interpreter,
//!              measuring the stack each command uses
//!  selftest    the built-in check run for the command line `selftest`
//!  stack_check the built-in `stack-check`: the stack each of the
//!              library's request paths and job steps takes
//! ```
//!
//! `kmain` is called once by the boot code with the physical address of
//! `hvm_start_info`: it reads the boot information, finds the disks, prints
//! them and runs the command line.
//!
//! Exit status seen by the host (isa-debug-exit at port 0xf4, QEMU exits
//! with `(value << 1) | 1`): success writes 0x10 -> **33**, failure writes
//! 0x11 -> **35**. Any other status (0 after a triple fault with
//! `-no-reboot`, 1 for a QEMU error) is a failure too.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

// First: the kprint!/kprintln! macros are used by the modules below.
#[cfg(target_os = "none")]
#[macro_use]
mod serial;

#[cfg(any(test, target_os = "none"))]
mod sectors;
#[cfg(any(test, target_os = "none"))]
mod start_info;

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod clock;
#[cfg(target_os = "none")]
mod disk;
#[cfg(target_os = "none")]
mod exit;
#[cfg(target_os = "none")]
mod port;
#[cfg(target_os = "none")]
mod script;
#[cfg(target_os = "none")]
mod selftest;
#[cfg(target_os = "none")]
mod stack;
#[cfg(target_os = "none")]
mod stack_check;
#[cfg(target_os = "none")]
mod traps;
#[cfg(target_os = "none")]
mod virtio;

#[cfg(target_os = "none")]
mod kernel {
    //! `kmain` and the panic handler.

    use blockgraph::{Graph, SharedGraph};

    use crate::disk::{self, VirtioDisk};
    use crate::{boot, exit, script, selftest, stack_check, traps, virtio};

    /// The one graph of the kernel (about 730 KiB, in `.bss`/`.data`, never
    /// on the stack). The command interpreter runs on it.
    pub static GRAPH: SharedGraph<VirtioDisk> = spin::Mutex::new(Graph::new());

    /// Entered from the boot code in long mode, with the stack set up and
    /// `.bss` zeroed. `start_info` is the physical address QEMU passed in EBX.
    #[unsafe(no_mangle)]
    extern "C" fn kmain(start_info: u64) -> ! {
        crate::serial::init();
        traps::init();
        kprintln!("blockgraph kernel");
        let info = boot::init(start_info);
        kprintln!("boot: PVH, hvm_start_info version {}", info.version());
        let ram: u64 = info.ram_ranges().map(|(_, size)| size).sum();
        kprintln!(
            "memory: {} MiB RAM in {} ranges ({} map entries)",
            ram >> 20,
            info.ram_ranges().count(),
            info.memmap().len()
        );
        kprintln!("command line: {:?}", boot::cmdline());

        let machine = virtio::probe();
        kprintln!(
            "virtio: {machine}, {} disks, {} DMA pages used",
            disk::count(),
            virtio::hal::dma_pages_used()
        );
        for info in disk::disks() {
            kprintln!(
                "disk {}: serial={} size={} ro={}",
                info.index,
                info.serial.as_str(),
                info.size,
                info.read_only
            );
        }
        let graph_bytes = core::mem::size_of_val(&GRAPH);
        let in_bss = boot::in_bss((&raw const GRAPH) as usize, graph_bytes);
        kprintln!(
            "graph: {} nodes in use, {graph_bytes} bytes in {}",
            GRAPH.lock().node_count(),
            if in_bss { ".bss" } else { ".data" }
        );

        // The command line is a script for the shared interpreter; a few
        // built-in words check the kernel itself and the host's checks.
        let ok = match boot::cmdline().trim() {
            "" => true,
            "selftest" => selftest::run(&GRAPH),
            "stack-check" => stack_check::run(&GRAPH),
            "fail-on-purpose" => panic!("failing on purpose, as the command line asked"),
            "fault-on-purpose" => exit::invalid_opcode(),
            "triple-fault-on-purpose" => {
                traps::remove();
                exit::invalid_opcode()
            }
            script => script::run(&GRAPH, script),
        };
        exit::exit(ok)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        kprintln!("\nkernel panicked: {info}");
        exit::exit(false)
    }
}

#[cfg(not(target_os = "none"))]
fn main() {}
