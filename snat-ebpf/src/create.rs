//! `snat_create`: the slow path of egress, for a packet whose flow has no mapping yet. Egress
//! hands the packet over with a tail call (its parsed header and flow in `SNAT_PENDING`), so the
//! allocation — the port search and its `bpf_loop` callbacks — runs in a stack frame of its own
//! instead of on top of the packet path's. It creates the mapping and translates the packet, or
//! refuses the flow: counted once per flow and, with `--on-exhaustion reject`, answered at once
//! (see `reject`).
//!
//! With `--ip-pooling overflow`, a flow whose NAT IP has no port left towards its destination
//! tries the next NAT IP of the set: `snat_create` tail-calls itself with the attempt number
//! raised (a fresh stack each time), at most `MAX_POOL_TRIES` NAT IPs in all. A full NAT IP costs
//! one lookup (its destination is marked full), so a flow that overflows pays for each NAT IP it
//! skips, and a flow that does not overflow pays nothing extra.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use aya_log_ebpf::{debug, warn};
use snat_common::{flow::proto, Config, Counter, FlowKeyOf, MAX_POOL_TRIES};

use crate::{
    alloc::{self, AllocError, Created, Syn},
    family::{Family, IpHeader},
    maps::{count, count_in_pool, count_refusal, time_allocation, SNAT_CONFIG, SNAT_PROGRAMS},
    packet::translate_lean,
    verdict::{Stop, Verdict},
};

/// A packet egress found no mapping for: its IP header, its forward key, its real remote port
/// (UDP keys carry 0), what its SYN tells, and how far its allocation got.
#[derive(Clone, Copy)]
pub struct Pending<A: Family> {
    pub ip: A::Ip,
    pub key: FlowKeyOf<A>,
    pub rport: [u8; 2],
    pub syn: Syn,
    /// Which NAT IP this run tries: 0 the paired one, then the next ones (overflow).
    pub attempt: u32,
    /// The paired NAT IP, once attempt 0 is over: refusals and overflows are counted on it.
    pub paired: A,
    /// `bpf_ktime_get_ns` when egress handed the packet over: the allocation's time.
    pub started: u64,
    /// The packet is the hairpin program's (a pod's packet to a NAT endpoint): once translated,
    /// it goes on to `snat_hairpin_deliver` instead of out.
    pub hairpin: bool,
}

#[inline(always)]
pub fn run<A: Family>(ctx: &TcContext) -> Verdict {
    let p = A::pending()
        .get_ptr_mut(0)
        .ok_or(Counter::EgressDropNoAllocator)?;
    // SAFETY: this CPU's slot, written by egress (or by the previous attempt) right before its
    // tail call to here.
    let pending = unsafe { &mut *p };
    let nat = new_mapping(ctx, pending)?;
    let key = &pending.key;
    translate_lean::<A>(
        ctx,
        &pending.ip,
        key.proto,
        (pending.ip.src(), key.src_port),
        nat,
    )?;
    let translated = match key.proto {
        proto::TCP => Counter::EgressTranslatedTcp,
        proto::UDP => Counter::EgressTranslatedUdp,
        _ => Counter::EgressTranslatedIcmp,
    };
    if pending.hairpin {
        count(translated);
        // SAFETY: a tail call from the program's own frame; on success delivery goes on there.
        unsafe { SNAT_PROGRAMS.tail_call(ctx, A::SLOT_HAIRPIN_DELIVER) };
        return Err(Counter::HairpinDropNoDeliverer.into());
    }
    Ok(translated)
}

