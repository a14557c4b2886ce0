//! The standard topology:
//!
//! ```text
//!  pod0 10.1.0.2 ─┐                                   router                    server
//!  pod1 10.1.1.2 ─┼─ node ── uplink 198.51.100.1 ── 198.51.100.2 ... 203.0.113.1 ── 203.0.113.10
//!  …             ─┘   (snat on the uplink)            (no route to 10.1.0.0/16)
//! ```
//!
//! Pod `i` has 10.1.i.2/24 with the node at 10.1.i.1. The router forwards between the node's
//! uplink network and the server's network and has no route to the pods, so only translated
//! traffic gets answers; the server is one hop behind the router (traceroute sees the router).
//!
//! [`Topology::dual_stack`] adds IPv6 to it, with the same shape:
//!
//! ```text
//!  pod0 fd00:10:0:0::2 ─┐                                   router                                     server
//!  pod1 fd00:10:0:1::2 ─┼─ node ── uplink 2001:db8:1::1 ── 2001:db8:1::2 ... 2001:db8:2::1 ── 2001:db8:2::10
//!  …                   ─┘                                   (no route to fd00:10::/48)
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use crate::netns::{unique_prefix, veth, Netns};

pub const POD_CIDR: &str = "10.1.0.0/16";
pub const NAT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// The pods' IPv6 space on the [dual-stack](Topology::dual_stack) topology: pod `i` has
/// [`pod_addr6`]`(i)` in `fd00:10:0:i::/64`.
pub const POD_CIDR6: &str = "fd00:10::/48";
/// The node uplink's global IPv6 address: the IPv6 NAT IP when the agent is given none.
pub const NAT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const ROUTER_UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const ROUTER_SERVER_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

/// Pod `i`'s IPv6 address on the dual-stack topology: `fd00:10:0:i::2`.
pub fn pod_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, i as u16, 0, 0, 0, 2)
}

/// The node's IPv6 address towards pod `i`, the pod's default IPv6 route: `fd00:10:0:i::1`.
pub fn pod_gateway6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, i as u16, 0, 0, 0, 1)
}

pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The pod's interface name.
    pub iface: String,
    /// The node's interface towards this pod.
    pub node_iface: String,
}

impl Pod {
    /// The pod's IPv6 address once [`Topology::dual_stack`] gave it one (pod `i` of the
    /// standard topology has 10.1.i.2 and `fd00:10:0:i::2`).
    pub fn addr6(&self) -> Ipv6Addr {
        pod_addr6(usize::from(self.addr.octets()[2]))
    }
}

pub struct Topology {
    pub prefix: String,
    /// Fields drop in declaration order: pods first, then node, router, server.
    pub pods: Vec<Pod>,
    pub node: Netns,
    /// The node's uplink, where snat attaches.
    pub uplink: String,
    pub router: Netns,
    /// The router's interface facing the node.
    pub router_uplink: String,
    pub server: Netns,
}

/// Links the router to the server (`<prefix>-rs` ↔ `<prefix>-sr`): the server at [`SERVER`],
/// routing through the router, which forwards.
pub fn connect_server(prefix: &str, router: &Netns, server: &Netns) {
    let (rs, sr) = (format!("{prefix}-rs"), format!("{prefix}-sr"));
    veth(router, &rs, server, &sr);
    router.ip(&[
        "addr",
        "add",
        &format!("{ROUTER_SERVER_SIDE}/24"),
        "dev",
        &rs,
    ]);
    router.sysctl("net.ipv4.ip_forward=1");
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &sr]);
    server.ip(&[
        "route",
        "add",
        "default",
        "via",
        &ROUTER_SERVER_SIDE.to_string(),
    ]);
}

