//! `cargo xtask demo`: the kernel runs a guest workload while a stream and a
//! live active commit run on a real backing chain, and qemu-img checks the
//! result.
//!
//! In a fresh `target/demo/`, qemu-img and qemu-io build (64 MiB virtual,
//! relative backing names; the files the kernel grows are padded, since a
//! virtio disk cannot grow)
//!
//! ```text
//! base.qcow2  <-  snap1.qcow2  <-  snap2.qcow2  <-  active.qcow2
//! 0x11 @0 4M      0x22 @2M 4M      0x33 @5M 4M      0x44 @8M 4M
//!                                  zeroes @0 64k    0x45 @1M 512k
//! ```
//!
//! and the kernel boots on microvm with the four files as disks and one
//! script, a VMM's life in text:
//!
//! 1. `job-start stream --base snap1.qcow2 active.qcow2`: snap2's data moves
//!    into active while the guest writes; active's backing file becomes
//!    snap1;
//! 2. `job-start commit --base base.qcow2 active.qcow2`: a live active commit
//!    stepped in rounds (`job-step`, progress lines), guest writes to ranges
//!    already copied and not yet reached, more writes once it is `ready`,
//!    `job-complete`: the device pivots to base in one step;
//! 3. guest writes after the pivot land in base; pattern reads of the whole
//!    view through the device; `checksum` of the device and of base.qcow2.
//!
//! Then the host replays the same guest writes with qemu-io on a copy of
//! the original chain (stream and commit do not change the guest view), and
//! checks with qemu-img: every image is consistent, the chain changed as it
//! should, base's view equals the replayed view, the kernel's checksums equal
//! the host's FNV-1a 64 of it, and the host CLI (`blockgraph convert`)
//! agrees before and after.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::lab::{self, chain_text, io_command, pattern_reads, Lab, Layout, MIB};
use super::qemu::{self, BootResult, Machine, Profile};
use crate::cmd::{indented, Cmd};
use crate::{prereq, Context, Error, Result, Workspace};

/// The virtual size of every image.
const DISK_SIZE: u64 = 64 * MIB;
/// Files the kernel writes are padded to this (base takes the whole view).
const PAD: u64 = 96 * MIB;

const IMAGES: [&str; 4] = ["base.qcow2", "snap1.qcow2", "snap2.qcow2", "active.qcow2"];

/// The chain as built: (image, backing file, qemu-io commands).
const LAYERS: [(&str, Option<&str>, &[&str]); 4] = [
    ("base.qcow2", None, &["write -P 0x11 0 4M"]),
    ("snap1.qcow2", Some("base.qcow2"), &["write -P 0x22 2M 4M"]),
    (
        "snap2.qcow2",
        Some("snap1.qcow2"),
        &["write -P 0x33 5M 4M", "write -z 0 64k"],
    ),
    (
        "active.qcow2",
        Some("snap2.qcow2"),
        &["write -P 0x44 8M 4M", "write -P 0x45 1M 512k"],
    ),
];

/// The guest view as built (later ranges win).
const BUILT: &Layout = &[
    (0, 4 * MIB, 0x11),
    (2 * MIB, 4 * MIB, 0x22),
    (5 * MIB, 4 * MIB, 0x33),
    (0, 64 * 1024, 0x00),
    (8 * MIB, 4 * MIB, 0x44),
    (MIB, 512 * 1024, 0x45),
];

/// Guest writes while the stream runs: a range snap2 holds (the stream must
/// not overwrite it) and an unaligned one.
const DURING_STREAM: &[&str] = &["write -P 0x55 6M 1M", "write -P 0x56 100k 5000"];
/// While the commit runs: a range already copied, one not reached yet.
const COMMIT_EARLY: &[&str] = &["write -P 0x77 0 1M", "write -P 0x78 20M 1M"];
/// Later in the commit: across the layers' data.
const COMMIT_LATE: &[&str] = &["write -P 0x79 7M 2M"];
/// While the commit is ready (everything copied): copied again before the pivot.
const COMMIT_READY: &[&str] = &["write -P 0x7a 3M 64k", "write -P 0x7b 63M 1M"];
/// After the pivot: the device is on base.
const AFTER_PIVOT: &[&str] = &["write -P 0x88 40M 1M", "write -P 0x89 5M 4k"];

