//! `blockgraph serve`: a host export of one image's chain, to a guest over
//! vhost-user-blk and to NBD clients, through the request engine.
//!
//! ```text
//!  serve [-f FMT] [-t none|writeback] IMAGE [--vhost-user-blk SOCKET [--num-queues N]]
//!        [--nbd SOCKET] [--qmp SOCKET] [--read-only]
//! ```
//!
//! One thread, the serve loop ([`run`]), owns the graph, the request
//! engine, the resolver and the BlockBackend ([`Block`]); every request,
//! from a virtqueue or an NBD socket, goes through that engine. Other
//! threads only talk to it through an inbox (module `vhost_blk`):
//!
//! ```text
//!  vhost-user-backend threads ─ kicks, memory table, stop/reset ─┐
//!  NBD connection threads ───── requests (owned buffers) ────────┤ inbox
//!  monitor thread ────────────── command lines ──────────────────┤
//!  SIGTERM / SIGINT ─────────── flag ────────────────────────────┘
//!                                                                  │
//!  serve loop: virtio_blk::Server over MappedMemory + Engine ◄─────┘
//!              used ring + call eventfd; NBD replies; monitor
//!              commands run here, between requests
//! ```
//!
//! Module map:
//!
//! ```text
//!  memory     guest RAM from the vhost-user memory table as
//!             GuestMemory<'static> (MappedMemory)
//!  vhost_blk  the vhost-user backend object, the inbox, virtqueue access
//!  nbd        the NBD handshake and transmission
//!  monitor    the monitor socket: QMP (crate::qmp) clients, their
//!             commands and the jobs' steps run on the serve loop
//! ```
//!
//! Lifecycle: `quit` on the monitor, SIGTERM or SIGINT end the serve, and
//! so does the vhost-user frontend disconnecting when neither a monitor
//! nor an NBD export was asked for. With either, the frontend's requests
//! are drained, its memory released, the images written back, and the
//! socket takes the next frontend (QEMU reconnecting), as
//! qemu-storage-daemon's export stays up; a frontend that breaks the
//! protocol is dropped the same way (its error on stderr). Ending drains
//! every request (guest chains get their used entries), flushes the
//! backend and closes the images.

mod memory;
mod monitor;
mod nbd;
mod vhost_blk;

pub use memory::MappedMemory;

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vhost_blk::{Atomic, Backend, Shared, Vring};
use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;

use crate::device::FileDevice;
use crate::engine::{Engine, DEFAULT_SEGMENTS};
use crate::graph::{Access, NameBuf, OpenOptions};
use crate::host::PathResolver;
use crate::qmp::{Control, Jobs, NodeNames};
use crate::virtio_blk::{Config, DiskId, Server, DEFAULT_DESCRIPTORS, DEFAULT_REQUESTS};
use crate::{BackendId, Format, Graph};

/// Most virtqueues (`--num-queues`): one [`Server`] disk each.
pub const MAX_QUEUES: usize = 8;

/// The engine every request of the export goes through.
pub type ServeEngine = Engine<'static>;
/// The device side over the frontend's guest RAM.
type ServeServer = Server<
    'static,
    MappedMemory,
    DEFAULT_REQUESTS,
    DEFAULT_SEGMENTS,
    DEFAULT_DESCRIPTORS,
    MAX_QUEUES,
>;

/// What `serve` was asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// The image whose chain is exported.
    pub image: String,
    /// `-f FMT`; probed when `None`.
    pub format: Option<Format>,
    /// `--vhost-user-blk SOCKET`: the vhost-user socket to listen on.
    pub vhost_user_blk: Option<String>,
    /// `--num-queues N` (1 to [`MAX_QUEUES`]).
    pub num_queues: usize,
    /// `--nbd SOCKET`: the NBD unix socket to listen on.
    pub nbd: Option<String>,
    /// `--qmp SOCKET`: the monitor socket.
    pub qmp: Option<String>,
    /// `--read-only`: the export refuses writes; images open read-only.
    pub read_only: bool,
    /// `-t none`: the image files bypass the host's page cache (`O_DIRECT`
    /// for aligned transfers, as `bench -t none`); `-t writeback`, the
    /// default, does not.
    pub direct: bool,
}

/// A failure of `serve`, as one line for the user.
#[derive(Debug)]
pub struct ServeError(String);

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

