//! Egress for IPv6 (NAT66): the same rules as IPv4 (`egress`), with the shared mapping code.
//!
//! Every IPv6 packet whose source is internal and whose destination is not excluded leaves
//! translated or not at all. Its extension headers are walked to the upper-layer header
//! (`packet6`); a chain snat does not walk (ESP, AH, a routing header with segments left, too
//! many headers) drops the packet (`drop_ext_headers`), as does anything malformed. A pod's UDP
//! datagram without a checksum is malformed in IPv6 (RFC 8200 §8.1) and dropped. ICMPv6 echo
//! requests are mapped by identifier (keys say `proto::ICMP` for either family's echo), and
//! ICMPv6 errors a pod sends about a reply get their quote put back to the NAT endpoint.
//!
//! The node's own packets pass untouched (neighbour discovery included), with the IPv4
//! exceptions: an ICMPv6 error the node sends about a reply it was forwarding to a pod (Packet
//! Too Big, time exceeded, unreachable) has its quote translated back, or is dropped; the node's
//! own echo requests are remembered so that pods are not given their identifiers.

use aya_ebpf::programs::TcContext;
use snat_common::{
    flow::proto,
    ip6::{icmp6, next_header},
    Counter, FlowKey6,
};

use crate::{
    alloc,
    egress::{self, now},
    family::{Family, IpHeader},
    mapping,
    maps::{fragments_of6, SNAT_HOST_ECHO6},
    packet::{read, translate, Side},
    packet6::{self, Bad, Inner6, Ipv6, QuoteChange},
    verdict::{action, Verdict},
};

type A = [u8; 16];

/// The TC action for an IPv6 packet on egress, its result counted. (An action, not a
/// [`Verdict`]: the per-protocol paths are subprograms that may tail-call `snat_create6`, and
/// the verifier wants such a function to return a plain integer.)
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // Without a readable header there is no telling whose packet it is: it must not leave.
    let Ok(ip) = Ipv6::fixed(ctx) else {
        return action(Err(Counter::EgressDropMalformed.into()));
    };
    if !A::internal(ip.src) {
        return action(from_node(ctx, ip));
    }
    if A::excluded(ip.dst) {
        return action(Ok(Counter::EgressPassExcluded));
    }
    if let Err(e) = ip.walk(ctx) {
        return action(Err(match e {
            Bad::Malformed => Counter::EgressDropMalformed,
            Bad::ExtHeaders => Counter::EgressDropExtHeaders,
        }
        .into()));
    }
    if ip.is_later_fragment() {
        return action(later_fragment(ctx, ip));
    }
    match ip.proto {
        proto::TCP => tcp(ctx, ip),
        proto::UDP => udp(ctx, ip),
        next_header::ICMPV6 => icmp(ctx, ip),
        _ => action(Err(Counter::EgressDropUnsupportedProto.into())),
    }
}

// Each protocol in a frame of its own (IPv6 headers and keys are big). Their tail call to
// `snat_create6` is allowed from a subprogram because the frame before them, this program's,
// stays under the verifier's 256 bytes for that case.

#[inline(never)]
fn tcp(ctx: &TcContext, ip: &Ipv6) -> i32 {
    action(egress::tcp::<A>(ctx, ip, false))
}

/// A UDP datagram: one without a checksum is malformed in IPv6.
#[inline(never)]
fn udp(ctx: &TcContext, ip: &Ipv6) -> i32 {
    match read::<[u8; 2]>(ctx, ip.l4() + 6) {
        Ok(check) if check != [0; 2] => action(egress::udp::<A>(ctx, ip, false)),
        _ => action(Err(Counter::EgressDropMalformed.into())),
    }
}

#[inline(never)]
fn icmp(ctx: &TcContext, ip: &Ipv6) -> i32 {
    action(icmp_verdict(ctx, ip))
}

#[inline(always)]
fn icmp_verdict(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    use snat_common::FlowKeyOf;
    if ip.l4_len(ctx) < 8 {
        return Err(Counter::EgressDropMalformed.into());
    }
    let head: [u8; 8] = read(ctx, ip.l4()).map_err(|_| Counter::EgressDropMalformed)?;
    match head[0] {
        icmp6::ECHO_REQUEST => {
            let id = [head[4], head[5]];
            let key = FlowKeyOf::new(proto::ICMP, ip.src, id, ip.dst, [0; 2]);
            let nat = egress::mapping::<A>(ctx, ip, &key, [0; 2], None, false)?;
            translate::<A>(ctx, ip, proto::ICMP, (ip.src, id), nat)?;
            Ok(Counter::EgressTranslatedIcmp)
        }
        t if icmp6::is_error(t) => icmp_error(ctx, ip),
        _ => Err(Counter::EgressDropIcmpType.into()),
    }
}

