//! `snat cluster status` and `snat cluster release` without their IO: what a snapshot of the
//! store says about the cluster (nodes, their leases and blocks, quarantined blocks, gateways,
//! free blocks per NAT IP), its renderings, and the decisions of a release. Pure: the command
//! (`agent::admin`) reads the store and the leases' time left and hands them in.
//!
//! **Release.** A dead node's blocks must not be claimed sooner than `--block-cooldown` after
//! the node last sent from them. [`decide`] lets a release go ahead only when the node's lease
//! is within the fence margin of its end (then the node's datapath has stopped by itself: its
//! valid-until is a margin and a cool-down before the deadline, see `node.rs`) or when the
//! operator says the node is dead (`--dead`: powered off, it sends nothing any more). Either
//! way the blocks are first moved, in a transaction that checks they are still the node's
//! claims, under a quarantine lease of [`quarantine_ttl`] (the cool-down plus the margin, which
//! covers etcd revoking that lease early just as it covers the nodes' leases); only then is the
//! node's lease revoked. A block under the quarantine lease is a key like any claim: no node
//! claims it (claims need `create_revision == 0`) and every snapshot lists it as used, so the
//! existing allocator respects it unchanged; when the lease ends the key goes and the block is
//! free, at least a cool-down after the node's last possible send.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, time::Duration};

use serde::Serialize;

use super::{
    geometry::{BlockId, Geometry},
    store::{BlockValue, LeaseId, LeaseTtl, NodeTimers, Record, Snapshot},
};

/// A lease as etcdctl shows it (hex).
pub fn lease_hex(lease: LeaseId) -> String {
    format!("{lease:x}")
}

