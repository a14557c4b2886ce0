//! Creating a mapping for a new flow: with the NAT IP paired with the pod (picked once per flow by
//! the caller, [`nat_ip_for`]), skip a destination known to be full, apply the per-source cap and
//! the fair share, claim a NAT port, then publish the forward entry and count it.
//!
//! The claim is `SNAT_REV.insert(reply_key, origin, BPF_NOEXIST)`: the kernel's hash map makes
//! that insert atomic, so two CPUs can never both own (NAT ip:port, remote) even when they race
//! for the same port. Ports are tried in the order [`snat_common::pool`] documents; the last stage
//! walks the whole range with `bpf_loop`, so a new flow is refused for lack of ports only when
//! every port of the range is taken towards its destination. In front of the walk, a destination
//! whose range is nearly full gets a free-port index (`crate::index`) that finds one of its last
//! free ports in a few reads, so the cost of a new mapping does not grow with occupancy. When
//! the NAT IP is one of the node's own addresses, a port a local socket uses towards the same
//! remote (or listens on) is skipped too (`bpf_sk_lookup_*`, with the remote port the flow really
//! has, so connected UDP sockets are seen), and so is an echo identifier the node's own pings use
//! (`SNAT_HOST_ECHO`), so replies to the node's own sockets are never taken.
//!
//! Refusal is O(1): a search that finds no free port marks the destination full (`SNAT_FULL`);
//! new flows to it are refused without searching until a port of it is released ([`port_freed`]
//! deletes the mark) or `FULL_RECHECK_NS` has passed. Caps and fair share read counts that other
//! CPUs may be adding to at the same moment: with C CPUs creating mappings for one source at
//! once, it can end up to C − 1 over its cap (the BPF ISA v1 has no atomic fetch-and-add to make
//! the check and the count one step).

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, generated::bpf_loop},
    programs::TcContext,
};
use snat_common::{
    block::OpenBlocks,
    flow::{proto, EndpointOf},
    pool::{
        self,
        index::{
            lowest_marked, mark_if_nonzero, marked_bytes, BLOCK, BLOCKS, BLOCKS_PER_WORD, PORTS,
            WORDS,
        },
        RANDOM_TRIES,
    },
    within_ns, Config, Counter, FlowKeyOf, FullMark, MappingOf, NatIpOf, OriginOf, UseKeyOf,
    FULL_RECHECK_NS, HOST_ECHO_HOLD_NS, MAX_NAT_IPS,
};

