//! The agent's control socket: an abstract Unix socket named `snat/<iface>`. Abstract sockets
//! belong to the network namespace, so `ip netns exec NS snat status --iface IF` reaches the agent
//! of that namespace and two agents on same-named interfaces in different namespaces never meet.
//! Binding it also guards against a second agent on the same interface.
//!
//! Protocol: the client sends one [`Request`] as a JSON line; the agent answers with one
//! [`Response`] as JSON and closes the connection.
//!
//! Who may do what: an abstract socket has no file permissions, so every process of the network
//! namespace can connect (any hostNetwork pod). The agent therefore checks each client's
//! credentials (`SO_PEERCRED`, and `/proc` guarded by a pidfd against pid reuse: see
//! [`super::access`]) and each request's class ([`Request::class`]):
//! - changes (`set`) need uid 0 or CAP_NET_ADMIN in the agent's user namespace;
//! - reads (`status`, `stats`, `conns`, `top`) need the same or membership of `--control-group`.
//!
//! A refused client gets [`Response::Denied`] with what would be allowed; the agent counts the
//! refusal per request name ([`Request::name`]; `stats` and `top` send `status`) and logs its
//! uid, pid and request, at most [`access::LOG_LINES`] lines per [`access::LOG_WINDOW`] for all
//! of the socket's warnings together, then one line with how many were held back.
//!
//! Limits, so that no client, and no crowd of unprivileged clients, can wedge the socket:
//! - a request is at most [`MAX_REQUEST`] bytes (a longer one is answered with an error, never
//!   cut and parsed), and must arrive within [`REQUEST_TIMEOUT`] of the connection's accept;
//! - the answer must be taken within [`ANSWER_TIMEOUT`], else the connection is dropped;
//! - concurrent connections are capped per standing, decided from the credentials right after
//!   accept: [`BUDGET_ADMIN`] for root and CAP_NET_ADMIN, [`BUDGET_READER`] for
//!   `--control-group` members, [`BUDGET_OTHER`] for everyone else. A client whose budget is full
//!   gets a "busy" error at once and is closed: nothing queues, so a flood costs the agent no
//!   more than the budgets' file descriptors, and one class's flood never takes another's slots
//!   (root keeps its own, whatever unprivileged users do). Everyone else's budget is small
//!   because all such a client can get is a refusal; a slow one holds its slot for at most
//!   [`REQUEST_TIMEOUT`].
//! - bad input (garbage, invalid UTF-8, deeply nested or huge JSON, numbers out of range) is
//!   answered with an error naming the problem; nothing in the request path panics, and a
//!   failed accept (e.g. out of file descriptors) is logged and retried, never fatal.

use std::{
    io::{self, Read as _, Write as _},
    os::{
        fd::AsFd as _,
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    access::{self, Class, Inspector, Peer, Standing},
    report::Report,
    Agent, PoolChange,
};
use crate::{settings::group::Group, tables::view::ConnFilter};

/// Largest request, in bytes (the newline included).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has, from the accept, to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the whole answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent connections of root and CAP_NET_ADMIN clients.
pub const BUDGET_ADMIN: usize = 32;
/// Concurrent connections of `--control-group` members.
pub const BUDGET_READER: usize = 16;
/// Concurrent connections of everyone else (who only ever get a refusal).
pub const BUDGET_OTHER: usize = 8;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The report without mapping rows.
    Status,
    /// The report with the mappings that match the filter.
    Conns { filter: ConnFilter },
    /// New flows use this port range, and these NAT IPs if given (a plan's slice).
    Set(PoolChange),
}

impl Request {
    /// The request names, as `snat_control_refused_total` labels them.
    pub const NAMES: [&'static str; 3] = ["status", "conns", "set"];

    /// Who may send it: every request type must say (no wildcard here, on purpose).
    pub const fn class(&self) -> Class {
        match self {
            Request::Status | Request::Conns { .. } => Class::Read,
            Request::Set(_) => Class::Change,
        }
    }

    pub const fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Conns { .. } => "conns",
            Request::Set(_) => "set",
        }
    }
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
    /// The client may not send this request (see the module doc).
    Denied {
        message: String,
    },
}

