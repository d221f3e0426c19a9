//! Running commands: print the command, run it, fail with a message naming it.
//!
//! Every child is owned by a guard that kills and reaps it when dropped, so an
//! early return (an error, a timeout) never leaves a process behind. Commands
//! with a timeout are killed when it expires; the QEMU runs rely on that
//! (`Cmd::output_within_timeout` reports the timeout with the output so far,
//! and `Cmd::tee` shows the output live while capturing it). `Cmd::start`
//! runs a command in the background and hands its output over line by line
//! (a guest's serial console, a server's log) while xtask does other work.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A command line to run, built up like `std::process::Command` but printable.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    timeout: Option<Duration>,
    echo: bool,
    tee: bool,
}

/// How a command run by [`Cmd::output_within_timeout`] ended.
#[derive(Debug)]
pub struct Finished {
    /// The exit status; `None` when the timeout expired and the command was
    /// killed.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From the start to the exit (or the kill).
    pub elapsed: Duration,
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            cwd: None,
            envs: Vec::new(),
            timeout: None,
            echo: true,
            tee: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Kill the command if it has not finished after `limit`.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Copy captured output to our stdout/stderr as it arrives (live), as
    /// well as capturing it.
    pub fn tee(mut self) -> Self {
        self.tee = true;
        self
    }

    /// Do not print the `==> command` line (for queries whose output we parse).
    pub fn quiet(mut self) -> Self {
        self.echo = false;
        self
    }

    /// Runs with the terminal's stdout/stderr; fails unless it exits with 0.
    pub fn run(&self) -> Result<()> {
        let status = self.status()?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::msg(format!("`{self}` failed ({status})")))
        }
    }

    /// Runs with the terminal's stdout/stderr; any exit status is returned.
    pub fn status(&self) -> Result<ExitStatus> {
        let mut child = self.spawn(false)?;
        child.wait(self)
    }

    /// Runs with stdout and stderr captured; any exit status is returned.
    pub fn output(&self) -> Result<Output> {
        let mut child = self.spawn(true)?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let status = child.wait(self)?;
        Ok(Output {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
        })
    }

    /// Runs with output captured (and shown live with [`Cmd::tee`]); a
    /// timeout kills the command but is reported in the result, with the
    /// output up to then, not as an error.
    pub fn output_within_timeout(&self) -> Result<Finished> {
        let started = Instant::now();
        let mut child = self.spawn(true)?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let status = child.wait_or_kill(self.timeout, self)?;
        let elapsed = started.elapsed();
        Ok(Finished {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
            elapsed,
        })
    }

    /// Runs with output captured; fails unless it exits with 0. Returns stdout.
    pub fn read(&self) -> Result<String> {
        let out = self.output()?;
        if out.status.success() {
            Ok(out.stdout_text())
        } else {
            Err(Error::msg(format!(
                "`{self}` failed ({}){}",
                out.status,
                indented(&out.stderr_text())
            )))
        }
    }

    /// Starts the command in the background with stdout and stderr read line
    /// by line (shown live with [`Cmd::tee`]). The process is killed when the
    /// returned [`Background`] drops; the timeout is not applied here (the
    /// caller polls with its own deadline).
    pub fn start(&self) -> Result<Background> {
        // Piped but not drained: the pipes are read here, line by line.
        let mut running = self.spawn_with(false, true)?;
        let (sender, lines) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(pipe) = running.child.stdout.take() {
            readers.push(lines_of(pipe, sender.clone(), self.tee));
        }
        if let Some(pipe) = running.child.stderr.take() {
            readers.push(lines_of(pipe, sender, self.tee));
        }
        Ok(Background {
            running,
            lines,
            name: self.to_string(),
            _readers: readers,
        })
    }

    fn spawn(&self, capture: bool) -> Result<Running> {
        self.spawn_with(capture, capture)
    }

    fn spawn_with(&self, capture: bool, pipe: bool) -> Result<Running> {
        if self.echo {
            println!("==> {self}");
            // Keep our line ahead of the child's output when both go to a pipe.
            let _ = io::stdout().flush();
        }
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::null());
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        for (key, value) in &self.envs {
            command.env(key, value);
        }
        if capture || pipe {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = command.spawn().map_err(|err| {
            let hint = if err.kind() == io::ErrorKind::NotFound {
                " (is it installed and on PATH?)"
            } else {
                ""
            };
            Error::msg(format!("cannot run `{self}`: {err}{hint}"))
        })?;
        if !capture {
            return Ok(Running {
                child,
                reaped: false,
                stdout: None,
                stderr: None,
            });
        }
        // Drain the pipes on threads so a chatty child never blocks on a full pipe.
        let stdout = child
            .stdout
            .take()
            .map(|pipe| drain(pipe, self.tee.then_some(Echo::Stdout)));
        let stderr = child
            .stderr
            .take()
            .map(|pipe| drain(pipe, self.tee.then_some(Echo::Stderr)));
        Ok(Running {
            child,
            reaped: false,
            stdout,
            stderr,
        })
    }
}

