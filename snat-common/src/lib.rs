//! Types, constants and pure logic shared by snat's kernel side (`snat-ebpf`) and its controller
//! (`snat-user`).
//!
//! Everything that crosses the kernel/userspace boundary lives here: map and program names, the
//! `#[repr(C)]` map keys and values, the counter indices, and the small pieces of arithmetic both
//! sides must agree on (checksum deltas, the TCP phase a mapping is in, the NAT IP an internal
//! address is paired with). The crate is `no_std`; the `user` feature adds the `aya::Pod` impls the
//! controller needs to read and write the maps.
#![cfg_attr(not(test), no_std)]

pub mod block;
pub mod cidr;
pub mod counter;
pub mod csum;
pub mod flow;
pub mod gateway;
pub mod ip6;
pub mod pool;
pub mod tcp;

pub use counter::Counter;
pub use flow::{
    Addr, Config, FlowKey, FlowKey6, FlowKeyOf, Mapping, Mapping6, MappingOf, NatIp, NatIp6,
    NatIpOf, Origin, Origin6, OriginOf, PoolKey, PoolKey6, PoolKeyOf, Proto, ReleaseEntry,
    ReleaseEntry6, ReleaseEntryOf, UseKey, UseKey6, UseKeyOf,
};

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `bytemuck::Pod`.
unsafe impl aya::Pod for StateHeader {}

/// Name of the TC egress program (translates pod → internet).
pub const PROG_EGRESS: &str = "snat_egress";
/// Name of the TC ingress program (translates replies internet → pod).
pub const PROG_INGRESS: &str = "snat_ingress";
/// Name of the XDP program on the uplink (`snat run --ingress xdp`): translates replies before
/// TC, leaving to `snat_ingress` only the frames it marks as not decided (see [`XDP_DONE`]).
pub const PROG_XDP: &str = "snat_xdp";
/// The 4 bytes of XDP metadata `snat_xdp` puts in front of a frame it decided (translated,
/// passed or counted): `snat_ingress` then leaves the frame alone. Any other metadata (or none)
/// means TC decides, as without XDP.
pub const XDP_DONE: u32 = 0x534e_5844;
/// Name of the release program: never attached; the controller runs it with
/// `BPF_PROG_TEST_RUN` on a batch of expired mappings so that removals and use counts change in
/// the kernel, atomically with respect to the datapath.
pub const PROG_RELEASE: &str = "snat_release";

