//! The group whose members may read through the control socket (`--control-group`): a group
//! name the host's group database knows, or a numeric gid.

use std::{
    ffi::{CStr, CString},
    fmt, io,
    mem::MaybeUninit,
};

/// The group whose members may read (`--control-group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub gid: u32,
    /// The group's name, when the host knows one.
    pub name: Option<String>,
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "group {name} (gid {})", self.gid),
            None => write!(f, "gid {}", self.gid),
        }
    }
}

/// A `--control-group` value that names no group.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("--control-group {0:?}: this host has no group of that name (see `getent group`); give an existing group name or a numeric gid (e.g. --control-group 65534), or leave the flag out so that only root and CAP_NET_ADMIN may use the control socket")]
    Unknown(String),
    #[error("--control-group {value:?}: looking the group up failed ({error}); give a numeric gid instead (e.g. --control-group 65534)")]
    Lookup { value: String, error: String },
}

impl Group {
    /// Resolves `--control-group`: a numeric gid (whether or not the host names it), or a group
    /// name the host's group database (NSS: `/etc/group`, …) knows.
    pub fn resolve(value: &str) -> Result<Self, GroupError> {
        if let Ok(gid) = value.parse::<u32>() {
            let name = lookup(Lookup::Gid(gid))
                .ok()
                .flatten()
                .map(|(name, _)| name);
            return Ok(Self { gid, name });
        }
        let c = CString::new(value).map_err(|_| GroupError::Unknown(value.to_owned()))?;
        match lookup(Lookup::Name(&c)) {
            Ok(Some((name, gid))) => Ok(Self {
                gid,
                name: Some(name),
            }),
            Ok(None) => Err(GroupError::Unknown(value.to_owned())),
            Err(e) => Err(GroupError::Lookup {
                value: value.to_owned(),
                error: e.to_string(),
            }),
        }
    }
}

#[derive(Clone, Copy)]
enum Lookup<'a> {
    Name(&'a CStr),
    Gid(u32),
}

/// `getgrnam_r`/`getgrgid_r`: the group's (name, gid), or `None` if there is none.
fn lookup(key: Lookup<'_>) -> io::Result<Option<(String, u32)>> {
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        let mut grp = MaybeUninit::<libc::group>::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = match key {
            // SAFETY: every pointer is valid for the call: a NUL-terminated name, a `group` to
            // fill, a buffer of `buf.len()` bytes for its strings and a result pointer.
            Lookup::Name(name) => unsafe {
                libc::getgrnam_r(
                    name.as_ptr(),
                    grp.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            },
            // SAFETY: as above, with a gid instead of a name.
            Lookup::Gid(gid) => unsafe {
                libc::getgrgid_r(
                    gid,
                    grp.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            },
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: the call succeeded and returned `result == grp`, which it filled in; its
        // name points into `buf`, NUL-terminated, and both outlive this read.
        let (name, gid) = unsafe {
            let g = &*result;
            (
                CStr::from_ptr(g.gr_name).to_string_lossy().into_owned(),
                g.gr_gid,
            )
        };
        return Ok(Some((name, gid)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_group_resolves_names_and_numbers() {
        let root = Group::resolve("root").unwrap();
        assert_eq!((root.gid, root.name.as_deref()), (0, Some("root")));
        assert_eq!(Group::resolve("0").unwrap().gid, 0);
        // A gid the host has no name for is still a gid.
        assert_eq!(Group::resolve("4000000000").unwrap().gid, 4_000_000_000);
        for bad in ["no-such-group-snat", "", "a\0b"] {
            let e = Group::resolve(bad).unwrap_err();
            assert!(e.to_string().contains("numeric gid"), "{e}");
        }
    }
}
