//! `BPF_PROG_TEST_RUN` tests: crafted frames through the real loaded programs (configured by the
//! real controller code, not attached anywhere), every rewritten field and checksum checked with
//! etherparse. Needs root.

use std::{collections::HashMap, net::Ipv4Addr};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use snat_common::{
    cidr,
    flow::{proto, release_result},
    Counter, FlowKey, Origin, ReleaseEntry,
};
use snat_user::settings::ports::PortRange;
use tests::{
    dp::{Dp, NAT, PASS, POD, REDIRECT, REMOTE, ROUTER, SHOT},
    packets::{self, quoted, Seen, ACK, SYN, SYN_ACK},
};

#[test]
fn tcp_is_translated_both_ways_with_valid_checksums() {
    let dp = Dp::new("");
    // Port 40000 is inside the default range 32768:65535, so it is kept.
    let syn = dp.egress_ok(&packets::tcp((POD, 40000), (REMOTE, 80), SYN, b""));
    assert_eq!((syn.src(), syn.tcp().source_port), (NAT, 40000));
    assert_eq!((syn.dst(), syn.tcp().destination_port), (REMOTE, 80));
    assert_eq!(dp.count(Counter::AllocPreserved), 1);

    let reply = dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, 40000), SYN_ACK, b""));
    assert_eq!((reply.dst(), reply.tcp().destination_port), (POD, 40000));
    assert_eq!((reply.src(), reply.tcp().source_port), (REMOTE, 80));

    let data = dp.egress_ok(&packets::tcp(
        (POD, 40000),
        (REMOTE, 80),
        ACK,
        b"GET / HTTP/1.0\r\n\r\n",
    ));
    assert_eq!((data.src(), data.tcp().source_port), (NAT, 40000));
    assert_eq!(data.payload, b"GET / HTTP/1.0\r\n\r\n");

    assert_eq!(dp.count(Counter::CreatedTcp), 1);
    assert_eq!(dp.count(Counter::EgressTranslatedTcp), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedTcp), 1);
}

#[test]
fn a_port_outside_the_range_is_mapped_into_it() {
    let dp = Dp::new("--port-range 40000:40099");
    let out = dp.egress_ok(&packets::tcp((POD, 1234), (REMOTE, 443), SYN, b""));
    assert_eq!(out.src(), NAT);
    let p = out.tcp().source_port;
    assert!((40000..=40099).contains(&p), "{p}");
    let back = dp.ingress_ok(&packets::tcp((REMOTE, 443), (NAT, p), SYN_ACK, b""));
    assert_eq!((back.dst(), back.tcp().destination_port), (POD, 1234));
}

#[test]
fn udp_checksums_and_zero_checksum() {
    let dp = Dp::new("");
    let out = dp.egress_ok(&packets::udp((POD, 40053), (REMOTE, 53), b"query"));
    assert_eq!((out.src(), out.udp().source_port), (NAT, 40053));
    assert_ne!(out.udp().checksum, 0);
    assert_eq!(out.payload, b"query");
    let back = dp.ingress_ok(&packets::udp((REMOTE, 53), (NAT, 40053), b"answer"));
    assert_eq!((back.dst(), back.udp().destination_port), (POD, 40053));

    // A datagram without checksum keeps having none, both ways (and on a new mapping).
    let out = dp.egress_ok(&packets::udp_no_checksum((POD, 1000), (REMOTE, 53), b"q2"));
    assert_eq!(out.udp().checksum, 0);
    let p = out.udp().source_port;
    assert!(p >= 32768);
    let back = dp.ingress_ok(&packets::udp_no_checksum((REMOTE, 53), (NAT, p), b"a2"));
    assert_eq!(back.udp().checksum, 0);
    assert_eq!((back.dst(), back.udp().destination_port), (POD, 1000));
}

#[test]
fn udp_replies_from_any_port_of_the_destination_ip_are_accepted() {
    // One NAT port per (internal endpoint, destination IP): address-dependent filtering.
    let dp = Dp::new("");
    dp.egress_ok(&packets::udp((POD, 40001), (REMOTE, 3478), b"stun"));
    let back = dp.ingress_ok(&packets::udp((REMOTE, 3479), (NAT, 40001), b"other port"));
    assert_eq!((back.dst(), back.udp().destination_port), (POD, 40001));
    // Another address gets nothing.
    let (ret, out) = dp.ingress(&packets::udp(
        (Ipv4Addr::new(203, 0, 113, 99), 3478),
        (NAT, 40001),
        b"x",
    ));
    assert_eq!(ret, PASS);
    assert_eq!(Seen::parse(&out).dst(), NAT, "no mapping: untouched");
    assert_eq!(dp.count(Counter::IngressPassNoMapping), 1);
}

