//! The maps both programs share. Sizes here are defaults; the controller sets the real ones at
//! load time (`SNAT_FWD`/`SNAT_REV` from `--max-mappings`).
//!
//! Concurrency: `SNAT_FWD` and `SNAT_REV` are preallocated hash maps, so an entry deleted by the
//! controller while a program holds a pointer to it may be reused by another insert. Programs copy
//! a value out right after lookup, and only write back small monotonic fields (`last_seen_ns`,
//! `tcp_seen`) whose worst case under such a race is a mapping refreshed once too often. The
//! controller only deletes mappings idle for at least their timeout, which keeps that window empty
//! in practice.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, PerCpuArray},
};
use snat_common::{
    Config, Counter, FlowKey, Ipv4Octets, Mapping, NatIp, Origin, DEFAULT_MAX_MAPPINGS, MAX_CIDRS,
    MAX_NAT_IPS,
};

#[map]
pub static SNAT_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static SNAT_NAT_IPS: Array<NatIp> = Array::with_max_entries(2 * MAX_NAT_IPS, 0);

#[map]
pub static SNAT_INTERNAL: LpmTrie<Ipv4Octets, u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_EXCLUDE: LpmTrie<Ipv4Octets, u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_FWD: HashMap<FlowKey, Mapping> = HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

#[map]
pub static SNAT_REV: HashMap<FlowKey, Origin> = HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, 0);

#[map]
pub static SNAT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = SNAT_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, and programs do not nest on one CPU for TC hooks.
        unsafe { *slot += 1 };
    }
}
