//! `cargo xtask guest`: a real Linux guest runs fio on a vhost-user-blk
//! export of a qcow2 chain while live block jobs run over QMP.
//!
//! ```text
//! cargo xtask guest [--short] [--server qsd|blockgraph] [--no-jobs] [--queues N]
//! ```
//!
//! ```text
//! fetch.rs      Debian's kernel, busybox-static, fio and fio's libraries
//!               (apt-get download, cached in target/guest/)
//! initramfs.rs  the newc archive and /init (virtio modules, fio twice,
//!               md5sum of the disk, markers on the serial console; the
//!               bench mode runs the fio job `bgjob=NAME` names)
//! server.rs     the export server: qemu-storage-daemon or `blockgraph
//!               serve` (the same QMP)
//! qmp.rs        the QMP client
//! scenario.rs   snapshot, stream, active commit with pivot, over QMP
//! replay.rs     fio's verification redone on the host over the final image
//! mod.rs        the run: chain, server, QEMU, scenario, judgement
//! bench.rs      `cargo xtask bench --guest`: fio rows on blockgraph serve
//!               and on QSD, then the same rows through NBD on the host
//! ```
//!
//! The guest boots Debian's vmlinux through PVH under TCG (KVM on this
//! machine kind cannot run a stock Linux guest), with shared memfd memory
//! (vhost-user needs it) and one vhost-user-blk disk. Its fio job writes
//! every 4 KiB block of the first `size` MiB once, in random order, with
//! crc32c headers, at a limited rate, and verifies; meanwhile the host takes
//! a live snapshot, streams and actively commits with a pivot. Then fio runs
//! again with `--verify_only`, the guest hashes its whole disk and powers
//! off. The run passes when: both fio runs exit 0, the kernel logged no I/O
//! error, the jobs finished while the first fio run was still writing,
//! `qemu-img check` is clean on every image, the chains are what the jobs
//! leave (`mid -> base`, the dropped `snap -> mid -> base` and `top -> mid
//! -> base`), the final image's content (`qemu-img convert`) hashes to
//! what the guest read, and on the host it holds fio's own block for
//! every 4 KiB fio wrote and the chain's bytes from before everywhere
//! else (module `replay`).
//!
//! `--no-jobs` runs the guest's fio (write with verify, then verify
//! only) and the final hash without the jobs scenario: the chain stays
//! `top -> mid -> base`, every image must check clean and the guest's hash
//! must match `top.qcow2`'s view. `--server blockgraph` builds the CLI and
//! runs `blockgraph serve` from `target/debug`. `--queues N` gives the
//! disk N virtqueues (server and QEMU) and the guest N vCPUs, so Linux
//! uses every queue.
//!
//! Every child (server, QEMU) is killed when the run ends, however it ends;
//! the whole run has a deadline.
//!
//! Measured here (2 cores, QEMU 10.0.2, TCG, pieces cached): the 83 MiB
//! initramfs (fio's libraries stripped) boots to fio running in 2.8–3.1 s
//! from QEMU's launch; fio's 4 KiB random writes hold the 800 IOPS limit
//! and read back at ~4300 IOPS at queue depth 16; hashing the 256 MiB disk
//! with busybox md5sum takes a few seconds. The short run takes 17–23 s in
//! all, the full one 38–44 s; a cold cache adds ~26 s (90 MB downloaded).

mod bench;
mod fetch;
mod initramfs;
pub mod qmp;
mod replay;
pub mod scenario;
pub mod server;

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use crate::cmd::{indented, Background, Cmd};
use crate::prereq;
use crate::tasks::lab::Lab;
use crate::tasks::qemu::Machine;
use crate::tasks::read_file as read;
use crate::{Context, Error, Result, Workspace};

pub use bench::{run as bench, BenchArgs};
use initramfs::{Archive, FioJob};
pub use server::Server;
use server::{Export, Node};

/// How big and how long: the full run and the short one for `xtask test`.
#[derive(Clone, Debug)]
pub struct Profile {
    pub fio: FioJob,
    /// Let guest writes land this long between the jobs' steps.
    pub pause: Duration,
    /// The whole run (boot, fio, jobs, shutdown) must end within this.
    pub deadline: Duration,
    /// Virtqueues of the disk (and vCPUs of the guest).
    pub queues: u32,
}

impl Profile {
    pub fn full() -> Self {
        Profile {
            fio: FioJob {
                size_mib: 64,
                write_iops: 800,
            },
            pause: Duration::from_secs(3),
            deadline: Duration::from_secs(300),
            queues: 1,
        }
    }

