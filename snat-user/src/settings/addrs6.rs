//! The uplink's IPv6 addresses that a default IPv6 NAT IP is chosen from, asked of the kernel with
//! an rtnetlink `RTM_GETADDR` dump (rtnetlink(7)), in the kernel's order (`ip -6 addr`'s).
//!
//! Netlink rather than getifaddrs(3), which `datapath::netdev` reads the IPv4 addresses with:
//! only netlink tells an address's scope and flags, and a temporary (privacy, RFC 8981),
//! deprecated or DAD-failed address is no NAT IP: it goes away or never answers. Kept are the
//! addresses of scope global (ULAs included), tentative ones too (DAD ends within seconds of an
//! address's creation, and an agent started with the interface must not miss it).
//!
//! It sits in settings so that NAT66's settings came without touching the datapath; its place is
//! next to `datapath::netdev`'s IPv4 reader.

use std::{
    io,
    mem::size_of,
    net::Ipv6Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::Interface;

/// netlink(7) message types and flags.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
/// rtnetlink(7): address messages and their attributes (`linux/if_addr.h`).
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const RT_SCOPE_UNIVERSE: u8 = 0;
const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
/// `nlmsghdr` and `ifaddrmsg` sizes.
const NLMSG_HDR: usize = 16;
const IFADDRMSG: usize = 8;

/// One IPv6 address as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Addr6 {
    index: u32,
    addr: Ipv6Addr,
    scope: u8,
    flags: u32,
}

impl Addr6 {
    /// Whether a default NAT IP may be this address.
    fn candidate(&self) -> bool {
        self.scope == RT_SCOPE_UNIVERSE
            && self.flags & (IFA_F_TEMPORARY | IFA_F_DEPRECATED | IFA_F_DADFAILED) == 0
    }
}

impl Interface {
    /// The IPv6 addresses of interface `index` a default NAT IP may be ([`Interface::ipv6`]).
    /// A kernel that cannot say (e.g. IPv6 disabled) has none for it: an IPv6 `--internal`
    /// then needs `--nat-ip`, as the validation says; IPv4 is not held up by it.
    pub fn read_ipv6(index: u32) -> Vec<Ipv6Addr> {
        match dump() {
            Ok(all) => all
                .iter()
                .filter(|a| a.index == index && a.candidate())
                .map(|a| a.addr)
                .collect(),
            Err(e) => {
                log::debug!("reading the IPv6 addresses of interface {index}: {e}");
                Vec::new()
            }
        }
    }
}

/// Every IPv6 address of this network namespace, in the kernel's order.
fn dump() -> io::Result<Vec<Addr6>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads the `timeval` we pass; a receive timeout keeps a silent kernel
    // from blocking the agent's start.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    let len = NLMSG_HDR + IFADDRMSG;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_GETADDR.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 0, 0, 0]); // family, prefix, flags, scope
    msg.extend_from_slice(&0u32.to_ne_bytes()); // every interface

    // SAFETY: send(2) of our buffer.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    // Bounded: a dump of thousands of addresses ends well within this many datagrams.
    for _ in 0..4096 {
        // SAFETY: recv(2) into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "the kernel's address dump did not end",
    ))
}

