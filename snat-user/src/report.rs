//! What the agent reports about itself, as one serialisable [`Report`]: the pools (NAT IP ×
//! protocol) with their allocation and use, the busiest sources and destinations, every counter,
//! the releases, the allocation-time histogram and, on request, the mappings themselves. The
//! control socket sends it as JSON, the CLI renders it as text, the metrics endpoint encodes it
//! for Prometheus.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use snat_common::{alloc_hist, flow::proto};

use crate::{
    agent::AgentState,
    expiry::{self, proto_name},
    view::{Conn, ParsedFilter, TableView},
};

const PROTOS: [u8; 3] = [proto::TCP, proto::UDP, proto::ICMP];

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub iface: String,
    pub nat_ips: Vec<String>,
    pub port_range: String,
    /// The plan slice this node runs on (`snat run --plan`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    pub pools: Vec<Pool>,
    pub mappings: BTreeMap<String, u64>,
    /// Reverse halves: each holds one (NAT ip:port, remote) claim. Equal to `mappings` at rest;
    /// more would be a leaked port.
    pub port_claims: BTreeMap<String, u64>,
    pub top_sources: Vec<SourceUse>,
    pub top_destinations: Vec<DestinationUse>,
    /// Sources refused the most flows (no port, their cap, or their fair share), most first.
    pub top_refused: Vec<SourceRefused>,
    pub policy: PolicyReport,
    /// Destinations and sources at or above each warning level (80 %, 95 %).
    pub saturation: Vec<SaturationLevel>,
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    pub expired: BTreeMap<String, BTreeMap<String, u64>>,
    pub allocation: Allocation,
    /// Packets from internal sources the previous agent's stop guard dropped while no agent ran
    /// (`--on-stop closed`); absent when this agent did not take over from a guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_dropped: Option<u64>,
    /// Control requests refused for the client's lack of rights, per request name.
    #[serde(default)]
    pub control_refused: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conns: Vec<Conn>,
}

