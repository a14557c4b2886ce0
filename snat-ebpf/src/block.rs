//! Cluster mode in the kernel (see `snat_common::block`): the block layout the agent fixes at
//! load time, the fence every packet of a held mapping passes, and the drop of replies to a NAT
//! IP that no mapping of this node explains.
//!
//! The layout lives in read-only globals: the verifier knows their values, so outside cluster
//! mode ([`layout`] is `None`) every branch below is dead code it removes, and the hot paths cost
//! exactly what they cost without cluster mode.

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, Global};
use snat_common::{
    block::{BlockEntry, BlockKey, Fenced, Layout},
    Counter,
};

use crate::maps::{SNAT_BLOCKS, SNAT_OPEN_BLOCKS};

/// Block size as a power of two; 0: not cluster mode.
#[unsafe(no_mangle)]
static SNAT_BLOCK_SHIFT: Global<u32> = Global::new(0);
/// First port of block 0.
#[unsafe(no_mangle)]
static SNAT_BLOCK_BASE: Global<u32> = Global::new(0);
/// Whole blocks per NAT IP.
#[unsafe(no_mangle)]
static SNAT_BLOCK_COUNT: Global<u32> = Global::new(0);

/// The block layout, in cluster mode.
#[inline(always)]
pub fn layout() -> Option<Layout> {
    let shift = SNAT_BLOCK_SHIFT.load();
    if shift == 0 {
        return None;
    }
    Some(Layout {
        shift,
        base: SNAT_BLOCK_BASE.load(),
        count: SNAT_BLOCK_COUNT.load(),
    })
}

/// `CLOCK_BOOTTIME` ns: the agent's clock for valid-until (it keeps counting while the machine
/// is suspended, like the etcd lease does).
#[inline(always)]
pub fn boot_now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The held block of `addr:port`, copied out.
#[inline(always)]
pub fn entry(l: &Layout, addr: [u8; 4], port: [u8; 2]) -> Option<BlockEntry> {
    let index = l.block_of(u16::from_be_bytes(port))?;
    // SAFETY: pointer from a successful lookup, copied out at once (the agent replaces entries
    // whole, so the copy is one version of it).
    SNAT_BLOCKS
        .get_ptr(BlockKey::new(addr, index))
        .map(|p| unsafe { *p })
}

/// Whether a packet of a mapping on `addr:port` made under block epoch `epoch` may be
/// translated now.
#[inline(always)]
pub fn fence(l: &Layout, addr: [u8; 4], port: [u8; 2], epoch: u32) -> Result<(), Fenced> {
    entry(l, addr, port)
        .ok_or(Fenced::Gone)?
        .check(epoch, boot_now())
}

/// [`fence`] for egress, as the packet's result.
#[inline(always)]
pub fn fence_egress(addr: [u8; 4], port: [u8; 2], epoch: u32) -> Result<(), Counter> {
    let Some(l) = layout() else { return Ok(()) };
    fence(&l, addr, port, epoch).map_err(|f| match f {
        Fenced::Gone => Counter::EgressDropBlockGone,
        Fenced::Suspended => Counter::EgressDropBlockSuspended,
    })
}

/// [`fence`] for ingress (`None`: the forward half is gone, so the mapping is too).
#[inline(always)]
pub fn fence_ingress(
    l: &Layout,
    addr: [u8; 4],
    port: [u8; 2],
    epoch: Option<u32>,
) -> Result<(), Counter> {
    let f = match epoch {
        Some(epoch) => fence(l, addr, port, epoch),
        None => Err(Fenced::Gone),
    };
    f.map_err(|f| match f {
        Fenced::Gone => Counter::IngressDropBlockGone,
        Fenced::Suspended => Counter::IngressDropBlockSuspended,
    })
}

/// The result of a reply to `addr:port` without a mapping: in cluster mode, one to a NAT IP
/// inside the port range is dropped (another node may own the port now); the rest pass.
#[inline(always)]
pub fn no_mapping(addr: [u8; 4], port: [u8; 2]) -> Result<Counter, Counter> {
    if let Some(l) = layout() {
        if l.block_of(u16::from_be_bytes(port)).is_some()
            && SNAT_OPEN_BLOCKS.get_ptr(addr).is_some()
        {
            return Err(Counter::IngressDropNotOurs);
        }
    }
    Ok(Counter::IngressPassNoMapping)
}

/// Whether the agent is getting this node another block on NAT IP `addr` (see
/// [`snat_common::block::OpenBlocks::GROWING`]). The flag lapses at the list's valid-until, so
/// the flag of an agent that died stops holding flows back when its blocks stop translating.
#[inline(always)]
pub fn growing(addr: [u8; 4]) -> bool {
    // SAFETY: pointer from a successful lookup; the agent replaces values whole.
    SNAT_OPEN_BLOCKS
        .get_ptr(addr)
        .is_some_and(|p| unsafe { (*p).growing() && boot_now() < (*p).valid_until_ns })
}
