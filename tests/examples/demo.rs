//! `cargo xtask demo`: a self-contained tour of snat in network namespaces.
//!
//! Builds three pods behind a node, a router and a server with no route back to the pods; starts
//! the `snat` agent on the node's uplink; sends TCP, UDP and ping from every pod; prints what the
//! server saw next to what each pod sent and snat's own counters; then removes everything it
//! created (also on Ctrl-C or failure: every namespace is deleted by exact name on drop).

use std::{
    net::{SocketAddrV4, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tests::{
    agent::Agent,
    topo::{Topology, NAT_IP, POD_CIDR, SERVER},
    traffic::{udp_ask, wait_for, IcmpWatch, TcpClient, TcpServer, UdpServer},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops the demo early (cleanly) after Ctrl-C.
fn check() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let result = std::panic::catch_unwind(demo);
    match result {
        Ok(Ok(())) => println!("\nAll namespaces removed. That was snat."),
        Ok(Err(e)) => {
            println!("\ndemo stopped: {e}; all namespaces removed.");
            std::process::exit(1);
        }
        Err(_) => {
            println!("\ndemo failed (see above); all namespaces removed.");
            std::process::exit(1);
        }
    }
}

/// Runs `snat <args>` in the node's namespace and prints the command and its output.
fn snat(agent: &Agent, args: &[&str]) {
    println!("\n$ snat {}   (in the node's namespace)", args.join(" "));
    let (_, out, err) = agent.cli(args);
    print!("{out}{err}");
}

/// Connects from `pod` to the server, or says why not.
fn try_connect(pod: &tests::topo::Pod) -> Result<TcpClient, String> {
    pod.ns.run(|| {
        TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_millis(300))
            .map_err(|e| e.to_string())
    })
}

/// Act 2: one noisy pod tries to take every port towards one destination; the operator sees it
/// in the counters and `snat top`, its neighbours keep working (fair share), it is refused in
/// milliseconds (a RST, not a timeout), and a live range change gives everyone room again.
fn exhaustion_act(topo: &Topology, agent: &Agent) -> Result<(), String> {
    let iface = topo.uplink.as_str();
    println!("\n== Act 2: one noisy pod against a small SNAT allocation ==");
    println!("A node with 50 SNAT ports, like a crowded Azure backend pool (snat runs with --fair-share):");
    snat(
        agent,
        &["set", "--iface", iface, "port-range", "40000:40049"],
    );
    let (noisy, quiet) = topo.pods.split_first().expect("pods");
    let refused_total = || {
        let s = agent.json("status", &[]);
        s["top_refused"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|x| x["flows"].as_u64())
            .unwrap_or(0)
    };
    let mut held = Vec::new();
    for round in 1..=3 {
        check()?;
        let (mut refused, mut slowest) = (0, Duration::ZERO);
        for _ in 0..25 {
            let start = std::time::Instant::now();
            match try_connect(noisy) {
                Ok(c) => held.push(c),
                Err(_) => {
                    refused += 1;
                    slowest = slowest.max(start.elapsed());
                }
            }
        }
        println!(
            "round {round}: noisy pod {} holds {} connections to {SERVER}:8080; {refused} refused (each within {:.1} ms: a RST, not a timeout); refused flows so far: {}",
            noisy.addr,
            held.len(),
            slowest.as_secs_f64() * 1000.0,
            refused_total()
        );
    }
    snat(agent, &["top", "--iface", iface, "--iterations", "1"]);
    println!("Its neighbours keep working: the fair share kept room for them.");
    for pod in quiet {
        match try_connect(pod) {
            Ok(c) => println!("quiet pod {}: connected as {}", pod.addr, c.seen_as),
            Err(e) => println!("quiet pod {}: refused ({e})", pod.addr),
        }
    }
    check()?;
    println!("\nThe operator widens the range live; existing connections keep their ports:");
    snat(
        agent,
        &["set", "--iface", iface, "port-range", "40000:40999"],
    );
    let more = (0..10).filter_map(|_| try_connect(noisy).ok()).count();
    println!("the noisy pod gets {more} of 10 new connections again");
    let (still, _) = noisy.ns.run(move || {
        let mut first = held.swap_remove(0);
        (first.echo(b"ping").is_ok(), held)
    });
    println!("a connection the noisy pod opened before the change still works: {still}");
    snat(agent, &["status", "--iface", iface]);
    Ok(())
}

fn demo() -> Result<(), String> {
    println!("== snat demo ==");
    println!("Topology (all in fresh network namespaces):");
    println!("  pods 10.1.{{0,1,2}}.2 -> node (snat on its uplink, NAT IP {NAT_IP}) -> router -> server {SERVER}");
    println!("  The router has no route to the pod CIDR {POD_CIDR}: only translated traffic gets answers.\n");
    let topo = Topology::new(3);
    check()?;
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "65536",
            "--fair-share",
        ],
    );
    println!(
        "snat agent running on {} (port range 32768:65535)\n",
        topo.uplink
    );
    let tcp = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let udp = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let icmp = IcmpWatch::start(&topo.server);

    println!(
        "{:<6} {:<6} {:<22} {:<22}",
        "pod", "proto", "pod sent from", "server saw"
    );
    for (i, pod) in topo.pods.iter().enumerate() {
        check()?;
        let addr = pod.addr;
        let (tcp_line, udp_line) = pod.ns.run(move || {
            let tcp = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
                .map(|c| {
                    (
                        c.stream
                            .local_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                        c.seen_as.to_string(),
                    )
                });
            let sock = UdpSocket::bind((addr, 0)).expect("UDP socket");
            let udp = udp_ask(&sock, SocketAddrV4::new(SERVER, 5353)).map(|seen| {
                (
                    sock.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    seen.to_string(),
                )
            });
            (tcp, udp)
        });
        for (proto, line) in [("tcp", tcp_line), ("udp", udp_line)] {
            match line {
                Ok((from, seen)) => println!("pod{i:<3} {proto:<6} {from:<22} {seen:<22}"),
                Err(e) => println!("pod{i:<3} {proto:<6} failed: {e}"),
            }
        }
        let before = icmp.seen().len();
        let ping = pod
            .ns
            .exec_unchecked(&["ping", "-c", "1", "-W", "2", &SERVER.to_string()]);
        let seen = wait_for(Duration::from_secs(1), || icmp.seen().get(before).copied());
        match (ping.status.success(), seen) {
            (true, Some((src, id))) => {
                println!(
                    "pod{i:<3} {:<6} {:<22} {:<22}",
                    "ping",
                    format!("{} (echo)", pod.addr),
                    format!("{src} id {id}")
                )
            }
            _ => println!("pod{i:<3} ping   failed"),
        }
    }
    check()?;
    println!(
        "\nThe server saw {} TCP and {} UDP peers, all from {NAT_IP}.",
        tcp.peers().len(),
        udp.peers().len()
    );

    snat(&agent, &["stats", "--iface", &topo.uplink]);
    check()?;
    exhaustion_act(&topo, &agent)?;
    check()?;
    let (status, _) = agent.stop();
    println!(
        "\nsnat stopped ({status}) and detached from {}.",
        topo.uplink
    );
    Ok(())
}
