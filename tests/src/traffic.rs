//! Servers and clients that run inside namespaces (on threads that entered them).
//!
//! Servers record every peer they see, as the server sees it: that is what tests check the NAT
//! against. Every wait is bounded.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Peers a server has seen, in arrival order.
pub type Peers = Arc<Mutex<Vec<SocketAddrV4>>>;

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("unexpected IPv6 peer {a}"),
    }
}

/// A loop on a thread inside a namespace, stopped and joined when dropped.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs `body(ready, stop)` on a thread in `ns` and returns once the body has called
    /// `ready` (its sockets are bound). The body loops until `stop` is set.
    fn start(ns: &Netns, body: impl FnOnce(&dyn Fn(), &AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = stop.clone();
        let thread = ns.spawn(move || {
            body(&|| ready_tx.send(()).expect("ready"), &s);
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("background loop did not start");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A raw socket(2) with a 20 ms receive timeout, so loops around it see their stop flag.
fn raw_socket(domain: i32, kind: i32, proto: i32) -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(domain, kind, proto) };
    assert!(
        fd >= 0,
        "socket({domain}, {kind}, {proto}): {}",
        io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_recv_timeout(&fd, Duration::from_millis(20));
    fd
}

/// Sets `SO_RCVTIMEO` on `fd`: a receive waits at most `timeout`.
fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) {
    set_timeout_opt(fd, libc::SO_RCVTIMEO, timeout);
}

/// Sets the socket timeout option `name` (`SO_RCVTIMEO`, `SO_SNDTIMEO`) of `fd` to `timeout`.
fn set_timeout_opt(fd: &OwnedFd, name: i32, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: setting a timeout option from a valid timeval on our socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
}

/// Receives one packet (truncated to `buf`) from a raw socket; `None` on timeout.
fn recv_raw(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reading into our buffer from our socket.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    usize::try_from(n).ok()
}

/// A TCP server: to each connection it first writes the peer address it sees (`ip:port\n`), then
/// echoes everything back until the client closes.
pub struct TcpServer {
    pub peers: Peers,
    _loop: Background,
}

/// How a [`TcpServer`] treats a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Greeting, then echo until the client closes (the client closes first).
    Echo,
    /// Greeting, one line in, one line back, then the server closes first (so the server holds
    /// the TIME_WAIT, as in the churn that collapses netfilter's port-range masquerade).
    CloseFirst,
}

impl TcpServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Self {
        Self::start_mode(ns, addr, Mode::Echo)
    }

    pub fn start_mode(ns: &Netns, addr: SocketAddrV4, mode: Mode) -> Self {
        let peers: Peers = Arc::default();
        let p = peers.clone();
        let bg = Background::start(ns, move |ready, stop| {
            let listener = TcpListener::bind(addr).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        p.lock().unwrap().push(v4(peer));
                        std::thread::Builder::new()
                            .stack_size(64 * 1024)
                            .spawn(move || {
                                let _ = match mode {
                                    Mode::Echo => serve_echo(conn, peer),
                                    Mode::CloseFirst => serve_once(conn, peer),
                                };
                            })
                            .expect("spawn");
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Self { peers, _loop: bg }
    }

    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve_once(mut conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(format!("{peer}\n").as_bytes())?;
    let mut byte = [0u8; 1];
    while conn.read(&mut byte)? == 1 && byte[0] != b'\n' {}
    conn.write_all(b"bye\n")
}

fn serve_echo(mut conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.write_all(format!("{peer}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

/// A client connection to a [`TcpServer`]: knows how the server saw it.
pub struct TcpClient {
    pub stream: TcpStream,
    /// Our address as the server saw it (after NAT).
    pub seen_as: SocketAddrV4,
}

impl TcpClient {
    /// Connects (on the calling thread, which must be in the client's namespace) and reads the
    /// server's greeting.
    pub fn connect(to: SocketAddrV4, timeout: Duration) -> io::Result<Self> {
        let mut stream = TcpStream::connect_timeout(&to.into(), timeout)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            if stream.read(&mut byte)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"));
            }
            line.push(byte[0]);
        }
        let seen_as = String::from_utf8_lossy(&line)
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("greeting: {e}")))?;
        Ok(Self { stream, seen_as })
    }

    /// Against a [`Mode::CloseFirst`] server: sends one line, reads the answer to the end (the
    /// server closes first).
    pub fn request(mut self) -> io::Result<()> {
        self.stream.write_all(b"hi\n")?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        if rest == b"bye\n" {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer {rest:?}"),
            ))
        }
    }

    /// Sends `data` and reads it back from the echo server; returns what came back.
    pub fn echo(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut writer = self.stream.try_clone()?;
        let data = data.to_vec();
        let len = data.len();
        let w = std::thread::spawn(move || writer.write_all(&data));
        let mut back = vec![0u8; len];
        self.stream.read_exact(&mut back)?;
        w.join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        Ok(back)
    }
}

