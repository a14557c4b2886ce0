//! Builds the eBPF object (`snat-ebpf`'s `snat` binary for the BPF target) with the nightly
//! toolchain and `bpf-linker`, into OUT_DIR, where `include_bytes_aligned!` finds it.
//! `cargo xtask build` installs what this needs; run it once on a fresh machine.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "snat-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../snat-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Nightly)
        .map_err(|e| anyhow!("{e:#}"))
        .context(
            "building the eBPF object failed; it needs the nightly toolchain's rust-src and \
             bpf-linker 0.13 on PATH: run `cargo xtask build` once to install them",
        )
}
