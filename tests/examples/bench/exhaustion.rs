//! A pod hammering an exhausted destination (issue 12): what its refused new flows cost the node,
//! next to an established flow at the same packet rate.
//!
//! Two labs (the harness's topology each), each with a snat agent on the node's uplink, port
//! range 32768:65535 as everywhere in the bench: lab `drop` runs it with `--on-exhaustion drop`,
//! lab `reject` with the default `reject`. In both, the server's whole UDP range (the 32,768
//! ports of the NAT IP towards 203.0.113.10) is taken by synthetic mappings written into the
//! agent's tables ([`tests::tables::exhaust_udp`]), after pod 1 of lab `reject` opened the
//! established flow (one connected UDP socket, its mapping made by the datapath, so it holds one
//! of the ports). A check then sends one new flow in each lab: refused, counted, not arrived.
//!
//! Windows of `exhaust_secs` each, alternating, the order rotating by one each round:
//! - idle: nothing sent (the machine's background, subtracted as "net of idle");
//! - established: pod 1 of lab `reject` sends on its flow, paced at `exhaust_rate`;
//! - refused (drop), refused (reject): pod 0 of that lab sends datagrams at that rate, each from
//!   the next of [`NEW_FLOW_SOCKETS`] sockets (source ports), none of which has a mapping, so
//!   each datagram is a new flow to the datapath and is refused.
//!
//! Measured per window:
//! - the machine's softirq time (`/proc/stat`, all CPUs: the namespaces share the machine's CPUs,
//!   so whatever else runs counts too, hence the idle windows; in clock ticks of 10 ms, and on a
//!   kernel with tick-based accounting a sample of where each tick found the CPU);
//! - the sending thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`, nanoseconds): a datagram's
//!   whole way through the veths, the node (snat) and the router runs in the softirq its send
//!   raises, which the kernel runs in the sender's context when the send re-enables bottom
//!   halves, so on a kernel without `CONFIG_IRQ_TIME_ACCOUNTING` this counts what each datagram
//!   costs the machine, untouched by anything else running; the idle window runs the same pacing
//!   loop without sending, which is subtracted;
//! - both agents' CPU (user + system, `/proc/<pid>/stat`);
//! - the run time per packet of the egress program of the lab carrying the window (the kernel's
//!   BPF run-time statistics, switched on with `BPF_ENABLE_STATS` for this part only and off when
//!   its descriptor closes; a tail-called program's time counts in its caller's).
//!
//! Checked per window: every established datagram that arrives comes from the NAT IP and most
//! arrive; no refused datagram arrives, and the agent counts them as refused for lack of a port.
//!
//! Bounded: each window sends at most `rate × secs` datagrams and stops after twice its length;
//! the labs, agents, receivers and sockets go when this returns (drop guards), also on failure
//! and on a stop signal.

use std::{
    net::{SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;
use snat_user::tables::expiry::now_ns;
use tests::{
    agent::Agent,
    tables::{self, AgentTables},
    topo::{NAT_IP, POD_CIDR, SERVER},
};

use crate::{
    lab::{Lab, PORT_RANGE},
    say,
    scale::cpu_secs,
    Plan,
};

/// Server ports: the established flow's, and the one refused new flows are sent to.
const EST_PORT: u16 = 9201;
const NEW_PORT: u16 = 9202;
/// Sockets (source ports) pod 0 sends its new flows from, in turn.
pub const NEW_FLOW_SOCKETS: usize = 256;
/// UDP payload: a 64-byte frame, as in the packet-rate workload.
const PAYLOAD: [u8; 22] = [0; 22];
/// Softirq ticks (above idle) the established flow must come to for a softirq ratio.
pub const MIN_TICKS: f64 = 10.0;
/// The two labs: index of lab `drop` and of lab `reject`.
const DROP: usize = 0;
const REJECT: usize = 1;

/// What a window does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Idle,
    Established,
    RefusedDrop,
    RefusedReject,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Idle,
        Kind::Established,
        Kind::RefusedDrop,
        Kind::RefusedReject,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Kind::Idle => "idle (nothing sent)",
            Kind::Established => "established flow",
            Kind::RefusedDrop => "refused new flows, `--on-exhaustion drop`",
            Kind::RefusedReject => "refused new flows, `reject` (default)",
        }
    }

    /// The lab whose traffic the window carries.
    const fn lab(self) -> Option<usize> {
        match self {
            Kind::Idle => None,
            Kind::Established | Kind::RefusedReject => Some(REJECT),
            Kind::RefusedDrop => Some(DROP),
        }
    }
}

