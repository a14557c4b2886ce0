//! The /metrics endpoint over real connections inside the node's namespace: HTTP/1.1 keep-alive,
//! HEAD, 404 and 405; connections that send nothing, dribble a request or never read are closed
//! by the agent; 100 parallel scrapes of an agent holding 100,000 mappings share a report build;
//! `--top-sources 0` keeps addresses out; `--metrics-addr off` and a non-loopback address.

use std::{
    io::{BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use snat_user::{serve::scrape::HEAD_TIMEOUT, tables::expiry::now_ns};
use tests::{
    agent::Agent,
    http::{self, read_response, send, METRICS},
    metric,
    tables::AgentTables,
    topo::{Topology, NAT_IP, POD_CIDR, SERVER},
    traffic::wait_for,
};

/// Starts an agent and writes `mappings` synthetic established TCP mappings into its tables.
fn agent_with(topo: &Topology, mappings: u32, extra: &[&str]) -> Agent {
    let mut args = vec!["--internal", POD_CIDR, "--max-mappings", "131072"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&topo.node, &topo.uplink, &args);
    AgentTables::of_process(agent.pid())
        .and_then(|mut t| t.fill(mappings, now_ns(), &mut || Ok(())))
        .unwrap_or_else(|e| panic!("writing {mappings} mappings: {e:#}"));
    agent
}

/// Scrapes until the text shows `tcp` TCP mappings (a scrape may get a text built before they
/// were written).
fn wait_for_mappings(topo: &Topology, tcp: u32) -> String {
    let sample = "snat_mappings{proto=\"tcp\"}";
    wait_for(Duration::from_secs(30), || {
        let text = topo.node.run(|| http::get(METRICS, "/metrics").text());
        (metric(&text, sample) == Some(f64::from(tcp))).then_some(text)
    })
    .unwrap_or_else(|| panic!("/metrics never showed {sample} {tcp}"))
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

#[test]
fn the_endpoint_keeps_connections_alive_answers_head_404_405_and_names_no_address() {
    let topo = Topology::new(1);
    let _agent = agent_with(&topo, 10, &["--top-sources", "0"]);
    let text = wait_for_mappings(&topo, 10);

    topo.node.run(move || {
        // Two requests on one connection, both answered, then a HEAD on the same connection.
        let conn = connect(METRICS);
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        for i in 0..2 {
            send(&mut w, "GET", "/metrics", &[]);
            let resp = read_response(&mut r, true);
            assert_eq!(resp.status, 200, "request {i}: {resp:?}");
            assert_eq!(
                resp.header("content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8")
            );
            assert!(resp.header("connection") != Some("close"), "{resp:?}");
            let body = resp.text();
            assert!(body.contains("snat_mappings{proto=\"tcp\"} 10\n"), "{body}");
            assert!(body.contains("snat_metrics_report_builds_total "), "{body}");
        }
        send(&mut w, "HEAD", "/metrics", &[]);
        let head = read_response(&mut r, false);
        assert_eq!(head.status, 200, "{head:?}");
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD without Content-Length: {head:?}"));
        assert!(len > 1000, "HEAD announces the body's length: {len}");
        // No body followed the HEAD's headers: the next bytes are the next response.
        send(&mut w, "GET", "/nothing-here", &[]);
        let not_found = read_response(&mut r, true);
        assert_eq!(not_found.status, 404, "{not_found:?}");
        assert!(not_found.text().contains("/metrics"), "{not_found:?}");
        send(&mut w, "POST", "/metrics", &["Content-Length: 0"]);
        let not_allowed = read_response(&mut r, true);
        assert_eq!(not_allowed.status, 405, "{not_allowed:?}");
        assert_eq!(not_allowed.header("allow"), Some("GET, HEAD"));
        // And the connection still serves.
        send(&mut w, "GET", "/metrics?x=1", &["Connection: close"]);
        assert_eq!(read_response(&mut r, true).status, 200);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after Connection: close");
    });

    // --top-sources 0: no per-address label (sources, destinations, refused sources) at all.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("source=") && !line.contains("destination="),
            "{line}"
        );
    }
    assert!(!text.contains("10.2.0."), "a pod address leaked:\n{text}");
    assert!(
        !text.contains(&SERVER.to_string()),
        "a destination leaked:\n{text}"
    );
}

/// Reads until the agent closes the connection; returns the bytes read and when it closed.
fn read_until_closed(conn: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return (got, Instant::now()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A close with unread requests in the agent's buffer is a reset.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, Instant::now())
            }
            Err(e) => panic!("the agent did not close the connection: {e}"),
        }
    }
}

