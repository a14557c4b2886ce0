//! The etcd store of cluster mode: its keys, its JSON values, and the requests the block
//! allocator's state machine asks for, each one etcd request (or one transaction) with a deadline.
//!
//! Nothing here decides anything: the allocator (a sans-IO state machine in `cluster`) decides, the
//! tokio loop around it calls these operations and feeds their typed results back. Every failure is
//! a [`StoreError`] that says whether the request was **definitely not applied** (etcd refused it, or
//! it never left this process) or whether its **outcome is unknown** (a deadline passed or the
//! connection broke after it was sent): a claim whose outcome is unknown may have succeeded, and the
//! caller must find out (re-list, or watch) before it treats the block as free or as its own.
//!
//! Keys, all under [`PREFIX`] (`/snat/v1/`):
//!
//! | key | value (JSON) | lease |
//! |---|---|---|
//! | `config` | the cluster geometry, written once by the first agent ([`Store::create_config`]) | none |
//! | `nodes/<name>` | [`NodeValue`] `{"address","lease"}` | the node's |
//! | `blocks/<nat_ip>/<index>` | [`BlockValue`] `{"node","address","lease"}` | the node's |
//! | `gateways/<name>` | [`GatewayValue`] `{"applied_revision"}` | the gateway's |
//!
//! A block's **epoch** is its key's `create_revision`: etcd gives every creation of a key a new,
//! larger one, so a block claimed, released and claimed again (by anyone) has a new epoch, and a
//! release names the epoch it releases ([`Store::release_block`]).
//!
//! Key and value encoding are pure functions ([`Key::parse`], [`Key::path`], [`decode`]), tested
//! on the host; the operations are tested against a real etcd 3.4.23 in `tests/tests/etcd_store.rs`.
//!
//! Streams: etcd-client neither keeps leases alive nor resumes watches by itself. [`KeepAlive`]
//! keeps one keep-alive stream open and re-opens it with back-off after it breaks; [`Watch`]
//! re-opens its watch from the revision after the last one it delivered, with back-off, and turns
//! a compaction of that revision into [`WatchEvent::Resync`] (re-list, then resume).
//!
//! Observed with etcd 3.4.23 (Debian's) and etcd-client 0.21.1, in `tests/tests/etcd_store.rs`:
//! - LeaseTimeToLive rounds the time left down to whole seconds (0 = in its last second) and
//!   answers -1 for an unknown lease; a lease of TTL 3 s went 3.1–3.5 s after its last
//!   keep-alive was sent, never earlier.
//! - etcd-client's keep-alive stream sends a first keep-alive when it opens and keeps that
//!   answer's TTL to itself, so re-opening costs one more round trip before a TTL is known.
//! - A watch from a compacted revision is first created, then cancelled with the compaction
//!   revision; a watch from exactly the compaction revision still works.
//! - A silent peer (link down) ends connections after about twice [`Timeouts::ping`]: the
//!   request in flight fails as outcome unknown ("http2 error: keep-alive timed out"), the next
//!   ones fail as not applied ("tcp connect error") until the link is back.
//! - A three-member cluster whose leader is SIGKILLed answers keep-alives and claims again
//!   after 1.2–2.6 s (the election), with the default heartbeat and election timeout.
//! - A member that is stopped (SIGSTOP) still accepts TCP connections (the kernel queues
//!   them), so a request sent to it waits out the whole request deadline; keep that deadline
//!   well inside the fence margin.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use tokio::time::{timeout, timeout_at, Instant};

/// The pause before a request refused before it was sent goes out again ([`Store`] retries
/// such requests within their deadline).
pub const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Every key of cluster mode starts with this.
pub const PREFIX: &str = "/snat/v1/";

/// An etcd lease id.
pub type LeaseId = i64;

// ---------------------------------------------------------------------------------------------
// Keys and values: pure.

/// One port block: `--block-size` ports of one NAT IP, numbered from the start of the range.
pub use super::geometry::BlockId;

/// A key of cluster mode, without [`PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Config,
    Node(String),
    Block(BlockId),
    Gateway(String),
    /// A gateway that registered once and has not left on purpose: its lease may have lapsed
    /// (cut off from etcd), but the nodes still wait for it before they use a new block.
    KnownGateway(String),
}

impl Key {
    /// The full etcd key (`/snat/v1/…`).
    pub fn path(&self) -> String {
        match self {
            Self::Config => format!("{PREFIX}config"),
            Self::Node(name) => format!("{PREFIX}nodes/{name}"),
            Self::Block(b) => format!("{PREFIX}blocks/{}/{}", b.nat_ip, b.index),
            Self::Gateway(name) => format!("{PREFIX}gateways/{name}"),
            Self::KnownGateway(name) => format!("{PREFIX}gateways-known/{name}"),
        }
    }

    /// The key a full etcd key names, if it is one of ours in its canonical spelling (so that
    /// `Key::parse(k).path() == k` always: `blocks/…/07` or a name with a `/` is no key of ours).
    pub fn parse(full: &str) -> Option<Self> {
        let rest = full.strip_prefix(PREFIX)?;
        let key = if rest == "config" {
            Self::Config
        } else if let Some(name) = rest.strip_prefix("nodes/") {
            check_name(name).ok()?;
            Self::Node(name.to_owned())
        } else if let Some(name) = rest.strip_prefix("gateways/") {
            check_name(name).ok()?;
            Self::Gateway(name.to_owned())
        } else if let Some(name) = rest.strip_prefix("gateways-known/") {
            check_name(name).ok()?;
            Self::KnownGateway(name.to_owned())
        } else if let Some(block) = rest.strip_prefix("blocks/") {
            let (ip, index) = block.split_once('/')?;
            Self::Block(BlockId {
                nat_ip: ip.parse().ok()?,
                index: index.parse().ok()?,
            })
        } else {
            return None;
        };
        (key.path() == full).then_some(key)
    }
}

