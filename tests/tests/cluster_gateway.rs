//! Two nodes share ONE NAT IP behind a gateway namespace running `snat gateway`, with a real etcd
//! in a namespace of its own: range 40000:40511 (8 blocks of 64), node A's pod holds 300
//! connections and node B's 100 — all succeed, where a fixed split would give each 256. Every
//! connection is seen by the server from the NAT IP, on a port of a block etcd assigns to the
//! node it came from, and the gateway returned every reply to the right node (the connections
//! carry data both ways).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tests::{
    agent::{snat_bin, Agent},
    etcd::Etcd,
    netns::{unique_prefix, veth, Netns},
    traffic::{wait_for, Mode, TcpClient, TcpServer},
};

const NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

struct Node {
    ns: Netns,
    uplink: String,
    pod: Netns,
}

/// A `snat gateway` process and its log, stopped on drop (its log printed if the test failed).
struct GatewayProc(Child, std::path::PathBuf);

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "snat gateway's log:\n{}",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.1);
    }
}

fn node(p: &str, i: u8, gw: &Netns) -> Node {
    let ns = Netns::new(&format!("{p}-n{i}"));
    let uplink = format!("{p}-u{i}");
    let gw_side = format!("{p}-g{i}");
    veth(&ns, &uplink, gw, &gw_side);
    gw.ip(&["addr", "add", &format!("10.77.{i}.1/24"), "dev", &gw_side]);
    ns.ip(&["addr", "add", &format!("10.77.{i}.2/24"), "dev", &uplink]);
    ns.ip(&["route", "add", "default", "via", &format!("10.77.{i}.1")]);
    ns.sysctl("net.ipv4.ip_forward=1");
    let pod = Netns::new(&format!("{p}-p{i}"));
    let (pi, ni) = (format!("{p}-pp{i}"), format!("{p}-pn{i}"));
    veth(&pod, &pi, &ns, &ni);
    pod.ip(&["addr", "add", &format!("10.1.{i}.2/24"), "dev", &pi]);
    pod.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")]);
    ns.ip(&["addr", "add", &format!("10.1.{i}.1/24"), "dev", &ni]);
    Node { ns, uplink, pod }
}

fn start_node(n: &Node, etcd: &Etcd, name: &str) -> Agent {
    let endpoints = etcd.endpoints().join(",");
    let nat = NAT.to_string();
    Agent::start(
        &n.ns,
        &n.uplink,
        &[
            "--internal",
            "10.1.0.0/16",
            "--max-mappings",
            "4096",
            "--nat-ip",
            &nat,
            "--port-range",
            "40000:40511",
            "--etcd-endpoints",
            &endpoints,
            "--node-name",
            name,
            "--lease-ttl",
            "10s",
            "--block-cooldown",
            "2s",
            "--fence-margin",
            "1s",
        ],
    )
}

