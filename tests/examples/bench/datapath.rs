//! The datapath's cost per packet, from `BPF_PROG_TEST_RUN` on the loaded programs (nothing
//! attached; the engine is loaded in a namespace of our own so that no address of the machine
//! counts as the NAT IP's).
//!
//! The kernel's `repeat` runs the program again on the *same* socket buffer, which the first run
//! has already translated: from the second run on, egress sees the NAT IP as the source and
//! passes the packet untouched. So `repeat` only measures paths that leave the packet as it was
//! (the pass-through row); translating paths are timed one run per call (`repeat = 1`, the
//! kernel's own per-run duration, no syscall in it) over many calls, and the cost of the
//! kernel's clock reads around a single run is measured (pass-through at `repeat = 1` minus at
//! `repeat = 1,000,000`) and shown subtracted.
//!
//! New mappings: the destination's range (32768:65535, 32,768 ports) is prefilled to 0, 50, 90,
//! 99 and 99.9 % with real mappings, SYNs from other pods through the egress program (so the
//! claims, the use counts and the free-port index are what traffic would have left); every
//! sample is a SYN with a fresh forward key whose source port lies outside the range (so the
//! pod's own port cannot be kept: random tries, the index once the destination is hot, then the
//! walk), and its mapping is released right after with the kernel's release program, so
//! occupancy stays constant.

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context as _};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use clap::Parser as _;
use snat_common::{
    flow::{proto, release_result},
    Counter, DEFAULT_MAX_MAPPINGS, PROG_EGRESS, PROG_INGRESS,
};
use snat_user::{
    datapath::Engine,
    settings::{
        cli::{Cli, Command},
        Interface, Settings,
    },
};
use tests::packets::{self, ACK, SYN, SYN_ACK};

use crate::Plan;

const PASS: i32 = -1;
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const RANGE_LEN: u32 = 32768;
pub const OCCUPANCY: [f64; 5] = [0.0, 0.5, 0.9, 0.99, 0.999];
const PASS_REPEAT: u32 = 1_000_000;

/// One measured path.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    /// Fraction of the destination's range claimed (new mappings only).
    pub occupancy: Option<f64>,
    /// Runs per call (`repeat`).
    pub repeat: u32,
    pub samples: usize,
    /// Kernel-reported ns per run: median, 10th and 90th percentile (raw).
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    /// The median less the clock-read cost of a single timed run (repeat = 1 rows only).
    pub net: f64,
    /// Share of new mappings that needed the walk of the whole range.
    pub scan_share: Option<f64>,
    /// Samples that did not produce a mapping (should be 0).
    pub refused: usize,
    /// Mean time of the allocation alone, by the datapath's own timer (`SNAT_ALLOC_NS`).
    pub alloc_mean: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct Datapath {
    /// The tables' size (`--max-mappings`): snat's default, as in production.
    pub max_mappings: u32,
    /// Cost of the kernel's clock reads around one timed run (ns), subtracted in `Row::net`.
    pub timer_overhead: f64,
    pub rows: Vec<Row>,
}

/// Loads the engine as `snat run` would, with tables for `max` mappings; nothing attached.
pub fn load_engine(max: u32) -> anyhow::Result<Engine> {
    let line = format!(
        "snat run --iface bench0 --internal 10.1.0.0/16 --nat-ip {NAT} --port-range 32768:65535 --max-mappings {max}"
    );
    let cli = Cli::try_parse_from(line.split_whitespace()).map_err(|e| anyhow!("{e}"))?;
    let Command::Run(args) = cli.command else {
        bail!("`snat run` did not parse as run");
    };
    let iface = Interface {
        name: "bench0".into(),
        index: 0,
        ipv4: vec![],
    };
    let settings = Settings::validate(&args, iface).map_err(|e| anyhow!("{e}"))?;
    Ok(Engine::load(&settings)?)
}