/// A spawned child; killed and reaped on drop unless it was waited for.
struct Running {
    child: Child,
    reaped: bool,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    fn wait(&mut self, cmd: &Cmd) -> Result<ExitStatus> {
        match self.wait_or_kill(cmd.timeout, cmd)? {
            Some(status) => Ok(status),
            None => {
                let secs = cmd.timeout.unwrap_or_default().as_secs_f64();
                Err(Error::msg(format!(
                    "`{cmd}` did not finish within {secs:.1} s and was killed"
                )))
            }
        }
    }

    /// Waits for the exit (again: std keeps the status of a reaped child);
    /// `None` when the `limit` expired and the child was killed.
    fn wait_or_kill(
        &mut self,
        limit: Option<Duration>,
        cmd: &dyn fmt::Display,
    ) -> Result<Option<ExitStatus>> {
        let deadline = limit.map(|limit| Instant::now() + limit);
        loop {
            let polled = match deadline {
                None => self.child.wait().map(Some),
                Some(_) => self.child.try_wait(),
            };
            match polled {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Ok(Some(status));
                }
                Ok(None) => {}
                Err(err) => return Err(Error::msg(format!("waiting for `{cmd}`: {err}"))),
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                self.kill();
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if !self.reaped {
            // Both fail only if the child is already gone, which is what we want.
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command running in the background (see [`Cmd::start`]); killed and
/// reaped when dropped.
pub struct Background {
    running: Running,
    /// Each line of stdout and stderr as it arrives (without the newline).
    pub lines: Receiver<String>,
    name: String,
    _readers: Vec<JoinHandle<()>>,
}

impl Background {
    /// The exit status, if the process has exited (asked again, the same).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let status = self
            .running
            .child
            .try_wait()
            .map_err(|err| Error::msg(format!("waiting for `{}`: {err}", self.name)))?;
        self.running.reaped |= status.is_some();
        Ok(status)
    }

    /// Waits up to `limit` for the exit; kills the process when it has not
    /// exited by then (`None`).
    pub fn wait_or_kill(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        self.running.wait_or_kill(Some(limit), &self.name)
    }

    /// Asks the process to end (SIGTERM, through `kill`: xtask has no libc).
    pub fn terminate(&mut self) -> Result<()> {
        if self.running.reaped {
            return Ok(());
        }
        let pid = self.running.child.id().to_string();
        Cmd::new("kill").args(["-TERM", &pid]).quiet().run()
    }

    /// The command line, as printed.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Sends each line read from `pipe` (lossy UTF-8, without `\n`/`\r\n`) to
/// `sender`, echoing it to our stdout when `echo`.
fn lines_of(
    pipe: impl Read + Send + 'static,
    sender: Sender<String>,
    echo: bool,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = io::BufReader::new(pipe);
        let mut line = Vec::new();
        // A read error ends the stream like an end of file.
        while io::BufRead::read_until(&mut reader, b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']).to_owned();
            if echo {
                let _ = writeln!(io::stdout(), "{text}").and_then(|()| io::stdout().flush());
            }
            line.clear();
            // The receiver may be gone (the caller gave up): keep draining.
            let _ = sender.send(text);
        }
    })
}

/// Where [`Cmd::tee`] copies a captured stream.
#[derive(Clone, Copy)]
enum Echo {
    Stdout,
    Stderr,
}

fn drain(mut pipe: impl Read + Send + 'static, echo: Option<Echo>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // A read error just ends the capture; the exit status tells the story.
            let n = match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            buf.extend_from_slice(&chunk[..n]);
            // Echo failures (a closed terminal) must not stop the capture.
            let _ = match echo {
                Some(Echo::Stdout) => io::stdout()
                    .write_all(&chunk[..n])
                    .and_then(|()| io::stdout().flush()),
                Some(Echo::Stderr) => io::stderr().write_all(&chunk[..n]),
                None => Ok(()),
            };
        }
        buf
    })
}

