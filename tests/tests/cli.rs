//! `snat run` as an operator meets it: bad input is refused before anything is attached, a
//! second agent on the same interface is refused, and a stop leaves nothing behind.

use std::process::Command;

use tests::{
    agent::{snat_bin, Agent},
    topo::{Topology, POD_CIDR},
};

/// Waits (up to 3 s: the kernel frees detached programs after an RCU grace period) until no
/// program named like snat's is loaded, and returns how many still are.
fn snat_programs_after_stop() -> usize {
    tests::traffic::wait_for(std::time::Duration::from_secs(3), || {
        Some(snat_programs()).filter(|n| *n == 0)
    })
    .unwrap_or_else(snat_programs)
}

/// Programs named like snat's that are loaded anywhere on the machine.
fn snat_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("snat_egress" | "snat_ingress")))
        .count()
}

fn run_in(topo: &Topology, args: &[&str]) -> (i32, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.node.name])
        .arg(snat_bin())
        .arg("run")
        .args(args)
        .output()
        .expect("spawning snat");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_refused_with_the_value_and_the_fix_and_nothing_is_attached() {
    let topo = Topology::new(1);
    let up = topo.uplink.clone();
    let plan_file = std::env::temp_dir().join(format!("{}-plan.json", topo.prefix));
    let out = Command::new(snat_bin())
        .args(["plan", "--nodes", "3", "--nat-ip", "198.51.100.1", "--json"])
        .output()
        .unwrap();
    std::fs::write(&plan_file, out.stdout).unwrap();
    let plan = plan_file.to_str().unwrap().to_owned();
    // An Ethernet device whose driver has no native XDP (a bridge), in the node's namespace.
    let bridge = format!("{}-br", topo.prefix);
    topo.node
        .ip(&["link", "add", "name", &bridge, "type", "bridge"]);
    topo.node.ip(&["link", "set", "dev", &bridge, "up"]);
    let before = snat_programs();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--iface", "nope0", "--internal", POD_CIDR],
            "\"nope0\" does not exist",
        ),
        (
            vec!["--iface", &up, "--internal", "10.1.2.3/16"],
            "did you mean 10.1.0.0/16",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--port-range",
                "65535:32768",
            ],
            "swap them",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--port-range",
                "0:100",
            ],
            "port 0 cannot be used",
        ),
        (vec!["--iface", &up], "--internal 10.244.0.0/16"),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--nat-ip",
                "10.1.9.9",
            ],
            "inside the internal CIDR",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--udp-timeout",
                "5x",
            ],
            "e.g. 15s",
        ),
        (
            vec!["--iface", "lo", "--internal", POD_CIDR],
            "not Ethernet",
        ),
        (
            vec![
                "--iface",
                &bridge,
                "--internal",
                POD_CIDR,
                "--nat-ip",
                "198.51.100.1",
                "--ingress",
                "xdp-native",
            ],
            "has no native XDP",
        ),
        (
            vec!["--iface", &up, "--internal", POD_CIDR, "--ingress", "ebpf"],
            "[possible values: tc, xdp, xdp-native, xdp-generic]",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--plan",
                "/nonexistent/plan.json",
                "--node-index",
                "0",
            ],
            "--plan /nonexistent/plan.json",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--plan",
                &plan,
                "--node-index",
                "3",
            ],
            "node index 3 is outside the plan",
        ),
        (
            vec!["--iface", &up, "--internal", POD_CIDR, "--plan", &plan],
            "--plan needs --node-index",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--plan",
                &plan,
                "--node-index",
                "0",
                "--port-range",
                "1:2",
            ],
            "cannot be used with",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--nat-ip",
                "198.51.100.1",
                "--etcd-endpoints",
                "http://10.0.0.5:2379",
                "--node-name",
                "n1",
                "--lease-ttl",
                "20s",
            ],
            "--lease-ttl 20s must be more than --block-cooldown 20s + --fence-margin 5s",
        ),
        (
            vec![
                "--iface",
                &up,
                "--internal",
                POD_CIDR,
                "--etcd-endpoints",
                "http://10.0.0.5:2379",
                "--node-name",
                "n1",
            ],
            "cluster mode needs the NAT IPs the nodes share",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run_in(&topo, &args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in:\n{stderr}"
        );
        assert_eq!(snat_programs(), before, "{args:?} left a program loaded");
    }
}

#[test]
fn a_second_agent_on_the_same_interface_is_refused() {
    let topo = Topology::new(1);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--max-mappings", "4096"],
    );
    let (code, stderr) = run_in(
        &topo,
        &[
            "--iface",
            &topo.uplink,
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("already runs"), "{stderr}");
    // The first agent is unharmed.
    agent.stats();
}

#[test]
fn an_open_stop_detaches_everything() {
    let topo = Topology::new(1);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
            "--on-stop",
            "open",
        ],
    );
    assert!(snat_programs() >= 2);
    let (status, stats) = agent.stop();
    assert!(status.success(), "{status}");
    assert_eq!(stats["iface"], topo.uplink.as_str());
    assert_eq!(
        snat_programs_after_stop(),
        0,
        "programs left loaded after a stop"
    );
    let qdiscs = topo
        .node
        .exec(&["tc", "qdisc", "show", "dev", &topo.uplink]);
    assert!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "a clsact qdisc was left behind"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.node.name])
        .arg(snat_bin())
        .args(["stats", "--iface", &topo.uplink])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snat agent runs"));
}

