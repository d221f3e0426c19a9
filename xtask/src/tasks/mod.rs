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
