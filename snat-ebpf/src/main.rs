//! snat's kernel side: TC programs on the node's uplink.
//!
//! - `snat_egress` translates the source of packets from internal CIDRs to a NAT ip:port;
//! - `snat_create`, tail-called by egress for a flow without a mapping, creates it;
//! - `snat_ingress` translates replies back to the internal endpoint;
//! - `snat_xdp` does the same in XDP, before TC (`--ingress xdp`), leaving `snat_ingress` what it
//!   cannot do;
//! - `snat_hairpin`, on the pods' interfaces (`--hairpin on`), sends a pod's packet to a NAT
//!   endpoint to the pod holding it, translated both ways (through `snat_hairpin_deliver`;
//!   IPv6 in `snat_hairpin6` and `snat_hairpin_deliver6`);
//! - `snat_release` removes expired mappings for the controller (run, never attached);
//! - `snat_guard` is left on egress by a stopped agent: it drops what egress would translate;
//! - `snat_gateway` runs on a cluster's gateway, not on a node: it forwards each reply to the node
//!   holding its port's block.
//!
//! See `docs/packet-flow.md` for the path of a packet through both and the maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds: the BPF target has no `AtomicU64::fetch_add` (no CAS), but LLVM lowers an
// `atomic_xadd` whose result is unused to BPF_XADD, which every BPF ISA has.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_xadd, see above")
)]

#[cfg(target_arch = "bpf")]
mod alloc;
#[cfg(target_arch = "bpf")]
mod block;
#[cfg(target_arch = "bpf")]
mod cidr;
#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod create;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod egress6;
#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod gateway;
#[cfg(target_arch = "bpf")]
mod gateway_maps;
#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod hairpin;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod index;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod ingress6;
#[cfg(target_arch = "bpf")]
mod mapping;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod packet6;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod release;
#[cfg(target_arch = "bpf")]
mod verdict;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::TC_ACT_UNSPEC,
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{
        create, egress, egress6, gateway, guard, hairpin, ingress, ingress6, reject, release,
        verdict::action, xdp,
    };

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_egress(ctx: TcContext) -> i32 {
        action(egress::run(&ctx))
    }

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_create(ctx: TcContext) -> i32 {
        action(create::run::<[u8; 4]>(&ctx))
    }

    /// `snat_create` for IPv6 flows (their own maps and stack frame).
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_create6(ctx: TcContext) -> i32 {
        match create::run::<[u8; 16]>(&ctx) {
            Err(stop) if stop.action == reject::ANSWER_IN_REJECT6 => {
                reject::hand_over6(&ctx, stop.counter)
            }
            verdict => action(verdict),
        }
    }

    /// The refusal answer for IPv6, tail-called by `snat_create6` (see `reject`).
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_reject6(ctx: TcContext) -> i32 {
        reject::run6(&ctx)
    }

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_ingress(ctx: TcContext) -> i32 {
        if xdp::decided(&ctx) {
            return TC_ACT_UNSPEC;
        }
        if ctx.skb.protocol() == crate::packet6::ETH_P_IPV6_BE && crate::family::ipv6_on() {
            // SAFETY: a tail call from the program's own frame; IPv6 goes on there.
            unsafe { crate::maps::SNAT_PROGRAMS.tail_call(&ctx, snat_common::SLOT_INGRESS6) };
            // No IPv6 program loaded: untouched, as before NAT66.
            return TC_ACT_UNSPEC;
        }
        action(ingress::run(&ctx))
    }

    /// IPv6 egress (NAT66), tail-called by `snat_egress`.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_egress6(ctx: TcContext) -> i32 {
        egress6::run(&ctx)
    }

    /// IPv6 ingress (NAT66), tail-called by `snat_ingress`.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_ingress6(ctx: TcContext) -> i32 {
        action(ingress6::run(&ctx))
    }

    /// Hairpinning, first step: TC ingress on a pod's interface (see `hairpin`).
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_hairpin(ctx: TcContext) -> i32 {
        if ctx.skb.protocol() == crate::packet6::ETH_P_IPV6_BE && crate::family::ipv6_on() {
            // SAFETY: a tail call from the program's own frame; IPv6 goes on there.
            unsafe { crate::maps::SNAT_PROGRAMS.tail_call(&ctx, snat_common::SLOT_HAIRPIN6) };
            return TC_ACT_UNSPEC;
        }
        match hairpin::run(&ctx) {
            Some(verdict) => action(verdict),
            None => TC_ACT_UNSPEC,
        }
    }

    /// Hairpinning, second step: tail-called by `snat_hairpin` or `snat_create`, never attached.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_hairpin_deliver(ctx: TcContext) -> i32 {
        hairpin::deliver(&ctx)
    }

    /// Hairpinning for IPv6, first step: tail-called by `snat_hairpin`.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_hairpin6(ctx: TcContext) -> i32 {
        hairpin::run6(&ctx)
    }

    /// Hairpinning for IPv6, second step: tail-called by `snat_hairpin6` or `snat_create6`.
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_hairpin_deliver6(ctx: TcContext) -> i32 {
        hairpin::deliver6(&ctx)
    }

    /// The reply path in XDP (`--ingress xdp`), in front of `snat_ingress`.
    #[xdp]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[xdp] hands the context over by value"
    )]
    pub fn snat_xdp(ctx: XdpContext) -> u32 {
        xdp::run(&ctx)
    }

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_release(ctx: TcContext) -> i32 {
        release::run::<[u8; 4]>(&ctx)
    }

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_release6(ctx: TcContext) -> i32 {
        release::run::<[u8; 16]>(&ctx)
    }

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_guard(ctx: TcContext) -> i32 {
        guard::run(&ctx)
    }

    /// The gateway's return path: replies to the NAT IPs, forwarded to the node holding their
    /// port's block (`gateway`).
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_gateway(ctx: TcContext) -> i32 {
        gateway::run(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // Unreachable: the verifier rejects a program whose panic path it cannot rule out,
        // because this loop never ends.
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("snat-ebpf builds for the bpfel-unknown-none target only (see `cargo xtask build`)");
}
