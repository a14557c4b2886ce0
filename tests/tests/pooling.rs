//! A second NAT IP relieves a hot pod (`--ip-pooling overflow`, the default): a flow whose paired
//! NAT IP has no port left towards its destination takes one on the next NAT IP, in order;
//! `--ip-pooling paired` keeps every flow of a pod on one address. Crafted frames through the
//! loaded programs first, then real connections in namespaces.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use snat_common::{pool::nat_index, Counter};
use tests::{
    agent::Agent,
    dp::{Dp, NAT, POD, REMOTE, SHOT},
    metric,
    packets::{self, SYN},
    topo::{Topology, NAT_IP, SERVER},
    traffic::{udp_ask, TcpClient, TcpServer, UdpServer},
};

const NAT2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

/// The two NAT IPs in the order a pod at `pod` tries them: its paired one first.
fn order(pod: Ipv4Addr, ips: [Ipv4Addr; 2]) -> [Ipv4Addr; 2] {
    let first = nat_index(pod.octets(), 2) as usize;
    [ips[first], ips[1 - first]]
}

#[test]
fn a_full_paired_ip_overflows_to_the_next_and_paired_mode_refuses() {
    let syn = |sport: u16| packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
    let [paired, next] = order(POD, [NAT, NAT2]);

    let dp = Dp::new(&format!(
        "--nat-ip {NAT2} --port-range 40000:40003 --on-exhaustion drop"
    ));
    let mut by_ip: BTreeMap<Ipv4Addr, HashSet<u16>> = BTreeMap::new();
    for sport in 1..=8 {
        let out = dp.egress_ok(&syn(sport));
        assert!(by_ip
            .entry(out.src())
            .or_default()
            .insert(out.tcp().source_port));
    }
    assert_eq!(
        by_ip[&paired].len(),
        4,
        "the paired NAT IP first: {by_ip:?}"
    );
    assert_eq!(by_ip[&next].len(), 4, "then the next one: {by_ip:?}");
    assert_eq!(dp.count(Counter::AllocOverflow), 4);
    // Both full: refused, counted once as exhausted.
    assert_eq!(dp.egress(&syn(9)).0, SHOT);
    assert_eq!(dp.count(Counter::EgressDropExhaustedTcp), 1);
    assert_eq!(dp.count(Counter::CreatedTcp), 8);
    // Another destination starts on the paired NAT IP again.
    let out = dp.egress_ok(&packets::tcp((POD, 20), (REMOTE, 81), SYN, b""));
    assert_eq!(out.src(), paired);

    let dp = Dp::new(&format!(
        "--nat-ip {NAT2} --port-range 40000:40003 --on-exhaustion drop --ip-pooling paired"
    ));
    for sport in 1..=4 {
        assert_eq!(dp.egress_ok(&syn(sport)).src(), paired);
    }
    assert_eq!(
        dp.egress(&syn(5)).0,
        SHOT,
        "paired: the next NAT IP stays unused"
    );
    assert_eq!(dp.count(Counter::AllocOverflow), 0);
}

#[test]
fn the_per_source_cap_counts_every_nat_ip_the_pod_uses() {
    let dp = Dp::new(&format!(
        "--nat-ip {NAT2} --port-range 40000:40003 --on-exhaustion drop --max-ports-per-source 6"
    ));
    let syn = |sport: u16| packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
    for sport in 1..=6 {
        dp.egress_ok(&syn(sport));
    }
    assert_eq!(dp.count(Counter::AllocOverflow), 2);
    assert_eq!(
        dp.egress(&syn(7)).0,
        SHOT,
        "6 mappings over two NAT IPs: the cap"
    );
    assert_eq!(dp.count(Counter::EgressDropSourceCap), 1);
}

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::for_pods(
        topo,
        4096,
        &[&["--metrics-min-interval", "0s"], extra].concat(),
    )
}

/// An agent with both NAT IPs ([`NAT_IP`], then [`NAT2`]) and the port range `range`.
fn two_ip_agent(topo: &Topology, range: &str, extra: &[&str]) -> Agent {
    let (first, second) = (NAT_IP.to_string(), NAT2.to_string());
    let ips = [
        "--nat-ip",
        &first,
        "--nat-ip",
        &second,
        "--port-range",
        range,
    ];
    agent(topo, &[&ips[..], extra].concat())
}

/// A topology whose node has a second NAT IP, [`NAT2`], on its uplink.
fn two_ip_topology(pods: usize) -> Topology {
    let topo = Topology::new(pods);
    topo.node
        .ip(&["addr", "add", &format!("{NAT2}/24"), "dev", &topo.uplink]);
    topo
}

/// Opens up to `n` connections from pod 0 to `to`, each given `timeout`; returns those that
/// connected and, for those that did not, how each failed and how long it took.
fn connect_many(
    topo: &Topology,
    n: usize,
    to: SocketAddrV4,
) -> (Vec<TcpClient>, Vec<(io::ErrorKind, Duration)>) {
    topo.pods[0].ns.run(move || {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let started = Instant::now();
            match TcpClient::connect(to, Duration::from_secs(3)) {
                Ok(c) => ok.push(c),
                Err(e) => failed.push((e.kind(), started.elapsed())),
            }
        }
        (ok, failed)
    })
}

