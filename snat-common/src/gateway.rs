//! The gateway's datapath ABI (`snat_gateway`, issue 14 "Return path"): the maps by which the box
//! that receives the NAT IPs' traffic forwards each reply to the node holding its port's block,
//! the counters it keeps, and the block arithmetic both sides must agree on.
//!
//! Invariants (as for every map type of the crate):
//! - `#[repr(C)]`, byte arrays and fixed-width integers with explicit padding, a `const` size
//!   assertion per type; addresses and ports in network byte order, read through accessors.
//! - A route is replaced whole (a hash map update swaps the element under RCU), so the program
//!   never sees half of an old route and half of a new one.
//! - The object declares the gateway's maps with one entry (a node's agent loads them too, and
//!   needs none); the gateway sizes them when it loads: [`MAX_GW_NAT_IPS`], its route capacity
//!   ([`DEFAULT_GW_ROUTES`] by default), [`MAX_GW_FRAGMENTED`], [`MAX_GW_NODES`].
//! - The block of a port is [`GwGeometry::block_of`]: `(port − lo) >> shift`, and only whole
//!   blocks count (the same rule as the cluster geometry in `snat-user`).

use bytemuck::{Pod, Zeroable};

/// Name of the gateway's TC ingress program.
pub const PROG_GATEWAY: &str = "snat_gateway";

/// Hash NAT IP ([`crate::Ipv4Octets`]) → [`GwGeometry`]: the addresses whose traffic is
/// forwarded, each with the cluster's port range and block size.
pub const MAP_GW_NAT_IPS: &str = "SNAT_GW_NAT_IPS";
/// Hash [`GwBlockKey`] → [`GwRoute`]: which node a block's replies go to (not preallocated).
pub const MAP_GW_ROUTES: &str = "SNAT_GW_ROUTES";
/// LRU hash [`crate::flow::FragKey`] → [`GwFragValue`]: the NAT port of a fragmented datagram,
/// recorded by its first fragment for the later ones (which carry no port).
pub const MAP_GW_FRAGS: &str = "SNAT_GW_FRAGS";
/// Per-CPU array of `u64` indexed by [`GwCounter`].
pub const MAP_GW_COUNTERS: &str = "SNAT_GW_COUNTERS";
/// Per-CPU array of `u64` indexed by [`GwRoute::slot`]: packets forwarded to each node.
pub const MAP_GW_NODE_PACKETS: &str = "SNAT_GW_NODE_PACKETS";

/// Most NAT IPs a gateway serves.
pub const MAX_GW_NAT_IPS: u32 = 64;
/// Block routes a gateway holds by default: 64 NAT IPs of 1,024 blocks (a whole port range in
/// blocks of 64). The map is not preallocated, but its hash buckets are: 16 bytes per entry.
pub const DEFAULT_GW_ROUTES: u32 = 65_536;
/// Fragmented datagrams tracked at once.
pub const MAX_GW_FRAGMENTED: u32 = 16_384;
/// Distinct nodes counted at once (slots of [`MAP_GW_NODE_PACKETS`]).
pub const MAX_GW_NODES: u32 = 1024;
/// A later fragment more than this after its first one is an orphan (Linux's reassembly gives up
/// after 30 s, `net.ipv4.ipfrag_time`; fragments of one datagram arrive within milliseconds).
pub const GW_FRAG_TIMEOUT_NS: u64 = 5_000_000_000;

/// The port range and block size of a NAT IP, as the program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GwGeometry {
    /// First port of the range, network byte order.
    pub port_lo: [u8; 2],
    /// Whole blocks in the range.
    pub blocks: u16,
    /// log2 of the block size (3..=15).
    pub shift: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<GwGeometry>() == 8);

impl GwGeometry {
    /// `block_size` must be a power of two (the cluster geometry checks it); `blocks` whole blocks
    /// of it start at `lo`.
    pub const fn new(lo: u16, block_size: u16, blocks: u16) -> Self {
        Self {
            port_lo: lo.to_be_bytes(),
            blocks,
            shift: block_size.trailing_zeros() as u8,
            _pad: [0; 3],
        }
    }

    pub const fn lo(&self) -> u16 {
        u16::from_be_bytes(self.port_lo)
    }

    /// The block of `port` (host order), or `None` outside the whole blocks of the range.
    #[inline(always)]
    pub const fn block_of(&self, port: u16) -> Option<u16> {
        let lo = self.lo();
        if port < lo {
            return None;
        }
        // The mask keeps the shift in range for the verifier and for a corrupt value.
        let index = (port - lo) >> (self.shift & 15);
        if index < self.blocks {
            Some(index)
        } else {
            None
        }
    }
}

/// A block of a NAT IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct GwBlockKey {
    pub nat_ip: [u8; 4],
    /// The block's index in the range (host order: an index, not a port).
    pub index: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<GwBlockKey>() == 8);

