//! IPv4 and IPv6 CIDRs as operators write them.
//!
//! A network never has host bits set, so `contains` is one mask and compare; a bare address is a
//! single-address network (`/32`, `/128`). [`IpCidr`] is either family, for the flags that take
//! both (`--internal`, `--exclude`, `snat conns --source/--destination`); [`Ipv4Cidr`] and
//! [`Ipv6Cidr`] refuse the other family by name.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 network: address with no host bits set, and prefix length; in JSON (the control
/// socket) the string `a.b.c.d/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    len: u8,
}

/// An IPv6 network: address with no host bits set, and prefix length; in JSON the string
/// `addr/len` (the address as RFC 5952 writes it, e.g. `fd00:10::/64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv6Cidr {
    addr: Ipv6Addr,
    len: u8,
}

/// A network of either family, as `--internal` and `--exclude` take it; in JSON (the control
/// socket's `snat conns` filter) the string its family writes, so an IPv4 one reads as an
/// [`Ipv4Cidr`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IpCidr {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("invalid CIDR {0:?}: write an IPv4 network like 10.244.0.0/16")]
    Syntax(String),
    #[error("invalid CIDR {0:?}: write an IPv6 network like fd00:10::/64")]
    Syntax6(String),
    #[error("invalid CIDR {0:?}: write an IPv4 network like 10.244.0.0/16 or an IPv6 network like fd00:10::/64")]
    SyntaxAny(String),
    #[error("{0:?} is an IPv6 network, where only an IPv4 one fits: write one like 10.244.0.0/16")]
    Ipv6(String),
    #[error("{0:?} is an IPv4 network, where only an IPv6 one fits: write one like fd00:10::/64")]
    Ipv4(String),
    #[error("invalid CIDR {0:?}: the prefix length must be 0..=32")]
    Prefix(String),
    #[error("invalid CIDR {0:?}: the prefix length of an IPv6 network must be 0..=128")]
    Prefix6(String),
    #[error("invalid CIDR {input:?}: host bits are set; did you mean {network}?")]
    HostBits { input: String, network: Ipv4Cidr },
    #[error("invalid CIDR {input:?}: host bits are set; did you mean {network}?")]
    HostBits6 { input: String, network: Ipv6Cidr },
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
        if a.parse::<Ipv6Addr>().is_ok() {
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

impl Ipv6Cidr {
    pub fn new(addr: Ipv6Addr, len: u8) -> Option<Self> {
        (len <= 128 && u128::from(addr) & !Self::mask(len) == 0).then_some(Self { addr, len })
    }

    const fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        }
    }

    /// The network address (no host bits set).
    pub const fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask(self.len) == u128::from(self.addr)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv6Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.split_once('/').unwrap_or((s, "128"));
        if a.parse::<Ipv4Addr>().is_ok() {
            return Err(CidrError::Ipv4(s.to_owned()));
        }
        let addr: Ipv6Addr = a.parse().map_err(|_| CidrError::Syntax6(s.to_owned()))?;
        let len: u8 = l.parse().map_err(|_| CidrError::Syntax6(s.to_owned()))?;
        if len > 128 {
            return Err(CidrError::Prefix6(s.to_owned()));
        }
        Self::new(addr, len).ok_or_else(|| CidrError::HostBits6 {
            input: s.to_owned(),
            network: Self {
                addr: Ipv6Addr::from(u128::from(addr) & Self::mask(len)),
                len,
            },
        })
    }
}

impl TryFrom<String> for Ipv6Cidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv6Cidr> for String {
    fn from(c: Ipv6Cidr) -> Self {
        c.to_string()
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl IpCidr {
    /// Whether `ip` is in the network; never for an address of the other family.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4(c), IpAddr::V4(ip)) => c.contains(ip),
            (Self::V6(c), IpAddr::V6(ip)) => c.contains(ip),
            _ => false,
        }
    }
}

impl FromStr for IpCidr {
    type Err = CidrError;

    /// An address part with a `:` is IPv6, any other IPv4.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, _) = s.split_once('/').unwrap_or((s, ""));
        if a.contains(':') {
            return s.parse().map(Self::V6);
        }
        s.parse().map(Self::V4).map_err(|e| match e {
            CidrError::Syntax(s) => CidrError::SyntaxAny(s),
            e => e,
        })
    }
}

