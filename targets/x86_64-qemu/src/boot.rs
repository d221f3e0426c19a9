//! From QEMU's PVH entry to `kmain`, and the boot information.
//!
//! QEMU's `-kernel` loads this ELF and, finding the Xen PVH note (type 18,
//! `XEN_ELFNOTE_PHYS32_ENTRY`), starts it at `pvh_start` in 32-bit protected
//! mode with paging off, flat segments and EBX = the physical address of
//! `hvm_start_info`. The code below:
//!
//! 1. zeroes `.bss` (page tables, stack and every zero-initialised static)
//!    and puts a canary at the bottom of the stack;
//! 2. identity-maps the first 4 GiB with 2 MiB pages (PML4 -> one PDPT ->
//!    four page directories); 0xB000_0000 and up (PCI ECAM, BARs,
//!    virtio-mmio, the APICs) is mapped uncached;
//! 3. enables PAE, EFER.LME and paging, loads a GDT with a 64-bit code
//!    segment and far-jumps to 64-bit code;
//! 4. loads the data segments and the 1 MiB boot stack and calls
//!    `kmain(start_info_paddr)`.
//!
//! Interrupts stay disabled for the kernel's whole life; `kmain` loads an
//! IDT for the CPU exceptions first thing (`traps.rs`), so an exception is
//! reported and fails the run.

use core::arch::global_asm;

use spin::Once;

use crate::start_info::BootInfo;

/// Size of the boot stack (the library keeps its big tables in statics, but
/// commands use sizeable stack frames).
pub const STACK_SIZE: usize = 1024 * 1024;

/// Written at the lowest 8 bytes of the boot stack; a stack that grew
/// through its bottom has most likely overwritten it.
const STACK_CANARY: u64 = 0x5354_4143_4b5f_454e;

/// Whether the canary at the bottom of the boot stack is intact (no stack
/// overflow seen). There is no guard page: the stack lies in `.bss` just
/// above the page tables, so an overflow corrupts them; the canary makes it
/// visible at least when the kernel gets to exit.
pub fn stack_intact() -> bool {
    unsafe extern "C" {
        static boot_stack_bottom: u64;
    }
    // SAFETY: `boot_stack_bottom` names the first 8 bytes of the stack
    // reserved in `.bss` (8-aligned); only the boot code writes them.
    unsafe { core::ptr::read_volatile(&raw const boot_stack_bottom) == STACK_CANARY }
}

/// Whether the `len` bytes at `addr` lie in `.bss` (zero-initialised
/// statics, which take no room in the kernel file).
pub fn in_bss(addr: usize, len: usize) -> bool {
    unsafe extern "C" {
        static __bss_start: u8;
        static __bss_end: u8;
    }
    let (start, end) = (
        (&raw const __bss_start) as usize,
        (&raw const __bss_end) as usize,
    );
    start <= addr && addr.saturating_add(len) <= end
}

/// First address mapped uncached (PCD|PWT): device memory lives above it.
const UNCACHED_FROM: u64 = 0xb000_0000;

