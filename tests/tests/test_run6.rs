//! NAT66 through `BPF_PROG_TEST_RUN`: crafted IPv6 frames through the real loaded programs
//! (configured by the real controller code from `snat run … --internal fd00:10::/64 --nat-ip
//! 2001:db8:1::1`), every rewritten field checked and every checksum recomputed from scratch
//! (`tests::packets6`, RFC 8200 pseudo-header). Needs root.
//!
//! The pod is `fd00:10::2`, the NAT IP `2001:db8:1::1`, the router `2001:db8:1::2`, the remote
//! server `2001:db8:2::10`.

use std::net::Ipv6Addr;

use snat_common::Counter;
use tests::{
    dp::{Dp, PASS, SHOT},
    packets::{ACK, SYN, SYN_ACK},
    packets6::{
        self, auth, checksum_of, checksum_verifies, dest_opts, egress_drop_ext_headers, fold16,
        hop_by_hop, icmp6, ip_part, nh, pseudo_header_sum, routing, sum16, with_exts, Ext, Seen6,
        DP_EXTRA, NAT6, POD6, POD6_B, REMOTE6, ROUTER6,
    },
};

/// The datapath with IPv6 translation and `extra` flags.
fn dp(extra: &str) -> Dp {
    Dp::new(&format!("{DP_EXTRA} {extra}"))
}

/// Runs `frame` through egress and expects it translated (or passed) and sound.
fn out(dp: &Dp, frame: &[u8]) -> Seen6 {
    let (ret, f) = dp.egress(frame);
    assert_eq!(ret, PASS, "egress verdict; counters: {:?}", dp.nonzero());
    Seen6::parse(&f)
}

fn back(dp: &Dp, frame: &[u8]) -> Seen6 {
    let (ret, f) = dp.ingress(frame);
    assert_eq!(ret, PASS, "ingress verdict; counters: {:?}", dp.nonzero());
    Seen6::parse(&f)
}

/// Asserts the quote of an ICMPv6 error carries a valid checksum when it is complete.
fn assert_quote_checksum(q: &Seen6) {
    if let Some(ok) = q.checksum_ok() {
        assert!(
            ok,
            "quoted checksum {:#06x}, should be {:#06x}",
            q.checksum(),
            q.expected_checksum()
        );
    }
}

