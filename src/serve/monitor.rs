//! The monitor socket, and a stand-in QMP monitor behind it: the greeting,
//! `qmp_capabilities` and `quit`, enough for a harness to start and stop
//! the server. Every other command gets QMP's `CommandNotFound`.
//!
//! ```text
//!  monitor thread: accept, greeting, one JSON command per line
//!      └─ Line ──> serve loop: execute(line, &mut Block) -> Answer
//!      <── Answer ─ (runs between requests, owning graph and engine)
//!      writes the answer; after `quit`, tells the loop to end
//! ```
//!
//! The hook for the real monitor is [`execute`]: it runs on the serve
//! loop's thread with the [`Block`] (graph, engine, resolver, backend), so
//! a monitor fed these lines can change the chain (snapshots, jobs) in the
//! engine's drained sections. Only this function and the greeting are
//! the stand-in; the socket and the round trip through the loop stay.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use super::vhost_blk::Shared;
use super::Block;

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"blockgraph\"}, \"capabilities\": []}}";

/// One command line for the serve loop, with where its answer goes.
pub(super) struct Line {
    text: String,
    answer: Sender<Answer>,
}

/// What the serve loop answers a line with.
pub(super) struct Answer {
    /// The reply, one JSON document.
    reply: String,
    /// The server ends once the reply is written (`quit`).
    quit: bool,
}

/// Serves connections on `listener` one after another until `quit`,
/// passing each line to the serve loop through `lines`.
pub(super) fn serve(listener: UnixListener, lines: Sender<Line>, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if session(stream, &lines, &shared) {
            shared.tell(|inbox| inbox.quit = true);
            return;
        }
    }
}

/// One client; whether it asked to quit.
fn session(stream: UnixStream, lines: &Sender<Line>, shared: &Shared) -> bool {
    let Ok(reader) = stream.try_clone() else {
        return false;
    };
    let mut out = stream;
    if writeln!(out, "{GREETING}\r").is_err() {
        return false;
    }
    for text in BufReader::new(reader).lines() {
        let Ok(text) = text else { return false };
        if text.trim().is_empty() {
            continue;
        }
        let (answer, answered) = mpsc::channel();
        if lines.send(Line { text, answer }).is_err() {
            return false;
        }
        shared.tell(|inbox| inbox.kicked = true);
        let Ok(Answer { reply, quit }) = answered.recv() else {
            return false;
        };
        if writeln!(out, "{reply}\r").is_err() || quit {
            return quit;
        }
    }
    false
}

/// Answers every line that has arrived; on the serve loop.
pub(super) fn answer_lines(lines: &Receiver<Line>, block: &mut Block) {
    while let Ok(line) = lines.try_recv() {
        let answer = execute(&line.text, block);
        // A client that left takes its answer with it.
        let _ = line.answer.send(answer);
    }
}

/// Runs one command line on the serve loop's block state: the stand-in
/// for a QMP monitor.
fn execute(line: &str, _block: &mut Block) -> Answer {
    let id = member(line, "id").map(|v| format!(", \"id\": {v}"));
    let id = id.unwrap_or_default();
    let command = member(line, "execute").map(|v| v.trim_matches('"').to_owned());
    let (reply, quit) = match command.as_deref() {
        Some("qmp_capabilities") => (format!("{{\"return\": {{}}{id}}}"), false),
        Some("quit") => (format!("{{\"return\": {{}}{id}}}"), true),
        Some(other) => (
            format!(
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {} has not been found\"}}{id}}}",
                other.escape_default()
            ),
            false,
        ),
        None => (
            format!(
                "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object with 'execute'\"}}{id}}}"
            ),
            false,
        ),
    };
    Answer { reply, quit }
}

/// The raw JSON text of top-level member `key` of a flat object: a string
/// (with its quotes) or a scalar. Enough for `execute` and `id`; a real
/// monitor parses JSON.
fn member<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let at = line.find(&quoted)? + quoted.len();
    let rest = line[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(body) = rest.strip_prefix('"') {
        let end = body.find('"')?;
        return Some(&rest[..end + 2]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::member;

    #[test]
    fn members_are_found() {
        let line = r#"{"execute": "quit", "id": 7}"#;
        assert_eq!(member(line, "execute"), Some("\"quit\""));
        assert_eq!(member(line, "id"), Some("7"));
        assert_eq!(member(r#"{"id":"a","execute":"x"}"#, "id"), Some("\"a\""));
        assert_eq!(member("{}", "id"), None);
    }
}