#[test]
fn connections_that_send_nothing_dribble_or_never_read_are_closed() {
    let topo = Topology::new(1);
    let _agent = agent_with(&topo, 10, &[]);
    wait_for_mappings(&topo, 10);
    let limit = HEAD_TIMEOUT + Duration::from_secs(5);

    let slow_loris = topo.node.spawn(move || {
        let mut c = connect(METRICS);
        let sent = Instant::now();
        c.write_all(b"GET /metr").unwrap();
        let (got, closed) = read_until_closed(&mut c);
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        closed - sent
    });
    let idle = topo.node.spawn(move || {
        let c = connect(METRICS);
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        send(&mut w, "GET", "/metrics", &[]);
        assert_eq!(read_response(&mut r, true).status, 200);
        let answered = Instant::now();
        let (got, closed) = read_until_closed(r.get_mut());
        assert!(got.is_empty() && r.buffer().is_empty());
        closed - answered
    });
    let never_reads = topo.node.spawn(move || {
        let mut c = connect(METRICS);
        // One response's size, then enough pipelined requests that their responses overflow
        // every socket buffer on the way (over 12 MiB), which the client then leaves unread.
        send(&mut c, "GET", "/metrics", &[]);
        let len = read_response(&mut BufReader::new(&mut c), true).body.len();
        let n = (12 << 20) / len + 1;
        let mut requests = Vec::new();
        for _ in 0..n {
            send(&mut requests, "GET", "/metrics", &[]);
        }
        c.write_all(&requests).unwrap();
        let sent = Instant::now();
        std::thread::sleep(HEAD_TIMEOUT + Duration::from_secs(3));
        let (got, _) = read_until_closed(&mut c);
        let answered = String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200")
            .count();
        (sent, answered, n)
    });

    let took = slow_loris.join().unwrap();
    assert!(
        took < limit,
        "a half request line held its connection {took:?}"
    );
    let took = idle.join().unwrap();
    assert!(
        took < limit,
        "an idle keep-alive connection stayed {took:?}"
    );
    let (sent, answered, asked) = never_reads.join().unwrap();
    assert!(
        answered < asked,
        "a client that did not read for {:?} still got all {asked} responses: it was not dropped",
        sent.elapsed()
    );
}

#[test]
fn parallel_scrapes_of_100k_mappings_share_one_report_build() {
    const MAPPINGS: u32 = 100_000;
    const SCRAPES: usize = 100;
    let topo = Topology::new(1);
    let _agent = agent_with(&topo, MAPPINGS, &[]);
    let before = wait_for_mappings(&topo, MAPPINGS);
    let builds = |text: &str| {
        metric(text, "snat_metrics_report_builds_total")
            .unwrap_or_else(|| panic!("no build counter in:\n{text}"))
    };
    let builds_before = builds(&before);
    assert!(
        metric(&before, "snat_metrics_report_build_seconds") > Some(0.0),
        "{before}"
    );
    // The default --top-sources names the busiest sources (the contrast to --top-sources 0).
    assert!(
        before
            .lines()
            .any(|l| l.starts_with("snat_source_ports_in_use{source=\"10.2.")),
        "{before}"
    );

    // Past --metrics-min-interval (1s) since that text was built: the burst needs a new build,
    // which the scrapes arriving while it runs share.
    std::thread::sleep(Duration::from_millis(1500));
    let bodies = topo.node.run(|| {
        let start = Arc::new(Barrier::new(SCRAPES));
        let threads: Vec<_> = (0..SCRAPES)
            .map(|_| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    http::get(METRICS, "/metrics")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a scrape failed"))
            .collect::<Vec<_>>()
    });
    let mut seen_builds = Vec::new();
    for (i, r) in bodies.iter().enumerate() {
        assert_eq!(r.status, 200, "scrape {i}: {}", r.status_line);
        let text = r.text();
        // Complete: the body is Content-Length long (read_response checked), and every family
        // up to the endpoint's own, printed last, is in it.
        assert!(
            text.contains(&format!("snat_mappings{{proto=\"tcp\"}} {MAPPINGS}\n")),
            "scrape {i}:\n{text}"
        );
        assert!(
            text.contains("snat_allocation_duration_seconds_count")
                && text.ends_with('\n')
                && metric(&text, "snat_metrics_report_build_seconds").is_some(),
            "scrape {i} is incomplete:\n{text}"
        );
        seen_builds.push(builds(&text));
    }
    let after = topo.node.run(|| http::get(METRICS, "/metrics").text());
    let builds_after = builds(&after);
    seen_builds.sort_by(f64::total_cmp);
    seen_builds.dedup();
    assert!(
        builds_after > builds_before,
        "the burst was served from a text built before it"
    );
    assert!(
        builds_after - builds_before <= 5.0,
        "{SCRAPES} parallel scrapes cost {} report builds (texts of builds {seen_builds:?})",
        builds_after - builds_before
    );
}

#[test]
fn metrics_can_be_turned_off_and_a_public_address_is_warned_about() {
    let topo = Topology::new(1);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--metrics-addr", "off"],
    );
    let refused = topo.node.run(|| TcpStream::connect(METRICS).map(|_| ()));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "--metrics-addr off still listens: {refused:?}"
    );
    assert!(agent.log().contains("metrics off"), "{}", agent.log());
    drop(agent);

    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--metrics-addr", "0.0.0.0:9469"],
    );
    let log = agent.log();
    assert!(
        log.contains("--metrics-addr 0.0.0.0:9469 is not a loopback address")
            && log.contains("pod addresses")
            && log.contains("--top-sources 0"),
        "{log}"
    );
    let public = SocketAddr::V4(SocketAddrV4::new(NAT_IP, 9469));
    let r = topo.node.run(move || http::get(public, "/metrics"));
    assert_eq!(r.status, 200, "{r:?}");
}
