//! snat's controller as a library, in layers that import only downwards:
//!
//! - [`clock`]: the two clocks the datapath and the agent share (below everything);
//! - [`settings`]: the command line, the `--config` file, plans, and their validation into a
//!   plain [`settings::Settings`] (clap stays here);
//! - [`datapath`]: the loaded programs and their maps (engine, tables, counters, NAT pool, pins,
//!   batch reads, the uplink, the host's reserved ports);
//! - [`tables`]: what the maps mean (views, use counts and saturation, expiry);
//! - [`serve`]: the report model and its renderings, the control socket, the metrics endpoint;
//! - [`agent`]: `snat run`, which wires them together;
//! - [`cluster`]: cluster mode's shared port blocks (etcd store, allocator).
//!
//! The `snat` binary (`main.rs`) is the command-line edge; the integration tests drive the
//! layers directly.

pub mod agent;
pub mod clock;
pub mod cluster;
pub mod datapath;
pub mod serve;
pub mod settings;
pub mod tables;
