//! The map keys and values that hold snat's state.
//!
//! Invariants:
//! - Every type is `#[repr(C)]`, made of byte arrays and fixed-width integers with explicit
//!   padding, so kernel and userspace agree on the layout byte for byte; a `const` assertion pins
//!   each size.
//! - Addresses and ports are stored in network byte order (`[u8; N]`), read through typed accessors.
//! - A mapping is two entries created and removed together: `SNAT_FWD[k] = m` and
//!   `SNAT_REV[k.reply(m)] = o`, where `o` names the internal endpoint of `k`. The reverse entry is
//!   inserted first (with `BPF_NOEXIST`: that insert *is* the port claim) and removed last, so a
//!   forward entry never exists without the claim that makes its NAT port unique.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytemuck::{Pod, Zeroable};

/// An address as the maps hold it, in network byte order: `[u8; 4]` (IPv4) or `[u8; 16]`
/// (IPv6). The map types below are generic over it; each family has its own maps, so IPv4 keys
/// stay as small as they were before IPv6 came (`FlowKey` is 16 bytes, `FlowKey6` 40).
pub trait Addr:
    Copy + Default + PartialEq + Eq + core::hash::Hash + core::fmt::Debug + Pod + 'static
{
    /// Bytes that complete [`MappingOf`] and [`OriginOf`] to a multiple of 8 without implicit
    /// padding (none for IPv4, 4 for IPv6).
    type Tail: Copy + Default + PartialEq + Eq + core::fmt::Debug + Pod;
    /// The all-zero address.
    const ZERO: Self;
    /// The address as the standard library's type.
    fn ip(self) -> IpAddr;
    /// Four bytes that depend on every byte of the address (for hashing it onto a NAT IP).
    fn folded(self) -> [u8; 4];
}

impl Addr for [u8; 4] {
    type Tail = [u8; 0];
    const ZERO: Self = [0; 4];
    fn ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }
    #[inline(always)]
    fn folded(self) -> [u8; 4] {
        self
    }
}

impl Addr for [u8; 16] {
    type Tail = [u8; 4];
    const ZERO: Self = [0; 16];
    fn ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
    #[inline(always)]
    fn folded(self) -> [u8; 4] {
        let w: [u32; 4] = bytemuck::cast(self);
        (w[0] ^ w[1] ^ w[2] ^ w[3]).to_ne_bytes()
    }
}

/// Implements `bytemuck::{Zeroable, Pod}` (and `aya::Pod` for userspace) for the IPv4 and IPv6
/// instances of a generic map type. Sound because each instance is `repr(C)` of byte arrays and
/// integers whose size assertion below shows no implicit padding.
macro_rules! pod_instances {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: see the macro's doc.
            unsafe impl Zeroable for $t {}
            // SAFETY: see the macro's doc.
            unsafe impl Pod for $t {}
            #[cfg(feature = "user")]
            // SAFETY: as above.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

/// IP protocol numbers snat translates.
pub mod proto {
    /// ICMP (echo queries by identifier, errors by their embedded header).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// A protocol snat translates, by name: the one type the CLI, the views, the metrics and the
/// control socket use (the maps hold the numbers of [`proto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// Every protocol, in the order reports list them.
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Icmp];

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
            Proto::Icmp => proto::ICMP,
        }
    }

    /// The protocol of IP protocol number `n`, if snat translates it.
    pub const fn from_number(n: u8) -> Option<Proto> {
        match n {
            proto::TCP => Some(Proto::Tcp),
            proto::UDP => Some(Proto::Udp),
            proto::ICMP => Some(Proto::Icmp),
            _ => None,
        }
    }

    /// `tcp`, `udp` or `icmp`: how the CLI, metrics labels and JSON name it.
    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

impl core::fmt::Display for Proto {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // `pad`, so tables can align it (`{:<5}`).
        f.pad(self.name())
    }
}

/// A protocol name snat does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownProto;

impl core::fmt::Display for UnknownProto {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("unknown protocol: use tcp, udp or icmp")
    }
}

impl core::error::Error for UnknownProto {}

impl core::str::FromStr for Proto {
    type Err = UnknownProto;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Proto::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or(UnknownProto)
    }
}

