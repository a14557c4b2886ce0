//! Ingress on the uplink: translate replies to a NAT ip:port back to the internal endpoint before
//! the stack routes them. Packets without a mapping pass untouched (they may be the node's own).
//!
//! A TCP FIN or RST from the remote ends its connection's phase only when it lies in the window
//! the pod last advertised (`snat_common::tcp::check_remote`); one outside it is still
//! translated, for the pod's own stack to judge (a challenge ACK, RFC 5961), and counted
//! (`rst_out_of_window`, `fin_out_of_window`), but changes nothing in the mapping.
//!
//! The same code runs in both reply paths, generic over the [`Packet`] it reads and rewrites:
//! the TC program `snat_ingress` and the XDP program `snat_xdp` (`--ingress xdp`, see `xdp`).
//! Only one thing differs: XDP cannot update a checksum still pending offload, so a TCP or UDP
//! reply whose checksum may be one is left to TC, untouched ([`Counter::XdpDeferred`]), before
//! anything about its mapping is read or changed.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use snat_common::{
    flow::proto,
    tcp::{self, check_remote, header, PodSide, Remote},
    Counter, FlowKey, FlowKeyOf, OriginOf,
};

use crate::{
    block,
    family::{self, Family, IpHeader},
    icmp::{self, kind, Inner},
    mapping::{self, Reverse},
    maps::{expiry_event, fragments_of},
    packet::{fragment_translated, l4_check_offset, read, rewrite_addr, Ipv4, Packet, Side, Tcp},
    verdict::Verdict,
};

