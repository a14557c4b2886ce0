//! The programs the benchmark runs besides the test harness's own, and the Debian packages that
//! provide them: the one list, used both by `cargo xtask bench` (which installs what is missing,
//! including this file as a module) and by the benchmark (which checks them before anything else).

/// `(program looked up on PATH, Debian package that provides it)`: the nftables baseline, bulk
/// TCP (iperf3, and `ss` to see its server listen), flushing the node's conntrack table between
/// nftables runs, offloads, the namespaces and their sysctls (`ip netns exec … sysctl`), and
/// etcd for the cluster section.
pub const BENCH_TOOLS: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("conntrack", "conntrack"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("sysctl", "procps"),
    // Cluster mode: etcd in a namespace of the bench's own.
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
];