/// One window's figures.
#[derive(Clone, Debug)]
pub struct Window {
    pub kind: Kind,
    /// Its length, the pacing slots it ran (the idle window paces without sending), and the
    /// datagrams sent in it.
    pub secs: f64,
    pub slots: u64,
    pub sent: u64,
    /// The sending thread's CPU time over the window (ns).
    pub sender_cpu_ns: u64,
    /// `/proc/stat` ticks over the window, all CPUs: softirq, and all states together.
    pub softirq_ticks: u64,
    pub all_ticks: u64,
    /// Both agents' user + system CPU seconds over the window.
    pub agents_cpu_secs: f64,
    /// The egress program of the window's lab: run time (ns) and runs (BPF statistics).
    pub bpf: Option<(u64, u64)>,
    /// Datagrams that arrived at the server port the window sent to.
    pub arrived: u64,
    /// The agent's counters over the window: refused for lack of a port, of those refused on
    /// the "destination full" mark without a search, and answered (ICMP sent).
    pub refused: u64,
    pub known_full: u64,
    pub answered: u64,
}

/// Everything the part measured.
#[derive(Clone, Debug)]
pub struct Exhaustion {
    pub rate: f64,
    pub secs: f64,
    pub rounds: usize,
    pub cpus: usize,
    /// Clock ticks per second (`/proc/stat`'s unit).
    pub hz: u64,
    /// Whether the kernel accounts interrupt time on its own (`CONFIG_IRQ_TIME_ACCOUNTING`):
    /// then the sending thread's CPU time leaves out the softirq it runs. `None`: unknown.
    pub irq_time_accounting: Option<bool>,
    /// Whether the BPF run-time statistics could be switched on.
    pub bpf_stats: bool,
    /// Synthetic mappings written, per lab (`drop`, `reject`), and ports found taken already.
    pub written: [u32; 2],
    pub already_claimed: [u32; 2],
    pub windows: Vec<Window>,
}

