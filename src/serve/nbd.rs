//! The NBD export: the fixed newstyle handshake (`NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT` with the `base:allocation` context), READ,
//! WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and DISC over a unix
//! socket (the NBD protocol, `doc/proto.md` of the nbd project). With
//! structured replies negotiated, a read's answer is one `OFFSET_DATA`
//! chunk (or an `ERROR` chunk) and block status one `BLOCK_STATUS` chunk,
//! as qemu-storage-daemon answers; other commands get simple replies, as
//! the protocol allows.
//!
//! ```text
//!  connection thread: handshake, then per request: header (+ payload)
//!      └─ Request (owned buffer) ──> serve loop: Engine::submit_* on the
//!                                    export's backend
//!  writer thread <── Reply (cookie, buffer back) ── Engine::take when done
//!      simple reply (+ read data), in completion order
//! ```
//!
//! Every client byte is hostile: lengths are bounded before anything is
//! allocated ([`MAX_REQUEST`], [`MAX_OPTION`]), ranges are checked against
//! the export's size, an unknown option gets `NBD_REP_ERR_UNSUP` and an
//! unknown command `EINVAL`; a client that breaks the framing is
//! disconnected. Requests of one connection are in flight together (up to
//! [`MAX_IN_FLIGHT`], replies in any order, by cookie, from a writer
//! thread that sends the replies ready together in one `writev`), and
//! connections are served side by side. A request's header takes one
//! system call (the input is buffered).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread;

use nix::sys::socket::{setsockopt, sockopt};

use super::vhost_blk::Shared;
use super::Block;
use crate::backend::BackendId;
use crate::device::FileDevice;
use crate::engine::Ticket;
use crate::{ErrorKind, Graph};

/// `NBDMAGIC`.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the option magic.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_REQ_ONE`: block status for one extent.
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flag: the last chunk of the reply.
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context served, and its id once selected.
const BASE_ALLOCATION: &[u8] = b"base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` flags: not allocated (no data stored), reads as zeros.
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;
/// Most extents in one block status reply (a longer range is answered in
/// part, as the protocol allows).
const MAX_EXTENTS: usize = 1024;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Largest READ or WRITE payload served (the block-size maximum
/// advertised); larger ones are refused with `EINVAL`.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload read; a larger one disconnects.
pub const MAX_OPTION: u32 = 64 << 10;

/// What the export looks like to a client.
#[derive(Clone, Copy, Debug)]
pub(super) struct Export {
    /// Its size in bytes.
    pub size: u64,
    /// Writes are refused (`EPERM`).
    pub read_only: bool,
}

impl Export {
    fn flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
        match self.read_only {
            true => flags |= TFLAG_READ_ONLY,
            false => flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES,
        }
        flags
    }
}

/// What the engine is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    /// `base:allocation` of the range; `one`: the first extent only.
    BlockStatus {
        one: bool,
    },
}

/// One request for the serve loop.
pub(super) struct Request {
    op: Op,
    offset: u64,
    len: u32,
    /// The data of a read (filled) or a write.
    buffer: Option<Box<[u8]>>,
    /// The client's name for it, and where its reply goes.
    cookie: u64,
    reply: Sender<Reply>,
}

/// An answer for the connection's writer: the request's cookie, its
/// result and, for a read, the data.
struct Reply {
    cookie: u64,
    op: Op,
    /// The request's offset (a structured read reply names it).
    offset: u64,
    result: Result<(), ErrorKind>,
    /// A read's data (sent when the result is a success).
    data: Option<Box<[u8]>>,
    /// Block status: the extents as sent (big-endian length and
    /// `base:allocation` flags, 8 bytes each).
    extents: Vec<u8>,
}

impl Reply {
    /// `result` for request `cookie` of kind `op` at `offset`, with its
    /// buffer back.
    fn new(
        cookie: u64,
        op: Op,
        offset: u64,
        result: Result<(), ErrorKind>,
        buffer: Option<Box<[u8]>>,
    ) -> Self {
        Self {
            cookie,
            op,
            offset,
            result,
            data: buffer.filter(|_| op == Op::Read),
            extents: Vec::new(),
        }
    }
}