fn error(message: impl fmt::Display) -> ServeError {
    ServeError(message.to_string())
}

/// The usage line.
pub const USAGE: &str = "serve [-f FMT] [-t none|writeback] IMAGE [--vhost-user-blk SOCKET [--num-queues N]] [--nbd SOCKET] [--qmp SOCKET] [--read-only]";

impl Options {
    /// Parses `serve`'s arguments (after the word `serve`).
    ///
    /// # Errors
    /// A message for a missing or unknown argument.
    pub fn parse(words: &[&str]) -> Result<Self, ServeError> {
        let mut options = Options {
            num_queues: 1,
            ..Options::default()
        };
        let mut image = None;
        let mut words = words.iter().copied();
        while let Some(word) = words.next() {
            let mut value = |name: &str| {
                words
                    .next()
                    .map(str::to_owned)
                    .ok_or_else(|| error(format_args!("{name} needs a value")))
            };
            match word {
                "-f" => {
                    let name = value("-f")?;
                    options.format = Some(
                        Format::from_name(&name).map_err(|e| error(format_args!("{name}: {e}")))?,
                    );
                }
                "--vhost-user-blk" => options.vhost_user_blk = Some(value(word)?),
                "--nbd" => options.nbd = Some(value(word)?),
                "--qmp" => options.qmp = Some(value(word)?),
                "--num-queues" => {
                    let n = value(word)?;
                    options.num_queues = match n.parse::<usize>() {
                        Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
                        _ => {
                            return Err(error(format_args!(
                                "--num-queues: {n}: expected 1 to {MAX_QUEUES}"
                            )))
                        }
                    };
                }
                "--read-only" => options.read_only = true,
                "-t" => {
                    options.direct = match value("-t")?.as_str() {
                        "none" => true,
                        "writeback" => false,
                        other => {
                            return Err(error(format_args!(
                                "-t: {other}: expected none or writeback"
                            )))
                        }
                    }
                }
                _ if word.starts_with('-') => {
                    return Err(error(format_args!("unknown option {word}; usage: {USAGE}")))
                }
                _ if image.is_none() => image = Some(word.to_owned()),
                _ => return Err(error(format_args!("one image is served; usage: {USAGE}"))),
            }
        }
        options.image = image.ok_or_else(|| error(format_args!("usage: {USAGE}")))?;
        if options.vhost_user_blk.is_none() && options.nbd.is_none() {
            return Err(error("serve needs --vhost-user-blk SOCKET or --nbd SOCKET"));
        }
        Ok(options)
    }
}

/// The block state the serve loop owns: the graph with the exported chain,
/// the engine every request goes through, the resolver backing names go
/// through, and the exported BlockBackend. A monitor command (snapshot,
/// jobs) runs on these, between guest requests, from the serve loop.
pub struct Block {
    /// The graph.
    pub graph: Box<Graph<FileDevice>>,
    /// The request engine.
    pub engine: Box<ServeEngine>,
    /// The resolver for image and backing names.
    pub resolver: PathResolver,
    /// The exported backend.
    pub backend: BackendId,
    /// QMP node names (the chain's images by file stem, and snapshots).
    pub names: NodeNames,
    /// QMP jobs and their events.
    pub jobs: Jobs,
}

impl Block {
    /// Opens `options.image`'s chain (writable unless read-only; locked as
    /// every command locks images) and attaches the export's backend.
    fn open(options: &Options, mut resolver: PathResolver) -> Result<Self, ServeError> {
        // Every image opened for the export (backing files, snapshot
        // overlays) in the cache mode asked for.
        resolver.direct = options.direct;
        let mut graph: Box<Graph<FileDevice>> = Box::default();
        let open = OpenOptions {
            format: options.format,
            read_only: options.read_only,
            writable_devices: !options.read_only,
            check_tables: true,
            ..OpenOptions::probing()
        };
        let mut at_fault = NameBuf::new();
        let top = graph
            .open_image_naming(&mut resolver, &options.image, open, &mut at_fault)
            .map_err(|e| match at_fault.is_empty() {
                true => error(format_args!("{}: {e}", options.image)),
                false => error(format_args!(
                    "{}: {}: {e}",
                    options.image,
                    at_fault.as_str()
                )),
            })?;
        if graph.is_probed(top).unwrap_or(false) {
            eprintln!(
                "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
                options.image
            );
        }
        let access = match options.read_only {
            true => Access::READ_ONLY_DEVICE,
            false => Access::READ_WRITE_DEVICE,
        };
        let backend = graph.attach_backend(top, access);
        let released = graph.unref(top);
        let backend = backend.map_err(|e| error(format_args!("{}: {e}", options.image)))?;
        released.map_err(|e| error(format_args!("{}: {e}", options.image)))?;
        let mut names = NodeNames::new();
        names
            .register_chain(&graph, top)
            .map_err(|e| error(format_args!("{}: {e}", options.image)))?;
        let mut engine: Box<ServeEngine> = Box::default();
        lend_buffers(&mut engine);
        Ok(Self {
            graph,
            engine,
            resolver,
            backend,
            names,
            jobs: Jobs::new(),
        })
    }

