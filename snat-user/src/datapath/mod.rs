//! The loaded datapath: [`Engine`] owns the eBPF object, fills its configuration maps, attaches
//! the programs to the uplink and detaches them again (also on drop), leaving nothing behind but
//! what a stop is asked to leave (pinned state, or the stop guard). The maps it hands out are
//! read through [`Tables`], [`Counters`] and [`NatPool`].

pub mod batch;
pub mod blocks;
pub mod counters;
pub mod error;
pub mod events;
pub mod gateway;
pub mod hairpin;
pub mod nat_pool;
pub mod netdev;
pub mod pins;
pub mod reservation;
pub mod tables;
pub mod xdp_features;

use std::{io, os::fd::AsFd as _, process::Command};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap,
        ProgramArray, RingBuf,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        tc::{self, SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        LinkOrder, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use log::{debug, info, warn};
use snat_common::{
    block::{
        GLOBAL_BLOCK_BASE, GLOBAL_BLOCK_COUNT, GLOBAL_BLOCK_SHIFT, MAP_BLOCKS, MAP_BLOCK_LEASE,
        MAP_OPEN_BLOCKS,
    },
    cidr,
    flow::release_batch,
    maps6, pool, Ipv4Octets, ReleaseEntry, ReleaseEntry6, StateHeader, MAP_ALLOC_NS, MAP_CONFIG,
    MAP_COUNTERS, MAP_ENDPOINTS, MAP_EXCLUDE, MAP_EXHAUSTED, MAP_EXPIRY_EVENTS, MAP_FREE_PORTS,
    MAP_FWD, MAP_GUARD_DROPS, MAP_INTERNAL, MAP_NAT_IPS, MAP_OVERFLOW, MAP_PROGRAMS, MAP_REV,
    MAP_SOURCE_REFUSED, MAP_STATE, MAP_USE, MAX_HOT_DESTINATIONS, PINNED_MAPS, PROG_CREATE,
    PROG_CREATE6, PROG_EGRESS, PROG_EGRESS6, PROG_GUARD, PROG_INGRESS, PROG_INGRESS6, PROG_REJECT6,
    PROG_RELEASE, PROG_RELEASE6, PROG_XDP, SLOT_CREATE, SLOT_CREATE6, SLOT_EGRESS6, SLOT_INGRESS6,
    SLOT_REJECT6, XDP_DONE,
};

use self::error::{no_map, no_program, Doing as _};
use crate::{
    cluster::geometry::Geometry,
    settings::{AttachChoice, IngressChoice, Settings},
};

pub use self::{
    blocks::Blocks,
    counters::{AllocHistogram, Counters},
    error::DatapathError,
    nat_pool::NatPool,
    pins::Pins,
    tables::{Tables, Tables6, TablesOf},
};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/snat"));

/// How a list of networks is checked, for the log.
fn inline_or_trie(count: u32) -> String {
    if count == cidr::IN_TRIE {
        format!(
            "in the LPM trie (more than {} not inside another)",
            cidr::INLINE
        )
    } else {
        format!("inline ({count})")
    }
}

/// How the programs are attached to the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (kernel ≥ 6.6): nothing to clean up but the links.
    Tcx,
    /// cls_bpf filters on a clsact qdisc; `added_qdisc` says whether snat created the qdisc.
    Clsact { added_qdisc: bool },
}

/// Where replies are translated, as attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressPath {
    /// The TC ingress program only.
    Tc,
    /// XDP in the driver, in front of TC.
    XdpNative,
    /// Generic (skb) XDP, in front of TC.
    XdpGeneric,
}

impl IngressPath {
    /// As `status` and the metrics name it: `tc`, `xdp-native`, `xdp-generic`.
    pub const fn label(self) -> &'static str {
        match self {
            IngressPath::Tc => "tc",
            IngressPath::XdpNative => "xdp-native",
            IngressPath::XdpGeneric => "xdp-generic",
        }
    }

    const fn xdp_mode(self) -> XdpMode {
        match self {
            IngressPath::XdpGeneric => XdpMode::Skb,
            _ => XdpMode::Driver,
        }
    }

    /// The name of its pinned link (`Pins::link`): the mode is in it, since a link's mode cannot
    /// change when the next agent swaps its program in.
    const fn link_name(self) -> &'static str {
        match self {
            IngressPath::XdpGeneric => "snat_xdp_generic",
            _ => "snat_xdp_native",
        }
    }

    const XDP: [IngressPath; 2] = [IngressPath::XdpNative, IngressPath::XdpGeneric];
}

/// What `BPF_PROG_TEST_RUN` of the XDP program gave: its action, the frame it left, and the
/// mark it left in front of it for TC (`None`: no metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpRun {
    pub action: u32,
    pub frame: Vec<u8>,
    pub mark: Option<u32>,
}

impl XdpRun {
    /// Whether XDP decided the packet (TC leaves it alone).
    pub fn decided(&self) -> bool {
        self.mark == Some(XDP_DONE)
    }
}