#[test]
fn the_checksum_helpers_agree_with_etherparse() {
    // The from-scratch checksum (packets6) against frames etherparse built and checksummed: a
    // check of the checker, which needs no datapath.
    let frames = [
        packets6::tcp((POD6, 1234), (REMOTE6, 80), SYN, b""),
        packets6::tcp((REMOTE6, 80), (NAT6, 50000), SYN_ACK, b"odd-length payload"),
        packets6::udp((POD6, 1111), (REMOTE6, 53), b"query"),
        packets6::echo(POD6, REMOTE6, true, 7, 1),
        packets6::packet_too_big(ROUTER6, NAT6, 1280, &[0x60; 48]),
        packets6::neighbour_solicitation(NAT6, ROUTER6),
    ];
    for f in &frames {
        let seen = Seen6::parse(f);
        assert_eq!(seen.checksum(), seen.expected_checksum(), "{f:02x?}");
        // One flipped bit anywhere in the upper layer, or in an address, is caught.
        for at in [packets6::ETH + 8, packets6::ETH + 39, f.len() - 1] {
            let mut bad = f.clone();
            bad[at] ^= 0x04;
            assert_eq!(Seen6::parse_ip(ip_part(&bad)).checksum_ok(), Some(false));
        }
    }
    // Extension headers do not enter the pseudo-header.
    let tcp = packets6::tcp((POD6, 1234), (REMOTE6, 80), SYN, b"");
    let ext = Seen6::parse(&with_exts(&tcp, &[hop_by_hop(), dest_opts()]));
    assert_eq!(
        ext.exts.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [nh::HOP_BY_HOP, nh::DEST_OPTS]
    );
    assert_eq!((ext.proto, ext.ports()), (nh::TCP, (1234, 80)));
    // The one's complement arithmetic itself: RFC 1071's example words sum to ddf2.
    assert_eq!(
        fold16(sum16(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
        0xddf2
    );
}

#[test]
fn tcp_is_translated_both_ways_with_valid_checksums() {
    let dp = dp("--port-range 50000:50009");
    // Port 1234 is outside the range: it must be mapped into it.
    let syn = out(&dp, &packets6::tcp((POD6, 1234), (REMOTE6, 443), SYN, b""));
    assert_eq!((syn.src(), syn.dst(), syn.proto), (NAT6, REMOTE6, nh::TCP));
    let nat_port = syn.sport();
    assert!((50000..=50009).contains(&nat_port), "{nat_port}");
    assert_eq!(syn.dport(), 443);
    assert_eq!(syn.tcp_flags() & 0x12, 0x02, "still a SYN");

    let reply = back(
        &dp,
        &packets6::tcp((REMOTE6, 443), (NAT6, nat_port), SYN_ACK, b""),
    );
    assert_eq!((reply.src(), reply.sport()), (REMOTE6, 443));
    assert_eq!((reply.dst(), reply.dport()), (POD6, 1234));

    let body = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    let data = out(&dp, &packets6::tcp((POD6, 1234), (REMOTE6, 443), ACK, body));
    assert_eq!((data.src(), data.sport()), (NAT6, nat_port));
    assert_eq!(data.payload(), body);
    let answer = back(
        &dp,
        &packets6::tcp(
            (REMOTE6, 443),
            (NAT6, nat_port),
            ACK,
            b"HTTP/1.1 200 OK\r\n",
        ),
    );
    assert_eq!((answer.dst(), answer.dport()), (POD6, 1234));
    assert_eq!(answer.payload(), b"HTTP/1.1 200 OK\r\n");

    assert_eq!(dp.count(Counter::CreatedTcp), 1);
    assert_eq!(dp.count(Counter::EgressTranslatedTcp), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedTcp), 2);
}

#[test]
fn udp_is_translated_both_ways_with_valid_checksums() {
    let dp = dp("--port-range 50000:50009");
    let q = out(&dp, &packets6::udp((POD6, 1111), (REMOTE6, 53), b"query"));
    assert_eq!((q.src(), q.dst(), q.proto), (NAT6, REMOTE6, nh::UDP));
    let nat_port = q.sport();
    assert!((50000..=50009).contains(&nat_port), "{nat_port}");
    assert_eq!((q.dport(), q.payload()), (53, &b"query"[..]));

    let a = back(
        &dp,
        &packets6::udp((REMOTE6, 53), (NAT6, nat_port), b"answer"),
    );
    assert_eq!((a.src(), a.sport()), (REMOTE6, 53));
    assert_eq!((a.dst(), a.dport()), (POD6, 1111));
    assert_eq!(a.payload(), b"answer");

    // The same flow keeps its NAT port.
    let again = out(&dp, &packets6::udp((POD6, 1111), (REMOTE6, 53), b"q2"));
    assert_eq!(again.sport(), nat_port);

    assert_eq!(dp.count(Counter::CreatedUdp), 1);
    assert_eq!(dp.count(Counter::EgressTranslatedUdp), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedUdp), 1);
}

