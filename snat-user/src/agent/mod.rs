//! `snat run`: the agent, which wires the layers together. From validated [`Settings`] it binds
//! its sockets, loads and attaches the datapath, then releases idle mappings, serves the control
//! socket and the metrics endpoint until SIGINT/SIGTERM, and leaves the uplink as `--on-stop`
//! says (restoring the host's reserved ports). [`AgentState`] is what the serving tasks reach
//! through [`serve::Agent`]: a report built from a snapshot of its figures, and pool changes.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard,
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cluster::{driver, node::Status},
    datapath::{
        events::ExpiryEvents,
        hairpin::{self, HairpinSync, LinkEvents},
        netdev,
        pins::{self, Pins},
        reservation::HostReservation,
        xdp_features, AttachMode, Counters, Engine, IngressPath, NatPool, Tables, Tables6,
    },
    serve::{
        self,
        access::Refusals,
        control, render,
        report::{Report, Snapshot},
        scrape, PoolChange,
    },
    settings::{
        pod_iface::{self, PodIface},
        EbpfLog, IngressChoice, MetricsAddr, OnStop, Settings,
    },
    tables::{
        expiry::{self, Sweeper},
        usage::{self, Saturation},
        view::{ConnFilter, ViewBuilder},
    },
};

pub mod admin;
mod cluster;
pub mod gateway;

