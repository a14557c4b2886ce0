//! One pass over the mapping tables of both families, aggregated the ways operators ask about
//! them: by protocol, by NAT IP (distinct ports held), by internal source, by destination, and (on
//! request) as rows like `conntrack -L`.
//!
//! Everything is exact at the time of the walk: figures come from the maps, not from estimates.
//! Addresses are [`IpAddr`]s, so an IPv4 and an IPv6 mapping land in the same maps and rows
//! (each keyed by its own addresses; only the per-protocol totals are kept per family, as the
//! report shows them). [`ViewBuilder`] is pure and host-tested; [`ViewBuilder::walk`] feeds it
//! from one family's maps.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use snat_common::{flow::proto, tcp::Phase, Addr, FlowKeyOf, MappingOf, OriginOf, Proto};

use super::expiry::{last_seen, timeout_of};
use crate::{
    datapath::{batch, DatapathError, TablesOf},
    settings::{cidr::IpCidr, Timeouts},
};

/// Where a mapping's flows go: the remote IP, and for TCP the remote port (a NAT port is unique
/// per remote ip:port for TCP, per remote IP for UDP and ICMP). The NAT IP and the remote are
/// of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub nat_ip: IpAddr,
    pub proto: u8,
    pub addr: IpAddr,
    /// 0 for UDP and ICMP.
    pub port: u16,
}

impl Destination {
    /// `ip:port` (`[ip]:port` for IPv6) for TCP, `ip` otherwise.
    pub fn label(&self) -> String {
        if self.proto == proto::TCP {
            SocketAddr::new(self.addr, self.port).to_string()
        } else {
            self.addr.to_string()
        }
    }
}

/// Which mappings `snat conns` lists (sent over the control socket as is). A network of one
/// family selects only that family's mappings.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnFilter {
    /// Internal (pod) sources in this CIDR.
    pub source: Option<IpCidr>,
    /// Destinations in this CIDR.
    pub destination: Option<IpCidr>,
    pub proto: Option<Proto>,
}

impl ConnFilter {
    fn matches<A: Addr>(&self, key: &FlowKeyOf<A>) -> bool {
        self.source.is_none_or(|c| c.contains(key.src_ip()))
            && self.destination.is_none_or(|c| c.contains(key.dst_ip()))
            && self.proto.is_none_or(|p| p.number() == key.proto)
    }
}

/// One mapping as `snat conns` shows it. Endpoints are written as sockets are:
/// `10.1.0.2:40000`, `[fd00:10::2]:40000`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conn {
    pub proto: Proto,
    pub internal: String,
    pub nat: String,
    /// `ip:port` for TCP, `ip` for UDP and ICMP (any port of it is part of the mapping).
    pub destination: String,
    /// TCP phase (`established`, `transitory`, `closing`, `reset`), else `active`.
    pub state: String,
    pub age_secs: u64,
    pub expires_in_secs: u64,
}

/// The aggregated tables.
#[derive(Debug, Default)]
pub struct TableView {
    /// IPv4 forward halves by protocol number.
    pub mappings: HashMap<u8, u64>,
    /// IPv4 reverse halves (port claims) by protocol number.
    pub claims: HashMap<u8, u64>,
    /// IPv6 forward halves by protocol number.
    pub mappings6: HashMap<u8, u64>,
    /// IPv6 reverse halves by protocol number.
    pub claims6: HashMap<u8, u64>,
    /// Mappings by (NAT IP, protocol), both families.
    pub pool_mappings: HashMap<(IpAddr, u8), u64>,
    /// Distinct NAT ports held, by (NAT IP, protocol).
    pub ports_in_use: HashMap<(IpAddr, u8), u64>,
    /// Mappings (each holds a port towards its destination) by internal source address.
    pub by_source: HashMap<IpAddr, u64>,
    /// Mappings by destination.
    pub by_destination: HashMap<Destination, u64>,
    /// Rows, when asked for.
    pub conns: Vec<Conn>,
}

/// Builds a [`TableView`] one mapping at a time, of either family.
pub struct ViewBuilder<'a> {
    view: TableView,
    ports: HashSet<(IpAddr, u8, u16)>,
    rows: Option<ConnFilter>,
    timeouts: &'a Timeouts,
    now_ns: u64,
}

