//! `cargo xtask bench`: blockgraph against qemu-img on one machine, in one
//! run, and a report in `target/bench/report.md`.
//!
//! The chain, built once with qemu-img/qemu-io in `target/bench/` and kept
//! between runs (rebuilt when its stamp, `chain.stamp`, does not match the
//! layout below or the files changed):
//!
//! ```text
//! base.qcow2  <-  mid.qcow2  <-  top.qcow2        1 GiB virtual, 64 KiB clusters
//! in every 8 MiB:
//! 0x11 @0 4M      0x22 @2M 1M    0x33 @2.5M 1M    (4M..8M unallocated)
//! 512 MiB         128 MiB        128 MiB          of data
//! ```
//!
//! plus `view.raw`, its guest view (`qemu-img convert -O raw`).
//!
//! Cases, each run by both tools [`ROUNDS`] times, alternating which goes
//! first, on identical inputs (fresh copies of the chain or fresh overlays
//! where a run writes); the median counts and ratio = qemu-img time /
//! blockgraph time (above 1: blockgraph is faster). After the first round
//! `qemu-img compare` must find both results identical.
//!
//! | case | qemu-img | blockgraph | time |
//! |---|---|---|---|
//! | reads, QD 1, 4 and 64 KiB | `bench -d 1 -c N -s S top` | `bench -c N -s S top` | as printed |
//! | reads, QD 32, 4 KiB | `bench -d 32 -c N -s 4k top` | `bench -d 32 -c N -s 4k top` | as printed |
//! | reads, QD 1 and 32, 4 KiB, cache none | `bench -t none -d D -c N -s 4k -S 1028k top` | the same | as printed |
//! | in-place writes, QD 1 and 32, 4 KiB, cache none | `bench -w -t none -d D -c N -s 4k` on an allocated overlay | the same | as printed |
//! | convert | `convert -O raw top` | `convert top` | wall |
//! | commit top+mid into base | `commit -b base top` | `commit --base base top` | wall |
//! | stream into top | `rebase -b '' top` | `stream top` | wall |
//! | 4 KiB writes, scattered | `bench -w -d 1 -S 1028k` on a new overlay (64 KiB clusters; extended L2 with 128 KiB clusters) | `bench -w -S 1028k` | as printed |
//!
//! Then blockgraph's reads against the physical limit, a `pread` loop over
//! `view.raw` at the same offsets, and `blockgraph sizes` (static memory).
//!
//! Then the kernel (q35, TCG): 4 KiB reads at queue depths 1, 8 and 32,
//! random and 8 MiB apart, through the chain on three virtio disks and on
//! `view.raw` as a raw virtio disk in the same boot; IOPS and their ratio,
//! against the targets (chain at least 0.8x the raw disk at each depth,
//! chain QD 32 at least 2x QD 1).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::lab::{Lab, KIB, MIB};
use super::qemu::{self, Machine, Profile};
use crate::cmd::{indented, Cmd};
use crate::{prereq, Context, Error, Result, Workspace};

/// Runs per tool and case; the median is reported.
const ROUNDS: usize = 7;
/// Requests of the read cases (and of the pread loop).
const READ_COUNT: u64 = 20_000;
/// Requests of the queued read case (QD 32: fewer, to keep the run time).
const QUEUED_READ_COUNT: u64 = 10_000;
/// Requests of the scattered write case and of the in-place write cases.
const WRITE_COUNT: u64 = 10_000;
/// What an allocated overlay has written (from 0): the in-place write
/// cases' requests, [`WRITE_COUNT`] × 4 KiB from 0, stay inside.
const ALLOCATED: &str = "40M";
/// The step of the cache-none read cases: 1 MiB + 4 KiB, so that requests
/// scatter over every layer and the unallocated ranges, wrapping.
const SCATTER_STEP: &str = "1028k";
/// Its step: 1 MiB + 4 KiB, so that successive writes land in different
/// clusters and offsets wrap around the disk.
const WRITE_STEP: &str = "1028k";
/// No timed command may take longer.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The virtual size, the stripe every layer repeats, and the layers (name,
/// pattern, offset and length within each stripe, in KiB).
const DISK_SIZE: u64 = 1024 * MIB;
const STRIPE: u64 = 8 * MIB;
const LAYERS: [(&str, u8, u64, u64); 3] = [
    ("base.qcow2", 0x11, 0, 4096),
    ("mid.qcow2", 0x22, 2048, 1024),
    ("top.qcow2", 0x33, 2560, 1024),
];
const CHAIN: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];
/// The chain's layout, version 1: change it whenever the layout changes.
const STAMP: &str = "blockgraph bench chain v1: 1 GiB, 64 KiB clusters, stripes of 8 MiB: \
                     base 0x11 @0 4M <- mid 0x22 @2M 1M <- top 0x33 @2.5M 1M; view.raw";