/// A UDP server answering each datagram with the peer address it sees (`ip:port`).
pub struct UdpServer {
    pub peers: Peers,
    _loop: Background,
}

impl UdpServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Self {
        let peers: Peers = Arc::default();
        let p = peers.clone();
        let bg = Background::start(ns, move |ready, stop| {
            let sock = UdpSocket::bind(addr).expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            ready();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    p.lock().unwrap().push(v4(peer));
                    // Small datagrams are questions ("who am I?"); big ones are echoed whole.
                    let answer = if n > 64 {
                        buf[..n].to_vec()
                    } else {
                        peer.to_string().into_bytes()
                    };
                    let _ = sock.send_to(&answer, peer);
                }
            }
        });
        Self { peers, _loop: bg }
    }

    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().unwrap().clone()
    }
}

/// Sends one datagram from `sock` and returns how the server saw us.
pub fn udp_ask(sock: &UdpSocket, to: SocketAddrV4) -> io::Result<SocketAddrV4> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(b"who am i", to)?;
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf)?;
    String::from_utf8_lossy(&buf[..n])
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))
}

/// Watches ICMP echo requests arriving in a namespace (a raw socket sees a copy of each; the
/// kernel still answers them): records (source address, identifier).
pub struct IcmpWatch {
    pub seen: Arc<Mutex<Vec<(Ipv4Addr, u16)>>>,
    _loop: Background,
}

impl IcmpWatch {
    pub fn start(ns: &Netns) -> Self {
        let seen: Arc<Mutex<Vec<(Ipv4Addr, u16)>>> = Arc::default();
        let p = seen.clone();
        let bg = Background::start(ns, move |ready, stop| {
            let fd = raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            ready();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = recv_raw(&fd, &mut buf) else {
                    continue;
                };
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if n >= ihl + 8 && ihl >= 20 && buf[ihl] == 8 {
                    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                    let id = u16::from_be_bytes([buf[ihl + 4], buf[ihl + 5]]);
                    p.lock().unwrap().push((src, id));
                }
            }
        });
        Self { seen, _loop: bg }
    }

    pub fn seen(&self) -> Vec<(Ipv4Addr, u16)> {
        self.seen.lock().unwrap().clone()
    }
}

/// Watches every IPv4 packet on an interface (an `AF_PACKET` socket in its namespace) and counts
/// those that carry an address of 10.0.0.0/8, the internal space of the tests, as their source or
/// inside the packet an ICMP error quotes: a translated world must show none.
pub struct LeakWatch {
    /// Packets seen, packets with an internal source, and the first few such sources.
    counts: Arc<Mutex<(u64, u64, Vec<Ipv4Addr>)>>,
    bg: Background,
}

