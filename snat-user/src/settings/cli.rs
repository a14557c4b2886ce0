//! The `snat` command line.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::{
    cidr::IpCidr,
    duration,
    pod_iface::PodIface,
    ports::{PortList, PortRange},
    udp_ports, AttachChoice, EbpfLog, Hairpin, IngressChoice, IpPooling, MetricsAddr, OnExhaustion,
    OnStop, MAX_METRICS_MIN_INTERVAL,
};

/// snat: an eBPF egress NAT for Linux nodes.
///
/// Pods behind a node share a few public (NAT) IPs; every outbound flow needs a (NAT IP, SNAT
/// port) pair. snat translates those flows in the kernel, on the node's uplink, and never lets a
/// pod's packet leave with its internal address.
#[derive(Debug, Parser)]
#[command(name = "snat", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the NAT to an uplink and run until SIGINT/SIGTERM (needs root).
    Run(Box<RunArgs>),
    /// SNAT port use per NAT IP and protocol (allocated, in use, mappings, exhaustion), and who
    /// holds the most ports.
    Status(AgentArgs),
    /// Every packet and allocation counter of the agent, mappings and releases.
    Stats(AgentArgs),
    /// The mappings (SNAT connections), one a line, like `conntrack -L`.
    Conns(ConnsArgs),
    /// Who holds the most SNAT ports, refreshed like `top`.
    Top(TopArgs),
    /// Change a running agent's settings without dropping connections.
    Set(SetArgs),
    /// Remove the state an agent left on an interface (`--keep-state`, or a crash): its programs
    /// detach and its mappings are gone.
    Cleanup(CleanupArgs),
    /// Plan per-node SNAT port slices for nodes sharing NAT IPs, with Azure's checks
    /// (`(nodes + surge) × ports per node ≤ ports per IP × IPs`).
    Plan(PlanArgs),
    /// Cluster mode's return path: on the box the NAT IPs' traffic reaches, forward each reply
    /// to the node holding its port's block, following the blocks in etcd (needs root).
    Gateway(super::cluster::GatewayArgs),
    /// Cluster mode's state in etcd: `status` lists nodes, blocks, gateways and free blocks;
    /// `release NODE` frees a dead node's blocks through the cool-down.
    Cluster(super::cluster::ClusterCommand),
}

impl Command {
    /// The subcommand's name, as typed.
    pub const fn name(&self) -> &'static str {
        match self {
            Command::Run(_) => "run",
            Command::Status(_) => "status",
            Command::Stats(_) => "stats",
            Command::Conns(_) => "conns",
            Command::Top(_) => "top",
            Command::Set(_) => "set",
            Command::Cleanup(_) => "cleanup",
            Command::Plan(_) => "plan",
            Command::Gateway(_) => "gateway",
            Command::Cluster(_) => "cluster",
        }
    }
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// The interface the state belongs to.
    #[arg(long, value_name = "IF")]
    pub iface: String,

    /// The BPF file system directory it was pinned under.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/snat")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Nodes (backend instances) sharing the NAT IPs.
    #[arg(long, value_name = "N")]
    pub nodes: u32,

    /// Extra nodes that exist during upgrades (AKS maxSurge, default 1 there); they get slices too.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub surge: u32,

    /// Number of NAT (outbound public) IPs, of both families; implied by --nat-ip.
    #[arg(long, value_name = "K")]
    pub ips: Option<u32>,

    /// The NAT IPs, IPv4 and IPv6 (each one of the --ips, with the same slices), so the plan
    /// can be given to `snat run --plan`; repeat for each.
    #[arg(long = "nat-ip", value_name = "IP", value_parser = nat_ip)]
    pub nat_ips: Vec<IpAddr>,

    /// SNAT ports each node holds over all NAT IPs (Azure's allocatedOutboundPorts). Default:
    /// Azure's allocation table by pool size (1,024 per IP up to 50 nodes, … 32 up to 1,000).
    #[arg(long, value_name = "P")]
    pub ports_per_node: Option<u32>,

    /// The port range each NAT IP offers (our default, 32,768 ports).
    #[arg(long, value_name = "LO:HI", conflicts_with = "ports_per_ip")]
    pub port_range: Option<PortRange>,

    /// Plan in Azure's terms: this many ports per IP from 1024 up (Azure: 64000).
    #[arg(long, value_name = "M")]
    pub ports_per_ip: Option<u32>,

    /// Print the plan as JSON (the file `snat run --plan` reads).
    #[arg(long)]
    pub json: bool,
}