#[test]
fn icmp_echo_identifier_is_mapped() {
    let dp = Dp::new("");
    let out = dp.egress_ok(&packets::icmp_echo(POD, REMOTE, true, 7, 1));
    assert_eq!(out.src(), NAT);
    let Icmpv4Type::EchoRequest(echo) = out.icmp().icmp_type.clone() else {
        panic!("{out:?}")
    };
    assert!(
        echo.id >= 32768,
        "identifier 7 is outside the range and must be mapped: {}",
        echo.id
    );
    assert_eq!(echo.seq, 1);
    let back = dp.ingress_ok(&packets::icmp_echo(REMOTE, NAT, false, echo.id, 1));
    let Icmpv4Type::EchoReply(reply) = back.icmp().icmp_type.clone() else {
        panic!("{back:?}")
    };
    assert_eq!((back.dst(), reply.id, reply.seq), (POD, 7, 1));
    assert_eq!(dp.count(Counter::CreatedIcmp), 1);
}

#[test]
fn icmp_error_about_a_tcp_flow_is_translated_inside_and_out() {
    let dp = Dp::new("--port-range 50000:50009");
    let (_, syn_out) = dp.egress(&packets::tcp((POD, 40000), (REMOTE, 443), SYN, b""));
    let nat_port = Seen::parse(&syn_out).tcp().source_port;
    assert!((50000..=50009).contains(&nat_port));

    // A router behind the NAT: time exceeded, quoting the whole translated SYN.
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        packets::ip_part(&syn_out),
    );
    let out = dp.ingress_ok(&err);
    assert_eq!((out.src(), out.dst()), (ROUTER, POD));
    let (qip, ql4) = quoted(&out);
    assert_eq!(
        (Ipv4Addr::from(qip.source), Ipv4Addr::from(qip.destination)),
        (POD, REMOTE)
    );
    let qtcp = packets::assert_quoted_tcp_checksum(&qip, &ql4);
    assert_eq!((qtcp.source_port, qtcp.destination_port), (40000, 443));
    assert_eq!(dp.count(Counter::IngressTranslatedIcmpError), 1);

    // Path-MTU discovery: fragmentation needed, quoting only the first 8 bytes of TCP.
    let short = &packets::ip_part(&syn_out)[..28];
    let err = packets::icmp_error(
        ROUTER,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1280,
        }),
        short,
    );
    let out = dp.ingress_ok(&err);
    assert_eq!(out.dst(), POD);
    let (qip, ql4) = quoted(&out);
    assert_eq!(Ipv4Addr::from(qip.source), POD);
    assert_eq!(u16::from_be_bytes([ql4[0], ql4[1]]), 40000);
}

#[test]
fn icmp_error_about_udp_is_translated_and_errors_from_pods_too() {
    let dp = Dp::new("");
    let (_, out) = dp.egress(&packets::udp((POD, 1111), (REMOTE, 53), b"q"));
    let nat_port = Seen::parse(&out).udp().source_port;

    // The server answers port unreachable.
    let err = packets::icmp_error(
        REMOTE,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        packets::ip_part(&out),
    );
    let seen = dp.ingress_ok(&err);
    assert_eq!(seen.dst(), POD);
    let (qip, ql4) = quoted(&seen);
    let qudp = packets::assert_quoted_udp_checksum(&qip, &ql4);
    assert_eq!((Ipv4Addr::from(qip.source), qudp.source_port), (POD, 1111));

    // The pod reports an error about a reply it got: the quoted packet runs remote → pod.
    let reply = dp.ingress_ok(&packets::udp((REMOTE, 53), (NAT, nat_port), b"answer"));
    let mut reply_ip = Vec::new();
    reply.ip.write(&mut reply_ip).unwrap();
    reply.udp().write(&mut reply_ip).unwrap();
    reply_ip.extend_from_slice(&reply.payload);
    let pod_err = packets::icmp_error(
        POD,
        REMOTE,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &reply_ip,
    );
    let seen = dp.egress_ok(&pod_err);
    assert_eq!((seen.src(), seen.dst()), (NAT, REMOTE));
    let (qip, ql4) = quoted(&seen);
    let qudp = packets::assert_quoted_udp_checksum(&qip, &ql4);
    assert_eq!(
        (Ipv4Addr::from(qip.destination), qudp.destination_port),
        (NAT, nat_port)
    );
    assert_eq!(dp.count(Counter::EgressTranslatedIcmpError), 1);
}

