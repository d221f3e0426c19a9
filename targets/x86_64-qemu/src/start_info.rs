//! The boot information of the PVH protocol: `struct hvm_start_info`.
//!
//! QEMU (through its PVH option ROM or qboot) leaves this structure in RAM
//! and its physical address in EBX. Layout (Xen's
//! `public/arch-x86/hvm/start_info.h`, little-endian):
//!
//! ```text
//!  0  u32 magic            0x336ec578
//!  4  u32 version          0, 1: version 1 adds the memory map
//!  8  u32 flags
//! 12  u32 nr_modules
//! 16  u64 modlist_paddr
//! 24  u64 cmdline_paddr    NUL-terminated `-append` string, 0 if none
//! 32  u64 rsdp_paddr
//! 40  u64 memmap_paddr     (version >= 1)
//! 48  u32 memmap_entries   (version >= 1)
//! 52  u32 reserved
//!
//! memory map entry (24 bytes): u64 addr, u64 size, u32 type, u32 reserved
//! ```
//!
//! Everything here is parsed like untrusted wire data and copied into
//! [`BootInfo`]: the kernel never keeps pointers into memory it does not own.
//! Memory is read through a caller-supplied reader, so the parsing is tested
//! on the host.

use core::fmt;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Bytes of the version 0 structure.
pub const LEN_V0: usize = 40;
/// Bytes of the version 1 structure (with the memory map fields).
pub const LEN_V1: usize = 56;
/// Bytes of one memory map entry.
pub const MEMMAP_ENTRY_LEN: usize = 24;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_CMDLINE: usize = 24;
const OFF_MEMMAP: usize = 40;
const OFF_MEMMAP_ENTRIES: usize = 48;

/// Longest command line kept (bytes, without the NUL).
pub const CMDLINE_CAPACITY: usize = 16 * 1024;
/// Most memory map entries kept.
pub const MEMMAP_CAPACITY: usize = 64;

/// `hvm_memmap_table_entry.type` of usable RAM.
pub const MEM_RAM: u32 = 1;

/// Why the boot information cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// The structure or something it points to is not in readable memory.
    Unreadable(&'static str, u64),
    /// `magic` is not [`MAGIC`].
    BadMagic(u32),
    /// The command line has no NUL within [`CMDLINE_CAPACITY`] bytes.
    CmdlineTooLong,
    /// The command line is not UTF-8.
    CmdlineNotUtf8,
    /// More memory map entries than [`MEMMAP_CAPACITY`].
    MemmapTooLong(u32),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(what, addr) => write!(
                f,
                "hvm_start_info: {what} at {addr:#x} is not in readable memory"
            ),
            Self::BadMagic(magic) => {
                write!(f, "hvm_start_info: bad magic {magic:#x} (want {MAGIC:#x})")
            }
            Self::CmdlineTooLong => write!(
                f,
                "hvm_start_info: command line longer than {CMDLINE_CAPACITY} bytes"
            ),
            Self::CmdlineNotUtf8 => write!(f, "hvm_start_info: command line is not UTF-8"),
            Self::MemmapTooLong(n) => write!(
                f,
                "hvm_start_info: {n} memory map entries, at most {MEMMAP_CAPACITY} supported"
            ),
        }
    }
}

/// One memory map range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemEntry {
    /// Physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `hvm_memmap_table_entry.type` (e820 numbering: 1 = RAM).
    pub kind: u32,
}

/// What the kernel keeps of `hvm_start_info`: copied, validated.
pub struct BootInfo {
    version: u32,
    cmdline: [u8; CMDLINE_CAPACITY],
    cmdline_len: usize,
    memmap: [MemEntry; MEMMAP_CAPACITY],
    memmap_len: usize,
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(raw)
}

impl BootInfo {
    /// An empty boot information (no command line, no memory map).
    pub const fn empty() -> Self {
        Self {
            version: 0,
            cmdline: [0; CMDLINE_CAPACITY],
            cmdline_len: 0,
            memmap: [MemEntry {
                addr: 0,
                size: 0,
                kind: 0,
            }; MEMMAP_CAPACITY],
            memmap_len: 0,
        }
    }

