//! `cargo xtask bench --guest [--seconds N] [--rounds R]`: the same Linux guest and the
//! same qcow2 chain served over vhost-user-blk by `blockgraph serve` and
//! by qemu-storage-daemon, fio in the guest; then the same rows on the
//! host through NBD with `qemu-img bench`.
//!
//! ```text
//! base.qcow2 (1 GiB, 0x11 over the first 512 MiB)
//!   <- mid.qcow2 (64 x 2 MiB of 0x22, at i * 16 MiB)
//!   <- top.qcow2 (64 x 2 MiB of 0x33, at i * 16 MiB + 8 MiB)    64 KiB clusters
//! ```
//!
//! The chain is made once in `target/gbench/chain/` (kept while its stamp
//! matches) and copied for each server (`target/gbench/qsd/`,
//! `target/gbench/blockgraph/`), so no write of one server reaches the
//! other. The write rows run on a fresh empty overlay `w.qcow2` on top of
//! the server's copy, made before each such run.
//!
//! Guest rows: one boot per row, server and round (the kernel's `bgjob=NAME`
//! picks the fio job, `/init`'s bench mode prints fio's terse output),
//! alternating which server goes first from row to row and round to
//! round; each server's median run (by IOPS) of the `R` rounds is
//! reported, and so are NBD rows; nothing else runs
//! meanwhile (guest time follows host time only on an idle host). Cache
//! mode: both through the page cache (`blockgraph serve`'s default `-t
//! writeback`, QSD's default `cache.direct=off`); fio in the guest uses
//! `direct=1`.
//!
//! NBD rows: each server exports the chain on a Unix socket (`serve
//! --nbd`, QSD's `--nbd-server` + `--export type=nbd`) and `qemu-img bench`
//! on the host drives it: a fixed number of requests (no latencies, only
//! the time of the I/O loop as qemu-img prints it).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::initramfs::{self, BENCH_RESULT, TERSE_BEGIN, TERSE_END};
use super::server::{Export, Node, NBD_EXPORT};
use super::{fetch, Console, Served, Server, CHAIN};
use crate::cmd::{indented, Cmd};
use crate::tasks::bench::{alternate, machine, report_header, reported_seconds, versions};
use crate::tasks::lab::Lab;
use crate::tasks::qemu::Machine;
use crate::{prereq, Context, Error, Result, Workspace};

/// One measured pattern: a fio job in the guest and the matching
/// `qemu-img bench` on the host.
struct Job {
    /// The fio job's name (`/jobs/NAME.fio`, `bgjob=NAME`).
    name: &'static str,
    label: &'static str,
    /// fio's `rw=`.
    rw: &'static str,
    /// Request size in KiB.
    kib: u32,
    depth: u32,
    /// Writes: on a fresh empty overlay on top of the chain.
    writes: bool,
    /// `qemu-img bench` requests per second of `--seconds` (about what
    /// the fastest server here does, so a row lasts about that long).
    nbd_rate: u64,
}

const JOBS: [Job; 4] = [
    Job {
        name: "randread-4k-qd1",
        label: "4 KiB random read, QD 1",
        rw: "randread",
        kib: 4,
        depth: 1,
        writes: false,
        nbd_rate: 8_000,
    },
    Job {
        name: "randread-4k-qd32",
        label: "4 KiB random read, QD 32",
        rw: "randread",
        kib: 4,
        depth: 32,
        writes: false,
        nbd_rate: 20_000,
    },
    Job {
        name: "read-64k-qd8",
        label: "64 KiB sequential read, QD 8",
        rw: "read",
        kib: 64,
        depth: 8,
        writes: false,
        nbd_rate: 8_000,
    },
    Job {
        name: "randwrite-4k-qd32",
        label: "4 KiB random write, QD 32, fresh overlay",
        rw: "randwrite",
        kib: 4,
        depth: 32,
        writes: true,
        nbd_rate: 10_000,
    },
];

