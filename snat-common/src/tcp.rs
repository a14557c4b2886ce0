//! TCP flags snat tracks per mapping and the phase (hence the idle timeout) they put it in.
//!
//! Each side's flags live in the half of the mapping that side's program writes (`Mapping` for the
//! pod, `Origin` for the remote), each flag as the connection *epoch* it was seen in: a new SYN on a
//! closed mapping bumps `Mapping::epoch`, which retires every older flag of both sides at once
//! without writing the other side's half (one writer per field, no lost reopen).
//!
//! A FIN or RST from the remote side counts only when it is inside the window the pod last
//! advertised ([`check_remote`], RFC 5961 §3 in spirit, as netfilter checks it), so a blind RST or
//! FIN that guesses a flow's NAT port cannot shorten its mapping.
//!
//! Phases follow RFC 5382 and the release timers of Azure's load balancer:
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

/// The `SEEN_*` flags recorded for epoch `epoch`, given the epoch each flag was last seen in.
#[inline(always)]
pub const fn seen_in(epoch: u16, syn: u16, fin: u16, rst: u16) -> u8 {
    let mut bits = 0;
    if epoch != 0 {
        if syn == epoch {
            bits |= SEEN_SYN;
        }
        if fin == epoch {
            bits |= SEEN_FIN;
        }
        if rst == epoch {
            bits |= SEEN_RST;
        }
    }
    bits
}

/// The epoch after `epoch` (0 is never used: it means "never seen").
#[inline(always)]
pub const fn next_epoch(epoch: u16) -> u16 {
    if epoch == u16::MAX {
        1
    } else {
        epoch + 1
    }
}

/// Whether a new SYN from the pod on a mapping whose current connection shows `inside` (the pod's
/// flags) and `outside` (the remote's) starts a new connection: the old one ended (FIN or RST
/// either way) or was answered (a SYN came back). A SYN retransmitted before any answer does not.
#[inline(always)]
pub const fn reopens(inside: u8, outside: u8) -> bool {
    (inside | outside) & (SEEN_FIN | SEEN_RST) != 0 || outside & SEEN_SYN != 0
}

/// Whether sequence number `seq` lies in the receive window `[next, next + window << wscale)` the
/// pod advertised (a zero window accepts `next` only, as RFC 9293 §3.10.7.4 says).
#[inline(always)]
pub const fn in_window(seq: u32, next: u32, window: u16, wscale: u8) -> bool {
    let shift = if wscale > 14 { 14 } else { wscale };
    let wnd = (window as u32) << shift;
    let wnd = if wnd == 0 { 1 } else { wnd };
    seq.wrapping_sub(next) < wnd
}

/// What a segment from the remote side may record on its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remote {
    /// Record these `SEEN_*` bits.
    Record(u8),
    /// A RST outside the pod's window: record only the other bits (`.0`); the segment still goes
    /// to the pod, whose own stack judges it (RFC 5961 challenge ACK).
    RstOutOfWindow(u8),
    /// A FIN outside the pod's window (see `RstOutOfWindow`).
    FinOutOfWindow(u8),
}

/// The pod's side of a connection as a remote segment is checked against it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSide {
    /// The pod has sent an ACK in this connection (it is past SYN-SENT).
    pub acked: bool,
    /// Its latest acknowledgement number, window and window scale.
    pub ack: u32,
    pub window: u16,
    pub wscale: u8,
    /// Its initial sequence number + 1.
    pub isn_next: u32,
}

