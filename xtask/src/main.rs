//! `cargo xtask`: snat's orchestration — toolchain setup, the release build, lints, tests, demo,
//! benchmarks.
//!
//! Orchestration only: everything here runs other programs (cargo, rustup, apt-get, the `snat`
//! binary) from the workspace root, printing each step on stderr with an `xtask:` prefix, and stops
//! at the first failure with an error that names the failing command. Commands that attach eBPF
//! programs check for root before building anything.

mod cmd;
mod toolchain;
mod tools;

use std::{
    env,
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::cmd::say;

/// Build, run, lint and test snat.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs if missing, then build target/release/snat
    ///
    /// Checks for rustup, the `nightly` toolchain, its `rust-src` component and bpf-linker 0.13.x
    /// (building it against the nightly's LLVM if needed), and for protoc and the well-known
    /// protos (Debian protobuf-compiler and libprotobuf-dev, installed as root), then runs
    /// `cargo build --release -p snat-user`, whose build script builds the eBPF object.
    Build,
    /// Build, then run `snat run <ARGS>` (as root)
    ///
    /// Everything after `run` (after `--`, for arguments that start with `-`) is passed to
    /// `target/release/snat run`; the exit code is snat's. Try `cargo xtask run -- --help`.
    Run(RunArgs),
    /// Check formatting, clippy on the host, and clippy on snat-ebpf for the BPF target
    ///
    /// Runs all three passes, then reports the ones that failed:
    /// `cargo fmt --all -- --check`, `cargo clippy --workspace --all-targets -- -D warnings`, and
    /// in snat-ebpf `cargo +nightly clippy --release --target bpfel-unknown-none
    /// -Z build-std=core -- -D warnings`.
    Lint,
    /// Install test tools, build, lint, then run unit and integration tests (as root)
    ///
    /// Stages, stopping at the first that fails: missing test tools installed with apt-get; the
    /// release build; `lint` (unless --skip-lint); host unit tests
    /// (`cargo test --workspace --exclude tests`); the namespace integration tests, every suite
    /// in one binary (`cargo test --workspace --test suites -- --test-threads=1 [TEST_ARGS]`,
    /// with SNAT_BIN set to the built binary); then the translation suites again on the reply
    /// path that is not the default (SNAT_TEST_INGRESS=xdp: every agent runs with
    /// `--ingress xdp`), the other suites skipped by module (`… -- --test-threads=1 [TEST_ARGS]
    /// --skip blocks:: …`).
    Test(TestArgs),
    /// Install the tools the demo uses (ping, iproute2, procps) if missing, build, then run the
    /// demo (as root)
    Demo,
    /// Install the benchmark tools, build, then benchmark snat against no NAT and nftables (as root)
    ///
    /// Measures connection churn, many destinations, UDP packet rate, bulk TCP, the datapath's
    /// cost per packet (BPF_PROG_TEST_RUN) and memory and expiry at scale, with every contender
    /// interleaved in one run; writes target/bench/report.md, target/bench/churn.svg and
    /// target/bench/results.json (every sample). Takes about 10 minutes on two cores (`--quick`:
    /// about 2).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// A short run (one churn round, smaller bursts, two windows per contender): about 2 minutes
    #[arg(long)]
    quick: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Arguments for `snat run`
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

#[derive(Args)]
struct TestArgs {
    /// Skip the lint stage
    #[arg(long)]
    skip_lint: bool,
    /// Arguments for the integration test binary, after `--` (e.g. a test name filter)
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Build => build().map(drop),
        Task::Run(args) => run(args.args),
        Task::Lint => lint(),
        Task::Test(args) => test(&args),
        Task::Demo => demo(),
        Task::Bench(args) => bench(args.quick),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of xtask's own directory.
fn root() -> anyhow::Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask's manifest directory has no parent, so the workspace root is unknown")
}

/// Where `cargo build --release -p snat-user` puts the `snat` binary (absolute).
fn snat_bin(root: &Path) -> PathBuf {
    target_dir(root).join("release").join("snat")
}

/// cargo's target directory (absolute). A relative CARGO_TARGET_DIR is relative to the directory
/// cargo runs in: the root.
fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// `cargo xtask build`: the toolchain, then the release binary; returns its absolute path.
fn build() -> anyhow::Result<PathBuf> {
    toolchain::ensure()?;
    tools::ensure_build()?;
    let root = root()?;
    cmd::run(
        cmd::cargo()
            .args(["build", "--release", "-p", "snat-user"])
            .current_dir(root),
    )?;
    let bin = snat_bin(root);
    if !bin.is_file() {
        bail!(
            "the build succeeded but {} does not exist (is the target directory configured \
             elsewhere than CARGO_TARGET_DIR or {}?)",
            bin.display(),
            root.join("target").display()
        );
    }
    say(format_args!("built {}", bin.display()));
    Ok(bin)
}

/// `cargo xtask run`: build, then replace this process with `snat run <args>`.
fn run(args: Vec<OsString>) -> anyhow::Result<()> {
    cmd::require_root(
        "cargo xtask run",
        "it attaches eBPF programs",
        "sudo -E cargo xtask run -- …",
    )?;
    let bin = build()?;
    let mut snat = cmd::new(&bin);
    snat.arg("run").args(args);
    say(format_args!("$ {}", cmd::display(&snat)));
    // exec only returns on failure; on success snat's exit code is ours.
    let err = snat.exec();
    Err(err).with_context(|| format!("could not start {}", bin.display()))
}

/// `cargo xtask lint`: the toolchain (the host build compiles the eBPF object too), then the passes.
fn lint() -> anyhow::Result<()> {
    toolchain::ensure()?;
    tools::ensure_build()?;
    lint_passes()
}

/// Runs every lint pass, then fails naming the passes that failed.
fn lint_passes() -> anyhow::Result<()> {
    toolchain::ensure_nightly_component("clippy")?;
    let root = root()?;
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"])
        .current_dir(root);
    let mut clippy = cmd::cargo();
    clippy
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(root);
    let mut bpf_clippy = cmd::nightly_cargo();
    bpf_clippy
        .args([
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--", "-D", "warnings"])
        .current_dir(root.join("snat-ebpf"));

    let mut failed = Vec::new();
    for (name, mut pass) in [
        ("rustfmt", fmt),
        ("clippy (host)", clippy),
        ("clippy (snat-ebpf, BPF target)", bpf_clippy),
    ] {
        say(format_args!("lint: {name}"));
        if let Err(e) = cmd::run(&mut pass) {
            say(format_args!("lint: {name} FAILED: {e:#}"));
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    say("lint: all passes clean");
    Ok(())
}

/// The stages of `cargo xtask test`, in order.
const TEST_STAGES: [&str; 6] = [
    "test tools",
    "build",
    "lint",
    "unit tests",
    "integration tests",
    "other reply path",
];

/// The reply path `snat run` does not use by default (`--ingress`), and the suites run again on
/// it: the translation itself both ways (BPF_PROG_TEST_RUN and namespaces), ICMP errors and
/// path MTU, fragments, malformed packets, offloads, stop and restart, cluster fences. About two
/// minutes on two cores.
const OTHER_INGRESS: &str = "xdp";
// IPv6 takes the TC path either way: `test_run6` checks that XDP leaves it to TC; the `nat66`
// namespace suite runs once (the default pass), which keeps CI well under its half hour.
// Suites are modules of the `tests` crate's one test binary, declared in SUITES_ROOT.
const OTHER_INGRESS_SUITES: [&str; 10] = [
    "test_run",
    "test_run6",
    "correctness",
    "findings",
    "fragments",
    "malformed",
    "datapath",
    "stop",
    "restart",
    "cluster_gateway",
];

/// The integration tests' root, which declares every suite as a module (`mod <suite>;`).
const SUITES_ROOT: &str = "tests/tests/suites.rs";

/// The suites `suites_rs` (the text of [`SUITES_ROOT`]) declares.
fn suites(suites_rs: &str) -> Vec<&str> {
    suites_rs
        .lines()
        .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';'))
        .collect()
}

/// libtest arguments that leave only the suites `keep` of `all`: `--skip <suite>::` for every
/// other suite (the filter matches no other suite: a test in [`SUITES_ROOT`] checks it). Skips
/// rather than filters, so that filters in TEST_ARGS narrow these suites instead of adding to
/// them.
fn skip_all_but(all: &[&str], keep: &[&str]) -> anyhow::Result<Vec<String>> {
    if let Some(missing) = keep.iter().find(|suite| !all.contains(suite)) {
        bail!("{SUITES_ROOT} declares no suite `{missing}` (OTHER_INGRESS_SUITES names it)");
    }
    Ok(all
        .iter()
        .filter(|suite| !keep.contains(suite))
        .flat_map(|suite| ["--skip".to_owned(), format!("{suite}::")])
        .collect())
}

/// `cargo xtask test`: every stage in order, stopping at the first that fails.
fn test(args: &TestArgs) -> anyhow::Result<()> {
    cmd::require_root(
        "cargo xtask test",
        "the integration tests attach eBPF programs in network namespaces",
        "sudo -E cargo xtask test",
    )?;
    let root = root()?;
    let mut stages = Stages::default();
    stages.run("test tools", tools::ensure)?;
    let bin = stages.run("build", build)?;
    if args.skip_lint {
        stages.skip("lint");
    } else {
        stages.run("lint", lint_passes)?;
    }
    stages.run("unit tests", || {
        cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--exclude", "tests"])
                .current_dir(root),
        )
    })?;
    // `--workspace --test suites`, not `-p tests`: the same packages as the unit stage, so cargo
    // resolves the same features and reuses its snat-user (optimised, with the eBPF build)
    // instead of building it again for the tests crate (minutes on two cores).
    stages.run("integration tests", || {
        cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--test", "suites"])
                .args(["--", "--test-threads=1"])
                .args(&args.test_args)
                .env("SNAT_BIN", &bin)
                .current_dir(root),
        )
    })?;
    stages.run("other reply path", || {
        let path = root.join(SUITES_ROOT);
        let suites_rs = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let skips = skip_all_but(&suites(&suites_rs), &OTHER_INGRESS_SUITES)?;
        cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--test", "suites"])
                .args(["--", "--test-threads=1"])
                .args(&args.test_args)
                .args(skips)
                .env("SNAT_BIN", &bin)
                .env("SNAT_TEST_INGRESS", OTHER_INGRESS)
                .current_dir(root),
        )
    })?;
    stages.summary();
    Ok(())
}

