//! Cluster mode's etcd store (`snat_user::cluster::store`) against a real etcd 3.4.23 (Debian's),
//! one member or three, in namespaces of the test's own: every operation, claims racing from two
//! clients, releases by epoch, leases expiring, blocks moved under a quarantine lease, a watch across an etcd restart and a compaction,
//! and a three-member cluster losing its leader.
//!
//! The clients run on threads inside client namespaces ([`tests::etcd::block_on`]), each with a
//! tokio runtime of its own.

use std::{
    net::Ipv4Addr,
    sync::{mpsc, Arc, Barrier},
    time::Duration,
};

use snat_user::cluster::store::{
    BlockId, BlockValue, Change, Claim, ConfigOutcome, Key, LeaseTtl, Moved, NodeTimers, NodeValue,
    Outcome, Registration, Release, Revoked, Store, StoreError, Timeouts, Watch, WatchEvent,
};
use tests::{
    etcd::{block_on, spawn_block_on, Etcd},
    netns::Netns,
};
use tokio::time::{sleep, timeout, Instant};

const NAT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A node's record with the default timers.
fn node_value(address: Ipv4Addr, lease: i64) -> NodeValue {
    NodeValue {
        address,
        lease,
        timers: Some(NodeTimers::new(
            Duration::from_secs(20),
            Duration::from_secs(5),
        )),
    }
}

fn block(index: u16) -> BlockId {
    BlockId {
        nat_ip: NAT_IP,
        index,
    }
}

async fn connect(endpoints: &[String]) -> Store {
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        request: Duration::from_secs(3),
        ping: Duration::from_secs(1),
    };
    Store::connect(endpoints, None, timeouts)
        .await
        .expect("connecting to etcd")
}

/// The next watch event that is not a disconnection or a progress note, within `within`.
async fn next_event(watch: &mut Watch, within: Duration) -> WatchEvent {
    let deadline = Instant::now() + within;
    loop {
        let event = timeout(deadline - Instant::now(), watch.next())
            .await
            .unwrap_or_else(|_| panic!("no watch event within {within:?} ({watch:?})"));
        match event {
            WatchEvent::Disconnected { .. } | WatchEvent::Progress { .. } => continue,
            other => return other,
        }
    }
}

/// The next batch of changes (skipping the (re)connection), within `within`.
async fn next_changes(watch: &mut Watch, within: Duration) -> Vec<Change> {
    loop {
        match next_event(watch, within).await {
            WatchEvent::Connected { .. } => continue,
            WatchEvent::Changes { changes, .. } => return changes,
            other => panic!("expected changes, got {other:?}"),
        }
    }
}

fn put_key(change: &Change) -> Option<&Key> {
    match change {
        Change::Put { key, .. } => Some(key),
        _ => None,
    }
}

