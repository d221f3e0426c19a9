//! `cargo xtask fuzz [--seconds N] [--asan] [TARGET]`: the cargo-fuzz targets in
//! `fuzz/`, each run with libFuzzer for N seconds; and the short smoke run
//! `cargo xtask test` makes.
//!
//! - `header`: `Header::parse` of cluster 0, and the backing-name rewrite
//!   of whatever parses;
//! - `image`: a qcow2 image opened read-write in a `Graph` (backing chain
//!   served from memory): reads, block status, writes, zero writes,
//!   discards and a chain collapse;
//! - `script`: the command-line splitter and number parsers, and whole
//!   scripts run on two in-memory images;
//! - `virtio_blk`: a virtio-blk descriptor chain and its guest memory,
//!   served from a raw image and checked against its decoding.
//!
//! The checked-in seeds in `fuzz/corpus/TARGET/` are only read; what
//! libFuzzer finds goes to a working corpus, `target/fuzz/corpus/TARGET/`,
//! kept between runs (so coverage accumulates) and outside the source tree.
//! Crashes are written to `fuzz/artifacts/TARGET/`; one fails the run and
//! its path is printed with the command that reproduces it.
//!
//! The targets are built with debug assertions (overflow checks: an
//! overflow is a panic, which is a finding) and without a sanitizer: the
//! library has no unsafe code, and AddressSanitizer made the image target
//! four times slower. `--asan` builds with it (in `fuzz/target/asan/`).
//! The nightly toolchain builds them; on a machine that has no nightly and
//! cannot fetch it, runs without a sanitizer use the default toolchain
//! (coverage instrumentation is stable) and say so.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::prereq::{self, FuzzToolchain};
use crate::{Context, Error, Result, Workspace};

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 5] = ["header", "image", "qmp", "script", "virtio_blk"];

/// Seconds per target of `cargo xtask fuzz`.
const DEFAULT_SECONDS: u64 = 60;

/// Seconds shown for the smoke run in `cargo xtask test` (it runs a fixed
/// number of inputs, [`SMOKE_RUNS`], not a time).
pub const SMOKE_SECONDS: u64 = 10;
/// Inputs each target runs in the smoke run (a few seconds each here).
const SMOKE_RUNS: u64 = 20_000;

/// One input running longer than this is a hang (libFuzzer `-timeout`).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// libFuzzer's memory limit (`-rss_limit_mb`; a single allocation larger
/// than this is also reported). The targets need a few MiB per input.
const RSS_LIMIT_MB: u64 = 1024;

/// The whole `cargo fuzz run` is killed after the run time plus this
/// (building, the run over the corpus, shutdown).
const RUN_SLACK: Duration = Duration::from_secs(15 * 60);

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    seconds: u64,
    targets: Vec<&'static str>,
    asan: bool,
}

/// Parses `[--seconds N] [--asan] [TARGET]`.
fn parse_args(args: &[OsString]) -> Result<Options> {
    let mut seconds = DEFAULT_SECONDS;
    let mut target = None;
    let mut asan = false;
    let mut words = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(word) = words.next() {
        let value = match word.split_once('=') {
            Some(("--seconds", v)) => Some(v.to_owned()),
            _ if word == "--seconds" => Some(
                words
                    .next()
                    .ok_or_else(|| Error::msg("`fuzz`: --seconds needs a number of seconds"))?,
            ),
            _ => None,
        };
        if let Some(value) = value {
            seconds =
                value.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                    Error::msg(format!("`fuzz`: bad number of seconds `{value}`"))
                })?;
        } else if word == "--asan" {
            asan = true;
        } else if word.starts_with('-') {
            return Err(Error::msg(format!("`fuzz`: unknown option `{word}`")));
        } else if target.is_some() {
            return Err(Error::msg("`fuzz`: name at most one target"));
        } else {
            let known = TARGETS.iter().find(|t| **t == word).ok_or_else(|| {
                Error::msg(format!(
                    "`fuzz`: unknown target `{word}` (targets: {})",
                    TARGETS.join(", ")
                ))
            })?;
            target = Some(*known);
        }
    }
    let targets = target.map_or_else(|| TARGETS.to_vec(), |t| vec![t]);
    Ok(Options {
        seconds,
        targets,
        asan,
    })
}

/// `cargo xtask fuzz [--seconds N] [--asan] [TARGET]`.
pub fn run(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let options = parse_args(args)?;
    let toolchain = prereq::ensure_fuzzing(ws, options.asan)?;
    let run = Run {
        toolchain,
        seconds: options.seconds,
        smoke: false,
        asan: options.asan,
        live: true,
    };
    run.fuzz(ws, &options.targets)
}