pub struct Engine {
    ebpf: Ebpf,
    /// Where links are pinned (TCX), if state is pinned.
    pins: Option<Pins>,
    /// Where this agent's program array is pinned (with `pins`).
    programs_pin: Option<std::path::PathBuf>,
    /// Leave everything attached and pinned when dropped (`--keep-state`).
    keep: bool,
    pool: Option<NatPool>,
    iface: String,
    mode: Option<AttachMode>,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    /// The XDP program's link, when replies go through XDP.
    xdp: Option<(XdpLinkId, IngressPath)>,
    /// The hairpin program's links on the pods' interfaces (`--hairpin on`).
    hairpin: hairpin::HairpinLinks,
    /// Cluster mode: the geometry the programs were loaded for, and second handles on the
    /// configuration and the refusal counts (which other owners take) for [`Blocks`].
    cluster: Option<(Geometry, Map, Map)>,
    /// The mapping tables' sizes (IPv4, IPv6), as loaded: pinned ones keep theirs.
    sizes: (u32, u32),
}

/// The IPv6 tables' size when pinned ones of size `pinned` are there and the flags want
/// `wanted` (1: no IPv6 internal networks): the pinned size, as for IPv4, unless one of the two
/// is the one-entry placeholder — such tables cannot serve IPv6 pods, and an agent without IPv6
/// networks has no use for big ones — in which case they start afresh (`None`).
fn kept_size6(wanted: u32, pinned: u32) -> Option<u32> {
    (pinned == wanted || (pinned > 1 && wanted > 1)).then_some(pinned)
}

impl Engine {
    /// Loads the programs with maps sized from `settings` and writes the configuration maps.
    /// Nothing is attached yet.
    pub fn load(settings: &Settings) -> Result<Self, DatapathError> {
        Self::load_pinned(settings, None, None)
    }

    /// Like [`Engine::load`], with the mapping tables pinned in `pins` (reused if `existing`
    /// state is there, whose table size then wins over `--max-mappings`).
    pub fn load_pinned(
        settings: &Settings,
        pins: Option<&Pins>,
        existing: Option<&StateHeader>,
    ) -> Result<Self, DatapathError> {
        Self::load_with(settings, pins, existing, None)
    }

