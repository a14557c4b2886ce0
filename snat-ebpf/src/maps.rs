//! Every map of the datapath is declared here, and only here (one rule: a map is a `static` in
//! this module, named as in `snat_common`). Sizes are defaults; the controller sets the real ones
//! at load time (`SNAT_FWD`/`SNAT_REV` from `--max-mappings`).
//!
//! Concurrency: `SNAT_FWD` and `SNAT_REV` are preallocated hash maps, so the kernel hands an
//! element deleted on one CPU to the next insert at once, even while another CPU still holds a
//! pointer to it. How the programs read and refresh them safely is in `mapping`.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{
        lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray,
        RingBuf,
    },
};
use snat_common::{
    alloc_hist,
    block::{BlockEntry, BlockKey, LeaseRecord, OpenBlocks, MAX_HELD_BLOCKS},
    flow::{
        use_count, Endpoint, Endpoint6, FragKey, FragKey6, FragValue, FragValue6, FRAG_TIMEOUT_NS,
    },
    within_ns, Config, Counter, FlowKey, FlowKey6, FlowKeyOf, FullMark, Ipv4Octets, Mapping,
    Mapping6, NatIp, NatIp6, Origin, Origin6, PoolKey, PoolKey6, PoolKeyOf, RejectWindow,
    StateHeader, UseKey, UseKey6, UseKeyOf, DEFAULT_MAX_MAPPINGS, MAX_CIDRS, MAX_FRAGMENTED,
    MAX_FULL_DESTINATIONS, MAX_HOST_ECHOES, MAX_HOT_DESTINATIONS, MAX_NAT_IPS, PROGRAM_SLOTS,
    REFUSAL_WINDOW_NS, REFUSED_FLOWS, REFUSING_SOURCES,
};

use crate::{alloc::ScanState, clock::Reading, create::Pending, family::Family, index::FreePorts};

/// Default size of the big IPv6 maps: the controller sizes them from `--max-mappings` when
/// IPv6 is configured, and to one entry when not.
const V6_DEFAULT: u32 = 1024;

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
pub static SNAT_NAT_IPS6: Array<NatIp6> = Array::with_max_entries(2 * MAX_NAT_IPS, 0);

#[map]
pub static SNAT_INTERNAL6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_EXCLUDE6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_FWD6: HashMap<FlowKey6, Mapping6> = HashMap::with_max_entries(V6_DEFAULT, 0);

#[map]
pub static SNAT_REV6: HashMap<FlowKey6, Origin6> = HashMap::with_max_entries(V6_DEFAULT, 0);