/// Name of the program egress tail-calls for a packet whose flow has no mapping yet: the
/// allocation (slow) path, with a stack frame of its own.
pub const PROG_CREATE: &str = "snat_create";
/// Program array of the programs egress tail-calls; the controller fills it when it loads them.
pub const MAP_PROGRAMS: &str = "SNAT_PROGRAMS";
/// Slot of [`PROG_CREATE`] in [`MAP_PROGRAMS`].
pub const SLOT_CREATE: u32 = 0;
/// Name of the hairpin program (`snat run --hairpin on`): TC ingress on the pods' interfaces, it
/// translates the source of a pod's packet to a NAT IP and port in the range, as egress would,
/// and hands it to [`PROG_HAIRPIN_DELIVER`].
pub const PROG_HAIRPIN: &str = "snat_hairpin";
/// Name of the second half of hairpinning, reached only by a tail call (never attached): the
/// packet, now from a NAT endpoint to a NAT endpoint, is translated as a reply to the mapping
/// that owns its destination and sent to that pod's interface, or dropped.
pub const PROG_HAIRPIN_DELIVER: &str = "snat_hairpin_deliver";
/// Slot of [`PROG_HAIRPIN_DELIVER`] in [`MAP_PROGRAMS`].
pub const SLOT_HAIRPIN_DELIVER: u32 = 1;
/// Name of [`PROG_CREATE`]'s IPv6 twin (its own maps, its own stack frame).
pub const PROG_CREATE6: &str = "snat_create6";
/// Slot of [`PROG_CREATE6`] in [`MAP_PROGRAMS`].
pub const SLOT_CREATE6: u32 = 2;
/// IPv6 egress, in a program (and stack frame) of its own: `snat_egress` tail-calls it for
/// every IPv6 packet.
pub const PROG_EGRESS6: &str = "snat_egress6";
/// Slot of [`PROG_EGRESS6`] in [`MAP_PROGRAMS`].
pub const SLOT_EGRESS6: u32 = 3;
/// IPv6 ingress, likewise tail-called by `snat_ingress`.
pub const PROG_INGRESS6: &str = "snat_ingress6";
/// Slot of [`PROG_INGRESS6`] in [`MAP_PROGRAMS`].
pub const SLOT_INGRESS6: u32 = 4;
/// [`PROG_HAIRPIN`]'s IPv6 half, tail-called by it for every IPv6 packet once NAT66 is on.
pub const PROG_HAIRPIN6: &str = "snat_hairpin6";
/// Slot of [`PROG_HAIRPIN6`] in [`MAP_PROGRAMS`].
pub const SLOT_HAIRPIN6: u32 = 5;
/// [`PROG_HAIRPIN_DELIVER`]'s IPv6 twin (tail-called by `snat_hairpin6` or `snat_create6`).
pub const PROG_HAIRPIN_DELIVER6: &str = "snat_hairpin_deliver6";
/// Slot of [`PROG_HAIRPIN_DELIVER6`] in [`MAP_PROGRAMS`].
pub const SLOT_HAIRPIN_DELIVER6: u32 = 6;
/// The refusal answers for IPv6 (`--on-exhaustion reject`), tail-called by `snat_create6` for
/// a refused flow, so that building the answer gets a stack frame of its own.
pub const PROG_REJECT6: &str = "snat_reject6";
/// Slot of [`PROG_REJECT6`] in [`MAP_PROGRAMS`].
pub const SLOT_REJECT6: u32 = 7;
/// Slots of [`MAP_PROGRAMS`].
pub const PROGRAM_SLOTS: u32 = 8;
/// Name of [`PROG_RELEASE`]'s IPv6 twin (a batch of [`ReleaseEntry6`]).
pub const PROG_RELEASE6: &str = "snat_release6";

/// The IPv6 twins of the IPv4 maps of the same name without the `6`: the same roles, keyed by
/// 16-byte addresses ([`FlowKey6`], [`Mapping6`], [`Origin6`], [`UseKey6`], [`NatIp6`], …).
/// An agent without IPv6 internal networks sizes the big ones to one entry.
pub mod maps6 {
    pub const NAT_IPS: &str = "SNAT_NAT_IPS6";
    pub const INTERNAL: &str = "SNAT_INTERNAL6";
    pub const EXCLUDE: &str = "SNAT_EXCLUDE6";
    pub const FWD: &str = "SNAT_FWD6";
    pub const REV: &str = "SNAT_REV6";
    pub const USE: &str = "SNAT_USE6";
    pub const EXHAUSTED: &str = "SNAT_EXHAUSTED6";
    pub const OVERFLOW: &str = "SNAT_OVERFLOW6";
    pub const REFUSED: &str = "SNAT_REFUSED6";
    pub const SOURCE_REFUSED: &str = "SNAT_SRC_REFUSED6";
    pub const ENDPOINTS: &str = "SNAT_ENDPOINTS6";
    pub const FRAGS: &str = "SNAT_FRAGS6";
    pub const FREE_PORTS: &str = "SNAT_FREE_PORTS6";
    pub const FULL: &str = "SNAT_FULL6";
    pub const HOST_ECHO: &str = "SNAT_HOST_ECHO6";
}

/// Array\[1\] of [`Config`]: which NAT IP set is live.
pub const MAP_CONFIG: &str = "SNAT_CONFIG";
/// Array\[2 × [`MAX_NAT_IPS`]\] of [`NatIp`]: two sets, flipped by [`Config::active`].
pub const MAP_NAT_IPS: &str = "SNAT_NAT_IPS";
/// LPM trie of the internal (pod) CIDRs whose sources are translated.
pub const MAP_INTERNAL: &str = "SNAT_INTERNAL";
/// LPM trie of destinations never translated (always includes the internal CIDRs).
pub const MAP_EXCLUDE: &str = "SNAT_EXCLUDE";
/// Hash [`FlowKey`] (as the pod sent it) → [`Mapping`]: the forward half of every mapping.
pub const MAP_FWD: &str = "SNAT_FWD";
/// Hash [`FlowKey`] (as the reply arrives) → [`Origin`]: the reverse half, and the port claim.
pub const MAP_REV: &str = "SNAT_REV";
/// Per-CPU array of `u64` indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "SNAT_COUNTERS";

