//! Cluster mode's namespace topology: nodes that share ONE NAT IP behind a gateway namespace
//! running `snat gateway`, etcd in namespaces of its own ([`crate::etcd`]), a router behind the
//! gateway and a server behind the router.
//!
//! ```text
//!  pod i 10.1.i.2 ── node i 10.77.i.2 ──┐
//!     (snat run on the uplink <p>-u<i>)  ├─ gateway ── 100.64.100.1/30 ── router ── 203.0.113.1 ── server
//!                         10.77.i.1/24 ─┘ (snat gateway         100.64.100.2   (MTU 1280 towards   203.0.113.10
//!                                          on <p>-g0)                           the server)
//! ```
//!
//! The router has no route to the pods or the nodes: replies go to the NAT IP 198.51.100.1 and
//! only the gateway's program returns them, to the node holding the port's block. The router's
//! side of the server link has an MTU of 1280 (the server's side 1500), so a pod's full-size
//! segments with DF set make the router send "fragmentation needed" to the NAT IP, and a pod's
//! upload completes only if that error comes back to the right node and is translated.
//!
//! [`PortLog`] watches a node's uplink (an `AF_PACKET` socket with kernel receive timestamps on
//! the host's one clock) and keeps, per NAT port, the intervals in which the node sent from it;
//! [`assert_no_overlap`] checks the cluster's rule on them: intervals of different nodes never
//! overlap and are separated by at least the cool-down.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    agent::{snat_bin, Agent},
    etcd::{Etcd, Link},
    netns::{unique_prefix, veth, BpfFs, Netns},
    traffic::{fingerprint, wait_for, TcpClient},
};

pub const NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's address towards the gateway (the source of its ICMP errors to the NAT IP).
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(100, 64, 100, 2);
/// The gateway's address towards the router.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 100, 1);
pub const RANGE: &str = "40000:40511";
pub const RANGE_LO: u16 = 40000;
pub const BLOCK: u16 = 64;
pub const BLOCKS: u16 = 8;
/// The MTU of the router's link towards the server.
pub const HOP_MTU: u32 = 1280;

/// The block index of a NAT port in [`RANGE`].
pub fn block_of(port: u16) -> Option<u16> {
    let b = port.checked_sub(RANGE_LO)? / BLOCK;
    (b < BLOCKS).then_some(b)
}

/// One node: its namespace, uplink, pod, link to etcd and BPF file system for pins.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub uplink: String,
    pub pod: Netns,
    pub pod_addr: Ipv4Addr,
    pub etcd_link: Link,
    pub bpffs: BpfFs,
}

impl Node {
    /// `CLOCK_BOOTTIME` valid-until of every block in the node's pinned block table (read while
    /// no agent runs, or while its agent is stopped): block index → (epoch, valid until).
    pub fn pinned_blocks(&self) -> BTreeMap<u16, (i64, u64)> {
        use aya::maps::{HashMap, Map, MapData};
        use snat_common::block::{BlockEntry, BlockKey};
        let pin = self
            .bpffs
            .path
            .join(&self.uplink)
            .join(snat_common::block::MAP_BLOCKS.to_ascii_lowercase());
        let map: HashMap<MapData, BlockKey, BlockEntry> =
            HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap_or_else(|e| {
                panic!("the pinned block table {}: {e}", pin.display())
            })))
            .expect("a hash map of blocks");
        map.iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.addr == NAT.octets())
            .map(|(k, v)| {
                let epoch = i64::from(v.epoch) | (i64::from(v.epoch_hi) << 32);
                (k.index, (epoch, v.valid_until_ns))
            })
            .collect()
    }
}

/// The whole topology. Fields drop in declaration order: the gateway process first, then the
/// nodes, the gateway's, router's and server's namespaces, and etcd last.
pub struct Cluster {
    pub prefix: String,
    pub gateway: Option<GatewayProc>,
    pub nodes: Vec<Node>,
    pub gw: Netns,
    /// The gateway's interface towards the router: where replies arrive and `snat gateway` runs.
    pub gw_iface: String,
    pub gw_link: Link,
    pub router: Netns,
    pub server: Netns,
    pub etcd: Etcd,
}

