//! One node's side of on-demand port blocks, as a sans-IO state machine (STYLE.md §12): it takes
//! store replies, datapath usage and timeouts (each with `now`, the node's `CLOCK_BOOTTIME`),
//! queues commands ([`Node::next_command`]) and says when it next needs waking
//! ([`Node::poll_timeout`]). It does no IO: the agent's loop runs the commands against etcd and the
//! maps; the simulation (`sim.rs`) runs them against a fake store with a fake clock.
//!
//! The rule it serves: one (NAT IP, port) is never used by two nodes at once, and a new owner
//! never uses a port sooner than the cool-down after its previous owner last sent from it. How:
//! - A block is ours from a claim transaction (`create_revision == 0` → put with our lease) until
//!   we delete it or the lease ends. Its epoch is the key's create revision: unique per claim.
//! - **Fence.** Every keep-alive answer with TTL > 0 gives a deadline, its *send* time plus the
//!   TTL (etcd restarts the TTL when it processes the request, which is later). The datapath may
//!   translate in our blocks only until `valid_until = deadline − fence_margin − cooldown`; it
//!   checks that itself, so a dead or stopped agent stops translating too. Another node can claim
//!   the block only after the lease is gone, at the deadline or later (earlier by less than the
//!   margin where etcd revokes early), so the cool-down separates the two owners.
//! - **Release.** A block goes back only when closed to new mappings and empty for the cool-down
//!   (then its ports are reusable at once); the delete is conditional on our epoch.
//! - A block enters the datapath only once every registered gateway has applied its claim.
//! - A snapshot of the store never revives a block we released: a record is adopted only when
//!   created after our last release of that block, and a held block is forgotten only when a
//!   snapshot newer than its claim lacks it.
//!
//! The datapath applies [`DatapathOp`]s in order, before the next input is handed in.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    time::Duration,
};

use super::{
    geometry::{BlockId, Geometry},
    Rng,
};

/// `CLOCK_BOOTTIME` in nanoseconds (the clock `bpf_ktime_get_boot_ns` reads).
pub type Nanos = u64;
/// An etcd lease ID.
pub type LeaseId = i64;
/// Identifies a store operation's reply.
pub type OpId = u64;

fn ns(d: Duration) -> Nanos {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// The timers, validated so that the fence works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timers {
    pub lease_ttl: Duration,
    pub cooldown: Duration,
    pub fence_margin: Duration,
    /// Keep-alive period while answers come (a sixth of the TTL: five can be lost before the
    /// fence closes at the defaults).
    pub keepalive_every: Duration,
    /// First retry after a failed store operation; doubles up to `keepalive_every`.
    pub retry: Duration,
    /// A claim picks its block from a snapshot of the store no older than this.
    pub list_max_age: Duration,
    /// How often a claimed block's gateway revision is polled.
    pub gateway_poll: Duration,
}

impl Timers {
    /// Timers from validated settings (`settings::cluster` checks that the TTL is whole
    /// seconds and longer than the cool-down plus the margin).
    pub fn new(lease_ttl: Duration, cooldown: Duration, fence_margin: Duration) -> Self {
        Self {
            lease_ttl,
            cooldown,
            fence_margin,
            keepalive_every: lease_ttl / 6,
            retry: Duration::from_millis(250),
            list_max_age: Duration::from_secs(1),
            gateway_poll: Duration::from_millis(5),
        }
    }

    pub fn ttl_s(&self) -> u32 {
        self.lease_ttl.as_secs() as u32
    }

    /// How long before the lease's deadline the datapath stops translating.
    fn fence(&self) -> Nanos {
        ns(self.fence_margin + self.cooldown)
    }
}

/// What one node runs with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// Where replies for this node's blocks go.
    pub address: Ipv4Addr,
    pub geometry: Geometry,
    pub timers: Timers,
    /// Blocks kept on each NAT IP even when idle (`--min-blocks`).
    pub min_blocks: u16,
    /// Cap per NAT IP (`--max-blocks`); `None`: leave every other registered node its minimum.
    pub max_blocks: Option<u16>,
    /// Another block is claimed when a new flow to the node's busiest destination could get
    /// fewer free ports than this (half a block in the agent).
    pub low_water: u32,
    pub seed: u64,
}

/// What survived an agent restart in the pinned state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub lease: Option<LeaseId>,
    pub blocks: Vec<RestoredBlock>,
}

/// A block the datapath held when the agent started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoredBlock {
    pub block: BlockId,
    pub epoch: i64,
    /// Open to new mappings (else closed: the previous agent may have sent its release).
    pub open: bool,
}

/// One operation on the store (etcd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Create `/snat/v1/config` if absent, else read it.
    CreateConfig(Geometry),
    Grant {
        ttl_s: u32,
    },
    KeepAlive {
        lease: LeaseId,
    },
    /// Create `nodes/<name>` with the lease if absent, else read its lease.
    Register {
        lease: LeaseId,
    },
    /// Read the whole prefix: blocks, nodes, gateways.
    List,
    /// Read only the gateways' records (what a claimed block waits for: cheap to poll).
    Gateways,
    /// Create `blocks/<ip>/<index>` with the lease if absent.
    Claim {
        block: BlockId,
        lease: LeaseId,
    },
    /// Delete the block's key if its create revision is `epoch`.
    Release {
        block: BlockId,
        epoch: i64,
    },
    Revoke {
        lease: LeaseId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreReply {
    ConfigCreated,
    ConfigExists(Geometry),
    Granted {
        lease: LeaseId,
        ttl_s: u32,
    },
    /// The gateways' live records (the applied revision each published) and the names of
    /// every known gateway.
    Gateways {
        live: Vec<GatewayRecord>,
        known: Vec<String>,
    },
    /// A keep-alive's answer: the TTL etcd restarted the lease with, 0 when it is gone.
    Alive {
        ttl_s: u32,
    },
    Registered,
    NameTaken {
        lease: LeaseId,
    },
    Listed(Snapshot),
    Claimed {
        epoch: i64,
    },
    ClaimTaken,
    /// The key was deleted at `revision`.
    Released {
        revision: i64,
    },
    /// The key was not ours any more (already gone or re-claimed) as of `revision`.
    NotOurs {
        revision: i64,
    },
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The operation was certainly not applied (e.g. no connection when it was sent).
    #[error("not applied: {0}")]
    NotApplied(String),
    /// It may or may not have been applied (timeout after sending, connection lost).
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// The store's prefix at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub nodes: Vec<NodeRecord>,
    pub blocks: Vec<BlockRecord>,
    pub gateways: Vec<GatewayRecord>,
    /// Gateways that registered and have not left on purpose; one without a live record (its
    /// lease lapsed: cut off from etcd) is still waited for.
    pub known_gateways: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub lease: LeaseId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    pub block: BlockId,
    pub node: String,
    pub lease: LeaseId,
    /// The key's create revision: the claim's epoch.
    pub epoch: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRecord {
    pub name: String,
    pub applied: i64,
}

/// A change to the datapath's block table (pinned with the maps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatapathOp {
    /// Remember the lease the blocks are held under (pinned; `None`: no lease).
    SetLease(Option<LeaseId>),
    /// New mappings may use the block; every packet in it is translated until `valid_until`.
    Open {
        block: BlockId,
        epoch: i64,
        valid_until: Nanos,
    },
    /// No new mappings in the block; its mappings keep translating.
    Close { block: BlockId },
    /// Every held block is valid until this (one good keep-alive).
    Extend { valid_until: Nanos },
    /// The block is not ours: delete its mappings (TCP flows are answered with RSTs).
    Forget { block: BlockId },
    /// Whether another block on the NAT IP is on its way: a flow that finds no port is then
    /// held back (dropped, its retransmission finds the block) rather than refused.
    Growing { nat_ip: Ipv4Addr, growing: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Store {
        id: OpId,
        op: StoreOp,
    },
    Datapath(DatapathOp),
    /// The agent must not run: the message says why and what to do.
    Fatal(String),
    /// A drain finished: every block went back.
    Drained,
}

/// What the datapath reports about the node's blocks, read before each [`Node::handle_usage`].
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub blocks: Vec<BlockUse>,
    pub pressure: Vec<Pressure>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockUse {
    pub block: BlockId,
    /// Mappings in the block.
    pub live: u32,
    /// The last time a mapping in it was seen alive (or released): no port of the block was
    /// used after it.
    pub last_active: Nanos,
}

/// Per NAT IP: what a new flow to the node's busiest destination could still get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pressure {
    pub nat_ip: Ipv4Addr,
    /// Free ports in the node's open blocks on the IP for that destination.
    pub free: u32,
    /// A flow was refused for want of a port since the last report.
    pub refused: bool,
}

/// Why a node that wants a block has none to use yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shortage {
    /// Every block of every NAT IP is held.
    RangeFull,
    /// `--max-blocks` reached on every NAT IP with a free block.
    MaxBlocks,
    /// The store cannot be reached, or the lease is not valid.
    Unreachable,
    /// A claim is on its way (or waits for the gateway).
    ClaimPending,
}

