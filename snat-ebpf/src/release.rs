//! `snat_release`: removes the mappings the controller found expired, in the kernel, so that a
//! removal and the use counts it changes are atomic with respect to the datapath. Never
//! attached: the controller runs it with `BPF_PROG_TEST_RUN` on a batch of [`ReleaseEntry`]s
//! (layout in `snat_common::flow::release_batch`) and reads each entry's result back.
//!
//! A mapping is removed only if neither half was refreshed since the controller looked (its
//! `last_seen_ns` stamps are unchanged), checked again after the release is announced in both
//! halves so that no packet refreshes it unseen between the check and the delete (`mapping`);
//! forward half first, then the port claim if it still belongs to this mapping, then its use
//! counts.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_loop, programs::TcContext};
use snat_common::{
    flow::{release_batch, release_result},
    ReleaseEntryOf, UseKeyOf,
};

use crate::{
    alloc::port_freed,
    family::Family,
    mapping,
    maps::{atomic_add32, use_sub},
};

#[repr(C)]
struct Batch {
    skb: *mut __sk_buff,
}

/// Runs a batch of [`ReleaseEntryOf<A>`]: `snat_release` for IPv4, `snat_release6` for IPv6.
pub fn run<A: Family>(ctx: &TcContext) -> i32 {
    let Ok(n) = ctx.load::<u32>(release_batch::COUNT_OFFSET) else {
        return 0;
    };
    let mut batch = Batch { skb: ctx.skb.skb };
    // SAFETY: `release_one` has the callback signature `bpf_loop` expects and only reads `batch`.
    unsafe {
        bpf_loop(
            n.min(release_batch::MAX_ENTRIES),
            release_one::<A> as *mut core::ffi::c_void,
            (&raw mut batch).cast(),
            0,
        );
    }
    0
}

extern "C" fn release_one<A: Family>(i: u64, data: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `run` gave it, to a live `Batch`.
    let batch = unsafe { &*data.cast::<Batch>() };
    let ctx = TcContext::new(batch.skb);
    let off = release_batch::ENTRIES_OFFSET + i as usize * size_of::<ReleaseEntryOf<A>>();
    let Ok(entry) = ctx.load::<ReleaseEntryOf<A>>(off) else {
        return 1;
    };
    let result = release(&entry);
    let _ = ctx.store(
        off + core::mem::offset_of!(ReleaseEntryOf<A>, result),
        &result,
        0,
    );
    0
}

#[inline(always)]
fn release<A: Family>(e: &ReleaseEntryOf<A>) -> u32 {
    let Some((fp, m)) = mapping::forward(&e.key) else {
        return release_result::GONE;
    };
    if m.last_seen_ns != e.fwd_seen_ns {
        return release_result::REFRESHED;
    }
    let reply = e.key.reply(m.nat_addr, m.nat_port);
    let owned = mapping::reverse(&reply)
        .filter(|(_, o)| o.addr == e.key.src_addr && o.port == e.key.src_port);
    if owned.is_some_and(|(_, o)| o.last_seen_ns != e.rev_seen_ns) {
        return release_result::REFRESHED;
    }
    // Announce the release, then look again: a packet that refreshed either half meanwhile is
    // seen here, or sees the announcement and drops itself (see `mapping`).
    let rp = owned.map(|(rp, _)| rp);
    // SAFETY: `fp` and `rp` point to this mapping's live halves (checked above).
    let refreshed = unsafe {
        atomic_add32(&raw mut (*fp).release, 1);
        if let Some(rp) = rp {
            atomic_add32(&raw mut (*rp).release, 1);
        }
        core::ptr::read_volatile(&raw const (*fp).last_seen_ns) != e.fwd_seen_ns
            || rp.is_some_and(|rp| {
                core::ptr::read_volatile(&raw const (*rp).last_seen_ns) != e.rev_seen_ns
            })
    };
    if refreshed {
        // SAFETY: as above; the announcement is withdrawn.
        unsafe {
            atomic_add32(&raw mut (*fp).release, u32::MAX);
            if let Some(rp) = rp {
                atomic_add32(&raw mut (*rp).release, u32::MAX);
            }
        }
        return release_result::REFRESHED;
    }
    if A::fwd().remove(e.key).is_err() {
        return release_result::GONE;
    }
    if owned.is_some() {
        let _ = A::rev().remove(reply);
        port_freed(&reply);
    }
    use_sub(&UseKeyOf::of_mapping(&e.key, m.nat_addr));
    release_result::RELEASED
}
