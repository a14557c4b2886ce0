//! Who may steer the agent: the control socket checked from the outside, as root, as an
//! unprivileged user (uid 65534 through `setpriv`), as one holding CAP_NET_ADMIN, as a member
//! of `--control-group`, and against hostile clients that flood it or send it garbage, while
//! pods' traffic keeps passing.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddrV4,
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixStream},
    },
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    agent::{snat_bin, Agent},
    metric,
    topo::{Topology, POD_CIDR, SERVER},
    traffic::{wait_for, TcpClient, TcpServer},
    user::{nobody, nobody_in_groups, nobody_with_net_admin, output_within, runnable_by_anyone},
};

/// Exit status of a command the agent refused (sysexits' EX_NOPERM).
const EX_NOPERM: Option<i32> = Some(77);

fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    // Every scrape builds a fresh report: the tests read counters right after what they count.
    Agent::for_pods(
        topo,
        4096,
        &[&["--metrics-min-interval", "0s"], extra].concat(),
    )
}

fn port_range(agent: &Agent) -> String {
    agent.json("status", &[])["port_range"]
        .as_str()
        .expect("a port range")
        .to_owned()
}

fn refused(agent: &Agent, topo: &Topology, command: &str) -> Option<f64> {
    metric(
        &agent.scrape(&topo.node),
        &format!("snat_control_refused_total{{command=\"{command}\"}}"),
    )
}

#[test]
fn only_root_and_net_admin_may_change_or_read_without_a_control_group() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &["--port-range", "40000:40099"]);
    let up = topo.uplink.as_str();
    assert_eq!(refused(&agent, &topo, "set"), Some(0.0), "counted from 0");

    // An unprivileged user may not squeeze every pod into one port…
    let (code, out, err) = agent.cli_as(
        &nobody(),
        &["set", "--iface", up, "port-range", "40000:40000"],
    );
    assert_eq!(code, EX_NOPERM, "{out}{err}");
    assert_eq!(
        err.trim(),
        format!("snat set: permission denied: the agent on {up} accepts changes from root or CAP_NET_ADMIN only")
    );
    assert_eq!(port_range(&agent), "40000:40099", "nothing changed");

    // …nor read, without --control-group.
    let read_refusal = format!(
        "permission denied: the agent on {up} accepts reads only from root or CAP_NET_ADMIN; start it with --control-group GROUP to let a group read"
    );
    for (command, extra) in [
        ("conns", &[][..]),
        ("status", &[]),
        ("stats", &["--json"]),
        ("top", &["--iterations", "1"]),
    ] {
        let mut args = vec![command, "--iface", up];
        args.extend_from_slice(extra);
        let (code, out, err) = agent.cli_as(&nobody(), &args);
        assert_eq!(code, EX_NOPERM, "{command}: {out}{err}");
        assert_eq!(err.trim(), format!("snat {command}: {read_refusal}"));
        assert!(out.is_empty(), "{command} printed {out}");
    }

    // CAP_NET_ADMIN (in the agent's user namespace) is enough, without root.
    let (code, out, err) = agent.cli_as(
        &nobody_with_net_admin(),
        &["set", "--iface", up, "port-range", "40000:40049"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("40000:40049"), "{out}");
    let (code, out, err) = agent.cli_as(
        &nobody_with_net_admin(),
        &["conns", "--iface", up, "--json"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&out).is_ok(),
        "{out}"
    );
    assert_eq!(port_range(&agent), "40000:40049");

    // Root of a user namespace of its own, holding every capability there, is still uid 65534
    // without CAP_NET_ADMIN in the agent's.
    let mut own_userns = nobody();
    own_userns.extend(["unshare".into(), "--user".into(), "--map-root-user".into()]);
    let (code, out, err) = agent.cli_as(
        &own_userns,
        &["set", "--iface", up, "port-range", "40000:40000"],
    );
    assert_eq!(code, EX_NOPERM, "{out}{err}");
    assert_eq!(port_range(&agent), "40000:40049");

    // Root, as always.
    let (ok, _, err) = agent.cli(&["set", "--iface", up, "port-range", "40000:40099"]);
    assert!(ok, "{err}");
    assert_eq!(port_range(&agent), "40000:40099");

    // Every refusal counted by request (stats and top ask for status) and logged with who.
    assert_eq!(refused(&agent, &topo, "set"), Some(2.0));
    assert_eq!(refused(&agent, &topo, "conns"), Some(1.0));
    assert_eq!(refused(&agent, &topo, "status"), Some(3.0));
    assert_eq!(
        agent.json("stats", &[])["control_refused"],
        serde_json::json!({"conns": 1, "set": 2, "status": 3})
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("control: refused set from uid 65534 pid ")
                && l.contains("accepts changes from root or CAP_NET_ADMIN only")),
        "{log}"
    );
    assert!(
        log.contains("control: refused conns from uid 65534 pid "),
        "{log}"
    );
}

