//! `cargo xtask bench`: snat against plain routing and nftables masquerade, on one machine, in one
//! run, with a report.
//!
//! Builds one copy of the test harness's topology (two pods → node → router → server, all in
//! fresh network namespaces) per contender and measures the same workloads under each,
//! interleaved so drift hits them all alike (churn: round by round, the order rotating; packet
//! rate and bulk: short windows alternating between contenders that are all set up at once):
//!
//! - `none`: plain routing (the router gets a route back to the pods);
//! - `none again`: the same in a lab of its own, the control: its ratio to `none` is how far
//!   apart this run measures two contenders that do exactly the same;
//! - `nft masquerade`, `nft masquerade to :32768-65535`, `… fully-random`: an nftables table of
//!   our own in the node's namespace;
//! - `snat`: the agent on the node's uplink with `--port-range 32768:65535`.
//!
//! Workloads: churn of short TCP connections to one destination and to many server ports (and,
//! not compared, one more run of `snat` per round with its programs' time per connection taken
//! from the kernel's BPF statistics), UDP packet rate (one flow, many flows), bulk TCP (iperf3;
//! the same statistics over one more transfer of `snat`); a pod hammering an exhausted
//! destination with new flows against an established flow at the same rate (the node's softirq
//! and the agents' CPU, snat only); then, in this process, the datapath's cost per packet with
//! `BPF_PROG_TEST_RUN` (established flows, new mappings at 0–99.9 % occupancy, refused new flows
//! at 100 %), the floor under those rows (hand-assembled programs that only look up, insert
//! and rewrite, `floor.rs`), and scale (map memory, agent RSS and CPU, expiry sweep time with
//! 10 k–1 M mappings), and DNS-like one-shot queries (ports held: snat with and without its per-port
//! UDP timer, nftables masquerade with conntrack's timers). Writes `report.md`, `churn.svg` and `results.json` to `--out` (default
//! `target/bench`). Nothing here asserts a time: numbers only go into the report.
//!
//! Network safety: only namespaces, veths and nftables tables this process creates, named with
//! the harness's per-process prefix and deleted by exact name when done, also on failure, on a
//! panic in any part (caught: the part becomes a note in the report, the others still run) and on
//! Ctrl-C, SIGTERM or SIGHUP (drop guards; the signals only set a flag that every loop checks).
//! Every load loop is bounded in count and time.

#[path = "bench/churn.rs"]
mod churn;
#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/datapath.rs"]
mod datapath;
#[path = "bench/dns.rs"]
mod dns;
#[path = "bench/exhaustion.rs"]
mod exhaustion;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/lab.rs"]
mod lab;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/tools.rs"]
mod tools;
#[path = "bench/traffic.rs"]
mod traffic;

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lab::{Contender, Lab};
use report::{Machine, Results};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The signals that stop the run cleanly (the drop guards remove what it made): Ctrl-C, `kill`,
/// and the terminal going away.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Whether a stop signal (Ctrl-C, SIGTERM, SIGHUP) arrived: every loop stops early, cleanly.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once a stop signal arrived.
pub fn check() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Progress on stderr.
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

/// How much to measure: `--quick` or the full run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub bursts: usize,
    pub burst_conns: u64,
    pub burst_limit: Duration,
    pub client_threads_per_pod: usize,
    pub many_ports: u16,
    /// Alternating windows per contender for packet rate and bulk.
    pub rate_reps: usize,
    pub udp_secs: f64,
    pub bulk_secs: u32,
    pub dp_established_samples: usize,
    pub dp_new_samples: usize,
    /// First refusals (each searches the full range) timed.
    pub dp_first_refusals: usize,
    /// The exhausted-destination workload: windows of each kind, their length, the rate.
    pub exhaust_rounds: usize,
    pub exhaust_secs: f64,
    pub exhaust_rate: f64,
    pub scale_sizes: &'static [u32],
    /// DNS-like queries (`--dns-queries`, `--dns-secs`): how many, over how long.
    pub dns_queries: u32,
    pub dns_secs: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 1,
                bursts: 5,
                burst_conns: 2000,
                burst_limit: Duration::from_secs(4),
                client_threads_per_pod: 4,
                many_ports: 64,
                rate_reps: 2,
                udp_secs: 1.0,
                bulk_secs: 1,
                dp_established_samples: 5_000,
                dp_new_samples: 1_000,
                dp_first_refusals: 20,
                exhaust_rounds: 1,
                exhaust_secs: 5.0,
                exhaust_rate: 1000.0,
                scale_sizes: &[10_000, 100_000, 1_000_000],
                dns_queries: 2_000,
                dns_secs: 10,
            }
        } else {
            Self {
                quick,
                rounds: 4,
                bursts: 5,
                burst_conns: 8000,
                burst_limit: Duration::from_secs(5),
                client_threads_per_pod: 4,
                many_ports: 64,
                rate_reps: 8,
                udp_secs: 1.0,
                bulk_secs: 2,
                dp_established_samples: 20_000,
                dp_new_samples: 4_000,
                dp_first_refusals: 100,
                exhaust_rounds: 3,
                exhaust_secs: 5.0,
                exhaust_rate: 1000.0,
                scale_sizes: &[10_000, 100_000, 1_000_000],
                dns_queries: 20_000,
                dns_secs: 60,
            }
        }
    }
}

