//! What the mapping tables mean: [`view`] aggregates them the ways operators ask (by pool, source,
//! destination, and as rows), [`usage`] turns the use counts into fair-share hints and
//! saturation warnings, [`expiry`] decides which mappings have expired and releases them.

pub mod expiry;
pub mod usage;
pub mod view;