global_asm!(
    // The PVH note. The section is 4-byte aligned: QEMU steps through notes
    // using the PT_NOTE segment's alignment, and with 8 it misses the entry.
    // The descriptor is the 32-bit entry point, stored as 8 bytes in this
    // 64-bit ELF.
    ".section .note.pvh, \"a\", @note",
    ".balign 4",
    ".long 4",  // n_namesz: "Xen\0"
    ".long 8",  // n_descsz
    ".long 18", // n_type: XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad pvh_start",
    //
    ".section .boot.text, \"ax\"",
    ".code32",
    ".global pvh_start",
    "pvh_start:",
    "cli",
    "cld",
    "mov ebp, ebx", // hvm_start_info: kept in EBP until kmain
    // 1. Zero .bss.
    "mov edi, offset __bss_start",
    "mov ecx, offset __bss_end",
    "sub ecx, edi",
    "xor eax, eax",
    "rep stosb",
    // The canary at the bottom of the stack (see `stack_intact`).
    "mov dword ptr [boot_stack_bottom], {canary_lo}",
    "mov dword ptr [boot_stack_bottom + 4], {canary_hi}",
    // 2. Page tables: PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3;
    //    PD entries: 2 MiB pages, present + writable + page size.
    "mov eax, offset boot_pdpt",
    "or eax, 0x3",
    "mov dword ptr [boot_pml4], eax",
    "mov edi, offset boot_pdpt",
    "mov eax, offset boot_pd",
    "or eax, 0x3",
    "mov ecx, 4",
    ".Lpdpt_loop:",
    "mov dword ptr [edi], eax",
    "add eax, 4096",
    "add edi, 8",
    "dec ecx",
    "jnz .Lpdpt_loop",
    "mov edi, offset boot_pd",
    "xor ecx, ecx",
    ".Lpd_loop:",
    "mov eax, ecx",
    "shl eax, 21",
    "cmp eax, {uncached}",
    "jae .Lpd_uncached",
    "or eax, 0x83", // present, writable, 2 MiB page
    "jmp .Lpd_store",
    ".Lpd_uncached:",
    "or eax, 0x9b", // ... plus PWT and PCD
    ".Lpd_store:",
    "mov dword ptr [edi + ecx * 8], eax",
    "inc ecx",
    "cmp ecx, 2048",
    "jb .Lpd_loop",
    // 3. Long mode.
    "mov eax, offset boot_pml4",
    "mov cr3, eax",
    "mov eax, cr4",
    "or eax, 0x20", // CR4.PAE
    "mov cr4, eax",
    "mov ecx, 0xc0000080", // IA32_EFER
    "rdmsr",
    "or eax, 0x100", // EFER.LME
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80000001", // CR0.PG | CR0.PE
    "mov cr0, eax",
    "lgdt [boot_gdt_ptr]",
    "mov esp, offset boot_stack_top",
    "push 0x08", // the 64-bit code segment
    "mov eax, offset .Llong_mode",
    "push eax",
    "retf",
    //
    ".code64",
    ".Llong_mode:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "mov rsp, offset boot_stack_top",
    "mov edi, ebp", // kmain(start_info_paddr), zero-extended
    "xor ebp, ebp",
    "call kmain",
    ".Lhang:",
    "cli",
    "hlt",
    "jmp .Lhang",
    //
    // The GDT: null, 64-bit code (0x08), data (0x10).
    ".section .rodata.boot_gdt, \"a\"",
    ".balign 16",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "boot_gdt_ptr:",
    ".word 3 * 8 - 1",
    ".long boot_gdt",
    //
    ".section .bss.boot, \"aw\", @nobits",
    ".balign 4096",
    "boot_pml4:",
    ".skip 4096",
    "boot_pdpt:",
    ".skip 4096",
    "boot_pd:",
    ".skip 4 * 4096",
    ".balign 16",
    ".global boot_stack_bottom",
    "boot_stack_bottom:",
    ".skip {stack_size}",
    "boot_stack_top:",
    //
    ".previous",
    stack_size = const STACK_SIZE,
    canary_lo = const STACK_CANARY as u32,
    canary_hi = const (STACK_CANARY >> 32) as u32,
    uncached = const UNCACHED_FROM,
);

static BOOT_INFO: Once<BootInfo> = Once::new();

/// Reads the boot information once (from the `hvm_start_info` at physical
/// address `paddr`) and returns it.
///
/// # Panics
/// When the structure is missing or malformed (the kernel cannot know its
/// command line then); the panic handler reports it and fails the run.
pub fn init(paddr: u64) -> &'static BootInfo {
    BOOT_INFO.call_once(|| {
        let mut info = BootInfo::empty();
        if let Err(err) = info.read_from(paddr, read_phys) {
            panic!("{err}");
        }
        info
    })
}

/// The boot information read by [`init`], `None` before that.
pub fn info() -> Option<&'static BootInfo> {
    BOOT_INFO.get()
}

/// The kernel's command line (QEMU's `-append`), empty before [`init`].
pub fn cmdline() -> &'static str {
    info().map_or("", BootInfo::cmdline)
}

/// Copies physical memory at `addr` into `buf`; `false` when the range is
/// is at address 0, outside the identity map or overlaps the kernel image (whose
/// `.bss` was zeroed on entry: boot data there would be gone).
fn read_phys(addr: u64, buf: &mut [u8]) -> bool {
    unsafe extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
    }
    let kernel_start = (&raw const __kernel_start) as u64;
    let kernel_end = (&raw const __kernel_end) as u64;
    let Some(end) = addr.checked_add(buf.len() as u64) else {
        return false;
    };
    if addr == 0 || end > UNCACHED_FROM || (addr < kernel_end && end > kernel_start) {
        return false;
    }
    // SAFETY: the range is identity-mapped RAM below the device region and
    // outside the kernel image, so it aliases no Rust object; a byte copy
    // has no alignment needs.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
    true
}
