//! Which NAT IP and which ports a new mapping may take.
//!
//! - **Paired pooling** (RFC 4787 REQ-2): an internal address always maps to the same NAT IP of the
//!   live set, chosen by a fixed hash of the address, so a pod keeps one public address for all its
//!   flows while the set is unchanged.
//! - **Port order**: first the NAT port the internal endpoint already has towards another
//!   destination (endpoint-independent mapping, RFC 4787 REQ-1), then the pod's own source port
//!   (or echo identifier) when it lies inside the range (port preservation: the pod's kernel
//!   already randomised it, RFC 6056), then [`RANDOM_TRIES`] random ports, then the destination's
//!   free-port index if it has one ([`index`]; the random tries are skipped while the destination
//!   is [hot](index::is_hot) and indexed), then every port of the range once, walking up from a
//!   random start. The walk is what makes allocation exhaustive: it never reports exhaustion while
//!   a port of the range is free for the destination, whatever the index says.

use crate::flow::NatIpOf;

/// Random ports tried after the preferred ones, unless the destination is hot and indexed.
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
pub const fn preserved<A>(nat: &NatIpOf<A>, port: u16) -> Option<u16> {
    if port >= nat.port_min && port <= nat.port_max {
        Some(port)
    } else {
        None
    }
}

/// The port at `offset` (any `u32`, reduced modulo the range) of `nat`'s range.
#[inline(always)]
pub const fn port_at<A>(nat: &NatIpOf<A>, offset: u32) -> u16 {
    let len = nat.range_len();
    (nat.port_min as u32 + offset % len) as u16
}

/// Step `i` (`0..range_len`) of the exhaustive walk starting at offset `start`.
#[inline(always)]
pub const fn walk<A>(nat: &NatIpOf<A>, start: u32, i: u32) -> u16 {
    port_at(nat, start.wrapping_rem(nat.range_len()) + i)
}

/// The free-port index of a hot destination (`SNAT_FREE_PORTS`, one per (NAT IP, remote
/// ip:port, protocol) whose range is nearly full): one byte per port (non-zero = probably free)
/// and one summary byte per block of [`index::BLOCK`] ports (non-zero = the block probably has a
/// free byte). Indices are absolute port numbers, so a range change cannot shift them.
///
/// Bytes, not bits: a program writes one byte with a plain store, so two CPUs updating
/// neighbouring ports never lose each other's update (eBPF v1 has no atomic bit operations).
/// The index is a hint: the claim in `SNAT_REV` stays the only authority, a stale "free" byte
/// costs one failed claim (and is cleared), and a stale "taken" byte hides a free port only from
/// the index, never from the exhaustive walk behind it. Races only ever leave hints of these two
/// kinds: stores from different CPUs are not ordered, and a search that clears a block it found
/// empty can overwrite a release marking the same block at that moment (the port then stays
/// hidden from the index until another port of its block is released).
pub mod index {
    /// Ports per summary byte.
    pub const BLOCK: u32 = 64;
    /// Summary bytes read at once (one `u64`).
    pub const BLOCKS_PER_WORD: u32 = 8;
    /// Ports one summary word stands for.
    pub const WORD_PORTS: u32 = BLOCK * BLOCKS_PER_WORD;
    /// Per-port bytes (every port number).
    pub const PORTS: usize = 1 << 16;
    /// Summary bytes.
    pub const BLOCKS: usize = PORTS / BLOCK as usize;
    /// Summary words.
    pub const WORDS: u32 = BLOCKS as u32 / BLOCKS_PER_WORD;
    /// Size of one index (`SNAT_FREE_PORTS` value): the port bytes, then the summary bytes.
    pub const LEN: usize = PORTS + BLOCKS;

    /// A destination is hot once 7/8 of the range is claimed towards it: from there, random
    /// tries fail often enough that the index pays for itself.
    #[inline(always)]
    pub const fn is_hot(used: u64, range_len: u32) -> bool {
        used * 8 >= range_len as u64 * 7
    }

    /// The summary words `(first, count)` that cover the ports `min..=max`.
    #[inline(always)]
    pub const fn words(min: u16, max: u16) -> (u32, u32) {
        let first = min as u32 / WORD_PORTS;
        (first, max as u32 / WORD_PORTS - first + 1)
    }

