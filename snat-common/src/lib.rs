//! Types, constants and pure logic shared by snat's kernel side (`snat-ebpf`) and its controller
//! (`snat-user`).
//!
//! Everything that crosses the kernel/userspace boundary lives here: map and program names, the
//! `#[repr(C)]` map keys and values, the counter indices, and the small pieces of arithmetic both
//! sides must agree on (checksum deltas, the TCP phase a mapping is in, the NAT IP an internal
//! address is paired with). The crate is `no_std`; the `user` feature adds the `aya::Pod` impls the
//! controller needs to read and write the maps.
#![cfg_attr(not(test), no_std)]

pub mod counter;
pub mod csum;
pub mod flow;
pub mod pool;
pub mod tcp;

pub use counter::Counter;
pub use flow::{Config, FlowKey, Mapping, NatIp, Origin};

/// Name of the TC egress program (translates pod → internet).
pub const PROG_EGRESS: &str = "snat_egress";
/// Name of the TC ingress program (translates replies internet → pod).
pub const PROG_INGRESS: &str = "snat_ingress";

/// Array\[1\] of [`Config`]: which NAT IP set is live.
pub const MAP_CONFIG: &str = "SNAT_CONFIG";
/// Array\[2 × [`MAX_NAT_IPS`]\] of [`NatIp`]: two sets, flipped by [`Config::active`].
pub const MAP_NAT_IPS: &str = "SNAT_NAT_IPS";
/// LPM trie of the internal (pod) CIDRs whose sources are translated.
pub const MAP_INTERNAL: &str = "SNAT_INTERNAL";
/// LPM trie of destinations never translated (always includes the internal CIDRs).
pub const MAP_EXCLUDE: &str = "SNAT_EXCLUDE";
/// Hash [`FlowKey`] (as the pod sent it) → [`Mapping`]: the forward half of every mapping.
pub const MAP_FWD: &str = "SNAT_FWD";
/// Hash [`FlowKey`] (as the reply arrives) → [`Origin`]: the reverse half, and the port claim.
pub const MAP_REV: &str = "SNAT_REV";
/// Per-CPU array of `u64` indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "SNAT_COUNTERS";

/// Most NAT IPs one agent can use (per set; the map holds two sets).
pub const MAX_NAT_IPS: u32 = 64;
/// Most internal and excluded CIDRs each.
pub const MAX_CIDRS: u32 = 1024;
/// Default number of concurrent mappings the maps are sized for.
pub const DEFAULT_MAX_MAPPINGS: u32 = 1_000_000;

/// Key of the internal and excluded LPM tries: an IPv4 address in network byte order.
pub type Ipv4Octets = [u8; 4];
