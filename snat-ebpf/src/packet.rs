//! Reading and rewriting packet fields, on either kind of packet a program sees: a TC skb or an
//! XDP buffer ([`Packet`]).
//!
//! On TC, reads use direct packet access when the bytes are in the linear part of the skb and
//! fall back to `bpf_skb_load_bytes` otherwise, so callers never hold packet pointers across
//! helpers that may move the data. Writes go through the kernel helpers
//! (`bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`), which unclone the skb and keep
//! `skb->csum` (CHECKSUM_COMPLETE) and pending offload (CHECKSUM_PARTIAL) right. The IPv4
//! header checksum, never offloaded, is computed here where that saves helper calls (one store
//! of checksum, addresses and ports: `rewrite_tcp_udp`).
//!
//! On XDP there are no such helpers and no skb state to keep: the frame is linear and written
//! in place, and every checksum is updated with RFC 1624 arithmetic (`snat_common::csum`). What
//! XDP cannot see is whether a frame's L4 checksum is still pending offload (a local sender's
//! CHECKSUM_PARTIAL skb arriving over a veth): such a checksum field holds the pseudo-header
//! sum, not a checksum, and RFC 1624 would corrupt it. [`Packet::checksum_pending`] recognises
//! the field by that value and the XDP program leaves those frames to TC (see `xdp`).

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_ktime_get_coarse_ns, generated::bpf_loop},
    programs::{TcContext, XdpContext},
};
use network_types::ip::Ipv4Hdr;
use snat_common::{csum, flow::proto, Counter};

use crate::family::{Family, IpHeader};

/// Bytes of the Ethernet header in front of IPv4 (the controller only attaches to Ethernet links).
pub const ETH_LEN: usize = 14;
/// EtherType of IPv4 as `skb->protocol` holds it (network byte order).
pub const ETH_P_IP_BE: u32 = 0x0008;

/// IPv4 header field offsets.
pub mod ip {
    pub const CHECK: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// More-fragments flag and fragment offset bits of `frags` (host order).
    pub const MF_OR_OFFSET: u16 = 0x3fff;
    /// Fragment offset bits of `frags` (host order).
    pub const OFFSET: u16 = 0x1fff;
}

/// A packet a program reads and rewrites: the bytes from the Ethernet header on, and the two
/// rewrites snat makes with their checksum updates.
pub trait Packet {
    /// Bytes of the frame, from the Ethernet header.
    fn frame_len(&self) -> usize;

    /// Whether the frame carries IPv4 (untagged, EtherType 0x0800).
    fn is_ipv4(&self) -> bool;

    /// The packet's bytes at `off`, copied out. `T` must be at least 2 bytes: for one byte at a
    /// variable offset LLVM folds the bounds check into a form the verifier does not accept.
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64>;

    /// Writes `v` at `off`, nothing else (no checksum).
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64>;

    /// Rewrites one endpoint of a TCP, UDP or ICMP query packet: the address in the IPv4 header
    /// and the port (TCP/UDP, `port_off` 0 for source or 2 for destination) or echo identifier
    /// (ICMP, `port_off` 4), fixing the IPv4 checksum and the L4 checksum incrementally. A UDP
    /// checksum of 0 stays 0.
    fn rewrite_endpoint(
        &self,
        l4: usize,
        l4_proto: u8,
        side: Side,
        port_off: usize,
        old: Nat,
        new: Nat,
    ) -> Result<(), i64>;

    /// Rewrites the source or destination address of the IPv4 header and its checksum (nothing
    /// else: the caller fixes any checksum that covers the address through a pseudo-header).
    fn rewrite_addr(&self, side: Side, old: [u8; 4], new: [u8; 4]) -> Result<(), i64>;

    /// [`Packet::rewrite_endpoint`] for IPv6 (`l4_proto` as the packet has it: ICMPv6 is 58).
    /// IPv6 is translated on TC only: on XDP this fails (the XDP program passes IPv6 on).
    fn rewrite_endpoint6(
        &self,
        l4: usize,
        l4_proto: u8,
        side: Side,
        port_off: usize,
        old: ([u8; 16], [u8; 2]),
        new: ([u8; 16], [u8; 2]),
    ) -> Result<(), i64>;

