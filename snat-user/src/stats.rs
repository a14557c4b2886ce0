//! What the agent reports about itself: counters from the kernel, mappings in the tables, and
//! releases by the sweeper, as one JSON document (and a table for people).

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use serde_json::{json, Value};

use crate::{
    config::Settings,
    engine::{Counters, Tables},
    expiry::{proto_name, Sweeper},
};

/// State the control socket, the sweeper and shutdown share.
pub struct Shared {
    pub settings: Settings,
    pub counters: Counters,
    pub tables: Mutex<Tables>,
    pub sweeper: Mutex<Sweeper>,
}

/// The agent's current figures.
pub fn snapshot(shared: &Shared) -> anyhow::Result<Value> {
    let mut groups: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for (c, v) in shared.counters.read()? {
        let (group, name) = c.labels();
        groups.entry(group).or_default().insert(name, v);
    }
    let zero =
        || -> BTreeMap<&str, u64> { ["tcp", "udp", "icmp"].into_iter().map(|p| (p, 0)).collect() };
    let (mut mappings, mut claims) = (zero(), zero());
    {
        let tables = shared
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for key in tables.fwd.keys() {
            *mappings.entry(proto_name(key?.proto)).or_default() += 1;
        }
        for key in tables.rev.keys() {
            *claims.entry(proto_name(key?.proto)).or_default() += 1;
        }
    }
    let mut expired: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    {
        let sweeper = shared
            .sweeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((p, reason), n) in &sweeper.expired {
            expired.entry(p).or_default().insert(reason.name(), *n);
        }
    }
    let s = &shared.settings;
    Ok(json!({
        "iface": s.iface.name,
        "nat_ips": s.nat_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "port_range": s.port_range.to_string(),
        "counters": groups,
        "mappings": mappings,
        // Reverse halves: each holds one (NAT ip:port, remote) claim. Equal to `mappings` at rest;
        // anything more would be a leaked port.
        "port_claims": claims,
        "expired": expired,
    }))
}

/// A snapshot as aligned text; counters that are still zero are left out.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "iface {}  NAT IPs {}  ports {}",
        v["iface"].as_str().unwrap_or("?"),
        v["nat_ips"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
        v["port_range"].as_str().unwrap_or("?"),
    );
    for section in ["mappings", "port_claims", "expired", "counters"] {
        let Some(obj) = v[section].as_object() else {
            continue;
        };
        let _ = writeln!(out, "{section}:");
        for (k, val) in obj {
            match val {
                Value::Object(inner) => {
                    for (name, n) in inner {
                        if section == "counters" && n.as_u64() == Some(0) {
                            continue;
                        }
                        let _ = writeln!(out, "  {:<36} {}", format!("{k}.{name}"), n);
                    }
                }
                other => {
                    let _ = writeln!(out, "  {k:<36} {other}");
                }
            }
        }
    }
    out
}