/// A flow as one direction of packets shows it: source and destination endpoints and protocol.
///
/// Forward keys are written as the pod's packet reads (internal source → remote destination),
/// reverse keys as the reply reads (remote source → NAT destination). What goes in the port
/// fields depends on the protocol and sets the port-reuse rules of Azure's load balancer ("Use
/// Source Network Address Translation (SNAT) for outbound connections"):
///
/// | proto | internal side          | remote side            | a NAT port is unique per |
/// |-------|------------------------|------------------------|--------------------------|
/// | TCP   | port                   | port                   | remote ip:port           |
/// | UDP   | port                   | 0 (any port of the IP) | remote ip                |
/// | ICMP  | echo identifier        | 0                      | remote ip                |
///
/// Aligned to 8 bytes, so the datapath compares keys as words (two for IPv4, five for IPv6).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKeyOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
/// An IPv4 flow (`SNAT_FWD`, `SNAT_REV`).
pub type FlowKey = FlowKeyOf<[u8; 4]>;
/// An IPv6 flow (`SNAT_FWD6`, `SNAT_REV6`).
pub type FlowKey6 = FlowKeyOf<[u8; 16]>;
const _: () = assert!(size_of::<FlowKey>() == 16 && size_of::<FlowKey6>() == 40);

impl<A: Addr> FlowKeyOf<A> {
    /// A key from addresses and ports in network byte order.
    #[inline(always)]
    pub const fn new(
        proto: u8,
        src_addr: A,
        src_port: [u8; 2],
        dst_addr: A,
        dst_port: [u8; 2],
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }

    /// The remote port as it belongs in a key of `proto`: TCP keeps it, UDP and ICMP use 0.
    #[inline(always)]
    pub const fn remote_port_for(proto: u8, port: [u8; 2]) -> [u8; 2] {
        if proto == proto::TCP {
            port
        } else {
            [0; 2]
        }
    }

    /// The reverse key a forward key `self` gets once mapped to `nat_addr:nat_port`.
    #[inline(always)]
    pub const fn reply(&self, nat_addr: A, nat_port: [u8; 2]) -> Self {
        Self::new(self.proto, self.dst_addr, self.dst_port, nat_addr, nat_port)
    }

    /// The forward key whose reverse key is `self`, given the internal endpoint it maps to.
    #[inline(always)]
    pub const fn forward(&self, origin: &OriginOf<A>) -> Self {
        self.forward_to(origin.addr, origin.port)
    }

    /// The forward key whose reverse key is `self`, for the internal endpoint `addr:port`.
    #[inline(always)]
    pub const fn forward_to(&self, addr: A, port: [u8; 2]) -> Self {
        Self::new(self.proto, addr, port, self.src_addr, self.src_port)
    }

    pub const fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.src_port)
    }

    pub const fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst_port)
    }

    /// The source address, whichever the family.
    pub fn src_ip(&self) -> IpAddr {
        self.src_addr.ip()
    }

    /// The destination address, whichever the family.
    pub fn dst_ip(&self) -> IpAddr {
        self.dst_addr.ip()
    }
}

impl FlowKey {
    /// The key as two words (for comparing keys without a byte-by-byte loop).
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        bytemuck::cast(*self)
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.src_addr)
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.dst_addr)
    }
}

impl FlowKey6 {
    /// The key as five words (see [`FlowKey::words`]).
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        bytemuck::cast(*self)
    }

    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.src_addr)
    }

    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.dst_addr)
    }
}