    /// Whether the TCP or UDP checksum of `ip` (the field at `check_off`) may still be pending
    /// offload. Only the skb knows for sure, and the TC helpers update either kind right, so on
    /// TC never; on XDP when the field holds what a pending one holds (`csum::may_be_partial`).
    fn checksum_pending(&self, ip: &Ipv4, check_off: usize) -> bool;
}

/// The packet's bytes at `off`, copied out (see [`Packet::read`]).
#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Packet, off: usize) -> Result<T, i64> {
    ctx.read(off)
}

/// Direct access to `size` bytes at `off` of the linear data `[start, end)`, if they are there.
#[inline(always)]
fn direct(start: usize, end: usize, off: usize, size: usize) -> Option<usize> {
    (start + off + size <= end).then_some(start + off)
}

impl Packet for TcContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn is_ipv4(&self) -> bool {
        self.skb.protocol() == ETH_P_IP_BE
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64> {
        match direct(self.data(), self.data_end(), off, size_of::<T>()) {
            // SAFETY: the range lies inside the linear packet data (checked by `direct`); the
            // read is unaligned because packet fields have no alignment guarantee.
            Some(at) => Ok(unsafe { core::ptr::read_unaligned(at as *const T) }),
            None => self.load::<T>(off),
        }
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64> {
        TcContext::store(self, off, v, 0)
    }

    #[inline(always)]
    fn rewrite_endpoint(
        &self,
        l4: usize,
        l4_proto: u8,
        side: Side,
        port_off: usize,
        old: Nat,
        new: Nat,
    ) -> Result<(), i64> {
        if l4 == ETH_LEN + 20 && l4_proto != proto::ICMP && port_off <= 2 {
            let check = l4 + l4_check_offset(l4_proto);
            return rewrite_tcp_udp(self, check, mangled(l4_proto), side, port_off, old, new);
        }
        rewrite_with_helpers(self, l4, l4_proto, side, port_off, old, new)
    }

    #[inline(always)]
    fn rewrite_addr(&self, side: Side, old: [u8; 4], new: [u8; 4]) -> Result<(), i64> {
        let (from, to) = (
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new)),
        );
        self.l3_csum_replace(ETH_LEN + ip::CHECK, from, to, 4)?;
        TcContext::store(self, side.addr_off(), &new, 0)
    }

    #[inline(always)]
    fn rewrite_endpoint6(
        &self,
        l4: usize,
        l4_proto: u8,
        side: Side,
        port_off: usize,
        old: ([u8; 16], [u8; 2]),
        new: ([u8; 16], [u8; 2]),
    ) -> Result<(), i64> {
        crate::packet6::rewrite_endpoint(self, l4, l4_proto, side, port_off, old, new)
    }

    #[inline(always)]
    fn checksum_pending(&self, _ip: &Ipv4, _check_off: usize) -> bool {
        false
    }
}

