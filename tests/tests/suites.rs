//! Every integration suite in one test binary: each `tests/tests/<suite>.rs` is a module here, so
//! cargo builds and links one executable instead of one per suite (each linking aya, tokio,
//! etcd-client and snat-user), which is most of the `tests` crate's build time.
//!
//! The suites share one process, run one test at a time (`--test-threads=1`, as
//! `cargo xtask test` runs them). They keep no process-wide state of their own between tests:
//! the harness reads `SNAT_BIN` and `SNAT_TEST_INGRESS` but never sets them, names its namespaces
//! with the pid and a per-process counter (`tests::netns::unique_prefix`), and a test's threads
//! enter namespaces, never the test's own thread.
//!
//! One suite alone: `cargo test -p tests --test suites -- <suite>:: --test-threads=1` (e.g.
//! `nat66::`; `--workspace` instead of `-p tests` reuses what `cargo xtask test` built); a test's
//! name is `<suite>::<test>`. A filter matches every name that contains it,
//! so `<suite>::` picks that suite only while no suite's name ends with `_<suite>`:
//! [`each_suite_filter_picks_one_suite`] keeps it so, and is why `gateway.rs` is the module
//! `snat_gateway` (after the program it tests), apart from `cluster_gateway`.

mod blocks;
mod cli;
mod cluster;
mod cluster_admin;
mod cluster_faults;
mod cluster_gateway;
mod cluster_mode;
mod control;
mod correctness;
mod datapath;
mod etcd_store;
mod exhaustion;
mod findings;
mod flood;
mod fragments;
mod hairpin;
mod malformed;
mod metrics;
mod nat66;
mod observability;
mod pooling;
mod restart;
#[path = "gateway.rs"]
mod snat_gateway;
mod stop;
mod stun;
mod test_run;
mod test_run6;
mod udp_timeouts;
mod xdp;

/// Every file in tests/tests is a module here (cargo no longer finds them itself), and the filter
/// `<suite>::` selects that suite's tests and no other suite's: `cargo xtask test` skips the
/// suites it does not run again on the XDP reply path this way.
#[test]
fn each_suite_filter_picks_one_suite() {
    let suites: Vec<&str> = include_str!("suites.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';'))
        .collect();
    assert!(suites.len() > 20, "suites not found: {suites:?}");
    // With `autotests = false`, a suite file left out here would never run.
    let mut files = vec!["suites.rs".to_owned()];
    let mut path = None;
    for line in include_str!("suites.rs").lines() {
        if let Some(p) = line.strip_prefix("#[path = \"") {
            path = p.strip_suffix("\"]");
        } else if let Some(suite) = line.strip_prefix("mod ").and_then(|l| l.strip_suffix(';')) {
            files.push(
                path.take()
                    .map_or_else(|| format!("{suite}.rs"), str::to_owned),
            );
        }
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    for file in std::fs::read_dir(dir).expect("tests/tests") {
        let name = file.expect("tests/tests entry").file_name();
        let name = name.to_str().expect("utf-8 file name");
        assert!(
            !name.ends_with(".rs") || files.iter().any(|f| f == name),
            "tests/tests/{name} is not a module of tests/tests/suites.rs: add it there"
        );
    }
    for a in &suites {
        for b in &suites {
            assert!(
                a == b || !format!("{b}::").contains(&format!("{a}::")),
                "the filter `{a}::` also runs the suite {b}: name the module of one of them \
                 otherwise (`#[path = \"{a}.rs\"] mod …;`)"
            );
        }
    }
}
