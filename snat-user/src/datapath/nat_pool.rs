//! The live NAT IP set and port range in the kernel, changed without the datapath ever seeing
//! half of a change.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::{Array, HashMap, MapData};
use log::debug;
use snat_common::{pool, Config, FlowKey, FlowKey6, NatIp, NatIp6};

use super::error::{DatapathError, Doing as _};
use crate::settings::{ports::PortRange, Policy};

/// The live NAT IP set and port range (`SNAT_CONFIG`, `SNAT_NAT_IPS`), and the free-port
/// indexes that depend on the range (`SNAT_FREE_PORTS`).
pub struct NatPool {
    pub(super) config: Array<MapData, Config>,
    pub(super) nat_ips: Array<MapData, NatIp>,
    /// The IPv6 NAT IPs (`SNAT_NAT_IPS6`), flipped by the same `Config::active`.
    pub(super) nat_ips6: Array<MapData, NatIp6>,
    pub(super) free_ports: HashMap<MapData, FlowKey, [u8; pool::index::LEN]>,
    pub(super) free_ports6: HashMap<MapData, FlowKey6, [u8; pool::index::LEN]>,
}

impl NatPool {
    /// Publishes a new set of NAT IPs and port range: writes the inactive set, then flips
    /// `Config::active` (and bumps `Config::generation`, which retires every "destination full"
    /// mark) so the datapath never sees half of the change. Mappings made before keep their ports
    /// until they end. NAT IPs that are this namespace's own addresses are flagged so the
    /// datapath skips ports the node's sockets use. A new range drops the free-port indexes,
    /// which the datapath rebuilds for the new range where it needs one.
    /// The IPv6 NAT IPs `ips6` change with the IPv4 ones, in the same flip (each family's set
    /// is its own; the port range is the same for both).
    pub fn set(
        &mut self,
        ips: &[Ipv4Addr],
        ips6: &[Ipv6Addr],
        range: PortRange,
    ) -> Result<(), DatapathError> {
        let local =
            super::netdev::local_ipv4().doing(|| "listing this namespace's addresses".into())?;
        let local6 =
            super::netdev::local_ipv6().doing(|| "listing this namespace's addresses".into())?;
        let mut cfg = self.config.get(&0, 0)?;
        let next = (cfg.active ^ 1) & 1;
        let live = cfg.active & 1;
        let new_range = cfg.nat_ip_count[live as usize] > 0 && {
            let old = self.nat_ips.get(&(live * snat_common::MAX_NAT_IPS), 0)?;
            (old.port_min, old.port_max) != (range.lo, range.hi)
        };
        for (i, ip) in ips.iter().enumerate() {
            let entry = NatIp {
                addr: ip.octets(),
                port_min: range.lo,
                port_max: range.hi,
                flags: if local.contains(ip) { NatIp::LOCAL } else { 0 },
                _pad: 0,
            };
            self.nat_ips
                .set(next * snat_common::MAX_NAT_IPS + i as u32, entry, 0)?;
        }
        cfg.nat_ip_count[next as usize] = ips.len() as u32;
        for (i, ip) in ips6.iter().enumerate() {
            let entry = NatIp6 {
                addr: ip.octets(),
                port_min: range.lo,
                port_max: range.hi,
                flags: if local6.contains(ip) {
                    NatIp6::LOCAL
                } else {
                    0
                },
                _pad: 0,
            };
            self.nat_ips6
                .set(next * snat_common::MAX_NAT_IPS + i as u32, entry, 0)?;
        }
        cfg.nat_ip_count6[next as usize] = ips6.len() as u32;
        self.config.set(0, cfg, 0)?;
        cfg.active = next;
        cfg.generation = cfg.generation.wrapping_add(1);
        self.config.set(0, cfg, 0)?;
        if new_range {
            self.clear_indexes()?;
        }
        Ok(())
    }

    /// Deletes every free-port index, once the new range is live: an index built for the old
    /// range would miss the new range's other ports for as long as its destination stays hot.
    /// (Until then the old indexes only give safe hints: an out-of-range port is cleared when
    /// found, a missing one is found by the walk.)
    fn clear_indexes(&mut self) -> Result<(), DatapathError> {
        let n = clear(&mut self.free_ports)? + clear(&mut self.free_ports6)?;
        debug!("dropped {n} free-port indexes for the new port range");
        Ok(())
    }

    /// Writes the admission policy: the per-source cap, the fair share, whether flows overflow
    /// to other NAT IPs, and how refused flows are answered.
    pub fn set_policy(&mut self, p: &Policy) -> Result<(), DatapathError> {
        let mut cfg = self.config.get(&0, 0)?;
        cfg.flags = if p.reject { Config::REJECT } else { 0 }
            | if p.overflow { Config::OVERFLOW } else { 0 };
        cfg.reject_per_sec = p.reject_per_sec;
        cfg.max_per_source = p.max_per_source;
        cfg.fair_share_permille = p.fair_share_permille;
        self.config.set(0, cfg, 0)?;
        Ok(())
    }
}

/// Deletes every entry of one family's free-port indexes; returns how many there were.
fn clear<K: aya::Pod>(
    map: &mut HashMap<MapData, K, [u8; pool::index::LEN]>,
) -> Result<usize, DatapathError> {
    let keys = map
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .doing(|| "listing the free-port indexes".into())?;
    for key in &keys {
        match map.remove(key) {
            Ok(()) => {}
            // Evicted meanwhile by the datapath (an LRU map).
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).doing(|| "deleting a free-port index".into()),
        }
    }
    Ok(keys.len())
}