/// A buffer lent to the engine: the `Box` is turned into a raw pointer
/// for the time the engine holds slices of it, and back into the `Box`
/// once the engine is done with it.
struct Lent {
    ptr: *mut [u8],
}

impl Lent {
    fn new(buffer: Box<[u8]>) -> Self {
        Self {
            ptr: Box::into_raw(buffer),
        }
    }

    /// The buffer as the engine wants it: `'static`, because the engine
    /// may hold it until the request completes.
    ///
    /// # Safety
    /// Called once; the slice is dropped before [`Lent::into_box`].
    unsafe fn slice_mut(&self) -> &'static mut [u8] {
        // SAFETY: `ptr` came from `Box::into_raw` and is freed only by
        // `into_box`; the caller promises this is the only slice made and
        // that it dies before then.
        unsafe { &mut *self.ptr }
    }

    /// The buffer back.
    ///
    /// # Safety
    /// No slice from [`Lent::slice_mut`] is alive (the engine gave the
    /// request back and its buffers were dropped).
    unsafe fn into_box(self) -> Box<[u8]> {
        // SAFETY: `ptr` came from `Box::into_raw`, is reclaimed once (self
        // is consumed), and nothing references it any more.
        unsafe { Box::from_raw(self.ptr) }
    }
}

/// A request in the engine.
struct InFlight {
    ticket: Ticket,
    buffer: Option<Lent>,
    op: Op,
    offset: u64,
    cookie: u64,
    reply: Sender<Reply>,
}

/// The serve loop's side: requests received and not yet started, and
/// those in the engine.
pub(super) struct Pending {
    receiver: Option<Receiver<Request>>,
    waiting: VecDeque<Request>,
    in_flight: Vec<InFlight>,
}

impl Pending {
    /// Requests will come from `receiver` (none without an NBD export).
    pub fn new(receiver: Option<Receiver<Request>>) -> Self {
        Self {
            receiver,
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
        }
    }

    /// Submits the requests received, in order, while the engine takes
    /// them, polling after each while no QMP job runs: a read the page
    /// cache serves is answered before the next one starts, so the writer
    /// thread sends it while this loop reads the next (submitting them all
    /// first made them move through the threads as one convoy: 0.72×
    /// qemu-storage-daemon on 64 KiB reads at depth 8, 1.3× this way).
    pub fn take(&mut self, block: &mut Block) {
        if let Some(receiver) = &self.receiver {
            loop {
                match receiver.try_recv() {
                    Ok(request) => self.waiting.push_back(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.receiver = None;
                        break;
                    }
                }
            }
        }
        // Each poll counts against a job's stepping (a job that is not
        // stepped within a few polls no longer holds guest writes back):
        // with QMP jobs, requests go in together.
        let pipelined = block.jobs.is_empty();
        while let Some(request) = self.waiting.pop_front() {
            if let Err(request) = self.submit(block, request) {
                self.waiting.push_front(request);
                break;
            }
            if pipelined {
                block.engine.poll(&mut block.graph);
                self.answer_finished(block);
            }
        }
    }

