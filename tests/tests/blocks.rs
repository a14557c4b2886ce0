//! `BPF_PROG_TEST_RUN` tests of cluster mode's datapath (issue 14): the programs loaded for a
//! block layout, the block table written through `datapath::Blocks` as the block allocator's
//! `DatapathOp`s would, crafted packets through the real programs. Needs root.

use std::{collections::BTreeSet, net::Ipv4Addr};

use snat_common::{Counter, FlowKey};
use snat_user::{
    cluster::{
        geometry::{BlockId, Geometry},
        node::{DatapathOp, Restored},
    },
    datapath::{blocks, Blocks, Engine, Tables},
};
use tests::{
    dp::{self, Dp, NAT, PASS, POD, REDIRECT, REMOTE, SHOT},
    packets::{self, Seen, ACK, SYN, SYN_ACK},
};

const SECOND: u64 = 1_000_000_000;

struct Cluster {
    dp: Dp,
    blocks: Blocks,
    tables: Tables,
    geometry: Geometry,
}

/// The datapath in cluster mode on `range` cut into blocks of `block_size`, nothing held.
fn cluster(range: &str, block_size: u16) -> Cluster {
    let settings = dp::settings(4096, &format!("--port-range {range}"));
    let geometry = Geometry::new(
        settings.port_range,
        block_size,
        vec![],
        settings.nat_ips.clone(),
    )
    .expect("a valid geometry");
    let mut engine = Engine::load_with(&settings, None, None, Some(&geometry))
        .expect("loading the programs (are you root?)");
    let blocks = engine
        .take_blocks()
        .expect("the block maps")
        .expect("cluster mode");
    let tables = engine.take_tables().expect("tables");
    Cluster {
        dp: Dp::from_engine(engine),
        blocks,
        tables,
        geometry,
    }
}

fn block(index: u16) -> BlockId {
    BlockId { nat_ip: NAT, index }
}

impl Cluster {
    fn apply(&mut self, op: &DatapathOp) -> usize {
        self.blocks
            .apply(op, &self.dp.engine, &self.tables)
            .unwrap_or_else(|e| panic!("{op:?}: {e}"))
    }

    fn open(&mut self, index: u16, epoch: i64) {
        self.apply(&DatapathOp::Open {
            block: block(index),
            epoch,
            valid_until: blocks::boot_now() + 60 * SECOND,
        });
    }

    fn block_of(&self, port: u16) -> Option<u16> {
        self.geometry.block_of(port)
    }

    /// A new TCP flow from the pod's `sport` (outside the range: never preserved) to REMOTE:80;
    /// its NAT port.
    fn syn(&self, sport: u16) -> u16 {
        let out = self
            .dp
            .egress_ok(&packets::tcp((POD, sport), (REMOTE, 80), SYN, b""));
        assert_eq!(out.src(), NAT);
        out.tcp().source_port
    }

    fn udp(&self, sport: u16) -> (i32, Vec<u8>) {
        self.dp
            .egress(&packets::udp((POD, sport), (REMOTE, 53), b"q"))
    }

    /// Mappings the datapath created so far (what the agent gives the usage reads and polls).
    fn created(&self) -> u64 {
        [
            Counter::CreatedTcp,
            Counter::CreatedUdp,
            Counter::CreatedIcmp,
        ]
        .into_iter()
        .map(|k| self.dp.count(k))
        .sum()
    }

    fn usage(&mut self) -> snat_user::cluster::node::Usage {
        let created = self.created();
        self.blocks.usage(&self.tables, created).expect("usage")
    }

    fn poll(&mut self) -> Vec<snat_user::cluster::node::Pressure> {
        let created = self.created();
        self.blocks.poll_pressure(created).expect("poll")
    }

    fn mapping_epoch(&self, sport: u16) -> u32 {
        let key = FlowKey::new(
            6,
            POD.octets(),
            sport.to_be_bytes(),
            REMOTE.octets(),
            80u16.to_be_bytes(),
        );
        self.tables.fwd.get(&key, 0).expect("a mapping").block_epoch
    }
}