impl TryFrom<String> for IpCidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IpCidr> for String {
    fn from(c: IpCidr) -> Self {
        c.to_string()
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(c) => c.fmt(f),
            Self::V6(c) => c.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_family_is_named_as_such() {
        assert_eq!(
            "fd00:10::/64".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6("fd00:10::/64".into()))
        );
        assert_eq!(
            "2001:db8::1".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6("2001:db8::1".into()))
        );
        let e = "10.0.0.0/8".parse::<Ipv6Cidr>().unwrap_err();
        assert_eq!(e, CidrError::Ipv4("10.0.0.0/8".into()));
        assert!(e.to_string().contains("like fd00:10::/64"), "{e}");
    }

    #[test]
    fn ipv6_cidrs() {
        let c: Ipv6Cidr = "fd00:10::/64".parse().unwrap();
        assert_eq!(c.addr(), "fd00:10::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.prefix_len(), 64);
        assert_eq!(c.to_string(), "fd00:10::/64");
        assert!(c.contains("fd00:10::5".parse().unwrap()));
        assert!(c.contains("fd00:10::ffff:ffff:ffff:ffff".parse().unwrap()));
        assert!(!c.contains("fd00:11::5".parse().unwrap()));
        // Written long-hand, shown as RFC 5952 writes it.
        let long: Ipv6Cidr = "FD00:0010:0000:0000:0000:0000:0000:0000/64"
            .parse()
            .unwrap();
        assert_eq!(long, c);
        let one: Ipv6Cidr = "2001:db8::7".parse().unwrap();
        assert_eq!(one.prefix_len(), 128, "a bare address is a /128");
        assert!(one.contains("2001:db8::7".parse().unwrap()));
        assert!(!one.contains("2001:db8::8".parse().unwrap()));
        let all: Ipv6Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert_eq!(Ipv6Cidr::new("fd00::1".parse().unwrap(), 64), None);
        assert_eq!(Ipv6Cidr::new("fd00::".parse().unwrap(), 129), None);
        let wide: Ipv6Cidr = "fd00::/8".parse().unwrap();
        assert!(wide.overlaps(&c) && c.overlaps(&wide));
        assert!(!c.overlaps(&"fd00:11::/64".parse().unwrap()));
        // The control socket's JSON form.
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"fd00:10::/64\"");
        assert_eq!(
            serde_json::from_str::<Ipv6Cidr>("\"fd00:10::/64\"").unwrap(),
            c
        );
    }

    #[test]
    fn ipv6_cidr_errors_name_value_and_fix() {
        let e = "fd00:10::1/64".parse::<Ipv6Cidr>().unwrap_err().to_string();
        assert!(
            e.contains("\"fd00:10::1/64\"") && e.contains("did you mean fd00:10::/64"),
            "{e}"
        );
        let e = "fd00::/129".parse::<Ipv6Cidr>().unwrap_err();
        assert_eq!(e, CidrError::Prefix6("fd00::/129".into()));
        assert!(e.to_string().contains("0..=128"), "{e}");
        for bad in ["fd00::g/64", "fd00::/x", "fe80::1%eth0/64", ":::/64"] {
            let e = bad.parse::<Ipv6Cidr>().unwrap_err();
            assert_eq!(e, CidrError::Syntax6(bad.into()));
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn either_family() {
        assert_eq!(
            "10.244.0.0/16".parse::<IpCidr>(),
            Ok(IpCidr::V4("10.244.0.0/16".parse().unwrap()))
        );
        assert_eq!(
            "fd00:10::/64".parse::<IpCidr>(),
            Ok(IpCidr::V6("fd00:10::/64".parse().unwrap()))
        );
        assert_eq!(
            "fd00:10::/64".parse::<IpCidr>().unwrap().to_string(),
            "fd00:10::/64"
        );
        assert_eq!(
            "10.0.0.1".parse::<IpCidr>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        // Each family's own errors; a value of neither names both.
        assert!(matches!(
            "10.1.2.3/8".parse::<IpCidr>(),
            Err(CidrError::HostBits { .. })
        ));
        assert!(matches!(
            "fd00::1/8".parse::<IpCidr>(),
            Err(CidrError::HostBits6 { .. })
        ));
        assert!(matches!(
            "fd00::/200".parse::<IpCidr>(),
            Err(CidrError::Prefix6(_))
        ));
        let e = "pods".parse::<IpCidr>().unwrap_err();
        assert_eq!(e, CidrError::SyntaxAny("pods".into()));
        assert!(
            e.to_string().contains("10.244.0.0/16") && e.to_string().contains("fd00:10::/64"),
            "{e}"
        );
        assert!(matches!(
            "10.0.0.0/40".parse::<IpCidr>(),
            Err(CidrError::Prefix(_))
        ));
    }

    #[test]
    fn either_family_contains_only_its_own_addresses() {
        let v4: IpCidr = "0.0.0.0/0".parse().unwrap();
        let v6: IpCidr = "::/0".parse().unwrap();
        let (a4, a6): (IpAddr, IpAddr) = ("10.1.0.2".parse().unwrap(), "fd00::2".parse().unwrap());
        assert!(v4.contains(a4) && !v4.contains(a6));
        assert!(v6.contains(a6) && !v6.contains(a4));
        let pods: IpCidr = "fd00:10::/48".parse().unwrap();
        assert!(pods.contains("fd00:10:0:1::2".parse().unwrap()));
        assert!(!pods.contains("fd00:11::2".parse().unwrap()));
        // The control socket's JSON form: an IPv4 network as an `Ipv4Cidr` wrote it.
        for (text, c) in [
            ("\"10.1.0.0/24\"", "10.1.0.0/24"),
            ("\"fd00:10::/48\"", "fd00:10::/48"),
        ] {
            let c: IpCidr = c.parse().unwrap();
            assert_eq!(serde_json::to_string(&c).unwrap(), text);
            assert_eq!(serde_json::from_str::<IpCidr>(text).unwrap(), c);
        }
        let old: Ipv4Cidr = "10.1.0.0/24".parse().unwrap();
        assert_eq!(
            serde_json::from_str::<IpCidr>(&serde_json::to_string(&old).unwrap()).unwrap(),
            IpCidr::V4(old)
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
