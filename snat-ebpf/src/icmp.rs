//! ICMP errors (RFC 5508): an error about a translated flow quotes that flow's packet, so both the
//! outer header and the embedded header are translated, with the embedded IPv4 and L4 checksums
//! and the ICMP checksum updated to match. Errors never create, refresh or end a mapping.
//!
//! Checksum note: every change inside the ICMP message is folded into the ICMP checksum, and the
//! outer address change into the IPv4 checksum, so the one's complement sum of the whole packet is
//! unchanged and a `CHECKSUM_COMPLETE` `skb->csum` stays valid without help.

use snat_common::{csum, flow::proto, FlowKey};

use crate::packet::{l4_check_offset, read, Ipv4, Packet, Side};

/// ICMP types snat translates.
pub mod kind {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAM_PROBLEM: u8 = 12;
}

/// Error types whose payload quotes the offending datagram.
#[inline(always)]
pub const fn is_error(t: u8) -> bool {
    matches!(
        t,
        kind::DEST_UNREACH | kind::TIME_EXCEEDED | kind::PARAM_PROBLEM
    )
}

/// The source and destination addresses of the IPv4 header an ICMP error quotes, when at least
/// that much of it is there (even if too little of the datagram follows for [`Inner::parse`]).
#[inline(always)]
pub fn quoted_addrs<C: Packet>(ctx: &C, outer: &Ipv4) -> Option<([u8; 4], [u8; 4])> {
    if outer.l4_len(ctx) < 8 + 20 {
        return None;
    }
    let a: [u8; 8] = read(ctx, outer.l4() + 8 + 12).ok()?;
    Some(([a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]]))
}

/// The datagram an ICMP error quotes, as far as snat needs it.
#[derive(Clone, Copy)]
pub struct Inner {
    /// Offset of the ICMP header in the frame.
    pub icmp: usize,
    /// Offset of the embedded IPv4 header.
    pub ip: usize,
    /// Offset of the embedded L4 header.
    pub l4: usize,
    /// Bytes of the embedded L4 header present in the packet.
    pub l4_avail: usize,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// TCP/UDP ports; for ICMP echo both hold the identifier.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

impl Inner {
    /// For a quote of a reply on its way to a pod (remote → pod, an error egress sees): the
    /// forward key of the pod's flow.
    #[inline(always)]
    pub fn forward_key_of_reply(&self) -> FlowKey {
        FlowKey::new(
            self.proto,
            self.dst,
            self.dport,
            self.src,
            FlowKey::remote_port_for(self.proto, self.sport),
        )
    }

    /// For a quote of a translated packet (NAT endpoint → remote, an error ingress sees): the
    /// reply key of its mapping.
    #[inline(always)]
    pub fn reply_key_of_sent(&self) -> FlowKey {
        FlowKey::new(
            self.proto,
            self.dst,
            FlowKey::remote_port_for(self.proto, self.dport),
            self.src,
            self.sport,
        )
    }

    /// Parses the datagram quoted by the ICMP error in `outer`. `None` when it is too short, not
    /// IPv4, a non-first fragment, or a protocol snat does not map.
    #[inline(always)]
    pub fn parse<C: Packet>(ctx: &C, outer: &Ipv4) -> Option<Self> {
        let icmp = outer.l4();
        let quoted = outer.l4_len(ctx).checked_sub(8)?;
        let ip = icmp + 8;
        let h: [u8; 20] = read(ctx, ip).ok()?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || ihl < 20 || ihl > quoted {
            return None;
        }
        if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return None; // a non-first fragment has no L4 header
        }
        let l4 = ip + ihl;
        let l4_avail = quoted - ihl;
        if l4_avail < 8 {
            return None;
        }
        let head: [u8; 8] = read(ctx, l4).ok()?;
        let p = h[9];
        let (sport, dport) = match p {
            proto::TCP | proto::UDP => ([head[0], head[1]], [head[2], head[3]]),
            proto::ICMP if head[0] == kind::ECHO_REQUEST || head[0] == kind::ECHO_REPLY => {
                ([head[4], head[5]], [head[4], head[5]])
            }
            _ => return None,
        };
        Some(Self {
            icmp,
            ip,
            l4,
            l4_avail,
            proto: p,
            src: [h[12], h[13], h[14], h[15]],
            dst: [h[16], h[17], h[18], h[19]],
            sport,
            dport,
        })
    }

    /// Rewrites one endpoint of the embedded datagram to `new` (address, port or identifier),
    /// updating the embedded IPv4 checksum, the embedded L4 checksum when it was quoted, and the
    /// ICMP checksum.
    #[inline(always)]
    pub fn rewrite<C: Packet>(
        &self,
        ctx: &C,
        side: Side,
        new: ([u8; 4], [u8; 2]),
    ) -> Result<(), i64> {
        let (addr_off, old_addr, old_port) = match side {
            Side::Src => (self.ip + 12, self.src, self.sport),
            Side::Dst => (self.ip + 16, self.dst, self.dport),
        };
        let port_off = match (self.proto, side) {
            (proto::ICMP, _) => self.l4 + 4,
            (_, Side::Src) => self.l4,
            (_, Side::Dst) => self.l4 + 2,
        };
        let (op, np) = (u16::from_be_bytes(old_port), u16::from_be_bytes(new.1));

        let icmp_check = self.icmp + 2;
        let mut icmp_c = u16::from_be_bytes(read(ctx, icmp_check)?);
        let ip_c_old = u16::from_be_bytes(read(ctx, self.ip + 10)?);
        let ip_c_new = csum::replace32(ip_c_old, old_addr, new.0);
        icmp_c = csum::replace32(icmp_c, old_addr, new.0);
        icmp_c = csum::replace16(icmp_c, op, np);
        icmp_c = csum::replace16(icmp_c, ip_c_old, ip_c_new);

        let l4_check_rel = l4_check_offset(self.proto);
        if self.l4_avail >= l4_check_rel + 2 {
            let off = self.l4 + l4_check_rel;
            let old = u16::from_be_bytes(read(ctx, off)?);
            let new_c = match self.proto {
                proto::TCP => csum::replace16(csum::replace32(old, old_addr, new.0), op, np),
                proto::UDP => {
                    csum::replace16_udp(csum::replace32_udp(old, old_addr, new.0), op, np)
                }
                _ => csum::replace16(old, op, np),
            };
            icmp_c = csum::replace16(icmp_c, old, new_c);
            ctx.store(off, &new_c.to_be_bytes())?;
        }
        ctx.store(addr_off, &new.0)?;
        ctx.store(port_off, &new.1)?;
        ctx.store(self.ip + 10, &ip_c_new.to_be_bytes())?;
        ctx.store(icmp_check, &icmp_c.to_be_bytes())?;
        Ok(())
    }
}
