//! The agent's control socket: an abstract Unix socket named `snat/<iface>`. Abstract sockets
//! belong to the network namespace, so `ip netns exec NS snat status --iface IF` reaches the agent
//! of that namespace and two agents on same-named interfaces in different namespaces never meet.
//! Binding it also guards against a second agent on the same interface.
//!
//! Protocol: the client sends one [`Request`] as a JSON line; the agent answers with one
//! [`Response`] as JSON and closes the connection.

use std::{
    io::{self, Read as _, Write as _},
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use log::warn;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::{agent::AgentState, cidr::PortRange, report::Report, view::ConnFilter};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The report without mapping rows.
    Status,
    /// The report with the mappings that match the filter.
    Conns { filter: ConnFilter },
    /// New flows use this port range, and these NAT IPs if given (a plan's slice).
    Set {
        port_range: String,
        nat_ips: Option<Vec<std::net::Ipv4Addr>>,
        /// The plan slice this is, for status.
        slice: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Report(Box<Report>),
    Done {
        message: String,
        warnings: Vec<String>,
    },
    Error {
        message: String,
    },
}

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

/// Sends `request` to the agent on `iface` and returns its answer; an agent-side error becomes
/// an `Err` carrying the agent's message.
pub fn request(iface: &str, request: &Request) -> anyhow::Result<Response> {
    let mut s = UnixStream::connect_addr(&address(iface)?).map_err(|e| {
        if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) {
            anyhow::anyhow!(
                "no snat agent runs on {iface:?} in this network namespace (start one with `snat run --iface {iface} …`, or run this command inside the agent's namespace: `ip netns exec NS snat …`)"
            )
        } else {
            anyhow::Error::new(e).context("connecting to the agent")
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    s.write_all(&line)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .context("reading the agent's answer")?;
    match serde_json::from_str(&answer).context("parsing the agent's answer")? {
        Response::Error { message } => anyhow::bail!("{message}"),
        other => Ok(other),
    }
}

/// Asks for a report (with rows when `filter` is given).
pub fn report(iface: &str, filter: Option<ConnFilter>) -> anyhow::Result<Report> {
    let req = match filter {
        Some(filter) => Request::Conns { filter },
        None => Request::Status,
    };
    match request(iface, &req)? {
        Response::Report(r) => Ok(*r),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Answers requests until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AgentState>) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, state).await {
                warn!("control request failed: {e:#}");
            }
        });
    }
}

async fn answer(stream: tokio::net::UnixStream, state: Arc<AgentState>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(read, 64 * 1024))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => tokio::task::spawn_blocking(move || handle(&state, req)).await?,
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    write.write_all(&serde_json::to_vec(&response)?).await?;
    write.shutdown().await?;
    Ok(())
}

fn handle(state: &AgentState, req: Request) -> Response {
    let fail = |e: anyhow::Error| Response::Error {
        message: format!("{e:#}"),
    };
    match req {
        Request::Status => Report::build(state, None)
            .map(|r| Response::Report(Box::new(r)))
            .unwrap_or_else(fail),
        Request::Conns { filter } => match filter.parse() {
            Ok(f) => Report::build(state, Some(f))
                .map(|r| Response::Report(Box::new(r)))
                .unwrap_or_else(fail),
            Err(message) => Response::Error { message },
        },
        Request::Set {
            port_range,
            nat_ips,
            slice,
        } => match port_range.parse::<PortRange>() {
            Ok(range) => match state.set_pool(nat_ips, range, slice) {
                Ok((message, warnings)) => Response::Done { message, warnings },
                Err(e) => fail(e),
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
    }
}