#[map]
pub static SNAT_USE6: HashMap<UseKey6, u64> =
    HashMap::with_max_entries(V6_DEFAULT, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_EXHAUSTED6: PerCpuHashMap<PoolKey6, u64> =
    PerCpuHashMap::with_max_entries(2 * MAX_NAT_IPS * 3, 0);

#[map]
pub static SNAT_OVERFLOW6: PerCpuHashMap<PoolKey6, u64> =
    PerCpuHashMap::with_max_entries(2 * MAX_NAT_IPS * 3, 0);

#[map]
pub static SNAT_REFUSED6: LruHashMap<FlowKey6, u64> =
    LruHashMap::with_max_entries(REFUSED_FLOWS, 0);

#[map]
pub static SNAT_SRC_REFUSED6: LruHashMap<[u8; 16], u64> =
    LruHashMap::with_max_entries(REFUSING_SOURCES, 0);

#[map]
pub static SNAT_ENDPOINTS6: LruHashMap<Endpoint6, Endpoint6> =
    LruHashMap::with_max_entries(V6_DEFAULT, 0);

#[map]
pub static SNAT_FRAGS6: LruHashMap<FragKey6, FragValue6> =
    LruHashMap::with_max_entries(MAX_FRAGMENTED, 0);

#[map]
pub static SNAT_SCAN6: PerCpuArray<ScanState<[u8; 16]>> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SNAT_FREE_PORTS6: LruHashMap<FlowKey6, FreePorts> = LruHashMap::with_max_entries(1, 0);

#[map]
pub static SNAT_FULL6: LruHashMap<FlowKey6, FullMark> =
    LruHashMap::with_max_entries(MAX_FULL_DESTINATIONS, 0);

#[map]
pub static SNAT_HOST_ECHO6: LruHashMap<FlowKey6, u64> =
    LruHashMap::with_max_entries(MAX_HOST_ECHOES, 0);

#[map]
pub static SNAT_PENDING6: PerCpuArray<Pending<[u8; 16]>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's IPv6 header being translated (`packet6::Ipv6`).
#[map]
pub static SNAT_HEADER6: PerCpuArray<crate::packet6::Ipv6> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's ICMPv6 error being translated (`packet6::Inner6`: too big for the stack).
#[map]
pub static SNAT_QUOTE6: PerCpuArray<crate::packet6::Inner6> = PerCpuArray::with_max_entries(1, 0);

/// Remembers how the first fragment of an IPv6 datagram was translated (`addr`).
#[inline(always)]
pub fn remember_fragments6(key: &FragKey6, addr: [u8; 16], now: u64) {
    let _ = SNAT_FRAGS6.insert(key, FragValue6 { addr, seen_ns: now }, 0);
}

/// How the first fragment of this IPv6 datagram was translated, if it passed recently.
#[inline(always)]
pub fn fragments_of6(key: &FragKey6, now: u64) -> Option<[u8; 16]> {
    // SAFETY: pointer from a successful lookup, copied out at once.
    let v = unsafe { *SNAT_FRAGS6.get_ptr(key)? };
    (now.wrapping_sub(v.seen_ns) < FRAG_TIMEOUT_NS).then_some(v.addr)
}

/// Cluster mode: the blocks this node holds (see `crate::block`); written by the agent only.
#[map]
pub static SNAT_BLOCKS: HashMap<BlockKey, BlockEntry> =
    HashMap::with_max_entries(MAX_HELD_BLOCKS, 0);

/// Cluster mode: per NAT IP, the blocks new mappings go to, fullest first; written by the agent.
#[map]
pub static SNAT_OPEN_BLOCKS: HashMap<Ipv4Octets, OpenBlocks> =
    HashMap::with_max_entries(2 * MAX_NAT_IPS, 0);

/// Cluster mode: the lease the blocks are held under (the agent's; the programs never read it).
#[map]
pub static SNAT_BLOCK_LEASE: Array<LeaseRecord> = Array::with_max_entries(1, 0);

/// Sized by the controller from `--max-mappings` (a power of two of pages).
#[map]
pub static SNAT_EXPIRY_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Tells the controller that the expiry of the mapping with forward key `fwd` may have come
/// closer (see `snat_common::MAP_EXPIRY_EVENTS`). The controller reads the ring on its own
/// schedule: no wake-up. The record's size tells the family (16 bytes: IPv4, 40: IPv6).
#[inline(always)]
pub fn expiry_event<A: Family>(fwd: &FlowKeyOf<A>) {
    if SNAT_EXPIRY_EVENTS
        .output::<FlowKeyOf<A>>(fwd, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(Counter::ExpiryEventsLost);
    }
}

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

#[map]
pub static SNAT_EXHAUSTED: PerCpuHashMap<PoolKey, u64> =
    PerCpuHashMap::with_max_entries(2 * MAX_NAT_IPS * 3, 0);

#[map]
pub static SNAT_OVERFLOW: PerCpuHashMap<PoolKey, u64> =
    PerCpuHashMap::with_max_entries(2 * MAX_NAT_IPS * 3, 0);

#[map]
pub static SNAT_REFUSED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(REFUSED_FLOWS, 0);

#[map]
pub static SNAT_ALLOC_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(alloc_hist::LEN, 0);

/// Sized by the controller (half the mapping table by default): losing an entry only loses
/// the preference for the endpoint's previous NAT port.
#[map]
pub static SNAT_ENDPOINTS: LruHashMap<Endpoint, Endpoint> =
    LruHashMap::with_max_entries(DEFAULT_MAX_MAPPINGS / 2, 0);

#[map]
pub static SNAT_FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(MAX_FRAGMENTED, 0);

/// Remembers how the first fragment of a datagram was translated (`addr`).
#[inline(always)]
pub fn remember_fragments(key: &FragKey, addr: [u8; 4], now: u64) {
    let _ = SNAT_FRAGS.insert(
        key,
        FragValue {
            addr,
            _pad: 0,
            seen_ns: now,
        },
        0,
    );
}

/// How the first fragment of this datagram was translated, if it passed recently.
#[inline(always)]
pub fn fragments_of(key: &FragKey, now: u64) -> Option<[u8; 4]> {
    // SAFETY: pointer from a successful lookup, copied out at once.
    let v = unsafe { *SNAT_FRAGS.get_ptr(key)? };
    (now.wrapping_sub(v.seen_ns) < FRAG_TIMEOUT_NS).then_some(v.addr)
}

/// Written by the controller only; pinned with the mappings so a later agent can tell whether it
/// can read them.
#[map]
pub static SNAT_STATE: Array<StateHeader> = Array::with_max_entries(1, 0);

#[map]
pub static SNAT_USE: HashMap<UseKey, u64> =
    HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, BPF_F_NO_PREALLOC);

