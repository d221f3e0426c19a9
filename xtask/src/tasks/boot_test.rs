//! Boot tests: the kernel under QEMU, run by `cargo xtask test` last.
//!
//! Four boots, with TCG (well under a second each here):
//!
//! 1. microvm, command line `selftest`, a writable and a read-only raw disk;
//! 2. the same on q35 (virtio-pci);
//! 3. microvm with `fail-on-purpose`: the kernel panics, and the run must
//!    end in a kernel failure (exit status 35), never in a success;
//! 4. microvm with `fault-on-purpose`: the CPU triple-faults, QEMU exits with
//!    status 0, and that must not count as a success either.
//!
//! After each self-check the disk files are read on the host: the kernel's
//! pattern must be in the writable file where it wrote, and the read-only
//! file must be untouched.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::qemu::{self, Boot, BootResult, Disk, Machine, Profile, KERNEL_FAILURE};
use crate::{Context, Error, Result, Workspace};

/// One boot may take this long (they take well under a second with TCG).
const TIMEOUT: Duration = Duration::from_secs(30);

const RW_SIZE: u64 = 1024 * 1024;
const RO_SIZE: u64 = 768 * 1024;

/// The byte the kernel's self-check writes at disk offset `p` (see
/// `targets/x86_64-qemu/src/selftest.rs`).
fn pattern(p: u64) -> u8 {
    (p.wrapping_mul(7) % 251 + 1) as u8
}

pub fn run(ws: &Workspace) -> Result<()> {
    println!("==> boot tests");
    let started = Instant::now();
    let kernel = qemu::build_kernel(ws, Profile::Release)?;
    let dir = ws.target_dir.join("boot-test");
    if dir.exists() {
        fs::remove_dir_all(&dir).context(format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;

    let mut failures = Vec::new();
    for machine in [Machine::Microvm, Machine::Q35] {
        let name = format!("selftest on {machine}");
        let outcome = selftest(&kernel, &dir, machine);
        report(&name, outcome, &mut failures);
    }
    report(
        "fail-on-purpose on microvm fails",
        must_fail(
            &kernel,
            "fail-on-purpose",
            KERNEL_FAILURE,
            "kernel panicked",
        ),
        &mut failures,
    );
    report(
        "fault-on-purpose on microvm fails",
        must_fail(
            &kernel,
            "fault-on-purpose",
            0,
            "command line: \"fault-on-purpose\"",
        ),
        &mut failures,
    );

    let secs = started.elapsed().as_secs_f64();
    let total = 4;
    if failures.is_empty() {
        println!("boot tests: {total} passed, 0 failed ({secs:.1} s)");
        Ok(())
    } else {
        println!(
            "boot tests: {} passed, {} failed ({secs:.1} s)",
            total - failures.len(),
            failures.len()
        );
        Err(Error::msg(format!(
            "boot tests failed: {}",
            failures.join("; ")
        )))
    }
}

fn report(name: &str, outcome: Result<BootResult>, failures: &mut Vec<String>) {
    match outcome {
        Ok(result) => println!("    PASS  {name}: {}", result.verdict()),
        Err(err) => {
            println!("    FAIL  {name}: {err}");
            failures.push(name.to_owned());
        }
    }
}

/// The boot's output and QEMU's messages, indented under a failure.
fn transcript(result: &BootResult) -> String {
    let mut text = String::new();
    for line in result.serial.lines().chain(result.stderr.lines()) {
        text.push_str("\n        | ");
        text.push_str(line);
    }
    text
}

fn create_disk(path: &Path, size: u64) -> Result<()> {
    let file = fs::File::create(path).context(format!("creating {}", path.display()))?;
    file.set_len(size)
        .context(format!("sizing {}", path.display()))
}

fn selftest(kernel: &Path, dir: &Path, machine: Machine) -> Result<BootResult> {
    let rw = dir.join(format!("{machine}-rw.raw"));
    let ro = dir.join(format!("{machine}-ro.raw"));
    create_disk(&rw, RW_SIZE)?;
    create_disk(&ro, RO_SIZE)?;
    let mut boot = Boot::new(machine);
    boot.cmdline = "selftest".into();
    boot.timeout = TIMEOUT;
    boot.disks = vec![
        Disk {
            path: rw.clone(),
            read_only: false,
        },
        Disk {
            path: ro.clone(),
            read_only: true,
        },
    ];
    let result = qemu::boot(kernel, &boot)?;
    let fail = |what: String| Err(Error::msg(format!("{what}{}", transcript(&result))));
    if !result.succeeded() {
        return fail(result.verdict());
    }
    let expected = [
        format!("disk 0: serial={machine}-rw.raw size={RW_SIZE} ro=false"),
        format!("disk 1: serial={machine}-ro.raw size={RO_SIZE} ro=true"),
        "selftest ok".to_owned(),
    ];
    for line in &expected {
        if !result.serial.lines().any(|l| l == line) {
            return fail(format!("no line `{line}` in the serial output"));
        }
    }
    // What reached the files.
    let data = read(&rw)?;
    let end = data.len() as u64;
    let regions = [(777, 1777), (end - 3, end)];
    for (start, stop) in regions {
        if let Some(p) = (start..stop).find(|&p| data[p as usize] != pattern(p)) {
            return fail(format!(
                "{}: byte {p} is {:#04x}, the kernel wrote {:#04x}",
                rw.display(),
                data[p as usize],
                pattern(p)
            ));
        }
    }
    if let Some(p) = read(&ro)?.iter().position(|&b| b != 0) {
        return fail(format!(
            "{}: the read-only disk was written at {p}",
            ro.display()
        ));
    }
    Ok(result)
}

/// Boots with `cmdline`, which must not succeed: QEMU must exit with
/// `want_code` and the serial output must contain `want_text`.
fn must_fail(kernel: &Path, cmdline: &str, want_code: i32, want_text: &str) -> Result<BootResult> {
    let mut boot = Boot::new(Machine::Microvm);
    boot.cmdline = cmdline.into();
    boot.timeout = TIMEOUT;
    let result = qemu::boot(kernel, &boot)?;
    let code = result.status.and_then(|s| s.code());
    if result.succeeded() || code != Some(want_code) {
        return Err(Error::msg(format!(
            "want QEMU exit status {want_code}, got: {}{}",
            result.verdict(),
            transcript(&result)
        )));
    }
    if !result.serial.contains(want_text) {
        return Err(Error::msg(format!(
            "`{want_text}` is missing from the serial output{}",
            transcript(&result)
        )));
    }
    Ok(result)
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    fs::read(path).context(format!("reading {}", path.display()))
}