/// Per-CPU hash [`PoolKey`] → flows refused for lack of a port (each flow counted once).
pub const MAP_EXHAUSTED: &str = "SNAT_EXHAUSTED";
/// Per-CPU hash [`PoolKey`] (the paired NAT IP and protocol) → flows that got a port on another
/// NAT IP because their paired one had none towards their destination (`--ip-pooling overflow`).
pub const MAP_OVERFLOW: &str = "SNAT_OVERFLOW";
/// NAT IPs a flow tries at most, its paired one included (each further one is a tail call of
/// `snat_create`, of which the kernel allows 33 in a row).
pub const MAX_POOL_TRIES: u32 = 32;

/// LRU hash [`FlowKey`] → when the flow was last refused: counts a refused flow once, not each
/// retransmitted SYN.
pub const MAP_REFUSED: &str = "SNAT_REFUSED";
/// Per-CPU array of `u64`: allocation time histogram (see [`alloc_hist`]).
pub const MAP_ALLOC_NS: &str = "SNAT_ALLOC_NS";

/// Most NAT IPs one agent can use (per set; the map holds two sets).
pub const MAX_NAT_IPS: u32 = 64;
/// Most internal and excluded CIDRs each.
pub const MAX_CIDRS: u32 = 1024;
/// Default number of concurrent mappings the maps are sized for.
pub const DEFAULT_MAX_MAPPINGS: u32 = 1_000_000;

/// Hash [`UseKey`] → `u64`: mappings held per source, destination and pair (see `use_kind`).
pub const MAP_USE: &str = "SNAT_USE";
/// LRU hash internal source address → flows refused to it (any reason, each flow once).
pub const MAP_SOURCE_REFUSED: &str = "SNAT_SRC_REFUSED";
/// Per-CPU array\[1\] of [`RejectWindow`]: the rate limit of RSTs and ICMP errors.
pub const MAP_REJECT_RATE: &str = "SNAT_REJECT_RATE";

/// One CPU's rate-limit window for answering refused flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RejectWindow {
    pub start_ns: u64,
    pub sent: u64,
}

/// Sources remembered by `SNAT_SRC_REFUSED`.
pub const REFUSING_SOURCES: u32 = 4096;

/// LRU hash internal [`flow::Endpoint`] → the NAT endpoint it got last: a new flow from the same
/// internal endpoint tries that NAT port first, which makes mapping endpoint-independent
/// whenever the port is free towards the new destination (RFC 4787 REQ-1, RFC 5382 REQ-1).
pub const MAP_ENDPOINTS: &str = "SNAT_ENDPOINTS";

/// LRU hash [`flow::FragKey`] → [`flow::FragValue`]: the translation of datagrams' later
/// fragments (they carry no ports), keyed per direction by the fragments' own header.
pub const MAP_FRAGS: &str = "SNAT_FRAGS";
/// Fragmented datagrams tracked at once.
pub const MAX_FRAGMENTED: u32 = 16_384;

/// LRU hash destination (a reply [`FlowKey`] with NAT port 0) → free-port index of that hot
/// destination (layout in [`pool::index`]); zero-filled from `SNAT_FREE_ZERO` when built.
pub const MAP_FREE_PORTS: &str = "SNAT_FREE_PORTS";
/// Hot destinations indexed at most (about 65 KiB each).
pub const MAX_HOT_DESTINATIONS: u32 = 256;

/// LRU hash destination (a reply [`FlowKey`] with NAT port 0) → [`FullMark`]: when a search found
/// no free port towards it: new flows to it are refused without searching again until a port of
/// it is released (which deletes the mark), the controller changes the pool
/// ([`Config::generation`]) or [`FULL_RECHECK_NS`] has passed (ports the node's own sockets held
/// may have been freed without snat seeing it).
pub const MAP_FULL: &str = "SNAT_FULL";
/// A destination found full (`SNAT_FULL`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FullMark {
    /// `CLOCK_MONOTONIC_COARSE` ns of the search that found no port.
    pub since_ns: u64,
    /// [`Config::generation`] then.
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FullMark>() == 16);

