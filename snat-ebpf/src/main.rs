//! snat's kernel side: two TC programs on the node's uplink.
//!
//! - `snat_egress` translates the source of packets from internal CIDRs to a NAT ip:port,
//!   creating mappings as new flows appear;
//! - `snat_ingress` translates replies back to the internal endpoint.
//!
//! See `docs/packet-flow.md` for the path of a packet through both and the maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod alloc;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
        macros::classifier,
        programs::TcContext,
    };
    use snat_common::Counter;

    use crate::{egress, ingress, maps::count};

    /// Counts the verdict and turns it into a TC action: passed and translated packets go on to
    /// the next program or the stack (`TC_ACT_UNSPEC`, TCX "next"); dropped ones are shot.
    #[inline(always)]
    fn action(verdict: Result<Counter, Counter>) -> i32 {
        match verdict {
            Ok(c) => {
                count(c);
                TC_ACT_UNSPEC
            }
            Err(c) => {
                count(c);
                TC_ACT_SHOT
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
    pub fn snat_ingress(ctx: TcContext) -> i32 {
        action(ingress::run(&ctx))
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
