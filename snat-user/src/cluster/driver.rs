//! The IO around a [`Node`]: runs its store operations concurrently (each completes or fails
//! within the store's own deadline), applies its datapath operations in order, feeds it the
//! datapath's usage and pressure and its timeouts, on `CLOCK_BOOTTIME` (the clock the datapath
//! checks `valid_until` against). The store and the datapath come in as traits, so this module
//! imports neither etcd nor the maps.
//!
//! A datapath operation that fails ends the driver with an error: the agent exits, and the
//! pinned programs keep translating only until the blocks' valid-until, which is what makes that
//! safe. A stop either drains (blocks go back through the cool-down) or leaves everything as it
//! is for the next agent (`--keep-state`).

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use super::node::{
    Command, DatapathOp, Node, OpId, Pressure, Status, StoreError, StoreOp, StoreReply, Usage,
};

/// One store operation, completed or failed within the store's deadline.
pub trait Store: Clone + Send + Sync + 'static {
    fn execute(
        &self,
        op: StoreOp,
    ) -> impl Future<Output = Result<StoreReply, StoreError>> + Send + 'static;
}

/// The datapath's block table.
pub trait Blocks {
    fn apply(&mut self, op: &DatapathOp) -> anyhow::Result<()>;
    /// Per-block mapping counts and activity, and the pressure (a full read).
    fn usage(&mut self) -> anyhow::Result<Usage>;
    /// What changed in the pressure since the last poll: refusals, a lower estimate of free
    /// ports (cheap: polled every few milliseconds so a block is claimed before the next full
    /// read, or at once after a refusal).
    fn pressure(&mut self) -> anyhow::Result<Vec<Pressure>>;
}

impl<B: Blocks + ?Sized> Blocks for &mut B {
    fn apply(&mut self, op: &DatapathOp) -> anyhow::Result<()> {
        (**self).apply(op)
    }
    fn usage(&mut self) -> anyhow::Result<Usage> {
        (**self).usage()
    }
    fn pressure(&mut self) -> anyhow::Result<Vec<Pressure>> {
        (**self).pressure()
    }
}

/// How the agent wants the driver to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Give every block back as it empties, then end.
    Drain,
    /// The datapath was detached: every block goes back a cool-down from now, then end.
    Detached,
    /// End now; the pinned state and the lease carry over to the next agent.
    Keep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Drained,
    Kept,
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub use crate::clock::boottime_ns;

/// The intervals the driver polls the datapath at.
#[derive(Clone, Copy, Debug)]
pub struct Polling {
    /// The shortest interval between full reads of the blocks' usage (stretched to 20 times a
    /// read's duration, so a node with a million mappings spends at most 5 % of a CPU on them).
    pub usage: Duration,
    pub pressure: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            usage: Duration::from_millis(250),
            pressure: Duration::from_millis(5),
        }
    }
}

/// Runs `node` until it drains, the agent stops it, or it fails. `status` always holds the
/// node's latest [`Status`] for the report.
pub async fn run<S: Store, B: Blocks>(
    mut node: Node,
    store: S,
    mut blocks: B,
    polling: Polling,
    mut stop: watch::Receiver<Stop>,
    status: Arc<Mutex<Status>>,
) -> anyhow::Result<Outcome> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(OpId, Result<StoreReply, StoreError>)>();
    let mut usage = tokio::time::interval(polling.usage);
    let mut pressure = tokio::time::interval(polling.pressure);
    pressure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        while let Some(cmd) = node.next_command() {
            match cmd {
                Command::Store { id, op } => {
                    log::debug!("store op {id}: {op:?}");
                    let (store, tx) = (store.clone(), tx.clone());
                    tokio::spawn(async move {
                        let r = store.execute(op).await;
                        let _ = tx.send((id, r));
                    });
                }
                Command::Datapath(op) => blocks
                    .apply(&op)
                    .with_context(|| format!("applying {op:?} to the datapath's block table"))?,
                Command::Fatal(why) => anyhow::bail!(why),
                Command::Drained => return Ok(Outcome::Drained),
            }
        }
        let now = boottime_ns();
        *status.lock().unwrap_or_else(PoisonError::into_inner) = node.status(now);
        let wake = node
            .poll_timeout()
            .map(|t| Duration::from_nanos(t.saturating_sub(now)));
        tokio::select! {
            Some((id, r)) = rx.recv() => {
                log::debug!("store op {id}: {r:?}");
                node.handle_store(id, r, boottime_ns());
            }
            () = sleep(wake) => node.handle_timeout(boottime_ns()),
            _ = usage.tick() => {
                let started = std::time::Instant::now();
                let u = blocks.usage().context("reading the blocks' usage")?;
                node.handle_usage(&u, boottime_ns());
                // A full read walks every mapping: at most 5 % of a CPU on it.
                let next = polling.usage.max(started.elapsed() * 20);
                if next != usage.period() {
                    usage = tokio::time::interval_at(tokio::time::Instant::now() + next, next);
                    usage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                }
            }
            _ = pressure.tick() => {
                let p = blocks.pressure().context("reading the datapath's port pressure")?;
                if !p.is_empty() {
                    node.handle_pressure(&p, boottime_ns());
                }
            }
            changed = stop.changed() => {
                let what = if changed.is_err() { Stop::Keep } else { *stop.borrow() };
                match what {
                    Stop::Running => {}
                    Stop::Drain => node.drain(boottime_ns()),
                    Stop::Detached => node.detached(boottime_ns()),
                    Stop::Keep => return Ok(Outcome::Kept),
                }
            }
        }
    }
}

