//! QMP, QEMU's JSON control protocol, for a host process that serves a
//! chain (`blockgraph serve`): the commands and events qemu-storage-daemon
//! answers for live snapshots and block jobs, mapped to the graph.
//!
//! ```text
//!  client ──JSON line──▶ Monitor::handle ──▶ command ──▶ Graph / Engine
//!         ◀─{"return"}──                       │ (chain changes in a
//!                                              │  drained section)
//!  serve loop ──▶ Control::step_jobs ──▶ Engine::job_step per job
//!                         │ status changes
//!                         ▼
//!                 Jobs' event queue ──take_events──▶ Monitor::render_events
//!                                                    (every connection)
//! ```
//!
//! One [`Monitor`] per client connection keeps QMP's two modes
//! (capabilities negotiation, then command mode). The serve loop owns the
//! graph, the request engine, the resolver and the export's backend, plus
//! two tables of this module: [`NodeNames`] (QMP node names ↔ graph
//! nodes) and [`Jobs`] (QMP job ids ↔ graph jobs, with their flags, speed
//! and the last status reported). For each call it lends them all as a
//! [`Control`].
//!
//! Host only (feature `std`): messages are JSON (`serde_json`, keeping
//! members in the order QEMU writes them), answers are `String`s.
//!
//! | command | maps to |
//! |---|---|
//! | `qmp_capabilities` | leaves negotiation mode |
//! | `query-block`, `query-named-block-nodes` | the export's backend; the named nodes and their backing chains |
//! | `blockdev-snapshot-sync` | creates the overlay file, [`Graph::snapshot`] in a drained section (the export moves to the overlay) |
//! | `block-stream` | [`Graph::start_stream`] |
//! | `block-commit` | [`Graph::start_commit`] (active commit when `top` is the active layer) |
//! | `job-pause`, `job-resume`, `job-complete`, `job-cancel`, `job-finalize`, `job-dismiss`, `block-job-cancel`, `block-job-set-speed` | the job verbs |
//! | `query-jobs`, `query-block-jobs` | [`Graph::job_info`] |
//! | `quit` | [`Monitor::quit_requested`] |
//!
//! Events: `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`, `BLOCK_JOB_PENDING`,
//! `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`, in QEMU's order.
//!
//! A serve loop, in outline (one connection; its socket I/O and the
//! guest's requests left out):
//!
//! ```no_run
//! use blockgraph::device::FileDevice;
//! use blockgraph::engine::Engine;
//! use blockgraph::host::PathResolver;
//! use blockgraph::qmp::{Control, Jobs, Monitor, NodeNames};
//! use blockgraph::{Access, Format, Graph, OpenOptions};
//!
//! let mut resolver = PathResolver::default();
//! let mut graph: Box<Graph<FileDevice>> = Box::default();
//! let options = OpenOptions {
//!     read_only: false,
//!     writable_devices: true,
//!     ..OpenOptions::new(Format::Qcow2)
//! };
//! let top = graph.open_image(&mut resolver, "top.qcow2", options)?;
//! let backend = graph.attach_backend(top, Access::READ_WRITE_DEVICE)?;
//! graph.unref(top)?;
//! let mut engine: Box<Engine<'static>> = Box::new(Engine::new());
//! let mut names = NodeNames::new();
//! names.register_chain(&graph, top)?; // top, mid, base
//! let (mut jobs, mut monitor) = (Jobs::new(), Monitor::new());
//! println!("{}", monitor.greeting());
//! let input = r#"{"execute": "qmp_capabilities"}"#; // read from the socket
//! loop {
//!     engine.poll(&mut graph); // the guest's requests go on
//!     let mut cx = Control {
//!         graph: &mut graph,
//!         engine: &mut engine,
//!         resolver: &mut resolver,
//!         backend,
//!         names: &mut names,
//!         jobs: &mut jobs,
//!     };
//!     for answer in monitor.handle(input, &mut cx) {
//!         println!("{answer}");
//!     }
//!     cx.step_jobs();
//!     for event in monitor.render_events(&jobs.take_events()) {
//!         println!("{event}");
//!     }
//!     if monitor.quit_requested() {
//!         break;
//!     }
//! }
//! # Ok::<(), blockgraph::Error>(())
//! ```

mod args;
mod block;
mod jobs;
mod names;

pub use jobs::{Event, Jobs};
pub use names::NodeNames;

use serde_json::{json, Map, Value};

use crate::device::FileDevice;
use crate::engine::Engine;
use crate::error::Error;
use crate::graph::Graph;
use crate::host::PathResolver;
use crate::BackendId;

use args::Args;

/// The graph type the host CLI and the serve loop use.
pub type HostGraph = Graph<FileDevice>;

/// What one monitor call works on: borrows of the serve loop's state.
pub struct Control<'a> {
    /// The graph.
    pub graph: &'a mut HostGraph,
    /// The request engine the export submits guest requests to.
    pub engine: &'a mut Engine<'static>,
    /// Opens images and forms backing references.
    pub resolver: &'a mut PathResolver,
    /// The export's BlockBackend.
    pub backend: BackendId,
    /// QMP node names.
    pub names: &'a mut NodeNames,
    /// QMP jobs and the events they raised.
    pub jobs: &'a mut Jobs,
}

/// QMP's error classes (`ErrorClass` in QEMU's schema).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Every error without a more specific class.
    GenericError,
    /// Unknown command, or a command the current mode does not accept.
    CommandNotFound,
    /// No block job on that device.
    DeviceNotActive,
}

