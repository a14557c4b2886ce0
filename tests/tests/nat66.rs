//! NAT66 with real traffic: the dual-stack topology (`Topology::new_dual_stack`), the agent
//! started with `--internal 10.1.0.0/16 --internal fd00:10::/48` and no IPv6 `--nat-ip` (so the
//! uplink's 2001:db8:1::1 is the NAT IP), and TCP, UDP, ping, path MTU discovery, traceroute,
//! exhaustion and hostile packets from pods over IPv6. The router has no route back to
//! fd00:10::/48, so only translated traffic gets answers, and a capture on the router's uplink
//! checks that no packet ever arrives there with a pod's address (as its source, or in the packet
//! an ICMPv6 error quotes) or a zero UDP checksum.

use std::{
    io::{self, Read, Write},
    net::{
        Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Barrier, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use snat_common::Counter;
use tests::{
    agent::Agent,
    forge,
    netns::{BpfFs, Netns},
    packets6::{self, egress_drop_ext_headers, icmp6, is_pod6, nh, pod_address_in, Seen6},
    topo::{
        pod_gateway6, Topology, NAT_IP, NAT_IP6, POD_CIDR, POD_CIDR6, ROUTER_SERVER_SIDE6,
        ROUTER_UPLINK6, SERVER, SERVER6,
    },
    traffic::{
        fingerprint, packet_socket, payload, udp_ask, LeakWatch, TcpClient, TcpServer, UdpServer,
    },
};

/// The agent on the node's uplink for both pod CIDRs, with `extra` flags.
fn agent(topo: &Topology, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--internal",
        POD_CIDR,
        "--internal",
        POD_CIDR6,
        "--max-mappings",
        "4096",
    ];
    args.extend_from_slice(extra);
    Agent::start(&topo.node, &topo.uplink, &args)
}

/// One of the agent's counters, by its `snat_common` name.
fn count(agent: &Agent, c: Counter) -> u64 {
    let (group, name) = c.labels();
    agent.counter(group, name)
}

fn v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(a) => panic!("unexpected IPv4 address {a}"),
    }
}