/// What the running agent's tasks share.
pub struct AgentState {
    settings: RwLock<Settings>,
    pool: Mutex<NatPool>,
    /// The loaded programs: the sweeper runs the release program; shutdown detaches.
    engine: Mutex<Engine>,
    /// `ip_local_reserved_ports` as found, restored when dropped.
    reservation: Mutex<Option<HostReservation>>,
    counters: Counters,
    /// Packets the stop guard of the previous agent dropped while no agent ran.
    guard_dropped: Option<u64>,
    tables: Mutex<Tables>,
    sweeper: Mutex<Sweeper<[u8; 4]>>,
    /// The IPv6 mappings (NAT66) and their expiry.
    tables6: Mutex<Tables6>,
    sweeper6: Mutex<Sweeper<[u8; 16]>>,
    /// Keys of mappings whose expiry may have come closer, from the datapath.
    events: Mutex<ExpiryEvents>,
    saturation: Mutex<Saturation>,
    /// Refused control requests, and the control socket's rate-limited log.
    refusals: Refusals,
    /// Cluster mode: the block allocator's latest status (written by its driver).
    cluster: Mutex<Option<Arc<Mutex<Status>>>>,
    /// Where replies are translated, as attached.
    ingress: IngressPath,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentState {
    pub fn settings(&self) -> RwLockReadGuard<'_, Settings> {
        self.settings.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The agent's figures now, with the mapping rows `rows` selects.
    pub fn snapshot(&self, rows: Option<ConnFilter>) -> anyhow::Result<Snapshot> {
        let timeouts = self.settings().timeouts.clone();
        // Each family's tables under its own lock, one after the other (the sweeper's order).
        let mut view = ViewBuilder::new(&timeouts, expiry::now_ns(), rows);
        view.walk(&lock(&self.tables))?;
        view.walk(&lock(&self.tables6))?;
        let view = view.finish();
        Ok(Snapshot {
            view,
            counters: self.counters.read()?,
            exhausted: self.counters.exhausted()?,
            overflowed: self.counters.overflowed()?,
            refused_by_source: self.counters.refused_by_source()?,
            expired: {
                // Both families' releases, by protocol and reason.
                let mut expired = lock(&self.sweeper).expired.clone();
                for (k, n) in &lock(&self.sweeper6).expired {
                    *expired.entry(*k).or_default() += n;
                }
                expired
            },
            saturation: lock(&self.saturation).clone(),
            allocation: self.counters.alloc_histogram()?,
            guard_dropped: self.guard_dropped,
            control_refused: self.refusals.snapshot(&control::Request::NAMES),
            cluster: lock(&self.cluster).as_ref().map(|st| lock(st).clone()),
            ingress: Some(self.ingress.label().to_owned()),
            hairpin: if self.settings().hairpin.is_empty() {
                None
            } else {
                Some(lock(&self.engine).hairpin_ifaces())
            },
        })
    }

    /// Moves new flows to `change`'s range (and NAT IPs, if given); existing mappings keep their
    /// NAT IP and port until they end. Returns what changed and warnings about the new setting.
    fn change_pool(&self, change: &PoolChange) -> anyhow::Result<(String, Vec<String>)> {
        let mut settings = self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if settings.cluster.is_some() {
            anyhow::bail!(
                "refused in cluster mode: the port range and NAT IPs are the cluster's geometry in etcd (/snat/v1/config), and this node's ports are the blocks it leases; change them for the whole cluster (all agents restarted with the new flags), not on one node"
            );
        }
        let range = change.port_range;
        let mut next =
            settings.moved(range, change.nat_ips.as_deref(), change.nat_ips6.as_deref())?;
        next.slice.clone_from(&change.slice);
        lock(&self.pool).set(&next.nat_ips, &next.nat_ips6, range)?;
        let mut warnings = next.warnings();
        if let Some(r) = lock(&self.reservation).as_ref() {
            warnings.extend(r.update(range)?);
        }
        let ips = comma_list(
            &(next.nat_ips.iter().map(ToString::to_string))
                .chain(next.nat_ips6.iter().map(ToString::to_string))
                .collect::<Vec<_>>(),
        );
        let message = match &next.slice {
            Some(slice) => format!("now on {slice}: NAT IPs {ips}, port range {range}"),
            None => format!("port range is now {range} (NAT IPs {ips})"),
        };
        info!(
            "{message} (was NAT IPs {:?} {:?}, port range {})",
            settings.nat_ips, settings.nat_ips6, settings.port_range
        );
        *settings = next;
        Ok((message, warnings))
    }

    /// One expiry tick (the mappings due, or all of them now and then), then the use-count hints
    /// and saturation warnings.
    fn sweep(&self) -> anyhow::Result<()> {
        let settings = self.settings().clone();
        let mut tables = lock(&self.tables);
        let engine = lock(&self.engine);
        // The time first: every event read after it is of a packet after the previous read.
        let now = expiry::now_ns();
        let lost = self.counters.get(snat_common::Counter::ExpiryEventsLost)?;
        let (events, events6) = lock(&self.events).drain();
        lock(&self.sweeper).tick(
            &mut tables,
            &events,
            lost,
            &|batch| engine.release(batch),
            &settings.timeouts,
            now,
        )?;
        lock(&self.sweeper6).tick(
            &mut lock(&self.tables6),
            &events6,
            lost,
            &|batch| engine.release6(batch),
            &settings.timeouts,
            now,
        )?;
        drop(engine);
        usage::refresh(
            &mut tables,
            &mut lock(&self.tables6),
            &settings,
            &mut lock(&self.saturation),
        )?;
        Ok(())
    }
}

impl serve::Agent for AgentState {
    fn report(&self, rows: Option<&ConnFilter>) -> anyhow::Result<Report> {
        let snapshot = self.snapshot(rows.copied())?;
        Ok(Report::build(&self.settings(), snapshot))
    }

    fn set_pool(&self, change: &PoolChange) -> anyhow::Result<(String, Vec<String>)> {
        self.change_pool(change)
    }

