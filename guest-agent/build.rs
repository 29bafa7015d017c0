//! Builds the bare-metal microguest (`microguest/`, its own cargo project) and tells the crate
//! where the image is. Runs a nested `cargo build` with a clean environment: the outer build's
//! flags, target and wrappers (clippy, coverage) must not leak into the freestanding image.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("microguest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("microguest-target");

    for path in ["Cargo.toml", "Cargo.lock", "build.rs", "linker.ld", ".cargo/config.toml", "src"] {
        rerun_if_changed_recursive(&guest_dir.join(path));
    }
    rerun_if_changed_recursive(&manifest_dir.join("protocol/src"));
    // The rings the microguest shares with the host side.
    rerun_if_changed_recursive(&manifest_dir.join("../swarm/ring/src"));
    rerun_if_changed_recursive(&manifest_dir.join("../swarm/ring/Cargo.toml"));

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir).args(["build", "--release", "--offline", "--target-dir"]).arg(&target_dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let leaks = key.starts_with("CARGO_") && !matches!(key.as_ref(), "CARGO_HOME" | "CARGO_MAKEFLAGS");
        if leaks || matches!(key.as_ref(), "RUSTFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTDOCFLAGS") {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("failed to run cargo for the microguest");
    assert!(status.success(), "building the microguest failed (see the output above)");

    let image = target_dir.join("release/microguest");
    assert!(image.is_file(), "microguest image missing at {}", image.display());
    println!("cargo:rustc-env=MICROGUEST_IMAGE={}", image.display());
}

fn rerun_if_changed_recursive(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            rerun_if_changed_recursive(&entry.path());
        }
    }
}
