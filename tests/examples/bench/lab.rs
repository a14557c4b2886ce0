//! A lab: one copy of the harness's topology, a server namespace made fresh on demand, the
//! contenders' setup and teardown (drop guards), and child processes bounded in time.
//!
//! Everything is created inside the topology's namespaces, named with its per-process prefix,
//! and removed by exact name: the nftables table by `nft delete table ip|ip6 <name>` in the node's
//! namespace, the namespaces by the harness on drop.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tests::{
    agent::Agent,
    netns::Netns,
    topo::{self, Topology, NAT_IP, NAT_IP6, POD_CIDR, POD_CIDR6},
};

/// Each pod's `ip_local_port_range`.
pub const POD_PORTS: &str = "40000 40999";

/// The NAT port range every NAT contender uses (snat's default, Calico's `natPortRange` style).
pub const PORT_RANGE: &str = "32768:65535";

/// Who translates (or not) the pods' traffic on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contender {
    /// Plain routing: the router has a route back to the pods.
    None,
    /// Plain routing again, in a lab of its own: the control. Its ratio to `None` is how far
    /// apart this run measures two contenders that do exactly the same.
    Control,
    /// nftables `masquerade` (port-preserving).
    NftMasq,
    /// nftables `masquerade to :32768-65535`.
    NftRange,
    /// nftables `masquerade to :32768-65535 fully-random`.
    NftRandom,
    /// The snat agent on the uplink, `--port-range 32768:65535` (replies through TC).
    Snat,
    /// The same with `--ingress xdp`: replies through XDP in front of TC.
    SnatXdp,
    /// IPv6 (NAT66, a dual-stack lab): plain routing of the pods' IPv6.
    None6,
    /// IPv6: nftables `masquerade to :32768-65535` in an `ip6` table.
    NftRange6,
    /// IPv6: the snat agent for both pod networks.
    Snat6,
}

impl Contender {
    pub const ALL: [Contender; 7] = [
        Contender::None,
        Contender::Control,
        Contender::NftMasq,
        Contender::NftRange,
        Contender::NftRandom,
        Contender::Snat,
        Contender::SnatXdp,
    ];
    pub const NFT: [Contender; 3] = [
        Contender::NftMasq,
        Contender::NftRange,
        Contender::NftRandom,
    ];
    /// The IPv6 contenders, in dual-stack labs of their own.
    pub const ALL6: [Contender; 3] = [Contender::None6, Contender::NftRange6, Contender::Snat6];

    /// Whether the contender is one of the IPv6 ones ([`Contender::ALL6`]).
    pub const fn is_ipv6(self) -> bool {
        matches!(
            self,
            Contender::None6 | Contender::NftRange6 | Contender::Snat6
        )
    }

    /// Short name for tables and the plot.
    pub const fn label(self) -> &'static str {
        match self {
            Contender::None => "none",
            Contender::Control => "none again",
            Contender::NftMasq => "nft masq",
            Contender::NftRange => "nft range",
            Contender::NftRandom => "nft range random",
            Contender::Snat => "snat",
            Contender::SnatXdp => "snat xdp",
            Contender::None6 => "none (IPv6)",
            Contender::NftRange6 => "nft range (IPv6)",
            Contender::Snat6 => "snat (IPv6)",
        }
    }

    /// What it is exactly: for the nftables forms, the whole rule as it is loaded (with
    /// `<uplink>` for the node's uplink, whose name has the lab's prefix).
    pub fn describe(self) -> String {
        match self {
            Contender::None => {
                format!("plain routing: the router has a route back to {POD_CIDR} via the node")
            }
            Contender::Control => "plain routing as `none`, in a lab of its own: the control (its ratio to `none` shows how far apart this run measures two identical contenders)".to_owned(),
            Contender::None6 => {
                format!("plain routing: the router has a route back to {POD_CIDR6} via the node")
            }
            Contender::NftMasq
            | Contender::NftRange
            | Contender::NftRandom
            | Contender::NftRange6 => format!(
                "nftables on the node: `{}`",
                self.nft_rule("<uplink>").unwrap_or_default()
            ),
            Contender::Snat => format!(
                "snat agent on the node's uplink: `snat run --internal {POD_CIDR} --port-range {PORT_RANGE} --ingress tc` (other flags default)"
            ),
            Contender::SnatXdp => "the same with `--ingress xdp`: replies translated in XDP (native mode on the veth) in front of TC, which takes the replies XDP leaves it".to_owned(),
            Contender::Snat6 => format!(
                "snat agent on the node's uplink: `snat run --internal {POD_CIDR} --internal {POD_CIDR6} --port-range {PORT_RANGE}` (IPv6 to the uplink's {NAT_IP6}; TC both ways)"
            ),
        }
    }

    /// The source address the server must see from a pod at `pod` (of the contender's family).
    pub fn seen_source(self, pod: IpAddr) -> IpAddr {
        match self {
            Contender::None | Contender::Control | Contender::None6 => pod,
            c if c.is_ipv6() => NAT_IP6.into(),
            _ => NAT_IP.into(),
        }
    }

    fn nft_rule(self, uplink: &str) -> Option<String> {
        let tail = match self {
            Contender::NftMasq => "masquerade",
            Contender::NftRange => "masquerade to :32768-65535",
            Contender::NftRandom => "masquerade to :32768-65535 fully-random",
            Contender::NftRange6 => {
                return Some(format!(
                    "ip6 saddr {POD_CIDR6} oifname \"{uplink}\" meta l4proto {{ tcp, udp }} masquerade to :32768-65535"
                ))
            }
            _ => return None,
        };
        Some(format!(
            "ip saddr {POD_CIDR} oifname \"{uplink}\" meta l4proto {{ tcp, udp }} {tail}"
        ))
    }
}

