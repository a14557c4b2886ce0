//! The two address families, as the shared NAT code sees them: each has its own maps (so IPv4
//! keys stay 16 bytes), its own header ([`IpHeader`]) and its own rewrite, and the mapping,
//! allocation, release and TCP tracking code is generic over [`Family`] and compiled once for
//! each (`[u8; 4]`: IPv4, `[u8; 16]`: IPv6).
//!
//! Cluster mode is IPv4-only: its hooks here are no-ops for IPv6 (the agent refuses IPv6 in
//! cluster mode), which the compiler removes.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    maps::{lpm_trie::Key, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use aya_log_ebpf::macro_support::{Argument, IpFormatter};
use snat_common::{
    flow::{proto, Addr, EndpointOf},
    Config, Counter, FlowKeyOf, FullMark, MappingOf, NatIpOf, OriginOf, PoolKeyOf, UseKeyOf,
    MAX_NAT_IPS, SLOT_CREATE, SLOT_CREATE6, SLOT_HAIRPIN_DELIVER, SLOT_HAIRPIN_DELIVER6,
};

use crate::{
    alloc::ScanState,
    block,
    create::Pending,
    index::FreePorts,
    maps::*,
    packet::{Ipv4, Nat, Packet, Side},
    packet6::Ipv6,
};

/// What the generic code needs of a parsed IP header.
pub trait IpHeader<A>: Copy {
    fn src(&self) -> A;
    fn dst(&self) -> A;
    /// Offset of the upper-layer header in the frame.
    fn l4(&self) -> usize;
    /// Bytes from the upper-layer header to the end of the packet.
    fn l4_len<C: Packet>(&self, ctx: &C) -> usize;
    /// Part of a fragmented datagram (first or later fragment).
    fn is_fragment(&self) -> bool;
    /// Remembers that this first fragment's datagram was translated to (or back to) `addr`, for
    /// the fragments after it.
    fn remember(&self, addr: A, now: u64);
}

/// An address family: its maps, header, rewrite and the IPv4-only hooks. (Its addresses go into
/// `--ebpf-log` records as they are: `{:i}` formats either.)
pub trait Family: Addr + Argument + IpFormatter {
    type Ip: IpHeader<Self>;
    /// `snat_create`'s slot for this family in `SNAT_PROGRAMS`.
    const SLOT_CREATE: u32;
    /// `snat_hairpin_deliver`'s slot for this family in `SNAT_PROGRAMS`.
    const SLOT_HAIRPIN_DELIVER: u32;

    fn internal(a: Self) -> bool;
    fn excluded(a: Self) -> bool;
    fn fwd() -> &'static HashMap<FlowKeyOf<Self>, MappingOf<Self>>;
    fn rev() -> &'static HashMap<FlowKeyOf<Self>, OriginOf<Self>>;
    fn uses() -> &'static HashMap<UseKeyOf<Self>, u64>;
    fn refused() -> &'static LruHashMap<FlowKeyOf<Self>, u64>;
    fn src_refused() -> &'static LruHashMap<Self, u64>;
    fn exhausted() -> &'static PerCpuHashMap<PoolKeyOf<Self>, u64>;
    fn overflow() -> &'static PerCpuHashMap<PoolKeyOf<Self>, u64>;
    fn endpoints() -> &'static LruHashMap<EndpointOf<Self>, EndpointOf<Self>>;
    fn full() -> &'static LruHashMap<FlowKeyOf<Self>, FullMark>;
    fn free_ports() -> &'static LruHashMap<FlowKeyOf<Self>, FreePorts>;
    fn host_echo() -> &'static LruHashMap<FlowKeyOf<Self>, u64>;
    fn scan() -> &'static PerCpuArray<ScanState<Self>>;
    fn pending() -> &'static PerCpuArray<Pending<Self>>;
    /// How many NAT IPs set `set` of the live configuration has, and its `i`-th.
    fn nat_count(cfg: &Config, set: u32) -> u32;
    fn nat_ip(index: u32) -> Option<NatIpOf<Self>>;