    fn refusals(&self) -> &Refusals {
        &self.refusals
    }
}

/// Runs the agent with `settings` (validated, see `settings::Settings::validate`) until
/// SIGINT/SIGTERM.
pub fn run(settings: &Settings) -> anyhow::Result<()> {
    // Cluster mode: the geometry from the flags (checked against the cluster's before attaching).
    let geometry = settings
        .cluster
        .as_ref()
        .map(|c| cluster::geometry(settings, c))
        .transpose()?;
    // Everything was checked before, and every socket is bound, before anything is attached.
    for w in settings.warnings() {
        warn!("{w}");
    }
    let control_listener = control::bind(&settings.iface.name)?;
    if let Some(w) = scrape::exposure_warning(settings.metrics_addr, settings.top_sources) {
        warn!("{w}");
    }
    let metrics_listener = scrape::bind(settings.metrics_addr)?;
    check_ingress(settings)?;

    // State a previous agent pinned is checked before anything changes.
    let (pins, pin_warnings) = Pins::prepare(&settings.pin_dir, &settings.iface.name)?;
    for w in pin_warnings {
        warn!("{w}");
    }
    let existing = pins.existing()?;
    if existing.is_some() {
        info!("taking over the state pinned in {}", pins.dir.display());
    }
    let mut engine =
        Engine::load_with(settings, Some(&pins), existing.as_ref(), geometry.as_ref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Cluster mode: a geometry that disagrees with the cluster's, or a node name another agent
    // holds, aborts here, with nothing attached.
    let blocks = engine.take_blocks()?;
    let etcd = match (&settings.cluster, &geometry, &blocks) {
        (Some(c), Some(g), Some(b)) => {
            let address = cluster::node_address(settings, c)?;
            let store = runtime.block_on(cluster::preflight(c, g, b.restored()?.lease))?;
            Some((store, address))
        }
        _ => None,
    };
    let logger = if settings.ebpf_log == EbpfLog::Off {
        None
    } else {
        Some(
            aya_log::EbpfLogger::init(engine.ebpf_mut())
                .context("starting the kernel log reader")?,
        )
    };
    // The host's own connections keep off the SNAT range while snat runs, if a NAT IP is one of
    // this namespace's addresses.
    let local = netdev::local_ipv4()?;
    let found = existing.as_ref().map(pins::reserved_before);
    let (reservation, reserved_before) = if settings.nat_ips.iter().any(|ip| local.contains(ip)) {
        let (guard, before, warnings) = HostReservation::apply(settings.port_range, found)?;
        for w in warnings {
            warn!("{w}");
        }
        (guard, before)
    } else {
        (None, found.unwrap_or_default())
    };
    let (max, max6) = engine.table_sizes();
    engine.write_state(pins::header(max, max6, &reserved_before))?;
    // Hairpinning: the pods' interfaces are watched from before the first look at them, so none
    // that appears in between is missed.
    let link_events = if settings.hairpin.is_empty() {
        None
    } else {
        Some(LinkEvents::open().context("watching the node's interfaces for --pod-iface")?)
    };
    let mode = engine.attach(settings.attach, settings.ingress)?;
    let ingress = engine.ingress_path();
    if link_events.is_some() {
        if let Some(wanted) = pod_ifaces(&settings.hairpin, settings.iface.index) {
            log_sync(engine.sync_hairpin(&wanted));
        }
        let on = engine.hairpin_ifaces();
        info!(
            "hairpinning on {} interface(s) matching {}{}{}",
            on.len(),
            comma_list(&settings.hairpin),
            if on.is_empty() { "" } else { ": " },
            on.join(", ")
        );
    }
    // A stop guard the previous agent left was replaced by the attach: what did it drop?
    let guard_dropped = pins.take_guard_drops();
    let state = Arc::new(AgentState {
        pool: Mutex::new(engine.take_pool()?),
        counters: engine.take_counters()?,
        guard_dropped,
        tables: Mutex::new(engine.take_tables()?),
        sweeper: Mutex::new(Sweeper::default()),
        tables6: Mutex::new(engine.take_tables6()?),
        sweeper6: Mutex::new(Sweeper::default()),
        events: Mutex::new(engine.take_expiry_events()?),
        saturation: Mutex::new(Saturation::default()),
        refusals: Refusals::default(),
        cluster: Mutex::new(None),
        ingress,
        settings: RwLock::new(settings.clone()),
        reservation: Mutex::new(reservation),
        engine: Mutex::new(engine),
    });
    if let Some(n) = state.guard_dropped {
        info!("took over from the stop guard, which had dropped {n} packets from internal sources while no agent ran");
    }
    if let Some(slice) = &settings.slice {
        info!("running on {slice}");
    }
    info!(
        "snat running on {} ({}, replies through {}): NAT IPs {}, ports {}, internal {}, metrics {}",
        settings.iface.name,
        match mode {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact { .. } => "clsact",
        },
        ingress.label(),
        comma_list(&settings.nat_ips),
        settings.port_range,
        comma_list(&settings.internal),
        match settings.metrics_addr {
            MetricsAddr::On(addr) => format!("http://{addr}/metrics"),
            MetricsAddr::Off => "off".into(),
        },
    );

    let mut running = match (&settings.cluster, geometry, blocks, etcd) {
        (Some(c), Some(g), Some(b), Some((store, address))) => {
            Some(runtime.block_on(cluster::start(state.clone(), c, g, b, store, address))?)
        }
        _ => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (state, stop) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("snat-gc".into())
            .spawn(move || gc_loop(&state, &stop))?
    };
    let pod_ifaces = match link_events {
        Some(events) => {
            let (state, stop) = (state.clone(), stop.clone());
            let (patterns, uplink) = (settings.hairpin.clone(), settings.iface.index);
            Some(
                std::thread::Builder::new()
                    .name("snat-pod-ifaces".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            events.wait(POD_IFACE_POLL);
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            // Listed before the engine is locked (the sweeper needs it).
                            if let Some(wanted) = pod_ifaces(&patterns, uplink) {
                                log_sync(lock(&state.engine).sync_hairpin(&wanted));
                            }
                        }
                    })?,
            )
        }
        None => None,
    };
    let served = runtime.block_on(async {
        if let Some(listener) = metrics_listener {
            let scrapes = scrape::Scrapes::of_agent(settings.metrics_min_interval, state.clone());
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::spawn(scrape::serve(listener, scrapes));
        }
        if let Some(logger) = logger {
            tokio::spawn(read_kernel_log(logger));
        }
        let control = tokio::spawn(control::serve(
            control_listener,
            state.clone(),
            settings.iface.name.clone(),
            settings.control_group.clone(),
        ));
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let driver = async {
            match running.as_mut() {
                Some(r) => (&mut r.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT: stopping"),
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            r = control => return r.map_err(anyhow::Error::from).and_then(|r| r),
            r = driver => {
                running = None;
                return Err(match r {
                    Ok(Err(e)) => e.context("cluster mode"),
                    Ok(Ok(o)) => anyhow::anyhow!("cluster mode ended ({o:?})"),
                    Err(e) => anyhow::Error::from(e).context("cluster mode"),
                });
            }
        }
        Ok::<_, anyhow::Error>(())
    });

    stop.store(true, Ordering::Relaxed);
    gc.thread().unpark();
    let _ = gc.join();
    if let Some(t) = pod_ifaces {
        let _ = t.join();
    }
    if let Some(r) = running.as_mut().filter(|_| settings.keep_state) {
        // The lease and the pinned blocks carry over to the next agent.
        runtime.block_on(r.finish(driver::Stop::Keep));
    }
    stop_datapath(&state, settings, &pins);
    if let Some(r) = running.as_mut().filter(|_| !settings.keep_state) {
        // Nothing translates any more: every block goes back a cool-down from now.
        runtime.block_on(r.finish(driver::Stop::Detached));
    }
    lock(&state.reservation).take();
    let summary = serve::Agent::report(state.as_ref(), None)?;
    if let Some(path) = &settings.stats_file {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing --stats-file {}", path.display()))?;
    }
    info!("final figures:\n{}", render::render_stats(&summary));
    served
}

/// `--ingress xdp-native` on an interface whose driver the kernel says has no native XDP is
/// refused here, before anything is loaded or attached. (A kernel too old to say lets the
/// attach decide.)
fn check_ingress(settings: &Settings) -> anyhow::Result<()> {
    if settings.ingress != IngressChoice::XdpNative {
        return Ok(());
    }
    match xdp_features::native(settings.iface.index) {
        Ok(Some(false)) => anyhow::bail!(
            "--ingress xdp-native: the driver of {} has no native XDP (the kernel's xdp-features of the interface lack basic XDP); use --ingress xdp (generic XDP there) or --ingress tc",
            settings.iface.name
        ),
        Ok(_) => Ok(()),
        Err(e) => {
            warn!(
                "could not ask the kernel whether {} has native XDP ({e}); trying to attach",
                settings.iface.name
            );
            Ok(())
        }
    }
}

/// What a stop leaves on the uplink: everything (`--keep-state`), the stop guard and nothing else
/// (`--on-stop closed`), or nothing (`--on-stop open`). If the guard cannot be put in place, the
/// programs stay attached as with `--keep-state`: the uplink must not open by accident.
fn stop_datapath(state: &AgentState, settings: &Settings, pins: &Pins) {
    let mut engine = lock(&state.engine);
    let keep = if settings.keep_state {
        info!(
            "--keep-state: programs stay attached and state stays pinned in {}",
            pins.dir.display()
        );
        true
    } else if settings.on_stop == OnStop::Closed {
        match engine.leave_guard(pins) {
            Ok(()) => {
                pins.remove_all_but(&[
                    pins.link(snat_common::PROG_EGRESS),
                    pins.map(snat_common::MAP_GUARD_DROPS),
                ]);
                info!(
                    "--on-stop closed: a guard on {} drops traffic from {} to the internet until the next agent starts (or `snat cleanup --iface {}`)",
                    settings.iface.name,
                    comma_list(&settings.internal),
                    settings.iface.name
                );
                false
            }
            Err(e) => {
                error!(
                    "could not leave the stop guard ({e:#}): the programs stay attached and translating, with their state in {}; remove them with `snat cleanup --iface {}`",
                    pins.dir.display(),
                    settings.iface.name
                );
                true
            }
        }
    } else {
        engine.detach();
        pins.remove_all();
        false
    };
    if keep {
        engine.keep_state();
        if let Some(r) = lock(&state.reservation).as_mut() {
            r.keep();
        }
    }
}

/// How long the pod interface watcher waits for a link notification before it looks anyway
/// (and checks whether to stop).
const POD_IFACE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The interfaces matching `patterns` now (never `uplink`), or `None` (warned) if they cannot
/// be listed.
fn pod_ifaces(patterns: &[PodIface], uplink: u32) -> Option<Vec<(String, u32)>> {
    match hairpin::interfaces() {
        Ok(all) => Some(pod_iface::select(patterns, &all, uplink)),
        Err(e) => {
            warn!("listing the node's interfaces for --pod-iface: {e}");
            None
        }
    }
}

/// Logs what a hairpin sync changed.
fn log_sync(sync: HairpinSync) {
    for name in sync.attached {
        log::debug!("hairpinning on {name}");
    }
    for name in sync.gone {
        log::debug!("{name} is gone (hairpinning there ended with it)");
    }
}

/// Releases idle mappings every `--gc-interval` until `stop`.
fn gc_loop(state: &AgentState, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let interval = state.settings().gc_interval;
        std::thread::park_timeout(interval);
        if let Err(e) = state.sweep() {
            error!("expiry sweep failed: {e:#}");
        }
    }
}

/// Forwards kernel log records (`--ebpf-log`) to the agent's log. Polling keeps it simple; the
/// ring buffer holds 128 KiB, far more than 50 ms of debug records.
async fn read_kernel_log(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tick.tick().await;
        logger.flush();
    }
}