struct Args {
    quick: bool,
    out: PathBuf,
    only: Option<Vec<String>>,
    dns_queries: Option<u32>,
    dns_secs: Option<u32>,
}

/// A number flag's value within `lo..=hi`.
fn bounded(flag: &str, value: Option<String>, lo: u32, hi: u32) -> anyhow::Result<u32> {
    let v = value.with_context(|| format!("{flag} needs a number"))?;
    match v.parse::<u32>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => bail!("{flag} {v:?}: use a number from {lo} to {hi}"),
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        only: None,
        dns_queries: None,
        dns_secs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            "--only" => {
                let list = it.next().context(
                    "--only needs a list: net,net6,exhaustion,datapath,scale,dns,cluster",
                )?;
                args.only = Some(list.split(',').map(str::to_owned).collect());
            }
            "--dns-queries" => {
                args.dns_queries = Some(bounded(&a, it.next(), 1, dns::MAX_QUERIES)?);
            }
            "--dns-secs" => args.dns_secs = Some(bounded(&a, it.next(), 1, dns::MAX_SECS)?),
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--out DIR] [--only net,net6,exhaustion,datapath,scale,dns,cluster]\n\
                     \x20            [--dns-queries N (1-{}, default 20000, --quick 2000)]\n\
                     \x20            [--dns-secs S (1-{}, default 60, --quick 10)]\n\
                     Run it with `cargo xtask bench [--quick]` (as root).",
                    dns::MAX_QUERIES,
                    dns::MAX_SECS
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn main() {
    for sig in STOP_SIGNALS {
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run(&args)));
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(Ok(())) => {
            println!(
                "\nbench: done in {:.0} s; report in {}",
                secs,
                args.out.join("report.md").display()
            );
        }
        Ok(Err(e)) => {
            eprintln!(
                "\nbench: stopped after {secs:.0} s: {e:#}; everything it created is removed"
            );
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!(
                "\nbench: failed after {secs:.0} s (see above); everything it created is removed"
            );
            std::process::exit(1);
        }
    }
}

fn wants(only: Option<&Vec<String>>, part: &str) -> bool {
    only.is_none_or(|l| l.iter().any(|p| p == part))
}

fn run(args: &Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark must run as root: `sudo -E cargo xtask bench`");
    }
    for &(tool, package) in tools::BENCH_TOOLS {
        if which(tool).is_none() {
            bail!("{tool} is not installed (package {package}): run the benchmark with `cargo xtask bench`, which installs it");
        }
    }
    let mut plan = Plan::new(args.quick);
    plan.dns_queries = args.dns_queries.unwrap_or(plan.dns_queries);
    plan.dns_secs = args.dns_secs.unwrap_or(plan.dns_secs);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut command = if args.quick {
        "cargo xtask bench --quick".to_owned()
    } else {
        "cargo xtask bench".to_owned()
    };
    if let Some(only) = &args.only {
        command.push_str(&format!(" (bench --only {})", only.join(",")));
    }
    let mut results = Results::new(Machine::describe(), command, plan);
    let started = Instant::now();
    let only = args.only.as_ref();

    let outcome = (|| -> anyhow::Result<()> {
        // Every part: a failure or a panic (a namespace, the labs, the engine, the agent) becomes
        // a note, and what was measured so far still goes into the report.
        if wants(only, "net") {
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| network(&plan, &mut results)));
            settle_failure(run, &mut results, "network workloads: stopped early")?;
        }
        check()?;
        if wants(only, "net6") {
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| network6(&plan, &mut results)));
            settle_failure(run, &mut results, "IPv6 churn: stopped early")?;
        }
        check()?;
        if wants(only, "exhaustion") {
            say("an exhausted destination: refused new flows against an established flow");
            let mut measured = None;
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                exhaustion::run(&plan, &mut measured)
            }));
            results.exhaustion = measured;
            settle_failure(run, &mut results, "exhausted destination: stopped early")?;
        }
        check()?;
        if wants(only, "datapath") {
            say("datapath cost (BPF_PROG_TEST_RUN)");
            let mut measured = None;
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                measured = Some(datapath::run_in_namespace(&plan)?);
                Ok(())
            }));
            settle_failure(run, &mut results, "datapath cost: not measured")?;
            results.datapath = measured;
        }
        check()?;
        if wants(only, "scale") {
            say("scale (map memory, agent RSS, expiry)");
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let lab = Lab::new()?;
                scale::run(&plan, &lab, &mut |row| results.scale.push(row))
            }));
            settle_failure(run, &mut results, "scale: stopped early")?;
        }
        check()?;
        if wants(only, "dns") {
            say("DNS-like one-shot queries: ports held");
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                dns::run(&plan, &mut |r| results.dns.push(r))
            }));
            settle_failure(run, &mut results, "DNS queries: stopped early")?;
        }
        check()?;
        if wants(only, "cluster") {
            say("cluster mode: three nodes share one NAT IP through snat gateway");
            let mut measured = cluster::Cluster::default();
            let run =
                std::panic::catch_unwind(AssertUnwindSafe(|| cluster::run(&plan, &mut measured)));
            results.cluster = Some(measured);
            settle_failure(run, &mut results, "cluster mode: stopped early")?;
        }
        check()
    })();
    results.elapsed = started.elapsed();
    if let Err(e) = &outcome {
        results.note(format!(
            "the run stopped early: {e:#}; the tables show what was measured"
        ));
    }
    results.write(&args.out)?;
    say(format_args!(
        "wrote {}, {} and {}",
        args.out.join("report.md").display(),
        args.out.join("churn.svg").display(),
        args.out.join("results.json").display()
    ));
    outcome
}

