//! One pass over the mapping tables, aggregated the ways operators ask about them: by protocol,
//! by NAT IP (distinct ports held), by internal source, by destination, and (on request) as
//! rows like `conntrack -L`.
//!
//! Everything is exact at the time of the walk: figures come from the maps, not from estimates.
//! [`ViewBuilder`] is pure and host-tested; [`TableView::collect`] feeds it from the maps.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use snat_common::{flow::proto, tcp::Phase, FlowKey, Mapping, Origin, Proto};

use super::expiry::{last_seen, timeout_of};
use crate::{
    datapath::{batch, DatapathError, Tables, Tables6},
    settings::{cidr::Ipv4Cidr, Timeouts},
};

/// Where a mapping's flows go: the remote IP, and for TCP the remote port (a NAT port is unique
/// per remote ip:port for TCP, per remote IP for UDP and ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub nat_ip: Ipv4Addr,
    pub proto: u8,
    pub addr: Ipv4Addr,
    /// 0 for UDP and ICMP.
    pub port: u16,
}

impl Destination {
    /// `ip:port` for TCP, `ip` otherwise.
    pub fn label(&self) -> String {
        if self.proto == proto::TCP {
            format!("{}:{}", self.addr, self.port)
        } else {
            self.addr.to_string()
        }
    }
}

/// Which mappings `snat conns` lists (sent over the control socket as is).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnFilter {
    /// Internal (pod) sources in this CIDR.
    pub source: Option<Ipv4Cidr>,
    /// Destinations in this CIDR.
    pub destination: Option<Ipv4Cidr>,
    pub proto: Option<Proto>,
}

impl ConnFilter {
    fn matches(&self, key: &FlowKey) -> bool {
        self.source.is_none_or(|c| c.contains(key.src()))
            && self.destination.is_none_or(|c| c.contains(key.dst()))
            && self.proto.is_none_or(|p| p.number() == key.proto)
    }
}

/// One mapping as `snat conns` shows it.
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
    /// Forward halves by protocol number.
    pub mappings: HashMap<u8, u64>,
    /// Reverse halves (port claims) by protocol number.
    pub claims: HashMap<u8, u64>,
    /// Mappings by (NAT IP, protocol).
    pub pool_mappings: HashMap<(Ipv4Addr, u8), u64>,
    /// Distinct NAT ports held, by (NAT IP, protocol).
    pub ports_in_use: HashMap<(Ipv4Addr, u8), u64>,
    /// Mappings (each holds a port towards its destination) by internal source address.
    pub by_source: HashMap<Ipv4Addr, u64>,
    /// Mappings by destination.
    pub by_destination: HashMap<Destination, u64>,
    /// Rows, when asked for.
    pub conns: Vec<Conn>,
    /// IPv6 mappings (forward halves) by protocol number (the rest of the view is IPv4's).
    pub mappings6: HashMap<u8, u64>,
}

/// Builds a [`TableView`] one mapping at a time.
pub struct ViewBuilder<'a> {
    view: TableView,
    ports: HashSet<(Ipv4Addr, u8, u16)>,
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
    pub fn add(&mut self, key: &FlowKey, m: &Mapping, o: Option<&Origin>) {
        let v = &mut self.view;
        let nat_ip = m.nat_addr();
        *v.mappings.entry(key.proto).or_default() += 1;
        *v.pool_mappings.entry((nat_ip, key.proto)).or_default() += 1;
        *v.by_source.entry(key.src()).or_default() += 1;
        let dest = Destination {
            nat_ip,
            proto: key.proto,
            addr: key.dst(),
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
    pub fn add_claim(&mut self, reply: &FlowKey) {
        *self.view.claims.entry(reply.proto).or_default() += 1;
    }

    fn row(
        &self,
        key: &FlowKey,
        m: &Mapping,
        o: Option<&Origin>,
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
            internal: format!("{}:{}", key.src(), key.src_port()),
            nat: format!("{}:{}", m.nat_addr(), m.nat_port()),
            destination: dest.label(),
            state: state.to_owned(),
            age_secs: Duration::from_nanos(self.now_ns.saturating_sub(m.created_ns())).as_secs(),
            expires_in_secs: timeout.saturating_sub(idle).as_secs(),
        })
    }

    pub fn finish(mut self) -> TableView {
        self.view
            .conns
            .sort_by(|a, b| (&a.proto, &a.internal).cmp(&(&b.proto, &b.internal)));
        self.view
    }
}

impl TableView {
    /// Walks both tables.
    pub fn collect(
        tables: &Tables,
        timeouts: &Timeouts,
        now_ns: u64,
        rows: Option<ConnFilter>,
    ) -> Result<Self, DatapathError> {
        let mut b = ViewBuilder::new(timeouts, now_ns, rows);
        batch::for_each(&tables.fwd, |key, m| {
            let o = tables.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
            b.add(&key, &m, o.as_ref());
        })?;
        batch::for_each(&tables.rev, |reply, _| b.add_claim(&reply))?;
        Ok(b.finish())
    }

    /// Counts the IPv6 mappings of `tables` by protocol into [`TableView::mappings6`].
    pub fn count6(&mut self, tables: &Tables6) -> Result<(), DatapathError> {
        batch::for_each(&tables.fwd, |key, _| {
            *self.mappings6.entry(key.proto).or_default() += 1;
        })
    }

    /// The `n` sources holding the most ports, most first.
    pub fn top_sources(&self, n: usize) -> Vec<(Ipv4Addr, u64)> {
        top(self.by_source.iter().map(|(k, v)| (*k, *v)), n)
    }

    /// The `n` busiest destinations, most first.
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
    use snat_common::tcp::{SEEN_FIN, SEEN_SYN};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts::default()
    }

    fn mapping(
        p: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        nat_port: u16,
    ) -> (FlowKey, Mapping, Origin) {
        let key = FlowKey::new(
            p,
            src,
            sport.to_be_bytes(),
            dst,
            FlowKey::remote_port_for(p, dport.to_be_bytes()),
        );
        let mut m = Mapping::new(key, [198, 51, 100, 1], nat_port.to_be_bytes(), 10 * S);
        m.last_seen_ns = 100 * S;
        m.record(SEEN_SYN);
        let mut o = Origin::new(
            key.reply(m.nat_addr, m.nat_port),
            src,
            sport.to_be_bytes(),
            90 * S,
        );
        o.record(m.epoch, SEEN_SYN);
        (key, m, o)
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
        let nat = Ipv4Addr::new(198, 51, 100, 1);
        assert_eq!(v.mappings[&proto::TCP], 3);
        assert_eq!(v.claims[&proto::TCP], 3);
        assert_eq!(v.ports_in_use[&(nat, proto::TCP)], 2, "40000 counts once");
        assert_eq!(v.ports_in_use[&(nat, proto::UDP)], 1);
        assert_eq!(v.top_sources(1), [(Ipv4Addr::new(10, 1, 0, 2), 3)]);
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
}
