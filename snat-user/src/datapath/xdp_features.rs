//! Whether an interface's driver runs XDP programs itself (native XDP), asked of the kernel
//! before anything is attached: the `netdev` generic netlink family's `dev-get`, whose
//! `xdp-features` lists what the driver supports (kernel 6.3 and later; `NETDEV_XDP_ACT_BASIC`
//! means native XDP that can pass and drop). An older kernel has no such family: then nobody
//! knows until an attach is tried.

use std::{io, mem::size_of, os::fd::FromRawFd as _, os::fd::OwnedFd};

use std::os::fd::AsRawFd as _;

/// `NLMSG_ERROR`, `NLM_F_REQUEST`, `NLM_F_ACK`: netlink(7).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// The generic netlink controller and its `getfamily` command (genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// The `netdev` family (Documentation/netlink/specs/netdev.yaml): `dev-get` and its attributes.
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `xdp-act` bit: XDP programs that pass and drop run in the driver.
const NETDEV_XDP_ACT_BASIC: u64 = 1;

/// Whether the driver of interface `ifindex` runs XDP natively; `None` when the kernel cannot
/// say (no `netdev` netlink family).
pub fn native(ifindex: u32) -> io::Result<Option<bool>> {
    let sock = Genl::open()?;
    let Some(family) = sock.family_id("netdev")? else {
        return Ok(None);
    };
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
    let reply = sock.request(family, NETDEV_CMD_DEV_GET, &attrs)?;
    Ok(attr(&reply, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| v.get(..8))
        .map(|v| {
            let f = u64::from_ne_bytes(v.try_into().unwrap_or_default());
            f & NETDEV_XDP_ACT_BASIC != 0
        }))
}

struct Genl(OwnedFd);

impl Genl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads the `timeval` we pass; a receive timeout keeps a silent
        // kernel from blocking the agent's start.
        unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    }

    /// The id of generic netlink family `name`, `None` if the kernel has none.
    fn family_id(&self, name: &str) -> io::Result<Option<u16>> {
        let mut attrs = Vec::new();
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &cname);
        match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &attrs) {
            Ok(reply) => Ok(attr(&reply, CTRL_ATTR_FAMILY_ID)
                .and_then(|v| v.get(..2))
                .map(|v| u16::from_ne_bytes([v[0], v[1]]))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one request and returns the attributes of its answer (after the genl header).
    fn request(&self, family: u16, cmd: u8, attrs: &[u8]) -> io::Result<Vec<u8>> {
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        msg.extend_from_slice(&[cmd, 1, 0, 0]); // genl header: command, version 1
        msg.extend_from_slice(attrs);
        // SAFETY: send(2) of our buffer.
        if unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        // Bounded: an answer, then at most its ACK.
        for _ in 0..4 {
            // SAFETY: recv(2) into our buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            let mut at = 0;
            while at + 16 <= n {
                let mlen =
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if mlen < 16 || at + mlen > n {
                    break;
                }
                if kind == NLMSG_ERROR {
                    let code =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                } else if kind == family && mlen >= 20 {
                    return Ok(buf[at + 20..at + mlen].to_vec());
                }
                at += (mlen + 3) & !3;
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no answer from generic netlink",
        ))
    }
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize((out.len() + 3) & !3, 0);
}

/// The value of the first attribute `kind` in `attrs`.
fn attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let len = usize::from(u16::from_ne_bytes([attrs[at], attrs[at + 1]]));
        let k = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]) & 0x3fff;
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if k == kind {
            return Some(&attrs[at + 4..at + len]);
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut a = Vec::new();
        put_attr(&mut a, 1, &7u32.to_ne_bytes());
        put_attr(&mut a, 2, b"netdev\0");
        put_attr(&mut a, 3, &5u64.to_ne_bytes());
        assert_eq!(attr(&a, 2), Some(&b"netdev\0"[..]));
        assert_eq!(attr(&a, 3), Some(&5u64.to_ne_bytes()[..]));
        assert_eq!(attr(&a, 9), None);
    }

    #[test]
    fn loopback_answers_or_the_kernel_cannot_say() {
        // Loopback's driver has no native XDP; a kernel without the netdev family says nothing.
        // SAFETY: a NUL-terminated literal.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(native(lo).expect("asking the kernel"), Some(true));
    }
}
