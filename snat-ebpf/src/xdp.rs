//! `snat_xdp` (`snat run --ingress xdp`): the reply path in XDP, on the uplink before TC. It runs
//! the ingress translation (`ingress`, the same code as `snat_ingress`) on the frame in place and
//! tells `snat_ingress`, which stays attached behind it, what it decided, in 4 bytes of XDP
//! metadata in front of the frame:
//!
//! - [`XDP_DONE`]: decided here (translated, passed as not ours, or counted as unparsed): TC
//!   leaves the packet alone, so every packet still has exactly one ingress result;
//! - anything else (0, or no metadata at all): TC decides, exactly as without XDP. That is the
//!   case of a reply whose checksum may be pending offload (`Counter::XdpDeferred`: XDP cannot
//!   update such a field, the TC helpers can), and of a driver that gives no room for metadata
//!   (`Counter::XdpNoMetadata`: then XDP does nothing at all).
//!
//! Dropped packets (a mapping being released, cluster-mode fences) are dropped here. Nothing is
//! redirected or sent back from XDP: the reply path never answers.
//!
//! Failing safe: if the XDP program is gone, TC translates everything; a mark is only written
//! after XDP has finished with the frame.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};
use snat_common::{Counter, XDP_DONE};

use crate::{ingress, maps::count};

/// Bytes of metadata `snat_xdp` puts in front of a frame.
const META_LEN: usize = 4;

pub fn run(ctx: &XdpContext) -> u32 {
    // Room for the mark first: before any packet pointer is taken, since it moves `data_meta`.
    // SAFETY: the helper only moves the metadata start of this program's own frame.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(META_LEN as i32)) } != 0 {
        count(Counter::XdpNoMetadata);
        return XDP_PASS;
    }
    // IPv6 is translated on TC only: with NAT66 on, leave it to `snat_ingress`, unmarked.
    if crate::packet::read::<[u8; 2]>(ctx, 12) == Ok([0x86, 0xdd]) && crate::family::ipv6_on() {
        count(Counter::XdpDeferred);
        return XDP_PASS;
    }
    let (result, mark) = match ingress::run(ctx) {
        Ok(Counter::XdpDeferred) => (Counter::XdpDeferred, 0),
        Ok(c) => (c, XDP_DONE),
        Err(stop) => {
            count(stop.counter);
            return XDP_DROP;
        }
    };
    count(result);
    let meta = ctx.metadata();
    if meta + META_LEN <= ctx.data() {
        // SAFETY: the 4 metadata bytes lie between `data_meta` and `data` (checked above).
        unsafe { core::ptr::write_unaligned(meta as *mut u32, mark) };
    }
    XDP_PASS
}

/// Whether `snat_xdp` decided this packet already (its mark is in the skb's metadata).
#[inline(always)]
pub fn decided(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the program's own `__sk_buff`.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + META_LEN > ctx.data() {
        return false;
    }
    // SAFETY: the 4 metadata bytes lie between `data_meta` and `data` (checked above).
    unsafe { core::ptr::read_unaligned(meta as *const u32) == XDP_DONE }
}
