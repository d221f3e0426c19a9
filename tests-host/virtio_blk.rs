//! The virtio-blk device side: descriptor chains built in guest memory
//! (a leaked buffer lent as `FlatMemory`, guest addresses are offsets),
//! served from a qcow2 image qemu-img created, on a device that completes
//! operations out of order. Reads, writes, flushes, discards, write zeroes and GET_ID
//! against a model and then qemu-img and qemu-io on the image; every
//! malformed chain refused with the right status and the image left
//! byte-identical; overlapping buffers held back, then served; many
//! chains in flight through a small engine and a full server.

mod common;

use std::fs;

use blockgraph::device::{MemDevice, Reorder};
use blockgraph::engine::Engine;
use blockgraph::virtio_blk::{
    Config, Descriptor, DiskId, FlatMemory, Server, Used, CONFIG_LEN, F_BLK_SIZE, F_DISCARD,
    F_FLUSH, F_RO, F_SEG_MAX, F_SIZE_MAX, F_VERSION_1, F_WRITE_ZEROES, T_DISCARD, T_FLUSH,
    T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use blockgraph::{Access, BackendId, ErrorKind, Format, Graph, NodeId};
use common::*;
use tempfile::TempDir;

const SECTOR: usize = 512;
/// The disk: 2 MiB.
const DISK: u64 = 2 << 20;
/// Guest RAM: 8 MiB.
const RAM: usize = 8 << 20;
const SERIAL: &[u8] = b"blockgraph-vblk-0001";

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;
/// What a status byte holds before the server writes it.
const UNWRITTEN: u8 = 0xff;

/// Guest RAM: a leaked buffer, guest address = offset.
type Guest = FlatMemory<'static>;

/// Stores `bytes` at guest `addr`.
fn put(guest: &Guest, addr: u64, bytes: &[u8]) {
    // SAFETY: the tests write only chains not yet submitted, or between
    // runs (nothing in flight).
    assert!(unsafe { guest.write(addr, bytes) }, "outside guest RAM");
}

/// The `len` guest bytes at `addr`.
fn get(guest: &Guest, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: the tests read only between runs (nothing in flight).
    assert!(unsafe { guest.read(addr, &mut out) }, "outside guest RAM");
    out
}

type Disk = Reorder<'static, MemDevice<'static>>;
type TestGraph = Graph<Disk, 16, 4, 32>;

/// A qcow2 image served to a guest: the graph, an engine of `SLOTS`
/// slots, a server of `RECORDS` records, guest RAM and a model of the
/// disk's contents.
struct Fixture<const RECORDS: usize = 64, const SLOTS: usize = 64> {
    dir: TempDir,
    graph: Box<TestGraph>,
    engine: Box<Engine<'static, SLOTS>>,
    server: Box<Server<'static, Guest, RECORDS>>,
    /// Next free guest address.
    next: u64,
    file: NodeId,
    backend: BackendId,
    disk: DiskId,
    model: Vec<u8>,
    next_head: u16,
}

impl<const RECORDS: usize, const SLOTS: usize> Fixture<RECORDS, SLOTS> {
    /// `disk.qcow2` (64 KiB clusters) with data at 0 (0x5a, 512 KiB) and
    /// at 1 MiB (0x6b, 256 KiB), on a device completing in an order `seed`
    /// picks; the disk's config as `config` changes the defaults.
    fn new(seed: u64, config: impl FnOnce(Config) -> Config) -> Self {
        let dir = tmpdir("bg-vblk-");
        let size = DISK.to_string();
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "disk.qcow2", &size],
        );
        qemu_io(
            dir.path(),
            "qcow2",
            "disk.qcow2",
            &["write -P 0x5a 0 512k", "write -P 0x6b 1M 256k"],
        );
        let bytes = fs::read(dir.path().join("disk.qcow2")).unwrap();
        let storage = Box::leak(vec![0u8; bytes.len() + (8 << 20)].into_boxed_slice());
        storage[..bytes.len()].copy_from_slice(&bytes);
        let device = MemDevice::new(storage, bytes.len() as u64, seed).unwrap();
        let mut graph: Box<TestGraph> = Box::default();
        let file = graph
            .add_device(Reorder::new(device, seed), "disk.qcow2")
            .unwrap();
        let top = graph.open_format(file, Format::Qcow2, false).unwrap();
        let backend = graph
            .attach_backend(top, Access::READ_WRITE_DEVICE)
            .unwrap();
        graph.unref(top).unwrap();
        let mut model = vec![0u8; DISK as usize];
        model[..512 << 10].fill(0x5a);
        model[1 << 20..(1 << 20) + (256 << 10)].fill(0x6b);
        let ram = Box::leak(vec![0u8; RAM].into_boxed_slice());
        let mut server = Box::new(Server::new(FlatMemory::new(ram, 0)));
        let defaults = Config::for_backend(&graph, backend).unwrap();
        let disk = server.add_disk(backend, config(defaults), SERIAL).unwrap();
        Self {
            dir,
            graph,
            engine: Box::new(Engine::new()),
            server,
            next: 4096,
            file,
            backend,
            disk,
            model,
            next_head: 0,
        }
    }

    /// `len` bytes of guest RAM holding `fill`.
    fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next;
        self.next = (addr + len as u64).next_multiple_of(64);
        assert!(self.next as usize <= RAM, "test guest RAM exhausted");
        put(self.server.memory(), addr, &vec![fill; len]);
        addr
    }

    /// A readable descriptor holding a request header.
    fn header(&mut self, kind: u32, sector: u64) -> Descriptor {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.bytes(&bytes)
    }

    /// A readable descriptor holding `bytes`.
    fn bytes(&mut self, bytes: &[u8]) -> Descriptor {
        let addr = self.alloc(bytes.len(), 0);
        put(self.server.memory(), addr, bytes);
        readable(addr, bytes.len())
    }

    /// A readable descriptor holding one discard / write-zeroes segment.
    fn segment(&mut self, sector: u64, sectors: u32, flags: u32) -> Descriptor {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&sector.to_le_bytes());
        bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
        bytes[12..].copy_from_slice(&flags.to_le_bytes());
        self.bytes(&bytes)
    }

    /// A descriptor of `len` bytes of `fill`.
    fn buffer(&mut self, len: usize, fill: u8, device_writable: bool) -> Descriptor {
        let addr = self.alloc(len, fill);
        Descriptor {
            addr,
            len: len as u32,
            device_writable,
        }
    }

    /// A writable one-byte status descriptor, not yet written.
    fn status(&mut self) -> Descriptor {
        self.buffer(1, UNWRITTEN, true)
    }

    /// Submits `chain`; its head index.
    fn submit(&mut self, chain: &[Descriptor]) -> u16 {
        let head = self.next_head;
        self.next_head += 1;
        let engine = &mut *self.engine;
        let taken = self
            .server
            .submit(engine, self.disk, head, chain.iter().copied());
        assert!(taken.is_ok(), "chain {head} not taken");
        head
    }

    /// Polls until no chain is in flight; the used entries in the order
    /// they came.
    fn run(&mut self) -> Vec<Used> {
        let mut used = Vec::new();
        for _ in 0..100_000 {
            let left = self.server.poll(&mut self.graph, &mut self.engine);
            used.extend(std::iter::from_fn(|| self.server.next_used()));
            if left == 0 {
                used.extend(std::iter::from_fn(|| self.server.next_used()));
                return used;
            }
        }
        panic!("chains never finished");
    }

    /// Submits `chain`, runs it; its used length and status byte.
    fn serve(&mut self, chain: &[Descriptor]) -> (u32, u8) {
        let head = self.submit(chain);
        let used = self.run();
        assert_eq!(used.len(), 1, "one used entry per chain");
        assert_eq!((used[0].head, used[0].disk), (head, self.disk));
        let status = chain.last().map_or(UNWRITTEN, |d| self.byte(last_byte(d)));
        (used[0].len, status)
    }

    /// The guest byte at `addr`; outside guest RAM, [`UNWRITTEN`].
    fn byte(&self, addr: u64) -> u8 {
        match addr < RAM as u64 {
            true => get(self.server.memory(), addr, 1)[0],
            false => UNWRITTEN,
        }
    }

    /// The image file's bytes.
    fn image(&mut self) -> Vec<u8> {
        let device = self.graph.device_mut(self.file).unwrap();
        device.inner().contents().to_vec()
    }

    /// The disk as the graph reads it now.
    fn view(&mut self) -> Vec<u8> {
        let mut view = vec![0u8; DISK as usize];
        let root = self.graph.root(self.backend).unwrap();
        self.graph.read(root, 0, &mut view).unwrap();
        view
    }

    /// The image as left: qemu-img finds it consistent and reads the model.
    fn check_on_disk(&mut self) {
        let root = self.graph.root(self.backend).unwrap();
        self.graph.flush(root).unwrap();
        let image = self.image();
        let dir = self.dir.path();
        fs::write(dir.join("out.qcow2"), image).unwrap();
        qemu_img(dir, &["check", "-q", "out.qcow2"]);
        qemu_img(dir, &["convert", "-O", "raw", "out.qcow2", "out.raw"]);
        let raw = fs::read(dir.join("out.raw")).unwrap();
        assert!(
            raw == self.model,
            "qemu-img reads other data than the model"
        );
    }
}

