//! The QMP control plane (`blockgraph::qmp`) against qemu-storage-daemon:
//! the live-jobs scenario a QSD-compatible server must answer (snapshot,
//! stream, active commit, dismiss), driven through `Monitor::handle` and
//! `Control::step_jobs` while guest writes go through the request engine,
//! with the events compared to the ones QSD sends for the same commands
//! on a copy of the chain; then the chain, `qemu-img check` and the data.
//! Bad input (malformed JSON, commands before negotiation, unknown
//! commands, bad arguments, job verbs in the wrong state) gets QSD's
//! answers, and changes nothing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std::{fs, thread};

use blockgraph::device::FileDevice;
use blockgraph::engine::{Engine, Ticket};
use blockgraph::host::PathResolver;
use blockgraph::qmp::{Control, Jobs, Monitor, NodeNames};
use blockgraph::{Access, BackendId, Format, Graph, OpenOptions};
use common::*;
use serde_json::{json, Value};

const SIZE: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// `base <- mid <- top`, 64 KiB clusters, each layer with its own data
/// (overlapping its backing file's).
fn make_chain(dir: &Path) {
    let size = SIZE.to_string();
    let layers = [
        ("base.qcow2", None),
        ("mid.qcow2", Some("base.qcow2")),
        ("top.qcow2", Some("mid.qcow2")),
    ];
    for (image, backing) in layers {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"];
        if let Some(backing) = backing {
            args.extend(["-F", "qcow2", "-b", backing]);
        }
        args.extend([image, &size]);
        qemu_img(dir, &args);
    }
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 3M 512K"],
    );
    qemu_io(
        dir,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x22 512K 1M", "write -z 3M 64K"],
    );
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -P 0x33 1M 1M", "write -P 0x34 3584K 8K"],
    );
}

/// The serve loop's state, as `blockgraph serve` keeps it: the graph with
/// the chain of `top.qcow2` behind the export's backend, the engine, and
/// the QMP tables; one monitor connection.
struct Served {
    graph: Box<Graph<FileDevice>>,
    engine: Box<Engine<'static>>,
    resolver: PathResolver,
    backend: BackendId,
    names: NodeNames,
    jobs: Jobs,
    monitor: Monitor,
    /// Every event sent to the connection, parsed from its line.
    events: Vec<Value>,
}

impl Served {
    fn open(top: &str) -> Self {
        Self::open_with(top, PathResolver::default())
    }

    /// [`Served::open`] through `resolver`.
    fn open_with(top: &str, mut resolver: PathResolver) -> Self {
        let mut graph: Box<Graph<FileDevice>> = Box::default();
        let options = OpenOptions {
            read_only: false,
            writable_devices: true,
            ..OpenOptions::new(Format::Qcow2)
        };
        let active = graph.open_image(&mut resolver, top, options).unwrap();
        let backend = graph
            .attach_backend(active, Access::READ_WRITE_DEVICE)
            .unwrap();
        graph.unref(active).unwrap();
        let mut names = NodeNames::new();
        names.register_chain(&graph, active).unwrap();
        Self {
            graph,
            engine: Box::new(Engine::new()),
            resolver,
            backend,
            names,
            jobs: Jobs::new(),
            monitor: Monitor::new(),
            events: Vec::new(),
        }
    }

    fn control(&mut self) -> (Control<'_>, &mut Monitor) {
        (
            Control {
                graph: &mut self.graph,
                engine: &mut self.engine,
                resolver: &mut self.resolver,
                backend: self.backend,
                names: &mut self.names,
                jobs: &mut self.jobs,
            },
            &mut self.monitor,
        )
    }

    /// Sends `input`; returns the answers, parsed. Events raised go to
    /// [`Served::events`].
    fn send(&mut self, input: &str) -> Vec<Value> {
        let (mut cx, monitor) = self.control();
        let answers = monitor.handle(input, &mut cx);
        self.collect_events();
        answers.iter().map(|line| parse_line(line)).collect()
    }

    /// Runs one command: its one answer.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut message = json!({"execute": command});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let answers = self.send(&message.to_string());
        assert_eq!(answers.len(), 1, "one answer to {message}: {answers:?}");
        answers.into_iter().next().unwrap()
    }

    /// One iteration of the serve loop's job side.
    fn step(&mut self) {
        let (mut cx, _) = self.control();
        cx.step_jobs();
        self.collect_events();
    }

    fn collect_events(&mut self) {
        let events = self.jobs.take_events();
        for line in self.monitor.render_events(&events) {
            let event = parse_line(&line);
            let stamp = &event["timestamp"];
            assert!(
                stamp["seconds"].as_u64().is_some_and(|s| s > 1_600_000_000)
                    && stamp["microseconds"]
                        .as_u64()
                        .is_some_and(|us| us < 1_000_000),
                "event timestamp: {line}"
            );
            self.events.push(event);
        }
    }

    /// Guest writes and job steps until an event `wanted` accepts arrives.
    fn run_until(&mut self, guest: &mut Guest, what: &str, wanted: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let seen = self.events.len();
        loop {
            guest.tick(&mut self.engine, self.backend);
            self.engine.poll(&mut self.graph);
            guest.collect(&mut self.engine);
            self.step();
            if self.events[seen..].iter().any(&wanted) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what}; events: {:#?}",
                self.events
            );
        }
    }

    /// Lets every guest write finish.
    fn settle(&mut self, guest: &mut Guest) {
        while !guest.in_flight.is_empty() {
            self.engine.poll(&mut self.graph);
            guest.collect(&mut self.engine);
        }
    }
}

