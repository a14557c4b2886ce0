//! Releasing the ports of idle mappings, on time and without walking a million mappings a
//! second.
//!
//! The datapath stamps each half of a mapping with the coarse monotonic time of its last packet;
//! the controller decides with [`expiry`] (pure) and removes expired pairs through the kernel's
//! release program, forward half first and the port claim last, so a port is never free while a
//! forward entry still points at it. No per-entry kernel timers: they fail under connection churn
//! on this kernel (see `docs/behaviour.md`).
//!
//! When to look is a [`Schedule`] of deadlines, not a walk every `--gc-interval`:
//! - A look at a mapping (both halves) gives the time it expires if nothing changes,
//!   [`deadline`]; it is looked at again then. Packets that only refresh it push the real
//!   expiry later, which the next look finds.
//! - What can bring an expiry closer (a new mapping, a TCP SYN, FIN, RST or reopen, a UDP
//!   mapping's second remote port) is an event the datapath writes to `SNAT_EXPIRY_EVENTS`. An
//!   event read at a tick is looked at when the mapping could first expire, [`after_event`]: the
//!   previous tick plus its protocol's shortest timeout, less the stamps' slack.
//! - A full pass (every mapping, as before) runs at start, when the datapath counts lost events,
//!   and every [`full_pass_period`] as a safety net (mappings written by other means, orphans).
//!
//! Invariant: every mapping is either in the schedule at or before its deadline, or its events
//! are still in the ring, or the ring lost events (and a full pass is due). So a mapping is
//! released at the first tick after its timeout, as with a walk every tick.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashSet},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use snat_common::{
    flow::{proto, release_result, use_count, use_kind, REFRESH_NS},
    tcp::Phase,
    Addr, FlowKeyOf, MappingOf, OriginOf, Proto, ReleaseEntryOf, UseKeyOf,
};

