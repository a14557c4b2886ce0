//! `snat cluster status` and `snat cluster release`: the IO around [`crate::cluster::admin`].
//! Both read the store once (every request bounded by the store's deadlines, so an unreachable
//! etcd is an error naming the endpoints within seconds, never a hang); a release then moves
//! the node's blocks under a quarantine lease and revokes the node's lease, in that order (see
//! the module doc of [`crate::cluster::admin`] for why that keeps the cool-down).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context as _};

use crate::{
    cluster::{
        admin::{self, lease_hex, Verdict},
        geometry::BlockId,
        store::{self, LeaseId, LeaseTtl, Moved, Snapshot},
    },
    settings::{
        cluster::{EtcdAccess, ReleaseSettings},
        duration::Human,
    },
};

/// Rounds of "move what the node holds, read again" before a release gives up on a node that
/// keeps claiming blocks (it is alive).
const MOVE_ROUNDS: usize = 5;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Connects to etcd and reads everything under `/snat/v1/`; an etcd that does not answer is an
/// error naming the endpoints and the fix.
async fn connect_and_read(etcd: &EtcdAccess) -> anyhow::Result<(store::Store, Snapshot)> {
    let endpoints = etcd.endpoints.join(",");
    let tls = etcd.tls.as_ref().map(|t| store::TlsFiles {
        ca: t.ca.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
    });
    let unreachable = |e: store::StoreError| {
        anyhow!(
            "etcd at {endpoints} did not answer ({e}): check --etcd-endpoints{}, that etcd runs, and that this host reaches it",
            if tls.is_some() { " and --etcd-ca/--etcd-cert/--etcd-key" } else { "" }
        )
    };
    let store = store::Store::connect(&etcd.endpoints, tls.as_ref(), store::Timeouts::default())
        .await
        .map_err(unreachable)?;
    let snapshot = store.list().await.map_err(unreachable)?;
    Ok((store, snapshot))
}

/// The time left of `leases`; after the first failure the rest show as unknown (etcd stopped
/// answering: each would wait out the deadline again).
async fn time_left(store: &store::Store, leases: &[LeaseId]) -> BTreeMap<LeaseId, LeaseTtl> {
    let mut out = BTreeMap::new();
    for &lease in leases {
        match store.time_to_live(lease).await {
            Ok(t) => {
                out.insert(lease, t);
            }
            Err(e) => {
                log::warn!(
                    "reading the time left of lease {}: {e}; shown as unknown",
                    lease_hex(lease)
                );
                break;
            }
        }
    }
    out
}

/// `snat cluster status [--json]`.
pub fn status(etcd: &EtcdAccess, json: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (store, snapshot) = connect_and_read(etcd).await?;
        let leases = time_left(&store, &admin::leases_to_ask(&snapshot)).await;
        let st = admin::status(&snapshot, &leases);
        if json {
            println!("{}", serde_json::to_string_pretty(&st)?);
        } else {
            print!("{}", admin::render(&st));
        }
        Ok(())
    })
}

/// The blocks `s` holds under `lease`, for the report.
fn under(s: &Snapshot, lease: LeaseId) -> Vec<BlockId> {
    s.blocks
        .iter()
        .filter(|(_, r)| r.lease == lease)
        .map(|(b, _)| *b)
        .collect()
}

/// `snat cluster forget-gateway NAME`: the nodes stop waiting for a gateway gone for good.
pub fn forget_gateway(etcd: &EtcdAccess, name: &str) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (store, snapshot) = connect_and_read(etcd).await?;
        if snapshot.gateways.contains_key(name) {
            bail!("gateway {name} is live (its lease is held): stop it instead (a stop on purpose unregisters it)");
        }
        if !snapshot.known_gateways.contains(name) {
            let known: Vec<&str> = snapshot.known_gateways.iter().map(String::as_str).collect();
            bail!("no gateway {name:?} is known to the cluster (known: {known:?})");
        }
        store
            .set_known_gateway(name, false)
            .await
            .with_context(|| format!("forgetting gateway {name}"))?;
        println!("gateway {name} forgotten: the nodes no longer wait for it before using a new block");
        Ok(())
    })
}

/// `snat cluster release NODE [--dead]`.
pub fn release(r: &ReleaseSettings) -> anyhow::Result<()> {
    runtime()?.block_on(release_async(r))
}

