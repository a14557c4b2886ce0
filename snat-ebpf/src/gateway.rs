//! `snat_gateway`: the return path of a cluster (issue 14). Attached to TC ingress of the interface
//! the NAT IPs' traffic arrives on, it sends every reply to the node holding the block of its NAT
//! port, unchanged (the node's own ingress program translates it):
//!
//! - not IPv4, or not to a NAT IP (`SNAT_GW_NAT_IPS`): passed untouched (`TC_ACT_UNSPEC`);
//! - the NAT port: a TCP/UDP destination port; an ICMP echo reply's identifier; for an ICMP error,
//!   the source port (identifier) of the header it quotes, which is the node's translated packet
//!   (source NAT IP:port); for a later fragment, the port its first fragment had
//!   (`SNAT_GW_FRAGS`, filled by the first fragment, keyed by source, destination, protocol, id);
//! - block `(port − lo) >> shift` of the NAT IP → `SNAT_GW_ROUTES` → `bpf_redirect_neigh` out of
//!   the route's interface to its next hop;
//! - anything else to a NAT IP is dropped and counted by reason (`GwCounter`).
//!
//! No loops; every packet read is bounds-checked (`packet::read`); the packet is never written.

use aya_ebpf::{
    bindings::{bpf_redir_neigh, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, generated::bpf_redirect_neigh},
    programs::TcContext,
};
use snat_common::{
    flow::proto,
    gateway::{GwBlockKey, GwCounter, GwFragValue, GwRoute, GW_FRAG_TIMEOUT_NS},
};

use crate::{
    gateway_maps::{count, count_node, SNAT_GW_FRAGS, SNAT_GW_NAT_IPS, SNAT_GW_ROUTES},
    icmp::{is_error, kind, Inner},
    packet::{read, Ipv4, ETH_P_IP_BE},
};

/// `AF_INET`, the family of a `bpf_redir_neigh` next hop.
const AF_INET: u32 = 2;

/// What becomes of a packet.
enum Fate {
    /// On to the stack or the next program, untouched.
    Pass(GwCounter),
    /// Out of the route's interface, counted as the given kind when the redirect is accepted.
    Forward(GwCounter, GwRoute),
    Drop(GwCounter),
}

pub fn run(ctx: &TcContext) -> i32 {
    match decide(ctx) {
        Fate::Pass(c) => {
            count(c);
            TC_ACT_UNSPEC
        }
        Fate::Drop(c) => {
            count(c);
            TC_ACT_SHOT
        }
        Fate::Forward(c, route) => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv6_nh: [0; 4],
                },
            };
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(route.next_hop);
            // SAFETY: `nh` is a fully initialised `bpf_redir_neigh` on the stack, passed with its
            // size; the helper only reads it.
            let ret = unsafe {
                bpf_redirect_neigh(
                    route.ifindex,
                    &raw mut nh,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            };
            if ret == i64::from(TC_ACT_REDIRECT) {
                count(c);
                count_node(route.slot);
                TC_ACT_REDIRECT
            } else {
                count(GwCounter::DropRedirectFailed);
                TC_ACT_SHOT
            }
        }
    }
}

#[inline(always)]
fn decide(ctx: &TcContext) -> Fate {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return Fate::Pass(GwCounter::PassNotIpv4);
    }
    let Ok(ip) = Ipv4::read(ctx) else {
        // Too short to hold an IPv4 header: it names no NAT IP either.
        return Fate::Pass(GwCounter::PassNotIpv4);
    };
    // SAFETY: a reference to the element found, copied out at once. The controller replaces
    // elements whole (a hash update swaps in a new element under RCU), never writes them in place,
    // so the element stays as read while this program runs.
    let Some(geometry) = (unsafe { SNAT_GW_NAT_IPS.get(ip.dst) }).copied() else {
        return Fate::Pass(GwCounter::PassNotNatIp);
    };
    if !ip.valid(ctx) {
        return Fate::Drop(GwCounter::DropMalformed);
    }
    let (port, kind) = match nat_port(ctx, &ip) {
        Ok(found) => found,
        Err(c) => return Fate::Drop(c),
    };
    let Some(index) = geometry.block_of(u16::from_be_bytes(port)) else {
        return Fate::Drop(GwCounter::DropOutOfRange);
    };
    // SAFETY: as for `SNAT_GW_NAT_IPS` above: replaced whole by the controller, copied out here.
    match unsafe { SNAT_GW_ROUTES.get(GwBlockKey::new(ip.dst, index)) } {
        Some(route) => Fate::Forward(kind, *route),
        None => Fate::Drop(GwCounter::DropNoRoute),
    }
}

/// The packet's NAT port (network byte order) and the counter of its kind.
#[inline(always)]
fn nat_port(ctx: &TcContext, ip: &Ipv4) -> Result<([u8; 2], GwCounter), GwCounter> {
    if ip.is_later_fragment() {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // SAFETY: a reference to the element found, copied out at once; first fragments replace
        // elements whole (an LRU update inserts a new element), never write them in place.
        let first = unsafe { SNAT_GW_FRAGS.get(ip.frag_key()) }.copied();
        return match first {
            Some(v) if now.wrapping_sub(v.seen_ns) < GW_FRAG_TIMEOUT_NS => {
                Ok((v.port, GwCounter::ForwardedFragment))
            }
            _ => Err(GwCounter::DropOrphanFragment),
        };
    }
    let l4 = ip.l4();
    let l4_len = ip.l4_len(ctx);
    let found = match ip.proto {
        proto::TCP | proto::UDP => {
            if l4_len < 4 {
                return Err(GwCounter::DropMalformed);
            }
            let ports: [u8; 4] = read(ctx, l4).map_err(|_| GwCounter::DropMalformed)?;
            let c = if ip.proto == proto::TCP {
                GwCounter::ForwardedTcp
            } else {
                GwCounter::ForwardedUdp
            };
            ([ports[2], ports[3]], c)
        }
        proto::ICMP => {
            if l4_len < 8 {
                return Err(GwCounter::DropMalformed);
            }
            let h: [u8; 8] = read(ctx, l4).map_err(|_| GwCounter::DropMalformed)?;
            if h[0] == kind::ECHO_REPLY {
                ([h[4], h[5]], GwCounter::ForwardedIcmpEcho)
            } else if is_error(h[0]) {
                // The quote is the node's packet as it left: from NAT IP:port to the remote.
                match Inner::parse(ctx, ip) {
                    Some(inner) if inner.src == ip.dst => {
                        (inner.sport, GwCounter::ForwardedIcmpError)
                    }
                    _ => return Err(GwCounter::DropQuoteUnusable),
                }
            } else {
                return Err(GwCounter::DropUnsupported);
            }
        }
        _ => return Err(GwCounter::DropUnsupported),
    };
    if ip.is_fragment() {
        // A first fragment: its later ones follow it. A failed insert only orphans them.
        let _ = SNAT_GW_FRAGS.insert(
            ip.frag_key(),
            GwFragValue {
                port: found.0,
                _pad: [0; 6],
                // SAFETY: helper without preconditions.
                seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
            },
            0,
        );
    }
    Ok(found)
}
