//! Boot tests: the kernel under QEMU, run by `cargo xtask test` last.
//!
//! Kernel checks, with TCG (well under a second each here):
//!
//! 1. `selftest` on microvm and on q35 (virtio-pci), under
//!    `-accel kvm -accel tcg`, with a writable and a
//!    read-only raw disk; afterwards the files are read on the host: the
//!    kernel's pattern must be where it wrote, the read-only file untouched;
//!    the kernel must report its static graph in `.bss`;
//! 2. `fail-on-purpose` (a panic) must end in a kernel failure (exit status
//!    35), never in a success;
//! 3. `fault-on-purpose` (an invalid opcode): the exception handler reports
//!    it ("CPU exception 6 ...") and the kernel fails (exit status 35);
//! 4. `triple-fault-on-purpose` (the same with the IDT removed): QEMU exits
//!    with status 0, and that must not count as a success either.
//!
//! Then the image tests, each on microvm and on q35, each in a fresh
//! directory `target/boot-tests/NAME-MACHINE/` (a [`Lab`]): qemu-img and
//! qemu-io build the images, files the kernel writes are padded (a virtio
//! disk cannot grow), the kernel runs a script on them, the exit status
//! says whether it must have succeeded, and the host verifies the files
//! with qemu-img/qemu-io afterwards:
//!
//! | test | the kernel | the host checks |
//! |---|---|---|
//! | chain reads | pattern reads of every byte through a 3-image chain (compressed base, 16k clusters, a v2 top), read-only disks | checksum, files untouched, `check` |
//! | writes vs qemu-io | writes, zero writes, discards of all alignments | `compare` with a copy qemu-io wrote the same way, checksum, `check` |
//! | intermediate commit | `commit --top mid --base base top` (base grows) | `compare` base and top with `qemu-img commit` + `rebase -u` on copies, the chain, mid untouched |
//! | active commit | `job-start commit`, guest writes while running and while ready, `job-complete`, pivot, writes after it | `compare` base with a copy: qemu-io writes + `qemu-img commit` + writes; base has no backing file |
//! | stream | `job-start stream --base`, guest writes while it runs | `compare` with a copy: writes + `qemu-img rebase` (safe); the chain |
//! | collapse | `collapse --top mid --base base top` | `compare` with `qemu-img rebase -u` on a copy; the chain; base and mid untouched |
//! | live snapshot | `snapshot s3 new` onto a blank 8 MiB disk, writes to new | new is an overlay of s3 (`compare` with qemu-img create + qemu-io), s3 and base untouched |
//! | read-only disk | reads and checksum succeed, a write fails | files byte-identical |
//! | no space | a write needing more room than the disk has fails ("no space"); a second boot writes what fits | `check` finds no corruption (leaks are reported), the old data reads back, the second write equals qemu-io's |
//! | wrong pattern | a pattern read of other data fails | "Pattern verification failed", files untouched |
//! | probed raw | a qcow2 magic built byte by byte on a probed raw disk is refused; named raw, written | the first bytes |
//! | requests in flight | `bench -w -d 32` allocating, then in place (32 virtio requests in flight), at depth 64 (beyond the ring) and unaligned; `bench -d 32` reads, `checksum -d 32` | `compare` with `qemu-img bench` on a copy, `check`, the checksum, 42 requests in flight on the disk at once (its ring's capacity) |
//! | requests in flight, small ring | the same on a disk with `queue-size=16` | the same, 5 requests in flight |
//! | stack check | `stack-check`: a VMM's flow straight through the library (open, every request kind, requests in flight, snapshots, collapse, commit, stream, two active commits), the stack of each call measured against its budget | the guest writes it prints, replayed with qemu-io on a copy of the chain, equal the final base; `check`; the chain |
//!
//! Then the served tests, on microvm and q35 as well: the kernel's disk is
//! no file but the guest view of a qcow2 chain that `blockgraph serve`
//! exports over vhost-user-blk (the CLI built as `cargo xtask guest` builds
//! it, started and stopped by that harness's [`server`] code):
//!
//! | test | the kernel | the host checks |
//! |---|---|---|
//! | served chain | on the raw disk (`image-format top raw`): `checksum -d 32`, `bench -w` at depths 32 and 64 (42 requests in flight: the ring's capacity), unaligned, an `io` write and flush, `checksum -d 32` again; then QMP `quit` | the first checksum = the chain's view before, the second = after; `compare` with `qemu-img bench`/qemu-io on a copy; `read -P` of the writes; `check`; base untouched |
//! | served snapshot | the same after QMP `blockdev-snapshot-sync` top -> snap (before the boot) | the same on snap.qcow2 (chain snap -> top -> base); top and base untouched |
//! | served reconnect | two boots on one server, one after the other on the same socket: an `io` write and flush, then in a new QEMU `io` `read -P` of it and `checksum -d 32`; then QMP `quit` | the second boot read the data back; its checksum = the chain's view; the write in top; `check` |
//!
//! vhost-user needs the guest's RAM shared: the boot gets a memfd memory
//! backend and `vhost-user-blk-pci` (q35) or `vhost-user-blk` on microvm's
//! virtio-mmio (microvm has no PCI bus for `vhost-user-blk-pci`); see
//! [`qemu::VhostUser`].
//!
//! Checksums: the kernel's `checksum NAME` line (FNV-1a 64 of the guest
//! view) must equal the FNV-1a 64 of `qemu-img convert -O raw` computed on
//! the host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::guest::qmp::Qmp;
use super::guest::scenario;
use super::guest::server::{self, Export, Node, Server};
use super::lab::{checksums, io_command, pattern_reads, Lab, Layout, MIB};
use super::qemu::{
    self, Accel, Boot, BootResult, Disk, Machine, Profile, VhostUser, KERNEL_FAILURE,
};
use super::read_file as read;
use crate::cmd::{indented, Background};
use crate::{Context, Error, Result, Workspace};

/// One boot may take this long (they take well under a second with TCG).
const TIMEOUT: Duration = Duration::from_secs(30);

const RW_SIZE: u64 = 1024 * 1024;
const RO_SIZE: u64 = 768 * 1024;

/// The virtual size of the image tests' images.
const SIZE: u64 = 16 * MIB;
/// Files the kernel may grow are padded to this size.
const PAD: u64 = 32 * MIB;

const MACHINES: [Machine; 2] = [Machine::Microvm, Machine::Q35];

