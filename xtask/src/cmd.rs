//! Running external programs the same way everywhere in xtask.
//!
//! - Every command is printed on stderr (`xtask: $ …`) before it runs, so the log shows what was
//!   done; a non-zero exit becomes an error that names the command.
//! - Children get a `PATH` with cargo's bin directory (`$CARGO_HOME/bin`, else `~/.cargo/bin`)
//!   first, where rustup's proxies and `cargo install`ed tools such as `bpf-linker` live, and none
//!   of the variables that the parent `cargo run` (the `cargo xtask` alias) may leave behind and
//!   that would change how a nested cargo compiles.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    path::PathBuf,
    process::Command,
};

use anyhow::{bail, Context as _};

/// Variables a parent cargo may set that must not leak into a nested cargo or rustc.
const SCRUBBED_VARS: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];
/// Prefixes of variables a parent cargo sets for the binary it runs.
const SCRUBBED_PREFIXES: &[&str] = &["CARGO_PKG_"];

/// Prints one line of progress on stderr.
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("xtask: {msg}");
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// The `PATH` children run with: cargo's bin directory first, then the inherited `PATH`.
pub fn child_path() -> OsString {
    let inherited = env::var_os("PATH").unwrap_or_default();
    let Some(bin) = cargo_bin_dir() else {
        return inherited;
    };
    let dirs =
        std::iter::once(bin.clone()).chain(env::split_paths(&inherited).filter(|d| *d != bin));
    // Only fails if a directory contains ':', and then the inherited PATH is as good as it gets.
    env::join_paths(dirs).unwrap_or(inherited)
}

/// Finds `program` on the children's `PATH`.
pub fn find(program: &str) -> Option<PathBuf> {
    which::which_in_global(program, Some(child_path()))
        .ok()
        .and_then(|mut found| found.next())
}

/// A command for `program` with the children's environment (see the module docs).
pub fn new(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SCRUBBED_VARS.contains(&key) || SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env("PATH", child_path());
    cmd
}

/// The cargo that runs xtask (`$CARGO`), else `cargo` from `PATH`.
pub fn cargo() -> Command {
    new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// cargo of the `nightly` toolchain, through rustup (the same as `cargo +nightly`).
pub fn nightly_cargo() -> Command {
    let mut cmd = new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    cmd
}

/// Runs `cmd` with inherited stdio, printing it first; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = display(cmd);
    say(format_args!("$ {shown}"));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; a non-zero exit is an error carrying its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// Whether xtask runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

/// Fails unless xtask runs as root, saying why `command` needs it and how to run it (`usage`).
pub fn require_root(command: &str, why: &str, usage: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{command} must run as root ({why}): {usage}");
    }
    Ok(())
}

/// `cmd` as a shell-like line: the variables it sets, the program, its arguments, where it runs.
pub fn display(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let (Some(value), false) = (value, key == "PATH") {
            let _ = write!(line, "{}={} ", key.to_string_lossy(), quote(value));
        }
    }
    line.push_str(&quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(line, "  (in {})", dir.display());
    }
    line
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