    /// What a QMP command works on: borrows of this state.
    pub fn control(&mut self) -> Control<'_> {
        Control {
            graph: &mut self.graph,
            engine: &mut self.engine,
            resolver: &mut self.resolver,
            backend: self.backend,
            names: &mut self.names,
            jobs: &mut self.jobs,
        }
    }

    /// Drains the engine, flushes the backend's chain and closes it.
    fn close(mut self) -> Result<(), ServeError> {
        self.engine.drain(&mut self.graph);
        while self.engine.complete().is_some() {}
        let flushed = self
            .graph
            .root(self.backend)
            .and_then(|root| self.graph.flush(root));
        let detached = self.graph.detach_backend(self.backend);
        flushed
            .and(detached)
            .map_err(|e| error(format_args!("closing: {e}")))
    }
}

/// Set by SIGTERM and SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

/// Binds a unix socket at `path`, replacing a stale socket there (never
/// another kind of file).
fn bind(path: &str) -> Result<UnixListener, ServeError> {
    listen_at(path, |at| UnixListener::bind(at))
}

/// Makes a listening socket with `listen` under a temporary name beside
/// `path`, then renames it to `path` (a stale socket there is replaced,
/// never another kind of file): the socket appears only once it listens,
/// so a client that sees it can connect.
fn listen_at<T>(
    path: &str,
    listen: impl FnOnce(&str) -> std::io::Result<T>,
) -> Result<T, ServeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(error(format_args!("{path}: exists and is not a socket")));
        }
    }
    let temporary = format!("{path}.{}.listening", std::process::id());
    let _ = std::fs::remove_file(&temporary);
    let listener = listen(&temporary).map_err(|e| error(format_args!("{path}: {e}")))?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(format_args!("{path}: {e}")));
    }
    Ok(listener)
}

/// The virtio-blk device: its server over the current memory table, one
/// disk per virtqueue.
struct Device {
    config: Config,
    num_queues: usize,
    serial: Vec<u8>,
    server: Option<Box<ServeServer>>,
    disks: Vec<DiskId>,
    vrings: Option<Vec<Vring>>,
}

impl Device {
    /// A server over the memory table `atomic` holds now.
    fn use_memory(&mut self, block: &Block, atomic: &Atomic) {
        self.release();
        self.disks.clear();
        let table = atomic.memory().into_inner();
        let memory = match MappedMemory::new(table) {
            Ok(memory) => memory,
            Err(err) => {
                eprintln!("blockgraph: vhost-user memory table refused: {err}");
                return;
            }
        };
        let mut server = Box::new(ServeServer::new(memory));
        for _ in 0..self.num_queues {
            match server.add_disk(block.backend, self.config, &self.serial) {
                Ok(disk) => self.disks.push(disk),
                Err(err) => {
                    eprintln!("blockgraph: virtio-blk disk: {err}");
                    self.disks.clear();
                    return;
                }
            }
        }
        self.server = Some(server);
    }

    /// Drops the server (and its hold on the memory table) once nothing
    /// of it is in the engine; leaks it otherwise (never reached: callers
    /// drain first).
    fn release(&mut self) {
        if let Some(server) = self.server.take() {
            if server.in_flight() > 0 {
                std::mem::forget(server);
            }
        }
    }