const fn at(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// A loop on a thread inside a namespace, stopped and joined when dropped.
struct Bg {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Bg {
    /// Runs `body(ready, stop)` in `ns`; returns once the body called `ready`.
    fn start(ns: &Netns, body: impl FnOnce(&dyn Fn(), &AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = stop.clone();
        let thread = ns.spawn(move || body(&|| tx.send(()).expect("ready"), &s));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("background loop did not start");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An IPv6 server recording its peers as it sees them (after NAT).
///
/// TCP: to each connection it writes the peer (`[ip]:port\n`), reads one command line and then
/// `echo`es until the client closes, takes everything in as a `sink` and answers
/// `<bytes> <fingerprint>\n`, or sends `source <bytes> <seed>` bytes of [`payload`] and closes.
/// UDP: answers each datagram with the peer it sees.
struct Server6 {
    peers: Arc<Mutex<Vec<SocketAddrV6>>>,
    _bg: Bg,
}

impl Server6 {
    fn tcp(ns: &Netns, addr: SocketAddrV6) -> Self {
        let peers: Arc<Mutex<Vec<SocketAddrV6>>> = Arc::default();
        let p = peers.clone();
        let bg = Bg::start(ns, move |ready, stop| {
            let listener = TcpListener::bind(addr).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        p.lock().unwrap().push(v6(peer));
                        std::thread::Builder::new()
                            .stack_size(256 * 1024)
                            .spawn(move || {
                                let _ = serve(conn, peer);
                            })
                            .expect("spawn");
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Self { peers, _bg: bg }
    }

    fn udp(ns: &Netns, addr: SocketAddrV6) -> Self {
        let peers: Arc<Mutex<Vec<SocketAddrV6>>> = Arc::default();
        let p = peers.clone();
        let bg = Bg::start(ns, move |ready, stop| {
            let sock = UdpSocket::bind(addr).expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            ready();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    p.lock().unwrap().push(v6(peer));
                    let _ = sock.send_to(peer.to_string().as_bytes(), peer);
                }
            }
        });
        Self { peers, _bg: bg }
    }

    fn peers(&self) -> Vec<SocketAddrV6> {
        self.peers.lock().unwrap().clone()
    }
}

/// Reads one line (at most 256 bytes) from `s`.
fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no line"));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
}

fn serve(mut conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.set_write_timeout(Some(Duration::from_secs(60)))?;
    conn.write_all(format!("{peer}\n").as_bytes())?;
    let cmd = read_line(&mut conn)?;
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let mut buf = vec![0u8; 64 * 1024];
    match words.as_slice() {
        ["echo"] => loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        },
        ["sink"] => {
            let mut all = Vec::new();
            conn.read_to_end(&mut all)?;
            conn.write_all(format!("{} {:x}\n", all.len(), fingerprint(&all)).as_bytes())
        }
        ["source", n, seed] => {
            let data = payload(n.parse().expect("bytes"), seed.parse().expect("seed"));
            conn.write_all(&data)?;
            conn.shutdown(Shutdown::Write)
        }
        other => panic!("unknown command {other:?}"),
    }
}

/// A connection to a [`Server6`] (opened on the calling thread, which must be in the client's
/// namespace): the server's view of us, and the command sent.
struct Conn6 {
    stream: TcpStream,
    seen_as: SocketAddrV6,
}

impl Conn6 {
    fn open(to: SocketAddrV6, cmd: &str, timeout: Duration) -> io::Result<Self> {
        let mut stream = TcpStream::connect_timeout(&to.into(), timeout)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        let greeting = read_line(&mut stream)?;
        let seen_as: SocketAddr = greeting
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{greeting}: {e}")))?;
        stream.write_all(format!("{cmd}\n").as_bytes())?;
        Ok(Self {
            stream,
            seen_as: v6(seen_as),
        })
    }

    /// Sends `data` and reads it back (an `echo` connection).
    fn echo(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut writer = self.stream.try_clone()?;
        let owned = data.to_vec();
        let w = std::thread::spawn(move || writer.write_all(&owned));
        let mut back = vec![0u8; data.len()];
        self.stream.read_exact(&mut back)?;
        w.join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        Ok(back)
    }

    /// Sends `data` to a `sink` and returns its answer (`<bytes> <fingerprint>`).
    fn upload(mut self, data: &[u8]) -> io::Result<String> {
        self.stream.write_all(data)?;
        self.stream.shutdown(Shutdown::Write)?;
        read_line(&mut self.stream)
    }
}

/// Asks a UDP [`Server6`] (from the calling thread's namespace) how it sees us.
fn udp6_ask(to: SocketAddrV6) -> io::Result<SocketAddrV6> {
    let sock = UdpSocket::bind(at(Ipv6Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(b"who am i", to)?;
    let mut buf = [0u8; 128];
    let (n, _) = sock.recv_from(&mut buf)?;
    let seen: SocketAddr = String::from_utf8_lossy(&buf[..n])
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?;
    Ok(v6(seen))
}

/// Records the IPv6 packets arriving on an interface (their first 2,048 bytes, at most 16,384).
struct Capture6 {
    packets: Arc<Mutex<Vec<Vec<u8>>>>,
    _bg: Bg,
}

impl Capture6 {
    fn start(ns: &Netns, iface: &str) -> Self {
        let packets: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let p = packets.clone();
        let iface = std::ffi::CString::new(iface).expect("iface name");
        let bg = Bg::start(ns, move |ready, stop| {
            let fd = packet_socket(&iface, libc::ETH_P_IPV6);
            ready();
            let mut buf = vec![0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: reading into our buffer from our socket (it has a receive timeout).
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                let mut g = p.lock().unwrap();
                if g.len() < 16_384 {
                    g.push(buf[..n.min(buf.len())].to_vec());
                }
            }
        });
        Self { packets, _bg: bg }
    }

    /// What was captured so far (after a moment for packets in flight).
    fn packets(&self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(200));
        self.packets.lock().unwrap().clone()
    }

    /// Asserts IPv6 packets were seen, none with a pod address (as source or quoted) and none
    /// with a zero UDP checksum; returns them.
    fn assert_clean(&self) -> Vec<Vec<u8>> {
        let packets = self.packets();
        assert!(!packets.is_empty(), "the capture saw no IPv6 packet at all");
        let leaks: Vec<String> = packets
            .iter()
            .filter(|p| pod_address_in(p).is_some())
            .take(5)
            .map(|p| describe(p))
            .collect();
        assert!(
            leaks.is_empty(),
            "packets arrived with a pod address ({} of {}), e.g. {leaks:#?}",
            packets
                .iter()
                .filter(|p| pod_address_in(p).is_some())
                .count(),
            packets.len()
        );
        let zero: Vec<String> = packets
            .iter()
            .filter(|p| udp_checksum(p) == Some(0))
            .take(5)
            .map(|p| describe(p))
            .collect();
        assert!(
            zero.is_empty(),
            "UDP with a zero checksum arrived: {zero:#?}"
        );
        packets
    }
}

/// The UDP checksum field of a captured unfragmented IPv6 UDP packet.
fn udp_checksum(ip: &[u8]) -> Option<u16> {
    let (exts, proto, at) = packets6::walk(ip)?;
    let frag = exts.iter().any(|e| e.kind == nh::FRAGMENT);
    (proto == nh::UDP && !frag && ip.len() >= at + 8)
        .then(|| u16::from_be_bytes([ip[at + 6], ip[at + 7]]))
}

/// A captured packet in one line: addresses, protocol, first bytes of the upper layer.
fn describe(ip: &[u8]) -> String {
    if ip.len() < 40 || packets6::walk(ip).is_none() {
        return format!("{:02x?}", &ip[..ip.len().min(80)]);
    }
    let s = Seen6::parse_ip(ip);
    let l4 = s.l4();
    format!(
        "{} -> {} proto {} {:02x?}",
        s.src(),
        s.dst(),
        s.proto,
        &l4[..l4.len().min(16)]
    )
}

/// The captured packets (IPv6, without Ethernet header) that parse, as [`Seen6`].
fn parsed(packets: &[Vec<u8>]) -> Vec<Seen6> {
    packets
        .iter()
        .filter(|p| p.len() >= 40 && packets6::walk(p).is_some())
        .map(|p| Seen6::parse_ip(p))
        .collect()
}

/// `ping -6` from `ns` to `to`: whether `count` requests all got replies, and the output.
fn ping6(ns: &Netns, to: Ipv6Addr, count: u32) -> (bool, String) {
    let n = count.to_string();
    let out = ns.exec_unchecked(&[
        "timeout",
        "30",
        "ping",
        "-6",
        "-n",
        "-c",
        &n,
        "-i",
        "0.2",
        "-W",
        "1",
        &to.to_string(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all = out.status.success() && text.contains(&format!("{count} received"));
    (all, text)
}

#[test]
fn without_snat_a_pods_ipv6_gets_no_answer_while_the_rest_of_the_path_works() {
    // The dual-stack topology itself: everything but the way back to the pods routes.
    let topo = Topology::new_dual_stack(2);
    for (ns, name, to) in [
        (&topo.pods[0].ns, "pod0 → its gateway", pod_gateway6(0)),
        (&topo.pods[1].ns, "pod1 → its gateway", pod_gateway6(1)),
        (&topo.node, "node → router", ROUTER_UPLINK6),
        (&topo.node, "node → server", SERVER6),
        (&topo.router, "router → server", SERVER6),
        (&topo.server, "server → router", ROUTER_SERVER_SIDE6),
        (&topo.server, "server → node", NAT_IP6),
    ] {
        let (ok, text) = ping6(ns, to, 2);
        assert!(ok, "{name} ({to}) must answer:\n{text}");
    }
    // A pod's echo requests reach the server with the pod's address, and the answers die at the
    // router, which has no route to fd00:10::/48.
    let at_server = Capture6::start(&topo.server, &format!("{}-sr", topo.prefix));
    let (ok, text) = ping6(&topo.pods[0].ns, SERVER6, 2);
    assert!(
        !ok && text.contains("0 received"),
        "no answer expected:\n{text}"
    );
    let pod = topo.pods[0].addr6();
    let requests = parsed(&at_server.packets())
        .into_iter()
        .filter(|s| s.proto == nh::ICMPV6 && s.icmp_type() == icmp6::ECHO_REQUEST)
        .filter(|s| s.src() == pod)
        .count();
    assert!(
        requests >= 2,
        "the pod's requests reached the server: {requests}"
    );
    let route = topo
        .router
        .exec_unchecked(&["ip", "-6", "route", "get", &pod.to_string()]);
    assert!(
        !route.status.success() || String::from_utf8_lossy(&route.stdout).contains("unreachable"),
        "the router must have no route to the pods: {}",
        String::from_utf8_lossy(&route.stdout)
    );
    // IPv4 is as it was.
    let out = topo
        .node
        .exec_unchecked(&["ping", "-c", "1", "-W", "1", &SERVER.to_string()]);
    assert!(out.status.success(), "IPv4 node → server");
}

#[test]
fn tcp_and_udp_from_a_pod_leave_from_the_nat_ip6() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let tcp = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let udp = Server6::udp(&topo.server, at(SERVER6, 5353));
    let (tcp_before, udp_before) = (
        count(&agent, Counter::EgressTranslatedTcp),
        count(&agent, Counter::EgressTranslatedUdp),
    );

    let (seen_tcp, echoed, seen_udp) = topo.pods[0].ns.run(|| {
        let mut c = Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3))
            .expect("TCP connect over IPv6");
        let echoed = c.echo(b"hello over IPv6").expect("echo");
        let seen_udp = udp6_ask(at(SERVER6, 5353)).expect("UDP answer over IPv6");
        (c.seen_as, echoed, seen_udp)
    });
    assert_eq!(echoed, b"hello over IPv6");
    for (what, seen) in [("TCP", seen_tcp), ("UDP", seen_udp)] {
        assert_eq!(*seen.ip(), NAT_IP6, "{what}: the server sees the NAT IP");
        assert!(
            seen.port() >= 32768,
            "{what}: port {} outside the range",
            seen.port()
        );
    }
    assert!(
        tcp.peers().iter().all(|p| *p.ip() == NAT_IP6),
        "{:?}",
        tcp.peers()
    );
    assert!(
        udp.peers().iter().all(|p| *p.ip() == NAT_IP6),
        "{:?}",
        udp.peers()
    );
    assert!(count(&agent, Counter::EgressTranslatedTcp) > tcp_before);
    assert!(count(&agent, Counter::EgressTranslatedUdp) > udp_before);
    assert!(count(&agent, Counter::IngressTranslatedTcp) >= 1);
    assert!(count(&agent, Counter::IngressTranslatedUdp) >= 1);

    let packets = wire.assert_clean();
    let translated = parsed(&packets)
        .into_iter()
        .filter(|s| s.src() == NAT_IP6 && matches!(s.proto, nh::TCP | nh::UDP))
        .count();
    assert!(
        translated >= 4,
        "{translated} translated packets on the wire"
    );
}

#[test]
fn ping6_from_a_pod_gets_replies() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let (ok, text) = ping6(&topo.pods[0].ns, SERVER6, 3);
    assert!(ok, "every echo reply must reach the pod:\n{text}");
    let requests: Vec<Seen6> = parsed(&wire.assert_clean())
        .into_iter()
        .filter(|s| s.proto == nh::ICMPV6 && s.icmp_type() == icmp6::ECHO_REQUEST)
        .collect();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests.iter().all(|s| s.src() == NAT_IP6));
    assert!(count(&agent, Counter::EgressTranslatedIcmp) >= 3);
    assert!(count(&agent, Counter::IngressTranslatedIcmp) >= 3);
    assert_eq!(count(&agent, Counter::CreatedIcmp), 1);
}

#[test]
fn five_megabytes_each_way_arrive_intact() {
    const LEN: usize = 5 * 1024 * 1024;
    let topo = Topology::new_dual_stack(1);
    let _agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let _server = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let data = payload(LEN, 41);
    let expect = format!("{LEN} {:x}", fingerprint(&data));
    let (up, down) = topo.pods[0].ns.run(move || {
        let up = Conn6::open(at(SERVER6, 8080), "sink", Duration::from_secs(3))
            .expect("connect for the upload")
            .upload(&data)
            .expect("upload");
        let mut c = Conn6::open(
            at(SERVER6, 8080),
            &format!("source {LEN} 42"),
            Duration::from_secs(3),
        )
        .expect("connect for the download");
        let mut down = Vec::new();
        c.stream.read_to_end(&mut down).expect("download");
        (up, down)
    });
    assert_eq!(up, expect, "what the server received (bytes, fingerprint)");
    assert_eq!(down.len(), LEN);
    assert_eq!(
        fingerprint(&down),
        fingerprint(&payload(LEN, 42)),
        "the download arrived intact"
    );
    wire.assert_clean();
}

#[test]
fn packet_too_big_reaches_the_pod_and_its_upload_completes() {
    // The router's side towards the server carries 1,280 bytes; the server's side stays at 1,500
    // so its MSS (1,440) does not already keep the pod's segments small. The pod's 1,500-byte
    // packets only get through once the router's Packet Too Big, sent to the NAT IP, reaches the
    // pod translated.
    let topo = Topology::new_dual_stack(1);
    topo.router
        .ip(&["link", "set", &format!("{}-rs", topo.prefix), "mtu", "1280"]);
    let agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let pod = &topo.pods[0];
    let at_pod = Capture6::start(&pod.ns, &pod.iface);
    let _server = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let before = count(&agent, Counter::IngressTranslatedIcmpError);

    let data = payload(1024 * 1024, 7);
    let expect = format!("{} {:x}", data.len(), fingerprint(&data));
    let started = Instant::now();
    let (seen_as, answer) = pod.ns.run(move || {
        let c = Conn6::open(at(SERVER6, 8080), "sink", Duration::from_secs(3)).expect("connect");
        let seen = c.seen_as;
        (seen, c.upload(&data))
    });
    let took = started.elapsed();
    assert_eq!(*seen_as.ip(), NAT_IP6);
    let answer = answer.unwrap_or_else(|e| {
        panic!("the 1 MB upload did not complete ({e}) after {took:?}: no Packet Too Big reached the pod?")
    });
    assert_eq!(answer, expect);
    assert!(took < Duration::from_secs(20), "the upload took {took:?}");

    let route = pod
        .ns
        .exec(&["ip", "-6", "route", "get", &SERVER6.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("mtu 1280"),
        "the pod learned the path MTU:\n{route}"
    );
    let addr6 = pod.addr6();
    let ptbs: Vec<Seen6> = parsed(&at_pod.packets())
        .into_iter()
        .filter(|s| s.proto == nh::ICMPV6 && s.icmp_type() == icmp6::PACKET_TOO_BIG)
        .collect();
    assert!(!ptbs.is_empty(), "a Packet Too Big reached the pod");
    for p in &ptbs {
        assert_eq!((p.src(), p.dst(), p.mtu()), (ROUTER_UPLINK6, addr6, 1280));
        assert_eq!(p.checksum_ok(), Some(true), "ICMPv6 checksum");
        assert_eq!(p.quote().src(), addr6, "the quote names the pod");
    }
    assert!(count(&agent, Counter::IngressTranslatedIcmpError) > before);
    wire.assert_clean();
}

#[test]
fn traceroute6_shows_the_router_and_reaches_the_server() {
    let topo = Topology::new_dual_stack(1);
    // Every probe gets its answer: no ICMPv6 rate limit along the path.
    for ns in [&topo.node, &topo.router, &topo.server] {
        ns.sysctl("net.ipv6.icmp.ratelimit=0");
    }
    let agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let out = topo.pods[0].ns.exec_unchecked(&[
        "timeout",
        "60",
        "traceroute",
        "-6",
        "-n",
        "-q",
        "1",
        "-w",
        "2",
        "-m",
        "6",
        &SERVER6.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "traceroute failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Hop lines: "<n>  <address>  <time> ms".
    let hops: Vec<(u32, String)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_owned()))
        })
        .collect();
    let router = ROUTER_UPLINK6.to_string();
    let server = SERVER6.to_string();
    assert!(
        hops.iter().any(|(_, a)| *a == router),
        "the router hop {router}:\n{text}"
    );
    assert_eq!(
        hops.last().map(|(_, a)| a.as_str()),
        Some(server.as_str()),
        "the last hop is the server:\n{text}"
    );
    let router_hop = hops.iter().find(|(_, a)| *a == router).map(|(n, _)| *n);
    assert_eq!(router_hop, Some(2), "the node, then the router:\n{text}");
    assert!(count(&agent, Counter::IngressTranslatedIcmpError) >= 2);
    wire.assert_clean();
}

/// Two ports: two IPv6 connections get them, a third is refused and answered at once (a RST for
/// TCP, an ICMPv6 "administratively prohibited" for UDP, `--on-exhaustion reject` being the
/// default), while IPv4 has ports of its own; nothing of the pod's leaves.
#[test]
fn a_small_range_is_exhausted_over_ipv6_while_ipv4_still_works() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(&topo, &["--port-range", "40000-40001"]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let _v6 = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let _udp6 = Server6::udp(&topo.server, at(SERVER6, 5353));
    let _v4 = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let (first, second, third, took, v4) = topo.pods[0].ns.run(|| {
        let to = at(SERVER6, 8080);
        let mut a = Conn6::open(to, "echo", Duration::from_secs(3)).expect("first connection");
        let mut b = Conn6::open(to, "echo", Duration::from_secs(3)).expect("second connection");
        assert_eq!(a.echo(b"one").unwrap(), b"one");
        assert_eq!(b.echo(b"two").unwrap(), b"two");
        let started = Instant::now();
        let third = Conn6::open(to, "echo", Duration::from_secs(3)).map(|c| c.seen_as);
        let took = started.elapsed();
        // Both are still alive, and IPv4 has its own ports on its own NAT IP.
        assert_eq!(a.echo(b"still one").unwrap(), b"still one");
        let v4 = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3)).map(
            |mut c| {
                assert_eq!(c.echo(b"four").unwrap(), b"four");
                c.seen_as
            },
        );
        (a.seen_as, b.seen_as, third, took, v4)
    });
    for s in [first, second] {
        assert_eq!(*s.ip(), NAT_IP6);
        assert!((40000..=40001).contains(&s.port()), "{s}");
    }
    assert_ne!(first.port(), second.port());
    let refused = third.expect_err("a third connection to the same destination got a port");
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "a RST, not a timeout"
    );
    assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
    let v4 = v4.expect("IPv4 still connects");
    assert_eq!(*v4.ip(), NAT_IP);
    assert!((40000..=40001).contains(&v4.port()), "{v4}");

    // UDP: two sockets take the two ports towards the server; the third learns at once, from
    // an error its socket matches by the quoted ports.
    let (udp_err, udp_took) = topo.pods[0].ns.run(|| {
        let to = at(SERVER6, 5353);
        let socks: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind(at(Ipv6Addr::UNSPECIFIED, 0)).unwrap())
            .collect();
        for s in &socks {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(b"who am i", to).unwrap();
            s.recv(&mut [0u8; 128]).expect("UDP answer");
        }
        let s = UdpSocket::bind(at(Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let start = Instant::now();
        s.send(b"one too many").unwrap();
        let r = s.recv(&mut [0u8; 64]);
        (r.err().map(|e| e.raw_os_error()), start.elapsed())
    });
    assert_eq!(
        udp_err,
        Some(Some(libc::EACCES)),
        "ICMPv6 unreachable code 1 (administratively prohibited) reaches the socket"
    );
    assert!(udp_took < Duration::from_secs(1), "{udp_took:?}");
    assert!(count(&agent, Counter::RejectRst) >= 1);
    assert!(count(&agent, Counter::RejectIcmp) >= 1);
    // The refusals show on the IPv6 pools and under the pod's IPv6 source.
    let status = agent.json("status", &[]);
    let refused = |proto: &str| {
        status["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .find(|p| p["nat_ip"] == NAT_IP6.to_string() && p["proto"] == proto)
            .unwrap_or_else(|| panic!("no IPv6 {proto} pool: {status}"))["exhausted_flows"]
            .as_u64()
    };
    assert_eq!(
        (refused("tcp"), refused("udp")),
        (Some(1), Some(1)),
        "{status}"
    );
    let pod6 = topo.pods[0].addr6().to_string();
    assert!(
        status["top_refused"]
            .as_array()
            .expect("top_refused")
            .iter()
            .any(|r| r["source"] == pod6.as_str() && r["flows"].as_u64() >= Some(2)),
        "{status}"
    );
    wire.assert_clean();
}

#[test]
fn ipv4_and_ipv6_flows_from_one_pod_at_once_are_both_translated() {
    const ROUNDS: usize = 20;
    let topo = Topology::new_dual_stack(1);
    let _agent = agent(&topo, &[]);
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let _tcp4 = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let _udp4 = UdpServer::start(&topo.server, SocketAddrV4::new(SERVER, 5353));
    let _tcp6 = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let _udp6 = Server6::udp(&topo.server, at(SERVER6, 5353));
    let barrier = Arc::new(Barrier::new(2));
    let pod = &topo.pods[0];
    let b4 = barrier.clone();
    let v4 = pod.ns.spawn(move || {
        b4.wait();
        let mut seen = Vec::new();
        let mut c = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("IPv4 connect");
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..ROUNDS {
            let msg = format!("v4 round {i}");
            assert_eq!(c.echo(msg.as_bytes()).expect("IPv4 echo"), msg.as_bytes());
            seen.push(SocketAddr::V4(
                udp_ask(&sock, SocketAddrV4::new(SERVER, 5353)).expect("IPv4 UDP"),
            ));
        }
        seen.push(SocketAddr::V4(c.seen_as));
        seen
    });
    let b6 = barrier;
    let v6 = pod.ns.spawn(move || {
        b6.wait();
        let mut seen = Vec::new();
        let mut c =
            Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3)).expect("IPv6 connect");
        for i in 0..ROUNDS {
            let msg = format!("v6 round {i}");
            assert_eq!(c.echo(msg.as_bytes()).expect("IPv6 echo"), msg.as_bytes());
            seen.push(SocketAddr::V6(
                udp6_ask(at(SERVER6, 5353)).expect("IPv6 UDP"),
            ));
        }
        seen.push(SocketAddr::V6(c.seen_as));
        seen
    });
    let seen4 = v4.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
    let seen6 = v6.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert!(seen4.iter().all(|s| s.ip() == NAT_IP), "{seen4:?}");
    assert!(seen6.iter().all(|s| s.ip() == NAT_IP6), "{seen6:?}");
    assert_eq!(seen4.len(), ROUNDS + 1);
    assert_eq!(seen6.len(), ROUNDS + 1);
    leaks.assert_no_leak();
    wire.assert_clean();
}

