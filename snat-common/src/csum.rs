//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, equation 3).
//!
//! On TC the datapath updates outer IPv4/TCP/UDP checksums with the kernel's
//! `bpf_l3/l4_csum_replace` helpers, which also keep `skb->csum` and pending checksum offload
//! right. It uses this module for the fields inside an ICMP error's payload (the embedded header),
//! where it must compute the new checksums itself, and on XDP for every checksum
//! ([`rewrite_l4`]), where there are no such helpers; [`may_be_partial`] tells the XDP program
//! which checksums are not checksums yet (pending offload) and must be left to TC. Words are 16-bit values read big-endian from the packet; one's complement
//! sums are byte-order independent as long as both sides of an update read words the same way.
//!
//! Invariant: every function here is branch-light, loop-free (except [`checksum`], which is for
//! userspace and tests) and cannot panic, so the verifier accepts it inlined into the programs.

/// Folds a 32-bit one's complement accumulator to 16 bits. Two rounds suffice for sums of fewer
/// than 65,537 words, which covers every caller.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after one 16-bit word it covers changes from `old` to `new`
/// (RFC 1624 eq. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The checksum `check` after a 4-byte field it covers (an IPv4 address) changes.
#[inline(always)]
pub const fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let hi = replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace16(
        hi,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Like [`replace16`] for a UDP checksum: 0 means "no checksum" and stays 0; a computed 0 is sent
/// as 0xffff (RFC 768).
#[inline(always)]
pub const fn replace16_udp(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Like [`replace32`] for a UDP checksum (see [`replace16_udp`]).
#[inline(always)]
pub const fn replace32_udp(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The L4 checksum `check` of a TCP, UDP or ICMP (echo) packet after one of its endpoints
/// changes from `old` to `new` (address, port or echo identifier): TCP and UDP cover the address
/// through the pseudo-header, ICMP does not; a UDP checksum of 0 (none) stays 0.
#[inline(always)]
pub const fn rewrite_l4(
    proto: u8,
    check: u16,
    old: ([u8; 4], [u8; 2]),
    new: ([u8; 4], [u8; 2]),
) -> u16 {
    let (op, np) = (u16::from_be_bytes(old.1), u16::from_be_bytes(new.1));
    match proto {
        crate::flow::proto::TCP => replace16(replace32(check, old.0, new.0), op, np),
        crate::flow::proto::UDP => replace16_udp(replace32_udp(check, old.0, new.0), op, np),
        _ => replace16(check, op, np),
    }
}

/// The folded (not inverted) sum of the IPv4 pseudo-header of a TCP or UDP segment of `l4_len`
/// bytes: what the checksum field of a packet whose checksum is pending offload holds (the
/// kernel's `~csum_tcpudp_magic(…, 0)` for a CHECKSUM_PARTIAL skb, RFC 1071 end-around carry).
#[inline(always)]
pub const fn pseudo_header_fold(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    let words = u16::from_be_bytes([src[0], src[1]]) as u32
        + u16::from_be_bytes([src[2], src[3]]) as u32
        + u16::from_be_bytes([dst[0], dst[1]]) as u32
        + u16::from_be_bytes([dst[2], dst[3]]) as u32
        + proto as u32
        + l4_len as u32;
    fold(words)
}

/// Whether the TCP or UDP checksum field `check` may be a pending-offload value rather than a
/// checksum: it equals the pseudo-header's folded sum (0 and 0xffff being the same one's
/// complement number). A real checksum matches by chance about once in 65,536 packets; a caller
/// that cannot tell must then take the slow, always-right way (XDP leaves it to TC), never guess.
#[inline(always)]
pub const fn may_be_partial(
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4_len: u16,
) -> bool {
    let p = pseudo_header_fold(src, dst, proto, l4_len);
    check == p || (check == 0 && p == 0xffff) || (check == 0xffff && p == 0)
}

/// One's complement sum of `data` (odd length padded with a zero byte) added to `initial`, not
/// folded or inverted.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// The Internet checksum of `data` (the value to store in a zeroed checksum field).
pub fn checksum(data: &[u8]) -> u16 {
    !fold_full(sum(data, 0))
}

/// Folds any 32-bit accumulator to 16 bits.
pub const fn fold_full(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of the IPv4 pseudo-header TCP and UDP checksums cover.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let mut ph = [0u8; 12];
    ph[..4].copy_from_slice(&src);
    ph[4..8].copy_from_slice(&dst);
    ph[9] = proto;
    ph[10..].copy_from_slice(&l4_len.to_be_bytes());
    sum(&ph, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header(src: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 0, 0, 0, 0, 203, 0, 113, 7,
        ];
        h[12..16].copy_from_slice(&src);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn known_vector() {
        // RFC 1071 §3 example words.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold_full(sum(&data, 0)), 0xddf2);
    }

    #[test]
    fn header_with_its_checksum_sums_to_ffff() {
        let h = ipv4_header([10, 0, 0, 1]);
        assert_eq!(fold_full(sum(&h, 0)), 0xffff);
    }

    #[test]
    fn replace32_matches_recomputation() {
        for (old, new) in [
            ([10, 0, 0, 1], [198, 51, 100, 1]),
            ([10, 255, 255, 254], [0, 0, 0, 0]),
            ([0, 0, 0, 0], [255, 255, 255, 255]),
            ([100, 64, 3, 7], [100, 64, 3, 7]),
        ] {
            let before = ipv4_header(old);
            let after = ipv4_header(new);
            let c_before = u16::from_be_bytes([before[10], before[11]]);
            let c_after = u16::from_be_bytes([after[10], after[11]]);
            let updated = replace32(c_before, old, new);
            // 0x0000 and 0xffff are the same one's complement number; both verify.
            let mut h = after;
            h[10..12].copy_from_slice(&updated.to_be_bytes());
            assert_eq!(fold_full(sum(&h, 0)), 0xffff, "{old:?} -> {new:?}");
            assert!(
                updated == c_after
                    || (updated ^ c_after) == 0xffff && (updated == 0 || c_after == 0)
            );
        }
    }

    #[test]
    fn replace16_port_update_verifies() {
        let mut seg = [0u8; 20];
        seg[..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&443u16.to_be_bytes());
        let c = checksum(&seg);
        let updated = replace16(c, 40000, 33333);
        seg[..2].copy_from_slice(&33333u16.to_be_bytes());
        seg[16..18].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(fold_full(sum(&seg, 0)), 0xffff);
    }

    /// A segment of `proto` from `src:sport` to `dst:dport` with `payload`, its checksum
    /// computed over the pseudo-header (`full`) or left as a sender with offload leaves it (the
    /// pseudo-header's folded sum).
    fn segment(
        proto: u8,
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        payload: &[u8],
        full: bool,
    ) -> Vec<u8> {
        let head = if proto == crate::flow::proto::TCP {
            20
        } else {
            8
        };
        let mut seg = vec![0u8; head];
        seg[..2].copy_from_slice(&src.1.to_be_bytes());
        seg[2..4].copy_from_slice(&dst.1.to_be_bytes());
        if proto == crate::flow::proto::TCP {
            seg[12] = 5 << 4;
            seg[13] = 0x10;
        } else {
            seg[4..6].copy_from_slice(&((head + payload.len()) as u16).to_be_bytes());
        }
        seg.extend_from_slice(payload);
        let len = seg.len() as u16;
        let c = if full {
            !fold_full(sum(&seg, pseudo_header_sum(src.0, dst.0, proto, len)))
        } else {
            pseudo_header_fold(src.0, dst.0, proto, len)
        };
        let at = if proto == crate::flow::proto::TCP {
            16
        } else {
            6
        };
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        seg
    }

    fn verifies(proto: u8, src: [u8; 4], dst: [u8; 4], seg: &[u8]) -> bool {
        fold_full(sum(
            seg,
            pseudo_header_sum(src, dst, proto, seg.len() as u16),
        )) == 0xffff
    }

    #[test]
    fn rewrite_l4_matches_recomputation_for_tcp_udp_and_icmp() {
        use crate::flow::proto::{ICMP, TCP, UDP};
        let (remote, nat, pod) = ([203, 0, 113, 10], [198, 51, 100, 1], [10, 1, 0, 2]);
        for proto in [TCP, UDP] {
            for (payload, nat_port, pod_port) in [
                (&b""[..], 40000u16, 40000u16),
                (b"hello", 33333, 1234),
                (b"odd", 65535, 0),
            ] {
                let seg = segment(proto, (remote, 80), (nat, nat_port), payload, true);
                let at = if proto == TCP { 16 } else { 6 };
                let c = u16::from_be_bytes([seg[at], seg[at + 1]]);
                let new = rewrite_l4(
                    proto,
                    c,
                    (nat, nat_port.to_be_bytes()),
                    (pod, pod_port.to_be_bytes()),
                );
                let mut out = seg.clone();
                out[2..4].copy_from_slice(&pod_port.to_be_bytes());
                out[at..at + 2].copy_from_slice(&new.to_be_bytes());
                assert!(verifies(proto, remote, pod, &out), "{proto} {payload:?}");
                assert!(!may_be_partial(c, remote, nat, proto, seg.len() as u16) || c == 0);
            }
        }
        // ICMP echo: the identifier only, no pseudo-header.
        let mut echo = [0u8, 0, 0, 0, 0x9c, 0x40, 0, 1, b'p', b'i', b'n', b'g'];
        let c = checksum(&echo);
        let new = rewrite_l4(ICMP, c, (nat, [0x9c, 0x40]), (pod, 7u16.to_be_bytes()));
        echo[4..6].copy_from_slice(&7u16.to_be_bytes());
        echo[2..4].copy_from_slice(&new.to_be_bytes());
        assert_eq!(fold_full(sum(&echo, 0)), 0xffff);
        // UDP without checksum keeps none.
        assert_eq!(rewrite_l4(UDP, 0, (nat, [1, 2]), (pod, [3, 4])), 0);
    }

    #[test]
    fn a_pending_offload_checksum_is_recognised() {
        use crate::flow::proto::{TCP, UDP};
        let (remote, nat) = ([203, 0, 113, 10], [198, 51, 100, 1]);
        for proto in [TCP, UDP] {
            let seg = segment(proto, (remote, 443), (nat, 40001), b"partial", false);
            let at = if proto == TCP { 16 } else { 6 };
            let c = u16::from_be_bytes([seg[at], seg[at + 1]]);
            assert!(may_be_partial(c, remote, nat, proto, seg.len() as u16));
            // Another length or address: not this segment's pseudo-header.
            assert!(!may_be_partial(c, remote, nat, proto, seg.len() as u16 + 1));
            assert!(!may_be_partial(
                c,
                remote,
                [10, 1, 0, 2],
                proto,
                seg.len() as u16
            ));
        }
        // The kernel's form of the pseudo-header sum agrees with the RFC 1071 one.
        let (s, d) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        assert_eq!(
            pseudo_header_fold(s, d, TCP, 40),
            fold_full(pseudo_header_sum(s, d, TCP, 40))
        );
        // 0 and 0xffff are one number.
        let (a, b) = ([0xff, 0xff, 0, 0], [0, 0, 0, 0]);
        assert_eq!(pseudo_header_fold(a, b, 0, 0), 0xffff);
        assert!(may_be_partial(0, a, b, 0, 0));
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(replace16_udp(0, 1, 2), 0);
        assert_eq!(replace32_udp(0, [1, 2, 3, 4], [5, 6, 7, 8]), 0);
        // Find an update whose plain result is 0 and check the UDP form sends 0xffff.
        let c = 0x1234u16;
        let old = 0x0000u16;
        let new = 0x1234u16; // ~(~0x1234 + ~0 + 0x1234) = ~(0xffff) = 0
        assert_eq!(replace16(c, old, new), 0);
        assert_eq!(replace16_udp(c, old, new), 0xffff);
    }
}
