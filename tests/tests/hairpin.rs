//! Hairpinning (`--hairpin on`, RFC 4787 REQ-9, RFC 5382 REQ-8): pods behind one node reach each
//! other's NAT endpoints, seen from the sender's NAT endpoint, in both directions and both
//! families; what a remote host would be filtered for is dropped here too; and without
//! `--hairpin on` nothing changes for a pod's packet to the NAT IP.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    netns::{veth, Netns},
    topo::{Topology, NAT_IP, NAT_IP6, POD_CIDR, POD_CIDR6, SERVER},
    traffic::{
        fingerprint, payload, tcp_connect_from, udp_ask, wait_for, TcpClient, TcpServer, UdpServer,
    },
};

const RANGE: &str = "40000:40999";

/// Starts the agent with hairpinning on the pods' interfaces of `topo` (`<prefix>-n*`) and the
/// `extra` flags.
fn hairpin_agent(topo: &Topology, extra: &[&str]) -> Agent {
    let pods = format!("{}-n*", topo.prefix);
    let mut args = vec![
        "--port-range",
        RANGE,
        "--hairpin",
        "on",
        "--pod-iface",
        &pods,
    ];
    args.extend_from_slice(extra);
    Agent::for_pods(topo, 4096, &args)
}

/// Connects from `local` to `to` on a thread in `ns` (see `tcp_connect_from`), so both sides of
/// a simultaneous open can be under way at once.
fn connect_in(
    ns: &Netns,
    local: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
) -> std::thread::JoinHandle<std::io::Result<TcpStream>> {
    let (local, to) = (local.into(), to.into());
    ns.spawn(move || tcp_connect_from(local, to, Duration::from_secs(10)))
}

/// Receives one datagram within `wait`: (payload, sender).
fn recv(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddrV4)> {
    match recv_any(sock, wait)? {
        (got, SocketAddr::V4(from)) => Some((got, from)),
        (_, from) => panic!("IPv6 sender {from}"),
    }
}

/// [`recv`] for an IPv6 socket.
fn recv6(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddrV6)> {
    match recv_any(sock, wait)? {
        (got, SocketAddr::V6(from)) => Some((got, from)),
        (_, from) => panic!("IPv4 sender {from}"),
    }
}

fn recv_any(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

/// Sends `data` from `a` to `b` over a connected pair and checks that it arrives whole.
fn stream_intact(mut a: TcpStream, mut b: TcpStream, data: Vec<u8>) {
    let expect = (data.len(), fingerprint(&data));
    let writer = std::thread::spawn(move || {
        a.write_all(&data).expect("a writes");
        a.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    b.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    b.read_to_end(&mut got).expect("b reads");
    writer.join().expect("a's thread");
    assert_eq!((got.len(), fingerprint(&got)), expect);
}

#[test]
fn udp_mappings_of_two_pods_reach_each_other_through_the_nat_ip() {
    let topo = Topology::new(2);
    let agent = hairpin_agent(&topo, &[]);
    let server = SocketAddrV4::new(SERVER, 3478);
    let _stun = UdpServer::start(&topo.server, server);
    let (a_addr, b_addr) = (topo.pods[0].addr, topo.pods[1].addr);
    let a = topo.pods[0]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(a_addr, 5000)).expect("bind a"));
    let b = topo.pods[1]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(b_addr, 6000)).expect("bind b"));
    // Each learns its NAT endpoint from the server, as from a STUN server.
    let a_nat = udp_ask(&a, server).expect("a's mapping");
    let b_nat = udp_ask(&b, server).expect("b's mapping");
    assert_eq!((*a_nat.ip(), *b_nat.ip()), (NAT_IP, NAT_IP));

    // A first: B never sent to the NAT IP, so its mapping filters A (as it would a remote).
    a.send_to(b"a opens", b_nat).expect("send");
    assert_eq!(recv(&b, Duration::from_millis(500)), None, "filtered");
    assert_eq!(agent.counter("hairpin", "drop_filtered"), 1);
    // B to A's endpoint: A's mapping sent to the NAT IP, so B gets through, seen from B's NAT
    // endpoint (A's packet opened the way: hole punching through one NAT).
    b.send_to(b"b to a", a_nat).expect("send");
    assert_eq!(
        recv(&a, Duration::from_secs(2)),
        Some((b"b to a".to_vec(), b_nat)),
        "A hears B from B's NAT endpoint"
    );
    a.send_to(b"a to b", b_nat).expect("send");
    assert_eq!(
        recv(&b, Duration::from_secs(2)),
        Some((b"a to b".to_vec(), a_nat)),
        "B hears A from A's NAT endpoint"
    );
    // A pod reaches its own mapping too (RFC 4787 REQ-9: "or its own").
    a.send_to(b"a to itself", a_nat).expect("send");
    assert_eq!(
        recv(&a, Duration::from_secs(2)),
        Some((b"a to itself".to_vec(), a_nat))
    );
    // Big datagrams, checksummed by the receiving stack, arrive whole.
    let big = payload(1400, 7);
    b.send_to(&big, a_nat).expect("send");
    let (got, from) = recv(&a, Duration::from_secs(2)).expect("big datagram");
    assert_eq!(
        (fingerprint(&got), got.len(), from),
        (fingerprint(&big), 1400, b_nat)
    );
    assert_eq!(agent.counter("hairpin", "delivered_udp"), 4);
    // The mappings towards the NAT IP are ordinary ones: the server still sees the same ports
    // (endpoint-independent mapping held through hairpinning).
    assert_eq!(udp_ask(&a, server).expect("a again"), a_nat);
    assert_eq!(agent.counter("hairpin", "drop_no_route"), 0);
    // A pod whose interface appears after the agent started is hairpinned once it is there;
    // A's mapping towards the NAT IP takes it from any port of it (address-dependent filter).
    let p = &topo.prefix;
    let late = Netns::new(&format!("{p}-pod9"));
    veth(&late, &format!("{p}-p9"), &topo.node, &format!("{p}-n9"));
    late.ip(&["addr", "add", "10.1.9.2/24", "dev", &format!("{p}-p9")]);
    late.ip(&["route", "add", "default", "via", "10.1.9.1"]);
    topo.node
        .ip(&["addr", "add", "10.1.9.1/24", "dev", &format!("{p}-n9")]);
    let l = late.run(|| UdpSocket::bind("10.1.9.2:7000").expect("bind late"));
    let heard = wait_for(Duration::from_secs(5), || {
        l.send_to(b"late", a_nat).ok()?;
        recv(&a, Duration::from_millis(200)).filter(|(got, _)| got == b"late")
    });
    let (_, from) = heard.expect("the late pod is hairpinned");
    assert_eq!(*from.ip(), NAT_IP);
    let status = agent.json("status", &[]);
    assert!(
        status["hairpin"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i == &format!("{p}-n9"))),
        "status lists the late interface: {}",
        status["hairpin"]
    );
    // The node's own services on the NAT IP, outside the range, stay the node's: untranslated.
    let node_service = SocketAddrV4::new(NAT_IP, 39999);
    let _node = UdpServer::start(&topo.node, node_service);
    assert_eq!(
        udp_ask(&a, node_service).expect("the node answers"),
        SocketAddrV4::new(a_addr, 5000)
    );
}

