//! The report as the CLI prints it: `snat status`, `stats`, `conns`, `top`.
//!
//! Address columns are as wide as their longest value (IPv6 addresses and `[ip]:port` run
//! longer than IPv4's), never narrower than the width IPv4 output has always had.

use std::{collections::BTreeMap, fmt::Write as _};

use snat_common::Proto;

use super::report::Report;

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
    if !r.nat_ips6.is_empty() {
        let by_proto: Vec<String> = r
            .mappings6
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "IPv6: NAT IPs {}  mappings {}",
            r.nat_ips6.join(","),
            if by_proto.is_empty() {
                "none".to_owned()
            } else {
                by_proto.join(", ")
            }
        );
    }
    if let Some(slice) = &r.slice {
        let _ = writeln!(out, "plan slice: {slice}");
    }
    if let Some(path) = &r.ingress {
        let _ = writeln!(
            out,
            "replies: {}",
            match path.as_str() {
                "xdp-native" => "XDP, native mode (TC for checksums pending offload)",
                "xdp-generic" => "XDP, generic mode (TC for checksums pending offload)",
                _ => "TC",
            }
        );
    }
    if let Some(ifaces) = &r.hairpin {
        let _ = writeln!(
            out,
            "hairpinning: on {} pod interface(s){}{}",
            ifaces.len(),
            if ifaces.is_empty() { "" } else { ": " },
            ifaces.join(", ")
        );
    }
    if let Some(c) = &r.cluster {
        let _ = writeln!(
            out,
            "cluster node {} lease {} {}{}; fence in {:.0}s; blocks {}",
            c.node,
            c.lease.as_deref().unwrap_or("none"),
            if c.connected {
                "connected"
            } else {
                "NOT connected to etcd"
            },
            if c.suspended {
                ", SUSPENDED (packets in its blocks are dropped)"
            } else {
                ""
            },
            c.fence_in_seconds,
            c.blocks.len()
        );
        for b in &c.blocks {
            let _ = writeln!(
                out,
                "  block {}/{} ports {} epoch {} {} mappings {}",
                b.nat_ip, b.index, b.ports, b.epoch, b.state, b.mappings
            );
        }
        for (ip, why) in &c.shortage {
            let _ = writeln!(out, "  {ip}: no block to use ({why})");
        }
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
        "on exhaustion: {}; IP pooling: {}; per-source cap: {}; fair share: {}; reserved ports: {}",
        p.on_exhaustion,
        p.ip_pooling,
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
    let ip_w = width(16, r.pools.iter().map(|p| p.nat_ip.as_str()));
    let _ = writeln!(
        out,
        "\n{:<ip_w$} {:<5} {:>10} {:>8} {:>7} {:>9} {:>10} {:>10}",
        "NAT IP", "PROTO", "ALLOCATED", "IN USE", "USED%", "MAPPINGS", "EXHAUSTED", "OVERFLOWED"
    );
    for p in &r.pools {
        let _ = writeln!(
            out,
            "{:<ip_w$} {:<5} {:>10} {:>8} {:>6.1}% {:>9} {:>10} {:>10}",
            p.nat_ip,
            p.proto,
            p.ports_total,
            p.ports_in_use,
            p.used_percent,
            p.mappings,
            p.exhausted_flows,
            p.overflowed_flows
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
    let w = width(
        18,
        (r.top_sources.iter().map(|s| s.source.as_str()))
            .chain(r.top_refused.iter().map(|x| x.source.as_str())),
    );
    let mut out = format!("\n{:<w$} {:>8} {:>9}\n", "SOURCE", "PORTS", "REFUSED");
    let mut shown = Vec::new();
    for s in &r.top_sources {
        let _ = writeln!(
            out,
            "{:<w$} {:>8} {:>9}",
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
        let _ = writeln!(out, "{:<w$} {:>8} {:>9}", x.source, 0, x.flows);
    }
    out
}

pub fn render_top_destinations(r: &Report) -> String {
    let ip_w = width(16, r.top_destinations.iter().map(|d| d.nat_ip.as_str()));
    let dest_w = width(
        22,
        r.top_destinations.iter().map(|d| d.destination.as_str()),
    );
    let mut out = format!(
        "\n{:<ip_w$} {:<5} {:<dest_w$} {:>8} {:>11}\n",
        "NAT IP", "PROTO", "DESTINATION", "PORTS", "SATURATION"
    );
    for d in &r.top_destinations {
        let _ = writeln!(
            out,
            "{:<ip_w$} {:<5} {:<dest_w$} {:>8} {:>10.1}%",
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
    let flat = |title: &str, m: &BTreeMap<Proto, u64>, out: &mut String| {
        let _ = writeln!(out, "{title}:");
        for (k, v) in m {
            let _ = writeln!(out, "  {k:<36} {v}");
        }
    };
    flat("mappings", &r.mappings, &mut out);
    if !r.mappings6.is_empty() {
        flat("mappings (IPv6)", &r.mappings6, &mut out);
    }
    flat("port_claims", &r.port_claims, &mut out);
    if !r.port_claims6.is_empty() {
        flat("port_claims (IPv6)", &r.port_claims6, &mut out);
    }
    let grouped = |title: &str,
                   groups: &mut dyn Iterator<Item = (String, &BTreeMap<String, u64>)>,
                   skip_zero: bool,
                   out: &mut String| {
        let _ = writeln!(out, "{title}:");
        for (group, inner) in groups {
            for (name, n) in inner {
                if !(skip_zero && *n == 0) {
                    let _ = writeln!(out, "  {:<36} {n}", format!("{group}.{name}"));
                }
            }
        }
    };
    grouped(
        "expired",
        &mut r.expired.iter().map(|(p, m)| (p.to_string(), m)),
        false,
        &mut out,
    );
    grouped(
        "counters",
        &mut r.counters.iter().map(|(g, m)| (g.clone(), m)),
        true,
        &mut out,
    );
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
    let internal_w = width(22, r.conns.iter().map(|c| c.internal.as_str()));
    let nat_w = width(22, r.conns.iter().map(|c| c.nat.as_str()));
    let dest_w = width(22, r.conns.iter().map(|c| c.destination.as_str()));
    let mut out = format!(
        "{:<5} {:<internal_w$} {:<nat_w$} {:<dest_w$} {:<12} {:>8} {:>10}\n",
        "PROTO", "INTERNAL", "NAT", "DESTINATION", "STATE", "AGE", "EXPIRES"
    );
    for c in &r.conns {
        let _ = writeln!(
            out,
            "{:<5} {:<internal_w$} {:<nat_w$} {:<dest_w$} {:<12} {:>7}s {:>9}s",
            c.proto, c.internal, c.nat, c.destination, c.state, c.age_secs, c.expires_in_secs
        );
    }
    let _ = writeln!(out, "{} mappings", r.conns.len());
    out
}

/// The width of a column: its longest value, at least `min`.
fn width<'a>(min: usize, values: impl Iterator<Item = &'a str>) -> usize {
    values.map(str::len).fold(min, usize::max)
}
