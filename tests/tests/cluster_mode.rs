//! Cluster mode end to end on one node, with a real etcd 3.4.23 in a namespace of its own: the
//! node leases blocks as its pods need them (and only up to `--max-blocks`; a burst faster than
//! its usage reads is held back while a block is on its way, not refused), every translated
//! port lies in a block it holds, idle blocks go back after the cool-down, a plain stop gives
//! everything back and revokes the lease, and pool changes are refused. (Several nodes sharing a
//! NAT IP need `snat gateway` to return their replies: see docs/cluster.md for what comes next.)

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::Agent,
    etcd::Etcd,
    topo::{Topology, NAT_IP, SERVER},
    traffic::{wait_for, TcpClient, TcpServer},
};

const RANGE_LO: u16 = 40000;
const BLOCK: u16 = 64;

fn start(topo: &Topology, etcd: &Etcd, extra: &[&str]) -> Agent {
    let endpoints = etcd.endpoints().join(",");
    let nat = NAT_IP.to_string();
    let mut args = vec![
        "--internal",
        tests::topo::POD_CIDR,
        "--max-mappings",
        "4096",
        "--nat-ip",
        &nat,
        // Four blocks of 64.
        "--port-range",
        "40000:40255",
        "--etcd-endpoints",
        &endpoints,
        "--node-name",
        "node-1",
        "--block-size",
        "64",
        "--lease-ttl",
        "10s",
        "--block-cooldown",
        "2s",
        "--fence-margin",
        "1s",
        "--tcp-fin-timeout",
        "1s",
        "--tcp-rst-timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    Agent::start(&topo.node, &topo.uplink, &args)
}

fn cluster(agent: &Agent) -> Value {
    agent.json("status", &[])["cluster"].clone()
}

/// Held blocks (index, state) as `snat status` lists them.
fn blocks(agent: &Agent) -> Vec<(u64, String)> {
    cluster(agent)["blocks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["index"].as_u64().unwrap_or(u64::MAX),
                        b["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for(Duration::from_secs(secs), &mut f).unwrap_or_else(|| panic!("{what} within {secs}s"))
}

#[test]
fn a_node_leases_blocks_as_its_pods_need_them_and_gives_them_back() {
    let topo = Topology::new(1);
    let etcd = Etcd::start(1);
    let _link = etcd.connect(&topo.node);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&topo.server, to);
    let agent = start(&topo, &etcd, &["--max-blocks", "3"]);

    // --min-blocks 1: one block as soon as the node is registered, in etcd under its name.
    until("the first block", 10, || {
        (blocks(&agent).iter().filter(|b| b.1 == "open").count() == 1).then_some(())
    });
    assert_eq!(etcd.blocks().len(), 1);
    let c = cluster(&agent);
    assert_eq!(c["node"], "node-1");
    assert_eq!(c["connected"], true);
    assert!(c["fence_in_seconds"].as_f64().unwrap() > 5.0, "{c}");

    // 150 connections at once (a thread each), faster than any read of the node's usage: a
    // SYN that finds no port while another block is on its way is held back, not refused, and
    // its retransmission a second later gets the new block. It grows to three blocks, and every
    // connection succeeds.
    let mut held: Vec<TcpClient> = topo.pods[0].ns.run(move || {
        // Threads made here share the pod's namespace.
        let threads: Vec<_> = (0..150)
            .map(|i| {
                std::thread::spawn(move || {
                    TcpClient::connect(to, Duration::from_secs(8))
                        .unwrap_or_else(|e| panic!("flow {i}: {e}"))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    // Whether any SYN had to be held back depends on how the 150 race the agent's 5 ms
    // pressure poll (in one CI run the claims kept ahead of all of them); the holding back
    // itself is pinned by `blocks.rs` on crafted packets. What must hold either way: no flow
    // was refused.
    eprintln!(
        "SYNs held back while a block was on its way: {}",
        agent.counter("egress", "drop_awaiting_block")
    );
    assert_eq!(agent.counter("reject", "rst_sent"), 0);
    let held_blocks = blocks(&agent);
    assert_eq!(held_blocks.len(), 3, "{held_blocks:?}");
    // Every translated port lies in a block the node holds, and etcd agrees.
    let indexes: Vec<u64> = held_blocks.iter().map(|b| b.0).collect();
    for c in &held {
        assert_eq!(*c.seen_as.ip(), NAT_IP);
        let block = u64::from((c.seen_as.port() - RANGE_LO) / BLOCK);
        assert!(
            indexes.contains(&block),
            "port {} outside {indexes:?}",
            c.seen_as.port()
        );
    }
    let in_etcd = etcd.blocks();
    assert_eq!(in_etcd.len(), 3, "{in_etcd:?}");
    assert!(in_etcd.values().all(|n| n == "node-1"));

    // --max-blocks 3 (192 ports): the 193rd connection is refused, and the status says why.
    let more: Vec<std::io::Result<TcpClient>> = topo.pods[0].ns.run(move || {
        (0..60)
            .map(|_| TcpClient::connect(to, Duration::from_secs(2)))
            .collect()
    });
    let (ok, refused): (Vec<_>, Vec<_>) = more.into_iter().partition(Result::is_ok);
    assert_eq!(held.len() + ok.len(), 192, "{} refused", refused.len());
    // At the cap nothing is on its way: refused at once, with a RST.
    assert!(agent.counter("reject", "rst_sent") > 0);
    held.extend(ok.into_iter().map(Result::unwrap));
    let c = cluster(&agent);
    assert_eq!(c["shortage"]["198.51.100.1"], "max_blocks", "{c}");

    // Pool changes are the cluster's, not one node's.
    let (ok, _, err) = agent.cli(&["set", "--iface", &topo.uplink, "port-range", "40000:40511"]);
    assert!(!ok && err.contains("refused in cluster mode"), "{err}");

    // The connections close: after the FIN timeout and the cool-down, the node is back to its
    // minimum of one block, in etcd too.
    drop(held);
    until("the blocks to go back", 20, || {
        (blocks(&agent).len() == 1 && etcd.blocks().len() == 1).then_some(())
    });
    assert!(cluster(&agent)["releases"]["idle"].as_u64().unwrap_or(0) >= 2);

    // A plain stop: the last block goes back a cool-down later and the lease is revoked.
    let started = Instant::now();
    let (status, _) = agent.stop();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(etcd.blocks().is_empty(), "{:?}", etcd.blocks());
    let nodes = etcd.etcdctl(&["get", "--prefix", "/snat/v1/nodes/", "--keys-only"]);
    assert_eq!(
        String::from_utf8_lossy(&nodes.stdout).trim(),
        "",
        "the lease went, and the name with it"
    );
}

#[test]
fn a_second_agent_under_a_live_name_and_a_disagreeing_geometry_are_refused_before_attaching() {
    let topo = Topology::new(1);
    let other = Topology::new(1);
    let etcd = Etcd::start(1);
    let _link = etcd.connect(&topo.node);
    let _link2 = etcd.connect(&other.node);
    let agent = start(&topo, &etcd, &[]);
    until("the node to register", 10, || {
        (cluster(&agent)["ready"] == true).then_some(())
    });
    let endpoints = etcd.endpoints().join(",");
    let nat = NAT_IP.to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["netns", "exec", &other.node.name];
        let bin = tests::agent::snat_bin();
        let bin = bin.to_str().unwrap().to_owned();
        args.push(&bin);
        args.extend_from_slice(&[
            "run",
            "--iface",
            &other.uplink,
            "--internal",
            tests::topo::POD_CIDR,
            "--nat-ip",
            &nat,
            "--etcd-endpoints",
            &endpoints,
            "--metrics-addr",
            "off",
        ]);
        args.extend_from_slice(extra);
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "--port-range",
        "40000:40255",
        "--node-name",
        "node-1",
        "--lease-ttl",
        "10s",
        "--block-cooldown",
        "2s",
        "--fence-margin",
        "1s",
    ]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("node name \"node-1\" is held by another agent's live lease"),
        "{err}"
    );
    let (code, err) = run(&[
        "--port-range",
        "40000:40511",
        "--node-name",
        "node-2",
        "--lease-ttl",
        "10s",
        "--block-cooldown",
        "2s",
        "--fence-margin",
        "1s",
    ]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("--port-range: 40000:40511 here, 40000:40255 in the cluster"),
        "{err}"
    );
    drop(agent);
}