/// Destinations remembered as full at once (a forgotten one only costs one more search).
pub const MAX_FULL_DESTINATIONS: u32 = 4096;
/// How long a full destination is refused without a search, at most. Only ports the node's own
/// sockets freed wait this long (every release through snat clears the mark at once). A search
/// of a full range walks all of it (milliseconds at 32,768 ports, see docs/benchmarks.md), and
/// at most `--max-mappings` / range destinations can be full at once (about 30 at the
/// defaults): one recheck each per 10 s keeps that cost a small fraction of a core.
pub const FULL_RECHECK_NS: u64 = 10_000_000_000;

/// Whether the time stamp `then` lies less than `span` ns before `now` (both
/// `CLOCK_MONOTONIC_COARSE` ns). Signed: the datapath stamps with each CPU's own reading of the
/// coarse clock, which may be a tick behind another CPU's, so a stamp can lie a little after
/// `now`. That counts as recent, never as long ago (an unsigned difference would wrap).
#[inline(always)]
pub const fn within_ns(now: u64, then: u64, span: u64) -> bool {
    (now.wrapping_sub(then) as i64) < span as i64
}

#[cfg(test)]
mod within_tests {
    use super::within_ns;

    #[test]
    fn a_stamp_from_a_later_tick_is_recent() {
        let tick = 4_000_000;
        assert!(within_ns(10 * tick, 9 * tick, 2 * tick));
        assert!(!within_ns(10 * tick, 8 * tick, 2 * tick));
        assert!(!within_ns(10 * tick, 7 * tick, 2 * tick));
        // `then` a tick after `now`: recent, not 2^64 − 4 ms ago.
        assert!(within_ns(10 * tick, 11 * tick, 2 * tick));
        assert!(within_ns(0, tick, 1));
        // Across the wrap of the counter.
        assert!(within_ns(5, u64::MAX - 5, 20));
    }
}

/// LRU hash (ICMP, remote, 0, node address, identifier) — the reply key of the node's own echo
/// requests — → `CLOCK_MONOTONIC_COARSE` ns of the latest: identifiers the node's ping sockets use
/// towards a remote, which pods are not given on that NAT IP ([`HOST_ECHO_HOLD_NS`]).
pub const MAP_HOST_ECHO: &str = "SNAT_HOST_ECHO";
/// Node echo flows remembered at once.
pub const MAX_HOST_ECHOES: u32 = 4096;
/// An identifier the node pinged with is kept from pods this long after its last echo request.
pub const HOST_ECHO_HOLD_NS: u64 = 60_000_000_000;

/// Per-CPU array\[1\] of `u64`: packets the stop guard (`snat_guard`) dropped. Pinned by a stopping
/// agent with the guard, read and removed by the next one.
pub const MAP_GUARD_DROPS: &str = "SNAT_GUARD_DROPS";
/// Name of the stop guard: the egress program a stopped agent leaves on the uplink, which drops
/// (and counts) every packet from an internal CIDR to a destination that is not excluded.
pub const PROG_GUARD: &str = "snat_guard";

/// Array\[1\] of [`StateHeader`]: identifies pinned state (format version, sizes).
pub const MAP_STATE: &str = "SNAT_STATE";

/// Ring buffer of forward keys ([`FlowKey`]) whose expiry may have come closer: a new mapping,
/// or a TCP SYN, FIN, RST or reopen, or a UDP mapping's second remote port. The controller reads
/// it every `--gc-interval` and looks at those mappings only, instead of walking every mapping
/// (`Counter::ExpiryEventsLost` counts what did not fit; it then walks them all once). Not
/// pinned: each agent has its own.
pub const MAP_EXPIRY_EVENTS: &str = "SNAT_EXPIRY_EVENTS";