    /// Takes the chains the guest made available while there is room;
    /// whether it stopped with chains possibly left (the server full): the
    /// loop must come back for them without a kick, which EVENT_IDX
    /// withholds until the guest passes the available event.
    fn take_chains(&mut self, block: &mut Block) -> bool {
        let (Some(server), Some(vrings)) = (self.server.as_mut(), self.vrings.as_ref()) else {
            return false;
        };
        let table = server.memory().table().clone();
        let mut stopped_full = false;
        for (vring, &disk) in vrings.iter().zip(&self.disks) {
            let mut rearmed = false;
            loop {
                let mut full = !server.has_room();
                let mut popped = false;
                while !full {
                    let Some((head, chain)) = vhost_blk::pop(vring, &table) else {
                        break;
                    };
                    popped = true;
                    if server.submit(&mut block.engine, disk, head, chain).is_err() {
                        vhost_blk::unpop(vring);
                        full = true;
                    }
                    full |= !server.has_room();
                }
                stopped_full |= full;
                // Full: the loop comes back as requests finish. Else the
                // queue is empty: ask for a kick at the next chain, and
                // take one that came in between; a ring that says it holds
                // more yet yields none is one the guest broke (an index
                // out of range): it waits for the next kick.
                if full || (rearmed && !popped) || !vhost_blk::rearm(vring) {
                    break;
                }
                rearmed = true;
            }
        }
        stopped_full
    }

    /// Polls the server and puts finished chains in their used rings;
    /// returns the chains not finished.
    fn progress(&mut self, block: &mut Block) -> usize {
        let Some(server) = self.server.as_mut() else {
            return 0;
        };
        let left = server.poll(&mut block.graph, &mut block.engine);
        let mut signal = [false; MAX_QUEUES];
        while let Some(used) = server.next_used() {
            let Some(queue) = self.disks.iter().position(|&d| d == used.disk) else {
                continue;
            };
            if let Some(vring) = self.vrings.as_ref().and_then(|v| v.get(queue)) {
                // A ring the frontend broke loses only this entry.
                if vring.add_used(used.head, used.len).is_ok() {
                    signal[queue] = true;
                }
            }
        }
        for (queue, vring) in self.vrings.iter().flatten().enumerate() {
            if signal.get(queue) == Some(&true) {
                vhost_blk::signal_used(vring);
            }
        }
        left
    }

    /// Polls until every chain the server took has finished (reported in
    /// the used rings unless forgotten by a reset).
    fn drain(&mut self, block: &mut Block) {
        // A drained section an NBD block status waits for would hold back
        // the queued chains this waits for: it asks again later.
        block.engine.cancel_drained();
        while self.progress(block) > 0 {
            wait_for_devices(block);
        }
    }
}

impl Drop for Device {
    /// The loop drops a server only once it is drained. Should it be
    /// dropped with chains in the engine anyway (a panic unwinding), its
    /// guest memory is leaked rather than unmapped under the engine's
    /// slices.
    fn drop(&mut self) {
        self.release();
    }
}

/// Lets the engine make progress: blocks in the devices while they have
/// operations in flight, else polls (a job's run may wait for a step
/// that needs no device: its target's first-write check, a free
/// allocation entry) and yields briefly.
fn wait_for_devices(block: &mut Block) {
    if block.engine.operations() > 0 {
        block.engine.advance(&mut block.graph);
    } else {
        block.engine.poll(&mut block.graph);
        thread::sleep(Duration::from_micros(200));
    }
}

/// Whether a vhost-user frontend that disconnects (or breaks the protocol
/// and is dropped) may be followed by another on the same socket (QEMU
/// reconnecting, a guest rebooted in a new QEMU): when the serve has a
/// monitor or an NBD export, which keep it running, as
/// qemu-storage-daemon keeps its export.
fn reconnects(options: &Options) -> bool {
    options.qmp.is_some() || options.nbd.is_some()
}

/// Why the loop ended.
enum End {
    /// `quit`, a signal, or the frontend left.
    Clean,
    /// The frontend broke the protocol.
    Frontend(String),
}

/// Runs `serve` until it is asked to end; the images are flushed and
/// closed when it returns.
///
/// # Errors
/// Opening the images or a socket failed, the frontend broke the protocol
/// with neither a monitor nor an NBD export to keep the serve up (the
/// images are still flushed and closed), or closing failed.
pub fn run(options: &Options, resolver: PathResolver) -> Result<(), ServeError> {
    let mut block = Block::open(options, resolver)?;
    let config = Config::for_backend(&block.graph, block.backend)
        .map_err(|e| error(format_args!("{}: {e}", options.image)))?;
    let shared = Arc::new(Shared::default());
    let started = start_threads(options, &shared, config, &block);
    let end = match started {
        Ok(channels) => serve_loop(options, &shared, config, &mut block, channels),
        Err(err) => Err(err),
    };
    shared.tell(|inbox| inbox.loop_gone = true);
    remove_sockets(options);
    let closed = block.close();
    match end {
        Err(err) => Err(closed.err().unwrap_or(err)),
        Ok(End::Frontend(message)) => {
            closed?;
            Err(error(format_args!("vhost-user frontend: {message}")))
        }
        Ok(End::Clean) => closed,
    }
}