    /// Like [`Engine::load_pinned`], in cluster mode when `cluster` is given: the programs are
    /// loaded for its block layout (fixed for their lifetime) and translate only in the blocks
    /// the agent writes through [`Engine::take_blocks`]. `settings` must carry the geometry's
    /// NAT IPs and port range.
    pub fn load_with(
        settings: &Settings,
        pins: Option<&Pins>,
        existing: Option<&StateHeader>,
        cluster: Option<&Geometry>,
    ) -> Result<Self, DatapathError> {
        raise_memlock();
        let log_level = settings.ebpf_log.aya_level();
        let mut max = settings.max_mappings;
        if let Some(h) = existing {
            if h.max_mappings != max {
                warn!("keeping the pinned tables' size of {} mappings (--max-mappings {max} applies after a plain stop)", h.max_mappings);
                max = h.max_mappings;
            }
        }
        let map_paths: Vec<(&str, std::path::PathBuf)> = pins
            .map(|p| PINNED_MAPS.iter().map(|m| (*m, p.map(m))).collect())
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        // The IPv6 tables exist in every agent; without IPv6 internal networks they hold one
        // entry each (an IPv6 mapping costs 2.5 times an IPv4 one: 40-byte keys).
        let wanted6 = if settings.internal6.is_empty() {
            1
        } else {
            settings.max_mappings
        };
        let max6 = match existing.map(|h| (h.max_mappings6, kept_size6(wanted6, h.max_mappings6))) {
            None => wanted6,
            Some((_, Some(kept))) => {
                if kept != wanted6 {
                    warn!("keeping the pinned IPv6 tables' size of {kept} mappings (--max-mappings {wanted6} applies after a plain stop)");
                }
                kept
            }
            Some((pinned, None)) => {
                // IPv6 networks came or went: start the IPv6 tables afresh (the old programs
                // keep theirs until they are replaced).
                for name in [maps6::FWD, maps6::REV, maps6::USE] {
                    if let Some(path) = pins.map(|p| p.map(name)) {
                        if let Err(e) = std::fs::remove_file(&path) {
                            warn!("removing {}: {e}", path.display());
                        }
                    }
                }
                warn!(
                    "the IPv6 mapping tables start empty: the previous agent's held {pinned} entries, this one {} ({})",
                    wanted6,
                    if wanted6 == 1 { "no IPv6 --internal networks now: its IPv6 mappings end" } else { "IPv6 --internal networks are new" }
                );
                wanted6
            }
        };
        let range_len = u32::from(settings.port_range.hi - settings.port_range.lo) + 1;
        loader
            .map_max_entries(maps6::FWD, max6)
            .map_max_entries(maps6::REV, max6)
            .map_max_entries(maps6::USE, max6.saturating_mul(2))
            .map_max_entries(
                maps6::ENDPOINTS,
                if max6 == 1 { 1 } else { (max6 / 4).max(1024) },
            )
            .map_max_entries(
                maps6::FREE_PORTS,
                if max6 == 1 {
                    1
                } else {
                    pool::index::capacity(max6, range_len, MAX_HOT_DESTINATIONS)
                },
            )
            .map_max_entries(MAP_FWD, max)
            .map_max_entries(MAP_REV, max)
            .map_max_entries(MAP_USE, max.saturating_mul(2))
            .map_max_entries(MAP_EXPIRY_EVENTS, events::ring_bytes(max))
            // A hint per internal endpoint: a quarter of the table covers endpoints with four
            // flows on average, and keeps 1 M mappings within 256 MiB.
            .map_max_entries(MAP_ENDPOINTS, (max / 4).max(1024))
            .map_max_entries(
                MAP_FREE_PORTS,
                pool::index::capacity(max, range_len, MAX_HOT_DESTINATIONS),
            );
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The networks checked inline (see `snat_common::cidr`); the tries get them all anyway.
        let inline = |nets: &[crate::settings::cidr::Ipv4Cidr]| {
            let nets: Vec<_> = nets
                .iter()
                .map(|c| (c.addr().octets(), c.prefix_len()))
                .collect();
            cidr::Inline::of(&nets)
        };
        let (internal, exclude) = (inline(&settings.internal), inline(&settings.exclude));
        debug!(
            "internal networks checked {}, excluded ones {}",
            inline_or_trie(internal.count),
            inline_or_trie(exclude.count)
        );
        let layout = cluster.map(blocks::layout);
        let (shift, base, count) =
            layout.map_or((0u32, 0u32, 0u32), |l| (l.shift, l.base, l.count));
        let mut ebpf = loader
            .override_global(aya_log::LEVEL, &log_level, true)
            .override_global(GLOBAL_BLOCK_SHIFT, &shift, true)
            .override_global(GLOBAL_BLOCK_BASE, &base, true)
            .override_global(GLOBAL_BLOCK_COUNT, &count, true)
            .override_global(cidr::GLOBAL_INTERNAL, &internal.pairs, true)
            .override_global(cidr::GLOBAL_INTERNAL_COUNT, &internal.count, true)
            .override_global(cidr::GLOBAL_EXCLUDE, &exclude.pairs, true)
            .override_global(cidr::GLOBAL_EXCLUDE_COUNT, &exclude.count, true)
            .load(EBPF_OBJECT)
            .doing(|| "loading the eBPF object (are you root?)".into())?;
        load_classifiers(
            &mut ebpf,
            &[
                PROG_CREATE,
                PROG_CREATE6,
                PROG_INGRESS,
                PROG_INGRESS6,
                PROG_EGRESS,
                PROG_EGRESS6,
                PROG_RELEASE,
                PROG_RELEASE6,
                PROG_REJECT6,
                PROG_GUARD,
            ],
        )?;
        let xdp: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .ok_or_else(|| no_program(PROG_XDP))?
            .try_into()?;
        xdp.load()
            .doing(|| format!("loading program {PROG_XDP} into the kernel"))?;
        // Egress hands flows without a mapping to the allocation program by a tail call.
        install_tail_call(
            &mut ebpf,
            PROG_CREATE,
            SLOT_CREATE,
            "the allocation program for egress",
        )?;
        // IPv6 runs in programs of its own, which egress and ingress tail-call for every IPv6
        // packet (they pass what is not NAT66's, as before it existed).
        for (name, slot, what) in [
            (PROG_CREATE6, SLOT_CREATE6, "the IPv6 allocation program"),
            (PROG_EGRESS6, SLOT_EGRESS6, "the IPv6 egress program"),
            (PROG_INGRESS6, SLOT_INGRESS6, "the IPv6 ingress program"),
            (PROG_REJECT6, SLOT_REJECT6, "the IPv6 refusal answers"),
        ] {
            install_tail_call(&mut ebpf, name, slot, what)?;
        }
        if !settings.hairpin.is_empty() {
            hairpin::load(&mut ebpf)?;
        }
        // A program array is emptied when its last user reference goes: pinned, it keeps the
        // allocation program reachable while the programs outlive this process. Each agent pins
        // its own (older ones are removed once this one is attached, see `attach`), so an egress
        // program never tail-calls an allocation program of another build.
        let programs_pin = match pins {
            Some(pins) => {
                let path = pins.programs(&unique_suffix());
                ebpf.map_mut(MAP_PROGRAMS)
                    .ok_or_else(|| no_map(MAP_PROGRAMS))?
                    .pin(&path)
                    .doing(|| format!("pinning {MAP_PROGRAMS} at {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let cluster = match cluster {
            Some(g) => Some((
                g.clone(),
                dup(&ebpf, MAP_CONFIG)?,
                dup(&ebpf, MAP_EXHAUSTED)?,
            )),
            None => None,
        };
        let config = Array::try_from(
            ebpf.take_map(MAP_CONFIG)
                .ok_or_else(|| no_map(MAP_CONFIG))?,
        )?;
        let nat_ips = Array::try_from(
            ebpf.take_map(MAP_NAT_IPS)
                .ok_or_else(|| no_map(MAP_NAT_IPS))?,
        )?;
        let nat_ips6 = Array::try_from(
            ebpf.take_map(maps6::NAT_IPS)
                .ok_or_else(|| no_map(maps6::NAT_IPS))?,
        )?;
        let free_ports = HashMap::try_from(
            ebpf.take_map(MAP_FREE_PORTS)
                .ok_or_else(|| no_map(MAP_FREE_PORTS))?,
        )?;
        let free_ports6 = HashMap::try_from(
            ebpf.take_map(maps6::FREE_PORTS)
                .ok_or_else(|| no_map(maps6::FREE_PORTS))?,
        )?;
        let mut engine = Self {
            ebpf,
            sizes: (max, max6),
            pool: Some(NatPool {
                config,
                nat_ips,
                nat_ips6,
                free_ports,
                free_ports6,
            }),
            iface: settings.iface.name.clone(),
            mode: None,
            links: Vec::new(),
            xdp: None,
            hairpin: hairpin::HairpinLinks::default(),
            pins: pins.cloned(),
            programs_pin,
            keep: false,
            cluster,
        };
        engine.configure(settings)?;
        Ok(engine)
    }

    fn configure(&mut self, settings: &Settings) -> Result<(), DatapathError> {
        self.pool.as_mut().ok_or(DatapathError::PoolTaken)?.set(
            &settings.nat_ips,
            &settings.nat_ips6,
            settings.port_range,
        )?;
        self.pool
            .as_mut()
            .ok_or(DatapathError::PoolTaken)?
            .set_policy(&settings.policy)?;
        for (map, cidrs) in [
            (MAP_INTERNAL, &settings.internal),
            (MAP_EXCLUDE, &settings.exclude),
        ] {
            let mut trie: LpmTrie<_, Ipv4Octets, u8> =
                LpmTrie::try_from(self.ebpf.map_mut(map).ok_or_else(|| no_map(map))?)?;
            for c in cidrs {
                trie.insert(
                    &Key::new(u32::from(c.prefix_len()), c.addr().octets()),
                    1,
                    0,
                )
                .doing(|| format!("adding {c} to {map}"))?;
            }
        }
        for (map, cidrs) in [
            (maps6::INTERNAL, &settings.internal6),
            (maps6::EXCLUDE, &settings.exclude6),
        ] {
            let mut trie: LpmTrie<_, [u8; 16], u8> =
                LpmTrie::try_from(self.ebpf.map_mut(map).ok_or_else(|| no_map(map))?)?;
            for c in cidrs {
                trie.insert(
                    &Key::new(u32::from(c.prefix_len()), c.addr().octets()),
                    1,
                    0,
                )
                .doing(|| format!("adding {c} to {map}"))?;
            }
        }
        Ok(())
    }

    /// Attaches ingress, then egress (so replies are translated as soon as mappings exist): with
    /// TCX links, or as cls_bpf filters on a clsact qdisc; `auto` tries TCX first. Then, with
    /// `--ingress xdp…`, the XDP program in front of TC ingress (which keeps translating what XDP
    /// leaves it, and everything while XDP is not there yet).
    pub fn attach(
        &mut self,
        choice: AttachChoice,
        ingress: IngressChoice,
    ) -> Result<AttachMode, DatapathError> {
        let mode = self.attach_tc(choice)?;
        self.attach_xdp(ingress)?;
        if let (Some(pins), Some(ours)) = (&self.pins, &self.programs_pin) {
            pins.remove_other_programs(ours);
        }
        Ok(mode)
    }

    /// Where replies are translated, as attached.
    pub fn ingress_path(&self) -> IngressPath {
        self.xdp.as_ref().map_or(IngressPath::Tc, |(_, path)| *path)
    }

    fn attach_tc(&mut self, choice: AttachChoice) -> Result<AttachMode, DatapathError> {
        if choice != AttachChoice::Clsact {
            match self.attach_all(true) {
                Ok(()) => {
                    self.mode = Some(AttachMode::Tcx);
                    self.attached();
                    return Ok(AttachMode::Tcx);
                }
                Err(e) if choice == AttachChoice::Auto => {
                    warn!(
                        "TCX attach failed ({}); falling back to a clsact qdisc",
                        anyhow::Error::from(e)
                    );
                    self.detach();
                }
                Err(e) => {
                    return Err(DatapathError::NoTcx(Box::new(e)));
                }
            }
        }
        let added_qdisc = match tc::qdisc_add_clsact(&self.iface) {
            Ok(()) => true,
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => {
                return Err(e).doing(|| format!("adding a clsact qdisc to {}", self.iface));
            }
        };
        let mode = AttachMode::Clsact { added_qdisc };
        // Recorded before attaching, so a failure below still removes the qdisc we added.
        self.mode = Some(mode);
        self.attach_all(false)?;
        self.attached();
        Ok(mode)
    }

    /// Once this agent's TC programs run on the uplink: what a previous agent left for the time
    /// without one (a stop guard filter) goes. (Its pinned program array goes once the XDP
    /// program, which may be the previous agent's until then, is replaced too.)
    fn attached(&self) {
        let _ = remove_guard_filter(&self.iface);
    }

    /// Puts the XDP program in front of TC ingress when `choice` asks for it, trying native mode
    /// first for `xdp`: a previous agent's pinned XDP link of an accepted mode gets this
    /// program swapped in (atomically), one of another mode goes (TC ingress, attached already,
    /// translates meanwhile). With `tc`, a previous agent's XDP link goes.
    fn attach_xdp(&mut self, choice: IngressChoice) -> Result<(), DatapathError> {
        let wanted: &[IngressPath] = match choice {
            IngressChoice::Tc => &[],
            IngressChoice::Xdp => &IngressPath::XDP,
            IngressChoice::XdpNative => &[IngressPath::XdpNative],
            IngressChoice::XdpGeneric => &[IngressPath::XdpGeneric],
        };
        let iface = self.iface.clone();
        let pins = self.pins.clone();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_XDP)
            .ok_or_else(|| no_program(PROG_XDP))?
            .try_into()?;
        if let Some(pins) = &pins {
            for path in IngressPath::XDP {
                let pin = pins.link(path.link_name());
                if !pin.exists() {
                    continue;
                }
                if wanted.contains(&path) {
                    info!(
                        "taking over the XDP link ({}) a previous agent pinned at {}",
                        path.label(),
                        pin.display()
                    );
                    let pinned = PinnedLink::from_pin(&pin)
                        .doing(|| format!("opening {}", pin.display()))?;
                    let link = XdpLink::try_from(FdLink::from(pinned))?;
                    let id = prog.attach_to_link(link).doing(|| {
                        "swapping this agent's XDP program into its pinned link".into()
                    })?;
                    self.xdp = Some((id, path));
                    return Ok(());
                }
                info!(
                    "removing a previous agent's XDP program ({}) from {iface}",
                    path.label()
                );
                if let Err(e) = std::fs::remove_file(&pin) {
                    warn!("removing {}: {e}", pin.display());
                }
            }
        }
        let mut failed = None;
        for &path in wanted {
            match prog.attach(&iface, path.xdp_mode()) {
                Ok(id) => {
                    let id = match &pins {
                        Some(pins) => {
                            let pin = pins.link(path.link_name());
                            let link = FdLink::try_from(prog.take_link(id)?)?;
                            link.pin(&pin)
                                .doing(|| format!("pinning the XDP link at {}", pin.display()))?;
                            let pinned = PinnedLink::from_pin(&pin)
                                .doing(|| format!("opening {}", pin.display()))?;
                            prog.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)
                                .doing(|| "taking the pinned XDP link".into())?
                        }
                        None => id,
                    };
                    if failed.is_some() {
                        warn!(
                            "native XDP failed on {iface}, so replies go through generic XDP ({})",
                            failed
                                .map(|e: anyhow::Error| format!("{e:#}"))
                                .unwrap_or_default()
                        );
                    }
                    self.xdp = Some((id, path));
                    return Ok(());
                }
                Err(e) => {
                    failed = Some(anyhow::Error::from(e).context(format!(
                        "attaching {PROG_XDP} to {iface} ({})",
                        path.label()
                    )));
                }
            }
        }
        match failed {
            Some(e) => Err(DatapathError::Xdp(format!("{e:#}"))),
            None => Ok(()),
        }
    }

    fn attach_all(&mut self, tcx: bool) -> Result<(), DatapathError> {
        for (name, kind) in [
            (PROG_INGRESS, TcAttachType::Ingress),
            (PROG_EGRESS, TcAttachType::Egress),
        ] {
            let link_pin = self.pins.as_ref().filter(|_| tcx).map(|p| p.link(name));
            let iface = self.iface.clone();
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| no_program(name))?
                .try_into()?;
            let id = if !tcx {
                // A previous agent's filters (cls_bpf filters outlive their process) give way.
                match tc::qdisc_detach_program(&iface, kind, name) {
                    Ok(()) => info!("replaced a previous agent's {name} filter on {iface}"),
                    Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => warn!("looking for a previous agent's {name} filter on {iface}: {e}"),
                }
                prog.attach_with_options(
                    &iface,
                    kind,
                    TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .doing(|| format!("attaching {name} to {iface} {kind:?}"))?
            } else if let Some(path) = link_pin {
                // The link stays pinned: programs outlive this process until a plain stop.
                if !path.exists() {
                    let id = prog
                        .attach_with_options(
                            &iface,
                            kind,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .doing(|| format!("attaching {name} to {iface} {kind:?}"))?;
                    let link = FdLink::try_from(prog.take_link(id)?)?;
                    link.pin(&path)
                        .doing(|| format!("pinning the {name} link at {}", path.display()))?;
                } else {
                    info!(
                        "taking over the {name} link a previous agent pinned at {}",
                        path.display()
                    );
                }
                // Swap this process's program into the pinned link (atomically, if it was
                // another agent's).
                let pinned =
                    PinnedLink::from_pin(&path).doing(|| format!("opening {}", path.display()))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
                prog.attach_to_link(link)
                    .doing(|| format!("attaching {name} to its pinned link"))?
            } else {
                prog.attach_with_options(
                    &iface,
                    kind,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .doing(|| format!("attaching {name} to {iface} {kind:?}"))?
            };
            self.links.push((name, id));
        }
        Ok(())
    }

    /// Records the format of the pinned state (see `pins`).
    /// The mapping tables' sizes (IPv4, IPv6) as loaded, for the pinned state's header.
    pub fn table_sizes(&self) -> (u32, u32) {
        self.sizes
    }

    pub fn write_state(&mut self, header: StateHeader) -> Result<(), DatapathError> {
        let mut state: Array<_, StateHeader> = Array::try_from(
            self.ebpf
                .map_mut(MAP_STATE)
                .ok_or_else(|| no_map(MAP_STATE))?,
        )?;
        state.set(0, header, 0)?;
        Ok(())
    }

    /// Stops translating but keeps the uplink closed: the stop guard (`snat_guard`) takes the
    /// egress program's place — atomically, in the pinned TCX link, or as a cls_bpf filter added
    /// before the egress filter goes — and stays when this process exits; ingress is detached.
    /// Its drop counter is pinned in `pins` so the next agent can report it. The next agent (or
    /// `snat cleanup`) removes the guard.
    pub fn leave_guard(&mut self, pins: &Pins) -> Result<(), DatapathError> {
        let counter = self
            .ebpf
            .map_mut(MAP_GUARD_DROPS)
            .ok_or_else(|| no_map(MAP_GUARD_DROPS))?;
        let path = pins.map(MAP_GUARD_DROPS);
        let _ = std::fs::remove_file(&path);
        counter
            .pin(&path)
            .doing(|| format!("pinning the guard's counter at {}", path.display()))?;
        let iface = self.iface.clone();
        let guard: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_GUARD)
            .ok_or_else(|| no_program(PROG_GUARD))?
            .try_into()?;
        match self.mode {
            Some(AttachMode::Tcx) => {
                let link = pins.link(PROG_EGRESS);
                let pinned =
                    PinnedLink::from_pin(&link).doing(|| format!("opening {}", link.display()))?;
                guard
                    .attach_to_link(SchedClassifierLink::try_from(FdLink::from(pinned))?)
                    .doing(|| "swapping the stop guard into the egress link".into())?;
                // The link stays pinned (with the guard in it); only its entry here goes.
                self.links.retain(|(name, _)| *name != PROG_EGRESS);
            }
            Some(AttachMode::Clsact { .. }) => {
                let id = guard
                    .attach_with_options(
                        &iface,
                        TcAttachType::Egress,
                        TcAttachOptions::Netlink(tc::NlOptions::default()),
                    )
                    .doing(|| format!("attaching the stop guard to {iface} egress"))?;
                // A cls_bpf filter outlives this process unless its link is dropped here.
                std::mem::forget(guard.take_link(id)?);
                // The qdisc holds the guard now: it stays.
                self.mode = Some(AttachMode::Clsact { added_qdisc: false });
            }
            None => {}
        }
        self.detach();
        Ok(())
    }

    /// On drop, leave the programs attached and the state pinned for the next agent.
    pub fn keep_state(&mut self) {
        self.keep = true;
    }

    /// Detaches every program (the hairpin program, XDP, then egress, then TC ingress) and
    /// removes the clsact qdisc if snat added it.
    pub fn detach(&mut self) {
        self.detach_hairpin();
        if let Some((id, path)) = self.xdp.take() {
            if let Some(pins) = &self.pins {
                // Unpinned first, or the link (and the program) would stay.
                let _ = std::fs::remove_file(pins.link(path.link_name()));
            }
            let prog: Option<&mut Xdp> = self
                .ebpf
                .program_mut(PROG_XDP)
                .and_then(|p| p.try_into().ok());
            if let Some(prog) = prog {
                if let Err(e) = prog.detach(id) {
                    warn!("detaching {PROG_XDP} from {}: {e}", self.iface);
                }
            }
        }
        while let Some((name, id)) = self.links.pop() {
            if let Some(pins) = &self.pins {
                // Unpinned first, or the link (and the program) would stay.
                let _ = std::fs::remove_file(pins.link(name));
            }
            let prog: Option<&mut SchedClassifier> =
                self.ebpf.program_mut(name).and_then(|p| p.try_into().ok());
            if let Some(prog) = prog {
                if let Err(e) = prog.detach(id) {
                    warn!("detaching {name} from {}: {e}", self.iface);
                }
            }
        }
        if let Some(AttachMode::Clsact { added_qdisc: true }) = self.mode.take() {
            match Command::new("tc")
                .args(["qdisc", "del", "dev", &self.iface, "clsact"])
                .status()
            {
                Ok(s) if s.success() => debug!("removed the clsact qdisc from {}", self.iface),
                other => warn!(
                    "could not remove the clsact qdisc snat added to {}: {other:?}",
                    self.iface
                ),
            }
        }
    }

    pub fn take_tables(&mut self) -> Result<Tables, DatapathError> {
        let fwd = self.ebpf.take_map(MAP_FWD).ok_or_else(|| no_map(MAP_FWD))?;
        let rev = self.ebpf.take_map(MAP_REV).ok_or_else(|| no_map(MAP_REV))?;
        let usage = self.ebpf.take_map(MAP_USE).ok_or_else(|| no_map(MAP_USE))?;
        Ok(Tables {
            fwd: HashMap::try_from(fwd)?,
            rev: HashMap::try_from(rev)?,
            usage: HashMap::try_from(usage)?,
        })
    }

    /// The IPv6 tables (`SNAT_FWD6`, `SNAT_REV6`, `SNAT_USE6`).
    pub fn take_tables6(&mut self) -> Result<Tables6, DatapathError> {
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| no_map(name));
        Ok(Tables6 {
            fwd: HashMap::try_from(take(maps6::FWD)?)?,
            rev: HashMap::try_from(take(maps6::REV)?)?,
            usage: HashMap::try_from(take(maps6::USE)?)?,
        })
    }

    /// The expiry events the datapath sends the controller.
    pub fn take_expiry_events(&mut self) -> Result<events::ExpiryEvents, DatapathError> {
        let ring = self
            .ebpf
            .take_map(MAP_EXPIRY_EVENTS)
            .ok_or_else(|| no_map(MAP_EXPIRY_EVENTS))?;
        Ok(events::ExpiryEvents::new(RingBuf::try_from(ring)?))
    }

    pub fn take_counters(&mut self) -> Result<Counters, DatapathError> {
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| no_map(name));
        Ok(Counters {
            packets: PerCpuArray::try_from(take(MAP_COUNTERS)?)?,
            source_refused: HashMap::try_from(take(MAP_SOURCE_REFUSED)?)?,
            source_refused6: HashMap::try_from(take(maps6::SOURCE_REFUSED)?)?,
            exhausted: PerCpuHashMap::try_from(take(MAP_EXHAUSTED)?)?,
            exhausted6: PerCpuHashMap::try_from(take(maps6::EXHAUSTED)?)?,
            overflowed: PerCpuHashMap::try_from(take(MAP_OVERFLOW)?)?,
            overflowed6: PerCpuHashMap::try_from(take(maps6::OVERFLOW)?)?,
            alloc_ns: PerCpuArray::try_from(take(MAP_ALLOC_NS)?)?,
        })
    }