/// Options of the commands that talk to a running agent. They reach the agent of the network
/// namespace they run in (use `ip netns exec NS snat …` for another).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The interface the agent runs on.
    #[arg(long, value_name = "IF")]
    pub iface: String,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// Only mappings whose internal (pod) source is in this CIDR, IPv4 or IPv6 (a network of
    /// one family selects only that family's mappings).
    #[arg(long, value_name = "CIDR")]
    pub source: Option<IpCidr>,

    /// Only mappings whose destination is in this CIDR, IPv4 or IPv6.
    #[arg(long, value_name = "CIDR")]
    pub destination: Option<IpCidr>,

    /// Only mappings of this protocol: tcp, udp or icmp.
    #[arg(long, value_name = "PROTO")]
    pub proto: Option<snat_common::Proto>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The interface the agent runs on.
    #[arg(long, value_name = "IF")]
    pub iface: String,

    /// Rank internal sources (pods) or destinations.
    #[arg(long, value_name = "WHAT", default_value = "source")]
    pub by: TopBy,

    /// Time between refreshes.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration::parse)]
    pub interval: Duration,

    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TopBy {
    Source,
    Destination,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The interface the agent runs on.
    #[arg(long, value_name = "IF")]
    pub iface: String,

    #[command(subcommand)]
    pub what: SetWhat,
}

