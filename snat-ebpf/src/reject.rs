//! Answering a refused flow at once, on the remote's behalf, so the pod fails in microseconds
//! instead of retransmitting into a timeout (RFC 5508 REQ-8; what `--on-exhaustion reject` does).
//!
//! The refused packet itself becomes the answer: a TCP SYN turns into a RST|ACK from the
//! destination, a UDP datagram or ICMP echo into an ICMP destination unreachable, code 13
//! ("communication administratively prohibited"), quoting it. The answer is redirected to the
//! uplink's ingress, so the node routes it back to the pod like any reply; it carries the
//! destination's address as its source (a node address would be a martian on ingress) and never
//! leaves the node. A refused hairpin flow (the hairpin program, on a pod's interface) is
//! answered straight back out of that interface. Answers are rate-limited per CPU
//! (`Config::reject_per_sec`); above the rate, and for headers snat does not rewrite (IPv4
//! options, GSO), the packet is only dropped.
//!
//! IPv6 the same way: a RST|ACK, or an ICMPv6 destination unreachable, code 1 ("communication
//! with destination administratively prohibited", RFC 4443 §3.1) quoting the fixed header and
//! the first 8 bytes after it. A UDP datagram or echo request with extension headers is only
//! dropped (its quote would not reach its ports within those 8 bytes), like IPv4 with options.
//! The IPv6 answer is built in a program of its own, `snat_reject6` (see [`answer6`]).

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_RESET, BPF_F_INGRESS, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_csum_level, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use snat_common::{
    csum,
    flow::proto,
    ip6::{icmp6, next_header, HEADER_LEN},
    within_ns, Config, Counter, SLOT_REJECT6,
};

use crate::{
    family::IpHeader,
    maps::{count, SNAT_PROGRAMS, SNAT_REJECT_RATE},
    packet::{read, Ipv4, ETH_LEN},
    packet6::Ipv6,
};

const ADJ_ROOM_MAC: u32 = 1;

/// Whether this CPU may send another answer now.
#[inline(always)]
fn within_rate(cfg: &Config, now: u64) -> bool {
    let Some(w) = SNAT_REJECT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    let w = unsafe { &mut *w };
    if !within_ns(now, w.start_ns, 1_000_000_000) {
        w.start_ns = now;
        w.sent = 0;
    }
    if w.sent >= u64::from(cfg.reject_per_sec) {
        return false;
    }
    w.sent += 1;
    true
}

/// One's complement sum of a fixed-size header (even length).
#[inline(always)]
fn sum<const N: usize>(bytes: &[u8; N], initial: u32) -> u32 {
    let mut acc = initial;
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn finish(acc: u32) -> [u8; 2] {
    (!csum::fold(acc)).to_be_bytes()
}

/// Answers the refused packet `ip` if the configuration and the rate allow; returns the TC
/// action (`TC_ACT_REDIRECT`) when the answer is on its way, `None` when the packet is to be
/// dropped instead.
#[inline(always)]
pub fn answer(ctx: &TcContext, ip: &Ipv4, cfg: &Config, now: u64) -> Option<i32> {
    if !allowed(cfg, now) {
        return None;
    }
    let built = match ip.proto {
        proto::TCP => rst(ctx, ip).map(|()| Counter::RejectRst),
        _ => unreachable(ctx, ip).map(|()| Counter::RejectIcmp),
    };
    send(ctx, built)
}

/// `Stop::action` of a refused IPv6 flow to be answered (see [`answer6`]): not a TC action, and
/// never returned as one.
pub const ANSWER_IN_REJECT6: i32 = i32::MIN;

/// [`answer`] for IPv6, in two steps: this one, where the flow is refused, only asks the policy
/// and the rate, and `snat_create6` then hands the packet to `snat_reject6` ([`run6`]) with a tail
/// call; the answer is built there, in a stack frame of its own (`snat_create6`'s leaves it
/// none).
#[inline(always)]
pub fn answer6(cfg: &Config, now: u64) -> Option<i32> {
    allowed(cfg, now).then_some(ANSWER_IN_REJECT6)
}

/// The end of `snat_create6` for a refused flow [`answer6`] said to answer: its counter, then
/// `snat_reject6`.
#[inline(always)]
pub fn hand_over6(ctx: &TcContext, counter: Counter) -> i32 {
    count(counter);
    // SAFETY: a tail call from the program's own frame; on success the answer is sent there.
    unsafe { SNAT_PROGRAMS.tail_call(ctx, SLOT_REJECT6) };
    count(Counter::RejectFailed);
    TC_ACT_SHOT
}

/// `snat_reject6`: turns the refused IPv6 packet into its answer and sends it, or drops it.
#[inline(always)]
pub fn run6(ctx: &TcContext) -> i32 {
    let built = match Ipv6::fixed(ctx) {
        Ok(ip) => match (ip.walk(ctx), ip.proto) {
            (Ok(()), proto::TCP) => rst6(ctx, ip).map(|()| Counter::RejectRst),
            (Ok(()), _) => unreachable6(ctx, ip).map(|()| Counter::RejectIcmp),
            (Err(_), _) => Err(-1),
        },
        Err(()) => Err(-1),
    };
    send(ctx, built).unwrap_or(TC_ACT_SHOT)
}

/// Whether the policy is to answer and this CPU may send another answer now.
#[inline(always)]
pub fn allowed(cfg: &Config, now: u64) -> bool {
    if cfg.flags & Config::REJECT == 0 {
        return false;
    }
    if !within_rate(cfg, now) {
        count(Counter::RejectRateLimited);
        return false;
    }
    true
}

/// Sends the answer the packet was turned into (`built`: its counter), or counts the failure.
#[inline(always)]
fn send(ctx: &TcContext, built: Result<Counter, i64>) -> Option<i32> {
    let Ok(sent) = built else {
        count(Counter::RejectFailed);
        return None;
    };
    // SAFETY: the program's own context; resetting the checksum state makes the stack verify the
    // checksums written above instead of trusting stale offload metadata.
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_RESET)) };
    // SAFETY: reading the device indices of our own context.
    let (ifindex, arrived) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // On the uplink's egress the answer is "received" on the uplink, and the stack routes it to
    // the pod; on a pod's interface (the hairpin program, TC ingress: the packet arrived on the
    // device it is on) it goes straight back out of it.
    let flags = if arrived == ifindex {
        0
    } else {
        u64::from(BPF_F_INGRESS)
    };
    // SAFETY: redirecting to the device the packet is on.
    let action = unsafe { bpf_redirect(ifindex, flags) };
    if action != i64::from(TC_ACT_REDIRECT) {
        count(Counter::RejectFailed);
        return None;
    }
    count(sent);
    Some(TC_ACT_REDIRECT)
}