/// Runs program `name` on `frame` `repeat` times in one call: (verdict, ns per run, output).
fn run(
    engine: &mut Engine,
    name: &str,
    frame: &[u8],
    repeat: u32,
    out: &mut [u8],
) -> anyhow::Result<(i32, f64, usize)> {
    let prog: &SchedClassifier = engine
        .ebpf_mut()
        .program(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?;
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
    Ok((
        r.return_value as i32,
        r.duration.as_nanos() as f64,
        r.data_size_out as usize,
    ))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn row(name: &str, mut ns: Vec<f64>, overhead: f64) -> Row {
    ns.sort_by(f64::total_cmp);
    let median = percentile(&ns, 0.5);
    Row {
        name: name.to_owned(),
        occupancy: None,
        repeat: 1,
        samples: ns.len(),
        median,
        p10: percentile(&ns, 0.1),
        p90: percentile(&ns, 0.9),
        net: (median - overhead).max(0.0),
        scan_share: None,
        refused: 0,
        alloc_mean: None,
    }
}

fn counter(engine_counters: &snat_user::datapath::Counters, c: Counter) -> anyhow::Result<u64> {
    Ok(engine_counters
        .read()?
        .into_iter()
        .find(|(k, _)| *k == c)
        .map_or(0, |(_, v)| v))
}

/// Measures everything; runs on the calling thread (which should be in a namespace of ours).
/// The tables are sized as `snat run` sizes them by default (`--max-mappings`, a million).
pub fn measure(plan: &Plan) -> anyhow::Result<Datapath> {
    let max_mappings = DEFAULT_MAX_MAPPINGS;
    let mut engine = load_engine(max_mappings)?;
    let counters = engine.take_counters()?;
    let tables = engine.take_tables()?;
    let mut out = vec![0u8; 2048];
    let n_est = plan.dp_established_samples;

    // The clock: pass-through (not IPv4) one run per call, and a million runs in one call.
    let mut arp = packets::udp((POD, 1), (REMOTE, 2), b"");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut single = Vec::with_capacity(n_est);
    for _ in 0..n_est {
        single.push(run(&mut engine, PROG_EGRESS, &arp, 1, &mut out)?.1);
    }
    single.sort_by(f64::total_cmp);
    let mut repeated = Vec::new();
    for _ in 0..5 {
        repeated.push(run(&mut engine, PROG_EGRESS, &arp, PASS_REPEAT, &mut out)?.1);
    }
    repeated.sort_by(f64::total_cmp);
    let overhead = (percentile(&single, 0.5) - repeated[2]).max(0.0);
    let mut rows = Vec::new();

    // Pass-through of the node's own traffic: the packet is left as it is, so `repeat` works.
    let own = packets::tcp((NAT, 40000), (REMOTE, 80), ACK, b"");
    let mut own_ns = Vec::new();
    for _ in 0..5 {
        crate::check()?;
        own_ns.push(run(&mut engine, PROG_EGRESS, &own, PASS_REPEAT, &mut out)?.1);
    }
    let mut r = row("egress, pass-through (the node's own packet)", own_ns, 0.0);
    r.repeat = PASS_REPEAT;
    r.net = r.median;
    rows.push(r);

    // An established flow, both directions.
    let (ret, _, len) = run(
        &mut engine,
        PROG_EGRESS,
        &packets::tcp((POD, 1000), (REMOTE, 80), SYN, b""),
        1,
        &mut out,
    )?;
    if ret != PASS || len < 36 {
        bail!("the first SYN was not translated (verdict {ret})");
    }
    let nat_port = u16::from_be_bytes([out[34], out[35]]);
    let (ret, _, _) = run(
        &mut engine,
        PROG_INGRESS,
        &packets::tcp((REMOTE, 80), (NAT, nat_port), SYN_ACK, b""),
        1,
        &mut out,
    )?;
    if ret != PASS {
        bail!("the SYN-ACK was not translated (verdict {ret})");
    }
    for (name, prog, frame) in [
        (
            "egress, established TCP (64-byte ACK)",
            PROG_EGRESS,
            packets::tcp((POD, 1000), (REMOTE, 80), ACK, b""),
        ),
        (
            "ingress, established TCP (64-byte ACK)",
            PROG_INGRESS,
            packets::tcp((REMOTE, 80), (NAT, nat_port), ACK, b""),
        ),
    ] {
        crate::check()?;
        let mut ns = Vec::with_capacity(n_est);
        for _ in 0..n_est {
            let (ret, d, _) = run(&mut engine, prog, &frame, 1, &mut out)?;
            if ret != PASS {
                bail!("{name}: verdict {ret}");
            }
            ns.push(d);
        }
        rows.push(row(name, ns, overhead));
    }

    // New mappings towards one destination whose range is more and more claimed.
    // The established flow above holds one port towards the destination already.
    let mut claimed: u32 = 1;
    let mut src_port: u32 = 0;
    for occupancy in OCCUPANCY {
        crate::check()?;
        let want = (occupancy * f64::from(RANGE_LEN)).round() as u32;
        while claimed < want {
            // Pods 10.1.200.0 and up, 64 flows each, source ports below the range.
            let n = claimed;
            let pod = Ipv4Addr::new(10, 1, 200 + (n >> 14) as u8, (n >> 6) as u8);
            let sport = 1024 + (n & 0x3fff) as u16;
            let frame = packets::tcp((pod, sport), (REMOTE, 80), SYN, b"");
            let (ret, _, _) = run(&mut engine, PROG_EGRESS, &frame, 1, &mut out)?;
            if ret != PASS {
                bail!("prefilling: mapping {n} of the destination refused (verdict {ret})");
            }
            claimed += 1;
        }
        let scans_before = counter(&counters, Counter::AllocScan)?;
        let hist_before = counters.alloc_histogram()?;
        let mut ns = Vec::with_capacity(plan.dp_new_samples);
        let mut refused = 0;
        for _ in 0..plan.dp_new_samples {
            // A fresh forward key each time, its source port outside the range.
            src_port = (src_port + 1) % 31_000;
            let sport = 1024 + src_port as u16;
            let frame = packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
            let (ret, d, _) = run(&mut engine, PROG_EGRESS, &frame, 1, &mut out)?;
            if ret != PASS {
                refused += 1;
                continue;
            }
            ns.push(d);
            let key = packets::flow_key(proto::TCP, (POD, sport), (REMOTE, 80));
            let mut entry = [tables.release_entry(key).context("the new mapping")?];
            engine.release(&mut entry)?;
            if entry[0].result != release_result::RELEASED {
                bail!("releasing a benchmark mapping returned {}", entry[0].result);
            }
        }
        let scans = counter(&counters, Counter::AllocScan)? - scans_before;
        let hist = counters.alloc_histogram()?;
        let timed = hist.count - hist_before.count;
        let name = format!(
            "egress, new TCP mapping, range {:.1} % claimed",
            occupancy * 100.0
        );
        let mut r = row(&name, ns, overhead);
        r.occupancy = Some(occupancy);
        r.scan_share = Some(scans as f64 / r.samples.max(1) as f64);
        r.refused = refused;
        r.alloc_mean =
            (timed > 0).then(|| (hist.sum_ns - hist_before.sum_ns) as f64 / timed as f64);
        rows.push(r);
        crate::say(format_args!(
            "  {name}: median {:.0} ns (net {:.0} ns), p90 {:.0} ns, walks {:.0} %",
            rows.last().map_or(0.0, |r| r.median),
            rows.last().map_or(0.0, |r| r.net),
            rows.last().map_or(0.0, |r| r.p90),
            rows.last().and_then(|r| r.scan_share).unwrap_or(0.0) * 100.0
        ));
    }
    Ok(Datapath {
        max_mappings,
        timer_overhead: overhead,
        rows,
    })
}

/// Measures in a namespace of our own (removed afterwards).
pub fn run_in_namespace(plan: &Plan) -> anyhow::Result<Datapath> {
    let ns = tests::netns::Netns::new(&format!("{}-dp", tests::netns::unique_prefix()));
    let plan = *plan;
    crate::lab::in_netns(&ns, move || measure(&plan))
}
