//! Host safety: image locking that interoperates with QEMU (OFD byte locks,
//! both directions), one image open twice in one graph, `convert` onto its
//! own chain, files that are not images (FIFOs, symbolic link loops,
//! directories), and failed commands that must leave no new file behind.
//!
//! qemu-img and qemu-io are required: a missing tool fails the tests.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockgraph::device::FileDevice;
use blockgraph::host::PathResolver;
use blockgraph::{ErrorKind, Format, Graph, NodeId, OpenOptions};

mod common;
use common::{bg_ok, bg_refused, qemu_img, qemu_io, render, run, tmpdir, BLOCKGRAPH, QEMU_IO};

type FileGraph = Graph<FileDevice>;

/// What QEMU says when an image is in use (qemu-io and qemu-img alike).
const QEMU_LOCKED: &str = "Is another process using the image";
/// What blockgraph says then.
const LOCKED: &str = "is another process using the image?";

fn graph() -> Box<FileGraph> {
    Box::default()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

fn read_write() -> OpenOptions {
    OpenOptions {
        read_only: false,
        ..OpenOptions::new(Format::Qcow2)
    }
}

/// A child process, killed and reaped when dropped.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The OFD lock bytes held on the file `file` (by anyone), from
/// `/proc/locks`, sorted.
fn locked_bytes(file: &Path) -> Vec<u64> {
    let ino = fs::metadata(file).unwrap().ino();
    let locks = fs::read_to_string("/proc/locks").expect("read /proc/locks");
    let mut bytes = Vec::new();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = fields.iter().position(|&f| f == "OFDLCK") else {
            continue;
        };
        // OFDLCK ADVISORY READ PID MAJ:MIN:INODE START END
        let (Some(id), Some(start), Some(end)) =
            (fields.get(at + 4), fields.get(at + 5), fields.get(at + 6))
        else {
            continue;
        };
        if id.rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) != Some(ino) {
            continue;
        }
        let (start, end): (u64, u64) = (start.parse().unwrap(), end.parse().unwrap());
        bytes.extend(start..=end);
    }
    bytes.sort_unstable();
    bytes
}