/// Files of one run start with this; they are removed after every round.
const RUN_PREFIX: &str = "run-";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    QemuImg,
    Blockgraph,
}

impl Tool {
    /// The prefix of this tool's fresh inputs and outputs.
    fn prefix(self) -> &'static str {
        match self {
            Tool::QemuImg => "run-qemu",
            Tool::Blockgraph => "run-bg",
        }
    }
}

/// The two tools in the order of round `round`.
fn order(round: usize) -> [Tool; 2] {
    alternate(round, [Tool::QemuImg, Tool::Blockgraph])
}

/// `pair` in round `round`'s order: as given on even rounds, swapped on
/// odd ones, so neither side always goes first.
pub(crate) fn alternate<T>(round: usize, mut pair: [T; 2]) -> [T; 2] {
    if !round.is_multiple_of(2) {
        pair.swap(0, 1);
    }
    pair
}

/// What a run is timed by.
#[derive(Clone, Copy)]
enum Timing {
    /// The tool's own "Run completed in X seconds." (`bench`: the I/O loop
    /// only, without start-up, open and the final flush).
    Reported,
    /// The wall clock around the whole process.
    Wall,
}

/// What each run gets fresh.
#[derive(Clone, Copy)]
enum Fresh {
    /// Nothing: it only reads the chain.
    Nothing,
    /// A copy of the chain, `PREFIX-base.qcow2` <- `PREFIX-mid.qcow2` <-
    /// `PREFIX-top.qcow2`.
    Chain,
    /// An empty overlay `PREFIX-overlay.qcow2` on top.qcow2.
    Overlay,
    /// The same with extended L2 entries and 128 KiB clusters (the layout
    /// QEMU recommends for overlays: a 4 KiB write copies nothing around
    /// it).
    ExtendedOverlay,
    /// An overlay `PREFIX-overlay.qcow2` on top.qcow2 (64 KiB clusters)
    /// whose first [`ALLOCATED`] bytes are written (0x44): writes there
    /// overwrite allocated clusters in place.
    AllocatedOverlay,
}

/// One line of a table: the times of both sides.
struct Row {
    case: String,
    theirs: Vec<f64>,
    ours: Vec<f64>,
}

impl Row {
    fn new(case: impl Into<String>) -> Self {
        Row {
            case: case.into(),
            theirs: Vec::new(),
            ours: Vec::new(),
        }
    }

