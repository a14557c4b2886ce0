//! Free-port indexes of hot destinations: which NAT ports are probably free towards one remote
//! ip:port once its range is nearly full, so that a new mapping finds one of the last free ports
//! in a few reads instead of walking the range. Layout and rules in [`snat_common::pool::index`];
//! the search itself is in `alloc`, next to the walk it stands in front of.
//!
//! Every claim and release of a port towards an indexed destination updates its byte; all
//! writes are plain byte stores, and every race leaves a hint that is wrong in a safe direction
//! (see the module docs in `snat-common`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_loop};
use snat_common::{
    pool::index::{BLOCK, BLOCKS, PORTS},
    Counter, FlowKeyOf,
};

use crate::{
    family::Family,
    maps::{count, SNAT_FREE_ZERO},
};

/// One hot destination's index.
#[repr(C, align(8))]
pub struct FreePorts {
    /// Per port number: non-zero = probably free.
    pub port: [u8; PORTS],
    /// Per block of `BLOCK` ports: non-zero = probably has a free port.
    pub block: [u8; BLOCKS],
}

/// The destination key of a reply key: the NAT port zeroed.
#[inline(always)]
pub const fn destination<A: Family>(reply: &FlowKeyOf<A>) -> FlowKeyOf<A> {
    FlowKeyOf {
        dst_port: [0; 2],
        ..*reply
    }
}

/// The index of the destination `dest` (see [`destination`]), if it is hot.
#[inline(always)]
pub fn of<A: Family>(dest: &FlowKeyOf<A>) -> Option<*mut FreePorts> {
    A::free_ports().get_ptr_mut(dest)
}

/// Records that `port` was claimed.
#[inline(always)]
pub fn taken(index: *mut FreePorts, port: u16) {
    // SAFETY: `index` points to a live map value; the index is masked into the array.
    unsafe { (*index).port[usize::from(port) & (PORTS - 1)] = 0 };
}

/// Records that the port of `reply` (towards `dest`) was released: its byte, and its block's
/// summary. (The two stores are not ordered for other CPUs; a search that reads them half done
/// sees the port as taken, which only hides it from the index until the walk or the next release
/// finds it.)
#[inline(always)]
pub fn freed<A: Family>(dest: &FlowKeyOf<A>, reply: &FlowKeyOf<A>) {
    if let Some(index) = of(dest) {
        let port = usize::from(u16::from_be_bytes(reply.dst_port));
        // SAFETY: as in `taken`.
        unsafe {
            (*index).port[port & (PORTS - 1)] = 1;
            (*index).block[(port / BLOCK as usize) & (BLOCKS - 1)] = 1;
        }
    }
}

/// State of the build, shared with the `bpf_loop` callback on the stack.
#[repr(C)]
struct Build<A> {
    index: *mut FreePorts,
    reply: FlowKeyOf<A>,
    port_min: u32,
}

/// Marks the `i`-th port of the range free if nothing claims it.
extern "C" fn build_step<A: Family>(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `build` gave it, to a live `Build`.
    let b = unsafe { &mut *ctx.cast::<Build<A>>() };
    let port = (b.port_min + i as u32) as usize & (PORTS - 1);
    b.reply.dst_port = (port as u16).to_be_bytes();
    if A::rev().get_ptr(b.reply).is_none() {
        // SAFETY: as in `taken`.
        unsafe {
            (*b.index).port[port] = 1;
            (*b.index).block[(port / BLOCK as usize) & (BLOCKS - 1)] = 1;
        }
    }
    0
}

/// Creates the index of the destination `key` for the ports `port_min..port_min + len` from the
/// claims in `SNAT_REV` (one pass over the range), or returns the one another CPU created.
#[inline(always)]
pub fn build<A: Family>(key: &FlowKeyOf<A>, port_min: u16, len: u32) -> Option<*mut FreePorts> {
    let key = *key;
    let zero = SNAT_FREE_ZERO.get_ptr(0)?;
    // SAFETY: `zero` points to a live map value of the right type and size.
    let zero = unsafe { &*zero };
    let map = A::free_ports();
    if map.insert(key, zero, u64::from(BPF_NOEXIST)).is_err() {
        return map.get_ptr_mut(key);
    }
    let index = map.get_ptr_mut(key)?;
    let mut b = Build {
        index,
        reply: key,
        port_min: u32::from(port_min),
    };
    // SAFETY: `build_step` has the callback signature `bpf_loop` expects and only touches `b`,
    // which outlives the call.
    unsafe {
        bpf_loop(
            len,
            build_step::<A> as *mut core::ffi::c_void,
            (&raw mut b).cast(),
            0,
        );
    }
    count(Counter::IndexBuilt);
    Some(index)
}
