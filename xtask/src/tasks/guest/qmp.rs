//! A small QMP client: a unix socket, the greeting, `qmp_capabilities`,
//! commands with an `id`, their `return` or `error`, and the asynchronous
//! events that arrive in between (kept until [`Qmp::wait_event`] takes them).
//!
//! QMP sends one JSON document per line (`\r\n`-terminated); a command's
//! answer carries the command's `id`, events carry `event`, `data` and
//! `timestamp`. Only QEMU's own commands are used, so the same client drives
//! qemu-storage-daemon and any QSD-compatible server.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::json::{self, Value};
use crate::{Context, Error, Result};

/// One event: its name and its `data` member (`Null` when absent).
#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

impl Event {
    /// A string member of `data` (`id`, `device`, `status`, ...).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// A connected QMP monitor in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// Events read but not yet taken by [`Qmp::wait_event`].
    events: VecDeque<Event>,
    /// Every event seen, as `NAME {data}` (for the report and for errors).
    pub log: Vec<String>,
    /// How long a command may take to answer.
    pub command_timeout: Duration,
    /// Print each command and event (`qmp>`, `qmp<`) as it goes.
    pub echo: bool,
}

impl Qmp {
    /// Connects to the monitor socket at `path`, reads the greeting and
    /// leaves capabilities negotiation with `qmp_capabilities`.
    pub fn connect(path: &Path) -> Result<Qmp> {
        Self::connect_with(path, true)
    }

    /// [`Qmp::connect`], printing commands and events only with `echo`.
    pub fn connect_with(path: &Path, echo: bool) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .context(format!("connecting to QMP at {}", path.display()))?;
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            partial: Vec::new(),
            events: VecDeque::new(),
            log: Vec::new(),
            command_timeout: Duration::from_secs(30),
            echo,
        };
        let greeting = qmp.read_answer(Instant::now() + qmp.command_timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(Error::msg(format!(
                "QMP at {}: expected a greeting, got {}",
                path.display(),
                json::render(&greeting)
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments`; returns its `return` value, or its
    /// `error` (class and description) as an error. Events that arrive
    /// before the answer are kept.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = vec![
            ("execute".to_owned(), Value::from(command)),
            ("id".to_owned(), Value::from(id)),
        ];
        if let Some(arguments) = arguments {
            message.push(("arguments".to_owned(), arguments));
        }
        let text = json::render(&Value::Object(message));
        if self.echo {
            println!("    qmp> {text}");
        }
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .context(format!("sending QMP `{command}`"))?;
        let deadline = Instant::now() + self.command_timeout;
        let reply = self.read_answer(deadline)?;
        if reply.get("id") != Some(&Value::from(id)) {
            return Err(Error::msg(format!(
                "QMP `{command}`: unexpected message {}",
                json::render(&reply)
            )));
        }
        if let Some(value) = reply.get("return") {
            return Ok(value.clone());
        }
        let error = reply.get("error");
        let field = |key| {
            error
                .and_then(|e| e.get(key))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        Err(Error::msg(format!(
            "QMP `{command}` failed: {} ({})",
            field("desc"),
            field("class")
        )))
    }

    /// Waits until an event for which `wanted` is true arrives (or was
    /// already read), up to `limit`; earlier events stay in the log.
    pub fn wait_event(
        &mut self,
        what: &str,
        limit: Duration,
        wanted: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.events.iter().position(&wanted) {
                // Events before the wanted one are consumed with it: they
                // were logged and are not waited for again.
                let event = self.events.remove(at).unwrap_or_else(|| unreachable!());
                self.events.drain(..at);
                return Ok(event);
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "QMP: no {what} within {:.0} s; events so far:{}",
                    limit.as_secs_f64(),
                    crate::cmd::indented(&self.log.join("\n"))
                )));
            }
            match self.read_one(deadline) {
                Ok(None) => {}
                Ok(Some(message)) => {
                    return Err(Error::msg(format!(
                        "QMP: an answer nobody asked for: {}",
                        json::render(&message)
                    )))
                }
                Err(err) if err.to_string().contains(TIMED_OUT) => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Reads the next non-event message; events met on the way are queued
    /// and logged.
    fn read_answer(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(message) = self.read_one(deadline)? {
                return Ok(message);
            }
        }
    }

    /// Reads one message: an event is queued and logged (`None`), anything
    /// else returned.
    fn read_one(&mut self, deadline: Instant) -> Result<Option<Value>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::msg(format!("QMP: {TIMED_OUT}")));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .context("setting the QMP read timeout")?;
        // read_until keeps what it read before a timeout in `partial`.
        match self.reader.read_until(b'\n', &mut self.partial) {
            Ok(0) => return Err(Error::msg("QMP: the server closed the connection")),
            Ok(_) if !self.partial.ends_with(b"\n") => {
                return Err(Error::msg("QMP: the server closed the connection mid-line"))
            }
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::msg(format!("QMP: {TIMED_OUT}")));
            }
            Err(err) => return Err(Error::msg(format!("QMP: reading: {err}"))),
        }
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
        let message = json::parse(&line)
            .map_err(|err| Error::msg(format!("QMP: {err} in {:?}", line.trim_end())))?;
        let Some(name) = message.get("event").and_then(Value::as_str) else {
            return Ok(Some(message));
        };
        let data = message.get("data").cloned().unwrap_or(Value::Null);
        let entry = format!("{name} {}", json::render(&data));
        if self.echo {
            println!("    qmp< {entry}");
        }
        self.log.push(entry);
        self.events.push_back(Event {
            name: name.to_owned(),
            data,
        });
        Ok(None)
    }
}

/// The text of a read that ran out of time (an error, except while only
/// waiting for events).
const TIMED_OUT: &str = "timed out waiting for a message";
