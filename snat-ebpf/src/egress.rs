//! Egress on the uplink: translate the source of packets from internal CIDRs.
//!
//! Every IPv4 packet whose source is internal and whose destination is not excluded leaves
//! translated or not at all: anything that cannot be translated (malformed, fragment, unsupported
//! protocol or ICMP type, no port left, table full, a helper failing) is dropped and counted.
//!
//! The node's own packets pass untouched, with two exceptions that keep pod addresses in: an ICMP
//! error the node sends about a reply it was forwarding to a pod (fragmentation needed, host
//! unreachable, time exceeded) has its quote translated back to the NAT endpoint, or is dropped
//! when no mapping explains it; and the node's own echo requests are remembered so that pods are
//! not given the identifiers its ping sockets use.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use snat_common::{
    flow::proto,
    tcp::{self, header},
    Counter, FlowKey, FlowKeyOf, MappingOf,
};

use crate::{
    alloc::{self, Syn},
    block,
    family::{self, Family, IpHeader},
    icmp::{self, kind, Inner},
    mapping::{self, Forward},
    maps::{count, expiry_event, fragments_of, SNAT_HOST_ECHO, SNAT_PROGRAMS},
    packet::{read, rewrite_addr, translate, Ipv4, Side, Tcp, ETH_P_IP_BE},
    packet6::ETH_P_IPV6_BE,
    verdict::{Stop, Verdict},
};

#[inline(always)]
pub fn internal(addr: [u8; 4]) -> bool {
    <[u8; 4]>::internal(addr)
}

#[inline(always)]
fn excluded(addr: [u8; 4]) -> bool {
    <[u8; 4]>::excluded(addr)
}

#[inline(always)]
pub fn run(ctx: &TcContext) -> Verdict {
    if ctx.skb.protocol() == ETH_P_IPV6_BE && family::ipv6_on() {
        // IPv6 has a program (and a stack frame) of its own: no return on success.
        // SAFETY: a tail call from the program's own frame.
        unsafe { SNAT_PROGRAMS.tail_call(ctx, snat_common::SLOT_EGRESS6) };
        // No IPv6 program: what is not a pod's passes, as before NAT66; a pod's must not leave.
        return match read::<[u8; 16]>(ctx, crate::packet::ETH_LEN + 8) {
            Ok(src) if <[u8; 16]>::internal(src) => Err(Counter::EgressDropNoAllocator.into()),
            _ => Ok(Counter::EgressPassNotIpv4),
        };
    }
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return Ok(Counter::EgressPassNotIpv4);
    }
    // Without a readable header there is no telling whose packet it is: it must not leave.
    let ip = Ipv4::read(ctx).map_err(|_| Counter::EgressDropMalformed)?;
    if !internal(ip.src) {
        return from_node(ctx, &ip);
    }
    if excluded(ip.dst) {
        return Ok(Counter::EgressPassExcluded);
    }
    if !ip.valid(ctx) {
        return Err(Counter::EgressDropMalformed.into());
    }
    if ip.is_later_fragment() {
        return later_fragment(ctx, &ip);
    }
    match ip.proto {
        proto::TCP => tcp::<[u8; 4]>(ctx, &ip, false),
        proto::UDP => udp::<[u8; 4]>(ctx, &ip, false),
        proto::ICMP => icmp(ctx, &ip),
        _ => Err(Counter::EgressDropUnsupportedProto.into()),
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A packet of the node itself (its source is not internal): passed, but an ICMP error quoting
/// a pod is translated or dropped, and echo requests are remembered (see the module docs).
#[inline(always)]
fn from_node(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    if ip.proto != proto::ICMP || ip.is_later_fragment() || !ip.valid(ctx) {
        return Ok(Counter::EgressPassNotInternal);
    }
    let Ok(head) = read::<[u8; 8]>(ctx, ip.l4()) else {
        return Ok(Counter::EgressPassNotInternal);
    };
    match head[0] {
        kind::ECHO_REQUEST => {
            // The reply key a pod's echo flow with this identifier would have.
            let reply = FlowKey::new(proto::ICMP, ip.dst, [0; 2], ip.src, [head[4], head[5]]);
            let _ = SNAT_HOST_ECHO.insert(reply, now(), 0);
            Ok(Counter::EgressPassNotInternal)
        }
        t if icmp::is_error(t) && !excluded(ip.dst) => node_icmp_error(ctx, ip),
        _ => Ok(Counter::EgressPassNotInternal),
    }
}

/// An ICMP error the node sends towards the internet. If it quotes a packet to a pod (a reply
/// snat translated on ingress), the quote is put back to the NAT endpoint the remote knows, so
/// the remote can match it (path MTU discovery) and no pod address leaves; without a mapping to
/// do that with, it is dropped.
#[inline(always)]
fn node_icmp_error(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let Some(inner) = Inner::parse(ctx, ip) else {
        // A quote too short to translate must still not carry an internal address.
        return match icmp::quoted_addrs(ctx, ip) {
            Some((src, dst)) if internal(src) || internal(dst) => {
                Err(Counter::EgressDropNodeIcmpErrorNoMapping.into())
            }
            _ => Ok(Counter::EgressPassNotInternal),
        };
    };
    if internal(inner.src) {
        // A pod's own packet quoted towards the internet: nothing snat sent looks like that.
        return Err(Counter::EgressDropNodeIcmpErrorNoMapping.into());
    }
    if !internal(inner.dst) {
        return Ok(Counter::EgressPassNotInternal);
    }
    // The quoted packet runs remote → pod: the pod's endpoint is the forward key's source.
    let key = inner.forward_key_of_reply();
    let (_, m) = mapping::forward(&key).ok_or(Counter::EgressDropNodeIcmpErrorNoMapping)?;
    block::fence_egress(m.nat_addr, m.nat_port, m.block_epoch)?;
    inner
        .rewrite(ctx, Side::Dst, (m.nat_addr, m.nat_port))
        .map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedNodeIcmpError)
}

