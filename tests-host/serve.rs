//! `blockgraph serve` against QEMU's tools: an NBD export of a qcow2 chain
//! made with qemu-img, driven by `qemu-io -f raw nbd+unix://`, compared
//! afterwards with the same writes done by qemu-io on a copy (`qemu-img
//! compare`, `qemu-img check`); image locking against qemu-io and a second
//! server; the QMP stand-in's greeting, `qmp_capabilities` and `quit`;
//! SIGTERM; hostile NBD clients and a hostile vhost-user frontend, which
//! must not crash the server or change an image.
//!
//! The vhost-user-blk path with a real guest is `cargo xtask guest
//! --server blockgraph --no-jobs` (QEMU, a Linux guest and fio). A missing
//! QEMU tool fails these tests; nothing is skipped.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{qemu_compare, qemu_img, qemu_io, run, BLOCKGRAPH, QEMU_IO};

/// A running `blockgraph serve`, killed when dropped.
struct Served {
    child: Child,
}

impl Served {
    /// Starts `blockgraph serve ARGS` in `dir` and waits (up to 10 s) until
    /// every socket of `sockets` exists.
    fn start(dir: &Path, args: &[&str], sockets: &[&str]) -> Served {
        let child = Command::new(BLOCKGRAPH)
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start blockgraph serve");
        let mut served = Served { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sockets.iter().all(|s| dir.join(s).exists()) {
            if let Some(status) = served.child.try_wait().unwrap() {
                panic!(
                    "blockgraph serve exited early ({status}): {}",
                    served.stderr()
                );
            }
            assert!(Instant::now() < deadline, "serve made no socket in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    }

    /// Whatever the server wrote to stderr (once it has exited).
    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(pipe) = self.child.stderr.as_mut() {
            let _ = pipe.read_to_string(&mut err);
        }
        err
    }

    /// Sends `signal` (`TERM`, `INT`).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (up to 20 s) for the server to exit; its status and stderr.
    fn wait(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = self.stderr();
                assert!(!err.contains("panicked"), "serve panicked: {err}");
                return (status, err);
            }
            assert!(Instant::now() < deadline, "serve did not exit within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the server must exit 0.
    fn stop(&mut self) {
        self.stop_with("TERM");
    }

    /// `signal`, then the server must exit 0.
    fn stop_with(&mut self, signal: &str) {
        self.signal(signal);
        let (status, err) = self.wait();
        assert!(status.success(), "serve after SIG{signal}: {status}: {err}");
    }

    /// Whether it still runs.
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `base.qcow2` (64 MiB, 0x11 over the first 2 MiB) under `top.qcow2`
/// (0x44 at 6 MiB), made by qemu-img and qemu-io in `dir`.
fn make_chain(dir: &Path) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x11 0 2M"]);
    qemu_img(
        dir,
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
    qemu_io(dir, "qcow2", "top.qcow2", &["write -P 0x44 6M 128k"]);
}

/// A temporary directory with [`make_chain`]'s images.
fn chain_dir() -> tempfile::TempDir {
    let tmp = common::tmpdir("bg-serve-");
    make_chain(tmp.path());
    tmp
}

/// `serve -f qcow2 top.qcow2 --nbd nbd.sock EXTRA...` in `dir`.
fn serve_nbd(dir: &Path, extra: &[&str]) -> Served {
    let mut args = vec!["-f", "qcow2", "top.qcow2", "--nbd", "nbd.sock"];
    args.extend_from_slice(extra);
    Served::start(dir, &args, &["nbd.sock"])
}

/// The qemu-io target for the NBD export at `socket` (relative to the
/// test's directory, where qemu-io runs).
fn nbd_uri(socket: &str) -> String {
    format!("nbd+unix:///?socket={socket}")
}

/// `qemu-io -f raw NBD -c CMD...`; must succeed with no failed command.
fn nbd_io(dir: &Path, socket: &str, cmds: &[&str]) -> String {
    qemu_io(dir, "raw", &nbd_uri(socket), cmds)
}

/// `qemu-img check` must find `img` clean.
fn check_clean(dir: &Path, img: &str) {
    let out = qemu_img(dir, &["check", "-f", "qcow2", img]);
    assert!(out.contains("No errors were found"), "{img}: {out}");
}

/// The files' bytes, to prove they did not change.
fn snapshot(dir: &Path, files: &[&str]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|f| fs::read(dir.join(f)).unwrap())
        .collect()
}

/// Writes the guest does, over NBD and (for the reference) directly.
const WRITES: [&str; 6] = [
    "write -P 0x22 1M 1M",
    "write -P 0x33 5M 64k",
    "write -z 1536k 256k",
    "discard 6M 64k",
    "write -P 0x55 6M 64k",
    "flush",
];

#[test]
fn nbd_writes_land_in_the_chain_as_qemu_io_writes_them() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let reference = dir.join("ref");
    fs::create_dir(&reference).unwrap();
    for img in ["base.qcow2", "top.qcow2"] {
        fs::copy(dir.join(img), reference.join(img)).unwrap();
    }
    let mut served = serve_nbd(dir, &[]);
    nbd_io(dir, "nbd.sock", &WRITES);
    // Reads through the export see the writes, the backing data and zeros.
    nbd_io(
        dir,
        "nbd.sock",
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 512k",
            "read -P 0 1536k 256k",
            "read -P 0x22 1792k 256k",
            "read -P 0 2M 4k",
            "read -P 0x33 5M 64k",
            "read -P 0x55 6M 64k",
            "read -P 0x44 6208k 64k",
            "read -P 0 10M 1M",
        ],
    );
    // A second connection sees the first one's writes.
    nbd_io(dir, "nbd.sock", &["read -P 0x22 1M 256k"]);
    // qemu-img reads the whole export.
    let uri = nbd_uri("nbd.sock");
    let info = qemu_img(dir, &["info", "-f", "raw", &uri]);
    assert!(info.contains("64 MiB"), "{info}");
    qemu_img(
        dir,
        &["convert", "-f", "raw", "-O", "raw", &uri, "export.raw"],
    );
    served.stop_with("INT");
    qemu_io(&reference, "qcow2", "top.qcow2", &WRITES);
    for img in ["base.qcow2", "top.qcow2"] {
        check_clean(dir, img);
    }
    qemu_compare(
        dir,
        "top.qcow2",
        "ref/top.qcow2",
        "the served chain vs qemu-io's",
    );
    qemu_compare(
        dir,
        "base.qcow2",
        "ref/base.qcow2",
        "the backing file is untouched",
    );
    let args = [
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "export.raw",
        "top.qcow2",
    ];
    let out = run(dir, common::QEMU_IMG, &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img convert of the export vs the image: {}",
        common::render(dir, common::QEMU_IMG, &args, &out)
    );
}

#[test]
fn a_served_image_is_locked_against_qemu_io_and_a_second_server() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let mut served = serve_nbd(dir, &[]);
    let args = ["-f", "qcow2", "-c", "write -P 0x66 0 4k", "top.qcow2"];
    let out = run(dir, QEMU_IO, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("lock"),
        "qemu-io wrote an image blockgraph serves: {text}"
    );
    let second = Command::new(BLOCKGRAPH)
        .args(["serve", "-f", "qcow2", "top.qcow2", "--nbd", "other.sock"])
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "a second server: {err}");
    assert!(err.contains("lock"), "a second server: {err}");
    assert!(
        !dir.join("other.sock").exists(),
        "the refused server made its socket"
    );
    assert!(served.running());
    served.stop();
    // Released: qemu-io may write now.
    qemu_io(dir, "qcow2", "top.qcow2", &["write -P 0x66 0 4k"]);
    check_clean(dir, "top.qcow2");
}