/// Creates the mapping of the new flow `pending.key` on the NAT IP of `pending.attempt`; tries the
/// next NAT IP when this one is full and overflow is on; otherwise refuses the flow.
#[inline(always)]
fn new_mapping<A: Family>(ctx: &TcContext, pending: &mut Pending<A>) -> Result<(A, [u8; 2]), Stop> {
    let key = &pending.key;
    // This CPU's reading of the coarse clock (see `crate::clock`): the mapping's first stamps and
    // the refusal's times, compared with `within_ns` since other CPUs' readings may be a tick
    // newer.
    let now = crate::clock::stamp();
    // (Only in cluster mode: outside it the verifier drops the answer's code from the program.)
    if crate::block::layout().is_some() && key.proto == proto::TCP && !pending.syn.syn {
        return Err(not_syn::<A>(ctx, &pending.ip, now));
    }
    let created = alloc::create(ctx, key, pending.rport, &pending.syn, now, pending.attempt);
    if let (Err(AllocError::Exhausted), Some(st)) = (&created, alloc::state::<A>()) {
        if pending.attempt == 0 {
            pending.paired = st.nat.addr;
        }
        let tries = if st.nat_count < MAX_POOL_TRIES {
            st.nat_count
        } else {
            MAX_POOL_TRIES
        };
        if st.cfg.flags & Config::OVERFLOW != 0 && pending.attempt + 1 < tries {
            pending.attempt += 1;
            // SAFETY: a tail call from the program's own frame; on success this run ends here
            // and the next NAT IP is tried in a fresh one.
            unsafe { SNAT_PROGRAMS.tail_call(ctx, A::SLOT_CREATE) };
            // The kernel refused the tail call: refuse the flow on the paired NAT IP.
        }
    }
    // SAFETY: as above.
    time_allocation(unsafe { bpf_ktime_get_ns() }.wrapping_sub(pending.started));
    match created {
        Ok(Created::New(addr, port)) => {
            log_created(ctx, key.src_addr, key.src_port(), u16::from_be_bytes(port));
            count(match key.proto {
                proto::TCP => Counter::CreatedTcp,
                proto::UDP => Counter::CreatedUdp,
                _ => Counter::CreatedIcmp,
            });
            if pending.attempt > 0 {
                count(Counter::AllocOverflow);
                count_in_pool(A::overflow(), pending.paired, key.proto);
            }
            Ok((addr, port))
        }
        Ok(Created::Adopted(addr, port)) => Ok((addr, port)),
        Err(AllocError::TableFull) => {
            log_table_full(ctx, key.proto, key.src_addr, key.src_port());
            Err(Counter::EgressDropTableFull.into())
        }
        Err(AllocError::NoNatIp) => Err(Counter::EgressDropNoNatIp.into()),
        Err(why) => {
            let home = if pending.attempt == 0 {
                None
            } else {
                Some(pending.paired)
            };
            Err(refuse(ctx, &pending.ip, key, why, now, home))
        }
    }
}

/// A new flow refused for `why` (a cap, the fair share, or no port): counted once per flow — on
/// its paired NAT IP (`home`, if it overflowed; else the one just tried) — and answered if the
/// policy and the rate allow.
#[inline(always)]
fn refuse<A: Family>(
    ctx: &TcContext,
    ip: &A::Ip,
    key: &FlowKeyOf<A>,
    why: AllocError,
    now: u64,
    home: Option<A>,
) -> Stop {
    let counter = why.counter(key.proto);
    let Some(st) = alloc::state::<A>() else {
        return counter.into();
    };
    let paired = home.unwrap_or(st.nat.addr);
    count_refusal(key, paired, now, why.no_port());
    log_refused(ctx, key.src_addr, key.src_port(), counter);
    // Cluster mode: no port yet, but a block is on its way: hold the flow back instead of
    // ending it (the refusal above is what tells the agent to hurry).
    if let (Some(_), Some(p)) = (crate::block::layout(), A::v4(paired)) {
        if why.no_port() && crate::block::growing(p) {
            return Counter::EgressDropAwaitingBlock.into();
        }
    }
    Stop {
        counter,
        action: A::answer(ctx, ip, &st.cfg, now).unwrap_or(aya_ebpf::bindings::TC_ACT_SHOT),
    }
}

/// A TCP segment other than a SYN without a mapping, which egress hands over in cluster mode
/// only: its mapping may have gone with its block (the lease was lost, the block is another
/// node's now). Dropped as outside cluster mode, and answered with a RST if the policy and the
/// rate allow, as a refused flow is, so the pod's connection ends at once instead of in a
/// timeout.
#[inline(always)]
fn not_syn<A: Family>(ctx: &TcContext, ip: &A::Ip, now: u64) -> Stop {
    let stop = Stop::from(Counter::EgressDropTcpNotSyn);
    match SNAT_CONFIG.get(0) {
        Some(cfg) => Stop {
            action: A::answer(ctx, ip, cfg, now).unwrap_or(stop.action),
            ..stop
        },
        None => stop,
    }
}

// Kernel log records (`--ebpf-log`), each in a frame of its own: a record's header and fields
// take stack the allocation needs.

#[inline(never)]
fn log_created<A: Family>(ctx: &TcContext, src: A, sport: u16, port: u16) {
    debug!(ctx, "new mapping {:i}:{} via port {}", src, sport, port);
}

#[inline(never)]
fn log_table_full<A: Family>(ctx: &TcContext, proto: u8, src: A, sport: u16) {
    warn!(
        ctx,
        "mapping table full: proto {} {:i}:{}", proto, src, sport
    );
}

#[inline(never)]
fn log_refused<A: Family>(ctx: &TcContext, src: A, sport: u16, counter: Counter) {
    warn!(
        ctx,
        "refused new flow from {:i}:{} (counter {})",
        src,
        sport,
        counter.index()
    );
}
