//! Two nodes share ONE NAT IP behind a gateway namespace running `snat gateway`, with a real etcd
//! in a namespace of its own (the topology of `tests::cluster`): range 40000:40511 (8 blocks of
//! 64), node A's pod holds 300 connections and node B's 100 — all succeed, where a fixed split
//! would give each 256. Every connection is seen by the server from the NAT IP, on a port of a
//! block etcd assigns to the node it came from, and the gateway returned every reply to the
//! right node (the connections carry data both ways).

use std::{net::SocketAddrV4, time::Duration};

use tests::{
    cluster::{echo_all, hold, Cluster, NAT, SERVER},
    traffic::{wait_for, Mode, TcpServer},
};

const TIMERS: [&str; 6] = [
    "--lease-ttl",
    "10s",
    "--block-cooldown",
    "2s",
    "--fence-margin",
    "1s",
];

#[test]
fn two_nodes_share_one_nat_ip_through_the_gateway() {
    let mut c = Cluster::new(2, 1);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _srv = TcpServer::start_mode(&c.server, to, Mode::Echo);
    // The first node writes the geometry the gateway waits for.
    let agent_a = c.start_agent(0, &TIMERS);
    c.start_gateway(&["--lease-ttl", "10s"]);
    let agent_b = c.start_agent(1, &TIMERS);

    let mut held_a = hold(&c.nodes[0].pod, 300, to, &agent_a);
    let mut held_b = hold(&c.nodes[1].pod, 100, to, &agent_b);
    let blocks = c.etcd.blocks();
    for (held, name) in [(&held_a, "node-a"), (&held_b, "node-b")] {
        for conn in held {
            assert_eq!(*conn.seen_as.ip(), NAT, "{name}");
            let block = (conn.seen_as.port() - 40000) / 64;
            assert_eq!(
                blocks.get(&block).map(String::as_str),
                Some(name),
                "port {} of {name}: blocks {blocks:?}\n{}",
                conn.seen_as.port(),
                c.gateway_log()
            );
        }
    }
    // Replies come back through the gateway: data echoed on every connection of both nodes.
    echo_all(&mut held_a, "node-a through the gateway");
    echo_all(&mut held_b, "node-b through the gateway");
    let held_by = |n: &str| blocks.values().filter(|v| *v == n).count();
    assert!(
        held_by("node-a") >= 5 && held_by("node-b") >= 2,
        "{blocks:?}"
    );
    // The gateway published the revision it applied.
    let applied = c.gateway_applied().expect("the gateway's applied revision");
    assert!(applied > 0);

    // The gateway's /metrics (default address, in its namespace): connected, the routes, the
    // replies it forwarded (every connection's SYN-ACK and echo at least), and no lag once the
    // store is quiet.
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let scrape = || {
        c.gw.run(|| {
            let r = tests::http::get("127.0.0.1:9470".parse().unwrap(), "/metrics");
            assert_eq!(r.status, 200, "{}", r.text());
            r.text()
        })
    };
    let text = wait_for(Duration::from_secs(10), || {
        let t = scrape();
        (metric(&t, "snat_gateway_applied_revision_lag") == 0.0).then_some(t)
    })
    .unwrap_or_else(|| panic!("the gateway's lag stayed above 0:\n{}", scrape()));
    assert_eq!(metric(&text, "snat_gateway_connected"), 1.0);
    assert!(
        metric(&text, "snat_gateway_routes") >= 7.0,
        "5 + 2 blocks:\n{text}"
    );
    assert!(
        metric(
            &text,
            "snat_gateway_packets_total{result=\"forwarded_tcp\"}"
        ) >= 800.0,
        "{text}"
    );
    assert!(
        metric(&text, "snat_gateway_published_revision") >= applied as f64,
        "{text}"
    );
    assert!(
        text.contains("snat_gateway_packets_total{result=\"drop_no_route\"}"),
        "{text}"
    );
    drop(agent_a);
    drop(agent_b);
}