/// The guest view at the end: as built plus every guest write.
const FINAL: &Layout = &[
    (0, 4 * MIB, 0x11),
    (2 * MIB, 4 * MIB, 0x22),
    (5 * MIB, 4 * MIB, 0x33),
    (0, 64 * 1024, 0x00),
    (8 * MIB, 4 * MIB, 0x44),
    (MIB, 512 * 1024, 0x45),
    (6 * MIB, MIB, 0x55),
    (100 * 1024, 5000, 0x56),
    (0, MIB, 0x77),
    (20 * MIB, MIB, 0x78),
    (7 * MIB, 2 * MIB, 0x79),
    (3 * MIB, 64 * 1024, 0x7a),
    (63 * MIB, MIB, 0x7b),
    (40 * MIB, MIB, 0x88),
    (5 * MIB, 4096, 0x89),
];

/// Every guest write, in the order the guest makes them.
fn guest_writes() -> Vec<&'static str> {
    [
        DURING_STREAM,
        COMMIT_EARLY,
        COMMIT_LATE,
        COMMIT_READY,
        AFTER_PIVOT,
    ]
    .concat()
}

/// The kernel's script.
fn script() -> String {
    let io = |commands: &[&str]| {
        let commands: Vec<String> = commands.iter().map(|c| (*c).to_owned()).collect();
        io_command("active.qcow2", false, &commands)
    };
    let mut lines: Vec<String> = vec![
        "info --backing-chain active.qcow2".into(),
        "checksum active.qcow2".into(),
        // 1. stream snap2 into active, live.
        "job-start stream --base snap1.qcow2 active.qcow2".into(),
        "job-step active.qcow2 2".into(),
        io(DURING_STREAM),
        "job-info active.qcow2".into(),
        "job-step active.qcow2 32".into(),
        "job-step active.qcow2 32".into(),
        "job-wait active.qcow2".into(),
        // 2. live active commit into base.
        "job-start commit --base base.qcow2 active.qcow2".into(),
        "job-step active.qcow2 8".into(),
        io(COMMIT_EARLY),
    ];
    for round in 0..5 {
        lines.push("job-step active.qcow2 16".into());
        if round == 1 {
            lines.push(io(COMMIT_LATE));
        }
    }
    lines.extend([
        "job-step active.qcow2 1000".into(),
        io(COMMIT_READY),
        "job-info active.qcow2".into(),
        "job-complete active.qcow2".into(),
        "job-wait active.qcow2".into(),
        // 3. the device is on base now.
        io(AFTER_PIVOT),
        io_command("active.qcow2", true, &pattern_reads(FINAL, DISK_SIZE)),
        "checksum active.qcow2".into(),
        "checksum base.qcow2".into(),
        "info --backing-chain base.qcow2".into(),
    ]);
    lines.join("; ")
}