/// Opens `n` connections from `pod` in rounds of 10, 400 ms apart: within the node's headroom
/// (half a block free), so no SYN waits for a block (a faster burst is held back until the next
/// block opens and its SYNs retransmitted a second later, see docs/cluster.md "Pressure").
fn hold(pod: &Netns, n: usize, to: SocketAddrV4, agent: &Agent) -> Vec<TcpClient> {
    let mut held = Vec::new();
    while held.len() < n {
        let k = (n - held.len()).min(10);
        let got: Vec<std::io::Result<TcpClient>> = pod.run(move || {
            (0..k)
                .map(|_| TcpClient::connect(to, Duration::from_secs(3)))
                .collect()
        });
        for (i, c) in got.into_iter().enumerate() {
            match c {
                Ok(c) => held.push(c),
                Err(e) => panic!(
                    "flow {} of {n}: {e}\nstatus: {}\nstats: {}",
                    held.len() + i,
                    agent.json("status", &[])["cluster"],
                    agent.stats()
                ),
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    held
}

#[test]
fn two_nodes_share_one_nat_ip_through_the_gateway() {
    let p = unique_prefix();
    let server = Netns::new(&format!("{p}-srv"));
    let gw = Netns::new(&format!("{p}-gw"));
    let (s0, g0) = (format!("{p}-s0"), format!("{p}-gs"));
    veth(&server, &s0, &gw, &g0);
    server.ip(&["addr", "add", "203.0.113.10/24", "dev", &s0]);
    server.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    gw.ip(&["addr", "add", "203.0.113.1/24", "dev", &g0]);
    gw.sysctl("net.ipv4.ip_forward=1");
    let a = node(&p, 1, &gw);
    let b = node(&p, 2, &gw);
    let etcd = Etcd::start(1);
    let _links = [etcd.connect(&gw), etcd.connect(&a.ns), etcd.connect(&b.ns)];

    let to = SocketAddrV4::new(SERVER, 8080);
    let _srv = TcpServer::start_mode(&server, to, Mode::Echo);
    let agent_a = start_node(&a, &etcd, "node-a");
    // The gateway once the geometry is in etcd.
    let log = std::env::temp_dir().join(format!("{p}-gateway.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &gw.name])
        .arg(snat_bin())
        .args([
            "gateway",
            "--iface",
            &g0,
            "--etcd-endpoints",
            &etcd.endpoints().join(","),
        ])
        .args(["--lease-ttl", "10s"])
        .env("RUST_LOG", "snat_user=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _gateway = GatewayProc(child, log.clone());
    wait_for(Duration::from_secs(15), || {
        let o = etcd.etcdctl(&["get", "--prefix", "/snat/v1/gateways/", "--keys-only"]);
        (!String::from_utf8_lossy(&o.stdout).trim().is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the gateway did not register:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let agent_b = start_node(&b, &etcd, "node-b");

    let held_a = hold(&a.pod, 300, to, &agent_a);
    let held_b = hold(&b.pod, 100, to, &agent_b);
    let blocks = etcd.blocks();
    let gw_log = || std::fs::read_to_string(&log).unwrap_or_default();
    for (held, name) in [(&held_a, "node-a"), (&held_b, "node-b")] {
        for c in held {
            assert_eq!(*c.seen_as.ip(), NAT, "{name}");
            let block = (c.seen_as.port() - 40000) / 64;
            assert_eq!(
                blocks.get(&block).map(String::as_str),
                Some(name),
                "port {} of {name}: blocks {blocks:?}\n{}",
                c.seen_as.port(),
                gw_log()
            );
        }
    }
    // Replies come back through the gateway: data echoed on every connection of both nodes.
    for mut c in held_a.into_iter().chain(held_b) {
        let back = c
            .echo(b"ping through the gateway")
            .unwrap_or_else(|e| panic!("an echo through the gateway: {e}\n{}", gw_log()));
        assert_eq!(back, b"ping through the gateway");
    }
    let held_by = |n: &str| blocks.values().filter(|v| *v == n).count();
    assert!(
        held_by("node-a") >= 5 && held_by("node-b") >= 2,
        "{blocks:?}"
    );
    // The gateway published the revision it applied.
    let o = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/snat/v1/gateways/",
        "--print-value-only",
    ]);
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert!(v["applied_revision"].as_i64().unwrap() > 0, "{v}");

    // The gateway's /metrics (default address, in its namespace): connected, the routes, the
    // replies it forwarded (every connection's SYN-ACK and echo at least), and no lag once the
    // store is quiet.
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let scrape = || {
        gw.run(|| {
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
        metric(&text, "snat_gateway_published_revision")
            >= v["applied_revision"].as_i64().unwrap() as f64,
        "{text}"
    );
    assert!(
        text.contains("snat_gateway_packets_total{result=\"drop_no_route\"}"),
        "{text}"
    );
    drop(agent_a);
    drop(agent_b);
}