/// An image test: a name (also its directory) and the test.
type ImageTest = (&'static str, fn(&Lab) -> Result<String>);

const IMAGE_TESTS: [ImageTest; 17] = [
    ("chain-reads", chain_reads),
    ("writes-vs-qemu-io", writes_vs_qemu_io),
    ("extended-l2-writes", extended_l2_writes),
    ("data-file-writes", data_file_writes),
    ("intermediate-commit", intermediate_commit),
    ("active-commit", active_commit),
    ("stream", stream),
    ("collapse", collapse),
    ("live-snapshot", live_snapshot),
    ("read-only-disk", read_only_disk),
    ("no-space", no_space),
    ("wrong-pattern", wrong_pattern),
    ("probed-raw", probed_raw),
    ("requests-in-flight", requests_in_flight),
    (
        "requests-in-flight-small-ring",
        requests_in_flight_small_ring,
    ),
    ("active-commit-under-load", active_commit_under_load),
    ("stack-check", stack_check),
];

/// A test on a disk `blockgraph serve` exports: the lab and the CLI.
type ServedTest = (&'static str, fn(&Lab, &Path) -> Result<String>);

const SERVED_TESTS: [ServedTest; 3] = [
    ("served-chain", served_chain),
    ("served-snapshot", served_snapshot),
    ("served-reconnect", served_reconnect),
];

/// The byte the kernel's self-check writes at disk offset `p` (see
/// `targets/x86_64-qemu/src/selftest.rs`).
fn pattern(p: u64) -> u8 {
    (p.wrapping_mul(7) % 251 + 1) as u8
}

/// Runs the boot tests; with `filter`, only those whose name contains it.
pub fn run(ws: &Workspace, filter: Option<&str>) -> Result<()> {
    println!("==> boot tests");
    let started = Instant::now();
    let kernel = qemu::build_kernel(ws, Profile::Release)?;
    let root = ws.target_dir.join("boot-tests");
    if root.exists() {
        fs::remove_dir_all(&root).context(format!("removing {}", root.display()))?;
    }
    let selftest_dir = root.join("selftest");
    fs::create_dir_all(&selftest_dir).context(format!("creating {}", selftest_dir.display()))?;

    let mut tally = Tally {
        filter,
        ..Tally::default()
    };
    for machine in MACHINES {
        tally.run(&format!("selftest on {machine}"), || {
            selftest(&kernel, &selftest_dir, machine).map(|r| r.verdict())
        });
    }
    tally.run("fail-on-purpose on microvm fails", || {
        must_fail(
            &kernel,
            "fail-on-purpose",
            KERNEL_FAILURE,
            "kernel panicked",
        )
        .map(|r| r.verdict())
    });
    tally.run("fault-on-purpose on microvm fails", || {
        must_fail(
            &kernel,
            "fault-on-purpose",
            KERNEL_FAILURE,
            "CPU exception 6 (#UD invalid opcode) at rip ",
        )
        .map(|r| r.verdict())
    });
    tally.run("triple-fault-on-purpose on microvm fails", || {
        must_fail(
            &kernel,
            "triple-fault-on-purpose",
            0,
            "command line: \"triple-fault-on-purpose\"",
        )
        .map(|r| r.verdict())
    });
    for (name, test) in IMAGE_TESTS {
        for machine in MACHINES {
            tally.run(&format!("{name} on {machine}"), || {
                let mut lab = Lab::fresh(root.join(format!("{name}-{machine}")), &kernel, machine)?;
                lab.timeout = TIMEOUT;
                test(&lab)
            });
        }
    }

    let served = |name: &str, machine: Machine| format!("{name} on {machine}");
    let wanted = SERVED_TESTS.iter().any(|(name, _)| {
        MACHINES
            .iter()
            .any(|&machine| tally.selects(&served(name, machine)))
    });
    if wanted {
        let cli = super::build_cli(ws, false)?;
        for (name, test) in SERVED_TESTS {
            for machine in MACHINES {
                tally.run(&served(name, machine), || {
                    let mut lab =
                        Lab::fresh(root.join(format!("{name}-{machine}")), &kernel, machine)?;
                    lab.timeout = TIMEOUT;
                    test(&lab, &cli)
                });
            }
        }
    } else {
        tally.left_out += SERVED_TESTS.len() * MACHINES.len();
    }

    println!(
        "boot tests took {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        root.display()
    );
    let failed = tally.failures.len();
    println!(
        "boot tests: {} passed, {failed} failed, {} left out by the filter",
        tally.passed, tally.left_out
    );
    if tally.passed + failed == 0 {
        return Err(Error::msg("no boot test matches the filter"));
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "boot tests failed: {}",
            tally.failures.join("; ")
        )))
    }
}

/// Runs tests, printing one line each.
#[derive(Default)]
struct Tally<'f> {
    /// Only tests whose name contains this run.
    filter: Option<&'f str>,
    passed: usize,
    left_out: usize,
    failures: Vec<String>,
}