/// Runs `tests/scapy/malformed6.py` in `ns` and returns case name → marker, in sending order.
fn send_malformed(ns: &Netns, iface: &str, dst_mac: &str, args: &Value) -> Vec<(String, u16)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scapy/malformed6.py");
    // Debian's python3, which python3-scapy installs into (another python3 may come first on PATH).
    let out = ns.exec(&[
        "/usr/bin/python3",
        script.to_str().expect("utf-8 path"),
        iface,
        dst_mac,
        &args.to_string(),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["case"].as_str().expect("case").to_owned(),
                v["marker"].as_u64().expect("marker") as u16,
            )
        })
        .collect()
}

#[test]
fn malformed_ipv6_from_a_pod_never_leaves_with_its_address() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(&topo, &[]);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let pod = &topo.pods[0];
    let malformed_before = count(&agent, Counter::EgressDropMalformed);
    let sent = send_malformed(
        &pod.ns,
        &pod.iface,
        &forge::mac(&topo.node, &pod.node_iface),
        &json!({"pod": pod.addr6().to_string(), "server": SERVER6.to_string()}),
    );
    assert_eq!(sent.len(), 15, "{sent:?}");
    let packets = wire.assert_clean();

    // The well-formed control datagram came out translated (so the capture saw the pod's
    // traffic), and nothing else of the pod's carries a pod address (checked above).
    let control = sent
        .iter()
        .find(|(c, _)| c == "udp_ok")
        .expect("udp_ok sent")
        .1;
    let seen = parsed(&packets);
    let ok = seen
        .iter()
        .find(|s| s.proto == nh::UDP && s.l4().len() >= 4 && s.dport() == control)
        .unwrap_or_else(|| panic!("the control datagram did not arrive translated"));
    assert_eq!(ok.src(), NAT_IP6);
    assert_eq!(ok.checksum_ok(), Some(true));
    // None of the chains that cannot be walked left at all (translated or not).
    for case in [
        "routing_segments_left",
        "nine_dest_opts",
        "esp",
        "ah",
        "udp_zero_checksum",
    ] {
        let marker = sent.iter().find(|(c, _)| c == case).expect("sent").1;
        let left = seen.iter().any(|s| {
            s.exts
                .iter()
                .any(|e| matches!(e.kind, nh::ROUTING | nh::DEST_OPTS))
                || matches!(s.proto, nh::ESP | nh::AH)
                || (s.proto == nh::UDP && s.l4().len() >= 4 && s.dport() == marker)
        });
        assert!(!left, "{case} left the node");
    }
    assert!(
        !seen.iter().any(|s| is_pod6(s.src())),
        "a pod address arrived"
    );
    assert!(
        count(&agent, Counter::EgressDropMalformed) > malformed_before,
        "the zero-checksum datagram is counted as malformed"
    );

    // --- Needs Counter::EgressDropExtHeaders (see packets6::egress_drop_ext_headers). ---
    assert!(
        count(&agent, egress_drop_ext_headers()) >= 2,
        "the routing header with segments left and the nine-header chain are counted"
    );

    // Normal IPv6 traffic still works.
    let _server = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let seen_as = pod.ns.run(|| {
        let mut c = Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3))
            .expect("connect after the hostile packets");
        assert_eq!(c.echo(b"still fine").unwrap(), b"still fine");
        c.seen_as
    });
    assert_eq!(*seen_as.ip(), NAT_IP6);
    wire.assert_clean();
}

