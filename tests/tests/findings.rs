//! `BPF_PROG_TEST_RUN` tests of the datapath's correctness fixes (issues 11 and 12), each built to
//! fail on the datapath before them (commit ff8c671): what it would have done is said with each.

use std::{collections::HashSet, net::Ipv4Addr};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use snat_common::{
    flow::{proto, release_result},
    tcp::Phase,
    Counter, Mapping, Origin, ReleaseEntry,
};
use snat_user::settings::ports::PortRange;
use tests::{
    dp::{phase, Dp, NAT, PASS, POD, REMOTE, SHOT},
    packets::{self, quoted, tcp_with, Flags, Seen, Seg, ACK, SYN, SYN_ACK},
};

const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);

fn rst() -> Flags {
    Flags {
        rst: true,
        ..Flags::default()
    }
}

fn fin_ack() -> Flags {
    Flags {
        fin: true,
        ack: true,
        ..Flags::default()
    }
}

#[test]
fn a_remote_rst_or_fin_counts_only_inside_the_pods_window() {
    // Before: any RST from the remote put the mapping in the reset phase (15 s), any FIN in the
    // closing ones: a blind RST that guessed a NAT port shortened a live mapping.
    let mut dp = Dp::new("");
    let tables = dp.engine.take_tables().unwrap();
    let pod = (POD, 40000);
    let key = packets::flow_key(proto::TCP, pod, (REMOTE, 80));
    let seg = |flags, seq, ack, window, wscale| Seg {
        flags,
        seq,
        ack,
        window,
        wscale,
    };
    // The pod's SYN, ISN 1000, window scale 7.
    let out = dp.egress_ok(&tcp_with(
        pod,
        (REMOTE, 80),
        &seg(SYN, 1000, 0, 64240, Some(7)),
        b"",
    ));
    let nat = (NAT, out.tcp().source_port);
    let to_pod = |s: &Seg| tcp_with((REMOTE, 80), nat, s, b"");

    // SYN-SENT: a RST whose ACK does not acknowledge the SYN is blind.
    let back = dp.ingress_ok(&to_pod(&seg(
        Flags {
            rst: true,
            ack: true,
            ..Flags::default()
        },
        0,
        5000,
        0,
        None,
    )));
    assert_eq!(
        back.dst(),
        POD,
        "still delivered to the pod, which judges it"
    );
    assert_eq!(dp.count(Counter::IngressRstOutOfWindow), 1);
    assert_eq!(phase(&tables, &key), Phase::Transitory);

    // The handshake: SYN|ACK (ISN 5000), the pod's ACK with window 512 << 7 = 65,536.
    dp.ingress_ok(&to_pod(&seg(SYN_ACK, 5000, 1001, 65535, Some(7))));
    dp.egress_ok(&tcp_with(
        pod,
        (REMOTE, 80),
        &seg(ACK, 1001, 5001, 512, None),
        b"",
    ));
    assert_eq!(phase(&tables, &key), Phase::Established);

    // Blind RST and FIN: far ahead of the window, and behind it.
    dp.ingress_ok(&to_pod(&seg(rst(), 5001 + 70_000, 0, 0, None)));
    dp.ingress_ok(&to_pod(&seg(fin_ack(), 5001 - 10, 1001, 100, None)));
    assert_eq!(dp.count(Counter::IngressRstOutOfWindow), 2);
    assert_eq!(dp.count(Counter::IngressFinOutOfWindow), 1);
    assert_eq!(phase(&tables, &key), Phase::Established, "nothing changed");

    // In the window: a FIN, then a RST at its far edge.
    dp.ingress_ok(&to_pod(&seg(fin_ack(), 5001 + 100, 1001, 100, None)));
    assert_eq!(phase(&tables, &key), Phase::Transitory, "FIN one way");
    dp.ingress_ok(&to_pod(&seg(rst(), 5001 + 65_535, 0, 0, None)));
    assert_eq!(phase(&tables, &key), Phase::Reset);
    assert_eq!(dp.count(Counter::IngressRstOutOfWindow), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedTcp), 3);

    // A RST from the pod resets its mapping as before.
    let pod2 = (POD, 40001);
    let key2 = packets::flow_key(proto::TCP, pod2, (REMOTE, 80));
    dp.egress_ok(&tcp_with(
        pod2,
        (REMOTE, 80),
        &seg(SYN, 7, 0, 100, None),
        b"",
    ));
    dp.egress_ok(&tcp_with(
        pod2,
        (REMOTE, 80),
        &seg(rst(), 8, 0, 0, None),
        b"",
    ));
    assert_eq!(phase(&tables, &key2), Phase::Reset);
}

