//! `virtio_blk`: one descriptor chain and the guest memory it points into,
//! from the input, served by a `virtio_blk::Server` from a 64 KiB raw
//! image through the request engine.
//!
//! Input layout:
//!
//! ```text
//!  byte 0      descriptors in the chain (modulo 12; up to 11, more than
//!              the 8 a chain keeps)
//!  byte 1      the disk: bit 0 read-only, bits 1-2 seg_max - 1 (of 4),
//!              bits 3-4 discard alignment 1 << (2 × n) sectors
//!  6 × count   descriptors: flags (bit 0 device-writable, bits 1-2 where
//!              the address points: in RAM, at its end, near u64::MAX,
//!              far outside), a 16-bit address and a 16-bit length (LE)
//!  the rest    guest RAM's first bytes (64 KiB, the rest zero)
//! ```
//!
//! The chain is decoded on a copy of guest RAM (`Chain::decode`, the
//! oracle) and served; then what the server did must be what the
//! decoding says: a refused chain (or one whose buffers are not guest RAM)
//! leaves the image byte-identical and guest RAM too, but for its status
//! byte (used length 0 without one); a served one changes the image only
//! inside its range (a write: its data; write zeroes: zeros; a discard:
//! old bytes or zeros) and guest RAM only in its data (a read: the image's
//! bytes; GET_ID: the serial) and status byte, with the used length it
//! announces.

use blockgraph::device::MemDevice;
use blockgraph::engine::Engine;
use blockgraph::virtio_blk::{
    Chain, Config, Descriptor, FlatMemory, Op, Refusal, Request, Server, Status, Used,
};
use blockgraph::{Access, Format, Graph};

/// Guest RAM and image size.
const RAM: usize = 64 << 10;
const IMAGE: usize = 64 << 10;
/// Descriptors a chain keeps, data segments of a request.
const DESCRIPTORS: usize = 8;
const SEGMENTS: usize = 4;
const SERIAL: &[u8] = b"fuzz-serial";
/// Polls a chain may take to finish (a synchronous device: one or two).
const POLLS: usize = 16;

type Requests<'b> = Engine<'b, 2, SEGMENTS, 8>;
type Vblk<'m> = Server<'m, FlatMemory<'m>, 2, SEGMENTS, DESCRIPTORS, 1>;

pub fn run(data: &[u8]) {
    let (&count, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&disk, rest) = rest.split_first().unwrap_or((&0, &[]));
    let count = usize::from(count % 12).min(rest.len() / 6);
    let (table, memory) = rest.split_at(count * 6);
    let descriptors: Vec<Descriptor> = table.chunks(6).map(descriptor).collect();
    let config = Config {
        seg_max: u32::from(disk >> 1 & 3) + 1,
        discard_sector_alignment: 1 << (2 * u32::from(disk >> 3 & 3)),
        ..Config::new((IMAGE / 512) as u64, disk & 1 != 0)
    };
    let mut ram = vec![0u8; RAM];
    let shown = memory.len().min(RAM);
    ram[..shown].copy_from_slice(&memory[..shown]);
    let mut image: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8 ^ 0xa5).collect();
    let (ram_before, image_before) = (ram.clone(), image.clone());

    let chain = Chain::<DESCRIPTORS>::new(descriptors.iter().copied());
    let decoded = chain.decode::<SEGMENTS>(&config, |addr, buf| {
        let at = usize::try_from(addr).ok().filter(|&a| a + buf.len() <= RAM);
        at.map(|at| buf.copy_from_slice(&ram_before[at..at + buf.len()]))
            .is_some()
    });
    let used = serve(&mut ram, &mut image, config, descriptors);
    check(&decoded, used, (&ram_before, &ram), (&image_before, &image));
}

/// Serves the chain; its used entry.
fn serve(ram: &mut [u8], image: &mut [u8], config: Config, chain: Vec<Descriptor>) -> Used {
    let device = MemDevice::new(image, IMAGE as u64, 1).expect("a device over the image");
    let mut graph: Box<Graph<MemDevice<'_>, 4, 2, 4>> = Box::default();
    let file = graph.add_device(device, "image").expect("a node");
    let root = graph
        .open_format(file, Format::Raw, false)
        .expect("raw opens");
    let access = match config.read_only {
        true => Access::READ_ONLY_DEVICE,
        false => Access::READ_WRITE_DEVICE,
    };
    let backend = graph.attach_backend(root, access).expect("a backend");
    let mut engine: Box<Requests<'_>> = Box::default();
    let mut server: Box<Vblk<'_>> = Box::new(Server::new(FlatMemory::new(ram, 0)));
    let disk = server.add_disk(backend, config, SERIAL).expect("a disk");
    assert!(server.has_room());
    let taken = server.submit(&mut engine, disk, 7, chain);
    assert!(taken.is_ok(), "an empty server refused a chain");
    for _ in 0..POLLS {
        if server.poll(&mut graph, &mut engine) == 0 {
            let used = server.next_used().expect("a finished chain is reported");
            assert_eq!((used.disk, used.head), (disk, 7));
            assert!(server.next_used().is_none() && server.is_empty());
            assert!(engine.is_empty(), "the server left a request in the engine");
            return used;
        }
    }
    panic!("a chain did not finish in {POLLS} polls");
}

