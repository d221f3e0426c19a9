//! Runs the kernel command line as a script through the library's one
//! command interpreter (`blockgraph::cmd`), on the kernel's disks.
//!
//! Only the environment differs from the host CLI: images are virtio disks
//! named by serial ([`SerialResolver`]), and a command's output image (for
//! `convert`, `snapshot`, `create`) is an attached disk, zeroed as far as
//! the output reaches.

use blockgraph::cmd::{self, Environment};
use core::fmt;

use blockgraph::{Device, Error, ErrorKind, Format, Result, SharedGraph};

use crate::disk::{self, SerialResolver, VirtioDisk, MAX_DISKS};
use crate::serial::Serial;
use crate::stack;

/// Data moved per step by commands and jobs.
const SCRATCH_BYTES: usize = 1 << 20;

/// The interpreter's working memory (in `.bss`).
static SCRATCH: spin::Mutex<[u8; SCRATCH_BYTES]> = spin::Mutex::new([0; SCRATCH_BYTES]);

/// Memory for the buffers of requests in flight (`bench -d`), as large as
/// the scratch memory, page-aligned, in `.bss`.
#[repr(C, align(4096))]
struct QueueMemory([u8; SCRATCH_BYTES]);

/// Lent whole to one command at a time ([`Environment::queue_memory`]).
static mut QUEUE_MEMORY: QueueMemory = QueueMemory([0; SCRATCH_BYTES]);

struct Kernel {
    resolver: SerialResolver,
    /// Formats given by `image-format`, by disk index.
    formats: [Option<Format>; MAX_DISKS],
    /// Stack depth at the script's entry ([`stack::paint`]).
    stack_entry: usize,
    /// The most stack a command used below `stack_entry`.
    stack_peak: usize,
}

impl Environment for Kernel {
    type Device = VirtioDisk;
    type Resolver = SerialResolver;

    fn resolver(&mut self) -> &mut SerialResolver {
        &mut self.resolver
    }

    fn now_micros(&mut self) -> Option<u64> {
        crate::clock::now_micros()
    }

    fn warn(&mut self, message: fmt::Arguments<'_>) {
        kprintln!("{message}");
    }

    fn command_finished(&mut self) {
        let used = stack::deepest().saturating_sub(self.stack_entry);
        kprintln!("stack: {used} bytes");
        self.stack_peak = self.stack_peak.max(used);
        stack::paint();
    }

    fn pinned_format(&mut self, name: &str) -> Option<Format> {
        disk::find(name).and_then(|d| self.formats[d.index])
    }

    fn pin_format(&mut self, name: &str, format: Format) -> Result<()> {
        let disk =
            disk::find(name).ok_or(Error::new(ErrorKind::NotFound, "no disk with that serial"))?;
        self.formats[disk.index] = Some(format);
        Ok(())
    }

    fn queue_memory(&mut self, len: usize) -> Option<&'static mut [u8]> {
        // SAFETY: the interpreter uses this memory for one command and
        // drops every piece of it before the command returns (its engine
        // drained: no device holds a piece); commands run one at a time on
        // the one kernel thread, so no other reference to it is alive.
        let memory = unsafe { &mut (*core::ptr::addr_of_mut!(QUEUE_MEMORY)).0 };
        memory.get_mut(..len)
    }

    fn create(&mut self, name: &str, size: u64) -> Result<VirtioDisk> {
        let mut disk = VirtioDisk::by_serial(name, true)?;
        if size > disk.size() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the output disk is too small",
            ));
        }
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0;
        while done < size {
            let n = (size - done).min(ZEROS.len() as u64) as usize;
            disk.write_at(done, &ZEROS[..n])?;
            done += n as u64;
        }
        Ok(disk)
    }
}

/// Runs `script` (commands separated by `;`) on `graph`, printing to the
/// serial console, then the most requests each disk had in flight at
/// once. Returns whether every command succeeded and no disk was left with
/// requests in flight (an engine that was not drained).
pub fn run(graph: &SharedGraph<VirtioDisk>, script: &str) -> bool {
    let mut env = Kernel {
        resolver: SerialResolver,
        formats: [None; MAX_DISKS],
        stack_entry: stack::paint(),
        stack_peak: 0,
    };
    let mut graph = graph.lock();
    let mut scratch = SCRATCH.lock();
    let mut out = Serial;
    let ok = match cmd::run_script(&mut env, &mut graph, script, &mut scratch[..], &mut out) {
        Ok(count) => {
            kprintln!("script: {count} commands succeeded");
            true
        }
        Err((index, failure)) => {
            kprintln!("error: command {}: {failure}", index + 1);
            false
        }
    };
    for info in disk::disks() {
        kprintln!(
            "disk {} ({}): at most {} requests in flight",
            info.index,
            info.serial.as_str(),
            disk::peak_in_flight(info.index)
        );
    }
    // The interpreter's own frames count too (an engine for `-d` lives on
    // its stack): `stack-check` measures the library's paths alone.
    kprintln!("stack: at most {} bytes per command", env.stack_peak);
    if disk::any_busy() {
        kprintln!("error: requests still in flight after the script (an engine was not drained)");
        return false;
    }
    ok
}
