//! `BPF_PROG_TEST_RUN` tests of the XDP reply path (`snat_xdp`, `--ingress xdp`): it must leave
//! every reply exactly as TC ingress leaves it — the same bytes, the same counters, the same
//! state in the mapping — and leave to TC, untouched, the replies whose checksum may be pending
//! offload. Needs root.

use std::net::Ipv4Addr;

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
use snat_common::{flow::proto, Counter, XDP_DONE};
use tests::{
    dp::{Dp, NAT, PASS, POD, REMOTE, ROUTER, XDP_PASS},
    packets::{self, Flags, Seen, Seg, ACK, SYN, SYN_ACK},
};

/// What the pods send first, so the replies below have mappings: the same in both datapaths
/// (every source port lies inside the range, so it is kept; the allocation is deterministic).
fn open_flows(dp: &Dp) {
    for frame in [
        packets::tcp_with(
            (POD, 40000),
            (REMOTE, 80),
            &Seg {
                flags: SYN,
                seq: 100,
                window: 64240,
                wscale: Some(7),
                ..Seg::default()
            },
            b"",
        ),
        packets::tcp_with(
            (POD, 40000),
            (REMOTE, 80),
            &Seg {
                flags: ACK,
                seq: 101,
                ack: 5001,
                window: 500,
                ..Seg::default()
            },
            b"",
        ),
        packets::udp((POD, 40053), (REMOTE, 53), b"query"),
        packets::icmp_echo(POD, REMOTE, true, 40007, 1),
    ] {
        let (ret, _) = dp.egress(&frame);
        assert_eq!(ret, PASS, "{:?}", dp.nonzero());
    }
}

