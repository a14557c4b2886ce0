//! Who may use the agent's control socket: the peer's credentials as the kernel reports them,
//! the `--control-group` that may read, the decision ([`decide`]), and the refusals it counts.
//!
//! Rules (checked on every connection, before the request is acted on):
//! - a request that changes anything ([`Class::Change`]: `set`) needs an *admin*: uid 0 in the
//!   agent's user namespace, or a process holding CAP_NET_ADMIN in that user namespace;
//! - a request that only reads ([`Class::Read`]: `status`, `stats`, `conns`, `top`) needs an
//!   admin or a member of the `--control-group` (its primary gid or one of its supplementary
//!   groups). Without `--control-group`, only admins read.
//!
//! What is trusted:
//! - `SO_PEERCRED` gives the uid, gid and pid the peer had when it connected, already translated
//!   into the agent's user namespace (an unmapped id reads as the overflow id 65534), so `uid 0`
//!   and the primary gid need nothing else.
//! - Capabilities and supplementary groups are not in `SO_PEERCRED`: they are read from
//!   `/proc/<pid>/status` (`CapEff` bit 12, `Groups:`). CAP_NET_ADMIN counts only when
//!   `/proc/<pid>/ns/user` is the agent's own user namespace (a capability held in a child user
//!   namespace means nothing here).
//! - pid reuse: the pid could belong to another process by the time `/proc` is read. The agent
//!   takes a pidfd of the peer (`SO_PEERPIDFD`, kernel ≥ 6.5) right after accepting, reads
//!   `/proc`, then asks the pidfd whether its process is still there (`pidfd_send_signal` with
//!   signal 0; a zombie counts as there, its pid is not free yet). Only then is the `/proc` read
//!   known to be the peer's. Without `SO_PEERPIDFD` (older kernels) or when the process is gone,
//!   only `SO_PEERCRED`'s uid and primary gid count: root still works, CAP_NET_ADMIN and
//!   supplementary groups do not.
//! - changed credentials: `/proc` shows the process as it is now, `SO_PEERCRED` as it was at
//!   connect. If any of the real, effective, saved or file-system uids or gids in `/proc`
//!   differs from `SO_PEERCRED`'s (the peer ran a set-uid/set-gid program since it connected,
//!   or connected from a thread with credentials of its own), `/proc` is not used at all.
//!
//! Known limit: capabilities are those of the process when the agent looks, a moment after it
//! connected. A process that connects, hands the socket to another process and then executes a
//! program that gains CAP_NET_ADMIN through file capabilities without a change of uid or gid is
//! taken for that program. Grant `cap_net_admin` file capabilities with that in mind.

use std::{
    collections::BTreeMap,
    ffi::c_int,
    fmt, io,
    mem::{size_of, MaybeUninit},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use log::warn;

use crate::settings::group::Group;

/// Bit of CAP_NET_ADMIN in the capability sets (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;

/// What a request does, and so who may send it. Every request type names its class
/// (`control::Request::class`), so a new command must say which it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Shows figures, settings or mappings.
    Read,
    /// Changes how the agent translates.
    Change,
}

/// What the agent knows about a connected client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// From `SO_PEERCRED`, in the agent's user namespace.
    pub uid: u32,
    pub gid: u32,
    /// 0 when the peer's pid is not visible in the agent's pid namespace.
    pub pid: i32,
    /// Holds CAP_NET_ADMIN in the agent's user namespace (checked as the module doc says).
    pub net_admin: bool,
    /// Supplementary groups (empty when `/proc` could not be trusted).
    pub groups: Vec<u32>,
}

/// What a peer may do, from its credentials alone; also picks its connection budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// uid 0 or CAP_NET_ADMIN: reads and changes.
    Admin,
    /// A member of `--control-group`: reads.
    Reader,
    /// Anyone else: nothing but a refusal.
    Other,
}

impl Peer {
    pub fn standing(&self, group: Option<&Group>) -> Standing {
        if self.uid == 0 || self.net_admin {
            Standing::Admin
        } else if group.is_some_and(|g| self.gid == g.gid || self.groups.contains(&g.gid)) {
            Standing::Reader
        } else {
            Standing::Other
        }
    }
}

