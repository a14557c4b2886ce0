//! Cluster mode's port blocks as the datapath sees them: the block table the agent writes
//! (`SNAT_BLOCKS`), the per-NAT-IP list of blocks open to new mappings (`SNAT_OPEN_BLOCKS`),
//! the lease they are held under (`SNAT_BLOCK_LEASE`), and the block maths both sides share.
//!
//! Invariants:
//! - Block `i` of a NAT IP covers ports `base + i·2^shift ..= base + (i+1)·2^shift − 1`, for
//!   `i < count`; ports after the last whole block belong to none (the same cut as the agent's
//!   `cluster::geometry`, which a host test checks against [`Layout`]).
//! - [`Layout`] is fixed when the programs load (read-only globals, `shift` 0 = not cluster
//!   mode): the verifier knows it, so outside cluster mode every block check is dead code it
//!   removes, and the programs cost what they cost without it.
//! - A mapping carries the epoch of its block's claim (`Mapping::block_epoch`): a packet of it is
//!   translated only while `SNAT_BLOCKS` holds its block with that epoch and `now <
//!   valid_until_ns` (`CLOCK_BOOTTIME`, `bpf_ktime_get_boot_ns`). A re-claimed block has a new
//!   epoch, so it never revives old mappings.
//! - New mappings take ports only in the blocks listed in `SNAT_OPEN_BLOCKS` (fullest first: the
//!   agent's order, so blocks empty and can go back), and only once the claimed port's entry in
//!   `SNAT_BLOCKS` is OPEN and valid; the list is a hint that a torn read can only make fail.

use bytemuck::{Pod, Zeroable};

/// Hash [`BlockKey`] → [`BlockEntry`]: the blocks this node holds (pinned).
pub const MAP_BLOCKS: &str = "SNAT_BLOCKS";
/// Hash NAT IP (network order) → [`OpenBlocks`]: where new mappings go on each NAT IP (pinned).
/// Every NAT IP of the cluster has an entry in cluster mode, open blocks or not: ingress uses it
/// to tell the NAT IPs from the node's other addresses.
pub const MAP_OPEN_BLOCKS: &str = "SNAT_OPEN_BLOCKS";
/// Array\[1\] of [`LeaseRecord`]: the lease the blocks are held under (pinned).
pub const MAP_BLOCK_LEASE: &str = "SNAT_BLOCK_LEASE";

/// Names of the programs' read-only globals that make up the [`Layout`].
pub const GLOBAL_BLOCK_SHIFT: &str = "SNAT_BLOCK_SHIFT";
pub const GLOBAL_BLOCK_BASE: &str = "SNAT_BLOCK_BASE";
pub const GLOBAL_BLOCK_COUNT: &str = "SNAT_BLOCK_COUNT";

/// Entries of `SNAT_BLOCKS`: blocks held at once, over all NAT IPs.
pub const MAX_HELD_BLOCKS: u32 = 65_536;
/// Open blocks listed per NAT IP (the allocator walks at most this many; a node with more
/// open blocks on one NAT IP uses the first ones).
pub const MAX_OPEN_BLOCKS: usize = 1024;

/// A block: the NAT IP (network order) and the block's index in the range (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BlockKey {
    pub addr: [u8; 4],
    pub index: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<BlockKey>() == 8);

impl BlockKey {
    #[inline(always)]
    pub const fn new(addr: [u8; 4], index: u16) -> Self {
        Self {
            addr,
            index,
            _pad: 0,
        }
    }
}

/// A held block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockEntry {
    /// `CLOCK_BOOTTIME` ns until which its packets are translated (the fence).
    pub valid_until_ns: u64,
    /// The claim's epoch (its etcd create revision): the low 32 bits, which mappings carry.
    pub epoch: u32,
    /// [`BlockEntry::OPEN`].
    pub flags: u16,
    /// Bits 32..48 of the epoch, for the agent's restart (the programs never read them).
    pub epoch_hi: u16,
}
const _: () = assert!(size_of::<BlockEntry>() == 16);

impl BlockEntry {
    /// New mappings may take ports in the block.
    pub const OPEN: u16 = 1;

    /// An entry for the claim `epoch` (an etcd revision: below 2^48).
    pub const fn new(epoch: i64, open: bool, valid_until_ns: u64) -> Self {
        Self {
            valid_until_ns,
            epoch: epoch as u32,
            flags: if open { Self::OPEN } else { 0 },
            epoch_hi: (epoch >> 32) as u16,
        }
    }

    /// The claim's whole epoch.
    pub const fn full_epoch(&self) -> i64 {
        ((self.epoch_hi as i64) << 32) | self.epoch as i64
    }

    /// Whether a packet of a mapping with `epoch` in this block may pass at `now` (boot time).
    #[inline(always)]
    pub const fn check(&self, epoch: u32, now: u64) -> Result<(), Fenced> {
        if self.epoch != epoch {
            Err(Fenced::Gone)
        } else if now >= self.valid_until_ns {
            Err(Fenced::Suspended)
        } else {
            Ok(())
        }
    }

    /// Whether a new mapping may take a port of the block at `now`.
    #[inline(always)]
    pub const fn open_at(&self, now: u64) -> bool {
        self.flags & Self::OPEN != 0 && now < self.valid_until_ns
    }
}

/// Why a packet of a held mapping is not translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// Its block is not held, or held under another claim: the mapping is void.
    Gone,
    /// Its block is past its valid-until: dropped until the agent extends it.
    Suspended,
}

