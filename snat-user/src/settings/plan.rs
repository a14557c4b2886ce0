//! Per-node port slices for a cluster whose nodes share NAT IPs: Azure's load-balancer outbound
//! model, as Microsoft Learn's "Use Source Network Address Translation (SNAT) for outbound
//! connections" (<https://learn.microsoft.com/en-us/azure/load-balancer/load-balancer-outbound-connections>)
//! and the AKS page on `InvalidLoadBalancerProfileAllocatedOutboundPorts`
//! (<https://learn.microsoft.com/en-us/troubleshoot/azure/azure-kubernetes/error-codes/invalidloadbalancerprofileallocatedoutboundports-error>)
//! describe it.
//!
//! Model: every node gets the same number of ports on each NAT IP, `per_ip`, and the same slice
//! of each IP's port space: node `i` owns `first + i·per_ip ..= first + (i+1)·per_ip − 1` on every
//! NAT IP. A node's total allocation is `ports_per_node = per_ip × IPs`, the number Azure's
//! `allocatedOutboundPorts` counts, and a plan is valid exactly when Azure's rule holds:
//! `(nodes + surge) × ports_per_node ≤ ports_per_ip × IPs`. Surge nodes (upgrades) get slices of
//! their own after the regular nodes'. Invariant: slices never overlap and stay inside the space.
//!
//! NAT IPs of both families share the model: an IPv6 NAT IP is one more IP with the same slices,
//! and counts in `IPs` like an IPv4 one. A destination is of one family, so what a pod or node
//! reaches towards it ([`Plan::reach`]) counts only that family's IPs.
//!
//! Pure logic: [`plan`] takes numbers and returns a [`Plan`] or a [`PlanError`] whose message
//! has the shape and numbers of Azure's `InvalidLoadBalancerProfileAllocatedOutboundPorts`.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

use super::ports::PortRange;

/// Version of the plan file format; a file of another version is refused, not misread.
pub const PLAN_VERSION: u32 = 1;

/// Azure's default allocation table ("Use SNAT for outbound connections"): SNAT ports each
/// backend instance gets per frontend IP, by backend pool size.
pub const DEFAULT_TABLE: [(u32, u32); 6] = [
    (50, 1024),
    (100, 512),
    (200, 256),
    (400, 128),
    (800, 64),
    (1000, 32),
];

/// The port space of each NAT IP that a plan divides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    pub first: u16,
    pub size: u32,
}

impl Space {
    /// Azure's terms: 64,000 ports per IP, 1024–65023 (the first 1024 are system ports).
    pub fn azure(ports_per_ip: u32) -> Result<Self, PlanError> {
        if !(1..=64512).contains(&ports_per_ip) {
            return Err(PlanError::Input(format!(
                "--ports-per-ip {ports_per_ip} is out of range: use 1 to 64512 (ports 1024-65535); Azure gives 64000"
            )));
        }
        Ok(Self {
            first: 1024,
            size: ports_per_ip,
        })
    }

    pub fn from_range(r: PortRange) -> Self {
        Self {
            first: r.lo,
            size: r.size(),
        }
    }
}

/// What to plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub nodes: u32,
    pub surge: u32,
    pub ips: u32,
    /// Real NAT IPs, IPv4 and IPv6 (empty: only a count was given).
    pub nat_ips: Vec<IpAddr>,
    pub ports_per_node: Option<u32>,
    pub space: Space,
}

/// How the per-node number was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// `--ports-per-node` (an explicit outbound rule).
    Explicit,
    /// Azure's default table by pool size.
    Table,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub node: u32,
    /// A slice kept for a surge node (an upgrade's extra node).
    pub surge: bool,
    pub first: u16,
    pub last: u16,
}

impl Slice {
    pub fn range(&self) -> PortRange {
        PortRange {
            lo: self.first,
            hi: self.last,
        }
    }
}

