//! The console: COM1, a 16550 UART at I/O port 0x3f8, polled.
//!
//! [`Serial`] is a zero-sized `core::fmt::Write` sink; there is no lock, so
//! the panic handler can always print (one core, no interrupts).

use core::fmt;

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
/// Register offsets from the base port.
const DATA: u16 = 0; // THR/RBR; divisor low with DLAB
const IER: u16 = 1; // interrupt enable; divisor high with DLAB
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
/// LSR: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Programs COM1 for 115200 baud, 8N1, FIFOs on, no interrupts.
pub fn init() {
    // SAFETY: COM1's registers; this is the standard 16550 setup and nothing
    // else in the kernel drives the UART.
    unsafe {
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, 0x80); // DLAB: the next two registers are the divisor
        outb(COM1 + DATA, 0x01); // 115200 / 1
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, 0x03); // 8 data bits, no parity, 1 stop bit
        outb(COM1 + FCR, 0xc7); // FIFOs on and cleared
        outb(COM1 + MCR, 0x03); // DTR, RTS
    }
}

/// Writes one byte, waiting for room in the transmitter.
fn put(byte: u8) {
    // SAFETY: reading LSR and writing THR of COM1 only transmit the byte.
    unsafe {
        while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1 + DATA, byte);
    }
}

/// The COM1 console as a `core::fmt::Write` sink (`\n` becomes `\r\n`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                put(b'\r');
            }
            put(byte);
        }
        Ok(())
    }
}

/// Prints to the serial console.
macro_rules! kprint {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to the serial console.
macro_rules! kprintln {
    () => { kprint!("\n") };
    ($($arg:tt)*) => {{
        kprint!($($arg)*);
        kprint!("\n");
    }};
}
