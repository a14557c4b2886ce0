//! Network namespaces owned by a test, and running code inside them.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

/// A prefix no other test process uses: `s` + 4 hex digits of the pid + a per-process counter.
/// Short, because interface names are limited to 15 bytes.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "s{:04x}{:x}",
        std::process::id() & 0xffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace deleted (by its exact name) when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        run(&["ip", "netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec <ns> <args>`, panicking on failure.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec <ns> <args>`, returning the output whatever the exit status.
    pub fn exec_unchecked(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawning {args:?} in {}: {e}", self.name))
    }

    pub fn sysctl(&self, key_value: &str) {
        self.exec(&["sysctl", "-qw", key_value]);
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.spawn_with_stack(256 * 1024, f)
    }

    /// [`Netns::spawn`] with a stack of `stack_size` bytes (async clients need more than the
    /// small stacks of the traffic threads).
    pub fn spawn_with_stack<T: Send + 'static>(
        &self,
        stack_size: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        std::thread::Builder::new()
            .stack_size(stack_size)
            .spawn(move || {
                // SAFETY: `file` is an open namespace file; setns only changes this thread's
                // network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .expect("spawning a thread")
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends inside it, and with them their peers.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Creates a veth pair with one end in each namespace, both up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    run(&[
        "ip", "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name,
        "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// A BPF file system of the test's own, mounted under the temp directory in the root mount
/// namespace (so agents started with `ip netns exec` see it and what they pin there outlives
/// them), unmounted and removed when dropped.
#[derive(Debug)]
pub struct BpfFs {
    pub path: std::path::PathBuf,
}

impl BpfFs {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{name}-bpffs"));
        std::fs::create_dir_all(&path).expect("creating the bpffs mount point");
        run(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            path.to_str().expect("utf-8 path"),
        ]);
        Self { path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}