/// The forward half of a mapping: where the pod's packets are translated to, and what the pod
/// side of the connection has done. Written by egress only (the release program only reads it and
/// raises [`Mapping::release`]).
///
/// TCP state is kept per connection *epoch*: a new SYN on a closed mapping (binding persistence)
/// starts epoch `epoch + 1`, and every flag is recorded as the epoch it was seen in (0: never), one
/// aligned 16-bit store each, so concurrent writers never lose each other's update and a reopen
/// never has to clear the other direction's flags (see [`crate::tcp`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingOf<A: Addr> {
    /// The forward key this value belongs to. The kernel recycles a deleted element for the next
    /// insert at once, so a reader compares this with the key it looked up (after copying the
    /// value out) and treats a mismatch as "no mapping".
    pub key: FlowKeyOf<A>,
    pub nat_addr: A,
    pub nat_port: [u8; 2],
    /// TCP connection epoch on this mapping: 1 for the first connection, bumped by a reopen.
    pub epoch: u16,
    /// Epoch in which the pod sent a SYN, FIN, RST, and an ACK (TCP only; 0: never).
    pub syn: u16,
    pub fin: u16,
    pub rst: u16,
    pub acked: u16,
    /// The acknowledgement number and window of the pod's latest segment with ACK (network order,
    /// the window unscaled): the next sequence number the pod expects, and how far beyond it.
    pub ack: [u8; 4],
    /// TCP: the window of that segment. UDP: the remote port the pod's datagrams go to (set at
    /// creation, zeroed by the first datagram to another port), which picks a per-port idle
    /// timeout (`--udp-timeout-for`); 0: several ports, or unknown. Read it through
    /// [`Mapping::udp_remote_port`].
    pub window: [u8; 2],
    /// The window scale the pod announced in its SYN (0 without the option).
    pub wscale: u8,
    pub _pad: u8,
    /// The pod's initial sequence number + 1: what a RST answering its SYN acknowledges.
    pub isn_next: [u8; 4],
    /// Raised (atomically) by the release program before it re-reads `last_seen_ns` to decide
    /// whether to remove this mapping. A packet that refreshes `last_seen_ns` reads it after a
    /// full barrier, so one of the two always sees the other: the datapath drops the packet of a
    /// mapping being released, or the release keeps the mapping.
    pub release: u32,
    /// `CLOCK_MONOTONIC_COARSE` seconds when the mapping was made (32 bits: 136 years of
    /// uptime; [`Mapping::created_ns`] reads it back).
    pub created_s: u32,
    /// Cluster mode: the epoch of the claim of the block its NAT port is in
    /// ([`crate::block`]); a packet passes only while the block is held under this epoch. 0
    /// outside cluster mode.
    pub block_epoch: u32,
    pub _tail: A::Tail,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last outbound packet.
    pub last_seen_ns: u64,
}
/// An IPv4 mapping's forward half (`SNAT_FWD`).
pub type Mapping = MappingOf<[u8; 4]>;
/// An IPv6 mapping's forward half (`SNAT_FWD6`).
pub type Mapping6 = MappingOf<[u8; 16]>;
const _: () = assert!(size_of::<Mapping>() == 64 && size_of::<Mapping6>() == 104);
// The datapath reads these fields as whole words (`mapping` in snat-ebpf): keep them aligned.
macro_rules! assert_mapping_aligned {
    ($t:ty) => {
        const _: () = assert!(
            core::mem::offset_of!($t, nat_addr) % 4 == 0
                && core::mem::offset_of!($t, nat_port) % 2 == 0
                && core::mem::offset_of!($t, ack) % 4 == 0
                && core::mem::offset_of!($t, window) % 2 == 0
                && core::mem::offset_of!($t, isn_next) % 4 == 0
                && core::mem::offset_of!($t, block_epoch) % 4 == 0
                && core::mem::offset_of!($t, last_seen_ns) % 8 == 0
        );
    };
}
assert_mapping_aligned!(Mapping);
assert_mapping_aligned!(Mapping6);

impl<A: Addr> MappingOf<A> {
    /// A new mapping of `key` to `nat_addr:nat_port`, made at `now` (TCP state empty, epoch 1).
    #[inline(always)]
    pub fn new(key: FlowKeyOf<A>, nat_addr: A, nat_port: [u8; 2], now: u64) -> Self {
        Self {
            key,
            nat_addr,
            nat_port,
            epoch: 1,
            syn: 0,
            fin: 0,
            rst: 0,
            acked: 0,
            ack: [0; 4],
            window: [0; 2],
            wscale: 0,
            _pad: 0,
            isn_next: [0; 4],
            release: 0,
            created_s: (now / 1_000_000_000) as u32,
            block_epoch: 0,
            _tail: A::Tail::default(),
            last_seen_ns: now,
        }
    }

    /// Makes `self` [`MappingOf::new`]`(key, nat_addr, nat_port, now)` field by field, in place
    /// (the datapath's IPv6 values are too big to build on its stack first).
    #[inline(always)]
    pub fn init(&mut self, key: &FlowKeyOf<A>, nat_addr: A, nat_port: [u8; 2], now: u64) {
        self.key = *key;
        self.nat_addr = nat_addr;
        self.nat_port = nat_port;
        self.epoch = 1;
        self.syn = 0;
        self.fin = 0;
        self.rst = 0;
        self.acked = 0;
        self.ack = [0; 4];
        self.window = [0; 2];
        self.wscale = 0;
        self._pad = 0;
        self.isn_next = [0; 4];
        self.release = 0;
        self.created_s = (now / 1_000_000_000) as u32;
        self.block_epoch = 0;
        self._tail = A::Tail::default();
        self.last_seen_ns = now;
    }