#[test]
fn new_mappings_land_only_in_open_valid_blocks_and_carry_their_epoch() {
    let mut c = cluster("40000:40511", 64);
    // Nothing held: refused for want of a port.
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 1000), (REMOTE, 80), SYN, b""));
    assert_ne!(ret, PASS);
    assert_eq!(c.dp.count(Counter::EgressDropExhaustedTcp), 1);

    c.open(2, 1001);
    c.open(5, (7 << 32) + 1005);
    let mut ports = Vec::new();
    for i in 0..40 {
        let p = c.syn(2000 + i);
        let b = c.block_of(p);
        assert!(matches!(b, Some(2 | 5)), "port {p} in block {b:?}");
        let epoch = if b == Some(2) { 1001 } else { 1005 };
        assert_eq!(c.mapping_epoch(2000 + i), epoch);
        ports.push(p);
    }
    // Ports stay unpredictable within a block (not handed out in order).
    let first = *ports.iter().min().unwrap();
    assert_ne!(ports, (first..first + 40).collect::<Vec<_>>());
    assert_eq!(c.dp.count(Counter::CreatedTcp), 40);
}

#[test]
fn new_mappings_pack_into_the_fullest_open_block() {
    let mut c = cluster("40000:40511", 64);
    c.open(6, 1);
    for i in 0..10 {
        assert_eq!(c.block_of(c.syn(2000 + i)), Some(6));
    }
    c.open(1, 2);
    // The usage read sorts the open list: block 6 holds 10 mappings, block 1 none.
    let usage = c.usage();
    let live: Vec<(u16, u32)> = usage
        .blocks
        .iter()
        .map(|b| (b.block.index, b.live))
        .collect();
    assert_eq!(live, vec![(1, 0), (6, 10)]);
    for i in 10..30 {
        let p = c.syn(2000 + i);
        assert_eq!(
            c.block_of(p),
            Some(6),
            "port {p}: not packed into the fullest block"
        );
    }
    let p = usage.pressure.iter().find(|p| p.nat_ip == NAT).unwrap();
    assert_eq!((p.free, p.refused), (128 - 10, false));
}

#[test]
fn exhaustion_is_exact_over_the_open_blocks_and_ends_when_a_block_opens() {
    // 8 blocks of 8 ports; 3 open: 24 ports towards one destination.
    let mut c = cluster("40000:40063", 8);
    for (i, b) in [1u16, 4, 6].into_iter().enumerate() {
        c.open(b, 10 + i as i64);
    }
    let mut used = BTreeSet::new();
    for i in 0..24 {
        let (ret, out) = c.udp(1000 + i);
        assert_eq!(ret, PASS, "flow {i}: {:?}", c.dp.nonzero());
        let p = Seen::parse(&out).udp().source_port;
        assert!(matches!(c.block_of(p), Some(1 | 4 | 6)), "{p}");
        used.insert(p);
    }
    assert_eq!(used.len(), 24);
    // The 25th flow to the same destination finds no port.
    let (ret, _) = c.udp(1024);
    assert_ne!(ret, PASS);
    assert_eq!(c.dp.count(Counter::EgressDropExhaustedUdp), 1);
    // Refused again without a search (the destination is marked full) ...
    c.udp(1024);
    assert_eq!(c.dp.count(Counter::RefusedKnownFull), 1);
    // ... while another destination still gets ports in the same blocks.
    let other = c.dp.egress_ok(&packets::udp(
        (POD, 1024),
        (Ipv4Addr::new(203, 0, 113, 77), 53),
        b"q",
    ));
    assert!(matches!(
        c.block_of(other.udp().source_port),
        Some(1 | 4 | 6)
    ));
    // The allocator hears of the refusal at once.
    let polled = c.poll();
    assert!(
        polled.iter().any(|p| p.nat_ip == NAT && p.refused),
        "{polled:?}"
    );
    let usage = c.usage();
    let p = usage.pressure.iter().find(|p| p.nat_ip == NAT).unwrap();
    assert_eq!(
        (p.free, p.refused),
        (0, false),
        "already reported by the poll"
    );

    // A block opening ends the full mark: the same flow gets a port in it.
    c.open(7, 20);
    let (ret, out) = c.udp(1024);
    assert_eq!(ret, PASS, "{:?}", c.dp.nonzero());
    assert_eq!(c.block_of(Seen::parse(&out).udp().source_port), Some(7));
}

