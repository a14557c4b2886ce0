//! `snat_guard`: what a stopped agent leaves on the uplink's egress (unless `--on-stop open`), so
//! that no packet from an internal CIDR leaves untranslated while no agent runs. It drops, and
//! counts in `SNAT_GUARD_DROPS`, every IPv4 or IPv6 packet whose source is internal and whose
//! destination is not excluded, and every such packet whose header it cannot read (as egress does); the node's
//! own traffic and traffic to excluded destinations pass. The next agent swaps its egress program
//! in atomically and reports the count.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    maps::lpm_trie::Key,
    programs::TcContext,
};

use crate::{
    maps::{SNAT_EXCLUDE, SNAT_EXCLUDE6, SNAT_GUARD_DROPS, SNAT_INTERNAL, SNAT_INTERNAL6},
    packet::{Ipv4, ETH_P_IP_BE},
    packet6::{Ipv6, ETH_P_IPV6_BE},
};

pub fn run(ctx: &TcContext) -> i32 {
    let protocol = ctx.skb.protocol();
    if protocol == ETH_P_IP_BE {
        if let Ok(ip) = Ipv4::read(ctx) {
            if SNAT_INTERNAL.get(Key::new(32, ip.src)).is_none()
                || SNAT_EXCLUDE.get(Key::new(32, ip.dst)).is_some()
            {
                return TC_ACT_UNSPEC;
            }
        }
    } else if protocol == ETH_P_IPV6_BE {
        if let Ok(ip) = Ipv6::fixed(ctx) {
            if SNAT_INTERNAL6.get(Key::new(128, ip.src)).is_none()
                || SNAT_EXCLUDE6.get(Key::new(128, ip.dst)).is_some()
            {
                return TC_ACT_UNSPEC;
            }
        }
    } else {
        return TC_ACT_UNSPEC;
    }
    if let Some(n) = SNAT_GUARD_DROPS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *n += 1 };
    }
    TC_ACT_SHOT
}