#[test]
fn tcp_simultaneous_open_between_two_pods_through_the_nat_ip() {
    let topo = Topology::new(2);
    let agent = hairpin_agent(&topo, &[]);
    // Ports inside the range are kept (docs/behaviour.md), so each side knows the other's NAT
    // endpoint before it connects: a simultaneous open, as TCP hole punching does it.
    let (a_port, b_port) = (40100, 40200);
    let (a_local, b_local) = (
        SocketAddrV4::new(topo.pods[0].addr, a_port),
        SocketAddrV4::new(topo.pods[1].addr, b_port),
    );
    let (a_nat, b_nat) = (
        SocketAddrV4::new(NAT_IP, a_port),
        SocketAddrV4::new(NAT_IP, b_port),
    );
    let a = connect_in(&topo.pods[0].ns, a_local, b_nat);
    std::thread::sleep(Duration::from_millis(200));
    let b = connect_in(&topo.pods[1].ns, b_local, a_nat);
    let mut a = a.join().expect("a's thread").expect("a connects");
    let mut b = b.join().expect("b's thread").expect("b connects");
    assert_eq!(a.peer_addr().expect("peer"), b_nat.into());
    // 1 MB each way, intact.
    let data = payload(1 << 20, 11);
    let expect = fingerprint(&data);
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        a.write_all(&sent).expect("a writes");
        a.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        a.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        a.read_to_end(&mut back).expect("a reads");
        back
    });
    b.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    b.read_to_end(&mut got).expect("b reads");
    assert_eq!((got.len(), fingerprint(&got)), (data.len(), expect));
    b.write_all(&got).expect("b writes back");
    b.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let back = writer.join().expect("a's thread");
    assert_eq!((back.len(), fingerprint(&back)), (data.len(), expect));
    // (Fewer packets than segments: the pods send GSO bursts, which pass whole.)
    assert!(agent.counter("hairpin", "delivered_tcp") > 10);
    // A's first SYN found B's endpoint closed to it (filtered), the rest went through.
    assert!(agent.counter("hairpin", "drop_filtered") >= 1);
    // One mapping each way, listed like any other.
    assert_eq!(agent.mappings("tcp"), 2);
}

