//! A microsecond clock: the time-stamp counter, calibrated once against the
//! legacy PIT (channel 2 counting down 10 ms, its output read through port
//! 0x61). Machines without a PIT (its output already high before counting)
//! have no clock, and `bench` reports that.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::port::{inb, outb};

/// TSC ticks per microsecond; 0 = not calibrated yet, `u64::MAX` = no clock.
static TICKS_PER_MICRO: AtomicU64 = AtomicU64::new(0);

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// The calibration interval in PIT ticks (about 10 ms).
const PIT_COUNT: u16 = 11_932;
/// Port of the PIT channel 2 gate (bit 0) and output (bit 5).
const GATE_PORT: u16 = 0x61;
/// Polls of the PIT output before calibration gives up.
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

/// TSC ticks per microsecond, measured over [`PIT_COUNT`] PIT ticks.
fn calibrate() -> Option<u64> {
    // SAFETY: ports 0x61, 0x43 and 0x42 are the PC speaker gate and PIT
    // channel 2, which nothing else in this kernel uses; the speaker output
    // stays off (bit 1 cleared).
    let already_high = unsafe {
        outb(GATE_PORT, (inb(GATE_PORT) & !0x02) | 0x01);
        // Channel 2, low byte then high byte, mode 0 (interrupt on terminal
        // count: the output goes low now and high when the count runs out).
        outb(0x43, 0b1011_0000);
        outb(0x42, PIT_COUNT as u8);
        outb(0x42, (PIT_COUNT >> 8) as u8);
        inb(GATE_PORT) & 0x20 != 0
    };
    if already_high {
        return None;
    }
    let start = rdtsc();
    let mut polls = 0;
    // SAFETY: as above; reading the gate port has no side effect.
    while unsafe { inb(GATE_PORT) } & 0x20 == 0 {
        polls += 1;
        if polls > MAX_POLLS {
            return None;
        }
    }
    let ticks = rdtsc().wrapping_sub(start);
    let micros = u64::from(PIT_COUNT) * 1_000_000 / PIT_HZ;
    Some((ticks / micros).max(1))
}

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter (available on every
    // x86_64 CPU) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
