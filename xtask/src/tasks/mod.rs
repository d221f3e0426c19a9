//! One module per `cargo xtask` command, plus the boot tests `test` runs
//! and the lab (image helpers) they and the demo share.
//!
//! A command to come: `bench`.

pub mod boot_test;
pub mod demo;
pub mod lab;
pub mod qemu;
pub mod test;