#[test]
fn a_reopen_starts_a_new_epoch_and_the_old_flags_do_not_count() {
    // Before: a reopen cleared the remote's flags from egress while ingress OR-ed into them, so
    // a lost update kept an old FIN and the new connection sat on the 4-minute timeout.
    let mut dp = Dp::new("");
    let tables = dp.engine.take_tables().unwrap();
    let pod = (POD, 40000);
    let key = packets::flow_key(proto::TCP, pod, (REMOTE, 80));
    let seg = |flags, seq, ack| Seg {
        flags,
        seq,
        ack,
        window: 1000,
        wscale: None,
    };
    let out = |flags, seq, ack| tcp_with(pod, (REMOTE, 80), &seg(flags, seq, ack), b"");
    let back = |flags, seq, ack| tcp_with((REMOTE, 80), (NAT, 40000), &seg(flags, seq, ack), b"");
    dp.egress_ok(&out(SYN, 100, 0));
    dp.ingress_ok(&back(SYN_ACK, 900, 101));
    dp.egress_ok(&out(ACK, 101, 901));
    dp.egress_ok(&out(fin_ack(), 101, 901));
    dp.ingress_ok(&back(fin_ack(), 901, 102));
    assert_eq!(phase(&tables, &key), Phase::Closing);
    let before = tables
        .rev
        .get(&key.reply(NAT.octets(), 40000u16.to_be_bytes()), 0)
        .unwrap();

    // The same 4-tuple again: a new connection on the same NAT port, in a new epoch.
    let again = dp.egress_ok(&out(SYN, 5000, 0));
    assert_eq!(again.tcp().source_port, 40000);
    assert_eq!(dp.count(Counter::TcpReopened), 1);
    let m = tables.fwd.get(&key, 0).unwrap();
    assert_eq!(m.epoch, 2);
    let after = tables
        .rev
        .get(&key.reply(m.nat_addr, m.nat_port), 0)
        .unwrap();
    assert_eq!(
        (after.syn, after.fin),
        (before.syn, before.fin),
        "egress never writes the reverse half"
    );
    assert_eq!(
        phase(&tables, &key),
        Phase::Transitory,
        "the old FINs are retired"
    );
    dp.ingress_ok(&back(SYN_ACK, 7000, 5001));
    assert_eq!(phase(&tables, &key), Phase::Established);
}

#[test]
fn a_full_destination_is_refused_without_searching_again() {
    // Before: every refused packet walked the whole range again (measured: ~12 ms each at the
    // default range, 48 % of the node's CPU for a pod hammering a full destination).
    let mut dp = Dp::new("--port-range 40000:40003 --on-exhaustion drop");
    let tables = dp.engine.take_tables().unwrap();
    let mut pool = dp.engine.take_pool().unwrap();
    let syn = |sport: u16| packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
    for sport in 1..=4 {
        dp.egress_ok(&syn(sport));
    }
    for sport in 5..=24 {
        assert_eq!(dp.egress(&syn(sport)).0, SHOT);
    }
    assert_eq!(dp.count(Counter::EgressDropExhaustedTcp), 20);
    assert_eq!(
        dp.count(Counter::RefusedKnownFull),
        19,
        "one search found the destination full; the other 19 refusals searched nothing"
    );
    // Another destination is not affected.
    dp.egress_ok(&packets::tcp((POD, 30), (REMOTE, 81), SYN, b""));

    // A released port ends the mark: the next flow gets it at once.
    let key = packets::flow_key(proto::TCP, (POD, 2), (REMOTE, 80));
    let mut entries = vec![tables.release_entry(key).unwrap()];
    dp.engine.release(&mut entries).unwrap();
    assert_eq!(entries[0].result, release_result::RELEASED);
    dp.egress_ok(&syn(40));
    assert_eq!(dp.egress(&syn(41)).0, SHOT, "full again");
    let known = dp.count(Counter::RefusedKnownFull);
    assert_eq!(dp.egress(&syn(42)).0, SHOT);
    assert_eq!(dp.count(Counter::RefusedKnownFull), known + 1);

    // A new port range (a new pool generation) is searched at once.
    pool.set(
        &[NAT],
        &[],
        PortRange {
            lo: 41000,
            hi: 41003,
        },
    )
    .unwrap();
    let p = dp.egress_ok(&syn(43)).tcp().source_port;
    assert!((41000..=41003).contains(&p), "{p}");
}