/// `snat cleanup`: removes what an agent left pinned for an interface (its programs detach) and
/// restores the reserved ports it recorded.
pub fn cleanup(iface: &str, pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let pins = Pins {
        dir: pin_dir.join(iface),
    };
    if !pins.dir.exists() {
        // A stop guard filter (clsact mode) can outlive pins that lived in a private mount.
        if crate::datapath::remove_guard_filter(iface) {
            return Ok(());
        }
        anyhow::bail!(
            "nothing pinned in {} and no stop guard on {iface}: nothing to remove",
            pins.dir.display()
        );
    }
    // Read what can be read; state of another format is removed all the same.
    let header = pins.existing().ok().flatten();
    if let Some(n) = pins.take_guard_drops() {
        info!(
            "removing the stop guard on {iface}; it had dropped {n} packets from internal sources"
        );
    }
    pins.remove_all();
    let _ = crate::datapath::remove_guard_filter(iface);
    if let Some(h) = header {
        let before = pins::reserved_before(&h);
        if let Err(e) = std::fs::write(
            "/proc/sys/net/ipv4/ip_local_reserved_ports",
            format!("{before}\n"),
        ) {
            warn!("could not restore ip_local_reserved_ports to {before:?}: {e}");
        }
    }
    info!("removed the state pinned in {}", pins.dir.display());
    Ok(())
}

/// `items` as `a,b,c`, the way flags take lists.
fn comma_list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