    /// Submits one request; gives it back when the engine is full (or,
    /// for block status, until its devices are quiet).
    fn submit(&mut self, block: &mut Block, mut request: Request) -> Result<(), Request> {
        if let Op::BlockStatus { one } = request.op {
            return answer_block_status(block, request, one);
        }
        let (engine, backend) = (&mut block.engine, block.backend);
        let lent = request.buffer.take().map(Lent::new);
        // SAFETY (both): the one slice of the buffer goes to the engine and
        // is dropped when the request is taken back (`progress`), before
        // the buffer is reclaimed.
        let submitted = match (request.op, &lent) {
            (Op::Read, Some(buffer)) => {
                engine.submit_read(backend, request.offset, [unsafe { buffer.slice_mut() }])
            }
            (Op::Write, Some(buffer)) => {
                engine.submit_write(backend, request.offset, [&*unsafe { buffer.slice_mut() }])
            }
            (Op::Flush, _) => engine.submit_flush(backend),
            (Op::Trim, _) => engine.submit_discard(backend, request.offset, request.len.into()),
            (Op::WriteZeroes, _) => {
                engine.submit_write_zeroes(backend, request.offset, request.len.into())
            }
            (Op::Read | Op::Write, None) | (Op::BlockStatus { .. }, _) => {
                Err(crate::Error::new(ErrorKind::InvalidInput, "no buffer"))
            }
        };
        match submitted {
            Ok(ticket) => {
                self.in_flight.push(InFlight {
                    ticket,
                    buffer: lent,
                    op: request.op,
                    offset: request.offset,
                    cookie: request.cookie,
                    reply: request.reply,
                });
                Ok(())
            }
            Err(err) => {
                // Not submitted: the engine holds no slice of the buffer.
                // SAFETY: the slice made above was dropped with the failed
                // submission's arguments.
                request.buffer = lent.map(|l| unsafe { l.into_box() });
                if err.kind() == ErrorKind::NoCapacity {
                    return Err(request);
                }
                let reply = Reply::new(
                    request.cookie,
                    request.op,
                    request.offset,
                    Err(err.kind()),
                    request.buffer,
                );
                let _ = request.reply.send(reply);
                Ok(())
            }
        }
    }

    /// Polls the engine and answers the requests that finished; returns
    /// those not answered yet.
    pub fn progress(&mut self, block: &mut Block) -> usize {
        if self.in_flight.is_empty() && self.waiting.is_empty() {
            return 0;
        }
        block.engine.poll(&mut block.graph);
        self.answer_finished(block);
        self.take(block);
        self.in_flight.len() + self.waiting.len()
    }

    /// Answers the requests the engine has finished.
    fn answer_finished(&mut self, block: &mut Block) {
        let mut index = 0;
        while index < self.in_flight.len() {
            let done = match block.engine.take(self.in_flight[index].ticket) {
                Ok(None) => {
                    index += 1;
                    continue;
                }
                Ok(Some(done)) => done.result.map_err(|e| e.kind()),
                Err(err) => Err(err.kind()),
            };
            // `done` (with a read's pieces of the buffer) is gone: nothing
            // references the buffer any more.
            let finished = self.in_flight.swap_remove(index);
            // SAFETY: the engine gave the request back and its buffers were
            // dropped with `Done`.
            let buffer = finished.buffer.map(|b| unsafe { b.into_box() });
            let reply = Reply::new(finished.cookie, finished.op, finished.offset, done, buffer);
            let _ = finished.reply.send(reply);
        }
    }

    /// Polls until every request submitted has been answered.
    pub fn drain(&mut self, block: &mut Block) {
        while self.progress(block) > 0 {
            super::wait_for_devices(block);
        }
    }
}

/// Answers a block status request from the chain's metadata, in a
/// drained section of the engine (no device operation in flight: no load
/// or write-back is under way while the graph's lookups run); gives the
/// request back until the section is reached, and the requests after it
/// wait meanwhile.
fn answer_block_status(block: &mut Block, request: Request, one: bool) -> Result<(), Request> {
    let backend = block.backend;
    let (offset, len) = (request.offset, u64::from(request.len));
    let Some(extents) = block.engine.drained(&mut block.graph, |graph| {
        allocation_extents(graph, backend, offset, len, one)
    }) else {
        return Err(request);
    };
    let result = extents.as_ref().map(|_| ()).map_err(|kind| *kind);
    let mut reply = Reply::new(request.cookie, request.op, offset, result, None);
    for (length, flags) in extents.unwrap_or_default() {
        reply.extents.extend_from_slice(&length.to_be_bytes());
        reply.extents.extend_from_slice(&flags.to_be_bytes());
    }
    let _ = request.reply.send(reply);
    Ok(())
}