/// The reply `(REMOTE, 7100) → (NAT, port)` as the node forwards it after ingress: to the pod.
fn reply_to_pod(dp: &Dp, nat_port: u16) -> Vec<u8> {
    let seen = dp.ingress_ok(&packets::udp((REMOTE, 7100), (NAT, nat_port), b"reply"));
    assert_eq!(seen.dst(), POD);
    let mut ip = Vec::new();
    seen.ip.write(&mut ip).unwrap();
    seen.udp().write(&mut ip).unwrap();
    ip.extend_from_slice(&seen.payload);
    ip
}

#[test]
fn icmp_errors_from_the_node_about_pods_are_translated_or_dropped() {
    // Before: egress passed every packet whose outer source was not internal, so the node's
    // "fragmentation needed" left quoting `REMOTE:7100 > POD:34722`: the remote could not match
    // it (a PMTU black hole) and the pod's address was out.
    let dp = Dp::new("");
    let out = dp.egress_ok(&packets::udp((POD, 34722), (REMOTE, 7100), b"query"));
    let nat_port = out.udp().source_port;
    let quote = reply_to_pod(&dp, nat_port);
    let node = NAT; // the node's uplink address
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        });
    let seen = dp.egress_ok(&packets::icmp_error(
        node,
        REMOTE,
        frag_needed.clone(),
        &quote,
    ));
    assert_eq!(
        (seen.src(), seen.dst()),
        (node, REMOTE),
        "outer header untouched"
    );
    let (qip, ql4) = quoted(&seen);
    let qudp = packets::assert_quoted_udp_checksum(&qip, &ql4);
    assert_eq!(
        (Ipv4Addr::from(qip.destination), qudp.destination_port),
        (NAT, nat_port),
        "the quote names the NAT endpoint the remote knows"
    );
    assert_eq!(Ipv4Addr::from(qip.source), REMOTE);
    assert_eq!(dp.count(Counter::EgressTranslatedNodeIcmpError), 1);

    // Time exceeded about the same reply: translated too.
    let ttl = Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    let seen = dp.egress_ok(&packets::icmp_error(node, REMOTE, ttl, &quote));
    assert_eq!(Ipv4Addr::from(quoted(&seen).0.destination), NAT);

    // Quoting a pod without a mapping: dropped, not leaked.
    let mut stray = quote.clone();
    stray[16..20].copy_from_slice(&POD_B.octets());
    stray[10] = 0;
    stray[11] = 0;
    let c = snat_common::csum::checksum(&stray[..20]);
    stray[10..12].copy_from_slice(&c.to_be_bytes());
    let (ret, _) = dp.egress(&packets::icmp_error(
        node,
        REMOTE,
        frag_needed.clone(),
        &stray,
    ));
    assert_eq!(ret, SHOT);
    // A quote too short to translate (the IPv4 header alone) must not leak the address either.
    let (ret, _) = dp.egress(&packets::icmp_error(
        node,
        REMOTE,
        frag_needed.clone(),
        &quote[..20],
    ));
    assert_eq!(ret, SHOT);
    assert_eq!(dp.count(Counter::EgressDropNodeIcmpErrorNoMapping), 2);

    // The node's own errors about its own traffic pass untouched.
    let own = packets::udp((REMOTE, 53), (NAT, 5353), b"x");
    let err = packets::icmp_error(node, REMOTE, frag_needed, packets::ip_part(&own));
    assert_eq!(dp.egress(&err), (PASS, err.clone()));
}

#[test]
fn a_pod_cannot_send_icmp_errors_about_another_pods_flow() {
    // Before: egress translated any error whose quote matched a mapping: pod B could send a
    // "fragmentation needed, MTU 68" about pod A's flow and have it leave from A's NAT endpoint.
    let dp = Dp::new("");
    let out = dp.egress_ok(&packets::udp((POD, 34722), (REMOTE, 7100), b"query"));
    let quote = reply_to_pod(&dp, out.udp().source_port);
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 68,
        });
    let (ret, _) = dp.egress(&packets::icmp_error(
        POD_B,
        REMOTE,
        frag_needed.clone(),
        &quote,
    ));
    assert_eq!(ret, SHOT);
    assert_eq!(dp.count(Counter::EgressDropIcmpErrorForeign), 1);
    // Pod A itself may.
    dp.egress_ok(&packets::icmp_error(POD, REMOTE, frag_needed, &quote));
}

