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

use std::path::Path;

use crate::cmd::Cmd;
use crate::{Error, Result};

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
}
