//! State that outlives the agent: the mapping tables and the TCX links, pinned on a BPF file
//! system under `<pin-dir>/<iface>/`.
//!
//! While the links are pinned, the programs stay attached and keep translating when the agent
//! dies (SIGKILL, crash, upgrade); a new agent reuses the pinned maps and swaps its programs
//! into the pinned links atomically, so established connections never notice. A plain stop
//! removes every pin but, with `--on-stop closed`, the egress link (now running the stop guard)
//! and the guard's counter; `--keep-state` leaves them all.
//!
//! `SNAT_STATE` records the format of what is pinned. An agent refuses state of another format,
//! or tables whose key or value sizes differ from its own, instead of misreading them.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapInfo, PerCpuArray};
use log::warn;
use snat_common::{
    maps6, FlowKey, FlowKey6, Mapping, Mapping6, Origin, Origin6, StateHeader, UseKey, UseKey6,
    MAP_FWD, MAP_GUARD_DROPS, MAP_REV, MAP_STATE, MAP_USE, STATE_MAGIC, STATE_VERSION,
};

/// Size of the `SNAT_STATE` header of format version 4 (before the IPv6 tables were pinned):
/// such state is named by its version when refused, not as an unknown layout.
const HEADER_V4_SIZE: u32 = 272;

/// Why pinned state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("--pin-dir {root}: /sys/fs/bpf is not mounted and mounting it failed: {source}")]
    Mount {
        root: String,
        source: std::io::Error,
    },
    #[error("--pin-dir {root} is not on a BPF file system: mount one there (`mount -t bpf bpf {root}`) or choose a directory on one (the default is /sys/fs/bpf/snat)")]
    NotBpffs { root: String },
    #[error("creating {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    /// State of another format or layout: never misread, only removed on request.
    #[error("pinned state in {dir} {why}: it was left by an incompatible snat. Run the snat that wrote it, or remove it with `snat cleanup --iface {iface} --pin-dir {root}` (its translated connections end)")]
    Incompatible {
        dir: String,
        iface: String,
        root: String,
        why: String,
    },
}

/// File name prefix of the pinned program arrays (`Pins::programs`).
const PROGRAMS_PREFIX: &str = "snat_programs_";