use crate::{
    block,
    family::{nat_slot, Family},
    index::{self, FreePorts},
    mapping,
    maps::{count, expiry_event, use_add, use_of, SNAT_CONFIG, SNAT_OPEN_BLOCKS},
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

impl AllocError {
    /// The egress result of a packet whose new flow of protocol `p` was refused for this reason.
    #[inline(always)]
    pub const fn counter(self, p: u8) -> Counter {
        match self {
            AllocError::NoNatIp => Counter::EgressDropNoNatIp,
            AllocError::TableFull => Counter::EgressDropTableFull,
            AllocError::SourceCap => Counter::EgressDropSourceCap,
            AllocError::FairShare => Counter::EgressDropFairShare,
            AllocError::Exhausted => match p {
                proto::TCP => Counter::EgressDropExhaustedTcp,
                proto::UDP => Counter::EgressDropExhaustedUdp,
                _ => Counter::EgressDropExhaustedIcmp,
            },
        }
    }

    /// Whether the refusal is for lack of a port (counted per pool), not a policy or table limit.
    #[inline(always)]
    pub const fn no_port(self) -> bool {
        matches!(self, AllocError::Exhausted)
    }
}

const EEXIST: i32 = 17;

/// What the pod's SYN tells about its side of a new TCP connection.
#[derive(Clone, Copy, Default)]
pub struct Syn {
    /// The flow starts with a SYN (TCP only).
    pub syn: bool,
    /// Its sequence number + 1, and the window scale it announced.
    pub isn_next: [u8; 4],
    pub wscale: u8,
}

/// What [`create`] made.
pub enum Created<A> {
    /// A new mapping with this NAT address and port.
    New(A, [u8; 2]),
    /// Another CPU created the flow's mapping a moment earlier: its NAT address and port.
    Adopted(A, [u8; 2]),
}

/// Whether a local socket uses `reply`'s NAT port: a TCP socket connected to the same remote
/// endpoint or listening on the port, a UDP socket bound to it (connected to the flow's real
/// remote port `rport`, or not connected), or a ping socket of the node with that identifier
/// towards the same remote.
#[inline(always)]
fn host_uses<A: Family>(
    skb: *mut __sk_buff,
    reply: &FlowKeyOf<A>,
    rport: [u8; 2],
    now: u64,
) -> bool {
    // Echo keys carry `proto::ICMP` in both families (ICMPv6 echo included).
    if reply.proto == proto::ICMP {
        return A::host_echo()
            .get_ptr(reply)
            // SAFETY: pointer from a successful lookup, read at once.
            .is_some_and(|t| within_ns(now, unsafe { *t }, HOST_ECHO_HOLD_NS));
    }
    A::socket_uses(skb, reply, rport)
}

/// The state of one allocation, in this CPU's `SNAT_SCAN` slot (the stack is nearly full at this
/// depth): the candidate reply key and the reverse half that claims it, the NAT IP, and the search
/// and walk positions. Only the port and the result change during a `bpf_loop` (each step reads
/// where it is from the loop's index): a counter kept here would make the verifier follow every
/// iteration separately.
#[repr(C)]
pub struct ScanState<A: Family> {
    /// The live configuration, the NAT IP being tried ([`nat_ip_for`]) and how many the set has.
    pub cfg: Config,
    pub nat: NatIpOf<A>,
    pub nat_count: u32,
    /// The counts the new mapping adds to (source, destination, pair).
    uses: [UseKeyOf<A>; 3],
    /// The destination key (`index::destination` of the reply key).
    dest: FlowKeyOf<A>,
    /// The candidate: the reply key with the port being tried.
    reply: FlowKeyOf<A>,
    /// The reverse half to insert (its key is set to `reply` at each try).
    origin: OriginOf<A>,
    /// The forward half, once the port is won.
    mapping: MappingOf<A>,
    /// The flow's real remote port (UDP keys carry 0), for the host socket lookup.
    rport: [u8; 2],
    _pad: [u8; 2],
    /// The NAT endpoint the flow's internal endpoint had (`SNAT_ENDPOINTS`) when the search
    /// began; protocol 0 if none (see `remember_endpoint`).
    hint: EndpointOf<A>,
    /// Random: the search's first summary word (`0..words`); the walk's starting offset into
    /// the range (any `u32`, reduced modulo its length).
    start: u32,
    /// Random: where in a summary word and a block the search starts looking (RFC 6056).
    rotate: u32,
    /// 0 while scanning, 1 when a port was found (in `reply.dst_port`), 2 when a map is full.
    result: u32,
    /// Cluster mode: how many open blocks the NAT IP lists (`SNAT_OPEN_BLOCKS`).
    open_len: u32,
    now: u64,
}

/// Pointers the `bpf_loop` callbacks need, on the stack (the verifier does not let a program
/// store pointers in a map).
#[repr(C)]
struct Scan<A: Family> {
    skb: *mut __sk_buff,
    /// The destination's free-port index (search only); in cluster mode, which has no index,
    /// the NAT IP's open blocks (`OpenBlocks`, the walk's order) instead: one field for both
    /// keeps the allocation's frame within the 512 bytes the programs have.
    index: *mut FreePorts,
    state: *mut ScanState<A>,
}

/// Tries to claim the candidate port in `st.reply`: `Ok(true)` when won, `Ok(false)` when taken
/// (by a mapping or a local socket), `Err(TableFull)` when the table is full. `probe`: look the
/// port up first, which is cheaper than a failed insert where most ports are taken (the walk) and
/// a wasted lookup elsewhere.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the map insert copies the key and origin onto the stack first, and the frames with it exceed the verifier's 512 bytes"
)]
fn try_claim<A: Family>(
    skb: *mut __sk_buff,
    st: &mut ScanState<A>,
    probe: bool,
) -> Result<bool, AllocError> {
    if probe && A::rev().get_ptr(st.reply).is_some() {
        return Ok(false);
    }
    if st.nat.flags & NatIpOf::<A>::LOCAL != 0 && host_uses(skb, &st.reply, st.rport, st.now) {
        count(Counter::AllocHostPortSkipped);
        return Ok(false);
    }
    st.origin.key = st.reply;
    match A::rev().insert(&st.reply, &st.origin, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(true),
        Err(e) if e == -EEXIST => Ok(false),
        Err(_) => Err(AllocError::TableFull),
    }
}

