//! IPv6 header parsing and checksum arithmetic for IPv6 source NAT (NAT66): the pure half of the
//! datapath that will translate pods' IPv6 flows as it translates their IPv4 ones.
//!
//! What differs from IPv4, and where it is handled:
//! - The fixed header ([`Ipv6Fixed`], RFC 8200 "Internet Protocol, Version 6 (IPv6)
//!   Specification" §3) has no checksum and no options; extension headers (§4) may sit between it
//!   and the upper-layer header. [`step`] classifies one of them from its first 8 bytes, so the
//!   kernel side can walk the chain in a loop of [`MAX_EXT_HEADERS`] + 1 rounds; [`walk`] is that
//!   loop over a slice, for userspace and tests, and the reference the kernel loop must match.
//! - TCP, UDP and ICMPv6 checksums all cover a pseudo-header of both addresses, the upper-layer
//!   length (32 bits) and the next header (§8.1), so changing an address changes all three
//!   ([`rewrite_l4_v6`]); ICMPv6 (RFC 4443 "Internet Control Message Protocol (ICMPv6) for the
//!   Internet Protocol Version 6 (IPv6) Specification" §2.3) also has the echo identifier in its
//!   body. A UDP checksum of 0 is invalid in IPv6 (§8.1): updates never produce it
//!   ([`replace128_udp`]), and a received 0 is the caller's to drop.
//! - An ICMPv6 error quotes the packet it is about after 8 bytes of its own header
//!   ([`icmp6::QUOTE_OFFSET`]); [`icmp6::quoted_flow`] reads the flow of a quote without extension
//!   headers.
//!
//! Invariants: everything the kernel side calls ([`Ipv6Fixed::parse`], [`step`], the `replace*`,
//! `rewrite*`, `pseudo_header_fold_v6`, `may_be_partial_v6` and [`icmp6`] functions) is
//! `#[inline(always)]`, loop-free and panic-free, and takes fixed-size arrays read from the
//! packet, never slices of it. [`walk`], [`pseudo_header_sum_v6`] and [`checksum_v6`] take slices
//! and are for userspace and tests. Words are 16-bit values read big-endian from the packet, as in
//! [`crate::csum`].

use crate::csum::{fold, fold_full, sum};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// The version field of an IPv6 header.
pub const VERSION: u8 = 6;
/// Extension headers [`walk`] steps through before the upper-layer header, at most. RFC 8200
/// §4.1's order gives a packet at most five of the kinds [`step`] walks (hop-by-hop, destination
/// options, routing, fragment, destination options again); a longer chain is refused, not walked.
pub const MAX_EXT_HEADERS: usize = 6;

/// Next Header values: IP protocol numbers (IANA "Assigned Internet Protocol Numbers") and the
/// extension headers of RFC 8200 §4 and IANA "IPv6 Extension Header Types".
pub mod next_header {
    /// Hop-by-hop options (RFC 8200 §4.3).
    pub const HOPOPTS: u8 = 0;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// Routing header (RFC 8200 §4.4).
    pub const ROUTING: u8 = 43;
    /// Fragment header (RFC 8200 §4.5).
    pub const FRAGMENT: u8 = 44;
    /// Encapsulating Security Payload (RFC 4303): the rest is encrypted.
    pub const ESP: u8 = 50;
    /// Authentication Header (RFC 4302): covers the addresses, so NAT breaks it anyway.
    pub const AH: u8 = 51;
    /// ICMPv6 (RFC 4443).
    pub const ICMPV6: u8 = 58;
    /// No next header (RFC 8200 §4.7): nothing follows.
    pub const NONE: u8 = 59;
    /// Destination options (RFC 8200 §4.6).
    pub const DSTOPTS: u8 = 60;
    /// Mobility header (RFC 6275).
    pub const MOBILITY: u8 = 135;
    /// Host Identity Protocol (RFC 7401).
    pub const HIP: u8 = 139;
    /// Shim6 (RFC 5533).
    pub const SHIM6: u8 = 140;
    /// Reserved for experimentation and testing (RFC 3692, RFC 4727).
    pub const EXPERIMENT_1: u8 = 253;
    /// Reserved for experimentation and testing (RFC 3692, RFC 4727).
    pub const EXPERIMENT_2: u8 = 254;
}

/// ICMPv6 message types (RFC 4443 §2.1) and the reading of an error's quote.
pub mod icmp6 {
    use super::{next_header, Ipv6Fixed, HEADER_LEN, VERSION};

    /// Destination unreachable (error).
    pub const DEST_UNREACH: u8 = 1;
    /// Packet too big (error; path MTU discovery, RFC 8201).
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded (error).
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem (error).
    pub const PARAM_PROBLEM: u8 = 4;
    /// Echo request: identifier at bytes 4..6 of the message.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply: identifier at bytes 4..6 of the message.
    pub const ECHO_REPLY: u8 = 129;
    /// Multicast listener query (RFC 2710, RFC 3810).
    pub const MLD_QUERY: u8 = 130;
    /// Multicast listener report, version 1 (RFC 2710).
    pub const MLD_REPORT: u8 = 131;
    /// Multicast listener done (RFC 2710).
    pub const MLD_DONE: u8 = 132;
    /// Router solicitation (RFC 4861).
    pub const ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement (RFC 4861).
    pub const ROUTER_ADVERT: u8 = 134;
    /// Neighbour solicitation (RFC 4861).
    pub const NEIGHBOUR_SOLICIT: u8 = 135;
    /// Neighbour advertisement (RFC 4861).
    pub const NEIGHBOUR_ADVERT: u8 = 136;
    /// Redirect (RFC 4861).
    pub const REDIRECT: u8 = 137;
    /// Multicast listener report, version 2 (RFC 3810).
    pub const MLD_V2_REPORT: u8 = 143;

    /// Offset of the quoted packet in an error message: type, code, checksum and 4 bytes (unused,
    /// MTU or pointer) come first (RFC 4443 §3).
    pub const QUOTE_OFFSET: usize = 8;

    /// Error types whose body quotes the packet that caused them (RFC 4443 §3): the ones whose
    /// quote snat translates. Types 0..=127 are all errors, but only these four are defined.
    #[inline(always)]
    pub const fn is_error(t: u8) -> bool {
        matches!(
            t,
            DEST_UNREACH | PACKET_TOO_BIG | TIME_EXCEEDED | PARAM_PROBLEM
        )
    }

