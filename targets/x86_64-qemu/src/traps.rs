//! CPU exceptions: an IDT for vectors 0-31 whose handlers print what
//! happened (vector, name, error code, RIP, CR2) on the serial console and
//! end the run as a failure, instead of a silent triple fault.
//!
//! Interrupts stay disabled, so only exceptions arrive. Each vector has a
//! small entry stub (below, in assembly) that pushes a zero where the CPU
//! pushes no error code, then the vector number, and jumps to a common stub
//! that calls [`trap`] with a pointer to the frame. A fault inside the
//! handler itself still ends in a triple fault (QEMU exit status 0, which
//! the host never counts as success).

use core::arch::{asm, global_asm};

/// Vectors that get a handler: the CPU's exceptions.
const VECTORS: usize = 32;
/// The 64-bit code segment selector of the boot GDT.
const KERNEL_CODE: u16 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8e;

/// One IDT entry (a 64-bit gate descriptor).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

impl Gate {
    fn to(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist: 0,
            attributes: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The IDT, filled once by [`init`].
#[repr(C, align(16))]
struct Idt([Gate; VECTORS]);

static IDT: spin::Once<Idt> = spin::Once::new();

/// What the entry stubs leave on the stack: vector, error code (or 0), then
/// the frame the CPU pushed.
#[repr(C)]
struct Frame {
    vector: u64,
    error_code: u64,
    rip: u64,
    _cs: u64,
    rflags: u64,
    rsp: u64,
    _ss: u64,
}

global_asm!(
    ".macro trap_entry vector, error_code",
    ".global trap_entry_\\vector",
    "trap_entry_\\vector:",
    ".if \\error_code == 0",
    "push 0",
    ".endif",
    "push \\vector",
    "jmp trap_common",
    ".endm",
    "trap_entry 0, 0",
    "trap_entry 1, 0",
    "trap_entry 2, 0",
    "trap_entry 3, 0",
    "trap_entry 4, 0",
    "trap_entry 5, 0",
    "trap_entry 6, 0",
    "trap_entry 7, 0",
    "trap_entry 8, 1",
    "trap_entry 9, 0",
    "trap_entry 10, 1",
    "trap_entry 11, 1",
    "trap_entry 12, 1",
    "trap_entry 13, 1",
    "trap_entry 14, 1",
    "trap_entry 15, 0",
    "trap_entry 16, 0",
    "trap_entry 17, 1",
    "trap_entry 18, 0",
    "trap_entry 19, 0",
    "trap_entry 20, 0",
    "trap_entry 21, 1",
    "trap_entry 22, 0",
    "trap_entry 23, 0",
    "trap_entry 24, 0",
    "trap_entry 25, 0",
    "trap_entry 26, 0",
    "trap_entry 27, 0",
    "trap_entry 28, 0",
    "trap_entry 29, 1",
    "trap_entry 30, 1",
    "trap_entry 31, 0",
    // The table of entry points, read by `init`.
    ".section .rodata.trap_entries, \"a\"",
    ".balign 8",
    ".global trap_entries",
    "trap_entries:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".quad trap_entry_\\vector",
    ".endr",
    ".text",
    "trap_common:",
    "mov rdi, rsp",
    // Seven words were pushed after the CPU aligned the stack: realign it.
    "sub rsp, 8",
    "call {trap}",
    "ud2",
    trap = sym trap,
);

/// Loads the IDT. Called once, early in `kmain`.
pub fn init() {
    unsafe extern "C" {
        static trap_entries: [u64; VECTORS];
    }
    let idt = IDT.call_once(|| {
        // SAFETY: `trap_entries` is the table of 32 entry addresses the
        // assembly above emits in `.rodata`; it is never written.
        let entries = unsafe { &trap_entries };
        Idt(entries.map(Gate::to))
    });
    let pointer = DescriptorPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as *const Idt as u64,
    };
    // SAFETY: the pointer describes the IDT above, which lives in a static
    // for the kernel's whole life; every gate points at an entry stub.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Loads an empty IDT, so that the next exception triple-faults (the boot
/// tests check that a triple fault never counts as success).
pub fn remove() {
    let pointer = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: an empty IDT makes any exception a triple fault, which ends
    // the run; nothing else reads the IDT (interrupts are disabled).
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// The operand of `lidt`.
#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// The exception's mnemonic and name.
fn name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range exceeded",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack-segment fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating-point error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating-point error",
        20 => "#VE virtualization exception",
        21 => "#CP control protection",
        _ => "reserved",
    }
}

/// Where every entry stub ends: report and fail.
extern "C" fn trap(frame: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 (the last page-fault address) has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    kprintln!(
        "\nCPU exception {} ({}) at rip {:#x}, error code {:#x}, rsp {:#x}, rflags {:#x}, \
         cr2 {:#x}",
        frame.vector,
        name(frame.vector),
        frame.rip,
        frame.error_code,
        frame.rsp,
        frame.rflags,
        cr2
    );
    crate::exit::exit(false)
}
