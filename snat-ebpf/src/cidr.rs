//! The internal and excluded IPv4 networks, checked inline when the agent could write them into
//! read-only globals, and in the LPM tries otherwise (see `snat_common::cidr`).

use core::mem::MaybeUninit;

use aya_ebpf::{
    maps::lpm_trie::{Key, LpmTrie},
    Global,
};
use snat_common::{
    cidr::{contains, Pair, INLINE, IN_TRIE},
    Ipv4Octets,
};

use crate::maps::{SNAT_EXCLUDE, SNAT_INTERNAL};

/// A read-only global array the agent sets at load, read one element at a time (aya's
/// [`Global`] reads the whole value, which would copy it to the stack).
#[repr(transparent)]
pub struct Pairs(MaybeUninit<[Pair; INLINE]>);

impl Pairs {
    const fn new() -> Self {
        Self(MaybeUninit::new([[0; 2]; INLINE]))
    }

    /// Whether `addr` is in one of the first `count` networks (`count` ≤ [`INLINE`]).
    #[inline(always)]
    fn any(&self, count: u32, addr: [u8; 4]) -> bool {
        let mut i = 0;
        while i < INLINE {
            if (i as u32) < count {
                // SAFETY: `i` < INLINE, inside the array; the loader initialised it (or it
                // holds its zero initial value); the volatile read keeps the compiler from
                // folding the initial value, so the verifier sees the loader's.
                let p = unsafe { core::ptr::read_volatile(self.0.as_ptr().cast::<Pair>().add(i)) };
                if contains(p, addr) {
                    return true;
                }
            }
            i += 1;
        }
        false
    }
}

#[unsafe(no_mangle)]
static SNAT_INTERNAL_INLINE: Pairs = Pairs::new();
/// How many of `SNAT_INTERNAL_INLINE` are set; [`IN_TRIE`]: ask `SNAT_INTERNAL` (also what a
/// loader that sets nothing gets).
#[unsafe(no_mangle)]
static SNAT_INTERNAL_INLINE_COUNT: Global<u32> = Global::new(IN_TRIE);
#[unsafe(no_mangle)]
static SNAT_EXCLUDE_INLINE: Pairs = Pairs::new();
#[unsafe(no_mangle)]
static SNAT_EXCLUDE_INLINE_COUNT: Global<u32> = Global::new(IN_TRIE);

/// Whether `addr` is in the list whose inline form is `pairs` and `count`, or, when that is
/// [`IN_TRIE`], in `trie`.
#[inline(always)]
fn check(
    pairs: &Pairs,
    count: &Global<u32>,
    trie: &LpmTrie<Ipv4Octets, u8>,
    addr: [u8; 4],
) -> bool {
    let count = count.load();
    if count == IN_TRIE {
        return trie.get(Key::new(32, addr)).is_some();
    }
    pairs.any(count, addr)
}

/// Whether `addr` is in an internal network.
#[inline(always)]
pub fn internal(addr: [u8; 4]) -> bool {
    check(
        &SNAT_INTERNAL_INLINE,
        &SNAT_INTERNAL_INLINE_COUNT,
        &SNAT_INTERNAL,
        addr,
    )
}

/// Whether `addr` is in an excluded network.
#[inline(always)]
pub fn excluded(addr: [u8; 4]) -> bool {
    check(
        &SNAT_EXCLUDE_INLINE,
        &SNAT_EXCLUDE_INLINE_COUNT,
        &SNAT_EXCLUDE,
        addr,
    )
}