#[test]
fn the_poll_estimates_free_ports_from_the_mappings_created_since_the_last_read() {
    // Two open blocks of 8: 16 ports towards one destination.
    let mut c = cluster("40000:40063", 8);
    c.open(2, 1);
    c.open(5, 2);
    let free = |ps: &[snat_user::cluster::node::Pressure]| {
        ps.iter()
            .find(|p| p.nat_ip == NAT)
            .map(|p| (p.free, p.refused))
    };
    assert_eq!(free(&c.usage().pressure), Some((16, false)));
    assert_eq!(c.poll(), vec![], "nothing changed");
    for i in 0..5 {
        c.syn(1000 + i);
    }
    // Five mappings later, before any full read: 11 left, by the estimate.
    assert_eq!(free(&c.poll()), Some((11, false)));
    assert_eq!(c.poll(), vec![]);
    // A block opening adds its ports to the estimate at once.
    c.open(7, 3);
    assert_eq!(free(&c.poll()), Some((19, false)));
    // The full read is the truth again: 24 ports, 5 used.
    assert_eq!(free(&c.usage().pressure), Some((19, false)));
}

#[test]
fn a_flow_without_a_port_is_held_back_only_while_a_block_is_on_its_way() {
    // 8 blocks of 8 ports; one open, filled by 8 connections to one destination.
    let mut c = cluster("40000:40063", 8);
    c.open(3, 10);
    for i in 0..8 {
        c.syn(1000 + i);
    }
    let syn = |c: &Cluster, sport: u16| {
        c.dp.egress(&packets::tcp((POD, sport), (REMOTE, 80), SYN, b""))
            .0
    };
    // Another block on its way: the SYN is dropped without an answer (the pod retransmits it).
    c.apply(&DatapathOp::Growing {
        nat_ip: NAT,
        growing: true,
    });
    assert_eq!(syn(&c, 2000), SHOT);
    assert_eq!(c.dp.count(Counter::EgressDropAwaitingBlock), 1);
    assert_eq!(c.dp.count(Counter::RejectRst), 0);
    // Nothing on its way (the node is at its cap, or the range is full): refused with a RST.
    c.apply(&DatapathOp::Growing {
        nat_ip: NAT,
        growing: false,
    });
    assert_eq!(syn(&c, 2001), REDIRECT, "{:?}", c.dp.nonzero());
    assert_eq!(c.dp.count(Counter::RejectRst), 1);
    // The flag lapses with the blocks' valid-until: an agent that died holds nothing back.
    c.apply(&DatapathOp::Growing {
        nat_ip: NAT,
        growing: true,
    });
    c.apply(&DatapathOp::Extend {
        valid_until: blocks::boot_now(),
    });
    assert_eq!(syn(&c, 2002), REDIRECT, "{:?}", c.dp.nonzero());
    assert_eq!(c.dp.count(Counter::RejectRst), 2);
    assert_eq!(c.dp.count(Counter::EgressDropAwaitingBlock), 1);
}

