//! Test harness for snat: network namespaces and veths that clean up after themselves, a standard
//! pods → node → router → server topology, the `snat` agent as a child process, and traffic
//! (TCP, UDP, ICMP) driven from threads that enter a namespace.
//!
//! Network safety: everything is created inside namespaces this harness makes, named with a
//! per-process unique prefix, and deleted by exact name on drop (panics included). No address,
//! route or program ever touches the root namespace.

pub mod agent;
pub mod cluster;
pub mod dp;
pub mod etcd;
pub mod forge;
pub mod http;
pub mod netns;
pub mod packets;
pub mod packets6;
pub mod tables;
pub mod topo;
pub mod traffic;
pub mod user;

/// The value of the sample `name{labels}` in Prometheus text `metrics` (labels in the order the
/// exposition prints them, e.g. `snat_mappings{proto="tcp"}`).
pub fn metric(metrics: &str, sample: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