fn parse_line(line: &str) -> Value {
    assert!(!line.contains('\n'), "one line per message: {line:?}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// A guest writing 4 KiB blocks at spread-out offsets, a few in flight
/// (never overlapping each other), its view kept in a model.
struct Guest {
    model: Vec<u8>,
    in_flight: Vec<(Ticket, u64)>,
    writes: u64,
    /// Writes submitted while a command asks for them.
    budget: u64,
}

impl Guest {
    const BLOCK: u64 = 4096;

    fn new(model: Vec<u8>) -> Self {
        Self {
            model,
            in_flight: Vec::new(),
            writes: 0,
            budget: 0,
        }
    }

    fn tick(&mut self, engine: &mut Engine<'static>, backend: BackendId) {
        while self.budget > 0 && self.in_flight.len() < 4 {
            let n = self.writes;
            // Spread over the whole disk, several writes per cluster.
            let offset = (n * 7919 * Self::BLOCK) % SIZE;
            if self.in_flight.iter().any(|&(_, o)| o == offset) {
                return;
            }
            let byte = 0x40 + (n % 64) as u8;
            let data: &'static [u8] =
                Box::leak(vec![byte; Self::BLOCK as usize].into_boxed_slice());
            let ticket = engine.submit_write(backend, offset, [data]).unwrap();
            self.model[offset as usize..(offset + Self::BLOCK) as usize].fill(byte);
            self.in_flight.push((ticket, offset));
            self.writes += 1;
            self.budget -= 1;
        }
    }

    fn collect(&mut self, engine: &mut Engine<'static>) {
        while let Some((ticket, done)) = engine.complete() {
            done.result.unwrap();
            self.in_flight.retain(|&(t, _)| t != ticket);
        }
    }
}

/// A qemu-storage-daemon on the chain in `dir` (as `xtask guest` runs it),
/// with a QMP client in command mode.
struct Qsd {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qsd {
    fn start(dir: &Path) -> Self {
        let mut args: Vec<String> = Vec::new();
        let mut below: Option<&str> = None;
        for node in ["base", "mid", "top"] {
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name={node}-file,filename={node}.qcow2"
            ));
            let backing = below.map_or("null".to_owned(), |b| format!("\"{b}\""));
            args.push("--blockdev".into());
            args.push(format!(
                "{{\"driver\":\"qcow2\",\"node-name\":\"{node}\",\"file\":\"{node}-file\",\"backing\":{backing}}}"
            ));
            below = Some(node);
        }
        args.extend([
            "--export".into(),
            "type=vhost-user-blk,id=e0,node-name=top,addr.type=unix,addr.path=vhost.sock,writable=on,num-queues=1".into(),
            "--chardev".into(),
            "socket,id=qmp0,path=qmp.sock,server=on,wait=off".into(),
            "--monitor".into(),
            "chardev=qmp0".into(),
        ]);
        let child = Command::new("qemu-storage-daemon")
            .args(&args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("qsd.log")).unwrap())
            .spawn()
            .expect("these tests need qemu-storage-daemon on PATH (Debian: qemu-system-common); they never skip");
        let socket = dir.join("qmp.sock");
        let started = Instant::now();
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "QSD's monitor never came up"
            );
            thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut qsd = Qsd {
            child,
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qsd.read();
        assert!(greeting.get("QMP").is_some(), "QSD greeting: {greeting}");
        qsd
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QSD answers");
        assert!(!line.is_empty(), "QSD closed the monitor");
        parse_line(line.trim_end())
    }

    /// Sends `input` (one document); returns its answer.
    fn send(&mut self, input: &str) -> Value {
        self.writer
            .write_all(format!("{input}\n").as_bytes())
            .unwrap();
        loop {
            let message = self.read();
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return message;
            }
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut message = json!({"execute": command});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        self.send(&message.to_string())
    }

    fn wait_event(&mut self, wanted: impl Fn(&Value) -> bool) {
        if self.events.iter().any(&wanted) {
            return;
        }
        loop {
            let message = self.read();
            assert!(message.get("event").is_some(), "unasked answer: {message}");
            let found = wanted(&message);
            self.events.push(message);
            if found {
                return;
            }
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_event(event: &Value, name: &str, key: &str, id: &str) -> bool {
    event["event"] == name && event["data"][key] == id
}

fn is_status(event: &Value, id: &str, status: &str) -> bool {
    is_event(event, "JOB_STATUS_CHANGE", "id", id) && event["data"]["status"] == status
}

/// Each event as `NAME id status`, for comparing sequences.
fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let data = &e["data"];
            let id = data["id"]
                .as_str()
                .or(data["device"].as_str())
                .unwrap_or("-");
            let status = data["status"].as_str().unwrap_or("");
            format!("{} {id} {status}", e["event"].as_str().unwrap())
                .trim_end()
                .to_owned()
        })
        .collect()
}

