//! `snat gateway`: cluster mode's return path. On the box the NAT IPs' traffic reaches, it loads
//! the gateway's datapath ([`Gateway`]) on `--iface`, reads the cluster's geometry and blocks from
//! etcd, follows them with a watch ([`Routes`] turns changes into route changes), and publishes,
//! under a lease of its own, the revision whose routes are in place: nodes open a claimed block
//! only once every registered gateway has published its claim's revision or a later one. Cut
//! off from etcd it says so and keeps its last routes until it reconnects; after a compaction it
//! re-reads the blocks and applies the difference. It serves Prometheus `/metrics`
//! (`--metrics-addr`): its applied, published and the store's revision, whether it reaches etcd,
//! the routes it holds and its datapath's counters.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use log::{debug, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cluster::{
        gateway::{Owner, Routes},
        geometry::{BlockId, Geometry},
        store::{self, Change, Key, Value, WatchEvent},
    },
    datapath::gateway::Gateway,
    serve::{
        metrics::{encode_families, gateway_families, GatewayFigures},
        scrape,
    },
    settings::{cluster::GatewaySettings, AttachChoice, MetricsAddr},
};

/// How often the gateway reads the store's revision (for the lag and the connected gauge).
const REVISION_POLL: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves `/metrics` from the gateway's figures and its datapath's counters (read at each
/// scrape; one read at a time).
fn serve_metrics(
    listener: std::net::TcpListener,
    gw: Arc<Mutex<Gateway>>,
    figures: Arc<Mutex<GatewayFigures>>,
) -> anyhow::Result<()> {
    let scrapes = scrape::Scrapes::new(Duration::ZERO, move |_| {
        let mut f = lock(&figures).clone();
        f.packets = lock(&gw)
            .counters()
            .map_err(|e| format!("reading the gateway's counters: {e}"))?
            .into_iter()
            .map(|(c, n)| (c.name(), n))
            .collect();
        let text = encode_families(gateway_families(&f)).map_err(|e| format!("{e:#}"))?;
        Ok(text.into())
    });
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(scrape::serve(listener, scrapes));
    Ok(())
}

/// The owners of every block of `geometry` in a snapshot.
fn owners(s: &store::Snapshot, geometry: &Geometry) -> Vec<(BlockId, Owner)> {
    s.blocks
        .iter()
        .filter(|(b, _)| geometry.holds(**b))
        .map(|(b, r)| {
            (
                *b,
                Owner {
                    node: r.value.node.clone(),
                    address: r.value.address,
                    epoch: r.create_revision,
                },
            )
        })
        .collect()
}

/// Runs the gateway until SIGINT/SIGTERM.
pub fn run(g: &GatewaySettings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(g))
}

