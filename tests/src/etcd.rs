//! A real etcd (Debian's 3.4.23, `/usr/bin/etcd`) for the cluster-mode tests: one member or
//! three, in a namespace of their own, reached from other namespaces over veths.
//!
//! ```text
//!   <prefix>-etcd                                   a client namespace (e.g. <prefix>-ecl)
//!   member i: 10.250.0.(i+1) on lo,    <prefix>-eN ── <prefix>-cN
//!   client :2379, peer :2380           10.251.N.1/30     10.251.N.2/30, route 10.250.0.0/24
//! ```
//!
//! Members listen only on their addresses on the namespace's loopback, never in the root
//! namespace nor on a host interface. Each client namespace gets its own veth ([`Etcd::connect`]),
//! which a test can take down and up again to cut that namespace off ([`Link::set_up`]).
//! Data directories live on tmpfs (`/dev/shm`). Dropping the [`Etcd`] (panics included) kills
//! every member, removes the data, and deletes the namespaces; while a panic unwinds it first
//! prints the end of each member's log.

use std::{
    cell::Cell,
    fs,
    future::Future,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::{unique_prefix, veth, Netns};

/// The etcd server the tests run.
pub const ETCD: &str = "/usr/bin/etcd";

/// One member of the cluster.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// `http://IP:2379`.
    pub fn client_url(&self) -> String {
        format!("http://{}:2379", self.ip)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:2380", self.ip)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A client namespace's veth to the etcd namespace.
#[derive(Debug, Clone)]
pub struct Link {
    /// The veth end in the etcd namespace.
    pub etcd_side: String,
    /// The veth end in the client namespace.
    pub client_side: String,
    /// The client's address on it.
    pub client_ip: Ipv4Addr,
}

impl Link {
    /// Takes the link down (the client namespace is cut off from etcd) or up again, from any
    /// thread (`etcd_ns` is [`Etcd::ns`]'s name).
    pub fn set_up(&self, etcd_ns: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        crate::netns::run(&["ip", "-n", etcd_ns, "link", "set", &self.etcd_side, state]);
    }
}

/// A running etcd cluster in its own namespace.
pub struct Etcd {
    pub prefix: String,
    pub members: Vec<Member>,
    data_root: PathBuf,
    links: Cell<u8>,
    /// A client namespace connected from the start, for tests that need just one.
    pub client: Netns,
    /// Where the members run. Dropped after the client namespace (fields drop in order).
    pub ns: Netns,
}

impl Etcd {
    /// Starts `members` members (1 or 3, say) and waits until every one is healthy.
    pub fn start(members: usize) -> Self {
        assert!((1..=9).contains(&members), "1 to 9 members");
        let prefix = unique_prefix();
        let ns = Netns::new(&format!("{prefix}-etcd"));
        let client = Netns::new(&format!("{prefix}-ecl"));
        let data_root = PathBuf::from("/dev/shm").join(format!("{prefix}-etcd"));
        let _ = fs::remove_dir_all(&data_root);
        fs::create_dir_all(&data_root).expect("creating the etcd data root");
        let members = (0..members)
            .map(|i| {
                let ip = Ipv4Addr::new(10, 250, 0, i as u8 + 1);
                ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
                let name = format!("m{i}");
                Member {
                    data_dir: data_root.join(&name),
                    log: data_root.join(format!("{name}.log")),
                    name,
                    ip,
                    child: None,
                }
            })
            .collect();
        let mut etcd = Self {
            prefix,
            members,
            data_root,
            links: Cell::new(0),
            client,
            ns,
        };
        etcd.connect(&etcd.client);
        for i in 0..etcd.members.len() {
            etcd.spawn(i);
        }
        etcd.wait_healthy();
        etcd
    }

    /// Client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Connects `ns` to the etcd namespace with a veth of its own, routing to the members.
    pub fn connect(&self, ns: &Netns) -> Link {
        let n = self.links.get();
        assert!(n < 64, "at most 64 client links");
        self.links.set(n + 1);
        let link = Link {
            etcd_side: format!("{}-e{n}", self.prefix),
            client_side: format!("{}-c{n}", self.prefix),
            client_ip: Ipv4Addr::new(10, 251, n, 2),
        };
        veth(&self.ns, &link.etcd_side, ns, &link.client_side);
        self.ns.ip(&[
            "addr",
            "add",
            &format!("10.251.{n}.1/30"),
            "dev",
            &link.etcd_side,
        ]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", link.client_ip),
            "dev",
            &link.client_side,
        ]);
        ns.ip(&[
            "route",
            "add",
            "10.250.0.0/24",
            "via",
            &format!("10.251.{n}.1"),
        ]);
        link
    }

    /// Takes a client's link down (cut off from etcd) or up again.
    pub fn set_link_up(&self, link: &Link, up: bool) {
        link.set_up(&self.ns.name, up);
    }

    fn spawn(&mut self, i: usize) {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("opening the member's log");
        let (client, peer) = (m.client_url(), m.peer_url());
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, ETCD])
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", &self.prefix])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {ETCD}: {e}"));
        m.child = Some(child);
    }

    /// Kills member `i` with SIGKILL and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to member `i`.
    pub fn signal(&self, i: usize, signal: i32) {
        let child = self.members[i].child.as_ref().expect("member runs");
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs etcd in place).
        let rc = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Starts member `i` again on its data and waits until the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy();
    }

    /// Starts every member that is not running (after [`Etcd::kill`] of all of them, say: a
    /// member alone has no quorum, so the health check waits for all) and waits until the
    /// cluster is healthy.
    pub fn restart_stopped(&mut self) {
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                self.spawn(i);
            }
        }
        self.wait_healthy();
    }

    /// `etcdctl --endpoints <running members> <args>` in the etcd namespace, whatever its exit
    /// status.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints = self
            .members
            .iter()
            .filter(|m| m.is_running())
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",");
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "etcdctl"])
            .args(["--endpoints", &endpoints, "--command-timeout", "3s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("spawning etcdctl")
    }

    /// Cluster mode's block keys as etcd holds them: block index → the node holding it.
    pub fn blocks(&self) -> std::collections::BTreeMap<u16, String> {
        let out = self.etcdctl(&["get", "--prefix", "/snat/v1/blocks/"]);
        assert!(out.status.success(), "etcdctl: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter_map(|kv| {
                let index = kv[0].rsplit('/').next()?.parse().ok()?;
                let v: serde_json::Value = serde_json::from_str(kv.get(1)?).ok()?;
                Some((index, v["node"].as_str()?.to_owned()))
            })
            .collect()
    }

    /// Waits (at most 30 s) until every running member says it is healthy.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            for m in &mut self.members {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    panic!(
                        "etcd member {} exited ({status}):\n{}",
                        m.name,
                        m.log_tail(30)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that leads, as the running members report
    /// (`etcdctl endpoint status`); waits at most 20 s for one.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(i) = self.try_leader() {
                return i;
            }
            assert!(Instant::now() < deadline, "no etcd leader within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_leader(&self) -> Option<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|s| {
            let header_id = s["Status"]["header"]["member_id"].as_u64()?;
            let leader = s["Status"]["leader"].as_u64()?;
            if header_id != leader {
                return None;
            }
            let endpoint = s["Endpoint"].as_str()?;
            self.members.iter().position(|m| m.client_url() == endpoint)
        })
    }

    /// The store's current revision (`etcdctl endpoint status`).
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        assert!(out.status.success(), "etcdctl endpoint status failed");
        let statuses: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("endpoint status JSON");
        statuses[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("a revision")
    }

    /// Compacts the history up to `revision` (`etcdctl compact`).
    pub fn compact(&self, revision: i64) {
        let out = self.etcdctl(&["compact", &revision.to_string()]);
        assert!(
            out.status.success(),
            "etcdctl compact {revision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for i in 0..self.members.len() {
            self.kill(i);
            if panicking {
                let m = &self.members[i];
                eprintln!("--- etcd member {} log (end):\n{}", m.name, m.log_tail(30));
            }
        }
        let _ = fs::remove_dir_all(&self.data_root);
        // The namespaces go when their fields drop.
    }
}

/// Runs the future `f` makes on a current-thread tokio runtime, on a thread inside `ns` (so its
/// sockets live there), and waits for its result.
pub fn block_on<T, F>(ns: &Netns, f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    match spawn_block_on(ns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// [`block_on`] without waiting: join the handle for the result.
pub fn spawn_block_on<T, F>(ns: &Netns, f: impl FnOnce() -> F + Send + 'static) -> JoinHandle<T>
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    ns.spawn_with_stack(8 << 20, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f())
    })
}
