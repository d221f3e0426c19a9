//! `FileDevice`'s split-phase queue (io_uring) on real files: many reads
//! and writes in flight at once (more than a ring holds) return what the
//! file holds and leave what was written; aligned transfers of a device
//! opened for cache mode `none` bypass the page cache; errors are the
//! synchronous path's; dropping a device with operations in flight waits
//! for them. The tests fail where io_uring is unavailable (they check
//! that operations really were queued). The queue takes `'static` buffers
//! only: the tests leak theirs.

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use blockgraph::device::{Device, FileDevice, Op, Queue, Submitted, Tag};
use blockgraph::{ErrorKind, Result};

mod common;
use common::{leaked_buffer, Rng};

/// The tests count the process's storage reads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const FILE_LEN: usize = 8 << 20;
/// More operations than one ring holds (128).
const OPS: usize = 300;

/// A number below `n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// A completed operation: its tag, result and a read's buffer.
type Report = (Tag, Result<()>, Option<&'static mut [u8]>);

/// The reads' buffers of `reports`, joined.
fn joined(reports: &[Report]) -> Vec<u8> {
    let bufs = reports.iter().filter_map(|(_, _, buf)| buf.as_deref());
    bufs.flat_map(|buf| buf.iter().copied()).collect()
}

/// Submits `ops` in order (tag = index), then polls and waits until every
/// one is reported. Returns how many went in flight, and the reports by
/// tag.
fn run_all(device: &mut FileDevice, ops: Vec<Op<'static>>) -> (usize, Vec<Report>) {
    let count = ops.len();
    let mut reports = Vec::new();
    let mut queued = 0;
    for (i, op) in ops.into_iter().enumerate() {
        match device.submit(Tag(i as u32), op) {
            Submitted::Done(result, buf) => reports.push((Tag(i as u32), result, buf)),
            Submitted::Queued => queued += 1,
        }
    }
    let mut rounds = 0;
    while reports.len() < count {
        rounds += 1;
        assert!(rounds < 100_000, "operations never complete");
        let before = reports.len();
        device.poll(&mut |tag, result, buf| reports.push((tag, result, buf)));
        if reports.len() == before {
            assert!(
                device.busy(),
                "operations lost: {} of {count}",
                reports.len()
            );
            device.wait();
        }
    }
    assert!(!device.busy());
    reports.sort_by_key(|(tag, ..)| tag.0);
    (queued, reports)
}

/// Bytes of storage the process has read (`/proc/self/io`).
fn storage_reads() -> u64 {
    let io = fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|line| line.strip_prefix("read_bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("read_bytes in /proc/self/io")
}

fn file(dir: &Path, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk");
    let bytes = pattern(FILE_LEN, seed);
    fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn queued_reads_and_writes_equal_the_file() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = common::tmpdir("bg-queue-");
    let (path, mut model) = file(tmp.path(), 1);
    let mut device = FileDevice::open(&path, true).unwrap();
    let mut rng = Rng(7);
    // Reads of 1 byte to 64 KiB anywhere, overlapping each other.
    let mut expected = Vec::new();
    let ops = leaked_buffer(OPS << 16)
        .chunks_mut(1 << 16)
        .map(|chunk| {
            let len = 1 + below(&mut rng, 1 << 16);
            let offset = below(&mut rng, FILE_LEN - len);
            expected.push(&model[offset..offset + len]);
            Op::Read {
                offset: offset as u64,
                buf: &mut chunk[..len],
            }
        })
        .collect();
    let (queued, reports) = run_all(&mut device, ops);
    assert_eq!(
        queued, OPS,
        "every read goes in flight (io_uring available?)"
    );
    for ((tag, result, buf), expected) in reports.into_iter().zip(expected) {
        result.unwrap_or_else(|e| panic!("read {tag:?}: {e}"));
        assert!(buf.unwrap() == expected, "read {tag:?} differs");
    }

    // Disjoint writes of 1 byte to 16 KiB, then a flush.
    let data = pattern(OPS << 14, 3).leak();
    let mut ops = Vec::new();
    let stride = FILE_LEN / OPS;
    for (i, chunk) in data.chunks(1 << 14).enumerate() {
        let len = 1 + below(&mut rng, 1 << 14);
        let offset = i * stride + below(&mut rng, stride - len);
        model[offset..offset + len].copy_from_slice(&chunk[..len]);
        ops.push(Op::Write {
            offset: offset as u64,
            buf: &chunk[..len],
        });
    }
    let (queued, reports) = run_all(&mut device, ops);
    assert_eq!(queued, OPS);
    for (tag, result, buf) in reports {
        result.unwrap_or_else(|e| panic!("write {tag:?}: {e}"));
        assert!(buf.is_none());
    }
    let (queued, reports) = run_all(&mut device, vec![Op::Flush]);
    assert_eq!(queued, 1);
    reports[0].1.as_ref().unwrap();
    assert_eq!(device.size(), FILE_LEN as u64);
    drop(device);
    assert!(
        fs::read(&path).unwrap() == model,
        "the file is not the model"
    );
}

#[test]
fn aligned_transfers_of_cache_mode_none_bypass_the_page_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = common::tmpdir("bg-queue-");
    let (path, mut model) = file(tmp.path(), 2);
    // In the page cache: a buffered read costs no storage read.
    assert!(fs::read(&path).unwrap() == model);
    for direct in [false, true] {
        let mut device = match direct {
            true => FileDevice::open_direct(&path, true).unwrap(),
            false => FileDevice::open(&path, true).unwrap(),
        };
        let before = storage_reads();
        let ops = leaked_buffer(FILE_LEN)
            .chunks_mut(1 << 16)
            .enumerate()
            .map(|(i, buf)| Op::Read {
                offset: (i << 16) as u64,
                buf,
            })
            .collect();
        let (queued, reports) = run_all(&mut device, ops);
        let read = storage_reads() - before;
        assert_eq!(queued, FILE_LEN >> 16);
        assert!(reports.iter().all(|(_, result, _)| result.is_ok()));
        assert!(joined(&reports) == model, "direct {direct}");
        if direct {
            assert!(
                read >= FILE_LEN as u64,
                "direct reads from storage: {read} bytes"
            );
        } else {
            assert!(
                read < FILE_LEN as u64 / 2,
                "buffered reads from the cache: {read} bytes"
            );
        }
    }

    // Aligned and unaligned writes and reads through one direct device see
    // each other.
    let mut device = FileDevice::open_direct(&path, true).unwrap();
    let arena = leaked_buffer(3 << 16);
    let data = pattern(3 << 16, 9);
    arena[..3 << 16].copy_from_slice(&data);
    let (block, rest) = arena.split_at_mut(1 << 16);
    let (odd, rest) = rest.split_at_mut(1 << 16);
    let (back, _) = rest.split_at_mut(1 << 16);
    let ops = vec![
        Op::Write {
            offset: 1 << 20,
            buf: &block[..],
        },
        Op::Write {
            offset: (2 << 20) + 3,
            buf: &odd[5..1000],
        },
    ];
    let (queued, reports) = run_all(&mut device, ops);
    assert_eq!(queued, 2);
    assert!(reports.iter().all(|(_, result, _)| result.is_ok()));
    model[1 << 20..(1 << 20) + (1 << 16)].copy_from_slice(&data[..1 << 16]);
    model[(2 << 20) + 3..(2 << 20) + 998].copy_from_slice(&data[(1 << 16) + 5..(1 << 16) + 1000]);
    let ops = vec![
        Op::Read {
            offset: 2 << 20,
            buf: &mut back[..],
        },
        Op::Flush,
    ];
    let (_, mut reports) = run_all(&mut device, ops);
    let buf = reports[0].2.take().unwrap();
    assert!(buf == &model[2 << 20..(2 << 20) + (1 << 16)]);
    drop(device);
    assert!(fs::read(&path).unwrap() == model);
}

#[test]
fn dropping_a_device_waits_for_its_operations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = common::tmpdir("bg-queue-");
    let (path, model) = file(tmp.path(), 4);
    let data: &'static [u8] = pattern(FILE_LEN, 5).leak();
    for direct in [false, true] {
        let open = || match direct {
            true => FileDevice::open_direct(&path, true).unwrap(),
            false => FileDevice::open(&path, true).unwrap(),
        };
        // Reads in flight, never polled: the drop waits for the kernel
        // (the buffers are `'static`; what they hold is not looked at).
        let mut device = open();
        let mut queued = 0;
        for (i, buf) in leaked_buffer(FILE_LEN).chunks_mut(32 << 10).enumerate() {
            let op = Op::Read {
                offset: (i << 15) as u64,
                buf,
            };
            if let Submitted::Queued = device.submit(Tag(i as u32), op) {
                queued += 1;
            }
        }
        assert!(queued > 128, "direct {direct}: {queued} reads in flight");
        drop(device);

        // Writes in flight, never polled: after the drop the file holds
        // them; then the original bytes go back.
        let mut device = open();
        for (i, buf) in data.chunks(32 << 10).enumerate() {
            let op = Op::Write {
                offset: (i << 15) as u64,
                buf,
            };
            assert!(matches!(
                device.submit(Tag(i as u32), op),
                Submitted::Queued
            ));
        }
        drop(device);
        assert!(fs::read(&path).unwrap() == data, "direct {direct}");
        fs::write(&path, &model).unwrap();
    }
}