/// The topology and what the bench changes in it.
pub struct Lab {
    pub topo: Topology,
    generation: u32,
    /// Dual-stack (for the IPv6 contenders).
    ipv6: bool,
}

impl Lab {
    pub fn new() -> anyhow::Result<Self> {
        Self::build(false)
    }

    /// A lab whose pods, node, router and server have IPv6 too (the IPv6 contenders').
    pub fn new_dual_stack() -> anyhow::Result<Self> {
        Self::build(true)
    }

    fn build(ipv6: bool) -> anyhow::Result<Self> {
        crate::check()?;
        let topo = if ipv6 {
            Topology::new_dual_stack(2)
        } else {
            Topology::new(2)
        };
        topo.set_offload(true);
        // Pods reuse their source ports quickly, as a pod churning at this rate for minutes
        // would: 1,000 ports each (as the harness's churn test), inside the NAT range.
        for p in &topo.pods {
            p.ns.sysctl(&format!("net.ipv4.ip_local_port_range={POD_PORTS}"));
        }
        let lab = Self {
            topo,
            generation: 0,
            ipv6,
        };
        lab.tune_server();
        Ok(lab)
    }

    pub fn pods(&self) -> [&Netns; 2] {
        [&self.topo.pods[0].ns, &self.topo.pods[1].ns]
    }

    pub fn pod_addrs(&self) -> [Ipv4Addr; 2] {
        [self.topo.pods[0].addr, self.topo.pods[1].addr]
    }

    /// The pods' IPv6 addresses (dual-stack labs).
    pub fn pod_addrs6(&self) -> [Ipv6Addr; 2] {
        [self.topo.pods[0].addr6(), self.topo.pods[1].addr6()]
    }

    /// The nftables table of this lab (in its node's namespace).
    pub fn nft_table(&self) -> String {
        format!("snatbench_{}", self.topo.prefix)
    }

    /// Room for the TIME_WAIT sockets churn leaves on the server, and for connection bursts.
    fn tune_server(&self) {
        let s = &self.topo.server;
        s.sysctl("net.ipv4.tcp_max_tw_buckets=2000000");
        s.sysctl("net.core.somaxconn=4096");
        s.sysctl("net.ipv4.tcp_max_syn_backlog=8192");
    }

