//! Unit tests of the server over a raw in-memory image, small enough for
//! Miri (`cargo +nightly miri test -p blockgraph --lib virtio_blk`), which
//! checks the unsafe part: guest memory borrowed as slices while chains
//! that share it are held back.

use super::*;
use crate::device::{MemDevice, Reorder};
use crate::engine::Engine;
use crate::format::Format;
use crate::graph::{Access, Graph};

/// Guest RAM starts at this guest address.
const RAM_START: u64 = 0x1000;

fn header(ram: &mut [u8], addr: u64, kind: u32, sector: u64) -> Descriptor {
    let at = (addr - RAM_START) as usize;
    ram[at..at + 4].copy_from_slice(&kind.to_le_bytes());
    ram[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    Descriptor {
        addr,
        len: HEADER_LEN as u32,
        device_writable: false,
    }
}

fn desc(addr: u64, len: u32, device_writable: bool) -> Descriptor {
    Descriptor {
        addr,
        len,
        device_writable,
    }
}

#[test]
fn chains_sharing_guest_memory_borrow_it_one_at_a_time() {
    let mut image: std::vec::Vec<u8> = (0..8192).map(|i| (i / 512) as u8).collect();
    let mut ram = [0xeeu8; 2048];
    let (buffer, id) = (0x1200, 0x1400);
    let read = [
        header(&mut ram, 0x1000, T_IN, 1),
        desc(buffer, 512, true),
        desc(0x1100, 1, true),
    ];
    // Sends the read's buffer to sector 3: held back until the read is done.
    let write = [
        header(&mut ram, 0x1010, T_OUT, 3),
        desc(buffer, 512, false),
        desc(0x1101, 1, true),
    ];
    let get_id = [
        header(&mut ram, 0x1020, T_GET_ID, 0),
        desc(id, 20, true),
        desc(0x1102, 1, true),
    ];
    let unknown = [header(&mut ram, 0x1030, 77, 0), desc(0x1103, 1, true)];

    let device = MemDevice::new(&mut image, 8192, 1).unwrap();
    let mut graph: std::boxed::Box<Graph<Reorder<'_, MemDevice<'_>>, 4, 2, 4>> =
        std::boxed::Box::default();
    let file = graph.add_device(Reorder::new(device, 5), "raw").unwrap();
    let root = graph.open_format(file, Format::Raw, false).unwrap();
    let backend = graph
        .attach_backend(root, Access::READ_WRITE_DEVICE)
        .unwrap();
    let mut engine: Engine<'_, 4, 4, 8> = Engine::new();
    let mut server: Server<'_, FlatMemory<'_>, 4, 4, 6, 1> =
        Server::new(FlatMemory::new(&mut ram, RAM_START));
    let config = Config {
        seg_max: 4,
        ..Config::new(16, false)
    };
    let disk = server.add_disk(backend, config, b"miri").unwrap();
    for (head, chain) in [&read[..], &write, &get_id, &unknown]
        .into_iter()
        .enumerate()
    {
        let taken = server.submit(&mut engine, disk, head as u16, chain.iter().copied());
        assert!(taken.is_ok());
    }
    assert!(!server.has_room());
    assert_eq!(engine.len(), 1, "only the read is in the engine");
    let mut used = std::vec::Vec::new();
    for _ in 0..100 {
        let left = server.poll(&mut graph, &mut engine);
        used.extend(core::iter::from_fn(|| server.next_used()));
        if left == 0 {
            break;
        }
    }
    used.sort_by_key(|u| u.head);
    let lens: std::vec::Vec<u32> = used.iter().map(|u| u.len).collect();
    assert_eq!(lens, [513, 1, 21, 1]);
    drop(server);
    drop(engine);
    let written = graph.device_mut(file).unwrap().inner().contents()[1536..2048].to_vec();
    assert_eq!(
        written, [1; 512],
        "the write sent other bytes than the read brought"
    );
    drop(graph);
    assert_eq!(ram[0x100..0x104], [0, 0, 0, 2], "status bytes");
    assert_eq!(ram[0x200..0x400], [1; 512]);
    assert_eq!(&ram[0x400..0x404], b"miri");
    assert_eq!(ram[0x404..0x414], [0; 16]);
}