    fn ratio(&self) -> f64 {
        median(&self.theirs) / median(&self.ours)
    }
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// `Run completed in X seconds.` in a bench's output.
pub(crate) fn reported_seconds(output: &str) -> Option<f64> {
    output.lines().find_map(completion_seconds)
}

/// The seconds of one `Run completed in X seconds.` line.
fn completion_seconds(line: &str) -> Option<f64> {
    line.trim_end()
        .strip_prefix("Run completed in ")?
        .strip_suffix(" seconds.")?
        .parse()
        .ok()
}

pub fn run(ws: &Workspace) -> Result<()> {
    let started = Instant::now();
    println!("==> prerequisites");
    prereq::ensure_qemu(ws)?;
    let cli = super::build_cli(ws, true)?;
    let dir = ws.target_dir.join("bench");
    // Only images are built and checked here: nothing boots.
    let lab = Lab::images(dir);
    let bench = Bench { lab, cli };
    let phase = Instant::now();
    bench.prepare()?;
    let chain_time = phase.elapsed();

    let phase = Instant::now();
    let mut rows = Vec::new();
    for (size, label, depth, count) in [
        ("4k", "4 KiB", "1", READ_COUNT),
        ("64k", "64 KiB", "1", READ_COUNT),
        ("4k", "4 KiB", "32", QUEUED_READ_COUNT),
    ] {
        let count = count.to_string();
        rows.push(bench.side_by_side(
            &format!("read {label}, QD {depth}, {count} sequential requests, 3-deep chain"),
            Timing::Reported,
            Fresh::Nothing,
            None,
            |tool| match tool {
                Tool::QemuImg => words(&[
                    "bench",
                    "-f",
                    "qcow2",
                    "-d",
                    depth,
                    "-c",
                    &count,
                    "-s",
                    size,
                    "top.qcow2",
                ]),
                Tool::Blockgraph => {
                    words(&["bench", "-d", depth, "-c", &count, "-s", size, "top.qcow2"])
                }
            },
        )?);
    }
    rows.push(bench.side_by_side(
        "convert the chain to raw (1 GiB virtual, 512 MiB of data in the view)",
        Timing::Wall,
        Fresh::Nothing,
        Some("view.raw"),
        |tool| {
            let output = format!("{}-view.raw", tool.prefix());
            match tool {
                Tool::QemuImg => {
                    words(&["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", &output])
                }
                Tool::Blockgraph => words(&["convert", "-O", "raw", "top.qcow2", &output]),
            }
        },
    )?);
    rows.push(bench.side_by_side(
        "commit top and mid into base (fresh copies)",
        Timing::Wall,
        Fresh::Chain,
        Some("base.qcow2"),
        |tool| {
            let (base, top) = (
                format!("{}-base.qcow2", tool.prefix()),
                format!("{}-top.qcow2", tool.prefix()),
            );
            match tool {
                Tool::QemuImg => words(&["commit", "-f", "qcow2", "-b", &base, &top]),
                Tool::Blockgraph => words(&["commit", "--base", &base, &top]),
            }
        },
    )?);
    rows.push(bench.side_by_side(
        "stream mid and base into top (fresh copies)",
        Timing::Wall,
        Fresh::Chain,
        Some("top.qcow2"),
        |tool| {
            let top = format!("{}-top.qcow2", tool.prefix());
            match tool {
                Tool::QemuImg => words(&["rebase", "-f", "qcow2", "-b", "", &top]),
                Tool::Blockgraph => words(&["stream", &top]),
            }
        },
    )?);
    let count = WRITE_COUNT.to_string();
    for (fresh, layout) in [
        (Fresh::Overlay, "64 KiB clusters"),
        (
            Fresh::ExtendedOverlay,
            "extended L2, 128 KiB clusters (4 KiB subclusters)",
        ),
    ] {
        rows.push(bench.side_by_side(
            &format!(
                "write 4 KiB, QD 1, {WRITE_COUNT} requests 1 MiB + 4 KiB apart (wrapping), \
                 fresh overlay on the chain, {layout}"
            ),
            Timing::Reported,
            fresh,
            Some("overlay.qcow2"),
            |tool| {
                let overlay = format!("{}-overlay.qcow2", tool.prefix());
                let common = ["-c", &count, "-s", "4k", "-S", WRITE_STEP, &overlay];
                match tool {
                    Tool::QemuImg => {
                        words(&[&["bench", "-f", "qcow2", "-w", "-d", "1"], &common[..]].concat())
                    }
                    Tool::Blockgraph => words(&[&["bench", "-w"], &common[..]].concat()),
                }
            },
        )?);
    }
    let count = QUEUED_READ_COUNT.to_string();
    for depth in ["1", "32"] {
        rows.push(bench.side_by_side(
            &format!(
                "read 4 KiB, cache none, QD {depth}, {count} requests 1 MiB + 4 KiB apart \
                 (wrapping), 3-deep chain"
            ),
            Timing::Reported,
            Fresh::Nothing,
            None,
            |tool| {
                let common = ["-t", "none", "-d", depth, "-c", &count, "-s", "4k"];
                let image = ["-S", SCATTER_STEP, "top.qcow2"];
                match tool {
                    Tool::QemuImg => {
                        words(&[&["bench", "-f", "qcow2"], &common[..], &image].concat())
                    }
                    Tool::Blockgraph => words(&[&["bench"], &common[..], &image].concat()),
                }
            },
        )?);
    }
    let count = WRITE_COUNT.to_string();
    for depth in ["1", "32"] {
        rows.push(bench.side_by_side(
            &format!(
                "write 4 KiB in place, cache none, QD {depth}, {count} sequential requests \
                 over allocated clusters (overlay on the chain)"
            ),
            Timing::Reported,
            Fresh::AllocatedOverlay,
            Some("overlay.qcow2"),
            |tool| {
                let overlay = format!("{}-overlay.qcow2", tool.prefix());
                let common = ["-w", "-t", "none", "-d", depth, "-c", &count, "-s", "4k"];
                match tool {
                    Tool::QemuImg => {
                        words(&[&["bench", "-f", "qcow2"], &common[..], &[&overlay]].concat())
                    }
                    Tool::Blockgraph => words(&[&["bench"], &common[..], &[&overlay]].concat()),
                }
            },
        )?);
    }
    let mut limits = Vec::new();
    for (step, what) in [
        (None, "sequential requests"),
        (
            Some(STRIPE),
            "requests 8 MiB apart (data only: base, under two overlays)",
        ),
    ] {
        for size in [4 * KIB, 64 * KIB] {
            let label = format!("read {} KiB, QD 1, {READ_COUNT} {what}", size / KIB);
            limits.push(bench.physical_limit(&label, size, step.unwrap_or(size))?);
        }
    }
    let cases_time = phase.elapsed();

    let phase = Instant::now();
    let kernel = bench.kernel_rows(ws)?;
    let kernel_time = phase.elapsed();

    let memory = bench.blockgraph().arg("sizes").read()?;
    let report = Report {
        machine: machine(),
        versions: versions(ws),
        rows,
        limits,
        kernel,
        memory,
        chain_time,
        cases_time,
        kernel_time,
        total: started.elapsed(),
    }
    .render();
    println!();
    print!("{report}");
    let path = bench.lab.path("report.md");
    fs::write(&path, &report).context(format!("writing {}", path.display()))?;
    println!("(written to {})", path.display());
    Ok(())
}

/// Boots of the kernel case (each measures every kernel row once; odd
/// boots time the raw disk first, even ones the chain).
const KERNEL_BOOTS: usize = 7;
/// Requests per kernel measurement.
const KERNEL_READS: u64 = 8192;
/// Queue depths of the kernel rows.
const KERNEL_DEPTHS: [usize; 3] = [1, 8, 32];
/// The kernel's 4 KiB read patterns: what, and the step between requests.
/// Random: 1999 blocks of 4 KiB apart (a prime), wrapping around the 1 GiB
/// disk, so the offsets fall in every stripe, on every layer and in the
/// unallocated ranges alike.
const KERNEL_PATTERNS: [(&str, &str); 2] = [
    ("random (1999 blocks apart, wrapping)", "7996k"),
    ("8 MiB apart (data only)", "8M"),
];
/// Targets of the kernel rows: the chain's IOPS against the raw disk's at
/// each depth, and the chain's IOPS at the deepest depth against depth 1.
const KERNEL_CHAIN_VS_RAW: f64 = 0.8;
const KERNEL_DEEP_VS_QD1: f64 = 2.0;

impl Bench {
    /// Boots the kernel [`KERNEL_BOOTS`] times with the chain and view.raw
    /// attached (read-only); each boot times 4 KiB reads through the chain
    /// and on the raw disk, for every pattern and queue depth. One row per
    /// pattern and depth, in that order: `theirs` is the raw disk, `ours`
    /// the chain.
    fn kernel_rows(&self, ws: &Workspace) -> Result<Vec<Row>> {
        println!("==> kernel: 4 KiB reads at QD 1, 8, 32, chain against a raw virtio disk");
        let lab = Lab {
            dir: self.lab.dir.clone(),
            kernel: qemu::build_kernel(ws, Profile::Release)?,
            machine: Machine::Q35,
            timeout: RUN_TIMEOUT,
            live: false,
        };
        let mut rows = Vec::new();
        let mut measures = Vec::new();
        for (what, step) in KERNEL_PATTERNS {
            for depth in KERNEL_DEPTHS {
                rows.push(Row::new(format!("kernel: read 4 KiB, QD {depth}, {what}")));
                measures.push(move |image: &str| {
                    format!("bench -d {depth} -c {KERNEL_READS} -s 4k -S {step} {image}")
                });
            }
        }
        for boot in 0..KERNEL_BOOTS {
            // Images in the order this boot times them.
            let images = if boot % 2 == 0 {
                ["top.qcow2", "view.raw"]
            } else {
                ["view.raw", "top.qcow2"]
            };
            let script: Vec<String> = measures
                .iter()
                .flat_map(|measure| images.map(measure))
                .collect();
            let mut disks: Vec<_> = ["top.qcow2", "mid.qcow2", "base.qcow2", "view.raw"]
                .iter()
                .map(|name| lab.disk(name, true))
                .collect();
            disks[3].format = Some("raw".into());
            let result = lab.boot(disks, &script.join("; "))?;
            if !result.succeeded() {
                return Err(Error::msg(format!(
                    "the kernel bench boot failed: {}{}",
                    result.verdict(),
                    indented(&result.serial)
                )));
            }
            let times: Vec<f64> = result
                .serial
                .lines()
                .filter_map(completion_seconds)
                .collect();
            if times.len() != 2 * rows.len() {
                return Err(Error::msg(format!(
                    "the kernel printed {} completion lines, not {}{}",
                    times.len(),
                    2 * rows.len(),
                    indented(&result.serial)
                )));
            }
            for (row, pair) in rows.iter_mut().zip(times.chunks(2)) {
                let (chain, raw) = if boot % 2 == 0 {
                    (pair[0], pair[1])
                } else {
                    (pair[1], pair[0])
                };
                println!("    {}: chain {chain:.3} s, raw {raw:.3} s", row.case);
                row.ours.push(chain);
                row.theirs.push(raw);
            }
        }
        Ok(rows)
    }
}

/// Requests per second of [`KERNEL_READS`] requests in `seconds`.
fn iops(seconds: f64) -> f64 {
    KERNEL_READS as f64 / seconds
}

/// `met` or `missed` for a value against its target.
fn verdict(value: f64, target: f64) -> &'static str {
    if value >= target {
        "met"
    } else {
        "missed"
    }
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

struct Bench {
    lab: Lab,
    cli: PathBuf,
}

impl Bench {
    fn tool(&self, tool: Tool) -> Cmd {
        let program: &Path = match tool {
            Tool::QemuImg => Path::new("qemu-img"),
            Tool::Blockgraph => &self.cli,
        };
        Cmd::new(program)
            .cwd(&self.lab.dir)
            .timeout(RUN_TIMEOUT)
            .quiet()
    }

