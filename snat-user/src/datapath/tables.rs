//! The mapping tables as the controller holds them, per address family: both halves of every
//! mapping (`SNAT_FWD`, `SNAT_REV`; `SNAT_FWD6`, `SNAT_REV6`) and the use counts (`SNAT_USE`,
//! `SNAT_USE6`).

use aya::maps::{HashMap, MapData};
use snat_common::{Addr, FlowKeyOf, MappingOf, OriginOf, ReleaseEntryOf, UseKeyOf};

use super::error::DatapathError;

/// The two halves of every mapping of one family, and who holds how many.
pub struct TablesOf<A: Addr> {
    pub fwd: HashMap<MapData, FlowKeyOf<A>, MappingOf<A>>,
    pub rev: HashMap<MapData, FlowKeyOf<A>, OriginOf<A>>,
    pub usage: HashMap<MapData, UseKeyOf<A>, u64>,
}

/// The IPv4 tables.
pub type Tables = TablesOf<[u8; 4]>;
/// The IPv6 tables.
pub type Tables6 = TablesOf<[u8; 16]>;

impl<A: Addr> TablesOf<A>
where
    FlowKeyOf<A>: aya::Pod,
    MappingOf<A>: aya::Pod,
    OriginOf<A>: aya::Pod,
{
    /// The entry that releases the mapping of the forward key `key` as it is now.
    pub fn release_entry(&self, key: FlowKeyOf<A>) -> Result<ReleaseEntryOf<A>, DatapathError> {
        let m = self
            .fwd
            .get(&key, 0)
            .map_err(|_| DatapathError::NoMapping)?;
        let o = self.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
        Ok(ReleaseEntryOf::new(key, &m, o.as_ref()))
    }
}