#[test]
fn a_closed_block_translates_its_mappings_but_takes_no_new_ones() {
    let mut c = cluster("40000:40511", 64);
    c.open(3, 1);
    let p = c.syn(2000);
    assert_eq!(c.block_of(p), Some(3));
    c.open(4, 2);
    c.apply(&DatapathOp::Close { block: block(3) });
    // The old flow keeps its port both ways.
    let out =
        c.dp.egress_ok(&packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"));
    assert_eq!(out.tcp().source_port, p);
    let back =
        c.dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, p), SYN_ACK, b""));
    assert_eq!((back.dst(), back.tcp().destination_port), (POD, 2000));
    // New flows go to the open block only.
    for i in 1..20 {
        assert_eq!(c.block_of(c.syn(2000 + i)), Some(4));
    }
    // None open: refused.
    c.apply(&DatapathOp::Close { block: block(4) });
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 3000), (REMOTE, 80), SYN, b""));
    assert_ne!(ret, PASS);
    assert_eq!(c.dp.count(Counter::EgressDropExhaustedTcp), 1);
    let held = c.blocks.held().expect("held");
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|h| !h.open));
}

#[test]
fn past_valid_until_packets_are_dropped_and_counted_until_extended() {
    let mut c = cluster("40000:40511", 64);
    c.open(0, 1);
    let p = c.syn(2000);
    // The fence closes: valid until a moment ago.
    c.apply(&DatapathOp::Extend {
        valid_until: blocks::boot_now() - 1,
    });
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::EgressDropBlockSuspended), 1);
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, p), ACK, b"y"));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::IngressDropBlockSuspended), 1);
    // No new mapping either; the old one is kept.
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 3000), (REMOTE, 80), SYN, b""));
    assert_ne!(ret, PASS);
    assert_eq!(c.tables.fwd.keys().count(), 1);
    // A good keep-alive: everything passes again.
    c.apply(&DatapathOp::Extend {
        valid_until: blocks::boot_now() + 60 * SECOND,
    });
    let out =
        c.dp.egress_ok(&packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"));
    assert_eq!(out.tcp().source_port, p);
    c.dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, p), ACK, b"y"));
    assert_eq!(c.block_of(c.syn(3000)), Some(0));
}

#[test]
fn a_new_epoch_voids_the_old_mappings_of_the_block() {
    let mut c = cluster("40000:40511", 64);
    c.open(2, 100);
    let p = c.syn(2000);
    // The block is claimed again (e.g. after the lease was lost): another epoch.
    c.open(2, 200);
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::EgressDropBlockGone), 1);
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, p), ACK, b"y"));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::IngressDropBlockGone), 1);
    // New mappings in it carry the new epoch and translate.
    c.syn(3000);
    assert_eq!(c.mapping_epoch(3000), 200);
}

#[test]
fn forget_deletes_the_block_and_releases_its_mappings() {
    let mut c = cluster("40000:40511", 64);
    c.open(2, 1);
    let gone = c.syn(2000);
    c.apply(&DatapathOp::Close { block: block(2) });
    c.open(5, 2);
    let kept = c.syn(2001);
    assert_eq!(c.block_of(kept), Some(5));

    let released = c.apply(&DatapathOp::Forget { block: block(2) });
    assert_eq!(released, 1);
    assert_eq!(c.tables.fwd.keys().count(), 1);
    assert_eq!(c.tables.rev.keys().count(), 1);
    assert_eq!(c.blocks.held().expect("held").len(), 1);
    // The forgotten flow's reply is not ours any more: dropped, not passed to the node.
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, gone), ACK, b"y"));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::IngressDropNotOurs), 1);
    // The pod's next segment finds no mapping and is answered at once with a RST from the
    // remote, its sequence number the segment's ACK (RFC 9293), so the pod's connection ends.
    let (ret, out) =
        c.dp.egress(&packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"));
    assert_eq!(ret, REDIRECT);
    let rst = Seen::parse(&out);
    assert_eq!((rst.src(), rst.tcp().source_port), (REMOTE, 80));
    assert_eq!((rst.dst(), rst.tcp().destination_port), (POD, 2000));
    let t = rst.tcp();
    assert!(t.rst && !t.ack && !t.syn, "{t:?}");
    assert_eq!(t.sequence_number, 1);
    assert_eq!(c.dp.count(Counter::EgressDropTcpNotSyn), 1);
    assert_eq!(c.dp.count(Counter::RejectRst), 1);
    // A RST is never answered.
    let reset = packets::Flags { rst: true, ..ACK };
    let (ret, _) =
        c.dp.egress(&packets::tcp((POD, 2000), (REMOTE, 80), reset, b""));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::RejectRst), 1);
    // The other block's flow is untouched.
    c.dp.egress_ok(&packets::tcp((POD, 2001), (REMOTE, 80), ACK, b"x"));
}

