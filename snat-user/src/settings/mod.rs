//! What the operator asked for: the command line ([`cli`]), the `--config` file ([`file`]), a
//! cluster plan's slice ([`plan`]), and their validation into [`Settings`], before anything
//! touches the kernel. The layers above take a plain `Settings`; clap stays in this one.
//!
//! Invariant: a `Settings` value is internally consistent (at least one internal CIDR of either
//! family; for each family, 1..=64 distinct NAT IPs of that family none of which is internal when
//! it has an internal CIDR, and none when it has not; no IPv6 in cluster mode; timeouts of at
//! least one second, a table size the kernel accepts); every error names the offending value and
//! the fix.

pub mod addrs6;
pub mod cidr;
pub mod cli;
pub mod cluster;
pub mod duration;
pub mod file;
pub mod group;
pub mod plan;
pub mod pod_iface;
pub mod ports;
pub mod udp_ports;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use clap::ValueEnum;
use snat_common::MAX_NAT_IPS;

use self::{
    cidr::{IpCidr, Ipv4Cidr, Ipv6Cidr},
    cli::RunArgs,
    duration::Human,
    group::{Group, GroupError},
    plan::{Plan, PlanFileError},
    ports::{PortList, PortRange},
    udp_ports::PortListError,
};

/// Where `snat run` serves /metrics: `ip:port`, or `off` for nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

/// A `--metrics-addr` that is neither an address nor `off`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --metrics-addr {0:?}: write ip:port (e.g. 127.0.0.1:9469 or [::1]:9469), or off to serve no metrics")]
pub struct MetricsAddrError(String);

impl FromStr for MetricsAddr {
    type Err = MetricsAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::On)
            .map_err(|_| MetricsAddrError(s.to_owned()))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::On(addr) => addr.fmt(f),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnExhaustion {
    Reject,
    Drop,
}

/// How a pod's flows use the NAT IPs (`--ip-pooling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IpPooling {
    /// Every flow of a pod uses the NAT IP it is paired with (RFC 4787 REQ-2); a flow is refused
    /// when that IP has no port left towards its destination.
    Paired,
    /// The paired NAT IP first; when it has no port left towards the destination, the next NAT
    /// IPs in order.
    Overflow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnStop {
    Closed,
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachChoice {
    Auto,
    Tcx,
    Clsact,
}

/// Where replies are translated (`--ingress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IngressChoice {
    /// The TC ingress program (`snat_ingress`).
    Tc,
    /// XDP in front of TC: native (in the driver) where the driver supports it, else generic.
    Xdp,
    /// XDP in the driver only; refused on an interface whose driver has no native XDP.
    XdpNative,
    /// Generic (skb) XDP, on any interface.
    XdpGeneric,
}

impl IngressChoice {
    /// Whether replies go through XDP.
    pub const fn xdp(self) -> bool {
        !matches!(self, IngressChoice::Tc)
    }
}

/// `--hairpin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Hairpin {
    Off,
    On,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EbpfLog {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl EbpfLog {
    /// The value of aya-log's `AYA_LOG_LEVEL` global (0 disables every statement).
    pub const fn aya_level(self) -> u8 {
        match self {
            EbpfLog::Off => 0,
            EbpfLog::Error => 1,
            EbpfLog::Warn => 2,
            EbpfLog::Info => 3,
            EbpfLog::Debug => 4,
        }
    }
}

/// Longest `--metrics-min-interval`: a scrape is never older than this plus one build.
pub const MAX_METRICS_MIN_INTERVAL: Duration = Duration::from_secs(60);

/// The uplink as the kernel describes it (`datapath::netdev` looks it up).
#[derive(Clone, Debug)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// IPv4 addresses in the kernel's order: the primary address comes first.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses of scope global (ULAs included) in the kernel's order, without temporary,
    /// deprecated or DAD-failed ones ([`Interface::read_ipv6`]): the default IPv6 NAT IP's
    /// candidates.
    pub ipv6: Vec<Ipv6Addr>,
}

impl Interface {
    /// The default IPv6 NAT IP: the first global unicast address in the kernel's order that is
    /// not a ULA (fc00::/7), else the first ULA (a node behind NPTv6 or in a lab may have only
    /// those); never a link-local or other unusable address.
    pub fn default_nat_ip6(&self) -> Option<Ipv6Addr> {
        let usable = || self.ipv6.iter().copied().filter(|ip| usable_nat_ip6(*ip));
        usable()
            .find(|ip| !ip.is_unique_local())
            .or_else(|| usable().next())
    }
}

/// Largest `--max-mappings`: 16 Mi mappings need ~2.5 GiB of kernel memory.
pub const MAX_MAPPINGS_LIMIT: u32 = 1 << 24;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_transitory: Duration,
    pub tcp_fin: Duration,
    pub tcp_rst: Duration,
    pub udp: Duration,
    /// UDP flows to these well-known destination ports (`--udp-timeout-for`) instead of `udp`.
    pub udp_ports: BTreeMap<u16, Duration>,
    pub icmp: Duration,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub iface: Interface,
    /// The IPv4 NAT IPs (a `--plan`'s, else `--nat-ip`, else the uplink's); empty when no IPv4
    /// network is internal.
    pub nat_ips: Vec<Ipv4Addr>,
    /// The IPv4 internal networks (`--internal`); may be empty when IPv6 ones are given.
    pub internal: Vec<Ipv4Cidr>,
    /// IPv4 destinations never translated: the `--exclude` CIDRs and the internal ones.
    pub exclude: Vec<Ipv4Cidr>,
    /// The IPv6 NAT IPs (a `--plan`'s, else `--nat-ip`, else the uplink's, see
    /// [`Interface::default_nat_ip6`]);
    /// empty when no IPv6 network is internal.
    pub nat_ips6: Vec<Ipv6Addr>,
    /// The IPv6 internal networks (`--internal`); empty when only IPv4 ones are given.
    pub internal6: Vec<Ipv6Cidr>,
    /// IPv6 destinations never translated: the IPv6 `--exclude` CIDRs and the internal ones.
    pub exclude6: Vec<Ipv6Cidr>,
    pub port_range: PortRange,
    /// Which slice of a cluster plan this node runs on (`--plan`), for status and logs.
    pub slice: Option<String>,
    pub timeouts: Timeouts,
    pub max_mappings: u32,
    pub gc_interval: Duration,
    pub ebpf_log: EbpfLog,
    pub attach: AttachChoice,
    /// Where replies are translated (`--ingress`).
    pub ingress: IngressChoice,
    /// `--hairpin on`: the pods' interfaces (`--pod-iface`) the hairpin program goes on; empty:
    /// off.
    pub hairpin: Vec<pod_iface::PodIface>,
    pub metrics_addr: MetricsAddr,
    pub top_sources: usize,
    pub policy: Policy,
    pub reserved_ports: PortList,
    pub pin_dir: std::path::PathBuf,
    pub keep_state: bool,
    /// What a plain stop leaves on the uplink (`--on-stop`).
    pub on_stop: OnStop,
    /// Members may read through the control socket (`--control-group`).
    pub control_group: Option<Group>,
    /// Scrapes share a report build at most this old (`--metrics-min-interval`).
    pub metrics_min_interval: Duration,
    /// Where to write the final report on exit (`--stats-file`).
    pub stats_file: Option<std::path::PathBuf>,
    /// Cluster mode (`--etcd-endpoints`): port blocks leased on demand.
    pub cluster: Option<cluster::Cluster>,
}