/// What egress needs of a TCP segment to track its mapping.
pub struct Segment {
    tcp: Tcp,
    /// Offset of the TCP header (for the SYN's options).
    l4: usize,
}

impl Segment {
    /// A SYN alone: the only segment that opens (or reopens) a mapping.
    #[inline(always)]
    fn pure_syn(&self) -> bool {
        self.tcp.flags & (header::SYN | header::ACK | header::RST | header::FIN) == header::SYN
    }
}

/// The NAT endpoint of `key`'s existing mapping (refreshed); a flow without one goes on to
/// `snat_create` (see [`pend`]; `rport` is its real remote port; `hairpin`: the packet is the
/// hairpin program's, which `snat_create` hands on to delivery).
#[inline(always)]
pub fn mapping<A: Family>(
    ctx: &TcContext,
    ip: &A::Ip,
    key: &FlowKeyOf<A>,
    rport: [u8; 2],
    seg: Option<&Segment>,
    hairpin: bool,
) -> Result<(A, [u8; 2]), Stop> {
    if let Some((p, m)) = mapping::forward(key) {
        family::fence_egress(m.nat_addr, m.nat_port, m.block_epoch)?;
        if let Some(seg) = seg {
            track(ctx, key, p, &m, seg);
        } else if key.proto == proto::UDP && m.window != rport && m.window != [0; 2] {
            // A second remote port: the mapping no longer serves one well-known port, so it
            // keeps the general UDP timeout (see `Mapping::window`).
            // SAFETY: `p` points to this flow's live mapping (see `mapping`); a small store of
            // this flow's own field.
            unsafe { core::ptr::write_volatile(&raw mut (*p).window, [0; 2]) };
            expiry_event(key);
        }
        mapping::refresh_forward(p, &m, crate::clock::stamp())
            .map_err(|()| Counter::EgressDropReleased)?;
        return Ok((m.nat_addr, m.nat_port));
    }
    let syn = match seg {
        None => Syn::default(),
        Some(seg) if seg.pure_syn() => Syn {
            syn: true,
            isn_next: seg.tcp.seq.wrapping_add(1).to_be_bytes(),
            wscale: seg.tcp.window_scale(ctx, seg.l4),
        },
        // Cluster mode: the segment's mapping may have gone with its block (the lease was lost,
        // the block is another node's now); `snat_create` answers it with a RST instead of a
        // port (never a RST with a RST).
        Some(seg) if block::layout().is_some() && seg.tcp.flags & header::RST == 0 => {
            Syn::default()
        }
        // Only a SYN opens a TCP mapping: a stray segment must not take a port.
        Some(_) => return Err(Counter::EgressDropTcpNotSyn.into()),
    };
    pend(ctx, ip, key, rport, &syn, hairpin)
}