/// The cluster as `snat cluster status` shows it; its JSON (`--json`) is stable: fields are
/// only ever added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The store's revision when it was read.
    pub revision: i64,
    /// The geometry record (`None`: no agent has written one yet, or it does not decode).
    pub geometry: Option<GeometryView>,
    pub nodes: Vec<NodeView>,
    /// Blocks held under a lease that is not their node's (moved there by `snat cluster
    /// release`, or their node's name is gone): nobody uses them; free when the lease ends.
    pub quarantined: Vec<QuarantinedView>,
    pub gateways: Vec<GatewayView>,
    /// Gateways known to the cluster without a live record (cut off past their lease, or dead
    /// without leaving): no node uses a new block until they are back or forgotten.
    pub absent_gateways: Vec<String>,
    /// Per NAT IP of the geometry: blocks held, quarantined and free.
    pub nat_ips: Vec<NatIpView>,
    /// Keys under `/snat/v1/` that are not snat's or do not decode.
    pub unreadable: Vec<UnreadableView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GeometryView {
    /// `LO:HI`.
    pub port_range: String,
    pub block_size: u16,
    pub blocks_per_ip: u16,
    pub nat_ips: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub name: String,
    /// Where the gateway sends replies for its blocks.
    pub address: Ipv4Addr,
    /// The node's lease, in hex as etcdctl shows it.
    pub lease: String,
    /// Seconds the lease has left, rounded down (`None`: gone, or not known).
    pub ttl_seconds: Option<i64>,
    /// The TTL the lease was granted with.
    pub granted_ttl_seconds: Option<i64>,
    pub blocks: Vec<BlockView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockView {
    pub nat_ip: Ipv4Addr,
    pub index: u16,
    /// The block's ports (`None` outside the geometry).
    pub first_port: Option<u16>,
    pub last_port: Option<u16>,
    /// The claim's epoch: the key's create revision.
    pub epoch: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuarantinedView {
    #[serde(flatten)]
    pub block: BlockView,
    /// The node that held it.
    pub node: String,
    /// The lease it is held under now (hex).
    pub lease: String,
    /// Seconds until that lease ends and the block is free (`None`: gone, or not known).
    pub ttl_seconds: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayView {
    pub name: String,
    /// The revision whose block routes the gateway has in place (nodes wait for it).
    pub applied_revision: i64,
    /// Revisions the store is ahead of it.
    pub lag: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatIpView {
    pub nat_ip: Ipv4Addr,
    pub blocks: u16,
    pub held: u16,
    pub quarantined: u16,
    pub free: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnreadableView {
    pub key: String,
    pub reason: String,
}

fn block_view(geometry: Option<&Geometry>, block: BlockId, epoch: i64) -> BlockView {
    let ports = geometry
        .filter(|g| g.holds(block))
        .map(|g| g.ports(block.index));
    BlockView {
        nat_ip: block.nat_ip,
        index: block.index,
        first_port: ports.as_ref().map(|p| *p.start()),
        last_port: ports.as_ref().map(|p| *p.end()),
        epoch,
    }
}

/// Whether a block record is its node's live claim: the key's lease is the lease its node is
/// registered under.
fn held_by_node(s: &Snapshot, r: &Record<BlockValue>) -> bool {
    s.nodes
        .get(&r.value.node)
        .is_some_and(|n| n.value.lease == r.lease)
}

/// The leases whose time left the status shows: every node's, and those of blocks not held by
/// their node.
pub fn leases_to_ask(s: &Snapshot) -> Vec<LeaseId> {
    let mut leases: Vec<LeaseId> = s.nodes.values().map(|n| n.value.lease).collect();
    leases.extend(
        s.blocks
            .values()
            .filter(|r| !held_by_node(s, r))
            .map(|r| r.lease),
    );
    leases.sort_unstable();
    leases.dedup();
    leases
}

/// The status of the cluster in snapshot `s`, with the time left of the leases in `leases`
/// (those [`leases_to_ask`] names; a missing one shows as unknown).
pub fn status(s: &Snapshot, leases: &BTreeMap<LeaseId, LeaseTtl>) -> ClusterStatus {
    let mut unreadable: Vec<UnreadableView> = s
        .unreadable
        .iter()
        .map(|u| UnreadableView {
            key: u.key.clone(),
            reason: u.reason.clone(),
        })
        .collect();
    let geometry: Option<Geometry> = s.config.as_ref().and_then(|c| {
        serde_json::from_str(&c.value)
            .map_err(|e| {
                unreadable.push(UnreadableView {
                    key: super::store::Key::Config.path(),
                    reason: format!("not a geometry this snat reads: {e}"),
                });
            })
            .ok()
    });
    let g = geometry.as_ref();
    let ttl = |lease: LeaseId| match leases.get(&lease) {
        Some(LeaseTtl::Alive {
            ttl_s,
            granted_ttl_s,
        }) => (Some(*ttl_s), Some(*granted_ttl_s)),
        _ => (None, None),
    };
    let mut nodes: Vec<NodeView> = s
        .nodes
        .iter()
        .map(|(name, r)| {
            let (ttl_seconds, granted_ttl_seconds) = ttl(r.value.lease);
            NodeView {
                name: name.clone(),
                address: r.value.address,
                lease: lease_hex(r.value.lease),
                ttl_seconds,
                granted_ttl_seconds,
                blocks: Vec::new(),
            }
        })
        .collect();
    let mut quarantined = Vec::new();
    let mut held_on: BTreeMap<Ipv4Addr, u16> = BTreeMap::new();
    let mut quarantined_on: BTreeMap<Ipv4Addr, u16> = BTreeMap::new();
    for (block, r) in &s.blocks {
        let view = block_view(g, *block, r.create_revision);
        let counts = g.is_some_and(|g| g.holds(*block));
        if held_by_node(s, r) {
            if counts {
                *held_on.entry(block.nat_ip).or_default() += 1;
            }
            if let Some(n) = nodes.iter_mut().find(|n| n.name == r.value.node) {
                n.blocks.push(view);
            }
        } else {
            if counts {
                *quarantined_on.entry(block.nat_ip).or_default() += 1;
            }
            quarantined.push(QuarantinedView {
                block: view,
                node: r.value.node.clone(),
                lease: lease_hex(r.lease),
                ttl_seconds: ttl(r.lease).0,
            });
        }
    }
    let gateways = s
        .gateways
        .iter()
        .map(|(name, r)| GatewayView {
            name: name.clone(),
            applied_revision: r.value.applied_revision,
            lag: (s.revision - r.value.applied_revision).max(0),
        })
        .collect();
    let absent_gateways = s
        .known_gateways
        .iter()
        .filter(|k| !s.gateways.contains_key(*k))
        .cloned()
        .collect();
    let nat_ips = g.map_or_else(Vec::new, |g| {
        g.nat_ips
            .iter()
            .map(|&ip| {
                let blocks = g.blocks_per_ip();
                let held = held_on.get(&ip).copied().unwrap_or(0);
                let q = quarantined_on.get(&ip).copied().unwrap_or(0);
                NatIpView {
                    nat_ip: ip,
                    blocks,
                    held,
                    quarantined: q,
                    free: blocks.saturating_sub(held + q),
                }
            })
            .collect()
    });
    ClusterStatus {
        revision: s.revision,
        geometry: geometry.map(|g| GeometryView {
            port_range: format!("{}:{}", g.port_range.lo, g.port_range.hi),
            block_size: g.block_size,
            blocks_per_ip: g.blocks_per_ip(),
            nat_ips: g.nat_ips.clone(),
        }),
        nodes,
        quarantined,
        gateways,
        absent_gateways,
        nat_ips,
        unreadable,
    }
}

fn secs(t: Option<i64>) -> String {
    t.map_or_else(|| "-".into(), |t| format!("{t}s"))
}

fn ports(b: &BlockView) -> String {
    match (b.first_port, b.last_port) {
        (Some(f), Some(l)) => format!("{f}-{l}"),
        _ => "-".into(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

/// The human rendering (like `calicoctl ipam show --show-blocks`).
pub fn render(st: &ClusterStatus) -> String {
    let mut out = String::new();
    match &st.geometry {
        Some(g) => {
            let ips: Vec<String> = g.nat_ips.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "revision {}; NAT IPs {}; ports {} in {} blocks of {} per NAT IP",
                st.revision,
                ips.join(", "),
                g.port_range,
                g.blocks_per_ip,
                g.block_size
            );
        }
        None => {
            let _ = writeln!(
                out,
                "revision {}; no geometry in /snat/v1/config yet (no agent has started)",
                st.revision
            );
        }
    }
    out.push('\n');
    if st.nodes.is_empty() {
        out.push_str("no nodes registered\n");
    } else {
        let mut rows = vec![vec![
            "NODE".into(),
            "ADDRESS".into(),
            "LEASE".into(),
            "TTL LEFT".into(),
            "BLOCKS".into(),
        ]];
        for n in &st.nodes {
            rows.push(vec![
                n.name.clone(),
                n.address.to_string(),
                n.lease.clone(),
                format!("{}/{}", secs(n.ttl_seconds), secs(n.granted_ttl_seconds)),
                n.blocks.len().to_string(),
            ]);
        }
        table(&mut out, &rows);
    }
    let mut rows = vec![vec![
        "NAT IP".into(),
        "BLOCK".into(),
        "PORTS".into(),
        "EPOCH".into(),
        "NODE".into(),
        "STATE".into(),
    ]];
    for n in &st.nodes {
        for b in &n.blocks {
            rows.push(vec![
                b.nat_ip.to_string(),
                b.index.to_string(),
                ports(b),
                b.epoch.to_string(),
                n.name.clone(),
                "held".into(),
            ]);
        }
    }
    for q in &st.quarantined {
        let b = &q.block;
        rows.push(vec![
            b.nat_ip.to_string(),
            b.index.to_string(),
            ports(b),
            b.epoch.to_string(),
            q.node.clone(),
            format!("quarantined, free in {}", secs(q.ttl_seconds)),
        ]);
    }
    if rows.len() > 1 {
        out.push('\n');
        table(&mut out, &rows);
    }
    out.push('\n');
    if st.gateways.is_empty() {
        out.push_str("no gateways registered (nodes open new blocks without waiting for one)\n");
    } else {
        let mut rows = vec![vec![
            "GATEWAY".into(),
            "APPLIED REVISION".into(),
            "LAG".into(),
        ]];
        for g in &st.gateways {
            rows.push(vec![
                g.name.clone(),
                g.applied_revision.to_string(),
                g.lag.to_string(),
            ]);
        }
        table(&mut out, &rows);
    }
    for name in &st.absent_gateways {
        let _ = writeln!(
            out,
            "gateway {name}: known but absent (cut off from etcd past its lease, or dead): no node uses a new block until it is back, or `snat cluster forget-gateway {name}`"
        );
    }
    if !st.nat_ips.is_empty() {
        out.push('\n');
        let mut rows = vec![vec![
            "NAT IP".into(),
            "BLOCKS".into(),
            "HELD".into(),
            "QUARANTINED".into(),
            "FREE".into(),
        ]];
        for ip in &st.nat_ips {
            rows.push(vec![
                ip.nat_ip.to_string(),
                ip.blocks.to_string(),
                ip.held.to_string(),
                ip.quarantined.to_string(),
                ip.free.to_string(),
            ]);
        }
        table(&mut out, &rows);
    }
    for u in &st.unreadable {
        let _ = writeln!(out, "\nunreadable key {}: {}", u.key, u.reason);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Release.

/// What a release of a node does, given its lease's time left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The lease is gone: its blocks went with it (nothing to release).
    LeaseGone,
    /// The lease has more than the fence margin left and nobody said the node is dead: its
    /// datapath may still translate in its blocks.
    Refuse { ttl_s: i64 },
    /// The lease ends within the margin: the node's datapath has stopped translating by itself.
    Fenced { ttl_s: i64 },
    /// The operator says the node is dead (`--dead`).
    Dead { ttl_s: i64 },
}

/// Decides a release. etcd rounds the time left down to whole seconds, so a lease reported
/// with `ttl_s` ends within `ttl_s + 1` s: it counts as fenced only if that is within `margin`.
pub fn decide(ttl: LeaseTtl, margin: Duration, dead: bool) -> Verdict {
    match ttl {
        LeaseTtl::Gone => Verdict::LeaseGone,
        LeaseTtl::Alive { ttl_s, .. } if dead => Verdict::Dead { ttl_s },
        LeaseTtl::Alive { ttl_s, .. } => {
            let ends_within = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(0) + 1);
            if ends_within <= margin {
                Verdict::Fenced { ttl_s }
            } else {
                Verdict::Refuse { ttl_s }
            }
        }
    }
}

/// The timers a release of one node runs on: the flags given to `snat cluster release`, made
/// stricter by the ones the node published with its record (its own fence runs on those).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseTimers {
    /// The node counts as fenced only with this little time left on its lease.
    pub fenced_within: Duration,
    /// The quarantine lasts this cool-down plus `margin`.
    pub cooldown: Duration,
    pub margin: Duration,
}

impl ReleaseTimers {
    pub fn new(cooldown: Duration, margin: Duration, recorded: Option<NodeTimers>) -> Self {
        match recorded {
            None => Self {
                fenced_within: margin,
                cooldown,
                margin,
            },
            Some(t) => Self {
                fenced_within: margin.min(t.fence_margin()),
                cooldown: cooldown.max(t.cooldown()),
                margin: margin.max(t.fence_margin()),
            },
        }
    }
}

/// TTL in whole seconds of the quarantine lease: the cool-down, plus the margin (etcd may end a
/// lease early by up to the margin, as for the nodes' leases), rounded up.
pub fn quarantine_ttl(cooldown: Duration, margin: Duration) -> i64 {
    let d = cooldown + margin;
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(s.max(1)).unwrap_or(i64::MAX)
}

/// Whether a lease was renewed between two reads of its time left: the node's agent is alive
/// and reaches etcd (a renewal restarts the full TTL, which is more than the margin).
pub fn renewed(before_s: i64, after: LeaseTtl) -> bool {
    matches!(after, LeaseTtl::Alive { ttl_s, .. } if ttl_s > before_s)
}

/// The blocks `node` holds under `lease` in `s`, each with its epoch and the value it gets
/// under the quarantine lease `to`.
pub fn blocks_to_move(
    s: &Snapshot,
    node: &str,
    lease: LeaseId,
    to: LeaseId,
) -> Vec<(BlockId, i64, BlockValue)> {
    s.blocks
        .iter()
        .filter(|(_, r)| r.value.node == node && r.lease == lease)
        .map(|(b, r)| {
            (
                *b,
                r.create_revision,
                BlockValue {
                    lease: to,
                    ..r.value.clone()
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::store::{GatewayValue, NodeValue},
        settings::ports::PortRange,
    };

    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn rec<T>(value: T, create_revision: i64, lease: LeaseId) -> Record<T> {
        Record {
            value,
            create_revision,
            mod_revision: create_revision,
            lease,
        }
    }

    fn block(index: u16) -> BlockId {
        BlockId { nat_ip: IP, index }
    }

    /// Two nodes on one NAT IP of 8 blocks: a holds 0 and 1, b holds 2; block 5 is in
    /// quarantine after a release of c; a gateway at revision 40 of 42.
    fn snapshot() -> Snapshot {
        let g = Geometry::new(
            PortRange {
                lo: 40000,
                hi: 40511,
            },
            64,
            vec![],
            vec![IP],
        )
        .unwrap();
        let mut s = Snapshot {
            revision: 42,
            config: Some(rec(serde_json::to_string(&g).unwrap(), 1, 0)),
            ..Snapshot::default()
        };
        for (name, addr, lease) in [("a", 2, 0x10), ("b", 3, 0x20)] {
            s.nodes.insert(
                name.into(),
                rec(
                    NodeValue {
                        address: Ipv4Addr::new(10, 0, 0, addr),
                        lease,
                        timers: None,
                    },
                    2,
                    lease,
                ),
            );
        }
        let bv = |node: &str, addr, lease| BlockValue {
            node: node.into(),
            address: Ipv4Addr::new(10, 0, 0, addr),
            lease,
        };
        s.blocks.insert(block(0), rec(bv("a", 2, 0x10), 5, 0x10));
        s.blocks.insert(block(1), rec(bv("a", 2, 0x10), 7, 0x10));
        s.blocks.insert(block(2), rec(bv("b", 3, 0x20), 9, 0x20));
        s.blocks.insert(block(5), rec(bv("c", 4, 0x30), 11, 0x30));
        s.gateways.insert(
            "gw".into(),
            rec(
                GatewayValue {
                    applied_revision: 40,
                },
                3,
                0x40,
            ),
        );
        s
    }

    fn leases() -> BTreeMap<LeaseId, LeaseTtl> {
        [
            (
                0x10,
                LeaseTtl::Alive {
                    ttl_s: 80,
                    granted_ttl_s: 90,
                },
            ),
            (
                0x30,
                LeaseTtl::Alive {
                    ttl_s: 12,
                    granted_ttl_s: 25,
                },
            ),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn the_status_files_blocks_under_their_nodes_and_counts_free_ones() {
        let s = snapshot();
        assert_eq!(leases_to_ask(&s), vec![0x10, 0x20, 0x30]);
        let st = status(&s, &leases());
        assert_eq!(st.revision, 42);
        let g = st.geometry.as_ref().unwrap();
        assert_eq!(
            (g.port_range.as_str(), g.block_size, g.blocks_per_ip),
            ("40000:40511", 64, 8)
        );
        assert_eq!(st.nodes.len(), 2);
        let a = &st.nodes[0];
        assert_eq!((a.name.as_str(), a.lease.as_str()), ("a", "10"));
        assert_eq!((a.ttl_seconds, a.granted_ttl_seconds), (Some(80), Some(90)));
        assert_eq!(
            a.blocks
                .iter()
                .map(|b| (b.index, b.first_port, b.last_port, b.epoch))
                .collect::<Vec<_>>(),
            vec![
                (0, Some(40000), Some(40063), 5),
                (1, Some(40064), Some(40127), 7)
            ]
        );
        // b's lease was not asked for (or did not answer): unknown, not zero.
        assert_eq!(st.nodes[1].ttl_seconds, None);
        assert_eq!(st.nodes[1].blocks.len(), 1);
        assert_eq!(st.quarantined.len(), 1);
        let q = &st.quarantined[0];
        assert_eq!(
            (q.node.as_str(), q.block.index, q.ttl_seconds),
            ("c", 5, Some(12))
        );
        assert_eq!(
            st.nat_ips,
            vec![NatIpView {
                nat_ip: IP,
                blocks: 8,
                held: 3,
                quarantined: 1,
                free: 4
            }]
        );
        assert_eq!(st.gateways[0].lag, 2);
    }

    #[test]
    fn the_json_has_its_documented_shape() {
        let st = status(&snapshot(), &leases());
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["nodes"][0]["blocks"][1]["first_port"], 40064);
        assert_eq!(v["nodes"][0]["lease"], "10");
        assert_eq!(v["quarantined"][0]["index"], 5);
        assert_eq!(v["quarantined"][0]["node"], "c");
        assert_eq!(v["quarantined"][0]["ttl_seconds"], 12);
        assert_eq!(v["nat_ips"][0]["free"], 4);
        assert_eq!(v["gateways"][0]["applied_revision"], 40);
        assert_eq!(v["gateways"][0]["lag"], 2);
        assert_eq!(v["geometry"]["nat_ips"][0], "198.51.100.1");
    }

    #[test]
    fn the_table_names_every_block_and_the_free_count() {
        let text = render(&status(&snapshot(), &leases()));
        assert!(
            text.starts_with(
                "revision 42; NAT IPs 198.51.100.1; ports 40000:40511 in 8 blocks of 64 per NAT IP"
            ),
            "{text}"
        );
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(line("10.0.0.2"), ["a", "10.0.0.2", "10", "80s/90s", "2"]);
        assert_eq!(line("10.0.0.3"), ["b", "10.0.0.3", "20", "-/-", "1"]);
        assert_eq!(
            line("40128-40191"),
            ["198.51.100.1", "2", "40128-40191", "9", "b", "held"]
        );
        assert_eq!(
            line("40320-40383"),
            [
                "198.51.100.1",
                "5",
                "40320-40383",
                "11",
                "c",
                "quarantined,",
                "free",
                "in",
                "12s"
            ]
        );
        assert_eq!(line("gw"), ["gw", "40", "2"]);
        assert_eq!(
            line("198.51.100.1  8"),
            ["198.51.100.1", "8", "3", "1", "4"]
        );
    }

    #[test]
    fn an_empty_store_says_so() {
        let st = status(&Snapshot::default(), &BTreeMap::new());
        assert_eq!(st.geometry, None);
        assert!(st.nat_ips.is_empty());
        let text = render(&st);
        assert!(
            text.contains("no geometry in /snat/v1/config yet"),
            "{text}"
        );
        assert!(text.contains("no nodes registered"), "{text}");
        assert!(text.contains("no gateways registered"), "{text}");
    }

    #[test]
    fn a_release_goes_ahead_only_on_a_fenced_lease_or_the_operators_word() {
        let alive = |ttl_s| LeaseTtl::Alive {
            ttl_s,
            granted_ttl_s: 90,
        };
        let m = Duration::from_secs(5);
        assert_eq!(decide(LeaseTtl::Gone, m, false), Verdict::LeaseGone);
        assert_eq!(decide(LeaseTtl::Gone, m, true), Verdict::LeaseGone);
        assert_eq!(decide(alive(80), m, false), Verdict::Refuse { ttl_s: 80 });
        // Rounded down: 5 means up to 5.99 s, more than the margin.
        assert_eq!(decide(alive(5), m, false), Verdict::Refuse { ttl_s: 5 });
        assert_eq!(decide(alive(4), m, false), Verdict::Fenced { ttl_s: 4 });
        assert_eq!(decide(alive(0), m, false), Verdict::Fenced { ttl_s: 0 });
        assert_eq!(decide(alive(80), m, true), Verdict::Dead { ttl_s: 80 });
        // A margin under a second never lets a live lease through without --dead.
        assert_eq!(
            decide(alive(0), Duration::from_millis(500), false),
            Verdict::Refuse { ttl_s: 0 }
        );
    }

    #[test]
    fn the_quarantine_outlasts_the_cool_down_and_the_margin() {
        let s = Duration::from_secs;
        assert_eq!(quarantine_ttl(s(20), s(5)), 25);
        assert_eq!(quarantine_ttl(s(3), s(2)), 5);
        assert_eq!(quarantine_ttl(Duration::from_millis(2500), s(1)), 4);
        assert_eq!(quarantine_ttl(Duration::ZERO, Duration::ZERO), 1);
    }

    #[test]
    fn the_nodes_own_timers_win_where_they_are_stricter() {
        let s = Duration::from_secs;
        // No record (an older agent): the command's flags.
        let t = ReleaseTimers::new(s(20), s(5), None);
        assert_eq!((t.fenced_within, t.cooldown, t.margin), (s(5), s(20), s(5)));
        // The node runs a longer cool-down and a larger margin: a longer quarantine, and it
        // counts as fenced only within the smaller margin.
        let t = ReleaseTimers::new(s(20), s(5), Some(NodeTimers::new(s(60), s(10))));
        assert_eq!(
            (t.fenced_within, t.cooldown, t.margin),
            (s(5), s(60), s(10))
        );
        assert_eq!(quarantine_ttl(t.cooldown, t.margin), 70);
        // Shorter timers on the node never shorten the command's.
        let t = ReleaseTimers::new(s(20), s(5), Some(NodeTimers::new(s(3), s(2))));
        assert_eq!((t.fenced_within, t.cooldown, t.margin), (s(2), s(20), s(5)));
    }

    #[test]
    fn a_renewal_shows_as_more_time_left() {
        let alive = |ttl_s| LeaseTtl::Alive {
            ttl_s,
            granted_ttl_s: 12,
        };
        assert!(renewed(1, alive(11)));
        assert!(!renewed(1, alive(1)));
        assert!(!renewed(1, alive(0)));
        assert!(!renewed(1, LeaseTtl::Gone));
    }

    #[test]
    fn only_the_nodes_live_claims_move_and_keep_their_epoch() {
        let s = snapshot();
        let moves = blocks_to_move(&s, "a", 0x10, 0x99);
        assert_eq!(
            moves
                .iter()
                .map(|(b, e, v)| (b.index, *e, v.lease, v.node.as_str()))
                .collect::<Vec<_>>(),
            vec![(0, 5, 0x99, "a"), (1, 7, 0x99, "a")]
        );
        assert_eq!(moves[0].2.address, Ipv4Addr::new(10, 0, 0, 2));
        // c's block is under another lease already: not moved again.
        assert!(blocks_to_move(&s, "c", 0x31, 0x99).is_empty());
    }
}
