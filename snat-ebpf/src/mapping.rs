//! Reading and refreshing the two halves of a mapping, safely against the kernel recycling map
//! elements and against the release program.
//!
//! Invariants:
//! - **Copy, then check identity.** `SNAT_FWD` and `SNAT_REV` are preallocated hash maps: an
//!   element deleted on one CPU goes to the next insert at once, even while another CPU still
//!   holds a pointer from its lookup. So the fields a program needs are copied out right after
//!   the lookup ([`Forward`], [`Reverse`]), and used only if the key stored inside the value
//!   (`Mapping::key`, `Origin::key`), read after them, is the key looked up; otherwise the
//!   element now belongs to another flow and the lookup counts as a miss
//!   (`alloc.recycled_entry`). The kernel fills a recycled element's value from its start, where
//!   that key is, so a key still ours when read last means the fields read before it were ours
//!   too (stores and loads stay in order on x86-64). Later writes through the pointer are small stores of this flow's
//!   own stamps; an element recycled in the few instructions between the check and such a store
//!   gets at most a timestamp or an epoch stamp the new owner's phase computation ignores unless
//!   its epoch happens to be equal.
//! - **No release races a refresh.** A packet that refreshes a half stores its time, then adds to
//!   its CPU's word of `SNAT_FENCE` atomically, then reads `release`; the release program bumps
//!   `release` atomically, then re-reads the time stamps. The atomic adds are `lock`ed
//!   instructions on x86-64, full barriers wherever they point, so each side's load is ordered
//!   after its own store: at least one of them sees the other. The packet
//!   of a mapping being released is dropped (`drop_released`), exactly as if it had come a moment
//!   later; a release that sees a refresh keeps the mapping. (On architectures whose JIT emits
//!   relaxed atomics for BPF_XADD — arm64 — this ordering is not guaranteed.)

use snat_common::{FlowKeyOf, MappingOf, OriginOf};

use crate::{
    family::Family,
    maps::{atomic_add32, SNAT_FENCE},
};

pub use snat_common::flow::REFRESH_NS;

/// What the datapath reads of a forward half, copied out of the map once.
#[derive(Clone, Copy)]
pub struct Forward<A> {
    pub nat_addr: A,
    pub nat_port: [u8; 2],
    pub epoch: u16,
    pub syn: u16,
    pub fin: u16,
    pub rst: u16,
    pub acked: u16,
    pub ack: [u8; 4],
    pub window: [u8; 2],
    pub wscale: u8,
    pub isn_next: [u8; 4],
    pub last_seen_ns: u64,
    /// The epoch of its block's claim (cluster mode; 0 otherwise, and not read).
    pub block_epoch: u32,
}

impl<A> Forward<A> {
    /// The `SEEN_*` flags the pod sent in the current epoch.
    #[inline(always)]
    pub const fn tcp_seen(&self) -> u8 {
        snat_common::tcp::seen_in(self.epoch, self.syn, self.fin, self.rst)
    }
}

/// What the datapath reads of a reverse half, copied out of the map once.
#[derive(Clone, Copy)]
pub struct Reverse<A> {
    pub addr: A,
    pub port: [u8; 2],
    pub syn: u16,
    pub fin: u16,
    pub rst: u16,
    pub last_seen_ns: u64,
}

impl<A> Reverse<A> {
    /// The `SEEN_*` flags the remote sent in `epoch`.
    #[inline(always)]
    pub const fn tcp_seen(&self, epoch: u16) -> u8 {
        snat_common::tcp::seen_in(epoch, self.syn, self.fin, self.rst)
    }
}

/// Reads field `$f` of the map value at `$p` exactly once; a byte-array field `as` the integer
/// type of its size (one load instead of one per byte: the fields are aligned in the value).
macro_rules! field {
    ($p:expr, $f:ident) => {
        // SAFETY: `$p` points to a live (possibly recycled) value of `SNAT_FWD` or `SNAT_REV`
        // (callers' contract); a volatile read makes the copy happen here, once.
        unsafe { core::ptr::read_volatile(&raw const (*$p).$f) }
    };
    ($p:expr, $f:ident as $t:ty) => {
        <$t>::to_ne_bytes(
            // SAFETY: as above; the field is a byte array of `$t`'s size, aligned to it (see
            // the `const` offsets in `snat_common::flow`).
            unsafe { core::ptr::read_volatile((&raw const (*$p).$f).cast::<$t>()) },
        )
    };
}