/// `statfs` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of one interface.
#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: PathBuf,
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` writes the struct we pass, for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

impl Pins {
    /// The directory for `iface` under `root`, created if needed. `root` must be on a BPF file
    /// system; `/sys/fs/bpf` is mounted if it is not (with a warning when that mount is private
    /// to this process, as under `ip netns exec`, where the state will not outlive it).
    pub fn prepare(root: &Path, iface: &str) -> Result<(Self, Vec<String>), PinError> {
        let mut warnings = Vec::new();
        let bpffs_root = Path::new("/sys/fs/bpf");
        if !is_bpffs(root) && root.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
            std::fs::create_dir_all(bpffs_root).ok();
            let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
            // SAFETY: mounting a BPF file system on an existing directory, with C strings.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(PinError::Mount {
                    root: root.display().to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            warnings.push(format!(
                "mounted a BPF file system at /sys/fs/bpf for --pin-dir {}; when this agent runs in its own mount namespace (ip netns exec), that mount and the state in it end with the agent: to keep state across restarts, pass a --pin-dir on a BPF file system mounted outside, e.g. `mount -t bpf bpf /run/snat-bpf`",
                root.display()
            ));
        }
        let create = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|source| PinError::Create {
                path: path.display().to_string(),
                source,
            })
        };
        create(root)?;
        if !is_bpffs(root) {
            return Err(PinError::NotBpffs {
                root: root.display().to_string(),
            });
        }
        let dir = root.join(iface);
        create(&dir)?;
        Ok((Self { dir }, warnings))
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name.to_ascii_lowercase())
    }

    /// Where an agent pins its program array (`suffix` tells agents apart).
    pub fn programs(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{PROGRAMS_PREFIX}{suffix}"))
    }

    /// Removes every program array pinned here but `ours`: an older agent's programs are
    /// detached by now.
    pub fn remove_other_programs(&self, ours: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let theirs = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(PROGRAMS_PREFIX));
            if theirs && path != ours {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!("removing {}: {e}", path.display());
                }
            }
        }
    }

    /// Where the link of program `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join(format!("link_{name}"))
    }

    /// The header of state a previous agent left, after checking it can be read: `None` when
    /// there is none.
    pub fn existing(&self) -> Result<Option<StateHeader>, PinError> {
        let path = self.map(MAP_STATE);
        if !path.exists() {
            return Ok(None);
        }
        let refuse = |why: String| PinError::Incompatible {
            dir: self.dir.display().to_string(),
            iface: self
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            root: self
                .dir
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            why,
        };
        let info =
            MapInfo::from_pin(&path).map_err(|e| refuse(format!("cannot be opened ({e})")))?;
        if info.value_size() == HEADER_V4_SIZE {
            return Err(refuse(
                "has format version 4 (this snat reads version 5: the IPv6 tables are pinned too)"
                    .into(),
            ));
        }
        let data =
            MapData::from_pin(&path).map_err(|e| refuse(format!("cannot be opened ({e})")))?;
        let header = Array::<_, StateHeader>::try_from(Map::Array(data))
            .map_err(|e| refuse(format!("has an unexpected layout ({e})")))?
            .get(&0, 0)
            .map_err(|e| refuse(format!("cannot be read ({e})")))?;
        if header.magic != STATE_MAGIC || header.version != STATE_VERSION {
            return Err(refuse(format!(
                "has format version {} (this snat reads version {STATE_VERSION})",
                header.version
            )));
        }
        for (name, key, value) in [
            (MAP_FWD, size_of::<FlowKey>(), size_of::<Mapping>()),
            (MAP_REV, size_of::<FlowKey>(), size_of::<Origin>()),
            (MAP_USE, size_of::<UseKey>(), size_of::<u64>()),
            (maps6::FWD, size_of::<FlowKey6>(), size_of::<Mapping6>()),
            (maps6::REV, size_of::<FlowKey6>(), size_of::<Origin6>()),
            (maps6::USE, size_of::<UseKey6>(), size_of::<u64>()),
        ] {
            let info = MapInfo::from_pin(self.map(name))
                .map_err(|e| refuse(format!("lacks {name} ({e})")))?;
            if info.key_size() as usize != key || info.value_size() as usize != value {
                return Err(refuse(format!(
                    "has {name} entries of {}+{} bytes (this snat uses {key}+{value})",
                    info.key_size(),
                    info.value_size()
                )));
            }
        }
        Ok(Some(header))
    }

    /// What the stop guard a previous agent left dropped while no agent ran (its pinned counter,
    /// summed over CPUs), removing the pin; `None` when there was no guard.
    pub fn take_guard_drops(&self) -> Option<u64> {
        let path = self.map(MAP_GUARD_DROPS);
        let data = MapData::from_pin(&path).ok()?;
        let drops = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data))
            .and_then(|a| a.get(&0, 0))
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|e| {
                warn!(
                    "reading the stop guard's counter at {}: {e}",
                    path.display()
                )
            })
            .ok();
        let _ = std::fs::remove_file(&path);
        drops
    }

    /// Removes every pin of this interface (links first, so the programs detach), then the
    /// directory.
    pub fn remove_all(&self) {
        self.remove_all_but(&[]);
    }

    /// Removes every pin of this interface but those in `keep` (links first, so their programs
    /// detach), then the directory if it is empty.
    pub fn remove_all_but(&self, keep: &[PathBuf]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !keep.contains(p))
            .collect();
        paths.sort_by_key(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
        });
        for p in paths {
            if let Err(e) = std::fs::remove_file(&p) {
                warn!("removing pin {}: {e}", p.display());
            }
        }
        if keep.is_empty() {
            if let Err(e) = std::fs::remove_dir(&self.dir) {
                warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// A header for newly pinned state: the tables' sizes (IPv4, IPv6) and the host's reserved
/// ports as the first agent found them.
pub fn header(max_mappings: u32, max_mappings6: u32, reserved_before: &str) -> StateHeader {
    let mut h = StateHeader {
        magic: STATE_MAGIC,
        version: STATE_VERSION,
        max_mappings,
        reserved_len: 0,
        reserved_before: [0; 256],
        max_mappings6,
    };
    let bytes = reserved_before.as_bytes();
    let n = bytes.len().min(h.reserved_before.len());
    h.reserved_before[..n].copy_from_slice(&bytes[..n]);
    h.reserved_len = n as u32;
    h
}

/// The reserved ports a header recorded.
pub fn reserved_before(h: &StateHeader) -> String {
    String::from_utf8_lossy(
        &h.reserved_before[..(h.reserved_len as usize).min(h.reserved_before.len())],
    )
    .into_owned()
}