    /// When the mapping was made, `CLOCK_MONOTONIC_COARSE` ns (to the second).
    pub const fn created_ns(&self) -> u64 {
        self.created_s as u64 * 1_000_000_000
    }

    /// The NAT address, whichever the family.
    pub fn nat_ip(&self) -> IpAddr {
        self.nat_addr.ip()
    }

    pub const fn nat_port(&self) -> u16 {
        u16::from_be_bytes(self.nat_port)
    }

    /// The `crate::tcp::SEEN_*` flags the pod sent in the current epoch.
    #[inline(always)]
    pub const fn tcp_seen(&self) -> u8 {
        crate::tcp::seen_in(self.epoch, self.syn, self.fin, self.rst)
    }

    /// UDP: the one remote port the pod's datagrams on this mapping went to, or `None` when they
    /// went to several (or the mapping predates the record). Meaningless for other protocols.
    pub const fn udp_remote_port(&self) -> Option<u16> {
        match u16::from_be_bytes(self.window) {
            0 => None,
            port => Some(port),
        }
    }

    /// Records `bits` (`crate::tcp::SEEN_*`) as sent by the pod in the current epoch (for the
    /// controller's tests and synthetic tables; the datapath stores each field itself).
    pub const fn record(&mut self, bits: u8) {
        let e = self.epoch;
        if bits & crate::tcp::SEEN_SYN != 0 {
            self.syn = e;
        }
        if bits & crate::tcp::SEEN_FIN != 0 {
            self.fin = e;
        }
        if bits & crate::tcp::SEEN_RST != 0 {
            self.rst = e;
        }
    }
}

impl Mapping {
    pub fn nat_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.nat_addr)
    }
}

/// The reverse half of a mapping: the internal endpoint replies go back to, and what the remote
/// side has done. Its TCP flags are written by ingress only, stamped with the epoch of the forward
/// half they belong to (see [`Mapping`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginOf<A: Addr> {
    /// The reverse key this value belongs to (see [`Mapping::key`]).
    pub key: FlowKeyOf<A>,
    pub addr: A,
    pub port: [u8; 2],
    /// Epoch (of the forward half) in which the remote sent a SYN, FIN, RST (0: never).
    pub syn: u16,
    pub fin: u16,
    pub rst: u16,
    /// See [`Mapping::release`].
    pub release: u32,
    pub _tail: A::Tail,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last inbound packet (or of creation).
    pub last_seen_ns: u64,
}
/// An IPv4 mapping's reverse half (`SNAT_REV`).
pub type Origin = OriginOf<[u8; 4]>;
/// An IPv6 mapping's reverse half (`SNAT_REV6`).
pub type Origin6 = OriginOf<[u8; 16]>;
const _: () = assert!(size_of::<Origin>() == 40 && size_of::<Origin6>() == 80);
const _: () = assert!(
    core::mem::offset_of!(Origin, addr) % 4 == 0
        && core::mem::offset_of!(Origin, port) % 2 == 0
        && core::mem::offset_of!(Origin6, port) % 2 == 0
        && core::mem::offset_of!(Origin6, last_seen_ns) % 8 == 0
);

impl<A: Addr> OriginOf<A> {
    /// The reverse half of a new mapping whose reply key is `key`, for the internal endpoint
    /// `addr:port`.
    #[inline(always)]
    pub fn new(key: FlowKeyOf<A>, addr: A, port: [u8; 2], now: u64) -> Self {
        Self {
            key,
            addr,
            port,
            syn: 0,
            fin: 0,
            rst: 0,
            release: 0,
            _tail: A::Tail::default(),
            last_seen_ns: now,
        }
    }

    /// Makes `self` [`OriginOf::new`]`(*key, addr, port, now)` in place (see
    /// [`MappingOf::init`]).
    #[inline(always)]
    pub fn init(&mut self, key: &FlowKeyOf<A>, addr: A, port: [u8; 2], now: u64) {
        self.key = *key;
        self.addr = addr;
        self.port = port;
        self.syn = 0;
        self.fin = 0;
        self.rst = 0;
        self.release = 0;
        self._tail = A::Tail::default();
        self.last_seen_ns = now;
    }