/// Tries `port`; on a win counts `how` and returns `Ok(true)`. Its own stack frame: inlined at
/// each stage of [`find_port`], its socket lookup would cost the caller's frame each time.
#[inline(never)]
fn try_port<A: Family>(
    skb: *mut __sk_buff,
    st: &mut ScanState<A>,
    port: [u8; 2],
    how: Counter,
) -> Result<bool, AllocError> {
    st.reply.dst_port = port;
    let won = try_claim(skb, st, false)?;
    if won {
        count(how);
    }
    Ok(won)
}

/// One step of the walk: try the `i`-th port; stop the loop (return 1) once decided.
extern "C" fn walk_step<A: Family>(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `walk_range` gave it, to a live `Scan` on the
    // caller's stack, and runs the callback on the same CPU synchronously; `state` points to
    // this CPU's `SNAT_SCAN` slot.
    let scan = unsafe { &*ctx.cast::<Scan<A>>() };
    // SAFETY: as above.
    let st = unsafe { &mut *scan.state };
    let port = match block::layout() {
        // SAFETY: in cluster mode `index` points to the NAT IP's live `SNAT_OPEN_BLOCKS` value
        // (see `Scan`).
        Some(l) => l.walk(
            unsafe { &*scan.index.cast::<OpenBlocks>() },
            st.start,
            i as u32,
        ),
        None => pool::walk(&st.nat, st.start, i as u32),
    };
    st.reply.dst_port = port.to_be_bytes();
    match try_claim(scan.skb, st, true) {
        Ok(true) => {
            st.result = 1;
            1
        }
        Ok(false) => 0,
        Err(_) => {
            st.result = 2;
            1
        }
    }
}