#[test]
fn extension_headers_are_walked_to_the_transport_header() {
    let dp = dp("--port-range 50000:50009");
    let exts = [hop_by_hop(), dest_opts()];
    let syn = with_exts(&packets6::tcp((POD6, 2222), (REMOTE6, 80), SYN, b""), &exts);
    let o = out(&dp, &syn);
    assert_eq!(
        o.exts.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [nh::HOP_BY_HOP, nh::DEST_OPTS],
        "the chain is kept"
    );
    assert_eq!(
        o.ext_bytes(),
        &ip_part(&syn)[40..40 + 24],
        "extension headers unchanged"
    );
    assert_eq!((o.src(), o.proto, o.dport()), (NAT6, nh::TCP, 80));
    let nat_port = o.sport();
    assert!((50000..=50009).contains(&nat_port), "{nat_port}");

    let reply = with_exts(
        &packets6::tcp((REMOTE6, 80), (NAT6, nat_port), SYN_ACK, b""),
        &exts,
    );
    let b = back(&dp, &reply);
    assert_eq!((b.dst(), b.dport(), b.exts.len()), (POD6, 2222, 2));

    let data = with_exts(
        &packets6::tcp((POD6, 2222), (REMOTE6, 80), ACK, b"through options"),
        &exts,
    );
    let o = out(&dp, &data);
    assert_eq!(
        (o.sport(), o.payload()),
        (nat_port, &b"through options"[..])
    );

    // A routing header with no segments left is only a record: walked, and UDP behind it
    // translated.
    let dgram = with_exts(
        &packets6::udp((POD6, 3333), (REMOTE6, 53), b"routed"),
        &[hop_by_hop(), routing(0, &[REMOTE6])],
    );
    let o = out(&dp, &dgram);
    assert_eq!(
        (o.src(), o.proto, o.exts.len(), o.payload()),
        (NAT6, nh::UDP, 2, &b"routed"[..])
    );
    assert!((50000..=50009).contains(&o.sport()));

    assert_eq!(dp.count(Counter::EgressTranslatedTcp), 2);
    assert_eq!(dp.count(Counter::EgressTranslatedUdp), 1);
    assert_eq!(dp.count(Counter::IngressTranslatedTcp), 1);
}

#[test]
fn chains_that_cannot_be_walked_are_dropped() {
    let dp = dp("");
    let udp = |sport: u16| packets6::udp((POD6, sport), (REMOTE6, 53), b"hidden");
    let nine_dest_opts: Vec<Ext> = (0..9).map(|_| dest_opts()).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "routing header with segments left",
            with_exts(
                &udp(4001),
                &[routing(
                    1,
                    &[REMOTE6, Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20)],
                )],
            ),
        ),
        (
            "ESP",
            packets6::raw(
                POD6,
                REMOTE6,
                nh::ESP,
                &[
                    0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee,
                    0xee,
                ],
            ),
        ),
        ("AH", with_exts(&udp(4003), &[auth()])),
        (
            "nine destination options headers",
            with_exts(&udp(4004), &nine_dest_opts),
        ),
    ];
    for (what, frame) in &cases {
        let (ret, _) = dp.egress(frame);
        assert_eq!(
            ret,
            SHOT,
            "{what}: must not leave; counters {:?}",
            dp.nonzero()
        );
    }
    assert_eq!(dp.count(Counter::CreatedUdp), 0, "no mapping made");
    assert_eq!(dp.count(Counter::EgressTranslatedUdp), 0);

    // --- Needs Counter::EgressDropExtHeaders (see packets6::egress_drop_ext_headers). ---
    // The routing header and the long chain are chains that cannot be walked; ESP and AH are
    // counted there or as unsupported protocols.
    let ext = dp.count(egress_drop_ext_headers());
    let unsupported = dp.count(Counter::EgressDropUnsupportedProto);
    assert!(
        ext >= 2,
        "drop_ext_headers {ext}; counters {:?}",
        dp.nonzero()
    );
    assert_eq!(ext + unsupported, 4, "counters {:?}", dp.nonzero());
}