/// Decides whether `peer` may send a request of `class` to the agent on `iface`. The error is
/// the message the client shows.
pub fn decide(peer: &Peer, class: Class, group: Option<&Group>, iface: &str) -> Result<(), String> {
    match (class, peer.standing(group)) {
        (_, Standing::Admin) | (Class::Read, Standing::Reader) => Ok(()),
        (Class::Change, _) => Err(format!(
            "permission denied: the agent on {iface} accepts changes from root or CAP_NET_ADMIN only"
        )),
        (Class::Read, _) => Err(match group {
            Some(g) => format!(
                "permission denied: the agent on {iface} accepts reads from root, CAP_NET_ADMIN or members of {g} only"
            ),
            None => format!(
                "permission denied: the agent on {iface} accepts reads only from root or CAP_NET_ADMIN; start it with --control-group GROUP to let a group read"
            ),
        }),
    }
}

/// The fields of `/proc/<pid>/status` that matter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved and file-system ids.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    pub cap_eff: u64,
}

impl ProcStatus {
    /// Parses the text of `/proc/<pid>/status`; `None` if a field is missing or malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let ids = |v: &str| -> Option<Vec<u32>> {
            v.split_whitespace().map(|n| n.parse().ok()).collect()
        };
        let (mut uids, mut gids, mut groups, mut cap_eff) = (None, None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key {
                "Uid" => uids = ids(value),
                "Gid" => gids = ids(value),
                "Groups" => groups = ids(value),
                "CapEff" => cap_eff = u64::from_str_radix(value.trim(), 16).ok(),
                _ => {}
            }
        }
        let (uids, gids) = (uids?, gids?);
        if uids.len() != 4 || gids.len() != 4 {
            return None;
        }
        Some(Self {
            uids,
            gids,
            groups: groups?,
            cap_eff: cap_eff?,
        })
    }

    /// Completes `peer` (credentials from `SO_PEERCRED`) with what this status adds, if its ids
    /// are all the peer's; `same_userns`: the process is in the agent's user namespace.
    pub fn apply(&self, peer: &mut Peer, same_userns: bool) {
        if self.uids.iter().any(|u| *u != peer.uid) || self.gids.iter().any(|g| *g != peer.gid) {
            return;
        }
        peer.groups.clone_from(&self.groups);
        peer.net_admin = same_userns && self.cap_eff & (1 << CAP_NET_ADMIN) != 0;
    }
}

/// Reads peers' credentials; knows the agent's own user namespace.
#[derive(Debug)]
pub struct Inspector {
    /// (device, inode) of the agent's user namespace; `None`: CAP_NET_ADMIN never counts.
    userns: Option<(u64, u64)>,
    /// Whether the missing `SO_PEERPIDFD` was logged already.
    said_no_pidfd: AtomicBool,
}

impl Default for Inspector {
    fn default() -> Self {
        Self {
            userns: userns_of("self"),
            said_no_pidfd: AtomicBool::new(false),
        }
    }
}

fn userns_of(pid: &str) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/ns/user"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// `getsockopt(SOL_SOCKET, opt)` for a value of plain integers.
fn sockopt<T: Copy>(fd: BorrowedFd<'_>, opt: c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is writable for `len` bytes and `len` is a valid socklen_t.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::other(format!(
            "getsockopt({opt}) returned {len} bytes, expected {}",
            size_of::<T>()
        )));
    }
    // SAFETY: zero-initialised and then filled by the kernel; T is made of plain integers, for
    // which every bit pattern is valid.
    Ok(unsafe { value.assume_init() })
}

impl Inspector {
    /// The credentials of the peer of the connected Unix socket `fd` (see the module doc).
    pub fn peer(&self, fd: BorrowedFd<'_>) -> io::Result<Peer> {
        let cred: libc::ucred = sockopt(fd, libc::SO_PEERCRED)?;
        let mut peer = Peer {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
            ..Peer::default()
        };
        if cred.pid <= 0 {
            return Ok(peer);
        }
        let pidfd = match sockopt::<c_int>(fd, libc::SO_PEERPIDFD) {
            // SAFETY: the kernel just opened this pidfd for us; nothing else owns it.
            Ok(raw) if raw >= 0 => unsafe { OwnedFd::from_raw_fd(raw) },
            Ok(_) => return Ok(peer),
            Err(e) => {
                if !self.said_no_pidfd.swap(true, Ordering::Relaxed) {
                    warn!("control: SO_PEERPIDFD is not available ({e}; it needs kernel 6.5): only uid 0 and a client's primary gid count, not CAP_NET_ADMIN or supplementary groups");
                }
                return Ok(peer);
            }
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", cred.pid));
        let same_userns = self.userns.is_some() && userns_of(&cred.pid.to_string()) == self.userns;
        if !still_there(&pidfd) {
            return Ok(peer);
        }
        if let Some(s) = status.ok().as_deref().and_then(ProcStatus::parse) {
            s.apply(&mut peer, same_userns);
        }
        Ok(peer)
    }
}

/// Whether the process of `pidfd` has not been reaped (so its pid still names it).
fn still_there(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal(pidfd, 0, NULL, 0) only checks that the target exists and that
    // we may signal it; signal 0 is never delivered.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    // EPERM: there, but the agent may not signal it (an agent without CAP_KILL).
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// At most `max` lines per `window`; what is held back is told in one line afterwards.
/// Pure: the caller passes the time.
#[derive(Debug)]
pub struct LogLimit {
    window: Duration,
    max: u32,
    started: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(max: u32, window: Duration) -> Self {
        Self {
            window,
            max,
            started: None,
            lines: 0,
            suppressed: 0,
        }
    }

    /// A line wants out at `now`: whether to log it, and how many lines an earlier window held
    /// back (to log first).
    pub fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let earlier = self.roll(now);
        if self.lines < self.max {
            self.lines += 1;
            (true, earlier)
        } else {
            self.suppressed += 1;
            (false, earlier)
        }
    }

    /// Lines held back by a window that has ended by `now`, if any (call it now and then so the
    /// count is told even when nothing else happens).
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        self.roll(now)
    }