fn collect(reader: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    reader
        .and_then(|handle| handle.join().ok())
        .unwrap_or_default()
}

/// Text indented under an error line, or nothing if it is blank.
pub fn indented(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for line in text.lines() {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

impl fmt::Display for Cmd {
    /// Shell-like: `KEY='v a l' program arg 'arg with spaces'`, program by file name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.envs {
            write!(f, "{}={} ", key.to_string_lossy(), quote(value))?;
        }
        let program = Path::new(&self.program)
            .file_name()
            .unwrap_or(&self.program);
        write!(f, "{}", quote(program))?;
        for arg in &self.args {
            write!(f, " {}", quote(arg))?;
        }
        Ok(())
    }
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let cmd = Cmd::new("/usr/bin/qemu-io")
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", "it's", ""]);
        assert_eq!(
            cmd.to_string(),
            r"RUSTDOCFLAGS='-D warnings' qemu-io -f qcow2 -c 'write -P 0x11 0 1M' 'it'\''s' ''"
        );
    }

    #[test]
    fn captures_output_and_status() {
        let out = Cmd::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .quiet()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout_text(), "out\n");
        assert_eq!(out.stderr_text(), "err\n");
    }

    #[test]
    fn read_fails_with_the_command_and_its_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo broken >&2; exit 1"])
            .quiet()
            .read()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sh -c"), "{err}");
        assert!(err.contains("broken"), "{err}");
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_panic() {
        let err = Cmd::new("xtask-no-such-program").quiet().run().unwrap_err();
        assert!(err.to_string().contains("on PATH"), "{err}");
    }

    #[test]
    fn a_timeout_is_a_result_with_the_output_so_far() {
        let done = Cmd::new("sh")
            .args(["-c", "echo early; exec sleep 5"])
            .timeout(Duration::from_millis(300))
            .quiet()
            .output_within_timeout()
            .unwrap();
        assert!(done.status.is_none());
        assert_eq!(done.stdout, b"early\n");
        assert!(done.elapsed < Duration::from_secs(3));
        let done = Cmd::new("sh")
            .args(["-c", "exit 33"])
            .timeout(Duration::from_secs(5))
            .quiet()
            .output_within_timeout()
            .unwrap();
        assert_eq!(done.status.and_then(|s| s.code()), Some(33));
    }

    #[test]
    fn background_lines_arrive_and_drop_kills() {
        let mut job = Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; exec sleep 30"])
            .quiet()
            .start()
            .unwrap();
        let mut got = vec![
            job.lines.recv_timeout(Duration::from_secs(5)).unwrap(),
            job.lines.recv_timeout(Duration::from_secs(5)).unwrap(),
        ];
        got.sort();
        assert_eq!(got, ["one", "two"]);
        assert!(job.try_wait().unwrap().is_none());
        let start = Instant::now();
        let mut term = Cmd::new("sleep").arg("30").quiet().start().unwrap();
        term.terminate().unwrap();
        let status = term.wait_or_kill(Duration::from_secs(5)).unwrap().unwrap();
        assert!(!status.success());
        // Asked again after the exit: the same status, not an error.
        assert_eq!(term.try_wait().unwrap(), Some(status));
        assert!(job
            .wait_or_kill(Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn timeout_kills_the_child() {
        let start = Instant::now();
        let err = Cmd::new("sleep")
            .arg("5")
            .timeout(Duration::from_millis(100))
            .quiet()
            .output()
            .unwrap_err();
        assert!(err.to_string().contains("killed"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
