//! The gateway's datapath (`snat gateway`, issue 14 "Return path"): [`Gateway`] loads the eBPF
//! object for the `snat_gateway` program only, attaches it to TC ingress of the interface the NAT
//! IPs' traffic arrives on (TCX, else a clsact qdisc; detached on drop), and keeps its maps:
//! the NAT IPs with the cluster's geometry, and the block → node routes that
//! [`crate::cluster::gateway::Routes`] computes.
//!
//! Invariants:
//! - The agent's maps are in the same object; they are created with one entry each (sizes read
//!   from the object, so maps added later shrink too), so a gateway reserves kilobytes, not the
//!   agent's ~300 MiB of tables. Only the gateway's program is loaded into the kernel.
//! - A route names the node and where its frames go: the egress interface the gateway's own
//!   routing table gives for the node's address ([`resolve`]), and the neighbour to address them
//!   to, the node itself. A node must be on a link of the gateway: a router between them would
//!   route the unchanged reply by its destination, the NAT IP, not to the node, so such a node
//!   is refused. Routing is resolved when a route is set; [`Gateway::refresh`] re-resolves.
//! - Routes are by block index: a change of port range or block size clears them all (the
//!   caller re-applies a full read of the store).

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    io,
    net::Ipv4Addr,
    process::Command,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        tc::{self, SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
    },
    Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use snat_common::{
    gateway::{
        GwBlockKey, GwCounter, GwGeometry, GwRoute, DEFAULT_GW_ROUTES, MAP_GW_COUNTERS,
        MAP_GW_FRAGS, MAP_GW_NAT_IPS, MAP_GW_NODE_PACKETS, MAP_GW_ROUTES, MAX_GW_FRAGMENTED,
        MAX_GW_NAT_IPS, MAX_GW_NODES, PROG_GATEWAY,
    },
    Ipv4Octets,
};

use super::{
    error::{no_map, no_program, Doing as _},
    AttachMode, DatapathError, EBPF_OBJECT,
};
use crate::{
    cluster::{
        gateway::RouteOp,
        geometry::{BlockId, Geometry},
    },
    settings::AttachChoice,
};

/// Where a node's replies leave the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The egress interface.
    pub ifindex: u32,
    /// The neighbour the frames are addressed to: the node itself, as [`resolve`] gives it (the
    /// program takes any neighbour on the link, for a caller with routing of its own).
    pub via: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("reading the eBPF object's map definitions")]
    Object(#[source] aya_obj::ParseError),
    #[error("no route to node {node} from the gateway: {reason} (check `ip route get {node}` on the gateway)")]
    Unroutable { node: Ipv4Addr, reason: String },
    #[error("more than {MAX_GW_NODES} nodes hold blocks at once")]
    TooManyNodes,
    #[error("block {0} is not in the gateway's geometry (set the geometry first)")]
    NotInGeometry(BlockId),
    #[error("the geometry has {blocks} blocks (NAT IPs × blocks per IP), more than the gateway's {capacity} routes: load it with a capacity of at least {blocks}")]
    TooManyBlocks { blocks: u64, capacity: u32 },
}

impl From<aya::maps::MapError> for GatewayError {
    fn from(e: aya::maps::MapError) -> Self {
        Self::Datapath(e.into())
    }
}

impl From<aya::programs::ProgramError> for GatewayError {
    fn from(e: aya::programs::ProgramError) -> Self {
        Self::Datapath(e.into())
    }
}

/// Map types whose memory grows with their size; the agent's maps of these types are created
/// with one entry in a gateway. (Others, like a ring buffer, have size rules of their own and are
/// left as the object declares them.)
const SHRINKABLE: [u32; 8] = [
    1,  // BPF_MAP_TYPE_HASH
    2,  // BPF_MAP_TYPE_ARRAY
    3,  // BPF_MAP_TYPE_PROG_ARRAY
    5,  // BPF_MAP_TYPE_PERCPU_HASH
    6,  // BPF_MAP_TYPE_PERCPU_ARRAY
    9,  // BPF_MAP_TYPE_LRU_HASH
    10, // BPF_MAP_TYPE_LRU_PERCPU_HASH
    11, // BPF_MAP_TYPE_LPM_TRIE
];

/// The agent's maps in the object (every map but the gateway's own and the global data
/// sections), shrunk to one entry.
fn agent_maps_shrunk() -> Result<Vec<String>, GatewayError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(GatewayError::Object)?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, m)| {
            !name.starts_with("SNAT_GW_")
                && !name.starts_with('.')
                && SHRINKABLE.contains(&m.map_type())
                && m.max_entries() > 1
        })
        .map(|(name, _)| name.clone())
        .collect())
}