/// With checksum offload off everywhere, every hop computes and verifies real checksums: a
/// hairpinned datagram or segment whose checksums were left wrong would be dropped.
#[test]
fn hairpinned_packets_carry_checksums_the_receiver_verifies() {
    let topo = Topology::new(2);
    topo.set_offload(false);
    let agent = hairpin_agent(&topo, &[]);
    let (a_addr, b_addr) = (topo.pods[0].addr, topo.pods[1].addr);
    // Ports in the range are kept: each side knows the other's NAT endpoint.
    let a = topo.pods[0]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(a_addr, 40300)).expect("bind a"));
    let b = topo.pods[1]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(b_addr, 40400)).expect("bind b"));
    let (a_nat, b_nat) = (
        SocketAddrV4::new(NAT_IP, 40300),
        SocketAddrV4::new(NAT_IP, 40400),
    );
    a.send_to(b"punch", b_nat).expect("send");
    let data = payload(1200, 3);
    b.send_to(&data, a_nat).expect("send");
    let (got, from) = recv(&a, Duration::from_secs(2)).expect("B's datagram");
    assert_eq!((fingerprint(&got), from), (fingerprint(&data), b_nat));
    // TCP both ways, 256 KB, in segments the receiver checks one by one.
    let a_tcp = connect_in(
        &topo.pods[0].ns,
        SocketAddrV4::new(a_addr, 40301),
        SocketAddrV4::new(NAT_IP, 40401),
    );
    std::thread::sleep(Duration::from_millis(200));
    let b_tcp = connect_in(
        &topo.pods[1].ns,
        SocketAddrV4::new(b_addr, 40401),
        SocketAddrV4::new(NAT_IP, 40301),
    );
    let a_tcp = a_tcp.join().expect("thread").expect("a connects");
    let b_tcp = b_tcp.join().expect("thread").expect("b connects");
    stream_intact(a_tcp, b_tcp, payload(256 << 10, 5));
    // Without offload there are no GSO bursts: one count per segment.
    assert!(agent.counter("hairpin", "delivered_tcp") > 150);
}

/// NAT66 on: pod A's IPv6 UDP and TCP mappings reached from pod B through the IPv6 NAT IP, seen
/// from B's NAT endpoint (and a pod's own), filtered like IPv4's; IPv4 hairpinning goes on
/// beside it. Checksum offload is off, so every checksum the translation wrote is verified.
#[test]
fn ipv6_mappings_of_two_pods_reach_each_other_through_the_nat_ip6() {
    let topo = Topology::new_dual_stack(2);
    topo.set_offload(false);
    let agent = hairpin_agent(&topo, &["--internal", POD_CIDR6]);
    let (a6, b6) = (topo.pods[0].addr6(), topo.pods[1].addr6());
    let at = |ip, port| SocketAddrV6::new(ip, port, 0, 0);
    // Ports in the range are kept: each side knows the other's NAT endpoint.
    let a = topo.pods[0]
        .ns
        .run(move || UdpSocket::bind(at(a6, 40300)).expect("bind a"));
    let b = topo.pods[1]
        .ns
        .run(move || UdpSocket::bind(at(b6, 40400)).expect("bind b"));
    let (a_nat, b_nat) = (at(NAT_IP6, 40300), at(NAT_IP6, 40400));
    a.send_to(b"a opens", b_nat).expect("send");
    assert_eq!(recv6(&b, Duration::from_millis(500)), None, "filtered");
    assert_eq!(agent.counter("hairpin", "drop_filtered"), 1);
    b.send_to(b"b to a", a_nat).expect("send");
    assert_eq!(
        recv6(&a, Duration::from_secs(2)),
        Some((b"b to a".to_vec(), b_nat)),
        "A hears B from B's NAT endpoint"
    );
    a.send_to(b"a to b", b_nat).expect("send");
    assert_eq!(
        recv6(&b, Duration::from_secs(2)),
        Some((b"a to b".to_vec(), a_nat)),
        "B hears A from A's NAT endpoint"
    );
    a.send_to(b"a to itself", a_nat).expect("send");
    assert_eq!(
        recv6(&a, Duration::from_secs(2)),
        Some((b"a to itself".to_vec(), a_nat))
    );
    let big = payload(1400, 7);
    b.send_to(&big, a_nat).expect("send");
    let (got, from) = recv6(&a, Duration::from_secs(2)).expect("big datagram");
    assert_eq!(
        (fingerprint(&got), got.len(), from),
        (fingerprint(&big), 1400, b_nat)
    );
    assert_eq!(agent.counter("hairpin", "delivered_udp"), 4);

    // TCP: a simultaneous open between the two NAT endpoints, 256 KB across, intact.
    let a_tcp = connect_in(&topo.pods[0].ns, at(a6, 40301), at(NAT_IP6, 40401));
    std::thread::sleep(Duration::from_millis(200));
    let b_tcp = connect_in(&topo.pods[1].ns, at(b6, 40401), at(NAT_IP6, 40301));
    let a_tcp = a_tcp.join().expect("thread").expect("a connects");
    let b_tcp = b_tcp.join().expect("thread").expect("b connects");
    assert_eq!(a_tcp.peer_addr().expect("peer"), at(NAT_IP6, 40401).into());
    assert_eq!(b_tcp.peer_addr().expect("peer"), at(NAT_IP6, 40301).into());
    stream_intact(a_tcp, b_tcp, payload(256 << 10, 5));
    assert!(agent.counter("hairpin", "delivered_tcp") > 150);
    assert_eq!(agent.counter("hairpin", "drop_no_route"), 0);

    // IPv4 beside it, from the same pods.
    let (a4, b4) = (topo.pods[0].addr, topo.pods[1].addr);
    let a = topo.pods[0]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(a4, 40500)).expect("bind a"));
    let b = topo.pods[1]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(b4, 40600)).expect("bind b"));
    let (a_nat, b_nat) = (
        SocketAddrV4::new(NAT_IP, 40500),
        SocketAddrV4::new(NAT_IP, 40600),
    );
    a.send_to(b"punch", b_nat).expect("send");
    b.send_to(b"b to a over IPv4", a_nat).expect("send");
    assert_eq!(
        recv(&a, Duration::from_secs(2)),
        Some((b"b to a over IPv4".to_vec(), b_nat))
    );
}