/// A pod's error about a packet it received through the NAT (see `egress::icmp_error`): the
/// quote's destination must be the pod itself, and is put back to the NAT endpoint, the outer
/// source too.
#[inline(never)]
fn icmp_error(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    let q = Inner6::parse(ctx, ip).ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    if !packet6::same(&q.dst, &ip.src) {
        return Err(Counter::EgressDropIcmpErrorForeign.into());
    }
    q.key_of_reply();
    let nat = mapping::forward_nat(&q.key).ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    q.change = QuoteChange {
        side: Side::Dst,
        new: nat,
        outer_side: Some(Side::Src),
        outer_to: nat.0,
    };
    q.rewrite(ctx).map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedIcmpError)
}

/// A packet of the node itself: passed, but an ICMPv6 error quoting a pod is translated or
/// dropped, and echo requests are remembered.
#[inline(never)]
fn from_node(ctx: &TcContext, ip: &mut Ipv6) -> Verdict {
    if ip.proto != next_header::ICMPV6 || ip.walk(ctx).is_err() {
        return Ok(Counter::EgressPassNotInternal);
    }
    let Ok(head) = read::<[u8; 8]>(ctx, ip.l4()) else {
        return Ok(Counter::EgressPassNotInternal);
    };
    match head[0] {
        icmp6::ECHO_REQUEST => {
            let reply = FlowKey6::new(proto::ICMP, ip.dst, [0; 2], ip.src, [head[4], head[5]]);
            let _ = SNAT_HOST_ECHO6.insert(reply, now(), 0);
            Ok(Counter::EgressPassNotInternal)
        }
        t if icmp6::is_error(t) && !A::excluded(ip.dst) => node_icmp_error(ctx, ip),
        _ => Ok(Counter::EgressPassNotInternal),
    }
}

/// An ICMPv6 error the node sends towards the internet about a reply it was forwarding to a
/// pod: the quote is put back to the NAT endpoint the remote knows (path MTU discovery), or the
/// error is dropped when no mapping explains it (no pod address leaves).
#[inline(never)]
fn node_icmp_error(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    let Some(q) = Inner6::parse(ctx, ip) else {
        // A quote too short to translate must still not carry an internal address.
        return match quoted_addrs(ctx, ip) {
            Some((src, dst)) if A::internal(src) || A::internal(dst) => {
                Err(Counter::EgressDropNodeIcmpErrorNoMapping.into())
            }
            _ => Ok(Counter::EgressPassNotInternal),
        };
    };
    if A::internal(q.src) {
        return Err(Counter::EgressDropNodeIcmpErrorNoMapping.into());
    }
    if !A::internal(q.dst) {
        return Ok(Counter::EgressPassNotInternal);
    }
    q.key_of_reply();
    let nat = mapping::forward_nat(&q.key).ok_or(Counter::EgressDropNodeIcmpErrorNoMapping)?;
    q.change = QuoteChange {
        side: Side::Dst,
        new: nat,
        outer_side: None,
        outer_to: [0; 16],
    };
    q.rewrite(ctx).map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedNodeIcmpError)
}

/// The addresses of the quoted fixed header, when at least that much is quoted.
#[inline(always)]
fn quoted_addrs(ctx: &TcContext, ip: &Ipv6) -> Option<([u8; 16], [u8; 16])> {
    if ip.l4_len(ctx) < icmp6::QUOTE_OFFSET + snat_common::ip6::HEADER_LEN {
        return None;
    }
    let a: [u8; 32] = read(ctx, ip.l4() + icmp6::QUOTE_OFFSET + 8).ok()?;
    let (mut src, mut dst) = ([0; 16], [0; 16]);
    src.copy_from_slice(&a[..16]);
    dst.copy_from_slice(&a[16..]);
    Some((src, dst))
}

/// A fragment after the first: its source becomes the NAT IP its first fragment got, or the
/// NAT IP the pod is paired with when it overtook the first fragment (RFC 4787 REQ-14).
#[inline(never)]
fn later_fragment(ctx: &TcContext, ip: &Ipv6) -> Verdict {
    if !matches!(ip.proto, proto::TCP | proto::UDP | next_header::ICMPV6) {
        return Err(Counter::EgressDropUnsupportedProto.into());
    }
    let addr = match fragments_of6(&ip.frag_key(), now()) {
        Some(addr) => addr,
        None => {
            alloc::nat_ip_for::<A>(ip.src, 0)
                .map_err(|_| Counter::EgressDropNoNatIp)?
                .1
                .addr
        }
    };
    // No header checksum, and the L4 checksum is in the first fragment: the address alone.
    ctx.store(packet6::addr_off(Side::Src), &addr, 0)
        .map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedFragment)
}
