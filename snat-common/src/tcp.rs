//! TCP flags snat tracks per mapping and the phase (hence the idle timeout) they put it in.
//!
//! Each side's flags live in the half of the mapping that side's program writes (`Mapping::tcp_seen`
//! for the pod, `Origin::tcp_seen` for the remote), so the two programs never write the same entry.
//! Phases follow RFC 5382 and the seeds' release timers:
//! - `Reset`: a RST was seen either way (released 15 s later by default);
//! - `Closing`: FIN seen in both directions (240 s);
//! - `Established`: a SYN seen in both directions and no FIN (2 h 4 min);
//! - `Transitory`: anything else, i.e. half-open or half-closed (4 min).

/// The internal or remote side sent a SYN.
pub const SEEN_SYN: u8 = 1 << 0;
/// The side sent a FIN.
pub const SEEN_FIN: u8 = 1 << 1;
/// The side sent a RST.
pub const SEEN_RST: u8 = 1 << 2;

/// TCP header flag bits (byte 13 of the header).
pub mod header {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The `SEEN_*` bits a segment with TCP header flags `flags` contributes.
#[inline(always)]
pub const fn seen_bits(flags: u8) -> u8 {
    let mut bits = 0;
    if flags & header::SYN != 0 {
        bits |= SEEN_SYN;
    }
    if flags & header::FIN != 0 {
        bits |= SEEN_FIN;
    }
    if flags & header::RST != 0 {
        bits |= SEEN_RST;
    }
    bits
}

/// Where a TCP mapping is in its life, which decides its idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Transitory,
    Established,
    Closing,
    Reset,
}

impl Phase {
    /// The phase of a mapping whose internal side sent `inside` and remote side sent `outside`.
    pub const fn of(inside: u8, outside: u8) -> Phase {
        let both = inside | outside;
        if both & SEEN_RST != 0 {
            Phase::Reset
        } else if inside & SEEN_FIN != 0 && outside & SEEN_FIN != 0 {
            Phase::Closing
        } else if both & SEEN_FIN != 0 {
            Phase::Transitory
        } else if inside & SEEN_SYN != 0 && outside & SEEN_SYN != 0 {
            Phase::Established
        } else {
            Phase::Transitory
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Phase::Transitory => "transitory",
            Phase::Established => "established",
            Phase::Closing => "closing",
            Phase::Reset => "reset",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases() {
        assert_eq!(Phase::of(SEEN_SYN, 0), Phase::Transitory);
        assert_eq!(Phase::of(SEEN_SYN, SEEN_SYN), Phase::Established);
        // Simultaneous open: both sides sent SYN.
        assert_eq!(Phase::of(SEEN_SYN, SEEN_SYN), Phase::Established);
        assert_eq!(Phase::of(SEEN_SYN | SEEN_FIN, SEEN_SYN), Phase::Transitory);
        assert_eq!(
            Phase::of(SEEN_SYN | SEEN_FIN, SEEN_SYN | SEEN_FIN),
            Phase::Closing
        );
        assert_eq!(Phase::of(SEEN_SYN, SEEN_SYN | SEEN_RST), Phase::Reset);
        assert_eq!(
            Phase::of(SEEN_SYN | SEEN_RST | SEEN_FIN, SEEN_FIN),
            Phase::Reset
        );
    }

    #[test]
    fn seen_bits_from_header() {
        assert_eq!(seen_bits(header::SYN), SEEN_SYN);
        assert_eq!(seen_bits(header::SYN | header::ACK), SEEN_SYN);
        assert_eq!(seen_bits(header::FIN | header::ACK), SEEN_FIN);
        assert_eq!(seen_bits(header::RST), SEEN_RST);
        assert_eq!(seen_bits(header::ACK), 0);
    }
}
