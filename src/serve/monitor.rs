//! The monitor socket: QEMU's QMP ([`crate::qmp`]) for `serve --qmp`.
//!
//! ```text
//!  accept thread: each client's write half ──Connected──┐
//!  a reader thread per client: its lines ──Text/Closed──┤ channel
//!                                                       v
//!  serve loop: a qmp::Monitor per client, run on the Block it owns
//!    (graph, engine, resolver, node names, jobs): greeting, answers,
//!    jobs stepped every iteration, their events to every client
//! ```
//!
//! The commands run on the serve loop's thread, between requests, so a
//! snapshot or a job start changes the chain in the engine's drained
//! section and the export follows. A client that stops reading is dropped
//! (writes time out); `quit` ends the serve once its answer is written.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::vhost_blk::Shared;
use super::Block;
use crate::qmp::Monitor;

/// How long a write to a client may block the serve loop.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the monitor threads hand the serve loop.
pub(super) enum Line {
    /// A client connected: where its answers and events go.
    Connected { client: u64, out: UnixStream },
    /// A line (one or more JSON documents) it sent.
    Text { client: u64, text: String },
    /// It left.
    Closed { client: u64 },
}

/// Accepts clients on `listener` for the serve's life; each gets a reader
/// thread that passes its lines to the serve loop through `lines`.
pub(super) fn serve(listener: UnixListener, lines: Sender<Line>, shared: Arc<Shared>) {
    for (client, stream) in (0u64..).zip(listener.incoming()) {
        let Ok(stream) = stream else { continue };
        let Ok(out) = stream.try_clone() else {
            continue;
        };
        let _ = out.set_write_timeout(Some(WRITE_TIMEOUT));
        if lines.send(Line::Connected { client, out }).is_err() {
            return;
        }
        shared.tell(|inbox| inbox.kicked = true);
        let (lines, shared) = (lines.clone(), shared.clone());
        thread::spawn(move || read_lines(stream, client, &lines, &shared));
    }
}

/// Longest command line taken from a client; a longer one ends its
/// connection (nothing is run), so a client cannot make the server hold
/// unbounded input.
const MAX_LINE: u64 = 1 << 20;

/// Passes `client`'s lines on until it leaves (or sends a line longer
/// than [`MAX_LINE`]).
fn read_lines(stream: UnixStream, client: u64, lines: &Sender<Line>, shared: &Shared) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut text = String::new();
        match reader.by_ref().take(MAX_LINE + 1).read_line(&mut text) {
            Ok(0) | Err(_) => break,
            Ok(_) if !text.ends_with('\n') && text.len() as u64 > MAX_LINE => break,
            Ok(_) => {}
        }
        if text.trim().is_empty() {
            continue;
        }
        if lines.send(Line::Text { client, text }).is_err() {
            return;
        }
        shared.tell(|inbox| inbox.kicked = true);
    }
    let _ = lines.send(Line::Closed { client });
    shared.tell(|inbox| inbox.kicked = true);
}

/// One connected client: its QMP state and where its output goes.
struct Client {
    id: u64,
    monitor: Monitor,
    out: UnixStream,
}

impl Client {
    /// Writes `lines`; `false` when the client is gone (or stopped
    /// reading).
    fn send(&mut self, lines: &[String]) -> bool {
        lines
            .iter()
            .all(|line| write!(self.out, "{line}\r\n").is_ok())
    }
}

/// The monitor's state on the serve loop.
#[derive(Default)]
pub(super) struct Clients {
    clients: Vec<Client>,
}

impl Clients {
    /// Takes what the monitor threads sent: greets new clients, runs their
    /// commands on `block`, forgets those that left. Returns whether a
    /// client asked to `quit` (its answer written).
    pub(super) fn take(&mut self, lines: &Receiver<Line>, block: &mut Block) -> bool {
        let mut quit = false;
        while let Ok(line) = lines.try_recv() {
            match line {
                Line::Connected { client, out } => {
                    let monitor = Monitor::new();
                    let greeting = monitor.greeting();
                    let mut client = Client {
                        id: client,
                        out,
                        monitor,
                    };
                    if client.send(&[greeting]) {
                        self.clients.push(client);
                    }
                }
                Line::Text { client, text } => {
                    let Some(at) = self.clients.iter().position(|c| c.id == client) else {
                        continue;
                    };
                    let answers = self.clients[at].monitor.handle(&text, &mut block.control());
                    quit |= self.clients[at].monitor.quit_requested();
                    // The events a command raised (a job created and
                    // running) go out before its answer, as QEMU sends
                    // them.
                    self.send_events(block);
                    if let Some(at) = self.clients.iter().position(|c| c.id == client) {
                        if !self.clients[at].send(&answers) {
                            self.clients.remove(at);
                        }
                    }
                }
                Line::Closed { client } => self.clients.retain(|c| c.id != client),
            }
        }
        quit
    }

    /// Steps the jobs ([`crate::qmp::Control::step_jobs`]) and sends their
    /// events to every client in command mode.
    pub(super) fn step_jobs(&mut self, block: &mut Block) {
        block.control().step_jobs();
        self.send_events(block);
    }

    /// Sends the queued events to every client; drops those gone.
    fn send_events(&mut self, block: &mut Block) {
        let events = block.jobs.take_events();
        if events.is_empty() {
            return;
        }
        self.clients
            .retain_mut(|client| client.send(&client.monitor.render_events(&events)));
    }
}