/// The internal and excluded networks are checked inline while each list has at most
/// `cidr::INLINE` networks not inside another, and in the LPM tries beyond: both answer alike, at
/// either end of each list and just outside it.
#[test]
fn internal_and_excluded_networks_inline_and_in_the_trie() {
    for extra in [2, cidr::INLINE + 2] {
        let internal: Vec<Ipv4Addr> = (0..extra)
            .map(|i| Ipv4Addr::new(10, 20 + i as u8, 0, 0))
            .collect();
        let excluded: Vec<Ipv4Addr> = (0..extra)
            .map(|i| Ipv4Addr::new(198, 51, 100, 16 * i as u8))
            .collect();
        let mut args: Vec<String> = internal
            .iter()
            .map(|a| format!("--internal {a}/16"))
            .collect();
        args.extend(excluded.iter().map(|a| format!("--exclude {a}/28")));
        // A network inside another takes no slot, and changes nothing.
        args.push("--exclude 198.51.100.4/30".into());
        let nets = |v: &[Ipv4Addr], len| v.iter().map(|a| (a.octets(), len)).collect::<Vec<_>>();
        let inline = cidr::Inline::of(&nets(&excluded, 28)).count;
        assert_eq!(
            inline == cidr::IN_TRIE,
            extra > cidr::INLINE,
            "{extra} networks: {inline}"
        );
        let dp = Dp::new(&args.join(" "));
        let last_pod = |i: &Ipv4Addr| Ipv4Addr::from(u32::from(*i) + 0x0203);
        for (n, pod) in [POD, last_pod(&internal[0]), last_pod(&internal[extra - 1])]
            .into_iter()
            .enumerate()
        {
            let out = dp.egress_ok(&packets::tcp(
                (pod, 41000 + n as u16),
                (REMOTE, 80),
                SYN,
                b"",
            ));
            assert_eq!(out.src(), NAT, "{extra} networks: {pod} is internal");
        }
        // Just outside the last internal network: the node's own.
        let outside = Ipv4Addr::from(u32::from(internal[extra - 1]) + 0x1_0000);
        let own = packets::tcp((outside, 5555), (REMOTE, 80), SYN, b"");
        assert_eq!(dp.egress(&own), (PASS, own.clone()), "{extra} networks");
        for dst in [
            excluded[0],
            Ipv4Addr::new(198, 51, 100, 5),
            Ipv4Addr::from(u32::from(excluded[extra - 1]) + 15),
        ] {
            let east = packets::tcp((POD, 5556), (dst, 80), SYN, b"");
            assert_eq!(
                dp.egress(&east),
                (PASS, east.clone()),
                "{extra} networks: {dst}"
            );
        }
        // Just past the last excluded network: translated.
        let past = Ipv4Addr::from(u32::from(excluded[extra - 1]) + 16);
        let out = dp.egress_ok(&packets::tcp((POD, 5557), (past, 80), SYN, b""));
        assert_eq!(out.src(), NAT, "{extra} networks: {past} is not excluded");
        assert_eq!(dp.count(Counter::EgressPassNotInternal), 1);
        assert_eq!(dp.count(Counter::EgressPassExcluded), 3);
        assert_eq!(dp.count(Counter::CreatedTcp), 4);
    }
}

#[test]
fn what_is_passed_and_what_is_dropped() {
    let dp = Dp::new("");
    // Not from an internal CIDR: untouched (the node's own traffic).
    let own = packets::tcp((NAT, 5555), (REMOTE, 80), SYN, b"");
    assert_eq!(dp.egress(&own), (PASS, own.clone()));
    // To an internal (always excluded) destination: untouched.
    let east_west = packets::tcp((POD, 5555), (Ipv4Addr::new(10, 1, 7, 2), 80), SYN, b"");
    assert_eq!(dp.egress(&east_west), (PASS, east_west.clone()));
    // A TCP segment that is not a SYN cannot open a mapping, and must not leave untranslated.
    assert_eq!(
        dp.egress(&packets::tcp((POD, 5556), (REMOTE, 80), ACK, b"x"))
            .0,
        SHOT
    );
    // An unsupported protocol (GRE).
    let mut gre = packets::udp((POD, 1), (REMOTE, 2), b"....");
    gre[14 + 9] = 47;
    assert_eq!(dp.egress(&gre).0, SHOT);
    // A TCP header with a data offset below 5.
    let mut bad = packets::tcp((POD, 5558), (REMOTE, 80), SYN, b"");
    bad[14 + 20 + 12] = 0x40;
    assert_eq!(dp.egress(&bad).0, SHOT);
    // An IPv4 header length below 20 bytes. (A frame too short for any IPv4 header cannot be
    // fed through BPF_PROG_TEST_RUN; the namespace suite covers it.)
    let mut short_ihl = packets::udp((POD, 5559), (REMOTE, 53), b"....");
    short_ihl[14] = 0x44;
    assert_eq!(dp.egress(&short_ihl).0, SHOT);
    // Ingress with no mapping: untouched.
    let stray = packets::tcp((REMOTE, 80), (NAT, 45678), SYN_ACK, b"");
    assert_eq!(dp.ingress(&stray), (PASS, stray.clone()));

    assert_eq!(dp.count(Counter::EgressPassNotInternal), 1);
    assert_eq!(dp.count(Counter::EgressPassExcluded), 1);
    assert_eq!(dp.count(Counter::EgressDropTcpNotSyn), 1);

    assert_eq!(dp.count(Counter::EgressDropUnsupportedProto), 1);
    assert_eq!(dp.count(Counter::EgressDropMalformed), 2);
    assert_eq!(dp.count(Counter::IngressPassNoMapping), 1);
}