/// The scenario's commands, as `xtask guest` sends them.
fn snapshot_args() -> Value {
    json!({"node-name": "top", "snapshot-file": "snap.qcow2", "snapshot-node-name": "snap", "format": "qcow2"})
}
fn stream_args() -> Value {
    json!({"job-id": "stream0", "device": "snap", "base-node": "mid", "backing-file": "mid.qcow2", "auto-dismiss": false})
}
fn commit_args() -> Value {
    json!({"job-id": "commit0", "device": "snap", "base-node": "mid", "auto-dismiss": false})
}

/// The scenario on QSD: its events.
fn qsd_scenario(dir: &Path) -> Vec<Value> {
    let mut qsd = Qsd::start(dir);
    let ok = json!({"return": {}});
    assert_eq!(qsd.execute("qmp_capabilities", None), ok);
    assert_eq!(
        qsd.execute("blockdev-snapshot-sync", Some(snapshot_args())),
        ok
    );
    assert_eq!(qsd.execute("block-stream", Some(stream_args())), ok);
    qsd.wait_event(|e| is_status(e, "stream0", "concluded"));
    assert_eq!(
        qsd.execute("job-dismiss", Some(json!({"id": "stream0"}))),
        ok
    );
    qsd.wait_event(|e| is_status(e, "stream0", "null"));
    assert_eq!(qsd.execute("block-commit", Some(commit_args())), ok);
    qsd.wait_event(|e| is_event(e, "BLOCK_JOB_READY", "device", "commit0"));
    assert_eq!(
        qsd.execute("job-complete", Some(json!({"id": "commit0"}))),
        ok
    );
    qsd.wait_event(|e| is_status(e, "commit0", "concluded"));
    assert_eq!(
        qsd.execute("job-dismiss", Some(json!({"id": "commit0"}))),
        ok
    );
    qsd.wait_event(|e| is_status(e, "commit0", "null"));
    assert_eq!(qsd.execute("query-jobs", None), json!({"return": []}));
    assert_eq!(qsd.execute("quit", None), ok);
    std::mem::take(&mut qsd.events)
        .into_iter()
        .filter(|e| e["event"] != "BLOCK_EXPORT_DELETED")
        .collect()
}

/// The chain as `qemu-img info --backing-chain` lists it: file names.
fn chain_files(dir: &Path, image: &str) -> Vec<String> {
    let out = qemu_img(dir, &["info", "--backing-chain", "--output=json", image]);
    let infos: Value = serde_json::from_str(&out).unwrap();
    infos
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect()
}

/// The chain in `ours/` and a copy in `qsd/` of a new temporary directory.
fn two_chains() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tmpdir("bg-qmp-");
    let dir = tmp.path().join("ours");
    let reference = tmp.path().join("qsd");
    fs::create_dir(&dir).unwrap();
    make_chain(&dir);
    copy_dir(&dir, &reference);
    (tmp, dir, reference)
}

/// The live-jobs scenario through `Monitor::handle` and
/// `Control::step_jobs`, guest writes in flight between steps: the same
/// answers and events as QSD, the export following the snapshot and the
/// pivot, and on disk `base <- mid` holding the guest's view.
#[test]
fn scenario_matches_qsd() {
    big_stack(scenario);
}

