//! What the operator asked for: the command line ([`cli`]), the `--config` file ([`file`]), a
//! cluster plan's slice ([`plan`]), and their validation into [`Settings`], before anything
//! touches the kernel. The layers above take a plain `Settings`; clap stays in this one.
//!
//! Invariant: a `Settings` value is internally consistent (at least one internal CIDR, 1..=64
//! distinct NAT IPs none of which is internal, timeouts of at least one second, a table size
//! the kernel accepts); every error names the offending value and the fix.

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
    net::{Ipv4Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use clap::ValueEnum;
use snat_common::MAX_NAT_IPS;

use self::{
    cidr::Ipv4Cidr,
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
    pub nat_ips: Vec<Ipv4Addr>,
    pub internal: Vec<Ipv4Cidr>,
    /// Destinations never translated: the `--exclude` CIDRs and the internal ones.
    pub exclude: Vec<Ipv4Cidr>,
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
}

impl Settings {
    /// Checks `args` against the facts of the interface they name.
    pub fn validate(args: &RunArgs, iface: Interface) -> Result<Self, ConfigError> {
        if args.internal.is_empty() {
            return Err(ConfigError::NoInternal);
        }
        let cluster = cluster::Cluster::validate(&args.cluster)?;
        if cluster.is_some() && args.nat_ips.is_empty() {
            return Err(ConfigError::ClusterNatIp);
        }
        let (nat_ips, port_range, slice) = match &args.plan {
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
                (plan.nat_ips.clone(), slice.range(), Some(label))
            }
            None if args.nat_ips.is_empty() => {
                let primary = *iface
                    .ipv4
                    .first()
                    .ok_or_else(|| ConfigError::NoNatIp(iface.name.clone()))?;
                (vec![primary], args.port_range, None)
            }
            None => (args.nat_ips.clone(), args.port_range, None),
        };
        check_nat_ips(&nat_ips, &args.internal)?;
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
        let mut exclude = args.exclude.clone();
        for c in &args.internal {
            if !exclude.contains(c) {
                exclude.push(*c);
            }
        }
        Ok(Self {
            iface,
            nat_ips,
            internal: args.internal.clone(),
            exclude,
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

/// Checks a set of NAT IPs: 1..=64 distinct usable addresses, none inside an internal CIDR.
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
        Interface {
            name: "up0".into(),
            index: 7,
            ipv4: ips.to_vec(),
        }
    }

    const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

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