impl Tally<'_> {
    /// Whether the filter lets the test named `name` run.
    fn selects(&self, name: &str) -> bool {
        self.filter.is_none_or(|filter| name.contains(filter))
    }

    /// Runs one test (unless the filter leaves it out); `Ok` carries a note
    /// for its line.
    fn run(&mut self, name: &str, test: impl FnOnce() -> Result<String>) {
        if !self.selects(name) {
            self.left_out += 1;
            return;
        }
        let started = Instant::now();
        let outcome = test();
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(note) => {
                self.passed += 1;
                println!("    PASS  {name} ({secs:.2} s): {note}");
            }
            Err(err) => {
                println!("    FAIL  {name} ({secs:.2} s): {err}");
                self.failures.push(name.to_owned());
            }
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
    // These two boots also prove the accelerator fallback the issue asks
    // for: `-accel kvm -accel tcg` (KVM when usable, else emulation). The
    // image tests use TCG alone: here nested KVM costs ~3 s per boot.
    boot.accel = Accel::Kvm;
    boot.cmdline = "selftest".into();
    boot.timeout = TIMEOUT;
    boot.disks = vec![
        Disk {
            path: rw.clone(),
            read_only: false,
            format: None,
            queue_size: None,
        },
        Disk {
            path: ro.clone(),
            read_only: true,
            format: None,
            queue_size: None,
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
    // The static graph takes no room in the kernel file: its empty state
    // is all zeros.
    let graph_line = result.serial.lines().find(|l| l.starts_with("graph: "));
    if !graph_line.is_some_and(|l| l.ends_with(" in .bss")) {
        return fail(format!("the graph is not in .bss: {graph_line:?}"));
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

// ---------------------------------------------------------------------------
// Image tests

/// Boots; the kernel must report success.
fn succeed(lab: &Lab, disks: Vec<Disk>, script: &[String]) -> Result<BootResult> {
    let run = lab.boot(disks, &script.join("; "))?;
    if !run.succeeded() {
        return Err(Error::msg(format!("{}{}", run.verdict(), transcript(&run))));
    }
    Ok(run)
}

/// Boots; the kernel must report failure (QEMU exit status 35) and print
/// each of `texts`.
fn fail(lab: &Lab, disks: Vec<Disk>, script: &[String], texts: &[&str]) -> Result<BootResult> {
    let run = lab.boot(disks, &script.join("; "))?;
    if run.status.and_then(|s| s.code()) != Some(KERNEL_FAILURE) {
        return Err(Error::msg(format!(
            "want a kernel failure (QEMU exit status {KERNEL_FAILURE}), got: {}{}",
            run.verdict(),
            transcript(&run)
        )));
    }
    if let Some(text) = texts.iter().find(|text| !run.serial.contains(*text)) {
        return Err(Error::msg(format!(
            "`{text}` is missing from the kernel's output{}",
            transcript(&run)
        )));
    }
    Ok(run)
}

/// Host checks after a boot; a failure shows the boot's transcript.
fn verify(run: &BootResult, checks: impl FnOnce() -> Result<()>) -> Result<()> {
    checks().map_err(|err| Error::msg(format!("{err}{}", transcript(run))))
}

/// The kernel's output must hold `text`.
fn expect_output(run: &BootResult, text: &str) -> Result<()> {
    if run.serial.contains(text) {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "`{text}` is missing from the kernel's output"
        )))
    }
}

fn kernel_time(run: &BootResult) -> String {
    format!("kernel {:.2} s", run.elapsed.as_secs_f64())
}

fn words(commands: &[&str]) -> Vec<String> {
    commands.iter().map(|c| (*c).to_owned()).collect()
}

/// Every byte of a 3-image chain read through the kernel, with read-only
/// disks: a compressed base, a middle layer of 16 KiB clusters with
/// 4-bit refcounts and a zero cluster, a version 2 top.
fn chain_reads(lab: &Lab) -> Result<String> {
    lab.create(
        "base0.qcow2",
        "16M",
        None,
        None,
        &["write -P 0x11 0 2M", "write -P 0x12 6M 512k"],
    )?;
    lab.qemu_img(&["convert", "-c", "-O", "qcow2", "base0.qcow2", "base.qcow2"])?;
    lab.create(
        "mid.qcow2",
        "16M",
        Some("base.qcow2"),
        Some("cluster_size=16k,refcount_bits=4"),
        &[
            "write -P 0x22 1M 1M",
            "write -z 0 64k",
            "write -P 0x23 6400k 64k",
        ],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("mid.qcow2"),
        Some("compat=0.10"),
        &["write -P 0x33 3M 1M", "write -P 0x34 7000 5000"],
    )?;
    const VIEW: &Layout = &[
        (0, 2 * MIB, 0x11),
        (6 * MIB, MIB / 2, 0x12),
        (MIB, MIB, 0x22),
        (0, 64 * 1024, 0),
        (6400 * 1024, 64 * 1024, 0x23),
        (3 * MIB, MIB, 0x33),
        (7000, 5000, 0x34),
    ];
    let reads = pattern_reads(VIEW, SIZE);
    // The layout is right: qemu-io agrees.
    lab.qemu_io("top.qcow2", &reads)?;
    let images = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    let saved = lab.save(&images)?;
    let run = succeed(
        lab,
        images.iter().map(|name| lab.disk(name, true)).collect(),
        &[
            "info --backing-chain top.qcow2".into(),
            "map top.qcow2".into(),
            io_command("top.qcow2", true, &reads),
            "checksum top.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        lab.unchanged(&saved)?;
        lab.check(&images)
    })?;
    Ok(format!(
        "{}, {} pattern reads",
        kernel_time(&run),
        reads.len()
    ))
}

/// Guest writes of every shape, compared with the same writes by qemu-io.
fn writes_vs_qemu_io(lab: &Lab) -> Result<String> {
    writes_on(lab, None)
}

/// [`writes_vs_qemu_io`] on an overlay with extended L2 entries (2 KiB
/// subclusters): the kernel's no_std build fills subclusters.
fn extended_l2_writes(lab: &Lab) -> Result<String> {
    writes_on(lab, Some("extended_l2=on,cluster_size=64k"))
}

/// [`writes_vs_qemu_io`] on an overlay whose data lies in an external
/// data file, a virtio disk of its own (`top.data`; qemu-io's reference
/// has `ref.data`): the kernel attaches it by name.
fn data_file_writes(lab: &Lab) -> Result<String> {
    writes_on(lab, Some("data_file=top.data"))
}

/// The writes of [`writes_vs_qemu_io`] on an overlay made with `options`.
fn writes_on(lab: &Lab, options: Option<&str>) -> Result<String> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 4M"])?;
    const TOP: &[&str] = &["write -P 0x22 2M 2M", "write -P 0x23 9M 1M"];
    lab.create("top.qcow2", "16M", Some("base.qcow2"), options, TOP)?;
    let data_file = options.is_some_and(|o| o.contains("data_file"));
    match data_file {
        // The reference needs a data file of its own.
        true => lab.create(
            "ref-top.qcow2",
            "16M",
            Some("base.qcow2"),
            Some("data_file=ref.data"),
            TOP,
        )?,
        false => lab.copy("top.qcow2", "ref-top.qcow2")?,
    }
    lab.pad("top.qcow2", PAD)?;
    const WRITES: &[&str] = &[
        // The head of a cluster of the backing file: copy-on-write of the rest.
        "write -P 0x44 0 4k",
        // Unaligned, inside the cluster just allocated.
        "write -P 0x45 1000 3000",
        // Unaligned across clusters, some from the backing file.
        "write -P 0x46 70000 100000",
        // Over the image's own clusters and past them.
        "write -P 0x47 3M 2M",
        // Whole clusters over backing data (zero flag), a partial one.
        "write -z 1M 128k",
        "write -z 2100k 8k",
        // Whole clusters of the image; an unaligned range (its partial
        // cluster is left alone).
        "discard 9M 128k",
        "discard 3136k 200k",
        // The last MiB, and an odd offset and length.
        "write -P 0x48 15M 1M",
        "write -P 0x49 12345678 4321",
        "flush",
    ];
    let base = lab.save(&["base.qcow2"])?;
    const CHECKS: &[&str] = &[
        "read -P 0x44 0 1000",
        "read -P 0x45 1000 3000",
        "read -P 0x44 4000 96",
        "read -P 0x11 4096 65904",
        "read -P 0x46 70000 100000",
        "read -P 0x00 1M 128k",
        "read -P 0x47 3M 64k",
        "read -P 0x00 3136k 192k",
        "read -P 0x47 3328k 1792k",
        "read -P 0x00 9M 128k",
        "read -P 0x23 9344k 896k",
        "read -P 0x48 15M 1M",
        "read -P 0x49 12345678 4321",
    ];
    let mut disks = vec![lab.disk("base.qcow2", true), lab.disk("top.qcow2", false)];
    if data_file {
        disks.push(lab.disk("top.data", false));
    }
    let run = succeed(
        lab,
        disks,
        &[
            io_command("top.qcow2", false, &words(WRITES)),
            io_command("top.qcow2", true, &words(CHECKS)),
            "checksum top.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        lab.qemu_io("ref-top.qcow2", WRITES)?;
        lab.qemu_io("ref-top.qcow2", CHECKS)?;
        lab.check(&["top.qcow2"])?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.qemu_io("top.qcow2", CHECKS)?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        if data_file && read(&lab.path("top.data"))? != read(&lab.path("ref.data"))? {
            return Err(Error::msg("the data file differs from qemu-io's"));
        }
        lab.unchanged(&base)
    })?;
    Ok(format!("{}, {} writes", kernel_time(&run), WRITES.len()))
}

/// `commit --top mid --base base top`: base (smaller: it grows) takes mid's
/// data, top's backing file becomes base.
fn intermediate_commit(lab: &Lab) -> Result<String> {
    lab.create(
        "base.qcow2",
        "12M",
        None,
        None,
        &["write -P 0x11 0 2M", "write -P 0x12 11M 1M"],
    )?;
    lab.create(
        "mid.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &[
            "write -P 0x22 1M 2M",
            "write -z 0 64k",
            "write -z 11M 256k",
            "write -P 0x23 13M 1M",
        ],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("mid.qcow2"),
        None,
        &["write -P 0x33 2M 1M"],
    )?;
    lab.copy_chain(&["base.qcow2", "mid.qcow2", "top.qcow2"], "ref")?;
    lab.pad("base.qcow2", PAD)?;
    let mid = lab.save(&["mid.qcow2"])?;
    let run = succeed(
        lab,
        ["base.qcow2", "mid.qcow2", "top.qcow2"]
            .iter()
            .map(|name| lab.disk(name, false))
            .collect(),
        &words(&[
            "commit --top mid.qcow2 --base base.qcow2 top.qcow2",
            "info --backing-chain top.qcow2",
            "checksum top.qcow2",
            "checksum base.qcow2",
        ]),
    )?;
    verify(&run, || {
        expect_output(&run, "Image committed.")?;
        // qemu-img's way: commit mid into base (keeping mid), point top at base.
        lab.qemu_img(&["commit", "-q", "-d", "-f", "qcow2", "ref-mid.qcow2"])?;
        lab.qemu_img(&[
            "rebase",
            "-u",
            "-b",
            "ref-base.qcow2",
            "-F",
            "qcow2",
            "ref-top.qcow2",
        ])?;
        lab.check(&["base.qcow2", "top.qcow2"])?;
        lab.expect_chain("top.qcow2", &["top.qcow2", "base.qcow2"])?;
        lab.same_view("base.qcow2", "ref-base.qcow2")?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.unchanged(&mid)?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        lab.expect_checksum(&run.serial, "base.qcow2", "base.qcow2")?;
        Ok(())
    })?;
    Ok(kernel_time(&run))
}