impl ErrorClass {
    /// The name QMP sends.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A command's failure: a class and QEMU's kind of description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` saying `desc`.
    fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` saying `desc`.
    fn not_found(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

impl From<Error> for QmpError {
    /// A graph error: its text, as a `GenericError`.
    fn from(err: Error) -> Self {
        QmpError::generic(err.to_string())
    }
}

/// A command's result.
type Reply = Result<Value, QmpError>;

/// One client connection's QMP state.
#[derive(Debug, Default)]
pub struct Monitor {
    /// `qmp_capabilities` was accepted: commands run, events are sent.
    command_mode: bool,
    quit: bool,
}

impl Monitor {
    /// A connection in capabilities negotiation mode.
    pub fn new() -> Self {
        Self::default()
    }

    /// The greeting QEMU sends first:
    /// `{"QMP": {"version": {...}, "capabilities": []}}` (no `oob`).
    pub fn greeting(&self) -> String {
        let (major, minor, micro) = QEMU_VERSION;
        json!({"QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": concat!("blockgraph ", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }})
        .to_string()
    }

    /// Whether a client asked to `quit`: the serve loop ends the process
    /// after sending the answer.
    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// Runs the JSON documents in `input` (one or more, as read from the
    /// socket) and returns one answer line per document: `{"return": ...}`
    /// or `{"error": {"class": ..., "desc": ...}}`, with the document's
    /// `id` when it had one. Malformed JSON gets QEMU's parse error and
    /// ends the batch. Events the commands raise go to `cx.jobs`' queue.
    pub fn handle(&mut self, input: &str, cx: &mut Control<'_>) -> Vec<String> {
        let mut answers = Vec::new();
        for document in serde_json::Deserializer::from_str(input).into_iter::<Value>() {
            match document {
                Ok(document) => answers.push(self.execute(document, cx)),
                Err(err) => {
                    let err = QmpError::generic(format!("JSON parse error, {err}"));
                    answers.push(answer(None, Err(err)));
                    break;
                }
            }
        }
        answers
    }

    /// Renders `events` for this connection: none while it negotiates.
    pub fn render_events(&self, events: &[Event]) -> Vec<String> {
        match self.command_mode {
            true => events.iter().map(Event::to_line).collect(),
            false => Vec::new(),
        }
    }

    /// One document: its answer.
    fn execute(&mut self, document: Value, cx: &mut Control<'_>) -> String {
        let id = document.get("id").cloned();
        answer(id, self.dispatch(document, cx))
    }

    /// Checks the document's shape and the mode, then runs the command.
    fn dispatch(&mut self, document: Value, cx: &mut Control<'_>) -> Reply {
        let Value::Object(mut members) = document else {
            return Err(QmpError::generic("QMP input must be a JSON object"));
        };
        if let Some(key) = members
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return Err(QmpError::generic(format!(
                "QMP input member '{key}' is unexpected"
            )));
        }
        let command = match members.remove("execute") {
            Some(Value::String(command)) => command,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let arguments = match members.remove("arguments") {
            Some(Value::Object(arguments)) => arguments,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
            None => Map::new(),
        };
        let mut args = Args::new(arguments);
        if !self.command_mode {
            if command != "qmp_capabilities" {
                return Err(QmpError::not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            if let Some(enable) = args.opt_array("enable")? {
                if let Some(capability) = enable.first() {
                    return Err(QmpError::generic(format!(
                        "Capability '{}' not available",
                        capability.as_str().unwrap_or("?")
                    )));
                }
            }
            args.finish()?;
            self.command_mode = true;
            return Ok(json!({}));
        }
        match command.as_str() {
            "qmp_capabilities" => Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            "quit" => {
                args.finish()?;
                self.quit = true;
                Ok(json!({}))
            }
            "query-block" => block::query_block(&mut args, cx),
            "query-named-block-nodes" => block::query_named_block_nodes(&mut args, cx),
            "blockdev-snapshot-sync" => block::snapshot_sync(&mut args, cx),
            "block-stream" => block::stream(&mut args, cx),
            "block-commit" => block::commit(&mut args, cx),
            "query-jobs" => jobs::query_jobs(&mut args, cx),
            "query-block-jobs" => jobs::query_block_jobs(&mut args, cx),
            "job-pause"
            | "job-resume"
            | "job-complete"
            | "job-cancel"
            | "job-finalize"
            | "job-dismiss"
            | "block-job-cancel"
            | "block-job-set-speed" => jobs::verb(&command, &mut args, cx),
            "block-job-change" => jobs::change(&mut args, cx),
            _ => Err(QmpError::not_found(format!(
                "The command {command} has not been found"
            ))),
        }
    }
}

/// The QEMU version the greeting names: the qemu-storage-daemon whose
/// behaviour this module follows.
const QEMU_VERSION: (u32, u32, u32) = (10, 0, 2);

/// An answer line: `id` (when given), then `{"return": ...}` or
/// `{"error": ...}`, as QSD orders them.
fn answer(id: Option<Value>, reply: Reply) -> String {
    let mut answer = Map::new();
    if let Some(id) = id {
        answer.insert("id".into(), id);
    }
    match reply {
        Ok(value) => answer.insert("return".into(), value),
        Err(err) => answer.insert(
            "error".into(),
            json!({"class": err.class.name(), "desc": err.desc}),
        ),
    };
    Value::Object(answer).to_string()
}

/// QEMU's error for a node looked up by device name and node name.
fn not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}