    /// Neighbour discovery (RFC 4861 §4): link-local control, never translated.
    #[inline(always)]
    pub const fn is_neighbour_discovery(t: u8) -> bool {
        matches!(t, ROUTER_SOLICIT..=REDIRECT)
    }

    /// Multicast listener discovery (RFC 2710, RFC 3810): link-local control, never translated.
    #[inline(always)]
    pub const fn is_mld(t: u8) -> bool {
        matches!(t, MLD_QUERY..=MLD_DONE | MLD_V2_REPORT)
    }

    /// The flow of the packet an ICMPv6 error quotes, as far as snat needs it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct QuotedFlow {
        pub src: [u8; 16],
        pub dst: [u8; 16],
        /// [`next_header::TCP`], [`next_header::UDP`] or [`next_header::ICMPV6`].
        pub proto: u8,
        /// TCP/UDP source port; for ICMPv6 echo both ports hold the identifier, as the IPv4
        /// datapath's quotes do.
        pub sport: [u8; 2],
        pub dport: [u8; 2],
    }

    /// The flow quoted by an ICMPv6 error whose body (from [`QUOTE_OFFSET`]) starts with `ip`,
    /// the quoted fixed header, and `l4`, the first 8 bytes after it: a TCP or UDP packet, or an
    /// ICMPv6 echo request or reply.
    ///
    /// `None` when the quote is not IPv6 or its fixed header is followed by anything else —
    /// including any extension header: such a quote's ports are further in, past a chain the
    /// caller would have to walk inside the quote. Errors about packets with extension headers are
    /// rare (pods' TCP, UDP and ping carry none; a fragmented UDP datagram's Packet Too Big is
    /// the likely one), so the datapath leaves them untranslated instead. An ICMPv6 error never
    /// quotes another error (RFC 4443 §2.4 (e)), so other ICMPv6 types give `None` too.
    #[inline(always)]
    pub const fn quoted_flow(ip: &[u8; HEADER_LEN], l4: &[u8; 8]) -> Option<QuotedFlow> {
        let h = Ipv6Fixed::parse(ip);
        if h.version != VERSION {
            return None;
        }
        let [s0, s1, d0, d1, _, _, _, _] = *l4;
        let (sport, dport) = match h.next_header {
            next_header::TCP | next_header::UDP => ([s0, s1], [d0, d1]),
            next_header::ICMPV6 if s0 == ECHO_REQUEST || s0 == ECHO_REPLY => {
                let [_, _, _, _, id0, id1, _, _] = *l4;
                ([id0, id1], [id0, id1])
            }
            _ => return None,
        };
        Some(QuotedFlow {
            src: h.src,
            dst: h.dst,
            proto: h.next_header,
            sport,
            dport,
        })
    }
}

/// The fields of the fixed IPv6 header snat reads (RFC 8200 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Fixed {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The first extension header, or the upper-layer protocol.
    pub next_header: u8,
    /// Bytes after the fixed header (extension headers included). 0 for a jumbogram (RFC 2675),
    /// and Linux's BIG TCP packets over 64 KiB may carry 0 too: a caller that needs the length
    /// must then take it from the packet itself, or leave such a packet alone.
    pub payload_len: u16,
    pub hop_limit: u8,
    /// 6 for IPv6; the caller checks it.
    pub version: u8,
}

impl Ipv6Fixed {
    /// Reads the fixed header `h` (the first [`HEADER_LEN`] bytes of the packet).
    #[inline(always)]
    pub const fn parse(h: &[u8; HEADER_LEN]) -> Self {
        let [vtc, _, _, _, len_hi, len_lo, next_header, hop_limit, addrs @ ..] = *h;
        // The addresses: 16 bytes each.
        let [src @ .., _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _] = addrs;
        let [_, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, dst @ ..] = addrs;
        Self {
            src,
            dst,
            next_header,
            payload_len: u16::from_be_bytes([len_hi, len_lo]),
            hop_limit,
            version: vtc >> 4,
        }
    }
}

/// A fragment header's fields (RFC 8200 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// The fragment header's own Next Header: the first header of the fragmentable part, the same
    /// in every fragment of a packet (unlike the upper-layer protocol, which only the first
    /// fragment shows when the fragmentable part starts with a destination options header).
    pub next_header: u8,
    /// Offset of this fragment's data in the original packet's fragmentable part, in 8-byte
    /// units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// Identification: with the addresses, names the packet the fragment belongs to.
    pub id: [u8; 4],
}

impl Fragment {
    /// Length of a fragment header (it has no length field).
    pub const LEN: usize = 8;

    /// Whether this is the first fragment, the one that holds the upper-layer header (RFC 7112
    /// "Implications of Oversized IPv6 Header Chains" requires the whole chain in it).
    #[inline(always)]
    pub const fn is_first(&self) -> bool {
        self.offset == 0
    }

    /// Whether this is an atomic fragment (RFC 6946): a fragment header on an unfragmented
    /// packet, offset 0 and no more fragments; the packet is whole.
    #[inline(always)]
    pub const fn is_atomic(&self) -> bool {
        self.offset == 0 && !self.more
    }
}

/// What the header at the current offset of a chain is, as [`step`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A hop-by-hop options, destination options, or routing header with no segments left:
    /// `len` bytes (`(Hdr Ext Len + 1) * 8`, 8..=2048) to step over, then `next_header`.
    Skip { next_header: u8, len: usize },
    /// A fragment header: [`Fragment::LEN`] bytes, then its next header. Only a first fragment
    /// ([`Fragment::is_first`]) has more headers to walk; a later one is data from here on.
    Fragment(Fragment),
    /// The upper-layer header starts here: this protocol (TCP, UDP, ICMPv6, any protocol snat
    /// does not walk into, or [`next_header::NONE`]).
    Upper(u8),
    /// A header the walk must not step over: ESP (the rest is encrypted), AH (it authenticates the
    /// addresses NAT changes), the mobility, HIP, Shim6 and experimental headers (their ports, if
    /// any, are not where a NAT looks), and a routing header with segments left, whose packet's
    /// checksums cover the final destination in the routing header, not the header's destination
    /// (RFC 8200 §8.1), and whose replies would come from that final destination.
    Unsupported(u8),
}

/// Whether [`step`] reads the header at the current offset for `current`, i.e. whether it is one
/// of the extension headers the walk goes through (hop-by-hop, routing, fragment, destination
/// options). When it is not, `step` ignores its bytes: a caller may pass zeros instead of reading
/// past the end of a packet.
#[inline(always)]
pub const fn is_walked(current: u8) -> bool {
    matches!(
        current,
        next_header::HOPOPTS | next_header::ROUTING | next_header::FRAGMENT | next_header::DSTOPTS
    )
}

