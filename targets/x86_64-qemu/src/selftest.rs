//! The built-in check run for the command line `selftest`.
//!
//! On every writable disk: unaligned writes of a known pattern through
//! `Device::write_at` (the first is 1000 bytes at offset 777), a flush, reads
//! back through `Device::read_at` and through the static graph (the disk
//! opened by its serial as a raw image), and the errors at the end of the
//! disk. On every read-only disk: writes are
//! refused with `ReadOnly`, reads work. The host checks the files afterwards:
//! the byte at disk offset `p` must be [`pattern`]`(p)` in the regions
//! written (`cargo xtask test` checks 777..1777 and the last 3 bytes).

use blockgraph::{Device, ErrorKind, Format, OpenOptions, SharedGraph};
use spin::Mutex;

use crate::disk::{self, DiskInfo, SerialResolver, VirtioDisk};

/// The byte the self-check writes at disk offset `p` (never 0).
pub fn pattern(p: u64) -> u8 {
    (p.wrapping_mul(7) % 251 + 1) as u8
}

/// Largest request the check makes: crosses the 64 KiB bounce buffer and
/// the direct path.
const BIG: usize = 150_000;

/// Write and read buffers (too big for comfort on the stack).
static BUFFERS: Mutex<([u8; BIG], [u8; BIG])> = Mutex::new(([0; BIG], [0; BIG]));

/// Counts checks and reports failures.
struct Checks {
    disk: DiskInfo,
    passed: usize,
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            kprintln!(
                "selftest: disk {} ({}): FAILED: {what}",
                self.disk.index,
                self.disk.serial.as_str()
            );
        }
    }
}

/// Runs the check on every disk; prints `selftest ok` when all passed.
pub fn run<const N: usize, const B: usize, const C: usize, const J: usize>(
    graph: &SharedGraph<VirtioDisk, N, B, C, J>,
) -> bool {
    let mut all_ok = true;
    let mut buffers = BUFFERS.lock();
    let (data, back) = &mut *buffers;
    if disk::count() == 0 {
        kprintln!("selftest: no disks");
        all_ok = false;
    }
    for info in disk::disks() {
        let mut checks = Checks {
            disk: info,
            passed: 0,
            failed: 0,
        };
        if info.read_only {
            read_only_disk(&mut checks, back);
        } else {
            writable_disk(&mut checks, graph, data, back);
        }
        kprintln!(
            "selftest: disk {} ({}): {} checks passed, {} failed",
            info.index,
            info.serial.as_str(),
            checks.passed,
            checks.failed
        );
        all_ok &= checks.failed == 0;
    }
    kprintln!(
        "{}",
        if all_ok {
            "selftest ok"
        } else {
            "selftest FAILED"
        }
    );
    all_ok
}

fn fill(buf: &mut [u8], offset: u64) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern(offset + i as u64);
    }
}

fn writable_disk<const N: usize, const B: usize, const C: usize, const J: usize>(
    checks: &mut Checks,
    graph: &SharedGraph<VirtioDisk, N, B, C, J>,
    data: &mut [u8],
    back: &mut [u8],
) {
    let info = checks.disk;
    // By serial, as a resolver finds disks: serials must be unique.
    let mut dev = match VirtioDisk::by_serial(info.serial.as_str(), true) {
        Ok(dev) => dev,
        Err(err) => return checks.check(false, format_args!("open writable: {err}")),
    };
    checks.check(
        dev.index() == info.index,
        format_args!("serial {:?} is also disk {}", info.serial, dev.index()),
    );
    let size = dev.size();
    // (offset, length): the brief's case first, then heads, tails, the end of
    // the disk, and one request bigger than the bounce buffer.
    let cases: [(u64, usize); 6] = [
        (777, 1000),
        (0, 512),
        (511, 2),
        (4095, BIG),
        (size.saturating_sub(512), 512),
        (size.saturating_sub(3), 3),
    ];
    for (offset, len) in cases {
        if offset + len as u64 > size {
            kprintln!(
                "selftest: disk {}: too small for {len} bytes at {offset}",
                info.index
            );
            continue;
        }
        fill(&mut data[..len], offset);
        let wrote = dev.write_at(offset, &data[..len]);
        checks.check(
            wrote.is_ok(),
            format_args!("write {len} at {offset}: {wrote:?}"),
        );
    }
    let flushed = dev.flush();
    checks.check(flushed.is_ok(), format_args!("flush: {flushed:?}"));
    for (offset, len) in cases {
        if offset + len as u64 > size {
            continue;
        }
        back[..len].fill(0);
        let read = dev.read_at(offset, &mut back[..len]);
        fill(&mut data[..len], offset);
        checks.check(
            read.is_ok() && back[..len] == data[..len],
            format_args!("read back {len} at {offset}: {read:?}"),
        );
    }

    let past = dev.write_at(size.saturating_sub(1), &[1, 2]);
    checks.check(
        past.map_err(|e| e.kind()) == Err(ErrorKind::NoSpace),
        format_args!("write past the end: {past:?}, want NoSpace"),
    );
    let past = dev.read_at(size, &mut [0]);
    checks.check(
        past.map_err(|e| e.kind()) == Err(ErrorKind::Io),
        format_args!("read past the end: {past:?}, want Io"),
    );

    // The same bytes through the library: the image opened by name (its
    // serial) as raw in the static graph, as the command interpreter will.
    if size < 1777 {
        return; // the first case was skipped: nothing to read back
    }
    let mut graph = graph.lock();
    let before = graph.node_count();
    let through_graph = (|| {
        let options = OpenOptions::new(Format::Raw);
        let node = graph.open_image(&mut SerialResolver, info.serial.as_str(), options)?;
        let read = graph.read(node, 777, &mut back[..1000]);
        graph.unref(node)?;
        read
    })();
    fill(&mut data[..1000], 777);
    checks.check(
        through_graph.is_ok() && back[..1000] == data[..1000],
        format_args!("read through a raw graph node: {through_graph:?}"),
    );
    checks.check(
        graph.node_count() == before,
        format_args!("graph nodes: {} after, {before} before", graph.node_count()),
    );
}

fn read_only_disk(checks: &mut Checks, back: &mut [u8]) {
    let info = checks.disk;
    let writable = VirtioDisk::open(info.index, true);
    checks.check(
        writable.map_err(|e| e.kind()) == Err(ErrorKind::ReadOnly),
        format_args!("open writable: {writable:?}, want ReadOnly"),
    );
    let mut dev = match VirtioDisk::open(info.index, false) {
        Ok(dev) => dev,
        Err(err) => return checks.check(false, format_args!("open read-only: {err}")),
    };
    checks.check(dev.is_read_only(), format_args!("is_read_only() is false"));
    let wrote = dev.write_at(777, &[0xff; 1000]);
    checks.check(
        wrote.map_err(|e| e.kind()) == Err(ErrorKind::ReadOnly),
        format_args!("write: {wrote:?}, want ReadOnly"),
    );
    let len = 1000.min(dev.size().saturating_sub(777)) as usize;
    let read = dev.read_at(777, &mut back[..len]);
    checks.check(read.is_ok(), format_args!("read {len} at 777: {read:?}"));
    let flushed = dev.flush();
    checks.check(flushed.is_ok(), format_args!("flush: {flushed:?}"));
}