#[inline(always)]
fn walk_range<A: Family>(scan: &mut Scan<A>) -> Result<(), AllocError> {
    // SAFETY: as in `walk_step`.
    let st = unsafe { &mut *scan.state };
    st.result = 0;
    // SAFETY: helper without preconditions.
    st.start = unsafe { bpf_get_prandom_u32() };
    // Cluster mode: every port of every open block, in the list's order.
    let len = match block::layout() {
        Some(l) => (st.open_len << (l.shift & 15)).min(1 << 16),
        None => st.nat.range_len(),
    };
    // SAFETY: `walk_step` has the callback signature `bpf_loop` expects and only touches
    // `scan` and what it points to, which outlive the call.
    unsafe {
        bpf_loop(
            len,
            walk_step::<A> as *mut core::ffi::c_void,
            core::ptr::from_mut(scan).cast(),
            0,
        );
    }
    match st.result {
        1 => Ok(()),
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

/// The marked byte of `marked` (from [`marked_bytes`]) to take, starting the look at byte
/// `from` (0..8) and wrapping: the lowest marked byte of the word rotated by `from`. A random
/// `from` keeps the choice within a block unpredictable (RFC 6056).
#[inline(always)]
fn pick_marked(marked: u64, from: u32) -> u32 {
    let from = from & 7;
    (lowest_marked(marked.rotate_right(8 * from)) + from) & 7
}

/// Step `i` of the search: in the `i`-th summary word from the start, take a block marked free
/// that has a port marked free, and such a port, each picked from a random place onwards. A block
/// found empty has its mark cleared; so has a port outside the range (left from a wider range),
/// and the search moves on to the next word. (The port is tried by the caller: a claim here would
/// need a deeper stack than the program has left.)
extern "C" fn search_step<A: Family>(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `search` gave it, to a live `Scan`, whose
    // `state` points to this CPU's `SNAT_SCAN` slot.
    let scan = unsafe { &*ctx.cast::<Scan<A>>() };
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
    // The word's blocks from a random one on; a block marked but found empty loses its mark.
    for _ in 0..BLOCKS_PER_WORD {
        if blocks == 0 {
            return 0;
        }
        let j = pick_marked(blocks, s.rotate);
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
            let at = base + 8 * pick_marked(marks, s.rotate >> 3) as usize;
            // SAFETY: as above.
            let bytes = marked_bytes(unsafe { word_at(ix.port.as_ptr(), at) });
            let port = (at + pick_marked(bytes, s.rotate >> 6) as usize) & (PORTS - 1);
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
fn search<A: Family>(scan: &mut Scan<A>) -> Option<[u8; 2]> {
    // SAFETY: as in `search_step`.
    let st = unsafe { &mut *scan.state };
    let (_, words) = pool::index::words(st.nat.port_min, st.nat.port_max);
    st.result = 0;
    // SAFETY: helper without preconditions.
    st.start = unsafe { bpf_get_prandom_u32() } % words.max(1);
    // SAFETY: as above.
    st.rotate = unsafe { bpf_get_prandom_u32() };
    // SAFETY: `search_step` has the callback signature `bpf_loop` expects and only touches
    // `scan` and the index it points to, which outlive the call.
    unsafe {
        bpf_loop(
            words,
            search_step::<A> as *mut core::ffi::c_void,
            core::ptr::from_mut(scan).cast(),
            0,
        );
    }
    (st.result == 1).then_some(st.reply.dst_port)
}

/// The live configuration, the NAT IP the internal address `src` tries on attempt `attempt` (0:
/// the one it is paired with, then the next ones of the set in order) and how many the set has.
#[inline(always)]
pub fn nat_ip_for<A: Family>(
    src: A,
    attempt: u32,
) -> Result<(Config, NatIpOf<A>, u32), AllocError> {
    let cfg = *SNAT_CONFIG.get(0).ok_or(AllocError::NoNatIp)?;
    let (idx, n) = nat_slot_for(&cfg, src, attempt)?;
    let nat = A::nat_ip(idx).ok_or(AllocError::NoNatIp)?;
    Ok((cfg, nat, n))
}

/// The slot in `SNAT_NAT_IPS`/`SNAT_NAT_IPS6` of the NAT IP `src` tries on `attempt`, and how
/// many NAT IPs the live set has.
#[inline(always)]
fn nat_slot_for<A: Family>(cfg: &Config, src: A, attempt: u32) -> Result<(u32, u32), AllocError> {
    let set = cfg.active & 1;
    let n = A::nat_count(cfg, set);
    if n == 0 || n > MAX_NAT_IPS {
        return Err(AllocError::NoNatIp);
    }
    Ok((
        nat_slot(set, (pool::nat_index(src.folded(), n) + attempt) % n),
        n,
    ))
}

/// [`nat_ip_for`] into `st` (the configuration, NAT IP and count), copied straight from the
/// maps: an IPv6 result built on the stack first would not fit `snat_create6`'s.
#[inline(always)]
fn load_nat_ip<A: Family>(st: &mut ScanState<A>, src: A, attempt: u32) -> Result<(), AllocError> {
    let cfg = SNAT_CONFIG.get(0).ok_or(AllocError::NoNatIp)?;
    let (idx, n) = nat_slot_for(cfg, src, attempt)?;
    st.cfg = *cfg;
    st.nat = A::nat_ip(idx).ok_or(AllocError::NoNatIp)?;
    st.nat_count = n;
    Ok(())
}

/// Applies `--max-ports-per-source` and `--fair-share` to a new flow whose mapping would add to
/// the counts `uses` (source, destination on `nat`, pair): the source's mappings and its share of
/// the destination count on every NAT IP it uses; the destination's fill is that of `nat`'s range.
#[inline(always)]
fn admit<A: Family>(
    cfg: &Config,
    nat: &NatIpOf<A>,
    uses: &[UseKeyOf<A>; 3],
) -> Result<(), AllocError> {
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
            let sources = use_of(&UseKeyOf::sources_of(&uses[1])).clamp(1, u64::from(u32::MAX));
            let share = (range / (sources + 1)).max(1);
            if use_of(&uses[2]) >= share {
                return Err(AllocError::FairShare);
            }
        }
    }
    Ok(())
}

/// Whether `dest` (a destination key, see `index::destination`) was found full under this
/// pool generation less than `FULL_RECHECK_NS` before `now`.
#[inline(always)]
fn known_full<A: Family>(dest: &FlowKeyOf<A>, cfg: &Config, now: u64) -> bool {
    A::full()
        .get_ptr(dest)
        // SAFETY: pointer from a successful lookup, copied out at once.
        .map(|p| unsafe { *p })
        .is_some_and(|f| {
            f.generation == cfg.generation && within_ns(now, f.since_ns, FULL_RECHECK_NS)
        })
}

/// Records that the port of `reply` is free again: its destination's free-port index, and the
/// end of its "full" mark. Every path that removes a claim calls it.
#[inline(always)]
pub fn port_freed<A: Family>(reply: &FlowKeyOf<A>) {
    let dest = index::destination(reply);
    index::freed(&dest, reply);
    let _ = A::full().remove(dest);
}

/// Claims a port in the order [`pool`] documents for the flow `fwd`, whose destination count is
/// `dest`: the winning reply key ends up in `st.reply`. The destination's free-port index (built
/// here when the destination turns hot) stands in front of the walk and learns the claim.
///
/// Cluster mode (`open` non-null): the preferred ports only where their block is open, random
/// tries in the first listed block (the fullest: new mappings pack into it, so the emptiest
/// blocks drain and can go back), then the walk of every open block in the list's order (so the
/// first free port is in the fullest block that has one towards the destination); no free-port
/// index (it covers the whole range, most of which is other nodes'). A destination that has
/// filled the first blocks pays a probe per port of each before the walk reaches a free one.
#[inline(always)]
fn find_port<A: Family>(
    skb: *mut __sk_buff,
    st: &mut ScanState<A>,
    fwd: &FlowKeyOf<A>,
    open: *const OpenBlocks,
) -> Result<(), AllocError> {
    let cluster = !open.is_null();
    let mut hot = if cluster { None } else { index::of(&st.dest) };
    let len = st.nat.range_len();

    // The NAT port this internal endpoint had towards another destination, if still in range.
    let endpoint = EndpointOf::new(fwd.src_addr, fwd.src_port, fwd.proto);
    // Copied into the scan state, not onto the stack (an IPv6 one would not fit).
    match A::endpoints().get_ptr(endpoint) {
        // SAFETY: pointer from a successful lookup, copied out at once.
        Some(p) => st.hint = unsafe { *p },
        None => st.hint.proto = 0,
    }
    let port = st.hint.port;
    if st.hint.proto != 0
        && st.hint.addr == st.nat.addr
        && pool::preserved(&st.nat, u16::from_be_bytes(port)).is_some()
        && open_port(cluster, st, port)
        && try_port(skb, st, port, Counter::AllocSameEndpoint)?
    {
        return index_claimed(hot, st);
    }
    if let Some(port) = pool::preserved(&st.nat, u16::from_be_bytes(fwd.src_port)) {
        if open_port(cluster, st, port.to_be_bytes())
            && try_port(skb, st, port.to_be_bytes(), Counter::AllocPreserved)?
        {
            return index_claimed(hot, st);
        }
    }
    // Random ports keep the choice unpredictable (RFC 6056) while the range is not nearly full;
    // past that, the index finds a port for less than the random tries would fail for.
    let indexed_and_hot = hot.is_some() && pool::index::is_hot(use_of(&st.uses[1]), len);
    if !indexed_and_hot {
        for _ in 0..RANDOM_TRIES {
            // SAFETY: helper without preconditions.
            let r = unsafe { bpf_get_prandom_u32() };
            let port = match block::layout() {
                // SAFETY: `open` is the NAT IP's live `SNAT_OPEN_BLOCKS` value (cluster mode).
                Some(l) if cluster => l.port(unsafe { (*open).blocks[0] }, r),
                _ => pool::port_at(&st.nat, r),
            }
            .to_be_bytes();
            if try_port(skb, st, port, Counter::AllocRandom)? {
                return index_claimed(hot, st);
            }
        }
        if hot.is_none() && !cluster && pool::index::is_hot(use_of(&st.uses[1]), len) {
            hot = index::build(&st.dest, st.nat.port_min, len);
        }
    }
    let mut scan = Scan {
        skb,
        index: open.cast_mut().cast(),
        state: st,
    };
    if let Some(ix) = hot {
        scan.index = ix;
        if let Some(port) = search(&mut scan) {
            // SAFETY: `scan.state` is `st`, borrowed again once the loop is done.
            let st = unsafe { &mut *scan.state };
            if try_port(skb, st, port, Counter::AllocIndexed)? {
                return index_claimed(hot, st);
            }
            // A stale mark: clear it; the walk decides.
            index::taken(ix, u16::from_be_bytes(port));
        }
    }
    walk_range(&mut scan)?;
    count(Counter::AllocScan);
    // SAFETY: as above.
    index_claimed(hot, unsafe { &*scan.state })
}

/// Cluster mode: whether `port` of the NAT IP being tried lies in a block open to new mappings
/// now (outside cluster mode: always).
#[inline(always)]
fn open_port<A: Family>(cluster: bool, st: &ScanState<A>, port: [u8; 2]) -> bool {
    match (block::layout(), A::v4(st.nat.addr)) {
        (Some(l), Some(addr)) if cluster => {
            block::entry(&l, addr, port).is_some_and(|e| e.open_at(block::boot_now()))
        }
        _ => true,
    }
}

/// Records the claim of `st.reply` in the destination's index, if it has one.
#[inline(always)]
fn index_claimed<A: Family>(
    hot: Option<*mut FreePorts>,
    st: &ScanState<A>,
) -> Result<(), AllocError> {
    if let Some(ix) = hot {
        index::taken(ix, u16::from_be_bytes(st.reply.dst_port));
    }
    Ok(())
}

/// This CPU's allocation state: after [`create`], the configuration and NAT IP it used.
#[inline(always)]
pub fn state<A: Family>() -> Option<&'static mut ScanState<A>> {
    // SAFETY: this CPU's slot, used by this program only until it returns.
    A::scan().get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Creates the mapping for the new flow `fwd` (a forward key; `rport` is its real remote port)
/// at time `now` on the NAT IP of `attempt` (see [`nat_ip_for`]), or adopts the one another CPU
/// created for the same flow a moment earlier. The NAT IP and the configuration stay in
/// [`state`] for the caller to answer a refusal with, or to try the next NAT IP. Everything lives in this CPU's `SNAT_SCAN` slot,
/// not on the stack, which the port search's callbacks need.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the map insert copies the 64-byte mapping onto the stack first, and snat_create's frame then exceeds the verifier's 512 bytes"
)]
pub fn create<A: Family>(
    ctx: &TcContext,
    fwd: &FlowKeyOf<A>,
    rport: [u8; 2],
    syn: &Syn,
    now: u64,
    attempt: u32,
) -> Result<Created<A>, AllocError> {
    let st = state::<A>().ok_or(AllocError::NoNatIp)?;
    load_nat_ip(st, fwd.src_addr, attempt)?;
    // In place, field by field: an IPv6 key built on the stack first costs 40 bytes of it.
    st.reply.src_addr = fwd.dst_addr;
    st.reply.dst_addr = st.nat.addr;
    st.reply.src_port = fwd.dst_port;
    st.reply.dst_port = [0; 2];
    st.reply.proto = fwd.proto;
    st.reply._pad = [0; 3];
    st.dest = st.reply;
    // Cluster mode: ports only in the NAT IP's open blocks, while they are valid.
    let mut open: *const OpenBlocks = core::ptr::null();
    if let Some(l) = block::layout() {
        let addr = A::v4(st.nat.addr).ok_or(AllocError::Exhausted)?;
        let p = SNAT_OPEN_BLOCKS
            .get_ptr(addr)
            .ok_or(AllocError::Exhausted)?;
        // SAFETY: pointer from a successful lookup; the agent replaces values whole.
        let (valid_until, n) = unsafe { ((*p).valid_until_ns, (*p).len()) };
        if n == 0 || l.count == 0 || block::boot_now() >= valid_until {
            return Err(AllocError::Exhausted);
        }
        st.open_len = n;
        open = p;
    }
    if known_full(&st.dest, &st.cfg, now) {
        count(Counter::RefusedKnownFull);
        return Err(AllocError::Exhausted);
    }
    UseKeyOf::init_of_mapping(&mut st.uses, fwd, st.nat.addr);
    admit(&st.cfg, &st.nat, &st.uses)?;
    st.origin.init(&st.reply, fwd.src_addr, fwd.src_port, now);
    st.rport = rport;
    st.now = now;
    match find_port(ctx.skb.skb, st, fwd, open) {
        Ok(()) => {}
        Err(AllocError::Exhausted) => {
            let mark = FullMark {
                since_ns: now,
                generation: st.cfg.generation,
                _pad: 0,
            };
            let _ = A::full().insert(st.dest, mark, 0);
            return Err(AllocError::Exhausted);
        }
        Err(e) => return Err(e),
    }
    let (addr, port) = (st.nat.addr, st.reply.dst_port);
    st.mapping.init(fwd, addr, port, now);
    if let (Some(l), Some(addr4)) = (block::layout(), A::v4(addr)) {
        // The claim is the authority, the list a hint: the block must still be open (the agent
        // may have closed or forgotten it since the list was read). Its epoch goes with the
        // mapping.
        match block::entry(&l, addr4, port).filter(|e| e.open_at(block::boot_now())) {
            Some(e) => st.mapping.block_epoch = e.epoch,
            None => {
                let _ = A::rev().remove(st.reply);
                port_freed(&st.reply);
                count(Counter::AllocBlockClosed);
                return Err(AllocError::Exhausted);
            }
        }
    }
    if fwd.proto == proto::UDP {
        // Its key carries no remote port (one mapping per remote IP); the expiry wants it.
        st.mapping.window = rport;
    }
    if syn.syn {
        st.mapping.syn = st.mapping.epoch;
        st.mapping.isn_next = syn.isn_next;
        st.mapping.wscale = syn.wscale;
    }
    match A::fwd().insert(fwd, &st.mapping, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            use_add(&st.uses);
            expiry_event(fwd);
            // The hint serves endpoint-independent mapping on the paired NAT IP: an overflowed
            // mapping does not replace it.
            if attempt == 0 {
                remember_endpoint(fwd, addr, port);
            }
            Ok(Created::New(addr, port))
        }
        Err(e) => {
            // Give the port back before anything can use it.
            let _ = A::rev().remove(st.reply);
            port_freed(&st.reply);
            if e == -EEXIST {
                count(Counter::AllocRaceLost);
                if let Some((addr, port)) = mapping::forward_nat(fwd) {
                    return Ok(Created::Adopted(addr, port));
                }
            }
            Err(AllocError::TableFull)
        }
    }
}