    /// `0x80` in every byte of `word` that is non-zero, 0 elsewhere. Branch-free, like the two
    /// below: the verifier explores every branch of the search separately.
    #[inline(always)]
    pub const fn marked_bytes(word: u64) -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        // Adding 0x7f to a byte's low 7 bits carries into its top bit iff they are non-zero,
        // and never into the next byte.
        ((word & LOW7).wrapping_add(LOW7) | word) & !LOW7
    }

    /// Index (0..8) of the lowest byte of `marked` (from [`marked_bytes`]) that is marked, in
    /// memory order on a little-endian machine (eBPF and x86 alike); 0 when none is.
    #[inline(always)]
    pub const fn lowest_marked(marked: u64) -> u32 {
        // The lowest mark is bit 8k + 7; shifted down it is 1 << 8k, and multiplying by the
        // bytes 7, 6, …, 0 (low to high) moves byte 7 - k of them, which holds k, to the top.
        let low = (marked & marked.wrapping_neg()) >> 7;
        (low.wrapping_mul(0x0001_0203_0405_0607) >> 56) as u32 & 7
    }

    /// `1 << (8 * k + 7)` if `word` is non-zero, else 0: one mark per word, to find the first
    /// non-zero of several words with [`lowest_marked`].
    #[inline(always)]
    pub const fn mark_if_nonzero(word: u64, k: u32) -> u64 {
        ((word | word.wrapping_neg()) >> 63) << (8 * (k & 7) + 7)
    }

    /// Index (0..8) of the first non-zero byte of `word` in memory order, if any.
    #[inline(always)]
    pub const fn first_set_byte(word: u64) -> Option<u32> {
        match marked_bytes(word) {
            0 => None,
            m => Some(lowest_marked(m)),
        }
    }

    /// How many hot destinations the index map should hold for `max_mappings` mappings over a
    /// range of `range_len` ports: every destination that can be hot at once, plus headroom,
    /// at most `cap` (each entry takes about 65 KiB).
    pub const fn capacity(max_mappings: u32, range_len: u32, cap: u32) -> u32 {
        let hot_min = range_len as u64 * 7 / 8;
        let n = match (max_mappings as u64).checked_div(hot_min) {
            Some(q) => q + 8,
            None => cap as u64,
        };
        if n > cap as u64 {
            cap
        } else {
            n as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::NatIp;
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
    fn index_words_cover_the_range() {
        use index::{words, WORDS, WORD_PORTS};
        for (min, max) in [
            (32768u16, 65535u16),
            (1, 65535),
            (1000, 1009),
            (511, 512),
            (0, 0),
        ] {
            let (first, count) = words(min, max);
            assert!(first * WORD_PORTS <= u32::from(min));
            assert!((first + count) * WORD_PORTS > u32::from(max));
            assert!(first + count <= WORDS, "{min}-{max}");
        }
        assert_eq!(words(32768, 65535), (64, 64));
    }

    #[test]
    fn first_set_byte_in_memory_order() {
        use index::first_set_byte;
        assert_eq!(first_set_byte(0), None);
        for i in 0..8u32 {
            let mut bytes = [0u8; 8];
            bytes[i as usize] = 1;
            bytes[7] |= 0x80;
            assert_eq!(first_set_byte(u64::from_le_bytes(bytes)), Some(i));
        }
        for x in [1u64, 0x80, 0xff, 0x7f00, 0x0100_0000_0000_0000, u64::MAX] {
            let want = x.trailing_zeros() / 8;
            assert_eq!(first_set_byte(x), Some(want), "{x:#x}");
        }
    }

    #[test]
    fn marks_find_the_first_nonzero_word() {
        use index::{lowest_marked, mark_if_nonzero};
        for first in 0..8u32 {
            let words: [u64; 8] =
                core::array::from_fn(|k| if k as u32 >= first { 1 << (k * 7) } else { 0 });
            let marks = (0..8).fold(0, |m, k| m | mark_if_nonzero(words[k as usize], k));
            assert_eq!(lowest_marked(marks), first);
        }
        assert_eq!(mark_if_nonzero(0, 3), 0);
        // Every non-zero byte is marked, not only the lowest: the search takes them in turn,
        // clearing each mark it has tried.
        let mut marked = index::marked_bytes(0x0001_0000_8000_0100);
        assert_eq!(marked, 0x0080_0000_8000_8000);
        let mut order = Vec::new();
        while marked != 0 {
            let j = lowest_marked(marked);
            order.push(j);
            marked &= !(0x80 << (8 * j));
        }
        assert_eq!(order, [1, 3, 6]);
        assert_eq!(mark_if_nonzero(1 << 63, 0), 0x80);
    }

    #[test]
    fn hot_at_seven_eighths() {
        assert!(!index::is_hot(28671, 32768));
        assert!(index::is_hot(28672, 32768));
        assert!(index::is_hot(1, 1));
        assert!(!index::is_hot(0, 1));
    }

    #[test]
    fn index_capacity_grows_with_the_table_and_stops_at_the_cap() {
        assert_eq!(
            index::capacity(1_000_000, 32768, 256),
            1_000_000 / 28672 + 8
        );
        assert_eq!(index::capacity(1_000_000, 1000, 256), 256);
        assert_eq!(index::capacity(1000, 32768, 256), 8);
        assert_eq!(index::capacity(1000, 0, 256), 256);
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