/// Checks a node or gateway name: 1 to 253 characters from `[A-Za-z0-9._-]` (Kubernetes node
/// names are DNS subdomains, which fit), so that it is one path segment of a key.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("must be 1 to 253 characters, has {}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "contains {c:?}; use letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

/// The value of `nodes/<name>`: where replies for the node's blocks go, its lease, and the
/// timers its fence runs on (absent in records of agents before they were published).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeValue {
    pub address: Ipv4Addr,
    pub lease: LeaseId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timers: Option<NodeTimers>,
}

/// A node's `--block-cooldown` and `--fence-margin`: what `snat cluster release` must honour
/// for its blocks, whatever its own flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTimers {
    pub cooldown_ms: u64,
    pub fence_margin_ms: u64,
}

impl NodeTimers {
    pub fn new(cooldown: Duration, fence_margin: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            cooldown_ms: ms(cooldown),
            fence_margin_ms: ms(fence_margin),
        }
    }

    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }

    pub fn fence_margin(&self) -> Duration {
        Duration::from_millis(self.fence_margin_ms)
    }
}

/// The value of `blocks/<nat_ip>/<index>`: the node holding the block, its address, its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockValue {
    pub node: String,
    pub address: Ipv4Addr,
    pub lease: LeaseId,
}

/// The value of `gateways/<name>`: the last revision the gateway has applied to its datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayValue {
    pub applied_revision: i64,
}

/// A decoded value; the config stays the JSON text the agents compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Config(String),
    Node(NodeValue),
    Block(BlockValue),
    Gateway(GatewayValue),
    /// `gateways-known/<name>`: what it carries does not matter, its presence does.
    KnownGateway,
}

/// A value with etcd's bookkeeping for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<T> {
    pub value: T,
    /// The revision that created the key (a block's epoch).
    pub create_revision: i64,
    /// The revision of the last write to the key.
    pub mod_revision: i64,
    /// The lease the key is attached to in etcd (0: none); compare with the lease in the value.
    pub lease: LeaseId,
}

impl<T> Record<T> {
    /// The value, and the bookkeeping to give another value.
    fn split(self) -> (T, Record<()>) {
        let Self {
            value,
            create_revision,
            mod_revision,
            lease,
        } = self;
        (
            value,
            Record {
                value: (),
                create_revision,
                mod_revision,
                lease,
            },
        )
    }
}

impl Record<()> {
    fn with<T>(self, value: T) -> Record<T> {
        Record {
            value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        }
    }
}

/// A key under [`PREFIX`] that is not ours or whose value does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

/// JSON of a value, as stored.
pub fn encode<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(value).expect("JSON of a plain struct")
}

/// Decodes the value stored under `key`.
pub fn decode(key: &Key, bytes: &[u8]) -> Result<Value, String> {
    fn json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
    Ok(match key {
        Key::Config => {
            Value::Config(String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8: {e}"))?)
        }
        Key::Node(_) => Value::Node(json(bytes)?),
        Key::Block(_) => Value::Block(json(bytes)?),
        Key::Gateway(_) => Value::Gateway(json(bytes)?),
        Key::KnownGateway(_) => Value::KnownGateway,
    })
}

/// Decodes one etcd key-value into its key and record.
fn decode_kv(kv: &KeyValue) -> Result<(Key, Record<Value>), Unreadable> {
    let name = String::from_utf8_lossy(kv.key()).into_owned();
    let unreadable = |reason: String| Unreadable {
        key: name.clone(),
        reason,
    };
    let key = Key::parse(&name).ok_or_else(|| unreadable("not a key of snat".into()))?;
    let value = decode(&key, kv.value()).map_err(unreadable)?;
    Ok((
        key,
        Record {
            value,
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        },
    ))
}

/// Everything under [`PREFIX`] at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's revision when it was read: watch from `revision + 1` to follow it.
    pub revision: i64,
    pub config: Option<Record<String>>,
    pub nodes: BTreeMap<String, Record<NodeValue>>,
    pub blocks: BTreeMap<BlockId, Record<BlockValue>>,
    pub gateways: BTreeMap<String, Record<GatewayValue>>,
    /// Gateways that registered and have not left on purpose (live or not).
    pub known_gateways: std::collections::BTreeSet<String>,
    /// Keys under the prefix that are not ours or do not decode; listed, never dropped silently.
    pub unreadable: Vec<Unreadable>,
}

