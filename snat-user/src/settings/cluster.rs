//! Cluster mode's flags (`--etcd-endpoints` and the rest of issue 14's set), validated into a
//! plain [`Cluster`]. Invariants of a `Cluster`: at least one `http://` or `https://` endpoint
//! (https exactly when TLS files are given, and those are readable), a node name etcd keys and
//! Kubernetes accept, a block size that is a power of two of at least 8, `min ≤ max` blocks, and
//! a lease TTL in whole seconds longer than the cool-down plus the fence margin (the fence
//! closes that long before the lease ends).

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use super::{
    duration::{self, Human},
    MetricsAddr,
};

/// `snat run`'s cluster flags (flattened into `RunArgs`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// Cluster mode: lease port blocks on demand from this etcd (v3) cluster, e.g.
    /// http://10.0.0.5:2379 (comma-separated or repeated).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        conflicts_with = "plan"
    )]
    pub etcd_endpoints: Vec<String>,
    /// This node's name in the cluster (the Kubernetes node name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where the gateway sends replies for this node's blocks (default: the uplink's primary IPv4).
    #[arg(long, value_name = "IP")]
    pub node_address: Option<Ipv4Addr>,
    /// Ports per block (a power of two, at least 8); cluster-wide.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub block_size: u16,
    /// Blocks this node keeps on each NAT IP even when idle.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub min_blocks: u16,
    /// Most blocks this node holds on one NAT IP (default: all but every other node's minimum).
    #[arg(long, value_name = "N")]
    pub max_blocks: Option<u16>,
    /// The node's etcd lease; its blocks outlive a dead agent by at most this.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = duration::parse)]
    pub lease_ttl: Duration,
    /// How long a port rests between two owners.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = duration::parse)]
    pub block_cooldown: Duration,
    /// Slack for clock drift and early lease revocation.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    pub fence_margin: Duration,
    /// CA certificate for https:// endpoints (with --etcd-cert and --etcd-key).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_endpoints", "etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// This node's client certificate for etcd.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_ca"])]
    pub etcd_key: Option<PathBuf>,
}

/// TLS material for etcd: its CA, and this node's client certificate and key (etcd's usual
/// `--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub endpoints: Vec<String>,
    pub node_name: String,
    pub node_address: Option<Ipv4Addr>,
    pub block_size: u16,
    pub min_blocks: u16,
    pub max_blocks: Option<u16>,
    pub lease_ttl: Duration,
    pub cooldown: Duration,
    pub fence_margin: Duration,
    pub tls: Option<Tls>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    #[error("--etcd-endpoints {0:?} is not an etcd URL: write http://HOST:PORT or https://HOST:PORT, e.g. http://10.0.0.5:2379")]
    Endpoint(String),
    #[error("--etcd-endpoints mixes http:// and https://: use one scheme for every member")]
    MixedSchemes,
    #[error("--etcd-endpoints {0:?} is https:// but no --etcd-ca is given: name the CA that signed etcd's certificate")]
    HttpsWithoutCa(String),
    #[error("--etcd-ca is given but the endpoints are http://: use https:// endpoints, or drop the TLS flags")]
    TlsOverHttp,
    #[error("--{flag} {path}: {why}")]
    File {
        flag: &'static str,
        path: String,
        why: String,
    },
    #[error("cluster mode needs --node-name: the node's name, unique in the cluster (the Kubernetes node name, e.g. from the downward API's spec.nodeName)")]
    NoNodeName,
    #[error("--node-name {0:?} is not a valid node name: use 1-253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")]
    NodeName(String),
    #[error("--block-size {0} is not a power of two between 8 and 32768: use 64 (the default), or e.g. 32 or 256")]
    BlockSize(u16),
    #[error(
        "--max-blocks {max} is below --min-blocks {min}: raise --max-blocks or lower --min-blocks"
    )]
    MinAboveMax { min: u16, max: u16 },
    #[error("--max-blocks 0 would never let this node translate: use at least 1, or leave it out")]
    MaxZero,
    #[error("--lease-ttl {0} is not a whole number of seconds between 5s and 1h (etcd leases are whole seconds): e.g. 90s")]
    LeaseTtl(String),
    #[error("--lease-ttl {ttl} must be more than --block-cooldown {cooldown} + --fence-margin {margin}: the node stops translating that long before its lease ends; raise --lease-ttl or lower the others")]
    NoFence {
        ttl: String,
        cooldown: String,
        margin: String,
    },
    #[error("--{flag} is only for cluster mode: add --etcd-endpoints, or drop it")]
    NotClusterMode { flag: &'static str },
}

