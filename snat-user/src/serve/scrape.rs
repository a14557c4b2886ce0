//! The `/metrics` endpoint: HTTP/1.1 (hyper) in front of one shared report, so that scrapes
//! cannot turn the agent into a CPU sink.
//!
//! Invariants:
//! - At most one report build (a walk of every table, seconds at a million mappings) runs at a
//!   time, and the next starts no sooner than `--metrics-min-interval` after the last one
//!   finished. A scrape within that interval gets the last build's text; a scrape during a build
//!   waits for it and gets its text. So any number of parallel scrapes costs one walk, and the
//!   walks take at most `build / (build + interval)` of one core.
//! - At most [`MAX_CONNECTIONS`] connections are open at once. Beyond that the agent stops
//!   accepting: new connections wait in the kernel's listen backlog (which completes their
//!   handshake) until a slot frees, rather than being refused, so a burst of scrapers is served
//!   late instead of failing, and waiting costs the agent nothing.
//! - No connection holds a slot for long without doing anything: it must send a complete request
//!   head within [`HEAD_TIMEOUT`] of opening and of each response (hyper's header read timeout,
//!   whose timer also runs while a keep-alive connection sits idle), and a client that accepts
//!   no byte of a response for [`HEAD_TIMEOUT`] is dropped.
//!
//! [`Schedule`] is the pure decision, given `now`; [`Scrapes`] runs it with the clock and one
//! task per build; [`serve`] is the HTTP side.

use std::{
    convert::Infallible,
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{watch, Semaphore},
};

use super::{
    metrics::{build_families, encode_families, families, BuildStats},
    Agent,
};
use crate::settings::MetricsAddr;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send a request head (from opening, or from its previous
/// response), and how long a response may wait for the client to read any of it.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head read (hyper's minimum buffer is 8 KiB): 64 connections hold at most 1 MiB.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What a scrape at `now` does.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<T> {
    /// Serve this: the last build finished less than the minimum interval ago.
    Cached(T),
    /// Start build number `n` (1 for the first), report its result with
    /// [`Schedule::finished`], and serve it.
    Build(u64),
    /// Build `n` is running: wait for its result and serve it.
    Join(u64),
}

/// When to build a report: single flight, and at most one build per minimum interval (counted
/// from the end of the last build). Pure: the caller says what time it is.
#[derive(Debug)]
pub struct Schedule<T> {
    min_interval: Duration,
    /// When the last build finished, and its result.
    last: Option<(Instant, T)>,
    /// Builds started so far; while `building`, the last of them is running.
    started: u64,
    building: bool,
}

impl<T: Clone> Schedule<T> {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last: None,
            started: 0,
            building: false,
        }
    }

    /// The step for a scrape arriving at `now`. A [`Step::Build`] must be followed by
    /// [`Schedule::finished`], or every later scrape joins a build that never ends.
    pub fn next(&mut self, now: Instant) -> Step<T> {
        if let Some((at, value)) = &self.last {
            if now.saturating_duration_since(*at) < self.min_interval {
                return Step::Cached(value.clone());
            }
        }
        if self.building {
            return Step::Join(self.started);
        }
        self.building = true;
        self.started += 1;
        Step::Build(self.started)
    }

    /// The running build finished at `now` with `value`.
    pub fn finished(&mut self, now: Instant, value: T) {
        self.building = false;
        self.last = Some((now, value));
    }
}

/// The text of one scrape, or why it could not be built.
pub type Scrape = Result<Bytes, Arc<str>>;

/// Builds a scrape's text; `n` is the build's number. Runs on a blocking thread.
type Builder = dyn Fn(u64) -> Scrape + Send + Sync;

/// [`Schedule`] with the clock: shared by every connection.
pub struct Scrapes {
    schedule: Mutex<Schedule<Scrape>>,
    /// The number and result of the last finished build.
    done: watch::Sender<Option<(u64, Scrape)>>,
    build: Arc<Builder>,
}

impl Scrapes {
    pub fn new(
        min_interval: Duration,
        build: impl Fn(u64) -> Scrape + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            schedule: Mutex::new(Schedule::new(min_interval)),
            done: watch::Sender::new(None),
            build: Arc::new(build),
        })
    }

    /// Scrapes of the agent's tables: its report and the exposition of [`super::metrics`].
    pub fn of_agent(min_interval: Duration, state: Arc<dyn Agent>) -> Arc<Self> {
        Self::new(min_interval, move |n| {
            let started = Instant::now();
            let report = state.report(None).map_err(|e| format!("{e:#}"))?;
            let stats = BuildStats {
                builds: n,
                seconds: started.elapsed().as_secs_f64(),
            };
            let mut all = families(&report);
            all.extend(build_families(&stats));
            let text = encode_families(all).map_err(|e| format!("{e:#}"))?;
            Ok(Bytes::from(text))
        })
    }

    /// The text for a scrape now: the cached one, the running build's, or a new build's.
    pub async fn get(self: &Arc<Self>) -> Scrape {
        // Subscribed first, so a build that finishes before we wait is still seen.
        let mut done = self.done.subscribe();
        let step = self
            .schedule
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next(Instant::now());
        let n = match step {
            Step::Cached(text) => return text,
            Step::Join(n) => n,
            Step::Build(n) => {
                // The build runs in a task of its own, so it finishes (and the schedule learns
                // of it) even if the scrape that started it goes away.
                let this = self.clone();
                tokio::spawn(async move {
                    let build = this.build.clone();
                    let result = tokio::task::spawn_blocking(move || build(n))
                        .await
                        .unwrap_or_else(|e| Err(format!("building the report failed: {e}").into()))
                        .inspect_err(|e| warn!("/metrics: {e}"));
                    this.schedule
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .finished(Instant::now(), result.clone());
                    this.done.send_replace(Some((n, result)));
                });
                n
            }
        };
        let finished = done
            .wait_for(|d| d.as_ref().is_some_and(|(m, _)| *m >= n))
            .await;
        match finished.as_deref() {
            Ok(Some((_, text))) => text.clone(),
            _ => Err("the agent is stopping".into()),
        }
    }
}

