//! Crafted IPv6 frames for `BPF_PROG_TEST_RUN` tests, and an independent check of what comes
//! out.
//!
//! Well-formed frames are built with etherparse (which computes their checksums). What the
//! datapath leaves is parsed and verified here, from scratch: the extension header chain is walked
//! by this file's own code and every TCP, UDP and ICMPv6 checksum is recomputed with this file's
//! own one's complement sum over the RFC 8200 pseudo-header (section 8.1), sharing nothing with
//! etherparse's helpers or snat's incremental arithmetic. Odd frames (extension header chains,
//! ESP, truncated headers) are spliced together by hand.

use std::net::Ipv6Addr;

use etherparse::{Icmpv6Type, PacketBuilder};
use snat_common::Counter;

use crate::packets::Flags;

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Ethernet header length; the IPv6 packet starts here.
pub const ETH: usize = 14;
/// The fixed IPv6 header.
pub const IP6: usize = 40;

/// The pod of the `BPF_PROG_TEST_RUN` tests, inside [`DP_EXTRA`]'s internal `fd00:10::/64`.
pub const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
/// Another pod of the same internal CIDR.
pub const POD6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 3);
/// The IPv6 NAT IP given in [`DP_EXTRA`] (the standard topology's uplink address).
pub const NAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The router in front of the node.
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// A server on the internet side.
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

/// What `Dp::new` is given on top of its IPv4 settings to translate IPv6 too.
pub const DP_EXTRA: &str = "--internal fd00:10::/64 --nat-ip 2001:db8:1::1";

/// Next-header numbers.
pub mod nh {
    pub const HOP_BY_HOP: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT: u8 = 59;
    pub const DEST_OPTS: u8 = 60;
}

// ---------------------------------------------------------------------------------------------
// Counters that arrive with the datapath's IPv6 part: the one place the suites name them.
//
// `Counter::EgressDropExtHeaders`: an internal packet dropped because its extension header chain
// cannot be walked (ESP, AH, a routing header with segments left, too many headers). Without the
// NAT66 datapath's snat_common this function (and so the IPv6 suites) does not compile.
// ---------------------------------------------------------------------------------------------

/// `Counter::EgressDropExtHeaders`.
pub fn egress_drop_ext_headers() -> Counter {
    Counter::EgressDropExtHeaders
}

// ---------------------------------------------------------------------------------------------
// Checksums, from scratch.
// ---------------------------------------------------------------------------------------------

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to `acc`, without
/// folding: a u64 does not overflow for any packet.
pub fn sum16(data: &[u8], acc: u64) -> u64 {
    let mut s = acc;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        s += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        s += u64::from(*last) << 8;
    }
    s
}

/// Folds a sum into 16 bits with end-around carry (one's complement addition).
pub fn fold16(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The RFC 8200 (8.1) pseudo-header: source, destination, upper-layer packet length (32 bits),
/// three zero bytes and the next header.
pub fn pseudo_header_sum(src: Ipv6Addr, dst: Ipv6Addr, upper_len: u32, next_header: u8) -> u64 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&upper_len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next_header]);
    sum16(&p, 0)
}