/// An active commit run by steps with guest writes while it runs and while
/// it is ready, completed (pivot to base), then writes through the device.
fn active_commit(lab: &Lab) -> Result<String> {
    lab.create(
        "base.qcow2",
        "16M",
        None,
        None,
        &["write -P 0x11 0 2M", "write -P 0x12 10M 1M"],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &[
            "write -P 0x22 1M 4M",
            "write -P 0x23 8M 1M",
            "write -z 10M 64k",
        ],
    )?;
    lab.copy_chain(&["base.qcow2", "top.qcow2"], "ref")?;
    lab.pad("base.qcow2", PAD)?;
    lab.pad("top.qcow2", PAD)?;
    // While running: a range already copied and one not yet reached.
    const RUNNING: &[&str] = &["write -P 0x44 0 64k", "write -P 0x45 4M 1M"];
    // While ready: everything copied, these must be copied again.
    const READY: &[&str] = &["write -P 0x46 100k 5000", "write -P 0x47 14M 64k"];
    // After the pivot: the device is on base.
    const AFTER: &[&str] = &["write -P 0x48 12M 1M", "write -P 0x49 1M 4k"];
    const VIEW: &Layout = &[
        (0, 2 * MIB, 0x11),
        (10 * MIB, MIB, 0x12),
        (MIB, 4 * MIB, 0x22),
        (8 * MIB, MIB, 0x23),
        (10 * MIB, 64 * 1024, 0),
        (0, 64 * 1024, 0x44),
        (4 * MIB, MIB, 0x45),
        (100 * 1024, 5000, 0x46),
        (14 * MIB, 64 * 1024, 0x47),
        (12 * MIB, MIB, 0x48),
        (MIB, 4096, 0x49),
    ];
    let reads = pattern_reads(VIEW, SIZE);
    let run = succeed(
        lab,
        vec![lab.disk("base.qcow2", false), lab.disk("top.qcow2", false)],
        &[
            "job-start commit top.qcow2".into(),
            "job-step top.qcow2 2".into(),
            io_command("top.qcow2", false, &words(RUNNING)),
            "job-step top.qcow2 1000".into(),
            io_command("top.qcow2", false, &words(READY)),
            "job-info top.qcow2".into(),
            "job-complete top.qcow2".into(),
            "job-wait top.qcow2".into(),
            io_command("top.qcow2", false, &words(AFTER)),
            io_command("top.qcow2", true, &reads),
            "checksum top.qcow2".into(),
            "checksum base.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        expect_output(&run, "job commit on top.qcow2: running")?;
        expect_output(&run, "job commit on top.qcow2: ready")?;
        expect_output(&run, "Image 'base.qcow2' is now the active image")?;
        // qemu's way: the same writes into the copy, commit, the later writes
        // into the copy of base.
        let mut before: Vec<&str> = RUNNING.to_vec();
        before.extend(READY);
        lab.qemu_io("ref-top.qcow2", &before)?;
        lab.qemu_img(&["commit", "-q", "-f", "qcow2", "ref-top.qcow2"])?;
        lab.qemu_io("ref-base.qcow2", AFTER)?;
        lab.check(&["base.qcow2", "top.qcow2"])?;
        lab.expect_chain("base.qcow2", &["base.qcow2"])?;
        lab.same_view("base.qcow2", "ref-base.qcow2")?;
        lab.qemu_io("base.qcow2", &reads)?;
        lab.expect_checksum(&run.serial, "top.qcow2", "base.qcow2")?;
        lab.expect_checksum(&run.serial, "base.qcow2", "base.qcow2")?;
        Ok(())
    })?;
    Ok(kernel_time(&run))
}

/// `job-start stream --base base top` with guest writes while it runs: top
/// takes mid's data and its backing file becomes base.
fn stream(lab: &Lab) -> Result<String> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 2M"])?;
    lab.create(
        "mid.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &[
            "write -P 0x22 1M 2M",
            "write -P 0x23 6M 1M",
            "write -z 0 64k",
        ],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("mid.qcow2"),
        None,
        &["write -P 0x33 2M 1M"],
    )?;
    lab.copy("top.qcow2", "ref-top.qcow2")?;
    lab.pad("top.qcow2", PAD)?;
    let lower = lab.save(&["base.qcow2", "mid.qcow2"])?;
    const WRITES: &[&str] = &["write -P 0x44 6400k 64k", "write -P 0x45 1500k 3000"];
    const VIEW: &Layout = &[
        (0, 2 * MIB, 0x11),
        (MIB, 2 * MIB, 0x22),
        (6 * MIB, MIB, 0x23),
        (0, 64 * 1024, 0),
        (2 * MIB, MIB, 0x33),
        (6400 * 1024, 64 * 1024, 0x44),
        (1500 * 1024, 3000, 0x45),
    ];
    let reads = pattern_reads(VIEW, SIZE);
    let run = succeed(
        lab,
        ["base.qcow2", "mid.qcow2", "top.qcow2"]
            .iter()
            .map(|name| lab.disk(name, false))
            .collect(),
        &[
            "job-start stream --base base.qcow2 top.qcow2".into(),
            "job-step top.qcow2 1".into(),
            io_command("top.qcow2", false, &words(WRITES)),
            "job-info top.qcow2".into(),
            "job-wait top.qcow2".into(),
            "info --backing-chain top.qcow2".into(),
            io_command("top.qcow2", true, &reads),
            "checksum top.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        expect_output(&run, "job stream on top.qcow2: running")?;
        expect_output(&run, "Image 'top.qcow2' now has backing file 'base.qcow2'")?;
        // qemu's way: the writes, then a safe rebase onto base.
        lab.qemu_io("ref-top.qcow2", WRITES)?;
        lab.qemu_img(&[
            "rebase",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ref-top.qcow2",
        ])?;
        lab.check(&["top.qcow2"])?;
        lab.expect_chain("top.qcow2", &["top.qcow2", "base.qcow2"])?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.qemu_io("top.qcow2", &reads)?;
        lab.unchanged(&lower)?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        Ok(())
    })?;
    Ok(kernel_time(&run))
}

