//! Three nodes share ONE NAT IP, each on its own slice from `snat plan`; a router in front of the
//! internet steers replies to the right node by destination port (`ip rule … dport LO-HI`), as an
//! upstream load balancer or NAT gateway would. Pods on all three nodes connect to the same
//! server at once.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use tests::{
    agent::{snat_bin, Agent},
    netns::{unique_prefix, veth, Netns},
    topo::{connect_server, SERVER},
    traffic::{udp_ask, LeakWatch, TcpClient, TcpServer, UdpServer},
};

const SHARED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);

struct Node {
    pod: Netns,
    ns: Netns,
    uplink: String,
    router_side: String,
}

#[test]
fn three_nodes_share_one_nat_ip_on_their_own_slices() {
    let prefix = unique_prefix();
    let server = Netns::new(&format!("{prefix}-server"));
    let router = Netns::new(&format!("{prefix}-router"));
    connect_server(&prefix, &router, &server);

    // The plan: three nodes, one shared NAT IP, the default range split evenly.
    let plan = std::env::temp_dir().join(format!("{prefix}-plan.json"));
    let out = std::process::Command::new(snat_bin())
        .args([
            "plan",
            "--nodes",
            "3",
            "--nat-ip",
            &SHARED.to_string(),
            "--ports-per-node",
            "10922",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&plan, &out.stdout).unwrap();
    let slices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slice = |i: usize| {
        let s = &slices["slices"][i];
        (
            s["first"].as_u64().unwrap() as u16,
            s["last"].as_u64().unwrap() as u16,
        )
    };

    let nodes: Vec<Node> = (0..3u8)
        .map(|i| {
            let ns = Netns::new(&format!("{prefix}-node{i}"));
            let pod = Netns::new(&format!("{prefix}-pod{i}"));
            let (uplink, router_side) = (format!("{prefix}-up{i}"), format!("{prefix}-r{i}"));
            veth(&ns, &uplink, &router, &router_side);
            ns.ip(&["addr", "add", &format!("100.64.{i}.2/30"), "dev", &uplink]);
            ns.ip(&["route", "add", "default", "via", &format!("100.64.{i}.1")]);
            ns.sysctl("net.ipv4.ip_forward=1");
            router.ip(&[
                "addr",
                "add",
                &format!("100.64.{i}.1/30"),
                "dev",
                &router_side,
            ]);
            // Replies to the shared IP go to the node whose slice holds the destination port.
            let (lo, hi) = slice(i as usize);
            let table = (100 + u32::from(i)).to_string();
            router.ip(&[
                "route",
                "add",
                &SHARED.to_string(),
                "via",
                &format!("100.64.{i}.2"),
                "table",
                &table,
            ]);
            router.ip(&[
                "rule",
                "add",
                "to",
                &SHARED.to_string(),
                "dport",
                &format!("{lo}-{hi}"),
                "table",
                &table,
            ]);
            let (p, n) = (format!("{prefix}-p{i}"), format!("{prefix}-n{i}"));
            veth(&pod, &p, &ns, &n);
            pod.ip(&["addr", "add", &format!("10.{}.0.2/24", i + 1), "dev", &p]);
            pod.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("10.{}.0.1", i + 1),
            ]);
            ns.ip(&["addr", "add", &format!("10.{}.0.1/24", i + 1), "dev", &n]);
            // Every pod draws from the same 100 source ports: preserved ports would collide
            // across nodes if the slices did not keep them apart.
            pod.sysctl("net.ipv4.ip_local_port_range=40000 40099");
            Node {
                pod,
                ns,
                uplink,
                router_side,
            }
        })
        .collect();

    let agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Agent::start(
                &n.ns,
                &n.uplink,
                &[
                    "--internal",
                    "10.0.0.0/8",
                    "--max-mappings",
                    "65536",
                    "--plan",
                    plan.to_str().unwrap(),
                    "--node-index",
                    &i.to_string(),
                ],
            )
        })
        .collect();
    for (i, a) in agents.iter().enumerate() {
        let status = a.json("status", &[]);
        assert_eq!(
            status["port_range"],
            format!("{}:{}", slice(i).0, slice(i).1)
        );
        assert!(
            status["slice"]
                .as_str()
                .unwrap()
                .starts_with(&format!("node {i} of 3")),
            "{status}"
        );
        assert_eq!(status["pools"][0]["ports_total"], 10922);
    }
    let leaks: Vec<LeakWatch> = nodes
        .iter()
        .map(|n| LeakWatch::start(&router, &n.router_side))
        .collect();
    let tcp = TcpServer::start(&server, SocketAddrV4::new(SERVER, 8080));
    let _udp = UdpServer::start(&server, SocketAddrV4::new(SERVER, 5353));

    // All three pods at once: 100 concurrent TCP connections and 10 UDP exchanges each.
    let handles: Vec<_> = nodes
        .iter()
        .map(|n| {
            n.pod.spawn(|| {
                let conns: Vec<TcpClient> = (0..100)
                    .map(|i| {
                        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(5))
                            .unwrap_or_else(|e| panic!("connection {i}: {e}"))
                    })
                    .collect();
                let udp: Vec<SocketAddrV4> = (0..10)
                    .map(|_| {
                        udp_ask(
                            &UdpSocket::bind("0.0.0.0:0").unwrap(),
                            SocketAddrV4::new(SERVER, 5353),
                        )
                        .expect("UDP")
                    })
                    .collect();
                (conns, udp)
            })
        })
        .collect();
    let results: Vec<(Vec<TcpClient>, Vec<SocketAddrV4>)> = handles
        .into_iter()
        .map(|h| h.join().expect("pod"))
        .collect();

    let mut all = HashSet::new();
    for (i, (conns, udp)) in results.iter().enumerate() {
        let (lo, hi) = slice(i);
        for seen in conns.iter().map(|c| c.seen_as).chain(udp.iter().copied()) {
            assert_eq!(*seen.ip(), SHARED);
            assert!(
                (lo..=hi).contains(&seen.port()),
                "node {i}'s flow used port {} outside {lo}-{hi}",
                seen.port()
            );
        }
        for c in conns {
            assert!(all.insert(c.seen_as), "two flows collided on {}", c.seen_as);
        }
    }
    assert_eq!(all.len(), 300);
    assert_eq!(tcp.peers().len(), 300);
    // Every flow works both ways after all are open.
    for (conns, _) in results {
        for mut c in conns {
            assert_eq!(c.echo(b"ok").unwrap(), b"ok");
        }
    }
    for l in leaks {
        l.assert_no_leak();
    }
    drop(agents);
    let _ = std::fs::remove_file(&plan);
}