#[test]
fn malformed_and_unsupported_pod_packets_are_dropped() {
    let dp = dp("");
    // A UDP datagram from a pod with checksum 0: invalid in IPv6.
    let zero = packets6::udp_zero_checksum((POD6, 5000), (REMOTE6, 53), b"no checksum");
    assert_eq!(dp.egress(&zero).0, SHOT);
    assert_eq!(dp.count(Counter::EgressDropMalformed), 1);
    // Transport headers cut short.
    let short_udp = packets6::raw(POD6, REMOTE6, nh::UDP, &[0x13, 0x88, 0, 53]);
    assert_eq!(dp.egress(&short_udp).0, SHOT, "truncated UDP header");
    let short_tcp = packets6::raw(
        POD6,
        REMOTE6,
        nh::TCP,
        &[0x13, 0x89, 0, 80, 0, 0, 0, 1, 0, 0],
    );
    assert_eq!(dp.egress(&short_tcp).0, SHOT, "truncated TCP header");
    // An upper-layer protocol snat does not translate (SCTP).
    let sctp = packets6::raw(POD6, REMOTE6, 132, b"sctp common hdr.");
    assert_eq!(dp.egress(&sctp).0, SHOT);
    assert_eq!(dp.count(Counter::EgressDropUnsupportedProto), 1);
    // An experimental number (RFC 4727) may be an extension header: not walked, dropped.
    let experimental = packets6::raw(POD6, REMOTE6, 253, b"experimental....");
    assert_eq!(dp.egress(&experimental).0, SHOT);
    assert_eq!(
        dp.count(Counter::CreatedUdp) + dp.count(Counter::CreatedTcp),
        0
    );

    // A TCP segment that opens nothing must not leave with the pod's address either.
    let (ret, f) = dp.egress(&packets6::tcp((POD6, 5001), (REMOTE6, 80), ACK, b"x"));
    assert!(
        ret == SHOT || Seen6::parse(&f).src() != POD6,
        "a non-SYN left untranslated"
    );
}

#[test]
fn a_translated_udp_checksum_of_zero_leaves_as_ffff() {
    let dp = dp("");
    // The flow's NAT port, from a first datagram.
    let nat_port = out(&dp, &packets6::udp((POD6, 6000), (REMOTE6, 7000), b"probe")).sport();

    // A payload whose last word makes the translated datagram's sum all ones, so its checksum
    // computes to 0: 8 fixed bytes, then the one's complement of the sum of everything else.
    let payload_for = |src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)| {
        let mut udp = Vec::new();
        udp.extend_from_slice(&src.1.to_be_bytes());
        udp.extend_from_slice(&dst.1.to_be_bytes());
        udp.extend_from_slice(&18u16.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(b"zero-sum");
        let partial = fold16(sum16(&udp, pseudo_header_sum(src.0, dst.0, 18, nh::UDP)));
        let mut payload = b"zero-sum".to_vec();
        payload.extend_from_slice(&(!partial).to_be_bytes());
        udp.truncate(8);
        udp.extend_from_slice(&payload);
        assert_eq!(
            checksum_of(src.0, dst.0, nh::UDP, &udp),
            0,
            "crafted to sum to 0"
        );
        payload
    };

    // Out: as the pod sends it, the checksum is something else; translated it computes to 0.
    let payload = payload_for((NAT6, nat_port), (REMOTE6, 7000));
    let frame = packets6::udp((POD6, 6000), (REMOTE6, 7000), &payload);
    assert_ne!(Seen6::parse(&frame).checksum(), 0xffff);
    let o = out(&dp, &frame);
    assert_eq!((o.src(), o.sport()), (NAT6, nat_port));
    assert_eq!(o.checksum(), 0xffff, "a computed 0 is sent as 0xffff");
    assert!(checksum_verifies(o.src(), o.dst(), nh::UDP, o.l4()));

    // In: the same for a reply that computes to 0 once addressed to the pod.
    let payload = payload_for((REMOTE6, 7000), (POD6, 6000));
    let frame = packets6::udp((REMOTE6, 7000), (NAT6, nat_port), &payload);
    assert_ne!(Seen6::parse(&frame).checksum(), 0xffff);
    let b = back(&dp, &frame);
    assert_eq!((b.dst(), b.dport()), (POD6, 6000));
    assert_eq!(b.checksum(), 0xffff, "a computed 0 is sent as 0xffff");
}