/// A plan: what `snat plan --json` writes and `snat run --plan` reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// Both families, in the order given (a plan of an older snat lists IPv4 ones only). A
    /// family the plan names no NAT IP of takes them from `snat run --nat-ip` next to `--plan`.
    #[serde(deserialize_with = "nat_ips")]
    pub nat_ips: Vec<IpAddr>,
    pub ips: u32,
    pub space: Space,
    pub nodes: u32,
    pub surge: u32,
    pub allocation: Allocation,
    /// Ports each node holds over all NAT IPs (Azure's allocatedOutboundPorts).
    pub ports_per_node: u32,
    /// Ports each node holds on each NAT IP (the size of its slice).
    pub per_ip: u32,
    /// Ports per node from Azure's default table (per IP × IPs), when the pool size is in it.
    pub table_per_node: Option<u32>,
    /// The largest even split of all ports over nodes and surge (what an explicit rule allows).
    pub even_split_per_node: u32,
    pub slices: Vec<Slice>,
}

/// Ports one pod and one node reach towards one destination ([`Plan::reach`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    pub pod_paired: u64,
    pub pod_overflow: u64,
    pub node: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Input(String),
    /// Azure's `InvalidLoadBalancerProfileAllocatedOutboundPorts`, same shape and numbers.
    #[error(
        "allocated ports {ports_per_node} is not in an allowable range given the number of nodes and IPs provisioned. \
         Total node count {total_nodes} requires {required} ports but only {available} ports are available given {ips} outbound public IPs. \
         {fix}"
    )]
    TooFewPorts {
        ports_per_node: u32,
        total_nodes: u32,
        required: u64,
        available: u64,
        ips: u32,
        fix: String,
    },
}

/// A plan file that cannot be used, or a node it has no slice for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanFileError {
    #[error("--plan {path}: {message}")]
    Read { path: String, message: String },
    #[error("--plan {path}: not a snat plan ({message}); make one with `snat plan … --json`")]
    NotAPlan { path: String, message: String },
    #[error("plan format version {found} is not the {PLAN_VERSION} this snat reads; make the plan again with this snat's `snat plan --json`")]
    Version { found: u32 },
    #[error("the plan names no NAT IPs: make it with `snat plan --nat-ip IP …`")]
    NoNatIps,
    #[error("the plan has {slices} slices for {nodes} nodes: it is damaged; make it again")]
    SliceCount { slices: usize, nodes: u32 },
    #[error("slice {index} of the plan ({first}-{last}) does not follow its layout: it is damaged; make it again")]
    Layout { index: usize, first: u16, last: u16 },
    #[error("--plan {path}: {inner}")]
    In {
        path: String,
        #[source]
        inner: Box<PlanFileError>,
    },
    #[error("node index {index} is outside the plan: it has nodes 0..={last} ({nodes} nodes + {surge} surge)")]
    NoSuchNode {
        index: u32,
        last: u32,
        nodes: u32,
        surge: u32,
    },
}

/// Ports per instance per IP from the default table, for a pool of `size` instances.
pub fn table_per_ip(size: u32) -> Option<u32> {
    DEFAULT_TABLE
        .iter()
        .find(|(max, _)| size <= *max)
        .map(|(_, ports)| *ports)
}