#[test]
fn tcp_ports_are_reused_per_destination_and_exhaustion_is_exact() {
    let dp = Dp::new("--port-range 40000:40001 --on-exhaustion drop");
    let a = dp
        .egress_ok(&packets::tcp((POD, 1), (REMOTE, 80), SYN, b""))
        .tcp()
        .source_port;
    let b = dp
        .egress_ok(&packets::tcp((POD, 2), (REMOTE, 80), SYN, b""))
        .tcp()
        .source_port;
    assert_ne!(a, b);
    // Both ports are taken towards REMOTE:80: the third flow is refused and counted.
    assert_eq!(
        dp.egress(&packets::tcp((POD, 3), (REMOTE, 80), SYN, b"")).0,
        SHOT
    );
    assert_eq!(dp.count(Counter::EgressDropExhaustedTcp), 1);
    // Another destination port can still use them.
    let c = dp
        .egress_ok(&packets::tcp((POD, 3), (REMOTE, 81), SYN, b""))
        .tcp()
        .source_port;
    assert!((40000..=40001).contains(&c));
    // The second flow needed the exhaustive walk at most once the first port was taken, and
    // never gave up early.
    assert_eq!(dp.count(Counter::CreatedTcp), 3);
}

#[test]
fn a_nearly_full_destination_gets_its_last_ports_from_the_index() {
    // 128 ports (two index blocks): the destination turns hot at 112 claims (7/8).
    let mut dp = Dp::new("--port-range 40000:40127 --on-exhaustion drop");
    let mut tables = dp.engine.take_tables().unwrap();
    let syn = |sport: u16| packets::tcp((POD, sport), (REMOTE, 80), SYN, b"");
    let mut sport_of = HashMap::new(); // NAT port → pod's source port
    for sport in 1..=128u16 {
        let out = dp.egress_ok(&syn(sport));
        let port = out.tcp().source_port;
        assert_eq!(out.src(), NAT);
        assert!((40000..=40127).contains(&port), "{port}");
        assert!(
            sport_of.insert(port, sport).is_none(),
            "port {port} given twice"
        );
    }
    assert_eq!(dp.egress(&syn(129)).0, SHOT, "all 128 ports are taken");
    assert_eq!(dp.count(Counter::EgressDropExhaustedTcp), 1);
    assert_eq!(dp.count(Counter::IndexBuilt), 1, "{:?}", dp.nonzero());
    assert!(dp.count(Counter::AllocIndexed) >= 1);

    // Release three mappings with the kernel's release program, as expiry does: one port in
    // the first index block (40000-40063), two in the second.
    let freed = [40010u16, 40070, 40100];
    let mut entries: Vec<ReleaseEntry> = freed
        .iter()
        .map(|port| {
            let sport = sport_of[port];
            let key = packets::flow_key(proto::TCP, (POD, sport), (REMOTE, 80));
            tables.release_entry(key).unwrap()
        })
        .collect();
    dp.engine.release(&mut entries).unwrap();
    assert!(entries.iter().all(|e| e.result == release_result::RELEASED));

    // A claim the index missed (written behind its back): when the index offers that port (it
    // picks among the marked ones at random), the claim fails, the mark is cleared and the walk
    // finds a freed port instead. The first block is then marked but empty: the search must
    // clear it and go on. Whatever the order, the two real ports are handed out, each once, by
    // the index or (at most once, after the stale mark) by the walk, and then nothing is left.
    let stolen = FlowKey::new(
        proto::TCP,
        REMOTE.octets(),
        80u16.to_be_bytes(),
        NAT.octets(),
        freed[0].to_be_bytes(),
    );
    let thief = Origin::new(stolen, [10, 1, 9, 9], 7u16.to_be_bytes(), 0);
    tables.rev.insert(stolen, thief, 0).unwrap();
    let (indexed, scans) = (
        dp.count(Counter::AllocIndexed),
        dp.count(Counter::AllocScan),
    );
    let a = dp.egress_ok(&syn(200)).tcp().source_port;
    let b = dp.egress_ok(&syn(201)).tcp().source_port;
    let mut got = vec![a, b];
    got.sort_unstable();
    assert_eq!(got, freed[1..], "exactly the freed ports, each once");
    let (by_index, by_walk) = (
        dp.count(Counter::AllocIndexed) - indexed,
        dp.count(Counter::AllocScan) - scans,
    );
    assert_eq!(by_index + by_walk, 2, "{by_index} + {by_walk}");
    assert!(by_walk <= 1, "the walk ran only after the stale mark");
    assert_eq!(dp.egress(&syn(202)).0, SHOT);

    // Another destination has its own ports: random, not indexed.
    let random = dp.count(Counter::AllocRandom);
    let other = dp.egress_ok(&packets::tcp((POD, 300), (REMOTE, 81), SYN, b""));
    assert!((40000..=40127).contains(&other.tcp().source_port));
    assert_eq!(dp.count(Counter::AllocRandom), random + 1);
    assert_eq!(dp.count(Counter::IndexBuilt), 1);

    // A wider range (`snat set`): the destination is still hot (128 of 136), and the old index
    // knows nothing of the 8 new ports. The controller drops it, so the new ports come from
    // random tries or a rebuilt index: never from the walk the stale index would send every
    // new flow to.
    let mut pool = dp.engine.take_pool().unwrap();
    pool.set(
        &[NAT],
        &[],
        PortRange {
            lo: 40000,
            hi: 40135,
        },
    )
    .unwrap();
    let scans = dp.count(Counter::AllocScan);
    let mut new_ports: Vec<u16> = (0..8)
        .map(|i| dp.egress_ok(&syn(400 + i)).tcp().source_port)
        .collect();
    new_ports.sort_unstable();
    assert_eq!(new_ports, (40128..=40135).collect::<Vec<_>>());
    assert_eq!(dp.count(Counter::AllocScan), scans, "{:?}", dp.nonzero());
    assert!(dp.count(Counter::IndexBuilt) <= 2);
    assert_eq!(dp.egress(&syn(500)).0, SHOT);
}