    /// Reads the address at `p` once, as whole words.
    ///
    /// # Safety
    /// `p` points into a live map value, aligned to 4 (IPv4) or 8 bytes (IPv6).
    unsafe fn load(p: *const Self) -> Self;
    /// Whether the key stored at `p` (read once, as words) is `key`; counts a mismatch.
    ///
    /// # Safety
    /// `p` points to a key inside a live map value, 8-aligned.
    unsafe fn owned_by(p: *const FlowKeyOf<Self>, key: &FlowKeyOf<Self>) -> bool;

    /// Whether a local TCP or UDP socket uses the NAT port of `reply` (see `alloc`).
    fn socket_uses(skb: *mut __sk_buff, reply: &FlowKeyOf<Self>, rport: [u8; 2]) -> bool;

    /// Rewrites one endpoint of a TCP, UDP or echo packet (address, and port or identifier at
    /// `port_off` in the L4 header) with its checksums.
    fn rewrite_endpoint<C: Packet>(
        ctx: &C,
        ip: &Self::Ip,
        side: Side,
        port_off: usize,
        old: (Self, [u8; 2]),
        new: (Self, [u8; 2]),
    ) -> Result<(), i64>;
    /// The same on TC with the fewest stack bytes (`snat_create`).
    fn rewrite_lean(
        ctx: &TcContext,
        ip: &Self::Ip,
        port_off: usize,
        old: (Self, [u8; 2]),
        new: (Self, [u8; 2]),
    ) -> Result<(), i64>;
    /// Whether the TCP or UDP checksum at `check_off` may still be pending offload (XDP only).
    fn checksum_pending<C: Packet>(ctx: &C, ip: &Self::Ip, check_off: usize) -> bool;

    /// The refusal answer (RST, ICMP unreachable) if the policy and rate allow: its TC action
    /// (IPv6: `reject::ANSWER_IN_REJECT6`, for `snat_create6` to hand the packet on).
    fn answer(ctx: &TcContext, ip: &Self::Ip, cfg: &Config, now: u64) -> Option<i32>;
    /// The address as IPv4, for the IPv4-only hooks (cluster mode): `None` for IPv6.
    fn v4(a: Self) -> Option<[u8; 4]>;
}

/// Whether NAT66 is on: the live configuration has IPv6 NAT IPs. Without it every IPv6 packet
/// passes untouched, counted as `pass_not_ipv4` as before NAT66 existed.
#[inline(always)]
pub fn ipv6_on() -> bool {
    SNAT_CONFIG.get(0).is_some_and(|c| {
        c.nat_ip_count6
            .get((c.active & 1) as usize)
            .is_some_and(|n| *n > 0)
    })
}

/// [`block::fence_egress`] for either family (IPv6 is never in cluster mode).
#[inline(always)]
pub fn fence_egress<A: Family>(addr: A, port: [u8; 2], epoch: u32) -> Result<(), Counter> {
    match A::v4(addr) {
        Some(a) => block::fence_egress(a, port, epoch),
        None => Ok(()),
    }
}

/// [`block::no_mapping`] for either family.
#[inline(always)]
pub fn no_mapping<A: Family>(addr: A, port: [u8; 2]) -> Result<Counter, Counter> {
    match A::v4(addr) {
        Some(a) => block::no_mapping(a, port),
        None => Ok(Counter::IngressPassNoMapping),
    }
}

impl IpHeader<[u8; 4]> for Ipv4 {
    #[inline(always)]
    fn src(&self) -> [u8; 4] {
        self.src
    }
    #[inline(always)]
    fn dst(&self) -> [u8; 4] {
        self.dst
    }
    #[inline(always)]
    fn l4(&self) -> usize {
        Ipv4::l4(self)
    }
    #[inline(always)]
    fn l4_len<C: Packet>(&self, ctx: &C) -> usize {
        Ipv4::l4_len(self, ctx)
    }
    #[inline(always)]
    fn is_fragment(&self) -> bool {
        Ipv4::is_fragment(self)
    }
    #[inline(always)]
    fn remember(&self, addr: [u8; 4], now: u64) {
        remember_fragments(&self.frag_key(), addr, now);
    }
}