/// One NAT IP and protocol.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Pool {
    pub nat_ip: String,
    pub proto: String,
    /// Ports this node may hand out (the range, or 0 for a NAT IP no longer configured).
    pub ports_total: u64,
    /// Distinct NAT ports held by at least one mapping.
    pub ports_in_use: u64,
    pub used_percent: f64,
    pub mappings: u64,
    /// New flows refused for lack of a port (each flow once).
    pub exhausted_flows: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceUse {
    pub source: String,
    /// Mappings, i.e. (NAT port, destination) claims, the source holds.
    pub ports: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DestinationUse {
    pub nat_ip: String,
    pub proto: String,
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
    /// Reads the maps now. `rows`: also list the mappings matching this filter.
    pub fn build(state: &AgentState, rows: Option<ParsedFilter>) -> anyhow::Result<Self> {
        let settings = state.settings();
        let view = {
            let tables = state
                .tables
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            TableView::collect(&tables, &settings.timeouts, expiry::now_ns(), rows)?
        };
        let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (c, v) in state.counters.read()? {
            let (group, name) = c.labels();
            counters
                .entry(group.into())
                .or_default()
                .insert(name.into(), v);
        }
        let exhausted: BTreeMap<(Ipv4Addr, u8), u64> = state
            .counters
            .exhausted()?
            .into_iter()
            .map(|(k, n)| ((k.addr(), k.proto), n))
            .collect();
        let expired = {
            let sweeper = state
                .sweeper
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut e: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for ((p, reason), n) in &sweeper.expired {
                e.entry((*p).into())
                    .or_default()
                    .insert(reason.name().into(), *n);
            }
            e
        };

        let range = u64::from(settings.port_range.size());
        let total_of = |ip: Ipv4Addr| {
            if settings.nat_ips.contains(&ip) {
                range
            } else {
                0
            }
        };
        // Configured NAT IPs first, then any that still hold mappings from an earlier setting.
        let mut ips: Vec<Ipv4Addr> = settings.nat_ips.clone();
        for (ip, _) in view.pool_mappings.keys().chain(exhausted.keys()) {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        let pools = ips
            .iter()
            .flat_map(|ip| PROTOS.map(|p| (*ip, p)))
            .map(|(ip, p)| {
                let (total, in_use) = (
                    total_of(ip),
                    view.ports_in_use.get(&(ip, p)).copied().unwrap_or(0),
                );
                Pool {
                    nat_ip: ip.to_string(),
                    proto: proto_name(p).into(),
                    ports_total: total,
                    ports_in_use: in_use,
                    used_percent: percent(in_use, total),
                    mappings: view.pool_mappings.get(&(ip, p)).copied().unwrap_or(0),
                    exhausted_flows: exhausted.get(&(ip, p)).copied().unwrap_or(0),
                }
            })
            .collect();
        let by_proto = |m: &std::collections::HashMap<u8, u64>| -> BTreeMap<String, u64> {
            PROTOS
                .iter()
                .map(|p| (proto_name(*p).into(), m.get(p).copied().unwrap_or(0)))
                .collect()
        };
        let top_n = settings.top_sources;
        let mut refused = state.counters.refused_by_source()?;
        refused.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        refused.truncate(top_n);
        let saturation = {
            let s = state
                .saturation
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.counts()
                .into_iter()
                .map(|((kind, level), current)| SaturationLevel {
                    kind: kind.into(),
                    level,
                    current,
                    crossings: s.crossings.get(&(kind, level)).copied().unwrap_or(0),
                })
                .collect()
        };
        let p = &settings.policy;
        let policy = PolicyReport {
            on_exhaustion: if p.reject { "reject" } else { "drop" }.into(),
            max_ports_per_source: p.max_per_source,
            fair_share_threshold: f64::from(p.fair_share_permille) / 1000.0,
            reserved_ports: settings.reserved_ports.to_string(),
        };
        let hist = state.counters.alloc_histogram()?;
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
        Ok(Report {
            iface: settings.iface.name.clone(),
            nat_ips: settings.nat_ips.iter().map(ToString::to_string).collect(),
            port_range: settings.port_range.to_string(),
            slice: settings.slice.clone(),
            pools,
            mappings: by_proto(&view.mappings),
            port_claims: by_proto(&view.claims),
            top_sources: view
                .top_sources(top_n)
                .into_iter()
                .map(|(ip, n)| SourceUse {
                    source: ip.to_string(),
                    ports: n,
                })
                .collect(),
            top_destinations: view
                .top_destinations(top_n)
                .into_iter()
                .map(|(d, n)| DestinationUse {
                    nat_ip: d.nat_ip.to_string(),
                    proto: proto_name(d.proto).into(),
                    destination: d.label(),
                    ports: n,
                    saturation: ratio(n, total_of(d.nat_ip)),
                })
                .collect(),
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
            guard_dropped: state.guard_dropped,
            control_refused: state.refusals.snapshot(&crate::control::Request::NAMES),
            conns: view.conns,
        })
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

/// `snat status` as text: pools, then the busiest sources and destinations.
pub fn render_status(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snat on {}  NAT IPs {}  port range {}",
        r.iface,
        r.nat_ips.join(","),
        r.port_range
    );
    if let Some(slice) = &r.slice {
        let _ = writeln!(out, "plan slice: {slice}");
    }
    if let Some(n) = r.guard_dropped {
        let _ = writeln!(
            out,
            "stop guard: dropped {n} packets from internal sources before this agent took over"
        );
    }
    let p = &r.policy;
    let _ = writeln!(
        out,
        "on exhaustion: {}; per-source cap: {}; fair share: {}; reserved ports: {}",
        p.on_exhaustion,
        if p.max_ports_per_source == 0 {
            "none".to_owned()
        } else {
            p.max_ports_per_source.to_string()
        },
        if p.fair_share_threshold == 0.0 {
            "off".to_owned()
        } else {
            format!("from {:.0}% used", p.fair_share_threshold * 100.0)
        },
        p.reserved_ports
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<5} {:>10} {:>8} {:>7} {:>9} {:>10}",
        "NAT IP", "PROTO", "ALLOCATED", "IN USE", "USED%", "MAPPINGS", "EXHAUSTED"
    );
    for p in &r.pools {
        let _ = writeln!(
            out,
            "{:<16} {:<5} {:>10} {:>8} {:>6.1}% {:>9} {:>10}",
            p.nat_ip,
            p.proto,
            p.ports_total,
            p.ports_in_use,
            p.used_percent,
            p.mappings,
            p.exhausted_flows
        );
    }
    out.push_str(&render_top_sources(r));
    out.push_str(&render_top_destinations(r));
    let drops: Vec<String> = r
        .counters
        .get("egress")
        .into_iter()
        .flatten()
        .filter(|(name, n)| name.starts_with("drop_") && **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if !drops.is_empty() {
        let _ = writeln!(out, "\nEgress drops: {}", drops.join(", "));
    }
    out
}

pub fn render_top_sources(r: &Report) -> String {
    let refused = |src: &str| {
        r.top_refused
            .iter()
            .find(|x| x.source == src)
            .map_or(0, |x| x.flows)
    };
    let mut out = format!("\n{:<18} {:>8} {:>9}\n", "SOURCE", "PORTS", "REFUSED");
    let mut shown = Vec::new();
    for s in &r.top_sources {
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>9}",
            s.source,
            s.ports,
            refused(&s.source)
        );
        shown.push(s.source.as_str());
    }
    // Sources refused everything hold no ports: still name them.
    for x in r
        .top_refused
        .iter()
        .filter(|x| !shown.contains(&x.source.as_str()))
    {
        let _ = writeln!(out, "{:<18} {:>8} {:>9}", x.source, 0, x.flows);
    }
    out
}

pub fn render_top_destinations(r: &Report) -> String {
    let mut out = format!(
        "\n{:<16} {:<5} {:<22} {:>8} {:>11}\n",
        "NAT IP", "PROTO", "DESTINATION", "PORTS", "SATURATION"
    );
    for d in &r.top_destinations {
        let _ = writeln!(
            out,
            "{:<16} {:<5} {:<22} {:>8} {:>10.1}%",
            d.nat_ip,
            d.proto,
            d.destination,
            d.ports,
            d.saturation * 100.0
        );
    }
    out
}

/// `snat stats` as text: mappings, claims, releases and every non-zero counter.
pub fn render_stats(r: &Report) -> String {
    let mut out = format!(
        "snat on {}  NAT IPs {}  port range {}\n",
        r.iface,
        r.nat_ips.join(","),
        r.port_range
    );
    let flat = |title: &str, m: &BTreeMap<String, u64>, out: &mut String| {
        let _ = writeln!(out, "{title}:");
        for (k, v) in m {
            let _ = writeln!(out, "  {k:<36} {v}");
        }
    };
    flat("mappings", &r.mappings, &mut out);
    flat("port_claims", &r.port_claims, &mut out);
    for (title, groups, skip_zero) in [
        ("expired", &r.expired, false),
        ("counters", &r.counters, true),
    ] {
        let _ = writeln!(out, "{title}:");
        for (group, inner) in groups {
            for (name, n) in inner {
                if !(skip_zero && *n == 0) {
                    let _ = writeln!(out, "  {:<36} {n}", format!("{group}.{name}"));
                }
            }
        }
    }
    if r.allocation.count > 0 {
        let _ = writeln!(
            out,
            "allocation: {} mappings, mean {} ns",
            r.allocation.count,
            r.allocation.sum_ns / r.allocation.count
        );
    }
    out
}

/// `snat conns` as text.
pub fn render_conns(r: &Report) -> String {
    let mut out = format!(
        "{:<5} {:<22} {:<22} {:<22} {:<12} {:>8} {:>10}\n",
        "PROTO", "INTERNAL", "NAT", "DESTINATION", "STATE", "AGE", "EXPIRES"
    );
    for c in &r.conns {
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<22} {:<12} {:>7}s {:>9}s",
            c.proto, c.internal, c.nat, c.destination, c.state, c.age_secs, c.expires_in_secs
        );
    }
    let _ = writeln!(out, "{} mappings", r.conns.len());
    out
}
