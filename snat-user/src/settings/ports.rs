//! Port ranges (`LO:HI`, like Calico's `natPortRange`) and lists of ports as Linux writes them
//! (`30000-32767,40000`), and the rule for snat's place among the host's own ports: `net.ipv4.ip_local_reserved_ports` keeps the host's ephemeral connections off the
//! SNAT range while the agent runs (restored on exit), and `--reserved-ports` (the NodePort range
//! by default) is never handed out.
//!
//! The reservation rule (pure: [`reservation`]): snat reserves its range unless that would leave
//! the host fewer than [`MIN_HOST_EPHEMERAL`] ephemeral ports; then it shares the overlap with the
//! host (the datapath still skips ports the host's sockets use) and says how to separate them.

use std::{fmt, str::FromStr};

/// Ephemeral ports the host must keep for its own connections.
pub const MIN_HOST_EPHEMERAL: u32 = 1024;

/// An inclusive range of ports, `LO:HI` like Calico's `natPortRange` (`LO-HI` is accepted too);
/// in JSON (the control socket) the same string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("invalid port range {0:?}: write LO:HI with 1 <= LO <= HI <= 65535, e.g. 32768:65535")]
    Syntax(String),
    #[error(
        "invalid port range {0:?}: ports are 1..=65535 (port 0 cannot be used); e.g. 32768:65535"
    )]
    OutOfBounds(String),
    #[error("invalid port range {0:?}: LO is above HI; swap them, e.g. {1}:{2}")]
    Reversed(String, u16, u16),
}

impl PortRange {
    pub const DEFAULT: PortRange = PortRange {
        lo: 32768,
        hi: 65535,
    };

    /// How many ports the range holds (never 0).
    pub const fn size(&self) -> u32 {
        self.hi as u32 - self.lo as u32 + 1
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s
            .split_once([':', '-'])
            .ok_or_else(|| PortRangeError::Syntax(s.to_owned()))?;
        let num = |p: &str| -> Result<u32, PortRangeError> {
            p.trim()
                .parse::<u32>()
                .map_err(|_| PortRangeError::Syntax(s.to_owned()))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo == 0 || hi == 0 || lo > 65535 || hi > 65535 {
            return Err(PortRangeError::OutOfBounds(s.to_owned()));
        }
        let (lo, hi) = (lo as u16, hi as u16);
        if lo > hi {
            return Err(PortRangeError::Reversed(s.to_owned(), hi, lo));
        }
        Ok(Self { lo, hi })
    }
}

impl TryFrom<String> for PortRange {
    type Error = PortRangeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        r.to_string()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.lo, self.hi)
    }
}

/// A set of ports, kept as sorted, merged inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(Vec<PortRange>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid port list {0:?}: write ports and ranges separated by commas, e.g. 30000-32767,40000"
)]
pub struct PortListError(String);

impl PortList {
    pub fn new(ranges: impl IntoIterator<Item = PortRange>) -> Self {
        let mut v: Vec<PortRange> = ranges.into_iter().collect();
        v.sort_by_key(|r| r.lo);
        let mut out: Vec<PortRange> = Vec::new();
        for r in v {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(r.hi)
                }
                _ => out.push(r),
            }
        }
        Self(out)
    }

    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first range of `self` that shares a port with `r`.
    pub fn overlap(&self, r: PortRange) -> Option<PortRange> {
        self.0
            .iter()
            .find(|x| x.lo <= r.hi && r.lo <= x.hi)
            .copied()
    }

    pub fn with(&self, r: PortRange) -> Self {
        Self::new(self.0.iter().copied().chain([r]))
    }

    /// How many ports of `r` are not in `self`.
    pub fn count_outside(&self, r: PortRange) -> u32 {
        let inside: u32 = self
            .0
            .iter()
            .map(|x| {
                let (lo, hi) = (x.lo.max(r.lo), x.hi.min(r.hi));
                if lo <= hi {
                    u32::from(hi) - u32::from(lo) + 1
                } else {
                    0
                }
            })
            .sum();
        r.size() - inside
    }
}

impl FromStr for PortList {
    type Err = PortListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortListError(s.to_owned());
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let lo: u16 = lo.trim().parse().map_err(|_| err())?;
            let hi: u16 = hi.trim().parse().map_err(|_| err())?;
            if lo == 0 || lo > hi {
                return Err(err());
            }
            ranges.push(PortRange { lo, hi });
        }
        Ok(Self::new(ranges))
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.lo == r.hi {
                write!(f, "{}", r.lo)?;
            } else {
                write!(f, "{}-{}", r.lo, r.hi)?;
            }
        }
        Ok(())
    }
}

