//! A hostile client of an snat agent's control socket, for `tests/tests/control.rs`: run as an
//! unprivileged user inside the agent's namespace, it for SECONDS at once
//! - holds HOLD connections open without sending anything,
//! - runs PARALLEL threads that each connect and ask for `status` over and over,
//! - sends garbage (invalid UTF-8), truncated requests (half a JSON line, then close) and
//!   oversized requests (256 KiB without a newline),
//!
//! then prints what it saw as one JSON object: how many answers said "permission denied",
//! "busy", "bad request", "too large", anything else, and how many connects failed.
//! Bounded: every loop stops at the deadline, every socket has timeouts.
//!
//! Usage: `control_flood IFACE SECONDS HOLD PARALLEL`

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixStream},
    },
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

type Tally = Arc<Mutex<BTreeMap<&'static str, u64>>>;

fn note(tally: &Tally, what: &'static str) {
    *tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(what)
        .or_default() += 1;
}

fn connect(iface: &str) -> Option<UnixStream> {
    let addr = SocketAddr::from_abstract_name(format!("snat/{iface}")).ok()?;
    let s = UnixStream::connect_addr(&addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(s)
}

/// Sends `bytes` (then ends the stream if `finish`) and sorts the answer.
fn exchange(iface: &str, bytes: &[u8], finish: bool, tally: &Tally) {
    let Some(mut s) = connect(iface) else {
        note(tally, "connect_failed");
        return;
    };
    let _ = s.write_all(bytes);
    if finish {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    note(
        tally,
        if text.contains("permission denied") {
            "denied"
        } else if text.contains("busy") {
            "busy"
        } else if text.contains("bad request") {
            "bad_request"
        } else if text.contains("too large") {
            "too_large"
        } else if text.contains("no complete request") {
            "timed_out"
        } else if text.is_empty() {
            "no_answer"
        } else {
            "other"
        },
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, iface, secs, hold, parallel] = args.as_slice() else {
        eprintln!("usage: control_flood IFACE SECONDS HOLD PARALLEL");
        std::process::exit(2);
    };
    let num = |s: &str| -> u64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("{s:?} is not a number");
            std::process::exit(2)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(num(secs));
    let tally: Tally = Arc::default();

    let held: Vec<UnixStream> = (0..num(hold)).filter_map(|_| connect(iface)).collect();
    note(&tally, "held");
    *tally.lock().unwrap().get_mut("held").unwrap() = held.len() as u64;

    let mut threads = Vec::new();
    for _ in 0..num(parallel) {
        let (iface, tally) = (iface.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            while Instant::now() < deadline {
                exchange(&iface, b"{\"cmd\":\"status\"}\n", true, &tally);
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    {
        let (iface, tally) = (iface.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            let oversized = vec![b'a'; 256 * 1024];
            while Instant::now() < deadline {
                let garbage: Vec<u8> = (0..200)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed >> 56) as u8 | 0x80
                    })
                    .chain(*b"\n")
                    .collect();
                exchange(&iface, &garbage, true, &tally);
                // Half a JSON line, then close without reading.
                if let Some(mut s) = connect(&iface) {
                    let _ = s.write_all(b"{\"cmd\":\"conns\",\"filter\":{\"sou");
                    note(&tally, "truncated_sent");
                }
                exchange(&iface, &oversized, false, &tally);
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    drop(held);
    let tally = tally.lock().unwrap();
    let fields: Vec<String> = tally.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!("{{{}}}", fields.join(","));
}