#[test]
fn a_new_syn_on_a_closed_mapping_keeps_its_nat_port() {
    // Binding persistence: the server's TIME_WAIT must see the same 4-tuple again.
    let dp = Dp::new("");
    let fin_ack = packets::Flags {
        fin: true,
        ack: true,
        ..packets::Flags::default()
    };
    // Port 1234 lies outside the range, so the NAT port is random: keeping it is no accident.
    let first = dp
        .egress_ok(&packets::tcp((POD, 1234), (REMOTE, 80), SYN, b""))
        .tcp()
        .source_port;
    dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, first), SYN_ACK, b""));
    dp.egress_ok(&packets::tcp((POD, 1234), (REMOTE, 80), fin_ack, b""));
    dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, first), fin_ack, b""));
    let again = dp
        .egress_ok(&packets::tcp((POD, 1234), (REMOTE, 80), SYN, b""))
        .tcp()
        .source_port;
    assert_eq!(again, first);
    assert_eq!(dp.count(Counter::TcpReopened), 1);
    assert_eq!(dp.count(Counter::CreatedTcp), 1);
    // A retransmitted SYN before any answer is not a reopen.
    dp.egress_ok(&packets::tcp((POD, 1234), (REMOTE, 80), SYN, b""));
    assert_eq!(dp.count(Counter::TcpReopened), 1);
}

#[test]
fn a_refused_syn_becomes_a_rst_from_its_destination() {
    let dp = Dp::new("--port-range 40000:40000");
    dp.egress_ok(&packets::tcp((POD, 1), (REMOTE, 80), SYN, b""));
    let syn = packets::tcp((POD, 2), (REMOTE, 80), SYN, b"");
    let seq = Seen::parse(&syn).tcp().sequence_number;
    let (ret, out) = dp.egress(&syn);
    assert_eq!(ret, REDIRECT, "answered and sent back in");
    let rst = Seen::parse(&out);
    assert_eq!(
        (rst.src(), rst.dst()),
        (REMOTE, POD),
        "from the destination to the pod, never out"
    );
    let t = rst.tcp();
    assert_eq!((t.source_port, t.destination_port), (80, 2));
    assert!(t.rst && t.ack && !t.syn);
    assert_eq!(
        (t.sequence_number, t.acknowledgment_number),
        (0, seq.wrapping_add(1))
    );
    assert_eq!(out.len(), 14 + 40);
    // The Ethernet addresses are swapped: the answer arrives addressed to the uplink.
    assert_eq!((&out[0..6], &out[6..12]), (&syn[6..12], &syn[0..6]));
    assert_eq!(dp.count(Counter::EgressDropExhaustedTcp), 1);
    assert_eq!(dp.count(Counter::RejectRst), 1);
}

#[test]
fn a_refused_datagram_or_ping_becomes_icmp_unreachable_code_13() {
    let dp = Dp::new("--port-range 40000:40000");
    dp.egress_ok(&packets::udp((POD, 1), (REMOTE, 53), b"first"));
    let second = packets::udp((POD, 2), (REMOTE, 53), b"second query");
    let (ret, out) = dp.egress(&second);
    assert_eq!(ret, REDIRECT);
    let err = Seen::parse(&out);
    assert_eq!((err.src(), err.dst()), (REMOTE, POD));
    assert_eq!(
        err.icmp().icmp_type,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FilterProhibited)
    );
    let (qip, ql4) = quoted(&err);
    assert_eq!(
        (Ipv4Addr::from(qip.source), Ipv4Addr::from(qip.destination)),
        (POD, REMOTE)
    );
    assert_eq!(
        &ql4[..2],
        &2u16.to_be_bytes(),
        "quotes the refused datagram's ports"
    );
    assert_eq!(ql4.len(), 8);

    dp.egress_ok(&packets::icmp_echo(POD, REMOTE, true, 40000, 1));
    let (ret, out) = dp.egress(&packets::icmp_echo(
        Ipv4Addr::new(10, 1, 0, 3),
        REMOTE,
        true,
        40000,
        1,
    ));
    assert_eq!(ret, REDIRECT);
    let err = Seen::parse(&out);
    assert_eq!(err.dst(), Ipv4Addr::new(10, 1, 0, 3));
    assert_eq!(dp.count(Counter::RejectIcmp), 2);
}