    fn blockgraph(&self) -> Cmd {
        self.tool(Tool::Blockgraph)
    }

    /// The chain and view.raw, reused when the stamp matches; leftovers of
    /// an interrupted run removed.
    fn prepare(&self) -> Result<()> {
        let stamp = self.lab.path("chain.stamp");
        let wanted = |recorded: &str| recorded == self.stamp().ok().as_deref().unwrap_or("");
        match fs::read_to_string(&stamp) {
            Ok(recorded) if wanted(&recorded) => {
                println!("==> reusing the chain in {}", self.lab.dir.display());
                return self.remove_run_files();
            }
            _ => {}
        }
        println!(
            "==> building the chain in {} (1 GiB virtual, 768 MiB of data)",
            self.lab.dir.display()
        );
        let dir = &self.lab.dir;
        if dir.exists() {
            fs::remove_dir_all(dir).context(format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(dir).context(format!("creating {}", dir.display()))?;
        let mut below = None;
        for (name, pattern, start, len) in LAYERS {
            let writes: Vec<String> = (0..DISK_SIZE / STRIPE)
                .map(|stripe| {
                    let offset = stripe * STRIPE + start * KIB;
                    format!("write -P {pattern:#04x} {offset} {}", len * KIB)
                })
                .collect();
            let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
            self.lab
                .create(name, "1G", below, Some("cluster_size=65536"), &writes)?;
            println!(
                "    {name:<10} {}{pattern:#04x} @{start}k {len}k in every 8M",
                below.map_or(String::new(), |b| format!("on {b:<10} ")),
            );
            below = Some(name);
        }
        self.lab.qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "top.qcow2",
            "view.raw",
        ])?;
        fs::write(&stamp, self.stamp()?).context(format!("writing {}", stamp.display()))
    }