/// The outcome of each test stage so far, for the summary.
#[derive(Default)]
struct Stages {
    outcomes: Vec<(&'static str, &'static str)>,
}

impl Stages {
    fn run<T>(
        &mut self,
        name: &'static str,
        stage: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        say(format_args!("=== test stage: {name}"));
        match stage() {
            Ok(value) => {
                self.outcomes.push((name, "ok"));
                Ok(value)
            }
            Err(e) => {
                self.outcomes.push((name, "FAILED"));
                self.summary();
                Err(e.context(format!("test stage `{name}` failed")))
            }
        }
    }

    fn skip(&mut self, name: &'static str) {
        say(format_args!("=== test stage: {name} (skipped)"));
        self.outcomes.push((name, "skipped"));
    }

    fn summary(&self) {
        let line = TEST_STAGES
            .iter()
            .map(|&stage| {
                let outcome = self
                    .outcomes
                    .iter()
                    .find(|&&(name, _)| name == stage)
                    .map_or("not run", |&(_, outcome)| outcome);
                format!("{stage} {outcome}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        say(format_args!("test summary: {line}"));
    }
}

/// `cargo xtask demo`: build, then hand over to the demo (the `demo` example), which removes
/// its namespaces before it exits.
fn demo() -> anyhow::Result<()> {
    cmd::require_root(
        "cargo xtask demo",
        "it attaches eBPF programs",
        "sudo -E cargo xtask demo",
    )?;
    tools::ensure_demo()?;
    let bin = build()?;
    exec_example("demo", &bin, &[])
}

/// `cargo xtask bench`: the benchmark tools, the build, then hand over to the benchmark (the
/// `bench` example, which links snat's library for the in-process datapath and scale
/// measurements). It writes `target/bench/report.md`, `target/bench/churn.svg` and
/// `target/bench/results.json` (every sample).
fn bench(quick: bool) -> anyhow::Result<()> {
    cmd::require_root(
        "cargo xtask bench",
        "it attaches eBPF programs and builds network namespaces",
        "sudo -E cargo xtask bench",
    )?;
    tools::ensure_bench()?;
    let bin = build()?;
    let out = target_dir(root()?).join("bench");
    let mut args: Vec<&OsStr> = vec!["--out".as_ref(), out.as_os_str()];
    if quick {
        args.push("--quick".as_ref());
    }
    exec_example("bench", &bin, &args)
}

/// Builds example `name` of the `tests` crate (so it shares the test harness's namespaces, agent
/// and traffic code) and replaces xtask with it, `SNAT_BIN` pointing at `snat`. Exec, not a
/// child: Ctrl-C (or SIGTERM, SIGHUP) then reaches the example, which removes every namespace
/// and nftables table it made and exits. Returns only if the example could not start.
fn exec_example(name: &str, snat: &Path, args: &[&OsStr]) -> anyhow::Result<()> {
    let root = root()?;
    cmd::run(cmd::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "tests",
        "--example",
        name,
    ]))?;
    let example = target_dir(root).join("release/examples").join(name);
    let mut command = cmd::new(&example);
    command.env("SNAT_BIN", snat).args(args);
    say(format_args!("$ {}", cmd::display(&command)));
    let err = command.exec();
    Err(err).with_context(|| format!("starting {}", example.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_reply_path_skips_every_suite_but_its_own() {
        let all = suites(include_str!("../../tests/tests/suites.rs"));
        let skips = skip_all_but(&all, &OTHER_INGRESS_SUITES).expect("every suite is declared");
        assert_eq!(skips.len(), 2 * (all.len() - OTHER_INGRESS_SUITES.len()));
        assert!(skips.contains(&"nat66::".to_owned()));
        assert!(!skips.contains(&"test_run::".to_owned()));
        assert!(skip_all_but(&all, &["no_such_suite"]).is_err());
    }
}
