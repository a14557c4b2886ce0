//! snat's controller as a library: flag validation, the loaded datapath ([`engine::Engine`]),
//! expiry of idle mappings, the control socket and the figures the agent reports. The `snat`
//! binary (`main.rs`) wires them together; the integration tests drive them directly.

pub mod access;
pub mod agent;
pub mod batch;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod control;
pub mod duration;
pub mod engine;
pub mod expiry;
pub mod metrics;
pub mod netdev;
pub mod pins;
pub mod plan;
pub mod ports;
pub mod report;
pub mod scrape;
pub mod usage;
pub mod view;