impl Shortage {
    pub const fn name(self) -> &'static str {
        match self {
            Shortage::RangeFull => "range_full",
            Shortage::MaxBlocks => "max_blocks",
            Shortage::Unreachable => "unreachable",
            Shortage::ClaimPending => "claim_pending",
        }
    }
}

/// Where a held block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Claimed; enters the datapath once the gateways have applied `revision`.
    AwaitGateway {
        revision: i64,
    },
    Open {
        since: Nanos,
    },
    /// Closed to new mappings at `since`, on its way back; re-opened on demand unless a
    /// previous agent closed it (its release may still be on its way to the store).
    Closed {
        since: Nanos,
        reopen: bool,
    },
    /// The conditional delete is on its way (or will be retried at `retry_at`).
    Releasing {
        retry_at: Option<Nanos>,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub epoch: i64,
    pub state: BlockState,
    pub live: u32,
    pub last_active: Nanos,
    /// When `live` was observed.
    pub observed: Nanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading or writing the cluster's geometry.
    Config,
    /// Asking whether the restored lease still lives.
    Recover,
    /// Listing the store to adopt the restored lease's blocks.
    Adopt,
    Grant,
    Register,
    Ready,
    Failed,
}

/// Counters for the metrics.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// By result: `ok`, `taken`, `error`.
    pub claims: BTreeMap<&'static str, u64>,
    /// By reason: `idle`, `drain`, `lease_lost`, `gone`.
    pub releases: BTreeMap<&'static str, u64>,
    pub keepalive_rtt: Option<Duration>,
    /// From the first want of a block to the block open in the datapath.
    pub claim_latency: Option<Duration>,
    pub leases_lost: u64,
    /// Blocks taken over from a previous agent under the same live lease.
    pub adopted: u64,
}

/// What the report shows of the node (`snat status`, metrics).
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub node: String,
    pub lease: Option<LeaseId>,
    pub ready: bool,
    pub connected: bool,
    /// Held blocks: id, epoch, state, mappings.
    pub blocks: Vec<(BlockId, i64, BlockState, u32)>,
    /// Nanoseconds until the datapath stops translating in our blocks (0: suspended or none).
    pub fence_in: u64,
    pub suspended: bool,
    pub shortage: BTreeMap<Ipv4Addr, Shortage>,
    pub stats: Stats,
}

/// One node's block allocator.
pub struct Node {
    cfg: NodeConfig,
    phase: Phase,
    draining: bool,
    /// The datapath is gone (see [`Node::detached`]).
    detached: bool,
    lease: Option<LeaseId>,
    /// Best deadline from the current lease's keep-alives (send time + TTL).
    deadline: Nanos,
    restored: Restored,
    held: BTreeMap<BlockId, Held>,
    /// Revision of our last release of each block: older records of it are stale.
    released: BTreeMap<BlockId, i64>,
    view: Option<(Nanos, Snapshot)>,
    /// Blocks found taken since the last snapshot.
    taken: BTreeSet<BlockId>,
    pressure: BTreeMap<Ipv4Addr, Pressure>,
    pending: BTreeMap<OpId, (StoreOp, Nanos)>,
    next_id: OpId,
    out: VecDeque<Command>,
    /// Next keep-alive (none in flight when set).
    keepalive_at: Option<Nanos>,
    /// When the phase's operation (or a failed claim) is retried.
    retry_at: Option<Nanos>,
    backoff: Duration,
    list_at: Option<Nanos>,
    /// When to read the gateways' records again (a claimed block awaits them).
    gateways_at: Option<Nanos>,
    /// The first moment an unmet want of a block was seen.
    wanting_since: Option<Nanos>,
    shortage: BTreeMap<Ipv4Addr, Shortage>,
    /// NAT IPs the datapath was last told another block is on its way for.
    growing: BTreeSet<Ipv4Addr>,
    connected: bool,
    rng: Rng,
    /// The latest `now` handed in.
    now: Nanos,
    pub stats: Stats,
}

impl Node {
    pub fn new(cfg: NodeConfig, restored: Restored, now: Nanos) -> Self {
        let rng = Rng::new(cfg.seed);
        let backoff = cfg.timers.retry;
        let mut node = Self {
            cfg,
            phase: Phase::Config,
            draining: false,
            detached: false,
            lease: None,
            deadline: 0,
            restored,
            held: BTreeMap::new(),
            released: BTreeMap::new(),
            view: None,
            taken: BTreeSet::new(),
            pressure: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: 1,
            out: VecDeque::new(),
            keepalive_at: None,
            retry_at: None,
            backoff,
            list_at: None,
            gateways_at: None,
            wanting_since: None,
            shortage: BTreeMap::new(),
            growing: BTreeSet::new(),
            connected: false,
            rng,
            now,
            stats: Stats::default(),
        };
        node.send(StoreOp::CreateConfig(node.cfg.geometry.clone()), now);
        node
    }