/// The forward half of `key`: a pointer for the refreshing stores, and the checked copy.
#[inline(always)]
pub fn forward<A: Family>(key: &FlowKeyOf<A>) -> Option<(*mut MappingOf<A>, Forward<A>)> {
    let p = A::fwd().get_ptr_mut(key)?;
    let m = Forward {
        // SAFETY: `p` points to a live (possibly recycled) value; the field is aligned (see
        // `snat_common::flow`).
        nat_addr: unsafe { A::load(&raw const (*p).nat_addr) },
        nat_port: field!(p, nat_port as u16),
        epoch: field!(p, epoch),
        syn: field!(p, syn),
        fin: field!(p, fin),
        rst: field!(p, rst),
        acked: field!(p, acked),
        ack: field!(p, ack as u32),
        window: field!(p, window as u16),
        wscale: field!(p, wscale),
        isn_next: field!(p, isn_next as u32),
        last_seen_ns: field!(p, last_seen_ns),
        // Outside cluster mode the verifier removes the read (see `crate::block`).
        block_epoch: if crate::block::layout().is_some() {
            field!(p, block_epoch)
        } else {
            0
        },
    };
    // SAFETY: as above; the key is the value's first field, 8-aligned.
    unsafe { A::owned_by(&raw const (*p).key, key) }.then_some((p, m))
}

/// The NAT endpoint of `key`'s forward half, and nothing else of it (see [`forward`]): for the
/// paths that only translate (ICMP errors, a lost creation race), without the copy of every
/// field.
#[inline(always)]
pub fn forward_nat<A: Family>(key: &FlowKeyOf<A>) -> Option<(A, [u8; 2])> {
    let p = A::fwd().get_ptr_mut(key)?;
    // SAFETY: as in `forward`.
    let nat = (
        unsafe { A::load(&raw const (*p).nat_addr) },
        field!(p, nat_port as u16),
    );
    // SAFETY: as in `forward`.
    unsafe { A::owned_by(&raw const (*p).key, key) }.then_some(nat)
}

/// The reverse half of `key` (see [`forward`]).
#[inline(always)]
pub fn reverse<A: Family>(key: &FlowKeyOf<A>) -> Option<(*mut OriginOf<A>, Reverse<A>)> {
    let p = A::rev().get_ptr_mut(key)?;
    let o = Reverse {
        // SAFETY: as in `forward`.
        addr: unsafe { A::load(&raw const (*p).addr) },
        port: field!(p, port as u16),
        syn: field!(p, syn),
        fin: field!(p, fin),
        rst: field!(p, rst),
        last_seen_ns: field!(p, last_seen_ns),
    };
    // SAFETY: as in `forward`.
    unsafe { A::owned_by(&raw const (*p).key, key) }.then_some((p, o))
}

/// Records a packet at `now` in a half whose copy says it was last seen at `seen`, whose stamp is
/// at `stamp` and whose handshake field is `release`. `Err` when the release program is removing
/// the mapping at this moment (see the module docs).
///
/// # Safety
/// Both pointers point into one live value of `SNAT_FWD` or `SNAT_REV`.
#[inline(always)]
unsafe fn refresh(seen: u64, now: u64, stamp: *mut u64, release: *const u32) -> Result<(), ()> {
    // Signed: a stamp from a CPU whose clock reading is a tick newer (see `crate::clock`) is
    // recent, and is not moved back.
    if (now as i64).wrapping_sub(seen as i64) <= REFRESH_NS as i64 {
        return Ok(());
    }
    // SAFETY: per the caller's contract.
    unsafe { core::ptr::write_volatile(stamp, now) };
    // Index 0 of a one-entry array always exists; without the barrier the packet could not
    // know it was seen, so it would count as racing a release.
    let Some(fence) = SNAT_FENCE.get_ptr_mut(0) else {
        return Err(());
    };
    atomic_add32(fence, 1);
    // SAFETY: as above; read after the locked add, which orders it after the store.
    if unsafe { core::ptr::read_volatile(release) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Refreshes the forward half `p` (copy `m`) at `now`; `Err` while it is being released.
#[inline(always)]
pub fn refresh_forward<A: Family>(
    p: *mut MappingOf<A>,
    m: &Forward<A>,
    now: u64,
) -> Result<(), ()> {
    // SAFETY: `p` comes from `forward`; the fields are of that one value.
    unsafe {
        refresh(
            m.last_seen_ns,
            now,
            &raw mut (*p).last_seen_ns,
            &raw const (*p).release,
        )
    }
}

/// Refreshes the reverse half `p` (copy `o`) at `now`; `Err` while it is being released.
#[inline(always)]
pub fn refresh_reverse<A: Family>(p: *mut OriginOf<A>, o: &Reverse<A>, now: u64) -> Result<(), ()> {
    // SAFETY: `p` comes from `reverse`; the fields are of that one value.
    unsafe {
        refresh(
            o.last_seen_ns,
            now,
            &raw mut (*p).last_seen_ns,
            &raw const (*p).release,
        )
    }
}
