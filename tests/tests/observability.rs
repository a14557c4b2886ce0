//! The operator's view of a running agent, checked against what the test did: /metrics (and
//! `promtool check metrics`), `snat status`, `snat conns`, `snat top`, and changing the port range
//! live with `snat set`.

use std::{
    collections::HashSet,
    io::Write as _,
    net::{SocketAddrV4, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::Agent,
    metric,
    topo::{Topology, NAT_IP, SERVER},
    traffic::{udp_ask, TcpClient, TcpServer, UdpServer},
};

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 65536, extra)
}

fn promtool_check(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_count_what_the_pods_did() {
    let topo = Topology::new(2);
    let agent = agent(&topo, &["--port-range", "40000:40009"]);
    let servers: Vec<TcpServer> = (8080..8085)
        .map(|p| TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, p)))
        .collect();

    // pod0: 50 open connections, ten to each of five server ports: every NAT port is used five
    // times over (once per destination port).
    let held = topo.pods[0].ns.run(|| {
        (0..50)
            .map(|i| {
                TcpClient::connect(
                    SocketAddrV4::new(SERVER, 8080 + (i % 5) as u16),
                    Duration::from_secs(3),
                )
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    // pod1: ten flows to a destination whose ten ports are all taken: ten refusals.
    let refused = topo.pods[1].ns.run(|| {
        (0..10)
            .filter(|_| {
                TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_millis(300))
                    .is_err()
            })
            .count()
    });
    assert_eq!(refused, 10);

    let m = agent.scrape(&topo.node);
    promtool_check(&m);
    let tcp_pool = format!("{{nat_ip=\"{NAT_IP}\",proto=\"tcp\"}}");
    assert_eq!(
        metric(&m, &format!("snat_ports_total{tcp_pool}")),
        Some(10.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("snat_ports_in_use{tcp_pool}")),
        Some(10.0)
    );
    assert_eq!(
        metric(&m, &format!("snat_port_exhaustion_total{tcp_pool}")),
        Some(10.0)
    );
    assert_eq!(metric(&m, "snat_mappings{proto=\"tcp\"}"), Some(50.0));
    assert_eq!(metric(&m, "snat_port_claims{proto=\"tcp\"}"), Some(50.0));
    assert_eq!(
        metric(&m, "snat_source_ports_in_use{source=\"10.1.0.2\"}"),
        Some(50.0)
    );
    assert_eq!(
        metric(&m, "snat_source_ports_in_use{source=\"10.1.1.2\"}"),
        None,
        "pod1 holds nothing"
    );
    assert_eq!(
        metric(&m, &format!("snat_destination_saturation{{nat_ip=\"{NAT_IP}\",destination=\"{SERVER}:8080\",proto=\"tcp\"}}")),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "snat_mappings_created_total{proto=\"tcp\"}"),
        Some(50.0)
    );
    assert!(
        metric(
            &m,
            "snat_packets_total{direction=\"egress\",result=\"drop_exhausted_tcp\"}"
        ) >= Some(10.0)
    );
    assert_eq!(
        metric(&m, "snat_allocation_duration_seconds_count"),
        Some(60.0),
        "50 created + 10 refused"
    );
    assert!(
        metric(
            &m,
            "snat_packets_total{direction=\"egress\",result=\"translated_tcp\"}"
        ) > Some(100.0)
    );
    drop(held);
    drop(servers);
}

#[test]
fn status_conns_and_top_show_the_known_flows() {
    let topo = Topology::new(2);
    let agent = agent(&topo, &[]);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let _udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let (held, udp_local, udp_seen) = topo.pods[0].ns.run(|| {
        let held: Vec<TcpClient> = (0..3)
            .map(|_| {
                TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
                    .expect("connect")
            })
            .collect();
        let s = UdpSocket::bind("10.1.0.2:0").unwrap();
        let seen = udp_ask(&s, SocketAddrV4::new(SERVER, 5353)).expect("UDP");
        (held, s.local_addr().unwrap(), seen)
    });
    topo.pods[1].ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect");
    });

    let conns = agent.json("conns", &["--source", "10.1.0.2/32", "--proto", "tcp"]);
    let rows = conns["conns"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{conns}");
    let want: HashSet<(String, String)> = held
        .iter()
        .map(|c| {
            (
                c.stream.local_addr().unwrap().to_string(),
                c.seen_as.to_string(),
            )
        })
        .collect();
    let got: HashSet<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["internal"].as_str().unwrap().to_owned(),
                r["nat"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want);
    for r in rows {
        assert_eq!(r["destination"], format!("{SERVER}:8080"));
        assert_eq!(r["state"], "established");
        assert!(r["expires_in_secs"].as_u64().unwrap() > 7000, "{r}");
    }
    let udp = agent.json("conns", &["--proto", "udp"]);
    let row = &udp["conns"][0];
    assert_eq!(row["internal"], udp_local.to_string());
    assert_eq!(row["nat"], udp_seen.to_string());
    assert_eq!(row["destination"], SERVER.to_string());

    let status = agent.json("status", &[]);
    let pools = status["pools"].as_array().unwrap();
    let tcp = pools.iter().find(|p| p["proto"] == "tcp").unwrap();
    assert_eq!(
        (
            tcp["nat_ip"].as_str(),
            tcp["ports_total"].as_u64(),
            tcp["mappings"].as_u64()
        ),
        (Some("198.51.100.1"), Some(32768), Some(4))
    );
    assert_eq!(status["top_sources"][0]["source"], "10.1.0.2");
    assert_eq!(status["top_sources"][0]["ports"], 4, "3 TCP + 1 UDP");
    assert_eq!(status["top_sources"][1]["source"], "10.1.1.2");

    let (ok, text, err) = agent.cli(&["top", "--iface", &topo.uplink, "--iterations", "1"]);
    assert!(ok, "{err}");
    let first = text
        .lines()
        .find(|l| l.starts_with("10."))
        .unwrap_or_default();
    let cols: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        cols,
        ["10.1.0.2", "4", "0"],
        "source, ports held, flows refused:\n{text}"
    );
    let (ok, text, _) = agent.cli(&[
        "top",
        "--iface",
        &topo.uplink,
        "--by",
        "destination",
        "--iterations",
        "1",
    ]);
    assert!(ok && text.contains(&format!("{SERVER}:8080")), "{text}");
    let (ok, text, _) = agent.cli(&["status", "--iface", &topo.uplink]);
    assert!(
        ok && text.contains("ALLOCATED") && text.contains("10.1.0.2"),
        "{text}"
    );
    drop(held);
}

