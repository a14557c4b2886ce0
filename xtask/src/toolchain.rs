//! What building the eBPF object needs beyond stable Rust, checked and installed if missing.
//!
//! - `rustup`, and its `nightly` toolchain: the eBPF crate builds with `-Z build-std=core`.
//!   This machine cannot download toolchains (only components of installed ones), so a missing
//!   nightly is an error that says so; no dated nightly is ever installed.
//! - nightly's `rust-src` component (for `build-std`): added with rustup if missing.
//! - `bpf-linker` 0.13.x, built against the nightly's own LLVM (cargo cannot fetch an LLVM here):
//!   if `bpf-linker --version` does not answer 0.13.x, it is installed from crates.io with
//!   `LLVM_PREFIX` pointing at the nightly's sysroot, after giving the sysroot's versioned
//!   `libLLVM.so.*` the plain `libLLVM.so` name the build looks for.
//!
//! Each check is one quick command, so [`ensure`] is cheap when everything is present and safe to
//! run before every build.

use std::{fs, io, os::unix::fs::symlink, path::Path};

use anyhow::{bail, Context as _};

use crate::cmd::{self, say};

/// The toolchain the eBPF crate builds with (`cargo +nightly`).
const NIGHTLY: &str = "nightly";
/// The bpf-linker release installed when none answers [`BPF_LINKER_SERIES`].
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Any bpf-linker whose version starts with this will do.
const BPF_LINKER_SERIES: &str = "0.13.";
/// bpf-linker's cargo feature for the LLVM major version of the installed nightly (LLVM 22).
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Makes sure everything the eBPF build needs is installed: rustup, the nightly toolchain with
/// `rust-src`, and bpf-linker 0.13.x.
pub fn ensure() -> anyhow::Result<()> {
    ensure_rustup()?;
    ensure_nightly()?;
    ensure_nightly_component("rust-src")?;
    ensure_bpf_linker()
}

fn ensure_rustup() -> anyhow::Result<()> {
    match cmd::find("rustup") {
        Some(path) => {
            say(format_args!("rustup: {}", path.display()));
            Ok(())
        }
        None => bail!(
            "rustup is not on PATH nor in cargo's bin directory; snat builds its eBPF object with \
             rustup's `nightly` toolchain: install rustup (https://rustup.rs) with the stable and \
             nightly toolchains"
        ),
    }
}

fn ensure_nightly() -> anyhow::Result<()> {
    let list = cmd::output(cmd::new("rustup").args(["toolchain", "list"]))?;
    if !lists_nightly(&list) {
        bail!(
            "rustup's `{NIGHTLY}` toolchain is not installed (installed: {}); the eBPF crate needs \
             it for `-Z build-std=core`. This machine cannot download toolchains (only components \
             of installed ones), so xtask does not try: install `{NIGHTLY}` where downloads work \
             (`rustup toolchain install {NIGHTLY}`), then run `cargo xtask build` again",
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    say(format_args!("{NIGHTLY} toolchain: installed"));
    Ok(())
}

/// Adds `component` to the nightly toolchain if it is not installed yet.
pub fn ensure_nightly_component(component: &str) -> anyhow::Result<()> {
    let installed = cmd::output(cmd::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    if lists_component(&installed, component) {
        say(format_args!("{NIGHTLY} {component}: installed"));
        return Ok(());
    }
    say(format_args!(
        "{NIGHTLY} {component}: missing, adding it with rustup"
    ));
    cmd::run(cmd::new("rustup").args(["component", "add", component, "--toolchain", NIGHTLY]))
        .with_context(|| {
            format!("could not add the {component} component to the {NIGHTLY} toolchain")
        })
}

/// Whether `rustup toolchain list` output names the undated `nightly-<host>` toolchain.
///
/// Lines look like `nightly-x86_64-unknown-linux-gnu (active)`; a dated `nightly-2026-05-19-…`
/// is a different toolchain from `+nightly`'s point of view.
fn lists_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name.strip_prefix(NIGHTLY)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Whether `rustup component list --installed` output names `component`.
///
/// Target-independent components are listed bare (`rust-src`), the others with the host triple
/// (`clippy-x86_64-unknown-linux-gnu`).
fn lists_component(list: &str, component: &str) -> bool {
    list.lines().map(str::trim).any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

/// The version in `bpf-linker --version` output (`bpf-linker 0.13.0`), else the whole output.
fn linker_version(out: &str) -> &str {
    out.split_whitespace().nth(1).unwrap_or(out.trim())
}

/// What `bpf-linker --version` said, if anything.
enum Linker {
    Missing,
    Broken(anyhow::Error),
    Version { path: String, version: String },
}

impl Linker {
    fn probe() -> Self {
        let Some(path) = cmd::find("bpf-linker") else {
            return Self::Missing;
        };
        match cmd::output(cmd::new(&path).arg("--version")) {
            Ok(out) => Self::Version {
                path: path.display().to_string(),
                version: linker_version(&out).to_owned(),
            },
            Err(e) => Self::Broken(e),
        }
    }

    fn is_good(&self) -> bool {
        matches!(self, Self::Version { version, .. } if version.starts_with(BPF_LINKER_SERIES))
    }
}

impl std::fmt::Display for Linker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "not found on PATH nor in cargo's bin directory"),
            Self::Broken(e) => write!(f, "does not run: {e:#}"),
            Self::Version { path, version } => write!(f, "{version} ({path})"),
        }
    }
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let linker = Linker::probe();
    if linker.is_good() {
        say(format_args!("bpf-linker: {linker}"));
        return Ok(());
    }
    say(format_args!(
        "bpf-linker: {linker}; need {BPF_LINKER_SERIES}x, installing {BPF_LINKER_VERSION} \
         against the {NIGHTLY} toolchain's LLVM (takes about a minute)"
    ));
    install_bpf_linker().context("could not install bpf-linker")?;
    let linker = Linker::probe();
    if !linker.is_good() {
        bail!(
            "bpf-linker still is not {BPF_LINKER_SERIES}x after installing it: {linker}. The eBPF \
             build runs the first bpf-linker on PATH after {}; remove other copies, or check that \
             the {NIGHTLY} sysroot's lib directory still holds the libLLVM it was built against",
            cmd::cargo_bin_dir().map_or_else(
                || "cargo's bin directory".into(),
                |d| d.display().to_string()
            )
        );
    }
    say(format_args!("bpf-linker: {linker}"));
    Ok(())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot =
        cmd::output(cmd::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    let sysroot = Path::new(sysroot.trim());
    link_plain_libllvm(&sysroot.join("lib"))?;
    // `--force`: this only runs when the installed copy does not answer, and then a copy of the
    // right version that no longer finds its libLLVM must be rebuilt, not kept.
    cmd::run(
        cmd::nightly_cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
                "--force",
            ])
            .env("LLVM_PREFIX", sysroot),
    )
}

