//! The `snat` agent as a child process inside a namespace.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    netns::{BpfFs, Netns},
    topo::{Topology, POD_CIDR},
    user::{output_within, runnable_by_anyone},
};

/// The `snat` binary under test: `$SNAT_BIN` (set by `cargo xtask test`), else the workspace's
/// release build.
pub fn snat_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SNAT_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/snat");
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// The reply path the agents under test use: `$SNAT_TEST_INGRESS` (`tc`, `xdp`, `xdp-native`,
/// `xdp-generic`; set by `cargo xtask test` for its second pass), else the agent's default.
pub fn test_ingress() -> Option<String> {
    std::env::var("SNAT_TEST_INGRESS")
        .ok()
        .filter(|v| !v.is_empty())
}

/// `args` with `--ingress <$SNAT_TEST_INGRESS>` added, unless they choose a path themselves.
pub fn with_test_ingress<'a>(args: &[&'a str], ingress: &'a Option<String>) -> Vec<&'a str> {
    let mut out = args.to_vec();
    if let Some(path) = ingress {
        if !args.contains(&"--ingress") {
            out.extend(["--ingress", path.as_str()]);
        }
    }
    out
}

/// `snat cleanup` of `topo`'s uplink and its pins under `bpffs`, in the node's namespace; it must
/// succeed.
pub fn cleanup(topo: &Topology, bpffs: &BpfFs) {
    let out = topo.node.exec(&[
        snat_bin().to_str().expect("utf-8 path"),
        "cleanup",
        "--iface",
        &topo.uplink,
        "--pin-dir",
        bpffs.arg(),
    ]);
    assert!(out.status.success());
}

/// A running `snat run`, stopped with SIGINT (then SIGKILL) when dropped. Its output goes to
/// `<tmp>/<namespace>-snat.log`.
pub struct Agent {
    child: Option<Child>,
    ns: String,
    iface: String,
    log: PathBuf,
    stats_file: PathBuf,
}

impl Agent {
    /// Starts `snat run` on `topo`'s node uplink for the pods' CIDR, with tables for
    /// `max_mappings` mappings and the `extra` flags.
    pub fn for_pods(topo: &Topology, max_mappings: u32, extra: &[&str]) -> Self {
        let max = max_mappings.to_string();
        let mut args = vec!["--internal", POD_CIDR, "--max-mappings", &max];
        args.extend_from_slice(extra);
        Self::start(&topo.node, &topo.uplink, &args)
    }

    /// Starts `snat run --iface <iface> <args…>` in `ns` and waits until it answers (with
    /// `--ingress $SNAT_TEST_INGRESS` when that is set and `args` do not choose).
    pub fn start(ns: &Netns, iface: &str, args: &[&str]) -> Self {
        Self::start_wrapped(ns, &[], iface, args)
    }

    /// Like [`Agent::start`], with `wrapper` (e.g. `setpriv …`) run inside the namespace in front
    /// of `snat`.
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], iface: &str, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{}-snat.log", ns.name));
        let stats_file = std::env::temp_dir().join(format!("{}-snat-stats.json", ns.name));
        let _ = std::fs::remove_file(&stats_file);
        let ingress = test_ingress();
        let args = with_test_ingress(args, &ingress);
        let out = std::fs::File::create(&log).expect("creating the agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(snat_bin())
            .args(["run", "--iface", iface])
            .args(&args)
            .arg("--stats-file")
            .arg(&stats_file)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawning snat");
        let mut agent = Self {
            child: Some(child),
            ns: ns.name.clone(),
            iface: iface.to_owned(),
            log,
            stats_file,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("snat exited early ({status}):\n{}", agent.log());
            }
            if agent.try_stats().is_some() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "snat did not come up:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_stats(&self) -> Option<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(snat_bin())
            .args(["stats", "--json", "--iface", &self.iface])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// The agent's figures (`snat stats --json`).
    pub fn stats(&self) -> Value {
        self.try_stats()
            .unwrap_or_else(|| panic!("snat stats failed:\n{}", self.log()))
    }

    /// One counter, e.g. `counter("egress", "translated_tcp")`.
    pub fn counter(&self, group: &str, name: &str) -> u64 {
        self.stats()["counters"][group][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {group}.{name}"))
    }

    /// Runs `snat <args…>` against this agent (in its namespace); returns (success, stdout,
    /// stderr). `args` must include `--iface` where the command needs it.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(snat_bin())
            .args(args)
            .output()
            .expect("spawning snat");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `snat <args…>` against this agent as another user: `ip netns exec NS <user…> snat
    /// <args…>`, where `user` is a `setpriv` command line from [`crate::user`] (e.g.
    /// [`crate::user::nobody`]). Returns (exit code, stdout, stderr); a run longer than 60 s
    /// fails the test.
    pub fn cli_as(&self, user: &[String], args: &[&str]) -> (Option<i32>, String, String) {
        let out = output_within(
            Command::new("ip")
                .args(["netns", "exec", &self.ns])
                .args(user)
                .arg(runnable_by_anyone(&snat_bin()))
                .args(args),
            Duration::from_secs(60),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `snat <command> --iface <iface> --json <args…>`, parsed.
    pub fn json(&self, command: &str, args: &[&str]) -> Value {
        let mut full = vec![command, "--iface", &self.iface, "--json"];
        full.extend_from_slice(args);
        let (ok, out, err) = self.cli(&full);
        assert!(ok, "snat {full:?} failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("snat {full:?} printed no JSON ({e}): {out}"))
    }

    /// The agent's /metrics as Prometheus text (scraped inside its namespace, at the default
    /// address).
    pub fn scrape(&self, ns: &Netns) -> String {
        ns.run(|| {
            let r = crate::http::get(crate::http::METRICS, "/metrics");
            assert_eq!(r.status, 200, "{}\n{}", r.status_line, r.text());
            r.text()
        })
    }

    /// The agent's process id (`ip netns exec` execs snat in place).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the agent runs")
    }

    /// Active mappings of `proto` ("tcp", "udp", "icmp").
    pub fn mappings(&self, proto: &str) -> u64 {
        self.stats()["mappings"][proto].as_u64().expect("mappings")
    }

    /// Stops the agent with SIGINT; returns its exit status and the final figures it wrote.
    pub fn stop(mut self) -> (ExitStatus, Value) {
        let status = self.interrupt().expect("agent already stopped");
        let stats = std::fs::read(&self.stats_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| panic!("no final stats written:\n{}", self.log()));
        (status, stats)
    }

    /// Kills the agent with SIGKILL (no cleanup of its own), and waits for it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn interrupt(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our child's pid (`ip netns exec` execs snat in place).
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Agent {
    /// Stops the agent; removes its log and stats file unless a panic (a failing test) is
    /// unwinding, when they are kept in the temporary directory for a look.
    fn drop(&mut self) {
        self.interrupt();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
            let _ = std::fs::remove_file(&self.stats_file);
        }
    }
}