/// A node's counter slot and how many blocks route to it.
#[derive(Clone, Copy, Debug)]
struct Slot {
    index: u32,
    blocks: u32,
}

pub struct Gateway {
    ebpf: Ebpf,
    iface: Option<String>,
    mode: Option<AttachMode>,
    link: Option<SchedClassifierLinkId>,
    nat_ips: HashMap<MapData, Ipv4Octets, GwGeometry>,
    routes: HashMap<MapData, GwBlockKey, GwRoute>,
    counters: PerCpuArray<MapData, u64>,
    node_packets: PerCpuArray<MapData, u64>,
    geometry: Option<Geometry>,
    /// Size of `routes`.
    capacity: u32,
    /// What `routes` holds, by block.
    table: BTreeMap<BlockId, GwRoute>,
    slots: BTreeMap<Ipv4Addr, Slot>,
    free_slots: Vec<u32>,
}

impl Gateway {
    /// Loads the gateway program with room for [`DEFAULT_GW_ROUTES`] block routes and the
    /// agent's maps at their minimum. Nothing is attached.
    pub fn load() -> Result<Self, GatewayError> {
        Self::with_capacity(DEFAULT_GW_ROUTES)
    }

    /// [`Gateway::load`] with room for `routes` block routes (NAT IPs × blocks per IP).
    pub fn with_capacity(routes: u32) -> Result<Self, GatewayError> {
        let capacity = routes.max(1);
        let shrunk = agent_maps_shrunk()?;
        let mut loader = EbpfLoader::new();
        for name in &shrunk {
            loader.map_max_entries(name, 1);
        }
        loader
            .map_max_entries(MAP_GW_NAT_IPS, MAX_GW_NAT_IPS)
            .map_max_entries(MAP_GW_ROUTES, capacity)
            .map_max_entries(MAP_GW_FRAGS, MAX_GW_FRAGMENTED)
            .map_max_entries(MAP_GW_NODE_PACKETS, MAX_GW_NODES);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .doing(|| "loading the eBPF object (are you root?)".into())?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_GATEWAY)
            .ok_or_else(|| no_program(PROG_GATEWAY))?
            .try_into()?;
        prog.load()
            .doing(|| format!("loading program {PROG_GATEWAY} into the kernel"))?;
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| no_map(name));
        let nat_ips = HashMap::try_from(take(MAP_GW_NAT_IPS)?)?;
        let routes = HashMap::try_from(take(MAP_GW_ROUTES)?)?;
        let counters = PerCpuArray::try_from(take(MAP_GW_COUNTERS)?)?;
        let node_packets = PerCpuArray::try_from(take(MAP_GW_NODE_PACKETS)?)?;
        debug!("gateway loaded; {} agent maps shrunk", shrunk.len());
        Ok(Self {
            ebpf,
            iface: None,
            mode: None,
            link: None,
            nat_ips,
            routes,
            counters,
            node_packets,
            geometry: None,
            capacity,
            table: BTreeMap::new(),
            slots: BTreeMap::new(),
            free_slots: (0..MAX_GW_NODES).rev().collect(),
        })
    }

    /// Attaches `snat_gateway` to TC ingress of `iface`: a TCX link, or a cls_bpf filter on a
    /// clsact qdisc (added if missing, removed again on detach); `auto` tries TCX first.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: AttachChoice,
    ) -> Result<AttachMode, GatewayError> {
        self.detach();
        self.iface = Some(iface.to_owned());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_GATEWAY)
            .ok_or_else(|| no_program(PROG_GATEWAY))?
            .try_into()?;
        if choice != AttachChoice::Clsact {
            match prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => {
                    self.link = Some(id);
                    self.mode = Some(AttachMode::Tcx);
                    info!("{PROG_GATEWAY} attached to {iface} ingress (TCX)");
                    return Ok(AttachMode::Tcx);
                }
                Err(e) if choice == AttachChoice::Auto => {
                    warn!("TCX attach failed ({e}); falling back to a clsact qdisc");
                }
                Err(e) => {
                    return Err(DatapathError::NoTcx(Box::new(e.into())).into());
                }
            }
        }
        let added_qdisc = match tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e).doing(|| format!("adding a clsact qdisc to {iface}"))?,
        };
        let mode = AttachMode::Clsact { added_qdisc };
        // Recorded first, so a failure below still removes the qdisc we added.
        self.mode = Some(mode);
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(tc::NlOptions::default()),
            )
            .doing(|| format!("attaching {PROG_GATEWAY} to {iface} ingress"))?;
        self.link = Some(id);
        info!("{PROG_GATEWAY} attached to {iface} ingress (clsact)");
        Ok(mode)
    }

    /// Detaches the program and removes the clsact qdisc if this gateway added it.
    pub fn detach(&mut self) {
        let Some(iface) = self.iface.clone() else {
            return;
        };
        if let Some(id) = self.link.take() {
            let prog: Option<&mut SchedClassifier> = self
                .ebpf
                .program_mut(PROG_GATEWAY)
                .and_then(|p| p.try_into().ok());
            if let Some(prog) = prog {
                if let Err(e) = prog.detach(id) {
                    warn!("detaching {PROG_GATEWAY} from {iface}: {e}");
                }
            }
        }
        if let Some(AttachMode::Clsact { added_qdisc: true }) = self.mode.take() {
            match Command::new("tc")
                .args(["qdisc", "del", "dev", &iface, "clsact"])
                .status()
            {
                Ok(s) if s.success() => debug!("removed the clsact qdisc from {iface}"),
                other => warn!("could not remove the clsact qdisc added to {iface}: {other:?}"),
            }
        }
        self.iface = None;
    }

    /// Sets the NAT IPs the gateway forwards for, with the cluster's range and block size. A NAT
    /// IP left out is passed untouched from then on; a new range or block size clears every route.
    pub fn set_geometry(&mut self, geometry: &Geometry) -> Result<(), GatewayError> {
        let blocks = geometry.nat_ips.len() as u64 * u64::from(geometry.blocks_per_ip());
        if blocks > u64::from(self.capacity) {
            return Err(GatewayError::TooManyBlocks {
                blocks,
                capacity: self.capacity,
            });
        }
        let moved = self.geometry.as_ref().is_some_and(|g| {
            g.port_range != geometry.port_range || g.block_size != geometry.block_size
        });
        if moved {
            self.clear_routes()?;
        }
        let value = GwGeometry::new(
            geometry.port_range.lo,
            geometry.block_size,
            geometry.blocks_per_ip(),
        );
        for ip in &geometry.nat_ips {
            self.nat_ips.insert(ip.octets(), value, 0)?;
        }
        let stale: Vec<Ipv4Octets> = self
            .nat_ips
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !geometry.nat_ips.contains(&Ipv4Addr::from(*k)))
            .collect();
        for k in stale {
            self.nat_ips.remove(&k)?;
            let gone: Vec<BlockId> = self
                .table
                .keys()
                .filter(|b| b.nat_ip.octets() == k)
                .copied()
                .collect();
            for block in gone {
                self.clear(block)?;
            }
        }
        self.geometry = Some(geometry.clone());
        Ok(())
    }

    /// Applies route changes, resolving each node's next hop with the gateway's routing table
    /// ([`resolve`], once per node per call).
    pub fn apply(&mut self, ops: &[RouteOp]) -> Result<(), GatewayError> {
        self.apply_with(ops, resolve)
    }

    /// [`Gateway::apply`] with another resolver (tests, or a caller with its own routing).
    pub fn apply_with(
        &mut self,
        ops: &[RouteOp],
        mut resolve: impl FnMut(Ipv4Addr) -> Result<NextHop, GatewayError>,
    ) -> Result<(), GatewayError> {
        let mut resolved: StdHashMap<Ipv4Addr, NextHop> = StdHashMap::new();
        for op in ops {
            match op {
                RouteOp::Set { block, to } => {
                    let hop = match resolved.get(to) {
                        Some(h) => h.clone(),
                        None => {
                            let h = resolve(*to)?;
                            resolved.insert(*to, h.clone());
                            h
                        }
                    };
                    self.set(*block, *to, &hop)?;
                }
                RouteOp::Clear { block } => self.clear(*block)?,
            }
        }
        Ok(())
    }

    /// Routes `block`'s replies to `node` through `hop`.
    pub fn set(
        &mut self,
        block: BlockId,
        node: Ipv4Addr,
        hop: &NextHop,
    ) -> Result<(), GatewayError> {
        if !self.geometry.as_ref().is_some_and(|g| g.holds(block)) {
            return Err(GatewayError::NotInGeometry(block));
        }
        let previous = self.table.get(&block).map(|r| Ipv4Addr::from(r.node));
        let slot = match self.slots.get_mut(&node) {
            Some(s) => {
                if previous != Some(node) {
                    s.blocks += 1;
                }
                s.index
            }
            None => {
                let index = self.free_slots.pop().ok_or(GatewayError::TooManyNodes)?;
                // A reused slot starts from zero.
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::from(e))?;
                let zeros =
                    PerCpuValues::try_from(vec![0u64; cpus]).map_err(DatapathError::from)?;
                self.node_packets.set(index, zeros, 0)?;
                self.slots.insert(node, Slot { index, blocks: 1 });
                index
            }
        };
        let route = GwRoute {
            node: node.octets(),
            next_hop: hop.via.octets(),
            ifindex: hop.ifindex,
            slot,
        };
        self.routes.insert(
            GwBlockKey::new(block.nat_ip.octets(), block.index),
            route,
            0,
        )?;
        self.table.insert(block, route);
        if let Some(old) = previous.filter(|o| *o != node) {
            self.release_slot(old);
        }
        Ok(())
    }

    /// Stops forwarding `block`'s replies (they are dropped and counted as `drop_no_route`).
    pub fn clear(&mut self, block: BlockId) -> Result<(), GatewayError> {
        let Some(route) = self.table.remove(&block) else {
            return Ok(());
        };
        match self
            .routes
            .remove(&GwBlockKey::new(block.nat_ip.octets(), block.index))
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.release_slot(Ipv4Addr::from(route.node));
        Ok(())
    }

    fn clear_routes(&mut self) -> Result<(), GatewayError> {
        let blocks: Vec<BlockId> = self.table.keys().copied().collect();
        for b in blocks {
            self.clear(b)?;
        }
        Ok(())
    }

    fn release_slot(&mut self, node: Ipv4Addr) {
        if let Some(s) = self.slots.get_mut(&node) {
            s.blocks = s.blocks.saturating_sub(1);
            if s.blocks == 0 {
                self.free_slots.push(s.index);
                self.slots.remove(&node);
            }
        }
    }

    /// Resolves every node's next hop again (after a change of the gateway's own routing) and
    /// rewrites the routes whose path changed.
    pub fn refresh(&mut self) -> Result<(), GatewayError> {
        let nodes: Vec<Ipv4Addr> = self.slots.keys().copied().collect();
        for node in nodes {
            let hop = resolve(node)?;
            let blocks: Vec<BlockId> = self
                .table
                .iter()
                .filter(|(_, r)| Ipv4Addr::from(r.node) == node)
                .filter(|(_, r)| r.ifindex != hop.ifindex || r.next_hop != hop.via.octets())
                .map(|(b, _)| *b)
                .collect();
            for b in blocks {
                self.set(b, node, &hop)?;
            }
        }
        Ok(())
    }

    /// The routes in place, by block: node, egress interface, next hop.
    pub fn routes(&self) -> impl Iterator<Item = (BlockId, Ipv4Addr, NextHop)> + '_ {
        self.table.iter().map(|(b, r)| {
            (
                *b,
                Ipv4Addr::from(r.node),
                NextHop {
                    ifindex: r.ifindex,
                    via: Ipv4Addr::from(r.next_hop),
                },
            )
        })
    }

    /// Every counter, summed over the CPUs, in [`GwCounter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(GwCounter, u64)>, GatewayError> {
        GwCounter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self.counters.get(&c.index(), 0)?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// One counter, summed over the CPUs.
    pub fn count(&self, c: GwCounter) -> Result<u64, GatewayError> {
        Ok(self.counters.get(&c.index(), 0)?.iter().sum())
    }

    /// Packets forwarded to each node that holds a block now, since it got its first.
    pub fn node_packets(&self) -> Result<BTreeMap<Ipv4Addr, u64>, GatewayError> {
        self.slots
            .iter()
            .map(|(node, s)| Ok((*node, self.node_packets.get(&s.index, 0)?.iter().sum())))
            .collect()
    }

    /// Runs `snat_gateway` once on `packet` with `BPF_PROG_TEST_RUN` (attached or not) and
    /// returns its TC action and the packet as it left.
    pub fn test_run(&self, packet: &[u8]) -> Result<(i32, Vec<u8>), GatewayError> {
        let (ret, out, _) = self.test_run_repeat(packet, 1)?;
        Ok((ret, out))
    }

    /// Runs `snat_gateway` `repeat` times on `packet`; also returns the kernel's mean time per
    /// run in ns (the per-packet cost, without the redirect itself, which test runs skip).
    pub fn test_run_repeat(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, Vec<u8>, u32), GatewayError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROG_GATEWAY)
            .ok_or_else(|| no_program(PROG_GATEWAY))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .doing(|| format!("BPF_PROG_TEST_RUN of {PROG_GATEWAY}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((
            result.return_value as i32,
            out,
            result.duration.as_nanos() as u32,
        ))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The gateway's path to `node`, from its own routing table (`ip -j -4 route get NODE`): the
