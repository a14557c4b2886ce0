//! Ingress for IPv6 (NAT66), on TC only (the XDP program passes IPv6 on): replies to a NAT
//! ip:port are translated back to the internal endpoint with the shared code of `ingress`;
//! ICMPv6 echo replies by identifier; ICMPv6 errors about a translated packet (Packet Too Big
//! above all: IPv6 routers never fragment, so path MTU discovery depends on it) get their outer
//! destination and their quote put back to the pod. Everything else passes untouched:
//! neighbour discovery, the node's own traffic, packets whose headers snat does not walk.

use aya_ebpf::programs::TcContext;
use snat_common::{
    flow::proto,
    ip6::{icmp6, next_header},
    Counter, FlowKey6,
};

use crate::{
    family::{self, IpHeader},
    ingress::{self, deliver, fence, now},
    mapping,
    maps::fragments_of6,
    packet::{read, Side},
    packet6::{self, Inner6, Ipv6, QuoteChange},
    verdict::Verdict,
};

type A = [u8; 16];

#[inline(always)]
pub fn run(ctx: &TcContext) -> Verdict {
    let Ok(ip) = Ipv6::fixed(ctx) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if ip.walk(ctx).is_err() {
        return Ok(Counter::IngressPassUnparsed);
    }
    if ip.is_later_fragment() {
        return later_fragment(ctx, ip);
    }
    match ip.proto {
        proto::TCP => tcp(ctx, ip),
        proto::UDP => udp(ctx, ip),
        next_header::ICMPV6 => icmp(ctx, ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

// Each protocol in a frame of its own: the IPv6 header and keys are big, and the verifier's
// 512 bytes hold the parse and one protocol's path, not all of them.

#[inline(never)]
pub fn tcp(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    ingress::tcp::<A, TcContext>(ctx, ip)
}

#[inline(never)]
pub fn udp(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    ingress::udp::<A, TcContext>(ctx, ip)
}

#[inline(never)]
fn icmp(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    let Ok(head) = read::<[u8; 8]>(ctx, ip.l4()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    match head[0] {
        icmp6::ECHO_REPLY => {
            let id = [head[4], head[5]];
            let key = FlowKey6::new(proto::ICMP, ip.src, [0; 2], ip.dst, id);
            let Some((p, o)) = mapping::reverse(&key) else {
                return family::no_mapping(ip.dst, id).map_err(Into::into);
            };
            fence(&key, &o)?;
            deliver::<A, TcContext>(ctx, ip, p, &o, 4, (ip.dst, id))?;
            Ok(Counter::IngressTranslatedIcmp)
        }
        t if icmp6::is_error(t) => icmp_error(ctx, ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

/// An error about a packet the NAT sent: the quote runs NAT endpoint → remote and is put back to
/// the internal endpoint, the outer destination too. Errors do not refresh the mapping.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    let Some(q) = Inner6::parse(ctx, ip) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if !packet6::same(&q.src, &ip.dst) {
        return Ok(Counter::IngressPassNoMapping);
    }
    q.key_of_sent();
    let Some((_, o)) = mapping::reverse(&q.key) else {
        return Ok(Counter::IngressPassNoMapping);
    };
    fence(&q.key, &o)?;
    q.change = QuoteChange {
        side: Side::Src,
        new: (o.addr, o.port),
        outer_side: Some(Side::Dst),
        outer_to: o.addr,
    };
    q.rewrite(ctx).map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedIcmpError)
}

/// A later fragment of a reply: its destination becomes the address its first fragment went to;
/// one that overtook its first fragment is left to the node.
#[inline(never)]
fn later_fragment(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    let Some(addr) = fragments_of6(&ip.frag_key(), now()) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    ctx.store(packet6::addr_off(Side::Dst), &addr, 0)
        .map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedFragment)
}