/// The `base:allocation` extents of `len` bytes at `offset` through
/// `backend` (QEMU's block status over the whole chain): a hole where no
/// data is stored, zero where it reads as zeros; neighbours with the same
/// flags merged; at most [`MAX_EXTENTS`], one with `one`.
fn allocation_extents(
    graph: &mut Graph<FileDevice>,
    backend: BackendId,
    offset: u64,
    len: u64,
    one: bool,
) -> Result<Vec<(u32, u32)>, ErrorKind> {
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    // The lookups are bounded too (each may load metadata, with guest
    // requests held): a long range is answered in part.
    for _ in 0..MAX_EXTENTS * 4 {
        if at >= end {
            break;
        }
        let (status, run) = graph
            .backend_block_status(backend, at, end - at)
            .map_err(|e| e.kind())?;
        if run == 0 {
            return Err(ErrorKind::Corrupt);
        }
        // Within the request, whose length is a u32.
        let run = run.min(end - at) as u32;
        let hole = if status.data { 0 } else { STATE_HOLE };
        let flags = hole | if status.zero { STATE_ZERO } else { 0 };
        let full = one && !extents.is_empty() || extents.len() == MAX_EXTENTS;
        match extents.last_mut() {
            Some((length, last)) if *last == flags => *length += run,
            _ if full => break,
            _ => extents.push((run, flags)),
        }
        at += u64::from(run);
    }
    Ok(extents)
}

/// Accepts clients on `listener`, each on a thread of its own.
pub(super) fn serve(
    listener: UnixListener,
    export: Export,
    requests: Sender<Request>,
    shared: Arc<Shared>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let requests = requests.clone();
        let shared = shared.clone();
        thread::spawn(move || {
            // A client's error ends only its connection.
            let _ = Connection::new(stream, export, requests, shared).and_then(Connection::run);
        });
    }
}