#[test]
fn icmpv6_echo_identifier_is_mapped() {
    let dp = dp("--port-range 50000:50009");
    let o = out(&dp, &packets6::echo(POD6, REMOTE6, true, 7, 1));
    assert_eq!(
        (o.src(), o.dst(), o.icmp_type()),
        (NAT6, REMOTE6, icmp6::ECHO_REQUEST)
    );
    let (id, seq) = o.echo();
    assert!(
        (50000..=50009).contains(&id),
        "identifier 7 is outside the range and must be mapped: {id}"
    );
    assert_eq!(seq, 1);
    assert_eq!(o.payload(), b"abcdefgh01234567");

    let b = back(&dp, &packets6::echo(REMOTE6, NAT6, false, id, 1));
    assert_eq!(
        (b.src(), b.dst(), b.icmp_type(), b.echo()),
        (REMOTE6, POD6, icmp6::ECHO_REPLY, (7, 1))
    );
    let o2 = out(&dp, &packets6::echo(POD6, REMOTE6, true, 7, 2));
    assert_eq!(
        o2.echo(),
        (id, 2),
        "the same identifier for the next request"
    );

    assert_eq!(dp.count(Counter::CreatedIcmp), 1);
    assert_eq!(dp.count(Counter::EgressTranslatedIcmp), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedIcmp), 1);
}

#[test]
fn packet_too_big_from_the_router_reaches_the_pod() {
    let dp = dp("--port-range 50000:50009");
    let (_, syn) = dp.egress(&packets6::tcp((POD6, 1234), (REMOTE6, 443), SYN, b""));
    assert_eq!(Seen6::parse(&syn).src(), NAT6);

    // The whole translated SYN quoted.
    let ptb = packets6::packet_too_big(ROUTER6, NAT6, 1280, ip_part(&syn));
    let b = back(&dp, &ptb);
    assert_eq!((b.src(), b.dst()), (ROUTER6, POD6));
    assert_eq!(
        (b.icmp_type(), b.icmp_code(), b.mtu()),
        (icmp6::PACKET_TOO_BIG, 0, 1280)
    );
    let q = b.quote();
    assert_eq!((q.src(), q.dst(), q.proto), (POD6, REMOTE6, nh::TCP));
    assert_eq!(q.ports(), (1234, 443));
    assert!(q.complete());
    assert_quote_checksum(&q);

    // Only the IPv6 header and the first 8 bytes of TCP quoted.
    let short = &ip_part(&syn)[..48];
    let b = back(&dp, &packets6::packet_too_big(ROUTER6, NAT6, 1400, short));
    assert_eq!((b.dst(), b.mtu()), (POD6, 1400));
    let q = b.quote();
    assert_eq!((q.src(), q.sport(), q.dport()), (POD6, 1234, 443));

    assert_eq!(dp.count(Counter::IngressTranslatedIcmpError), 2);
}

#[test]
fn every_icmpv6_error_type_about_a_flow_is_translated_to_the_pod() {
    let dp = dp("");
    let (_, dgram) = dp.egress(&packets6::udp((POD6, 1111), (REMOTE6, 53), b"query"));
    let sent = Seen6::parse(&dgram);
    assert_eq!(sent.src(), NAT6);
    let cases = [
        (
            "port unreachable",
            REMOTE6,
            icmp6::DEST_UNREACHABLE,
            icmp6::CODE_PORT_UNREACHABLE,
            [0; 4],
        ),
        (
            "packet too big",
            ROUTER6,
            icmp6::PACKET_TOO_BIG,
            0,
            1280u32.to_be_bytes(),
        ),
        (
            "hop limit exceeded",
            ROUTER6,
            icmp6::TIME_EXCEEDED,
            0,
            [0; 4],
        ),
        (
            "parameter problem",
            ROUTER6,
            icmp6::PARAMETER_PROBLEM,
            0,
            6u32.to_be_bytes(),
        ),
    ];
    for (what, from, t, code, rest) in cases {
        let err = packets6::icmp_error(from, NAT6, t, code, rest, ip_part(&dgram));
        let b = back(&dp, &err);
        assert_eq!((b.src(), b.dst()), (from, POD6), "{what}");
        assert_eq!(
            (b.icmp_type(), b.icmp_code(), b.icmp_rest()),
            (t, code, rest),
            "{what}: type, code and the MTU/pointer field unchanged"
        );
        let q = b.quote();
        assert_eq!((q.src(), q.dst()), (POD6, REMOTE6), "{what}");
        assert_eq!(q.ports(), (1111, 53), "{what}");
        assert_quote_checksum(&q);
        assert_eq!(q.payload(), b"query");
    }
    assert_eq!(dp.count(Counter::IngressTranslatedIcmpError), 4);
}

