//! Crafted frames for `BPF_PROG_TEST_RUN` tests, and an independent check of what comes out.
//!
//! Frames are built and parsed with etherparse, so checksums are verified by code that shares
//! nothing with snat's own checksum arithmetic.

use std::net::Ipv4Addr;

use snat_common::FlowKey;

use etherparse::{
    Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders,
    TcpHeader, TcpOptionElement, TransportHeader, UdpHeader,
};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// The forward key (`SNAT_FWD`) the datapath gives a flow of `proto` from `src` to `dst` (frames
/// from [`tcp`] or [`udp`]; for an echo, `src.1` is its identifier): the remote port only for TCP.
pub fn flow_key(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey::new(
        proto,
        src.0.octets(),
        src.1.to_be_bytes(),
        dst.0.octets(),
        FlowKey::remote_port_for(proto, dst.1.to_be_bytes()),
    )
}

/// TCP header flags for [`tcp`].
#[derive(Clone, Copy, Default)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};

pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: Flags, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    if flags.syn {
        b = b.syn();
    }
    if flags.ack {
        b = b.ack(1);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("building a TCP frame");
    out
}

pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("building a UDP frame");
    out
}

/// A UDP frame whose checksum field is 0 ("no checksum").
pub fn udp_no_checksum(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut f = udp(src, dst, payload);
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.octets(), dst.octets(), 64);
    let b = if request {
        b.icmpv4_echo_request(id, seq)
    } else {
        b.icmpv4_echo_reply(id, seq)
    };
    b.write(&mut out, b"abcdefgh01234567")
        .expect("building an echo frame");
    out
}

/// An ICMP error (`icmp_type`, code) from `src` to `dst` quoting `quoted` (an IPv4 packet,
/// without Ethernet header).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(icmp_type)
        .write(&mut out, quoted)
        .expect("building an ICMP error frame");
    out
}

/// The IPv4 packet inside an Ethernet frame.
pub fn ip_part(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

/// What a frame holds, with every checksum verified independently.
#[derive(Debug)]
pub struct Seen {
    pub ip: Ipv4Header,
    pub transport: TransportHeader,
    pub payload: Vec<u8>,
}

impl Seen {
    /// Parses `frame` and asserts its IPv4 and L4 checksums are right (a UDP checksum of 0 is
    /// accepted as "none").
    pub fn parse(frame: &[u8]) -> Self {
        let h = PacketHeaders::from_ethernet_slice(frame).expect("parsing the frame");
        let Some(NetHeaders::Ipv4(ip, _)) = h.net else {
            panic!("not IPv4: {h:?}")
        };
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "IPv4 header checksum"
        );
        let payload = h.payload.slice().to_vec();
        let transport = h.transport.expect("a transport header");
        match &transport {
            TransportHeader::Tcp(t) => {
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv4(&ip, &payload).unwrap(),
                    "TCP checksum"
                );
            }
            TransportHeader::Udp(u) => {
                if u.checksum != 0 {
                    assert_eq!(
                        u.checksum,
                        u.calc_checksum_ipv4(&ip, &payload).unwrap(),
                        "UDP checksum"
                    );
                }
            }
            TransportHeader::Icmpv4(i) => {
                let expect = Icmpv4Header::with_checksum(i.icmp_type.clone(), &payload);
                assert_eq!(i.checksum, expect.checksum, "ICMP checksum");
            }
            TransportHeader::Icmpv6(_) => panic!("ICMPv6 in IPv4"),
        }
        Self {
            ip,
            transport,
            payload,
        }
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip.source)
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip.destination)
    }

    pub fn tcp(&self) -> &TcpHeader {
        match &self.transport {
            TransportHeader::Tcp(t) => t,
            other => panic!("not TCP: {other:?}"),
        }
    }

    pub fn udp(&self) -> &UdpHeader {
        match &self.transport {
            TransportHeader::Udp(u) => u,
            other => panic!("not UDP: {other:?}"),
        }
    }

    pub fn icmp(&self) -> &Icmpv4Header {
        match &self.transport {
            TransportHeader::Icmpv4(i) => i,
            other => panic!("not ICMP: {other:?}"),
        }
    }
}

/// The packet quoted by an ICMP error, with its IPv4 checksum verified.
pub fn quoted(seen: &Seen) -> (Ipv4Header, Vec<u8>) {
    let (ip, rest) = Ipv4Header::from_slice(&seen.payload).expect("quoted IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "quoted IPv4 header checksum"
    );
    (ip, rest.to_vec())
}

/// Verifies the checksum of a complete quoted TCP segment against the quoted IPv4 header.
pub fn assert_quoted_tcp_checksum(ip: &Ipv4Header, l4: &[u8]) -> TcpHeader {
    let (t, payload) = TcpHeader::from_slice(l4).expect("quoted TCP header");
    assert_eq!(ip.protocol, IpNumber::TCP);
    assert_eq!(
        t.checksum,
        t.calc_checksum_ipv4(ip, payload).unwrap(),
        "quoted TCP checksum"
    );
    t
}

/// Verifies the checksum of a complete quoted UDP datagram (0 means none).
pub fn assert_quoted_udp_checksum(ip: &Ipv4Header, l4: &[u8]) -> UdpHeader {
    let (u, payload) = UdpHeader::from_slice(l4).expect("quoted UDP header");
    if u.checksum != 0 {
        assert_eq!(
            u.checksum,
            u.calc_checksum_ipv4(ip, payload).unwrap(),
            "quoted UDP checksum"
        );
    }
    u
}

/// The TCP fields [`tcp_with`] sets beyond the endpoints.
#[derive(Clone, Copy, Default)]
pub struct Seg {
    pub flags: Flags,
    pub seq: u32,
    /// Sent when `flags.ack`.
    pub ack: u32,
    pub window: u16,
    /// A window-scale option (RFC 7323), with MSS and SACK-permitted before it as Linux sends.
    pub wscale: Option<u8>,
}

/// A TCP segment with the sequence and acknowledgement numbers, window and options of `seg`.
pub fn tcp_with(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seg: &Seg, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, seg.seq, seg.window);
    if seg.flags.syn {
        b = b.syn();
    }
    if seg.flags.ack {
        b = b.ack(seg.ack);
    }
    if seg.flags.fin {
        b = b.fin();
    }
    if seg.flags.rst {
        b = b.rst();
    }
    if let Some(scale) = seg.wscale {
        b = b
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(scale),
            ])
            .expect("TCP options");
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("building a TCP frame");
    out
}
