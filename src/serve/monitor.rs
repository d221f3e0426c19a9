//! A stand-in QMP monitor: the greeting, `qmp_capabilities` and `quit`,
//! enough for a harness to start and stop the server. Every other command
//! gets QMP's `CommandNotFound`.
//!
//! This is the hook the real monitor replaces: it runs on its own thread,
//! reads one JSON command per line and answers on the socket; the only
//! effect it has on the serve loop is `quit` ([`Inbox::quit`]). A monitor
//! that changes the graph (snapshots, jobs) must instead hand each line to
//! the serve loop, which owns the graph, the engine and the resolver
//! ([`super::Block`]) and runs the command between guest requests.
//!
//! [`Inbox::quit`]: super::vhost_blk::Inbox

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use super::vhost_blk::Shared;

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"blockgraph\"}, \"capabilities\": []}}";

/// Serves connections on `listener` one after another until `quit`.
pub(super) fn serve(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if session(stream, &shared) {
            shared.tell(|inbox| inbox.quit = true);
            return;
        }
    }
}

/// One client; whether it asked to quit.
fn session(stream: UnixStream, shared: &Shared) -> bool {
    let Ok(reader) = stream.try_clone() else {
        return false;
    };
    let mut out = stream;
    if writeln!(out, "{GREETING}\r").is_err() {
        return false;
    }
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { return false };
        if line.trim().is_empty() {
            continue;
        }
        let id = member(&line, "id").map(|v| format!(", \"id\": {v}"));
        let id = id.unwrap_or_default();
        let command = member(&line, "execute").map(|v| v.trim_matches('"').to_owned());
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
        if writeln!(out, "{reply}\r").is_err() {
            return quit;
        }
        if quit {
            return true;
        }
        // The loop reads `quit` from the inbox only; nothing else to tell.
        let _ = shared;
    }
    false
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
