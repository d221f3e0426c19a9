//! Links the bare-metal kernel with `linker/x86_64-qemu.ld`.
//!
//! Only for `target_os = "none"`: the host build is an empty stub and links
//! normally. The script is passed by absolute path, so the link works from
//! any directory, and a change to it relinks the kernel. The link map goes
//! to `$OUT_DIR/kernel.map`.

use std::env;
use std::path::PathBuf;

fn main() {
    let script = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../../linker/x86_64-qemu.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    // The kernel runs where it is linked: a position-independent (static-pie)
    // image would need a relocator. `.cargo/config.toml` sets the flag for
    // this target; a RUSTFLAGS variable replaces that setting, so say so.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags
        .split('\x1f')
        .any(|f| f.ends_with("relocation-model=static"))
    {
        panic!(
            "blockgraph-kernel needs `-C relocation-model=static` for \
             x86_64-unknown-none (set in .cargo/config.toml; an explicit \
             RUSTFLAGS replaces it: add the flag there)"
        );
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!(
        "cargo:rustc-link-arg-bins=-Map={}/kernel.map",
        env::var("OUT_DIR").expect("set by cargo")
    );
}