impl Job {
    fn fio_file(&self, seconds: u32) -> String {
        format!(
            "{}time_based=1\nruntime={seconds}\nrandrepeat=1\n\n\
             [{}]\nrw={}\nbs={}k\niodepth={}\n",
            initramfs::FIO_GLOBAL,
            self.name,
            self.rw,
            self.kib,
            self.depth
        )
    }
}

/// The chain is `guest`'s ([`CHAIN`]: base, mid, top), larger; the write
/// rows add [`OVERLAY`].
const OVERLAY: Node<'static> = Node {
    file: "w.qcow2",
    node: "w",
};
const STAMP: &str = "blockgraph guest bench chain v1: 1 GiB, 64 KiB clusters; base 0x11 0..512M \
                     <- mid 64 x 2M 0x22 @i*16M <- top 64 x 2M 0x33 @i*16M+8M";
/// `qemu-img bench`'s step for the "random" rows: 1 MiB + 4 KiB (it has
/// no random mode), wrapping at the end of the disk.
const NBD_STEP: &str = "1028k";

/// What one run of one server gave.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sample {
    iops: f64,
    mib_s: f64,
    /// Mean and 99th percentile latency, µs (NaN where not measured).
    mean_us: f64,
    p99_us: f64,
}

/// One row: QSD's and blockgraph's samples.
struct Row {
    label: String,
    qsd: Sample,
    ours: Sample,
}

/// What `cargo xtask bench --guest` was asked for.
#[derive(Clone, Copy, Debug)]
pub struct BenchArgs {
    /// fio's run time per row, server and round.
    pub seconds: u32,
    /// Runs per row and server; the median is reported.
    pub rounds: u32,
}

