//! A stopped agent fails closed: after a plain stop (`--on-stop closed`, the default) no packet
//! with an internal source reaches the internet side while no agent runs, the stop guard counts
//! what it dropped, a new agent takes over without a gap and reports it, and `snat cleanup` or
//! `--on-stop open` give the node its own routing back. Both attach modes.

use std::{
    net::{SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tests::{
    agent::{cleanup, Agent},
    netns::BpfFs,
    topo::{Topology, SERVER},
    traffic::{LeakWatch, TcpClient, TcpServer, UdpServer},
};

fn agent(topo: &Topology, bpffs: &BpfFs, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 4096, &[&["--pin-dir", bpffs.arg()], extra].concat())
}

/// Sends `n` UDP datagrams from pod 0 to the server's port 5353, 1 ms apart.
fn send_udp(topo: &Topology, n: u32) {
    topo.pods[0].ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..n {
            let _ = s.send_to(&i.to_be_bytes(), SocketAddrV4::new(SERVER, 5353));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Whether a TCP connection from pod 0 to the server completes.
fn connects(topo: &Topology, timeout: Duration) -> bool {
    topo.pods[0]
        .ns
        .run(move || TcpClient::connect(SocketAddrV4::new(SERVER, 8080), timeout).is_ok())
}

/// The cls_bpf filters on the uplink's egress, as `tc` lists them (clsact mode).
fn egress_filters(topo: &Topology) -> String {
    let out = topo
        .node
        .exec(&["tc", "filter", "show", "dev", &topo.uplink, "egress"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ids of the stop guard programs loaded on the machine (each agent loads one, for its own stop;
/// a stopped agent's stays loaded while it guards).
fn guard_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("snat_guard"))
        .map(|p| p.id())
        .collect()
}

/// Waits up to 3 s (the kernel frees a replaced program after an RCU grace period) until none
/// of `ids` is loaded; returns those still loaded.
fn gone(ids: &[u32]) -> Vec<u32> {
    let still = || -> Vec<u32> {
        guard_ids()
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect()
    };
    tests::traffic::wait_for(Duration::from_secs(3), || {
        Some(still()).filter(Vec::is_empty)
    })
    .unwrap_or_else(still)
}

fn stop_guard_closes_and_hands_over(attach: &str) {
    let topo = Topology::new(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let first = agent(&topo, &bpffs, &["--attach", attach]);
    assert!(connects(&topo, Duration::from_secs(3)));
    let (status, _) = first.stop();
    assert!(status.success(), "{status}");
    assert!(
        bpffs
            .path
            .join(&topo.uplink)
            .join("snat_guard_drops")
            .exists(),
        "the guard's counter is pinned"
    );
    let guard = tests::traffic::wait_for(Duration::from_secs(3), || {
        Some(guard_ids()).filter(|ids| ids.len() == 1)
    })
    .expect("exactly the stopped agent's guard is loaded");
    if attach == "clsact" {
        assert!(
            egress_filters(&topo).contains("snat_guard"),
            "{}",
            egress_filters(&topo)
        );
    }

    // No agent: pods reach nothing, and nothing of theirs leaves.
    let udp_before = udp.peers().len();
    assert!(!connects(&topo, Duration::from_millis(500)));
    send_udp(&topo, 50);
    let pinged = topo.pods[0].ns.exec_unchecked(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        &SERVER.to_string(),
    ]);
    assert!(!pinged.status.success(), "a ping got through the guard");
    assert_eq!(udp.peers().len(), udp_before, "a datagram got through");
    assert_eq!(leaks.counts().1, 0, "an internal source left");

    // A new agent takes over while the pod keeps sending: no gap, nothing leaks, and it says
    // what the guard dropped.
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (sending, sent) = (sending.clone(), sent.clone());
        topo.pods[0].ns.spawn(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let mut i = 0u32;
            while sending.load(Ordering::Relaxed) && i < 20_000 {
                let _ = s.send_to(&i.to_be_bytes(), SocketAddrV4::new(SERVER, 5353));
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let second = agent(&topo, &bpffs, &["--attach", attach]);
    std::thread::sleep(Duration::from_millis(200));
    sending.store(false, Ordering::Relaxed);
    sender.join().expect("sender");
    let status = second.json("status", &[]);
    let dropped = status["guard_dropped"].as_u64().expect("guard_dropped");
    // At least the 50 datagrams, the SYN (and its retransmissions) and the pings.
    assert!(dropped > 50 + 2, "the guard counted {dropped}");
    assert!(
        second.log().contains("took over from the stop guard"),
        "{}",
        second.log()
    );
    assert_eq!(gone(&guard), [0u32; 0], "the guard outlived the takeover");
    assert!(!egress_filters(&topo).contains("snat_guard"));
    assert!(
        udp.peers().len() > udp_before,
        "nothing got through after the takeover ({} sent)",
        sent.load(Ordering::Relaxed)
    );
    assert!(connects(&topo, Duration::from_secs(3)));
    let metrics = second.scrape(&topo.node);
    assert!(
        metrics.contains("snat_stop_guard_dropped_packets"),
        "{metrics}"
    );

    // Stopped again; `snat cleanup` takes the guard away and the node routes as before.
    drop(second);
    let guard = guard_ids();
    assert_eq!(guard.len(), 1, "the second agent left its guard");
    cleanup(&topo, &bpffs);
    assert!(!bpffs.path.join(&topo.uplink).exists());
    assert_eq!(gone(&guard), [0u32; 0], "snat cleanup left the guard");
    assert!(!egress_filters(&topo).contains("snat"));
    leaks.assert_no_leak();
    let after = LeakWatch::start(&topo.router, &topo.router_uplink);
    send_udp(&topo, 10);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        after.counts().1 >= 10,
        "after cleanup the node forwards pod traffic as it is: {:?}",
        after.counts()
    );
}

#[test]
fn a_plain_stop_leaves_a_guard_until_the_next_agent_tcx() {
    stop_guard_closes_and_hands_over("tcx");
}

#[test]
fn a_plain_stop_leaves_a_guard_until_the_next_agent_clsact() {
    stop_guard_closes_and_hands_over("clsact");
}

#[test]
fn on_stop_open_gives_the_node_its_routing_back() {
    let topo = Topology::new(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let first = agent(&topo, &bpffs, &["--on-stop", "open"]);
    let (status, _) = first.stop();
    assert!(status.success());
    assert!(!bpffs.path.join(&topo.uplink).exists(), "nothing is left");
    assert_eq!(gone(&guard_ids()), [0u32; 0], "no guard stays loaded");
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    send_udp(&topo, 10);
    std::thread::sleep(Duration::from_millis(100));
    assert!(leaks.counts().1 >= 10, "{:?}", leaks.counts());
}

/// How the uplink's XDP program is attached, as `ip link` shows it: `xdp` (native),
/// `xdpgeneric`, or `None`.
fn xdp_on(topo: &Topology) -> Option<&'static str> {
    let out = topo
        .node
        .exec(&["ip", "-d", "link", "show", "dev", &topo.uplink]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains(" xdpgeneric ") || text.contains("prog/xdpgeneric") {
        Some("xdpgeneric")
    } else if text.contains(" xdp ") || text.contains("prog/xdp ") {
        Some("xdp")
    } else {
        None
    }
}

/// The XDP reply path's whole life on the uplink: attached in native mode on a veth and pinned,
/// kept by `--keep-state` and taken over by the next agent (atomically, the same link), taken
/// away by a plain stop (the guard stays on egress) and by an agent that wants `--ingress tc`,
/// and by `snat cleanup`.
#[test]
fn the_xdp_program_is_pinned_taken_over_and_removed_like_the_tc_ones() {
    let topo = Topology::new(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let _tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let pin = bpffs.path.join(&topo.uplink).join("link_snat_xdp_native");

    let first = agent(&topo, &bpffs, &["--ingress", "xdp", "--keep-state"]);
    assert_eq!(xdp_on(&topo), Some("xdp"), "native XDP on a veth");
    assert!(pin.exists(), "the XDP link is pinned");
    assert_eq!(first.json("status", &[])["ingress"], "xdp-native");
    assert!(connects(&topo, Duration::from_secs(3)));
    let (status, _) = first.stop();
    assert!(status.success());
    assert_eq!(
        xdp_on(&topo),
        Some("xdp"),
        "--keep-state leaves XDP attached"
    );

    let second = agent(&topo, &bpffs, &["--ingress", "xdp"]);
    assert!(
        second.log().contains("taking over the XDP link"),
        "{}",
        second.log()
    );
    assert!(connects(&topo, Duration::from_secs(3)));
    let metrics = second.scrape(&topo.node);
    assert!(
        metrics.contains("snat_ingress_path{path=\"xdp\",mode=\"native\"} 1"),
        "{metrics}"
    );
    let (status, _) = second.stop();
    assert!(status.success());
    assert_eq!(xdp_on(&topo), None, "a plain stop takes XDP away");
    assert!(!pin.exists());
    assert_eq!(guard_ids().len(), 1, "the guard stays on egress");

    // Generic mode on request; an agent that wants TC takes a kept XDP program away.
    let third = agent(&topo, &bpffs, &["--ingress", "xdp-generic", "--keep-state"]);
    assert_eq!(xdp_on(&topo), Some("xdpgeneric"));
    assert!(connects(&topo, Duration::from_secs(3)));
    drop(third);
    let fourth = agent(&topo, &bpffs, &["--ingress", "tc", "--keep-state"]);
    assert_eq!(
        xdp_on(&topo),
        None,
        "--ingress tc removed the kept XDP program"
    );
    assert!(connects(&topo, Duration::from_secs(3)));
    drop(fourth);

    let fifth = agent(&topo, &bpffs, &["--ingress", "xdp", "--keep-state"]);
    drop(fifth);
    assert_eq!(xdp_on(&topo), Some("xdp"));
    cleanup(&topo, &bpffs);
    assert_eq!(xdp_on(&topo), None, "snat cleanup takes XDP away");
    assert!(!bpffs.path.join(&topo.uplink).exists());
}
