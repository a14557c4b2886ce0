//! IPv6 headers: the fixed header and the extension header walk ([`Ipv6::walk`], with the
//! step function of `snat_common::ip6`), the TC rewrite of an endpoint (no header checksum:
//! the address change reaches the L4 checksum through the pseudo-header, which ICMPv6 covers
//! too), and the datagram an ICMPv6 error quotes ([`Inner6`]).
//!
//! Checksum note: every IPv6 upper-layer checksum covers the addresses, so an address change and
//! its checksum update leave the one's complement sum of the packet unchanged, and a
//! `CHECKSUM_COMPLETE` `skb->csum` stays valid (`BPF_F_IPV6` tells the helper so; kernels before
//! 6.16 do not know the flag, and the rewrite retries without it).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use snat_common::{
    flow::{proto, FragKey6},
    ip6::{self, icmp6, next_header, Step, HEADER_LEN, MAX_EXT_HEADERS},
};

use crate::{
    family::IpHeader,
    maps::remember_fragments6,
    packet::{l4_check_offset, read, Packet, Side, ETH_LEN},
};

/// Bounds of the offsets kept in map memory (see [`Ipv6::l4_at`]): the walk never ends past
/// `L4_MAX` (six extension headers of at most 2,048 bytes), and a quote's offsets lie within
/// `L4_MASK` of the frame's start.
const L4_MAX: usize = 0x3fff;
const L4_MASK: usize = 0x7fff;

/// EtherType of IPv6 as `skb->protocol` holds it (network byte order).
pub const ETH_P_IPV6_BE: u32 = 0xdd86;

/// `bpf_l4_csum_replace`: the packet is IPv6 (its address changes need no `skb->csum` fix).
const BPF_F_IPV6: u64 = 1 << 7;
const EINVAL: i64 = -22;

/// Offsets of the addresses in the fixed header.
const SRC: usize = 8;
const DST: usize = 24;

/// Why [`Ipv6::walk`] found no upper-layer header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not version 6, a payload length beyond the frame, or a chain that runs past it.
    Malformed,
    /// A header the walk does not step over, a second fragment header, or too many headers.
    ExtHeaders,
}

/// What snat needs of an IPv6 packet, read once: the fixed header, and where the upper-layer
/// header is after the extension headers. Lives in this CPU's `SNAT_HEADER6` slot (see
/// [`Ipv6::fixed`]): the IPv6 paths have no stack to spare for it.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Ipv6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Frame offset of the upper-layer header (of a later fragment's data): read it through
    /// [`IpHeader::l4`], which bounds it for the verifier (the slot is memory, whose values it
    /// knows nothing about).
    pub l4_at: usize,
    /// The upper-layer protocol (for a later fragment: its fragment header's next header).
    pub proto: u8,
    /// 0: not fragmented (or an atomic fragment), 1: a first fragment, 2: a later fragment.
    pub frag: u8,
    /// The fragment header's next header and identification (fragments only).
    pub frag_next: u8,
    pub version: u8,
    pub frag_id: [u8; 4],
    /// The fixed header's payload length (0: a jumbogram or a BIG TCP packet; the frame says).
    pub payload_len: u16,
    pub _pad: [u8; 6],
}

