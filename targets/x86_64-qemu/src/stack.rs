//! How deep the boot stack has been: a high-water mark by painting.
//!
//! [`paint`] fills the free part of the boot stack (below the caller,
//! above the canary) with a pattern; [`deepest`] later finds the lowest
//! word that no longer holds it. The difference between the two depths is
//! what the code run in between used, at most (a frame that happened to
//! store the pattern itself would hide, which no real frame does). The
//! script runner measures every command this way.

use core::arch::asm;

use crate::boot::STACK_SIZE;

/// Written over the free stack by [`paint`] ("PAINTED!" in memory).
const PAINT: u64 = 0x2144_4554_4e49_4150;

/// Left unpainted just below the stack pointer of [`paint`]'s caller.
const MARGIN: usize = 256;

/// First and one-past-last address of the boot stack, without the canary
/// word at its bottom.
fn bounds() -> (usize, usize) {
    unsafe extern "C" {
        static boot_stack_bottom: u64;
    }
    let bottom = (&raw const boot_stack_bottom) as usize;
    (bottom + 8, bottom + STACK_SIZE)
}

/// The stack pointer of the caller.
#[inline(always)]
fn stack_pointer() -> usize {
    let rsp: usize;
    // SAFETY: reads RSP into a register; touches no memory.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp
}

/// Paints the stack below the caller's frame and returns the depth in use
/// now (bytes from the stack's top).
pub fn paint() -> usize {
    let (low, top) = bounds();
    let rsp = stack_pointer();
    let end = (rsp - MARGIN) & !7;
    // SAFETY: [low, end) lies in the boot stack, below the current frame
    // by MARGIN bytes: no live data is there (the kernel has one thread,
    // interrupts are off and its target has no red zone), and nothing
    // holds a reference into it. `rep stosq` writes exactly those words.
    unsafe {
        asm!(
            "rep stosq",
            inout("rdi") low => _,
            inout("rcx") (end - low) / 8 => _,
            in("rax") PAINT,
            options(nostack, preserves_flags)
        );
    }
    top - rsp
}

/// The deepest the stack has been since the last [`paint`] (bytes from its
/// top), at most: found from the bottom up as the first word that lost the
/// paint.
pub fn deepest() -> usize {
    let (low, top) = bounds();
    let mut at = low;
    while at < top {
        // SAFETY: `at` is an 8-aligned address inside the boot stack
        // (reserved in `.bss`); a volatile read of a word there has no
        // effect on the code that owns it.
        let word = unsafe { core::ptr::read_volatile(at as *const u64) };
        if word != PAINT {
            break;
        }
        at += 8;
    }
    top - at
}