#[test]
fn unmatched_replies_to_a_nat_ip_in_the_range_are_dropped() {
    let c = cluster("40000:40511", 64);
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, 40100), SYN_ACK, b""));
    assert_eq!(ret, SHOT);
    let (ret, _) =
        c.dp.ingress(&packets::udp((REMOTE, 53), (NAT, 40511), b"a"));
    assert_eq!(ret, SHOT);
    let (ret, _) =
        c.dp.ingress(&packets::icmp_echo(REMOTE, NAT, false, 40000, 1));
    assert_eq!(ret, SHOT);
    assert_eq!(c.dp.count(Counter::IngressDropNotOurs), 3);
    // Outside the range, or to another address: the node's own traffic, passed.
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, 22), ACK, b""));
    assert_eq!(ret, PASS);
    let (ret, _) =
        c.dp.ingress(&packets::tcp((REMOTE, 80), (NAT, 40512), ACK, b""));
    assert_eq!(ret, PASS);
    let (ret, _) = c.dp.ingress(&packets::tcp(
        (REMOTE, 80),
        (Ipv4Addr::new(198, 51, 100, 7), 40100),
        ACK,
        b"",
    ));
    assert_eq!(ret, PASS);
    assert_eq!(c.dp.count(Counter::IngressPassNoMapping), 3);
}

#[test]
fn the_lease_and_blocks_read_back_as_a_restart_finds_them() {
    let mut c = cluster("40000:40511", 64);
    assert_eq!(c.blocks.restored().expect("restored"), Restored::default());
    c.apply(&DatapathOp::SetLease(Some(0x1234_5678_9abc)));
    c.open(7, (3 << 32) + 17);
    c.open(1, 5);
    c.apply(&DatapathOp::Close { block: block(1) });
    let r = c.blocks.restored().expect("restored");
    assert_eq!(r.lease, Some(0x1234_5678_9abc));
    // Block 1 comes back closed: a restarted agent never re-opens what its predecessor closed.
    let got: Vec<_> = r
        .blocks
        .iter()
        .map(|b| (b.block, b.epoch, b.open))
        .collect();
    assert_eq!(
        got,
        vec![(block(1), 5, false), (block(7), (3 << 32) + 17, true)]
    );
    c.apply(&DatapathOp::SetLease(None));
    assert_eq!(c.blocks.restored().expect("restored").lease, None);
}

#[test]
fn outside_cluster_mode_nothing_changes() {
    let mut engine = Engine::load(&dp::settings(4096, "--port-range 40000:40511"))
        .expect("loading the programs (are you root?)");
    assert!(engine.take_blocks().expect("take_blocks").is_none());
    let tables = engine.take_tables().expect("tables");
    let dp = Dp::from_engine(engine);
    let out = dp.egress_ok(&packets::tcp((POD, 2000), (REMOTE, 80), SYN, b""));
    let key = FlowKey::new(
        6,
        POD.octets(),
        2000u16.to_be_bytes(),
        REMOTE.octets(),
        80u16.to_be_bytes(),
    );
    assert_eq!(tables.fwd.get(&key, 0).expect("mapping").block_epoch, 0);
    dp.ingress_ok(&packets::tcp(
        (REMOTE, 80),
        (NAT, out.tcp().source_port),
        SYN_ACK,
        b"",
    ));
    // A reply in the range without a mapping is left to the node, as always.
    let (ret, _) = dp.ingress(&packets::tcp((REMOTE, 80), (NAT, 40100), ACK, b""));
    assert_eq!(ret, PASS);
    assert_eq!(dp.count(Counter::IngressPassNoMapping), 1);
}

