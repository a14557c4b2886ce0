//! The gateway's return path (`snat_gateway`, issue 14) under `BPF_PROG_TEST_RUN`: crafted replies
//! to the NAT IP through the real loaded program, configured through the real userspace API
//! (`datapath::gateway::Gateway`), attached nowhere. A forwarded packet must leave unchanged with
//! `TC_ACT_REDIRECT`, and the node it went to is read from the per-node counters. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use etherparse::{
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
    Icmpv4Type, Ipv4Header,
};
use snat_common::gateway::GwCounter;
use snat_user::{
    cluster::{
        gateway::RouteOp,
        geometry::{BlockId, Geometry},
    },
    datapath::gateway::{Gateway, NextHop},
    settings::ports::PortRange,
};
use tests::{
    dp::{NAT, PASS, REDIRECT, REMOTE, ROUTER, SHOT},
    packets::{self, ACK, SYN},
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// Not a NAT IP of the gateway.
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

fn block(index: u16) -> BlockId {
    BlockId { nat_ip: NAT, index }
}

fn geometry(nat_ips: Vec<Ipv4Addr>) -> Geometry {
    Geometry::new(
        PortRange {
            lo: 40000,
            hi: 40511,
        },
        64,
        vec![],
        nat_ips,
    )
    .expect("a geometry")
}

/// A fake routing table: every node on interface 100 + its last octet, directly.
fn hop(node: Ipv4Addr) -> Result<NextHop, snat_user::datapath::gateway::GatewayError> {
    Ok(NextHop {
        ifindex: 100 + u32::from(node.octets()[3]),
        via: node,
    })
}

/// Loads are serialised, so [`the_gateway_reserves_kilobytes_not_the_agents_tables`] can tell
/// its maps from those of tests running beside it.
static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn load() -> Gateway {
    let _one = LOADING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Gateway::load().expect("loading the gateway (are you root?)")
}

/// This process's open file descriptors.
fn fds() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// Range 40000:40511 in blocks of 64 on NAT: block 0 (40000–40063) → node A, block 1
/// (40064–40127) → node B, the other six held by nobody.
fn gateway() -> Gateway {
    let mut gw = load();
    gw.set_geometry(&geometry(vec![NAT])).expect("geometry");
    gw.apply_with(
        &[
            RouteOp::Set {
                block: block(0),
                to: NODE_A,
            },
            RouteOp::Set {
                block: block(1),
                to: NODE_B,
            },
        ],
        hop,
    )
    .expect("routes");
    gw
}

fn nonzero(gw: &Gateway) -> Vec<(GwCounter, u64)> {
    gw.counters()
        .expect("counters")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Runs `frame` through the gateway, expects it redirected unchanged, and names the node whose
/// packet count went up.
fn forwarded_to(gw: &Gateway, frame: &[u8]) -> Ipv4Addr {
    let before = gw.node_packets().expect("node counters");
    let (ret, out) = gw.test_run(frame).expect("test run");
    assert_eq!(ret, REDIRECT, "verdict; counters: {:?}", nonzero(gw));
    assert_eq!(out, frame, "a forwarded packet leaves unchanged");
    let after = gw.node_packets().expect("node counters");
    let grown: Vec<Ipv4Addr> = after
        .iter()
        .filter(|(n, c)| before.get(*n).copied().unwrap_or(0) + 1 == **c)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(grown.len(), 1, "one node counted: {before:?} → {after:?}");
    grown[0]
}

fn dropped(gw: &Gateway, frame: &[u8], why: GwCounter) {
    let before = gw.count(why).expect("counter");
    let (ret, _) = gw.test_run(frame).expect("test run");
    assert_eq!(ret, SHOT, "verdict; counters: {:?}", nonzero(gw));
    assert_eq!(
        gw.count(why).expect("counter"),
        before + 1,
        "{why:?}; {:?}",
        nonzero(gw)
    );
}

fn passed(gw: &Gateway, frame: &[u8]) {
    let (ret, out) = gw.test_run(frame).expect("test run");
    assert_eq!(ret, PASS, "verdict; counters: {:?}", nonzero(gw));
    assert_eq!(out, frame, "a passed packet leaves unchanged");
}

#[test]
fn tcp_and_udp_replies_go_to_the_node_holding_the_port_block() {
    let gw = gateway();
    for port in [40000, 40001, 40063] {
        let f = packets::tcp((REMOTE, 443), (NAT, port), ACK, b"reply");
        assert_eq!(forwarded_to(&gw, &f), NODE_A, "TCP port {port}");
    }
    for port in [40064, 40100, 40127] {
        let f = packets::udp((REMOTE, 53), (NAT, port), b"answer");
        assert_eq!(forwarded_to(&gw, &f), NODE_B, "UDP port {port}");
    }
    // The source port plays no part.
    let f = packets::tcp((REMOTE, 40070), (NAT, 40010), SYN, b"");
    assert_eq!(forwarded_to(&gw, &f), NODE_A);
    assert_eq!(gw.count(GwCounter::ForwardedTcp).unwrap(), 4);
    assert_eq!(gw.count(GwCounter::ForwardedUdp).unwrap(), 3);
    let per_node: BTreeMap<Ipv4Addr, u64> = gw.node_packets().unwrap();
    assert_eq!(per_node, BTreeMap::from([(NODE_A, 4), (NODE_B, 3)]));
}

#[test]
fn echo_replies_go_by_identifier_and_echo_requests_are_dropped() {
    let gw = gateway();
    let f = packets::icmp_echo(REMOTE, NAT, false, 40065, 1);
    assert_eq!(forwarded_to(&gw, &f), NODE_B);
    let f = packets::icmp_echo(REMOTE, NAT, false, 40002, 7);
    assert_eq!(forwarded_to(&gw, &f), NODE_A);
    assert_eq!(gw.count(GwCounter::ForwardedIcmpEcho).unwrap(), 2);
    // A ping of the NAT IP is no reply: nobody's to answer.
    dropped(
        &gw,
        &packets::icmp_echo(REMOTE, NAT, true, 40065, 1),
        GwCounter::DropUnsupported,
    );
}

#[test]
fn icmp_errors_go_by_the_source_port_of_the_quoted_packet() {
    let gw = gateway();
    // Node B's translated SYN (NAT:40070 → REMOTE:443) met a 1,280-byte link: frag needed.
    let syn = packets::tcp((NAT, 40070), (REMOTE, 443), SYN, b"");
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1280,
        }),
        packets::ip_part(&syn),
    );
    assert_eq!(forwarded_to(&gw, &err), NODE_B);
    // Node A's UDP datagram (NAT:40001 → REMOTE:33434) ran out of TTL: traceroute.
    let udp = packets::udp((NAT, 40001), (REMOTE, 33434), b"probe");
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
        packets::ip_part(&udp),
    );
    assert_eq!(forwarded_to(&gw, &err), NODE_A);
    // Node A's ping (identifier 40050) found no host; only the first 8 bytes of it are quoted.
    let ping = packets::icmp_echo(NAT, REMOTE, true, 40050, 3);
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host),
        &packets::ip_part(&ping)[..28],
    );
    assert_eq!(forwarded_to(&gw, &err), NODE_A);
    assert_eq!(gw.count(GwCounter::ForwardedIcmpError).unwrap(), 3);

    // The destination port of the quote (the remote's) does not count: 40070 is the source.
    let syn = packets::tcp((NAT, 40010), (REMOTE, 40070), SYN, b"");
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        packets::ip_part(&syn),
    );
    assert_eq!(forwarded_to(&gw, &err), NODE_A);

    // A quote of a packet another address sent, or cut short of its ports: unusable.
    let foreign = packets::tcp((OTHER, 40070), (REMOTE, 443), SYN, b"");
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        packets::ip_part(&foreign),
    );
    dropped(&gw, &err, GwCounter::DropQuoteUnusable);
    let short = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &packets::ip_part(&syn)[..24],
    );
    dropped(&gw, &short, GwCounter::DropQuoteUnusable);
}

