//! The hairpin program on the pods' interfaces (`--hairpin on`): loaded with the others, put in
//! `SNAT_PROGRAMS` (its delivering half), and attached as TC ingress (a TCX link, owned by this
//! process: it goes when the agent does) to every interface `--pod-iface` matches, as pods come
//! and go ([`Engine::sync_hairpin`], driven by [`LinkEvents`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use aya::{
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use log::warn;
use snat_common::{
    PROG_HAIRPIN, PROG_HAIRPIN6, PROG_HAIRPIN_DELIVER, PROG_HAIRPIN_DELIVER6, SLOT_HAIRPIN6,
    SLOT_HAIRPIN_DELIVER, SLOT_HAIRPIN_DELIVER6,
};

use super::{install_tail_call, load_classifiers, DatapathError, Engine};

/// The hairpin program's links, by interface index.
#[derive(Default)]
pub struct HairpinLinks {
    links: BTreeMap<u32, (String, SchedClassifierLinkId)>,
    /// Interfaces the program could not be attached to (warned about once; tried again only
    /// under another name or index).
    failed: BTreeSet<(u32, String)>,
}

/// What one [`Engine::sync_hairpin`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HairpinSync {
    pub attached: Vec<String>,
    pub gone: Vec<String>,
}

/// Loads the hairpin programs into the kernel and puts all but the attached one in their slots
/// of the program array (IPv6 takes programs of its own, which `snat_hairpin` tail-calls).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    load_classifiers(
        ebpf,
        &[
            PROG_HAIRPIN,
            PROG_HAIRPIN_DELIVER,
            PROG_HAIRPIN6,
            PROG_HAIRPIN_DELIVER6,
        ],
    )?;
    for (name, slot, what) in [
        (
            PROG_HAIRPIN_DELIVER,
            SLOT_HAIRPIN_DELIVER,
            "the hairpin delivery program",
        ),
        (PROG_HAIRPIN6, SLOT_HAIRPIN6, "the IPv6 hairpin program"),
        (
            PROG_HAIRPIN_DELIVER6,
            SLOT_HAIRPIN_DELIVER6,
            "the IPv6 hairpin delivery program",
        ),
    ] {
        install_tail_call(ebpf, name, slot, what)?;
    }
    Ok(())
}

impl Engine {
    /// Puts the hairpin program on every interface of `wanted` (name, index) it is not on yet,
    /// and forgets the links of interfaces no longer there (the kernel detached them with their
    /// interface). A failure is warned about once per interface and does not stop the others.
    pub fn sync_hairpin(&mut self, wanted: &[(String, u32)]) -> HairpinSync {
        let mut sync = HairpinSync::default();
        let keep: BTreeSet<u32> = wanted.iter().map(|(_, i)| *i).collect();
        let gone: Vec<u32> = self
            .hairpin
            .links
            .keys()
            .filter(|i| !keep.contains(i))
            .copied()
            .collect();
        let Some(prog) = self
            .ebpf
            .program_mut(PROG_HAIRPIN)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        else {
            return sync;
        };
        for index in gone {
            if let Some((name, id)) = self.hairpin.links.remove(&index) {
                // The link died with its interface; this only drops aya's handle on it.
                let _ = prog.detach(id);
                sync.gone.push(name);
            }
        }
        self.hairpin
            .failed
            .retain(|(i, n)| wanted.iter().any(|(wn, wi)| wi == i && wn == n));
        for (name, index) in wanted {
            let known = self
                .hairpin
                .links
                .get(index)
                .is_some_and(|(n, _)| n == name);
            if known || self.hairpin.failed.contains(&(*index, name.clone())) {
                continue;
            }
            if let Some((old, id)) = self.hairpin.links.remove(index) {
                // Renamed: attach again under the new name (the old link holds the index).
                let _ = prog.detach(id);
                sync.gone.push(old);
            }
            match prog.attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => {
                    self.hairpin.links.insert(*index, (name.clone(), id));
                    sync.attached.push(name.clone());
                }
                Err(e) => {
                    warn!(
                        "hairpinning: could not attach {PROG_HAIRPIN} to {name} (pods behind it are not hairpinned): {:#}",
                        anyhow::Error::from(e)
                    );
                    self.hairpin.failed.insert((*index, name.clone()));
                }
            }
        }
        sync
    }

    /// The interfaces the hairpin program is on.
    pub fn hairpin_ifaces(&self) -> Vec<String> {
        self.hairpin
            .links
            .values()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Takes the hairpin program off every pod interface.
    pub(super) fn detach_hairpin(&mut self) {
        let links = std::mem::take(&mut self.hairpin.links);
        let Some(prog) = self
            .ebpf
            .program_mut(PROG_HAIRPIN)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        else {
            return;
        };
        for (name, id) in links.into_values() {
            if let Err(e) = prog.detach(id) {
                warn!("detaching {PROG_HAIRPIN} from {name}: {e}");
            }
        }
    }
}

/// Every interface of this network namespace: (name, index).
pub fn interfaces() -> io::Result<Vec<(String, u32)>> {
    // SAFETY: plain call; the array is freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = list;
    // SAFETY: the array ends with an entry of index 0 and a null name; every name before it is
    // a NUL-terminated string owned by the array, copied before the array is freed.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// The kernel's link notifications (rtnetlink `RTMGRP_LINK`): a wake-up when an interface is
/// added, renamed or removed.
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `sockaddr_nl` is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid `sockaddr_nl` of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for notifications and reads all that came; whether any did.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid `pollfd`.
        if unsafe { libc::poll(&raw mut pfd, 1, ms) } <= 0 {
            return false;
        }
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: reading into a buffer of the length given, without blocking.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                // Drained (EAGAIN), or the socket overran (ENOBUFS): either way a sync follows.
                return any || n < 0;
            }
            any = true;
        }
    }
}