    /// The internal address, whichever the family.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    /// The `crate::tcp::SEEN_*` flags the remote sent in epoch `epoch` (the forward half's).
    #[inline(always)]
    pub const fn tcp_seen(&self, epoch: u16) -> u8 {
        crate::tcp::seen_in(epoch, self.syn, self.fin, self.rst)
    }

    /// Records `bits` as sent by the remote in epoch `epoch` (see [`Mapping::record`]).
    pub const fn record(&mut self, epoch: u16, bits: u8) {
        if bits & crate::tcp::SEEN_SYN != 0 {
            self.syn = epoch;
        }
        if bits & crate::tcp::SEEN_FIN != 0 {
            self.fin = epoch;
        }
        if bits & crate::tcp::SEEN_RST != 0 {
            self.rst = epoch;
        }
    }
}

impl Origin {
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
}

pod_instances!(FlowKey, FlowKey6, Mapping, Mapping6, Origin, Origin6);

/// One NAT IP and the part of its port space this node may hand out (inclusive bounds,
/// host byte order: they are numbers to count with, not wire fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatIpOf<A> {
    pub addr: A,
    pub port_min: u16,
    pub port_max: u16,
    /// [`NatIp::LOCAL`] and future flags.
    pub flags: u16,
    pub _pad: u16,
}
/// An IPv4 NAT IP (`SNAT_NAT_IPS`).
pub type NatIp = NatIpOf<[u8; 4]>;
/// An IPv6 NAT IP (`SNAT_NAT_IPS6`).
pub type NatIp6 = NatIpOf<[u8; 16]>;
const _: () = assert!(size_of::<NatIp>() == 12 && size_of::<NatIp6>() == 24);

impl NatIp {
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
}

impl<A> NatIpOf<A> {
    /// The address is one of the node's own: skip ports a local socket uses.
    pub const LOCAL: u16 = 1;

    /// How many ports the range holds: 1..=65,536, never 0 (the datapath divides by it). The
    /// controller only writes ranges with `port_min <= port_max`.
    #[inline(always)]
    pub const fn range_len(&self) -> u32 {
        self.port_max.wrapping_sub(self.port_min) as u32 + 1
    }
}

/// What a [`UseKey`] counts (its `kind` byte).
pub mod use_kind {
    /// Mappings an internal source holds on any NAT IP, per protocol (`nat`, `dst`, `dport`
    /// zero): what `--max-ports-per-source` caps, per pod whichever NAT IPs it uses.
    pub const SOURCE: u8 = 1;
    /// Mappings towards a destination on one NAT IP (`src` zero): how full that IP's range is
    /// towards it.
    pub const DESTINATION: u8 = 2;
    /// Mappings one internal source holds towards one destination, on any NAT IP (`nat` zero).
    pub const SOURCE_DESTINATION: u8 = 3;
    /// Written by the controller: how many sources hold mappings towards a destination (the
    /// fair share divides the range by this plus one). Same fields as `DESTINATION`.
    pub const DESTINATION_SOURCES: u8 = 4;
}

/// Key of `SNAT_USE`: who holds how many mappings where. The datapath adds one to the
/// `SOURCE`, `DESTINATION` and `SOURCE_DESTINATION` counts of every mapping it creates and the
/// release program subtracts one when the mapping goes; the controller only writes
/// `DESTINATION_SOURCES` and removes counts that stay at zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UseKeyOf<A> {
    pub src: A,
    pub nat: A,
    pub dst: A,
    pub dport: [u8; 2],
    pub proto: u8,
    pub kind: u8,
}
/// A count of IPv4 mappings (`SNAT_USE`).
pub type UseKey = UseKeyOf<[u8; 4]>;
/// A count of IPv6 mappings (`SNAT_USE6`).
pub type UseKey6 = UseKeyOf<[u8; 16]>;
const _: () = assert!(size_of::<UseKey>() == 16 && size_of::<UseKey6>() == 52);