/// Reads one QMP line.
fn qmp_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// Connects to the monitor on `qmp.sock` in `dir` (reads time out after
/// `seconds`) and takes its greeting: the writing and reading ends.
fn qmp_connect(dir: &Path, seconds: u64) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(dir.join("qmp.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(seconds)))
        .unwrap();
    let writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let greeting = qmp_line(&mut reader);
    assert!(greeting.starts_with("{\"QMP\""), "greeting: {greeting}");
    (writer, reader)
}

/// A QMP client that sends a line longer than the monitor takes (2 MiB, no
/// newline) loses its connection; the server goes on answering others.
#[test]
fn an_endless_qmp_line_ends_only_that_connection() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let args = [
        "-f",
        "qcow2",
        "top.qcow2",
        "--nbd",
        "nbd.sock",
        "--qmp",
        "qmp.sock",
    ];
    let mut served = Served::start(dir, &args, &["nbd.sock", "qmp.sock"]);
    let mut hostile = UnixStream::connect(dir.join("qmp.sock")).unwrap();
    hostile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = BufReader::new(hostile.try_clone().unwrap());
    assert!(qmp_line(&mut greeting).starts_with("{\"QMP\""));
    // The server may close while the client is still writing.
    let _ = hostile.write_all(&vec![b' '; 2 << 20]);
    let mut rest = Vec::new();
    let ended = greeting.read_to_end(&mut rest);
    // Closed (end of file, or reset: its bytes were never read), not left
    // hanging until the read times out.
    let closed = match &ended {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && rest.is_empty(),
        "not disconnected: {ended:?}, {} bytes",
        rest.len()
    );

    let (mut writer, mut reader) = qmp_connect(dir, 10);
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    assert!(qmp_line(&mut reader)
        .replace(' ', "")
        .contains("\"return\":{}"));
    writer.write_all(b"{\"execute\": \"quit\"}\n").unwrap();
    assert!(qmp_line(&mut reader).contains("return"));
    let (status, err) = served.wait();
    assert!(status.success(), "{status}: {err}");
    check_clean(dir, "top.qcow2");
}