/// Splits the IPv4 datagram of `frame` into two fragments: the first carries the first `first`
/// bytes of its payload (a multiple of 8), the second the rest. `id` is the IP identification.
fn fragments(frame: &[u8], id: u16, first: usize) -> (Vec<u8>, Vec<u8>) {
    let (ip, payload) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let mk = |data: &[u8], offset: usize, more: bool| {
        let mut h = ip.clone();
        h.identification = id;
        h.more_fragments = more;
        h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
        h.set_payload_len(data.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut out = frame[..14].to_vec();
        out.extend_from_slice(&h.to_bytes());
        out.extend_from_slice(data);
        out
    };
    (
        mk(&payload[..first], 0, true),
        mk(&payload[first..], first, false),
    )
}

#[test]
fn later_fragments_follow_their_first_and_orphans_are_dropped() {
    let gw = gateway();
    let big = packets::udp((REMOTE, 53), (NAT, 40100), &[7u8; 200]);
    let (first, second) = fragments(&big, 0x1234, 64);
    assert_eq!(forwarded_to(&gw, &first), NODE_B);
    assert_eq!(forwarded_to(&gw, &second), NODE_B);
    assert_eq!(gw.count(GwCounter::ForwardedUdp).unwrap(), 1);
    assert_eq!(gw.count(GwCounter::ForwardedFragment).unwrap(), 1);

    // A fragmented echo reply, identifier in node A's block.
    let mut echo = packets::icmp_echo(REMOTE, NAT, false, 40003, 9);
    echo.extend_from_slice(&[0u8; 64]);
    let len = (echo.len() - 14) as u16;
    echo[16..18].copy_from_slice(&len.to_be_bytes());
    let (first, second) = fragments(&echo, 0x4321, 16);
    assert_eq!(forwarded_to(&gw, &first), NODE_A);
    assert_eq!(forwarded_to(&gw, &second), NODE_A);

    // The later fragment of a datagram whose first was never seen.
    let (_, orphan) = fragments(&big, 0x9999, 64);
    dropped(&gw, &orphan, GwCounter::DropOrphanFragment);
}

#[test]
fn replies_outside_the_range_or_the_routes_are_dropped_and_counted() {
    let mut gw = gateway();
    dropped(
        &gw,
        &packets::tcp((REMOTE, 443), (NAT, 39999), ACK, b""),
        GwCounter::DropOutOfRange,
    );
    dropped(
        &gw,
        &packets::udp((REMOTE, 53), (NAT, 40512), b""),
        GwCounter::DropOutOfRange,
    );
    dropped(
        &gw,
        &packets::icmp_echo(REMOTE, NAT, false, 7, 1),
        GwCounter::DropOutOfRange,
    );
    // Block 2 (40128–40191) is nobody's.
    dropped(
        &gw,
        &packets::tcp((REMOTE, 443), (NAT, 40150), ACK, b""),
        GwCounter::DropNoRoute,
    );
    // Node A releases block 0, node B claims it.
    gw.apply_with(&[RouteOp::Clear { block: block(0) }], hop)
        .unwrap();
    let f = packets::tcp((REMOTE, 443), (NAT, 40001), ACK, b"");
    dropped(&gw, &f, GwCounter::DropNoRoute);
    gw.apply_with(
        &[RouteOp::Set {
            block: block(0),
            to: NODE_B,
        }],
        hop,
    )
    .unwrap();
    assert_eq!(forwarded_to(&gw, &f), NODE_B);
    // Node A holds nothing now: its counter slot went.
    assert_eq!(
        gw.node_packets()
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![NODE_B]
    );
    assert_eq!(gw.count(GwCounter::DropOutOfRange).unwrap(), 3);
    assert_eq!(gw.count(GwCounter::DropNoRoute).unwrap(), 2);
    // A block outside the geometry is refused by the API.
    assert!(gw
        .apply_with(
            &[RouteOp::Set {
                block: block(8),
                to: NODE_A
            }],
            hop
        )
        .is_err());
}

#[test]
fn traffic_not_to_a_nat_ip_passes_untouched() {
    let mut gw = gateway();
    passed(&gw, &packets::tcp((REMOTE, 443), (OTHER, 40001), ACK, b""));
    passed(&gw, &packets::icmp_echo(REMOTE, OTHER, true, 1, 1));
    // Not IPv4: an ARP request.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    passed(&gw, &arp);
    assert_eq!(gw.count(GwCounter::PassNotNatIp).unwrap(), 2);
    assert_eq!(gw.count(GwCounter::PassNotIpv4).unwrap(), 1);
    // Once NAT is no longer a NAT IP of the geometry, its traffic passes too.
    gw.set_geometry(&geometry(vec![OTHER])).unwrap();
    passed(&gw, &packets::tcp((REMOTE, 443), (NAT, 40001), ACK, b""));
    assert_eq!(
        gw.routes().count(),
        0,
        "the routes of a NAT IP that went, went"
    );
}

#[test]
fn the_gateway_reserves_kilobytes_not_the_agents_tables() {
    let _one = LOADING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = fds();
    let gw = Gateway::load().expect("loading the gateway");
    let (mut maps, mut bytes) = (0, 0u64);
    for fd in fds().difference(&before) {
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        maps += 1;
        let n = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("a memlock line");
        if n > 256 << 10 {
            eprintln!("a map of {} KiB: {}", n >> 10, info.replace('\n', " "));
        }
        bytes += n;
    }
    eprintln!("the gateway's {maps} maps: {} KiB", bytes / 1024);
    assert!(maps >= 10, "{maps} maps");
    // The agent's default tables are about 325 MiB; the gateway's own LRU of fragments is the
    // largest map it needs.
    assert!(bytes < 4 << 20, "{bytes} bytes of maps");
    drop(gw);

    // The route capacity bounds the geometry.
    let mut small = Gateway::with_capacity(8).expect("loading");
    small
        .set_geometry(&geometry(vec![NAT]))
        .expect("8 blocks fit");
    let e = small
        .set_geometry(&geometry(vec![NAT, OTHER]))
        .expect_err("16 blocks do not")
        .to_string();
    assert!(e.contains("16 blocks") && e.contains("8 routes"), "{e}");
}

#[test]
fn per_packet_cost() {
    let gw = gateway();
    let runs = 200_000;
    let mut report = Vec::new();
    for (what, frame) in [
        (
            "tcp forwarded",
            packets::tcp((REMOTE, 443), (NAT, 40001), ACK, b"reply"),
        ),
        (
            "icmp error forwarded",
            packets::icmp_error(
                ROUTER,
                NAT,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1280,
                }),
                packets::ip_part(&packets::tcp((NAT, 40070), (REMOTE, 443), SYN, b"")),
            ),
        ),
        (
            "not to a NAT IP",
            packets::tcp((REMOTE, 443), (OTHER, 40001), ACK, b""),
        ),
        (
            "dropped, no route",
            packets::tcp((REMOTE, 443), (NAT, 40150), ACK, b""),
        ),
    ] {
        let (_, _, ns) = gw.test_run_repeat(&frame, runs).expect("test run");
        report.push(format!("{what}: {ns} ns"));
        assert!(ns < 5_000, "{what}: {ns} ns per packet");
    }
    eprintln!(
        "snat_gateway per packet (BPF_PROG_TEST_RUN, mean of {runs}): {}",
        report.join(", ")
    );
}

