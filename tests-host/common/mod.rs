//! Helpers shared by the host integration tests in `tests-host/`: running
//! `blockgraph`, `qemu-img` and `qemu-io` in a test's temporary directory,
//! showing a command and its output in assertion messages, and small file
//! and byte helpers.
//!
//! Every test crate includes this module with `mod common;` and uses only
//! part of it. A program that cannot be started fails the test with a clear
//! message: a missing QEMU tool never makes a test skip.

#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

/// The `blockgraph` binary built for these tests.
pub const BLOCKGRAPH: &str = env!("CARGO_BIN_EXE_blockgraph");
/// QEMU's image tool, the oracle for image contents and metadata.
pub const QEMU_IMG: &str = "qemu-img";
/// QEMU's I/O tool, the oracle for guest reads and writes.
pub const QEMU_IO: &str = "qemu-io";

/// A fresh temporary directory whose name starts with `prefix`; removed when
/// the returned guard is dropped.
pub fn tmpdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

/// A fresh temporary directory whose name starts with `prefix`, on tmpfs
/// (`/dev/shm`) when there is one: tests that flush (fdatasync) on every
/// allocating write are slow on a disk.
pub fn shm_tmpdir(prefix: &str) -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix(prefix).tempdir_in(shm) {
            return dir;
        }
    }
    tmpdir(prefix)
}

/// Runs `prog args` with `dir` as its current directory and returns what it
/// did. A program that cannot be started fails the test: the oracle must be
/// installed, never skipped.
pub fn run(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}): these tests need qemu-img and qemu-io on PATH \
                 (Debian: apt-get install qemu-utils), the blockgraph binary and, for \
                 jobs_cli, script (util-linux); they never skip"
            )
        })
}

/// A command, its directory, exit status, stdout and stderr, for assertion
/// messages. Empty arguments and arguments with spaces are quoted; arguments
/// longer than 200 bytes are shown as `<N bytes>`.
pub fn render(dir: &Path, prog: &str, args: &[&str], out: &Output) -> String {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.len() > 200 {
                format!("<{} bytes>", a.len())
            } else if a.is_empty() || a.contains(' ') {
                format!("\"{a}\"")
            } else {
                (*a).to_string()
            }
        })
        .collect();
    format!(
        "`{prog} {}` in {}\n  status: {}\n  stdout: {}\n  stderr: {}",
        shown.join(" "),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end(),
    )
}

/// Runs a command that must exit 0 and print UTF-8; returns its stdout.
pub fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = run(dir, prog, args);
    assert!(
        out.status.success(),
        "command failed: {}",
        render(dir, prog, args, &out)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("`{prog}` printed non-UTF-8: {e}"))
}

/// `qemu-img args` in `dir`; it must exit 0. Returns its stdout.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    ok(dir, QEMU_IMG, args)
}

/// `qemu-io -f FMT -c CMD... IMG` in `dir`: it must exit 0 and no command may
/// report "failed" or "error" (qemu-io exits 0 when a command fails, a
/// pattern mismatch included). Returns its stdout.
pub fn qemu_io<S: AsRef<str>>(dir: &Path, fmt: &str, img: &str, cmds: &[S]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(img);
    let out = ok(dir, QEMU_IO, &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure: {}:\n{out}",
        args.join(" ")
    );
    out
}

/// Runs `blockgraph args` in `dir`, whatever its outcome.
pub fn bg(dir: &Path, args: &[&str]) -> Output {
    run(dir, BLOCKGRAPH, args)
}

/// Runs `blockgraph args` in `dir`; it must exit 0. Returns its stdout.
pub fn bg_ok(dir: &Path, args: &[&str]) -> String {
    ok(dir, BLOCKGRAPH, args)
}

/// Runs `blockgraph args` in `dir` expecting a clean refusal: no panic, exit
/// status exactly 1 (a panic exits 101) and exactly one line on stderr.
/// Returns stderr.
pub fn bg_refused(dir: &Path, args: &[&str]) -> String {
    let out = bg(dir, args);
    let shown = render(dir, BLOCKGRAPH, args, &out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "blockgraph panicked: {shown}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refusal with exit status 1: {shown}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected exactly one error line on stderr: {shown}"
    );
    err
}

/// `qemu-img compare` of the qcow2 images `a` and `b` (paths from `dir`)
/// must find their guest views equal; `what` names the case.
pub fn qemu_compare(dir: &Path, a: &str, b: &str, what: &str) {
    let args = ["compare", "-f", "qcow2", "-F", "qcow2", a, b];
    let out = run(dir, QEMU_IMG, &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}",
        render(dir, QEMU_IMG, &args, &out)
    );
}

/// The number after `"key": ` in a qemu-img map JSON entry.
fn json_number(entry: &str, key: &str) -> Option<u64> {
    let at = entry.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = entry[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The data extents of the qcow2 image `img` itself (depth 0), as
/// `qemu-img map` reports them: guest start, length, host offset.
pub fn own_data_extents(dir: &Path, img: &str) -> Vec<(u64, u64, u64)> {
    let map = qemu_img(dir, &["map", "--output=json", "-f", "qcow2", img]);
    map.split('{')
        .skip(1)
        .filter(|e| e.contains("\"data\": true") && json_number(e, "depth") == Some(0))
        .map(|e| {
            let field = |k| json_number(e, k).unwrap_or_else(|| panic!("no {k} in {e}"));
            (field("start"), field("length"), field("offset"))
        })
        .collect()
}

/// Copies the directory `src` to `dst` with everything below it; `dst` is
/// created if missing.
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            fs::copy(&path, &target).unwrap();
        }
    }
}

/// The big-endian `u32` at byte offset `at` of `bytes`.
pub fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// The big-endian `u64` at byte offset `at` of `bytes`.
pub fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A seeded xorshift64 generator: reproducible random test inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (not 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` zero bytes aligned to 4 KiB (`O_DIRECT` takes them), leaked:
/// buffers of requests in flight on host files must be `'static`
/// (`FileDevice`'s io_uring queue may use them until they complete).
#[allow(dead_code)]
pub fn leaked_buffer(len: usize) -> &'static mut [u8] {
    const ALIGN: usize = 4096;
    let memory = Box::leak(vec![0u8; len + ALIGN].into_boxed_slice());
    let skip = memory.as_ptr().align_offset(ALIGN);
    &mut memory[skip..skip + len]
}

/// Runs a test body on a thread with a large stack (graphs are built on the
/// stack before they are boxed, and a 256-node graph is large); its panic
/// is the test's.
#[allow(dead_code)]
pub fn big_stack(body: impl FnOnce() + Send + 'static) {
    let worker = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(body)
        .expect("spawn the test thread");
    if let Err(payload) = worker.join() {
        std::panic::resume_unwind(payload);
    }
}
