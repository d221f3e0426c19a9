//! `qmp`: the input, as UTF-8, is a QMP session: each line goes to a
//! `Monitor` in turn (capabilities negotiation included) over the chain
//! `a.qcow2` <- its backing file `b` (the `script` fixtures, written afresh
//! for each input into a directory of the process's own, its working
//! directory), with the serve loop's work after each line: the engine
//! polled, the jobs stepped, their events rendered. Every answer and event
//! must be one JSON object: `{"return": ...}`, `{"error": {"class",
//! "desc"}}` or an event. At most [`MAX_LINES`] lines run; afterwards
//! the jobs left are cancelled (through the monitor) and stepped.
//!
//! `blockdev-snapshot-sync` creates its `snapshot-file`: a line naming
//! anything but a plain file name (no `/`, not starting with `.`) is
//! skipped, so the fuzzer writes nowhere but its directory.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::OnceLock;

use blockgraph::device::FileDevice;
use blockgraph::engine::{Engine, JOB_LANES};
use blockgraph::host::PathResolver;
use blockgraph::qmp::{Control, Jobs, Monitor, NodeNames};
use blockgraph::{Access, Format, Graph, OpenOptions};
use serde_json::Value;

const A: &[u8] = include_bytes!("../fixtures/a.qcow2");
const B: &[u8] = include_bytes!("../fixtures/base.qcow2");
/// Lines of a session that run.
const MAX_LINES: usize = 64;
/// Serve-loop iterations (engine poll, job step) after each line.
const STEPS: usize = 8;
/// Iterations once the session's jobs are cancelled.
const FINAL_STEPS: usize = 256;
/// Bytes of each job buffer (the fixtures' clusters are 4 KiB).
const JOB_BUFFER: usize = 64 << 10;
/// Largest file a write may grow (the fuzzer's disk is not the host's).
const MAX_FILE: u64 = 4 << 20;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    enter_own_directory();
    std::fs::write("a.qcow2", A).expect("the fixture is written");
    std::fs::write("b", B).expect("the fixture is written");

    let mut resolver = PathResolver {
        max_file_size: Some(MAX_FILE),
        ..PathResolver::default()
    };
    let mut graph: Box<Graph<FileDevice>> = Box::default();
    let options = OpenOptions {
        read_only: false,
        writable_devices: true,
        ..OpenOptions::new(Format::Qcow2)
    };
    let top = graph
        .open_image(&mut resolver, "a.qcow2", options)
        .expect("the fixture opens");
    let backend = graph
        .attach_backend(top, Access::READ_WRITE_DEVICE)
        .expect("a backend attaches");
    graph.unref(top).expect("the backend holds the top");
    let mut engine: Box<Engine<'static>> = Box::new(Engine::new());
    JOB_BUFFERS.with_borrow_mut(|pool| {
        for buffer in pool.drain(..) {
            engine.lend_job_buffer(buffer).expect("a lane is free");
        }
    });
    let mut names = NodeNames::new();
    names
        .register_chain(&graph, top)
        .expect("the chain is named");
    let mut jobs = Jobs::new();
    let mut session = Session {
        monitor: Monitor::new(),
        cx: Control {
            graph: &mut graph,
            engine: &mut engine,
            resolver: &mut resolver,
            backend,
            names: &mut names,
            jobs: &mut jobs,
        },
    };
    check_line(&session.monitor.greeting());
    for line in text.lines().take(MAX_LINES) {
        if stays_here(line) {
            session.send(line, STEPS);
        }
    }
    // The session ends: the jobs left are cancelled and run down.
    let _ = session.send(r#"{"execute": "qmp_capabilities"}"#, 0);
    for answer in session.send(r#"{"execute": "query-jobs"}"#, 0) {
        let answer: Value = serde_json::from_str(&answer).expect("checked");
        for job in answer["return"].as_array().into_iter().flatten() {
            let cancel =
                serde_json::json!({"execute": "job-cancel", "arguments": {"id": job["id"]}});
            session.send(&cancel.to_string(), 0);
        }
    }
    session.send(r#"{"execute": "query-jobs"}"#, FINAL_STEPS);

    // The job buffers go back to the pool once no run holds them.
    for _ in 0..FINAL_STEPS {
        if !engine.job_running() {
            break;
        }
        engine.advance(&mut graph);
    }
    assert!(!engine.job_running(), "a job's run never ended");
    JOB_BUFFERS.with_borrow_mut(|pool| pool.extend(engine.reclaim_job_buffers()));
}

thread_local! {
    /// The job buffers every input's engine borrows (made once: an engine
    /// takes `'static` buffers, and one without any would get new ones
    /// for the process's life from `Control::step_jobs`).
    static JOB_BUFFERS: RefCell<Vec<&'static mut [u8]>> = RefCell::new(
        (0..JOB_LANES).map(|_| &mut Box::leak(vec![0u8; JOB_BUFFER].into_boxed_slice())[..]).collect(),
    );
}

/// A monitor and the serve loop's state it works on.
struct Session<'a> {
    monitor: Monitor,
    cx: Control<'a>,
}

impl Session<'_> {
    /// Runs `line`, then `steps` of the serve loop's work; checks every
    /// answer and event, and returns the answers.
    fn send(&mut self, line: &str, steps: usize) -> Vec<String> {
        let answers = self.monitor.handle(line, &mut self.cx);
        answers.iter().for_each(|answer| check_line(answer));
        for _ in 0..steps {
            self.cx.engine.poll(self.cx.graph);
            self.cx.step_jobs();
        }
        let events = self.cx.jobs.take_events();
        for event in self.monitor.render_events(&events) {
            check_line(&event);
        }
        answers
    }
}

/// Moves into the process's own scratch directory (made once).
fn enter_own_directory() {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("blockgraph-fuzz-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the scratch directory is made");
        dir
    });
    std::env::set_current_dir(dir).expect("the scratch directory is entered");
}

/// Whether `line` writes no file outside the working directory: every
/// `snapshot-file` argument of its documents (read as the monitor reads
/// them: one after the other, up to the first that does not parse) must
/// be a plain name.
fn stays_here(line: &str) -> bool {
    serde_json::Deserializer::from_str(line)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .all(
            |document| match document.pointer("/arguments/snapshot-file") {
                Some(Value::String(name)) => {
                    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
                }
                // None, or not a string: refused before any file is made.
                _ => true,
            },
        )
}

/// `line` is one JSON object: an answer, an error with its class and
/// description, an event, or the greeting.
fn check_line(line: &str) {
    assert!(!line.contains('\n'), "a QMP message spans lines: {line}");
    let value: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    if let Some(error) = object.get("error") {
        assert!(
            error.get("class").is_some_and(Value::is_string)
                && error.get("desc").is_some_and(Value::is_string),
            "an error without class and desc: {line}"
        );
        return;
    }
    assert!(
        ["return", "event", "QMP"]
            .iter()
            .any(|key| object.contains_key(*key)),
        "neither an answer, an error nor an event: {line}"
    );
}