/// An `AF_PACKET` socket receiving every packet of ethertype `ethertype` (`ETH_P_IP`, or
/// `ETH_P_ALL`: only those see what the host sends) on `iface` (in the calling thread's
/// namespace), with the 20 ms receive timeout of [`raw_socket`].
pub fn packet_socket(iface: &std::ffi::CStr, ethertype: i32) -> OwnedFd {
    let proto = (ethertype as u16).to_be();
    let fd = raw_socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto));
    // SAFETY: `iface` is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(iface.as_ptr()) };
    assert_ne!(index, 0, "no interface {iface:?}");
    // SAFETY: all-zero is a valid sockaddr_ll; we fill the fields bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: binding our socket to a valid sockaddr_ll of the stated size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    fd
}

impl LeakWatch {
    pub fn start(ns: &Netns, iface: &str) -> Self {
        let counts: Arc<Mutex<(u64, u64, Vec<Ipv4Addr>)>> = Arc::default();
        let c = counts.clone();
        let iface = std::ffi::CString::new(iface).expect("iface name");
        let bg = Background::start(ns, move |ready, stop| {
            let fd = packet_socket(&iface, libc::ETH_P_IP);
            ready();
            let mut buf = [0u8; 128];
            while !stop.load(Ordering::Relaxed) {
                if recv_raw(&fd, &mut buf).is_none_or(|n| n < 20) {
                    continue;
                }
                let mut g = c.lock().unwrap();
                g.0 += 1;
                if let Some(addr) = internal_address(&buf) {
                    g.1 += 1;
                    if g.2.len() < 10 {
                        g.2.push(addr);
                    }
                }
            }
        });
        Self { counts, bg }
    }

    /// Packets seen so far, and how many of them carried an internal address.
    pub fn counts(&self) -> (u64, u64) {
        let g = self.counts.lock().unwrap();
        (g.0, g.1)
    }

    /// Stops watching and asserts packets were seen and none had an internal source.
    pub fn assert_no_leak(mut self) {
        std::thread::sleep(Duration::from_millis(50));
        self.bg.stop();
        let (total, leaked, examples) = self.counts.lock().unwrap().clone();
        assert!(total > 0, "the leak watch saw no packet at all");
        assert_eq!(
            leaked, 0,
            "{leaked} of {total} packets left with an internal source, e.g. {examples:?}"
        );
    }
}