#[map]
pub static SNAT_SRC_REFUSED: LruHashMap<Ipv4Octets, u64> =
    LruHashMap::with_max_entries(REFUSING_SOURCES, 0);

#[map]
pub static SNAT_REJECT_RATE: PerCpuArray<RejectWindow> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's state of the port search in `alloc` (the stack is nearly full at that depth; a TC
/// program runs to completion on its CPU, so one slot per CPU suffices).
#[map]
pub static SNAT_SCAN: PerCpuArray<ScanState<[u8; 4]>> = PerCpuArray::with_max_entries(1, 0);

/// Sized by the controller (`pool::index::capacity`).
#[map]
pub static SNAT_FREE_PORTS: LruHashMap<FlowKey, FreePorts> =
    LruHashMap::with_max_entries(MAX_HOT_DESTINATIONS, 0);

/// Never written: the zeroes a new index starts from (a program's stack cannot hold one).
#[map]
pub static SNAT_FREE_ZERO: Array<FreePorts> = Array::with_max_entries(1, 0);

#[map]
pub static SNAT_FULL: LruHashMap<FlowKey, FullMark> =
    LruHashMap::with_max_entries(MAX_FULL_DESTINATIONS, 0);

#[map]
pub static SNAT_HOST_ECHO: LruHashMap<FlowKey, u64> =
    LruHashMap::with_max_entries(MAX_HOST_ECHOES, 0);

#[map]
pub static SNAT_GUARD_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The programs reached by tail calls, filled by the controller at the slots `snat_common`
/// names (`SLOT_CREATE`: `snat_create`, `SLOT_HAIRPIN_DELIVER`: `snat_hairpin_deliver`, ...).
#[map]
pub static SNAT_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAM_SLOTS, 0);

/// The packet egress hands to `snat_create` with its tail call (on the same CPU, which a TC
/// program does not leave before the tail call runs).
#[map]
pub static SNAT_PENDING: PerCpuArray<Pending<[u8; 4]>> = PerCpuArray::with_max_entries(1, 0);

/// One word per CPU that a refreshing packet adds to atomically: the `lock`ed add is the full
/// barrier between its time stamp store and its read of the mapping's `release` (see `mapping`).
/// On a CPU-local line, so it costs no cache-line transfer and no bytes per mapping.
#[map]
pub static SNAT_FENCE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's last reading of the coarse clock, for mapping stamps (see `clock`).
#[map]
pub static SNAT_CLOCK: PerCpuArray<Reading> = PerCpuArray::with_max_entries(1, 0);

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to `*p` atomically.
#[inline(always)]
pub fn atomic_add(p: *mut u64, delta: u64) {
    // SAFETY: `p` points into a live map value; the atomic add (BPF_XADD, result unused) is
    // safe against concurrent adds from other CPUs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, delta,
        );
    }
}

