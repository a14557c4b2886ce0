//! `snat_create`: the slow path of egress, for a packet whose flow has no mapping yet. Egress
//! hands the packet over with a tail call (its parsed header and flow in `SNAT_PENDING`), so the
//! allocation — the port search and its `bpf_loop` callbacks — runs in a stack frame of its own
//! instead of on top of the packet path's. It creates the mapping and translates the packet, or
//! refuses the flow: counted once per flow and, with `--on-exhaustion reject`, answered at once
//! (see `reject`).

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use snat_common::{flow::proto, Counter, FlowKey};

use crate::{
    alloc::{self, AllocError, Created, Syn},
    maps::{count, count_refusal, time_allocation, SNAT_PENDING},
    packet::{translate, Ipv4, Nat},
    reject,
    verdict::{Stop, Verdict},
};

/// A packet egress found no mapping for: its IPv4 header, its forward key, its real remote port
/// (UDP keys carry 0) and what its SYN tells.
#[derive(Clone, Copy)]
pub struct Pending {
    pub ip: Ipv4,
    pub key: FlowKey,
    pub rport: [u8; 2],
    pub syn: Syn,
}

pub fn run(ctx: &TcContext) -> Verdict {
    let p = SNAT_PENDING
        .get_ptr(0)
        .ok_or(Counter::EgressDropNoAllocator)?;
    // SAFETY: this CPU's slot, written by egress right before its tail call to here.
    let pending = unsafe { &*p };
    let key = &pending.key;
    let nat = new_mapping(ctx, pending)?;
    let port_off_old = (pending.ip.src, key.src_port);
    translate(ctx, &pending.ip, key.proto, port_off_old, nat)?;
    Ok(match key.proto {
        proto::TCP => Counter::EgressTranslatedTcp,
        proto::UDP => Counter::EgressTranslatedUdp,
        _ => Counter::EgressTranslatedIcmp,
    })
}

/// Creates the mapping of the new flow `pending.key`, or refuses it.
#[inline(always)]
fn new_mapping(ctx: &TcContext, pending: &Pending) -> Result<Nat, Stop> {
    let key = &pending.key;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: as above.
    let started = unsafe { bpf_ktime_get_ns() };
    let created = alloc::create(ctx, key, pending.rport, &pending.syn, now);
    // SAFETY: as above.
    time_allocation(unsafe { bpf_ktime_get_ns() }.wrapping_sub(started));
    match created {
        Ok(Created::New(addr, port)) => {
            log_created(ctx, key, u16::from_be_bytes(port));
            count(match key.proto {
                proto::TCP => Counter::CreatedTcp,
                proto::UDP => Counter::CreatedUdp,
                _ => Counter::CreatedIcmp,
            });
            Ok((addr, port))
        }
        Ok(Created::Adopted(addr, port)) => Ok((addr, port)),
        Err(AllocError::TableFull) => {
            log_table_full(ctx, key);
            Err(Counter::EgressDropTableFull.into())
        }
        Err(AllocError::NoNatIp) => Err(Counter::EgressDropNoNatIp.into()),
        Err(why) => Err(refuse(ctx, &pending.ip, key, why, now)),
    }
}

/// A new flow refused for `why` (a cap, the fair share, or no port): counted once per flow, and
/// answered if the policy and the rate allow.
#[inline(always)]
fn refuse(ctx: &TcContext, ip: &Ipv4, key: &FlowKey, why: AllocError, now: u64) -> Stop {
    let counter = why.counter(key.proto);
    let Some(st) = alloc::state() else {
        return counter.into();
    };
    count_refusal(key, st.nat.addr, now, why.no_port());
    log_refused(ctx, key, counter);
    Stop {
        counter,
        action: reject::answer(ctx, ip, &st.cfg, now).unwrap_or(aya_ebpf::bindings::TC_ACT_SHOT),
    }
}

// Kernel log records (`--ebpf-log`), each in a frame of its own: a record's header and fields
// take stack the allocation needs.

#[inline(never)]
fn log_created(ctx: &TcContext, key: &FlowKey, port: u16) {
    debug!(
        ctx,
        "new mapping {:i}:{} via port {}",
        key.src_addr,
        key.src_port(),
        port
    );
}

#[inline(never)]
fn log_table_full(ctx: &TcContext, key: &FlowKey) {
    warn!(
        ctx,
        "mapping table full: proto {} {:i}:{}",
        key.proto,
        key.src_addr,
        key.src_port()
    );
}

#[inline(never)]
fn log_refused(ctx: &TcContext, key: &FlowKey, counter: Counter) {
    warn!(
        ctx,
        "refused new flow from {:i}:{} (counter {})",
        key.src_addr,
        key.src_port(),
        counter.index()
    );
}