/// One step of an extension header walk: `current` is the Next Header value that led here (the
/// fixed header's, or the previous extension header's) and `hdr` the first 8 bytes at the current
/// offset (every extension header the walk goes through is at least that long).
///
/// Like Linux's `ipv6_skip_exthdr`, it does not enforce RFC 8200 §4.1's order (hop-by-hop only
/// first, each header once): the receiver decides on that, and a NAT that walked the chain
/// differently from the stacks around it would find other ports than they do.
#[inline(always)]
pub const fn step(current: u8, hdr: [u8; 8]) -> Step {
    let [next, ext_len, b2, b3, id0, id1, id2, id3] = hdr;
    let len = (ext_len as usize + 1) * 8;
    match current {
        next_header::HOPOPTS | next_header::DSTOPTS => Step::Skip {
            next_header: next,
            len,
        },
        // Byte 2 is the routing type, byte 3 the segments left: with none left, every node
        // ignores the header, whatever its type (RFC 8200 §4.4).
        next_header::ROUTING if b3 == 0 => Step::Skip {
            next_header: next,
            len,
        },
        next_header::ROUTING => Step::Unsupported(next_header::ROUTING),
        next_header::FRAGMENT => {
            let off_flags = u16::from_be_bytes([b2, b3]);
            Step::Fragment(Fragment {
                next_header: next,
                offset: off_flags >> 3,
                more: off_flags & 1 != 0,
                id: [id0, id1, id2, id3],
            })
        }
        next_header::ESP
        | next_header::AH
        | next_header::MOBILITY
        | next_header::HIP
        | next_header::SHIM6
        | next_header::EXPERIMENT_1
        | next_header::EXPERIMENT_2 => Step::Unsupported(current),
        p => Step::Upper(p),
    }
}

/// Where a packet's upper-layer header is, as [`walk`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// The upper-layer protocol. For a non-first fragment: its fragment header's next header
    /// (there is no upper-layer header in it, see [`Transport::has_l4_header`]).
    pub proto: u8,
    /// Offset of the upper-layer header (or of a non-first fragment's data) from the end of the
    /// fixed header: the total length of the extension headers before it.
    pub offset: usize,
    /// The fragment header, if the packet has one.
    pub fragment: Option<Fragment>,
}

impl Transport {
    /// Whether the upper-layer header is in this packet: it is not fragmented, or is the first
    /// fragment.
    #[inline(always)]
    pub const fn has_l4_header(&self) -> bool {
        match self.fragment {
            Some(f) => f.is_first(),
            None => true,
        }
    }
}

/// Why [`walk`] found no upper-layer header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The packet ends inside an extension header, or before where the last one says the next
    /// header starts.
    Truncated,
    /// More than [`MAX_EXT_HEADERS`] extension headers.
    TooManyHeaders,
    /// A header the walk does not step over ([`Step::Unsupported`]), or a second fragment header.
    Unsupported(u8),
}

impl core::fmt::Display for WalkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WalkError::Truncated => f.write_str("IPv6 packet truncated in its extension headers"),
            WalkError::TooManyHeaders => write!(
                f,
                "more than {MAX_EXT_HEADERS} IPv6 extension headers before the upper-layer header"
            ),
            WalkError::Unsupported(n) => write!(f, "IPv6 next header {n} is not walked through"),
        }
    }
}

impl core::error::Error for WalkError {}

/// Walks the extension headers of a packet: `after` is everything after the fixed header and
/// `first` the fixed header's Next Header. Steps through at most [`MAX_EXT_HEADERS`] headers with
/// [`step`] (the kernel side's bounded loop does the same), stops at a non-first fragment's
/// data, and refuses a second fragment header. The upper-layer header's own length is not
/// checked: only that it starts within `after` (it may start at its end, e.g. for
/// [`next_header::NONE`]).
pub fn walk(after: &[u8], first: u8) -> Result<Transport, WalkError> {
    let mut current = first;
    let mut offset = 0usize;
    let mut fragment: Option<Fragment> = None;
    let found = |proto: u8, offset: usize, fragment: Option<Fragment>| {
        if offset > after.len() {
            return Err(WalkError::Truncated);
        }
        Ok(Transport {
            proto,
            offset,
            fragment,
        })
    };
    // One round per extension header, and one more for the header that ends the chain.
    for round in 0..=MAX_EXT_HEADERS {
        let hdr = if !is_walked(current) {
            [0; 8]
        } else if round == MAX_EXT_HEADERS {
            return Err(WalkError::TooManyHeaders);
        } else {
            let bytes = after.get(offset..).ok_or(WalkError::Truncated)?;
            *bytes.first_chunk::<8>().ok_or(WalkError::Truncated)?
        };
        match step(current, hdr) {
            Step::Skip { next_header, len } => {
                current = next_header;
                offset += len;
            }
            Step::Fragment(f) => {
                if fragment.is_some() {
                    return Err(WalkError::Unsupported(next_header::FRAGMENT));
                }
                fragment = Some(f);
                current = f.next_header;
                offset += Fragment::LEN;
                if !f.is_first() {
                    return found(current, offset, fragment);
                }
            }
            Step::Upper(p) => return found(p, offset, fragment),
            Step::Unsupported(p) => return Err(WalkError::Unsupported(p)),
        }
    }
    // Not reached: the last round either finds the end of the chain or refuses.
    Err(WalkError::TooManyHeaders)
}

/// The sum of the eight 16-bit words of an address, not folded (at most 8 × 0xffff).
#[inline(always)]
const fn words(a: [u8; 16]) -> u32 {
    let [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15] = a;
    u16::from_be_bytes([a0, a1]) as u32
        + u16::from_be_bytes([a2, a3]) as u32
        + u16::from_be_bytes([a4, a5]) as u32
        + u16::from_be_bytes([a6, a7]) as u32
        + u16::from_be_bytes([a8, a9]) as u32
        + u16::from_be_bytes([a10, a11]) as u32
        + u16::from_be_bytes([a12, a13]) as u32
        + u16::from_be_bytes([a14, a15]) as u32
}

/// The sum of the complements of an address's eight words (`~m` of RFC 1624 eq. 3 for each):
/// `8 × 0xffff − Σm`, which cannot underflow.
#[inline(always)]
const fn complement_words(a: [u8; 16]) -> u32 {
    8 * 0xffff - words(a)
}

