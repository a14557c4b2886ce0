//! Prometheus exposition of a [`Report`], and of how the `/metrics` endpoint built it.
//!
//! Families are built directly with the `prometheus` crate's data model and text encoder; label
//! sets are bounded by the NAT IPs, the counter enum and `--top-sources` (0: no address labels at
//! all). IPv4 and IPv6 share every family: where an address label (`nat_ip`, `source`) tells the
//! family, that is all; where no address is labelled (`snat_mappings`, `snat_port_claims`), IPv6
//! samples carry `family="ipv6"` and IPv4 ones no `family` label, as before NAT66. The endpoint itself, which decides when a report is built, is [`super::scrape`].

use prometheus::{
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
    Encoder as _, TextEncoder,
};

use snat_common::Proto;

use super::report::{ClusterReport, Pool, Report};

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut f = MetricFamily::default();
        f.set_name(name.into());
        f.set_help(help.into());
        f.set_field_type(kind);
        Self(f)
    }

    fn gauge(mut self, pairs: &[(&str, &str)], v: f64) -> Self {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::from_label(labels(pairs));
        m.set_gauge(g);
        self.0.mut_metric().push(m);
        self
    }

    fn counter(mut self, pairs: &[(&str, &str)], v: u64) -> Self {
        let mut c = Counter::default();
        c.set_value(v as f64);
        let mut m = Metric::from_label(labels(pairs));
        m.set_counter(c);
        self.0.mut_metric().push(m);
        self
    }
}

/// The gauge whose name ends in `_total`, exposed as `untyped` (see [`encode`]).
const UNTYPED_GAUGE: &str = "snat_ports_total";

