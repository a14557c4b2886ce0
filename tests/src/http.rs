//! A minimal HTTP/1.1 client for the agent's /metrics: requests written by hand and responses
//! read by their Content-Length, so a test sees exactly what went over the connection
//! (keep-alive, HEAD without a body).

use std::io::{BufRead, BufReader, Read as _};

/// Where `snat run` serves /metrics by default, in its namespace.
pub const METRICS: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9469,
));

/// One response as it arrived.
#[derive(Debug)]
pub struct Response {
    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes `METHOD path HTTP/1.1` with a Host header and `extra` header lines.
pub fn send(conn: &mut impl std::io::Write, method: &str, path: &str, extra: &[&str]) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: snat\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).expect("sending a request");
}

/// Reads one response; its body (Content-Length bytes) only if `with_body` (false for HEAD).
pub fn read_response(conn: &mut BufReader<impl std::io::Read>, with_body: bool) -> Response {
    let mut status_line = String::new();
    conn.read_line(&mut status_line)
        .expect("reading a status line");
    let status_line = status_line.trim_end().to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).expect("reading a header");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("not a header: {line:?}"));
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut r = Response {
        status_line,
        status,
        headers,
        body: Vec::new(),
    };
    if with_body {
        let len: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length in {r:?}"));
        r.body.resize(len, 0);
        conn.read_exact(&mut r.body).expect("reading the body");
    }
    r
}

/// `GET path` on a connection of its own (`Connection: close`).
pub fn get(addr: std::net::SocketAddr, path: &str) -> Response {
    let mut conn =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("setting a read timeout");
    send(&mut conn, "GET", path, &["Connection: close"]);
    let mut reader = BufReader::new(conn);
    let r = read_response(&mut reader, true);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after the response: {rest:?}");
    r
}
