//! The cluster's geometry: the port range every node shares, cut into blocks of `block_size`
//! ports, on each NAT IP. It lives in one create-once key (`/snat/v1/config`): the first agent
//! writes it from its flags, and an agent whose flags disagree refuses to start, naming every
//! difference ([`Geometry::differences`]). Pure.
//!
//! Block `i` of a NAT IP covers ports `lo + i·size ..= lo + (i+1)·size − 1`; ports after the last
//! whole block are never handed out. A block covers TCP and UDP ports and ICMP identifiers alike.

use std::{fmt, net::Ipv4Addr, ops::RangeInclusive};

use serde::{Deserialize, Serialize};

use crate::settings::ports::PortRange;

/// Version of the geometry record; an agent refuses a record of another version.
pub const SCHEMA: u32 = 1;

/// Smallest block: fewer ports per claim would make claims as frequent as connections.
pub const MIN_BLOCK_SIZE: u16 = 8;

/// One block: a NAT IP and the block's index in the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockId {
    pub nat_ip: Ipv4Addr,
    pub index: u16,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.nat_ip, self.index)
    }
}

/// What every node of a cluster must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub schema: u32,
    pub port_range: PortRange,
    pub block_size: u16,
    /// Ports never handed out (the NodePort range by default), inside blocks or not.
    pub reserved_ports: Vec<PortRange>,
    pub nat_ips: Vec<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("--block-size {0} is not a power of two of at least {MIN_BLOCK_SIZE}: use 8, 16, 32, 64 (the default), 128, …")]
    BlockSize(u16),
    #[error("--port-range {range} holds {size} ports, fewer than one block of {block_size}: widen the range or lower --block-size")]
    TooSmall {
        range: String,
        size: u32,
        block_size: u16,
    },
    #[error("cluster mode needs at least one --nat-ip")]
    NoNatIp,
}

impl Geometry {
    pub fn new(
        port_range: PortRange,
        block_size: u16,
        reserved_ports: Vec<PortRange>,
        mut nat_ips: Vec<Ipv4Addr>,
    ) -> Result<Self, GeometryError> {
        if block_size < MIN_BLOCK_SIZE || !block_size.is_power_of_two() {
            return Err(GeometryError::BlockSize(block_size));
        }
        if port_range.size() < u32::from(block_size) {
            return Err(GeometryError::TooSmall {
                range: format!("{}:{}", port_range.lo, port_range.hi),
                size: port_range.size(),
                block_size,
            });
        }
        if nat_ips.is_empty() {
            return Err(GeometryError::NoNatIp);
        }
        nat_ips.sort_unstable();
        nat_ips.dedup();
        Ok(Self {
            schema: SCHEMA,
            port_range,
            block_size,
            reserved_ports,
            nat_ips,
        })
    }

    /// Whole blocks in the range, per NAT IP.
    pub fn blocks_per_ip(&self) -> u16 {
        (self.port_range.size() / u32::from(self.block_size)) as u16
    }

    /// Ports after the last whole block, never handed out.
    pub fn unused_tail(&self) -> u32 {
        self.port_range.size() % u32::from(self.block_size)
    }

    /// The ports of block `index`.
    pub fn ports(&self, index: u16) -> RangeInclusive<u16> {
        let first = u32::from(self.port_range.lo) + u32::from(index) * u32::from(self.block_size);
        first as u16..=(first + u32::from(self.block_size) - 1) as u16
    }

    /// The block a port belongs to, if any.
    pub fn block_of(&self, port: u16) -> Option<u16> {
        let off = u32::from(port.checked_sub(self.port_range.lo)?);
        let index = off / u32::from(self.block_size);
        (index < u32::from(self.blocks_per_ip())).then_some(index as u16)
    }

