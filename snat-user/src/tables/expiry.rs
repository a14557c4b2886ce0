//! Releasing the ports of idle mappings.
//!
//! The datapath stamps each half of a mapping with the coarse monotonic time of its last packet;
//! the controller walks `SNAT_FWD` every `--gc-interval`, decides with [`expiry`] (pure), and
//! deletes expired pairs forward half first, reverse half (the port claim) last, so a port is
//! never free while a forward entry still points at it. No per-entry kernel timers: they fail
//! under connection churn on this kernel (see `docs/behaviour.md`).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use snat_common::{
    flow::{proto, release_result, use_count, use_kind},
    tcp::Phase,
    FlowKey, Mapping, Origin, Proto, ReleaseEntry, UseKey,
};

use crate::{
    datapath::{batch, DatapathError, Tables},
    settings::Timeouts,
};

/// Why a mapping ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Idle longer than its phase's timeout (UDP, ICMP, TCP established or transitory).
    Idle,
    /// TCP closed with FIN both ways, and the FIN timeout passed.
    Fin,
    /// TCP reset, and the RST timeout passed.
    Rst,
    /// The forward half had lost its port claim (reverse half missing or owned by another flow).
    Orphan,
}

impl Reason {
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
            Reason::Fin => "fin",
            Reason::Rst => "rst",
            Reason::Orphan => "orphan",
        }
    }
}

/// Idle timeout and the reason to give when it passes, for a mapping in its current state. A
/// UDP mapping whose datagrams all went to one port of `--udp-timeout-for` gets that port's
/// timeout, whether it was answered or not (netfilter gives an unanswered UDP flow 30 s on every
/// port); others get `--udp-timeout`.
pub fn timeout_of(key: &FlowKey, m: &Mapping, o: &Origin, t: &Timeouts) -> (Duration, Reason) {
    match key.proto {
        proto::TCP => match Phase::of_halves(m, o) {
            Phase::Reset => (t.tcp_rst, Reason::Rst),
            Phase::Closing => (t.tcp_fin, Reason::Fin),
            Phase::Established => (t.tcp_established, Reason::Idle),
            Phase::Transitory => (t.tcp_transitory, Reason::Idle),
        },
        proto::UDP => (t.udp_for(m.udp_remote_port()), Reason::Idle),
        _ => (t.icmp, Reason::Idle),
    }
}

/// When a mapping was last used: the later of both directions' stamps.
pub fn last_seen(m: &Mapping, o: &Origin) -> u64 {
    m.last_seen_ns.max(o.last_seen_ns)
}