#[test]
fn a_pods_port_unreachable_about_a_reply_quotes_the_nat_endpoint() {
    let dp = dp("");
    let nat_port = out(&dp, &packets6::udp((POD6, 1111), (REMOTE6, 53), b"q")).sport();
    // The reply as the pod received it, remote → pod.
    let (_, reply) = dp.ingress(&packets6::udp((REMOTE6, 53), (NAT6, nat_port), b"answer"));
    let r = Seen6::parse(&reply);
    assert_eq!((r.dst(), r.dport()), (POD6, 1111));
    // The pod's socket is gone: port unreachable, quoting that reply.
    let err = packets6::icmp_error(
        POD6,
        REMOTE6,
        icmp6::DEST_UNREACHABLE,
        icmp6::CODE_PORT_UNREACHABLE,
        [0; 4],
        ip_part(&reply),
    );
    let o = out(&dp, &err);
    assert_eq!((o.src(), o.dst()), (NAT6, REMOTE6));
    assert_eq!((o.icmp_type(), o.icmp_code()), (1, 4));
    let q = o.quote();
    assert_eq!((q.src(), q.sport()), (REMOTE6, 53));
    assert_eq!(
        (q.dst(), q.dport()),
        (NAT6, nat_port),
        "the quote names the NAT endpoint"
    );
    assert_quote_checksum(&q);
    assert_eq!(dp.count(Counter::EgressTranslatedIcmpError), 1);
}

#[test]
fn excluded_foreign_and_unmapped_traffic_passes_untouched() {
    let dp = dp("--exclude 2001:db8:ff::/48");
    let excluded = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
    let cases = [
        // To an excluded destination.
        (
            "excluded",
            packets6::tcp((POD6, 1000), (excluded, 80), SYN, b""),
        ),
        // Pod to pod (the internal CIDRs are always excluded).
        (
            "east-west",
            packets6::udp((POD6, 1001), (POD6_B, 53), b"neighbour"),
        ),
        // The node's own traffic.
        (
            "the node",
            packets6::tcp((NAT6, 1002), (REMOTE6, 80), SYN, b""),
        ),
        // A source in no internal CIDR.
        (
            "not internal",
            packets6::udp(
                (Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2), 1003),
                (REMOTE6, 53),
                b"elsewhere",
            ),
        ),
    ];
    for (what, f) in &cases {
        assert_eq!(dp.egress(f), (PASS, f.clone()), "{what}");
    }
    assert_eq!(dp.count(Counter::EgressPassExcluded), 2);
    assert_eq!(dp.count(Counter::EgressPassNotInternal), 2);

    // Ingress without a mapping: untouched (the node's own flows).
    let stray = packets6::tcp((REMOTE6, 80), (NAT6, 45678), SYN_ACK, b"");
    assert_eq!(dp.ingress(&stray), (PASS, stray.clone()));
    let ping_the_node = packets6::echo(REMOTE6, NAT6, true, 99, 1);
    assert_eq!(dp.ingress(&ping_the_node), (PASS, ping_the_node.clone()));
    assert!(dp.count(Counter::IngressPassNoMapping) >= 1);
    assert_eq!(
        dp.count(Counter::CreatedTcp) + dp.count(Counter::CreatedUdp),
        0
    );
}

