//! Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8; `snat run --hairpin on`): a pod's packet to a
//! NAT IP and a port of the range reaches the pod whose mapping holds that port, from the
//! sender's own NAT endpoint, as if it had gone out and come back in.
//!
//! The NAT IP is the node's own address, so such a packet never reaches the uplink: the node
//! takes it in on the pod's interface. `snat_hairpin` runs there (TC ingress on the interfaces
//! `--pod-iface` names) and does in two steps what the uplink's programs do:
//!
//! 1. the source, exactly as egress translates it (`egress::tcp`/`udp`: the sender's mapping,
//!    created by `snat_create` when there is none, with every cap, fair share and refusal);
//! 2. `snat_hairpin_deliver` (a tail call from either, never attached) translates the packet,
//!    now NAT endpoint → NAT endpoint, as a reply (`ingress::run`: the destination's reverse
//!    half, its filtering and TCP tracking), and sends it out of the destination pod's interface
//!    (a FIB lookup, then `bpf_redirect_neigh`): the stack would take it for a martian, with a
//!    source address of its own.
//!
//! A packet no mapping accepts (the destination pod never sent to the sender's NAT endpoint, as
//! a remote host would be filtered) is dropped, and the sender's new mapping stays, as any
//! outbound packet's does: that is how two pods behind one NAT punch a hole to each other.
//! Everything else on the pods' interfaces — other destinations, ICMP, fragments, ports outside
//! the range, malformed headers — goes on untouched and uncounted (the node's stack and the
//! uplink's programs see it next).
//!
//! IPv6 (NAT66 on) takes the same two steps in programs of its own, `snat_hairpin6` (tail-called
//! by `snat_hairpin` for every IPv6 packet) and `snat_hairpin_deliver6`: its header and keys
//! need the stack the IPv4 path uses. A pod's IPv6 UDP datagram without a checksum is malformed
//! (RFC 8200 §8.1) and dropped, as egress drops it.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use snat_common::{flow::proto, Counter, MAX_NAT_IPS};

use crate::{
    egress,
    family::{nat_slot, Family, IpHeader},
    ingress, ingress6,
    maps::{count, SNAT_CONFIG, SNAT_PROGRAMS},
    packet::{read, Ipv4, ETH_P_IP_BE},
    packet6::Ipv6,
    verdict::{action, Verdict},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `bpf_fib_lookup` found the route (and the neighbour, or not: the redirect resolves it).
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;

/// The first step (`snat_hairpin`): `None` for a packet that is not a pod's to a NAT endpoint.
#[inline(always)]
pub fn run(ctx: &TcContext) -> Option<Verdict> {
    let ip = to_nat_endpoint(ctx)?;
    let translated = if ip.proto == proto::TCP {
        egress::tcp::<[u8; 4]>(ctx, &ip, true)
    } else {
        egress::udp::<[u8; 4]>(ctx, &ip, true)
    };
    Some(hand_over::<[u8; 4]>(ctx, translated))
}

/// The first step's end: a packet whose source is translated (its mapping existed) goes on to
/// delivery.
#[inline(always)]
fn hand_over<A: Family>(ctx: &TcContext, translated: Verdict) -> Verdict {
    translated.and_then(|c| {
        count(c);
        // SAFETY: a tail call from the program's own frame (both families' paths are inlined
        // there); on success delivery goes on there.
        unsafe { SNAT_PROGRAMS.tail_call(ctx, A::SLOT_HAIRPIN_DELIVER) };
        Err(Counter::HairpinDropNoDeliverer.into())
    })
}

/// The packet's IPv4 header if it is a pod's (internal source) TCP or UDP packet, not a
/// fragment, to a NAT IP and a port of its range.
#[inline(always)]
fn to_nat_endpoint(ctx: &TcContext) -> Option<Ipv4> {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return None;
    }
    let ip = Ipv4::read(ctx).ok()?;
    if !matches!(ip.proto, proto::TCP | proto::UDP) || ip.is_fragment() || !ip.valid(ctx) {
        return None;
    }
    let ports: [u8; 4] = read(ctx, ip.l4()).ok()?;
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    (nat_endpoint(ip.dst, dport) && egress::internal(ip.src)).then_some(ip)
}

/// Whether `addr` is a NAT IP of the live set and `port` in its range.
#[inline(always)]
fn nat_endpoint<A: Family>(addr: A, port: u16) -> bool {
    let Some(cfg) = SNAT_CONFIG.get(0) else {
        return false;
    };
    let set = cfg.active & 1;
    let n = A::nat_count(cfg, set);
    for i in 0..MAX_NAT_IPS {
        if i >= n {
            break;
        }
        if let Some(nat) = A::nat_ip(nat_slot(set, i)) {
            if nat.addr == addr {
                return nat.port_min <= port && port <= nat.port_max;
            }
        }
    }
    false
}