/// The Ethernet header with source and destination swapped (the answer is "received" on the
/// uplink, addressed to it).
#[inline(always)]
fn swapped_eth(ctx: &TcContext) -> Result<[u8; 12], i64> {
    let eth: [u8; 12] = read(ctx, 0)?;
    let mut out = [0u8; 12];
    out[..6].copy_from_slice(&eth[6..]);
    out[6..].copy_from_slice(&eth[..6]);
    Ok(out)
}

/// An IPv4 header from `src` to `dst` carrying `len` bytes of `p`, with its checksum.
#[inline(always)]
fn ip_header(src: [u8; 4], dst: [u8; 4], p: u8, len: u16) -> [u8; 20] {
    let tot = (20 + len).to_be_bytes();
    let mut h = [
        0x45, 0, tot[0], tot[1], 0, 0, 0x40, 0, 64, p, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    let c = finish(sum(&h, 0));
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// Turns a TCP segment into the RST its destination would send: a SYN into a RST|ACK, a
/// segment with ACK (cluster mode: one whose mapping went with its block) into a RST.
#[inline(always)]
fn rst(ctx: &TcContext, ip: &Ipv4) -> Result<(), i64> {
    if ip.ihl != 20 {
        return Err(-1);
    }
    let payload = u32::from(ip.tot_len).saturating_sub(20);
    let pseudo = sum(&ip.dst, sum(&ip.src, u32::from(proto::TCP) + 20));
    let tcp = rst_header(ctx, ip.l4(), payload, pseudo)?;
    let eth = swapped_eth(ctx)?;
    let hdr = ip_header(ip.dst, ip.src, proto::TCP, 20);
    // SAFETY: the program's own context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + 40) as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(0, &eth, 0)?;
    ctx.store(ETH_LEN, &hdr, 0)?;
    ctx.store(ETH_LEN + 20, &tcp, 0)
}

/// The RST answering the TCP segment at `l4` (`len`: its header and payload), with its
/// checksum (`pseudo`: the sum of the answer's pseudo-header).
#[inline(always)]
fn rst_header(ctx: &TcContext, l4: usize, len: u32, pseudo: u32) -> Result<[u8; 20], i64> {
    let syn: [u8; 20] = read(ctx, l4)?;
    let doff = u32::from(syn[12] >> 4) * 4;
    let payload = len.saturating_sub(doff);
    let seq = u32::from_be_bytes([syn[4], syn[5], syn[6], syn[7]]);
    // RFC 9293 3.10.7.1: a RST answering a segment with ACK takes its SEQ from that ACK (and
    // carries none); one answering a segment without ACK has SEQ 0 and ACKs all it occupied.
    let (rst_seq, ack, flags) = if syn[13] & 0x10 != 0 {
        ([syn[8], syn[9], syn[10], syn[11]], [0; 4], 0x04)
    } else {
        let len = payload + u32::from(syn[13] & 0x02 != 0) + u32::from(syn[13] & 0x01 != 0);
        ([0; 4], seq.wrapping_add(len).to_be_bytes(), 0x14)
    };
    let mut tcp = [
        syn[2], syn[3], syn[0], syn[1], rst_seq[0], rst_seq[1], rst_seq[2], rst_seq[3], ack[0],
        ack[1], ack[2], ack[3], 0x50, flags, 0, 0, 0, 0, 0, 0,
    ];
    let c = finish(sum(&tcp, pseudo));
    tcp[16] = c[0];
    tcp[17] = c[1];
    Ok(tcp)
}

/// The RST for an IPv6 TCP segment (see [`rst`]): the frame becomes Ethernet, a fixed IPv6
/// header and the RST, whatever extension headers the segment had.
#[inline(always)]
fn rst6(ctx: &TcContext, ip: &Ipv6) -> Result<(), i64> {
    let len = IpHeader::l4_len(ip, ctx) as u32;
    let pseudo = sum(&ip.dst, sum(&ip.src, u32::from(proto::TCP) + 20));
    let tcp = rst_header(ctx, IpHeader::l4(ip), len, pseudo)?;
    // SAFETY: the program's own context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + HEADER_LEN + 20) as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ip6_header(ctx, ip, proto::TCP, 20)?;
    ctx.store(ETH_LEN + HEADER_LEN, &tcp, 0)
}

/// Writes the Ethernet header (swapped) and an IPv6 header answering `ip` (its destination to
/// its source) that carries `len` bytes of `next`.
#[inline(always)]
fn ip6_header(ctx: &TcContext, ip: &Ipv6, next: u8, len: u16) -> Result<(), i64> {
    let eth = swapped_eth(ctx)?;
    let l = len.to_be_bytes();
    ctx.store(0, &eth, 0)?;
    ctx.store(ETH_LEN, &[0x60, 0, 0, 0, l[0], l[1], next, 64], 0)?;
    // Straight from the header's slot (map memory).
    ctx.store(ETH_LEN + 8, &ip.dst, 0)?;
    ctx.store(ETH_LEN + 24, &ip.src, 0)
}

/// Wraps a UDP datagram or ICMP echo in the ICMP destination unreachable (code 13) its
/// destination would send, quoting its IPv4 header and first 8 bytes.
#[inline(always)]
fn unreachable(ctx: &TcContext, ip: &Ipv4) -> Result<(), i64> {
    if ip.ihl != 20 || ip.tot_len < 28 {
        return Err(-1);
    }
    let orig_ip: [u8; 20] = read(ctx, ETH_LEN)?;
    let orig_l4: [u8; 8] = read(ctx, ETH_LEN + 20)?;
    let eth = swapped_eth(ctx)?;
    let mut icmp = [3u8, 13, 0, 0, 0, 0, 0, 0];
    let c = finish(sum(&orig_l4, sum(&orig_ip, sum(&icmp, 0))));
    icmp[2] = c[0];
    icmp[3] = c[1];
    let hdr = ip_header(ip.dst, ip.src, proto::ICMP, 8 + 28);
    // SAFETY: the program's own context; room is made right after the MAC header.
    let rc = unsafe { bpf_skb_adjust_room(ctx.skb.skb, 28, ADJ_ROOM_MAC, 0) };
    if rc != 0 {
        return Err(rc);
    }
    // SAFETY: as above.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + 28 + 28) as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ctx.store(0, &eth, 0)?;
    ctx.store(ETH_LEN, &hdr, 0)?;
    ctx.store(ETH_LEN + 20, &icmp, 0)
}

/// Wraps an IPv6 UDP datagram or ICMPv6 echo request in the ICMPv6 destination unreachable
/// (code 1, administratively prohibited) its destination would send, quoting its fixed header
/// and the 8 bytes after it (its ports or identifier: extension headers are refused).
#[inline(always)]
fn unreachable6(ctx: &TcContext, ip: &Ipv6) -> Result<(), i64> {
    const QUOTE: usize = HEADER_LEN + 8;
    if IpHeader::l4(ip) != ETH_LEN + HEADER_LEN || IpHeader::l4_len(ip, ctx) < 8 {
        return Err(-1);
    }
    // The quote stays where it is (moved along by the room made in front of it): only its sum
    // is needed.
    let mut quoted = 0;
    let mut i = 0;
    while i < QUOTE {
        let w: [u8; 8] = read(ctx, ETH_LEN + i)?;
        quoted = sum(&w, quoted);
        i += 8;
    }
    let len = (8 + QUOTE) as u16;
    let pseudo = sum(
        &ip.dst,
        sum(&ip.src, u32::from(next_header::ICMPV6) + u32::from(len)),
    );
    let mut icmp = [icmp6::DEST_UNREACH, ADMIN_PROHIBITED6, 0, 0, 0, 0, 0, 0];
    let c = finish(sum(&icmp, pseudo + quoted));
    icmp[2] = c[0];
    icmp[3] = c[1];
    // SAFETY: the program's own context; room is made right after the MAC header.
    let rc = unsafe { bpf_skb_adjust_room(ctx.skb.skb, (HEADER_LEN + 8) as i32, ADJ_ROOM_MAC, 0) };
    if rc != 0 {
        return Err(rc);
    }
    // SAFETY: as above.
    let rc =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + HEADER_LEN + 8 + QUOTE) as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    ip6_header(ctx, ip, next_header::ICMPV6, len)?;
    ctx.store(ETH_LEN + HEADER_LEN, &icmp, 0)
}

/// ICMPv6 destination unreachable code 1: communication with destination administratively
/// prohibited.
const ADMIN_PROHIBITED6: u8 = 1;