/// Whether the mapping `key → m` (reverse half `o`, if it exists and belongs to `key`) has
/// expired at `now_ns`, and why.
pub fn expiry(
    key: &FlowKey,
    m: &Mapping,
    o: Option<&Origin>,
    now_ns: u64,
    t: &Timeouts,
) -> Option<Reason> {
    let Some(o) = o.filter(|o| o.addr == key.src_addr && o.port == key.src_port) else {
        return Some(Reason::Orphan);
    };
    let (timeout, reason) = timeout_of(key, m, o, t);
    let idle = now_ns.saturating_sub(last_seen(m, o));
    (u128::from(idle) >= timeout.as_nanos()).then_some(reason)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock the datapath stamps with.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reverse halves whose forward half is gone are removed after this long (a forward half is
/// published microseconds after its claim, so anything older is left over from a crash).
const ORPHAN_GRACE_NS: u64 = 5_000_000_000;

/// Walks the tables and releases expired mappings; keeps totals of what it released.
#[derive(Default)]
pub struct Sweeper {
    pub expired: BTreeMap<(Proto, Reason), u64>,
    sweeps: u64,
    /// Use counts seen at zero on the previous pass (removed if still zero now).
    zero_uses: HashSet<UseKey>,
}

impl Sweeper {
    /// One pass over the tables at `now_ns`: expired mappings are removed by the kernel's
    /// release program (`release`), which keeps any a packet refreshed meanwhile and updates the
    /// use counts. Returns how many mappings it released.
    pub fn sweep(
        &mut self,
        tables: &mut Tables,
        release: &dyn Fn(&mut [ReleaseEntry]) -> Result<(), DatapathError>,
        t: &Timeouts,
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let mut doomed = Vec::new();
        batch::for_each(&tables.fwd, |key, m| {
            let o = tables.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
            if let Some(reason) = expiry(&key, &m, o.as_ref(), now_ns, t) {
                let entry = ReleaseEntry::new(key, &m, o.as_ref());
                doomed.push((entry, reason));
            }
        })?;
        let mut entries: Vec<ReleaseEntry> = doomed.iter().map(|(e, _)| *e).collect();
        release(&mut entries)?;
        let mut released = 0;
        for (e, (_, reason)) in entries.iter().zip(&doomed) {
            if e.result == release_result::RELEASED {
                if let Some(p) = Proto::from_number(e.key.proto) {
                    *self.expired.entry((p, *reason)).or_default() += 1;
                }
                released += 1;
            }
        }
        self.sweeps += 1;
        if self.sweeps % 10 == 1 {
            released += self.sweep_orphan_claims(tables, now_ns)?;
        }
        self.sweep_uses(tables)?;
        Ok(released)
    }

    /// Removes use counts that were zero on this pass and the previous one (a count the
    /// datapath bumps in between loses that bump; caps are then one looser until it settles).
    fn sweep_uses(&mut self, tables: &mut Tables) -> Result<(), DatapathError> {
        let mut zero = HashSet::new();
        batch::for_each(&tables.usage, |key, n| {
            if key.kind != use_kind::DESTINATION_SOURCES && use_count(n) == 0 {
                zero.insert(key);
            }
        })?;
        for key in zero.intersection(&self.zero_uses) {
            let _ = tables.usage.remove(key);
        }
        self.zero_uses = zero;
        Ok(())
    }

    /// Removes reverse halves with no forward half (left behind if the agent died between the
    /// two deletes).
    fn sweep_orphan_claims(
        &mut self,
        tables: &mut Tables,
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let mut doomed = Vec::new();
        batch::for_each(&tables.rev, |reply, o| {
            if now_ns.saturating_sub(o.last_seen_ns) > ORPHAN_GRACE_NS
                && tables.fwd.get(&reply.forward(&o), 0).is_err()
            {
                doomed.push(reply);
            }
        })?;
        let n = doomed.len();
        for reply in doomed {
            let _ = tables.rev.remove(&reply);
            if let Some(p) = Proto::from_number(reply.proto) {
                *self.expired.entry((p, Reason::Orphan)).or_default() += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use snat_common::tcp::{SEEN_FIN, SEEN_RST, SEEN_SYN};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts::default()
    }

    fn pair(
        p: u8,
        inside: u8,
        outside: u8,
        last_in: u64,
        last_out: u64,
    ) -> (FlowKey, Mapping, Origin) {
        let key = FlowKey::new(p, [10, 0, 0, 2], [0x9c, 0x40], [203, 0, 113, 5], [0, 80]);
        let mut m = Mapping::new(key, [198, 51, 100, 1], [0x80, 0], last_in);
        m.record(inside);
        let mut o = Origin::new(
            key.reply(m.nat_addr, m.nat_port),
            key.src_addr,
            key.src_port,
            last_out,
        );
        o.record(m.epoch, outside);
        (key, m, o)
    }

    #[test]
    fn tcp_phases_pick_their_timeouts() {
        let t = timeouts();
        let cases = [
            (SEEN_SYN, SEEN_SYN, 7440, Reason::Idle),
            (SEEN_SYN, 0, 240, Reason::Idle),
            (SEEN_SYN | SEEN_FIN, SEEN_SYN, 240, Reason::Idle),
            (SEEN_SYN | SEEN_FIN, SEEN_SYN | SEEN_FIN, 240, Reason::Fin),
            (SEEN_SYN, SEEN_SYN | SEEN_RST, 15, Reason::Rst),
        ];
        for (inside, outside, secs, reason) in cases {
            let (k, m, o) = pair(proto::TCP, inside, outside, 1000 * S, 1000 * S);
            let now = 1000 * S + secs * S;
            assert_eq!(
                expiry(&k, &m, Some(&o), now - 1, &t),
                None,
                "{inside} {outside}"
            );
            assert_eq!(
                expiry(&k, &m, Some(&o), now, &t),
                Some(reason),
                "{inside} {outside}"
            );
        }
    }

    #[test]
    fn either_direction_refreshes() {
        let t = timeouts();
        let (k, m, o) = pair(proto::UDP, 0, 0, 0, 200 * S);
        assert_eq!(expiry(&k, &m, Some(&o), 499 * S, &t), None);
        assert_eq!(expiry(&k, &m, Some(&o), 500 * S, &t), Some(Reason::Idle));
        let (k, m, o) = pair(proto::ICMP, 0, 0, 100 * S, 0);
        assert_eq!(expiry(&k, &m, Some(&o), 159 * S, &t), None);
        assert_eq!(expiry(&k, &m, Some(&o), 160 * S, &t), Some(Reason::Idle));
    }

    #[test]
    fn a_forward_half_without_its_claim_is_released_at_once() {
        let t = timeouts();
        let (k, m, mut o) = pair(proto::TCP, SEEN_SYN, SEEN_SYN, 10 * S, 10 * S);
        assert_eq!(expiry(&k, &m, None, 10 * S, &t), Some(Reason::Orphan));
        o.port = [1, 2]; // the claim belongs to another internal endpoint
        assert_eq!(expiry(&k, &m, Some(&o), 10 * S, &t), Some(Reason::Orphan));
    }

    #[test]
    fn udp_to_a_listed_port_gets_its_timer_answered_or_not() {
        let t = timeouts();
        // Answered (the reply refreshed the reverse half) or not: 30 s after the last datagram.
        for last_out in [0, 2 * S] {
            let (k, mut m, o) = pair(proto::UDP, 0, 0, 0, last_out);
            m.window = 53u16.to_be_bytes();
            assert_eq!(timeout_of(&k, &m, &o, &t).0, Duration::from_secs(30));
            assert_eq!(expiry(&k, &m, Some(&o), last_out + 30 * S - 1, &t), None);
            assert_eq!(
                expiry(&k, &m, Some(&o), last_out + 30 * S, &t),
                Some(Reason::Idle)
            );
        }
        // Another port, several ports (0), or no per-port timers: --udp-timeout.
        for (port, t) in [
            (5353, timeouts()),
            (0, timeouts()),
            (
                53,
                Timeouts {
                    udp_ports: Default::default(),
                    ..timeouts()
                },
            ),
        ] {
            let (k, mut m, o) = pair(proto::UDP, 0, 0, 0, 0);
            m.window = u16::to_be_bytes(port);
            assert_eq!(
                timeout_of(&k, &m, &o, &t).0,
                Duration::from_secs(300),
                "{port}"
            );
        }
        // The window of a TCP mapping is not a port.
        let (k, mut m, o) = pair(proto::TCP, SEEN_SYN, SEEN_SYN, 0, 0);
        m.window = 53u16.to_be_bytes();
        assert_eq!(timeout_of(&k, &m, &o, &t).0, Duration::from_secs(7440));
    }

    #[test]
    fn clock_moves() {
        let a = now_ns();
        std::thread::sleep(Duration::from_millis(20));
        assert!(now_ns() > a);
    }
}