#[derive(Debug, Subcommand)]
pub enum SetWhat {
    /// Move this node to its slice of a (new) plan: NAT IPs and port range. Mappings made
    /// before keep their NAT IP and port until they end.
    Plan {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// This node's index in the plan.
        #[arg(long, value_name = "I")]
        node_index: u32,
    },
    /// New flows use this SNAT port range (like `calicoctl patch felixconfiguration … natPortRange`);
    /// mappings already outside it keep working until they end.
    PortRange {
        #[arg(value_name = "LO:HI")]
        range: PortRange,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node's uplink: outbound pod traffic leaving through it is translated (egress), and
    /// replies arriving on it are translated back (ingress).
    #[arg(long, value_name = "IF")]
    pub iface: String,

    /// A public/outbound NAT IP (frontend IP) to translate to, IPv4 or IPv6; repeat for several.
    /// Each pod address is paired with one of its own family (paired pooling). Default: for IPv4
    /// --internal networks the interface's primary IPv4 address, for IPv6 ones its first global
    /// IPv6 address (a ULA only when it has no other; never a temporary or deprecated one).
    #[arg(long = "nat-ip", value_name = "IP", value_parser = nat_ip)]
    pub nat_ips: Vec<IpAddr>,

    /// Internal (pod) CIDR whose sources are translated, IPv4 (10.244.0.0/16) or IPv6
    /// (fd00:10::/64); repeat for several. At least one is required.
    #[arg(long = "internal", value_name = "CIDR")]
    pub internal: Vec<IpCidr>,

    /// Destination CIDR never translated, IPv4 or IPv6 (e.g. the cluster's pod and service
    /// CIDRs); repeat for several. The internal CIDRs are always excluded.
    #[arg(long = "exclude", value_name = "CIDR")]
    pub exclude: Vec<IpCidr>,

    /// SNAT ports this node hands out on each NAT IP, inclusive: Calico's natPortRange. The
    /// default stays clear of the NodePort range (30000-32767) and of well-known ports.
    #[arg(long, value_name = "LO:HI", default_value_t = PortRange::DEFAULT)]
    pub port_range: PortRange,

    /// What a pod learns when a new flow gets no SNAT port (none left towards the destination,
    /// its --max-ports-per-source, or its fair share): `reject` answers at once (TCP RST, ICMP
    /// destination unreachable code 13, RFC 5508 REQ-8); `drop` lets its connect time out.
    #[arg(long, value_name = "WHAT", default_value = "reject")]
    pub on_exhaustion: OnExhaustion,

    /// How a pod's flows use the NAT IPs. `overflow`: the NAT IP the pod is paired with first
    /// and, when it has no port left towards a flow's destination, the next ones in order, so
    /// every NAT IP adds ports for the pod that needs them. `paired`: only the paired one, so a
    /// pod keeps one public address for all its flows (RFC 4787 REQ-2; for protocols that need
    /// it, such as some P2P, SIP or FTP-style applications).
    #[arg(long, value_name = "MODE", default_value = "overflow")]
    pub ip_pooling: IpPooling,

    /// Answers to refused flows per second and CPU at most; above that they are dropped.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub reject_rate: u32,

    /// Most SNAT ports (mappings) one internal source IP (pod) may hold per NAT IP and
    /// protocol, so one pod cannot starve its neighbours (RFC 6888's per-subscriber limit).
    /// 0: no cap.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_ports_per_source: u32,

    /// Fair share: once a destination's ports are more than --fair-share-threshold used, a pod
    /// holding at least range/(pods towards it + 1) of them gets no more, while others still do.
    #[arg(long)]
    pub fair_share: bool,

    /// Fraction of a destination's ports in use from which the fair share applies.
    #[arg(
        long,
        value_name = "FRACTION",
        default_value_t = 0.8,
        requires = "fair_share"
    )]
    pub fair_share_threshold: f64,

    /// Ports never handed out, e.g. the Kubernetes NodePort range; --port-range must not overlap
    /// them.
    #[arg(long, value_name = "LIST", default_value = "30000-32767")]
    pub reserved_ports: PortList,

    /// Run on this node's slice of a cluster plan (`snat plan … --json`): the node's port slice
    /// replaces --port-range, and the plan's NAT IPs --nat-ip for each family it names (IPv4,
    /// IPv6); a family it names none of takes --nat-ip or the interface's address.
    #[arg(long, value_name = "FILE", conflicts_with = "port_range")]
    pub plan: Option<PathBuf>,

    /// This node's index in --plan.
    #[arg(long, value_name = "I", requires = "plan")]
    pub node_index: Option<u32>,

    /// A file holding this node's index in --plan (e.g. written by an init container from the
    /// node's label).
    #[arg(
        long,
        value_name = "FILE",
        requires = "plan",
        conflicts_with = "node_index"
    )]
    pub node_index_file: Option<PathBuf>,

    /// Idle timeout of an established TCP connection (RFC 5382: at least 2h4m).
    #[arg(long, value_name = "DURATION", default_value = "2h4m", value_parser = duration::parse)]
    pub tcp_established_timeout: Duration,

    /// Idle timeout of a TCP connection being opened or half-closed (RFC 5382: at least 4m).
    #[arg(long, value_name = "DURATION", default_value = "4m", value_parser = duration::parse)]
    pub tcp_transitory_timeout: Duration,

    /// SNAT port release after a FIN was sent in both directions (Azure: 240s).
    #[arg(long, value_name = "DURATION", default_value = "240s", value_parser = duration::parse)]
    pub tcp_fin_timeout: Duration,

    /// SNAT port release after a TCP RST was sent or received (Azure: 15s).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration::parse)]
    pub tcp_rst_timeout: Duration,

    /// Idle timeout of a UDP mapping (RFC 4787: at least 2m, 5m recommended).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration::parse)]
    pub udp_timeout: Duration,

    /// Idle timeout of UDP flows to one well-known destination port (1-1023), as RFC 4787
    /// REQ-5a allows, answered or not: PORT=DURATION (1s to 2h), repeatable. Given values replace
    /// the default list (name 53 again to keep it); `none`: every UDP flow gets --udp-timeout.
    #[arg(
        long,
        value_name = "PORT=DURATION",
        default_value = "53=30s",
        value_parser = clap::value_parser!(udp_ports::PortTimeout)
    )]
    pub udp_timeout_for: Vec<udp_ports::PortTimeout>,

    /// Idle timeout of an ICMP echo mapping (RFC 5508: at least 60s).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::parse)]
    pub icmp_timeout: Duration,

    /// Concurrent mappings (SNAT connections) the kernel tables hold; memory is reserved up
    /// front, about 330 bytes per mapping over all tables (325 MiB at the default).
    #[arg(long, value_name = "N", default_value_t = snat_common::DEFAULT_MAX_MAPPINGS)]
    pub max_mappings: u32,

    /// How often idle mappings are looked for and their ports released.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    pub gc_interval: Duration,

    /// How to attach: `tcx` links (kernel >= 6.6), `clsact` (cls_bpf filters on a clsact qdisc,
    /// for older kernels or tools that expect them), or `auto` (TCX, else clsact).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub attach: AttachChoice,

    /// Where replies are translated back to the pods: `tc` (the TC ingress program), or XDP on
    /// the uplink before TC: `xdp` (native where the driver supports it, else generic),
    /// `xdp-native` (refused where the driver has no native XDP) or `xdp-generic`. With XDP the
    /// TC program stays attached for the replies XDP leaves to it (checksums pending offload).
    /// docs/benchmarks.md compares the two on veth.
    #[arg(long, value_name = "PATH", default_value = "tc")]
    pub ingress: IngressChoice,

    /// Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): a pod's TCP or UDP packet to a NAT IP and
    /// a port of the range reaches the pod whose mapping holds that port, from the sender's own
    /// NAT endpoint (and is dropped when that mapping never sent to it, as a remote host's would
    /// be). Needs --pod-iface: the NAT IP is the node's own address, so such a packet arrives on
    /// the pod's interface and never reaches the uplink. Off by default: it puts a program on
    /// every pod's interface, and pods of one cluster reach each other by their own addresses.
    /// IPv4 only for now: with IPv6 networks too, their packets are not hairpinned.
    #[arg(long, value_name = "on|off", default_value = "off")]
    pub hairpin: Hairpin,

    /// With --hairpin on: the node's interfaces towards the pods, by name or by a prefix ending
    /// in `*` (repeatable), e.g. `cali*` (Calico), `lxc*` (Cilium), `veth*`, or a bridge such as
    /// `cni0`. snat attaches to each matching interface as it appears (never to the uplink).
    #[arg(long = "pod-iface", value_name = "NAME|PREFIX*")]
    pub pod_ifaces: Vec<PodIface>,

    /// Kernel-side log level. `off` compiles logging out of the loaded programs.
    #[arg(long, value_name = "LEVEL", default_value = "off")]
    pub ebpf_log: EbpfLog,

    /// Members of this group (a name or a numeric gid) may read through the control socket
    /// (`status`, `stats`, `conns`, `top`); changes (`set`) and, without this flag, reads too
    /// are for root and CAP_NET_ADMIN only.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Serve Prometheus metrics on this address (path /metrics), in the agent's namespace, or
    /// `off`. Any process that can reach it can read it; a non-loopback address is warned about.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9469")]
    pub metrics_addr: MetricsAddr,

    /// Scrapes within this time of the last report build get that build's text: 100 parallel
    /// scrapes cost one walk of the tables. 0s to 60s; 0s builds for every scrape, one at a time.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = metrics_min_interval)]
    pub metrics_min_interval: Duration,

    /// How many internal sources and destinations the metrics and `status` name (the busiest
    /// ones), so label cardinality stays bounded. 0 names none: /metrics then carries no pod or
    /// destination address.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub top_sources: usize,

    /// BPF file system directory for state that outlives the agent (mapping tables, and the TCX
    /// links that keep the programs attached): `<DIR>/<iface>/`. A restarted agent takes it
    /// over; a plain stop removes it.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/snat")]
    pub pin_dir: PathBuf,

    /// On SIGINT/SIGTERM leave the programs attached and the state pinned, for an upgrade or
    /// restart that keeps every connection (`snat cleanup` removes it).
    #[arg(long)]
    pub keep_state: bool,

    /// What a plain stop (SIGINT/SIGTERM without --keep-state) leaves on the uplink. `closed`: a
    /// guard that drops (and counts) every packet from the internal CIDRs to a destination that
    /// is not excluded, so no pod address leaves untranslated, until the next agent takes over
    /// (atomically) or `snat cleanup` removes it. `open`: nothing; the node routes pod traffic as
    /// it would without snat, so pods' own addresses leave unless something else masquerades them.
    #[arg(long, value_name = "WHAT", default_value = "closed")]
    pub on_stop: OnStop,

    /// Write the final report as JSON to this file on exit (for scripts and tests).
    #[arg(long, value_name = "FILE")]
    pub stats_file: Option<PathBuf>,

    #[command(flatten)]
    pub cluster: super::cluster::ClusterArgs,

    /// Read settings from a TOML file whose keys are these flags' names (`port-range = "…"`,
    /// `internal = ["…"]`); flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Reads `--metrics-min-interval`: a duration from 0s to [`MAX_METRICS_MIN_INTERVAL`].
fn metrics_min_interval(s: &str) -> Result<Duration, String> {
    let d = duration::parse(s).map_err(|e| e.to_string())?;
    if d > MAX_METRICS_MIN_INTERVAL {
        return Err(format!(
            "{s} is longer than {}: scrapes would get figures that old; use 0s to {} (e.g. 1s)",
            duration::Human(MAX_METRICS_MIN_INTERVAL),
            duration::Human(MAX_METRICS_MIN_INTERVAL)
        ));
    }
    Ok(d)
}

/// `snat run --nat-ip`, `snat plan --nat-ip`: an IPv4 or IPv6 address.
fn nat_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an IP address: write an IPv4 address like 203.0.113.7 or an IPv6 address like 2001:db8::7")
    })
}