#[test]
fn a_control_group_may_read_but_not_change() {
    let topo = Topology::new(1);
    let up = topo.uplink.clone();
    let up = up.as_str();

    // By name: nogroup is the primary group of setpriv's uid/gid 65534.
    let named = agent(
        &topo,
        &["--port-range", "40000:40099", "--control-group", "nogroup"],
    );
    for command in ["conns", "status"] {
        let (code, out, err) = named.cli_as(&nobody(), &[command, "--iface", up, "--json"]);
        assert_eq!(code, Some(0), "{command}: {err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("a JSON report");
        assert_eq!(report["port_range"], "40000:40099");
    }
    let (code, _, err) = named.cli_as(
        &nobody(),
        &["set", "--iface", up, "port-range", "40000:40000"],
    );
    assert_eq!(code, EX_NOPERM);
    assert!(
        err.contains("accepts changes from root or CAP_NET_ADMIN only"),
        "{err}"
    );
    assert_eq!(port_range(&named), "40000:40099");
    assert_eq!(refused(&named, &topo, "set"), Some(1.0));
    assert_eq!(refused(&named, &topo, "status"), Some(0.0));
    drop(named);

    // By number, matched against a supplementary group.
    let gid = "4242";
    let numeric = agent(&topo, &["--control-group", gid]);
    let (code, out, err) = numeric.cli_as(&nobody_in_groups(&[4242]), &["status", "--iface", up]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ALLOCATED"), "{out}");
    let (code, _, err) = numeric.cli_as(&nobody(), &["conns", "--iface", up]);
    assert_eq!(code, EX_NOPERM);
    assert!(
        err.starts_with(&format!(
            "snat conns: permission denied: the agent on {up} accepts reads from root, CAP_NET_ADMIN or members of "
        )) && err.contains("gid 4242") && err.trim_end().ends_with("only"),
        "{err}"
    );
    let (code, _, err) = numeric.cli_as(
        &nobody_in_groups(&[4242]),
        &["set", "--iface", up, "port-range", "40000:40000"],
    );
    assert_eq!(code, EX_NOPERM, "{err}");
}

/// Programs named like snat's that are loaded anywhere on the machine.
fn snat_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("snat_egress" | "snat_ingress")))
        .count()
}

#[test]
fn an_unknown_control_group_stops_run_before_anything_is_attached() {
    let topo = Topology::new(1);
    let before = snat_programs();
    let out = output_within(
        Command::new("ip")
            .args(["netns", "exec", &topo.node.name])
            .arg(snat_bin())
            .args(["run", "--iface", &topo.uplink, "--internal", POD_CIDR])
            .args(["--control-group", "no-such-group-snat"]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--control-group \"no-such-group-snat\"") && err.contains("numeric gid"),
        "{err}"
    );
    assert_eq!(snat_programs(), before, "nothing was loaded");
    // The control socket was never bound: an agent starts right after.
    drop(agent(&topo, &[]));
}

