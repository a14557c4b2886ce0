//! Exhaustion done right, with real traffic: refused flows fail fast, one greedy pod cannot
//! starve its neighbours, the node's own ports are left alone, churn to one server does not
//! collapse, and saturation is visible before it hurts.

use std::{
    io,
    net::{SocketAddrV4, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    metric,
    topo::{Topology, NAT_IP, POD_CIDR6, SERVER, SERVER6},
    traffic::{udp_ask, wait_for, LeakWatch, Mode, TcpClient, TcpServer, UdpServer},
};

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 65536, extra)
}

/// Opens `n` connections from pod `i` and keeps them.
fn hold(topo: &Topology, pod: usize, n: usize, to: SocketAddrV4) -> Vec<TcpClient> {
    topo.pods[pod].ns.run(move || {
        (0..n)
            .map(|i| {
                TcpClient::connect(to, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("flow {i}: {e}"))
            })
            .collect()
    })
}

#[test]
fn a_refused_connect_fails_in_milliseconds_and_nothing_leaks() {
    let topo = Topology::new(2);
    let agent = agent(&topo, &["--port-range", "40000:40004"]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let held = hold(&topo, 0, 5, to);

    let (took, err) = topo.pods[1].ns.run(move || {
        let start = Instant::now();
        let r = TcpClient::connect(to, Duration::from_secs(5));
        (start.elapsed(), r.err().map(|e| e.kind()))
    });
    assert_eq!(
        err,
        Some(io::ErrorKind::ConnectionRefused),
        "a RST, not a timeout"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // UDP: five sockets take the five ports towards the server; the sixth learns at once.
    let (udp_err, udp_took) = topo.pods[0].ns.run(|| {
        let socks: Vec<UdpSocket> = (0..5)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        for s in &socks {
            udp_ask(s, SocketAddrV4::new(SERVER, 5353)).expect("UDP answer");
        }
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(SocketAddrV4::new(SERVER, 5353)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let start = Instant::now();
        s.send(b"one too many").unwrap();
        let r = s.recv(&mut [0u8; 64]);
        (r.err().map(|e| e.raw_os_error()), start.elapsed())
    });
    assert_eq!(
        udp_err,
        Some(Some(libc::EHOSTUNREACH)),
        "ICMP unreachable code 13 reaches the socket"
    );
    assert!(udp_took < Duration::from_secs(1), "{udp_took:?}");

    let s = agent.stats();
    assert!(
        s["counters"]["reject"]["rst_sent"].as_u64() >= Some(1),
        "{s}"
    );
    assert!(
        s["counters"]["reject"]["icmp_sent"].as_u64() >= Some(1),
        "{s}"
    );
    drop(held);
    leaks.assert_no_leak();
}

#[test]
fn in_drop_mode_a_refused_connect_times_out() {
    let topo = Topology::new(1);
    let _agent = agent(
        &topo,
        &["--port-range", "40000:40000", "--on-exhaustion", "drop"],
    );
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let _held = hold(&topo, 0, 1, to);
    let (took, err) = topo.pods[0].ns.run(move || {
        let start = Instant::now();
        let r = TcpClient::connect(to, Duration::from_millis(1500));
        (start.elapsed(), r.err().map(|e| e.kind()))
    });
    assert_eq!(err, Some(io::ErrorKind::TimedOut));
    assert!(took >= Duration::from_millis(1400), "{took:?}");
}

#[test]
fn a_noisy_pod_cannot_starve_its_neighbours() {
    // The incident AKS users report: one pod opens connections as fast as it can to one API while three
    // quiet pods keep connecting to it; with --fair-share the quiet pods never fail.
    let topo = Topology::new(4);
    let agent = agent(
        &topo,
        &[
            "--port-range",
            "40000:40199",
            "--fair-share",
            "--tcp-fin-timeout",
            "1s",
            "--gc-interval",
            "200ms",
        ],
    );
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let noisy = topo.pods[0].ns.spawn(move || {
        let (mut held, mut refused) = (Vec::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline && held.len() + refused < 2000 {
            match TcpClient::connect(to, Duration::from_millis(500)) {
                Ok(c) => held.push(c),
                Err(_) => refused += 1,
            }
        }
        (held, refused)
    });
    let quiet: Vec<_> = topo.pods[1..]
        .iter()
        .map(|p| {
            p.ns.spawn(move || {
                let mut results = Vec::new();
                for _ in 0..15 {
                    std::thread::sleep(Duration::from_millis(200));
                    results.push(
                        TcpClient::connect(to, Duration::from_secs(2)).map(|c| c.seen_as.port()),
                    );
                }
                results
            })
        })
        .collect();
    for (i, q) in quiet.into_iter().enumerate() {
        let results = q.join().expect("quiet pod");
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "quiet pod {} failed {} of {}: {failed:?}",
            i + 1,
            failed.len(),
            results.len()
        );
    }
    let (held, refused) = noisy.join().expect("noisy pod");
    assert!(
        refused > 0,
        "the noisy pod was never refused ({} held)",
        held.len()
    );
    assert!(held.len() < 200, "the noisy pod took every port");
    let status = agent.json("status", &[]);
    assert_eq!(status["top_refused"][0]["source"], "10.1.0.2", "{status}");
    assert!(
        status["counters"]["egress"]["drop_fair_share"].as_u64() > Some(0),
        "{status}"
    );
    let m = agent.scrape(&topo.node);
    assert!(
        metric(&m, "snat_source_refused_total{source=\"10.1.0.2\"}") >= Some(1.0),
        "{m}"
    );
    let (ok, top, _) = agent.cli(&["top", "--iface", &topo.uplink, "--iterations", "1"]);
    let line = top
        .lines()
        .find(|l| l.starts_with("10.1.0.2"))
        .unwrap_or_default();
    assert!(
        ok && line.split_whitespace().nth(2).is_some_and(|r| r != "0"),
        "snat top names the refused pod:\n{top}"
    );
    drop(held);
}

#[test]
fn the_per_source_cap_holds() {
    let topo = Topology::new(2);
    let agent = agent(&topo, &["--max-ports-per-source", "5"]);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let held = hold(&topo, 0, 5, to);
    let sixth = topo.pods[0].ns.run(move || {
        TcpClient::connect(to, Duration::from_secs(1))
            .err()
            .map(|e| e.kind())
    });
    assert_eq!(sixth, Some(io::ErrorKind::ConnectionRefused));
    let other = hold(&topo, 1, 5, to);
    assert_eq!(agent.counter("egress", "drop_source_cap"), 1);
    drop((held, other));
}

/// The per-source cap holds for IPv6 sources too, each family's sources counted on their own: a
/// pod at its cap over IPv6 is refused at once (a RST), while another pod, and the same pod over
/// IPv4, still connect.
#[test]
fn the_per_source_cap_holds_for_ipv6_sources() {
    use std::{net::SocketAddrV6, net::TcpStream, sync::mpsc};
    let topo = Topology::new_dual_stack(2);
    let agent = agent(
        &topo,
        &["--internal", POD_CIDR6, "--max-ports-per-source", "3"],
    );
    let to6 = SocketAddrV6::new(SERVER6, 8080, 0, 0);
    // A server that holds every IPv6 connection until told to stop.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = topo.server.spawn(move || {
        let listener = TcpListener::bind(to6).expect("listen");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        let mut held = Vec::new();
        while stop_rx.try_recv().is_err() {
            match listener.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ready_rx.recv().expect("server ready");
    let connect = |pod: usize, n: usize| {
        topo.pods[pod].ns.run(move || {
            (0..n)
                .map(|_| TcpStream::connect_timeout(&to6.into(), Duration::from_secs(2)))
                .collect::<Vec<_>>()
        })
    };
    let a = connect(0, 4);
    assert!(a[..3].iter().all(Result::is_ok), "{a:?}");
    assert_eq!(
        a[3].as_ref().err().map(io::Error::kind),
        Some(io::ErrorKind::ConnectionRefused),
        "the fourth from one source: {a:?}"
    );
    let b = connect(1, 3);
    assert!(b.iter().all(Result::is_ok), "another pod: {b:?}");
    let to4 = SocketAddrV4::new(SERVER, 8081);
    let _tcp4 = TcpServer::start(&topo.server, to4);
    let v4 = hold(&topo, 0, 3, to4);
    assert_eq!(agent.counter("egress", "drop_source_cap"), 1);
    drop((a, b, v4));
    stop_tx.send(()).expect("stop");
    server.join().expect("server thread");
}

#[test]
fn no_port_a_local_socket_uses_is_handed_out() {
    let topo = Topology::new(1);
    // The node listens (TCP) and holds a UDP socket on NAT-IP ports inside the range.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let node_sockets = topo.node.spawn(move || {
        let _tcp = TcpListener::bind((NAT_IP, 40005)).expect("listen");
        let _udp = UdpSocket::bind((NAT_IP, 40006)).expect("bind");
        ready_tx.send(()).unwrap();
        let _ = done_rx.recv();
    });
    ready_rx.recv().unwrap();
    let agent = agent(&topo, &["--port-range", "40000:40009"]);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let held = hold(&topo, 0, 9, to);
    let ports: Vec<u16> = held.iter().map(|c| c.seen_as.port()).collect();
    assert!(
        !ports.contains(&40005),
        "the listener's port was handed out: {ports:?}"
    );
    let tenth = topo.pods[0].ns.run(move || {
        TcpClient::connect(to, Duration::from_secs(1))
            .err()
            .map(|e| e.kind())
    });
    assert_eq!(
        tenth,
        Some(io::ErrorKind::ConnectionRefused),
        "nine ports were free, not ten"
    );
    let udp_ports = topo.pods[0].ns.run(|| {
        (0..9)
            .map(|_| {
                udp_ask(
                    &UdpSocket::bind("0.0.0.0:0").unwrap(),
                    SocketAddrV4::new(SERVER, 5353),
                )
                .expect("UDP")
                .port()
            })
            .collect::<Vec<_>>()
    });
    assert!(
        !udp_ports.contains(&40006),
        "the bound UDP port was handed out: {udp_ports:?}"
    );
    assert!(agent.counter("alloc", "host_port_skipped") >= 1);
    done_tx.send(()).unwrap();
    node_sockets.join().unwrap();
    drop(held);
}

fn reserved(topo: &Topology) -> String {
    String::from_utf8(
        topo.node
            .exec(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned()
}

#[test]
fn the_range_is_reserved_from_the_host_while_snat_runs() {
    let topo = Topology::new(1);
    topo.node.sysctl("net.ipv4.ip_local_reserved_ports=5000");
    let first = agent(&topo, &["--port-range", "61000:65535"]);
    assert_eq!(reserved(&topo), "5000,61000-65535");
    let (ok, _, err) = first.cli(&["set", "--iface", &topo.uplink, "port-range", "62000:65535"]);
    assert!(ok, "{err}");
    assert_eq!(
        reserved(&topo),
        "5000,62000-65535",
        "follows a live range change"
    );
    let (status, _) = first.stop();
    assert!(status.success());
    assert_eq!(reserved(&topo), "5000", "restored on exit");

    // The default range covers the host's whole ephemeral range: shared, with a warning.
    let second = agent(&topo, &[]);
    assert_eq!(reserved(&topo), "5000");
    assert!(
        second.log().contains("snat shares them"),
        "{}",
        second.log()
    );
}

#[test]
fn sustained_churn_to_one_server_does_not_collapse() {
    // Three back-to-back bursts of short connections to one server ip:port, the server closing
    // first (so it holds TIME_WAIT), the pod reusing a narrow set of source ports: the NAT must
    // map each pod 4-tuple to the same server-side 4-tuple again, or SYNs land on TIME_WAIT.
    let topo = Topology::new(1);
    let agent = agent(&topo, &[]);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start_mode(&topo.server, to, Mode::CloseFirst);
    topo.pods[0]
        .ns
        .sysctl("net.ipv4.ip_local_port_range=40000 40999");
    topo.pods[0].ns.exec(&["nstat", "-n"]);
    for burst in 1..=3 {
        let failed = topo.pods[0].ns.run(move || {
            (0..3000)
                .filter(|_| {
                    TcpClient::connect(to, Duration::from_secs(3))
                        .and_then(TcpClient::request)
                        .is_err()
                })
                .count()
        });
        assert_eq!(
            failed, 0,
            "burst {burst}: {failed} of 3000 connections failed"
        );
    }
    let out = topo.pods[0]
        .ns
        .exec(&["nstat", "-az", "TcpExtTCPSynRetrans"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let retrans: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("TcpExtTCPSynRetrans")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no TcpExtTCPSynRetrans in nstat output:\n{text}"));
    assert!(
        retrans <= 10,
        "{retrans} SYN retransmissions over 9000 connections"
    );
    assert!(
        agent.counter("alloc", "tcp_reopened") >= 5000,
        "pod ports were reused: mappings must be too"
    );
}

#[test]
fn saturation_is_visible_at_80_and_95_percent() {
    let topo = Topology::new(1);
    let agent = agent(
        &topo,
        &[
            "--port-range",
            "40000:40019",
            "--max-ports-per-source",
            "20",
            "--gc-interval",
            "200ms",
        ],
    );
    let to = SocketAddrV4::new(SERVER, 8080);
    let _tcp = TcpServer::start(&topo.server, to);
    let mut held = hold(&topo, 0, 16, to);
    let sample =
        |level: &str, kind: &str| format!("snat_saturated{{kind=\"{kind}\",level=\"{level}\"}}");
    let m = wait_for(Duration::from_secs(5), || {
        let m = agent.scrape(&topo.node);
        (metric(&m, &sample("80", "destination")) == Some(1.0)).then_some(m)
    })
    .expect("80 % reached");
    assert_eq!(metric(&m, &sample("95", "destination")), Some(0.0));
    assert_eq!(metric(&m, &sample("80", "source")), Some(1.0));
    held.extend(hold(&topo, 0, 3, to));
    let m = wait_for(Duration::from_secs(5), || {
        let m = agent.scrape(&topo.node);
        (metric(&m, &sample("95", "destination")) == Some(1.0)).then_some(m)
    })
    .expect("95 % reached");
    assert_eq!(
        metric(
            &m,
            "snat_saturation_crossings_total{kind=\"destination\",level=\"95\"}"
        ),
        Some(1.0)
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "destination {SERVER}:8080 (tcp via {NAT_IP}) is at 80.0%"
        )),
        "{log}"
    );
    assert!(log.contains("is at 95.0%"), "{log}");
    drop(held);
}