impl<A: Addr> UseKeyOf<A> {
    /// The three counts a mapping of `fwd` on `nat` adds to: (source, destination, pair).
    #[inline(always)]
    pub const fn of_mapping(fwd: &FlowKeyOf<A>, nat: A) -> [Self; 3] {
        let (src, dst, dport, proto) = (fwd.src_addr, fwd.dst_addr, fwd.dst_port, fwd.proto);
        [
            Self {
                src,
                nat: A::ZERO,
                dst: A::ZERO,
                dport: [0; 2],
                proto,
                kind: use_kind::SOURCE,
            },
            Self {
                src: A::ZERO,
                nat,
                dst,
                dport,
                proto,
                kind: use_kind::DESTINATION,
            },
            Self {
                src,
                nat: A::ZERO,
                dst,
                dport,
                proto,
                kind: use_kind::SOURCE_DESTINATION,
            },
        ]
    }

    /// Writes [`UseKeyOf::of_mapping`] into `keys` in place (see [`MappingOf::init`]).
    #[inline(always)]
    pub fn init_of_mapping(keys: &mut [Self; 3], fwd: &FlowKeyOf<A>, nat: A) {
        let [source, dest, pair] = keys;
        source.src = fwd.src_addr;
        source.nat = A::ZERO;
        source.dst = A::ZERO;
        source.dport = [0; 2];
        source.proto = fwd.proto;
        source.kind = use_kind::SOURCE;
        dest.src = A::ZERO;
        dest.nat = nat;
        dest.dst = fwd.dst_addr;
        dest.dport = fwd.dst_port;
        dest.proto = fwd.proto;
        dest.kind = use_kind::DESTINATION;
        pair.src = fwd.src_addr;
        pair.nat = A::ZERO;
        pair.dst = fwd.dst_addr;
        pair.dport = fwd.dst_port;
        pair.proto = fwd.proto;
        pair.kind = use_kind::SOURCE_DESTINATION;
    }

    /// The controller's hint key for a destination count key.
    #[inline(always)]
    pub const fn sources_of(dest: &Self) -> Self {
        Self {
            kind: use_kind::DESTINATION_SOURCES,
            ..*dest
        }
    }
}

impl UseKey {
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.src)
    }

    pub fn nat(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.nat)
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.dst)
    }
}

/// Interprets a use count: the release program subtracts with wrapping adds, so a count that
/// lost an increment to a concurrent reset can wrap below zero; that reads as zero.
#[inline(always)]
pub const fn use_count(raw: u64) -> u64 {
    if raw > (1 << 62) {
        0
    } else {
        raw
    }
}

/// One mapping the controller asks the release program (`snat_release`) to remove, if it is
/// still as idle as when the controller looked. The program writes [`ReleaseEntry::result`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseEntryOf<A> {
    /// The forward key.
    pub key: FlowKeyOf<A>,
    /// `Mapping::last_seen_ns` the controller saw.
    pub fwd_seen_ns: u64,
    /// `Origin::last_seen_ns` the controller saw (0 if the reverse half was missing).
    pub rev_seen_ns: u64,
    /// One of [`release_result`], written by the program.
    pub result: u32,
    pub _pad: u32,
}
/// A release of an IPv4 mapping (`snat_release`).
pub type ReleaseEntry = ReleaseEntryOf<[u8; 4]>;
/// A release of an IPv6 mapping (`snat_release6`).
pub type ReleaseEntry6 = ReleaseEntryOf<[u8; 16]>;
const _: () = assert!(size_of::<ReleaseEntry>() == 40 && size_of::<ReleaseEntry6>() == 64);

impl<A: Addr> ReleaseEntryOf<A> {
    /// The entry that releases the mapping `key` → `m` (reverse half `o`) if both halves are
    /// still as the controller sees them now.
    pub const fn new(key: FlowKeyOf<A>, m: &MappingOf<A>, o: Option<&OriginOf<A>>) -> Self {
        Self {
            key,
            fwd_seen_ns: m.last_seen_ns,
            rev_seen_ns: match o {
                Some(o) => o.last_seen_ns,
                None => 0,
            },
            result: release_result::PENDING,
            _pad: 0,
        }
    }
}

/// Outcomes of a [`ReleaseEntry`].
/// Mappings record a packet's time only when it moved on by this much, to spare the cache line:
/// a stamp may be this much older than the packet it stands for (and a few timer ticks more: the
/// datapath reads the coarse clock once per tick and CPU, `snat-ebpf/src/clock.rs`). Idle
/// timeouts are at least a second, so a mapping refreshed less than this long ago is never being
/// released.
pub const REFRESH_NS: u64 = 100_000_000;