    /// [`STAMP`] and the length and modification time of every file of the
    /// chain: a chain changed since it was built is built again.
    fn stamp(&self) -> Result<String> {
        let mut text = format!("{STAMP}\n");
        for name in CHAIN.iter().chain(&["view.raw"]) {
            let path = self.lab.path(name);
            let meta = fs::metadata(&path).context(format!("stat {}", path.display()))?;
            let _ = writeln!(
                text,
                "{name} {} {}.{:09}",
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            );
        }
        Ok(text)
    }

    fn remove_run_files(&self) -> Result<()> {
        let dir = &self.lab.dir;
        for entry in fs::read_dir(dir).context(format!("listing {}", dir.display()))? {
            let entry = entry.context(format!("listing {}", dir.display()))?;
            if entry.file_name().to_string_lossy().starts_with(RUN_PREFIX) {
                let path = entry.path();
                fs::remove_file(&path).context(format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Fresh inputs of `tool` for one run.
    fn fresh(&self, fresh: Fresh, tool: Tool) -> Result<()> {
        match fresh {
            Fresh::Nothing => Ok(()),
            Fresh::Chain => self.lab.copy_chain(&CHAIN, tool.prefix()).map(drop),
            Fresh::Overlay => {
                let overlay = format!("{}-overlay.qcow2", tool.prefix());
                self.lab
                    .create(&overlay, "1G", Some("top.qcow2"), None, &[])
            }
            Fresh::ExtendedOverlay => {
                let overlay = format!("{}-overlay.qcow2", tool.prefix());
                let options = Some("extended_l2=on,cluster_size=128k");
                self.lab
                    .create(&overlay, "1G", Some("top.qcow2"), options, &[])
            }
            Fresh::AllocatedOverlay => {
                let overlay = format!("{}-overlay.qcow2", tool.prefix());
                let fill = format!("write -P 0x44 0 {ALLOCATED}");
                let options = Some("cluster_size=65536");
                self.lab
                    .create(&overlay, "1G", Some("top.qcow2"), options, &[&fill])
            }
        }
    }

    /// Both tools run once untimed, and `result` (the file named so after
    /// each tool's prefix, as `PREFIX-NAME`) must have the same guest view;
    /// then both run `ROUNDS` times, alternating which goes first. A run's
    /// files are removed right after it, so each run finds the memory the
    /// last one freed (this VM pays for the first touch of fresh memory, and
    /// a run that came second used to pay for it alone).
    fn side_by_side(
        &self,
        case: &str,
        timing: Timing,
        fresh: Fresh,
        result: Option<&str>,
        args: impl Fn(Tool) -> Vec<String>,
    ) -> Result<Row> {
        println!("==> {case}");
        if let Some(result) = result {
            for tool in order(0) {
                self.timed_run(fresh, tool, timing, &args)?;
            }
            let [a, b] =
                [Tool::QemuImg, Tool::Blockgraph].map(|tool| format!("{}-{result}", tool.prefix()));
            self.lab.same_view(&a, &b)?;
            println!("    results identical (qemu-img compare {a} {b})");
            self.remove_run_files()?;
        }
        let mut row = Row::new(case);
        for round in 0..ROUNDS {
            for tool in order(round) {
                let seconds = self.timed_run(fresh, tool, timing, &args)?;
                println!("    {:<10} {seconds:.3} s", name(tool));
                match tool {
                    Tool::QemuImg => row.theirs.push(seconds),
                    Tool::Blockgraph => row.ours.push(seconds),
                }
                self.remove_run_files()?;
            }
        }
        Ok(row)
    }

    /// One run of `tool` on fresh inputs, after a `sync`: its time.
    fn timed_run(
        &self,
        fresh: Fresh,
        tool: Tool,
        timing: Timing,
        args: &impl Fn(Tool) -> Vec<String>,
    ) -> Result<f64> {
        self.fresh(fresh, tool)?;
        settle()?;
        let cmd = self.tool(tool).args(args(tool));
        let start = Instant::now();
        let out = cmd.output()?;
        let wall = start.elapsed().as_secs_f64();
        if !out.status.success() {
            return Err(Error::msg(format!(
                "`{cmd}` failed ({}){}",
                out.status,
                indented(&(out.stdout_text() + &out.stderr_text()))
            )));
        }
        match timing {
            Timing::Wall => Ok(wall),
            Timing::Reported => reported_seconds(&out.stdout_text()).ok_or_else(|| {
                Error::msg(format!(
                    "`{cmd}` printed no \"Run completed in X seconds.\"{}",
                    indented(&out.stdout_text())
                ))
            }),
        }
    }

    /// `pread` of `size` bytes every `step` bytes from view.raw, against
    /// blockgraph's reads of the same offsets through the chain.
    fn physical_limit(&self, label: &str, size: u64, step: u64) -> Result<Row> {
        println!("==> {label}: pread loop on view.raw vs blockgraph on the chain");
        let mut row = Row::new(label);
        let raw = self.lab.path("view.raw");
        let count = READ_COUNT.to_string();
        let (len, step_text) = (size.to_string(), step.to_string());
        for round in 0..ROUNDS {
            for tool in order(round) {
                settle()?;
                let seconds = match tool {
                    Tool::QemuImg => pread_loop(&raw, READ_COUNT, size, step)?,
                    Tool::Blockgraph => {
                        let cmd = self.blockgraph().args([
                            "bench",
                            "-c",
                            &count,
                            "-s",
                            &len,
                            "-S",
                            &step_text,
                            "top.qcow2",
                        ]);
                        let out = cmd.read()?;
                        reported_seconds(&out).ok_or_else(|| {
                            Error::msg(format!("`{cmd}` printed no completion line"))
                        })?
                    }
                };
                let who = if tool == Tool::QemuImg {
                    "pread"
                } else {
                    "blockgraph"
                };
                println!("    {who:<10} {seconds:.3} s");
                match tool {
                    Tool::QemuImg => row.theirs.push(seconds),
                    Tool::Blockgraph => row.ours.push(seconds),
                }
            }
        }
        Ok(row)
    }
}

/// Writes every dirty page of the system back (`sync`), so that no run
/// pays for the writeback of an earlier one's output.
fn settle() -> Result<()> {
    Cmd::new("sync").quiet().run()
}

fn name(tool: Tool) -> &'static str {
    match tool {
        Tool::QemuImg => "qemu-img",
        Tool::Blockgraph => "blockgraph",
    }
}

/// `count` preads of `size` bytes at 0, step, 2 step, ... (wrapping at the
/// end of the file as `qemu-img bench` does): the time of the loop.
fn pread_loop(path: &Path, count: u64, size: u64, step: u64) -> Result<f64> {
    let file = File::open(path).context(format!("opening {}", path.display()))?;
    let end = file
        .metadata()
        .context(format!("stat {}", path.display()))?
        .len();
    let mut buf = vec![0u8; size as usize];
    let mut offset = 0;
    let start = Instant::now();
    for _ in 0..count {
        if let Err(err) = file.read_exact_at(&mut buf, offset) {
            return Err(Error::msg(format!(
                "reading {} at {offset}: {err}",
                path.display()
            )));
        }
        offset = (offset + step) % end;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// CPUs, kernel and CPU model.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cpus} CPUs (nproc), {model}, Linux {kernel}")
}

/// qemu-img, rustc and the tree measured.
pub(crate) fn versions(ws: &Workspace) -> Vec<String> {
    let first_line = |cmd: Cmd| {
        cmd.quiet()
            .read()
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into())
    };
    let mut tree = first_line(
        Cmd::new("git")
            .cwd(&ws.root)
            .args(["rev-parse", "--short", "HEAD"]),
    );
    let dirty = Cmd::new("git")
        .cwd(&ws.root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .quiet()
        .read()
        .is_ok_and(|text| !text.trim().is_empty());
    if dirty {
        tree.push_str(" (with uncommitted changes)");
    }
    vec![
        first_line(Cmd::new("qemu-img").arg("--version")),
        first_line(Cmd::new("rustc").cwd(&ws.root).arg("--version")),
        format!("blockgraph at git {tree}, release build"),
    ]
}

struct Report {
    machine: String,
    versions: Vec<String>,
    rows: Vec<Row>,
    limits: Vec<Row>,
    /// Kernel rows: `theirs` is the raw disk, `ours` the chain.
    kernel: Vec<Row>,
    memory: String,
    chain_time: Duration,
    cases_time: Duration,
    kernel_time: Duration,
    total: Duration,
}

impl Report {
    fn render(&self) -> String {
        let mut out = String::new();
        let _ = self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) -> std::fmt::Result {
        report_header(out, "blockgraph benchmark", &self.machine, &self.versions)?;
        writeln!(
            out,
            "- chain: base.qcow2 (512 MiB of data) <- mid.qcow2 (128 MiB) <- top.qcow2 \
             (128 MiB), 1 GiB virtual, 64 KiB clusters; in every 8 MiB: base 0x11 @0 4M, \
             mid 0x22 @2M 1M, top 0x33 @2.5M 1M, 4M..8M unallocated; files in the page cache \
             (the cache-none rows bypass it: `-t none`, O_DIRECT on both sides)"
        )?;
        writeln!(
            out,
            "- method: one untimed run per tool whose results are compared with \
             `qemu-img compare`, then {ROUNDS} timed runs per tool and case, alternating \
             which tool goes first, on identical inputs (fresh copies or overlays where a \
             run writes, synced first; a run's files removed right after it); median; \
             `bench` rows time the I/O loop as each tool prints it, the others the whole \
             process"
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| case | qemu-img | blockgraph | ratio (qemu-img / blockgraph) |"
        )?;
        writeln!(out, "|---|---:|---:|---:|")?;
        for row in &self.rows {
            table_row(out, row)?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "ratio above 1: blockgraph is faster. The physical limit, a pread loop over \
             the same data as a raw file (view.raw) at the same offsets; half of the \
             sequential offsets lie where the chain is unallocated, which blockgraph \
             answers with zeros from its metadata alone while the loop reads the raw \
             file's holes through the kernel, so there blockgraph can beat the loop; the \
             data-only rows have no such ranges:"
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| case | pread loop | blockgraph (chain) | ratio (pread / blockgraph) |"
        )?;
        writeln!(out, "|---|---:|---:|---:|")?;
        for row in &self.limits {
            table_row(out, row)?;
        }
        writeln!(out)?;
        writeln!(out, "runs (seconds, in order):")?;
        writeln!(out)?;
        for row in self.rows.iter().chain(&self.limits).chain(&self.kernel) {
            writeln!(
                out,
                "- {}: {} | blockgraph {}",
                row.case,
                runs(&row.theirs),
                runs(&row.ours)
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "kernel: blockgraph-kernel on QEMU q35 (TCG), {KERNEL_BOOTS} boots, each \
             timing {KERNEL_READS} reads of 4 KiB through the chain (top.qcow2 <- mid <- \
             base, three virtio disks) and on the same guest view as a raw virtio disk \
             (view.raw) in the same boot, by the kernel's `bench -d QD` (QD 1: the \
             synchronous path; deeper: the request engine, many virtio-blk requests in \
             flight); median per row. Random offsets reach the chain's unallocated half \
             too (zeros from metadata, no disk read); the 8 MiB-apart rows read base data \
             under two overlays only, the chain's worst case (every request walks three \
             layers' metadata). \
             Targets (set for random reads; shown for both): chain at least \
             {KERNEL_CHAIN_VS_RAW:.1}x the raw disk's IOPS at each depth, chain QD 32 at \
             least {KERNEL_DEEP_VS_QD1:.0}x chain QD 1:"
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| case | raw disk IOPS | chain IOPS | ratio (chain / raw) |"
        )?;
        writeln!(out, "|---|---:|---:|---:|")?;
        for row in &self.kernel {
            writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.2} ({}) |",
                row.case,
                iops(median(&row.theirs)),
                iops(median(&row.ours)),
                row.ratio(),
                verdict(row.ratio(), KERNEL_CHAIN_VS_RAW)
            )?;
        }
        writeln!(out)?;
        for (rows, (what, _)) in self.kernel.chunks(KERNEL_DEPTHS.len()).zip(KERNEL_PATTERNS) {
            let (first, last) = (&rows[0], &rows[rows.len() - 1]);
            let chain = median(&first.ours) / median(&last.ours);
            let raw = median(&first.theirs) / median(&last.theirs);
            writeln!(
                out,
                "- {what}: QD {} / QD {} IOPS: chain {chain:.2} ({}), raw disk {raw:.2}",
                KERNEL_DEPTHS[KERNEL_DEPTHS.len() - 1],
                KERNEL_DEPTHS[0],
                verdict(chain, KERNEL_DEEP_VS_QD1)
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "memory: static size of the default configuration (`blockgraph sizes`; the \
             kernel uses the same default graph and a 1 MiB scratch):"
        )?;
        writeln!(out)?;
        writeln!(out, "```text")?;
        write!(out, "{}", self.memory)?;
        writeln!(out, "```")?;
        writeln!(out)?;
        writeln!(
            out,
            "time: chain {:.1} s, cases {:.1} s, kernel {:.1} s, total {:.1} s",
            self.chain_time.as_secs_f64(),
            self.cases_time.as_secs_f64(),
            self.kernel_time.as_secs_f64(),
            self.total.as_secs_f64()
        )
    }
}

/// A report's title, then the machine and the versions as a list.
pub(crate) fn report_header(
    out: &mut String,
    title: &str,
    machine: &str,
    versions: &[String],
) -> std::fmt::Result {
    writeln!(out, "# {title}")?;
    writeln!(out)?;
    writeln!(out, "- machine: {machine}")?;
    for version in versions {
        writeln!(out, "- {version}")?;
    }
    Ok(())
}

fn table_row(out: &mut String, row: &Row) -> std::fmt::Result {
    writeln!(
        out,
        "| {} | {:.3} s | {:.3} s | {:.2} |",
        row.case,
        median(&row.theirs),
        median(&row.ours),
        row.ratio()
    )
}

fn runs(times: &[f64]) -> String {
    times
        .iter()
        .map(|t| format!("{t:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let row = Row {
            case: "x".into(),
            theirs: vec![1.0, 1.0, 9.0],
            ours: vec![0.5, 0.4, 0.6],
        };
        assert_eq!(row.ratio(), 2.0);
    }

    #[test]
    fn completion_lines_are_parsed() {
        let out = "Sending 3 read requests, 4096 bytes each, 1 in parallel \
                   (starting at offset 0, step size 4096)\nRun completed in 0.512 seconds.\n";
        assert_eq!(reported_seconds(out), Some(0.512));
        assert_eq!(reported_seconds("Run completed in x seconds."), None);
    }

    #[test]
    fn rounds_alternate_the_first_tool() {
        assert!(order(0)[0] == Tool::QemuImg && order(1)[0] == Tool::Blockgraph);
    }

    #[test]
    fn the_layers_fit_their_stripes() {
        for (_, _, start, len) in LAYERS {
            assert!((start + len) * KIB <= STRIPE);
        }
    }
}
