//! Per-port UDP timeouts (`--udp-timeout-for`, RFC 4787 REQ-5a) with real traffic: a DNS-like
//! query to port 53, answered once by a real responder, gives its port back after the short
//! timer, while a flow to another port keeps its mapping for `--udp-timeout`.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::Agent,
    topo::{Topology, NAT_IP, SERVER},
    traffic::{udp_ask, wait_for, UdpServer},
};

/// The UDP mappings `snat conns` shows, as (internal, expires in seconds).
fn udp_rows(agent: &Agent) -> Vec<(String, u64)> {
    let conns = agent.json("conns", &["--proto", "udp"]);
    conns["conns"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r: &Value| {
            (
                r["internal"].as_str().unwrap().to_owned(),
                r["expires_in_secs"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// From the first pod, one question to `port` on the server from a fresh socket; returns the
/// pod's local endpoint (the mapping's internal side).
fn ask_once(topo: &Topology, port: u16) -> String {
    let pod = topo.pods[0].addr;
    let local = topo.pods[0].ns.run(move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(pod, 0)).expect("bind");
        let seen = udp_ask(&sock, SocketAddrV4::new(SERVER, port)).expect("an answer");
        assert_eq!(*seen.ip(), NAT_IP, "translated");
        sock.local_addr().unwrap()
    });
    local.to_string()
}

#[test]
fn a_dns_query_gives_its_port_back_after_its_short_timer_and_other_ports_keep_theirs() {
    let topo = Topology::new(1);
    let _dns = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 53));
    let _other = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let agent = Agent::for_pods(
        &topo,
        4096,
        &[
            "--udp-timeout-for",
            "53=2s",
            "--udp-timeout",
            "1m",
            "--gc-interval",
            "200ms",
        ],
    );
    let dns = ask_once(&topo, 53);
    let asked = Instant::now();
    let other = ask_once(&topo, 5353);
    let rows = udp_rows(&agent);
    let expires = |who: &str| rows.iter().find(|r| r.0 == who).map(|r| r.1);
    assert!(expires(&dns) <= Some(2), "the DNS flow's timer: {rows:?}");
    assert!(
        expires(&other) >= Some(50),
        "the other port's timer: {rows:?}"
    );

    let gone = wait_for(Duration::from_secs(6), || {
        (!udp_rows(&agent).iter().any(|r| r.0 == dns)).then(Instant::now)
    })
    .expect("the DNS mapping is released");
    let after = gone.duration_since(asked);
    assert!(
        after >= Duration::from_millis(1900),
        "released after {after:?}, before its 2 s timer"
    );
    // Its timer, one --gc-interval, and the time `snat conns` takes to notice.
    assert!(after < Duration::from_secs(4), "released after {after:?}");
    assert!(
        udp_rows(&agent).iter().any(|r| r.0 == other),
        "the flow to port 5353 keeps its mapping: {:?}",
        udp_rows(&agent)
    );
    assert_eq!(agent.stats()["expired"]["udp"]["idle"].as_u64(), Some(1));
    assert_eq!(agent.mappings("udp"), 1);
}

#[test]
fn by_default_dns_flows_get_30_seconds_and_others_5_minutes() {
    let topo = Topology::new(1);
    let _dns = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 53));
    let _other = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let agent = Agent::for_pods(&topo, 4096, &[]);
    let dns = ask_once(&topo, 53);
    let other = ask_once(&topo, 5353);
    let rows = udp_rows(&agent);
    let expires = |who: &str| rows.iter().find(|r| r.0 == who).map(|r| r.1);
    assert!(
        matches!(expires(&dns), Some(25..=30)),
        "DNS: 30 s ({rows:?})"
    );
    assert!(
        matches!(expires(&other), Some(295..=300)),
        "others: --udp-timeout ({rows:?})"
    );
}
