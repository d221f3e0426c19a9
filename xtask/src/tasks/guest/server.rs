//! The export server the guest's disk comes from: a vhost-user-blk socket
//! and a QMP monitor socket over one qcow2 chain.
//!
//! The scenario only speaks QEMU's QMP and names nodes by their images'
//! file stems (`base`, `mid`, `top`; the live snapshot adds `snap`), so any
//! server that opens the chain under those node names, exports the top node
//! and accepts `qmp_capabilities`, `blockdev-snapshot-sync`, `block-stream`,
//! `block-commit`, `job-complete`, `query-jobs`, `job-dismiss` (sending
//! `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`) and `quit`
//! or SIGTERM (flushing and closing every image, then exiting) can stand in
//! for qemu-storage-daemon. The intended command line for blockgraph is
//! `blockgraph serve top.qcow2 --vhost-user-blk vhost.sock --qmp qmp.sock`,
//! run in the images' directory.
//!
//! qemu-storage-daemon (10.0.2), as checked here:
//!
//! - `--blockdev driver=file,...` and `driver=qcow2,...,backing=NODE` per
//!   image, `--export type=vhost-user-blk,...,node-name=NODE,writable=on`,
//!   and the monitor as `--chardev socket,...,server=on,wait=off --monitor
//!   chardev=...`.
//! - `blockdev-snapshot-sync` on the exported node moves the export with it:
//!   the new overlay takes over every parent of the node (QEMU's
//!   `bdrv_append`), the export's BlockBackend included, so the guest's
//!   writes go to the new overlay without touching the export (the run
//!   checks this with `qemu-img map -U` on the overlay before any job
//!   copies into it). Likewise the active commit's pivot moves the export
//!   to the base node.
//! - `block-stream` needs `backing-file=`: without it the overlay records a
//!   `json:` backing name that `qemu-img info` cannot open later.
//!
//! The boot tests (`boot_test.rs`) and `bench --guest` reuse this too:
//! [`Server::start`] and [`stop`] put `blockgraph serve` (built by
//! `tasks::build_cli`) under the project's own kernel and the benchmark.

use std::path::Path;
use std::time::{Duration, Instant};

use super::qmp::Qmp;
use crate::cmd::{Background, Cmd};
use crate::{Error, Result};