pub fn run(ws: &Workspace) -> Result<()> {
    let started = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    prereq::ensure_all(ws)?;
    let kernel = qemu::build_kernel(ws, Profile::Release)?;
    let cli = super::build_cli(ws, false)?;
    timings.push(("build", started.elapsed()));

    let phase = Instant::now();
    let mut lab = Lab::fresh(ws.target_dir.join("demo"), &kernel, Machine::Microvm)?;
    lab.live = true;
    lab.timeout = Duration::from_secs(60);
    let demo = Demo { lab, cli };
    println!("==> building the chain in {}", demo.lab.dir.display());
    demo.build_chain()?;
    let chain_before = chain_text(&demo.lab.chain("active.qcow2")?);
    timings.push(("chain", phase.elapsed()));

    let mut report = Report::default();
    demo.before_boot(&mut report);
    let untouched = demo.lab.save(&["snap1.qcow2", "snap2.qcow2"])?;

    let phase = Instant::now();
    let script = script();
    println!(
        "==> booting the kernel (microvm, {} disks, a script of {} bytes)",
        IMAGES.len(),
        script.len()
    );
    let run = demo.lab.boot(
        IMAGES
            .iter()
            .map(|name| demo.lab.disk(name, false))
            .collect(),
        &script,
    )?;
    timings.push(("boot", phase.elapsed()));

    let phase = Instant::now();
    println!("==> verifying on the host");
    demo.after_boot(&run, &untouched, &mut report);
    timings.push(("verify", phase.elapsed()));

    let chain_after = [
        ("base.qcow2 (the device)", demo.lab.chain("base.qcow2")),
        ("active.qcow2 (retired)", demo.lab.chain("active.qcow2")),
    ]
    .map(|(what, chain)| match chain {
        Ok(chain) => format!("{what}: {}", chain_text(&chain)),
        Err(err) => format!("{what}: {err}"),
    });
    report.print(
        &timings,
        started.elapsed(),
        &chain_before,
        &chain_after,
        &run,
    );
    if report.all_passed() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "demo: {} of {} checks failed",
            report.failures(),
            report.checks.len()
        )))
    }
}

struct Demo {
    lab: Lab,
    cli: std::path::PathBuf,
}

impl Demo {
    fn blockgraph(&self) -> Cmd {
        Cmd::new(&self.cli)
            .cwd(&self.lab.dir)
            .timeout(Duration::from_secs(30))
            .quiet()
    }

    /// base <- snap1 <- snap2 <- active (relative names, `-F qcow2`), a
    /// copy of it for the replay, base and active padded.
    fn build_chain(&self) -> Result<()> {
        for (image, backing, writes) in LAYERS {
            self.lab.create(image, "64M", backing, None, writes)?;
            println!(
                "    {image:<13} {}{}",
                backing.map_or(String::new(), |b| format!("on {b:<12} ")),
                writes.join(", ")
            );
        }
        self.lab.copy_chain(&IMAGES, "expected")?;
        self.lab.pad("base.qcow2", PAD)?;
        self.lab.pad("active.qcow2", PAD)?;
        Ok(())
    }

    fn before_boot(&self, report: &mut Report) {
        report.check(
            "the chain as built reads as designed (qemu-img convert)",
            || {
                self.lab
                    .qemu_img(&["convert", "-O", "raw", "active.qcow2", "before.qemu.raw"])?;
                expect_layout(&self.lab.path("before.qemu.raw"), BUILT)
            },
        );
        report.check("host CLI: blockgraph convert == qemu-img convert", || {
            self.blockgraph()
                .args(["convert", "active.qcow2", "before.raw"])
                .read()?;
            same_bytes(
                &self.lab.path("before.raw"),
                &self.lab.path("before.qemu.raw"),
            )
        });
    }