/// Sets the IPv4 identification and fragment fields of `frame` and fixes its header checksum.
fn fragment(mut frame: Vec<u8>, id: u16, more: bool, offset: u16) -> Vec<u8> {
    frame[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    frame[14 + 6..14 + 8].copy_from_slice(&((u16::from(more) << 13) | offset).to_be_bytes());
    frame[14 + 10] = 0;
    frame[14 + 11] = 0;
    let c = snat_common::csum::checksum(&frame[14..34]);
    frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    frame
}

#[test]
fn echo_reply_fragments_follow_their_first_fragment() {
    // Before: the echo reply branch of ingress never remembered fragments, so `ping -s 3000`
    // through snat lost every reply (its later fragments went to the node).
    let dp = Dp::new("");
    let out = dp.egress_ok(&packets::icmp_echo(POD, REMOTE, true, 7, 1));
    let Icmpv4Type::EchoRequest(echo) = out.icmp().icmp_type.clone() else {
        panic!("{out:?}")
    };
    let first = fragment(
        packets::icmp_echo(REMOTE, NAT, false, echo.id, 1),
        0x5151,
        true,
        0,
    );
    let (ret, back) = dp.ingress(&first);
    assert_eq!(ret, PASS);
    assert_eq!(&back[14 + 16..14 + 20], &POD.octets());
    let mut later = packets::udp((REMOTE, 1), (NAT, 2), &[3u8; 32]);
    later[14 + 9] = proto::ICMP;
    let later = fragment(later, 0x5151, false, 3);
    let (ret, back) = dp.ingress(&later);
    assert_eq!(ret, PASS);
    assert_eq!(
        &back[14 + 16..14 + 20],
        &POD.octets(),
        "follows its first fragment"
    );
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&back[14..]).unwrap();
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
    assert_eq!(dp.count(Counter::IngressTranslatedFragment), 1);
}

#[test]
fn a_recycled_map_element_never_delivers_to_another_flow() {
    // The kernel hands a deleted (preallocated) element to the next insert at once; a CPU that
    // looked it up before then reads another flow's value under its own key. Simulated here by
    // writing, under pod A's keys, the values of flows of pod B. Before: the reply went to pod B
    // and pod A's packet left with pod B's NAT port.
    let mut dp = Dp::new("");
    let mut tables = dp.engine.take_tables().unwrap();
    let a = packets::flow_key(proto::UDP, (POD, 1000), (REMOTE, 53));
    let nat_port = dp
        .egress_ok(&packets::udp((POD, 1000), (REMOTE, 53), b"q"))
        .udp()
        .source_port;
    let reply_a = a.reply(NAT.octets(), nat_port.to_be_bytes());
    let b = packets::flow_key(proto::UDP, (POD_B, 2000), (REMOTE, 53));
    let reply_b = b.reply(NAT.octets(), 50_000u16.to_be_bytes());
    let now = snat_user::tables::expiry::now_ns();
    tables
        .rev
        .insert(
            reply_a,
            Origin::new(reply_b, POD_B.octets(), 2000u16.to_be_bytes(), now),
            0,
        )
        .unwrap();
    let (ret, out) = dp.ingress(&packets::udp((REMOTE, 53), (NAT, nat_port), b"answer"));
    assert_eq!(ret, PASS);
    assert_eq!(
        Seen::parse(&out).dst(),
        NAT,
        "not delivered to pod B: left untouched"
    );
    assert_eq!(dp.count(Counter::RecycledEntry), 1);

    tables
        .fwd
        .insert(
            a,
            Mapping::new(b, NAT.octets(), 50_000u16.to_be_bytes(), now),
            0,
        )
        .unwrap();
    let (ret, out) = dp.egress(&packets::udp((POD, 1000), (REMOTE, 53), b"q2"));
    assert!(
        ret == SHOT || Seen::parse(&out).udp().source_port != 50_000,
        "pod A's datagram must not leave with pod B's port"
    );
    assert!(dp.count(Counter::RecycledEntry) >= 2);
}