/// A warning for an endpoint that other hosts may reach.
pub fn exposure_warning(addr: MetricsAddr, top_sources: usize) -> Option<String> {
    let MetricsAddr::On(a) = addr else {
        return None;
    };
    if a.ip().is_loopback() {
        return None;
    }
    let restrict = format!(
        "serve it on loopback (--metrics-addr 127.0.0.1:{}) behind a local scraper or proxy, or firewall the port",
        a.port()
    );
    Some(if top_sources == 0 {
        format!("--metrics-addr {a} is not a loopback address: anyone who can reach it can read /metrics (NAT IPs and counters; --top-sources 0 keeps pod addresses out); to restrict it, {restrict}")
    } else {
        format!("--metrics-addr {a} is not a loopback address: anyone who can reach it can read /metrics, whose labels carry pod addresses (the {top_sources} busiest sources, destinations and refused sources); to restrict it, {restrict}, or keep addresses out with --top-sources 0")
    })
}

/// Binds the endpoint's address (`None` for `off`), so that a taken address stops the agent
/// before anything is attached.
pub fn bind(addr: MetricsAddr) -> anyhow::Result<Option<std::net::TcpListener>> {
    let MetricsAddr::On(addr) = addr else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, &e))?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn bind_error(addr: SocketAddr, e: &io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::AddrInUse => anyhow!(
            "--metrics-addr {addr} is in use: pass a free address (e.g. --metrics-addr {}:{}), --metrics-addr off, or stop what holds it",
            addr.ip(),
            addr.port().wrapping_add(1)
        ),
        io::ErrorKind::AddrNotAvailable => anyhow!(
            "--metrics-addr {addr}: no interface in this network namespace has that address (is `lo` up?); pass one it has"
        ),
        _ => anyhow!("--metrics-addr {addr}: {e}"),
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: Arc<Scrapes>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    loop {
        // Never closed, so this always gets a slot, once one is free.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: try again a little later, not in a busy loop.
                debug!("/metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        let conn = http.serve_connection(
            TokioIo::new(ReadingClient::new(stream)),
            service_fn(move |req| respond(req, scrapes.clone())),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!("/metrics connection: {e}");
            }
            drop(slot);
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    scrapes: Arc<Scrapes>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "snat serves Prometheus metrics at /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "/metrics answers GET and HEAD\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    // For HEAD, hyper sends the headers (Content-Length included) and not the body.
    Ok(match scrapes.get().await {
        Ok(text) => with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    })
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body.into())
}

