//! What the agent reports about itself, as one serialisable [`Report`]: the pools (NAT IP ×
//! protocol, IPv4 and IPv6 NAT IPs alike) with their allocation and use, the busiest sources and
//! destinations of either family, every counter, the releases, the allocation-time histogram
//! and, on request, the mappings themselves. The control socket sends it as JSON, the CLI
//! renders it as text (`render`), the metrics endpoint encodes it for Prometheus (`metrics`).
//!
//! [`Report::build`] is a pure function of the settings and a [`Snapshot`] of the agent's figures
//! (the agent reads the maps into one; this module reads nothing).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};
use snat_common::{alloc_hist, Counter, Proto};

use crate::{
    cluster::node::{BlockState, Status},
    datapath::AllocHistogram,
    settings::Settings,
    tables::{
        expiry::Reason,
        usage::Saturation,
        view::{Conn, TableView},
    },
};

/// The agent's figures at one moment: what a [`Report`] is made of.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The tables, aggregated (with rows, if asked for).
    pub view: TableView,
    /// Every packet and allocation counter, summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    /// Flows refused for lack of a port, per (NAT IP, protocol), both families.
    pub exhausted: Vec<((IpAddr, u8), u64)>,
    /// Flows that got a port on another NAT IP than their paired one, per (paired NAT IP,
    /// protocol).
    pub overflowed: Vec<((IpAddr, u8), u64)>,
    /// Flows refused per internal source.
    pub refused_by_source: Vec<(IpAddr, u64)>,
    /// Mappings released, by protocol and reason.
    pub expired: BTreeMap<(Proto, Reason), u64>,
    pub saturation: Saturation,
    pub allocation: AllocHistogram,
    /// What the previous agent's stop guard dropped, when this agent took over from one.
    pub guard_dropped: Option<u64>,
    /// Control requests refused, per request name.
    pub control_refused: BTreeMap<String, u64>,
    /// The block allocator, in cluster mode.
    pub cluster: Option<Status>,
    /// Where replies are translated (`tc`, `xdp-native`, `xdp-generic`), when attached.
    pub ingress: Option<String>,
    /// `--hairpin on`: the pods' interfaces the hairpin program is on.
    pub hairpin: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub iface: String,
    pub nat_ips: Vec<String>,
    pub port_range: String,
    /// Where replies are translated: `tc`, or `xdp-native` / `xdp-generic` (XDP in front of
    /// TC, which takes what XDP leaves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    /// `--hairpin on`: the pods' interfaces hairpinning runs on (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hairpin: Option<Vec<String>>,
    /// The plan slice this node runs on (`snat run --plan`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    /// Every NAT IP × protocol: the IPv4 NAT IPs, then the IPv6 ones (each family's configured
    /// ones first, then any that still hold mappings from an earlier setting).
    pub pools: Vec<Pool>,
    pub mappings: BTreeMap<Proto, u64>,
    /// The IPv6 NAT IPs (NAT66), absent without IPv6 networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_ips6: Vec<String>,
    /// IPv6 mappings by protocol (`mappings` counts IPv4's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mappings6: BTreeMap<Proto, u64>,
    /// Reverse halves: each holds one (NAT ip:port, remote) claim. Equal to `mappings` at rest;
    /// more would be a leaked port.
    pub port_claims: BTreeMap<Proto, u64>,
    /// IPv6 reverse halves by protocol (`port_claims` counts IPv4's), absent without IPv6.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_claims6: BTreeMap<Proto, u64>,
    /// Sources of either family holding the most ports, most first.
    pub top_sources: Vec<SourceUse>,
    pub top_destinations: Vec<DestinationUse>,
    /// Sources refused the most flows (no port, their cap, or their fair share), most first.
    pub top_refused: Vec<SourceRefused>,
    pub policy: PolicyReport,
    /// Destinations and sources at or above each warning level (80 %, 95 %).
    pub saturation: Vec<SaturationLevel>,
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    pub expired: BTreeMap<Proto, BTreeMap<String, u64>>,
    pub allocation: Allocation,
    /// Packets from internal sources the previous agent's stop guard dropped while no agent ran
    /// (`--on-stop closed`); absent when this agent did not take over from a guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_dropped: Option<u64>,
    /// Control requests refused for the client's lack of rights, per request name.
    #[serde(default)]
    pub control_refused: BTreeMap<String, u64>,
    /// Cluster mode: this node's lease, blocks and fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conns: Vec<Conn>,
}