impl<'a> ViewBuilder<'a> {
    /// `rows`: also list the mappings that match this filter.
    pub fn new(timeouts: &'a Timeouts, now_ns: u64, rows: Option<ConnFilter>) -> Self {
        Self {
            view: TableView::default(),
            ports: HashSet::new(),
            rows,
            timeouts,
            now_ns,
        }
    }

    /// Adds a mapping: its forward key and half, and its reverse half if found.
    pub fn add<A: Addr>(&mut self, key: &FlowKeyOf<A>, m: &MappingOf<A>, o: Option<&OriginOf<A>>) {
        let v = &mut self.view;
        let nat_ip = m.nat_ip();
        let by_proto = if nat_ip.is_ipv4() {
            &mut v.mappings
        } else {
            &mut v.mappings6
        };
        *by_proto.entry(key.proto).or_default() += 1;
        *v.pool_mappings.entry((nat_ip, key.proto)).or_default() += 1;
        *v.by_source.entry(key.src_ip()).or_default() += 1;
        let dest = Destination {
            nat_ip,
            proto: key.proto,
            addr: key.dst_ip(),
            port: if key.proto == proto::TCP {
                key.dst_port()
            } else {
                0
            },
        };
        *v.by_destination.entry(dest).or_default() += 1;
        if self.ports.insert((nat_ip, key.proto, m.nat_port())) {
            *v.ports_in_use.entry((nat_ip, key.proto)).or_default() += 1;
        }
        if self.rows.is_some_and(|f| f.matches(key)) {
            // Mappings only exist for the protocols snat translates.
            if let Some(row) = self.row(key, m, o, &dest) {
                self.view.conns.push(row);
            }
        }
    }

    /// Counts a reverse half (port claim).
    pub fn add_claim<A: Addr>(&mut self, reply: &FlowKeyOf<A>) {
        let claims = if reply.dst_ip().is_ipv4() {
            &mut self.view.claims
        } else {
            &mut self.view.claims6
        };
        *claims.entry(reply.proto).or_default() += 1;
    }

    fn row<A: Addr>(
        &self,
        key: &FlowKeyOf<A>,
        m: &MappingOf<A>,
        o: Option<&OriginOf<A>>,
        dest: &Destination,
    ) -> Option<Conn> {
        let o = o.copied().unwrap_or_default();
        let (timeout, _) = timeout_of(key, m, &o, self.timeouts);
        let idle = Duration::from_nanos(self.now_ns.saturating_sub(last_seen(m, &o)));
        let state = if key.proto == proto::TCP {
            Phase::of_halves(m, &o).name()
        } else {
            "active"
        };
        Some(Conn {
            proto: Proto::from_number(key.proto)?,
            internal: SocketAddr::new(key.src_ip(), key.src_port()).to_string(),
            nat: SocketAddr::new(m.nat_ip(), m.nat_port()).to_string(),
            destination: dest.label(),
            state: state.to_owned(),
            age_secs: Duration::from_nanos(self.now_ns.saturating_sub(m.created_ns())).as_secs(),
            expires_in_secs: timeout.saturating_sub(idle).as_secs(),
        })
    }

    /// Walks one family's tables: every mapping, then every claim. Call it once per family, each
    /// under its own lock: the figures add up across calls.
    pub fn walk<A: Addr>(&mut self, tables: &TablesOf<A>) -> Result<(), DatapathError>
    where
        FlowKeyOf<A>: aya::Pod,
        MappingOf<A>: aya::Pod,
        OriginOf<A>: aya::Pod,
    {
        batch::for_each(&tables.fwd, |key, m| {
            let o = tables.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
            self.add(&key, &m, o.as_ref());
        })?;
        batch::for_each(&tables.rev, |reply, _| self.add_claim(&reply))
    }

    /// The view; rows IPv4 first, then by protocol and internal endpoint.
    pub fn finish(mut self) -> TableView {
        self.view
            .conns
            .sort_by_cached_key(|c| (c.internal.starts_with('['), c.proto, c.internal.clone()));
        self.view
    }
}

impl TableView {
    /// The `n` sources holding the most ports, most first (either family).
    pub fn top_sources(&self, n: usize) -> Vec<(IpAddr, u64)> {
        top(self.by_source.iter().map(|(k, v)| (*k, *v)), n)
    }