/// An idle IPv6 UDP mapping is released on time and its port serves the next flow: with one
/// port, a second flow to the same server is refused while the first holds it, and gets it once
/// the first has been idle for `--udp-timeout`.
#[test]
fn idle_ipv6_mappings_expire_and_give_their_port_back() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(
        &topo,
        &[
            "--port-range",
            "40000-40000",
            "--udp-timeout",
            "2s",
            "--gc-interval",
            "250ms",
        ],
    );
    let _udp = Server6::udp(&topo.server, at(SERVER6, 5353));
    let to = at(SERVER6, 5353);
    let first = topo.pods[0].ns.run(move || udp6_ask(to));
    let first = first.expect("the first flow gets the port");
    assert_eq!((*first.ip(), first.port()), (NAT_IP6, 40000));
    let created = count(&agent, Counter::CreatedUdp);
    // The operator sees the IPv6 mapping: status, stats and metrics.
    let stats = agent.stats();
    assert_eq!(stats["mappings6"]["udp"], 1, "{stats}");
    assert_eq!(stats["nat_ips6"][0], NAT_IP6.to_string(), "{stats}");
    let status = agent.json("status", &[]);
    assert_eq!(status["mappings6"]["udp"], 1, "{status}");
    let (ok, text, err) = agent.cli(&["status", "--iface", &topo.uplink]);
    assert!(ok, "{err}");
    assert!(
        text.contains(&format!("IPv6: NAT IPs {NAT_IP6}  mappings udp 1")),
        "{text}"
    );
    let metrics = agent.scrape(&topo.node);
    assert_eq!(
        tests::metric(&metrics, "snat_mappings{family=\"ipv6\",proto=\"udp\"}"),
        Some(1.0),
        "{metrics}"
    );
    // Another pod endpoint to the same server while the one port is held: refused.
    let refused = topo.pods[0].ns.run(move || udp6_ask(to));
    assert!(refused.is_err(), "a second flow got a port: {refused:?}");
    // Idle for the timeout and a few ticks: released, the port free again.
    std::thread::sleep(Duration::from_millis(3500));
    let again = topo.pods[0].ns.run(move || udp6_ask(to));
    let again = again.expect("after the timeout the port is free again");
    assert_eq!((*again.ip(), again.port()), (NAT_IP6, 40000));
    assert_eq!(count(&agent, Counter::CreatedUdp), created + 1);
    let stats = agent.stats();
    assert_eq!(stats["mappings6"]["udp"], 1, "{stats}");
    assert_eq!(stats["expired"]["udp"]["idle"], 1, "{stats}");
}