/// `cargo xtask bench --guest [--seconds N] [--rounds R]`.
pub fn run(ws: &Workspace, args: BenchArgs) -> Result<()> {
    let BenchArgs { seconds, rounds } = args;
    let started = Instant::now();
    println!("==> prerequisites for the guest benchmark");
    prereq::ensure_qemu(ws)?;
    super::require_tools(
        "cargo xtask bench --guest",
        &["qemu-storage-daemon", "qemu-img", "qemu-io"],
    )?;
    let cli = crate::tasks::build_cli(ws, true)?;
    let pieces = fetch::ensure(ws)?;
    let root = ws.target_dir.join("gbench");
    let chain = chain(&root)?;
    let dirs = [Server::Qsd, Server::Blockgraph].map(|server| root.join(name(server)));
    for dir in &dirs {
        let lab = Lab::fresh(dir.clone(), Path::new("vmlinux"), Machine::Q35)?;
        for node in &CHAIN {
            fs::copy(chain.path(node.file), lab.path(node.file)).context(format!(
                "copying {} to {}",
                node.file,
                dir.display()
            ))?;
        }
    }
    let files: Vec<(String, String)> = JOBS
        .iter()
        .map(|job| (format!("jobs/{}.fio", job.name), job.fio_file(seconds)))
        .collect();
    let initrd = root.join("initramfs.cpio");
    let archive = super::build_initramfs(&pieces, &initramfs::bench_init_script(), &files)?;
    fs::write(&initrd, &archive).context(format!("writing {}", initrd.display()))?;
    let prepared = started.elapsed();
    let load_before = load_average();

    let bench = GuestBench {
        vmlinux: pieces.vmlinux.clone(),
        initrd,
        cli,
        dirs,
        seconds,
    };
    let phase = Instant::now();
    let mut guest_rows = Vec::new();
    for (index, job) in JOBS.iter().enumerate() {
        println!("==> guest: {} ({seconds} s)", job.label);
        let mut runs = Runs::default();
        for round in 0..rounds as usize {
            for server in order(index + round) {
                let sample = bench.guest(server, job)?;
                println!(
                    "    {:<10} {:.0} IOPS, {:.1} MiB/s, mean {:.0} µs, p99 {:.0} µs",
                    name(server),
                    sample.iops,
                    sample.mib_s,
                    sample.mean_us,
                    sample.p99_us
                );
                runs.of(server).push(sample);
            }
        }
        guest_rows.push(runs.row(job.label.to_owned()));
    }
    let guest_time = phase.elapsed();

    let phase = Instant::now();
    let mut nbd_rows = Vec::new();
    for (index, job) in JOBS.iter().enumerate() {
        let count = job.nbd_rate * u64::from(seconds);
        let label = nbd_label(job, count);
        println!("==> NBD: {label}");
        let mut runs = Runs::default();
        for round in 0..rounds as usize {
            for server in order(index + round) {
                let sample = bench.nbd(server, job, count)?;
                println!(
                    "    {:<10} {:.0} IOPS, {:.1} MiB/s",
                    name(server),
                    sample.iops,
                    sample.mib_s
                );
                runs.of(server).push(sample);
            }
        }
        nbd_rows.push(runs.row(label));
    }
    let nbd_time = phase.elapsed();

    let mut report = String::new();
    let _ = write_report(
        &mut report,
        &Header {
            machine: machine(),
            load: [load_before, load_average()],
            versions: versions(ws),
            seconds,
            rounds,
        },
        &guest_rows,
        &nbd_rows,
    );
    let _ = writeln!(
        report,
        "\ntime: prepared {:.1} s, guest rows {:.1} s, NBD rows {:.1} s, total {:.1} s",
        prepared.as_secs_f64(),
        guest_time.as_secs_f64(),
        nbd_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!();
    print!("{report}");
    let path = root.join("report.md");
    fs::write(&path, &report).context(format!("writing {}", path.display()))?;
    println!("(written to {})", path.display());
    Ok(())
}

/// A row's runs, per server.
#[derive(Default)]
struct Runs {
    qsd: Vec<Sample>,
    ours: Vec<Sample>,
}

impl Runs {
    fn of(&mut self, server: Server) -> &mut Vec<Sample> {
        match server {
            Server::Qsd => &mut self.qsd,
            Server::Blockgraph => &mut self.ours,
        }
    }

    /// The row of each server's median run.
    fn row(self, label: String) -> Row {
        Row {
            label,
            qsd: median(self.qsd),
            ours: median(self.ours),
        }
    }
}

/// The run with the median IOPS (the lower middle one of an even count).
fn median(mut runs: Vec<Sample>) -> Sample {
    runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    runs.get(runs.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

fn name(server: Server) -> &'static str {
    match server {
        Server::Qsd => "qsd",
        Server::Blockgraph => "blockgraph",
    }
}

/// The servers in row `index`'s order: QSD first on even rows.
fn order(index: usize) -> [Server; 2] {
    alternate(index, [Server::Qsd, Server::Blockgraph])
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn nbd_label(job: &Job, count: u64) -> String {
    let what = match (job.writes, job.rw) {
        (true, _) => "writes 1 MiB + 4 KiB apart, fresh overlay",
        (false, "read") => "sequential reads",
        (false, _) => "reads 1 MiB + 4 KiB apart",
    };
    format!("{} KiB {what}, QD {}, {count} requests", job.kib, job.depth)
}

/// The chain in `ROOT/chain/`, made with qemu-img and qemu-io unless its
/// stamp says it is there.
fn chain(root: &Path) -> Result<Lab> {
    let dir = root.join("chain");
    let stamp = dir.join("chain.stamp");
    let lab = Lab::images(dir.clone());
    if fs::read_to_string(&stamp).is_ok_and(|text| text == STAMP) {
        println!("    chain: cached in {}", dir.display());
        return Ok(lab);
    }
    println!("==> making the chain in {}", dir.display());
    let lab = Lab::fresh(dir, Path::new("vmlinux"), Machine::Q35)?;
    let opts = Some("cluster_size=65536");
    lab.create("base.qcow2", "1G", None, opts, &["write -P 0x11 0 512M"])?;
    let writes = |pattern: u8, at: u64| -> Vec<String> {
        (0..64u64)
            .map(|i| format!("write -P {pattern:#x} {}M 2M", i * 16 + at))
            .collect()
    };
    for (file, backing, pattern, at) in [
        ("mid.qcow2", "base.qcow2", 0x22, 0),
        ("top.qcow2", "mid.qcow2", 0x33, 8),
    ] {
        lab.create(file, "1G", Some(backing), opts, &[])?;
        lab.qemu_io(file, &writes(pattern, at))?;
    }
    fs::write(&stamp, STAMP).context(format!("writing {}", stamp.display()))?;
    Ok(lab)
}

struct GuestBench {
    vmlinux: PathBuf,
    initrd: PathBuf,
    cli: PathBuf,
    /// Each server's copy of the chain: QSD's, then blockgraph's.
    dirs: [PathBuf; 2],
    seconds: u32,
}

impl GuestBench {
    fn dir(&self, server: Server) -> &Path {
        match server {
            Server::Qsd => &self.dirs[0],
            Server::Blockgraph => &self.dirs[1],
        }
    }

    /// The nodes `server` opens for `job`: the chain, and for writes a
    /// fresh empty overlay on top.
    fn nodes(&self, server: Server, job: &Job) -> Result<Vec<Node<'static>>> {
        let mut nodes = CHAIN.to_vec();
        if job.writes {
            let lab = Lab::images(self.dir(server).to_owned());
            let _ = fs::remove_file(lab.path(OVERLAY.file));
            lab.create(
                OVERLAY.file,
                "1G",
                Some("top.qcow2"),
                Some("cluster_size=65536"),
                &[],
            )?;
            nodes.push(OVERLAY);
        }
        Ok(nodes)
    }

    /// One boot of the guest on `server`'s export, running `job`.
    fn guest(&self, server: Server, job: &Job) -> Result<Sample> {
        let dir = self.dir(server);
        let nodes = self.nodes(server, job)?;
        let export = Export::VhostUser {
            socket: "vhost.sock",
            queues: 1,
        };
        let served = Served::start(server, dir, &nodes, export, Some(&self.cli), false)?;
        let deadline = Instant::now() + Duration::from_secs(90 + u64::from(self.seconds));
        let mut guest = super::qemu(
            &self.vmlinux,
            &self.initrd,
            &dir.join("vhost.sock"),
            1,
            &format!("bgjob={}", job.name),
        )
        .start()?;
        let mut console = Console::default();
        console.wait_for(&mut guest, BENCH_RESULT, deadline)?;
        if guest.wait_or_kill(Duration::from_secs(20))?.is_none() {
            return Err(Error::msg(
                "the guest printed its result but did not power off",
            ));
        }
        console.drain(&guest);
        served.stop()?;
        guest_sample(&console.lines, job.writes)
    }

    /// `qemu-img bench` through `server`'s NBD export: `count` requests.
    fn nbd(&self, server: Server, job: &Job, count: u64) -> Result<Sample> {
        let dir = self.dir(server);
        let nodes = self.nodes(server, job)?;
        let served = Served::start(
            server,
            dir,
            &nodes,
            Export::Nbd { socket: "nbd.sock" },
            Some(&self.cli),
            false,
        )?;
        let uri = format!(
            "nbd+unix:///{NBD_EXPORT}?socket={}",
            dir.join("nbd.sock").display()
        );
        let size = format!("{}k", job.kib);
        let mut cmd = Cmd::new("qemu-img").args(["bench", "-f", "raw"]);
        if job.writes {
            cmd = cmd.arg("-w");
        }
        if job.rw != "read" {
            cmd = cmd.args(["-S", NBD_STEP]);
        }
        let cmd = cmd
            .args(["-d".to_owned(), job.depth.to_string()])
            .args(["-c".to_owned(), count.to_string()])
            .args(["-s", &size, &uri])
            .timeout(Duration::from_secs(300))
            .quiet();
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(Error::msg(format!(
                "`{cmd}` failed ({}){}",
                out.status,
                indented(&(out.stdout_text() + &out.stderr_text()))
            )));
        }
        served.stop()?;
        let seconds = reported_seconds(&out.stdout_text()).ok_or_else(|| {
            Error::msg(format!(
                "`{cmd}` printed no \"Run completed in X seconds.\"{}",
                indented(&out.stdout_text())
            ))
        })?;
        let iops = count as f64 / seconds;
        Ok(Sample {
            iops,
            mib_s: iops * f64::from(job.kib) / 1024.0,
            mean_us: f64::NAN,
            p99_us: f64::NAN,
        })
    }
}

/// fio's terse (version 3) fields, 0-based: the read block starts at 5,
/// the write block [`WRITE_BLOCK`] fields later; within a block bandwidth
/// (KiB/s) at 1, IOPS at 2, the completion latency percentiles
/// (`P%=µs`) at 12..32 and the total latency's mean (µs) at 34.
const TERSE_ERROR: usize = 4;
const READ_BLOCK: usize = 5;
const WRITE_BLOCK: usize = 41;

/// The sample in fio's terse line between the markers; fio must have
/// exited 0 with no error.
fn guest_sample(lines: &[String], writes: bool) -> Result<Sample> {
    let result = lines
        .iter()
        .rev()
        .find_map(|l| l.split_once(BENCH_RESULT).map(|(_, rest)| rest.trim()))
        .ok_or_else(|| Error::msg("the guest printed no bench result"))?;
    let begin = lines.iter().position(|l| l.contains(TERSE_BEGIN));
    let end = lines.iter().position(|l| l.contains(TERSE_END));
    let (Some(begin), Some(end)) = (begin, end) else {
        return Err(Error::msg("the guest printed no fio output block"));
    };
    let output = lines[begin + 1..end].join("\n");
    if result != "rc=0" {
        return Err(Error::msg(format!(
            "fio failed in the guest ({result}){}",
            indented(&output)
        )));
    }
    let terse = output
        .lines()
        .find(|l| l.starts_with("3;"))
        .ok_or_else(|| {
            Error::msg(format!(
                "no terse line in fio's output{}",
                indented(&output)
            ))
        })?;
    parse_terse(terse, writes)
        .ok_or_else(|| Error::msg(format!("cannot read fio's terse line: {terse}")))
}

fn parse_terse(line: &str, writes: bool) -> Option<Sample> {
    let fields: Vec<&str> = line.split(';').collect();
    if fields.get(TERSE_ERROR)? != &"0" {
        return None;
    }
    let block = READ_BLOCK + if writes { WRITE_BLOCK } else { 0 };
    let number = |at: usize| fields.get(block + at)?.parse::<f64>().ok();
    let p99 = fields[block + 12..block + 32]
        .iter()
        .find_map(|f| f.strip_prefix("99.000000%=")?.parse::<f64>().ok())?;
    Some(Sample {
        iops: number(2)?,
        mib_s: number(1)? / 1024.0,
        mean_us: number(34)?,
        p99_us: p99,
    })
}

struct Header {
    machine: String,
    /// `/proc/loadavg` before and after the rows (other load skews the
    /// guest's clock).
    load: [String; 2],
    versions: Vec<String>,
    seconds: u32,
    rounds: u32,
}

fn write_report(out: &mut String, header: &Header, guest: &[Row], nbd: &[Row]) -> std::fmt::Result {
    report_header(
        out,
        "blockgraph serve vs qemu-storage-daemon",
        &header.machine,
        &header.versions,
    )?;
    writeln!(
        out,
        "- load average (1, 5, 15 min) before the rows: {}, after: {}",
        header.load[0], header.load[1]
    )?;
    writeln!(
        out,
        "- chain: base (1 GiB, 512 MiB of data) <- mid (64 x 2 MiB) <- top (64 x 2 MiB), \
         64 KiB clusters, a fresh copy per server; writes on a fresh empty overlay on top"
    )?;
    writeln!(
        out,
        "- servers: page cache on both (blockgraph serve's default -t writeback; QSD's \
         default cache.direct=off), one queue"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Guest (Debian's Linux under TCG, 1 vCPU, vhost-user-blk; fio direct=1 libaio, \
         {} s per row, server and round, one boot each, alternating which server goes \
         first; each server's median run of {} by IOPS; latencies: mean of fio's total \
         latency, p99 of its completion latency). Ratios: IOPS and MiB/s blockgraph / \
         QSD, latencies QSD / blockgraph (at least 1.0: blockgraph is as good):",
        header.seconds, header.rounds
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| row | server | IOPS | MiB/s | mean lat (µs) | p99 lat (µs) |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|")?;
    for row in guest {
        table_rows(out, row, true)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "NBD (on the host: `qemu-img bench -f raw -d QD -c COUNT -s SIZE [-S 1028k] [-w] \
         nbd+unix:///{NBD_EXPORT}?socket=...`; the \"random\" rows step 1 MiB + 4 KiB, \
         wrapping, as qemu-img bench has no random mode; time of the I/O loop as qemu-img \
         prints it; each server's median run of {}; no latencies):",
        header.rounds
    )?;
    writeln!(out)?;
    writeln!(out, "| row | server | IOPS | MiB/s |")?;
    writeln!(out, "|---|---|---:|---:|")?;
    for row in nbd {
        table_rows(out, row, false)?;
    }
    Ok(())
}

fn table_rows(out: &mut String, row: &Row, latencies: bool) -> std::fmt::Result {
    for (who, s) in [("QSD", &row.qsd), ("blockgraph", &row.ours)] {
        write!(
            out,
            "| {} | {who} | {:.0} | {:.1} |",
            row.label, s.iops, s.mib_s
        )?;
        if latencies {
            write!(out, " {:.0} | {:.0} |", s.mean_us, s.p99_us)?;
        }
        writeln!(out)?;
    }
    write!(
        out,
        "| {} | **ratio** | **{:.2}** | **{:.2}** |",
        row.label,
        row.ours.iops / row.qsd.iops,
        row.ours.mib_s / row.qsd.mib_s
    )?;
    if latencies {
        write!(
            out,
            " **{:.2}** | **{:.2}** |",
            row.qsd.mean_us / row.ours.mean_us,
            row.qsd.p99_us / row.ours.p99_us
        )?;
    }
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terse_lines_are_read() {
        // fio 3.33 --minimal, read block then write block (41 fields each).
        let mut fields: Vec<String> = ["3", "fio-3.33", "x", "0", "0"].map(String::from).to_vec();
        for (kib_s, iops, p99, mean) in [("4000", "1000", "350", "240.5"), ("0", "0", "0", "0")] {
            let mut block = vec!["0".to_owned(); 41];
            block[1] = kib_s.into();
            block[2] = iops.into();
            block[12] = "1.000000%=1".into();
            block[24] = format!("99.000000%={p99}");
            block[34] = mean.into();
            fields.extend(block);
        }
        let line = fields.join(";");
        let read = parse_terse(&line, false).unwrap();
        assert_eq!(read.iops, 1000.0);
        assert_eq!(read.p99_us, 350.0);
        assert_eq!(read.mean_us, 240.5);
        assert!((read.mib_s - 3.90625).abs() < 1e-9);
        assert!(parse_terse(&line, true).is_some());
        let failed = line.replacen(";0;0;", ";0;5;", 1);
        assert!(parse_terse(&failed, false).is_none());
    }

    #[test]
    fn a_row_reports_each_servers_median_run() {
        let run = |iops| Sample {
            iops,
            ..Sample::default()
        };
        let runs = Runs {
            qsd: vec![run(5.0), run(1.0), run(3.0)],
            ours: vec![run(2.0), run(4.0)],
        };
        let row = runs.row("r".into());
        assert_eq!((row.qsd.iops, row.ours.iops), (3.0, 2.0));
    }

    #[test]
    fn servers_alternate() {
        assert_eq!(order(0)[0], Server::Qsd);
        assert_eq!(order(1)[0], Server::Blockgraph);
    }
}
