//! `cargo xtask demo`: builds the demo (an example of the `tests` crate, so it shares the test
//! harness's namespaces, agent and traffic code) and hands the process over to it.
//!
//! The demo replaces xtask (exec) rather than running as its child: Ctrl-C then reaches the demo
//! and the agent only, and the demo removes its namespaces before it exits.

use std::{os::unix::process::CommandExt as _, path::Path};

use anyhow::Context as _;

use crate::cmd::{self, say};

pub fn run(root: &Path, target_dir: &Path, snat: &Path) -> anyhow::Result<()> {
    cmd::run(cmd::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "tests",
        "--example",
        "demo",
    ]))?;
    let demo = target_dir.join("release/examples/demo");
    say(format_args!(
        "$ SNAT_BIN={} {}",
        snat.display(),
        demo.display()
    ));
    let err = cmd::new(&demo).env("SNAT_BIN", snat).exec();
    Err(err).with_context(|| format!("starting {}", demo.display()))
}
