//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, equation 3).
//!
//! The datapath updates outer IPv4/TCP/UDP checksums with the kernel's `bpf_l3/l4_csum_replace`
//! helpers, which also keep `skb->csum` and pending checksum offload right. It uses this module for
//! the fields inside an ICMP error's payload (the embedded header), where it must compute the new
//! checksums itself. Words are 16-bit values read big-endian from the packet; one's complement
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