    /// Cluster mode: the block table, its open lists and lease (`None` outside cluster mode).
    pub fn take_blocks(&mut self) -> Result<Option<Blocks>, DatapathError> {
        let Some((geometry, config, exhausted)) = self.cluster.take() else {
            return Ok(None);
        };
        let mut take = |name: &str| self.ebpf.take_map(name).ok_or_else(|| no_map(name));
        Blocks::new(
            geometry,
            HashMap::try_from(take(MAP_BLOCKS)?)?,
            HashMap::try_from(take(MAP_OPEN_BLOCKS)?)?,
            Array::try_from(take(MAP_BLOCK_LEASE)?)?,
            Array::try_from(config)?,
            PerCpuHashMap::try_from(exhausted)?,
        )
        .map(Some)
    }

    /// The NAT IP set and port range, for changing them while running.
    pub fn take_pool(&mut self) -> Result<NatPool, DatapathError> {
        self.pool.take().ok_or(DatapathError::PoolTaken)
    }

    /// Runs program `name` once on `packet` with `BPF_PROG_TEST_RUN` (nothing needs to be
    /// attached) and returns its TC action and the packet as the program left it.
    pub fn test_run(&self, name: &str, packet: &[u8]) -> Result<(i32, Vec<u8>), DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or_else(|| no_program(name))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .doing(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Runs the XDP program once on `packet` with `BPF_PROG_TEST_RUN` (nothing needs to be
    /// attached): its action, the frame it left, and its mark for TC.
    pub fn test_run_xdp(&self, packet: &[u8]) -> Result<XdpRun, DatapathError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROG_XDP)
            .ok_or_else(|| no_program(PROG_XDP))?
            .try_into()?;
        // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; the kernel wants data_end to be the frame's length.
        let mut ctx_in = [0u8; 24];
        ctx_in[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        let mut ctx_out = [0u8; 24];
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .doing(|| format!("BPF_PROG_TEST_RUN of {PROG_XDP}"))?;
        out.truncate(result.data_size_out as usize);
        // The output starts at the metadata; `data` is its length.
        let meta = u32::from_ne_bytes([ctx_out[0], ctx_out[1], ctx_out[2], ctx_out[3]]) as usize;
        let mark = (meta == 4 && out.len() >= 4)
            .then(|| u32::from_ne_bytes([out[0], out[1], out[2], out[3]]));
        Ok(XdpRun {
            action: result.return_value,
            frame: out.get(meta..).unwrap_or_default().to_vec(),
            mark,
        })
    }

    /// Removes the mappings of `entries` that are still as idle as when they were read, with
    /// the kernel's release program, and fills in each entry's result.
    pub fn release(&self, entries: &mut [ReleaseEntry]) -> Result<(), DatapathError> {
        self.release_with(PROG_RELEASE, entries)
    }

    /// [`Engine::release`] for IPv6 mappings (`snat_release6`).
    pub fn release6(&self, entries: &mut [ReleaseEntry6]) -> Result<(), DatapathError> {
        self.release_with(PROG_RELEASE6, entries)
    }

    /// Runs the release program `prog` over `entries`, a batch at a time.
    fn release_with<E: bytemuck::Pod>(
        &self,
        prog: &str,
        entries: &mut [E],
    ) -> Result<(), DatapathError> {
        let size = size_of::<E>();
        for chunk in entries.chunks_mut(release_batch::MAX_ENTRIES as usize) {
            let mut data = vec![0u8; release_batch::ENTRIES_OFFSET + size_of_val(chunk)];
            // An EtherType of local experiments: BPF_PROG_TEST_RUN wants an Ethernet frame.
            data[12..14].copy_from_slice(&[0x88, 0xb5]);
            data[release_batch::COUNT_OFFSET..release_batch::COUNT_OFFSET + 4]
                .copy_from_slice(&(chunk.len() as u32).to_ne_bytes());
            for (i, e) in chunk.iter().enumerate() {
                let at = release_batch::ENTRIES_OFFSET + i * size;
                data[at..at + size].copy_from_slice(bytemuck::bytes_of(e));
            }
            let (_, out) = self.test_run(prog, &data)?;
            for (i, e) in chunk.iter_mut().enumerate() {
                let at = release_batch::ENTRIES_OFFSET + i * size;
                let bytes = out.get(at..at + size).ok_or(DatapathError::ShortBatch)?;
                *e = bytemuck::pod_read_unaligned(bytes);
            }
        }
        Ok(())
    }

    /// The eBPF object, for the kernel log reader.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.keep {
            info!(
                "left attached to {}: state kept for the next agent",
                self.iface
            );
            return;
        }
        self.detach();
        info!("detached from {}", self.iface);
    }
}

