//! The network workloads. Each contender has a lab (topology) of its own.
//!
//! - Churn ([`churn_run`], one contender at a time, on a fresh server namespace): to one
//!   destination (`churn1`) and to many server ports (`churnN`), bursts of short TCP connections
//!   back to back; rate per burst, failed and stalled connects, SYN retransmissions. And
//!   [`churn_program_time`]: snat once more, not compared, its programs' own time per
//!   connection from the kernel's BPF run-time statistics.
//! - Packet rate and bulk ([`rate_phase`], every contender set up at once, short windows
//!   alternating between them): UDP with small (64-byte frame) datagrams, one flow and many
//!   flows, from our own sender (`sendmmsg`) in pod 0 to our own receiver (`recvmmsg`, polling)
//!   on the server, counting what arrives; bulk TCP with iperf3, offloads on. And the reply
//!   direction, where the NAT's reply path (TC or XDP) does the work: UDP from the server to
//!   the endpoint a pod's datagram opened (`udpR`), and bulk TCP from the server (`iperf3 -R`).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use snat_common::{PROG_EGRESS, PROG_INGRESS};
use tests::{
    netns::Netns,
    topo::{SERVER, SERVER6},
};

use crate::{
    churn::{self, ChurnServer},
    lab::{ns_command, pin_to_cpu, run_bounded, ChildGuard, Contender, Lab},
    report::Results,
    say, Plan,
};

/// The churn server's ports: one for the check, one for churn to one destination, then many.
const CHECK_PORT: u16 = 7070;
const ONE_PORT: u16 = 8080;
const MANY_BASE: u16 = 8100;
const UDP_BASE: u16 = 9000;
/// The server's port for the reply-direction UDP workload.
const UDP_REPLY_PORT: u16 = 9100;
const IPERF_PORT: u16 = 5201;
/// UDP payload: 14 + 20 + 8 + 22 = a 64-byte frame.
const UDP_PAYLOAD: usize = 22;
/// Sockets (source ports) in the many-flows UDP workload.
pub const UDP_FLOWS: usize = 256;
/// Datagrams per `sendmmsg` call.
pub const UDP_BATCH: usize = 32;