/// The maps pinned under `--pin-dir` so that mappings (both families') survive an agent restart.
/// The block table, the open lists and the lease (cluster mode) are pinned with them: a restarted
/// agent reads the blocks and the lease it held from them.
pub const PINNED_MAPS: [&str; 10] = [
    MAP_FWD,
    MAP_REV,
    MAP_USE,
    maps6::FWD,
    maps6::REV,
    maps6::USE,
    MAP_STATE,
    block::MAP_BLOCKS,
    block::MAP_OPEN_BLOCKS,
    block::MAP_BLOCK_LEASE,
];

/// `StateHeader::magic`: "SNAT".
pub const STATE_MAGIC: u32 = 0x534e_4154;
/// Version of the pinned state's layout and meaning. Bump it whenever a pinned map's key or value
/// changes in size or meaning: a new agent then refuses old state instead of misreading it.
pub const STATE_VERSION: u32 = 5;

/// What the agent records about the state it pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StateHeader {
    pub magic: u32,
    pub version: u32,
    /// Size of the IPv4 mapping tables.
    pub max_mappings: u32,
    /// Length of `reserved_before`.
    pub reserved_len: u32,
    /// `net.ipv4.ip_local_reserved_ports` as the first agent found it (restored at the end).
    pub reserved_before: [u8; 256],
    /// Size of the IPv6 mapping tables (1: the agent had no IPv6 internal networks).
    pub max_mappings6: u32,
}
const _: () = assert!(size_of::<StateHeader>() == 276);

/// Refused flows remembered by `SNAT_REFUSED`.
pub const REFUSED_FLOWS: u32 = 16_384;
/// A flow refused again within this window is the same refusal (SYN retransmissions, repeated
/// datagrams), not a new one.
pub const REFUSAL_WINDOW_NS: u64 = 60_000_000_000;

/// Layout of `SNAT_ALLOC_NS`: a log2 histogram of how long new mappings took to allocate.
pub mod alloc_hist {
    /// Buckets `0..BUCKETS`: bucket `i > 0` counts allocations of `2^(i-1)..2^i` ns (bucket 0:
    /// 0 ns); the last bucket also takes everything longer.
    pub const BUCKETS: u32 = 24;
    /// Index of the sum of all allocation times (ns).
    pub const SUM: u32 = BUCKETS;
    /// Index of the number of allocations timed.
    pub const COUNT: u32 = BUCKETS + 1;
    /// Size of the map.
    pub const LEN: u32 = BUCKETS + 2;

    /// The bucket of a duration of `ns` nanoseconds: its bit length, capped. Loop-free, so the
    /// verifier takes it as it is.
    #[inline(always)]
    pub const fn bucket(ns: u64) -> u32 {
        let mut v = ns;
        let mut bits = 0;
        if v >= 1 << 32 {
            v >>= 32;
            bits += 32;
        }
        if v >= 1 << 16 {
            v >>= 16;
            bits += 16;
        }
        if v >= 1 << 8 {
            v >>= 8;
            bits += 8;
        }
        if v >= 1 << 4 {
            v >>= 4;
            bits += 4;
        }
        if v >= 1 << 2 {
            v >>= 2;
            bits += 2;
        }
        if v >= 1 << 1 {
            v >>= 1;
            bits += 1;
        }
        bits += v as u32;
        if bits >= BUCKETS {
            BUCKETS - 1
        } else {
            bits
        }
    }

    /// Upper bound (ns, inclusive) of bucket `i`'s values, for exposition.
    pub const fn upper_ns(i: u32) -> u64 {
        (1u64 << i) - 1
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn buckets_are_bit_lengths() {
            assert_eq!(bucket(0), 0);
            assert_eq!(bucket(1), 1);
            assert_eq!(bucket(2), 2);
            assert_eq!(bucket(3), 2);
            assert_eq!(bucket(4), 3);
            assert_eq!(bucket(255), 8);
            assert_eq!(bucket(256), 9);
            assert_eq!(bucket(u64::MAX), BUCKETS - 1);
            for i in 0..BUCKETS - 1 {
                assert_eq!(bucket(upper_ns(i)), i, "{i}");
                assert_eq!(bucket(upper_ns(i) + 1), i + 1, "{i}");
            }
        }
    }
}

/// Key of the internal and excluded LPM tries: an IPv4 address in network byte order.
pub type Ipv4Octets = [u8; 4];