pub mod release_result {
    /// Not processed (the program did not reach it).
    pub const PENDING: u32 = 0;
    /// Removed, with its port claim and use counts.
    pub const RELEASED: u32 = 1;
    /// A packet refreshed the mapping since the controller looked: kept.
    pub const REFRESHED: u32 = 2;
    /// Already gone.
    pub const GONE: u32 = 3;
}

/// Layout of the `snat_release` program's input: after a 14-byte Ethernet header (required by
/// `BPF_PROG_TEST_RUN`), a little-endian `u32` count, then that many [`ReleaseEntry`].
pub mod release_batch {
    /// Offset of the entry count.
    pub const COUNT_OFFSET: usize = 14;
    /// Offset of the first entry.
    pub const ENTRIES_OFFSET: usize = 16;
    /// Most entries one run takes (the input must fit a page).
    pub const MAX_ENTRIES: u32 = 64;
}

/// A NAT IP and protocol: the key of per-pool figures (`SNAT_EXHAUSTED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolKeyOf<A> {
    pub addr: A,
    pub proto: u8,
    pub _pad: [u8; 3],
}
/// An IPv4 pool (`SNAT_EXHAUSTED`, `SNAT_OVERFLOW`).
pub type PoolKey = PoolKeyOf<[u8; 4]>;
/// An IPv6 pool (`SNAT_EXHAUSTED6`, `SNAT_OVERFLOW6`).
pub type PoolKey6 = PoolKeyOf<[u8; 16]>;
const _: () = assert!(size_of::<PoolKey>() == 8 && size_of::<PoolKey6>() == 20);

impl<A: Addr> PoolKeyOf<A> {
    /// The pool of `addr` and `proto`.
    #[inline(always)]
    pub const fn new(addr: A, proto: u8) -> Self {
        Self {
            addr,
            proto,
            _pad: [0; 3],
        }
    }
}

impl PoolKey {
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
}

/// An endpoint (address, port or echo identifier, protocol): the key and the value of
/// `SNAT_ENDPOINTS`, which remembers the NAT endpoint an internal endpoint got last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointOf<A> {
    pub addr: A,
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
/// An IPv4 endpoint (`SNAT_ENDPOINTS`).
pub type Endpoint = EndpointOf<[u8; 4]>;
/// An IPv6 endpoint (`SNAT_ENDPOINTS6`).
pub type Endpoint6 = EndpointOf<[u8; 16]>;
const _: () = assert!(size_of::<Endpoint>() == 8 && size_of::<Endpoint6>() == 20);

impl<A: Addr> EndpointOf<A> {
    /// The endpoint `addr:port` of `proto`.
    #[inline(always)]
    pub const fn new(addr: A, port: [u8; 2], proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

pod_instances!(
    NatIp,
    NatIp6,
    UseKey,
    UseKey6,
    ReleaseEntry,
    ReleaseEntry6,
    PoolKey,
    PoolKey6,
    Endpoint,
    Endpoint6,
);

/// A fragmented datagram as its fragments show it: addresses, protocol and IP identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

/// What the first fragment's translation decided, for the fragments after it: the address that
/// replaces the fragments' source (egress) or destination (ingress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    pub addr: [u8; 4],
    pub _pad: u32,
    /// `CLOCK_MONOTONIC_COARSE` ns of the first fragment; older than `FRAG_TIMEOUT_NS`, stale.
    pub seen_ns: u64,
}
const _: () = assert!(size_of::<FragValue>() == 16);

/// An IPv6 fragmented datagram as its fragment headers show it: addresses, the protocol after
/// the fragment header, and the 32-bit identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: [u8; 4],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey6>() == 40);

/// [`FragValue`] for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue6 {
    pub addr: [u8; 16],
    pub seen_ns: u64,
}
const _: () = assert!(size_of::<FragValue6>() == 24);

/// How long a datagram's fragments are matched to its first (RFC 791's reassembly timer is
/// 15 s; fragments of one datagram travel together, so a short window suffices).
pub const FRAG_TIMEOUT_NS: u64 = 5_000_000_000;

