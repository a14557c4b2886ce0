//! The gateway's maps (see `snat_common::gateway`). They are in the same object as the agent's, so
//! the agent creates them too: declared with one entry (but the counters), they cost it nothing;
//! the gateway sizes them when it loads, and loads the agent's maps at one entry
//! (`snat-user`'s `datapath::gateway`).
//!
//! Concurrency: only the controller writes `SNAT_GW_NAT_IPS` and `SNAT_GW_ROUTES`, by whole-element
//! updates (RCU swaps in a hash map), so a packet sees a route entirely old or entirely new.
//! `SNAT_GW_FRAGS` is written by the program; a lost or evicted entry only makes the later
//! fragments of that datagram orphans (dropped and counted).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use snat_common::{
    flow::FragKey,
    gateway::{GwBlockKey, GwCounter, GwFragValue, GwGeometry, GwRoute},
    Ipv4Octets,
};

#[map]
pub static SNAT_GW_NAT_IPS: HashMap<Ipv4Octets, GwGeometry> = HashMap::with_max_entries(1, 0);

#[map]
pub static SNAT_GW_ROUTES: HashMap<GwBlockKey, GwRoute> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_GW_FRAGS: LruHashMap<FragKey, GwFragValue> = LruHashMap::with_max_entries(1, 0);

#[map]
pub static SNAT_GW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GwCounter::COUNT, 0);

#[map]
pub static SNAT_GW_NODE_PACKETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: GwCounter) {
    if let Some(slot) = SNAT_GW_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: this CPU's slot of a per-CPU array; TC programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one to the packets forwarded to the node in `slot` on this CPU.
#[inline(always)]
pub fn count_node(slot: u32) {
    if let Some(n) = SNAT_GW_NODE_PACKETS.get_ptr_mut(slot) {
        // SAFETY: as in `count`.
        unsafe { *n += 1 };
    }
}
