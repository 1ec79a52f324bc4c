//! Builds the bare-metal test guest (`image/`) into `$OUT_DIR/testguest.elf`.
//!
//! A nested `rustc` compiles `image/main.rs` (which pulls in the ring-0 assembly `boot.s`
//! through `global_asm!`) for the host target x86_64-unknown-linux-gnu as a freestanding
//! binary: `no_std`, `panic=abort`, static relocations, no C runtime, linked by `image/link.ld`
//! at 1 MiB. Only the installed toolchain is used (no extra rustup target).

use std::env;
use std::path::PathBuf;
use std::process::{exit, Command};

/// A freestanding, statically linked image for the host target.
const RUSTC_FLAGS: &[&str] = &[
    "--edition=2021",
    "--crate-type=bin",
    "--crate-name=testguest",
    "--target=x86_64-unknown-linux-gnu",
    "-Copt-level=2",
    "-Cpanic=abort",
    "-Crelocation-model=static",
    "-Ctarget-cpu=x86-64",
    "-Cstrip=debuginfo",
    "-Clink-arg=-nostdlib",
    "-Clink-arg=-static",
    "-Clink-arg=-Wl,--build-id=none",
    "-Dwarnings",
];

fn main() {
    println!("cargo:rerun-if-changed=image");
    let (Some(manifest), Some(out)) = (env::var_os("CARGO_MANIFEST_DIR"), env::var_os("OUT_DIR"))
    else {
        eprintln!("guest/build.rs: CARGO_MANIFEST_DIR and OUT_DIR must be set (run through cargo)");
        exit(1);
    };
    let image = PathBuf::from(manifest).join("image");
    let elf = PathBuf::from(out).join("testguest.elf");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut link_script = std::ffi::OsString::from("link-arg=-Wl,-T,");
    link_script.push(image.join("link.ld"));
    let status = Command::new(&rustc)
        .args(RUSTC_FLAGS)
        .arg("-C")
        .arg(link_script)
        .arg("-o")
        .arg(&elf)
        .arg(image.join("main.rs"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("guest/build.rs: building the test guest image failed ({s})");
            exit(1);
        }
        Err(e) => {
            eprintln!(
                "guest/build.rs: cannot run {}: {e}",
                rustc.to_string_lossy()
            );
            exit(1);
        }
    }
}
