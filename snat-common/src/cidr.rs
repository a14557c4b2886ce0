//! The internal and excluded networks, checked inline.
//!
//! Every IPv4 packet on the uplink asks two questions before anything else: is its source
//! internal, is its destination excluded. The LPM tries (`SNAT_INTERNAL`, `SNAT_EXCLUDE`) answer
//! any number of networks, but each lookup is a call into the kernel; on this project's machines
//! (AMD, the "safe RET" mitigation for SRSO) the two cost about 60 ns of an established packet's
//! ~300 (docs/benchmarks.md, issue 15's ablation). A node has a handful of these networks, and they
//! are fixed for the life of the programs, so the agent also writes them into read-only globals
//! as (network, mask) pairs: the verifier knows their values, so a check is a few AND/compare
//! instructions per network and the unused slots are dead code it removes. Lists longer than
//! [`INLINE`] (after dropping networks inside others) stay with the tries ([`IN_TRIE`]).

/// Most networks per list checked inline.
pub const INLINE: usize = 8;
/// The count that sends a list's checks to its LPM trie.
pub const IN_TRIE: u32 = u32::MAX;

/// Names of the programs' read-only globals: the pairs of each list and how many are set.
pub const GLOBAL_INTERNAL: &str = "SNAT_INTERNAL_INLINE";
pub const GLOBAL_INTERNAL_COUNT: &str = "SNAT_INTERNAL_INLINE_COUNT";
pub const GLOBAL_EXCLUDE: &str = "SNAT_EXCLUDE_INLINE";
pub const GLOBAL_EXCLUDE_COUNT: &str = "SNAT_EXCLUDE_INLINE_COUNT";

/// One IPv4 network as the datapath checks it: `[network, mask]`, each the four address bytes
/// read as a native-endian word (the programs run on the host's byte order).
pub type Pair = [u32; 2];

/// Whether `addr` is in the network `pair`.
#[inline(always)]
pub const fn contains(pair: Pair, addr: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & pair[1] == pair[0]
}

/// The pair of the network `addr`/`len` (host bits dropped; `len` above 32 counts as 32).
#[must_use]
pub const fn pair(addr: [u8; 4], len: u8) -> Pair {
    let mask = match len {
        0 => 0,
        l if l >= 32 => u32::MAX,
        l => u32::MAX << (32 - l),
    };
    let mask = u32::from_ne_bytes(mask.to_be_bytes());
    [u32::from_ne_bytes(addr) & mask, mask]
}

/// A list of networks as the agent writes it into the globals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inline {
    pub pairs: [Pair; INLINE],
    /// How many of `pairs` are set, or [`IN_TRIE`].
    pub count: u32,
}

impl Inline {
    /// The inline form of `nets` (`(address, prefix length)`): each network that is not inside
    /// another of the list, or [`IN_TRIE`] when more than [`INLINE`] remain.
    #[must_use]
    pub fn of(nets: &[([u8; 4], u8)]) -> Self {
        let mut pairs = [[0; 2]; INLINE];
        let mut count = 0;
        for (i, &(addr, len)) in nets.iter().enumerate() {
            let p = pair(addr, len);
            // Inside another network of the list (for equal networks: the first one stays).
            let covered = nets.iter().enumerate().any(|(j, &(a, l))| {
                j != i && (l < len || l == len && j < i) && contains(pair(a, l), addr)
            });
            if covered {
                continue;
            }
            if count == INLINE {
                return Self {
                    pairs: [[0; 2]; INLINE],
                    count: IN_TRIE,
                };
            }
            pairs[count] = p;
            count += 1;
        }
        Self {
            pairs,
            count: count as u32,
        }
    }