/// One client.
struct Connection {
    /// What the client sends, read through a buffer: a request header
    /// (and the next ones the client already sent) in one system call.
    input: BufReader<UnixStream>,
    /// Where the handshake's answers go (the replies go from the writer
    /// thread, through a clone of it).
    stream: UnixStream,
    export: Export,
    requests: Sender<Request>,
    shared: Arc<Shared>,
    /// `NBD_OPT_STRUCTURED_REPLY` was negotiated.
    structured: bool,
    /// `base:allocation` was selected (`NBD_OPT_SET_META_CONTEXT`).
    allocation_context: bool,
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl Connection {
    fn new(
        stream: UnixStream,
        export: Export,
        requests: Sender<Request>,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        Ok(Self {
            input: BufReader::with_capacity(INPUT_BUFFER, stream.try_clone()?),
            stream,
            export,
            requests,
            shared,
            structured: false,
            allocation_context: false,
        })
    }

    fn run(mut self) -> io::Result<()> {
        if self.handshake()? {
            self.transmission()?;
        }
        Ok(())
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.input.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.input.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The handshake; whether transmission follows.
    fn handshake(&mut self) -> io::Result<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.stream.write_all(&hello)?;
        let client = self.read_u32()?;
        if client & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(invalid("the client does not speak fixed newstyle"));
        }
        let no_zeroes = client & CLIENT_NO_ZEROES != 0;
        loop {
            if self.read_u64()? != IHAVEOPT {
                return Err(invalid("bad option magic"));
            }
            let option = self.read_u32()?;
            let len = self.read_u32()?;
            if len > MAX_OPTION {
                return Err(invalid("option too long"));
            }
            let mut data = vec![0; len as usize];
            self.input.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let mut reply = Vec::with_capacity(10 + 124);
                    reply.extend_from_slice(&self.export.size.to_be_bytes());
                    reply.extend_from_slice(&self.export.flags().to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0; 124]);
                    }
                    self.stream.write_all(&reply)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    // The client may already have gone.
                    let _ = self.option_reply(option, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.option_reply(option, REP_ERR_INVALID, &[])?;
                        continue;
                    }
                    // One export, the default (empty) name.
                    self.option_reply(option, REP_SERVER, &0u32.to_be_bytes())?;
                    self.option_reply(option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    if !go_data_valid(&data) {
                        self.option_reply(option, REP_ERR_INVALID, &[])?;
                        continue;
                    }
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&self.export.size.to_be_bytes());
                    info.extend_from_slice(&self.export.flags().to_be_bytes());
                    self.option_reply(option, REP_INFO, &info)?;
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&1u32.to_be_bytes());
                    sizes.extend_from_slice(&4096u32.to_be_bytes());
                    sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.option_reply(option, REP_INFO, &sizes)?;
                    self.option_reply(option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    let kind = match data.is_empty() {
                        true => REP_ACK,
                        false => REP_ERR_INVALID,
                    };
                    self.structured |= kind == REP_ACK;
                    self.option_reply(option, kind, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if option == OPT_SET_META_CONTEXT {
                        // A SET replaces the selection, a failed one with none.
                        self.allocation_context = false;
                    }
                    let queries = match self.structured {
                        true => meta_context_queries(&data),
                        false => None,
                    };
                    let Some(queries) = queries else {
                        self.option_reply(option, REP_ERR_INVALID, &[])?;
                        continue;
                    };
                    let set = option == OPT_SET_META_CONTEXT;
                    // A listing without queries lists every context; `base:`
                    // lists the namespace's.
                    let matches = queries.is_empty() && !set
                        || queries
                            .iter()
                            .any(|q| *q == BASE_ALLOCATION || !set && *q == b"base:");
                    if set {
                        self.allocation_context = matches;
                    }
                    if matches {
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        let mut reply = id.to_be_bytes().to_vec();
                        reply.extend_from_slice(BASE_ALLOCATION);
                        self.option_reply(option, REP_META_CONTEXT, &reply)?;
                    }
                    self.option_reply(option, REP_ACK, &[])?;
                }
                _ => self.option_reply(option, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut reply = Vec::with_capacity(20 + data.len());
        reply.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&option.to_be_bytes());
        reply.extend_from_slice(&kind.to_be_bytes());
        reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
        reply.extend_from_slice(data);
        self.stream.write_all(&reply)
    }

    /// Requests until DISC or the client leaves: each goes to the serve
    /// loop without waiting for the ones before it (up to
    /// [`MAX_IN_FLIGHT`]); a writer thread sends the replies as they come,
    /// in any order, named by their cookies. On the way out every reply
    /// still owed is sent first.
    fn transmission(&mut self) -> io::Result<()> {
        let window = Arc::new(Window::default());
        let (replies, outbox) = mpsc::channel();
        let writer = self.stream.try_clone()?;
        // A refusal keeps the default size.
        let _ = setsockopt(&writer, sockopt::SndBuf, &SEND_BUFFER);
        let structured = self.structured;
        let writing = {
            let window = window.clone();
            thread::spawn(move || write_replies(writer, &outbox, &window, structured))
        };
        let read = self.requests_until_disc(&replies, &window);
        drop(replies);
        let written = writing
            .join()
            .unwrap_or_else(|_| Err(invalid("the reply writer failed")));
        read.and(written)
    }

    /// Reads requests and posts them (or their immediate refusal) until
    /// DISC, the client leaving or the framing breaking.
    fn requests_until_disc(&mut self, replies: &Sender<Reply>, window: &Window) -> io::Result<()> {
        loop {
            let mut header = [0u8; 28];
            self.input.read_exact(&mut header)?;
            let field = |at: usize, len: usize| {
                header[at..at + len]
                    .iter()
                    .fold(0u64, |value, &byte| value << 8 | u64::from(byte))
            };
            if field(0, 4) != u64::from(REQUEST_MAGIC) {
                return Err(invalid("bad request magic"));
            }
            let flags = field(4, 2) as u16;
            let kind = field(6, 2) as u16;
            let cookie = field(8, 8);
            let offset = field(16, 8);
            let len = field(24, 4) as u32;
            let in_range = offset
                .checked_add(len.into())
                .is_some_and(|end| end <= self.export.size);
            let refuse = |kind: ErrorKind| Err::<(Op, Option<Box<[u8]>>), _>(kind);
            let request = match kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    if len > MAX_REQUEST {
                        // The payload cannot be skipped safely: framing is
                        // lost, as the protocol allows.
                        return Err(invalid("write larger than the maximum"));
                    }
                    let mut buffer = vec![0u8; len as usize].into_boxed_slice();
                    self.input.read_exact(&mut buffer)?;
                    match () {
                        _ if self.export.read_only => refuse(ErrorKind::ReadOnly),
                        _ if !in_range => refuse(ErrorKind::InvalidInput),
                        _ => Ok((Op::Write, Some(buffer))),
                    }
                }
                CMD_READ => match () {
                    _ if len > MAX_REQUEST || !in_range => refuse(ErrorKind::InvalidInput),
                    _ => Ok((Op::Read, Some(window.buffer(len as usize)))),
                },
                CMD_FLUSH => Ok((Op::Flush, None)),
                CMD_BLOCK_STATUS => match () {
                    _ if !self.allocation_context || len == 0 || !in_range => {
                        refuse(ErrorKind::InvalidInput)
                    }
                    _ => Ok((
                        Op::BlockStatus {
                            one: flags & CMD_FLAG_REQ_ONE != 0,
                        },
                        None,
                    )),
                },
                CMD_TRIM | CMD_WRITE_ZEROES => match () {
                    _ if self.export.read_only => refuse(ErrorKind::ReadOnly),
                    _ if !in_range => refuse(ErrorKind::InvalidInput),
                    _ if kind == CMD_TRIM => Ok((Op::Trim, None)),
                    _ => Ok((Op::WriteZeroes, None)),
                },
                _ => refuse(ErrorKind::InvalidInput),
            };
            window.acquire();
            match request {
                // Nothing to do: answered at once.
                Ok((op, buffer)) if len == 0 && op != Op::Flush => {
                    let _ = replies.send(Reply::new(cookie, op, offset, Ok(()), buffer));
                }
                Ok((op, buffer)) => {
                    let request = Request {
                        op,
                        offset,
                        len,
                        buffer,
                        cookie,
                        reply: replies.clone(),
                    };
                    if self.requests.send(request).is_err() {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "server ending"));
                    }
                    self.shared.tell(|inbox| inbox.kicked = true);
                }
                Err(error) => {
                    // A refused read still gets a read's reply (structured:
                    // an error chunk), block status likewise.
                    let op = match kind {
                        CMD_READ => Op::Read,
                        CMD_BLOCK_STATUS => Op::BlockStatus { one: false },
                        _ => Op::Flush,
                    };
                    let _ = replies.send(Reply::new(cookie, op, offset, Err(error), None));
                }
            }
        }
    }
}

