//! Hostile and odd packets, crafted with scapy (`tests/scapy/malformed.py`) and sent at layer 2
//! from a pod and from the internet side onto the node's uplink. Each case states its expected
//! outcome — translated, passed, or dropped with a reason — checked at the far side (a capture)
//! and in snat's counters. Afterwards normal traffic still works, and no packet left with an
//! internal source.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use serde_json::{json, Value};
use tests::{
    agent::Agent,
    netns::Netns,
    topo::{Topology, NAT_IP, POD_CIDR, SERVER},
    traffic::{udp_ask, Capture, LeakWatch, TcpClient, TcpServer, UdpServer},
};

fn mac(ns: &Netns, iface: &str) -> String {
    String::from_utf8(
        ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// Runs the scapy script on `side` and returns case name → marker, in sending order.
fn send(ns: &Netns, side: &str, iface: &str, dst_mac: &str, args: &Value) -> Vec<(String, u16)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scapy/malformed.py");
    // Debian's python3, which python3-scapy installs into (another python3 may come first on PATH).
    let out = ns.exec(&[
        "/usr/bin/python3",
        script.to_str().unwrap(),
        side,
        iface,
        dst_mac,
        &args.to_string(),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["case"].as_str().unwrap().to_owned(),
                v["marker"].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

fn counters(agent: &Agent) -> BTreeMap<String, u64> {
    let s = agent.stats();
    let mut out = BTreeMap::new();
    for (group, m) in s["counters"].as_object().unwrap() {
        for (name, v) in m.as_object().unwrap() {
            out.insert(format!("{group}.{name}"), v.as_u64().unwrap());
        }
    }
    out
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|&(k, v)| *v != before[k])
        .map(|(k, v)| (k.clone(), v - before[k]))
        .collect()
}

/// The captured IPv4 packet of protocol `proto` whose L4 destination port (TCP/UDP) is `port`.
fn find_port(packets: &[Vec<u8>], proto: u8, port: u16) -> Option<Vec<u8>> {
    packets
        .iter()
        .find(|p| {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            p.len() >= ihl + 4
                && p[9] == proto
                && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == port
        })
        .cloned()
}

/// Whether the L4 checksum of a captured TCP/UDP packet verifies.
fn l4_checksum_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let l4 = &p[ihl..tot];
    let src: [u8; 4] = p[12..16].try_into().unwrap();
    let dst: [u8; 4] = p[16..20].try_into().unwrap();
    let sum = snat_common::csum::pseudo_header_sum(src, dst, p[9], l4.len() as u16);
    snat_common::csum::fold_full(snat_common::csum::sum(l4, sum)) == 0xffff
}

#[test]
fn hostile_and_odd_packets_are_translated_passed_or_dropped_as_stated() {
    let topo = Topology::new(1);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--max-mappings", "4096"],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let out = Capture::start(&topo.router, &topo.router_uplink);
    let pod = &topo.pods[0];

    // From a pod.
    let before = counters(&agent);
    let sent = send(
        &pod.ns,
        "pod",
        &pod.iface,
        &mac(&topo.node, &pod.node_iface),
        &json!({"pod": pod.addr.to_string(), "server": SERVER.to_string(), "nat": NAT_IP.to_string()}),
    );
    assert_eq!(sent.len(), 15, "{sent:?}");
    let seen = out.packets();
    let marker = |case: &str| {
        sent.iter()
            .find(|(c, _)| c == case)
            .unwrap_or_else(|| panic!("case {case} not sent"))
            .1
    };
    let left = |case: &str, proto: u8| find_port(&seen, proto, marker(case));

    for case in [
        "ip_options",
        "udp_len_too_short",
        "udp_zero_checksum",
        "udp_wrong_checksum",
        "udp_source_port_0",
    ] {
        let p = left(case, 17)
            .unwrap_or_else(|| panic!("{case}: expected translated, nothing left the node"));
        assert_eq!(Ipv4Addr::new(p[12], p[13], p[14], p[15]), NAT_IP, "{case}");
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
        assert!(
            sport >= 32768,
            "{case}: source port {sport} outside the range"
        );
        let check = u16::from_be_bytes([p[ihl + 6], p[ihl + 7]]);
        match case {
            "ip_options" => assert!(
                ihl > 20 && l4_checksum_ok(&p),
                "options kept, checksum right"
            ),
            "udp_zero_checksum" => assert_eq!(check, 0, "a zero UDP checksum stays zero"),
            "udp_wrong_checksum" => assert!(!l4_checksum_ok(&p), "a wrong checksum is not fixed"),
            _ => assert!(l4_checksum_ok(&p), "{case}: checksum"),
        }
    }
    let syn = left("tcp_wrong_checksum", 6).expect("tcp_wrong_checksum: expected translated");
    assert_eq!(Ipv4Addr::new(syn[12], syn[13], syn[14], syn[15]), NAT_IP);
    assert!(!l4_checksum_ok(&syn), "a wrong TCP checksum is not fixed");
    for (case, proto) in [
        ("udp_len_too_long", 17),
        ("tcp_doff_below_5", 6),
        ("tcp_not_syn", 6),
        ("ip_bad_header_checksum", 17),
        ("ip_total_length_too_long", 17),
    ] {
        assert!(
            left(case, proto).is_none(),
            "{case}: expected dropped, but it left the node"
        );
    }
    assert!(
        !seen.iter().any(|p| p[9] == 253),
        "unknown_protocol left the node"
    );
    assert!(
        !seen.iter().any(|p| p[9] == 17 && p.len() <= 20),
        "tiny_udp_no_header left the node"
    );
    assert!(
        !seen.iter().any(|p| p[9] == 1 && p.len() > 20 && p[20] != 8),
        "ICMP other than echo requests left the node"
    );
    let d = delta(&before, &counters(&agent));
    let expect: BTreeMap<String, u64> = [
        // Dropped by snat, with the reason:
        ("egress.drop_malformed", 3), // udp_len_too_long, tcp_doff_below_5, tiny_udp_no_header
        ("egress.drop_unsupported_proto", 1),
        ("egress.drop_tcp_not_syn", 1),
        ("egress.drop_icmp_type", 1), // icmp_echo_reply_from_pod
        ("egress.drop_icmp_error_no_mapping", 1), // icmp_error_unknown_flow
        // Translated:
        ("egress.translated_udp", 5),
        ("egress.translated_tcp", 1),
        ("alloc.created_udp", 5),
        ("alloc.created_tcp", 1),
        // ip_bad_header_checksum and ip_total_length_too_long never reach snat: the node's own
        // IPv4 input drops them.
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in &expect {
        assert_eq!(d.get(k), Some(v), "{k}: all changes {d:?}");
    }

    // From the internet side, onto the uplink, next to a live UDP flow.
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let pod_addr = pod.addr;
    let sock = pod.ns.run(move || {
        let s = UdpSocket::bind((pod_addr, 40777)).unwrap();
        udp_ask(&s, SocketAddrV4::new(SERVER, 5353)).expect("UDP flow");
        s
    });
    let at_pod = Capture::start(&pod.ns, &pod.iface);
    let before = counters(&agent);
    let flow = json!({"nat_port": 40777, "server_port": 5353});
    let sent = send(
        &topo.router,
        "internet",
        &topo.router_uplink,
        &mac(&topo.node, &topo.uplink),
        &json!({"pod": pod.addr.to_string(), "server": SERVER.to_string(), "nat": NAT_IP.to_string(), "flow": flow}),
    );
    assert_eq!(sent.len(), 8, "{sent:?}");
    let d = delta(&before, &counters(&agent));
    for (k, v) in [
        ("ingress.pass_unparsed", 4), // truncated inner, nested error, inner not IPv4, tiny UDP
        ("ingress.pass_no_mapping", 2), // TCP with a bad data offset (no TCP mapping), unknown protocol
        ("ingress.translated_udp", 2),  // a reply with IP options, a reply with a wrong checksum
    ] {
        assert_eq!(d.get(k).copied(), Some(v), "{k}: all changes {d:?}");
    }
    let arrived = at_pod.packets();
    let replies: Vec<&Vec<u8>> = arrived
        .iter()
        .filter(|p| p[9] == 17 && p[16..20] == pod.addr.octets())
        .collect();
    assert_eq!(replies.len(), 2, "the two replies reach the pod");
    assert!(
        replies
            .iter()
            .any(|p| usize::from(p[0] & 0x0f) * 4 > 20 && l4_checksum_ok(p)),
        "options kept"
    );
    assert!(
        replies.iter().any(|p| !l4_checksum_ok(p)),
        "the wrong checksum is passed through, not fixed"
    );
    assert!(
        !arrived.iter().any(|p| p[9] == 1),
        "no mangled ICMP error reached the pod"
    );
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("the reply with IP options is delivered");
    assert_eq!(&buf[..n], b"reply with options");

    // Normal traffic still works.
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let seen_as = pod.ns.run(|| {
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect after the suite");
        assert_eq!(c.echo(b"still fine").unwrap(), b"still fine");
        c.seen_as
    });
    assert_eq!(*seen_as.ip(), NAT_IP);
    leaks.assert_no_leak();
}