/// Real traffic: a remote sends replies to the NAT IP through a gateway namespace running
/// `snat_gateway` on its uplink; two node namespaces behind it, on links of their own; the
/// routes are set through the API (routing resolved by `ip route get` in the gateway's
/// namespace). Each node's capture shows exactly its blocks' packets, unchanged (TTL included),
/// fragments of a large datagram included.
#[test]
fn replies_reach_the_node_of_their_block_in_namespaces() {
    use std::{net::UdpSocket, time::Duration};
    use tests::{
        netns::{unique_prefix, veth, Netns},
        traffic::Capture,
    };

    let p = unique_prefix();
    let remote = Netns::new(&format!("{p}-rem"));
    let gwns = Netns::new(&format!("{p}-gw"));
    let na = Netns::new(&format!("{p}-na"));
    let nb = Netns::new(&format!("{p}-nb"));
    let (up, gw_up) = (format!("{p}-r0"), format!("{p}-g0"));
    let (ga, a0) = (format!("{p}-ga"), format!("{p}-a0"));
    let (gb, b0) = (format!("{p}-gb"), format!("{p}-b0"));
    veth(&remote, &up, &gwns, &gw_up);
    veth(&gwns, &ga, &na, &a0);
    veth(&gwns, &gb, &nb, &b0);
    remote.ip(&["addr", "add", "203.0.113.10/24", "dev", &up]);
    remote.ip(&["route", "add", "198.51.100.0/24", "via", "203.0.113.1"]);
    gwns.ip(&["addr", "add", "203.0.113.1/24", "dev", &gw_up]);
    gwns.ip(&["addr", "add", "10.77.1.1/24", "dev", &ga]);
    gwns.ip(&["addr", "add", "10.77.2.1/24", "dev", &gb]);
    na.ip(&["addr", "add", "10.77.1.2/24", "dev", &a0]);
    nb.ip(&["addr", "add", "10.77.2.2/24", "dev", &b0]);
    gwns.ip(&["route", "add", "10.99.0.0/24", "via", "10.77.1.2"]);
    let (node_a, node_b) = (Ipv4Addr::new(10, 77, 1, 2), Ipv4Addr::new(10, 77, 2, 2));

    let iface = gw_up.clone();
    let mut gw = gwns.run(move || {
        let mut gw = load();
        gw.attach(&iface, snat_user::settings::AttachChoice::Auto)
            .expect("attaching");
        gw.set_geometry(&geometry(vec![NAT])).expect("geometry");
        gw.apply(&[
            RouteOp::Set {
                block: block(0),
                to: node_a,
            },
            RouteOp::Set {
                block: block(1),
                to: node_b,
            },
        ])
        .expect("routes, resolved in the gateway's namespace");
        // A node behind a router is refused: the router would route the reply by the NAT IP.
        let far = Ipv4Addr::new(10, 99, 0, 2);
        let e = gw
            .apply(&[RouteOp::Set {
                block: block(2),
                to: far,
            }])
            .expect_err("a node behind a router")
            .to_string();
        assert!(e.contains("not on a link of the gateway"), "{e}");
        gw
    });
    let ifs: Vec<(Ipv4Addr, NextHop)> = gw.routes().map(|(_, n, h)| (n, h)).collect();
    assert!(
        ifs.iter().all(|(n, h)| h.via == *n && h.ifindex != 0),
        "{ifs:?}"
    );

    let cap_a = Capture::start(&na, &a0);
    let cap_b = Capture::start(&nb, &b0);
    remote.run(|| {
        let s = UdpSocket::bind("203.0.113.10:53").expect("bind");
        for (port, data) in [
            (40001u16, vec![1u8; 100]),
            (40070, vec![2u8; 100]),
            (40071, vec![3u8; 3000]),
            (40300, vec![4u8; 10]),
        ] {
            s.send_to(&data, (NAT, port)).expect("send");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let seen = |cap: &Capture| -> Vec<(u16, u8, bool)> {
        cap.packets()
            .iter()
            .filter(|ip| ip.len() >= 28 && ip[16..20] == NAT.octets())
            .map(|ip| {
                let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
                let port = if frag {
                    0
                } else {
                    u16::from_be_bytes([ip[22], ip[23]])
                };
                (port, ip[8], frag)
            })
            .collect()
    };
    let (at_a, at_b) = (seen(&cap_a), seen(&cap_b));
    assert_eq!(at_a, vec![(40001, 64, false)], "node A");
    assert_eq!(at_b.first(), Some(&(40070, 64, false)), "node B: {at_b:?}");
    assert!(at_b.contains(&(40071, 64, false)), "node B: {at_b:?}");
    assert!(
        at_b.iter().filter(|(_, _, f)| *f).count() >= 2,
        "later fragments at B: {at_b:?}"
    );
    assert!(
        at_b.iter()
            .all(|(p, ttl, _)| *ttl == 64 && *p != 40300 && *p != 40001),
        "{at_b:?}"
    );
    let per_node = gw.node_packets().unwrap();
    assert_eq!(per_node.get(&node_a), Some(&1), "{per_node:?}");
    assert!(gw.count(GwCounter::ForwardedFragment).unwrap() >= 2);
    assert_eq!(gw.count(GwCounter::DropNoRoute).unwrap(), 1, "port 40300");
    gw.detach();
}