/// Checks that the server sees each pod of `lab` as contender `c` should show it.
fn check_sources(lab: &Lab, c: Contender) -> anyhow::Result<()> {
    let server_addr = server_of(c);
    let server = ChurnServer::start(&lab.topo.server, server_addr, &[CHECK_PORT], 1)?;
    let pods: [IpAddr; 2] = if c.is_ipv6() {
        lab.pod_addrs6().map(IpAddr::from)
    } else {
        lab.pod_addrs().map(IpAddr::from)
    };
    for (pod, addr) in lab.pods().into_iter().zip(pods) {
        let seen = pod.run(move || {
            let mut greeting = Vec::new();
            churn::exchange(
                SocketAddr::new(server_addr, CHECK_PORT),
                Some(&mut greeting),
            )
            .and_then(|()| {
                String::from_utf8_lossy(&greeting)
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
        });
        let seen = seen.with_context(|| format!("{}: a first connection failed", c.label()))?;
        if seen.ip() != c.seen_source(addr) {
            bail!(
                "{}: the server saw pod {addr} as {seen}, expected {}",
                c.label(),
                c.seen_source(addr)
            );
        }
    }
    drop(server);
    Ok(())
}

/// The server's address for contender `c`'s family.
fn server_of(c: Contender) -> IpAddr {
    if c.is_ipv6() {
        SERVER6.into()
    } else {
        SERVER.into()
    }
}

/// What a churn run records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ChurnRun {
    /// The compared figures: the rate of every burst, failures, the machine's and the agent's
    /// CPU, the agent's allocation counters.
    Compared,
    /// Nothing compared, only what the agent's programs (TC egress and ingress) did per completed
    /// connection, from the kernel's BPF run-time statistics, which the caller has turned on:
    /// their own time (`{key}.prog_ns_per_conn`, and each program's: `{key}.egress_ns_per_conn`,
    /// `{key}.ingress_ns_per_conn`), the packets they saw (`{key}.prog_runs_per_conn`), and the
    /// allocations (`{key}.allocs_per_conn`) with their mean time by the agent's allocation
    /// timer (`{key}.alloc_ns`).
    ProgramTime,
}

/// One churn run of contender `c` in its lab: a fresh server, the contender set up, both churn
/// workloads (bursts back to back), the contender torn down.
pub fn churn_run(
    plan: &Plan,
    lab: &mut Lab,
    c: Contender,
    results: &mut Results,
    run: ChurnRun,
) -> anyhow::Result<()> {
    lab.fresh_server()?;
    crate::check()?;
    let active = lab.activate(c)?;
    let lab: &Lab = lab;
    check_sources(lab, c)?;
    // The programs timed by a `ProgramTime` run: the entry points, whose run time includes the
    // allocation they tail-call.
    let progs: Vec<u32> = match (run, &active.agent) {
        (ChurnRun::ProgramTime, Some(agent)) => entry_progs(agent.pid()),
        _ => Vec::new(),
    };
    if run == ChurnRun::ProgramTime && progs.len() != 2 {
        say(format_args!(
            "  {}: its egress and ingress programs not found: no program time per connection",
            c.label()
        ));
        return Ok(());
    }
    let many: Vec<u16> = (0..plan.many_ports).map(|i| MANY_BASE + i).collect();
    let mut ports = vec![ONE_PORT];
    ports.extend(&many);
    let server = ChurnServer::start(&lab.topo.server, server_of(c), &ports, 2)?;
    // IPv6 contenders: churn to one destination only (`churn6`), next to IPv4's `churn1`.
    let workloads = if c.is_ipv6() {
        vec![("churn6", vec![ONE_PORT])]
    } else {
        vec![("churn1", vec![ONE_PORT]), ("churnN", many.clone())]
    };
    for (key, ports) in workloads {
        crate::check()?;
        let retrans_before: u64 = lab.pods().iter().map(|p| churn::syn_retrans(p)).sum();
        let (mut failed, mut stalled, mut unfinished) = (0, 0, 0);
        let mut rates = Vec::new();
        // The agent's own CPU over the bursts (all its threads; the datapath's time is the
        // softirq's, not the agent's): what the userspace half takes from the workload.
        let agent_pid = active.agent.as_ref().map(|a| a.pid().to_string());
        let agent_before = agent_pid.as_deref().map(crate::scale::cpu_secs_fine);
        let started = Instant::now();
        // The whole machine's busy time over the bursts: CPU per connection, every contender.
        let busy_before = crate::exhaustion::busy_ticks()?;
        let mut completed = 0;
        let progs_before = prog_stats_of(&progs);
        let alloc_before = active.agent.as_ref().map(allocations);
        for b in 1..=plan.bursts {
            crate::check()?;
            let r = churn::burst(
                &lab.pods(),
                plan.client_threads_per_pod,
                server_of(c),
                &ports,
                plan.burst_conns,
                plan.burst_limit,
            );
            rates.push(r.rate());
            if run == ChurnRun::Compared {
                results.push(&format!("{key}.burst{b}"), c, r.rate());
            }
            completed += r.completed;
            failed += r.failed;
            stalled += r.stalled;
            unfinished += r.unfinished;
        }
        if run == ChurnRun::ProgramTime {
            let conns = completed as f64;
            let d = prog_deltas(&progs_before, &prog_stats_of(&progs));
            let delta = |i: usize| (d[i].0 as f64, d[i].1 as f64);
            let ((egress, egress_runs), (ingress, ingress_runs)) = (delta(0), delta(1));
            if completed > 0 && egress_runs > 0.0 {
                let per_conn = |v: f64| v / conns;
                results.push(&format!("{key}.egress_ns_per_conn"), c, per_conn(egress));
                results.push(&format!("{key}.ingress_ns_per_conn"), c, per_conn(ingress));
                results.push(
                    &format!("{key}.prog_ns_per_conn"),
                    c,
                    per_conn(egress + ingress),
                );
                let runs = egress_runs + ingress_runs;
                results.push(&format!("{key}.prog_runs_per_conn"), c, per_conn(runs));
                say(format_args!(
                    "  {key}: snat's programs {:.0} ns per connection over {completed} connections (egress {:.0} ns, ingress {:.0} ns; {:.1} packets each)",
                    per_conn(egress + ingress),
                    per_conn(egress),
                    per_conn(ingress),
                    per_conn(runs),
                ));
                if let (Some(agent), Some((count0, sum0))) = (&active.agent, alloc_before) {
                    let (count, sum) = allocations(agent);
                    if count > count0 {
                        let alloc_ns = (sum - sum0) / (count - count0);
                        results.push(
                            &format!("{key}.allocs_per_conn"),
                            c,
                            per_conn(count - count0),
                        );
                        results.push(&format!("{key}.alloc_ns"), c, alloc_ns);
                        say(format_args!(
                            "  {key}: {:.2} allocations per connection, {alloc_ns:.0} ns each (the agent's allocation timer)",
                            per_conn(count - count0)
                        ));
                    }
                }
            }
            settle();
            continue;
        }
        let retrans: u64 = lab
            .pods()
            .iter()
            .map(|p| churn::syn_retrans(p))
            .sum::<u64>()
            - retrans_before;
        let busy = (crate::exhaustion::busy_ticks()? - busy_before) as f64
            / crate::scale::clock_ticks() as f64;
        let secs = started.elapsed().as_secs_f64();
        results.push(&format!("{key}.busy_cores"), c, busy / secs);
        if completed > 0 {
            results.push(
                &format!("{key}.cpu_per_conn_us"),
                c,
                busy / completed as f64 * 1e6,
            );
        }
        if let (Some(pid), Some(before)) = (&agent_pid, agent_before) {
            let cores = (crate::scale::cpu_secs_fine(pid) - before) / secs;
            results.push(&format!("{key}.agent_cores"), c, cores);
        }
        results.push(&format!("{key}.failed"), c, failed as f64);
        results.push(&format!("{key}.stalled"), c, stalled as f64);
        results.push(&format!("{key}.unfinished"), c, unfinished as f64);
        results.push(&format!("{key}.synretrans"), c, retrans as f64);
        say(format_args!(
            "  {key}: {} conn/s per burst; failed {failed}, stalled {stalled}, not started {unfinished}, SYN retransmits {retrans}",
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        settle();
    }
    if let (ChurnRun::Compared, Some(agent)) = (run, &active.agent) {
        let s = agent.stats();
        let count = s["allocation"]["count"].as_f64().unwrap_or(0.0);
        if count > 0.0 {
            let mean = s["allocation"]["sum_ns"].as_f64().unwrap_or(0.0) / count;
            results.push("snat.alloc_mean_ns", c, mean);
        }
        for k in [
            "port_same_endpoint",
            "port_preserved",
            "port_random",
            "port_index",
            "port_scan",
            "tcp_reopened",
        ] {
            if let Some(v) = s["counters"]["alloc"][k].as_f64() {
                results.push(&format!("snat.{k}"), c, v);
            }
        }
    }
    drop(server);
    drop(active);
    Ok(())
}

/// The ids of the agent `pid`'s entry programs, TC egress then ingress (those it has; the
/// allocation's run time is in egress's, which tail-calls it).
fn entry_progs(pid: u32) -> Vec<u32> {
    [PROG_EGRESS, PROG_INGRESS]
        .into_iter()
        .filter_map(|name| crate::exhaustion::agent_prog(pid, name))
        .collect()
}

/// The run time (ns) and runs of each of the programs `ids` so far.
fn prog_stats_of(ids: &[u32]) -> Vec<(u64, u64)> {
    ids.iter()
        .map(|&id| crate::exhaustion::prog_stats(id).unwrap_or((0, 0)))
        .collect()
}

/// Each program's run time (ns) and runs between two readings of [`prog_stats_of`], none below
/// zero (a program whose statistics could not be read reads as zero).
fn prog_deltas(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<(u64, u64)> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
        .collect()
}

/// The allocations the agent has timed so far (created or refused flows) and their summed time
/// in ns (`snat_allocation_duration_seconds`, from `snat stats`).
fn allocations(agent: &tests::agent::Agent) -> (f64, f64) {
    let s = agent.stats();
    (
        s["allocation"]["count"].as_f64().unwrap_or(0.0),
        s["allocation"]["sum_ns"].as_f64().unwrap_or(0.0),
    )
}

/// Where snat's time per churn connection goes: one more churn run of `snat` (both workloads)
/// in `lab` at the end of a round, with the kernel's BPF run-time statistics on (they add two
/// clock reads to every run, so they stay off while contenders are compared): its programs' own
/// time per completed connection in the real path, against the machine's CPU per connection
/// under plain routing in the compared runs.
pub fn churn_program_time(plan: &Plan, lab: &mut Lab, results: &mut Results) -> anyhow::Result<()> {
    let Some(stats) = crate::exhaustion::run_time_stats("no program time per connection") else {
        return Ok(());
    };
    say(format_args!(
        "churn: snat again, its programs timed (BPF statistics on, not compared; lab {})",
        lab.topo.prefix
    ));
    churn_run(plan, lab, Contender::Snat, results, ChurnRun::ProgramTime)?;
    drop(stats);
    Ok(())
}

/// Packet rate and bulk: every contender set up at once, each in its own lab, and short
/// measurement windows alternating between them (the order rotating every repetition), so
/// that the machine's drift, which is larger than the differences measured, hits all alike.
pub fn rate_phase(plan: &Plan, labs: &mut [Lab], results: &mut Results) -> anyhow::Result<()> {
    for lab in labs.iter_mut() {
        crate::check()?;
        lab.fresh_server()?;
    }
    let labs: &[Lab] = labs;
    let mut actives = Vec::new();
    let mut iperf = Vec::new();
    for (lab, c) in labs.iter().zip(Contender::ALL) {
        crate::check()?;
        actives.push(lab.activate(c)?);
        check_sources(lab, c)?;
        iperf.push(iperf_server(lab)?);
    }
    let n = Contender::ALL.len();
    for rep in 0..plan.rate_reps {
        say(format_args!(
            "packet rate and bulk: repetition {}/{}",
            rep + 1,
            plan.rate_reps
        ));
        for (key, many) in [("udp1", false), ("udpN", true)] {
            let mut line = Vec::new();
            for i in 0..n {
                crate::check()?;
                let k = (i + rep) % n;
                let c = Contender::ALL[k];
                let u = udp_rate(&labs[k], c, many, plan.udp_secs)?;
                if u.received == 0 {
                    bail!(
                        "{}: UDP ({key}): nothing received ({} datagrams sent)",
                        c.label(),
                        u.sent
                    );
                }
                if u.bad_source > 0 {
                    bail!(
                        "{}: UDP ({key}): {} of {} datagrams arrived with an unexpected source address",
                        c.label(),
                        u.bad_source,
                        u.received
                    );
                }
                results.push(&format!("{key}.rx"), c, u.rx_rate);
                results.push(&format!("{key}.tx"), c, u.tx_rate);
                line.push(format!("{} {:.0}", c.label(), u.rx_rate / 1e3));
            }
            say(format_args!("  {key} kpps: {}", line.join(", ")));
        }
        let mut line = Vec::new();
        for i in 0..n {
            crate::check()?;
            let k = (i + rep) % n;
            let c = Contender::ALL[k];
            let u = udp_reply_rate(&labs[k], plan.udp_secs)?;
            if u.received == 0 {
                bail!(
                    "{}: UDP replies: nothing received ({} datagrams sent)",
                    c.label(),
                    u.sent
                );
            }
            results.push("udpR.rx", c, u.rx_rate);
            results.push("udpR.tx", c, u.tx_rate);
            line.push(format!("{} {:.0}", c.label(), u.rx_rate / 1e3));
        }
        say(format_args!("  udpR kpps: {}", line.join(", ")));
        for (key, reverse) in [("bulk", false), ("bulkR", true)] {
            let mut line = Vec::new();
            for i in 0..n {
                crate::check()?;
                let k = (i + rep) % n;
                let c = Contender::ALL[k];
                let (gbps, retrans) = bulk(&labs[k], plan.bulk_secs, reverse)?;
                results.push(&format!("{key}.gbps"), c, gbps);
                results.push(&format!("{key}.retrans"), c, retrans);
                line.push(format!("{} {gbps:.2}", c.label()));
            }
            say(format_args!("  {key} Gbit/s: {}", line.join(", ")));
        }
        // What the XDP path left to TC, for the report.
        for active in &actives {
            if let Some(agent) = &active.agent {
                let stats = agent.stats();
                let get = |g: &str, n: &str| stats["counters"][g][n].as_u64().unwrap_or(0);
                if stats["ingress"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("xdp"))
                {
                    let ingress: u64 = stats["counters"]["ingress"].as_object().map_or(0, |m| {
                        m.values().filter_map(serde_json::Value::as_u64).sum()
                    });
                    results.push(
                        "xdp.deferred",
                        Contender::SnatXdp,
                        get("xdp", "deferred_to_tc") as f64,
                    );
                    results.push("xdp.ingress", Contender::SnatXdp, ingress as f64);
                }
            }
        }
    }
    program_time(plan, labs, &actives, results)?;
    drop(iperf);
    drop(actives);
    Ok(())
}

/// A short pause between workloads, so one's leftovers (softirq backlog, timers) do not spill
/// into the next.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn set_int_opt(fd: i32, level: i32, opt: i32, value: i32) {
    // SAFETY: setting an int option on our own socket.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const value).cast(),
            size_of::<i32>() as u32,
        )
    };
}