    fn after_boot(&self, run: &BootResult, untouched: &lab::Saved, report: &mut Report) {
        let lab = &self.lab;
        report.check("the kernel ran the whole script (exit status 33)", || {
            if run.succeeded() {
                Ok(())
            } else {
                Err(Error::msg(run.verdict()))
            }
        });
        report.check(
            "kernel checksum before the jobs == host FNV-1a of the chain as built",
            || {
                let (_, hash, size) = lab::checksums(&run.serial)
                    .into_iter()
                    .find(|(name, _, _)| name == "active.qcow2")
                    .ok_or_else(|| Error::msg("no checksum line before the jobs"))?;
                let file = fs::File::open(lab.path("before.qemu.raw"))
                    .context("opening before.qemu.raw")?;
                let want = lab::fnv1a64(file).context("reading before.qemu.raw")?;
                if (hash, size) == want {
                    Ok(())
                } else {
                    Err(Error::msg(format!(
                        "kernel {hash:016x} ({size} bytes), host {:016x} ({} bytes)",
                        want.0, want.1
                    )))
                }
            },
        );
        report.check(
            "stream: active.qcow2 now has backing file snap1.qcow2",
            || {
                expect_text(
                    run,
                    "Image 'active.qcow2' now has backing file 'snap1.qcow2'",
                )?;
                lab.expect_chain(
                    "active.qcow2",
                    &["active.qcow2", "snap1.qcow2", "base.qcow2"],
                )
                .map(drop)
            },
        );
        report.check(
            "active commit: pivot to base.qcow2, which has no backing file",
            || {
                for text in [
                    "job commit on active.qcow2: running",
                    "job commit on active.qcow2: ready",
                    "Image 'base.qcow2' is now the active image",
                ] {
                    expect_text(run, text)?;
                }
                lab.expect_chain("base.qcow2", &["base.qcow2"]).map(drop)
            },
        );
        report.check("qemu-img check: all four images exit 0", || {
            lab.check(&IMAGES)
        });
        report.check("snap1.qcow2 and snap2.qcow2 are byte-identical", || {
            lab.unchanged(untouched)
        });
        report.check(
            "expected view: qemu-io replay of the guest writes reads as designed",
            || {
                lab.qemu_io("expected-active.qcow2", &guest_writes())?;
                lab.qemu_img(&[
                    "convert",
                    "-O",
                    "raw",
                    "expected-active.qcow2",
                    "expected.raw",
                ])?;
                expect_layout(&lab.path("expected.raw"), FINAL)
            },
        );
        report.check(
            "qemu-img compare base.qcow2 expected.raw: identical",
            || lab.same_view("base.qcow2", "expected.raw"),
        );
        report.check(
            "kernel checksums (device, base.qcow2) == host FNV-1a of the expected view",
            || {
                lab.expect_checksum(&run.serial, "active.qcow2", "expected.raw")?;
                lab.expect_checksum(&run.serial, "base.qcow2", "expected.raw")?;
                Ok(())
            },
        );
        report.check(
            "host CLI: blockgraph convert base.qcow2 == expected",
            || {
                self.blockgraph()
                    .args(["convert", "base.qcow2", "after.raw"])
                    .read()?;
                same_bytes(&lab.path("after.raw"), &lab.path("expected.raw"))
            },
        );
    }
}

fn expect_text(run: &BootResult, text: &str) -> Result<()> {
    if run.serial.contains(text) {
        Ok(())
    } else {
        Err(Error::msg(format!("the kernel did not print `{text}`")))
    }
}

/// Checks a raw image against a layout; the error names the first wrong byte.
fn expect_layout(path: &Path, layout: &Layout) -> Result<()> {
    let data = crate::tasks::read_file(path)?;
    if data.len() as u64 != DISK_SIZE {
        return Err(Error::msg(format!(
            "{} is {} bytes, expected {DISK_SIZE}",
            path.display(),
            data.len()
        )));
    }
    for (start, len, want) in lab::runs(layout, DISK_SIZE) {
        let segment = &data[start as usize..(start + len) as usize];
        if let Some(i) = segment.iter().position(|&byte| byte != want) {
            return Err(Error::msg(format!(
                "byte {:#x} is {:#04x}, expected {want:#04x}",
                start + i as u64,
                segment[i]
            )));
        }
    }
    Ok(())
}

/// Both files hold the same bytes; the error says where they first differ.
fn same_bytes(a: &Path, b: &Path) -> Result<()> {
    let read = crate::tasks::read_file;
    let (x, y) = (read(a)?, read(b)?);
    if x.len() != y.len() {
        return Err(Error::msg(format!(
            "{} is {} bytes, {} {}",
            a.display(),
            x.len(),
            b.display(),
            y.len()
        )));
    }
    match x.iter().zip(&y).position(|(p, q)| p != q) {
        None => Ok(()),
        Some(at) => Err(Error::msg(format!(
            "{} and {} differ first at byte {at:#x} ({:#04x} vs {:#04x})",
            a.display(),
            b.display(),
            x[at],
            y[at]
        ))),
    }
}

