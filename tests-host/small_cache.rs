//! The write-back metadata cache under pressure: random guest writes, zero
//! writes, discards and flushes on a graph whose cache holds two table
//! slices, so dirty slices are evicted (and written back, refcounts before a
//! flush before mappings) all the time. The guest view is checked against a
//! model after every request; after every flush a fresh graph over a copy
//! of the bytes must read the model too, and at the end the image must read
//! the model through `qemu-img convert` and pass `qemu-img check`.
//!
//! A missing qemu-img fails this test; it never skips it.

use blockgraph::device::MemDevice;
use blockgraph::format::qcow2::create::{create, CreateOptions};
use blockgraph::{Device, Format, Graph};

mod common;
use common::QEMU_IMG;

/// Two cache slices: one set of two ways.
type TinyGraph<'a> = Graph<MemDevice<'a>, 4, 1, 2>;

const SIZE: u64 = 8 << 20;

/// xorshift64*: a repeatable stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The guest view of the qcow2 image `bytes`, read by a fresh graph.
fn fresh_view(bytes: &[u8]) -> Vec<u8> {
    let mut copy = bytes.to_vec();
    let len = copy.len() as u64;
    let mut graph: Box<TinyGraph<'_>> = Box::default();
    let file = graph
        .add_device(MemDevice::new(&mut copy, len, 7).unwrap(), "copy")
        .unwrap();
    let node = graph.open_format(file, Format::Qcow2, true).unwrap();
    let mut view = vec![0u8; SIZE as usize];
    graph.read(node, 0, &mut view).unwrap();
    view
}

fn run(cluster_bits: u32, seed: u64) {
    let mut storage = vec![0u8; 64 << 20];
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(seed);
    let mut flushed: Option<Vec<u8>> = None;
    let file_len;
    {
        let mut device = MemDevice::new(&mut storage, 0, 1).unwrap();
        let mut options = CreateOptions::new(SIZE);
        options.cluster_bits = cluster_bits;
        create(&mut device, &options).unwrap();
        let mut graph: Box<TinyGraph<'_>> = Box::default();
        let file = graph.add_device(device, "disk").unwrap();
        let node = graph.open_format(file, Format::Qcow2, false).unwrap();
        graph.unref(file).unwrap();
        for step in 0..300 {
            let offset = rng.below(SIZE / 512) * 512 + rng.below(2) * rng.below(512);
            let len = (1 + rng.below(96 << 10)).min(SIZE - offset);
            let range = offset as usize..(offset + len) as usize;
            match rng.below(10) {
                0..=5 => {
                    let byte = (step % 250 + 1) as u8;
                    graph
                        .write(node, offset, &vec![byte; len as usize])
                        .unwrap();
                    model[range].fill(byte);
                }
                6 => {
                    graph.write_zeroes(node, offset, len).unwrap();
                    model[range].fill(0);
                }
                7 => {
                    // Whole clusters inside the range read as zeros after
                    // a discard (no backing file); partial ones are kept.
                    graph.discard(node, offset, len).unwrap();
                    let cs = 1u64 << cluster_bits;
                    let first = offset.div_ceil(cs) * cs;
                    let end = ((offset + len) / cs * cs).max(first);
                    model[first as usize..end as usize].fill(0);
                }
                _ => {
                    graph.flush(node).unwrap();
                    let bytes = graph.device_mut(file).unwrap().contents().to_vec();
                    assert!(
                        fresh_view(&bytes) == model,
                        "cluster_bits {cluster_bits}, seed {seed}, step {step}: after a \
                         flush a fresh graph does not read what was written"
                    );
                    flushed = Some(bytes);
                }
            }
            let mut back = vec![0u8; len as usize];
            graph.read(node, offset, &mut back).unwrap();
            assert!(
                back == model[offset as usize..(offset + len) as usize],
                "cluster_bits {cluster_bits}, seed {seed}, step {step}: read-back differs"
            );
        }
        assert!(flushed.is_some(), "the sequence flushed at least once");
        graph.flush(node).unwrap();
        file_len = graph.device_mut(file).unwrap().size() as usize;
        graph.unref(node).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    std::fs::write(&image, &storage[..file_len]).unwrap();
    let check = common::run(dir.path(), QEMU_IMG, &["check", "disk.qcow2"]);
    assert!(
        check.status.code() == Some(0),
        "cluster_bits {cluster_bits}, seed {seed}: qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let converted = common::run(
        dir.path(),
        QEMU_IMG,
        &["convert", "-O", "raw", "disk.qcow2", "view.raw"],
    );
    assert!(converted.status.success(), "qemu-img convert failed");
    let view = std::fs::read(dir.path().join("view.raw")).unwrap();
    assert!(
        view == model,
        "cluster_bits {cluster_bits}, seed {seed}: qemu-img reads something else"
    );
}

#[test]
fn small_clusters_many_table_slices() {
    for seed in 1..=3 {
        run(9, seed);
    }
}

#[test]
fn default_clusters() {
    for seed in 1..=3 {
        run(16, seed);
    }
}

#[test]
fn four_kib_clusters() {
    run(12, 7);
}