/// One descriptor from 6 input bytes.
fn descriptor(bytes: &[u8]) -> Descriptor {
    let flags = bytes[0];
    let near = u64::from(u16::from_le_bytes([bytes[1], bytes[2]]));
    let addr = match flags >> 1 & 3 {
        0 => near,
        1 => (RAM as u64 - 64).wrapping_add(near & 127),
        2 => u64::MAX - near,
        _ => near << 40 | near,
    };
    Descriptor {
        addr,
        len: u32::from(u16::from_le_bytes([bytes[3], bytes[4]])),
        device_writable: flags & 1 != 0,
    }
}

/// Guest byte range `addr..addr + len` as indices of RAM, if inside.
fn in_ram(addr: u64, len: u64) -> Option<core::ops::Range<usize>> {
    let end = addr.checked_add(len)?;
    (end <= RAM as u64).then_some(addr as usize..end as usize)
}

/// The server did what the decoding says.
fn check(
    decoded: &Result<Request<SEGMENTS>, Refusal>,
    used: Used,
    (ram_before, ram): (&[u8], &[u8]),
    (image_before, image): (&[u8], &[u8]),
) {
    let mut expect_ram = ram_before.to_vec();
    let status_at = match decoded {
        Err(Refusal::NoStatus) => None,
        Err(Refusal::Status { at, .. }) => Some(*at),
        Ok(request) => Some(request.status),
    };
    let Some(status) = status_at.and_then(|at| in_ram(at, 1)).map(|r| r.start) else {
        // Nowhere to write a status: nothing may change.
        assert_eq!(used.len, 0, "used length without a status byte");
        assert!(ram == ram_before, "guest RAM written without a status byte");
        assert!(image == image_before, "image written without a status byte");
        return;
    };
    let request = match decoded {
        Err(Refusal::Status { status: code, .. }) => {
            assert_eq!(used.len, 1);
            expect_ram[status] = *code as u8;
            assert!(ram == expect_ram, "a refused chain wrote guest RAM");
            assert!(image == image_before, "a refused chain wrote the image");
            return;
        }
        Err(Refusal::NoStatus) => unreachable!("no status byte: returned above"),
        Ok(request) => request,
    };
    let data: Option<Vec<_>> = request
        .data
        .iter()
        .map(|s| in_ram(s.addr, s.len.into()))
        .collect();
    let Some(data) = data else {
        // Data outside guest RAM: IOERR, nothing else.
        assert_eq!((used.len, ram[status]), (1, Status::IoErr as u8));
        expect_ram[status] = Status::IoErr as u8;
        assert!(ram == expect_ram && image == image_before);
        return;
    };
    // A raw image in memory: every request inside it succeeds.
    assert_eq!(ram[status], Status::Ok as u8, "{:?} failed", request.op);
    assert_eq!(used.len, request.used_len());
    expect_ram[status] = Status::Ok as u8;
    let sent: Vec<u8> = data
        .iter()
        .flat_map(|r| ram_before[r.clone()].iter().copied())
        .collect();
    let mut expect_image = image_before.to_vec();
    match request.op {
        Op::Read { offset } => {
            let offset = offset as usize;
            let mut from = image_before[offset..].iter();
            for range in &data {
                for at in range.clone() {
                    expect_ram[at] = *from.next().expect("read inside the image");
                }
            }
        }
        Op::GetId => {
            let mut serial = SERIAL.iter().chain(std::iter::repeat(&0));
            for at in data.iter().flat_map(|r| r.clone()) {
                expect_ram[at] = *serial.next().expect("endless");
            }
        }
        Op::Write { offset } => {
            let offset = offset as usize;
            expect_image[offset..offset + sent.len()].copy_from_slice(&sent);
        }
        Op::WriteZeroes { offset, len, .. } => {
            expect_image[offset as usize..(offset + len) as usize].fill(0);
        }
        Op::Discard { offset, len } => {
            let range = offset as usize..(offset + len) as usize;
            for at in range.clone() {
                assert!(
                    image[at] == 0 || image[at] == image_before[at],
                    "discard wrote data"
                );
            }
            expect_image[range.clone()].copy_from_slice(&image[range]);
        }
        Op::Flush => {}
        other => panic!("the oracle has no expectation for {other:?}"),
    }
    assert!(ram == expect_ram, "{:?}: guest RAM differs", request.op);
    assert!(image == expect_image, "{:?}: image differs", request.op);
}
