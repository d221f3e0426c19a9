//! A microsecond clock: the time-stamp counter, calibrated once against the
//! legacy PIT. Channel 0 counts down from 65536 (mode 0: its output, IRQ
//! 0, rises once, at the first wrap) and its count is
//! read back with the latch command, so only ports 0x40 and 0x43 are
//! needed: q35 and microvm both have them (microvm has no port 0x61, the
//! speaker gate of channel 2). A machine without a PIT (a count that never
//! moves) has no clock, and `bench` reports that.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::port::{inb, outb};

/// TSC ticks per microsecond; 0 = not calibrated yet, `u64::MAX` = no clock.
static TICKS_PER_MICRO: AtomicU64 = AtomicU64::new(0);

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// The calibration interval in PIT ticks (about 10 ms).
const PIT_TICKS: u64 = 11_932;
/// PIT channel 0 data port.
const CHANNEL0: u16 = 0x40;
/// PIT mode/command port.
const COMMAND: u16 = 0x43;
/// Channel 0, low then high byte, mode 0 (interrupt on terminal count),
/// binary.
const CHANNEL0_MODE0: u8 = 0b0011_0000;
/// Channel 0, latch the count.
const CHANNEL0_LATCH: u8 = 0b0000_0000;
/// Reads of the PIT before calibration gives up on a count that does not
/// move.
const MAX_POLLS: u64 = 20_000_000;

/// Microseconds since an arbitrary point, or `None` without a usable clock.
pub fn now_micros() -> Option<u64> {
    let rate = match TICKS_PER_MICRO.load(Ordering::Relaxed) {
        0 => {
            let rate = calibrate().unwrap_or(u64::MAX);
            TICKS_PER_MICRO.store(rate, Ordering::Relaxed);
            rate
        }
        rate => rate,
    };
    (rate != u64::MAX).then(|| rdtsc() / rate)
}

/// TSC ticks per microsecond, measured over [`PIT_TICKS`] PIT ticks.
fn calibrate() -> Option<u64> {
    // SAFETY: ports 0x43 and 0x40 are the PIT's command port and channel 0,
    // which nothing else in this kernel uses; interrupts are off, so its
    // IRQ 0 goes nowhere. A count of 0 counts from 65536, and on.
    unsafe {
        outb(COMMAND, CHANNEL0_MODE0);
        outb(CHANNEL0, 0);
        outb(CHANNEL0, 0);
    }
    let mut last = pit_count();
    let start = rdtsc();
    let mut elapsed = 0u64;
    let mut polls = 0;
    while elapsed < PIT_TICKS {
        let now = pit_count();
        // The count goes down and wraps at 65536; polls are far apart less
        // than a wrap (55 ms).
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
        polls += 1;
        if polls > MAX_POLLS {
            return None;
        }
    }
    let ticks = rdtsc().wrapping_sub(start);
    let micros = elapsed * 1_000_000 / PIT_HZ;
    Some((ticks / micros).max(1))
}

/// Channel 0's current count.
fn pit_count() -> u16 {
    // SAFETY: the latch command freezes channel 0's count for the two reads
    // that follow (low byte, high byte); nothing else touches the PIT.
    unsafe {
        outb(COMMAND, CHANNEL0_LATCH);
        let low = inb(CHANNEL0);
        let high = inb(CHANNEL0);
        u16::from_le_bytes([low, high])
    }
}

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter (available on every
    // x86_64 CPU) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