/// Most requests of one connection in the serve loop at once; the reader
/// waits for a reply before reading more.
const MAX_IN_FLIGHT: usize = 64;

/// Bytes of a connection's input buffer: request headers, small writes'
/// data (a larger payload is read straight into its buffer).
const INPUT_BUFFER: usize = 8 << 10;

/// Counts a connection's requests between their reading and their reply,
/// and keeps the buffers of the reads it answered for the next reads.
#[derive(Default)]
struct Window {
    open: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
    /// Read buffers sent back to the client (at most [`MAX_IN_FLIGHT`]).
    spare: std::sync::Mutex<Vec<Box<[u8]>>>,
}

impl Window {
    /// A buffer of `len` bytes for a read: a spare one of that size, else
    /// a new one. A spare one holds an earlier read's bytes, which this
    /// read overwrites whole before any reaches the client (a failed read
    /// sends no data).
    fn buffer(&self, len: usize) -> Box<[u8]> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        match spare.iter().rposition(|b| b.len() == len) {
            Some(at) => spare.swap_remove(at),
            None => vec![0u8; len].into_boxed_slice(),
        }
    }

    /// Keeps `buffer`, a read's data that went to the client, for a next
    /// read.
    fn recycle(&self, buffer: Box<[u8]>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        // An empty one (a zero-length read) would only take a place.
        if !buffer.is_empty() && spare.len() < MAX_IN_FLIGHT {
            spare.push(buffer);
        }
    }

    /// Takes a place, waiting while [`MAX_IN_FLIGHT`] are taken.
    fn acquire(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while *open >= MAX_IN_FLIGHT {
            open = self.changed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        *open += 1;
    }

    /// Gives `count` places back.
    fn release(&self, count: usize) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        // The reader waits only when every place is taken.
        if *open >= MAX_IN_FLIGHT {
            self.changed.notify_one();
        }
        *open = open.saturating_sub(count);
    }
}

