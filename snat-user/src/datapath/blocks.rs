//! Cluster mode's block table in the kernel (`snat_common::block`): [`Blocks`] applies the block
//! allocator's [`DatapathOp`]s to it and reads back what the allocator needs ([`Usage`]), what
//! `snat status` lists ([`HeldBlock`]) and what a restarted agent adopts ([`Restored`]).
//!
//! Invariants:
//! - `SNAT_BLOCKS` is the truth, and pinned: nothing here keeps a copy that a restart could lose.
//!   Entries are replaced whole (a hash map update swaps the element), so the datapath reads one
//!   version of each.
//! - Each NAT IP of the geometry has a `SNAT_OPEN_BLOCKS` list (empty or not): the blocks whose
//!   entry is OPEN, fullest first (by the live mappings of the last [`Blocks::usage`]), so new
//!   mappings pack into few blocks and the others empty and can go back; its valid-until is the
//!   earliest of theirs. The list is rewritten whole after every change; the kernel checks the
//!   claimed port's entry, so a list a moment behind only costs a refused flow, never a mapping
//!   in a block that is not open.
//! - Order of the steps: an opened block is written before it is listed, a closed or forgotten one
//!   is unlisted before its entry changes; a forgotten block's entry goes before its mappings, so
//!   none of them translates another packet while they are released.
//! - A block that opens bumps `Config::generation`: destinations found full (`SNAT_FULL`) are
//!   searched again, now that they may have a free port.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};
use snat_common::{
    block::{BlockEntry, BlockKey, Layout, LeaseRecord, OpenBlocks, MAX_OPEN_BLOCKS},
    Config, FlowKey, Ipv4Octets, Mapping, PoolKey, ReleaseEntry,
};

use super::{
    batch,
    error::{DatapathError, Doing as _},
    Engine, Tables,
};
use crate::cluster::{
    geometry::{BlockId, Geometry},
    node::{BlockUse, DatapathOp, LeaseId, Nanos, Pressure, Restored, RestoredBlock, Usage},
};

/// The kernel's block layout for a cluster geometry.
pub fn layout(g: &Geometry) -> Layout {
    Layout {
        shift: u32::from(g.block_size).trailing_zeros(),
        base: u32::from(g.port_range.lo),
        count: u32::from(g.blocks_per_ip()),
    }
}

/// A block this node holds, as the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldBlock {
    pub block: BlockId,
    pub epoch: i64,
    pub open: bool,
    /// `CLOCK_BOOTTIME` ns until which its packets are translated.
    pub valid_until: Nanos,
    /// Live mappings at the last [`Blocks::usage`].
    pub live: u32,
}

/// The block maps, and what the last usage read found.
pub struct Blocks {
    geometry: Geometry,
    layout: Layout,
    table: HashMap<MapData, BlockKey, BlockEntry>,
    open: HashMap<MapData, Ipv4Octets, OpenBlocks>,
    lease: Array<MapData, LeaseRecord>,
    config: Array<MapData, Config>,
    exhausted: PerCpuHashMap<MapData, PoolKey, u64>,
    /// Live mappings per block at the last usage read: the order of the open lists.
    live: BTreeMap<BlockId, u32>,
    /// Refusals per NAT IP (over protocols and CPUs) at the last read.
    refusals: BTreeMap<Ipv4Addr, u64>,
    /// Free ports for the busiest destination per NAT IP at the last usage read, plus the
    /// ports of blocks opened since.
    free: BTreeMap<Ipv4Addr, u32>,
    /// Mappings the datapath had created (all NAT IPs) at the last usage read.
    created_at_read: u64,
    /// The estimate of free ports per NAT IP the last poll reported.
    estimated: BTreeMap<Ipv4Addr, u32>,
    /// NAT IPs the allocator is getting another block on ([`DatapathOp::Growing`]).
    growing: BTreeSet<Ipv4Addr>,
    /// The latest valid-until given (open or extend): how long a growing flag holds, so a
    /// dead agent's flag lapses with its blocks.
    fence: Nanos,
}

/// `CLOCK_BOOTTIME` now, in ns: the clock of [`DatapathOp`] and [`Usage`].
pub use crate::clock::boottime_ns as boot_now;

