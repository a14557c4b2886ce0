//! The agent's control socket: an abstract Unix socket named `snat/<iface>`. Abstract sockets
//! belong to the network namespace, so `ip netns exec NS snat stats --iface IF` reaches the agent
//! of that namespace and two agents on same-named interfaces in different namespaces never meet.
//! Binding it also guards against a second agent on the same interface.
//!
//! Protocol: the client sends one command line, the agent answers with one JSON document and
//! closes the connection.

use std::{
    io::{self, Read as _, Write as _},
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    time::Duration,
};

use anyhow::Context as _;

fn address(iface: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("snat/{iface}"))
}

/// Binds the control socket of `iface`, failing clearly if an agent already runs there.
pub fn bind(iface: &str) -> anyhow::Result<UnixListener> {
    match UnixListener::bind_addr(&address(iface)?) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => anyhow::bail!(
            "an snat agent already runs on {iface:?} in this network namespace; stop it before starting another"
        ),
        Err(e) => Err(e).context("binding the control socket"),
    }
}

/// Sends `command` to the agent on `iface` and returns its answer.
pub fn request(iface: &str, command: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect_addr(&address(iface)?).map_err(|e| {
        if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) {
            anyhow::anyhow!(
                "no snat agent runs on {iface:?} in this network namespace (start one with `snat run --iface {iface} …`, or run this command inside the agent's namespace: `ip netns exec NS snat …`)"
            )
        } else {
            anyhow::Error::new(e).context("connecting to the agent")
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .context("reading the agent's answer")?;
    Ok(answer)
}
