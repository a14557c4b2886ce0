//! Crafted packets sent with scapy (`tests/scapy/forge.py`) from inside a namespace: a spoofed
//! source, a chosen TTL, sequence number or ICMP quote, sent at layer 2 so nothing on the sending
//! side routes or fixes it.

use std::path::PathBuf;

use serde_json::Value;

use crate::netns::Netns;

/// The MAC address of `iface` in `ns`.
pub fn mac(ns: &Netns, iface: &str) -> String {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sends one packet of `kind` (`udp`, `tcp`, `frag_needed`; fields as `forge.py` documents) from
/// `ns` on `iface` to the Ethernet address `dst_mac`.
pub fn send(ns: &Netns, iface: &str, dst_mac: &str, kind: &str, args: &Value) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scapy/forge.py");
    // Debian's python3, which python3-scapy installs into (another python3 may come first on PATH).
    let out = ns.exec(&[
        "/usr/bin/python3",
        script.to_str().expect("utf-8 path"),
        iface,
        dst_mac,
        kind,
        &args.to_string(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent",
        "forge.py {kind} {args}"
    );
}
