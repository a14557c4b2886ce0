//! Cluster mode (issue 14): three nodes share ONE NAT IP behind a gateway namespace running
//! `snat gateway`, with etcd (one member, on tmpfs) in a namespace of its own and a server behind
//! the gateway; port range 32768:65535 cut into 512 blocks of 64. Three figures, each in a lab of
//! its own:
//!
//! 1. **Pressure → usable new block**, as a pod sees it: a pod sends UDP probes to one server port
//!    back to back, each from a fresh source port (so each takes a port of the node's blocks), and
//!    waits 2 ms for each answer. When the node's open blocks have no port left, probes go
//!    unanswered (held back, `drop_awaiting_block`) until the next block is claimed in etcd,
//!    applied by the gateway and opened; the time from the first unanswered probe to the first
//!    answered one after it is one sample (2 ms resolution). A block claimed before the open ones
//!    ran out (the headroom) costs the pod nothing: counted apart.
//! 2. **Claims per second, three nodes contending**: all three pods probe at once for a fixed
//!    window; the nodes' successful claims (and claims lost to another node) over the window.
//! 3. **Connections per second while blocks are being claimed**: the three pods open TCP
//!    connections at once and hold them, in two labs set up side by side: one whose nodes start
//!    from one block each (every further block is claimed on the way), one whose nodes hold
//!    enough blocks from the start (`--min-blocks`). Rounds alternate between the two (the order
//!    rotating), so the machine's drift hits both alike; between rounds the connections close
//!    and the growing lab's blocks go back (cool-down 2 s). The first over the second is the
//!    cost of growing on demand.
//!
//! The topology is the test harness's (`tests::cluster`, with a router hop of MTU 1280 behind the
//! gateway). Network safety: the harness's namespaces and veths only (its per-process prefix), removed on
//! drop; etcd and the gateway run inside them. Every loop is bounded in count and time.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::Value;
use tests::{
    agent::Agent,
    cluster::{Cluster as Topology, SERVER},
    netns::Netns,
    traffic::{wait_for, TcpClient, TcpServer, UdpServer},
};

use crate::{say, Plan};
const RANGE: &str = "32768:65535";
const BLOCK: u32 = 64;
/// Source ports of the probes: `FIRST_PORT + i`, below the range.
const FIRST_PORT: u16 = 1024;
const MAX_PROBES: u32 = 9000;

/// What the section measured.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Pressure → usable block, ms, one per block the pod had to wait for.
    pub waits_ms: Vec<f64>,
    /// Blocks claimed before the pod ran out (no wait).
    pub no_wait: u64,
    /// Probes sent and answered in part 1.
    pub probes: (u64, u64),
    /// Part 2: successful claims per node, claims lost to another node, the window (s).
    pub claims: Vec<u64>,
    pub claims_lost: u64,
    pub claim_secs: f64,
    /// Part 3: connections per node; seconds for all of them per round, while growing and with
    /// the blocks held; blocks claimed and packets held back per growing round.
    pub conns: u64,
    pub growing_secs: Vec<f64>,
    pub held_secs: Vec<f64>,
    pub grown_blocks: Vec<u64>,
    pub held_back: u64,
}

/// Three nodes, the gateway, etcd and the server (the test harness's topology,
/// `tests::cluster`); the agents drop first.
struct Lab {
    agents: Vec<Agent>,
    c: Topology,
}

impl Lab {
    /// The lab with `cooldown` (`--block-cooldown`) and `min_blocks` (`--min-blocks`) on every
    /// node.
    fn new(cooldown: &str, min_blocks: u16) -> anyhow::Result<Self> {
        let mut c = Topology::new(3, 1);
        let min = min_blocks.to_string();
        let flags = [
            "--block-cooldown",
            cooldown,
            "--min-blocks",
            &min,
            "--tcp-fin-timeout",
            "1s",
        ];
        // The first node writes the geometry the gateway waits for; the others start once it
        // has registered, so every claim waits for it.
        let mut agents = vec![c.start_agent_on(0, RANGE, 65536, &flags)];
        c.start_gateway(&[]);
        agents.push(c.start_agent_on(1, RANGE, 65536, &flags));
        agents.push(c.start_agent_on(2, RANGE, 65536, &flags));
        let lab = Self { agents, c };
        // Every node at its minimum before anything is measured.
        lab.settle(u64::from(min_blocks))?;
        Ok(lab)
    }

