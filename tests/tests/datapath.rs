//! Namespace tests: real clients and servers on either side of a node running the `snat` agent
//! (see `tests::topo` for the topology). Each test builds its own uniquely named namespaces and
//! removes them on every path. Needs root and the release `snat` binary (`cargo xtask test`).

use std::{
    collections::HashSet,
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use tests::{
    agent::Agent,
    topo::{Topology, NAT_IP, ROUTER_UPLINK, SERVER},
    traffic::{
        fingerprint, payload, udp_ask, wait_for, IcmpWatch, LeakWatch, TcpClient, TcpServer,
        UdpServer,
    },
};

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 65536, extra)
}

fn in_default_range(p: u16) -> bool {
    (32768..=65535).contains(&p)
}

#[test]
fn tcp_udp_and_ping_leave_with_the_nat_ip_and_a_port_in_range() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &[]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let icmp = IcmpWatch::start(&topo.server);

    let (tcp_seen, udp_seen) = topo.pods[0].ns.run(|| {
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("TCP connect");
        assert_eq!(
            c.echo(b"hello through the NAT").unwrap(),
            b"hello through the NAT"
        );
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        (
            c.seen_as,
            udp_ask(&s, SocketAddrV4::new(SERVER, 5353)).expect("UDP answer"),
        )
    });
    assert_eq!(*tcp_seen.ip(), NAT_IP);
    assert!(in_default_range(tcp_seen.port()), "{tcp_seen}");
    assert_eq!(tcp.peers(), [tcp_seen]);
    assert_eq!(*udp_seen.ip(), NAT_IP);
    assert!(in_default_range(udp_seen.port()), "{udp_seen}");
    assert_eq!(udp.peers(), [udp_seen]);

    topo.pods[0]
        .ns
        .exec(&["ping", "-c", "2", "-W", "2", &SERVER.to_string()]);
    let pings = wait_for(Duration::from_secs(2), || {
        Some(icmp.seen()).filter(|p| p.len() >= 2)
    })
    .unwrap_or_else(|| icmp.seen());
    assert_eq!(pings.len(), 2, "{pings:?}");
    assert!(
        pings
            .iter()
            .all(|(src, id)| *src == NAT_IP && in_default_range(*id)),
        "{pings:?}"
    );

    let stats = agent.stats();
    assert_eq!(stats["mappings"]["tcp"], 1);
    assert_eq!(stats["mappings"]["udp"], 1);
    assert_eq!(stats["mappings"]["icmp"], 1);
    assert!(stats["counters"]["ingress"]["translated_icmp"].as_u64() >= Some(2));
    leaks.assert_no_leak();
}

#[test]
fn ten_megabytes_arrive_intact_with_offload_on_and_off() {
    let topo = Topology::new(1);
    let _agent = agent(&topo, &[]);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    for (offload, seed) in [(true, 1), (false, 2), (true, 3)] {
        topo.set_offload(offload);
        let data = payload(10 << 20, seed);
        let want = fingerprint(&data);
        let got = topo.pods[0].ns.run(move || {
            let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
                .expect("connect");
            fingerprint(&c.echo(&data).expect("echo"))
        });
        assert_eq!(got, want, "10 MB echo with offload {offload}");
    }
}