#[test]
fn set_port_range_moves_new_flows_and_keeps_old_ones() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &["--port-range", "40000:40099"]);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let to = SocketAddrV4::new(SERVER, 8080);
    let mut old = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).expect("connect"));
    assert!((40000..=40099).contains(&old.seen_as.port()));

    // A malformed range is refused by the client's own parser, before the agent is asked (the
    // agent's own refusals are in `a_set_the_agent_refuses_changes_nothing`); nothing changes.
    let (ok, _, err) = agent.cli(&["set", "--iface", &topo.uplink, "port-range", "50099:50000"]);
    assert!(!ok && err.contains("swap them"), "{err}");
    assert_eq!(agent.json("status", &[])["port_range"], "40000:40099");

    let (ok, out, err) = agent.cli(&["set", "--iface", &topo.uplink, "port-range", "50000:50099"]);
    assert!(ok, "{err}");
    assert!(out.contains("50000:50099"), "{out}");
    let m = agent.scrape(&topo.node);
    assert_eq!(
        metric(
            &m,
            &format!("snat_ports_total{{nat_ip=\"{NAT_IP}\",proto=\"tcp\"}}")
        ),
        Some(100.0)
    );
    assert_eq!(agent.json("status", &[])["port_range"], "50000:50099");

    let new = topo.pods[0].ns.run(move || {
        (0..5)
            .map(|_| {
                TcpClient::connect(to, Duration::from_secs(3))
                    .expect("connect")
                    .seen_as
                    .port()
            })
            .collect::<Vec<_>>()
    });
    assert!(new.iter().all(|p| (50000..=50099).contains(p)), "{new:?}");
    // The connection made before the change still passes data both ways on its old port.
    let back = topo.pods[0].ns.run(move || {
        let data = old.echo(b"still here").expect("echo");
        (data, old)
    });
    assert_eq!(back.0, b"still here");
    assert_eq!(
        agent.json("conns", &["--proto", "tcp"])["conns"]
            .as_array()
            .unwrap()
            .len(),
        1 + 5 - 5 + 5
    );
}