/// Who gets a port when ports run short, and what refused flows learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Answer refused flows (TCP RST / ICMP unreachable) instead of dropping them.
    pub reject: bool,
    /// A flow whose paired NAT IP is full towards its destination takes a port on the next one
    /// (`--ip-pooling overflow`).
    pub overflow: bool,
    pub reject_per_sec: u32,
    /// 0: no cap.
    pub max_per_source: u32,
    /// 0: no fair share; else the threshold in thousandths of the range.
    pub fair_share_permille: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no --internal CIDR given: name the pod CIDR(s) whose traffic snat translates, e.g. --internal 10.244.0.0/16")]
    NoInternal,
    #[error("interface {0:?} has no IPv4 address to use as NAT IP: give one with --nat-ip")]
    NoNatIp(String),
    #[error("--nat-ip {ip} is inside the internal CIDR {cidr}: a NAT IP must be a public/outbound address, not a pod address")]
    NatIpInternal { ip: Ipv4Addr, cidr: Ipv4Cidr },
    #[error("--nat-ip {0} is given twice: list each NAT IP once")]
    DuplicateNatIp(Ipv4Addr),
    #[error("--nat-ip {0} cannot be used: 0.0.0.0, broadcast, multicast and loopback addresses are not NAT IPs")]
    UnusableNatIp(Ipv4Addr),
    #[error("{0} NAT IPs given: snat supports at most {MAX_NAT_IPS}")]
    TooManyNatIps(usize),
    #[error("--{flag} {value} is too short: timeouts must be at least 1s")]
    TimeoutTooShort { flag: &'static str, value: String },
    #[error("--gc-interval {0} is out of range: use 100ms to 1m")]
    GcInterval(String),
    #[error("--max-mappings {0} is out of range: use 1 to {MAX_MAPPINGS_LIMIT}")]
    MaxMappings(u32),
    #[error("--top-sources {0} is out of range: use 0 to 1000 (each is a metrics label)")]
    TopSources(usize),
    #[error("{0}")]
    Plan(String),
    #[error(transparent)]
    PlanFile(#[from] PlanFileError),
    #[error("--port-range {range} overlaps --reserved-ports {reserved} ({overlap}): choose a range outside them (e.g. 32768:65535) or change --reserved-ports")]
    ReservedOverlap {
        range: PortRange,
        reserved: PortList,
        overlap: PortRange,
    },
    #[error("--fair-share-threshold {0} is out of range: use a fraction above 0 and at most 1, e.g. 0.8")]
    FairShareThreshold(String),
    #[error("--reject-rate 0: use at least 1 (or --on-exhaustion drop to send no answers)")]
    RejectRate,
    #[error(transparent)]
    ControlGroup(#[from] GroupError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cluster mode needs the NAT IPs the nodes share: give each with --nat-ip (the uplink's own address is the node's, not a shared one)")]
    ClusterNatIp,
    #[error(transparent)]
    UdpPorts(#[from] PortListError),
    #[error("--hairpin on needs --pod-iface: name the node's interfaces towards the pods (e.g. --pod-iface 'cali*'), where a pod's packet to the NAT IP arrives")]
    HairpinNoPodIface,
    #[error("--pod-iface {0} is only used with --hairpin on: add --hairpin on, or leave --pod-iface out")]
    PodIfaceWithoutHairpin(pod_iface::PodIface),
    #[error("--pod-iface {pattern} matches the uplink {uplink}: snat's hairpin program goes on the pods' interfaces only; name them more narrowly")]
    PodIfaceUplink {
        pattern: pod_iface::PodIface,
        uplink: String,
    },
    #[error("--hairpin on needs TCX links (kernel >= 6.6) on the pods' interfaces: drop --attach clsact, or run without --hairpin")]
    HairpinClsact,
    #[error("--hairpin on is not supported in cluster mode (--etcd-endpoints): a NAT port may be held by another node, which this node's pods cannot be hairpinned to; run without --hairpin")]
    HairpinCluster,
    #[error("--internal {cidr} is IPv6 but {iface} has no global IPv6 address: give --nat-ip with an IPv6 address")]
    NoNatIp6 { cidr: Ipv6Cidr, iface: String },
    #[error("--nat-ip {0} is IPv6 but no --internal IPv6 network is given: add the pods' IPv6 network (e.g. --internal fd00:10::/64), or leave --nat-ip {0} out")]
    NatIp6WithoutInternal(Ipv6Addr),
    #[error("--nat-ip {0} is IPv4 but no --internal IPv4 network is given: add the pods' IPv4 network (e.g. --internal 10.244.0.0/16), or leave --nat-ip {0} out")]
    NatIp4WithoutInternal(Ipv4Addr),
    #[error("--plan {0} gives IPv4 NAT IPs but no --internal IPv4 network is given: add the pods' IPv4 network (e.g. --internal 10.244.0.0/16), or use a plan without IPv4 NAT IPs")]
    PlanWithoutInternal4(String),
    #[error("--plan {0} gives IPv6 NAT IPs but no --internal IPv6 network is given: add the pods' IPv6 network (e.g. --internal fd00:10::/64), or use a plan without IPv6 NAT IPs")]
    PlanWithoutInternal6(String),
    #[error("--nat-ip {0} cannot be used with --plan: the plan names the IPv4 NAT IPs; leave --nat-ip {0} out (next to --plan, --nat-ip gives only a family the plan names no NAT IP of)")]
    PlanNatIp(Ipv4Addr),
    #[error("--nat-ip {0} cannot be used with --plan: the plan names the IPv6 NAT IPs; leave --nat-ip {0} out (next to --plan, --nat-ip gives only a family the plan names no NAT IP of)")]
    PlanNatIp6(Ipv6Addr),
    #[error("the plan gives IPv4 NAT IP {0} but this agent translates no IPv4 network: restart it with the pods' IPv4 network (--internal), or use a plan without IPv4 NAT IPs")]
    MovedWithoutInternal4(Ipv4Addr),
    #[error("the plan gives IPv6 NAT IP {0} but this agent translates no IPv6 network: restart it with the pods' IPv6 network (--internal), or use a plan without IPv6 NAT IPs")]
    MovedWithoutInternal6(Ipv6Addr),
    #[error("--nat-ip {ip} is inside the internal CIDR {cidr}: a NAT IP must be a public/outbound address, not a pod address")]
    NatIp6Internal { ip: Ipv6Addr, cidr: Ipv6Cidr },
    #[error("--nat-ip {0} is given twice: list each NAT IP once")]
    DuplicateNatIp6(Ipv6Addr),
    #[error("--nat-ip {0} cannot be used: ::, loopback (::1), multicast (ff00::/8), link-local (fe80::/10) and IPv4-mapped (::ffff:0:0/96) addresses are not NAT IPs; give a global IPv6 address")]
    UnusableNatIp6(Ipv6Addr),
    #[error("{0} IPv6 NAT IPs given: snat supports at most {MAX_NAT_IPS}")]
    TooManyNatIps6(usize),
    #[error("{0}: IPv6 is not supported in cluster mode yet (--etcd-endpoints); leave the IPv6 networks and NAT IPs out, or run without cluster mode")]
    Ipv6Cluster(String),
}

impl Settings {
    /// Checks `args` against the facts of the interface they name.
    pub fn validate(args: &RunArgs, iface: Interface) -> Result<Self, ConfigError> {
        let (internal, internal6) = by_family(&args.internal);
        let (exclude, exclude6) = by_family(&args.exclude);
        let (given_ips, given_ips6) = nat_ips_by_family(&args.nat_ips);
        if internal.is_empty() && internal6.is_empty() {
            return Err(ConfigError::NoInternal);
        }
        let cluster = cluster::Cluster::validate(&args.cluster)?;
        if cluster.is_some() {
            if let Some(c) = internal6.first() {
                return Err(ConfigError::Ipv6Cluster(format!("--internal {c}")));
            }
            if let Some(ip) = given_ips6.first() {
                return Err(ConfigError::Ipv6Cluster(format!("--nat-ip {ip}")));
            }
            if given_ips.is_empty() {
                return Err(ConfigError::ClusterNatIp);
            }
        }
        // A plan gives the port range, and the NAT IPs of each family it names; a family it
        // names none of takes them from the flags, as without a plan.
        let (plan_ips, plan_ips6, port_range, slice) = match &args.plan {
            Some(path) => {
                let plan = Plan::load(path)?;
                let index = node_index(args)?;
                let slice = plan.slice(index)?;
                let label = format!(
                    "node {index} of {}{} ({})",
                    plan.nodes + plan.surge,
                    if slice.surge { ", a surge slice" } else { "" },
                    path.display()
                );
                let shown = || path.display().to_string();
                let (ips, ips6) = (plan.nat_ips4(), plan.nat_ips6());
                if !ips.is_empty() {
                    if let Some(ip) = given_ips.first() {
                        return Err(ConfigError::PlanNatIp(*ip));
                    }
                    if internal.is_empty() {
                        return Err(ConfigError::PlanWithoutInternal4(shown()));
                    }
                }
                if !ips6.is_empty() {
                    if let Some(ip) = given_ips6.first() {
                        return Err(ConfigError::PlanNatIp6(*ip));
                    }
                    if internal6.is_empty() {
                        return Err(ConfigError::PlanWithoutInternal6(shown()));
                    }
                }
                (ips, ips6, slice.range(), Some(label))
            }
            None => (Vec::new(), Vec::new(), args.port_range, None),
        };
        let nat_ips = if !plan_ips.is_empty() {
            plan_ips
        } else if internal.is_empty() {
            if let Some(ip) = given_ips.first() {
                return Err(ConfigError::NatIp4WithoutInternal(*ip));
            }
            Vec::new()
        } else if given_ips.is_empty() {
            vec![*iface
                .ipv4
                .first()
                .ok_or_else(|| ConfigError::NoNatIp(iface.name.clone()))?]
        } else {
            given_ips
        };
        check_nat_ips(&nat_ips, &internal)?;
        let nat_ips6 = if plan_ips6.is_empty() {
            match (internal6.first(), given_ips6.first()) {
                (None, Some(ip)) => return Err(ConfigError::NatIp6WithoutInternal(*ip)),
                (None, None) => Vec::new(),
                (Some(cidr), None) => {
                    vec![iface
                        .default_nat_ip6()
                        .ok_or_else(|| ConfigError::NoNatIp6 {
                            cidr: *cidr,
                            iface: iface.name.clone(),
                        })?]
                }
                (Some(_), Some(_)) => given_ips6,
            }
        } else {
            plan_ips6
        };
        check_nat_ips6(&nat_ips6, &internal6)?;
        let timeouts = Timeouts {
            tcp_established: args.tcp_established_timeout,
            tcp_transitory: args.tcp_transitory_timeout,
            tcp_fin: args.tcp_fin_timeout,
            tcp_rst: args.tcp_rst_timeout,
            udp: args.udp_timeout,
            udp_ports: udp_ports::collect(&args.udp_timeout_for)?,
            icmp: args.icmp_timeout,
        };
        for (flag, value) in timeouts.named() {
            if value < Duration::from_secs(1) {
                return Err(ConfigError::TimeoutTooShort {
                    flag,
                    value: Human(value).to_string(),
                });
            }
        }
        if args.gc_interval < Duration::from_millis(100)
            || args.gc_interval > Duration::from_secs(60)
        {
            return Err(ConfigError::GcInterval(Human(args.gc_interval).to_string()));
        }
        if args.max_mappings == 0 || args.max_mappings > MAX_MAPPINGS_LIMIT {
            return Err(ConfigError::MaxMappings(args.max_mappings));
        }
        if args.top_sources > 1000 {
            return Err(ConfigError::TopSources(args.top_sources));
        }
        check_reserved(port_range, &args.reserved_ports)?;
        let t = args.fair_share_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err(ConfigError::FairShareThreshold(t.to_string()));
        }
        if args.reject_rate == 0 {
            return Err(ConfigError::RejectRate);
        }
        let policy = Policy {
            reject: args.on_exhaustion == OnExhaustion::Reject,
            overflow: args.ip_pooling == IpPooling::Overflow,
            reject_per_sec: args.reject_rate,
            max_per_source: args.max_ports_per_source,
            fair_share_permille: if args.fair_share {
                (t * 1000.0).round().max(1.0) as u32
            } else {
                0
            },
        };
        let control_group = args
            .control_group
            .as_deref()
            .map(Group::resolve)
            .transpose()?;
        let hairpin = check_hairpin(args, &iface, cluster.is_some())?;
        let exclude = with_internal(exclude, &internal);
        let exclude6 = with_internal(exclude6, &internal6);
        Ok(Self {
            iface,
            nat_ips,
            internal,
            exclude,
            nat_ips6,
            internal6,
            exclude6,
            port_range,
            slice,
            timeouts,
            max_mappings: args.max_mappings,
            gc_interval: args.gc_interval,
            ebpf_log: args.ebpf_log,
            attach: args.attach,
            ingress: args.ingress,
            hairpin,
            metrics_addr: args.metrics_addr,
            top_sources: args.top_sources,
            policy,
            reserved_ports: args.reserved_ports.clone(),
            pin_dir: args.pin_dir.clone(),
            keep_state: args.keep_state,
            on_stop: args.on_stop,
            control_group,
            metrics_min_interval: args.metrics_min_interval,
            stats_file: args.stats_file.clone(),
            cluster,
        })
    }

    /// These settings moved to `range` and, for each family given, those NAT IPs (`snat set`:
    /// a plan names the families it has NAT IPs of; the others keep theirs). Checked as
    /// [`Settings::validate`] checks them.
    pub fn moved(
        &self,
        range: PortRange,
        ips: Option<&[Ipv4Addr]>,
        ips6: Option<&[Ipv6Addr]>,
    ) -> Result<Self, ConfigError> {
        check_reserved(range, &self.reserved_ports)?;
        let mut next = self.clone();
        next.port_range = range;
        if let Some(ips) = ips {
            if let Some(ip) = ips.first().filter(|_| self.internal.is_empty()) {
                return Err(ConfigError::MovedWithoutInternal4(*ip));
            }
            check_nat_ips(ips, &self.internal)?;
            next.nat_ips = ips.to_vec();
        }
        if let Some(ips6) = ips6 {
            if let Some(ip) = ips6.first().filter(|_| self.internal6.is_empty()) {
                return Err(ConfigError::MovedWithoutInternal6(*ip));
            }
            check_nat_ips6(ips6, &self.internal6)?;
            next.nat_ips6 = ips6.to_vec();
        }
        Ok(next)
    }

    /// Valid but unwise choices, for the operator to see at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let t = &self.timeouts;
        let rfc = [
            (
                "tcp-established-timeout",
                t.tcp_established,
                Duration::from_secs(2 * 3600 + 4 * 60),
                "RFC 5382 REQ-5",
            ),
            (
                "tcp-transitory-timeout",
                t.tcp_transitory,
                Duration::from_secs(240),
                "RFC 5382 REQ-5",
            ),
            (
                "udp-timeout",
                t.udp,
                Duration::from_secs(120),
                "RFC 4787 REQ-5",
            ),
            (
                "icmp-timeout",
                t.icmp,
                Duration::from_secs(60),
                "RFC 5508 REQ-1",
            ),
        ];
        for (flag, value, min, rfc) in rfc {
            if value < min {
                w.push(format!(
                    "--{flag} {} is below the {} minimum of {} ({rfc}): idle flows lose their mapping early",
                    Human(value),
                    flag.trim_end_matches("-timeout"),
                    Human(min)
                ));
            }
        }
        if self.port_range.lo < 1024 {
            w.push(format!(
                "--port-range {} includes well-known ports below 1024; the usual choice is 32768:65535",
                self.port_range
            ));
        }
        let nodeport = PortRange {
            lo: 30000,
            hi: 32767,
        };
        if self.port_range.lo <= nodeport.hi && nodeport.lo <= self.port_range.hi {
            w.push(format!(
                "--port-range {} overlaps the Kubernetes NodePort range {nodeport}; replies to NodePorts on a NAT IP could be taken for SNAT traffic. Use 32768:65535",
                self.port_range
            ));
        }
        w
    }
}

/// Checks that `range` keeps clear of the reserved ports.
pub fn check_reserved(range: PortRange, reserved: &PortList) -> Result<(), ConfigError> {
    match reserved.overlap(range) {
        Some(overlap) => Err(ConfigError::ReservedOverlap {
            range,
            reserved: reserved.clone(),
            overlap,
        }),
        None => Ok(()),
    }
}

/// `--hairpin` and `--pod-iface`: the patterns to attach the hairpin program by (empty: off).
fn check_hairpin(
    args: &RunArgs,
    uplink: &Interface,
    cluster: bool,
) -> Result<Vec<pod_iface::PodIface>, ConfigError> {
    if args.hairpin == Hairpin::Off {
        return match args.pod_ifaces.first() {
            Some(p) => Err(ConfigError::PodIfaceWithoutHairpin(p.clone())),
            None => Ok(Vec::new()),
        };
    }
    if args.pod_ifaces.is_empty() {
        return Err(ConfigError::HairpinNoPodIface);
    }
    if let Some(p) = args.pod_ifaces.iter().find(|p| p.matches(&uplink.name)) {
        return Err(ConfigError::PodIfaceUplink {
            pattern: p.clone(),
            uplink: uplink.name.clone(),
        });
    }
    if args.attach == AttachChoice::Clsact {
        return Err(ConfigError::HairpinClsact);
    }
    if cluster {
        return Err(ConfigError::HairpinCluster);
    }
    Ok(args.pod_ifaces.clone())
}

/// `--internal` or `--exclude` networks split by family, each in the order given.
fn by_family(cidrs: &[IpCidr]) -> (Vec<Ipv4Cidr>, Vec<Ipv6Cidr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in cidrs {
        match c {
            IpCidr::V4(c) => v4.push(*c),
            IpCidr::V6(c) => v6.push(*c),
        }
    }
    (v4, v6)
}

/// `--nat-ip` addresses split by family, each in the order given.
fn nat_ips_by_family(ips: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in ips {
        match ip {
            IpAddr::V4(ip) => v4.push(*ip),
            IpAddr::V6(ip) => v6.push(*ip),
        }
    }
    (v4, v6)
}

/// The excluded destinations: `exclude`, then the internal networks it does not list yet.
fn with_internal<C: PartialEq + Copy>(mut exclude: Vec<C>, internal: &[C]) -> Vec<C> {
    for c in internal {
        if !exclude.contains(c) {
            exclude.push(*c);
        }
    }
    exclude
}

/// Whether `ip` can be an IPv6 NAT IP at all: not ::, loopback, multicast, link-local
/// (fe80::/10) or IPv4-mapped.
fn usable_nat_ip6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unicast_link_local()
        || ip.to_ipv4_mapped().is_some())
}