/// The blocks of one NAT IP open to new mappings, in the order the allocator tries them (the
/// agent puts the fullest first), the earliest valid-until among them, and whether the node can
/// still get another block on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct OpenBlocks {
    pub valid_until_ns: u64,
    /// Blocks listed (`blocks[..count]`), at most [`MAX_OPEN_BLOCKS`].
    pub count: u32,
    /// [`OpenBlocks::GROWING`].
    pub flags: u32,
    pub blocks: [u16; MAX_OPEN_BLOCKS],
}
const _: () = assert!(size_of::<OpenBlocks>() == 16 + 2 * MAX_OPEN_BLOCKS);

impl Default for OpenBlocks {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl OpenBlocks {
    /// The node is below its cap on the NAT IP and a block is free or on its way (the agent's
    /// view): a flow that finds no port is held back (its packet dropped, a SYN retransmitted a
    /// second later finds the new block) instead of refused with a RST or an ICMP error.
    pub const GROWING: u32 = 1;

    #[inline(always)]
    pub const fn growing(&self) -> bool {
        self.flags & Self::GROWING != 0
    }

    /// Blocks listed, capped (a torn or bad count never reads past the array).
    #[inline(always)]
    pub const fn len(&self) -> u32 {
        if self.count as usize > MAX_OPEN_BLOCKS {
            MAX_OPEN_BLOCKS as u32
        } else {
            self.count
        }
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The lease the blocks are held under, kept with them so a restarted agent finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LeaseRecord {
    pub lease: i64,
    /// 1 when `lease` is set.
    pub set: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<LeaseRecord>() == 16);

/// How ports are cut into blocks; `shift == 0` is not cluster mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Block size as a power of two.
    pub shift: u32,
    /// First port of block 0.
    pub base: u32,
    /// Whole blocks per NAT IP.
    pub count: u32,
}

impl Layout {
    /// Block size.
    #[inline(always)]
    pub const fn size(&self) -> u32 {
        1 << (self.shift & 15)
    }

    /// The block `port` belongs to, if any.
    #[inline(always)]
    pub const fn block_of(&self, port: u16) -> Option<u16> {
        let port = port as u32;
        if port < self.base {
            return None;
        }
        let index = (port - self.base) >> (self.shift & 15);
        if index < self.count {
            Some(index as u16)
        } else {
            None
        }
    }

    /// Port `offset` (taken modulo the block size) of block `index`.
    #[inline(always)]
    pub const fn port(&self, index: u16, offset: u32) -> u16 {
        (self.base + ((index as u32) << (self.shift & 15)) + (offset & (self.size() - 1))) as u16
    }

    /// Step `i` of a walk over the open blocks `open` in their order, starting each block at
    /// offset `rotate` (random: ports stay unpredictable within a block, RFC 6056): the whole
    /// first block, then the whole second, …, so the first free port found is in the earliest
    /// block that has one.
    #[inline(always)]
    pub const fn walk(&self, open: &OpenBlocks, rotate: u32, i: u32) -> u16 {
        let shift = self.shift & 15;
        let slot = (i >> shift) as usize & (MAX_OPEN_BLOCKS - 1);
        self.port(open.blocks[slot], i.wrapping_add(rotate))
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `repr(C)`, `bytemuck::Pod` (no padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::BlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OpenBlocks {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LeaseRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        shift: 6,
        base: 40000,
        count: 8,
    };

    #[test]
    fn blocks_tile_the_range_and_stop_after_the_last_whole_one() {
        assert_eq!(L.block_of(39999), None);
        assert_eq!(L.block_of(40000), Some(0));
        assert_eq!(L.block_of(40063), Some(0));
        assert_eq!(L.block_of(40064), Some(1));
        assert_eq!(L.block_of(40511), Some(7));
        assert_eq!(L.block_of(40512), None);
        assert_eq!(L.block_of(65535), None);
        for b in 0..8u16 {
            for off in [0, 1, 63, 64, 65] {
                assert_eq!(L.block_of(L.port(b, off)), Some(b));
            }
        }
    }

    #[test]
    fn a_walk_covers_each_open_block_in_order_once() {
        let mut open = OpenBlocks::default();
        open.blocks[0] = 5;
        open.blocks[1] = 2;
        open.count = 2;
        let ports: Vec<u16> = (0..128).map(|i| L.walk(&open, 17, i)).collect();
        assert!(ports[..64].iter().all(|&p| L.block_of(p) == Some(5)));
        assert!(ports[64..].iter().all(|&p| L.block_of(p) == Some(2)));
        assert_eq!(ports[0], L.port(5, 17));
        let mut seen = ports.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 128);
    }

    #[test]
    fn an_entry_fences_by_epoch_then_time() {
        let e = BlockEntry::new(7, true, 100);
        assert_eq!(e.check(7, 99), Ok(()));
        assert_eq!(e.check(7, 100), Err(Fenced::Suspended));
        assert_eq!(e.check(6, 50), Err(Fenced::Gone));
        assert!(e.open_at(99) && !e.open_at(100));
        assert!(!BlockEntry { flags: 0, ..e }.open_at(0));
        let big = BlockEntry::new((5 << 32) + 9, false, 0);
        assert_eq!((big.epoch, big.full_epoch()), (9, (5 << 32) + 9));
        let mut o = OpenBlocks {
            count: 5000,
            ..OpenBlocks::default()
        };
        assert_eq!(o.len(), MAX_OPEN_BLOCKS as u32);
        o.count = 3;
        assert_eq!(o.len(), 3);
    }
}