/// Adds `delta` (wrapping) to the 32-bit `*p` atomically. On x86-64 the JIT emits a `lock`ed
/// add, which also orders every load after it behind every store before it (see `mapping`).
#[inline(always)]
pub fn atomic_add32(p: *mut u32, delta: u32) {
    // SAFETY: as in `atomic_add`.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, delta,
        );
    }
}

/// The count of `key` in `SNAT_USE` (0 if absent).
#[inline(always)]
pub fn use_of<A: Family>(key: &UseKeyOf<A>) -> u64 {
    // SAFETY: pointer from a successful lookup, read at once.
    A::uses()
        .get_ptr(key)
        .map_or(0, |p| use_count(unsafe { *p }))
}

/// Adds one to each count of a new mapping, creating missing counts.
#[inline(always)]
pub fn use_add<A: Family>(keys: &[UseKeyOf<A>; 3]) {
    let uses = A::uses();
    for key in keys {
        match uses.get_ptr_mut(key) {
            Some(p) => atomic_add(p, 1),
            None => {
                if uses.insert(key, 1, u64::from(BPF_NOEXIST)).is_err() {
                    // Another CPU created it first (or the map is full: then the count is lost
                    // and only makes caps less strict).
                    if let Some(p) = uses.get_ptr_mut(key) {
                        atomic_add(p, 1);
                    }
                }
            }
        }
    }
}

/// Subtracts one from each count of a released mapping.
#[inline(always)]
pub fn use_sub<A: Family>(keys: &[UseKeyOf<A>; 3]) {
    for key in keys {
        if let Some(p) = A::uses().get_ptr_mut(key) {
            atomic_add(p, u64::MAX);
        }
    }
}

/// Records that the flow `key` was refused a port on `nat`: counted once per flow (a SYN
/// retransmitted or a datagram repeated within `REFUSAL_WINDOW_NS` is the same refusal) per
/// internal source and, when no port was left (`exhausted`, not a cap or fair share), per NAT
/// IP and protocol.
#[inline(always)]
pub fn count_refusal<A: Family>(key: &FlowKeyOf<A>, nat: A, now: u64, exhausted: bool) {
    let fresh = match A::refused().get_ptr_mut(key) {
        Some(p) => {
            // SAFETY: pointer from a successful lookup; a torn read only misjudges freshness.
            let last = unsafe { &mut *p };
            let fresh = !within_ns(now, *last, REFUSAL_WINDOW_NS);
            *last = now;
            fresh
        }
        None => {
            let _ = A::refused().insert(key, now, 0);
            true
        }
    };
    if !fresh {
        return;
    }
    match A::src_refused().get_ptr_mut(key.src_addr) {
        Some(p) => atomic_add(p, 1),
        None => {
            let _ = A::src_refused().insert(key.src_addr, 1, 0);
        }
    }
    if !exhausted {
        return;
    }
    count_in_pool(A::exhausted(), nat, key.proto);
}

/// Adds one to this CPU's count of the pool (`nat`, `proto`) in `map`, creating it.
#[inline(always)]
pub fn count_in_pool<A: Family>(map: &PerCpuHashMap<PoolKeyOf<A>, u64>, nat: A, proto: u8) {
    let pool = PoolKeyOf::new(nat, proto);
    for _ in 0..2 {
        if let Some(n) = map.get_ptr_mut(pool) {
            // SAFETY: this CPU's slot of a per-CPU value.
            unsafe { *n += 1 };
            return;
        }
        // The pool's first count: create it (another CPU may win the race: look again).
        if map.insert(pool, 1, u64::from(BPF_NOEXIST)).is_ok() {
            return;
        }
    }
}

/// Adds one allocation that took `ns` nanoseconds to the histogram.
#[inline(always)]
pub fn time_allocation(ns: u64) {
    for (index, add) in [
        (alloc_hist::bucket(ns), 1),
        (alloc_hist::SUM, ns),
        (alloc_hist::COUNT, 1),
    ] {
        if let Some(slot) = SNAT_ALLOC_NS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot.
            unsafe { *slot += add };
        }
    }
}
