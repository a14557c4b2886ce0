//! Restarting the agent without losing flows: state pinned on a BPF file system outlives the
//! agent (SIGKILL or `--keep-state`), a new agent takes it over, a plain stop removes it, and state
//! of another format is refused.

use std::{net::SocketAddrV4, time::Duration};

use aya::maps::{Array, Map, MapData};
use snat_common::StateHeader;
use tests::{
    agent::{snat_bin, Agent},
    netns::BpfFs,
    topo::{Topology, NAT_IP, POD_CIDR, SERVER},
    traffic::{LeakWatch, TcpClient, TcpServer},
};

fn agent(topo: &Topology, bpffs: &BpfFs, extra: &[&str]) -> Agent {
    Agent::for_pods(topo, 65536, &[&["--pin-dir", bpffs.arg()], extra].concat())
}

fn snat_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("snat_egress" | "snat_ingress")))
        .count()
}

/// Echoes `data` over the held connection from inside the pod.
fn echo(topo: &Topology, conn: TcpClient, data: &'static [u8]) -> TcpClient {
    topo.pods[0].ns.run(move || {
        let mut c = conn;
        assert_eq!(
            c.echo(data).expect("the held connection still passes data"),
            data
        );
        c
    })
}

#[test]
fn a_killed_agent_restarts_without_losing_flows() {
    let topo = Topology::new(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&topo.server, to);
    let first = agent(&topo, &bpffs, &[]);
    let conn = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).expect("connect"));
    let seen = conn.seen_as;
    let conn = echo(&topo, conn, b"before");
    first.kill();

    // No agent: the pinned links keep the programs attached and translating.
    let conn = echo(&topo, conn, b"while the agent is down");
    let during = topo.pods[0].ns.run(move || {
        TcpClient::connect(to, Duration::from_secs(3))
            .expect("new flow while down")
            .seen_as
    });
    assert_eq!(*during.ip(), NAT_IP);

    // Stopped with `--on-stop open` below, so that everything goes (the default leaves the
    // stop guard, which `stop.rs` tests).
    let second = agent(&topo, &bpffs, &["--on-stop", "open"]);
    assert!(
        second.log().contains("taking over the state pinned"),
        "{}",
        second.log()
    );
    let conn = echo(&topo, conn, b"after the restart");
    let rows = second.json("conns", &["--proto", "tcp"]);
    assert!(
        rows["conns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["nat"] == seen.to_string()),
        "the mapping survived: {rows}"
    );
    // The release program and use counts carry on: a new flow works and gets its own port.
    let after = topo.pods[0].ns.run(move || {
        TcpClient::connect(to, Duration::from_secs(3))
            .expect("new flow")
            .seen_as
    });
    assert_ne!(after, seen);
    drop(conn);
    // Both connections were closed by the pod; each close ends with the pod's last ACK, which
    // must leave translated: `--on-stop open` below lets the pod's own address out once the
    // programs are gone. The pod's sockets reach TIME_WAIT when that ACK has been sent.
    let server = SERVER.to_string();
    let closed = tests::traffic::wait_for(Duration::from_secs(3), || {
        let ss = topo.pods[0]
            .ns
            .exec(&["ss", "-Htn", "exclude", "time-wait", "dst", &server]);
        String::from_utf8_lossy(&ss.stdout)
            .trim()
            .is_empty()
            .then_some(())
    });
    assert!(closed.is_some(), "the pod's connections did not close");

    // A plain stop removes everything, pins included.
    let (status, _) = second.stop();
    assert!(status.success());
    let dir = bpffs.path.join(&topo.uplink);
    assert!(!dir.exists(), "{} left behind", dir.display());
    let gone = tests::traffic::wait_for(Duration::from_secs(3), || {
        (snat_programs() == 0).then_some(())
    });
    assert!(gone.is_some(), "programs still loaded after a plain stop");
    leaks.assert_no_leak();
}

#[test]
fn keep_state_stops_and_restarts_keep_flows_and_other_formats_are_refused() {
    let topo = Topology::new(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let to = SocketAddrV4::new(SERVER, 8080);
    let _server = TcpServer::start(&topo.server, to);
    let first = agent(&topo, &bpffs, &["--keep-state"]);
    let conn = topo.pods[0]
        .ns
        .run(move || TcpClient::connect(to, Duration::from_secs(3)).expect("connect"));
    let (status, _) = first.stop();
    assert!(status.success());
    let conn = echo(&topo, conn, b"kept");
    let second = agent(&topo, &bpffs, &["--keep-state"]);
    let conn = echo(&topo, conn, b"kept again");
    let (status, _) = second.stop();
    assert!(status.success());

    // An agent of another state format must refuse, not misread.
    let state_pin = bpffs.path.join(&topo.uplink).join("snat_state");
    let mut state: Array<MapData, StateHeader> = Array::try_from(Map::Array(
        MapData::from_pin(&state_pin).expect("pinned state"),
    ))
    .unwrap();
    let mut h = state.get(&0, 0).unwrap();
    h.version += 1;
    state.set(0, h, 0).unwrap();
    let out = topo.node.exec_unchecked(&[
        snat_bin().to_str().unwrap(),
        "run",
        "--iface",
        &topo.uplink,
        "--internal",
        POD_CIDR,
        "--pin-dir",
        bpffs.arg(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("format version") && stderr.contains("snat cleanup"),
        "{stderr}"
    );
    // Meanwhile the old programs still translate the kept connection.
    let conn = echo(&topo, conn, b"still translated");

    // `snat cleanup` removes it all; the programs detach.
    tests::agent::cleanup(&topo, &bpffs);
    assert!(!bpffs.path.join(&topo.uplink).exists());
    let gone = tests::traffic::wait_for(Duration::from_secs(3), || {
        (snat_programs() == 0).then_some(())
    });
    assert!(gone.is_some(), "programs still loaded after cleanup");
    drop(conn);
}