impl Exhaustion {
    /// The windows of `kind`.
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(move |w| w.kind == kind)
    }

    /// Softirq CPU-seconds per second over all windows of `kind` (all CPUs together).
    pub fn softirq_rate(&self, kind: Kind) -> f64 {
        let (ticks, secs) = self
            .of(kind)
            .fold((0u64, 0.0), |(t, s), w| (t + w.softirq_ticks, s + w.secs));
        ticks as f64 / self.hz as f64 / secs
    }

    /// Like [`Exhaustion::softirq_rate`], less that of the idle windows.
    pub fn softirq_net(&self, kind: Kind) -> f64 {
        self.softirq_rate(kind) - self.softirq_rate(Kind::Idle)
    }

    /// Share of all CPU time (all CPUs, by the wall clock) the softirq took over the windows of
    /// `kind`.
    pub fn softirq_share(&self, kind: Kind) -> f64 {
        self.softirq_rate(kind) / self.cpus.max(1) as f64
    }

    /// Softirq ticks over all windows of `kind`, and over the same time of idle windows.
    pub fn softirq_ticks(&self, kind: Kind) -> (u64, f64) {
        let (ticks, secs) = self
            .of(kind)
            .fold((0u64, 0.0), |(t, s), w| (t + w.softirq_ticks, s + w.secs));
        let idle = self.softirq_rate(Kind::Idle) * self.hz as f64 * secs;
        (ticks, idle)
    }

    /// Net softirq of `kind` over that of the established flow; NaN unless the established
    /// flow's softirq came to at least [`MIN_TICKS`] ticks above idle (below that the ratio is
    /// the ticks' noise).
    pub fn softirq_ratio(&self, kind: Kind) -> f64 {
        let (ticks, idle) = self.softirq_ticks(Kind::Established);
        if (ticks as f64 - idle) < MIN_TICKS {
            return f64::NAN;
        }
        ratio(self.softirq_net(kind), self.softirq_net(Kind::Established))
    }

    /// The sending thread's CPU time per pacing slot over the windows of `kind` (ns).
    fn sender_per_slot(&self, kind: Kind) -> f64 {
        let (ns, slots) = self
            .of(kind)
            .fold((0u64, 0u64), |(n, k), w| (n + w.sender_cpu_ns, k + w.slots));
        ns as f64 / slots as f64
    }

    /// What a datagram of `kind` cost the sending thread (ns), the pacing less (the idle
    /// windows' CPU per slot).
    pub fn sender_net(&self, kind: Kind) -> f64 {
        self.sender_per_slot(kind) - self.sender_per_slot(Kind::Idle)
    }

    /// Net sending CPU per datagram of `kind` over that of the established flow.
    pub fn sender_ratio(&self, kind: Kind) -> f64 {
        ratio(self.sender_net(kind), self.sender_net(Kind::Established))
    }

    /// Datagrams sent per second over all windows of `kind`.
    pub fn sent_rate(&self, kind: Kind) -> f64 {
        let (n, secs) = self
            .of(kind)
            .fold((0u64, 0.0), |(n, s), w| (n + w.sent, s + w.secs));
        n as f64 / secs
    }

    /// Agents' CPU (cores) over all windows of `kind`.
    pub fn agents_cpu(&self, kind: Kind) -> f64 {
        let (c, secs) = self
            .of(kind)
            .fold((0.0, 0.0), |(c, s), w| (c + w.agents_cpu_secs, s + w.secs));
        c / secs
    }

    /// The egress program's mean run time per packet over all windows of `kind`.
    pub fn bpf_ns(&self, kind: Kind) -> Option<f64> {
        let (ns, runs) = self
            .of(kind)
            .filter_map(|w| w.bpf)
            .fold((0u64, 0u64), |(a, b), (ns, runs)| (a + ns, b + runs));
        (runs > 0).then(|| ns as f64 / runs as f64)
    }

    /// Totals over the windows of `kind`: (sent, arrived, refused, known full, answered).
    pub fn totals(&self, kind: Kind) -> (u64, u64, u64, u64, u64) {
        self.of(kind).fold((0, 0, 0, 0, 0), |t, w| {
            (
                t.0 + w.sent,
                t.1 + w.arrived,
                t.2 + w.refused,
                t.3 + w.known_full,
                t.4 + w.answered,
            )
        })
    }
}

/// `a / b`, or NaN unless both are positive (a figure lost in the noise has no ratio).
fn ratio(a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// This thread's CPU time so far (ns).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether the running kernel was built with `CONFIG_IRQ_TIME_ACCOUNTING`, if its configuration
/// can be read.
fn irq_time_accounting() -> Option<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("zcat")
                .arg("/proc/config.gz")
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })?;
    Some(config.lines().any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y"))
}

/// `/proc/stat`'s first line: (softirq, all states) in clock ticks, summed over all CPUs.
fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let f = cpu_states()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user and nice).
    let all = f.iter().take(8).sum();
    Ok((f.get(6).copied().unwrap_or(0), all))
}

/// The machine's busy time so far in clock ticks, all CPUs: user, nice, system, irq and softirq
/// (not idle, iowait or steal, which is the host's).
pub fn busy_ticks() -> anyhow::Result<u64> {
    let f = cpu_states()?;
    Ok([0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum())
}

/// `/proc/stat`'s first line: the ticks of each state, summed over all CPUs.
fn cpu_states() -> anyhow::Result<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no `cpu` line")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect())
}

/// The id of the program named `name` (e.g. [`snat_common::PROG_EGRESS`]) the process `pid`
/// holds.
pub fn agent_prog(pid: u32, name: &str) -> Option<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| ids.contains(&p.id()) && p.name_as_str() == Some(name))
        .map(|p| p.id())
}

/// Turns the kernel's BPF run-time statistics on until the returned fd is dropped (they add two
/// clock reads to every program run, so they stay off while contenders are compared); where
/// they cannot be, says so and that the part goes `without` its program times.
pub fn run_time_stats(without: &str) -> Option<std::os::fd::OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            say(format_args!(
                "  BPF run-time statistics unavailable ({e}): {without}"
            ));
            None
        }
    }
}