#[test]
fn qmp_answers_the_greeting_capabilities_and_quit() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let mut served = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "top.qcow2",
            "--nbd",
            "nbd.sock",
            "--qmp",
            "qmp.sock",
        ],
        &["nbd.sock", "qmp.sock"],
    );
    let (mut writer, mut reader) = qmp_connect(dir, 10);
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}\n")
        .unwrap();
    let reply = qmp_line(&mut reader);
    let compact = reply.replace(' ', "");
    assert!(
        compact.contains("\"return\":{}") && compact.contains("\"id\":1"),
        "{reply}"
    );
    writer
        .write_all(b"{\"execute\": \"no-such-command\", \"id\": \"x\"}\n")
        .unwrap();
    let reply = qmp_line(&mut reader);
    assert!(
        reply.contains("CommandNotFound") && reply.replace(' ', "").contains("\"id\":\"x\""),
        "{reply}"
    );
    writer.write_all(b"garbage\n").unwrap();
    let reply = qmp_line(&mut reader);
    assert!(reply.contains("\"error\""), "{reply}");
    // Writes through the export are flushed by `quit`.
    nbd_io(dir, "nbd.sock", &["write -P 0x77 3M 64k"]);
    writer
        .write_all(b"{\"execute\": \"quit\", \"id\": 2}\n")
        .unwrap();
    let reply = qmp_line(&mut reader);
    let compact = reply.replace(' ', "");
    assert!(
        compact.contains("\"return\":{}") && compact.contains("\"id\":2"),
        "{reply}"
    );
    let (status, err) = served.wait();
    assert!(status.success(), "serve after quit: {status}: {err}");
    check_clean(dir, "top.qcow2");
    qemu_io(dir, "qcow2", "top.qcow2", &["read -P 0x77 3M 64k"]);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let before = snapshot(dir, &["base.qcow2", "top.qcow2"]);
    let mut served = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "top.qcow2",
            "--nbd",
            "nbd.sock",
            "--read-only",
        ],
        &["nbd.sock"],
    );
    let uri = nbd_uri("nbd.sock");
    let args = ["-f", "raw", "-c", "write -P 0x66 0 4k", &uri];
    let out = run(dir, QEMU_IO, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("wrote"),
        "a read-only export took a write: {text}"
    );
    let args = [
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x11 0 64k",
        "-c",
        "read -P 0x44 6M 64k",
        &uri,
    ];
    let out = common::ok(dir, QEMU_IO, &args);
    assert!(!out.contains("failed"), "{out}");
    // A raw NBD write is refused with EPERM, its payload read.
    let mut s = nbd_transmission(dir);
    let mut w = request(1, 5, 0, 512);
    w.extend_from_slice(&[0xee; 512]);
    s.write_all(&w).unwrap();
    let reply = read_some(&mut s, 16);
    assert_eq!(errno(&reply), 1, "EPERM");
    for kind in [4u16, 6] {
        s.write_all(&request(kind, 6, 0, 512)).unwrap();
        let reply = read_some(&mut s, 16);
        assert_eq!(errno(&reply), 1, "EPERM");
    }
    drop(s);
    // A reader may share a read-only export's images.
    qemu_img(dir, &["info", "-U", "top.qcow2"]);
    served.stop();
    assert!(
        before == snapshot(dir, &["base.qcow2", "top.qcow2"]),
        "a read-only export changed an image"
    );
}