#[test]
fn errors_are_the_synchronous_path_s() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = common::tmpdir("bg-queue-");
    let (path, model) = file(tmp.path(), 6);
    let buf = leaked_buffer(1 << 16);
    let end = FILE_LEN as u64;

    // Refused before any I/O, the read's buffer given back.
    let mut read_only = FileDevice::open(&path, false).unwrap();
    let (short, buf) = buf.split_at_mut(20);
    let past = Op::Read {
        offset: end - 10,
        buf: short,
    };
    match read_only.submit(Tag(1), past) {
        Submitted::Done(Err(err), Some(back)) => {
            assert_eq!(err.kind(), ErrorKind::Io);
            assert_eq!(back.len(), 20);
        }
        other => panic!("a read past the end: {other:?}"),
    }
    let write = Op::Write {
        offset: 0,
        buf: &model.clone().leak()[..10],
    };
    match read_only.submit(Tag(2), write) {
        Submitted::Done(Err(err), None) => assert_eq!(err.kind(), ErrorKind::ReadOnly),
        other => panic!("a write to a read-only file: {other:?}"),
    }
    // Flushing a read-only file has nothing to do.
    assert!(matches!(
        read_only.submit(Tag(3), Op::Flush),
        Submitted::Done(Ok(()), None)
    ));

    // The file shrinks behind the device's back: a queued read ends short,
    // at the new end, and fails as `read_at` does.
    let mut device = FileDevice::open(&path, true).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(end - 1000)
        .unwrap();
    let op = Op::Read {
        offset: end - buf.len() as u64,
        buf,
    };
    let (queued, mut reports) = run_all(&mut device, vec![op]);
    assert_eq!(queued, 1);
    let queued_err = reports[0].1.as_ref().unwrap_err().kind();
    assert!(reports[0].2.take().is_some(), "the buffer comes back");
    let mut again = vec![0u8; (1 << 16) - 20];
    let sync_err = device
        .read_at(end - again.len() as u64, &mut again)
        .unwrap_err();
    assert_eq!(queued_err, sync_err.kind());
    assert_eq!(queued_err, ErrorKind::Io);
}