/// Whether the upper-layer packet `l4` (its checksum field included) verifies for `src` → `dst`:
/// the one's complement sum over pseudo-header and packet is all ones.
pub fn checksum_verifies(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> bool {
    let pseudo = pseudo_header_sum(src, dst, l4.len() as u32, next_header);
    fold16(sum16(l4, pseudo)) == 0xffff
}

/// The checksum field `l4` needs (its checksum field must hold zero): the one's complement of the
/// one's complement sum. (UDP then sends 0 as 0xffff; this returns the plain value.)
pub fn checksum_of(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> u16 {
    let pseudo = pseudo_header_sum(src, dst, l4.len() as u32, next_header);
    !fold16(sum16(l4, pseudo))
}

/// Offset of the checksum field in an upper-layer header of `next_header`.
fn checksum_offset(next_header: u8) -> Option<usize> {
    match next_header {
        nh::TCP => Some(16),
        nh::UDP => Some(6),
        nh::ICMPV6 => Some(2),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Building frames.
// ---------------------------------------------------------------------------------------------

fn builder(src: Ipv6Addr, dst: Ipv6Addr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src.octets(), dst.octets(), 64)
}

/// A TCP segment (sequence 1000, window 64240; with `flags.ack`, acknowledging 1).
pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: Flags, payload: &[u8]) -> Vec<u8> {
    let mut b = builder(src.0, dst.0).tcp(src.1, dst.1, 1000, 64240);
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

pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src.0, dst.0)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("building a UDP frame");
    out
}

/// A UDP datagram whose checksum field is 0: "no checksum", which IPv6 does not allow.
pub fn udp_zero_checksum(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut f = udp(src, dst, payload);
    f[ETH + IP6 + 6..ETH + IP6 + 8].copy_from_slice(&[0, 0]);
    f
}

/// An ICMPv6 echo request (128) or reply (129) with a 16-byte payload.
pub fn echo(src: Ipv6Addr, dst: Ipv6Addr, request: bool, id: u16, seq: u16) -> Vec<u8> {
    let b = builder(src, dst);
    let b = if request {
        b.icmpv6_echo_request(id, seq)
    } else {
        b.icmpv6_echo_reply(id, seq)
    };
    let mut out = Vec::new();
    b.write(&mut out, b"abcdefgh01234567")
        .expect("building an echo frame");
    out
}

/// An ICMPv6 message of `icmp_type`/`code` with `rest` as its bytes 4..8 (the MTU of a packet
/// too big, the pointer of a parameter problem, else unused), followed by `body` (for an error,
/// the invoking IPv6 packet, without Ethernet header).
pub fn icmp(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: icmp_type,
            code_u8: code,
            bytes5to8: rest,
        })
        .write(&mut out, body)
        .expect("building an ICMPv6 frame");
    out
}

/// ICMPv6 error types.
pub mod icmp6 {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAMETER_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    pub const NEIGHBOUR_SOLICITATION: u8 = 135;
    pub const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
    /// Destination unreachable: port unreachable.
    pub const CODE_PORT_UNREACHABLE: u8 = 4;
}

/// An ICMPv6 error quoting `quoted` (an IPv6 packet without Ethernet header).
pub fn icmp_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    icmp(src, dst, icmp_type, code, rest, quoted)
}

/// A Packet Too Big with `mtu`, quoting `quoted`.
pub fn packet_too_big(src: Ipv6Addr, dst: Ipv6Addr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    icmp(
        src,
        dst,
        icmp6::PACKET_TOO_BIG,
        0,
        mtu.to_be_bytes(),
        quoted,
    )
}

/// The solicited-node multicast address of `target` (ff02::1:ffXX:XXXX).
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    let mut o = [0u8; 16];
    o[0] = 0xff;
    o[1] = 0x02;
    o[11] = 0x01;
    o[12] = 0xff;
    o[13..].copy_from_slice(&t[13..]);
    Ipv6Addr::from(o)
}

/// A neighbour solicitation from `src` for `target`, to its solicited-node address, hop limit
/// 255, with a source link-layer address option.
pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(target);
    let d = dst.octets();
    let mac = [0x33, 0x33, d[12], d[13], d[14], d[15]];
    let mut body = target.octets().to_vec();
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&MAC_A);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, mac)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: icmp6::NEIGHBOUR_SOLICITATION,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, &body)
        .expect("building a neighbour solicitation");
    out
}

/// A solicited neighbour advertisement from `src` (for its own address) to `dst`, hop limit 255,
/// with a target link-layer address option.
pub fn neighbour_advertisement(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut body = src.octets().to_vec();
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&MAC_A);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: icmp6::NEIGHBOUR_ADVERTISEMENT,
            code_u8: 0,
            // Solicited and override.
            bytes5to8: [0x60, 0, 0, 0],
        })
        .write(&mut out, &body)
        .expect("building a neighbour advertisement");
    out
}

/// An IPv6 frame with next header `next_header` and `payload` as is (no checksum computed): ESP,
/// unknown protocols, truncated transport headers.
pub fn raw(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH + IP6 + payload.len());
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next_header, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// An extension header to splice in with [`with_exts`]: its type and the bytes after its first
/// two (next header, length), which [`with_exts`] fills in.
#[derive(Clone, Debug)]
pub struct Ext {
    pub kind: u8,
    pub body: Vec<u8>,
}

/// A hop-by-hop options header holding one PadN option (8 bytes in all).
pub fn hop_by_hop() -> Ext {
    Ext {
        kind: nh::HOP_BY_HOP,
        body: vec![1, 4, 0, 0, 0, 0],
    }
}