#[test]
fn two_thousand_concurrent_connections_get_distinct_mappings() {
    let topo = Topology::new(2);
    let agent = agent(&topo, &[]);
    let tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    // Both pods draw from the same 1,000 source ports: the NAT must separate them.
    for p in &topo.pods {
        p.ns.sysctl("net.ipv4.ip_local_port_range=40000 40999");
    }
    let handles: Vec<_> = topo
        .pods
        .iter()
        .map(|p| {
            p.ns.spawn(|| {
                (0..1000)
                    .map(|i| {
                        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(5))
                            .unwrap_or_else(|e| panic!("connection {i}: {e}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let clients: Vec<TcpClient> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    assert_eq!(clients.len(), 2000);
    let seen: HashSet<SocketAddrV4> = clients.iter().map(|c| c.seen_as).collect();
    assert_eq!(seen.len(), 2000, "every connection has its own NAT port");
    assert!(seen
        .iter()
        .all(|a| *a.ip() == NAT_IP && in_default_range(a.port())));
    assert_eq!(tcp.peers().into_iter().collect::<HashSet<_>>(), seen);
    assert_eq!(agent.mappings("tcp"), 2000);
    drop(clients);
}

#[test]
fn short_timeouts_release_ports() {
    let topo = Topology::new(1);
    let agent = agent(
        &topo,
        &[
            "--udp-timeout",
            "2s",
            "--tcp-fin-timeout",
            "2s",
            "--icmp-timeout",
            "2s",
            "--gc-interval",
            "200ms",
        ],
    );
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    topo.pods[0].ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp_ask(&s, SocketAddrV4::new(SERVER, 5353)).expect("UDP answer");
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect");
        c.echo(b"bye").unwrap();
        // Closing: FIN both ways (the echo server closes when it reads EOF).
    });
    topo.pods[0]
        .ns
        .exec(&["ping", "-c", "1", "-W", "2", &SERVER.to_string()]);
    assert_eq!(agent.mappings("udp"), 1);
    assert_eq!(agent.mappings("icmp"), 1);
    let released = wait_for(Duration::from_secs(10), || {
        let s = agent.stats();
        (s["mappings"]["udp"] == 0 && s["mappings"]["tcp"] == 0 && s["mappings"]["icmp"] == 0)
            .then_some(s)
    })
    .unwrap_or_else(|| panic!("mappings not released: {}", agent.stats()));
    assert_eq!(released["expired"]["udp"]["idle"], 1, "{released}");
    assert_eq!(released["expired"]["icmp"]["idle"], 1, "{released}");
    assert_eq!(released["expired"]["tcp"]["fin"], 1, "{released}");
}

#[test]
fn a_ten_port_range_refuses_the_eleventh_flow_and_recovers() {
    let topo = Topology::new(1);
    let agent = agent(
        &topo,
        &[
            "--port-range",
            "40000:40009",
            "--tcp-fin-timeout",
            "1s",
            "--gc-interval",
            "200ms",
        ],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let _a = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let _b = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8081));
    let to_a = SocketAddrV4::new(SERVER, 8080);
    let mut held = topo.pods[0].ns.run(move || {
        (0..10)
            .map(|i| {
                TcpClient::connect(to_a, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("flow {i}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    let ports: HashSet<u16> = held.iter().map(|c| c.seen_as.port()).collect();
    assert_eq!(ports, (40000..=40009).collect());

    // The eleventh flow to the same destination gets no port: its SYN is dropped and counted.
    let refused = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to_a, Duration::from_millis(500)).is_err());
    assert!(refused, "an eleventh flow must not get a port");
    assert!(agent.counter("egress", "drop_exhausted_tcp") >= 1);

    // Another destination port may reuse the same NAT ports.
    let other = topo.pods[0].ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8081), Duration::from_secs(3))
            .expect("other port")
            .seen_as
    });
    assert!((40000..=40009).contains(&other.port()));

    // Close one flow: once its FIN timeout passes, a new flow gets its port.
    held.pop();
    let again = wait_for(Duration::from_secs(10), || {
        topo.pods[0].ns.run(move || {
            TcpClient::connect(to_a, Duration::from_millis(500))
                .ok()
                .map(|c| c.seen_as)
        })
    })
    .expect("a new flow after one closed");
    assert!((40000..=40009).contains(&again.port()));
    drop(held);
    leaks.assert_no_leak();
}

#[test]
fn traceroute_shows_the_hop_behind_the_nat() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &[]);
    for mode in [&[][..], &["-I"][..]] {
        let mut args = vec!["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5"];
        args.extend_from_slice(mode);
        let server = SERVER.to_string();
        args.push(&server);
        let out = topo.pods[0].ns.exec(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let hops: Vec<&str> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        assert_eq!(
            hops,
            ["10.1.0.1", &ROUTER_UPLINK.to_string(), &server],
            "traceroute {mode:?}:\n{text}"
        );
    }
    assert!(agent.counter("ingress", "translated_icmp_error") >= 4);
}

#[test]
fn churn_leaves_no_mapping_and_no_port_behind() {
    let topo = Topology::new(2);
    let agent = agent(
        &topo,
        &[
            "--tcp-fin-timeout",
            "1s",
            "--udp-timeout",
            "1s",
            "--gc-interval",
            "200ms",
        ],
    );
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let handles: Vec<_> = topo
        .pods
        .iter()
        .map(|p| {
            p.ns.spawn(|| {
                for i in 0..1000 {
                    let mut c =
                        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(5))
                            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    c.echo(b"x").expect("echo");
                    if i % 10 == 0 {
                        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                        udp_ask(&s, SocketAddrV4::new(SERVER, 5353)).expect("UDP answer");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let created = agent.counter("alloc", "created_tcp");
    assert!(created >= 2000, "{created}");
    let rest = wait_for(Duration::from_secs(15), || {
        let s = agent.stats();
        let empty = ["tcp", "udp"]
            .iter()
            .all(|p| s["mappings"][p] == 0 && s["port_claims"][p] == 0);
        empty.then_some(s)
    })
    .unwrap_or_else(|| panic!("mappings or claims left after churn: {}", agent.stats()));
    assert!(
        rest["expired"]["tcp"]["fin"].as_u64() >= Some(2000),
        "{rest}"
    );
}

#[test]
fn each_pod_keeps_one_nat_ip_across_protocols_and_flows() {
    // Paired pooling (RFC 4787 REQ-2) over two NAT IPs, both on the uplink.
    let second = std::net::Ipv4Addr::new(198, 51, 100, 3);
    let topo = Topology::new(4);
    topo.node
        .ip(&["addr", "add", &format!("{second}/24"), "dev", &topo.uplink]);
    let agent = agent(
        &topo,
        &[
            "--nat-ip",
            &NAT_IP.to_string(),
            "--nat-ip",
            &second.to_string(),
        ],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let mut used = HashSet::new();
    for pod in &topo.pods {
        let seen = pod.ns.run(|| {
            let mut ips = Vec::new();
            for _ in 0..5 {
                ips.push(
                    *TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
                        .expect("connect")
                        .seen_as
                        .ip(),
                );
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                ips.push(
                    *udp_ask(&s, SocketAddrV4::new(SERVER, 5353))
                        .expect("UDP")
                        .ip(),
                );
            }
            ips
        });
        let distinct: HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), 1, "pod {} used {distinct:?}", pod.addr);
        used.insert(seen[0]);
    }
    assert_eq!(
        used,
        HashSet::from([NAT_IP, second]),
        "four pods should spread over both NAT IPs"
    );
    assert!(agent.mappings("tcp") >= 20);
    leaks.assert_no_leak();
}

/// `ethtool -K <dev> tx on|off` in `ns`.
fn tx_checksum(ns: &tests::netns::Netns, dev: &str, on: bool) {
    ns.exec(&["ethtool", "-K", dev, "tx", if on { "on" } else { "off" }]);
}

/// With `--ingress xdp`, replies with real checksums are translated in XDP, and replies whose
/// checksum is still pending offload (the server's stack left it to the hardware, as senders on
/// veths do) are left to TC, whose helpers keep them right: also when the node must then finish
/// the checksum itself (its link to the pod has no checksum offload). The data arrives intact
/// either way.
#[test]
fn xdp_translates_real_checksums_and_leaves_pending_ones_to_tc() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &["--ingress", "xdp"]);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let echo = |seed: u64| {
        let data = payload(1 << 20, seed);
        let want = fingerprint(&data);
        let got = topo.pods[0].ns.run(move || {
            let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
                .expect("connect");
            fingerprint(&c.echo(&data).expect("echo"))
        });
        assert_eq!(got, want, "1 MB echo {seed}");
    };
    let deferred = || agent.counter("xdp", "deferred_to_tc");
    let translated = || agent.counter("ingress", "translated_tcp");

    // No offload anywhere: every checksum is real, XDP translates every reply.
    topo.set_offload(false);
    echo(1);
    assert_eq!(deferred(), 0);
    let by_xdp = translated();
    assert!(by_xdp > 100, "{by_xdp}");

    // The server offloads, the node's link to the pod does not.
    tx_checksum(&topo.server, &format!("{}-sr", topo.prefix), true);
    tx_checksum(&topo.router, &format!("{}-rs", topo.prefix), true);
    tx_checksum(&topo.router, &topo.router_uplink, true);
    echo(2);
    assert!(deferred() > 100, "{}", deferred());
    assert!(translated() > by_xdp);
    assert_eq!(agent.json("status", &[])["ingress"], "xdp-native");
}