/// `collapse --top mid --base base top`: metadata only, like
/// `qemu-img rebase -u`; top's file is not padded (nothing may grow).
fn collapse(lab: &Lab) -> Result<String> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 2M"])?;
    lab.create(
        "mid.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &["write -P 0x22 1M 2M"],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("mid.qcow2"),
        None,
        &["write -P 0x33 2M 1M"],
    )?;
    lab.copy("top.qcow2", "ref-top.qcow2")?;
    lab.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ref-top.qcow2",
    ])?;
    let lower = lab.save(&["base.qcow2", "mid.qcow2"])?;
    const VIEW: &Layout = &[(0, 2 * MIB, 0x11), (2 * MIB, MIB, 0x33)];
    let reads = pattern_reads(VIEW, SIZE);
    let top_len = lab.file_len("top.qcow2")?;
    let run = succeed(
        lab,
        ["base.qcow2", "mid.qcow2", "top.qcow2"]
            .iter()
            .map(|name| lab.disk(name, false))
            .collect(),
        &[
            "collapse --top mid.qcow2 --base base.qcow2 top.qcow2".into(),
            "info --backing-chain top.qcow2".into(),
            io_command("top.qcow2", true, &reads),
            "checksum top.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        lab.check(&["top.qcow2"])?;
        lab.expect_chain("top.qcow2", &["top.qcow2", "base.qcow2"])?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.qemu_io("top.qcow2", &reads)?;
        lab.unchanged(&lower)?;
        if lab.file_len("top.qcow2")? != top_len {
            return Err(Error::msg("top.qcow2 changed size"));
        }
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        Ok(())
    })?;
    Ok(kernel_time(&run))
}

/// `snapshot s3 new` onto a blank disk (8 MiB of zeros), then writes to the
/// new overlay.
fn live_snapshot(lab: &Lab) -> Result<String> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 2M"])?;
    lab.create(
        "s3.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &["write -P 0x22 1M 1M"],
    )?;
    let blank = lab.path("new.qcow2");
    fs::File::create(&blank)
        .and_then(|file| file.set_len(8 * MIB))
        .context(format!("creating {}", blank.display()))?;
    let lower = lab.save(&["base.qcow2", "s3.qcow2"])?;
    const WRITES: &[&str] = &["write -P 0x99 1M 64k", "write -P 0x98 3M 100000"];
    const VIEW: &Layout = &[
        (0, 2 * MIB, 0x11),
        (MIB, MIB, 0x22),
        (MIB, 64 * 1024, 0x99),
        (3 * MIB, 100_000, 0x98),
    ];
    let reads = pattern_reads(VIEW, SIZE);
    // Every disk of the chain is writable: `snapshot` opens each member of
    // the chain writable, so a read-only backing disk would be refused.
    let run = succeed(
        lab,
        ["base.qcow2", "s3.qcow2", "new.qcow2"]
            .iter()
            .map(|name| lab.disk(name, false))
            .collect(),
        &[
            "snapshot s3.qcow2 new.qcow2".into(),
            io_command("new.qcow2", false, &words(WRITES)),
            io_command("new.qcow2", true, &reads),
            "checksum new.qcow2".into(),
            "info --backing-chain new.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        expect_output(
            &run,
            "Image 'new.qcow2' is now the active image (backing file 's3.qcow2')",
        )?;
        lab.create("ref-new.qcow2", "16M", Some("s3.qcow2"), None, WRITES)?;
        lab.check(&["new.qcow2"])?;
        lab.expect_chain("new.qcow2", &["new.qcow2", "s3.qcow2", "base.qcow2"])?;
        lab.same_view("new.qcow2", "ref-new.qcow2")?;
        lab.qemu_io("new.qcow2", &reads)?;
        lab.unchanged(&lower)?;
        lab.expect_checksum(&run.serial, "new.qcow2", "new.qcow2")?;
        Ok(())
    })?;
    Ok(kernel_time(&run))
}

/// The small chain most failure tests use: base 0x11 @0 2M <- top 0x22 @1M 2M.
fn small_chain(lab: &Lab) -> Result<&'static Layout> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 2M"])?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &["write -P 0x22 1M 2M"],
    )?;
    Ok(&[(0, 2 * MIB, 0x11), (MIB, 2 * MIB, 0x22)])
}

/// Read-only disks: reads and a checksum work, a write fails, the files
/// stay byte-identical.
fn read_only_disk(lab: &Lab) -> Result<String> {
    let view = small_chain(lab)?;
    let reads = pattern_reads(view, SIZE);
    let images = ["base.qcow2", "top.qcow2"];
    let saved = lab.save(&images)?;
    let run = fail(
        lab,
        images.iter().map(|name| lab.disk(name, true)).collect(),
        &[
            io_command("top.qcow2", true, &reads),
            "checksum top.qcow2".into(),
            "io top.qcow2 -c \"write -P 0x55 0 64k\"".into(),
        ],
        &["error: command 3: top.qcow2: ", "read-only"],
    )?;
    verify(&run, || {
        expect_output(&run, "read 2097152/2097152 bytes at offset 1048576")?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        lab.unchanged(&saved)?;
        lab.check(&images)
    })?;
    Ok(format!("{}, the write failed", kernel_time(&run)))
}

/// A disk only three clusters larger than its image: a 1 MiB write fails
/// with "no space" and changes nothing; a second boot writes three clusters,
/// which fit only if the failed write gave its clusters back.
fn no_space(lab: &Lab) -> Result<String> {
    let view = small_chain(lab)?;
    lab.copy("top.qcow2", "ref-top.qcow2")?;
    lab.pad_by("top.qcow2", 3 * 64 * 1024)?;
    let disks = || vec![lab.disk("base.qcow2", true), lab.disk("top.qcow2", false)];
    let run = fail(
        lab,
        disks(),
        &words(&["io top.qcow2 -c \"write -P 0x66 8M 1M\""]),
        &["error: command 1: write -P 0x66 8M 1M: ", "no space"],
    )?;
    let mut note = kernel_time(&run);
    verify(&run, || {
        let (code, text) = lab.check_status("top.qcow2")?;
        match code {
            0 => {}
            3 => note.push_str(", leaked clusters after the failed write"),
            _ => {
                return Err(Error::msg(format!(
                    "qemu-img check top.qcow2 exited with {code} after the failed write{}",
                    crate::cmd::indented(&text)
                )))
            }
        }
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.qemu_io("top.qcow2", &pattern_reads(view, SIZE))?;
        Ok(())
    })?;
    const FITS: &str = "write -P 0x67 8M 192k";
    let run = succeed(
        lab,
        disks(),
        &[
            format!("io top.qcow2 -c \"{FITS}\""),
            "checksum top.qcow2".into(),
        ],
    )?;
    verify(&run, || {
        lab.qemu_io("ref-top.qcow2", &[FITS])?;
        lab.check(&["top.qcow2"])?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        Ok(())
    })?;
    Ok(format!("{note}, then {}", kernel_time(&run)))
}

/// A pattern read of other data fails the script.
fn wrong_pattern(lab: &Lab) -> Result<String> {
    small_chain(lab)?;
    let images = ["base.qcow2", "top.qcow2"];
    let saved = lab.save(&images)?;
    let run = fail(
        lab,
        images.iter().map(|name| lab.disk(name, true)).collect(),
        &words(&["io -r top.qcow2 -c \"read -P 0x22 1M 64k\" -c \"read -P 0x99 1M 64k\""]),
        &[
            "read 65536/65536 bytes at offset 1048576",
            "Pattern verification failed at offset 1048576",
            "error: command 1: read -P 0x99 1M 64k: ",
        ],
    )?;
    verify(&run, || lab.unchanged(&saved))?;
    Ok(format!("{}, the read failed", kernel_time(&run)))
}

