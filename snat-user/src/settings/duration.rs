//! Durations as operators write them in flags: `15s`, `4m`, `2h4m`, `1d`, `500ms`.

use std::{fmt, time::Duration};

/// A duration flag value that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {why}; write a number and a unit (ms, s, m, h, d), e.g. 15s, 4m or 2h4m")]
pub struct ParseDurationError {
    input: String,
    why: &'static str,
}

/// Parses a sequence of `<number><unit>` parts, e.g. `2h4m`.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = |why| ParseDurationError {
        input: input.to_owned(),
        why,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(err("a number must come before each unit"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = Duration::from_millis(match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(err("the unit is missing")),
            _ => return Err(err("unknown unit")),
        });
        rest = &rest[unit_len..];
        let part = unit.checked_mul(u32::try_from(n).map_err(|_| err("the number is too large"))?);
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| err("the duration is too large"))?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it (`2h4m`, `15s`, `250ms`).
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let mut rest = ms;
        for (unit, len) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ] {
            if rest >= len {
                write!(f, "{}{unit}", rest / len)?;
                rest %= len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flag_forms() {
        assert_eq!(parse("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse("4m"), Ok(Duration::from_secs(240)));
        assert_eq!(parse("240s"), Ok(Duration::from_secs(240)));
        assert_eq!(parse("2h4m"), Ok(Duration::from_secs(2 * 3600 + 4 * 60)));
        assert_eq!(parse("1d2h3m4s5ms"), Ok(Duration::from_millis(93_784_005)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn rejects_bad_input_with_the_fix() {
        for bad in [
            "",
            "15",
            "s",
            "4 m",
            "2x",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("e.g. 15s"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["2h4m", "15s", "4m", "250ms", "1d1s"] {
            assert_eq!(Human(parse(s).unwrap()).to_string(), s);
        }
    }
}