    /// Fills `self` from the `hvm_start_info` at physical address `paddr`.
    /// `read(addr, buf)` fills `buf` from physical memory at `addr` and
    /// returns `false` when that range may not be read.
    ///
    /// # Errors
    /// A [`StartInfoError`] for a structure that is missing, malformed or
    /// larger than the fixed capacities; `self` is then unspecified.
    pub fn read_from(
        &mut self,
        paddr: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<(), StartInfoError> {
        let mut header = [0u8; LEN_V1];
        if !read(paddr, &mut header[..LEN_V0]) {
            return Err(StartInfoError::Unreadable("the structure", paddr));
        }
        let magic = u32_at(&header, OFF_MAGIC);
        if magic != MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        self.version = u32_at(&header, OFF_VERSION);
        if self.version >= 1 && !read(paddr + LEN_V0 as u64, &mut header[LEN_V0..]) {
            return Err(StartInfoError::Unreadable("the structure", paddr));
        }

        // The command line: bytes up to a NUL, read in small pieces so that
        // a line near the end of RAM is not over-read by much.
        self.cmdline_len = 0;
        let cmdline = u64_at(&header, OFF_CMDLINE);
        if cmdline != 0 {
            let mut found_nul = false;
            let mut chunk = [0u8; 64];
            while !found_nul {
                let at = self.cmdline_len;
                if !read(cmdline + at as u64, &mut chunk) {
                    return Err(StartInfoError::Unreadable("the command line", cmdline));
                }
                for &byte in &chunk {
                    if byte == 0 {
                        found_nul = true;
                        break;
                    }
                    if self.cmdline_len == CMDLINE_CAPACITY {
                        return Err(StartInfoError::CmdlineTooLong);
                    }
                    self.cmdline[self.cmdline_len] = byte;
                    self.cmdline_len += 1;
                }
            }
            if core::str::from_utf8(&self.cmdline[..self.cmdline_len]).is_err() {
                return Err(StartInfoError::CmdlineNotUtf8);
            }
        }

        self.memmap_len = 0;
        if self.version >= 1 {
            let table = u64_at(&header, OFF_MEMMAP);
            let entries = u32_at(&header, OFF_MEMMAP_ENTRIES);
            if entries as usize > MEMMAP_CAPACITY {
                return Err(StartInfoError::MemmapTooLong(entries));
            }
            for i in 0..entries as usize {
                let mut raw = [0u8; MEMMAP_ENTRY_LEN];
                let at = table + (i * MEMMAP_ENTRY_LEN) as u64;
                if table == 0 || !read(at, &mut raw) {
                    return Err(StartInfoError::Unreadable("the memory map", table));
                }
                self.memmap[i] = MemEntry {
                    addr: u64_at(&raw, 0),
                    size: u64_at(&raw, 8),
                    kind: u32_at(&raw, 16),
                };
                self.memmap_len += 1;
            }
        }
        Ok(())
    }

    /// `hvm_start_info.version`.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The command line (QEMU's `-append`), empty if none.
    pub fn cmdline(&self) -> &str {
        // Checked to be UTF-8 when it was read.
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The memory map (empty before version 1).
    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// `(start, size)` of every RAM range.
    pub fn ram_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.memmap()
            .iter()
            .filter(|e| e.kind == MEM_RAM)
            .map(|e| (e.addr, e.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake physical memory of `len` bytes starting at address 0.
    struct Memory(Vec<u8>);

    impl Memory {
        fn put(&mut self, addr: usize, bytes: &[u8]) {
            self.0[addr..addr + bytes.len()].copy_from_slice(bytes);
        }

        fn reader(&self) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
            |addr, buf| {
                let Some(end) = (addr as usize).checked_add(buf.len()) else {
                    return false;
                };
                match self.0.get(addr as usize..end) {
                    Some(src) => {
                        buf.copy_from_slice(src);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    fn header(version: u32, cmdline: u64, memmap: u64, entries: u32) -> [u8; LEN_V1] {
        let mut h = [0u8; LEN_V1];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&version.to_le_bytes());
        h[24..32].copy_from_slice(&cmdline.to_le_bytes());
        h[32..40].copy_from_slice(&0xf_0000u64.to_le_bytes());
        h[40..48].copy_from_slice(&memmap.to_le_bytes());
        h[48..52].copy_from_slice(&entries.to_le_bytes());
        h
    }

    fn entry(addr: u64, size: u64, kind: u32) -> [u8; MEMMAP_ENTRY_LEN] {
        let mut e = [0u8; MEMMAP_ENTRY_LEN];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&kind.to_le_bytes());
        e
    }

    fn parse(mem: &Memory, at: u64) -> Result<Box<BootInfo>, StartInfoError> {
        let mut info = Box::new(BootInfo::empty());
        info.read_from(at, mem.reader())?;
        Ok(info)
    }

    #[test]
    fn version_1_with_command_line_and_memory_map() {
        let mut mem = Memory(vec![0; 0x4000]);
        mem.put(0x1000, &header(1, 0x2000, 0x3000, 3));
        mem.put(0x2000, b"selftest a=1\0garbage");
        mem.put(0x3000, &entry(0, 0x9fc00, 1));
        mem.put(0x3018, &entry(0xf0000, 0x10000, 2));
        mem.put(0x3030, &entry(0x10_0000, 0x7f0_0000, 1));
        let info = parse(&mem, 0x1000).unwrap();
        assert_eq!(info.version(), 1);
        assert_eq!(info.cmdline(), "selftest a=1");
        assert_eq!(info.memmap().len(), 3);
        assert_eq!(info.memmap()[1].kind, 2);
        let ram: Vec<_> = info.ram_ranges().collect();
        assert_eq!(ram, [(0, 0x9fc00), (0x10_0000, 0x7f0_0000)]);
    }

    #[test]
    fn version_0_has_no_memory_map_and_is_not_over_read() {
        // The structure sits at the very end of memory: only 40 bytes exist.
        let mut mem = Memory(vec![0; 0x1000 + LEN_V0]);
        mem.put(0x1000, &header(0, 0, 0x3000, 5)[..LEN_V0]);
        let info = parse(&mem, 0x1000).unwrap();
        assert_eq!(info.cmdline(), "");
        assert!(info.memmap().is_empty());
    }

    #[test]
    fn hostile_structures_are_errors() {
        let mut mem = Memory(vec![0; 0x8000]);
        assert_eq!(parse(&mem, 0x1000).err(), Some(StartInfoError::BadMagic(0)));
        assert!(matches!(
            parse(&mem, 0x10_0000).err(),
            Some(StartInfoError::Unreadable(..))
        ));
        // A command line without a terminating NUL before the end of memory.
        mem.put(0x1000, &header(1, 0x7ff0, 0, 0));
        mem.put(0x7ff0, &[b'x'; 16]);
        assert!(matches!(
            parse(&mem, 0x1000).err(),
            Some(StartInfoError::Unreadable(..))
        ));
        // Too many memory map entries.
        mem.put(0x1000, &header(1, 0, 0x2000, MEMMAP_CAPACITY as u32 + 1));
        assert_eq!(
            parse(&mem, 0x1000).err(),
            Some(StartInfoError::MemmapTooLong(MEMMAP_CAPACITY as u32 + 1))
        );
        // Not UTF-8.
        mem.put(0x1000, &header(1, 0x2000, 0, 0));
        mem.put(0x2000, &[0xff, 0xfe, 0]);
        assert_eq!(
            parse(&mem, 0x1000).err(),
            Some(StartInfoError::CmdlineNotUtf8)
        );
    }

    #[test]
    fn command_line_longer_than_the_buffer_is_refused() {
        let mut mem = Memory(vec![b'a'; 0x1000 + CMDLINE_CAPACITY + 0x1000]);
        mem.put(0, &header(1, 0x1000, 0, 0));
        mem.put(0x1000 + CMDLINE_CAPACITY + 1, &[0]);
        assert_eq!(parse(&mem, 0).err(), Some(StartInfoError::CmdlineTooLong));
        // Exactly the capacity fits.
        mem.put(0x1000 + CMDLINE_CAPACITY, &[0]);
        assert_eq!(parse(&mem, 0).unwrap().cmdline().len(), CMDLINE_CAPACITY);
    }
}
