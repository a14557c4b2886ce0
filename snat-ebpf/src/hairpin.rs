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

use aya_ebpf::{
    bindings::{bpf_fib_lookup, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use snat_common::{flow::proto, Counter, MAX_NAT_IPS, SLOT_HAIRPIN_DELIVER};

use crate::{
    egress, ingress,
    maps::{count, SNAT_CONFIG, SNAT_NAT_IPS, SNAT_PROGRAMS},
    packet::{read, Ipv4, ETH_P_IP_BE},
    verdict::Verdict,
};

/// `AF_INET`.
const AF_INET: u8 = 2;
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
    Some(translated.and_then(|c| {
        // The mapping existed: the source is translated.
        count(c);
        // SAFETY: a tail call from the program's own frame; on success delivery goes on there.
        unsafe { SNAT_PROGRAMS.tail_call(ctx, SLOT_HAIRPIN_DELIVER) };
        Err(Counter::HairpinDropNoDeliverer.into())
    }))
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
fn nat_endpoint(addr: [u8; 4], port: u16) -> bool {
    let Some(cfg) = SNAT_CONFIG.get(0) else {
        return false;
    };
    let set = cfg.active & 1;
    let n = cfg.nat_ip_count[set as usize];
    for i in 0..MAX_NAT_IPS {
        if i >= n {
            break;
        }
        if let Some(nat) = SNAT_NAT_IPS.get(set * MAX_NAT_IPS + i) {
            if nat.addr == addr {
                return nat.port_min <= port && port <= nat.port_max;
            }
        }
    }
    false
}

/// The second step (`snat_hairpin_deliver`): returns the TC action.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> i32 {
    let delivered = match ingress::run(ctx) {
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

/// The interface the node routes the (translated) packet out of, as it would forward it.
#[inline(always)]
fn route(ctx: &TcContext) -> Option<u32> {
    let ip = Ipv4::read(ctx).ok()?;
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid value (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    // `tot_len` stays 0: no MTU check. A GSO packet's length is its whole burst, which the
    // device segments; an MTU below the packet's would be the target pod's own link, the same
    // as the sender's on a node.
    // SAFETY: reading the device index of our own context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst);
    // SAFETY: our own context and a fully initialised `bpf_fib_lookup` on the stack, passed with
    // its size; the helper writes its results into it.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    matches!(ret, FIB_SUCCESS | FIB_NO_NEIGH).then_some(params.ifindex)
}
