//! Project automation for blockgraph, run as `cargo xtask <command>`.
//!
//! The alias in `.cargo/config.toml` builds and runs this crate on the host;
//! it passes `--target` itself where a bare-metal build is wanted, so nothing
//! in the workspace sets `build.target`.
//!
//! Layout:
//!
//! ```text
//! main.rs       argument parsing, the workspace paths, the error type
//! cmd.rs        Cmd: run a command, print it, fail with a message; timeouts,
//!               the child is killed when the guard drops
//! prereq.rs     the rustup target and the QEMU tools (apt-get when root)
//! json.rs       a small JSON reader for qemu-img --output=json
//! tasks/        one file per command: test, demo, qemu, fuzz, bench;
//!               guest/, a Linux guest running fio on a vhost-user-blk
//!               export while live block jobs run over QMP;
//!               boot_test.rs, the kernel boots `test` runs last;
//!               lab.rs, images built, booted on and checked with qemu-img
//!               (boot tests, demo and bench)
//! ```

mod cmd;
mod json;
mod prereq;
mod tasks;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
Usage: cargo xtask <command> [-- <args>...]

Commands:
  test [-- <args>...]  everything CI runs, in order:
                         prerequisites (rustup target x86_64-unknown-none,
                         qemu-img, qemu-io, qemu-storage-daemon,
                         qemu-system-x86_64; installed with apt-get when
                         running as root),
                         cargo fmt --all --check,
                         cargo clippy --workspace --all-targets -- -D warnings,
                         cargo clippy for the kernel on x86_64-unknown-none,
                         the no_std build for x86_64-unknown-none,
                         cargo doc with RUSTDOCFLAGS=\"-D warnings\",
                         cargo test --workspace [<args>...],
                         the vmm_loop example,
                         a fuzz smoke run: each cargo-fuzz target for 10 s
                         (cargo-fuzz installed when missing),
                         boot tests: the kernel's self-check under QEMU
                         (microvm and q35), boots that must fail, and image
                         tests (chain reads, writes, commit, stream, collapse,
                         snapshot, read-only, no space) checked with qemu-img
  boot-test [FILTER]   only the boot tests (after the prerequisites); with
                       FILTER only those whose name contains it (e.g.
                       `requests-in-flight`, `on microvm`)
  demo                 build the kernel and the host CLI, build a qcow2 chain
                       with qemu-img in target/demo/, boot the kernel on it
                       running guest writes while a stream and a live active
                       commit run, and check every result against qemu-img
  qemu [--machine microvm|q35] [--disk PATH]... [--disk-ro PATH]...
       [--release|--debug] [--accel tcg|kvm] [--timeout SECS] [-- SCRIPT...]
                       build the x86_64 kernel (release by default) and boot
                       it under QEMU (microvm by default, TCG by default) with
                       each file as a virtio-blk disk whose serial is the file
                       name (at most 20 bytes; --disk-ro: read-only); SCRIPT
                       is the kernel command line. Serial output is shown
                       live; QEMU is killed after SECS (default 60). Exits 0
                       only when the kernel reports success
  fuzz [--seconds N] [--asan] [TARGET]
                       run the cargo-fuzz targets in fuzz/ (header, image,
                       script, virtio_blk; or only TARGET) with libFuzzer
                       for N seconds each (default 60); installs cargo-fuzz
                       when missing (cargo install cargo-fuzz --locked);
                       builds with the nightly toolchain (without it: the
                       default one, except for --asan). Seeds:
                       fuzz/corpus/TARGET; new inputs:
                       target/fuzz/corpus/TARGET; a crash fails the run and
                       its input is saved in fuzz/artifacts/TARGET
  bench                build the CLI (release) and a 1 GiB qcow2 chain of three
                       layers in target/bench/ (kept between runs), then time
                       blockgraph against qemu-img side by side: QD1 reads of
                       4 and 64 KiB, convert, commit, stream, scattered 4 KiB
                       writes (median of 3 alternating runs), blockgraph's
                       reads against a pread loop, and the static memory;
                       prints a table and writes target/bench/report.md
  bench --guest [--seconds N] [--rounds R]
                       the Linux guest of `guest` runs fio (4 KiB random
                       reads at QD 1 and 32, 64 KiB sequential reads at QD 8,
                       4 KiB random writes at QD 32 on a fresh overlay; N s
                       each, default 10) on a vhost-user-blk export of a
                       1 GiB chain by `blockgraph serve` and by
                       qemu-storage-daemon, alternating; then the same rows
                       through NBD with qemu-img bench on the host; R rounds
                       (default 1), each server's median run per row;
                       prints IOPS, MiB/s, latencies and ratios, writes
                       target/gbench/report.md
  guest [--short] [--server qsd|blockgraph] [--no-jobs] [--queues N]
                       a real Linux guest (Debian's kernel, busybox, fio;
                       fetched with apt-get download into target/guest/ and
                       reused) booted under TCG on a vhost-user-blk export
                       of a qcow2 chain served by qemu-storage-daemon; while
                       fio writes and verifies, a live snapshot, a stream
                       and an active commit with pivot run over QMP; checks
                       fio's exit codes, dmesg, qemu-img check, the final
                       chain and the guest's md5 against the image.
                       --short: a smaller fio run (under 2 minutes).
                       --server blockgraph: `blockgraph serve` (built from
                       target/debug) instead of qemu-storage-daemon (the
                       short run on it is part of `test`).
                       --no-jobs: fio, hash and checks without the QMP jobs.
                       --queues N: N virtqueues and N vCPUs (1 to 8)
  help                 this text