impl Cluster {
    /// `nodes` nodes (named `node-a`, `node-b`, …) and an etcd of `members` members.
    pub fn new(nodes: u8, members: usize) -> Self {
        let p = unique_prefix();
        let server = Netns::new(&format!("{p}-srv"));
        let router = Netns::new(&format!("{p}-rt"));
        let gw = Netns::new(&format!("{p}-gw"));
        let (rs, sr) = (format!("{p}-rs"), format!("{p}-sr"));
        veth(&router, &rs, &server, &sr);
        router.ip(&["link", "set", &rs, "mtu", &HOP_MTU.to_string()]);
        router.ip(&["addr", "add", "203.0.113.1/24", "dev", &rs]);
        server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &sr]);
        server.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        let (gw_iface, rg) = (format!("{p}-g0"), format!("{p}-rg"));
        veth(&gw, &gw_iface, &router, &rg);
        gw.ip(&["addr", "add", &format!("{GATEWAY}/30"), "dev", &gw_iface]);
        gw.ip(&["route", "add", "default", "via", &ROUTER.to_string()]);
        gw.sysctl("net.ipv4.ip_forward=1");
        router.ip(&["addr", "add", &format!("{ROUTER}/30"), "dev", &rg]);
        router.ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &GATEWAY.to_string(),
        ]);
        router.sysctl("net.ipv4.ip_forward=1");
        // Every traceroute probe and oversized segment gets its error.
        router.sysctl("net.ipv4.icmp_ratelimit=0");
        gw.sysctl("net.ipv4.icmp_ratelimit=0");
        let etcd = Etcd::start(members);
        let gw_link = etcd.connect(&gw);
        let nodes = (1..=nodes)
            .map(|i| {
                let name = format!("node-{}", char::from(b'a' + i - 1));
                let ns = Netns::new(&format!("{p}-n{i}"));
                let uplink = format!("{p}-u{i}");
                let gw_side = format!("{p}-g{i}");
                veth(&ns, &uplink, &gw, &gw_side);
                gw.ip(&["addr", "add", &format!("10.77.{i}.1/24"), "dev", &gw_side]);
                ns.ip(&["addr", "add", &format!("10.77.{i}.2/24"), "dev", &uplink]);
                ns.ip(&["route", "add", "default", "via", &format!("10.77.{i}.1")]);
                ns.sysctl("net.ipv4.ip_forward=1");
                ns.sysctl("net.ipv4.icmp_ratelimit=0");
                let pod = Netns::new(&format!("{p}-p{i}"));
                let (pi, ni) = (format!("{p}-pp{i}"), format!("{p}-pn{i}"));
                veth(&pod, &pi, &ns, &ni);
                let pod_addr = Ipv4Addr::new(10, 1, i, 2);
                pod.ip(&["addr", "add", &format!("{pod_addr}/24"), "dev", &pi]);
                pod.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")]);
                pod.sysctl("net.ipv4.ping_group_range=0 2147483647");
                ns.ip(&["addr", "add", &format!("10.1.{i}.1/24"), "dev", &ni]);
                let etcd_link = etcd.connect(&ns);
                let bpffs = BpfFs::new(&format!("{p}-n{i}"));
                Node {
                    name,
                    ns,
                    uplink,
                    pod,
                    pod_addr,
                    etcd_link,
                    bpffs,
                }
            })
            .collect();
        Self {
            prefix: p,
            gateway: None,
            nodes,
            gw,
            gw_iface,
            gw_link,
            router,
            server,
            etcd,
        }
    }

    /// `snat run` on node `i` (0-based) with the cluster's flags and `extra` ones (timers).
    pub fn start_agent(&self, i: usize, extra: &[&str]) -> Agent {
        self.start_agent_on(i, RANGE, 4096, extra)
    }

    /// [`Cluster::start_agent`] on another port range, with room for `max_mappings`.
    pub fn start_agent_on(
        &self,
        i: usize,
        range: &str,
        max_mappings: u32,
        extra: &[&str],
    ) -> Agent {
        let n = &self.nodes[i];
        let endpoints = self.etcd.endpoints().join(",");
        let nat = NAT.to_string();
        let max = max_mappings.to_string();
        let mut args = vec![
            "--internal",
            "10.1.0.0/16",
            "--max-mappings",
            &max,
            "--nat-ip",
            &nat,
            "--port-range",
            range,
            "--etcd-endpoints",
            &endpoints,
            "--node-name",
            &n.name,
            "--pin-dir",
            n.bpffs.arg(),
        ];
        args.extend_from_slice(extra);
        Agent::start(&n.ns, &n.uplink, &args)
    }

    /// Starts `snat gateway` on the gateway's uplink and waits until it has registered.
    pub fn start_gateway(&mut self, extra: &[&str]) {
        assert!(self.gateway.is_none(), "a gateway runs already");
        // Published from a list after this revision: the gateway routes what etcd has now.
        let since = self.etcd.revision();
        let log = std::env::temp_dir().join(format!("{}-gateway.log", self.prefix));
        let out = std::fs::File::create(&log).expect("the gateway's log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw.name])
            .arg(snat_bin())
            .args(["gateway", "--iface", &self.gw_iface, "--etcd-endpoints"])
            .arg(self.etcd.endpoints().join(","))
            .args(extra)
            .env("RUST_LOG", "snat_user=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawning snat gateway");
        self.gateway = Some(GatewayProc { child, log });
        wait_for(Duration::from_secs(15), || {
            self.gateway_applied().filter(|&a| a >= since).map(|_| ())
        })
        .unwrap_or_else(|| {
            let o = self
                .etcd
                .etcdctl(&["get", "--prefix", "/snat/v1/", "-w", "json"]);
            panic!(
                "the gateway did not publish revision {since} or later:\n{}\netcd: {}{}",
                self.gateway_log(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
    }

    /// Stops the gateway with `signal` and waits for it.
    pub fn stop_gateway(&mut self, signal: i32) {
        let mut g = self.gateway.take().expect("a gateway runs");
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs snat in place).
        unsafe { libc::kill(g.child.id() as i32, signal) };
        let _ = g.child.wait();
        let _ = std::fs::remove_file(&g.log);
    }

    pub fn gateway_log(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| std::fs::read_to_string(&g.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The revision the gateway published in etcd, if it is registered.
    pub fn gateway_applied(&self) -> Option<i64> {
        let o = self.etcd.etcdctl(&[
            "get",
            "--prefix",
            "/snat/v1/gateways/",
            "--print-value-only",
        ]);
        let text = String::from_utf8_lossy(&o.stdout);
        let v: Value = serde_json::from_str(text.lines().next()?).ok()?;
        v["applied_revision"].as_i64()
    }

    /// The block keys in etcd: index → (node, create revision = the claim's epoch).
    pub fn block_epochs(&self) -> BTreeMap<u16, (String, i64)> {
        let out = self
            .etcd
            .etcdctl(&["get", "--prefix", "/snat/v1/blocks/", "-w", "json"]);
        assert!(out.status.success(), "etcdctl: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("etcdctl's JSON");
        let Some(kvs) = v["kvs"].as_array() else {
            return BTreeMap::new();
        };
        kvs.iter()
            .filter_map(|kv| {
                let key = String::from_utf8(b64(kv["key"].as_str()?)).ok()?;
                let index = key.rsplit('/').next()?.parse().ok()?;
                let value: Value = serde_json::from_slice(&b64(kv["value"].as_str()?)).ok()?;
                Some((
                    index,
                    (
                        value["node"].as_str()?.to_owned(),
                        kv["create_revision"].as_i64()?,
                    ),
                ))
            })
            .collect()
    }

    /// Whether node `name` is registered in etcd (its lease lives).
    pub fn registered(&self, name: &str) -> bool {
        let key = format!("/snat/v1/nodes/{name}");
        let o = self.etcd.etcdctl(&["get", &key, "--keys-only"]);
        assert!(o.status.success(), "etcdctl: {o:?}");
        !String::from_utf8_lossy(&o.stdout).trim().is_empty()
    }

    /// Cuts node `i` off from etcd, or connects it again.
    pub fn set_etcd_link(&self, i: usize, up: bool) {
        self.etcd.set_link_up(&self.nodes[i].etcd_link, up);
    }
}

/// Standard base64 (as etcdctl's JSON writes keys and values).
fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A `snat gateway` process and its log, stopped on drop (its log printed if the test failed).
pub struct GatewayProc {
    child: Child,
    log: PathBuf,
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "snat gateway's log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The cluster part of an agent's `snat status --json`.
pub fn cluster_status(agent: &Agent) -> Value {
    agent.json("status", &[])["cluster"].clone()
}

/// Held blocks as the agent's status lists them: index → state.
pub fn held(agent: &Agent) -> BTreeMap<u16, String> {
    cluster_status(agent)["blocks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some((
                        u16::try_from(b["index"].as_u64()?).ok()?,
                        b["state"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Opens `n` connections from `pod` in rounds of 15, 400 ms apart: within the node's headroom
/// (half a block free), so no SYN waits for a block (a faster burst is held back until the next
/// block opens, its SYNs retransmitted a second later; see docs/cluster.md "Pressure"). The
/// first failure ends it: which flow, and why.
pub fn try_hold(
    pod: &Netns,
    n: usize,
    to: SocketAddrV4,
) -> Result<Vec<TcpClient>, (Vec<TcpClient>, io::Error)> {
    let mut held = Vec::new();
    while held.len() < n {
        let k = (n - held.len()).min(15);
        let got: Vec<io::Result<TcpClient>> = pod.run(move || {
            (0..k)
                .map(|_| TcpClient::connect(to, Duration::from_secs(3)))
                .collect()
        });
        for c in got {
            match c {
                Ok(c) => held.push(c),
                Err(e) => return Err((held, e)),
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    Ok(held)
}

/// [`try_hold`]: every one must succeed.
pub fn hold(pod: &Netns, n: usize, to: SocketAddrV4, agent: &Agent) -> Vec<TcpClient> {
    try_hold(pod, n, to).unwrap_or_else(|(held, e)| {
        panic!(
            "flow {} of {n}: {e}\nstatus: {}\nstats: {}",
            held.len(),
            cluster_status(agent),
            agent.stats()
        )
    })
}

/// Echoes a message over every connection (from the test's thread: the sockets exist already)
/// and checks it comes back whole.
pub fn echo_all(conns: &mut [TcpClient], what: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("{what} #{i}");
        let back = c
            .echo(msg.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: flow {i} ({}): {e}", c.seen_as));
        assert_eq!(back, msg.as_bytes(), "{what}: flow {i}");
    }
}

/// `CLOCK_BOOTTIME` and `CLOCK_REALTIME` now, in nanoseconds.
fn clocks() -> (u64, u64) {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) into our timespec.
        let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
        assert_eq!(rc, 0);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    (read(libc::CLOCK_BOOTTIME), read(libc::CLOCK_REALTIME))
}

/// `CLOCK_BOOTTIME` in nanoseconds (the clock of the agent's fence).
pub fn boottime_ns() -> u64 {
    clocks().0
}

/// What a [`PortLog`] keeps.
#[derive(Default)]
struct PortLogData {
    /// Per NAT port: intervals (first, last packet, `CLOCK_BOOTTIME` ns) in which the node sent
    /// from it; packets less than [`PortLog::MERGE`] apart share an interval.
    sent: BTreeMap<u16, Vec<(u64, u64)>>,
    /// Packets that left with a pod address as their source.
    leaks: Vec<Ipv4Addr>,
    packets: u64,
}

/// The NAT ports a node sends from, with times, from its uplink (see the module doc).
pub struct PortLog {
    pub node: String,
    data: Arc<Mutex<PortLogData>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// `CLOCK_REALTIME − CLOCK_BOOTTIME` when it started (kernel timestamps are real time).
    offset: u64,
}

impl PortLog {
    /// Packets of one port closer than this belong to one interval of use.
    const MERGE: u64 = 500_000_000;

    pub fn start(node: &Node) -> Self {
        let data: Arc<Mutex<PortLogData>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (boot, real) = clocks();
        let offset = real - boot;
        let iface = std::ffi::CString::new(node.uplink.as_str()).expect("iface name");
        let (d, s) = (data.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = node.ns.spawn(move || {
            let fd = timestamped_packet_socket(&iface);
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 128];
            while !s.load(Ordering::Relaxed) {
                let Some((n, outgoing, real_ns)) = recv_stamped(&fd, &mut buf) else {
                    continue;
                };
                if !outgoing || n < 28 {
                    continue;
                }
                let at = real_ns.saturating_sub(offset);
                let ip = &buf[..n.min(buf.len())];
                let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
                let mut g = d.lock().unwrap();
                g.packets += 1;
                if src.octets()[..2] == [10, 1] {
                    if g.leaks.len() < 10 {
                        g.leaks.push(src);
                    }
                    continue;
                }
                if src != NAT {
                    continue;
                }
                let Some(port) = nat_port(ip) else { continue };
                let runs = g.sent.entry(port).or_default();
                match runs.last_mut() {
                    Some(last) if at <= last.1 + Self::MERGE => last.1 = last.1.max(at),
                    _ => runs.push((at, at)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the port log did not start");
        Self {
            node: node.name.clone(),
            data,
            stop,
            thread: Some(thread),
            offset,
        }
    }

    /// How far the two clocks moved apart since the start (NTP steps or slews real time):
    /// timestamps are that uncertain, plus a millisecond.
    pub fn uncertainty(&self) -> u64 {
        let (boot, real) = clocks();
        (real - boot).abs_diff(self.offset) + 1_000_000
    }

    /// Per port, the intervals the node sent from it so far (after a moment for packets in
    /// flight).
    pub fn sent(&self) -> BTreeMap<u16, Vec<(u64, u64)>> {
        std::thread::sleep(Duration::from_millis(100));
        self.data.lock().unwrap().sent.clone()
    }

    /// The last time the node sent from a port of `blocks`, if it did.
    pub fn last_sent_in(&self, blocks: &[u16]) -> Option<u64> {
        self.sent()
            .iter()
            .filter(|(p, _)| block_of(**p).is_some_and(|b| blocks.contains(&b)))
            .filter_map(|(_, runs)| runs.last().map(|r| r.1))
            .max()
    }

    /// The first time the node sent from a port of `blocks` at or after `since`, if it did.
    pub fn first_sent_in(&self, blocks: &[u16], since: u64) -> Option<u64> {
        self.sent()
            .iter()
            .filter(|(p, _)| block_of(**p).is_some_and(|b| blocks.contains(&b)))
            .flat_map(|(_, runs)| runs.iter().filter(|r| r.1 >= since).map(|r| r.0.max(since)))
            .min()
    }

    /// Asserts packets were seen and none left with a pod's address.
    pub fn assert_no_leak(&self) {
        let g = self.data.lock().unwrap();
        assert!(g.packets > 0, "{}: the port log saw no packet", self.node);
        assert!(
            g.leaks.is_empty(),
            "{}: packets left with a pod's address, e.g. {:?}",
            self.node,
            g.leaks
        );
    }
}

impl Drop for PortLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The NAT port a packet the node sent uses: the source port of TCP and UDP, the identifier of
/// an echo request or reply (none for ICMP errors and later fragments).
fn nat_port(ip: &[u8]) -> Option<u16> {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    if later_fragment || ip.len() < ihl + 8 {
        return None;
    }
    let l4 = &ip[ihl..];
    match ip[9] {
        6 | 17 => Some(u16::from_be_bytes([l4[0], l4[1]])),
        1 if matches!(l4[0], 0 | 8) => Some(u16::from_be_bytes([l4[4], l4[5]])),
        _ => None,
    }
}

/// An `AF_PACKET` socket on `iface` (in the calling thread's namespace) for every protocol
/// (only `ETH_P_ALL` sockets see what the host sends), with kernel receive timestamps
/// (`SO_TIMESTAMPNS`) and a 20 ms receive timeout.
fn timestamped_packet_socket(iface: &std::ffi::CStr) -> OwnedFd {
    let fd = crate::traffic::packet_socket(iface, libc::ETH_P_ALL);
    crate::traffic::set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    crate::traffic::set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    fd
}

/// Receives one packet: its length, whether it is IPv4 the host sent (`PACKET_OUTGOING`), and
/// its kernel timestamp in real-time nanoseconds (the receive time if the kernel gave none).
fn recv_stamped(fd: &OwnedFd, buf: &mut [u8]) -> Option<(usize, bool, u64)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid sockaddr_ll and msghdr; we point the header at our buffers.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: recvmsg(2) into the buffers `msg` describes.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
    let n = usize::try_from(n).ok()?;
    let now = clocks().1;
    let mut stamp = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, as `msg` describes.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a control message header inside `control`.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            // SAFETY: an SCM_TIMESTAMPNS message holds a timespec, read unaligned.
            let ts =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>()) };
            stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        }
        // SAFETY: the next header after `cmsg` within `msg`'s control buffer, or null.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    // A stamp later than now or more than a second old is not the packet's: take now.
    let at = stamp
        .filter(|&s| s <= now && now - s < 1_000_000_000)
        .unwrap_or(now);
    let ipv4_out = from.sll_pkttype == libc::PACKET_OUTGOING
        && from.sll_protocol == (libc::ETH_P_IP as u16).to_be();
    Some((n, ipv4_out, at))
}

/// The cluster's rule, checked on what the nodes sent: per NAT port, intervals of use of
/// different nodes never overlap and are separated by at least `cooldown` (less the logs'
/// timestamp uncertainty). Returns how many ports more than one node used, so a test can show
/// the check saw a hand-over.
pub fn assert_no_overlap(logs: &[&PortLog], cooldown: Duration) -> usize {
    let slack = logs.iter().map(|l| l.uncertainty()).max().unwrap_or(0);
    let need = u64::try_from(cooldown.as_nanos())
        .unwrap()
        .saturating_sub(slack);
    let mut per_port: BTreeMap<u16, Vec<(u64, u64, &str)>> = BTreeMap::new();
    for log in logs {
        for (port, runs) in log.sent() {
            for (a, b) in runs {
                per_port.entry(port).or_default().push((a, b, &log.node));
            }
        }
    }
    let mut handed_over = 0;
    for (port, mut runs) in per_port {
        runs.sort_unstable();
        let mut shared = false;
        for (i, x) in runs.iter().enumerate() {
            for y in &runs[i + 1..] {
                if x.2 == y.2 {
                    continue;
                }
                shared = true;
                // y starts no earlier than x (sorted); it must start a cool-down after x ends.
                assert!(
                    y.0 >= x.1 + need,
                    "NAT port {port}: {} sent until {:.3} s and {} from {:.3} s, less than the \
                     cool-down of {cooldown:?} apart (boot-time seconds; every use: {runs:?})",
                    x.2,
                    x.1 as f64 / 1e9,
                    y.2,
                    y.0 as f64 / 1e9
                );
            }
        }
        handed_over += usize::from(shared);
    }
    handed_over
}

/// A TCP sink on `addr` in `ns` for `conns` connections: each sends its upload and closes its
/// side; the sink answers `<bytes> <fingerprint>\n` and closes. Joined for what it received.
pub fn sink(ns: &Netns, addr: SocketAddrV4, conns: usize) -> JoinHandle<Vec<(usize, u64)>> {
    let listener = ns.run(move || TcpListener::bind(addr).expect("bind the sink"));
    ns.spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.len() < conns && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).expect("blocking");
                    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                    let mut data = Vec::new();
                    if c.read_to_end(&mut data).is_ok() {
                        let fp = fingerprint(&data);
                        let _ = c.write_all(format!("{} {fp}\n", data.len()).as_bytes());
                        got.push((data.len(), fp));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        got
    })
}