/// A second handle (a duplicated file descriptor) on a map's data.
fn dup_map(data: &MapData, name: &str) -> Result<MapData, DatapathError> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .doing(|| format!("duplicating the descriptor of {name}"))?;
    Ok(MapData::from_fd(fd)?)
}

/// Loads the TC programs `names` into the kernel.
fn load_classifiers(ebpf: &mut Ebpf, names: &[&str]) -> Result<(), DatapathError> {
    for &name in names {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| no_program(name))?
            .try_into()?;
        prog.load()
            .doing(|| format!("loading program {name} into the kernel"))?;
    }
    Ok(())
}

/// Puts the loaded program `name` (`what`, for errors) in `slot` of `SNAT_PROGRAMS`, for the
/// programs that tail-call it.
fn install_tail_call(
    ebpf: &mut Ebpf,
    name: &str,
    slot: u32,
    what: &str,
) -> Result<(), DatapathError> {
    let prog: &SchedClassifier = ebpf
        .program(name)
        .ok_or_else(|| no_program(name))?
        .try_into()?;
    let fd = prog.fd()?.try_clone()?;
    let mut programs: ProgramArray<_> = ProgramArray::try_from(
        ebpf.map_mut(MAP_PROGRAMS)
            .ok_or_else(|| no_map(MAP_PROGRAMS))?,
    )?;
    programs
        .set(slot, &fd, 0)
        .doing(|| format!("installing {what}"))?;
    Ok(())
}

