//! The datapath's correctness fixes (issue 12 and the RST part of issue 11), shown with real
//! traffic: big pings, ICMP errors the node makes about pods' replies, ICMP errors a pod makes
//! about another pod's flow, the node's own connected UDP sockets and ping identifiers, replies
//! while mappings are released and their map elements recycled, remote RSTs and FINs checked
//! against the pod's window, and a full destination refused without a search.
//!
//! Each test says what it showed on the datapath before these fixes (commit ff8c671).

use std::{
    collections::VecDeque,
    io::{self, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tests::{
    agent::Agent,
    forge,
    topo::{Topology, NAT_IP, SERVER},
    traffic::{
        payload, ping_once, ping_socket, recv_icmp_error, set_int_opt, udp_ask, wait_for, Capture,
        IcmpWatch, LeakWatch, TcpClient, TcpServer, UdpEcho, UdpServer,
    },
};

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 65536, extra)
}

/// The first bytes of a captured IPv4 packet.
#[derive(Clone, Copy)]
struct Ip<'a>(&'a [u8]);

impl<'a> Ip<'a> {
    fn addr(&self, at: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3])
    }

    fn src(&self) -> Ipv4Addr {
        self.addr(12)
    }

    fn dst(&self) -> Ipv4Addr {
        self.addr(16)
    }

    fn proto(&self) -> u8 {
        self.0[9]
    }

    /// What follows the IPv4 header (as much as was captured).
    fn l4(&self) -> &'a [u8] {
        let ihl = usize::from(self.0[0] & 0x0f) * 4;
        &self.0[ihl.min(self.0.len())..]
    }

    /// TCP or UDP source and destination ports.
    fn ports(&self) -> Option<(u16, u16)> {
        let l4 = self.l4();
        (l4.len() >= 4).then(|| {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        })
    }

    /// TCP flags, sequence and acknowledgement numbers.
    fn tcp(&self) -> Option<(u8, u32, u32)> {
        let l4 = self.l4();
        (self.proto() == 6 && l4.len() >= 14).then(|| {
            (
                l4[13],
                u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
            )
        })
    }

    /// An ICMP error: its type, code, the 16 bits of a "fragmentation needed"'s next-hop MTU, and
    /// the packet it quotes.
    fn icmp_error(&self) -> Option<(u8, u8, u16, Ip<'a>)> {
        let l4 = self.l4();
        (self.proto() == 1 && l4.len() >= 8 + 28 && matches!(l4[0], 3 | 11 | 12)).then(|| {
            (
                l4[0],
                l4[1],
                u16::from_be_bytes([l4[6], l4[7]]),
                Ip(&l4[8..]),
            )
        })
    }
}

/// An ICMP error as captured.
#[derive(Clone, Copy, Debug)]
struct SeenError {
    /// Who sent it.
    src: Ipv4Addr,
    /// The next-hop MTU field of a "fragmentation needed".
    mtu: u16,
    /// The quoted packet's source, destination, protocol and ports.
    quoted: (Ipv4Addr, Ipv4Addr, u8),
    ports: Option<(u16, u16)>,
}

/// The ICMP errors of type `icmp_type` and code `code` among `packets`.
fn icmp_errors(packets: &[Vec<u8>], icmp_type: u8, code: u8) -> Vec<SeenError> {
    packets
        .iter()
        .filter_map(|p| {
            let ip = Ip(p);
            let (t, c, mtu, q) = ip.icmp_error()?;
            (t == icmp_type && c == code).then(|| SeenError {
                src: ip.src(),
                mtu,
                quoted: (q.src(), q.dst(), q.proto()),
                ports: q.ports(),
            })
        })
        .collect()
}

fn counter_delta(agent: &Agent, group: &str, name: &str, before: u64) -> u64 {
    agent.counter(group, name) - before
}

/// Waits up to `timeout` until counter `group.name` has grown by at least `by` from `before`;
/// returns the growth.
fn grows(agent: &Agent, group: &str, name: &str, before: u64, by: u64, timeout: Duration) -> u64 {
    wait_for(timeout, || {
        let d = counter_delta(agent, group, name, before);
        (d >= by).then_some(d)
    })
    .unwrap_or_else(|| counter_delta(agent, group, name, before))
}