impl Ipv6 {
    /// This CPU's header slot, holding the packet's fixed header (its source decides whose
    /// packet it is before anything else is read); `Err` when it cannot be read.
    #[inline(always)]
    pub fn fixed<C: Packet>(ctx: &C) -> Result<&'static mut Self, ()> {
        let p = crate::maps::SNAT_HEADER6.get_ptr_mut(0).ok_or(())?;
        // SAFETY: this CPU's slot, used by this program only until it returns (TC programs
        // do not nest on a CPU).
        let ip = unsafe { &mut *p };
        let h: [u8; 8] = read(ctx, ETH_LEN).map_err(|_| ())?;
        ip.src = read(ctx, ETH_LEN + SRC).map_err(|_| ())?;
        ip.dst = read(ctx, ETH_LEN + DST).map_err(|_| ())?;
        ip.version = h[0] >> 4;
        ip.payload_len = u16::from_be_bytes([h[4], h[5]]);
        ip.proto = h[6];
        ip.l4_at = ETH_LEN + HEADER_LEN;
        ip.frag = 0;
        ip.frag_next = 0;
        ip.frag_id = [0; 4];
        Ok(ip)
    }

    /// Walks the extension headers after the fixed header (at most `MAX_EXT_HEADERS`), leaving
    /// `l4` and `proto` at the upper-layer header.
    #[inline(never)]
    pub fn walk(&mut self, ctx: &TcContext) -> Result<(), Bad> {
        let frame = ctx.frame_len();
        if self.version != ip6::VERSION
            || (self.payload_len != 0
                && ETH_LEN + HEADER_LEN + usize::from(self.payload_len) > frame)
        {
            return Err(Bad::Malformed);
        }
        // In registers while walking, where the verifier follows their bounds.
        let (mut l4, mut next) = (ETH_LEN + HEADER_LEN, self.proto);
        let mut fragments = 0;
        for _ in 0..=MAX_EXT_HEADERS {
            if !ip6::is_walked(next) || self.frag == 2 {
                break;
            }
            let hdr: [u8; 8] = read(ctx, l4).map_err(|_| Bad::Malformed)?;
            match ip6::step(next, hdr) {
                Step::Skip { next_header, len } => {
                    l4 += len;
                    next = next_header;
                }
                Step::Fragment(fr) => {
                    fragments += 1;
                    if fragments > 1 {
                        return Err(Bad::ExtHeaders);
                    }
                    l4 += ip6::Fragment::LEN;
                    next = fr.next_header;
                    self.frag_next = fr.next_header;
                    self.frag_id = fr.id;
                    self.frag = if !fr.is_first() {
                        2
                    } else if fr.is_atomic() {
                        0
                    } else {
                        1
                    };
                }
                Step::Upper(_) | Step::Unsupported(_) => return Err(Bad::ExtHeaders),
            }
        }
        if self.frag != 2 && !matches!(ip6::step(next, [0; 8]), Step::Upper(_)) {
            // An unsupported header, or still an extension header after the last round.
            return Err(Bad::ExtHeaders);
        }
        if l4 > frame || l4 > L4_MAX {
            return Err(Bad::Malformed);
        }
        self.l4_at = l4;
        self.proto = next;
        Ok(())
    }

    /// A fragment after the first: no upper-layer header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag == 2
    }

    /// The key of this packet's datagram in `SNAT_FRAGS6`.
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey6 {
        FragKey6 {
            src: self.src,
            dst: self.dst,
            id: self.frag_id,
            proto: self.frag_next,
            _pad: [0; 3],
        }
    }
}

impl IpHeader<[u8; 16]> for Ipv6 {
    #[inline(always)]
    fn src(&self) -> [u8; 16] {
        self.src
    }
    #[inline(always)]
    fn dst(&self) -> [u8; 16] {
        self.dst
    }
    #[inline(always)]
    fn l4(&self) -> usize {
        self.l4_at & L4_MAX
    }
    #[inline(always)]
    fn l4_len<C: Packet>(&self, ctx: &C) -> usize {
        let end = if self.payload_len == 0 {
            ctx.frame_len()
        } else {
            ETH_LEN + HEADER_LEN + usize::from(self.payload_len)
        };
        end.saturating_sub(IpHeader::l4(self))
    }
    #[inline(always)]
    fn is_fragment(&self) -> bool {
        self.frag != 0
    }
    #[inline(always)]
    fn remember(&self, addr: [u8; 16], now: u64) {
        remember_fragments6(&self.frag_key(), addr, now);
    }
}

/// Whether two addresses are equal, word by word (no `bcmp` call, which BPF cannot make).
#[inline(always)]
pub fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b): ([u64; 2], [u64; 2]) = (bytemuck::cast(*a), bytemuck::cast(*b));
    (a[0] ^ b[0]) | (a[1] ^ b[1]) == 0
}

// Checksum arithmetic in native byte order on 32-bit words (RFC 1624 `~m + m'` summed over the
// words of a field, as the kernel's `inet_proto_csum_replace16` does): fields are read as they
// lie in the packet, with no byte swapping and no per-byte work, which keeps the stack small.
// `snat_common::ip6` holds the reference arithmetic the tests check against.

/// `Σ(~m + m')` over the four native 32-bit words of a 16-byte field changing from `old` to `new`.
#[inline(always)]
pub fn diff128(old: &[u8; 16], new: &[u8; 16]) -> u64 {
    let (o, n): ([u32; 4], [u32; 4]) = (bytemuck::cast(*old), bytemuck::cast(*new));
    u64::from(!o[0])
        + u64::from(!o[1])
        + u64::from(!o[2])
        + u64::from(!o[3])
        + u64::from(n[0])
        + u64::from(n[1])
        + u64::from(n[2])
        + u64::from(n[3])
}

