//! IPv4 CIDRs as operators write them.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 network: address with no host bits set, and prefix length; in JSON (the control
/// socket) the string `a.b.c.d/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("invalid CIDR {0:?}: write an IPv4 network like 10.244.0.0/16")]
    Syntax(String),
    #[error("{0:?} is an IPv6 network: snat translates IPv4 only for now (IPv6 NAT is not built yet) and leaves the pods' IPv6 traffic as the node routes it; give only IPv4 CIDRs")]
    Ipv6(String),
    #[error("invalid CIDR {0:?}: the prefix length must be 0..=32")]
    Prefix(String),
    #[error("invalid CIDR {input:?}: host bits are set; did you mean {network}?")]
    HostBits { input: String, network: Ipv4Cidr },
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32 && u32::from(addr) & !Self::mask(len) == 0).then_some(Self { addr, len })
    }

    const fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len)
        }
    }

    pub const fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        if a.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(CidrError::Ipv6(s.to_owned()));
        }
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let len: u8 = l.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        if len > 32 {
            return Err(CidrError::Prefix(s.to_owned()));
        }
        Self::new(addr, len).ok_or_else(|| CidrError::HostBits {
            input: s.to_owned(),
            network: Self {
                addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
                len,
            },
        })
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> Self {
        c.to_string()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_network_is_named_as_such() {
        assert_eq!(
            "fd00:10::/64".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6("fd00:10::/64".into()))
        );
        assert_eq!(
            "2001:db8::1".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6("2001:db8::1".into()))
        );
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 244, 3, 4)));
        assert!(!c.contains(Ipv4Addr::new(10, 245, 0, 0)));
        assert_eq!("10.0.0.1".parse::<Ipv4Cidr>().unwrap().prefix_len(), 32);
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().prefix_len(), 0);
        assert!("0.0.0.0/0"
            .parse::<Ipv4Cidr>()
            .unwrap()
            .contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn cidr_errors_name_value_and_fix() {
        let e = "10.1.2.3/8".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(
            e.contains("10.1.2.3/8") && e.contains("did you mean 10.0.0.0/8"),
            "{e}"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "pods".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
        ));
    }

    #[test]
    fn overlaps() {
        let a: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Ipv4Cidr = "10.1.0.0/16".parse().unwrap();
        let c: Ipv4Cidr = "11.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }
}