    /// Replaces the server namespace with a fresh one (same addresses, same interface names), so
    /// that no contender meets the TIME_WAIT sockets another one left behind. Waits until the
    /// kernel has dismantled the old one (its veth peer in the router is gone).
    pub fn fresh_server(&mut self) -> anyhow::Result<()> {
        self.generation += 1;
        let prefix = self.topo.prefix.clone();
        let (rs, sr) = (format!("{prefix}-rs"), format!("{prefix}-sr"));
        let fresh = Netns::new(&format!("{prefix}-sv{}", self.generation));
        drop(std::mem::replace(&mut self.topo.server, fresh));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Command::new("ip")
            .args(["-n", &self.topo.router.name, "link", "show", "dev", &rs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            if Instant::now() > deadline {
                bail!("the old server namespace was not dismantled within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (router, server) = (&self.topo.router, &self.topo.server);
        topo::connect_server(&prefix, router, server);
        if self.ipv6 {
            topo::connect_server6(&prefix, router, server);
        }
        for (ns, dev) in [(router, &rs), (server, &sr)] {
            ns.exec(&[
                "ethtool", "-K", dev, "tx", "on", "rx", "on", "tso", "on", "gso", "on", "gro", "on",
            ]);
        }
        self.tune_server();
        Ok(())
    }

    /// Sets contender `c` up; it is torn down when the guard drops.
    pub fn activate(&self, c: Contender) -> anyhow::Result<Active<'_>> {
        let mut active = Active {
            lab: self,
            agent: None,
            table: None,
            route: None,
        };
        if c.is_ipv6() && !self.ipv6 {
            bail!("{} needs a dual-stack lab", c.label());
        }
        match c {
            Contender::None | Contender::Control => {
                self.topo
                    .router
                    .ip(&["route", "replace", POD_CIDR, "via", &NAT_IP.to_string()]);
                active.route = Some(("-4", POD_CIDR));
            }
            Contender::None6 => {
                self.topo.router.ip(&[
                    "-6",
                    "route",
                    "replace",
                    POD_CIDR6,
                    "via",
                    &NAT_IP6.to_string(),
                ]);
                active.route = Some(("-6", POD_CIDR6));
            }
            Contender::NftMasq
            | Contender::NftRange
            | Contender::NftRandom
            | Contender::NftRange6 => {
                let table = self.nft_table();
                let family = if c.is_ipv6() { "ip6" } else { "ip" };
                let rule = c.nft_rule(&self.topo.uplink).expect("an nft contender");
                let script = format!(
                    "table {family} {table} {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {rule}\n  }}\n}}\n"
                );
                active.table = Some((family, table));
                let out = run_bounded(
                    ns_command(&self.topo.node, &["nft", "-f", "-"]),
                    Some(&script),
                    Duration::from_secs(20),
                )?;
                if !out.status.success() {
                    bail!(
                        "nft -f failed: {}\n{script}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            Contender::Snat | Contender::SnatXdp => {
                let ingress = if c == Contender::SnatXdp { "xdp" } else { "tc" };
                active.agent = Some(Agent::start(
                    &self.topo.node,
                    &self.topo.uplink,
                    &[
                        "--internal",
                        POD_CIDR,
                        "--port-range",
                        PORT_RANGE,
                        "--ingress",
                        ingress,
                    ],
                ));
            }
            Contender::Snat6 => {
                active.agent = Some(Agent::start(
                    &self.topo.node,
                    &self.topo.uplink,
                    &[
                        "--internal",
                        POD_CIDR,
                        "--internal",
                        POD_CIDR6,
                        "--port-range",
                        PORT_RANGE,
                    ],
                ));
            }
        }
        // The router never needs a route to the pods except for plain routing: make sure of it.
        if !matches!(c, Contender::None | Contender::Control | Contender::None6) {
            let (family, pods) = if c.is_ipv6() {
                ("-6", POD_CIDR6)
            } else {
                ("-4", POD_CIDR)
            };
            let routes = self.topo.router.ip(&[family, "route", "show", pods]);
            if !routes.stdout.is_empty() {
                bail!(
                    "the router has a route to the pods while {} runs",
                    c.label()
                );
            }
        }
        Ok(active)
    }
}

/// A contender set up in the lab; torn down on drop (also on failure and Ctrl-C).
pub struct Active<'a> {
    lab: &'a Lab,
    pub agent: Option<Agent>,
    /// The nftables table: (family, name).
    table: Option<(&'static str, String)>,
    /// The router's route to the pods: (`ip` family flag, pods' network).
    route: Option<(&'static str, &'static str)>,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let topo = &self.lab.topo;
        if let Some(agent) = self.agent.take() {
            drop(agent);
        }
        if let Some((family, table)) = self.table.take() {
            let _ = run_bounded(
                ns_command(&topo.node, &["nft", "delete", "table", family, &table]),
                None,
                Duration::from_secs(20),
            );
            // The node's conntrack entries would otherwise outlive the table into the next run.
            let _ = run_bounded(
                ns_command(&topo.node, &["conntrack", "-F"]),
                None,
                Duration::from_secs(20),
            );
        }
        if let Some((family, pods)) = self.route.take() {
            let mut del = Command::new("ip");
            del.args(["-n", &topo.router.name, family, "route", "del", pods]);
            let _ = run_bounded(del, None, Duration::from_secs(20));
        }
    }
}

/// `ip netns exec <ns> <args…>`.
pub fn ns_command(ns: &Netns, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).args(args);
    c
}

/// Runs a command to completion (with `stdin` as its standard input), killing it after `limit`;
/// returns its output.
pub fn run_bounded(
    mut cmd: Command,
    stdin: Option<&str>,
    limit: Duration,
) -> anyhow::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{:?}", cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawning {shown}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write as _;
        pipe.write_all(data.as_bytes())
            .with_context(|| format!("writing to {shown}"))?;
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet (the waiting
            // thread still holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{shown} did not finish within {limit:?}; killed")
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self(Some(child)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `f` on a thread (with an 8 MiB stack, enough for loading the eBPF object) that has
/// entered `ns`, and waits for it.
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd as _;
    let path = format!("/run/netns/{}", ns.name);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            // SAFETY: `file` is an open namespace file; setns only changes this thread's
            // network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .context("spawning a thread")?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Pins the calling thread to CPU `cpu` (modulo the CPUs there are); best effort.
pub fn pin_to_cpu(cpu: usize) {
    let n = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: an all-zero cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it and
    // this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}
