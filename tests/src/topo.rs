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

use std::net::Ipv4Addr;

use crate::netns::{unique_prefix, veth, Netns};

pub const POD_CIDR: &str = "10.1.0.0/16";
pub const NAT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The pod's interface name.
    pub iface: String,
    /// The node's interface towards this pod.
    pub node_iface: String,
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
