//! `cargo xtask bench`: builds the benchmark (an example of the `tests` crate, so it shares the
//! test harness's namespaces, agent and traffic code and links snat's library for the in-process
//! datapath and scale measurements) and hands the process over to it.
//!
//! Like the demo, the benchmark replaces xtask (exec) rather than running as its child: Ctrl-C
//! then reaches the benchmark, which stops, removes every namespace and nftables table it made,
//! and exits (so does SIGTERM or SIGHUP). It writes `target/bench/report.md`,
//! `target/bench/churn.svg` and `target/bench/results.json` (every sample).

use std::{os::unix::process::CommandExt as _, path::Path};

use anyhow::Context as _;

use crate::cmd::{self, say};

pub fn run(root: &Path, target_dir: &Path, snat: &Path, quick: bool) -> anyhow::Result<()> {
    cmd::run(cmd::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "tests",
        "--example",
        "bench",
    ]))?;
    let bench = target_dir.join("release/examples/bench");
    let out = target_dir.join("bench");
    let mut command = cmd::new(&bench);
    command.env("SNAT_BIN", snat).arg("--out").arg(&out);
    if quick {
        command.arg("--quick");
    }
    say(format_args!("$ {}", cmd::display(&command)));
    let err = command.exec();
    Err(err).with_context(|| format!("starting {}", bench.display()))
}
