//! `snat cluster status` and `snat cluster release` against a real etcd 3.4.23 and two agents in
//! cluster mode on one NAT IP (range 40000:40255: four blocks of 64). The status lists both
//! nodes with their blocks and the free count; an unreachable etcd is an error naming the
//! endpoint within seconds. Node B's agent is killed with SIGKILL: a release is refused while
//! B's lease is healthy; with `--dead` B's blocks are quarantined and its lease revoked, and node
//! A, short of ports, gets one of them only once the cool-down has passed since the release.
//! Without `--dead`, a release goes ahead once the dead node's lease is within the fence margin.

use std::{
    net::SocketAddrV4,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::{snat_bin, Agent},
    etcd::Etcd,
    netns::Netns,
    topo::{Topology, NAT_IP, SERVER},
    traffic::{wait_for, TcpClient, TcpServer},
};

const COOLDOWN: Duration = Duration::from_secs(3);

fn start(topo: &Topology, etcd: &Etcd, name: &str, min_blocks: &str) -> Agent {
    start_with(topo, etcd, name, min_blocks, "2s")
}

fn start_with(topo: &Topology, etcd: &Etcd, name: &str, min_blocks: &str, margin: &str) -> Agent {
    let endpoints = etcd.endpoints().join(",");
    let nat = NAT_IP.to_string();
    Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            tests::topo::POD_CIDR,
            "--max-mappings",
            "4096",
            "--nat-ip",
            &nat,
            "--port-range",
            "40000:40255",
            "--etcd-endpoints",
            &endpoints,
            "--node-name",
            name,
            "--min-blocks",
            min_blocks,
            "--lease-ttl",
            "12s",
            "--block-cooldown",
            "3s",
            "--fence-margin",
            margin,
        ],
    )
}