/// The internal (10.0.0.0/8) address an IPv4 packet (the first bytes of it) carries as its
/// source, or as the source or destination of the packet an ICMP error quotes, if any.
fn internal_address(ip: &[u8]) -> Option<Ipv4Addr> {
    let addr = |at: usize| {
        ip.get(at..at + 4)
            .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    };
    let internal = |a: Ipv4Addr| (a.octets()[0] == 10).then_some(a);
    if let Some(a) = addr(12).and_then(internal) {
        return Some(a);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let icmp_error = ip[9] == 1 && matches!(ip.get(ihl), Some(3 | 11 | 12));
    if !icmp_error {
        return None;
    }
    let quote = ihl + 8;
    addr(quote + 12)
        .and_then(internal)
        .or_else(|| addr(quote + 16).and_then(internal))
}

/// Records the IPv4 packets seen on an interface (their first 512 bytes, at most 8,192 packets).
pub struct Capture {
    packets: Arc<Mutex<Vec<Vec<u8>>>>,
    _loop: Background,
}

impl Capture {
    pub fn start(ns: &Netns, iface: &str) -> Self {
        let packets: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let p = packets.clone();
        let iface = std::ffi::CString::new(iface).expect("iface name");
        let bg = Background::start(ns, move |ready, stop| {
            let fd = packet_socket(&iface, libc::ETH_P_IP);
            ready();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let Some(n) = recv_raw(&fd, &mut buf) else {
                    continue;
                };
                let mut g = p.lock().unwrap();
                if g.len() < 8192 {
                    g.push(buf[..n.min(buf.len())].to_vec());
                }
            }
        });
        Self { packets, _loop: bg }
    }

    /// What was captured so far (after a moment for packets in flight).
    pub fn packets(&self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(100));
        self.packets.lock().unwrap().clone()
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A deterministic pseudo-random payload (xorshift), so transfers need no RNG crate.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a 64 over `data`: a content fingerprint to compare transfers with.
pub fn fingerprint(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A UDP echo server on several addresses: every datagram goes back verbatim to its sender from
/// the address it arrived at and, with `late` set to (min, max), once more between min and max
/// later (spread evenly), prefixed with `late `, so a test can send replies at the moment a
/// mapping is being released. At most 100,000 late copies are pending at once.
pub struct UdpEcho {
    /// Datagrams echoed at once, and late copies sent.
    pub counts: Arc<Mutex<(u64, u64)>>,
    _loop: Background,
}

/// A late copy [`UdpEcho`] will send: when, a tie-breaker, the socket index, to whom, what.
type LateCopy = (Instant, u64, usize, SocketAddr, Vec<u8>);

impl UdpEcho {
    pub fn start(ns: &Netns, addrs: &[SocketAddrV4], late: Option<(Duration, Duration)>) -> Self {
        let counts: Arc<Mutex<(u64, u64)>> = Arc::default();
        let c = counts.clone();
        let addrs = addrs.to_vec();
        let bg = Background::start(ns, move |ready, stop| {
            let socks: Vec<UdpSocket> = addrs
                .iter()
                .map(|a| {
                    let s = UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"));
                    s.set_nonblocking(true).expect("nonblocking");
                    s
                })
                .collect();
            ready();
            let mut pending: BinaryHeap<Reverse<LateCopy>> = BinaryHeap::new();
            let mut buf = vec![0u8; 65536];
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                // Wait for a datagram, the next late copy, or 20 ms (to see the stop flag).
                let wait = pending
                    .peek()
                    .map_or(Duration::from_millis(20), |Reverse((due, ..))| {
                        due.saturating_duration_since(Instant::now())
                    })
                    .min(Duration::from_millis(20));
                let mut fds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: poll(2) on our own pollfds.
                unsafe {
                    libc::poll(
                        fds.as_mut_ptr(),
                        fds.len() as libc::nfds_t,
                        wait.as_millis() as i32,
                    )
                };
                for (i, s) in socks.iter().enumerate() {
                    while let Ok((len, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..len], peer);
                        c.lock().unwrap().0 += 1;
                        let Some((min, max)) = late else { continue };
                        n += 1;
                        let spread = (max - min).as_micros() as u64;
                        let at = min + Duration::from_micros(n * 7919 % spread.max(1));
                        if pending.len() < 100_000 {
                            let mut copy = b"late ".to_vec();
                            copy.extend_from_slice(&buf[..len]);
                            pending.push(Reverse((Instant::now() + at, n, i, peer, copy)));
                        }
                    }
                }
                let now = Instant::now();
                while pending.peek().is_some_and(|Reverse((due, ..))| *due <= now) {
                    let Reverse((_, _, i, peer, copy)) = pending.pop().expect("peeked");
                    let _ = socks[i].send_to(&copy, peer);
                    c.lock().unwrap().1 += 1;
                }
            }
        });
        Self { counts, _loop: bg }
    }

    /// Datagrams echoed at once, and late copies sent, so far.
    pub fn counts(&self) -> (u64, u64) {
        *self.counts.lock().unwrap()
    }
}

/// A TCP connection from `local` (bound first, with `SO_REUSEADDR`) to `to`, given up after
/// `timeout`: what a simultaneous open needs (each side's port known before it connects).
/// Either family (both addresses of the same one).
pub fn tcp_connect_from(
    local: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let (local, to) = (local.into(), to.into());
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    // SO_SNDTIMEO bounds the connect.
    set_timeout_opt(&fd, libc::SO_SNDTIMEO, timeout);
    for (addr, bind) in [(local, true), (to, false)] {
        let (sa, len) = sockaddr(addr);
        // SAFETY: a valid socket address of the stated size.
        let rc = unsafe {
            if bind {
                libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len)
            } else {
                libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len)
            }
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let stream = TcpStream::from(fd);
    // SO_SNDTIMEO was for the connect only.
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// `addr` as a C socket address, with its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid `sockaddr_storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a `sockaddr_storage` is large and aligned enough for any socket address.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Sets an integer socket option, panicking with the error if it fails.
pub fn set_int_opt(fd: &impl AsRawFd, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt(2) on our socket with a valid int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}, {value}): {}",
        io::Error::last_os_error()
    );
}

