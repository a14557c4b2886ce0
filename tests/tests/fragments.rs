//! Fragmented datagrams through the NAT (RFC 4787 REQ-14): a 4 KB UDP datagram from a pod on a
//! 1,280-byte MTU link arrives whole at the server, whether its fragments leave in order or the
//! last first, and the server's fragmented echo arrives whole back at the pod.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tests::{
    agent::Agent,
    topo::{Topology, NAT_IP, POD_CIDR, SERVER},
    traffic::{fingerprint, payload, LeakWatch, UdpServer},
};

fn small_mtu(topo: &Topology) {
    let p = &topo.pods[0];
    p.ns.ip(&["link", "set", &p.iface, "mtu", "1280"]);
    topo.server
        .ip(&["link", "set", &format!("{}-sr", topo.prefix), "mtu", "1280"]);
}

/// An IPv4 packet: header (checksum left to the kernel) and payload.
fn ip_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    mf: bool,
    offset: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&((u16::from(mf) << 13) | offset).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// Sends a UDP datagram from `src:sport` as IPv4 fragments of at most 1,232 data bytes, in the
/// order `order` gives (indices into the fragment list), through a raw socket.
fn send_fragmented(src: Ipv4Addr, sport: u16, to: SocketAddrV4, data: &[u8], reverse: bool) {
    let mut dgram = Vec::new();
    dgram.extend_from_slice(&sport.to_be_bytes());
    dgram.extend_from_slice(&to.port().to_be_bytes());
    dgram.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(data);
    let mut sum = snat_common::csum::pseudo_header_sum(
        src.octets(),
        to.ip().octets(),
        17,
        dgram.len() as u16,
    );
    sum = snat_common::csum::sum(&dgram, sum);
    let check = !snat_common::csum::fold_full(sum);
    dgram[6..8].copy_from_slice(&(if check == 0 { 0xffff } else { check }).to_be_bytes());
    let id = 0x5eed;
    let mut frags: Vec<Vec<u8>> = dgram
        .chunks(1232)
        .enumerate()
        .map(|(i, chunk)| {
            let offset = (i * 1232 / 8) as u16;
            let last = (i + 1) * 1232 >= dgram.len();
            ip_packet(src, *to.ip(), id, !last, offset, chunk)
        })
        .collect();
    if reverse {
        frags.reverse();
    }
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    for f in frags {
        // SAFETY: sending our buffer to a valid sockaddr_in of the stated size.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            n,
            f.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn a_fragmented_datagram_arrives_whole_in_order_and_out_of_order() {
    let topo = Topology::new(1);
    small_mtu(&topo);
    let agent = Agent::start(
        &topo.node,
        &topo.uplink,
        &["--internal", POD_CIDR, "--max-mappings", "65536"],
    );
    let leaks = LeakWatch::start(&topo.router, &topo.router_uplink);
    let to = SocketAddrV4::new(SERVER, 7777);
    let server = UdpServer::start(&topo.server, to);

    // In order: the pod's own stack fragments a 4 KB datagram; the server echoes it whole.
    let data = payload(4000, 11);
    let want = fingerprint(&data);
    let echoed = topo.pods[0].ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&data, to).unwrap();
        let mut buf = vec![0u8; 8192];
        let (n, _) = s
            .recv_from(&mut buf)
            .expect("the echo of a fragmented datagram");
        fingerprint(&buf[..n])
    });
    assert_eq!(echoed, want, "4 KB out and back, fragmented both ways");

    // Out of order: the last fragment first. The server sees one whole datagram from the NAT IP.
    let before = server.peers().len();
    let data = payload(4000, 12);
    let pod = topo.pods[0].addr;
    let echoed = topo.pods[0].ns.run(move || {
        let s = UdpSocket::bind((pod, 45678)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        send_fragmented(pod, 45678, to, &data, true);
        let mut buf = vec![0u8; 8192];
        let (n, _) = s
            .recv_from(&mut buf)
            .expect("the echo of an out-of-order fragmented datagram");
        (n, fingerprint(&buf[..n]))
    });
    assert_eq!(echoed, (4000, fingerprint(&payload(4000, 12))));
    let peers = server.peers();
    assert_eq!(peers.len(), before + 1);
    assert_eq!(*peers[before].ip(), NAT_IP);

    let stats = agent.stats();
    assert!(
        stats["counters"]["egress"]["translated_fragment"].as_u64() >= Some(6),
        "{stats}"
    );
    assert!(
        stats["counters"]["ingress"]["translated_fragment"].as_u64() >= Some(6),
        "{stats}"
    );
    leaks.assert_no_leak();
}