/// A destination options header of 16 bytes: an unknown option whose type's top bits say "skip
/// it" (0x1e), then PadN.
pub fn dest_opts() -> Ext {
    Ext {
        kind: nh::DEST_OPTS,
        body: vec![0x1e, 4, 0xde, 0xad, 0xbe, 0xef, 1, 6, 0, 0, 0, 0, 0, 0],
    }
}

/// A segment routing header (routing type 4) listing `segments` (the last one first, as RFC 8754
/// stores them) with `segments_left`.
pub fn routing(segments_left: u8, segments: &[Ipv6Addr]) -> Ext {
    let mut body = vec![
        4,
        segments_left,
        segments.len().saturating_sub(1) as u8,
        0,
        0,
        0,
    ];
    for s in segments {
        body.extend_from_slice(&s.octets());
    }
    Ext {
        kind: nh::ROUTING,
        body,
    }
}

/// An authentication header with a 12-byte ICV (24 bytes in all).
pub fn auth() -> Ext {
    let mut body = vec![0, 0];
    body.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // SPI
    body.extend_from_slice(&1u32.to_be_bytes()); // sequence
    body.extend_from_slice(&[0xa5; 12]); // ICV
    Ext { kind: nh::AH, body }
}

/// A fragment header: `offset` in 8-byte units, `more` fragments, identification `id`.
pub fn fragment(offset: u16, more: bool, id: u32) -> Ext {
    let mut body = ((offset << 3) | u16::from(more)).to_be_bytes().to_vec();
    body.extend_from_slice(&id.to_be_bytes());
    Ext {
        kind: nh::FRAGMENT,
        body,
    }
}

/// `frame` (an IPv6 frame without extension headers) with `exts` inserted, in order, between its
/// fixed header and its upper-layer packet: next headers chained, lengths and the payload length
/// set. The upper-layer checksum stays as it was (right, unless a routing header with segments
/// left changes the final destination).
pub fn with_exts(frame: &[u8], exts: &[Ext]) -> Vec<u8> {
    assert_eq!(frame[12..14], [0x86, 0xdd], "an IPv6 frame");
    let last = frame[ETH + 6];
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(last, |n| n.kind);
        let total = 2 + e.body.len();
        let len = match e.kind {
            nh::AH => {
                assert_eq!(total % 8, 0, "AH is a multiple of 8 bytes in IPv6");
                total / 4 - 2
            }
            nh::FRAGMENT => {
                assert_eq!(total, 8, "a fragment header is 8 bytes");
                0
            }
            _ => {
                assert_eq!(total % 8, 0, "extension header of {total} bytes");
                total / 8 - 1
            }
        };
        chain.push(next);
        chain.push(u8::try_from(len).expect("extension header length"));
        chain.extend_from_slice(&e.body);
    }
    let mut out = frame[..ETH + IP6].to_vec();
    if let Some(first) = exts.first() {
        out[ETH + 6] = first.kind;
    }
    let plen = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]) as usize + chain.len();
    out[ETH + 4..ETH + 6].copy_from_slice(&(plen as u16).to_be_bytes());
    out.extend_from_slice(&chain);
    out.extend_from_slice(&frame[ETH + IP6..]);
    out
}

/// The IPv6 packet inside an Ethernet frame.
pub fn ip_part(frame: &[u8]) -> &[u8] {
    &frame[ETH..]
}

// ---------------------------------------------------------------------------------------------
// Parsing and checking what comes out.
// ---------------------------------------------------------------------------------------------

/// An extension header found by [`walk`]: its type, offset and length in the IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtAt {
    pub kind: u8,
    pub at: usize,
    pub len: usize,
}

/// Walks the extension header chain of the IPv6 packet `ip` (hop-by-hop, routing, fragment,
/// destination options, AH; at most 16 of them): the headers, the upper-layer protocol and its
/// offset, or `None` if a header runs past the end of `ip` or the chain is longer.
pub fn walk(ip: &[u8]) -> Option<(Vec<ExtAt>, u8, usize)> {
    if ip.len() < IP6 {
        return None;
    }
    let (mut next, mut at, mut exts) = (ip[6], IP6, Vec::new());
    for _ in 0..16 {
        let len = match next {
            nh::HOP_BY_HOP | nh::ROUTING | nh::DEST_OPTS => (usize::from(*ip.get(at + 1)?) + 1) * 8,
            nh::FRAGMENT => 8,
            nh::AH => (usize::from(*ip.get(at + 1)?) + 2) * 4,
            _ => return Some((exts, next, at)),
        };
        if at + len > ip.len() {
            return None;
        }
        exts.push(ExtAt {
            kind: next,
            at,
            len,
        });
        next = ip[at];
        at += len;
    }
    None
}