/// An ICMP error a socket with `IP_RECVERR` received about its own traffic: the kernel matched
/// the error's quote to this socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketError {
    pub errno: i32,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The ICMP `info` field (the next-hop MTU of a "fragmentation needed").
    pub info: u32,
    /// Who sent the error.
    pub offender: Ipv4Addr,
}

/// Waits up to `timeout` for an ICMP error in the error queue of `sock` (`IP_RECVERR` must be
/// on) and takes it out of the queue.
pub fn recv_icmp_error(sock: &impl AsRawFd, timeout: Duration) -> Option<SocketError> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd.
    let n = unsafe { libc::poll(&raw mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 || pfd.revents & libc::POLLERR == 0 {
        return None;
    }
    let mut data = [0u8; 2048];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid msghdr; we point it at our buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: recvmsg(2) into the buffers `msg` describes.
    let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_ERRQUEUE) };
    if rc < 0 {
        return None;
    }
    // SAFETY: walking the control messages the kernel wrote into `control`, as `msg` describes.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a control message header inside `control`.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::SOL_IP && kind == libc::IP_RECVERR {
            // SAFETY: an IP_RECVERR message holds a sock_extended_err followed by the
            // offender's sockaddr_in (SO_EE_OFFENDER); both are read unaligned.
            let (ee, offender) = unsafe {
                let p = libc::CMSG_DATA(cmsg);
                let ee = std::ptr::read_unaligned(p.cast::<libc::sock_extended_err>());
                let off = std::ptr::read_unaligned(
                    p.add(size_of::<libc::sock_extended_err>())
                        .cast::<libc::sockaddr_in>(),
                );
                (ee, off)
            };
            if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                return None;
            }
            return Some(SocketError {
                errno: ee.ee_errno as i32,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
                info: ee.ee_info,
                offender: Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr)),
            });
        }
        // SAFETY: the next header after `cmsg` within `msg`'s control buffer, or null.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    None
}

/// An ICMP echo ("ping") socket of the calling thread's namespace, bound to echo identifier
/// `id`, with a receive timeout of `timeout`. The namespace must allow ping sockets to the
/// caller's group (`net.ipv4.ping_group_range`).
pub fn ping_socket(id: u16, timeout: Duration) -> OwnedFd {
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
    assert!(
        fd >= 0,
        "ping socket (is net.ipv4.ping_group_range set?): {}",
        io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: id.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: binding our socket to a valid sockaddr_in of the stated size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind to echo id {id}: {}",
        io::Error::last_os_error()
    );
    set_recv_timeout(&fd, timeout);
    fd
}

/// Sends echo request `seq` to `to` from a [`ping_socket`] (the kernel fills in its identifier
/// and checksum) and waits for the reply with that sequence number; returns the reply's
/// identifier as the socket sees it, or `None` if no reply came within the socket's timeout.
/// Replies with other sequence numbers are skipped.
pub fn ping_once(fd: &OwnedFd, to: Ipv4Addr, seq: u16) -> Option<u16> {
    let mut req = [0u8; 24];
    req[0] = 8;
    req[6..8].copy_from_slice(&seq.to_be_bytes());
    req[8..].copy_from_slice(b"snat ping test!!");
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sending our buffer to a valid sockaddr_in of the stated size.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(
        n,
        req.len() as isize,
        "sendto: {}",
        io::Error::last_os_error()
    );
    let mut buf = [0u8; 256];
    for _ in 0..16 {
        // SAFETY: reading into our buffer from our socket.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        if n >= 8 && buf[0] == 0 && buf[6..8] == seq.to_be_bytes() {
            return Some(u16::from_be_bytes([buf[4], buf[5]]));
        }
    }
    None
}
