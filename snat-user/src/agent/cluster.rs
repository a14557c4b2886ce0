//! Cluster mode's part of `snat run` (`--etcd-endpoints`): the block allocator ([`Node`]) driven
//! against etcd ([`store::Store`]) and the datapath's block table ([`Blocks`]). Before anything
//! is attached, [`preflight`] checks the geometry and the node name against the cluster, so a
//! disagreement aborts the start with the datapath untouched; an etcd that does not answer within
//! [`READY_WAIT`] does not (a restarted agent must keep translating in the blocks it holds). Then
//! [`start`] runs the node as a task until the agent stops it ([`Running::finish`]).

use std::{
    future::Future,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinHandle};

use super::{lock, AgentState};
use crate::{
    cluster::{
        driver::{self, boottime_ns, Outcome, Polling, Stop},
        geometry::Geometry,
        node::{
            self, BlockRecord, GatewayRecord, Node, NodeConfig, NodeRecord, Restored, Snapshot,
            Status, StoreOp, StoreReply, Timers, Usage,
        },
        store::{self, Claim, ConfigOutcome, Registration, Release},
    },
    datapath::blocks::Blocks,
    settings::{cluster::Cluster, Settings},
};

/// How long the start waits for the node to be registered before attaching anyway.
pub const READY_WAIT: Duration = Duration::from_secs(20);

/// The cluster's geometry from this agent's flags.
pub fn geometry(settings: &Settings, c: &Cluster) -> anyhow::Result<Geometry> {
    Ok(Geometry::new(
        settings.port_range,
        c.block_size,
        settings.reserved_ports.ranges().to_vec(),
        settings.nat_ips.clone(),
    )?)
}

/// etcd as the driver sees it: one [`StoreOp`] at a time, with this node's name and address.
#[derive(Clone)]
pub struct Etcd {
    pub store: store::Store,
    pub name: String,
    pub address: Ipv4Addr,
    /// Published with the node's record, for `snat cluster release`.
    pub timers: store::NodeTimers,
}

fn outcome(e: &store::StoreError) -> node::StoreError {
    match e.outcome() {
        store::Outcome::NotApplied => node::StoreError::NotApplied(e.to_string()),
        store::Outcome::Unknown => node::StoreError::Unknown(e.to_string()),
    }
}

impl Etcd {
    async fn run(&self, op: StoreOp) -> Result<StoreReply, node::StoreError> {
        let s = &self.store;
        let e = |e: store::StoreError| outcome(&e);
        Ok(match op {
            StoreOp::CreateConfig(g) => {
                let json = serde_json::to_string(&g).expect("a geometry serialises");
                match s.create_config(&json).await.map_err(e)? {
                    ConfigOutcome::Created { .. } => StoreReply::ConfigCreated,
                    ConfigOutcome::Exists(json) => match serde_json::from_str(&json) {
                        Ok(stored) => StoreReply::ConfigExists(stored),
                        // Another schema: the comparison names it.
                        Err(_) => StoreReply::ConfigExists(Geometry { schema: 0, ..g }),
                    },
                }
            }
            StoreOp::Grant { ttl_s } => {
                let l = s.grant(i64::from(ttl_s)).await.map_err(e)?;
                StoreReply::Granted {
                    lease: l.id,
                    ttl_s: u32::try_from(l.ttl_s).unwrap_or(0),
                }
            }
            StoreOp::KeepAlive { lease } => StoreReply::Alive {
                ttl_s: u32::try_from(s.keep_alive_once(lease).await.map_err(e)?).unwrap_or(0),
            },
            StoreOp::Register { lease } => {
                match s
                    .register_node(
                        &self.name,
                        &store::NodeValue {
                            address: self.address,
                            lease,
                            timers: Some(self.timers),
                        },
                    )
                    .await
                    .map_err(e)?
                {
                    Registration::Registered { .. } => StoreReply::Registered,
                    Registration::Taken { record } => StoreReply::NameTaken {
                        lease: record.value.lease,
                    },
                }
            }
            StoreOp::List => StoreReply::Listed(snapshot(s.list().await.map_err(e)?)),
            StoreOp::Gateways => {
                // `gateways/` and `gateways-known/` in one read.
                let snap = snapshot(s.list_under("gateways").await.map_err(e)?);
                StoreReply::Gateways {
                    live: snap.gateways,
                    known: snap.known_gateways,
                }
            }
            StoreOp::Claim { block, lease } => {
                match s
                    .claim_block(block, &self.name, self.address, lease)
                    .await
                    .map_err(e)?
                {
                    Claim::Claimed { epoch, .. } => StoreReply::Claimed { epoch },
                    Claim::Taken { .. } => StoreReply::ClaimTaken,
                }
            }
            StoreOp::Release { block, epoch } => {
                match s.release_block(block, epoch).await.map_err(e)? {
                    Release::Released { revision } => StoreReply::Released { revision },
                    Release::NotOurs { revision } => StoreReply::NotOurs { revision },
                }
            }
            StoreOp::Revoke { lease } => {
                s.revoke(lease).await.map_err(e)?;
                StoreReply::Revoked
            }
        })
    }
}