/// The first step for IPv6 (`snat_hairpin6`): returns the TC action, `TC_ACT_UNSPEC` for a
/// packet that is not a pod's to a NAT endpoint.
#[inline(always)]
pub fn run6(ctx: &TcContext) -> i32 {
    let Ok(ip) = Ipv6::fixed(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if !<[u8; 16]>::internal(ip.src)
        || ip.walk(ctx).is_err()
        || ip.is_fragment()
        || !matches!(ip.proto, proto::TCP | proto::UDP)
    {
        return TC_ACT_UNSPEC;
    }
    let Ok(ports) = read::<[u8; 4]>(ctx, IpHeader::l4(ip)) else {
        return TC_ACT_UNSPEC;
    };
    if !nat_endpoint(ip.dst, u16::from_be_bytes([ports[2], ports[3]])) {
        return TC_ACT_UNSPEC;
    }
    if ip.proto == proto::TCP {
        tcp6(ctx, ip)
    } else {
        udp6(ctx, ip)
    }
}

// Both protocols in the program's own frame, not in subprograms as on egress (`egress6`): a
// program tail-called from a subprogram returns its action to the subprogram's caller, and
// here the compiler, seeing every path of such a subprogram end in a drop, would fold its
// result to that constant and turn a delivery into a drop.

#[inline(always)]
fn tcp6(ctx: &TcContext, ip: &Ipv6) -> i32 {
    action(hand_over::<[u8; 16]>(
        ctx,
        egress::tcp::<[u8; 16]>(ctx, ip, true),
    ))
}

#[inline(always)]
fn udp6(ctx: &TcContext, ip: &Ipv6) -> i32 {
    let translated = match read::<[u8; 2]>(ctx, IpHeader::l4(ip) + 6) {
        Ok(check) if check != [0; 2] => egress::udp::<[u8; 16]>(ctx, ip, true),
        _ => Err(Counter::EgressDropMalformed.into()),
    };
    action(hand_over::<[u8; 16]>(ctx, translated))
}

/// The second step (`snat_hairpin_deliver`): returns the TC action.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> i32 {
    send(ctx, ingress::run(ctx), route)
}

/// The second step for IPv6 (`snat_hairpin_deliver6`).
#[inline(always)]
pub fn deliver6(ctx: &TcContext) -> i32 {
    let translated = match Ipv6::fixed(ctx) {
        Ok(ip) => match (ip.walk(ctx), ip.proto) {
            (Ok(()), proto::TCP) => ingress6::tcp(ctx, ip),
            (Ok(()), proto::UDP) => ingress6::udp(ctx, ip),
            // The first step parsed this very header: only a rewrite gone wrong gets here.
            _ => Err(Counter::IngressDropRewrite.into()),
        },
        Err(()) => Err(Counter::IngressDropRewrite.into()),
    };
    send(ctx, translated, route6)
}

/// Sends a packet the reverse half translated out of the destination pod's interface (found by
/// `route`), counting it; drops and counts anything else.
#[inline(always)]
fn send(
    ctx: &TcContext,
    translated: Verdict,
    route: impl FnOnce(&TcContext) -> Option<u32>,
) -> i32 {
    let delivered = match translated {
        Ok(
            Counter::IngressTranslatedTcp
            | Counter::IngressRstOutOfWindow
            | Counter::IngressFinOutOfWindow,
        ) => Counter::HairpinDeliveredTcp,
        Ok(Counter::IngressTranslatedUdp) => Counter::HairpinDeliveredUdp,
        Ok(_) => {
            count(Counter::HairpinDropFiltered);
            return TC_ACT_SHOT;
        }
        Err(stop) => {
            count(stop.counter);
            return TC_ACT_SHOT;
        }
    };
    let Some(ifindex) = route(ctx) else {
        count(Counter::HairpinDropNoRoute);
        return TC_ACT_SHOT;
    };
    // SAFETY: no next-hop parameters (the kernel resolves the neighbour of the packet's
    // destination on `ifindex`).
    let ret = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        count(Counter::HairpinDropNoRoute);
        return TC_ACT_SHOT;
    }
    count(delivered);
    TC_ACT_REDIRECT
}

/// A FIB lookup of `params` (family and addresses filled in) from the packet's interface, as
/// the node would forward it: the interface to send it out of.
#[inline(always)]
fn fib(ctx: &TcContext, params: &mut bpf_fib_lookup) -> Option<u32> {
    // `tot_len` stays 0: no MTU check. A GSO packet's length is its whole burst, which the
    // device segments; an MTU below the packet's would be the target pod's own link, the same
    // as the sender's on a node.
    // SAFETY: reading the device index of our own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: our own context and a fully initialised `bpf_fib_lookup`, passed with its size;
    // the helper writes its results into it.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            core::ptr::from_mut(params),
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    matches!(ret, FIB_SUCCESS | FIB_NO_NEIGH).then_some(params.ifindex)
}

/// The interface the node routes the (translated) IPv4 packet out of.
#[inline(always)]
fn route(ctx: &TcContext) -> Option<u32> {
    let ip = Ipv4::read(ctx).ok()?;
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst);
    fib(ctx, &mut params)
}

/// The same for IPv6: the fixed header read again (its destination now the pod's; its next
/// header, the protocol the lookup is given, may be an extension header's).
#[inline(always)]
fn route6(ctx: &TcContext) -> Option<u32> {
    let ip = Ipv6::fixed(ctx).ok()?;
    // SAFETY: as above.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_3.ipv6_src = bytemuck::cast(ip.src);
    params.__bindgen_anon_4.ipv6_dst = bytemuck::cast(ip.dst);
    fib(ctx, &mut params)
}