The first failing step stops the run with a non-zero exit status.
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[OsString]) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return Err(Error::msg("no command given"));
    };
    let command = command.to_str().unwrap_or("");
    match command {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        "test" => {
            let extra = passthrough_args(command, rest)?;
            tasks::test::run(&Workspace::locate(), extra)
        }
        "qemu" => tasks::qemu::run(&Workspace::locate(), rest),
        "fuzz" => tasks::fuzz::run(&Workspace::locate(), rest),
        "boot-test" => match rest {
            [] | [_] => {
                let filter = rest.first().map(|arg| arg.to_string_lossy());
                let ws = Workspace::locate();
                prereq::ensure_all(&ws).and_then(|()| tasks::boot_test::run(&ws, filter.as_deref()))
            }
            [_, extra, ..] => Err(Error::msg(format!(
                "`boot-test` takes at most one filter (got `{}` too)",
                extra.to_string_lossy()
            ))),
        },
        "bench" => match rest.first() {
            Some(arg) if arg == "--guest" => guest_bench_args(&rest[1..])
                .and_then(|args| tasks::guest::bench(&Workspace::locate(), args)),
            Some(arg) => Err(Error::msg(format!(
                "`bench` takes no arguments but --guest [--seconds N] (got `{}`)",
                arg.to_string_lossy()
            ))),
            None => tasks::bench::run(&Workspace::locate()),
        },
        "guest" => tasks::guest::run(&Workspace::locate(), rest),
        "demo" => match rest.first() {
            Some(arg) => Err(Error::msg(format!(
                "`demo` takes no arguments (got `{}`)",
                arg.to_string_lossy()
            ))),
            None => tasks::demo::run(&Workspace::locate()),
        },
        _ => {
            eprint!("{USAGE}");
            Err(Error::msg(format!(
                "unknown command `{}`",
                args[0].to_string_lossy()
            )))
        }
    }
}

/// The arguments after `--`; anything before it is an error (no options yet).
fn passthrough_args<'a>(command: &str, rest: &'a [OsString]) -> Result<&'a [OsString]> {
    match rest.split_first() {
        None => Ok(&[]),
        Some((first, tail)) if first == "--" => Ok(tail),
        Some((first, _)) => Err(Error::msg(format!(
            "`{command}`: unexpected argument `{}` (extra arguments go after `--`)",
            first.to_string_lossy()
        ))),
    }
}

/// Where things are: the workspace root, the shared target directory, cargo.
pub struct Workspace {
    /// The workspace root (the directory holding the root `Cargo.toml`).
    pub root: PathBuf,
    /// The one target directory every step uses (`CARGO_TARGET_DIR` or `target/`).
    pub target_dir: PathBuf,
    /// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
    cargo: OsString,
}

impl Workspace {
    fn locate() -> Self {
        let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => root.join(dir),
            _ => root.join("target"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        Workspace {
            root,
            target_dir,
            cargo,
        }
    }

    /// A cargo command run from the workspace root.
    pub fn cargo(&self) -> cmd::Cmd {
        cmd::Cmd::new(&self.cargo).cwd(&self.root)
    }
}

/// `--seconds N` after `bench --guest` (default 10): fio's run time per
/// row and server.
fn guest_bench_args(args: &[OsString]) -> Result<tasks::guest::BenchArgs> {
    let mut parsed = tasks::guest::BenchArgs {
        seconds: 10,
        rounds: 1,
    };
    let number = |n: &OsString, max: u32, flag: &str| {
        n.to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| Error::msg(format!("{flag} needs a number from 1 to {max}")))
    };
    for pair in args.chunks(2) {
        match pair {
            [flag, n] if flag == "--seconds" => parsed.seconds = number(n, 600, "--seconds")?,
            [flag, n] if flag == "--rounds" => parsed.rounds = number(n, 9, "--rounds")?,
            _ => {
                return Err(Error::msg(
                    "`bench --guest` takes --seconds N (fio's run time per row and server) \
                     and --rounds N (runs per row and server; the median is reported)",
                ))
            }
        }
    }
    Ok(parsed)
}

/// An xtask failure: a message for a human, printed once by `main`.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what we were doing to a lower-level error (`io::Error` and friends).
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|err| Error(format!("{what}: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn passthrough_takes_everything_after_the_first_separator() {
        let args = os(&["--", "oracle", "--", "--nocapture"]);
        let got = passthrough_args("test", &args).unwrap();
        assert_eq!(got, &os(&["oracle", "--", "--nocapture"])[..]);
        assert!(passthrough_args("test", &[]).unwrap().is_empty());
        assert!(passthrough_args("test", &os(&["--release"])).is_err());
    }

    #[test]
    fn unknown_command_is_an_error() {
        assert!(run(&os(&["frobnicate"])).is_err());
        assert!(run(&[]).is_err());
        assert!(run(&os(&["help"])).is_ok());
    }
}