/// The report as Prometheus families.
pub fn families(r: &Report) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let mut out = Vec::new();
    let per_pool = |name: &str, help: &str, kind, value: &dyn Fn(&Pool) -> f64| {
        r.pools
            .iter()
            .fold(Family::new(name, help, kind), |f, p| {
                let l = [("nat_ip", p.nat_ip.as_str()), ("proto", p.proto.name())];
                match kind {
                    COUNTER => f.counter(&l, value(p) as u64),
                    _ => f.gauge(&l, value(p)),
                }
            })
            .0
    };
    // A gauge by nature, but its `_total` name (Azure's "allocated ports") is reserved for
    // counters by the conventions `promtool` enforces: [`encode`] declares it untyped.
    out.push(per_pool(
        UNTYPED_GAUGE,
        "SNAT ports this node may hand out per NAT IP (IPv4 or IPv6) and protocol (its allocation); a gauge.",
        GAUGE,
        &|p| p.ports_total as f64,
    ));
    out.push(per_pool(
        "snat_ports_in_use",
        "Distinct SNAT ports currently held by at least one mapping.",
        GAUGE,
        &|p| p.ports_in_use as f64,
    ));
    out.push(per_pool(
        "snat_port_exhaustion_total",
        "New flows refused because no SNAT port was free towards their destination (each flow once).",
        COUNTER,
        &|p| p.exhausted_flows as f64,
    ));
    out.push(per_pool(
        "snat_port_overflow_total",
        "New flows of pods paired with this NAT IP that got their port on another NAT IP, because this one had none left towards their destination (--ip-pooling overflow).",
        COUNTER,
        &|p| p.overflowed_flows as f64,
    ));
    let mut mappings = Family::new(
        "snat_mappings",
        "Active mappings (SNAT connections); IPv6 ones (NAT66) carry family=\"ipv6\".",
        GAUGE,
    );
    let mut claims = Family::new(
        "snat_port_claims",
        "Held (NAT ip:port, destination) claims; equal to snat_mappings at rest; IPv6 ones carry family=\"ipv6\".",
        GAUGE,
    );
    for (p, n) in &r.mappings {
        mappings = mappings.gauge(&[("proto", p.name())], *n as f64);
    }
    for (p, n) in &r.mappings6 {
        mappings = mappings.gauge(&[("family", "ipv6"), ("proto", p.name())], *n as f64);
    }
    for (p, n) in &r.port_claims {
        claims = claims.gauge(&[("proto", p.name())], *n as f64);
    }
    for (p, n) in &r.port_claims6 {
        claims = claims.gauge(&[("family", "ipv6"), ("proto", p.name())], *n as f64);
    }
    out.push(mappings.0);
    out.push(claims.0);

    let mut packets = Family::new("snat_packets_total", "Packets seen by the datapath, by direction and result (translated, passed, or dropped with a reason).", COUNTER);
    for dir in ["egress", "ingress"] {
        for (result, n) in r.counters.get(dir).into_iter().flatten() {
            packets = packets.counter(&[("direction", dir), ("result", result)], *n);
        }
    }
    out.push(packets.0);
    if let Some(path) = &r.ingress {
        let (kind, mode) = path.split_once('-').unwrap_or((path.as_str(), ""));
        out.push(
            Family::new(
                "snat_ingress_path",
                "Where replies are translated: path tc, or xdp (in front of TC) in mode native or generic; always 1.",
                GAUGE,
            )
            .gauge(&[("path", kind), ("mode", mode)], 1.0)
            .0,
        );
    }
    let mut xdp = Family::new(
        "snat_xdp_packets_total",
        "Replies the XDP path left to TC untouched: deferred_to_tc (a TCP or UDP checksum pending offload, as from a local sender over a veth), no_metadata (the driver gave no room for XDP's mark).",
        COUNTER,
    );
    for (result, n) in r.counters.get("xdp").into_iter().flatten() {
        xdp = xdp.counter(&[("result", result)], *n);
    }
    out.push(xdp.0);
    let mut hairpin = Family::new(
        "snat_hairpin_packets_total",
        "Pods' packets to a NAT endpoint (--hairpin on), after their source was translated (counted in snat_packets_total as egress): delivered_tcp/udp to the pod holding the endpoint, drop_filtered (that mapping never sent to the sender's endpoint), drop_no_route, drop_no_deliverer.",
        COUNTER,
    );
    for (result, n) in r.counters.get("hairpin").into_iter().flatten() {
        hairpin = hairpin.counter(&[("result", result)], *n);
    }
    out.push(hairpin.0);
    let alloc = r.counters.get("alloc");
    let get = |name: &str| alloc.and_then(|a| a.get(name)).copied().unwrap_or(0);
    let mut created = Family::new("snat_mappings_created_total", "Mappings created.", COUNTER);
    for p in Proto::ALL {
        created = created.counter(&[("proto", p.name())], get(&format!("created_{p}")));
    }
    out.push(created.0);
    let mut method = Family::new(
        "snat_port_allocations_total",
        "How new mappings found their port: the internal endpoint's previous NAT port (same_endpoint), the pod's own (preserved), a random try, the free-port index of a nearly full destination (index), or the exhaustive walk of the range (scan).",
        COUNTER,
    );
    for m in ["same_endpoint", "preserved", "random", "index", "scan"] {
        method = method.counter(&[("method", m)], get(&format!("port_{m}")));
    }
    out.push(method.0);
    out.push(
        Family::new(
            "snat_allocation_races_total",
            "New flows mapped by two CPUs at once (the loser adopted the winner's mapping).",
            COUNTER,
        )
        .counter(&[], get("race_lost"))
        .0,
    );
    out.push(
        Family::new(
            "snat_tcp_reopened_total",
            "SYNs that reopened a closed mapping on the same SNAT port (binding persistence).",
            COUNTER,
        )
        .counter(&[], get("tcp_reopened"))
        .0,
    );
    let mut expired = Family::new(
        "snat_mappings_expired_total",
        "Mappings released, by protocol and reason (idle, fin, rst, orphan).",
        COUNTER,
    );
    for (p, reasons) in &r.expired {
        for (reason, n) in reasons {
            expired = expired.counter(&[("proto", p.name()), ("reason", reason)], *n);
        }
    }
    out.push(expired.0);
    out.push(
        Family::new(
            "snat_host_port_skips_total",
            "Candidate SNAT ports skipped because one of the node's own sockets uses them.",
            COUNTER,
        )
        .counter(&[], get("host_port_skipped"))
        .0,
    );
    let mut rejects = Family::new(
        "snat_rejects_total",
        "Answers to refused flows: TCP RSTs and ICMP unreachables sent, or not sent (rate limit, unusual header).",
        COUNTER,
    );
    for (result, n) in r.counters.get("reject").into_iter().flatten() {
        rejects = rejects.counter(&[("result", result)], *n);
    }
    out.push(rejects.0);
    let mut refused = Family::new(
        "snat_source_refused_total",
        "Flows refused per internal source IP (no port, its cap, or its fair share; each flow once), for the most refused sources.",
        COUNTER,
    );
    for x in &r.top_refused {
        refused = refused.counter(&[("source", &x.source)], x.flows);
    }
    out.push(refused.0);
    let mut saturated = Family::new(
        "snat_saturated",
        "Destinations (of the range) and sources (of --max-ports-per-source) at or above a warning level of what they may use.",
        GAUGE,
    );
    let mut crossings = Family::new(
        "snat_saturation_crossings_total",
        "Times a destination or source rose to a warning level (80 or 95 percent).",
        COUNTER,
    );
    for l in &r.saturation {
        let level = l.level.to_string();
        saturated = saturated.gauge(&[("kind", &l.kind), ("level", &level)], l.current as f64);
        crossings = crossings.counter(&[("kind", &l.kind), ("level", &level)], l.crossings);
    }
    out.push(saturated.0);
    out.push(crossings.0);
    let mut sources = Family::new("snat_source_ports_in_use", "SNAT ports (mappings) held per internal source IP (IPv4 or IPv6), for the busiest sources (--top-sources).", GAUGE);
    for s in &r.top_sources {
        sources = sources.gauge(&[("source", &s.source)], s.ports as f64);
    }
    out.push(sources.0);
    let mut dests = Family::new(
        "snat_destination_saturation",
        "Fraction of a NAT IP's port range used towards one destination (ip:port for TCP, ip otherwise), for the busiest destinations.",
        GAUGE,
    );
    for d in &r.top_destinations {
        dests = dests.gauge(
            &[
                ("nat_ip", &d.nat_ip),
                ("destination", &d.destination),
                ("proto", d.proto.name()),
            ],
            d.saturation,
        );
    }
    out.push(dests.0);

    if let Some(n) = r.guard_dropped {
        out.push(
            Family::new(
                "snat_stop_guard_dropped_packets",
                "Packets from internal sources the previous agent's stop guard dropped while no agent ran (--on-stop closed).",
                GAUGE,
            )
            .gauge(&[], n as f64)
            .0,
        );
    }
    if let Some(c) = &r.cluster {
        cluster_families(c, &mut out);
    }
    let mut h = Histogram::default();
    h.set_sample_count(r.allocation.count);
    h.set_sample_sum(r.allocation.sum_ns as f64 / 1e9);
    h.set_bucket(
        r.allocation
            .buckets
            .iter()
            .filter(|(upper, _)| *upper != u64::MAX)
            .map(|(upper, cumulative)| {
                let mut b = Bucket::default();
                b.set_upper_bound(*upper as f64 / 1e9);
                b.set_cumulative_count(*cumulative);
                b
            })
            .collect(),
    );
    let mut m = Metric::default();
    m.set_histogram(h);
    let mut f = Family::new(
        "snat_allocation_duration_seconds",
        "Time the datapath took to create a mapping (NAT IP, port claim and publication).",
        MetricType::HISTOGRAM,
    );
    f.0.mut_metric().push(m);
    out.push(f.0);
    let mut refused = Family::new(
        "snat_control_refused_total",
        "Control-socket requests refused for the client's lack of rights, by request (stats and top send status).",
        COUNTER,
    );
    for (command, n) in &r.control_refused {
        refused = refused.counter(&[("command", command)], *n);
    }
    out.push(refused.0);
    out
}