fn with_type(status: StatusCode, kind: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

/// A client connection whose writes fail once the client has accepted no byte for
/// [`HEAD_TIMEOUT`], so one that never reads its responses cannot keep its slot.
struct ReadingClient {
    stream: TcpStream,
    /// Running while a write waits for the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ReadingClient {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            stalled: None,
        }
    }

    fn deadline<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(HEAD_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {}",
                    crate::settings::duration::Human(HEAD_TIMEOUT)
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ReadingClient {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadingClient {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.deadline(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.deadline(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.deadline(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.deadline(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use clap::Parser as _;

    use super::*;
    use crate::settings::cli::{Cli, Command};

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_scrape_builds_and_scrapes_within_the_interval_get_its_result() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        assert_eq!(s.next(t0), Step::Build(1));
        s.finished(t0 + S / 2, "one");
        assert_eq!(s.next(t0 + S / 2), Step::Cached("one"));
        assert_eq!(
            s.next(t0 + S + S / 4),
            Step::Cached("one"),
            "1s after the end"
        );
        assert_eq!(s.next(t0 + S + S / 2), Step::Build(2));
    }

    #[test]
    fn scrapes_during_a_build_join_it_however_many_and_however_late() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        assert_eq!(s.next(t0), Step::Build(1));
        for i in 0..100 {
            assert_eq!(s.next(t0 + S * i), Step::Join(1), "scrape {i}");
        }
        s.finished(t0 + S * 100, "slow");
        assert_eq!(s.next(t0 + S * 100), Step::Cached("slow"));
    }

    #[test]
    fn the_interval_counts_from_the_end_of_a_build_not_its_start() {
        // A build longer than the interval must not be followed by another at once: the walks
        // would then take a whole core.
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        assert_eq!(s.next(t0), Step::Build(1));
        s.finished(t0 + 3 * S, "slow");
        assert_eq!(s.next(t0 + 3 * S + S / 2), Step::Cached("slow"));
        assert_eq!(s.next(t0 + 4 * S), Step::Build(2));
    }

    #[test]
    fn with_no_interval_every_scrape_after_a_build_builds_but_never_two_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        assert_eq!(s.next(t0), Step::Build(1));
        assert_eq!(s.next(t0), Step::Join(1));
        s.finished(t0, "a");
        assert_eq!(s.next(t0), Step::Build(2));
        assert_eq!(s.next(t0 + S), Step::Join(2));
        s.finished(t0 + S, "b");
        assert_eq!(s.next(t0 + S), Step::Build(3));
    }

    #[test]
    fn failures_are_cached_like_results() {
        let t0 = Instant::now();
        let mut s: Schedule<Result<&str, &str>> = Schedule::new(S);
        assert_eq!(s.next(t0), Step::Build(1));
        s.finished(t0, Err("maps unreadable"));
        assert_eq!(s.next(t0 + S / 2), Step::Cached(Err("maps unreadable")));
        assert_eq!(s.next(t0 + S), Step::Build(2));
    }

    #[test]
    fn parallel_scrapes_share_one_build() {
        let builds = Arc::new(AtomicU64::new(0));
        let counted = builds.clone();
        let scrapes = Scrapes::new(Duration::from_secs(60), move |n| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            Ok(Bytes::from(format!("build {n}\n")))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let texts = rt.block_on(async {
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let s = scrapes.clone();
                    tokio::spawn(async move { s.get().await })
                })
                .collect();
            let mut texts = Vec::new();
            for t in tasks {
                texts.push(t.await.unwrap().unwrap());
            }
            texts.push(scrapes.get().await.unwrap());
            texts
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert!(texts.iter().all(|t| t == "build 1\n"), "{texts:?}");
    }

    #[test]
    fn a_build_that_panics_answers_its_waiters_and_the_next_scrape_builds_again() {
        let scrapes = Scrapes::new(Duration::ZERO, |n| {
            assert!(n > 1, "the first build panics");
            Ok(Bytes::from_static(b"ok\n"))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let e = scrapes.get().await.unwrap_err();
            assert!(e.contains("building the report failed"), "{e}");
            assert_eq!(scrapes.get().await.unwrap(), "ok\n");
        });
    }

    fn run_args(extra: &[&str]) -> Result<Box<crate::settings::cli::RunArgs>, String> {
        let mut argv = vec!["snat", "run", "--iface", "eth0"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metrics_flags_parse_and_bad_values_name_the_fix() {
        let a = run_args(&[]).unwrap();
        assert_eq!(
            a.metrics_addr,
            MetricsAddr::On("127.0.0.1:9469".parse().unwrap())
        );
        assert_eq!(a.metrics_min_interval, S);
        let a = run_args(&["--metrics-addr", "off", "--metrics-min-interval", "0s"]).unwrap();
        assert_eq!(a.metrics_addr, MetricsAddr::Off);
        assert_eq!(a.metrics_min_interval, Duration::ZERO);
        let a = run_args(&[
            "--metrics-addr",
            "[::1]:9000",
            "--metrics-min-interval",
            "1m",
        ])
        .unwrap();
        assert_eq!(a.metrics_addr.to_string(), "[::1]:9000");
        assert_eq!(a.metrics_min_interval, 60 * S);

        for (flags, fix) in [
            (["--metrics-addr", "9469"], "write ip:port"),
            (["--metrics-addr", "Off"], "or off to serve no metrics"),
            (["--metrics-addr", "localhost:9469"], "e.g. 127.0.0.1:9469"),
            (["--metrics-min-interval", "61s"], "use 0s to 1m"),
            (["--metrics-min-interval", "1"], "e.g. 15s"),
        ] {
            let e = run_args(&flags).unwrap_err();
            assert!(e.contains(flags[1]) && e.contains(fix), "{flags:?}: {e}");
        }
    }

    #[test]
    fn only_a_non_loopback_address_is_warned_about() {
        let on = |s: &str| MetricsAddr::On(s.parse().unwrap());
        assert_eq!(exposure_warning(on("127.0.0.1:9469"), 20), None);
        assert_eq!(exposure_warning(on("[::1]:9469"), 20), None);
        assert_eq!(exposure_warning(MetricsAddr::Off, 20), None);
        let w = exposure_warning(on("0.0.0.0:9469"), 20).unwrap();
        for part in [
            "--metrics-addr 0.0.0.0:9469",
            "pod addresses",
            "--metrics-addr 127.0.0.1:9469",
            "--top-sources 0",
        ] {
            assert!(w.contains(part), "{part:?} in {w}");
        }
        let w = exposure_warning(on("198.51.100.1:9000"), 0).unwrap();
        assert!(w.contains("keeps pod addresses out"), "{w}");
        assert!(w.contains("--metrics-addr 127.0.0.1:9000"), "{w}");
    }
}