const SOCK_TUPLE_V4: u32 = 12;
const SOCK_TUPLE_V6: u32 = 36;

/// Looks a socket up with `tuple` (of `size` bytes) and releases it at once.
#[inline(always)]
fn socket_exists(skb: *mut __sk_buff, p: u8, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    // SAFETY: `skb` is the program's context; `tuple` is a valid tuple of `size` bytes.
    let sk = unsafe {
        match p {
            proto::TCP => bpf_sk_lookup_tcp(skb.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0),
            proto::UDP => bpf_sk_lookup_udp(skb.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` came from a successful lookup and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// A zeroed socket tuple (the union's largest member, IPv6).
#[inline(always)]
fn zero_tuple() -> bpf_sock_tuple {
    // SAFETY: a plain-data union of integers: all zeroes is a valid value.
    unsafe { core::mem::zeroed() }
}

/// The accessors of a family's own maps (the statics of `maps`), one line each.
macro_rules! family_maps {
    ($fwd:ident, $rev:ident, $uses:ident, $refused:ident, $src_refused:ident, $exhausted:ident,
     $overflow:ident, $endpoints:ident, $full:ident, $free_ports:ident, $host_echo:ident,
     $scan:ident, $pending:ident) => {
        #[inline(always)]
        fn fwd() -> &'static HashMap<FlowKeyOf<Self>, MappingOf<Self>> {
            &$fwd
        }
        #[inline(always)]
        fn rev() -> &'static HashMap<FlowKeyOf<Self>, OriginOf<Self>> {
            &$rev
        }
        #[inline(always)]
        fn uses() -> &'static HashMap<UseKeyOf<Self>, u64> {
            &$uses
        }
        #[inline(always)]
        fn refused() -> &'static LruHashMap<FlowKeyOf<Self>, u64> {
            &$refused
        }
        #[inline(always)]
        fn src_refused() -> &'static LruHashMap<Self, u64> {
            &$src_refused
        }
        #[inline(always)]
        fn exhausted() -> &'static PerCpuHashMap<PoolKeyOf<Self>, u64> {
            &$exhausted
        }
        #[inline(always)]
        fn overflow() -> &'static PerCpuHashMap<PoolKeyOf<Self>, u64> {
            &$overflow
        }
        #[inline(always)]
        fn endpoints() -> &'static LruHashMap<EndpointOf<Self>, EndpointOf<Self>> {
            &$endpoints
        }
        #[inline(always)]
        fn full() -> &'static LruHashMap<FlowKeyOf<Self>, FullMark> {
            &$full
        }
        #[inline(always)]
        fn free_ports() -> &'static LruHashMap<FlowKeyOf<Self>, FreePorts> {
            &$free_ports
        }
        #[inline(always)]
        fn host_echo() -> &'static LruHashMap<FlowKeyOf<Self>, u64> {
            &$host_echo
        }
        #[inline(always)]
        fn scan() -> &'static PerCpuArray<ScanState<Self>> {
            &$scan
        }
        #[inline(always)]
        fn pending() -> &'static PerCpuArray<Pending<Self>> {
            &$pending
        }
    };
}

impl Family for [u8; 4] {
    type Ip = Ipv4;
    const SLOT_CREATE: u32 = SLOT_CREATE;
    const SLOT_HAIRPIN_DELIVER: u32 = SLOT_HAIRPIN_DELIVER;
    family_maps!(
        SNAT_FWD,
        SNAT_REV,
        SNAT_USE,
        SNAT_REFUSED,
        SNAT_SRC_REFUSED,
        SNAT_EXHAUSTED,
        SNAT_OVERFLOW,
        SNAT_ENDPOINTS,
        SNAT_FULL,
        SNAT_FREE_PORTS,
        SNAT_HOST_ECHO,
        SNAT_SCAN,
        SNAT_PENDING
    );

    #[inline(always)]
    fn internal(a: Self) -> bool {
        crate::cidr::internal(a)
    }
    #[inline(always)]
    fn excluded(a: Self) -> bool {
        crate::cidr::excluded(a)
    }
    #[inline(always)]
    fn nat_count(cfg: &Config, set: u32) -> u32 {
        cfg.nat_ip_count.get(set as usize).copied().unwrap_or(0)
    }
    #[inline(always)]
    fn nat_ip(index: u32) -> Option<NatIpOf<Self>> {
        SNAT_NAT_IPS.get(index).copied()
    }
    #[inline(always)]
    unsafe fn load(p: *const Self) -> Self {
        // SAFETY: per the contract, 4-aligned inside a live value.
        unsafe { core::ptr::read_volatile(p.cast::<u32>()) }.to_ne_bytes()
    }
    #[inline(always)]
    unsafe fn owned_by(p: *const FlowKeyOf<Self>, key: &FlowKeyOf<Self>) -> bool {
        // SAFETY: per the contract; the key is 16 bytes, 8-aligned.
        let stored = unsafe { core::ptr::read_volatile(p.cast::<[u64; 2]>()) };
        let k = key.words();
        if (stored[0] ^ k[0]) | (stored[1] ^ k[1]) == 0 {
            true
        } else {
            count(Counter::RecycledEntry);
            false
        }
    }
    #[inline(always)]
    fn socket_uses(skb: *mut __sk_buff, reply: &FlowKeyOf<Self>, rport: [u8; 2]) -> bool {
        let mut tuple = zero_tuple();
        // SAFETY: writing the IPv4 member of a zeroed plain-data union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes(reply.src_addr);
            t.daddr = u32::from_ne_bytes(reply.dst_addr);
            t.sport = u16::from_ne_bytes(rport);
            t.dport = u16::from_ne_bytes(reply.dst_port);
        }
        socket_exists(skb, reply.proto, &mut tuple, SOCK_TUPLE_V4)
    }
    #[inline(always)]
    fn rewrite_endpoint<C: Packet>(
        ctx: &C,
        ip: &Ipv4,
        side: Side,
        port_off: usize,
        old: Nat,
        new: Nat,
    ) -> Result<(), i64> {
        ctx.rewrite_endpoint(ip.l4(), ip.proto, side, port_off, old, new)
    }
    #[inline(always)]
    fn rewrite_lean(
        ctx: &TcContext,
        ip: &Ipv4,
        port_off: usize,
        old: Nat,
        new: Nat,
    ) -> Result<(), i64> {
        crate::packet::rewrite_with_helpers(ctx, ip.l4(), ip.proto, Side::Src, port_off, old, new)
    }
    #[inline(always)]
    fn checksum_pending<C: Packet>(ctx: &C, ip: &Ipv4, check_off: usize) -> bool {
        ctx.checksum_pending(ip, check_off)
    }
    #[inline(always)]
    fn answer(ctx: &TcContext, ip: &Ipv4, cfg: &Config, now: u64) -> Option<i32> {
        crate::reject::answer(ctx, ip, cfg, now)
    }
    #[inline(always)]
    fn v4(a: Self) -> Option<[u8; 4]> {
        Some(a)
    }
}

impl Family for [u8; 16] {
    type Ip = Ipv6;
    const SLOT_CREATE: u32 = SLOT_CREATE6;
    const SLOT_HAIRPIN_DELIVER: u32 = SLOT_HAIRPIN_DELIVER6;
    family_maps!(
        SNAT_FWD6,
        SNAT_REV6,
        SNAT_USE6,
        SNAT_REFUSED6,
        SNAT_SRC_REFUSED6,
        SNAT_EXHAUSTED6,
        SNAT_OVERFLOW6,
        SNAT_ENDPOINTS6,
        SNAT_FULL6,
        SNAT_FREE_PORTS6,
        SNAT_HOST_ECHO6,
        SNAT_SCAN6,
        SNAT_PENDING6
    );

    #[inline(always)]
    fn internal(a: Self) -> bool {
        SNAT_INTERNAL6.get(Key::new(128, a)).is_some()
    }
    #[inline(always)]
    fn excluded(a: Self) -> bool {
        SNAT_EXCLUDE6.get(Key::new(128, a)).is_some()
    }
    #[inline(always)]
    fn nat_count(cfg: &Config, set: u32) -> u32 {
        cfg.nat_ip_count6.get(set as usize).copied().unwrap_or(0)
    }
    #[inline(always)]
    fn nat_ip(index: u32) -> Option<NatIpOf<Self>> {
        SNAT_NAT_IPS6.get(index).copied()
    }
    #[inline(always)]
    unsafe fn load(p: *const Self) -> Self {
        // SAFETY: per the contract, 8-aligned inside a live value.
        let w = unsafe { core::ptr::read_volatile(p.cast::<[u64; 2]>()) };
        bytemuck::cast(w)
    }
    #[inline(always)]
    unsafe fn owned_by(p: *const FlowKeyOf<Self>, key: &FlowKeyOf<Self>) -> bool {
        // SAFETY: per the contract; the key is 40 bytes, 8-aligned.
        let s = unsafe { core::ptr::read_volatile(p.cast::<[u64; 5]>()) };
        let k = key.words();
        // XORs, not `==`: LLVM may turn a chain of word compares into a `bcmp` call, which BPF
        // cannot make.
        if (s[0] ^ k[0]) | (s[1] ^ k[1]) | (s[2] ^ k[2]) | (s[3] ^ k[3]) | (s[4] ^ k[4]) == 0 {
            true
        } else {
            count(Counter::RecycledEntry);
            false
        }
    }
    #[inline(always)]
    fn socket_uses(skb: *mut __sk_buff, reply: &FlowKeyOf<Self>, rport: [u8; 2]) -> bool {
        let mut tuple = zero_tuple();
        // SAFETY: writing the IPv6 member of a zeroed plain-data union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = bytemuck::cast(reply.src_addr);
            t.daddr = bytemuck::cast(reply.dst_addr);
            t.sport = u16::from_ne_bytes(rport);
            t.dport = u16::from_ne_bytes(reply.dst_port);
        }
        socket_exists(skb, reply.proto, &mut tuple, SOCK_TUPLE_V6)
    }
    #[inline(always)]
    fn rewrite_endpoint<C: Packet>(
        ctx: &C,
        ip: &Ipv6,
        side: Side,
        port_off: usize,
        old: (Self, [u8; 2]),
        new: (Self, [u8; 2]),
    ) -> Result<(), i64> {
        ctx.rewrite_endpoint6(ip.l4(), ip.proto, side, port_off, old, new)
    }
    #[inline(always)]
    fn rewrite_lean(
        ctx: &TcContext,
        ip: &Ipv6,
        port_off: usize,
        old: (Self, [u8; 2]),
        new: (Self, [u8; 2]),
    ) -> Result<(), i64> {
        ctx.rewrite_endpoint6(ip.l4(), ip.proto, Side::Src, port_off, old, new)
    }
    #[inline(always)]
    fn checksum_pending<C: Packet>(_ctx: &C, _ip: &Ipv6, _check_off: usize) -> bool {
        // IPv6 is translated on TC only, whose helpers keep a pending checksum right.
        false
    }
    #[inline(always)]
    fn answer(_ctx: &TcContext, _ip: &Ipv6, cfg: &Config, now: u64) -> Option<i32> {
        crate::reject::answer6(cfg, now)
    }
    #[inline(always)]
    fn v4(_a: Self) -> Option<[u8; 4]> {
        None
    }
}

/// The index in `SNAT_NAT_IPS`/`SNAT_NAT_IPS6` of the `i`-th NAT IP of set `set`.
#[inline(always)]
pub const fn nat_slot(set: u32, i: u32) -> u32 {
    set * MAX_NAT_IPS + i
}
