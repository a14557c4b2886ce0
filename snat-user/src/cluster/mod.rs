//! Cluster mode: on-demand port blocks leased from etcd (Cloud NAT's and NAT Gateway's model
//! instead of `snat plan`'s fixed per-node slices).
//!
//! - [`geometry`]: the range cut into blocks, the create-once record every agent must match;
//! - [`node`]: one node's block allocator as a sans-IO state machine (claims, keep-alives and
//!   the fence, releases after the cool-down, adoption after a restart);
//! - the simulation (tests only) runs several nodes, a fake etcd and a gateway under a fake
//!   clock with delays, partitions, early lease expiry and crashes, and checks the rule after
//!   every step.
//!
//! - [`gateway`]: the gateway's block → node routes, from the store's snapshot and watch;
//! - [`store`]: etcd: the keys, values and transactions, leases and the watch (the one module
//!   that talks to it);
//! - [`driver`]: the tokio loop that runs a node against a store and the datapath (traits);
//! - [`admin`]: what `snat cluster status` shows of a snapshot, and how `snat cluster release`
//!   frees a dead node's blocks through the cool-down.
//!
//! Nothing but the driver does IO.

pub mod admin;
pub mod driver;
pub mod gateway;
pub mod geometry;
pub mod node;
#[cfg(test)]
mod sim;
pub mod store;

/// A small deterministic generator (xorshift64*): seeded runs replay exactly.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the bias of the modulo is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
