//! Ingress on the uplink: translate replies to a NAT ip:port back to the internal endpoint before
//! the stack routes them. Packets without a mapping pass untouched (they may be the node's own).

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use snat_common::{flow::proto, tcp, Counter, FlowKey, Origin};

use crate::{
    egress::REFRESH_NS,
    icmp::{self, kind, Inner},
    maps::{fragments_of, remember_fragments, SNAT_REV},
    packet::{read, rewrite_addr, rewrite_endpoint, Ipv4, Side, ETH_P_IP_BE},
    verdict::Verdict,
};

pub fn run(ctx: &TcContext) -> Verdict {
    if ctx.skb.protocol() != ETH_P_IP_BE {
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
        proto::TCP | proto::UDP => transport(ctx, &ip),
        proto::ICMP => icmp(ctx, &ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

/// The origin of the reply key `key`, refreshed with the remote side's TCP flags.
#[inline(always)]
fn origin(key: &FlowKey, tcp_bits: u8) -> Option<Origin> {
    let p = SNAT_REV.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup (see the concurrency note in `maps`).
    let o = unsafe { &mut *p };
    if o.tcp_seen | tcp_bits != o.tcp_seen {
        o.tcp_seen |= tcp_bits;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(o.last_seen_ns) > REFRESH_NS {
        o.last_seen_ns = now;
    }
    Some(*o)
}

fn transport(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let l4 = ip.l4();
    let min = if ip.proto == proto::TCP { 20 } else { 8 };
    if ip.l4_len(ctx) < min {
        return Ok(Counter::IngressPassUnparsed);
    }
    let Ok(head) = read::<[u8; 4]>(ctx, l4) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    let (sport, dport) = ([head[0], head[1]], [head[2], head[3]]);
    let (bits, translated) = if ip.proto == proto::TCP {
        // Two bytes (data offset and flags): one-byte reads at a variable offset compile to a
        // bounds check the verifier cannot use.
        let Ok(off_flags) = read::<[u8; 2]>(ctx, l4 + 12) else {
            return Ok(Counter::IngressPassUnparsed);
        };
        (tcp::seen_bits(off_flags[1]), Counter::IngressTranslatedTcp)
    } else {
        (0, Counter::IngressTranslatedUdp)
    };
    let key = FlowKey::new(
        ip.proto,
        ip.src,
        FlowKey::remote_port_for(ip.proto, sport),
        ip.dst,
        dport,
    );
    let Some(o) = origin(&key, bits) else {
        return Ok(Counter::IngressPassNoMapping);
    };
    rewrite_endpoint(
        ctx,
        l4,
        ip.proto,
        Side::Dst,
        2,
        (ip.dst, dport),
        (o.addr, o.port),
    )
    .map_err(|_| Counter::IngressDropRewrite)?;
    if ip.is_fragment() {
        remember_fragments(&ip.frag_key(), o.addr, o.last_seen_ns);
    }
    Ok(translated)
}

fn icmp(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let l4 = ip.l4();
    if ip.l4_len(ctx) < 8 {
        return Ok(Counter::IngressPassUnparsed);
    }
    let Ok(head) = read::<[u8; 8]>(ctx, l4) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    match head[0] {
        kind::ECHO_REPLY => {
            let id = [head[4], head[5]];
            let key = FlowKey::new(proto::ICMP, ip.src, [0; 2], ip.dst, id);
            let Some(o) = origin(&key, 0) else {
                return Ok(Counter::IngressPassNoMapping);
            };
            rewrite_endpoint(
                ctx,
                l4,
                proto::ICMP,
                Side::Dst,
                4,
                (ip.dst, id),
                (o.addr, o.port),
            )
            .map_err(|_| Counter::IngressDropRewrite)?;
            Ok(Counter::IngressTranslatedIcmp)
        }
        t if icmp::is_error(t) => icmp_error(ctx, ip),
        _ => Ok(Counter::IngressPassNoMapping),
    }
}

/// An error about a packet the NAT sent: the quoted packet runs NAT endpoint → remote, and is
/// put back to the internal endpoint; the outer destination (the NAT IP) too. Errors do not
/// refresh the mapping (RFC 5508).
fn icmp_error(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let Some(inner) = Inner::parse(ctx, ip) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    if inner.src != ip.dst {
        return Ok(Counter::IngressPassNoMapping);
    }
    let key = FlowKey::new(
        inner.proto,
        inner.dst,
        FlowKey::remote_port_for(inner.proto, inner.dport),
        inner.src,
        inner.sport,
    );
    let Some(o) = SNAT_REV.get_ptr(key).map(|p| {
        // SAFETY: pointer from a successful lookup, copied out at once.
        unsafe { *p }
    }) else {
        return Ok(Counter::IngressPassNoMapping);
    };
    inner
        .rewrite(ctx, Side::Src, (o.addr, o.port))
        .and_then(|()| rewrite_addr(ctx, Side::Dst, ip.dst, o.addr))
        .map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedIcmpError)
}

/// A later fragment of a reply: its destination becomes the internal address its first
/// fragment went to. One that overtook its first fragment cannot be placed (it names no port)
/// and is left to the node, which drops what it cannot reassemble.
fn later_fragment(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(addr) = fragments_of(&ip.frag_key(), now) else {
        return Ok(Counter::IngressPassUnparsed);
    };
    rewrite_addr(ctx, Side::Dst, ip.dst, addr).map_err(|_| Counter::IngressDropRewrite)?;
    Ok(Counter::IngressTranslatedFragment)
}