async fn sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        cluster::{
            geometry::{BlockId, Geometry},
            node::{NodeConfig, Pressure, Restored, Timers},
            sim::{Etcd, Faults},
            Rng,
        },
        settings::ports::PortRange,
    };

    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    /// The simulation's store, on the real clock.
    #[derive(Clone)]
    struct Fake(Arc<Mutex<(Etcd, Rng)>>);

    impl Store for Fake {
        fn execute(
            &self,
            op: StoreOp,
        ) -> impl Future<Output = Result<StoreReply, StoreError>> + Send + 'static {
            let this = self.clone();
            async move {
                let mut g = this.0.lock().unwrap();
                let (etcd, rng) = &mut *g;
                let t = boottime_ns();
                etcd.advance(t);
                etcd.apply("n1", &op, t, &Faults::NONE, rng)
            }
        }
    }

    /// A datapath that refuses flows until it has an open block.
    #[derive(Default)]
    struct FakeBlocks {
        ops: Vec<DatapathOp>,
    }

    impl FakeBlocks {
        fn open(&self) -> bool {
            self.ops
                .iter()
                .any(|o| matches!(o, DatapathOp::Open { .. }))
        }
    }

    impl Blocks for FakeBlocks {
        fn apply(&mut self, op: &DatapathOp) -> anyhow::Result<()> {
            self.ops.push(op.clone());
            Ok(())
        }
        fn usage(&mut self) -> anyhow::Result<Usage> {
            Ok(Usage {
                blocks: vec![],
                pressure: self.pressure()?,
            })
        }
        fn pressure(&mut self) -> anyhow::Result<Vec<Pressure>> {
            Ok(vec![Pressure {
                nat_ip: IP,
                free: if self.open() { 64 } else { 0 },
                refused: !self.open(),
            }])
        }
    }

    #[tokio::test]
    async fn a_refused_flow_gets_a_block_within_milliseconds() {
        let geometry = Geometry::new(
            PortRange {
                lo: 40000,
                hi: 40511,
            },
            64,
            vec![],
            vec![IP],
        )
        .unwrap();
        let cfg = NodeConfig {
            name: "n1".into(),
            address: Ipv4Addr::new(10, 1, 0, 1),
            geometry,
            timers: Timers::new(
                Duration::from_secs(90),
                Duration::from_secs(20),
                Duration::from_secs(5),
            ),
            min_blocks: 0,
            max_blocks: None,
            low_water: 16,
            seed: 7,
        };
        let node = Node::new(cfg, Restored::default(), boottime_ns());
        let store = Fake(Arc::new(Mutex::new((Etcd::new(), Rng::new(1)))));
        let mut blocks = FakeBlocks::default();
        let (stop_tx, stop_rx) = watch::channel(Stop::Running);
        let status = Arc::new(Mutex::new(Status::default()));
        let started = std::time::Instant::now();
        let watcher = {
            let status = status.clone();
            async move {
                while !status
                    .lock()
                    .unwrap()
                    .blocks
                    .iter()
                    .any(|b| matches!(b.2, crate::cluster::node::BlockState::Open { .. }))
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                stop_tx.send(Stop::Keep).unwrap();
            }
        };
        let (outcome, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(
                run(
                    node,
                    store,
                    &mut blocks,
                    Polling::default(),
                    stop_rx,
                    status.clone()
                ),
                watcher
            )
        })
        .await
        .expect("no block within 5 s");
        assert_eq!(outcome.unwrap(), Outcome::Kept);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let st = status.lock().unwrap().clone();
        assert!(st.ready && st.connected && st.lease.is_some(), "{st:?}");
        // The datapath heard a block was on its way before it opened.
        let first_open = blocks
            .ops
            .iter()
            .position(|o| matches!(o, DatapathOp::Open { .. }));
        let growing = blocks.ops.iter().position(|o| {
            matches!(
                o,
                DatapathOp::Growing {
                    nat_ip: IP,
                    growing: true
                }
            )
        });
        assert!(growing < first_open, "{:?}", blocks.ops);
        let ops: Vec<&DatapathOp> = blocks
            .ops
            .iter()
            .filter(|o| !matches!(o, DatapathOp::Growing { .. }))
            .collect();
        assert_eq!(*ops[0], DatapathOp::SetLease(st.lease));
        assert!(
            matches!(
                ops[1],
                DatapathOp::Open {
                    block: BlockId { nat_ip: IP, .. },
                    ..
                }
            ),
            "{:?}",
            blocks.ops
        );
        assert_eq!(st.stats.claims.get("ok"), Some(&1), "{:?}", blocks.ops);
        assert!(st.fence_in > 60_000_000_000, "{st:?}");
    }
}