/// Run time (ns) and runs of the program `id` so far (zero unless BPF statistics are on).
pub fn prog_stats(id: u32) -> Option<(u64, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| (p.run_time().as_nanos() as u64, p.run_count()))
}

/// UDP receivers on the lab's server, counting what arrives on [`EST_PORT`] and [`NEW_PORT`] and
/// what arrives from another source than the NAT IP; stopped when dropped.
struct Receivers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Arrived on EST_PORT, on NEW_PORT; from a wrong source.
    counts: [Arc<AtomicU64>; 3],
}

impl Receivers {
    fn start(lab: &Lab) -> anyhow::Result<Self> {
        let mut r = Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            counts: Default::default(),
        };
        for (i, port) in [EST_PORT, NEW_PORT].into_iter().enumerate() {
            let sock = lab
                .topo
                .server
                .run(move || UdpSocket::bind(SocketAddrV4::new(SERVER, port)))
                .with_context(|| format!("binding a UDP receiver to {SERVER}:{port}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, count, wrong) = (r.stop.clone(), r.counts[i].clone(), r.counts[2].clone());
            r.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        count.fetch_add(1, Ordering::Relaxed);
                        if from.ip() != std::net::IpAddr::V4(NAT_IP) {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Ok(r)
    }

    fn count(&self, i: usize) -> u64 {
        self.counts[i].load(Ordering::Relaxed)
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What [`paced`] did.
struct Paced {
    slots: u64,
    sent: u64,
    secs: f64,
}

/// Runs up to `rate × secs` slots paced at `rate` per second (each at its due time, so a late
/// one does not shift the rest), sending the `i`-th datagram with `send(i)` (`None`: the idle
/// window, which paces without sending); stops early on a stop signal or after twice the window.
fn paced(rate: f64, secs: f64, mut send: Option<&mut dyn FnMut(usize) -> bool>) -> Paced {
    let count = (rate * secs).round() as usize;
    let limit = Duration::from_secs_f64(2.0 * secs);
    let t0 = Instant::now();
    let (mut slots, mut sent) = (0, 0);
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if crate::interrupted() || t0.elapsed() > limit {
            break;
        }
        slots += 1;
        if let Some(send) = send.as_mut() {
            if send(i) {
                sent += 1;
            }
        }
    }
    // The window lasts until the last slot is over.
    let end = t0 + Duration::from_secs_f64(slots as f64 / rate);
    if let Some(wait) = end.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    Paced {
        slots,
        sent,
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn counter(stats: &Value, group: &str, name: &str) -> u64 {
    stats["counters"][group][name].as_u64().unwrap_or(0)
}

/// The labs, their agents and senders, set up and exhausted.
struct Setup {
    labs: [Lab; 2],
    agents: [Agent; 2],
    receivers: [Receivers; 2],
    /// Lab `reject`'s pod 1: the established flow (connected).
    established: UdpSocket,
    /// Pod 0 of each lab: the new flows' sockets.
    new_flows: [Vec<UdpSocket>; 2],
    /// Each agent's egress program id.
    egress: [Option<u32>; 2],
}

fn setup(out: &mut Exhaustion) -> anyhow::Result<Setup> {
    let labs = [Lab::new()?, Lab::new()?];
    let base = ["--internal", POD_CIDR, "--port-range", PORT_RANGE];
    let drop_args = [&base[..], &["--on-exhaustion", "drop"]].concat();
    let agents = [
        Agent::start(&labs[DROP].topo.node, &labs[DROP].topo.uplink, &drop_args),
        Agent::start(&labs[REJECT].topo.node, &labs[REJECT].topo.uplink, &base),
    ];
    let receivers = [
        Receivers::start(&labs[DROP])?,
        Receivers::start(&labs[REJECT])?,
    ];
    let egress = agents
        .each_ref()
        .map(|a| agent_prog(a.pid(), snat_common::PROG_EGRESS));

    // The established flow, made by the datapath while ports are free.
    let established = labs[REJECT].pods()[1]
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddrV4::new(SERVER, EST_PORT))?;
            Ok::<_, std::io::Error>(s)
        })
        .context("opening the established flow's socket")?;
    established.send(&PAYLOAD)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while receivers[REJECT].count(0) == 0 {
        crate::check()?;
        if Instant::now() > deadline {
            bail!("the established flow's first datagram did not arrive within 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let new_flows = [
        new_flow_sockets(&labs[DROP])?,
        new_flow_sockets(&labs[REJECT])?,
    ];

    // The destination's whole range, taken in each agent's tables.
    let (lo, hi) = PORT_RANGE
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .context("PORT_RANGE is not LO:HI")?;
    for (i, agent) in agents.iter().enumerate() {
        let mut t = AgentTables::of_process(agent.pid())?;
        let done = tables::exhaust_udp(&mut t.fwd, &mut t.rev, SERVER, NAT_IP, lo..=hi, now_ns())?;
        out.written[i] = done.written;
        out.already_claimed[i] = done.already_claimed;
        let expected_claimed = if i == REJECT { 1 } else { 0 };
        if done.already_claimed != expected_claimed {
            bail!(
                "lab {i}: {} ports of the range were taken before the fill, expected {expected_claimed}",
                done.already_claimed
            );
        }
    }

    // Each lab refuses a new flow to the destination now, and counts it.
    let to = SocketAddrV4::new(SERVER, NEW_PORT);
    for (i, agent) in agents.iter().enumerate() {
        let before = counter(&agent.stats(), "egress", "drop_exhausted_udp");
        new_flows[i][0].send_to(&PAYLOAD, to)?;
        std::thread::sleep(Duration::from_millis(300));
        let refused = counter(&agent.stats(), "egress", "drop_exhausted_udp") - before;
        if refused != 1 || receivers[i].count(1) != 0 {
            bail!(
                "lab {i}: a new flow to the exhausted destination was refused {refused} times and \
                 arrived {} times (expected 1 and 0)",
                receivers[i].count(1)
            );
        }
    }
    if receivers[REJECT].count(2) + receivers[DROP].count(2) != 0 {
        bail!("a datagram arrived at the server from another source than the NAT IP");
    }
    Ok(Setup {
        labs,
        agents,
        receivers,
        established,
        new_flows,
        egress,
    })
}

/// [`NEW_FLOW_SOCKETS`] unconnected UDP sockets in pod 0 of `lab`, each on its own source port.
fn new_flow_sockets(lab: &Lab) -> anyhow::Result<Vec<UdpSocket>> {
    lab.pods()[0]
        .run(|| {
            (0..NEW_FLOW_SOCKETS)
                .map(|_| UdpSocket::bind("0.0.0.0:0"))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .context("opening the new flows' sockets")
}

/// One window of `kind`.
fn window(plan: &Plan, s: &Setup, kind: Kind) -> anyhow::Result<Window> {
    let lab = kind.lab();
    let port_index = usize::from(kind != Kind::Established);
    let before = lab.map(|i| s.agents[i].stats());
    let arrived_before = lab.map_or(0, |i| s.receivers[i].count(port_index));
    // Let the last window's leftovers (and `snat stats`) pass.
    std::thread::sleep(Duration::from_millis(300));

    let pids: Vec<String> = s.agents.iter().map(|a| a.pid().to_string()).collect();
    let prog = lab.and_then(|i| s.egress[i]);
    let (soft0, all0) = cpu_ticks()?;
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(p)).sum();
    let bpf0 = prog.and_then(prog_stats);
    let to = SocketAddrV4::new(SERVER, NEW_PORT);
    let (rate, secs) = (plan.exhaust_rate, plan.exhaust_secs);
    let thread0 = thread_cpu_ns();
    let p = match kind {
        Kind::Idle => paced(rate, secs, None),
        Kind::Established => paced(
            rate,
            secs,
            Some(&mut |_| s.established.send(&PAYLOAD).is_ok()),
        ),
        Kind::RefusedDrop | Kind::RefusedReject => {
            let socks = &s.new_flows[lab.unwrap_or(DROP)];
            paced(
                rate,
                secs,
                Some(&mut |i| socks[i % socks.len()].send_to(&PAYLOAD, to).is_ok()),
            )
        }
    };
    let thread1 = thread_cpu_ns();
    let (soft1, all1) = cpu_ticks()?;
    let cpu1: f64 = pids.iter().map(|p| cpu_secs(p)).sum();
    let bpf1 = prog.and_then(prog_stats);
    crate::check()?;
    // The last datagrams' way to the server.
    std::thread::sleep(Duration::from_millis(200));

    let mut w = Window {
        kind,
        secs: p.secs,
        slots: p.slots,
        sent: p.sent,
        sender_cpu_ns: thread1.saturating_sub(thread0),
        softirq_ticks: soft1.saturating_sub(soft0),
        all_ticks: all1.saturating_sub(all0),
        agents_cpu_secs: cpu1 - cpu0,
        bpf: bpf0
            .zip(bpf1)
            .map(|((t0, n0), (t1, n1))| (t1.saturating_sub(t0), n1.saturating_sub(n0))),
        arrived: 0,
        refused: 0,
        known_full: 0,
        answered: 0,
    };
    if let (Some(i), Some(before)) = (lab, before) {
        w.arrived = s.receivers[i].count(port_index) - arrived_before;
        let after = s.agents[i].stats();
        let delta = |g: &str, n: &str| counter(&after, g, n).saturating_sub(counter(&before, g, n));
        w.refused = delta("egress", "drop_exhausted_udp");
        w.known_full = delta("alloc", "refused_known_full");
        w.answered = delta("reject", "icmp_sent");
    }
    let wrong: u64 = s.receivers.iter().map(|r| r.count(2)).sum();
    if wrong > 0 {
        bail!("{wrong} datagrams arrived at a server from another source than the NAT IP");
    }
    match kind {
        Kind::Idle => {}
        Kind::Established => {
            if w.sent > 0 && w.arrived == 0 {
                bail!(
                    "none of the established flow's {} datagrams arrived",
                    w.sent
                );
            }
        }
        Kind::RefusedDrop | Kind::RefusedReject => {
            if w.arrived > 0 {
                bail!(
                    "{} of {} datagrams to the exhausted destination arrived: they got a port",
                    w.arrived,
                    w.sent
                );
            }
        }
    }
    Ok(w)
}

/// Runs the part; what it measured goes into `out` window by window.
pub fn run(plan: &Plan, out: &mut Option<Exhaustion>) -> anyhow::Result<()> {
    // BPF run-time statistics, for this part only (off again when the descriptor closes).
    let stats = run_time_stats("no per-packet program time");
    let hz = crate::scale::clock_ticks();
    let m = out.insert(Exhaustion {
        rate: plan.exhaust_rate,
        secs: plan.exhaust_secs,
        rounds: plan.exhaust_rounds,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        hz,
        irq_time_accounting: irq_time_accounting(),
        bpf_stats: stats.is_some(),
        written: [0; 2],
        already_claimed: [0; 2],
        windows: Vec::new(),
    });
    let setup = setup(m)?;
    say(format_args!(
        "  labs {} (drop) and {} (reject): {} + {} synthetic UDP mappings exhaust {SERVER}; a new flow is refused in each",
        setup.labs[DROP].topo.prefix,
        setup.labs[REJECT].topo.prefix,
        m.written[DROP],
        m.written[REJECT]
    ));
    let n = Kind::ALL.len();
    for round in 0..plan.exhaust_rounds {
        for i in 0..n {
            crate::check()?;
            let kind = Kind::ALL[(i + round) % n];
            let w = window(plan, &setup, kind)?;
            say(format_args!(
                "  round {}/{}, {}: {} sent in {:.1} s, sender {:.1} µs CPU per slot, softirq {} ticks of {}, agents {:.2} s CPU{}",
                round + 1,
                plan.exhaust_rounds,
                kind.label(),
                w.sent,
                w.secs,
                w.sender_cpu_ns as f64 / w.slots.max(1) as f64 / 1e3,
                w.softirq_ticks,
                w.all_ticks,
                w.agents_cpu_secs,
                w.bpf
                    .filter(|b| b.1 > 0)
                    .map_or(String::new(), |(t, r)| format!(
                        ", egress program {:.0} ns/packet over {r} runs",
                        t as f64 / r as f64
                    ))
            ));
            m.windows.push(w);
        }
    }
    drop(setup);
    drop(stats);
    Ok(())
}