/// The smoke run of `cargo xtask test`: every target on [`SMOKE_RUNS`]
/// inputs from a fixed seed, output shown only when something fails. The caller
/// has checked the prerequisites ([`prereq::ensure_fuzzing`]).
pub fn smoke(ws: &Workspace, toolchain: FuzzToolchain) -> Result<()> {
    // The fuzz crate is its own workspace: `cargo fmt --all` does not see it.
    ws.cargo()
        .args([
            "fmt",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--all",
            "--check",
        ])
        .run()?;
    let run = Run {
        toolchain,
        seconds: SMOKE_SECONDS,
        smoke: true,
        asan: false,
        live: false,
    };
    run.fuzz(ws, &TARGETS)
}

/// How the targets are built and run.
struct Run {
    toolchain: FuzzToolchain,
    seconds: u64,
    /// Repeatable: a fixed seed and run count ([`SMOKE_RUNS`]) from the seeds
    /// alone, so CI never depends on what a random walk happens to find.
    smoke: bool,
    /// With AddressSanitizer (needs nightly).
    asan: bool,
    /// Show libFuzzer's output as it comes (else only when a target fails).
    live: bool,
}

impl Run {
    /// Builds the targets, then runs each for `seconds`; the first crash,
    /// hang or out-of-memory stops with an error naming the saved input.
    fn fuzz(&self, ws: &Workspace, targets: &[&str]) -> Result<()> {
        println!(
            "==> fuzzing {} for {} s{} ({}, {})",
            targets.join(", "),
            self.seconds,
            if targets.len() > 1 { " each" } else { "" },
            self.toolchain.shown(),
            if self.asan {
                "AddressSanitizer"
            } else {
                "no sanitizer"
            }
        );
        let started = Instant::now();
        // One build of every target first: one cargo run, shared dependencies.
        let mut build = self
            .toolchain
            .cargo(ws)
            .args(["fuzz", "build"])
            .args(self.build_flags(ws));
        if let [only] = targets {
            build = build.arg(only);
        }
        build.run()?;
        println!("    built in {:.0?}", started.elapsed());
        let mut summary = Vec::new();
        for target in targets {
            let line = self.fuzz_one(ws, target)?;
            println!("    {line}");
            summary.push(line);
        }
        println!("==> fuzzing passed in {:.0?}", started.elapsed());
        if summary.len() > 1 {
            for line in summary {
                println!("    {line}");
            }
        }
        Ok(())
    }

    /// `cargo fuzz build|run` flags: debug assertions on; the sanitizer.
    /// The AddressSanitizer build has a target directory of its own, so
    /// that switching between the two does not rebuild everything.
    fn build_flags(&self, ws: &Workspace) -> Vec<String> {
        let mut flags = vec!["--debug-assertions".to_owned()];
        if self.asan {
            let dir = ws.root.join("fuzz/target/asan");
            flags.extend(["--target-dir".to_owned(), dir.display().to_string()]);
        } else {
            flags.extend(["--sanitizer".to_owned(), "none".to_owned()]);
        }
        flags
    }

    /// Runs one target; returns a one-line summary.
    fn fuzz_one(&self, ws: &Workspace, target: &str) -> Result<String> {
        let seconds = self.seconds;
        let seeds = ws.root.join("fuzz/corpus").join(target);
        if !seeds.is_dir() {
            return Err(Error::msg(format!(
                "the seed corpus {} is missing",
                seeds.display()
            )));
        }
        let work = ws.target_dir.join("fuzz/corpus").join(target);
        if self.smoke && work.exists() {
            fs::remove_dir_all(&work).context(format!("clearing {}", work.display()))?;
        }
        fs::create_dir_all(&work).context(format!("creating {}", work.display()))?;
        let artifacts = ws.root.join("fuzz/artifacts").join(target);
        let before = list_files(&artifacts);
        // The first corpus directory receives new inputs; the seeds are read.
        let cmd = self
            .toolchain
            .cargo(ws)
            .args(["fuzz", "run"])
            .args(self.build_flags(ws))
            .arg(target)
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .args(if self.smoke {
                vec![format!("-runs={SMOKE_RUNS}"), "-seed=1".to_owned()]
            } else {
                vec![format!("-max_total_time={seconds}")]
            })
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            // Panics keep their backtraces; cargo-fuzz's own error does not.
            .env("RUST_LIB_BACKTRACE", "0")
            .timeout(Duration::from_secs(seconds) + RUN_SLACK);
        let cmd = if self.live { cmd.tee() } else { cmd };
        let started = Instant::now();
        let finished = cmd.output_within_timeout()?;
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&finished.stderr);
        let found: Vec<PathBuf> = list_files(&artifacts)
            .difference(&before)
            .map(|name| artifacts.join(name))
            .collect();
        let ok = finished.status.is_some_and(|s| s.success()) && found.is_empty();
        if ok {
            return Ok(format!(
                "{target}: {} in {elapsed:.0?}",
                final_stats(&stderr)
            ));
        }
        if !self.live {
            // Show what libFuzzer said about it: the tail holds the panic
            // and the stack.
            let out = String::from_utf8_lossy(&finished.stdout);
            print!("{}", tail(&out, 20));
            eprint!("{}", tail(&stderr, 80));
        }
        let how = match finished.status {
            None => format!("was killed after {elapsed:.0?}"),
            Some(status) => format!("failed ({status})"),
        };
        let mut message = format!("fuzz target `{target}` {how}");
        if let Some(panic) = panic_summary(&stderr) {
            message.push_str(&format!("\n    {panic}"));
        }
        if found.is_empty() {
            message.push_str("; no crash input was saved (see the output above)");
        }
        for path in &found {
            let shown = path.strip_prefix(&ws.root).unwrap_or(path);
            message.push_str(&format!(
                "\n    crash input: {} ({} bytes)\n    reproduce: {} fuzz run {} {target} {}",
                shown.display(),
                fs::metadata(path).map_or(0, |m| m.len()),
                self.toolchain.shown(),
                self.build_flags(ws).join(" "),
                shown.display()
            ));
        }
        Err(Error::msg(message))
    }
}