/// The checksum `check` after a 16-byte field it covers (an IPv6 address, through the
/// pseudo-header) changes from `old` to `new`: RFC 1624 eq. 3 over the eight words in one sum,
/// `~(~HC + Σ~m + Σm')`, folded once (17 terms of at most 0xffff).
#[inline(always)]
pub const fn replace128(check: u16, old: [u8; 16], new: [u8; 16]) -> u16 {
    !fold(!check as u32 + complement_words(old) + words(new))
}

/// Like [`replace128`] for an IPv6 UDP checksum, which is never 0: a computed 0 is sent as 0xffff
/// (RFC 8200 §8.1). Unlike IPv4's [`crate::csum::replace32_udp`], a `check` of 0 is not "no
/// checksum" to keep: a received IPv6 UDP datagram with checksum 0 is malformed (RFC 8200 §8.1;
/// RFC 6935 and RFC 6936 allow it only for tunnels a receiver is configured for, and Linux drops
/// it by default), so the caller drops it (or leaves it untranslated) before calling this; given
/// 0, the result is meaningless, though never 0.
#[inline(always)]
pub const fn replace128_udp(check: u16, old: [u8; 16], new: [u8; 16]) -> u16 {
    match replace128(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The checksum `check` of a TCP, UDP or ICMPv6 (echo) packet after one of its endpoints changes
/// from `old` to `new` (address, and port or echo identifier). All three cover the addresses
/// through the pseudo-header; ICMPv6 has the identifier in its body where TCP and UDP have the
/// port. A UDP result is never 0 (see [`replace128_udp`] for a received 0, which the caller must
/// drop first). Any other `proto` is taken to cover the pseudo-header as TCP does (RFC 8200 §8.1
/// asks it of every upper-layer protocol that covers the addresses).
#[inline(always)]
pub const fn rewrite_l4_v6(
    proto: u8,
    check: u16,
    old: ([u8; 16], [u8; 2]),
    new: ([u8; 16], [u8; 2]),
) -> u16 {
    let c = !fold(
        !check as u32
            + complement_words(old.0)
            + words(new.0)
            + !u16::from_be_bytes(old.1) as u32
            + u16::from_be_bytes(new.1) as u32,
    );
    if proto == next_header::UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The folded (not inverted) sum of the IPv6 pseudo-header (RFC 8200 §8.1) of an upper-layer
/// packet of `l4_len` bytes: what the checksum field of a packet whose checksum is pending
/// offload holds (the kernel's `~csum_ipv6_magic(…, 0)` for a `CHECKSUM_PARTIAL` skb). `l4_len`
/// is the upper-layer length, extension headers excluded; 32 bits, as the pseudo-header has it
/// (a GSO packet's can exceed 65,535).
#[inline(always)]
pub const fn pseudo_header_fold_v6(
    src: [u8; 16],
    dst: [u8; 16],
    next_header: u8,
    l4_len: u32,
) -> u16 {
    fold(words(src) + words(dst) + (l4_len >> 16) + (l4_len & 0xffff) + next_header as u32)
}

/// Whether the TCP, UDP or ICMPv6 checksum field `check` may be a pending-offload value rather
/// than a checksum: it equals the pseudo-header's folded sum (0 and 0xffff being the same one's
/// complement number). As [`crate::csum::may_be_partial`]: a real checksum matches by chance
/// about once in 65,536 packets, and a caller that cannot tell takes the always-right way.
#[inline(always)]
pub const fn may_be_partial_v6(
    check: u16,
    src: [u8; 16],
    dst: [u8; 16],
    next_header: u8,
    l4_len: u32,
) -> bool {
    let p = pseudo_header_fold_v6(src, dst, next_header, l4_len);
    check == p || (check == 0 && p == 0xffff) || (check == 0xffff && p == 0)
}

/// The sum (not folded or inverted) of the IPv6 pseudo-header: source, destination, upper-layer
/// length (32 bits), three zero bytes and the next header (RFC 8200 §8.1).
pub fn pseudo_header_sum_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u32) -> u32 {
    let mut ph = [0u8; 40];
    ph[..16].copy_from_slice(&src);
    ph[16..32].copy_from_slice(&dst);
    ph[32..36].copy_from_slice(&l4_len.to_be_bytes());
    ph[39] = next_header;
    sum(&ph, 0)
}

/// The checksum of the upper-layer packet `segment` (its checksum field zeroed) from `src` to
/// `dst`: the value to store in that field. For UDP a computed 0 is 0xffff (RFC 8200 §8.1).
pub fn checksum_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, segment: &[u8]) -> u16 {
    let ph = pseudo_header_sum_v6(src, dst, next_header, segment.len() as u32);
    match !fold_full(sum(segment, ph)) {
        0 if next_header == next_header::UDP => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::next_header::{
        AH, DSTOPTS, ESP, FRAGMENT, HOPOPTS, ICMPV6, MOBILITY, NONE, ROUTING, TCP, UDP,
    };
    use super::*;

    /// xorshift64: reproducible pseudo-random cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0u8; N];
            for b in &mut out {
                *b = self.next() as u8;
            }
            out
        }

        /// An address, often with all-zero or all-one words to exercise carries.
        fn addr(&mut self) -> [u8; 16] {
            let mut a = self.bytes::<16>();
            match self.below(4) {
                0 => a = [0xff; 16],
                1 => a[..8].fill(0),
                2 => a[8..].fill(0xff),
                _ => {}
            }
            a
        }
    }

    /// The reference: the Internet checksum of the pseudo-header and `l4` (checksum field
    /// zeroed), written out byte by byte without the module's helpers.
    fn reference_check(src: [u8; 16], dst: [u8; 16], nh: u8, l4: &[u8]) -> u16 {
        let mut data = Vec::new();
        data.extend_from_slice(&src);
        data.extend_from_slice(&dst);
        data.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, nh]);
        data.extend_from_slice(l4);
        let mut acc: u64 = 0;
        for pair in data.chunks(2) {
            let hi = u64::from(pair[0]);
            let lo = u64::from(pair.get(1).copied().unwrap_or(0));
            acc += (hi << 8) | lo;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        let c = !(acc as u16);
        if nh == UDP && c == 0 {
            0xffff
        } else {
            c
        }
    }

    /// Offset of the checksum in the upper-layer header.
    fn check_offset(proto: u8) -> usize {
        match proto {
            TCP => 16,
            UDP => 6,
            _ => 2,
        }
    }

    /// An extension header as a test packet carries it.
    #[derive(Clone, Copy, Debug)]
    enum Ext {
        /// Hop-by-hop options of `(units + 1) * 8` bytes (PadN).
        Hop(u8),
        /// Destination options of `(units + 1) * 8` bytes (PadN).
        Dst(u8),
        /// A segment routing header (type 4) of `(units + 1) * 8` bytes with these segments left.
        Routing(u8, u8),
        /// A fragment header: offset (8-byte units), more, identification.
        Frag(u16, bool, [u8; 4]),
        /// Any other header: its Next Header code and bytes (the first is overwritten).
        Raw(u8, [u8; 8]),
    }

    impl Ext {
        fn code(self) -> u8 {
            match self {
                Ext::Hop(_) => HOPOPTS,
                Ext::Dst(_) => DSTOPTS,
                Ext::Routing(..) => ROUTING,
                Ext::Frag(..) => FRAGMENT,
                Ext::Raw(code, _) => code,
            }
        }

        fn bytes(self, next: u8) -> Vec<u8> {
            let mut b = match self {
                Ext::Hop(units) | Ext::Dst(units) => {
                    let len = (usize::from(units) + 1) * 8;
                    let mut b = std::vec![0u8; len];
                    b[1] = units;
                    // One PadN option fills the header.
                    b[2] = 1;
                    b[3] = (len - 4) as u8;
                    b
                }
                Ext::Routing(units, left) => {
                    let mut b = std::vec![0u8; (usize::from(units) + 1) * 8];
                    b[1] = units;
                    b[2] = 4;
                    b[3] = left;
                    b
                }
                Ext::Frag(offset, more, id) => {
                    let mut b = std::vec![0u8; 8];
                    b[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    b[4..].copy_from_slice(&id);
                    b
                }
                Ext::Raw(_, bytes) => bytes.to_vec(),
            };
            b[0] = next;
            b
        }

        fn len(self) -> usize {
            self.bytes(0).len()
        }
    }

    /// The upper-layer packet of a test: TCP, UDP or ICMPv6 echo request from `sport` (the echo
    /// identifier) to `dport`, with `payload`, its checksum computed with [`reference_check`].
    fn upper(
        proto: u8,
        src: [u8; 16],
        dst: [u8; 16],
        sport: [u8; 2],
        dport: [u8; 2],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut l4 = match proto {
            TCP => {
                let mut h = std::vec![0u8; 20];
                h[..2].copy_from_slice(&sport);
                h[2..4].copy_from_slice(&dport);
                h[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = 0x18;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            UDP => {
                let mut h = std::vec![0u8; 8];
                h[..2].copy_from_slice(&sport);
                h[2..4].copy_from_slice(&dport);
                h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                h
            }
            _ => std::vec![icmp6::ECHO_REQUEST, 0, 0, 0, sport[0], sport[1], 0, 7],
        };
        l4.extend_from_slice(payload);
        let c = reference_check(src, dst, proto, &l4);
        let at = check_offset(proto);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    /// A whole IPv6 packet: fixed header, `exts` in order, then `l4` (protocol `proto`).
    fn packet(src: [u8; 16], dst: [u8; 16], exts: &[Ext], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut after = Vec::new();
        for (i, e) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(proto, |n| n.code());
            after.extend(e.bytes(next));
        }
        after.extend_from_slice(l4);
        let first = exts.first().map_or(proto, |e| e.code());
        let mut p = std::vec![0x60, 0x0a, 0xbc, 0xde];
        p.extend_from_slice(&(after.len() as u16).to_be_bytes());
        p.extend_from_slice(&[first, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend(after);
        p
    }

    /// A random chain in RFC 8200 §4.1's order, each kind present or not.
    fn random_chain(rng: &mut Rng) -> Vec<Ext> {
        let mut exts = Vec::new();
        if rng.below(3) == 0 {
            exts.push(Ext::Hop(rng.below(3) as u8));
        }
        if rng.below(3) == 0 {
            exts.push(Ext::Dst(rng.below(3) as u8));
        }
        if rng.below(3) == 0 {
            exts.push(Ext::Routing(rng.below(4) as u8, 0));
        }
        if rng.below(3) == 0 {
            // Atomic, or the first fragment (the test carries the whole datagram anyway: the
            // checksum covers all of it).
            exts.push(Ext::Frag(0, rng.below(2) == 0, rng.bytes()));
        }
        if rng.below(3) == 0 {
            exts.push(Ext::Dst(rng.below(2) as u8));
        }
        exts
    }

    fn u16_at(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    /// Whether two checksums are the same one's complement number (0 and 0xffff are).
    fn same(a: u16, b: u16) -> bool {
        a == b || (a, b) == (0, 0xffff) || (a, b) == (0xffff, 0)
    }

    #[test]
    fn fixed_header_fields() {
        let (src, dst) = (
            [
                0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ],
            [0xfd; 16],
        );
        let l4 = upper(UDP, src, dst, [0x9c, 0x40], [0, 53], b"query");
        let p = packet(src, dst, &[], UDP, &l4);
        let h = Ipv6Fixed::parse(p[..HEADER_LEN].try_into().unwrap());
        assert_eq!(
            h,
            Ipv6Fixed {
                src,
                dst,
                next_header: UDP,
                payload_len: 13,
                hop_limit: 64,
                version: VERSION,
            }
        );
    }

    #[test]
    fn incremental_updates_match_recomputation() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut with_exts = 0;
        for case in 0..6000 {
            let proto = [TCP, UDP, ICMPV6][case % 3];
            let (src, dst) = (rng.addr(), rng.addr());
            let (sport, dport) = (rng.bytes::<2>(), rng.bytes::<2>());
            let payload: Vec<u8> = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
            let exts = random_chain(&mut rng);
            with_exts += usize::from(!exts.is_empty());
            let l4 = upper(proto, src, dst, sport, dport, &payload);
            let p = packet(src, dst, &exts, proto, &l4);

            let t = walk(&p[HEADER_LEN..], p[6]).unwrap();
            assert_eq!(t.proto, proto);
            assert_eq!(t.offset, exts.iter().map(|e| e.len()).sum::<usize>());
            assert!(t.has_l4_header());
            let at = HEADER_LEN + t.offset + check_offset(proto);
            let old_check = u16_at(&p, at);

            // The source (egress) or the destination (a reply on ingress) changes: its address,
            // its port (identifier), or both.
            let src_side = rng.below(2) == 0;
            let (old_addr, old_port) = if src_side {
                (src, sport)
            } else {
                (dst, if proto == ICMPV6 { sport } else { dport })
            };
            let new_addr = if rng.below(3) == 0 {
                old_addr
            } else {
                rng.addr()
            };
            let new_port = if rng.below(3) == 0 {
                old_port
            } else {
                rng.bytes()
            };
            let (ns, nd) = if src_side {
                (new_addr, dst)
            } else {
                (src, new_addr)
            };
            let (nsp, ndp) = match (src_side, proto) {
                (_, ICMPV6) => (new_port, dport),
                (true, _) => (new_port, dport),
                (false, _) => (sport, new_port),
            };
            let expected = u16_at(
                &upper(proto, ns, nd, nsp, ndp, &payload),
                check_offset(proto),
            );

            let got = rewrite_l4_v6(proto, old_check, (old_addr, old_port), (new_addr, new_port));
            if proto == UDP {
                assert_eq!(got, expected, "case {case}");
            } else {
                assert!(same(got, expected), "case {case}: {got:#x} {expected:#x}");
            }

            // The address alone, two ways.
            if old_port == new_port {
                let by_words = (0..8).fold(old_check, |c, i| {
                    crate::csum::replace16(c, u16_at(&old_addr, 2 * i), u16_at(&new_addr, 2 * i))
                });
                if proto == UDP {
                    assert_eq!(replace128_udp(old_check, old_addr, new_addr), expected);
                } else {
                    assert!(same(replace128(old_check, old_addr, new_addr), expected));
                }
                assert!(same(replace128(old_check, old_addr, new_addr), by_words));
            }
        }
        assert!(with_exts > 1000, "{with_exts}");
    }

    #[test]
    fn udp_checksum_is_never_zero() {
        // ~(~0x1234 + 8 × ~0 + 0x1234) = ~(9 × 0xffff) = 0: the plain update gives 0, UDP 0xffff.
        let (old, mut new) = ([0u8; 16], [0u8; 16]);
        new[..2].copy_from_slice(&0x1234u16.to_be_bytes());
        assert_eq!(replace128(0x1234, old, new), 0);
        assert_eq!(replace128_udp(0x1234, old, new), 0xffff);
        assert_eq!(rewrite_l4_v6(TCP, 0x1234, (old, [0, 0]), (new, [0, 0])), 0);
        assert_eq!(
            rewrite_l4_v6(UDP, 0x1234, (old, [0, 0]), (new, [0, 0])),
            0xffff
        );

        // A real datagram whose rewritten form computes to 0: the payload word is chosen so.
        let mut rng = Rng(7);
        for _ in 0..200 {
            let (src, dst, nat) = (rng.addr(), rng.addr(), rng.addr());
            let (sport, nport) = (rng.bytes::<2>(), rng.bytes::<2>());
            // The translated datagram with a zero payload word and checksum field: the payload
            // word that makes its sum 0xffff is the complement of that sum.
            let mut probe = upper(UDP, nat, dst, nport, [0, 53], &[0, 0]);
            probe[6..8].fill(0);
            let mut words = 0u32;
            let mut data = Vec::new();
            data.extend_from_slice(&nat);
            data.extend_from_slice(&dst);
            data.extend_from_slice(&(probe.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, UDP]);
            data.extend_from_slice(&probe);
            for pair in data.chunks(2) {
                words += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            let folded = fold_full(words);
            let payload = (!folded).to_be_bytes();
            let before = upper(UDP, src, dst, sport, [0, 53], &payload);
            let after = upper(UDP, nat, dst, nport, [0, 53], &payload);
            assert_eq!(u16_at(&after, 6), 0xffff, "a computed 0 is sent as 0xffff");
            let got = rewrite_l4_v6(UDP, u16_at(&before, 6), (src, sport), (nat, nport));
            assert_eq!(got, 0xffff);
        }
    }

    #[test]
    fn checksum_v6_matches_the_reference() {
        let mut rng = Rng(11);
        for case in 0..500 {
            let proto = [TCP, UDP, ICMPV6][case % 3];
            let (src, dst) = (rng.addr(), rng.addr());
            let payload: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            let mut l4 = upper(proto, src, dst, rng.bytes(), rng.bytes(), &payload);
            let at = check_offset(proto);
            let c = u16_at(&l4, at);
            l4[at..at + 2].fill(0);
            assert_eq!(checksum_v6(src, dst, proto, &l4), c);
            assert_eq!(
                pseudo_header_fold_v6(src, dst, proto, l4.len() as u32),
                fold_full(pseudo_header_sum_v6(src, dst, proto, l4.len() as u32))
            );
        }
    }

    /// Linux's generic `csum_ipv6_magic` (net/ipv6/ip6_checksum.c), as a little-endian machine
    /// runs it: 32-bit words loaded in host order, add with carry, `csum_fold` (which inverts).
    /// Returns the 16-bit value as the kernel would store it, in host order.
    fn kernel_csum_ipv6_magic(src: [u8; 16], dst: [u8; 16], len: u32, proto: u8) -> u16 {
        let mut sum: u32 = 0;
        let mut add = |v: u32| {
            sum = sum.wrapping_add(v);
            sum = sum.wrapping_add(u32::from(sum < v));
        };
        for w in src.chunks(4).chain(dst.chunks(4)) {
            add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        add(u32::from_le_bytes(len.to_be_bytes())); // htonl, then a little-endian load
        add(u32::from_le_bytes(u32::from(proto).to_be_bytes()));
        let s = (sum & 0xffff) + (sum >> 16);
        let s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }

    #[test]
    fn pending_offload_matches_the_kernel() {
        let mut rng = Rng(0xdead_beef);
        for case in 0..4000 {
            let proto = [TCP, UDP, ICMPV6][case % 3];
            let (src, dst) = (rng.addr(), rng.addr());
            let len = match case % 4 {
                0 => rng.below(1 << 16) as u32,
                1 => rng.next() as u32, // BIG TCP: over 65,535
                2 => 0,
                _ => 20,
            };
            // `th->check = ~csum_ipv6_magic(…, 0)`, stored in host order and read big-endian.
            let stored = (!kernel_csum_ipv6_magic(src, dst, len, proto)).to_le_bytes();
            let check = u16::from_be_bytes(stored);
            assert!(
                same(check, pseudo_header_fold_v6(src, dst, proto, len)),
                "case {case}"
            );
            assert!(may_be_partial_v6(check, src, dst, proto, len));
            assert!(!may_be_partial_v6(
                check,
                src,
                dst,
                proto,
                len.wrapping_add(1)
            ));
            let mut other = dst;
            other[15] ^= 1;
            assert!(!may_be_partial_v6(check, src, other, proto, len));
        }
        // 0 and 0xffff are one number.
        assert_eq!(pseudo_header_fold_v6([0xff; 16], [0; 16], 0, 0), 0xffff);
        assert!(may_be_partial_v6(0, [0xff; 16], [0; 16], 0, 0));
        assert!(may_be_partial_v6(0xffff, [0; 16], [0; 16], 0, 0));
    }

    fn after_fixed(p: &[u8]) -> (&[u8], u8) {
        (&p[HEADER_LEN..], p[6])
    }

    #[test]
    fn walk_steps_through_every_kind() {
        let (src, dst) = ([1; 16], [2; 16]);
        let l4 = upper(TCP, src, dst, [0, 1], [0, 2], b"x");
        let id = [0xa, 0xb, 0xc, 0xd];
        for exts in [
            std::vec![],
            std::vec![Ext::Hop(0)],
            std::vec![Ext::Hop(255)],
            std::vec![Ext::Dst(2)],
            std::vec![Ext::Routing(1, 0)],
            std::vec![Ext::Frag(0, true, id)],
            std::vec![
                Ext::Hop(1),
                Ext::Dst(0),
                Ext::Routing(3, 0),
                Ext::Frag(0, false, id),
                Ext::Dst(0)
            ],
            // Out of RFC 8200's order: walked as Linux walks it.
            std::vec![Ext::Dst(0), Ext::Hop(0)],
        ] {
            let p = packet(src, dst, &exts, TCP, &l4);
            let (after, first) = after_fixed(&p);
            let t = walk(after, first).unwrap();
            let len: usize = exts.iter().map(|e| e.len()).sum();
            assert_eq!(t.proto, TCP, "{exts:?}");
            assert_eq!(t.offset, len, "{exts:?}");
            assert_eq!(&after[t.offset..], &l4[..]);
            let frag = exts.iter().find_map(|e| match *e {
                Ext::Frag(offset, more, id) => Some((offset, more, id)),
                _ => None,
            });
            assert_eq!(
                t.fragment.map(|f| (f.offset, f.more, f.id)),
                frag,
                "{exts:?}"
            );
            assert!(t.has_l4_header());
        }
        assert_eq!(Ext::Hop(255).len(), 2048);
    }

    #[test]
    fn walk_stops_at_a_later_fragment() {
        let id = [1, 2, 3, 4];
        // A later fragment's data starts right after its fragment header, whatever it holds; the
        // protocol is the fragment header's next header (here destination options, which only
        // the first fragment shows).
        let data = [0xee; 24];
        let p = packet(
            [1; 16],
            [2; 16],
            &[Ext::Hop(0), Ext::Frag(185, true, id)],
            DSTOPTS,
            &data,
        );
        let (after, first) = after_fixed(&p);
        let t = walk(after, first).unwrap();
        assert_eq!(t.proto, DSTOPTS);
        assert_eq!(t.offset, 16);
        assert_eq!(
            t.fragment,
            Some(Fragment {
                next_header: DSTOPTS,
                offset: 185,
                more: true,
                id
            })
        );
        assert!(!t.has_l4_header());
        // The last fragment, with nothing after its header but the fragment's data.
        let p = packet([1; 16], [2; 16], &[Ext::Frag(0x1fff, false, id)], UDP, &[]);
        let t = walk(&p[HEADER_LEN..], p[6]).unwrap();
        assert_eq!((t.proto, t.offset), (UDP, 8));
        let f = t.fragment.unwrap();
        assert_eq!(
            (f.offset, f.more, f.is_first(), f.is_atomic()),
            (0x1fff, false, false, false)
        );
        // Atomic fragment (RFC 6946): whole, walked on.
        let l4 = upper(UDP, [1; 16], [2; 16], [0, 1], [0, 2], b"");
        let p = packet([1; 16], [2; 16], &[Ext::Frag(0, false, id)], UDP, &l4);
        let t = walk(&p[HEADER_LEN..], p[6]).unwrap();
        assert!(t.fragment.unwrap().is_atomic() && t.has_l4_header());
    }

    #[test]
    fn step_reads_the_fragment_fields_and_ignores_reserved_bits() {
        // Offset 0x1234, both reserved bits set, M set.
        let off = (0x1234u16 << 3) | 0b111;
        let [hi, lo] = off.to_be_bytes();
        assert_eq!(
            step(FRAGMENT, [UDP, 0xff, hi, lo, 9, 8, 7, 6]),
            Step::Fragment(Fragment {
                next_header: UDP,
                offset: 0x1234,
                more: true,
                id: [9, 8, 7, 6]
            })
        );
        assert_eq!(
            step(HOPOPTS, [TCP, 3, 0, 0, 0, 0, 0, 0]),
            Step::Skip {
                next_header: TCP,
                len: 32
            }
        );
        for p in [TCP, UDP, ICMPV6, NONE, 1, 4, 41, 132, 255] {
            assert!(!is_walked(p));
            assert_eq!(step(p, [0xff; 8]), Step::Upper(p));
        }
        for p in [HOPOPTS, ROUTING, FRAGMENT, DSTOPTS] {
            assert!(is_walked(p));
        }
    }

    #[test]
    fn walk_accepts_max_headers_and_refuses_more() {
        let l4 = upper(UDP, [1; 16], [2; 16], [0, 1], [0, 2], b"");
        let exts = std::vec![Ext::Dst(0); MAX_EXT_HEADERS];
        let p = packet([1; 16], [2; 16], &exts, UDP, &l4);
        let t = walk(&p[HEADER_LEN..], p[6]).unwrap();
        assert_eq!((t.proto, t.offset), (UDP, 8 * MAX_EXT_HEADERS));

        let exts = std::vec![Ext::Dst(0); MAX_EXT_HEADERS + 1];
        let p = packet([1; 16], [2; 16], &exts, UDP, &l4);
        assert_eq!(walk(&p[HEADER_LEN..], p[6]), Err(WalkError::TooManyHeaders));
        // Refused before the header past the bound is read: even when it is not there.
        let cut = HEADER_LEN + 8 * MAX_EXT_HEADERS;
        assert_eq!(
            walk(&p[HEADER_LEN..cut], p[6]),
            Err(WalkError::TooManyHeaders)
        );
        // The fragment header counts too.
        let mut exts = std::vec![Ext::Dst(0); MAX_EXT_HEADERS];
        exts[2] = Ext::Frag(0, true, [0; 4]);
        exts.push(Ext::Hop(0));
        let p = packet([1; 16], [2; 16], &exts, UDP, &l4);
        assert_eq!(walk(&p[HEADER_LEN..], p[6]), Err(WalkError::TooManyHeaders));
    }

    #[test]
    fn walk_reports_truncation() {
        let l4 = upper(TCP, [1; 16], [2; 16], [0, 1], [0, 2], b"");
        let p = packet(
            [1; 16],
            [2; 16],
            &[Ext::Hop(1), Ext::Frag(0, true, [0; 4]), Ext::Dst(2)],
            TCP,
            &l4,
        );
        let (after, first) = after_fixed(&p);
        let headers = 16 + 8 + 24;
        // Cut anywhere inside the headers: truncated (cut exactly after them: the TCP header
        // starts at the end, which walk does not judge).
        for cut in 0..headers {
            assert_eq!(
                walk(&after[..cut], first),
                Err(WalkError::Truncated),
                "cut at {cut}"
            );
        }
        assert_eq!(walk(&after[..headers], first).unwrap().offset, headers);
        // No next header: nothing follows, and nothing needs to.
        let p = packet([1; 16], [2; 16], &[Ext::Dst(0)], NONE, &[]);
        let t = walk(&p[HEADER_LEN..], p[6]).unwrap();
        assert_eq!((t.proto, t.offset), (NONE, 8));
        assert_eq!(walk(&[], TCP).unwrap().offset, 0);
    }

    #[test]
    fn walk_refuses_what_it_must_not_skip() {
        let l4 = upper(UDP, [1; 16], [2; 16], [0, 1], [0, 2], b"");
        let raw = [0, 1, 0, 0, 0, 0, 0, 0];
        for (exts, refused) in [
            (std::vec![Ext::Raw(ESP, raw)], ESP),
            (std::vec![Ext::Hop(0), Ext::Raw(AH, raw)], AH),
            (std::vec![Ext::Raw(MOBILITY, raw)], MOBILITY),
            (std::vec![Ext::Raw(next_header::HIP, raw)], next_header::HIP),
            (
                std::vec![Ext::Raw(next_header::SHIM6, raw)],
                next_header::SHIM6,
            ),
            (
                std::vec![Ext::Raw(next_header::EXPERIMENT_1, raw)],
                next_header::EXPERIMENT_1,
            ),
            (
                std::vec![Ext::Raw(next_header::EXPERIMENT_2, raw)],
                next_header::EXPERIMENT_2,
            ),
            (std::vec![Ext::Routing(2, 1)], ROUTING),
            (std::vec![Ext::Dst(0), Ext::Routing(0, 255)], ROUTING),
            (
                std::vec![Ext::Frag(0, true, [0; 4]), Ext::Frag(0, true, [0; 4])],
                FRAGMENT,
            ),
        ] {
            let p = packet([1; 16], [2; 16], &exts, UDP, &l4);
            assert_eq!(
                walk(&p[HEADER_LEN..], p[6]),
                Err(WalkError::Unsupported(refused)),
                "{exts:?}"
            );
        }
    }

    #[test]
    fn icmp_types() {
        use icmp6::*;
        for t in 0..=255u8 {
            assert_eq!(is_error(t), (1..=4).contains(&t), "{t}");
            assert_eq!(is_neighbour_discovery(t), (133..=137).contains(&t), "{t}");
            assert_eq!(is_mld(t), matches!(t, 130..=132 | 143), "{t}");
        }
        assert!(!is_error(ECHO_REQUEST) && !is_error(ECHO_REPLY));
    }

    /// The first 48 bytes of a packet as an error would quote them.
    fn quote(p: &[u8]) -> ([u8; 40], [u8; 8]) {
        (p[..40].try_into().unwrap(), p[40..48].try_into().unwrap())
    }

    #[test]
    fn quotes_of_tcp_udp_and_echo() {
        let (nat, remote) = (
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x26; 16],
        );
        for (proto, sport, dport) in [(TCP, [0x9c, 0x40], [1, 0xbb]), (UDP, [0x80, 0x01], [0, 53])]
        {
            let l4 = upper(proto, nat, remote, sport, dport, b"payload");
            let (ip, head) = quote(&packet(nat, remote, &[], proto, &l4));
            assert_eq!(
                icmp6::quoted_flow(&ip, &head),
                Some(icmp6::QuotedFlow {
                    src: nat,
                    dst: remote,
                    proto,
                    sport,
                    dport
                })
            );
        }
        let mut echo = upper(ICMPV6, nat, remote, [0x12, 0x34], [0, 0], b"ping");
        for kind in [icmp6::ECHO_REQUEST, icmp6::ECHO_REPLY] {
            echo[0] = kind;
            let (ip, head) = quote(&packet(nat, remote, &[], ICMPV6, &echo));
            let q = icmp6::quoted_flow(&ip, &head).unwrap();
            assert_eq!(
                (q.proto, q.sport, q.dport),
                (ICMPV6, [0x12, 0x34], [0x12, 0x34])
            );
        }
    }

    #[test]
    fn quotes_snat_does_not_read() {
        let (a, b) = ([1; 16], [2; 16]);
        let udp = upper(UDP, a, b, [0, 1], [0, 2], b"datagram");
        // Extension headers before the ports.
        for exts in [
            std::vec![Ext::Hop(0)],
            std::vec![Ext::Frag(0, true, [0; 4])],
        ] {
            let (ip, head) = quote(&packet(a, b, &exts, UDP, &udp));
            assert_eq!(icmp6::quoted_flow(&ip, &head), None, "{exts:?}");
        }
        // An error quoting an error, a neighbour solicitation, another protocol, IPv4.
        for kind in [icmp6::DEST_UNREACH, icmp6::NEIGHBOUR_SOLICIT] {
            let mut m = upper(ICMPV6, a, b, [0, 1], [0, 0], b"");
            m[0] = kind;
            let (ip, head) = quote(&packet(a, b, &[], ICMPV6, &m));
            assert_eq!(icmp6::quoted_flow(&ip, &head), None, "{kind}");
        }
        let (ip, head) = quote(&packet(a, b, &[], 132, &[0; 12]));
        assert_eq!(icmp6::quoted_flow(&ip, &head), None);
        let mut p = packet(a, b, &[], UDP, &udp);
        p[0] = 0x45;
        let (ip, head) = quote(&p);
        assert_eq!(icmp6::quoted_flow(&ip, &head), None);
    }
}