    pub fn short() -> Self {
        Profile {
            // ~7.7 s of writes: the jobs (~3 s) end well before them.
            fio: FioJob {
                size_mib: 24,
                write_iops: 800,
            },
            pause: Duration::from_millis(700),
            deadline: Duration::from_secs(110),
            queues: 1,
        }
    }
}

/// Virtual size of the chain (MiB): base has data, mid and top overlays.
const DISK_MIB: u32 = 256;

/// The chain, base first, as the server opens it.
const CHAIN: [Node<'static>; 3] = [
    Node {
        file: "base.qcow2",
        node: "base",
    },
    Node {
        file: "mid.qcow2",
        node: "mid",
    },
    Node {
        file: "top.qcow2",
        node: "top",
    },
];

/// `cargo xtask guest [--short] [--server qsd|blockgraph] [--no-jobs] [--queues N]`.
pub fn run(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let mut profile = Profile::full();
    let mut server = Server::Qsd;
    let mut jobs = true;
    let mut queues = 1;
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => profile = Profile::short(),
            "--no-jobs" => jobs = false,
            "--queues" => {
                queues = args
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| (1..=8).contains(n))
                    .ok_or_else(|| Error::msg("--queues needs a number from 1 to 8"))?;
            }
            "--server" => {
                let name = args
                    .next()
                    .ok_or_else(|| Error::msg("--server needs qsd or blockgraph"))?;
                server = Server::parse(&name)?;
            }
            _ => {
                return Err(Error::msg(format!(
                    "`guest`: unknown argument `{arg}` (expected --short, --server NAME, --no-jobs, --queues N)"
                )))
            }
        }
    }
    profile.queues = queues;
    run_with(ws, server, &profile, jobs)
}