async fn serve(g: &GatewaySettings) -> anyhow::Result<()> {
    let endpoints = g.endpoints.join(",");
    let tls = g.tls.as_ref().map(|t| store::TlsFiles {
        ca: t.ca.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
    });
    let store = store::Store::connect(&g.endpoints, tls.as_ref(), store::Timeouts::default())
        .await
        .with_context(|| format!("--etcd-endpoints {endpoints}"))?;
    if let MetricsAddr::On(a) = g.metrics_addr {
        if !a.ip().is_loopback() {
            warn!("--metrics-addr {a} is not a loopback address: anyone who can reach it can read the gateway's /metrics (NAT IPs' counters, revisions); to restrict it, serve it on loopback behind a local scraper, or firewall the port");
        }
    }
    let metrics_listener = scrape::bind(g.metrics_addr)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // The geometry the first node wrote.
    let (snapshot, geometry) = loop {
        match store.list().await {
            Ok(s) => {
                if let Some(c) = &s.config {
                    let mut geometry: Geometry = serde_json::from_str(&c.value).with_context(|| {
                        format!("the cluster's geometry in /snat/v1/config is not one this gateway reads: {}", c.value)
                    })?;
                    if !g.nat_ips.is_empty() {
                        if let Some(ip) = g.nat_ips.iter().find(|ip| !geometry.nat_ips.contains(ip))
                        {
                            anyhow::bail!(
                                "--nat-ip {ip} is not one of the cluster's NAT IPs ({}): name NAT IPs of the cluster, or leave --nat-ip out to serve them all",
                                geometry.nat_ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                            );
                        }
                        geometry.nat_ips.retain(|ip| g.nat_ips.contains(ip));
                    }
                    break (s, geometry);
                }
                info!(
                    "no cluster geometry in etcd yet (/snat/v1/config): waiting for the first node"
                );
            }
            Err(e) => warn!("etcd ({endpoints}): {e}; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    };
    let capacity = geometry.nat_ips.len() as u32 * u32::from(geometry.blocks_per_ip());
    let mut gw = Gateway::with_capacity(capacity)?;
    gw.set_geometry(&geometry)?;
    let mut routes = Routes::default();
    let ops = routes.reset(snapshot.revision, owners(&snapshot, &geometry));
    gw.apply(&ops)?;
    let mode = gw.attach(&g.iface, AttachChoice::Auto)?;
    let gw = Arc::new(Mutex::new(gw));
    let figures = Arc::new(Mutex::new(GatewayFigures {
        store_revision: snapshot.revision,
        connected: true,
        ..GatewayFigures::default()
    }));
    if let Some(listener) = metrics_listener {
        serve_metrics(listener, gw.clone(), figures.clone())?;
    }
    info!(
        "snat gateway on {} ({mode:?}): NAT IPs {}, ports {}, {} blocks routed at revision {}, metrics {}",
        g.iface,
        geometry
            .nat_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        geometry.port_range,
        routes.table().len(),
        snapshot.revision,
        match g.metrics_addr {
            MetricsAddr::On(addr) => format!("http://{addr}/metrics"),
            MetricsAddr::Off => "off".into(),
        }
    );
    let ttl = g.lease_ttl.as_secs() as i64;
    let mut lease = store
        .grant(ttl)
        .await
        .context("granting the gateway's lease")?
        .id;
    let mut keeper = store.keeper(lease);
    let mut publish = routes.to_publish();
    // The whole prefix, not only the blocks: every revision of the store then reaches the
    // applied revision (changes to other keys route nothing), so its lag behind the store is
    // what is really not yet applied.
    let mut watch = store.watch("", snapshot.revision + 1);
    let mut keepalive = tokio::time::interval(g.lease_ttl / 3);
    keepalive.tick().await;
    let mut poll = tokio::time::interval(REVISION_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected = true;
    let mut published = 0;
    let mut known = false;
    loop {
        if let Some(rev) = publish {
            match store.put_gateway(&g.name, rev, lease).await {
                Ok(_) => {
                    debug!("published applied revision {rev}");
                    publish = None;
                    published = rev;
                    // Known from now on, beyond its lease: cut off longer than the lease,
                    // it is still waited for, so no node uses a block it has not routed.
                    if !known {
                        match store.set_known_gateway(&g.name, true).await {
                            Ok(()) => known = true,
                            Err(e) => warn!("marking the gateway known: {e}"),
                        }
                    }
                }
                Err(e) => warn!("publishing applied revision {rev}: {e}"),
            }
        }
        {
            let mut f = lock(&figures);
            f.applied_revision = routes.applied();
            f.store_revision = f.store_revision.max(routes.applied());
            f.published_revision = published;
            f.routes = routes.table().len() as u64;
            f.connected = connected;
        }
        tokio::select! {
            ev = watch.next() => match ev {
                WatchEvent::Changes { revision, changes } => {
                    let ch: Vec<(BlockId, Option<Owner>)> = changes
                        .into_iter()
                        .filter_map(|c| match c {
                            Change::Put { key: Key::Block(b), record } => match record.value {
                                Value::Block(v) => Some((b, Some(Owner {
                                    node: v.node,
                                    address: v.address,
                                    epoch: record.create_revision,
                                }))),
                                _ => None,
                            },
                            Change::Delete { key: Key::Block(b), .. } => Some((b, None)),
                            _ => None,
                        })
                        .filter(|(b, _)| geometry.holds(*b))
                        .collect();
                    let ops = routes.apply(revision, ch);
                    debug!("revision {revision}: {} route changes", ops.len());
                    if let Err(e) = lock(&gw).apply(&ops) {
                        warn!("applying {} route changes: {e}", ops.len());
                    }
                    publish = routes.to_publish().or(publish);
                }
                WatchEvent::Progress { revision } => {
                    routes.apply(revision, []);
                }
                WatchEvent::Connected { .. } => {
                    if !connected {
                        info!("reconnected to etcd; following the blocks again");
                    }
                    connected = true;
                }
                WatchEvent::Resync { compact_revision } => {
                    info!("the watch fell behind a compaction (revision {compact_revision}): re-reading the blocks");
                    match store.list().await {
                        Ok(s) => {
                            let ops = routes.reset(s.revision, owners(&s, &geometry));
                            if let Err(e) = lock(&gw).apply(&ops) {
                                warn!("applying {} route changes: {e}", ops.len());
                            }
                            publish = routes.to_publish().or(publish);
                            watch.resume_from(s.revision + 1);
                        }
                        Err(e) => warn!("re-reading the blocks: {e}"),
                    }
                }
                WatchEvent::Disconnected { error, retry_in } => {
                    if connected {
                        warn!("cut off from etcd ({error}): keeping the last routes ({} blocks); retrying in {retry_in:?}", routes.table().len());
                    }
                    connected = false;
                }
            },
            _ = keepalive.tick() => match keeper.once().await {
                Ok(0) => {
                    warn!("the gateway's lease ended: registering again");
                    if let Ok(l) = store.grant(ttl).await {
                        lease = l.id;
                        keeper = store.keeper(lease);
                        publish = Some(routes.applied());
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("keeping the gateway's lease: {e}"),
            },
            _ = poll.tick() => match store.revision().await {
                Ok(rev) => {
                    let mut f = lock(&figures);
                    f.store_revision = f.store_revision.max(rev);
                    if !connected {
                        // The watch may take longer to come back: say it once, here or there.
                        info!("reconnected to etcd (it answers again)");
                    }
                    connected = true;
                }
                Err(e) => {
                    if connected {
                        warn!("cut off from etcd ({e}): keeping the last routes ({} blocks)", routes.table().len());
                    }
                    connected = false;
                }
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping: detaching and unregistering");
    lock(&gw).detach();
    // Gone on purpose: the nodes stop waiting for it.
    if let Err(e) = store.set_known_gateway(&g.name, false).await {
        warn!(
            "unregistering {}: {e} (the nodes wait for it until `snat cluster forget-gateway {}`)",
            g.name, g.name
        );
    }
    let _ = store.revoke(lease).await;
    Ok(())
}