#[test]
fn every_store_operation_against_etcd_3_4() {
    let etcd = Etcd::start(1);
    let endpoints = etcd.endpoints();
    // A key of no one under the prefix: listed as unreadable, never dropped silently.
    assert!(etcd
        .etcdctl(&["put", "/snat/v1/junk", "x"])
        .status
        .success());
    block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;

        // The geometry is written once; later writers get the first one back.
        let created = store.create_config(r#"{"v":1}"#).await.unwrap();
        assert!(
            matches!(created, ConfigOutcome::Created { .. }),
            "{created:?}"
        );
        assert_eq!(
            store.create_config(r#"{"v":2}"#).await.unwrap(),
            ConfigOutcome::Exists(r#"{"v":1}"#.into())
        );

        // Leases: grant, time-to-live, keep-alives one-off and on a kept stream.
        let lease = store.grant(30).await.unwrap();
        assert_eq!(lease.ttl_s, 30);
        match store.time_to_live(lease.id).await.unwrap() {
            LeaseTtl::Alive {
                ttl_s,
                granted_ttl_s,
            } => {
                assert!((25..=30).contains(&ttl_s), "{ttl_s}");
                assert_eq!(granted_ttl_s, 30);
            }
            gone => panic!("fresh lease {gone:?}"),
        }
        assert_eq!(store.keep_alive_once(lease.id).await.unwrap(), 30);
        let mut keeper = store.keeper(lease.id);
        for _ in 0..3 {
            assert_eq!(keeper.once().await.unwrap(), 30);
        }

        // Nodes: registered once; a second registration learns the holder's lease.
        let other = store.grant(30).await.unwrap();
        let reg = store
            .register_node("a", &node_value(NODE_A, lease.id))
            .await
            .unwrap();
        assert!(matches!(reg, Registration::Registered { .. }), "{reg:?}");
        match store
            .register_node("a", &node_value(NODE_B, other.id))
            .await
            .unwrap()
        {
            Registration::Taken { record } => {
                assert_eq!(record.value, node_value(NODE_A, lease.id));
                assert_eq!(record.lease, lease.id, "the key is on the node's lease");
            }
            r => panic!("second registration: {r:?}"),
        }
        let bad = store
            .register_node("a/b", &node_value(NODE_A, lease.id))
            .await;
        assert!(
            matches!(&bad, Err(e @ StoreError::Invalid { .. }) if e.outcome() == Outcome::NotApplied),
            "{bad:?}"
        );

        // Blocks: one claim wins, the epoch is the create_revision, releases need the epoch.
        let Claim::Claimed { epoch, revision } = store
            .claim_block(block(0), "a", NODE_A, lease.id)
            .await
            .unwrap()
        else {
            panic!("first claim of a free block failed");
        };
        assert_eq!(epoch, revision);
        match store
            .claim_block(block(0), "b", NODE_B, other.id)
            .await
            .unwrap()
        {
            Claim::Taken { owner } => {
                assert_eq!(owner.value.node, "a");
                assert_eq!(owner.value.address, NODE_A);
                assert_eq!(owner.value.lease, lease.id);
                assert_eq!(owner.create_revision, epoch);
                assert_eq!(owner.lease, lease.id);
            }
            c => panic!("claim of a held block: {c:?}"),
        }
        for wrong in [0, epoch - 1, epoch + 1] {
            assert!(
                matches!(
                    store.release_block(block(0), wrong).await.unwrap(),
                    Release::NotOurs { revision } if revision >= epoch
                ),
                "epoch {wrong}"
            );
        }
        let Release::Released { revision: released } =
            store.release_block(block(0), epoch).await.unwrap()
        else {
            panic!("release with the right epoch failed");
        };
        assert!(released > epoch);
        assert!(matches!(
            store.release_block(block(0), epoch).await.unwrap(),
            Release::NotOurs { revision } if revision >= released
        ));
        let Claim::Claimed { epoch: epoch2, .. } = store
            .claim_block(block(0), "b", NODE_B, other.id)
            .await
            .unwrap()
        else {
            panic!("claim of a released block failed");
        };
        assert!(epoch2 > released, "a new claim has a new epoch");
        assert!(
            matches!(
                store.release_block(block(0), epoch).await.unwrap(),
                Release::NotOurs { .. }
            ),
            "the old epoch cannot release the new claim"
        );
        let Claim::Claimed {
            epoch: epoch_a1, ..
        } = store
            .claim_block(block(1), "a", NODE_A, lease.id)
            .await
            .unwrap()
        else {
            panic!("claim of block 1 failed");
        };

        // Gateways publish their applied revision.
        let published = store.put_gateway("gw", 42, other.id).await.unwrap();
        assert!(published > epoch_a1);

        // One read sees it all.
        let snap = store.list().await.unwrap();
        assert!(snap.revision >= published);
        assert_eq!(snap.config.as_ref().unwrap().value, r#"{"v":1}"#);
        assert_eq!(snap.nodes.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(snap.nodes["a"].value.lease, lease.id);
        assert_eq!(snap.blocks.len(), 2);
        assert_eq!(snap.blocks[&block(0)].value.node, "b");
        assert_eq!(snap.blocks[&block(0)].create_revision, epoch2);
        assert_eq!(snap.blocks[&block(0)].lease, other.id);
        assert_eq!(snap.blocks[&block(1)].create_revision, epoch_a1);
        assert_eq!(snap.gateways["gw"].value.applied_revision, 42);
        assert_eq!(snap.unreadable.len(), 1, "{:?}", snap.unreadable);
        assert_eq!(snap.unreadable[0].key, "/snat/v1/junk");

        // Revoking a lease deletes every key on it at once.
        assert_eq!(store.revoke(other.id).await.unwrap(), Revoked::Revoked);
        let snap = store.list().await.unwrap();
        assert_eq!(snap.blocks.keys().collect::<Vec<_>>(), [&block(1)]);
        assert!(snap.gateways.is_empty());
        assert!(snap.nodes.contains_key("a"));
        assert_eq!(store.revoke(other.id).await.unwrap(), Revoked::NotFound);
        assert_eq!(store.time_to_live(other.id).await.unwrap(), LeaseTtl::Gone);
        assert_eq!(store.keep_alive_once(other.id).await.unwrap(), 0);
        let mut gone = store.keeper(other.id);
        assert_eq!(gone.once().await.unwrap(), 0);
        // The other lease's stream is unaffected.
        assert_eq!(keeper.once().await.unwrap(), 30);
    });
}

#[test]
fn a_client_cut_off_fails_within_its_deadline_and_recovers() {
    let etcd = Etcd::start(1);
    let cut = Netns::new(&format!("{}-ec2", etcd.prefix));
    let link = etcd.connect(&cut);
    let (endpoints, etcd_ns) = (etcd.endpoints(), etcd.ns.name.clone());
    block_on(&cut, move || async move {
        let store = connect(&endpoints).await;
        let lease = store.grant(30).await.unwrap();
        let mut keeper = store.keeper(lease.id);
        assert_eq!(keeper.once().await.unwrap(), 30);
        let snap = store.list().await.unwrap();
        let mut watch = store.watch("", snap.revision + 1);
        assert!(matches!(
            next_event(&mut watch, Duration::from_secs(5)).await,
            WatchEvent::Connected { .. }
        ));

        link.set_up(&etcd_ns, false);
        let request = store.timeouts().request;
        let started = Instant::now();
        let err = store
            .claim_block(block(0), "a", NODE_A, lease.id)
            .await
            .unwrap_err();
        eprintln!("claim while cut off: {err} after {:?}", started.elapsed());
        assert!(started.elapsed() < request + Duration::from_secs(1));
        // It may have left before the link went: unknown, unless refused before sending.
        let err = keeper.once().await.unwrap_err();
        eprintln!("keep-alive while cut off: {err}");
        assert!(store.list().await.is_err());
        // HTTP/2 pings find the silent connection dead: the watch says so.
        let event = timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch noticed the cut within 10 s");
        assert!(
            matches!(event, WatchEvent::Disconnected { .. }),
            "{event:?}"
        );

        link.set_up(&etcd_ns, true);
        let claim = retry(|| store.claim_block(block(0), "a", NODE_A, lease.id)).await;
        assert!(
            matches!(&claim, Claim::Claimed { .. })
                || matches!(&claim, Claim::Taken { owner } if owner.value.lease == lease.id),
            "{claim:?}"
        );
        let healed = Instant::now();
        let ttl = loop {
            match keeper.once().await {
                Ok(ttl) => break ttl,
                Err(e) => {
                    assert!(healed.elapsed() < Duration::from_secs(20), "{e}");
                    sleep(Duration::from_millis(200)).await;
                }
            }
        };
        eprintln!(
            "keep-alive answered {:?} after the link came back",
            healed.elapsed()
        );
        assert_eq!(ttl, 30);
        let changes = next_changes(&mut watch, Duration::from_secs(20)).await;
        assert_eq!(
            changes.iter().filter_map(put_key).collect::<Vec<_>>(),
            [&Key::Block(block(0))]
        );
    });
}

#[test]
fn racing_claims_have_exactly_one_winner() {
    const BLOCKS: u16 = 40;
    let etcd = Etcd::start(1);
    let second = Netns::new(&format!("{}-ec2", etcd.prefix));
    etcd.connect(&second);
    let start = Arc::new(Barrier::new(2));
    let racer = |ns: &Netns, node: &'static str, address: Ipv4Addr| {
        let endpoints = etcd.endpoints();
        let start = Arc::clone(&start);
        spawn_block_on(ns, move || async move {
            let store = connect(&endpoints).await;
            let lease = store.grant(60).await.unwrap();
            // Connected before the race, so that both race from the first block on.
            store.list().await.unwrap();
            let mut results = Vec::new();
            for i in 0..BLOCKS {
                // Both send their claim of each block at the same moment.
                start.wait();
                results.push(
                    store
                        .claim_block(block(i), node, address, lease.id)
                        .await
                        .unwrap(),
                );
            }
            results
        })
    };
    let a = racer(&etcd.client, "a", NODE_A);
    let b = racer(&second, "b", NODE_B);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let mut wins = [0, 0];
    for (i, pair) in a.iter().zip(&b).enumerate() {
        match pair {
            (Claim::Claimed { epoch, .. }, Claim::Taken { owner }) => {
                assert_eq!(
                    (owner.value.node.as_str(), owner.create_revision),
                    ("a", *epoch)
                );
                wins[0] += 1;
            }
            (Claim::Taken { owner }, Claim::Claimed { epoch, .. }) => {
                assert_eq!(
                    (owner.value.node.as_str(), owner.create_revision),
                    ("b", *epoch)
                );
                wins[1] += 1;
            }
            other => panic!("block {i}: not exactly one winner: {other:?}"),
        }
    }
    eprintln!("racing claims: a won {}, b won {}", wins[0], wins[1]);
}

#[test]
fn an_expired_lease_deletes_its_blocks_and_keep_alive_answers_zero() {
    let etcd = Etcd::start(1);
    let endpoints = etcd.endpoints();
    block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;
        let lease = store.grant(3).await.unwrap();
        assert_eq!(lease.ttl_s, 3);
        store
            .register_node("a", &node_value(NODE_A, lease.id))
            .await
            .unwrap();
        for i in 0..3 {
            let claim = store
                .claim_block(block(i), "a", NODE_A, lease.id)
                .await
                .unwrap();
            assert!(matches!(claim, Claim::Claimed { .. }), "{claim:?}");
        }
        let snap = store.list().await.unwrap();
        assert_eq!(snap.blocks.len(), 3);
        let mut watch = store.watch("blocks/", snap.revision + 1);
        assert!(matches!(
            next_event(&mut watch, Duration::from_secs(5)).await,
            WatchEvent::Connected { .. }
        ));

        let mut keeper = store.keeper(lease.id);
        for _ in 0..3 {
            assert_eq!(keeper.once().await.unwrap(), 3);
            sleep(Duration::from_secs(1)).await;
        }
        // etcd renewed the lease between these two instants: it expires 3 s after.
        let before_last = Instant::now();
        assert_eq!(keeper.once().await.unwrap(), 3);
        let last_answer = Instant::now();

        // Stop keeping it alive: it expires, and its keys go with it.
        let gone_after = loop {
            if store.time_to_live(lease.id).await.unwrap() == LeaseTtl::Gone {
                break before_last.elapsed();
            }
            assert!(
                last_answer.elapsed() < Duration::from_secs(15),
                "lease never expired"
            );
            sleep(Duration::from_millis(50)).await;
        };
        eprintln!("lease of TTL 3 s gone {gone_after:?} after the last keep-alive was sent");
        assert!(
            gone_after >= Duration::from_secs(3),
            "lease expired early: {gone_after:?}"
        );
        let snap = store.list().await.unwrap();
        assert!(snap.blocks.is_empty(), "{:?}", snap.blocks);
        assert!(snap.nodes.is_empty());

        let mut deleted = Vec::new();
        while deleted.len() < 3 {
            for change in next_changes(&mut watch, Duration::from_secs(5)).await {
                match change {
                    Change::Delete { key, .. } => deleted.push(key),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        deleted.sort();
        assert_eq!(
            deleted,
            (0..3).map(|i| Key::Block(block(i))).collect::<Vec<_>>()
        );

        assert_eq!(keeper.once().await.unwrap(), 0, "kept stream");
        assert_eq!(
            store.keep_alive_once(lease.id).await.unwrap(),
            0,
            "new stream"
        );
    });
}

/// `snat cluster release`'s store step: blocks move under another lease only while each is
/// still the claim of its epoch under the old one; moved keys keep their epoch, outlive the old
/// lease's revocation and go when the new lease ends (never earlier than its TTL).
#[test]
fn moved_blocks_keep_their_epoch_survive_the_old_lease_and_end_with_the_new_one() {
    let etcd = Etcd::start(1);
    let endpoints = etcd.endpoints();
    block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;
        let node = store.grant(30).await.unwrap().id;
        let mut epochs = Vec::new();
        for i in 0..2 {
            match store
                .claim_block(block(i), "a", NODE_A, node)
                .await
                .unwrap()
            {
                Claim::Claimed { epoch, .. } => epochs.push(epoch),
                other => panic!("{other:?}"),
            }
        }
        let quarantine = store.grant(3).await.unwrap().id;
        let value = |lease| BlockValue {
            node: "a".into(),
            address: NODE_A,
            lease,
        };
        // A wrong epoch (a block released and claimed again since the read) moves nothing,
        // not even the other block of the transaction.
        let stale = [
            (block(0), epochs[0], value(quarantine)),
            (block(1), epochs[1] + 100, value(quarantine)),
        ];
        assert!(matches!(
            store.move_blocks(&stale, node, quarantine).await.unwrap(),
            Moved::Changed { .. }
        ));
        assert!(store
            .list()
            .await
            .unwrap()
            .blocks
            .values()
            .all(|r| r.lease == node));
        // The right epochs under the right lease: both move, epochs kept.
        let moves = [
            (block(0), epochs[0], value(quarantine)),
            (block(1), epochs[1], value(quarantine)),
        ];
        assert!(matches!(
            store.move_blocks(&moves, node, quarantine).await.unwrap(),
            Moved::Moved { .. }
        ));
        // Moving again from the old lease finds them gone from it: nothing changes.
        assert!(matches!(
            store.move_blocks(&moves, node, quarantine).await.unwrap(),
            Moved::Changed { .. }
        ));
        let moved_at = Instant::now();
        assert_eq!(store.revoke(node).await.unwrap(), Revoked::Revoked);
        let snap = store.list().await.unwrap();
        assert_eq!(snap.blocks.len(), 2, "the old lease's revocation left them");
        for (i, r) in snap.blocks.values().enumerate() {
            assert_eq!(r.create_revision, epochs[i]);
            assert_eq!(r.lease, quarantine);
            assert_eq!(r.value, value(quarantine));
        }
        // No claim while they are quarantined.
        let other = store.grant(30).await.unwrap().id;
        assert!(matches!(
            store
                .claim_block(block(0), "b", NODE_B, other)
                .await
                .unwrap(),
            Claim::Taken { .. }
        ));
        let freed = loop {
            if store.list().await.unwrap().blocks.is_empty() {
                break moved_at.elapsed();
            }
            assert!(moved_at.elapsed() < Duration::from_secs(15), "never freed");
            sleep(Duration::from_millis(50)).await;
        };
        assert!(freed >= Duration::from_secs(2), "freed after {freed:?}");
        assert!(matches!(
            store
                .claim_block(block(0), "b", NODE_B, other)
                .await
                .unwrap(),
            Claim::Claimed { .. }
        ));
    });
}

#[test]
fn watch_resumes_after_an_etcd_restart_and_asks_for_a_resync_after_a_compaction() {
    let mut etcd = Etcd::start(1);
    let endpoints = etcd.endpoints();
    // The client runs in its own thread and waits for the steps the test thread takes on etcd.
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<&'static str>(1);
    let (done_tx, done_rx) = mpsc::channel::<&'static str>();
    let client = spawn_block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;
        let lease = store.grant(60).await.unwrap();
        let snap = store.list().await.unwrap();
        let mut watch = store.watch("", snap.revision + 1);
        assert!(matches!(
            next_event(&mut watch, Duration::from_secs(5)).await,
            WatchEvent::Connected { .. }
        ));
        store
            .claim_block(block(0), "a", NODE_A, lease.id)
            .await
            .unwrap();
        let changes = next_changes(&mut watch, Duration::from_secs(5)).await;
        assert_eq!(put_key(&changes[0]), Some(&Key::Block(block(0))));

        // etcd goes away: the watch says so, and re-opens with back-off.
        done_tx.send("kill").unwrap();
        assert_eq!(step_rx.recv().await, Some("killed"));
        let event = timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap();
        assert!(
            matches!(event, WatchEvent::Disconnected { .. }),
            "{event:?}"
        );
        done_tx.send("restart").unwrap();
        assert_eq!(step_rx.recv().await, Some("restarted"));

        // A change made before the watch is back is delivered once it is: it resumes from
        // the revision after the last one it delivered, without repeating that one.
        let claim1 = retry(|| store.claim_block(block(1), "a", NODE_A, lease.id)).await;
        assert!(matches!(claim1, Claim::Claimed { .. }), "{claim1:?}");
        let changes = next_changes(&mut watch, Duration::from_secs(20)).await;
        assert_eq!(
            changes.iter().filter_map(put_key).collect::<Vec<_>>(),
            [&Key::Block(block(1))]
        );

        // Down again; this time history is compacted past the watch before it is back.
        done_tx.send("kill").unwrap();
        assert_eq!(step_rx.recv().await, Some("killed"));
        let event = timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap();
        assert!(
            matches!(event, WatchEvent::Disconnected { .. }),
            "{event:?}"
        );
        done_tx.send("restart").unwrap();
        assert_eq!(step_rx.recv().await, Some("restarted"));
        // Two changes, and a compaction at the second: the first (where the watch resumes) is
        // gone from the history.
        retry(|| store.claim_block(block(2), "a", NODE_A, lease.id)).await;
        retry(|| store.claim_block(block(3), "a", NODE_A, lease.id)).await;
        done_tx.send("compact").unwrap();
        assert_eq!(step_rx.recv().await, Some("compacted"));
        let compact_revision = loop {
            match next_event(&mut watch, Duration::from_secs(20)).await {
                // etcd 3.4 first creates the watch, then cancels it as compacted.
                WatchEvent::Connected { .. } => continue,
                WatchEvent::Resync { compact_revision } => break compact_revision,
                other => panic!("expected a resync, got {other:?}"),
            }
        };
        // Until the caller re-lists, it hears the same.
        assert!(matches!(
            watch.next().await,
            WatchEvent::Resync { compact_revision: c } if c == compact_revision
        ));
        let snap = store.list().await.unwrap();
        assert_eq!(
            snap.blocks.len(),
            4,
            "the re-list has what the watch missed"
        );
        assert!(snap.revision >= compact_revision);
        watch.resume_from(snap.revision + 1);
        store
            .claim_block(block(4), "a", NODE_A, lease.id)
            .await
            .unwrap();
        let changes = next_changes(&mut watch, Duration::from_secs(10)).await;
        assert_eq!(
            changes.iter().filter_map(put_key).collect::<Vec<_>>(),
            [&Key::Block(block(4))]
        );
        done_tx.send("done").unwrap();
    });
    let tx = step_tx;
    // Ends when the client is done, panicked (join reports it) or hangs (the timeout ends it).
    while let Ok(step) = done_rx.recv_timeout(Duration::from_secs(60)) {
        match step {
            "kill" => {
                etcd.kill(0);
                tx.blocking_send("killed").unwrap();
            }
            "restart" => {
                etcd.restart(0);
                tx.blocking_send("restarted").unwrap();
            }
            "compact" => {
                etcd.compact(etcd.revision());
                tx.blocking_send("compacted").unwrap();
            }
            _ => break,
        }
    }
    // A client still waiting for a step hears that none comes.
    drop(tx);
    client.join().expect("the watching client");
}