    fn server(&self) -> &Netns {
        &self.c.server
    }

    /// Waits until no node maps a connection and each holds exactly `blocks` open blocks.
    fn settle(&self, blocks: u64) -> anyhow::Result<()> {
        wait_for(Duration::from_secs(30), || {
            self.agents
                .iter()
                .all(|a| a.mappings("tcp") == 0 && open_blocks(a) == blocks)
                .then_some(())
        })
        .with_context(|| {
            let held: Vec<u64> = self.agents.iter().map(open_blocks).collect();
            format!("the nodes did not settle at {blocks} blocks each within 30 s: {held:?}")
        })
    }
}

fn cluster(a: &Agent) -> Value {
    a.json("status", &[])["cluster"].clone()
}

fn open_blocks(a: &Agent) -> u64 {
    cluster(a)["blocks"].as_array().map_or(0, |b| {
        b.iter().filter(|b| b["state"] == "open").count() as u64
    })
}

/// Claims of the node by result.
fn claims(a: &Agent, result: &str) -> u64 {
    cluster(a)["claims"][result].as_u64().unwrap_or(0)
}

/// One probe: sent at, answered.
type Probe = (Instant, bool);

/// Probes from `pod` to the server's port 9000 back to back, each from the next source port,
/// waiting 2 ms for the answer; stops after `want_waits` waits (a run of unanswered probes
/// ended by an answered one), `max` probes, or at `deadline`.
fn probe(pod: Ipv4Addr, want_waits: usize, max: u32, deadline: Instant) -> Vec<Probe> {
    let to = SocketAddrV4::new(SERVER, 9000);
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    let (mut waits, mut waiting) = (0, false);
    for i in 0..max {
        if crate::interrupted() || Instant::now() > deadline || waits >= want_waits {
            break;
        }
        let Ok(sock) = UdpSocket::bind(SocketAddrV4::new(pod, FIRST_PORT + i as u16)) else {
            continue;
        };
        let _ = sock.set_read_timeout(Some(Duration::from_millis(2)));
        let at = Instant::now();
        if sock.send_to(b"p", to).is_err() {
            continue;
        }
        let answered = sock.recv_from(&mut buf).is_ok();
        if !answered {
            waiting = true;
        } else if waiting {
            waiting = false;
            waits += 1;
        }
        out.push((at, answered));
    }
    out
}

/// The waits in `probes`: first unanswered probe → first answered one after it, ms.
fn waits(probes: &[Probe]) -> Vec<f64> {
    let mut out = Vec::new();
    let mut since = None;
    for &(at, answered) in probes {
        match (answered, since) {
            (false, None) => since = Some(at),
            (true, Some(t0)) => {
                out.push(at.duration_since(t0).as_secs_f64() * 1e3);
                since = None;
            }
            _ => {}
        }
    }
    out
}

