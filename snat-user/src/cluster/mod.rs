//! Cluster mode (issue 14): on-demand SNAT port blocks shared by the nodes of a cluster,
//! leased from etcd.
//!
//! - [`store`]: the etcd keys, values and requests (the IO the allocator asks for).

pub mod store;