fn scenario() {
    let (tmp, dir, reference) = two_chains();
    let qsd_events = qsd_scenario(&reference);

    qemu_img(&dir, &["convert", "-O", "raw", "top.qcow2", "start.raw"]);
    let mut guest = Guest::new(fs::read(dir.join("start.raw")).unwrap());
    // Image names are relative, as QSD's command line gives them: backing
    // references are written relative (`backing-file` is checked against
    // them). This is the only test here that uses the current directory.
    std::env::set_current_dir(&dir).unwrap();
    let mut served = Served::open("top.qcow2");
    let ok = json!({"return": {}});

    let greeting = parse_line(&served.monitor.greeting());
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10);
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    assert_eq!(served.execute("qmp_capabilities", None), ok);

    // Guest writes in flight while the snapshot waits for a drain.
    guest.budget = 8;
    guest.tick(&mut served.engine, served.backend);
    assert_eq!(
        served.execute("blockdev-snapshot-sync", Some(snapshot_args())),
        ok
    );
    let snap = served
        .names
        .lookup(&served.graph, "snap")
        .expect("snap named");
    assert_eq!(
        served.graph.root(served.backend).unwrap(),
        snap,
        "the export follows the snapshot"
    );
    let nodes = served.execute("query-named-block-nodes", None);
    let names: Vec<&str> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["top", "mid", "base", "snap"]);
    let block = served.execute("query-block", None);
    let inserted = &block["return"][0]["inserted"];
    assert_eq!(inserted["node-name"], "snap");
    assert_eq!(inserted["backing_file"], "top.qcow2");
    assert_eq!(inserted["backing_file_depth"], 3);
    assert_eq!(inserted["image"]["virtual-size"], SIZE);
    assert_eq!(
        inserted["image"]["backing-image"]["backing-image"]["filename"],
        "mid.qcow2"
    );
    served.settle(&mut guest);

    guest.budget = 200;
    let before = guest.writes;
    assert_eq!(served.execute("block-stream", Some(stream_args())), ok);
    served.run_until(&mut guest, "stream0 concluded", |e| {
        is_status(e, "stream0", "concluded")
    });
    assert!(guest.writes > before, "no guest write during the stream");
    let jobs = served.execute("query-jobs", None);
    assert_eq!(jobs["return"][0]["status"], "concluded");
    assert_eq!(jobs["return"][0]["type"], "stream");
    assert!(jobs["return"][0].get("error").is_none(), "{jobs}");
    assert_eq!(
        served.execute("job-dismiss", Some(json!({"id": "stream0"}))),
        ok
    );
    served.settle(&mut guest);
    assert_eq!(
        served.names.lookup(&served.graph, "top"),
        None,
        "top left the chain"
    );

    guest.budget = 300;
    let before = guest.writes;
    assert_eq!(served.execute("block-commit", Some(commit_args())), ok);
    served.run_until(&mut guest, "BLOCK_JOB_READY", |e| {
        is_event(e, "BLOCK_JOB_READY", "device", "commit0")
    });
    assert!(
        guest.writes > before,
        "no guest write before the commit was ready"
    );
    // More guest writes while ready: they must reach mid after the pivot.
    let before = guest.writes;
    guest.budget += 50;
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.writes < before + 20 {
        assert!(Instant::now() < deadline, "no guest write while ready");
        guest.tick(&mut served.engine, served.backend);
        served.engine.poll(&mut served.graph);
        guest.collect(&mut served.engine);
        served.step();
    }
    assert_eq!(
        served.execute("job-complete", Some(json!({"id": "commit0"}))),
        ok
    );
    served.run_until(&mut guest, "commit0 concluded", |e| {
        is_status(e, "commit0", "concluded")
    });
    assert_eq!(
        served.execute("job-dismiss", Some(json!({"id": "commit0"}))),
        ok
    );
    assert_eq!(served.execute("query-jobs", None), json!({"return": []}));
    let mid = served.names.lookup(&served.graph, "mid").unwrap();
    assert_eq!(
        served.graph.root(served.backend).unwrap(),
        mid,
        "the export follows the pivot"
    );
    assert_eq!(served.execute("quit", None), ok);
    assert!(served.monitor.quit_requested());
    served.settle(&mut guest);

    // The events: QSD's, in order.
    assert_eq!(
        summary(&served.events),
        summary(&qsd_events),
        "ours vs QSD's"
    );
    let completed: Vec<&Value> = served
        .events
        .iter()
        .filter(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .collect();
    for (event, kind) in completed.iter().zip(["stream", "commit"]) {
        let data = &event["data"];
        assert_eq!(data["type"], kind);
        assert_eq!(data["len"], data["offset"], "{event}");
        assert_eq!(data["speed"], 0);
        assert!(data.get("error").is_none(), "{event}");
    }

    // On disk: base <- mid, clean, holding the guest's view.
    let root = served.graph.root(served.backend).unwrap();
    served.graph.flush(root).unwrap();
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    std::env::set_current_dir(tmp.path()).unwrap();
    assert_eq!(chain_files(&dir, "mid.qcow2"), ["mid.qcow2", "base.qcow2"]);
    assert_eq!(
        chain_files(&reference, "mid.qcow2"),
        ["mid.qcow2", "base.qcow2"]
    );
    for image in ["mid.qcow2", "base.qcow2", "snap.qcow2"] {
        qemu_img(&dir, &["check", "-q", image]);
    }
    fs::write(dir.join("expected.raw"), &guest.model).unwrap();
    same_as_raw(&dir, "mid.qcow2", "expected.raw");
    // QSD's result, without guest writes, is the chain's starting view.
    same_as_raw(&reference, "mid.qcow2", "../ours/start.raw");
}

/// `qemu-img compare` finds qcow2 `image` and raw `raw` identical.
fn same_as_raw(dir: &Path, image: &str, raw: &str) {
    let args = ["compare", "-f", "qcow2", "-F", "raw", image, raw];
    let out = run(dir, "qemu-img", &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        render(dir, "qemu-img", &args, &out)
    );
}

/// Sends `input` to both; the answers must agree: the `id`, the
/// `return`, and the `error` (its class only unless `desc`).
fn compare(served: &mut Served, qsd: &mut Qsd, input: &str, desc: bool) {
    let ours = served.send(input);
    assert_eq!(ours.len(), 1, "{input}: {ours:?}");
    let (ours, theirs) = (&ours[0], qsd.send(input));
    assert_eq!(
        ours["id"], theirs["id"],
        "{input}: ours {ours}, QSD {theirs}"
    );
    assert_eq!(
        ours.get("return"),
        theirs.get("return"),
        "{input}: ours {ours}, QSD {theirs}"
    );
    let (a, b) = match desc {
        true => (&ours["error"], &theirs["error"]),
        false => (&ours["error"]["class"], &theirs["error"]["class"]),
    };
    assert_eq!(a, b, "{input}: ours {ours}, QSD {theirs}");
}