/// A coarse clock reads up to a tick behind: a last-seen converted to boot time is moved this
/// much later, so a block is never taken for idle sooner than it was.
const COARSE_SLACK_NS: u64 = 20_000_000;

/// Converts a mapping's `CLOCK_MONOTONIC_COARSE` stamp to `CLOCK_BOOTTIME`, given both clocks
/// read now. The monotonic clock stops while the machine sleeps and boot time does not, so the
/// age measured on the first and subtracted from the second can only make the result later
/// than the truth (never earlier, which could release a block too soon).
fn to_boot(seen_mono: u64, mono_now: u64, boot_now: u64) -> Nanos {
    boot_now
        .saturating_sub(mono_now.saturating_sub(seen_mono))
        .saturating_add(COARSE_SLACK_NS)
        .min(boot_now)
}

fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}

impl Blocks {
    pub(super) fn new(
        geometry: Geometry,
        table: HashMap<MapData, BlockKey, BlockEntry>,
        open: HashMap<MapData, Ipv4Octets, OpenBlocks>,
        lease: Array<MapData, LeaseRecord>,
        config: Array<MapData, Config>,
        exhausted: PerCpuHashMap<MapData, PoolKey, u64>,
    ) -> Result<Self, DatapathError> {
        let mut blocks = Self {
            layout: layout(&geometry),
            geometry,
            table,
            open,
            lease,
            config,
            exhausted,
            live: BTreeMap::new(),
            refusals: BTreeMap::new(),
            free: BTreeMap::new(),
            created_at_read: 0,
            estimated: BTreeMap::new(),
            growing: BTreeSet::new(),
            fence: 0,
        };
        // Every NAT IP gets its list (ingress tells NAT IPs by it); pinned lists stay as they
        // are, rewritten from the table.
        for ip in blocks.geometry.nat_ips.clone() {
            blocks.write_open(ip)?;
        }
        blocks.refusals = blocks.read_refusals()?;
        Ok(blocks)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Applies one operation of the block allocator (in the order it queued them). `Forget`
    /// releases the block's mappings with the release program; returns how many it released.
    pub fn apply(
        &mut self,
        op: &DatapathOp,
        engine: &Engine,
        tables: &Tables,
    ) -> Result<usize, DatapathError> {
        match *op {
            DatapathOp::SetLease(lease) => {
                self.set_lease(lease)?;
                Ok(0)
            }
            DatapathOp::Open {
                block,
                epoch,
                valid_until,
            } => {
                self.open_block(block, epoch, valid_until)?;
                Ok(0)
            }
            DatapathOp::Close { block } => {
                self.close_block(block)?;
                Ok(0)
            }
            DatapathOp::Extend { valid_until } => {
                self.extend(valid_until)?;
                Ok(0)
            }
            DatapathOp::Forget { block } => self.forget(block, engine, tables),
            DatapathOp::Growing { nat_ip, growing } => {
                self.set_growing(nat_ip, growing)?;
                Ok(0)
            }
        }
    }

    /// Pins the lease the blocks are held under with them.
    pub fn set_lease(&mut self, lease: Option<LeaseId>) -> Result<(), DatapathError> {
        let rec = LeaseRecord {
            lease: lease.unwrap_or(0),
            set: u32::from(lease.is_some()),
            _pad: 0,
        };
        self.lease
            .set(0, rec, 0)
            .doing(|| "writing the block lease".into())
    }

    /// The block is ours under `epoch`: new mappings may use it, and its packets pass until
    /// `valid_until`.
    pub fn open_block(
        &mut self,
        block: BlockId,
        epoch: i64,
        valid_until: Nanos,
    ) -> Result<(), DatapathError> {
        if !self.geometry.holds(block) {
            return Err(DatapathError::Missing(format!(
                "block {block} in the geometry"
            )));
        }
        let key = BlockKey::new(block.nat_ip.octets(), block.index);
        if self
            .entry(&key)?
            .is_none_or(|e| e.flags & BlockEntry::OPEN == 0)
        {
            // Its ports count towards the estimate until the next usage read.
            *self.free.entry(block.nat_ip).or_default() += self.layout.size();
        }
        self.table
            .insert(key, BlockEntry::new(epoch, true, valid_until), 0)
            .doing(|| format!("opening block {block}"))?;
        self.fence = self.fence.max(valid_until);
        self.write_open(block.nat_ip)?;
        // Destinations found full may have a port now.
        let mut cfg = self.config.get(&0, 0)?;
        cfg.generation = cfg.generation.wrapping_add(1);
        self.config.set(0, cfg, 0)?;
        Ok(())
    }

    /// Whether a flow that finds no port on `ip` is held back (a block is on its way) rather
    /// than refused.
    pub fn set_growing(&mut self, ip: Ipv4Addr, growing: bool) -> Result<(), DatapathError> {
        let changed = if growing {
            self.growing.insert(ip)
        } else {
            self.growing.remove(&ip)
        };
        if changed {
            self.write_open(ip)?;
        }
        Ok(())
    }

    /// No new mappings in the block; its mappings keep translating.
    pub fn close_block(&mut self, block: BlockId) -> Result<(), DatapathError> {
        let key = BlockKey::new(block.nat_ip.octets(), block.index);
        let Some(mut e) = self.entry(&key)? else {
            return Ok(());
        };
        e.flags &= !BlockEntry::OPEN;
        // Unlisted first: the list is what the allocator reads.
        self.unlist(block)?;
        self.table
            .insert(key, e, 0)
            .doing(|| format!("closing block {block}"))
    }

    /// Every held block is valid until `valid_until` (entries first, then the lists that name
    /// them).
    pub fn extend(&mut self, valid_until: Nanos) -> Result<(), DatapathError> {
        self.fence = valid_until;
        for (key, mut e) in self.entries()? {
            e.valid_until_ns = valid_until;
            self.table
                .insert(key, e, 0)
                .doing(|| "extending a block".into())?;
        }
        for ip in self.geometry.nat_ips.clone() {
            self.write_open(ip)?;
        }
        Ok(())
    }

    /// The block is not ours: its entry goes (its mappings stop translating at once), then its
    /// mappings, through the release program. Returns how many mappings went.
    pub fn forget(
        &mut self,
        block: BlockId,
        engine: &Engine,
        tables: &Tables,
    ) -> Result<usize, DatapathError> {
        let key = BlockKey::new(block.nat_ip.octets(), block.index);
        self.unlist(block)?;
        match self.table.remove(&key) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).doing(|| format!("forgetting block {block}")),
        }
        self.live.remove(&block);
        self.release_mappings(&[block], engine, tables)
    }

    /// Releases every mapping whose NAT port is in one of `blocks`: a packet may refresh one
    /// between the read and the release (it was past the fence check already), so a few rounds.
    fn release_mappings(
        &self,
        blocks: &[BlockId],
        engine: &Engine,
        tables: &Tables,
    ) -> Result<usize, DatapathError> {
        let wanted: BTreeSet<BlockId> = blocks.iter().copied().collect();
        let mut released = 0;
        for _ in 0..4 {
            let mut keys = Vec::new();
            batch::for_each(&tables.fwd, |k: FlowKey, m: Mapping| {
                if self.block_of(&m).is_some_and(|b| wanted.contains(&b)) {
                    keys.push(k);
                }
            })?;
            if keys.is_empty() {
                break;
            }
            let mut entries: Vec<ReleaseEntry> = keys
                .into_iter()
                .filter_map(|k| tables.release_entry(k).ok())
                .collect();
            engine.release(&mut entries)?;
            released += entries
                .iter()
                .filter(|e| e.result == snat_common::flow::release_result::RELEASED)
                .count();
        }
        Ok(released)
    }

    /// The block a mapping's NAT port is in.
    fn block_of(&self, m: &Mapping) -> Option<BlockId> {
        let index = self.layout.block_of(m.nat_port())?;
        Some(BlockId {
            nat_ip: m.nat_addr(),
            index,
        })
    }

    fn entry(&self, key: &BlockKey) -> Result<Option<BlockEntry>, DatapathError> {
        match self.table.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e).doing(|| "reading a block".into()),
        }
    }

    fn entries(&self) -> Result<Vec<(BlockKey, BlockEntry)>, DatapathError> {
        let mut out = Vec::new();
        batch::for_each(&self.table, |k, v| out.push((k, v)))?;
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Rewrites the list of `block`'s NAT IP without it.
    fn unlist(&mut self, block: BlockId) -> Result<(), DatapathError> {
        let mut entries = self.entries()?;
        entries.retain(|(k, _)| !(k.addr == block.nat_ip.octets() && k.index == block.index));
        self.write_list(block.nat_ip, &entries)
    }

    /// Rewrites the open list of `ip` from the table.
    fn write_open(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let entries = self.entries()?;
        self.write_list(ip, &entries)
    }

    fn write_list(
        &mut self,
        ip: Ipv4Addr,
        entries: &[(BlockKey, BlockEntry)],
    ) -> Result<(), DatapathError> {
        let growing = self.growing.contains(&ip).then_some(self.fence);
        let list = open_list(ip, entries, &self.live, growing);
        self.open
            .insert(ip.octets(), list, 0)
            .doing(|| format!("writing the open blocks of {ip}"))
    }

    /// Sums of `SNAT_EXHAUSTED` per NAT IP (refusals for want of a port, each flow once).
    fn read_refusals(&self) -> Result<BTreeMap<Ipv4Addr, u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for &ip in &self.geometry.nat_ips {
            let mut n = 0u64;
            for proto in snat_common::Proto::ALL {
                let key = PoolKey {
                    addr: ip.octets(),
                    proto: proto.number(),
                    _pad: [0; 3],
                };
                match self.exhausted.get(&key, 0) {
                    Ok(v) => n += v.iter().sum::<u64>(),
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(e).doing(|| "reading refusals".into()),
                }
            }
            out.insert(ip, n);
        }
        Ok(out)
    }

    /// Per NAT IP, what changed since the last poll: a flow refused for want of a port, or fewer
    /// free ports by the estimate — the last usage read's free ports (plus blocks opened since)
    /// less every mapping created since (`created`: a running count over all NAT IPs, the agent's
    /// net of its releases; a count below the read's counts as none, so the estimate never rises
    /// above the read and errs low, towards claiming early). A few map reads: cheap enough to poll
    /// every few milliseconds, so the allocator hears of pressure before the next full read.
    pub fn poll_pressure(&mut self, created: u64) -> Result<Vec<Pressure>, DatapathError> {
        let now = self.read_refusals()?;
        let since = u32::try_from(created.saturating_sub(self.created_at_read)).unwrap_or(u32::MAX);
        let mut out = Vec::new();
        for &ip in &self.geometry.nat_ips {
            let before = self.refusals.get(&ip).copied().unwrap_or(0);
            let refused = now.get(&ip).copied().unwrap_or(0) != before;
            let free = self
                .free
                .get(&ip)
                .copied()
                .unwrap_or(0)
                .saturating_sub(since);
            let last = self.estimated.insert(ip, free);
            if refused || last != Some(free) {
                out.push(Pressure {
                    nat_ip: ip,
                    free,
                    refused,
                });
            }
        }
        self.refusals = now;
        Ok(out)
    }

    /// What the block allocator needs to know (one walk of both mapping tables): per held block
    /// its live mappings and when one was last seen (in boot time), and per NAT IP the free ports
    /// a new flow to its busiest destination could get in the open blocks, and whether a flow was
    /// refused since the last read. Also re-sorts the open lists, fullest first.
    /// `created`: the datapath's count of mappings created, read before this call (the base of
    /// [`Blocks::poll_pressure`]'s estimate).
    pub fn usage(&mut self, tables: &Tables, created: u64) -> Result<Usage, DatapathError> {
        self.created_at_read = created;
        let entries = self.entries()?;
        let held: BTreeMap<BlockId, BlockEntry> =
            entries.iter().map(|(k, e)| (block_id(k), *e)).collect();
        let (mono_now, boot) = (crate::clock::monotonic_coarse_ns(), boot_now());
        let mut live: BTreeMap<BlockId, u32> = held.keys().map(|b| (*b, 0)).collect();
        let mut seen: BTreeMap<BlockId, u64> = BTreeMap::new();
        // Mappings per (NAT IP, destination) in open blocks: what one destination has used.
        let mut towards: std::collections::HashMap<(Ipv4Addr, [u8; 4], [u8; 2], u8), u32> =
            std::collections::HashMap::new();
        batch::for_each(&tables.fwd, |k: FlowKey, m: Mapping| {
            let Some(b) = self.block_of(&m) else { return };
            let Some(e) = held.get(&b) else { return };
            *live.entry(b).or_default() += 1;
            let s = seen.entry(b).or_default();
            *s = (*s).max(m.last_seen_ns);
            if e.flags & BlockEntry::OPEN != 0 {
                *towards
                    .entry((b.nat_ip, k.dst_addr, k.dst_port, k.proto))
                    .or_default() += 1;
            }
        })?;
        batch::for_each(&tables.rev, |k: FlowKey, o: snat_common::Origin| {
            let Some(index) = self.layout.block_of(k.dst_port()) else {
                return;
            };
            let b = BlockId {
                nat_ip: k.dst(),
                index,
            };
            if held.contains_key(&b) {
                let s = seen.entry(b).or_default();
                *s = (*s).max(o.last_seen_ns);
            }
        })?;
        let blocks = held
            .keys()
            .map(|&b| BlockUse {
                block: b,
                live: live.get(&b).copied().unwrap_or(0),
                last_active: seen.get(&b).map_or(0, |&s| to_boot(s, mono_now, boot)),
            })
            .collect();
        let refusals = self.read_refusals()?;
        let mut pressure = Vec::new();
        for &ip in &self.geometry.nat_ips {
            let open_ports = held
                .iter()
                .filter(|(b, e)| b.nat_ip == ip && e.open_at(boot))
                .count() as u32
                * self.layout.size();
            let busiest = towards
                .iter()
                .filter(|((nat, ..), _)| *nat == ip)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0);
            let free = open_ports.saturating_sub(busiest);
            self.free.insert(ip, free);
            self.estimated.insert(ip, free);
            let before = self.refusals.get(&ip).copied().unwrap_or(0);
            pressure.push(Pressure {
                nat_ip: ip,
                free,
                refused: refusals.get(&ip).copied().unwrap_or(0) != before,
            });
        }
        self.refusals = refusals;
        let reorder = live != self.live;
        self.live = live;
        if reorder {
            for ip in self.geometry.nat_ips.clone() {
                self.write_list(ip, &entries)?;
            }
        }
        Ok(Usage { blocks, pressure })
    }

    /// The blocks held, for `snat status`.
    pub fn held(&self) -> Result<Vec<HeldBlock>, DatapathError> {
        Ok(self
            .entries()?
            .into_iter()
            .map(|(k, e)| {
                let block = block_id(&k);
                HeldBlock {
                    block,
                    epoch: e.full_epoch(),
                    open: e.flags & BlockEntry::OPEN != 0,
                    valid_until: e.valid_until_ns,
                    live: self.live.get(&block).copied().unwrap_or(0),
                }
            })
            .collect())
    }

    /// What a restarted agent finds pinned: the lease and the blocks held under it.
    pub fn restored(&self) -> Result<Restored, DatapathError> {
        let rec = self.lease.get(&0, 0)?;
        Ok(Restored {
            lease: (rec.set != 0).then_some(rec.lease),
            blocks: self
                .entries()?
                .into_iter()
                .map(|(k, e)| RestoredBlock {
                    block: block_id(&k),
                    epoch: e.full_epoch(),
                    open: e.flags & BlockEntry::OPEN != 0,
                })
                .collect(),
        })
    }
}