impl driver::Store for Etcd {
    fn execute(
        &self,
        op: StoreOp,
    ) -> impl Future<Output = Result<StoreReply, node::StoreError>> + Send + 'static {
        let this = self.clone();
        async move { this.run(op).await }
    }
}

/// The node's view of a store snapshot.
fn snapshot(s: store::Snapshot) -> Snapshot {
    Snapshot {
        revision: s.revision,
        nodes: s
            .nodes
            .into_iter()
            .map(|(name, r)| NodeRecord {
                name,
                lease: r.value.lease,
            })
            .collect(),
        blocks: s
            .blocks
            .into_iter()
            .map(|(block, r)| BlockRecord {
                block,
                node: r.value.node,
                lease: r.lease,
                epoch: r.create_revision,
            })
            .collect(),
        gateways: s
            .gateways
            .into_iter()
            .map(|(name, r)| GatewayRecord {
                name,
                applied: r.value.applied_revision,
            })
            .collect(),
        known_gateways: s.known_gateways.into_iter().collect(),
    }
}

/// The datapath's block table as the driver sees it (the engine and tables behind the agent's
/// locks).
pub struct AgentBlocks {
    pub state: Arc<AgentState>,
    pub blocks: Blocks,
}

impl AgentBlocks {
    /// Mappings the datapath has created so far (every protocol and NAT IP), less those the
    /// expiry has released: under steady churn the count stands still, so the estimate between
    /// usage reads follows the ports in use rather than the connections made.
    fn created(&self) -> anyhow::Result<u64> {
        let c = &self.state.counters;
        use snat_common::Counter;
        let created = c.get(Counter::CreatedTcp)?
            + c.get(Counter::CreatedUdp)?
            + c.get(Counter::CreatedIcmp)?;
        let expired: u64 = lock(&self.state.sweeper).expired.values().sum();
        Ok(created.saturating_sub(expired))
    }
}

impl driver::Blocks for AgentBlocks {
    fn apply(&mut self, op: &node::DatapathOp) -> anyhow::Result<()> {
        let engine = lock(&self.state.engine);
        let tables = lock(&self.state.tables);
        self.blocks.apply(op, &engine, &tables)?;
        Ok(())
    }

    fn usage(&mut self) -> anyhow::Result<Usage> {
        let created = self.created()?;
        let tables = lock(&self.state.tables);
        Ok(self.blocks.usage(&tables, created)?)
    }

    fn pressure(&mut self) -> anyhow::Result<Vec<node::Pressure>> {
        let created = self.created()?;
        Ok(self.blocks.poll_pressure(created)?)
    }
}

/// The running driver.
pub struct Running {
    pub stop: watch::Sender<Stop>,
    pub task: JoinHandle<anyhow::Result<Outcome>>,
    pub cooldown: Duration,
}

impl Running {
    /// Stops the driver the way `how` says and waits for it: a moment to keep everything, a
    /// cool-down (and a little) to give every block back after a detach. What is not given back
    /// by then goes with the lease, at its end.
    pub async fn finish(&mut self, how: Stop) {
        let _ = self.stop.send(how);
        let wait = match how {
            Stop::Detached | Stop::Drain => self.cooldown + Duration::from_secs(10),
            _ => Duration::from_secs(5),
        };
        match tokio::time::timeout(wait, &mut self.task).await {
            Ok(Ok(Ok(Outcome::Drained))) => {
                log::info!("cluster: every block went back and the lease was revoked");
            }
            Ok(Ok(Ok(Outcome::Kept))) => {
                log::info!("cluster: the lease and the blocks stay for the next agent");
            }
            Ok(Ok(Err(e))) => log::warn!("cluster: stopping: {e:#}"),
            Ok(Err(e)) => log::warn!("cluster: stopping: {e}"),
            Err(_) => log::warn!(
                "cluster: blocks not given back within {}s (etcd unreachable?): they go with the lease when it ends",
                wait.as_secs()
            ),
        }
    }
}