/// A raw disk whose format is probed: the guest builds a qcow2 magic in
/// its first sector byte by byte and the last byte is refused; a second
/// boot names the format (`--disk PATH,format=raw`, i.e. `image-format`)
/// and the same write goes through without a probing warning.
fn probed_raw(lab: &Lab) -> Result<String> {
    const NAME: &str = "guest.raw";
    create_disk(&lab.path(NAME), 1 << 20)?;
    let magic = [0x51u8, 0x46, 0x49, 0xfb];
    let writes: Vec<String> = magic
        .iter()
        .enumerate()
        .map(|(i, byte)| format!("io {NAME} -c \"write -P {byte:#x} {i} 1\""))
        .collect();
    let probed = fail(
        lab,
        vec![lab.disk(NAME, false)],
        &writes,
        &[
            "probing guessed raw",
            "error: command 4: write -P 0xfb 3 1: operation not permitted",
        ],
    )?;
    let first = |want: &[u8]| -> Result<()> {
        let bytes = read(&lab.path(NAME))?;
        if bytes[..4] == *want {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "{NAME} starts {:02x?}, want {want:02x?}",
                &bytes[..4]
            )))
        }
    };
    verify(&probed, || first(&[0x51, 0x46, 0x49, 0]))?;
    let mut disk = lab.disk(NAME, false);
    disk.format = Some("raw".into());
    let named = succeed(lab, vec![disk], &writes[3..])?;
    verify(&named, || {
        if named.serial.contains("probing guessed raw") {
            return Err(Error::msg("a disk with a named format was probed"));
        }
        first(&magic)
    })?;
    Ok(format!(
        "{} and {}, refused then written",
        kernel_time(&probed),
        kernel_time(&named)
    ))
}

/// The request engine in the kernel, many virtio-blk requests in flight:
/// `bench -w -d 32` writes that allocate (over a backing file), the same
/// writes again with another pattern, now in place (32 requests in flight
/// on top.qcow2's disk), again at depth 64 (more than the disk's ring
/// holds: the rest complete synchronously), unaligned in-place writes
/// (read-modify-write, synchronous), `bench -d 32` reads and `checksum -d
/// 32` (the chain read with 32 requests in flight, hashed in order). The
/// image equals `qemu-img bench` doing the same writes on a copy, the
/// kernel's checksum equals the host's of the view, and the disk of
/// top.qcow2 held as many requests at once as its ring takes: 42 (QEMU's
/// ring of 256 descriptors, of which the kernel uses 128).
fn requests_in_flight(lab: &Lab) -> Result<String> {
    in_flight_against_qemu_img(lab, None, 42)
}

/// [`requests_in_flight`] with `queue-size=16`: on q35 (virtio-pci) the
/// ring then has 16 descriptors, 5 requests in flight at most, and most
/// operations complete synchronously. virtio-mmio (microvm) offers 1024
/// descriptors whatever `queue-size` says (QEMU 10.0), so there the kernel
/// still takes 128: 42 requests.
fn requests_in_flight_small_ring(lab: &Lab) -> Result<String> {
    let peak = match lab.machine {
        Machine::Microvm => 42,
        Machine::Q35 => 5,
    };
    in_flight_against_qemu_img(lab, Some(16), peak)
}

/// The [`requests_in_flight`] test on a top disk whose ring has
/// `queue_size` descriptors (`None`: QEMU's default); `peak` requests must
/// have been in flight on it at once.
fn in_flight_against_qemu_img(lab: &Lab, queue_size: Option<u16>, peak: usize) -> Result<String> {
    /// `bench` arguments of the writes, without the image.
    const WRITES: [&str; 4] = [
        "-w -d 32 -c 256 -s 4k -S 36k --pattern 0x44",
        "-w -d 32 -c 256 -s 4k -S 36k --pattern 0x55",
        "-w -d 64 -c 256 -s 4k -S 36k --pattern 0x66",
        "-w -d 32 -c 200 -s 3000 -o 4195081 -S 5000 --pattern 0x77",
    ];
    chain_16m(lab)?;
    lab.copy("top.qcow2", "ref-top.qcow2")?;
    lab.pad("top.qcow2", 32 << 20)?;
    let mut script: Vec<String> = WRITES
        .iter()
        .map(|args| format!("bench {args} top.qcow2"))
        .collect();
    script.extend([
        "bench -d 32 -c 1024 -s 4k -S 12k top.qcow2".into(),
        "checksum -d 32 top.qcow2".into(),
    ]);
    let mut top = lab.disk("top.qcow2", false);
    top.queue_size = queue_size;
    let run = succeed(lab, vec![lab.disk("base.qcow2", true), top], &script)?;
    verify(&run, || {
        expect_output(&run, "256 write requests, 4096 bytes each, 32 in parallel")?;
        expect_output(&run, "256 write requests, 4096 bytes each, 64 in parallel")?;
        expect_output(&run, "200 write requests, 3000 bytes each, 32 in parallel")?;
        expect_output(&run, "1024 read requests, 4096 bytes each, 32 in parallel")?;
        qemu_img_benches(lab, &WRITES, "ref-top.qcow2")?;
        lab.check(&["top.qcow2"])?;
        lab.same_view("top.qcow2", "ref-top.qcow2")?;
        lab.expect_checksum(&run.serial, "top.qcow2", "top.qcow2")?;
        expect_in_flight(&run.serial, "top.qcow2", peak)
    })?;
    Ok(format!(
        "{}, same image as qemu-img bench, same checksum, {peak} requests in flight",
        kernel_time(&run)
    ))
}

/// `top.qcow2` (0x22 at 4M, 1 MiB) over `base.qcow2` (0x11, the first 8
/// MiB), 16 MiB each.
fn chain_16m(lab: &Lab) -> Result<()> {
    lab.create("base.qcow2", "16M", None, None, &["write -P 0x11 0 8M"])?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &["write -P 0x22 4M 1M"],
    )?;
    Ok(())
}

/// An active commit under load: `bench -w -d 32 --with-job` keeps 32
/// writes in flight (virtio requests on the top disk) while the job steps
/// in drained sections between them and, once ready, is completed, so it
/// pivots with writes queued. The job must end during the bench; base must
/// then hold what `qemu-img bench` leaves in a copy of the chain, pass
/// `qemu-img check`, and match the kernel's checksum of the device (now on
/// base) read at depth 32.
fn active_commit_under_load(lab: &Lab) -> Result<String> {
    const WRITES: &str = "-w -d 32 -c 512 -s 4k -S 36k --pattern 0x44";
    chain_16m(lab)?;
    let copies = lab.copy_chain(&["base.qcow2", "top.qcow2"], "ref")?;
    lab.pad("base.qcow2", PAD)?;
    lab.pad("top.qcow2", PAD)?;
    let script = [
        "job-start commit top.qcow2".to_owned(),
        format!("bench {WRITES} --with-job top.qcow2"),
        "job-info top.qcow2".to_owned(),
        "job-wait top.qcow2".to_owned(),
        "checksum -d 32 top.qcow2".to_owned(),
    ];
    let run = succeed(
        lab,
        vec![lab.disk("base.qcow2", false), lab.disk("top.qcow2", false)],
        &script,
    )?;
    verify(&run, || {
        expect_output(&run, "512 write requests, 4096 bytes each, 32 in parallel")?;
        expect_output(&run, "job commit on top.qcow2: concluded")?;
        expect_output(&run, "Image 'base.qcow2' is now the active image")?;
        qemu_img_benches(lab, &[WRITES], &copies[1])?;
        lab.check(&["base.qcow2"])?;
        lab.same_view("base.qcow2", &copies[1])?;
        lab.expect_checksum(&run.serial, "top.qcow2", &copies[1])?;
        Ok(())
    })?;
    Ok(format!(
        "{}, pivoted during the bench, base as qemu-img bench leaves the chain",
        kernel_time(&run)
    ))
}

