//! The controller's side of `SNAT_USE`: the fair-share hints the datapath divides by, and the
//! early warnings before a destination or a source runs out of what it may use.
//!
//! Both read only the use counts the datapath and the release program keep, so a pass costs one
//! walk of `SNAT_USE` (entries ≈ sources + destinations + pairs), not of the mappings.

use std::collections::{BTreeMap, HashMap};

use log::warn;
use snat_common::{
    flow::{proto, use_count, use_kind},
    Addr, Proto, UseKeyOf,
};

use crate::{
    datapath::{batch, DatapathError, Tables, Tables6, TablesOf},
    settings::Settings,
};

/// How labels and logs name the protocol number `p`.
fn proto_name(p: u8) -> &'static str {
    Proto::from_number(p).map_or("other", Proto::name)
}

/// Warning levels, in percent of what a destination or source may use.
pub const LEVELS: [u32; 2] = [80, 95];

/// Who is saturated at which level, and how often a level was crossed.
#[derive(Clone, Debug, Default)]
pub struct Saturation {
    /// (kind, subject) → highest level reached (only subjects at or above the first level).
    pub current: HashMap<(&'static str, String), u32>,
    /// (kind, level) → times a subject rose to it.
    pub crossings: BTreeMap<(&'static str, u32), u64>,
}

impl Saturation {
    /// Subjects currently at or above each level, by kind.
    pub fn counts(&self) -> BTreeMap<(&'static str, u32), u64> {
        let mut out: BTreeMap<(&'static str, u32), u64> = BTreeMap::new();
        for kind in ["destination", "source"] {
            for level in LEVELS {
                out.insert((kind, level), 0);
            }
        }
        for ((kind, _), reached) in &self.current {
            for level in LEVELS.iter().filter(|l| *l <= reached) {
                *out.entry((kind, *level)).or_default() += 1;
            }
        }
        out
    }

    /// Records the fractions seen on this pass; logs a warning when a subject rises to a level.
    fn observe(&mut self, seen: Vec<(&'static str, String, f64)>) {
        let mut next = HashMap::new();
        for (kind, subject, fraction) in seen {
            let Some(level) = LEVELS
                .iter()
                .rev()
                .find(|l| fraction * 100.0 >= f64::from(**l))
                .copied()
            else {
                continue;
            };
            let before = self
                .current
                .get(&(kind, subject.clone()))
                .copied()
                .unwrap_or(0);
            if level > before {
                *self.crossings.entry((kind, level)).or_default() += 1;
                warn!(
                    "{kind} {subject} is at {:.1}% of the SNAT ports it may use (over {level}%): {}",
                    fraction * 100.0,
                    if kind == "destination" {
                        "new flows to it will soon be refused; see `snat top --by destination`"
                    } else {
                        "this source will soon be refused new ports; see `snat top`"
                    }
                );
            }
            next.insert((kind, subject), level);
        }
        self.current = next;
    }
}

/// A subject a warning names, with the fraction of what it may use.
type Seen = (&'static str, String, f64);

fn dest_label<A: Addr>(k: &UseKeyOf<A>) -> String {
    let port = u16::from_be_bytes(k.dport);
    if k.proto == proto::TCP {
        format!(
            "{}:{port} ({} via {})",
            k.dst.ip(),
            proto_name(k.proto),
            k.nat.ip()
        )
    } else {
        format!(
            "{} ({} via {})",
            k.dst.ip(),
            proto_name(k.proto),
            k.nat.ip()
        )
    }
}

/// One pass over both families' counts: writes the fair-share hints (sources per busy
/// destination) and updates the saturation warnings.
pub fn refresh(
    tables: &mut Tables,
    tables6: &mut Tables6,
    settings: &Settings,
    saturation: &mut Saturation,
) -> Result<(), DatapathError> {
    let mut seen = Vec::new();
    hints(tables, settings, &mut seen)?;
    hints(tables6, settings, &mut seen)?;
    saturation.observe(seen);
    Ok(())
}

/// One family's part of [`refresh`]: writes its hints, adds what it saw to `seen`.
fn hints<A: Addr>(
    tables: &mut TablesOf<A>,
    settings: &Settings,
    seen: &mut Vec<Seen>,
) -> Result<(), DatapathError>
where
    UseKeyOf<A>: aya::Pod,
{
    let range = f64::from(settings.port_range.size());
    // Destination (per NAT IP) → mappings; a pair count holds for every NAT IP (a pod's share
    // counts across them), so sources are counted per remote endpoint and protocol.
    let mut dests: HashMap<UseKeyOf<A>, u64> = HashMap::new();
    let mut sources: HashMap<(A, [u8; 2], u8), u64> = HashMap::new();
    let mut hints: Vec<UseKeyOf<A>> = Vec::new();
    let mut counts = Vec::new();
    batch::for_each(&tables.usage, |key, raw| counts.push((key, raw)))?;
    for (key, raw) in counts {
        let n = use_count(raw);
        match key.kind {
            use_kind::DESTINATION => {
                dests.insert(key, n);
            }
            use_kind::SOURCE_DESTINATION if n > 0 => {
                *sources.entry((key.dst, key.dport, key.proto)).or_default() += 1;
            }
            use_kind::SOURCE if settings.policy.max_per_source > 0 && n > 0 => {
                let subject = format!("{} ({})", key.src.ip(), proto_name(key.proto));
                seen.push((
                    "source",
                    subject,
                    n as f64 / f64::from(settings.policy.max_per_source),
                ));
            }
            use_kind::DESTINATION_SOURCES => hints.push(key),
            _ => {}
        }
    }
    let permille = settings.policy.fair_share_permille;
    let mut keep = Vec::new();
    for (dest, mappings) in &dests {
        let fraction = *mappings as f64 / range;
        seen.push(("destination", dest_label(dest), fraction));
        // Hints matter once a destination nears the fair-share threshold; write them from half.
        if permille > 0 && fraction * 2000.0 >= f64::from(permille) {
            let hint = UseKeyOf::sources_of(dest);
            let n = sources
                .get(&(dest.dst, dest.dport, dest.proto))
                .copied()
                .unwrap_or(0);
            tables.usage.insert(hint, n, 0)?;
            keep.push(hint);
        }
    }
    for stale in hints.iter().filter(|h| !keep.contains(h)) {
        let _ = tables.usage.remove(stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_crossed_once_and_counted() {
        let mut s = Saturation::default();
        s.observe(vec![("destination", "a".into(), 0.5)]);
        assert!(s.current.is_empty());
        s.observe(vec![("destination", "a".into(), 0.85)]);
        s.observe(vec![("destination", "a".into(), 0.9)]);
        assert_eq!(s.crossings[&("destination", 80)], 1);
        s.observe(vec![
            ("destination", "a".into(), 0.96),
            ("source", "b".into(), 0.81),
        ]);
        assert_eq!(s.crossings[&("destination", 95)], 1);
        let counts = s.counts();
        assert_eq!(
            (
                counts[&("destination", 80)],
                counts[&("destination", 95)],
                counts[&("source", 80)]
            ),
            (1, 1, 1)
        );
        s.observe(vec![("destination", "a".into(), 0.1)]);
        assert!(s.current.is_empty());
        s.observe(vec![("destination", "a".into(), 0.99)]);
        assert_eq!(
            s.crossings[&("destination", 95)],
            2,
            "a new rise counts again"
        );
    }
}