    fn roll(&mut self, now: Instant) -> Option<u64> {
        let ended = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if !ended {
            return None;
        }
        self.started = Some(now);
        self.lines = 0;
        Some(std::mem::take(&mut self.suppressed)).filter(|n| *n > 0)
    }
}

/// Refused control requests, counted per command, and the agent's rate-limited log of the
/// control socket's troubles (refusals, bad or slow clients): at most [`LOG_LINES`] lines per
/// [`LOG_WINDOW`].
#[derive(Debug)]
pub struct Refusals {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    log: Mutex<LogLimit>,
}

pub const LOG_LINES: u32 = 5;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

impl Default for Refusals {
    fn default() -> Self {
        Self {
            counts: Mutex::default(),
            log: Mutex::new(LogLimit::new(LOG_LINES, LOG_WINDOW)),
        }
    }
}

impl Refusals {
    /// Counts a refused `command`.
    pub fn count(&self, command: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(command)
            .or_default() += 1;
    }

    /// The counts, with every name of `commands` present (0 if never refused).
    pub fn snapshot(&self, commands: &[&'static str]) -> BTreeMap<String, u64> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        commands
            .iter()
            .chain(counts.keys())
            .map(|c| ((*c).to_owned(), counts.get(c).copied().unwrap_or(0)))
            .collect()
    }

    /// Logs `line` (a warning) unless too many came lately.
    pub fn warn(&self, line: fmt::Arguments<'_>) {
        let (log, earlier) = self
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now());
        say_suppressed(earlier);
        if log {
            warn!("{line}");
        }
    }

    /// Tells how many lines a finished window held back.
    pub fn flush(&self) {
        say_suppressed(
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush(Instant::now()),
        );
    }
}