/// PASS/FAIL per check, printed as it goes and summed up at the end.
#[derive(Default)]
struct Report {
    checks: Vec<(&'static str, Option<String>)>,
}

impl Report {
    /// Runs one check; an error fails the check, not the demo.
    fn check(&mut self, name: &'static str, check: impl FnOnce() -> Result<()>) {
        let failure = check().err().map(|err| err.to_string());
        match &failure {
            None => println!("PASS {name}"),
            Some(why) => println!("FAIL {name}{}", indented(why)),
        }
        self.checks.push((name, failure));
    }

    fn failures(&self) -> usize {
        self.checks.iter().filter(|(_, f)| f.is_some()).count()
    }

    fn all_passed(&self) -> bool {
        self.failures() == 0
    }

    fn print(
        &self,
        timings: &[(&str, Duration)],
        total: Duration,
        before: &str,
        after: &[String],
        run: &BootResult,
    ) {
        println!();
        println!("demo report ({:.1} s):", total.as_secs_f64());
        println!("  chain before: {before}");
        for line in after {
            println!("  chain after:  {line}");
        }
        let mut progress: Vec<&str> = run
            .serial
            .lines()
            .filter(|line| line.starts_with("job ") || line.starts_with("Image '"))
            .collect();
        progress.dedup();
        println!("  job progress (kernel):");
        for line in progress {
            println!("    {line}");
        }
        let times: Vec<String> = timings
            .iter()
            .map(|(what, time)| format!("{what} {:.1} s", time.as_secs_f64()))
            .collect();
        println!("  timings: {}", times.join(", "));
        println!("  kernel: {}", run.verdict());
        for (name, failure) in &self.checks {
            let verdict = if failure.is_some() { "FAIL" } else { "PASS" };
            println!("  {verdict}  {name}");
        }
        let passed = self.checks.len() - self.failures();
        println!("  {passed}/{} checks passed", self.checks.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_fits_on_a_microvm_command_line() {
        let script = script();
        assert!(
            script.len() <= qemu::MICROVM_CMDLINE_MAX,
            "{}",
            script.len()
        );
        assert_eq!(script.matches("job-start").count(), 2);
    }

    #[test]
    fn the_final_layout_is_the_built_one_plus_the_guest_writes() {
        // Every guest write of a pattern appears in FINAL, in order, after
        // the built layers.
        let writes: Vec<(u64, u8)> = guest_writes()
            .iter()
            .map(|w| {
                let words: Vec<&str> = w.split(' ').collect();
                let byte = u8::from_str_radix(&words[2][2..], 16).unwrap();
                (FINAL.iter().position(|r| r.2 == byte).unwrap() as u64, byte)
            })
            .collect();
        assert!(writes.windows(2).all(|p| p[0].0 < p[1].0), "{writes:?}");
        assert_eq!(&FINAL[..BUILT.len()], BUILT);
    }

    #[test]
    fn differences_are_located() {
        let dir = std::env::temp_dir().join(format!("xtask-demo-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        let mut data = vec![7u8; (MIB + 10) as usize];
        fs::write(&a, &data).unwrap();
        fs::write(&b, &data).unwrap();
        same_bytes(&a, &b).unwrap();
        data[(MIB + 3) as usize] = 8;
        fs::write(&b, &data).unwrap();
        let diff = same_bytes(&a, &b).unwrap_err().to_string();
        assert!(diff.contains("0x100003"), "{diff}");
        fs::write(&c, [7u8; 3]).unwrap();
        assert!(same_bytes(&a, &c)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
