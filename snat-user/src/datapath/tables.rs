//! The mapping tables as the controller holds them: both halves of every mapping
//! (`SNAT_FWD`, `SNAT_REV`) and the use counts (`SNAT_USE`).

use aya::maps::{HashMap, MapData};
use snat_common::{FlowKey, Mapping, Origin, ReleaseEntry, UseKey};

use super::error::DatapathError;

/// The two halves of every mapping, and who holds how many (`SNAT_USE`).
pub struct Tables {
    pub fwd: HashMap<MapData, FlowKey, Mapping>,
    pub rev: HashMap<MapData, FlowKey, Origin>,
    pub usage: HashMap<MapData, UseKey, u64>,
}

impl Tables {
    /// The entry that releases the mapping of the forward key `key` as it is now.
    pub fn release_entry(&self, key: FlowKey) -> Result<ReleaseEntry, DatapathError> {
        let m = self
            .fwd
            .get(&key, 0)
            .map_err(|_| DatapathError::NoMapping)?;
        let o = self.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
        Ok(ReleaseEntry::new(key, &m, o.as_ref()))
    }
}