#[test]
fn big_pings_get_every_reply() {
    // ff8c671 translated the first fragment of an echo reply but passed its later fragments on to
    // the node itself (they name no identifier): the pod never reassembled a reply, 100 % loss.
    let topo = Topology::new(1);
    let agent = agent(&topo, &[]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let before = agent.counter("ingress", "translated_fragment");
    for size in ["3000", "8000"] {
        let out = topo.pods[0].ns.exec_unchecked(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            size,
            &SERVER.to_string(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("3 packets transmitted, 3 received"),
            "ping -s {size}: every reply must arrive:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Later fragments of the replies: 2 for each 3,008-byte message, 5 for each 8,008-byte one.
    let later = counter_delta(&agent, "ingress", "translated_fragment", before);
    assert!(
        later >= 3 * 2 + 3 * 5,
        "{later} later reply fragments translated"
    );
    leaks.assert_no_leak();
}

#[test]
fn the_nodes_icmp_errors_quote_the_nat_endpoint_and_no_pod_address() {
    // ff8c671 passed the node's own ICMP errors untouched: each one quoted the reply as the node
    // forwarded it, to 10.1.0.2 (the leak watch sees it), the server's socket never matched it
    // (no PMTU discovery through the NAT), and an error about an unmapped pod address left too.
    let topo = Topology::new(1);
    let pod = &topo.pods[0];
    pod.ns.ip(&["link", "set", &pod.iface, "mtu", "1400"]);
    topo.node
        .ip(&["link", "set", &pod.node_iface, "mtu", "1400"]);
    // Every error this test provokes must leave the node: no per-destination rate limit.
    topo.node.sysctl("net.ipv4.icmp_ratelimit=0");
    let agent = agent(&topo, &[]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let out = Capture::start(&topo.router, &topo.router_uplink);

    // A UDP flow from the pod; the server answers on a socket connected to the NAT endpoint it
    // sees, so only an error quoting exactly that endpoint reaches the socket.
    let server = topo
        .server
        .run(|| UdpSocket::bind((SERVER, 6000)).expect("bind"));
    let pod_addr = pod.addr;
    let pod_sock = pod
        .ns
        .run(move || UdpSocket::bind((pod_addr, 41000)).expect("bind"));
    pod_sock.send_to(b"hello", (SERVER, 6000)).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let (_, peer) = server
        .recv_from(&mut [0u8; 64])
        .expect("the pod's datagram");
    let SocketAddr::V4(nat) = peer else {
        panic!("{peer}")
    };
    assert_eq!(*nat.ip(), NAT_IP);
    server.connect(nat).unwrap();
    set_int_opt(&server, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
    set_int_opt(
        &server,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    );
    let translated = agent.counter("egress", "translated_node_icmp_error");
    let no_mapping = agent.counter("egress", "drop_node_icmp_error_no_mapping");
    let quotes_nat = |icmp_type: u8, code: u8| {
        let seen = icmp_errors(&out.packets(), icmp_type, code);
        assert!(
            seen.iter().any(|e| {
                e.src == NAT_IP
                    && e.quoted == (SERVER, NAT_IP, 17)
                    && e.ports == Some((6000, nat.port()))
            }),
            "ICMP {icmp_type}/{code} quoting {SERVER}:6000 -> {nat} expected on the internet \
             side, saw {seen:?}"
        );
        seen
    };

    // Fragmentation needed: 1,500 bytes with DF do not fit the pod's 1,400-byte link.
    server
        .send(&[0x5a; 1472])
        .expect("1,500 bytes fit the server's path");
    let err = recv_icmp_error(&server, Duration::from_secs(3))
        .expect("the server's socket gets the node's 'fragmentation needed'");
    assert_eq!(
        (err.icmp_type, err.icmp_code, err.info, err.offender),
        (3, 4, 1400, NAT_IP),
        "{err:?}"
    );
    let seen = quotes_nat(3, 4);
    assert!(seen.iter().all(|e| e.mtu == 1400), "next-hop MTU: {seen:?}");

    // Time exceeded: TTL 2 leaves 1 after the router, and the node may not forward that.
    set_int_opt(&server, libc::IPPROTO_IP, libc::IP_TTL, 2);
    server.send(b"short-lived").unwrap();
    let err = recv_icmp_error(&server, Duration::from_secs(3))
        .expect("the server's socket gets the node's 'time exceeded'");
    assert_eq!(
        (err.icmp_type, err.icmp_code, err.offender),
        (11, 0, NAT_IP),
        "{err:?}"
    );
    quotes_nat(11, 0);
    set_int_opt(&server, libc::IPPROTO_IP, libc::IP_TTL, 64);

    // An error about a packet to a pod address no mapping explains is dropped: a datagram from
    // the internet side straight to 10.1.0.2 with TTL 1.
    forge::send(
        &topo.router,
        &topo.router_uplink,
        &forge::mac(&topo.node, &topo.uplink),
        "udp",
        &json!({"src": SERVER.to_string(), "dst": pod_addr.to_string(), "sport": 7000, "dport": 7001, "ttl": 1}),
    );
    assert_eq!(
        grows(
            &agent,
            "egress",
            "drop_node_icmp_error_no_mapping",
            no_mapping,
            1,
            Duration::from_secs(3)
        ),
        1
    );
    let unmapped: Vec<_> = icmp_errors(&out.packets(), 11, 0)
        .into_iter()
        .filter(|e| e.ports.is_some_and(|(sport, _)| sport == 7000))
        .collect();
    assert!(
        unmapped.is_empty(),
        "an error about an unmapped pod left: {unmapped:?}"
    );

    // Host unreachable: the pod's address is gone, so the node's ARP for it fails.
    pod.ns
        .ip(&["addr", "del", &format!("{pod_addr}/24"), "dev", &pod.iface]);
    for knob in ["mcast_solicit=1", "retrans_time_ms=200"] {
        topo.node
            .sysctl(&format!("net.ipv4.neigh.{}.{knob}", pod.node_iface));
    }
    topo.node.ip(&["neigh", "flush", "dev", &pod.node_iface]);
    server.send(b"anyone there?").unwrap();
    let err = recv_icmp_error(&server, Duration::from_secs(5))
        .expect("the server's socket gets the node's 'host unreachable'");
    assert_eq!(
        (err.icmp_type, err.icmp_code, err.offender),
        (3, 1, NAT_IP),
        "{err:?}"
    );
    quotes_nat(3, 1);

    let d = counter_delta(&agent, "egress", "translated_node_icmp_error", translated);
    assert!(
        d >= 3,
        "{d} node ICMP errors translated, expected one per case"
    );
    drop(pod_sock);
    leaks.assert_no_leak();
}

#[test]
fn a_pod_cannot_send_icmp_errors_about_another_pods_flow() {
    // ff8c671 translated any pod's ICMP error that quoted a known flow: pod B's "fragmentation
    // needed, MTU 68" about pod A's connection reached the server from the NAT IP, quoting pod A's
    // NAT endpoint, and the server cut its path MTU to pod A to 552 bytes.
    let topo = Topology::new(2);
    let agent = agent(&topo, &[]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    // Pod A's segments as they reach the node (a capture sees what arrives on an interface).
    let from_a = Capture::start(&topo.node, &a.node_iface);
    let mut conn = a.ns.run(|| {
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("pod A connects");
        assert_eq!(c.echo(b"hello").unwrap(), b"hello");
        c
    });
    let a_port = conn.stream.local_addr().unwrap().port();
    // The server's next sequence number, as pod A last acknowledged it: with it the quote passes
    // the server's own check (RFC 5927), so only snat stands between pod B and pod A's flow.
    let seq = from_a
        .packets()
        .iter()
        .rev()
        .map(|p| Ip(p))
        .filter(|ip| ip.src() == a.addr && ip.ports().is_some_and(|(s, _)| s == a_port))
        .find_map(|ip| ip.tcp().filter(|&(flags, ..)| flags & 0x10 != 0))
        .map(|(_, _, ack)| ack)
        .expect("pod A's ACK captured");

    let out = Capture::start(&topo.router, &topo.router_uplink);
    let before = agent.counter("egress", "drop_icmp_error_foreign");
    forge::send(
        &b.ns,
        &b.iface,
        &forge::mac(&topo.node, &b.node_iface),
        "frag_needed",
        &json!({
            "src": b.addr.to_string(), "dst": SERVER.to_string(), "mtu": 68,
            "quote": {"src": SERVER.to_string(), "dst": a.addr.to_string(), "proto": "tcp",
                      "sport": 8080, "dport": a_port, "seq": seq},
        }),
    );
    // What arrives at the router and the server first (the capture waits a moment), then why.
    let left = icmp_errors(&out.packets(), 3, 4);
    assert!(left.is_empty(), "pod B's error left the node: {left:?}");
    let route = topo
        .server
        .exec(&["ip", "route", "get", &NAT_IP.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        !route.contains("mtu"),
        "the server lowered its path MTU to the NAT IP:\n{route}"
    );
    let data = payload(256 * 1024, 5);
    assert_eq!(
        conn.echo(&data).expect("pod A's connection still works"),
        data
    );
    assert_eq!(
        grows(
            &agent,
            "egress",
            "drop_icmp_error_foreign",
            before,
            1,
            Duration::from_secs(3)
        ),
        1
    );
    leaks.assert_no_leak();
}

#[test]
fn a_connected_udp_socket_of_the_node_keeps_its_port() {
    // ff8c671 looked for the node's sockets with remote port 0, which misses a connected UDP
    // socket: the pod was given port P, and the server's replies to the node's socket went to the
    // pod instead (the node's next question timed out).
    const P: u16 = 40123;
    let topo = Topology::new(1);
    let to = SocketAddrV4::new(SERVER, 5353);
    let _udp = UdpServer::start(&topo.server, to);
    let node_sock = topo.node.run(move || {
        let s = UdpSocket::bind((NAT_IP, P)).expect("bind");
        s.connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    // The NAT IP is the node's own uplink address and the range the default, shared with the
    // node's ephemeral ports.
    let agent = agent(&topo, &[]);
    let ask = |s: &UdpSocket| -> io::Result<String> {
        s.send(b"who am i")?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let me = format!("{NAT_IP}:{P}");
    assert_eq!(ask(&node_sock).expect("the node's question"), me);

    let pod_addr = topo.pods[0].addr;
    let seen = topo.pods[0].ns.run(move || {
        let s = UdpSocket::bind((pod_addr, P)).expect("bind");
        udp_ask(&s, to).expect("the pod's answer")
    });
    assert_eq!(*seen.ip(), NAT_IP);
    assert_ne!(
        seen.port(),
        P,
        "the pod was given the port of the node's connected socket"
    );
    for i in 0..3 {
        assert_eq!(
            ask(&node_sock)
                .unwrap_or_else(|e| panic!("the node's question {i} after the pod's flow: {e}")),
            me
        );
    }
    assert!(agent.counter("alloc", "host_port_skipped") >= 1);
}

#[test]
fn the_nodes_own_pings_keep_their_identifier() {
    // ff8c671 did not know the node's ping identifiers: the pod kept identifier X, and from the
    // pod's first ping on, the replies to the node's pings went to the pod.
    const X: u16 = 45678;
    const ROUNDS: u16 = 10;
    let topo = Topology::new(1);
    for ns in [&topo.node, &topo.pods[0].ns] {
        ns.sysctl("net.ipv4.ping_group_range=0 2147483647");
    }
    let agent = agent(&topo, &[]);
    let watch = IcmpWatch::start(&topo.server);
    let node_ping = topo.node.run(|| ping_socket(X, Duration::from_secs(2)));
    let pod_ping = topo.pods[0]
        .ns
        .run(|| ping_socket(X, Duration::from_secs(2)));
    for seq in 1..=ROUNDS {
        assert_eq!(
            ping_once(&node_ping, SERVER, seq),
            Some(X),
            "the node's ping {seq}"
        );
        assert_eq!(
            ping_once(&pod_ping, SERVER, seq),
            Some(X),
            "the pod's ping {seq}"
        );
    }
    let n = usize::from(ROUNDS);
    let seen = wait_for(Duration::from_secs(2), || {
        Some(watch.seen()).filter(|s| s.len() >= 2 * n)
    })
    .unwrap_or_else(|| watch.seen());
    assert_eq!(seen.len(), 2 * n, "{seen:?}");
    assert!(seen.iter().all(|&(src, _)| src == NAT_IP), "{seen:?}");
    let node: Vec<_> = seen.iter().filter(|&&(_, id)| id == X).collect();
    let pod: Vec<_> = seen.iter().filter(|&&(_, id)| id != X).collect();
    assert_eq!(node.len(), n, "the node's echoes keep {X}: {seen:?}");
    assert_eq!(
        pod.len(),
        n,
        "the pod's echoes get another identifier: {seen:?}"
    );
    assert!(pod.iter().all(|e| e.1 == pod[0].1), "{seen:?}");
    assert_eq!(agent.mappings("icmp"), 1);
}

/// What one pod saw in [`pod_traffic`].
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Immediate echoes back on the socket that sent them.
    replies: u64,
    /// Late copies on the socket that sent them, or on another socket of the same pod whose flow
    /// got the same NAT port after the first one's mapping was released (the NAT cannot tell).
    late: u64,
    late_elsewhere: u64,
    /// New flows refused (no port towards the pod's server at that moment).
    refused: u64,
    /// Datagrams that must not have reached this socket, and the first few of them.
    wrong: u64,
    examples: Vec<String>,
}

impl Tally {
    fn check(&mut self, id: usize, tag: &str, got: &[u8], from: SocketAddr, server: SocketAddrV4) {
        let got = String::from_utf8_lossy(got);
        if from == SocketAddr::V4(server) && got == tag {
            self.replies += 1;
        } else if from == SocketAddr::V4(server) && got.strip_prefix("late ") == Some(tag) {
            self.late += 1;
        } else if from == SocketAddr::V4(server)
            && got
                .strip_prefix("late ")
                .and_then(|t| t.split_once(':'))
                .is_some_and(|(pod, _)| pod == id.to_string())
        {
            self.late_elsewhere += 1;
        } else {
            self.wrong += 1;
            if self.examples.len() < 10 {
                self.examples
                    .push(format!("socket {tag} got {got:?} from {from}"));
            }
        }
    }
}

/// Pod `id` (address `addr`) sends one datagram tagged `id:n` from each of up to 1,500 fresh
/// source ports (20000 + n, never reused) to its own echo server `server`, one every 8 ms for at
/// most 12 s, and checks everything that arrives on its last 160 sockets (1.3 s of them, so late
/// copies find theirs open).
fn pod_traffic(id: usize, addr: Ipv4Addr, server: SocketAddrV4) -> Tally {
    let start = Instant::now();
    let mut t = Tally::default();
    let mut open: VecDeque<(UdpSocket, String)> = VecDeque::new();
    let mut buf = [0u8; 256];
    for n in 0..1500u16 {
        if start.elapsed() > Duration::from_secs(12) {
            break;
        }
        let tag = format!("{id}:{n}");
        let s = UdpSocket::bind((addr, 20000 + n)).expect("bind");
        // A refused flow's ICMP unreachable (code 13) ends the wait at once.
        set_int_opt(&s, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.send_to(tag.as_bytes(), server).expect("send");
        t.sent += 1;
        loop {
            match s.recv_from(&mut buf) {
                Ok((len, from)) => {
                    let replies = t.replies;
                    t.check(id, &tag, &buf[..len], from, server);
                    if t.replies > replies {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) => {
                    t.refused += 1;
                    break;
                }
                Err(_) => break,
            }
        }
        s.set_nonblocking(true).unwrap();
        open.push_back((s, tag));
        if open.len() > 160 {
            open.pop_front();
        }
        for (s, tag) in &open {
            loop {
                match s.recv_from(&mut buf) {
                    Ok((len, from)) => t.check(id, tag, &buf[..len], from, server),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // A refusal reported late, or a port unreachable: nothing arrived.
                    Err(_) => {}
                }
            }
        }
        let next = start + Duration::from_millis(8) * u32::from(n + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    t
}

#[test]
fn no_pod_ever_receives_another_pods_reply() {
    // Six pods, each with its own server address, so a NAT port is in use by several pods at once
    // (UDP ports are reused per remote address) and any reply that reaches a pod from another
    // pod's server, or with another pod's tag, was misdelivered. Mappings live 1 s, the sweep runs
    // every 100 ms, and each server echoes every datagram at once and once more 0.9–1.1 s later,
    // just as its mapping is released and its map elements go to other flows. On ff8c671 a reply
    // whose reverse element was recycled between the lookup and the read of its fields went to
    // the new owner (a race: this test may pass there; test_run.rs pins the fix down exactly).
    const PODS: usize = 6;
    let topo = Topology::new(PODS);
    let agent = agent(
        &topo,
        &[
            "--udp-timeout",
            "1s",
            "--gc-interval",
            "100ms",
            "--port-range",
            "40000:40199",
        ],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let sr = format!("{}-sr", topo.prefix);
    let servers: Vec<SocketAddrV4> = (0..PODS)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 20 + i as u8), 7000))
        .collect();
    for s in &servers {
        topo.server
            .ip(&["addr", "add", &format!("{}/24", s.ip()), "dev", &sr]);
    }
    let echo = UdpEcho::start(
        &topo.server,
        &servers,
        Some((Duration::from_millis(900), Duration::from_millis(1100))),
    );
    let handles: Vec<_> = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (addr, server) = (p.addr, servers[i]);
            p.ns.spawn(move || pod_traffic(i, addr, server))
        })
        .collect();
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().expect("pod traffic"))
        .collect();
    let wrong: u64 = tallies.iter().map(|t| t.wrong).sum();
    assert_eq!(wrong, 0, "misdelivered: {tallies:#?}");
    let replies: u64 = tallies.iter().map(|t| t.replies).sum();
    let late: u64 = tallies.iter().map(|t| t.late + t.late_elsewhere).sum();
    assert!(replies >= 3000, "{replies} replies: {tallies:#?}");
    assert!(
        late >= 1000,
        "{late} late copies arrived (of {:?}): {tallies:#?}",
        echo.counts()
    );
    let expired = wait_for(Duration::from_secs(5), || {
        let s = agent.stats();
        (s["mappings"]["udp"] == 0).then_some(s)
    })
    .unwrap_or_else(|| agent.stats());
    assert!(
        expired["expired"]["udp"]["idle"].as_u64() >= Some(3000),
        "{expired}"
    );
    eprintln!(
        "replies {replies}, late {late}, refused {}, recycled entries seen {}",
        tallies.iter().map(|t| t.refused).sum::<u64>(),
        expired["counters"]["alloc"]["recycled_entry"]
    );
    leaks.assert_no_leak();
}

/// The mapping of the TCP connection from `internal` (`snat conns --json`).
fn conn_row(agent: &Agent, internal: SocketAddr) -> Option<Value> {
    let all = agent.json("conns", &["--proto", "tcp"]);
    all["conns"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["internal"] == internal.to_string())
        .cloned()
}

/// Asserts the connection from `internal` is established with its long idle timeout.
fn assert_established(agent: &Agent, internal: SocketAddr, after: &str) {
    let row = conn_row(agent, internal).unwrap_or_else(|| panic!("no mapping for {internal}"));
    assert_eq!(row["state"], "established", "after {after}: {row}");
    assert!(
        row["expires_in_secs"].as_u64() > Some(7000),
        "after {after}: {row}"
    );
}

/// Aborts a TCP socket: SO_LINGER 0, then close, sends a RST.
fn abort(stream: std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on our socket with a valid linger of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
}

/// Waits until the mapping of `internal` shows `reset`, then until it is released.
fn reset_then_released(agent: &Agent, internal: SocketAddr, what: &str) {
    wait_for(Duration::from_secs(2), || {
        conn_row(agent, internal).filter(|r| r["state"] == "reset")
    })
    .unwrap_or_else(|| panic!("{what}: not reset: {:?}", conn_row(agent, internal)));
    wait_for(Duration::from_secs(6), || {
        conn_row(agent, internal).is_none().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: not released 2 s after the RST: {:?}",
            conn_row(agent, internal)
        )
    });
}

#[test]
fn remote_rsts_and_fins_count_only_inside_the_pods_window() {
    // ff8c671 took any remote RST or FIN on a mapping at its word: a blind RST with a guessed NAT
    // port turned a live connection's mapping to `reset` (released 15 s later, the connection
    // then broken), a blind FIN to `transitory`. The in-window RST and the pod's own RST reset the
    // mapping there too; they guard that the window check does not miss real ones.
    let topo = Topology::new(1);
    let agent = agent(
        &topo,
        &["--tcp-rst-timeout", "2s", "--gc-interval", "100ms"],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let _echo = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let pod = &topo.pods[0];
    let out = Capture::start(&topo.router, &topo.router_uplink);
    let at_pod = Capture::start(&pod.ns, &pod.iface);
    let mut conn = pod.ns.run(|| {
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect");
        assert_eq!(c.echo(b"before").unwrap(), b"before");
        c
    });
    let internal = conn.stream.local_addr().unwrap();
    let nat = conn.seen_as;
    assert_established(&agent, internal, "the handshake");
    let uplink_mac = forge::mac(&topo.node, &topo.uplink);

    for (flags, counter) in [("R", "rst_out_of_window"), ("FA", "fin_out_of_window")] {
        // The pod's latest segment as it left: its ACK is the left edge of its window.
        let (_, pod_seq, pod_ack) = out
            .packets()
            .iter()
            .rev()
            .map(|p| Ip(p))
            .filter(|ip| ip.src() == NAT_IP && ip.ports() == Some((nat.port(), 8080)))
            .find_map(|ip| ip.tcp())
            .expect("the pod's segments captured");
        let before = agent.counter("ingress", counter);
        forge::send(
            &topo.router,
            &topo.router_uplink,
            &uplink_mac,
            "tcp",
            &json!({
                "src": SERVER.to_string(), "dst": NAT_IP.to_string(), "sport": 8080,
                "dport": nat.port(), "flags": flags,
                "seq": pod_ack.wrapping_add(0x8000_0000), "ack": pod_seq,
            }),
        );
        let flag_bit = if flags == "R" { 0x04 } else { 0x01 };
        let arrived = wait_for(Duration::from_secs(3), || {
            at_pod
                .packets()
                .iter()
                .map(|p| Ip(p))
                .any(|ip| {
                    ip.dst() == pod.addr
                        && ip.ports() == Some((8080, internal.port()))
                        && ip.tcp().is_some_and(|(f, ..)| f & flag_bit != 0)
                })
                .then_some(())
        });
        assert!(
            arrived.is_some(),
            "the blind {flags} is still translated, for the pod's stack to judge"
        );
        assert_established(&agent, internal, &format!("a blind {flags}"));
        assert_eq!(
            grows(
                &agent,
                "ingress",
                counter,
                before,
                1,
                Duration::from_secs(3)
            ),
            1,
            "blind {flags}"
        );
        let data = payload(64 * 1024, u64::from(flag_bit));
        assert_eq!(
            conn.echo(&data)
                .unwrap_or_else(|e| panic!("echo after a blind {flags}: {e}")),
            data
        );
    }

    // An in-window RST: the server aborts its connection.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (abort_tx, abort_rx) = mpsc::channel::<()>();
    let aborting = topo.server.spawn(move || {
        let listener = TcpListener::bind((SERVER, 8081)).expect("bind");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut c, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        c.set_nonblocking(false).unwrap();
        io::Write::write_all(&mut c, format!("{peer}\n").as_bytes()).unwrap();
        let _ = abort_rx.recv_timeout(Duration::from_secs(10));
        abort(c);
    });
    ready_rx.recv().unwrap();
    let mut victim = pod.ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8081), Duration::from_secs(3))
            .expect("connect to the aborting server")
    });
    let victim_addr = victim.stream.local_addr().unwrap();
    assert_established(&agent, victim_addr, "the handshake");
    let rst_before = agent.stats()["expired"]["tcp"]["rst"].as_u64().unwrap_or(0);
    abort_tx.send(()).unwrap();
    aborting.join().expect("aborting server");
    let err = victim
        .stream
        .read(&mut [0u8; 16])
        .expect_err("the server's RST reaches the pod");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    reset_then_released(&agent, victim_addr, "the server's in-window RST");

    // The pod aborts: its own RST resets the mapping as before.
    let mut quitter = pod.ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect")
    });
    assert_eq!(quitter.echo(b"bye").unwrap(), b"bye");
    let quitter_addr = quitter.stream.local_addr().unwrap();
    assert_established(&agent, quitter_addr, "the handshake");
    abort(quitter.stream);
    reset_then_released(&agent, quitter_addr, "the pod's RST");
    let stats = agent.stats();
    assert!(
        stats["expired"]["tcp"]["rst"].as_u64() >= Some(rst_before + 2),
        "{stats}"
    );

    // The connection that got the blind RST and FIN is still established and working.
    assert_established(&agent, internal, "the other connections' RSTs");
    assert_eq!(conn.echo(b"still here").unwrap(), b"still here");
    leaks.assert_no_leak();
}

#[test]
fn a_full_destination_is_refused_without_a_search_and_reopens_at_once() {
    // ff8c671 searched the whole range again for every new flow to a full destination (and had no
    // `alloc.refused_known_full`, so this test stops at its first look at it).
    let topo = Topology::new(1);
    let agent = agent(
        &topo,
        &[
            "--port-range",
            "40000:40099",
            "--udp-timeout",
            "5s",
            "--gc-interval",
            "100ms",
        ],
    );
    let to = SocketAddrV4::new(SERVER, 5353);
    let udp = UdpServer::start(&topo.server, to);
    let pod_addr = topo.pods[0].addr;
    let held: Vec<UdpSocket> = topo.pods[0].ns.run(move || {
        (0..100)
            .map(|i| {
                let s = UdpSocket::bind((pod_addr, 0)).expect("bind");
                udp_ask(&s, to).unwrap_or_else(|e| panic!("flow {i}: {e}"));
                s
            })
            .collect()
    });
    assert_eq!(agent.mappings("udp"), 100, "every port is held");
    let reached = udp.peers().len();
    let exhausted = agent.counter("egress", "drop_exhausted_udp");
    let known = agent.counter("alloc", "refused_known_full");

    // 2,000 new flows, from fresh source ports, as fast as the pod can send them (at most 3 s:
    // the held mappings live 5 s).
    let (sent, took) = topo.pods[0].ns.run(move || {
        let start = Instant::now();
        let mut sent = 0u32;
        for n in 0..2000u16 {
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
            let s = UdpSocket::bind((pod_addr, 20000 + n)).expect("bind");
            s.send_to(b"one more flow", to).expect("send");
            sent += 1;
        }
        (sent, start.elapsed())
    });
    assert_eq!(sent, 2000, "sent {sent} in {took:?}");
    let refused = grows(
        &agent,
        "egress",
        "drop_exhausted_udp",
        exhausted,
        2000,
        Duration::from_secs(2),
    );
    assert_eq!(refused, 2000, "every new flow is refused");
    assert_eq!(udp.peers().len(), reached, "none reached the server");
    let without_search = counter_delta(&agent, "alloc", "refused_known_full", known);
    assert!(
        without_search >= 1900,
        "{without_search} of 2000 refused without a search (took {took:?})"
    );

    // New flows keep coming (each refused, a search at most once a second keeps the destination
    // marked full); the first one after a mapping expires gets its freed port.
    let deadline = Instant::now() + Duration::from_secs(15);
    let seen = loop {
        assert!(Instant::now() < deadline, "no flow got a port again");
        let released = agent.stats()["expired"]["udp"]["idle"]
            .as_u64()
            .unwrap_or(0);
        let r = topo.pods[0].ns.run(move || {
            let s = UdpSocket::bind((pod_addr, 0)).expect("bind");
            s.connect(to).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s.send(b"who am i").unwrap();
            let mut buf = [0u8; 64];
            s.recv(&mut buf).map(|n| buf[..n].to_vec())
        });
        match r {
            Ok(answer) => break String::from_utf8_lossy(&answer).into_owned(),
            Err(e) => assert_eq!(
                released, 0,
                "{released} mappings had expired before this flow, yet it was refused: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen: SocketAddrV4 = seen.parse().expect("an address");
    assert_eq!(*seen.ip(), NAT_IP);
    assert!((40000..=40099).contains(&seen.port()), "{seen}");
    drop(held);
}
