//! Leaving QEMU with a status the host can check.
//!
//! QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04` makes a write of
//! `v` to port 0xf4 end QEMU with exit status `(v << 1) | 1`. Status 0 can
//! never be produced that way (and a triple fault with `-no-reboot` exits
//! with 0), so the kernel uses two odd statuses:
//!
//! | outcome | written | QEMU exit status |
//! |---|---|---|
//! | success | 0x10 | 33 |
//! | failure | 0x11 | 35 |

use crate::port::outl;

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success; QEMU exits with 33.
pub const SUCCESS: u32 = 0x10;
/// Written on failure; QEMU exits with 35.
pub const FAILURE: u32 = 0x11;

/// Ends the run: QEMU exits with 33 for success, 35 for failure. Without the
/// debug-exit device the CPU halts for good instead.
///
/// A boot stack that overflowed turns success into failure.
pub fn exit(success: bool) -> ! {
    let stack_ok = crate::boot::stack_intact();
    if !stack_ok {
        kprintln!("error: the boot stack overflowed (its canary is gone)");
    }
    let value = if success && stack_ok {
        SUCCESS
    } else {
        FAILURE
    };
    // SAFETY: port 0xf4 is isa-debug-exit (or nothing); the write ends QEMU.
    unsafe { outl(DEBUG_EXIT_PORT, value) };
    halt()
}

/// Raises #UD (`ud2`), for testing: the exception handlers report it and
/// fail the run; with the IDT removed the CPU triple-faults instead and QEMU
/// (`-no-reboot`) exits with status 0, which the host never counts as
/// success either.
pub fn invalid_opcode() -> ! {
    // SAFETY: `ud2` raises #UD on purpose and touches no memory; what
    // follows is the exception's business.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Stops the CPU for good: interrupts off, `hlt` forever.
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU; nothing runs after it.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
