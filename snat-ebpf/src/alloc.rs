//! Creating a mapping for a new flow: pick the NAT IP paired with the pod, apply the per-source
//! cap and the fair share, claim a NAT port, then publish the forward entry and count it.
//!
//! The claim is `SNAT_REV.insert(reply_key, origin, BPF_NOEXIST)`: the kernel's hash map makes
//! that insert atomic, so two CPUs can never both own (NAT ip:port, remote) even when they race
//! for the same port. Ports are tried in the order [`snat_common::pool`] documents; the last stage
//! walks the whole range with `bpf_loop`, so a new flow is refused for lack of ports only when
//! every port of the range is taken towards its destination. When the NAT IP is one of the
//! node's own addresses, a port a local socket uses towards the same remote (or listens on) is
//! skipped too (`bpf_sk_lookup_*`), so replies to the node's own sockets are never taken.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    helpers::{
        bpf_get_prandom_u32,
        generated::{bpf_loop, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    },
    programs::TcContext,
};
use snat_common::{
    flow::proto,
    flow::Endpoint,
    pool::{self, RANDOM_TRIES},
    Config, Counter, FlowKey, Mapping, NatIp, Origin, UseKey, MAX_NAT_IPS,
};

use crate::maps::{
    count, use_add, use_of, SNAT_CONFIG, SNAT_ENDPOINTS, SNAT_FWD, SNAT_NAT_IPS, SNAT_REV,
};

/// Why a new flow got no mapping. (No payloads: LLVM merges the error paths and would read an
/// enum payload register the verifier sees uninitialised.)
#[derive(Clone, Copy)]
pub enum AllocError {
    /// No NAT IP is configured.
    NoNatIp,
    /// Every port of the range is taken towards the destination.
    Exhausted,
    /// `SNAT_FWD` or `SNAT_REV` is full (`--max-mappings`).
    TableFull,
    /// The source holds `--max-ports-per-source` mappings on this NAT IP and protocol.
    SourceCap,
    /// The destination is nearly full and the source holds at least its fair share of it.
    FairShare,
}

const EEXIST: i32 = 17;

/// Outcome of trying one port.
enum Claim {
    Won,
    Taken,
    Full,
}