    /// Every block of every NAT IP.
    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.nat_ips.iter().flat_map(move |&nat_ip| {
            (0..self.blocks_per_ip()).map(move |index| BlockId { nat_ip, index })
        })
    }

    pub fn holds(&self, b: BlockId) -> bool {
        self.nat_ips.contains(&b.nat_ip) && b.index < self.blocks_per_ip()
    }

    /// Each field where `self` (this agent's flags) and `stored` (the cluster's record) differ,
    /// named as the flag that sets it; empty when they agree.
    pub fn differences(&self, stored: &Geometry) -> Vec<String> {
        let mut out = Vec::new();
        let show = |r: &[PortRange]| {
            r.iter()
                .map(|r| format!("{}-{}", r.lo, r.hi))
                .collect::<Vec<_>>()
                .join(",")
        };
        if self.schema != stored.schema {
            out.push(format!(
                "schema: this agent writes version {}, the cluster's record is version {} (upgrade or downgrade the agents together)",
                self.schema, stored.schema
            ));
        }
        if self.port_range != stored.port_range {
            out.push(format!(
                "--port-range: {}:{} here, {}:{} in the cluster",
                self.port_range.lo, self.port_range.hi, stored.port_range.lo, stored.port_range.hi
            ));
        }
        if self.block_size != stored.block_size {
            out.push(format!(
                "--block-size: {} here, {} in the cluster",
                self.block_size, stored.block_size
            ));
        }
        if self.reserved_ports != stored.reserved_ports {
            out.push(format!(
                "--reserved-ports: {:?} here, {:?} in the cluster",
                show(&self.reserved_ports),
                show(&stored.reserved_ports)
            ));
        }
        if self.nat_ips != stored.nat_ips {
            let ips = |v: &[Ipv4Addr]| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push(format!(
                "--nat-ip: {} here, {} in the cluster",
                ips(&self.nat_ips),
                ips(&stored.nat_ips)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(lo: u16, hi: u16, bs: u16) -> Result<Geometry, GeometryError> {
        Geometry::new(
            PortRange { lo, hi },
            bs,
            vec![],
            vec![Ipv4Addr::new(198, 51, 100, 1)],
        )
    }

    #[test]
    fn blocks_tile_the_range() {
        let g = geo(40000, 40511, 64).unwrap();
        assert_eq!(g.blocks_per_ip(), 8);
        assert_eq!(g.unused_tail(), 0);
        assert_eq!(g.ports(0), 40000..=40063);
        assert_eq!(g.ports(7), 40448..=40511);
        for port in 40000..=40511u16 {
            let b = g.block_of(port).unwrap();
            assert!(g.ports(b).contains(&port));
        }
        assert_eq!(g.block_of(39999), None);
        assert_eq!(g.block_of(40512), None);
    }

    #[test]
    fn a_partial_last_block_is_never_handed_out() {
        let g = geo(1024, 65535, 64).unwrap();
        assert_eq!(g.blocks_per_ip(), 1008);
        assert_eq!(g.unused_tail(), 0);
        let g = geo(40000, 40100, 64).unwrap();
        assert_eq!(g.blocks_per_ip(), 1);
        assert_eq!(g.unused_tail(), 37);
        assert_eq!(g.block_of(40064), None);
        let g = geo(1, 65535, 8).unwrap();
        assert_eq!(*g.ports(g.blocks_per_ip() - 1).end(), 65528);
    }

    #[test]
    fn bad_block_sizes_and_ranges_are_refused_by_name() {
        for bs in [0, 4, 7, 48, 100] {
            let e = geo(40000, 40511, bs).unwrap_err();
            assert_eq!(e, GeometryError::BlockSize(bs));
            assert!(e.to_string().contains(&format!("--block-size {bs}")));
        }
        let e = geo(40000, 40010, 64).unwrap_err().to_string();
        assert!(e.contains("40000:40010 holds 11 ports"), "{e}");
    }

    #[test]
    fn differences_name_each_flag() {
        let a = geo(40000, 40511, 64).unwrap();
        assert!(a.differences(&a.clone()).is_empty());
        let mut b = geo(40000, 41023, 32).unwrap();
        b.nat_ips.push(Ipv4Addr::new(198, 51, 100, 2));
        let d = a.differences(&b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("--port-range: 40000:40511 here, 40000:41023"));
        assert!(d[1].starts_with("--block-size: 64 here, 32"));
        assert!(d[2].contains("198.51.100.1,198.51.100.2 in the cluster"));
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let g = geo(40000, 40511, 64).unwrap();
        let j = serde_json::to_string(&g).unwrap();
        assert!(j.contains("\"port_range\":\"40000:40511\""), "{j}");
        assert_eq!(serde_json::from_str::<Geometry>(&j).unwrap(), g);
    }
}