    /// The `n` busiest destinations, most first (either family).
    pub fn top_destinations(&self, n: usize) -> Vec<(Destination, u64)> {
        top(self.by_destination.iter().map(|(k, v)| (*k, *v)), n)
    }
}

/// The `n` largest by count; ties broken by key so output is stable.
fn top<K: Ord + Copy>(items: impl Iterator<Item = (K, u64)>, n: usize) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = items.collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use snat_common::{
        tcp::{SEEN_FIN, SEEN_SYN},
        FlowKey, FlowKey6, Mapping, Mapping6, Origin, Origin6,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts::default()
    }

    /// A mapping of `src:sport` to `dst:dport` on NAT IP `nat`, port `nat_port`, of either
    /// family: created at 10 s, last seen at 100 s, its SYN seen both ways.
    fn mapping_of<A: Addr>(
        p: u8,
        (src, sport): (A, u16),
        (dst, dport): (A, u16),
        nat: A,
        nat_port: u16,
    ) -> (FlowKeyOf<A>, MappingOf<A>, OriginOf<A>) {
        let key = FlowKeyOf::new(
            p,
            src,
            sport.to_be_bytes(),
            dst,
            FlowKeyOf::<A>::remote_port_for(p, dport.to_be_bytes()),
        );
        let mut m = MappingOf::new(key, nat, nat_port.to_be_bytes(), 10 * S);
        m.last_seen_ns = 100 * S;
        m.record(SEEN_SYN);
        let mut o = OriginOf::new(
            key.reply(m.nat_addr, m.nat_port),
            src,
            sport.to_be_bytes(),
            90 * S,
        );
        o.record(m.epoch, SEEN_SYN);
        (key, m, o)
    }

    /// An IPv4 mapping on 198.51.100.1.
    fn mapping(
        p: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        nat_port: u16,
    ) -> (FlowKey, Mapping, Origin) {
        mapping_of(p, (src, sport), (dst, dport), [198, 51, 100, 1], nat_port)
    }

    #[test]
    fn aggregates_by_pool_source_and_destination() {
        let t = timeouts();
        let mut b = ViewBuilder::new(&t, 130 * S, None);
        // One NAT port shared by two TCP flows to different remote ports, a third on another port.
        for (sport, dport, nat_port) in [(1000, 80, 40000), (1001, 443, 40000), (1002, 80, 40001)] {
            let (k, m, o) = mapping(
                proto::TCP,
                [10, 1, 0, 2],
                sport,
                [203, 0, 113, 10],
                dport,
                nat_port,
            );
            b.add(&k, &m, Some(&o));
            b.add_claim(&k.reply(m.nat_addr, m.nat_port));
        }
        let (k, m, o) = mapping(
            proto::UDP,
            [10, 1, 1, 2],
            5000,
            [203, 0, 113, 10],
            53,
            40000,
        );
        b.add(&k, &m, Some(&o));
        let v = b.finish();
        let nat = IpAddr::from([198, 51, 100, 1]);
        assert_eq!(v.mappings[&proto::TCP], 3);
        assert_eq!(v.claims[&proto::TCP], 3);
        assert_eq!(v.ports_in_use[&(nat, proto::TCP)], 2, "40000 counts once");
        assert_eq!(v.ports_in_use[&(nat, proto::UDP)], 1);
        assert_eq!(v.top_sources(1), [(Ipv4Addr::new(10, 1, 0, 2).into(), 3)]);
        let top = v.top_destinations(10);
        assert_eq!(top[0].1, 2);
        assert_eq!(top[0].0.label(), "203.0.113.10:80");
        assert!(top
            .iter()
            .any(|(d, n)| d.label() == "203.0.113.10" && d.proto == proto::UDP && *n == 1));
    }

    #[test]
    fn rows_follow_the_filter_and_show_state_age_and_expiry() {
        let t = timeouts();
        let filter = ConnFilter {
            source: Some("10.1.0.0/24".parse().unwrap()),
            proto: Some(Proto::Tcp),
            ..Default::default()
        };
        let mut b = ViewBuilder::new(&t, 130 * S, Some(filter));
        let (k, m, o) = mapping(
            proto::TCP,
            [10, 1, 0, 2],
            1000,
            [203, 0, 113, 10],
            80,
            40000,
        );
        b.add(&k, &m, Some(&o));
        let (k2, mut m2, mut o2) = mapping(
            proto::TCP,
            [10, 1, 0, 3],
            1000,
            [203, 0, 113, 10],
            80,
            40001,
        );
        m2.record(SEEN_FIN);
        o2.record(m2.epoch, SEEN_FIN);
        b.add(&k2, &m2, Some(&o2));
        let (k3, m3, o3) = mapping(
            proto::TCP,
            [10, 2, 0, 2],
            1000,
            [203, 0, 113, 10],
            80,
            40002,
        );
        b.add(&k3, &m3, Some(&o3));
        let (k4, m4, o4) = mapping(
            proto::UDP,
            [10, 1, 0, 2],
            1000,
            [203, 0, 113, 10],
            53,
            40003,
        );
        b.add(&k4, &m4, Some(&o4));
        let v = b.finish();
        assert_eq!(v.conns.len(), 2, "{:?}", v.conns);
        let c = &v.conns[0];
        assert_eq!(
            (c.internal.as_str(), c.nat.as_str(), c.destination.as_str()),
            ("10.1.0.2:1000", "198.51.100.1:40000", "203.0.113.10:80")
        );
        assert_eq!(
            (c.state.as_str(), c.age_secs, c.expires_in_secs),
            ("established", 120, 7440 - 30)
        );
        assert_eq!(
            (v.conns[1].state.as_str(), v.conns[1].expires_in_secs),
            ("closing", 240 - 30)
        );
    }

    const NAT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const SERVER6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    /// `fd00:10::<last>`.
    fn pod6(last: u8) -> [u8; 16] {
        let mut a = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[15] = last;
        a
    }

    /// An IPv6 mapping on 2001:db8:1::1.
    fn mapping6(
        p: u8,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        nat_port: u16,
    ) -> (FlowKey6, Mapping6, Origin6) {
        mapping_of(p, (src, sport), (dst, dport), NAT6, nat_port)
    }

    /// Two IPv4 mappings of 10.1.0.2 (TCP to 203.0.113.10:80 on port 40000, UDP to
    /// 203.0.113.10 on 40001) and four IPv6 ones: fd00:10::2 with two TCP connections to
    /// [2001:db8:2::10]:443 on ports 40000 and 40001 and one UDP flow to 2001:db8:2::10 on port
    /// 40000, fd00:10::3 with one TCP connection to port 443 on 40002. Every claim too.
    fn mixed(rows: Option<ConnFilter>, t: &Timeouts) -> TableView {
        let mut b = ViewBuilder::new(t, 130 * S, rows);
        for (p, dport, nat_port) in [(proto::TCP, 80, 40000), (proto::UDP, 53, 40001)] {
            let (k, m, o) = mapping(p, [10, 1, 0, 2], 1000, [203, 0, 113, 10], dport, nat_port);
            b.add(&k, &m, Some(&o));
            b.add_claim(&k.reply(m.nat_addr, m.nat_port));
        }
        for (p, src, sport, dport, nat_port) in [
            (proto::TCP, pod6(2), 1000, 443, 40000),
            (proto::TCP, pod6(2), 1001, 443, 40001),
            (proto::UDP, pod6(2), 5000, 53, 40000),
            (proto::TCP, pod6(3), 1000, 443, 40002),
        ] {
            let (k, m, o) = mapping6(p, src, sport, SERVER6, dport, nat_port);
            b.add(&k, &m, Some(&o));
            b.add_claim(&k.reply(m.nat_addr, m.nat_port));
        }
        b.finish()
    }

    #[test]
    fn both_families_are_counted_by_pool_source_and_destination() {
        let t = timeouts();
        let v = mixed(None, &t);
        let (nat4, nat6) = (IpAddr::from([198, 51, 100, 1]), IpAddr::from(NAT6));
        // Per-protocol totals stay per family.
        assert_eq!((v.mappings[&proto::TCP], v.mappings[&proto::UDP]), (1, 1));
        assert_eq!((v.mappings6[&proto::TCP], v.mappings6[&proto::UDP]), (3, 1));
        assert_eq!((v.claims[&proto::TCP], v.claims6[&proto::TCP]), (1, 3));
        // Pools: each NAT IP of its family, ports counted per NAT IP (40000 of the IPv4 NAT IP
        // and 40000 of the IPv6 one are two ports).
        assert_eq!(v.pool_mappings[&(nat4, proto::TCP)], 1);
        assert_eq!(v.pool_mappings[&(nat6, proto::TCP)], 3);
        assert_eq!(v.pool_mappings[&(nat6, proto::UDP)], 1);
        assert_eq!(v.ports_in_use[&(nat4, proto::TCP)], 1);
        assert_eq!(v.ports_in_use[&(nat6, proto::TCP)], 3);
        assert_eq!(v.ports_in_use[&(nat6, proto::UDP)], 1);
        // Sources and destinations of both families in one ranking.
        assert_eq!(
            v.top_sources(10),
            [
                (IpAddr::from(pod6(2)), 3),
                (IpAddr::from([10, 1, 0, 2]), 2),
                (IpAddr::from(pod6(3)), 1),
            ]
        );
        let top = v.top_destinations(10);
        assert_eq!(top.len(), 4, "{top:?}");
        assert_eq!(
            (top[0].0.nat_ip, top[0].0.label(), top[0].1),
            (nat6, "[2001:db8:2::10]:443".to_owned(), 3)
        );
        assert!(top
            .iter()
            .any(|(d, n)| d.label() == "2001:db8:2::10" && d.proto == proto::UDP && *n == 1));
        assert!(top
            .iter()
            .any(|(d, n)| d.label() == "203.0.113.10:80" && d.nat_ip == nat4 && *n == 1));
    }

    #[test]
    fn rows_of_both_families_and_filters_of_each() {
        let t = timeouts();
        let rows = |filter: ConnFilter| mixed(Some(filter), &t).conns;
        let all = rows(ConnFilter::default());
        assert_eq!(all.len(), 6);
        // IPv4 rows first, then IPv6, each by protocol and internal endpoint.
        assert_eq!(all[0].internal, "10.1.0.2:1000");
        let c = all
            .iter()
            .find(|c| c.internal == "[fd00:10::3]:1000")
            .expect("the IPv6 row");
        assert_eq!(
            (
                c.proto,
                c.nat.as_str(),
                c.destination.as_str(),
                c.state.as_str()
            ),
            (
                Proto::Tcp,
                "[2001:db8:1::1]:40002",
                "[2001:db8:2::10]:443",
                "established"
            )
        );
        let udp6 = all
            .iter()
            .find(|c| c.internal == "[fd00:10::2]:5000")
            .expect("the IPv6 UDP row");
        assert_eq!(
            (udp6.nat.as_str(), udp6.destination.as_str()),
            ("[2001:db8:1::1]:40000", "2001:db8:2::10")
        );
        let net = |s: &str| Some(s.parse::<IpCidr>().unwrap());
        let internal =
            |rows: Vec<Conn>| -> Vec<String> { rows.into_iter().map(|c| c.internal).collect() };
        // A filter of one family selects only that family's rows, even one matching everything.
        let v6 = rows(ConnFilter {
            destination: net("::/0"),
            ..ConnFilter::default()
        });
        assert_eq!(v6.len(), 4);
        assert!(v6.iter().all(|c| c.internal.starts_with('[')), "{v6:?}");
        let v4 = rows(ConnFilter {
            destination: net("0.0.0.0/0"),
            ..ConnFilter::default()
        });
        assert_eq!(internal(v4), ["10.1.0.2:1000", "10.1.0.2:1000"]);
        assert_eq!(
            internal(rows(ConnFilter {
                source: net("fd00:10::3/128"),
                ..ConnFilter::default()
            })),
            ["[fd00:10::3]:1000"]
        );
        assert_eq!(
            internal(rows(ConnFilter {
                source: net("fd00:10::/64"),
                destination: net("2001:db8:2::/48"),
                proto: Some(Proto::Udp),
            })),
            ["[fd00:10::2]:5000"]
        );
        assert!(rows(ConnFilter {
            source: net("10.1.0.0/16"),
            destination: net("2001:db8:2::/48"),
            ..ConnFilter::default()
        })
        .is_empty());
    }
}