/// The network workloads: a lab per contender; churn with every contender once per round (the
/// order rotating between rounds), then packet rate and bulk in alternating windows.
fn network(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let mut labs = Vec::new();
    for _ in Contender::ALL {
        labs.push(Lab::new()?);
    }
    say(format_args!(
        "{} labs ready (2 pods -> node -> router -> server each): {}",
        labs.len(),
        labs.iter()
            .map(|l| l.topo.prefix.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    churn_rounds(plan, &mut labs, &Contender::ALL, "churn", true, results)?;
    check()?;
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
        traffic::rate_phase(plan, &mut labs, results)
    }));
    settle_failure(run, results, "packet rate and bulk")
}

/// Churn with every contender once per round, one at a time, the order rotating by one each
/// round, so the machine's drift hits all alike, and the labs too: in round r contender k runs
/// in `labs[(k + r) % n]` (the labs are alike, and each is set up for one contender at a time),
/// so no contender keeps one lab's quirks. (Rotating did not narrow the control's spread: plain
/// routing in two labs came out 1.02×–1.14× apart on every burst of one full run with fixed
/// labs and 1.06×–1.16× in a run with rotated ones; the spread is from run to run. It costs
/// nothing and takes the lab out of the question.) With `timed`, every round ends with one more
/// run of `snat` whose programs are timed (not compared, see [`traffic::churn_program_time`]).
fn churn_rounds(
    plan: &Plan,
    labs: &mut [Lab],
    contenders: &[Contender],
    what: &str,
    timed: bool,
    results: &mut Results,
) -> anyhow::Result<()> {
    let n = contenders.len();
    for round in 0..plan.rounds {
        for i in 0..n {
            check()?;
            let k = (i + round) % n;
            let c = contenders[k];
            let lab = &mut labs[(k + round) % n];
            say(format_args!(
                "{what}, round {}/{}: {} (lab {})",
                round + 1,
                plan.rounds,
                c.label(),
                lab.topo.prefix
            ));
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                traffic::churn_run(plan, lab, c, results, traffic::ChurnRun::Compared)
            }));
            settle_failure(
                run,
                results,
                &format!("{what} round {} {}", round + 1, c.label()),
            )?;
        }
        let snat = contenders.iter().position(|&c| c == Contender::Snat);
        if let (true, Some(k)) = (timed, snat) {
            check()?;
            let lab = &mut labs[(k + round) % n];
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                traffic::churn_program_time(plan, lab, results)
            }));
            settle_failure(
                run,
                results,
                &format!("{what} round {}: snat's program time", round + 1),
            )?;
        }
    }
    Ok(())
}

/// IPv6 (NAT66): churn to one destination with the IPv6 contenders, each in a dual-stack lab
/// of its own, rounds as for IPv4.
fn network6(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let mut labs = Vec::new();
    for _ in Contender::ALL6 {
        labs.push(Lab::new_dual_stack()?);
    }
    churn_rounds(
        plan,
        &mut labs,
        &Contender::ALL6,
        "IPv6 churn",
        false,
        results,
    )
}

/// Turns a failed (or panicked) part into a note and carries on, unless interrupted. Whatever the
/// part created is gone by then: its drop guards ran while the error returned or the panic
/// unwound.
fn settle_failure(
    run: std::thread::Result<anyhow::Result<()>>,
    results: &mut Results,
    what: &str,
) -> anyhow::Result<()> {
    match run {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            check()?;
            results.note(format!("{what}: {e:#}"));
            Ok(())
        }
        Err(panic) => {
            check()?;
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            results.note(format!("{what}: failed: {msg}"));
            Ok(())
        }
    }
}

/// Finds `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