/// Hands a packet whose flow has no mapping to `snat_create` (a tail call: it does not come
/// back): its header, key, real remote port, SYN and origin go to this CPU's `Pending` slot,
/// written field by field (an IPv6 `Pending` built on the stack first would not fit it).
/// Returns only if the call failed.
#[inline(always)]
fn pend<A: Family>(
    ctx: &TcContext,
    ip: &A::Ip,
    key: &FlowKeyOf<A>,
    rport: [u8; 2],
    syn: &Syn,
    hairpin: bool,
) -> Result<(A, [u8; 2]), Stop> {
    let slot = A::pending()
        .get_ptr_mut(0)
        .ok_or(Counter::EgressDropNoAllocator)?;
    // SAFETY: this CPU's slot; `snat_create` reads it on this CPU right after the tail call.
    unsafe {
        (*slot).ip = *ip;
        (*slot).key = *key;
        (*slot).rport = rport;
        (*slot).syn = *syn;
        (*slot).attempt = 0;
        (*slot).paired = A::ZERO;
        (*slot).hairpin = hairpin;
        // SAFETY: helper without preconditions.
        (*slot).started = bpf_ktime_get_ns();
    }
    // SAFETY: a tail call from the program's own frame (never from a subprogram); on success
    // control goes to `snat_create` and never returns here.
    unsafe { SNAT_PROGRAMS.tail_call(ctx, A::SLOT_CREATE) };
    Err(Counter::EgressDropNoAllocator.into())
}

/// Records what the pod's segment tells about its side of the connection, in the current epoch:
/// its FIN and RST, its acknowledgement and window (which a remote FIN or RST is checked
/// against), and a new SYN on a closed or answered mapping, which starts a new epoch (binding
/// persistence: the NAT port is kept, so the server's TIME_WAIT sees the same 4-tuple with a
/// higher sequence number and accepts it). Only egress writes these fields.
#[inline(always)]
fn track<A: Family>(
    ctx: &TcContext,
    key: &FlowKeyOf<A>,
    p: *mut MappingOf<A>,
    m: &Forward<A>,
    seg: &Segment,
) {
    let t = &seg.tcp;
    let epoch = m.epoch;
    if seg.pure_syn() {
        let reply = key.reply(m.nat_addr, m.nat_port);
        let outside = mapping::reverse(&reply).map_or(0, |(_, o)| o.tcp_seen(epoch));
        if tcp::reopens(m.tcp_seen(), outside) {
            let next = tcp::next_epoch(epoch);
            let wscale = t.window_scale(ctx, seg.l4);
            // SAFETY: `p` points to this flow's live mapping (see `mapping`); the new epoch is
            // written last, so a reader that sees it sees the SYN's fields too.
            unsafe {
                (*p).isn_next = t.seq.wrapping_add(1).to_be_bytes();
                (*p).wscale = wscale;
                (*p).syn = next;
                (*p).epoch = next;
            }
            count(Counter::TcpReopened);
            expiry_event(key);
        }
        return;
    }
    // SAFETY: as above; each store is one aligned field, skipped when it would not change.
    unsafe {
        if t.flags & header::FIN != 0 && m.fin != epoch {
            (*p).fin = epoch;
            expiry_event(key);
        }
        if t.flags & header::RST != 0 && m.rst != epoch {
            (*p).rst = epoch;
            expiry_event(key);
        }
        if t.flags & header::ACK != 0 {
            let ack = t.ack.to_be_bytes();
            if m.ack != ack {
                (*p).ack = ack;
            }
            if m.window != t.window {
                (*p).window = t.window;
            }
            if m.acked != epoch {
                (*p).acked = epoch;
            }
        }
    }
}

/// A pod's TCP segment: translated through its mapping, or handed to `snat_create`.
#[inline(always)]
pub fn tcp<A: Family>(ctx: &TcContext, ip: &A::Ip, hairpin: bool) -> Verdict {
    let l4 = ip.l4();
    let avail = ip.l4_len(ctx);
    let t = Tcp::read(ctx, l4).map_err(|_| Counter::EgressDropMalformed)?;
    if avail < 20 || t.doff < 20 || t.doff > avail {
        return Err(Counter::EgressDropMalformed.into());
    }
    let key = FlowKeyOf::new(proto::TCP, ip.src(), t.sport, ip.dst(), t.dport);
    let seg = Segment { tcp: t, l4 };
    let nat = mapping(ctx, ip, &key, t.dport, Some(&seg), hairpin)?;
    translate::<A>(ctx, ip, proto::TCP, (ip.src(), t.sport), nat)?;
    Ok(Counter::EgressTranslatedTcp)
}

