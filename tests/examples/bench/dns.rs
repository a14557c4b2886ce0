//! DNS-like queries: ports held (issue 15). A pod sends `--dns-queries` one-shot queries (default
//! 20,000), each from a fresh source port, paced evenly over `--dns-secs` (default 60 s), to a
//! responder on the server's port 53 that answers each once; every second the node's mappings
//! are counted (snat: its UDP mappings from `snat stats`; nftables: the node's conntrack entries,
//! `conntrack -C`). Reported: queries answered, mappings held at the peak and right after the
//! last query. Contenders, each in a fresh lab: snat with its default per-port timer
//! (`--udp-timeout-for 53=30s`), snat without per-port timers (`none`: every query held for
//! `--udp-timeout`, 5 m, as before), and nftables `masquerade` with conntrack's own timers.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tests::{
    agent::Agent,
    topo::{POD_CIDR, SERVER},
    traffic::UdpServer,
};

use crate::{
    lab::{ns_command, run_bounded, Contender, Lab, PORT_RANGE},
    say, Plan,
};

/// Bounds of `--dns-queries` and `--dns-secs`.
pub const MAX_QUERIES: u32 = 50_000;
pub const MAX_SECS: u32 = 600;
/// Source ports of the queries: `FIRST_PORT + i`, outside the NAT range and below it.
const FIRST_PORT: u16 = 10_000;

/// One contender's run.
#[derive(Clone, Debug)]
pub struct Run {
    pub contender: &'static str,
    /// The timer a query's mapping gets, as the contender states it.
    pub timer: &'static str,
    pub timer_secs: f64,
    pub sent: u64,
    pub answered: u64,
    pub secs: f64,
    /// Mappings (snat) or conntrack entries (nftables) at the peak and after the last query.
    pub peak: u64,
    pub end: u64,
}

#[derive(Clone, Copy)]
enum Who {
    Snat(&'static str),
    Nft,
}

const CONTENDERS: [(&str, &str, f64, Who); 3] = [
    ("snat", "53=30s (default)", 30.0, Who::Snat("53=30s")),
    (
        "snat, no per-port timer",
        "--udp-timeout 5m",
        300.0,
        Who::Snat("none"),
    ),
    (
        "nft masquerade",
        "conntrack: 30 s (120 s if still active after 2 s)",
        30.0,
        Who::Nft,
    ),
];

/// Sends `n` queries from pod `pod` at `rate` per second, each from the next source port,
/// waiting at most 200 ms for its answer; stops at `deadline`. Returns (sent, answered).
fn send_queries(pod: std::net::Ipv4Addr, n: u32, secs: f64, deadline: Instant) -> (u64, u64) {
    let to = SocketAddrV4::new(SERVER, 53);
    let started = Instant::now();
    let (mut sent, mut answered) = (0, 0);
    let mut buf = [0u8; 64];
    for i in 0..n {
        if crate::interrupted() || Instant::now() > deadline {
            break;
        }
        let at = started + Duration::from_secs_f64(secs * f64::from(i) / f64::from(n));
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let port = FIRST_PORT + (i % u32::from(u16::MAX - FIRST_PORT)) as u16;
        let Ok(sock) = UdpSocket::bind(SocketAddrV4::new(pod, port)) else {
            continue;
        };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        if sock.send_to(b"q", to).is_ok() {
            sent += 1;
            if sock.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
    }
    (sent, answered)
}

/// What the contender holds now.
fn held(lab: &Lab, agent: Option<&Agent>) -> anyhow::Result<u64> {
    match agent {
        Some(a) => Ok(a.mappings("udp")),
        None => {
            let out = run_bounded(
                ns_command(&lab.topo.node, &["conntrack", "-C"]),
                None,
                Duration::from_secs(10),
            )?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .context("conntrack -C printed no count")
        }
    }
}

pub fn run(plan: &Plan, push: &mut dyn FnMut(Run)) -> anyhow::Result<()> {
    for (contender, timer, timer_secs, who) in CONTENDERS {
        crate::check()?;
        let lab = Lab::new()?;
        let _dns = UdpServer::start(&lab.topo.server, SocketAddrV4::new(SERVER, 53));
        let (agent, _nft) = match who {
            Who::Snat(ports) => (
                Some(Agent::start(
                    &lab.topo.node,
                    &lab.topo.uplink,
                    &[
                        "--internal",
                        POD_CIDR,
                        "--port-range",
                        PORT_RANGE,
                        "--udp-timeout-for",
                        ports,
                    ],
                )),
                None,
            ),
            Who::Nft => (None, Some(lab.activate(Contender::NftMasq)?)),
        };
        say(format_args!(
            "DNS: {contender}: {} queries over {} s",
            plan.dns_queries, plan.dns_secs
        ));
        let secs = f64::from(plan.dns_secs);
        let deadline = Instant::now() + Duration::from_secs_f64(secs * 1.5 + 10.0);
        let (n, pod) = (plan.dns_queries, lab.topo.pods[0].addr);
        let started = Instant::now();
        let sender = lab.topo.pods[0]
            .ns
            .spawn(move || send_queries(pod, n, secs, deadline));
        let mut peak = 0;
        while !sender.is_finished() {
            std::thread::sleep(Duration::from_secs(1));
            peak = peak.max(held(&lab, agent.as_ref())?);
        }
        let (sent, answered) = sender
            .join()
            .map_err(|_| anyhow::anyhow!("the query sender panicked"))?;
        let took = started.elapsed().as_secs_f64();
        let end = held(&lab, agent.as_ref())?;
        crate::check()?;
        if sent == 0 {
            bail!("{contender}: no query was sent");
        }
        let run = Run {
            contender,
            timer,
            timer_secs,
            sent,
            answered,
            secs: took,
            peak: peak.max(end),
            end,
        };
        say(format_args!(
            "  {contender}: {answered} of {sent} answered in {took:.0} s; held at peak {}, at the end {}",
            run.peak, run.end
        ));
        push(run);
    }
    Ok(())
}