/// Metadata buffers lent to the serve's engine (misses load without
/// blocking, flushes write table updates back as device operations).
const METADATA_BUFFERS_LENT: usize = 8;
/// Copy buffers lent to it (the copy-on-write of allocating writes as
/// device operations), each as large as the largest qcow2 cluster.
const COPY_BUFFERS_LENT: usize = 8;

/// Lends `engine` its metadata and copy buffers, for the process's life
/// (the engine holds them while devices use them).
fn lend_buffers(engine: &mut ServeEngine) {
    for _ in 0..METADATA_BUFFERS_LENT {
        let buffer = Box::leak(vec![0u8; crate::format::cache::SLICE_SIZE].into_boxed_slice());
        let _ = engine.lend_metadata_buffer(buffer);
    }
    for _ in 0..COPY_BUFFERS_LENT {
        let buffer = Box::leak(vec![0u8; 2 << 20].into_boxed_slice());
        let _ = engine.lend_copy_buffer(buffer);
    }
}

/// Removes the sockets the serve made (what is a socket at their paths),
/// so that none is left for a client to find after the exit.
fn remove_sockets(options: &Options) {
    let paths = [&options.qmp, &options.nbd, &options.vhost_user_blk];
    for path in paths.into_iter().flatten() {
        remove_socket(path);
    }
}

/// Removes the socket at `path` (nothing else).
fn remove_socket(path: &str) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Where the other threads' work arrives: NBD requests and monitor lines.
struct Channels {
    nbd: Option<mpsc::Receiver<nbd::Request>>,
    monitor: Option<mpsc::Receiver<monitor::Line>>,
}

/// Binds the sockets and starts the threads that serve them.
fn start_threads(
    options: &Options,
    shared: &Arc<Shared>,
    config: Config,
    block: &Block,
) -> Result<Channels, ServeError> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(signal, on_signal)
            .map_err(|e| error(format_args!("signal handler: {e}")))?;
    }
    let mut lines = None;
    if let Some(path) = &options.qmp {
        let listener = bind(path)?;
        let shared = shared.clone();
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || monitor::serve(listener, sender, shared));
        lines = Some(receiver);
    }
    let mut requests = None;
    if let Some(path) = &options.nbd {
        let listener = bind(path)?;
        let size = block
            .graph
            .backend_size(block.backend)
            .map_err(|e| error(format_args!("{}: {e}", options.image)))?;
        let (sender, receiver) = mpsc::channel();
        let export = nbd::Export {
            size,
            read_only: options.read_only,
        };
        let shared = shared.clone();
        thread::spawn(move || nbd::serve(listener, export, sender, shared));
        requests = Some(receiver);
    }
    if let Some(path) = &options.vhost_user_blk {
        // Bound by vhost's own listener, under a temporary name first.
        let mut listener = listen_at(path, |at| {
            vhost::vhost_user::Listener::new(at, false).map_err(std::io::Error::other)
        })?;
        let backend = Backend {
            shared: shared.clone(),
            config,
            num_queues: options.num_queues,
        };
        let shared = shared.clone();
        let reconnect = reconnects(options);
        thread::spawn(move || loop {
            let ended = vhost_blk::serve_frontend(&mut listener, backend.clone());
            // The frontend's vrings go with it; the next one's first kick
            // brings its own.
            let mut released = 0;
            shared.tell(|inbox| {
                inbox.ended = Some(ended.err());
                inbox.vrings = None;
                // Its memory table is no longer mapped for it.
                inbox.memory = None;
                inbox.memory_changed = false;
                released = inbox.frontends_released;
            });
            if !reconnect {
                break;
            }
            // The loop lets go of this frontend's memory and vrings before
            // the next one can send its own.
            let mut inbox = shared.lock();
            while inbox.frontends_released == released && !inbox.loop_gone {
                inbox = shared.wait(inbox, Duration::from_millis(100));
            }
            if inbox.loop_gone {
                break;
            }
        });
    }
    Ok(Channels {
        nbd: requests,
        monitor: lines,
    })
}