fn readable(addr: u64, len: usize) -> Descriptor {
    Descriptor {
        addr,
        len: len as u32,
        device_writable: false,
    }
}

fn last_byte(d: &Descriptor) -> u64 {
    d.addr.saturating_add(u64::from(d.len).max(1) - 1)
}

/// Writable data and status in one descriptor: `len` data bytes of
/// `fill`, then the status byte.
fn with_status(fx: &mut Fixture, len: usize, fill: u8) -> Descriptor {
    let d = fx.buffer(len + 1, fill, true);
    put(fx.server.memory(), d.addr + len as u64, &[UNWRITTEN]);
    d
}

#[test]
fn config_space_is_laid_out_as_the_spec_says() {
    let config = Config {
        size_max: 0x1_0000,
        seg_max: 7,
        discard_sector_alignment: 8,
        write_zeroes_may_unmap: true,
        ..Config::new(0x1234_5678_9abc, false)
    };
    let bytes = config.bytes();
    assert_eq!(bytes.len(), CONFIG_LEN);
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(bytes[..8].try_into().unwrap()),
        0x1234_5678_9abc
    );
    assert_eq!(le32(8), 0x1_0000, "size_max");
    assert_eq!(le32(12), 7, "seg_max");
    assert_eq!(le32(16), 0, "geometry (not offered)");
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!(&bytes[24..32], &[0; 8], "topology (not offered)");
    assert_eq!(u16::from_le_bytes([bytes[34], bytes[35]]), 1, "num_queues");
    assert_eq!(le32(36), 1 << 16, "max_discard_sectors");
    assert_eq!(le32(40), 1, "max_discard_seg");
    assert_eq!(le32(44), 8, "discard_sector_alignment");
    assert_eq!(le32(48), 1 << 16, "max_write_zeroes_sectors");
    assert_eq!(le32(52), 1, "max_write_zeroes_seg");
    assert_eq!(bytes[56], 1, "write_zeroes_may_unmap");
    // A read at any offset, past the end as zeros.
    let mut part = [0xffu8; 8];
    config.read(12, &mut part);
    assert_eq!(part, [7, 0, 0, 0, 0, 0, 0, 0]);
    config.read(CONFIG_LEN as u64 - 2, &mut part);
    assert_eq!(part, [0; 8]);
    config.read(u64::MAX - 1, &mut part);
    assert_eq!(part, [0; 8]);

    let bit = |n: u32| 1u64 << n;
    let common =
        bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH) | bit(F_VERSION_1);
    assert_eq!(
        config.features(),
        common | bit(F_DISCARD) | bit(F_WRITE_ZEROES)
    );
    let read_only = Config::new(64, true);
    assert_eq!(read_only.features(), common | bit(F_RO));
    let bytes = read_only.bytes();
    assert_eq!(
        (&bytes[36..44], &bytes[48..57]),
        (&[0; 8][..], &[0; 9][..]),
        "no discard, no zeroes"
    );
}

