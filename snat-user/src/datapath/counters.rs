//! What the datapath counts, read from its maps: packets by result (`SNAT_COUNTERS`), refused
//! flows by pool and by source, and the allocation-time histogram.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use snat_common::{alloc_hist, Counter, Ipv4Octets, PoolKey};

use super::error::{DatapathError, Doing as _};

/// What the datapath counts: packets by result, refused flows by pool, allocation times.
pub struct Counters {
    pub(super) packets: PerCpuArray<MapData, u64>,
    pub(super) source_refused: HashMap<MapData, Ipv4Octets, u64>,
    pub(super) exhausted: PerCpuHashMap<MapData, PoolKey, u64>,
    pub(super) overflowed: PerCpuHashMap<MapData, PoolKey, u64>,
    pub(super) alloc_ns: PerCpuArray<MapData, u64>,
}

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

    /// Flows refused for lack of a port, by (NAT IP, protocol).
    pub fn exhausted(&self) -> Result<Vec<(PoolKey, u64)>, DatapathError> {
        self.exhausted
            .iter()
            .map(|item| {
                let (k, per_cpu) = item.doing(|| "reading SNAT_EXHAUSTED".into())?;
                Ok((k, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Flows that got a port on another NAT IP than their paired one, by (paired NAT IP,
    /// protocol).
    pub fn overflowed(&self) -> Result<Vec<(PoolKey, u64)>, DatapathError> {
        self.overflowed
            .iter()
            .map(|item| {
                let (k, per_cpu) = item.doing(|| "reading SNAT_OVERFLOW".into())?;
                Ok((k, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Flows refused per internal source (any reason), as the kernel's LRU remembers them.
    pub fn refused_by_source(&self) -> Result<Vec<(Ipv4Addr, u64)>, DatapathError> {
        self.source_refused
            .iter()
            .map(|item| {
                let (addr, n) = item.doing(|| "reading SNAT_SRC_REFUSED".into())?;
                Ok((Ipv4Addr::from(addr), n))
            })
            .collect()
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