/// The serve loop; see the module docs.
fn serve_loop(
    options: &Options,
    shared: &Shared,
    config: Config,
    block: &mut Block,
    channels: Channels,
) -> Result<End, ServeError> {
    let stem = Path::new(&options.image)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut serial = stem.into_bytes();
    serial.truncate(crate::virtio_blk::ID_LEN);
    let mut device = Device {
        config,
        num_queues: options.num_queues,
        serial,
        server: None,
        disks: Vec::new(),
        vrings: None,
    };
    let mut nbd = nbd::Pending::new(channels.nbd);
    let mut clients = monitor::Clients::default();
    let end = loop {
        let mut inbox = shared.lock();
        // Whatever woke us is looked at below: queues, NBD, monitor.
        inbox.kicked = false;
        let memory = match std::mem::take(&mut inbox.memory_changed) {
            true => inbox.memory.clone(),
            false => None,
        };
        if device.vrings.is_none() {
            device.vrings = inbox.vrings.clone();
        }
        let drain_asked = inbox.requests > inbox.acks;
        let reset = std::mem::take(&mut inbox.reset);
        let ended = inbox.ended.take();
        let quit = inbox.quit;
        drop(inbox);

        if quit || STOP.load(Ordering::SeqCst) {
            break End::Clean;
        }
        if let Some(atomic) = memory {
            // The old table stays mapped until nothing uses it.
            device.drain(block);
            device.use_memory(block, &atomic);
        }
        if drain_asked {
            if reset {
                if let Some(server) = device.server.as_mut() {
                    for &disk in &device.disks {
                        server.reset(disk);
                    }
                }
            }
            device.drain(block);
            shared.tell(|inbox| inbox.acks = inbox.requests);
        }
        if let Some(ended) = ended {
            device.drain(block);
            device.release();
            device.vrings = None;
            // The frontend thread waits for this before taking the next
            // frontend.
            shared.tell(|inbox| inbox.frontends_released += 1);
            let reconnecting = reconnects(options);
            // Without a next frontend the socket goes, so no client finds
            // a socket that nothing listens on.
            if !reconnecting {
                if let Some(path) = &options.vhost_user_blk {
                    remove_socket(path);
                }
            }
            match (ended, reconnecting) {
                (Some(message), false) => break End::Frontend(message),
                (None, false) => break End::Clean,
                // As qemu-storage-daemon drops a client that broke the
                // protocol and serves the next one.
                (Some(message), true) => {
                    eprintln!("blockgraph: vhost-user frontend dropped: {message}");
                }
                (None, true) => {}
            }
            // Like qemu-storage-daemon, keep the images open (written
            // back, when no NBD request is in flight) for the monitor's
            // `quit`.
            let written = block
                .engine
                .drained(&mut block.graph, |graph| graph.write_back_all());
            if written.is_none() {
                block.engine.cancel_drained();
            }
        }
        // The monitor's commands run here, between requests, on the
        // block state this loop owns; then the jobs take a step.
        if let Some(lines) = &channels.monitor {
            if clients.take(lines, block) {
                break End::Clean;
            }
        }
        if !block.jobs.is_empty() {
            clients.step_jobs(block);
        }
        let chains_left = device.take_chains(block);
        nbd.take(block);
        let left = device.progress(block) + nbd.progress(block);
        // Job runs are carried on here too when no guest or NBD request
        // makes the loop poll.
        let job_runs = block.engine.operations() > 0 || block.engine.job_running();
        if left > 0 || chains_left || job_runs {
            wait_for_devices(block);
            continue;
        }
        let inbox = shared.lock();
        let idle = !inbox.kicked
            && !inbox.memory_changed
            && inbox.requests == inbox.acks
            && inbox.ended.is_none()
            && !inbox.quit;
        if idle {
            // Jobs step at least every millisecond; nothing else to do
            // wakes us when kicked.
            let nap = match block.jobs.is_empty() {
                true => Duration::from_millis(100),
                false => Duration::from_millis(1),
            };
            drop(shared.wait(inbox, nap));
        }
    };
    nbd.drain(block);
    device.drain(block);
    // Only now, with nothing in the engine, is the guest memory released.
    drop(device);
    Ok(end)
}