fn block_id(k: &BlockKey) -> BlockId {
    BlockId {
        nat_ip: Ipv4Addr::from(k.addr),
        index: k.index,
    }
}

/// The open list of `ip` from the table `entries`: its OPEN blocks, most live mappings first
/// (then by index, for a stable order), at most [`MAX_OPEN_BLOCKS`]; valid until the earliest
/// of theirs. `growing`: the node is getting another block, until the given fence (which is
/// then the list's valid-until when no block is open; else 0).
pub fn open_list(
    ip: Ipv4Addr,
    entries: &[(BlockKey, BlockEntry)],
    live: &BTreeMap<BlockId, u32>,
    growing: Option<Nanos>,
) -> OpenBlocks {
    let mut open: Vec<(u32, u16, u64)> = entries
        .iter()
        .filter(|(k, e)| k.addr == ip.octets() && e.flags & BlockEntry::OPEN != 0)
        .map(|(k, e)| {
            let id = BlockId {
                nat_ip: ip,
                index: k.index,
            };
            (
                live.get(&id).copied().unwrap_or(0),
                k.index,
                e.valid_until_ns,
            )
        })
        .collect();
    open.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    open.truncate(MAX_OPEN_BLOCKS);
    let mut list = OpenBlocks {
        count: open.len() as u32,
        valid_until_ns: open.iter().map(|o| o.2).min().or(growing).unwrap_or(0),
        flags: if growing.is_some() {
            OpenBlocks::GROWING
        } else {
            0
        },
        ..OpenBlocks::default()
    };
    for (slot, o) in list.blocks.iter_mut().zip(&open) {
        *slot = o.1;
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ports::PortRange;

    fn geo() -> Geometry {
        Geometry::new(
            PortRange {
                lo: 40000,
                hi: 40511,
            },
            64,
            vec![],
            vec![Ipv4Addr::new(198, 51, 100, 1)],
        )
        .unwrap()
    }

    #[test]
    fn the_kernel_layout_cuts_blocks_as_the_geometry_does() {
        for (lo, hi, bs) in [
            (40000, 40511, 64),
            (1024, 65535, 8),
            (40000, 40100, 64),
            (1, 65535, 4096),
        ] {
            let g = Geometry::new(
                PortRange { lo, hi },
                bs,
                vec![],
                vec![Ipv4Addr::new(198, 51, 100, 1)],
            )
            .unwrap();
            let l = layout(&g);
            assert_eq!(l.size(), u32::from(bs));
            for port in 0..=u16::MAX {
                assert_eq!(
                    l.block_of(port),
                    g.block_of(port),
                    "{lo}:{hi}/{bs} port {port}"
                );
            }
            for b in 0..g.blocks_per_ip() {
                assert_eq!(l.port(b, 0), *g.ports(b).start());
                assert_eq!(l.port(b, u32::from(bs) - 1), *g.ports(b).end());
            }
        }
        assert_eq!(layout(&geo()).count, 8);
    }

    #[test]
    fn open_lists_put_the_fullest_block_first_and_skip_closed_ones() {
        let ip = Ipv4Addr::new(198, 51, 100, 1);
        let other = Ipv4Addr::new(198, 51, 100, 2);
        let e = |index, open, until| {
            (
                BlockKey::new(ip.octets(), index),
                BlockEntry::new(100 + i64::from(index), open, until),
            )
        };
        let entries = vec![
            e(0, true, 500),
            e(1, false, 500),
            e(2, true, 400),
            e(3, true, 500),
            (
                BlockKey::new(other.octets(), 4),
                BlockEntry::new(1, true, 1),
            ),
        ];
        let mut live = BTreeMap::new();
        live.insert(
            BlockId {
                nat_ip: ip,
                index: 3,
            },
            40,
        );
        live.insert(
            BlockId {
                nat_ip: ip,
                index: 1,
            },
            90,
        );
        live.insert(
            BlockId {
                nat_ip: ip,
                index: 0,
            },
            5,
        );
        let list = open_list(ip, &entries, &live, None);
        assert_eq!(list.count, 3);
        assert_eq!(&list.blocks[..3], &[3, 0, 2]);
        assert_eq!(list.valid_until_ns, 400);
        let none = open_list(Ipv4Addr::new(198, 51, 100, 9), &entries, &live, None);
        assert_eq!((none.count, none.valid_until_ns), (0, 0));
        assert!(!list.growing() && !none.growing());
        // Growing: flagged; an empty list holds the flag until the fence.
        let list = open_list(ip, &entries, &live, Some(700));
        assert!(list.growing());
        assert_eq!(list.valid_until_ns, 400);
        let none = open_list(Ipv4Addr::new(198, 51, 100, 9), &entries, &live, Some(700));
        assert!(none.growing());
        assert_eq!((none.count, none.valid_until_ns), (0, 700));
    }

    #[test]
    fn a_converted_last_seen_is_never_earlier_than_the_truth() {
        // Seen 2 s before now on the monotonic clock; boot time ran 10 s ahead (a suspend).
        let t = to_boot(98_000_000_000, 100_000_000_000, 110_000_000_000);
        assert_eq!(t, 108_000_000_000 + COARSE_SLACK_NS);
        // Never in the future.
        assert_eq!(to_boot(100, 100, 1000), 1000);
    }
}