    pub fn next_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// The earliest moment something is due; `None` while only replies can move it.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.phase == Phase::Failed {
            return None;
        }
        let mut t = [
            self.keepalive_at,
            self.retry_at,
            self.list_at,
            self.gateways_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let mut at = |x: Nanos| t = Some(t.map_or(x, |t| t.min(x)));
        let cooldown = ns(self.cfg.timers.cooldown);
        for h in self.held.values() {
            match h.state {
                BlockState::Closed { since, .. } if h.live == 0 && h.observed >= since => {
                    at(since.max(h.last_active) + cooldown)
                }
                BlockState::Releasing { retry_at: Some(r) } => at(r),
                _ => {}
            }
        }
        if self.lease.is_some() && !self.held.is_empty() && self.valid_until() > self.now {
            at(self.valid_until()); // the moment the blocks become suspended
        }
        t
    }

    /// Until when the datapath may translate in our blocks.
    pub fn valid_until(&self) -> Nanos {
        self.deadline.saturating_sub(self.cfg.timers.fence())
    }

    pub fn suspended(&self, now: Nanos) -> bool {
        !self.held.is_empty() && now >= self.valid_until()
    }

    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }

    pub fn held(&self) -> &BTreeMap<BlockId, Held> {
        &self.held
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn shortage(&self) -> &BTreeMap<Ipv4Addr, Shortage> {
        &self.shortage
    }

    pub fn ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn status(&self, now: Nanos) -> Status {
        Status {
            node: self.cfg.name.clone(),
            lease: self.lease,
            ready: self.ready(),
            connected: self.connected,
            blocks: self
                .held
                .iter()
                .map(|(b, h)| (*b, h.epoch, h.state, h.live))
                .collect(),
            fence_in: self.valid_until().saturating_sub(now),
            suspended: self.suspended(now),
            shortage: self.shortage.clone(),
            stats: self.stats.clone(),
        }
    }

    /// The lease's deadline as this node knows it (send time of the best keep-alive + TTL).
    pub fn deadline(&self) -> Nanos {
        self.deadline
    }

    /// A node stopped before it was ready, with nothing to give back, is drained at once.
    fn drained_before_ready(&mut self) -> bool {
        let idle =
            self.phase != Phase::Ready && self.held.is_empty() && self.restored.blocks.is_empty();
        if idle {
            self.phase = Phase::Failed;
            self.out.push_back(Command::Drained);
        }
        idle
    }

    /// Stop taking blocks and give every held one back as it empties (`snat` stopping without
    /// `--keep-state`).
    pub fn drain(&mut self, now: Nanos) {
        self.draining = true;
        if !self.drained_before_ready() {
            self.step(now);
        }
    }

    /// The datapath was detached at `now` (a plain stop): nothing uses any block from now on,
    /// so each goes back a cool-down later, then the lease is revoked.
    pub fn detached(&mut self, now: Nanos) {
        self.detached = true;
        self.draining = true;
        for h in self.held.values_mut() {
            if !matches!(h.state, BlockState::Releasing { .. }) {
                h.state = BlockState::Closed {
                    since: now,
                    reopen: false,
                };
            }
            h.live = 0;
            h.last_active = h.last_active.max(now);
            h.observed = now;
        }
        if !self.drained_before_ready() {
            self.step(now);
        }
    }

    pub fn handle_timeout(&mut self, now: Nanos) {
        if self.phase == Phase::Failed {
            return;
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.retry_phase(now);
        }
        if self.keepalive_at.is_some_and(|t| t <= now) {
            if let Some(lease) = self.lease {
                self.keepalive_at = None;
                self.send(StoreOp::KeepAlive { lease }, now);
            }
        }
        if self.list_at.is_some_and(|t| t <= now) {
            self.list_at = None;
            self.list(now);
        }
        if self.gateways_at.is_some_and(|t| t <= now) {
            self.gateways_at = None;
            if !self
                .pending
                .values()
                .any(|(op, _)| *op == StoreOp::Gateways)
            {
                self.send(StoreOp::Gateways, now);
            }
        }
        let due: Vec<(BlockId, i64)> = self
            .held
            .iter()
            .filter(
                |(_, h)| matches!(h.state, BlockState::Releasing { retry_at: Some(t) } if t <= now),
            )
            .map(|(b, h)| (*b, h.epoch))
            .collect();
        for (block, epoch) in due {
            if let Some(h) = self.held.get_mut(&block) {
                h.state = BlockState::Releasing { retry_at: None };
            }
            self.send(StoreOp::Release { block, epoch }, now);
        }
        self.step(now);
    }

    /// A poll between full reads ([`Node::handle_usage`]): a refusal, or a lower estimate of the
    /// free ports. It never clears a refusal noted (only a full read can say there is room).
    pub fn handle_pressure(&mut self, pressure: &[Pressure], now: Nanos) {
        // Suspended, the refusals are the fence's, not demand (see `handle_usage`).
        if self.detached || self.suspended(now) {
            return;
        }
        for p in pressure {
            let e = self.pressure.entry(p.nat_ip).or_insert(*p);
            *e = Pressure {
                refused: p.refused || e.refused,
                ..*p
            };
        }
        self.step(now);
    }

    pub fn handle_usage(&mut self, usage: &Usage, now: Nanos) {
        if self.detached {
            return; // the maps still hold mappings nothing translates any more
        }
        for u in &usage.blocks {
            if let Some(h) = self.held.get_mut(&u.block) {
                h.live = u.live;
                h.last_active = h.last_active.max(u.last_active);
                h.observed = now;
            }
        }
        // While suspended, the datapath counts no port of the fenced blocks as free and refuses
        // every new flow: that is the fence, not demand. The pressure from before stands until
        // a report of the resumed blocks, or the node would claim a block it does not need.
        let pressure = if self.suspended(now) {
            &[][..]
        } else {
            &usage.pressure[..]
        };
        for p in pressure {
            let e = self.pressure.entry(p.nat_ip).or_insert(*p);
            // A refusal stays noted until a report says there is room again.
            let refused = p.refused || (e.refused && p.free == 0);
            *e = Pressure { refused, ..*p };
        }
        self.step(now);
    }

    pub fn handle_store(&mut self, id: OpId, reply: Result<StoreReply, StoreError>, now: Nanos) {
        let Some((op, sent)) = self.pending.remove(&id) else {
            return;
        };
        if self.phase == Phase::Failed {
            return;
        }
        self.connected = reply.is_ok();
        match (op, reply) {
            (StoreOp::CreateConfig(_), Ok(StoreReply::ConfigCreated)) => self.after_config(now),
            (StoreOp::CreateConfig(_), Ok(StoreReply::ConfigExists(stored))) => {
                let d = self.cfg.geometry.differences(&stored);
                if d.is_empty() {
                    self.after_config(now);
                } else {
                    self.fail(format!(
                        "this agent's flags disagree with the cluster's geometry in /snat/v1/config: {}; start it with the cluster's values",
                        d.join("; ")
                    ));
                }
            }
            (StoreOp::KeepAlive { lease }, Ok(StoreReply::Alive { ttl_s })) => {
                self.stats.keepalive_rtt = Some(Duration::from_nanos(now.saturating_sub(sent)));
                self.on_alive(lease, sent, ttl_s, now);
            }
            (StoreOp::KeepAlive { lease }, Err(_)) => {
                if self.lease == Some(lease) {
                    self.keepalive_at = Some(now + ns(self.cfg.timers.retry));
                }
            }
            (StoreOp::Grant { .. }, Ok(StoreReply::Granted { lease, ttl_s })) => {
                if self.phase != Phase::Grant {
                    return; // a late answer to a retried grant: that lease just expires
                }
                self.lease = Some(lease);
                self.deadline = sent + u64::from(ttl_s) * 1_000_000_000;
                self.push(DatapathOp::SetLease(Some(lease)));
                self.keepalive_at = Some(now + ns(self.cfg.timers.keepalive_every));
                self.phase = Phase::Register;
                self.reset_backoff();
                self.send(StoreOp::Register { lease }, now);
            }
            (StoreOp::Register { lease }, Ok(StoreReply::Registered)) => {
                self.registered(lease, now);
            }
            (StoreOp::Register { lease }, Ok(StoreReply::NameTaken { lease: other })) => {
                if other == lease {
                    self.registered(lease, now);
                } else {
                    self.fail(format!(
                        "node name {:?} is held by another agent's live lease {other:x} (hex, as etcdctl shows it): two agents must not share a name; give this one its own --node-name, or wait for that lease to expire (at most --lease-ttl) if its agent is gone",
                        self.cfg.name
                    ));
                }
            }
            (StoreOp::List, Ok(StoreReply::Listed(snap))) => self.on_snapshot(snap, now),
            (StoreOp::List, Err(_)) => {
                self.list_at = Some(now + ns(self.cfg.timers.retry));
            }
            (StoreOp::Gateways, Ok(StoreReply::Gateways { live, known })) => {
                // Newer than the snapshot's: only the gateways' part of the view changes.
                match &mut self.view {
                    Some((_, snap)) => {
                        snap.gateways = live;
                        snap.known_gateways = known;
                        self.open_applied(now);
                    }
                    None => self.list(now),
                }
            }
            (StoreOp::Gateways, Err(_)) => {
                self.gateways_at = Some(now + ns(self.cfg.timers.retry));
            }
            (StoreOp::Claim { block, lease }, Ok(StoreReply::Claimed { epoch })) => {
                *self.stats.claims.entry("ok").or_default() += 1;
                if self.lease == Some(lease) && !self.held.contains_key(&block) {
                    self.held.insert(
                        block,
                        Held {
                            epoch,
                            state: BlockState::AwaitGateway { revision: epoch },
                            live: 0,
                            last_active: 0,
                            observed: 0,
                        },
                    );
                    self.reset_backoff();
                    // Whether the gateways have applied it yet: their records are enough.
                    if self.view.is_some() {
                        self.send(StoreOp::Gateways, now);
                    } else {
                        self.list(now);
                    }
                }
            }
            (StoreOp::Claim { block, .. }, Ok(StoreReply::ClaimTaken)) => {
                *self.stats.claims.entry("taken").or_default() += 1;
                self.taken.insert(block);
            }
            (StoreOp::Claim { .. }, Err(e)) => {
                *self.stats.claims.entry("error").or_default() += 1;
                // Unknown: the snapshot tells whether the key is ours (and adopts it).
                self.view = None;
                if matches!(e, StoreError::Unknown(_)) {
                    self.list(now);
                }
                self.retry_at = Some(now + self.next_backoff());
            }
            (StoreOp::Release { block, epoch }, Ok(r)) => {
                let revision = match r {
                    StoreReply::Released { revision } | StoreReply::NotOurs { revision } => {
                        revision
                    }
                    _ => 0,
                };
                if self.held.get(&block).is_some_and(|h| h.epoch == epoch) {
                    self.forget(
                        block,
                        revision,
                        if self.draining { "drain" } else { "idle" },
                    );
                }
            }
            (StoreOp::Release { block, epoch }, Err(_)) => {
                let retry = now + self.next_backoff();
                if let Some(h) = self.held.get_mut(&block).filter(|h| h.epoch == epoch) {
                    h.state = BlockState::Releasing {
                        retry_at: Some(retry),
                    };
                }
            }
            (StoreOp::Revoke { .. }, _) => {
                self.lease = None;
                self.push(DatapathOp::SetLease(None));
                self.out.push_back(Command::Drained);
                self.phase = Phase::Failed; // done: nothing more to do
            }
            (_, Err(_)) => {
                // A phase operation failed: retry it.
                self.retry_at = Some(now + self.next_backoff());
            }
            (op, Ok(r)) => log::warn!("cluster: unexpected reply {r:?} to {op:?}"),
        }
        self.step(now);
    }

    fn after_config(&mut self, now: Nanos) {
        self.reset_backoff();
        match self.restored.lease {
            Some(lease) => {
                self.phase = Phase::Recover;
                self.lease = Some(lease);
                self.send(StoreOp::KeepAlive { lease }, now);
            }
            None => self.start_grant(now),
        }
    }

    fn start_grant(&mut self, now: Nanos) {
        self.phase = Phase::Grant;
        self.send(
            StoreOp::Grant {
                ttl_s: self.cfg.timers.ttl_s(),
            },
            now,
        );
    }

    fn registered(&mut self, _lease: LeaseId, now: Nanos) {
        if self.phase != Phase::Register {
            return;
        }
        self.phase = Phase::Ready;
        self.reset_backoff();
        self.list(now);
    }

    /// Re-sends the operation the phase waits for.
    fn retry_phase(&mut self, now: Nanos) {
        match self.phase {
            Phase::Config => self.send(StoreOp::CreateConfig(self.cfg.geometry.clone()), now),
            Phase::Recover => {
                if let Some(lease) = self.lease {
                    self.send(StoreOp::KeepAlive { lease }, now);
                }
            }
            Phase::Adopt => self.list(now),
            Phase::Grant => self.start_grant(now),
            Phase::Register => {
                if let Some(lease) = self.lease {
                    self.send(StoreOp::Register { lease }, now);
                }
            }
            Phase::Ready | Phase::Failed => {} // a claim's back-off ended: `step` claims
        }
    }

    fn on_alive(&mut self, lease: LeaseId, sent: Nanos, ttl_s: u32, now: Nanos) {
        if self.lease != Some(lease) {
            return; // a previous lease's late answer
        }
        if ttl_s == 0 {
            self.lease_lost(now);
            return;
        }
        self.reset_backoff();
        let before = self.valid_until();
        self.deadline = self.deadline.max(sent + u64::from(ttl_s) * 1_000_000_000);
        if self.valid_until() > before && !self.held.is_empty() {
            self.push(DatapathOp::Extend {
                valid_until: self.valid_until(),
            });
        }
        if self.keepalive_at.is_none() && !self.keepalive_in_flight() {
            self.keepalive_at = Some(now + ns(self.cfg.timers.keepalive_every));
        }
        // A fresh look at the store once per keep-alive: a block someone deleted under us
        // (`snat cluster release`, an operator) is forgotten within one period.
        let stale = self
            .view
            .as_ref()
            .is_none_or(|(at, _)| now.saturating_sub(*at) >= ns(self.cfg.timers.keepalive_every));
        if self.phase == Phase::Ready && stale {
            self.list(now);
        }
        if self.phase == Phase::Recover {
            self.phase = Phase::Adopt;
            // The restored blocks stay in the datapath, fenced by their old valid-until,
            // until the snapshot says which are still ours.
            for r in std::mem::take(&mut self.restored.blocks) {
                self.held.insert(
                    r.block,
                    Held {
                        epoch: r.epoch,
                        state: if r.open {
                            BlockState::Open { since: now }
                        } else {
                            BlockState::Closed {
                                since: now,
                                reopen: false,
                            }
                        },
                        live: 0,
                        last_active: now,
                        observed: 0,
                    },
                );
            }
            // No Extend yet: a pinned block may have been released just before the crash.
            self.list(now);
        }
    }

    fn keepalive_in_flight(&self) -> bool {
        self.pending
            .values()
            .any(|(op, _)| matches!(op, StoreOp::KeepAlive { .. }))
    }

    /// The store says the lease is gone: everything in our blocks is void.
    fn lease_lost(&mut self, now: Nanos) {
        self.stats.leases_lost += 1;
        if self.phase == Phase::Recover {
            for r in std::mem::take(&mut self.restored.blocks) {
                self.push(DatapathOp::Forget { block: r.block });
            }
        }
        for block in self.held.keys().copied().collect::<Vec<_>>() {
            self.forget(block, 0, "lease_lost");
        }
        self.lease = None;
        self.deadline = 0;
        self.keepalive_at = None;
        self.released.clear();
        self.push(DatapathOp::SetLease(None));
        if self.draining {
            self.out.push_back(Command::Drained);
            self.phase = Phase::Failed;
            return;
        }
        self.start_grant(now);
    }

    fn forget(&mut self, block: BlockId, revision: i64, reason: &'static str) {
        if self.held.remove(&block).is_some() {
            *self.stats.releases.entry(reason).or_default() += 1;
            self.push(DatapathOp::Forget { block });
        }
        if revision > 0 {
            let r = self.released.entry(block).or_default();
            *r = (*r).max(revision);
        }
    }

    fn on_snapshot(&mut self, snap: Snapshot, now: Nanos) {
        let Some(lease) = self.lease else { return };
        if self
            .view
            .as_ref()
            .is_some_and(|(_, v)| v.revision > snap.revision)
        {
            return; // an older snapshot arriving late
        }
        let ours: BTreeMap<BlockId, i64> = snap
            .blocks
            .iter()
            .filter(|r| r.lease == lease)
            .map(|r| (r.block, r.epoch))
            .collect();
        // Held blocks the store no longer has (or has under another claim) are not ours.
        let lost: Vec<BlockId> = self
            .held
            .iter()
            .filter(|(b, h)| snap.revision >= h.epoch && ours.get(b) != Some(&h.epoch))
            .map(|(b, _)| *b)
            .collect();
        for block in lost {
            let state = self.held[&block].state;
            let reason = if matches!(state, BlockState::Releasing { .. }) {
                if self.draining {
                    "drain"
                } else {
                    "idle"
                }
            } else {
                "gone"
            };
            self.forget(block, snap.revision, reason);
        }
        // Blocks the store says are ours that we do not hold: an unknown claim that landed.
        let adopt = self.phase == Phase::Adopt;
        for (&block, &epoch) in &ours {
            if self.held.contains_key(&block)
                || self.released.get(&block).is_some_and(|&r| epoch <= r)
                || !self.cfg.geometry.holds(block)
            {
                continue;
            }
            self.held.insert(
                block,
                Held {
                    epoch,
                    state: BlockState::AwaitGateway { revision: epoch },
                    live: 0,
                    last_active: 0,
                    observed: 0,
                },
            );
        }
        self.view = Some((now, snap));
        self.taken.clear();
        if adopt {
            // The restored blocks the store confirms are ours translate again.
            let valid_until = self.valid_until();
            let confirmed: Vec<(BlockId, i64)> = self
                .held
                .iter()
                .filter(|(_, h)| matches!(h.state, BlockState::Open { .. }))
                .map(|(b, h)| (*b, h.epoch))
                .collect();
            self.stats.adopted += confirmed.len() as u64;
            // Closed ones keep draining: their mappings translate until the new valid-until.
            if self
                .held
                .values()
                .any(|h| matches!(h.state, BlockState::Closed { .. }))
            {
                self.push(DatapathOp::Extend { valid_until });
            }
            for (block, epoch) in confirmed {
                self.push(DatapathOp::Open {
                    block,
                    epoch,
                    valid_until,
                });
            }
            self.phase = Phase::Register;
            self.send(StoreOp::Register { lease }, now);
        }
        self.open_applied(now);
    }

    /// Opens claimed blocks the gateways have applied; polls again for the others.
    fn open_applied(&mut self, now: Nanos) {
        let Some((_, snap)) = &self.view else { return };
        // A known gateway without a live record (cut off past its lease) has applied nothing
        // we can see: wait for it.
        let absent = snap
            .known_gateways
            .iter()
            .any(|k| !snap.gateways.iter().any(|g| &g.name == k));
        let applied = if absent {
            Some(i64::MIN)
        } else {
            snap.gateways.iter().map(|g| g.applied).min()
        };
        let valid_until = self.valid_until();
        let mut waiting = false;
        let mut opened = Vec::new();
        for (block, h) in &mut self.held {
            if let BlockState::AwaitGateway { revision } = h.state {
                if applied.is_none_or(|a| a >= revision) {
                    h.state = BlockState::Open { since: now };
                    h.last_active = now;
                    opened.push(DatapathOp::Open {
                        block: *block,
                        epoch: h.epoch,
                        valid_until,
                    });
                } else {
                    waiting = true;
                }
            }
        }
        if !opened.is_empty() {
            if let Some(since) = self.wanting_since.take() {
                self.stats.claim_latency = Some(Duration::from_nanos(now.saturating_sub(since)));
            }
        }
        for op in opened {
            if let DatapathOp::Open { block, .. } = op {
                self.opened(block.nat_ip);
            }
            self.push(op);
        }
        if waiting
            && self.gateways_at.is_none()
            && !self
                .pending
                .values()
                .any(|(op, _)| *op == StoreOp::Gateways)
        {
            self.gateways_at = Some(now + ns(self.cfg.timers.gateway_poll));
        }
    }

    /// A block opened on `ip`: the last pressure report predates it (until the next report,
    /// count the block's ports as free, or the node would claim again for the same need).
    fn opened(&mut self, ip: Ipv4Addr) {
        let bs = u32::from(self.cfg.geometry.block_size);
        if let Some(p) = self.pressure.get_mut(&ip) {
            p.refused = false;
            p.free = p.free.saturating_add(bs);
        }
    }

    fn listing(&self) -> bool {
        self.pending.values().any(|(op, _)| *op == StoreOp::List)
    }

    fn list(&mut self, now: Nanos) {
        if !self.listing() {
            self.send(StoreOp::List, now);
        }
    }

    /// Blocks held on `ip` that count towards its minimum and cap.
    fn held_on(&self, ip: Ipv4Addr) -> usize {
        self.held
            .iter()
            .filter(|(b, h)| b.nat_ip == ip && !matches!(h.state, BlockState::Releasing { .. }))
            .count()
    }

    fn max_on(&self, _ip: Ipv4Addr) -> usize {
        let per_ip = usize::from(self.cfg.geometry.blocks_per_ip());
        match self.cfg.max_blocks {
            Some(m) => usize::from(m).min(per_ip),
            None => {
                let others = self.view.as_ref().map_or(0, |(_, s)| {
                    s.nodes.iter().filter(|n| n.name != self.cfg.name).count()
                });
                per_ip
                    .saturating_sub(others * usize::from(self.cfg.min_blocks))
                    .max(usize::from(self.cfg.min_blocks).max(1))
            }
        }
    }

    /// Whether the node wants another usable block on `ip`.
    fn wants(&self, ip: Ipv4Addr) -> bool {
        if self.held_on(ip) < usize::from(self.cfg.min_blocks) {
            return true;
        }
        self.pressure
            .get(&ip)
            .is_some_and(|p| p.refused || p.free < self.cfg.low_water)
    }

    fn claim_in_flight(&self) -> bool {
        self.pending
            .values()
            .any(|(op, _)| matches!(op, StoreOp::Claim { .. }))
    }

    /// Everything that follows from the current state: closes, releases, re-opens, claims.
    fn step(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        if self.phase == Phase::Failed {
            return;
        }
        self.plan_releases(now);
        self.plan_claims(now);
        self.tell_growth(now);
        if self.draining
            && self.phase == Phase::Ready
            && self.held.is_empty()
            && !self.claim_in_flight()
        {
            if let Some(lease) = self.lease {
                // Every block went back through the cool-down: revoking now only removes the
                // node's name.
                if !self
                    .pending
                    .values()
                    .any(|(op, _)| matches!(op, StoreOp::Revoke { .. }))
                {
                    self.send(StoreOp::Revoke { lease }, now);
                }
            }
        }
    }

    fn plan_releases(&mut self, now: Nanos) {
        let cooldown = ns(self.cfg.timers.cooldown);
        let bs = u32::from(self.cfg.geometry.block_size);
        let ips: Vec<Ipv4Addr> = self.cfg.geometry.nat_ips.clone();
        for ip in ips {
            let wants = !self.draining && self.wants(ip);
            let mut free = self.pressure.get(&ip).map_or(0, |p| p.free);
            let mut open = self
                .held
                .iter()
                .filter(|(b, h)| b.nat_ip == ip && matches!(h.state, BlockState::Open { .. }))
                .count();
            let refused = self.pressure.get(&ip).is_some_and(|p| p.refused);
            let blocks: Vec<BlockId> = self
                .held
                .keys()
                .filter(|b| b.nat_ip == ip)
                .copied()
                .collect();
            let mut reopened = false;
            // Over the cap (another node registered since we grew): close the emptiest open
            // block so it drains and goes back.
            let shed = (!self.draining && self.held_on(ip) > self.max_on(ip))
                .then(|| {
                    blocks
                        .iter()
                        .filter(|b| matches!(self.held[b].state, BlockState::Open { .. }))
                        .min_by_key(|b| self.held[b].live)
                        .copied()
                })
                .flatten();
            for block in blocks {
                let h = self.held[&block];
                match h.state {
                    BlockState::Open { since } => {
                        let empty = h.live == 0 && h.observed >= since;
                        // An IP no pod pairs with (no pressure reported) only holds overflow:
                        // its empty blocks are surplus beyond the minimum.
                        let room = match self.pressure.get(&ip) {
                            Some(_) => !refused && free >= bs + 2 * self.cfg.low_water,
                            None => true,
                        };
                        let surplus = room && open > usize::from(self.cfg.min_blocks);
                        if self.draining || (empty && surplus) || shed == Some(block) {
                            if empty {
                                free = free.saturating_sub(bs);
                            }
                            open -= 1;
                            self.set_state(
                                block,
                                BlockState::Closed {
                                    since: now,
                                    reopen: true,
                                },
                            );
                            self.push(DatapathOp::Close { block });
                        }
                    }
                    BlockState::Closed { since, reopen } => {
                        if wants
                            && reopen
                            && !reopened
                            && self.lease_valid(now)
                            && self.held_on(ip) <= self.max_on(ip)
                        {
                            // Still ours: cheaper than a claim.
                            reopened = true;
                            self.opened(ip);
                            free = free.saturating_add(bs);
                            self.set_state(block, BlockState::Open { since: now });
                            self.push(DatapathOp::Open {
                                block,
                                epoch: h.epoch,
                                valid_until: self.valid_until(),
                            });
                        } else if h.live == 0
                            && h.observed >= since
                            && now >= since.max(h.last_active) + cooldown
                        {
                            self.set_state(block, BlockState::Releasing { retry_at: None });
                            self.send(
                                StoreOp::Release {
                                    block,
                                    epoch: h.epoch,
                                },
                                now,
                            );
                        }
                    }
                    BlockState::AwaitGateway { .. } if self.draining => {
                        // Never opened, so never used: it can go back at once.
                        self.set_state(block, BlockState::Releasing { retry_at: None });
                        self.send(
                            StoreOp::Release {
                                block,
                                epoch: h.epoch,
                            },
                            now,
                        );
                    }
                    _ => {}
                }
            }
            // The ports of the blocks closed here are gone until the next report says
            // otherwise: a later step before it must not close more on the old figure.
            if let Some(p) = self.pressure.get_mut(&ip) {
                p.free = p.free.min(free);
            }
        }
    }

    fn lease_valid(&self, now: Nanos) -> bool {
        self.lease.is_some() && now < self.valid_until()
    }

    fn set_state(&mut self, block: BlockId, state: BlockState) {
        if let Some(h) = self.held.get_mut(&block) {
            h.state = state;
        }
    }

    fn plan_claims(&mut self, now: Nanos) {
        self.shortage.clear();
        if self.phase != Phase::Ready || self.draining {
            return;
        }
        let ips = self.cfg.geometry.nat_ips.clone();
        // IPs that want a block and have none on its way.
        let wanting: Vec<Ipv4Addr> = ips
            .iter()
            .copied()
            .filter(|&ip| {
                self.wants(ip)
                    && !self.held.iter().any(|(b, h)| {
                        b.nat_ip == ip && matches!(h.state, BlockState::AwaitGateway { .. })
                    })
            })
            .collect();
        if wanting.is_empty() {
            self.wanting_since = None;
            return;
        }
        self.wanting_since.get_or_insert(now);
        let pending = self.claim_in_flight()
            || self.retry_at.is_some()
            || self
                .held
                .values()
                .any(|h| matches!(h.state, BlockState::AwaitGateway { .. }));
        if !self.lease_valid(now) || !self.connected && self.retry_at.is_some() {
            for &ip in &wanting {
                self.shortage.insert(ip, Shortage::Unreachable);
            }
            return;
        }
        // At the cap on every NAT IP (the one it wants and those it could overflow to), the
        // reason is the cap, however old the view: no claim would be sent. Only a cap that
        // follows the other nodes' count (no --max-blocks) is worth a fresh look, since a node
        // that left raises it.
        if ips.iter().all(|&o| self.held_on(o) >= self.max_on(o)) {
            for &ip in &wanting {
                self.shortage.insert(ip, Shortage::MaxBlocks);
            }
            if self.cfg.max_blocks.is_none() && !pending && !self.view_fresh(now) {
                self.list(now);
            }
            return;
        }
        if pending {
            for &ip in &wanting {
                self.shortage.insert(ip, Shortage::ClaimPending);
            }
            return;
        }
        if !self.view_fresh(now) {
            for &ip in &wanting {
                self.shortage.insert(ip, Shortage::ClaimPending);
            }
            self.list(now);
            return;
        }
        let Some(lease) = self.lease else { return };
        for ip in wanting {
            // The IP's own free blocks first, then any other IP's (pods overflow to it).
            let mut order = vec![ip];
            order.extend(ips.iter().copied().filter(|&o| o != ip));
            let mut why = Shortage::RangeFull;
            for cand_ip in order {
                if self.held_on(cand_ip) >= self.max_on(cand_ip) {
                    why = Shortage::MaxBlocks;
                    continue;
                }
                let free = self.free_blocks(cand_ip);
                if free.is_empty() {
                    continue;
                }
                let block = free[self.rng.below(free.len())];
                self.send(StoreOp::Claim { block, lease }, now);
                self.shortage.insert(ip, Shortage::ClaimPending);
                return; // one claim at a time
            }
            self.shortage.insert(ip, why);
        }
    }

    /// Tells the datapath which NAT IPs can get another block soon: the node is ready, connected,
    /// within its lease and below its cap there, and a block of the IP is being claimed, awaits
    /// the gateway, or was free in the last view. Otherwise a flow that finds no port is refused
    /// at once (RST / ICMP), as holding it back would only delay the same answer.
    fn tell_growth(&mut self, now: Nanos) {
        if self.detached {
            return; // nothing translates through the maps any more
        }
        let able =
            self.phase == Phase::Ready && !self.draining && self.connected && self.lease_valid(now);
        for ip in self.cfg.geometry.nat_ips.clone() {
            let on_its_way =
                self.held.iter().any(|(b, h)| {
                    b.nat_ip == ip && matches!(h.state, BlockState::AwaitGateway { .. })
                }) || self.pending.values().any(
                    |(op, _)| matches!(op, StoreOp::Claim { block, .. } if block.nat_ip == ip),
                );
            let growing = able
                && (on_its_way
                    || self.held_on(ip) < self.max_on(ip)
                        && (self.view.is_none() || !self.free_blocks(ip).is_empty()));
            if growing != self.growing.contains(&ip) {
                if growing {
                    self.growing.insert(ip);
                } else {
                    self.growing.remove(&ip);
                }
                self.push(DatapathOp::Growing {
                    nat_ip: ip,
                    growing,
                });
            }
        }
    }

    /// Whether the latest snapshot is recent enough to pick a free block from.
    fn view_fresh(&self, now: Nanos) -> bool {
        self.view
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_sub(*at) <= ns(self.cfg.timers.list_max_age))
    }

    /// Blocks of `ip` free in the latest snapshot and not since found taken.
    fn free_blocks(&self, ip: Ipv4Addr) -> Vec<BlockId> {
        let Some((_, snap)) = &self.view else {
            return Vec::new();
        };
        let used: BTreeSet<BlockId> = snap.blocks.iter().map(|r| r.block).collect();
        (0..self.cfg.geometry.blocks_per_ip())
            .map(|index| BlockId { nat_ip: ip, index })
            .filter(|b| !used.contains(b) && !self.taken.contains(b) && !self.held.contains_key(b))
            .collect()
    }

    fn send(&mut self, op: StoreOp, now: Nanos) {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, (op.clone(), now));
        self.out.push_back(Command::Store { id, op });
    }

    fn push(&mut self, op: DatapathOp) {
        self.out.push_back(Command::Datapath(op));
    }

    fn fail(&mut self, why: String) {
        self.phase = Phase::Failed;
        self.out.push_back(Command::Fatal(why));
    }

    fn next_backoff(&mut self) -> Nanos {
        let b = self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.timers.keepalive_every);
        ns(b)
    }

    fn reset_backoff(&mut self) {
        self.backoff = self.cfg.timers.retry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ports::PortRange;

    const S: Nanos = 1_000_000_000;
    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn geometry() -> Geometry {
        Geometry::new(
            PortRange {
                lo: 40000,
                hi: 40511,
            },
            64,
            vec![],
            vec![IP],
        )
        .unwrap()
    }

    fn node(restored: Restored, now: Nanos) -> Node {
        let cfg = NodeConfig {
            name: "n1".into(),
            address: Ipv4Addr::new(10, 1, 0, 1),
            geometry: geometry(),
            timers: Timers::new(
                Duration::from_secs(90),
                Duration::from_secs(20),
                Duration::from_secs(5),
            ),
            min_blocks: 1,
            max_blocks: None,
            low_water: 16,
            seed: 1,
        };
        Node::new(cfg, restored, now)
    }

    fn block(index: u16) -> BlockId {
        BlockId { nat_ip: IP, index }
    }

    /// Pinned state under lease 7: (block index, epoch, open).
    fn restored(blocks: &[(u16, i64, bool)]) -> Restored {
        Restored {
            lease: Some(7),
            blocks: blocks
                .iter()
                .map(|&(i, epoch, open)| RestoredBlock {
                    block: block(i),
                    epoch,
                    open,
                })
                .collect(),
        }
    }

    fn drain(n: &mut Node) -> Vec<Command> {
        std::iter::from_fn(|| n.next_command()).collect()
    }

    /// The one store operation queued (panics otherwise), and its id.
    fn op(cmds: &[Command]) -> (OpId, StoreOp) {
        let ops: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Store { id, op } => Some((*id, op.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(ops.len(), 1, "{cmds:?}");
        ops[0].clone()
    }

    fn answer(n: &mut Node, cmds: &[Command], reply: StoreReply, now: Nanos) -> Vec<Command> {
        let (id, _) = op(cmds);
        n.handle_store(id, Ok(reply), now);
        drain(n)
    }

    /// The datapath operations queued, but for the growth flags (see [`growth`]).
    fn dp(cmds: &[Command]) -> Vec<DatapathOp> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Datapath(DatapathOp::Growing { .. }) => None,
                Command::Datapath(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// The growth flags queued, in order.
    fn growth(cmds: &[Command]) -> Vec<bool> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Datapath(DatapathOp::Growing { growing, .. }) => Some(*growing),
                _ => None,
            })
            .collect()
    }

    /// The one gateway's record, at revision `applied`.
    fn applied(applied: i64) -> StoreReply {
        StoreReply::Gateways {
            live: vec![GatewayRecord {
                name: "gw".into(),
                applied,
            }],
            known: vec!["gw".into()],
        }
    }

    fn snapshot(revision: i64, blocks: &[(u16, LeaseId, i64)], applied: Option<i64>) -> Snapshot {
        Snapshot {
            revision,
            nodes: vec![NodeRecord {
                name: "n1".into(),
                lease: 7,
            }],
            blocks: blocks
                .iter()
                .map(|&(i, lease, epoch)| BlockRecord {
                    block: block(i),
                    node: "n1".into(),
                    lease,
                    epoch,
                })
                .collect(),
            gateways: applied
                .map(|a| GatewayRecord {
                    name: "gw".into(),
                    applied: a,
                })
                .into_iter()
                .collect(),
            known_gateways: applied.map(|_| "gw".into()).into_iter().collect(),
        }
    }

    /// A fresh node up to Ready under lease 7, granted at `t`.
    fn ready(t: Nanos) -> Node {
        let mut n = node(Restored::default(), t);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::ConfigCreated, t);
        assert_eq!(op(&c).1, StoreOp::Grant { ttl_s: 90 });
        let c = answer(
            &mut n,
            &c,
            StoreReply::Granted {
                lease: 7,
                ttl_s: 90,
            },
            t,
        );
        assert_eq!(dp(&c), vec![DatapathOp::SetLease(Some(7))]);
        let c = answer(&mut n, &c, StoreReply::Registered, t);
        assert_eq!(op(&c).1, StoreOp::List);
        assert!(n.ready());
        n.pending.clear();
        n
    }

    #[test]
    fn a_mismatched_geometry_is_refused_naming_the_flag() {
        let mut n = node(Restored::default(), 0);
        let c = drain(&mut n);
        let mut other = geometry();
        other.block_size = 32;
        let c = answer(&mut n, &c, StoreReply::ConfigExists(other), 0);
        let Some(Command::Fatal(why)) = c.last() else {
            panic!("{c:?}")
        };
        assert!(
            why.contains("--block-size: 64 here, 32 in the cluster"),
            "{why}"
        );
        assert_eq!(n.poll_timeout(), None);
    }

    #[test]
    fn a_live_lease_under_our_name_refuses_the_start() {
        let mut n = node(Restored::default(), 0);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::ConfigCreated, 0);
        let c = answer(
            &mut n,
            &c,
            StoreReply::Granted {
                lease: 7,
                ttl_s: 90,
            },
            0,
        );
        let c = answer(&mut n, &c, StoreReply::NameTaken { lease: 9 }, 0);
        let Some(Command::Fatal(why)) = c.last() else {
            panic!("{c:?}")
        };
        assert!(
            why.contains("node name \"n1\" is held by another agent's live lease 9"),
            "{why}"
        );
    }

    #[test]
    fn the_fence_closes_a_cool_down_and_a_margin_before_the_deadline_of_the_keepalive_sent() {
        let mut n = ready(0);
        // Granted at 0 with TTL 90: valid until 90 − 5 − 20 = 65 s.
        assert_eq!(n.valid_until(), 65 * S);
        n.handle_timeout(15 * S);
        let c: Vec<Command> = drain(&mut n)
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Store {
                        op: StoreOp::KeepAlive { lease: 7 },
                        ..
                    }
                )
            })
            .collect();
        // Answered 2 s later: the deadline counts from the send time.
        n.held.insert(
            block(0),
            Held {
                epoch: 3,
                state: BlockState::Open { since: 0 },
                live: 1,
                last_active: 0,
                observed: 0,
            },
        );
        let c = answer(&mut n, &c, StoreReply::Alive { ttl_s: 90 }, 17 * S);
        assert_eq!(
            dp(&c),
            vec![DatapathOp::Extend {
                valid_until: 80 * S
            }]
        );
        assert!(!n.suspended(79 * S) && n.suspended(80 * S));
    }

    #[test]
    fn a_suspension_is_not_demand_for_another_block() {
        // The datapath counts a block past its valid-until as closed, so a report read while the
        // node is suspended says no port is free: that is the fence, not the pods. The three-node
        // suite found a node SIGSTOPped past its fence claiming a block it did not need as soon
        // as its keep-alive succeeded again.
        let mut n = ready(0);
        n.held.insert(
            block(0),
            Held {
                epoch: 3,
                state: BlockState::Open { since: 0 },
                live: 10,
                last_active: 0,
                observed: 0,
            },
        );
        let report = |free, refused| Usage {
            blocks: vec![BlockUse {
                block: block(0),
                live: 10,
                last_active: 0,
            }],
            pressure: vec![Pressure {
                nat_ip: IP,
                free,
                refused,
            }],
        };
        n.handle_usage(&report(54, false), S);
        assert!(n.shortage().is_empty(), "{:?}", n.shortage());
        // Valid until 65 s: suspended at 70 s, the datapath refuses and counts nothing free,
        // in its full reads and in its 5 ms polls alike.
        n.handle_usage(&report(0, true), 70 * S);
        n.handle_pressure(&report(0, true).pressure, 70 * S);
        assert!(n.suspended(70 * S));
        drain(&mut n);
        // The keep-alive sent at 71 s succeeds: resumed, and the pods want no more than before.
        n.handle_timeout(71 * S);
        let c = drain(&mut n);
        let ka = c
            .iter()
            .find_map(|c| match c {
                Command::Store {
                    id,
                    op: StoreOp::KeepAlive { .. },
                } => Some(*id),
                _ => None,
            })
            .expect("a keep-alive");
        n.handle_store(ka, Ok(StoreReply::Alive { ttl_s: 90 }), 71 * S);
        assert!(!n.suspended(71 * S));
        let c = drain(&mut n);
        assert!(n.shortage().is_empty(), "{:?}", n.shortage());
        // A fresh snapshot with free blocks: still no claim.
        let list = n
            .pending
            .iter()
            .find(|(_, (op, _))| *op == StoreOp::List)
            .map(|(id, _)| *id)
            .expect("a list");
        n.handle_store(
            list,
            Ok(StoreReply::Listed(snapshot(20, &[(0, 7, 3)], None))),
            71 * S,
        );
        let c2 = drain(&mut n);
        assert!(
            !c.iter().chain(&c2).any(|c| matches!(
                c,
                Command::Store {
                    op: StoreOp::Claim { .. },
                    ..
                }
            )),
            "{c:?} {c2:?}"
        );
    }

    #[test]
    fn a_restart_after_the_lease_ended_forgets_every_pinned_block() {
        let mut n = node(restored(&[(0, 5, true), (3, 6, true)]), 0);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::ConfigCreated, 0);
        assert_eq!(op(&c).1, StoreOp::KeepAlive { lease: 7 });
        let c = answer(&mut n, &c, StoreReply::Alive { ttl_s: 0 }, S);
        assert_eq!(
            dp(&c),
            vec![
                DatapathOp::Forget { block: block(0) },
                DatapathOp::Forget { block: block(3) },
                DatapathOp::SetLease(None)
            ]
        );
        assert_eq!(op(&c).1, StoreOp::Grant { ttl_s: 90 });
    }

    #[test]
    fn a_restart_under_a_live_lease_adopts_only_what_the_store_confirms() {
        let mut n = node(restored(&[(0, 5, true), (3, 6, true)]), 0);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::ConfigCreated, 0);
        let c = answer(&mut n, &c, StoreReply::Alive { ttl_s: 90 }, S);
        // No Extend before the store has confirmed the blocks.
        assert_eq!(dp(&c), vec![]);
        assert_eq!(op(&c).1, StoreOp::List);
        // Block 0 is still ours; block 3 was released (gone at revision 10).
        let c = answer(
            &mut n,
            &c,
            StoreReply::Listed(snapshot(10, &[(0, 7, 5)], None)),
            S,
        );
        assert_eq!(
            dp(&c),
            vec![
                DatapathOp::Forget { block: block(3) },
                DatapathOp::Open {
                    block: block(0),
                    epoch: 5,
                    valid_until: 65 * S // the keep-alive went out at 0
                }
            ]
        );
        assert_eq!(op(&c).1, StoreOp::Register { lease: 7 });
        let c = answer(&mut n, &c, StoreReply::NameTaken { lease: 7 }, S);
        assert!(n.ready(), "{c:?}");
        assert_eq!(n.stats.adopted, 1);
    }

    #[test]
    fn a_node_at_its_cap_names_the_cap_without_asking_the_store() {
        let mut n = ready(0);
        n.cfg.max_blocks = Some(1);
        let refused = Usage {
            blocks: vec![],
            pressure: vec![Pressure {
                nat_ip: IP,
                free: 0,
                refused: true,
            }],
        };
        n.handle_usage(&refused, S);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::Listed(snapshot(4, &[], Some(4))), S);
        assert!(matches!(op(&c).1, StoreOp::Claim { .. }), "{c:?}");
        let c = answer(&mut n, &c, StoreReply::Claimed { epoch: 5 }, S);
        let c = answer(&mut n, &c, applied(5), S);
        assert!(matches!(dp(&c)[..], [DatapathOp::Open { .. }]), "{c:?}");
        // At its cap, the datapath is told no block is on its way: a flow without a port is
        // refused at once from now on.
        assert_eq!(growth(&c), vec![false]);
        // Its one block full, long after the last listing: the cap is the reason, and there is
        // nothing to list or claim for.
        n.handle_usage(&refused, 10 * S);
        let c = drain(&mut n);
        assert_eq!(n.shortage().get(&IP), Some(&Shortage::MaxBlocks));
        assert!(
            !c.iter().any(|c| matches!(
                c,
                Command::Store {
                    op: StoreOp::List | StoreOp::Claim { .. },
                    ..
                }
            )),
            "{c:?}"
        );
    }

    #[test]
    fn a_poll_below_low_water_claims_and_never_clears_a_refusal() {
        let mut n = ready(0);
        // The first block, through a full read that shows it empty.
        n.handle_usage(
            &Usage {
                blocks: vec![],
                pressure: vec![Pressure {
                    nat_ip: IP,
                    free: 0,
                    refused: true,
                }],
            },
            S,
        );
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::Listed(snapshot(4, &[], Some(4))), S);
        assert!(matches!(op(&c).1, StoreOp::Claim { .. }), "{c:?}");
        let c = answer(&mut n, &c, StoreReply::Claimed { epoch: 5 }, S);
        answer(&mut n, &c, applied(5), S);
        let room = |free| Pressure {
            nat_ip: IP,
            free,
            refused: false,
        };
        n.handle_usage(
            &Usage {
                blocks: vec![],
                pressure: vec![room(64)],
            },
            S,
        );
        assert!(!n.wants(IP));
        // A poll's estimate falls below low water (16): the next block is asked for now.
        n.handle_pressure(&[room(10)], S);
        assert!(n.wants(IP));
        let c = drain(&mut n);
        assert!(
            matches!(op(&c).1, StoreOp::List | StoreOp::Claim { .. }),
            "{c:?}"
        );
        // A refusal noted stays through a poll that estimates room; a full read clears it.
        n.handle_pressure(
            &[Pressure {
                nat_ip: IP,
                free: 0,
                refused: true,
            }],
            S,
        );
        n.handle_pressure(&[room(40)], S);
        assert!(n.wants(IP));
        n.handle_usage(
            &Usage {
                blocks: vec![],
                pressure: vec![room(40)],
            },
            S,
        );
        assert!(!n.wants(IP));
    }

    #[test]
    fn a_claimed_block_opens_only_once_the_gateway_applied_it() {
        let mut n = ready(0);
        n.handle_usage(
            &Usage {
                blocks: vec![],
                pressure: vec![Pressure {
                    nat_ip: IP,
                    free: 0,
                    refused: true,
                }],
            },
            S,
        );
        let c = drain(&mut n);
        assert_eq!(op(&c).1, StoreOp::List);
        let c = answer(&mut n, &c, StoreReply::Listed(snapshot(4, &[], Some(4))), S);
        let StoreOp::Claim { block: b, lease: 7 } = op(&c).1 else {
            panic!("{c:?}")
        };
        assert_eq!(n.shortage().get(&IP), Some(&Shortage::ClaimPending));
        let c = answer(&mut n, &c, StoreReply::Claimed { epoch: 5 }, S);
        // Only the gateways' records are read (not the whole prefix).
        assert_eq!(op(&c).1, StoreOp::Gateways);
        // The gateway is still at revision 4: nothing opens, the node polls again in 5 ms.
        let c = answer(&mut n, &c, applied(4), S);
        assert_eq!(dp(&c), vec![]);
        assert_eq!(n.poll_timeout(), Some(S + 5_000_000));
        n.handle_timeout(S + 5_000_000);
        let c = drain(&mut n);
        assert_eq!(op(&c).1, StoreOp::Gateways);
        // Its lease lapsed (cut off from etcd longer than its TTL): no live record, but it is
        // known, so the block still waits.
        let c = answer(
            &mut n,
            &c,
            StoreReply::Gateways {
                live: vec![],
                known: vec!["gw".into()],
            },
            S + 6_000_000,
        );
        assert_eq!(dp(&c), vec![]);
        n.handle_timeout(S + 11_000_000);
        let c = drain(&mut n);
        assert_eq!(op(&c).1, StoreOp::Gateways);
        let c = answer(&mut n, &c, applied(6), S + 12_000_000);
        assert_eq!(
            dp(&c),
            vec![DatapathOp::Open {
                block: b,
                epoch: 5,
                valid_until: 65 * S
            }]
        );
    }

    #[test]
    fn empty_blocks_close_down_to_the_headroom_and_no_further_before_the_next_read() {
        let mut n = ready(0);
        n.keepalive_at = None;
        for (index, live) in [(2, 40), (3, 0), (4, 0)] {
            n.held.insert(
                block(index),
                Held {
                    epoch: 5,
                    state: BlockState::Open { since: 0 },
                    live,
                    last_active: S,
                    observed: S,
                },
            );
        }
        // 192 ports, 40 in use: one empty block closes (88 left), the other stays (24 would be
        // under a block plus twice the low water of 16).
        n.handle_usage(
            &Usage {
                blocks: vec![],
                pressure: vec![Pressure {
                    nat_ip: IP,
                    free: 152,
                    refused: false,
                }],
            },
            2 * S,
        );
        let closed: Vec<DatapathOp> = dp(&drain(&mut n));
        assert_eq!(closed.len(), 1, "{closed:?}");
        // More steps before the next read (a timer, a store answer) close nothing more on the
        // old figure.
        n.handle_timeout(3 * S);
        n.handle_pressure(&[], 3 * S);
        assert!(
            !dp(&drain(&mut n))
                .iter()
                .any(|o| matches!(o, DatapathOp::Close { .. })),
            "closed below the headroom"
        );
    }

    #[test]
    fn a_drain_gives_every_block_back_after_its_cool_down_then_revokes() {
        let mut n = ready(0);
        n.held.insert(
            block(2),
            Held {
                epoch: 5,
                state: BlockState::Open { since: 0 },
                live: 3,
                last_active: S,
                observed: S,
            },
        );
        n.keepalive_at = None; // keep-alives are not what this test is about
        n.drain(2 * S);
        let c = drain(&mut n);
        assert_eq!(dp(&c), vec![DatapathOp::Close { block: block(2) }]);
        // Its last mapping goes at 10 s: released 20 s later, not before.
        let usage = |live| Usage {
            blocks: vec![BlockUse {
                block: block(2),
                live,
                last_active: 10 * S,
            }],
            pressure: vec![],
        };
        n.handle_usage(&usage(0), 11 * S);
        assert!(drain(&mut n).is_empty());
        assert_eq!(n.poll_timeout(), Some(30 * S));
        n.handle_timeout(30 * S);
        let c = drain(&mut n);
        assert_eq!(
            op(&c).1,
            StoreOp::Release {
                block: block(2),
                epoch: 5
            }
        );
        let c = answer(&mut n, &c, StoreReply::Released { revision: 9 }, 30 * S);
        assert_eq!(dp(&c), vec![DatapathOp::Forget { block: block(2) }]);
        assert_eq!(op(&c).1, StoreOp::Revoke { lease: 7 });
        let c = answer(&mut n, &c, StoreReply::Revoked, 30 * S);
        assert_eq!(c.last(), Some(&Command::Drained));
        assert_eq!(n.stats.releases.get("drain"), Some(&1));
    }

    #[test]
    fn a_block_the_previous_agent_closed_is_never_reopened() {
        // Its release may still be on its way to the store: re-opening it could use ports the
        // store is about to hand to another node.
        let mut n = node(restored(&[(1, 5, false)]), 0);
        let c = drain(&mut n);
        let c = answer(&mut n, &c, StoreReply::ConfigCreated, 0);
        let c = answer(&mut n, &c, StoreReply::Alive { ttl_s: 90 }, S);
        let c = answer(
            &mut n,
            &c,
            StoreReply::Listed(snapshot(10, &[(1, 7, 5)], None)),
            S,
        );
        // Confirmed: it keeps draining under the new valid-until, closed.
        assert_eq!(
            dp(&c),
            vec![DatapathOp::Extend {
                valid_until: 65 * S
            }]
        );
        let _ = answer(&mut n, &c, StoreReply::Registered, S);
        n.pending.clear();
        n.handle_usage(
            &Usage {
                blocks: vec![BlockUse {
                    block: block(1),
                    live: 2,
                    last_active: 2 * S,
                }],
                pressure: vec![Pressure {
                    nat_ip: IP,
                    free: 0,
                    refused: true,
                }],
            },
            2 * S,
        );
        let c = drain(&mut n);
        assert!(
            !dp(&c).iter().any(|o| matches!(o, DatapathOp::Open { .. })),
            "{c:?}"
        );
    }

    #[test]
    fn a_detached_datapath_gives_every_block_back_a_cool_down_later() {
        let mut n = ready(0);
        n.keepalive_at = None;
        n.held.insert(
            block(2),
            Held {
                epoch: 5,
                state: BlockState::Open { since: 0 },
                live: 30,
                last_active: 4 * S,
                observed: 4 * S,
            },
        );
        n.detached(5 * S);
        assert!(drain(&mut n).is_empty());
        // The maps still count 30 mappings: ignored, nothing translates them.
        n.handle_usage(
            &Usage {
                blocks: vec![BlockUse {
                    block: block(2),
                    live: 30,
                    last_active: 5 * S,
                }],
                pressure: vec![],
            },
            6 * S,
        );
        assert_eq!(n.poll_timeout(), Some(25 * S));
        n.handle_timeout(25 * S);
        let c = drain(&mut n);
        assert_eq!(
            op(&c).1,
            StoreOp::Release {
                block: block(2),
                epoch: 5
            }
        );
        let c = answer(&mut n, &c, StoreReply::Released { revision: 9 }, 25 * S);
        assert_eq!(op(&c).1, StoreOp::Revoke { lease: 7 });
    }
}