#[test]
fn answers_are_rate_limited_and_drop_mode_only_drops() {
    let dp = Dp::new("--port-range 40000:40000 --reject-rate 1");
    dp.egress_ok(&packets::tcp((POD, 1), (REMOTE, 80), SYN, b""));
    assert_eq!(
        dp.egress(&packets::tcp((POD, 2), (REMOTE, 80), SYN, b"")).0,
        REDIRECT
    );
    // test_run may move between CPUs: each has its own budget of one per second.
    let rest: Vec<i32> = (3..6)
        .map(|p| dp.egress(&packets::tcp((POD, p), (REMOTE, 80), SYN, b"")).0)
        .collect();
    assert!(rest.contains(&SHOT), "{rest:?}");
    assert!(dp.count(Counter::RejectRateLimited) >= 1);
    assert_eq!(
        dp.count(Counter::EgressDropExhaustedTcp),
        4,
        "every refused SYN still counts as refused"
    );

    let quiet = Dp::new("--port-range 40000:40000 --on-exhaustion drop");
    quiet.egress_ok(&packets::tcp((POD, 1), (REMOTE, 80), SYN, b""));
    assert_eq!(
        quiet
            .egress(&packets::tcp((POD, 2), (REMOTE, 80), SYN, b""))
            .0,
        SHOT
    );
    assert_eq!(quiet.count(Counter::RejectRst), 0);
}

#[test]
fn per_source_cap_and_fair_share_refuse_the_greedy_source_only() {
    let dp = Dp::new("--port-range 40000:40009 --max-ports-per-source 3");
    let greedy = POD;
    let other = Ipv4Addr::new(10, 1, 0, 3);
    for p in 1..=3 {
        dp.egress_ok(&packets::tcp((greedy, p), (REMOTE, 80), SYN, b""));
    }
    assert_eq!(
        dp.egress(&packets::tcp((greedy, 4), (REMOTE, 81), SYN, b""))
            .0,
        REDIRECT
    );
    assert_eq!(dp.count(Counter::EgressDropSourceCap), 1);
    dp.egress_ok(&packets::tcp((other, 1), (REMOTE, 80), SYN, b""));

    // Fair share from 50 %, with the controller's hint that one source uses the destination:
    // its share is 10 / (1 + 1) = 5 ports once 5 are used; a newcomer still gets one.
    let mut fair = Dp::new("--port-range 40000:40009 --fair-share --fair-share-threshold 0.5");
    let fwd = packets::flow_key(proto::TCP, (greedy, 1), (REMOTE, 80));
    let [_, dest, _] = snat_common::UseKey::of_mapping(&fwd, NAT.octets());
    let mut tables = fair.engine.take_tables().unwrap();
    tables
        .usage
        .insert(snat_common::UseKey::sources_of(&dest), 1, 0)
        .unwrap();
    for p in 1..=5 {
        fair.egress_ok(&packets::tcp((greedy, p), (REMOTE, 80), SYN, b""));
    }
    assert_eq!(
        fair.egress(&packets::tcp((greedy, 6), (REMOTE, 80), SYN, b""))
            .0,
        REDIRECT
    );
    assert_eq!(fair.count(Counter::EgressDropFairShare), 1);
    fair.egress_ok(&packets::tcp((other, 1), (REMOTE, 80), SYN, b""));
}