/// A stopped agent's guard (`--on-stop closed`, the default) keeps the pods' IPv6 in too:
/// nothing with a pod source leaves while no agent runs; `snat cleanup` removes the guard.
#[test]
fn the_stop_guard_keeps_ipv6_pods_in() {
    let topo = Topology::new_dual_stack(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let wire = Capture6::start(&topo.router, &topo.router_uplink);
    let _udp = Server6::udp(&topo.server, at(SERVER6, 5353));
    let to = at(SERVER6, 5353);
    let first = agent(&topo, &["--pin-dir", bpffs.arg()]);
    let seen = topo.pods[0].ns.run(move || udp6_ask(to));
    assert_eq!(
        *seen.expect("translated while the agent runs").ip(),
        NAT_IP6
    );
    let (status, _) = first.stop();
    assert!(status.success(), "{status}");
    let after = topo.pods[0].ns.run(move || udp6_ask(to));
    assert!(
        after.is_err(),
        "a datagram got through the guard: {after:?}"
    );
    // The guard dropped it: nothing with a pod address reached the router.
    wire.assert_clean();
    tests::agent::cleanup(&topo, &bpffs);
}

/// The operator's views show IPv6 mappings next to the IPv4 ones: `snat conns` rows with
/// `[ip]:port` endpoints and filters of either family (one family's network lists only its
/// mappings), the pod's IPv6 source in `top`, and a pool row for the IPv6 NAT IP in `status`
/// and `/metrics`.
#[test]
fn conns_top_and_status_show_ipv6_mappings_next_to_ipv4_ones() {
    let topo = Topology::new_dual_stack(1);
    let agent = agent(&topo, &[]);
    let _tcp6 = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let _udp6 = Server6::udp(&topo.server, at(SERVER6, 5353));
    let _tcp4 = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let pod6 = topo.pods[0].addr6();
    let (conn6, local6, udp_seen, conn4) = topo.pods[0].ns.run(|| {
        let mut c =
            Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3)).expect("IPv6 connect");
        assert_eq!(c.echo(b"hello").expect("IPv6 echo"), b"hello");
        let local = c.stream.local_addr().expect("local address");
        let udp = udp6_ask(at(SERVER6, 5353)).expect("IPv6 UDP");
        let c4 = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("IPv4 connect");
        (c, local, udp, c4)
    });
    assert_eq!(*conn6.seen_as.ip(), NAT_IP6);

    // Every row, both families.
    let rows = |args: &[&str]| -> Vec<Value> {
        let conns = agent.json("conns", args);
        conns["conns"].as_array().cloned().unwrap_or_default()
    };
    let all = rows(&[]);
    let tcp = all
        .iter()
        .find(|r| r["internal"] == local6.to_string())
        .unwrap_or_else(|| panic!("no row for {local6}: {all:#?}"));
    assert_eq!(
        (
            &tcp["proto"],
            &tcp["nat"],
            &tcp["destination"],
            &tcp["state"]
        ),
        (
            &json!("tcp"),
            &json!(conn6.seen_as.to_string()),
            &json!(format!("[{SERVER6}]:8080")),
            &json!("established")
        ),
        "{tcp}"
    );
    let udp = all
        .iter()
        .find(|r| r["proto"] == "udp")
        .unwrap_or_else(|| panic!("no UDP row: {all:#?}"));
    assert_eq!(udp["nat"], udp_seen.to_string(), "{udp}");
    assert_eq!(udp["destination"], SERVER6.to_string(), "{udp}");
    assert!(
        udp["internal"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("[{pod6}]:"))),
        "{udp}"
    );
    let v4_row = all
        .iter()
        .find(|r| r["internal"] == conn4.stream.local_addr().unwrap().to_string())
        .unwrap_or_else(|| panic!("no IPv4 row: {all:#?}"));
    assert_eq!(v4_row["nat"], conn4.seen_as.to_string());

    // Filters: a network of one family finds that family's rows only.
    let internal = |rows: Vec<Value>| -> Vec<String> {
        let mut v: Vec<String> = rows
            .iter()
            .map(|r| r["internal"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let by_dst6 = rows(&["--destination", &format!("{SERVER6}/128")]);
    assert_eq!(by_dst6.len(), 2, "{by_dst6:#?}");
    assert!(internal(by_dst6).contains(&local6.to_string()));
    let by_dst4 = rows(&["--destination", &format!("{SERVER}/32")]);
    assert_eq!(
        internal(by_dst4),
        [conn4.stream.local_addr().unwrap().to_string()],
        "an IPv4 network lists no IPv6 mapping"
    );
    assert!(rows(&["--destination", "0.0.0.0/0", "--source", POD_CIDR6]).is_empty());
    let by_src6 = rows(&["--source", POD_CIDR6, "--proto", "tcp"]);
    assert_eq!(internal(by_src6), [local6.to_string()]);

    // top: the pod's IPv6 source, holding its two ports (TCP and UDP).
    let (ok, text, err) = agent.cli(&["top", "--iface", &topo.uplink, "--iterations", "1"]);
    assert!(ok, "{err}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&pod6.to_string()))
        .unwrap_or_else(|| panic!("no {pod6} in:\n{text}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [pod6.to_string().as_str(), "2", "0"],
        "{text}"
    );
    let (ok, text, _) = agent.cli(&[
        "top",
        "--iface",
        &topo.uplink,
        "--by",
        "destination",
        "--iterations",
        "1",
    ]);
    assert!(ok && text.contains(&format!("[{SERVER6}]:8080")), "{text}");

    // status: the IPv4 pools as before, then the IPv6 NAT IP's.
    let status = agent.json("status", &[]);
    let pools = status["pools"].as_array().expect("pools");
    assert_eq!(pools[0]["nat_ip"], NAT_IP.to_string(), "{status}");
    let pool6: Vec<&Value> = pools
        .iter()
        .filter(|p| p["nat_ip"] == NAT_IP6.to_string())
        .collect();
    assert_eq!(pool6.len(), 3, "one row per protocol: {status}");
    let in_use: u64 = pool6
        .iter()
        .map(|p| p["ports_in_use"].as_u64().unwrap())
        .sum();
    assert!(in_use >= 2, "{status}");
    assert!(pool6.iter().all(|p| p["ports_total"].as_u64() > Some(0)));
    assert!(
        status["top_sources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["source"] == pod6.to_string() && s["ports"] == 2),
        "{status}"
    );
    assert_eq!(status["mappings6"]["tcp"], 1, "{status}");
    let (ok, text, _) = agent.cli(&["status", "--iface", &topo.uplink]);
    assert!(
        ok && text.lines().any(|l| l.starts_with(&NAT_IP6.to_string())),
        "{text}"
    );
    let metrics = agent.scrape(&topo.node);
    assert_eq!(
        tests::metric(
            &metrics,
            &format!("snat_ports_in_use{{nat_ip=\"{NAT_IP6}\",proto=\"tcp\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    drop((conn6, conn4));
}

/// `--keep-state`: the IPv6 tables are pinned with the IPv4 ones, so an IPv6 connection keeps
/// passing while no agent runs and after the next agent takes over, listed with the NAT endpoint
/// it had. An agent started on that state without IPv6 networks starts its IPv6 tables afresh
/// (and says so) instead of misusing the pinned ones.
#[test]
fn ipv6_connections_survive_a_keep_state_restart() {
    let topo = Topology::new_dual_stack(1);
    let bpffs = BpfFs::new(&topo.prefix);
    let _server = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let kept = ["--pin-dir", bpffs.arg(), "--keep-state"];
    let first = agent(&topo, &kept);
    let mut conn = topo.pods[0].ns.run(|| {
        Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3)).expect("IPv6 connect")
    });
    assert_eq!(*conn.seen_as.ip(), NAT_IP6);
    assert_eq!(conn.echo(b"before").expect("echo"), b"before");
    let (status, _) = first.stop();
    assert!(status.success(), "{status}");
    assert_eq!(
        conn.echo(b"no agent").expect("echo while no agent runs"),
        b"no agent"
    );

    let second = agent(&topo, &kept);
    assert!(
        second.log().contains("taking over the state pinned"),
        "{}",
        second.log()
    );
    assert_eq!(
        conn.echo(b"after").expect("echo after the restart"),
        b"after"
    );
    let rows = second.json("conns", &["--proto", "tcp"]);
    assert!(
        rows["conns"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|r| r["nat"] == conn.seen_as.to_string()),
        "the IPv6 mapping survived: {rows}"
    );
    let (status, _) = second.stop();
    assert!(status.success(), "{status}");

    // Without IPv6 networks: the pinned IPv6 tables are not taken over.
    let third = Agent::start(
        &topo.node,
        &topo.uplink,
        &[
            "--internal",
            POD_CIDR,
            "--max-mappings",
            "4096",
            "--pin-dir",
            bpffs.arg(),
            "--on-stop",
            "open",
        ],
    );
    let log = third.log();
    assert!(
        log.contains("taking over the state pinned")
            && log.contains("the IPv6 mapping tables start empty"),
        "{log}"
    );
    assert_eq!(third.json("status", &[])["mappings6"]["tcp"], 0);
    drop(conn);
    let (status, _) = third.stop();
    assert!(status.success(), "{status}");
    assert!(!bpffs.path.join(&topo.uplink).exists(), "pins left behind");
}

/// Writes `snat plan --nat-ip NAT_IP --nat-ip IP6 --nodes N` (2,000 ports per node over the
/// two NAT IPs: a slice of 1,000 on each, from 40000) to a file of its own.
fn mixed_plan(topo: &Topology, ip6: Ipv6Addr, nodes: u32, name: &str) -> PathBuf {
    let out = std::process::Command::new(tests::agent::snat_bin())
        .args(["plan", "--nodes", &nodes.to_string()])
        .args([
            "--nat-ip",
            &NAT_IP.to_string(),
            "--nat-ip",
            &ip6.to_string(),
        ])
        .args([
            "--ports-per-node",
            "2000",
            "--port-range",
            "40000:49999",
            "--json",
        ])
        .output()
        .expect("snat plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = std::env::temp_dir().join(format!("{}-{name}-plan6.json", topo.prefix));
    std::fs::write(&path, &out.stdout).expect("write the plan");
    path
}

/// A plan naming an IPv6 NAT IP next to an IPv4 one: `snat run --plan` puts both on this node's
/// slice (IPv6 and IPv4 connections leave from their NAT IP with a port inside it), status shows
/// the slice, and `snat set plan` moves both families to a new plan's slice (and its other IPv6
/// NAT IP) while the old connection keeps its port.
#[test]
fn a_plan_with_an_ipv6_nat_ip_puts_both_families_on_the_nodes_slice() {
    let topo = Topology::new_dual_stack(1);
    // The next plan's IPv6 NAT IP: another address of the uplink's network.
    let second6 = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
    topo.node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{second6}/64"),
        "dev",
        &topo.uplink,
        "nodad",
    ]);
    let first = mixed_plan(&topo, NAT_IP6, 2, "first");
    let next = mixed_plan(&topo, second6, 4, "next");
    let _files = Removed(vec![first.clone(), next.clone()]);
    let plan = first.to_str().unwrap();
    // The plan names the IPv6 NAT IP: an IPv6 --nat-ip next to it is refused before anything
    // is attached.
    let refused = topo.node.exec_unchecked(&[
        tests::agent::snat_bin().to_str().unwrap(),
        "run",
        "--iface",
        &topo.uplink,
        "--internal",
        POD_CIDR,
        "--internal",
        POD_CIDR6,
        "--nat-ip",
        "2001:db8:1::9",
        "--plan",
        plan,
        "--node-index",
        "1",
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("--nat-ip 2001:db8:1::9 cannot be used with --plan: the plan names the IPv6 NAT IPs"),
        "{err}"
    );
    let agent = agent(&topo, &["--plan", plan, "--node-index", "1"]);
    let _tcp6 = Server6::tcp(&topo.server, at(SERVER6, 8080));
    let _tcp4 = TcpServer::start(&topo.server, SocketAddrV4::new(SERVER, 8080));
    let slice = 41000..=41999;
    let (mut conn6, conn4) = topo.pods[0].ns.run(|| {
        let c6 =
            Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3)).expect("IPv6 connect");
        let c4 = TcpClient::connect(SocketAddrV4::new(SERVER, 8080), Duration::from_secs(3))
            .expect("IPv4 connect");
        (c6, c4)
    });
    assert_eq!(*conn6.seen_as.ip(), NAT_IP6);
    assert!(slice.contains(&conn6.seen_as.port()), "{}", conn6.seen_as);
    assert_eq!(*conn4.seen_as.ip(), NAT_IP);
    assert!(slice.contains(&conn4.seen_as.port()), "{}", conn4.seen_as);
    assert_eq!(conn6.echo(b"on the slice").expect("echo"), b"on the slice");

    let status = agent.json("status", &[]);
    assert_eq!(status["slice"], format!("node 1 of 2 ({plan})"), "{status}");
    assert_eq!(status["port_range"], "41000:41999", "{status}");
    assert_eq!(status["nat_ips"], json!([NAT_IP.to_string()]), "{status}");
    assert_eq!(status["nat_ips6"], json!([NAT_IP6.to_string()]), "{status}");

    // `snat set plan`: node 3 of a plan of four, 43000-43999 on both NAT IPs.
    let (ok, out, err) = agent.cli(&[
        "set",
        "--iface",
        &topo.uplink,
        "plan",
        next.to_str().unwrap(),
        "--node-index",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "NAT IPs {NAT_IP},{second6}, port range 43000:43999"
        )),
        "{out}"
    );
    let moved = topo.pods[0].ns.run(|| {
        Conn6::open(at(SERVER6, 8080), "echo", Duration::from_secs(3)).expect("IPv6 connect")
    });
    assert_eq!(*moved.seen_as.ip(), second6);
    assert!(
        (43000..=43999).contains(&moved.seen_as.port()),
        "{}",
        moved.seen_as
    );
    assert_eq!(
        conn6
            .echo(b"kept")
            .expect("the old connection keeps its port"),
        b"kept"
    );
    let status = agent.json("status", &[]);
    assert!(
        status["slice"]
            .as_str()
            .is_some_and(|s| s.starts_with("node 3 of 4")),
        "{status}"
    );
    assert_eq!(status["nat_ips6"], json!([second6.to_string()]), "{status}");
    drop((conn6, conn4, moved));
}

/// Files removed when dropped (also when the test fails).
struct Removed(Vec<PathBuf>);

impl Drop for Removed {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
