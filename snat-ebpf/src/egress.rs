//! Egress on the uplink: translate the source of packets from internal CIDRs.
//!
//! Every IPv4 packet whose source is internal and whose destination is not excluded leaves
//! translated or not at all: anything that cannot be translated (malformed, fragment, unsupported
//! protocol or ICMP type, no port left, table full, a helper failing) is dropped and counted.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use snat_common::{
    flow::proto,
    tcp::{self, header},
    Counter, FlowKey, Mapping,
};

use crate::{
    alloc::{self, AllocError},
    icmp::{self, kind, Inner},
    maps::{
        count, count_refusal, fragments_of, remember_fragments, time_allocation, SNAT_EXCLUDE,
        SNAT_FWD, SNAT_INTERNAL, SNAT_REV,
    },
    packet::{read, rewrite_addr, rewrite_endpoint, Ipv4, Side, ETH_P_IP_BE},
    reject,
    verdict::{Stop, Verdict},
};

/// Mappings record a packet's time only when it moved on by this much, to spare the cache line.
pub const REFRESH_NS: u64 = 100_000_000;

pub fn run(ctx: &TcContext) -> Verdict {
    if ctx.skb.protocol() != ETH_P_IP_BE {
        return Ok(Counter::EgressPassNotIpv4);
    }
    // Without a readable header there is no telling whose packet it is: it must not leave.
    let ip = Ipv4::read(ctx).map_err(|_| Counter::EgressDropMalformed)?;
    if SNAT_INTERNAL.get(Key::new(32, ip.src)).is_none() {
        return Ok(Counter::EgressPassNotInternal);
    }
    if SNAT_EXCLUDE.get(Key::new(32, ip.dst)).is_some() {
        return Ok(Counter::EgressPassExcluded);
    }
    if !ip.valid(ctx) {
        return Err(Counter::EgressDropMalformed.into());
    }
    if ip.is_later_fragment() {
        return later_fragment(ctx, &ip);
    }
    match ip.proto {
        proto::TCP | proto::UDP => transport(ctx, &ip),
        proto::ICMP => icmp(ctx, &ip),
        _ => Err(Counter::EgressDropUnsupportedProto.into()),
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn exhausted(p: u8) -> Counter {
    match p {
        proto::TCP => Counter::EgressDropExhaustedTcp,
        proto::UDP => Counter::EgressDropExhaustedUdp,
        _ => Counter::EgressDropExhaustedIcmp,
    }
}

/// The mapping of `key`, existing (refreshed) or new. A new flow that gets no port is counted
/// once per flow and, with `--on-exhaustion reject`, answered at once (see `reject`).
#[inline(always)]
fn mapping(
    ctx: &TcContext,
    ip: &Ipv4,
    key: &FlowKey,
    tcp_bits: u8,
    pure_syn: bool,
) -> Result<Mapping, Stop> {
    let now = now();
    if let Some(p) = SNAT_FWD.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup (see the concurrency note in `maps`).
        let m = unsafe { &mut *p };
        if pure_syn && key.proto == proto::TCP {
            reopen_if_closed(key, m, now);
        } else if m.tcp_seen | tcp_bits != m.tcp_seen {
            m.tcp_seen |= tcp_bits;
        }
        if now.wrapping_sub(m.last_seen_ns) > REFRESH_NS {
            m.last_seen_ns = now;
        }
        return Ok(*m);
    }
    if key.proto == proto::TCP && !pure_syn {
        // Only a SYN opens a TCP mapping: a stray segment must not take a port.
        return Err(Counter::EgressDropTcpNotSyn.into());
    }
    // SAFETY: helper without preconditions.
    let started = unsafe { bpf_ktime_get_ns() };
    let created = alloc::create(ctx, key, tcp_bits, now);
    // SAFETY: as above.
    time_allocation(unsafe { bpf_ktime_get_ns() }.wrapping_sub(started));
    let refused = match created {
        Ok(m) => {
            // Few arguments: each one costs stack, and the programs are near the 512-byte limit.
            debug!(
                ctx,
                "new mapping {:i}:{} via port {}",
                key.src_addr,
                key.src_port(),
                m.nat_port()
            );
            count(match key.proto {
                proto::TCP => Counter::CreatedTcp,
                proto::UDP => Counter::CreatedUdp,
                _ => Counter::CreatedIcmp,
            });
            return Ok(m);
        }
        Err(AllocError::NoNatIp) => return Err(Counter::EgressDropNoNatIp.into()),
        Err(AllocError::TableFull) => {
            warn!(
                ctx,
                "mapping table full: proto {} {:i}:{}",
                key.proto,
                key.src_addr,
                key.src_port()
            );
            return Err(Counter::EgressDropTableFull.into());
        }
        Err(AllocError::Exhausted) => exhausted(key.proto),
        Err(AllocError::SourceCap) => Counter::EgressDropSourceCap,
        Err(AllocError::FairShare) => Counter::EgressDropFairShare,
    };
    let Ok((cfg, nat)) = alloc::nat_ip_for(key.src_addr) else {
        return Err(refused.into());
    };
    let no_port = matches!(
        refused,
        Counter::EgressDropExhaustedTcp
            | Counter::EgressDropExhaustedUdp
            | Counter::EgressDropExhaustedIcmp
    );
    count_refusal(key, nat.addr, now, no_port);
    warn!(
        ctx,
        "refused new flow from {:i}:{} (counter {})",
        key.src_addr,
        key.src_port(),
        refused.index()
    );
    Err(Stop {
        counter: refused,
        action: reject::answer(ctx, ip, &cfg, now).unwrap_or(aya_ebpf::bindings::TC_ACT_SHOT),
    })
}

/// A new SYN on a mapping whose connection ended (FIN or RST seen) or got an answer starts a new
/// connection on the same 4-tuple: keep the NAT port (so the server's TIME_WAIT sees the same
/// 4-tuple with a higher sequence number and accepts it) and restart the state of both halves.
#[inline(always)]
fn reopen_if_closed(key: &FlowKey, m: &mut Mapping, now: u64) {
    let reply = key.reply(m.nat_addr, m.nat_port);
    let Some(o) = SNAT_REV.get_ptr_mut(reply) else {
        return;
    };
    // SAFETY: pointer from a successful lookup.
    let o = unsafe { &mut *o };
    let ended = (m.tcp_seen | o.tcp_seen) & (tcp::SEEN_FIN | tcp::SEEN_RST) != 0;
    if ended || o.tcp_seen & tcp::SEEN_SYN != 0 {
        o.tcp_seen = 0;
        o.last_seen_ns = now;
        m.tcp_seen = tcp::SEEN_SYN;
        count(Counter::TcpReopened);
    }
}

fn transport(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let l4 = ip.l4();
    let avail = ip.l4_len(ctx);
    let head: [u8; 8] = read(ctx, l4).map_err(|_| Counter::EgressDropMalformed)?;
    let (sport, dport) = ([head[0], head[1]], [head[2], head[3]]);
    let (mut bits, mut pure_syn) = (0, false);
    let translated = if ip.proto == proto::TCP {
        let off_flags: [u8; 2] = read(ctx, l4 + 12).map_err(|_| Counter::EgressDropMalformed)?;
        let doff = usize::from(off_flags[0] >> 4) * 4;
        if avail < 20 || doff < 20 || doff > avail {
            return Err(Counter::EgressDropMalformed.into());
        }
        let flags = off_flags[1];
        bits = tcp::seen_bits(flags);
        pure_syn = flags & (header::SYN | header::ACK | header::RST | header::FIN) == header::SYN;
        Counter::EgressTranslatedTcp
    } else {
        let udp_len = usize::from(u16::from_be_bytes([head[4], head[5]]));
        // A first fragment carries only part of the datagram its length counts.
        if avail < 8 || udp_len < 8 || (udp_len > avail && !ip.is_fragment()) {
            return Err(Counter::EgressDropMalformed.into());
        }
        Counter::EgressTranslatedUdp
    };
    let key = FlowKey::new(
        ip.proto,
        ip.src,
        sport,
        ip.dst,
        FlowKey::remote_port_for(ip.proto, dport),
    );
    let m = mapping(ctx, ip, &key, bits, pure_syn)?;
    rewrite_endpoint(
        ctx,
        l4,
        ip.proto,
        Side::Src,
        0,
        (ip.src, sport),
        (m.nat_addr, m.nat_port),
    )
    .map_err(|_| Counter::EgressDropRewrite)?;
    if ip.is_fragment() {
        remember_fragments(&ip.frag_key(), m.nat_addr, m.last_seen_ns);
    }
    Ok(translated)
}

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
            let m = mapping(ctx, ip, &key, 0, false)?;
            rewrite_endpoint(
                ctx,
                l4,
                proto::ICMP,
                Side::Src,
                4,
                (ip.src, id),
                (m.nat_addr, m.nat_port),
            )
            .map_err(|_| Counter::EgressDropRewrite)?;
            if ip.is_fragment() {
                remember_fragments(&ip.frag_key(), m.nat_addr, m.last_seen_ns);
            }
            Ok(Counter::EgressTranslatedIcmp)
        }
        t if icmp::is_error(t) => icmp_error(ctx, ip),
        _ => Err(Counter::EgressDropIcmpType.into()),
    }
}