/// Makes `lib/libLLVM.so` a symlink to the single versioned `libLLVM.so.*` the nightly ships.
fn link_plain_libllvm(lib: &Path) -> anyhow::Result<()> {
    let mut versioned = Vec::new();
    for entry in fs::read_dir(lib).with_context(|| format!("could not list {}", lib.display()))? {
        let name = entry
            .with_context(|| format!("could not list {}", lib.display()))?
            .file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            versioned.push(name);
        }
    }
    let [target] = versioned.as_slice() else {
        bail!(
            "expected exactly one libLLVM.so.* in {}, found {versioned:?}; bpf-linker is built \
             against the LLVM library the {NIGHTLY} toolchain ships there",
            lib.display()
        );
    };
    let link = lib.join("libLLVM.so");
    match fs::read_link(&link) {
        Ok(current) if current == Path::new(target) => return Ok(()),
        Ok(_) => fs::remove_file(&link)
            .with_context(|| format!("could not replace the stale symlink {}", link.display()))?,
        // A real file of that name serves as well as the symlink.
        Err(_) if link.exists() => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("could not inspect {}", link.display())),
    }
    say(format_args!(
        "$ ln -s {} {}",
        target.to_string_lossy(),
        link.display()
    ));
    symlink(target, &link).with_context(|| format!("could not create {}", link.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_is_the_undated_one() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(lists_nightly(list));
        assert!(!lists_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\nnightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!lists_nightly("no installed toolchains\n"));
    }

    #[test]
    fn components_bare_or_with_host() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert!(lists_component(list, "rust-src"));
        assert!(lists_component(list, "clippy"));
        assert!(!lists_component(list, "rustfmt"));
        assert!(!lists_component(
            "rust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
    }

    #[test]
    fn linker_version_is_the_second_word() {
        assert_eq!(linker_version("bpf-linker 0.13.0\n"), "0.13.0");
        assert_eq!(linker_version(" odd \n"), "odd");
    }

    #[test]
    fn plain_libllvm_link_is_created_and_kept() -> anyhow::Result<()> {
        let lib = std::env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        fs::create_dir_all(&lib)?;
        let versioned = "libLLVM.so.22.1-rust-1.97.0-nightly";
        fs::write(lib.join(versioned), b"")?;
        fs::write(lib.join("libLLVM-22-rust-1.97.0-nightly.so"), b"")?;
        let link = lib.join("libLLVM.so");

        link_plain_libllvm(&lib)?;
        assert_eq!(fs::read_link(&link)?, Path::new(versioned));
        link_plain_libllvm(&lib)?;
        assert_eq!(fs::read_link(&link)?, Path::new(versioned));

        fs::remove_file(&link)?;
        symlink("libLLVM.so.21-stale", &link)?;
        link_plain_libllvm(&lib)?;
        assert_eq!(fs::read_link(&link)?, Path::new(versioned));

        fs::write(lib.join("libLLVM.so.23-second"), b"")?;
        assert!(link_plain_libllvm(&lib).is_err());
        fs::remove_dir_all(&lib)?;
        Ok(())
    }
}
