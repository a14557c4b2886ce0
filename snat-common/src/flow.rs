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

use core::net::Ipv4Addr;

use bytemuck::{Pod, Zeroable};

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
/// Aligned to 8 bytes, so the datapath compares keys as two words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

impl FlowKey {
    /// A key from addresses and ports in network byte order.
    #[inline(always)]
    pub const fn new(
        proto: u8,
        src_addr: [u8; 4],
        src_port: [u8; 2],
        dst_addr: [u8; 4],
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

    /// The key as two words (for comparing keys without a byte-by-byte loop).
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        bytemuck::cast(*self)
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
    pub const fn reply(&self, nat_addr: [u8; 4], nat_port: [u8; 2]) -> Self {
        Self::new(self.proto, self.dst_addr, self.dst_port, nat_addr, nat_port)
    }

    /// The forward key whose reverse key is `self`, given the internal endpoint it maps to.
    #[inline(always)]
    pub const fn forward(&self, origin: &Origin) -> Self {
        self.forward_to(origin.addr, origin.port)
    }

    /// The forward key whose reverse key is `self`, for the internal endpoint `addr:port`.
    #[inline(always)]
    pub const fn forward_to(&self, addr: [u8; 4], port: [u8; 2]) -> Self {
        Self::new(self.proto, addr, port, self.src_addr, self.src_port)
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.src_addr)
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.dst_addr)
    }

    pub const fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.src_port)
    }

    pub const fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst_port)
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Mapping {
    /// The forward key this value belongs to. The kernel recycles a deleted element for the next
    /// insert at once, so a reader compares this with the key it looked up (after copying the
    /// value out) and treats a mismatch as "no mapping".
    pub key: FlowKey,
    pub nat_addr: [u8; 4],
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
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last outbound packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Mapping>() == 64);
// The datapath reads these fields as whole words (`mapping` in snat-ebpf): keep them aligned.
const _: () = assert!(
    core::mem::offset_of!(Mapping, nat_addr) % 4 == 0
        && core::mem::offset_of!(Mapping, nat_port) % 2 == 0
        && core::mem::offset_of!(Mapping, ack) % 4 == 0
        && core::mem::offset_of!(Mapping, window) % 2 == 0
        && core::mem::offset_of!(Mapping, isn_next) % 4 == 0
        && core::mem::offset_of!(Mapping, block_epoch) % 4 == 0
);

impl Mapping {
    /// A new mapping of `key` to `nat_addr:nat_port`, made at `now` (TCP state empty, epoch 1).
    #[inline(always)]
    pub const fn new(key: FlowKey, nat_addr: [u8; 4], nat_port: [u8; 2], now: u64) -> Self {
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
            last_seen_ns: now,
        }
    }

    /// When the mapping was made, `CLOCK_MONOTONIC_COARSE` ns (to the second).
    pub const fn created_ns(&self) -> u64 {
        self.created_s as u64 * 1_000_000_000
    }

    pub fn nat_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.nat_addr)
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

/// The reverse half of a mapping: the internal endpoint replies go back to, and what the remote
/// side has done. Its TCP flags are written by ingress only, stamped with the epoch of the forward
/// half they belong to (see [`Mapping`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Origin {
    /// The reverse key this value belongs to (see [`Mapping::key`]).
    pub key: FlowKey,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// Epoch (of the forward half) in which the remote sent a SYN, FIN, RST (0: never).
    pub syn: u16,
    pub fin: u16,
    pub rst: u16,
    /// See [`Mapping::release`].
    pub release: u32,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the last inbound packet (or of creation).
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Origin>() == 40);
const _: () = assert!(
    core::mem::offset_of!(Origin, addr) % 4 == 0 && core::mem::offset_of!(Origin, port) % 2 == 0
);