/// What snat does with the host's port settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The value to write to `ip_local_reserved_ports`, if any.
    pub reserved: Option<PortList>,
    pub warnings: Vec<String>,
}

/// Decides the reservation for SNAT range `range`, given the host's ephemeral range and its
/// current reserved ports.
pub fn reservation(range: PortRange, host: PortRange, reserved: &PortList) -> Reservation {
    let with_ours = reserved.with(range);
    let host_left = with_ours.count_outside(host);
    let overlaps = host.lo <= range.hi && range.lo <= host.hi;
    if !overlaps || host_left >= MIN_HOST_EPHEMERAL {
        let mut warnings = Vec::new();
        if overlaps {
            warnings.push(format!(
                "--port-range {range} overlaps the host's ephemeral ports (net.ipv4.ip_local_port_range {}-{}); snat reserves its range while it runs, leaving the host {host_left} of them",
                host.lo, host.hi
            ));
        }
        return Reservation {
            reserved: Some(with_ours),
            warnings,
        };
    }
    // Suggest splitting: the host keeps 8192 ports from its lower bound, snat takes the rest.
    let mid = (u32::from(host.lo) + 8192).min(u32::from(range.hi)) as u16;
    Reservation {
        reserved: None,
        warnings: vec![format!(
            "--port-range {range} covers the host's ephemeral ports (net.ipv4.ip_local_port_range {}-{}); reserving it would leave the host {host_left}, so snat shares them: it skips ports the host's sockets use, but a connection the host opens later may pick a port a pod holds towards the same destination. To separate them, e.g. --port-range {mid}:{} with sysctl net.ipv4.ip_local_port_range=\"{} {}\"",
            host.lo,
            host.hi,
            range.hi,
            host.lo,
            mid - 1,
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    #[test]
    fn lists_parse_merge_and_print_like_the_kernel() {
        let l: PortList = "40000,30000-32767, 32768-33000,5".parse().unwrap();
        assert_eq!(l.to_string(), "5,30000-33000,40000");
        assert_eq!("".parse::<PortList>().unwrap(), PortList::default());
        assert!("30000-2".parse::<PortList>().is_err());
        assert!("x"
            .parse::<PortList>()
            .unwrap_err()
            .to_string()
            .contains("e.g. 30000-32767,40000"));
        assert_eq!(l.overlap(r("32000:32100")), Some(r("30000:33000")));
        assert_eq!(l.overlap(r("34000:39999")), None);
        assert_eq!(l.count_outside(r("32990:33009")), 9);
    }

    #[test]
    fn a_range_outside_the_host_range_is_reserved_quietly() {
        let res = reservation(
            r("61000:65535"),
            r("32768:60999"),
            &"30000-32767".parse().unwrap(),
        );
        assert_eq!(res.reserved.unwrap().to_string(), "30000-32767,61000-65535");
        assert!(res.warnings.is_empty());
    }

    #[test]
    fn a_partial_overlap_is_reserved_with_a_warning() {
        let res = reservation(r("50000:65535"), r("32768:60999"), &PortList::default());
        assert_eq!(res.reserved.unwrap().to_string(), "50000-65535");
        assert!(
            res.warnings[0].contains("leaving the host 17232"),
            "{:?}",
            res.warnings
        );
    }

    #[test]
    fn covering_the_host_range_shares_it_and_says_how_to_separate() {
        let res = reservation(r("32768:65535"), r("32768:60999"), &PortList::default());
        assert_eq!(res.reserved, None);
        assert!(
            res.warnings[0].contains("snat shares them")
                && res.warnings[0].contains("ip_local_port_range"),
            "{:?}",
            res.warnings
        );
    }

    #[test]
    fn port_ranges() {
        assert_eq!("32768:65535".parse(), Ok(PortRange::DEFAULT));
        assert_eq!("1000-1009".parse::<PortRange>().unwrap().size(), 10);
        assert_eq!("5:5".parse::<PortRange>().unwrap().size(), 1);
        assert!(matches!(
            "0:100".parse::<PortRange>(),
            Err(PortRangeError::OutOfBounds(_))
        ));
        assert!(matches!(
            "1:65536".parse::<PortRange>(),
            Err(PortRangeError::OutOfBounds(_))
        ));
        assert!(matches!(
            "100".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        let e = "65535:32768".parse::<PortRange>().unwrap_err().to_string();
        assert!(e.contains("swap them, e.g. 32768:65535"), "{e}");
    }
}