#[test]
fn a_second_nat_ip_doubles_what_one_pod_reaches() {
    let topo = two_ip_topology(1);
    let agent = two_ip_agent(&topo, "40000:40009", &[]);
    let to = SocketAddrV4::new(SERVER, 8080);
    let server = TcpServer::start(&topo.server, to);
    let (held, failed) = connect_many(&topo, 25, to);
    assert_eq!(held.len(), 20, "ten ports on each NAT IP: {failed:?}");
    let mut per_ip: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for peer in server.peers() {
        *per_ip.entry(*peer.ip()).or_default() += 1;
    }
    assert_eq!(
        per_ip,
        BTreeMap::from([(NAT_IP, 10), (NAT2, 10)]),
        "the server saw ten from each"
    );
    // The 21st onwards: refused at once (a RST), not left to time out.
    assert_eq!(failed.len(), 5);
    for (kind, took) in &failed {
        assert_eq!(*kind, io::ErrorKind::ConnectionRefused);
        assert!(*took < Duration::from_secs(1), "refused after {took:?}");
    }
    // Counted: ten flows overflowed from the pod's paired NAT IP, five refused on it.
    let [paired, _] = order(topo.pods[0].addr, [NAT_IP, NAT2]);
    let m = agent.scrape(&topo.node);
    let pool = format!("{{nat_ip=\"{paired}\",proto=\"tcp\"}}");
    assert_eq!(
        metric(&m, &format!("snat_port_overflow_total{pool}")),
        Some(10.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("snat_port_exhaustion_total{pool}")),
        Some(5.0)
    );
    let status = agent.json("status", &[]);
    assert_eq!(status["policy"]["ip_pooling"], "overflow");
    let (ok, text, _) = agent.cli(&["status", "--iface", &topo.uplink]);
    assert!(ok && text.contains("OVERFLOWED"), "{text}");
    drop(held);

    // Paired pooling: one pod, one NAT IP, ten connections.
    drop(agent);
    let agent = two_ip_agent(&topo, "41000:41009", &["--ip-pooling", "paired"]);
    let before = server.peers().len();
    let (held, _) = connect_many(&topo, 15, to);
    assert_eq!(held.len(), 10);
    let ips_seen: HashSet<Ipv4Addr> = server.peers()[before..].iter().map(|p| *p.ip()).collect();
    assert_eq!(ips_seen, HashSet::from([paired]));
    assert_eq!(agent.counter("alloc", "overflowed"), 0);
}

#[test]
fn a_udp_flow_keeps_its_nat_endpoint_while_later_flows_overflow() {
    let topo = two_ip_topology(1);
    let _agent = two_ip_agent(&topo, "40000:40009", &[]);
    let to = SocketAddrV4::new(SERVER, 5353);
    let _server = UdpServer::start(&topo.server, to);
    let [paired, next] = order(topo.pods[0].addr, [NAT_IP, NAT2]);
    topo.pods[0].ns.run(move || {
        let first = UdpSocket::bind("0.0.0.0:0").unwrap();
        let seen = udp_ask(&first, to).expect("the first flow");
        assert_eq!(*seen.ip(), paired);
        // Nineteen more flows: nine more on the paired NAT IP, then ten on the next one.
        let others: Vec<UdpSocket> = (0..19)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        let mut overflowed = 0;
        for s in &others {
            if *udp_ask(s, to).expect("a later flow").ip() == next {
                overflowed += 1;
            }
        }
        assert_eq!(overflowed, 10);
        // The first flow still has its own NAT endpoint, both ways.
        for _ in 0..3 {
            assert_eq!(udp_ask(&first, to).expect("the first flow again"), seen);
        }
    });
}

#[test]
fn caps_and_fair_share_count_a_pods_ports_on_every_nat_ip() {
    let to = SocketAddrV4::new(SERVER, 8080);
    // The cap: 15 ports for the pod whichever NAT IPs they are on.
    let topo = two_ip_topology(2);
    let server = TcpServer::start(&topo.server, to);
    let agent_capped = two_ip_agent(&topo, "40000:40009", &["--max-ports-per-source", "15"]);
    let (held, failed) = connect_many(&topo, 20, to);
    assert_eq!(held.len(), 15, "{failed:?}");
    assert_eq!(agent_capped.counter("alloc", "overflowed"), 5);
    assert!(agent_capped.counter("egress", "drop_source_cap") >= 5);
    drop((held, agent_capped));

    // The fair share: from half the range used, a pod holding range / (sources + 1) = 5 ports
    // towards the destination (on any NAT IP) gets no more; that is not exhaustion, so nothing
    // overflows; another pod still connects.
    let agent = two_ip_agent(
        &topo,
        "41000:41009",
        &["--fair-share", "--fair-share-threshold", "0.5"],
    );
    let (held, _) = connect_many(&topo, 10, to);
    assert_eq!(held.len(), 5, "the greedy pod stops at its share");
    assert_eq!(agent.counter("alloc", "overflowed"), 0);
    assert!(agent.counter("egress", "drop_fair_share") >= 5);
    let other = topo.pods[1].ns.run(move || {
        (0..3)
            .filter(|_| TcpClient::connect(to, Duration::from_secs(3)).is_ok())
            .count()
    });
    assert_eq!(other, 3, "its neighbour is not starved");
    drop((held, server));
}