/// `~m + m'` of a 16-bit field (as it lies in the packet).
#[inline(always)]
pub fn diff16(old: [u8; 2], new: [u8; 2]) -> u64 {
    u64::from(!u16::from_ne_bytes(old)) + u64::from(u16::from_ne_bytes(new))
}

/// Folds a one's complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum field `check` (as it lies in the packet) after changes summing to `diff`.
#[inline(always)]
pub fn apply(check: [u8; 2], diff: u64) -> [u8; 2] {
    (!fold(u64::from(!u16::from_ne_bytes(check)) + diff)).to_ne_bytes()
}

/// Frame offset of the source or destination address.
#[inline(always)]
pub const fn addr_off(side: Side) -> usize {
    match side {
        Side::Src => ETH_LEN + SRC,
        Side::Dst => ETH_LEN + DST,
    }
}

/// `bpf_l4_csum_replace` with `flags`, adding `BPF_F_IPV6` where the kernel knows it.
#[inline(always)]
fn l4_replace(ctx: &TcContext, check: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
    match ctx.l4_csum_replace(check, from, to, flags | BPF_F_IPV6) {
        Err(EINVAL) => ctx.l4_csum_replace(check, from, to, flags),
        r => r,
    }
}

/// Rewrites one endpoint of a TCP, UDP or ICMPv6 echo packet on TC: the address in the fixed
/// header and the port (`port_off` 0 or 2) or echo identifier (4), the L4 checksum through the
/// helpers (so a checksum pending offload stays right). A UDP result of 0 is sent as 0xffff
/// (`BPF_F_MARK_MANGLED_0`); the caller drops a pod's UDP datagram without a checksum first.
#[inline(always)]
pub fn rewrite_endpoint(
    ctx: &TcContext,
    l4: usize,
    l4_proto: u8,
    side: Side,
    port_off: usize,
    old: ([u8; 16], [u8; 2]),
    new: ([u8; 16], [u8; 2]),
) -> Result<(), i64> {
    let check = l4 + l4_check_offset(l4_proto);
    let mangled = if l4_proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if !same(&old.0, &new.0) {
        let diff = u64::from(fold(diff128(&old.0, &new.0)));
        l4_replace(ctx, check, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | mangled)?;
        TcContext::store(ctx, addr_off(side), &new.0, 0)?;
    }
    if old.1 != new.1 {
        let (from, to) = (
            u64::from(u16::from_ne_bytes(old.1)),
            u64::from(u16::from_ne_bytes(new.1)),
        );
        ctx.l4_csum_replace(check, from, to, mangled | 2)?;
        TcContext::store(ctx, l4 + port_off, &new.1, 0)?;
    }
    Ok(())
}

/// What [`Inner6::rewrite`] changes.
#[derive(Clone, Copy)]
pub struct QuoteChange {
    /// The quoted endpoint that changes, and to what.
    pub side: Side,
    pub new: ([u8; 16], [u8; 2]),
    /// The outer address that changes with it, to `outer_to` (`outer_side` is `None` when
    /// none does).
    pub outer_side: Option<Side>,
    pub outer_to: [u8; 16],
}

/// The datagram an ICMPv6 error quotes (its fixed header directly followed by TCP, UDP or an
/// echo; see `snat_common::ip6::icmp6::quoted_flow`), with the key of its flow and the change
/// to make: kept in this CPU's `SNAT_QUOTE6` slot, not on the stack, which the IPv6 paths fill.
#[repr(C)]
pub struct Inner6 {
    /// Offsets in the frame of the ICMPv6 header, the quoted fixed header and the quoted
    /// upper-layer header, and how many bytes of that are there.
    pub icmp: u32,
    pub ip: u32,
    pub l4: u32,
    pub l4_avail: u32,
    /// The quoted protocol as keys have it (`proto::ICMP` for an echo), and as the packet has it.
    pub proto: u8,
    pub raw_proto: u8,
    pub _pad: [u8; 6],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub _pad2: [u8; 4],
    /// The key the caller looks up ([`Inner6::forward_key_of_reply`] or
    /// [`Inner6::reply_key_of_sent`]).
    pub key: snat_common::FlowKey6,
    pub change: QuoteChange,
}