/// The names of the files in `dir` (none if it does not exist).
fn list_files(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default()
}

/// `N runs, M corpus inputs, cov C` from libFuzzer's final statistics and
/// its last status line.
fn final_stats(stderr: &str) -> String {
    let stat = |key: &str| {
        stderr.lines().rev().find_map(|line| {
            let rest = line.strip_prefix(key)?.trim_start().strip_prefix(':')?;
            Some(rest.trim().to_owned())
        })
    };
    let cov = stderr
        .lines()
        .rev()
        .find_map(|line| {
            let (_, rest) = line.split_once(" cov: ")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{} runs ({}/s), coverage {cov}, {} new corpus inputs",
        stat("stat::number_of_executed_units").unwrap_or_else(|| "?".into()),
        stat("stat::average_exec_per_sec").unwrap_or_else(|| "?".into()),
        stat("stat::new_units_added").unwrap_or_else(|| "?".into()),
    )
}

/// `panicked at FILE:LINE:COL: MESSAGE` from the target's panic, or
/// libFuzzer's verdict (`ERROR: libFuzzer: timeout after 10 seconds`).
fn panic_summary(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines();
    if let Some(at) = lines.by_ref().find(|l| l.contains(" panicked at ")) {
        let place = at.split_once(" panicked at ").map_or(at, |(_, p)| p);
        // The harness's own files are named relative to the fuzz crate.
        let crate_dir = if place.starts_with("src/") {
            "fuzz/"
        } else {
            ""
        };
        let message = lines.next().unwrap_or("").trim();
        return Some(format!("panicked at {crate_dir}{place} {message}"));
    }
    stderr
        .lines()
        .find(|l| l.contains("ERROR: libFuzzer:"))
        .map(|l| {
            l.trim_start_matches(|c: char| c == '=' || c == ' ' || c.is_ascii_digit())
                .to_owned()
        })
}

/// The last `lines` lines of `text`, each ending in a newline.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments() {
        let all = parse_args(&[]).unwrap();
        assert_eq!(
            (all.seconds, all.targets.len(), all.asan),
            (60, TARGETS.len(), false)
        );
        let one = parse_args(&os(&["--seconds", "5", "image"])).unwrap();
        assert_eq!((one.seconds, one.targets), (5, vec!["image"]));
        let eq = parse_args(&os(&["script", "--seconds=7", "--asan"])).unwrap();
        assert_eq!((eq.seconds, eq.targets, eq.asan), (7, vec!["script"], true));
        for bad in [
            &["--seconds"][..],
            &["--seconds", "0"],
            &["--seconds", "x"],
            &["nope"],
            &["header", "image"],
            &["--frobnicate"],
        ] {
            assert!(parse_args(&os(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stats_from_libfuzzer_output() {
        let err = "#1024\tpulse  cov: 812 ft: 2001 corp: 40/9Kb exec/s: 512 rss: 60Mb\n\
                   Done 5120 runs in 10 second(s)\n\
                   stat::number_of_executed_units: 5120\n\
                   stat::average_exec_per_sec:     512\n\
                   stat::new_units_added:          7\n";
        assert_eq!(
            final_stats(err),
            "5120 runs (512/s), coverage 812, 7 new corpus inputs"
        );
        assert_eq!(tail("a\nb\nc", 2), "b\nc\n");
        let panic = "INFO: x\nthread '<unnamed>' (1) panicked at src/script.rs:56:5:\n\
                     assertion failed: nodes\nstack backtrace:\n";
        assert_eq!(
            panic_summary(panic).as_deref(),
            Some("panicked at fuzz/src/script.rs:56:5: assertion failed: nodes")
        );
        let hang = "==123== ERROR: libFuzzer: timeout after 10 seconds\n";
        assert_eq!(
            panic_summary(hang).as_deref(),
            Some("ERROR: libFuzzer: timeout after 10 seconds")
        );
        assert_eq!(panic_summary("nothing"), None);
    }
}