/// Reads exactly `n` bytes from `stream`, or fewer when it closes.
fn read_some(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    let mut got = 0;
    while got < n {
        match stream.read(&mut out[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    out.truncate(got);
    out
}

/// The error field of a simple reply.
fn errno(reply: &[u8]) -> u32 {
    u32::from_be_bytes(reply[4..8].try_into().unwrap())
}

/// Connects and does the fixed newstyle handshake up to the option phase.
fn nbd_connect(dir: &Path) -> UnixStream {
    let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = read_some(&mut s, 18);
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// An option message.
fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A transmission request.
fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

/// Connects and enters transmission with `NBD_OPT_EXPORT_NAME`.
fn nbd_transmission(dir: &Path) -> UnixStream {
    let mut s = nbd_connect(dir);
    s.write_all(&option(1, b"")).unwrap();
    let reply = read_some(&mut s, 10);
    assert_eq!(reply.len(), 10, "EXPORT_NAME reply");
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 64 << 20);
    s
}

/// Many requests sent before any reply is read (writes, then reads of
/// what they wrote and of the chain): every cookie is answered once, each
/// read with the right data, whatever order the replies come in.
#[test]
fn pipelined_nbd_requests_are_all_answered_by_cookie() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let mut served = serve_nbd(dir, &[]);
    let mut s = nbd_transmission(dir);
    const COUNT: u64 = 48;
    let mut out = Vec::new();
    for i in 0..COUNT {
        let mut w = request(1, 1000 + i, (8 << 20) + i * 8192, 4096);
        w.extend_from_slice(&[i as u8 + 1; 4096]);
        out.extend_from_slice(&w);
    }
    for i in 0..COUNT {
        out.extend_from_slice(&request(0, 2000 + i, i * 65536, 512));
    }
    s.write_all(&out).unwrap();
    let mut seen = std::collections::HashSet::new();
    while (seen.len() as u64) < 2 * COUNT {
        let reply = read_some(&mut s, 16);
        assert_eq!(reply.len(), 16, "a reply is missing");
        assert_eq!(errno(&reply), 0);
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        let known =
            (1000..1000 + COUNT).contains(&cookie) || (2000..2000 + COUNT).contains(&cookie);
        assert!(known, "unknown cookie {cookie}");
        if cookie >= 2000 {
            // A read's data follows its header (reads may overtake writes).
            let data = read_some(&mut s, 512);
            let expected = if cookie - 2000 < 32 { 0x11 } else { 0 };
            assert!(data.iter().all(|&b| b == expected), "read {cookie}");
        }
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    // Then each write reads back.
    for i in 0..COUNT {
        s.write_all(&request(0, 3000 + i, (8 << 20) + i * 8192, 4096))
            .unwrap();
    }
    let mut back = 0;
    while back < COUNT {
        let reply = read_some(&mut s, 16);
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap()) - 3000;
        let data = read_some(&mut s, 4096);
        assert!(
            data.iter().all(|&b| b == cookie as u8 + 1),
            "write {cookie} did not land"
        );
        back += 1;
    }
    s.write_all(&request(2, 9, 0, 0)).unwrap();
    drop(s);
    served.signal("TERM");
    let (status, err) = served.wait();
    assert!(status.success(), "{status}: {err}");
    check_clean(dir, "top.qcow2");
}

#[test]
fn hostile_nbd_clients_lose_their_connection_and_nothing_else() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let before = snapshot(dir, &["base.qcow2", "top.qcow2"]);
    let mut served = serve_nbd(dir, &[]);

    // Not fixed newstyle: closed.
    let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_some(&mut s, 18);
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(read_some(&mut s, 1).is_empty(), "not closed");

    // An option claiming 1 GiB: closed before anything is allocated.
    let mut s = nbd_connect(dir);
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&m).unwrap();
    assert!(read_some(&mut s, 1).is_empty(), "not closed");

    // An unknown option is refused, and a malformed GO too; the
    // connection goes on.
    let mut s = nbd_connect(dir);
    s.write_all(&option(0x4242, b"")).unwrap();
    let reply = read_some(&mut s, 20);
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        (1 << 31) + 1
    );
    s.write_all(&option(7, &[0, 0, 0, 9])).unwrap();
    let reply = read_some(&mut s, 20);
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        (1 << 31) + 3
    );
    drop(s);

    // Transmission: out of range, too long, unknown command get EINVAL;
    // a bad magic closes.
    let mut s = nbd_transmission(dir);
    for (kind, offset, len) in [
        (0u16, 64u64 << 20, 512u32),
        (0, u64::MAX - 10, 512),
        (0, 0, 64 << 20),
        (4, 63 << 20, 2 << 20),
        (6, u64::MAX, 1),
        (77, 0, 0),
    ] {
        s.write_all(&request(kind, 9, offset, len)).unwrap();
        let reply = read_some(&mut s, 16);
        assert_eq!(reply.len(), 16, "no reply to {kind} {offset} {len}");
        assert_eq!(errno(&reply), 22, "{kind} {offset} {len}");
        assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 9);
    }
    // A write past the end, with its payload: refused, framing kept.
    let mut w = request(1, 10, (64 << 20) - 512, 1024);
    w.extend_from_slice(&[0xee; 1024]);
    s.write_all(&w).unwrap();
    let reply = read_some(&mut s, 16);
    assert_eq!(errno(&reply), 22);
    // A good read still works on this connection.
    s.write_all(&request(0, 11, 0, 4096)).unwrap();
    let reply = read_some(&mut s, 16 + 4096);
    assert_eq!(errno(&reply), 0);
    assert!(reply[16..].iter().all(|&b| b == 0x11), "read data");
    s.write_all(&request(0, 12, 0, 512)[..10]).unwrap();
    s.write_all(b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0")
        .unwrap();
    s.write_all(&0xdead_beefu32.to_be_bytes()).unwrap();
    drop(s);

    // A client that vanishes mid-write.
    let mut s = nbd_transmission(dir);
    let mut w = request(1, 13, 0, 1 << 20);
    w.extend_from_slice(&[0xee; 1000]);
    s.write_all(&w).unwrap();
    drop(s);

    assert!(served.running(), "a hostile client ended the server");
    nbd_io(
        dir,
        "nbd.sock",
        &["read -P 0x11 0 2M", "read -P 0x44 6M 128k"],
    );
    served.stop();
    assert!(
        before == snapshot(dir, &["base.qcow2", "top.qcow2"]),
        "hostile clients changed an image"
    );
    check_clean(dir, "top.qcow2");
}