/// How the text of one scrape was built (see [`super::scrape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BuildStats {
    /// Report builds the endpoint started, this one included.
    pub builds: u64,
    /// How long this one's [`Report::build`] (the walk of the tables) took.
    pub seconds: f64,
}

/// The endpoint's own families: what scrapes cost the node.
pub fn build_families(b: &BuildStats) -> Vec<MetricFamily> {
    vec![
        Family::new(
            "snat_metrics_report_builds_total",
            "Reports built for /metrics (walks of the tables); scrapes within --metrics-min-interval of one, or during one, share it.",
            MetricType::COUNTER,
        )
        .counter(&[], b.builds)
        .0,
        Family::new(
            "snat_metrics_report_build_seconds",
            "How long gathering the report of this scrape took (the walk of the tables).",
            MetricType::GAUGE,
        )
        .gauge(&[], b.seconds)
        .0,
    ]
}

/// The report in the Prometheus text format.
pub fn encode(r: &Report) -> anyhow::Result<String> {
    encode_families(families(r))
}

/// `families` in the Prometheus text format.
pub fn encode_families(families: Vec<MetricFamily>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    // The encoder refuses a family without samples (e.g. no mapping has expired yet).
    let families: Vec<MetricFamily> = families
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    TextEncoder::new().encode(&families, &mut buf)?;
    // The crate's text encoder cannot write untyped samples; a gauge's samples read the same.
    Ok(String::from_utf8(buf)?.replacen(
        &format!("# TYPE {UNTYPED_GAUGE} gauge\n"),
        &format!("# TYPE {UNTYPED_GAUGE} untyped\n"),
        1,
    ))
}

