//! The time a packet stamps on its mapping (and a new mapping's first stamps and refusal times,
//! in `snat_create`): the kernel's coarse clock, read once per tick and CPU.
//!
//! The coarse clock only moves at a timer tick, when `jiffies` does, yet reading it is a helper
//! call, and on AMD hosts with the SRSO "safe RET" mitigation every call and return inside the
//! kernel is dear: the read was about 40–55 ns of an established packet's ~300 (issue 15's
//! ablation in docs/benchmarks.md). `bpf_jiffies64` is one load (the verifier inlines it on
//! 64-bit JITs), and so is the lookup of this CPU's slot of a per-CPU array (inlined on x86-64
//! in recent kernels: both seen in `bpftool prog dump xlated` on 6.18), so a packet reads the
//! clock only when its CPU saw no packet yet in this tick.
//!
//! The cached value can be up to a tick older than a fresh read would be (the tick may advance
//! `jiffies` just before the timekeeper), and a slot written by an interrupted program may pair
//! a new tick with the previous value: either way a stamp is at most a few ticks old, never in
//! the future. Mappings tolerate much older stamps (`REFRESH_NS`, see `mapping`), and
//! [`crate::mapping`] only ever moves a stamp forward, so stamps from CPUs whose caches differ
//! by a tick do not fight.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::SNAT_CLOCK;

/// One CPU's last reading of the coarse clock and the tick it was taken in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Reading {
    pub jiffies: u64,
    pub ns: u64,
}

/// The coarse clock (ns, `CLOCK_MONOTONIC`), as of this CPU's first packet in this tick.
#[inline(always)]
pub fn stamp() -> u64 {
    // SAFETY: helper without preconditions.
    let tick = unsafe { bpf_jiffies64() };
    let Some(r) = SNAT_CLOCK.get_ptr_mut(0) else {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot (index 0 of a one-entry array always exists); a program that
    // interrupts this one on the CPU sees an old or a new reading, each a real one.
    unsafe {
        if (*r).jiffies == tick {
            return (*r).ns;
        }
        let ns = bpf_ktime_get_coarse_ns();
        // The value first (volatile: in this order): a program that reads between the two
        // stores sees the old tick and reads the clock itself.
        core::ptr::write_volatile(&raw mut (*r).ns, ns);
        core::ptr::write_volatile(&raw mut (*r).jiffies, tick);
        ns
    }
}