/// A vhost-user message header: request, flags (version 1), size.
fn vhost_header(request: u32, size: u32) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m
}

/// Starts `serve --vhost-user-blk`, connects as a frontend, sends what
/// `talk` sends, hangs up (after the server exited when `stay`, before
/// otherwise) and returns how the server ended.
fn vhost_frontend(
    dir: &Path,
    stay: bool,
    talk: impl FnOnce(&mut UnixStream),
) -> (ExitStatus, String) {
    let mut served = Served::start(
        dir,
        &["-f", "qcow2", "top.qcow2", "--vhost-user-blk", "vhost.sock"],
        &["vhost.sock"],
    );
    let mut s = UnixStream::connect(dir.join("vhost.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    talk(&mut s);
    if stay {
        let ended = served.wait();
        drop(s);
        return ended;
    }
    drop(s);
    served.wait()
}

#[test]
fn a_broken_vhost_user_frontend_ends_the_serve_cleanly() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let before = snapshot(dir, &["base.qcow2", "top.qcow2"]);

    // An unknown request, the connection kept open: the server ends with
    // the frontend's error.
    // (The server may close as soon as it has read the header: writes to
    // a hostile frontend's socket may fail.)
    let (status, err) = vhost_frontend(dir, true, |s| {
        let _ = s.write_all(&vhost_header(9999, 8));
        let _ = s.write_all(&[0xff; 8]);
    });
    assert_eq!(status.code(), Some(1), "a broken frontend: {status}: {err}");
    assert!(err.contains("vhost-user frontend"), "{err}");

    // A message cut short by a disconnect (its header promises a body
    // that never comes).
    let (status, err) = vhost_frontend(dir, false, |s| {
        let _ = s.write_all(&vhost_header(2, 0x7fff_ffff));
        let _ = s.write_all(&[0xff; 64]);
    });
    assert!(matches!(status.code(), Some(0 | 1)), "{status}: {err}");

    // SET_OWNER, then SET_MEM_TABLE without file descriptors.
    let (status, err) = vhost_frontend(dir, false, |s| {
        let _ = s.write_all(&vhost_header(3, 0));
        let mut table = vhost_header(5, 40);
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        table.extend_from_slice(&[0u8; 32]);
        let _ = s.write_all(&table);
    });
    assert!(matches!(status.code(), Some(0 | 1)), "{status}: {err}");

    // A frontend that asks for the features and leaves: exit 0.
    let (status, err) = vhost_frontend(dir, false, |s| {
        s.write_all(&vhost_header(1, 0)).unwrap();
        let reply = read_some(s, 20);
        assert_eq!(reply.len(), 20, "GET_FEATURES reply");
        let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
        assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1: {features:#x}");
        assert_ne!(features & (1 << 9), 0, "VIRTIO_BLK_F_FLUSH: {features:#x}");
        assert_ne!(
            features & (1 << 29),
            0,
            "VIRTIO_RING_F_EVENT_IDX: {features:#x}"
        );
    });
    assert!(
        status.success(),
        "after a clean disconnect: {status}: {err}"
    );

    assert!(
        before == snapshot(dir, &["base.qcow2", "top.qcow2"]),
        "a frontend changed an image"
    );
    check_clean(dir, "top.qcow2");
}

/// `-t none`: the export bypasses the page cache for aligned transfers;
/// aligned and unaligned writes land as qemu-io wrote them.
#[test]
fn cache_mode_none_serves_the_same_bytes() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let mut served = serve_nbd(dir, &["-t", "none"]);
    nbd_io(
        dir,
        "nbd.sock",
        &["write -P 0x61 1M 64k", "write -P 0x62 3000 5000", "flush"],
    );
    nbd_io(
        dir,
        "nbd.sock",
        &["read -P 0x61 1M 64k", "read -P 0x62 3000 5000"],
    );
    served.signal("TERM");
    let (status, err) = served.wait();
    assert!(status.success(), "{status}: {err}");
    check_clean(dir, "top.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["read -P 0x61 1M 64k", "read -P 0x62 3000 5000"],
    );
}

#[test]
fn bad_arguments_are_refused() {
    let tmp = chain_dir();
    let dir = tmp.path();
    for args in [
        &["serve", "top.qcow2"][..],
        &["serve", "--nbd", "x.sock"],
        &["serve", "top.qcow2", "--nbd"],
        &["serve", "top.qcow2", "--nbd", "x.sock", "--num-queues", "0"],
        &["serve", "top.qcow2", "--nbd", "x.sock", "--bogus"],
        &["serve", "missing.qcow2", "--nbd", "x.sock"],
        &["serve", "-f", "raw", "top.qcow2", "--nbd", "top.qcow2"],
        &["serve", "-t", "directsync", "top.qcow2", "--nbd", "x.sock"],
    ] {
        common::bg_refused(dir, args);
    }
    assert!(!dir.join("x.sock").exists());
    check_clean(dir, "top.qcow2");
}

/// A read-only qemu-storage-daemon NBD export of the chain in `dir` on
/// `socket` (export name `disk`); killed when dropped.
struct QsdNbd(Child);

impl QsdNbd {
    fn start(dir: &Path, socket: &str) -> Self {
        let mut args: Vec<String> = Vec::new();
        let mut below: Option<&str> = None;
        for node in ["base", "top"] {
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name={node}-file,filename={node}.qcow2,read-only=on"
            ));
            let backing = below.map_or("null".to_owned(), |b| format!("\"{b}\""));
            args.push("--blockdev".into());
            args.push(format!(
                "{{\"driver\":\"qcow2\",\"node-name\":\"{node}\",\"file\":\"{node}-file\",\
                 \"backing\":{backing},\"read-only\":true}}"
            ));
            below = Some(node);
        }
        args.extend([
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={socket}"),
            "--export".into(),
            "type=nbd,id=e0,node-name=top,name=disk".into(),
        ]);
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("this test needs qemu-storage-daemon on PATH; it never skips");
        let started = Instant::now();
        while !dir.join(socket).exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "QSD made no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for QsdNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads one option reply: its type and data.
fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let head = read_some(s, 20);
    assert_eq!(head.len(), 20, "an option reply");
    assert_eq!(
        head[..8],
        0x0003_e889_0455_65a9u64.to_be_bytes(),
        "reply magic"
    );
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    (kind, read_some(s, len))
}