use crate::{
    datapath::{batch, DatapathError, TablesOf},
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
pub fn timeout_of<A: Addr>(
    key: &FlowKeyOf<A>,
    m: &MappingOf<A>,
    o: &OriginOf<A>,
    t: &Timeouts,
) -> (Duration, Reason) {
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
pub fn last_seen<A: Addr>(m: &MappingOf<A>, o: &OriginOf<A>) -> u64 {
    m.last_seen_ns.max(o.last_seen_ns)
}

/// Whether the mapping `key → m` (reverse half `o`, if it exists and belongs to `key`) has
/// expired at `now_ns`, and why.
pub fn expiry<A: Addr>(
    key: &FlowKeyOf<A>,
    m: &MappingOf<A>,
    o: Option<&OriginOf<A>>,
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
pub use crate::clock::monotonic_coarse_ns as now_ns;

/// Reverse halves whose forward half is gone are removed after this long (a forward half is
/// published microseconds after its claim, so anything older is left over from a crash).
const ORPHAN_GRACE_NS: u64 = 5_000_000_000;

/// When the mapping `key → m` (reverse half `o`) expires if no packet comes: its last packet plus
/// its phase's timeout.
pub fn deadline<A: Addr>(
    key: &FlowKeyOf<A>,
    m: &MappingOf<A>,
    o: &OriginOf<A>,
    t: &Timeouts,
) -> u64 {
    let (timeout, _) = timeout_of(key, m, o, t);
    last_seen(m, o).saturating_add(duration_ns(timeout))
}

/// When a mapping of protocol `p` that had an event after `since_ns` can first expire: a packet
/// after `since_ns` left a stamp no older than `since_ns - REFRESH_NS`, and no timeout of the
/// protocol is shorter than [`Timeouts::shortest`].
pub fn after_event(p: u8, since_ns: u64, t: &Timeouts) -> u64 {
    since_ns
        .saturating_sub(REFRESH_NS)
        .saturating_add(duration_ns(t.shortest(p)))
}

/// How long to go without a full pass after one that took `took`: at least a minute, and long
/// enough that full passes cost at most 1 % of a CPU.
pub fn full_pass_period(took: Duration) -> Duration {
    took.saturating_mul(100).max(Duration::from_secs(60))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Forward keys by the time they are next worth a look. A key may be in it more than once (an
/// event while it waits); [`Schedule::due`] returns each once, and since every look schedules
/// the key at the same deadline as long as the mapping is unchanged, copies merge.
pub struct Schedule<A: Addr> {
    heap: BinaryHeap<Reverse<(u64, FlowKeyOf<A>)>>,
}

impl<A: Addr> Default for Schedule<A> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
        }
    }
}

impl<A: Addr + Ord> Schedule<A> {
    /// Look at `key` at `at_ns` (or at the first tick after).
    pub fn at(&mut self, key: &FlowKeyOf<A>, at_ns: u64) {
        self.heap.push(Reverse((at_ns, *key)));
    }

    /// The keys whose time has come by `now_ns`, each once, in key order.
    pub fn due(&mut self, now_ns: u64) -> Vec<FlowKeyOf<A>> {
        let mut keys = Vec::new();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now_ns {
                break;
            }
            if let Some(Reverse((_, key))) = self.heap.pop() {
                keys.push(key);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Replaces everything with `entries` (key, time) (a full pass saw every mapping).
    fn replace(&mut self, entries: Vec<(FlowKeyOf<A>, u64)>) {
        let v: Vec<_> = entries
            .into_iter()
            .map(|(k, at)| Reverse((at, k)))
            .collect();
        self.heap = BinaryHeap::from(v);
    }

    /// Entries waiting (copies included).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }
}

/// What a tick did, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickStats {
    /// A full pass ran (every mapping looked at).
    pub full: bool,
    /// Mappings looked at (both halves read).
    pub looked: usize,
    pub released: usize,
}

/// Releases expired mappings of one family on schedule; keeps totals of what it released.
pub struct Sweeper<A: Addr> {
    pub expired: BTreeMap<(Proto, Reason), u64>,
    /// Full passes so far.
    pub full_passes: u64,
    /// Use counts seen at zero on the previous pass (removed if still zero now).
    zero_uses: HashSet<UseKeyOf<A>>,
    schedule: Schedule<A>,
    /// When the next full pass is due (`None`: at the next tick).
    next_full_ns: Option<u64>,
    /// `Counter::ExpiryEventsLost` as last read.
    lost_seen: u64,
    /// When the events were last read: later events are of packets after it.
    last_read_ns: u64,
}

impl<A: Addr> Default for Sweeper<A> {
    fn default() -> Self {
        Self {
            expired: BTreeMap::new(),
            full_passes: 0,
            zero_uses: HashSet::new(),
            schedule: Schedule::default(),
            next_full_ns: None,
            lost_seen: 0,
            last_read_ns: 0,
        }
    }
}

/// Runs a batch of releases through the kernel's release program of the family.
pub type Release<'a, A> = &'a dyn Fn(&mut [ReleaseEntryOf<A>]) -> Result<(), DatapathError>;

impl<A: Addr + Ord> Sweeper<A>
where
    FlowKeyOf<A>: aya::Pod,
    MappingOf<A>: aya::Pod,
    OriginOf<A>: aya::Pod,
    UseKeyOf<A>: aya::Pod,
{
    /// One `--gc-interval` tick at `now_ns`: `events` are the keys read from the datapath's ring
    /// just now (after `now_ns` was taken), `lost` its count of events that did not fit. Looks
    /// at the mappings whose time has come (or at every mapping, when a full pass is due),
    /// releases the expired ones through `release`, and schedules the others.
    pub fn tick(
        &mut self,
        tables: &mut TablesOf<A>,
        events: &[FlowKeyOf<A>],
        lost: u64,
        release: Release<'_, A>,
        t: &Timeouts,
        now_ns: u64,
    ) -> Result<TickStats, DatapathError> {
        if lost > self.lost_seen {
            warn!(
                "{} expiry events did not fit in the datapath's ring: looking at every mapping once",
                lost - self.lost_seen
            );
            self.lost_seen = lost;
            self.next_full_ns = None;
        }
        let stats = if self.next_full_ns.is_none_or(|at| now_ns >= at) {
            self.last_read_ns = now_ns;
            let started = Instant::now();
            let released = self.sweep(tables, release, t, now_ns)?;
            let took = started.elapsed();
            let period = full_pass_period(took);
            self.next_full_ns = Some(now_ns.saturating_add(duration_ns(period)));
            let n = self.schedule.len();
            if self.full_passes == 1 {
                info!("expiry: looked at all {n} mappings in {took:.2?} (again every {period:.0?}; between, only at those due or changed)");
            } else {
                debug!("expiry: full pass over {n} mappings in {took:.2?}");
            }
            TickStats {
                full: true,
                looked: n + released,
                released,
            }
        } else {
            let due = self.due(events, t, now_ns);
            let released = self.look(tables, &due, release, t, now_ns)?;
            TickStats {
                full: false,
                looked: due.len(),
                released,
            }
        };
        self.sweep_uses(tables)?;
        Ok(stats)
    }

    /// Schedules the mappings of `events` (read after `now_ns` was taken) when they can first
    /// expire, and returns the keys whose time has come by `now_ns`.
    fn due(&mut self, events: &[FlowKeyOf<A>], t: &Timeouts, now_ns: u64) -> Vec<FlowKeyOf<A>> {
        let since = std::mem::replace(&mut self.last_read_ns, now_ns);
        for key in events {
            self.schedule.at(key, after_event(key.proto, since, t));
        }
        self.schedule.due(now_ns)
    }

    /// Looks at the mappings of `keys`: releases the expired, schedules the others.
    fn look(
        &mut self,
        tables: &mut TablesOf<A>,
        keys: &[FlowKeyOf<A>],
        release: Release<'_, A>,
        t: &Timeouts,
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let mut doomed = Vec::new();
        for key in keys {
            // Gone (released, or a stale copy of a key): nothing to schedule.
            let Ok(m) = tables.fwd.get(key, 0) else {
                continue;
            };
            if m.key != *key {
                continue;
            }
            let o = tables.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
            self.judge(key, &m, o.as_ref(), now_ns, t, &mut doomed);
        }
        self.release(&doomed, release, now_ns)
    }

    /// Dooms the mapping if it expired by `now_ns`, else schedules it at its deadline.
    fn judge(
        &mut self,
        key: &FlowKeyOf<A>,
        m: &MappingOf<A>,
        o: Option<&OriginOf<A>>,
        now_ns: u64,
        t: &Timeouts,
        doomed: &mut Vec<(ReleaseEntryOf<A>, Reason)>,
    ) {
        match (expiry(key, m, o, now_ns, t), o) {
            (Some(reason), _) => doomed.push((ReleaseEntryOf::new(*key, m, o), reason)),
            (None, Some(o)) => self.schedule.at(key, deadline(key, m, o, t)),
            (None, None) => {}
        }
    }

    /// Releases `doomed` through the kernel; one a packet refreshed meanwhile is looked at again
    /// at the next tick. Returns how many were released.
    fn release(
        &mut self,
        doomed: &[(ReleaseEntryOf<A>, Reason)],
        release: Release<'_, A>,
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let mut entries: Vec<ReleaseEntryOf<A>> = doomed.iter().map(|(e, _)| *e).collect();
        release(&mut entries)?;
        let mut released = 0;
        for (e, (_, reason)) in entries.iter().zip(doomed) {
            match e.result {
                release_result::RELEASED => {
                    if let Some(p) = Proto::from_number(e.key.proto) {
                        *self.expired.entry((p, *reason)).or_default() += 1;
                    }
                    released += 1;
                }
                release_result::GONE => {}
                _ => self.schedule.at(&e.key, now_ns),
            }
        }
        Ok(released)
    }

    /// A full pass at `now_ns`: looks at every mapping, releases the expired ones through the
    /// kernel's release program (`release`), which keeps any a packet refreshed meanwhile and
    /// updates the use counts, schedules the others at their deadlines, and removes port claims
    /// left without a forward half. Returns how many mappings it released.
    pub fn sweep(
        &mut self,
        tables: &mut TablesOf<A>,
        release: Release<'_, A>,
        t: &Timeouts,
        now_ns: u64,
    ) -> Result<usize, DatapathError> {
        let mut doomed = Vec::new();
        let mut scheduled = Vec::new();
        batch::for_each(&tables.fwd, |key, m| {
            let o = tables.rev.get(&key.reply(m.nat_addr, m.nat_port), 0).ok();
            match expiry(&key, &m, o.as_ref(), now_ns, t) {
                Some(reason) => doomed.push((ReleaseEntryOf::new(key, &m, o.as_ref()), reason)),
                None => {
                    if let Some(o) = o {
                        scheduled.push((key, deadline(&key, &m, &o, t)));
                    }
                }
            }
        })?;
        self.schedule.replace(scheduled);
        let mut released = self.release(&doomed, release, now_ns)?;
        self.full_passes += 1;
        released += self.sweep_orphan_claims(tables, now_ns)?;
        Ok(released)
    }

    /// The schedule, for tests and benchmarks.
    pub fn schedule(&self) -> &Schedule<A> {
        &self.schedule
    }

    /// Removes use counts that were zero on this pass and the previous one (a count the
    /// datapath bumps in between loses that bump; caps are then one looser until it settles).
    fn sweep_uses(&mut self, tables: &mut TablesOf<A>) -> Result<(), DatapathError> {
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
        tables: &mut TablesOf<A>,
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
    use snat_common::{
        tcp::{SEEN_FIN, SEEN_RST, SEEN_SYN},
        FlowKey, Mapping, Origin,
    };

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
    fn the_schedule_returns_due_keys_once() {
        let key = |i: u8| FlowKey::new(proto::UDP, [10, 0, 0, i], [0, 1], [203, 0, 113, 5], [0; 2]);
        let mut s = Schedule::default();
        s.at(&key(2), 5 * S);
        s.at(&key(1), 3 * S);
        s.at(&key(2), 4 * S); // an event while it waits
        s.at(&key(3), 9 * S);
        assert_eq!((s.len(), s.next()), (4, Some(3 * S)));
        assert!(s.due(3 * S - 1).is_empty());
        assert_eq!(s.due(5 * S), [key(1), key(2)], "each once");
        assert_eq!(s.due(8 * S), []);
        assert_eq!(s.due(9 * S), [key(3)]);
        assert!(s.is_empty());
    }

    #[test]
    fn deadlines_and_the_earliest_expiry_after_an_event() {
        let t = timeouts();
        let (k, m, o) = pair(proto::TCP, SEEN_SYN, SEEN_SYN, 100 * S, 200 * S);
        assert_eq!(deadline(&k, &m, &o, &t), 200 * S + 7440 * S);
        // A TCP event can mean a RST: 15 s, less the stamps' slack.
        assert_eq!(after_event(proto::TCP, 50 * S, &t), 65 * S - REFRESH_NS);
        // UDP: DNS's 30 s is the shortest; ICMP: its one timeout.
        assert_eq!(after_event(proto::UDP, 50 * S, &t), 80 * S - REFRESH_NS);
        assert_eq!(after_event(proto::ICMP, 50 * S, &t), 110 * S - REFRESH_NS);
        assert_eq!(
            full_pass_period(Duration::from_millis(30)),
            Duration::from_secs(60)
        );
        assert_eq!(
            full_pass_period(Duration::from_secs(3)),
            Duration::from_secs(300)
        );
    }

    /// A tiny deterministic generator (xorshift), so the simulation needs no crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The datapath's stamp rule (`mapping::refresh` in snat-ebpf).
    fn stamp(seen: &mut u64, now: u64) {
        if now.wrapping_sub(*seen) > REFRESH_NS {
            *seen = now;
        }
    }

    /// Simulated time, mappings and packets (the datapath's stamps and events as in snat-ebpf),
    /// ticks that only look at what the schedule says: at every tick, no mapping is left that
    /// expired by then, although the ticks look at a small part of the mappings.
    #[test]
    fn scheduled_looks_release_every_mapping_at_the_first_tick_after_its_timeout() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(40),
            tcp_transitory: Duration::from_secs(12),
            tcp_fin: Duration::from_secs(8),
            tcp_rst: Duration::from_secs(3),
            udp: Duration::from_secs(20),
            udp_ports: BTreeMap::from([(53, Duration::from_secs(5))]),
            icmp: Duration::from_secs(6),
        };
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut table: std::collections::HashMap<FlowKey, (Mapping, Origin)> = Default::default();
        let mut sweeper = Sweeper::default();
        let (mut looks, mut mapping_ticks, mut released, mut next_port) = (0, 0, 0, 1u16);
        for tick in 1..=400u64 {
            let mut events = Vec::new();
            // Packets at random moments of the second before the tick.
            for _ in 0..rng.below(40) {
                let at = (tick - 1) * S + rng.below(S);
                let keys: Vec<FlowKey> = table.keys().copied().collect();
                if keys.is_empty() || rng.below(3) == 0 {
                    // A new flow (the datapath sends an event).
                    let p = [proto::TCP, proto::UDP, proto::ICMP][rng.below(3) as usize];
                    next_port = next_port.wrapping_add(1);
                    let key = FlowKey::new(
                        p,
                        [10, 0, 0, 2],
                        next_port.to_be_bytes(),
                        [203, 0, 113, 5],
                        [0; 2],
                    );
                    let mut m = Mapping::new(key, [198, 51, 100, 1], next_port.to_be_bytes(), at);
                    if p == proto::TCP {
                        m.record(SEEN_SYN);
                    } else if p == proto::UDP {
                        m.window = [[0, 53], [0x13, 0x88]][rng.below(2) as usize];
                    }
                    let o = Origin::new(
                        key.reply(m.nat_addr, m.nat_port),
                        key.src_addr,
                        key.src_port,
                        at,
                    );
                    table.insert(key, (m, o));
                    events.push(key);
                    continue;
                }
                let key = keys[rng.below(keys.len() as u64) as usize];
                let (m, o) = table.get_mut(&key).unwrap();
                let outbound = rng.below(2) == 0;
                if outbound {
                    stamp(&mut m.last_seen_ns, at);
                } else {
                    stamp(&mut o.last_seen_ns, at);
                }
                match key.proto {
                    proto::TCP => {
                        let bits = [0, 0, SEEN_SYN, SEEN_FIN, SEEN_RST][rng.below(5) as usize];
                        let before = Phase::of_halves(m, o);
                        if outbound && bits != SEEN_SYN {
                            m.record(bits);
                        } else if !outbound {
                            o.record(m.epoch, bits);
                        }
                        if bits != 0 && Phase::of_halves(m, o) != before {
                            events.push(key);
                        }
                    }
                    proto::UDP if outbound && rng.below(8) == 0 && m.window != [0; 2] => {
                        m.window = [0; 2]; // a second remote port
                        events.push(key);
                    }
                    _ => {}
                }
            }
            let now = tick * S;
            let due = sweeper.due(&events, &t, now);
            looks += due.len();
            mapping_ticks += table.len();
            let mut doomed = Vec::new();
            for key in &due {
                if let Some((m, o)) = table.get(key) {
                    sweeper.judge(key, m, Some(o), now, &t, &mut doomed);
                }
            }
            for (e, _) in doomed {
                table.remove(&e.key);
                released += 1;
            }
            for (key, (m, o)) in &table {
                assert_eq!(
                    expiry(key, m, Some(o), now, &t),
                    None,
                    "tick {tick}: {key:?} expired at {} s and is still there",
                    deadline(key, m, o, &t) as f64 / S as f64
                );
            }
        }
        assert!(released > 1000, "{released}");
        assert!(
            looks * 4 < mapping_ticks,
            "looked {looks} times where a walk per tick looks {mapping_ticks} times"
        );
    }

    #[test]
    fn clock_moves() {
        let a = now_ns();
        std::thread::sleep(Duration::from_millis(20));
        assert!(now_ns() > a);
    }
}