impl Snapshot {
    /// Files one decoded record under its key.
    fn insert(&mut self, key: Key, record: Record<Value>) {
        let (value, record) = record.split();
        match (key, value) {
            (Key::Config, Value::Config(v)) => self.config = Some(record.with(v)),
            (Key::Node(name), Value::Node(v)) => {
                self.nodes.insert(name, record.with(v));
            }
            (Key::Block(id), Value::Block(v)) => {
                self.blocks.insert(id, record.with(v));
            }
            (Key::Gateway(name), Value::Gateway(v)) => {
                self.gateways.insert(name, record.with(v));
            }
            (Key::KnownGateway(name), Value::KnownGateway) => {
                self.known_gateways.insert(name);
            }
            // decode() gives each key its own kind of value.
            (key, _) => self.unreadable.push(Unreadable {
                key: key.path(),
                reason: "value of another kind".into(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Whether a failed request may still have taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// etcd refused it, or it never left this process: nothing changed.
    NotApplied,
    /// It may or may not have been applied (deadline passed, connection lost after sending).
    Unknown,
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Definitely not applied: etcd refused the request, or it was never sent.
    #[error("etcd {op}: not applied: {detail}")]
    NotApplied { op: &'static str, detail: String },
    /// Maybe applied: a deadline passed or the connection broke after the request was sent.
    #[error("etcd {op}: outcome unknown: {detail}")]
    Unknown { op: &'static str, detail: String },
    /// etcd answered with a value under our prefix that does not decode (the request itself
    /// changed nothing: only the read-only branch of a transaction returns values).
    #[error("etcd {op}: the value of {key} does not decode: {reason}")]
    BadValue {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// A bad argument or setting (endpoint, TLS file, name), found before anything was sent.
    #[error("etcd {op}: {detail}")]
    Invalid { op: &'static str, detail: String },
}

impl StoreError {
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Unknown { .. } => Outcome::Unknown,
            Self::NotApplied { .. } | Self::BadValue { .. } | Self::Invalid { .. } => {
                Outcome::NotApplied
            }
        }
    }

    fn from_client(op: &'static str, err: &etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        let detail = err.to_string();
        let outcome = match err {
            E::GRpcStatus(status) => status_outcome(status.code(), status.message()),
            // Raised while building the request or the channel: nothing was sent.
            E::InvalidArgs(_)
            | E::InvalidUri(_)
            | E::InvalidMetadataValue(_)
            | E::EndpointError(_)
            | E::EndpointsNotManaged
            | E::TransportError(_)
            | E::Utf8Error(_) => Outcome::NotApplied,
            // Broken streams and everything else: assume it may have been sent.
            _ => Outcome::Unknown,
        };
        match outcome {
            Outcome::NotApplied => Self::NotApplied { op, detail },
            Outcome::Unknown => Self::Unknown { op, detail },
        }
    }

    fn deadline(op: &'static str, after: Duration) -> Self {
        Self::Unknown {
            op,
            detail: format!("no answer within {after:?}"),
        }
    }
}

/// What a gRPC status from etcd (or from the client's transport) says about a request.
///
/// Not applied: codes etcd uses for requests it rejects before proposing them (bad argument, lease
/// not found, compare failures are no errors at all, permission, quota, too many requests); the
/// require-leader check ("etcdserver: no leader", answered before the request is handled); and
/// failures to connect, where nothing was sent. Everything else — deadline exceeded, "request
/// timed out", "leader changed", a reset stream — may come after the proposal went into raft.
pub fn status_outcome(code: tonic::Code, message: &str) -> Outcome {
    use tonic::Code as C;
    match code {
        C::InvalidArgument
        | C::NotFound
        | C::AlreadyExists
        | C::PermissionDenied
        | C::FailedPrecondition
        | C::OutOfRange
        | C::Unimplemented
        | C::Unauthenticated
        | C::ResourceExhausted => Outcome::NotApplied,
        C::Unavailable if never_sent(message) => Outcome::NotApplied,
        _ => Outcome::Unknown,
    }
}

/// Whether the client's error says the request never reached an etcd that could apply it.
fn refused_before_sending(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unavailable && never_sent(status.message()))
}

/// Whether an `Unavailable` message says the request was refused before etcd handled it.
fn never_sent(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "etcdserver: no leader",
        "error trying to connect",
        "tcp connect error",
        "connection refused",
        "no route to host",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

// ---------------------------------------------------------------------------------------------
// Connecting.

/// Client certificate and trust for an `https://` etcd.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA bundle that signed etcd's server certificates (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM).
    pub cert: PathBuf,
    /// This client's private key (PEM).
    pub key: PathBuf,
}

/// The deadlines of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing a connection to one endpoint.
    pub connect: Duration,
    /// Each request, from sending to its answer (a keep-alive: until its answer).
    pub request: Duration,
    /// HTTP/2 pings on idle connections, so a silent peer (partition) breaks the streams within
    /// about twice this instead of never.
    pub ping: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
            ping: Duration::from_secs(2),
        }
    }
}

/// A connection to etcd (cheap to clone: the clones share it).
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeouts: Timeouts,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Result of [`Store::create_config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// Ours is now the cluster's geometry.
    Created { revision: i64 },
    /// The cluster already has one: this JSON.
    Exists(String),
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL etcd granted (it may raise a TTL below its minimum).
    pub ttl_s: i64,
}

/// Result of [`Store::time_to_live`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTtl {
    /// `ttl_s` is the time left rounded down: 0 means less than a second.
    Alive { ttl_s: i64, granted_ttl_s: i64 },
    /// Expired or revoked (or never granted).
    Gone,
}

/// Result of [`Store::revoke`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Revoked,
    NotFound,
}

/// Result of [`Store::register_node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Registered {
        revision: i64,
    },
    /// The name is registered already; `record.value.lease` says by which lease (ours after a
    /// restart that kept its lease, else another agent's).
    Taken {
        record: Record<NodeValue>,
    },
}

/// Result of [`Store::claim_block`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The block is ours from `epoch` on (the key's create_revision; equal to `revision`, the
    /// revision of the claim).
    Claimed { epoch: i64, revision: i64 },
    /// Someone holds it (perhaps we, if an earlier claim's outcome was unknown).
    Taken { owner: Record<BlockValue> },
}

/// Result of [`Store::release_block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Released {
        revision: i64,
    },
    /// The key is gone or was created again since `epoch`: nothing was deleted. `revision` is
    /// the store's revision then: any record of the block older than that is stale.
    NotOurs {
        revision: i64,
    },
}

/// Blocks moved by one transaction of [`Store::move_blocks`]: two compares each, within etcd's
/// default `--max-txn-ops` of 128.
pub const MOVE_CHUNK: usize = 64;

/// Result of [`Store::move_blocks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Every block moved; `revision` is the last transaction's.
    Moved { revision: i64 },
    /// A block of a chunk was no longer that claim under that lease: that chunk moved nothing
    /// (earlier chunks did). Read the store again and move what is still there.
    Changed { revision: i64 },
}