/// Plans the slices, or says why the request cannot work and what would.
pub fn plan(req: &Request) -> Result<Plan, PlanError> {
    let input = |m: String| Err(PlanError::Input(m));
    if req.nodes == 0 {
        return input("--nodes must be at least 1".into());
    }
    if req.ips == 0 {
        return input("--ips must be at least 1".into());
    }
    if !req.nat_ips.is_empty() && req.nat_ips.len() != req.ips as usize {
        return input(format!(
            "--ips {} but {} --nat-ip given: give one --nat-ip per IP",
            req.ips,
            req.nat_ips.len()
        ));
    }
    if let Some(ip) = req
        .nat_ips
        .iter()
        .enumerate()
        .find_map(|(i, ip)| req.nat_ips[..i].contains(ip).then_some(ip))
    {
        return input(format!(
            "--nat-ip {ip} is given twice: list each NAT IP once"
        ));
    }
    let total = req.nodes + req.surge;
    let (k, space) = (u64::from(req.ips), u64::from(req.space.size));
    let available = space * k;
    let even_per_ip = (space / u64::from(total)) as u32;
    let table = table_per_ip(total);
    let (allocation, per_ip) = match req.ports_per_node {
        Some(p) => {
            if p == 0 {
                return input("--ports-per-node must be at least 1".into());
            }
            let required = u64::from(total) * u64::from(p);
            if required > available {
                return Err(PlanError::TooFewPorts {
                    ports_per_node: p,
                    total_nodes: total,
                    required,
                    available,
                    ips: req.ips,
                    fix: fix(req, p),
                });
            }
            if p % req.ips != 0 {
                let lower = p - p % req.ips;
                return input(format!(
                    "--ports-per-node {p} does not split evenly over {} NAT IPs (each node gets the same slice of every IP): use {} or {}",
                    req.ips,
                    lower.max(req.ips),
                    lower + req.ips
                ));
            }
            (Allocation::Explicit, p / req.ips)
        }
        None => {
            let Some(t) = table else {
                return input(format!(
                    "the default allocation table stops at 1000 instances and this pool has {total}: give --ports-per-node (at most {} here)",
                    u64::from(even_per_ip) * k
                ));
            };
            if u64::from(total) * u64::from(t) > space {
                return input(format!(
                    "the default table gives {t} ports per node per IP, and {total} nodes need {} but each IP's space holds {space} ({}..); \
                     plan in Azure's terms with --ports-per-ip 64000, or give --ports-per-node (at most {} here)",
                    u64::from(total) * u64::from(t),
                    req.space.first,
                    u64::from(even_per_ip) * k
                ));
            }
            (Allocation::Table, t)
        }
    };
    let slices = (0..total)
        .map(|i| {
            let first = u32::from(req.space.first) + i * per_ip;
            Slice {
                node: i,
                surge: i >= req.nodes,
                first: first as u16,
                last: (first + per_ip - 1) as u16,
            }
        })
        .collect();
    Ok(Plan {
        version: PLAN_VERSION,
        nat_ips: req.nat_ips.clone(),
        ips: req.ips,
        space: req.space,
        nodes: req.nodes,
        surge: req.surge,
        allocation,
        ports_per_node: per_ip * req.ips,
        per_ip,
        table_per_node: table.map(|t| t * req.ips),
        even_split_per_node: even_per_ip * req.ips,
        slices,
    })
}

/// A plan file's NAT IPs: IPv4 and IPv6 addresses, anything else named.
fn nat_ips<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    use serde::de::Error as _;
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse().map_err(|_| {
                D::Error::custom(format!("NAT IP {s:?} is not an IPv4 or IPv6 address"))
            })
        })
        .collect()
}

/// The nearest changes that make an explicit request valid.
fn fix(req: &Request, p: u32) -> String {
    let total = u64::from(req.nodes + req.surge);
    let (k, space) = (u64::from(req.ips), u64::from(req.space.size));
    let best_p = (space / total) * k;
    let ips_needed = (total * u64::from(p)).div_ceil(space);
    let max_total = space * k / u64::from(p);
    let mut out =
        format!("Use --ports-per-node {best_p} (the most that fits), or --ips {ips_needed}");
    if max_total > u64::from(req.surge) {
        let _ = write!(
            out,
            ", or at most {} nodes",
            max_total - u64::from(req.surge)
        );
        if req.surge > 0 {
            let _ = write!(out, " plus {} surge", req.surge);
        }
    }
    out.push('.');
    out
}