/// One run: prerequisites, pieces, chain, server, guest, jobs (unless
/// `jobs` is false), judgement.
pub fn run_with(ws: &Workspace, server: Server, profile: &Profile, jobs: bool) -> Result<()> {
    let started = Instant::now();
    println!("==> prerequisites for the Linux guest");
    prereq::ensure_qemu(ws)?;
    let cli = match server {
        Server::Qsd => None,
        Server::Blockgraph => Some(crate::tasks::build_cli(ws, false)?),
    };
    let tools: &[&str] = match server {
        Server::Qsd => &["qemu-storage-daemon", "md5sum"],
        Server::Blockgraph => &["md5sum"],
    };
    require_tools("cargo xtask guest", tools)?;
    let pieces = fetch::ensure(ws)?;
    let run_dir = ws.target_dir.join("guest/run");
    // The lab's kernel is unused: the guest here is Linux, booted below.
    let lab = Lab::fresh(run_dir.clone(), Path::new("vmlinux"), Machine::Q35)?;
    let initrd = run_dir.join("initramfs.cpio");
    let archive = build_initramfs(
        &pieces,
        &initramfs::init_script(),
        &[("job.fio".to_owned(), profile.fio.job_file())],
    )?;
    fs::write(&initrd, &archive).context(format!("writing {}", initrd.display()))?;
    println!(
        "    initramfs: {} MiB uncompressed ({} libraries), kernel {}",
        archive.len() >> 20,
        pieces.libs.len(),
        pieces.kernel_release
    );
    make_chain(&lab)?;
    // The guest's view before the run, for the host-side check.
    lab.qemu_img(&["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", BEFORE])?;
    let prepared = started.elapsed();

    println!("==> the guest on a {} export", server.program());
    let export = Export::VhostUser {
        socket: "vhost.sock",
        queues: profile.queues,
    };
    let mut served = Served::start(server, &run_dir, &CHAIN, export, cli.as_deref(), true)?;
    let deadline = started + profile.deadline;

    let vhost = run_dir.join("vhost.sock");
    let mut guest = qemu(&pieces.vmlinux, &initrd, &vhost, profile.queues, "").start()?;
    let mut console = Console::default();
    let booted = Instant::now();
    console.wait_for(&mut guest, initramfs::FIO_START, deadline)?;
    let boot_time = booted.elapsed();
    let scenario = match jobs {
        true => Some(scenario::run(&mut served.qmp, &lab, profile.pause)?),
        false => None,
    };
    console.drain(&guest);
    let overlapped = !console.seen(initramfs::FIO_END);
    console.wait_for(&mut guest, initramfs::RESULT, deadline)?;
    let guest_time = booted.elapsed();
    let left = deadline.saturating_duration_since(Instant::now());
    if guest
        .wait_or_kill(left.min(Duration::from_secs(20)))?
        .is_none()
    {
        return Err(Error::msg(
            "the guest printed its result but did not power off",
        ));
    }
    console.drain(&guest);
    served.stop()?;

    println!("==> judging the run");
    let md5 = judge_console(&console)?;
    let written = profile.fio.size_mib as usize;
    let Some(jobs) = scenario else {
        judge_unchanged(&lab, &md5, written)?;
        println!(
            "==> guest run passed (no jobs): prepared in {:.1} s, fio started {:.1} s after \
             launch, guest done after {:.1} s, {:.1} s in all",
            prepared.as_secs_f64(),
            boot_time.as_secs_f64(),
            guest_time.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    if !overlapped {
        return Err(Error::msg(format!(
            "the block jobs took {:.1} s and finished after the guest's fio run had \
             ended: they did not run under guest I/O (a slow machine? raise the fio size)",
            jobs.elapsed.as_secs_f64()
        )));
    }
    judge_images(&lab, &md5, written)?;
    println!(
        "==> guest run passed: prepared in {:.1} s, fio started {:.1} s after launch, \
         jobs took {:.1} s (snapshot's overlay grew {} KiB under guest writes), guest \
         done after {:.1} s, {:.1} s in all",
        prepared.as_secs_f64(),
        boot_time.as_secs_f64(),
        jobs.elapsed.as_secs_f64(),
        jobs.snap_guest_bytes >> 10,
        guest_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The images the jobs left: clean, chained as the jobs leave them, and
/// the final image's view as the guest wrote it ([`judge_view`]).
fn judge_images(lab: &Lab, md5: &str, written_mib: usize) -> Result<()> {
    lab.check(&["base.qcow2", "mid.qcow2", "top.qcow2", "snap.qcow2"])?;
    lab.expect_chain("mid.qcow2", &["mid.qcow2", "base.qcow2"])?;
    lab.expect_chain("snap.qcow2", &["snap.qcow2", "mid.qcow2", "base.qcow2"])?;
    lab.expect_chain("top.qcow2", &["top.qcow2", "mid.qcow2", "base.qcow2"])?;
    println!("    qemu-img check: clean on base, mid, top, snap; chain mid -> base");
    judge_view(lab, "mid.qcow2", md5, written_mib)
}

/// The images after a run without jobs: clean, still `top -> mid ->
/// base`, and top's view as the guest wrote it ([`judge_view`]).
fn judge_unchanged(lab: &Lab, md5: &str, written_mib: usize) -> Result<()> {
    lab.check(&["base.qcow2", "mid.qcow2", "top.qcow2"])?;
    lab.expect_chain("top.qcow2", &["top.qcow2", "mid.qcow2", "base.qcow2"])?;
    println!("    qemu-img check: clean on base, mid, top; chain top -> mid -> base");
    judge_view(lab, "top.qcow2", md5, written_mib)
}

/// Where the guest's view before the run is kept (raw).
const BEFORE: &str = "before.raw";

/// `image`'s guest view (`qemu-img convert`) must hash to the guest's
/// `md5`, and hold fio's block for each 4 KiB of the first `written_mib`
/// MiB and the view before the run everywhere else (module `replay`).
fn judge_view(lab: &Lab, image: &str, md5: &str, written_mib: usize) -> Result<()> {
    lab.qemu_img(&["convert", "-f", "qcow2", "-O", "raw", image, "final.raw"])?;
    let host = Cmd::new("md5sum")
        .arg(lab.path("final.raw"))
        .quiet()
        .read()?;
    let host = host.split_whitespace().next().unwrap_or("");
    if host != md5 {
        return Err(Error::msg(format!(
            "the guest's disk hashed to {md5}, the final image {image} to {host}"
        )));
    }
    println!("    md5 of the guest's disk = md5 of {image}'s view: {md5}");
    let before = read(&lab.path(BEFORE))?;
    let after = read(&lab.path("final.raw"))?;
    let blocks = replay::check(&before, &after, written_mib << 20).map_err(|refused| {
        Error::msg(format!(
            "{image} does not hold what the guest wrote: {refused}"
        ))
    })?;
    for raw in [BEFORE, "final.raw"] {
        let _ = fs::remove_file(lab.path(raw));
    }
    println!(
        "    on the host: {blocks} blocks of fio's, each for its own offset with both \
         crc32c sums right; every other byte as before the run"
    );
    Ok(())
}

/// base (data over the first half) <- mid <- top, 64 KiB clusters, with
/// relative backing names.
fn make_chain(lab: &Lab) -> Result<()> {
    let size = format!("{DISK_MIB}M");
    let opts = Some("cluster_size=65536");
    lab.create("base.qcow2", &size, None, opts, &["write -P 0x11 0 128M"])?;
    lab.create(
        "mid.qcow2",
        &size,
        Some("base.qcow2"),
        opts,
        &["write -P 0x22 8M 8M", "write -z 32M 4M"],
    )?;
    lab.create(
        "top.qcow2",
        &size,
        Some("mid.qcow2"),
        opts,
        &["write -P 0x33 12M 8M", "write -P 0x34 100M 1M"],
    )
}

/// Every tool in `tools` must be on PATH: `task` says who needs it.
fn require_tools(task: &str, tools: &[&str]) -> Result<()> {
    for &tool in tools {
        if prereq::find_on_path(tool).is_none() {
            return Err(Error::msg(format!(
                "`{task}` needs `{tool}` on PATH{}",
                if tool == "qemu-storage-daemon" {
                    " (Debian: qemu-system-common, or qemu-storage-daemon in newer releases)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// A server exporting a chain, its sockets up and its QMP monitor
/// connected; killed on drop unless [`Served::stop`] ended it.
struct Served {
    server: Server,
    daemon: Background,
    qmp: qmp::Qmp,
}

impl Served {
    /// Starts `server` on `chain` in `dir` (QMP on `qmp.sock`) and waits
    /// for its sockets; `tee` shows its output live.
    fn start(
        server: Server,
        dir: &Path,
        chain: &[Node],
        export: Export,
        cli: Option<&Path>,
        tee: bool,
    ) -> Result<Served> {
        let daemon = server.start(dir, chain, export, "qmp.sock", cli, tee)?;
        let qmp = qmp::Qmp::connect(&dir.join("qmp.sock"))?;
        Ok(Served {
            server,
            daemon,
            qmp,
        })
    }

    /// `quit` flushes and closes every image before the host reads them; a
    /// server without it gets SIGTERM, which QSD handles the same way.
    fn stop(mut self) -> Result<()> {
        let limit = Duration::from_secs(20);
        if let Some(note) = server::stop(&mut self.daemon, Some(&mut self.qmp), limit)? {
            println!("    {}: {note}", self.server.program());
        }
        Ok(())
    }
}

/// The initramfs: busybox, fio and its libraries, the virtio modules,
/// `init` as `/init` and `files` (path, text).
fn build_initramfs(
    pieces: &fetch::Pieces,
    init: &str,
    files: &[(String, String)],
) -> Result<Vec<u8>> {
    let mut archive = Archive::default();
    archive.char_device("dev/console", 0o600, 5, 1);
    archive.file("bin/busybox", 0o755, &read(&pieces.busybox)?);
    archive.file("bin/fio", 0o755, &read(&pieces.fio)?);
    archive.file("init", 0o755, init.as_bytes());
    for (path, text) in files {
        archive.file(path, 0o644, text.as_bytes());
    }
    for (name, path) in initramfs::MODULES.iter().zip(&pieces.modules) {
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, &read(path)?);
    }
    for (name, path) in &pieces.libs {
        archive.file(&format!("lib/x86_64-linux-gnu/{name}"), 0o755, &read(path)?);
    }
    archive.file(&pieces.interp.0, 0o755, &read(&pieces.interp.1)?);
    Ok(archive.finish())
}

/// QEMU: TCG, one vCPU per virtqueue, shared memfd memory (vhost-user
/// needs it), the vmlinux through PVH, the serial console on stdout, one
/// vhost-user-blk with `queues` virtqueues; `append` adds to the kernel's
/// command line.
fn qemu(vmlinux: &Path, initrd: &Path, vhost: &Path, queues: u32, append: &str) -> Cmd {
    Cmd::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-smp".to_owned(), queues.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on"])
        .args(["-machine", "q35,memory-backend=mem"])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {append}").trim_end())
        .args(["-serial", "stdio"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", vhost.display()))
        .arg("-device")
        .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
        .tee()
}

/// The guest's serial console so far.
#[derive(Default)]
struct Console {
    lines: Vec<String>,
}

impl Console {
    /// Takes the lines that have arrived, without waiting.
    fn drain(&mut self, guest: &Background) {
        self.lines.extend(guest.lines.try_iter());
    }

    fn seen(&self, marker: &str) -> bool {
        self.lines.iter().any(|line| line.contains(marker))
    }

    /// Waits for a line containing `marker`; fails when the guest reports
    /// a failure, exits, or the deadline passes (QEMU is killed by the
    /// caller's guard then).
    fn wait_for(&mut self, guest: &mut Background, marker: &str, deadline: Instant) -> Result<()> {
        loop {
            if self.seen(marker) {
                return Ok(());
            }
            if let Some(line) = self.lines.iter().find(|l| l.contains("GUEST: FAILED")) {
                return Err(Error::msg(format!("the guest failed: {line}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::msg(format!(
                    "no `{marker}` on the guest's console before the deadline; the last lines:{}",
                    indented(&self.tail(15))
                )));
            }
            match guest
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(status) = guest.try_wait()? {
                        self.drain(guest);
                        if !self.seen(marker) {
                            return Err(Error::msg(format!(
                                "QEMU exited ({status}) before `{marker}`; the last lines:{}",
                                indented(&self.tail(15))
                            )));
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::msg(format!(
                        "QEMU's output ended before `{marker}`; the last lines:{}",
                        indented(&self.tail(15))
                    )))
                }
            }
        }
    }

    fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..].join("\n")
    }
}

/// Checks the result line and the kernel's messages; returns the guest's
/// md5 of its disk.
fn judge_console(console: &Console) -> Result<String> {
    let line = console
        .lines
        .iter()
        .rev()
        .find_map(|l| l.split_once(initramfs::RESULT).map(|(_, rest)| rest.trim()))
        .ok_or_else(|| Error::msg("the guest printed no result line"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("?")
            .to_owned()
    };
    let (live, verify, md5) = (field("live"), field("verify"), field("md5"));
    if live != "0" || verify != "0" {
        return Err(Error::msg(format!(
            "fio failed in the guest: the live run exited with {live}, the \
             --verify_only run with {verify}"
        )));
    }
    let begin = console
        .lines
        .iter()
        .position(|l| l.contains(initramfs::DMESG_BEGIN));
    let end = console
        .lines
        .iter()
        .position(|l| l.contains(initramfs::DMESG_END));
    let (Some(begin), Some(end)) = (begin, end) else {
        return Err(Error::msg("the guest printed no dmesg block"));
    };
    let bad: Vec<&String> = console.lines[begin + 1..end]
        .iter()
        .filter(|l| io_error(l))
        .collect();
    if !bad.is_empty() {
        let bad: Vec<&str> = bad.iter().map(|l| l.as_str()).collect();
        return Err(Error::msg(format!(
            "the guest's kernel logged I/O errors:{}",
            indented(&bad.join("\n"))
        )));
    }
    if md5.len() != 32 {
        return Err(Error::msg(format!(
            "the guest printed no md5 of its disk ({md5:?})"
        )));
    }
    println!("    fio: live run and --verify_only run exited 0; no I/O error in dmesg");
    Ok(md5)
}

/// A kernel message about a failed block I/O (the `dmesg | grep -i
/// 'error|i/o'` block also has harmless lines such as "RAS: Correctable
/// Errors collector initialized").
fn io_error(line: &str) -> bool {
    let line = line.to_ascii_lowercase();
    [
        "i/o error",
        "blk_update_request",
        "vda",
        "virtio_blk",
        "critical",
        "buffer i/o",
    ]
    .iter()
    .any(|needle| line.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_and_dmesg_are_judged() {
        let mut console = Console {
            lines: [
                initramfs::DMESG_BEGIN,
                "[    0.5] RAS: Correctable Errors collector initialized.",
                initramfs::DMESG_END,
                "GUEST: result live=0 verify=0 md5=0123456789abcdef0123456789abcdef",
            ]
            .map(str::to_owned)
            .to_vec(),
        };
        assert_eq!(
            judge_console(&console).unwrap(),
            "0123456789abcdef0123456789abcdef"
        );
        console.lines[1] = "[ 3.1] I/O error, dev vda, sector 8 op 0x1:(WRITE)".to_owned();
        assert!(judge_console(&console).is_err());
        console.lines[1].clear();
        console.lines[3] = "GUEST: result live=0 verify=1 md5=x".to_owned();
        assert!(judge_console(&console)
            .unwrap_err()
            .to_string()
            .contains("with 1"));
    }
}