impl GwBlockKey {
    pub const fn new(nat_ip: [u8; 4], index: u16) -> Self {
        Self {
            nat_ip,
            index,
            _pad: 0,
        }
    }
}

/// Where a block's replies go: out of `ifindex`, to the neighbour `next_hop` (the node itself
/// when it is on the link, else the router towards it), unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GwRoute {
    /// The node holding the block.
    pub node: [u8; 4],
    /// The neighbour the frame is addressed to.
    pub next_hop: [u8; 4],
    pub ifindex: u32,
    /// The node's slot in [`MAP_GW_NODE_PACKETS`] (`< MAX_GW_NODES`).
    pub slot: u32,
}
const _: () = assert!(size_of::<GwRoute>() == 16);

/// What a first fragment left for the fragments after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GwFragValue {
    /// The datagram's NAT port (or echo identifier), network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 6],
    /// `CLOCK_MONOTONIC_COARSE` ns of the first fragment.
    pub seen_ns: u64,
}
const _: () = assert!(size_of::<GwFragValue>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `repr(C)`, `bytemuck::Pod` (no padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::GwGeometry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GwBlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GwRoute {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GwFragValue {}
}

/// One slot of [`MAP_GW_COUNTERS`]: every packet the program sees ends in exactly one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GwCounter {
    /// A TCP segment forwarded by its destination port.
    ForwardedTcp,
    /// A UDP datagram forwarded by its destination port.
    ForwardedUdp,
    /// An ICMP echo reply forwarded by its identifier.
    ForwardedIcmpEcho,
    /// An ICMP error forwarded by the source port (or identifier) of the packet it quotes.
    ForwardedIcmpError,
    /// A later fragment forwarded with its datagram's first fragment.
    ForwardedFragment,
    PassNotIpv4,
    PassNotNatIp,
    /// To a NAT IP, but the IPv4 or L4 header is truncated or inconsistent.
    DropMalformed,
    /// To a NAT IP, a protocol or ICMP type that carries no NAT port (e.g. an echo request).
    DropUnsupported,
    /// An ICMP error whose quote has no usable port: too short, a later fragment, another
    /// protocol, or a source that is not the NAT IP the error is addressed to.
    DropQuoteUnusable,
    /// A port outside the whole blocks of the range.
    DropOutOfRange,
    /// A block no node holds (or the gateway has not learnt of yet).
    DropNoRoute,
    /// A later fragment whose first fragment was not seen (or was seen too long ago).
    DropOrphanFragment,
    /// `bpf_redirect_neigh` refused the route.
    DropRedirectFailed,
}

impl GwCounter {
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const ALL: [GwCounter; 14] = {
        use GwCounter::*;
        [
            ForwardedTcp,
            ForwardedUdp,
            ForwardedIcmpEcho,
            ForwardedIcmpError,
            ForwardedFragment,
            PassNotIpv4,
            PassNotNatIp,
            DropMalformed,
            DropUnsupported,
            DropQuoteUnusable,
            DropOutOfRange,
            DropNoRoute,
            DropOrphanFragment,
            DropRedirectFailed,
        ]
    };

    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The counter's name in reports (and the `result` label of a metric).
    pub const fn name(self) -> &'static str {
        use GwCounter::*;
        match self {
            ForwardedTcp => "forwarded_tcp",
            ForwardedUdp => "forwarded_udp",
            ForwardedIcmpEcho => "forwarded_icmp_echo",
            ForwardedIcmpError => "forwarded_icmp_error",
            ForwardedFragment => "forwarded_fragment",
            PassNotIpv4 => "pass_not_ipv4",
            PassNotNatIp => "pass_not_nat_ip",
            DropMalformed => "drop_malformed",
            DropUnsupported => "drop_unsupported",
            DropQuoteUnusable => "drop_quote_unusable",
            DropOutOfRange => "drop_out_of_range",
            DropNoRoute => "drop_no_route",
            DropOrphanFragment => "drop_orphan_fragment",
            DropRedirectFailed => "drop_redirect_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_in_index_order_with_unique_names() {
        for (i, c) in GwCounter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{c:?}");
            for d in &GwCounter::ALL[..i] {
                assert_ne!(c.name(), d.name());
            }
        }
    }

    #[test]
    fn blocks_are_whole_and_start_at_lo() {
        let g = GwGeometry::new(40000, 64, 8);
        assert_eq!(g.shift, 6);
        assert_eq!(g.block_of(39999), None);
        assert_eq!(g.block_of(40000), Some(0));
        assert_eq!(g.block_of(40063), Some(0));
        assert_eq!(g.block_of(40064), Some(1));
        assert_eq!(g.block_of(40511), Some(7));
        assert_eq!(g.block_of(40512), None);
        assert_eq!(g.block_of(65535), None);
        let g = GwGeometry::new(1, 8, 8191);
        assert_eq!(g.block_of(65528), Some(8190));
        assert_eq!(g.block_of(65529), None);
        assert_eq!(g.block_of(0), None);
    }
}