    /// Whether `addr` is in one of the networks (`None`: the list is in the trie).
    #[must_use]
    pub fn matches(&self, addr: [u8; 4]) -> Option<bool> {
        if self.count == IN_TRIE {
            return None;
        }
        Some(
            self.pairs
                .iter()
                .take(self.count as usize)
                .any(|&p| contains(p, addr)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an LPM trie holding `nets` answers for `addr`.
    fn in_any(nets: &[([u8; 4], u8)], addr: [u8; 4]) -> bool {
        nets.iter().any(|&(a, l)| {
            let bits = |x: [u8; 4]| {
                u32::from_be_bytes(x)
                    .checked_shr(32 - u32::from(l))
                    .unwrap_or(0)
            };
            l == 0 || bits(a) == bits(addr)
        })
    }

    #[test]
    fn a_network_holds_exactly_its_addresses() {
        let p = pair([10, 1, 0, 0], 16);
        assert!(contains(p, [10, 1, 0, 0]));
        assert!(contains(p, [10, 1, 255, 255]));
        assert!(!contains(p, [10, 2, 0, 0]));
        assert!(!contains(p, [11, 1, 0, 1]));
        // Host bits in the configured address do not matter.
        assert_eq!(pair([10, 1, 2, 3], 16), p);
        assert!(contains(pair([0, 0, 0, 0], 0), [203, 0, 113, 9]));
        let host = pair([198, 51, 100, 7], 32);
        assert!(contains(host, [198, 51, 100, 7]));
        assert!(!contains(host, [198, 51, 100, 6]));
        assert!(contains(pair([100, 64, 0, 0], 10), [100, 127, 255, 255]));
        assert!(!contains(pair([100, 64, 0, 0], 10), [100, 128, 0, 0]));
    }

    #[test]
    fn networks_inside_others_take_no_slot() {
        let nets = [
            ([10, 1, 0, 0], 16),
            ([10, 1, 7, 0], 24),
            ([10, 0, 0, 0], 8),
            ([10, 0, 0, 0], 8),
            ([203, 0, 113, 0], 24),
        ];
        let i = Inline::of(&nets);
        assert_eq!(i.count, 2);
        assert_eq!(
            &i.pairs[..2],
            &[pair([10, 0, 0, 0], 8), pair([203, 0, 113, 0], 24)]
        );
    }

    #[test]
    fn too_many_networks_stay_in_the_trie() {
        let nets: Vec<([u8; 4], u8)> = (0..=INLINE as u8).map(|i| ([10, i, 0, 0], 16)).collect();
        assert_eq!(Inline::of(&nets).count, IN_TRIE);
        assert_eq!(Inline::of(&nets).matches([10, 0, 0, 1]), None);
        assert_eq!(Inline::of(&nets[..INLINE]).count, INLINE as u32);
        // Nine networks of which two nest fit.
        let mut nested = nets.clone();
        nested[INLINE] = ([10, 0, 9, 0], 24);
        assert_eq!(Inline::of(&nested).count, INLINE as u32);
        assert_eq!(Inline::of(&[]).count, 0);
        assert_eq!(Inline::of(&[]).matches([10, 0, 0, 1]), Some(false));
    }

    #[test]
    fn inline_answers_what_the_trie_answers() {
        // A small deterministic generator: lists of 0–8 networks of all lengths around a few
        // bases, and addresses near them.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let bases = [
            [10, 0, 0, 0],
            [10, 1, 0, 0],
            [100, 64, 0, 0],
            [203, 0, 113, 0],
        ];
        for _ in 0..2000 {
            let n = (next() % 9) as usize;
            let nets: Vec<([u8; 4], u8)> = (0..n)
                .map(|_| {
                    let mut a = bases[(next() % 4) as usize];
                    a[2] ^= (next() % 4) as u8;
                    (a, (next() % 33) as u8)
                })
                .collect();
            let inline = Inline::of(&nets);
            for _ in 0..20 {
                let mut a = bases[(next() % 4) as usize];
                a[1] ^= (next() % 2) as u8;
                a[2] ^= (next() % 8) as u8;
                a[3] = next() as u8;
                assert_eq!(inline.matches(a), Some(in_any(&nets, a)), "{nets:?} {a:?}");
            }
        }
    }
}
