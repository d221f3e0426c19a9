//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure.

use std::ffi::OsString;

use super::{boot_test, fuzz, guest};
use crate::cmd::Cmd;
use crate::prereq::{self, BARE_METAL_TARGET};
use crate::{Error, Result, Workspace};

pub fn run(ws: &Workspace, test_args: &[OsString]) -> Result<()> {
    let fuzz_toolchain = prereq::ensure_all(ws)
        .and_then(|()| prereq::ensure_fuzzing(ws, false))
        .map_err(|err| step_failed("prerequisites", err))?;
    let steps = steps(ws, test_args);
    for step in &steps {
        let status = step
            .status()
            .map_err(|err| step_failed(&step.to_string(), err))?;
        if !status.success() {
            return Err(Error::msg(format!("step `{step}` failed ({status})")));
        }
    }
    // Each fuzz target for a few seconds: a crash fails the run.
    fuzz::smoke(ws, fuzz_toolchain).map_err(|err| step_failed("fuzz smoke run", err))?;
    boot_test::run(ws, None).map_err(|err| step_failed("boot tests", err))?;
    // A Debian Linux guest on `blockgraph serve` (vhost-user-blk): fio with
    // verification while QMP takes a live snapshot, streams and runs an
    // active commit with pivot (the short profile, about 20 s once the
    // guest's pieces are cached).
    guest::run_with(
        ws,
        guest::Server::Blockgraph,
        &guest::Profile::short(),
        true,
    )
    .map_err(|err| step_failed("Linux guest on blockgraph serve", err))?;
    println!("xtask test: all {} steps passed", steps.len() + 4);
    Ok(())
}

/// The steps between the prerequisites and the boot tests; all share the
/// one target directory.
fn steps(ws: &Workspace, test_args: &[OsString]) -> Vec<Cmd> {
    vec![
        ws.cargo().args(["fmt", "--all", "--check"]),
        ws.cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        // The kernel as it is really built: no_std, bare metal.
        ws.cargo().args([
            "clippy",
            "-p",
            "blockgraph-kernel",
            "--target",
            BARE_METAL_TARGET,
            "--",
            "-D",
            "warnings",
        ]),
        ws.cargo().args([
            "build",
            "-p",
            "blockgraph",
            "--lib",
            "--no-default-features",
            "--target",
            BARE_METAL_TARGET,
        ]),
        ws.cargo().env("RUSTDOCFLAGS", "-D warnings").args([
            "doc",
            "-p",
            "blockgraph",
            "--no-deps",
        ]),
        ws.cargo().args(["test", "--workspace"]).args(test_args),
        // The embedder's example: the whole API in one loop, run for real.
        ws.cargo().args(["run", "--quiet", "--example", "vmm_loop"]),
    ]
}

fn step_failed(step: &str, err: Error) -> Error {
    Error::msg(format!("step `{step}` failed: {err}"))
}