/// Reads, writes (headers and data split across descriptors, data sharing
/// the status descriptor), GET_ID, discard, write zeroes and flush on a
/// qcow2 image; then qemu-img checks the image and reads the model, and
/// qemu-io finds the patterns.
#[test]
fn serves_every_request_type_on_a_qcow2_image() {
    let mut fx: Fixture = Fixture::new(7, |c| c);
    assert_eq!(fx.server.config(fx.disk).unwrap().capacity, DISK / 512);

    // A read across data and unallocated space, in three segments, the
    // header split in two, the last segment sharing the status byte.
    let header = fx.header(T_IN, (512 << 10) / 512 - 4);
    let (h1, h2) = (readable(header.addr, 5), readable(header.addr + 5, 11));
    let a = fx.buffer(1024, 0xee, true);
    let b = fx.buffer(2048, 0xee, true);
    let c = with_status(&mut fx, 1024, 0xee);
    let (used, status) = fx.serve(&[h1, h2, a, b, c]);
    assert_eq!((used, status), (4097, OK));
    let mut read = get(fx.server.memory(), a.addr, 1024);
    read.extend(get(fx.server.memory(), b.addr, 2048));
    read.extend(get(fx.server.memory(), c.addr, 1024));
    let start = (512 << 10) - 2048;
    assert!(read == fx.model[start..start + 4096], "read other data");

    // A write of three segments, one a header's tail: the header
    // descriptor carries the first data bytes.
    let sector = 300u64;
    let mut first = vec![0u8; 16 + 512];
    first[..4].copy_from_slice(&T_OUT.to_le_bytes());
    first[8..16].copy_from_slice(&sector.to_le_bytes());
    first[16..].fill(0x31);
    let first = fx.bytes(&first);
    let d2 = fx.buffer(1536, 0x32, false);
    let d3 = fx.buffer(4096, 0x33, false);
    let status = fx.status();
    assert_eq!(fx.serve(&[first, d2, d3, status]), (1, OK));
    let at = sector as usize * SECTOR;
    fx.model[at..at + 512].fill(0x31);
    fx.model[at + 512..at + 2048].fill(0x32);
    fx.model[at + 2048..at + 6144].fill(0x33);
    assert!(fx.view() == fx.model, "the write did not land as sent");

    // GET_ID: the serial, cut to the buffer; 20 bytes at most.
    for (len, shown) in [(20, 20), (8, 8), (64, 20)] {
        let header = fx.header(T_GET_ID, 0);
        let data = fx.buffer(len, 0xee, true);
        let status = fx.status();
        assert_eq!(fx.serve(&[header, data, status]), (shown as u32 + 1, OK));
        let got = get(fx.server.memory(), data.addr, len);
        assert_eq!(&got[..shown], &SERIAL[..shown]);
        assert!(
            got[shown..].iter().all(|&b| b == 0xee),
            "GET_ID wrote too much"
        );
    }

    // Discard and write zeroes: the ranges read as zeros.
    for (kind, sector, sectors, flags) in [
        (T_DISCARD, 128u64, 128u32, 0u32),
        (T_WRITE_ZEROES, 2048 + 8, 40, 0),
        (T_WRITE_ZEROES, 16, 8, 1),
    ] {
        let header = fx.header(kind, 0);
        let segment = fx.segment(sector, sectors, flags);
        let status = fx.status();
        assert_eq!(fx.serve(&[header, segment, status]), (1, OK));
        let at = sector as usize * SECTOR;
        fx.model[at..at + sectors as usize * SECTOR].fill(0);
    }
    assert!(fx.view() == fx.model, "discard or write zeroes missed");

    // Flush, then the image on disk.
    let header = fx.header(T_FLUSH, 0);
    let status = fx.status();
    assert_eq!(fx.serve(&[header, status]), (1, OK));
    fx.check_on_disk();
    let dir = fx.dir.path();
    qemu_io(
        dir,
        "qcow2",
        "out.qcow2",
        &[
            "read -P 0x31 150k 512",
            "read -P 0x32 150.5k 1536",
            "read -P 0x33 152k 4k",
            "read -P 0 64k 64k",
        ],
    );
}