/// Checks a set of IPv6 NAT IPs like [`check_nat_ips`] the IPv4 ones: at most 64 distinct
/// usable addresses, none inside an internal IPv6 CIDR.
pub fn check_nat_ips6(nat_ips: &[Ipv6Addr], internal: &[Ipv6Cidr]) -> Result<(), ConfigError> {
    if nat_ips.len() > MAX_NAT_IPS as usize {
        return Err(ConfigError::TooManyNatIps6(nat_ips.len()));
    }
    for (i, ip) in nat_ips.iter().enumerate() {
        if !usable_nat_ip6(*ip) {
            return Err(ConfigError::UnusableNatIp6(*ip));
        }
        if nat_ips[..i].contains(ip) {
            return Err(ConfigError::DuplicateNatIp6(*ip));
        }
        if let Some(cidr) = internal.iter().find(|c| c.contains(*ip)) {
            return Err(ConfigError::NatIp6Internal {
                ip: *ip,
                cidr: *cidr,
            });
        }
    }
    Ok(())
}

/// Checks a set of IPv4 NAT IPs: at most 64 distinct usable addresses, none inside an internal
/// CIDR.
pub fn check_nat_ips(nat_ips: &[Ipv4Addr], internal: &[Ipv4Cidr]) -> Result<(), ConfigError> {
    if nat_ips.len() > MAX_NAT_IPS as usize {
        return Err(ConfigError::TooManyNatIps(nat_ips.len()));
    }
    for (i, ip) in nat_ips.iter().enumerate() {
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(ConfigError::UnusableNatIp(*ip));
        }
        if nat_ips[..i].contains(ip) {
            return Err(ConfigError::DuplicateNatIp(*ip));
        }
        if let Some(cidr) = internal.iter().find(|c| c.contains(*ip)) {
            return Err(ConfigError::NatIpInternal {
                ip: *ip,
                cidr: *cidr,
            });
        }
    }
    Ok(())
}