/// Checks a remote segment with header flags `flags`, sequence number `seq` and acknowledgement
/// number `ack` against the pod's side: a FIN or RST counts only inside the pod's receive window;
/// before the pod has acknowledged anything (SYN-SENT) only a RST that acknowledges its SYN
/// counts, and no FIN (RFC 9293 §3.10.7.3).
#[inline(always)]
pub const fn check_remote(pod: &PodSide, flags: u8, seq: u32, ack: u32) -> Remote {
    let bits = seen_bits(flags);
    if bits & (SEEN_FIN | SEEN_RST) == 0 {
        return Remote::Record(bits);
    }
    let ok = if pod.acked {
        in_window(seq, pod.ack, pod.window, pod.wscale)
    } else {
        bits & SEEN_RST != 0 && flags & header::ACK != 0 && ack == pod.isn_next
    };
    if ok {
        Remote::Record(bits)
    } else if bits & SEEN_RST != 0 {
        Remote::RstOutOfWindow(bits & !(SEEN_RST | SEEN_FIN))
    } else {
        Remote::FinOutOfWindow(bits & !SEEN_FIN)
    }
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
    /// The phase of a mapping from its two halves (the remote's flags of the current epoch only).
    pub const fn of_halves<A: crate::Addr>(
        m: &crate::MappingOf<A>,
        o: &crate::OriginOf<A>,
    ) -> Phase {
        Phase::of(m.tcp_seen(), o.tcp_seen(m.epoch))
    }

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
    fn simultaneous_open_is_established_through_the_checks() {
        // Both sides send a bare SYN (no ACK), then SYN|ACK: the remote's bare SYN is recorded
        // (no window is checked for SYN), and with the pod's SYN the mapping is established.
        let pod = PodSide {
            isn_next: 1001,
            ..PodSide::default()
        };
        let Remote::Record(outside) = check_remote(&pod, header::SYN, 5000, 0) else {
            panic!("a bare SYN from the remote is recorded")
        };
        assert_eq!(Phase::of(SEEN_SYN, outside), Phase::Established);
        let Remote::Record(more) = check_remote(&pod, header::SYN | header::ACK, 5000, 1001) else {
            panic!("the SYN|ACK is recorded")
        };
        assert_eq!(Phase::of(SEEN_SYN, outside | more), Phase::Established);
    }

    #[test]
    fn epochs_retire_old_flags() {
        assert_eq!(seen_in(3, 3, 2, 0), SEEN_SYN);
        assert_eq!(seen_in(3, 3, 3, 3), SEEN_SYN | SEEN_FIN | SEEN_RST);
        assert_eq!(seen_in(0, 0, 0, 0), 0, "epoch 0 is never current");
        assert_eq!(next_epoch(1), 2);
        assert_eq!(next_epoch(u16::MAX), 1, "0 is skipped on wrap");
        assert!(reopens(SEEN_SYN | SEEN_FIN, SEEN_SYN));
        assert!(reopens(SEEN_SYN, SEEN_RST));
        assert!(
            reopens(SEEN_SYN, SEEN_SYN),
            "answered: a new SYN is a new connection"
        );
        assert!(!reopens(SEEN_SYN, 0), "a retransmitted SYN is not");
    }

    #[test]
    fn windows_wrap_and_scale() {
        assert!(in_window(1000, 1000, 100, 0));
        assert!(in_window(1099, 1000, 100, 0));
        assert!(!in_window(1100, 1000, 100, 0));
        assert!(!in_window(999, 1000, 100, 0), "behind the window");
        assert!(in_window(5, u32::MAX - 10, 100, 0), "across the wrap");
        assert!(in_window(1000 + (100 << 7) - 1, 1000, 100, 7));
        assert!(!in_window(1000 + (100 << 7), 1000, 100, 7));
        assert!(
            in_window(1000, 1000, 0, 0),
            "a zero window accepts the next byte"
        );
        assert!(!in_window(1001, 1000, 0, 0));
        assert!(
            !in_window(1000 + (1 << 30), 1000, u16::MAX, 200),
            "scale capped at 14"
        );
    }

    #[test]
    fn remote_fin_and_rst_count_only_in_window() {
        let est = PodSide {
            acked: true,
            ack: 7000,
            window: 512,
            wscale: 2,
            isn_next: 1001,
        };
        let rst = header::RST | header::ACK;
        assert_eq!(check_remote(&est, rst, 7000, 0), Remote::Record(SEEN_RST));
        assert_eq!(
            check_remote(&est, rst, 7000 + 2047, 0),
            Remote::Record(SEEN_RST)
        );
        assert_eq!(
            check_remote(&est, rst, 7000 + 2048, 0),
            Remote::RstOutOfWindow(0)
        );
        assert_eq!(
            check_remote(&est, header::RST, 12345, 0),
            Remote::RstOutOfWindow(0)
        );
        let fin = header::FIN | header::ACK;
        assert_eq!(check_remote(&est, fin, 7100, 0), Remote::Record(SEEN_FIN));
        assert_eq!(check_remote(&est, fin, 6999, 0), Remote::FinOutOfWindow(0));
        assert_eq!(check_remote(&est, header::ACK, 1, 0), Remote::Record(0));
        // SYN-SENT: only a RST acknowledging the SYN counts, and no FIN.
        let syn_sent = PodSide {
            isn_next: 1001,
            ..PodSide::default()
        };
        assert_eq!(
            check_remote(&syn_sent, rst, 0, 1001),
            Remote::Record(SEEN_RST)
        );
        assert_eq!(
            check_remote(&syn_sent, rst, 0, 1002),
            Remote::RstOutOfWindow(0)
        );
        assert_eq!(
            check_remote(&syn_sent, header::RST, 0, 1001),
            Remote::RstOutOfWindow(0)
        );
        assert_eq!(
            check_remote(&syn_sent, fin, 0, 1001),
            Remote::FinOutOfWindow(0)
        );
        assert_eq!(
            check_remote(&syn_sent, header::SYN | header::ACK | header::FIN, 0, 1001),
            Remote::FinOutOfWindow(SEEN_SYN)
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