/// kernel's answer with policy rules and all, in iproute2's stable JSON, which the agent's
/// environment has anyway (it runs `tc`). A node that is local, unreachable, not on a link of
/// the gateway or on a link without an index is refused, naming the node.
pub fn resolve(node: Ipv4Addr) -> Result<NextHop, GatewayError> {
    let fail = |reason: String| GatewayError::Unroutable { node, reason };
    let out = Command::new("ip")
        .args(["-j", "-4", "route", "get", &node.to_string()])
        .output()
        .map_err(|e| fail(format!("running `ip route get`: {e}")))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    let dev = parse_route_get(&out.stdout).map_err(fail)?;
    let index = ifindex(&dev).map_err(|e| fail(format!("interface {dev}: {e}")))?;
    Ok(NextHop {
        ifindex: index,
        via: node,
    })
}

/// The device of `ip -j route get`'s answer; refuses local and non-unicast routes, and routes
/// through a router.
fn parse_route_get(json: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| format!("unreadable `ip route get` output: {e}"))?;
    let r = v
        .as_array()
        .and_then(|a| a.first())
        .ok_or("`ip route get` gave no route")?;
    let kind = r.get("type").and_then(|t| t.as_str()).unwrap_or("unicast");
    if kind != "unicast" {
        return Err(format!("its route is of type {kind}, not unicast"));
    }
    let dev = r
        .get("dev")
        .and_then(|d| d.as_str())
        .ok_or("the route names no device")?;
    if dev == "lo" {
        return Err("it is one of the gateway's own addresses".into());
    }
    if let Some(router) = r.get("gateway").and_then(|g| g.as_str()) {
        return Err(format!(
            "it is not on a link of the gateway (its route goes via {router}), and a reply forwarded unchanged to {router} would be routed by its destination, the NAT IP, not to the node; give the node an address on a link of the gateway (--node-address)"
        ));
    }
    Ok(dev.to_owned())
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ports::PortRange;

    #[test]
    fn route_get_answers_are_read_or_refused_by_name() {
        let direct = br#"[{"dst":"10.9.0.2","dev":"gw0","prefsrc":"10.9.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_get(direct), Ok("gw0".into()));
        let via = br#"[{"dst":"10.8.0.2","gateway":"10.9.0.254","dev":"gw0","prefsrc":"10.9.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert!(parse_route_get(via)
            .unwrap_err()
            .contains("not on a link of the gateway (its route goes via 10.9.0.254)"));
        let local = br#"[{"type":"local","dst":"10.9.0.1","dev":"lo","prefsrc":"10.9.0.1","flags":[],"uid":0,"cache":["local"]}]"#;
        assert!(parse_route_get(local).unwrap_err().contains("local"));
        assert!(parse_route_get(b"[]").is_err());
        assert!(parse_route_get(b"garbage").is_err());
    }

    #[test]
    fn the_kernel_block_rule_is_the_cluster_geometry_rule() {
        for (lo, hi, bs) in [
            (40000, 40511, 64),
            (1024, 65535, 64),
            (40000, 40100, 8),
            (1, 65535, 8),
        ] {
            let g = Geometry::new(
                PortRange { lo, hi },
                bs,
                vec![],
                vec![Ipv4Addr::new(198, 51, 100, 1)],
            )
            .unwrap();
            let k = GwGeometry::new(lo, bs, g.blocks_per_ip());
            for port in 0..=u16::MAX {
                assert_eq!(
                    k.block_of(port),
                    g.block_of(port),
                    "{lo}:{hi}/{bs} port {port}"
                );
            }
        }
    }

    #[test]
    fn the_agent_maps_are_shrunk_and_the_gateway_maps_are_not() {
        let shrunk = agent_maps_shrunk().unwrap();
        for big in [
            snat_common::MAP_FWD,
            snat_common::MAP_REV,
            snat_common::MAP_USE,
            snat_common::MAP_ENDPOINTS,
            snat_common::MAP_FREE_PORTS,
        ] {
            assert!(
                shrunk.iter().any(|m| m == big),
                "{big} not shrunk: {shrunk:?}"
            );
        }
        assert!(
            !shrunk.iter().any(|m| m.starts_with("SNAT_GW_")),
            "{shrunk:?}"
        );
    }
}