/// The live configuration the datapath reads on every new mapping.
///
/// NAT IPs live in two sets so the controller can replace them without the datapath ever seeing
/// half of a change: it writes the inactive set and its count, then flips `active` (one aligned
/// 4-byte store).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Which set of `SNAT_NAT_IPS` is live: 0 → entries `0..MAX_NAT_IPS`, 1 → the next ones.
    pub active: u32,
    /// Number of IPv4 NAT IPs in each set.
    pub nat_ip_count: [u32; 2],
    /// Number of IPv6 NAT IPs in each set (`SNAT_NAT_IPS6`, flipped by the same `active`).
    pub nat_ip_count6: [u32; 2],
    /// [`Config::REJECT`] and future flags.
    pub flags: u32,
    /// Most mappings one internal source may hold per NAT IP and protocol; 0: no cap.
    pub max_per_source: u32,
    /// Fair share: once a destination holds this many thousandths of the range, a source holding
    /// at least `range / (sources + 1)` towards it gets no more ports; 0: off.
    pub fair_share_permille: u32,
    /// Refused flows answered (RST / ICMP) per second and CPU at most; the rest are dropped.
    pub reject_per_sec: u32,
    /// Bumped by the controller whenever it changes the NAT IPs or the port range: a
    /// destination found full under another generation is searched again (`SNAT_FULL`).
    pub generation: u32,
}
const _: () = assert!(size_of::<Config>() == 40);

impl Config {
    /// Answer a refused flow at once: TCP RST, or ICMP destination unreachable code 13.
    pub const REJECT: u32 = 1;
    /// A flow whose paired NAT IP has no port left towards its destination takes one on the
    /// next NAT IP of the set, in order (`--ip-pooling overflow`).
    pub const OVERFLOW: u32 = 2;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `repr(C)`, `bytemuck::Pod` (no padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_and_forward_are_inverse() {
        let fwd = FlowKey::new(
            proto::TCP,
            [10, 1, 0, 2],
            40000u16.to_be_bytes(),
            [203, 0, 113, 9],
            443u16.to_be_bytes(),
        );
        let rev = fwd.reply([198, 51, 100, 1], 33000u16.to_be_bytes());
        assert_eq!(rev.src_addr, [203, 0, 113, 9]);
        assert_eq!(rev.dst_port(), 33000);
        let origin = Origin {
            addr: fwd.src_addr,
            port: fwd.src_port,
            ..Origin::default()
        };
        assert_eq!(rev.forward(&origin), fwd);
    }

    #[test]
    fn in_place_initialisers_match_the_constructors() {
        let key = FlowKey6::new(
            proto::TCP,
            [0xfd; 16],
            40000u16.to_be_bytes(),
            [0x20; 16],
            443u16.to_be_bytes(),
        );
        let nat = [0x21; 16];
        let mut m = Mapping6 {
            epoch: 7,
            ack: [9; 4],
            ..Mapping6::default()
        };
        m.init(&key, nat, [1, 2], 5_000_000_000);
        assert_eq!(m, Mapping6::new(key, nat, [1, 2], 5_000_000_000));
        let mut o = Origin6 {
            syn: 3,
            ..Origin6::default()
        };
        o.init(&key, nat, [1, 2], 9);
        assert_eq!(o, Origin6::new(key, nat, [1, 2], 9));
        let mut uses = [UseKey6 {
            kind: 9,
            ..UseKey6::default()
        }; 3];
        UseKey6::init_of_mapping(&mut uses, &key, nat);
        assert_eq!(uses, UseKey6::of_mapping(&key, nat));
    }

    #[test]
    fn remote_port_only_counts_for_tcp() {
        let p = 53u16.to_be_bytes();
        assert_eq!(FlowKey::remote_port_for(proto::TCP, p), p);
        assert_eq!(FlowKey::remote_port_for(proto::UDP, p), [0, 0]);
        assert_eq!(FlowKey::remote_port_for(proto::ICMP, p), [0, 0]);
    }

    #[test]
    fn protocols_by_name_and_number() {
        for p in Proto::ALL {
            assert_eq!(Proto::from_number(p.number()), Some(p));
            assert_eq!(p.name().parse::<Proto>(), Ok(p));
        }
        assert_eq!(Proto::from_number(47), None);
        assert_eq!("sctp".parse::<Proto>(), Err(UnknownProto));
    }

    #[test]
    fn range_len_is_inclusive() {
        let ip = NatIp {
            addr: [0; 4],
            port_min: 32768,
            port_max: 65535,
            ..NatIp::default()
        };
        assert_eq!(ip.range_len(), 32768);
    }
}
