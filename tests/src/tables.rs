//! Synthetic mappings written straight into a running agent's tables, for tests and benchmarks
//! that need many mappings without as many connections. The agent's maps are found by name among
//! the map fds of its process (`/proc/<pid>/fdinfo`) and opened by id.
//!
//! Synthetic mappings are consistent pairs (the forward half's key and NAT endpoint give the
//! reverse half's key, which names the forward half's internal endpoint), as the datapath writes
//! them; the use counts (`SNAT_USE`) and the free-port indexes are not written.

use std::{collections::BTreeMap, net::Ipv4Addr, ops::RangeInclusive, time::Instant};

use anyhow::{anyhow, Context as _};
use aya::maps::{HashMap, Map, MapData, MapError, MapInfo};
use snat_common::{flow::proto, tcp::SEEN_SYN, FlowKey, Mapping, Origin};

use crate::topo::{NAT_IP, SERVER};

/// Synthetic mapping `i`: an established TCP flow from 10.2.x.y to [`SERVER`] through
/// [`NAT_IP`], with unique forward and reverse keys (32,768 NAT ports from 32768 up per remote
/// port, remote ports 443, 444, …). `now` is the agent's clock (`expiry::now_ns`), so it stays
/// until idle for the established timeout.
pub fn synthetic(i: u32, now: u64) -> (FlowKey, Mapping, FlowKey, Origin) {
    let (j, p) = (i / 32768, i % 32768);
    let src = [10, 2 + j as u8, (p >> 8) as u8, p as u8];
    let key = FlowKey::new(
        proto::TCP,
        src,
        40000u16.to_be_bytes(),
        SERVER.octets(),
        (443 + j as u16).to_be_bytes(),
    );
    let mut m = Mapping::new(
        key,
        NAT_IP.octets(),
        ((32768 + p) as u16).to_be_bytes(),
        now,
    );
    m.record(SEEN_SYN);
    let reply = key.reply(m.nat_addr, m.nat_port);
    let mut o = Origin::new(reply, src, key.src_port, now);
    o.record(m.epoch, SEEN_SYN);
    (key, m, reply, o)
}

/// An agent's mapping tables, opened from another process.
pub struct AgentTables {
    pub fwd: HashMap<MapData, FlowKey, Mapping>,
    pub rev: HashMap<MapData, FlowKey, Origin>,
}

impl AgentTables {
    /// The `SNAT_FWD` and `SNAT_REV` of the process `pid`.
    pub fn of_process(pid: u32) -> anyhow::Result<Self> {
        let maps = process_maps(pid)?;
        let id = |name: &str| {
            maps.get(name)
                .map(|&(id, _)| id)
                .ok_or_else(|| anyhow!("process {pid} holds no map {name}: {:?}", maps.keys()))
        };
        Ok(Self {
            fwd: open_hash(id("SNAT_FWD")?)?,
            rev: open_hash(id("SNAT_REV")?)?,
        })
    }

    /// Writes synthetic mappings `0..n` (both halves of each); calls `check` every 65,536 (to
    /// stop early). Returns the seconds it took.
    pub fn fill(
        &mut self,
        n: u32,
        now: u64,
        check: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        fill(&mut self.fwd, &mut self.rev, n, now, check)
    }
}

/// Writes synthetic mappings `0..n` into `fwd` and `rev` (see [`AgentTables::fill`]).
pub fn fill(
    fwd: &mut HashMap<MapData, FlowKey, Mapping>,
    rev: &mut HashMap<MapData, FlowKey, Origin>,
    n: u32,
    now: u64,
    check: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for i in 0..n {
        if i % 65536 == 0 {
            check()?;
        }
        let (key, m, reply, o) = synthetic(i, now);
        rev.insert(reply, o, 0)
            .with_context(|| format!("inserting reverse half {i} of {n}"))?;
        fwd.insert(key, m, 0)
            .with_context(|| format!("inserting forward half {i} of {n}"))?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What [`exhaust_udp`] did: mappings written, and ports found claimed already (left alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exhausted {
    pub written: u32,
    pub already_claimed: u32,
}

/// Synthetic UDP mapping `i` towards `remote` through `nat:nat_port`: from 10.3.x.y port 40000
/// (`x.y` = `i`), an idle UDP flow as the datapath would have made it (UDP keys carry 0 for the
/// remote port: a NAT port is unique per remote IP).
pub fn synthetic_udp(
    i: u16,
    remote: Ipv4Addr,
    nat: Ipv4Addr,
    nat_port: u16,
    now: u64,
) -> (FlowKey, Mapping, FlowKey, Origin) {
    let src = [10, 3, (i >> 8) as u8, i as u8];
    let key = FlowKey::new(
        proto::UDP,
        src,
        40000u16.to_be_bytes(),
        remote.octets(),
        [0; 2],
    );
    let m = Mapping::new(key, nat.octets(), nat_port.to_be_bytes(), now);
    let reply = key.reply(m.nat_addr, m.nat_port);
    let o = Origin::new(reply, src, key.src_port, now);
    (key, m, reply, o)
}

/// Takes every port of `ports` on `nat` towards `remote` for UDP (the remote IP's whole range, as
/// the datapath's port claims would), so a new UDP flow to `remote` finds no port: one synthetic
/// mapping per port that is free. A port already claimed (by a real flow) is left as it is: the
/// claim is the reverse half's insert with `BPF_NOEXIST`, as in the datapath. `now` is the
/// agent's clock (`expiry::now_ns`): the mappings stay until idle for the UDP timeout.
pub fn exhaust_udp(
    fwd: &mut HashMap<MapData, FlowKey, Mapping>,
    rev: &mut HashMap<MapData, FlowKey, Origin>,
    remote: Ipv4Addr,
    nat: Ipv4Addr,
    ports: RangeInclusive<u16>,
    now: u64,
) -> anyhow::Result<Exhausted> {
    const BPF_NOEXIST: u64 = 1;
    let mut done = Exhausted::default();
    for (i, port) in ports.enumerate() {
        let (key, m, reply, o) = synthetic_udp(i as u16, remote, nat, port, now);
        match rev.insert(reply, o, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                done.already_claimed += 1;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("claiming UDP port {port} of {nat}")),
        }
        fwd.insert(key, m, 0)
            .with_context(|| format!("inserting the forward half of UDP port {port} of {nat}"))?;
        done.written += 1;
    }
    Ok(done)
}

/// The eBPF maps a process holds: name → (id, memlock bytes).
pub fn process_maps(pid: u32) -> anyhow::Result<BTreeMap<String, (u32, u64)>> {
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            let name = MapInfo::from_id(id as u32)
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("map {id}"));
            maps.insert(name, (id as u32, memlock));
        }
    }
    Ok(maps)
}

/// The hash map with this id, keyed by flow.
pub fn open_hash<V: aya::Pod>(id: u32) -> anyhow::Result<HashMap<MapData, FlowKey, V>> {
    let data = MapData::from_id(id).with_context(|| format!("opening map {id}"))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}