/// This node's part of a cluster (`--etcd-endpoints`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterReport {
    pub node: String,
    /// The etcd lease, in hex as etcdctl shows it.
    pub lease: Option<String>,
    pub ready: bool,
    /// The last store operation succeeded.
    pub connected: bool,
    /// The fence has closed: the blocks' packets are dropped until a keep-alive succeeds.
    pub suspended: bool,
    /// Seconds until the datapath stops translating in this node's blocks.
    pub fence_in_seconds: f64,
    pub blocks: Vec<HeldBlock>,
    /// NAT IPs that want a block and have none to use yet, and why.
    pub shortage: BTreeMap<String, String>,
    pub claims: BTreeMap<String, u64>,
    pub releases: BTreeMap<String, u64>,
    pub keepalive_rtt_seconds: Option<f64>,
    pub claim_latency_seconds: Option<f64>,
    pub leases_lost: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeldBlock {
    pub nat_ip: String,
    pub index: u16,
    /// `lo-hi`.
    pub ports: String,
    /// The claim's etcd create revision.
    pub epoch: i64,
    /// `awaiting-gateway`, `open`, `closed` or `releasing`.
    pub state: String,
    pub mappings: u32,
}

impl ClusterReport {
    pub fn of(st: &Status, port_lo: u16, block_size: u16) -> Self {
        let secs = |d: std::time::Duration| d.as_secs_f64();
        Self {
            node: st.node.clone(),
            lease: st.lease.map(|l| format!("{l:x}")),
            ready: st.ready,
            connected: st.connected,
            suspended: st.suspended,
            fence_in_seconds: st.fence_in as f64 / 1e9,
            blocks: st
                .blocks
                .iter()
                .map(|(b, epoch, state, live)| {
                    let lo = u32::from(port_lo) + u32::from(b.index) * u32::from(block_size);
                    HeldBlock {
                        nat_ip: b.nat_ip.to_string(),
                        index: b.index,
                        ports: format!("{lo}-{}", lo + u32::from(block_size) - 1),
                        epoch: *epoch,
                        state: match state {
                            BlockState::AwaitGateway { .. } => "awaiting-gateway",
                            BlockState::Open { .. } => "open",
                            BlockState::Closed { .. } => "closed",
                            BlockState::Releasing { .. } => "releasing",
                        }
                        .into(),
                        mappings: *live,
                    }
                })
                .collect(),
            shortage: st
                .shortage
                .iter()
                .map(|(ip, why)| (ip.to_string(), why.name().to_owned()))
                .collect(),
            claims: st
                .stats
                .claims
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            releases: st
                .stats
                .releases
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            keepalive_rtt_seconds: st.stats.keepalive_rtt.map(secs),
            claim_latency_seconds: st.stats.claim_latency.map(secs),
            leases_lost: st.stats.leases_lost,
        }
    }
}