#[test]
fn a_packet_meeting_a_release_in_progress_is_dropped() {
    // The release program announces itself in a mapping before it re-reads the time stamps and
    // deletes; a packet that refreshes the mapping then sees the announcement (here: written
    // by hand) and is dropped, exactly as if it had come after the delete. Before: nothing
    // stopped a packet from refreshing a mapping between the release's check and its delete,
    // which then removed a live flow.
    let mut dp = Dp::new("");
    let mut tables = dp.engine.take_tables().unwrap();
    let key = packets::flow_key(proto::UDP, (POD, 1000), (REMOTE, 53));
    let nat_port = dp
        .egress_ok(&packets::udp((POD, 1000), (REMOTE, 53), b"q"))
        .udp()
        .source_port;
    let mut m = tables.fwd.get(&key, 0).unwrap();
    m.release = 1;
    m.last_seen_ns = 0; // long idle: the packet refreshes it
    tables.fwd.insert(key, m, 0).unwrap();
    assert_eq!(
        dp.egress(&packets::udp((POD, 1000), (REMOTE, 53), b"q")).0,
        SHOT
    );
    assert_eq!(dp.count(Counter::EgressDropReleased), 1);
    m.release = 0;
    tables.fwd.insert(key, m, 0).unwrap();
    dp.egress_ok(&packets::udp((POD, 1000), (REMOTE, 53), b"q"));

    let reply = key.reply(NAT.octets(), nat_port.to_be_bytes());
    let mut o = tables.rev.get(&reply, 0).unwrap();
    o.release = 1;
    o.last_seen_ns = 0;
    tables.rev.insert(reply, o, 0).unwrap();
    let back = packets::udp((REMOTE, 53), (NAT, nat_port), b"a");
    assert_eq!(dp.ingress(&back).0, SHOT);
    assert_eq!(dp.count(Counter::IngressDropReleased), 1);

    // And the release program keeps a mapping a packet refreshed after the controller looked.
    o.release = 0;
    tables.rev.insert(reply, o, 0).unwrap();
    let mut entries = vec![tables.release_entry(key).unwrap()];
    dp.ingress_ok(&back); // refreshes the reverse half (it was idle)
    dp.engine.release(&mut entries).unwrap();
    assert_eq!(entries[0].result, release_result::REFRESHED);
    assert!(tables.fwd.get(&key, 0).is_ok());
}

#[test]
fn ports_from_the_index_are_random_within_free_blocks() {
    // RFC 6056: once a destination was 7/8 full, the index handed out the lowest free port of
    // the first free block, every time: predictable. Sixteen free ports in one block; thirty
    // times a new flow takes one and gives it back: the first choice must vary.
    let mut dp = Dp::new("--port-range 40000:40127 --on-exhaustion drop");
    let tables = dp.engine.take_tables().unwrap();
    let syn = |sport: u16| packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
    let mut sport_of = std::collections::HashMap::new();
    for sport in 1..=128u16 {
        let port = dp.egress_ok(&syn(sport)).tcp().source_port;
        sport_of.insert(port, sport);
    }
    assert_eq!(dp.count(Counter::IndexBuilt), 1);
    let release = |port: u16, sport: u16| {
        let key = packets::flow_key(proto::TCP, (POD, sport), (REMOTE, 80));
        let mut e: Vec<ReleaseEntry> = vec![tables.release_entry(key).unwrap()];
        dp.engine.release(&mut e).unwrap();
        assert_eq!(e[0].result, release_result::RELEASED, "port {port}");
    };
    let free: Vec<u16> = (40064..40128).step_by(4).collect();
    for port in &free {
        release(*port, sport_of[port]);
    }
    let mut chosen = HashSet::new();
    for i in 0..30u16 {
        let sport = 1000 + i;
        let port = dp.egress_ok(&syn(sport)).tcp().source_port;
        assert!(free.contains(&port), "{port} was not free");
        chosen.insert(port);
        release(port, sport);
    }
    assert!(
        chosen.len() > 3,
        "the index keeps offering the same ports: {chosen:?}"
    );
    assert!(dp.count(Counter::AllocIndexed) >= 30);
}

#[test]
fn created_counts_only_the_mappings_made() {
    // Two CPUs creating the same new flow at once: one wins, the other adopts its mapping.
    // Before, both counted a created mapping. Many flows, their first packets sent by several
    // threads at once, so races happen on the two CPUs.
    // On a loaded machine one round may see no race; a few more rounds of fresh flows will.
    let mut dp = Dp::with_max(65_536, "");
    let tables = dp.engine.take_tables().unwrap();
    for round in 0..8u16 {
        let flows: Vec<Vec<u8>> = (0..3000u16)
            .map(|i| packets::udp((POD, 1000 + round * 3000 + i), (REMOTE, 53), b"q"))
            .collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for f in &flows {
                        assert_eq!(dp.egress(f).0, PASS);
                    }
                });
            }
        });
        assert_eq!(
            tables.fwd.keys().count() as u64,
            3000 * u64::from(round + 1)
        );
        if dp.count(Counter::AllocRaceLost) > 0 {
            break;
        }
    }
    let mappings = tables.fwd.keys().count() as u64;
    assert!(
        dp.count(Counter::AllocRaceLost) > 0,
        "no two threads raced for a flow in 8 rounds: this run shows nothing"
    );
    assert_eq!(
        dp.count(Counter::CreatedUdp),
        mappings,
        "created_udp counts mappings, not attempts ({} races)",
        dp.count(Counter::AllocRaceLost)
    );
}