/// Opens `n` TCP connections from each pod at once (a thread per pod); returns them and the
/// seconds until the last one was up.
fn connect_all(lab: &Lab, n: u64) -> anyhow::Result<(Vec<TcpClient>, f64)> {
    let to = SocketAddrV4::new(SERVER, 8080);
    let started = Instant::now();
    let handles: Vec<_> = lab
        .c
        .nodes
        .iter()
        .map(|node| {
            node.pod.spawn(move || {
                (0..n)
                    .map(|_| TcpClient::connect(to, Duration::from_secs(10)))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        let conns = h
            .join()
            .map_err(|_| anyhow::anyhow!("a pod's connections panicked"))?
            .context("a connection failed")?;
        all.extend(conns);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

pub fn run(plan: &Plan, out: &mut Cluster) -> anyhow::Result<()> {
    let samples = if plan.quick { 8 } else { 30 };
    // 1. Pressure → usable block, one node growing (the others idle at their minimum).
    {
        let lab = Lab::new("20s", 1)?;
        let _udp = UdpServer::start(lab.server(), SocketAddrV4::new(SERVER, 9000));
        let before = open_blocks(&lab.agents[0]);
        let pod = lab.c.nodes[0].pod_addr;
        let deadline = Instant::now() + Duration::from_secs(60);
        let probes = lab.c.nodes[0]
            .pod
            .run(move || probe(pod, samples, MAX_PROBES, deadline));
        let grown = open_blocks(&lab.agents[0]).saturating_sub(before);
        out.waits_ms = waits(&probes);
        out.no_wait = grown.saturating_sub(out.waits_ms.len() as u64);
        out.probes = (
            probes.len() as u64,
            probes.iter().filter(|p| p.1).count() as u64,
        );
        say(format_args!(
            "  pressure → usable block: {} waits, {} blocks without one ({} of {} probes answered)",
            out.waits_ms.len(),
            out.no_wait,
            out.probes.1,
            out.probes.0
        ));
        crate::check()?;
    }
    // 2. Three nodes claiming at once.
    {
        let lab = Lab::new("20s", 1)?;
        let _udp = UdpServer::start(lab.server(), SocketAddrV4::new(SERVER, 9000));
        let before: Vec<(u64, u64)> = lab
            .agents
            .iter()
            .map(|a| (claims(a, "ok"), claims(a, "taken")))
            .collect();
        let secs = if plan.quick { 3.0 } else { 8.0 };
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(secs);
        let handles: Vec<_> = lab
            .c
            .nodes
            .iter()
            .map(|n| {
                let pod = n.pod_addr;
                n.pod
                    .spawn(move || probe(pod, usize::MAX, MAX_PROBES, deadline))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a pod's probes panicked"))?;
        }
        out.claim_secs = started.elapsed().as_secs_f64();
        out.claims = lab
            .agents
            .iter()
            .zip(&before)
            .map(|(a, b)| claims(a, "ok").saturating_sub(b.0))
            .collect();
        out.claims_lost = lab
            .agents
            .iter()
            .zip(&before)
            .map(|(a, b)| claims(a, "taken").saturating_sub(b.1))
            .sum();
        let blocks = lab.c.etcd.blocks().len();
        say(format_args!(
            "  three nodes contending: {:?} claims in {:.1} s ({} lost to another node; {blocks} blocks held)",
            out.claims, out.claim_secs, out.claims_lost
        ));
        crate::check()?;
    }
    // 3. Connections while growing, against the same with the blocks held, interleaved.
    {
        let n: u64 = if plan.quick { 200 } else { 600 };
        // Enough blocks for n connections, and one spare.
        let enough = u16::try_from(n.div_ceil(u64::from(BLOCK)) + 1).unwrap_or(u16::MAX);
        let growing = Lab::new("2s", 1)?;
        let held = Lab::new("2s", enough)?;
        let _servers = [&growing, &held]
            .map(|l| TcpServer::start(l.server(), SocketAddrV4::new(SERVER, 8080)));
        let rounds = if plan.quick { 2 } else { 3 };
        out.conns = n;
        for round in 0..rounds {
            for k in 0..2 {
                crate::check()?;
                let grow = (k + round) % 2 == 0;
                let lab = if grow { &growing } else { &held };
                let before: u64 = lab.agents.iter().map(open_blocks).sum();
                let drops = |lab: &Lab| -> u64 {
                    lab.agents
                        .iter()
                        .map(|a| a.counter("egress", "drop_awaiting_block"))
                        .sum()
                };
                let dropped = drops(lab);
                let (conns, secs) = connect_all(lab, n)?;
                let grown = lab
                    .agents
                    .iter()
                    .map(open_blocks)
                    .sum::<u64>()
                    .saturating_sub(before);
                drop(conns);
                if grow {
                    out.growing_secs.push(secs);
                    out.grown_blocks.push(grown);
                    out.held_back += drops(lab) - dropped;
                    // Back to one block each: the closed connections' ports free after the FIN
                    // timeout, the emptied blocks go back after the cool-down.
                    lab.settle(1)?;
                } else {
                    out.held_secs.push(secs);
                    lab.settle(u64::from(enough))?;
                }
                say(format_args!(
                    "  round {}/{rounds}, {}: {n} connections per pod on three pods in {secs:.2} s ({:.0}/s){}",
                    round + 1,
                    if grow { "growing" } else { "blocks held" },
                    3.0 * n as f64 / secs,
                    if grow {
                        format!(", {grown} blocks claimed")
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }
    Ok(())
}

/// Blocks in the range (for the report).
pub fn blocks_in_range() -> u32 {
    let (lo, hi) = RANGE.split_once(':').expect("lo:hi");
    let (lo, hi): (u32, u32) = (lo.parse().expect("lo"), hi.parse().expect("hi"));
    (hi - lo + 1) / BLOCK
}
