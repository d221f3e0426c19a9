//! Guest RAM mapped from a vhost-user memory table, lent to the device
//! side as [`GuestMemory<'static>`](crate::virtio_blk::GuestMemory).
//!
//! The frontend (QEMU) sends its guest RAM as file descriptors
//! (`SET_MEM_TABLE`, `ADD_MEM_REGION`); `vhost-user-backend` maps each
//! region with `mmap(MAP_SHARED)` through vm-memory and hands out the table
//! as an `Arc<GuestMemoryMmap>`. A region is unmapped only when the last
//! `Arc` holding its table is dropped. [`MappedMemory`] holds one such
//! `Arc`, so every address it translates stays mapped for as long as the
//! value lives.
//!
//! Why `'static` holds: the engine may keep a guest slice until its
//! request completes, beyond any borrow, so the slices must be `'static`.
//! The serve loop keeps the one [`MappedMemory`] of its
//! [`Server`](crate::virtio_blk::Server) alive until the server has no
//! chain left in the engine: before a new memory table replaces it, before
//! a device reset or stop answers the frontend, and before the process
//! exits, the loop drains (polls until [`Server::in_flight`] is 0, which
//! also means no slice of the memory is held by the engine any more). The
//! mapping therefore outlives every request made over it, which is all the
//! slices' lifetime needs; a table change never unmaps memory under a
//! request. Should a server be dropped with chains in the engine anyway
//! (a panic unwinding the loop), the loop leaks it, and with it this
//! mapping, rather than unmap memory the engine still writes.
//!
//! [`Server::in_flight`]: crate::virtio_blk::Server::in_flight
#![allow(unsafe_code)]

use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::error::{fail, Result};
use crate::virtio_blk::GuestMemory;
use crate::ErrorKind;

/// One snapshot of the frontend's memory table, mapped.
pub struct MappedMemory {
    table: Arc<GuestMemoryMmap<()>>,
}

impl MappedMemory {
    /// Takes `table` after checking that it maps every guest byte to its
    /// own host byte: two regions backed by overlapping ranges of the same
    /// file would make two guest addresses one host byte, which the
    /// server's overlap checks (on guest addresses) cannot see.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for such a table (a frontend's error);
    /// [`ErrorKind::Io`] when a region's file cannot be examined.
    pub fn new(table: Arc<GuestMemoryMmap<()>>) -> Result<Self> {
        let mut ranges: Vec<((u64, u64), u64, u64)> = Vec::new();
        for region in table.iter() {
            let Some(file) = region.file_offset() else {
                continue;
            };
            let Ok(meta) = file.file().metadata() else {
                return fail(ErrorKind::Io, "cannot examine a guest memory region's file");
            };
            let start = file.start();
            let Some(end) = start.checked_add(region.len()) else {
                return fail(ErrorKind::InvalidInput, "guest memory region out of range");
            };
            let identity = (meta.dev(), meta.ino());
            if ranges
                .iter()
                .any(|&(id, s, e)| id == identity && start < e && s < end)
            {
                return fail(
                    ErrorKind::InvalidInput,
                    "two guest memory regions map the same file bytes",
                );
            }
            ranges.push((identity, start, end));
        }
        Ok(Self { table })
    }

    /// The table, for walking virtqueues.
    pub fn table(&self) -> &Arc<GuestMemoryMmap<()>> {
        &self.table
    }
}

// SAFETY:
// 1. Validity for `'static`: a translated range lies inside one mapped
//    region (checked below) of the table this value keeps alive through its
//    `Arc`; regions are unmapped only when the last `Arc` drops. The serve
//    loop drops this value only once its server has nothing in the engine
//    (module docs), so no slice made from it outlives the mapping. The
//    mapping is `MAP_SHARED` read-write guest RAM: any byte value is
//    allowed.
// 2. One-to-one: vm-memory refuses tables whose guest ranges overlap, each
//    region maps its own host addresses (one `mmap` each), and `new`
//    refuses regions backed by the same file bytes.
// 3. The serve loop reaches guest RAM otherwise only through virtio-queue
//    and vm-memory, which read and write it through volatile accesses of
//    raw pointers (`VolatileSlice`), and gives this memory to one server.
unsafe impl GuestMemory<'static> for MappedMemory {
    fn translate(&self, addr: u64, len: u32) -> Option<NonNull<u8>> {
        let region = self.table.find_region(GuestAddress(addr))?;
        let offset = addr.checked_sub(region.start_addr().raw_value())?;
        let end = offset.checked_add(u64::from(len))?;
        if end > region.len() {
            return None;
        }
        let ptr = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
        NonNull::new(ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_inside_regions_only() {
        let table = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x10000), 0x2000),
        ])
        .unwrap();
        let memory = MappedMemory::new(Arc::new(table)).unwrap();
        assert!(memory.translate(0, 0x1000).is_some());
        assert!(
            memory.translate(0xfff, 2).is_none(),
            "crosses a region's end"
        );
        assert!(memory.translate(0x1000, 1).is_none(), "a hole");
        assert!(memory.translate(0x11000, 0x1000).is_some());
        assert!(memory.translate(0x11001, 0x1000).is_none());
        assert!(memory.translate(u64::MAX, 1).is_none());
    }
}
