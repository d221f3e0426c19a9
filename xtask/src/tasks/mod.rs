//! One module per `cargo xtask` command, plus the boot tests `test` runs.
//!
//! A command to come: `bench`.

pub mod boot_test;
pub mod demo;
pub mod qemu;
pub mod test;