fn addr_at(ip: &[u8], at: usize) -> Ipv6Addr {
    let o: [u8; 16] = ip[at..at + 16].try_into().expect("16 bytes");
    Ipv6Addr::from(o)
}

/// Whether `a` is in `fd00:10::/48`, the pods' space of the namespace tests.
pub fn is_pod6(a: Ipv6Addr) -> bool {
    a.segments()[..3] == [0xfd00, 0x10, 0]
}

/// An IPv6 packet as it came out of the datapath (or as an ICMPv6 error quotes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen6 {
    /// The IPv6 packet, without Ethernet header.
    pub ip: Vec<u8>,
    pub exts: Vec<ExtAt>,
    /// The upper-layer protocol after the extension headers.
    pub proto: u8,
    /// Offset of the upper-layer header in `ip`.
    pub l4_at: usize,
}

impl Seen6 {
    /// Parses an Ethernet frame holding a whole IPv6 packet and asserts it is sound: IPv6
    /// ethertype and version, a payload length that matches the frame, a chain that walks, and a
    /// valid TCP, UDP (never 0) or ICMPv6 checksum (unless the packet is a fragment).
    pub fn parse(frame: &[u8]) -> Self {
        assert!(frame.len() >= ETH + IP6, "frame too short: {frame:02x?}");
        assert_eq!(frame[12..14], [0x86, 0xdd], "not IPv6: {frame:02x?}");
        let ip = &frame[ETH..];
        assert_eq!(ip[0] >> 4, 6, "IP version");
        let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        assert_eq!(IP6 + plen, ip.len(), "payload length vs. frame length");
        let seen = Self::parse_ip(ip);
        seen.assert_checksum();
        seen
    }

    /// Parses an IPv6 packet, complete or not (a quote), without checking checksums.
    pub fn parse_ip(ip: &[u8]) -> Self {
        let (exts, proto, l4_at) =
            walk(ip).unwrap_or_else(|| panic!("extension headers do not walk: {ip:02x?}"));
        Self {
            ip: ip.to_vec(),
            exts,
            proto,
            l4_at,
        }
    }

    /// Whether the packet is complete (its payload length covers exactly what is here).
    pub fn complete(&self) -> bool {
        IP6 + usize::from(u16::from_be_bytes([self.ip[4], self.ip[5]])) == self.ip.len()
    }

    /// Whether a fragment header is in the chain.
    pub fn fragmented(&self) -> bool {
        self.exts.iter().any(|e| e.kind == nh::FRAGMENT)
    }

    /// Whether the upper-layer checksum verifies (from scratch), for a complete unfragmented TCP,
    /// UDP or ICMPv6 packet; `None` for anything else.
    pub fn checksum_ok(&self) -> Option<bool> {
        checksum_offset(self.proto)?;
        if !self.complete() || self.fragmented() {
            return None;
        }
        Some(checksum_verifies(
            self.src(),
            self.dst(),
            self.proto,
            self.l4(),
        ))
    }

    /// Asserts the upper-layer checksum verifies, and that a UDP checksum is not 0.
    pub fn assert_checksum(&self) {
        if self.proto == nh::UDP && !self.fragmented() {
            assert_ne!(
                self.checksum(),
                0,
                "a UDP checksum of 0 in IPv6: {self:02x?}"
            );
        }
        if let Some(ok) = self.checksum_ok() {
            assert!(
                ok,
                "{} checksum {:#06x} does not verify (should be {:#06x}): {:02x?}",
                proto_name(self.proto),
                self.checksum(),
                self.expected_checksum(),
                self.ip
            );
        }
    }

    /// The checksum this packet's upper layer should carry, computed from scratch.
    pub fn expected_checksum(&self) -> u16 {
        let at = checksum_offset(self.proto).expect("a protocol with a checksum");
        let mut l4 = self.l4().to_vec();
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        checksum_of(self.src(), self.dst(), self.proto, &l4)
    }

    pub fn src(&self) -> Ipv6Addr {
        addr_at(&self.ip, 8)
    }