/// Runs `op` until it succeeds, for at most 20 s; a failure whose outcome is unknown is retried
/// too (claims are idempotent for the caller here: a second claim of our own block is `Taken`
/// by us).
async fn retry<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "still failing after 20 s: {e}");
                eprintln!("retrying after: {e}");
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[test]
fn three_members_keep_serving_when_the_leader_is_killed() {
    let mut etcd = Etcd::start(3);
    let endpoints = etcd.endpoints();
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let client = spawn_block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;
        let lease = store.grant(10).await.unwrap();
        store
            .register_node("a", &node_value(NODE_A, lease.id))
            .await
            .unwrap();
        let Claim::Claimed { epoch: epoch0, .. } = store
            .claim_block(block(0), "a", NODE_A, lease.id)
            .await
            .unwrap()
        else {
            panic!("claim failed");
        };
        let mut keeper = store.keeper(lease.id);
        assert_eq!(keeper.once().await.unwrap(), 10);
        let snap = store.list().await.unwrap();
        let mut watch = store.watch("blocks/", snap.revision + 1);
        assert!(matches!(
            next_event(&mut watch, Duration::from_secs(5)).await,
            WatchEvent::Connected { .. }
        ));

        ready_tx.send(()).unwrap();
        step_rx.recv().await.unwrap();
        let killed_at = Instant::now();

        // Keep-alives, claims, reads and releases go on through the other two members.
        let mut ttl = 0;
        while ttl == 0 {
            match keeper.once().await {
                Ok(t) => ttl = t,
                Err(e) => {
                    assert!(killed_at.elapsed() < Duration::from_secs(8), "{e}");
                    eprintln!("keep-alive after the leader died: {e}");
                    sleep(Duration::from_millis(200)).await;
                }
            }
        }
        assert_eq!(ttl, 10, "the lease survived the leader");
        let kept_after = killed_at.elapsed();
        let claim = retry(|| store.claim_block(block(1), "a", NODE_A, lease.id)).await;
        let epoch1 = match claim {
            Claim::Claimed { epoch, .. } => epoch,
            // An unknown outcome that had been applied: ours all the same.
            Claim::Taken { owner } if owner.value.lease == lease.id => owner.create_revision,
            other => panic!("{other:?}"),
        };
        let claimed_after = killed_at.elapsed();
        let snap = store.list().await.unwrap();
        assert_eq!(snap.blocks[&block(0)].create_revision, epoch0);
        assert_eq!(snap.blocks[&block(1)].create_revision, epoch1);
        let changes = next_changes(&mut watch, Duration::from_secs(20)).await;
        assert_eq!(
            changes.iter().filter_map(put_key).collect::<Vec<_>>(),
            [&Key::Block(block(1))],
            "the watch followed onto another member"
        );
        assert!(matches!(
            store.release_block(block(0), epoch0).await.unwrap(),
            Release::Released { .. }
        ));
        eprintln!(
            "leader killed: keep-alive answered after {kept_after:?}, claim after {claimed_after:?}"
        );
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the client got ready");
    let leader = etcd.leader();
    etcd.kill(leader);
    step_tx.blocking_send(()).unwrap();
    client.join().expect("the client across the leader's death");
    // The killed member comes back and catches up.
    etcd.restart(leader);
    let out = etcd.etcdctl(&["get", "--prefix", "/snat/v1/blocks/", "--keys-only"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("/snat/v1/blocks/198.51.100.1/1"));
}

/// etcd-io/etcd#15247: a leader that stalls (there: slow fdatasync) may, when it resumes,
/// revoke every lease whose keep-alives went to the new leader meanwhile. A probe, not a proof:
/// SIGSTOP stalls the whole process, not only its raft loop. Run with `--ignored`.
#[test]
#[ignore = "a probe of etcd 3.4.23's behaviour, not of snat"]
fn probe_a_stalled_leader_revoking_leases_early() {
    let etcd = Etcd::start(3);
    let endpoints = etcd.endpoints();
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (ready_tx, ready_rx) = mpsc::channel::<&'static str>();
    let client = spawn_block_on(&etcd.client, move || async move {
        let store = connect(&endpoints).await;
        let lease = store.grant(5).await.unwrap();
        store
            .claim_block(block(0), "a", NODE_A, lease.id)
            .await
            .unwrap();
        let mut keeper = store.keeper(lease.id);
        ready_tx.send("stop").unwrap();
        step_rx.recv().await.unwrap();
        // Keep it alive through the others for 9 s (the stall), then 6 s more after it ends.
        for second in 0..15 {
            if second == 9 {
                ready_tx.send("cont").unwrap();
            }
            match keeper.once().await {
                Ok(ttl) => eprintln!("t={second}s keep-alive ttl {ttl}"),
                Err(e) => eprintln!("t={second}s keep-alive failed: {e}"),
            }
            sleep(Duration::from_secs(1)).await;
        }
        let alive = store.time_to_live(lease.id).await.unwrap();
        let blocks = store.list().await.unwrap().blocks.len();
        eprintln!("after the stall: lease {alive:?}, {blocks} block(s)");
        ready_tx.send("done").unwrap();
        (alive, blocks)
    });
    assert_eq!(ready_rx.recv_timeout(Duration::from_secs(30)), Ok("stop"));
    let leader = etcd.leader();
    etcd.signal(leader, libc::SIGSTOP);
    step_tx.blocking_send(()).unwrap();
    assert_eq!(ready_rx.recv_timeout(Duration::from_secs(30)), Ok("cont"));
    etcd.signal(leader, libc::SIGCONT);
    assert_eq!(ready_rx.recv_timeout(Duration::from_secs(30)), Ok("done"));
    let (alive, blocks) = client.join().unwrap();
    eprintln!("probe result: lease {alive:?}, blocks {blocks}");
}