/// The agent refused a request for the client's lack of rights.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub message: String,
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
/// an `Err` carrying the agent's message, a refusal an `Err` holding [`Denied`].
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
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // The agent may answer (and close) before taking everything, e.g. when it is busy: its
    // answer says why, so a failed write is only reported if no answer follows.
    let sent = s
        .write_all(&line)
        .and_then(|()| s.shutdown(std::net::Shutdown::Write));
    let mut answer = Vec::new();
    let read = s.read_to_end(&mut answer);
    let parsed = serde_json::from_slice::<Response>(&answer);
    let response = match (parsed, read, sent) {
        (Ok(r), _, _) => r,
        (Err(_), _, Err(e)) => return Err(e).context("sending the request to the agent"),
        (Err(_), Err(e), _) => return Err(e).context("reading the agent's answer"),
        (Err(e), Ok(_), _) => return Err(e).context("parsing the agent's answer"),
    };
    match response {
        Response::Error { message } => anyhow::bail!("{message}"),
        Response::Denied { message } => Err(Denied { message }.into()),
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

/// The connection slots of each standing.
struct Budgets {
    admin: Arc<Semaphore>,
    reader: Arc<Semaphore>,
    other: Arc<Semaphore>,
}

impl Budgets {
    fn new() -> Self {
        Self {
            admin: Arc::new(Semaphore::new(BUDGET_ADMIN)),
            reader: Arc::new(Semaphore::new(BUDGET_READER)),
            other: Arc::new(Semaphore::new(BUDGET_OTHER)),
        }
    }

    fn take(&self, standing: Standing) -> Result<OwnedSemaphorePermit, (&'static str, usize)> {
        let (sem, what, size) = match standing {
            Standing::Admin => (&self.admin, "root/CAP_NET_ADMIN", BUDGET_ADMIN),
            Standing::Reader => (&self.reader, "--control-group", BUDGET_READER),
            Standing::Other => (&self.other, "unprivileged", BUDGET_OTHER),
        };
        sem.clone().try_acquire_owned().map_err(|_| (what, size))
    }
}

/// What every connection's task needs.
struct Served {
    state: Arc<dyn Agent>,
    iface: String,
    group: Option<Group>,
}

/// Answers requests until the task is dropped.
/// Answers requests for the agent `state` on `iface` until the task is dropped; members of
/// `group` may read.
pub async fn serve(
    listener: UnixListener,
    state: Arc<dyn Agent>,
    iface: String,
    group: Option<Group>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let served = Arc::new(Served {
        iface,
        group,
        state: state.clone(),
    });
    let inspector = Inspector::default();
    let budgets = Budgets::new();
    let mut flush = tokio::time::interval(access::LOG_WINDOW);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = flush.tick() => {
                state.refusals().flush();
                continue;
            }
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE: the connection stays queued; try again shortly.
                state
                    .refusals()
                    .warn(format_args!("control: accepting a connection failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Credentials first: they pick the budget the connection counts against.
        let peer = match inspector.peer(stream.as_fd()) {
            Ok(p) => p,
            Err(e) => {
                state.refusals().warn(format_args!(
                    "control: cannot read a client's credentials ({e}); closed it"
                ));
                continue;
            }
        };
        let permit = match budgets.take(peer.standing(served.group.as_ref())) {
            Ok(p) => p,
            Err((what, size)) => {
                state.refusals().warn(format_args!(
                    "control: turned away uid {} pid {}: all {size} connections for {what} clients are in use",
                    peer.uid, peer.pid
                ));
                let busy = Response::Error {
                    message: format!(
                        "the agent on {} is busy: all {size} control connections for {what} clients are in use; try again shortly",
                        served.iface
                    ),
                };
                // A fresh socket's buffer takes this at once; if not, the client learns nothing.
                if let Ok(bytes) = serde_json::to_vec(&busy) {
                    let _ = stream.try_write(&bytes);
                }
                continue;
            }
        };
        let served = served.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(stream, &peer, &served).await {
                served.state.refusals().warn(format_args!(
                    "control: request from uid {} pid {} failed: {e:#}",
                    peer.uid, peer.pid
                ));
            }
        });
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("request too large: more than {MAX_REQUEST} bytes without a newline; a request is one JSON line")]
    TooLarge,
    #[error("no complete request within {}s: send one JSON line, ending with a newline or the end of the stream", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
}

/// One request line, at most [`MAX_REQUEST`] bytes, within `limit` ([`REQUEST_TIMEOUT`]).
async fn read_request(
    read: impl tokio::io::AsyncRead + Unpin,
    limit: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::with_capacity(512);
    let mut limited = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    tokio::time::timeout(limit, limited.read_until(b'\n', &mut line))
        .await
        .map_err(|_| ReadError::Timeout)??;
    if line.len() > MAX_REQUEST {
        return Err(ReadError::TooLarge);
    }
    Ok(line)
}