/// Replies of every kind snat handles or passes, and some it must not touch.
fn replies() -> Vec<(&'static str, Vec<u8>)> {
    let syn = packets::tcp((POD, 40000), (REMOTE, 80), SYN, b"");
    let mut translated_syn = syn.clone();
    translated_syn[14 + 12..14 + 16].copy_from_slice(&NAT.octets());
    let udp_out = {
        let mut f = packets::udp((POD, 40053), (REMOTE, 53), b"query");
        f[14 + 12..14 + 16].copy_from_slice(&NAT.octets());
        f
    };
    let mut arp = packets::udp((REMOTE, 1), (NAT, 2), b"x");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let short_tcp = {
        let mut f = packets::tcp((REMOTE, 80), (NAT, 40000), ACK, b"");
        f.truncate(14 + 20 + 10);
        f[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        f
    };
    vec![
        (
            "syn-ack",
            packets::tcp_with(
                (REMOTE, 80),
                (NAT, 40000),
                &Seg {
                    flags: SYN_ACK,
                    seq: 5000,
                    ack: 101,
                    window: 65535,
                    wscale: Some(7),
                },
                b"",
            ),
        ),
        (
            "data",
            packets::tcp((REMOTE, 80), (NAT, 40000), ACK, b"HTTP/1.0 200 OK\r\n"),
        ),
        (
            "fin in window",
            packets::tcp_with(
                (REMOTE, 80),
                (NAT, 40000),
                &Seg {
                    flags: Flags {
                        fin: true,
                        ack: true,
                        ..Flags::default()
                    },
                    seq: 5001,
                    ack: 101,
                    window: 65535,
                    wscale: None,
                },
                b"",
            ),
        ),
        (
            "rst out of window",
            packets::tcp_with(
                (REMOTE, 80),
                (NAT, 40000),
                &Seg {
                    flags: Flags {
                        rst: true,
                        ..Flags::default()
                    },
                    seq: 3_000_000_000,
                    ..Seg::default()
                },
                b"",
            ),
        ),
        ("udp", packets::udp((REMOTE, 53), (NAT, 40053), b"answer")),
        (
            "udp without checksum, other port",
            packets::udp_no_checksum((REMOTE, 5353), (NAT, 40053), b"answer"),
        ),
        (
            "echo reply",
            packets::icmp_echo(REMOTE, NAT, false, 40007, 1),
        ),
        (
            "time exceeded about tcp",
            packets::icmp_error(
                ROUTER,
                NAT,
                Icmpv4Type::TimeExceeded(
                    etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
                ),
                packets::ip_part(&translated_syn),
            ),
        ),
        (
            "port unreachable about udp",
            packets::icmp_error(
                REMOTE,
                NAT,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
                packets::ip_part(&udp_out),
            ),
        ),
        (
            "not ours",
            packets::udp((REMOTE, 53), (NAT, 41000), b"stray"),
        ),
        (
            "from another address",
            packets::udp((Ipv4Addr::new(203, 0, 113, 99), 53), (NAT, 40053), b"x"),
        ),
        ("not ipv4", arp),
        ("truncated tcp", short_tcp),
    ]
}

#[test]
fn xdp_leaves_every_reply_as_tc_does() {
    let (mut tc, mut xdp) = (Dp::new(""), Dp::new(""));
    open_flows(&tc);
    open_flows(&xdp);
    for (what, frame) in replies() {
        let by_tc = tc.ingress_tc(&frame);
        let by_xdp = xdp.ingress_xdp(&frame);
        assert_eq!(by_xdp, by_tc, "{what}: XDP and TC differ");
        let run = xdp.xdp(&frame);
        assert_eq!(run.action, XDP_PASS, "{what}");
    }
    // The same results, counted once each; TC had nothing left to do after XDP.
    let counts = |dp: &Dp| -> Vec<(Counter, u64)> {
        dp.nonzero()
            .into_iter()
            .filter(|(c, _)| c.labels().0 != "xdp")
            .collect()
    };
    let (by_tc, by_xdp) = (counts(&tc), counts(&xdp));
    // `xdp()` above ran XDP once more on each frame: XDP's results are counted twice there.
    let ingress_once = |v: &[(Counter, u64)]| -> Vec<(Counter, u64)> {
        v.iter()
            .filter(|(c, _)| c.labels().0 == "ingress")
            .copied()
            .collect()
    };
    assert_eq!(
        ingress_once(&by_xdp)
            .iter()
            .map(|(c, n)| (*c, n / 2))
            .collect::<Vec<_>>(),
        ingress_once(&by_tc)
    );
    assert_eq!(xdp.count(Counter::XdpDeferred), 0, "full checksums only");
    assert!(tc.count(Counter::IngressTranslatedIcmpError) == 2);
    // The remote's FIN was recorded in the mapping on both paths.
    let key = packets::flow_key(proto::TCP, (POD, 40000), (REMOTE, 80));
    let t = tc.engine.take_tables().expect("tables");
    let x = xdp.engine.take_tables().expect("tables");
    assert_eq!(
        tests::dp::phase(&x, &key),
        tests::dp::phase(&t, &key),
        "the TCP phase after the same replies"
    );
}

#[test]
fn translated_and_passed_replies_are_marked_for_tc() {
    let dp = Dp::new("");
    open_flows(&dp);
    let run = dp.xdp(&packets::tcp((REMOTE, 80), (NAT, 40000), ACK, b"x"));
    assert_eq!((run.action, run.mark), (XDP_PASS, Some(XDP_DONE)));
    let seen = Seen::parse(&run.frame);
    assert_eq!((seen.dst(), seen.tcp().destination_port), (POD, 40000));
    let run = dp.xdp(&packets::udp((REMOTE, 53), (NAT, 41000), b"not ours"));
    assert_eq!((run.action, run.mark), (XDP_PASS, Some(XDP_DONE)));
    assert_eq!(Seen::parse(&run.frame).dst(), NAT);
    assert_eq!(dp.count(Counter::IngressPassNoMapping), 1);
}

/// A frame whose TCP or UDP checksum field holds what a sender with checksum offload leaves in
/// it (the pseudo-header sum): XDP must not touch it, and must not mark it.
fn pending_offload(mut frame: Vec<u8>, l4_proto: u8) -> Vec<u8> {
    let (src, dst) = (
        <[u8; 4]>::try_from(&frame[14 + 12..14 + 16]).expect("4 bytes"),
        <[u8; 4]>::try_from(&frame[14 + 16..14 + 20]).expect("4 bytes"),
    );
    let len = (frame.len() - 14 - 20) as u16;
    let at = 14 + 20 + if l4_proto == proto::TCP { 16 } else { 6 };
    let partial = snat_common::csum::pseudo_header_fold(src, dst, l4_proto, len);
    frame[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    frame
}

#[test]
fn replies_with_checksums_pending_offload_are_left_to_tc_untouched() {
    let dp = Dp::new("");
    open_flows(&dp);
    for (frame, p) in [
        (
            pending_offload(
                packets::tcp((REMOTE, 80), (NAT, 40000), ACK, b"offloaded"),
                proto::TCP,
            ),
            proto::TCP,
        ),
        (
            pending_offload(
                packets::udp((REMOTE, 53), (NAT, 40053), b"offloaded"),
                proto::UDP,
            ),
            proto::UDP,
        ),
    ] {
        let run = dp.xdp(&frame);
        assert_eq!(run.action, XDP_PASS, "proto {p}");
        assert_ne!(run.mark, Some(XDP_DONE), "proto {p}: TC must decide it");
        assert_eq!(run.frame, frame, "proto {p}: untouched");
        // TC translates it (in the kernel its helpers keep the pending checksum right).
        let (ret, out) = dp.ingress_tc(&run.frame);
        assert_eq!(ret, PASS);
        assert_eq!(&out[14 + 16..14 + 20], &POD.octets());
    }
    assert_eq!(dp.count(Counter::XdpDeferred), 2);
    assert_eq!(dp.count(Counter::IngressTranslatedTcp), 1);
    assert_eq!(dp.count(Counter::IngressTranslatedUdp), 1);
}