/// Reads one structured reply chunk for `cookie`: flags, type, payload.
fn chunk(s: &mut UnixStream, cookie: u64) -> (u16, u16, Vec<u8>) {
    let head = read_some(s, 20);
    assert_eq!(head.len(), 20, "a structured reply chunk");
    assert_eq!(head[..4], 0x668e_33efu32.to_be_bytes(), "chunk magic");
    assert_eq!(head[8..16], cookie.to_be_bytes(), "cookie");
    let flags = u16::from_be_bytes(head[4..6].try_into().unwrap());
    let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    (flags, kind, read_some(s, len))
}

/// Structured replies and `base:allocation` block status: `qemu-img map`
/// through the export equals `qemu-img map` through qemu-storage-daemon's
/// export of the same chain, `qemu-img convert` reads it (structured
/// reads) as qemu-img reads the chain; and on the wire, with a client of
/// our own: the negotiation, a block status of the whole export (extents
/// covering it, data where the chain stores it, holes that read as zeros),
/// one extent with `REQ_ONE`, a read as one `OFFSET_DATA` chunk, a refused
/// read as an `ERROR` chunk, block status without the context refused.
#[test]
fn nbd_block_status_and_structured_reads_match_qemu_storage_daemon() {
    let tmp = chain_dir();
    let dir = tmp.path();
    qemu_io(dir, "qcow2", "top.qcow2", &["write -z 10M 1M"]);
    let mut served = serve_nbd(dir, &["--read-only"]);
    let qsd = QsdNbd::start(dir, "qsd.sock");
    let map = |uri: &str| qemu_img(dir, &["map", "--output=json", "-f", "raw", uri]);
    let ours = map(&nbd_uri("nbd.sock"));
    assert_eq!(
        ours,
        map("nbd+unix:///disk?socket=qsd.sock"),
        "qemu-img map through blockgraph's and QSD's exports"
    );
    assert!(
        ours.contains("\"zero\": true") && ours.contains("\"data\": true"),
        "{ours}"
    );
    drop(qsd);
    let uri = nbd_uri("nbd.sock");
    qemu_img(
        dir,
        &["convert", "-f", "raw", "-O", "raw", &uri, "served.raw"],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "top.qcow2",
            "view.raw",
        ],
    );
    assert!(
        fs::read(dir.join("served.raw")).unwrap() == fs::read(dir.join("view.raw")).unwrap(),
        "the export's bytes differ from the chain's view"
    );

    let mut s = nbd_connect(dir);
    s.write_all(&option(8, b"")).unwrap();
    assert_eq!(option_reply(&mut s).0, 1, "STRUCTURED_REPLY acknowledged");
    let mut set = 0u32.to_be_bytes().to_vec();
    set.extend_from_slice(&1u32.to_be_bytes());
    set.extend_from_slice(&15u32.to_be_bytes());
    set.extend_from_slice(b"base:allocation");
    s.write_all(&option(10, &set)).unwrap();
    let (kind, context) = option_reply(&mut s);
    assert_eq!(kind, 4, "META_CONTEXT");
    let id = context[..4].to_vec();
    assert_eq!(&context[4..], b"base:allocation");
    assert_eq!(option_reply(&mut s).0, 1, "SET_META_CONTEXT acknowledged");
    s.write_all(&option(7, &[0, 0, 0, 0, 0, 0])).unwrap();
    while option_reply(&mut s).0 != 1 {}

    s.write_all(&request(7, 1, 0, 64 << 20)).unwrap();
    let (flags, kind, payload) = chunk(&mut s, 1);
    assert_eq!((flags, kind), (1, 5), "one BLOCK_STATUS chunk, done");
    assert_eq!(payload[..4], id[..], "the context's id");
    let extents: Vec<(u64, u32)> = payload[4..]
        .chunks(8)
        .map(|e| {
            let len = u32::from_be_bytes(e[..4].try_into().unwrap());
            (
                u64::from(len),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        extents.iter().map(|e| e.0).sum::<u64>(),
        64 << 20,
        "{extents:?}"
    );
    let flags_at = |at: u64| {
        let mut start = 0;
        extents
            .iter()
            .find(|(len, _)| {
                start += len;
                at < start
            })
            .unwrap()
            .1
    };
    // base's data, top's data, top's zero clusters, nothing.
    assert_eq!(
        [
            flags_at(0),
            flags_at(6 << 20),
            flags_at(10 << 20),
            flags_at(40 << 20)
        ],
        [0, 0, 3, 3],
        "{extents:?}"
    );
    let mut one = request(7, 2, 1 << 20, 16 << 20);
    one[4..6].copy_from_slice(&(1u16 << 3).to_be_bytes());
    s.write_all(&one).unwrap();
    let (_, kind, payload) = chunk(&mut s, 2);
    assert_eq!((kind, payload.len()), (5, 12), "REQ_ONE: one extent");
    assert_eq!(payload[4..], [0, 0x10, 0, 0, 0, 0, 0, 0], "1 MiB of data");

    s.write_all(&request(0, 3, 4096, 4096)).unwrap();
    let (flags, kind, payload) = chunk(&mut s, 3);
    assert_eq!(
        (flags, kind, payload.len()),
        (1, 1, 8 + 4096),
        "OFFSET_DATA"
    );
    assert_eq!(payload[..8], 4096u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x11));
    s.write_all(&request(0, 4, 64 << 20, 4096)).unwrap();
    let (flags, kind, payload) = chunk(&mut s, 4);
    assert_eq!((flags, kind), (1, 0x8001), "an ERROR chunk");
    assert_eq!(payload, [0, 0, 0, 22, 0, 0], "EINVAL, no message");
    drop(s);

    // Without the context, block status is refused.
    let mut s = nbd_transmission(dir);
    s.write_all(&request(7, 5, 0, 4096)).unwrap();
    assert_eq!(errno(&read_some(&mut s, 16)), 22, "EINVAL");
    drop(s);
    served.stop();
}