impl Plan {
    /// The plan's IPv4 NAT IPs, in order.
    pub fn nat_ips4(&self) -> Vec<Ipv4Addr> {
        self.nat_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(ip) => Some(*ip),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The plan's IPv6 NAT IPs, in order.
    pub fn nat_ips6(&self) -> Vec<Ipv6Addr> {
        self.nat_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(ip) => Some(*ip),
                IpAddr::V4(_) => None,
            })
            .collect()
    }

    /// Checks a plan read from a file: its version, NAT IPs and slices.
    pub fn check(&self) -> Result<(), PlanFileError> {
        if self.version != PLAN_VERSION {
            return Err(PlanFileError::Version {
                found: self.version,
            });
        }
        if self.nat_ips.is_empty() {
            return Err(PlanFileError::NoNatIps);
        }
        let total = self.nodes + self.surge;
        if self.slices.len() != total as usize || self.per_ip == 0 {
            return Err(PlanFileError::SliceCount {
                slices: self.slices.len(),
                nodes: total,
            });
        }
        let end = u32::from(self.space.first) + self.space.size;
        for (i, s) in self.slices.iter().enumerate() {
            let first = u32::from(self.space.first) + i as u32 * self.per_ip;
            if s.node != i as u32
                || u32::from(s.first) != first
                || u32::from(s.last) != first + self.per_ip - 1
                || first + self.per_ip > end
            {
                return Err(PlanFileError::Layout {
                    index: i,
                    first: s.first,
                    last: s.last,
                });
            }
        }
        Ok(())
    }

    /// The slice of node `index`, which must be in the plan.
    pub fn slice(&self, index: u32) -> Result<&Slice, PlanFileError> {
        self.slices
            .get(index as usize)
            .ok_or(PlanFileError::NoSuchNode {
                index,
                last: self.nodes + self.surge - 1,
                nodes: self.nodes,
                surge: self.surge,
            })
    }

    /// Reads and checks a plan file.
    pub fn load(path: &std::path::Path) -> Result<Self, PlanFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PlanFileError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let plan: Plan = serde_json::from_str(&text).map_err(|e| PlanFileError::NotAPlan {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        plan.check().map_err(|e| PlanFileError::In {
            path: shown,
            inner: Box::new(e),
        })?;
        Ok(plan)
    }

    /// How many ports one pod and one node reach towards one destination (ports are reused
    /// across destinations): a pod with `--ip-pooling paired` only its paired NAT IP's slice, with
    /// `overflow` every NAT IP's slice of its node; a node every slice it owns. A destination is
    /// of one family, so only that family's NAT IPs count: one [`Reach`] per family the plan
    /// names (`None` for a plan of one family, or of a count only).
    pub fn reach(&self) -> Vec<(Option<&'static str>, Reach)> {
        let over = |k: usize| {
            let node = u64::from(self.per_ip) * k as u64;
            Reach {
                pod_paired: u64::from(self.per_ip),
                pod_overflow: node,
                node,
            }
        };
        let (v4, v6) = (self.nat_ips4().len(), self.nat_ips6().len());
        if v4 == 0 || v6 == 0 {
            vec![(None, over(self.ips as usize))]
        } else {
            vec![(Some("IPv4"), over(v4)), (Some("IPv6"), over(v6))]
        }
    }

    /// The plan as a table.
    pub fn render(&self) -> String {
        let last = u32::from(self.space.first) + self.space.size - 1;
        let (v4, v6) = (self.nat_ips4().len(), self.nat_ips6().len());
        let families = if v4 > 0 && v6 > 0 {
            format!(" ({v4} IPv4, {v6} IPv6)")
        } else {
            String::new()
        };
        let mut out = format!(
            "{} nodes + {} surge over {} NAT IP(s){families}, {} ports per IP ({}-{last})\n",
            self.nodes, self.surge, self.ips, self.space.size, self.space.first
        );
        let _ = writeln!(
            out,
            "{} ports per node ({} on each IP), {}",
            self.ports_per_node,
            self.per_ip,
            match self.allocation {
                Allocation::Explicit => "explicit (--ports-per-node)",
                Allocation::Table => "from the default allocation table",
            }
        );
        match self.table_per_node {
            Some(t) => {
                let _ = writeln!(
                    out,
                    "default table: {t} per node; largest even split: {} per node",
                    self.even_split_per_node
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "largest even split: {} per node",
                    self.even_split_per_node
                );
            }
        }
        for (family, reach) in self.reach() {
            let _ = writeln!(
                out,
                "towards one {}destination: one pod reaches {} ports with --ip-pooling paired, {} with overflow (the default); one node {}",
                family.map(|f| format!("{f} ")).unwrap_or_default(),
                reach.pod_paired,
                reach.pod_overflow,
                reach.node
            );
        }
        let ips: Vec<String> = if self.nat_ips.is_empty() {
            (0..self.ips).map(|i| format!("ip{i}")).collect()
        } else {
            self.nat_ips.iter().map(ToString::to_string).collect()
        };
        let width = ips.iter().map(String::len).max().unwrap_or(0).max(16);
        let _ = writeln!(
            out,
            "\n{:<7} {:<width$} {:>6} {:>6}",
            "NODE", "NAT IP", "FIRST", "LAST"
        );
        for s in &self.slices {
            for ip in &ips {
                let node = if s.surge {
                    format!("{}s", s.node)
                } else {
                    s.node.to_string()
                };
                let _ = writeln!(out, "{node:<7} {ip:<width$} {:>6} {:>6}", s.first, s.last);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure(
        nodes: u32,
        surge: u32,
        ips: u32,
        ports_per_node: Option<u32>,
    ) -> Result<Plan, PlanError> {
        plan(&Request {
            nodes,
            surge,
            ips,
            nat_ips: vec![],
            ports_per_node,
            space: Space::azure(64000).unwrap(),
        })
    }

    #[test]
    fn nine_nodes_at_8000_do_not_fit_one_ip() {
        // The AKS error page: "Load balancer profile allocated ports 8000 is not in an allowable
        // range given the number of nodes and IPs provisioned. Total node count 9 requires 72000
        // ports but only 64000 ports are available given 1 outbound public IPs."
        let e = azure(9, 0, 1, Some(8000)).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "allocated ports 8000 is not in an allowable range given the number of nodes and IPs provisioned. \
                 Total node count 9 requires 72000 ports but only 64000 ports are available given 1 outbound public IPs."
            ),
            "{e}"
        );
        assert!(
            e.contains("--ports-per-node 7111")
                && e.contains("--ips 2")
                && e.contains("at most 8 nodes"),
            "{e}"
        );
    }

    #[test]
    fn eight_nodes_plus_one_surge_is_the_same_nine() {
        // The AKS error page: account for the node an upgrade adds (AKS surges by one by
        // default).
        let e = azure(8, 1, 1, Some(8000)).unwrap_err().to_string();
        assert!(
            e.contains("Total node count 9 requires 72000 ports but only 64000"),
            "{e}"
        );
        assert!(e.contains("at most 7 nodes plus 1 surge"), "{e}");
    }

    #[test]
    fn eight_nodes_at_8000_fit_one_ip() {
        // 64,000 ports per IP over 8 nodes: at most 8,000 ports per node.
        let p = azure(8, 0, 1, Some(8000)).unwrap();
        assert_eq!((p.per_ip, p.slices.len()), (8000, 8));
        assert_eq!((p.slices[0].first, p.slices[0].last), (1024, 9023));
        assert_eq!((p.slices[7].first, p.slices[7].last), (57024, 65023));
        assert_eq!(p.even_split_per_node, 8000);
    }

    #[test]
    fn a_hundred_nodes_get_512_from_the_table() {
        // The default table: 100 instances and one frontend IP get 512 ports each.
        let p = azure(100, 0, 1, None).unwrap();
        assert_eq!(
            (p.allocation, p.ports_per_node, p.per_ip),
            (Allocation::Table, 512, 512)
        );
        assert_eq!(p.table_per_node, Some(512));
        assert_eq!(p.even_split_per_node, 640);
    }

    #[test]
    fn a_second_ip_doubles_what_each_node_gets() {
        // Another frontend IP gives each instance another 512 (1,024 in all); two IPs hold
        // 128,000 ports.
        let one = azure(100, 0, 1, None).unwrap();
        let two = azure(100, 0, 2, None).unwrap();
        assert_eq!(two.ports_per_node, 2 * one.ports_per_node);
        assert_eq!(two.even_split_per_node, 2 * one.even_split_per_node);
        // And nine nodes at 8000 fit over two IPs (128,000 ports).
        let p = azure(9, 0, 2, Some(8000)).unwrap();
        assert_eq!(p.per_ip, 4000);
        // One pod reaches one IP's slice when paired, both when it may overflow.
        assert_eq!(
            p.reach(),
            [(
                None,
                Reach {
                    pod_paired: 4000,
                    pod_overflow: 8000,
                    node: 8000
                }
            )]
        );
        assert!(p
            .render()
            .contains("one pod reaches 4000 ports with --ip-pooling paired, 8000 with overflow"));
    }

    #[test]
    fn azure_explicit_rule_example() {
        // "Use SNAT for outbound connections": "If you have a backend pool with a max size of 6,
        // each instance can have 64,000/10 = 6,400 ports if you define an explicit outbound
        // rule. According to the above table each will only have 1,024 if you choose automatic
        // allocation."
        // Read as a pool of 10 (the arithmetic): 6,400 each, and the table's 1,024.
        let ten = azure(10, 0, 1, None).unwrap();
        assert_eq!(
            (ten.even_split_per_node, ten.table_per_node),
            (6400, Some(1024))
        );
        assert!(azure(10, 0, 1, Some(6400)).is_ok());
        assert!(azure(10, 0, 1, Some(6401)).is_err());
        // Read as a pool of 6 (the words): 10,666 each.
        assert_eq!(azure(6, 0, 1, None).unwrap().even_split_per_node, 10666);
    }

    #[test]
    fn slices_tile_the_space_without_overlap() {
        let space = Space::from_range("32768:65535".parse().unwrap());
        let p = plan(&Request {
            nodes: 3,
            surge: 1,
            ips: 1,
            nat_ips: vec![],
            ports_per_node: None,
            space,
        })
        .unwrap();
        assert_eq!(p.per_ip, 1024);
        let mut next = 32768u32;
        for s in &p.slices {
            assert_eq!(u32::from(s.first), next);
            next = u32::from(s.last) + 1;
        }
        assert!(p.slices[3].surge && !p.slices[2].surge);
        let even = plan(&Request {
            nodes: 3,
            surge: 0,
            ips: 1,
            nat_ips: vec![],
            ports_per_node: Some(10922),
            space,
        })
        .unwrap();
        assert_eq!(even.slices[2].last, 32768 + 3 * 10922 - 1);
    }

    #[test]
    fn bad_requests_say_what_to_do() {
        let e = azure(3, 0, 2, Some(1001)).unwrap_err().to_string();
        assert!(e.contains("use 1000 or 1002"), "{e}");
        let e = azure(1001, 0, 1, None).unwrap_err().to_string();
        assert!(e.contains("table stops at 1000"), "{e}");
        // Our default range holds 32,768 ports: the table's 1,024 × 50 does not fit.
        let space = Space::from_range("32768:65535".parse().unwrap());
        let e = plan(&Request {
            nodes: 50,
            surge: 0,
            ips: 1,
            nat_ips: vec![],
            ports_per_node: None,
            space,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--ports-per-ip 64000"), "{e}");
        assert!(azure(0, 0, 1, None).is_err());
    }

    #[test]
    fn plan_files_are_checked() {
        let mut p = plan(&Request {
            nodes: 2,
            surge: 0,
            ips: 1,
            nat_ips: vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))],
            ports_per_node: Some(100),
            space: Space::from_range("40000:40999".parse().unwrap()),
        })
        .unwrap();
        assert!(p.check().is_ok());
        assert_eq!(p.slice(1).unwrap().range(), "40100:40199".parse().unwrap());
        assert!(p
            .slice(2)
            .unwrap_err()
            .to_string()
            .contains("node index 2 is outside the plan"));
        p.slices[1].first += 1;
        assert!(p.check().unwrap_err().to_string().contains("damaged"));
        p.version = 7;
        assert!(p.check().unwrap_err().to_string().contains("version 7"));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Two nodes over `nat_ips`, 100 ports each over all of them, from 40000.
    fn two_nodes(ips: u32, nat_ips: &[&str]) -> Result<Plan, PlanError> {
        plan(&Request {
            nodes: 2,
            surge: 0,
            ips,
            nat_ips: nat_ips.iter().map(|s| ip(s)).collect(),
            ports_per_node: Some(100),
            space: Space::from_range("40000:40999".parse().unwrap()),
        })
    }

    #[test]
    fn a_plan_names_nat_ips_of_both_families() {
        let p = two_nodes(2, &["198.51.100.1", "2001:db8:1::1"]).unwrap();
        // Each NAT IP, of either family, is one of the `ips` and gets the same slices.
        assert_eq!((p.ips, p.per_ip, p.ports_per_node), (2, 50, 100));
        assert_eq!(p.nat_ips4(), [Ipv4Addr::new(198, 51, 100, 1)]);
        assert_eq!(p.nat_ips6(), ["2001:db8:1::1".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(p.slice(1).unwrap().range(), "40050:40099".parse().unwrap());
        let json = serde_json::to_string_pretty(&p).unwrap();
        assert!(
            json.contains("\"nat_ips\": [\n    \"198.51.100.1\",\n    \"2001:db8:1::1\"\n  ]"),
            "{json}"
        );
        let back = serde_json::from_str::<Plan>(&json).unwrap();
        assert_eq!(back, p);
        assert!(back.check().is_ok());
        // An IPv6-only plan is a plan too.
        let only6 = two_nodes(1, &["2001:db8:1::1"]).unwrap();
        assert!(only6.nat_ips4().is_empty() && only6.check().is_ok());
        let e = serde_json::from_str::<Plan>(&json.replace("2001:db8:1::1", "2001:db8::g"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NAT IP \"2001:db8::g\" is not an IPv4 or IPv6 address"),
            "{e}"
        );
        let e = serde_json::from_str::<Plan>(&json.replace("198.51.100.1", "1.2.3"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NAT IP \"1.2.3\" is not an IPv4 or IPv6 address"),
            "{e}"
        );
    }

    #[test]
    fn an_ipv4_plan_of_an_older_snat_reads_as_before() {
        // What `snat plan --nodes 2 --nat-ip 198.51.100.1 --ports-per-node 100 --port-range
        // 40000:40999 --json` wrote before plans named IPv6 NAT IPs.
        let old = r#"{
  "version": 1,
  "nat_ips": [
    "198.51.100.1"
  ],
  "ips": 1,
  "space": {
    "first": 40000,
    "size": 1000
  },
  "nodes": 2,
  "surge": 0,
  "allocation": "explicit",
  "ports_per_node": 100,
  "per_ip": 100,
  "table_per_node": 1024,
  "even_split_per_node": 500,
  "slices": [
    {
      "node": 0,
      "surge": false,
      "first": 40000,
      "last": 40099
    },
    {
      "node": 1,
      "surge": false,
      "first": 40100,
      "last": 40199
    }
  ]
}"#;
        let p = serde_json::from_str::<Plan>(old).unwrap();
        assert!(p.check().is_ok());
        assert_eq!(p, two_nodes(1, &["198.51.100.1"]).unwrap());
        assert_eq!(p.nat_ips4(), [Ipv4Addr::new(198, 51, 100, 1)]);
        assert!(p.nat_ips6().is_empty());
        assert_eq!(serde_json::to_string_pretty(&p).unwrap(), old);
    }

    #[test]
    fn ips_counts_the_nat_ips_of_both_families() {
        let e = two_nodes(1, &["198.51.100.1", "2001:db8:1::1"])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--ips 1 but 2 --nat-ip given: give one --nat-ip per IP");
        let e = two_nodes(3, &["198.51.100.1", "2001:db8:1::1", "198.51.100.2"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ports-per-node 100 does not split evenly over 3 NAT IPs"),
            "{e}"
        );
        let e = two_nodes(2, &["2001:db8:1::1", "2001:db8:1::1"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--nat-ip 2001:db8:1::1 is given twice: list each NAT IP once"
        );
    }

    #[test]
    fn a_mixed_plan_renders_both_families_and_their_reach() {
        let p = plan(&Request {
            nodes: 2,
            surge: 0,
            ips: 3,
            nat_ips: vec![
                ip("198.51.100.1"),
                ip("198.51.100.2"),
                ip("2001:db8:1:2:3:4:5:6"),
            ],
            ports_per_node: Some(300),
            space: Space::from_range("40000:40999".parse().unwrap()),
        })
        .unwrap();
        let text = p.render();
        assert!(
            text.starts_with("2 nodes + 0 surge over 3 NAT IP(s) (2 IPv4, 1 IPv6), 1000 ports"),
            "{text}"
        );
        // A destination is of one family: only that family's NAT IPs reach it.
        assert!(
            text.contains(
                "towards one IPv4 destination: one pod reaches 100 ports with --ip-pooling paired, 200 with overflow (the default); one node 200"
            ) && text.contains(
                "towards one IPv6 destination: one pod reaches 100 ports with --ip-pooling paired, 100 with overflow (the default); one node 100"
            ),
            "{text}"
        );
        assert!(
            text.contains("1       2001:db8:1:2:3:4:5:6  40100  40199"),
            "{text}"
        );
        assert!(
            text.contains("0       198.51.100.1          40000  40099"),
            "{text}"
        );
    }
}