/// A second handle on the map `name`, still in `ebpf`.
fn dup(ebpf: &Ebpf, name: &str) -> Result<Map, DatapathError> {
    match ebpf.map(name).ok_or_else(|| no_map(name))? {
        Map::PerCpuHashMap(d) => Ok(Map::PerCpuHashMap(dup_map(d, name)?)),
        Map::HashMap(d) => Ok(Map::HashMap(dup_map(d, name)?)),
        Map::Array(d) => Ok(Map::Array(dup_map(d, name)?)),
        _ => Err(no_map(name)),
    }
}

/// A suffix no other agent's pins have: the time in nanoseconds and the process id (which alone
/// repeats across containers).
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}_{}", std::process::id())
}

/// Removes a stop guard a previous agent left on `iface` as a cls_bpf filter (`--attach
/// clsact`): done once this agent's egress program runs before it, or by `snat cleanup`. (In a
/// TCX link the guard goes with the link's pin, or is replaced by the next agent's swap.)
/// Returns whether there was one.
pub fn remove_guard_filter(iface: &str) -> bool {
    match tc::qdisc_detach_program(iface, TcAttachType::Egress, PROG_GUARD) {
        Ok(()) => {
            info!("removed the stop guard filter from {iface}");
            true
        }
        Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            warn!("looking for a stop guard filter on {iface}: {e}");
            false
        }
    }
}

/// Maps are charged to the memory cgroup on current kernels; older ones need RLIMIT_MEMLOCK.
/// Raising it may be refused (no CAP_SYS_RESOURCE): carry on, the load says if it mattered.
fn raise_memlock() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::kept_size6;

    #[test]
    fn pinned_ipv6_tables_keep_their_size_unless_ipv6_networks_came_or_went() {
        // As IPv4: the pinned size wins over --max-mappings.
        assert_eq!(kept_size6(4096, 4096), Some(4096));
        assert_eq!(kept_size6(8192, 4096), Some(4096));
        // Still no IPv6 networks: the placeholder stays.
        assert_eq!(kept_size6(1, 1), Some(1));
        // IPv6 networks are new: a one-entry table cannot serve them.
        assert_eq!(kept_size6(4096, 1), None);
        // IPv6 networks are gone: their mappings end with the big tables.
        assert_eq!(kept_size6(1, 4096), None);
    }
}
