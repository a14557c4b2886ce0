//! The programs the integration tests and the benchmarks run, and the Debian packages that
//! provide them.
//!
//! The test machines start bare, so `cargo xtask test`, `cargo xtask demo` and `cargo xtask bench`
//! install whatever is missing with apt (as root) before anything else. A test that needs a new program adds a row to
//! [`TEST_TOOLS`], a benchmark to [`BENCH_TOOLS`], which lives with the benchmark
//! (`tests/examples/bench/tools.rs`) so that the benchmark checks the same list before it starts.
//! The build itself needs [`BUILD_TOOLS`] (etcd-client's build script compiles etcd's protos).
//!
//! An entry whose "program" is an absolute path is a file that must exist (a package that
//! installs no program, such as the well-known protos of `libprotobuf-dev`). Packages are
//! installed with `--no-install-recommends` and with daemons kept from starting (a
//! `policy-rc.d` that refuses, while apt runs): `etcd-server`, `prometheus` or `stun-server`
//! must not start a system service; the tests start their own, inside namespaces.

use std::{fs, io, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{bail, Context as _};

use crate::cmd::{self, say};

/// `(program looked up on PATH, Debian package that provides it)`.
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("ping", "iputils-ping"),
    ("traceroute", "traceroute"),
    ("ethtool", "ethtool"),
    ("tcpdump", "tcpdump"),
    ("tc", "iproute2"),
    ("ip", "iproute2"),
    // The harness sets sysctls in its namespaces with `ip netns exec <ns> sysctl -qw`.
    ("sysctl", "procps"),
    ("python3", "python3"),
    // `promtool check metrics` validates snat's /metrics exposition.
    ("promtool", "prometheus"),
    // STUN discovery through the NAT (endpoint-independent mapping).
    ("stun", "stun-client"),
    ("stund", "stun-server"),
    // Hostile input: a SYN flood, and malformed packets crafted with scapy (for /usr/bin/python3).
    ("hping3", "hping3"),
    ("scapy", "python3-scapy"),
    ("nstat", "iproute2"),
    // Cluster mode: the tests run their own etcd (one member, and three) in namespaces.
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
];

/// What building snat needs besides Rust: `protoc` and the well-known protos, for the build
/// script of the `etcd-client` crate.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("protoc", "protobuf-compiler"),
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
];

/// What `cargo xtask demo` runs besides the `snat` binary: the namespaces' plumbing and `ping`
/// (a fresh machine has none of `ping`, and may lack the others).
pub const DEMO_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("ping", "iputils-ping"),
];

#[path = "../../tests/examples/bench/tools.rs"]
mod bench_tools;

/// What `cargo xtask bench` runs besides the test harness.
pub use bench_tools::BENCH_TOOLS;

/// Installs the packages of the [`TEST_TOOLS`] that are not on PATH; does nothing if all are.
pub fn ensure() -> anyhow::Result<()> {
    ensure_set("test tools", TEST_TOOLS, "sudo -E cargo xtask test")
}

/// Installs the packages of the [`DEMO_TOOLS`] that are not on PATH; does nothing if all are.
pub fn ensure_demo() -> anyhow::Result<()> {
    ensure_set("demo tools", DEMO_TOOLS, "sudo -E cargo xtask demo")
}

/// Installs the packages of the [`BUILD_TOOLS`] that are missing; does nothing if all are there.
pub fn ensure_build() -> anyhow::Result<()> {
    ensure_set("build tools", BUILD_TOOLS, "sudo -E cargo xtask build")
}

/// Installs the packages of the [`BENCH_TOOLS`] that are not on PATH; does nothing if all are.
pub fn ensure_bench() -> anyhow::Result<()> {
    ensure_set("bench tools", BENCH_TOOLS, "sudo -E cargo xtask bench")
}

/// Installs the packages of `table` whose programs are not on PATH (`what` names the set in
/// messages, `usage` is how to run the command as root).
fn ensure_set(
    what: &str,
    table: &'static [(&'static str, &'static str)],
    usage: &str,
) -> anyhow::Result<()> {
    let absent = missing(table);
    if absent.is_empty() {
        say(format_args!("{what}: all present ({})", names(table)));
        return Ok(());
    }
    let mut packages: Vec<&str> = absent.iter().map(|&(_, package)| package).collect();
    packages.sort_unstable();
    packages.dedup();
    let packages_list = packages.join(" ");
    say(format_args!(
        "{what}: missing {}; installing {packages_list} with apt-get",
        names(&absent)
    ));
    if !cmd::is_root() {
        bail!(
            "the {what} {} are missing and installing them ({packages_list}) needs root: run \
             `{usage}`, or `apt-get install {packages_list}` first",
            names(&absent)
        );
    }
    cmd::run(cmd::new("apt-get").arg("update"))?;
    {
        let _no_daemons = NoDaemons::new()?;
        cmd::run(
            cmd::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let still = missing(table);
    if !still.is_empty() {
        bail!(
            "after installing {packages_list}, {} still is not on PATH",
            names(&still)
        );
    }
    Ok(())
}

fn missing(table: &'static [(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    table
        .iter()
        .copied()
        .filter(|&(program, _)| {
            if program.starts_with('/') {
                !Path::new(program).exists()
            } else {
                cmd::find(program).is_none()
            }
        })
        .collect()
}

/// Debian's hook that `invoke-rc.d` and `deb-systemd-invoke` ask before they start a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// While alive, a `policy-rc.d` that answers 101 ("action forbidden"), so packages installed
/// meanwhile start no daemon (etcd-server would otherwise serve on the host's localhost). Made
/// only if none exists (an existing one is the administrator's and stays as it is); removed on
/// drop.
struct NoDaemons {
    made: bool,
}

impl NoDaemons {
    fn new() -> anyhow::Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            say(format_args!("{POLICY_RC_D} exists; leaving it as it is"));
            return Ok(Self { made: false });
        }
        fs::write(
            path,
            "#!/bin/sh\n# cargo xtask: start no service while it installs packages\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { made: true })
    }
}

impl Drop for NoDaemons {
    fn drop(&mut self) {
        if self.made {
            if let Err(e) = fs::remove_file(POLICY_RC_D) {
                if e.kind() != io::ErrorKind::NotFound {
                    say(format_args!(
                        "could not remove {POLICY_RC_D}: {e}; remove it by hand"
                    ));
                }
            }
        }
    }
}

fn names(tools: &[(&str, &str)]) -> String {
    tools
        .iter()
        .map(|&(program, _)| program)
        .collect::<Vec<_>>()
        .join(", ")
}