/// Whether a local socket uses `reply`'s NAT port: a TCP socket connected to the same remote
/// endpoint or listening on the port, or a UDP socket bound to it.
#[inline(always)]
fn host_uses(skb: *mut __sk_buff, reply: &FlowKey) -> bool {
    let mut tuple: bpf_sock_tuple = bpf_sock_tuple {
        __bindgen_anon_1: zero_tuple(),
    };
    // SAFETY: writing the IPv4 member of a zeroed plain-data union.
    unsafe {
        let t = &mut tuple.__bindgen_anon_1.ipv4;
        t.saddr = u32::from_ne_bytes(reply.src_addr);
        t.daddr = u32::from_ne_bytes(reply.dst_addr);
        t.sport = u16::from_ne_bytes(reply.src_port);
        t.dport = u16::from_ne_bytes(reply.dst_port);
    }
    let size = size_of::<u32>() as u32 * 3;
    // SAFETY: `skb` is the program's context; `tuple` is a valid IPv4 tuple of `size` bytes.
    let sk = unsafe {
        match reply.proto {
            proto::TCP => bpf_sk_lookup_tcp(
                skb.cast(),
                &raw mut tuple,
                size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            ),
            proto::UDP => bpf_sk_lookup_udp(
                skb.cast(),
                &raw mut tuple,
                size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            ),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` came from a successful lookup and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

#[inline(always)]
const fn zero_tuple() -> aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
    aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
        ipv4: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: 0,
            sport: 0,
            dport: 0,
        },
    }
}

#[inline(always)]
fn claim(skb: *mut __sk_buff, local: bool, reply: &FlowKey, origin: &Origin) -> Claim {
    if SNAT_REV.get_ptr(reply).is_some() {
        return Claim::Taken;
    }
    if local && host_uses(skb, reply) {
        count(Counter::AllocHostPortSkipped);
        return Claim::Taken;
    }
    match SNAT_REV.insert(reply, origin, u64::from(BPF_NOEXIST)) {
        Ok(()) => Claim::Won,
        Err(e) if e == -EEXIST => Claim::Taken,
        Err(_) => Claim::Full,
    }
}

/// State of the exhaustive walk, shared with the `bpf_loop` callback on the stack.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    reply: FlowKey,
    origin: Origin,
    nat: NatIp,
    start: u32,
    /// 0 while walking, 1 when a port was won (in `reply.dst_port`), 2 when a map is full.
    result: u32,
}

/// One step of the walk: try the `i`-th port; stop the loop (return 1) once decided.
extern "C" fn walk_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `walk_range` gave it, to a live `Walk` on the
    // caller's stack, and runs the callback on the same CPU synchronously.
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    w.reply.dst_port = pool::walk(&w.nat, w.start, i as u32).to_be_bytes();
    match claim(w.skb, w.nat.flags & NatIp::LOCAL != 0, &w.reply, &w.origin) {
        Claim::Won => {
            w.result = 1;
            1
        }
        Claim::Taken => 0,
        Claim::Full => {
            w.result = 2;
            1
        }
    }
}

#[inline(always)]
fn walk_range(
    skb: *mut __sk_buff,
    reply: &FlowKey,
    origin: &Origin,
    nat: &NatIp,
) -> Result<[u8; 2], AllocError> {
    let mut w = Walk {
        skb,
        reply: *reply,
        origin: *origin,
        nat: *nat,
        // SAFETY: helper without preconditions.
        start: unsafe { bpf_get_prandom_u32() },
        result: 0,
    };
    // SAFETY: `walk_step` has the callback signature `bpf_loop` expects and only touches `w`,
    // which outlives the call.
    unsafe {
        bpf_loop(
            nat.range_len(),
            walk_step as *mut core::ffi::c_void,
            (&raw mut w).cast(),
            0,
        );
    }
    match w.result {
        1 => Ok(w.reply.dst_port),
        2 => Err(AllocError::TableFull),
        _ => Err(AllocError::Exhausted),
    }
}

/// The live configuration and the NAT IP the internal address `src` is paired with in it.
#[inline(always)]
pub fn nat_ip_for(src: [u8; 4]) -> Result<(Config, NatIp), AllocError> {
    let cfg = *SNAT_CONFIG.get(0).ok_or(AllocError::NoNatIp)?;
    let set = cfg.active & 1;
    let n = *cfg
        .nat_ip_count
        .get(set as usize)
        .ok_or(AllocError::NoNatIp)?;
    if n == 0 || n > MAX_NAT_IPS {
        return Err(AllocError::NoNatIp);
    }
    let idx = set * MAX_NAT_IPS + pool::nat_index(src, n);
    let nat = SNAT_NAT_IPS.get(idx).copied().ok_or(AllocError::NoNatIp)?;
    Ok((cfg, nat))
}

/// Applies `--max-ports-per-source` and `--fair-share` to a new flow whose mapping would add to
/// the counts `uses` (source, destination, pair).
#[inline(always)]
fn admit(cfg: &Config, nat: &NatIp, uses: &[UseKey; 3]) -> Result<(), AllocError> {
    if cfg.max_per_source != 0 && use_of(&uses[0]) >= u64::from(cfg.max_per_source) {
        return Err(AllocError::SourceCap);
    }
    if cfg.fair_share_permille != 0 {
        let range = u64::from(nat.range_len());
        let used = use_of(&uses[1]);
        if used * 1000 >= u64::from(cfg.fair_share_permille) * range {
            // The controller's count of sources towards the destination (at least the one asking;
            // the controller refreshes it every sweep), plus one to keep room for a source that
            // has none yet: alone, a source stops at the threshold.
            let sources = use_of(&UseKey::sources_of(&uses[1])).clamp(1, u64::from(u32::MAX));
            let share = (range / (sources + 1)).max(1);
            if use_of(&uses[2]) >= share {
                return Err(AllocError::FairShare);
            }
        }
    }
    Ok(())
}

/// Claims a NAT port for the flow `fwd` and returns the reply key holding the claim.
#[inline(always)]
fn claim_port(
    skb: *mut __sk_buff,
    fwd: &FlowKey,
    origin: &Origin,
    nat: &NatIp,
) -> Result<FlowKey, AllocError> {
    let local = nat.flags & NatIp::LOCAL != 0;
    let mut reply = fwd.reply(nat.addr, [0; 2]);

    // The NAT port this internal endpoint had towards another destination, if still in range.
    let endpoint = Endpoint {
        addr: fwd.src_addr,
        port: fwd.src_port,
        proto: fwd.proto,
        _pad: 0,
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    if let Some(last) = SNAT_ENDPOINTS.get_ptr(endpoint).map(|p| unsafe { *p }) {
        let port = u16::from_be_bytes(last.port);
        if last.addr == nat.addr && pool::preserved(nat, port).is_some() {
            reply.dst_port = last.port;
            match claim(skb, local, &reply, origin) {
                Claim::Won => {
                    count(Counter::AllocSameEndpoint);
                    return Ok(reply);
                }
                Claim::Taken => {}
                Claim::Full => return Err(AllocError::TableFull),
            }
        }
    }

    if let Some(port) = pool::preserved(nat, u16::from_be_bytes(fwd.src_port)) {
        reply.dst_port = port.to_be_bytes();
        match claim(skb, local, &reply, origin) {
            Claim::Won => {
                count(Counter::AllocPreserved);
                return Ok(reply);
            }
            Claim::Taken => {}
            Claim::Full => return Err(AllocError::TableFull),
        }
    }
    for _ in 0..RANDOM_TRIES {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        reply.dst_port = pool::port_at(nat, r).to_be_bytes();
        match claim(skb, local, &reply, origin) {
            Claim::Won => {
                count(Counter::AllocRandom);
                return Ok(reply);
            }
            Claim::Taken => {}
            Claim::Full => return Err(AllocError::TableFull),
        }
    }
    reply.dst_port = walk_range(skb, &reply, origin, nat)?;
    count(Counter::AllocScan);
    Ok(reply)
}

/// Creates the mapping for the new flow `fwd` (a forward key) at time `now`, or adopts the one
/// another CPU created for the same flow a moment earlier.
#[inline(always)]
pub fn create(
    ctx: &TcContext,
    fwd: &FlowKey,
    tcp_seen: u8,
    now: u64,
) -> Result<Mapping, AllocError> {
    let (cfg, nat) = nat_ip_for(fwd.src_addr)?;
    let uses = UseKey::of_mapping(fwd, nat.addr);
    admit(&cfg, &nat, &uses)?;
    let origin = Origin {
        addr: fwd.src_addr,
        port: fwd.src_port,
        tcp_seen: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let reply = claim_port(ctx.skb.skb, fwd, &origin, &nat)?;
    let mapping = Mapping {
        nat_addr: nat.addr,
        nat_port: reply.dst_port,
        tcp_seen,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    match SNAT_FWD.insert(fwd, mapping, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            use_add(&uses);
            let endpoint = Endpoint {
                addr: fwd.src_addr,
                port: fwd.src_port,
                proto: fwd.proto,
                _pad: 0,
            };
            let nat_end = Endpoint {
                addr: nat.addr,
                port: reply.dst_port,
                proto: fwd.proto,
                _pad: 0,
            };
            let _ = SNAT_ENDPOINTS.insert(endpoint, nat_end, 0);
            Ok(mapping)
        }
        Err(e) => {
            // Give the port back before anything can use it.
            let _ = SNAT_REV.remove(reply);
            if e == -EEXIST {
                count(Counter::AllocRaceLost);
                if let Some(winner) = SNAT_FWD.get_ptr(fwd) {
                    // SAFETY: pointer from a successful lookup; copied out at once.
                    return Ok(unsafe { *winner });
                }
            }
            Err(AllocError::TableFull)
        }
    }
}
