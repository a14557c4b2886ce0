//! Answering a refused flow at once, on the remote's behalf, so the pod fails in microseconds
//! instead of retransmitting into a timeout (RFC 5508 REQ-8; what `--on-exhaustion reject` does).
//!
//! The refused packet itself becomes the answer: a TCP SYN turns into a RST|ACK from the
//! destination, a UDP datagram or ICMP echo into an ICMP destination unreachable, code 13
//! ("communication administratively prohibited"), quoting it. The answer is redirected to the
//! uplink's ingress, so the node routes it back to the pod like any reply; it carries the
//! destination's address as its source (a node address would be a martian on ingress) and never
//! leaves the node. A refused hairpin flow (the hairpin program, on a pod's interface) is
//! answered straight back out of that interface. Answers are rate-limited per CPU (`Config::reject_per_sec`); above the rate,
//! and for headers snat does not rewrite (IPv4 options, GSO), the packet is only dropped.

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_RESET, BPF_F_INGRESS, TC_ACT_REDIRECT},
    helpers::generated::{bpf_csum_level, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use snat_common::{csum, flow::proto, Config, Counter};

use crate::{
    maps::{count, SNAT_REJECT_RATE},
    packet::{read, Ipv4, ETH_LEN},
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
    if now.wrapping_sub(w.start_ns) >= 1_000_000_000 {
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
    if cfg.flags & Config::REJECT == 0 {
        return None;
    }
    if !within_rate(cfg, now) {
        count(Counter::RejectRateLimited);
        return None;
    }
    let built = match ip.proto {
        proto::TCP => rst(ctx, ip).map(|()| Counter::RejectRst),
        _ => unreachable(ctx, ip).map(|()| Counter::RejectIcmp),
    };
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
    let syn: [u8; 20] = read(ctx, ip.l4())?;
    let doff = u32::from(syn[12] >> 4) * 4;
    let payload = u32::from(ip.tot_len).saturating_sub(20 + doff);
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
    let pseudo = u32::from(u16::from_be_bytes([ip.dst[0], ip.dst[1]]))
        + u32::from(u16::from_be_bytes([ip.dst[2], ip.dst[3]]))
        + u32::from(u16::from_be_bytes([ip.src[0], ip.src[1]]))
        + u32::from(u16::from_be_bytes([ip.src[2], ip.src[3]]))
        + u32::from(proto::TCP)
        + 20;
    let c = finish(sum(&tcp, pseudo));
    tcp[16] = c[0];
    tcp[17] = c[1];
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