/// Starts `qemu-io ARGS -c 'sleep 60000' IMAGE` in `dir` and waits until it
/// holds lock byte `byte` of IMAGE (one more lock on it than before).
fn qemu_io_holding(dir: &Path, args: &[&str], image: &str, byte: u64) -> Holder {
    let holders = |dir: &Path| {
        locked_bytes(&dir.join(image))
            .iter()
            .filter(|&&b| b == byte)
            .count()
    };
    let before = holders(dir);
    let child = Command::new(QEMU_IO)
        .args(args)
        .args(["-c", "sleep 60000", image])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{QEMU_IO}` ({e}): these tests need qemu-io"));
    let mut holder = Holder(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if holders(dir) > before {
            return holder;
        }
        if let Some(status) = holder.0.try_wait().unwrap() {
            panic!("qemu-io {args:?} {image} ended ({status}) before locking byte {byte}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-io never locked byte {byte} of {image}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `prog args` in `dir`, expecting it to fail; returns stdout and
/// stderr together.
fn refused(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = run(dir, prog, args);
    let shown = render(dir, prog, args, &out);
    assert!(!out.status.success(), "expected a failure: {shown}");
    shown
}

fn read_byte(graph: &mut FileGraph, node: NodeId, offset: u64) -> u8 {
    let mut byte = [0u8];
    graph.read(node, offset, &mut byte).unwrap();
    byte[0]
}

/// A 16 MiB qcow2 image `name` whose first 64 KiB hold `pattern`.
fn image(dir: &Path, name: &str, pattern: u8) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "16M"]);
    qemu_io(dir, "qcow2", name, &[format!("write -P {pattern} 0 64k")]);
}

#[test]
fn an_image_qemu_writes_is_refused_and_force_share_still_reads() {
    let t = tmpdir("lock-qemu-writes-");
    let d = t.path();
    image(d, "img.qcow2", 0x33);
    let img = d.join("img.qcow2");
    let _qemu = qemu_io_holding(d, &["-f", "qcow2"], "img.qcow2", 101);
    let held = locked_bytes(&img);
    assert_eq!(held, [100, 101, 103, 201, 203], "qemu-io as a writer");
    let before = fs::read(&img).unwrap();

    let err = bg_refused(d, &["io", "img.qcow2", "-c", "write 0 4k"]);
    assert!(
        err.contains("Failed to get \"write\" lock") && err.contains(LOCKED),
        "{err}"
    );
    for args in [
        &["info", "img.qcow2"][..],
        &["io", "-r", "img.qcow2", "-c", "read 0 4k"],
        &["checksum", "img.qcow2"],
    ] {
        let err = bg_refused(d, args);
        assert!(
            err.contains("Failed to get shared \"write\" lock") && err.contains(LOCKED),
            "{args:?}: {err}"
        );
    }
    // The library says the same, and nothing stays open or locked.
    let mut g = graph();
    let mut resolver = PathResolver::default();
    let name = path(d, "img.qcow2");
    for options in [OpenOptions::new(Format::Qcow2), read_write()] {
        let err = g.open_image(&mut resolver, &name, options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionConflict, "{err}");
    }
    assert_eq!(g.node_count(), 0);
    assert_eq!(locked_bytes(&img), held);

    // Force-share reads, locking byte 100 only.
    let shared = OpenOptions {
        force_share: true,
        ..OpenOptions::new(Format::Qcow2)
    };
    let top = g.open_image(&mut resolver, &name, shared).unwrap();
    assert_eq!(locked_bytes(&img), [100, 100, 101, 103, 201, 203]);
    assert_eq!(read_byte(&mut g, top, 4096), 0x33);
    // It cannot become writable, and force-share is for read-only opens.
    let err = g.set_read_only(top, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    g.unref(top).unwrap();
    for options in [
        OpenOptions {
            read_only: false,
            ..shared
        },
        OpenOptions {
            writable_devices: true,
            ..shared
        },
    ] {
        let err = g.open_image(&mut resolver, &name, options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(err.message().contains("read-only"), "{err}");
    }
    assert_eq!(locked_bytes(&img), held);

    // The CLI's -U / --force-share, as qemu-img's: reads, never writes.
    bg_ok(d, &["info", "-U", "img.qcow2"]);
    bg_ok(d, &["map", "--force-share", "img.qcow2"]);
    bg_ok(d, &["checksum", "-U", "img.qcow2"]);
    bg_ok(
        d,
        &["io", "-U", "-r", "img.qcow2", "-c", "read -P 0x33 0 64k"],
    );
    bg_ok(d, &["convert", "-U", "img.qcow2", "out.raw"]);
    let err = bg_refused(d, &["io", "-U", "img.qcow2", "-c", "write 0 4k"]);
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(locked_bytes(&img), held);
    assert_eq!(fs::read(&img).unwrap(), before, "nothing was written");
}

#[test]
fn an_image_blockgraph_uses_is_refused_to_qemu() {
    let t = tmpdir("lock-bg-writes-");
    let d = t.path();
    image(d, "img.qcow2", 0x44);
    let img = d.join("img.qcow2");
    let name = path(d, "img.qcow2");
    let mut resolver = PathResolver::default();

    // A writer locks like qemu-io's writer: QEMU neither writes nor reads.
    let mut g = graph();
    let top = g.open_image(&mut resolver, &name, read_write()).unwrap();
    assert_eq!(locked_bytes(&img), [100, 101, 103, 201, 203]);
    let err = refused(
        d,
        QEMU_IO,
        &["-f", "qcow2", "-c", "write 0 4k", "img.qcow2"],
    );
    assert!(
        err.contains("Failed to get \"write\" lock") && err.contains(QEMU_LOCKED),
        "{err}"
    );
    let err = refused(d, "qemu-img", &["info", "img.qcow2"]);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let info = qemu_img(d, &["info", "-U", "img.qcow2"]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");

    // Closing it for writes drops the write locks: QEMU reads, not writes.
    g.set_read_only(top, true).unwrap();
    assert_eq!(locked_bytes(&img), [100, 201, 203]);
    qemu_img(d, &["info", "img.qcow2"]);
    let err = refused(
        d,
        QEMU_IO,
        &["-f", "qcow2", "-c", "write 0 4k", "img.qcow2"],
    );
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");

    // Reopening for writes while QEMU reads is refused, and changes nothing.
    {
        let _reader = qemu_io_holding(d, &["-r", "-f", "qcow2"], "img.qcow2", 100);
        let before = locked_bytes(&img);
        let err = g.set_read_only(top, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionConflict);
        assert!(
            err.message().contains("Failed to get \"write\" lock"),
            "{err}"
        );
        assert!(g.is_read_only(top).unwrap());
        assert_eq!(locked_bytes(&img), before);
    }
    g.unref(top).unwrap();
    assert_eq!(locked_bytes(&img), [] as [u64; 0], "released with the node");
    qemu_io(d, "qcow2", "img.qcow2", &["write -P 0x45 0 4k"]);
}

#[test]
fn a_second_writer_is_refused_and_no_acknowledged_write_is_lost() {
    let t = tmpdir("lock-two-writers-");
    let d = t.path();
    image(d, "img.qcow2", 0x11);
    let name = path(d, "img.qcow2");
    let mut resolver = PathResolver::default();
    let mut g = graph();
    let top = g.open_image(&mut resolver, &name, read_write()).unwrap();
    g.write(top, 0, &[0x5a; 65536]).unwrap();
    g.write(top, 1 << 20, &[0x5b; 4096]).unwrap();
    g.flush(top).unwrap();

    // Another blockgraph process, and another graph of this process.
    let err = bg_refused(d, &["io", "img.qcow2", "-c", "write -P 0x66 0 64k"]);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let err = bg_refused(d, &["io", "-r", "img.qcow2", "-c", "read 0 4k"]);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let mut other = graph();
    let err = other
        .open_image(&mut resolver, &name, read_write())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict, "{err}");
    assert!(err.message().contains(LOCKED), "{err}");
    assert_eq!(other.node_count(), 0);

    g.unref(top).unwrap();
    drop(g);
    qemu_io(
        d,
        "qcow2",
        "img.qcow2",
        &["read -P 0x5a 0 64k", "read -P 0x5b 1M 4k"],
    );
    qemu_img(d, &["check", "img.qcow2"]);
    // Released: the next writer gets it.
    bg_ok(d, &["io", "img.qcow2", "-c", "write -P 0x66 2M 4k"]);
}

#[test]
fn one_file_twice_in_one_graph() {
    let t = tmpdir("lock-twice-");
    let d = t.path();
    image(d, "img.qcow2", 0x21);
    let name = path(d, "img.qcow2");
    let mut resolver = PathResolver::default();
    let mut g = graph();

    let writer = g.open_image(&mut resolver, &name, read_write()).unwrap();
    for options in [read_write(), OpenOptions::new(Format::Qcow2)] {
        let err = g.open_image(&mut resolver, &name, options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionConflict, "{err}");
        assert!(
            err.message().contains("already open in this graph"),
            "{err}"
        );
    }
    // Force-share coexists with the writer.
    let shared = OpenOptions {
        force_share: true,
        ..OpenOptions::new(Format::Qcow2)
    };
    let peek = g.open_image(&mut resolver, &name, shared).unwrap();
    g.write(writer, 0, &[0x22; 512]).unwrap();
    g.unref(peek).unwrap();
    g.unref(writer).unwrap();
    assert_eq!(g.node_count(), 0);

    // Readers coexist; neither can become a writer while the other reads.
    let reader = OpenOptions {
        writable_devices: true,
        ..OpenOptions::new(Format::Qcow2)
    };
    let first = g.open_image(&mut resolver, &name, reader).unwrap();
    let second = g.open_image(&mut resolver, &name, reader).unwrap();
    assert_eq!(read_byte(&mut g, first, 0), 0x22);
    assert_eq!(read_byte(&mut g, second, 4096), 0x21);
    let err = g.set_read_only(first, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    assert!(g.is_read_only(first).unwrap());
    let err = g
        .open_image(&mut resolver, &name, read_write())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionConflict);
    g.unref(second).unwrap();
    // Alone again, it can.
    g.set_read_only(first, false).unwrap();
    g.write(first, 0, &[0x23; 512]).unwrap();
    g.unref(first).unwrap();
    assert_eq!(g.node_count(), 0);
    qemu_io(d, "qcow2", "img.qcow2", &["read -P 0x23 0 512"]);
}

#[test]
fn convert_onto_its_own_chain_is_refused_and_truncates_nothing() {
    let t = tmpdir("lock-convert-");
    let d = t.path();
    image(d, "base.qcow2", 0x31);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x32 1M 64k"]);
    fs::write(d.join("disk.raw"), vec![0x77u8; 1 << 20]).unwrap();
    let files = ["base.qcow2", "top.qcow2", "disk.raw"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| fs::read(d.join(f)).unwrap()).collect();
    for (source, output) in [
        ("top.qcow2", "top.qcow2"),
        ("top.qcow2", "base.qcow2"),
        ("base.qcow2", "base.qcow2"),
        ("disk.raw", "disk.raw"),
    ] {
        let format = if source.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        let err = bg_refused(d, &["convert", "-f", format, source, output]);
        assert!(
            err.contains(&format!("{output}: Failed to get \"write\" lock")),
            "convert {source} {output}: {err}"
        );
    }
    let after: Vec<Vec<u8>> = files.iter().map(|f| fs::read(d.join(f)).unwrap()).collect();
    assert!(before == after, "a refused convert changed a file");
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["read -P 0x31 0 64k", "read -P 0x32 1M 64k"],
    );
}

/// Runs `blockgraph args` in `dir`, which must fail within 10 seconds;
/// returns stderr.
fn refused_quickly(dir: &Path, args: &[&str]) -> String {
    let child = Command::new(BLOCKGRAPH)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blockgraph");
    let mut holder = Holder(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "blockgraph {args:?} hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let Holder(child) = &mut holder;
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        !child.try_wait().unwrap().unwrap().success(),
        "blockgraph {args:?} succeeded"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn files_that_are_not_images_are_refused_with_their_cause() {
    let t = tmpdir("open-odd-");
    let d = t.path();
    let status = Command::new("mkfifo")
        .arg(d.join("fifo"))
        .status()
        .expect("run mkfifo");
    assert!(status.success());
    std::os::unix::fs::symlink("loop", d.join("loop")).unwrap();
    fs::create_dir(d.join("dir")).unwrap();
    fs::write(d.join("file"), [0u8; 512]).unwrap();
    let long = "x".repeat(300);
    for (name, cause) in [
        ("fifo", "not a regular file"),
        ("loop", "too many levels of symbolic links"),
        ("dir", "is a directory"),
        ("missing", "no such file"),
        ("file/image", "not a directory"),
        (long.as_str(), "file name too long"),
    ] {
        for args in [&["info", name][..], &["io", name, "-c", "write 0 512"]] {
            let err = refused_quickly(d, args);
            assert!(err.contains(cause), "{args:?}: {err}");
        }
        // As an output: the same, nothing is created or replaced.
        if name != "missing" {
            let err = refused_quickly(d, &["convert", "file", name]);
            assert!(err.contains(cause), "convert file {name}: {err}");
        }
    }
    assert!(fs::metadata(d.join("fifo")).unwrap().file_type().is_fifo());
    assert!(fs::metadata(d.join("dir")).unwrap().is_dir());
    // The library's kinds.
    for writable in [false, true] {
        let err = FileDevice::open(&d.join("fifo"), writable).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        let err = FileDevice::open(&d.join("loop"), writable).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        let err = FileDevice::open(&d.join("missing"), writable)
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
}

#[test]
fn failed_commands_leave_no_new_file_behind() {
    let t = tmpdir("no-leftovers-");
    let d = t.path();
    image(d, "top.qcow2", 0x51);
    // A compressed cluster whose payload is garbage: convert fails while
    // copying, after creating its output.
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x52 0 4M"]);
    qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "packed.qcow2"],
    );
    corrupt_first_compressed_cluster(&d.join("packed.qcow2"));
    let err = bg_refused(d, &["convert", "packed.qcow2", "out.raw"]);
    assert!(err.contains("corrupt"), "{err}");
    assert!(!d.join("out.raw").exists(), "convert left its output");
    // An output that existed is never removed.
    fs::write(d.join("kept.raw"), b"old").unwrap();
    bg_refused(d, &["convert", "packed.qcow2", "kept.raw"]);
    assert!(
        d.join("kept.raw").exists(),
        "convert removed a file it did not make"
    );

    // Outputs that cannot grow as far as needed.
    for args in [
        &[
            "--max-file-size",
            "64k",
            "create",
            "-f",
            "raw",
            "new.raw",
            "1M",
        ][..],
        &[
            "--max-file-size",
            "64k",
            "create",
            "-f",
            "qcow2",
            "new.qcow2",
            "1G",
        ],
        &["--max-file-size", "1M", "convert", "top.qcow2", "big.raw"],
        &[
            "--max-file-size",
            "100k",
            "snapshot",
            "top.qcow2",
            "snap.qcow2",
        ],
    ] {
        let err = bg_refused(d, args);
        assert!(err.contains("no space"), "{args:?}: {err}");
        let output = args[args.len() - 1];
        let output = if output.ends_with('M') || output.ends_with('G') {
            args[args.len() - 2]
        } else {
            output
        };
        assert!(!d.join(output).exists(), "{args:?} left {output}");
    }
    qemu_io(d, "qcow2", "top.qcow2", &["read -P 0x52 0 4M"]);
    qemu_img(d, &["check", "top.qcow2"]);
}

/// Overwrites the payload of the first guest cluster of the compressed
/// qcow2 image `file` with garbage.
fn corrupt_first_compressed_cluster(file: &Path) {
    let mut bytes = fs::read(file).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&bytes, l2);
    assert_ne!(entry & (1 << 62), 0, "the first cluster is not compressed");
    let offset_bits = 62 - (cluster_bits - 8);
    let payload = (entry & ((1 << offset_bits) - 1)) as usize;
    bytes[payload..payload + 64].fill(0xff);
    fs::write(file, bytes).unwrap();
}

/// A script's read-only commands on an image it has attached (and on that
/// image's backing file, which a running commit writes) use the attached
/// nodes: a second open of the files would conflict with the attached
/// writers. A parallel convert's workers share the source.
#[test]
fn a_script_reads_its_attached_images_through_their_nodes() {
    let t = tmpdir("lock-script-");
    let d = t.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x71 32M 1M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x72 0 1M"]);
    qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "expected.raw"]);
    let out = bg_ok(
        d,
        &[
            "script",
            "job-start commit top.qcow2; job-step top.qcow2 2; info top.qcow2; \
             map top.qcow2; checksum base.qcow2; convert top.qcow2 during.raw; \
             io -r base.qcow2 -c \"read -P 0x72 0 1M\"; job-wait top.qcow2; \
             info base.qcow2; convert base.qcow2 after.raw",
        ],
    );
    assert!(out.contains("is now the active image"), "{out}");
    let expected = fs::read(d.join("expected.raw")).unwrap();
    for output in ["during.raw", "after.raw"] {
        assert!(
            fs::read(d.join(output)).unwrap() == expected,
            "{output} differs from qemu-img's convert:\n{out}"
        );
    }
    assert_eq!(locked_bytes(&d.join("base.qcow2")), [] as [u64; 0]);
    qemu_img(d, &["check", "base.qcow2"]);
}
