#!/usr/bin/env python3
"""Crafts hostile and odd IPv6 packets from a pod with scapy and sends them on one interface.

Usage: malformed6.py IFACE DST_MAC ARGS_JSON

IFACE is the pod's interface, DST_MAC the node's interface towards the pod. ARGS_JSON holds
"pod" (the pod's IPv6 address, an internal source) and "server" (a destination on the internet
side). Every case is sent at layer 2 so nothing on the sending side fixes it, and carries a marker
(its UDP/TCP destination port, or fragment identification, or in its payload) so a test can find
it at the far side. The first case, "udp_ok", is a well-formed datagram that must come out
translated: it shows the capture works. Prints one JSON line per case sent:
{"case": name, "marker": ...}.
"""
import json
import struct
import sys
import time

from scapy.all import (TCP, UDP, Ether, ICMPv6DestUnreach, IPv6, IPv6ExtHdrDestOpt,
                       IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrSegmentRouting, Raw,
                       conf, sendp)

conf.verb = 0


def fix(pkt):
    """Builds the packet, letting scapy fill lengths, next headers and checksums (the cases below
    override exactly the field they break)."""
    return Ether(bytes(pkt))


def patched(pkt, offset, data):
    """The built frame with `data` written at `offset` (counted from the IPv6 header)."""
    raw = bytearray(bytes(pkt))
    at = 14 + offset
    raw[at:at + len(data)] = data
    return Ether(bytes(raw))


def cases(a):
    src, dst = a["pod"], a["server"]
    e = Ether(dst=a["mac"])
    ip = IPv6(src=src, dst=dst, hlim=64)
    p = 9300
    yield "udp_ok", p, fix(e / ip / UDP(sport=41000, dport=p) / Raw(b"control"))
    p += 1
    # Transport headers cut short: 10 bytes of a 20-byte TCP header, 4 bytes of UDP's 8.
    tcp = bytes(TCP(sport=41001, dport=p, flags="S"))[:10]
    yield "tcp_truncated_header", p, fix(e / IPv6(src=src, dst=dst, nh=6) / Raw(tcp))
    p += 1
    udp = struct.pack("!HH", 41002, p)
    yield "udp_truncated_header", p, fix(e / IPv6(src=src, dst=dst, nh=17) / Raw(udp))
    p += 1
    # The payload length claims 200 bytes more than the frame holds.
    good = fix(e / ip / UDP(sport=41003, dport=p) / Raw(b"payload length lies"))
    yield "payload_length_too_long", p, patched(good, 4, struct.pack("!H", good[IPv6].plen + 200))
    p += 1
    # The payload length ends inside the UDP datagram (whose own length says more).
    good = fix(e / ip / UDP(sport=41004, dport=p) / Raw(b"longer than the IPv6 payload"))
    yield "payload_length_too_short", p, patched(good, 4, struct.pack("!H", 12))
    p += 1
    yield "unknown_next_header", p, fix(e / IPv6(src=src, dst=dst, nh=253) / Raw(struct.pack("!H", p) + b"experimental"))
    p += 1
    esp = struct.pack("!II", 0x1000 + p, 1) + bytes(range(32))
    yield "esp", p, fix(e / IPv6(src=src, dst=dst, nh=50) / Raw(esp))
    p += 1
    # AH (next header UDP, 24 bytes: length field 4) in front of a well-formed UDP datagram.
    inner = bytes(UDP(sport=41007, dport=p, len=8 + 9, chksum=0x1234) / Raw(b"behind ah"))
    ah = struct.pack("!BBHII", 17, 4, 0, 0x2000 + p, 1) + b"\xa5" * 12
    yield "ah", p, fix(e / IPv6(src=src, dst=dst, nh=51) / Raw(ah + inner))
    p += 1
    srh = IPv6ExtHdrSegmentRouting(addresses=[dst, "2001:db8:2::20"], segleft=1)
    yield "routing_segments_left", p, fix(e / ip / srh / UDP(sport=41008, dport=p) / Raw(b"source routed"))
    p += 1
    chain = ip
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    yield "nine_dest_opts", p, fix(e / chain / UDP(sport=41009, dport=p) / Raw(b"deep chain"))
    p += 1
    yield "udp_zero_checksum", p, fix(e / ip / UDP(sport=41010, dport=p, chksum=0) / Raw(b"no checksum"))
    p += 1
    # An ICMPv6 error quoting 20 bytes: not even the quoted IPv6 header.
    quote = bytes(IPv6(src=dst, dst=src) / UDP(sport=53, dport=p))[:20]
    yield "icmp_error_truncated_quote", p, fix(e / ip / ICMPv6DestUnreach(code=4) / Raw(quote))
    p += 1
    # A UDP datagram in two fragments: the first holds the UDP header, the second does not.
    whole = bytes(UDP(sport=41012, dport=p) / Raw(b"F" * 120))
    whole = bytearray(whole)
    whole[6:8] = b"\x12\x34"  # any checksum: nobody reassembles this
    first, rest = bytes(whole[:64]), bytes(whole[64:])
    yield "fragment_first", p, fix(e / ip / IPv6ExtHdrFragment(offset=0, m=1, id=p, nh=17) / Raw(first))
    yield "fragment_later", p, fix(e / ip / IPv6ExtHdrFragment(offset=8, m=0, id=p, nh=17) / Raw(rest))
    p += 1
    # Hop-by-hop options in front of a truncated TCP header.
    yield "hop_by_hop_truncated_tcp", p, fix(e / ip / IPv6ExtHdrHopByHop(nh=6) / Raw(bytes(TCP(sport=41013, dport=p, flags="S"))[:12]))


def main():
    iface, mac, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    args["mac"] = mac
    for name, marker, pkt in cases(args):
        sendp(pkt, iface=iface)
        print(json.dumps({"case": name, "marker": marker}), flush=True)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