/// Not a check: prints what the verifier made of each program, outside cluster mode and in it,
/// for the eBPF objects named in `SNAT_OBJECTS` (comma-separated; e.g. an older build's
/// `target/release/build/snat-user-*/out/snat`). Run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn program_sizes() {
    use aya::{programs::SchedClassifier, EbpfLoader};
    let objects = std::env::var("SNAT_OBJECTS").expect("SNAT_OBJECTS=path[,path…]");
    for path in objects.split(',') {
        for shift in [0u32, 6] {
            let (base, count) = if shift == 0 { (0u32, 0u32) } else { (40000, 8) };
            let mut ebpf = EbpfLoader::new()
                .map_max_entries(snat_common::MAP_FWD, 4096)
                .map_max_entries(snat_common::MAP_REV, 4096)
                .map_max_entries(snat_common::MAP_USE, 8192)
                .map_max_entries(snat_common::MAP_ENDPOINTS, 1024)
                .map_max_entries(snat_common::MAP_FREE_PORTS, 8)
                .override_global(snat_common::block::GLOBAL_BLOCK_SHIFT, &shift, false)
                .override_global(snat_common::block::GLOBAL_BLOCK_BASE, &base, false)
                .override_global(snat_common::block::GLOBAL_BLOCK_COUNT, &count, false)
                .load_file(path)
                .expect("loading the object");
            for name in ["snat_egress", "snat_ingress", "snat_create", "snat_release"] {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .expect("program")
                    .try_into()
                    .expect("classifier");
                prog.load().expect("verifier");
                let info = prog.info().expect("info");
                println!(
                    "{path} shift={shift} {name}: verified {:?} xlated {:?} B jited {} B",
                    info.verified_instruction_count(),
                    info.size_translated(),
                    info.size_jitted()
                );
            }
        }
    }
}

/// Not a check: the in-kernel time of an established packet through egress and ingress, one
/// `BPF_PROG_TEST_RUN` each (repeat 1, so every run sees the crafted packet, not the one the
/// previous run rewrote), averaged, outside cluster mode and in it. Run with `--ignored
/// --nocapture`; `SNAT_COST_RUNS` sets the runs per figure (default 200000).
#[test]
#[ignore = "a measurement, run by hand"]
fn established_cost() {
    use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
    let runs: u32 = std::env::var("SNAT_COST_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let time = |dp: &mut Dp, name: &str, frame: &[u8]| -> f64 {
        let prog: &SchedClassifier = dp
            .engine
            .ebpf_mut()
            .program(name)
            .expect("program")
            .try_into()
            .expect("classifier");
        let mut out = vec![0u8; frame.len() + 256];
        let mut total = std::time::Duration::ZERO;
        for _ in 0..runs {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .expect("test run");
            assert_eq!(r.return_value as i32, PASS);
            total += r.duration;
        }
        total.as_nanos() as f64 / f64::from(runs)
    };
    for mode in ["off", "cluster"] {
        let (mut dp, port) = if mode == "off" {
            let dp = Dp::new("--port-range 40000:40511");
            let out = dp.egress_ok(&packets::tcp((POD, 2000), (REMOTE, 80), SYN, b""));
            (dp, out.tcp().source_port)
        } else {
            let mut c = cluster("40000:40511", 64);
            c.open(2, 1);
            let port = c.syn(2000);
            (c.dp, port)
        };
        let egress = time(
            &mut dp,
            "snat_egress",
            &packets::tcp((POD, 2000), (REMOTE, 80), ACK, b"x"),
        );
        let ingress = time(
            &mut dp,
            "snat_ingress",
            &packets::tcp((REMOTE, 80), (NAT, port), ACK, b"y"),
        );
        println!("cluster mode {mode}: egress {egress:.1} ns, ingress {ingress:.1} ns per established packet ({runs} runs)");
    }
}
