//! A bounded flood of new flows (hping3 SYNs with changing source ports) against a small range:
//! the node stays responsive, an existing flow keeps working, the counters account for every
//! SYN, and the ports come back when the flood stops.

use std::{net::SocketAddrV4, time::Duration};

use tests::{
    agent::Agent,
    topo::{Topology, POD_CIDR, SERVER},
    traffic::{wait_for, LeakWatch, TcpClient, TcpServer},
};

#[test]
fn a_flood_of_new_flows_is_absorbed_and_accounted_for() {
    let topo = Topology::new(2);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "65536",
            "--port-range",
            "40000:40099",
            "--tcp-transitory-timeout",
            "2s",
            "--tcp-rst-timeout",
            "1s",
            "--gc-interval",
            "200ms",
        ],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&topo.server, to);
    // An established flow from the quiet pod, before the flood.
    let held = topo.pods[1]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).expect("connect"));

    // 20,000 SYNs at ~5,000/s from source ports 30000.. upwards (bounded in count and time).
    let flood = topo.pods[0].ns.spawn(|| {
        let out = std::process::Command::new("timeout")
            .args([
                "15",
                "hping3",
                "-S",
                "-p",
                "8080",
                "-s",
                "30000",
                "-i",
                "u200",
                "-c",
                "20000",
                &SERVER.to_string(),
            ])
            .output()
            .expect("hping3 (installed by cargo xtask test)");
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    });
    // During the flood: the agent answers promptly (a bound, not a benchmark: an agent whose
    // control loop or tables were wedged by the flood would take seconds or never answer), with
    // the flood's flows in its figures, and the old flow passes data.
    std::thread::sleep(Duration::from_secs(2));
    let asked = std::time::Instant::now();
    let status = agent.json("status", &[]);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to answer during the flood"
    );
    assert!(
        status["mappings"]["tcp"].as_u64().is_some_and(|n| n > 0),
        "the flood's flows are in the agent's figures: {status}"
    );
    let mut held = topo.pods[1].ns.run(move || {
        let mut c = held;
        assert_eq!(
            c.echo(b"during").expect("the held flow during the flood"),
            b"during"
        );
        c
    });
    let report = flood.join().expect("flood thread");
    let sent: u64 = report
        .lines()
        .find_map(|l| {
            l.split(" packets transmitted")
                .next()
                .filter(|_| l.contains("packets transmitted"))?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no hping3 summary:\n{report}"));
    assert!(sent >= 10_000, "{report}");

    // Every SYN is accounted for: it made a mapping or was refused (and counted as such).
    let s = agent.stats();
    let c = |g: &str, n: &str| s["counters"][g][n].as_u64().unwrap();
    let created = c("alloc", "created_tcp");
    let refused = c("egress", "drop_exhausted_tcp");
    assert_eq!(
        created + refused,
        sent + 1,
        "SYNs sent by hping3 plus the held flow's: {s}"
    );
    assert!(refused > 0 && created >= 99, "{s}");

    // After the flood the ports come back, and new flows work.
    let drained = wait_for(Duration::from_secs(15), || {
        let s = agent.stats();
        (s["mappings"]["tcp"] == 1).then_some(())
    });
    assert!(
        drained.is_some(),
        "flood mappings not released: {}",
        agent.stats()
    );
    let fresh = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).map(|c| c.seen_as.port()));
    assert!(
        fresh.as_ref().is_ok_and(|p| (40000..=40099).contains(p)),
        "{fresh:?}"
    );
    assert_eq!(held.echo(b"after").unwrap(), b"after");
    leaks.assert_no_leak();
}