impl Topology {
    pub fn new(pods: usize) -> Self {
        let prefix = unique_prefix();
        let node = Netns::new(&format!("{prefix}-node"));
        let router = Netns::new(&format!("{prefix}-router"));
        let server = Netns::new(&format!("{prefix}-server"));

        let uplink = format!("{prefix}-up");
        let router_uplink = format!("{prefix}-rn");
        veth(&node, &uplink, &router, &router_uplink);
        node.ip(&["addr", "add", &format!("{NAT_IP}/24"), "dev", &uplink]);
        node.ip(&["route", "add", "default", "via", &ROUTER_UPLINK.to_string()]);
        node.sysctl("net.ipv4.ip_forward=1");

        router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_UPLINK}/24"),
            "dev",
            &router_uplink,
        ]);
        connect_server(&prefix, &router, &server);

        let pods = (0..pods)
            .map(|i| {
                let ns = Netns::new(&format!("{prefix}-pod{i}"));
                let (iface, node_iface) = (format!("{prefix}-p{i}"), format!("{prefix}-n{i}"));
                veth(&ns, &iface, &node, &node_iface);
                let addr = Ipv4Addr::new(10, 1, i as u8, 2);
                ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", &iface]);
                ns.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")]);
                node.ip(&["addr", "add", &format!("10.1.{i}.1/24"), "dev", &node_iface]);
                Pod {
                    ns,
                    addr,
                    iface,
                    node_iface,
                }
            })
            .collect();

        Self {
            prefix,
            pods,
            node,
            uplink,
            router,
            router_uplink,
            server,
        }
    }

    /// Turns checksum offload, TSO/GSO and GRO on or off on every veth end of the path.
    pub fn set_offload(&self, on: bool) {
        let state = if on { "on" } else { "off" };
        let mut ends: Vec<(&Netns, String)> = vec![
            (&self.node, self.uplink.clone()),
            (&self.router, self.router_uplink.clone()),
            (&self.router, format!("{}-rs", self.prefix)),
            (&self.server, format!("{}-sr", self.prefix)),
        ];
        for p in &self.pods {
            ends.push((&p.ns, p.iface.clone()));
            ends.push((&self.node, p.node_iface.clone()));
        }
        for (ns, dev) in ends {
            ns.exec(&[
                "ethtool", "-K", &dev, "tx", state, "rx", state, "tso", state, "gso", state, "gro",
                state,
            ]);
        }
    }
}

impl Topology {
    /// The standard topology with IPv6 as well ([`Topology::dual_stack`]).
    pub fn new_dual_stack(pods: usize) -> Self {
        let topo = Self::new(pods);
        topo.dual_stack();
        topo
    }

    /// Adds IPv6 to the standard topology, alongside its IPv4: pod `i` gets
    /// `fd00:10:0:i::2/64` with its default IPv6 route via the node's `fd00:10:0:i::1/64`; the
    /// node's uplink [`NAT_IP6`]`/64`, forwarding IPv6, with its default route via the router's
    /// [`ROUTER_UPLINK6`]`/64`; the router [`ROUTER_SERVER_SIDE6`]`/64` towards the server at
    /// [`SERVER6`]`/64`, which routes through it. The router forwards and has no route to
    /// [`POD_CIDR6`], so only translated traffic gets answers. Addresses skip duplicate address
    /// detection (`nodad`), and this returns once no address of the topology is still tentative
    /// (the kernel solicits neighbours only from a link-local address that finished DAD).
    pub fn dual_stack(&self) {
        let mut namespaces = vec![&self.node, &self.router, &self.server];

        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NAT_IP6}/64"),
            "dev",
            &self.uplink,
            "nodad",
        ]);
        self.node.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTER_UPLINK6.to_string(),
            "dev",
            &self.uplink,
        ]);
        self.node.sysctl("net.ipv6.conf.all.forwarding=1");

        self.router.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ROUTER_UPLINK6}/64"),
            "dev",
            &self.router_uplink,
            "nodad",
        ]);
        self.router.sysctl("net.ipv6.conf.all.forwarding=1");
        connect_server6(&self.prefix, &self.router, &self.server);

        for pod in &self.pods {
            let i = usize::from(pod.addr.octets()[2]);
            pod.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", pod_addr6(i)),
                "dev",
                &pod.iface,
                "nodad",
            ]);
            pod.ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &pod_gateway6(i).to_string(),
                "dev",
                &pod.iface,
            ]);
            self.node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", pod_gateway6(i)),
                "dev",
                &pod.node_iface,
                "nodad",
            ]);
            namespaces.push(&pod.ns);
        }

        wait_for_dad(&namespaces);
    }
}

/// The IPv6 half of [`connect_server`] (the veth pair is there): [`ROUTER_SERVER_SIDE6`] on the
/// router's side, [`SERVER6`] on the server's with its default route through the router; returns
/// once neither has a tentative address.
pub fn connect_server6(prefix: &str, router: &Netns, server: &Netns) {
    let (rs, sr) = (format!("{prefix}-rs"), format!("{prefix}-sr"));
    router.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ROUTER_SERVER_SIDE6}/64"),
        "dev",
        &rs,
        "nodad",
    ]);
    server.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{SERVER6}/64"),
        "dev",
        &sr,
        "nodad",
    ]);
    server.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &ROUTER_SERVER_SIDE6.to_string(),
        "dev",
        &sr,
    ]);
    wait_for_dad(&[router, server]);
}

/// Waits (at most 10 s) until no IPv6 address in `namespaces` is tentative: the link-local
/// addresses veths get when they come up run duplicate address detection for about a second,
/// and the kernel solicits neighbours only from one that finished.
fn wait_for_dad(namespaces: &[&Netns]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for ns in namespaces {
        loop {
            let out = ns.ip(&["-6", "addr", "show", "tentative"]);
            if out.stdout.iter().all(u8::is_ascii_whitespace) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "IPv6 addresses in {} still tentative after 10 s:\n{}",
                ns.name,
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