impl Cluster {
    /// `None` without `--etcd-endpoints` (then no other cluster flag may be set apart from
    /// defaults).
    pub fn validate(a: &ClusterArgs) -> Result<Option<Self>, ClusterError> {
        if a.etcd_endpoints.is_empty() {
            if a.node_name.is_some() {
                return Err(ClusterError::NotClusterMode { flag: "node-name" });
            }
            if a.node_address.is_some() {
                return Err(ClusterError::NotClusterMode {
                    flag: "node-address",
                });
            }
            if a.max_blocks.is_some() {
                return Err(ClusterError::NotClusterMode { flag: "max-blocks" });
            }
            return Ok(None);
        }
        let mut https = None;
        for e in &a.etcd_endpoints {
            let secure = endpoint_is_https(e)?;
            if https.is_some_and(|h| h != secure) {
                return Err(ClusterError::MixedSchemes);
            }
            https = Some(secure);
        }
        let tls = match (&a.etcd_ca, https == Some(true)) {
            (None, true) => return Err(ClusterError::HttpsWithoutCa(a.etcd_endpoints[0].clone())),
            (Some(_), false) => return Err(ClusterError::TlsOverHttp),
            (None, false) => None,
            (Some(ca), true) => {
                // clap makes the three flags go together.
                let (Some(cert), Some(key)) = (&a.etcd_cert, &a.etcd_key) else {
                    return Err(ClusterError::TlsOverHttp);
                };
                readable("etcd-ca", ca)?;
                readable("etcd-cert", cert)?;
                readable("etcd-key", key)?;
                Some(Tls {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
        };
        let node_name = a.node_name.clone().ok_or(ClusterError::NoNodeName)?;
        if !valid_node_name(&node_name) {
            return Err(ClusterError::NodeName(node_name));
        }
        if !(8..=32768).contains(&a.block_size) || !a.block_size.is_power_of_two() {
            return Err(ClusterError::BlockSize(a.block_size));
        }
        match a.max_blocks {
            Some(0) => return Err(ClusterError::MaxZero),
            Some(max) if max < a.min_blocks => {
                return Err(ClusterError::MinAboveMax {
                    min: a.min_blocks,
                    max,
                })
            }
            _ => {}
        }
        let ttl = a.lease_ttl;
        if ttl.subsec_nanos() != 0
            || ttl < Duration::from_secs(5)
            || ttl > Duration::from_secs(3600)
        {
            return Err(ClusterError::LeaseTtl(Human(ttl).to_string()));
        }
        if ttl <= a.block_cooldown + a.fence_margin {
            return Err(ClusterError::NoFence {
                ttl: Human(ttl).to_string(),
                cooldown: Human(a.block_cooldown).to_string(),
                margin: Human(a.fence_margin).to_string(),
            });
        }
        Ok(Some(Cluster {
            endpoints: a.etcd_endpoints.clone(),
            node_name,
            node_address: a.node_address,
            block_size: a.block_size,
            min_blocks: a.min_blocks,
            max_blocks: a.max_blocks,
            lease_ttl: ttl,
            cooldown: a.block_cooldown,
            fence_margin: a.fence_margin,
            tls,
        }))
    }
}

/// Whether an endpoint URL is `https://` (`http://` otherwise); anything else is refused.
pub fn endpoint_is_https(e: &str) -> Result<bool, ClusterError> {
    let bad = || ClusterError::Endpoint(e.to_owned());
    let (https, rest) = if let Some(r) = e.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = e.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host.contains(['/', '@', ' '])
        || port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    Ok(https)
}

/// A DNS-1123 subdomain, as Kubernetes names nodes (and no '/', which would split etcd keys).
fn valid_node_name(n: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !n.is_empty()
        && n.len() <= 253
        && n.chars().all(|c| ok(c) || c == '-' || c == '.')
        && n.starts_with(ok)
        && n.ends_with(ok)
}

fn readable(flag: &'static str, path: &std::path::Path) -> Result<(), ClusterError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| ClusterError::File {
            flag,
            path: path.display().to_string(),
            why: format!("cannot be read ({e}): give a readable PEM file"),
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: ClusterArgs,
        #[arg(long)]
        plan: Option<String>,
    }

    fn parse(args: &str) -> Result<Option<Cluster>, String> {
        let cli = Cli::try_parse_from(std::iter::once("snat").chain(args.split_whitespace()))
            .map_err(|e| e.to_string())?;
        Cluster::validate(&cli.c).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_issue() {
        let c =
            parse("--etcd-endpoints http://10.0.0.5:2379,http://10.0.0.6:2379 --node-name node-1")
                .unwrap()
                .unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.block_size, 64);
        assert_eq!(c.min_blocks, 1);
        assert_eq!(c.max_blocks, None);
        assert_eq!(c.lease_ttl, Duration::from_secs(90));
        assert_eq!(c.cooldown, Duration::from_secs(20));
        assert_eq!(c.fence_margin, Duration::from_secs(5));
        assert_eq!(c.tls, None);
        assert_eq!(parse("").unwrap(), None);
    }

    #[test]
    fn every_bad_value_is_named_with_its_fix() {
        let cases = [
            ("--etcd-endpoints 10.0.0.5:2379 --node-name a", "is not an etcd URL"),
            ("--etcd-endpoints http://10.0.0.5 --node-name a", "is not an etcd URL"),
            ("--etcd-endpoints http://10.0.0.5:2379,https://10.0.0.6:2379 --node-name a", "mixes http:// and https://"),
            ("--etcd-endpoints https://10.0.0.5:2379 --node-name a", "no --etcd-ca is given"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --etcd-ca /etc/hostname --etcd-cert /etc/hostname --etcd-key /etc/hostname", "the endpoints are http://"),
            ("--etcd-endpoints https://10.0.0.5:2379 --node-name a --etcd-ca /nonexistent/ca.pem --etcd-cert /etc/hostname --etcd-key /etc/hostname", "--etcd-ca /nonexistent/ca.pem: cannot be read"),
            ("--etcd-endpoints https://10.0.0.5:2379 --node-name a --etcd-ca /etc/hostname", "--etcd-cert"),
            ("--etcd-endpoints http://10.0.0.5:2379", "needs --node-name"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name Node_1", "\"Node_1\" is not a valid node name"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --block-size 48", "--block-size 48 is not a power of two"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --min-blocks 3 --max-blocks 2", "--max-blocks 2 is below --min-blocks 3"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --max-blocks 0", "--max-blocks 0"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --lease-ttl 1500ms", "is not a whole number of seconds"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --lease-ttl 25s", "--lease-ttl 25s must be more than --block-cooldown 20s + --fence-margin 5s"),
            ("--node-name a", "--node-name is only for cluster mode"),
            ("--etcd-endpoints http://10.0.0.5:2379 --node-name a --plan p.json", "cannot be used with"),
        ];
        for (args, want) in cases {
            let e = parse(args).unwrap_err();
            assert!(e.contains(want), "{args}: {e}");
        }
    }

    #[test]
    fn node_names_are_kubernetes_names() {
        for ok in ["a", "node-1", "ip-10-0-0-5.ec2.internal", "9"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a_b", &"a".repeat(254)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}

/// `snat gateway`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// The etcd cluster the nodes lease their blocks from (comma-separated or repeated).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// The interface the NAT IPs' traffic (the replies) arrives on.
    #[arg(long, value_name = "IF")]
    pub iface: String,
    /// Forward only these NAT IPs' replies (default: every NAT IP of the cluster).
    #[arg(long = "nat-ip", value_name = "IP")]
    pub nat_ips: Vec<Ipv4Addr>,
    /// This gateway's name in etcd (`/snat/v1/gateways/<name>`); unique per gateway.
    #[arg(long, value_name = "NAME", default_value = "gateway")]
    pub name: String,
    /// The lease the gateway publishes its applied revision under: a gateway gone for this
    /// long stops holding the nodes' new blocks back.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::parse)]
    pub lease_ttl: Duration,
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_ca"])]
    pub etcd_key: Option<PathBuf>,
    /// Prometheus endpoint (`/metrics`) of the gateway: applied revision and its lag, routes,
    /// replies forwarded and dropped; `off` serves none.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:9470")]
    pub metrics_addr: MetricsAddr,
}

/// `snat gateway`'s settings, validated.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub endpoints: Vec<String>,
    pub iface: String,
    pub nat_ips: Vec<Ipv4Addr>,
    pub name: String,
    pub lease_ttl: Duration,
    pub tls: Option<Tls>,
    pub metrics_addr: MetricsAddr,
}

impl GatewaySettings {
    pub fn validate(a: &GatewayArgs) -> Result<Self, ClusterError> {
        let (endpoints, tls) = etcd_access(
            &a.etcd_endpoints,
            a.etcd_ca.as_ref(),
            a.etcd_cert.as_ref(),
            a.etcd_key.as_ref(),
        )?;
        if !valid_node_name(&a.name) {
            return Err(ClusterError::NodeName(a.name.clone()));
        }
        let ttl = a.lease_ttl;
        if ttl.subsec_nanos() != 0
            || ttl < Duration::from_secs(5)
            || ttl > Duration::from_secs(3600)
        {
            return Err(ClusterError::LeaseTtl(Human(ttl).to_string()));
        }
        Ok(Self {
            endpoints,
            iface: a.iface.clone(),
            nat_ips: a.nat_ips.clone(),
            name: a.name.clone(),
            lease_ttl: ttl,
            tls,
            metrics_addr: a.metrics_addr,
        })
    }
}

/// Checks etcd endpoints and TLS files the way every cluster command takes them: http:// or
/// https:// URLs of one scheme, https exactly when a CA is given, and the files readable.
fn etcd_access(
    endpoints: &[String],
    ca: Option<&PathBuf>,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> Result<(Vec<String>, Option<Tls>), ClusterError> {
    let mut https = None;
    for e in endpoints {
        let secure = endpoint_is_https(e)?;
        if https.is_some_and(|h| h != secure) {
            return Err(ClusterError::MixedSchemes);
        }
        https = Some(secure);
    }
    let tls = match (ca, cert, key, https == Some(true)) {
        (None, _, _, true) => return Err(ClusterError::HttpsWithoutCa(endpoints[0].clone())),
        (Some(_), _, _, false) => return Err(ClusterError::TlsOverHttp),
        (Some(ca), Some(cert), Some(key), true) => {
            readable("etcd-ca", ca)?;
            readable("etcd-cert", cert)?;
            readable("etcd-key", key)?;
            Some(Tls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })
        }
        _ => None,
    };
    Ok((endpoints.to_vec(), tls))
}

/// How the cluster commands reach etcd (`--etcd-endpoints` and the TLS files).
#[derive(clap::Args, Clone, Debug)]
pub struct EtcdArgs {
    /// The etcd cluster the nodes lease their blocks from (comma-separated or repeated).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate for https:// endpoints (with --etcd-cert and --etcd-key).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_cert", "etcd_ca"])]
    pub etcd_key: Option<PathBuf>,
}

/// [`EtcdArgs`], checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    pub tls: Option<Tls>,
}

impl EtcdAccess {
    pub fn validate(a: &EtcdArgs) -> Result<Self, ClusterError> {
        let (endpoints, tls) = etcd_access(
            &a.etcd_endpoints,
            a.etcd_ca.as_ref(),
            a.etcd_cert.as_ref(),
            a.etcd_key.as_ref(),
        )?;
        Ok(Self { endpoints, tls })
    }
}

/// `snat cluster …`: look at and repair the cluster's state in etcd.
#[derive(clap::Args, Debug)]
pub struct ClusterCommand {
    #[command(subcommand)]
    pub what: ClusterWhat,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterWhat {
    /// Nodes (address, lease and its time left), their blocks (NAT IP, index, ports, epoch),
    /// quarantined blocks, gateways and their applied revision, free blocks per NAT IP.
    Status(ClusterStatusArgs),
    /// Free a dead node's blocks through the cool-down: they are quarantined for
    /// --block-cooldown + --fence-margin, then free; the node's lease is revoked. Refused while
    /// the node's lease has more than --fence-margin left, unless --dead says the node is off.
    Release(ClusterReleaseArgs),
    /// Stop waiting for a gateway that is gone for good (its host removed): a gateway that
    /// registered once is waited for before any node uses a new block, even after its lease
    /// lapsed, until it comes back, stops on purpose, or is forgotten here. Refused while it
    /// is live.
    ForgetGateway(ClusterForgetGatewayArgs),
}

#[derive(clap::Args, Debug)]
pub struct ClusterForgetGatewayArgs {
    /// The gateway's --name.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(clap::Args, Debug)]
pub struct ClusterStatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print JSON (stable: fields are only ever added).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ClusterReleaseArgs {
    /// The node whose blocks to free (its --node-name).
    #[arg(value_name = "NODE")]
    pub node: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The node is dead (powered off, its uplink down): it sends nothing any more. Releases
    /// even while its lease is healthy; the blocks still rest for the cool-down.
    #[arg(long)]
    pub dead: bool,
    /// The cluster's --block-cooldown (the agents' value: a smaller one here breaks the rule).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = duration::parse)]
    pub block_cooldown: Duration,
    /// The cluster's --fence-margin (the agents' value).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration::parse)]
    pub fence_margin: Duration,
}

/// `snat cluster release`'s settings, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseSettings {
    pub node: String,
    pub etcd: EtcdAccess,
    pub dead: bool,
    pub cooldown: Duration,
    pub fence_margin: Duration,
}

impl ReleaseSettings {
    pub fn validate(a: &ClusterReleaseArgs) -> Result<Self, ClusterError> {
        if !valid_node_name(&a.node) {
            return Err(ClusterError::NodeName(a.node.clone()));
        }
        Ok(Self {
            node: a.node.clone(),
            etcd: EtcdAccess::validate(&a.etcd)?,
            dead: a.dead,
            cooldown: a.block_cooldown,
            fence_margin: a.fence_margin,
        })
    }
}