pub fn run<C: Packet>(ctx: &C) -> Verdict {
    if !ctx.is_ipv4() {
        return Ok(Counter::IngressPassNotIpv4);
    }
    let Ok(ip) = Ipv4::read(ctx) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if !ip.valid(ctx) {
        return Ok(Counter::IngressPassUnparsed);
    }
    if ip.is_later_fragment() {
        return later_fragment(ctx, &ip);
    }
    match ip.proto {
        proto::TCP => tcp::<[u8; 4], C>(ctx, &ip),
        proto::UDP => udp::<[u8; 4], C>(ctx, &ip),
        proto::ICMP => icmp(ctx, &ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

/// Cluster mode: whether the reply `key` of the reverse half `o` may be translated now (its
/// forward half's block epoch against the block table). Outside cluster mode: always.
#[inline(always)]
pub fn fence<A: Family>(key: &FlowKeyOf<A>, o: &Reverse<A>) -> Result<(), Counter> {
    let (Some(l), Some(addr)) = (block::layout(), A::v4(key.dst_addr)) else {
        return Ok(());
    };
    let epoch = mapping::forward(&key.forward_to(o.addr, o.port)).map(|(_, m)| m.block_epoch);
    block::fence_ingress(&l, addr, key.dst_port, epoch)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Delivers the reply `key` (whose destination endpoint is `nat`, at `port_off` in its L4
/// header) to the internal endpoint of its reverse half `o` (pointer `p`): refreshes the half,
/// rewrites the packet, and remembers a first fragment's translation for the fragments after it.
#[inline(always)]
pub fn deliver<A: Family, C: Packet>(
    ctx: &C,
    ip: &A::Ip,
    p: *mut OriginOf<A>,
    o: &Reverse<A>,
    port_off: usize,
    nat: (A, [u8; 2]),
) -> Result<(), Counter> {
    mapping::refresh_reverse(p, o, crate::clock::stamp())
        .map_err(|()| Counter::IngressDropReleased)?;
    A::rewrite_endpoint(ctx, ip, Side::Dst, port_off, nat, (o.addr, o.port))
        .map_err(|_| Counter::IngressDropRewrite)?;
    fragment_translated::<A>(ip, o.addr);
    Ok(())
}

#[inline(always)]
pub fn tcp<A: Family, C: Packet>(ctx: &C, ip: &A::Ip) -> Verdict {
    if ip.l4_len(ctx) < 20 {
        return Ok(Counter::IngressPassUnparsed);
    }
    let Ok(t) = Tcp::read(ctx, ip.l4()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if A::checksum_pending(ctx, ip, ip.l4() + l4_check_offset(proto::TCP)) {
        return Ok(Counter::XdpDeferred);
    }
    let key = FlowKeyOf::new(proto::TCP, ip.src(), t.sport, ip.dst(), t.dport);
    let Some((p, o)) = mapping::reverse(&key) else {
        return family::no_mapping(ip.dst(), t.dport).map_err(Into::into);
    };
    fence(&key, &o)?;
    let result = if t.flags & (header::SYN | header::FIN | header::RST) != 0 {
        remote_flags(&key, p, &o, &t)
    } else {
        Counter::IngressTranslatedTcp
    };
    deliver(ctx, ip, p, &o, 2, (ip.dst(), t.dport))?;
    Ok(result)
}

/// Records the remote's SYN, FIN or RST in the reverse half `p` (copy `o`) of the reply `key`,
/// stamped with the forward half's epoch, if the pod's side accepts it there; returns the
/// packet's result.
#[inline(always)]
fn remote_flags<A: Family>(
    key: &FlowKeyOf<A>,
    p: *mut OriginOf<A>,
    o: &Reverse<A>,
    t: &Tcp,
) -> Counter {
    let fwd = key.forward_to(o.addr, o.port);
    let Some((_, m)) = mapping::forward(&fwd) else {
        return Counter::IngressTranslatedTcp;
    };
    let pod = PodSide {
        acked: m.acked == m.epoch,
        ack: u32::from_be_bytes(m.ack),
        window: u16::from_be_bytes(m.window),
        wscale: m.wscale,
        isn_next: u32::from_be_bytes(m.isn_next),
    };
    let (bits, result) = match check_remote(&pod, t.flags, t.seq, t.ack) {
        Remote::Record(bits) => (bits, Counter::IngressTranslatedTcp),
        Remote::RstOutOfWindow(bits) => (bits, Counter::IngressRstOutOfWindow),
        Remote::FinOutOfWindow(bits) => (bits, Counter::IngressFinOutOfWindow),
    };
    let epoch = m.epoch;
    let mut changed = false;
    // SAFETY: `p` points to this reply's live reverse half (see `mapping`); only ingress writes
    // these fields, one aligned store each, skipped when it would not change.
    unsafe {
        if bits & tcp::SEEN_SYN != 0 && o.syn != epoch {
            (*p).syn = epoch;
            changed = true;
        }
        if bits & tcp::SEEN_FIN != 0 && o.fin != epoch {
            (*p).fin = epoch;
            changed = true;
        }
        if bits & tcp::SEEN_RST != 0 && o.rst != epoch {
            (*p).rst = epoch;
            changed = true;
        }
    }
    if changed {
        // A new phase, maybe with a shorter timeout.
        expiry_event(&fwd);
    }
    result
}

#[inline(always)]
pub fn udp<A: Family, C: Packet>(ctx: &C, ip: &A::Ip) -> Verdict {
    if ip.l4_len(ctx) < 8 {
        return Ok(Counter::IngressPassUnparsed);
    }
    let Ok(head) = read::<[u8; 4]>(ctx, ip.l4()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if A::checksum_pending(ctx, ip, ip.l4() + l4_check_offset(proto::UDP)) {
        return Ok(Counter::XdpDeferred);
    }
    let dport = [head[2], head[3]];
    let key = FlowKeyOf::new(proto::UDP, ip.src(), [0; 2], ip.dst(), dport);
    let Some((p, o)) = mapping::reverse(&key) else {
        return family::no_mapping(ip.dst(), dport).map_err(Into::into);
    };
    fence(&key, &o)?;
    deliver(ctx, ip, p, &o, 2, (ip.dst(), dport))?;
    Ok(Counter::IngressTranslatedUdp)
}

#[inline(always)]
fn icmp<C: Packet>(ctx: &C, ip: &Ipv4) -> Verdict {
    if ip.l4_len(ctx) < 8 {
        return Ok(Counter::IngressPassUnparsed);
    }
    let Ok(head) = read::<[u8; 8]>(ctx, ip.l4()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    match head[0] {
        kind::ECHO_REPLY => {
            let id = [head[4], head[5]];
            let key = FlowKey::new(proto::ICMP, ip.src, [0; 2], ip.dst, id);
            let Some((p, o)) = mapping::reverse(&key) else {
                return block::no_mapping(ip.dst, id).map_err(Into::into);
            };
            fence(&key, &o)?;
            deliver::<[u8; 4], C>(ctx, ip, p, &o, 4, (ip.dst, id))?;
            Ok(Counter::IngressTranslatedIcmp)
        }
        t if icmp::is_error(t) => icmp_error(ctx, ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

/// An error about a packet the NAT sent: the quoted packet runs NAT endpoint → remote, and is
/// put back to the internal endpoint; the outer destination (the NAT IP) too. Errors do not
/// refresh the mapping (RFC 5508).
#[inline(always)]
fn icmp_error<C: Packet>(ctx: &C, ip: &Ipv4) -> Verdict {
    let Some(inner) = Inner::parse(ctx, ip) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if inner.src != ip.dst {
        return Ok(Counter::IngressPassNoMapping);
    }
    let key = inner.reply_key_of_sent();
    let Some((_, o)) = mapping::reverse(&key) else {
        return Ok(Counter::IngressPassNoMapping);
    };
    fence(&key, &o)?;
    inner
        .rewrite(ctx, Side::Src, (o.addr, o.port))
        .and_then(|()| rewrite_addr(ctx, Side::Dst, ip.dst, o.addr))
        .map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedIcmpError)
}

/// A later fragment of a reply: its destination becomes the internal address its first
/// fragment went to. One that overtook its first fragment cannot be placed (it names no port)
/// and is left to the node, which drops what it cannot reassemble.
#[inline(always)]
fn later_fragment<C: Packet>(ctx: &C, ip: &Ipv4) -> Verdict {
    let Some(addr) = fragments_of(&ip.frag_key(), now()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    rewrite_addr(ctx, Side::Dst, ip.dst, addr).map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedFragment)
}
