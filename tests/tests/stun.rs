//! RFC 3489 behaviour discovery through the NAT: `stund` with two addresses on the internet
//! side, the `stun` client in a pod. What it reports must match docs/behaviour.md: endpoint-
//! independent mapping, address-dependent filtering, the pod's port kept when it is in the range,
//! no hairpinning.

use std::process::{Child, Command, Stdio};

use tests::{
    agent::Agent,
    topo::{Topology, POD_CIDR, SERVER},
    traffic::wait_for,
};

struct Stund(Child);

impl Drop for Stund {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client's one-line verdict ("Primary: …").
fn discover(topo: &Topology, extra: &[&str]) -> String {
    let server = SERVER.to_string();
    let mut args = vec!["timeout", "20", "stun", server.as_str()];
    args.extend_from_slice(extra);
    let out = topo.pods[0].ns.exec_unchecked(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("Primary:"))
        .unwrap_or_else(|| panic!("no verdict from stun:\n{text}"))
        .to_owned()
}

#[test]
fn stun_reports_the_documented_mapping_and_filtering() {
    let topo = Topology::new(1);
    let second = "203.0.113.11";
    topo.server.ip(&[
        "addr",
        "add",
        &format!("{second}/24"),
        "dev",
        &format!("{}-sr", topo.prefix),
    ]);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--max-mappings", "4096"],
    );
    let _stund = Stund(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.server.name,
                "stund",
                "-h",
                &SERVER.to_string(),
                "-a",
                second,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stund (installed by cargo xtask test)"),
    );
    let ready = wait_for(std::time::Duration::from_secs(5), || {
        let ss = topo.server.exec(&["ss", "-lun"]);
        String::from_utf8_lossy(&ss.stdout)
            .contains(":3479")
            .then_some(())
    });
    assert!(ready.is_some(), "stund did not start");

    // The client's default source port (16384-32767) is outside the range: mapped, not kept.
    let verdict = discover(&topo, &[]);
    assert!(
        verdict.contains("Independent Mapping, Address Dependent Filter"),
        "{verdict}"
    );
    assert!(
        verdict.contains("random port") && verdict.contains("no hairpin"),
        "{verdict}"
    );
    let same_endpoint = agent.counter("alloc", "port_same_endpoint");
    assert!(
        same_endpoint >= 1,
        "the second server address reused the mapping through the endpoint's hint"
    );
    // A source port inside the range is kept, towards both server addresses: by port
    // preservation each time (an endpoint that got its own port needs no hint).
    let preserved = agent.counter("alloc", "port_preserved");
    let verdict = discover(&topo, &["-p", "40000"]);
    assert!(
        verdict.contains("Independent Mapping, Address Dependent Filter, preserves ports"),
        "{verdict}"
    );
    assert!(
        agent.counter("alloc", "port_preserved") >= preserved + 2,
        "both server addresses kept the client's port"
    );
    assert_eq!(
        agent.counter("alloc", "port_same_endpoint"),
        same_endpoint,
        "no hint was written for a kept port"
    );
}