fn say_suppressed(n: Option<u64>) {
    if let Some(n) = n {
        warn!("control: {n} more control-socket warnings (refusals, bad or slow clients) in the last {}s were not logged", LOG_WINDOW.as_secs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsnat\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nFDSize:\t64\nGroups:\t4 27 1000 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000001000\nCapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\n";

    fn nobody() -> Peer {
        Peer {
            uid: 65534,
            gid: 65534,
            pid: 42,
            ..Peer::default()
        }
    }

    fn group(gid: u32) -> Group {
        Group {
            gid,
            name: Some("snat".into()),
        }
    }

    #[test]
    fn root_and_net_admin_may_do_everything() {
        let root = Peer {
            uid: 0,
            gid: 0,
            ..nobody()
        };
        let admin = Peer {
            net_admin: true,
            ..nobody()
        };
        for peer in [&root, &admin] {
            for class in [Class::Read, Class::Change] {
                assert_eq!(decide(peer, class, None, "wan0"), Ok(()));
                assert_eq!(decide(peer, class, Some(&group(5)), "wan0"), Ok(()));
            }
        }
    }

    #[test]
    fn others_are_refused_with_what_would_be_allowed() {
        let p = nobody();
        assert_eq!(
            decide(&p, Class::Change, Some(&group(65534)), "wan0"),
            Err("permission denied: the agent on wan0 accepts changes from root or CAP_NET_ADMIN only".into())
        );
        assert_eq!(
            decide(&p, Class::Read, None, "wan0"),
            Err("permission denied: the agent on wan0 accepts reads only from root or CAP_NET_ADMIN; start it with --control-group GROUP to let a group read".into())
        );
        assert_eq!(
            decide(&p, Class::Read, Some(&group(7)), "wan0"),
            Err("permission denied: the agent on wan0 accepts reads from root, CAP_NET_ADMIN or members of group snat (gid 7) only".into())
        );
        let unnamed = Group { gid: 7, name: None };
        assert!(decide(&p, Class::Read, Some(&unnamed), "wan0")
            .unwrap_err()
            .contains("members of gid 7 only"));
    }

    #[test]
    fn group_members_may_read_but_not_change() {
        let primary = nobody();
        let supplementary = Peer {
            gid: 100,
            groups: vec![3, 65534],
            ..nobody()
        };
        for p in [&primary, &supplementary] {
            assert_eq!(decide(p, Class::Read, Some(&group(65534)), "wan0"), Ok(()));
            assert_eq!(p.standing(Some(&group(65534))), Standing::Reader);
            assert!(decide(p, Class::Change, Some(&group(65534)), "wan0").is_err());
        }
        assert_eq!(supplementary.standing(Some(&group(4))), Standing::Other);
        assert_eq!(supplementary.standing(None), Standing::Other);
    }

    #[test]
    fn proc_status_adds_caps_and_groups_only_when_its_ids_are_the_peers() {
        let s = ProcStatus::parse(STATUS).unwrap();
        assert_eq!(s.groups, [4, 27, 1000]);
        assert_eq!(s.cap_eff, 1 << 12);

        let mut p = nobody();
        s.apply(&mut p, true);
        assert!(p.net_admin);
        assert_eq!(p.groups, [4, 27, 1000]);

        // In another user namespace the capability means nothing; its groups still count.
        let mut p = nobody();
        s.apply(&mut p, false);
        assert!(!p.net_admin);
        assert_eq!(p.groups, [4, 27, 1000]);

        // A set-uid program run since the peer connected: effective uid 0, not the peer's.
        let setuid = STATUS.replace("Uid:\t65534\t65534\t65534", "Uid:\t65534\t0\t0");
        let mut p = nobody();
        ProcStatus::parse(&setuid).unwrap().apply(&mut p, true);
        assert_eq!(p, nobody());
        // A set-gid one.
        let setgid = STATUS.replace("Gid:\t65534\t65534", "Gid:\t65534\t5");
        let mut p = nobody();
        ProcStatus::parse(&setgid).unwrap().apply(&mut p, true);
        assert_eq!(p, nobody());
    }

    #[test]
    fn proc_status_with_a_missing_or_bad_field_is_not_used() {
        assert_eq!(ProcStatus::parse(""), None);
        assert_eq!(ProcStatus::parse(&STATUS.replace("CapEff", "CapX")), None);
        assert_eq!(
            ProcStatus::parse(&STATUS.replace("0000000000001000\nCapBnd", "zz\nCapBnd")),
            None
        );
        assert_eq!(ProcStatus::parse(&STATUS.replace(" 27", " -1")), None);
        assert_eq!(
            ProcStatus::parse(&STATUS.replace("Uid:\t65534\t", "Uid:\t")),
            None
        );
        // Empty supplementary groups are fine.
        let none = STATUS.replace("Groups:\t4 27 1000 ", "Groups:\t");
        assert_eq!(ProcStatus::parse(&none).unwrap().groups, Vec::<u32>::new());
    }

    #[test]
    fn log_limit_lets_a_few_lines_through_then_tells_how_many_it_held_back() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(3, Duration::from_secs(10));
        let got: Vec<_> = (0..5)
            .map(|i| l.admit(t0 + Duration::from_secs(i)).0)
            .collect();
        assert_eq!(got, [true, true, true, false, false]);
        assert_eq!(
            l.flush(t0 + Duration::from_secs(9)),
            None,
            "window still open"
        );
        assert_eq!(l.flush(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(l.flush(t0 + Duration::from_secs(30)), None, "told once");
        // A new window opened by a line tells the held-back count along with it.
        let mut l = LogLimit::new(1, Duration::from_secs(10));
        assert_eq!(l.admit(t0), (true, None));
        assert_eq!(l.admit(t0), (false, None));
        assert_eq!(l.admit(t0 + Duration::from_secs(11)), (true, Some(1)));
    }

    #[test]
    fn refusals_are_counted_per_command_with_zeros_for_the_rest() {
        let r = Refusals::default();
        r.count("set");
        r.count("set");
        r.count("conns");
        assert_eq!(
            r.snapshot(&["status", "conns", "set"]),
            BTreeMap::from([
                ("conns".to_owned(), 1),
                ("set".to_owned(), 2),
                ("status".to_owned(), 0)
            ])
        );
    }
}