impl Store {
    /// Connects to `endpoints` (`http://IP:PORT`, or `https://…` with `tls`). Connections are
    /// made lazily and re-made by the client; this only checks the settings.
    pub async fn connect(
        endpoints: &[String],
        tls: Option<&TlsFiles>,
        timeouts: Timeouts,
    ) -> Result<Self, StoreError> {
        const OP: &str = "connect";
        if endpoints.is_empty() {
            return Err(StoreError::Invalid {
                op: OP,
                detail: "no endpoints given".into(),
            });
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeouts.connect)
            .with_keep_alive(timeouts.ping, timeouts.ping)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader refuses at once ("no leader", not applied) and
            // ends our watches, instead of serving stale data or waiting out the deadline.
            .with_require_leader(true);
        if let Some(files) = tls {
            options = options.with_tls(tls_options(files)?);
        }
        let client = timeout(timeouts.connect, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| StoreError::deadline(OP, timeouts.connect))?
            .map_err(|e| StoreError::from_client(OP, &e))?;
        Ok(Self { client, timeouts })
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Runs one request under the request deadline. A request refused before it was sent (the
    /// endpoint the client's balancer picked is down, a member has no leader) is sent again after
    /// [`RETRY_PAUSE`] while the deadline allows: nothing was applied, and another endpoint, or
    /// the next leader, may take it. `request` makes the request from a handle on the client.
    async fn call<T, F, Fut>(&self, op: &'static str, mut request: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeouts.request;
        loop {
            let result = timeout_at(deadline, request(self.client.clone()))
                .await
                .map_err(|_| StoreError::deadline(op, self.timeouts.request))?;
            match result {
                Ok(v) => return Ok(v),
                Err(e) if refused_before_sending(&e) && Instant::now() + RETRY_PAUSE < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(StoreError::from_client(op, &e)),
            }
        }
    }

    /// Writes the cluster geometry if none is stored yet (txn: create_revision == 0 → put, else
    /// get), else returns the stored one.
    pub async fn create_config(&self, json: &str) -> Result<ConfigOutcome, StoreError> {
        const OP: &str = "create config";
        let key = Key::Config.path();
        let resp = self.create_or_get(OP, &key, json, None).await?;
        if resp.succeeded() {
            return Ok(ConfigOutcome::Created {
                revision: revision(&resp),
            });
        }
        let kv = existing(OP, &key, &resp)?;
        match decode(&Key::Config, kv.value()) {
            Ok(Value::Config(json)) => Ok(ConfigOutcome::Exists(json)),
            Ok(_) | Err(_) => Err(StoreError::BadValue {
                op: OP,
                key,
                reason: "not UTF-8".into(),
            }),
        }
    }

    /// One transaction: if `key` does not exist, put `value` (with `lease`), else get it.
    async fn create_or_get(
        &self,
        op: &'static str,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> Result<TxnResponse, StoreError> {
        let put = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, put)])
            .or_else([TxnOp::get(key, None)]);
        self.call(op, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// Grants a lease of `ttl_s` seconds.
    pub async fn grant(&self, ttl_s: i64) -> Result<Lease, StoreError> {
        let resp = self
            .call("grant lease", |mut c| async move {
                c.lease_grant(ttl_s, None).await
            })
            .await?;
        Ok(Lease {
            id: resp.id(),
            ttl_s: resp.ttl(),
        })
    }

    /// One keep-alive on a stream of its own: the lease's new TTL in seconds, 0 if it is gone.
    /// Read the clock before calling: the request is sent after the call starts, so that time
    /// is a safe (early) send time. [`KeepAlive`] keeps the stream open between keep-alives.
    pub async fn keep_alive_once(&self, lease: LeaseId) -> Result<i64, StoreError> {
        self.keeper(lease).once().await
    }

    /// A keep-alive stream for `lease`, opened at its first [`KeepAlive::once`].
    pub fn keeper(&self, lease: LeaseId) -> KeepAlive {
        KeepAlive {
            store: self.clone(),
            lease,
            stream: None,
            backoff: Backoff::default(),
            retry_at: None,
        }
    }

    /// The lease's remaining TTL.
    pub async fn time_to_live(&self, lease: LeaseId) -> Result<LeaseTtl, StoreError> {
        let resp = match self
            .call("lease time-to-live", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await
        {
            Err(StoreError::NotApplied { detail, .. }) if detail.contains("lease not found") => {
                return Ok(LeaseTtl::Gone)
            }
            other => other?,
        };
        // etcd answers TTL -1 for a lease it does not know, and rounds the time left down to
        // whole seconds: 0 is a lease in its last second, not a gone one.
        Ok(if resp.ttl() >= 0 {
            LeaseTtl::Alive {
                ttl_s: resp.ttl(),
                granted_ttl_s: resp.granted_ttl(),
            }
        } else {
            LeaseTtl::Gone
        })
    }

    /// Revokes `lease`, deleting every key attached to it at once.
    pub async fn revoke(&self, lease: LeaseId) -> Result<Revoked, StoreError> {
        const OP: &str = "revoke lease";
        match self
            .call(OP, |mut c| async move { c.lease_revoke(lease).await })
            .await
        {
            Ok(_) => Ok(Revoked::Revoked),
            Err(StoreError::NotApplied { detail, .. }) if detail.contains("lease not found") => {
                Ok(Revoked::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Registers node `name` at `address` under `lease` unless the name is registered already.
    pub async fn register_node(
        &self,
        name: &str,
        value: &NodeValue,
    ) -> Result<Registration, StoreError> {
        let lease = value.lease;
        const OP: &str = "register node";
        check_name(name).map_err(|reason| StoreError::Invalid {
            op: OP,
            detail: format!("node name {name:?} {reason}"),
        })?;
        let key = Key::Node(name.to_owned()).path();
        let value = encode(value);
        let resp = self.create_or_get(OP, &key, &value, Some(lease)).await?;
        if resp.succeeded() {
            return Ok(Registration::Registered {
                revision: revision(&resp),
            });
        }
        let record = existing_record(OP, &key, &resp, |v| match v {
            Value::Node(n) => Some(n),
            _ => None,
        })?;
        Ok(Registration::Taken { record })
    }

    /// Claims `block` for `node` (replies to `address`) under `lease`, if nobody holds it
    /// (txn: create_revision == 0 → put with the lease, else get).
    pub async fn claim_block(
        &self,
        block: BlockId,
        node: &str,
        address: Ipv4Addr,
        lease: LeaseId,
    ) -> Result<Claim, StoreError> {
        const OP: &str = "claim block";
        let key = Key::Block(block).path();
        let value = encode(&BlockValue {
            node: node.to_owned(),
            address,
            lease,
        });
        let resp = self.create_or_get(OP, &key, &value, Some(lease)).await?;
        if resp.succeeded() {
            // The put created the key at the transaction's revision.
            let revision = revision(&resp);
            return Ok(Claim::Claimed {
                epoch: revision,
                revision,
            });
        }
        let owner = existing_record(OP, &key, &resp, |v| match v {
            Value::Block(b) => Some(b),
            _ => None,
        })?;
        Ok(Claim::Taken { owner })
    }

    /// Deletes `block` if it is still the claim of `epoch` (txn: create_revision == epoch →
    /// delete).
    pub async fn release_block(&self, block: BlockId, epoch: i64) -> Result<Release, StoreError> {
        let key = Key::Block(block).path();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                epoch,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let resp = self
            .call("release block", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(if resp.succeeded() {
            Release::Released {
                revision: revision(&resp),
            }
        } else {
            Release::NotOurs {
                revision: revision(&resp),
            }
        })
    }

    /// Moves `blocks` (each with its epoch and its new value) from lease `from` to lease `to`, in
    /// one transaction per [`MOVE_CHUNK`] blocks that applies only if every block of the chunk
    /// is still the claim of its epoch under `from` (txn: create_revision == epoch and lease ==
    /// from, for each → put with `to`). A key that moves keeps its create revision (its epoch):
    /// it is rewritten, not re-created. `snat cluster release` moves a dead node's blocks under
    /// a quarantine lease of the cool-down's length this way, before it revokes the node's.
    pub async fn move_blocks(
        &self,
        blocks: &[(BlockId, i64, BlockValue)],
        from: LeaseId,
        to: LeaseId,
    ) -> Result<Moved, StoreError> {
        let mut last = 0;
        for chunk in blocks.chunks(MOVE_CHUNK) {
            let mut compares = Vec::with_capacity(chunk.len() * 2);
            let mut puts = Vec::with_capacity(chunk.len());
            for (block, epoch, value) in chunk {
                let key = Key::Block(*block).path();
                compares.push(Compare::create_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    *epoch,
                ));
                compares.push(Compare::lease(key.as_str(), CompareOp::Equal, from));
                puts.push(TxnOp::put(
                    key.as_str(),
                    encode(value),
                    Some(PutOptions::new().with_lease(to)),
                ));
            }
            let txn = Txn::new().when(compares).and_then(puts);
            let resp = self
                .call("move blocks", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            last = revision(&resp);
            if !resp.succeeded() {
                return Ok(Moved::Changed { revision: last });
            }
        }
        Ok(Moved::Moved { revision: last })
    }

    /// Publishes the revision gateway `name` has applied, under the gateway's `lease`.
    pub async fn put_gateway(
        &self,
        name: &str,
        applied_revision: i64,
        lease: LeaseId,
    ) -> Result<i64, StoreError> {
        const OP: &str = "publish gateway";
        check_name(name).map_err(|reason| StoreError::Invalid {
            op: OP,
            detail: format!("gateway name {name:?} {reason}"),
        })?;
        let key = Key::Gateway(name.to_owned()).path();
        let value = encode(&GatewayValue { applied_revision });
        let resp = self
            .call(OP, |mut c| {
                let (key, value) = (key.clone(), value.clone());
                let options = PutOptions::new().with_lease(lease);
                async move { c.put(key, value, Some(options)).await }
            })
            .await?;
        Ok(resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Marks gateway `name` known (`known: true`, a key without a lease: it outlives a lapse of
    /// the gateway's lease) or gone on purpose (`false`: the key deleted).
    pub async fn set_known_gateway(&self, name: &str, known: bool) -> Result<(), StoreError> {
        const OP: &str = "mark gateway known";
        check_name(name).map_err(|reason| StoreError::Invalid {
            op: OP,
            detail: format!("gateway name {name:?} {reason}"),
        })?;
        let key = Key::KnownGateway(name.to_owned()).path();
        if known {
            self.call(OP, |mut c| {
                let key = key.clone();
                async move { c.put(key, "{}", None).await }
            })
            .await?;
        } else {
            self.call(OP, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        }
        Ok(())
    }

    /// The store's current revision (a linearizable read of one key's count: small, whatever
    /// the prefix holds).
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .call("read revision", |mut c| async move {
                c.get(
                    Key::Config.path(),
                    Some(GetOptions::new().with_count_only()),
                )
                .await
            })
            .await?;
        Ok(resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Everything under [`PREFIX`], in one (linearizable) range read.
    pub async fn list(&self) -> Result<Snapshot, StoreError> {
        self.list_under("").await
    }

    /// The keys under `PREFIX + sub` only (e.g. `"gateways/"`), as a snapshot with the rest
    /// empty: a cheap read of one kind of record.
    pub async fn list_under(&self, sub: &str) -> Result<Snapshot, StoreError> {
        let prefix = format!("{PREFIX}{sub}");
        let resp = self
            .call("list", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut snapshot = Snapshot {
            revision: resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision),
            ..Snapshot::default()
        };
        for kv in resp.kvs() {
            match decode_kv(kv) {
                Ok((key, record)) => snapshot.insert(key, record),
                Err(bad) => snapshot.unreadable.push(bad),
            }
        }
        Ok(snapshot)
    }

    /// Follows the keys under `PREFIX + prefix` (e.g. `"blocks/"`, or `""` for all) from
    /// `from_revision` on (typically a [`Snapshot::revision`] + 1).
    pub fn watch(&self, prefix: &str, from_revision: i64) -> Watch {
        Watch {
            store: self.clone(),
            prefix: format!("{PREFIX}{prefix}"),
            next_revision: from_revision,
            stream: None,
            backoff: Backoff::default(),
            retry_at: None,
            compacted: None,
        }
    }
}

fn revision(resp: &TxnResponse) -> i64 {
    resp.header()
        .map_or(0, etcd_client::ResponseHeader::revision)
}

/// The key-value the read-only branch of a failed create-or-get returned.
fn existing(op: &'static str, key: &str, resp: &TxnResponse) -> Result<KeyValue, StoreError> {
    resp.op_responses()
        .into_iter()
        .find_map(|r| match r {
            TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
            _ => None,
        })
        .ok_or_else(|| StoreError::BadValue {
            op,
            key: key.to_owned(),
            reason: "the transaction found the key but read nothing".into(),
        })
}

/// The decoded record the read-only branch of a failed create-or-get returned.
fn existing_record<T>(
    op: &'static str,
    key: &str,
    resp: &TxnResponse,
    pick: impl FnOnce(Value) -> Option<T>,
) -> Result<Record<T>, StoreError> {
    let kv = existing(op, key, resp)?;
    let bad = |reason: String| StoreError::BadValue {
        op,
        key: key.to_owned(),
        reason,
    };
    let (_, record) = decode_kv(&kv).map_err(|u| bad(u.reason))?;
    let (value, record) = record.split();
    let value = pick(value).ok_or_else(|| bad("value of another kind".into()))?;
    Ok(record.with(value))
}

fn tls_options(files: &TlsFiles) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| StoreError::Invalid {
            op: "connect",
            detail: format!("cannot read the etcd {what} {}: {e}", path.display()),
        })
    };
    let ca = read("CA (--etcd-ca)", &files.ca)?;
    let cert = read("client certificate (--etcd-cert)", &files.cert)?;
    let key = read("client key (--etcd-key)", &files.key)?;
    Ok(etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(ca))
        .identity(etcd_client::Identity::from_pem(cert, key)))
}

// ---------------------------------------------------------------------------------------------
// Streams.

/// Exponential back-off between re-opening a broken stream: 100 ms doubling to 5 s, back to the
/// start after a stream works again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    /// The wait before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

/// Keep-alives for one lease over one stream, re-opened with back-off after it breaks.
pub struct KeepAlive {
    store: Store,
    lease: LeaseId,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAlive")
            .field("lease", &self.lease)
            .field("open", &self.stream.is_some())
            .field("retry_at", &self.retry_at)
            .finish_non_exhaustive()
    }
}

impl KeepAlive {
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Sends one keep-alive and waits (at most the request deadline) for its answer: the lease's
    /// TTL in seconds, or 0 once the lease is gone. Read the clock before calling: the request
    /// leaves after the call starts (after re-opening the stream, if it was broken), so that
    /// time is a safe, early send time for the fence deadline.
    ///
    /// Never waits out a back-off: while the stream may not be re-opened yet this fails at once
    /// with [`StoreError::NotApplied`] naming the wait; call again later. Any other failure
    /// drops the stream (the next call re-opens it after the back-off) and is
    /// [`StoreError::Unknown`]: the keep-alive may have reached etcd, but without its answer it
    /// proves nothing.
    pub async fn once(&mut self) -> Result<i64, StoreError> {
        const OP: &str = "lease keep-alive";
        let deadline = self.store.timeouts.request;
        if self.stream.is_none() {
            if let Some(at) = self.retry_at {
                let now = Instant::now();
                if at > now {
                    return Err(StoreError::NotApplied {
                        op: OP,
                        detail: format!(
                            "the keep-alive stream broke; re-opening it in {:?}",
                            at - now
                        ),
                    });
                }
            }
            let lease = self.lease;
            // Opening sends a first keep-alive, but etcd-client keeps its answer's TTL to
            // itself: the TTL comes from the keep-alive sent below on the new stream.
            let opened = self
                .store
                .call(OP, |mut c| async move { c.lease_keep_alive(lease).await })
                .await;
            match opened {
                Ok(stream) => self.stream = Some(stream),
                // etcd-client's word for a first answer with TTL 0.
                Err(e) if e.to_string().contains("lease not found") => return Ok(0),
                Err(e) => return Err(self.broken(e)),
            }
        }
        let Some((keeper, answers)) = self.stream.as_mut() else {
            unreachable!("opened above");
        };
        let exchange = async {
            keeper.keep_alive().await?;
            answers.message().await
        };
        match timeout(deadline, exchange).await {
            Err(_) => Err(self.broken(StoreError::deadline(OP, deadline))),
            Ok(Err(e)) => Err(self.broken(StoreError::from_client(OP, &e))),
            Ok(Ok(None)) => Err(self.broken(StoreError::Unknown {
                op: OP,
                detail: "etcd closed the keep-alive stream".into(),
            })),
            Ok(Ok(Some(answer))) => {
                self.backoff.reset();
                self.retry_at = None;
                let ttl = answer.ttl().max(0);
                if ttl == 0 {
                    // The lease is gone for good; a new stream would say the same.
                    self.stream = None;
                }
                Ok(ttl)
            }
        }
    }

    /// Drops the stream and schedules its re-opening; returns `error`.
    fn broken(&mut self, error: StoreError) -> StoreError {
        self.stream = None;
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
        error
    }
}

/// A change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: Key,
        record: Record<Value>,
    },
    /// The key was deleted (released, revoked, or its lease expired) at `revision`.
    Delete {
        key: Key,
        revision: i64,
    },
    /// A key that is not ours, or a value that does not decode, at `revision`.
    Unreadable {
        bad: Unreadable,
        revision: i64,
    },
}

/// What [`Watch::next`] reports.
#[derive(Debug)]
pub enum WatchEvent {
    /// The watch is (re-)established; changes from [`Watch::next_revision`] on follow. `revision`
    /// is the store's revision when etcd created it.
    Connected { revision: i64 },
    /// Changes, in revision order; every change up to `revision` has been delivered.
    Changes { revision: i64, changes: Vec<Change> },
    /// Nothing changed up to `revision` (an etcd progress notification).
    Progress { revision: i64 },
    /// The revisions from [`Watch::next_revision`] on were compacted away: changes were lost.
    /// [`Store::list`], then [`Watch::resume_from`] the snapshot's revision + 1. Until then
    /// `next` answers this again.
    Resync { compact_revision: i64 },
    /// The stream broke; it is re-opened from [`Watch::next_revision`] after `retry_in`.
    Disconnected {
        error: StoreError,
        retry_in: Duration,
    },
}

/// A watch on a prefix that re-opens itself, with back-off, from the revision after the last
/// change it delivered. [`Watch::next`] is cancel-safe: dropping its future (in a `select!`)
/// loses no change.
pub struct Watch {
    store: Store,
    prefix: String,
    next_revision: i64,
    stream: Option<WatchStream>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    compacted: Option<i64>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("prefix", &self.prefix)
            .field("next_revision", &self.next_revision)
            .field("open", &self.stream.is_some())
            .field("compacted", &self.compacted)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// The first revision not yet delivered.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// Continues from `revision` (after a [`WatchEvent::Resync`], the re-list's revision + 1).
    pub fn resume_from(&mut self, revision: i64) {
        self.next_revision = revision;
        self.compacted = None;
        self.stream = None;
        self.retry_at = None;
    }

    /// The next event; waits for it as long as it takes (back-offs included).
    pub async fn next(&mut self) -> WatchEvent {
        const OP: &str = "watch";
        if let Some(compact_revision) = self.compacted {
            return WatchEvent::Resync { compact_revision };
        }
        if self.stream.is_none() {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.next_revision)
                .with_progress_notify();
            let prefix = self.prefix.clone();
            let opened = self
                .store
                .call(OP, |mut c| {
                    let (prefix, options) = (prefix.clone(), options.clone());
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await;
            match opened {
                Ok(stream) => self.stream = Some(stream),
                Err(e) => return self.broken(e),
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("opened above");
        };
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return self.broken(StoreError::Unknown {
                    op: OP,
                    detail: "etcd closed the watch stream".into(),
                })
            }
            Err(e) => return self.broken(StoreError::from_client(OP, &e)),
        };
        let revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        if resp.compact_revision() != 0 {
            self.stream = None;
            self.compacted = Some(resp.compact_revision());
            return WatchEvent::Resync {
                compact_revision: resp.compact_revision(),
            };
        }
        if resp.canceled() {
            return self.broken(StoreError::Unknown {
                op: OP,
                detail: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
            });
        }
        self.backoff.reset();
        self.retry_at = None;
        if resp.created() {
            return WatchEvent::Connected { revision };
        }
        if resp.events().is_empty() {
            self.next_revision = self.next_revision.max(revision + 1);
            return WatchEvent::Progress { revision };
        }
        let changes: Vec<Change> = resp.events().iter().filter_map(change).collect();
        if let Some(last) = resp
            .events()
            .iter()
            .filter_map(|e| e.kv().map(KeyValue::mod_revision))
            .max()
        {
            self.next_revision = self.next_revision.max(last + 1);
        }
        WatchEvent::Changes { revision, changes }
    }

    /// Drops the stream and schedules its re-opening; reports the break.
    fn broken(&mut self, error: StoreError) -> WatchEvent {
        self.stream = None;
        let retry_in = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + retry_in);
        WatchEvent::Disconnected { error, retry_in }
    }
}

/// One watch event as a [`Change`].
fn change(event: &etcd_client::Event) -> Option<Change> {
    let kv = event.kv()?;
    Some(match event.event_type() {
        EventType::Put => match decode_kv(kv) {
            Ok((key, record)) => Change::Put { key, record },
            Err(bad) => Change::Unreadable {
                bad,
                revision: kv.mod_revision(),
            },
        },
        EventType::Delete => {
            let name = String::from_utf8_lossy(kv.key());
            match Key::parse(&name) {
                Some(key) => Change::Delete {
                    key,
                    revision: kv.mod_revision(),
                },
                None => Change::Unreadable {
                    bad: Unreadable {
                        key: name.into_owned(),
                        reason: "not a key of snat".into(),
                    },
                    revision: kv.mod_revision(),
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(ip: [u8; 4], index: u16) -> BlockId {
        BlockId {
            nat_ip: Ipv4Addr::from(ip),
            index,
        }
    }

    #[test]
    fn keys_round_trip() {
        for key in [
            Key::Config,
            Key::Node("node-1.example".into()),
            Key::Block(block([198, 51, 100, 1], 0)),
            Key::Block(block([203, 0, 113, 7], 1023)),
            Key::Gateway("gw_a".into()),
        ] {
            assert_eq!(Key::parse(&key.path()), Some(key.clone()), "{}", key.path());
        }
        assert_eq!(
            Key::Block(block([198, 51, 100, 1], 3)).path(),
            "/snat/v1/blocks/198.51.100.1/3"
        );
        assert_eq!(Key::Node("n1".into()).path(), "/snat/v1/nodes/n1");
        assert_eq!(Key::Config.path(), "/snat/v1/config");
        assert_eq!(Key::Gateway("g".into()).path(), "/snat/v1/gateways/g");
    }

    #[test]
    fn non_canonical_or_foreign_keys_are_not_ours() {
        for key in [
            "/snat/v2/config",
            "/snat/v1/configx",
            "/snat/v1/nodes/",
            "/snat/v1/nodes/a/b",
            "/snat/v1/blocks/198.51.100.1",
            "/snat/v1/blocks/198.51.100.1/07",
            "/snat/v1/blocks/198.51.100.1/+7",
            "/snat/v1/blocks/198.51.100.1/-1",
            "/snat/v1/blocks/198.51.100.1/4294967296",
            "/snat/v1/blocks/198.51.100.01/7",
            "/snat/v1/blocks/::1/7",
            "/snat/v1/blocks/198.51.100.1/7/x",
            "/snat/v1/gateways/a b",
            "/snat/v1/other",
        ] {
            assert_eq!(Key::parse(key), None, "{key}");
        }
    }

    #[test]
    fn names_are_one_segment() {
        assert!(check_name("ip-10-0-0-1.ec2.internal").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"a".repeat(254)).is_err());
        assert!(check_name("ünicode").is_err());
    }

    #[test]
    fn values_have_their_json_shape() {
        let mut node = NodeValue {
            address: Ipv4Addr::new(10, 0, 0, 1),
            lease: 7_587_869_462_913_456_129,
            timers: None,
        };
        // A record of an agent before the timers were published still reads.
        assert_eq!(
            encode(&node),
            r#"{"address":"10.0.0.1","lease":7587869462913456129}"#
        );
        node.timers = Some(NodeTimers::new(
            Duration::from_secs(20),
            Duration::from_millis(5500),
        ));
        assert_eq!(
            encode(&node),
            r#"{"address":"10.0.0.1","lease":7587869462913456129,"timers":{"cooldown_ms":20000,"fence_margin_ms":5500}}"#
        );
        let blk = BlockValue {
            node: "n1".into(),
            address: Ipv4Addr::new(10, 0, 0, 1),
            lease: 5,
        };
        assert_eq!(
            encode(&blk),
            r#"{"node":"n1","address":"10.0.0.1","lease":5}"#
        );
        let gw = GatewayValue {
            applied_revision: 42,
        };
        assert_eq!(encode(&gw), r#"{"applied_revision":42}"#);

        assert_eq!(
            decode(&Key::Node("n1".into()), encode(&node).as_bytes()),
            Ok(Value::Node(node))
        );
        assert_eq!(
            decode(&Key::Block(block([1, 2, 3, 4], 0)), encode(&blk).as_bytes()),
            Ok(Value::Block(blk))
        );
        assert_eq!(
            decode(&Key::Gateway("g".into()), br#"{"applied_revision":42}"#),
            Ok(Value::Gateway(gw))
        );
        assert_eq!(
            decode(&Key::Config, br#"{"v":1}"#),
            Ok(Value::Config(r#"{"v":1}"#.into()))
        );
    }

    #[test]
    fn values_decode_with_unknown_fields_and_reject_bad_ones() {
        // A newer agent may add fields; older ones still read the ones they know.
        assert!(decode(
            &Key::Node("n".into()),
            br#"{"address":"10.0.0.1","lease":1,"zone":"a"}"#
        )
        .is_ok());
        for bad in [
            &br#"{"address":"10.0.0.1"}"#[..],
            br#"{"address":"10.0.0.300","lease":1}"#,
            br#"{"address":"10.0.0.1","lease":"1"}"#,
            b"not json",
        ] {
            assert!(decode(&Key::Node("n".into()), bad).is_err());
        }
        assert!(decode(&Key::Config, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn snapshot_files_records_under_their_keys() {
        let mut s = Snapshot::default();
        let rec = |value| Record {
            value,
            create_revision: 3,
            mod_revision: 4,
            lease: 9,
        };
        let b = BlockValue {
            node: "n1".into(),
            address: Ipv4Addr::new(10, 0, 0, 1),
            lease: 9,
        };
        s.insert(
            Key::Block(block([1, 2, 3, 4], 2)),
            rec(Value::Block(b.clone())),
        );
        s.insert(Key::Node("n1".into()), rec(Value::Config("x".into())));
        assert_eq!(s.blocks[&block([1, 2, 3, 4], 2)].value, b);
        assert_eq!(s.blocks[&block([1, 2, 3, 4], 2)].create_revision, 3);
        assert!(s.nodes.is_empty());
        assert_eq!(s.unreadable.len(), 1);
    }

    #[test]
    fn outcomes_of_grpc_statuses() {
        use tonic::Code;
        assert_eq!(
            status_outcome(Code::DeadlineExceeded, "context deadline exceeded"),
            Outcome::Unknown
        );
        assert_eq!(
            status_outcome(Code::Unavailable, "etcdserver: request timed out"),
            Outcome::Unknown
        );
        assert_eq!(
            status_outcome(Code::Unavailable, "etcdserver: leader changed"),
            Outcome::Unknown
        );
        assert_eq!(
            status_outcome(Code::Unavailable, "etcdserver: no leader"),
            Outcome::NotApplied
        );
        assert_eq!(
            status_outcome(
                Code::Unavailable,
                "error trying to connect: tcp connect error: Connection refused (os error 111)"
            ),
            Outcome::NotApplied
        );
        assert_eq!(
            status_outcome(Code::NotFound, "etcdserver: requested lease not found"),
            Outcome::NotApplied
        );
        assert_eq!(
            status_outcome(Code::Unknown, "h2 protocol error"),
            Outcome::Unknown
        );
        assert_eq!(status_outcome(Code::Cancelled, ""), Outcome::Unknown);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Backoff::MIN);
        assert_eq!(delays[1], Backoff::MIN * 2);
        assert_eq!(*delays.last().unwrap(), Backoff::MAX);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        b.reset();
        assert_eq!(b.next_delay(), Backoff::MIN);
    }
}
