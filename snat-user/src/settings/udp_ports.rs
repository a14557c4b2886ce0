//! `--udp-timeout-for PORT=DURATION`: shorter (or longer) idle timeouts for UDP flows to
//! particular well-known destination ports, which RFC 4787 REQ-5a allows ("the value of the
//! NAT UDP mapping timer MAY be configurable … for specific destination ports"). The default,
//! `53=30s`, gives DNS queries their port back after 30 s, as netfilter's conntrack does, instead
//! of holding it for the general `--udp-timeout` (5 m).
//!
//! Invariant: a parsed [`PortTimeout`] names a port from 1 to [`MAX_WELL_KNOWN`] and a timeout
//! within [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`]; [`collect`] refuses a port named twice.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use super::duration::{self, Human};

/// Highest well-known port (RFC 6335: 0–1023 are the System Ports).
pub const MAX_WELL_KNOWN: u16 = 1023;
/// Bounds of a per-port timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

/// One `--udp-timeout-for` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortTimeout {
    /// `none`: no per-port timeouts (every UDP flow gets `--udp-timeout`).
    None,
    /// `PORT=DURATION`.
    For { port: u16, timeout: Duration },
}

/// A `--udp-timeout-for` value that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortTimeoutError {
    #[error("{0:?} is not PORT=DURATION: write e.g. 53=30s (or none for no per-port timeouts)")]
    Form(String),
    #[error("{0:?} is not a port number: write a well-known destination port from 1 to {MAX_WELL_KNOWN}, e.g. 53=30s")]
    Port(String),
    #[error("port {0} is not a well-known port (1 to {MAX_WELL_KNOWN}): RFC 4787 REQ-5a allows other timers only for well-known destination ports; flows to port {0} keep --udp-timeout")]
    NotWellKnown(u16),
    #[error("{0}")]
    Duration(String),
    #[error(
        "{port}={value}: the timeout is out of range: use {} to {}, e.g. {port}=30s",
        Human(MIN_TIMEOUT),
        Human(MAX_TIMEOUT)
    )]
    Range { port: u16, value: String },
}

impl FromStr for PortTimeout {
    type Err = PortTimeoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "none" {
            return Ok(Self::None);
        }
        let (port, timeout) = s
            .split_once('=')
            .ok_or_else(|| PortTimeoutError::Form(s.to_owned()))?;
        let port: u16 = match port.trim().parse() {
            Ok(p) if p > 0 => p,
            _ => return Err(PortTimeoutError::Port(port.trim().to_owned())),
        };
        if port > MAX_WELL_KNOWN {
            return Err(PortTimeoutError::NotWellKnown(port));
        }
        let timeout =
            duration::parse(timeout).map_err(|e| PortTimeoutError::Duration(e.to_string()))?;
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(PortTimeoutError::Range {
                port,
                value: timeout_text(timeout),
            });
        }
        Ok(Self::For { port, timeout })
    }
}

fn timeout_text(d: Duration) -> String {
    Human(d).to_string()
}

impl fmt::Display for PortTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::For { port, timeout } => write!(f, "{port}={}", Human(*timeout)),
        }
    }
}

/// The per-port timeouts a list of `--udp-timeout-for` values asks for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortListError {
    #[error("--udp-timeout-for names port {port} twice ({first} and {second}): give each port once (flags given on the command line replace the whole udp-timeout-for list of a --config file)")]
    Duplicate {
        port: u16,
        first: String,
        second: String,
    },
    #[error("--udp-timeout-for none cannot be combined with PORT=DURATION values: give none alone, or only the ports you want")]
    NoneWithOthers,
}

/// Port → timeout, from the values in the order given.
pub fn collect(values: &[PortTimeout]) -> Result<BTreeMap<u16, Duration>, PortListError> {
    let mut out = BTreeMap::new();
    if values.contains(&PortTimeout::None) {
        return if values.len() == 1 {
            Ok(out)
        } else {
            Err(PortListError::NoneWithOthers)
        };
    }
    for v in values {
        if let PortTimeout::For { port, timeout } = *v {
            if let Some(first) = out.insert(port, timeout) {
                return Err(PortListError::Duplicate {
                    port,
                    first: timeout_text(first),
                    second: timeout_text(timeout),
                });
            }
        }
    }
    Ok(out)
}

/// The default list: DNS.
pub fn defaults() -> BTreeMap<u16, Duration> {
    BTreeMap::from([(53, Duration::from_secs(30))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_none() {
        assert_eq!(
            "53=30s".parse(),
            Ok(PortTimeout::For {
                port: 53,
                timeout: Duration::from_secs(30)
            })
        );
        assert_eq!(
            " 123 = 1m ".parse::<PortTimeout>().unwrap().to_string(),
            "123=1m"
        );
        assert_eq!("none".parse(), Ok(PortTimeout::None));
    }

    #[test]
    fn errors_name_the_value_and_the_fix() {
        for (bad, needle) in [
            ("53", "\"53\" is not PORT=DURATION: write e.g. 53=30s"),
            ("dns=30s", "\"dns\" is not a port number"),
            ("0=30s", "\"0\" is not a port number"),
            ("70000=30s", "\"70000\" is not a port number"),
            ("5353=30s", "port 5353 is not a well-known port (1 to 1023)"),
            ("1024=30s", "port 1024 is not a well-known port"),
            ("53=30", "e.g. 15s"),
            (
                "53=500ms",
                "53=500ms: the timeout is out of range: use 1s to 2h",
            ),
            ("53=3h", "53=3h: the timeout is out of range"),
        ] {
            let e = bad.parse::<PortTimeout>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        assert!("1023=1s".parse::<PortTimeout>().is_ok());
        assert!("1=2h".parse::<PortTimeout>().is_ok());
    }

    #[test]
    fn lists_refuse_duplicates_and_mixed_none() {
        let v = |s: &str| s.parse::<PortTimeout>().unwrap();
        assert_eq!(
            collect(&[v("53=30s"), v("123=1m")]).unwrap(),
            BTreeMap::from([
                (53, Duration::from_secs(30)),
                (123, Duration::from_secs(60))
            ])
        );
        let e = collect(&[v("53=30s"), v("53=1m")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("names port 53 twice (30s and 1m): give each port once"),
            "{e}"
        );
        assert_eq!(collect(&[v("none")]).unwrap(), BTreeMap::new());
        assert_eq!(
            collect(&[v("none"), v("53=30s")]),
            Err(PortListError::NoneWithOthers)
        );
    }
}
