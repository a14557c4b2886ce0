//! What the agent shows and takes: the [`report`] model (a pure function of a [`report::Snapshot`])
//! and its text renderings ([`render`]), the control socket ([`control`], with its access rules in
//! [`access`]), and the Prometheus endpoint ([`metrics`], served by [`scrape`]).
//!
//! The control socket and the metrics endpoint reach the running agent only through [`Agent`]:
//! they import nothing above this layer.

pub mod access;
pub mod control;
pub mod metrics;
pub mod render;
pub mod report;
pub mod scrape;

use self::{access::Refusals, report::Report};
use crate::{settings::ports::PortRange, tables::view::ConnFilter};

/// A change of the NAT pool asked for over the control socket (`snat set`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolChange {
    /// New flows use this port range…
    pub port_range: PortRange,
    /// …and these IPv4 NAT IPs, if given (a plan's slice)…
    pub nat_ips: Option<Vec<std::net::Ipv4Addr>>,
    /// …and these IPv6 NAT IPs, if given (a plan that names IPv6 NAT IPs). Absent from an older
    /// client's request.
    #[serde(default)]
    pub nat_ips6: Option<Vec<std::net::Ipv6Addr>>,
    /// The plan slice this is, for status.
    pub slice: Option<String>,
}

/// What the control socket and the metrics endpoint need of the running agent.
pub trait Agent: Send + Sync + 'static {
    /// The report now; with the mapping rows `rows` selects, if given.
    fn report(&self, rows: Option<&ConnFilter>) -> anyhow::Result<Report>;
    /// Applies `change` to new flows; returns what changed and warnings about it.
    fn set_pool(&self, change: &PoolChange) -> anyhow::Result<(String, Vec<String>)>;
    /// The control socket's refusal counts and rate-limited log.
    fn refusals(&self) -> &Refusals;
}