/// The node index of `--node-index`, or read from `--node-index-file` (e.g. written from the
/// node's label by an init container).
fn node_index(args: &RunArgs) -> Result<u32, ConfigError> {
    match (&args.node_index, &args.node_index_file) {
        (Some(i), _) => Ok(*i),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Plan(format!("--node-index-file {}: {e}", path.display()))
            })?;
            text.trim().parse().map_err(|_| {
                ConfigError::Plan(format!(
                    "--node-index-file {}: {:?} is not a node index (a number like 0, 1, 2)",
                    path.display(),
                    text.trim()
                ))
            })
        }
        (None, None) => Err(ConfigError::Plan(
            "--plan needs --node-index I or --node-index-file FILE: which slice is this node's?"
                .into(),
        )),
    }
}

impl Default for Timeouts {
    /// The defaults of `snat run`: RFC 5382 and RFC 4787 minimums, Azure's release timers.
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(240),
            tcp_fin: Duration::from_secs(240),
            tcp_rst: Duration::from_secs(15),
            udp: Duration::from_secs(300),
            udp_ports: udp_ports::defaults(),
            icmp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The shortest timeout a mapping of protocol number `p` can get, in any state.
    pub fn shortest(&self, p: u8) -> Duration {
        match p {
            snat_common::flow::proto::TCP => self
                .tcp_established
                .min(self.tcp_transitory)
                .min(self.tcp_fin)
                .min(self.tcp_rst),
            snat_common::flow::proto::UDP => self
                .udp_ports
                .values()
                .copied()
                .fold(self.udp, Duration::min),
            _ => self.icmp,
        }
    }