async fn answer(
    mut stream: tokio::net::UnixStream,
    peer: &Peer,
    served: &Served,
) -> anyhow::Result<()> {
    let state = &served.state;
    let response = match read_request(&mut stream, REQUEST_TIMEOUT).await {
        Err(ReadError::Io(e)) => return Err(e.into()),
        Err(e) => {
            state.refusals().warn(format_args!(
                "control: uid {} pid {}: {e}",
                peer.uid, peer.pid
            ));
            Response::Error {
                message: e.to_string(),
            }
        }
        Ok(line) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => {
                state.refusals().warn(format_args!(
                    "control: bad request from uid {} pid {}: {e}",
                    peer.uid, peer.pid
                ));
                Response::Error {
                    message: format!("bad request: {e}"),
                }
            }
            Ok(req) => {
                match access::decide(peer, req.class(), served.group.as_ref(), &served.iface) {
                    Err(message) => {
                        state.refusals().count(req.name());
                        state.refusals().warn(format_args!(
                            "control: refused {} from uid {} pid {}: {message}",
                            req.name(),
                            peer.uid,
                            peer.pid
                        ));
                        Response::Denied { message }
                    }
                    Ok(()) => {
                        let state = state.clone();
                        tokio::task::spawn_blocking(move || handle(state.as_ref(), req))
                            .await
                            .unwrap_or_else(|e| Response::Error {
                                message: format!("the agent failed to answer: {e}"),
                            })
                    }
                }
            }
        },
    };
    let bytes = serde_json::to_vec(&response)?;
    tokio::time::timeout(ANSWER_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the client did not take the answer within {}s",
            ANSWER_TIMEOUT.as_secs()
        )
    })??;
    Ok(())
}

fn handle(state: &dyn Agent, req: Request) -> Response {
    let fail = |e: anyhow::Error| Response::Error {
        message: format!("{e:#}"),
    };
    let report = |rows| {
        state
            .report(rows)
            .map(|r| Response::Report(Box::new(r)))
            .unwrap_or_else(fail)
    };
    match req {
        Request::Status => report(None),
        Request::Conns { filter } => report(Some(&filter)),
        Request::Set(change) => match state.set_pool(&change) {
            Ok((message, warnings)) => Response::Done { message, warnings },
            Err(e) => fail(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_has_a_class_and_a_counted_name() {
        let set = Request::Set(PoolChange {
            port_range: "1:2".parse().unwrap(),
            nat_ips: None,
            nat_ips6: None,
            slice: None,
        });
        let conns = Request::Conns {
            filter: ConnFilter::default(),
        };
        for (r, class) in [
            (&Request::Status, Class::Read),
            (&conns, Class::Read),
            (&set, Class::Change),
        ] {
            assert_eq!(r.class(), class);
            assert!(Request::NAMES.contains(&r.name()));
        }
    }

    #[test]
    fn hostile_requests_are_errors_not_panics() {
        let deep = format!(
            "{{\"cmd\":\"set\",\"slice\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let huge = r#"{"cmd":"set","port_range":"1:2","nat_ips":[99999999999999999999999999]}"#;
        for input in [
            &b"\xff\xfe garbage"[..],
            b"{\"cmd\":\"set\",\"port_ra",
            deep.as_bytes(),
            huge.as_bytes(),
            b"{\"cmd\":\"nope\"}",
            b"",
        ] {
            assert!(serde_json::from_slice::<Request>(input).is_err());
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn requests_are_read_to_their_newline_within_the_limit() {
        let ok = run(read_request(
            &b"{\"cmd\":\"status\"}\nmore"[..],
            REQUEST_TIMEOUT,
        ))
        .unwrap();
        assert_eq!(ok, b"{\"cmd\":\"status\"}\n");
        // Without a newline, the end of the stream ends it.
        assert_eq!(
            run(read_request(&b"{}"[..], REQUEST_TIMEOUT)).unwrap(),
            b"{}"
        );
        let exact = vec![b' '; MAX_REQUEST];
        assert_eq!(
            run(read_request(&exact[..], REQUEST_TIMEOUT))
                .unwrap()
                .len(),
            MAX_REQUEST
        );
        let over = vec![b' '; MAX_REQUEST + 1];
        assert!(matches!(
            run(read_request(&over[..], REQUEST_TIMEOUT)),
            Err(ReadError::TooLarge)
        ));
    }

    #[test]
    fn a_silent_or_slow_client_times_out() {
        run(async {
            let (_silent, server) = tokio::io::duplex(64);
            let got = read_request(server, Duration::from_millis(50)).await;
            assert!(matches!(got, Err(ReadError::Timeout)), "{got:?}");
            // Half a line, then nothing: the limit is for the whole request.
            let (mut slow, server) = tokio::io::duplex(64);
            slow.write_all(b"{\"cmd\":").await.unwrap();
            let got = read_request(server, Duration::from_millis(50)).await;
            assert!(matches!(got, Err(ReadError::Timeout)), "{got:?}");
        });
    }
}