/// A loop on a thread inside a namespace, stopped by a flag.
struct Looper {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Looper {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one UDP window measured.
struct UdpWindow {
    /// Datagrams received and sent per second over the window.
    rx_rate: f64,
    tx_rate: f64,
    /// Datagrams received and sent in all (warm-up included).
    received: u64,
    sent: u64,
    /// Datagrams received whose source was not the one the contender should show.
    bad_source: u64,
}

/// Received and sent packets per second, and how many datagrams arrived from an unexpected
/// source (every datagram's source is checked).
fn udp_rate(lab: &Lab, c: Contender, many: bool, secs: f64) -> anyhow::Result<UdpWindow> {
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let bad_source = Arc::new(AtomicU64::new(0));
    let pods: Vec<(&Netns, Ipv4Addr)> = vec![(lab.pods()[0], lab.pod_addrs()[0])];
    let expected: Vec<u32> = pods
        .iter()
        .map(|(_, a)| match c.seen_source(IpAddr::V4(*a)) {
            IpAddr::V4(seen) => u32::from(seen),
            IpAddr::V6(seen) => unreachable!("an IPv4 workload seen from {seen}"),
        })
        .collect();

    let mut receivers = Looper::new();
    let (ready_tx, ready_rx) = mpsc::channel();
    for i in 0..pods.len() {
        let (stop, received, bad, ready) = (
            receivers.stop.clone(),
            received.clone(),
            bad_source.clone(),
            ready_tx.clone(),
        );
        let expected = expected.clone();
        receivers.threads.push(lab.topo.server.spawn(move || {
            pin_to_cpu(i + 1);
            let sock = UdpSocket::bind(SocketAddrV4::new(SERVER, UDP_BASE + i as u16))
                .expect("binding the UDP receiver");
            let fd = sock.as_raw_fd();
            set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
            let _ = ready.send(());
            let mut bufs = vec![[0u8; 64]; 64];
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: all-zero sockaddr_in are valid; the kernel fills them in.
            let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; 64];
            // SAFETY: all-zero mmsghdr are valid; the pointers are set below.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; 64];
            for (j, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_iov = &raw mut iovs[j];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_name = (&raw mut names[j]).cast();
            }
            // Polls (MSG_DONTWAIT, no read timeout): the receiver never sleeps, so it keeps up
            // with the sender, and it sees the stop flag on every pass.
            while !stop.load(Ordering::Relaxed) {
                for (j, m) in msgs.iter_mut().enumerate() {
                    m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                    m.msg_hdr.msg_name = (&raw mut names[j]).cast();
                }
                // SAFETY: the headers point at live buffers of the stated sizes.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        msgs.len() as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    let n = n as usize;
                    received.fetch_add(n as u64, Ordering::Relaxed);
                    let wrong = names[..n]
                        .iter()
                        .filter(|a| !expected.contains(&u32::from_be(a.sin_addr.s_addr)))
                        .count();
                    if wrong > 0 {
                        bad.fetch_add(wrong as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for _ in 0..pods.len() {
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("UDP receiver did not start")?;
    }

    let mut senders = Looper::new();
    for (i, (pod, _)) in pods.iter().enumerate() {
        let (stop, sent) = (senders.stop.clone(), sent.clone());
        let flows = if many { UDP_FLOWS } else { 1 };
        senders.threads.push(pod.spawn(move || {
            pin_to_cpu(i);
            let to = SocketAddrV4::new(SERVER, UDP_BASE + i as u16);
            let socks: Vec<UdpSocket> = (0..flows)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").expect("binding a UDP sender");
                    s.connect(to).expect("connecting a UDP sender");
                    s
                })
                .collect();
            let mut payload = [0u8; UDP_PAYLOAD];
            let mut iov = libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            };
            // SAFETY: all-zero mmsghdr are valid; the pointers are set below.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; UDP_BATCH];
            for m in &mut msgs {
                m.msg_hdr.msg_iov = &raw mut iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let fd = socks[k % socks.len()].as_raw_fd();
                k += 1;
                // SAFETY: the headers point at a live payload; the socket is connected.
                let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
                if n > 0 {
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    let (rx_rate, tx_rate) = window_rates(&received, &sent, secs);
    senders.stop();
    std::thread::sleep(Duration::from_millis(50));
    receivers.stop();
    crate::check()?;
    Ok(UdpWindow {
        rx_rate,
        tx_rate,
        received: received.load(Ordering::Relaxed),
        sent: sent.load(Ordering::Relaxed),
        bad_source: bad_source.load(Ordering::Relaxed),
    })
}

/// The reply direction: pod 0 sends one datagram to the server, which then sends 64-byte
/// datagrams back to the endpoint it came from (the NAT's, or the pod's under `none`) as fast as
/// it can; pod 0 counts what arrives. Every datagram crosses the node's reply path.
fn udp_reply_rate(lab: &Lab, secs: f64) -> anyhow::Result<UdpWindow> {
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut server = Looper::new();
    let (ready_tx, ready_rx) = mpsc::channel();
    {
        let (stop, sent) = (server.stop.clone(), sent.clone());
        server.threads.push(lab.topo.server.spawn(move || {
            pin_to_cpu(0);
            let sock = UdpSocket::bind(SocketAddrV4::new(SERVER, UDP_REPLY_PORT))
                .expect("binding the UDP replier");
            let _ = ready_tx.send(());
            sock.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("a read timeout");
            let mut first = [0u8; 64];
            let Ok((_, peer)) = sock.recv_from(&mut first) else {
                return;
            };
            sock.connect(peer)
                .expect("connecting to the pod's endpoint");
            let mut payload = [0u8; UDP_PAYLOAD];
            let mut iov = libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            };
            // SAFETY: all-zero mmsghdr are valid; the pointers are set below.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; UDP_BATCH];
            for m in &mut msgs {
                m.msg_hdr.msg_iov = &raw mut iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            let fd = sock.as_raw_fd();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the headers point at a live payload; the socket is connected.
                let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
                if n > 0 {
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("UDP replier did not start")?;
    let mut pod = Looper::new();
    {
        let (stop, received) = (pod.stop.clone(), received.clone());
        pod.threads.push(lab.pods()[0].spawn(move || {
            pin_to_cpu(1);
            let sock = UdpSocket::bind("0.0.0.0:0").expect("binding the pod's socket");
            sock.connect(SocketAddrV4::new(SERVER, UDP_REPLY_PORT))
                .expect("connecting the pod's socket");
            set_int_opt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                8 << 20,
            );
            let _ = sock.send(b"open");
            let fd = sock.as_raw_fd();
            let mut bufs = vec![[0u8; 64]; 64];
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: all-zero mmsghdr are valid; the pointers are set below.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; 64];
            for (j, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_iov = &raw mut iovs[j];
                m.msg_hdr.msg_iovlen = 1;
            }
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the headers point at live buffers of the stated sizes.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        msgs.len() as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    let (rx_rate, tx_rate) = window_rates(&received, &sent, secs);
    server.stop();
    std::thread::sleep(Duration::from_millis(50));
    pod.stop();
    crate::check()?;
    settle();
    Ok(UdpWindow {
        rx_rate,
        tx_rate,
        received: received.load(Ordering::Relaxed),
        sent: sent.load(Ordering::Relaxed),
        bad_source: 0,
    })
}

/// An iperf3 server in the lab's server namespace, listening before this returns.
fn iperf_server(lab: &Lab) -> anyhow::Result<ChildGuard> {
    let port = IPERF_PORT.to_string();
    let server = ChildGuard::spawn(ns_command(
        &lab.topo.server,
        &["iperf3", "-s", "-p", &port, "-B", &SERVER.to_string()],
    ))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        crate::check()?;
        let out = run_bounded(
            ns_command(
                &lab.topo.server,
                &["ss", "-Hltn", &format!("sport = :{port}")],
            ),
            None,
            Duration::from_secs(10),
        )?;
        if !out.stdout.is_empty() {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("iperf3 -s did not listen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bulk TCP from pod 0 to the lab's iperf3 server, or from the server to pod 0 (`reverse`,
/// `iperf3 -R`) (one stream, offloads on): Gbit/s received and the sender's retransmissions.
fn bulk(lab: &Lab, secs: u32, reverse: bool) -> anyhow::Result<(f64, f64)> {
    let port = IPERF_PORT.to_string();
    let secs_arg = secs.to_string();
    let server = SERVER.to_string();
    let mut args = vec!["iperf3", "-c", &server, "-p", &port, "-t", &secs_arg, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = run_bounded(
        ns_command(lab.pods()[0], &args),
        None,
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")?;
    let retrans = json["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .unwrap_or(0.0);
    Ok((bps / 1e9, retrans))
}

/// After a 300 ms warm-up, the rates (per second) at which `received` and `sent` grow over a
/// window of `secs` (cut short by a stop signal, and bounded at `secs + 10` s in all).
fn window_rates(received: &AtomicU64, sent: &AtomicU64, secs: f64) -> (f64, f64) {
    let limit = Instant::now() + Duration::from_secs_f64(secs + 10.0);
    std::thread::sleep(Duration::from_millis(300));
    let (rx0, tx0, t0) = (
        received.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    while t0.elapsed().as_secs_f64() < secs && !crate::interrupted() && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dt = t0.elapsed().as_secs_f64();
    (
        (received.load(Ordering::Relaxed) - rx0) as f64 / dt,
        (sent.load(Ordering::Relaxed) - tx0) as f64 / dt,
    )
}

/// Where snat's added time per datagram goes: one more UDP window of each kind for `snat`, after
/// the compared ones, with the kernel's BPF run-time statistics on (they add two clock reads to
/// every run, so they stay off while contenders are compared): the egress program's own time
/// per datagram in the real path (`{key}.egress_prog_ns`), against the whole path's time added
/// over plain routing in the compared windows. Then one more bulk transfer: both programs' time
/// as a share of the machine's busy CPU time over it (`bulk.prog_share`) and per run
/// (`bulk.prog_ns`).
fn program_time(
    plan: &Plan,
    labs: &[Lab],
    actives: &[crate::lab::Active<'_>],
    results: &mut Results,
) -> anyhow::Result<()> {
    let c = Contender::Snat;
    let Some(k) = Contender::ALL.iter().position(|&x| x == c) else {
        return Ok(());
    };
    let Some(agent) = &actives[k].agent else {
        return Ok(());
    };
    let Some(prog) = crate::exhaustion::agent_prog(agent.pid(), PROG_EGRESS) else {
        say(format_args!(
            "  snat's egress program not found: no per-datagram program time"
        ));
        return Ok(());
    };
    let Some(stats) = crate::exhaustion::run_time_stats("no per-datagram program time") else {
        return Ok(());
    };
    for (key, many) in [("udp1", false), ("udpN", true)] {
        crate::check()?;
        let before = crate::exhaustion::prog_stats(prog).unwrap_or((0, 0));
        udp_rate(&labs[k], c, many, plan.udp_secs)?;
        let after = crate::exhaustion::prog_stats(prog).unwrap_or((0, 0));
        let runs = after.1.saturating_sub(before.1);
        if runs > 0 {
            let per = after.0.saturating_sub(before.0) as f64 / runs as f64;
            results.push(&format!("{key}.egress_prog_ns"), c, per);
            say(format_args!(
                "  {key}: snat's egress program {per:.0} ns per datagram over {runs} runs"
            ));
        }
    }
    // Bulk: both programs (segments out, ACKs back) against the machine's busy CPU time over
    // the same transfer.
    let progs = entry_progs(agent.pid());
    crate::check()?;
    let before = prog_stats_of(&progs);
    let busy_before = crate::exhaustion::busy_ticks()?;
    let (gbps, _) = bulk(&labs[k], plan.bulk_secs, false)?;
    let busy = (crate::exhaustion::busy_ticks()? - busy_before) as f64
        / crate::scale::clock_ticks() as f64;
    let (ns, runs) = prog_deltas(&before, &prog_stats_of(&progs))
        .into_iter()
        .fold((0, 0), |(t, n), (dt, dn)| (t + dt, n + dn));
    if runs > 0 && busy > 0.0 {
        let share = ns as f64 / 1e9 / busy;
        results.push("bulk.prog_share", c, share);
        results.push("bulk.prog_ns", c, ns as f64 / runs as f64);
        say(format_args!(
            "  bulk: snat's programs {:.0} ns a run over {runs} runs (segments and ACKs), {:.2} % of the machine's busy CPU ({busy:.1} CPU-seconds) at {gbps:.2} Gbit/s",
            ns as f64 / runs as f64,
            share * 100.0
        ));
    }
    drop(stats);
    Ok(())
}