    /// The idle timeout of a UDP flow whose datagrams all go to `remote_port` (`None`: several
    /// ports, or unknown).
    pub fn udp_for(&self, remote_port: Option<u16>) -> Duration {
        remote_port
            .and_then(|p| self.udp_ports.get(&p).copied())
            .unwrap_or(self.udp)
    }

    pub fn named(&self) -> [(&'static str, Duration); 6] {
        [
            ("tcp-established-timeout", self.tcp_established),
            ("tcp-transitory-timeout", self.tcp_transitory),
            ("tcp-fin-timeout", self.tcp_fin),
            ("tcp-rst-timeout", self.tcp_rst),
            ("udp-timeout", self.udp),
            ("icmp-timeout", self.icmp),
        ]
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::settings::cli::{Cli, Command};

    fn args(line: &str) -> RunArgs {
        let argv = std::iter::once("snat").chain(line.split_whitespace());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    fn iface(ips: &[Ipv4Addr]) -> Interface {
        iface46(ips, &[])
    }

    fn iface46(ips: &[Ipv4Addr], ips6: &[&str]) -> Interface {
        Interface {
            name: "up0".into(),
            index: 7,
            ipv4: ips.to_vec(),
            ipv6: ips6.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const UPLINK6: &str = "2001:db8:100::1";

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn cidr6(s: &str) -> Ipv6Cidr {
        s.parse().unwrap()
    }

    /// The error of `snat run <line>` on an uplink with `UPLINK` and `UPLINK6`.
    fn refused(line: &str) -> ConfigError {
        Settings::validate(&args(line), iface46(&[UPLINK], &[UPLINK6])).unwrap_err()
    }

    #[test]
    fn ipv6_only() {
        // No IPv4 network: no IPv4 NAT IP is needed, the uplink may have no IPv4 address.
        let s = Settings::validate(
            &args("run --iface up0 --internal fd00:10::/64"),
            iface46(&[], &[UPLINK6]),
        )
        .unwrap();
        assert!(s.internal.is_empty() && s.nat_ips.is_empty() && s.exclude.is_empty());
        assert_eq!(s.internal6, [cidr6("fd00:10::/64")]);
        assert_eq!(
            s.nat_ips6,
            [ip6(UPLINK6)],
            "the uplink's address by default"
        );
        assert_eq!(s.exclude6, [cidr6("fd00:10::/64")], "internal is excluded");
        let s = Settings::validate(
            &args("run --iface up0 --internal fd00:10::/64 --nat-ip 2001:db8::7"),
            iface46(&[], &[]),
        )
        .unwrap();
        assert_eq!(s.nat_ips6, [ip6("2001:db8::7")]);
    }

    #[test]
    fn ipv4_only_configs_have_no_ipv6() {
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.1.0.0/16"),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        assert_eq!(s.nat_ips, [UPLINK]);
        assert!(s.internal6.is_empty() && s.nat_ips6.is_empty() && s.exclude6.is_empty());
    }

    #[test]
    fn dual_stack_mixed_and_repeated() {
        let s = Settings::validate(
            &args(
                "run --iface up0 --internal fd00:10::/64 --internal 10.1.0.0/16 --internal fd00:11::/64 \
                 --exclude fd00:96::/108 --exclude 10.96.0.0/12 --exclude fd00:10::/64 \
                 --nat-ip 2001:db8::7 --nat-ip 203.0.113.1 --nat-ip 2001:db8::8",
            ),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        assert_eq!(s.internal, ["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(s.nat_ips, [Ipv4Addr::new(203, 0, 113, 1)]);
        assert_eq!(
            s.exclude,
            [
                "10.96.0.0/12".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(s.internal6, [cidr6("fd00:10::/64"), cidr6("fd00:11::/64")]);
        assert_eq!(s.nat_ips6, [ip6("2001:db8::7"), ip6("2001:db8::8")]);
        assert_eq!(
            s.exclude6,
            [
                cidr6("fd00:96::/108"),
                cidr6("fd00:10::/64"),
                cidr6("fd00:11::/64")
            ],
            "the given ones, then the internal ones not listed yet"
        );
        // Each family's default on its own.
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.1.0.0/16 --internal fd00:10::/64"),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        assert_eq!((s.nat_ips, s.nat_ips6), (vec![UPLINK], vec![ip6(UPLINK6)]));
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.1.0.0/16 --internal fd00:10::/64 --nat-ip 2001:db8::7"),
            iface46(&[UPLINK], &[]),
        )
        .unwrap();
        assert_eq!(
            (s.nat_ips, s.nat_ips6),
            (vec![UPLINK], vec![ip6("2001:db8::7")])
        );
        // An IPv4 network still needs an IPv4 NAT IP, with the message of an IPv4-only config.
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.1.0.0/16 --internal fd00:10::/64"),
            iface46(&[], &[UPLINK6]),
        )
        .unwrap_err();
        assert_eq!(e, ConfigError::NoNatIp("up0".into()));
    }

    #[test]
    fn default_ipv6_nat_ip() {
        let pick = |ips: &[&str]| iface46(&[], ips).default_nat_ip6();
        // The first global unicast address in the kernel's order, a ULA only when alone.
        assert_eq!(
            pick(&["fe80::1", "fd00::2", "2001:db8::5", "2001:db8::6"]),
            Some(ip6("2001:db8::5"))
        );
        assert_eq!(pick(&["fd00::2", "fd00::3"]), Some(ip6("fd00::2")));
        assert_eq!(
            pick(&["fe80::1", "::1", "ff02::1", "::ffff:198.51.100.1"]),
            None
        );
        assert_eq!(pick(&[]), None);
        let e = Settings::validate(
            &args("run --iface up0 --internal fd00:10::/64"),
            iface46(&[UPLINK], &["fe80::1"]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--internal fd00:10::/64 is IPv6 but up0 has no global IPv6 address: give --nat-ip with an IPv6 address"
        );
        // Like the IPv4 default, it must not be internal.
        let e = Settings::validate(
            &args("run --iface up0 --internal 2001:db8::/32"),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::NatIp6Internal {
                ip: ip6(UPLINK6),
                cidr: cidr6("2001:db8::/32")
            }
        );
    }

    #[test]
    fn a_nat_ip_needs_an_internal_network_of_its_family() {
        let e = refused("run --iface up0 --internal 10.0.0.0/8 --nat-ip 2001:db8::7");
        assert_eq!(e, ConfigError::NatIp6WithoutInternal(ip6("2001:db8::7")));
        assert!(
            e.to_string().starts_with(
                "--nat-ip 2001:db8::7 is IPv6 but no --internal IPv6 network is given"
            ),
            "{e}"
        );
        let e = refused("run --iface up0 --internal fd00:10::/64 --nat-ip 203.0.113.1");
        assert_eq!(
            e,
            ConfigError::NatIp4WithoutInternal(Ipv4Addr::new(203, 0, 113, 1))
        );
        assert!(
            e.to_string().starts_with(
                "--nat-ip 203.0.113.1 is IPv4 but no --internal IPv4 network is given"
            ),
            "{e}"
        );
        // An IPv6 --exclude alone is no internal network.
        let e = refused("run --iface up0 --exclude fd00:96::/108");
        assert_eq!(e, ConfigError::NoInternal);
    }

    #[test]
    fn ipv6_nat_ip_errors() {
        let base = "run --iface up0 --internal fd00:10::/64";
        for bad in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "febf::1",
            "::ffff:203.0.113.1",
        ] {
            let e = refused(&format!("{base} --nat-ip {bad}"));
            assert_eq!(e, ConfigError::UnusableNatIp6(ip6(bad)), "{bad}");
            assert!(
                e.to_string().contains(&format!("--nat-ip {}", ip6(bad)))
                    && e.to_string().contains("give a global IPv6 address"),
                "{e}"
            );
        }
        let e = refused(&format!(
            "{base} --nat-ip 2001:db8::7 --nat-ip 2001:DB8:0::7"
        ));
        assert_eq!(e, ConfigError::DuplicateNatIp6(ip6("2001:db8::7")));
        assert!(
            e.to_string()
                .contains("--nat-ip 2001:db8::7 is given twice"),
            "{e}"
        );
        let e = refused(&format!("{base} --nat-ip fd00:10::5"));
        assert!(
            e.to_string()
                .contains("--nat-ip fd00:10::5 is inside the internal CIDR fd00:10::/64"),
            "{e}"
        );
        let many: String = (1..=65)
            .map(|i| format!(" --nat-ip 2001:db8::{i:x}"))
            .collect();
        let e = refused(&format!("{base}{many}"));
        assert_eq!(e, ConfigError::TooManyNatIps6(65));
        assert!(e.to_string().contains("at most 64"), "{e}");
        let sixty_four: String = (1..=64)
            .map(|i| format!(" --nat-ip 2001:db8::{i:x}"))
            .collect();
        let s = Settings::validate(&args(&format!("{base}{sixty_four}")), iface(&[])).unwrap();
        assert_eq!(s.nat_ips6.len(), 64);
        // ULAs and global addresses outside the internal networks are fine.
        assert!(Settings::validate(
            &args(&format!("{base} --nat-ip fd00:99::1 --nat-ip 2001:db8::1")),
            iface(&[])
        )
        .is_ok());
    }

    #[test]
    fn ipv6_is_refused_in_cluster_mode() {
        let cluster = "--etcd-endpoints http://10.0.0.5:2379 --node-name n1";
        let e = refused(&format!(
            "run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64 --nat-ip 203.0.113.1 {cluster}"
        ));
        assert_eq!(
            e,
            ConfigError::Ipv6Cluster("--internal fd00:10::/64".into())
        );
        assert!(
            e.to_string()
                .starts_with("--internal fd00:10::/64: IPv6 is not supported in cluster mode yet"),
            "{e}"
        );
        let e = refused(&format!(
            "run --iface up0 --internal 10.0.0.0/8 --nat-ip 203.0.113.1 --nat-ip 2001:db8::7 {cluster}"
        ));
        assert!(
            e.to_string()
                .starts_with("--nat-ip 2001:db8::7: IPv6 is not supported in cluster mode yet"),
            "{e}"
        );
        let e = refused(&format!(
            "run --iface up0 --internal fd00:10::/64 {cluster}"
        ));
        assert_eq!(
            e,
            ConfigError::Ipv6Cluster("--internal fd00:10::/64".into())
        );
        // IPv4 cluster mode is as it was; an IPv6 --exclude does not matter to it.
        let e = refused(&format!("run --iface up0 --internal 10.0.0.0/8 {cluster}"));
        assert_eq!(e, ConfigError::ClusterNatIp);
        let s = Settings::validate(
            &args(&format!(
                "run --iface up0 --internal 10.0.0.0/8 --exclude fd00:96::/108 --nat-ip 203.0.113.1 {cluster}"
            )),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert!(s.cluster.is_some() && s.nat_ips6.is_empty());
    }

    /// A plan of 2 nodes over `nat_ips`, 100 ports each from 40000, written to a file named
    /// after `tag`.
    fn plan_file_of(tag: &str, nat_ips: &[&str]) -> std::path::PathBuf {
        let p = plan::plan(&plan::Request {
            nodes: 2,
            surge: 0,
            ips: nat_ips.len() as u32,
            nat_ips: nat_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports_per_node: Some(100),
            space: plan::Space::from_range("40000:40999".parse().unwrap()),
        })
        .unwrap();
        let path = std::env::temp_dir().join(format!(
            "snat-settings-plan-{}-{tag}.json",
            std::process::id()
        ));
        std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
        path
    }

    /// A plan of 2 nodes over `198.51.100.7`, written to a file named after `tag`.
    fn plan_file(tag: &str) -> std::path::PathBuf {
        plan_file_of(tag, &["198.51.100.7"])
    }

    #[test]
    fn a_plan_gives_the_ipv4_nat_ips_and_the_flags_the_ipv6_ones() {
        let path = plan_file("dual");
        let file = path.display();
        let plan = format!("--plan {file} --node-index 1");
        let s = Settings::validate(
            &args(&format!(
                "run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64 --nat-ip 2001:db8::7 {plan}"
            )),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert_eq!(s.nat_ips, [Ipv4Addr::new(198, 51, 100, 7)]);
        assert_eq!(s.nat_ips6, [ip6("2001:db8::7")]);
        assert_eq!(s.port_range, "40100:40199".parse().unwrap());
        let s = Settings::validate(
            &args(&format!(
                "run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64 {plan}"
            )),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        assert_eq!(s.nat_ips6, [ip6(UPLINK6)], "the uplink's by default");
        let e = refused(&format!(
            "run --iface up0 --internal 10.0.0.0/8 --nat-ip 203.0.113.1 {plan}"
        ));
        assert_eq!(e, ConfigError::PlanNatIp(Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!(
            e.to_string(),
            "--nat-ip 203.0.113.1 cannot be used with --plan: the plan names the IPv4 NAT IPs; leave --nat-ip 203.0.113.1 out (next to --plan, --nat-ip gives only a family the plan names no NAT IP of)"
        );
        let e = refused(&format!("run --iface up0 --internal fd00:10::/64 {plan}"));
        let _ = std::fs::remove_file(&path);
        assert_eq!(e, ConfigError::PlanWithoutInternal4(file.to_string()));
        assert_eq!(
            e.to_string(),
            format!("--plan {file} gives IPv4 NAT IPs but no --internal IPv4 network is given: add the pods' IPv4 network (e.g. --internal 10.244.0.0/16), or use a plan without IPv4 NAT IPs")
        );
    }

    #[test]
    fn a_plan_gives_the_nat_ips_of_both_families() {
        let path = plan_file_of("mixed", &["198.51.100.7", "2001:db8:1::7"]);
        let file = path.display();
        let plan = format!("--plan {file} --node-index 1");
        let both = "run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64";
        let s = Settings::validate(&args(&format!("{both} {plan}")), iface(&[UPLINK])).unwrap();
        assert_eq!(s.nat_ips, [Ipv4Addr::new(198, 51, 100, 7)]);
        assert_eq!(s.nat_ips6, [ip6("2001:db8:1::7")], "not the uplink's");
        // Two NAT IPs of 50 ports each for this node: the same slice on both.
        assert_eq!(s.port_range, "40050:40099".parse().unwrap());
        assert_eq!(s.slice.as_deref(), Some(&*format!("node 1 of 2 ({file})")));
        // The plan names both families: --nat-ip of either is refused, by value.
        let e = refused(&format!("{both} --nat-ip 2001:db8::8 {plan}"));
        assert_eq!(e, ConfigError::PlanNatIp6(ip6("2001:db8::8")));
        assert_eq!(
            e.to_string(),
            "--nat-ip 2001:db8::8 cannot be used with --plan: the plan names the IPv6 NAT IPs; leave --nat-ip 2001:db8::8 out (next to --plan, --nat-ip gives only a family the plan names no NAT IP of)"
        );
        let e = refused(&format!("{both} --nat-ip 203.0.113.1 {plan}"));
        assert_eq!(e, ConfigError::PlanNatIp(Ipv4Addr::new(203, 0, 113, 1)));
        // Each family the plan names needs its internal network.
        let e = refused(&format!("run --iface up0 --internal 10.0.0.0/8 {plan}"));
        assert_eq!(e, ConfigError::PlanWithoutInternal6(file.to_string()));
        assert_eq!(
            e.to_string(),
            format!("--plan {file} gives IPv6 NAT IPs but no --internal IPv6 network is given: add the pods' IPv6 network (e.g. --internal fd00:10::/64), or use a plan without IPv6 NAT IPs")
        );
        let e = refused(&format!("run --iface up0 --internal fd00:10::/64 {plan}"));
        assert_eq!(e, ConfigError::PlanWithoutInternal4(file.to_string()));
        // The plan's IPv6 NAT IPs are checked as --nat-ip ones are.
        let e = refused(&format!(
            "run --iface up0 --internal 10.0.0.0/8 --internal 2001:db8:1::/64 {plan}"
        ));
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            e,
            ConfigError::NatIp6Internal {
                ip: ip6("2001:db8:1::7"),
                cidr: cidr6("2001:db8:1::/64")
            }
        );
    }

    #[test]
    fn an_ipv6_only_plan_leaves_ipv4_to_the_flags() {
        let path = plan_file_of("only6", &["2001:db8:1::7"]);
        let file = path.display();
        let plan = format!("--plan {file} --node-index 0");
        // No IPv4 network is needed for it…
        let s = Settings::validate(
            &args(&format!("run --iface up0 --internal fd00:10::/64 {plan}")),
            iface(&[]),
        )
        .unwrap();
        assert!(s.nat_ips.is_empty());
        assert_eq!(s.nat_ips6, [ip6("2001:db8:1::7")]);
        assert_eq!(s.port_range, "40000:40099".parse().unwrap());
        // …and an IPv4 one takes the uplink's address or --nat-ip, on the plan's slice.
        let both = "run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64";
        let s = Settings::validate(&args(&format!("{both} {plan}")), iface(&[UPLINK])).unwrap();
        assert_eq!(s.nat_ips, [UPLINK]);
        let s = Settings::validate(
            &args(&format!("{both} --nat-ip 203.0.113.1 {plan}")),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert_eq!(s.nat_ips, [Ipv4Addr::new(203, 0, 113, 1)]);
        assert_eq!(s.port_range, "40000:40099".parse().unwrap());
        let e = refused(&format!("{both} --nat-ip 2001:db8::8 {plan}"));
        let _ = std::fs::remove_file(&path);
        assert_eq!(e, ConfigError::PlanNatIp6(ip6("2001:db8::8")));
    }

    #[test]
    fn a_move_takes_the_nat_ips_of_the_families_given() {
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64"),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        let range: PortRange = "40000:40099".parse().unwrap();
        let v4 = [Ipv4Addr::new(198, 51, 100, 7)];
        let v6 = [ip6("2001:db8:1::7")];
        // A plan of IPv4 NAT IPs only: the IPv6 ones stay.
        let next = s.moved(range, Some(&v4), None).unwrap();
        assert_eq!(
            (next.nat_ips, next.nat_ips6),
            (v4.to_vec(), vec![ip6(UPLINK6)])
        );
        assert_eq!(next.port_range, range);
        let next = s.moved(range, Some(&v4), Some(&v6)).unwrap();
        assert_eq!((next.nat_ips, next.nat_ips6), (v4.to_vec(), v6.to_vec()));
        let next = s.moved(range, None, Some(&v6)).unwrap();
        assert_eq!((next.nat_ips, next.nat_ips6), (vec![UPLINK], v6.to_vec()));
        assert_eq!(
            s.moved(range, None, Some(&[ip6("fd00:10::9")]))
                .unwrap_err(),
            ConfigError::NatIp6Internal {
                ip: ip6("fd00:10::9"),
                cidr: cidr6("fd00:10::/64")
            }
        );
        assert!(matches!(
            s.moved("30000:30099".parse().unwrap(), None, None),
            Err(ConfigError::ReservedOverlap { .. })
        ));
        // An agent without a family's network takes no NAT IPs of it.
        let only4 = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8"),
            iface(&[UPLINK]),
        )
        .unwrap();
        let e = only4.moved(range, Some(&v4), Some(&v6)).unwrap_err();
        assert_eq!(e, ConfigError::MovedWithoutInternal6(v6[0]));
        assert_eq!(
            e.to_string(),
            "the plan gives IPv6 NAT IP 2001:db8:1::7 but this agent translates no IPv6 network: restart it with the pods' IPv6 network (--internal), or use a plan without IPv6 NAT IPs"
        );
        let only6 = Settings::validate(
            &args("run --iface up0 --internal fd00:10::/64"),
            iface46(&[], &[UPLINK6]),
        )
        .unwrap();
        let e = only6.moved(range, Some(&v4), None).unwrap_err();
        assert_eq!(e, ConfigError::MovedWithoutInternal4(v4[0]));
        assert!(e.to_string().contains("no IPv4 network"), "{e}");
    }

    #[test]
    fn hairpin_is_allowed_with_ipv6_networks() {
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --internal fd00:10::/64 --hairpin on --pod-iface cali*"),
            iface46(&[UPLINK], &[UPLINK6]),
        )
        .unwrap();
        assert_eq!(s.hairpin.len(), 1);
        assert_eq!(s.nat_ips6, [ip6(UPLINK6)]);
    }

    #[test]
    fn ipv6_flag_values() {
        let ok = |line: &str| {
            let argv = std::iter::once("snat").chain(line.split_whitespace());
            Cli::try_parse_from(argv)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            ok("run --iface up0 --internal fd00:10::/64 --exclude fd00:96::/108 --nat-ip 2001:db8::7"),
            Ok(())
        );
        // `snat conns` filters take either family.
        assert_eq!(
            ok("conns --iface up0 --source fd00:10::/64 --destination 2001:db8::/32"),
            Ok(())
        );
        assert_eq!(
            ok("conns --iface up0 --source 10.1.0.0/16 --destination 2001:db8::1"),
            Ok(())
        );
        // `snat plan` names NAT IPs of both families.
        assert_eq!(
            ok("plan --nodes 2 --nat-ip 198.51.100.1 --nat-ip 2001:db8::7"),
            Ok(())
        );
        for (line, needle) in [
            (
                "run --iface up0 --internal fd00:10::1/64",
                "did you mean fd00:10::/64",
            ),
            (
                "run --iface up0 --internal fd00:10::/129",
                "0..=128",
            ),
            (
                "run --iface up0 --exclude fd00:10::g/64",
                "write an IPv6 network like fd00:10::/64",
            ),
            (
                "run --iface up0 --internal pods",
                "write an IPv4 network like 10.244.0.0/16 or an IPv6 network like fd00:10::/64",
            ),
            (
                "run --iface up0 --internal 10.0.0.0/8 --nat-ip 2001:db8::g",
                "\"2001:db8::g\" is not an IP address: write an IPv4 address like 203.0.113.7 or an IPv6 address like 2001:db8::7",
            ),
            (
                "plan --nodes 2 --nat-ip 2001:db8::g",
                "\"2001:db8::g\" is not an IP address: write an IPv4 address like 203.0.113.7 or an IPv6 address like 2001:db8::7",
            ),
            (
                "conns --iface up0 --source fd00:10::1/64",
                "host bits are set; did you mean fd00:10::/64?",
            ),
            (
                "conns --iface up0 --destination pods",
                "write an IPv4 network like 10.244.0.0/16 or an IPv6 network like fd00:10::/64",
            ),
        ] {
            let e = ok(line).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.1.0.0/16"),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert_eq!(s.nat_ips, [UPLINK]);
        assert_eq!(s.port_range, PortRange::DEFAULT);
        assert_eq!(s.timeouts, Timeouts::default(), "the flags' defaults");
        assert_eq!(
            Timeouts::default().tcp_established,
            Duration::from_secs(7440)
        );
        assert_eq!(s.max_mappings, 1_000_000);
        assert_eq!(s.exclude, ["10.1.0.0/16".parse().unwrap()]);
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    }

    #[test]
    fn internal_is_required() {
        let e = Settings::validate(&args("run --iface up0"), iface(&[UPLINK])).unwrap_err();
        assert_eq!(e, ConfigError::NoInternal);
        assert!(e.to_string().contains("--internal 10.244.0.0/16"));
    }

    #[test]
    fn nat_ip_errors() {
        let e = Settings::validate(&args("run --iface up0 --internal 10.0.0.0/8"), iface(&[]))
            .unwrap_err();
        assert!(
            e.to_string().contains("\"up0\" has no IPv4") && e.to_string().contains("--nat-ip")
        );
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --nat-ip 10.2.3.4"),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("10.2.3.4 is inside the internal CIDR 10.0.0.0/8"),
            "{e}"
        );
        let e = Settings::validate(
            &args(
                "run --iface up0 --internal 10.0.0.0/8 --nat-ip 203.0.113.1 --nat-ip 203.0.113.1",
            ),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::DuplicateNatIp(Ipv4Addr::new(203, 0, 113, 1))
        );
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --nat-ip 0.0.0.0"),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::UnusableNatIp(_)));
    }

    #[test]
    fn bad_flag_values_name_the_value() {
        for (line, needle) in [
            (
                "run --iface up0 --internal 10.1.2.3/8",
                "did you mean 10.0.0.0/8",
            ),
            (
                "run --iface up0 --internal 10.0.0.0/8 --port-range 70000:80000",
                "70000:80000",
            ),
            (
                "run --iface up0 --internal 10.0.0.0/8 --udp-timeout 5",
                "e.g. 15s",
            ),
            (
                "run --iface up0 --internal 10.0.0.0/8 --nat-ip 1.2.3",
                "1.2.3",
            ),
        ] {
            let argv = std::iter::once("snat").chain(line.split_whitespace());
            let e = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn timeouts_and_limits() {
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --tcp-rst-timeout 500ms"),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--tcp-rst-timeout 500ms is too short"),
            "{e}"
        );
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --max-mappings 0"),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert_eq!(e, ConfigError::MaxMappings(0));
    }

    #[test]
    fn udp_timeouts_per_port() {
        let ok = |line: &str| {
            Settings::validate(&args(line), iface(&[UPLINK]))
                .unwrap()
                .timeouts
        };
        let t = ok("run --iface up0 --internal 10.0.0.0/8");
        assert_eq!(
            t.udp_for(Some(53)),
            Duration::from_secs(30),
            "DNS by default"
        );
        assert_eq!(t.udp_for(Some(123)), Duration::from_secs(300));
        assert_eq!(t.udp_for(None), Duration::from_secs(300));
        // Given values replace the default list.
        let t = ok("run --iface up0 --internal 10.0.0.0/8 --udp-timeout-for 123=1m --udp-timeout-for 53=10s");
        assert_eq!(
            (
                t.udp_for(Some(53)),
                t.udp_for(Some(123)),
                t.udp_for(Some(5353))
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(300)
            )
        );
        let t = ok("run --iface up0 --internal 10.0.0.0/8 --udp-timeout-for 123=1m");
        assert_eq!(
            t.udp_for(Some(53)),
            Duration::from_secs(300),
            "53 not named"
        );
        let t = ok("run --iface up0 --internal 10.0.0.0/8 --udp-timeout-for none");
        assert!(t.udp_ports.is_empty());
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --udp-timeout-for 53=30s --udp-timeout-for 53=1m"),
            iface(&[UPLINK]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("names port 53 twice"), "{e}");
        for (line, needle) in [
            (
                "--udp-timeout-for 5353=30s",
                "port 5353 is not a well-known port",
            ),
            (
                "--udp-timeout-for 53=0s",
                "53=0s: the timeout is out of range",
            ),
            ("--udp-timeout-for 53", "\"53\" is not PORT=DURATION"),
        ] {
            let line = format!("snat run --iface up0 --internal 10.0.0.0/8 {line}");
            let e = Cli::try_parse_from(line.split_whitespace())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(needle) && e.contains("--udp-timeout-for"),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn reserved_ports_and_policy_flags() {
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --port-range 30000:40000"),
            iface(&[UPLINK]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("overlaps --reserved-ports 30000-32767") && e.contains("e.g. 32768:65535"),
            "{e}"
        );
        let s = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --fair-share --fair-share-threshold 0.9 --max-ports-per-source 500 --on-exhaustion drop --ip-pooling paired"),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert_eq!(
            s.policy,
            Policy {
                reject: false,
                overflow: false,
                reject_per_sec: 1000,
                max_per_source: 500,
                fair_share_permille: 900
            }
        );
        let d = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8"),
            iface(&[UPLINK]),
        )
        .unwrap();
        assert!(
            d.policy.reject
                && d.policy.overflow
                && d.policy.fair_share_permille == 0
                && d.policy.max_per_source == 0
        );
        let e = Settings::validate(
            &args("run --iface up0 --internal 10.0.0.0/8 --fair-share --fair-share-threshold 1.5"),
            iface(&[UPLINK]),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::FairShareThreshold(_)));
    }

    #[test]
    fn warnings_for_short_timeouts_and_nodeport_overlap() {
        let s = Settings::validate(
            &args(
                "run --iface up0 --internal 10.0.0.0/8 --udp-timeout 30s --port-range 30000:40000 --reserved-ports 20000-20099",
            ),
            iface(&[UPLINK]),
        )
        .unwrap();
        let w = s.warnings().join("\n");
        assert!(w.contains("--udp-timeout 30s is below"), "{w}");
        assert!(w.contains("NodePort range 30000:32767"), "{w}");
    }
}