/// Cluster mode's families (issue 14's names).
fn cluster_families(c: &ClusterReport, out: &mut Vec<MetricFamily>) {
    const GAUGE: MetricType = MetricType::GAUGE;
    const COUNTER: MetricType = MetricType::COUNTER;
    let mut held = Family::new(
        "snat_blocks_held",
        "Port blocks this node holds, per NAT IP (any state).",
        GAUGE,
    );
    let mut per_ip = std::collections::BTreeMap::<&str, u64>::new();
    for b in &c.blocks {
        *per_ip.entry(b.nat_ip.as_str()).or_default() += 1;
    }
    for (ip, n) in per_ip {
        held = held.gauge(&[("nat_ip", ip)], n as f64);
    }
    out.push(held.0);
    let mut claims = Family::new(
        "snat_block_claims_total",
        "Block claims by result: ok, taken (another node won the race), error.",
        COUNTER,
    );
    for result in ["ok", "taken", "error"] {
        claims = claims.counter(
            &[("result", result)],
            c.claims.get(result).copied().unwrap_or(0),
        );
    }
    out.push(claims.0);
    let mut releases = Family::new(
        "snat_block_releases_total",
        "Blocks given up by reason: idle (empty for the cool-down), drain (stopping), lease_lost, gone (deleted under this node).",
        COUNTER,
    );
    for reason in ["idle", "drain", "lease_lost", "gone"] {
        releases = releases.counter(
            &[("reason", reason)],
            c.releases.get(reason).copied().unwrap_or(0),
        );
    }
    out.push(releases.0);
    let suspended = if c.suspended { c.blocks.len() } else { 0 };
    out.push(
        Family::new(
            "snat_blocks_suspended",
            "Blocks whose packets the datapath drops because the fence closed (no good keep-alive in time).",
            GAUGE,
        )
        .gauge(&[], suspended as f64)
        .0,
    );
    out.push(
        Family::new(
            "snat_cluster_connected",
            "1 when the last etcd operation succeeded.",
            GAUGE,
        )
        .gauge(&[], f64::from(u8::from(c.connected)))
        .0,
    );
    out.push(
        Family::new(
            "snat_cluster_fence_seconds",
            "Seconds until the datapath stops translating in this node's blocks unless a keep-alive succeeds.",
            GAUGE,
        )
        .gauge(&[], c.fence_in_seconds)
        .0,
    );
    if let Some(rtt) = c.keepalive_rtt_seconds {
        out.push(
            Family::new(
                "snat_cluster_keepalive_rtt_seconds",
                "Round trip of the last lease keep-alive.",
                GAUGE,
            )
            .gauge(&[], rtt)
            .0,
        );
    }
    if let Some(l) = c.claim_latency_seconds {
        out.push(
            Family::new(
                "snat_block_claim_latency_seconds",
                "From the datapath's pressure to the new block open (gateway included), for the last claim.",
                GAUGE,
            )
            .gauge(&[], l)
            .0,
        );
    }
    let mut short = Family::new(
        "snat_block_shortage",
        "1 per NAT IP that wants a block and has none to use yet, labelled with why: range_full, max_blocks, unreachable, claim_pending.",
        GAUGE,
    );
    for (ip, why) in &c.shortage {
        short = short.gauge(&[("nat_ip", ip), ("reason", why)], 1.0);
    }
    out.push(short.0);
}

