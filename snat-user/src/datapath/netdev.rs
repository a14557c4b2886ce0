//! Facts about a network interface in the current network namespace: index, link type and IPv4
//! addresses (primary first). Uses the kernel's own interfaces (`if_nametoindex`, `getifaddrs`,
//! `SIOCGIFHWADDR`), not `/sys`, so it answers for the namespace the process runs in.

use std::{
    ffi::CString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::settings::Interface;

/// `ARPHRD_ETHER`: the only link type snat attaches to (its programs expect an Ethernet header).
const ARPHRD_ETHER: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("interface {0:?} does not exist in this network namespace; list interfaces with `ip -br link`")]
    NotFound(String),
    #[error("invalid interface name {0:?}: names are 1-15 bytes without '/', ':' or spaces")]
    BadName(String),
    #[error("interface {name:?} has link type {link_type}, not Ethernet (1); snat attaches to Ethernet links only")]
    NotEthernet { name: String, link_type: u16 },
    #[error("reading interface {0:?}")]
    Io(String, #[source] io::Error),
}

impl Interface {
    pub fn lookup(name: &str) -> Result<Self, NetdevError> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ':', ' ']) {
            return Err(NetdevError::BadName(name.to_owned()));
        }
        let c_name = CString::new(name).map_err(|_| NetdevError::BadName(name.to_owned()))?;
        // SAFETY: `c_name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(NetdevError::NotFound(name.to_owned()));
        }
        let link_type = link_type(name).map_err(|e| NetdevError::Io(name.to_owned(), e))?;
        if link_type != ARPHRD_ETHER {
            return Err(NetdevError::NotEthernet {
                name: name.to_owned(),
                link_type,
            });
        }
        let ipv4 = ipv4_addrs(name).map_err(|e| NetdevError::Io(name.to_owned(), e))?;
        Ok(Self {
            name: name.to_owned(),
            index,
            ipv4,
            ipv6: Interface::read_ipv6(index),
        })
    }
}

fn link_type(name: &str) -> io::Result<u16> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a valid `ifreq` with a NUL-terminated name (the name is < 16 bytes and
    // the rest is zero); SIOCGIFHWADDR writes only into it.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Every IPv4 address of every interface in this network namespace.
pub fn local_ipv4() -> io::Result<Vec<Ipv4Addr>> {
    addrs_where(|_| true, v4)
}

/// Every IPv6 address of this network namespace (a NAT IP among them is the node's own).
pub fn local_ipv6() -> io::Result<Vec<Ipv6Addr>> {
    addrs_where(
        |_| true,
        |a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        },
    )
}

fn ipv4_addrs(name: &str) -> io::Result<Vec<Ipv4Addr>> {
    addrs_where(|n| n == name.as_bytes(), v4)
}

fn v4(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The addresses (getifaddrs) of the interfaces whose name `wanted` accepts, as `pick` keeps them.
fn addrs_where<T>(
    wanted: impl Fn(&[u8]) -> bool,
    pick: impl Fn(IpAddr) -> Option<T>,
) -> io::Result<Vec<T>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: `ifa_name` is a NUL-terminated string owned by the list.
        let ifa_name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if wanted(ifa_name.to_bytes()) && !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points to a sockaddr of the family it states.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            let addr = if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a `sockaddr_in`.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a `sockaddr_in6`.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            } else {
                None
            };
            out.extend(addr.and_then(&pick));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_ethernet() {
        match Interface::lookup("lo") {
            Err(NetdevError::NotEthernet { link_type, .. }) => assert_eq!(link_type, 772),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_and_bad_names() {
        assert!(matches!(
            Interface::lookup("snat-nope0"),
            Err(NetdevError::NotFound(_))
        ));
        assert!(matches!(
            Interface::lookup("a/b"),
            Err(NetdevError::BadName(_))
        ));
        assert!(matches!(
            Interface::lookup(""),
            Err(NetdevError::BadName(_))
        ));
        assert!(matches!(
            Interface::lookup("sixteen-chars-xx"),
            Err(NetdevError::BadName(_))
        ));
    }
}
