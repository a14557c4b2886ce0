//! Issue 14's three-node suite: three nodes share ONE NAT IP (198.51.100.1) behind a gateway
//! namespace running `snat gateway`, etcd in its own namespace, a router and a server behind the
//! gateway (`tests::cluster`), range 40000:40511 (8 blocks of 64). Every scenario watches every
//! node's uplink ([`PortLog`]) and ends with the cluster's rule checked on what left the nodes:
//! per NAT port, use intervals of different nodes never overlap and are a cool-down apart.
//!
//! Timers are short so the scenarios wait seconds, not minutes: `--lease-ttl 12s
//! --block-cooldown 3s --fence-margin 2s` put the fence (valid-until) 7 s after the last good
//! keep-alive (sent every 2 s) and the lease's end 12 s after it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::{snat_bin, Agent},
    cluster::{
        assert_no_overlap, block_of, boottime_ns, cluster_status, echo_all, held, sink, try_hold,
        Cluster, PortLog, HOP_MTU, NAT, ROUTER, SERVER,
    },
    netns::Netns,
    traffic::{
        fingerprint, payload, ping_once, ping_socket, recv_icmp_error, set_int_opt, wait_for,
        IcmpWatch, Mode, TcpClient, TcpServer, UdpServer,
    },
};

const COOLDOWN: Duration = Duration::from_secs(3);
const TIMERS: [&str; 10] = [
    "--lease-ttl",
    "12s",
    "--block-cooldown",
    "3s",
    "--fence-margin",
    "2s",
    "--tcp-fin-timeout",
    "1s",
    "--tcp-rst-timeout",
    "1s",
];
const TCP: SocketAddrV4 = SocketAddrV4::new(SERVER, 8080);
const UDP: SocketAddrV4 = SocketAddrV4::new(SERVER, 7000);

/// Three nodes with their agents, the gateway, port logs on every uplink, a TCP echo server and
/// a UDP server. Fields drop in order: agents first, the namespaces last.
struct Fixture {
    agents: Vec<Option<Agent>>,
    flags: Vec<Vec<String>>,
    logs: Vec<PortLog>,
    _tcp: TcpServer,
    _udp: UdpServer,
    c: Cluster,
}

impl Fixture {
    /// `members` etcd members; node `i` runs with `timers` and `extra[i]`.
    fn new(members: usize, timers: &[&str], extra: [&[&str]; 3]) -> Self {
        let mut c = Cluster::new(3, members);
        let logs: Vec<PortLog> = c.nodes.iter().map(PortLog::start).collect();
        let tcp = TcpServer::start_mode(&c.server, TCP, Mode::Echo);
        let udp = UdpServer::start(&c.server, UDP);
        let flags: Vec<Vec<String>> = extra
            .iter()
            .map(|e| {
                timers
                    .iter()
                    .chain(e.iter())
                    .map(ToString::to_string)
                    .collect()
            })
            .collect();
        let start = |c: &Cluster, i: usize| {
            let f: Vec<&str> = flags[i].iter().map(String::as_str).collect();
            c.start_agent(i, &f)
        };
        // The first node writes the geometry the gateway waits for.
        let a = start(&c, 0);
        c.start_gateway(&[]);
        let agents = vec![Some(a), Some(start(&c, 1)), Some(start(&c, 2))];
        let fx = Self {
            agents,
            flags,
            logs,
            _tcp: tcp,
            _udp: udp,
            c,
        };
        for i in 0..3 {
            fx.until(&format!("{} to open a block", fx.name(i)), 15, || {
                held(fx.agent(i))
                    .values()
                    .any(|s| s == "open")
                    .then_some(())
            });
        }
        fx
    }

    fn agent(&self, i: usize) -> &Agent {
        self.agents[i].as_ref().expect("the agent runs")
    }

    fn name(&self, i: usize) -> &str {
        &self.c.nodes[i].name
    }

    fn start(&mut self, i: usize) {
        assert!(self.agents[i].is_none());
        let f: Vec<&str> = self.flags[i].iter().map(String::as_str).collect();
        self.agents[i] = Some(self.c.start_agent(i, &f));
    }

    fn kill(&mut self, i: usize) {
        self.agents[i].take().expect("the agent runs").kill();
    }