/// One malformed chain: how to build it, and the status it must get
/// (`None`: no status byte, used length 0).
type Case = (
    &'static str,
    fn(&mut Fixture) -> Vec<Descriptor>,
    Option<u8>,
);

fn malformed_cases() -> Vec<Case> {
    vec![
        ("empty chain", |_| vec![], None),
        ("header only", |fx| vec![fx.header(T_IN, 0)], None),
        (
            "status descriptor readable",
            |fx| {
                let h = fx.header(T_FLUSH, 0);
                let s = fx.buffer(1, UNWRITTEN, false);
                vec![h, s]
            },
            None,
        ),
        (
            "status outside guest RAM",
            |fx| {
                let h = fx.header(T_FLUSH, 0);
                vec![
                    h,
                    Descriptor {
                        addr: RAM as u64,
                        len: 1,
                        device_writable: true,
                    },
                ]
            },
            None,
        ),
        (
            "status past the address space",
            |fx| {
                let h = fx.header(T_FLUSH, 0);
                vec![
                    h,
                    Descriptor {
                        addr: u64::MAX,
                        len: 2,
                        device_writable: true,
                    },
                ]
            },
            None,
        ),
        (
            "short header",
            |fx| {
                let h = fx.bytes(&[0; 8]);
                vec![h, fx.status()]
            },
            Some(IOERR),
        ),
        (
            "unknown type",
            |fx| vec![fx.header(99, 0), fx.status()],
            Some(UNSUPP),
        ),
        (
            "read not whole sectors",
            |fx| {
                let h = fx.header(T_IN, 0);
                vec![h, fx.buffer(100, 0xee, true), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "read past the end",
            |fx| {
                let h = fx.header(T_IN, DISK / 512 - 1);
                vec![h, fx.buffer(1024, 0xee, true), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "sector overflows",
            |fx| {
                let h = fx.header(T_IN, u64::MAX / 256);
                vec![h, fx.buffer(512, 0xee, true), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "write data writable",
            |fx| {
                let h = fx.header(T_OUT, 0);
                vec![h, fx.buffer(512, 0x77, true), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "read data readable",
            |fx| {
                let h = fx.header(T_IN, 0);
                vec![h, fx.buffer(512, 0x77, false), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "readable after writable",
            |fx| {
                let h = fx.header(T_OUT, 0);
                let w = fx.buffer(512, 0xee, true);
                vec![h, w, fx.buffer(512, 0x77, false), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "more segments than seg_max",
            |fx| {
                let mut chain = vec![fx.header(T_OUT, 0)];
                chain.extend((0..5).map(|_| fx.buffer(512, 0x77, false)));
                chain.push(fx.status());
                chain
            },
            Some(IOERR),
        ),
        (
            "more descriptors than a chain keeps",
            |fx| {
                let mut chain = vec![fx.header(T_FLUSH, 0)];
                chain.extend((0..30).map(|_| fx.buffer(0, 0, false)));
                chain.push(fx.status());
                chain
            },
            Some(IOERR),
        ),
        (
            "segment over size_max",
            |fx| {
                let h = fx.header(T_OUT, 0);
                vec![h, fx.buffer(8192, 0x77, false), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "read data overlapping its status",
            |fx| {
                let h = fx.header(T_IN, 0);
                let s = fx.status();
                vec![
                    h,
                    Descriptor {
                        addr: s.addr - 511,
                        len: 512,
                        device_writable: true,
                    },
                    s,
                ]
            },
            Some(IOERR),
        ),
        (
            "read segments overlapping",
            |fx| {
                let h = fx.header(T_IN, 0);
                let d = fx.buffer(1024, 0xee, true);
                vec![
                    h,
                    d,
                    Descriptor {
                        addr: d.addr + 512,
                        len: 1024,
                        device_writable: true,
                    },
                    fx.status(),
                ]
            },
            Some(IOERR),
        ),
        (
            "read into the header",
            |fx| {
                let h = fx.header(T_IN, 0);
                vec![
                    h,
                    Descriptor {
                        addr: h.addr,
                        len: 512,
                        device_writable: true,
                    },
                    fx.status(),
                ]
            },
            Some(IOERR),
        ),
        (
            "write data outside guest RAM",
            |fx| {
                let h = fx.header(T_OUT, 0);
                vec![h, readable(RAM as u64 - 256, 512), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "read data outside guest RAM",
            |fx| {
                let h = fx.header(T_IN, 0);
                let d = Descriptor {
                    addr: RAM as u64 - 256,
                    len: 512,
                    device_writable: true,
                };
                vec![h, d, fx.status()]
            },
            Some(IOERR),
        ),
        (
            "descriptor past the address space",
            |fx| {
                let h = fx.header(T_OUT, 0);
                vec![h, readable(u64::MAX - 100, 512), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "header outside guest RAM",
            |fx| vec![readable(RAM as u64 - 8, 16), fx.status()],
            Some(IOERR),
        ),
        (
            "flush with data",
            |fx| {
                let h = fx.header(T_FLUSH, 0);
                vec![h, fx.buffer(512, 0xee, true), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "write with writable data before the status",
            |fx| {
                let h = fx.header(T_OUT, 0);
                vec![h, fx.buffer(512, 0x77, false), with_status(fx, 512, 0xee)]
            },
            Some(IOERR),
        ),
        (
            "discard of two segments",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                let (a, b) = (fx.segment(0, 8, 0), fx.segment(64, 8, 0));
                vec![h, a, b, fx.status()]
            },
            Some(IOERR),
        ),
        (
            "discard segment cut short",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.bytes(&[0; 8]), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "discard with unmap",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.segment(0, 8, 1), fx.status()]
            },
            Some(UNSUPP),
        ),
        (
            "discard with an unknown flag",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.segment(0, 8, 4), fx.status()]
            },
            Some(UNSUPP),
        ),
        (
            "write zeroes with an unknown flag",
            |fx| {
                let h = fx.header(T_WRITE_ZEROES, 0);
                vec![h, fx.segment(0, 8, 3), fx.status()]
            },
            Some(UNSUPP),
        ),
        (
            "discard misaligned",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.segment(4, 8, 0), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "discard past the end",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.segment(DISK / 512 - 8, 16, 0), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "discard sector overflows",
            |fx| {
                let h = fx.header(T_DISCARD, 0);
                vec![h, fx.segment(u64::MAX - 7, 8, 0), fx.status()]
            },
            Some(IOERR),
        ),
        (
            "write zeroes over max sectors",
            |fx| {
                let h = fx.header(T_WRITE_ZEROES, 0);
                vec![h, fx.segment(0, 1024, 0), fx.status()]
            },
            Some(IOERR),
        ),
    ]
}

/// Every malformed chain gets its status (or used length 0 without a
/// status byte), its data buffers stay as they were, and the image stays
/// byte-identical. A disk configured read-only refuses writes (IOERR) and
/// discards (UNSUPP) on the same image.
#[test]
fn malformed_chains_are_refused_without_touching_the_image() {
    let small = |c: Config| Config {
        seg_max: 4,
        size_max: 4096,
        discard_sector_alignment: 8,
        max_write_zeroes_sectors: 512,
        ..c
    };
    let mut fx: Fixture = Fixture::new(11, small);
    let before = fx.image();
    let view = fx.view();
    for (name, build, expected) in malformed_cases() {
        let chain = build(&mut fx);
        // Every guest byte of the chain, but for a status byte to write.
        let inside =
            |d: &&Descriptor| d.len > 0 && d.addr.saturating_add(d.len.into()) <= RAM as u64;
        let status_at = expected.and(chain.last()).map(last_byte);
        let snapshot = |fx: &Fixture| -> Vec<Vec<u8>> {
            let read = |d: &Descriptor| {
                let mut bytes = get(fx.server.memory(), d.addr, d.len as usize);
                if let Some(at) =
                    status_at.filter(|at| (d.addr..d.addr + u64::from(d.len)).contains(at))
                {
                    bytes[(at - d.addr) as usize] = UNWRITTEN;
                }
                bytes
            };
            chain.iter().filter(inside).map(read).collect()
        };
        let guest = snapshot(&fx);
        let (used, status) = fx.serve(&chain);
        match expected {
            Some(code) => assert_eq!((used, status), (1, code), "{name}"),
            None => assert_eq!(used, 0, "{name}: used length"),
        }
        assert!(snapshot(&fx) == guest, "{name}: guest memory written");
        assert!(fx.image() == before, "{name}: the image changed");
    }
    assert!(fx.view() == view);

    // The same image behind a disk the server was told is read-only.
    let read_only = Config {
        read_only: true,
        ..*fx.server.config(fx.disk).unwrap()
    };
    let disk = fx.server.add_disk(fx.backend, read_only, b"ro").unwrap();
    fx.disk = disk;
    let header = fx.header(T_OUT, 0);
    let data = fx.buffer(512, 0x77, false);
    let status = fx.status();
    assert_eq!(
        fx.serve(&[header, data, status]),
        (1, IOERR),
        "write to read-only"
    );
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        let header = fx.header(kind, 0);
        let segment = fx.segment(0, 8, 0);
        let status = fx.status();
        assert_eq!(
            fx.serve(&[header, segment, status]),
            (1, UNSUPP),
            "{kind} on read-only"
        );
    }
    let header = fx.header(T_IN, 0);
    let data = with_status(&mut fx, 512, 0xee);
    assert_eq!(fx.serve(&[header, data]), (513, OK), "read of read-only");
    assert!(get(fx.server.memory(), data.addr, 512) == fx.model[..512]);
    assert!(fx.image() == before, "the read-only disk changed the image");

    // A disk of 4 KiB blocks: requests must be whole blocks.
    let blocks = Config {
        blk_size: 4096,
        ..*fx.server.config(fx.disk).unwrap()
    };
    let bad = Config {
        blk_size: 1000,
        ..blocks
    };
    let refused = fx.server.add_disk(fx.backend, bad, b"");
    assert_eq!(refused.map_err(|e| e.kind()), Err(ErrorKind::InvalidInput));
    fx.disk = fx.server.add_disk(fx.backend, blocks, b"4k").unwrap();
    for (sector, len, expected, used) in
        [(8, 4096, OK, 4097), (0, 512, IOERR, 1), (4, 4096, IOERR, 1)]
    {
        let header = fx.header(T_IN, sector);
        let data = with_status(&mut fx, len, 0xee);
        assert_eq!(
            fx.serve(&[header, data]),
            (used, expected),
            "{len} at {sector}"
        );
    }
}

/// A write from the buffer a read in flight fills is held back until the
/// read completed (it writes what the read brought); a chain of another
/// disk of the server that overlaps only the held-back one waits behind
/// it; one that overlaps nothing starts at once.
#[test]
fn overlapping_buffers_are_held_back_then_served() {
    let mut fx: Fixture = Fixture::new(3, |c| c);
    // The read fills `shared` with 0x5a from sector 0.
    let shared = fx.buffer(4096, 0xee, true);
    let header = fx.header(T_IN, 0);
    let status = fx.status();
    let read = fx.submit(&[header, shared, status]);
    // The write sends `shared` to 1.5 MiB: it must see the read's data.
    // Its status byte is the first of `spot`.
    let spot = fx.buffer(512, 0xee, true);
    let header = fx.header(T_OUT, 3072);
    let status = Descriptor { len: 1, ..spot };
    let write = fx.submit(&[header, readable(shared.addr, 4096), status]);
    assert_eq!(
        fx.engine.len(),
        1,
        "the write started over the read's buffer"
    );
    // A read into `spot`, for a second disk of the server: it overlaps
    // only the held-back write (its status byte), so it waits behind it.
    let first_disk = fx.disk;
    let config = *fx.server.config(first_disk).unwrap();
    fx.disk = fx.server.add_disk(fx.backend, config, b"second").unwrap();
    let header = fx.header(T_IN, 8);
    let status = fx.status();
    let behind = fx.submit(&[header, spot, status]);
    let second_disk = std::mem::replace(&mut fx.disk, first_disk);
    assert_eq!(fx.engine.len(), 1, "a chain overtook the one it overlaps");
    // An independent read starts at once.
    let free = fx.buffer(512, 0xee, true);
    let header = fx.header(T_IN, 2048);
    let status = fx.status();
    let independent = fx.submit(&[header, free, status]);
    assert_eq!(fx.engine.len(), 2, "an independent chain was held back");
    assert_eq!(fx.server.in_flight(), 4);

    let used = fx.run();
    let order: Vec<u16> = used.iter().map(|u| u.head).collect();
    assert_eq!(used.len(), 4);
    let at = |head| order.iter().position(|&h| h == head).unwrap();
    assert!(
        at(read) < at(write) && at(write) < at(behind),
        "order {order:?}"
    );
    assert!(order.contains(&independent));
    let disks: Vec<_> = used.iter().map(|u| (u.head, u.disk)).collect();
    assert!(disks.contains(&(behind, second_disk)) && disks.contains(&(write, first_disk)));
    fx.model[3072 * SECTOR..3072 * SECTOR + 4096].fill(0x5a);
    assert!(
        fx.view() == fx.model,
        "the write did not send what the read brought"
    );
    // The read into `spot` came after the write's status byte.
    assert_eq!(get(fx.server.memory(), spot.addr, 512), vec![0x5a; 512]);
    fx.check_on_disk();
}

/// A device reset forgets the disk's chains: a held-back write never
/// runs, the read in flight finishes (data and status written) without a
/// used entry, and the disk serves again.
#[test]
fn a_reset_forgets_the_disks_chains() {
    let mut fx: Fixture = Fixture::new(9, |c| c);
    let shared = fx.buffer(4096, 0xee, true);
    let header = fx.header(T_IN, 0);
    let read_status = fx.status();
    fx.submit(&[header, shared, read_status]);
    let header = fx.header(T_OUT, 3072);
    let write_status = fx.status();
    fx.submit(&[header, readable(shared.addr, 4096), write_status]);
    assert_eq!(fx.server.in_flight(), 2);
    assert_eq!(fx.server.reset(fx.disk), 1, "the read is in the engine");
    assert_eq!(fx.server.in_flight(), 1);
    let used = fx.run();
    assert!(used.is_empty(), "a reset disk reported {used:?}");
    assert_eq!(fx.server.in_engine(fx.disk), 0);
    assert!(fx.server.is_empty() && fx.engine.is_empty());
    assert_eq!(fx.byte(read_status.addr), OK);
    assert_eq!(fx.byte(write_status.addr), UNWRITTEN);
    assert!(get(fx.server.memory(), shared.addr, 4096) == fx.model[..4096]);
    assert!(fx.view() == fx.model, "the forgotten write ran");
    let header = fx.header(T_FLUSH, 0);
    let status = fx.status();
    assert_eq!(fx.serve(&[header, status]), (1, OK));
}

/// Where a read's data lands in guest RAM, and where it comes from on the
/// disk (bytes).
type ReadInto = (u64, usize);

/// Many chains in flight on a device completing out of order: more than
/// the server holds (the rest handed back, submitted again once there is
/// room) and than the engine has slots (queued in the server); every read
/// sees the model, every write lands, and used entries come out of order.

#[test]
fn many_chains_in_flight_complete_out_of_order() {
    let mut out_of_order = false;
    for seed in 1..=4 {
        let mut fx: Fixture<16, 4> = Fixture::new(seed, |c| c);
        // Distinct 4 KiB blocks: reads of the data areas, writes of fresh
        // patterns into blocks of the first data area.
        let mut pending: Vec<(Vec<Descriptor>, Option<ReadInto>)> = Vec::new();
        for i in 0..40u64 {
            let header_sector = |block: u64| block * 8;
            if i % 4 == 3 {
                let block = i;
                let h = fx.header(T_OUT, header_sector(block));
                let d = fx.buffer(4096, i as u8, false);
                let s = fx.status();
                fx.model[(block * 4096) as usize..][..4096].fill(i as u8);
                pending.push((vec![h, d, s], None));
            } else {
                let block = 256 + i;
                let h = fx.header(T_IN, header_sector(block));
                let d = fx.buffer(4096, 0xee, true);
                let s = fx.status();
                pending.push((vec![h, d, s], Some((d.addr, (block * 4096) as usize))));
            }
        }
        let mut heads = Vec::new();
        let mut used = Vec::new();
        let mut rejected = 0;
        let mut queue = pending.iter().enumerate().peekable();
        while heads.len() < pending.len() || used.len() < pending.len() {
            while let Some(&(i, (chain, _))) = queue.peek() {
                let engine = &mut *fx.engine;
                match fx
                    .server
                    .submit(engine, fx.disk, i as u16, chain.iter().copied())
                {
                    Ok(()) => {
                        heads.push(i as u16);
                        queue.next();
                    }
                    Err(back) => {
                        assert_eq!(back.error.kind(), ErrorKind::NoCapacity);
                        assert_eq!(back.head, i as u16);
                        assert!(!fx.server.has_room());
                        rejected += 1;
                        break;
                    }
                }
            }
            assert!(fx.engine.len() <= 4);
            fx.server.poll(&mut fx.graph, &mut fx.engine);
            used.extend(std::iter::from_fn(|| fx.server.next_used()));
        }
        assert!(rejected > 0, "the server never filled up");
        let order: Vec<u16> = used.iter().map(|u| u.head).collect();
        out_of_order |= order.windows(2).any(|w| w[0] > w[1]);
        for u in &used {
            let (chain, read) = &pending[u.head as usize];
            let status = fx.byte(chain[2].addr);
            assert_eq!(status, OK, "chain {} failed", u.head);
            match read {
                Some((addr, at)) => {
                    assert_eq!(u.len, 4097);
                    assert!(
                        get(fx.server.memory(), *addr, 4096) == fx.model[*at..at + 4096],
                        "read {}",
                        u.head
                    );
                }
                None => assert_eq!(u.len, 1),
            }
        }
        assert!(fx.view() == fx.model, "seed {seed}: a write was lost");
        assert!(fx.server.is_empty() && fx.engine.is_empty());
        fx.check_on_disk();
    }
    assert!(out_of_order, "every run completed in submission order");
}

/// A device error fails the chain with IOERR (a read's used length still
/// counts its data: the engine may have written part of it), and the next
/// chain is served again.
#[test]
fn device_errors_give_ioerr() {
    let mut fx: Fixture = Fixture::new(5, |c| c);
    // A failed read, a failed write (the device refuses writes), a read.
    for (kind, fail) in [(T_IN, true), (T_OUT, true), (T_IN, false)] {
        let device = fx.graph.device_mut(fx.file).unwrap().inner_mut();
        device.fail_operation((kind == T_IN && fail).then_some(0));
        device.set_read_only(kind == T_OUT && fail);
        let header = fx.header(kind, 16);
        let data = fx.buffer(4096, 0x44, kind == T_IN);
        let status = fx.status();
        let expected = if fail { IOERR } else { OK };
        let used = if kind == T_IN { 4097 } else { 1 };
        assert_eq!(
            fx.serve(&[header, data, status]),
            (used, expected),
            "{kind} {fail}"
        );
        if !fail {
            assert!(get(fx.server.memory(), data.addr, 4096) == fx.model[8192..12288]);
        }
    }
    assert!(fx.view() == fx.model, "a failed write changed the disk");
}