/// What `snat gateway`'s `/metrics` shows: its place in the store's history and its
/// datapath's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayFigures {
    /// Every change up to this revision is in the gateway's routes.
    pub applied_revision: i64,
    /// The applied revision last published to etcd (what the nodes wait for).
    pub published_revision: i64,
    /// The store's revision at the gateway's last request to it.
    pub store_revision: i64,
    /// The last request to etcd (or the watch) worked.
    pub connected: bool,
    /// Blocks routed to a node.
    pub routes: u64,
    /// Every datapath counter by its name (`forwarded_tcp`, `drop_no_route`, …).
    pub packets: Vec<(&'static str, u64)>,
}

/// The gateway's families.
pub fn gateway_families(g: &GatewayFigures) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let gauge = |name: &str, help: &str, v: f64| Family::new(name, help, GAUGE).gauge(&[], v).0;
    let mut packets = Family::new(
        "snat_gateway_packets_total",
        "Packets the gateway's datapath saw, by result: forwarded_* (sent to the node holding the port's block), pass_* (not for a NAT IP), drop_* (drop_no_route: a port in no held block).",
        COUNTER,
    );
    for (result, n) in &g.packets {
        packets = packets.counter(&[("result", result)], *n);
    }
    vec![
        gauge(
            "snat_gateway_applied_revision",
            "The etcd revision up to which every block change is in the gateway's routes.",
            g.applied_revision as f64,
        ),
        gauge(
            "snat_gateway_published_revision",
            "The applied revision last published in etcd (nodes open a claimed block once every gateway published its claim's revision).",
            g.published_revision as f64,
        ),
        gauge(
            "snat_gateway_store_revision",
            "The store's revision at the gateway's last request to etcd.",
            g.store_revision as f64,
        ),
        gauge(
            "snat_gateway_applied_revision_lag",
            "Revisions the store is ahead of the applied revision (writes outside /snat/v1/ count until the watch's next progress notification).",
            (g.store_revision - g.applied_revision).max(0) as f64,
        ),
        gauge(
            "snat_gateway_connected",
            "1 while the gateway reaches etcd; 0 when cut off (it keeps its last routes).",
            if g.connected { 1.0 } else { 0.0 },
        ),
        gauge(
            "snat_gateway_routes",
            "Blocks the gateway routes to a node.",
            g.routes as f64,
        ),
        packets.0,
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::serve::report::{Allocation, DestinationUse, SourceUse};

    #[test]
    fn encodes_every_family_with_its_labels() {
        let mut counters = BTreeMap::new();
        counters.insert(
            "egress".to_owned(),
            BTreeMap::from([("translated_tcp".to_owned(), 7)]),
        );
        counters.insert(
            "alloc".to_owned(),
            BTreeMap::from([("created_tcp".to_owned(), 3), ("port_scan".to_owned(), 1)]),
        );
        counters.insert(
            "xdp".to_owned(),
            BTreeMap::from([("deferred_to_tc".to_owned(), 5)]),
        );
        let r = Report {
            ingress: Some("xdp-generic".into()),
            pools: vec![Pool {
                nat_ip: "198.51.100.1".into(),
                proto: Proto::Tcp,
                ports_total: 100,
                ports_in_use: 3,
                used_percent: 3.0,
                mappings: 3,
                exhausted_flows: 2,
                overflowed_flows: 4,
            }],
            mappings: BTreeMap::from([(Proto::Tcp, 3)]),
            port_claims: BTreeMap::from([(Proto::Tcp, 3)]),
            top_sources: vec![SourceUse {
                source: "10.1.0.2".into(),
                ports: 3,
            }],
            top_destinations: vec![DestinationUse {
                nat_ip: "198.51.100.1".into(),
                proto: Proto::Tcp,
                destination: "203.0.113.10:443".into(),
                ports: 3,
                saturation: 0.03,
            }],
            counters,
            allocation: Allocation {
                buckets: vec![(127, 1), (255, 3), (u64::MAX, 3)],
                sum_ns: 600,
                count: 3,
            },
            control_refused: BTreeMap::from([("set".to_owned(), 2), ("status".to_owned(), 0)]),
            ..Report::default()
        };
        let text = encode(&r).unwrap();
        for line in [
            "# TYPE snat_ports_total untyped",
            "snat_ports_total{nat_ip=\"198.51.100.1\",proto=\"tcp\"} 100",
            "snat_ports_in_use{nat_ip=\"198.51.100.1\",proto=\"tcp\"} 3",
            "snat_port_exhaustion_total{nat_ip=\"198.51.100.1\",proto=\"tcp\"} 2",
            "snat_port_overflow_total{nat_ip=\"198.51.100.1\",proto=\"tcp\"} 4",
            "snat_mappings{proto=\"tcp\"} 3",
            "snat_packets_total{direction=\"egress\",result=\"translated_tcp\"} 7",
            "snat_mappings_created_total{proto=\"tcp\"} 3",
            "snat_port_allocations_total{method=\"scan\"} 1",
            "snat_source_ports_in_use{source=\"10.1.0.2\"} 3",
            "snat_destination_saturation{nat_ip=\"198.51.100.1\",destination=\"203.0.113.10:443\",proto=\"tcp\"} 0.03",
            "snat_allocation_duration_seconds_bucket{le=\"0.000000255\"} 3",
            "snat_allocation_duration_seconds_count 3",
            "snat_control_refused_total{command=\"set\"} 2",
            "snat_control_refused_total{command=\"status\"} 0",
            "snat_ingress_path{path=\"xdp\",mode=\"generic\"} 1",
            "snat_xdp_packets_total{result=\"deferred_to_tc\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(
            !text.contains("snat_mappings_expired_total"),
            "empty families are left out"
        );
    }

    #[test]
    fn encodes_how_the_scrape_was_built_with_the_report() {
        let stats = BuildStats {
            builds: 7,
            seconds: 0.25,
        };
        let mut all = families(&Report::default());
        all.extend(build_families(&stats));
        let text = encode_families(all).unwrap();
        for line in [
            "# TYPE snat_metrics_report_builds_total counter",
            "snat_metrics_report_builds_total 7",
            "# TYPE snat_metrics_report_build_seconds gauge",
            "snat_metrics_report_build_seconds 0.25",
            "snat_allocation_duration_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn encodes_the_gateways_revisions_routes_and_packets() {
        let g = GatewayFigures {
            applied_revision: 40,
            published_revision: 38,
            store_revision: 43,
            connected: true,
            routes: 7,
            packets: vec![("forwarded_tcp", 812), ("drop_no_route", 3)],
        };
        let text = encode_families(gateway_families(&g)).unwrap();
        for line in [
            "# TYPE snat_gateway_applied_revision gauge",
            "snat_gateway_applied_revision 40",
            "snat_gateway_published_revision 38",
            "snat_gateway_store_revision 43",
            "snat_gateway_applied_revision_lag 3",
            "snat_gateway_connected 1",
            "snat_gateway_routes 7",
            "# TYPE snat_gateway_packets_total counter",
            "snat_gateway_packets_total{result=\"forwarded_tcp\"} 812",
            "snat_gateway_packets_total{result=\"drop_no_route\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // A store read before the watch caught up never shows a negative lag.
        let behind = GatewayFigures {
            applied_revision: 50,
            store_revision: 43,
            ..g
        };
        let text = encode_families(gateway_families(&behind)).unwrap();
        assert!(
            text.contains("snat_gateway_applied_revision_lag 0\n"),
            "{text}"
        );
    }
}
