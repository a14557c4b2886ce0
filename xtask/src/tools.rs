//! The programs the integration tests run, and the Debian packages that provide them.
//!
//! The test machines start bare, so `cargo xtask test` installs whatever is missing with apt
//! (as root) before anything else. A test that needs a new program adds a row to [`TEST_TOOLS`].

use anyhow::bail;

use crate::cmd::{self, say};

/// `(program looked up on PATH, Debian package that provides it)`.
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("ping", "iputils-ping"),
    ("traceroute", "traceroute"),
    ("ethtool", "ethtool"),
    ("tcpdump", "tcpdump"),
    ("tc", "iproute2"),
    ("ip", "iproute2"),
    ("python3", "python3"),
    // `promtool check metrics` validates snat's /metrics exposition.
    ("promtool", "prometheus"),
];

/// Installs the packages of the [`TEST_TOOLS`] that are not on PATH; does nothing if all are.
pub fn ensure() -> anyhow::Result<()> {
    let absent = missing();
    if absent.is_empty() {
        say(format_args!(
            "test tools: all present ({})",
            names(TEST_TOOLS)
        ));
        return Ok(());
    }
    let mut packages: Vec<&str> = absent.iter().map(|&(_, package)| package).collect();
    packages.sort_unstable();
    packages.dedup();
    let packages_list = packages.join(" ");
    say(format_args!(
        "test tools: missing {}; installing {packages_list} with apt-get",
        names(&absent)
    ));
    if !cmd::is_root() {
        bail!(
            "the test tools {} are missing and installing them ({packages_list}) needs root: run \
             `sudo -E cargo xtask test`, or `apt-get install {packages_list}` first",
            names(&absent)
        );
    }
    cmd::run(cmd::new("apt-get").arg("update"))?;
    cmd::run(
        cmd::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing();
    if !still.is_empty() {
        bail!(
            "after installing {packages_list}, {} still is not on PATH",
            names(&still)
        );
    }
    Ok(())
}

fn missing() -> Vec<(&'static str, &'static str)> {
    TEST_TOOLS
        .iter()
        .copied()
        .filter(|&(program, _)| cmd::find(program).is_none())
        .collect()
}

fn names(tools: &[(&str, &str)]) -> String {
    tools
        .iter()
        .map(|&(program, _)| program)
        .collect::<Vec<_>>()
        .join(", ")
}
