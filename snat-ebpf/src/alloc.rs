//! Creating a mapping for a new flow: pick the NAT IP paired with the pod, claim a NAT port, then
//! publish the forward entry.
//!
//! The claim is `SNAT_REV.insert(reply_key, origin, BPF_NOEXIST)`: the kernel's hash map makes
//! that insert atomic, so two CPUs can never both own (NAT ip:port, remote) even when they race
//! for the same port. Ports are tried in the order [`snat_common::pool`] documents; the last stage
//! walks the whole range with `bpf_loop`, so a new flow is refused only when every port of the
//! range is taken towards its destination.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, generated::bpf_loop},
};
use snat_common::{
    pool::{self, RANDOM_TRIES},
    Counter, FlowKey, Mapping, NatIp, Origin, MAX_NAT_IPS,
};

use crate::maps::{count, SNAT_CONFIG, SNAT_FWD, SNAT_NAT_IPS, SNAT_REV};

/// Why a new flow got no mapping.
#[derive(Clone, Copy)]
pub enum AllocError {
    /// No NAT IP is configured.
    NoNatIp,
    /// Every port of the range is taken towards the destination. (No payload: LLVM merges the
    /// error paths and would read an enum payload register the verifier sees uninitialised.)
    Exhausted,
    /// `SNAT_FWD` or `SNAT_REV` is full (`--max-mappings`).
    TableFull,
}

const EEXIST: i32 = 17;

/// Outcome of trying one port.
enum Claim {
    Won,
    Taken,
    Full,
}

#[inline(always)]
fn claim(reply: &FlowKey, origin: &Origin) -> Claim {
    if SNAT_REV.get_ptr(reply).is_some() {
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
    match claim(&w.reply, &w.origin) {
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
fn walk_range(reply: &FlowKey, origin: &Origin, nat: &NatIp) -> Result<[u8; 2], AllocError> {
    let mut w = Walk {
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

/// The NAT IP the internal address `src` is paired with in the live set.
#[inline(always)]
pub fn nat_ip_for(src: [u8; 4]) -> Result<NatIp, AllocError> {
    let cfg = SNAT_CONFIG.get(0).ok_or(AllocError::NoNatIp)?;
    let set = cfg.active & 1;
    let n = *cfg
        .nat_ip_count
        .get(set as usize)
        .ok_or(AllocError::NoNatIp)?;
    if n == 0 || n > MAX_NAT_IPS {
        return Err(AllocError::NoNatIp);
    }
    let idx = set * MAX_NAT_IPS + pool::nat_index(src, n);
    SNAT_NAT_IPS.get(idx).copied().ok_or(AllocError::NoNatIp)
}

/// Claims a NAT port for the flow `fwd` and returns the reply key holding the claim.
#[inline(always)]
fn claim_port(fwd: &FlowKey, origin: &Origin, nat: &NatIp) -> Result<FlowKey, AllocError> {
    let mut reply = fwd.reply(nat.addr, [0; 2]);

    if let Some(port) = pool::preserved(nat, u16::from_be_bytes(fwd.src_port)) {
        reply.dst_port = port.to_be_bytes();
        match claim(&reply, origin) {
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
        match claim(&reply, origin) {
            Claim::Won => {
                count(Counter::AllocRandom);
                return Ok(reply);
            }
            Claim::Taken => {}
            Claim::Full => return Err(AllocError::TableFull),
        }
    }
    reply.dst_port = walk_range(&reply, origin, nat)?;
    count(Counter::AllocScan);
    Ok(reply)
}

/// Creates the mapping for the new flow `fwd` (a forward key) at time `now`, or adopts the one
/// another CPU created for the same flow a moment earlier.
#[inline(always)]
pub fn create(fwd: &FlowKey, tcp_seen: u8, now: u64) -> Result<Mapping, AllocError> {
    let nat = nat_ip_for(fwd.src_addr)?;
    let origin = Origin {
        addr: fwd.src_addr,
        port: fwd.src_port,
        tcp_seen: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let reply = claim_port(fwd, &origin, &nat)?;
    let mapping = Mapping {
        nat_addr: nat.addr,
        nat_port: reply.dst_port,
        tcp_seen,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    match SNAT_FWD.insert(fwd, mapping, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(mapping),
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
