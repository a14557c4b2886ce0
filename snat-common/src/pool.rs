//! Which NAT IP and which ports a new mapping may take.
//!
//! - **Paired pooling** (RFC 4787 REQ-2): an internal address always maps to the same NAT IP of the
//!   live set, chosen by a fixed hash of the address, so a pod keeps one public address for all its
//!   flows while the set is unchanged.
//! - **Port order**: first the pod's own source port (or echo identifier) when it lies inside the
//!   range (port preservation: the pod's kernel already randomised it, RFC 6056), then
//!   [`RANDOM_TRIES`] random ports, then every port of the range once, walking up from a random
//!   start. The walk is what makes allocation exhaustive: it never reports exhaustion while a port
//!   of the range is free for the destination.

use crate::NatIp;

/// Random ports tried before the exhaustive walk of the range.
pub const RANDOM_TRIES: u32 = 8;

/// Index of the NAT IP (among `count`, which must be > 0) that `internal` is paired with.
#[inline(always)]
pub const fn nat_index(internal: [u8; 4], count: u32) -> u32 {
    // murmur3's finaliser mixes every address bit into every hash bit; the multiply-shift maps
    // the hash onto 0..count without a division.
    let mut h = u32::from_be_bytes(internal);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    ((h as u64 * count as u64) >> 32) as u32
}

/// The pod's own port when it may be kept as the NAT port.
#[inline(always)]
pub const fn preserved(nat: &NatIp, port: u16) -> Option<u16> {
    if port >= nat.port_min && port <= nat.port_max {
        Some(port)
    } else {
        None
    }
}

/// The port at `offset` (any `u32`, reduced modulo the range) of `nat`'s range.
#[inline(always)]
pub const fn port_at(nat: &NatIp, offset: u32) -> u16 {
    let len = nat.range_len();
    (nat.port_min as u32 + offset % len) as u16
}

/// Step `i` (`0..range_len`) of the exhaustive walk starting at offset `start`.
#[inline(always)]
pub const fn walk(nat: &NatIp, start: u32, i: u32) -> u16 {
    port_at(nat, start.wrapping_rem(nat.range_len()) + i)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::HashSet;
    use std::vec::Vec;

    use super::*;

    fn nat(min: u16, max: u16) -> NatIp {
        NatIp {
            addr: [198, 51, 100, 1],
            port_min: min,
            port_max: max,
            ..NatIp::default()
        }
    }

    #[test]
    fn walk_visits_every_port_once() {
        for (min, max) in [(32768, 65535), (1, 65535), (1000, 1009), (5000, 5000)] {
            let n = nat(min, max);
            for start in [0u32, 1, 7, u32::MAX, 123_456] {
                let seen: HashSet<u16> = (0..n.range_len()).map(|i| walk(&n, start, i)).collect();
                assert_eq!(seen.len() as u32, n.range_len(), "{min}-{max} from {start}");
                assert!(seen.iter().all(|p| (min..=max).contains(p)));
            }
        }
    }

    #[test]
    fn walk_finds_the_last_free_port() {
        let n = nat(1000, 1009);
        for free in 1000..=1009u16 {
            for start in 0..10 {
                let found: Vec<u16> = (0..n.range_len())
                    .map(|i| walk(&n, start, i))
                    .filter(|p| *p == free)
                    .collect();
                assert_eq!(found, [free]);
            }
        }
    }

    #[test]
    fn preserved_only_inside_the_range() {
        let n = nat(32768, 65535);
        assert_eq!(preserved(&n, 40000), Some(40000));
        assert_eq!(preserved(&n, 32768), Some(32768));
        assert_eq!(preserved(&n, 32767), None);
        assert_eq!(preserved(&n, 0), None);
    }

    #[test]
    fn port_at_stays_in_range_for_any_offset() {
        let n = nat(30000, 30002);
        for off in [0, 1, 2, 3, u32::MAX, u32::MAX - 1] {
            assert!((30000..=30002).contains(&port_at(&n, off)));
        }
    }

    #[test]
    fn nat_index_is_stable_and_spread() {
        const MAX: u32 = 8;
        assert_eq!(nat_index([10, 0, 0, 1], 1), 0);
        assert_eq!(nat_index([10, 0, 0, 7], 4), nat_index([10, 0, 0, 7], 4));
        for count in 1..=MAX {
            let mut hits = [0u32; MAX as usize];
            for i in 0..=255u8 {
                for j in [0u8, 1, 2, 3] {
                    hits[nat_index([10, 1, i, 2 + j], count) as usize] += 1;
                }
            }
            let fair = 1024 / count;
            assert!(
                hits[..count as usize].iter().all(|h| *h > fair / 2),
                "{count}: {hits:?}"
            );
            assert!(
                hits[count as usize..].iter().all(|h| *h == 0),
                "{count}: {hits:?}"
            );
        }
    }
}
