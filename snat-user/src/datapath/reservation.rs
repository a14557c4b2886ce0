//! The host's own ports while snat runs: `net.ipv4.ip_local_reserved_ports` keeps the node's
//! ephemeral connections off the SNAT range (the rule is `settings::ports::reservation`), and is
//! put back as it was found when the agent stops.

use std::path::Path;

use super::error::{DatapathError, Doing as _};

use crate::settings::ports::{reservation, PortList, PortRange};

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The host's ephemeral range in this network namespace.
pub fn host_ephemeral() -> std::io::Result<PortRange> {
    let text = std::fs::read_to_string(PORT_RANGE)?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok(PortRange { lo, hi }),
        _ => Err(std::io::Error::other(format!(
            "unexpected {PORT_RANGE}: {text:?}"
        ))),
    }
}

/// `ip_local_reserved_ports` as snat found it, put back when dropped.
pub struct HostReservation {
    previous: String,
    keep: bool,
}

impl HostReservation {
    /// Applies the reservation for `range` in this network namespace. `found` is the value an
    /// earlier agent recorded before it changed anything (when taking over its state); else the
    /// current value is the one to restore. Returns the guard (if a value was written), the value
    /// to restore at the end, and the warnings to show.
    pub fn apply(
        range: PortRange,
        found: Option<String>,
    ) -> Result<(Option<Self>, String, Vec<String>), DatapathError> {
        let previous = match found {
            Some(v) => v,
            None => std::fs::read_to_string(RESERVED)?.trim().to_owned(),
        };
        let base: PortList = previous.parse().doing(|| RESERVED.into())?;
        let plan = reservation(range, host_ephemeral()?, &base);
        let Some(value) = plan.reserved else {
            // Nothing of ours to keep: make sure an earlier agent's reservation is gone too.
            write(Path::new(RESERVED), &previous)?;
            return Ok((None, previous, plan.warnings));
        };
        write(Path::new(RESERVED), &value.to_string())?;
        Ok((
            Some(Self {
                previous: previous.clone(),
                keep: false,
            }),
            previous,
            plan.warnings,
        ))
    }

    /// Re-applies for a new range on top of the value snat found.
    pub fn update(&self, range: PortRange) -> Result<Vec<String>, DatapathError> {
        let base: PortList = self.previous.parse().doing(|| RESERVED.into())?;
        let plan = reservation(range, host_ephemeral()?, &base);
        write(
            Path::new(RESERVED),
            &plan.reserved.unwrap_or(base).to_string(),
        )?;
        Ok(plan.warnings)
    }

    /// Leaves the reservation in place (the state, and the programs using it, stay behind).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for HostReservation {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = write(Path::new(RESERVED), &self.previous) {
            log::warn!("could not restore {RESERVED} to {:?}: {e}", self.previous);
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), DatapathError> {
    // An empty value is written as a newline: the kernel rejects an empty write.
    std::fs::write(path, format!("{value}\n"))
        .doing(|| format!("writing {value:?} to {}", path.display()))
}