/// At most `peak` requests were in flight on the disk `name` at once,
/// no fewer either.
fn expect_in_flight(serial: &str, name: &str, peak: usize) -> Result<()> {
    let seen = requests_in_flight_on(serial, name)?;
    if seen != peak {
        return Err(Error::msg(format!(
            "at most {seen} requests were in flight on {name}, not {peak}"
        )));
    }
    Ok(())
}

/// `qemu-img bench ARGS IMAGE` for each of `benches` (the arguments of the
/// kernel's `bench` without the image): what the kernel's benches did, done
/// by QEMU on a copy.
fn qemu_img_benches(lab: &Lab, benches: &[&str], image: &str) -> Result<()> {
    for args in benches {
        let mut args: Vec<&str> = args.split(' ').collect();
        args.insert(0, "bench");
        args.push(image);
        lab.qemu_img(&args)?;
    }
    Ok(())
}

/// The kernel's `disk N (NAME): at most COUNT requests in flight` for `name`.
fn requests_in_flight_on(serial: &str, name: &str) -> Result<usize> {
    let marker = format!(" ({name}): at most ");
    serial
        .lines()
        .filter(|line| line.starts_with("disk "))
        .find_map(|line| {
            let (_, rest) = line.split_once(&marker)?;
            rest.strip_suffix(" requests in flight")?.parse().ok()
        })
        .ok_or_else(|| {
            Error::msg(format!(
                "no `disk N ({name}): at most ... requests in flight` line"
            ))
        })
}

// ---------------------------------------------------------------------------
// Served tests: the kernel as the guest of `blockgraph serve`

/// A served test's server may take this long to exit after `quit`.
const SERVER_STOP: Duration = Duration::from_secs(10);

/// The chain the served tests export (base first): [`chain_16m`]'s.
const SERVED_CHAIN: [Node<'static>; 2] = [
    Node {
        file: "base.qcow2",
        node: "base",
    },
    Node {
        file: "top.qcow2",
        node: "top",
    },
];

/// The serial `blockgraph serve top.qcow2` gives its disk (the file stem).
const SERVED_SERIAL: &str = "top";

/// The kernel's `stack-check`: a VMM's flow straight through the library
/// (open, every request kind, requests in flight, snapshots, collapse,
/// commit, stream, two active commits with pivots), each call's stack
/// measured against the budget. The guest's writes it prints are replayed
/// on a copy of the chain with qemu-io: the final base must show the same.
fn stack_check(lab: &Lab) -> Result<String> {
    lab.create(
        "base.qcow2",
        "16M",
        None,
        None,
        &["write -P 0x11 0 6M", "write -P 0x12 10M 2M"],
    )?;
    lab.create(
        "mid.qcow2",
        "16M",
        Some("base.qcow2"),
        None,
        &["write -P 0x22 2M 2M", "write -P 0x23 5M 1M"],
    )?;
    lab.create(
        "top.qcow2",
        "16M",
        Some("mid.qcow2"),
        None,
        &["write -P 0x33 3M 1M", "write -P 0x34 8M 1M"],
    )?;
    let chain = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    lab.copy_chain(&chain, "ref")?;
    for name in chain {
        lab.pad(name, PAD)?;
    }
    let blanks = ["s1.qcow2", "s2.qcow2", "s3.qcow2"];
    for name in blanks {
        create_disk(&lab.path(name), PAD)?;
    }
    let disks = chain
        .iter()
        .chain(&blanks)
        .map(|name| lab.disk(name, false))
        .collect();
    let run = lab.boot(disks, "stack-check")?;
    if !run.succeeded() {
        return Err(Error::msg(format!("{}{}", run.verdict(), transcript(&run))));
    }
    let mut worst = String::new();
    verify(&run, || {
        expect_output(&run, "stack-check ok")?;
        let writes: Vec<&str> = run
            .serial
            .lines()
            .filter_map(|line| line.trim().strip_prefix("stack-check: guest: "))
            .collect();
        if writes.len() < 10 {
            return Err(Error::msg(format!(
                "only {} guest writes reported",
                writes.len()
            )));
        }
        lab.qemu_io("ref-top.qcow2", &writes)?;
        lab.check(&["base.qcow2", "s2.qcow2", "s3.qcow2"])?;
        lab.expect_chain("base.qcow2", &["base.qcow2"])?;
        lab.same_view("base.qcow2", "ref-top.qcow2")?;
        worst = run
            .serial
            .lines()
            .filter_map(|line| line.trim().strip_prefix("stack-check: worst "))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(())
    })?;
    Ok(format!("{}, worst {worst}", kernel_time(&run)))
}

/// The kernel on `blockgraph serve -f qcow2 top.qcow2 --vhost-user-blk
/// vhost.sock --qmp qmp.sock` ([`chain_16m`]); see [`served`].
fn served_chain(lab: &Lab, cli: &Path) -> Result<String> {
    served(lab, cli, false)
}

/// [`served_chain`] after a live snapshot over QMP (`blockdev-snapshot-sync`
/// top -> snap.qcow2) taken before the boot: the export follows the chain,
/// so the kernel's writes land in snap.qcow2 and top.qcow2 stays as it was.
fn served_snapshot(lab: &Lab, cli: &Path) -> Result<String> {
    served(lab, cli, true)
}