impl Origin {
    /// The reverse half of a new mapping whose reply key is `key`, for the internal endpoint
    /// `addr:port`.
    #[inline(always)]
    pub const fn new(key: FlowKey, addr: [u8; 4], port: [u8; 2], now: u64) -> Self {
        Self {
            key,
            addr,
            port,
            syn: 0,
            fin: 0,
            rst: 0,
            release: 0,
            last_seen_ns: now,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
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

/// One NAT IP and the part of its port space this node may hand out (inclusive bounds,
/// host byte order: they are numbers to count with, not wire fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatIp {
    pub addr: [u8; 4],
    pub port_min: u16,
    pub port_max: u16,
    /// [`NatIp::LOCAL`] and future flags.
    pub flags: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<NatIp>() == 12);

impl NatIp {
    /// The address is one of the node's own: skip ports a local socket uses.
    pub const LOCAL: u16 = 1;

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct UseKey {
    pub src: [u8; 4],
    pub nat: [u8; 4],
    pub dst: [u8; 4],
    pub dport: [u8; 2],
    pub proto: u8,
    pub kind: u8,
}
const _: () = assert!(size_of::<UseKey>() == 16);

impl UseKey {
    /// The three counts a mapping of `fwd` on `nat` adds to: (source, destination, pair).
    #[inline(always)]
    pub const fn of_mapping(fwd: &FlowKey, nat: [u8; 4]) -> [UseKey; 3] {
        let (src, dst, dport, proto) = (fwd.src_addr, fwd.dst_addr, fwd.dst_port, fwd.proto);
        [
            UseKey {
                src,
                nat: [0; 4],
                dst: [0; 4],
                dport: [0; 2],
                proto,
                kind: use_kind::SOURCE,
            },
            UseKey {
                src: [0; 4],
                nat,
                dst,
                dport,
                proto,
                kind: use_kind::DESTINATION,
            },
            UseKey {
                src,
                nat: [0; 4],
                dst,
                dport,
                proto,
                kind: use_kind::SOURCE_DESTINATION,
            },
        ]
    }

    /// The controller's hint key for a destination count key.
    #[inline(always)]
    pub const fn sources_of(dest: &UseKey) -> UseKey {
        UseKey {
            kind: use_kind::DESTINATION_SOURCES,
            ..*dest
        }
    }

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReleaseEntry {
    /// The forward key.
    pub key: FlowKey,
    /// `Mapping::last_seen_ns` the controller saw.
    pub fwd_seen_ns: u64,
    /// `Origin::last_seen_ns` the controller saw (0 if the reverse half was missing).
    pub rev_seen_ns: u64,
    /// One of [`release_result`], written by the program.
    pub result: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ReleaseEntry>() == 40);

impl ReleaseEntry {
    /// The entry that releases the mapping `key` → `m` (reverse half `o`) if both halves are
    /// still as the controller sees them now.
    pub const fn new(key: FlowKey, m: &Mapping, o: Option<&Origin>) -> Self {
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
/// a stamp may be this much older than the packet it stands for. Idle timeouts are at least a
/// second, so a mapping refreshed less than this long ago is never being released.
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PoolKey {
    pub addr: [u8; 4],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<PoolKey>() == 8);

impl PoolKey {
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }
}

/// An endpoint (address, port or echo identifier, protocol): the key and the value of
/// `SNAT_ENDPOINTS`, which remembers the NAT endpoint an internal endpoint got last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Endpoint {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Endpoint>() == 8);

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
    /// Number of NAT IPs in each set.
    pub nat_ip_count: [u32; 2],
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
const _: () = assert!(size_of::<Config>() == 32);

impl Config {
    /// Answer a refused flow at once: TCP RST, or ICMP destination unreachable code 13.
    pub const REJECT: u32 = 1;
    /// A flow whose paired NAT IP has no port left towards its destination takes one on the
    /// next NAT IP of the set, in order (`--ip-pooling overflow`).
    pub const OVERFLOW: u32 = 2;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `repr(C)`, `bytemuck::Pod` (no padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Mapping {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatIp {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PoolKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UseKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReleaseEntry {}
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
