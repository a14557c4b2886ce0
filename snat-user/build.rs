//! Builds the eBPF object (`snat-ebpf`'s `snat` binary for `bpfel-unknown-none`) with the nightly
//! toolchain and `bpf-linker`, into OUT_DIR, where `engine.rs` includes it.
//!
//! Does what `aya_build::build_ebpf` does, minus the flood of `cargo:warning` lines it prints on
//! every build (the nested build's output is shown only when it fails). The BPF CPU stays
//! `generic` (ISA v1): with `v3` LLVM 22 spills registers the verifier sees as uninitialised, and
//! the datapath needs no atomic beyond v1's fetch-less add.
//! `cargo xtask build` installs what this needs (nightly `rust-src`, `bpf-linker` 0.13).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(e) = build() {
        // A build script error is shown once, plainly.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR not set")?);
    let root = manifest
        .parent()
        .ok_or("snat-user has no parent directory")?;
    for watched in [
        "snat-ebpf/src",
        "snat-ebpf/Cargo.toml",
        "snat-common/src",
        "snat-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "snat-ebpf",
            "--bins",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        );
    // The outer cargo's compiler settings must not leak into the nightly build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd.output().map_err(|e| {
        format!(
            "running `rustup run nightly cargo build` for snat-ebpf: {e} (is rustup installed?)"
        )
    })?;
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        return Err(format!(
            "building the eBPF object failed ({}); see the lines above. It needs the nightly toolchain's rust-src and bpf-linker 0.13 on PATH: run `cargo xtask build` once to install them",
            out.status
        ));
    }
    copy(
        &target_dir.join("bpfel-unknown-none/release/snat"),
        &out_dir.join("snat"),
    )
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}