/// How long a server may take to make its sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// Waits (up to 10 s) until `server` has made `socket`.
///
/// # Errors
/// The server exits first, or the time runs out (the caller's
/// [`Background`] kills it when dropped).
pub fn wait_for_socket(server: &mut Background, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if let Some(status) = server.try_wait()? {
            return Err(Error::msg(format!("`{}` exited ({status})", server.name())));
        }
        if Instant::now() >= deadline {
            return Err(Error::msg(format!(
                "`{}` made no {} within {} s",
                server.name(),
                socket.display(),
                SOCKET_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Ends a server: QMP `quit` on `qmp` (which flushes and closes every
/// image), or SIGTERM when there is no monitor or `quit` fails; then waits
/// up to `limit` for the exit, killing the server after that. Returns a
/// note when SIGTERM had to stand in for `quit`.
///
/// # Errors
/// The server did not exit within `limit` (it is killed), or exited with a
/// failure.
pub fn stop(
    server: &mut Background,
    qmp: Option<&mut Qmp>,
    limit: Duration,
) -> Result<Option<String>> {
    let quit = match qmp {
        Some(qmp) => qmp.execute("quit", None).map(drop),
        None => Err(Error::msg("no QMP monitor")),
    };
    let note = match quit {
        Ok(()) => None,
        Err(err) => {
            server.terminate()?;
            Some(format!("{err}; sent SIGTERM instead"))
        }
    };
    match server.wait_or_kill(limit)? {
        None => Err(Error::msg(format!(
            "`{}` did not exit within {:.0} s after `quit` and was killed",
            server.name(),
            limit.as_secs_f64()
        ))),
        Some(status) if !status.success() => Err(Error::msg(format!(
            "`{}` exited with {status}",
            server.name()
        ))),
        Some(_) => Ok(note),
    }
}

/// One image of the chain: its file name and node name.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    pub file: &'a str,
    pub node: &'a str,
}

/// What the server exports the top node as (socket paths relative to the
/// server's directory).
#[derive(Clone, Copy, Debug)]
pub enum Export<'a> {
    /// A vhost-user-blk socket with a number of virtqueues.
    VhostUser { socket: &'a str, queues: u32 },
    /// An NBD server on a Unix socket; QSD names the export [`NBD_EXPORT`]
    /// (blockgraph answers any name).
    Nbd { socket: &'a str },
}

/// The NBD export's name: `nbd+unix:///disk?socket=SOCKET`.
pub const NBD_EXPORT: &str = "disk";

/// Which program serves the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `qemu-storage-daemon`, the reference.
    Qsd,
    /// `blockgraph serve`, with its QMP monitor.
    Blockgraph,
}

impl Server {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "qsd" => Ok(Server::Qsd),
            "blockgraph" => Ok(Server::Blockgraph),
            _ => Err(Error::msg(format!(
                "unknown server `{name}` (expected qsd or blockgraph)"
            ))),
        }
    }

    /// The program's name (QSD must be on PATH; blockgraph is built).
    pub fn program(self) -> &'static str {
        match self {
            Server::Qsd => "qemu-storage-daemon",
            Server::Blockgraph => "blockgraph",
        }
    }

    /// The command serving `chain` (base first) in `dir`, exporting the
    /// last node as `export` and answering QMP on `qmp` (paths relative to
    /// `dir`, where the server runs, so the backing names it writes are
    /// relative too). `cli` is the blockgraph binary to run.
    pub fn command(
        self,
        dir: &Path,
        chain: &[Node],
        export: Export,
        qmp: &str,
        cli: Option<&Path>,
    ) -> Result<Cmd> {
        let top = chain
            .last()
            .ok_or_else(|| Error::msg("an export needs at least one image"))?;
        match self {
            Server::Qsd => {
                let mut cmd = Cmd::new(self.program()).cwd(dir);
                let mut below: Option<&str> = None;
                for image in chain {
                    let file = format!("{}-file", image.node);
                    cmd = cmd.args([
                        "--blockdev".to_owned(),
                        format!("driver=file,node-name={file},filename={}", image.file),
                    ]);
                    let backing = below.map_or("null".to_owned(), |b| format!("\"{b}\""));
                    // JSON syntax: `backing=NODE` in key=value form cannot say "none".
                    cmd = cmd.args([
                        "--blockdev".to_owned(),
                        format!(
                            "{{\"driver\":\"qcow2\",\"node-name\":\"{}\",\"file\":\"{file}\",\
                             \"backing\":{backing}}}",
                            image.node
                        ),
                    ]);
                    below = Some(image.node);
                }
                cmd = match export {
                    Export::VhostUser { socket, queues } => cmd.args([
                        "--export".to_owned(),
                        format!(
                            "type=vhost-user-blk,id=e0,node-name={},addr.type=unix,\
                             addr.path={socket},writable=on,num-queues={queues}",
                            top.node
                        ),
                    ]),
                    Export::Nbd { socket } => cmd.args([
                        "--nbd-server".to_owned(),
                        format!("addr.type=unix,addr.path={socket}"),
                        "--export".to_owned(),
                        format!(
                            "type=nbd,id=e0,node-name={},name={NBD_EXPORT},writable=on",
                            top.node
                        ),
                    ]),
                };
                Ok(cmd.args([
                    "--chardev".to_owned(),
                    format!("socket,id=qmp0,path={qmp},server=on,wait=off"),
                    "--monitor".to_owned(),
                    "chardev=qmp0".to_owned(),
                ]))
            }
            // The top image's chain, opened through its backing names
            // (relative, resolved in `dir`); the nodes are the file stems.
            Server::Blockgraph => {
                let cli = cli.ok_or_else(|| Error::msg("blockgraph serve needs the built CLI"))?;
                let cmd = Cmd::new(cli.to_string_lossy().as_ref())
                    .cwd(dir)
                    .args(["serve", "-f", "qcow2", top.file]);
                let cmd = match export {
                    Export::VhostUser { socket, queues } => cmd.args([
                        "--vhost-user-blk",
                        socket,
                        "--num-queues",
                        &queues.to_string(),
                    ]),
                    Export::Nbd { socket } => cmd.args(["--nbd", socket]),
                };
                Ok(cmd.args(["--qmp", qmp]))
            }
        }
    }

    /// Starts [`Server::command`] in the background (its output shown live
    /// with `live`) and waits until it has made both sockets.
    ///
    /// # Errors
    /// The server cannot start, exits, or makes no socket within 10 s; it
    /// is killed then (the [`Background`] is dropped).
    pub fn start(
        self,
        dir: &Path,
        chain: &[Node],
        export: Export,
        qmp: &str,
        cli: Option<&Path>,
        live: bool,
    ) -> Result<Background> {
        let cmd = self.command(dir, chain, export, qmp, cli)?;
        let cmd = if live { cmd.tee() } else { cmd.quiet() };
        let mut server = cmd.start()?;
        wait_for_socket(&mut server, &dir.join(qmp))?;
        let socket = match export {
            Export::VhostUser { socket, .. } | Export::Nbd { socket } => socket,
        };
        wait_for_socket(&mut server, &dir.join(socket))?;
        Ok(server)
    }
}