    pub fn dst(&self) -> Ipv6Addr {
        addr_at(&self.ip, 24)
    }

    pub fn hop_limit(&self) -> u8 {
        self.ip[7]
    }

    /// The upper-layer packet (as much of it as is here).
    pub fn l4(&self) -> &[u8] {
        &self.ip[self.l4_at..]
    }

    /// The extension headers' bytes, as they are.
    pub fn ext_bytes(&self) -> &[u8] {
        &self.ip[IP6..self.l4_at]
    }

    fn be16(&self, at: usize) -> u16 {
        let l4 = self.l4();
        u16::from_be_bytes([l4[at], l4[at + 1]])
    }

    /// The upper layer's checksum field.
    pub fn checksum(&self) -> u16 {
        self.be16(checksum_offset(self.proto).expect("a protocol with a checksum"))
    }

    /// TCP or UDP (source, destination) ports.
    pub fn ports(&self) -> (u16, u16) {
        assert!(
            matches!(self.proto, nh::TCP | nh::UDP),
            "not TCP or UDP: {}",
            self.proto
        );
        (self.be16(0), self.be16(2))
    }

    pub fn sport(&self) -> u16 {
        self.ports().0
    }

    pub fn dport(&self) -> u16 {
        self.ports().1
    }

    /// TCP flags byte.
    pub fn tcp_flags(&self) -> u8 {
        assert_eq!(self.proto, nh::TCP);
        self.l4()[13]
    }

    /// What follows the TCP, UDP or ICMPv6 header (8 bytes for ICMPv6: type, code, checksum,
    /// and the four bytes of [`Seen6::icmp_rest`]).
    pub fn payload(&self) -> &[u8] {
        let l4 = self.l4();
        match self.proto {
            nh::TCP => &l4[usize::from(l4[12] >> 4) * 4..],
            nh::UDP | nh::ICMPV6 => &l4[8..],
            other => panic!("no payload for protocol {other}"),
        }
    }

    pub fn icmp_type(&self) -> u8 {
        assert_eq!(self.proto, nh::ICMPV6, "not ICMPv6");
        self.l4()[0]
    }

    pub fn icmp_code(&self) -> u8 {
        assert_eq!(self.proto, nh::ICMPV6, "not ICMPv6");
        self.l4()[1]
    }

    /// Bytes 4..8 of the ICMPv6 message.
    pub fn icmp_rest(&self) -> [u8; 4] {
        assert_eq!(self.proto, nh::ICMPV6, "not ICMPv6");
        self.l4()[4..8].try_into().expect("4 bytes")
    }

    /// An echo's (identifier, sequence).
    pub fn echo(&self) -> (u16, u16) {
        assert!(matches!(
            self.icmp_type(),
            icmp6::ECHO_REQUEST | icmp6::ECHO_REPLY
        ));
        (self.be16(4), self.be16(6))
    }

    /// A packet too big's MTU.
    pub fn mtu(&self) -> u32 {
        assert_eq!(self.icmp_type(), icmp6::PACKET_TOO_BIG);
        u32::from_be_bytes(self.icmp_rest())
    }

    /// The packet an ICMPv6 error quotes.
    pub fn quote(&self) -> Seen6 {
        assert!(self.icmp_type() < 128, "not an ICMPv6 error");
        Seen6::parse_ip(self.payload())
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        nh::TCP => "TCP",
        nh::UDP => "UDP",
        nh::ICMPV6 => "ICMPv6",
        _ => "upper-layer",
    }
}

/// The pod address (in `fd00:10::/48`) an IPv6 packet as captured (`ip`, possibly cut short)
/// carries as its source, or as the source or destination of the packet an ICMPv6 error quotes.
pub fn pod_address_in(ip: &[u8]) -> Option<Ipv6Addr> {
    if ip.len() < IP6 {
        return None;
    }
    let src = addr_at(ip, 8);
    if is_pod6(src) {
        return Some(src);
    }
    let (_, proto, at) = walk(ip)?;
    let is_error = proto == nh::ICMPV6 && ip.get(at).is_some_and(|&t| t < 128);
    let q = at + 8;
    if !is_error || ip.len() < q + IP6 {
        return None;
    }
    [addr_at(ip, q + 8), addr_at(ip, q + 24)]
        .into_iter()
        .find(|&a| is_pod6(a))
}