/// Connects to etcd and checks, before anything is attached, that this agent's geometry is the
/// cluster's and that no other live agent holds its node name. An etcd that does not answer
/// within [`READY_WAIT`] does not stop the start (a restarted agent must keep translating in the
/// blocks it holds); the node checks again once it answers.
pub async fn preflight(
    c: &Cluster,
    geometry: &Geometry,
    pinned_lease: Option<node::LeaseId>,
) -> anyhow::Result<store::Store> {
    let endpoints = c.endpoints.join(",");
    let tls = c.tls.as_ref().map(|t| store::TlsFiles {
        ca: t.ca.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
    });
    let store = store::Store::connect(&c.endpoints, tls.as_ref(), store::Timeouts::default())
        .await
        .with_context(|| format!("--etcd-endpoints {endpoints}"))?;
    let json = serde_json::to_string(geometry)?;
    let checked = tokio::time::timeout(READY_WAIT, async {
        let config = store.create_config(&json).await?;
        let snapshot = store.list().await?;
        Ok::<_, store::StoreError>((config, snapshot))
    })
    .await;
    let (config, snapshot) = match checked {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            log::warn!("etcd ({endpoints}) cannot check this node's geometry and name yet ({e}): starting; the node checks once etcd answers, and new flows are refused until it has a block");
            return Ok(store);
        }
        Err(_) => {
            log::warn!("etcd ({endpoints}) has not answered in {}s: starting; the node checks once etcd answers, and new flows are refused until it has a block", READY_WAIT.as_secs());
            return Ok(store);
        }
    };
    if let ConfigOutcome::Exists(stored) = config {
        let stored: Geometry = serde_json::from_str(&stored).with_context(|| {
            format!(
                "the cluster's geometry in /snat/v1/config is not one this agent reads: {stored}"
            )
        })?;
        let d = geometry.differences(&stored);
        if !d.is_empty() {
            anyhow::bail!(
                "this agent's flags disagree with the cluster's geometry in /snat/v1/config: {}; start it with the cluster's values",
                d.join("; ")
            );
        }
    }
    if let Some(r) = snapshot.nodes.get(&c.node_name) {
        if Some(r.value.lease) != pinned_lease {
            anyhow::bail!(
                "node name {:?} is held by another agent's live lease {:x} (hex, as etcdctl shows it), registered from {}: two agents must not share a name; give this one its own --node-name, or wait for that lease to expire (at most --lease-ttl) if its agent is gone",
                c.node_name,
                r.value.lease,
                r.value.address
            );
        }
    }
    Ok(store)
}

/// Where the gateway sends this node's replies: `--node-address`, else the uplink's primary IPv4.
pub fn node_address(settings: &Settings, c: &Cluster) -> anyhow::Result<Ipv4Addr> {
    match c
        .node_address
        .or_else(|| settings.iface.ipv4.first().copied())
    {
        Some(a) => Ok(a),
        None => anyhow::bail!(
            "{} has no IPv4 address to receive this node's replies: give --node-address",
            settings.iface.name
        ),
    }
}

/// Starts the node as a task on the current runtime.
pub async fn start(
    state: Arc<AgentState>,
    c: &Cluster,
    geometry: Geometry,
    blocks: Blocks,
    store: store::Store,
    address: Ipv4Addr,
) -> anyhow::Result<Running> {
    let restored: Restored = blocks.restored()?;
    let cfg = NodeConfig {
        name: c.node_name.clone(),
        address,
        low_water: u32::from(geometry.block_size) / 2,
        geometry,
        timers: Timers::new(c.lease_ttl, c.cooldown, c.fence_margin),
        min_blocks: c.min_blocks,
        max_blocks: c.max_blocks,
        seed: boottime_ns() ^ u64::from(std::process::id()),
    };
    let node = Node::new(cfg, restored, boottime_ns());
    let status = Arc::new(Mutex::new(Status::default()));
    *lock(&state.cluster) = Some(status.clone());
    let (stop, stop_rx) = watch::channel(Stop::Running);
    let etcd = Etcd {
        store,
        name: c.node_name.clone(),
        address,
        timers: store::NodeTimers::new(c.cooldown, c.fence_margin),
    };
    let blocks = AgentBlocks {
        state: state.clone(),
        blocks,
    };
    let polling = Polling::default();
    let task = tokio::spawn(driver::run(node, etcd, blocks, polling, stop_rx, status));
    Ok(Running {
        stop,
        task,
        cooldown: c.cooldown,
    })
}