/// `BPF_F_MARK_MANGLED_0` for UDP (a zero checksum stays zero), nothing for the others.
#[inline(always)]
fn mangled(l4_proto: u8) -> u64 {
    if l4_proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// [`Packet::rewrite_endpoint`] on TC one field at a time, each with its helper: any header
/// (IPv4 options, ICMP), and the one `snat_create` uses (a smaller stack frame: the allocation
/// leaves little room, and only a flow's first packet goes that way).
#[inline(always)]
pub fn rewrite_with_helpers(
    ctx: &TcContext,
    l4: usize,
    l4_proto: u8,
    side: Side,
    port_off: usize,
    old: Nat,
    new: Nat,
) -> Result<(), i64> {
    let check = l4 + l4_check_offset(l4_proto);
    let mangled = mangled(l4_proto);
    if old.0 != new.0 {
        if l4_proto != proto::ICMP {
            // TCP and UDP checksums cover the addresses through the pseudo-header.
            l4_csum_addr(ctx, check, mangled, old.0, new.0)?;
        }
        Packet::rewrite_addr(ctx, side, old.0, new.0)?;
    }
    if old.1 != new.1 {
        l4_csum_port(ctx, check, mangled, old.1, new.1)?;
        TcContext::store(ctx, l4 + port_off, &new.1, 0)?;
    }
    Ok(())
}

/// Updates the TCP/UDP checksum at `check` for an address change (through the pseudo-header,
/// so a checksum pending offload is updated as one).
#[inline(always)]
fn l4_csum_addr(
    ctx: &TcContext,
    check: usize,
    mangled: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), i64> {
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(check, from, to, u64::from(BPF_F_PSEUDO_HDR) | mangled | 4)
}

/// Updates the L4 checksum at `check` for a port (or identifier) change.
#[inline(always)]
fn l4_csum_port(
    ctx: &TcContext,
    check: usize,
    mangled: u64,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), i64> {
    let (from, to) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(check, from, to, mangled | 2)
}

/// Bytes from the IPv4 checksum to the end of the ports of a header without options: checksum,
/// source, destination, source port, destination port.
const HEAD_SPAN: usize = 14;

/// [`Packet::rewrite_endpoint`] on TC for a TCP or UDP packet whose IPv4 header has no options
/// (nearly all): the L4 checksum through the helpers (only they keep a checksum pending offload
/// right), then the IPv4 checksum computed here (it is never offloaded) and written with the
/// address and the port in one store — three helper calls instead of five.
#[inline(always)]
fn rewrite_tcp_udp(
    ctx: &TcContext,
    check: usize,
    mangled: u64,
    side: Side,
    port_off: usize,
    old: Nat,
    new: Nat,
) -> Result<(), i64> {
    let at = ETH_LEN + ip::CHECK;
    let mut head: [u8; HEAD_SPAN] = ctx.read(at)?;
    if old.0 != new.0 {
        l4_csum_addr(ctx, check, mangled, old.0, new.0)?;
    }
    if old.1 != new.1 {
        l4_csum_port(ctx, check, mangled, old.1, new.1)?;
    }
    let ip_check = csum::replace32(u16::from_be_bytes([head[0], head[1]]), old.0, new.0);
    let (addr, port) = match side {
        Side::Src => (2, 10 + port_off),
        Side::Dst => (6, 10 + port_off),
    };
    head[..2].copy_from_slice(&ip_check.to_be_bytes());
    if let Some(a) = head.get_mut(addr..addr + 4) {
        a.copy_from_slice(&new.0);
    }
    if let Some(p) = head.get_mut(port..port + 2) {
        p.copy_from_slice(&new.1);
    }
    TcContext::store(ctx, at, &head, 0)
}

impl Packet for XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn is_ipv4(&self) -> bool {
        Packet::read::<[u8; 2]>(self, 12) == Ok([0x08, 0x00])
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, i64> {
        let at = direct(self.data(), self.data_end(), off, size_of::<T>()).ok_or(-1)?;
        // SAFETY: the range lies inside the frame (checked by `direct`; snat's XDP program does
        // not take multi-buffer frames, so the frame is all linear); unaligned, as above.
        Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Result<(), i64> {
        let at = direct(self.data(), self.data_end(), off, size_of::<T>()).ok_or(-1)?;
        // SAFETY: as in `read`; the frame is this program's to write.
        unsafe { core::ptr::write_unaligned(at as *mut T, core::ptr::read(v)) };
        Ok(())
    }

    #[inline(always)]
    fn rewrite_endpoint(
        &self,
        l4: usize,
        l4_proto: u8,
        side: Side,
        port_off: usize,
        old: Nat,
        new: Nat,
    ) -> Result<(), i64> {
        let check = l4 + l4_check_offset(l4_proto);
        let c: [u8; 2] = Packet::read(self, check)?;
        let c = csum::rewrite_l4(l4_proto, u16::from_be_bytes(c), old, new);
        Packet::store(self, check, &c.to_be_bytes())?;
        if old.1 != new.1 {
            Packet::store(self, l4 + port_off, &new.1)?;
        }
        if old.0 != new.0 {
            Packet::rewrite_addr(self, side, old.0, new.0)?;
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_addr(&self, side: Side, old: [u8; 4], new: [u8; 4]) -> Result<(), i64> {
        let off = ETH_LEN + ip::CHECK;
        let c: [u8; 2] = Packet::read(self, off)?;
        let c = csum::replace32(u16::from_be_bytes(c), old, new);
        Packet::store(self, off, &c.to_be_bytes())?;
        Packet::store(self, side.addr_off(), &new)
    }

    #[inline(always)]
    fn rewrite_endpoint6(
        &self,
        _l4: usize,
        _l4_proto: u8,
        _side: Side,
        _port_off: usize,
        _old: ([u8; 16], [u8; 2]),
        _new: ([u8; 16], [u8; 2]),
    ) -> Result<(), i64> {
        Err(-1)
    }

    #[inline(always)]
    fn checksum_pending(&self, ip: &Ipv4, check_off: usize) -> bool {
        let Ok(c) = Packet::read::<[u8; 2]>(self, check_off) else {
            // Unreadable here: TC reads what XDP cannot.
            return true;
        };
        let check = u16::from_be_bytes(c);
        if ip.proto == proto::UDP && check == 0 {
            return false; // no checksum at all
        }
        let len = ip.l4_len(self);
        len > usize::from(u16::MAX)
            || csum::may_be_partial(check, ip.src, ip.dst, ip.proto, len as u16)
    }
}

/// What the programs need of an IPv4 header, read once.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub version: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Header length in bytes (20..=60 once [`Ipv4::valid`] holds).
    pub ihl: usize,
    pub tot_len: u16,
    pub frags: u16,
    pub id: [u8; 2],
}

impl Ipv4 {
    #[inline(always)]
    pub fn read<C: Packet>(ctx: &C) -> Result<Self, i64> {
        let h: Ipv4Hdr = read(ctx, ETH_LEN)?;
        Ok(Self {
            version: h.vihl >> 4,
            src: h.src_addr,
            dst: h.dst_addr,
            proto: h.proto,
            ihl: usize::from(h.vihl & 0x0f) * 4,
            tot_len: u16::from_be_bytes(h.tot_len),
            frags: u16::from_be_bytes(h.frags),
            id: h.id,
        })
    }

    /// Version 4, a header of 20–60 bytes, and a total length that fits the header and the
    /// frame. (`tot_len` 0 is accepted: IPv4 BIG TCP super-packets carry it.)
    #[inline(always)]
    pub fn valid<C: Packet>(&self, ctx: &C) -> bool {
        let frame = ctx.frame_len();
        let tot = usize::from(self.tot_len);
        self.version == 4
            && self.ihl >= 20
            && (tot == 0 && frame > ETH_LEN + 60 || tot >= self.ihl && ETH_LEN + tot <= frame)
    }

    /// A fragment other than a whole datagram (MF set or a non-zero offset).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frags & ip::MF_OR_OFFSET != 0
    }

    /// A fragment after the first: no L4 header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frags & ip::OFFSET != 0
    }

    /// The key of this packet's datagram in `SNAT_FRAGS`.
    #[inline(always)]
    pub fn frag_key(&self) -> snat_common::flow::FragKey {
        snat_common::flow::FragKey {
            src: self.src,
            dst: self.dst,
            id: self.id,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// Offset of the L4 header in the frame.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        ETH_LEN + self.ihl
    }

    /// Bytes after the IP header according to `tot_len` (or to the frame when it is 0).
    #[inline(always)]
    pub fn l4_len<C: Packet>(&self, ctx: &C) -> usize {
        if self.tot_len == 0 {
            ctx.frame_len().saturating_sub(self.l4())
        } else {
            usize::from(self.tot_len).saturating_sub(self.ihl)
        }
    }
}

/// What snat needs of a TCP header, read once (the first 16 bytes).
#[derive(Clone, Copy)]
pub struct Tcp {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: u32,
    pub ack: u32,
    /// Header length in bytes (from the data offset).
    pub doff: usize,
    /// Header flag bits (`snat_common::tcp::header`).
    pub flags: u8,
    /// The window field, unscaled.
    pub window: [u8; 2],
}

impl Tcp {
    #[inline(always)]
    pub fn read<C: Packet>(ctx: &C, l4: usize) -> Result<Self, i64> {
        let h: [u8; 16] = read(ctx, l4)?;
        Ok(Self {
            sport: [h[0], h[1]],
            dport: [h[2], h[3]],
            seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            doff: usize::from(h[12] >> 4) * 4,
            flags: h[13],
            window: [h[14], h[15]],
        })
    }

    /// The window scale announced in the options of this SYN (RFC 7323 §2), 0 without one.
    /// Walks at most the 40 option bytes, in a `bpf_loop` so the verifier checks one step.
    #[inline(always)]
    pub fn window_scale(&self, ctx: &TcContext, l4: usize) -> u8 {
        if self.doff <= 20 {
            return 0;
        }
        let mut walk = Options {
            skb: ctx.skb.skb,
            off: (l4 + 20) as u32,
            end: (l4 + self.doff) as u32,
            wscale: 0,
        };
        // SAFETY: `option_step` has the callback signature `bpf_loop` expects and only touches
        // `walk`, which outlives the call.
        unsafe {
            bpf_loop(
                40,
                option_step as *mut core::ffi::c_void,
                (&raw mut walk).cast(),
                0,
            );
        }
        walk.wscale
    }
}

/// State of a walk over TCP options, shared with the `bpf_loop` callback.
#[repr(C)]
struct Options {
    skb: *mut __sk_buff,
    /// Frame offsets of the next option and of the end of the header.
    off: u32,
    end: u32,
    wscale: u8,
}

/// TCP option kinds the walk knows.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_WSCALE: u8 = 3;

/// One option: stop (return 1) at the end, at a malformed option or once the window scale is
/// found; otherwise step over it.
extern "C" fn option_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `window_scale` gave it, to a live `Options`.
    let o = unsafe { &mut *ctx.cast::<Options>() };
    if o.off >= o.end {
        return 1;
    }
    let skb = TcContext::new(o.skb);
    // Two bytes (kind, length); a NOP in the header's last byte has no second byte: then stop.
    let Ok([kind, len]) = skb.load::<[u8; 2]>(o.off as usize) else {
        return 1;
    };
    match kind {
        OPT_END => 1,
        OPT_NOP => {
            o.off += 1;
            0
        }
        OPT_WSCALE => {
            if len == 3 && o.off + 3 <= o.end {
                if let Ok([_, shift]) = skb.load::<[u8; 2]>(o.off as usize + 1) {
                    o.wscale = if shift > 14 { 14 } else { shift };
                }
            }
            1
        }
        _ if len < 2 => 1,
        _ => {
            o.off += u32::from(len);
            0
        }
    }
}

/// Offset of the checksum inside an L4 header of `proto`.
#[inline(always)]
pub const fn l4_check_offset(proto: u8) -> usize {
    match proto {
        proto::TCP => 16,
        proto::UDP => 6,
        _ => 2, // ICMP
    }
}

/// A NAT endpoint: address and port (or echo identifier).
pub type Nat = ([u8; 4], [u8; 2]);

/// Rewrites the source of a TCP or UDP packet (or of an echo request: `p` is the key's
/// protocol, `proto::ICMP` for either family's echo) from `old` to `nat`, and remembers a first
/// fragment's translation for the fragments after it.
#[inline(always)]
pub fn translate<A: Family>(
    ctx: &TcContext,
    ip: &A::Ip,
    p: u8,
    old: (A, [u8; 2]),
    nat: (A, [u8; 2]),
) -> Result<(), Counter> {
    let port_off = if p == proto::ICMP { 4 } else { 0 };
    A::rewrite_endpoint(ctx, ip, Side::Src, port_off, old, nat)
        .map_err(|_| Counter::EgressDropRewrite)?;
    fragment_translated::<A>(ip, nat.0);
    Ok(())
}

/// [`translate`] with the rewrite that needs the least stack (in `snat_create`).
#[inline(always)]
pub fn translate_lean<A: Family>(
    ctx: &TcContext,
    ip: &A::Ip,
    p: u8,
    old: (A, [u8; 2]),
    nat: (A, [u8; 2]),
) -> Result<(), Counter> {
    let port_off = if p == proto::ICMP { 4 } else { 0 };
    A::rewrite_lean(ctx, ip, port_off, old, nat).map_err(|_| Counter::EgressDropRewrite)?;
    fragment_translated::<A>(ip, nat.0);
    Ok(())
}

/// A first fragment was translated to (or back to) `addr`: remembered for the ones after it.
#[inline(always)]
pub fn fragment_translated<A: Family>(ip: &A::Ip, addr: A) {
    if ip.is_fragment() {
        // SAFETY: helper without preconditions.
        ip.remember(addr, unsafe { bpf_ktime_get_coarse_ns() });
    }
}

/// Which endpoint of a packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

impl Side {
    #[inline(always)]
    const fn addr_off(self) -> usize {
        match self {
            Side::Src => ETH_LEN + ip::SRC,
            Side::Dst => ETH_LEN + ip::DST,
        }
    }
}

/// Rewrites an address of the IPv4 header (see [`Packet::rewrite_addr`]).
#[inline(always)]
pub fn rewrite_addr<C: Packet>(ctx: &C, side: Side, old: [u8; 4], new: [u8; 4]) -> Result<(), i64> {
    ctx.rewrite_addr(side, old, new)
}