/// Jobs started over QMP run to their end with no guest or NBD request
/// making the serve loop poll: a stream's copies in flight are collected
/// and an active commit's runs carried on all the same (they once waited
/// forever for a request to come): a snapshot, a stream into it, then an
/// active commit of it into base, completed (the export pivots to base).
#[test]
fn qmp_jobs_finish_without_guest_requests() {
    let tmp = chain_dir();
    let dir = tmp.path();
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -z 8M 1M", "write -P 0x55 20M 4M"],
    );
    let mut served = serve_nbd(dir, &["--qmp", "qmp.sock"]);
    let (mut writer, mut reader) = qmp_connect(dir, 20);
    let mut send = |command: &str, until: Option<&str>| {
        writer.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answered = false;
        loop {
            let line = qmp_line(&mut reader);
            assert!(!line.is_empty(), "{command}: the connection ended");
            assert!(!line.contains("\"error\""), "{command}: {line}");
            answered |= !line.contains("\"event\"");
            // Nothing else is sent meanwhile: the job must go on alone.
            if answered && until.is_none_or(|event| line.contains(event)) {
                break;
            }
        }
    };
    send(r#"{"execute": "qmp_capabilities"}"#, None);
    send(
        r#"{"execute": "blockdev-snapshot-sync", "arguments": {"node-name": "top", "snapshot-file": "snap.qcow2", "snapshot-node-name": "snap", "format": "qcow2"}}"#,
        None,
    );
    send(
        r#"{"execute": "block-stream", "arguments": {"job-id": "s0", "device": "snap", "base-node": "base", "backing-file": "base.qcow2"}}"#,
        Some("BLOCK_JOB_COMPLETED"),
    );
    send(
        r#"{"execute": "block-commit", "arguments": {"job-id": "c0", "device": "snap"}}"#,
        Some("BLOCK_JOB_READY"),
    );
    send(
        r#"{"execute": "job-complete", "arguments": {"id": "c0"}}"#,
        Some("BLOCK_JOB_COMPLETED"),
    );
    send(r#"{"execute": "quit"}"#, None);
    let (status, err) = served.wait();
    assert!(status.success(), "serve after quit: {status}: {err}");
    check_clean(dir, "base.qcow2");
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &[
            "read -P 0x11 0 2M",
            "read -P 0x44 6M 128k",
            "read -P 0 8M 1M",
            "read -P 0x55 20M 4M",
        ],
    );
}