/// The served tests. The server starts on [`chain_16m`]; with `snapshot`,
/// QMP `blockdev-snapshot-sync` puts `snap.qcow2` on top first. The kernel
/// treats the disk as raw (its content is the chain's guest view):
/// `checksum -d 32`, then `bench -w` at depth 32 (allocating in the top
/// image), at depth 64 (more than the ring holds), unaligned
/// (read-modify-write), an `io` write and `flush`, and `checksum -d 32`
/// again. After the boot the server gets QMP `quit` (which flushes and
/// closes the chain). The first checksum must equal the host's of the
/// chain's view before, the second the view after; the top image must
/// equal a copy on which `qemu-img bench` and qemu-io did the same writes,
/// hold the written patterns (`read -P`) and check clean; the images below
/// it are untouched; the disk held 42 requests at once (128 descriptors of
/// the ring, 3 each).
fn served(lab: &Lab, cli: &Path, snapshot: bool) -> Result<String> {
    /// `bench` arguments of the writes, without the image.
    const WRITES: [&str; 3] = [
        "-w -d 32 -c 256 -s 4k -S 36k --pattern 0x44",
        "-w -d 64 -c 256 -s 4k -S 36k -o 2M --pattern 0x55",
        "-w -d 32 -c 200 -s 3000 -o 4195081 -S 5000 --pattern 0x77",
    ];
    /// A write into what no image of the chain holds (zeros before).
    const IO_WRITE: &str = "write -P 0x99 12M 64k";
    /// Where the writes must have landed: each first request of the bench
    /// writes (later ones of the same bench do not overlap them), base's
    /// data between two of them, and the `io` write.
    const READS: [&str; 5] = [
        "read -P 0x44 0 4k",
        "read -P 0x11 4k 32k",
        "read -P 0x55 2M 4k",
        "read -P 0x77 4195081 3000",
        "read -P 0x99 12M 64k",
    ];
    const PEAK: usize = 42;
    chain_16m(lab)?;
    let mut copies = lab.copy_chain(&["base.qcow2", "top.qcow2"], "ref")?;
    let (top, chain, lower): (&str, &[&str], &[&str]) = match snapshot {
        false => ("top.qcow2", &["top.qcow2", "base.qcow2"], &["base.qcow2"]),
        true => {
            let overlay = "ref-snap.qcow2".to_owned();
            lab.create(&overlay, "16M", Some(&copies[1]), None, &[])?;
            copies.push(overlay);
            (
                "snap.qcow2",
                &["snap.qcow2", "top.qcow2", "base.qcow2"],
                &["base.qcow2", "top.qcow2"],
            )
        }
    };
    let reference = copies.last().map_or("", String::as_str);
    let lower = lab.save(lower)?;
    let (before, _) = lab.view_fnv(reference)?;
    let mut script: Vec<String> = vec![format!("checksum -d 32 {SERVED_SERIAL}")];
    script.extend(
        WRITES
            .iter()
            .map(|args| format!("bench {args} {SERVED_SERIAL}")),
    );
    script.extend([
        format!("io {SERVED_SERIAL} -c \"{IO_WRITE}\" -c flush"),
        format!("checksum -d 32 {SERVED_SERIAL}"),
    ]);
    let (mut daemon, mut qmp) = start_served(lab, cli)?;
    if snapshot {
        scenario::snapshot(&mut qmp).map_err(|e| with_server_log(e, &daemon))?;
    }
    let run = lab.run(&served_boot(lab, &script.join("; ")));
    // The server ends here whatever the boot did.
    let stopped = server::stop(&mut daemon, Some(&mut qmp), SERVER_STOP);
    let run = run?;
    let with_logs =
        |err: Error| Error::msg(format!("{err}{}{}", transcript(&run), server_log(&daemon)));
    if !run.succeeded() {
        return Err(with_logs(Error::msg(run.verdict())));
    }
    if let Some(note) = stopped.map_err(&with_logs)? {
        return Err(with_logs(Error::msg(format!("QMP `quit`: {note}"))));
    }
    verify(&run, || {
        qemu_img_benches(lab, &WRITES, reference)?;
        lab.qemu_io(reference, &[IO_WRITE])?;
        let sums: Vec<u64> = checksums(&run.serial)
            .into_iter()
            .filter(|(name, _, _)| name == SERVED_SERIAL)
            .map(|(_, hash, _)| hash)
            .collect();
        if sums.first() != Some(&before) {
            return Err(Error::msg(format!(
                "the kernel's first checksum of the served disk is {:016x?}, the host's of \
                 the chain before the writes {before:016x}",
                sums.first()
            )));
        }
        lab.expect_checksum(&run.serial, SERVED_SERIAL, top)?;
        lab.check(chain)?;
        lab.expect_chain(top, chain)?;
        lab.same_view(top, reference)?;
        lab.qemu_io(top, &READS)?;
        lab.unchanged(&lower)?;
        expect_in_flight(&run.serial, SERVED_SERIAL, PEAK)
    })?;
    Ok(format!(
        "{}, checksums = the chain's view before and after, {top} as qemu-img bench leaves \
         a copy, {PEAK} requests in flight, QMP quit",
        kernel_time(&run)
    ))
}

/// Two boots, one after the other, on one `blockgraph serve` (with a
/// monitor, so the export outlives its first frontend, as
/// qemu-storage-daemon's does): the first writes and flushes, QEMU exits;
/// the second connects to the same socket and reads the first one's data
/// back (`read -P`) and checksums the disk. Then QMP `quit`: the second
/// checksum must be the chain's view, the write in the top image, the
/// chain clean.
fn served_reconnect(lab: &Lab, cli: &Path) -> Result<String> {
    const WRITE: &str = "write -P 0x5a 1M 64k";
    const READ: &str = "read -P 0x5a 1M 64k";
    chain_16m(lab)?;
    let (mut daemon, mut qmp) = start_served(lab, cli)?;
    let boot = |script: &str| lab.run(&served_boot(lab, script));
    let first = boot(&format!("io {SERVED_SERIAL} -c \"{WRITE}\" -c flush"));
    let second = match &first {
        Ok(run) if run.succeeded() => Some(boot(&format!(
            "io {SERVED_SERIAL} -c \"{READ}\"; checksum -d 32 {SERVED_SERIAL}"
        ))),
        _ => None,
    };
    // The server ends here whatever the boots did.
    let stopped = server::stop(&mut daemon, Some(&mut qmp), SERVER_STOP);
    let first = first?;
    if !first.succeeded() {
        return Err(Error::msg(format!(
            "first boot: {}{}{}",
            first.verdict(),
            transcript(&first),
            server_log(&daemon)
        )));
    }
    let run = second.ok_or_else(|| Error::msg("the second boot did not run"))??;
    let with_logs =
        |err: Error| Error::msg(format!("{err}{}{}", transcript(&run), server_log(&daemon)));
    if !run.succeeded() {
        return Err(with_logs(Error::msg(format!(
            "second boot: {}",
            run.verdict()
        ))));
    }
    if let Some(note) = stopped.map_err(&with_logs)? {
        return Err(with_logs(Error::msg(format!("QMP `quit`: {note}"))));
    }
    verify(&run, || {
        lab.expect_checksum(&run.serial, SERVED_SERIAL, "top.qcow2")?;
        lab.check(&["top.qcow2", "base.qcow2"])?;
        lab.qemu_io("top.qcow2", &[READ])?;
        Ok(())
    })?;
    Ok(format!(
        "{} + {}, the second boot read the first's write on the same socket",
        kernel_time(&first),
        kernel_time(&run)
    ))
}

/// `blockgraph serve` of [`SERVED_CHAIN`] in the lab, exported over
/// vhost-user-blk on `vhost.sock` (one queue) with its monitor on
/// `qmp.sock`, and a QMP connection to it. The server is killed when
/// dropped, on any early return.
fn start_served(lab: &Lab, cli: &Path) -> Result<(Background, Qmp)> {
    let export = Export::VhostUser {
        socket: "vhost.sock",
        queues: 1,
    };
    let daemon = Server::Blockgraph.start(
        &lab.dir,
        &SERVED_CHAIN,
        export,
        "qmp.sock",
        Some(cli),
        lab.live,
    )?;
    match Qmp::connect_with(&lab.path("qmp.sock"), false) {
        Ok(qmp) => Ok((daemon, qmp)),
        Err(err) => Err(with_server_log(err, &daemon)),
    }
}

/// A boot running `script` with the served disk (treated as raw: its
/// content is the chain's guest view) as its only disk.
fn served_boot(lab: &Lab, script: &str) -> Boot {
    let mut boot = lab.prepare(Vec::new(), script);
    boot.vhost_user = Some(VhostUser {
        socket: lab.path("vhost.sock"),
        serial: SERVED_SERIAL.into(),
        format: Some("raw".into()),
    });
    boot
}

/// `err` with what `server` printed so far.
fn with_server_log(err: Error, server: &Background) -> Error {
    Error::msg(format!("{err}{}", server_log(server)))
}

/// What a server printed so far, indented under a failure.
fn server_log(server: &Background) -> String {
    let lines: Vec<String> = server.lines.try_iter().collect();
    if lines.is_empty() {
        return String::new();
    }
    format!("\n      server:{}", indented(&lines.join("\n")))
}