#[test]
fn set_plan_moves_a_running_node_to_its_new_slice() {
    let topo = Topology::new(1);
    let second = std::net::Ipv4Addr::new(198, 51, 100, 3);
    topo.node
        .ip(&["addr", "add", &format!("{second}/24"), "dev", &topo.uplink]);
    let plan = |ip: std::net::Ipv4Addr, name: &str| {
        let out = Command::new(tests::agent::snat_bin())
            .args([
                "plan",
                "--nodes",
                "4",
                "--nat-ip",
                &ip.to_string(),
                "--ports-per-node",
                "1000",
                "--port-range",
                "40000:49999",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let path = std::env::temp_dir().join(format!("{}-{name}.json", topo.prefix));
        std::fs::write(&path, out.stdout).unwrap();
        path
    };
    let (a, b) = (plan(NAT_IP, "a"), plan(second, "b"));
    let agent = agent(&topo, &["--plan", a.to_str().unwrap(), "--node-index", "0"]);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let to = SocketAddrV4::new(SERVER, 8080);
    let mut old = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).expect("connect"));
    assert_eq!(*old.seen_as.ip(), NAT_IP);
    assert!((40000..=40999).contains(&old.seen_as.port()));

    let (ok, out, err) = agent.cli(&[
        "set",
        "--iface",
        &topo.uplink,
        "plan",
        b.to_str().unwrap(),
        "--node-index",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("198.51.100.3") && out.contains("42000:42999"),
        "{out}"
    );
    let new = topo.pods[0].ns.run(move || {
        TcpClient::connect(to, Duration::from_secs(3))
            .expect("connect")
            .seen_as
    });
    assert_eq!(*new.ip(), second);
    assert!((42000..=42999).contains(&new.port()), "{new}");
    let echoed = topo.pods[0]
        .ns
        .run(move || old.echo(b"kept").expect("old flow"));
    assert_eq!(echoed, b"kept");
    let status = agent.json("status", &[]);
    assert!(
        status["slice"].as_str().unwrap().starts_with("node 2 of 4"),
        "{status}"
    );
    // The old NAT IP still shows while it holds a mapping, with no allocation of its own.
    let old_pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nat_ip"] == "198.51.100.1" && p["proto"] == "tcp")
        .cloned();
    assert_eq!(
        old_pool.map(|p| (p["ports_total"].clone(), p["mappings"].clone())),
        Some((0.into(), 1.into()))
    );
    // A node index outside the plan is refused by the client, which reads the plan before it
    // asks the agent; nothing changes.
    let (ok, _, err) = agent.cli(&[
        "set",
        "--iface",
        &topo.uplink,
        "plan",
        b.to_str().unwrap(),
        "--node-index",
        "4",
    ]);
    assert!(
        !ok && err.contains("node index 4 is outside the plan"),
        "{err}"
    );
    let _ = (std::fs::remove_file(a), std::fs::remove_file(b));
}

#[test]
fn a_set_the_agent_refuses_changes_nothing() {
    // These pass the client's own checks; only the agent knows its reserved ports and internal
    // CIDRs, so its refusal path (and its messages) are what is tested here.
    let topo = Topology::new(1);
    let agent = agent(&topo, &["--port-range", "40000:40099"]);
    let up = topo.uplink.as_str();
    let unchanged = |agent: &Agent| {
        let s = agent.json("status", &[]);
        assert_eq!(s["port_range"], "40000:40099", "{s}");
        assert_eq!(s["nat_ips"], serde_json::json!([NAT_IP.to_string()]), "{s}");
        assert!(s.get("slice").is_none(), "{s}");
    };

    // A range over the reserved NodePorts (the default --reserved-ports 30000-32767).
    let (ok, _, err) = agent.cli(&["set", "--iface", up, "port-range", "29000:31000"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("the agent refused the change")
            && err.contains("29000:31000 overlaps --reserved-ports 30000-32767"),
        "{err}"
    );
    unchanged(&agent);

    // A plan whose NAT IP is a pod address.
    let plan = std::env::temp_dir().join(format!("{}-internal-plan.json", topo.prefix));
    let out = Command::new(tests::agent::snat_bin())
        .args([
            "plan",
            "--nodes",
            "2",
            "--nat-ip",
            "10.1.9.9",
            "--ports-per-node",
            "1000",
        ])
        .args(["--port-range", "40000:49999", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&plan, out.stdout).unwrap();
    let (ok, _, err) = agent.cli(&[
        "set",
        "--iface",
        up,
        "plan",
        plan.to_str().unwrap(),
        "--node-index",
        "1",
    ]);
    let _ = std::fs::remove_file(&plan);
    assert!(!ok, "{err}");
    assert!(
        err.contains("--nat-ip 10.1.9.9 is inside the internal CIDR 10.1.0.0/16"),
        "{err}"
    );
    unchanged(&agent);

    // The agent still takes a good change afterwards.
    let (ok, _, err) = agent.cli(&["set", "--iface", up, "port-range", "40000:40049"]);
    assert!(ok, "{err}");
    assert_eq!(agent.json("status", &[])["port_range"], "40000:40049");
}
