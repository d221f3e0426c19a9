//! One module per `cargo xtask` command, plus the boot tests `test` runs
//! and the lab (image helpers) they, the demo, the benchmark and the Linux
//! guest run share.

pub mod bench;
pub mod boot_test;
pub mod demo;
pub mod fuzz;
pub mod guest;
pub mod lab;
pub mod qemu;
pub mod test;

use std::fs;
use std::path::{Path, PathBuf};

use crate::{Context, Error, Result, Workspace};

/// The bytes of the file at `path`; the error names it.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).context(format!("reading {}", path.display()))
}

/// Builds the CLI (`release` or debug) and returns its path.
pub fn build_cli(ws: &Workspace, release: bool) -> Result<PathBuf> {
    let mut cargo = ws.cargo().args(["build", "--bin", "blockgraph"]);
    if release {
        cargo = cargo.arg("--release");
    }
    cargo.run()?;
    let cli = ws
        .target_dir
        .join(if release { "release" } else { "debug" })
        .join("blockgraph");
    if !cli.is_file() {
        return Err(Error::msg(format!(
            "cargo built the CLI but {} does not exist",
            cli.display()
        )));
    }
    Ok(cli)
}
