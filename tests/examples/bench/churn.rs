//! Connection churn: bursts of short TCP connections from the pods' client threads, against a
//! server that closes first (so it, like a busy web server, holds the TIME_WAIT).
//!
//! Each client connection does what the harness's `TcpClient` does (`connect`, read the
//! greeting, then `request`: one line each way), for either family ([`exchange`]).
//! The server speaks the same protocol as the harness's `TcpServer` in `Mode::CloseFirst`
//! (greeting with the peer address it sees, read a line, answer `bye`, close), but from two
//! epoll loops instead of a thread per connection, so it keeps up with thousands of connections
//! per second on two cores.

use std::{
    collections::HashMap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tests::{netns::Netns, traffic::sockaddr};

/// A connection slower than this had its SYN (or request) retransmitted: it stalled.
pub const STALL: Duration = Duration::from_millis(200);
/// A connection is given up after this long (connect), plus the harness's read timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The churn server: `workers` epoll loops, each with its own `SO_REUSEPORT` listener on every
/// port; stopped and joined on drop.
pub struct ChurnServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ChurnServer {
    pub fn start(ns: &Netns, addr: IpAddr, ports: &[u16], workers: usize) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        for _ in 0..workers {
            let (stop, ready) = (stop.clone(), ready_tx.clone());
            let ports = ports.to_vec();
            threads.push(ns.spawn(move || {
                let listeners = match ports
                    .iter()
                    .map(|&p| listen_reuseport(SocketAddr::new(addr, p)))
                    .collect::<io::Result<Vec<_>>>()
                {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                if let Err(e) = serve(&listeners, &stop) {
                    eprintln!("bench: churn server: {e}");
                }
            }));
        }
        let server = Self { stop, threads };
        for _ in 0..workers {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("the churn server did not start")?
                .map_err(|e| anyhow::anyhow!("churn server: {e}"))?;
        }
        Ok(server)
    }
}

impl Drop for ChurnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`, backlog 4096.
fn listen_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned by the TcpListener below.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: setting an int option on our socket.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as u32,
            )
        })?;
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: binding our socket to a valid socket address of the stated size.
    cvt(unsafe { libc::bind(fd, (&raw const sa).cast(), len) })?;
    // SAFETY: listen(2) on our bound socket.
    cvt(unsafe { libc::listen(fd, 4096) })?;
    Ok(listener)
}

const LISTENER: u64 = 1 << 40;

fn epoll_add(ep: RawFd, fd: RawFd, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: registering our fd with our epoll instance.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &raw mut ev) }).map(drop)
}

fn serve(listeners: &[TcpListener], stop: &AtomicBool) -> io::Result<()> {
    // SAFETY: epoll_create1 with a valid flag; the fd is owned below.
    let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: `ep` is a fresh descriptor nobody else owns (closed on return).
    let _ep_owner = unsafe { std::os::fd::OwnedFd::from_raw_fd(ep) };
    for (i, l) in listeners.iter().enumerate() {
        epoll_add(ep, l.as_raw_fd(), LISTENER | i as u64)?;
    }
    let mut conns: HashMap<RawFd, TcpStream> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: waiting on our epoll instance into a buffer of the stated length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 50) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let data = ev.u64;
            if data & LISTENER != 0 {
                let l = &listeners[(data & 0xffff_ffff) as usize];
                loop {
                    match l.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.set_nodelay(true);
                            if conn.set_nonblocking(true).is_err()
                                || conn.write_all(format!("{peer}\n").as_bytes()).is_err()
                            {
                                continue;
                            }
                            let fd = conn.as_raw_fd();
                            if epoll_add(ep, fd, fd as u64).is_ok() {
                                conns.insert(fd, conn);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // ECONNABORTED and the like: that connection is gone, others wait.
                        Err(_) => break,
                    }
                }
            } else {
                let fd = data as RawFd;
                let done = match conns.get_mut(&fd) {
                    Some(conn) => match conn.read(&mut buf) {
                        Ok(0) => true,
                        Ok(k) if buf[..k].contains(&b'\n') => {
                            // Answer and close first: the server keeps the TIME_WAIT.
                            let _ = conn.write_all(b"bye\n");
                            true
                        }
                        Ok(_) => false,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                        Err(_) => true,
                    },
                    None => false,
                };
                if done {
                    // Dropping the stream closes it (and removes it from the epoll set).
                    conns.remove(&fd);
                }
            }
        }
    }
    Ok(())
}

/// What one burst did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Burst {
    pub completed: u64,
    pub failed: u64,
    pub stalled: u64,
    /// Connections not even attempted before the time limit.
    pub unfinished: u64,
    pub secs: f64,
}

impl Burst {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.completed as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// One burst of `count` connections from `threads_per_pod` threads in each pod to `server` on
/// `ports` (round robin), stopped after `limit` (connections under way then finish).
pub fn burst(
    pods: &[&Netns],
    threads_per_pod: usize,
    server: IpAddr,
    ports: &[u16],
    count: u64,
    limit: Duration,
) -> Burst {
    let tickets = Arc::new(AtomicU64::new(0));
    let ports: Arc<[u16]> = ports.into();
    let started = Instant::now();
    let deadline = started + limit;
    let mut threads = Vec::new();
    for pod in pods {
        for _ in 0..threads_per_pod {
            let (tickets, ports) = (tickets.clone(), ports.clone());
            threads.push(pod.spawn(move || {
                let mut b = Burst::default();
                loop {
                    if crate::interrupted() || Instant::now() >= deadline {
                        break;
                    }
                    let t = tickets.fetch_add(1, Ordering::Relaxed);
                    if t >= count {
                        break;
                    }
                    let to = SocketAddr::new(server, ports[(t % ports.len() as u64) as usize]);
                    let start = Instant::now();
                    let r = exchange(to, None);
                    match r {
                        Ok(()) => {
                            b.completed += 1;
                            if start.elapsed() > STALL {
                                b.stalled += 1;
                            }
                        }
                        Err(_) => b.failed += 1,
                    }
                }
                b
            }));
        }
    }
    let mut total = Burst::default();
    for t in threads {
        if let Ok(b) = t.join() {
            total.completed += b.completed;
            total.failed += b.failed;
            total.stalled += b.stalled;
        }
    }
    total.secs = started.elapsed().as_secs_f64();
    let attempted = tickets.load(Ordering::Relaxed).min(count);
    total.unfinished = count - attempted;
    total
}

/// One churn connection, as the harness's `TcpClient::connect` and `request` make it: connect
/// (given up after [`CONNECT_TIMEOUT`]), read the greeting line (into `greeting`, if given: the
/// client's address as the server saw it), send one line, read the answer to the end (the
/// server closes first).
pub fn exchange(to: SocketAddr, mut greeting: Option<&mut Vec<u8>>) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"));
        }
        if let Some(g) = greeting.as_deref_mut() {
            g.push(byte[0]);
        }
    }
    stream.write_all(b"hi\n")?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    if rest == b"bye\n" {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("answer {rest:?}"),
        ))
    }
}

/// TcpExt `TCPSynRetrans` of a namespace (read from a thread inside it).
pub fn syn_retrans(ns: &Netns) -> u64 {
    ns.run(|| {
        let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
        let mut lines = text.lines();
        while let (Some(head), Some(vals)) = (lines.next(), lines.next()) {
            if !head.starts_with("TcpExt:") {
                continue;
            }
            let names = head.split_whitespace();
            let values = vals.split_whitespace();
            for (n, v) in names.zip(values) {
                if n == "TCPSynRetrans" {
                    return v.parse().unwrap_or(0);
                }
            }
        }
        0
    })
}