/// `frame` made a fragment: MF set and/or `offset` (in 8-byte units), its IPv4 checksum fixed.
fn fragment(mut frame: Vec<u8>, id: u16, mf: bool, offset: u16) -> Vec<u8> {
    frame[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    let frags = (u16::from(mf) << 13) | offset;
    frame[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
    frame[14 + 10] = 0;
    frame[14 + 11] = 0;
    let c = snat_common::csum::checksum(&frame[14..34]);
    frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    frame
}

/// A later fragment: an IPv4 header of `proto` and `payload` bytes, at `offset`.
fn later_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    offset: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let tot = (20 + payload.len()) as u16;
    let mut ip = [
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    fragment(f, id, false, offset)
}

#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    let dp = Dp::new("");
    // A first fragment: UDP header (its length counts the whole datagram) and a first part.
    let mut first = packets::udp((POD, 40100), (REMOTE, 53), &[7u8; 64]);
    first[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&(8u16 + 64 + 32).to_be_bytes());
    let first = fragment(first, 0x1234, true, 0);
    let (ret, out) = dp.egress(&first);
    assert_eq!(ret, PASS);
    assert_eq!(
        &out[14 + 12..14 + 16],
        &NAT.octets(),
        "first fragment translated"
    );
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), 40100);
    // The rest of the datagram: no UDP header, translated like its first fragment.
    let (ret, out) = dp.egress(&later_fragment(POD, REMOTE, 17, 0x1234, 9, &[8u8; 32]));
    assert_eq!(ret, PASS);
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&out[14..]).unwrap();
    assert_eq!(Ipv4Addr::from(ip.source()), NAT);
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
    assert_eq!(&out[34..], &[8u8; 32], "payload untouched");
    // A later fragment that overtook its first still leaves with the pod's NAT IP.
    let (ret, out) = dp.egress(&later_fragment(POD, REMOTE, 17, 0x9999, 9, &[1u8; 16]));
    assert_eq!(ret, PASS);
    assert_eq!(&out[14 + 12..14 + 16], &NAT.octets());
    assert_eq!(dp.count(Counter::EgressTranslatedFragment), 2);

    // Replies: the first fragment finds the mapping; the next follows it to the pod.
    let mut reply = packets::udp((REMOTE, 53), (NAT, 40100), &[9u8; 64]);
    reply[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&(8u16 + 64 + 32).to_be_bytes());
    let (ret, out) = dp.ingress(&fragment(reply, 0x4321, true, 0));
    assert_eq!(ret, PASS);
    assert_eq!(&out[14 + 16..14 + 20], &POD.octets());
    let (ret, out) = dp.ingress(&later_fragment(REMOTE, NAT, 17, 0x4321, 9, &[9u8; 32]));
    assert_eq!(ret, PASS);
    assert_eq!(&out[14 + 16..14 + 20], &POD.octets());
    assert_eq!(dp.count(Counter::IngressTranslatedFragment), 1);
    // One that overtook its first cannot be placed and is left to the node.
    let (ret, out) = dp.ingress(&later_fragment(REMOTE, NAT, 17, 0x7777, 9, &[9u8; 32]));
    assert_eq!(ret, PASS);
    assert_eq!(&out[14 + 16..14 + 20], &NAT.octets());
}

#[test]
fn mapping_is_endpoint_independent_when_the_port_is_free() {
    // RFC 4787 REQ-1 / RFC 5382 REQ-1: one internal endpoint, one NAT endpoint, whatever the
    // destination (port 1234 is outside the range, so this is not port preservation).
    let dp = Dp::new("");
    let other = Ipv4Addr::new(203, 0, 113, 20);
    let a = dp
        .egress_ok(&packets::tcp((POD, 1234), (REMOTE, 80), SYN, b""))
        .tcp()
        .source_port;
    let b = dp
        .egress_ok(&packets::tcp((POD, 1234), (other, 443), SYN, b""))
        .tcp()
        .source_port;
    assert_eq!(a, b);
    let u1 = dp
        .egress_ok(&packets::udp((POD, 1234), (REMOTE, 3478), b"q"))
        .udp()
        .source_port;
    let u2 = dp
        .egress_ok(&packets::udp((POD, 1234), (other, 3479), b"q"))
        .udp()
        .source_port;
    assert_eq!(u1, u2);
    assert_eq!(dp.count(Counter::AllocSameEndpoint), 2);
    // Simultaneous open (RFC 5382): the remote's own SYN (no ACK) reaches the pod.
    let syn = dp.ingress_ok(&packets::tcp((REMOTE, 80), (NAT, a), SYN, b""));
    assert_eq!((syn.dst(), syn.tcp().destination_port), (POD, 1234));
}

#[test]
fn a_kept_port_needs_no_hint_and_a_moved_one_gets_one() {
    // Port 40000 is inside the range: kept towards every destination by port preservation,
    // which comes right after the endpoint's hint, so no hint is written for it.
    let dp = Dp::new("");
    let pod2 = Ipv4Addr::new(10, 1, 0, 3);
    let remote = |i: u8| Ipv4Addr::new(203, 0, 113, 20 + i);
    let sport = |dp: &Dp, src, dst| {
        dp.egress_ok(&packets::tcp((src, 40000), (dst, 80), SYN, b""))
            .tcp()
            .source_port
    };
    assert_eq!(sport(&dp, POD, remote(0)), 40000);
    assert_eq!(sport(&dp, POD, remote(1)), 40000);
    assert_eq!(dp.count(Counter::AllocPreserved), 2);
    assert_eq!(
        dp.count(Counter::AllocSameEndpoint),
        0,
        "no hint was written"
    );
    // Another pod holds 40000 towards remote(2) first: the pod's flow there gets another port,
    // and from then on its endpoint's hint says so (RFC 4787 REQ-1 for its next flows).
    assert_eq!(sport(&dp, pod2, remote(2)), 40000);
    let moved = sport(&dp, POD, remote(2));
    assert_ne!(moved, 40000);
    assert_eq!(dp.count(Counter::AllocRandom), 1);
    assert_eq!(sport(&dp, POD, remote(3)), moved);
    assert_eq!(dp.count(Counter::AllocSameEndpoint), 1);
}