/// A pod reports an error about a packet it received through the NAT: the quoted packet runs
/// remote → pod, so its destination is the internal endpoint to put back to the NAT one.
fn icmp_error(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    let inner = Inner::parse(ctx, ip).ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    let key = FlowKey::new(
        inner.proto,
        inner.dst,
        inner.dport,
        inner.src,
        FlowKey::remote_port_for(inner.proto, inner.sport),
    );
    let m = SNAT_FWD
        .get_ptr(key)
        // SAFETY: pointer from a successful lookup, copied out at once.
        .map(|p| unsafe { *p })
        .ok_or(Counter::EgressDropIcmpErrorNoMapping)?;
    inner
        .rewrite(ctx, Side::Dst, (m.nat_addr, m.nat_port))
        .and_then(|()| rewrite_addr(ctx, Side::Src, ip.src, m.nat_addr))
        .map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedIcmpError)
}

/// A fragment after the first carries no ports: its source becomes the NAT IP its first
/// fragment got, or, when it overtook the first fragment, the NAT IP the pod is paired with,
/// which is where the first fragment's mapping will be (RFC 4787 REQ-14: out-of-order fragments).
fn later_fragment(ctx: &TcContext, ip: &Ipv4) -> Verdict {
    if !matches!(ip.proto, proto::TCP | proto::UDP | proto::ICMP) {
        return Err(Counter::EgressDropUnsupportedProto.into());
    }
    let addr = match fragments_of(&ip.frag_key(), now()) {
        Some(addr) => addr,
        None => {
            alloc::nat_ip_for(ip.src)
                .map_err(|_| Counter::EgressDropNoNatIp)?
                .1
                .addr
        }
    };
    rewrite_addr(ctx, Side::Src, ip.src, addr).map_err(|_| Counter::EgressDropRewrite)?;
    Ok(Counter::EgressTranslatedFragment)
}
