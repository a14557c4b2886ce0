//! What the datapath counts, read from its maps: packets by result (`SNAT_COUNTERS`), refused
//! flows by pool and by source, and the allocation-time histogram.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use snat_common::{alloc_hist, Addr, Counter, Ipv4Octets, PoolKeyOf};

use super::error::{DatapathError, Doing as _};

/// What the datapath counts: packets by result, refused flows by pool (each family's own
/// maps), allocation times.
pub struct Counters {
    pub(super) packets: PerCpuArray<MapData, u64>,
    pub(super) source_refused: HashMap<MapData, Ipv4Octets, u64>,
    pub(super) source_refused6: HashMap<MapData, [u8; 16], u64>,
    pub(super) exhausted: PerCpuHashMap<MapData, PoolKeyOf<[u8; 4]>, u64>,
    pub(super) exhausted6: PerCpuHashMap<MapData, PoolKeyOf<[u8; 16]>, u64>,
    pub(super) overflowed: PerCpuHashMap<MapData, PoolKeyOf<[u8; 4]>, u64>,
    pub(super) overflowed6: PerCpuHashMap<MapData, PoolKeyOf<[u8; 16]>, u64>,
    pub(super) alloc_ns: PerCpuArray<MapData, u64>,
}

/// A pool: a NAT IP of either family and a protocol number.
pub type PoolId = (IpAddr, u8);

/// The allocation time histogram, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocHistogram {
    /// Per bucket (not cumulative), see [`alloc_hist`].
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

impl Counters {
    /// Every packet counter summed over CPUs, in index order.
    pub fn read(&self) -> Result<Vec<(Counter, u64)>, DatapathError> {
        Counter::ALL
            .iter()
            .map(|c| {
                Ok((
                    *c,
                    sum_slot(&self.packets, c.index())
                        .doing(|| format!("reading counter {c:?}"))?,
                ))
            })
            .collect()
    }

    /// One counter, summed over the CPUs.
    pub fn get(&self, c: Counter) -> Result<u64, DatapathError> {
        sum_slot(&self.packets, c.index()).doing(|| format!("reading counter {c:?}"))
    }

    /// Flows refused for lack of a port, by pool (both families).
    pub fn exhausted(&self) -> Result<Vec<(PoolId, u64)>, DatapathError> {
        let mut all = per_pool(&self.exhausted, "SNAT_EXHAUSTED")?;
        all.extend(per_pool(&self.exhausted6, "SNAT_EXHAUSTED6")?);
        Ok(all)
    }

    /// Flows that got a port on another NAT IP than their paired one, by paired pool.
    pub fn overflowed(&self) -> Result<Vec<(PoolId, u64)>, DatapathError> {
        let mut all = per_pool(&self.overflowed, "SNAT_OVERFLOW")?;
        all.extend(per_pool(&self.overflowed6, "SNAT_OVERFLOW6")?);
        Ok(all)
    }

    /// Flows refused per internal source (any reason), as the kernel's LRUs remember them.
    pub fn refused_by_source(&self) -> Result<Vec<(IpAddr, u64)>, DatapathError> {
        let v4 = self.source_refused.iter().map(|item| {
            let (addr, n) = item.doing(|| "reading SNAT_SRC_REFUSED".into())?;
            Ok((IpAddr::V4(Ipv4Addr::from(addr)), n))
        });
        let v6 = self.source_refused6.iter().map(|item| {
            let (addr, n) = item.doing(|| "reading SNAT_SRC_REFUSED6".into())?;
            Ok((IpAddr::V6(Ipv6Addr::from(addr)), n))
        });
        v4.chain(v6).collect()
    }

    pub fn alloc_histogram(&self) -> Result<AllocHistogram, DatapathError> {
        let slot = |i| sum_slot(&self.alloc_ns, i).doing(|| "reading SNAT_ALLOC_NS".into());
        Ok(AllocHistogram {
            buckets: (0..alloc_hist::BUCKETS)
                .map(slot)
                .collect::<Result<_, DatapathError>>()?,
            sum_ns: slot(alloc_hist::SUM)?,
            count: slot(alloc_hist::COUNT)?,
        })
    }
}

fn sum_slot(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64, aya::maps::MapError> {
    Ok(map.get(&index, 0)?.iter().sum())
}

/// A per-pool counter map summed over CPUs.
fn per_pool<A: Addr + aya::Pod>(
    map: &PerCpuHashMap<MapData, PoolKeyOf<A>, u64>,
    name: &str,
) -> Result<Vec<(PoolId, u64)>, DatapathError>
where
    PoolKeyOf<A>: aya::Pod,
{
    map.iter()
        .map(|item| {
            let (k, per_cpu) = item.doing(|| format!("reading {name}"))?;
            Ok(((k.addr.ip(), k.proto), per_cpu.iter().sum()))
        })
        .collect()
}