#[test]
fn icmp_errors_neither_end_nor_refresh_a_mapping() {
    // RFC 4787 REQ-12, RFC 5508: an error is translated but changes nothing about the mapping.
    let mut dp = Dp::new("");
    let (_, out) = dp.egress(&packets::udp((POD, 40200), (REMOTE, 53), b"q"));
    let tables = dp.engine.take_tables().unwrap();
    let key = packets::flow_key(proto::UDP, (POD, 40200), (REMOTE, 53));
    let before = tables.fwd.get(&key, 0).unwrap();
    let rev_key = key.reply(before.nat_addr, before.nat_port);
    let rev_before = tables.rev.get(&rev_key, 0).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let err = packets::icmp_error(
        REMOTE,
        NAT,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        packets::ip_part(&out),
    );
    assert_eq!(dp.ingress_ok(&err).dst(), POD);
    assert_eq!(
        tables.fwd.get(&key, 0).unwrap(),
        before,
        "the mapping is still there, unchanged"
    );
    assert_eq!(
        tables.rev.get(&rev_key, 0).unwrap().last_seen_ns,
        rev_before.last_seen_ns,
        "not refreshed"
    );
}

#[test]
fn batch_reads_return_every_entry_once() {
    // More entries than one batch call returns (4096), so the walk resumes from the kernel's
    // cursor several times; checked against aya's one-entry-at-a-time iteration.
    let mut dp = Dp::with_max(20_000, "");
    let mut tables = dp.engine.take_tables().unwrap();
    let n = 10_000u32;
    for i in 0..n {
        let key = FlowKey::new(
            proto::UDP,
            [10, 1, (i >> 8) as u8, i as u8],
            1234u16.to_be_bytes(),
            REMOTE.octets(),
            53u16.to_be_bytes(),
        );
        let m = snat_common::Mapping::new(
            key,
            NAT.octets(),
            (32768 + i as u16).to_be_bytes(),
            u64::from(i),
        );
        tables.fwd.insert(key, m, 0).unwrap();
    }
    let mut batched = Vec::new();
    snat_user::datapath::batch::for_each(&tables.fwd, |k, m| {
        batched.push((k, m.created_ns(), m.nat_port))
    })
    .unwrap();
    let mut iterated: Vec<_> = tables
        .fwd
        .iter()
        .map(|item| {
            let (k, m) = item.unwrap();
            (k, m.created_ns(), m.nat_port)
        })
        .collect();
    assert_eq!(batched.len(), n as usize);
    batched.sort_unstable_by_key(|e| e.1);
    iterated.sort_unstable_by_key(|e| e.1);
    assert_eq!(batched, iterated);
    // Keys alone, and an empty map.
    assert_eq!(
        snat_user::datapath::batch::keys(&tables.fwd).unwrap().len(),
        n as usize
    );
    assert!(snat_user::datapath::batch::keys(&tables.rev)
        .unwrap()
        .is_empty());
}

#[test]
fn a_udp_mapping_records_its_one_remote_port() {
    // The per-port UDP timeout (`--udp-timeout-for`) needs the remote port, which a UDP key
    // does not carry: the mapping records the first datagram's, and forgets it at a second one.
    let mut dp = Dp::new("");
    dp.egress_ok(&packets::udp((POD, 40300), (REMOTE, 53), b"query"));
    dp.egress_ok(&packets::udp((POD, 40301), (REMOTE, 123), b"ntp"));
    let tables = dp.engine.take_tables().unwrap();
    let dns = packets::flow_key(proto::UDP, (POD, 40300), (REMOTE, 53));
    let ntp = packets::flow_key(proto::UDP, (POD, 40301), (REMOTE, 123));
    let port = |key: &FlowKey| tables.fwd.get(key, 0).unwrap().udp_remote_port();
    assert_eq!((port(&dns), port(&ntp)), (Some(53), Some(123)));
    // Again to 53: unchanged; then to another port: several ports, so none.
    dp.egress_ok(&packets::udp((POD, 40300), (REMOTE, 53), b"query 2"));
    assert_eq!(port(&dns), Some(53));
    dp.egress_ok(&packets::udp((POD, 40300), (REMOTE, 5353), b"other"));
    assert_eq!(port(&dns), None);
    dp.egress_ok(&packets::udp((POD, 40300), (REMOTE, 53), b"query 3"));
    assert_eq!(port(&dns), None, "once several, always several");
}