/// One NAT IP and protocol.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Pool {
    pub nat_ip: String,
    pub proto: Proto,
    /// Ports this node may hand out (the range, or 0 for a NAT IP no longer configured).
    pub ports_total: u64,
    /// Distinct NAT ports held by at least one mapping.
    pub ports_in_use: u64,
    pub used_percent: f64,
    pub mappings: u64,
    /// New flows refused for lack of a port (each flow once).
    pub exhausted_flows: u64,
    /// New flows of pods paired with this NAT IP that got their port on another one, because
    /// this one had none left towards their destination (`--ip-pooling overflow`).
    #[serde(default)]
    pub overflowed_flows: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceUse {
    pub source: String,
    /// Mappings, i.e. (NAT port, destination) claims, the source holds.
    pub ports: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DestinationUse {
    pub nat_ip: String,
    pub proto: Proto,
    /// `ip:port` for TCP, `ip` for UDP and ICMP.
    pub destination: String,
    pub ports: u64,
    /// `ports` over the NAT IP's range: how close this destination is to exhaustion.
    pub saturation: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceRefused {
    pub source: String,
    pub flows: u64,
}

/// The admission policy in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyReport {
    /// `reject` or `drop`.
    pub on_exhaustion: String,
    /// `overflow` or `paired`.
    #[serde(default)]
    pub ip_pooling: String,
    /// 0: no cap.
    pub max_ports_per_source: u32,
    /// 0: no fair share.
    pub fair_share_threshold: f64,
    pub reserved_ports: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaturationLevel {
    /// `destination` or `source`.
    pub kind: String,
    /// Percent.
    pub level: u32,
    /// Subjects at or above the level now.
    pub current: u64,
    /// Times a subject rose to the level.
    pub crossings: u64,
}

/// How long allocations took (log2 buckets of nanoseconds).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Allocation {
    /// (upper bound in ns, cumulative count) per bucket; the last bound is `u64::MAX` (+Inf).
    pub buckets: Vec<(u64, u64)>,
    pub sum_ns: u64,
    pub count: u64,
}

impl Report {
    /// The report of `s`, an agent running with `settings`.
    pub fn build(settings: &Settings, s: Snapshot) -> Self {
        let view = s.view;
        let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (c, v) in s.counters {
            let (group, name) = c.labels();
            counters
                .entry(group.into())
                .or_default()
                .insert(name.into(), v);
        }
        let by_pool = |v: Vec<((IpAddr, u8), u64)>| -> BTreeMap<(IpAddr, u8), u64> {
            v.into_iter().collect()
        };
        let exhausted = by_pool(s.exhausted);
        let overflowed = by_pool(s.overflowed);
        let mut expired: BTreeMap<Proto, BTreeMap<String, u64>> = BTreeMap::new();
        for ((p, reason), n) in s.expired {
            expired
                .entry(p)
                .or_default()
                .insert(reason.name().into(), n);
        }

        let range = u64::from(settings.port_range.size());
        // Both families share the port range.
        let configured = |ip: IpAddr| match ip {
            IpAddr::V4(ip) => settings.nat_ips.contains(&ip),
            IpAddr::V6(ip) => settings.nat_ips6.contains(&ip),
        };
        let total_of = |ip: IpAddr| if configured(ip) { range } else { 0 };
        // NAT IPs no longer configured that still hold mappings (or refused flows), in order.
        let former: BTreeSet<IpAddr> = view
            .pool_mappings
            .keys()
            .chain(exhausted.keys())
            .map(|(ip, _)| *ip)
            .filter(|ip| !configured(*ip))
            .collect();
        let ips: Vec<IpAddr> = (settings.nat_ips.iter().map(|ip| IpAddr::V4(*ip)))
            .chain(former.iter().copied().filter(IpAddr::is_ipv4))
            .chain(settings.nat_ips6.iter().map(|ip| IpAddr::V6(*ip)))
            .chain(former.iter().copied().filter(IpAddr::is_ipv6))
            .collect();
        let pools = ips
            .iter()
            .flat_map(|ip| Proto::ALL.map(|p| (*ip, p)))
            .map(|(ip, p)| {
                let key = (ip, p.number());
                let (total, in_use) = (
                    total_of(ip),
                    view.ports_in_use.get(&key).copied().unwrap_or(0),
                );
                Pool {
                    nat_ip: ip.to_string(),
                    proto: p,
                    ports_total: total,
                    ports_in_use: in_use,
                    used_percent: percent(in_use, total),
                    mappings: view.pool_mappings.get(&key).copied().unwrap_or(0),
                    exhausted_flows: exhausted.get(&key).copied().unwrap_or(0),
                    overflowed_flows: overflowed.get(&key).copied().unwrap_or(0),
                }
            })
            .collect();
        let by_proto = |m: &std::collections::HashMap<u8, u64>| -> BTreeMap<Proto, u64> {
            Proto::ALL
                .iter()
                .map(|p| (*p, m.get(&p.number()).copied().unwrap_or(0)))
                .collect()
        };
        let top_n = settings.top_sources;
        let mut refused = s.refused_by_source;
        refused.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        refused.truncate(top_n);
        let saturation = s
            .saturation
            .counts()
            .into_iter()
            .map(|((kind, level), current)| SaturationLevel {
                kind: kind.into(),
                level,
                current,
                crossings: s
                    .saturation
                    .crossings
                    .get(&(kind, level))
                    .copied()
                    .unwrap_or(0),
            })
            .collect();
        let p = &settings.policy;
        let policy = PolicyReport {
            on_exhaustion: if p.reject { "reject" } else { "drop" }.into(),
            ip_pooling: if p.overflow { "overflow" } else { "paired" }.into(),
            max_ports_per_source: p.max_per_source,
            fair_share_threshold: f64::from(p.fair_share_permille) / 1000.0,
            reserved_ports: settings.reserved_ports.to_string(),
        };
        let hist = s.allocation;
        let mut cumulative = 0;
        let buckets = hist
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n;
                let last = i + 1 == hist.buckets.len();
                (
                    if last {
                        u64::MAX
                    } else {
                        alloc_hist::upper_ns(i as u32)
                    },
                    cumulative,
                )
            })
            .collect();
        let top_destinations = view
            .top_destinations(top_n)
            .into_iter()
            .filter_map(|(d, n)| {
                Some(DestinationUse {
                    nat_ip: d.nat_ip.to_string(),
                    proto: Proto::from_number(d.proto)?,
                    destination: d.label(),
                    ports: n,
                    saturation: ratio(n, total_of(d.nat_ip)),
                })
            })
            .collect();
        Report {
            iface: settings.iface.name.clone(),
            nat_ips: settings.nat_ips.iter().map(ToString::to_string).collect(),
            port_range: settings.port_range.to_string(),
            ingress: s.ingress.clone(),
            hairpin: s.hairpin.clone(),
            slice: settings.slice.clone(),
            pools,
            mappings: by_proto(&view.mappings),
            nat_ips6: settings.nat_ips6.iter().map(ToString::to_string).collect(),
            mappings6: by_proto(&view.mappings6),
            port_claims: by_proto(&view.claims),
            port_claims6: if settings.nat_ips6.is_empty() && view.claims6.is_empty() {
                BTreeMap::new()
            } else {
                by_proto(&view.claims6)
            },
            top_sources: view
                .top_sources(top_n)
                .into_iter()
                .map(|(ip, n)| SourceUse {
                    source: ip.to_string(),
                    ports: n,
                })
                .collect(),
            top_destinations,
            top_refused: refused
                .into_iter()
                .map(|(ip, n)| SourceRefused {
                    source: ip.to_string(),
                    flows: n,
                })
                .collect(),
            policy,
            saturation,
            counters,
            expired,
            allocation: Allocation {
                buckets,
                sum_ns: hist.sum_ns,
                count: hist.count,
            },
            guard_dropped: s.guard_dropped,
            control_refused: s.control_refused,
            cluster: s
                .cluster
                .as_ref()
                .zip(settings.cluster.as_ref())
                .map(|(st, c)| ClusterReport::of(st, settings.port_range.lo, c.block_size)),
            conns: view.conns,
        }
    }

    /// A counter by group and name (0 if absent).
    pub fn counter(&self, group: &str, name: &str) -> u64 {
        self.counters
            .get(group)
            .and_then(|g| g.get(name))
            .copied()
            .unwrap_or(0)
    }
}