#[test]
fn neighbour_discovery_passes_untouched() {
    let dp = dp("");
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let egress = [
        packets6::neighbour_solicitation(link_local, ROUTER6),
        packets6::neighbour_solicitation(NAT6, ROUTER6),
        packets6::neighbour_advertisement(NAT6, ROUTER6),
    ];
    for f in &egress {
        assert_eq!(dp.egress(f), (PASS, f.clone()), "egress {f:02x?}");
    }
    let ingress = [
        packets6::neighbour_solicitation(ROUTER6, NAT6),
        packets6::neighbour_advertisement(ROUTER6, NAT6),
        packets6::neighbour_solicitation(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2), NAT6),
    ];
    for f in &ingress {
        assert_eq!(dp.ingress(f), (PASS, f.clone()), "ingress {f:02x?}");
    }
    let created = dp.count(Counter::CreatedTcp)
        + dp.count(Counter::CreatedUdp)
        + dp.count(Counter::CreatedIcmp);
    assert_eq!(created, 0);
}

/// Splits the UDP datagram in `frame` (no extension headers) into a first fragment holding the
/// first `first_len` bytes of its UDP packet (a multiple of 8) and a later one with the rest.
fn fragments_of(frame: &[u8], id: u32, first_len: usize) -> (Vec<u8>, Vec<u8>) {
    let ip = ip_part(frame);
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let l4 = &ip[40..];
    let first = packets6::raw(src, dst, nh::UDP, &l4[..first_len]);
    let later = packets6::raw(src, dst, nh::UDP, &l4[first_len..]);
    let offset = u16::try_from(first_len / 8).unwrap();
    (
        with_exts(&first, &[packets6::fragment(0, true, id)]),
        with_exts(&later, &[packets6::fragment(offset, false, id)]),
    )
}

/// The bytes after the fragment header (the fragment's part of the datagram).
fn fragment_data(frame: &[u8]) -> &[u8] {
    &ip_part(frame)[40 + 8..]
}

#[test]
fn fragments_follow_their_first_both_ways() {
    let dp = dp("");
    let payload: Vec<u8> = (0..72u8).collect();
    let datagram = packets6::udp((POD6, 4000), (REMOTE6, 5353), &payload);
    let (first, later) = fragments_of(&datagram, 0x0102_0304, 24);

    let (ret, first_out) = dp.egress(&first);
    assert_eq!(ret, PASS, "{:?}", dp.nonzero());
    let (ret, later_out) = dp.egress(&later);
    assert_eq!(ret, PASS, "{:?}", dp.nonzero());
    assert_eq!(Seen6::parse(&first_out).src(), NAT6);
    assert_eq!(Seen6::parse(&later_out).src(), NAT6);
    assert_eq!(
        fragment_data(&later_out),
        fragment_data(&later),
        "data untouched"
    );
    assert_eq!(dp.count(Counter::EgressTranslatedFragment), 1);
    // Reassembled, the datagram's checksum (in the first fragment) covers the new source.
    let whole = [fragment_data(&first_out), fragment_data(&later_out)].concat();
    assert!(checksum_verifies(NAT6, REMOTE6, nh::UDP, &whole));
    let nat_port = u16::from_be_bytes([whole[0], whole[1]]);

    // A later fragment that overtook its first leaves from the pod's paired NAT IP.
    let (_, lone) = fragments_of(&datagram, 0x0a0b_0c0d, 24);
    assert_eq!(Seen6::parse(&lone).src(), POD6);
    let (ret, lone_out) = dp.egress(&lone);
    assert_eq!(ret, PASS);
    assert_eq!(Seen6::parse(&lone_out).src(), NAT6);

    // The reply, fragmented: both fragments reach the pod.
    let reply = packets6::udp((REMOTE6, 5353), (NAT6, nat_port), &payload);
    let (first, later) = fragments_of(&reply, 0x1111_2222, 24);
    let (ret, first_in) = dp.ingress(&first);
    assert_eq!(ret, PASS);
    let (ret, later_in) = dp.ingress(&later);
    assert_eq!(ret, PASS);
    assert_eq!(Seen6::parse(&first_in).dst(), POD6);
    assert_eq!(Seen6::parse(&later_in).dst(), POD6);
    let whole = [fragment_data(&first_in), fragment_data(&later_in)].concat();
    assert!(checksum_verifies(REMOTE6, POD6, nh::UDP, &whole));
    assert_eq!(u16::from_be_bytes([whole[2], whole[3]]), 4000);
}