/// A pod's UDP datagram: translated through its mapping, or handed to `snat_create`.
#[inline(always)]
pub fn udp<A: Family>(ctx: &TcContext, ip: &A::Ip, hairpin: bool) -> Verdict {
    let l4 = ip.l4();
    let avail = ip.l4_len(ctx);
    let head: [u8; 8] = read(ctx, l4).map_err(|_| Counter::EgressDropMalformed)?;
    let udp_len = usize::from(u16::from_be_bytes([head[4], head[5]]));
    // A first fragment carries only part of the datagram its length counts.
    if avail < 8 || udp_len < 8 || (udp_len > avail && !ip.is_fragment()) {
        return Err(Counter::EgressDropMalformed.into());
    }
    let (sport, dport) = ([head[0], head[1]], [head[2], head[3]]);
    let key = FlowKeyOf::new(proto::UDP, ip.src(), sport, ip.dst(), [0; 2]);
    let nat = mapping(ctx, ip, &key, dport, None, hairpin)?;
    translate::<A>(ctx, ip, proto::UDP, (ip.src(), sport), nat)?;
    Ok(Counter::EgressTranslatedUdp)
}

#[inline(always)]
fn icmp(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let l4 = ip.l4();
    if ip.l4_len(ctx) < 8 {
        return Err(Counter::EgressDropMalformed.into());
    }
    let head: [u8; 8] = read(ctx, l4).map_err(|_| Counter::EgressDropMalformed)?;
    match head[0] {
        kind::ECHO_REQUEST => {
            let id = [head[4], head[5]];
            let key = FlowKey::new(proto::ICMP, ip.src, id, ip.dst, [0; 2]);
            let nat = mapping::<[u8; 4]>(ctx, ip, &key, [0; 2], None, false)?;
            translate::<[u8; 4]>(ctx, ip, proto::ICMP, (ip.src, id), nat)?;
            Ok(Counter::EgressTranslatedIcmp)
        }
        t if icmp::is_error(t) => icmp_error(ctx, ip),
        _ => Err(Counter::EgressDropIcmpType.into()),
    }
}

/// A pod reports an error about a packet it received through the NAT: the quoted packet runs
/// remote → pod, so its destination is the internal endpoint to put back to the NAT one. It
/// must be the pod's own: an error quoting another endpoint's flow would let one pod disturb
/// another's connections from that pod's NAT endpoint.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let inner = Inner::parse(ctx, ip).ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    if inner.dst != ip.src {
        return Err(Counter::EgressDropIcmpErrorForeign.into());
    }
    let key = inner.forward_key_of_reply();
    let (_, m) = mapping::forward(&key).ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    block::fence_egress(m.nat_addr, m.nat_port, m.block_epoch)?;
    inner
        .rewrite(ctx, Side::Dst, (m.nat_addr, m.nat_port))
        .and_then(|()| rewrite_addr(ctx, Side::Src, ip.src, m.nat_addr))
        .map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedIcmpError)
}

/// A fragment after the first carries no ports: its source becomes the NAT IP its first
/// fragment got, or, when it overtook the first fragment, the NAT IP the pod is paired with,
/// which is where the first fragment's mapping will be (RFC 4787 REQ-14: out-of-order fragments).
#[inline(always)]
fn later_fragment(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    if !matches!(ip.proto, proto::TCP | proto::UDP | proto::ICMP) {
        return Err(Counter::EgressDropUnsupportedProto.into());
    }
    let addr = match fragments_of(&ip.frag_key(), now()) {
        Some(addr) => addr,
        None => {
            alloc::nat_ip_for::<[u8; 4]>(ip.src, 0)
                .map_err(|_| Counter::EgressDropNoNatIp)?
                .1
                .addr
        }
    };
    rewrite_addr(ctx, Side::Src, ip.src, addr).map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedFragment)
}