fn ratio(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 / total as f64
    }
}

fn percent(n: u64, total: u64) -> f64 {
    (ratio(n, total) * 1000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use snat_common::{
        flow::proto, tcp::SEEN_SYN, FlowKey, FlowKey6, Mapping, Mapping6, Origin, Origin6,
    };

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    use crate::{
        settings::{
            cli::{Cli, Command},
            Interface,
        },
        tables::view::{ConnFilter, ViewBuilder},
    };

    const S: u64 = 1_000_000_000;

    fn settings() -> Settings {
        settings_of("snat run --iface up0 --internal 10.1.0.0/16 --nat-ip 198.51.100.1 --nat-ip 198.51.100.2 --port-range 40000:40099 --top-sources 1")
    }

    fn settings_of(line: &str) -> Settings {
        let Command::Run(args) = Cli::try_parse_from(line.split_whitespace())
            .unwrap()
            .command
        else {
            unreachable!()
        };
        let iface = Interface {
            name: "up0".into(),
            index: 1,
            ipv4: vec![],
            ipv6: vec![],
        };
        Settings::validate(&args, iface).unwrap()
    }

    /// A TCP mapping of pod `src` (port `sport`) to 203.0.113.10:80 through 198.51.100.1.
    fn add(b: &mut ViewBuilder<'_>, src: [u8; 4], sport: u16, nat_port: u16) {
        let key = FlowKey::new(
            proto::TCP,
            src,
            sport.to_be_bytes(),
            [203, 0, 113, 10],
            80u16.to_be_bytes(),
        );
        let mut m = Mapping::new(key, [198, 51, 100, 1], nat_port.to_be_bytes(), 10 * S);
        m.record(SEEN_SYN);
        let reply = key.reply(m.nat_addr, m.nat_port);
        let mut o = Origin::new(reply, src, key.src_port, 10 * S);
        o.record(m.epoch, SEEN_SYN);
        b.add(&key, &m, Some(&o));
        b.add_claim(&reply);
    }

    #[test]
    fn a_report_is_a_pure_function_of_settings_and_a_snapshot() {
        let settings = settings();
        let rows = ConnFilter {
            proto: Some(Proto::Tcp),
            ..ConnFilter::default()
        };
        let mut b = ViewBuilder::new(&settings.timeouts, 20 * S, Some(rows));
        add(&mut b, [10, 1, 0, 2], 1000, 40000);
        add(&mut b, [10, 1, 0, 2], 1001, 40001);
        add(&mut b, [10, 1, 1, 2], 1000, 40002);
        let snapshot = Snapshot {
            view: b.finish(),
            counters: vec![
                (Counter::CreatedTcp, 3),
                (Counter::EgressDropExhaustedUdp, 2),
            ],
            exhausted: vec![((ip("198.51.100.2"), proto::UDP), 2)],
            overflowed: vec![((ip("198.51.100.1"), proto::TCP), 7)],
            refused_by_source: vec![(ip("10.1.2.2"), 1), (ip("10.1.3.2"), 5)],
            expired: BTreeMap::from([((Proto::Udp, Reason::Idle), 4)]),
            saturation: Saturation::default(),
            allocation: AllocHistogram {
                buckets: vec![0, 1, 2],
                sum_ns: 30,
                count: 3,
            },
            guard_dropped: Some(9),
            control_refused: BTreeMap::from([("set".to_owned(), 1)]),
            cluster: None,
            ingress: Some("xdp-native".to_owned()),
            hairpin: Some(vec!["cali1".to_owned()]),
        };
        let r = Report::build(&settings, snapshot);
        assert_eq!(r.ingress.as_deref(), Some("xdp-native"));
        assert_eq!(r.hairpin, Some(vec!["cali1".to_owned()]));

        assert_eq!(
            (r.iface.as_str(), r.port_range.as_str()),
            ("up0", "40000:40099")
        );
        // Every configured NAT IP × protocol, with what it holds and refused.
        assert_eq!(r.pools.len(), 2 * 3);
        let pool = |ip: &str, p| {
            r.pools
                .iter()
                .find(|x| x.nat_ip == ip && x.proto == p)
                .unwrap()
        };
        let tcp = pool("198.51.100.1", Proto::Tcp);
        assert_eq!(
            (tcp.ports_total, tcp.ports_in_use, tcp.mappings),
            (100, 3, 3)
        );
        assert_eq!((tcp.used_percent, tcp.overflowed_flows), (3.0, 7));
        assert_eq!(pool("198.51.100.2", Proto::Udp).exhausted_flows, 2);
        assert_eq!(r.mappings[&Proto::Tcp], 3);
        assert_eq!(r.port_claims[&Proto::Tcp], 3);
        // `--top-sources 1`: the busiest source, destination and refused source only.
        assert_eq!(r.top_sources.len(), 1);
        assert_eq!(
            (r.top_sources[0].source.as_str(), r.top_sources[0].ports),
            ("10.1.0.2", 2)
        );
        assert_eq!(r.top_destinations.len(), 1);
        assert_eq!(r.top_destinations[0].destination, "203.0.113.10:80");
        assert_eq!(r.top_destinations[0].saturation, 0.03);
        assert_eq!(r.top_refused.len(), 1);
        assert_eq!(r.top_refused[0].source, "10.1.3.2");
        assert_eq!(r.counter("alloc", "created_tcp"), 3);
        assert_eq!(r.expired[&Proto::Udp]["idle"], 4);
        assert_eq!(r.allocation.buckets.last(), Some(&(u64::MAX, 3)));
        assert_eq!((r.allocation.count, r.guard_dropped), (3, Some(9)));
        assert_eq!(r.control_refused["set"], 1);
        assert_eq!(r.conns.len(), 3, "the rows the filter asked for");
        assert_eq!(
            (
                r.policy.on_exhaustion.as_str(),
                r.policy.ip_pooling.as_str()
            ),
            ("reject", "overflow")
        );
    }

    #[test]
    fn a_cluster_node_reports_its_lease_blocks_and_fence() {
        use crate::cluster::{
            geometry::BlockId,
            node::{Shortage, Stats},
        };
        let settings = settings_of("snat run --iface up0 --internal 10.1.0.0/16 --port-range 40000:40511 --nat-ip 198.51.100.1 --etcd-endpoints http://10.0.0.5:2379 --node-name n1 --block-size 64");
        let ip = std::net::Ipv4Addr::new(198, 51, 100, 1);
        let status = Status {
            node: "n1".into(),
            lease: Some(0x694d),
            ready: true,
            connected: true,
            blocks: vec![
                (
                    BlockId {
                        nat_ip: ip,
                        index: 2,
                    },
                    17,
                    BlockState::Open { since: 0 },
                    40,
                ),
                (
                    BlockId {
                        nat_ip: ip,
                        index: 7,
                    },
                    21,
                    BlockState::Closed {
                        since: 0,
                        reopen: true,
                    },
                    0,
                ),
            ],
            fence_in: 61_500_000_000,
            suspended: false,
            shortage: BTreeMap::from([(ip, Shortage::ClaimPending)]),
            stats: Stats {
                claims: BTreeMap::from([("ok", 3), ("taken", 1)]),
                ..Stats::default()
            },
        };
        let snapshot = Snapshot {
            cluster: Some(status),
            ..Snapshot::default()
        };
        let r = Report::build(&settings, snapshot);
        let c = r.cluster.as_ref().unwrap();
        assert_eq!(c.lease.as_deref(), Some("694d"));
        assert_eq!(c.blocks[0].ports, "40128-40191");
        assert_eq!(c.blocks[1].ports, "40448-40511");
        assert_eq!(c.blocks[1].state, "closed");
        assert_eq!(
            c.shortage.get("198.51.100.1").map(String::as_str),
            Some("claim_pending")
        );
        assert_eq!(c.fence_in_seconds, 61.5);
        let text = crate::serve::render::render_status(&r);
        assert!(
            text.contains("cluster node n1 lease 694d connected; fence in 62s; blocks 2"),
            "{text}"
        );
        assert!(
            text.contains("block 198.51.100.1/2 ports 40128-40191 epoch 17 open mappings 40"),
            "{text}"
        );
        let metrics = crate::serve::metrics::encode(&r).unwrap();
        for want in [
            "snat_blocks_held{nat_ip=\"198.51.100.1\"} 2",
            "snat_block_claims_total{result=\"taken\"} 1",
            "snat_block_releases_total{reason=\"idle\"} 0",
            "snat_blocks_suspended 0",
            "snat_cluster_connected 1",
            "snat_cluster_fence_seconds 61.5",
            "snat_block_shortage{nat_ip=\"198.51.100.1\",reason=\"claim_pending\"} 1",
        ] {
            assert!(metrics.contains(want), "{want} missing in:\n{metrics}");
        }
    }

    /// A mapping of pod `src:sport` to `[2001:db8:2::10]:443` (TCP) or `2001:db8:2::10`
    /// (UDP) through `nat6`.
    fn add6(b: &mut ViewBuilder<'_>, p: u8, src: &str, sport: u16, nat6: &str, nat_port: u16) {
        let ip6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let key = FlowKey6::new(
            p,
            ip6(src),
            sport.to_be_bytes(),
            ip6("2001:db8:2::10"),
            FlowKey6::remote_port_for(p, 443u16.to_be_bytes()),
        );
        let m = Mapping6::new(key, ip6(nat6), nat_port.to_be_bytes(), 10 * S);
        let reply = key.reply(m.nat_addr, m.nat_port);
        let o = Origin6::new(reply, key.src_addr, key.src_port, 10 * S);
        b.add(&key, &m, Some(&o));
        b.add_claim(&reply);
    }

    #[test]
    fn ipv6_nat_ips_sources_and_destinations_are_reported_with_ipv4_ones() {
        let settings = settings_of("snat run --iface up0 --internal 10.1.0.0/16 --internal fd00:10::/48 --nat-ip 198.51.100.1 --nat-ip 2001:db8:1::1 --port-range 40000:40099 --top-sources 3");
        let mut b = ViewBuilder::new(&settings.timeouts, 20 * S, Some(ConnFilter::default()));
        add(&mut b, [10, 1, 0, 2], 1000, 40000);
        add6(
            &mut b,
            proto::TCP,
            "fd00:10::2",
            1000,
            "2001:db8:1::1",
            40000,
        );
        add6(
            &mut b,
            proto::TCP,
            "fd00:10::2",
            1001,
            "2001:db8:1::1",
            40001,
        );
        add6(
            &mut b,
            proto::UDP,
            "fd00:10::2",
            5000,
            "2001:db8:1::1",
            40000,
        );
        // A former IPv6 NAT IP still holding a mapping.
        add6(
            &mut b,
            proto::TCP,
            "fd00:10::3",
            1000,
            "2001:db8:1::9",
            40000,
        );
        let r = Report::build(
            &settings,
            Snapshot {
                view: b.finish(),
                // The IPv6 maps' refusals, next to an IPv4 one.
                exhausted: vec![
                    ((ip("2001:db8:1::1"), proto::TCP), 4),
                    ((ip("198.51.100.1"), proto::TCP), 1),
                ],
                overflowed: vec![((ip("2001:db8:1::1"), proto::UDP), 2)],
                refused_by_source: vec![(ip("fd00:10::3"), 4), (ip("10.1.0.2"), 1)],
                ..Snapshot::default()
            },
        );
        // IPv4 pools first, as before; then the configured IPv6 NAT IP, then the former one.
        let ips: Vec<&str> = r.pools.iter().map(|p| p.nat_ip.as_str()).collect();
        assert_eq!(
            ips,
            [
                "198.51.100.1",
                "198.51.100.1",
                "198.51.100.1",
                "2001:db8:1::1",
                "2001:db8:1::1",
                "2001:db8:1::1",
                "2001:db8:1::9",
                "2001:db8:1::9",
                "2001:db8:1::9",
            ]
        );
        let pool = |ip: &str, p| {
            r.pools
                .iter()
                .find(|x| x.nat_ip == ip && x.proto == p)
                .unwrap()
        };
        let tcp6 = pool("2001:db8:1::1", Proto::Tcp);
        assert_eq!(
            (
                tcp6.ports_total,
                tcp6.ports_in_use,
                tcp6.mappings,
                tcp6.used_percent
            ),
            (100, 2, 2, 2.0)
        );
        assert_eq!(tcp6.exhausted_flows, 4);
        let udp6 = pool("2001:db8:1::1", Proto::Udp);
        assert_eq!(
            (udp6.ports_in_use, udp6.mappings, udp6.overflowed_flows),
            (1, 1, 2)
        );
        assert_eq!(pool("198.51.100.1", Proto::Tcp).exhausted_flows, 1);
        let refused: Vec<(&str, u64)> = r
            .top_refused
            .iter()
            .map(|s| (s.source.as_str(), s.flows))
            .collect();
        assert_eq!(refused, [("fd00:10::3", 4), ("10.1.0.2", 1)]);
        let former = pool("2001:db8:1::9", Proto::Tcp);
        assert_eq!((former.ports_total, former.mappings), (0, 1));
        let tcp4 = pool("198.51.100.1", Proto::Tcp);
        assert_eq!((tcp4.ports_total, tcp4.ports_in_use), (100, 1));
        // Per-family totals: the IPv4 fields as they were, the IPv6 ones next to them.
        assert_eq!(r.mappings[&Proto::Tcp], 1);
        assert_eq!((r.mappings6[&Proto::Tcp], r.mappings6[&Proto::Udp]), (3, 1));
        assert_eq!(
            (r.port_claims[&Proto::Tcp], r.port_claims6[&Proto::Tcp]),
            (1, 3)
        );
        assert_eq!(r.nat_ips, ["198.51.100.1"]);
        assert_eq!(r.nat_ips6, ["2001:db8:1::1"]);
        // The busiest sources and destinations, whichever the family.
        let sources: Vec<(&str, u64)> = r
            .top_sources
            .iter()
            .map(|s| (s.source.as_str(), s.ports))
            .collect();
        assert_eq!(
            sources,
            [("fd00:10::2", 3), ("10.1.0.2", 1), ("fd00:10::3", 1)]
        );
        let d = &r.top_destinations[0];
        assert_eq!(
            (
                d.nat_ip.as_str(),
                d.proto,
                d.destination.as_str(),
                d.ports,
                d.saturation
            ),
            ("2001:db8:1::1", Proto::Tcp, "[2001:db8:2::10]:443", 2, 0.02)
        );
        assert_eq!(r.conns.len(), 5);
        assert_eq!(r.conns[0].internal, "10.1.0.2:1000");

        // JSON: IPv6 entries in the same arrays, under the same field names.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pools"][3]["nat_ip"], "2001:db8:1::1");
        assert_eq!(json["pools"][3]["ports_in_use"], 2);
        assert_eq!(json["port_claims6"]["tcp"], 3);
        assert_eq!(json["top_sources"][0]["source"], "fd00:10::2");
        assert_eq!(json["conns"][1]["nat"], "[2001:db8:1::1]:40000");

        // Text: the IPv6 rows, with the columns still lined up.
        let status = crate::serve::render::render_status(&r);
        let header = status.lines().find(|l| l.starts_with("NAT IP")).unwrap();
        let row = status
            .lines()
            .find(|l| l.starts_with("2001:db8:1::1 ") && l.contains("tcp"))
            .unwrap_or_else(|| panic!("{status}"));
        assert_eq!(header.find("PROTO"), row.find("tcp"), "{status}");
        assert!(status.contains("fd00:10::2"), "{status}");
        let conns = crate::serve::render::render_conns(&r);
        let header = conns.lines().next().unwrap();
        let row = conns
            .lines()
            .find(|l| l.contains("[fd00:10::3]:1000"))
            .unwrap_or_else(|| panic!("{conns}"));
        assert_eq!(
            header.find("DESTINATION"),
            row.find("[2001:db8:2::10]:443"),
            "{conns}"
        );
        let stats = crate::serve::render::render_stats(&r);
        assert!(stats.contains("port_claims (IPv6):"), "{stats}");

        // Metrics: the IPv6 pools by their nat_ip, the claims by family.
        let metrics = crate::serve::metrics::encode(&r).unwrap();
        for want in [
            "snat_ports_in_use{nat_ip=\"2001:db8:1::1\",proto=\"tcp\"} 2",
            "snat_ports_total{nat_ip=\"2001:db8:1::1\",proto=\"udp\"} 100",
            "snat_ports_in_use{nat_ip=\"198.51.100.1\",proto=\"tcp\"} 1",
            "snat_port_claims{family=\"ipv6\",proto=\"tcp\"} 3",
            "snat_port_claims{proto=\"tcp\"} 1",
            "snat_source_ports_in_use{source=\"fd00:10::2\"} 3",
            "snat_destination_saturation{nat_ip=\"2001:db8:1::1\",destination=\"[2001:db8:2::10]:443\",proto=\"tcp\"} 0.02",
        ] {
            assert!(
                metrics.lines().any(|l| l == want),
                "{want} missing in:\n{metrics}"
            );
        }
    }

    #[test]
    fn an_ipv4_only_agent_reports_no_ipv6_claims() {
        let r = Report::build(&settings(), Snapshot::default());
        assert!(r.port_claims6.is_empty() && r.nat_ips6.is_empty());
        assert_eq!(r.pools.len(), 2 * 3);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("port_claims6").is_none(), "{json}");
        assert!(!crate::serve::metrics::encode(&r)
            .unwrap()
            .contains("snat_port_claims{family=\"ipv6\""));
    }
}
