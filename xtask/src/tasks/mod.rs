//! One module per `cargo xtask` command.
//!
//! Commands to come: `qemu` (boot the x86_64 kernel under QEMU with a timeout,
//! the child killed on drop, see `cmd::Cmd::timeout`) and `bench`.

pub mod demo;
pub mod test;