impl Inner6 {
    /// This CPU's slot, filled with the datagram quoted by the ICMPv6 error in `outer`; `None`
    /// when there is no such datagram to translate.
    #[inline(never)]
    pub fn parse(ctx: &TcContext, outer: &Ipv6) -> Option<&'static mut Self> {
        let q = crate::maps::SNAT_QUOTE6.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot, used by this program only until it returns.
        let q = unsafe { &mut *q };
        let icmp = outer.l4();
        let quoted = outer.l4_len(ctx).checked_sub(icmp6::QUOTE_OFFSET)?;
        if quoted < HEADER_LEN + 8 {
            return None;
        }
        let ip = icmp + icmp6::QUOTE_OFFSET;
        let h: [u8; HEADER_LEN] = read(ctx, ip).ok()?;
        let l4 = ip + HEADER_LEN;
        let head: [u8; 8] = read(ctx, l4).ok()?;
        let f = icmp6::quoted_flow(&h, &head)?;
        q.icmp = icmp as u32;
        q.ip = ip as u32;
        q.l4 = l4 as u32;
        q.l4_avail = (quoted - HEADER_LEN) as u32;
        q.raw_proto = f.proto;
        q.proto = if f.proto == next_header::ICMPV6 {
            proto::ICMP
        } else {
            f.proto
        };
        q.src = f.src;
        q.dst = f.dst;
        q.sport = f.sport;
        q.dport = f.dport;
        Some(q)
    }

    /// Rewrites the quoted endpoint `change.side` to `change.new`, its checksum when quoted,
    /// and the outer address `change.outer_side` with it, with the ICMPv6 checksum updated for
    /// all of it (it covers the outer addresses through the pseudo-header).
    #[inline(never)]
    pub fn rewrite(&self, ctx: &TcContext) -> Result<(), i64> {
        let c = &self.change;
        let (ip, l4) = (self.ip as usize & L4_MASK, self.l4 as usize & L4_MASK);
        let (inner_addr, old_addr, old_port) = match c.side {
            Side::Src => (ip + SRC, &self.src, self.sport),
            Side::Dst => (ip + DST, &self.dst, self.dport),
        };
        let port_off = match (self.proto, c.side) {
            (proto::ICMP, _) => l4 + 4,
            (_, Side::Src) => l4,
            (_, Side::Dst) => l4 + 2,
        };
        let icmp_check = (self.icmp as usize & L4_MASK) + 2;
        // Everything the ICMPv6 checksum sees change: the quoted endpoint, the quoted checksum,
        // and the outer address through the pseudo-header.
        let endpoint = diff128(old_addr, &c.new.0) + diff16(old_port, c.new.1);
        let mut total = endpoint;
        let rel = l4_check_offset(self.raw_proto);
        if self.l4_avail as usize >= rel + 2 {
            let off = l4 + rel;
            let old: [u8; 2] = read(ctx, off)?;
            // A quoted UDP checksum of 0 (none) stays 0.
            if !(self.raw_proto == proto::UDP && old == [0; 2]) {
                let mut new_c = apply(old, endpoint);
                if self.raw_proto == proto::UDP && new_c == [0; 2] {
                    new_c = [0xff; 2];
                }
                total += diff16(old, new_c);
                Packet::store(ctx, off, &new_c)?;
            }
        }
        if let Some(side) = c.outer_side {
            let at = addr_off(side);
            let from: [u8; 16] = read(ctx, at)?;
            total += diff128(&from, &c.outer_to);
            Packet::store(ctx, at, &c.outer_to)?;
        }
        let check: [u8; 2] = read(ctx, icmp_check)?;
        Packet::store(ctx, inner_addr, &c.new.0)?;
        Packet::store(ctx, port_off, &c.new.1)?;
        Packet::store(ctx, icmp_check, &apply(check, total))?;
        Ok(())
    }

    /// For a quote of a reply on its way to a pod (an error egress sees): its flow's forward
    /// key, into `self.key`.
    #[inline(always)]
    pub fn key_of_reply(&mut self) {
        self.key.src_addr = self.dst;
        self.key.dst_addr = self.src;
        self.key.src_port = self.dport;
        self.key.dst_port = snat_common::FlowKey6::remote_port_for(self.proto, self.sport);
        self.key.proto = self.proto;
        self.key._pad = [0; 3];
    }

    /// For a quote of a translated packet (an error ingress sees): its mapping's reply key,
    /// into `self.key`.
    #[inline(always)]
    pub fn key_of_sent(&mut self) {
        self.key.src_addr = self.dst;
        self.key.dst_addr = self.src;
        self.key.src_port = snat_common::FlowKey6::remote_port_for(self.proto, self.dport);
        self.key.dst_port = self.sport;
        self.key.proto = self.proto;
        self.key._pad = [0; 3];
    }
}
