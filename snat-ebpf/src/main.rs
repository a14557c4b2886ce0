//! snat's kernel side: TC programs on the node's uplink.
//!
//! - `snat_egress` translates the source of packets from internal CIDRs to a NAT ip:port;
//! - `snat_create`, tail-called by egress for a flow without a mapping, creates it;
//! - `snat_ingress` translates replies back to the internal endpoint;
//! - `snat_xdp` does the same in XDP, before TC (`--ingress xdp`), leaving `snat_ingress` what it
//!   cannot do;
//! - `snat_hairpin`, on the pods' interfaces (`--hairpin on`), sends a pod's packet to a NAT
//!   endpoint to the pod holding it, translated both ways (through `snat_hairpin_deliver`);
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
mod create;
#[cfg(target_arch = "bpf")]
mod egress;
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
mod mapping;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
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
        create, egress, gateway, guard, hairpin, ingress, maps::count, release, verdict::Verdict,
        xdp,
    };

    /// Counts the verdict and turns it into a TC action: passed and translated packets go on to
    /// the next program or the stack (`TC_ACT_UNSPEC`, TCX "next"); the others are shot or, when
    /// turned into an answer, redirected.
    #[inline(always)]
    fn action(verdict: Verdict) -> i32 {
        match verdict {
            Ok(c) => {
                count(c);
                TC_ACT_UNSPEC
            }
            Err(stop) => {
                count(stop.counter);
                stop.action
            }
        }
    }

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
        action(create::run(&ctx))
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
        action(ingress::run(&ctx))
    }

    /// Hairpinning, first step: TC ingress on a pod's interface (see `hairpin`).
    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "#[classifier] hands the context over by value"
    )]
    pub fn snat_hairpin(ctx: TcContext) -> i32 {
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
        release::run(&ctx)
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