async fn release_async(r: &ReleaseSettings) -> anyhow::Result<()> {
    let endpoints = r.etcd.endpoints.join(",");
    let (store, snapshot) = connect_and_read(&r.etcd).await?;
    let name = &r.node;
    let Some(node) = snapshot.nodes.get(name) else {
        let left = snapshot
            .blocks
            .values()
            .filter(|b| &b.value.node == name)
            .count();
        if left > 0 {
            println!("node {name} is not registered (its lease has ended); {left} of its blocks are still quarantined under another lease and free when it ends (`snat cluster status` shows when)");
            return Ok(());
        }
        bail!("no node {name:?} is registered in the cluster at {endpoints}: `snat cluster status` lists the nodes");
    };
    let lease = node.value.lease;
    let hex = lease_hex(lease);
    // The node's own timers, published with its record, win where they are stricter.
    let timers = admin::ReleaseTimers::new(r.cooldown, r.fence_margin, node.value.timers);
    if let Some(t) = node.value.timers {
        if (t.cooldown(), t.fence_margin()) != (r.cooldown, r.fence_margin) {
            println!(
                "node {name} runs on --block-cooldown {} --fence-margin {} (its record), this command on {} and {}: using the stricter of each",
                Human(t.cooldown()),
                Human(t.fence_margin()),
                Human(r.cooldown),
                Human(r.fence_margin)
            );
        }
    }
    let margin = Human(timers.fenced_within);
    let ttl = store
        .time_to_live(lease)
        .await
        .with_context(|| format!("reading the time left of node {name}'s lease {hex}"))?;
    let ttl_before = match admin::decide(ttl, timers.fenced_within, r.dead) {
        Verdict::LeaseGone => {
            println!("node {name}'s lease {hex} has ended: its blocks went with it and are free");
            return Ok(());
        }
        Verdict::Refuse { ttl_s } => bail!(
            "node {name} holds lease {hex} with {ttl_s}s left, more than --fence-margin {margin}: its datapath may still translate in its blocks, so they are not released. If the node is powered off, say so with --dead; else wait until its lease is within the margin (or ends: its blocks are then free by themselves)"
        ),
        Verdict::Fenced { ttl_s } => {
            println!("node {name}: lease {hex} has {ttl_s}s left, within --fence-margin {margin}: its datapath has stopped translating in its blocks");
            ttl_s
        }
        Verdict::Dead { ttl_s } => {
            println!("node {name}: lease {hex} has {ttl_s}s left; releasing on --dead (the node sends nothing any more)");
            ttl_s
        }
    };

    // Move the node's blocks under a quarantine lease, until none is left under its own.
    let q_ttl = admin::quarantine_ttl(timers.cooldown, timers.margin);
    let quarantine = store
        .grant(q_ttl)
        .await
        .context("granting the quarantine lease")?;
    let mut snap = snapshot;
    let mut rounds = 0;
    loop {
        let moves = admin::blocks_to_move(&snap, name, lease, quarantine.id);
        if moves.is_empty() {
            break;
        }
        rounds += 1;
        if rounds > MOVE_ROUNDS {
            bail!("node {name} claimed blocks again {MOVE_ROUNDS} times during the release: its agent is alive; the blocks moved so far are quarantined under lease {} and free when it ends, its lease {hex} was not revoked", lease_hex(quarantine.id));
        }
        // Moved or not (a chunk changed under us), the next read says what is left.
        store
            .move_blocks(&moves, lease, quarantine.id)
            .await
            .context("moving the node's blocks under the quarantine lease")?;
        // Read again: a chunk that changed under us, or a block claimed meanwhile.
        snap = store.list().await.context("reading the blocks again")?;
    }
    let moved = under(&snap, quarantine.id);

    if !r.dead {
        // A node that renewed its lease since the check is alive and reaches etcd: put its
        // blocks back under its lease and leave it alone.
        let after = store
            .time_to_live(lease)
            .await
            .with_context(|| format!("reading the time left of lease {hex} again"))?;
        if admin::renewed(ttl_before, after) {
            let back = admin::blocks_to_move(&snap, name, quarantine.id, lease);
            let undone = store.move_blocks(&back, quarantine.id, lease).await;
            let _ = store.revoke(quarantine.id).await;
            return match undone {
                Ok(Moved::Moved { .. }) => Err(anyhow!("node {name} renewed its lease {hex} during the release: its agent is alive and reaches etcd; nothing was released (its {} blocks are back under its lease)", back.len())),
                other => Err(anyhow!("node {name} renewed its lease {hex} during the release: its agent is alive; its blocks could not be put back under its lease ({other:?}): they are free once the node notices (at its next keep-alive) and forgets them")),
            };
        }
    }

    let revoked = store
        .revoke(lease)
        .await
        .with_context(|| format!("revoking node {name}'s lease {hex} (its blocks stay quarantined under lease {} and are free in {q_ttl}s)", lease_hex(quarantine.id)))?;
    if moved.is_empty() {
        let _ = store.revoke(quarantine.id).await;
        println!("node {name} held no blocks");
    } else {
        let list: Vec<String> = moved.iter().map(ToString::to_string).collect();
        println!(
            "quarantined {} block{} ({}) under lease {} for {q_ttl}s (cool-down {} + fence margin {}): no node claims them before it ends",
            moved.len(),
            if moved.len() == 1 { "" } else { "s" },
            list.join(", "),
            lease_hex(quarantine.id),
            Human(timers.cooldown),
            Human(timers.margin),
        );
    }
    match revoked {
        store::Revoked::Revoked => println!("revoked lease {hex}: node {name} is unregistered"),
        store::Revoked::NotFound => {
            println!("lease {hex} had ended meanwhile: node {name} is unregistered");
        }
    }
    if !moved.is_empty() {
        println!("the blocks are free to claim in {q_ttl}s");
    }
    Ok(())
}