/// Both families' new mappings are logged (`snat_create` and `snat_create6`).
#[test]
fn ebpf_log_debug_reports_new_mappings_and_off_is_silent() {
    let topo = Topology::new_dual_stack(1);
    for (level, expect) in [("debug", true), ("off", false)] {
        let agent = Agent::start(
            &topo.node,
            &topo.uplink,
            &[
                "--internal",
                POD_CIDR,
                "--internal",
                tests::topo::POD_CIDR6,
                "--max-mappings",
                "4096",
                "--ebpf-log",
                level,
            ],
        );
        for server in [
            tests::topo::SERVER.to_string(),
            tests::topo::SERVER6.to_string(),
        ] {
            topo.pods[0]
                .ns
                .exec(&["ping", "-c", "1", "-W", "2", &server]);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let log = agent.log();
        drop(agent);
        for pod in ["new mapping 10.1.0.2:", "new mapping fd00:10::2:"] {
            assert_eq!(log.contains(pod), expect, "--ebpf-log {level}:\n{log}");
        }
    }
}

#[test]
fn clsact_mode_translates_and_removes_its_qdisc() {
    use std::{net::SocketAddrV4, time::Duration};
    use tests::{
        topo::{NAT_IP, SERVER},
        traffic::{TcpClient, TcpServer},
    };
    let topo = Topology::new(1);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
            "--attach",
            "clsact",
            "--on-stop",
            "open",
        ],
    );
    let qdiscs = topo
        .node
        .exec(&["tc", "qdisc", "show", "dev", &topo.uplink]);
    assert!(
        String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "no clsact qdisc in clsact mode"
    );
    let _server = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let seen = topo.pods[0].ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect")
            .seen_as
    });
    assert_eq!(*seen.ip(), NAT_IP);
    let (status, _) = agent.stop();
    assert!(status.success());
    let qdiscs = topo
        .node
        .exec(&["tc", "qdisc", "show", "dev", &topo.uplink]);
    assert!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "the clsact qdisc snat added was left behind"
    );
    assert_eq!(snat_programs_after_stop(), 0);
}

#[test]
fn a_metrics_address_in_use_is_refused_before_attaching() {
    let topo = Topology::new(1);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
    let holder = topo.node.spawn(move || {
        let _l = std::net::TcpListener::bind("127.0.0.1:9469").expect("bind");
        bound_tx.send(()).unwrap();
        let _ = rx.recv();
    });
    bound_rx.recv().unwrap();
    let before = snat_programs();
    let (code, stderr) = run_in(
        &topo,
        &[
            "--iface",
            &topo.uplink,
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--metrics-addr 127.0.0.1:9469 is in use")
            && stderr.contains("pass a free address"),
        "{stderr}"
    );
    assert_eq!(snat_programs(), before);
    // With another address it starts.
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
            "--metrics-addr",
            "127.0.0.1:9470",
        ],
    );
    agent.stats();
    tx.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn a_config_file_supplies_flags_and_flags_win() {
    let topo = Topology::new(1);
    let file = std::env::temp_dir().join(format!("{}-snat.toml", topo.prefix));
    std::fs::write(
        &file,
        format!(
            "internal = [\"{POD_CIDR}\"]\nport_range = \"40000:40099\"\nmax-mappings = 4096\nudp-timeout = \"3m\"\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--config",
            file.to_str().unwrap(),
            "--port-range",
            "41000:41099",
        ],
    );
    let status = agent.json("status", &[]);
    assert_eq!(status["port_range"], "41000:41099", "the flag wins");
    drop(agent);
    std::fs::write(&file, "colour = \"blue\"\n").unwrap();
    let (code, stderr) = run_in(
        &topo,
        &["--iface", &topo.uplink, "--config", file.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown key \"colour\""), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_agent_needs_only_bpf_net_admin_and_perfmon() {
    // The capabilities deploy/kubernetes/snat.yaml grants, and no others (not even in the
    // bounding set): the agent loads, attaches, translates and detaches with them alone.
    use std::{net::SocketAddrV4, time::Duration};
    use tests::{
        topo::{NAT_IP, SERVER},
        traffic::{TcpClient, TcpServer},
    };
    let topo = Topology::new(1);
    let caps = "-all,+bpf,+net_admin,+perfmon";
    let inh = format!("--inh-caps={caps}");
    let amb = format!("--ambient-caps={caps}");
    let bnd = format!("--bounding-set={caps}");
    // Like the DaemonSet's hostPath /sys/fs/bpf: a BPF file system mounted outside the agent
    // (mounting one would need CAP_SYS_ADMIN).
    let bpffs = tests::netns::BpfFs::new(&topo.prefix);
    let agent = Agent::start_wrapped(
        &topo.node,
        &["setpriv", "--reuid=0", &inh, &amb, &bnd, "--"],
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
            "--pin-dir",
            bpffs.arg(),
        ],
    );
    let _server = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let seen = topo.pods[0].ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("connect")
            .seen_as
    });
    assert_eq!(*seen.ip(), NAT_IP);
    let (status, _) = agent.stop();
    assert!(status.success(), "{status}");
    assert_eq!(snat_programs_after_stop(), 0);
}