/// `snat cluster <args…>` in `ns`: (success, stdout, stderr, how long it took).
fn cluster_cli(ns: &Netns, args: &[&str]) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(snat_bin())
        .arg("cluster")
        .args(args)
        .output()
        .expect("spawning snat cluster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

fn status(etcd: &Etcd) -> Value {
    let endpoints = etcd.endpoints().join(",");
    let (ok, out, err, _) = cluster_cli(
        &etcd.client,
        &["status", "--etcd-endpoints", &endpoints, "--json"],
    );
    assert!(ok, "snat cluster status failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
}

fn node<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

#[test]
fn status_lists_the_nodes_and_release_frees_a_dead_nodes_blocks_after_the_cool_down() {
    let etcd = Etcd::start(1);
    let (ta, tb) = (Topology::new(1), Topology::new(1));
    let _links = [etcd.connect(&ta.node), etcd.connect(&tb.node)];
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&ta.server, to);
    let agent_a = start(&ta, &etcd, "node-a", "1");
    let agent_b = start(&tb, &etcd, "node-b", "2");
    wait_for(Duration::from_secs(15), || {
        let b = etcd.blocks();
        let n = |name: &str| b.values().filter(|v| *v == name).count();
        (n("node-a") == 1 && n("node-b") == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("blocks: {:?}", etcd.blocks()));

    // The status: both nodes, their blocks with ports and epochs, one block free.
    let st = status(&etcd);
    assert_eq!(st["geometry"]["port_range"], "40000:40255", "{st:#}");
    assert_eq!(st["geometry"]["blocks_per_ip"], 4);
    let b = node(&st, "node-b").unwrap_or_else(|| panic!("{st:#}"));
    let blocks = b["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{st:#}");
    for blk in blocks {
        let (first, last) = (
            blk["first_port"].as_u64().unwrap(),
            blk["last_port"].as_u64().unwrap(),
        );
        assert_eq!(first, 40000 + 64 * blk["index"].as_u64().unwrap());
        assert_eq!(last, first + 63);
        assert!(blk["epoch"].as_i64().unwrap() > 0);
        assert_eq!(blk["nat_ip"], NAT_IP.to_string());
    }
    let ttl = b["ttl_seconds"].as_i64().unwrap();
    assert!((1..=12).contains(&ttl), "{st:#}");
    assert_eq!(b["granted_ttl_seconds"], 12);
    assert_eq!(b["address"], NAT_IP.to_string());
    assert_eq!(
        node(&st, "node-a").unwrap()["blocks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(st["nat_ips"][0]["free"], 1, "{st:#}");
    assert_eq!(st["nat_ips"][0]["held"], 3);
    let endpoints = etcd.endpoints().join(",");
    let (ok, text, err, _) = cluster_cli(&etcd.client, &["status", "--etcd-endpoints", &endpoints]);
    assert!(ok, "{err}");
    assert!(
        text.contains("node-a") && text.contains("node-b") && text.contains("FREE"),
        "{text}"
    );

    // An etcd that does not answer: an error naming the endpoint, within seconds.
    let (ok, _, err, took) = cluster_cli(
        &etcd.client,
        &["status", "--etcd-endpoints", "http://10.250.0.1:2399"],
    );
    assert!(!ok);
    assert!(err.contains("http://10.250.0.1:2399"), "{err}");
    assert!(took < Duration::from_secs(15), "{took:?}");

    // Node A holds 120 connections in its own block and the free one: it wants a third.
    let mut held = Vec::new();
    while held.len() < 120 {
        let got: Vec<TcpClient> = ta.pods[0].ns.run(move || {
            (0..10)
                .map(|_| TcpClient::connect(to, Duration::from_secs(3)).expect("a connection"))
                .collect()
        });
        held.extend(got);
        std::thread::sleep(Duration::from_millis(400));
    }
    let before = etcd.blocks();
    assert_eq!(
        before.values().filter(|v| *v == "node-a").count(),
        2,
        "{before:?}"
    );
    let b_blocks: Vec<u16> = before
        .iter()
        .filter(|(_, v)| *v == "node-b")
        .map(|(k, _)| *k)
        .collect();

    // B's agent dies; its lease is still healthy: a release is refused.
    agent_b.kill();
    let release = |timers: [&str; 2], extra: &[&str]| {
        let mut args = vec![
            "release",
            "node-b",
            "--etcd-endpoints",
            &endpoints,
            "--block-cooldown",
            timers[0],
            "--fence-margin",
            timers[1],
        ];
        args.extend_from_slice(extra);
        cluster_cli(&etcd.client, &args)
    };
    let (ok, _, err, _) = release(["3s", "2s"], &[]);
    assert!(!ok, "released a node with a healthy lease");
    assert!(
        err.contains("more than --fence-margin 2s") && err.contains("--dead"),
        "{err}"
    );
    assert_eq!(etcd.blocks(), before, "a refused release changes nothing");

    // On --dead: quarantined, the lease revoked. The command's timers are shorter than the
    // node's (3 s + 2 s, published with its record): the node's win.
    let released_at = Instant::now();
    let (ok, out, err, _) = release(["1s", "1s"], &["--dead"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("quarantined 2 blocks") && out.contains("revoked lease"),
        "{out}"
    );
    assert!(
        out.contains("using the stricter of each") && out.contains("for 5s"),
        "{out}"
    );
    let st = status(&etcd);
    assert!(node(&st, "node-b").is_none(), "{st:#}");
    let q = st["quarantined"].as_array().unwrap();
    assert_eq!(q.len(), 2, "{st:#}");
    assert!(q.iter().all(|b| b["node"] == "node-b"), "{st:#}");
    assert_eq!(st["nat_ips"][0]["quarantined"], 2);
    assert_eq!(st["nat_ips"][0]["free"], 0);

    // A gets one of B's blocks, but only once the cool-down has passed since the release.
    let mut claimed_after = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let blocks = etcd.blocks();
        let at = released_at.elapsed();
        if b_blocks
            .iter()
            .any(|i| blocks.get(i).map(String::as_str) == Some("node-a"))
        {
            claimed_after = Some(at);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = claimed_after.unwrap_or_else(|| {
        panic!(
            "node A got none of B's blocks {b_blocks:?}: {:?}\n{}",
            etcd.blocks(),
            agent_a.json("status", &[])["cluster"]
        )
    });
    assert!(after >= COOLDOWN, "claimed {after:?} after the release");
    drop(held);
    drop(agent_a);
}

#[test]
fn without_dead_a_release_waits_for_the_lease_to_be_within_the_fence_margin() {
    let etcd = Etcd::start(1);
    let topo = Topology::new(1);
    let _link = etcd.connect(&topo.node);
    // A margin of 6 s: the lease is within it for its last 6 s.
    let agent = start_with(&topo, &etcd, "node-c", "1", "6s");
    wait_for(Duration::from_secs(15), || {
        etcd.blocks().values().any(|v| v == "node-c").then_some(())
    })
    .unwrap_or_else(|| panic!("blocks: {:?}", etcd.blocks()));
    agent.kill();
    let endpoints = etcd.endpoints().join(",");
    // Within the margin from 5 s left (etcd rounds down: less than 6); 4 leaves the poll slack.
    let ttl = |st: &Value| node(st, "node-c").and_then(|n| n["ttl_seconds"].as_i64());
    wait_for(Duration::from_secs(15), || {
        ttl(&status(&etcd)).filter(|t| *t <= 4).map(|_| ())
    })
    .expect("the dead node's lease running down");
    let (ok, out, err, _) = cluster_cli(
        &etcd.client,
        &[
            "release",
            "node-c",
            "--etcd-endpoints",
            &endpoints,
            "--block-cooldown",
            "3s",
            "--fence-margin",
            "6s",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("within --fence-margin 6s") && out.contains("quarantined 1 block "),
        "{out}"
    );
    let st = status(&etcd);
    assert!(node(&st, "node-c").is_none(), "{st:#}");
    assert_eq!(st["quarantined"].as_array().unwrap().len(), 1, "{st:#}");
}
