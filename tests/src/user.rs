//! Running commands as another user: `setpriv` in front of them (inside a namespace with
//! `ip netns exec NS setpriv … CMD`), and making a binary runnable by that user.

use std::{
    io::Read,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The unprivileged user the tests act as (nobody/nogroup).
pub const NOBODY: u32 = 65534;

fn setpriv(groups: &[&str], caps: &[&str]) -> Vec<String> {
    let id = NOBODY.to_string();
    ["setpriv", "--reuid", &id, "--regid", &id]
        .iter()
        .chain(groups)
        .chain(caps)
        .map(|s| (*s).to_owned())
        .collect()
}

/// uid and gid 65534, no supplementary groups, no capabilities.
pub fn nobody() -> Vec<String> {
    setpriv(&["--clear-groups"], &[])
}

/// uid and gid 65534 with these supplementary groups, no capabilities.
pub fn nobody_in_groups(groups: &[u32]) -> Vec<String> {
    let list = groups
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    setpriv(&["--groups", &list], &[])
}

/// uid and gid 65534, no supplementary groups, holding CAP_NET_ADMIN (ambient, so it survives
/// the exec of the command).
pub fn nobody_with_net_admin() -> Vec<String> {
    setpriv(
        &["--clear-groups"],
        &["--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"],
    )
}

/// `bin`, or a copy of it that any user may run: if a directory on its path or the file itself
/// is closed to others (a checkout under /root), it is copied once into the temporary
/// directory, under a name made of its size and modification time so reruns reuse it.
pub fn runnable_by_anyone(bin: &Path) -> PathBuf {
    let open = |p: &Path, bits: u32| {
        std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & bits == bits)
    };
    let bin = std::fs::canonicalize(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    if open(&bin, 0o005) && bin.ancestors().skip(1).all(|d| open(d, 0o001)) {
        return bin;
    }
    let meta = std::fs::metadata(&bin).expect("binary metadata");
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let name = bin.file_name().expect("a file name").to_string_lossy();
    let dir = std::env::temp_dir().join(format!("snat-tests-{name}-{}-{stamp}", meta.len()));
    let copy = dir.join(&*name);
    if !copy.exists() {
        std::fs::create_dir_all(&dir).expect("creating the copy's directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let part = dir.join(format!("{name}.part"));
        std::fs::copy(&bin, &part).expect("copying the binary");
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&part, &copy).expect("placing the copy");
    }
    copy
}

/// Runs `cmd` to its end, killing it (and failing the test) if it takes longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // Readers drain the pipes so a chatty child never blocks on a full one.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{cmd:?} took more than {limit:?}; killed it:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}