/// Remembers that the internal endpoint of `fwd` got `nat_addr:port`, so its next flow tries it
/// first (endpoint-independent mapping). The hint the search read for it is in this CPU's scan
/// state ([`ScanState`]'s `hint`; read there, not passed: a fourth argument overflowed
/// `snat_create6`'s stack).
///
/// Nothing is written when the hint is right already, and when there is none and the NAT port is
/// the pod's own: the next flow tries the pod's own port right after the hint ([`find_port`]),
/// under the same conditions (in range, in an open block), so a hint would only repeat it. The
/// hint is read once per new mapping, not again here. Both matter because the LRU insert is the
/// dearest step of a new mapping after the claim and the mapping's insert (ablation in
/// docs/benchmarks.md), and pods' ephemeral ports mostly lie in the NAT range and are kept.
#[inline(never)]
fn remember_endpoint<A: Family>(fwd: &FlowKeyOf<A>, nat_addr: A, port: [u8; 2]) {
    let Some(st) = state::<A>() else {
        return;
    };
    let hint = &st.hint;
    let nat_end = EndpointOf::new(nat_addr, port, fwd.proto);
    let own_port = hint.proto == 0 && port == fwd.src_port;
    if *hint != nat_end && !own_port {
        let endpoint = EndpointOf::new(fwd.src_addr, fwd.src_port, fwd.proto);
        let _ = A::endpoints().insert(endpoint, nat_end, 0);
    }
}