    fn signal(&self, i: usize, signal: i32) {
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs snat in place).
        let rc = unsafe { libc::kill(self.agent(i).pid() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Polls `f` for `secs` seconds; the failure names what was awaited, with every node's
    /// status and the gateway's log.
    fn until<T>(&self, what: &str, secs: u64, f: impl FnMut() -> Option<T>) -> T {
        wait_for(Duration::from_secs(secs), f).unwrap_or_else(|| {
            panic!(
                "{what} within {secs} s\nblocks in etcd: {:?}\n{}\ngateway:\n{}",
                self.c.block_epochs(),
                self.statuses(),
                self.c.gateway_log()
            )
        })
    }

    /// Every running agent's cluster status, for failure messages.
    fn statuses(&self) -> String {
        (0..3)
            .filter_map(|i| {
                let a = self.agents[i].as_ref()?;
                let (ok, out, _) = a.cli(&["status", "--iface", &self.c.nodes[i].uplink, "--json"]);
                let v: Value = serde_json::from_str(&out).unwrap_or_default();
                // Its mappings too: what keeps a block from going back.
                let (_, conns, _) = a.cli(&["conns", "--iface", &self.c.nodes[i].uplink]);
                Some(format!(
                    "{}: {}\n{conns}",
                    self.name(i),
                    if ok {
                        v["cluster"].to_string()
                    } else {
                        "(no answer)".into()
                    }
                ))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Opens `n` connections from node `i`'s pod; every one must succeed.
    fn hold(&self, i: usize, n: usize) -> Vec<TcpClient> {
        try_hold(&self.c.nodes[i].pod, n, TCP).unwrap_or_else(|(held, e)| {
            panic!(
                "{}: flow {} of {n}: {e}\nblocks in etcd: {:?}\n{}\n{}: {}",
                self.name(i),
                held.len(),
                self.c.block_epochs(),
                self.statuses(),
                self.name(i),
                self.agent(i).stats()["counters"]
            )
        })
    }

    /// The blocks etcd says node `i` holds.
    fn blocks_of(&self, i: usize) -> BTreeSet<u16> {
        self.c
            .block_epochs()
            .into_iter()
            .filter(|(_, (n, _))| n == self.name(i))
            .map(|(b, _)| b)
            .collect()
    }

    /// Asserts every connection was seen from the NAT IP on a port of a block etcd gives node
    /// `i`.
    fn assert_ports_of(&self, i: usize, conns: &[TcpClient]) {
        let blocks = self.blocks_of(i);
        for c in conns {
            assert_eq!(*c.seen_as.ip(), NAT);
            let b = block_of(c.seen_as.port());
            assert!(
                b.is_some_and(|b| blocks.contains(&b)),
                "{}: port {} outside its blocks {blocks:?}",
                self.name(i),
                c.seen_as.port()
            );
        }
    }

    /// The end of every scenario: the agents are killed (a plain stop waits out the cool-down),
    /// nothing left with a pod's address, and the rule held on every NAT port. Returns how many
    /// ports changed hands.
    fn finish(mut self) -> usize {
        for a in self.agents.iter_mut() {
            if let Some(a) = a.take() {
                a.kill();
            }
        }
        for log in &self.logs {
            log.assert_no_leak();
        }
        let logs: Vec<&PortLog> = self.logs.iter().collect();
        assert_no_overlap(&logs, COOLDOWN)
    }
}

/// UDP datagrams from a pod to the UDP server every 10 ms (at most for 60 s), from one socket:
/// one mapping, packets right up to any fence.
struct UdpStream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl UdpStream {
    fn start(pod: &Netns, addr: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = pod.spawn(move || {
            let sock = UdpSocket::bind((addr, 0)).expect("bind");
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut sent = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                if sock.send_to(b"stream", UDP).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("runs")
            .join()
            .expect("the stream")
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A traceroute probe from the pod: a UDP datagram to the server with `ttl`; the ICMP error
/// its socket gets (up to three tries).
fn probe(pod: &Netns, addr: Ipv4Addr, ttl: i32) -> Option<tests::traffic::SocketError> {
    pod.run(move || {
        let s = UdpSocket::bind((addr, 0)).expect("bind");
        set_int_opt(&s, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        set_int_opt(&s, libc::IPPROTO_IP, libc::IP_TTL, ttl);
        s.connect((SERVER, 33434)).expect("connect");
        (0..3).find_map(|_| {
            s.send(b"traceroute probe").expect("send");
            recv_icmp_error(&s, Duration::from_secs(1))
        })
    })
}

/// Uploads `data` from the pod to the sink with DF set; returns the sink's answer and the path
/// MTU the pod's socket learnt.
fn upload(pod: &Netns, to: SocketAddrV4, data: Vec<u8>) -> (String, i32) {
    pod.run(move || {
        let mut s =
            TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).expect("connect");
        set_int_opt(
            &s,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        );
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&data).expect("the upload");
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("the sink's answer");
        let mut mtu: i32 = 0;
        let mut len = size_of::<i32>() as u32;
        // SAFETY: getsockopt(2) into an int of the stated size on our socket.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&raw mut mtu).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
        (answer.trim().to_owned(), mtu)
    })
}

#[test]
fn busy_and_quiet_nodes_share_the_range_on_demand_with_icmp_through_the_gateway() {
    let fx = Fixture::new(1, &TIMERS, [&[], &[], &[]]);
    // One busy pod and two quiet ones: 300 + 20 + 20, where a fixed split gives each 170.
    let mut a = fx.hold(0, 300);
    let mut b = fx.hold(1, 20);
    let mut c = fx.hold(2, 20);
    for (i, conns) in [(0, &a), (1, &b), (2, &c)] {
        fx.assert_ports_of(i, conns);
    }
    let ports: BTreeSet<u16> = a
        .iter()
        .chain(&b)
        .chain(&c)
        .map(|c| c.seen_as.port())
        .collect();
    assert_eq!(ports.len(), 340, "a NAT port used twice at once");
    assert!(fx.blocks_of(0).len() >= 5, "{:?}", fx.c.block_epochs());
    // The gateway returns every reply to its node.
    echo_all(&mut a, "node-a");
    echo_all(&mut b, "node-b");
    echo_all(&mut c, "node-c");

    // Ping, traceroute and a PMTU-limited upload from every node's pod, through the gateway.
    let echo_watch = IcmpWatch::start(&fx.c.server);
    let sink_at = SocketAddrV4::new(SERVER, 9000);
    let sink = sink(&fx.c.server, sink_at, 3);
    let mut uploads = Vec::new();
    for i in 0..3 {
        let n = &fx.c.nodes[i];
        let id = 1000 + i as u16;
        let back = n.pod.run(move || {
            let fd = ping_socket(id, Duration::from_secs(2));
            (1..=3).find_map(|seq| ping_once(&fd, SERVER, seq))
        });
        assert_eq!(back, Some(id), "{}: the echo reply", n.name);
        // Hop 3 is the router behind the gateway: its "time exceeded" quotes the translated
        // header, and only the gateway's lookup of the quoted port brings it to this node.
        let err = probe(&n.pod, n.pod_addr, 3)
            .unwrap_or_else(|| panic!("{}: no 'time exceeded' from the router", n.name));
        assert_eq!(
            (err.icmp_type, err.icmp_code, err.offender),
            (11, 0, ROUTER),
            "{}",
            n.name
        );
        let err = probe(&n.pod, n.pod_addr, 4)
            .unwrap_or_else(|| panic!("{}: no 'port unreachable' from the server", n.name));
        assert_eq!(
            (err.icmp_type, err.icmp_code, err.offender),
            (3, 3, SERVER),
            "{}",
            n.name
        );
        let data = payload(256 * 1024, 7 + i as u64);
        let want = format!("{} {}", data.len(), fingerprint(&data));
        let (answer, mtu) = upload(&n.pod, sink_at, data);
        assert_eq!(answer, want, "{}: the upload", n.name);
        assert_eq!(
            mtu, HOP_MTU as i32,
            "{}: the path MTU the pod learnt",
            n.name
        );
        uploads.push(answer);
    }
    assert_eq!(sink.join().expect("the sink").len(), 3);
    // The server saw each ping from the NAT IP with an identifier of its node's blocks.
    let seen = echo_watch.seen();
    for i in 0..3 {
        let blocks = fx.blocks_of(i);
        assert!(
            seen.iter()
                .any(|(src, id)| *src == NAT && block_of(*id).is_some_and(|b| blocks.contains(&b))),
            "{}: no echo request from its blocks {blocks:?}: {seen:?}",
            fx.name(i)
        );
    }
    for i in 0..3 {
        let n = fx.agent(i).counter("ingress", "translated_icmp_error");
        assert!(n >= 3, "{}: {n} ICMP errors translated back", fx.name(i));
    }

    // The busy node closes: its blocks go back after the FIN timeout and the cool-down, but
    // for what its last mappings (the ping's and the traceroute's, minutes of UDP timeout) need
    // with headroom: its empty blocks close while twice the low water (64 ports) stays free,
    // so 3 mappings keep two blocks (one would leave 61).
    let a_had = fx.blocks_of(0);
    drop(a);
    fx.until("node-a to give its blocks back", 20, || {
        (fx.blocks_of(0).len() <= 2).then_some(())
    });
    // Another node grows into them. A node that wants a block picks it from a view of etcd up
    // to a second old (`list_max_age`): one taken just before the releases says the range is
    // full, and the node lists again only when that second is over. Growing at once could
    // outrun the headroom in that second (seen once: flows refused while five blocks were
    // free), so the view is let age first.
    std::thread::sleep(Duration::from_millis(1500));
    let mut b_more = fx.hold(1, 200);
    fx.assert_ports_of(1, &b_more);
    let took: BTreeSet<u16> = fx.blocks_of(1).intersection(&a_had).copied().collect();
    assert!(
        took.len() >= 2,
        "node-b took {took:?} of node-a's {a_had:?}"
    );
    assert!(
        b_more
            .iter()
            .any(|c| block_of(c.seen_as.port()).is_some_and(|b| took.contains(&b))),
        "node-b's new flows use none of node-a's former blocks {took:?}"
    );
    echo_all(&mut b_more, "node-b grown");
    echo_all(&mut c, "node-c at the end");
    drop((b, b_more, c));
    let handed_over = fx.finish();
    assert!(
        handed_over > 0,
        "no NAT port changed hands: the overlap check saw nothing"
    );
}

/// Node `i`'s old TCP flows: none passes data any more.
fn assert_dead(conns: &mut [TcpClient], what: &str) {
    for c in conns.iter_mut() {
        c.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        assert!(
            c.echo(b"still there?").is_err(),
            "{what}: flow {} still passes data",
            c.seen_as
        );
    }
}

#[test]
fn agents_killed_and_stopped_keep_to_their_fence() {
    let mut fx = Fixture::new(1, &TIMERS, [&[], &[], &[]]);
    let mut a = fx.hold(0, 20);
    let mut b = fx.hold(1, 20);
    let mut c = fx.hold(2, 20);

    // SIGSTOP past the fence, SIGCONT before the lease ends: node-a's blocks are suspended
    // (nothing leaves from them), then resume under the same lease with their mappings.
    let a_blocks: Vec<u16> = fx.blocks_of(0).into_iter().collect();
    let a_epochs = fx.c.block_epochs();
    let n = &fx.c.nodes[0];
    let stream = UdpStream::start(&n.pod, n.pod_addr);
    std::thread::sleep(Duration::from_millis(300));
    fx.signal(0, libc::SIGSTOP);
    let valid_until = fx.c.nodes[0]
        .pinned_blocks()
        .values()
        .map(|v| v.1)
        .max()
        .expect("pinned blocks");
    fx.until("node-a's valid-until to pass", 10, || {
        (boottime_ns() > valid_until + 1_500_000_000).then_some(())
    });
    let resumed_at = boottime_ns();
    fx.signal(0, libc::SIGCONT);
    fx.until("node-a to resume", 5, || {
        let st = cluster_status(fx.agent(0));
        (st["suspended"] == false && st["fence_in_seconds"].as_f64().unwrap_or(0.0) > 5.0)
            .then_some(())
    });
    assert!(stream.stop() > 300);
    echo_all(&mut a, "node-a after its suspension");
    let slack = fx.logs[0].uncertainty();
    for (port, runs) in fx.logs[0].sent() {
        if !block_of(port).is_some_and(|b| a_blocks.contains(&b)) {
            continue;
        }
        for r in runs {
            assert!(
                r.1 <= valid_until + slack || r.0 >= resumed_at,
                "node-a sent from port {port} at {:.3}-{:.3} s, between its valid-until {:.3} s \
                 and its resumption {:.3} s",
                secs(r.0),
                secs(r.1),
                secs(valid_until),
                secs(resumed_at)
            );
        }
    }
    let last = fx.logs[0]
        .last_sent_in(&a_blocks)
        .expect("node-a sent from its blocks");
    assert!(last >= resumed_at, "node-a's stream did not resume");
    assert_eq!(fx.c.block_epochs(), a_epochs, "a suspension cost blocks");
    assert_eq!(cluster_status(fx.agent(0))["leases_lost"], 0);

    // kill -9 and a quick restart with the same flags: the pinned programs translate meanwhile,
    // the new agent keeps the lease alive and adopts the blocks; no flow notices.
    let b_blocks = fx.agent(1).json("status", &[])["cluster"]["blocks"].clone();
    let b_epochs: BTreeMap<u16, (String, i64)> =
        fx.c.block_epochs()
            .into_iter()
            .filter(|(_, (n, _))| n == "node-b")
            .collect();
    fx.kill(1);
    echo_all(&mut b, "node-b without an agent");
    fx.start(1);
    fx.until("node-b to adopt its blocks", 10, || {
        let st = cluster_status(fx.agent(1));
        (st["ready"] == true && st["blocks"] == b_blocks).then_some(())
    });
    echo_all(&mut b, "node-b after its restart");
    let st = cluster_status(fx.agent(1));
    assert_eq!(st["leases_lost"], 0, "{st}");
    let now: BTreeMap<u16, (String, i64)> =
        fx.c.block_epochs()
            .into_iter()
            .filter(|(_, (n, _))| n == "node-b")
            .collect();
    assert_eq!(now, b_epochs, "node-b's claims changed");
    let mut b_new = fx.hold(1, 5);
    fx.assert_ports_of(1, &b_new);
    echo_all(&mut b_new, "node-b's new flows");

    // SIGSTOP: the datapath stops translating in node-c's blocks at their valid-until by
    // itself. A UDP stream keeps node-c's pod sending right up to it.
    let c_blocks: Vec<u16> = fx.blocks_of(2).into_iter().collect();
    let n = &fx.c.nodes[2];
    let stream = UdpStream::start(&n.pod, n.pod_addr);
    std::thread::sleep(Duration::from_millis(500));
    fx.signal(2, libc::SIGSTOP);
    let pinned = fx.c.nodes[2].pinned_blocks();
    let valid_until = pinned.values().map(|v| v.1).max().expect("pinned blocks");
    let now = boottime_ns();
    assert!(
        valid_until > now && valid_until < now + 8_000_000_000,
        "valid-until {:.3} s, now {:.3} s: {pinned:?}",
        secs(valid_until),
        secs(now)
    );
    fx.until("node-c's valid-until to pass", 10, || {
        (boottime_ns() > valid_until + 1_000_000_000).then_some(())
    });
    let last = fx.logs[2]
        .last_sent_in(&c_blocks)
        .expect("node-c sent from its blocks");
    let slack = fx.logs[2].uncertainty();
    assert!(
        last <= valid_until + slack,
        "node-c sent from its blocks at {:.3} s, after their valid-until {:.3} s",
        secs(last),
        secs(valid_until)
    );
    assert!(
        last + 500_000_000 >= valid_until,
        "node-c's stream stopped {:.3} s before the fence: the check saw nothing",
        secs(valid_until - last)
    );
    // Nothing came back to life: no packet from its blocks since.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fx.logs[2].last_sent_in(&c_blocks), Some(last));
    assert!(stream.stop() > 300);

    // Its lease ends; the agent, still stopped, is killed and started again: the keep-alive of
    // the pinned lease answers TTL 0, so every pinned block and mapping goes.
    fx.until("node-c's lease to end", 15, || {
        (!fx.c.registered("node-c")).then_some(())
    });
    let old_epochs: BTreeSet<i64> = pinned.values().map(|v| v.0).collect();
    fx.kill(2);
    fx.start(2);
    let st = fx.until("node-c to start over with a new block", 15, || {
        let st = cluster_status(fx.agent(2));
        let open = st["blocks"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["state"] == "open"));
        (st["ready"] == true && open).then_some(st)
    });
    assert_eq!(st["leases_lost"], 1, "{st}");
    let epochs: Vec<i64> = st["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["epoch"].as_i64().unwrap())
        .collect();
    assert!(
        epochs.iter().all(|e| !old_epochs.contains(e)),
        "an old claim came back: {epochs:?} vs {old_epochs:?}"
    );
    for proto in ["tcp", "udp"] {
        assert_eq!(
            fx.agent(2).mappings(proto),
            0,
            "an old {proto} mapping came back"
        );
    }
    assert_dead(&mut c, "node-c's flows from before its lease ended");
    let mut c_new = fx.hold(2, 5);
    fx.assert_ports_of(2, &c_new);
    echo_all(&mut c_new, "node-c's new flows");
    echo_all(&mut a, "node-a throughout");
    drop((a, b, b_new, c, c_new));
    fx.finish();
}

#[test]
fn a_node_cut_off_from_etcd_keeps_its_flows_then_suspends_and_its_blocks_move_after_its_lease() {
    // node-a keeps five blocks idle, so that with node-b at two the range is full.
    let fx = Fixture::new(1, &TIMERS, [&["--min-blocks", "5"], &[], &[]]);
    fx.until("node-a to hold five blocks", 15, || {
        (fx.blocks_of(0).len() == 5).then_some(())
    });
    let mut a = fx.hold(0, 10);
    let mut c = fx.hold(2, 20);
    let before = fx.c.block_epochs();

    // Shorter than the fence: keep-alives fail and are retried, flows go on, nothing is lost.
    fx.c.set_etcd_link(2, false);
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(3) {
        echo_all(&mut c, "node-c cut off briefly");
        let st = cluster_status(fx.agent(2));
        assert_eq!(st["suspended"], false, "{st}");
        std::thread::sleep(Duration::from_millis(300));
    }
    fx.c.set_etcd_link(2, true);
    fx.until("node-c to reach etcd again", 15, || {
        let st = cluster_status(fx.agent(2));
        (st["connected"] == true && st["fence_in_seconds"].as_f64().unwrap_or(0.0) > 5.0)
            .then_some(())
    });
    echo_all(&mut c, "node-c after a short cut");
    assert_eq!(fx.c.block_epochs(), before, "a short cut cost blocks");
    assert_eq!(cluster_status(fx.agent(2))["leases_lost"], 0);

    // node-b grows until it wants a block the full range does not have.
    let mut b = fx.hold(1, 100);
    fx.until("node-b to find the range full", 10, || {
        (cluster_status(fx.agent(1))["shortage"][NAT.to_string()] == "range_full").then_some(())
    });
    let c_blocks: Vec<u16> = fx.blocks_of(2).into_iter().collect();
    assert_eq!(c_blocks.len(), 1, "{:?}", fx.c.block_epochs());

    // Longer than the fence: node-c suspends (its packets are dropped, its mappings kept), and
    // its block goes to node-b only once its lease has ended.
    let n = &fx.c.nodes[2];
    let stream = UdpStream::start(&n.pod, n.pod_addr);
    std::thread::sleep(Duration::from_millis(300));
    fx.c.set_etcd_link(2, false);
    let st = fx.until("node-c to say it is suspended", 12, || {
        let st = cluster_status(fx.agent(2));
        (st["suspended"] == true).then_some(st)
    });
    assert_eq!(st["fence_in_seconds"], 0.0, "{st}");
    let valid_until = fx.c.nodes[2].pinned_blocks()[&c_blocks[0]].1;
    while fx.c.registered("node-c") {
        assert!(
            !fx.blocks_of(1).contains(&c_blocks[0]),
            "node-b holds node-c's block while node-c's lease lives"
        );
        assert!(
            boottime_ns() < valid_until + 15_000_000_000,
            "node-c's lease never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fx.until("node-b to claim node-c's block", 10, || {
        fx.blocks_of(1).contains(&c_blocks[0]).then_some(())
    });
    let mut b_more = fx.hold(1, 40);
    fx.assert_ports_of(1, &b_more);
    echo_all(&mut b_more, "node-b in node-c's former block");
    assert!(stream.stop() > 300);
    let last_c = fx.logs[2].last_sent_in(&c_blocks).expect("node-c sent");
    let first_b = fx.logs[1]
        .first_sent_in(&c_blocks, 0)
        .expect("node-b sent from node-c's former block");
    let slack = fx.logs[1].uncertainty().max(fx.logs[2].uncertainty());
    assert!(
        last_c <= valid_until + slack,
        "node-c sent at {:.3} s, after its valid-until {:.3} s",
        secs(last_c),
        secs(valid_until)
    );
    assert!(
        last_c + 1_000_000_000 >= valid_until,
        "node-c stopped sending long before its fence: the check saw nothing"
    );
    assert!(
        first_b + slack >= valid_until + COOLDOWN.as_nanos() as u64,
        "node-b sent from node-c's block at {:.3} s, less than a cool-down after node-c's \
         valid-until {:.3} s",
        secs(first_b),
        secs(valid_until)
    );

    // Back in touch, node-c learns its lease is gone: its mappings go, the pods get RSTs.
    fx.c.set_etcd_link(2, true);
    fx.until("node-c to learn its lease ended", 15, || {
        (cluster_status(fx.agent(2))["leases_lost"] == 1).then_some(())
    });
    assert_dead(&mut c, "node-c's flows after its lease ended");
    echo_all(&mut a, "node-a throughout");
    echo_all(&mut b, "node-b throughout");
    drop((a, b, b_more, c));
    fx.finish();
}

/// Polls every node's status (`snat status --json`, every 200 ms) until stopped; returns what
/// it saw go wrong.
fn watch_fences(fx: &Fixture) -> (Arc<AtomicBool>, JoinHandle<Vec<String>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let nodes: Vec<(String, String)> =
        fx.c.nodes
            .iter()
            .map(|n| (n.ns.name.clone(), n.uplink.clone()))
            .collect();
    let t = std::thread::spawn(move || {
        let mut wrong = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            for (ns, iface) in &nodes {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns])
                    .arg(snat_bin())
                    .args(["status", "--json", "--iface", iface])
                    .output()
                    .expect("snat status");
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let c = &v["cluster"];
                if c["suspended"] != false
                    || c["leases_lost"] != 0
                    || c["releases"]["gone"].as_u64().unwrap_or(0) > 0
                {
                    wrong.push(format!("{ns}: {c}"));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        wrong
    });
    (stop, t)
}

#[test]
fn etcd_restarted_and_its_leader_killed_within_the_fence_lose_nothing() {
    // A longer lease: the fence is 15 s after the last good keep-alive (every 3.3 s).
    let timers = [
        "--lease-ttl",
        "20s",
        "--block-cooldown",
        "3s",
        "--fence-margin",
        "2s",
    ];
    let mut fx = Fixture::new(3, &timers, [&[], &[], &[]]);
    let mut conns: Vec<Vec<TcpClient>> = (0..3).map(|i| fx.hold(i, 20)).collect();
    let before = fx.c.block_epochs();
    let (stop, watcher) = watch_fences(&fx);
    let echo_everything = |conns: &mut Vec<Vec<TcpClient>>, what: &str| {
        for (i, c) in conns.iter_mut().enumerate() {
            echo_all(c, &format!("node {i} {what}"));
        }
    };

    // The leader of three members dies: the others elect a new one and refresh every lease.
    let leader = fx.c.etcd.leader();
    fx.c.etcd.kill(leader);
    echo_everything(&mut conns, "without etcd's leader");
    let next = fx.c.etcd.leader();
    assert_ne!(next, leader);
    fx.c.etcd.restart(leader);
    echo_everything(&mut conns, "after a leader change");

    // All of etcd restarts.
    for m in 0..3 {
        fx.c.etcd.kill(m);
    }
    std::thread::sleep(Duration::from_secs(1));
    echo_everything(&mut conns, "while etcd is down");
    fx.c.etcd.restart_stopped();
    fx.until("every node to reach etcd again", 15, || {
        (0..3)
            .all(|i| {
                let st = cluster_status(fx.agent(i));
                st["connected"] == true && st["fence_in_seconds"].as_f64().unwrap_or(0.0) > 10.0
            })
            .then_some(())
    });
    echo_everything(&mut conns, "after etcd's restart");
    stop.store(true, Ordering::Relaxed);
    let wrong = watcher.join().expect("the watcher");
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(fx.c.block_epochs(), before, "blocks changed hands");
    // Claims work again: every node grows by a block.
    for (i, c) in conns.iter_mut().enumerate() {
        let mut more = fx.hold(i, 60);
        fx.assert_ports_of(i, &more);
        echo_all(&mut more, "new flows after etcd's faults");
        c.extend(more);
    }
    drop(conns);
    fx.finish();
}

#[test]
fn the_gateway_cut_off_from_etcd_keeps_its_routes_and_catches_up_and_survives_a_restart() {
    let mut fx = Fixture::new(1, &TIMERS, [&[], &[], &[]]);
    let mut conns: Vec<Vec<TcpClient>> = (0..3).map(|i| fx.hold(i, 20)).collect();
    let a_before = fx.blocks_of(0);

    // Cut off, the gateway keeps its routes: every flow goes on.
    fx.c.etcd.set_link_up(&fx.c.gw_link, false);
    fx.until("the gateway to say it is cut off", 15, || {
        fx.c.gateway_log()
            .contains("cut off from etcd")
            .then_some(())
    });
    for (i, c) in conns.iter_mut().enumerate() {
        echo_all(c, &format!("node {i} while the gateway is cut off"));
    }
    // node-a wants another block: claimed, it waits for the gateway to apply the claim.
    let mut a_more = fx.hold(0, 20);
    let waiting = fx.until("node-a's claim to wait for the gateway", 10, || {
        held(fx.agent(0))
            .into_iter()
            .find(|(_, s)| s == "awaiting-gateway")
            .map(|(b, _)| b)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(held(fx.agent(0))[&waiting], "awaiting-gateway");

    // Back in touch: it applies the claim, publishes it, and the block opens.
    fx.c.etcd.set_link_up(&fx.c.gw_link, true);
    fx.until("node-a's block to open", 20, || {
        (held(fx.agent(0)).get(&waiting).map(String::as_str) == Some("open")).then_some(())
    });
    assert!(fx.c.gateway_log().contains("reconnected to etcd"));
    let mut a_new = fx.hold(0, 40);
    assert!(
        a_new
            .iter()
            .any(|c| block_of(c.seen_as.port()) == Some(waiting)),
        "no new flow in block {waiting} (node-a held {a_before:?})"
    );
    fx.assert_ports_of(0, &a_new);
    echo_all(&mut a_new, "node-a in its block claimed during the cut");
    echo_all(&mut a_more, "node-a");

    // The gateway is killed and started again: it reads the blocks and routes them; the flows
    // carry on (TCP retransmits what the gap lost).
    fx.c.stop_gateway(libc::SIGKILL);
    fx.c.start_gateway(&["--lease-ttl", "5s"]);
    for (i, c) in conns.iter_mut().enumerate() {
        echo_all(c, &format!("node {i} after the gateway's restart"));
    }
    echo_all(&mut a_new, "node-a after the gateway's restart");
    drop((conns, a_more, a_new));

    // Killed for good, its lease lapses (5 s): it stays known, so a block node-a claims now
    // waits for it (the block's replies would have no route) until an operator forgets it.
    fx.c.stop_gateway(libc::SIGKILL);
    let etcd_cli = |args: &[&str]| {
        let endpoints = fx.c.etcd.endpoints().join(",");
        let out = Command::new("ip")
            .args(["netns", "exec", &fx.c.etcd.client.name])
            .arg(snat_bin())
            .arg("cluster")
            .args(args)
            .args(["--etcd-endpoints", &endpoints])
            .output()
            .expect("snat cluster");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    fx.until("the gateway's lease to lapse", 15, || {
        etcd_cli(&["status"])
            .1
            .contains("known but absent")
            .then_some(())
    });
    // Fresh UDP flows from node-a's pod (each a mapping; no answer comes back without the
    // gateway) until it wants a block.
    let pod_addr = fx.c.nodes[0].pod_addr;
    fx.c.nodes[0].pod.run(move || {
        for port in 20000..20100u16 {
            if let Ok(s) = UdpSocket::bind((pod_addr, port)) {
                let _ = s.send_to(b"fill", SocketAddrV4::new(SERVER, 9));
            }
        }
    });
    let waiting = fx.until("node-a's claim to wait for the absent gateway", 10, || {
        held(fx.agent(0))
            .into_iter()
            .find(|(_, s)| s == "awaiting-gateway")
            .map(|(b, _)| b)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(held(fx.agent(0))[&waiting], "awaiting-gateway");
    let (ok, out, err) = etcd_cli(&["forget-gateway", "gateway"]);
    assert!(ok && out.contains("forgotten"), "{out}{err}");
    fx.until(
        "node-a's block to open once the gateway is forgotten",
        10,
        || (held(fx.agent(0)).get(&waiting).map(String::as_str) == Some("open")).then_some(()),
    );
    fx.finish();
}