/// A hairpin flow is refused like any other (here `--max-ports-per-source 1`), and with the
/// default `--on-exhaustion reject` the pod's connect fails at once: the RST goes straight back
/// out of its own interface.
#[test]
fn a_refused_hairpin_connect_is_answered_on_the_pods_interface() {
    let topo = Topology::new(1);
    let agent = hairpin_agent(&topo, &["--max-ports-per-source", "1"]);
    let server = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&topo.server, server);
    let addr = topo.pods[0].addr;
    let (kept, refused) = topo.pods[0].ns.run(move || {
        let kept = TcpClient::connect(server, Duration::from_secs(5)).expect("first flow");
        let started = Instant::now();
        let refused = tcp_connect_from(
            SocketAddrV4::new(addr, 5555),
            SocketAddrV4::new(NAT_IP, 40999),
            Duration::from_secs(5),
        )
        .map(|_| ())
        .map_err(|e| (e.kind(), started.elapsed()));
        (kept, refused)
    });
    let (kind, took) = refused.expect_err("the source's one port is taken");
    assert_eq!(kind, std::io::ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "answered at once ({took:?})");
    assert_eq!(agent.counter("egress", "drop_source_cap"), 1);
    assert!(agent.counter("reject", "rst_sent") >= 1);
    drop(kept);
}

#[test]
fn without_hairpin_a_pods_packet_to_the_nat_ip_is_the_nodes() {
    let topo = Topology::new(1);
    let agent = Agent::for_pods(&topo, 4096, &["--port-range", RANGE]);
    // A server on the node's NAT IP, inside the range: the pod reaches the node itself.
    let node_server = SocketAddrV4::new(NAT_IP, 40500);
    let _node = UdpServer::start(&topo.node, node_server);
    let addr = topo.pods[0].addr;
    let pod = topo.pods[0]
        .ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(addr, 5000)).expect("bind"));
    assert_eq!(
        udp_ask(&pod, node_server).expect("the node answers"),
        SocketAddrV4::new(addr, 5000),
        "untranslated: the node sees the pod's own address"
    );
    assert_eq!(agent.counter("hairpin", "delivered_udp"), 0);
}

#[test]
fn hairpin_flags_are_checked_before_anything_is_attached() {
    let topo = Topology::new(1);
    let pods = format!("{}-n*", topo.prefix);
    let uplink_prefix = format!("{}-u*", topo.prefix);
    for (args, says) in [
        (vec!["--hairpin", "on"], "--hairpin on needs --pod-iface"),
        (
            vec!["--pod-iface", pods.as_str()],
            "is only used with --hairpin on",
        ),
        (
            vec!["--hairpin", "on", "--pod-iface", uplink_prefix.as_str()],
            "matches the uplink",
        ),
        (
            vec!["--hairpin", "on", "--pod-iface", "a*b"],
            "give an interface name",
        ),
        (
            vec![
                "--hairpin",
                "on",
                "--pod-iface",
                pods.as_str(),
                "--attach",
                "clsact",
            ],
            "needs TCX links",
        ),
    ] {
        let snat = tests::agent::snat_bin();
        let mut cmd = vec![
            snat.to_str().expect("utf-8"),
            "run",
            "--iface",
            &topo.uplink,
            "--internal",
            POD_CIDR,
        ];
        cmd.extend(args.iter().copied());
        let out = topo.node.exec_unchecked(&cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