/// Adds the IPv6 addresses of one datagram of the dump to `out`; true at its end.
fn parse(buf: &[u8], out: &mut Vec<Addr6>) -> io::Result<bool> {
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let mlen = u32_at(buf, at) as usize;
        let kind = u16_at(buf, at + 4);
        if mlen < NLMSG_HDR || at + mlen > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated netlink message",
            ));
        }
        let body = &buf[at + NLMSG_HDR..at + mlen];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR if body.len() >= 4 => {
                let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            RTM_NEWADDR if body.len() >= IFADDRMSG && i32::from(body[0]) == libc::AF_INET6 => {
                let (scope, index) = (body[3], u32_at(body, 4));
                let (mut flags, mut address, mut local) = (u32::from(body[2]), None, None);
                let attrs = &body[IFADDRMSG..];
                let mut a = 0;
                while a + 4 <= attrs.len() {
                    let alen = usize::from(u16_at(attrs, a));
                    if alen < 4 || a + alen > attrs.len() {
                        break;
                    }
                    let value = &attrs[a + 4..a + alen];
                    match (u16_at(attrs, a + 2), value.len()) {
                        (IFA_ADDRESS, 16) => address = <[u8; 16]>::try_from(value).ok(),
                        (IFA_LOCAL, 16) => local = <[u8; 16]>::try_from(value).ok(),
                        (IFA_FLAGS, 4) => flags = u32_at(value, 0),
                        _ => {}
                    }
                    a += (alen + 3) & !3;
                }
                // With a peer, IFA_LOCAL is the interface's own address and IFA_ADDRESS the peer.
                if let Some(octets) = local.or(address) {
                    out.push(Addr6 {
                        index,
                        addr: Ipv6Addr::from(octets),
                        scope,
                        flags,
                    });
                }
            }
            _ => {}
        }
        at += (mlen + 3) & !3;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `RTM_NEWADDR` message as the kernel sends it.
    fn newaddr(index: u32, addr: &str, scope: u8, flags: u32, local: Option<&str>) -> Vec<u8> {
        let mut attrs = Vec::new();
        let mut put = |kind: u16, value: &[u8]| {
            attrs.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            attrs.extend_from_slice(&kind.to_ne_bytes());
            attrs.extend_from_slice(value);
        };
        put(IFA_ADDRESS, &addr.parse::<Ipv6Addr>().unwrap().octets());
        if let Some(l) = local {
            put(IFA_LOCAL, &l.parse::<Ipv6Addr>().unwrap().octets());
        }
        put(IFA_FLAGS, &flags.to_ne_bytes());
        let len = NLMSG_HDR + IFADDRMSG + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[libc::AF_INET6 as u8, 64, flags as u8, scope]);
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn a_dump_is_read_in_order_and_filtered() {
        let mut buf = newaddr(4, "2001:db8::5", 0, IFA_F_TEMPORARY, None);
        buf.extend(newaddr(4, "2001:db8::1", 0, 0x80, None)); // permanent
        buf.extend(newaddr(4, "2001:db8::2", 0, IFA_F_DEPRECATED, None));
        buf.extend(newaddr(4, "fd00::2", 0, 0x40, None)); // tentative: kept
        buf.extend(newaddr(4, "fe80::1", 253, 0x80, None));
        buf.extend(newaddr(5, "2001:db8:5::1", 0, 0, None));
        buf.extend(newaddr(4, "2001:db8:9::9", 0, 0, Some("2001:db8:9::1")));
        let mut out = Vec::new();
        assert!(!parse(&buf, &mut out).unwrap(), "no NLMSG_DONE yet");
        let on4: Vec<String> = out
            .iter()
            .filter(|a| a.index == 4 && a.candidate())
            .map(|a| a.addr.to_string())
            .collect();
        assert_eq!(on4, ["2001:db8::1", "fd00::2", "2001:db8:9::1"]);
        let mut done = Vec::new();
        done.extend_from_slice(&(NLMSG_HDR as u32 + 4).to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert!(parse(&done, &mut out).unwrap());
        assert!(parse(&buf[..20], &mut out).is_err(), "a truncated message");
    }

    #[test]
    fn the_kernel_answers() {
        // Loopback's ::1 has host scope: listed, never a candidate.
        let all = dump().expect("an address dump");
        // SAFETY: a NUL-terminated literal.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        let ipv6_on_lo = std::fs::read_to_string("/proc/net/if_inet6")
            .is_ok_and(|t| t.lines().any(|l| l.starts_with(&"0".repeat(31))));
        if ipv6_on_lo {
            assert!(all
                .iter()
                .any(|a| a.index == lo && a.addr == Ipv6Addr::LOCALHOST && !a.candidate()));
        }
        assert!(!Interface::read_ipv6(lo).contains(&Ipv6Addr::LOCALHOST));
    }
}