/// Bad input gets the answers QSD gives (class and text, or class only
/// where the text is the JSON parser's), and changes nothing; job verbs in
/// the wrong state, on a throttled stream that neither server lets run.
#[test]
fn refusals_match_qsd() {
    big_stack(refusals);
}

fn refusals() {
    let (tmp, dir, reference) = two_chains();
    copy_dir(&dir, &tmp.path().join("orig"));
    let mut qsd = Qsd::start(&reference);
    let top = dir.join("top.qcow2");
    let mut served = Served::open(top.to_str().unwrap());

    // (input, compare the description too)
    let before_negotiation = [
        (r#"{"execute":"query-jobs","id":1}"#, true),
        (
            r#"{"execute":"qmp_capabilities","arguments":{"enable":"x"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"x"}}"#,
            true,
        ),
    ];
    let in_command_mode = [
        (r#"{"execute":"qmp_capabilities","id":"again"}"#, true),
        (r#"{"execute":"nope","id":"x"}"#, true),
        (r#"{"execute": }"#, false),
        (r#"[1,2]"#, true),
        (r#"{"exec":"x"}"#, true),
        (r#"{"execute":1}"#, true),
        (r#"{"execute":"query-jobs","arguments":[]}"#, true),
        (
            r#"{"execute":"block-stream","arguments":{"job-id":"j"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"nonode","job-id":"j"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"j","speed":"fast"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"j","bogus":1}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"1j"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"j","on-error":"never"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"mid","job-id":"j","base-node":"top"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"j","base":"nothere.qcow2"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"j","base":"b","base-node":"base"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-commit","arguments":{"device":"top","job-id":"j","base-node":"top"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-commit","arguments":{"device":"top","job-id":"j","top-node":"base"}}"#,
            true,
        ),
        (
            r#"{"execute":"block-commit","arguments":{"device":"mid","job-id":"j","base-node":"top"}}"#,
            true,
        ),
        (
            r#"{"execute":"job-dismiss","arguments":{"id":"none"}}"#,
            true,
        ),
        (r#"{"execute":"job-dismiss","arguments":{}}"#, true),
        (
            r#"{"execute":"block-job-set-speed","arguments":{"device":"none","speed":1}}"#,
            true,
        ),
        (
            r#"{"execute":"blockdev-snapshot-sync","arguments":{"node-name":"top","snapshot-file":"x.qcow2","format":"qcow2"}}"#,
            true,
        ),
        (
            r#"{"execute":"blockdev-snapshot-sync","arguments":{"node-name":"top","snapshot-file":"x.qcow2","snapshot-node-name":"mid","format":"qcow2"}}"#,
            true,
        ),
        (
            r#"{"execute":"blockdev-snapshot-sync","arguments":{"node-name":"nonode","snapshot-file":"x.qcow2","snapshot-node-name":"x"}}"#,
            true,
        ),
        // A throttled stream: verbs in the wrong state.
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"s","base-node":"base","speed":1,"auto-dismiss":false}}"#,
            true,
        ),
        (
            r#"{"execute":"block-stream","arguments":{"device":"top","job-id":"s","base-node":"base"}}"#,
            true,
        ),
        (r#"{"execute":"job-complete","arguments":{"id":"s"}}"#, true),
        (r#"{"execute":"job-dismiss","arguments":{"id":"s"}}"#, true),
        (r#"{"execute":"job-finalize","arguments":{"id":"s"}}"#, true),
        (r#"{"execute":"job-resume","arguments":{"id":"s"}}"#, true),
        (
            r#"{"execute":"block-job-set-speed","arguments":{"device":"s","speed":-5}}"#,
            true,
        ),
        (r#"{"execute":"job-pause","arguments":{"id":"s"}}"#, true),
    ];
    // QSD's job pauses at its next pause point: wait for it.
    let paused = [
        (r#"{"execute":"job-pause","arguments":{"id":"s"}}"#, true),
        (r#"{"execute":"job-complete","arguments":{"id":"s"}}"#, true),
        (
            r#"{"execute":"block-job-cancel","arguments":{"device":"s"}}"#,
            true,
        ),
        (r#"{"execute":"job-cancel","arguments":{"id":"s"}}"#, true),
    ];
    for (input, desc) in before_negotiation {
        compare(&mut served, &mut qsd, input, desc);
    }
    assert_eq!(
        served.execute("qmp_capabilities", None),
        json!({"return": {}})
    );
    assert_eq!(qsd.execute("qmp_capabilities", None), json!({"return": {}}));
    let files_before: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for (input, desc) in in_command_mode {
        compare(&mut served, &mut qsd, input, desc);
    }
    qsd.wait_event(|e| is_status(e, "s", "paused"));
    for (input, desc) in paused {
        compare(&mut served, &mut qsd, input, desc);
    }
    // The cancelled stream ends as QSD's does.
    served.run_until(&mut Guest::new(Vec::new()), "s concluded", |e| {
        is_status(e, "s", "concluded")
    });
    qsd.wait_event(|e| is_status(e, "s", "concluded"));
    // QSD copied a first chunk before its throttle held the job; ours
    // was paused before its first step: all but the progress agree.
    let without_progress = |mut answer: Value| {
        answer["return"][0]
            .as_object_mut()
            .map(|job| job.remove("current-progress"));
        answer
    };
    assert_eq!(
        without_progress(served.execute("query-jobs", None)),
        without_progress(qsd.execute("query-jobs", None))
    );
    compare(
        &mut served,
        &mut qsd,
        r#"{"execute":"job-dismiss","arguments":{"id":"s"}}"#,
        true,
    );
    qsd.wait_event(|e| is_status(e, "s", "null"));
    assert_eq!(
        summary(&served.events),
        summary(&qsd.events),
        "ours vs QSD's"
    );

    // Our own limits: no oob, no second connection's commands before
    // negotiation, several documents in one input, an unparsable tail.
    let mut fresh = Monitor::new();
    let (mut cx, _) = served.control();
    let answers = fresh.handle(
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}} {"execute":"qmp_capabilities"} {"#,
        &mut cx,
    );
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers[0].contains("Capability 'oob' not available"),
        "{}",
        answers[0]
    );
    assert_eq!(answers[1], r#"{"return":{}}"#);
    assert!(answers[2].contains("JSON parse error"), "{}", answers[2]);

    // An overlay file that is an image of the chain is refused before
    // anything is truncated (its lock is held).
    for image in ["mid.qcow2", "top.qcow2"] {
        let file = dir.join(image);
        let args = json!({"node-name": "top", "snapshot-file": file.to_str().unwrap(),
            "snapshot-node-name": "x"});
        let answer = served.execute("blockdev-snapshot-sync", Some(args));
        assert_eq!(answer["error"]["class"], "GenericError", "{answer}");
    }

    // Nothing changed: the chain, the files, the names.
    let files_after: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files_before, files_after);
    let root = served.graph.root(served.backend).unwrap();
    assert_eq!(served.names.name_of(&served.graph, root), Some("top"));
    assert_eq!(served.names.nodes(&served.graph).len(), 3);
    assert_eq!(served.execute("query-jobs", None), json!({"return": []}));
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    assert_eq!(
        chain_files(&dir, "top.qcow2"),
        ["top.qcow2", "mid.qcow2", "base.qcow2"]
    );
    for image in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        qemu_img(&dir, &["check", "-q", image]);
    }
    for image in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        let orig = format!("../orig/{image}");
        qemu_compare(&dir, image, &orig, "the chain is unchanged");
    }
}

/// `speed` holds a job back (a token bucket over its progress) and
/// `block-job-set-speed` changes it on the fly; `query-block-jobs` and the
/// events show it.
#[test]
fn speed_limits_a_job() {
    big_stack(speed_limit);
}

fn speed_limit() {
    let tmp = tmpdir("bg-qmp-");
    let dir = tmp.path();
    make_chain(dir);
    let top = dir.join("top.qcow2");
    let mut served = Served::open(top.to_str().unwrap());
    let ok = json!({"return": {}});
    assert_eq!(served.execute("qmp_capabilities", None), ok);
    let stream = json!({"job-id": "s", "device": "top", "speed": MIB});
    assert_eq!(served.execute("block-stream", Some(stream)), ok);
    // Unthrottled, 4 MiB of files stream in milliseconds. Progress is
    // charged as it comes (the runs started in one step, ranges with
    // nothing to copy included): the job then waits until the bucket has
    // paid for it, here seconds.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        served.engine.poll(&mut served.graph);
        served.step();
    }
    let jobs = served.execute("query-block-jobs", None);
    let job = &jobs["return"][0];
    assert_eq!(job["device"], "s", "{jobs}");
    assert_eq!(job["speed"], MIB, "{jobs}");
    assert_eq!(job["status"], "running", "{jobs}");
    assert_eq!(job["auto-dismiss"], true, "{jobs}");
    let offset = job["offset"].as_u64().unwrap();
    assert!(offset > 0 && offset < SIZE, "1 MiB/s for 1 s: {jobs}");

    let unlimited = json!({"device": "s", "speed": 0});
    assert_eq!(served.execute("block-job-set-speed", Some(unlimited)), ok);
    served.run_until(&mut Guest::new(Vec::new()), "s null", |e| {
        is_status(e, "s", "null")
    });
    let completed = served
        .events
        .iter()
        .find(|e| e["event"] == "BLOCK_JOB_COMPLETED")
        .unwrap();
    assert_eq!(completed["data"]["speed"], 0, "{completed}");
    assert_eq!(completed["data"]["offset"], SIZE, "{completed}");
    assert_eq!(
        served.execute("query-block-jobs", None),
        json!({"return": []})
    );
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    assert_eq!(chain_files(dir, "top.qcow2"), ["top.qcow2"]);
    qemu_img(dir, &["check", "-q", "top.qcow2"]);
}

/// `block-job-change` switches an active commit to write-blocking: with
/// guest writes in flight it becomes ready and pivots, and the base holds
/// every write; the refusals name what is wrong.
#[test]
fn block_job_change_makes_an_active_commit_write_blocking() {
    big_stack(write_blocking);
}

fn write_blocking() {
    let tmp = tmpdir("bg-qmp-");
    let dir = tmp.path();
    make_chain(dir);
    qemu_img(dir, &["convert", "-O", "raw", "top.qcow2", "start.raw"]);
    let mut guest = Guest::new(fs::read(dir.join("start.raw")).unwrap());
    let top = dir.join("top.qcow2");
    let mut served = Served::open(top.to_str().unwrap());
    let ok = json!({"return": {}});
    assert_eq!(served.execute("qmp_capabilities", None), ok);
    let commit = json!({"job-id": "c", "device": "top", "base-node": "mid"});
    assert_eq!(served.execute("block-commit", Some(commit)), ok);
    let change = |mode: &str, kind: &str| json!({"id": "c", "type": kind, "copy-mode": mode});
    let refused = served.execute("block-job-change", Some(change("sometimes", "mirror")));
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    let refused = served.execute("block-job-change", Some(change("write-blocking", "stream")));
    assert_eq!(
        refused["error"]["desc"], "Job type does not match",
        "{refused}"
    );
    let missing = json!({"id": "x", "type": "mirror", "copy-mode": "background"});
    let refused = served.execute("block-job-change", Some(missing));
    assert_eq!(refused["error"]["class"], "DeviceNotActive", "{refused}");
    assert_eq!(
        served.execute("block-job-change", Some(change("write-blocking", "mirror"))),
        ok
    );
    guest.budget = 200;
    served.run_until(&mut guest, "BLOCK_JOB_READY", |e| {
        is_event(e, "BLOCK_JOB_READY", "device", "c")
    });
    assert_eq!(served.execute("job-complete", Some(json!({"id": "c"}))), ok);
    served.run_until(&mut guest, "c null", |e| is_status(e, "c", "null"));
    served.settle(&mut guest);
    let mid = served.names.lookup(&served.graph, "mid").unwrap();
    assert_eq!(
        served.graph.root(served.backend).unwrap(),
        mid,
        "not pivoted"
    );
    assert!(guest.writes > 0, "no guest write during the job");
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    fs::write(dir.join("model.raw"), &guest.model).unwrap();
    qemu_img(dir, &["check", "-q", "mid.qcow2"]);
    same_as_raw(dir, "mid.qcow2", "model.raw");
}

/// The rest of the verbs, against QSD: `auto-finalize: false` (a stream
/// pending until `job-finalize`; an active commit refuses it: it pivots
/// with its last copy), a soft cancel of a ready active commit
/// (`block-job-cancel`: completes without a pivot) and a forced one
/// (`job-cancel`: cancelled); the same events, the export still on `top`.
#[test]
fn finalize_and_cancel_match_qsd() {
    big_stack(finalize_and_cancel);
}

fn finalize_and_cancel() {
    let (_tmp, dir, reference) = two_chains();
    let mut qsd = Qsd::start(&reference);
    let top = dir.join("top.qcow2");
    let mut served = Served::open(top.to_str().unwrap());
    let ok = json!({"return": {}});
    let mut idle = Guest::new(Vec::new());
    assert_eq!(served.execute("qmp_capabilities", None), ok);
    assert_eq!(qsd.execute("qmp_capabilities", None), ok);
    let both = |served: &mut Served, qsd: &mut Qsd, command: &str, args: Value| {
        let ours = served.execute(command, Some(args.clone()));
        assert_eq!(ours, qsd.execute(command, Some(args)), "{command}");
    };
    let mut wait =
        |served: &mut Served, qsd: &mut Qsd, what: &str, wanted: &dyn Fn(&Value) -> bool| {
            served.run_until(&mut idle, what, wanted);
            qsd.wait_event(wanted);
        };

    // Our chain was opened by absolute paths: its references are written
    // absolute, so each server gets its own `backing-file`.
    for (server_dir, is_ours) in [(&dir, true), (&reference, false)] {
        let mid = server_dir.join("mid.qcow2");
        let stream = json!({"job-id": "s1", "device": "top", "base-node": "mid",
            "backing-file": mid.to_str().unwrap(), "auto-finalize": false});
        let answer = match is_ours {
            true => served.execute("block-stream", Some(stream)),
            false => qsd.execute("block-stream", Some(stream)),
        };
        assert_eq!(answer, ok);
    }
    wait(&mut served, &mut qsd, "BLOCK_JOB_PENDING", &|e| {
        e["event"] == "BLOCK_JOB_PENDING" && e["data"]["id"] == "s1"
    });
    // Pending waits for job-finalize.
    for _ in 0..20 {
        served.step();
    }
    let jobs = served.execute("query-jobs", None);
    assert_eq!(jobs["return"][0]["status"], "pending", "{jobs}");
    both(&mut served, &mut qsd, "job-finalize", json!({"id": "s1"}));
    wait(&mut served, &mut qsd, "s1 null", &|e| {
        is_status(e, "s1", "null")
    });

    let commit = |id: &str| json!({"job-id": id, "device": "top", "base-node": "mid"});
    let mut held = commit("c0");
    held["auto-finalize"] = false.into();
    let refused = served.execute("block-commit", Some(held));
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    both(&mut served, &mut qsd, "block-commit", commit("c2"));
    wait(&mut served, &mut qsd, "c2 ready", &|e| {
        is_status(e, "c2", "ready")
    });
    both(
        &mut served,
        &mut qsd,
        "block-job-cancel",
        json!({"device": "c2"}),
    );
    wait(&mut served, &mut qsd, "c2 null", &|e| {
        is_status(e, "c2", "null")
    });
    both(&mut served, &mut qsd, "block-commit", commit("c3"));
    wait(&mut served, &mut qsd, "c3 ready", &|e| {
        is_status(e, "c3", "ready")
    });
    both(&mut served, &mut qsd, "job-cancel", json!({"id": "c3"}));
    wait(&mut served, &mut qsd, "c3 null", &|e| {
        is_status(e, "c3", "null")
    });
    both(&mut served, &mut qsd, "query-jobs", json!({}));
    assert_eq!(
        summary(&served.events),
        summary(&qsd.events),
        "ours vs QSD's"
    );
    let top = served.names.lookup(&served.graph, "top").unwrap();
    assert_eq!(served.graph.root(served.backend).unwrap(), top, "no pivot");
    assert_eq!(qsd.execute("quit", None), ok);
    drop(qsd);
    served.graph.flush(top).unwrap();
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    for dir in [&dir, &reference] {
        // QSD rewrote top's reference as the absolute `backing-file`; ours,
        // streaming nothing (base is top's backing file), left it.
        let chain = chain_files(dir, "top.qcow2");
        let names: Vec<&str> = chain
            .iter()
            .map(|f| f.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["top.qcow2", "mid.qcow2", "base.qcow2"]);
        for image in chain {
            qemu_img(dir, &["check", "-q", &image]);
        }
    }
    qemu_compare(&dir, "top.qcow2", "../qsd/top.qcow2", "the same guest view");
    qemu_compare(
        &dir,
        "mid.qcow2",
        "../qsd/mid.qcow2",
        "mid after the commits",
    );
}

/// A job whose writes fail: with `on-error: report` it ends through
/// `aborting` with `BLOCK_JOB_COMPLETED` carrying the graph's error; with
/// `stop` it pauses (`io-status: nospace`) and `job-cancel` ends it. The
/// chain stays as it was.
#[test]
fn failed_jobs_report_their_error() {
    big_stack(failed_jobs);
}

fn failed_jobs() {
    let tmp = tmpdir("bg-qmp-");
    let dir = tmp.path();
    make_chain(dir);
    let top = dir.join("top.qcow2");
    // The files cannot grow: every cluster the stream allocates fails.
    let size = fs::metadata(&top).unwrap().len();
    let resolver = PathResolver {
        max_file_size: Some(size),
        ..PathResolver::default()
    };
    let mut served = Served::open_with(top.to_str().unwrap(), resolver);
    let ok = json!({"return": {}});
    let mut idle = Guest::new(Vec::new());
    assert_eq!(served.execute("qmp_capabilities", None), ok);
    let stream = |id: &str, on_error: &str| json!({"job-id": id, "device": "top", "base-node": "base", "on-error": on_error});
    assert_eq!(
        served.execute("block-stream", Some(stream("r", "report"))),
        ok
    );
    served.run_until(&mut idle, "r null", |e| is_status(e, "r", "null"));
    assert_eq!(
        summary(&served.events),
        [
            "JOB_STATUS_CHANGE r created",
            "JOB_STATUS_CHANGE r running",
            "JOB_STATUS_CHANGE r aborting",
            "BLOCK_JOB_COMPLETED r",
            "JOB_STATUS_CHANGE r concluded",
            "JOB_STATUS_CHANGE r null",
        ]
    );
    let completed = &served.events[3];
    let error = completed["data"]["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{completed}");

    served.events.clear();
    assert_eq!(
        served.execute("block-stream", Some(stream("s", "stop"))),
        ok
    );
    served.run_until(&mut idle, "s paused", |e| is_status(e, "s", "paused"));
    let jobs = served.execute("query-block-jobs", None);
    assert_eq!(jobs["return"][0]["io-status"], "nospace", "{jobs}");
    assert_eq!(jobs["return"][0]["paused"], true, "{jobs}");
    assert_eq!(served.execute("job-cancel", Some(json!({"id": "s"}))), ok);
    served.run_until(&mut idle, "s null", |e| is_status(e, "s", "null"));
    assert_eq!(
        summary(&served.events),
        [
            "JOB_STATUS_CHANGE s created",
            "JOB_STATUS_CHANGE s running",
            "JOB_STATUS_CHANGE s paused",
            "JOB_STATUS_CHANGE s running",
            "JOB_STATUS_CHANGE s aborting",
            "BLOCK_JOB_CANCELLED s",
            "JOB_STATUS_CHANGE s concluded",
            "JOB_STATUS_CHANGE s null",
        ]
    );
    served.graph.detach_backend(served.backend).unwrap();
    drop(served);
    let names: Vec<String> = chain_files(dir, "top.qcow2");
    assert_eq!(names.len(), 3, "the chain is whole: {names:?}");
    qemu_img(dir, &["check", "-q", "top.qcow2"]);
}