/// Sends `bytes` to the control socket as root (ending the stream if `finish`) and returns the
/// answer.
fn raw(topo: &Topology, bytes: Vec<u8>, finish: bool) -> String {
    let iface = topo.uplink.clone();
    topo.node.run(move || {
        let addr = SocketAddr::from_abstract_name(format!("snat/{iface}")).unwrap();
        let mut s = UnixStream::connect_addr(&addr).expect("connecting to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(&bytes);
        if finish {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
}

/// `snat status` as root, which must answer within a few seconds.
fn prompt_status(agent: &Agent, up: &str) -> Duration {
    let t = Instant::now();
    let (code, out, err) = agent.cli_as(&[], &["status", "--iface", up, "--json"]);
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&out).is_ok(),
        "{out}"
    );
    assert!(took < Duration::from_secs(5), "root's status took {took:?}");
    took
}

fn flood_bin() -> PathBuf {
    runnable_by_anyone(std::path::Path::new(env!("CARGO_BIN_EXE_control_flood")))
}

#[test]
fn hostile_clients_neither_crash_nor_starve_the_agent() {
    let topo = Topology::new(1);
    let agent = agent(&topo, &[]);
    let up = topo.uplink.clone();
    let _server = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let mut pod = topo.pods[0].ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("a pod's connection")
    });

    // Bad input, as root (whose requests are parsed and acted on): an error that names the
    // problem, never a panic or a silent close.
    let deep = format!("{{\"cmd\":\"set\",\"slice\":{}\n", "[".repeat(10_000)).into_bytes();
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (b"\xff\xfe\xfd garbage\n".to_vec(), true, "bad request"),
        (
            b"{\"cmd\":\"set\",\"port_ra".to_vec(),
            true,
            "EOF while parsing",
        ),
        (deep, true, "recursion limit"),
        (
            br#"{"cmd":"set","port_range":"1:2","nat_ips":[99999999999999999999999]}"#.to_vec(),
            true,
            "bad request",
        ),
        (
            br#"{"cmd":"set","port_range":"99999999999999999999:1"}"#.to_vec(),
            true,
            "\"result\":\"error\"",
        ),
        (
            br#"{"cmd":"drop_tables"}"#.to_vec(),
            true,
            "unknown variant",
        ),
        (vec![b' '; 100 * 1024], false, "request too large"),
    ];
    for (bytes, finish, want) in cases {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        let answer = raw(&topo, bytes, finish);
        assert!(answer.contains(want), "{shown:?} got {answer:?}");
    }
    // A client that sends nothing is answered and dropped after the request timeout.
    let t = Instant::now();
    let answer = raw(&topo, Vec::new(), false);
    assert!(answer.contains("no complete request within 5s"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    prompt_status(&agent, &up);

    // An unprivileged crowd for 8 s: 300 silent connections held open, 200 threads asking
    // over and over, garbage, truncated and oversized requests.
    let flood = {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.node.name])
            .args(nobody())
            .arg(flood_bin())
            .args([up.as_str(), "8", "300", "200"]);
        std::thread::spawn(move || output_within(&mut cmd, Duration::from_secs(90)))
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut checks = 0;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        prompt_status(&agent, &up);
        let msg = format!("still passing {checks}");
        assert_eq!(
            pod.echo(msg.as_bytes()).expect("the pod's flow"),
            msg.as_bytes()
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(checks >= 5, "only {checks} checks ran during the flood");
    let out = flood.join().expect("the flood's thread");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(&report).expect("the flood's report");
    let n = |k: &str| seen[k].as_u64().unwrap_or(0);
    assert_eq!(n("held"), 300, "{seen}");
    assert!(n("denied") > 0, "unprivileged requests refused: {seen}");
    assert!(n("busy") > 0, "the unprivileged budget filled: {seen}");
    assert!(n("bad_request") > 0, "{seen}");
    assert_eq!(n("other"), 0, "no report leaked to the crowd: {seen}");

    // Afterwards: healthy, the crowd's refusals counted, the log rate-limited.
    prompt_status(&agent, &up);
    assert_eq!(pod.echo(b"after").expect("the pod's flow"), b"after");
    assert!(agent.json("stats", &[])["control_refused"]["status"].as_u64() > Some(0));
    let told = wait_for(Duration::from_secs(15), || {
        let log = agent.log();
        log.contains("were not logged").then_some(log)
    })
    .unwrap_or_else(|| panic!("no line tells of held-back warnings:\n{}", agent.log()));
    let warnings = told.lines().filter(|l| l.contains("control:")).count();
    assert!(
        warnings < 60,
        "{warnings} control-socket warnings in ~25 s: not rate-limited:\n{told}"
    );
    let (status, _) = agent.stop();
    assert!(status.success(), "{status}");
}
