//! Creating a mapping for a new flow: pick the NAT IP paired with the pod, apply the per-source
//! cap and the fair share, claim a NAT port, then publish the forward entry and count it.
//!
//! The claim is `SNAT_REV.insert(reply_key, origin, BPF_NOEXIST)`: the kernel's hash map makes
//! that insert atomic, so two CPUs can never both own (NAT ip:port, remote) even when they race
//! for the same port. Ports are tried in the order [`snat_common::pool`] documents; the last stage
//! walks the whole range with `bpf_loop`, so a new flow is refused for lack of ports only when
//! every port of the range is taken towards its destination. In front of the walk, a destination
//! whose range is nearly full gets a free-port index (`crate::index`) that finds one of its last
//! free ports in a few reads, so the cost of a new mapping does not grow with occupancy. When
//! the NAT IP is one of the node's own addresses, a port a local socket uses towards the same
//! remote (or listens on) is skipped too (`bpf_sk_lookup_*`), so replies to the node's own
//! sockets are never taken.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    helpers::{
        bpf_get_prandom_u32,
        generated::{bpf_loop, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use snat_common::{
    flow::proto,
    flow::Endpoint,
    pool::{
        self,
        index::{
            lowest_marked, mark_if_nonzero, marked_bytes, BLOCK, BLOCKS, BLOCKS_PER_WORD, PORTS,
            WORDS,
        },
        RANDOM_TRIES,
    },
    Config, Counter, FlowKey, Mapping, NatIp, Origin, UseKey, MAX_NAT_IPS,
};

use crate::{
    index::{self, FreePorts},
    maps::{count, use_add, use_of, SNAT_CONFIG, SNAT_ENDPOINTS, SNAT_FWD, SNAT_NAT_IPS, SNAT_REV},
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

/// Claims `reply`'s NAT port for `origin`. `probe`: look the port up first, which is cheaper
/// than a failed insert where most ports are taken (the walk) and a wasted lookup elsewhere.
#[inline(always)]
fn claim(skb: *mut __sk_buff, local: bool, reply: &FlowKey, origin: &Origin, probe: bool) -> Claim {
    if probe && SNAT_REV.get_ptr(reply).is_some() {
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

/// State of a scan of the range (the index search, then the walk), shared with the `bpf_loop`
/// callbacks: pointers on the stack (the verifier does not let a program store pointers in a
/// map), the rest in the per-CPU `SNAT_SCAN` (the stack is nearly full at this depth; a TC
/// program runs to completion on its CPU, so one slot per CPU suffices). Only the port and the
/// result change during a loop (each step reads where it is from the loop's index): a counter
/// kept in state would make the verifier follow every iteration separately.
#[repr(C)]
struct Scan {
    skb: *mut __sk_buff,
    /// The destination's free-port index (search only).
    index: *mut FreePorts,
    state: *mut ScanState,
}

#[repr(C)]
pub struct ScanState {
    reply: FlowKey,
    origin: Origin,
    nat: NatIp,
    /// Random: the search's first summary word (`0..words`); the walk's starting offset into
    /// the range (any `u32`, reduced modulo its length).
    start: u32,
    /// 0 while scanning, 1 when a port was found (in `reply.dst_port`), 2 when a map is full.
    result: u32,
}

#[map]
static SNAT_SCAN: PerCpuArray<ScanState> = PerCpuArray::with_max_entries(1, 0);

/// One step of the walk: try the `i`-th port; stop the loop (return 1) once decided.
extern "C" fn walk_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `walk_range` gave it, to a live `Scan` on the
    // caller's stack, and runs the callback on the same CPU synchronously; `state` points to
    // this CPU's `SNAT_SCAN` slot.
    let scan = unsafe { &*ctx.cast::<Scan>() };
    // SAFETY: as above.
    let st = unsafe { &mut *scan.state };
    st.reply.dst_port = pool::walk(&st.nat, st.start, i as u32).to_be_bytes();
    match claim(
        scan.skb,
        st.nat.flags & NatIp::LOCAL != 0,
        &st.reply,
        &st.origin,
        true,
    ) {
        Claim::Won => {
            st.result = 1;
            1
        }
        Claim::Taken => 0,
        Claim::Full => {
            st.result = 2;
            1
        }
    }
}

#[inline(always)]
fn walk_range(scan: &mut Scan) -> Result<[u8; 2], AllocError> {
    // SAFETY: as in `walk_step`.
    let st = unsafe { &mut *scan.state };
    st.result = 0;
    // SAFETY: helper without preconditions.
    st.start = unsafe { bpf_get_prandom_u32() };
    // SAFETY: `walk_step` has the callback signature `bpf_loop` expects and only touches
    // `scan` and what it points to, which outlive the call.
    unsafe {
        bpf_loop(
            st.nat.range_len(),
            walk_step as *mut core::ffi::c_void,
            core::ptr::from_mut(scan).cast(),
            0,
        );
    }
    match st.result {
        1 => Ok(st.reply.dst_port),
        2 => Err(AllocError::TableFull),
        _ => Err(AllocError::Exhausted),
    }
}

/// Reads the `u64` at byte `offset` of `bytes`.
///
/// # Safety
/// `bytes` points into a live map value, 8-aligned, with at least `offset + 8` bytes.
#[inline(always)]
unsafe fn word_at(bytes: *const u8, offset: usize) -> u64 {
    // SAFETY: per the caller's contract.
    unsafe { core::ptr::read(bytes.add(offset).cast::<u64>()) }
}

/// Step `i` of the search: in the `i`-th summary word from the start, take the first block
/// marked free that has a port marked free, and its first such port. A block found empty has
/// its mark cleared; so has a port outside the range (left from a wider range), and the search
/// moves on to the next word. (The port is tried by the caller: a claim here would need a
/// deeper stack than the program has left.)
extern "C" fn search_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `search` gave it, to a live `Scan`, whose
    // `state` points to this CPU's `SNAT_SCAN` slot.
    let scan = unsafe { &*ctx.cast::<Scan>() };
    // SAFETY: as above.
    let s = unsafe { &mut *scan.state };
    let (first, words) = pool::index::words(s.nat.port_min, s.nat.port_max);
    let mut w = s.start + i as u32;
    if w >= words {
        w -= words;
    }
    let w = (first + w) as usize & (WORDS as usize - 1);
    // SAFETY: `scan.index` points to a live, 8-aligned `FreePorts`; every offset below is
    // masked into its array and a multiple of 8.
    let ix = unsafe { &mut *scan.index };
    // SAFETY: as above.
    let mut blocks = marked_bytes(unsafe { word_at(ix.block.as_ptr(), w * 8) });
    // The word's blocks in order; a block marked but found empty loses its mark.
    for _ in 0..BLOCKS_PER_WORD {
        if blocks == 0 {
            return 0;
        }
        let j = lowest_marked(blocks);
        blocks &= !(0x80 << (8 * j));
        let block = (w * 8 + j as usize) & (BLOCKS - 1);
        let base = block * BLOCK as usize;
        let mut marks = 0;
        for k in 0..(BLOCK / 8) {
            // SAFETY: as above (`base + 8 * k + 8 <= PORTS`).
            let word = unsafe { word_at(ix.port.as_ptr(), base + 8 * k as usize) };
            marks |= mark_if_nonzero(word, k);
        }
        if marks != 0 {
            let at = base + 8 * lowest_marked(marks) as usize;
            // SAFETY: as above.
            let byte = lowest_marked(marked_bytes(unsafe { word_at(ix.port.as_ptr(), at) }));
            let port = (at + byte as usize) & (PORTS - 1);
            let port16 = port as u16;
            if port16 < s.nat.port_min || port16 > s.nat.port_max {
                // Left from a wider range: never offered again. (Moving on to the word's next
                // block here instead makes the verifier's walk of this loop too long.)
                ix.port[port] = 0;
                return 0;
            }
            s.reply.dst_port = port16.to_be_bytes();
            s.result = 1;
            return 1;
        }
        ix.block[block] = 0;
    }
    0
}

/// A port of the range that `scan.index` marks free, if any.
#[inline(always)]
fn search(scan: &mut Scan) -> Option<[u8; 2]> {
    // SAFETY: as in `search_step`.
    let st = unsafe { &mut *scan.state };
    let (_, words) = pool::index::words(st.nat.port_min, st.nat.port_max);
    st.result = 0;
    // SAFETY: helper without preconditions.
    st.start = unsafe { bpf_get_prandom_u32() } % words.max(1);
    // SAFETY: `search_step` has the callback signature `bpf_loop` expects and only touches
    // `scan` and the index it points to, which outlive the call.
    unsafe {
        bpf_loop(
            words,
            search_step as *mut core::ffi::c_void,
            core::ptr::from_mut(scan).cast(),
            0,
        );
    }
    (st.result == 1).then_some(st.reply.dst_port)
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

/// Claims a NAT port for the flow `fwd`, whose destination count is `dest`, and returns the
/// reply key holding the claim; records the claim in the destination's free-port index.
#[inline(always)]
fn claim_port(
    skb: *mut __sk_buff,
    fwd: &FlowKey,
    origin: &Origin,
    nat: &NatIp,
    dest: &UseKey,
) -> Result<FlowKey, AllocError> {
    let reply = fwd.reply(nat.addr, [0; 2]);
    let mut hot = index::of(&reply);
    let claimed = find_port(skb, fwd, origin, nat, dest, &mut hot)?;
    if let Some(ix) = hot {
        index::taken(ix, u16::from_be_bytes(claimed.dst_port));
    }
    Ok(claimed)
}

/// Claims a port in the order [`pool`] documents, the destination's free-port index `hot`
/// (built here when the destination turns hot) standing in front of the walk.
#[inline(always)]
fn find_port(
    skb: *mut __sk_buff,
    fwd: &FlowKey,
    origin: &Origin,
    nat: &NatIp,
    dest: &UseKey,
    hot: &mut Option<*mut FreePorts>,
) -> Result<FlowKey, AllocError> {
    let local = nat.flags & NatIp::LOCAL != 0;
    let mut reply = fwd.reply(nat.addr, [0; 2]);
    let len = nat.range_len();

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
            match claim(skb, local, &reply, origin, false) {
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
        match claim(skb, local, &reply, origin, false) {
            Claim::Won => {
                count(Counter::AllocPreserved);
                return Ok(reply);
            }
            Claim::Taken => {}
            Claim::Full => return Err(AllocError::TableFull),
        }
    }
    // Random ports keep the choice unpredictable (RFC 6056) while the range is not nearly full;
    // past that, the index finds a port for less than the random tries would fail for.
    let indexed_and_hot = hot.is_some() && pool::index::is_hot(use_of(dest), len);
    if !indexed_and_hot {
        for _ in 0..RANDOM_TRIES {
            // SAFETY: helper without preconditions.
            let r = unsafe { bpf_get_prandom_u32() };
            reply.dst_port = pool::port_at(nat, r).to_be_bytes();
            match claim(skb, local, &reply, origin, false) {
                Claim::Won => {
                    count(Counter::AllocRandom);
                    return Ok(reply);
                }
                Claim::Taken => {}
                Claim::Full => return Err(AllocError::TableFull),
            }
        }
        if hot.is_none() && pool::index::is_hot(use_of(dest), len) {
            *hot = index::build(&reply, nat.port_min, len);
        }
    }
    let state = SNAT_SCAN.get_ptr_mut(0).ok_or(AllocError::Exhausted)?;
    // SAFETY: this CPU's slot, used by this program only until it returns.
    unsafe {
        *state = ScanState {
            reply,
            origin: *origin,
            nat: *nat,
            start: 0,
            result: 0,
        };
    }
    let mut scan = Scan {
        skb,
        index: core::ptr::null_mut(),
        state,
    };
    if let Some(ix) = *hot {
        scan.index = ix;
        if let Some(port) = search(&mut scan) {
            reply.dst_port = port;
            match claim(skb, local, &reply, origin, false) {
                Claim::Won => {
                    count(Counter::AllocIndexed);
                    return Ok(reply);
                }
                // A stale mark: clear it; the walk decides.
                Claim::Taken => index::taken(ix, u16::from_be_bytes(port)),
                Claim::Full => return Err(AllocError::TableFull),
            }
        }
    }
    reply.dst_port = walk_range(&mut scan)?;
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
    let reply = claim_port(ctx.skb.skb, fwd, &origin, &nat, &uses[1])?;
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
            // Most new flows of a busy endpoint reuse the NAT port it already has: then the
            // hint is already right, and a lookup is far cheaper than rewriting an LRU entry.
            // SAFETY: pointer from a successful lookup, read at once.
            let known = SNAT_ENDPOINTS.get_ptr(endpoint).map(|p| unsafe { *p });
            if known != Some(nat_end) {
                let _ = SNAT_ENDPOINTS.insert(endpoint, nat_end, 0);
            }
            Ok(mapping)
        }
        Err(e) => {
            // Give the port back before anything can use it.
            let _ = SNAT_REV.remove(reply);
            index::freed(&reply);
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
