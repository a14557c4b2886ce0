//! `--pod-iface`: which of the node's interfaces lead to pods, where the hairpin program runs.
//! A name, or a prefix ending in `*` (`cali*`, as Calico's `interfacePrefix`), matched against
//! the interfaces of the agent's network namespace as they come and go.

use std::{fmt, str::FromStr};

/// Longest interface name (`IFNAMSIZ` − 1).
const IFNAME_MAX: usize = 15;

/// One `--pod-iface` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodIface {
    /// Exactly this interface.
    Name(String),
    /// Every interface whose name starts with this (non-empty) prefix.
    Prefix(String),
}

impl PodIface {
    /// Whether the interface `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            PodIface::Name(n) => n == name,
            PodIface::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for PodIface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodIface::Name(n) => f.write_str(n),
            PodIface::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--pod-iface {0:?}: give an interface name (1-15 bytes without '/', ':', spaces or '*') or a prefix followed by '*', e.g. cali*")]
pub struct BadPodIface(pub String);

impl FromStr for PodIface {
    type Err = BadPodIface;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPodIface(s.to_owned());
        let (name, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        if name.is_empty()
            || name.len() > IFNAME_MAX
            || name.contains(['/', ':', ' ', '*'])
            || (prefix && name.len() == IFNAME_MAX)
        {
            return Err(bad());
        }
        Ok(if prefix {
            PodIface::Prefix(name.to_owned())
        } else {
            PodIface::Name(name.to_owned())
        })
    }
}

/// The interfaces of `all` (name, index) that one of `patterns` matches, the uplink (`uplink`,
/// an index) and loopback never among them.
pub fn select(patterns: &[PodIface], all: &[(String, u32)], uplink: u32) -> Vec<(String, u32)> {
    all.iter()
        .filter(|(name, index)| {
            *index != uplink && name != "lo" && patterns.iter().any(|p| p.matches(name))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_prefixes() {
        assert_eq!("cali*".parse(), Ok(PodIface::Prefix("cali".into())));
        assert_eq!("cni0".parse(), Ok(PodIface::Name("cni0".into())));
        for bad in [
            "",
            "*",
            "a*b",
            "a**",
            "x/y",
            "sixteen-bytes-xx",
            "fifteen-bytes-x*",
        ] {
            assert_eq!(
                bad.parse::<PodIface>(),
                Err(BadPodIface(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "fourteen-bytes*".parse(),
            Ok(PodIface::Prefix("fourteen-bytes".into()))
        );
    }

    #[test]
    fn selects_matching_interfaces_but_never_the_uplink_or_loopback() {
        let all = [
            ("lo".to_owned(), 1),
            ("eth0".to_owned(), 2),
            ("cali1".to_owned(), 3),
            ("cali2".to_owned(), 4),
            ("cni0".to_owned(), 5),
        ];
        let pats = ["cali*".parse().unwrap(), "cni0".parse().unwrap()];
        assert_eq!(
            select(&pats, &all, 2),
            vec![
                ("cali1".to_owned(), 3),
                ("cali2".to_owned(), 4),
                ("cni0".to_owned(), 5)
            ]
        );
        // A prefix that also names the uplink: the uplink is still left out.
        let e: PodIface = "eth*".parse().unwrap();
        assert!(select(&[e], &all, 2).is_empty());
        let l: PodIface = "l*".parse().unwrap();
        assert!(select(&[l], &all, 2).is_empty());
    }
}