/// Most replies sent in one `writev`.
const REPLIES_PER_WRITE: usize = 16;

/// Writes each reply from `outbox` as a simple reply (and a read's data),
/// until every sender is gone; a write error ends the connection. The
/// replies waiting together go out together, in one `writev` where the
/// socket takes them.
fn write_replies(
    mut stream: UnixStream,
    outbox: &Receiver<Reply>,
    window: &Window,
    structured: bool,
) -> io::Result<()> {
    let mut result = Ok(());
    let mut batch = Vec::with_capacity(REPLIES_PER_WRITE);
    while let Ok(first) = outbox.recv() {
        batch.push(first);
        while batch.len() < REPLIES_PER_WRITE {
            match outbox.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        window.release(batch.len());
        // Once the client is gone the rest is dropped (the senders still
        // get their buffers back through the loop).
        if result.is_ok() {
            result = send_replies(&mut stream, &batch, structured);
        }
        for reply in batch.drain(..) {
            if let Some(data) = reply.data {
                window.recycle(data);
            }
        }
    }
    result
}

/// Sends `replies` (at most [`REPLIES_PER_WRITE`]): each one's header (or,
/// with `structured`, a read's or block status's one chunk) and, for a
/// successful read, its data.
fn send_replies(stream: &mut UnixStream, replies: &[Reply], structured: bool) -> io::Result<()> {
    let mut heads = [Head::EMPTY; REPLIES_PER_WRITE];
    for (head, reply) in heads.iter_mut().zip(replies) {
        *head = Head::of(reply, structured);
    }
    let mut slices = [IoSlice::new(&[]); 3 * REPLIES_PER_WRITE];
    let mut count = 0;
    for (head, reply) in heads.iter().zip(replies) {
        let data = match reply.result {
            Ok(()) => reply.data.as_deref().unwrap_or_default(),
            Err(_) => &[],
        };
        for part in [head.bytes(), &reply.extents[..], data] {
            if !part.is_empty() {
                slices[count] = IoSlice::new(part);
                count += 1;
            }
        }
    }
    write_all_vectored(stream, &mut slices[..count])
}

/// What goes before a reply's payload (a read's data or block status's
/// extents), or all of a reply: at most a chunk header and 8 bytes.
#[derive(Clone, Copy)]
struct Head {
    bytes: [u8; 28],
    len: usize,
}

impl Head {
    const EMPTY: Self = Self {
        bytes: [0; 28],
        len: 0,
    };

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn push(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `reply`'s head: a simple reply's header, or (a read or block status
    /// with `structured`) one chunk's header and fixed fields.
    fn of(reply: &Reply, structured: bool) -> Self {
        let mut head = Self::EMPTY;
        let chunk = |head: &mut Self, kind: u16, fixed: &[u8], payload_len: usize| {
            head.push(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            head.push(&REPLY_FLAG_DONE.to_be_bytes());
            head.push(&kind.to_be_bytes());
            head.push(&reply.cookie.to_be_bytes());
            let len = u32::try_from(fixed.len() + payload_len).unwrap_or(u32::MAX);
            head.push(&len.to_be_bytes());
            head.push(fixed);
        };
        let chunked = structured && matches!(reply.op, Op::Read | Op::BlockStatus { .. });
        match (chunked, reply.result, reply.op) {
            (false, result, _) => {
                head.push(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                head.push(&errno(result).to_be_bytes());
                head.push(&reply.cookie.to_be_bytes());
            }
            (true, Err(_), _) => {
                // The error number and an empty message.
                let mut fixed = [0u8; 6];
                fixed[..4].copy_from_slice(&errno(reply.result).to_be_bytes());
                chunk(&mut head, REPLY_TYPE_ERROR, &fixed, 0);
            }
            (true, Ok(()), Op::BlockStatus { .. }) => {
                let extents = reply.extents.len();
                chunk(
                    &mut head,
                    REPLY_TYPE_BLOCK_STATUS,
                    &BASE_ALLOCATION_ID.to_be_bytes(),
                    extents,
                );
            }
            (true, Ok(()), _) => match reply.data.as_deref().map_or(0, <[u8]>::len) {
                // No data chunk may be empty: a zero-length read gets none.
                0 => chunk(&mut head, REPLY_TYPE_NONE, &[], 0),
                len => chunk(
                    &mut head,
                    REPLY_TYPE_OFFSET_DATA,
                    &reply.offset.to_be_bytes(),
                    len,
                ),
            },
        }
        head
    }
}

/// The NBD error number for `result`.
fn errno(result: Result<(), ErrorKind>) -> u32 {
    match result {
        Ok(()) => 0,
        Err(ErrorKind::ReadOnly | ErrorKind::NotPermitted | ErrorKind::PermissionConflict) => EPERM,
        Err(ErrorKind::NoSpace) => ENOSPC,
        Err(ErrorKind::InvalidInput) => EINVAL,
        Err(ErrorKind::Unsupported) => ENOTSUP,
        Err(ErrorKind::NoCapacity) => ENOMEM,
        Err(_) => EIO,
    }
}

/// Bytes asked for a connection's send buffer: room for a full window
/// of 64 KiB reads' replies, so that the writer rarely waits for the
/// client (the kernel caps it at `net.core.wmem_max`).
const SEND_BUFFER: usize = 4 << 20;

/// Writes every byte of `slices`, in as few `writev`s as the socket allows.
fn write_all_vectored(stream: &mut UnixStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The queries of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` data
/// (export name length, name, query count, each query's length and
/// bytes), when it is well formed and consumed whole.
fn meta_context_queries(data: &[u8]) -> Option<Vec<&[u8]>> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let rest = rest.get(u32::from_be_bytes(*len) as usize..)?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = u32::from_be_bytes(*count);
    // Each query takes at least its 4-byte length: no larger list fits.
    let mut queries = Vec::with_capacity((count as usize).min(rest.len() / 4));
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        queries.push(tail.get(..len)?);
        rest = &tail[len..];
    }
    rest.is_empty().then_some(queries)
}

/// Whether `NBD_OPT_GO`/`INFO` data is well formed: name length, name,
/// count of info requests, the requests.
fn go_data_valid(data: &[u8]) -> bool {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return false;
    };
    let Some(rest) = rest.get(u32::from_be_bytes(*len) as usize..) else {
        return false;
    };
    let Some((count, rest)) = rest.split_first_chunk::<2>() else {
        return false;
    };
    rest.len() == usize::from(u16::from_be_bytes(*count)) * 2
}

#[cfg(test)]
mod tests {
    use super::{go_data_valid, meta_context_queries};

    #[test]
    fn meta_context_queries_are_checked() {
        let data = |name: &[u8], queries: &[&[u8]]| {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name);
            data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for query in queries {
                data.extend_from_slice(&(query.len() as u32).to_be_bytes());
                data.extend_from_slice(query);
            }
            data
        };
        let two = data(b"disk", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        assert_eq!(
            meta_context_queries(&two),
            Some(vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"])
        );
        assert_eq!(meta_context_queries(&data(b"", &[])), Some(vec![]));
        // Cut short, a byte too many, a count larger than the queries.
        assert_eq!(meta_context_queries(&two[..two.len() - 1]), None);
        let mut long = two.clone();
        long.push(0);
        assert_eq!(meta_context_queries(&long), None);
        let mut count = data(b"", &[b"base:"]);
        count[7] = 9;
        assert_eq!(meta_context_queries(&count), None);
        assert_eq!(meta_context_queries(&[0, 0, 0, 9]), None);
    }

    #[test]
    fn go_data_is_checked() {
        assert!(go_data_valid(&[0, 0, 0, 0, 0, 0]));
        assert!(go_data_valid(&[0, 0, 0, 1, b'a', 0, 1, 0, 3]));
        assert!(!go_data_valid(&[0, 0, 0, 9, b'a', 0, 0]));
        assert!(!go_data_valid(&[0, 0, 0, 0, 0, 1]));
        assert!(!go_data_valid(&[0, 0]));
    }
}