/// With a monitor, a vhost-user frontend that breaks the protocol is
/// dropped, as qemu-storage-daemon drops it, and the socket serves the
/// next one (which gets its features); QMP `quit` then ends the serve
/// with exit 0 and the images as they were.
#[test]
fn with_a_monitor_a_broken_frontend_is_dropped_and_the_next_served() {
    let tmp = chain_dir();
    let dir = tmp.path();
    let before = snapshot(dir, &["base.qcow2", "top.qcow2"]);
    let mut served = Served::start(
        dir,
        &[
            "-f",
            "qcow2",
            "top.qcow2",
            "--vhost-user-blk",
            "vhost.sock",
            "--qmp",
            "qmp.sock",
        ],
        &["vhost.sock", "qmp.sock"],
    );
    let mut broken = UnixStream::connect(dir.join("vhost.sock")).unwrap();
    broken
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = broken.write_all(&vhost_header(9999, 8));
    let _ = broken.write_all(&[0xff; 8]);
    // The server hangs up on it.
    assert!(
        read_some(&mut broken, 1).is_empty(),
        "the broken frontend was kept"
    );
    assert!(served.running(), "a broken frontend ended the serve");
    let mut next = UnixStream::connect(dir.join("vhost.sock")).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    next.write_all(&vhost_header(1, 0)).unwrap();
    assert_eq!(read_some(&mut next, 20).len(), 20, "GET_FEATURES reply");
    drop(next);
    let (mut writer, _reader) = qmp_connect(dir, 10);
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"quit\"}\n")
        .unwrap();
    let (status, err) = served.wait();
    assert!(status.success(), "serve after quit: {status}: {err}");
    assert!(err.contains("vhost-user frontend dropped"), "{err}");
    assert!(
        before == snapshot(dir, &["base.qcow2", "top.qcow2"]),
        "a frontend changed an image"
    );
}
